//! `POST /extract/memory` (also under the hosted prefix `/api/openmem/v1`).
//!
//! The stages run in the order of `crate::limits`: key → request rate → content type → body →
//! readiness → input checks and the token count → token quota → a generation slot → the
//! pipeline. The key is checked from the request head alone, before a byte of the body is read
//! (so no `100 Continue` goes to a client without a key, and an unauthenticated client cannot
//! make the server buffer a body). The request cell is taken as soon as the key is known, so
//! invalid requests count against the key's rate like any other; a 503 (not ready, draining,
//! full) gives back the request cell and the tokens, since the server, not the client, turned the
//! request away.

use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};

use crate::api::error::ApiError;
use crate::api::types::{Envelope, ExtractData, ExtractRequest};
use crate::api::AppState;
use crate::limits::admission::{Done, Work};
use crate::limits::{AdmissionError, LimitError};
use crate::pipeline::{BranchStats, Extraction, PipelineError};
use crate::telemetry::http::RequestRecord;
use crate::telemetry::Metrics;

#[utoipa::path(
    post,
    path = "/extract/memory",
    tag = "extraction",
    request_body = ExtractRequest,
    security(("api_key" = [])),
    responses(
        (status = 200, description = "Memories extracted", body = crate::api::openapi::ExtractResponse,
            headers(
                ("x-request-id" = String, description = "Id of this request, also in the server log"),
                ("x-queue-time" = String, description = "Seconds spent waiting for a generation slot"),
                ("x-inference-time" = String, description = "Seconds of generation (longest branch)"),
                ("x-input-tokens" = String, description = "Tokens of the message contents"),
                ("x-prompt-tokens" = String, description = "Prompt tokens over all branches"),
                ("x-generated-tokens" = String, description = "Generated tokens over all branches"),
                ("x-language" = String, description = "Detected dialogue language"),
            )),
        (status = 400, description = "40000: not JSON, wrong types, unknown role, non-text content, unknown or empty extraction_types. 40002: messages missing or empty, or a message empty after trimming", body = crate::api::openapi::ErrorResponse),
        (status = 401, description = "40100: no `Authorization: Token <key>` header, or a malformed one. 40132: unknown key", body = crate::api::openapi::ErrorResponse),
        (status = 408, description = "40000: the body did not arrive within the body-read timeout", body = crate::api::openapi::ErrorResponse),
        (status = 413, description = "40305: input over the token limit, or a prompt that with its longest possible answer does not fit the model's context (the message gives the counts and the limit). 40000: body over the byte limit", body = crate::api::openapi::ErrorResponse),
        (status = 415, description = "40000: Content-Type is not application/json", body = crate::api::openapi::ErrorResponse),
        (status = 429, description = "40300: the key's request rate exceeded. 40301: the key's input-token quota exceeded", body = crate::api::openapi::ErrorResponse,
            headers(("retry-after" = u64, description = "Whole seconds to wait"))),
        (status = 500, description = "50000: an extraction branch failed even after its retry (the branch is named)", body = crate::api::openapi::ErrorResponse),
        (status = 503, description = "50004: server full (queue bounded) or queue wait timed out, model loading, or draining, or the per-key limits shared through Redis unreachable with --limits-redis-fail closed", body = crate::api::openapi::ErrorResponse,
            headers(("retry-after" = u64, description = "Whole seconds to wait"))),
    )
)]
pub async fn extract_memory(
    State(state): State<AppState>,
    record: Option<Extension<RequestRecord>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    // Counted from arrival, so a drain waits for requests still being checked, too.
    let _accepted = state.lifecycle().track();
    let record = record.map(|Extension(r)| r).unwrap_or_default();
    match handle(&state, &record, &headers, body).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

/// The header a client sets to ask for a deadline shorter than `--request-timeout`, in seconds
/// (fractions allowed). The official SDK's time-out is 30 s, the server's default.
const REQUEST_TIMEOUT: &str = "x-request-timeout";
/// A request cancelled at its deadline is answered this much before it (or a tenth of its time,
/// if less), so that a client waiting exactly the deadline hears the 503 before its time-out.
const ANSWER_MARGIN: Duration = Duration::from_secs(1);
/// Prompt tokens of a branch's own task line, after the shared dialogue (`templates/`).
const TASK_LINE_TOKENS: usize = 64;

async fn handle(
    state: &AppState,
    record: &RequestRecord,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    // From the head alone: the body is not touched until the key and its rate are known.
    let caller = state
        .keys()
        .authenticate(headers.get(header::AUTHORIZATION))?;
    record.update(|f| f.key_hash = Some(caller.key_hash.clone()));
    let limits = state.limits();
    let mut taken = limits.check_request(&caller).await?;
    let deadline = deadline(state, headers, arrived)?;

    require_json(headers)?;
    let body = read_body(state, headers, body).await?;
    let request = parse(body).await?;
    let extractor = match state.ready_extractor() {
        Ok(extractor) => extractor,
        Err(e) => {
            limits.refund(&caller, &taken).await;
            return Err(e);
        }
    };
    let prepared = extractor.prepare(request.into_input()).await?;
    let input_tokens = prepared.input_tokens;
    record.update(|f| f.input_tokens = Some(input_tokens));

    if let Err(e) = limits
        .charge_tokens(&caller, &mut taken, input_tokens)
        .await
    {
        // A 503 (the shared limits failed closed) is the server's refusal: the cell goes back.
        if e == LimitError::Unavailable {
            limits.refund(&caller, &taken).await;
        }
        return Err(e.into());
    }
    // From here on a 503 is the server, not the client, turning it away: the request cell and
    // the tokens go back (`limits.refund`).

    let admission = state.admission();
    // The engine computes the dialogue once (the branches share it) and each branch's short task
    // line; the rules before the dialogue come from its prefix cache.
    let work = Work {
        prompt_tokens: input_tokens + prepared.branches() * TASK_LINE_TOKENS,
        branches: prepared.branches(),
    };
    let metrics = state.metrics();
    let generating = std::sync::atomic::AtomicBool::new(false);
    // The engine's counters at each arrival and each end: its throughput, and what the requests
    // running in between have been served.
    let observe = || {
        if let Some(stats) = extractor.engine().stats() {
            admission.observe_engine(&stats);
        }
    };
    observe();
    let generate = async {
        let permit = admission.admit(work, deadline).await?;
        generating.store(true, std::sync::atomic::Ordering::Relaxed);
        metrics.queue_wait.observe(permit.queue_time.as_secs_f64());
        metrics.input_tokens.inc_by(input_tokens as u64);
        record.update(|f| f.queue_time = Some(permit.queue_time));
        let extraction = extractor.run(prepared).await.inspect_err(|e| {
            // A branch that failed for good was retried once first.
            if let PipelineError::Branch { branch, .. } = e {
                metrics
                    .branch_retries
                    .with_label_values(&[branch.name()])
                    .inc();
            }
        })?;
        Ok::<_, ApiError>((permit, extraction))
    };
    // At the deadline the whole future is dropped: its queue place or slot, and its engine
    // sequences with their KV blocks, go at once.
    let answer_by = deadline - ANSWER_MARGIN.min(deadline.saturating_duration_since(arrived) / 10);
    let (permit, extraction) = match tokio::time::timeout_at(answer_by.into(), generate).await {
        Ok(Ok(done)) => done,
        Ok(Err(e)) => {
            if matches!(e, ApiError::Overloaded(_)) {
                limits.refund(&caller, &taken).await;
            }
            return Err(e);
        }
        Err(_) => {
            observe();
            limits.refund(&caller, &taken).await;
            if generating.load(std::sync::atomic::Ordering::Relaxed) {
                admission.deadline_missed();
            }
            return Err(ApiError::Overloaded(AdmissionError::DeadlineExceeded {
                deadline: deadline.saturating_duration_since(arrived),
            }));
        }
    };
    observe();
    let queue_time = permit.queue_time;
    admission.finish(
        permit,
        Done {
            prompt_tokens: extraction
                .branches
                .iter()
                .map(|b| b.prompt_tokens - b.cached_prompt_tokens.min(b.prompt_tokens))
                .sum(),
            generated_tokens: extraction.branches.iter().map(|b| b.generated_tokens).sum(),
            branches: extraction.branches.len(),
        },
    );
    Ok(success(state, record, extraction, queue_time))
}

/// When the request must be answered: `--request-timeout` from arrival, or sooner when the
/// client's `x-request-timeout` header (seconds) asks for less.
fn deadline(state: &AppState, headers: &HeaderMap, arrived: Instant) -> Result<Instant, ApiError> {
    let server = state.admission().config().request_timeout;
    let Some(value) = headers.get(REQUEST_TIMEOUT) else {
        return Ok(arrived + server);
    };
    let asked = value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .ok_or_else(|| {
            ApiError::InvalidRequest(format!(
                "{REQUEST_TIMEOUT} must be a number of seconds above 0"
            ))
        })?;
    Ok(arrived + server.min(Duration::from_secs_f64(asked.min(86_400.0))))
}

/// `Content-Type: application/json` (parameters such as `charset` allowed). Anything else is
/// refused: a `text/plain` body is a "simple" cross-site request a web page may send without
/// asking, so with `--no-auth` on an open port any page could otherwise drive the server.
fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let media_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(str::trim)
        .unwrap_or("");
    if media_type.eq_ignore_ascii_case("application/json") {
        Ok(())
    } else {
        Err(ApiError::UnsupportedMediaType)
    }
}

