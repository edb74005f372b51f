//! Scale test: build a large repository through the real write path, export
//! it as a CAR, and report throughput and memory.
//!
//! ```text
//! cargo run --release --example scale -- --records 1000000 --dir /tmp/roost-scale
//! ```
//!
//! Phases, each followed by a line with the current RSS (`VmRSS`) and the
//! peak RSS (`VmHWM`) from /proc/self/status:
//!
//! 1. build: `RepoService::apply_writes` with `--batch` creates per commit;
//! 2. export: `Db::stream_repo_blocks` + `car::encode_block` into a counting
//!    sink, as `com.atproto.sync.getRepo` does;
//! 3. lookups: `--lookups` random `MstEditor::get` through a fresh
//!    `RepoService`, which fills its node cache (shows what that cache costs).
//!
//! The directory is also a data directory (`roost.sqlite`, `keys/`), so
//! `PDS_HOSTNAME=scale.test PDS_DATA_DIRECTORY=DIR roost backup --out …` and
//! `roost verify DIR` work on it.
//!
//! The peak is reported two ways: since the start of the process, and since
//! the start of the phase (the kernel's peak counter is reset between phases
//! by writing 5 to /proc/self/clear_refs).
//!
//! Diagnostic knobs, none of which change `src/`: `--sqlite-cache-kib` and
//! `--max-connections` reopen the pool with the same options as `Db::open`
//! except that one, so their share of the peak can be measured. Set
//! `MALLOC_ARENA_MAX` in the environment to test allocator arenas.

#[allow(dead_code)] // each example uses part of it
mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

use clap::Parser;
use ipld_core::ipld::Ipld;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

use roost::atp::car;
use roost::atp::keys::SigningKey;
use roost::atp::mst::MstEditor;
use roost::atp::syntax::{Nsid, RecordKey, Tid};
use roost::db::Db;
use roost::db::accounts::AccountRow;
use roost::db::repo::RepoItem;
use roost::repo::{RepoService, Write};
use roost::sequencer::Sequencer;

/// A sequencer with no subscribers: events are logged, nobody is live.
fn sequencer() -> std::sync::Arc<Sequencer> {
    std::sync::Arc::new(Sequencer::new(16, 4))
}

const DID: &str = "did:plc:roostscaleroostscaleroos";
const COLLECTION: &str = "app.bsky.feed.post";
const BASE_MICROS: u64 = 1_704_067_200_000_000;
const MIB: f64 = 1024.0 * 1024.0;

#[derive(Parser)]
#[command(about = "Build, export and read a large Roost repository; report speed and RSS")]
struct Args {
    /// Records to create.
    #[arg(long, default_value_t = 1_000_000)]
    records: u64,
    /// Directory for roost.sqlite (wiped first unless --reuse).
    #[arg(long, default_value = "/tmp/roost-scale")]
    dir: PathBuf,
    /// Creates per commit.
    #[arg(long, default_value_t = 1000)]
    batch: u64,
    /// Skip the build when the directory already holds a built repository.
    #[arg(long)]
    reuse: bool,
    /// Random lookups through a fresh RepoService after the export.
    #[arg(long, default_value_t = 200_000)]
    lookups: u64,
    /// Diagnostic: SQLite page cache per connection in KiB (Db::open uses 16000).
    #[arg(long)]
    sqlite_cache_kib: Option<u32>,
    /// Diagnostic: pool size (Db::open uses 8).
    #[arg(long)]
    max_connections: Option<u32>,
    /// Diagnostic: SQLite's process-wide soft heap limit in MiB
    /// (`PRAGMA soft_heap_limit`; Db::open sets none).
    #[arg(long)]
    sqlite_soft_heap_limit_mib: Option<u64>,
}

struct Mem {
    overall_peak_kib: u64,
}

