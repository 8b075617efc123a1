use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use opencloud_control::billing::providers::Payments;
use opencloud_control::host_ca::HostCa;
use opencloud_control::snapshots::store::Store;
use opencloud_control::{accounts, db, packages, App, Config};

/// OpenCloud control service.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Config file (TOML); keys can be overridden with OPENCLOUD_CONTROL__SECTION__KEY.
    #[arg(
        long,
        short,
        default_value = "config/control.toml",
        env = "OPENCLOUD_CONTROL_CONFIG"
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Apply migrations, then serve (the default).
    Serve,
    /// Apply pending migrations and exit.
    Migrate,
    /// Create the admin (if missing) and the starter packages.
    Seed {
        #[arg(long, default_value = "admin@opencloud.local")]
        admin_email: String,
        /// The admin's password, read from the environment so it never shows
        /// in `ps`. Without it a new admin gets a generated one, printed once.
        #[arg(long, env = "OPENCLOUD_ADMIN_PASSWORD", hide_env_values = true)]
        admin_password: Option<String>,
        /// Set the password of an existing admin too.
        #[arg(long)]
        reset_password: bool,
    },
    /// Print a HostKey for the owner's host NAME (added if missing; a new
    /// key otherwise, which retires the old one). For scripts/up.
    HostKey {
        #[arg(long)]
        owner_email: String,
        #[arg(long)]
        name: String,
    },
    /// Print a new keys file with one random signing key.
    Keygen {
        #[arg(long, default_value = "k1")]
        key_id: String,
    },
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The whole chain on one line, without a backtrace: these are
            // messages for the operator (which file, which key, which migration).
            eprintln!("opencloud-control: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    opencloud_protocol::logs::init("info,mysql_async=warn");
    let cli = Cli::parse();
    if let Some(Command::Keygen { key_id }) = &cli.command {
        print!("{}", opencloud_protocol::Keyring::generate_toml(key_id));
        return Ok(());
    }
    let config = Config::load(&cli.config)?;
    let pool = db::pool(&config)?;
    let applied = db::migrate(&pool).await.context("migrations")?;
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            let host_ca = HostCa::open(&config.host_ca_dir, opencloud_control::now_unix())
                .context("host CA")?;
            let payments = Payments::from_policy(&config.billing, own_webhook_url(&config))
                .context("payments")?;
            let store = Store::open(&config.store.location).context("project store")?;
            let app = App::new(
                config,
                pool,
                host_ca,
                payments,
                store,
                opencloud_control::install_metrics()?,
            );
            opencloud_control::serve(app, shutdown_signal()).await
        }
        Command::Migrate => {
            println!(
                "schema up to date ({} migration(s) applied now)",
                applied.len()
            );
            Ok(())
        }
        Command::Seed {
            admin_email,
            admin_password,
            reset_password,
        } => {
            let passwords = accounts::Passwords::new(config.pbkdf2_iterations);
            let generated = admin_password.is_none();
            let password = admin_password.unwrap_or_else(opencloud_control::ids::random_id);
            let created =
                accounts::ensure_admin(&pool, &passwords, &admin_email, &password, reset_password)
                    .await
                    .map_err(|e| anyhow::anyhow!("admin: {e}"))?;
            let added = packages::seed(&pool)
                .await
                .map_err(|e| anyhow::anyhow!("packages: {e}"))?;
            match (created || reset_password, generated) {
                (true, true) => println!(
                    "admin {admin_email} created with password: {password}\n(shown only this once; set OPENCLOUD_ADMIN_PASSWORD and pass --reset-password to change it)"
                ),
                (true, false) => println!("admin {admin_email}: password set from OPENCLOUD_ADMIN_PASSWORD"),
                (false, _) => println!("admin {admin_email}: exists (password unchanged)"),
            }
            println!("starter packages added: {added}");
            Ok(())
        }
        Command::HostKey { owner_email, name } => {
            let key = opencloud_control::hosts::issue_key(&pool, &owner_email, &name)
                .await
                .map_err(|e| anyhow::anyhow!("host {name}: {e}"))?;
            println!("{key}");
            Ok(())
        }
        Command::Keygen { .. } => unreachable!("handled above"),
    }
}

/// Control's own webhook address, where the sandbox delivers: the public
/// listener on loopback when it listens on every address.
fn own_webhook_url(config: &Config) -> String {
    let mut addr = config.listen_public;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    format!("http://{addr}/api/v1/payments/webhooks/sandbox")
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    tracing::info!("shutting down");
}
