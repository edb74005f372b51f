//! Blob throughput and memory: `uploadBlob` and `getBlob` over HTTP, per storage tier.
//!
//! ```text
//! cargo run --release --example blobload                 # 5 repetitions
//! cargo run --release --example blobload -- --reps 9 --sizes-mb 1,50
//! # With an S3-compatible server (scripts/test starts moto the same way):
//! ROOST_TEST_S3_ENDPOINT=http://127.0.0.1:PORT ROOST_TEST_S3_BUCKET=roost-blobbench \
//!     cargo run --release --example blobload
//! ```
//!
//! For each tier (disk, then S3 when `ROOST_TEST_S3_ENDPOINT` and `ROOST_TEST_S3_BUCKET`
//! are set, then SQLite with `sqlite_max_bytes` raised above the largest blob), a Roost is
//! started in this process (`App::build` from `Config::for_tests`, a temp data directory,
//! a mock PLC directory), the client logs in, and for each size it uploads `--reps`
//! random blobs (each one different, so none is deduplicated) and downloads the last
//! one `--reps` times, printing the median MB/s (1 MB = 10^6 bytes) of each.
//!
//! Memory: a thread samples this process's `VmRSS` every 2 ms, and `VmHWM` is reset
//! (`/proc/self/clear_refs`) before each request, so each request gets its peak RSS
//! minus the RSS just before it. The server is in-process, so the figure also holds the
//! client's request/response buffers; the client sends a body allocated before the
//! baseline and drops each downloaded chunk at once, so that part is small. The
//! largest growth over the repetitions is printed. The disk and S3 tiers run before
//! SQLite so SQLite's whole-blob buffers cannot be reused by (and hide) their growth.

#[allow(dead_code)] // each example uses part of it
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

#[derive(Parser)]
#[command(about = "uploadBlob/getBlob throughput and RSS growth per storage tier")]
struct Args {
    /// Timed repetitions of each upload and download.
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Blob sizes in MB (10^6 bytes).
    #[arg(long, value_delimiter = ',', default_values_t = [1u64, 50])]
    sizes_mb: Vec<u64>,
}

const HANDLE: &str = "blobload.test";
const PASSWORD: &str = "blobload-password";

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.reps > 0, "--reps must be at least 1");
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(run(&args))
}