/// The whole body, at most `--max-body-bytes`, within `--body-read-timeout` from the first read.
/// A declared length over the limit is refused before reading.
async fn read_body(state: &AppState, headers: &HeaderMap, body: Body) -> Result<Bytes, ApiError> {
    use futures::StreamExt;
    let config = state.http();
    let limit = config.max_body_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::BodyTooLarge { limit });
    }
    let read = async {
        let mut stream = body.into_data_stream();
        let mut buf = Vec::with_capacity(declared.unwrap_or(0).min(limit as u64) as usize);
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|_| {
                ApiError::InvalidRequest("the request body could not be read".into())
            })?;
            if buf.len() + chunk.len() > limit {
                return Err(ApiError::BodyTooLarge { limit });
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(Bytes::from(buf))
    };
    tokio::time::timeout(config.body_read_timeout, read)
        .await
        .map_err(|_| ApiError::BodyTimeout {
            seconds: config.body_read_timeout.as_secs_f64(),
        })?
}

/// Bodies above this are parsed on a blocking thread: parsing a 1 MiB body takes milliseconds,
/// which would stall every other request on that async worker.
const PARSE_INLINE_BYTES: usize = 16 << 10;

async fn parse(body: Bytes) -> Result<ExtractRequest, ApiError> {
    if body.len() <= PARSE_INLINE_BYTES {
        return ExtractRequest::from_json(&body);
    }
    tokio::task::spawn_blocking(move || ExtractRequest::from_json(&body))
        .await
        .map_err(|e| ApiError::Internal(format!("parsing the body: {e}")))?
}

