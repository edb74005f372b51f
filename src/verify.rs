//! `roost verify DIR`: checks a backup directory (with `manifest.json`) or a
//! data directory (with `roost.sqlite`) without a running server.
//!
//! Checks, each reported as one line: the manifest (every file present with
//! its size and SHA-256, no path escaping the directory), the database
//! (`integrity_check`, `foreign_key_check`, known migrations), every
//! account's repository (the commit's signature against the account's key
//! file, the MST walked from the commit's `data` node by node, each block's
//! CID recomputed from its bytes, the layer rule and key order, the record
//! index equal to the tree's leaves, no unreachable blocks) and the blobs
//! (disk-tier files present with their size, record references pointing at
//! stored blobs; S3-tier blobs are only counted).
//!
//! Memory stays bounded whatever the repository's size: the tree is walked
//! depth-first with an explicit stack (O(depth × fanout) entries), blocks are
//! fetched one by one by CID, the record index is compared leaf by leaf, and
//! whole-table checks are SQL queries or streams. Nothing collects a
//! repository, its keys or its blocks.
//!
//! The database is opened read-only (a backup's as `immutable`, so not even
//! a `-shm` file is written next to it) and every repository check runs in
//! one read transaction, so a data directory can be checked while the server
//! writes. Like `backup.rs`, this module reads the tables itself: it works on
//! a file, not on the server's pool.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use cid::Cid;
use futures::TryStreamExt as _;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use sqlx::{Connection as _, Row as _};

use crate::atp::commit;
use crate::atp::data::{DAG_CBOR, RAW, cid_for_cbor, cid_for_raw, decode_cbor_strict};
use crate::atp::mst::{CheckedNode, check_node};
use crate::backup::{DB_FILE, MANIFEST, Manifest};
use crate::progress::{Progress, mib};

/// Problems listed in the report; more are counted, not listed.
pub const MAX_PROBLEMS: usize = 50;

#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Where a data directory's disk-tier blobs are (default `DIR/blobs`).
    /// A backup's are always under its `blobs/`.
    pub disk_blobs: Option<PathBuf>,
}

/// What `verify` found: one line per check, the problems, the totals.
#[derive(Debug, Default)]
pub struct Report {
    /// One line per check that ran, in order.
    pub checks: Vec<String>,
    /// The first [`MAX_PROBLEMS`] problems.
    pub problems: Vec<String>,
    /// All problems, listed or not.
    pub problem_count: usize,
    pub accounts: u64,
    pub records: u64,
    pub blocks: u64,
    pub blobs: u64,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.problem_count == 0
    }

    /// `verify: OK — 2 accounts, 100000 records, 131072 blocks, 12 blobs (0 problems)`.
    pub fn summary(&self) -> String {
        format!(
            "verify: {} — {} accounts, {} records, {} blocks, {} blobs ({} problems)",
            if self.ok() { "OK" } else { "FAILED" },
            self.accounts,
            self.records,
            self.blocks,
            self.blobs,
            self.problem_count
        )
    }

    fn check(&mut self, line: String) {
        self.checks.push(line);
    }

    fn problem(&mut self, line: String) {
        self.problem_count += 1;
        if self.problems.len() < MAX_PROBLEMS {
            self.problems.push(line);
        }
    }

    /// Once the list is full, detailed scans can stop early.
    fn full(&self) -> bool {
        self.problems.len() >= MAX_PROBLEMS
    }
}

/// What `dir` is.
enum Kind {
    Backup(Box<Manifest>),
    DataDir,
}

