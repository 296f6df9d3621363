//! The one error every handler returns, written in OpenAI's shape
//! (`{"error": {"message", "type", "param", "code"}}`) with the status codes the SDK maps to
//! its exceptions.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

/// An API error.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    code: Option<&'static str>,
    param: Option<String>,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            code: None,
            param: None,
            message: message.into(),
        }
    }

    /// 400: the request is wrong in `param`.
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self {
            param: Some(param.into()),
            ..Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
        }
    }

    /// 400 with no one field at fault.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// 404: no `what` with this id.
    pub fn not_found(what: &str, id: &str) -> Self {
        let shown: String = id.chars().take(64).collect();
        Self {
            code: Some("not_found"),
            ..Self::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                format!("No such {what}: {shown:?}"),
            )
        }
    }

    /// 404 for a path the API does not have.
    pub fn no_route(path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("Unknown request URL: {path}"),
        )
    }

    /// 403: the request may not be served here.
    pub fn forbidden(message: &str) -> Self {
        Self::new(StatusCode::FORBIDDEN, "invalid_request_error", message)
    }

    /// Any status, with the message axum or tower gave it.
    pub fn plain(status: StatusCode, message: String) -> Self {
        let kind = if status.is_server_error() {
            "server_error"
        } else {
            "invalid_request_error"
        };
        let message = if message.is_empty() {
            status.canonical_reason().unwrap_or("error").to_owned()
        } else {
            message
        };
        Self::new(status, kind, message)
    }

    /// 409: the object is not in a state that allows this.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "invalid_request_error", message)
    }

    /// 413: the upload is over the limit.
    pub fn too_large(limit: u64) -> Self {
        Self {
            code: Some("file_too_large"),
            param: Some("file".into()),
            ..Self::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                format!("the file is larger than this server's limit of {limit} bytes (--max-upload-bytes)"),
            )
        }
    }

    /// 401: no key, or the wrong one.
    pub fn unauthorized(message: &str) -> Self {
        Self {
            code: Some("invalid_api_key"),
            ..Self::new(StatusCode::UNAUTHORIZED, "invalid_request_error", message)
        }
    }

    /// 408: the client was too slow.
    pub fn timeout() -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            "the request took longer than this server allows (--request-timeout)",
        )
    }

    /// 500: our fault; logged, and the client gets no details of the disk.
    pub fn internal(e: &anyhow::Error) -> Self {
        tracing::error!("request failed: {e:#}");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "the server failed to handle this request; its log says why",
        )
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        Self::internal(&e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }});
        // The SDK retries 408, 409 and 5xx unless told otherwise; only our own failures and
        // timeouts are worth a retry.
        let retry = if self.status.is_server_error() || self.status == StatusCode::REQUEST_TIMEOUT {
            "true"
        } else {
            "false"
        };
        (self.status, [("x-should-retry", retry)], Json(body)).into_response()
    }
}
