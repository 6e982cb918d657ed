//! `GET /health`: 200 with the served model once it is loaded, 503 (same envelope) before.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use crate::api::types::Envelope;
use crate::api::AppState;

#[derive(Serialize)]
pub struct HealthData {
    pub status: &'static str,
    pub model: String,
    pub max_sequence_len: Option<usize>,
    pub model_load_seconds: f64,
}

pub async fn health(State(state): State<AppState>) -> Response {
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
