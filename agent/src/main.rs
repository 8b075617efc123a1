use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use opencloud_agent::Config;

/// OpenCloud agent: runs Jupyter servers on this host for control.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Config file (TOML); keys can be overridden with OPENCLOUD_AGENT__SECTION__KEY.
    #[arg(long = "config", env = "OPENCLOUD_AGENT_CONFIG")]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Stop every Jupyter server this agent's work dir records, then exit
    /// (the agent itself must not be running).
    StopAll,
}

fn main() -> ExitCode {
    opencloud_protocol::logs::init("info");
    let cli = Cli::parse();
    let config = match Config::load(&cli.config) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("opencloud-agent: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("opencloud-agent: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async {
        match cli.command {
            None => opencloud_agent::run(config, shutdown_signal()).await,
            Some(Cmd::StopAll) => opencloud_agent::stop_all(config).await.map(|count| {
                println!("stopped {count} Jupyter server(s)");
            }),
        }
    });
    // Servers left running belong to no task of ours; don't wait for tasks.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("opencloud-agent: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let terminate = async {
        match signal(SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = terminate => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
