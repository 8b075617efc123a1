//! Packages: what customers buy (compute time, concurrency, a CPU and memory
//! tier, storage, validity). Admins create, edit and retire them.

use mysql_async::prelude::*;
use mysql_async::{Pool, Transaction, TxOpts};
use serde::{Deserialize, Serialize};

use crate::error::AppError;
use crate::names::NameRule;

/// The rule for a package's name, which admins choose and customers see.
pub const NAME: NameRule = NameRule {
    field: "name",
    what: "A package name",
    when_empty: "Give the package a name.",
    max_chars: 100,
};

#[derive(Debug, Clone, Serialize)]
pub struct Package {
    pub id: u64,
    pub name: String,
    pub description: String,
    pub price_minor: u64,
    pub currency: String,
    pub compute_minutes: u32,
    pub max_concurrent_sessions: u32,
    pub cpu_cores: f64,
    pub memory_mib: u32,
    pub storage_quota_mib: u32,
    pub validity_days: u32,
    pub retired: bool,
}

impl Package {
    /// `12.50 USD`; currencies without minor units are not sold yet.
    pub fn price_display(&self) -> String {
        format!(
            "{}.{:02} {}",
            self.price_minor / 100,
            self.price_minor % 100,
            self.currency
        )
    }

    pub fn compute_display(&self) -> String {
        let (hours, minutes) = (self.compute_minutes / 60, self.compute_minutes % 60);
        match (hours, minutes) {
            (0, m) => format!("{m} min"),
            (h, 0) => format!("{h} h"),
            (h, m) => format!("{h} h {m} min"),
        }
    }

    pub fn cores_display(&self) -> String {
        if self.cpu_cores == 1.0 {
            "1 core".into()
        } else {
            format!("{} cores", self.cpu_cores)
        }
    }

    pub fn memory_display(&self) -> String {
        mib_display(self.memory_mib)
    }

    pub fn storage_display(&self) -> String {
        mib_display(self.storage_quota_mib)
    }
}

/// `4 GiB` for whole gibibytes, `512 MiB` otherwise.
fn mib_display(mib: u32) -> String {
    if mib.is_multiple_of(1024) {
        format!("{} GiB", mib / 1024)
    } else {
        format!("{mib} MiB")
    }
}

/// A package as an admin submits it, before checking.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct PackageInput {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub price_minor: u64,
    pub currency: String,
    pub compute_minutes: u32,
    pub max_concurrent_sessions: u32,
    pub cpu_cores: f64,
    pub memory_mib: u32,
    pub storage_quota_mib: u32,
    pub validity_days: u32,
    #[serde(default)]
    pub retired: bool,
}

impl PackageInput {
    /// Checks every value; the error names the first field at fault.
    pub fn check(mut self) -> Result<Self, AppError> {
        self.name = NAME.check(&self.name)?;
        self.description = self.description.trim().to_owned();
        if self.description.chars().count() > 1000 {
            return Err(AppError::invalid(
                "description",
                "A description has at most 1000 characters.",
            ));
        }
        self.currency = self.currency.trim().to_ascii_uppercase();
        if self.currency.len() != 3 || !self.currency.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(AppError::invalid(
                "currency",
                "Use a three-letter ISO currency code like USD or EUR.",
            ));
        }
        if self.price_minor > 100_000_000 {
            return Err(AppError::invalid(
                "price_minor",
                "A price is at most 1 000 000.00.",
            ));
        }
        let ranges: [(&'static str, u32, u32, u32); 5] = [
            ("compute_minutes", self.compute_minutes, 1, 1_000_000),
            (
                "max_concurrent_sessions",
                self.max_concurrent_sessions,
                1,
                100,
            ),
            ("memory_mib", self.memory_mib, 256, 1_048_576),
            ("storage_quota_mib", self.storage_quota_mib, 1, 10_485_760),
            ("validity_days", self.validity_days, 1, 3650),
        ];
        for (field, value, min, max) in ranges {
            if !(min..=max).contains(&value) {
                return Err(AppError::invalid(
                    field,
                    format!("Must be between {min} and {max}."),
                ));
            }
        }
        if !(self.cpu_cores.is_finite() && (0.25..=256.0).contains(&self.cpu_cores)) {
            return Err(AppError::invalid(
                "cpu_cores",
                "Must be between 0.25 and 256 cores.",
            ));
        }
        self.cpu_cores = (self.cpu_cores * 100.0).round() / 100.0;
        Ok(self)
    }

