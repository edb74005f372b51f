//! The repository service: the one write path, and the reads that need the MST.
//!
//! `RepoService::apply_writes` runs under a per-DID lock: it reads the current
//! root, edits the MST through the pure core (nodes are fetched on demand from
//! SQLite through a bounded cache), signs the commit and persists blocks,
//! records, removed blocks and the new root in one transaction. Nothing else
//! writes repository tables.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

use cid::Cid;
use ipld_core::ipld::Ipld;

use crate::atp::commit;
use crate::atp::data::{cid_for_cbor, encode_cbor};
use crate::atp::event::{self, CommitEvent, RepoOp};
use crate::atp::keys::SigningKey;
use crate::atp::mst::{BlockSource, MstEditor, MstError, OpChange, covering_proof};
use crate::atp::syntax::{Nsid, RecordKey, Tid, TidClock};
use crate::db::Db;
use crate::db::blobs::BlobLink;
use crate::db::repo::{CommitPersistError, CommitWrite, RecordRow, RepoRoot};
use crate::db::seq::append_event;
use crate::sequencer::Sequencer;

/// Largest record accepted, as encoded DAG-CBOR (the reference PDS's limit).
pub const MAX_RECORD_BYTES: usize = 1024 * 1024;

/// MST nodes kept decoded-ready in memory across requests.
const NODE_CACHE_ENTRIES: usize = 32 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error("{0}")]
    InvalidSwap(String),
    #[error("{0}")]
    InvalidRequest(String),
    #[error("Could not find repo: {0}")]
    RepoNotFound(String),
    #[error("Could not find blob: {0}")]
    BlobNotFound(String),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl From<sqlx::Error> for RepoError {
    fn from(e: sqlx::Error) -> Self {
        RepoError::Internal(e.into())
    }
}

impl From<MstError> for RepoError {
    fn from(e: MstError) -> Self {
        RepoError::Internal(e.into())
    }
}

/// Expected state of a record before a write (`swapRecord`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Swap {
    Any,
    MustNotExist,
    Is(Cid),
}

#[derive(Debug, Clone)]
pub enum Write {
    Create { collection: Nsid, rkey: RecordKey, value: Ipld },
    Update { collection: Nsid, rkey: RecordKey, value: Ipld, swap: Swap },
    Delete { collection: Nsid, rkey: RecordKey, swap: Swap },
}

#[derive(Debug, Clone)]
pub enum WriteResult {
    Create { collection: Nsid, rkey: RecordKey, cid: Cid },
    Update { collection: Nsid, rkey: RecordKey, cid: Cid },
    Delete,
}

#[derive(Debug, Clone)]
pub struct CommitInfo {
    pub cid: Cid,
    pub rev: String,
}

#[derive(Debug)]
pub struct ApplyOutcome {
    /// None when every write was a no-op and no commit was made.
    pub commit: Option<CommitInfo>,
    pub results: Vec<WriteResult>,
    /// Some blob lost its last reference (large-store objects await deletion).
    pub released_blobs: bool,
}

/// A bounded, shared cache of blocks by CID. CIDs are content hashes, so an
/// entry can never be stale.
#[derive(Clone)]
pub struct BlockCache(Arc<Mutex<lru::LruCache<Cid, Arc<[u8]>>>>);

impl BlockCache {
    pub fn new(entries: usize) -> Self {
        let cap = NonZeroUsize::new(entries).unwrap_or(NonZeroUsize::MIN);
        BlockCache(Arc::new(Mutex::new(lru::LruCache::new(cap))))
    }

    fn get(&self, cid: &Cid) -> Option<Arc<[u8]>> {
        self.0.lock().ok()?.get(cid).cloned()
    }

    fn put(&self, cid: Cid, bytes: Arc<[u8]>) {
        if let Ok(mut cache) = self.0.lock() {
            cache.put(cid, bytes);
        }
    }
}

/// One account's blocks in SQLite, read through the cache.
pub struct DbBlocks<'a> {
    db: &'a Db,
    did: &'a str,
    cache: &'a BlockCache,
}

