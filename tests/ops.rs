//! The operations surface (docs: /work/notes/ops-contract.md's counterpart in
//! README.md): `/metrics` with the contract's metric names, `/tls-check`,
//! `roost backup` / `roost restore`, `roost healthcheck`, SIGTERM handling,
//! and OTLP trace export (with the latency exemplars of OpenMetrics scrapes).
//!
//! Metrics and signals are tested against the real binary: the Prometheus
//! recorder is global to a process, so only a process of its own gives exact
//! counter values.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::process::{Child, Command};

use common::*;
use roost::config::Config;

const ITEM: &str = "com.example.ops.item";
const JWT_SECRET: &str = "0123456789abcdef0123456789abcdef";

fn item(n: usize) -> Value {
    json!({ "$type": ITEM, "n": n, "text": format!("item {n}") })
}

// ---------------------------------------------------------------------------
// The real binary

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// A `roost` process; killed (SIGKILL) when dropped so a failing test never
/// leaves one behind.
struct Server {
    child: Option<Child>,
    log: PathBuf,
    port: u16,
    metrics_port: u16,
    work: PathBuf,
    plc_url: String,
}

impl Server {
    fn command(work: &Path, port: u16, metrics_port: u16, plc_url: &str) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_roost"));
        cmd.current_dir(work)
            .env("ROOST_CONFIG", work.join("no-such-roost.toml"))
            .env("PDS_DEV_MODE", "true")
            .env("PDS_HOSTNAME", "localhost")
            .env("PDS_PORT", port.to_string())
            .env("PDS_METRICS_LISTEN", format!("127.0.0.1:{metrics_port}"))
            .env("PDS_DATA_DIRECTORY", work.join("data"))
            .env("PDS_DID_PLC_URL", plc_url)
            .env("PDS_HANDLE", HANDLE)
            .env("PDS_PASSWORD", PASSWORD)
            .env("PDS_SERVICE_HANDLE_DOMAINS", ".test")
            .env("PDS_JWT_SECRET", JWT_SECRET)
            .env("PDS_CRAWLERS", "")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        cmd
    }

    async fn start(work: &Path, plc_url: &str, extra_env: &[(&str, String)]) -> Server {
        let (port, metrics_port) = (free_port(), free_port());
        let log = work.join("server.log");
        let out = std::fs::OpenOptions::new().create(true).append(true).open(&log).expect("log file");
        let mut cmd = Self::command(work, port, metrics_port, plc_url);
        cmd.env("RUST_LOG", "info");
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let child = cmd
            .arg("serve")
            .stdout(out.try_clone().expect("log fd"))
            .stderr(out)
            .spawn()
            .expect("spawn the roost binary");
        let mut server = Server {
            child: Some(child),
            log,
            port,
            metrics_port,
            work: work.to_owned(),
            plc_url: plc_url.to_owned(),
        };
        let x = server.xrpc();
        wait_until_healthy(&x, server.child.as_mut().expect("just spawned"), &server.log).await;
        server
    }

    fn xrpc(&self) -> Xrpc {
        Xrpc::new(format!("http://127.0.0.1:{}", self.port))
    }

    fn log_tail(&self) -> String {
        log_tail(&self.log)
    }

    /// Runs another `roost` subcommand with this server's environment.
    async fn run(&self, args: &[&str]) -> std::process::Output {
        Self::command(&self.work, self.port, self.metrics_port, &self.plc_url)
            .env("RUST_LOG", "warn")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .await
            .expect("run roost")
    }

    async fn scrape(&self) -> Metrics {
        let r = http_client()
            .get(format!("http://127.0.0.1:{}/metrics", self.metrics_port))
            .send()
            .await
            .expect("GET /metrics");
        assert_eq!(r.status(), StatusCode::OK);
        Metrics::parse(&r.text().await.expect("metrics body"))
    }

    /// SIGTERM, then the exit status and how long it took.
    async fn terminate(&mut self) -> (std::process::ExitStatus, Duration) {
        let mut child = self.child.take().expect("running");
        let pid = nix::unistd::Pid::from_raw(child.id().expect("pid") as i32);
        let start = Instant::now();
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
        let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
            .await
            .unwrap_or_else(|_| panic!("roost still running 15 s after SIGTERM:\n{}", self.log_tail()))
            .expect("wait");
        (status, start.elapsed())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
    }
}

/// Prometheus text format, parsed into `(name, labels) -> value`.
struct Metrics {
    series: Vec<(String, BTreeMap<String, String>, f64)>,
    text: String,
}

impl Metrics {
    fn parse(text: &str) -> Metrics {
        let mut series = Vec::new();
        for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
            let (key, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("bad line {line:?}"));
            let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value in {line:?}"));
            let (name, labels) = match key.split_once('{') {
                Some((name, rest)) => {
                    let rest = rest.strip_suffix('}').expect("closing brace");
                    let labels = rest
                        .split("\",")
                        .filter(|p| !p.is_empty())
                        .map(|p| {
                            let (k, v) = p.split_once("=\"").expect("label");
                            (k.to_owned(), v.trim_end_matches('"').to_owned())
                        })
                        .collect();
                    (name.to_owned(), labels)
                }
                None => (key.to_owned(), BTreeMap::new()),
            };
            series.push((name, labels, value));
        }
        Metrics { series, text: text.to_owned() }
    }

    /// The value of the series with exactly these labels; None when absent.
    fn find(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> =
            labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        self.series.iter().find(|(n, l, _)| n == name && *l == want).map(|(_, _, v)| *v)
    }

    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.find(name, labels).unwrap_or_else(|| panic!("no {name}{labels:?} in\n{}", self.text))
    }

    /// A counter that did not exist yet counts as 0.
    fn get_or_zero(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.find(name, labels).unwrap_or(0.0)
    }

    fn names(&self) -> BTreeSet<&str> {
        self.series.iter().map(|(n, _, _)| n.as_str()).collect()
    }
}

