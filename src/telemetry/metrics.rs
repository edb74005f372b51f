//! Prometheus metrics: every metric name (the ops contract's `roost_*`
//! surface, with descriptions), the process-wide recorder, the `/metrics`
//! listener, the HTTP middleware that counts requests per XRPC method, and the
//! sampler that refreshes the storage gauges every 15 s.
//!
//! Label values are always bounded: the HTTP `method` label is an NSID from
//! the router table or `other`, never text taken from the request, so a client
//! cannot grow the registry by calling made-up methods.
//!
//! The recorder is global (the `metrics` facade has one per process) and only
//! installed when a metrics listener is configured; without it every macro
//! below is a no-op.
//!
//! With traces on, the HTTP latency histogram also keeps exemplars (the latest
//! sampled trace per method and bucket, in [`HttpExemplars`]); the listener
//! serves them when the scraper asks for OpenMetrics ([`super::openmetrics`]).

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::Response;
use metrics::{Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing::Instrument as _;

use super::openmetrics::{self, Exemplar};

pub const BUILD_INFO: &str = "roost_build_info";
pub const HTTP_REQUESTS: &str = "roost_http_requests_total";
pub const HTTP_DURATION: &str = "roost_http_request_duration_seconds";
pub const REPO_COMMITS: &str = "roost_repo_commits_total";
pub const REPO_RECORDS_WRITTEN: &str = "roost_repo_records_written_total";
pub const REPO_BLOCKS_WRITTEN: &str = "roost_repo_blocks_written_total";
pub const BLOBS: &str = "roost_blobs";
pub const BLOB_BYTES: &str = "roost_blob_bytes";
pub const FIREHOSE_SUBSCRIBERS: &str = "roost_firehose_subscribers";
pub const FIREHOSE_SUBSCRIBERS_BY_REMOTE: &str = "roost_firehose_subscribers_by_remote";
pub const FIREHOSE_EVENTS: &str = "roost_firehose_events_total";
pub const FIREHOSE_FRAMES_SENT: &str = "roost_firehose_frames_sent_total";
pub const FIREHOSE_BYTES_SENT: &str = "roost_firehose_bytes_sent_total";
pub const FIREHOSE_SLOW_DISCONNECTS: &str = "roost_firehose_slow_consumer_disconnects_total";
pub const RELAY_CRAWL_REQUESTS: &str = "roost_relay_crawl_requests_total";
pub const RELAY_LAST_CRAWL_SUCCESS: &str = "roost_relay_last_crawl_success_timestamp_seconds";
pub const PROXY_REQUESTS: &str = "roost_proxy_requests_total";
pub const PROXY_DURATION: &str = "roost_proxy_request_duration_seconds";
pub const RATE_LIMITED: &str = "roost_rate_limited_total";
pub const DB_QUERY_DURATION: &str = "roost_db_query_duration_seconds";
pub const SQLITE_FILE_BYTES: &str = "roost_sqlite_file_bytes";
pub const SQLITE_WAL_BYTES: &str = "roost_sqlite_wal_bytes";
pub const DATA_VOLUME_FREE: &str = "roost_data_volume_free_bytes";
pub const DATA_VOLUME_SIZE: &str = "roost_data_volume_size_bytes";
pub const BACKUP_LAST_SUCCESS: &str = "roost_backup_last_success_timestamp_seconds";

/// How often the storage gauges (blob counts, file sizes, free space, last
/// backup) are refreshed: they change slowly, and each refresh is a
/// `GROUP BY` over the blob table.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(15);

/// HTTP and proxy latencies: 5 ms .. 10 s.
const HTTP_BUCKETS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
/// SQLite calls are mostly sub-millisecond: 50 µs .. 1 s.
const DB_BUCKETS: &[f64] = &[0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0];

static RECORDER: Mutex<Option<PrometheusHandle>> = Mutex::new(None);
/// Whether the recorder is installed: without it, exemplars would never be served.
static INSTALLED: AtomicBool = AtomicBool::new(false);
/// The exemplars of `roost_http_request_duration_seconds`, served with the recorder's histograms.
static HTTP_EXEMPLARS: LazyLock<HttpExemplars> = LazyLock::new(HttpExemplars::default);

/// Installs the Prometheus recorder once per process and returns its handle
/// (later calls return the same handle: tests run several servers in one process).
pub fn install() -> anyhow::Result<PrometheusHandle> {
    let mut slot = RECORDER.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(handle) = slot.as_ref() {
        return Ok(handle.clone());
    }
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(HTTP_DURATION.into()), HTTP_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(PROXY_DURATION.into()), HTTP_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(DB_QUERY_DURATION.into()), DB_BUCKETS)?
        .install_recorder()?;
    describe_all();
    *slot = Some(handle.clone());
    INSTALLED.store(true, Ordering::Relaxed);
    Ok(handle)
}