impl BlockSource for DbBlocks<'_> {
    async fn get_block(&self, cid: &Cid) -> Result<Option<Arc<[u8]>>, MstError> {
        if let Some(hit) = self.cache.get(cid) {
            return Ok(Some(hit));
        }
        let block = self.db.block(self.did, cid).await.map_err(|e| MstError::Store(e.to_string()))?;
        if let Some(bytes) = &block {
            self.cache.put(*cid, bytes.clone());
        }
        Ok(block)
    }
}

/// Blocks of a commit being prepared, over the stored ones.
struct Overlay<'a> {
    top: HashMap<Cid, Arc<[u8]>>,
    base: DbBlocks<'a>,
}

impl BlockSource for Overlay<'_> {
    async fn get_block(&self, cid: &Cid) -> Result<Option<Arc<[u8]>>, MstError> {
        match self.top.get(cid) {
            Some(hit) => Ok(Some(hit.clone())),
            None => self.base.get_block(cid).await,
        }
    }
}

pub struct RepoService {
    db: Db,
    cache: BlockCache,
    /// Per-DID write locks: one commit at a time per repository.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    clock: Mutex<TidClock>,
    sequencer: Arc<Sequencer>,
}

pub(crate) fn now_datetime() -> String {
    crate::atp::syntax::Datetime::from_offset(time::OffsetDateTime::now_utc()).to_string()
}

/// A CAR holding `root` first and then `blocks`.
fn car_of(root: Cid, blocks: &[(Cid, &[u8])]) -> Vec<u8> {
    let mut out = crate::atp::car::encode_header(&[root]);
    for (cid, data) in blocks {
        out.extend(crate::atp::car::encode_block(cid, data));
    }
    out
}

impl RepoService {
    pub fn new(db: Db, sequencer: Arc<Sequencer>) -> Self {
        // A random clock id makes two processes' TIDs distinct even in the same microsecond.
        let clock_id = rand::random::<u16>() & 0x3ff;
        RepoService {
            db,
            cache: BlockCache::new(NODE_CACHE_ENTRIES),
            locks: Mutex::new(HashMap::new()),
            clock: Mutex::new(TidClock::new(clock_id)),
            sequencer,
        }
    }

    pub fn blocks<'a>(&'a self, did: &'a str) -> DbBlocks<'a> {
        DbBlocks { db: &self.db, did, cache: &self.cache }
    }

    fn lock_for(&self, did: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(did.to_owned()).or_default().clone()
    }

    /// A fresh TID, strictly after `floor` (revs must increase even if the
    /// wall clock steps back across a restart).
    pub fn next_tid(&self, floor: Option<&str>) -> Tid {
        let now = time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1000;
        let now = u64::try_from(now).unwrap_or(0);
        let mut clock = self.clock.lock().unwrap_or_else(|p| p.into_inner());
        match floor.and_then(|f| Tid::new(f).ok()) {
            Some(floor) => clock.next_after(now, &floor),
            None => clock.next(now),
        }
    }

