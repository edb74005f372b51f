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