/// Verifies the backup or data directory `dir`. An `Err` means verification
/// could not run at all (no such directory, neither kind of directory);
/// everything wrong with the contents is a problem in the report.
pub async fn verify(dir: &Path, options: &Options) -> anyhow::Result<Report> {
    let mut report = Report::default();
    let mut progress = Progress::new("verify");
    let kind = if dir.join(MANIFEST).exists() {
        let text = std::fs::read_to_string(dir.join(MANIFEST))
            .with_context(|| format!("reading {}", dir.join(MANIFEST).display()))?;
        match serde_json::from_str::<Manifest>(&text) {
            Ok(manifest) => Kind::Backup(Box::new(manifest)),
            Err(e) => {
                report.problem(format!("manifest: not a Roost manifest: {e}"));
                return Ok(report);
            }
        }
    } else if dir.join(DB_FILE).exists() {
        Kind::DataDir
    } else {
        anyhow::bail!("{} has neither {MANIFEST} (a backup) nor {DB_FILE} (a data directory)", dir.display());
    };

    let disk_blobs = match &kind {
        Kind::Backup(manifest) => {
            let (owned, manifest) = (dir.to_owned(), manifest.clone());
            let (checked, problems) =
                tokio::task::spawn_blocking(move || check_manifest(&owned, &manifest)).await?;
            for p in problems {
                report.problem(p);
            }
            report.check(checked);
            dir.join("blobs")
        }
        Kind::DataDir => {
            report.check(format!("manifest: none ({} is a data directory)", dir.display()));
            options.disk_blobs.clone().unwrap_or_else(|| dir.join("blobs"))
        }
    };

    let mut options = SqliteConnectOptions::new().filename(dir.join(DB_FILE)).read_only(true);
    if matches!(kind, Kind::Backup(_)) {
        // A backup is a self-contained file (rollback journal): nothing else
        // writes it, so SQLite may skip locking and write no side files.
        options = options.immutable(true);
    }
    let mut conn = match SqliteConnection::connect_with(&options).await {
        Ok(conn) => conn,
        Err(e) => {
            report.problem(format!("sqlite: cannot open {}: {e}", dir.join(DB_FILE).display()));
            return Ok(report);
        }
    };
    let result = check_database(&mut conn, dir, &kind, &disk_blobs, &mut report, &mut progress).await;
    if let Err(e) = result {
        // An unreadable table or page stops the database checks, not the report.
        report.problem(format!("sqlite: {e:#}"));
    }
    let _ = conn.close().await;
    if progress.printed() {
        eprintln!("verify: done in {:.1} s", progress.elapsed().as_secs_f64());
    }
    Ok(report)
}

/// Every manifest entry: a path inside the backup, the right size and SHA-256.
fn check_manifest(dir: &Path, manifest: &Manifest) -> (String, Vec<String>) {
    let mut problems = Vec::new();
    if manifest.format != crate::backup::FORMAT {
        problems.push(format!("manifest: unsupported backup format {}", manifest.format));
    }
    if let Err(e) = crate::backup::check_paths(manifest) {
        // A path escaping the backup is not opened at all.
        problems.push(format!("manifest: {e}"));
        return ("manifest: paths refused".into(), problems);
    }
    let mut progress = Progress::new("verify");
    let total = manifest.files.len();
    let (mut bytes, mut good) = (0u64, 0usize);
    for (i, entry) in manifest.files.iter().enumerate() {
        match crate::backup::hash_file(&dir.join(&entry.path)) {
            Ok((size, _)) if size != entry.size => {
                problems.push(format!("manifest: {}: {size} bytes, manifest says {}", entry.path, entry.size))
            }
            Ok((_, sha256)) if sha256 != entry.sha256 => {
                problems.push(format!("manifest: {}: SHA-256 mismatch", entry.path))
            }
            Ok((size, _)) => {
                good += 1;
                bytes += size;
            }
            Err(e) => problems.push(format!("manifest: {}: {e}", entry.path)),
        }
        progress.tick(|| format!("manifest {}/{total} files ({})", i + 1, mib(bytes)));
    }
    (format!("manifest: {good}/{total} files match ({})", mib(bytes)), problems)
}

