//! Core benchmarks: MST edits over SQLite-backed repositories, one-record
//! commits, signing and verification, and CAR export throughput.
//!
//! ```text
//! cargo bench --bench core                                   # 10k, 100k, 1M
//! ROOST_BENCH_SIZES=10000,100000 cargo bench --bench core    # quick run
//! cargo bench --bench core -- crypto                         # one group
//! ```
//!
//! Repositories are built once through `RepoService::apply_writes` (1,000
//! creates per commit) and cached in `target/bench-data/repo-<n>.sqlite`;
//! delete that directory to rebuild them. Every run works on a copy in a
//! temporary directory, so the one-record commits never grow the cache.
//!
//! Settings: `ROOST_BENCH_SIZES` (comma-separated record counts, default
//! `10000,100000,1000000`), `ROOST_BENCH_EXPORT_SIZE` (default `100000`).
//! Under `cargo test --benches` (no `--bench` flag) both default to 10000.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cid::Cid;
use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use ipld_core::ipld::Ipld;

use roost::atp::car;
use roost::atp::commit;
use roost::atp::data::{cid_for_cbor, decode_cbor_strict};
use roost::atp::keys::{KeyAlgorithm, SigningKey};
use roost::atp::mst::{BlockSource, MstEditor, MstError, OpChange, covering_proof};
use roost::atp::syntax::{Nsid, RecordKey, Tid};
use roost::db::Db;
use roost::db::accounts::AccountRow;
use roost::db::repo::RepoItem;
use roost::repo::{DbBlocks, RepoService, Write};
use roost::sequencer::Sequencer;

/// A sequencer with no subscribers: events are logged, nobody is live.
fn sequencer() -> std::sync::Arc<Sequencer> {
    std::sync::Arc::new(Sequencer::new(16, 4))
}

const DID: &str = "did:plc:roostbenchroostbenchroos";
const COLLECTION: &str = "app.bsky.feed.post";
/// Creates per commit while building a repository.
const BATCH: usize = 1000;
/// Synthetic record keys: TIDs 1 ms apart from 2024-01-01, clock id 0.
const BASE_MICROS: u64 = 1_704_067_200_000_000;
const STEP_MICROS: u64 = 1000;

fn rkey(i: u64) -> String {
    Tid::from_parts(BASE_MICROS + i * STEP_MICROS, 0).as_str().to_owned()
}

/// A key that is not in the repository and sorts between records `i` and
/// `i + 1` (same millisecond as `i`, half a millisecond later).
fn absent_rkey(i: u64) -> String {
    Tid::from_parts(BASE_MICROS + i * STEP_MICROS + STEP_MICROS / 2, 0).as_str().to_owned()
}

fn post(i: u64) -> Ipld {
    let mut m = BTreeMap::new();
    m.insert("$type".to_owned(), Ipld::String(COLLECTION.to_owned()));
    m.insert(
        "text".to_owned(),
        Ipld::String(format!(
            "Benchmark post number {i}: a short line of text, about as long as a typical post."
        )),
    );
    m.insert("createdAt".to_owned(), Ipld::String("2024-01-01T00:00:00.000Z".to_owned()));
    Ipld::Map(m)
}

fn create(rkey: String, value: Ipld) -> Write {
    Write::Create {
        collection: Nsid::new(COLLECTION).expect("nsid"),
        rkey: RecordKey::new(rkey).expect("rkey"),
        value,
    }
}

/// Deterministic pseudo-random indices (xorshift64*).
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime")
}

fn data_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("bench-data")
}

/// `cargo test --benches` runs this binary without `--bench`: criterion then
/// runs each benchmark once, and the default sizes shrink to 10k so that no
/// large repository gets built.
fn test_mode() -> bool {
    !std::env::args().any(|a| a == "--bench")
}

fn sizes() -> Vec<u64> {
    let default = if test_mode() { "10000" } else { "10000,100000,1000000" };
    let raw = std::env::var("ROOST_BENCH_SIZES").unwrap_or_else(|_| default.into());
    raw.split(',')
        .map(|s| s.trim().replace('_', ""))
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().expect("ROOST_BENCH_SIZES: comma-separated integers"))
        .collect()
}