    /// Creates the first commit (an empty tree) of a new repository, and
    /// announces the account on the firehose (`#identity`, `#account`, `#sync`).
    pub async fn create_empty_repo(
        &self,
        did: &str,
        handle: &str,
        key: &SigningKey,
    ) -> Result<CommitInfo, RepoError> {
        let lock = self.lock_for(did);
        let _guard = lock.lock().await;
        if self.db.repo_root(did).await?.is_some() {
            return Err(RepoError::InvalidRequest(format!("repository {did} already exists")));
        }
        let store = self.blocks(did);
        let editor = MstEditor::empty(&store)?;
        let diff = editor.finish();
        let rev = self.next_tid(None);
        let signed = commit::sign(did, rev.as_str(), diff.root, key).map_err(anyhow::Error::from)?;
        let sync_car = car_of(signed.cid, &[(signed.cid, &signed.bytes)]);
        let mut blocks = diff.new_blocks;
        blocks.push((signed.cid, signed.bytes));
        let time = now_datetime();
        let _seq_guard = self.sequencer.write_lock().await;
        let mut tx = self.db.begin_write().await?;
        crate::db::repo::persist_commit_in(
            &mut tx,
            CommitWrite {
                did,
                previous_commit: None,
                root: RepoRoot { commit_cid: signed.cid, data_cid: diff.root, rev: rev.to_string() },
                new_blocks: &blocks,
                removed_blocks: &[],
                upserts: &[],
                deletes: &[],
                released_record_cids: &[],
            },
        )
        .await
        .map_err(persist_error)?;
        crate::db::accounts::set_status(&mut tx, did, "active").await?;
        let frames = vec![
            append_event(&mut tx, did, "identity", |seq| {
                Ok(event::identity_frame(seq, did, Some(handle), &time)?)
            })
            .await?,
            append_event(&mut tx, did, "account", |seq| {
                Ok(event::account_frame(seq, did, true, None, &time)?)
            })
            .await?,
            append_event(&mut tx, did, "sync", |seq| {
                Ok(event::sync_frame(seq, did, sync_car, rev.as_str(), &time)?)
            })
            .await?,
        ];
        tx.commit().await?;
        crate::telemetry::metrics::record_commit(0, 0, 0, blocks.len() as u64);
        self.sequencer.publish(frames);
        Ok(CommitInfo { cid: signed.cid, rev: rev.to_string() })
    }

    /// Sets an account `active` or `deactivated` and emits what the sync spec
    /// asks for, in one transaction: `#account`, and on activation also
    /// `#identity` and `#sync` (consumers may have dropped the repo meanwhile).
    pub async fn set_account_active(&self, did: &str, handle: &str, active: bool) -> Result<(), RepoError> {
        self.set_account_status(did, handle, if active { "active" } else { "deactivated" }).await
    }

    /// Sets `active`, `deactivated` or `takendown`, with the events above.
    pub async fn set_account_status(&self, did: &str, handle: &str, status: &str) -> Result<(), RepoError> {
        let active = status == "active";
        let lock = self.lock_for(did);
        let _guard = lock.lock().await;
        let root = self.db.repo_root(did).await?.ok_or_else(|| RepoError::RepoNotFound(did.to_owned()))?;
        let commit_bytes = self
            .db
            .block(did, &root.commit_cid)
            .await?
            .ok_or_else(|| RepoError::Internal(anyhow::anyhow!("commit block of {did} is missing")))?;
        let time = now_datetime();
        let _seq_guard = self.sequencer.write_lock().await;
        let mut tx = self.db.begin_write().await?;
        crate::db::accounts::set_status(&mut tx, did, status).await?;
        let mut frames = Vec::new();
        if active {
            frames.push(
                append_event(&mut tx, did, "identity", |seq| {
                    Ok(event::identity_frame(seq, did, Some(handle), &time)?)
                })
                .await?,
            );
        }
        let inactive_status = (!active).then_some(status);
        frames.push(
            append_event(&mut tx, did, "account", |seq| {
                Ok(event::account_frame(seq, did, active, inactive_status, &time)?)
            })
            .await?,
        );
        if active {
            let car = car_of(root.commit_cid, &[(root.commit_cid, &commit_bytes)]);
            frames.push(
                append_event(&mut tx, did, "sync", |seq| {
                    Ok(event::sync_frame(seq, did, car, &root.rev, &time)?)
                })
                .await?,
            );
        }
        tx.commit().await?;
        self.sequencer.publish(frames);
        Ok(())
    }

