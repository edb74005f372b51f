//! Extractors whose rejections are XRPC errors: JSON bodies, query strings
//! and the session credentials.

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE};
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use super::error::XrpcError;
use crate::app::AppState;

/// A JSON request body, size-limited by the router's body limit.
pub struct XrpcJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for XrpcJson<T> {
    type Rejection = XrpcError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, XrpcError> {
        let is_json = req
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or("").trim().eq_ignore_ascii_case("application/json"))
            .unwrap_or(false);
        if !is_json {
            return Err(XrpcError::invalid_request(
                "Request encoding (Content-Type) must be application/json",
            ));
        }
        let limit = state.config.max_json_bytes;
        let body = axum::body::to_bytes(req.into_body(), limit).await.map_err(|e| {
            if std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>()) {
                XrpcError::payload_too_large(format!("Request body is larger than {limit} bytes"))
            } else {
                XrpcError::invalid_request(format!("Could not read request body: {e}"))
            }
        })?;
        serde_json::from_slice(&body)
            .map(XrpcJson)
            .map_err(|e| XrpcError::invalid_request(format!("Invalid request body: {e}")))
    }
}

/// Query parameters, parsed with serde; malformed ones are 400 InvalidRequest.
pub struct XrpcQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for XrpcQuery<T> {
    type Rejection = XrpcError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, XrpcError> {
        let query = parts.uri.query().unwrap_or("");
        serde_urlencoded::from_str(query)
            .map(XrpcQuery)
            .map_err(|e| XrpcError::invalid_request(format!("Invalid query parameters: {e}")))
    }
}

fn bearer(parts: &Parts) -> Result<&str, XrpcError> {
    let header = parts
        .headers
        .get(AUTHORIZATION)
        .ok_or_else(|| XrpcError::auth_required("Authentication Required"))?;
    let value = header.to_str().map_err(|_| XrpcError::auth_required("Malformed authorization header"))?;
    match value.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() => {
            Ok(token.trim())
        }
        _ => Err(XrpcError::auth_required("Unexpected authorization type")),
    }
}

/// A live session's access token.
pub struct Access {
    pub did: String,
    pub session_id: String,
    pub scope: crate::auth::AccessScope,
}

impl Access {
    /// Verifies the bearer token in `parts` against the session table.
    pub async fn verify(parts: &Parts, state: &AppState) -> Result<Access, XrpcError> {
        let info = state.tokens.verify_access(bearer(parts)?)?;
        // The session row is the revocation list: deleteSession ends access at once.
        match state.db.session(&info.id).await? {
            Some(s) if s.did == info.did => Ok(Access {
                did: info.did,
                session_id: info.id,
                scope: crate::auth::AccessScope::from_session_scope(&s.scope),
            }),
            _ => Err(XrpcError::lexicon("InvalidToken", "Token has been revoked")),
        }
    }

    /// Refuses app-password sessions: account management needs the real password.
    pub fn require_full(&self) -> Result<(), XrpcError> {
        if self.scope == crate::auth::AccessScope::Full {
            Ok(())
        } else {
            Err(XrpcError::lexicon("InvalidToken", "Bad token scope"))
        }
    }
}

impl FromRequestParts<AppState> for Access {
    type Rejection = XrpcError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, XrpcError> {
        Access::verify(parts, state).await
    }
}

/// A refresh token (verified signature and scope; rotation state is checked
/// by the handler).
pub struct Refresh {
    pub did: String,
    pub token_id: String,
}

impl FromRequestParts<AppState> for Refresh {
    type Rejection = XrpcError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, XrpcError> {
        let info = state.tokens.verify_refresh(bearer(parts)?)?;
        Ok(Refresh { did: info.did, token_id: info.id })
    }
}
