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

pub fn init(json: bool) {
    init_with(json, "info,mistralrs_core=warn,mistralrs=warn");
}

/// Logging with another filter when `RUST_LOG` is unset: the offline commands log warnings only,
/// so that their progress and report are not buried.
pub fn init_with(json: bool, default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    // A second init (tests start several servers in one process) is not an error.
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