    /// Records a new handle and emits `#identity` in the same transaction.
    pub async fn set_handle(&self, did: &str, handle: &str) -> Result<(), RepoError> {
        let time = now_datetime();
        let _seq_guard = self.sequencer.write_lock().await;
        let mut tx = self.db.begin_write().await?;
        crate::db::accounts::set_handle(&mut tx, did, handle).await.map_err(|e| match &e {
            sqlx::Error::Database(d) if d.is_unique_violation() => {
                RepoError::InvalidRequest("Handle already taken".into())
            }
            _ => RepoError::from(e),
        })?;
        let frame = append_event(&mut tx, did, "identity", |seq| {
            Ok(event::identity_frame(seq, did, Some(handle), &time)?)
        })
        .await?;
        tx.commit().await?;
        self.sequencer.publish(vec![frame]);
        Ok(())
    }

    /// Deletes the account and all its data, emitting `#account` with
    /// `status: deleted` (the only event of this DID left in the log).
    pub async fn delete_account(&self, did: &str) -> Result<(), RepoError> {
        let lock = self.lock_for(did);
        let _guard = lock.lock().await;
        let time = now_datetime();
        let _seq_guard = self.sequencer.write_lock().await;
        let mut tx = self.db.begin_write().await?;
        crate::db::accounts::delete_account_in(&mut tx, did).await?;
        let frame = append_event(&mut tx, did, "account", |seq| {
            Ok(event::account_frame(seq, did, false, Some("deleted"), &time)?)
        })
        .await?;
        tx.commit().await?;
        self.sequencer.publish(vec![frame]);
        Ok(())
    }

