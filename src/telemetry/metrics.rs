//! The Prometheus registry and every metric memex exports.
//!
//! One registry per server rather than the global default, so that several servers in one
//! process (the tests) do not mix their counts. Names carry the `memex_` prefix and their unit;
//! labels are low-cardinality (route, status, code, branch, reason, kind) and never name a key.

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use std::sync::Arc;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;

use crate::engine::stats::Kind;
use crate::engine::{Engine, EngineStats};
use crate::limits::admission::AdmissionGauges;
use crate::limits::shared::BackendMetrics;
use crate::pipeline::branch::Branch;

/// The `kind` label of `memex_engine_errors_total`: one per `EngineError` variant.
pub const ENGINE_ERROR_KINDS: [&str; 4] = ["rejected", "generation", "unavailable", "tokenizer"];

/// Why a request was turned away before generating: the `reason` label of
/// `memex_rejections_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// Body or input tokens over the limit.
    TooLong,
    /// Per-key request rate.
    Rate,
    /// Per-key input-token quota.
    Quota,
    /// Queue full or queue wait timed out.
    Overloaded,
    /// Refused at once: its predicted completion was past its deadline.
    Deadline,
    /// Admitted, then cancelled at its deadline (queued or generating).
    DeadlineExceeded,
    /// Missing, malformed or unknown key.
    Auth,
    /// The request itself is wrong (400).
    Invalid,
    /// Model still loading, or the server is draining.
    NotReady,
    /// A connection over `--max-connections` (answered 503 or closed before any request).
    Connections,
    /// `--limits-redis-fail closed` and the shared limits did not answer in time.
    LimitsUnavailable,
}

impl Rejection {
    pub const ALL: [Rejection; 11] = [
        Self::TooLong,
        Self::Rate,
        Self::Quota,
        Self::Overloaded,
        Self::Deadline,
        Self::DeadlineExceeded,
        Self::Auth,
        Self::Invalid,
        Self::NotReady,
        Self::Connections,
        Self::LimitsUnavailable,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Self::TooLong => "too_long",
            Self::Rate => "rate",
            Self::Quota => "quota",
            Self::Overloaded => "overloaded",
            Self::Deadline => "deadline",
            Self::DeadlineExceeded => "deadline_exceeded",
            Self::Auth => "auth",
            Self::Invalid => "invalid",
            Self::NotReady => "not_ready",
            Self::Connections => "connections",
            Self::LimitsUnavailable => "limits_unavailable",
        }
    }
}

/// The `kind` label of `memex_limits_backend_errors_total`: no answer within
/// `--limits-redis-timeout`, or an error (refused connection, script error).
pub const LIMITS_BACKEND_ERROR_KINDS: [&str; 2] = ["timeout", "error"];

/// Round trips to the shared limits: 100 µs to 100 ms, finest around a millisecond (a healthy
/// one takes a fraction of one, the default deadline is 10 ms).
const BACKEND_SECONDS_BUCKETS: [f64; 15] = [
    0.0001, 0.0002, 0.0003, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075, 0.01,
    0.02, 0.05, 0.1,
];

/// Latency buckets from 5 ms to 5 min: CPU generations of a 0.6B model take tens of seconds.
const SECONDS_BUCKETS: [f64; 16] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
];

fn seconds(name: &str, help: &str) -> HistogramOpts {
    HistogramOpts::new(name, help).buckets(SECONDS_BUCKETS.to_vec())
}

fn by(name: &str, help: &str) -> Opts {
    Opts::new(name, help)
}

/// Declares the `Metrics` fields and builds and registers each, from one list.
macro_rules! metrics {
    ($($field:ident: $ty:ty = $make:expr;)*) => {
        pub struct Metrics {
            registry: Registry,
            $(pub $field: $ty,)*
        }

        impl Metrics {
            fn build() -> prometheus::Result<Self> {
                let registry = Registry::new();
                $(
                    let $field: $ty = $make;
                    registry.register(Box::new($field.clone()))?;
                )*
                Ok(Self { registry, $($field,)* })
            }
        }
    };
}

