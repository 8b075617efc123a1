//! `oc-bench`: the Rust side of the scripts in `bench/`. Each subcommand does
//! one thing and prints `KEY=value` lines (or a result line) for the script.

mod payments;
mod routes;
mod session;
mod stats;
mod ws;

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Benchmark helpers for bench/*")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Through a running gateway and control: register a user, create a
    /// project, register a session at 127.0.0.1:UPSTREAM_PORT on a stand-in
    /// host whose link runs in this process, enter it. Prints SID=, HOST=,
    /// LINK= and COOKIE= lines (COOKIE last), then serves the link until
    /// ended (SIGTERM).
    Session {
        /// Control's database (for `external::register_external`).
        #[arg(long)]
        db_url: String,
        /// The gateway's public listener.
        #[arg(long)]
        gateway: SocketAddr,
        #[arg(long)]
        upstream_port: u16,
        /// HTTP (GET / answers 200) or websocket (only upgrades are answered).
        #[arg(long, default_value = "http")]
        upstream_kind: String,
        /// Control's host CA (the directory of its keys file), which issues
        /// the stand-in host's link certificate.
        #[arg(long)]
        ca_dir: PathBuf,
        /// The gateway is on https with a certificate from this CA (PEM).
        #[arg(long)]
        tls_ca: Option<PathBuf>,
    },
    /// Prints a new keys file (the format control and the gateway share).
    Keygen,
    /// Customers buying from a running control with the sandbox provider,
    /// each purchase paid with a signed webhook: webhook → balance latency,
    /// purchases/s with every customer at once, then the ledger checked.
    /// Prints LATENCY_MS=, PURCHASES=, PURCHASE_MS= and LEDGER= lines.
    Payments(payments::Options),
    /// Signs a ticket for SID and USER with KEYS, enters the session through
    /// the gateway's `/_oc/enter` and prints COOKIE=.
    Enter {
        #[arg(long)]
        gateway: SocketAddr,
        /// `{sid}.{session_domain}`, the Host header.
        #[arg(long)]
        host: String,
        #[arg(long)]
        keys: PathBuf,
        #[arg(long)]
        sid: String,
        #[arg(long)]
        user: u64,
    },
    /// A WebSocket echo server.
    WsEcho {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// N connections, each sending a message and waiting for its echo, for
    /// a fixed time. Prints `msgs_per_s p50_us p99_us errors`.
    WsLoad(ws::LoadOptions),
    /// The route table in this process: memory, load time, delta apply time,
    /// snapshot (compaction) time. Prints a small report.
    Table {
        #[arg(long, default_value_t = 1_000_000)]
        sessions: usize,
        #[arg(long, default_value_t = 100_000)]
        hosts: u64,
        #[arg(long, default_value_t = 20_000)]
        deltas: usize,
    },
    /// Writes `routes.snapshot.json` with SESSIONS sessions into DIR; the
    /// first one, owned by OWNER, is on host 1, whose link is at
    /// 127.0.0.1:LINK_PORT with the certificate pinned in LINK_PIN_FILE
    /// (`oc-bench link`). Prints SID= and VERSION=.
    Snapshot {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = 1_000_000)]
        sessions: usize,
        /// Hosts: host 1 is 127.0.0.1 (the link, whose /healthz answers),
        /// the others 127.x.y.z with nothing on their link port.
        #[arg(long, default_value_t = 100_000)]
        hosts: u64,
        #[arg(long)]
        link_port: u16,
        #[arg(long)]
        link_pin_file: PathBuf,
        #[arg(long, default_value_t = 1)]
        owner: u64,
    },
    /// A host link (the agent's own link code) for host HOST_ID with a
    /// certificate from the host CA in CA_DIR (made there if missing),
    /// splicing every session to UPSTREAM; writes the certificate's pin to
    /// PIN_FILE, then serves until ended.
    Link {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        upstream: SocketAddr,
        #[arg(long, default_value_t = 1)]
        host_id: u64,
        #[arg(long)]
        ca_dir: PathBuf,
        #[arg(long)]
        pin_file: PathBuf,
    },
    /// A stand-in for control's internal API: `GET /internal/v1/routes/watch`
    /// as NDJSON deltas at a rate set with `GET /bench/rate?value=N`
    /// (deltas/s; 0 at start), heartbeats every 2 s; the gateway's link
    /// client certificate from the host CA in CA_DIR. `GET /bench/stats`
    /// prints the last version sent.
    FakeWatch {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        ca_dir: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Session {
            db_url,
            gateway,
            upstream_port,
            upstream_kind,
            ca_dir,
            tls_ca,
        } => runtime.block_on(session::session(
            &db_url,
            gateway,
            upstream_port,
            upstream_kind == "websocket",
            &ca_dir,
            tls_ca.as_deref(),
        )),
        Command::Keygen => {
            print!("{}", opencloud_protocol::Keyring::generate_toml("bench"));
            Ok(())
        }
        Command::Enter {
            gateway,
            host,
            keys,
            sid,
            user,
        } => runtime.block_on(async {
            let keys_text = std::fs::read_to_string(&keys)?;
            let keys =
                opencloud_protocol::Keyring::from_toml(&keys.display().to_string(), &keys_text)?;
            let cookie =
                session::enter_with_signed_ticket(gateway, &host, &keys, user, "bench-login", &sid)
                    .await?;
            println!("COOKIE={cookie}");
            Ok(())
        }),
        Command::Payments(options) => runtime.block_on(payments::run(options)),
        Command::WsEcho { listen } => runtime.block_on(ws::echo(listen)),
        Command::WsLoad(options) => runtime.block_on(ws::load(options)),
        Command::Table {
            sessions,
            hosts,
            deltas,
        } => routes::table(sessions, hosts, deltas),
        Command::Snapshot {
            dir,
            sessions,
            hosts,
            link_port,
            link_pin_file,
            owner,
        } => {
            let link = routes::Link {
                port: link_port,
                pinned: routes::read_link_pin(&link_pin_file)?,
            };
            routes::write_snapshot(&dir, sessions, hosts, &link, owner)
        }
        Command::Link {
            listen,
            upstream,
            host_id,
            ca_dir,
            pin_file,
        } => runtime.block_on(routes::link(listen, upstream, host_id, &ca_dir, &pin_file)),
        Command::FakeWatch { listen, ca_dir } => {
            runtime.block_on(routes::fake_watch(listen, &ca_dir))
        }
    }
}