    /// Applies a batch of writes as one commit.
    #[tracing::instrument(skip_all, fields(did = did, writes = writes.len()))]
    pub async fn apply_writes(
        &self,
        did: &str,
        key: &SigningKey,
        writes: Vec<Write>,
        swap_commit: Option<Cid>,
    ) -> Result<ApplyOutcome, RepoError> {
        let lock = self.lock_for(did);
        let _guard = lock.lock().await;
        let root = self.db.repo_root(did).await?.ok_or_else(|| RepoError::RepoNotFound(did.to_owned()))?;
        if let Some(expected) = swap_commit
            && expected != root.commit_cid
        {
            return Err(RepoError::InvalidSwap(format!("Commit was at {}", root.commit_cid)));
        }
        let store = self.blocks(did);
        let mut editor = MstEditor::new(&store, root.data_cid);
        let mut record_blocks: Vec<(Cid, Vec<u8>)> = Vec::new();
        let mut upserts = Vec::new();
        let mut deletes = Vec::new();
        let mut released = Vec::new();
        let mut results = Vec::with_capacity(writes.len());
        let mut changed = false;
        // Record↔blob links: records whose old links go, and new links.
        let mut blob_cleared: Vec<(String, String)> = Vec::new();
        let mut blob_added: Vec<ClaimedBlob> = Vec::new();
        // Per key: value before this commit and after it, in first-touch order.
        let mut changes: Vec<(String, Option<Cid>, Option<Cid>)> = Vec::new();
        let mut note = |key: &str, before: Option<Cid>, after: Option<Cid>| match changes
            .iter_mut()
            .find(|(k, _, _)| k == key)
        {
            Some(entry) => entry.2 = after,
            None => changes.push((key.to_owned(), before, after)),
        };

        for write in writes {
            match write {
                Write::Create { collection, rkey, value } => {
                    let key = format!("{collection}/{rkey}");
                    if editor.get(&key).await?.is_some() {
                        return Err(RepoError::InvalidRequest(format!("Record already exists: {key}")));
                    }
                    let (cid, bytes) = encode_record(&value)?;
                    editor.insert(&key, cid).await?;
                    note(&key, None, Some(cid));
                    claim_blobs(&value, &collection, &rkey, &mut blob_added);
                    record_blocks.push((cid, bytes));
                    upserts.push(RecordRow {
                        collection: collection.to_string(),
                        rkey: rkey.to_string(),
                        cid,
                    });
                    results.push(WriteResult::Create { collection, rkey, cid });
                    changed = true;
                }
                Write::Update { collection, rkey, value, swap } => {
                    let key = format!("{collection}/{rkey}");
                    let current = editor.get(&key).await?;
                    check_swap(&key, current, swap)?;
                    let (cid, bytes) = encode_record(&value)?;
                    if current != Some(cid) {
                        editor.insert(&key, cid).await?;
                        note(&key, current, Some(cid));
                        if current.is_some() {
                            blob_cleared.push((collection.to_string(), rkey.to_string()));
                        }
                        // A key written earlier in this batch loses those links.
                        blob_added
                            .retain(|b| !(b.collection == collection.as_str() && b.rkey == rkey.as_str()));
                        claim_blobs(&value, &collection, &rkey, &mut blob_added);
                        record_blocks.push((cid, bytes));
                        upserts.push(RecordRow {
                            collection: collection.to_string(),
                            rkey: rkey.to_string(),
                            cid,
                        });
                        released.extend(current);
                        changed = true;
                    }
                    results.push(match current {
                        Some(_) => WriteResult::Update { collection, rkey, cid },
                        None => WriteResult::Create { collection, rkey, cid },
                    });
                }
                Write::Delete { collection, rkey, swap } => {
                    let key = format!("{collection}/{rkey}");
                    let current = editor.get(&key).await?;
                    check_swap(&key, current, swap)?;
                    if let Some(old) = current {
                        editor.delete(&key).await?;
                        note(&key, Some(old), None);
                        blob_cleared.push((collection.to_string(), rkey.to_string()));
                        blob_added
                            .retain(|b| !(b.collection == collection.as_str() && b.rkey == rkey.as_str()));
                        deletes.push((collection.to_string(), rkey.to_string()));
                        upserts.retain(|r: &RecordRow| {
                            !(r.collection == collection.as_str() && r.rkey == rkey.as_str())
                        });
                        released.push(old);
                        changed = true;
                    }
                    results.push(WriteResult::Delete);
                }
            }
        }
        if !changed {
            return Ok(ApplyOutcome { commit: None, results, released_blobs: false });
        }

        let diff = editor.finish();
        if diff.root == root.data_cid {
            // E.g. a record deleted and re-created identically in one batch:
            // the tree is unchanged, so there is nothing to commit.
            return Ok(ApplyOutcome { commit: None, results, released_blobs: false });
        }
        let rev = self.next_tid(Some(&root.rev));
        let signed = commit::sign(did, rev.as_str(), diff.root, key).map_err(anyhow::Error::from)?;
        changes.retain(|(_, before, after)| before != after);

        // The firehose event: the commit, its new records, and the MST nodes
        // a consumer needs to check every op and invert it (sync v1.1).
        let ops: Vec<RepoOp> = changes
            .iter()
            .map(|(path, before, after)| RepoOp {
                action: match (before, after) {
                    (None, _) => "create",
                    (Some(_), Some(_)) => "update",
                    (Some(_), None) => "delete",
                },
                path: path.clone(),
                cid: *after,
                prev: *before,
            })
            .collect();
        let overlay = Overlay {
            top: diff.new_blocks.iter().map(|(c, b)| (*c, Arc::from(b.as_slice()))).collect(),
            base: self.blocks(did),
        };
        let op_changes: Vec<OpChange> = changes
            .iter()
            .map(|(k, before, after)| OpChange { key: k, before: *before, after: *after })
            .collect();
        let proof = covering_proof(&overlay, diff.root, &op_changes).await?;
        let mut event_blocks: Vec<(Cid, Arc<[u8]>)> = Vec::new();
        event_blocks.push((signed.cid, Arc::from(signed.bytes.as_slice())));
        for cid in proof.iter().chain(overlay.top.keys()).collect::<std::collections::BTreeSet<_>>() {
            let bytes = overlay.get_block(cid).await?.ok_or(MstError::MissingBlock(*cid))?;
            event_blocks.push((*cid, bytes));
        }
        for (path, _, after) in &changes {
            if let Some(cid) = after {
                if let Some((_, bytes)) = record_blocks.iter().find(|(c, _)| c == cid) {
                    event_blocks.push((*cid, Arc::from(bytes.as_slice())));
                } else {
                    return Err(RepoError::Internal(anyhow::anyhow!("record block for {path} missing")));
                }
            }
        }
        let event_refs: Vec<(Cid, &[u8])> = event_blocks.iter().map(|(c, b)| (*c, &b[..])).collect();
        let commit_car = car_of(signed.cid, &event_refs);
        let too_big = commit_car.len() > event::MAX_COMMIT_BLOCKS_BYTES || ops.len() > event::MAX_COMMIT_OPS;

        let mut new_blocks = diff.new_blocks;
        new_blocks.extend(record_blocks);
        new_blocks.push((signed.cid, signed.bytes.clone()));
        let mut removed = diff.removed;
        removed.push(root.commit_cid);
        let new_root = RepoRoot { commit_cid: signed.cid, data_cid: diff.root, rev: rev.to_string() };
        let time = now_datetime();

        let _seq_guard = self.sequencer.write_lock().await;
        // The whole transaction, in the DB latency histogram and as one span.
        let frame = crate::telemetry::metrics::timed("commit", async {
            let mut tx = self.db.begin_write().await?;
            crate::db::repo::persist_commit_in(
                &mut tx,
                CommitWrite {
                    did,
                    previous_commit: Some(root.commit_cid),
                    root: new_root,
                    new_blocks: &new_blocks,
                    removed_blocks: &removed,
                    upserts: &upserts,
                    deletes: &deletes,
                    released_record_cids: &released,
                },
            )
            .await
            .map_err(persist_error)?;
            check_claimed_blobs_in(&mut tx, did, &blob_added).await?;
            // An update may re-link the blobs it had: links are cleared first.
            let links: Vec<BlobLink> = blob_added
                .iter()
                .map(|b| BlobLink { collection: &b.collection, rkey: &b.rkey, cid: b.cid.clone() })
                .collect();
            crate::db::blobs::relink_in(&mut tx, did, rev.as_str(), &blob_cleared, &links).await?;
            let frame = if too_big {
                // Too large to ship as a diff: consumers re-sync from the commit.
                let car = car_of(signed.cid, &[(signed.cid, &signed.bytes)]);
                append_event(&mut tx, did, "sync", |seq| {
                    Ok(event::sync_frame(seq, did, car, rev.as_str(), &time)?)
                })
                .await?
            } else {
                let e = CommitEvent {
                    did,
                    commit: signed.cid,
                    rev: rev.as_str(),
                    since: Some(&root.rev),
                    prev_data: Some(root.data_cid),
                    blocks: commit_car,
                    ops: &ops,
                    time: &time,
                };
                append_event(&mut tx, did, "commit", |seq| Ok(event::commit_frame(seq, &e)?)).await?
            };
            tx.commit().await?;
            Ok::<_, RepoError>(frame)
        })
        .await?;
        let count = |action: &str| ops.iter().filter(|op| op.action == action).count() as u64;
        crate::telemetry::metrics::record_commit(
            count("create"),
            count("update"),
            count("delete"),
            new_blocks.len() as u64,
        );
        self.sequencer.publish(vec![frame]);
        Ok(ApplyOutcome {
            commit: Some(CommitInfo { cid: signed.cid, rev: rev.to_string() }),
            results,
            released_blobs: !blob_cleared.is_empty(),
        })
    }

