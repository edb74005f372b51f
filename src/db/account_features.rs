//! App passwords, preferences and out-of-band account tokens (migration 0010).

use sqlx::FromRow;

use super::{Db, now_unix};

#[derive(Debug, Clone, FromRow)]
pub struct AppPasswordRow {
    pub name: String,
    pub password_hash: String,
    pub privileged: bool,
    pub created_at: String,
}

/// Why an app password could not be created.
#[derive(Debug, thiserror::Error)]
pub enum AppPasswordError {
    #[error("A user already has an app password with this name")]
    Duplicate,
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

impl Db {
    pub async fn create_app_password(
        &self,
        did: &str,
        name: &str,
        password_hash: &str,
        privileged: bool,
        created_at: &str,
    ) -> Result<(), AppPasswordError> {
        let inserted = sqlx::query(
            "INSERT INTO app_password (did, name, password_hash, privileged, created_at) VALUES (?, ?, ?, ?, ?)
             ON CONFLICT (did, name) DO NOTHING",
        )
        .bind(did)
        .bind(name)
        .bind(password_hash)
        .bind(privileged)
        .bind(created_at)
        .execute(&self.pool)
        .await?;
        if inserted.rows_affected() == 0 {
            return Err(AppPasswordError::Duplicate);
        }
        Ok(())
    }

    pub async fn app_passwords(&self, did: &str) -> Result<Vec<AppPasswordRow>, sqlx::Error> {
        sqlx::query_as(
            "SELECT name, password_hash, privileged, created_at FROM app_password WHERE did = ? ORDER BY created_at DESC, name",
        )
        .bind(did)
        .fetch_all(&self.pool)
        .await
    }

    /// Deletes the app password and every session opened with it.
    pub async fn revoke_app_password(&self, did: &str, name: &str) -> Result<(), sqlx::Error> {
        let mut tx = self.begin_write().await?;
        sqlx::query("DELETE FROM app_password WHERE did = ? AND name = ?")
            .bind(did)
            .bind(name)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM session WHERE did = ? AND app_password_name = ?")
            .bind(did)
            .bind(name)
            .execute(&mut *tx)
            .await?;
        tx.commit().await
    }

    /// Names the app password a session was opened with (for revocation).
    pub async fn tag_session_app_password(&self, session_id: &str, name: &str) -> Result<(), sqlx::Error> {
        sqlx::query("UPDATE session SET app_password_name = ? WHERE id = ?")
            .bind(name)
            .bind(session_id)
            .execute(&self.pool)
            .await
            .map(|_| ())
    }

    /// The account's preferences whose type starts with `namespace` (e.g. `app.bsky`), in order.
    pub async fn preferences(
        &self,
        did: &str,
        namespace: &str,
    ) -> Result<Vec<(String, String)>, sqlx::Error> {
        let rows: Vec<(String, String)> =
            sqlx::query_as("SELECT type, value FROM preference WHERE did = ? ORDER BY position")
                .bind(did)
                .fetch_all(&self.pool)
                .await?;
        Ok(rows.into_iter().filter(|(t, _)| in_namespace(namespace, t)).collect())
    }

    /// Replaces the preferences in `namespace` that `replaceable` allows with
    /// `values` (type, JSON), keeping the others (e.g. full-access-only ones
    /// an app-password session may not see or touch).
    pub async fn put_preferences(
        &self,
        did: &str,
        namespace: &str,
        replaceable: impl Fn(&str) -> bool,
        values: &[(String, String)],
    ) -> Result<(), sqlx::Error> {
        let mut tx = self.begin_write().await?;
        let existing: Vec<(String, String)> =
            sqlx::query_as("SELECT type, value FROM preference WHERE did = ? ORDER BY position")
                .bind(did)
                .fetch_all(&mut *tx)
                .await?;
        let kept = existing.into_iter().filter(|(t, _)| !(in_namespace(namespace, t) && replaceable(t)));
        let all: Vec<(String, String)> = kept.chain(values.iter().cloned()).collect();
        sqlx::query("DELETE FROM preference WHERE did = ?").bind(did).execute(&mut *tx).await?;
        for (position, (kind, value)) in all.iter().enumerate() {
            sqlx::query("INSERT INTO preference (did, position, type, value) VALUES (?, ?, ?, ?)")
                .bind(did)
                .bind(position as i64)
                .bind(kind)
                .bind(value)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await
    }

    /// Stores a fresh token for `purpose`, replacing any earlier one.
    pub async fn put_account_token(
        &self,
        did: &str,
        purpose: &str,
        token: &str,
        lifetime_secs: i64,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO account_token (did, purpose, token, expires_at) VALUES (?, ?, ?, ?)
             ON CONFLICT (did, purpose) DO UPDATE SET token = excluded.token, expires_at = excluded.expires_at",
        )
        .bind(did)
        .bind(purpose)
        .bind(token)
        .bind(now_unix() + lifetime_secs)
        .execute(&self.pool)
        .await
        .map(|_| ())
    }

