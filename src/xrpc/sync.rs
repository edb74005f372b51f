//! `com.atproto.sync.*` (repository export) and `com.atproto.identity.*`.

use std::str::FromStr;

use axum::Json;
use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use cid::Cid;
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};

use super::error::{XrpcError, XrpcResult};
use super::extract::XrpcQuery;
use super::repo::{local_account, parse_limit};
use crate::app::AppState;
use crate::atp::car;
use crate::atp::syntax::{Did, Handle, Tid};
use crate::db::repo::RepoItem;

const CAR_MIME: &str = "application/vnd.ipld.car";

fn car_response(body: Body) -> Response {
    ([(CONTENT_TYPE, CAR_MIME)], body).into_response()
}

#[derive(Deserialize)]
pub struct DidParam {
    did: String,
}

async fn repo_account(state: &AppState, did: &str) -> XrpcResult<crate::db::accounts::AccountRow> {
    Did::new(did).map_err(|e| XrpcError::invalid_request(e.to_string()))?;
    let account = local_account(state, did)
        .await
        .map_err(|_| XrpcError::lexicon("RepoNotFound", format!("Could not find repo for DID: {did}")))?;
    match account.status.as_str() {
        "active" => Ok(account),
        "takendown" => Err(XrpcError::lexicon("RepoTakendown", format!("Repo has been takendown: {did}"))),
        "deactivated" => {
            Err(XrpcError::lexicon("RepoDeactivated", format!("Repo has been deactivated: {did}")))
        }
        _ => Err(XrpcError::lexicon("RepoNotFound", format!("Could not find repo for DID: {did}"))),
    }
}

#[derive(Deserialize)]
pub struct GetRepoParams {
    did: String,
    since: Option<String>,
}

/// # `com.atproto.sync.getRepo`
///
/// Streams the CAR straight from one SQLite read transaction through a small
/// bounded channel: memory stays flat however large the repository is.
pub async fn get_repo(
    State(state): State<AppState>,
    XrpcQuery(p): XrpcQuery<GetRepoParams>,
) -> XrpcResult<Response> {
    let account = repo_account(&state, &p.did).await?;
    if let Some(since) = &p.since {
        Tid::new(since.as_str()).map_err(|e| XrpcError::invalid_request(format!("since: {e}")))?;
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<RepoItem>(64);
    let db = state.db.clone();
    let producer =
        tokio::spawn(async move { db.stream_repo_blocks(&account.did, p.since.as_deref(), tx).await });
    let blocks = tokio_stream::wrappers::ReceiverStream::new(rx).map(|item| {
        Ok::<_, std::io::Error>(Bytes::from(match item {
            RepoItem::Root(root) => car::encode_header(&[root.commit_cid]),
            RepoItem::Block(cid, data) => car::encode_block(&cid, &data),
        }))
    });
    // A failure after the header cannot change the status any more: end the
    // body with an error so the client sees a truncated transfer, not a
    // complete-looking CAR.
    let failure = futures::stream::once(async move {
        match producer.await {
            Ok(Ok(_)) => None,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "getRepo stream failed");
                Some(Err(std::io::Error::other("repository stream failed")))
            }
            Err(e) => Some(Err(std::io::Error::other(e))),
        }
    })
    .filter_map(|x| async move { x });
    Ok(car_response(Body::from_stream(blocks.chain(failure))))
}

/// # `com.atproto.sync.getLatestCommit`
pub async fn get_latest_commit(
    State(state): State<AppState>,
    XrpcQuery(p): XrpcQuery<DidParam>,
) -> XrpcResult<Json<Value>> {
    let account = repo_account(&state, &p.did).await?;
    let root = state
        .db
        .repo_root(&account.did)
        .await?
        .ok_or_else(|| XrpcError::lexicon("RepoNotFound", "Could not find root for DID"))?;
    Ok(Json(json!({ "cid": root.commit_cid.to_string(), "rev": root.rev })))
}

#[derive(Deserialize)]
pub struct SyncRecordParams {
    did: String,
    collection: String,
    rkey: String,
}

/// # `com.atproto.sync.getRecord`
///
/// A CAR rooted at the current commit with the MST path proving the record
/// (or its absence) and the record block itself.
pub async fn get_record(
    State(state): State<AppState>,
    XrpcQuery(p): XrpcQuery<SyncRecordParams>,
) -> XrpcResult<Response> {
    let account = repo_account(&state, &p.did).await?;
    crate::atp::syntax::Nsid::new(p.collection.as_str())
        .map_err(|e| XrpcError::invalid_request(e.to_string()))?;
    crate::atp::syntax::RecordKey::new(p.rkey.as_str())
        .map_err(|e| XrpcError::invalid_request(e.to_string()))?;
    let (commit, blocks) = state.repo.record_proof(&account.did, &p.collection, &p.rkey).await?;
    let mut out = car::encode_header(&[commit]);
    for (cid, data) in &blocks {
        out.extend(car::encode_block(cid, data));
    }
    Ok(car_response(Body::from(out)))
}

