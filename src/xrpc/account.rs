//! Account-level methods the Bluesky app uses besides sessions: app
//! passwords, preferences and service-auth tokens.

use axum::Json;
use axum::extract::State;
use serde::Deserialize;
use serde_json::{Value, json};

use super::error::{XrpcError, XrpcResult};
use super::extract::{Access, XrpcJson, XrpcQuery};
use crate::app::AppState;
use crate::auth::{self, AccessScope};
use crate::db::account_features::AppPasswordError;
use crate::proxy::{PRIVILEGED_METHODS, PROTECTED_METHODS};

const MAX_APP_PASSWORD_NAME: usize = 100;
/// Preferences the app stores for itself; other namespaces are not ours to hold.
const PREFERENCE_NAMESPACE: &str = "app.bsky";
/// Only a full session (the account password) may read or write these.
const FULL_ACCESS_ONLY_PREFS: &[&str] = &["app.bsky.actor.defs#personalDetailsPref"];

#[derive(Deserialize)]
pub struct CreateAppPasswordInput {
    name: String,
    #[serde(default)]
    privileged: bool,
}

/// # `com.atproto.server.createAppPassword`
pub async fn create_app_password(
    State(state): State<AppState>,
    auth: Access,
    XrpcJson(input): XrpcJson<CreateAppPasswordInput>,
) -> XrpcResult<Json<Value>> {
    auth.require_full()?;
    let name = input.name.trim().to_owned();
    if name.is_empty() || name.chars().count() > MAX_APP_PASSWORD_NAME {
        return Err(XrpcError::invalid_request(format!(
            "App password name must be 1 to {MAX_APP_PASSWORD_NAME} characters"
        )));
    }
    let password = auth::generate_app_password();
    let (did, secret) = (auth.did.clone(), password.clone());
    let hash = tokio::task::spawn_blocking(move || auth::hash_app_password(&did, &secret))
        .await
        .map_err(|e| XrpcError::internal(anyhow::anyhow!(e)))??;
    let created_at = crate::repo::now_datetime();
    match state.db.create_app_password(&auth.did, &name, &hash, input.privileged, &created_at).await {
        Ok(()) => {}
        Err(e @ AppPasswordError::Duplicate) => return Err(XrpcError::invalid_request(e.to_string())),
        Err(AppPasswordError::Db(e)) => return Err(e.into()),
    }
    Ok(Json(json!({
        "name": name,
        "password": password,
        "createdAt": created_at,
        "privileged": input.privileged,
    })))
}

/// # `com.atproto.server.listAppPasswords`
pub async fn list_app_passwords(State(state): State<AppState>, auth: Access) -> XrpcResult<Json<Value>> {
    auth.require_full()?;
    let passwords: Vec<Value> = state
        .db
        .app_passwords(&auth.did)
        .await?
        .into_iter()
        .map(|p| json!({ "name": p.name, "createdAt": p.created_at, "privileged": p.privileged }))
        .collect();
    Ok(Json(json!({ "passwords": passwords })))
}

#[derive(Deserialize)]
pub struct RevokeAppPasswordInput {
    name: String,
}

/// # `com.atproto.server.revokeAppPassword`
pub async fn revoke_app_password(
    State(state): State<AppState>,
    auth: Access,
    XrpcJson(input): XrpcJson<RevokeAppPasswordInput>,
) -> XrpcResult<Json<Value>> {
    auth.require_full()?;
    state.db.revoke_app_password(&auth.did, &input.name).await?;
    Ok(Json(json!({})))
}

fn pref_allowed(scope: AccessScope, kind: &str) -> bool {
    scope == AccessScope::Full || !FULL_ACCESS_ONLY_PREFS.contains(&kind)
}

/// # `app.bsky.actor.getPreferences` (stored here, never proxied)
pub async fn get_preferences(State(state): State<AppState>, auth: Access) -> XrpcResult<Json<Value>> {
    let mut preferences = Vec::new();
    for (kind, value) in state.db.preferences(&auth.did, PREFERENCE_NAMESPACE).await? {
        if pref_allowed(auth.scope, &kind) {
            let value: Value =
                serde_json::from_str(&value).map_err(|e| XrpcError::internal(anyhow::anyhow!(e)))?;
            preferences.push(value);
        }
    }
    Ok(Json(json!({ "preferences": preferences })))
}

#[derive(Deserialize)]
pub struct PutPreferencesInput {
    preferences: Vec<Value>,
}

