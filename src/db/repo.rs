//! The `repo_root`, `block` and `record` tables.

use std::sync::Arc;

use cid::Cid;
use futures::TryStreamExt;
use sqlx::{Row, SqliteConnection};

use super::{Db, cid_from_bytes};
use crate::telemetry::metrics::timed;

#[derive(Debug, Clone)]
pub struct RepoRoot {
    pub commit_cid: Cid,
    pub data_cid: Cid,
    pub rev: String,
}

#[derive(Debug, Clone)]
pub struct RecordRow {
    pub collection: String,
    pub rkey: String,
    pub cid: Cid,
}

pub enum RepoItem {
    Root(RepoRoot),
    Block(Cid, Vec<u8>),
}

/// Everything one commit changes, persisted in a single transaction.
pub struct CommitWrite<'a> {
    pub did: &'a str,
    pub previous_commit: Option<Cid>,
    pub root: RepoRoot,
    /// New blocks: MST nodes, record blocks and the commit block.
    pub new_blocks: &'a [(Cid, Vec<u8>)],
    /// MST nodes (and the old commit) that became unreachable.
    pub removed_blocks: &'a [Cid],
    pub upserts: &'a [RecordRow],
    pub deletes: &'a [(String, String)],
    /// Record blocks that may have lost their last reference.
    pub released_record_cids: &'a [Cid],
}

#[derive(Debug, thiserror::Error)]
pub enum CommitPersistError {
    #[error("the repository moved on while this commit was prepared")]
    Conflict,
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

fn root_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<RepoRoot, sqlx::Error> {
    Ok(RepoRoot {
        commit_cid: cid_from_bytes(row.try_get::<&[u8], _>("commit_cid")?)?,
        data_cid: cid_from_bytes(row.try_get::<&[u8], _>("data_cid")?)?,
        rev: row.try_get("rev")?,
    })
}

impl Db {
    pub async fn repo_root(&self, did: &str) -> Result<Option<RepoRoot>, sqlx::Error> {
        let query = sqlx::query("SELECT commit_cid, data_cid, rev FROM repo_root WHERE did = ?")
            .bind(did)
            .fetch_optional(&self.pool);
        let row = timed("repo_root", query).await?;
        row.as_ref().map(root_from_row).transpose()
    }

    pub async fn block(&self, did: &str, cid: &Cid) -> Result<Option<Arc<[u8]>>, sqlx::Error> {
        let query = sqlx::query("SELECT data FROM block WHERE did = ? AND cid = ?")
            .bind(did)
            .bind(cid.to_bytes())
            .fetch_optional(&self.pool);
        let row = timed("block", query).await?;
        row.map(|r| r.try_get::<Vec<u8>, _>("data").map(Arc::from)).transpose()
    }

    pub async fn record(&self, did: &str, collection: &str, rkey: &str) -> Result<Option<Cid>, sqlx::Error> {
        let query = sqlx::query("SELECT cid FROM record WHERE did = ? AND collection = ? AND rkey = ?")
            .bind(did)
            .bind(collection)
            .bind(rkey)
            .fetch_optional(&self.pool);
        let row = timed("record", query).await?;
        row.map(|r| cid_from_bytes(r.try_get::<&[u8], _>("cid")?)).transpose()
    }

    /// A page of records of one collection, by record key.
    pub async fn list_records(
        &self,
        did: &str,
        collection: &str,
        cursor: Option<&str>,
        limit: i64,
        reverse: bool,
    ) -> Result<Vec<RecordRow>, sqlx::Error> {
        // Default order is newest first: TID keys sort by time.
        let sql = if reverse {
            "SELECT collection, rkey, cid FROM record WHERE did = ? AND collection = ? AND rkey > ?
             ORDER BY rkey ASC LIMIT ?"
        } else {
            "SELECT collection, rkey, cid FROM record WHERE did = ? AND collection = ? AND rkey < ?
             ORDER BY rkey DESC LIMIT ?"
        };
        let bound = match (cursor, reverse) {
            (Some(c), _) => c.to_owned(),
            (None, true) => String::new(),
            // Record keys are printable ASCII, all below U+FFFF.
            (None, false) => "\u{ffff}".to_owned(),
        };
        let query = sqlx::query(sql).bind(did).bind(collection).bind(bound).bind(limit).fetch_all(&self.pool);
        let rows = timed("list_records", query).await?;
        rows.iter()
            .map(|r| {
                Ok(RecordRow {
                    collection: r.try_get("collection")?,
                    rkey: r.try_get("rkey")?,
                    cid: cid_from_bytes(r.try_get::<&[u8], _>("cid")?)?,
                })
            })
            .collect()
    }

    pub async fn collections(&self, did: &str) -> Result<Vec<String>, sqlx::Error> {
        sqlx::query_scalar("SELECT DISTINCT collection FROM record WHERE did = ? ORDER BY collection")
            .bind(did)
            .fetch_all(&self.pool)
            .await
    }