async fn check_database(
    conn: &mut SqliteConnection,
    dir: &Path,
    kind: &Kind,
    disk_blobs: &Path,
    report: &mut Report,
    progress: &mut Progress,
) -> anyhow::Result<()> {
    // integrity_check reads every page; on a large file this is the long part.
    progress.tick(|| "sqlite integrity_check".into());
    let integrity: Vec<String> = sqlx::query_scalar("PRAGMA integrity_check").fetch_all(&mut *conn).await?;
    if integrity != ["ok"] {
        for line in &integrity {
            report.problem(format!("sqlite: integrity_check: {line}"));
        }
        // Reading a damaged file further can report anything; stop here.
        report.check("sqlite: integrity_check FAILED".into());
        return Ok(());
    }
    let fk = sqlx::query("PRAGMA foreign_key_check").fetch_all(&mut *conn).await?;
    for row in &fk {
        let table: String = row.try_get(0)?;
        let parent: String = row.try_get(2)?;
        report.problem(format!("sqlite: a row of {table} points at a missing {parent} row"));
    }
    let schema = check_migrations(conn, report).await?;
    report.check(format!(
        "sqlite: integrity_check ok, foreign_key_check {}, {schema}",
        if fk.is_empty() { "ok".to_owned() } else { format!("{} rows", fk.len()) }
    ));

    // One read transaction: a data directory can be checked while the server writes.
    let mut tx = conn.begin().await?;
    check_repos(&mut tx, &dir.join("keys"), report, progress).await?;
    let missing_in_backup: HashSet<String> = match kind {
        Kind::Backup(m) => m.blobs.disk_missing.iter().cloned().collect(),
        Kind::DataDir => HashSet::new(),
    };
    let manifest_blobs: HashMap<&str, &str> = match kind {
        Kind::Backup(m) => {
            m.files.iter().filter_map(|f| Some((f.path.strip_prefix("blobs/")?, f.sha256.as_str()))).collect()
        }
        Kind::DataDir => HashMap::new(),
    };
    check_blobs(&mut tx, disk_blobs, &missing_in_backup, &manifest_blobs, report, progress).await?;
    tx.rollback().await?;
    Ok(())
}

/// The applied migrations must all be ones this binary knows, unchanged.
async fn check_migrations(conn: &mut SqliteConnection, report: &mut Report) -> anyhow::Result<String> {
    let known: BTreeMap<i64, Vec<u8>> =
        sqlx::migrate!("./migrations").iter().map(|m| (m.version, m.checksum.to_vec())).collect();
    let applied: Vec<(i64, Vec<u8>)> =
        sqlx::query_as("SELECT version, checksum FROM _sqlx_migrations WHERE success = 1 ORDER BY version")
            .fetch_all(&mut *conn)
            .await
            .context("reading the migration table")?;
    for (version, checksum) in &applied {
        match known.get(version) {
            None => {
                report.problem(format!("sqlite: migration {version} is unknown to this Roost (newer data?)"))
            }
            Some(sum) if sum != checksum => {
                report.problem(format!("sqlite: migration {version} was applied with another checksum"))
            }
            Some(_) => {}
        }
    }
    let latest = known.keys().next_back().copied().unwrap_or(0);
    let pending = known.keys().filter(|v| !applied.iter().any(|(a, _)| a == *v)).count();
    Ok(format!(
        "schema {} ({} of {} migrations applied{})",
        applied.last().map_or(0, |(v, _)| *v),
        applied.len(),
        known.len(),
        if pending > 0 { format!("; {pending} will apply at start, latest {latest}") } else { String::new() }
    ))
}

struct RootRow {
    did: String,
    commit_cid: Cid,
    data_cid: Cid,
    rev: String,
}

async fn check_repos(
    conn: &mut SqliteConnection,
    keys_dir: &Path,
    report: &mut Report,
    progress: &mut Progress,
) -> anyhow::Result<()> {
    let roots = sqlx::query("SELECT did, commit_cid, data_cid, rev FROM repo_root ORDER BY did")
        .fetch_all(&mut *conn)
        .await?;
    let mut rows = Vec::with_capacity(roots.len());
    for row in &roots {
        let did: String = row.try_get("did")?;
        let (commit_cid, data_cid) = match (
            Cid::try_from(row.try_get::<&[u8], _>("commit_cid")?),
            Cid::try_from(row.try_get::<&[u8], _>("data_cid")?),
        ) {
            (Ok(c), Ok(d)) => (c, d),
            _ => {
                report.problem(format!("repo {did}: repo_root holds a malformed CID"));
                continue;
            }
        };
        rows.push(RootRow { did, commit_cid, data_cid, rev: row.try_get("rev")? });
    }
    let homeless: Vec<(String, String)> = sqlx::query_as(
        "SELECT did, status FROM account
         WHERE status NOT IN ('pending', 'deleted') AND did NOT IN (SELECT did FROM repo_root) ORDER BY did",
    )
    .fetch_all(&mut *conn)
    .await?;
    for (did, status) in homeless {
        report.problem(format!("repo {did}: {status} account has no repository"));
    }
    // Block counts per account, in one pass over the table (the number of accounts is small).
    let counts: BTreeMap<String, i64> = sqlx::query_as("SELECT did, COUNT(*) FROM block GROUP BY did")
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .collect();
    for (did, n) in &counts {
        if !rows.iter().any(|r| &r.did == did) {
            report.problem(format!("repo {did}: {n} blocks but no repository root"));
        }
    }
    report.accounts = rows.len() as u64;
    for root in &rows {
        let stats =
            check_repo(conn, root, keys_dir, counts.get(&root.did).copied().unwrap_or(0), report, progress)
                .await?;
        report.records += stats.records;
        report.blocks += stats.blocks;
        report.check(format!(
            "repo {}: rev {}, {} records, {} MST nodes, {} blocks{}",
            root.did,
            root.rev,
            stats.records,
            stats.nodes,
            stats.blocks,
            if stats.problems == 0 { ", OK".to_owned() } else { format!(", {} problems", stats.problems) }
        ));
    }
    Ok(())
}

