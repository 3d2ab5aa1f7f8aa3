//! The API's one error type and its JSON form (ARCHITECTURE.md, "The API"): every failure is
//! `{ "success": false, "error": "<sentence>", "code": "<snake_case>", "details"?: … }` with the status that
//! fits (400 bad input, 401/403 credentials, 404 unknown or not yours, 409 state conflicts, 413 too large,
//! 415 not JSON, 429 too many with `Retry-After`, 503 a dependency down).
//!
//! A 5xx says nothing internal: the reply names only the request id; the cause travels in the response's
//! extensions to the request-id middleware (`api::layers`), which logs it once with that id. Converting an
//! error is thus free of side effects, as in axum's `error-handling` example.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

use crate::intake::IntakeError;
use crate::queue::QueueError;
use crate::source::SourceError;
use crate::store::StoreError;

/// The JSON body of every error reply.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ErrorBody {
    /// Always `false`.
    pub success: bool,
    /// A sentence for a person: what was wrong and where.
    pub error: String,
    /// A stable machine-readable code, snake_case.
    pub code: String,
    /// Structured facts (the field at fault, the pipelines available, …), when there are any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<Value>,
}

/// The cause of a 5xx, carried in the response's extensions for the logging middleware; never sent.
#[derive(Debug, Clone)]
pub struct InternalCause(pub String);

/// An error the API answers with.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// The machine code.
    pub code: &'static str,
    /// The sentence sent to the caller (for a 5xx, a generic one).
    pub message: String,
    /// What less common replies carry (boxed, so that `Result<_, ApiError>` stays small).
    extra: Box<Extra>,
}

/// The optional parts of an [`ApiError`].
#[derive(Debug, Clone, Default)]
struct Extra {
    /// Structured facts for the caller.
    details: Option<Value>,
    /// Seconds for `Retry-After` (429, 503).
    retry_after: Option<u64>,
    /// What really happened, for the log only (5xx).
    cause: Option<String>,
}

impl ApiError {
    /// An error with a status, a code and a sentence.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into(), extra: Box::default() }
    }

    /// The structured details, if any.
    pub fn details(&self) -> Option<&Value> {
        self.extra.details.as_ref()
    }

    /// The `Retry-After` seconds, if any.
    pub fn retry_after(&self) -> Option<u64> {
        self.extra.retry_after
    }

    /// Adds structured details.
    #[must_use]
    pub fn with_details(mut self, details: Value) -> Self {
        self.extra.details = Some(details);
        self
    }

    /// Adds `Retry-After`.
    #[must_use]
    pub fn with_retry_after(mut self, seconds: u64) -> Self {
        self.extra.retry_after = Some(seconds.max(1));
        self
    }

    /// 400 with a code.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 404 with a code.
    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }

    /// 409 with a code.
    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }

    /// 500: the cause is logged, never sent.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        let mut error = Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "the server failed to handle this request; the X-Request-Id header of this reply identifies it in the \
             server's log",
        );
        error.extra.cause = Some(cause.to_string());
        error
    }

    /// 503: a dependency does not answer; the cause is logged, never sent.
    pub fn unavailable(what: &str, cause: impl std::fmt::Display) -> Self {
        let mut error = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            format!("the {what} does not answer; try again shortly"),
        )
        .with_retry_after(5);
        error.extra.cause = Some(cause.to_string());
        error
    }

    /// The JSON body.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            success: false,
            error: self.message.clone(),
            code: self.code.to_string(),
            details: self.extra.details.clone(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body())).into_response();
        if let Some(seconds) = self.extra.retry_after
            && let Ok(value) = HeaderValue::from_str(&seconds.to_string())
        {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(cause) = self.extra.cause {
            response.extensions_mut().insert(InternalCause(cause));
        }
        response
    }
}

impl From<QueueError> for ApiError {
    fn from(error: QueueError) -> Self {
        match &error {
            QueueError::NotFound(id) => Self::not_found("job_not_found", format!("no job with id `{id}`")),
            QueueError::WrongState { .. } => Self::conflict("wrong_state", error.to_string()),
            QueueError::Invalid(message) => Self::bad_request("invalid_request", message.clone()),
            QueueError::Unavailable(_) => Self::unavailable("queue", &error),
            QueueError::LeaseLost(_) | QueueError::Corrupt { .. } => Self::internal(&error),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match &error {
            StoreError::NotFound(id) => Self::not_found("recording_not_found", format!("no recording with id `{id}`")),
            StoreError::Refused(message) => Self::conflict("wrong_state", message.clone()),
            StoreError::Database { .. } => Self::unavailable("database", &error),
            StoreError::Config(_) => Self::internal(&error),
        }
    }
}

impl From<IntakeError> for ApiError {
    fn from(error: IntakeError) -> Self {
        match error {
            IntakeError::UnknownPipeline(unknown) => Self::not_found("pipeline_not_found", unknown.to_string())
                .with_details(serde_json::json!({
                    "pipeline": unknown.name,
                    "available": unknown.known,
                    "suggestion": unknown.suggestion,
                })),
            IntakeError::Priority(_) => Self::bad_request("invalid_field", error.to_string())
                .with_details(serde_json::json!({ "field": "priority" })),
            IntakeError::Source(SourceError::Refused { source_text, reason }) => {
                Self::bad_request("source_refused", format!("fileUrl `{source_text}` refused: {reason}"))
                    .with_details(serde_json::json!({ "field": "fileUrl", "reason": reason }))
            }
            IntakeError::Source(other) => Self::bad_request("source_refused", format!("fileUrl refused: {other}")),
            IntakeError::UnknownRecording(_) => Self::not_found("recording_not_found", error.to_string()),
            IntakeError::NoSource(_) => Self::bad_request("missing_field", error.to_string())
                .with_details(serde_json::json!({ "field": "fileUrl" })),
            IntakeError::Definition(error) => Self::internal(&error),
            IntakeError::Store(error) => error.into(),
            IntakeError::Queue(error) => error.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_5xx_hides_its_cause_and_a_4xx_says_what_was_wrong() {
        let response = ApiError::internal("password=hunter2 in a driver error").into_response();
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let cause = response.extensions().get::<InternalCause>().expect("the cause travels for the log");
        assert!(cause.0.contains("hunter2"));
        let body = ApiError::internal("hunter2").body();
        assert!(!serde_json::to_string(&body).unwrap().contains("hunter2"));
        assert_eq!(body.code, "internal_error");

        let error: ApiError = QueueError::NotFound("j1".into()).into();
        assert_eq!((error.status, error.code), (StatusCode::NOT_FOUND, "job_not_found"));
        let error: ApiError = QueueError::Unavailable("connection refused".into()).into();
        assert_eq!(error.status, StatusCode::SERVICE_UNAVAILABLE);
        let response = error.into_response();
        assert_eq!(response.headers()[header::RETRY_AFTER], "5");
        assert!(!response.extensions().get::<InternalCause>().unwrap().0.is_empty());
    }
}
