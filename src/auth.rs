//! Passwords and session tokens.
//!
//! Passwords are Argon2id hashes in PHC string form. Session tokens are HS256
//! JWTs shaped like the reference PDS's (`scope`, `aud` = the service DID,
//! `sub` = the account DID, 2 h access / 90 d refresh), so clients that
//! inspect them keep working. Access tokens also carry `sid`, the session
//! row they belong to: deleting the session revokes them at once, where the
//! reference PDS lets them live until expiry.

use std::collections::HashSet;
use std::time::Duration;

use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::{Argon2, PasswordHash};
use jwt_simple::prelude::*;
use rand::RngExt;

pub const SCOPE_ACCESS: &str = "com.atproto.access";
pub const SCOPE_REFRESH: &str = "com.atproto.refresh";
pub const SCOPE_APP_PASS: &str = "com.atproto.appPass";
pub const SCOPE_APP_PASS_PRIVILEGED: &str = "com.atproto.appPassPrivileged";

/// What a session may do: everything (the account password), or what an app
/// password allows (privileged ones may also use DMs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessScope {
    Full,
    AppPassPrivileged,
    AppPass,
}

impl AccessScope {
    /// From the scope stored on the session row (unknown scopes get the least).
    pub fn from_session_scope(scope: &str) -> AccessScope {
        match scope {
            SCOPE_ACCESS => AccessScope::Full,
            SCOPE_APP_PASS_PRIVILEGED => AccessScope::AppPassPrivileged,
            _ => AccessScope::AppPass,
        }
    }

    pub fn session_scope(self) -> &'static str {
        match self {
            AccessScope::Full => SCOPE_ACCESS,
            AccessScope::AppPassPrivileged => SCOPE_APP_PASS_PRIVILEGED,
            AccessScope::AppPass => SCOPE_APP_PASS,
        }
    }

    pub fn is_privileged(self) -> bool {
        self != AccessScope::AppPass
    }
}
pub const ACCESS_LIFETIME: Duration = Duration::from_secs(2 * 60 * 60);
pub const REFRESH_LIFETIME: Duration = Duration::from_secs(90 * 24 * 60 * 60);

pub fn hash_password(password: &str) -> anyhow::Result<String> {
    Argon2::default()
        .hash_password(password.as_bytes())
        .map(|h| h.to_string())
        .map_err(|e| anyhow::anyhow!("hashing password: {e}"))
}

/// An app password's hash: Argon2id salted with the account DID, so a login
/// finds the matching app password with one hash and one indexed lookup
/// (as the reference PDS does with scrypt) instead of one hash per password.
pub fn hash_app_password(did: &str, password: &str) -> anyhow::Result<String> {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(did.as_bytes());
    let mut out = [0u8; 32];
    Argon2::default()
        .hash_password_into(password.as_bytes(), &digest[..16], &mut out)
        .map_err(|e| anyhow::anyhow!("hashing app password: {e}"))?;
    Ok(hex::encode(out))
}

/// A new app password in the reference's shape: four groups of four.
pub fn generate_app_password() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut rng = rand::rng();
    (0..4)
        .map(|_| (0..4).map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char).collect::<String>())
        .collect::<Vec<_>>()
        .join("-")
}

/// Constant-time (inside argon2) password check.
pub fn verify_password(password: &str, hash: &str) -> bool {
    match PasswordHash::new(hash) {
        Ok(parsed) => Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok(),
        Err(_) => false,
    }
}

/// A random URL-safe identifier with 128 bits of entropy.
pub fn random_id() -> String {
    let bytes: [u8; 16] = rand::rng().random();
    hex::encode(bytes)
}

/// A short code for out-of-band confirmation (e.g. `abcde-23456`), as the
/// reference PDS's email tokens.
pub fn random_token() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut rng = rand::rng();
    let mut part =
        || (0..5).map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char).collect::<String>();
    format!("{}-{}", part(), part())
}

/// A random password for a generated account (printed once at creation).
pub fn random_password() -> String {
    const ALPHABET: &[u8] = b"abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    let mut rng = rand::rng();
    (0..24).map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char).collect()
}

#[derive(Serialize, Deserialize, Debug, Clone)]
struct SessionClaims {
    scope: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sid: Option<String>,
}

/// A verified token's contents.
#[derive(Debug, Clone)]
pub struct TokenInfo {
    pub did: String,
    pub scope: String,
    /// Session id (access tokens) or token id (refresh tokens).
    pub id: String,
    pub expires_at: i64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("Token has expired")]
    Expired,
    #[error("Token could not be verified")]
    Invalid,
    #[error("Bad token scope")]
    WrongScope,
}

pub struct TokenIssuer {
    key: HS256Key,
    service_did: String,
}

impl TokenIssuer {
    pub fn new(secret: &[u8], service_did: String) -> Self {
        TokenIssuer { key: HS256Key::from_bytes(secret), service_did }
    }

    fn sign(
        &self,
        did: &str,
        claims: SessionClaims,
        lifetime: Duration,
        jti: Option<&str>,
    ) -> anyhow::Result<String> {
        let mut c = Claims::with_custom_claims(claims, lifetime.into())
            .with_audience(&self.service_did)
            .with_subject(did);
        if let Some(jti) = jti {
            c = c.with_jwt_id(jti);
        }
        self.key.authenticate(c).map_err(|e| anyhow::anyhow!("signing JWT: {e}"))
    }