/// The 200 answer: the extraction's numbers go to the metrics, the request's log line and the
/// response headers, and its items into the envelope.
fn success(
    state: &AppState,
    record: &RequestRecord,
    extraction: Extraction,
    queue_time: Duration,
) -> Response {
    observe_branches(state.metrics(), &extraction.branches);
    let totals = Totals::of(&extraction.branches);
    record.update(|f| {
        f.prompt_tokens = Some(totals.prompt_tokens);
        f.generated_tokens = Some(totals.generated_tokens);
        f.inference_time = Some(totals.inference_time);
        f.branches = Some(branch_summary(&extraction.branches));
    });
    let mut response = Json(Envelope {
        code: 0,
        message: "ok".into(),
        data: Some(ExtractData::from(extraction.items)),
    })
    .into_response();
    set_stat_headers(
        response.headers_mut(),
        &totals,
        extraction.input_tokens,
        queue_time,
        extraction.language,
    );
    response
}

/// The per-branch metric families, labelled by branch.
fn observe_branches(metrics: &Metrics, branches: &[BranchStats]) {
    for b in branches {
        let branch = [b.branch.name()];
        metrics
            .time_to_first_token
            .with_label_values(&branch)
            .observe(b.time_to_first_token.as_secs_f64());
        metrics
            .generation_duration
            .with_label_values(&branch)
            .observe(b.generation_time.as_secs_f64());
        metrics
            .prompt_tokens
            .with_label_values(&branch)
            .inc_by(b.prompt_tokens as u64);
        metrics
            .generated_tokens
            .with_label_values(&branch)
            .inc_by(b.generated_tokens as u64);
        metrics
            .cached_prompt_tokens
            .with_label_values(&branch)
            .inc_by(b.cached_prompt_tokens as u64);
        metrics
            .prefill_tokens
            .with_label_values(&branch)
            .inc_by(b.prefill_tokens() as u64);
        if b.attempts > 1 {
            metrics
                .branch_retries
                .with_label_values(&branch)
                .inc_by(u64::from(b.attempts - 1));
        }
    }
}

