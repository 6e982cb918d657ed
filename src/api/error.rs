//! Every error a client can get, and its (HTTP status, contract code), in one place.
//!
//! Lower layers have their own error enums; they are converted here, once, at the HTTP edge.
//! Messages are for people: they say what to change, and never carry an internal path or a
//! backtrace (500s say which stage failed, not how). A message that quotes client input (a
//! parser's "invalid type: string ..." can quote a whole field) is cut to its first
//! [`MESSAGE_HEAD`] and last [`MESSAGE_TAIL`] characters, in the response and in the log line.
//!
//! The statuses HTTP itself needs (404, 405, 408, 415) carry the contract's generic client-error
//! code 40000, so a client that handles 40000 handles them.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::api::types::{Envelope, ExtractData};
use crate::limits::{AdmissionError, AuthError, LimitError, RateError};
use crate::pipeline::PipelineError;
use crate::telemetry::http::ErrorOutcome;
use crate::telemetry::Rejection;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Not JSON, wrong types, unknown role, non-text content, unknown extraction type.
    #[error("{0}")]
    InvalidRequest(String),
    /// `messages` missing or empty, or a message whose content is empty after cleaning.
    #[error("{0}")]
    EmptyInput(String),
    #[error("input has {counted} tokens, over the limit of {limit} tokens")]
    TooManyTokens { counted: usize, limit: usize },
    /// A branch's prompt plus its longest possible answer does not fit the model's context.
    #[error(
        "the {branch} prompt of {prompt} tokens plus its longest possible answer of {output} \
         tokens does not fit the model's context of {context} tokens; send a shorter dialogue"
    )]
    PromptTooLong {
        branch: String,
        prompt: usize,
        output: usize,
        context: usize,
    },
    #[error("request body is over the limit of {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("the request body did not arrive within the body-read timeout of {seconds} s")]
    BodyTimeout { seconds: f64 },
    #[error("Content-Type must be application/json")]
    UnsupportedMediaType,
    #[error("no such route: see /openapi.json for the API")]
    NotFound,
    #[error("method not allowed on this route: see /openapi.json for the API")]
    MethodNotAllowed,
    /// Missing, malformed (40100) or unknown (40132) API key.
    #[error("{0}")]
    Unauthorized(AuthError),
    /// The caller's request rate (40300) or input-token quota (40301).
    #[error("{0}")]
    RateLimited(RateError),
    /// Queue full, no slot within the queue timeout, a predicted completion past the deadline,
    /// or cancelled at the deadline.
    #[error("{0}")]
    Overloaded(AdmissionError),
    /// `--limits-redis-fail closed`, and the shared per-key limits did not answer in time.
    #[error("{}", LimitError::Unavailable)]
    LimitsUnavailable,
    #[error("server is not ready: {reason}")]
    Unavailable {
        reason: String,
        retry_after_secs: u64,
    },
    /// A branch could not produce a valid answer, even after its retry.
    #[error("extraction failed in the {branch} branch: {reason}")]
    ExtractionFailed { branch: String, reason: String },
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    pub fn status_and_code(&self) -> (StatusCode, u32) {
        match self {
            Self::InvalidRequest(_) => (StatusCode::BAD_REQUEST, 40000),
            Self::EmptyInput(_) => (StatusCode::BAD_REQUEST, 40002),
            Self::TooManyTokens { .. } | Self::PromptTooLong { .. } => {
                (StatusCode::PAYLOAD_TOO_LARGE, 40305)
            }
            Self::BodyTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, 40000),
            Self::BodyTimeout { .. } => (StatusCode::REQUEST_TIMEOUT, 40000),
            Self::UnsupportedMediaType => (StatusCode::UNSUPPORTED_MEDIA_TYPE, 40000),
            Self::NotFound => (StatusCode::NOT_FOUND, 40000),
            Self::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, 40000),
            Self::Unauthorized(AuthError::Missing | AuthError::Malformed) => {
                (StatusCode::UNAUTHORIZED, 40100)
            }
            Self::Unauthorized(AuthError::Unknown) => (StatusCode::UNAUTHORIZED, 40132),
            Self::RateLimited(RateError::Requests { .. }) => (StatusCode::TOO_MANY_REQUESTS, 40300),
            Self::RateLimited(RateError::Tokens { .. } | RateError::OverWholeQuota { .. }) => {
                (StatusCode::TOO_MANY_REQUESTS, 40301)
            }
            Self::Overloaded(_) | Self::Unavailable { .. } | Self::LimitsUnavailable => {
                (StatusCode::SERVICE_UNAVAILABLE, 50004)
            }
            Self::ExtractionFailed { .. } | Self::Internal(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, 50000)
            }
        }
    }

    /// The `reason` of `memex_rejections_total`; `None` for failures of the server itself.
    pub fn rejection(&self) -> Option<Rejection> {
        Some(match self {
            Self::InvalidRequest(_)
            | Self::EmptyInput(_)
            | Self::BodyTimeout { .. }
            | Self::UnsupportedMediaType
            | Self::NotFound
            | Self::MethodNotAllowed => Rejection::Invalid,
            Self::TooManyTokens { .. } | Self::PromptTooLong { .. } | Self::BodyTooLarge { .. } => {
                Rejection::TooLong
            }
            Self::Unauthorized(_) => Rejection::Auth,
            Self::RateLimited(RateError::Requests { .. }) => Rejection::Rate,
            Self::RateLimited(_) => Rejection::Quota,
            Self::Overloaded(
                AdmissionError::WouldMissDeadline { .. }
                | AdmissionError::WouldDelayAccepted { .. }
                | AdmissionError::WouldWaitForSlot { .. },
            ) => Rejection::Deadline,
            Self::Overloaded(AdmissionError::DeadlineExceeded { .. }) => {
                Rejection::DeadlineExceeded
            }
            Self::Overloaded(_) => Rejection::Overloaded,
            Self::Unavailable { .. } => Rejection::NotReady,
            Self::LimitsUnavailable => Rejection::LimitsUnavailable,
            Self::ExtractionFailed { .. } | Self::Internal(_) => return None,
        })
    }

    /// Seconds a client should wait before retrying; set on every 429 and 503.
    pub fn retry_after_secs(&self) -> Option<u64> {
        match self {
            Self::RateLimited(e) => Some(e.retry_after_secs()),
            Self::Overloaded(e) => Some(e.retry_after_secs()),
            Self::Unavailable {
                retry_after_secs, ..
            } => Some(*retry_after_secs),
            Self::LimitsUnavailable => Some(1),
            _ => None,
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        Self::Unauthorized(e)
    }
}

