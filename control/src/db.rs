//! The database: one `mysql_async` pool, migrations, and lease rows.
//!
//! Migrations and background jobs are serialised with a row in `leases`
//! rather than `GET_LOCK`, because named locks are not replicated by Galera
//! and so would not hold across a cluster.

use std::time::Duration;

use include_dir::{include_dir, Dir};
use mysql_async::prelude::*;
use mysql_async::{Conn, Opts, OptsBuilder, Pool, PoolConstraints, PoolOpts};
use sha2::{Digest, Sha256};

use crate::config::Config;

static MIGRATIONS: Dir<'_> = include_dir!("$CARGO_MANIFEST_DIR/../migrations");

/// How long a lease is held without renewal before another holder may take it.
const LEASE_SECONDS: u64 = 60;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database: {0}")]
    Mysql(#[from] mysql_async::Error),
    #[error("migration {file} failed: {message}")]
    Migration { file: String, message: String },
    #[error("{0}")]
    Other(String),
}

/// Builds the pool. Every connection runs in UTC so stored times are UTC.
pub fn pool(config: &Config) -> Result<Pool, DbError> {
    let opts = Opts::from_url(&config.database_url)
        .map_err(|e| DbError::Other(format!("database.url: {e}")))?;
    let constraints = PoolConstraints::new(config.pool_min, config.pool_max)
        .ok_or_else(|| DbError::Other("database pool_min must not exceed pool_max".into()))?;
    let builder = OptsBuilder::from_opts(opts)
        .init(vec!["SET time_zone = '+00:00'"])
        .pool_opts(PoolOpts::default().with_constraints(constraints))
        .wait_timeout(Some(28_800));
    Ok(Pool::new(builder))
}

/// One migration file: `NNNN_name.sql` holding exactly one statement.
#[derive(Debug, Clone)]
pub struct Migration {
    pub version: u32,
    pub name: String,
    pub sql: String,
    pub checksum: String,
}

/// The embedded migrations in version order, checked for shape.
pub fn migrations() -> Result<Vec<Migration>, DbError> {
    let mut list = Vec::new();
    for file in MIGRATIONS.files() {
        let name = file.path().display().to_string();
        if !name.ends_with(".sql") {
            continue;
        }
        let bad = |message: &str| DbError::Migration {
            file: name.clone(),
            message: message.to_owned(),
        };
        let version: u32 = name
            .split('_')
            .next()
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| bad("the name must start with a number, like 0007_add_x.sql"))?;
        let sql = file
            .contents_utf8()
            .ok_or_else(|| bad("is not UTF-8"))?
            .trim()
            .trim_end_matches(';')
            .to_owned();
        if statement_count(&sql) != 1 {
            return Err(bad(
                "must hold exactly one statement (MySQL commits DDL at once, so a file with several could half-apply)",
            ));
        }
        let checksum = format!("{:x}", Sha256::digest(sql.as_bytes()));
        list.push(Migration {
            version,
            name: name.clone(),
            sql,
            checksum,
        });
    }
    list.sort_by_key(|m| m.version);
    if let Some(pair) = list.windows(2).find(|w| w[0].version == w[1].version) {
        return Err(DbError::Migration {
            file: pair[1].name.clone(),
            message: format!("has the same number as {}", pair[0].name),
        });
    }
    Ok(list)
}

/// Counts `;`-separated statements outside quotes and `--` comments.
fn statement_count(sql: &str) -> usize {
    let mut count = 0;
    let mut has_text = false;
    let mut quote: Option<char> = None;
    for line in sql.lines() {
        let mut chars = line.chars().peekable();
        while let Some(c) = chars.next() {
            match quote {
                Some(q) if c == q => quote = None,
                Some(_) => {}
                None if c == '-' && chars.peek() == Some(&'-') => break,
                None if c == '\'' || c == '"' || c == '`' => {
                    quote = Some(c);
                    has_text = true;
                }
                None if c == ';' => {
                    if has_text {
                        count += 1;
                    }
                    has_text = false;
                }
                None if !c.is_whitespace() => has_text = true,
                None => {}
            }
        }
    }
    count + usize::from(has_text)
}

/// Applies the migrations not yet applied, holding the `migrations` lease.
/// Safe when several replicas start at once: one applies, the others wait
/// for the lease and then find nothing left to do.
pub async fn migrate(pool: &Pool) -> Result<Vec<String>, DbError> {
    let all = migrations()?;
    let mut conn = pool.get_conn().await?;
    // The two bookkeeping tables cannot themselves be migrations: the lease
    // must exist before the first migration runs.
    conn.query_drop(
        "CREATE TABLE IF NOT EXISTS leases (
            name VARCHAR(64) CHARACTER SET ascii NOT NULL PRIMARY KEY,
            holder VARCHAR(64) CHARACTER SET ascii NOT NULL,
            expires_at DATETIME(6) NOT NULL
        ) ENGINE = InnoDB",
    )
    .await?;
    conn.query_drop(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
            version INT UNSIGNED NOT NULL PRIMARY KEY,
            name VARCHAR(255) NOT NULL,
            checksum CHAR(64) CHARACTER SET ascii NOT NULL,
            applied_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6)
        ) ENGINE = InnoDB",
    )
    .await?;

    let lease = Lease::acquire(&mut conn, "migrations", Duration::from_secs(120)).await?;
    let result = apply_pending(&mut conn, &all).await;
    lease.release(&mut conn).await?;
    result
}