fn describe_all() {
    describe_gauge!(BUILD_INFO, "Always 1; the version label names the running build.");
    describe_counter!(HTTP_REQUESTS, "HTTP requests by XRPC method (or \"other\") and status.");
    describe_histogram!(HTTP_DURATION, Unit::Seconds, "HTTP request latency by XRPC method.");
    describe_counter!(REPO_COMMITS, "Repository commits persisted.");
    describe_counter!(REPO_RECORDS_WRITTEN, "Records created, updated or deleted by commits.");
    describe_counter!(REPO_BLOCKS_WRITTEN, "Blocks (MST nodes, records, commits) written by commits.");
    describe_gauge!(BLOBS, "Stored blobs per tier.");
    describe_gauge!(BLOB_BYTES, Unit::Bytes, "Bytes of stored blobs per tier.");
    describe_gauge!(FIREHOSE_SUBSCRIBERS, "Connected subscribeRepos clients.");
    describe_gauge!(FIREHOSE_SUBSCRIBERS_BY_REMOTE, "Connected subscribeRepos clients per remote address.");
    describe_counter!(FIREHOSE_EVENTS, "Firehose events published.");
    describe_counter!(FIREHOSE_FRAMES_SENT, "Firehose frames sent to subscribers.");
    describe_counter!(FIREHOSE_BYTES_SENT, Unit::Bytes, "Firehose bytes sent to subscribers.");
    describe_counter!(FIREHOSE_SLOW_DISCONNECTS, "Subscribers disconnected for falling behind.");
    describe_counter!(RELAY_CRAWL_REQUESTS, "requestCrawl calls to relays, by result.");
    describe_gauge!(RELAY_LAST_CRAWL_SUCCESS, Unit::Seconds, "Unix time of the last accepted requestCrawl.");
    describe_counter!(PROXY_REQUESTS, "Requests proxied upstream, by upstream and status.");
    describe_histogram!(PROXY_DURATION, Unit::Seconds, "Latency of proxied requests by upstream.");
    describe_counter!(RATE_LIMITED, "Requests refused by a rate limit, by limit.");
    describe_histogram!(DB_QUERY_DURATION, Unit::Seconds, "Latency of hot database calls by operation.");
    describe_gauge!(SQLITE_FILE_BYTES, Unit::Bytes, "Size of roost.sqlite.");
    describe_gauge!(SQLITE_WAL_BYTES, Unit::Bytes, "Size of roost.sqlite-wal.");
    describe_gauge!(DATA_VOLUME_FREE, Unit::Bytes, "Free bytes on the data directory's volume.");
    describe_gauge!(DATA_VOLUME_SIZE, Unit::Bytes, "Size of the data directory's volume.");
    describe_gauge!(BACKUP_LAST_SUCCESS, Unit::Seconds, "Unix time of the last `roost backup` (0 = never).");
    let process = metrics_process::Collector::default();
    process.describe();

    gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    // Register the unlabelled series at zero so dashboards and alerts see them
    // before the first event instead of "no data".
    for name in [
        REPO_COMMITS,
        REPO_BLOCKS_WRITTEN,
        FIREHOSE_EVENTS,
        FIREHOSE_FRAMES_SENT,
        FIREHOSE_BYTES_SENT,
        FIREHOSE_SLOW_DISCONNECTS,
    ] {
        counter!(name).increment(0);
    }
    for action in ["create", "update", "delete"] {
        counter!(REPO_RECORDS_WRITTEN, "action" => action).increment(0);
    }
    counter!(RATE_LIMITED, "limit" => "login").increment(0);
    gauge!(FIREHOSE_SUBSCRIBERS).increment(0.0);
    gauge!(BACKUP_LAST_SUCCESS).increment(0.0);
}

