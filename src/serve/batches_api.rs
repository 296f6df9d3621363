//! `/v1/batches`: create (queued in creation order), retrieve, list and cancel.

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::HeaderMap;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::input::request::{CHAT_COMPLETIONS_URL, COMPLETIONS_URL, EMBEDDINGS_URL, RESPONSES_URL};
use crate::serve::api::AppState;
use crate::serve::api_error::ApiError;
use crate::serve::batch::{BatchRecord, BatchStatus};
use crate::serve::ids::{is_valid, new_id, IdKind};
use crate::serve::queue::now;

/// The endpoints a batch may target.
const ENDPOINTS: [&str; 4] = [
    CHAT_COMPLETIONS_URL,
    RESPONSES_URL,
    COMPLETIONS_URL,
    EMBEDDINGS_URL,
];
/// OpenAI's limits on `metadata`.
const METADATA_PAIRS: usize = 16;
const METADATA_KEY: usize = 64;
const METADATA_VALUE: usize = 512;
/// `limit` of a list: default and most.
const LIST_DEFAULT: u32 = 20;
const LIST_MAX: u32 = 100;

/// The body of `POST /v1/batches`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBatch {
    input_file_id: Option<Value>,
    endpoint: Option<Value>,
    completion_window: Option<Value>,
    metadata: Option<Value>,
}

fn required_str<'a>(v: &'a Option<Value>, name: &str) -> Result<&'a str, ApiError> {
    match v {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(ApiError::invalid(
            name,
            format!("`{name}` must be a string"),
        )),
        None => Err(ApiError::invalid(
            name,
            format!("missing required parameter `{name}`"),
        )),
    }
}

fn check_metadata(v: Option<Value>) -> Result<Option<Value>, ApiError> {
    let bad = |why: &str| ApiError::invalid("metadata", format!("`metadata` {why}"));
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(map)) => {
            if map.len() > METADATA_PAIRS {
                return Err(bad(&format!("holds at most {METADATA_PAIRS} pairs")));
            }
            for (k, v) in &map {
                let Value::String(s) = v else {
                    return Err(bad(&format!("values must be strings ({k:?} is not)")));
                };
                if k.chars().count() > METADATA_KEY || s.chars().count() > METADATA_VALUE {
                    return Err(bad(&format!(
                        "keys hold at most {METADATA_KEY} characters and values {METADATA_VALUE}"
                    )));
                }
            }
            Ok(Some(Value::Object(map)))
        }
        Some(_) => Err(bad("must be an object of strings")),
    }
}

/// `POST /v1/batches`.
///
/// # Errors
/// 400 for a malformed body, an endpoint not served, a window other than `24h`, or an input
/// file that does not exist or is not for batches.
pub async fn create(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    // JSON only: a page elsewhere cannot send it without the browser asking this server first
    // (which it never allows), so no web page can start a batch here.
    let json = headers
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !json {
        return Err(ApiError::bad_request(
            "send the batch as JSON (Content-Type: application/json)",
        ));
    }
    let req: CreateBatch = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!("the body is not a valid batch request: {e}"))
    })?;
    let endpoint = required_str(&req.endpoint, "endpoint")?.to_owned();
    if !ENDPOINTS.contains(&endpoint.as_str()) {
        return Err(ApiError::invalid(
            "endpoint",
            format!(
                "endpoint {endpoint:?} is not served; use one of {}",
                ENDPOINTS.join(", ")
            ),
        ));
    }
    let window = required_str(&req.completion_window, "completion_window")?;
    if window != "24h" {
        return Err(ApiError::invalid(
            "completion_window",
            format!("completion_window {window:?} is not supported; use \"24h\""),
        ));
    }
    let input_file_id = required_str(&req.input_file_id, "input_file_id")?.to_owned();
    let metadata = check_metadata(req.metadata)?;
    let shown = input_file_id.clone();
    let unknown_input = move || {
        ApiError::invalid(
            "input_file_id",
            format!("no such file: {shown:?}; upload it first (POST /v1/files)"),
        )
    };
    if !is_valid(IdKind::File, &input_file_id) {
        return Err(unknown_input());
    }
    let batch = state
        .blocking(move |s| {
            let file = s.store.file(&input_file_id)?.ok_or_else(unknown_input)?;
            if file.purpose != "batch" {
                return Err(ApiError::invalid(
                    "input_file_id",
                    format!(
                        "file {input_file_id} has purpose {:?}, not \"batch\"",
                        file.purpose
                    ),
                ));
            }
            let id = new_id(IdKind::Batch).map_err(anyhow::Error::from)?;
            let folder = s.dir.batch(&id);
            std::fs::create_dir_all(&folder).map_err(anyhow::Error::from)?;
            // The batch's own link to its input: deleting the file later cannot disturb it.
            let input = folder.join("input.jsonl");
            if std::fs::hard_link(s.dir.file(&file.id), &input).is_err() {
                std::fs::copy(s.dir.file(&file.id), &input).map_err(anyhow::Error::from)?;
            }
            let batch = BatchRecord::new(id, endpoint, file.id, metadata, now());
            s.store.insert_batch(&batch)?;
            // The record as created: the queue may start it before a read-back could run.
            Ok(batch)
        })
        .await?;
    state.queue.ring();
    Ok(Json(to_value(&batch)))
}

