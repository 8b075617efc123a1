//! How every OpenCloud process logs: on stderr (stdout carries what a
//! subcommand answers), filtered by `RUST_LOG`, and without colour codes
//! unless stderr is a terminal, so log files read as plain text.

/// Installs the global subscriber; `default_filter` applies when
/// `RUST_LOG` is unset or unparsable.
pub fn init(default_filter: &str) {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_filter.into()),
        )
        .init();
}