/// # `com.atproto.sync.getBlocks`
pub async fn get_blocks(State(state): State<AppState>, RawQuery(query): RawQuery) -> XrpcResult<Response> {
    let query = query.unwrap_or_default();
    let mut did = None;
    let mut cids = Vec::new();
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        match k.as_ref() {
            "did" => did = Some(v.into_owned()),
            "cids" => {
                cids.push(Cid::from_str(&v).map_err(|e| XrpcError::invalid_request(format!("cids: {e}")))?)
            }
            _ => {}
        }
    }
    let did =
        did.ok_or_else(|| XrpcError::invalid_request("Error: Params must have the property \"did\""))?;
    if cids.len() > 1000 {
        return Err(XrpcError::invalid_request("Too many cids (max 1000)"));
    }
    let account = repo_account(&state, &did).await?;
    let mut out = car::encode_header(&[]);
    let mut missing = Vec::new();
    for cid in &cids {
        match state.db.block(&account.did, cid).await? {
            Some(data) => out.extend(car::encode_block(cid, &data)),
            None => missing.push(cid.to_string()),
        }
    }
    if !missing.is_empty() {
        return Err(XrpcError::invalid_request(format!("Could not find cids: {}", missing.join(", "))));
    }
    Ok(car_response(Body::from(out)))
}

/// # `com.atproto.sync.getRepoStatus`
pub async fn get_repo_status(
    State(state): State<AppState>,
    XrpcQuery(p): XrpcQuery<DidParam>,
) -> XrpcResult<Json<Value>> {
    Did::new(p.did.as_str()).map_err(|e| XrpcError::invalid_request(e.to_string()))?;
    let account = local_account(&state, &p.did)
        .await
        .map_err(|_| XrpcError::lexicon("RepoNotFound", format!("Could not find repo for DID: {}", p.did)))?;
    let active = account.status == "active";
    let mut out = json!({ "did": account.did, "active": active });
    if !active {
        out["status"] = json!(account.status);
    }
    if let Some(root) = state.db.repo_root(&account.did).await? {
        out["rev"] = json!(root.rev);
    }
    Ok(Json(out))
}

#[derive(Deserialize)]
pub struct ListReposParams {
    limit: Option<String>,
    cursor: Option<String>,
}

/// # `com.atproto.sync.listRepos`
pub async fn list_repos(
    State(state): State<AppState>,
    XrpcQuery(p): XrpcQuery<ListReposParams>,
) -> XrpcResult<Json<Value>> {
    let limit = parse_limit(p.limit.as_deref(), 500, 1000)?;
    let accounts = state.db.list_accounts(p.cursor.as_deref(), limit).await?;
    let mut repos = Vec::with_capacity(accounts.len());
    for a in &accounts {
        let Some(root) = state.db.repo_root(&a.did).await? else {
            continue;
        };
        let mut repo = json!({
            "did": a.did,
            "head": root.commit_cid.to_string(),
            "rev": root.rev,
            "active": a.status == "active",
        });
        if a.status != "active" {
            repo["status"] = json!(a.status);
        }
        repos.push(repo);
    }
    let mut out = json!({ "repos": repos });
    if accounts.len() as i64 == limit
        && let Some(last) = accounts.last()
    {
        out["cursor"] = json!(last.did);
    }
    Ok(Json(out))
}

#[derive(Deserialize)]
pub struct ResolveHandleParams {
    handle: String,
}

/// # `com.atproto.identity.resolveHandle`
///
/// Answers for handles hosted here. (Resolving foreign handles over DNS and
/// HTTPS belongs to the identity resolver, with SSRF guards.)
pub async fn resolve_handle(
    State(state): State<AppState>,
    XrpcQuery(p): XrpcQuery<ResolveHandleParams>,
) -> XrpcResult<Json<Value>> {
    let handle = Handle::new(p.handle.as_str()).map_err(|e| XrpcError::invalid_request(e.to_string()))?;
    match state.db.account_by_handle(handle.as_str()).await? {
        Some(a) if a.status != "pending" => Ok(Json(json!({ "did": a.did }))),
        _ => Err(XrpcError::lexicon("HandleNotFound", "Unable to resolve handle")),
    }
}
