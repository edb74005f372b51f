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
use crate::atp::keys::SigningKey;
use crate::atp::mst::{BlockSource, MstEditor, MstError};
use crate::atp::syntax::{Nsid, RecordKey, Tid, TidClock};
use crate::db::Db;
use crate::db::repo::{CommitPersistError, CommitWrite, RecordRow, RepoRoot};

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
    Create {
        collection: Nsid,
        rkey: RecordKey,
        value: Ipld,
    },
    Update {
        collection: Nsid,
        rkey: RecordKey,
        value: Ipld,
        swap: Swap,
    },
    Delete {
        collection: Nsid,
        rkey: RecordKey,
        swap: Swap,
    },
}

#[derive(Debug, Clone)]
pub enum WriteResult {
    Create {
        collection: Nsid,
        rkey: RecordKey,
        cid: Cid,
    },
    Update {
        collection: Nsid,
        rkey: RecordKey,
        cid: Cid,
    },
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
        let block = self
            .db
            .block(self.did, cid)
            .await
            .map_err(|e| MstError::Store(e.to_string()))?;
        if let Some(bytes) = &block {
            self.cache.put(*cid, bytes.clone());
        }
        Ok(block)
    }
}

pub struct RepoService {
    db: Db,
    cache: BlockCache,
    /// Per-DID write locks: one commit at a time per repository.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    clock: Mutex<TidClock>,
}

impl RepoService {
    pub fn new(db: Db) -> Self {
        // A random clock id makes two processes' TIDs distinct even in the same microsecond.
        let clock_id = rand::random::<u16>() & 0x3ff;
        RepoService {
            db,
            cache: BlockCache::new(NODE_CACHE_ENTRIES),
            locks: Mutex::new(HashMap::new()),
            clock: Mutex::new(TidClock::new(clock_id)),
        }
    }

