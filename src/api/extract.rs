//! `POST /extract/memory` (also under the hosted prefix `/api/openmem/v1`).

use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::api::error::ApiError;
use crate::api::types::{Envelope, ExtractRequest};
use crate::api::AppState;
use crate::pipeline::ExtractInput;

pub async fn extract_memory(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let started = Instant::now();
    let request_id = uuid::Uuid::new_v4().to_string();
    let (mut response, branches) = match handle(&state, body).await {
        Ok(r) => r,
        Err(e) => (e.into_response(), String::new()),
    };
    let status = response.status();
    let headers = response.headers_mut();
    set_header(headers, "x-request-id", &request_id);
    tracing::info!(
        request_id,
        status = status.as_u16(),
        total_ms = started.elapsed().as_millis() as u64,
        prompt_tokens = header_str(headers, "x-prompt-tokens"),
        generated_tokens = header_str(headers, "x-generated-tokens"),
        branches,
        "extract"
    );
    response
}

/// The response, and a per-branch summary for the request's log line.
async fn handle(
    state: &AppState,
    body: Result<Bytes, BytesRejection>,
) -> Result<(Response, String), ApiError> {
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::BodyTooLarge {
                limit: state.http().max_body_bytes,
            }
        } else {
            ApiError::InvalidRequest(rejection.body_text())
        }
    })?;
    let request = ExtractRequest::from_json(&body)?;
    let extractor = state.ready_extractor()?;
    let extraction = extractor
        .extract(ExtractInput {
            messages: request.messages,
            extraction_types: request.extraction_types,
        })
        .await?;

    let prompt_tokens: usize = extraction.branches.iter().map(|b| b.prompt_tokens).sum();
    let generated: usize = extraction.branches.iter().map(|b| b.generated_tokens).sum();
    let inference = extraction
        .branches
        .iter()
        .map(|b| b.generation_time)
        .max()
        .unwrap_or_default();
    let summary = extraction
        .branches
        .iter()
        .map(|b| {
            format!(
                "{}:{:.3}s/{}tok/ttft{:.3}s/try{}",
                b.branch,
                b.generation_time.as_secs_f64(),
                b.generated_tokens,
                b.time_to_first_token.as_secs_f64(),
                b.attempts
            )
        })
        .collect::<Vec<_>>()
        .join(" ");
    let mut response = Json(Envelope {
        code: 0,
        message: "ok".into(),
        data: Some(extraction.data),
    })
    .into_response();
    let headers = response.headers_mut();
    set_header(
        headers,
        "x-input-tokens",
        &extraction.input_tokens.to_string(),
    );
    set_header(headers, "x-prompt-tokens", &prompt_tokens.to_string());
    set_header(headers, "x-generated-tokens", &generated.to_string());
    set_header(
        headers,
        "x-inference-time",
        &format!("{:.3}", inference.as_secs_f64()),
    );
    set_header(headers, "x-language", extraction.language);
    Ok((response, summary))
}

fn set_header(headers: &mut HeaderMap, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        headers.insert(HeaderName::from_static(name), v);
    }
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
}