    /// The blocks proving `collection/rkey` (present or absent) under the
    /// current commit: the commit, the MST path, and the record if present.
    pub async fn record_proof(
        &self,
        did: &str,
        collection: &str,
        rkey: &str,
    ) -> Result<(Cid, Vec<(Cid, Arc<[u8]>)>), RepoError> {
        let root = self.db.repo_root(did).await?.ok_or_else(|| RepoError::RepoNotFound(did.to_owned()))?;
        let store = self.blocks(did);
        let mut blocks = Vec::new();
        let commit_bytes =
            store.get_block(&root.commit_cid).await?.ok_or(MstError::MissingBlock(root.commit_cid))?;
        blocks.push((root.commit_cid, commit_bytes));
        let mut editor = MstEditor::new(&store, root.data_cid);
        let key = format!("{collection}/{rkey}");
        for cid in editor.path(&key).await? {
            blocks.push((cid, editor.node_bytes(cid).await?));
        }
        if let Some(record_cid) = editor.get(&key).await? {
            let bytes = store.get_block(&record_cid).await?.ok_or(MstError::MissingBlock(record_cid))?;
            blocks.push((record_cid, bytes));
        }
        Ok((root.commit_cid, blocks))
    }
}

/// A blob reference a write adds: the record holding it and what the
/// record claims about the blob.
struct ClaimedBlob {
    collection: String,
    rkey: String,
    cid: String,
    mime_type: String,
    size: u64,
}

