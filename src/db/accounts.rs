//! The `account` table.

use sqlx::{FromRow, SqliteConnection};

use super::Db;

#[derive(Debug, Clone, FromRow)]
pub struct AccountRow {
    pub did: String,
    pub handle: String,
    pub email: Option<String>,
    pub password_hash: String,
    pub status: String,
    pub plc_genesis_op: Option<String>,
    pub created_at: String,
}

/// `SELECT <all account columns> FROM account <tail>`, as a static string.
macro_rules! select_account {
    ($tail:literal) => {
        concat!(
            "SELECT did, handle, email, password_hash, status, plc_genesis_op, created_at FROM account ",
            $tail
        )
    };
}

impl Db {
    pub async fn account_by_did(&self, did: &str) -> Result<Option<AccountRow>, sqlx::Error> {
        // Every authenticated request looks its account up: worth timing.
        let query = sqlx::query_as(select_account!("WHERE did = ?")).bind(did).fetch_optional(&self.pool);
        crate::telemetry::metrics::timed("account_by_did", query).await
    }

    pub async fn account_by_handle(&self, handle: &str) -> Result<Option<AccountRow>, sqlx::Error> {
        sqlx::query_as(select_account!("WHERE handle = ?")).bind(handle).fetch_optional(&self.pool).await
    }

    pub async fn account_by_email(&self, email: &str) -> Result<Option<AccountRow>, sqlx::Error> {
        sqlx::query_as(select_account!("WHERE email = ? COLLATE NOCASE"))
            .bind(email)
            .fetch_optional(&self.pool)
            .await
    }

    pub async fn insert_pending_account(&self, row: &AccountRow) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO account (did, handle, email, password_hash, status, plc_genesis_op, created_at)
             VALUES (?, ?, ?, ?, 'pending', ?, ?)",
        )
        .bind(&row.did)
        .bind(&row.handle)
        .bind(&row.email)
        .bind(&row.password_hash)
        .bind(&row.plc_genesis_op)
        .bind(&row.created_at)
        .execute(&self.pool)
        .await
        .map(|_| ())
    }

    /// Lists accounts in DID order after `cursor` (for `sync.listRepos`).
    pub async fn list_accounts(
        &self,
        after: Option<&str>,
        limit: i64,
    ) -> Result<Vec<AccountRow>, sqlx::Error> {
        sqlx::query_as(select_account!("WHERE status != 'pending' AND did > ? ORDER BY did LIMIT ?"))
            .bind(after.unwrap_or(""))
            .bind(limit)
            .fetch_all(&self.pool)
            .await
    }
}

pub(crate) async fn set_status(
    conn: &mut SqliteConnection,
    did: &str,
    status: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE account SET status = ? WHERE did = ?")
        .bind(status)
        .bind(did)
        .execute(conn)
        .await
        .map(|_| ())
}
