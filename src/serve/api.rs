//! The routes, the shared state, the key check and the limits every request passes through.
//! Handlers are thin: they check what they are given, call the store or the queue, and map
//! the result; the database runs on tokio's blocking pool.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use subtle::ConstantTimeEq;
use tower_http::timeout::TimeoutLayer;

use crate::serve::api_error::ApiError;
use crate::serve::layout::DataDir;
use crate::serve::queue::QueueSignals;
use crate::serve::store::Store;
use crate::serve::{batches_api, files_api, page};

/// The largest JSON body any endpoint but the upload takes.
const JSON_BODY_LIMIT: usize = 1 << 20;
/// Room for the multipart framing around an upload's bytes.
const MULTIPART_SLACK: u64 = 1 << 20;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    /// The database.
    pub store: Store,
    /// The data directory.
    pub dir: DataDir,
    /// The queue's bell and its running batch.
    pub queue: Arc<QueueSignals>,
    /// The largest upload, in bytes.
    pub max_upload: u64,
    /// The SHA-256 of the API key, when one is required (digests compare in constant time
    /// whatever the key's length).
    pub key: Option<[u8; 32]>,
}

impl AppState {
    /// Runs `f` on the blocking pool (SQLite and file work), mapping its failure to a 500.
    ///
    /// # Errors
    /// What `f` returns, or a 500 when the task itself failed.
    pub async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Self) -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || f(&me))
            .await
            .map_err(|e| ApiError::internal(&anyhow::anyhow!("blocking task: {e}")))?
    }
}

/// The whole API, with its key check, body limits and request timeout.
pub fn router(state: AppState, timeout: Duration) -> Router {
    let upload_limit =
        usize::try_from(state.max_upload.saturating_add(MULTIPART_SLACK)).unwrap_or(usize::MAX);
    Router::new()
        .route("/", get(page::status_page))
        .route(
            "/v1/files",
            post(files_api::upload)
                .layer(DefaultBodyLimit::max(upload_limit))
                .get(files_api::list),
        )
        .route(
            "/v1/files/{id}",
            get(files_api::retrieve).delete(files_api::delete),
        )
        .route("/v1/files/{id}/content", get(files_api::content))
        .route(
            "/v1/batches",
            post(batches_api::create).get(batches_api::list),
        )
        .route("/v1/batches/{id}", get(batches_api::retrieve))
        .route("/v1/batches/{id}/cancel", post(batches_api::cancel))
        .fallback(|req: Request| async move { ApiError::no_route(req.uri().path()) })
        .layer(DefaultBodyLimit::max(JSON_BODY_LIMIT))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_key,
        ))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            timeout,
        ))
        .layer(axum::middleware::map_response(errors_in_openai_shape))
        .with_state(state)
}

/// With a key set, every request carries `Authorization: Bearer KEY`, compared in constant
/// time. Without one (loopback only), the `Host` must name this machine: a web page that
/// rebinds its own name to 127.0.0.1 cannot reach the API from a browser.
async fn require_key(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let Some(key) = &state.key else {
        let host = req.headers().get(HOST).and_then(|h| h.to_str().ok());
        if !host.is_some_and(is_local_host) {
            return ApiError::forbidden(
                "the Host header does not name this machine (localhost, 127.0.0.1 or [::1]); \
                 a server for other hosts needs --api-key-file",
            )
            .into_response();
        }
        return next.run(req).await;
    };
    let given = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
    match given {
        None => ApiError::unauthorized(
            "no API key: send it as 'Authorization: Bearer KEY' (this server has --api-key-file)",
        )
        .into_response(),
        Some(given) if bool::from(crate::digest::sha256(given).ct_eq(key)) => next.run(req).await,
        Some(_) => ApiError::unauthorized("incorrect API key").into_response(),
    }
}

/// `localhost`, `127.0.0.1` or `[::1]`, with or without a port.
pub fn is_local_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    matches!(name, "localhost" | "127.0.0.1" | "::1")
}

/// Errors that axum or tower write themselves (a timeout, a body over the limit, a bad path
/// or query, a wrong method) come back as plain text: give them the API's error body.
async fn errors_in_openai_shape(res: Response) -> Response {
    let status = res.status();
    let is_json = res
        .headers()
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return res;
    }
    if status == StatusCode::REQUEST_TIMEOUT {
        return ApiError::timeout().into_response();
    }
    let body = axum::body::to_bytes(res.into_body(), 4096)
        .await
        .unwrap_or_default();
    let message = String::from_utf8_lossy(&body).trim().to_owned();
    ApiError::plain(status, message).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_names_of_this_machine_are_local() {
        for ok in [
            "localhost",
            "localhost:8080",
            "127.0.0.1:1",
            "[::1]:8080",
            "[::1]",
        ] {
            assert!(is_local_host(ok), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:8080",
            "127.0.0.1.evil:80",
            "[::2]:1",
            "",
        ] {
            assert!(!is_local_host(bad), "{bad}");
        }
    }
}
