//! Reads for read-after-write (`crate::read_after_write`): the account's
//! records written after the rev an AppView has indexed.

use cid::Cid;
use sqlx::Row;

use super::{Db, cid_from_bytes};

/// The collections whose fresh records are spliced into AppView responses.
pub const COLLECTIONS: [&str; 3] = ["app.bsky.feed.post", "app.bsky.feed.like", "app.bsky.actor.profile"];

/// A record written after some rev, with its block.
#[derive(Debug, Clone)]
pub struct RecentRecord {
    pub collection: String,
    pub rkey: String,
    pub cid: Cid,
    pub rev: String,
    /// The record's DAG-CBOR block.
    pub data: Vec<u8>,
}

impl Db {
    /// Up to `limit` records of `did` in [`COLLECTIONS`] written after `rev`,
    /// oldest first.
    ///
    /// Empty when no record of the account is at or before `rev`: the
    /// upstream's rev then does not come from this repository's history (an
    /// account migrated here, a reset clock), and every record would look
    /// fresh. The reference PDS applies the same check.
    pub async fn records_since_rev(
        &self,
        did: &str,
        rev: &str,
        limit: i64,
    ) -> Result<Vec<RecentRecord>, sqlx::Error> {
        // The `record` table has no rev index, but a record's block is
        // written in the record's commit, so `block_by_rev` finds the few
        // blocks since `rev` and `record_by_cid` maps them back to records.
        // (A record whose bytes equal an older live record's shares that
        // block's older rev and is missed: harmless for a display hint.)
        let rows = sqlx::query(
            "SELECT r.collection, r.rkey, r.cid, r.rev, b.data
             FROM block b JOIN record r ON r.did = b.did AND r.cid = b.cid
             WHERE b.did = ?1 AND b.rev > ?2 AND r.rev > ?2 AND r.collection IN (?3, ?4, ?5)
             ORDER BY r.rev ASC, r.collection, r.rkey LIMIT ?6",
        )
        .bind(did)
        .bind(rev)
        .bind(COLLECTIONS[0])
        .bind(COLLECTIONS[1])
        .bind(COLLECTIONS[2])
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let anchored: Option<i64> =
            sqlx::query_scalar("SELECT 1 FROM record WHERE did = ? AND rev <= ? LIMIT 1")
                .bind(did)
                .bind(rev)
                .fetch_optional(&self.pool)
                .await?;
        if anchored.is_none() {
            return Ok(Vec::new());
        }
        rows.iter()
            .map(|r| {
                Ok(RecentRecord {
                    collection: r.try_get("collection")?,
                    rkey: r.try_get("rkey")?,
                    cid: cid_from_bytes(r.try_get::<&[u8], _>("cid")?)?,
                    rev: r.try_get("rev")?,
                    data: r.try_get("data")?,
                })
            })
            .collect()
    }
}