/// The `/metrics` listener, bound at build time so a bad address fails the
/// start and `127.0.0.1:0` (tests) has a port before serving.
pub struct Listener {
    pub listener: tokio::net::TcpListener,
    pub handle: PrometheusHandle,
}

/// Installs the recorder and binds the listener, when `addr` is set.
pub async fn bind(addr: Option<std::net::SocketAddr>) -> anyhow::Result<Option<Listener>> {
    let Some(addr) = addr else { return Ok(None) };
    let handle = install()?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("binding the metrics listener (PDS_METRICS_LISTEN={addr}): {e}"))?;
    Ok(Some(Listener { listener, handle }))
}

/// Serves `GET /metrics` until `shutdown` resolves: Prometheus text format
/// 0.0.4, or OpenMetrics 1.0 with exemplars when the `Accept` header prefers it
/// (as Prometheus's does).
pub async fn serve(
    listener: tokio::net::TcpListener,
    handle: PrometheusHandle,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let process = Arc::new(metrics_process::Collector::default());
    let router = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move |headers: axum::http::HeaderMap| {
            let (handle, process) = (handle.clone(), process.clone());
            async move {
                // Process figures are read from /proc at scrape time: it is cheap,
                // and they are then as fresh as the scrape.
                process.collect();
                let accept = headers.get(axum::http::header::ACCEPT).and_then(|v| v.to_str().ok());
                exposition(accept, &handle.render(), &HTTP_EXEMPLARS)
            }
        }),
    );
    axum::serve(listener, router).with_graceful_shutdown(shutdown).await
}

/// The `/metrics` answer for a scraper's `Accept` header: `text` (the
/// recorder's rendering) as it is, or as OpenMetrics with `exemplars`.
pub fn exposition(accept: Option<&str>, text: &str, exemplars: &HttpExemplars) -> Response {
    use axum::response::IntoResponse as _;
    if openmetrics::wants_openmetrics(accept) {
        let snapshot = exemplars.snapshot();
        let body = openmetrics::to_openmetrics(text, |family, labels, le| match (family, labels) {
            (HTTP_DURATION, [("method", method)]) => snapshot.get(method)?[bucket_of_le(le)?],
            _ => None,
        });
        ([(axum::http::header::CONTENT_TYPE, openmetrics::OPENMETRICS_CONTENT_TYPE)], body).into_response()
    } else {
        ([(axum::http::header::CONTENT_TYPE, openmetrics::TEXT_CONTENT_TYPE)], text.to_owned())
            .into_response()
    }
}

/// One exemplar slot per HTTP latency bucket, and one for `+Inf`.
const HTTP_SLOTS: usize = HTTP_BUCKETS.len() + 1;
type ExemplarSlots = [Option<Exemplar>; HTTP_SLOTS];

/// The latest sampled trace per (method, bucket) of
/// `roost_http_request_duration_seconds`. Keys are the `&'static str` method
/// labels of [`route_label`] (router NSIDs or `other`), so the map is bounded
/// by the router table: at most a few hundred bytes per method.
#[derive(Default)]
pub struct HttpExemplars {
    series: Mutex<HashMap<&'static str, ExemplarSlots>>,
}