#[derive(Default)]
struct RepoStats {
    records: u64,
    nodes: u64,
    blocks: u64,
    problems: usize,
}

/// One step of the in-order walk: a subtree to open, or a leaf to compare.
enum Step {
    Node { cid: Cid, layer: Option<u32>, is_root: bool },
    Leaf { key: String, value: Cid },
}

/// Pushes a node's contents so that popping yields them in key order.
fn push_in_order(stack: &mut Vec<Step>, node: &CheckedNode) {
    let below = node.layer.and_then(|l| l.checked_sub(1));
    let sub = |cid: Cid| Step::Node { cid, layer: below, is_root: false };
    for entry in node.entries.iter().rev() {
        stack.extend(entry.right.map(sub));
        stack.push(Step::Leaf { key: entry.key.clone(), value: entry.value });
    }
    stack.extend(node.left.map(sub));
}

async fn block(conn: &mut SqliteConnection, did: &str, cid: &Cid) -> Result<Option<Vec<u8>>, sqlx::Error> {
    sqlx::query_scalar("SELECT data FROM block WHERE did = ? AND cid = ?")
        .bind(did)
        .bind(cid.to_bytes())
        .fetch_optional(&mut *conn)
        .await
}

async fn check_repo(
    conn: &mut SqliteConnection,
    root: &RootRow,
    keys_dir: &Path,
    stored_blocks: i64,
    report: &mut Report,
    progress: &mut Progress,
) -> anyhow::Result<RepoStats> {
    let did = root.did.as_str();
    let before = report.problem_count;
    let mut stats = RepoStats { blocks: stored_blocks as u64, ..RepoStats::default() };
    let problem = |report: &mut Report, text: String| report.problem(format!("repo {did}: {text}"));

    // The commit: stored, hashing to its CID, signed by the account's key.
    let key_path = keys_dir.join(crate::identity::repo_key_file_name(did));
    let key = match crate::identity::read_key_file(&key_path) {
        Ok(key) => Some(key),
        Err(e) => {
            problem(report, format!("no signing key ({e:#}); signature not checked"));
            None
        }
    };
    let Some(bytes) = block(conn, did, &root.commit_cid).await? else {
        problem(report, format!("commit block {} is missing", root.commit_cid));
        stats.problems = report.problem_count - before;
        return Ok(stats);
    };
    if cid_for_cbor(&bytes) != root.commit_cid {
        problem(report, format!("commit block {} does not hash to its CID", root.commit_cid));
    }
    let decoded = match &key {
        Some(key) => commit::verify(&bytes, did, &key.public_key()),
        None => commit::decode(&bytes),
    };
    let data = match decoded {
        Ok(c) => {
            if c.data != root.data_cid {
                problem(report, format!("commit data {} differs from repo_root's {}", c.data, root.data_cid));
            }
            if c.rev != root.rev {
                problem(report, format!("commit rev {} differs from repo_root's {}", c.rev, root.rev));
            }
            c.data
        }
        Err(e) => {
            problem(report, format!("commit {}: {e}", root.commit_cid));
            root.data_cid
        }
    };

    // The tree, depth-first with an explicit stack, leaves in key order; each
    // leaf is looked up in the record index.
    let mut stack = vec![Step::Node { cid: data, layer: None, is_root: true }];
    let mut last_key: Option<String> = None;
    let (mut matched, mut differs) = (0u64, 0u64);
    while let Some(step) = stack.pop() {
        match step {
            Step::Node { cid, layer, is_root } => {
                let Some(bytes) = block(conn, did, &cid).await? else {
                    problem(report, format!("MST node {cid} is missing"));
                    continue;
                };
                stats.nodes += 1;
                match check_node(&cid, &bytes, layer, is_root) {
                    Ok(node) => push_in_order(&mut stack, &node),
                    Err(e) => problem(report, e.to_string()),
                }
            }
            Step::Leaf { key, value } => {
                stats.records += 1;
                if last_key.as_ref().is_some_and(|last| *last >= key) {
                    problem(report, format!("MST key {key:?} is out of order"));
                }
                let (collection, rkey) = key.split_once('/').unwrap_or((key.as_str(), ""));
                let indexed: Option<Vec<u8>> = sqlx::query_scalar(
                    "SELECT cid FROM record WHERE did = ? AND collection = ? AND rkey = ?",
                )
                .bind(did)
                .bind(collection)
                .bind(rkey)
                .fetch_optional(&mut *conn)
                .await?;
                match indexed {
                    Some(c) if c == value.to_bytes() => matched += 1,
                    Some(_) => {
                        differs += 1;
                        problem(report, format!("record {key}: the index names another CID than the MST"));
                    }
                    None => {
                        problem(report, format!("record {key} is in the MST but not in the record index"));
                        if block(conn, did, &value).await?.is_none() {
                            problem(report, format!("record {key}: block {value} is missing"));
                        }
                    }
                }
                last_key = Some(key);
                progress.tick(|| format!("{did} {} records", stats.records));
            }
        }
    }

    // Index rows the tree does not have: counted, then named by looking each up.
    let indexed: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM record WHERE did = ?")
        .bind(did)
        .fetch_one(&mut *conn)
        .await?;
    let extra = (indexed as u64).saturating_sub(matched + differs);
    if extra > 0 {
        problem(report, format!("{extra} rows of the record index are not in the MST"));
        name_index_extras(conn, did, data, report).await?;
    }
    // Record blocks: every CID of the index (which now equals the tree) is a stored block.
    let missing: Vec<(String, String, Vec<u8>)> = sqlx::query_as(
        "SELECT collection, rkey, cid FROM record r WHERE did = ?1
         AND NOT EXISTS (SELECT 1 FROM block b WHERE b.did = ?1 AND b.cid = r.cid) LIMIT ?2",
    )
    .bind(did)
    .bind(MAX_PROBLEMS as i64)
    .fetch_all(&mut *conn)
    .await?;
    for (collection, rkey, cid) in missing {
        let cid = Cid::try_from(cid.as_slice()).map_or_else(|_| "(malformed)".to_owned(), |c| c.to_string());
        problem(report, format!("record {collection}/{rkey}: block {cid} is missing"));
    }

    // Every stored block, streamed: its CID recomputed, DAG-CBOR decoded strictly.
    let distinct_records: i64 = sqlx::query_scalar("SELECT COUNT(DISTINCT cid) FROM record WHERE did = ?")
        .bind(did)
        .fetch_one(&mut *conn)
        .await?;
    let mut rows = sqlx::query("SELECT cid, data FROM block WHERE did = ?").bind(did).fetch(&mut *conn);
    let mut scanned = 0u64;
    let mut bad = Vec::new();
    while let Some(row) = rows.try_next().await? {
        scanned += 1;
        let data: &[u8] = row.try_get("data")?;
        let stored = row.try_get::<&[u8], _>("cid")?;
        let Ok(cid) = Cid::try_from(stored) else {
            bad.push(format!("a block has a malformed CID {}", hex::encode(stored)));
            continue;
        };
        let computed = match cid.codec() {
            DAG_CBOR => cid_for_cbor(data),
            RAW => cid_for_raw(data),
            other => {
                bad.push(format!("block {cid} has codec {other:#x}"));
                continue;
            }
        };
        if computed != cid {
            bad.push(format!("block {cid} does not hash to its CID (bytes give {computed})"));
        } else if cid.codec() == DAG_CBOR
            && let Err(e) = decode_cbor_strict(data)
        {
            bad.push(format!("block {cid} is not valid DAG-CBOR: {e}"));
        }
        if bad.len() >= MAX_PROBLEMS {
            break;
        }
        progress.tick(|| format!("{did} {scanned}/{stored_blocks} blocks hashed"));
    }
    drop(rows);
    for b in bad {
        problem(report, b);
    }
    let reachable = 1 + stats.nodes + distinct_records as u64;
    if stored_blocks as u64 > reachable {
        problem(
            report,
            format!(
                "{} blocks are stored but not reachable from the commit ({stored_blocks} stored, {reachable} reachable)",
                stored_blocks as u64 - reachable
            ),
        );
    }
    stats.problems = report.problem_count - before;
    Ok(stats)
}

