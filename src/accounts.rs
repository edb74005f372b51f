//! Creating accounts: the configured one at first start and, by invite,
//! more through `com.atproto.server.createAccount`.
//!
//! Crash safety: the pending row, its repo key and the signed genesis op are
//! stored before the PLC directory hears of the DID, so a crash at any step
//! resumes with the same DID ([`finish_pending`]) instead of minting another.

use anyhow::Context as _;

use crate::app::AppState;
use crate::auth::hash_password;
use crate::config::DidMethod;
use crate::db::account_features::InviteError;
use crate::db::accounts::AccountRow;
use crate::identity::genesis_op;

#[derive(Debug, thiserror::Error)]
pub enum CreateAccountError {
    #[error("{0}")]
    InvalidHandle(String),
    #[error("Handle already taken: {0}")]
    HandleNotAvailable(String),
    #[error("No invite code provided")]
    InviteRequired,
    #[error("Provided invite code not available")]
    InvalidInviteCode,
    #[error("Email already taken")]
    EmailTaken,
    #[error("Password must be at least 8 characters")]
    WeakPassword,
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

pub struct NewAccount<'a> {
    pub did_method: DidMethod,
    pub handle: &'a str,
    pub email: Option<&'a str>,
    pub password: &'a str,
    pub invite: Option<&'a str>,
}

/// Checks a new handle: syntax, one of our domains, free.
pub async fn check_new_handle(state: &AppState, handle: &str) -> Result<String, CreateAccountError> {
    let handle = handle.trim().to_ascii_lowercase();
    crate::atp::syntax::Handle::new(handle.clone())
        .map_err(|e| CreateAccountError::InvalidHandle(e.to_string()))?;
    if !state.config.is_service_handle(&handle) {
        return Err(CreateAccountError::InvalidHandle(format!(
            "Not a supported handle domain (supported: {})",
            state.config.service_handle_domains.join(", ")
        )));
    }
    if state.db.account_by_handle(&handle).await.map_err(anyhow::Error::from)?.is_some() {
        return Err(CreateAccountError::HandleNotAvailable(handle));
    }
    Ok(handle)
}

/// Creates an account through to its first commit. `check_invite` is false
/// for the operator's own paths (configured account, admin CLI).
pub async fn create_account(
    state: &AppState,
    new: NewAccount<'_>,
    check_invite: bool,
) -> Result<AccountRow, CreateAccountError> {
    let handle = check_new_handle(state, new.handle).await?;
    if new.password.chars().count() < 8 {
        return Err(CreateAccountError::WeakPassword);
    }
    let invite = if check_invite && state.config.invite_required {
        Some(new.invite.filter(|c| !c.is_empty()).ok_or(CreateAccountError::InviteRequired)?)
    } else {
        None
    };
    let row = pending_row(state, &handle, new.email, new.password, new.did_method)?;
    match state.db.insert_pending_account_with_invite(&row, invite).await {
        Ok(()) => {}
        Err(InviteError::Unavailable) => return Err(CreateAccountError::InvalidInviteCode),
        Err(InviteError::HandleTaken) => return Err(CreateAccountError::HandleNotAvailable(handle)),
        Err(InviteError::EmailTaken) => return Err(CreateAccountError::EmailTaken),
        Err(InviteError::Db(e)) => return Err(anyhow::Error::from(e).into()),
    }
    finish_pending(state, &row).await?;
    Ok(AccountRow { status: "active".into(), ..row })
}

/// A pending row with a fresh repo key (saved, 0600) and, for did:plc, the
/// signed genesis op.
pub fn pending_row(
    state: &AppState,
    handle: &str,
    email: Option<&str>,
    password: &str,
    method: DidMethod,
) -> anyhow::Result<AccountRow> {
    let repo_key = crate::atp::keys::SigningKey::generate();
    let (did, genesis_op_json) = match method {
        DidMethod::Plc => {
            let genesis = genesis_op(
                state.keys.rotation_key(),
                &repo_key.public_key(),
                handle,
                &state.config.public_url(),
            )?;
            (genesis.did, Some(genesis.op.to_string()))
        }
        DidMethod::Web => {
            // Served from https://<handle>/.well-known/did.json, which must reach
            // this server: one of its handle domains or its own hostname.
            anyhow::ensure!(
                state.config.is_service_handle(handle) || handle == state.config.hostname,
                "a did:web account needs a handle under {} (its DID document is served here)",
                state.config.service_handle_domains.join(", ")
            );
            (format!("did:web:{handle}"), None)
        }
    };
    state.keys.save_repo_key(&did, &repo_key)?;
    Ok(AccountRow {
        did,
        handle: handle.to_owned(),
        email: email.map(|e| e.trim().to_ascii_lowercase()),
        password_hash: hash_password(password)?,
        status: "pending".into(),
        plc_genesis_op: genesis_op_json,
        created_at: crate::repo::now_datetime(),
    })
}

