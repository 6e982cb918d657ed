//! The HTTP edge: routes, wire types, and the error → (status, code) mapping.
//!
//! The server binds its port before the model is loaded, so that orchestrators see a live process
//! answering 503 (with `Retry-After`) rather than refused connections during a load that can take
//! a while; [`AppState::set_ready`] flips it once the engine and pipeline exist and have served a
//! warm-up generation (see [`crate::lifecycle`]).

pub mod error;
pub mod extract;
pub mod health;
pub mod openapi;
pub mod types;

use std::sync::{Arc, OnceLock};

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;

use crate::lifecycle::{Lifecycle, Phase};
use crate::limits::{Admission, AdmissionConfig, KeyRing, Limits};
use crate::pipeline::Extractor;
use crate::telemetry::http::observe;
use crate::telemetry::Metrics;
use error::ApiError;

#[derive(Debug, Clone)]
pub struct HttpConfig {
    pub max_body_bytes: usize,
    /// Bound on reading a whole request body, from the handler's first read (then 408).
    pub body_read_timeout: std::time::Duration,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 1 << 20,
            body_read_timeout: std::time::Duration::from_secs(30),
        }
    }
}

/// What the server is made of besides the model, assembled at start (see `server::start`).
pub struct Parts {
    pub http: HttpConfig,
    pub keys: KeyRing,
    /// Each key's limits: per replica, or shared through Redis.
    pub limits: Limits,
    pub admission: AdmissionConfig,
    pub metrics: Arc<Metrics>,
    pub lifecycle: Arc<Lifecycle>,
}

#[derive(Clone)]
pub struct AppState {
    inner: Arc<StateInner>,
}

struct StateInner {
    extractor: OnceLock<Arc<Extractor>>,
    http: HttpConfig,
    keys: KeyRing,
    limits: Limits,
    admission: Arc<Admission>,
    metrics: Arc<Metrics>,
    lifecycle: Arc<Lifecycle>,
}

impl AppState {
    pub fn new(parts: Parts) -> Self {
        let admission = Arc::new(Admission::new(
            parts.admission,
            parts.metrics.admission_gauges(),
        ));
        Self {
            inner: Arc::new(StateInner {
                extractor: OnceLock::new(),
                http: parts.http,
                keys: parts.keys,
                limits: parts.limits,
                admission,
                metrics: parts.metrics,
                lifecycle: parts.lifecycle,
            }),
        }
    }

    /// The model is loaded and warmed up: start taking requests.
    pub fn set_ready(&self, extractor: Arc<Extractor>) {
        let _ = self.inner.extractor.set(extractor);
        self.inner.lifecycle.advance(Phase::Ready);
    }

    pub fn extractor(&self) -> Option<&Arc<Extractor>> {
        self.inner.extractor.get()
    }

    /// The extractor, or the 503 a client gets while the model loads or the server drains.
    pub fn ready_extractor(&self) -> Result<&Arc<Extractor>, ApiError> {
        let (reason, retry_after_secs) = match self.inner.lifecycle.phase() {
            Phase::Ready => match self.extractor() {
                // A dead engine answers nothing: red, so that no more traffic is sent (the
                // server exits for a restart, see `server`).
                Some(extractor) if extractor.engine().failure().is_some() => {
                    ("the inference engine stopped", 5)
                }
                Some(extractor) => return Ok(extractor),
                None => ("the model is still loading", 5),
            },
            Phase::Loading => ("the model is still loading", 5),
            Phase::WarmingUp => ("the model is warming up", 2),
            // Another replica can answer at once; this one will not come back.
            Phase::Draining => ("the server is shutting down", 1),
        };
        Err(ApiError::Unavailable {
            reason: reason.into(),
            retry_after_secs,
        })
    }

    pub fn http(&self) -> &HttpConfig {
        &self.inner.http
    }

    pub fn keys(&self) -> &KeyRing {
        &self.inner.keys
    }

    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    pub fn admission(&self) -> &Arc<Admission> {
        &self.inner.admission
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    pub fn lifecycle(&self) -> &Arc<Lifecycle> {
        &self.inner.lifecycle
    }
}

/// Where `/metrics` is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricsRoute {
    /// On the API port, next to the API.
    Included,
    /// On its own port (see [`metrics_router`]); not on the API port.
    Separate,
}

pub fn router(state: AppState, metrics: MetricsRoute) -> Router {
    let mut router = Router::new()
        .route("/extract/memory", post(extract::extract_memory))
        .route(
            "/api/openmem/v1/extract/memory",
            post(extract::extract_memory),
        )
        .route("/health", get(health::ready))
        .route("/health/live", get(health::live))
        .route("/health/ready", get(health::ready))
        .route("/openapi.json", get(openapi::spec));
    if metrics == MetricsRoute::Included {
        router = router.route("/metrics", get(metrics_text));
    }
    observed(router, state)
}

/// Only `/metrics`, for a separate, private port.
pub fn metrics_router(state: AppState) -> Router {
    observed(Router::new().route("/metrics", get(metrics_text)), state)
}

/// Unknown routes and methods get the envelope like every other answer (405 keeps `Allow`).
fn observed(router: Router<AppState>, state: AppState) -> Router {
    router
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .fallback(|| async { ApiError::NotFound })
        .layer(axum::middleware::from_fn_with_state(
            state.metrics().clone(),
            observe,
        ))
        .with_state(state)
}

#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses((status = 200, description = "Prometheus text exposition; on --metrics-port when one is set", body = String, content_type = "text/plain"))
)]
pub async fn metrics_text(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics().render(),
    )
}
