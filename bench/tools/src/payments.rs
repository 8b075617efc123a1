//! bench/payments against a running control with the sandbox provider:
//! customers buy through the API and each purchase is paid with the signed
//! `checkout.session.completed` webhook the sandbox itself would post
//! (`opencloud_e2e::payments`, as the Stripe tests pay). Prints `KEY=value`
//! lines for the script.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use futures_util::{stream, StreamExt};
use mysql_async::prelude::*;
use opencloud_control::billing::money::MICRO_PER_MINOR;
use opencloud_e2e::payments::{balance, place_order, PlacedOrder, Webhook};
use opencloud_e2e::{fresh_loopback, TestUser};
use reqwest::StatusCode;
use serde_json::Value;

use crate::session::{sign_up, PASSWORD};
use crate::stats::nearest_rank;

/// What the script asks for.
#[derive(clap::Args)]
pub struct Options {
    /// Control's public listener, `http://127.0.0.1:PORT`.
    #[arg(long)]
    pub control: String,
    /// Control's database: the sandbox's checkout references and the
    /// ledger check at the end.
    #[arg(long)]
    pub db_url: String,
    /// The sandbox's webhook secret (`payments-webhook.secret` in control's
    /// keys dir), read here so it is on no command line.
    #[arg(long)]
    pub secret_file: std::path::PathBuf,
    #[arg(long, default_value_t = 50)]
    pub users: usize,
    /// Orders paid one after another for the webhook → balance latency.
    #[arg(long, default_value_t = 200)]
    pub latency_orders: usize,
    /// Purchases spread over all users, all users at once.
    #[arg(long, default_value_t = 1000)]
    pub purchases: usize,
}

/// Everything a purchase needs, shared by every user's task.
struct Shop {
    control: String,
    secret: String,
    package_id: u64,
    pool: mysql_async::Pool,
    http: reqwest::Client,
}

impl Shop {
    /// The sandbox's checkout reference is in no answer the buyer gets
    /// (the sandbox's page is control's own): the database has it.
    async fn checkout_ref(&self, order: &PlacedOrder) -> anyhow::Result<String> {
        let found: Option<String> = self
            .pool
            .get_conn()
            .await?
            .exec_first("SELECT checkout_ref FROM orders WHERE id = ?", (order.id,))
            .await?;
        found.context("the order has no checkout reference")
    }

    /// Places an order for `user` and signs its paid webhook.
    async fn ordered(&self, user: &TestUser) -> anyhow::Result<(PlacedOrder, Webhook)> {
        let order = place_order(user, self.package_id).await;
        let checkout_ref = self.checkout_ref(&order).await?;
        let payment = format!("pi_bench_{}", order.id);
        let webhook = Webhook::paid(&self.secret, &order, &checkout_ref, &payment);
        Ok((order, webhook))
    }

    async fn deliver(&self, webhook: &Webhook) -> anyhow::Result<()> {
        let (status, body) = webhook.post(&self.http, &self.control, "sandbox").await;
        ensure!(
            status == StatusCode::OK && body["outcome"] == "credited",
            "webhook: {status} {body}"
        );
        Ok(())
    }
}

fn micros(elapsed: Duration) -> u32 {
    elapsed.as_micros().min(u128::from(u32::MAX)) as u32
}

/// `p50 p95 max` of `samples` (µs) in milliseconds.
fn spread_ms(mut samples: Vec<u32>) -> String {
    samples.sort_unstable();
    let ms = |us: u32| format!("{:.2}", f64::from(us) / 1000.0);
    format!(
        "{} {} {}",
        ms(nearest_rank(&samples, 0.50)),
        ms(nearest_rank(&samples, 0.95)),
        ms(nearest_rank(&samples, 1.0))
    )
}

