//! Operator methods behind HTTP Basic auth (`admin` : `PDS_ADMIN_PASSWORD`),
//! as the reference PDS, plus invite codes. The `roost account …` and
//! `roost handle set` commands call these on the running server, so every
//! change goes through the same code paths (and firehose) as the API.

use axum::Json;
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{Value, json};

use super::error::{XrpcError, XrpcResult};
use super::extract::{Access, XrpcJson};
use crate::app::AppState;
use crate::db::accounts::AccountRow;

/// A request carrying the admin password.
pub struct Admin;

impl FromRequestParts<AppState> for Admin {
    type Rejection = XrpcError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, XrpcError> {
        let Some(expected) = state.config.admin_password.as_deref().filter(|p| !p.is_empty()) else {
            return Err(XrpcError::auth_required("Admin API is disabled (no PDS_ADMIN_PASSWORD)"));
        };
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| XrpcError::auth_required("Authentication Required"))?;
        let decoded = header
            .strip_prefix("Basic ")
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b.trim()).ok())
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or_else(|| XrpcError::auth_required("Unexpected authorization type"))?;
        let (user, password) = decoded.split_once(':').unwrap_or(("", ""));
        use subtle::ConstantTimeEq as _;
        let ok = user == "admin" && bool::from(password.as_bytes().ct_eq(expected.as_bytes()));
        if !ok {
            return Err(XrpcError::auth_required("Invalid admin credentials"));
        }
        Ok(Admin)
    }
}