    /// The unexpired token for `purpose`, if any (for the admin CLI and checks).
    pub async fn account_token(&self, did: &str, purpose: &str) -> Result<Option<String>, sqlx::Error> {
        sqlx::query_scalar("SELECT token FROM account_token WHERE did = ? AND purpose = ? AND expires_at > ?")
            .bind(did)
            .bind(purpose)
            .bind(now_unix())
            .fetch_optional(&self.pool)
            .await
    }
}

/// `app.bsky` covers `app.bsky.actor.defs#adultContentPref`, not `app.bskyx.…`.
pub fn in_namespace(namespace: &str, kind: &str) -> bool {
    kind == namespace || kind.strip_prefix(namespace).is_some_and(|rest| rest.starts_with('.'))
}

#[cfg(test)]
mod tests {
    use super::in_namespace;

    #[test]
    fn namespace_matching_is_by_segment() {
        assert!(in_namespace("app.bsky", "app.bsky.actor.defs#adultContentPref"));
        assert!(in_namespace("app.bsky", "app.bsky"));
        assert!(!in_namespace("app.bsky", "app.bskyx.defs#x"));
        assert!(!in_namespace("app.bsky", "com.example.pref"));
    }
}

/// Why an invite code could not be used.
#[derive(Debug, thiserror::Error)]
pub enum InviteError {
    #[error("Provided invite code not available")]
    Unavailable,
    #[error("Handle already taken")]
    HandleTaken,
    #[error("Email already taken")]
    EmailTaken,
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

impl Db {
    pub async fn create_invite_codes(
        &self,
        codes: &[String],
        use_count: i64,
        for_account: &str,
        created_by: &str,
    ) -> Result<(), sqlx::Error> {
        let mut tx = self.begin_write().await?;
        for code in codes {
            sqlx::query(
                "INSERT INTO invite_code (code, available, for_account, created_by, created_at) VALUES (?, ?, ?, ?, ?)",
            )
            .bind(code)
            .bind(use_count)
            .bind(for_account)
            .bind(created_by)
            .bind(crate::repo::now_datetime())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await
    }

    /// Inserts a pending account, consuming one use of `invite` in the same
    /// transaction (so two signups cannot share the last use).
    pub async fn insert_pending_account_with_invite(
        &self,
        row: &super::accounts::AccountRow,
        invite: Option<&str>,
    ) -> Result<(), InviteError> {
        let mut tx = self.begin_write().await?;
        if let Some(code) = invite {
            let usable: Option<i64> = sqlx::query_scalar(
                "SELECT 1 FROM invite_code c WHERE c.code = ? AND c.disabled = 0
                   AND c.available > (SELECT COUNT(*) FROM invite_code_use u WHERE u.code = c.code)",
            )
            .bind(code)
            .fetch_optional(&mut *tx)
            .await?;
            if usable.is_none() {
                return Err(InviteError::Unavailable);
            }
            sqlx::query("INSERT INTO invite_code_use (code, used_by, used_at) VALUES (?, ?, ?)")
                .bind(code)
                .bind(&row.did)
                .bind(crate::repo::now_datetime())
                .execute(&mut *tx)
                .await?;
        }
        super::accounts::insert_pending_account_in(&mut tx, row).await.map_err(|e| match &e {
            sqlx::Error::Database(d) if d.is_unique_violation() && d.message().contains("email") => {
                InviteError::EmailTaken
            }
            sqlx::Error::Database(d) if d.is_unique_violation() => InviteError::HandleTaken,
            _ => InviteError::Db(e),
        })?;
        tx.commit().await?;
        Ok(())
    }

    /// Codes created for `did`, with their uses: (code, available, disabled, created_at, used_by list).
    pub async fn invite_codes_for(&self, did: &str) -> Result<Vec<InviteCodeRow>, sqlx::Error> {
        let codes: Vec<(String, i64, bool, String, String)> = sqlx::query_as(
            "SELECT code, available, disabled, created_by, created_at FROM invite_code WHERE for_account = ? ORDER BY created_at",
        )
        .bind(did)
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::with_capacity(codes.len());
        for (code, available, disabled, created_by, created_at) in codes {
            let uses: Vec<(String, String)> = sqlx::query_as(
                "SELECT used_by, used_at FROM invite_code_use WHERE code = ? ORDER BY used_at",
            )
            .bind(&code)
            .fetch_all(&self.pool)
            .await?;
            out.push(InviteCodeRow {
                code,
                available,
                disabled,
                for_account: did.to_owned(),
                created_by,
                created_at,
                uses,
            });
        }
        Ok(out)
    }
}

#[derive(Debug, Clone)]
pub struct InviteCodeRow {
    pub code: String,
    pub available: i64,
    pub disabled: bool,
    pub for_account: String,
    pub created_by: String,
    pub created_at: String,
    /// (used_by, used_at)
    pub uses: Vec<(String, String)>,
}