pub async fn run(options: Options) -> anyhow::Result<()> {
    let secret =
        opencloud_protocol::config::read_private_file("the webhook secret", &options.secret_file)?
            .trim()
            .to_owned();
    let http = reqwest::Client::new();
    let packages: Value = http
        .get(format!("{}/api/v1/packages", options.control))
        .send()
        .await?
        .json()
        .await?;
    let package_id = packages["packages"][0]["id"]
        .as_u64()
        .context("no package to buy: run `opencloud-control seed` first")?;
    let shop = Shop {
        control: options.control.clone(),
        secret,
        package_id,
        pool: mysql_async::Pool::new(options.db_url.as_str()),
        http: http.clone(),
    };

    // Each customer registers from an address of their own, as people do
    // (control limits registrations per address).
    let started = Instant::now();
    let users: Vec<TestUser> = stream::iter(0..options.users)
        .map(|n| sign_up_customer(&options.control, n))
        .buffer_unordered(4)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()?;
    eprintln!(
        "{} customers registered in {:.1} s",
        users.len(),
        started.elapsed().as_secs_f64()
    );

    // (1) Webhook → balance visible, one order at a time.
    let buyer = &users[0];
    let mut latencies = Vec::with_capacity(options.latency_orders);
    for _ in 0..options.latency_orders {
        let expected = balance(buyer).await;
        let (order, webhook) = shop.ordered(buyer).await?;
        let expected = expected + order.compute_seconds;
        let sent = Instant::now();
        shop.deliver(&webhook).await?;
        while balance(buyer).await < expected {
            if sent.elapsed() > Duration::from_secs(10) {
                bail!("order {}'s time never showed", order.id);
            }
        }
        latencies.push(micros(sent.elapsed()));
    }
    println!("LATENCY_MS={}", spread_ms(latencies));

    // (2) Purchases (order, then its webhook) by every user at once.
    let per_user = options.purchases.div_ceil(options.users);
    let started = Instant::now();
    let results = futures_util::future::join_all(users.iter().enumerate().map(|(n, user)| {
        let shop = &shop;
        let count = per_user.min(options.purchases.saturating_sub(n * per_user));
        async move {
            let mut samples = Vec::with_capacity(count);
            for _ in 0..count {
                let began = Instant::now();
                let (_, webhook) = shop.ordered(user).await?;
                shop.deliver(&webhook).await?;
                samples.push(micros(began.elapsed()));
            }
            anyhow::Ok(samples)
        }
    }))
    .await;
    let elapsed = started.elapsed().as_secs_f64();
    let mut samples = Vec::with_capacity(options.purchases);
    for result in results {
        samples.extend(result?);
    }
    println!(
        "PURCHASES={} SECONDS={elapsed:.2} PER_SECOND={:.0}",
        samples.len(),
        samples.len() as f64 / elapsed
    );
    println!("PURCHASE_MS={}", spread_ms(samples));

    let paid = options.latency_orders + options.purchases;
    let verdict = ledger_check(&shop.pool, paid as u64).await?;
    println!("LEDGER={verdict}");
    shop.pool.disconnect().await?;
    Ok(())
}

async fn sign_up_customer(control: &str, n: usize) -> anyhow::Result<TestUser> {
    let email = format!("buyer-{n}-{}@bench.example", std::process::id());
    let from = reqwest::Client::builder()
        .local_address(fresh_loopback())
        .build()?;
    let (id, token) = sign_up(&from, control, &email).await?;
    Ok(TestUser {
        id,
        email,
        password: PASSWORD.into(),
        token,
        http: reqwest::Client::new(),
        base: control.to_owned(),
    })
}

/// `OK` when the purchase entries add up to the paid orders (count,
/// seconds, money) and every lot's cached seconds equal its entries
/// (`ledger::drift`); otherwise `DRIFT` and what differs.
async fn ledger_check(pool: &mysql_async::Pool, paid_expected: u64) -> anyhow::Result<String> {
    let mut conn = pool.get_conn().await?;
    let sums = "CAST(COUNT(*) AS SIGNED), CAST(COALESCE(SUM(compute_seconds), 0) AS SIGNED), \
                CAST(COALESCE(SUM(amount_minor), 0) AS SIGNED)";
    let orders: (i64, i64, i64) = conn
        .query_first(format!("SELECT {sums} FROM orders WHERE status = 'paid'"))
        .await?
        .unwrap_or_default();
    let entries: (i64, i64, i64) = conn
        .query_first(
            "SELECT CAST(COUNT(*) AS SIGNED), CAST(COALESCE(SUM(seconds), 0) AS SIGNED),
                    CAST(COALESCE(SUM(amount_micro), 0) AS SIGNED)
             FROM ledger_entries WHERE kind = 'purchase'",
        )
        .await?
        .unwrap_or_default();
    drop(conn);
    let drift = opencloud_control::billing::ledger::drift(pool).await?;
    let mut problems = Vec::new();
    if orders.0 != paid_expected as i64 {
        problems.push(format!("{} paid orders, {paid_expected} paid", orders.0));
    }
    if (entries.0, entries.1, entries.2) != (orders.0, orders.1, orders.2 * MICRO_PER_MINOR) {
        problems.push(format!(
            "purchase entries (count, seconds, micro) {entries:?} against paid orders {:?}",
            (orders.0, orders.1, orders.2 * MICRO_PER_MINOR)
        ));
    }
    if drift.lots > 0 {
        problems.push(format!(
            "{} lots' seconds_left differ from their entries by {} s",
            drift.lots, drift.seconds
        ));
    }
    Ok(if problems.is_empty() {
        format!(
            "OK ({} paid orders = {} purchase entries, {} s; every lot's seconds_left = its entries)",
            orders.0, entries.0, entries.1
        )
    } else {
        format!("DRIFT: {}", problems.join("; "))
    })
}