/// A request's numbers over all its branches: what the log line and the headers report.
struct Totals {
    prompt_tokens: usize,
    generated_tokens: usize,
    cached_prompt_tokens: usize,
    prefill_tokens: usize,
    inference_time: Duration,
}

impl Totals {
    fn of(branches: &[BranchStats]) -> Self {
        let sum = |f: fn(&BranchStats) -> usize| branches.iter().map(f).sum();
        Self {
            prompt_tokens: sum(|b| b.prompt_tokens),
            generated_tokens: sum(|b| b.generated_tokens),
            cached_prompt_tokens: sum(|b| b.cached_prompt_tokens),
            prefill_tokens: sum(BranchStats::prefill_tokens),
            // Branches run concurrently: the request waited for the longest one.
            inference_time: branches
                .iter()
                .map(|b| b.generation_time)
                .max()
                .unwrap_or_default(),
        }
    }
}

/// One `branch:time/tokens/ttft/cached/try` group per branch, for the request's log line.
fn branch_summary(branches: &[BranchStats]) -> String {
    branches
        .iter()
        .map(|b| {
            format!(
                "{}:{:.3}s/{}tok/ttft{:.3}s/cached{}/try{}",
                b.branch,
                b.generation_time.as_secs_f64(),
                b.generated_tokens,
                b.time_to_first_token.as_secs_f64(),
                b.cached_prompt_tokens,
                b.attempts
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The `x-*` headers of a 200 (the OpenAPI document lists them).
fn set_stat_headers(
    headers: &mut HeaderMap,
    totals: &Totals,
    input_tokens: usize,
    queue_time: Duration,
    language: &str,
) {
    set_header(headers, "x-input-tokens", &input_tokens.to_string());
    set_header(
        headers,
        "x-prompt-tokens",
        &totals.prompt_tokens.to_string(),
    );
    set_header(
        headers,
        "x-generated-tokens",
        &totals.generated_tokens.to_string(),
    );
    set_header(
        headers,
        "x-cached-prompt-tokens",
        &totals.cached_prompt_tokens.to_string(),
    );
    set_header(
        headers,
        "x-prefill-tokens",
        &totals.prefill_tokens.to_string(),
    );
    set_header(headers, "x-queue-time", &seconds(queue_time));
    set_header(headers, "x-inference-time", &seconds(totals.inference_time));
    set_header(headers, "x-language", language);
}

fn seconds(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64())
}

fn set_header(headers: &mut HeaderMap, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        headers.insert(HeaderName::from_static(name), v);
    }
}