/// `/metrics` carries the contract's names, and the counters move by exactly
/// what the test did.
#[tokio::test]
async fn metrics_endpoint_serves_contract_names_and_counts_requests_and_commits() {
    let plc = MockPlc::start().await;
    // A relay that accepts requestCrawl, asked once at start.
    let relay_hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let hits = relay_hits.clone();
    let relay_router = axum::Router::new().route(
        "/xrpc/com.atproto.sync.requestCrawl",
        axum::routing::post(move || {
            hits.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async { axum::Json(json!({})) }
        }),
    );
    let relay_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
    let relay = format!("http://127.0.0.1:{}", relay_listener.local_addr().expect("addr").port());
    tokio::spawn(async move {
        let _ = axum::serve(relay_listener, relay_router).await;
    });
    let work = tempfile::tempdir().expect("tempdir");
    let server = Server::start(work.path(), &plc.url, &[("PDS_CRAWLERS", relay.clone())]).await;
    let x = server.xrpc();
    let before = server.scrape().await;

    let (access, _) = x.login_as(HANDLE, PASSWORD).await;
    let did = x.get("com.atproto.identity.resolveHandle", &[("handle", HANDLE)]).await.1["did"]
        .as_str()
        .expect("did")
        .to_owned();
    for n in 0..3 {
        let body = json!({ "repo": did, "collection": ITEM, "rkey": format!("k{n}"), "record": item(n) });
        let (status, out) = x.post("com.atproto.repo.createRecord", Some(&access), &body).await;
        assert_eq!(status, StatusCode::OK, "{out}");
    }
    let body = json!({ "repo": did, "collection": ITEM, "rkey": "k0", "record": item(100) });
    assert_eq!(x.post("com.atproto.repo.putRecord", Some(&access), &body).await.0, StatusCode::OK);
    let body = json!({ "repo": did, "collection": ITEM, "rkey": "k1" });
    assert_eq!(x.post("com.atproto.repo.deleteRecord", Some(&access), &body).await.0, StatusCode::OK);
    assert_eq!(x.get("com.atproto.server.describeServer", &[]).await.0, StatusCode::OK);
    for i in 0..5 {
        let (status, _) = x.get(&format!("com.example.made.up{i}"), &[]).await;
        assert_eq!(status, StatusCode::NOT_IMPLEMENTED);
    }
    // The login limiter allows a burst of 30 per IP; the 31st is refused.
    let mut limited = 0;
    for _ in 0..32 {
        let body = json!({ "identifier": "nobody.test", "password": "wrong" });
        if x.post("com.atproto.server.createSession", None, &body).await.0 == StatusCode::TOO_MANY_REQUESTS {
            limited += 1;
        }
    }
    assert!(limited >= 1, "the login limiter never refused");

    let after = server.scrape().await;
    let delta =
        |name: &str, labels: &[(&str, &str)]| after.get(name, labels) - before.get_or_zero(name, labels);

    assert_eq!(after.get("roost_build_info", &[("version", env!("CARGO_PKG_VERSION"))]), 1.0);
    let create = [("method", "com.atproto.repo.createRecord"), ("status", "200")];
    assert_eq!(delta("roost_http_requests_total", &create), 3.0);
    assert_eq!(
        delta("roost_http_requests_total", &[("method", "com.atproto.repo.putRecord"), ("status", "200")]),
        1.0
    );
    assert_eq!(delta("roost_http_requests_total", &[("method", "other"), ("status", "501")]), 5.0);
    assert!(!after.text.contains("com.example.made.up"), "unknown NSIDs must not become labels");
    // A histogram (buckets), not a summary.
    assert_eq!(
        delta(
            "roost_http_request_duration_seconds_bucket",
            &[("method", "com.atproto.repo.createRecord"), ("le", "+Inf")]
        ),
        3.0
    );
    assert_eq!(delta("roost_repo_commits_total", &[]), 5.0);
    assert_eq!(delta("roost_repo_records_written_total", &[("action", "create")]), 3.0);
    assert_eq!(delta("roost_repo_records_written_total", &[("action", "update")]), 1.0);
    assert_eq!(delta("roost_repo_records_written_total", &[("action", "delete")]), 1.0);
    // Each commit writes at least its commit block, a record block (not for the delete) and a node.
    assert!(delta("roost_repo_blocks_written_total", &[]) >= 5.0 + 4.0);
    assert_eq!(delta("roost_firehose_events_total", &[]), 5.0);
    assert_eq!(delta("roost_db_query_duration_seconds_count", &[("op", "commit")]), 5.0);
    assert!(delta("roost_db_query_duration_seconds_count", &[("op", "repo_root")]) >= 5.0);
    assert!(
        after.find("roost_db_query_duration_seconds_bucket", &[("op", "commit"), ("le", "+Inf")]).is_some()
    );
    assert_eq!(delta("roost_rate_limited_total", &[("limit", "login")]), limited as f64);

    // Gauges sampled at start, and process metrics.
    for tier in ["sqlite", "disk", "s3"] {
        after.get("roost_blobs", &[("tier", tier)]);
        after.get("roost_blob_bytes", &[("tier", tier)]);
    }
    assert!(after.get("roost_sqlite_file_bytes", &[]) > 0.0);
    after.get("roost_sqlite_wal_bytes", &[]);
    let size = after.get("roost_data_volume_size_bytes", &[]);
    let free = after.get("roost_data_volume_free_bytes", &[]);
    assert!(size > 0.0 && free > 0.0 && free <= size, "free {free} size {size}");
    assert_eq!(after.get("roost_backup_last_success_timestamp_seconds", &[]), 0.0);
    assert_eq!(after.get("roost_firehose_subscribers", &[]), 0.0);
    assert!(after.get("process_resident_memory_bytes", &[]) > 0.0);
    after.get("process_cpu_seconds_total", &[]);
    assert!(after.get("process_start_time_seconds", &[]) > 1.6e9);
    let names = after.names();
    for name in [
        "roost_firehose_frames_sent_total",
        "roost_firehose_bytes_sent_total",
        "roost_firehose_slow_consumer_disconnects_total",
    ] {
        assert!(names.contains(name), "{name} missing");
    }

    // The relay was asked at start; the success is timestamped per relay.
    let deadline = Instant::now() + Duration::from_secs(10);
    let crawled = loop {
        let m = server.scrape().await;
        if m.find("roost_relay_last_crawl_success_timestamp_seconds", &[("relay", &relay)]).is_some() {
            break m;
        }
        assert!(Instant::now() < deadline, "no crawl success recorded:\n{}", m.text);
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(relay_hits.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    let at = crawled.get("roost_relay_last_crawl_success_timestamp_seconds", &[("relay", &relay)]);
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs_f64();
    assert!((now - at).abs() < 120.0, "crawl success at {at}, now {now}");
    assert!(crawled.get("roost_relay_crawl_requests_total", &[("relay", &relay), ("result", "ok")]) >= 1.0);

    // The metrics listener serves nothing else, and the main port has no /metrics.
    let other = http_client()
        .get(format!("http://127.0.0.1:{}/xrpc/_health", server.metrics_port))
        .send()
        .await
        .expect("request");
    assert_eq!(other.status(), StatusCode::NOT_FOUND);
    assert_eq!(x.request(Method::GET, "/metrics", &[], None).await.status, StatusCode::NOT_FOUND);
}

/// `roost healthcheck` against a running and a stopped server; SIGTERM exits 0
/// quickly and leaves an empty WAL; `roost backup` from the CLI, and its
/// timestamp on `/metrics` after the restart.
#[tokio::test]
async fn healthcheck_sigterm_and_backup_timestamp_with_the_real_binary() {
    let plc = MockPlc::start().await;
    let work = tempfile::tempdir().expect("tempdir");
    let mut server = Server::start(work.path(), &plc.url, &[]).await;
    let x = server.xrpc();
    let (access, _) = x.login_as(HANDLE, PASSWORD).await;
    let did = x.get("com.atproto.identity.resolveHandle", &[("handle", HANDLE)]).await.1["did"]
        .as_str()
        .expect("did")
        .to_owned();
    for n in 0..20 {
        let body = json!({ "repo": did, "collection": ITEM, "record": item(n) });
        assert_eq!(x.post("com.atproto.repo.createRecord", Some(&access), &body).await.0, StatusCode::OK);
    }

    let ok = server.run(&["healthcheck"]).await;
    assert!(ok.status.success(), "healthcheck on a running server: {ok:?}");

    let out = work.path().join("backup-1");
    let backup = server.run(&["backup", "--out", out.to_str().expect("utf-8")]).await;
    assert!(backup.status.success(), "roost backup: {backup:?}");
    let last: Value =
        serde_json::from_slice(&std::fs::read(work.path().join("data/last-backup.json")).expect("read"))
            .expect("last-backup.json");
    let finished_at = last["finished_at"].as_i64().expect("finished_at");
    assert!(finished_at > 1_600_000_000, "{last}");
    assert_eq!(
        Path::new(last["dir"].as_str().expect("dir")),
        out.canonicalize().expect("canonical"),
        "{last}"
    );
    assert!(out.join("manifest.json").exists());

    // An idle keep-alive connection must not hold the shutdown open.
    let idle = http_client();
    idle.get(format!("http://127.0.0.1:{}/xrpc/_health", server.port)).send().await.expect("health");
    let wal = work.path().join("data/roost.sqlite-wal");
    let (status, took) = server.terminate().await;
    assert!(status.success(), "exit status after SIGTERM: {status}\n{}", server.log_tail());
    assert!(took < Duration::from_secs(5), "SIGTERM took {took:?}");
    let wal_len = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
    assert_eq!(wal_len, 0, "the WAL is checkpointed (truncated) at shutdown");

    let down = server.run(&["healthcheck"]).await;
    assert_eq!(down.status.code(), Some(1), "healthcheck on a stopped server: {down:?}");
    let stderr = String::from_utf8_lossy(&down.stderr);
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr:?}");
    assert!(stderr.contains("unhealthy"), "{stderr}");
    let bad_port = Server::command(work.path(), 0, 0, &plc.url)
        .env("PDS_PORT", "not-a-port")
        .arg("healthcheck")
        .output()
        .await
        .expect("run");
    assert_eq!(bad_port.status.code(), Some(1));

    // `roost restore` from the CLI: into a fresh directory, then refused there without --force.
    let restore = |target: PathBuf, force: bool| {
        let mut cmd = Server::command(work.path(), 0, 0, &plc.url);
        cmd.env("PDS_DATA_DIRECTORY", &target).args(["restore", "--from", out.to_str().expect("utf-8")]);
        if force {
            cmd.arg("--force");
        }
        async move { cmd.output().await.expect("run restore") }
    };
    let copy = work.path().join("data-copy");
    let restored = restore(copy.clone(), false).await;
    assert!(restored.status.success(), "roost restore: {restored:?}");
    let names = |dir: PathBuf| -> BTreeSet<String> {
        std::fs::read_dir(dir)
            .expect("keys")
            .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
            .collect()
    };
    assert!(copy.join("roost.sqlite").exists());
    assert_eq!(names(copy.join("keys")), names(work.path().join("data/keys")));
    assert!(!names(copy.join("keys")).is_empty());
    let refused = restore(copy.clone(), false).await;
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("not empty"), "{refused:?}");
    assert!(restore(copy.clone(), true).await.status.success());

    // Restarted on the same directory, the gauge reports the backup.
    drop(server);
    let server = Server::start(work.path(), &plc.url, &[]).await;
    let metrics = server.scrape().await;
    assert_eq!(metrics.get("roost_backup_last_success_timestamp_seconds", &[]), finished_at as f64);
    assert_eq!(server.xrpc().list_all(&did, ITEM).await.len(), 20);
}