impl HttpExemplars {
    /// Keeps `trace_id` as the exemplar of the bucket `elapsed` falls into.
    /// One short lock and no allocation (after a method's first request).
    pub fn record(&self, method: &'static str, elapsed: Duration, trace_id: [u8; 16], at: SystemTime) {
        let value = elapsed.as_secs_f64();
        let slot = HTTP_BUCKETS.iter().position(|le| value <= *le).unwrap_or(HTTP_BUCKETS.len());
        let timestamp = at.duration_since(SystemTime::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        let mut series = self.series.lock().unwrap_or_else(|p| p.into_inner());
        series.entry(method).or_insert([None; HTTP_SLOTS])[slot] =
            Some(Exemplar { trace_id, value, timestamp });
    }

    /// A copy, so a scrape holds the lock only for a memcpy.
    fn snapshot(&self) -> HashMap<&'static str, ExemplarSlots> {
        self.series.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// The exemplar slot of a rendered `le` (bucket bounds print and parse back exactly).
fn bucket_of_le(le: f64) -> Option<usize> {
    if le == f64::INFINITY {
        return Some(HTTP_BUCKETS.len());
    }
    HTTP_BUCKETS.iter().position(|b| *b == le)
}

/// The `method` label for a request path: the NSID when it is one of the
/// router's methods, else `"other"`. Also says whether the path is under `/xrpc/`.
pub fn route_label(path: &str, known: &HashSet<&'static str>) -> (&'static str, bool) {
    match path.strip_prefix("/xrpc/") {
        Some(nsid) => (known.get(nsid).copied().unwrap_or("other"), true),
        None => ("other", false),
    }
}

/// The NSIDs of the router table, the only values the `method` label takes.
#[derive(Clone)]
pub struct KnownMethods(pub Arc<HashSet<&'static str>>);

/// Middleware: the request span (`xrpc <nsid>`), then
/// `roost_http_requests_total{method,status}` and the latency histogram.
pub async fn track_http(State(known): State<KnownMethods>, request: Request, next: Next) -> Response {
    let (method, is_xrpc) = route_label(request.uri().path(), &known.0);
    let (span, trace_id) = super::request_span(request.method(), method, is_xrpc, request.headers());
    let start = Instant::now();
    let response = next.run(request).instrument(span.clone()).await;
    let elapsed = start.elapsed();
    let status = response.status();
    span.record("http.response.status_code", status.as_u16());
    tracing::debug!(parent: &span, status = status.as_u16(), latency_ms = elapsed.as_millis() as u64, "response");
    counter!(HTTP_REQUESTS, "method" => method, "status" => status_label(status)).increment(1);
    histogram!(HTTP_DURATION, "method" => method).record(elapsed);
    if let Some(trace_id) = trace_id
        && INSTALLED.load(Ordering::Relaxed)
    {
        HTTP_EXEMPLARS.record(method, elapsed, trace_id, SystemTime::now());
    }
    response
}

fn status_label(status: StatusCode) -> String {
    status.as_str().to_owned()
}

/// Times one database call (or one whole write transaction) into
/// `roost_db_query_duration_seconds{op}`, and makes it a `sqlite <op>` span
/// in the traces (see [`super::db_span`]; nothing when traces are off). One
/// clock read on each side and a registry lookup: cheap next to SQLite.
pub async fn timed<T>(op: &'static str, fut: impl Future<Output = T>) -> T {
    let start = Instant::now();
    let out = fut.instrument(super::db_span(op)).await;
    histogram!(DB_QUERY_DURATION, "op" => op).record(start.elapsed());
    out
}

/// Counts one persisted commit.
pub fn record_commit(creates: u64, updates: u64, deletes: u64, blocks: u64) {
    counter!(REPO_COMMITS).increment(1);
    counter!(REPO_RECORDS_WRITTEN, "action" => "create").increment(creates);
    counter!(REPO_RECORDS_WRITTEN, "action" => "update").increment(updates);
    counter!(REPO_RECORDS_WRITTEN, "action" => "delete").increment(deletes);
    counter!(REPO_BLOCKS_WRITTEN).increment(blocks);
}

/// Counts a request refused by the rate limit named `limit` (a fixed name
/// such as `"login"`, never client input).
pub fn record_rate_limited(limit: &'static str) {
    counter!(RATE_LIMITED, "limit" => limit).increment(1);
}

/// Records one proxied request, for the proxy code to call when it lands.
/// `upstream` must come from configuration or a resolved service DID (a
/// bounded set), never from a raw request header; `status` is the upstream's
/// status, or 502 when it could not be reached.
pub fn record_proxy(upstream: &str, status: u16, elapsed: Duration) {
    counter!(PROXY_REQUESTS, "upstream" => upstream.to_owned(), "status" => status.to_string()).increment(1);
    histogram!(PROXY_DURATION, "upstream" => upstream.to_owned()).record(elapsed);
}

/// Records a successful `requestCrawl` to `relay`.
pub fn record_crawl_success(relay: &str) {
    gauge!(RELAY_LAST_CRAWL_SUCCESS, "relay" => relay.to_owned()).set(crate::db::now_unix() as f64);
}

/// What the periodic sampler looks at.
pub struct SampleSources {
    pub db: crate::db::Db,
    pub db_path: PathBuf,
    pub data_directory: PathBuf,
    pub handle: PrometheusHandle,
}

/// Refreshes the storage gauges every [`SAMPLE_INTERVAL`] (call [`sample`]
/// once first); runs until aborted.
pub async fn run_sampler(sources: SampleSources) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + SAMPLE_INTERVAL, SAMPLE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        sample(&sources).await;
        // Histograms keep raw samples until they are folded into buckets; without the
        // listener's built-in upkeep, do it here so an unscraped server stays bounded.
        sources.handle.run_upkeep();
    }
}

/// Refreshes the storage gauges once.
pub async fn sample(s: &SampleSources) {
    match s.db.blob_stats().await {
        Ok(stats) => {
            for tier in ["sqlite", "disk", "s3"] {
                let (count, bytes) =
                    stats.iter().find(|(t, _, _)| t == tier).map_or((0, 0), |(_, n, b)| (*n, *b));
                gauge!(BLOBS, "tier" => tier).set(count as f64);
                gauge!(BLOB_BYTES, "tier" => tier).set(bytes as f64);
            }
        }
        Err(e) => tracing::warn!(error = %e, "sampling blob statistics failed"),
    }
    gauge!(SQLITE_FILE_BYTES).set(file_len(&s.db_path) as f64);
    gauge!(SQLITE_WAL_BYTES).set(file_len(&wal_path(&s.db_path)) as f64);
    match nix::sys::statvfs::statvfs(&s.data_directory) {
        Ok(st) => {
            let unit = st.fragment_size() as f64;
            gauge!(DATA_VOLUME_FREE).set(st.blocks_available() as f64 * unit);
            gauge!(DATA_VOLUME_SIZE).set(st.blocks() as f64 * unit);
        }
        Err(e) => tracing::warn!(error = %e, "statvfs of the data directory failed"),
    }
    let last = crate::backup::last_backup(&s.data_directory).map_or(0, |b| b.finished_at);
    gauge!(BACKUP_LAST_SUCCESS).set(last as f64);
}

/// SQLite's write-ahead log beside `db_path`.
pub fn wal_path(db_path: &Path) -> PathBuf {
    let mut name = db_path.as_os_str().to_owned();
    name.push("-wal");
    PathBuf::from(name)
}

/// A missing file (no WAL after a clean shutdown) counts as empty.
fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

/// Middleware state for a router's methods.
pub fn known_methods(nsids: impl IntoIterator<Item = &'static str>) -> KnownMethods {
    KnownMethods(Arc::new(nsids.into_iter().collect()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::routing::get;
    use tower::ServiceExt as _;

    fn known() -> HashSet<&'static str> {
        ["com.atproto.server.describeServer", "com.atproto.repo.createRecord"].into_iter().collect()
    }

    #[test]
    fn metrics_route_label_keeps_only_router_nsids() {
        let k = known();
        assert_eq!(
            route_label("/xrpc/com.atproto.server.describeServer", &k),
            ("com.atproto.server.describeServer", true)
        );
        assert_eq!(route_label("/xrpc/com.example.made.up", &k), ("other", true));
        assert_eq!(route_label("/xrpc/com.atproto.server.describeServerX", &k), ("other", true));
        assert_eq!(route_label("/xrpc/_health", &k), ("other", true));
        assert_eq!(route_label("/xrpc/", &k), ("other", true));
        assert_eq!(route_label("/tls-check", &k), ("other", false));
        assert_eq!(route_label("/", &k), ("other", false));
    }

    /// Many distinct unknown NSIDs through the real middleware must collapse
    /// into one `method="other"` series.
    #[tokio::test]
    async fn metrics_unknown_nsids_do_not_grow_label_cardinality() {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let _guard = metrics::set_default_local_recorder(&recorder);
        let router = axum::Router::new()
            .route("/xrpc/com.atproto.server.describeServer", get(|| async { "ok" }))
            .route("/xrpc/{nsid}", axum::routing::any(|| async { StatusCode::NOT_IMPLEMENTED }))
            .layer(axum::middleware::from_fn_with_state(known_methods(known()), track_http));
        let mut paths = vec!["/xrpc/com.atproto.server.describeServer".to_string()];
        for i in 0..50 {
            paths.push(format!("/xrpc/com.example.random{i}.method"));
        }
        for path in paths {
            let req = Request::builder().uri(path).body(Body::empty()).expect("request");
            router.clone().oneshot(req).await.expect("response");
        }
        let text = handle.render();
        let series: Vec<&str> =
            text.lines().filter(|l| l.starts_with("roost_http_requests_total{")).collect();
        assert_eq!(series.len(), 2, "{text}");
        assert!(
            series.contains(&r#"roost_http_requests_total{method="other",status="501"} 50"#),
            "{series:?}"
        );
        assert!(
            series.contains(
                &r#"roost_http_requests_total{method="com.atproto.server.describeServer",status="200"} 1"#
            ),
            "{series:?}"
        );
        assert!(!text.contains("com.example"), "{text}");
        assert!(text.contains(r#"roost_http_request_duration_seconds_count{method="other"} 50"#), "{text}");
    }

    async fn body(response: Response) -> (String, String) {
        let ct = response.headers()[axum::http::header::CONTENT_TYPE].to_str().expect("ascii").to_owned();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await.expect("body");
        (ct, String::from_utf8(bytes.to_vec()).expect("utf-8"))
    }

    /// The text format by default, OpenMetrics with the latest exemplar per
    /// (method, bucket) when the scraper asks for it.
    #[tokio::test]
    async fn metrics_exposition_negotiates_openmetrics_with_exemplars() {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(HTTP_DURATION.into()), HTTP_BUCKETS)
            .expect("buckets")
            .build_recorder();
        let handle = recorder.handle();
        let _guard = metrics::set_default_local_recorder(&recorder);
        let exemplars = HttpExemplars::default();
        let at = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        for (method, ms, trace) in [
            ("com.atproto.repo.createRecord", 80, [1; 16]),
            // The latest in a bucket wins.
            ("com.atproto.repo.createRecord", 67, [2; 16]),
            ("com.atproto.repo.createRecord", 3, [3; 16]),
            ("other", 20_000, [4; 16]),
        ] {
            let elapsed = Duration::from_millis(ms);
            histogram!(HTTP_DURATION, "method" => method).record(elapsed);
            exemplars.record(method, elapsed, trace, at);
        }
        counter!(HTTP_REQUESTS, "method" => "other", "status" => "200").increment(1);
        let text = handle.render();

        for accept in [None, Some("*/*"), Some("text/plain;version=0.0.4")] {
            let (ct, got) = body(exposition(accept, &text, &exemplars)).await;
            assert_eq!(ct, "text/plain; version=0.0.4");
            assert_eq!(got, text, "{accept:?}: the text format is served as rendered");
        }
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;\
                          version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        let (ct, om) = body(exposition(Some(prometheus), &text, &exemplars)).await;
        assert_eq!(ct, "application/openmetrics-text; version=1.0.0; charset=utf-8");
        let line = |prefix: &str| {
            om.lines()
                .find(|l| l.starts_with(prefix))
                .unwrap_or_else(|| panic!("no {prefix} in\n{om}"))
                .to_owned()
        };
        let two = "02".repeat(16);
        assert_eq!(
            line(
                r#"roost_http_request_duration_seconds_bucket{method="com.atproto.repo.createRecord",le="0.1"}"#
            ),
            format!(
                r#"roost_http_request_duration_seconds_bucket{{method="com.atproto.repo.createRecord",le="0.1"}} 3 # {{trace_id="{two}"}} 0.067 1700000000.123"#
            )
        );
        assert!(
            line(r#"roost_http_request_duration_seconds_bucket{method="com.atproto.repo.createRecord",le="0.005"}"#)
                .ends_with(&format!(r#"1 # {{trace_id="{}"}} 0.003 1700000000.123"#, "03".repeat(16))),
            "{om}"
        );
        assert!(
            line(r#"roost_http_request_duration_seconds_bucket{method="other",le="+Inf"}"#)
                .ends_with(&format!(r#"1 # {{trace_id="{}"}} 20 1700000000.123"#, "04".repeat(16))),
            "{om}"
        );
        assert_eq!(om.matches(" # {").count(), 3, "{om}");
        assert!(om.contains("# TYPE roost_http_requests counter\n"), "{om}");
        assert!(om.contains("\nroost_http_requests_total{method=\"other\",status=\"200\"} 1\n"), "{om}");
        assert!(om.ends_with("\n# EOF\n") && !om.contains("\n\n"), "{om}");
    }
}
