//! The one place where failures become HTTP: OpenAI's error shape with the right status.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use splitserve_engine::EngineError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{message}")]
    BadRequest {
        message: String,
        param: Option<&'static str>,
    },
    #[error("The model `{0}` does not exist.")]
    ModelNotFound(String),
    #[error("{0}")]
    Overloaded(String),
    #[error("{0}")]
    Internal(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    NotFound(String),
    /// A peer's KV does not fit ours (fingerprints differ).
    #[error("{0}")]
    Conflict(String),
    /// A peer (the KV producer) failed or refused us.
    #[error("{0}")]
    BadGateway(String),
    /// Allowed to nobody who asks this way (a migration target off the allow-list).
    #[error("{0}")]
    Forbidden(String),
}

/// OpenAI's error body, `{"error": {"message", "type", "param", "code"}}`: the one shape of
/// every error the server and the router send (a response's body, or an SSE error event).
pub fn error_body(
    kind: &str,
    message: &str,
    param: Option<&str>,
    code: Option<&str>,
) -> serde_json::Value {
    serde_json::json!({"error": {"message": message, "type": kind, "param": param, "code": code}})
}

impl ApiError {
    pub fn bad(message: impl Into<String>, param: Option<&'static str>) -> Self {
        ApiError::BadRequest {
            message: message.into(),
            param,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::ModelNotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Overloaded(_) | ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::BadGateway(_) => StatusCode::BAD_GATEWAY,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
        }
    }

    /// OpenAI's `type` field.
    pub fn kind(&self) -> &'static str {
        match self {
            ApiError::BadRequest { .. } => "invalid_request_error",
            ApiError::ModelNotFound(_) => "invalid_request_error",
            ApiError::Overloaded(_) | ApiError::Unavailable(_) => "service_unavailable",
            ApiError::Internal(_) => "internal_error",
            ApiError::BadGateway(_) | ApiError::Conflict(_) => "kv_transfer_error",
            ApiError::NotFound(_) => "invalid_request_error",
            ApiError::Forbidden(_) => "permission_error",
        }
    }

    fn code(&self) -> Option<&'static str> {
        match self {
            ApiError::ModelNotFound(_) => Some("model_not_found"),
            ApiError::Overloaded(_) => Some("overloaded"),
            ApiError::NotFound(_) => Some("not_found"),
            _ => None,
        }
    }

    fn param(&self) -> Option<&'static str> {
        match self {
            ApiError::BadRequest { param, .. } => *param,
            ApiError::ModelNotFound(_) => Some("model"),
            _ => None,
        }
    }

    /// The JSON body alone (also sent as an SSE error event mid-stream).
    pub fn body_json(&self) -> serde_json::Value {
        error_body(self.kind(), &self.to_string(), self.param(), self.code())
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::EmptyPrompt => ApiError::bad(e.to_string(), Some("prompt")),
            EngineError::TooLong { .. } => ApiError::bad(e.to_string(), Some("max_tokens")),
            EngineError::BadTokenId { .. } => ApiError::bad(e.to_string(), Some("prompt")),
            EngineError::BadParam { param, .. } => ApiError::bad(e.to_string(), Some(param)),
            EngineError::Overloaded { .. } => ApiError::Overloaded(format!("{e}; retry later")),
            EngineError::DuplicateId(_) => ApiError::bad(e.to_string(), None),
            EngineError::NotFound(_) => ApiError::NotFound(e.to_string()),
            EngineError::NoFreeBlocks { .. } => ApiError::Unavailable(e.to_string()),
            EngineError::KvTransfer(_) => ApiError::BadGateway(e.to_string()),
            EngineError::Stopped
            | EngineError::Internal(_)
            | EngineError::KvMismatch(_)
            | EngineError::BadConfig { .. } => ApiError::Internal(e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status(), Json(self.body_json())).into_response();
        if matches!(self, ApiError::Overloaded(_)) {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}
