//! Admin: the packages customers buy, listed (retired ones too), created
//! and edited through a form that takes prices and sizes in the units
//! people think in (`19.00`, hours, GiB).

use askama::Template;
use axum::extract::{Path, State};
use axum::routing::get;
use axum::Router;
use serde::Deserialize;

use super::numbers::trim_number;
use crate::app::App;
use crate::error::AppError;
use crate::packages::{self, Package, PackageInput};
use crate::web::auth::Ctx;
use crate::web::errors::{FormError, PageResult};
use crate::web::extract::{parse_id, PageForm};
use crate::web::layout::Layout;
use crate::web::render::{ok, render, see_other};

pub fn routes() -> Router<App> {
    Router::new()
        .route(
            "/admin/packages",
            get(admin_packages).post(admin_create_package),
        )
        .route(
            "/admin/packages/{id}",
            get(admin_package).post(admin_update_package),
        )
}

/// The package form as typed: prices in major units (`19.00`).
#[derive(Deserialize, Default, Clone)]
struct PackageForm {
    name: String,
    #[serde(default)]
    description: String,
    price: String,
    currency: String,
    compute_hours: String,
    max_concurrent_sessions: String,
    cpu_cores: String,
    memory_gib: String,
    storage_gib: String,
    validity_days: String,
    #[serde(default)]
    retired: Option<String>,
}

impl PackageForm {
    fn from_package(p: &Package) -> Self {
        Self {
            name: p.name.clone(),
            description: p.description.clone(),
            price: format!("{}.{:02}", p.price_minor / 100, p.price_minor % 100),
            currency: p.currency.clone(),
            compute_hours: trim_number(f64::from(p.compute_minutes) / 60.0, 3),
            max_concurrent_sessions: p.max_concurrent_sessions.to_string(),
            cpu_cores: trim_number(p.cpu_cores, 3),
            memory_gib: trim_number(f64::from(p.memory_mib) / 1024.0, 3),
            storage_gib: trim_number(f64::from(p.storage_quota_mib) / 1024.0, 3),
            validity_days: p.validity_days.to_string(),
            retired: p.retired.then(|| "on".into()),
        }
    }

    fn blank() -> Self {
        Self {
            currency: "USD".into(),
            validity_days: "30".into(),
            max_concurrent_sessions: "1".into(),
            ..Self::default()
        }
    }

    fn to_input(&self) -> Result<PackageInput, AppError> {
        fn number(field: &'static str, raw: &str) -> Result<f64, AppError> {
            raw.trim()
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite() && *v >= 0.0)
                .ok_or_else(|| AppError::invalid(field, "Enter a number, like 2 or 1.5."))
        }
        let price = number("price", &self.price)?;
        let whole = |field, raw: &str, scale: f64| -> Result<u32, AppError> {
            let value = (number(field, raw)? * scale).round();
            if value > f64::from(u32::MAX) {
                return Err(AppError::invalid(field, "That number is too large."));
            }
            Ok(value as u32)
        };
        if price > 1_000_000.0 {
            return Err(AppError::invalid(
                "price",
                "A price is at most 1 000 000.00.",
            ));
        }
        Ok(PackageInput {
            name: self.name.clone(),
            description: self.description.clone(),
            price_minor: (price * 100.0).round() as u64,
            currency: self.currency.clone(),
            compute_minutes: whole("compute_hours", &self.compute_hours, 60.0)?,
            max_concurrent_sessions: whole(
                "max_concurrent_sessions",
                &self.max_concurrent_sessions,
                1.0,
            )?,
            cpu_cores: number("cpu_cores", &self.cpu_cores)?,
            memory_mib: whole("memory_gib", &self.memory_gib, 1024.0)?,
            storage_quota_mib: whole("storage_gib", &self.storage_gib, 1024.0)?,
            validity_days: whole("validity_days", &self.validity_days, 1.0)?,
            retired: self.retired.is_some(),
        })
    }
}

/// Maps a checked package's field names to the form's.
fn package_form_error(e: &AppError) -> FormError {
    let field = match e.field() {
        Some("price_minor") => Some("price"),
        Some("compute_minutes") => Some("compute_hours"),
        Some("memory_mib") => Some("memory_gib"),
        Some("storage_quota_mib") => Some("storage_gib"),
        other => other,
    };
    let message = match field {
        Some("memory_gib") => "Between 0.25 and 1024 GiB.".to_owned(),
        Some("storage_gib") => "Between 0.001 and 10240 GiB.".to_owned(),
        Some("compute_hours") => "Between 1 minute (0.02) and 16 666 hours.".to_owned(),
        _ => e.to_string(),
    };
    FormError::from(&AppError::Invalid { field, message })
}

#[derive(Template)]
#[template(path = "admin_packages.html")]
struct AdminPackagesPage {
    layout: Layout,
    packages: Vec<Package>,
    error: FormError,
    form: PackageForm,
}

async fn admin_packages(State(app): State<App>, ctx: Ctx) -> PageResult {
    ctx.require_admin()?;
    ok(AdminPackagesPage {
        layout: ctx.layout(),
        packages: packages::list(&app.pool, true).await?,
        error: FormError::none(),
        form: PackageForm::blank(),
    })
}

async fn admin_create_package(
    State(app): State<App>,
    ctx: Ctx,
    PageForm(form): PageForm<PackageForm>,
) -> PageResult {
    ctx.require_admin()?;
    let created = async {
        let input = form.to_input()?;
        packages::create(&app.pool, input).await
    }
    .await;
    match created {
        Ok(_) => see_other("/admin/packages"),
        Err(e @ (AppError::Invalid { .. } | AppError::Conflict { .. })) => render(
            e.status(),
            AdminPackagesPage {
                layout: ctx.layout(),
                packages: packages::list(&app.pool, true).await?,
                error: package_form_error(&e),
                form,
            },
        ),
        Err(e) => Err(e.into()),
    }
}

#[derive(Template)]
#[template(path = "admin_package.html")]
struct AdminPackagePage {
    layout: Layout,
    package: Package,
    error: FormError,
    form: PackageForm,
}

async fn admin_package(State(app): State<App>, ctx: Ctx, Path(id): Path<String>) -> PageResult {
    ctx.require_admin()?;
    let package = packages::get(&app.pool, parse_id(&id, "package")?).await?;
    ok(AdminPackagePage {
        layout: ctx.layout(),
        form: PackageForm::from_package(&package),
        package,
        error: FormError::none(),
    })
}

async fn admin_update_package(
    State(app): State<App>,
    ctx: Ctx,
    Path(id): Path<String>,
    PageForm(form): PageForm<PackageForm>,
) -> PageResult {
    ctx.require_admin()?;
    let id = parse_id(&id, "package")?;
    let updated = async {
        let input = form.to_input()?;
        packages::update(&app.pool, id, input).await
    }
    .await;
    match updated {
        Ok(_) => see_other("/admin/packages"),
        Err(e @ (AppError::Invalid { .. } | AppError::Conflict { .. })) => render(
            e.status(),
            AdminPackagePage {
                layout: ctx.layout(),
                package: packages::get(&app.pool, id).await?,
                error: package_form_error(&e),
                form,
            },
        ),
        Err(e) => Err(e.into()),
    }
}