metrics! {
    requests: IntCounterVec = IntCounterVec::new(
        by(
            "memex_requests_total",
            "HTTP requests answered, by route, HTTP status and envelope code",
        ),
        &["route", "status", "code"],
    )?;
    request_duration: HistogramVec = HistogramVec::new(
        seconds("memex_request_duration_seconds", "Time from request to response, by route"),
        &["route"],
    )?;
    requests_cancelled: IntCounterVec = IntCounterVec::new(
        by(
            "memex_requests_cancelled_total",
            "Requests whose client disconnected before the response",
        ),
        &["route"],
    )?;
    queue_wait: Histogram = Histogram::with_opts(seconds(
        "memex_queue_wait_seconds",
        "Time admitted requests waited for a generation slot",
    ))?;
    time_to_first_token: HistogramVec = HistogramVec::new(
        seconds(
            "memex_time_to_first_token_seconds",
            "Engine submission to first generated token, per branch",
        ),
        &["branch"],
    )?;
    generation_duration: HistogramVec = HistogramVec::new(
        seconds(
            "memex_generation_duration_seconds",
            "Engine submission to last token, per branch",
        ),
        &["branch"],
    )?;
    input_tokens: IntCounter = IntCounter::new(
        "memex_input_tokens_total",
        "Input tokens (message contents) of admitted requests",
    )?;
    prompt_tokens: IntCounterVec = IntCounterVec::new(
        by("memex_prompt_tokens_total", "Prompt tokens sent to the engine, per branch"),
        &["branch"],
    )?;
    generated_tokens: IntCounterVec = IntCounterVec::new(
        by("memex_generated_tokens_total", "Tokens generated by the engine, per branch"),
        &["branch"],
    )?;
    cached_prompt_tokens: IntCounterVec = IntCounterVec::new(
        by(
            "memex_prompt_cached_tokens_total",
            "Prompt tokens served from the engine's prefix cache, per branch",
        ),
        &["branch"],
    )?;
    prefill_tokens: IntCounterVec = IntCounterVec::new(
        by(
            "memex_prefill_tokens_total",
            "Prompt tokens the engine computed (not served from its prefix cache), per branch",
        ),
        &["branch"],
    )?;
    in_flight: IntGauge =
        IntGauge::new("memex_in_flight_requests", "Requests holding a generation slot")?;
    queued: IntGauge =
        IntGauge::new("memex_queued_requests", "Requests waiting for a generation slot")?;
    admission_limit: Gauge = Gauge::new(
        "memex_admission_limit",
        "Requests allowed to generate at once: the adaptive limit (README, Admission)",
    )?;
    predicted_service: Histogram = Histogram::with_opts(seconds(
        "memex_predicted_service_seconds",
        "Predicted time from admission to answer of each request, when the server was busy",
    ))?;
    rejections: IntCounterVec = IntCounterVec::new(
        by("memex_rejections_total", "Requests turned away before generating, by reason"),
        &["reason"],
    )?;
    engine_errors: IntCounterVec = IntCounterVec::new(
        by(
            "memex_engine_errors_total",
            "Failed engine calls, by kind (rejected, generation, unavailable, tokenizer)",
        ),
        &["kind"],
    )?;
    branch_retries: IntCounterVec = IntCounterVec::new(
        by(
            "memex_branch_retries_total",
            "Branch generations retried after a failed attempt",
        ),
        &["branch"],
    )?;
    limits_backend_errors: IntCounterVec = IntCounterVec::new(
        by(
            "memex_limits_backend_errors_total",
            "Checks of the per-key limits shared through Redis (--limits-redis) that got no \
             answer in time (timeout) or failed (error); --limits-redis-fail decided each",
        ),
        &["kind"],
    )?;
    limits_backend_duration: Histogram = Histogram::with_opts(
        HistogramOpts::new(
            "memex_limits_backend_duration_seconds",
            "Round trip of each answered check of the per-key limits shared through Redis",
        )
        .buckets(BACKEND_SECONDS_BUCKETS.to_vec()),
    )?;
    model_load_seconds: Gauge =
        Gauge::new("memex_model_load_seconds", "Time the engine took to load the model")?;
    build_info: IntGaugeVec = IntGaugeVec::new(
        by("memex_build_info", "Always 1; labels name the build"),
        &["version"],
    )?;
}