impl From<RateError> for ApiError {
    fn from(e: RateError) -> Self {
        Self::RateLimited(e)
    }
}

impl From<LimitError> for ApiError {
    fn from(e: LimitError) -> Self {
        match e {
            LimitError::Rate(e) => Self::RateLimited(e),
            LimitError::Unavailable => Self::LimitsUnavailable,
        }
    }
}

impl From<AdmissionError> for ApiError {
    fn from(e: AdmissionError) -> Self {
        Self::Overloaded(e)
    }
}

impl From<PipelineError> for ApiError {
    fn from(e: PipelineError) -> Self {
        match e {
            PipelineError::NoMessages | PipelineError::EmptyContent { .. } => {
                Self::EmptyInput(e.to_string())
            }
            PipelineError::NoExtractionTypes | PipelineError::BadChatTime { .. } => {
                Self::InvalidRequest(e.to_string())
            }
            PipelineError::TooManyTokens { counted, limit } => {
                Self::TooManyTokens { counted, limit }
            }
            PipelineError::PromptTooLong {
                branch,
                prompt,
                output,
                context,
            } => Self::PromptTooLong {
                branch: branch.to_string(),
                prompt,
                output,
                context,
            },
            PipelineError::Branch { branch, reason } => Self::ExtractionFailed {
                branch: branch.to_string(),
                reason,
            },
            PipelineError::Tokenizer(_) => Self::Internal("could not count input tokens".into()),
            PipelineError::Language(_) => {
                Self::Internal("could not detect the dialogue's language".into())
            }
            PipelineError::Template(_) => Self::Internal(e.to_string()),
            PipelineError::Prepare(_) => Self::Internal("could not prepare the prompts".into()),
        }
    }
}

