//! `/v1/files`: uploads streamed to disk under a size limit, listing, retrieval, content and
//! deletion.

use axum::body::Body;
use axum::extract::multipart::{Field, MultipartError, MultipartRejection};
use axum::extract::{Multipart, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

use crate::serve::api::AppState;
use crate::serve::api_error::ApiError;
use crate::serve::ids::{is_valid, new_id, IdKind};
use crate::serve::queue::now;
use crate::serve::store::FileRecord;

/// The one purpose a client may upload for.
const BATCH_PURPOSE: &str = "batch";

/// The `file` object.
pub fn file_object(f: &FileRecord) -> Value {
    json!({
        "id": f.id,
        "object": "file",
        "bytes": f.bytes,
        "created_at": f.created_at,
        "filename": f.filename,
        "purpose": f.purpose,
        "status": "processed",
        "expires_at": null,
        "status_details": null,
    })
}

/// An upload being written: a named temporary file in `uploads/`, removed unless it is kept.
struct Incoming {
    tmp: tempfile::NamedTempFile,
    filename: String,
    bytes: u64,
}

/// `POST /v1/files`: multipart with `purpose=batch` and `file`.
///
/// # Errors
/// 400 for malformed multipart, a wrong or missing purpose or no file; 413 over the limit.
pub async fn upload(
    State(state): State<AppState>,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<Json<Value>, ApiError> {
    let mut multipart = multipart.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let mut purpose = None;
    let mut incoming = None;
    while let Some(field) = multipart
        .next_field()
        .await
        .map_err(|e| multipart_error(e, state.max_upload))?
    {
        match field.name() {
            Some("purpose") => purpose = Some(small_text(field, state.max_upload).await?),
            Some("file") => incoming = Some(receive(&state, field).await?),
            Some(other) => {
                return Err(ApiError::invalid(
                    other,
                    format!("unknown field {other:?}: a file upload takes `purpose` and `file`"),
                ))
            }
            None => return Err(ApiError::bad_request("a multipart field has no name")),
        }
    }
    match purpose.as_deref() {
        Some(BATCH_PURPOSE) => {}
        Some(p) => {
            return Err(ApiError::invalid(
                "purpose",
                format!("purpose {p:?} is not served here: upload with purpose \"batch\""),
            ))
        }
        None => {
            return Err(ApiError::invalid(
                "purpose",
                "missing `purpose` (\"batch\")",
            ))
        }
    }
    let incoming =
        incoming.ok_or_else(|| ApiError::invalid("file", "missing `file`: the JSONL to upload"))?;
    let record = state
        .blocking(move |s| {
            let id = new_id(IdKind::File).map_err(anyhow::Error::from)?;
            let record = FileRecord {
                id: id.clone(),
                bytes: incoming.bytes,
                created_at: now(),
                filename: incoming.filename,
                purpose: BATCH_PURPOSE.into(),
            };
            incoming
                .tmp
                .as_file()
                .sync_all()
                .map_err(anyhow::Error::from)?;
            incoming
                .tmp
                .persist(s.dir.file(&id))
                .map_err(|e| anyhow::Error::from(e.error))?;
            s.store.insert_file(&record)?;
            Ok(record)
        })
        .await?;
    Ok(Json(file_object(&record)))
}

/// The longest `purpose` read; anything longer is no purpose we know.
const PURPOSE_BYTES: usize = 64;
/// Past the limit, the rest of an upload is read and dropped, up to this much, so that the
/// client reads the 413 instead of a reset connection.
const DRAIN_BYTES: u64 = 64 << 20;

/// A short text field, read piece by piece and cut off early.
async fn small_text(mut field: Field<'_>, limit: u64) -> Result<String, ApiError> {
    let mut text = Vec::new();
    while let Some(chunk) = field.chunk().await.map_err(|e| multipart_error(e, limit))? {
        text.extend_from_slice(&chunk);
        if text.len() > PURPOSE_BYTES {
            return Err(ApiError::invalid(
                "purpose",
                "`purpose` is too long: use \"batch\"",
            ));
        }
    }
    String::from_utf8(text).map_err(|_| ApiError::invalid("purpose", "`purpose` is not UTF-8"))
}

/// Streams one `file` field to a temporary file, refusing it past the limit.
async fn receive(state: &AppState, mut field: Field<'_>) -> Result<Incoming, ApiError> {
    let filename = field.file_name().unwrap_or("upload.jsonl").to_owned();
    let tmp = tempfile::NamedTempFile::new_in(state.dir.uploads())
        .map_err(|e| ApiError::internal(&e.into()))?;
    let mut out =
        tokio::fs::File::from_std(tmp.reopen().map_err(|e| ApiError::internal(&e.into()))?);
    let mut bytes = 0u64;
    while let Some(chunk) = field
        .chunk()
        .await
        .map_err(|e| multipart_error(e, state.max_upload))?
    {
        bytes += chunk.len() as u64;
        if bytes > state.max_upload {
            // Dropping `tmp` removes what was written.
            drop(out);
            drop(tmp);
            let mut drained = 0u64;
            while let Ok(Some(chunk)) = field.chunk().await {
                drained += chunk.len() as u64;
                if drained > DRAIN_BYTES {
                    break;
                }
            }
            return Err(ApiError::too_large(state.max_upload));
        }
        out.write_all(&chunk)
            .await
            .map_err(|e| ApiError::internal(&e.into()))?;
    }
    out.flush()
        .await
        .map_err(|e| ApiError::internal(&e.into()))?;
    Ok(Incoming {
        tmp,
        filename,
        bytes,
    })
}

fn multipart_error(e: MultipartError, limit: u64) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::too_large(limit)
    } else {
        ApiError::bad_request(format!("malformed multipart body: {}", e.body_text()))
    }
}

