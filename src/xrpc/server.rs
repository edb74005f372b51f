//! `com.atproto.server.*`: server description and sessions.

use axum::Json;
use axum::extract::{ConnectInfo, State};
use serde::Deserialize;
use serde_json::{Value, json};

use super::error::{XrpcError, XrpcResult};
use super::extract::{Access, Refresh, XrpcJson};
use crate::app::AppState;
use crate::auth::{self, REFRESH_LIFETIME};
use crate::db::accounts::AccountRow;
use crate::db::now_unix;
use crate::db::sessions::Rotation;

/// # `com.atproto.server.describeServer`
pub async fn describe_server(State(state): State<AppState>) -> Json<Value> {
    Json(json!({
        "did": state.config.service_did,
        "availableUserDomains": state.config.service_handle_domains,
        "inviteCodeRequired": state.config.invite_required,
        "phoneVerificationRequired": false,
        "links": {},
        "contact": {},
    }))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateSessionInput {
    identifier: String,
    password: String,
    #[allow(dead_code)]
    auth_factor_token: Option<String>,
}

/// The per-IP throttle shared by logins and signups (each costs an Argon2 hash).
fn throttle_by_ip(
    state: &AppState,
    peer: std::net::SocketAddr,
    headers: &axum::http::HeaderMap,
) -> XrpcResult<()> {
    state.login_limiter.check(crate::ratelimit::client_ip(peer.ip(), headers, state.config.trusted_proxies))
}

/// # `com.atproto.server.createSession`
pub async fn create_session(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    headers: axum::http::HeaderMap,
    XrpcJson(input): XrpcJson<CreateSessionInput>,
) -> XrpcResult<Json<Value>> {
    throttle_by_ip(&state, peer, &headers)?;
    let identifier = input.identifier.trim().to_ascii_lowercase();
    state.rate_limits.login(&identifier)?;
    let account = if identifier.starts_with("did:") {
        state.db.account_by_did(&identifier).await?
    } else if identifier.contains('@') {
        state.db.account_by_email(&identifier).await?
    } else {
        state.db.account_by_handle(&identifier).await?
    };
    // Hash even when the account is unknown, so timing does not reveal which
    // identifiers exist.
    let hash = account.as_ref().map(|a| a.password_hash.as_str()).unwrap_or(DUMMY_HASH.as_str());
    let password = input.password;
    let input_password = password.clone();
    let hash_owned = hash.to_owned();
    let ok = tokio::task::spawn_blocking(move || auth::verify_password(&password, &hash_owned))
        .await
        .map_err(|e| XrpcError::internal(anyhow::anyhow!(e)))?;
    // Not the account password: maybe one of its app passwords.
    let app_password = match &account {
        Some(a) if !ok && a.status != "pending" => {
            let (did, password) = (a.did.clone(), input_password.clone());
            let hash = tokio::task::spawn_blocking(move || auth::hash_app_password(&did, &password))
                .await
                .map_err(|e| XrpcError::internal(anyhow::anyhow!(e)))??;
            state.db.app_passwords(&a.did).await?.into_iter().find(|p| {
                use subtle::ConstantTimeEq as _;
                bool::from(p.password_hash.as_bytes().ct_eq(hash.as_bytes()))
            })
        }
        _ => None,
    };
    let account = match account {
        Some(a) if (ok || app_password.is_some()) && a.status != "pending" => a,
        _ => return Err(XrpcError::auth_required("Invalid identifier or password")),
    };
    let scope = match &app_password {
        None => auth::AccessScope::Full,
        Some(p) if p.privileged => auth::AccessScope::AppPassPrivileged,
        Some(_) => auth::AccessScope::AppPass,
    };
    if account.status == "takendown" {
        return Err(XrpcError::auth_required("Account has been taken down").with_name("AccountTakedown"));
    }
    let (access_jwt, refresh_jwt) =
        new_session(&state, &account.did, scope, app_password.as_ref().map(|p| p.name.as_str())).await?;
    let mut out = session_view(&state, &account)?;
    out["accessJwt"] = json!(access_jwt);
    out["refreshJwt"] = json!(refresh_jwt);
    Ok(Json(out))
}

/// Opens a session: its row, a refresh token, and both JWTs.
async fn new_session(
    state: &AppState,
    did: &str,
    scope: auth::AccessScope,
    app_password: Option<&str>,
) -> XrpcResult<(String, String)> {
    let session_id = auth::random_id();
    let refresh_id = auth::random_id();
    let refresh_expires = now_unix() + REFRESH_LIFETIME.as_secs() as i64;
    state.db.create_session(&session_id, did, scope.session_scope(), &refresh_id, refresh_expires).await?;
    if let Some(name) = app_password {
        state.db.tag_session_app_password(&session_id, name).await?;
    }
    let access_jwt = state.tokens.access_token(did, &session_id, scope.session_scope())?;
    let refresh_jwt = state.tokens.refresh_token(did, &refresh_id, refresh_expires)?;
    Ok((access_jwt, refresh_jwt))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateAccountInput {
    handle: String,
    email: Option<String>,
    password: Option<String>,
    invite_code: Option<String>,
    did: Option<String>,
}

/// # `com.atproto.server.createAccount`
///
/// Only with an invite code unless `PDS_INVITE_REQUIRED=false`. Bringing an
/// existing DID (account migration) is not supported yet and says so.
pub async fn create_account(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    headers: axum::http::HeaderMap,
    XrpcJson(input): XrpcJson<CreateAccountInput>,
) -> XrpcResult<Json<Value>> {
    // Signups cost an Argon2 hash and a PLC operation: share the login throttle.
    throttle_by_ip(&state, peer, &headers)?;
    if input.did.is_some() {
        return Err(XrpcError::invalid_request("Account migration (an existing did) is not supported"));
    }
    let password = input.password.ok_or_else(|| XrpcError::invalid_request("Password is required"))?;
    let new = crate::accounts::NewAccount {
        did_method: crate::config::DidMethod::Plc,
        handle: &input.handle,
        email: input.email.as_deref(),
        password: &password,
        invite: input.invite_code.as_deref(),
    };
    let account = crate::accounts::create_account(&state, new, true).await?;
    let (access_jwt, refresh_jwt) = new_session(&state, &account.did, auth::AccessScope::Full, None).await?;
    let key = state.keys.repo_key(&account.did)?;
    Ok(Json(json!({
        "accessJwt": access_jwt,
        "refreshJwt": refresh_jwt,
        "handle": account.handle,
        "did": account.did,
        "didDoc": crate::identity::did_document(&account.did, &account.handle, &key.public_key(), &state.config.public_url()),
    })))
}

/// An Argon2id hash of a random string, for constant-work failed logins.
static DUMMY_HASH: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| auth::hash_password(&auth::random_password()).unwrap_or_default());

fn session_view(state: &AppState, account: &AccountRow) -> XrpcResult<Value> {
    let key = state.keys.repo_key(&account.did)?;
    let mut view = json!({
        "did": account.did,
        "handle": account.handle,
        "didDoc": crate::identity::did_document(&account.did, &account.handle, &key.public_key(), &state.config.public_url()),
        "emailConfirmed": false,
        "emailAuthFactor": false,
        "active": account.status == "active",
    });
    if let Some(email) = &account.email {
        view["email"] = json!(email);
    }
    if account.status != "active" {
        view["status"] = json!(account.status);
    }
    Ok(view)
}

async fn account_for(state: &AppState, did: &str) -> XrpcResult<AccountRow> {
    state.db.account_by_did(did).await?.ok_or_else(|| XrpcError::lexicon("InvalidToken", "Account not found"))
}

/// # `com.atproto.server.getSession`
pub async fn get_session(State(state): State<AppState>, auth: Access) -> XrpcResult<Json<Value>> {
    let account = account_for(&state, &auth.did).await?;
    Ok(Json(session_view(&state, &account)?))
}

/// # `com.atproto.server.refreshSession`
pub async fn refresh_session(State(state): State<AppState>, auth: Refresh) -> XrpcResult<Json<Value>> {
    let account = account_for(&state, &auth.did).await?;
    let next_id = auth::random_id();
    let next_expires = now_unix() + REFRESH_LIFETIME.as_secs() as i64;
    let grace = state.config.refresh_grace_seconds as i64;
    let (next_id, next_expires) =
        match state.db.rotate_refresh_token(&auth.token_id, &next_id, next_expires, grace).await? {
            Rotation::Rotated => (next_id, next_expires),
            Rotation::Replayed { next_id, next_expires_at } => (next_id, next_expires_at),
            Rotation::Rejected(why) => {
                let name = if why.contains("expired") { "ExpiredToken" } else { "InvalidToken" };
                return Err(XrpcError::lexicon(name, why));
            }
        };
    let row = state
        .db
        .refresh_token(&next_id)
        .await?
        .ok_or_else(|| XrpcError::lexicon("InvalidToken", "Token has been revoked"))?;
    let session = state
        .db
        .session(&row.session_id)
        .await?
        .ok_or_else(|| XrpcError::lexicon("InvalidToken", "Token has been revoked"))?;
    let access_jwt = state.tokens.access_token(&account.did, &row.session_id, &session.scope)?;
    let refresh_jwt = state.tokens.refresh_token(&account.did, &next_id, next_expires)?;
    let mut out = session_view(&state, &account)?;
    out["accessJwt"] = json!(access_jwt);
    out["refreshJwt"] = json!(refresh_jwt);
    Ok(Json(out))
}

/// # `com.atproto.server.deleteSession`
///
/// Takes the refresh token (as the reference PDS does) or an access token.
pub async fn delete_session(
    State(state): State<AppState>,
    refresh: Result<Refresh, XrpcError>,
    access: Result<Access, XrpcError>,
) -> XrpcResult<Json<Value>> {
    let session_id = match (refresh, access) {
        (Ok(r), _) => state.db.refresh_token(&r.token_id).await?.map(|t| t.session_id),
        (_, Ok(a)) => Some(a.session_id),
        (Err(e), Err(_)) => return Err(e),
    };
    if let Some(id) = session_id {
        state.db.delete_session(&id).await?;
    }
    Ok(Json(json!({})))
}
