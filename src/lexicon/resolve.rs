//! Finding lexicons the catalog lacks, as the spec's "Lexicon Publication
//! and Resolution" section describes.
//!
//! For an NSID such as `edu.university.dept.lab.blogging.getBlogPost`:
//!
//! 1. Look up the DNS TXT record `_lexicon.blogging.lab.dept.university.edu`
//!    (the NSID minus its name, reversed). Its value is `did=<DID>`. There
//!    is no walking up or down the DNS tree: if this name has no record,
//!    resolution fails.
//! 2. Resolve that DID to its PDS (the identity layer's job).
//! 3. Fetch the record `at://<DID>/com.atproto.lexicon.schema/<NSID>`.
//! 4. Check it: `$type` is `com.atproto.lexicon.schema`, `id` is the NSID
//!    (which is also the record key), and the rest is a valid lexicon.
//! 5. Repeat for every document the new one refers to
//!    ([`Catalog::missing_documents`]) until the set is closed, because a
//!    record can only be validated once all its refs resolve.
//!
//! This module holds the protocol logic and the cache; it does no I/O.
//! The two network operations are the [`LexiconFetcher`] trait, which
//! `crate::lexicon_net` implements with a DNS resolver and an SSRF-guarded
//! HTTP client (`com.atproto.repo.getRecord` on the DID's PDS).
//!
//! Use on the write path (`lexicon_net::Lexicons::for_collection`): for a
//! collection the start-up catalog lacks, [`Resolver::resolve`] runs under a
//! timeout and returns the catalog extended with the resolved documents,
//! which live only in this cache, so they expire with it. On failure the
//! record is accepted as `unknown` (the reference PDS's optimistic
//! validation); with `validate: true` a failure rejects the write.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::atp::syntax::{AtUri, Did, Nsid};

use super::{Catalog, LexiconDoc, LexiconError};

/// The collection lexicons are published in.
pub const SCHEMA_COLLECTION: &str = "com.atproto.lexicon.schema";

/// At most this many documents are fetched for one resolution, so a chain
/// of references cannot make one write fan out without bound.
pub const MAX_DOCUMENTS_PER_RESOLUTION: usize = 32;

/// Why a lexicon could not be resolved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    #[error("no DNS TXT record did=<DID> at {0}")]
    NoAuthority(String),
    #[error("more than one DID in the DNS TXT records at {0}")]
    AmbiguousAuthority(String),
    #[error("the DNS TXT record at {name} names an invalid DID: {did}")]
    InvalidDid { name: String, did: String },
    #[error("fetching {what} failed: {reason}")]
    Fetch { what: String, reason: String },
    #[error("the schema record for {0} has the wrong $type")]
    WrongType(String),
    #[error("the schema record for {nsid} has id {id}")]
    IdMismatch { nsid: String, id: String },
    #[error(transparent)]
    Invalid(#[from] LexiconError),
    #[error("resolving {0} needs more than {MAX_DOCUMENTS_PER_RESOLUTION} documents")]
    TooManyDocuments(String),
}

/// The network operations resolution needs, implemented outside the pure
/// core. Errors are reported as text: the resolver only passes them on.
pub trait LexiconFetcher: Send + Sync {
    /// The TXT record values at `name` (empty when there are none).
    fn txt_records(&self, name: &str) -> impl Future<Output = Result<Vec<String>, String>> + Send;

    /// The `value` of the record at `uri`, resolving the authority DID to
    /// its PDS first.
    fn fetch_record(&self, uri: &AtUri) -> impl Future<Output = Result<Value, String>> + Send;
}

/// The DNS name whose TXT record names the repository publishing `nsid`.
pub fn txt_name(nsid: &Nsid) -> String {
    format!("_lexicon.{}", nsid.authority())
}

/// The DID in a `_lexicon` TXT record set. Values other than `did=…` are
/// ignored (a name may carry unrelated TXT records); two different DIDs are
/// an error rather than a guess.
///
/// # Errors
/// No `did=` value, several different ones, or an invalid DID.
pub fn did_from_txt<S: AsRef<str>>(name: &str, records: &[S]) -> Result<Did, ResolveError> {
    let mut found: Option<&str> = None;
    for value in records.iter().map(AsRef::as_ref) {
        let Some(did) = value.trim().strip_prefix("did=") else {
            continue;
        };
        match found {
            Some(other) if other != did => {
                return Err(ResolveError::AmbiguousAuthority(name.to_owned()));
            }
            _ => found = Some(did),
        }
    }
    let did = found.ok_or_else(|| ResolveError::NoAuthority(name.to_owned()))?;
    Did::new(did).map_err(|_| ResolveError::InvalidDid { name: name.to_owned(), did: did.to_owned() })
}

/// `at://<did>/com.atproto.lexicon.schema/<nsid>`.
///
/// # Errors
/// None in practice (every NSID is a valid record key); the `Result` keeps
/// that argument out of the code path.
pub fn schema_uri(did: &Did, nsid: &Nsid) -> Result<AtUri, ResolveError> {
    AtUri::new(format!("at://{did}/{SCHEMA_COLLECTION}/{nsid}")).map_err(|e| ResolveError::Fetch {
        what: format!("the schema record of {nsid}"),
        reason: e.to_string(),
    })
}

