//! Every error a client can get, and its (HTTP status, contract code), in one place.
//!
//! Lower layers have their own error enums; they are converted here, once, at the HTTP edge.
//! Messages are for people: they say what to change, and never carry an internal path or a
//! backtrace (500s say which stage failed, not how).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::api::types::{Envelope, ExtractData};
use crate::pipeline::PipelineError;

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
    #[error("request body is over the limit of {limit} bytes")]
    BodyTooLarge { limit: usize },
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
            Self::TooManyTokens { .. } => (StatusCode::PAYLOAD_TOO_LARGE, 40305),
            Self::BodyTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, 40000),
            Self::Unavailable { .. } => (StatusCode::SERVICE_UNAVAILABLE, 50004),
            Self::ExtractionFailed { .. } | Self::Internal(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, 50000)
            }
        }
    }
}

impl From<PipelineError> for ApiError {
    fn from(e: PipelineError) -> Self {
        match e {
            PipelineError::NoMessages | PipelineError::EmptyContent { .. } => {
                Self::EmptyInput(e.to_string())
            }
            PipelineError::NoExtractionTypes => Self::InvalidRequest(e.to_string()),
            PipelineError::TooManyTokens { counted, limit } => {
                Self::TooManyTokens { counted, limit }
            }
            PipelineError::Branch { branch, reason } => Self::ExtractionFailed {
                branch: branch.to_string(),
                reason,
            },
            PipelineError::Tokenizer(_) => Self::Internal("could not count input tokens".into()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        if status.is_server_error() {
            tracing::error!(code, error = %self, "request failed");
        }
        let retry_after = match &self {
            Self::Unavailable {
                retry_after_secs, ..
            } => Some(*retry_after_secs),
            _ => None,
        };
        let body = Envelope::<ExtractData> {
            code,
            message: self.to_string(),
            data: None,
        };
        let mut response = (status, Json(body)).into_response();
        if let Some(secs) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
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
            (
                ApiError::Unavailable {
                    reason: "loading".into(),
                    retry_after_secs: 1,
                },
                503,
                50004,
            ),
            (ApiError::Internal("x".into()), 500, 50000),
        ];
        for (err, status, code) in cases {
            let (s, c) = err.status_and_code();
            assert_eq!((s.as_u16(), c), (status, code), "{err:?}");
        }
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
