//! HTTP surface: the XRPC router (`/xrpc/{nsid}`) and the few plain routes
//! (`/`, `/xrpc/_health`, `/.well-known/atproto-did`).
//!
//! The table in [`router`] is the index of the API: one line per method,
//! NSID first. Handlers are thin: parse, call a service, map errors.

mod blob;
pub mod error;
pub mod extract;
mod ops;
mod repo;
mod server;
mod subscribe;
mod sync;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::header::{CONTENT_TYPE, HOST};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::cors::{Any, CorsLayer};

use crate::app::AppState;
use error::XrpcError;

/// Largest body any route accepts before a handler sees it (handlers with
/// smaller limits enforce their own).
const MAX_BODY_BYTES: usize = 2 * 1024 * 1024;

pub fn router(state: AppState) -> Router {
    let xrpc: Vec<(&str, MethodRouter<AppState>)> = vec![
        ("com.atproto.server.describeServer", get(server::describe_server)),
        ("com.atproto.server.createSession", post(server::create_session)),
        ("com.atproto.server.getSession", get(server::get_session)),
        ("com.atproto.server.refreshSession", post(server::refresh_session)),
        ("com.atproto.server.deleteSession", post(server::delete_session)),
        ("com.atproto.identity.resolveHandle", get(sync::resolve_handle)),
        ("com.atproto.repo.createRecord", post(repo::create_record)),
        ("com.atproto.repo.putRecord", post(repo::put_record)),
        ("com.atproto.repo.deleteRecord", post(repo::delete_record)),
        ("com.atproto.repo.applyWrites", post(repo::apply_writes)),
        ("com.atproto.repo.getRecord", get(repo::get_record)),
        ("com.atproto.repo.listRecords", get(repo::list_records)),
        ("com.atproto.repo.describeRepo", get(repo::describe_repo)),
        ("com.atproto.sync.getRepo", get(sync::get_repo)),
        ("com.atproto.sync.getLatestCommit", get(sync::get_latest_commit)),
        ("com.atproto.sync.getRecord", get(sync::get_record)),
        ("com.atproto.sync.getBlocks", get(sync::get_blocks)),
        ("com.atproto.sync.getRepoStatus", get(sync::get_repo_status)),
        ("com.atproto.sync.listRepos", get(sync::list_repos)),
        ("com.atproto.sync.subscribeRepos", get(subscribe::subscribe_repos)),
        ("com.atproto.repo.uploadBlob", post(blob::upload_blob)),
        ("com.atproto.repo.listMissingBlobs", get(blob::list_missing_blobs)),
        ("com.atproto.sync.getBlob", get(blob::get_blob)),
        ("com.atproto.sync.listBlobs", get(blob::list_blobs)),
    ];
    let known = crate::telemetry::metrics::known_methods(xrpc.iter().map(|(nsid, _)| *nsid));
    let mut router = Router::new()
        .route("/", get(banner))
        .route("/tls-check", get(ops::tls_check))
        .route("/robots.txt", get(robots))
        .route("/xrpc/_health", get(health))
        .route("/.well-known/atproto-did", get(well_known_did));
    for (nsid, method_router) in xrpc {
        let expected = if nsid.contains(".get")
            || nsid.contains(".list")
            || nsid.contains(".describe")
            || nsid.contains(".resolve")
            || nsid.contains(".subscribe")
        {
            Method::GET
        } else {
            Method::POST
        };
        router = router.route(
            &format!("/xrpc/{nsid}"),
            method_router.fallback(move |method: Method| async move { wrong_method(method, expected) }),
        );
    }
    router
        .route("/xrpc/{nsid}", axum::routing::any(unknown_method))
        .fallback(not_found)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(CatchPanicLayer::custom(|_| {
            XrpcError::internal(anyhow::anyhow!("handler panicked")).into_response()
        }))
        // Browser clients (the Bluesky web app) call the PDS cross-origin with
        // bearer tokens, never cookies, so any origin may; as the reference PDS.
        .layer(
            CorsLayer::new()
                .allow_origin(Any)
                .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
                .allow_headers(Any)
                .expose_headers(Any)
                .max_age(std::time::Duration::from_secs(24 * 60 * 60)),
        )
        // Outermost, so the span and the latency cover everything above; one
        // span and one set of metrics per request, labelled by NSID.
        .layer(axum::middleware::from_fn_with_state(known, crate::telemetry::metrics::track_http))
        .with_state(state)
}

fn wrong_method(method: Method, expected: Method) -> XrpcError {
    XrpcError::invalid_request(format!("Incorrect HTTP method ({method}) expected {expected}"))
}

async fn unknown_method(Path(nsid): Path<String>) -> XrpcError {
    match crate::atp::syntax::Nsid::new(nsid.as_str()) {
        Ok(_) => XrpcError::not_implemented(&nsid),
        Err(_) => XrpcError::invalid_request(format!("Invalid XRPC method name: {nsid}")),
    }
}

async fn not_found() -> Response {
    (StatusCode::NOT_FOUND, "Not Found").into_response()
}

async fn banner() -> &'static str {
    concat!(
        "This is an AT Protocol Personal Data Server (PDS), run by Roost ",
        env!("CARGO_PKG_VERSION"),
        ".\n\nMost API routes are under /xrpc/\n"
    )
}

async fn robots() -> &'static str {
    "# Hello!\n\n# Crawling the public API is allowed\nUser-agent: *\nAllow: /\n"
}

/// Touches the database so a wedged server reports unhealthy.
async fn health(State(state): State<AppState>) -> Response {
    match state.db.ping().await {
        Ok(()) => axum::Json(serde_json::json!({ "version": env!("CARGO_PKG_VERSION") })).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "health check failed");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                axum::Json(serde_json::json!({ "version": env!("CARGO_PKG_VERSION"), "error": "Service Unavailable" })),
            )
                .into_response()
        }
    }
}

/// `/.well-known/atproto-did` for a handle hosted here, chosen by Host.
async fn well_known_did(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let host = headers.get(HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
    let host = host
        .rsplit_once(':')
        .map_or(host, |(h, port)| if port.chars().all(|c| c.is_ascii_digit()) { h } else { host });
    match state.db.account_by_handle(&host.to_ascii_lowercase()).await {
        Ok(Some(a)) if a.status == "active" => ([(CONTENT_TYPE, "text/plain")], a.did).into_response(),
        Ok(_) => (StatusCode::NOT_FOUND, "User not found").into_response(),
        Err(e) => XrpcError::from(e).into_response(),
    }
}
