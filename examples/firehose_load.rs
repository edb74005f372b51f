//! Firehose load test: an in-process Roost, N WebSocket subscribers, and
//! measurements of write-to-event latency, sustained throughput, server CPU
//! and memory per subscriber, slow-consumer handling and cursor replay speed.
//!
//! ```text
//! cargo run --release --example firehose_load
//! cargo run --release --example firehose_load -- --subscribers 1,100,1000 \
//!     --latency-writes 200 --burst 2000 --writers 4 --replay-events 100000
//! ```
//!
//! Everything runs in this process, on two separate tokio runtimes: the
//! server (Roost built by `App::build` from `Config::for_tests`, next to a
//! tiny mock PLC directory that accepts any operation) on threads named
//! `roost-srv`, and the clients (subscribers, writers) on threads named
//! `fh-client`. Server CPU is the sum of utime+stime over the server's
//! threads (`roost-srv*` and sqlx's `sqlx-sqlite-worker-*`) from
//! /proc/self/task/*/stat, so the clients' own decoding is not counted;
//! process CPU (/proc/self/stat) is printed as well. RSS (VmRSS) is the whole
//! process: clients use an 8 KiB WebSocket read buffer to keep their share
//! small, and the "RSS/sub" column is the growth from connecting N idle
//! subscribers (both ends of each connection) divided by N.
//!
//! Phases, for each N in `--subscribers`:
//! 1. connect N live subscribers (no cursor) and wait until the server counts them;
//! 2. latency: `--latency-writes` sequential createRecord calls, each
//!    waiting until all N subscribers have the event before the next
//!    (no queueing); latency is measured from the request start and from the
//!    HTTP response to the frame's arrival at each subscriber (negative means
//!    the event arrived before the HTTP response did);
//! 3. burst: `--burst` createRecord calls from `--writers` concurrent
//!    clients as fast as they go; events/s until every subscriber has every
//!    event, frames/s (events × N), server CPU per event and per frame.
//!
//! Then, unless `--lag-events 0`: one subscriber that reads one frame every
//! `--lag-read-ms` next to a healthy one while up to `--lag-events` events
//! are written: the slow one should be cut off with `ConsumerTooSlow` once
//! its server task falls 4096 frames (the live buffer) behind, i.e. once the
//! client is 4096 frames plus whatever the socket buffers hold behind; the
//! writers stop when that happens; the healthy one must get every event.
//!
//! Last, replay: the log is grown to `--replay-events` events, by default by
//! copying existing `#commit` rows in SQL (`--replay-fill copy`: identical
//! frame bytes, seconds instead of minutes) or with real one-create commits
//! through `RepoService::apply_writes` (`--replay-fill commits`; a few
//! hundred per second, use `--dir` to keep the log for later runs), then
//! `--replayers` clients replay it from cursor=0 at once; events/s and MB/s.
//!
//! File descriptors: each subscriber costs two (both ends are in this
//! process); the soft limit is read from /proc/self/limits and a subscriber
//! count that does not fit is skipped with a note (raise it with `ulimit -n`).

#[allow(dead_code)] // each example uses part of it
mod support;

use std::io::Cursor;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use futures::StreamExt as _;
use ipld_core::ipld::Ipld;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::{Notify, watch};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use roost::app::{App, AppState};
use roost::atp::syntax::{Nsid, RecordKey};
use roost::config::Config;
use roost::repo::Write;

const HANDLE: &str = "firehose.test";
const PASSWORD: &str = "firehose-load-password";
const SERVER_THREAD: &str = "roost-srv";
const CLIENT_THREAD: &str = "fh-client";

