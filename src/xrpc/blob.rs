//! Blob methods: `repo.uploadBlob`, `sync.getBlob`, `sync.listBlobs`,
//! `repo.listMissingBlobs`.

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::header::{ACCEPT_RANGES, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, RANGE};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::error::{XrpcError, XrpcResult};
use super::extract::{Access, XrpcQuery};
use super::repo::{local_account, parse_limit};
use crate::app::AppState;
use crate::blobs::BlobError;

impl From<BlobError> for XrpcError {
    fn from(e: BlobError) -> Self {
        match e {
            BlobError::TooLarge(limit) => {
                XrpcError::payload_too_large(format!("Blob is larger than the limit of {limit} bytes"))
            }
            BlobError::Body(m) => XrpcError::invalid_request(m),
            BlobError::RangeNotSatisfiable { .. } => XrpcError::invalid_request("Range Not Satisfiable"),
            BlobError::Missing { .. } => {
                tracing::warn!(error = %e, "a blob's bytes are missing from its store");
                XrpcError::lexicon("BlobNotFound", "Blob not found")
            }
            BlobError::Internal(e) => XrpcError::internal(e),
        }
    }
}

/// # `com.atproto.repo.uploadBlob`
pub async fn upload_blob(
    State(state): State<AppState>,
    auth: Access,
    headers: HeaderMap,
    body: Body,
) -> XrpcResult<Json<Value>> {
    if let Some(len) = headers.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok()) {
        // Refuse early when the client says up front that it is too big.
        if len > state.blobs.upload_limit {
            return Err(BlobError::TooLarge(state.blobs.upload_limit).into());
        }
    }
    let declared = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok());
    let row = state.blobs.upload(&auth.did, declared, body).await?;
    Ok(Json(json!({
        "blob": {
            "$type": "blob",
            "ref": { "$link": row.cid },
            "mimeType": row.mime_type,
            "size": row.size,
        }
    })))
}

#[derive(Deserialize)]
pub struct GetBlobParams {
    did: String,
    cid: String,
}

/// Parses `Range: bytes=a-b` / `bytes=a-` (one range; others are ignored).
fn parse_range(headers: &HeaderMap) -> Option<(u64, Option<u64>)> {
    let spec = headers.get(RANGE)?.to_str().ok()?.strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let start = a.trim().parse().ok()?;
    let end = match b.trim() {
        "" => None,
        b => Some(b.parse().ok()?),
    };
    if end.is_some_and(|e| e < start) {
        return None;
    }
    Some((start, end))
}

/// # `com.atproto.sync.getBlob`
pub async fn get_blob(
    State(state): State<AppState>,
    XrpcQuery(p): XrpcQuery<GetBlobParams>,
    headers: HeaderMap,
) -> XrpcResult<Response> {
    let account = local_account(&state, &p.did).await?;
    crate::atp::syntax::parse_cid(&p.cid).map_err(|e| XrpcError::invalid_request(e.to_string()))?;
    let range = parse_range(&headers);
    let content = match state.blobs.get(&account.did, &p.cid, range).await {
        Ok(Some(c)) => c,
        Ok(None) => return Err(XrpcError::lexicon("BlobNotFound", "Blob not found")),
        Err(BlobError::RangeNotSatisfiable { size }) => {
            // RFC 9110 §15.5.17: a 416 names the current length so the
            // client can retry with a range that fits.
            let mut response = (StatusCode::RANGE_NOT_SATISFIABLE, "Range Not Satisfiable").into_response();
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                response.headers_mut().insert(CONTENT_RANGE, v);
            }
            return Ok(response);
        }
        Err(e) => return Err(e.into()),
    };
    let mime = HeaderValue::from_str(&content.row.mime_type)
        .unwrap_or(HeaderValue::from_static("application/octet-stream"));
    let total = content.row.size;
    let mut response = Response::new(content.body);
    let h = response.headers_mut();
    h.insert(CONTENT_TYPE, mime);
    h.insert(ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    // A blob is data, never a page: no sniffing, no scripts, no plugins.
    h.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    h.insert("content-security-policy", HeaderValue::from_static("default-src 'none'; sandbox"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("private, max-age=31536000, immutable"));
    match content.range {
        Some((start, end)) => {
            *response.status_mut() = StatusCode::PARTIAL_CONTENT;
            let h = response.headers_mut();
            h.insert(CONTENT_LENGTH, HeaderValue::from(end - start));
            if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{}/{total}", end - 1)) {
                h.insert(CONTENT_RANGE, v);
            }
        }
        None => {
            response.headers_mut().insert(CONTENT_LENGTH, HeaderValue::from(total));
        }
    }
    Ok(response)
}

#[derive(Deserialize)]
pub struct ListBlobsParams {
    did: String,
    since: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
}

/// # `com.atproto.sync.listBlobs`
pub async fn list_blobs(
    State(state): State<AppState>,
    XrpcQuery(p): XrpcQuery<ListBlobsParams>,
) -> XrpcResult<Json<Value>> {
    let account = local_account(&state, &p.did).await?;
    let limit = parse_limit(p.limit.as_deref(), 500, 1000)?;
    if let Some(since) = &p.since {
        crate::atp::syntax::Tid::new(since.as_str())
            .map_err(|e| XrpcError::invalid_request(format!("since: {e}")))?;
    }
    let cids = state.db.list_blobs(&account.did, p.since.as_deref(), p.cursor.as_deref(), limit).await?;
    let mut out = json!({ "cids": cids });
    if cids.len() as i64 == limit {
        out["cursor"] = json!(cids.last());
    }
    Ok(Json(out))
}

#[derive(Deserialize)]
pub struct MissingParams {
    limit: Option<String>,
    cursor: Option<String>,
}

/// # `com.atproto.repo.listMissingBlobs`
pub async fn list_missing_blobs(
    State(state): State<AppState>,
    auth: Access,
    XrpcQuery(p): XrpcQuery<MissingParams>,
) -> XrpcResult<Json<Value>> {
    let limit = parse_limit(p.limit.as_deref(), 500, 1000)?;
    let rows = state.db.missing_blobs(&auth.did, p.cursor.as_deref(), limit).await?;
    let blobs: Vec<Value> = rows
        .iter()
        .map(|(cid, collection, rkey)| {
            json!({ "cid": cid, "recordUri": format!("at://{}/{collection}/{rkey}", auth.did) })
        })
        .collect();
    let mut out = json!({ "blobs": blobs });
    if rows.len() as i64 == limit {
        out["cursor"] = json!(rows.last().map(|r| &r.0));
    }
    Ok(Json(out))
}