/// A client stalled half way through an upload cannot hold shutdown open:
/// after 10 s of draining the server exits anyway (and still with 0).
#[tokio::test]
async fn sigterm_drain_gives_up_on_a_stalled_upload_after_10_s() {
    use tokio::io::AsyncWriteExt as _;
    let plc = MockPlc::start().await;
    let work = tempfile::tempdir().expect("tempdir");
    let mut server = Server::start(work.path(), &plc.url, &[]).await;
    let (access, _) = server.xrpc().login_as(HANDLE, PASSWORD).await;
    let mut stalled = tokio::net::TcpStream::connect(("127.0.0.1", server.port)).await.expect("connect");
    let head = format!(
        "POST /xrpc/com.atproto.repo.uploadBlob HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {access}\r\n\
         Content-Type: application/octet-stream\r\nContent-Length: 1000000\r\n\r\n"
    );
    stalled.write_all(head.as_bytes()).await.expect("write");
    stalled.write_all(&[7u8; 4096]).await.expect("write");
    stalled.flush().await.expect("flush");
    // Let the handler start reading the body.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, took) = server.terminate().await;
    assert!(status.success(), "{status}\n{}", server.log_tail());
    assert!(took >= Duration::from_secs(9), "the in-flight upload got its drain time: {took:?}");
    assert!(took < Duration::from_secs(14), "draining is capped at 10 s: {took:?}");
    assert!(server.log_tail().contains("did not finish within 10 s"), "{}", server.log_tail());
    drop(stalled);
}