    /// The values in the column order of the `INSERT` and `UPDATE` below.
    fn values(&self) -> Vec<mysql_async::Value> {
        vec![
            self.name.as_str().into(),
            self.description.as_str().into(),
            self.price_minor.into(),
            self.currency.as_str().into(),
            self.compute_minutes.into(),
            self.max_concurrent_sessions.into(),
            self.cpu_cores.into(),
            self.memory_mib.into(),
            self.storage_quota_mib.into(),
            self.validity_days.into(),
            self.retired.into(),
        ]
    }
}

type PackageRow = (
    u64,
    String,
    String,
    u64,
    String,
    u32,
    u32,
    f64,
    u32,
    u32,
    u32,
    bool,
);

const COLUMNS: &str = "id, name, description, price_minor, currency, compute_minutes, \
     max_concurrent_sessions, CAST(cpu_cores AS DOUBLE), memory_mib, storage_quota_mib, validity_days, retired";

fn from_row(row: PackageRow) -> Package {
    Package {
        id: row.0,
        name: row.1,
        description: row.2,
        price_minor: row.3,
        currency: row.4,
        compute_minutes: row.5,
        max_concurrent_sessions: row.6,
        cpu_cores: row.7,
        memory_mib: row.8,
        storage_quota_mib: row.9,
        validity_days: row.10,
        retired: row.11,
    }
}

/// Packages on sale (or all, for admins), cheapest first.
pub async fn list(pool: &Pool, include_retired: bool) -> Result<Vec<Package>, AppError> {
    let rows: Vec<PackageRow> = pool
        .get_conn()
        .await?
        .exec(
            format!("SELECT {COLUMNS} FROM packages WHERE ? OR NOT retired ORDER BY retired, price_minor, id"),
            (include_retired,),
        )
        .await?;
    Ok(rows.into_iter().map(from_row).collect())
}

pub async fn get(pool: &Pool, id: u64) -> Result<Package, AppError> {
    find(&mut pool.get_conn().await?, id, "").await
}

/// The package `id`, read on `conn` (inside the caller's transaction).
pub async fn get_in(conn: &mut impl Queryable, id: u64) -> Result<Package, AppError> {
    find(conn, id, "").await
}

/// The package `id`, read on `conn` with `suffix` (`FOR UPDATE` in a
/// transaction) after the query.
async fn find(conn: &mut impl Queryable, id: u64, suffix: &str) -> Result<Package, AppError> {
    let row: Option<PackageRow> = conn
        .exec_first(
            format!("SELECT {COLUMNS} FROM packages WHERE id = ?{suffix}"),
            (id,),
        )
        .await?;
    row.map(from_row).ok_or(AppError::NotFound("package"))
}

fn duplicate_name(e: mysql_async::Error) -> AppError {
    match e {
        mysql_async::Error::Server(ref s) if s.code == 1062 => AppError::Conflict {
            field: Some("name"),
            message: "A package with this name already exists.".into(),
        },
        other => other.into(),
    }
}

pub async fn create(pool: &Pool, input: PackageInput) -> Result<Package, AppError> {
    let p = input.check()?;
    let mut conn = pool.get_conn().await?;
    conn.exec_drop(
        "INSERT INTO packages (name, description, price_minor, currency, compute_minutes,
            max_concurrent_sessions, cpu_cores, memory_mib, storage_quota_mib, validity_days, retired)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        p.values(),
    )
    .await
    .map_err(duplicate_name)?;
    let id = conn.last_insert_id().unwrap_or_default();
    drop(conn);
    get(pool, id).await
}

pub async fn update(pool: &Pool, id: u64, input: PackageInput) -> Result<Package, AppError> {
    let p = input.check()?;
    let mut tx = pool.start_transaction(TxOpts::default()).await?;
    find(&mut tx, id, "").await?;
    write(&mut tx, id, &p).await?;
    tx.commit().await?;
    get(pool, id).await
}

/// Replaces the fields `patch` sends and keeps the rest, in one transaction.
pub async fn patch(pool: &Pool, id: u64, patch: PackagePatch) -> Result<Package, AppError> {
    let mut tx = pool.start_transaction(TxOpts::default()).await?;
    let current = PackageInput::from(find(&mut tx, id, " FOR UPDATE").await?);
    let p = patch.over(current).check()?;
    write(&mut tx, id, &p).await?;
    tx.commit().await?;
    get(pool, id).await
}

/// Stores the checked `p` as package `id`.
async fn write(tx: &mut Transaction<'_>, id: u64, p: &PackageInput) -> Result<(), AppError> {
    let mut values = p.values();
    values.push(id.into());
    tx.exec_drop(
        "UPDATE packages SET name = ?, description = ?, price_minor = ?, currency = ?,
            compute_minutes = ?, max_concurrent_sessions = ?, cpu_cores = ?, memory_mib = ?,
            storage_quota_mib = ?, validity_days = ?, retired = ?, updated_at = NOW(6)
         WHERE id = ?",
        values,
    )
    .await
    .map_err(duplicate_name)
}