async fn run(args: &Args) -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let memory = Memory::start();
    if !memory.hwm_resettable {
        println!("note: /proc/self/clear_refs is not writable; peaks come from 2 ms VmRSS samples only");
    }
    let mut tiers = vec![Tier::Disk];
    match (std::env::var("ROOST_TEST_S3_ENDPOINT"), std::env::var("ROOST_TEST_S3_BUCKET")) {
        (Ok(endpoint), Ok(bucket)) if !endpoint.trim().is_empty() && !bucket.trim().is_empty() => {
            tiers.push(Tier::S3 { endpoint: endpoint.trim().trim_end_matches('/').to_owned(), bucket })
        }
        _ => println!("SKIP s3: ROOST_TEST_S3_ENDPOINT and ROOST_TEST_S3_BUCKET are not both set"),
    }
    tiers.push(Tier::Sqlite);

    let largest = args.sizes_mb.iter().max().copied().unwrap_or(0) * 1_000_000;
    println!(
        "| tier | size | uploadBlob MB/s (median of {n}) | getBlob MB/s (median of {n}) | \
         peak RSS growth, upload | peak RSS growth, download |",
        n = args.reps
    );
    println!("|---|---|---|---|---|---|");
    for (t, tier) in tiers.iter().enumerate() {
        let server = Server::start(tier, largest).await?;
        let session = Session::login(&server.url).await?;
        for (s, &mb) in args.sizes_mb.iter().enumerate() {
            let size = usize::try_from(mb * 1_000_000)?;
            let mut data = random_bytes(size, (t * 100 + s) as u64 + 1);
            let mut up = Vec::new();
            let mut up_rss = Vec::new();
            let mut cid = String::new();
            for rep in 0..args.reps {
                // A distinct prefix per repetition: the same bytes again would
                // be a deduplicated upload that never reaches the store.
                data[..8].copy_from_slice(&((t * 1_000_000 + s * 1000 + rep) as u64).to_be_bytes());
                let body = bytes::Bytes::copy_from_slice(&data);
                let mark = memory.mark();
                let start = Instant::now();
                cid = session.upload(body).await?;
                up.push(mb as f64 / start.elapsed().as_secs_f64());
                up_rss.push(memory.growth_since(mark));
            }
            // Check the stored bytes once, untimed: hashing in the timed loop
            // would measure the client's SHA-256 as much as the server.
            let expected = hex::encode(Sha256::digest(&data));
            let (len, digest) = session.download(&session.did, &cid, true).await?;
            anyhow::ensure!(len == size && digest == expected, "{tier}: getBlob returned other bytes");
            drop(data);
            let mut down = Vec::new();
            let mut down_rss = Vec::new();
            for _ in 0..args.reps {
                let mark = memory.mark();
                let start = Instant::now();
                let (len, _) = session.download(&session.did, &cid, false).await?;
                down.push(mb as f64 / start.elapsed().as_secs_f64());
                down_rss.push(memory.growth_since(mark));
                anyhow::ensure!(len == size, "{tier}: getBlob returned {len} bytes, not {size}");
            }
            println!(
                "| {tier} | {mb} MB | {:.1} | {:.1} | {:.1} MiB | {:.1} MiB |",
                median(&mut up),
                median(&mut down),
                max(&up_rss),
                max(&down_rss),
            );
        }
        server.stop().await?;
    }
    println!(
        "RSS of this process at the end: {:.1} MiB (peak since the last reset {:.1} MiB)",
        support::status_kib("VmRSS:") as f64 / 1024.0,
        support::status_kib("VmHWM:") as f64 / 1024.0
    );
    Ok(())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NEG_INFINITY, f64::max)
}

/// Pseudo-random bytes (splitmix64): incompressible, and fast enough that
/// making 50 MB does not dominate the run.
fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    out
}

// ---------------------------------------------------------------------------
// Memory

/// Peak RSS tracking for this process. A plain thread, not a tokio task, so
/// sampling goes on while the runtime's workers are busy with the transfer.
struct Memory {
    peak_kib: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    hwm_resettable: bool,
}

impl Memory {
    fn start() -> Memory {
        let peak_kib = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (peak_kib.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                p.fetch_max(support::status_kib("VmRSS:"), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        Memory { peak_kib, stop, hwm_resettable: reset_hwm() }
    }

    /// Starts a measurement: resets both peaks, returns the RSS now (KiB).
    fn mark(&self) -> u64 {
        if self.hwm_resettable {
            reset_hwm();
        }
        let now = support::status_kib("VmRSS:");
        self.peak_kib.store(now, Ordering::Relaxed);
        now
    }

    /// The peak RSS since `mark` minus the RSS at `mark`, in MiB.
    fn growth_since(&self, mark: u64) -> f64 {
        // The sampler can miss a short spike; VmHWM cannot (when resettable).
        let mut peak = self.peak_kib.load(Ordering::Relaxed).max(support::status_kib("VmRSS:"));
        if self.hwm_resettable {
            peak = peak.max(support::status_kib("VmHWM:"));
        }
        peak.saturating_sub(mark) as f64 / 1024.0
    }
}

impl Drop for Memory {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Resets `VmHWM` to the current RSS ("5" in clear_refs, Linux ≥ 4.0).
fn reset_hwm() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

// ---------------------------------------------------------------------------
// Server

enum Tier {
    Disk,
    S3 { endpoint: String, bucket: String },
    Sqlite,
}

impl std::fmt::Display for Tier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Tier::Disk => "disk",
            Tier::S3 { .. } => "s3",
            Tier::Sqlite => "sqlite",
        })
    }
}

