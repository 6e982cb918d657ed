//! Logging setup. `RUST_LOG` filters (default: info for memex, warn for the engine's crates,
//! which log every request at info).

use tracing_subscriber::EnvFilter;

pub fn init(json: bool) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,mistralrs_core=warn,mistralrs=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    // A second init (tests start several servers in one process) is not an error.
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
