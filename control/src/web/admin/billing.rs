//! Admin: money. Revenue per currency, compute time sold and used, what
//! each host owner is owed with a form to record a payout, and recent
//! orders with a form to refund a paid one.

use askama::Template;
use axum::extract::{Path, Query, State};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;

use crate::app::App;
use crate::billing::orders::{self, Order};
use crate::billing::reports::{self, AdminSummary, Owed};
use crate::billing::{ledger, money};
use crate::error::AppError;
use crate::web::auth::Ctx;
use crate::web::errors::{FormError, PageResult};
use crate::web::extract::{parse_id, PageForm};
use crate::web::layout::Layout;
use crate::web::render::{ok, render, see_other};

pub fn routes() -> Router<App> {
    Router::new()
        .route("/admin/billing", get(billing_page))
        .route("/admin/billing/payouts", post(record_payout))
        .route("/admin/orders/{id}/refund", post(refund_order))
}

#[derive(Deserialize)]
struct PayoutForm {
    owner_id: u64,
    amount: String,
    currency: String,
    #[serde(default)]
    reference: String,
}

#[derive(Deserialize)]
struct RefundForm {
    #[serde(default)]
    reason: String,
}

#[derive(Template)]
#[template(path = "admin_billing.html")]
struct BillingPage {
    layout: Layout,
    summary: AdminSummary,
    orders: Vec<Order>,
    notice: Option<&'static str>,
    /// The payout form that was refused, as typed.
    payout: Option<PayoutForm>,
    /// The order whose refund was refused, and the reason typed.
    refund: Option<(u64, String)>,
    error: FormError,
}

impl BillingPage {
    async fn of(app: &App, ctx: &Ctx) -> Result<Self, AppError> {
        Ok(Self {
            layout: ctx.layout(),
            summary: reports::admin(&app.pool).await?,
            orders: orders::list(&app.pool, None, 50).await?,
            notice: None,
            payout: None,
            refund: None,
            error: FormError::none(),
        })
    }

    fn refused_payout(&self, row: &Owed) -> Option<&PayoutForm> {
        self.payout
            .as_ref()
            .filter(|f| f.owner_id == row.owner_id && f.currency == row.owed.currency)
    }

    /// What row `row`'s amount field holds: what was typed when refused,
    /// otherwise all that is owed.
    fn payout_amount(&self, row: &Owed) -> String {
        self.refused_payout(row)
            .map_or_else(|| row.owed.whole_minor_input(), |f| f.amount.clone())
    }

    fn payout_reference(&self, row: &Owed) -> &str {
        self.refused_payout(row)
            .map_or("", |f| f.reference.as_str())
    }

    /// The error of row `row`'s form about `field` (`None` for the form
    /// as a whole).
    fn payout_error(&self, row: &Owed, field: Option<&str>) -> Option<&str> {
        self.refused_payout(row)?;
        match field {
            Some(f) => self.error.on(f),
            None => self.error.general(),
        }
    }

    fn refund_reason(&self, order_id: &u64) -> &str {
        match &self.refund {
            Some((id, reason)) if id == order_id => reason,
            _ => "",
        }
    }

    fn refund_error(&self, order_id: &u64, field: Option<&str>) -> Option<&str> {
        match &self.refund {
            Some((id, _)) if id == order_id => match field {
                Some(f) => self.error.on(f),
                None => self.error.general(),
            },
            _ => None,
        }
    }
}

#[derive(Deserialize)]
struct DoneQuery {
    done: Option<String>,
}

async fn billing_page(
    State(app): State<App>,
    ctx: Ctx,
    Query(query): Query<DoneQuery>,
) -> PageResult {
    ctx.require_admin()?;
    let notice = match query.done.as_deref() {
        Some("payout") => Some("Payout recorded."),
        Some("refund") => {
            Some("Order refunded: the money goes back and its unused time is removed.")
        }
        _ => None,
    };
    ok(BillingPage {
        notice,
        ..BillingPage::of(&app, &ctx).await?
    })
}

async fn record_payout(
    State(app): State<App>,
    ctx: Ctx,
    PageForm(form): PageForm<PayoutForm>,
) -> PageResult {
    let admin = ctx.require_admin()?;
    let recorded = async {
        let amount = money::parse_minor(&form.amount).ok_or_else(|| {
            AppError::invalid(
                "amount",
                "Enter an amount like 12.50, at most two decimals.",
            )
        })?;
        ledger::record_payout(
            &app.pool,
            form.owner_id,
            amount,
            &form.currency,
            admin.id,
            &form.reference,
        )
        .await
    }
    .await;
    match recorded {
        Ok(()) => see_other("/admin/billing?done=payout"),
        Err(e @ AppError::Invalid { .. }) => render(
            e.status(),
            BillingPage {
                error: FormError::renamed(&e, &[("amount_minor", "amount")]),
                payout: Some(form),
                ..BillingPage::of(&app, &ctx).await?
            },
        ),
        Err(e) => Err(e.into()),
    }
}

async fn refund_order(
    State(app): State<App>,
    ctx: Ctx,
    Path(id): Path<String>,
    PageForm(form): PageForm<RefundForm>,
) -> PageResult {
    let admin = ctx.require_admin()?;
    let id = parse_id(&id, "order")?;
    let refunded = orders::refund(
        &app.pool,
        app.payments.provider.as_ref(),
        id,
        admin.id,
        &form.reason,
    )
    .await;
    match refunded {
        Ok(_) => see_other("/admin/billing?done=refund"),
        Err(e @ (AppError::Invalid { .. } | AppError::Conflict { .. })) => render(
            e.status(),
            BillingPage {
                error: FormError::from(&e),
                refund: Some((id, form.reason)),
                ..BillingPage::of(&app, &ctx).await?
            },
        ),
        Err(e) => Err(e.into()),
    }
}