/// A package change where every field is optional: what is sent replaces,
/// the rest stays.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackagePatch {
    pub name: Option<String>,
    pub description: Option<String>,
    pub price_minor: Option<u64>,
    pub currency: Option<String>,
    pub compute_minutes: Option<u32>,
    pub max_concurrent_sessions: Option<u32>,
    pub cpu_cores: Option<f64>,
    pub memory_mib: Option<u32>,
    pub storage_quota_mib: Option<u32>,
    pub validity_days: Option<u32>,
    pub retired: Option<bool>,
}

impl PackagePatch {
    /// `current` with the sent fields replaced (not yet checked).
    fn over(self, current: PackageInput) -> PackageInput {
        PackageInput {
            name: self.name.unwrap_or(current.name),
            description: self.description.unwrap_or(current.description),
            price_minor: self.price_minor.unwrap_or(current.price_minor),
            currency: self.currency.unwrap_or(current.currency),
            compute_minutes: self.compute_minutes.unwrap_or(current.compute_minutes),
            max_concurrent_sessions: self
                .max_concurrent_sessions
                .unwrap_or(current.max_concurrent_sessions),
            cpu_cores: self.cpu_cores.unwrap_or(current.cpu_cores),
            memory_mib: self.memory_mib.unwrap_or(current.memory_mib),
            storage_quota_mib: self.storage_quota_mib.unwrap_or(current.storage_quota_mib),
            validity_days: self.validity_days.unwrap_or(current.validity_days),
            retired: self.retired.unwrap_or(current.retired),
        }
    }
}

impl From<Package> for PackageInput {
    fn from(p: Package) -> Self {
        Self {
            name: p.name,
            description: p.description,
            price_minor: p.price_minor,
            currency: p.currency,
            compute_minutes: p.compute_minutes,
            max_concurrent_sessions: p.max_concurrent_sessions,
            cpu_cores: p.cpu_cores,
            memory_mib: p.memory_mib,
            storage_quota_mib: p.storage_quota_mib,
            validity_days: p.validity_days,
            retired: p.retired,
        }
    }
}

/// The three starter packages `scripts/up` seeds; inserting is idempotent.
pub fn starter_packages() -> Vec<PackageInput> {
    let package = |name: &str,
                   description: &str,
                   price_minor,
                   compute_minutes,
                   sessions,
                   cpu_cores,
                   memory_mib,
                   storage_quota_mib| PackageInput {
        name: name.into(),
        description: description.into(),
        price_minor,
        currency: "USD".into(),
        compute_minutes,
        max_concurrent_sessions: sessions,
        cpu_cores,
        memory_mib,
        storage_quota_mib,
        validity_days: 30,
        retired: false,
    };
    vec![
        package(
            "Starter",
            "Try notebooks for a few evenings.",
            500,
            600,
            1,
            1.0,
            2048,
            1024,
        ),
        package(
            "Researcher",
            "Steady daily work with room for data.",
            1900,
            3000,
            2,
            2.0,
            4096,
            10240,
        ),
        package(
            "Lab",
            "A small team's worth of compute.",
            4900,
            12000,
            5,
            4.0,
            16384,
            51200,
        ),
    ]
}

/// Inserts the starter packages that are missing by name.
pub async fn seed(pool: &Pool) -> Result<usize, AppError> {
    let mut created = 0;
    for input in starter_packages() {
        match create(pool, input).await {
            Ok(_) => created += 1,
            Err(AppError::Conflict { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(created)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starter_packages_pass_their_own_checks() {
        for p in starter_packages() {
            p.check().unwrap();
        }
    }

    #[test]
    fn bad_package_values_name_their_field() {
        let mut p = starter_packages().remove(0);
        p.currency = "dollars".into();
        let err = p.check().unwrap_err();
        assert_eq!(err.field(), Some("currency"));
        let mut p = starter_packages().remove(0);
        p.memory_mib = 1;
        assert_eq!(p.check().unwrap_err().field(), Some("memory_mib"));
    }

    #[test]
    fn prices_and_sizes_display_for_people() {
        let p = create_display_sample();
        assert_eq!(p.price_display(), "19.05 USD");
        assert_eq!(p.compute_display(), "2 h 30 min");
        assert_eq!(p.memory_display(), "4 GiB");
    }

    fn create_display_sample() -> Package {
        Package {
            id: 1,
            name: "x".into(),
            description: String::new(),
            price_minor: 1905,
            currency: "USD".into(),
            compute_minutes: 150,
            max_concurrent_sessions: 1,
            cpu_cores: 1.0,
            memory_mib: 4096,
            storage_quota_mib: 100,
            validity_days: 30,
            retired: false,
        }
    }
}