fn to_value(b: &BatchRecord) -> Value {
    serde_json::to_value(b.object()).unwrap_or(Value::Null)
}

async fn find(state: &AppState, id: String) -> Result<BatchRecord, ApiError> {
    if !is_valid(IdKind::Batch, &id) {
        return Err(ApiError::not_found("batch", &id));
    }
    state
        .blocking(move |s| {
            s.store
                .batch(&id)?
                .ok_or_else(|| ApiError::not_found("batch", &id))
        })
        .await
}

/// `GET /v1/batches/{id}`.
///
/// # Errors
/// 404 for an unknown id.
pub async fn retrieve(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(to_value(&find(&state, id).await?)))
}

/// `?after=&limit=` of `GET /v1/batches`.
#[derive(Debug, Deserialize)]
pub struct ListQuery {
    after: Option<String>,
    limit: Option<String>,
}

/// `GET /v1/batches`: newest first, a page after the batch `after`.
///
/// # Errors
/// 400 for a `limit` outside 1..=100.
pub async fn list(
    State(state): State<AppState>,
    Query(q): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = match q.limit.as_deref() {
        None => LIST_DEFAULT,
        Some(l) => l
            .parse()
            .ok()
            .filter(|n| (1..=LIST_MAX).contains(n))
            .ok_or_else(|| {
                ApiError::invalid("limit", format!("`limit` must be 1 to {LIST_MAX}"))
            })?,
    };
    if let Some(after) = &q.after {
        if !is_valid(IdKind::Batch, after) {
            return Err(ApiError::invalid("after", "`after` must be a batch id"));
        }
    }
    let (batches, more) = state
        .blocking(move |s| Ok(s.store.batches(q.after.as_deref(), limit)?))
        .await?;
    let data: Vec<_> = batches.iter().map(to_value).collect();
    let mut page = Map::new();
    page.insert("object".into(), "list".into());
    page.insert("first_id".into(), json!(batches.first().map(|b| &b.id)));
    page.insert("last_id".into(), json!(batches.last().map(|b| &b.id)));
    page.insert("has_more".into(), more.into());
    page.insert("data".into(), data.into());
    Ok(Json(Value::Object(page)))
}

/// `POST /v1/batches/{id}/cancel`: a queued or running batch becomes `cancelling`, then
/// `cancelled` once the engine has stopped; what it finished is kept.
///
/// # Errors
/// 404 for an unknown id; 409 for a batch that has ended or is finalizing.
pub async fn cancel(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let batch = find(&state, id).await?;
    let batch = state
        .blocking(move |s| {
            use BatchStatus::*;
            let moved =
                s.store
                    .transition(&batch.id, &[Validating, InProgress], Cancelling, now())?;
            let now = s.store.batch(&batch.id)?.unwrap_or(batch);
            if !moved && now.status != Cancelling {
                return Err(ApiError::conflict(format!(
                    "batch {} is {} and cannot be cancelled",
                    now.id,
                    now.status.as_str()
                )));
            }
            Ok(now)
        })
        .await?;
    state.queue.ring();
    Ok(Json(to_value(&batch)))
}