    /// An access token for a session; `scope` is the session's (`AccessScope::session_scope`).
    pub fn access_token(&self, did: &str, session_id: &str, scope: &str) -> anyhow::Result<String> {
        let claims = SessionClaims { scope: scope.into(), sid: Some(session_id.into()) };
        self.sign(did, claims, ACCESS_LIFETIME, None)
    }

    /// A refresh token whose `jti` is the `refresh_token` row id.
    pub fn refresh_token(&self, did: &str, token_id: &str, expires_at: i64) -> anyhow::Result<String> {
        let now = crate::db::now_unix();
        let lifetime = Duration::from_secs(u64::try_from(expires_at - now).unwrap_or(0).max(1));
        let claims = SessionClaims { scope: SCOPE_REFRESH.into(), sid: None };
        self.sign(did, claims, lifetime, Some(token_id))
    }

    fn verify(&self, token: &str) -> Result<(JWTClaims<SessionClaims>, i64), TokenError> {
        let options = VerificationOptions {
            allowed_audiences: Some(HashSet::from([self.service_did.clone()])),
            time_tolerance: Some(jwt_simple::prelude::Duration::from_secs(0)),
            ..Default::default()
        };
        let claims = self.key.verify_token::<SessionClaims>(token, Some(options)).map_err(|e| {
            match e.downcast_ref::<jwt_simple::JWTError>() {
                Some(jwt_simple::JWTError::TokenHasExpired) => TokenError::Expired,
                _ => TokenError::Invalid,
            }
        })?;
        let exp = claims.expires_at.map(|e| e.as_secs() as i64).ok_or(TokenError::Invalid)?;
        Ok((claims, exp))
    }

    pub fn verify_access(&self, token: &str) -> Result<TokenInfo, TokenError> {
        let (claims, expires_at) = self.verify(token)?;
        if ![SCOPE_ACCESS, SCOPE_APP_PASS, SCOPE_APP_PASS_PRIVILEGED].contains(&claims.custom.scope.as_str())
        {
            return Err(TokenError::WrongScope);
        }
        Ok(TokenInfo {
            did: claims.subject.ok_or(TokenError::Invalid)?,
            id: claims.custom.sid.ok_or(TokenError::Invalid)?,
            scope: claims.custom.scope,
            expires_at,
        })
    }

    pub fn verify_refresh(&self, token: &str) -> Result<TokenInfo, TokenError> {
        let (claims, expires_at) = self.verify(token)?;
        if claims.custom.scope != SCOPE_REFRESH {
            return Err(TokenError::WrongScope);
        }
        Ok(TokenInfo {
            did: claims.subject.ok_or(TokenError::Invalid)?,
            id: claims.jwt_id.ok_or(TokenError::Invalid)?,
            scope: claims.custom.scope,
            expires_at,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_hash_is_argon2id_and_verifies() {
        let hash = hash_password("correct horse").expect("hash");
        assert!(hash.starts_with("$argon2id$"), "{hash}");
        assert!(verify_password("correct horse", &hash));
        assert!(!verify_password("wrong horse", &hash));
        assert!(!verify_password("correct horse", "not a hash"));
    }

    #[test]
    fn tokens_check_scope_audience_and_signature() {
        let issuer = TokenIssuer::new(b"0123456789abcdef0123456789abcdef", "did:web:pds.test".into());
        let access = issuer.access_token("did:plc:abc", "sess1", SCOPE_ACCESS).expect("access");
        let info = issuer.verify_access(&access).expect("verify");
        assert_eq!((info.did.as_str(), info.id.as_str()), ("did:plc:abc", "sess1"));
        assert_eq!(issuer.verify_refresh(&access).unwrap_err(), TokenError::WrongScope);

        let refresh =
            issuer.refresh_token("did:plc:abc", "tok1", crate::db::now_unix() + 60).expect("refresh");
        assert_eq!(issuer.verify_refresh(&refresh).expect("verify").id, "tok1");
        assert_eq!(issuer.verify_access(&refresh).unwrap_err(), TokenError::WrongScope);

        let other_aud = TokenIssuer::new(b"0123456789abcdef0123456789abcdef", "did:web:other".into());
        assert_eq!(other_aud.verify_access(&access).unwrap_err(), TokenError::Invalid);
        let other_key = TokenIssuer::new(b"ffffffffffffffffffffffffffffffff", "did:web:pds.test".into());
        assert_eq!(other_key.verify_access(&access).unwrap_err(), TokenError::Invalid);
    }
}

/// Per-IP login throttle: a burst of 30, refilled at one attempt per ten
/// seconds (the reference PDS allows 30 per five minutes).
pub struct LoginLimiter(governor::DefaultKeyedRateLimiter<std::net::IpAddr>);

impl Default for LoginLimiter {
    fn default() -> Self {
        use governor::Quota;
        use std::num::NonZeroU32;
        let quota = Quota::with_period(Duration::from_secs(10))
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
            .allow_burst(NonZeroU32::new(30).unwrap_or(NonZeroU32::MIN));
        LoginLimiter(governor::RateLimiter::keyed(quota))
    }
}

impl LoginLimiter {
    pub fn check(&self, ip: std::net::IpAddr) -> Result<(), crate::xrpc::error::XrpcError> {
        self.0.check_key(&ip).map_err(|_| {
            crate::telemetry::metrics::record_rate_limited("login");
            crate::xrpc::error::XrpcError::rate_limited("Too many login attempts; try again later")
        })
    }
}
