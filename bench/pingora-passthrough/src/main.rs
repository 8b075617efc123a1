//! The baseline for `bench/proxy`: a Pingora `ProxyHttp` that does nothing
//! but forward every request to one upstream, on one worker thread, so the
//! gateway's own cost shows as the difference to this.
//!
//! `pingora-passthrough LISTEN UPSTREAM STATE_DIR`, e.g.
//! `pingora-passthrough 127.0.0.1:9001 127.0.0.1:9000 /tmp/pp`.

use async_trait::async_trait;
use pingora::prelude::*;
use pingora::server::configuration::{Opt, ServerConf};

// The same allocator and runtime settings as the gateway, so the difference
// between the two is only the gateway's own work.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Passthrough {
    upstream: std::net::SocketAddr,
}

#[async_trait]
impl ProxyHttp for Passthrough {
    type CTX = ();

    fn new_ctx(&self) -> Self::CTX {}

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut Self::CTX,
    ) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(self.upstream, false, String::new())))
    }
}

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, upstream, state_dir] = args.as_slice() else {
        eprintln!("usage: pingora-passthrough LISTEN UPSTREAM STATE_DIR");
        return std::process::ExitCode::from(2);
    };
    let conf = ServerConf {
        threads: 1,
        work_stealing: false,
        pid_file: format!("{state_dir}/pingora.pid"),
        upgrade_sock: format!("{state_dir}/pingora-upgrade.sock"),
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(Opt::default(), conf);
    server.bootstrap();
    let mut proxy = http_proxy_service(
        &server.configuration,
        Passthrough {
            upstream: match upstream.parse() {
                Ok(address) => address,
                Err(e) => {
                    eprintln!("UPSTREAM {upstream}: {e}");
                    return std::process::ExitCode::from(2);
                }
            },
        },
    );
    proxy.add_tcp(listen);
    server.add_service(proxy);
    server.run_forever()
}
