//! The `session` and `refresh_token` tables.

use sqlx::FromRow;

use super::{Db, now_unix};

#[derive(Debug, Clone, FromRow)]
pub struct SessionRow {
    pub id: String,
    pub did: String,
    pub scope: String,
}

#[derive(Debug, Clone, FromRow)]
pub struct RefreshRow {
    pub id: String,
    pub session_id: String,
    pub expires_at: i64,
    pub used_at: Option<i64>,
    pub next_id: Option<String>,
}

/// What happened when a refresh token was presented.
pub enum Rotation {
    /// First use: the successor was stored.
    Rotated,
    /// A retry within the grace window: reuse this successor.
    Replayed { next_id: String, next_expires_at: i64 },
    /// Unknown, expired, or reused after the grace window (session revoked).
    Rejected(&'static str),
}

impl Db {
    pub async fn create_session(
        &self,
        session_id: &str,
        did: &str,
        scope: &str,
        refresh_id: &str,
        refresh_expires_at: i64,
    ) -> Result<(), sqlx::Error> {
        let mut tx = self.begin_write().await?;
        sqlx::query("INSERT INTO session (id, did, scope, created_at) VALUES (?, ?, ?, ?)")
            .bind(session_id)
            .bind(did)
            .bind(scope)
            .bind(now_unix())
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO refresh_token (id, session_id, expires_at) VALUES (?, ?, ?)")
            .bind(refresh_id)
            .bind(session_id)
            .bind(refresh_expires_at)
            .execute(&mut *tx)
            .await?;
        tx.commit().await
    }

    pub async fn session(&self, id: &str) -> Result<Option<SessionRow>, sqlx::Error> {
        sqlx::query_as("SELECT id, did, scope FROM session WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
    }

    pub async fn delete_session(&self, id: &str) -> Result<(), sqlx::Error> {
        sqlx::query("DELETE FROM session WHERE id = ?").bind(id).execute(&self.pool).await.map(|_| ())
    }

    pub async fn refresh_token(&self, id: &str) -> Result<Option<RefreshRow>, sqlx::Error> {
        sqlx::query_as("SELECT id, session_id, expires_at, used_at, next_id FROM refresh_token WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
    }

    /// Consumes refresh token `id` and records `next_id` as its successor, in
    /// one transaction so two racing refreshes cannot both rotate it.
    pub async fn rotate_refresh_token(
        &self,
        id: &str,
        next_id: &str,
        next_expires_at: i64,
        grace_seconds: i64,
    ) -> Result<Rotation, sqlx::Error> {
        let now = now_unix();
        let mut tx = self.begin_write().await?;
        let row: Option<RefreshRow> = sqlx::query_as(
            "SELECT id, session_id, expires_at, used_at, next_id FROM refresh_token WHERE id = ?",
        )
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(Rotation::Rejected("Token has been revoked"));
        };
        if row.expires_at <= now {
            return Ok(Rotation::Rejected("Token has expired"));
        }
        if let (Some(used_at), Some(next)) = (row.used_at, row.next_id.clone()) {
            if now - used_at <= grace_seconds {
                let next_row: Option<RefreshRow> = sqlx::query_as(
                    "SELECT id, session_id, expires_at, used_at, next_id FROM refresh_token WHERE id = ?",
                )
                .bind(&next)
                .fetch_optional(&mut *tx)
                .await?;
                return Ok(match next_row {
                    Some(n) => Rotation::Replayed { next_id: n.id, next_expires_at: n.expires_at },
                    None => Rotation::Rejected("Token has been revoked"),
                });
            }
            // Reuse after the grace window: assume theft, end the session.
            sqlx::query("DELETE FROM session WHERE id = ?").bind(&row.session_id).execute(&mut *tx).await?;
            tx.commit().await?;
            return Ok(Rotation::Rejected("Token has been revoked"));
        }
        sqlx::query("UPDATE refresh_token SET used_at = ?, next_id = ? WHERE id = ?")
            .bind(now)
            .bind(next_id)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO refresh_token (id, session_id, expires_at) VALUES (?, ?, ?)")
            .bind(next_id)
            .bind(&row.session_id)
            .bind(next_expires_at)
            .execute(&mut *tx)
            .await?;
        // Used tokens stay until they expire: a replay of any of them, however
        // old, must be recognised as reuse (and revoke the session), not as an
        // unknown token.
        sqlx::query("DELETE FROM refresh_token WHERE session_id = ? AND expires_at < ?")
            .bind(&row.session_id)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Rotation::Rotated)
    }
}
