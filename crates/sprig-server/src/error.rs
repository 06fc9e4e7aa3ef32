//! Errors in OpenAI's JSON shape (`{"error": {"message", "type", "param", "code"}}`) with the HTTP status
//! OpenAI gives them.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use sprig_engine::EngineError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into(), kind, param: None, code: None }
    }
    /// 400: the request is malformed or asks for something impossible.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }
    /// 400 about one parameter.
    pub fn param(param: &str, message: impl Into<String>) -> Self {
        ApiError { param: Some(param.into()), ..Self::invalid(message) }
    }
    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "invalid_request_error", message)
    }
    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "missing or incorrect API key: send it as `Authorization: Bearer KEY`",
        )
        .with_code("invalid_api_key")
    }
    pub fn busy() -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", "the server is at capacity: too many requests queued; retry later")
            .with_code("server_busy")
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    pub fn body(&self) -> serde_json::Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

/// An engine error: the request's fault (400) or the server's (500, 503 for memory).
impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        let message = e.to_string();
        match &e {
            _ if e.is_context_overflow() => ApiError::invalid(message).with_code("context_length_exceeded"),
            EngineError::Sampling { param, .. } => ApiError::param(param, message),
            EngineError::Constraint { .. } => ApiError::param("response_format", message),
            EngineError::Tools(_) => ApiError::param("tools", message),
            EngineError::Template(_) | EngineError::NoChatTemplate | EngineError::EmptyPrompt | EngineError::Tokenizer(_) => {
                ApiError::invalid(message)
            }
            EngineError::MemoryBudget(_) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message),
            _ => ApiError::internal(message),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = self.body().to_string();
        (self.status, [(axum::http::header::CONTENT_TYPE, "application/json")], body).into_response()
    }
}
