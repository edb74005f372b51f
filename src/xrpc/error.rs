//! The one error type every XRPC handler returns, rendered as
//! `{"error": "...", "message": "..."}` with the status the reference PDS uses.

use std::borrow::Cow;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::auth::TokenError;
use crate::repo::RepoError;

#[derive(Debug)]
pub struct XrpcError {
    pub status: StatusCode,
    pub error: Cow<'static, str>,
    pub message: Cow<'static, str>,
    /// The cause of a 5xx, logged once and never sent to the client.
    pub source: Option<anyhow::Error>,
    /// Extra response headers (e.g. `RateLimit-*` on a 429); boxed to keep
    /// the error small on the happy path's `Result`s.
    pub headers: Option<Box<axum::http::HeaderMap>>,
}

impl XrpcError {
    pub fn new(status: StatusCode, error: &'static str, message: impl Into<Cow<'static, str>>) -> Self {
        XrpcError {
            status,
            error: Cow::Borrowed(error),
            message: message.into(),
            source: None,
            headers: None,
        }
    }

    pub fn invalid_request(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "InvalidRequest", message)
    }

    /// A 400 with a lexicon-specific error name (InvalidSwap, RecordNotFound, …).
    pub fn lexicon(error: &'static str, message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, error, message)
    }

    pub fn auth_required(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "AuthenticationRequired", message)
    }

    pub fn forbidden(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "Forbidden", message)
    }

    pub fn not_implemented(nsid: &str) -> Self {
        Self::new(
            StatusCode::NOT_IMPLEMENTED,
            "MethodNotImplemented",
            format!("Method not implemented: {nsid}"),
        )
    }

    pub fn payload_too_large(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "PayloadTooLarge", message)
    }

    /// Replaces the error name, keeping status and message.
    pub fn with_name(mut self, error: &'static str) -> Self {
        self.error = Cow::Borrowed(error);
        self
    }

    pub fn rate_limited(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::TOO_MANY_REQUESTS, "RateLimitExceeded", message)
    }

    pub fn internal(source: impl Into<anyhow::Error>) -> Self {
        XrpcError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            error: Cow::Borrowed("InternalServerError"),
            message: "Internal Server Error".into(),
            source: Some(source.into()),
            headers: None,
        }
    }
}

impl IntoResponse for XrpcError {
    fn into_response(self) -> Response {
        if let Some(source) = &self.source {
            tracing::error!(error = %source, chain = ?source, "internal error");
        }
        let body = serde_json::json!({ "error": self.error, "message": self.message });
        (self.status, self.headers.map(|h| *h).unwrap_or_default(), axum::Json(body)).into_response()
    }
}

impl From<crate::accounts::CreateAccountError> for XrpcError {
    fn from(e: crate::accounts::CreateAccountError) -> Self {
        use crate::accounts::CreateAccountError as E;
        let message = e.to_string();
        match e {
            E::InvalidHandle(_) => XrpcError::lexicon("InvalidHandle", message),
            E::HandleNotAvailable(_) => XrpcError::lexicon("HandleNotAvailable", message),
            E::InviteRequired | E::InvalidInviteCode => XrpcError::lexicon("InvalidInviteCode", message),
            E::EmailTaken => XrpcError::invalid_request(message),
            E::WeakPassword => XrpcError::lexicon("InvalidPassword", message),
            E::Internal(e) => XrpcError::internal(e),
        }
    }
}

impl From<crate::accounts::HandleError> for XrpcError {
    fn from(e: crate::accounts::HandleError) -> Self {
        use crate::accounts::HandleError as E;
        let message = e.to_string();
        match e {
            E::Invalid(_) => XrpcError::lexicon("InvalidHandle", message),
            E::Taken(_) => XrpcError::lexicon("HandleNotAvailable", message),
            E::UnsupportedDomain => XrpcError::lexicon("UnsupportedDomain", message),
            E::DidMismatch | E::NoAccount => XrpcError::invalid_request(message),
            E::Internal(e) => XrpcError::internal(e),
        }
    }
}

impl From<crate::ratelimit::Exceeded> for XrpcError {
    fn from(e: crate::ratelimit::Exceeded) -> Self {
        let mut error = XrpcError::rate_limited(format!("Rate Limit Exceeded ({})", e.name));
        error.headers = Some(Box::new(e.headers()));
        error
    }
}

impl From<sqlx::Error> for XrpcError {
    fn from(e: sqlx::Error) -> Self {
        XrpcError::internal(e)
    }
}

impl From<anyhow::Error> for XrpcError {
    fn from(e: anyhow::Error) -> Self {
        XrpcError::internal(e)
    }
}

impl From<RepoError> for XrpcError {
    fn from(e: RepoError) -> Self {
        match e {
            RepoError::InvalidSwap(m) => XrpcError::lexicon("InvalidSwap", m),
            RepoError::InvalidRequest(m) => XrpcError::invalid_request(m),
            RepoError::BlobNotFound(cid) => {
                XrpcError::lexicon("BlobNotFound", format!("Could not find blob: {cid}"))
            }
            RepoError::RepoNotFound(did) => {
                XrpcError::lexicon("RepoNotFound", format!("Could not find repo: {did}"))
            }
            RepoError::Internal(e) => XrpcError::internal(e),
        }
    }
}

impl From<TokenError> for XrpcError {
    fn from(e: TokenError) -> Self {
        match e {
            TokenError::Expired => XrpcError::lexicon("ExpiredToken", e.to_string()),
            TokenError::Invalid => XrpcError::lexicon("InvalidToken", e.to_string()),
            TokenError::WrongScope => XrpcError::lexicon("InvalidToken", e.to_string()),
        }
    }
}

pub type XrpcResult<T> = Result<T, XrpcError>;
