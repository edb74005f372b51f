//! Observability: the tracing subscriber (logs, and OTLP traces when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set), the per-request span, and the
//! Prometheus metrics in [`metrics`].
//!
//! Traces are off by default and then cost nothing beyond the request span
//! the logs already had: no OpenTelemetry layer is installed and the span's
//! OpenTelemetry-only fields stay empty; the DB spans ([`db_span`]) and the
//! outbound HTTP spans ([`send`]) are not even created. This module owns no
//! business logic.

pub mod metrics;
pub mod openmetrics;

use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig as _;
use tracing::Instrument as _;
use tracing::Span;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// The target of the DB spans ([`db_span`]) and of the outbound HTTP spans
/// ([`send`]). They are DEBUG spans that only the OpenTelemetry layer's filter
/// enables, so they reach traces but not logs (whose `RUST_LOG` filter is INFO
/// by default). Nothing else logs under these targets: no module is named so.
pub const DB_TARGET: &str = "roost::db";
pub const OUTBOUND_TARGET: &str = "roost::outbound";

/// Whether spans are exported; read on every request, so a plain flag.
static OTEL_ON: AtomicBool = AtomicBool::new(false);

/// Keeps the trace exporter alive; flushes pending spans when dropped.
pub struct Telemetry {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Telemetry {
    pub fn traces_enabled(&self) -> bool {
        self.provider.is_some()
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(e) = provider.shutdown()
        {
            eprintln!("roost: flushing traces failed: {e}");
        }
    }
}

/// Installs the global subscriber: `RUST_LOG`-filtered logs on stdout, plus
/// OTLP trace export when `otlp` is true and `OTEL_EXPORTER_OTLP_ENDPOINT` is
/// set (only `roost serve` asks for it; one-shot commands have no requests to
/// trace). The exporter reads the standard `OTEL_EXPORTER_OTLP_*` variables
/// itself: it posts http/protobuf to `<endpoint>/v1/traces`, with any
/// `OTEL_EXPORTER_OTLP_HEADERS`.
pub fn init(otlp: bool) -> anyhow::Result<Telemetry> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER));
    let fmt =
        tracing_subscriber::fmt::layer().with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()));
    let endpoint = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok().filter(|e| !e.trim().is_empty());
    let provider = match endpoint {
        Some(_) if otlp => Some(tracer_provider()?),
        _ => None,
    };
    // Each layer has its own filter: quieting the logs with RUST_LOG=warn must not
    // silently stop the (INFO-level) request spans from being exported.
    let otel = provider.as_ref().map(|p| {
        let spans = traces_filter();
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("roost"))
            .with_tracked_inactivity(false)
            .with_filter(spans)
    });
    tracing_subscriber::registry().with(fmt.with_filter(filter)).with(otel).try_init()?;
    OTEL_ON.store(provider.is_some(), Ordering::Relaxed);
    if provider.is_some() {
        // Not the endpoint itself: a URL can carry credentials.
        tracing::info!("exporting traces over OTLP (OTEL_EXPORTER_OTLP_ENDPOINT)");
    }
    Ok(Telemetry { provider })
}

/// The log layer's filter when `RUST_LOG` is unset.
const DEFAULT_LOG_FILTER: &str = "info,sqlx=warn";

/// What the OTLP layer exports: INFO (the request and `apply_writes` spans)
/// and the DEBUG DB and outbound spans. The exporter's own HTTP stack stays
/// out of traces, which would otherwise feed themselves.
fn traces_filter() -> tracing_subscriber::filter::Targets {
    tracing_subscriber::filter::Targets::new()
        .with_default(tracing::Level::INFO)
        .with_target("sqlx", tracing::Level::WARN)
        .with_target("opentelemetry", tracing::Level::WARN)
        .with_target("opentelemetry_sdk", tracing::Level::WARN)
        .with_target("opentelemetry_otlp", tracing::Level::WARN)
        .with_target("reqwest", tracing::Level::WARN)
        .with_target("hyper", tracing::Level::WARN)
        .with_target("hyper_util", tracing::Level::WARN)
        .with_target("h2", tracing::Level::WARN)
        .with_target(DB_TARGET, tracing::Level::DEBUG)
        .with_target(OUTBOUND_TARGET, tracing::Level::DEBUG)
}