/// Names up to [`MAX_PROBLEMS`] index rows whose key the tree lacks: pages of the index in key order, each key looked up from
/// the root (O(depth) blocks per lookup). Only runs when counts disagree.
async fn name_index_extras(
    conn: &mut SqliteConnection,
    did: &str,
    data: Cid,
    report: &mut Report,
) -> anyhow::Result<()> {
    let (mut collection, mut rkey) = (String::new(), String::new());
    loop {
        let page: Vec<(String, String)> = sqlx::query_as(
            "SELECT collection, rkey FROM record WHERE did = ?1 AND (collection, rkey) > (?2, ?3)
             ORDER BY collection, rkey LIMIT 500",
        )
        .bind(did)
        .bind(&collection)
        .bind(&rkey)
        .fetch_all(&mut *conn)
        .await?;
        let Some(last) = page.last() else { return Ok(()) };
        (collection, rkey) = (last.0.clone(), last.1.clone());
        for (c, r) in page {
            let key = format!("{c}/{r}");
            if mst_lookup(conn, did, data, &key).await?.is_none() {
                report.problem(format!("repo {did}: record {key} is in the index but not in the MST"));
                if report.full() {
                    return Ok(());
                }
            }
        }
    }
}

/// The value under `key`, descending from `root`; `None` when absent or unreadable.
async fn mst_lookup(
    conn: &mut SqliteConnection,
    did: &str,
    root: Cid,
    key: &str,
) -> Result<Option<Cid>, sqlx::Error> {
    let mut cursor = Some(root);
    while let Some(cid) = cursor {
        let Some(bytes) = block(conn, did, &cid).await? else { return Ok(None) };
        let Ok(node) = check_node(&cid, &bytes, None, false) else { return Ok(None) };
        match node.entries.binary_search_by(|e| e.key.as_str().cmp(key)) {
            Ok(i) => return Ok(Some(node.entries[i].value)),
            Err(0) => cursor = node.left,
            Err(i) => cursor = node.entries[i - 1].right,
        }
    }
    Ok(None)
}

