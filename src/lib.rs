//! memex: a self-hosted server that turns chat dialogue into structured memories.
//!
//! The request path is the module layout:
//! HTTP ([`api`]) → pipeline ([`pipeline`]: clean, language, branches, prompts, schemas, output)
//! → engine ([`engine`]: the model behind one trait) → response. [`server`] owns the process
//! lifecycle, [`config`] the command line, [`telemetry`] logging.

pub mod api;
pub mod config;
pub mod engine;
pub mod pipeline;
pub mod server;
pub mod telemetry;
pub mod tiny_model;