impl Mem {
    /// Prints RSS now, peak since the phase began, peak since process start;
    /// then resets the kernel's peak counter for the next phase.
    fn report(&mut self, phase: &str, db: Option<&Db>) {
        let rss = support::status_kib("VmRSS:");
        let hwm = support::status_kib("VmHWM:");
        self.overall_peak_kib = self.overall_peak_kib.max(hwm);
        let pool = db
            .map(|d| format!(", pool {} connections ({} idle)", d.pool.size(), d.pool.num_idle()))
            .unwrap_or_default();
        println!(
            "[mem] after {phase:<8} RSS {:>6.1} MiB (anon {:.1}, file {:.1}, shmem {:.1}), phase peak {:>6.1} MiB, PEAK RSS {:>6.1} MiB{pool}",
            rss as f64 / 1024.0,
            support::status_kib("RssAnon:") as f64 / 1024.0,
            support::status_kib("RssFile:") as f64 / 1024.0,
            support::status_kib("RssShmem:") as f64 / 1024.0,
            hwm as f64 / 1024.0,
            self.overall_peak_kib as f64 / 1024.0,
        );
        // "5" resets VmHWM to the current RSS (Linux 4.0+). Best effort.
        let _ = std::fs::write("/proc/self/clear_refs", "5");
    }
}

fn post(i: u64) -> Ipld {
    let mut m = BTreeMap::new();
    m.insert("$type".to_owned(), Ipld::String(COLLECTION.to_owned()));
    m.insert(
        "text".to_owned(),
        Ipld::String(format!(
            "Scale test post number {i}: a short line of text, about as long as a typical post."
        )),
    );
    m.insert("createdAt".to_owned(), Ipld::String("2024-01-01T00:00:00.000Z".to_owned()));
    Ipld::Map(m)
}

fn rkey(i: u64) -> String {
    Tid::from_parts(BASE_MICROS + i * 1000, 0).as_str().to_owned()
}

