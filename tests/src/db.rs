//! A fresh MariaDB database per test, dropped with the test.

use anyhow::Context;
use mysql_async::prelude::*;

use crate::machine::unique;

/// The MariaDB server tests use; override with `OPENCLOUD_TEST_MYSQL`.
pub fn mysql_server_url() -> String {
    std::env::var("OPENCLOUD_TEST_MYSQL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".into())
}

/// A fresh database, dropped when this value is dropped.
pub struct TestDatabase {
    pub name: String,
    pub url: String,
    pool: mysql_async::Pool,
}

impl TestDatabase {
    pub async fn create() -> anyhow::Result<Self> {
        let server = mysql_server_url();
        let name = unique("oc_e2e_");
        let admin = mysql_async::Pool::new(server.as_str());
        let mut conn = admin
            .get_conn()
            .await
            .with_context(|| format!("cannot reach MariaDB at {server}; is it running?"))?;
        conn.query_drop(format!(
            "CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"
        ))
        .await?;
        drop(conn);
        admin.disconnect().await?;
        let url = format!("{server}/{name}");
        // mysql_async's default pool grows to 100 connections: a test firing
        // hundreds of queries at once, beside another such test, used up
        // MariaDB's 151 and control, not the test, got "too many connections".
        let opts = mysql_async::OptsBuilder::from_opts(mysql_async::Opts::from_url(&url)?)
            .pool_opts(
                mysql_async::PoolOpts::default()
                    .with_constraints(mysql_async::PoolConstraints::new(1, 8).expect("1 ≤ 8")),
            );
        let pool = mysql_async::Pool::new(opts);
        Ok(Self { name, url, pool })
    }

    pub async fn conn(&self) -> mysql_async::Conn {
        self.pool
            .get_conn()
            .await
            .expect("connection to the test database")
    }

    /// `SELECT COUNT(*) FROM table [WHERE …]`.
    pub async fn count(&self, table_and_filter: &str) -> u64 {
        self.conn()
            .await
            .query_first(format!("SELECT COUNT(*) FROM {table_and_filter}"))
            .await
            .expect("count query")
            .unwrap_or(0)
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let server = mysql_server_url();
        let name = self.name.clone();
        // Drop runs outside async context; a short-lived runtime does the SQL.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                let pool = mysql_async::Pool::new(server.as_str());
                let mut conn = pool.get_conn().await.ok()?;
                conn.query_drop(format!("DROP DATABASE IF EXISTS `{name}`"))
                    .await
                    .ok()?;
                drop(conn);
                pool.disconnect().await.ok()
            })
        })
        .join();
    }
}