async fn new_account(db: &Db, repo: &RepoService, key: &SigningKey) {
    db.insert_pending_account(&AccountRow {
        did: DID.into(),
        handle: "bench.test".into(),
        email: None,
        password_hash: "unused".into(),
        status: "pending".into(),
        plc_genesis_op: None,
        created_at: "2024-01-01T00:00:00.000Z".into(),
    })
    .await
    .expect("account row");
    repo.create_empty_repo(DID, "bench.test", key).await.expect("empty repo");
}

/// Returns the cached repository of `n` records, building it when absent.
fn cached_repo(rt: &tokio::runtime::Runtime, n: u64) -> (PathBuf, SigningKey) {
    let dir = data_dir();
    std::fs::create_dir_all(&dir).expect("bench-data dir");
    let db_path = dir.join(format!("repo-{n}.sqlite"));
    let key_path = dir.join(format!("repo-{n}.key"));
    if db_path.exists() && key_path.exists() {
        let hex = std::fs::read_to_string(&key_path).expect("key file");
        return (db_path, SigningKey::from_hex(hex.trim()).expect("key"));
    }
    let tmp = dir.join(format!("repo-{n}.building.sqlite"));
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", tmp.display()));
    }
    let key = SigningKey::generate();
    eprintln!("building a {n}-record repository in {} ...", tmp.display());
    let started = Instant::now();
    rt.block_on(async {
        let db = Db::open(&tmp).await.expect("open db");
        let repo = RepoService::new(db.clone(), sequencer());
        new_account(&db, &repo, &key).await;
        let mut i = 0;
        while i < n {
            let end = (i + BATCH as u64).min(n);
            let writes = (i..end).map(|j| create(rkey(j), post(j))).collect();
            repo.apply_writes(DID, &key, writes, None).await.expect("apply_writes");
            i = end;
            if i % 100_000 == 0 {
                eprintln!("  {i} records, {:.0?}", started.elapsed());
            }
        }
        sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)").execute(&db.pool).await.expect("checkpoint");
        db.pool.close().await;
    });
    eprintln!("built {n} records in {:.1?}", started.elapsed());
    std::fs::rename(&tmp, &db_path).expect("rename db");
    for suffix in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", tmp.display()));
    }
    std::fs::write(&key_path, key.to_hex()).expect("key file");
    (db_path, key)
}

/// A commit's new blocks over the stored ones (what `apply_writes` proves against).
struct Overlay<'a> {
    top: HashMap<Cid, Arc<[u8]>>,
    base: DbBlocks<'a>,
    root: Cid,
}

impl BlockSource for Overlay<'_> {
    async fn get_block(&self, cid: &Cid) -> Result<Option<Arc<[u8]>>, MstError> {
        match self.top.get(cid) {
            Some(hit) => Ok(Some(hit.clone())),
            None => self.base.get_block(cid).await,
        }
    }
}

/// An open copy of the cached repository of `n` records.
struct Fixture {
    _dir: tempfile::TempDir,
    db: Db,
    repo: RepoService,
    key: SigningKey,
    n: u64,
}

fn fixture(rt: &tokio::runtime::Runtime, n: u64) -> Fixture {
    let (cached, key) = cached_repo(rt, n);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("roost.sqlite");
    std::fs::copy(&cached, &path).expect("copy cached repo");
    let db = rt.block_on(Db::open(&path)).expect("open copy");
    let repo = RepoService::new(db.clone(), sequencer());
    Fixture { _dir: dir, db, repo, key, n }
}

impl Fixture {
    fn data_root(&self, rt: &tokio::runtime::Runtime) -> Cid {
        rt.block_on(self.db.repo_root(DID)).expect("root").expect("repo exists").data_cid
    }
}

fn key_of(rkey: &str) -> String {
    format!("{COLLECTION}/{rkey}")
}