impl Metrics {
    pub fn new() -> Self {
        let m = Self::build().expect("metric definitions are static and valid");
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        // Zero series for every reason, so that dashboards and alerts see them before the first
        // rejection rather than "no data".
        for r in Rejection::ALL {
            m.rejections.with_label_values(&[r.label()]);
        }
        for kind in ENGINE_ERROR_KINDS {
            m.engine_errors.with_label_values(&[kind]);
        }
        for branch in Branch::ALL {
            m.branch_retries.with_label_values(&[branch.name()]);
        }
        for kind in LIMITS_BACKEND_ERROR_KINDS {
            m.limits_backend_errors.with_label_values(&[kind]);
        }
        m
    }

    pub fn admission_gauges(&self) -> AdmissionGauges {
        AdmissionGauges {
            in_flight: self.in_flight.clone(),
            queued: self.queued.clone(),
            limit: self.admission_limit.clone(),
            predicted: self.predicted_service.clone(),
        }
    }

    pub fn limits_backend(&self) -> BackendMetrics {
        BackendMetrics {
            errors: self.limits_backend_errors.clone(),
            round_trip: self.limits_backend_duration.clone(),
        }
    }

    pub fn reject(&self, reason: Rejection) {
        self.rejections.with_label_values(&[reason.label()]).inc();
    }

    /// Export the engine's own counters (batch, step, KV cache, prefix cache), read at each
    /// scrape. Engines without counters export nothing.
    pub fn watch_engine(&self, engine: Arc<dyn Engine>) {
        if engine.stats().is_none() {
            return;
        }
        if let Err(e) = self
            .registry
            .register(Box::new(EngineCollector::new(engine)))
        {
            tracing::warn!(error = %e, "engine metrics not registered");
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metric families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

/// The engine's step counters, turned into metrics when scraped: the engine thread keeps plain
/// atomics and never touches Prometheus.
struct EngineCollector {
    engine: Arc<dyn Engine>,
    descs: Vec<Desc>,
}

impl EngineCollector {
    fn new(engine: Arc<dyn Engine>) -> Self {
        let descs = EngineStats::default()
            .metrics()
            .into_iter()
            .map(|m| {
                Desc::new(
                    m.name.to_string(),
                    m.help.to_string(),
                    vec![],
                    Default::default(),
                )
                .expect("static metric names are valid")
            })
            .collect();
        Self { engine, descs }
    }
}

impl Collector for EngineCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let Some(stats) = self.engine.stats() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for m in stats.metrics() {
            // Fresh metrics per scrape, set to the engine's own values.
            let families = match m.kind {
                Kind::Counter | Kind::MicrosCounter => {
                    let c = prometheus::Counter::new(m.name, m.help).expect("valid");
                    c.inc_by(m.value);
                    c.collect()
                }
                Kind::Gauge | Kind::NanosGauge => {
                    let g = prometheus::Gauge::new(m.name, m.help).expect("valid");
                    g.set(m.value);
                    g.collect()
                }
            };
            out.extend(families);
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_is_exported_with_prefix() {
        let m = Metrics::new();
        m.requests
            .with_label_values(&["/extract/memory", "200", "0"])
            .inc();
        let text = m.render();
        for name in [
            "memex_requests_total",
            "memex_rejections_total{reason=\"too_long\"} 0",
            "memex_build_info{version=",
            "memex_in_flight_requests 0",
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(line.starts_with("memex_"), "{line}");
        }
    }
}
