//! Probes. `/health/live`: the process is up and serving HTTP (200 from the moment the port is
//! bound). `/health/ready` (and `/health`, its older name): 200 with the served model once it is
//! loaded and warmed up; 503 (same envelope, `Retry-After`) before that and while draining.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use crate::api::types::Envelope;
use crate::api::AppState;

#[derive(Debug, Serialize, ToSchema)]
pub struct HealthData {
    /// Always `ready`.
    pub status: &'static str,
    /// Name the model is served under.
    pub model: String,
    pub max_sequence_len: Option<usize>,
    pub model_load_seconds: f64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct LiveData {
    /// Always `live`.
    pub status: &'static str,
    /// `loading`, `warming_up`, `ready` or `draining`.
    pub phase: &'static str,
}

#[utoipa::path(
    get,
    path = "/health/live",
    tag = "operations",
    responses((status = 200, description = "The process is up", body = crate::api::openapi::LiveResponse))
)]
pub async fn live(State(state): State<AppState>) -> Response {
    Json(Envelope {
        code: 0,
        message: "ok".into(),
        data: Some(LiveData {
            status: "live",
            phase: state.lifecycle().phase().name(),
        }),
    })
    .into_response()
}

#[utoipa::path(
    get,
    path = "/health/ready",
    tag = "operations",
    responses(
        (status = 200, description = "Model loaded and warmed up", body = crate::api::openapi::ReadyResponse),
        (status = 503, description = "50004: loading, warming up or draining", body = crate::api::openapi::ErrorResponse,
            headers(("retry-after" = u64, description = "Whole seconds to wait"))),
    )
)]
pub async fn ready(State(state): State<AppState>) -> Response {
    match state.ready_extractor() {
        Ok(extractor) => {
            let info = extractor.engine().info();
            Json(Envelope {
                code: 0,
                message: "ok".into(),
                data: Some(HealthData {
                    status: "ready",
                    model: info.name.clone(),
                    max_sequence_len: info.max_sequence_len,
                    model_load_seconds: info.load_time.as_secs_f64(),
                }),
            })
            .into_response()
        }
        Err(e) => e.into_response(),
    }
}