/// A server that answers health checks slowly counts as unhealthy after 3 s.
#[tokio::test]
async fn healthcheck_times_out_on_a_hung_server() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    // Accepts connections and never answers.
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let start = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_roost"))
        .arg("healthcheck")
        .env("PDS_PORT", port.to_string())
        .output()
        .await
        .expect("run");
    let took = start.elapsed();
    hold.abort();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(took >= Duration::from_millis(2900) && took < Duration::from_secs(6), "took {took:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("within 3 s"), "{out:?}");
}

// ---------------------------------------------------------------------------
// /tls-check

#[tokio::test]
async fn tls_check_allows_the_hostname_and_account_handles_only() {
    let pds = TestPds::spawn().await;
    let check = |domain: Option<&'static str>| {
        let pds = &pds;
        async move {
            let path = match domain {
                Some(d) => format!("/tls-check?{}", query_string(&[("domain", d)])),
                None => "/tls-check".to_owned(),
            };
            let r = pds.request(Method::GET, &path, &[], None).await;
            (r.status, r.json())
        }
    };
    assert_eq!(check(Some("localhost")).await.0, StatusCode::OK, "the PDS hostname");
    assert_eq!(check(Some(HANDLE)).await.0, StatusCode::OK, "an account's handle");
    assert_eq!(check(Some("ALICE.test.")).await.0, StatusCode::OK, "case and a trailing dot do not matter");
    for domain in ["bob.test", "evil.example.com", "alice.test.evil.example.com", "test"] {
        let (status, body) = check(Some(domain)).await;
        assert_xrpc_error(status, &body, 404, "NotFound");
    }
    let (status, body) = check(None).await;
    assert_xrpc_error(status, &body, 400, "InvalidRequest");
    let (status, body) = check(Some("  ")).await;
    assert_xrpc_error(status, &body, 400, "InvalidRequest");
}

// ---------------------------------------------------------------------------
// Backup and restore

/// What a writer saw acknowledged: after each commit, its CID and the records.
#[derive(Default)]
struct History {
    /// (commit CID, rkeys present after it)
    commits: Vec<(String, BTreeSet<String>)>,
}

