//! The one place where failures become HTTP responses.
//!
//! Every error leaves as OpenAI's shape,
//! `{"error":{"message","type","param","code"}}`, with the status DESIGN.md
//! §5 fixes: 400 invalid request, 401 bad key, 402 insufficient credits,
//! 404 unknown model or route, 413 too large, 429 rate limited, 503 no
//! capacity. A client's mistake is never a 500.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use tessera_backend::JobError;
use tessera_engine::EngineError;

/// An error on its way to the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// What went wrong and what to do about it.
    pub message: String,
    /// OpenAI's `type` (`invalid_request_error`, `server_error`, …).
    pub kind: &'static str,
    /// The request parameter at fault.
    pub param: Option<String>,
    /// A machine-readable code (`model_not_found`, …).
    pub code: Option<&'static str>,
}

/// The JSON body of an error (also sent as an SSE event mid-stream).
#[derive(Serialize)]
pub struct ErrorBody<'a> {
    /// The error itself.
    pub error: ErrorObject<'a>,
}

/// OpenAI's error object.
#[derive(Serialize)]
pub struct ErrorObject<'a> {
    /// What went wrong.
    pub message: &'a str,
    /// The error's type.
    #[serde(rename = "type")]
    pub kind: &'a str,
    /// The parameter at fault.
    pub param: Option<&'a str>,
    /// A machine-readable code.
    pub code: Option<&'a str>,
}

impl ApiError {
    /// 400: the request is malformed or asks for something impossible.
    pub fn invalid(message: impl Into<String>, param: Option<&str>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(str::to_string),
            code: None,
        }
    }

    /// Attach a machine-readable code.
    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// 404 for a model nobody serves.
    pub fn unknown_model(model: &str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: format!("The model '{model}' does not exist or no provider serves it; GET /v1/models lists the models on this network."),
            kind: "invalid_request_error",
            param: Some("model".into()),
            code: Some("model_not_found"),
        }
    }

    /// 404 for a path that is not part of the API.
    pub fn not_found(path: &str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: format!("Unknown path {path}; the API lives under /v1 (POST /v1/chat/completions, POST /v1/completions, GET /v1/models)."),
            kind: "invalid_request_error",
            param: None,
            code: Some("unknown_url"),
        }
    }

    /// 413 for a body over the configured limit.
    pub fn too_large(limit: usize) -> Self {
        Self {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: format!("The request body is larger than the limit of {limit} bytes."),
            kind: "invalid_request_error",
            param: None,
            code: Some("request_too_large"),
        }
    }

    /// 503 when nothing can take the job right now.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: Some("no_capacity"),
        }
    }

    /// 401: no key, or a key that matches no account.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: Some("invalid_api_key"),
        }
    }

    /// 402: the account's credits (`code` = `insufficient_credits`) or its
    /// spending limit (`spend_limit_exceeded`) do not cover the request.
    pub fn payment_required(message: impl Into<String>, code: &'static str) -> Self {
        Self {
            status: StatusCode::PAYMENT_REQUIRED,
            message: message.into(),
            kind: "insufficient_quota",
            param: None,
            code: Some(code),
        }
    }

    /// 429: the key's request rate limit.
    pub fn rate_limited(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: message.into(),
            kind: "rate_limit_error",
            param: None,
            code: Some("rate_limit_exceeded"),
        }
    }

    /// 409: the idempotency key was already used for another request.
    pub fn conflict(message: impl Into<String>, code: &'static str) -> Self {
        Self {
            status: StatusCode::CONFLICT,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: Some(code),
        }
    }

    /// 500: our fault, never the client's.
    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
        }
    }

    /// The JSON body of this error.
    pub fn body(&self) -> ErrorBody<'_> {
        ErrorBody {
            error: ErrorObject {
                message: &self.message,
                kind: self.kind,
                param: self.param.as_deref(),
                code: self.code,
            },
        }
    }
}

impl From<JobError> for ApiError {
    /// The one mapping from what went wrong below the API to HTTP: the
    /// client's mistakes are 400s, missing capacity is a 503, and only our
    /// own faults are 500s.
    fn from(e: JobError) -> Self {
        let message = e.to_string();
        match e {
            JobError::ContextLength { .. } => {
                ApiError::invalid(message, Some("messages")).with_code("context_length_exceeded")
            }
            JobError::BadPrompt(_) => ApiError::invalid(message, None),
            JobError::NoProvider
            | JobError::OverPriceCap
            | JobError::Excluded
            | JobError::Busy
            | JobError::ShuttingDown
            | JobError::Cancelled => ApiError::unavailable(message),
            JobError::Unaffordable => ApiError::payment_required(message, "insufficient_credits"),
            JobError::FailoverExhausted { .. } => {
                ApiError::unavailable(message).with_code("failover_exhausted")
            }
            JobError::Internal(_) => ApiError::internal(message),
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        JobError::from(e).into()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(status = %self.status, message = %self.message, "request failed");
        } else {
            tracing::debug!(status = %self.status, message = %self.message, "request refused");
        }
        (self.status, Json(self.body())).into_response()
    }
}
