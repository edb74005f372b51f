//! HTTP load generator for `com.atproto.repo.createRecord`.
//!
//! ```text
//! # Start a private Roost (child process, temp data dir, mock PLC) and load it:
//! cargo run --release --example loadgen -- -n 1000 -c 8
//! # Load a running server instead:
//! cargo run --release --example loadgen -- --url http://127.0.0.1:2583 \
//!     --handle alice.example.com --password '...' -n 1000 -c 8
//! ```
//!
//! Logs in once, issues `-n` sequential createRecord calls (one
//! `app.bsky.feed.post` each), then `-n` more from `-c` concurrent clients,
//! and prints requests/s and latency percentiles for both. A few warm-up
//! requests are sent first and not counted.
//!
//! Without `--url` the server runs in a child process (this same binary with
//! `--serve-dir`), built by `App::build` from `Config::for_tests`, next to a
//! mock PLC directory that accepts every operation. Its memory is read from
//! /proc/<child>/status, so the RSS printed is the server's alone: idle after
//! login, after each phase, and its peak (`VmHWM`). The child exits when its
//! stdin closes, i.e. when this process ends.

#[allow(dead_code)] // each example uses part of it
mod support;

use std::io::BufRead;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use serde_json::json;

#[derive(Parser)]
#[command(about = "createRecord load generator for Roost (or any PDS)")]
struct Args {
    /// Base URL of a running PDS; without it a private Roost is started.
    #[arg(long)]
    url: Option<String>,
    /// Login identifier (with --url).
    #[arg(long, default_value = "loadgen.test")]
    handle: String,
    /// Password (with --url).
    #[arg(long, default_value = "loadgen-password")]
    password: String,
    /// Requests per phase.
    #[arg(short = 'n', long, default_value_t = 1000)]
    requests: u64,
    /// Concurrent clients in the second phase.
    #[arg(short = 'c', long, default_value_t = 8)]
    concurrency: u64,
    /// Uncounted requests before measuring.
    #[arg(long, default_value_t = 20)]
    warmup: u64,
    /// Data directory for the private server (default: a fresh temp dir).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Internal: run as the server child with this data directory.
    #[arg(long, hide = true)]
    serve_dir: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Runtime::new()?;
    match &args.serve_dir {
        Some(dir) => rt.block_on(serve(dir.clone(), &args)),
        None => rt.block_on(load(&args)),
    }
}

// ---------------------------------------------------------------------------
// Server child

async fn serve(dir: PathBuf, args: &Args) -> anyhow::Result<()> {
    use axum::routing::post;
    // Mock PLC directory: accepts any operation, knows every DID.
    let plc = axum::Router::new().route(
        "/{did}",
        post(|| async { axum::http::StatusCode::OK }).get(|| async { axum::Json(json!({})) }),
    );
    let plc_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let plc_url = format!("http://{}", plc_listener.local_addr()?);
    tokio::spawn(async move { axum::serve(plc_listener, plc).await });

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let mut config = roost::config::Config::for_tests(dir, plc_url, &args.handle, &args.password);
    config.port = addr.port();
    let app = roost::app::App::build(config).await?;
    // Exit when the parent closes our stdin (or dies).
    let shutdown = async {
        let _ = tokio::task::spawn_blocking(|| {
            let mut sink = String::new();
            while std::io::stdin().read_line(&mut sink).map(|n| n > 0).unwrap_or(false) {}
        })
        .await;
    };
    println!("READY http://{addr}");
    app.serve(listener, shutdown).await
}

struct Server {
    child: Child,
    _tmp: Option<tempfile::TempDir>,
}

impl Server {
    fn start(args: &Args) -> anyhow::Result<(Server, String)> {
        let (tmp, dir) = match &args.dir {
            Some(d) => (None, d.clone()),
            None => {
                let t = tempfile::tempdir()?;
                let p = t.path().to_path_buf();
                (Some(t), p)
            }
        };
        let mut child = Command::new(std::env::current_exe()?)
            .arg("--serve-dir")
            .arg(&dir)
            .arg("--handle")
            .arg(&args.handle)
            .arg("--password")
            .arg(&args.password)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the server child")?;
        let stdout = child.stdout.take().context("child stdout")?;
        let mut line = String::new();
        std::io::BufReader::new(stdout).read_line(&mut line)?;
        let url = line
            .trim()
            .strip_prefix("READY ")
            .with_context(|| format!("server child said {line:?}"))?
            .to_owned();
        println!("server: pid {} at {url}, data in {}", child.id(), dir.display());
        Ok((Server { child, _tmp: tmp }, url))
    }