fn test_config(dir: &Path, plc_url: &str) -> Config {
    Config::for_tests(dir.to_owned(), plc_url.to_owned(), HANDLE, PASSWORD)
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).expect("metadata").permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_while_writing_restores_into_a_fresh_directory_and_refuses_tampering() {
    let src = TestPds::spawn().await;
    let (access, _) = src.login().await;
    // One large blob (disk tier) and one small (inside SQLite), both referenced.
    let big: Vec<u8> = (0..200_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let small = b"a small blob that lives in sqlite".to_vec();
    let mut blob_refs = Vec::new();
    for bytes in [&big, &small] {
        let r = src
            .post_raw(
                "com.atproto.repo.uploadBlob",
                Some(&access),
                Some("application/octet-stream"),
                bytes.clone(),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        blob_refs.push(r.json()["blob"].clone());
    }
    src.create(
        &access,
        ITEM,
        Some("with-blobs"),
        json!({ "$type": ITEM, "big": blob_refs[0], "small": blob_refs[1] }),
    )
    .await;
    let big_cid = blob_refs[0]["ref"]["$link"].as_str().expect("cid").to_owned();
    let small_cid = blob_refs[1]["ref"]["$link"].as_str().expect("cid").to_owned();

    // A writer keeps committing while the backup runs.
    let history = Arc::new(Mutex::new(History::default()));
    let start_set: BTreeSet<String> = ["with-blobs".to_owned()].into();
    let first = src.latest().await.0;
    history.lock().expect("history").commits.push((first, start_set.clone()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (xrpc, did, access, history, stop) =
            (src.xrpc.clone(), src.did.clone(), access.clone(), history.clone(), stop.clone());
        tokio::spawn(async move {
            let mut present = start_set;
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) || n < 10 {
                let rkey = format!("r{n:04}");
                let body = json!({ "repo": did, "collection": ITEM, "rkey": rkey, "record": item(n) });
                let (status, out) = xrpc.post("com.atproto.repo.createRecord", Some(&access), &body).await;
                assert_eq!(status, StatusCode::OK, "{out}");
                present.insert(rkey);
                let cid = out["commit"]["cid"].as_str().expect("commit cid").to_owned();
                history.lock().expect("history").commits.push((cid, present.clone()));
                n += 1;
            }
            n
        })
    };
    while history.lock().expect("history").commits.len() < 5 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let acked_before_backup = history.lock().expect("history").commits.len();
    let work = tempfile::tempdir().expect("tempdir");
    let out = work.path().join("backup");
    let manifest =
        roost::backup::backup(&test_config(&src.data_dir, &src.plc.url), &out).await.expect("backup");
    // The live data directory verifies while the writer goes on (one read transaction).
    assert_verifies(&src.data_dir).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let written = writer.await.expect("writer");
    assert!(written >= 10);

    // The manifest: every file with size and checksum; modes kept.
    let paths: BTreeSet<&str> = manifest.files.iter().map(|f| f.path.as_str()).collect();
    assert!(paths.contains("roost.sqlite"), "{paths:?}");
    assert!(paths.iter().any(|p| p.starts_with("keys/")), "{paths:?}");
    let blob_files: Vec<&&str> = paths.iter().filter(|p| p.starts_with("blobs/")).collect();
    assert_eq!(blob_files.len(), 1, "only the large blob is a file: {paths:?}");
    assert!(blob_files[0].ends_with(&big_cid), "{blob_files:?}");
    assert_eq!((manifest.blobs.disk_copied, manifest.blobs.sqlite_in_database), (1, 1));
    assert_eq!(manifest.blobs.s3_not_copied, 0);
    assert!(manifest.blobs.note.contains("s3"), "{}", manifest.blobs.note);
    let on_disk: Value =
        serde_json::from_slice(&std::fs::read(out.join("manifest.json")).expect("manifest")).expect("json");
    assert_eq!(on_disk["files"].as_array().map(Vec::len), Some(manifest.files.len()));
    for f in &manifest.files {
        assert_eq!(f.sha256.len(), 64);
        assert_eq!(std::fs::metadata(out.join(&f.path)).expect("file").len(), f.size, "{}", f.path);
        if f.path.starts_with("keys/") {
            assert_eq!(mode(&out.join(&f.path)), 0o600, "{}", f.path);
        }
    }
    assert_eq!(mode(&out.join("keys")), 0o700);
    let last = roost::backup::last_backup(&src.data_dir).expect("last-backup.json");
    assert_eq!(last.finished_at, manifest.finished_at);

    // The snapshot taken under load verifies: manifest, database, repository, blobs.
    let report = assert_verifies(&out).await;
    assert_eq!((report.accounts, report.blobs), (1, 2), "{report:?}");

    // Restore into a directory that does not exist yet, and serve it.
    let fresh = work.path().join("restored");
    roost::backup::restore(&test_config(&fresh, &src.plc.url), &out, false).await.expect("restore");
    assert_eq!(assert_verifies(&fresh).await.records, report.records, "the restored data directory verifies");
    assert_eq!(mode(&fresh.join("keys")), 0o700);
    for entry in std::fs::read_dir(fresh.join("keys")).expect("keys") {
        assert_eq!(mode(&entry.expect("entry").path()), 0o600);
    }
    let restored = TestPds::spawn_with(Options {
        dir: Some(fresh.clone()),
        plc: Some(src.plc.clone()),
        ..Options::default()
    })
    .await;
    assert_eq!(restored.did, src.did);
    let (root, _) = restored.latest().await;
    let history = History { commits: history.lock().expect("history").commits.clone() };
    let index = history
        .commits
        .iter()
        .position(|(cid, _)| *cid == root)
        .unwrap_or_else(|| panic!("restored root {root} is none of the acknowledged commits"));
    assert!(index + 1 >= acked_before_backup, "commits acknowledged before the backup started are in it");
    let records: BTreeSet<String> = restored.list_all(&restored.did, ITEM).await.into_keys().collect();
    assert_eq!(records, history.commits[index].1, "records match the snapshot's commit");
    restored.verify().await;
    // Both blobs come back: the large one from blobs/, the small one inside the database.
    for (cid, bytes) in [(&big_cid, &big), (&small_cid, &small)] {
        let r = restored
            .request(
                Method::GET,
                &format!("/xrpc/com.atproto.sync.getBlob?did={}&cid={cid}", restored.did),
                &[],
                None,
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert_eq!(&r.body, bytes);
    }
    // The restored account can log in and write with its restored keys.
    let (access2, _) = restored.login().await;
    restored.create(&access2, ITEM, Some("after-restore"), item(9999)).await;
    restored.verify().await;
    restored.stop().await;
    // After the server ran on it (WAL mode, a new commit), the data directory still verifies.
    assert_eq!(assert_verifies(&fresh).await.records, report.records + 1);

    // A non-empty data directory is refused without --force, replaced with it.
    let err =
        roost::backup::restore(&test_config(&fresh, &src.plc.url), &out, false).await.expect_err("non-empty");
    assert!(err.to_string().contains("not empty"), "{err:#}");
    roost::backup::restore(&test_config(&fresh, &src.plc.url), &out, true).await.expect("forced restore");
    let again = TestPds::spawn_with(Options {
        dir: Some(fresh.clone()),
        plc: Some(src.plc.clone()),
        ..Options::default()
    })
    .await;
    assert_eq!(again.latest().await.0, root, "--force put the backup's repository back");
    again.stop().await;

    // One flipped byte anywhere is caught before anything is written.
    let blob_path: &str = blob_files[0];
    for victim in [
        "roost.sqlite",
        blob_path,
        manifest.files.iter().find(|f| f.path.starts_with("keys/")).map(|f| f.path.as_str()).expect("a key"),
    ] {
        let path = out.join(victim);
        let original = std::fs::read(&path).expect("read");
        let mut tampered = original.clone();
        let at = tampered.len() / 2;
        tampered[at] ^= 0x01;
        std::fs::write(&path, &tampered).expect("tamper");
        let target = work.path().join(format!("tampered-{}", victim.replace('/', "_")));
        let err = roost::backup::restore(&test_config(&target, &src.plc.url), &out, false)
            .await
            .expect_err("a tampered backup must be refused");
        assert!(format!("{err:#}").contains(victim), "{err:#}");
        assert!(!target.exists(), "nothing written for a tampered backup");
        let report = roost::verify::verify(&out, &Default::default()).await.expect("verify runs");
        assert!(!report.ok(), "verify must fail on a flipped byte in {victim}");
        assert!(report.problems.iter().any(|p| p.contains(victim)), "{victim}: {:?}", report.problems);
        std::fs::write(&path, &original).expect("untamper");
    }
    // A missing file is refused too.
    let key = manifest.files.iter().find(|f| f.path.starts_with("keys/")).expect("a key").path.clone();
    std::fs::rename(out.join(&key), work.path().join("moved-key")).expect("move");
    let target = work.path().join("missing-file");
    assert!(roost::backup::restore(&test_config(&target, &src.plc.url), &out, false).await.is_err());
    assert!(!target.exists());
}

// ---------------------------------------------------------------------------
// Verify

/// `roost::verify::verify` on `dir` passes; returns the report.
async fn assert_verifies(dir: &Path) -> roost::verify::Report {
    let report = roost::verify::verify(dir, &Default::default()).await.expect("verify runs");
    assert!(report.ok(), "{}: {:#?}", dir.display(), report);
    report
}

/// `roost verify DIR` with the real binary: (exit code, stdout).
async fn roost_verify(dir: &Path) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_roost"))
        .arg("verify")
        .arg(dir)
        .env("RUST_LOG", "warn")
        .output()
        .await
        .expect("run roost verify");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned())
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read_dir") {
        let entry = entry.expect("entry");
        let dst = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &dst);
        } else {
            std::fs::copy(entry.path(), &dst).expect("copy");
        }
    }
}

/// A copy of the backup as a data directory (no manifest), and a read-write
/// connection to its database, to damage it.
async fn damaged_copy(out: &Path, to: &Path) -> sqlx::SqliteConnection {
    use sqlx::Connection as _;
    copy_dir(out, to);
    std::fs::remove_file(to.join("manifest.json")).expect("rm manifest");
    sqlx::SqliteConnection::connect(&format!("sqlite://{}", to.join("roost.sqlite").display()))
        .await
        .expect("open copy")
}

