//! Buying from the site: Buy on Packages places an order and goes to the
//! provider's checkout; the sandbox's own checkout page takes a test card;
//! the return page shows the payment the moment its webhook is in (a small
//! script polls; without JavaScript the page refreshes itself); receipts.

use askama::Template;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;
use opencloud_protocol::metrics::LabelValue;
use serde::Deserialize;

use crate::app::App;
use crate::billing::orders::{self, Order};
use crate::billing::providers::{Card, PaymentProvider};
use crate::billing::{ledger, money, webhook};
use crate::error::AppError;
use crate::ids::random_id;
use crate::web::api::order_message;
use crate::web::auth::Ctx;
use crate::web::errors::{FormError, PageResult};
use crate::web::extract::{parse_id, PageForm};
use crate::web::layout::Layout;
use crate::web::render::{ok, render};

pub fn routes() -> Router<App> {
    Router::new()
        .route("/packages/{id}/buy", post(buy))
        .route("/checkout/sandbox/{id}", get(checkout_page).post(pay))
        .route("/orders/{id}", get(order_page))
        .route("/orders/{id}/receipt", get(receipt_page))
        .route("/static/order.js", get(order_script))
}

async fn buy(State(app): State<App>, ctx: Ctx, Path(id): Path<String>) -> PageResult {
    let (user, _) = ctx.require_user()?;
    let (_, checkout_url) = orders::create(
        &app.pool,
        app.payments.provider.as_ref(),
        &app.config.public_origin,
        user.id,
        parse_id(&id, "package")?,
    )
    .await?;
    // The checkout may be another site (Stripe): a plain 303 to it.
    Ok((
        StatusCode::SEE_OTHER,
        [(axum::http::header::LOCATION, checkout_url)],
    )
        .into_response())
}

#[derive(Template)]
#[template(path = "checkout.html")]
struct CheckoutPage {
    layout: Layout,
    order: Order,
    error: FormError,
    card_number: String,
    expiry: String,
}

/// The caller's pending sandbox order `id`.
async fn sandbox_order(app: &App, ctx: &Ctx, id: &str) -> Result<Order, AppError> {
    let (user, _) = ctx.require_user()?;
    if app.payments.sandbox.is_none() {
        return Err(AppError::NotFound("page"));
    }
    let order = orders::get_owned(&app.pool, user.id, parse_id(id, "order")?).await?;
    if order.provider != "sandbox" {
        return Err(AppError::NotFound("order"));
    }
    Ok(order)
}

async fn checkout_page(State(app): State<App>, ctx: Ctx, Path(id): Path<String>) -> PageResult {
    let order = sandbox_order(&app, &ctx, &id).await?;
    if order.status != "pending" {
        return crate::web::render::see_other(&format!("/orders/{}", order.id));
    }
    ok(CheckoutPage {
        layout: ctx.layout(),
        order,
        error: FormError::none(),
        card_number: String::new(),
        expiry: String::new(),
    })
}

#[derive(Deserialize)]
struct CardForm {
    card_number: String,
    expiry: String,
    cvc: String,
    #[serde(default)]
    #[allow(dead_code)]
    name: String,
}

/// The sandbox takes the card: a decline shows on the form and changes
/// nothing but the order's last failure; a success posts the signed
/// webhook (as Stripe would, from outside) and goes to the return page.
async fn pay(
    State(app): State<App>,
    ctx: Ctx,
    Path(id): Path<String>,
    PageForm(form): PageForm<CardForm>,
) -> PageResult {
    let order = sandbox_order(&app, &ctx, &id).await?;
    if order.status != "pending" {
        return crate::web::render::see_other(&format!("/orders/{}", order.id));
    }
    let sandbox = app
        .payments
        .sandbox
        .clone()
        .ok_or(AppError::NotFound("page"))?;
    let card = Card {
        number: form.card_number.clone(),
        expiry: form.expiry.clone(),
        cvc: form.cvc,
    };
    let today = time::OffsetDateTime::now_utc();
    if let Err(decline) = card.charge((today.year() as u32, u32::from(u8::from(today.month())))) {
        decline.outcome.count(sandbox.name());
        orders::note_attempt(&app.pool, order.id, Some(&decline.message)).await?;
        tracing::info!(
            order = order.id,
            outcome = decline.outcome.label(),
            "sandbox card refused"
        );
        let error = FormError::from(&AppError::invalid(decline.field, decline.message));
        return render(
            StatusCode::PAYMENT_REQUIRED,
            CheckoutPage {
                layout: ctx.layout(),
                order,
                error,
                card_number: form.card_number,
                expiry: form.expiry,
            },
        );
    }
    let event = webhook::paid_event(
        &format!("evt_sandbox_{}", random_id()),
        order.checkout_ref.as_deref().unwrap_or_default(),
        order.id,
        order.amount_minor,
        &order.currency,
        &format!("pi_sandbox_{}", random_id()),
        crate::clock::now_unix(),
    );
    orders::note_attempt(&app.pool, order.id, None).await?;
    tokio::spawn(async move { sandbox.deliver(event).await });
    crate::web::render::see_other(&format!("/orders/{}", order.id))
}

#[derive(Template)]
#[template(path = "order.html")]
struct OrderPage {
    layout: Layout,
    order: Order,
    message: String,
    balance: String,
}

async fn order_page(State(app): State<App>, ctx: Ctx, Path(id): Path<String>) -> PageResult {
    let (user, _) = ctx.require_user()?;
    let order = orders::get_owned(&app.pool, user.id, parse_id(&id, "order")?).await?;
    let balance = ledger::balance(&app.pool, user.id).await?;
    ok(OrderPage {
        layout: ctx.layout(),
        message: order_message(&order),
        balance: money::seconds(balance as i64),
        order,
    })
}

#[derive(Template)]
#[template(path = "receipt.html")]
struct ReceiptPage {
    layout: Layout,
    order: Order,
    buyer_name: String,
    buyer_email: String,
}

async fn receipt_page(State(app): State<App>, ctx: Ctx, Path(id): Path<String>) -> PageResult {
    let (user, _) = ctx.require_user()?;
    let order = orders::get_owned(&app.pool, user.id, parse_id(&id, "order")?).await?;
    if order.status == "pending" {
        return Err(AppError::NotFound("receipt").into());
    }
    ok(ReceiptPage {
        layout: ctx.layout(),
        buyer_name: user.name.clone(),
        buyer_email: user.email.clone(),
        order,
    })
}

async fn order_script() -> impl IntoResponse {
    crate::web::layout::script(include_str!("../../../static/order.js"))
}