/// Criterion runs every group's setup even when a filter excludes all of
/// its benchmarks; building fixtures is slow, so a filter that starts with
/// another group's name (`mst`, `crypto`, `codec`, `car_export`) skips this setup.
fn selected(group: &str) -> bool {
    const GROUPS: [&str; 4] = ["mst", "crypto", "codec", "car_export"];
    // Criterion options that take a value (the value is not a filter).
    const VALUED: [&str; 14] = [
        "--profile-time",
        "--measurement-time",
        "--warm-up-time",
        "--sample-size",
        "--save-baseline",
        "--baseline",
        "--load-baseline",
        "--output-format",
        "--color",
        "--plotting-backend",
        "--noise-threshold",
        "--confidence-level",
        "--significance-level",
        "--nresamples",
    ];
    let mut filter = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if VALUED.contains(&a.as_str()) {
            args.next();
        } else if !a.starts_with('-') {
            filter = Some(a);
            break;
        }
    }
    match filter {
        Some(f) => {
            let head = f.trim_start_matches('^');
            !GROUPS.iter().any(|g| *g != group && head.starts_with(g))
        }
        None => true,
    }
}

fn bench_mst(c: &mut Criterion) {
    if !selected("mst") {
        return;
    }
    let rt = runtime();
    let mut group = c.benchmark_group("mst");
    group.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    for n in sizes() {
        let fx = fixture(&rt, n);
        let root = fx.data_root(&rt);
        let store = fx.repo.blocks(DID);

        // Lookup with the service's node cache warm (steady state of a server).
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        group.bench_with_input(BenchmarkId::new("get_warm", n), &n, |b, &n| {
            b.iter_custom(|iters| {
                let keys: Vec<String> = (0..iters).map(|_| key_of(&rkey(rng.below(n)))).collect();
                rt.block_on(async {
                    let start = Instant::now();
                    for k in &keys {
                        let mut ed = MstEditor::new(&store, root);
                        assert!(ed.get(k).await.expect("get").is_some());
                    }
                    start.elapsed()
                })
            })
        });

        // Lookup with an empty node cache: every node on the path is a
        // SQLite query (SQLite's own page cache and the OS cache stay warm).
        group.bench_with_input(BenchmarkId::new("get_cold", n), &n, |b, &n| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let k = key_of(&rkey(rng.below(n)));
                        let fresh = RepoService::new(fx.db.clone(), sequencer());
                        let store = fresh.blocks(DID);
                        let start = Instant::now();
                        let mut ed = MstEditor::new(&store, root);
                        assert!(ed.get(&k).await.expect("get").is_some());
                        total += start.elapsed();
                    }
                    total
                })
            })
        });

        // Insert of an absent key at a random position, then `finish` (the
        // diff a commit would persist). Nothing is written to SQLite.
        let leaf = cid_for_cbor(b"\xa0");
        group.bench_with_input(BenchmarkId::new("insert", n), &n, |b, &n| {
            b.iter_custom(|iters| {
                let keys: Vec<String> = (0..iters).map(|_| key_of(&absent_rkey(rng.below(n)))).collect();
                rt.block_on(async {
                    let start = Instant::now();
                    for k in &keys {
                        let mut ed = MstEditor::new(&store, root);
                        ed.insert(k, leaf).await.expect("insert");
                        std::hint::black_box(ed.finish());
                    }
                    start.elapsed()
                })
            })
        });

        group.bench_with_input(BenchmarkId::new("delete", n), &n, |b, &n| {
            b.iter_custom(|iters| {
                let keys: Vec<String> = (0..iters).map(|_| key_of(&rkey(rng.below(n)))).collect();
                rt.block_on(async {
                    let start = Instant::now();
                    for k in &keys {
                        let mut ed = MstEditor::new(&store, root);
                        assert!(ed.delete(k).await.expect("delete").is_some());
                        std::hint::black_box(ed.finish());
                    }
                    start.elapsed()
                })
            })
        });

        // One SQLite round trip through sqlx (a query on the pool's worker
        // thread), and one point read of a block by CID: the unit costs
        // that a commit pays per statement and a cold lookup per node.
        group.bench_with_input(BenchmarkId::new("db_select_1", n), &n, |b, _| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        sqlx::query("SELECT 1").execute(&fx.db.pool).await.expect("select");
                    }
                    start.elapsed()
                })
            })
        });
        let sample: Vec<Vec<u8>> = rt
            .block_on(
                sqlx::query_scalar("SELECT cid FROM block WHERE did = ? ORDER BY random() LIMIT 1000")
                    .bind(DID)
                    .fetch_all(&fx.db.pool),
            )
            .expect("sample cids");
        let sample: Vec<Cid> = sample.iter().map(|b| Cid::try_from(b.as_slice()).expect("cid")).collect();
        group.bench_with_input(BenchmarkId::new("db_block_read", n), &n, |b, _| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    for i in 0..iters {
                        let cid = &sample[(rng.below(sample.len() as u64) ^ i) as usize % sample.len()];
                        assert!(fx.db.block(DID, cid).await.expect("block").is_some());
                    }
                    start.elapsed()
                })
            })
        });

        // The firehose's covering proof (sync v1.1) for a commit of k creates
        // appended at the right edge, as `apply_writes` computes it: over the
        // commit's new nodes layered on the stored ones.
        for k in [1u64, 100] {
            let leaf = cid_for_cbor(b"\xa0");
            let keys: Vec<String> = (0..k).map(|j| key_of(&rkey(n + 1 + j))).collect();
            let overlay = rt.block_on(async {
                let mut ed = MstEditor::new(&store, root);
                for key in &keys {
                    ed.insert(key, leaf).await.expect("insert");
                }
                let diff = ed.finish();
                Overlay {
                    top: diff.new_blocks.iter().map(|(c, b)| (*c, Arc::from(b.as_slice()))).collect(),
                    base: fx.repo.blocks(DID),
                    root: diff.root,
                }
            });
            let ops: Vec<OpChange> =
                keys.iter().map(|key| OpChange { key, before: None, after: Some(leaf) }).collect();
            group.bench_with_input(BenchmarkId::new(format!("covering_proof_{k}"), n), &n, |b, _| {
                b.iter_custom(|iters| {
                    rt.block_on(async {
                        let start = Instant::now();
                        for _ in 0..iters {
                            let proof = covering_proof(&overlay, overlay.root, &ops).await.expect("proof");
                            std::hint::black_box(proof);
                        }
                        start.elapsed()
                    })
                })
            });
        }

        // What createRecord costs below HTTP: one create, signed, persisted.
        // Keys come from the service's clock, so they append at the right
        // edge as real TIDs do. These commits grow the copy, not the cache.
        group.bench_with_input(BenchmarkId::new("apply_writes_1", n), &n, |b, _| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    for i in 0..iters {
                        let rk = fx.repo.next_tid(None).as_str().to_owned();
                        fx.repo
                            .apply_writes(DID, &fx.key, vec![create(rk, post(i))], None)
                            .await
                            .expect("apply_writes");
                    }
                    start.elapsed()
                })
            })
        });
        drop(store);
        let _ = fx.n;
        rt.block_on(fx.db.pool.close());
    }
    group.finish();
}

