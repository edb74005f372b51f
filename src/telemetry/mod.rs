//! Observability: the tracing subscriber (logs, and OTLP traces when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set), the per-request span, and the
//! Prometheus metrics in [`metrics`].
//!
//! Traces are off by default and then cost nothing beyond the request span
//! the logs already had: no OpenTelemetry layer is installed and the span's
//! OpenTelemetry-only fields stay empty. This module owns no business logic.

pub mod metrics;
pub mod openmetrics;

use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig as _;
use tracing::Span;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

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
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn"));
    let fmt =
        tracing_subscriber::fmt::layer().with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()));
    let endpoint = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok().filter(|e| !e.trim().is_empty());
    let provider = match endpoint {
        Some(_) if otlp => Some(tracer_provider()?),
        _ => None,
    };
    // Each layer has its own filter: quieting the logs with RUST_LOG=warn must not
    // silently stop the (INFO-level) request spans from being exported. The
    // exporter's own HTTP stack stays out of traces, which would otherwise feed
    // themselves.
    let otel = provider.as_ref().map(|p| {
        let spans = tracing_subscriber::filter::Targets::new()
            .with_default(tracing::Level::INFO)
            .with_target("sqlx", tracing::Level::WARN)
            .with_target("opentelemetry", tracing::Level::WARN)
            .with_target("opentelemetry_sdk", tracing::Level::WARN)
            .with_target("opentelemetry_otlp", tracing::Level::WARN)
            .with_target("reqwest", tracing::Level::WARN)
            .with_target("hyper", tracing::Level::WARN)
            .with_target("hyper_util", tracing::Level::WARN)
            .with_target("h2", tracing::Level::WARN);
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