#[derive(Parser, Clone)]
#[command(about = "Firehose (subscribeRepos) load test against an in-process Roost")]
struct Args {
    /// Subscriber counts to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,100,1000")]
    subscribers: Vec<usize>,
    /// Paced writes for the latency measurement (per subscriber count).
    #[arg(long, default_value_t = 200)]
    latency_writes: usize,
    /// Writes in the sustained-throughput burst (per subscriber count).
    #[arg(long, default_value_t = 1000)]
    burst: usize,
    /// Concurrent writers in the burst.
    #[arg(long, default_value_t = 4)]
    writers: usize,
    /// Events in the slow-consumer scenario (0 skips it).
    #[arg(long, default_value_t = 12_000)]
    lag_events: usize,
    /// The slow consumer reads one frame every this many milliseconds.
    #[arg(long, default_value_t = 20)]
    lag_read_ms: u64,
    /// Size of the log replayed from cursor=0 (0 skips the replay).
    #[arg(long, default_value_t = 100_000)]
    replay_events: usize,
    /// How to grow the log for the replay: `copy` duplicates existing
    /// `#commit` rows of seq_event in SQL (same frame bytes, fast; the seq
    /// inside a copied frame is its original one), `commits` makes real
    /// one-create commits through `RepoService::apply_writes` (slow: a few
    /// hundred per second).
    #[arg(long, default_value = "copy", value_parser = ["copy", "commits"])]
    replay_fill: String,
    /// Concurrent cursor=0 replayers.
    #[arg(long, default_value_t = 1)]
    replayers: usize,
    /// Data directory (default: a fresh temporary directory).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Server runtime worker threads.
    #[arg(long, default_value_t = 2)]
    server_threads: usize,
    /// Client runtime worker threads.
    #[arg(long, default_value_t = 2)]
    client_threads: usize,
}

// ---------------------------------------------------------------------------
// /proc

fn rss_mib() -> f64 {
    support::status_kib("VmRSS:") as f64 / 1024.0
}

/// Clock ticks per second for /proc stat times (USER_HZ; 100 on Linux).
const TICKS: f64 = 100.0;

/// (utime + stime) ticks from a stat line, and the thread's name.
fn stat_times(stat: &str) -> Option<(String, u64)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let name = stat[open + 1..close].to_owned();
    let rest: Vec<&str> = stat[close + 2..].split(' ').collect();
    // Fields after the name start at field 3 (state); utime is 14, stime 15.
    let utime: u64 = rest.get(11)?.parse().ok()?;
    let stime: u64 = rest.get(12)?.parse().ok()?;
    Some((name, utime + stime))
}

#[derive(Clone, Copy, Default)]
struct Cpu {
    server: f64,
    client: f64,
    process: f64,
}

impl std::ops::Sub for Cpu {
    type Output = Cpu;
    fn sub(self, o: Cpu) -> Cpu {
        Cpu {
            server: self.server - o.server,
            client: self.client - o.client,
            process: self.process - o.process,
        }
    }
}

/// CPU seconds so far: the server's threads, the clients', the process's.
fn cpu() -> Cpu {
    let mut out = Cpu::default();
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for task in tasks.flatten() {
            let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else { continue };
            let Some((name, ticks)) = stat_times(&stat) else { continue };
            let secs = ticks as f64 / TICKS;
            if name.starts_with(SERVER_THREAD) || name.starts_with("sqlx-sqlite") {
                out.server += secs;
            } else if name.starts_with(CLIENT_THREAD) {
                out.client += secs;
            }
        }
    }
    if let Some((_, ticks)) = std::fs::read_to_string("/proc/self/stat").ok().as_deref().and_then(stat_times)
    {
        out.process = ticks as f64 / TICKS;
    }
    out
}