fn tracer_provider() -> anyhow::Result<opentelemetry_sdk::trace::SdkTracerProvider> {
    // The exporter's HTTP client is reqwest with rustls and no built-in crypto provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    // The blocking client, because the SDK's batch processor exports from its own
    // thread, outside the tokio runtime an async client would need.
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .build()?;
    let resource = opentelemetry_sdk::Resource::builder().with_service_name("roost").build();
    Ok(opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

/// Reads W3C `traceparent`/`tracestate` from request headers.
struct HeaderExtractor<'a>(&'a axum::http::HeaderMap);

impl opentelemetry::propagation::Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// The span of one HTTP request, named `xrpc <nsid>` in traces, and its
/// trace id when the span is exported (tracing on and the trace sampled), for
/// the latency exemplar. `nsid` is already bounded by the router table (see
/// [`metrics::route_label`]). With tracing on, a `traceparent` header (from
/// the reverse proxy, or a client tracing its own calls) makes the span part
/// of the caller's trace.
pub fn request_span(
    method: &axum::http::Method,
    nsid: &'static str,
    is_xrpc: bool,
    headers: &axum::http::HeaderMap,
) -> (Span, Option<[u8; 16]>) {
    let span = tracing::info_span!(
        "request",
        http.request.method = %method,
        rpc.method = %nsid,
        http.response.status_code = Empty,
        otel.name = Empty,
        otel.kind = Empty,
        trace_id = Empty,
    );
    if OTEL_ON.load(Ordering::Relaxed) {
        let name = if is_xrpc { format!("xrpc {nsid}") } else { format!("{method} {nsid}") };
        span.record("otel.name", name);
        span.record("otel.kind", "server");
        let parent =
            opentelemetry_sdk::propagation::TraceContextPropagator::new().extract(&HeaderExtractor(headers));
        if parent.span().span_context().is_valid() {
            let _ = span.set_parent(parent);
        }
        // Log lines inside the request then carry the trace id, to jump from a
        // log to its trace.
        let context = span.context();
        let otel_span = context.span();
        let span_context = otel_span.span_context();
        span.record("trace_id", tracing::field::display(span_context.trace_id()));
        // An unsampled trace is never exported: an exemplar would link to nothing.
        let exported = span_context.is_sampled().then(|| span_context.trace_id().to_bytes());
        return (span, exported);
    }
    (span, None)
}

/// The span of one SQLite call or transaction (`op` is a fixed name such as
/// `"record"` or `"commit"`), named `sqlite <op>` in traces with the
/// OpenTelemetry database attributes; its parent is the current span (the
/// request, or `apply_writes`).
///
/// Why this costs next to nothing with traces off: a DEBUG span under
/// [`DB_TARGET`] is then enabled by no layer (the only one is the log layer,
/// INFO by default), so the macro stops at the global max-level check (one
/// atomic load) or, when `RUST_LOG` enables DEBUG for some other target, at
/// the callsite's cached `Interest::never`; it returns `Span::none()` without
/// evaluating the fields (no `format!`) and `instrument` on it is a no-op.
/// With traces on, the OpenTelemetry layer's `Targets` enables it, and the
/// per-layer filter still keeps it out of the logs.
pub fn db_span(op: &'static str) -> Span {
    tracing::debug_span!(
        target: DB_TARGET,
        "db",
        otel.name = format!("sqlite {op}"),
        otel.kind = "client",
        db.system.name = "sqlite",
        db.operation.name = op,
    )
}

/// Sends an outbound HTTP request (PLC directory, AppView and other proxied
/// services, relays, DID documents, handles, lexicons) as a client span, named
/// `<METHOD> <host>` in traces with the OpenTelemetry HTTP client attributes.
/// With traces on, the request carries the span's W3C `traceparent`, so an
/// upstream that traces (e.g. the AppView) joins the trace.
///
/// The span ends when the response headers arrive: for a streamed body (the
/// proxy) the body is not covered. Only the span and the header are added:
/// the client's SSRF guards, timeouts and redirect policy are the builder's
/// and the client's, unchanged.
///
/// Not `reqwest-tracing`: it needs `reqwest-middleware`'s client type in
/// place of `reqwest::Client` everywhere, and supports neither
/// opentelemetry 0.33 nor tracing-opentelemetry 0.34 yet.
///
/// # Errors
///
/// The request's own errors (building it, connecting, timeouts).
pub async fn send(builder: reqwest::RequestBuilder) -> reqwest::Result<reqwest::Response> {
    let (client, request) = builder.build_split();
    let mut request = request?;
    let url = request.url();
    let host = url.host_str().unwrap_or_default();
    let span = tracing::debug_span!(
        target: OUTBOUND_TARGET,
        "outbound",
        otel.name = format!("{} {host}", request.method()),
        otel.kind = "client",
        otel.status_code = Empty,
        http.request.method = %request.method(),
        server.address = host,
        server.port = url.port_or_known_default(),
        url.full = redacted_url(url),
        http.response.status_code = Empty,
        error.type = Empty,
    );
    if !span.is_disabled() && OTEL_ON.load(Ordering::Relaxed) {
        inject_trace_context(&span.context(), request.headers_mut());
    }
    let result = client.execute(request).instrument(span.clone()).await;
    match &result {
        Ok(response) => {
            let status = response.status();
            span.record("http.response.status_code", status.as_u16());
            if status.is_client_error() || status.is_server_error() {
                span.record("error.type", status.as_str());
                span.record("otel.status_code", "error");
            }
        }
        Err(e) => {
            // A fixed class, not the message: it can hold the URL.
            span.record("error.type", error_type(e));
            span.record("otel.status_code", "error");
        }
    }
    result
}

/// `url` for `url.full`: no credentials, query or fragment (a query can carry
/// tokens; the path of an outbound call holds only DIDs, NSIDs and the like).
fn redacted_url(url: &reqwest::Url) -> String {
    let mut url = url.clone();
    let _ = url.set_username("");
    let _ = url.set_password(None);
    url.set_query(None);
    url.set_fragment(None);
    url.into()
}

fn error_type(e: &reqwest::Error) -> &'static str {
    if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect"
    } else if e.is_redirect() {
        "redirect"
    } else if e.is_body() || e.is_decode() {
        "body"
    } else {
        "_OTHER"
    }
}

