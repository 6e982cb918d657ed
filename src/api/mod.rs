//! The HTTP edge: routes, wire types, and the error → (status, code) mapping.
//!
//! The server binds its port before the model is loaded, so that orchestrators see a live process
//! answering 503 (with `Retry-After`) rather than refused connections during a load that can take
//! a while; [`AppState::set_ready`] flips it once the engine and pipeline exist.

pub mod error;
pub mod extract;
pub mod health;
pub mod types;

use std::sync::{Arc, OnceLock};

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;

use crate::pipeline::Extractor;
use error::ApiError;

#[derive(Debug, Clone)]
pub struct HttpConfig {
    pub max_body_bytes: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 1 << 20,
        }
    }
}

#[derive(Clone)]
pub struct AppState {
    inner: Arc<StateInner>,
}

struct StateInner {
    extractor: OnceLock<Arc<Extractor>>,
    http: HttpConfig,
}

impl AppState {
    pub fn new(http: HttpConfig) -> Self {
        Self {
            inner: Arc::new(StateInner {
                extractor: OnceLock::new(),
                http,
            }),
        }
    }

    pub fn set_ready(&self, extractor: Arc<Extractor>) {
        let _ = self.inner.extractor.set(extractor);
    }

    pub fn extractor(&self) -> Option<&Arc<Extractor>> {
        self.inner.extractor.get()
    }

    /// The extractor, or the 503 a client gets while the model loads.
    pub fn ready_extractor(&self) -> Result<&Arc<Extractor>, ApiError> {
        self.extractor().ok_or_else(|| ApiError::Unavailable {
            reason: "the model is still loading".into(),
            retry_after_secs: 5,
        })
    }

    pub fn http(&self) -> &HttpConfig {
        &self.inner.http
    }
}

pub fn router(state: AppState) -> Router {
    let limit = state.http().max_body_bytes;
    Router::new()
        .route("/extract/memory", post(extract::extract_memory))
        .route(
            "/api/openmem/v1/extract/memory",
            post(extract::extract_memory),
        )
        .route("/health", get(health::health))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}
