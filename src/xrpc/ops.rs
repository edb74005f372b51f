//! Routes for the deployment around Roost rather than for atproto clients.

use axum::extract::State;
use axum::http::StatusCode;
use serde::Deserialize;

use super::error::{XrpcError, XrpcResult};
use super::extract::XrpcQuery;
use crate::app::AppState;

#[derive(Deserialize)]
pub struct TlsCheckQuery {
    domain: String,
}

/// `GET /tls-check?domain=<host>`: Caddy's on-demand TLS `ask` endpoint.
/// 200 for this server's hostname and for the handle of any account that is
/// not deleted, 404 otherwise, so Caddy never requests certificates for names
/// someone merely pointed at this server.
pub async fn tls_check(
    State(state): State<AppState>,
    XrpcQuery(query): XrpcQuery<TlsCheckQuery>,
) -> XrpcResult<StatusCode> {
    let domain = query.domain.trim().trim_end_matches('.').to_ascii_lowercase();
    if domain.is_empty() {
        return Err(XrpcError::invalid_request("domain must not be empty"));
    }
    if domain == state.config.hostname {
        return Ok(StatusCode::OK);
    }
    match state.db.account_by_handle(&domain).await? {
        Some(account) if account.status != "deleted" => Ok(StatusCode::OK),
        _ => Err(XrpcError::new(StatusCode::NOT_FOUND, "NotFound", format!("{domain} is not served here"))),
    }
}