/// Writes `context`'s W3C `traceparent` (and `tracestate`) into `headers`,
/// replacing any the caller had set; writes nothing for an invalid context.
fn inject_trace_context(context: &opentelemetry::Context, headers: &mut reqwest::header::HeaderMap) {
    opentelemetry_sdk::propagation::TraceContextPropagator::new()
        .inject_context(context, &mut HeaderInjector(headers));
}

struct HeaderInjector<'a>(&'a mut reqwest::header::HeaderMap);

impl opentelemetry::propagation::Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            reqwest::header::HeaderName::from_bytes(key.as_bytes()),
            reqwest::header::HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};

    use super::*;

    fn context(flags: TraceFlags) -> opentelemetry::Context {
        let trace = TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").expect("hex");
        let span = SpanId::from_hex("00f067aa0ba902b7").expect("hex");
        let sc = SpanContext::new(trace, span, flags, false, TraceState::default());
        opentelemetry::Context::new().with_remote_span_context(sc)
    }

    #[test]
    fn injects_traceparent_replacing_the_callers() {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(
            "traceparent",
            "00-11111111111111111111111111111111-2222222222222222-01".parse().expect("v"),
        );
        headers.insert("accept", "application/json".parse().expect("v"));
        inject_trace_context(&context(TraceFlags::SAMPLED), &mut headers);
        assert_eq!(headers["traceparent"], "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        assert_eq!(headers.get_all("traceparent").iter().count(), 1);
        assert_eq!(headers["accept"], "application/json");

        let mut headers = reqwest::header::HeaderMap::new();
        inject_trace_context(&context(TraceFlags::default()), &mut headers);
        assert_eq!(headers["traceparent"], "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00");
    }

    #[test]
    fn injects_nothing_without_a_trace() {
        let mut headers = reqwest::header::HeaderMap::new();
        inject_trace_context(&opentelemetry::Context::new(), &mut headers);
        assert!(headers.is_empty(), "{headers:?}");
    }

    #[test]
    fn url_full_has_no_credentials_query_or_fragment() {
        let check = |input: &str, expect: &str| {
            assert_eq!(redacted_url(&reqwest::Url::parse(input).expect("url")), expect, "{input}");
        };
        check(
            "https://user:secret@api.bsky.app:8443/xrpc/app.bsky.feed.getPosts?uris=at%3A%2F%2Fx#frag",
            "https://api.bsky.app:8443/xrpc/app.bsky.feed.getPosts",
        );
        check("https://plc.directory/did:plc:abc/log/last", "https://plc.directory/did:plc:abc/log/last");
        check("http://user@127.0.0.1:2582/x?token=abc", "http://127.0.0.1:2582/x");
    }

    #[test]
    fn db_and_outbound_spans_go_to_traces_only() {
        use tracing::Subscriber as _;
        use tracing_subscriber::filter::LevelFilter;
        let traces = traces_filter();
        for target in [DB_TARGET, OUTBOUND_TARGET] {
            assert!(traces.would_enable(target, &tracing::Level::DEBUG), "{target}");
        }
        assert!(!traces.would_enable("reqwest", &tracing::Level::INFO));
        let logs = || {
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::sink)
                .with_filter(tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER))
        };
        // Traces off: the log layer alone caps the max level at INFO, so the
        // DEBUG spans stop at the macro's level check.
        let off = tracing_subscriber::registry().with(logs());
        assert_eq!(off.max_level_hint(), Some(LevelFilter::INFO));
        tracing::subscriber::with_default(off, || {
            assert!(db_span("record").is_disabled());
        });
        // Traces on: enabled for the traces layer (and still filtered out of the logs).
        let on = tracing_subscriber::registry()
            .with(logs())
            .with(tracing_subscriber::layer::Identity::new().with_filter(traces_filter()));
        tracing::subscriber::with_default(on, || {
            assert!(!db_span("record").is_disabled());
        });
    }

    #[tokio::test]
    async fn send_without_traces_adds_no_header() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
            let (mut conn, _) = listener.accept().await.expect("accept");
            let mut buf = vec![0; 4096];
            let n = conn.read(&mut buf).await.expect("read");
            conn.write_all(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n").await.expect("write");
            String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase()
        });
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::new();
        let response = send(client.get(format!("http://{addr}/x?q=1"))).await.expect("send");
        assert_eq!(response.status(), 204);
        let request = server.await.expect("server");
        assert!(request.starts_with("get /x?q=1 "), "{request}");
        assert!(!request.contains("traceparent"), "{request}");
    }
}