/// `?purpose=` of `GET /v1/files`.
#[derive(Debug, Deserialize)]
pub struct ListQuery {
    purpose: Option<String>,
}

/// `GET /v1/files`: every file, newest first.
///
/// # Errors
/// 500 on a database error.
pub async fn list(
    State(state): State<AppState>,
    Query(q): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let files = state
        .blocking(move |s| Ok(s.store.files(q.purpose.as_deref())?))
        .await?;
    let data: Vec<_> = files.iter().map(file_object).collect();
    Ok(Json(
        json!({"object": "list", "data": data, "has_more": false}),
    ))
}

/// The file `id`, or 404 (also for an id that is not one of ours at all).
async fn find(state: &AppState, id: String) -> Result<FileRecord, ApiError> {
    if !is_valid(IdKind::File, &id) {
        return Err(ApiError::not_found("file", &id));
    }
    state
        .blocking(move |s| {
            s.store
                .file(&id)?
                .ok_or_else(|| ApiError::not_found("file", &id))
        })
        .await
}

/// `GET /v1/files/{id}`.
///
/// # Errors
/// 404 for an unknown id.
pub async fn retrieve(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(file_object(&find(&state, id).await?)))
}

/// `GET /v1/files/{id}/content`: the bytes, streamed.
///
/// # Errors
/// 404 for an unknown id.
pub async fn content(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let record = find(&state, id).await?;
    let file = tokio::fs::File::open(state.dir.file(&record.id))
        .await
        .map_err(|e| ApiError::internal(&e.into()))?;
    let body = Body::from_stream(tokio_util::io::ReaderStream::new(file));
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
            (header::CONTENT_LENGTH, record.bytes.to_string()),
        ],
        body,
    )
        .into_response())
}

/// `DELETE /v1/files/{id}`. Batches keep their own link to their input, so deleting a file
/// never disturbs one.
///
/// # Errors
/// 404 for an unknown id.
pub async fn delete(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let record = find(&state, id).await?;
    let id = record.id.clone();
    state
        .blocking(move |s| {
            s.store.delete_file(&id)?;
            match std::fs::remove_file(s.dir.file(&id)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(ApiError::internal(&e.into()))
                }
                _ => Ok(()),
            }
        })
        .await?;
    Ok(Json(
        json!({"id": record.id, "object": "file", "deleted": true}),
    ))
}