/// Registers a pending account's DID with PLC (idempotent) and makes its
/// first commit if there is none yet.
pub async fn finish_pending(state: &AppState, account: &AccountRow) -> anyhow::Result<()> {
    if let Some(op) = account.plc_genesis_op.as_deref() {
        let op: serde_json::Value = serde_json::from_str(op).context("stored genesis op")?;
        state.plc.submit(&account.did, &op).await.context("registering the DID with the PLC directory")?;
    }
    let key = state.keys.repo_key(&account.did)?;
    if state.db.repo_root(&account.did).await?.is_none() {
        state.repo.create_empty_repo(&account.did, &account.handle, &key).await?;
    }
    tracing::info!(did = %account.did, handle = %account.handle, "account ready");
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    #[error("{0}")]
    Invalid(String),
    #[error("Handle already taken: {0}")]
    Taken(String),
    #[error("Not a supported handle domain")]
    UnsupportedDomain,
    #[error("External handle did not resolve to DID")]
    DidMismatch,
    #[error("Account not found")]
    NoAccount,
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

/// Gives `did` a new handle: checks it (ours and free, or pointing at the DID
/// by DNS/HTTPS), signs and submits the PLC update, then stores it and emits
/// `#identity` (also when unchanged, so a consumer that missed the last
/// change can recover, as the reference PDS does).
pub async fn change_handle(state: &AppState, did: &str, handle: &str) -> Result<(), HandleError> {
    let handle = handle.trim().to_ascii_lowercase();
    crate::atp::syntax::Handle::new(handle.clone()).map_err(|e| HandleError::Invalid(e.to_string()))?;
    let account =
        state.db.account_by_did(did).await.map_err(anyhow::Error::from)?.ok_or(HandleError::NoAccount)?;
    if state.config.is_service_handle(&handle) {
        if let Some(other) = state.db.account_by_handle(&handle).await.map_err(anyhow::Error::from)?
            && other.did != did
        {
            return Err(HandleError::Taken(handle));
        }
    } else if handle.ends_with(".test") && !state.config.dev_mode {
        return Err(HandleError::UnsupportedDomain);
    } else if state.handle_resolver.resolve(&handle).await.as_deref() != Some(did) {
        return Err(HandleError::DidMismatch);
    }
    if handle != account.handle && did.starts_with("did:plc:") {
        let key = state.keys.repo_key(did)?.public_key();
        let prev = state.plc.last_op(did).await?;
        let op = crate::identity::update_handle_op(
            state.keys.rotation_key(),
            &key,
            &handle,
            &state.config.public_url(),
            &prev,
        )?;
        state.plc.submit(did, &op).await?;
    }
    state.repo.set_handle(did, &handle).await.map_err(|e| match e {
        crate::repo::RepoError::InvalidRequest(_) => HandleError::Taken(handle.clone()),
        other => HandleError::Internal(anyhow::anyhow!(other)),
    })
}

/// Deletes an account and everything it holds (`RepoService::delete_account`,
/// one transaction with its `#account deleted` event), then its key file, then
/// the large blobs that transaction queued (the periodic sweep retries).
pub async fn delete_account(state: &AppState, did: &str) -> anyhow::Result<()> {
    state.repo.delete_account(did).await.map_err(|e| anyhow::anyhow!(e))?;
    state.keys.remove_repo_key(did)?;
    if let Err(e) = state.blobs.process_deletions().await {
        tracing::warn!(error = %e, "deleting the account's blobs failed; the sweep retries");
    }
    Ok(())
}