/// The cost of reading MST nodes without SQLite: a 10,000-key tree in a
/// `HashMap` block store, and the decoding of one of its nodes.
fn bench_codec(c: &mut Criterion) {
    if !selected("codec") {
        return;
    }
    let n = 10_000u64;
    let mut store: HashMap<Cid, Arc<[u8]>> = HashMap::new();
    let (root, leaf_bytes) = futures::executor::block_on(async {
        let mut ed = MstEditor::empty(&store).expect("empty");
        for i in 0..n {
            let value = cid_for_cbor(&i.to_be_bytes());
            ed.insert(&key_of(&rkey(i)), value).await.expect("insert");
        }
        let diff = ed.finish();
        for (cid, bytes) in &diff.new_blocks {
            store.insert(*cid, Arc::from(bytes.as_slice()));
        }
        let mut ed = MstEditor::new(&store, diff.root);
        let path = ed.path(&key_of(&rkey(n / 2))).await.expect("path");
        let leaf = *path.last().expect("non-empty path");
        (diff.root, store[&leaf].clone())
    });
    eprintln!(
        "codec: in-memory tree of {n} keys, {} nodes; sample node {} bytes",
        store.len(),
        leaf_bytes.len()
    );
    let mut group = c.benchmark_group("codec");
    group.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(2));
    // What every MST node read pays today (`decode_cbor_serde` ->
    // `decode_cbor_strict`): parse to Ipld, validate, re-encode, compare.
    group.bench_function("node_decode_strict", |b| {
        b.iter(|| decode_cbor_strict(std::hint::black_box(&leaf_bytes)).expect("decode"))
    });
    // The parse alone, for comparison.
    group.bench_function("node_parse_only", |b| {
        b.iter(|| serde_ipld_dagcbor::from_slice::<Ipld>(std::hint::black_box(&leaf_bytes)).expect("parse"))
    });
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    group.bench_function(BenchmarkId::new("mem_get", n), |b| {
        b.iter_custom(|iters| {
            let keys: Vec<String> = (0..iters).map(|_| key_of(&rkey(rng.below(n)))).collect();
            futures::executor::block_on(async {
                let start = Instant::now();
                for k in &keys {
                    let mut ed = MstEditor::new(&store, root);
                    assert!(ed.get(k).await.expect("get").is_some());
                }
                start.elapsed()
            })
        })
    });
    group.finish();
}