/// # `app.bsky.actor.putPreferences`
pub async fn put_preferences(
    State(state): State<AppState>,
    auth: Access,
    XrpcJson(input): XrpcJson<PutPreferencesInput>,
) -> XrpcResult<Json<Value>> {
    let mut values = Vec::with_capacity(input.preferences.len());
    for (i, pref) in input.preferences.iter().enumerate() {
        let kind =
            pref.get("$type").and_then(Value::as_str).filter(|t| !t.is_empty()).ok_or_else(|| {
                XrpcError::invalid_request(format!("Input/preferences/{i} is missing a $type"))
            })?;
        if !pref.is_object() {
            return Err(XrpcError::invalid_request(format!("Input/preferences/{i} must be an object")));
        }
        values.push((kind.to_owned(), pref.to_string()));
    }
    if !values.iter().all(|(kind, _)| crate::db::account_features::in_namespace(PREFERENCE_NAMESPACE, kind)) {
        return Err(XrpcError::invalid_request(format!(
            "Some preferences are not in the {PREFERENCE_NAMESPACE} namespace"
        )));
    }
    if values.iter().any(|(kind, _)| !pref_allowed(auth.scope, kind)) {
        return Err(XrpcError::invalid_request("Do not have authorization to set preferences."));
    }
    let scope = auth.scope;
    state
        .db
        .put_preferences(&auth.did, PREFERENCE_NAMESPACE, move |kind| pref_allowed(scope, kind), &values)
        .await?;
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
pub struct ServiceAuthParams {
    aud: String,
    exp: Option<i64>,
    lxm: Option<String>,
}

/// # `com.atproto.server.getServiceAuth`
pub async fn get_service_auth(
    State(state): State<AppState>,
    auth: Access,
    XrpcQuery(p): XrpcQuery<ServiceAuthParams>,
) -> XrpcResult<Json<Value>> {
    let aud_did = p.aud.split_once('#').map_or(p.aud.as_str(), |(did, _)| did);
    if crate::atp::syntax::Did::new(aud_did).is_err() {
        return Err(XrpcError::invalid_request("aud must be a valid did"));
    }
    if let Some(lxm) = &p.lxm
        && crate::atp::syntax::Nsid::new(lxm.as_str()).is_err()
    {
        return Err(XrpcError::invalid_request("lxm must be a valid nsid"));
    }
    if let Some(exp) = p.exp {
        let diff = exp - crate::db::now_unix();
        if diff < 0 {
            return Err(XrpcError::lexicon("BadExpiration", "expiration is in past"));
        } else if diff > 60 * 60 {
            return Err(XrpcError::lexicon(
                "BadExpiration",
                "cannot request a token with an expiration more than an hour in the future",
            ));
        } else if p.lxm.is_none() && diff > 60 {
            return Err(XrpcError::lexicon(
                "BadExpiration",
                "cannot request a method-less token with an expiration more than a minute in the future",
            ));
        }
    }
    if let Some(lxm) = p.lxm.as_deref() {
        if PROTECTED_METHODS.contains(&lxm) {
            return Err(XrpcError::invalid_request(format!(
                "cannot request a service auth token for the following protected method: {lxm}"
            )));
        }
        if !auth.scope.is_privileged() && PRIVILEGED_METHODS.contains(&lxm) {
            return Err(XrpcError::invalid_request(format!(
                "insufficient access to request a service auth token for the following method: {lxm}"
            )));
        }
    }
    let key = state.keys.repo_key(&auth.did)?;
    let token = crate::service_auth::mint(&key, &auth.did, &p.aud, p.lxm.as_deref(), p.exp);
    Ok(Json(json!({ "token": token })))
}

/// # `com.atproto.server.checkAccountStatus`
pub async fn check_account_status(State(state): State<AppState>, auth: Access) -> XrpcResult<Json<Value>> {
    let account = state
        .db
        .account_by_did(&auth.did)
        .await?
        .ok_or_else(|| XrpcError::lexicon("InvalidToken", "Account not found"))?;
    let root = state.db.repo_root(&auth.did).await?;
    let counts = state.db.repo_counts(&auth.did).await?;
    // "validDid": the DID document out there points at this server with our key.
    let key = state.keys.repo_key(&auth.did)?.public_key();
    // A did:web account's document is served by this server, from the same key.
    let valid_did = if auth.did.starts_with("did:web:") {
        true
    } else {
        match state.did_resolver.resolve(&auth.did).await {
            Ok(doc) => {
                crate::proxy::service_endpoint(&doc, &auth.did, "#atproto_pds").as_deref()
                    == Some(state.config.public_url().as_str())
                    && doc_key(&doc, &auth.did).is_some_and(|k| k == key)
            }
            Err(_) => false,
        }
    };
    Ok(Json(json!({
        "activated": account.status == "active",
        "validDid": valid_did,
        "repoCommit": root.as_ref().map(|r| r.commit_cid.to_string()),
        "repoRev": root.as_ref().map(|r| r.rev.clone()),
        "repoBlocks": counts.blocks,
        "indexedRecords": counts.records,
        "privateStateValues": counts.preferences,
        "expectedBlobs": counts.expected_blobs,
        "importedBlobs": counts.imported_blobs,
    })))
}

/// The `#atproto` key of a DID document, in the `Multikey` form or the
/// legacy 2019 key types (which the DID spec asks resolvers to accept).
fn doc_key(doc: &Value, did: &str) -> Option<crate::atp::keys::PublicKey> {
    use crate::atp::keys::{KeyAlgorithm, PublicKey};
    let vm = doc.get("verificationMethod")?.as_array()?.iter().find(|vm| {
        vm.get("id")
            .and_then(Value::as_str)
            .is_some_and(|id| id == "#atproto" || id.strip_prefix(did) == Some("#atproto"))
    })?;
    let multibase = vm.get("publicKeyMultibase")?.as_str()?;
    match vm.get("type")?.as_str()? {
        "Multikey" => PublicKey::from_multibase(multibase).ok(),
        legacy => PublicKey::from_legacy_multibase(
            KeyAlgorithm::from_legacy_verification_method(legacy)?,
            multibase,
        )
        .ok(),
    }
}

async fn account_of(state: &AppState, did: &str) -> XrpcResult<crate::db::accounts::AccountRow> {
    state.db.account_by_did(did).await?.ok_or_else(|| XrpcError::lexicon("InvalidToken", "Account not found"))
}

/// # `com.atproto.server.activateAccount`
pub async fn activate_account(State(state): State<AppState>, auth: Access) -> XrpcResult<Json<Value>> {
    auth.require_full()?;
    let account = account_of(&state, &auth.did).await?;
    if account.status == "takendown" {
        return Err(XrpcError::invalid_request("Account has been taken down"));
    }
    state.repo.set_account_active(&auth.did, &account.handle, true).await?;
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
pub struct DeactivateInput {
    #[serde(default, rename = "deleteAfter")]
    _delete_after: Option<String>,
}

/// # `com.atproto.server.deactivateAccount`
pub async fn deactivate_account(
    State(state): State<AppState>,
    auth: Access,
    XrpcJson(_input): XrpcJson<DeactivateInput>,
) -> XrpcResult<Json<Value>> {
    auth.require_full()?;
    let account = account_of(&state, &auth.did).await?;
    if account.status != "active" {
        return Err(XrpcError::invalid_request("Account is not active"));
    }
    state.repo.set_account_active(&auth.did, &account.handle, false).await?;
    Ok(Json(json!({})))
}

/// Purpose name and lifetime of the deleteAccount confirmation token.
const DELETE_TOKEN: &str = "delete_account";
const DELETE_TOKEN_LIFETIME_SECS: i64 = 15 * 60;

/// # `com.atproto.server.requestAccountDelete`
///
/// Roost sends no email yet: the token is stored and the operator reads it
/// with `roost account tokens <handle>` and passes it on.
pub async fn request_account_delete(State(state): State<AppState>, auth: Access) -> XrpcResult<Json<Value>> {
    auth.require_full()?;
    let token = crate::auth::random_token();
    state.db.put_account_token(&auth.did, DELETE_TOKEN, &token, DELETE_TOKEN_LIFETIME_SECS).await?;
    tracing::info!(did = %auth.did, "account deletion requested; token available through `roost account tokens`");
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
pub struct DeleteAccountInput {
    did: String,
    password: String,
    token: String,
}

/// # `com.atproto.server.deleteAccount` (no session: did + password + token)
pub async fn delete_account(
    State(state): State<AppState>,
    XrpcJson(input): XrpcJson<DeleteAccountInput>,
) -> XrpcResult<Json<Value>> {
    let Some(account) = state.db.account_by_did(&input.did).await? else {
        return Err(XrpcError::invalid_request("account not found"));
    };
    let hash = account.password_hash.clone();
    let ok = tokio::task::spawn_blocking(move || auth::verify_password(&input.password, &hash))
        .await
        .map_err(|e| XrpcError::internal(anyhow::anyhow!(e)))?;
    if !ok {
        return Err(XrpcError::auth_required("Invalid did or password"));
    }
    let expected = state.db.account_token(&account.did, DELETE_TOKEN).await?;
    let token_ok = expected.is_some_and(|t| {
        use subtle::ConstantTimeEq as _;
        bool::from(t.as_bytes().ct_eq(input.token.trim().as_bytes()))
    });
    if !token_ok {
        return Err(XrpcError::lexicon("InvalidToken", "Token is invalid"));
    }
    crate::accounts::delete_account(&state, &account.did).await?;
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
pub struct UpdateHandleInput {
    handle: String,
}

/// # `com.atproto.identity.updateHandle`
pub async fn update_handle(
    State(state): State<AppState>,
    auth: Access,
    XrpcJson(input): XrpcJson<UpdateHandleInput>,
) -> XrpcResult<Json<Value>> {
    auth.require_full()?;
    crate::accounts::change_handle(&state, &auth.did, &input.handle).await?;
    Ok(Json(json!({})))
}
