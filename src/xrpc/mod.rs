//! HTTP surface: the XRPC router (`/xrpc/{nsid}`) and the few plain routes
//! (`/`, `/xrpc/_health`, `/.well-known/atproto-did`).
//!
//! The table in [`router`] is the index of the API: one line per method,
//! NSID first. Handlers are thin: parse, call a service, map errors.

mod account;
mod admin;
mod blob;
pub mod error;
pub mod extract;
mod forward;
mod ops;
mod repo;
mod server;
mod subscribe;
mod sync;

use axum::Router;
use axum::extract::State;
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
        ("com.atproto.server.createAppPassword", post(account::create_app_password)),
        ("com.atproto.server.listAppPasswords", get(account::list_app_passwords)),
        ("com.atproto.server.revokeAppPassword", post(account::revoke_app_password)),
        ("com.atproto.server.getServiceAuth", get(account::get_service_auth)),
        ("app.bsky.actor.getPreferences", get(account::get_preferences)),
        ("app.bsky.actor.putPreferences", post(account::put_preferences)),
        ("com.atproto.server.checkAccountStatus", get(account::check_account_status)),
        ("com.atproto.server.activateAccount", post(account::activate_account)),
        ("com.atproto.server.deactivateAccount", post(account::deactivate_account)),
        ("com.atproto.server.requestAccountDelete", post(account::request_account_delete)),
        ("com.atproto.server.deleteAccount", post(account::delete_account)),
        ("com.atproto.identity.updateHandle", post(account::update_handle)),
        ("com.atproto.server.createAccount", post(server::create_account)),
        ("com.atproto.server.createInviteCode", post(admin::create_invite_code)),
        ("com.atproto.server.createInviteCodes", post(admin::create_invite_codes)),
        ("com.atproto.server.getAccountInviteCodes", get(admin::get_account_invite_codes)),
        ("com.atproto.admin.getAccountInfos", get(admin::get_account_infos)),
        ("com.atproto.admin.updateAccountPassword", post(admin::update_account_password)),
        ("com.atproto.admin.updateAccountHandle", post(admin::update_account_handle)),
        ("com.atproto.admin.deleteAccount", post(admin::delete_account)),
        ("com.atproto.admin.updateSubjectStatus", post(admin::update_subject_status)),
        ("dev.roost.admin.createAccount", post(admin::create_account)),
    ];
    let known = crate::telemetry::metrics::known_methods(xrpc.iter().map(|(nsid, _)| *nsid));
    let mut router = Router::new()
        .route("/", get(banner))
        .route("/tls-check", get(ops::tls_check))
        .route("/robots.txt", get(robots))
        .route("/xrpc/_health", get(health))
        .route("/.well-known/atproto-did", get(well_known_did))
        .route("/.well-known/did.json", get(well_known_did_json));
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
        .route("/xrpc/{nsid}", axum::routing::any(forward::forward))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(state.clone(), limit_requests))
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

/// The per-IP request limit (the health check is exempt: monitors poll it).
async fn limit_requests(
    State(state): State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let peer =
        request.extensions().get::<axum::extract::ConnectInfo<std::net::SocketAddr>>().map(|c| c.0.ip());
    if let Some(peer) = peer
        && request.uri().path() != "/xrpc/_health"
    {
        let ip = crate::ratelimit::client_ip(peer, request.headers(), state.config.trusted_proxies);
        if let Err(e) = state.rate_limits.request(ip) {
            return XrpcError::from(e).into_response();
        }
    }
    next.run(request).await
}

fn wrong_method(method: Method, expected: Method) -> XrpcError {
    XrpcError::invalid_request(format!("Incorrect HTTP method ({method}) expected {expected}"))
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

/// `/.well-known/did.json`: the DID document of a `did:web` account whose
/// DID names this host (chosen by Host, as for atproto-did).
async fn well_known_did_json(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let did = format!("did:web:{}", request_host(&headers));
    match state.db.account_by_did(&did).await {
        Ok(Some(a)) if a.status != "pending" => match state.keys.repo_key(&a.did) {
            Ok(key) => axum::Json(crate::identity::did_document(
                &a.did,
                &a.handle,
                &key.public_key(),
                &state.config.public_url(),
            ))
            .into_response(),
            Err(e) => XrpcError::internal(e).into_response(),
        },
        Ok(_) => (StatusCode::NOT_FOUND, "Not Found").into_response(),
        Err(e) => XrpcError::from(e).into_response(),
    }
}

/// The Host header without a port, lower-cased.
fn request_host(headers: &HeaderMap) -> String {
    let host = headers.get(HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
    host.rsplit_once(':')
        .map_or(host, |(h, port)| if port.chars().all(|c| c.is_ascii_digit()) { h } else { host })
        .to_ascii_lowercase()
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
