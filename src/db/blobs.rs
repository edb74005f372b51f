//! The `blob`, `record_blob` and `blob_deletion` tables.

use sqlx::{FromRow, Row, SqliteConnection};

use super::{Db, now_unix};

#[derive(Debug, Clone, FromRow)]
pub struct BlobRow {
    pub cid: String,
    pub mime_type: String,
    pub size: i64,
    pub tier: String,
}

#[derive(Debug, Clone, FromRow)]
pub struct PendingDeletion {
    pub id: i64,
    pub did: String,
    pub cid: String,
    pub tier: String,
}

/// A record's blob references, as stored with a commit.
pub struct BlobLink<'a> {
    pub collection: &'a str,
    pub rkey: &'a str,
    pub cid: String,
}

impl Db {
    pub async fn blob(&self, did: &str, cid: &str) -> Result<Option<BlobRow>, sqlx::Error> {
        sqlx::query_as("SELECT cid, mime_type, size, tier FROM blob WHERE did = ? AND cid = ?")
            .bind(did)
            .bind(cid)
            .fetch_optional(&self.pool)
            .await
    }

    pub async fn blob_data(&self, did: &str, cid: &str) -> Result<Option<Vec<u8>>, sqlx::Error> {
        sqlx::query_scalar("SELECT data FROM blob WHERE did = ? AND cid = ? AND tier = 'sqlite'")
            .bind(did)
            .bind(cid)
            .fetch_optional(&self.pool)
            .await
            .map(Option::flatten)
    }

    /// Restarts an unreferenced blob's unused TTL (it was uploaded again).
    pub async fn touch_blob(&self, did: &str, cid: &str) -> Result<(), sqlx::Error> {
        sqlx::query("UPDATE blob SET created_at = ? WHERE did = ? AND cid = ?")
            .bind(now_unix())
            .bind(did)
            .bind(cid)
            .execute(&self.pool)
            .await
            .map(|_| ())
    }

    /// Records an uploaded blob; a second upload of the same bytes is a no-op.
    pub async fn insert_blob(
        &self,
        did: &str,
        row: &BlobRow,
        data: Option<&[u8]>,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT OR IGNORE INTO blob (did, cid, mime_type, size, tier, data, created_at)
             VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(did)
        .bind(&row.cid)
        .bind(&row.mime_type)
        .bind(row.size)
        .bind(&row.tier)
        .bind(data)
        .bind(now_unix())
        .execute(&self.pool)
        .await
        .map(|_| ())
    }

    /// Blob CIDs referenced by records, in CID order (for `sync.listBlobs`).
    pub async fn list_blobs(
        &self,
        did: &str,
        since: Option<&str>,
        cursor: Option<&str>,
        limit: i64,
    ) -> Result<Vec<String>, sqlx::Error> {
        sqlx::query_scalar(
            "SELECT DISTINCT blob_cid FROM record_blob
             WHERE did = ? AND rev > ? AND blob_cid > ? ORDER BY blob_cid LIMIT ?",
        )
        .bind(did)
        .bind(since.unwrap_or(""))
        .bind(cursor.unwrap_or(""))
        .bind(limit)
        .fetch_all(&self.pool)
        .await
    }

