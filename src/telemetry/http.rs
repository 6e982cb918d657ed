//! Per-request observation: request id, the request counter and duration histogram, rejection
//! counts, and the one log line each request gets.
//!
//! A middleware around every route. Handlers add what they learn (the caller's key hash, token
//! counts, timings) to a [`RequestRecord`] shared through the request extensions, rather than
//! returning it: when a client disconnects, the handler future is dropped mid-way and only the
//! middleware's drop guard is left to log what was known and count the cancellation.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::Response;

use crate::limits::KeyHash;
use crate::telemetry::metrics::{Metrics, Rejection};

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// What a handler learned about its request, for the log line.
#[derive(Debug, Default, Clone)]
pub struct RequestFacts {
    pub key_hash: Option<KeyHash>,
    pub input_tokens: Option<usize>,
    pub prompt_tokens: Option<usize>,
    pub generated_tokens: Option<usize>,
    pub queue_time: Option<Duration>,
    pub inference_time: Option<Duration>,
    /// Per-branch summary, e.g. `memory:0.412s/37tok/ttft0.051s/try1`.
    pub branches: Option<String>,
}

#[derive(Clone, Default)]
pub struct RequestRecord(Arc<Mutex<RequestFacts>>);

impl RequestRecord {
    pub fn update(&self, f: impl FnOnce(&mut RequestFacts)) {
        if let Ok(mut facts) = self.0.lock() {
            f(&mut facts);
        }
    }

    fn snapshot(&self) -> RequestFacts {
        self.0.lock().map(|f| f.clone()).unwrap_or_default()
    }
}

/// Set on error responses by the one place errors become responses (`api::error`), so that the
/// middleware can label and count them without parsing bodies.
#[derive(Debug, Clone)]
pub struct ErrorOutcome {
    pub code: u32,
    pub rejection: Option<Rejection>,
    pub message: String,
}

/// The request id, also available to handlers.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

pub async fn observe(
    State(metrics): State<Arc<Metrics>>,
    mut req: Request,
    next: Next,
) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into());
    let id = uuid::Uuid::new_v4().to_string();
    let record = RequestRecord::default();
    req.extensions_mut().insert(RequestId(id.clone()));
    req.extensions_mut().insert(record.clone());

    let mut pending = Pending {
        metrics,
        route,
        id,
        record,
        started: Instant::now(),
        answered: false,
    };
    let mut response = next.run(req).await;
    pending.answered(&mut response);
    response
}

/// A request not yet answered. If it is dropped unanswered, the client went away.
struct Pending {
    metrics: Arc<Metrics>,
    route: String,
    id: String,
    record: RequestRecord,
    started: Instant,
    answered: bool,
}

impl Pending {
    fn answered(&mut self, response: &mut Response) {
        self.answered = true;
        let status = response.status();
        let outcome = response.extensions().get::<ErrorOutcome>().cloned();
        let code = match &outcome {
            Some(o) => o.code.to_string(),
            None if status.is_success() => "0".into(),
            None => "none".into(),
        };
        if let Some(reason) = outcome.as_ref().and_then(|o| o.rejection) {
            self.metrics.reject(reason);
        }
        let elapsed = self.started.elapsed();
        self.metrics
            .requests
            .with_label_values(&[&self.route, status.as_str(), &code])
            .inc();
        self.metrics
            .request_duration
            .with_label_values(&[&self.route])
            .observe(elapsed.as_secs_f64());
        if let Ok(v) = HeaderValue::from_str(&self.id) {
            response.headers_mut().insert(REQUEST_ID, v);
        }
        self.log(
            Some(status),
            &code,
            outcome.as_ref().map(|o| o.message.as_str()),
        );
    }

    fn log(&self, status: Option<StatusCode>, code: &str, error: Option<&str>) {
        let facts = self.record.snapshot();
        let ms = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1000.0);
        // Probes and scrapes arrive every few seconds; their lines would drown the real traffic.
        let quiet = self.route.starts_with("/health")
            || self.route == "/metrics"
            || self.route == "/openapi.json";
        macro_rules! line {
            ($level:expr) => {
                tracing::event!(
                    $level,
                    request_id = %self.id,
                    route = %self.route,
                    key_hash = facts.key_hash.as_ref().map(KeyHash::as_str),
                    status = status.map(|s| s.as_u16()),
                    code,
                    input_tokens = facts.input_tokens,
                    prompt_tokens = facts.prompt_tokens,
                    generated_tokens = facts.generated_tokens,
                    queue_ms = ms(facts.queue_time),
                    inference_ms = ms(facts.inference_time),
                    total_ms = self.started.elapsed().as_secs_f64() * 1000.0,
                    branches = facts.branches.as_deref(),
                    error,
                    "{}",
                    if status.is_some() { "request" } else { "request cancelled: client disconnected" }
                )
            };
        }
        if quiet {
            line!(tracing::Level::DEBUG);
        } else {
            line!(tracing::Level::INFO);
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        self.metrics
            .requests_cancelled
            .with_label_values(&[&self.route])
            .inc();
        self.log(None, "none", None);
    }
}
