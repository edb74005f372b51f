//! `com.atproto.repo.*`: record writes and reads.

use std::str::FromStr;

use axum::Json;
use axum::extract::State;
use cid::Cid;
use ipld_core::ipld::Ipld;
use serde::Deserialize;
use serde_json::{Value, json};

use super::error::{XrpcError, XrpcResult};
use super::extract::{Access, XrpcJson, XrpcQuery};
use crate::app::AppState;
use crate::atp::data::{ipld_to_json, record_from_json};
use crate::atp::syntax::{AtIdentifier, Nsid, RecordKey};
use crate::db::accounts::AccountRow;
use crate::lexicon::Validation;
use crate::repo::{ApplyOutcome, CommitInfo, Swap, Write, WriteResult};

/// Most writes accepted in one applyWrites call (the reference PDS's limit).
const MAX_WRITES: usize = 200;

/// Resolves a `repo` parameter (handle or DID) to a local account.
pub(super) async fn local_account(state: &AppState, repo: &str) -> XrpcResult<AccountRow> {
    let id = AtIdentifier::new(repo).map_err(|e| XrpcError::invalid_request(e.to_string()))?;
    let account = match &id {
        AtIdentifier::Did(did) => state.db.account_by_did(did.as_str()).await?,
        AtIdentifier::Handle(handle) => state.db.account_by_handle(handle.as_str()).await?,
    };
    match account {
        Some(a) if a.status != "pending" => Ok(a),
        _ => Err(XrpcError::invalid_request(format!("Could not find repo: {repo}"))),
    }
}

/// The authenticated account must own the repo it writes to.
async fn writable_repo(state: &AppState, auth: &Access, repo: &str) -> XrpcResult<AccountRow> {
    let account = local_account(state, repo).await?;
    if account.did != auth.did {
        return Err(XrpcError::auth_required("Not authorized to write to this repo"));
    }
    if account.status != "active" {
        return Err(XrpcError::lexicon("AccountDeactivated", "Account is not active"));
    }
    Ok(account)
}

fn parse_nsid(s: &str) -> XrpcResult<Nsid> {
    Nsid::new(s).map_err(|e| XrpcError::invalid_request(e.to_string()))
}

fn parse_rkey(s: &str) -> XrpcResult<RecordKey> {
    RecordKey::new(s).map_err(|e| XrpcError::invalid_request(e.to_string()))
}

fn parse_cid(s: &str, what: &str) -> XrpcResult<Cid> {
    crate::atp::syntax::parse_cid(s).map_err(|e| XrpcError::invalid_request(format!("{what}: {e}")))
}

/// Converts a record from JSON and checks its `$type` names the collection.
/// Converts a record from JSON, checks its `$type` names the collection, and
/// validates it against the collection's lexicon as `validate` asks (the
/// reference PDS's rules: unset validates known lexicons and lets unknown
/// ones through; `true` requires a known lexicon; `false` skips).
async fn parse_record(
    state: &AppState,
    collection: &Nsid,
    rkey: &RecordKey,
    value: &Value,
    validate: Option<bool>,
) -> XrpcResult<(Ipld, Option<&'static str>)> {
    // A record without `$type` is of its collection's type: the reference
    // PDS fills it in, and clients rely on that.
    let filled;
    let value = match value.as_object() {
        Some(obj) if !obj.contains_key("$type") => {
            let mut obj = obj.clone();
            obj.insert("$type".into(), Value::String(collection.to_string()));
            filled = Value::Object(obj);
            &filled
        }
        _ => value,
    };
    let record =
        record_from_json(value).map_err(|e| XrpcError::invalid_request(format!("Invalid record: {e}")))?;
    match value.get("$type").and_then(Value::as_str) {
        Some(t) if t == collection.as_str() => {}
        Some(t) => {
            return Err(XrpcError::invalid_request(format!("Invalid $type: expected {collection}, got {t}")));
        }
        None => return Err(XrpcError::invalid_request("Record/$type must be a string")),
    }
    if validate == Some(false) {
        return Ok((record, None));
    }
    let catalog = state.lexicons.for_collection(collection).await;
    match catalog.validate_record(collection.as_str(), rkey.as_str(), value) {
        Ok(Validation::Valid) => Ok((record, Some("valid"))),
        Ok(Validation::Unknown) if validate == Some(true) => {
            Err(XrpcError::invalid_request(format!("Lexicon not found: lex:{collection}")))
        }
        Ok(Validation::Unknown) => Ok((record, Some("unknown"))),
        Err(e) => Err(XrpcError::invalid_request(e.to_string())),
    }
}

fn with_status(mut out: Value, status: Option<&'static str>) -> Value {
    if let Some(s) = status {
        out["validationStatus"] = json!(s);
    }
    out
}