/// Checks a fetched `com.atproto.lexicon.schema` record and parses the
/// lexicon it carries.
///
/// # Errors
/// Wrong `$type`, an `id` other than `nsid`, or an invalid lexicon.
pub fn doc_from_record(nsid: &Nsid, record: &Value) -> Result<LexiconDoc, ResolveError> {
    if record.get("$type").and_then(Value::as_str) != Some(SCHEMA_COLLECTION) {
        return Err(ResolveError::WrongType(nsid.to_string()));
    }
    let id = record.get("id").and_then(Value::as_str).unwrap_or_default();
    if id != nsid.as_str() {
        return Err(ResolveError::IdMismatch { nsid: nsid.to_string(), id: id.to_owned() });
    }
    // `$type` and any other record-level fields are ignored by the parser.
    Ok(LexiconDoc::from_json(record)?)
}

/// Resolves one NSID to its document (steps 1-4).
///
/// # Errors
/// See [`ResolveError`].
pub async fn resolve_one<F: LexiconFetcher>(fetcher: &F, nsid: &Nsid) -> Result<LexiconDoc, ResolveError> {
    let name = txt_name(nsid);
    let records = fetcher
        .txt_records(&name)
        .await
        .map_err(|reason| ResolveError::Fetch { what: name.clone(), reason })?;
    let did = did_from_txt(&name, &records)?;
    let uri = schema_uri(&did, nsid)?;
    let record = fetcher
        .fetch_record(&uri)
        .await
        .map_err(|reason| ResolveError::Fetch { what: uri.to_string(), reason })?;
    doc_from_record(nsid, &record)
}

/// Resolution results remembered per NSID. Failures are remembered too
/// (for less time), so an unknown collection does not cost a DNS lookup on
/// every write. Time is passed in: the module reads no clock.
#[derive(Debug)]
pub struct LexiconCache {
    entries: HashMap<Nsid, Entry>,
    /// The spec warns that DNS authority can move, so successes expire too.
    found_ttl: Duration,
    failed_ttl: Duration,
}

#[derive(Debug)]
struct Entry {
    at: Instant,
    result: Result<Arc<LexiconDoc>, ResolveError>,
}

/// What the cache knows about an NSID.
#[derive(Debug)]
pub enum Cached<'a> {
    Found(&'a Arc<LexiconDoc>),
    Failed(&'a ResolveError),
    /// Never resolved, or the entry expired.
    Miss,
}

impl LexiconCache {
    pub fn new(found_ttl: Duration, failed_ttl: Duration) -> Self {
        Self { entries: HashMap::new(), found_ttl, failed_ttl }
    }

    pub fn get(&self, nsid: &Nsid, now: Instant) -> Cached<'_> {
        let Some(entry) = self.entries.get(nsid) else {
            return Cached::Miss;
        };
        let ttl = if entry.result.is_ok() { self.found_ttl } else { self.failed_ttl };
        if now.saturating_duration_since(entry.at) >= ttl {
            return Cached::Miss;
        }
        match &entry.result {
            Ok(doc) => Cached::Found(doc),
            Err(e) => Cached::Failed(e),
        }
    }

    pub fn put(&mut self, nsid: Nsid, result: Result<Arc<LexiconDoc>, ResolveError>, now: Instant) {
        self.entries.insert(nsid, Entry { at: now, result });
    }

    /// Drops expired entries; call now and then to bound memory.
    pub fn purge(&mut self, now: Instant) {
        let (found, failed) = (self.found_ttl, self.failed_ttl);
        self.entries.retain(|_, e| {
            let ttl = if e.result.is_ok() { found } else { failed };
            now.saturating_duration_since(e.at) < ttl
        });
    }
}

/// Resolves whole reference closures through a [`LexiconFetcher`] and a
/// [`LexiconCache`].
///
/// Two requests that miss the cache for the same NSID at the same time
/// both fetch it (the later result wins); that costs a duplicate lookup,
/// never a wrong answer. A per-NSID single-flight can be added in the
/// caller if resolution turns out to be hot.
pub struct Resolver<F> {
    fetcher: F,
    cache: std::sync::Mutex<LexiconCache>,
}

impl<F: LexiconFetcher> Resolver<F> {
    pub fn new(fetcher: F, cache: LexiconCache) -> Self {
        Self { fetcher, cache: std::sync::Mutex::new(cache) }
    }

    /// Returns `base` extended with `nsid`'s document and everything it
    /// refers to, fetching what neither `base` nor the cache has. `now` is
    /// the time to stamp cache entries with.
    ///
    /// # Errors
    /// The first document that could not be resolved (also when that
    /// failure was cached).
    pub async fn resolve(&self, base: &Catalog, nsid: &Nsid, now: Instant) -> Result<Catalog, ResolveError> {
        let mut catalog = base.clone();
        let mut fetched = 0;
        loop {
            let missing = catalog.missing_documents(nsid);
            let Some(next) = missing.into_iter().next() else {
                return Ok(catalog);
            };
            let cached = match self.lock().get(&next, now) {
                Cached::Found(doc) => Some(Ok(Arc::clone(doc))),
                Cached::Failed(e) => Some(Err(e.clone())),
                Cached::Miss => None,
            };
            let doc = match cached {
                Some(result) => result?,
                None => {
                    fetched += 1;
                    if fetched > MAX_DOCUMENTS_PER_RESOLUTION {
                        return Err(ResolveError::TooManyDocuments(nsid.to_string()));
                    }
                    let result = resolve_one(&self.fetcher, &next).await.map(Arc::new);
                    self.lock().put(next.clone(), result.clone(), now);
                    result?
                }
            };
            catalog.insert(doc);
        }
    }

    pub fn fetcher(&self) -> &F {
        &self.fetcher
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LexiconCache> {
        // A panic while holding the lock cannot leave the cache
        // inconsistent (every update is one insert), so poison is ignored.
        self.cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