/// Fails with the problem named, through the library.
async fn assert_problem(dir: &Path, needle: &str) {
    let report = roost::verify::verify(dir, &Default::default()).await.expect("verify runs");
    assert!(!report.ok(), "{needle}: verify passed: {report:#?}");
    assert!(report.problems.iter().any(|p| p.contains(needle)), "{needle}: {:#?}", report.problems);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_passes_a_fresh_backup_and_names_each_kind_of_damage() {
    let src = TestPds::spawn().await;
    let (access, _) = src.login().await;
    let big: Vec<u8> = (0..150_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8).collect();
    let r = src
        .post_raw("com.atproto.repo.uploadBlob", Some(&access), Some("application/octet-stream"), big)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let blob = r.json()["blob"].clone();
    let blob_cid = blob["ref"]["$link"].as_str().expect("cid").to_owned();
    src.create(&access, ITEM, Some("with-blob"), json!({ "$type": ITEM, "big": blob })).await;
    // Enough records for a tree of several layers.
    for n in 0..120 {
        src.create(&access, ITEM, Some(&format!("r{n:04}")), item(n)).await;
    }
    let work = tempfile::tempdir().expect("tempdir");
    let out = work.path().join("backup");
    roost::backup::backup(&test_config(&src.data_dir, &src.plc.url), &out).await.expect("backup");
    src.stop().await;

    // The real binary: exit 0, one line per check, the summary last.
    let (code, stdout) = roost_verify(&out).await;
    assert_eq!(code, 0, "{stdout}");
    assert!(stdout.contains("manifest: 4/4 files match"), "{stdout}");
    assert!(stdout.contains("sqlite: integrity_check ok, foreign_key_check ok"), "{stdout}");
    assert!(stdout.contains("121 records") && stdout.contains(", OK"), "{stdout}");
    let last = stdout.lines().last().expect("a summary");
    assert!(
        last.starts_with("verify: OK — 1 accounts, 121 records, ") && last.ends_with("1 blobs (0 problems)"),
        "{last}"
    );
    let report = assert_verifies(&out).await;
    assert_eq!((report.accounts, report.records, report.blobs), (1, 121, 1), "{report:?}");
    let blob_file =
        std::fs::read_dir(out.join("blobs")).expect("blobs").next().expect("a dir").expect("entry").path();
    let blob_rel = format!("blobs/{}/{blob_cid}", blob_file.file_name().expect("name").to_string_lossy());

    // A flipped bit in the database: the manifest names it, and the exit status says so.
    let flipped = work.path().join("flipped");
    copy_dir(&out, &flipped);
    let db = flipped.join("roost.sqlite");
    let mut bytes = std::fs::read(&db).expect("read");
    let at = bytes.len() / 2;
    bytes[at] ^= 0x10;
    std::fs::write(&db, &bytes).expect("write");
    let (code, stdout) = roost_verify(&flipped).await;
    assert_eq!(code, 1, "{stdout}");
    assert!(stdout.contains("problem: manifest: roost.sqlite: SHA-256 mismatch"), "{stdout}");
    assert!(stdout.lines().last().expect("summary").starts_with("verify: FAILED"), "{stdout}");

    // A disk blob gone from the backup: named by the manifest and by the blob check.
    let no_blob = work.path().join("no-blob");
    copy_dir(&out, &no_blob);
    std::fs::remove_file(no_blob.join(&blob_rel)).expect("rm blob");
    assert_problem(&no_blob, &format!("manifest: {blob_rel}")).await;
    assert_problem(&no_blob, &format!("blobs: {}", blob_rel.trim_start_matches("blobs/"))).await;

    // A record block deleted from the database (data-directory mode: no manifest to trip first).
    let (record_cid,): (Vec<u8>,) = {
        let mut conn = damaged_copy(&out, &work.path().join("no-record-block")).await;
        let row: (Vec<u8>,) = sqlx::query_as("SELECT cid FROM record WHERE rkey = 'r0007'")
            .fetch_one(&mut conn)
            .await
            .expect("record");
        sqlx::query("DELETE FROM block WHERE cid = ?").bind(&row.0).execute(&mut conn).await.expect("delete");
        row
    };
    let record_cid = cid::Cid::try_from(record_cid.as_slice()).expect("cid");
    assert_problem(
        &work.path().join("no-record-block"),
        &format!("record {ITEM}/r0007: block {record_cid} is missing"),
    )
    .await;

    // An MST node deleted: the tree walk names it.
    let data_cid = {
        let mut conn = damaged_copy(&out, &work.path().join("no-mst-node")).await;
        let (data,): (Vec<u8>,) =
            sqlx::query_as("SELECT data_cid FROM repo_root").fetch_one(&mut conn).await.expect("root");
        sqlx::query("DELETE FROM block WHERE cid = ?").bind(&data).execute(&mut conn).await.expect("delete");
        cid::Cid::try_from(data.as_slice()).expect("cid")
    };
    assert_problem(&work.path().join("no-mst-node"), &format!("MST node {data_cid} is missing")).await;

    // A record missing from the index: the MST and the index disagree.
    {
        let mut conn = damaged_copy(&out, &work.path().join("index-gap")).await;
        sqlx::query("DELETE FROM record WHERE rkey = 'r0042'").execute(&mut conn).await.expect("delete");
    }
    assert_problem(
        &work.path().join("index-gap"),
        &format!("record {ITEM}/r0042 is in the MST but not in the record index"),
    )
    .await;

    // A tampered commit signature (the block re-encoded, so its CID is honest).
    {
        let mut conn = damaged_copy(&out, &work.path().join("bad-sig")).await;
        let (commit_cid,): (Vec<u8>,) =
            sqlx::query_as("SELECT commit_cid FROM repo_root").fetch_one(&mut conn).await.expect("root");
        let (data,): (Vec<u8>,) = sqlx::query_as("SELECT data FROM block WHERE cid = ?")
            .bind(&commit_cid)
            .fetch_one(&mut conn)
            .await
            .expect("commit block");
        let mut commit = roost::atp::commit::decode(&data).expect("commit");
        commit.sig[10] ^= 0x01;
        let bytes = roost::atp::data::encode_cbor_serde(&commit).expect("encode");
        let cid = roost::atp::data::cid_for_cbor(&bytes);
        sqlx::query("UPDATE block SET cid = ?, data = ? WHERE cid = ?")
            .bind(cid.to_bytes())
            .bind(&bytes)
            .bind(&commit_cid)
            .execute(&mut conn)
            .await
            .expect("swap block");
        sqlx::query("UPDATE repo_root SET commit_cid = ?")
            .bind(cid.to_bytes())
            .execute(&mut conn)
            .await
            .expect("root");
    }
    assert_problem(&work.path().join("bad-sig"), "commit signature does not verify").await;
    let (code, stdout) = roost_verify(&work.path().join("bad-sig")).await;
    assert_eq!(code, 1, "{stdout}");
    assert!(stdout.contains("manifest: none"), "{stdout}");
}

// ---------------------------------------------------------------------------
// Traces

/// What the collector received: (content type, body) per request.
type Received = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// A stand-in OTLP collector: records every POST to /v1/traces.
async fn start_collector() -> (String, Received) {
    let seen: Received = Arc::default();
    let state = seen.clone();
    let router = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
            let state = state.clone();
            async move {
                let ct = headers
                    .get(axum::http::header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned();
                state.lock().expect("collector").push((ct, body.to_vec()));
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://127.0.0.1:{}", listener.local_addr().expect("addr").port());
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    (url, seen)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_traces_name_spans_by_nsid_and_logs_and_latency_exemplars_carry_trace_ids() {
    let plc = MockPlc::start().await;
    let (collector, seen) = start_collector().await;
    let work = tempfile::tempdir().expect("tempdir");
    let mut server = Server::start(
        work.path(),
        &plc.url,
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", collector), ("RUST_LOG", "warn,roost::telemetry=debug".into())],
    )
    .await;
    let x = server.xrpc();
    assert_eq!(x.get("com.atproto.server.describeServer", &[]).await.0, StatusCode::OK);
    assert_eq!(x.get("com.example.not.routed", &[]).await.0, StatusCode::NOT_IMPLEMENTED);
    // A caller's W3C trace context is continued.
    let caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let traceparent = format!("00-{caller_trace}-00f067aa0ba902b7-01");
    let r = x
        .request(
            Method::GET,
            "/xrpc/com.atproto.sync.listRepos",
            &[("traceparent", traceparent.as_str())],
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    // An unsampled caller trace is not exported, so it gets no exemplar.
    let unsampled = format!("00-{}-00f067aa0ba902b7-00", "5".repeat(32));
    let r = x
        .request(
            Method::GET,
            "/xrpc/com.atproto.sync.getLatestCommit",
            &[("traceparent", unsampled.as_str())],
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    // The metrics listener: the text format by default, OpenMetrics with the
    // requests' trace ids as latency exemplars when asked like Prometheus asks.
    let scrape = |accept: Option<&'static str>| {
        let mut get = http_client().get(format!("http://127.0.0.1:{}/metrics", server.metrics_port));
        if let Some(accept) = accept {
            get = get.header("accept", accept);
        }
        async move {
            let r = get.send().await.expect("GET /metrics");
            assert_eq!(r.status(), StatusCode::OK);
            let ct = r.headers()["content-type"].to_str().expect("ascii").to_owned();
            (ct, r.text().await.expect("metrics body"))
        }
    };
    let (ct, text) = scrape(None).await;
    assert_eq!(ct, "text/plain; version=0.0.4");
    assert!(!text.contains(" # {") && !text.contains("# EOF"), "{text}");
    assert!(text.contains("# TYPE roost_http_requests_total counter"), "{text}");
    let (ct, om) = scrape(Some(
        "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,\
         text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
    ))
    .await;
    assert_eq!(ct, "application/openmetrics-text; version=1.0.0; charset=utf-8");
    assert!(om.ends_with("\n# EOF\n"), "{om}");
    assert!(om.contains("# TYPE roost_http_requests counter\n"), "{om}");
    let exemplar_of = |method: &str| -> Vec<String> {
        om.lines()
            .filter(|l| {
                l.starts_with(&format!("roost_http_request_duration_seconds_bucket{{method=\"{method}\","))
            })
            .filter_map(|l| l.split_once(" # {trace_id=\"").map(|(_, e)| e[..32].to_owned()))
            .collect()
    };
    assert_eq!(exemplar_of("com.atproto.sync.listRepos"), [caller_trace], "{om}");
    assert_eq!(exemplar_of("com.atproto.sync.getLatestCommit"), Vec::<String>::new(), "{om}");
    assert!(
        om.contains(
            "roost_http_request_duration_seconds_count{method=\"com.atproto.sync.getLatestCommit\"} 1"
        ),
        "{om}"
    );
    let describe_exemplars = exemplar_of("com.atproto.server.describeServer");
    assert_eq!(describe_exemplars.len(), 1, "{om}");
    // Shutdown flushes the batch.
    let (status, _) = server.terminate().await;
    assert!(status.success(), "{}", server.log_tail());
    let seen = seen.lock().expect("collector");
    assert!(!seen.is_empty(), "no OTLP export arrived:\n{}", server.log_tail());
    assert!(
        seen.iter().all(|(ct, _)| ct == "application/x-protobuf"),
        "{:?}",
        seen.iter().map(|s| &s.0).collect::<Vec<_>>()
    );
    let all: Vec<u8> = seen.iter().flat_map(|(_, b)| b.clone()).collect();
    assert!(contains(&all, b"xrpc com.atproto.server.describeServer"), "span named by NSID");
    assert!(contains(&all, b"xrpc other"), "unknown NSIDs share one span name");
    assert!(!contains(&all, b"com.example.not.routed"), "unknown NSIDs are not exported");
    assert!(contains(&all, b"roost"), "service.name");
    assert!(contains(&all, b"http.response.status_code"));
    let log = std::fs::read_to_string(&server.log).expect("log");
    let line = log
        .lines()
        .find(|l| l.contains("rpc.method=com.atproto.server.describeServer") && l.contains("trace_id="))
        .unwrap_or_else(|| panic!("no log line with a trace id:\n{log}"));
    let id = line
        .split("trace_id=")
        .nth(1)
        .expect("id")
        .split(|c: char| !c.is_ascii_hexdigit())
        .next()
        .expect("hex");
    assert_eq!(id.len(), 32, "{line}");
    assert_ne!(id, caller_trace);
    assert_eq!(describe_exemplars, [id], "the exemplar is the trace of the logged request");
    assert!(contains(&all, &hex::decode(id).expect("hex")), "the exemplar's trace was exported");
    assert!(
        log.lines().any(|l| l.contains("rpc.method=com.atproto.sync.listRepos")
            && l.contains(&format!("trace_id={caller_trace}"))),
        "the traceparent's trace id is used:\n{log}"
    );
    let caller_trace_bytes = hex::decode(caller_trace).expect("hex");
    assert!(contains(&all, &caller_trace_bytes), "exported under the caller's trace id");
}

/// One exported span, flattened from the collector's OTLP requests.
#[derive(Debug, Clone)]
struct ExportedSpan {
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    name: String,
    kind: i32,
    attributes: BTreeMap<String, String>,
}

fn exported_spans(seen: &Received) -> Vec<ExportedSpan> {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
    use prost::Message as _;
    let mut spans = Vec::new();
    for (_, body) in seen.lock().expect("collector").iter() {
        let request = ExportTraceServiceRequest::decode(body.as_slice()).expect("OTLP protobuf");
        for span in request.resource_spans.iter().flat_map(|r| &r.scope_spans).flat_map(|s| &s.spans) {
            let attributes = span
                .attributes
                .iter()
                .map(|kv| {
                    let value = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                        Some(Any::StringValue(s)) => s.clone(),
                        Some(Any::IntValue(i)) => i.to_string(),
                        other => format!("{other:?}"),
                    };
                    (kv.key.clone(), value)
                })
                .collect();
            spans.push(ExportedSpan {
                trace_id: hex::encode(&span.trace_id),
                span_id: hex::encode(&span.span_id),
                parent_span_id: hex::encode(&span.parent_span_id),
                name: span.name.clone(),
                kind: span.kind,
                attributes,
            });
        }
    }
    spans
}

/// Whether `span` descends from the span `ancestor` (same trace).
fn descends_from(spans: &[ExportedSpan], span: &ExportedSpan, ancestor: &ExportedSpan) -> bool {
    let mut parent = span.parent_span_id.clone();
    while !parent.is_empty() {
        if parent == ancestor.span_id {
            return true;
        }
        match spans.iter().find(|s| s.span_id == parent && s.trace_id == span.trace_id) {
            Some(p) => parent = p.parent_span_id.clone(),
            None => return false,
        }
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_traces_have_sqlite_and_outbound_client_spans_and_upstreams_get_the_traceparent() {
    const SPAN_KIND_CLIENT: i32 = 3;
    let plc = MockPlc::start().await;
    let (collector, seen) = start_collector().await;
    // A stub AppView that remembers the traceparent of each call.
    let traceparents: Arc<Mutex<Vec<Option<String>>>> = Arc::default();
    let record = traceparents.clone();
    let appview_router = axum::Router::new().route(
        "/xrpc/app.bsky.actor.getProfile",
        axum::routing::get(move |headers: axum::http::HeaderMap| {
            let header = headers.get("traceparent").and_then(|v| v.to_str().ok()).map(str::to_owned);
            record.lock().expect("appview").push(header);
            async { axum::Json(json!({ "did": "did:plc:someone", "handle": "someone.test" })) }
        }),
    );
    let appview_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind appview");
    let appview_port = appview_listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        let _ = axum::serve(appview_listener, appview_router).await;
    });
    let work = tempfile::tempdir().expect("tempdir");
    let mut server = Server::start(
        work.path(),
        &plc.url,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", collector),
            ("PDS_BSKY_APP_VIEW_URL", format!("http://127.0.0.1:{appview_port}")),
            ("PDS_BSKY_APP_VIEW_DID", "did:web:appview.test".into()),
            ("PDS_DISABLE_SSRF_PROTECTION", "true".into()),
        ],
    )
    .await;
    let x = server.xrpc();
    let (access, _) = x.login_as(HANDLE, PASSWORD).await;
    let did = x.get("com.atproto.identity.resolveHandle", &[("handle", HANDLE)]).await.1["did"]
        .as_str()
        .expect("did")
        .to_owned();
    let body = json!({ "repo": did, "collection": ITEM, "rkey": "traced", "record": item(1) });
    let (status, out) = x.post("com.atproto.repo.createRecord", Some(&access), &body).await;
    assert_eq!(status, StatusCode::OK, "{out}");
    let (status, out) = x.get_auth("app.bsky.actor.getProfile", &access, &[("actor", "someone.test")]).await;
    assert_eq!(status, StatusCode::OK, "{out}");
    let (status, _) = server.terminate().await;
    assert!(status.success(), "{}", server.log_tail());

    let spans = exported_spans(&seen);
    let named = |name: &str| -> ExportedSpan {
        let found: Vec<_> = spans.iter().filter(|s| s.name == name).collect();
        assert_eq!(found.len(), 1, "{name}: {spans:#?}");
        found[0].clone()
    };
    // The write: its SQLite calls and its commit transaction are children
    // of the request span, in its trace.
    let create = named("xrpc com.atproto.repo.createRecord");
    let sqlite: Vec<_> =
        spans.iter().filter(|s| s.trace_id == create.trace_id && s.name.starts_with("sqlite ")).collect();
    let names: BTreeSet<&str> = sqlite.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains("sqlite commit") && names.contains("sqlite repo_root"), "{spans:#?}");
    for span in &sqlite {
        assert!(descends_from(&spans, span, &create), "{span:?}");
        assert_eq!(span.kind, SPAN_KIND_CLIENT, "{span:?}");
        assert_eq!(span.attributes["db.system.name"], "sqlite", "{span:?}");
        assert_eq!(span.name.strip_prefix("sqlite "), Some(span.attributes["db.operation.name"].as_str()));
    }
    // The proxied call: a client span under the request span, and the
    // AppView got the client span's context.
    let port = appview_port.to_string();
    let client = spans
        .iter()
        .find(|s| s.attributes.get("server.port") == Some(&port))
        .unwrap_or_else(|| panic!("no client span for the AppView: {spans:#?}"))
        .clone();
    assert_eq!(client.name, "GET 127.0.0.1");
    // Proxied methods are not in the router table: their request span shares
    // the name of every other unrouted NSID.
    let profile = spans
        .iter()
        .find(|s| s.trace_id == client.trace_id && s.parent_span_id.is_empty())
        .expect("the proxied request's span");
    assert_eq!(profile.name, "xrpc other");
    assert!(descends_from(&spans, &client, profile), "{client:?}");
    assert_eq!(client.kind, SPAN_KIND_CLIENT);
    assert_eq!(client.attributes["server.address"], "127.0.0.1");
    assert_eq!(client.attributes["server.port"], appview_port.to_string());
    assert_eq!(client.attributes["http.request.method"], "GET");
    assert_eq!(client.attributes["http.response.status_code"], "200");
    assert_eq!(
        client.attributes["url.full"],
        format!("http://127.0.0.1:{appview_port}/xrpc/app.bsky.actor.getProfile"),
        "no query string"
    );
    let traceparents = traceparents.lock().expect("appview");
    assert_eq!(
        traceparents.as_slice(),
        [Some(format!("00-{}-{}-01", profile.trace_id, client.span_id))],
        "the AppView joins the request's trace"
    );
    // The PLC directory calls of account creation at start are client spans too.
    assert!(
        spans.iter().any(|s| s.kind == SPAN_KIND_CLIENT
            && s.attributes.get("url.full").is_some_and(|u| u.starts_with(&plc.url))),
        "{spans:#?}"
    );
}