fn fd_soft_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Samples VmRSS every 20 ms; `take` returns the peak since the last take.
struct RssPeak {
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl RssPeak {
    fn start() -> RssPeak {
        let peak = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (peak.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                p.fetch_max(support::status_kib("VmRSS:"), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        RssPeak { peak, stop }
    }

    fn take(&self) -> f64 {
        self.peak.swap(support::status_kib("VmRSS:"), Ordering::Relaxed) as f64 / 1024.0
    }
}

impl Drop for RssPeak {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------------------
// Metrics: Roost's counters, with the time of their first increment

#[derive(Default)]
struct TimedCounter {
    value: AtomicU64,
    first: std::sync::OnceLock<Instant>,
}

impl metrics::CounterFn for TimedCounter {
    fn increment(&self, value: u64) {
        self.first.get_or_init(Instant::now);
        self.value.fetch_add(value, Ordering::Relaxed);
    }
    fn absolute(&self, value: u64) {
        self.first.get_or_init(Instant::now);
        self.value.fetch_max(value, Ordering::Relaxed);
    }
}

/// Keeps counters by name (labels ignored); gauges and histograms are dropped.
#[derive(Clone, Default)]
struct Counters(Arc<std::sync::Mutex<std::collections::HashMap<String, Arc<TimedCounter>>>>);

impl Counters {
    fn get(&self, name: &str) -> Arc<TimedCounter> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(name.to_owned()).or_default().clone()
    }
}

impl metrics::Recorder for Counters {
    fn describe_counter(&self, _: metrics::KeyName, _: Option<metrics::Unit>, _: metrics::SharedString) {}
    fn describe_gauge(&self, _: metrics::KeyName, _: Option<metrics::Unit>, _: metrics::SharedString) {}
    fn describe_histogram(&self, _: metrics::KeyName, _: Option<metrics::Unit>, _: metrics::SharedString) {}
    fn register_counter(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        metrics::Counter::from_arc(self.get(key.name()))
    }
    fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        metrics::Gauge::noop()
    }
    fn register_histogram(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Histogram {
        metrics::Histogram::noop()
    }
}

// ---------------------------------------------------------------------------
// Server

struct Server {
    state: AppState,
    port: u16,
    did: String,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    _tmp: Option<tempfile::TempDir>,
}

/// A PLC directory that accepts any operation and serves a bare document.
async fn mock_plc() -> anyhow::Result<String> {
    use axum::routing::post;
    let router = axum::Router::new().route(
        "/{did}",
        post(|| async { axum::http::StatusCode::OK }).get(|| async { axum::Json(json!({})) }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, router).await });
    Ok(url)
}

fn start_server(server_rt: &tokio::runtime::Runtime, plc_url: String, args: &Args) -> anyhow::Result<Server> {
    let (tmp, dir) = match &args.dir {
        Some(d) => (None, d.clone()),
        None => {
            let t = tempfile::tempdir()?;
            let p = t.path().to_owned();
            (Some(t), p)
        }
    };
    server_rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let mut config = Config::for_tests(dir, plc_url, HANDLE, PASSWORD);
        config.port = port;
        // Every client is 127.0.0.1.
        let most = args.subscribers.iter().copied().max().unwrap_or(1) + args.replayers + 16;
        config.firehose_max_subscribers = most;
        config.firehose_max_per_ip = most;
        let app = App::build(config).await?;
        let state = app.state.clone();
        let did = state.db.account_by_handle(HANDLE).await?.context("account")?.did;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(app.serve(listener, async move {
            let _ = rx.await;
        }));
        Ok(Server { state, port, did, shutdown: Some(tx), _tmp: tmp })
    })
}

// ---------------------------------------------------------------------------
// Clients

#[derive(Clone)]
struct Writer {
    http: reqwest::Client,
    url: String,
    did: String,
    jwt: String,
}

impl Writer {
    async fn login(port: u16) -> anyhow::Result<Writer> {
        let http = reqwest::Client::builder().pool_max_idle_per_host(64).build()?;
        let url = format!("http://127.0.0.1:{port}");
        let support::Login { did, jwt } = support::login(&http, &url, HANDLE, PASSWORD).await?;
        Ok(Writer { http, url, did, jwt })
    }

    /// One createRecord: (request start, response received).
    async fn create(&self, i: usize) -> anyhow::Result<(Instant, Instant)> {
        let body = json!({
            "repo": self.did,
            "collection": "app.bsky.feed.post",
            "record": {
                "$type": "app.bsky.feed.post",
                "text": format!("firehose load post {i}: a short line of text, about as long as a typical post."),
                "createdAt": "2024-01-01T00:00:00.000Z",
            },
        });
        let start = Instant::now();
        let resp = self
            .http
            .post(format!("{}/xrpc/com.atproto.repo.createRecord", self.url))
            .bearer_auth(&self.jwt)
            .json(&body)
            .send()
            .await?;
        let status = resp.status();
        let bytes = resp.bytes().await?;
        let done = Instant::now();
        anyhow::ensure!(status.is_success(), "createRecord: {status} {}", String::from_utf8_lossy(&bytes));
        Ok((start, done))
    }
}

#[derive(Deserialize)]
struct Header {
    op: i64,
}

#[derive(Deserialize)]
struct Body {
    seq: Option<i64>,
    error: Option<String>,
}

