//! memex: a self-hosted server that turns chat dialogue into structured memories.
//!
//! The request path is the module layout:
//! HTTP ([`api`]) → admission ([`limits`]: keys, rate limits, a bounded queue) → pipeline
//! ([`pipeline`]: clean, language, branches, prompts, schemas, output) → engine ([`engine`]: the model behind one trait) → response. [`connections`] accepts and bounds
//! connections, [`server`] starts and stops the
//! process through the phases of [`lifecycle`], [`config`] is the command line, [`telemetry`]
//! logging and metrics.

pub mod api;
pub mod batch;
pub mod config;
pub mod connections;
pub mod engine;
pub mod eval;
pub mod lifecycle;
pub mod limits;
pub mod pipeline;
pub mod server;
pub mod telemetry;
/// Where the tests find the real model files `scripts/fetch-models.sh` fetches (unit and
/// integration tests alike).
#[doc(hidden)]
pub mod test_files;
/// A real `redis-server` for the tests of the shared limits (unit and integration tests alike).
#[doc(hidden)]
pub mod test_redis;
pub mod tiny_model;