    pub fn blocks<'a>(&'a self, did: &'a str) -> DbBlocks<'a> {
        DbBlocks {
            db: &self.db,
            did,
            cache: &self.cache,
        }
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

    /// Creates the first commit (an empty tree) of a new repository.
    pub async fn create_empty_repo(
        &self,
        did: &str,
        key: &SigningKey,
    ) -> Result<CommitInfo, RepoError> {
        let lock = self.lock_for(did);
        let _guard = lock.lock().await;
        if self.db.repo_root(did).await?.is_some() {
            return Err(RepoError::InvalidRequest(format!(
                "repository {did} already exists"
            )));
        }
        let store = self.blocks(did);
        let editor = MstEditor::empty(&store)?;
        let diff = editor.finish();
        let rev = self.next_tid(None);
        let signed =
            commit::sign(did, rev.as_str(), diff.root, key).map_err(anyhow::Error::from)?;
        let mut blocks = diff.new_blocks;
        blocks.push((signed.cid, signed.bytes));
        let mut tx = self.db.pool.begin().await?;
        crate::db::repo::persist_commit_in(
            &mut tx,
            CommitWrite {
                did,
                previous_commit: None,
                root: RepoRoot {
                    commit_cid: signed.cid,
                    data_cid: diff.root,
                    rev: rev.to_string(),
                },
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
        tx.commit().await?;
        Ok(CommitInfo {
            cid: signed.cid,
            rev: rev.to_string(),
        })
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
        let root = self
            .db
            .repo_root(did)
            .await?
            .ok_or_else(|| RepoError::RepoNotFound(did.to_owned()))?;
        if let Some(expected) = swap_commit {
            if expected != root.commit_cid {
                return Err(RepoError::InvalidSwap(format!(
                    "Commit was at {}",
                    root.commit_cid
                )));
            }
        }
        let store = self.blocks(did);
        let mut editor = MstEditor::new(&store, root.data_cid);
        let mut record_blocks: Vec<(Cid, Vec<u8>)> = Vec::new();
        let mut upserts = Vec::new();
        let mut deletes = Vec::new();
        let mut released = Vec::new();
        let mut results = Vec::with_capacity(writes.len());
        let mut changed = false;

        for write in writes {
            match write {
                Write::Create {
                    collection,
                    rkey,
                    value,
                } => {
                    let key = format!("{collection}/{rkey}");
                    if editor.get(&key).await?.is_some() {
                        return Err(RepoError::InvalidRequest(format!(
                            "Record already exists: {key}"
                        )));
                    }
                    let (cid, bytes) = encode_record(&value)?;
                    editor.insert(&key, cid).await?;
                    record_blocks.push((cid, bytes));
                    upserts.push(RecordRow {
                        collection: collection.to_string(),
                        rkey: rkey.to_string(),
                        cid,
                    });
                    results.push(WriteResult::Create {
                        collection,
                        rkey,
                        cid,
                    });
                    changed = true;
                }
                Write::Update {
                    collection,
                    rkey,
                    value,
                    swap,
                } => {
                    let key = format!("{collection}/{rkey}");
                    let current = editor.get(&key).await?;
                    check_swap(&key, current, swap)?;
                    let (cid, bytes) = encode_record(&value)?;
                    if current != Some(cid) {
                        editor.insert(&key, cid).await?;
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
                        Some(_) => WriteResult::Update {
                            collection,
                            rkey,
                            cid,
                        },
                        None => WriteResult::Create {
                            collection,
                            rkey,
                            cid,
                        },
                    });
                }
                Write::Delete {
                    collection,
                    rkey,
                    swap,
                } => {
                    let key = format!("{collection}/{rkey}");
                    let current = editor.get(&key).await?;
                    check_swap(&key, current, swap)?;
                    if let Some(old) = current {
                        editor.delete(&key).await?;
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
            return Ok(ApplyOutcome {
                commit: None,
                results,
            });
        }

        let diff = editor.finish();
        let rev = self.next_tid(Some(&root.rev));
        let signed =
            commit::sign(did, rev.as_str(), diff.root, key).map_err(anyhow::Error::from)?;
        let mut new_blocks = diff.new_blocks;
        new_blocks.extend(record_blocks);
        new_blocks.push((signed.cid, signed.bytes));
        let mut removed = diff.removed;
        removed.push(root.commit_cid);
        self.db
            .persist_commit(CommitWrite {
                did,
                previous_commit: Some(root.commit_cid),
                root: RepoRoot {
                    commit_cid: signed.cid,
                    data_cid: diff.root,
                    rev: rev.to_string(),
                },
                new_blocks: &new_blocks,
                removed_blocks: &removed,
                upserts: &upserts,
                deletes: &deletes,
                released_record_cids: &released,
            })
            .await
            .map_err(persist_error)?;
        Ok(ApplyOutcome {
            commit: Some(CommitInfo {
                cid: signed.cid,
                rev: rev.to_string(),
            }),
            results,
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
        let root = self
            .db
            .repo_root(did)
            .await?
            .ok_or_else(|| RepoError::RepoNotFound(did.to_owned()))?;
        let store = self.blocks(did);
        let mut blocks = Vec::new();
        let commit_bytes = store
            .get_block(&root.commit_cid)
            .await?
            .ok_or(MstError::MissingBlock(root.commit_cid))?;
        blocks.push((root.commit_cid, commit_bytes));
        let mut editor = MstEditor::new(&store, root.data_cid);
        let key = format!("{collection}/{rkey}");
        for cid in editor.path(&key).await? {
            blocks.push((cid, editor.node_bytes(cid).await?));
        }
        if let Some(record_cid) = editor.get(&key).await? {
            let bytes = store
                .get_block(&record_cid)
                .await?
                .ok_or(MstError::MissingBlock(record_cid))?;
            blocks.push((record_cid, bytes));
        }
        Ok((root.commit_cid, blocks))
    }
}

fn check_swap(key: &str, current: Option<Cid>, swap: Swap) -> Result<(), RepoError> {
    match (swap, current) {
        (Swap::Any, _) | (Swap::MustNotExist, None) => Ok(()),
        (Swap::Is(want), Some(have)) if want == have => Ok(()),
        (_, Some(have)) => Err(RepoError::InvalidSwap(format!(
            "Record was at {have} ({key})"
        ))),
        (_, None) => Err(RepoError::InvalidSwap(format!(
            "Record was not present ({key})"
        ))),
    }
}

fn encode_record(value: &Ipld) -> Result<(Cid, Vec<u8>), RepoError> {
    let bytes = encode_cbor(value)
        .map_err(|e| RepoError::InvalidRequest(format!("Invalid record: {e}")))?;
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
        CommitPersistError::Conflict => {
            RepoError::InvalidSwap("Repository changed concurrently".into())
        }
        CommitPersistError::Db(e) => e.into(),
    }
}