/// Characters of a long message kept from its start and from its end.
pub const MESSAGE_HEAD: usize = 200;
pub const MESSAGE_TAIL: usize = 80;

/// `message`, or its head and tail around a note of what was cut when it is long.
pub fn bounded(message: String) -> String {
    let chars = message.chars().count();
    if chars <= MESSAGE_HEAD + MESSAGE_TAIL + 40 {
        return message;
    }
    let head: String = message.chars().take(MESSAGE_HEAD).collect();
    let tail: String = message.chars().skip(chars - MESSAGE_TAIL).collect();
    let cut = chars - MESSAGE_HEAD - MESSAGE_TAIL;
    format!("{head}… ({cut} characters cut) …{tail}")
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let message = bounded(self.to_string());
        // 503s are load shedding, already counted as rejections; only real failures are errors.
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(code, error = %message, "request failed");
        }
        let body = Envelope::<ExtractData> {
            code,
            message: message.clone(),
            data: None,
        };
        let mut response = (status, Json(body)).into_response();
        if let Some(secs) = self.retry_after_secs() {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response.extensions_mut().insert(ErrorOutcome {
            code,
            rejection: self.rejection(),
            message,
        });
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_follow_the_contract() {
        let cases = [
            (ApiError::InvalidRequest("x".into()), 400, 40000),
            (ApiError::EmptyInput("x".into()), 400, 40002),
            (
                ApiError::TooManyTokens {
                    counted: 9000,
                    limit: 8000,
                },
                413,
                40305,
            ),
            (ApiError::BodyTooLarge { limit: 10 }, 413, 40000),
            (ApiError::BodyTimeout { seconds: 1.0 }, 408, 40000),
            (ApiError::UnsupportedMediaType, 415, 40000),
            (ApiError::NotFound, 404, 40000),
            (ApiError::MethodNotAllowed, 405, 40000),
            (
                ApiError::PromptTooLong {
                    branch: "memory".into(),
                    prompt: 8000,
                    output: 900,
                    context: 8192,
                },
                413,
                40305,
            ),
            (
                ApiError::Unavailable {
                    reason: "loading".into(),
                    retry_after_secs: 1,
                },
                503,
                50004,
            ),
            (ApiError::Unauthorized(AuthError::Missing), 401, 40100),
            (ApiError::Unauthorized(AuthError::Malformed), 401, 40100),
            (ApiError::Unauthorized(AuthError::Unknown), 401, 40132),
            (
                ApiError::RateLimited(RateError::Requests {
                    per_second: 1.0,
                    burst: 1,
                    retry_after: std::time::Duration::from_millis(300),
                }),
                429,
                40300,
            ),
            (
                ApiError::RateLimited(RateError::OverWholeQuota {
                    requested: 10,
                    per_minute: 5,
                }),
                429,
                40301,
            ),
            (
                ApiError::Overloaded(AdmissionError::Full {
                    limit: 1,
                    max_queue: 0,
                }),
                503,
                50004,
            ),
            (
                ApiError::Overloaded(AdmissionError::DeadlineExceeded {
                    deadline: std::time::Duration::from_secs(30),
                }),
                503,
                50004,
            ),
            (ApiError::from(LimitError::Unavailable), 503, 50004),
            (
                ApiError::from(LimitError::Rate(RateError::OverWholeQuota {
                    requested: 10,
                    per_minute: 5,
                })),
                429,
                40301,
            ),
            (ApiError::Internal("x".into()), 500, 50000),
        ];
        for (err, status, code) in cases {
            let (s, c) = err.status_and_code();
            assert_eq!((s.as_u16(), c), (status, code), "{err:?}");
        }
    }

    #[test]
    fn every_429_and_503_says_when_to_retry() {
        let errors = [
            ApiError::LimitsUnavailable,
            ApiError::RateLimited(RateError::Tokens {
                requested: 10,
                per_minute: 20,
                retry_after: std::time::Duration::from_millis(1500),
            }),
            ApiError::Overloaded(AdmissionError::TimedOut {
                timeout: std::time::Duration::from_secs(1),
            }),
            ApiError::Overloaded(AdmissionError::WouldMissDeadline {
                predicted: std::time::Duration::from_secs(40),
                deadline: std::time::Duration::from_secs(30),
                retry_after: std::time::Duration::from_millis(13_000),
            }),
            ApiError::Unavailable {
                reason: "draining".into(),
                retry_after_secs: 5,
            },
        ];
        for e in errors {
            let response = e.into_response();
            let secs: u64 = response.headers()[header::RETRY_AFTER]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!(secs >= 1);
        }
    }

    #[test]
    fn long_messages_are_cut_in_the_middle() {
        let quoted = "x".repeat(500_000);
        let msg = bounded(format!(
            "messages: invalid type: string \"{quoted}\", expected a sequence"
        ));
        assert!(msg.chars().count() < 400, "{}", msg.len());
        assert!(msg.starts_with("messages: invalid type: string"));
        assert!(msg.ends_with("expected a sequence"));
        assert_eq!(bounded("short".into()), "short");
        // Cut on characters, never inside one.
        let wide = bounded("界".repeat(1000));
        assert!(wide.contains("characters cut"));
    }

    /// Failures before generation name their stage: not the tokenizer for every one of them,
    /// and not a branch for a template every branch shares.
    #[test]
    fn preparation_failures_name_their_stage() {
        use crate::pipeline::prompt::Prompts;
        use crate::pipeline::schema::OutputLimits;
        use crate::pipeline::types::{InputMessage, Role};
        use crate::pipeline::Extractor;

        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("dialogue.en.j2"),
            "{% for m in messages %}{{ m.content }}\n{% endfor %}\
             {% if messages|length > 1 %}{{ not_given }}{% endif %}",
        )
        .unwrap();
        let prompts = Prompts::new(Some(dir.path())).unwrap();
        let message = |role, content: &str| InputMessage {
            role,
            content: Some(content.into()),
            chat_time: None,
        };
        let messages = vec![
            message(Role::User, "I live in Leeds and I cycle to work."),
            message(Role::Assistant, "Noted."),
        ];
        let err = Extractor::render(Some(messages), None, &OutputLimits::default(), &prompts)
            .unwrap_err();
        let err = ApiError::from(err);
        let (status, code) = err.status_and_code();
        assert_eq!((status.as_u16(), code), (500, 50000));
        let msg = err.to_string();
        assert!(
            msg.contains("prompt template dialogue.en.j2") && !msg.contains("memory"),
            "{msg}"
        );

        let err = ApiError::from(PipelineError::Language("lingua panicked".into()));
        assert_eq!(err.status_and_code().1, 50000);
        assert!(err.to_string().contains("language"), "{err}");
        let err = ApiError::from(PipelineError::Prepare("task panicked".into()));
        assert!(!err.to_string().contains("token"), "{err}");
    }

    #[test]
    fn too_many_tokens_message_gives_count_and_limit() {
        let msg = ApiError::TooManyTokens {
            counted: 8123,
            limit: 8000,
        }
        .to_string();
        assert!(msg.contains("8123") && msg.contains("8000"), "{msg}");
    }
}
