use std::path::PathBuf;

use clap::Parser;
use opencloud_gateway::{build_server, Config};

// The proxy allocates per request; mimalloc is markedly faster than the
// system allocator for that pattern.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// OpenCloud gateway.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Config file (TOML); keys can be overridden with OPENCLOUD_GATEWAY__SECTION__KEY.
    #[arg(
        long = "config",
        default_value = "config/gateway.toml",
        env = "OPENCLOUD_GATEWAY_CONFIG"
    )]
    config: PathBuf,
    /// Take over the listeners of a running gateway (zero-downtime upgrade).
    #[arg(long)]
    upgrade: bool,
}

fn main() -> std::process::ExitCode {
    opencloud_protocol::logs::init("info,pingora_core=warn,pingora_proxy=warn");
    let cli = Cli::parse();
    let config = match Config::load(&cli.config) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("opencloud-gateway: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let opt = pingora::server::configuration::Opt {
        upgrade: cli.upgrade,
        ..Default::default()
    };
    match build_server(config, opt) {
        Ok(server) => server.run_forever(),
        Err(e) => {
            eprintln!("opencloud-gateway: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