/// Notes every blob `value` references. They are checked against the
/// `blob` table by [`check_claimed_blobs_in`], inside the commit's
/// transaction: checked before it, a concurrent sweep could delete a blob
/// between the check and the commit and leave a record pointing at nothing.
fn claim_blobs(value: &Ipld, collection: &Nsid, rkey: &RecordKey, claims: &mut Vec<ClaimedBlob>) {
    for r in crate::atp::data::blob_refs(value) {
        claims.push(ClaimedBlob {
            collection: collection.to_string(),
            rkey: rkey.to_string(),
            cid: r.cid.to_string(),
            mime_type: r.mime_type.to_string(),
            size: r.size,
        });
    }
}

/// Every blob a record references must have been uploaded to this account,
/// with the MIME type and size the record claims. Runs in the commit's
/// write transaction, so what it sees is what the commit links to.
async fn check_claimed_blobs_in(
    conn: &mut sqlx::SqliteConnection,
    did: &str,
    claims: &[ClaimedBlob],
) -> Result<(), RepoError> {
    for claim in claims {
        let stored = crate::db::blobs::blob_in(conn, did, &claim.cid)
            .await?
            .ok_or_else(|| RepoError::BlobNotFound(claim.cid.clone()))?;
        if stored.mime_type != claim.mime_type {
            return Err(RepoError::InvalidRequest(format!(
                "Referenced Mimetype does not match stored blob. Expected: {}, Got: {}",
                stored.mime_type, claim.mime_type
            )));
        }
        if u64::try_from(stored.size).ok() != Some(claim.size) {
            return Err(RepoError::InvalidRequest(format!(
                "Referenced size does not match stored blob. Expected: {}, Got: {}",
                stored.size, claim.size
            )));
        }
    }
    Ok(())
}

fn check_swap(key: &str, current: Option<Cid>, swap: Swap) -> Result<(), RepoError> {
    match (swap, current) {
        (Swap::Any, _) | (Swap::MustNotExist, None) => Ok(()),
        (Swap::Is(want), Some(have)) if want == have => Ok(()),
        (_, Some(have)) => Err(RepoError::InvalidSwap(format!("Record was at {have} ({key})"))),
        (_, None) => Err(RepoError::InvalidSwap(format!("Record was not present ({key})"))),
    }
}

fn encode_record(value: &Ipld) -> Result<(Cid, Vec<u8>), RepoError> {
    let bytes = encode_cbor(value).map_err(|e| RepoError::InvalidRequest(format!("Invalid record: {e}")))?;
    if bytes.len() > MAX_RECORD_BYTES {
        return Err(RepoError::InvalidRequest(format!(
            "Record is {} bytes; the limit is {MAX_RECORD_BYTES}",
            bytes.len()
        )));
    }
    Ok((cid_for_cbor(&bytes), bytes))
}

fn persist_error(e: CommitPersistError) -> RepoError {
    match e {
        // The per-DID lock makes this unreachable in one process; a second
        // process on the same file would land here instead of forking history.
        CommitPersistError::Conflict => RepoError::InvalidSwap("Repository changed concurrently".into()),
        CommitPersistError::Db(e) => e.into(),
    }
}
