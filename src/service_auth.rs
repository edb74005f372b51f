//! Inter-service auth tokens: short JWTs signed with an account's repo key
//! that tell another service (AppView, chat, labeler) "this request comes
//! from this account, for this method".
//!
//! Built by hand rather than with jwt-simple: the repo key is our own
//! k256/p256 `SigningKey` (the one that signs commits), which already
//! produces the low-S compact signatures atproto requires, and the claims
//! must be exactly the reference's (no `nbf`, `lxm` only when set).

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::json;

use crate::atp::keys::SigningKey;

/// Lifetime when the caller does not ask for one (as the reference PDS).
pub const DEFAULT_LIFETIME_SECS: i64 = 60;

/// Mints a token; `exp` defaults to one minute from now.
pub fn mint(key: &SigningKey, iss: &str, aud: &str, lxm: Option<&str>, exp: Option<i64>) -> String {
    let iat = crate::db::now_unix();
    let header = json!({ "typ": "JWT", "alg": key.algorithm().jwt_alg() });
    let mut payload = json!({
        "iat": iat,
        "iss": iss,
        "aud": aud,
        "exp": exp.unwrap_or(iat + DEFAULT_LIFETIME_SECS),
        "jti": crate::auth::random_id(),
    });
    if let Some(lxm) = lxm {
        payload["lxm"] = json!(lxm);
    }
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(payload.to_string())
    );
    let signature = key.sign(signing_input.as_bytes());
    format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(signature))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::atp::keys::KeyAlgorithm;

    fn decode(part: &str) -> serde_json::Value {
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).expect("base64url")).expect("json")
    }

    #[test]
    fn token_verifies_with_the_public_key_and_carries_the_claims() {
        for alg in [KeyAlgorithm::K256, KeyAlgorithm::P256] {
            let key = SigningKey::generate_for(alg);
            let token = mint(
                &key,
                "did:plc:alice",
                "did:web:api.bsky.app#bsky_appview",
                Some("app.bsky.feed.getTimeline"),
                None,
            );
            let parts: Vec<&str> = token.split('.').collect();
            assert_eq!(parts.len(), 3);
            let header = decode(parts[0]);
            assert_eq!(header["alg"], alg.jwt_alg());
            let claims = decode(parts[1]);
            assert_eq!(claims["iss"], "did:plc:alice");
            assert_eq!(claims["aud"], "did:web:api.bsky.app#bsky_appview");
            assert_eq!(claims["lxm"], "app.bsky.feed.getTimeline");
            let iat = claims["iat"].as_i64().expect("iat");
            assert_eq!(claims["exp"].as_i64(), Some(iat + DEFAULT_LIFETIME_SECS));
            assert!(claims.get("nbf").is_none());
            let sig = URL_SAFE_NO_PAD.decode(parts[2]).expect("sig");
            let signed = format!("{}.{}", parts[0], parts[1]);
            key.public_key().verify(signed.as_bytes(), &sig).expect("signature verifies");
            // A different payload must not verify with the same signature.
            assert!(key.public_key().verify(b"other", &sig).is_err());
        }
    }

    #[test]
    fn lxm_is_omitted_when_unset_and_exp_is_honoured() {
        let key = SigningKey::generate();
        let token = mint(&key, "did:plc:a", "did:web:x", None, Some(42));
        let claims = decode(token.split('.').nth(1).expect("payload"));
        assert!(claims.get("lxm").is_none());
        assert_eq!(claims["exp"], 42);
    }
}