/// (op, seq, error name) of a frame, decoding only what is needed.
fn parse_frame(frame: &[u8]) -> anyhow::Result<(i64, Option<i64>, Option<String>)> {
    let mut cursor = Cursor::new(frame);
    let header: Header = serde_ipld_dagcbor::de::from_reader_once(&mut cursor)?;
    let body: Body = serde_ipld_dagcbor::from_slice(&frame[cursor.position() as usize..])?;
    Ok((header.op, body.seq, body.error))
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(port: u16, query: &str) -> anyhow::Result<Ws> {
    let url = format!("ws://127.0.0.1:{port}/xrpc/com.atproto.sync.subscribeRepos{query}");
    let config = WebSocketConfig::default().read_buffer_size(8 * 1024).write_buffer_size(0);
    let (ws, _) = tokio_tungstenite::connect_async_with_config(url, Some(config), false).await?;
    Ok(ws)
}

/// What one subscriber saw.
#[derive(Default)]
struct Seen {
    /// (seq, arrival) of every event frame.
    arrivals: Vec<(i64, Instant)>,
    error: Option<String>,
    end: Option<String>,
}

/// Reads frames until `stop` flips (then closes) or the stream ends. Every
/// event bumps `delivered` and wakes `notify`; `delay` slows the reader down.
async fn subscriber(
    mut ws: Ws,
    delivered: Arc<AtomicU64>,
    notify: Arc<Notify>,
    mut stop: watch::Receiver<bool>,
    delay: Option<(Duration, Arc<AtomicBool>)>,
) -> Seen {
    let mut seen = Seen::default();
    loop {
        tokio::select! {
            msg = ws.next() => match msg {
                Some(Ok(Message::Binary(b))) => {
                    let now = Instant::now();
                    match parse_frame(&b) {
                        Ok((1, Some(seq), _)) => seen.arrivals.push((seq, now)),
                        Ok((_, _, error)) => seen.error = Some(error.unwrap_or_else(|| "?".into())),
                        Err(e) => seen.error = Some(format!("undecodable frame: {e}")),
                    }
                    delivered.fetch_add(1, Ordering::Relaxed);
                    notify.notify_one();
                    if let Some((d, hurry)) = &delay
                        && !hurry.load(Ordering::Relaxed)
                    {
                        tokio::time::sleep(*d).await;
                    }
                }
                Some(Ok(Message::Close(c))) => {
                    seen.end = Some(format!("close {c:?}"));
                    break;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    seen.end = Some(format!("error: {e}"));
                    break;
                }
                None => {
                    seen.end = Some("eof".into());
                    break;
                }
            },
            _ = stop.changed() => {
                let _ = ws.close(None).await;
                seen.end = Some("closed by client".into());
                break;
            }
        }
    }
    notify.notify_one();
    seen
}

/// Waits until `delivered` reaches `target` (or the deadline passes).
async fn wait_delivered(delivered: &AtomicU64, notify: &Notify, target: u64, limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while delivered.load(Ordering::Relaxed) < target {
        if tokio::time::timeout_at(deadline, notify.notified()).await.is_err() {
            return delivered.load(Ordering::Relaxed) >= target;
        }
    }
    true
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[idx]
}

struct Row {
    subs: usize,
    lat_resp: (f64, f64, f64),
    lat_start: (f64, f64, f64),
    burst_writes_per_s: f64,
    burst_events_per_s: f64,
    frames_per_s: f64,
    cpu_us_per_event: f64,
    cpu_us_per_frame: f64,
    cpu_client_s: f64,
    rss_per_sub_kib: f64,
    rss_idle_mib: f64,
    rss_peak_mib: f64,
    dropped: usize,
}

async fn measure(
    server: &Server,
    writer: &Writer,
    n: usize,
    args: &Args,
    rss: &RssPeak,
    counter: &AtomicUsize,
) -> anyhow::Result<Row> {
    let sequencer = server.state.sequencer.clone();
    let base_subs = sequencer.subscriber_count();
    let rss_before = rss_mib();
    let delivered = Arc::new(AtomicU64::new(0));
    let notify = Arc::new(Notify::new());
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = Vec::with_capacity(n);
    let mut next = 0;
    while next < n {
        let chunk = (n - next).min(100);
        let conns = futures::future::try_join_all((0..chunk).map(|_| connect(server.port, "")))
            .await
            .context("connect")?;
        for ws in conns {
            tasks.push(tokio::spawn(subscriber(
                ws,
                delivered.clone(),
                notify.clone(),
                stop_rx.clone(),
                None,
            )));
        }
        next += chunk;
    }
    let admitted = Instant::now();
    while sequencer.subscriber_count() < base_subs + n {
        anyhow::ensure!(admitted.elapsed() < Duration::from_secs(30), "subscribers not admitted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rss_idle = rss_mib();
    let rss_per_sub_kib = (rss_idle - rss_before) * 1024.0 / n as f64;
    let _ = rss.take();

    // Latency: paced writes.
    let warmup = 10;
    let mut times = Vec::with_capacity(args.latency_writes);
    for k in 0..warmup + args.latency_writes {
        let (start, done) = writer.create(counter.fetch_add(1, Ordering::Relaxed)).await?;
        let target = (n * (k + 1)) as u64;
        anyhow::ensure!(
            wait_delivered(&delivered, &notify, target, Duration::from_secs(30)).await,
            "latency write {k}: not delivered to all {n} subscribers"
        );
        if k >= warmup {
            times.push((start, done));
        }
    }

    // Burst: concurrent writers, no pacing.
    let base = delivered.load(Ordering::Relaxed);
    let cpu0 = cpu();
    let t0 = Instant::now();
    let per_writer = args.burst.div_ceil(args.writers);
    let total = per_writer * args.writers;
    let mut ws_tasks = Vec::new();
    for _ in 0..args.writers {
        let w = writer.clone();
        let ids: Vec<usize> = (0..per_writer).map(|_| counter.fetch_add(1, Ordering::Relaxed)).collect();
        ws_tasks.push(tokio::spawn(async move {
            for i in ids {
                w.create(i).await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in ws_tasks {
        t.await??;
    }
    let writes_done = t0.elapsed();
    let complete =
        wait_delivered(&delivered, &notify, base + (n * total) as u64, Duration::from_secs(120)).await;
    let all_delivered = t0.elapsed();
    let cpu_burst = cpu() - cpu0;
    let rss_peak = rss.take();

    let _ = stop_tx.send(true);
    let mut dropped = 0;
    let mut lat_resp = Vec::with_capacity(n * times.len());
    let mut lat_start = Vec::with_capacity(n * times.len());
    for task in tasks {
        let seen = task.await?;
        if seen.error.is_some() {
            dropped += 1;
        }
        // Paced writes: the k-th event after the warm-up is the k-th write.
        for (k, (start, done)) in times.iter().enumerate() {
            if let Some((_, at)) = seen.arrivals.get(warmup + k) {
                lat_resp.push(signed_ms(*at, *done));
                lat_start.push(at.duration_since(*start).as_secs_f64() * 1000.0);
            }
        }
        if let Some(w) = seen.arrivals.windows(2).find(|w| w[1].0 != w[0].0 + 1) {
            anyhow::bail!("subscriber saw seq {} then {}", w[0].0, w[1].0);
        }
    }
    anyhow::ensure!(complete || dropped > 0, "burst not fully delivered and nobody was dropped");
    let wait_start = Instant::now();
    while sequencer.subscriber_count() > base_subs && wait_start.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    lat_resp.sort_by(f64::total_cmp);
    lat_start.sort_by(f64::total_cmp);
    let pcts = |v: &[f64]| (percentile(v, 0.5), percentile(v, 0.99), percentile(v, 1.0));
    let events_per_s = total as f64 / all_delivered.as_secs_f64();
    Ok(Row {
        subs: n,
        lat_resp: pcts(&lat_resp),
        lat_start: pcts(&lat_start),
        burst_writes_per_s: total as f64 / writes_done.as_secs_f64(),
        burst_events_per_s: events_per_s,
        frames_per_s: events_per_s * n as f64,
        cpu_us_per_event: cpu_burst.server * 1e6 / total as f64,
        cpu_us_per_frame: cpu_burst.server * 1e6 / (total * n) as f64,
        cpu_client_s: cpu_burst.client,
        rss_per_sub_kib,
        rss_idle_mib: rss_idle,
        rss_peak_mib: rss_peak,
        dropped,
    })
}

/// `a - b` in milliseconds, negative when `a` is earlier.
fn signed_ms(a: Instant, b: Instant) -> f64 {
    if a >= b {
        a.duration_since(b).as_secs_f64() * 1000.0
    } else {
        -(b.duration_since(a).as_secs_f64() * 1000.0)
    }
}

/// A slow subscriber next to a healthy one while up to `--lag-events` events
/// are written (the writers stop early once the server lets the slow one go).
async fn lag_scenario(
    server: &Server,
    writer: &Writer,
    args: &Args,
    counter: &AtomicUsize,
    counters: &Counters,
) -> anyhow::Result<()> {
    let too_slow = counters.get("pds_firehose_slow_consumer_disconnects_total");
    let too_slow_before = too_slow.value.load(Ordering::Relaxed);
    let delivered = Arc::new(AtomicU64::new(0));
    let notify = Arc::new(Notify::new());
    let (stop_tx, stop_rx) = watch::channel(false);
    let healthy = tokio::spawn(subscriber(
        connect(server.port, "").await?,
        delivered.clone(),
        notify.clone(),
        stop_rx.clone(),
        None,
    ));
    let hurry = Arc::new(AtomicBool::new(false));
    let slow = tokio::spawn(subscriber(
        connect(server.port, "").await?,
        Arc::new(AtomicU64::new(0)),
        Arc::new(Notify::new()),
        stop_rx.clone(),
        Some((Duration::from_millis(args.lag_read_ms), hurry.clone())),
    ));
    let sequencer = server.state.sequencer.clone();
    let subs = sequencer.subscriber_count();
    let head_at_start = server.state.db.seq_bounds().await?.newest;
    let rss0 = rss_mib();
    let rss = RssPeak::start();
    let t0 = Instant::now();
    // When the server gives up on the slow subscriber (its slow-consumer
    // counter moves); the writers stop then.
    let released = Arc::new(AtomicBool::new(false));
    let cut = {
        let released = released.clone();
        let state = server.state.clone();
        let too_slow = too_slow.clone();
        tokio::spawn(async move {
            loop {
                if too_slow.value.load(Ordering::Relaxed) > too_slow_before {
                    released.store(true, Ordering::Relaxed);
                    let head = state.db.seq_bounds().await.map(|b| b.newest).unwrap_or(-1);
                    return Some((t0.elapsed(), head));
                }
                if t0.elapsed() > Duration::from_secs(300) {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    let per_writer = args.lag_events.div_ceil(args.writers);
    let written = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..args.writers {
        let (w, released, written) = (writer.clone(), released.clone(), written.clone());
        let ids: Vec<usize> = (0..per_writer).map(|_| counter.fetch_add(1, Ordering::Relaxed)).collect();
        tasks.push(tokio::spawn(async move {
            for i in ids {
                if released.load(Ordering::Relaxed) {
                    break;
                }
                w.create(i).await?;
                written.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let written_in = t0.elapsed();
    let total = written.load(Ordering::Relaxed);
    let healthy_ok = wait_delivered(&delivered, &notify, total, Duration::from_secs(60)).await;
    let peak = rss.take();
    // Let the slow one read at full speed: it finds the error frame after
    // what was buffered for it, or catches up (then it is told to stop).
    hurry.store(true, Ordering::Relaxed);
    let mut slow = slow;
    let s = match tokio::time::timeout(Duration::from_secs(30), &mut slow).await {
        Ok(seen) => seen?,
        Err(_) => {
            let _ = stop_tx.send(true);
            slow.await?
        }
    };
    let _ = stop_tx.send(true);
    let h = healthy.await?;
    let cut = match tokio::time::timeout(Duration::from_secs(1), &mut { cut }).await {
        Ok(found) => found?,
        Err(_) => None,
    };
    let slot_released = sequencer.subscriber_count() < subs;
    println!();
    println!(
        "## Slow consumer (up to {} events from {} writers; one subscriber reads a frame every {} ms, one reads freely)",
        args.lag_events, args.writers, args.lag_read_ms
    );
    println!();
    println!(
        "- written: {total} events in {:.2} s ({:.0} events/s), from seq {}",
        written_in.as_secs_f64(),
        total as f64 / written_in.as_secs_f64(),
        head_at_start + 1
    );
    println!(
        "- healthy subscriber: {} of {total} events{}, in order",
        h.arrivals.len(),
        if healthy_ok { " (all)" } else { " (INCOMPLETE)" }
    );
    let last_seq = s.arrivals.last().map_or(0, |a| a.0);
    match cut {
        Some((at, head)) => println!(
            "- the server gave up on the slow subscriber (ConsumerTooSlow) at {:.2} s, log head then seq \
             {head}, {} events past the last one the client ever received (seq {last_seq}); slot released: \
             {slot_released}",
            at.as_secs_f64(),
            head - last_seq
        ),
        None => println!("- the server did not give up on the slow subscriber"),
    }
    println!(
        "- slow subscriber: received {} events, then {} ({})",
        s.arrivals.len(),
        s.error.as_deref().map_or("no error frame".to_owned(), |e| format!("error frame {e}")),
        s.end.as_deref().unwrap_or("still open"),
    );
    println!("- RSS before {rss0:.0} MiB, peak during {peak:.0} MiB");
    Ok(())
}

/// Grows the log to `target` events by copying `#commit` rows.
async fn copy_log(server: &Server, target: usize) -> anyhow::Result<(usize, Duration)> {
    let pool = &server.state.db.pool;
    let t0 = Instant::now();
    let mut made = 0;
    loop {
        let have = server.state.db.seq_bounds().await?.newest as usize;
        if have >= target {
            return Ok((made, t0.elapsed()));
        }
        let added = sqlx::query(
            "INSERT INTO seq_event (did, kind, frame, created_at)
             SELECT did, kind, frame, created_at FROM seq_event WHERE kind = 'commit' ORDER BY seq LIMIT ?",
        )
        .bind((target - have) as i64)
        .execute(pool)
        .await?
        .rows_affected();
        anyhow::ensure!(added > 0, "no #commit events to copy");
        made += added as usize;
    }
}

/// Grows the log to `target` events through `RepoService::apply_writes`.
async fn grow_log(server: &Server, target: usize) -> anyhow::Result<(usize, Duration)> {
    let state = &server.state;
    let have = state.db.seq_bounds().await?.newest as usize;
    let key = state.keys.repo_key(&server.did)?;
    let collection = Nsid::new("app.bsky.feed.post")?;
    let t0 = Instant::now();
    let mut made = 0;
    for i in have..target {
        let rkey = RecordKey::new(state.repo.next_tid(None).as_str())?;
        let mut record = std::collections::BTreeMap::new();
        record.insert("$type".to_owned(), Ipld::String("app.bsky.feed.post".into()));
        record.insert(
            "text".to_owned(),
            Ipld::String(format!("replay post {i}: a short line of text, about as long as a typical post.")),
        );
        record.insert("createdAt".to_owned(), Ipld::String("2024-01-01T00:00:00.000Z".into()));
        let write = Write::Create { collection: collection.clone(), rkey, value: Ipld::Map(record) };
        state.repo.apply_writes(&server.did, &key, vec![write], None).await?;
        made += 1;
        if made % 20_000 == 0 {
            eprintln!("  log: {} events ({:.0}/s)", have + made, made as f64 / t0.elapsed().as_secs_f64());
        }
    }
    Ok((made, t0.elapsed()))
}

/// One cursor=0 replay to the end of the log: (events, bytes, elapsed).
/// With `check_seq`, the last frame must carry seq `last`.
async fn replay(port: u16, last: i64, check_seq: bool) -> anyhow::Result<(u64, u64, Duration)> {
    let mut ws = connect(port, "?cursor=0").await?;
    let t0 = Instant::now();
    let (mut events, mut bytes) = (0u64, 0u64);
    while let Some(msg) = ws.next().await {
        if let Message::Binary(b) = msg? {
            events += 1;
            bytes += b.len() as u64;
            if events as i64 >= last {
                let (op, seq, error) = parse_frame(&b)?;
                anyhow::ensure!(op == 1, "last frame: op {op} {error:?}");
                anyhow::ensure!(!check_seq || seq == Some(last), "last frame: seq {seq:?}, expected {last}");
                break;
            }
        }
    }
    let elapsed = t0.elapsed();
    let _ = ws.close(None).await;
    anyhow::ensure!(events as i64 == last, "replay ended after {events} of {last} events");
    Ok((events, bytes, elapsed))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let counters = Counters::default();
    metrics::set_global_recorder(counters.clone())
        .map_err(|_| anyhow::anyhow!("metrics recorder already set"))?;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.server_threads)
        .thread_name(SERVER_THREAD)
        .enable_all()
        .build()?;
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.client_threads)
        .thread_name(CLIENT_THREAD)
        .enable_all()
        .build()?;
    let started = Instant::now();
    let plc_url = client_rt.block_on(mock_plc())?;
    let mut server = start_server(&server_rt, plc_url, &args)?;
    let port = server.port;
    println!(
        "# Roost firehose load ({} server threads, {} client threads; {} CPUs; fd soft limit {})",
        args.server_threads,
        args.client_threads,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        fd_soft_limit().map_or("?".into(), |n| n.to_string()),
    );
    println!("RSS after start: {:.0} MiB", rss_mib());

    let writer = client_rt.block_on(Writer::login(port))?;
    let counter = AtomicUsize::new(0);
    let rss = RssPeak::start();
    let mut rows = Vec::new();
    for &n in &args.subscribers {
        if let Some(limit) = fd_soft_limit()
            && 2 * n + 200 > limit
        {
            println!("skipping {n} subscribers: needs ~{} fds, soft limit {limit} (ulimit -n)", 2 * n + 200);
            continue;
        }
        let t = Instant::now();
        let row = client_rt.block_on(measure(&server, &writer, n, &args, &rss, &counter))?;
        eprintln!("  {n} subscribers measured in {:.1} s", t.elapsed().as_secs_f64());
        rows.push(row);
    }

    println!();
    println!(
        "## Live fan-out ({} paced writes for latency; burst of {} writes from {} writers)",
        args.latency_writes, args.burst, args.writers
    );
    println!();
    let one = rows.iter().find(|r| r.subs == 1).map(|r| r.cpu_us_per_event);
    println!(
        "| subs | event after HTTP response p50 / p99 / max (ms) | after request start p50 / p99 / max (ms) \
         | burst writes/s | events/s delivered to all | frames/s | server CPU µs/event | server CPU µs/frame \
         | fan-out CPU µs per extra frame | client CPU s | RSS/sub (KiB) | RSS idle / peak (MiB) | dropped |"
    );
    println!("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|");
    for r in &rows {
        println!(
            "| {} | {:.2} / {:.2} / {:.2} | {:.2} / {:.2} / {:.2} | {:.0} | {:.0} | {:.0} | {:.0} | {:.1} | {} | {:.2} | {:.0} | {:.0} / {:.0} | {} |",
            r.subs,
            r.lat_resp.0,
            r.lat_resp.1,
            r.lat_resp.2,
            r.lat_start.0,
            r.lat_start.1,
            r.lat_start.2,
            r.burst_writes_per_s,
            r.burst_events_per_s,
            r.frames_per_s,
            r.cpu_us_per_event,
            r.cpu_us_per_frame,
            match one {
                Some(one) if r.subs > 1 => format!("{:.1}", (r.cpu_us_per_event - one) / (r.subs - 1) as f64),
                _ => "-".into(),
            },
            r.cpu_client_s,
            r.rss_per_sub_kib,
            r.rss_idle_mib,
            r.rss_peak_mib,
            r.dropped,
        );
    }

    if args.lag_events > 0 {
        client_rt.block_on(lag_scenario(&server, &writer, &args, &counter, &counters))?;
    }

    if args.replay_events > 0 {
        let copy = args.replay_fill == "copy";
        let (made, took) = if copy {
            server_rt.block_on(copy_log(&server, args.replay_events))?
        } else {
            server_rt.block_on(grow_log(&server, args.replay_events))?
        };
        let bounds = server_rt.block_on(server.state.db.seq_bounds())?;
        let last = bounds.newest;
        let cpu0 = cpu();
        let rss_before_replay = rss_mib();
        let _ = rss.take();
        let t0 = Instant::now();
        let results = client_rt.block_on(async {
            let runs = (0..args.replayers).map(|_| replay(port, last, !copy));
            futures::future::try_join_all(runs).await
        })?;
        let wall = t0.elapsed();
        let spent = cpu() - cpu0;
        let peak = rss.take();
        println!();
        println!(
            "## Replay (cursor=0, {last} events; log grown by {made} {} in {:.1} s = {:.0}/s)",
            if copy { "copied #commit rows" } else { "commits via apply_writes" },
            took.as_secs_f64(),
            made as f64 / took.as_secs_f64().max(1e-9)
        );
        println!();
        println!(
            "| replayers | events | MB each | wall (s) | events/s per replayer | MB/s per replayer | server CPU s \
             | RSS before / peak (MiB) |"
        );
        println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
        let (events, bytes, slowest) = results
            .iter()
            .fold((0, 0, Duration::ZERO), |(e, b, d), (e2, b2, d2)| (e.max(*e2), b.max(*b2), d.max(*d2)));
        println!(
            "| {} | {events} | {:.1} | {:.2} | {:.0} | {:.1} | {:.2} | {rss_before_replay:.0} / {peak:.0} |",
            args.replayers,
            bytes as f64 / 1e6,
            wall.as_secs_f64(),
            events as f64 / slowest.as_secs_f64(),
            bytes as f64 / 1e6 / slowest.as_secs_f64(),
            spent.server,
        );
    }

    let total_cpu = cpu();
    println!();
    println!(
        "Total: {:.1} s wall; CPU server {:.1} s, clients {:.1} s, process {:.1} s; RSS now {:.0} MiB, peak (VmHWM) {:.0} MiB",
        started.elapsed().as_secs_f64(),
        total_cpu.server,
        total_cpu.client,
        total_cpu.process,
        rss_mib(),
        support::status_kib("VmHWM:") as f64 / 1024.0,
    );
    if let Some(tx) = server.shutdown.take() {
        let _ = tx.send(());
    }
    drop(client_rt);
    server_rt.shutdown_timeout(Duration::from_secs(5));
    Ok(())
}