    /// References to blobs this server does not have (after an import).
    pub async fn missing_blobs(
        &self,
        did: &str,
        cursor: Option<&str>,
        limit: i64,
    ) -> Result<Vec<(String, String, String)>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT r.blob_cid, r.collection, r.rkey FROM record_blob r
             WHERE r.did = ?1 AND r.blob_cid > ?2
               AND NOT EXISTS (SELECT 1 FROM blob b WHERE b.did = ?1 AND b.cid = r.blob_cid)
             ORDER BY r.blob_cid LIMIT ?3",
        )
        .bind(did)
        .bind(cursor.unwrap_or(""))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("blob_cid")?, r.try_get("collection")?, r.try_get("rkey")?)))
            .collect()
    }

    /// Count and bytes per tier.
    pub async fn blob_stats(&self) -> Result<Vec<(String, i64, i64)>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT tier, COUNT(*) AS n, COALESCE(SUM(size), 0) AS bytes FROM blob GROUP BY tier ORDER BY tier",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| Ok((r.try_get("tier")?, r.try_get("n")?, r.try_get("bytes")?))).collect()
    }

    /// Deletes blobs never referenced and older than `cutoff`; large-store
    /// objects are queued for deletion in the same transaction.
    pub async fn sweep_unused_blobs(&self, cutoff: i64) -> Result<u64, sqlx::Error> {
        let mut tx = self.begin_write().await?;
        sqlx::query(
            "INSERT INTO blob_deletion (did, cid, tier, enqueued_at)
             SELECT did, cid, tier, ?1 FROM blob b
             WHERE b.tier != 'sqlite' AND b.created_at < ?2
               AND NOT EXISTS (SELECT 1 FROM record_blob r WHERE r.did = b.did AND r.blob_cid = b.cid)",
        )
        .bind(now_unix())
        .bind(cutoff)
        .execute(&mut *tx)
        .await?;
        let n = sqlx::query(
            "DELETE FROM blob WHERE created_at < ?1
               AND NOT EXISTS (SELECT 1 FROM record_blob r WHERE r.did = blob.did AND r.blob_cid = blob.cid)",
        )
        .bind(cutoff)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok(n)
    }

    pub async fn pending_deletions(&self, limit: i64) -> Result<Vec<PendingDeletion>, sqlx::Error> {
        sqlx::query_as("SELECT id, did, cid, tier FROM blob_deletion ORDER BY id LIMIT ?")
            .bind(limit)
            .fetch_all(&self.pool)
            .await
    }

    pub async fn finish_deletion(&self, id: i64) -> Result<(), sqlx::Error> {
        sqlx::query("DELETE FROM blob_deletion WHERE id = ?").bind(id).execute(&self.pool).await.map(|_| ())
    }

    /// Large-tier blobs of one tier, for `roost blobs migrate`.
    pub async fn blobs_in_tier(
        &self,
        tier: &str,
        after: (&str, &str),
        limit: i64,
    ) -> Result<Vec<(String, String)>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT did, cid FROM blob WHERE tier = ? AND (did, cid) > (?, ?) ORDER BY did, cid LIMIT ?",
        )
        .bind(tier)
        .bind(after.0)
        .bind(after.1)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| Ok((r.try_get("did")?, r.try_get("cid")?))).collect()
    }

    pub async fn set_blob_tier(&self, did: &str, cid: &str, tier: &str) -> Result<(), sqlx::Error> {
        sqlx::query("UPDATE blob SET tier = ? WHERE did = ? AND cid = ?")
            .bind(tier)
            .bind(did)
            .bind(cid)
            .execute(&self.pool)
            .await
            .map(|_| ())
    }
}

/// Updates the record↔blob links of a commit and releases blobs that lost
/// their last reference: SQLite-tier rows go now, large-store objects are
/// queued for deletion (all in the commit's transaction).
/// [`Db::blob`] inside a transaction.
pub(crate) async fn blob_in(
    conn: &mut SqliteConnection,
    did: &str,
    cid: &str,
) -> Result<Option<BlobRow>, sqlx::Error> {
    sqlx::query_as("SELECT cid, mime_type, size, tier FROM blob WHERE did = ? AND cid = ?")
        .bind(did)
        .bind(cid)
        .fetch_optional(conn)
        .await
}

pub(crate) async fn relink_in(
    conn: &mut SqliteConnection,
    did: &str,
    rev: &str,
    cleared: &[(String, String)],
    added: &[BlobLink<'_>],
) -> Result<(), sqlx::Error> {
    let mut released: Vec<String> = Vec::new();
    for (collection, rkey) in cleared {
        let cids: Vec<String> = sqlx::query_scalar(
            "DELETE FROM record_blob WHERE did = ? AND collection = ? AND rkey = ? RETURNING blob_cid",
        )
        .bind(did)
        .bind(collection)
        .bind(rkey)
        .fetch_all(&mut *conn)
        .await?;
        released.extend(cids);
    }
    for link in added {
        sqlx::query(
            "INSERT OR IGNORE INTO record_blob (did, collection, rkey, blob_cid, rev) VALUES (?, ?, ?, ?, ?)",
        )
        .bind(did)
        .bind(link.collection)
        .bind(link.rkey)
        .bind(&link.cid)
        .bind(rev)
        .execute(&mut *conn)
        .await?;
    }
    released.sort();
    released.dedup();
    for cid in released {
        let still_used: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM record_blob WHERE did = ? AND blob_cid = ?)")
                .bind(did)
                .bind(&cid)
                .fetch_one(&mut *conn)
                .await?;
        if still_used {
            continue;
        }
        sqlx::query(
            "INSERT INTO blob_deletion (did, cid, tier, enqueued_at)
             SELECT did, cid, tier, ? FROM blob WHERE did = ? AND cid = ? AND tier != 'sqlite'",
        )
        .bind(now_unix())
        .bind(did)
        .bind(&cid)
        .execute(&mut *conn)
        .await?;
        sqlx::query("DELETE FROM blob WHERE did = ? AND cid = ?")
            .bind(did)
            .bind(&cid)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}