fn file_size(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

async fn open_db(path: &Path, args: &Args) -> anyhow::Result<Db> {
    let db = Db::open(path).await?;
    if args.sqlite_cache_kib.is_none()
        && args.max_connections.is_none()
        && args.sqlite_soft_heap_limit_mib.is_none()
    {
        return Ok(db);
    }
    // Same options as Db::open, with the knob under test changed.
    db.pool.close().await;
    let cache = format!("-{}", args.sqlite_cache_kib.unwrap_or(16000));
    let options = SqliteConnectOptions::from_str("sqlite://")?
        .filename(path)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .foreign_keys(true)
        .busy_timeout(Duration::from_secs(10))
        .pragma("cache_size", cache);
    let options = match args.sqlite_soft_heap_limit_mib {
        Some(mib) => options.pragma("soft_heap_limit", (mib * 1024 * 1024).to_string()),
        None => options,
    };
    let pool = SqlitePoolOptions::new()
        .max_connections(args.max_connections.unwrap_or(8))
        .min_connections(1)
        .connect_with(options)
        .await?;
    println!(
        "diagnostic pool: cache_size {} KiB per connection, max {} connections, soft heap limit {}",
        args.sqlite_cache_kib.unwrap_or(16000),
        args.max_connections.unwrap_or(8),
        args.sqlite_soft_heap_limit_mib.map(|m| format!("{m} MiB")).unwrap_or_else(|| "none".into())
    );
    Ok(Db { pool })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut mem = Mem { overall_peak_kib: 0 };
    mem.report("start", None);

    let path = args.dir.join("roost.sqlite");
    let reuse = args.reuse && path.exists();
    if !reuse {
        let _ = std::fs::remove_dir_all(&args.dir);
    }
    std::fs::create_dir_all(&args.dir)?;
    let key_path = args.dir.join("repo.key");
    let db = open_db(&path, &args).await?;
    let repo = RepoService::new(db.clone(), sequencer());
    mem.report("open", Some(&db));

    let key = if reuse {
        println!("reusing {}", path.display());
        SigningKey::from_hex(std::fs::read_to_string(&key_path)?.trim())?
    } else {
        let key = SigningKey::generate();
        std::fs::write(&key_path, key.to_hex())?;
        // Also where the server keeps it, so the directory is a data directory that
        // `roost backup` and `roost verify` accept (BENCHMARKS.md, "Backup and verify").
        let keys = args.dir.join("keys");
        std::fs::create_dir_all(&keys)?;
        std::fs::set_permissions(&keys, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
        roost::identity::write_secret_file(
            &keys.join(roost::identity::repo_key_file_name(DID)),
            &key.to_hex(),
        )?;
        db.insert_pending_account(&AccountRow {
            did: DID.into(),
            handle: "scale.test".into(),
            email: None,
            password_hash: "unused".into(),
            status: "pending".into(),
            plc_genesis_op: None,
            created_at: "2024-01-01T00:00:00.000Z".into(),
        })
        .await?;
        repo.create_empty_repo(DID, "scale.test", &key).await?;

        // ---- build ----
        println!("building {} records, {} per commit, in {}", args.records, args.batch, args.dir.display());
        let started = Instant::now();
        let mut window = Instant::now();
        let mut window_start = 0;
        let mut i = 0;
        let report_every = (args.records / 10).max(args.batch);
        while i < args.records {
            let end = (i + args.batch).min(args.records);
            let writes = (i..end)
                .map(|j| Write::Create {
                    collection: Nsid::new(COLLECTION).expect("nsid"),
                    rkey: RecordKey::new(rkey(j)).expect("rkey"),
                    value: post(j),
                })
                .collect();
            repo.apply_writes(DID, &key, writes, None).await?;
            let before = i;
            i = end;
            if i / report_every != before / report_every || i == args.records {
                let done = i - window_start;
                window_start = i;
                println!(
                    "  {i:>9} records  {:>7.0} records/s (last {done})  RSS {:.1} MiB (anon {:.1})  pool {}  elapsed {:.1?}",
                    done as f64 / window.elapsed().as_secs_f64(),
                    support::status_kib("VmRSS:") as f64 / 1024.0,
                    support::status_kib("RssAnon:") as f64 / 1024.0,
                    db.pool.size(),
                    started.elapsed()
                );
                window = Instant::now();
            }
        }
        let secs = started.elapsed().as_secs_f64();
        println!(
            "build: {} records in {secs:.1} s = {:.0} records/s",
            args.records,
            args.records as f64 / secs
        );
        mem.report("build", Some(&db));
        key
    };
    let _ = key;

    sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)").execute(&db.pool).await?;
    let wal = PathBuf::from(format!("{}-wal", path.display()));
    let (blocks_in_db, block_bytes): (i64, i64) =
        sqlx::query_as("SELECT count(*), coalesce(sum(length(data)), 0) FROM block WHERE did = ?")
            .bind(DID)
            .fetch_one(&db.pool)
            .await?;
    println!(
        "database: {:.1} MiB (+ WAL {:.1} MiB); {blocks_in_db} blocks holding {:.1} MiB of block data",
        file_size(&path) as f64 / MIB,
        file_size(&wal) as f64 / MIB,
        block_bytes as f64 / MIB
    );

    // ---- export ----
    let started = Instant::now();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<RepoItem>(64);
    let producer_db = db.clone();
    let producer = tokio::spawn(async move { producer_db.stream_repo_blocks(DID, None, tx).await });
    let (mut bytes, mut blocks) = (0u64, 0u64);
    while let Some(item) = rx.recv().await {
        let encoded = match item {
            RepoItem::Root(root) => car::encode_header(&[root.commit_cid]),
            RepoItem::Block(cid, data) => {
                blocks += 1;
                car::encode_block(&cid, &data)
            }
        };
        bytes += encoded.len() as u64;
    }
    anyhow::ensure!(producer.await??, "repository not found");
    let secs = started.elapsed().as_secs_f64();
    println!(
        "export: {:.1} MiB in {blocks} blocks in {secs:.2} s = {:.1} MiB/s, {:.0} blocks/s",
        bytes as f64 / MIB,
        bytes as f64 / MIB / secs,
        blocks as f64 / secs
    );
    mem.report("export", Some(&db));

    // ---- lookups through a fresh node cache ----
    if args.lookups > 0 {
        let root = db.repo_root(DID).await?.ok_or_else(|| anyhow::anyhow!("no repo"))?;
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM record WHERE did = ?")
            .bind(DID)
            .fetch_one(&db.pool)
            .await?;
        let fresh = RepoService::new(db.clone(), sequencer());
        let store = fresh.blocks(DID);
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        let started = Instant::now();
        let mut found = 0u64;
        for _ in 0..args.lookups {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let i = s % (n as u64).min(args.records.max(1));
            let mut ed = MstEditor::new(&store, root.data_cid);
            found += u64::from(ed.get(&format!("{COLLECTION}/{}", rkey(i))).await?.is_some());
        }
        let secs = started.elapsed().as_secs_f64();
        println!(
            "lookups: {} random gets ({found} found) in {secs:.2} s = {:.0} gets/s",
            args.lookups,
            args.lookups as f64 / secs
        );
        mem.report("lookups", Some(&db));
    }
    db.pool.close().await;
    println!("PEAK RSS overall: {:.1} MiB (target: below 100 MiB)", mem.overall_peak_kib as f64 / 1024.0);
    Ok(())
}