    /// Persists a commit: blocks in and out, record index, new root. The root
    /// update is conditional on the previous commit, so a lost race fails
    /// instead of forking the repository.
    pub async fn persist_commit(&self, w: CommitWrite<'_>) -> Result<(), CommitPersistError> {
        timed("persist_commit", async {
            let mut tx = self.begin_write().await?;
            persist_commit_in(&mut tx, w).await?;
            tx.commit().await?;
            Ok(())
        })
        .await
    }

    /// Streams a repository inside one read transaction: first the root that
    /// transaction sees, then every block (only those written after `since`
    /// when given), one at a time into `sink`. Stops early when the receiver
    /// goes away. Returns false when the account has no repository.
    pub async fn stream_repo_blocks(
        &self,
        did: &str,
        since: Option<&str>,
        sink: tokio::sync::mpsc::Sender<RepoItem>,
    ) -> Result<bool, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let root = sqlx::query("SELECT commit_cid, data_cid, rev FROM repo_root WHERE did = ?")
            .bind(did)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(root) = root.as_ref().map(root_from_row).transpose()? else {
            return Ok(false);
        };
        if sink.send(RepoItem::Root(root)).await.is_err() {
            return Ok(true);
        }
        // A full export must not filter on `rev`: SQLite would then walk `block_by_rev` and
        // fetch every row by primary key, ~20x slower than a primary-key range scan at 1M
        // records (BENCHMARKS.md, "Full export walks the wrong index").
        let mut rows = match since {
            Some(since) => sqlx::query("SELECT cid, data FROM block WHERE did = ? AND rev > ?")
                .bind(did)
                .bind(since)
                .fetch(&mut *tx),
            None => sqlx::query("SELECT cid, data FROM block WHERE did = ?").bind(did).fetch(&mut *tx),
        };
        while let Some(row) = rows.try_next().await? {
            let cid = cid_from_bytes(row.try_get::<&[u8], _>("cid")?)?;
            if sink.send(RepoItem::Block(cid, row.try_get("data")?)).await.is_err() {
                break;
            }
        }
        Ok(true)
    }
}

pub(crate) async fn persist_commit_in(
    conn: &mut SqliteConnection,
    w: CommitWrite<'_>,
) -> Result<(), CommitPersistError> {
    let updated = match w.previous_commit {
        Some(prev) => sqlx::query(
            "UPDATE repo_root SET commit_cid = ?, data_cid = ?, rev = ? WHERE did = ? AND commit_cid = ?",
        )
        .bind(w.root.commit_cid.to_bytes())
        .bind(w.root.data_cid.to_bytes())
        .bind(&w.root.rev)
        .bind(w.did)
        .bind(prev.to_bytes())
        .execute(&mut *conn)
        .await?
        .rows_affected(),
        None => sqlx::query("INSERT INTO repo_root (did, commit_cid, data_cid, rev) VALUES (?, ?, ?, ?)")
            .bind(w.did)
            .bind(w.root.commit_cid.to_bytes())
            .bind(w.root.data_cid.to_bytes())
            .bind(&w.root.rev)
            .execute(&mut *conn)
            .await?
            .rows_affected(),
    };
    if updated != 1 {
        return Err(CommitPersistError::Conflict);
    }
    for cid in w.removed_blocks {
        sqlx::query("DELETE FROM block WHERE did = ? AND cid = ?")
            .bind(w.did)
            .bind(cid.to_bytes())
            .execute(&mut *conn)
            .await?;
    }
    for (cid, data) in w.new_blocks {
        sqlx::query("INSERT OR IGNORE INTO block (did, cid, data, rev) VALUES (?, ?, ?, ?)")
            .bind(w.did)
            .bind(cid.to_bytes())
            .bind(data.as_slice())
            .bind(&w.root.rev)
            .execute(&mut *conn)
            .await?;
    }
    for (collection, rkey) in w.deletes {
        sqlx::query("DELETE FROM record WHERE did = ? AND collection = ? AND rkey = ?")
            .bind(w.did)
            .bind(collection)
            .bind(rkey)
            .execute(&mut *conn)
            .await?;
    }
    for r in w.upserts {
        sqlx::query(
            "INSERT INTO record (did, collection, rkey, cid, rev) VALUES (?, ?, ?, ?, ?)
             ON CONFLICT (did, collection, rkey) DO UPDATE SET cid = excluded.cid, rev = excluded.rev",
        )
        .bind(w.did)
        .bind(&r.collection)
        .bind(&r.rkey)
        .bind(r.cid.to_bytes())
        .bind(&w.root.rev)
        .execute(&mut *conn)
        .await?;
    }
    // A record block goes when no record of this account points at it any more
    // (two records can share one block when their content is identical).
    for cid in w.released_record_cids {
        sqlx::query(
            "DELETE FROM block WHERE did = ?1 AND cid = ?2
             AND NOT EXISTS (SELECT 1 FROM record WHERE did = ?1 AND cid = ?2)",
        )
        .bind(w.did)
        .bind(cid.to_bytes())
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}
