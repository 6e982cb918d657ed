//! Observability: logging setup, the Prometheus metrics ([`metrics`]), per-request observation
//! and log lines ([`http`]), and the engine wrapper that counts engine errors ([`engine`]).
//!
//! `RUST_LOG` filters logs (default: info for memex, warn for the engine's crates, which log
//! every request at info).

pub mod engine;
pub mod http;
pub mod metrics;

use tracing_subscriber::EnvFilter;

pub use metrics::{Metrics, Rejection};

/// The server's logs: to stdout, where a container's logs are collected.
pub fn init(json: bool) {
    let filter = env_filter("info,mistralrs_core=warn,mistralrs=warn");
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    // A second init (tests start several servers in one process) is not an error.
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// The offline commands' logs: warnings only unless `RUST_LOG` says otherwise, so that their
/// progress and report are not buried, and to stderr, because their stdout may be the data
/// (`memex eval --json > report.json`, `memex extract -o -`).
pub fn init_offline() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(env_filter("warn"))
        .with_writer(std::io::stderr)
        .try_init();
}

fn env_filter(default: &str) -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default))
}