    fn status_mib(&self, field: &str) -> f64 {
        support::proc_status_kib(&self.child.id().to_string(), field)
            .map_or(f64::NAN, |kib| kib as f64 / 1024.0)
    }

    fn report(&self, when: &str) {
        println!(
            "server RSS {when}: {:.1} MiB (peak so far {:.1} MiB)",
            self.status_mib("VmRSS:"),
            self.status_mib("VmHWM:")
        );
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Closing stdin asks for a graceful shutdown.
        drop(self.child.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------
// Load

struct Session {
    client: reqwest::Client,
    url: String,
    did: String,
    jwt: String,
}

impl Session {
    async fn login(url: &str, handle: &str, password: &str) -> anyhow::Result<Session> {
        let client = reqwest::Client::builder().pool_max_idle_per_host(256).build()?;
        let support::Login { did, jwt } = support::login(&client, url, handle, password).await?;
        Ok(Session { client, url: url.to_owned(), did, jwt })
    }

    /// One createRecord; returns its latency.
    async fn create(&self, i: u64) -> anyhow::Result<Duration> {
        let now = roost::atp::syntax::Datetime::from_offset(time::OffsetDateTime::now_utc());
        let body = json!({
            "repo": self.did,
            "collection": "app.bsky.feed.post",
            "record": {
                "$type": "app.bsky.feed.post",
                "text": format!("loadgen post {i}: a short line of text, about as long as a typical post."),
                "createdAt": now.to_string(),
            },
        });
        let start = Instant::now();
        let resp = self
            .client
            .post(format!("{}/xrpc/com.atproto.repo.createRecord", self.url))
            .bearer_auth(&self.jwt)
            .json(&body)
            .send()
            .await?;
        let status = resp.status();
        let bytes = resp.bytes().await?;
        let elapsed = start.elapsed();
        anyhow::ensure!(status.is_success(), "createRecord: {status} {}", String::from_utf8_lossy(&bytes));
        Ok(elapsed)
    }
}

fn summary(name: &str, mut lat: Vec<Duration>, wall: Duration) {
    lat.sort();
    let pct = |p: f64| {
        let idx = ((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1;
        lat[idx].as_secs_f64() * 1000.0
    };
    println!(
        "{name}: {} requests in {:.2} s = {:.1} req/s; latency p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        lat.len(),
        wall.as_secs_f64(),
        lat.len() as f64 / wall.as_secs_f64(),
        pct(0.50),
        pct(0.90),
        pct(0.99),
        pct(1.0),
    );
}

async fn load(args: &Args) -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (server, url) = match &args.url {
        Some(u) => (None, u.trim_end_matches('/').to_owned()),
        None => {
            let (s, u) = Server::start(args)?;
            (Some(s), u)
        }
    };
    if let Some(s) = &server {
        tokio::time::sleep(Duration::from_secs(1)).await;
        s.report("idle before login");
    }
    let session = Arc::new(Session::login(&url, &args.handle, &args.password).await?);
    println!("logged in as {}", session.did);
    tokio::time::sleep(Duration::from_secs(1)).await;
    if let Some(s) = &server {
        s.report("idle after login");
    }

    for i in 0..args.warmup {
        session.create(i).await?;
    }

    // Sequential.
    let mut lat = Vec::with_capacity(args.requests as usize);
    let started = Instant::now();
    for i in 0..args.requests {
        lat.push(session.create(i).await?);
    }
    summary("sequential", lat, started.elapsed());
    if let Some(s) = &server {
        s.report("after sequential");
    }

    // Concurrent.
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency {
        let (session, next, n) = (session.clone(), next.clone(), args.requests);
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return Ok::<_, anyhow::Error>(lat);
                }
                lat.push(session.create(n + i).await?);
            }
        }));
    }
    let mut lat = Vec::with_capacity(args.requests as usize);
    for t in tasks {
        lat.extend(t.await??);
    }
    summary(&format!("concurrent (c={})", args.concurrency), lat, started.elapsed());
    if let Some(s) = &server {
        s.report("after concurrent");
        tokio::time::sleep(Duration::from_secs(2)).await;
        s.report("idle 2 s later");
    }
    Ok(())
}