/// Invite codes look like the reference's: the hostname, then two random groups.
fn new_invite_code(state: &AppState) -> String {
    format!("{}-{}", state.config.hostname.replace('.', "-"), crate::auth::random_token())
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateInviteCodeInput {
    use_count: i64,
    for_account: Option<String>,
}

/// # `com.atproto.server.createInviteCode`
pub async fn create_invite_code(
    State(state): State<AppState>,
    _admin: Admin,
    XrpcJson(input): XrpcJson<CreateInviteCodeInput>,
) -> XrpcResult<Json<Value>> {
    if input.use_count < 1 {
        return Err(XrpcError::invalid_request("useCount must be at least 1"));
    }
    let code = new_invite_code(&state);
    let for_account = input.for_account.unwrap_or_else(|| "admin".into());
    state.db.create_invite_codes(std::slice::from_ref(&code), input.use_count, &for_account, "admin").await?;
    Ok(Json(json!({ "code": code })))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateInviteCodesInput {
    #[serde(default = "one")]
    code_count: i64,
    use_count: i64,
    for_accounts: Option<Vec<String>>,
}

fn one() -> i64 {
    1
}

/// # `com.atproto.server.createInviteCodes`
pub async fn create_invite_codes(
    State(state): State<AppState>,
    _admin: Admin,
    XrpcJson(input): XrpcJson<CreateInviteCodesInput>,
) -> XrpcResult<Json<Value>> {
    if input.use_count < 1 || !(1..=1000).contains(&input.code_count) {
        return Err(XrpcError::invalid_request("useCount must be at least 1 and codeCount 1 to 1000"));
    }
    let accounts = input.for_accounts.unwrap_or_else(|| vec!["admin".into()]);
    let mut out = Vec::with_capacity(accounts.len());
    for account in accounts {
        let codes: Vec<String> = (0..input.code_count).map(|_| new_invite_code(&state)).collect();
        state.db.create_invite_codes(&codes, input.use_count, &account, "admin").await?;
        out.push(json!({ "account": account, "codes": codes }));
    }
    Ok(Json(json!({ "codes": out })))
}

/// # `com.atproto.server.getAccountInviteCodes`
pub async fn get_account_invite_codes(
    State(state): State<AppState>,
    auth: Access,
) -> XrpcResult<Json<Value>> {
    auth.require_full()?;
    let codes: Vec<Value> = state
        .db
        .invite_codes_for(&auth.did)
        .await?
        .into_iter()
        .map(|c| {
            json!({
                "code": c.code,
                "available": c.available,
                "disabled": c.disabled,
                "forAccount": c.for_account,
                "createdBy": c.created_by,
                "createdAt": c.created_at,
                "uses": c.uses.into_iter().map(|(by, at)| json!({"usedBy": by, "usedAt": at})).collect::<Vec<_>>(),
            })
        })
        .collect();
    Ok(Json(json!({ "codes": codes })))
}

fn account_view(a: &AccountRow) -> Value {
    let mut v = json!({
        "did": a.did,
        "handle": a.handle,
        "indexedAt": a.created_at,
        "invitesDisabled": false,
    });
    if let Some(email) = &a.email {
        v["email"] = json!(email);
    }
    if a.status != "active" {
        v["deactivatedAt"] = json!(a.created_at);
    }
    v
}

/// # `com.atproto.admin.getAccountInfos` (`dids` repeated)
pub async fn get_account_infos(
    State(state): State<AppState>,
    _admin: Admin,
    request: axum::extract::Request,
) -> XrpcResult<Json<Value>> {
    let query = request.uri().query().unwrap_or("");
    let dids: Vec<String> = form_urlencoded::parse(query.as_bytes())
        .filter(|(k, _)| k == "dids")
        .map(|(_, v)| v.into_owned())
        .collect();
    if dids.is_empty() {
        return Err(XrpcError::invalid_request("dids is required"));
    }
    let mut infos = Vec::new();
    for did in dids.iter().take(100) {
        if let Some(a) = state.db.account_by_did(did).await? {
            infos.push(account_view(&a));
        }
    }
    Ok(Json(json!({ "infos": infos })))
}

#[derive(Deserialize)]
pub struct DidPassword {
    did: String,
    password: String,
}

/// # `com.atproto.admin.updateAccountPassword` (ends the account's sessions)
pub async fn update_account_password(
    State(state): State<AppState>,
    _admin: Admin,
    XrpcJson(input): XrpcJson<DidPassword>,
) -> XrpcResult<Json<Value>> {
    if input.password.chars().count() < 8 {
        return Err(XrpcError::lexicon("InvalidPassword", "Password must be at least 8 characters"));
    }
    let password = input.password;
    let hash = tokio::task::spawn_blocking(move || crate::auth::hash_password(&password))
        .await
        .map_err(|e| XrpcError::internal(anyhow::anyhow!(e)))??;
    if !state.db.set_password_hash(&input.did, &hash).await? {
        return Err(XrpcError::invalid_request("account not found"));
    }
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
pub struct DidHandle {
    did: String,
    handle: String,
}

/// # `com.atproto.admin.updateAccountHandle`
pub async fn update_account_handle(
    State(state): State<AppState>,
    _admin: Admin,
    XrpcJson(input): XrpcJson<DidHandle>,
) -> XrpcResult<Json<Value>> {
    crate::accounts::change_handle(&state, &input.did, &input.handle).await?;
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdminCreateAccount {
    /// `plc` (default) or `web`.
    did_method: Option<String>,
    handle: String,
    email: Option<String>,
    password: String,
}

/// # `dev.roost.admin.createAccount`: an account without an invite, for `roost account create`.
pub async fn create_account(
    State(state): State<AppState>,
    _admin: Admin,
    XrpcJson(input): XrpcJson<AdminCreateAccount>,
) -> XrpcResult<Json<Value>> {
    let did_method = match input.did_method.as_deref().unwrap_or("plc") {
        "plc" => crate::config::DidMethod::Plc,
        "web" => crate::config::DidMethod::Web,
        other => return Err(XrpcError::invalid_request(format!("didMethod {other}: expected plc or web"))),
    };
    let new = crate::accounts::NewAccount {
        did_method,
        handle: &input.handle,
        email: input.email.as_deref(),
        password: &input.password,
        invite: None,
    };
    let account = crate::accounts::create_account(&state, new, false).await?;
    Ok(Json(json!({ "did": account.did, "handle": account.handle })))
}

#[derive(Deserialize)]
pub struct DidOnly {
    did: String,
}

/// # `com.atproto.admin.deleteAccount`
pub async fn delete_account(
    State(state): State<AppState>,
    _admin: Admin,
    XrpcJson(input): XrpcJson<DidOnly>,
) -> XrpcResult<Json<Value>> {
    if state.db.account_by_did(&input.did).await?.is_none() {
        return Err(XrpcError::invalid_request("account not found"));
    }
    crate::accounts::delete_account(&state, &input.did).await?;
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
pub struct SubjectStatusInput {
    subject: Value,
    takedown: Option<StatusAttr>,
    deactivated: Option<StatusAttr>,
}

#[derive(Deserialize)]
pub struct StatusAttr {
    applied: bool,
    #[serde(rename = "ref")]
    reference: Option<String>,
}

/// # `com.atproto.admin.updateSubjectStatus` (repo takedowns)
///
/// A taken-down account cannot log in, its repo is not served, and the
/// firehose says `#account {active: false, status: "takendown"}`; lifting it
/// emits `#identity`, `#account active` and `#sync` like an activation.
pub async fn update_subject_status(
    State(state): State<AppState>,
    _admin: Admin,
    XrpcJson(input): XrpcJson<SubjectStatusInput>,
) -> XrpcResult<Json<Value>> {
    let did = match input.subject.get("$type").and_then(Value::as_str) {
        Some("com.atproto.admin.defs#repoRef") => input.subject.get("did").and_then(Value::as_str),
        _ => None,
    }
    .ok_or_else(|| XrpcError::invalid_request("Only com.atproto.admin.defs#repoRef subjects are supported"))?
    .to_owned();
    let account = state
        .db
        .account_by_did(&did)
        .await?
        .ok_or_else(|| XrpcError::invalid_request("account not found"))?;
    if input.deactivated.is_some() {
        return Err(XrpcError::invalid_request("Use com.atproto.server.deactivateAccount as the account"));
    }
    let Some(takedown) = &input.takedown else {
        return Err(XrpcError::invalid_request("takedown is required"));
    };
    let status = if takedown.applied { "takendown" } else { "active" };
    if account.status != status {
        state.repo.set_account_status(&did, &account.handle, status).await?;
    }
    if takedown.applied {
        // Sessions end with the takedown (logins are refused while it lasts).
        state.db.end_sessions(&did).await?;
    }
    let mut out = json!({ "subject": input.subject, "takedown": { "applied": takedown.applied } });
    if let Some(r) = &takedown.reference {
        out["takedown"]["ref"] = json!(r);
    }
    Ok(Json(out))
}