fn at_uri(did: &str, collection: &Nsid, rkey: &RecordKey) -> String {
    format!("at://{did}/{collection}/{rkey}")
}

fn commit_json(commit: &Option<CommitInfo>) -> Option<Value> {
    commit.as_ref().map(|c| json!({ "cid": c.cid.to_string(), "rev": c.rev }))
}

fn with_commit(mut out: Value, commit: &Option<CommitInfo>) -> Value {
    if let Some(c) = commit_json(commit) {
        out["commit"] = c;
    }
    out
}

async fn apply(
    state: &AppState,
    account: &AccountRow,
    writes: Vec<Write>,
    swap_commit: Option<&str>,
) -> XrpcResult<ApplyOutcome> {
    let swap_commit = swap_commit.map(|s| parse_cid(s, "swapCommit")).transpose()?;
    let key = state.keys.repo_key(&account.did)?;
    let outcome = state.repo.apply_writes(&account.did, &key, writes, swap_commit).await?;
    if outcome.released_blobs {
        // Large-store objects of released blobs go right after the commit;
        // the queue survives a crash and the sweeper retries.
        let state = state.clone();
        tokio::spawn(async move {
            if let Err(e) = state.blobs.process_deletions().await {
                tracing::warn!(error = %e, "deleting released blobs failed");
            }
        });
    }
    Ok(outcome)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateRecordInput {
    repo: String,
    collection: String,
    rkey: Option<String>,
    #[allow(dead_code)]
    validate: Option<bool>,
    record: Value,
    swap_commit: Option<String>,
}

/// # `com.atproto.repo.createRecord`
pub async fn create_record(
    State(state): State<AppState>,
    auth: Access,
    XrpcJson(input): XrpcJson<CreateRecordInput>,
) -> XrpcResult<Json<Value>> {
    let account = writable_repo(&state, &auth, &input.repo).await?;
    state.rate_limits.writes(&auth.did, crate::ratelimit::CREATE_POINTS)?;
    let collection = parse_nsid(&input.collection)?;
    let rkey = match &input.rkey {
        Some(r) => parse_rkey(r)?,
        None => parse_rkey(state.repo.next_tid(None).as_str())?,
    };
    let (value, status) = parse_record(&state, &collection, &rkey, &input.record, input.validate).await?;
    let write = Write::Create { collection: collection.clone(), rkey: rkey.clone(), value };
    let outcome = apply(&state, &account, vec![write], input.swap_commit.as_deref()).await?;
    let cid = match outcome.results.first() {
        Some(WriteResult::Create { cid, .. }) => *cid,
        _ => {
            return Err(XrpcError::internal(anyhow::anyhow!("createRecord produced no result")));
        }
    };
    Ok(Json(with_commit(
        with_status(
            json!({ "uri": at_uri(&account.did, &collection, &rkey), "cid": cid.to_string() }),
            status,
        ),
        &outcome.commit,
    )))
}

/// `swapRecord` distinguishes absent (no check) from `null` (must not exist).
fn swap_from(field: &Option<Value>) -> XrpcResult<Swap> {
    match field {
        None => Ok(Swap::Any),
        Some(Value::Null) => Ok(Swap::MustNotExist),
        Some(Value::String(s)) => Ok(Swap::Is(parse_cid(s, "swapRecord")?)),
        Some(_) => Err(XrpcError::invalid_request("swapRecord must be a CID string or null")),
    }
}

/// Keeps an explicit JSON `null` distinct from a missing field.
fn explicit<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PutRecordInput {
    repo: String,
    collection: String,
    rkey: String,
    #[allow(dead_code)]
    validate: Option<bool>,
    record: Value,
    #[serde(default, deserialize_with = "explicit")]
    swap_record: Option<Value>,
    swap_commit: Option<String>,
}

/// # `com.atproto.repo.putRecord`
pub async fn put_record(
    State(state): State<AppState>,
    auth: Access,
    XrpcJson(input): XrpcJson<PutRecordInput>,
) -> XrpcResult<Json<Value>> {
    let account = writable_repo(&state, &auth, &input.repo).await?;
    state.rate_limits.writes(&auth.did, crate::ratelimit::UPDATE_POINTS)?;
    let collection = parse_nsid(&input.collection)?;
    let rkey = parse_rkey(&input.rkey)?;
    let (value, status) = parse_record(&state, &collection, &rkey, &input.record, input.validate).await?;
    let swap = swap_from(&input.swap_record)?;
    let write = Write::Update { collection: collection.clone(), rkey: rkey.clone(), value, swap };
    let outcome = apply(&state, &account, vec![write], input.swap_commit.as_deref()).await?;
    let cid = match outcome.results.first() {
        Some(WriteResult::Create { cid, .. } | WriteResult::Update { cid, .. }) => *cid,
        _ => {
            return Err(XrpcError::internal(anyhow::anyhow!("putRecord produced no result")));
        }
    };
    Ok(Json(with_commit(
        with_status(
            json!({ "uri": at_uri(&account.did, &collection, &rkey), "cid": cid.to_string() }),
            status,
        ),
        &outcome.commit,
    )))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeleteRecordInput {
    repo: String,
    collection: String,
    rkey: String,
    swap_record: Option<String>,
    swap_commit: Option<String>,
}

/// # `com.atproto.repo.deleteRecord`
pub async fn delete_record(
    State(state): State<AppState>,
    auth: Access,
    XrpcJson(input): XrpcJson<DeleteRecordInput>,
) -> XrpcResult<Json<Value>> {
    let account = writable_repo(&state, &auth, &input.repo).await?;
    state.rate_limits.writes(&auth.did, crate::ratelimit::DELETE_POINTS)?;
    let swap = match &input.swap_record {
        Some(s) => Swap::Is(parse_cid(s, "swapRecord")?),
        None => Swap::Any,
    };
    let write =
        Write::Delete { collection: parse_nsid(&input.collection)?, rkey: parse_rkey(&input.rkey)?, swap };
    let outcome = apply(&state, &account, vec![write], input.swap_commit.as_deref()).await?;
    Ok(Json(with_commit(json!({}), &outcome.commit)))
}

#[derive(Deserialize)]
#[serde(tag = "$type")]
enum WriteInput {
    #[serde(rename = "com.atproto.repo.applyWrites#create")]
    Create { collection: String, rkey: Option<String>, value: Value },
    #[serde(rename = "com.atproto.repo.applyWrites#update")]
    Update { collection: String, rkey: String, value: Value },
    #[serde(rename = "com.atproto.repo.applyWrites#delete")]
    Delete { collection: String, rkey: String },
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApplyWritesInput {
    repo: String,
    #[allow(dead_code)]
    validate: Option<bool>,
    writes: Vec<WriteInput>,
    swap_commit: Option<String>,
}

/// # `com.atproto.repo.applyWrites`
pub async fn apply_writes(
    State(state): State<AppState>,
    auth: Access,
    XrpcJson(input): XrpcJson<ApplyWritesInput>,
) -> XrpcResult<Json<Value>> {
    let account = writable_repo(&state, &auth, &input.repo).await?;
    if input.writes.len() > MAX_WRITES {
        return Err(XrpcError::invalid_request(format!("Too many writes. Max: {MAX_WRITES}")));
    }
    let points = input
        .writes
        .iter()
        .map(|w| match w {
            WriteInput::Create { .. } => crate::ratelimit::CREATE_POINTS,
            WriteInput::Update { .. } => crate::ratelimit::UPDATE_POINTS,
            WriteInput::Delete { .. } => crate::ratelimit::DELETE_POINTS,
        })
        .sum();
    state.rate_limits.writes(&auth.did, points)?;
    let mut writes = Vec::with_capacity(input.writes.len());
    let mut statuses = Vec::with_capacity(input.writes.len());
    for w in &input.writes {
        writes.push(match w {
            WriteInput::Create { collection, rkey, value } => {
                let collection = parse_nsid(collection)?;
                let rkey = match rkey {
                    Some(r) => parse_rkey(r)?,
                    None => parse_rkey(state.repo.next_tid(None).as_str())?,
                };
                let (value, status) = parse_record(&state, &collection, &rkey, value, input.validate).await?;
                statuses.push(status);
                Write::Create { collection, rkey, value }
            }
            WriteInput::Update { collection, rkey, value } => {
                let collection = parse_nsid(collection)?;
                let rkey = parse_rkey(rkey)?;
                let (value, status) = parse_record(&state, &collection, &rkey, value, input.validate).await?;
                statuses.push(status);
                Write::Update { collection, rkey, value, swap: Swap::Any }
            }
            WriteInput::Delete { collection, rkey } => {
                statuses.push(None);
                Write::Delete {
                    collection: parse_nsid(collection)?,
                    rkey: parse_rkey(rkey)?,
                    swap: Swap::Any,
                }
            }
        });
    }
    let outcome = apply(&state, &account, writes, input.swap_commit.as_deref()).await?;
    let results: Vec<Value> = outcome
        .results
        .iter()
        .zip(statuses)
        .map(|(r, status)| match r {
            WriteResult::Create { collection, rkey, cid } => with_status(
                json!({
                    "$type": "com.atproto.repo.applyWrites#createResult",
                    "uri": at_uri(&account.did, collection, rkey),
                    "cid": cid.to_string(),
                }),
                status,
            ),
            WriteResult::Update { collection, rkey, cid } => with_status(
                json!({
                    "$type": "com.atproto.repo.applyWrites#updateResult",
                    "uri": at_uri(&account.did, collection, rkey),
                    "cid": cid.to_string(),
                }),
                status,
            ),
            WriteResult::Delete => json!({ "$type": "com.atproto.repo.applyWrites#deleteResult" }),
        })
        .collect();
    Ok(Json(with_commit(json!({ "results": results }), &outcome.commit)))
}

#[derive(Deserialize)]
pub struct GetRecordParams {
    repo: String,
    collection: String,
    rkey: String,
    cid: Option<String>,
}

/// Loads a record's value as JSON.
async fn record_value(state: &AppState, did: &str, cid: &Cid) -> XrpcResult<Value> {
    let bytes = state
        .db
        .block(did, cid)
        .await?
        .ok_or_else(|| XrpcError::internal(anyhow::anyhow!("record block {cid} missing")))?;
    let ipld = crate::atp::data::decode_cbor_strict(&bytes).map_err(XrpcError::internal)?;
    Ok(ipld_to_json(&ipld))
}

/// # `com.atproto.repo.getRecord`
pub async fn get_record(
    State(state): State<AppState>,
    XrpcQuery(p): XrpcQuery<GetRecordParams>,
) -> XrpcResult<Json<Value>> {
    let account = local_account(&state, &p.repo).await?;
    let collection = parse_nsid(&p.collection)?;
    let rkey = parse_rkey(&p.rkey)?;
    let uri = at_uri(&account.did, &collection, &rkey);
    let found = state.db.record(&account.did, collection.as_str(), rkey.as_str()).await?;
    let wanted = p.cid.as_deref().map(|c| parse_cid(c, "cid")).transpose()?;
    match found {
        Some(cid) if wanted.is_none_or(|w| w == cid) => Ok(Json(json!({
            "uri": uri,
            "cid": cid.to_string(),
            "value": record_value(&state, &account.did, &cid).await?,
        }))),
        _ => Err(XrpcError::lexicon("RecordNotFound", format!("Could not locate record: {uri}"))),
    }
}

#[derive(Deserialize)]
pub struct ListRecordsParams {
    repo: String,
    collection: String,
    limit: Option<String>,
    cursor: Option<String>,
    reverse: Option<String>,
}

pub(super) fn parse_limit(raw: Option<&str>, default: i64, max: i64) -> XrpcResult<i64> {
    match raw {
        None => Ok(default),
        Some(s) => match i64::from_str(s) {
            Ok(n) if (1..=max).contains(&n) => Ok(n),
            _ => Err(XrpcError::invalid_request(format!("limit must be an integer between 1 and {max}"))),
        },
    }
}

pub(super) fn parse_bool(raw: Option<&str>, name: &str) -> XrpcResult<bool> {
    match raw {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(_) => Err(XrpcError::invalid_request(format!("{name} must be true or false"))),
    }
}

/// # `com.atproto.repo.listRecords`
pub async fn list_records(
    State(state): State<AppState>,
    XrpcQuery(p): XrpcQuery<ListRecordsParams>,
) -> XrpcResult<Json<Value>> {
    let account = local_account(&state, &p.repo).await?;
    let collection = parse_nsid(&p.collection)?;
    let limit = parse_limit(p.limit.as_deref(), 50, 100)?;
    let reverse = parse_bool(p.reverse.as_deref(), "reverse")?;
    let rows =
        state.db.list_records(&account.did, collection.as_str(), p.cursor.as_deref(), limit, reverse).await?;
    let mut records = Vec::with_capacity(rows.len());
    for row in &rows {
        records.push(json!({
            "uri": format!("at://{}/{}/{}", account.did, row.collection, row.rkey),
            "cid": row.cid.to_string(),
            "value": record_value(&state, &account.did, &row.cid).await?,
        }));
    }
    let mut out = json!({ "records": records });
    if rows.len() as i64 == limit
        && let Some(last) = rows.last()
    {
        out["cursor"] = json!(last.rkey);
    }
    Ok(Json(out))
}

#[derive(Deserialize)]
pub struct DescribeRepoParams {
    repo: String,
}

/// # `com.atproto.repo.describeRepo`
pub async fn describe_repo(
    State(state): State<AppState>,
    XrpcQuery(p): XrpcQuery<DescribeRepoParams>,
) -> XrpcResult<Json<Value>> {
    let account = local_account(&state, &p.repo).await?;
    let key = state.keys.repo_key(&account.did)?;
    Ok(Json(json!({
        "handle": account.handle,
        "did": account.did,
        "didDoc": crate::identity::did_document(&account.did, &account.handle, &key.public_key(), &state.config.public_url()),
        "collections": state.db.collections(&account.did).await?,
        "handleIsCorrect": true,
    })))
}
