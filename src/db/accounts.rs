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
        let mut conn = self.pool.acquire().await?;
        insert_pending_account_in(&mut conn, row).await
    }

    pub async fn end_sessions(&self, did: &str) -> Result<(), sqlx::Error> {
        sqlx::query("DELETE FROM session WHERE did = ?").bind(did).execute(&self.pool).await.map(|_| ())
    }

    pub async fn set_password_hash(&self, did: &str, hash: &str) -> Result<bool, sqlx::Error> {
        let mut tx = self.begin_write().await?;
        let n = sqlx::query("UPDATE account SET password_hash = ? WHERE did = ?")
            .bind(hash)
            .bind(did)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        // A new password ends every session, app-password ones included.
        sqlx::query("DELETE FROM session WHERE did = ?").bind(did).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(n > 0)
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

pub(crate) async fn insert_pending_account_in(
    conn: &mut SqliteConnection,
    row: &AccountRow,
) -> Result<(), sqlx::Error> {
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
    .execute(conn)
    .await
    .map(|_| ())
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

pub(crate) async fn set_handle(
    conn: &mut SqliteConnection,
    did: &str,
    handle: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE account SET handle = ? WHERE did = ?")
        .bind(handle)
        .bind(did)
        .execute(conn)
        .await
        .map(|_| ())
}

/// Removes everything Roost holds for `did`: repository, records, blobs
/// (large-store objects are queued for deletion), its firehose history and
/// the account row (which cascades to sessions, app passwords, preferences
/// and tokens). Runs inside the caller's transaction.
pub(crate) async fn delete_account_in(conn: &mut SqliteConnection, did: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO blob_deletion (did, cid, tier, enqueued_at)
         SELECT did, cid, tier, ? FROM blob WHERE did = ? AND tier != 'sqlite'",
    )
    .bind(super::now_unix())
    .bind(did)
    .execute(&mut *conn)
    .await?;
    for statement in [
        "DELETE FROM blob WHERE did = ?",
        "DELETE FROM record_blob WHERE did = ?",
        "DELETE FROM block WHERE did = ?",
        "DELETE FROM record WHERE did = ?",
        "DELETE FROM seq_event WHERE did = ?",
        "DELETE FROM account WHERE did = ?",
    ] {
        sqlx::query(statement).bind(did).execute(&mut *conn).await?;
    }
    Ok(())
}

/// Counts for `com.atproto.server.checkAccountStatus`.
#[derive(Debug, Default)]
pub struct RepoCounts {
    pub blocks: i64,
    pub records: i64,
    pub preferences: i64,
    pub expected_blobs: i64,
    pub imported_blobs: i64,
}

impl Db {
    pub async fn repo_counts(&self, did: &str) -> Result<RepoCounts, sqlx::Error> {
        let count = |sql: &'static str| sqlx::query_scalar::<_, i64>(sql).bind(did).fetch_one(&self.pool);
        Ok(RepoCounts {
            blocks: count("SELECT COUNT(*) FROM block WHERE did = ?").await?,
            records: count("SELECT COUNT(*) FROM record WHERE did = ?").await?,
            preferences: count("SELECT COUNT(*) FROM preference WHERE did = ?").await?,
            expected_blobs: count("SELECT COUNT(DISTINCT blob_cid) FROM record_blob WHERE did = ?").await?,
            imported_blobs: count(
                "SELECT COUNT(*) FROM blob b WHERE did = ?1
                   AND EXISTS (SELECT 1 FROM record_blob r WHERE r.did = b.did AND r.blob_cid = b.cid)",
            )
            .await?,
        })
    }
}