struct Server {
    url: String,
    stop_tx: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    // Last: the data directory goes after the server stopped.
    _dir: tempfile::TempDir,
}

impl Server {
    async fn start(tier: &Tier, largest: u64) -> anyhow::Result<Server> {
        use axum::routing::post;
        // Mock PLC directory: accepts any operation, knows every DID.
        let plc = axum::Router::new().route(
            "/{did}",
            post(|| async { axum::http::StatusCode::OK }).get(|| async { axum::Json(json!({})) }),
        );
        let plc_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let plc_url = format!("http://{}", plc_listener.local_addr()?);
        tokio::spawn(async move { axum::serve(plc_listener, plc).await });

        let dir = tempfile::tempdir()?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let mut config =
            roost::config::Config::for_tests(dir.path().to_path_buf(), plc_url, HANDLE, PASSWORD);
        config.port = addr.port();
        match tier {
            Tier::Disk => {}
            Tier::S3 { endpoint, bucket } => {
                config.blobstore.s3 = Some(roost::config::S3Config {
                    bucket: bucket.clone(),
                    region: Some("us-east-1".into()),
                    endpoint: Some(endpoint.clone()),
                    force_path_style: true,
                    access_key_id: Some("test".into()),
                    secret_access_key: Some("test".into()),
                })
            }
            // Above the largest blob, so every blob lands in SQLite.
            Tier::Sqlite => config.blobstore.sqlite_max_bytes = largest + 1,
        }
        let app = roost::app::App::build(config).await?;
        let (stop_tx, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(app.serve(listener, async move {
            let _ = stopped.await;
        }));
        Ok(Server { url: format!("http://{addr}"), stop_tx, task, _dir: dir })
    }

    async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop_tx.send(());
        self.task.await.context("server task")??;
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Client

struct Session {
    client: reqwest::Client,
    url: String,
    did: String,
    jwt: String,
}

impl Session {
    async fn login(url: &str) -> anyhow::Result<Session> {
        let client = reqwest::Client::builder().build()?;
        let support::Login { did, jwt } = support::login(&client, url, HANDLE, PASSWORD).await?;
        Ok(Session { client, url: url.to_owned(), did, jwt })
    }

    /// One uploadBlob; returns the blob's CID.
    async fn upload(&self, body: bytes::Bytes) -> anyhow::Result<String> {
        let resp = self
            .client
            .post(format!("{}/xrpc/com.atproto.repo.uploadBlob", self.url))
            .bearer_auth(&self.jwt)
            .header("content-type", "application/octet-stream")
            .body(body)
            .send()
            .await?;
        let status = resp.status();
        let body: Value = resp.json().await?;
        anyhow::ensure!(status.is_success(), "uploadBlob: {status} {body}");
        Ok(body["blob"]["ref"]["$link"].as_str().context("blob.ref.$link")?.to_owned())
    }

    /// One getBlob, read chunk by chunk and dropped; returns the length and,
    /// when `hash`, the SHA-256 (hex) of the bytes.
    async fn download(&self, did: &str, cid: &str, hash: bool) -> anyhow::Result<(usize, String)> {
        let mut resp = self
            .client
            .get(format!(
                "{}/xrpc/com.atproto.sync.getBlob?{}",
                self.url,
                form_urlencoded::Serializer::new(String::new())
                    .append_pair("did", did)
                    .append_pair("cid", cid)
                    .finish()
            ))
            .send()
            .await?;
        anyhow::ensure!(resp.status().is_success(), "getBlob: {}", resp.status());
        let mut len = 0;
        let mut hasher = Sha256::new();
        while let Some(chunk) = resp.chunk().await? {
            len += chunk.len();
            if hash {
                hasher.update(&chunk);
            }
        }
        Ok((len, hex::encode(hasher.finalize())))
    }
}