async fn apply_pending(conn: &mut Conn, all: &[Migration]) -> Result<Vec<String>, DbError> {
    let applied: Vec<(u32, String, String)> = conn
        .query("SELECT version, name, checksum FROM schema_migrations ORDER BY version")
        .await?;
    for (version, name, checksum) in &applied {
        match all.iter().find(|m| m.version == *version) {
            Some(m) if m.checksum != *checksum => {
                return Err(DbError::Migration {
                    file: m.name.clone(),
                    message: "was changed after it was applied; add a new migration instead".into(),
                })
            }
            Some(_) => {}
            None => {
                return Err(DbError::Migration {
                    file: name.clone(),
                    message: format!(
                        "version {version} is applied in the database but unknown to this binary (is an older binary starting against a newer database?)"
                    ),
                })
            }
        }
    }
    let mut done = Vec::new();
    for m in all
        .iter()
        .filter(|m| !applied.iter().any(|a| a.0 == m.version))
    {
        conn.query_drop(&m.sql)
            .await
            .map_err(|e| DbError::Migration {
                file: m.name.clone(),
                message: mysql_message(&e),
            })?;
        conn.exec_drop(
            "INSERT INTO schema_migrations (version, name, checksum) VALUES (?, ?, ?)",
            (m.version, &m.name, &m.checksum),
        )
        .await?;
        tracing::info!(migration = %m.name, "applied");
        done.push(m.name.clone());
    }
    Ok(done)
}

/// MySQL's own words for an error, without Rust's wrapping.
pub fn mysql_message(e: &mysql_async::Error) -> String {
    match e {
        mysql_async::Error::Server(server) => {
            format!("{} (MySQL error {})", server.message, server.code)
        }
        other => other.to_string(),
    }
}

/// A column value as `T`; one of an unexpected type reads as the default
/// (and is logged) instead of panicking in a request.
pub fn lenient<T: mysql_async::prelude::FromValue + Default>(value: mysql_async::Value) -> T {
    mysql_async::from_value_opt(value).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "unexpected column type");
        T::default()
    })
}

/// A held row in `leases`.
pub struct Lease {
    name: String,
    holder: String,
}

impl Lease {
    /// Takes the lease, waiting up to `wait` for the current holder to
    /// release it or let it expire.
    pub async fn acquire(conn: &mut Conn, name: &str, wait: Duration) -> Result<Self, DbError> {
        let holder = crate::ids::random_id();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if Self::try_take(conn, name, &holder).await? {
                return Ok(Self {
                    name: name.to_owned(),
                    holder,
                });
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(DbError::Other(format!(
                    "lease `{name}` is held by another process; gave up after {}s",
                    wait.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn try_take(conn: &mut Conn, name: &str, holder: &str) -> Result<bool, DbError> {
        // MySQL evaluates ON DUPLICATE KEY assignments left to right, so
        // `expires_at` sees the `holder` just decided.
        conn.exec_drop(
            "INSERT INTO leases (name, holder, expires_at)
             VALUES (?, ?, NOW(6) + INTERVAL ? SECOND)
             ON DUPLICATE KEY UPDATE
               holder = IF(expires_at < NOW(6) OR holder = VALUES(holder), VALUES(holder), holder),
               expires_at = IF(holder = VALUES(holder), VALUES(expires_at), expires_at)",
            (name, holder, LEASE_SECONDS),
        )
        .await?;
        let current: Option<String> = conn
            .exec_first("SELECT holder FROM leases WHERE name = ?", (name,))
            .await?;
        Ok(current.as_deref() == Some(holder))
    }

    pub async fn release(self, conn: &mut Conn) -> Result<(), DbError> {
        conn.exec_drop(
            "DELETE FROM leases WHERE name = ? AND holder = ?",
            (&self.name, &self.holder),
        )
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_migrations_are_one_statement_each_and_numbered_uniquely() {
        let list = migrations().unwrap();
        assert!(list.len() >= 5);
        assert!(list.windows(2).all(|w| w[0].version < w[1].version));
    }

    #[test]
    fn statements_are_counted_outside_quotes_and_comments() {
        assert_eq!(statement_count("CREATE TABLE a (x INT)"), 1);
        assert_eq!(statement_count("CREATE TABLE a (x INT);"), 1);
        assert_eq!(
            statement_count("-- a; b;\nCREATE TABLE a (x VARCHAR(3) DEFAULT ';')"),
            1
        );
        assert_eq!(statement_count("CREATE TABLE a (x INT); DROP TABLE b"), 2);
    }
}