fn bench_crypto(c: &mut Criterion) {
    if !selected("crypto") {
        return;
    }
    let mut group = c.benchmark_group("crypto");
    group.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(2));
    let msg = [0x5au8; 200];
    let data = cid_for_cbor(b"\xa0");
    for (name, alg) in [("k256", KeyAlgorithm::K256), ("p256", KeyAlgorithm::P256)] {
        let key = SigningKey::generate_for(alg);
        let public = key.public_key();
        let sig = key.sign(&msg);
        group.bench_function(BenchmarkId::new("sign_200B", name), |b| {
            b.iter(|| key.sign(std::hint::black_box(&msg)))
        });
        group.bench_function(BenchmarkId::new("verify_200B", name), |b| {
            b.iter(|| public.verify(std::hint::black_box(&msg), &sig).expect("verify"))
        });
        group.bench_function(BenchmarkId::new("commit_sign", name), |b| {
            b.iter(|| commit::sign(DID, "3kzq2vuowo2b2", std::hint::black_box(data), &key).expect("sign"))
        });
    }
    group.finish();
}

/// Streams the whole repository as a CAR into a counting sink, the way
/// `sync.getRepo` does (producer task, channel of 64, encode per block).
async fn export(db: &Db) -> (u64, u64) {
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
        std::hint::black_box(&encoded);
    }
    assert!(producer.await.expect("join").expect("stream"));
    (bytes, blocks)
}

fn bench_export(c: &mut Criterion) {
    if !selected("car_export") {
        return;
    }
    let rt = runtime();
    let n: u64 = std::env::var("ROOST_BENCH_EXPORT_SIZE")
        .ok()
        .map(|s| s.parse().expect("ROOST_BENCH_EXPORT_SIZE"))
        .unwrap_or(if test_mode() { 10_000 } else { 100_000 });
    let fx = fixture(&rt, n);
    let (bytes, blocks) = rt.block_on(export(&fx.db));
    eprintln!("export of {n} records: {bytes} bytes in {blocks} blocks per CAR");
    let mut group = c.benchmark_group("car_export");
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    let db = Arc::new(fx.db.clone());
    group.throughput(Throughput::Bytes(bytes));
    group.bench_with_input(BenchmarkId::new("bytes", n), &n, |b, _| b.iter(|| rt.block_on(export(&db))));
    group.throughput(Throughput::Elements(blocks));
    group.bench_with_input(BenchmarkId::new("blocks", n), &n, |b, _| b.iter(|| rt.block_on(export(&db))));
    group.finish();
    rt.block_on(fx.db.pool.close());
}

criterion_group!(benches, bench_crypto, bench_codec, bench_mst, bench_export);
criterion_main!(benches);