async fn check_blobs(
    conn: &mut SqliteConnection,
    disk_blobs: &Path,
    missing_in_backup: &HashSet<String>,
    manifest_blobs: &HashMap<&str, &str>,
    report: &mut Report,
    progress: &mut Progress,
) -> anyhow::Result<()> {
    // Every record → blob reference points at a stored blob row.
    let dangling: Vec<(String, String, String, String)> = sqlx::query_as(
        "SELECT did, collection, rkey, blob_cid FROM record_blob rb
         WHERE NOT EXISTS (SELECT 1 FROM blob b WHERE b.did = rb.did AND b.cid = rb.blob_cid) LIMIT ?",
    )
    .bind(MAX_PROBLEMS as i64)
    .fetch_all(&mut *conn)
    .await?;
    for (did, collection, rkey, cid) in &dangling {
        report
            .problem(format!("blobs: {did} {collection}/{rkey} references blob {cid}, which is not stored"));
    }

    let (mut sqlite, mut disk, mut s3, mut skipped, mut bytes) = (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut problems = Vec::new();
    let mut rows =
        sqlx::query("SELECT did, cid, size, tier, CASE tier WHEN 'sqlite' THEN data END AS data FROM blob")
            .fetch(&mut *conn);
    while let Some(row) = rows.try_next().await? {
        let did: &str = row.try_get("did")?;
        let cid_str: &str = row.try_get("cid")?;
        let size: i64 = row.try_get("size")?;
        let tier: &str = row.try_get("tier")?;
        let Ok(cid) = Cid::try_from(cid_str) else {
            problems.push(format!("blobs: {did} has a blob with a malformed CID {cid_str:?}"));
            continue;
        };
        match tier {
            "sqlite" => {
                sqlite += 1;
                let data: Option<&[u8]> = row.try_get("data")?;
                match data {
                    Some(d) if d.len() as i64 == size && cid_for_raw(d) == cid => bytes += size as u64,
                    Some(_) => {
                        problems.push(format!("blobs: {did}/{cid}: stored bytes do not match (size or hash)"))
                    }
                    None => problems.push(format!("blobs: {did}/{cid}: sqlite tier without data")),
                }
            }
            "disk" => {
                disk += 1;
                let rel = crate::blobs::object_path(did, cid_str).to_string();
                if missing_in_backup.contains(&format!("{did}/{cid_str}")) {
                    // Deleted by a commit after the snapshot (the manifest says so): not a loss.
                    skipped += 1;
                    continue;
                }
                match std::fs::metadata(disk_blobs.join(&rel)) {
                    Ok(m) if m.len() as i64 == size => bytes += m.len(),
                    Ok(m) => {
                        problems.push(format!("blobs: {rel}: {} bytes, the database says {size}", m.len()))
                    }
                    Err(e) => problems.push(format!("blobs: {rel}: {e} (under {})", disk_blobs.display())),
                }
                // In a backup the manifest's SHA-256 (checked above) must be the blob's own.
                if let Some(sha) = manifest_blobs.get(rel.as_str())
                    && hex::encode(cid.hash().digest()) != *sha
                {
                    problems.push(format!("blobs: {rel}: content does not match its CID"));
                }
            }
            _ => s3 += 1,
        }
        if problems.len() >= MAX_PROBLEMS {
            break;
        }
        progress.tick(|| format!("blobs {} checked ({})", sqlite + disk + s3, mib(bytes)));
    }
    drop(rows);
    for p in problems {
        report.problem(p);
    }
    report.blobs = sqlite + disk + s3;
    report.check(format!(
        "blobs: {sqlite} in sqlite (hashed), {disk} on disk (present, sizes match{}), {s3} in s3 (not checked), \
         {} dangling references",
        if skipped > 0 { format!("; {skipped} deleted after the snapshot, as the manifest says") } else { String::new() },
        dangling.len()
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::atp::mst::CheckedEntry;

    #[test]
    fn in_order_stack_pops_left_leaf_right() {
        let c = |s: &[u8]| cid_for_cbor(s);
        let node = CheckedNode {
            layer: Some(1),
            left: Some(c(b"l")),
            entries: vec![
                CheckedEntry { key: "a/1".into(), value: c(b"v1"), right: Some(c(b"r1")) },
                CheckedEntry { key: "a/2".into(), value: c(b"v2"), right: None },
            ],
        };
        let mut stack = Vec::new();
        push_in_order(&mut stack, &node);
        let order: Vec<String> = std::iter::from_fn(|| stack.pop())
            .map(|s| match s {
                Step::Node { cid, layer, is_root } => {
                    assert_eq!((layer, is_root), (Some(0), false));
                    format!("node {}", if cid == c(b"l") { "l" } else { "r1" })
                }
                Step::Leaf { key, .. } => key,
            })
            .collect();
        assert_eq!(order, ["node l", "a/1", "node r1", "a/2"]);
    }

    #[test]
    fn report_caps_the_list_but_counts_everything() {
        let mut r = Report::default();
        for i in 0..(MAX_PROBLEMS + 7) {
            r.problem(format!("p{i}"));
        }
        assert_eq!((r.problems.len(), r.problem_count), (MAX_PROBLEMS, MAX_PROBLEMS + 7));
        assert!(r.full() && !r.ok());
        assert!(r.summary().starts_with("verify: FAILED"), "{}", r.summary());
        assert_eq!(
            Report { accounts: 2, records: 100_000, blocks: 131_072, blobs: 12, ..Report::default() }
                .summary(),
            "verify: OK — 2 accounts, 100000 records, 131072 blocks, 12 blobs (0 problems)"
        );
    }
}
