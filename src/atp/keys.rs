//! Signing keys, public keys in their `did:key` / multikey string forms, and
//! ECDSA signature verification, as the atproto cryptography spec defines them
//! (<https://atproto.com/specs/cryptography>).
//!
//! This module owns every rule that makes a signature valid in atproto:
//! SHA-256 of the message, deterministic ECDSA (RFC 6979), 64-byte compact
//! `r || s`, and low-S only, on both `k256` (secp256k1) and `p256` (NIST P-256).
//! It must not do I/O, and the secret key bytes never leave it except through
//! the explicit [`SigningKey::to_bytes`] / [`SigningKey::to_hex`] exports.
//!
//! Public keys are validated curve points from the moment they exist: every
//! constructor of [`PublicKey`] decodes the point, so `verify` never meets a
//! malformed key.

use std::fmt;
use std::hash::{Hash, Hasher};

use k256::ecdsa::signature::hazmat::PrehashVerifier;
use k256::elliptic_curve::Generate;
use sha2::{Digest, Sha256};

/// The ASCII prefix that turns a multikey into a `did:key` identifier.
const DID_KEY_PREFIX: &str = "did:key:";

/// Multibase code for base58btc, the only base the spec allows for keys.
const BASE58BTC_PREFIX: char = 'z';

/// Varint-encoded multicodec `secp256k1-pub` (0xe7).
const K256_MULTICODEC: [u8; 2] = [0xe7, 0x01];

/// Varint-encoded multicodec `p256-pub` (0x1200).
const P256_MULTICODEC: [u8; 2] = [0x80, 0x24];

/// Length of a secret scalar on either curve.
pub const SECRET_KEY_LEN: usize = 32;

/// Length of a SEC1 compressed point on either curve.
pub const COMPRESSED_KEY_LEN: usize = 33;

/// Length of a compact `r || s` signature on either curve.
pub const SIGNATURE_LEN: usize = 64;

/// The two curves atproto supports. Implementations must handle both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyAlgorithm {
    /// secp256k1: the default for repo signing and PLC rotation keys.
    K256,
    /// NIST P-256 (secp256r1), common in hardware key stores.
    P256,
}

impl KeyAlgorithm {
    /// The JOSE `alg` name used in JWTs signed with this curve.
    #[must_use]
    pub fn jwt_alg(self) -> &'static str {
        match self {
            KeyAlgorithm::K256 => "ES256K",
            KeyAlgorithm::P256 => "ES256",
        }
    }

    /// The inverse of [`KeyAlgorithm::jwt_alg`]; `None` for any other `alg`
    /// (notably `none` and the HMAC algorithms, which must never select a key).
    #[must_use]
    pub fn from_jwt_alg(alg: &str) -> Option<Self> {
        match alg {
            "ES256K" => Some(KeyAlgorithm::K256),
            "ES256" => Some(KeyAlgorithm::P256),
            _ => None,
        }
    }

    /// The curve named by a legacy DID document verification method `type`
    /// (the ones whose `publicKeyMultibase` carries no multicodec prefix).
    #[must_use]
    pub fn from_legacy_verification_method(method_type: &str) -> Option<Self> {
        match method_type {
            "EcdsaSecp256k1VerificationKey2019" => Some(KeyAlgorithm::K256),
            "EcdsaSecp256r1VerificationKey2019" => Some(KeyAlgorithm::P256),
            _ => None,
        }
    }

    fn multicodec(self) -> [u8; 2] {
        match self {
            KeyAlgorithm::K256 => K256_MULTICODEC,
            KeyAlgorithm::P256 => P256_MULTICODEC,
        }
    }
}

impl fmt::Display for KeyAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The spec's own short names, so messages match the docs.
        f.write_str(match self {
            KeyAlgorithm::K256 => "k256",
            KeyAlgorithm::P256 => "p256",
        })
    }
}

/// Why a key could not be parsed or a signature did not verify.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// A secret key of the wrong size.
    #[error("secret key must be {SECRET_KEY_LEN} bytes, got {0}")]
    SecretKeyLength(usize),
    /// A secret key of the right size that is zero or not below the curve order.
    #[error("secret key is not a valid {0} scalar (zero or not below the curve order)")]
    InvalidSecretKey(KeyAlgorithm),
    /// A secret key given as hex that is not hex.
    #[error("secret key is not valid hex")]
    InvalidHex(#[source] hex::FromHexError),
    /// A string that should be a `did:key` lacks the prefix.
    #[error("not a did:key: expected the prefix \"did:key:\"")]
    NotDidKey,
    /// A multibase string in some base other than base58btc.
    #[error("key must be multibase base58btc (a leading 'z')")]
    NotBase58Btc,
    /// The base58btc payload does not decode.
    #[error("key is not valid base58btc")]
    InvalidBase58(#[source] multibase::Error),
    /// The multikey does not start with a multicodec this module supports.
    #[error("unsupported key type: multicodec prefix must be secp256k1-pub (0xe7) or p256-pub (0x1200)")]
    UnsupportedMulticodec,
    /// A multikey whose key part is not a 33-byte compressed point.
    #[error("{alg} multikey must hold a {COMPRESSED_KEY_LEN}-byte compressed point, got {len} bytes")]
    CompressedKeyLength {
        /// The curve the multicodec named.
        alg: KeyAlgorithm,
        /// How many key bytes followed the multicodec.
        len: usize,
    },
    /// Bytes that are not a valid SEC1 point on the curve.
    #[error("bytes are not a valid {0} public key point")]
    InvalidPublicKey(KeyAlgorithm),
    /// A signature that is not 64 bytes; this is what a DER signature looks like.
    #[error(
        "signature must be {SIGNATURE_LEN} bytes (compact r||s), got {0}; DER-encoded signatures are not accepted"
    )]
    SignatureLength(usize),
    /// A 64-byte signature whose `r` or `s` is zero or not below the curve order.
    #[error("signature is malformed: r or s is zero or not below the curve order")]
    MalformedSignature,
    /// A signature in the malleable high-S form, which atproto forbids.
    #[error("signature has a high S value; atproto accepts only low-S signatures")]
    HighS,
    /// A well-formed signature that does not match the key and message.
    #[error("signature does not match the message and public key")]
    BadSignature,
}

/// A private key that signs repo commits, PLC operations and service JWTs.
///
/// `secp256k1` by default (what atproto creates unless told otherwise); `p256`
/// on request. `Debug` shows only the public half.
#[derive(Clone)]
pub struct SigningKey(SigningInner);

#[derive(Clone)]
enum SigningInner {
    K256(k256::ecdsa::SigningKey),
    P256(p256::ecdsa::SigningKey),
}

impl SigningKey {
    /// A new secp256k1 key from the operating system's CSPRNG.
    ///
    /// # Panics
    /// Only if the OS random source fails, which a server cannot recover from.
    #[must_use]
    pub fn generate() -> Self {
        Self::generate_for(KeyAlgorithm::K256)
    }

    /// A new key on the given curve from the operating system's CSPRNG.
    ///
    /// # Panics
    /// Only if the OS random source fails, which a server cannot recover from.
    #[must_use]
    pub fn generate_for(alg: KeyAlgorithm) -> Self {
        match alg {
            KeyAlgorithm::K256 => Self(SigningInner::K256(k256::ecdsa::SigningKey::generate())),
            KeyAlgorithm::P256 => Self(SigningInner::P256(p256::ecdsa::SigningKey::generate())),
        }
    }

    /// A secp256k1 key from its 32-byte big-endian secret scalar.
    ///
    /// # Errors
    /// [`KeyError::SecretKeyLength`] unless exactly 32 bytes;
    /// [`KeyError::InvalidSecretKey`] if the scalar is zero or out of range.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, KeyError> {
        Self::from_bytes_for(KeyAlgorithm::K256, bytes)
    }

    /// A key on the given curve from its 32-byte big-endian secret scalar.
    ///
    /// # Errors
    /// As [`SigningKey::from_bytes`].
    pub fn from_bytes_for(alg: KeyAlgorithm, bytes: &[u8]) -> Result<Self, KeyError> {
        // Checked here because the curve crates' `from_slice` silently
        // left-pads slices of 24..32 bytes, which would accept a truncated key.
        let bytes: [u8; SECRET_KEY_LEN] =
            bytes.try_into().map_err(|_| KeyError::SecretKeyLength(bytes.len()))?;
        let inner = match alg {
            KeyAlgorithm::K256 => k256::ecdsa::SigningKey::from_bytes(&bytes.into())
                .map(SigningInner::K256)
                .map_err(|_| KeyError::InvalidSecretKey(alg))?,
            KeyAlgorithm::P256 => p256::ecdsa::SigningKey::from_bytes(&bytes.into())
                .map(SigningInner::P256)
                .map_err(|_| KeyError::InvalidSecretKey(alg))?,
        };
        Ok(Self(inner))
    }

    /// A secp256k1 key from 64 hex digits (either case), as PDS configs store it.
    ///
    /// # Errors
    /// [`KeyError::InvalidHex`] for non-hex input, otherwise as
    /// [`SigningKey::from_bytes`].
    pub fn from_hex(hex_str: &str) -> Result<Self, KeyError> {
        Self::from_hex_for(KeyAlgorithm::K256, hex_str)
    }

    /// A key on the given curve from 64 hex digits.
    ///
    /// # Errors
    /// As [`SigningKey::from_hex`].
    pub fn from_hex_for(alg: KeyAlgorithm, hex_str: &str) -> Result<Self, KeyError> {
        let bytes = hex::decode(hex_str).map_err(KeyError::InvalidHex)?;
        Self::from_bytes_for(alg, &bytes)
    }

    /// The 32-byte big-endian secret scalar. Handle with care.
    #[must_use]
    pub fn to_bytes(&self) -> [u8; SECRET_KEY_LEN] {
        match &self.0 {
            SigningInner::K256(sk) => sk.to_bytes().into(),
            SigningInner::P256(sk) => sk.to_bytes().into(),
        }
    }

    /// The secret scalar as 64 lowercase hex digits. Handle with care.
    #[must_use]
    pub fn to_hex(&self) -> String {
        hex::encode(self.to_bytes())
    }

    /// Which curve this key is on.
    #[must_use]
    pub fn algorithm(&self) -> KeyAlgorithm {
        match &self.0 {
            SigningInner::K256(_) => KeyAlgorithm::K256,
            SigningInner::P256(_) => KeyAlgorithm::P256,
        }
    }

    /// The matching public key.
    #[must_use]
    pub fn public_key(&self) -> PublicKey {
        match &self.0 {
            SigningInner::K256(sk) => PublicKey::from_k256(*sk.verifying_key()),
            SigningInner::P256(sk) => PublicKey::from_p256(*sk.verifying_key()),
        }
    }

    /// Signs `msg` the atproto way: SHA-256 of `msg`, deterministic ECDSA
    /// (RFC 6979), returned as compact `r || s`, always low-S.
    ///
    /// Deterministic signing means the same key and message always give the
    /// same bytes, which keeps commits reproducible and needs no RNG here.
    #[must_use]
    pub fn sign(&self, msg: &[u8]) -> [u8; SIGNATURE_LEN] {
        let prehash = Sha256::digest(msg);
        // `sign_prehash_recoverable` is the infallible RFC 6979 entry point
        // (it retries k internally); the recovery id is not part of atproto.
        // `normalize_s` is a no-op for k256, which already normalizes, but
        // p256 does not, and the spec requires low-S on both curves.
        match &self.0 {
            SigningInner::K256(sk) => sk.sign_prehash_recoverable(&prehash).0.normalize_s().to_bytes().into(),
            SigningInner::P256(sk) => sk.sign_prehash_recoverable(&prehash).0.normalize_s().to_bytes().into(),
        }
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The public key identifies the key in logs; the secret never appears.
        f.debug_struct("SigningKey")
            .field("public", &self.public_key().to_did_key())
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// A public key on one of the two atproto curves, always a valid point.
///
/// Equality and hashing use the curve and the compressed point, so the same
/// key parsed from `did:key`, multikey or uncompressed SEC1 compares equal.
#[derive(Clone)]
pub struct PublicKey {
    alg: KeyAlgorithm,
    compressed: [u8; COMPRESSED_KEY_LEN],
    // Kept decoded so `verify` does not decompress the point on every call.
    verifier: VerifyingInner,
}

#[derive(Clone)]
enum VerifyingInner {
    K256(k256::ecdsa::VerifyingKey),
    P256(p256::ecdsa::VerifyingKey),
}

impl PublicKey {
    fn from_k256(vk: k256::ecdsa::VerifyingKey) -> Self {
        let compressed: k256::CompressedPoint = (&vk).into();
        Self { alg: KeyAlgorithm::K256, compressed: compressed.into(), verifier: VerifyingInner::K256(vk) }
    }

    fn from_p256(vk: p256::ecdsa::VerifyingKey) -> Self {
        let compressed: p256::CompressedPoint = (&vk).into();
        Self { alg: KeyAlgorithm::P256, compressed: compressed.into(), verifier: VerifyingInner::P256(vk) }
    }

    /// A key from SEC1 bytes, compressed (33) or uncompressed (65); either is
    /// stored compressed, the form every atproto string encoding uses.
    ///
    /// # Errors
    /// [`KeyError::InvalidPublicKey`] if the bytes are not a point on `alg`.
    pub fn from_sec1_bytes(alg: KeyAlgorithm, bytes: &[u8]) -> Result<Self, KeyError> {
        match alg {
            KeyAlgorithm::K256 => k256::ecdsa::VerifyingKey::from_sec1_bytes(bytes)
                .map(Self::from_k256)
                .map_err(|_| KeyError::InvalidPublicKey(alg)),
            KeyAlgorithm::P256 => p256::ecdsa::VerifyingKey::from_sec1_bytes(bytes)
                .map(Self::from_p256)
                .map_err(|_| KeyError::InvalidPublicKey(alg)),
        }
    }

    /// Parses `did:key:z...`.
    ///
    /// # Errors
    /// [`KeyError::NotDidKey`] without the prefix, otherwise as
    /// [`PublicKey::from_multibase`].
    pub fn from_did_key(did: &str) -> Result<Self, KeyError> {
        let multikey = did.strip_prefix(DID_KEY_PREFIX).ok_or(KeyError::NotDidKey)?;
        Self::from_multibase(multikey)
    }

    /// Parses a multikey (`z` + base58btc of multicodec varint + compressed
    /// point), the `publicKeyMultibase` of a `Multikey` verification method.
    ///
    /// # Errors
    /// [`KeyError::NotBase58Btc`], [`KeyError::InvalidBase58`],
    /// [`KeyError::UnsupportedMulticodec`], [`KeyError::CompressedKeyLength`]
    /// or [`KeyError::InvalidPublicKey`], for each way the string can be wrong.
    pub fn from_multibase(multikey: &str) -> Result<Self, KeyError> {
        let bytes = decode_base58btc(multikey)?;
        let (alg, key) = if let Some(key) = bytes.strip_prefix(&K256_MULTICODEC) {
            (KeyAlgorithm::K256, key)
        } else if let Some(key) = bytes.strip_prefix(&P256_MULTICODEC) {
            (KeyAlgorithm::P256, key)
        } else {
            return Err(KeyError::UnsupportedMulticodec);
        };
        // The spec fixes the compressed form here; accepting uncompressed
        // would let one key have two did:key strings.
        if key.len() != COMPRESSED_KEY_LEN {
            return Err(KeyError::CompressedKeyLength { alg, len: key.len() });
        }
        Self::from_sec1_bytes(alg, key)
    }

    /// Parses the deprecated DID-document encoding: `z` + base58btc of the
    /// bare SEC1 point, with the curve given by the verification method type
    /// (see [`KeyAlgorithm::from_legacy_verification_method`]). Old documents
    /// used either point form, so both are accepted.
    ///
    /// # Errors
    /// [`KeyError::NotBase58Btc`], [`KeyError::InvalidBase58`] or
    /// [`KeyError::InvalidPublicKey`].
    pub fn from_legacy_multibase(alg: KeyAlgorithm, multibase: &str) -> Result<Self, KeyError> {
        let bytes = decode_base58btc(multibase)?;
        Self::from_sec1_bytes(alg, &bytes)
    }

    /// The multikey form: `z` + base58btc(multicodec varint || compressed point).
    #[must_use]
    pub fn to_multibase(&self) -> String {
        let mut bytes = Vec::with_capacity(2 + COMPRESSED_KEY_LEN);
        bytes.extend_from_slice(&self.alg.multicodec());
        bytes.extend_from_slice(&self.compressed);
        multibase::encode(multibase::Base::Base58Btc, bytes)
    }

    /// The `did:key:z...` form used in PLC operations and service auth.
    #[must_use]
    pub fn to_did_key(&self) -> String {
        format!("{DID_KEY_PREFIX}{}", self.to_multibase())
    }

    /// Which curve this key is on.
    #[must_use]
    pub fn algorithm(&self) -> KeyAlgorithm {
        self.alg
    }

    /// The 33-byte SEC1 compressed point.
    #[must_use]
    pub fn compressed_bytes(&self) -> &[u8; COMPRESSED_KEY_LEN] {
        &self.compressed
    }

    /// Verifies `sig` over `msg` with atproto's strict rules: SHA-256 of
    /// `msg`, 64-byte compact `r || s` only (no DER), and low-S only.
    ///
    /// # Errors
    /// [`KeyError::SignatureLength`] (which is how DER shows up),
    /// [`KeyError::MalformedSignature`], [`KeyError::HighS`] or
    /// [`KeyError::BadSignature`].
    pub fn verify(&self, msg: &[u8], sig: &[u8]) -> Result<(), KeyError> {
        if sig.len() != SIGNATURE_LEN {
            return Err(KeyError::SignatureLength(sig.len()));
        }
        let prehash = Sha256::digest(msg);
        // The high-S check is explicit for both curves: k256's verifier also
        // rejects high-S, but p256's accepts it, and the spec forbids it on both.
        match &self.verifier {
            VerifyingInner::K256(vk) => {
                let sig =
                    k256::ecdsa::Signature::from_slice(sig).map_err(|_| KeyError::MalformedSignature)?;
                if sig.normalize_s() != sig {
                    return Err(KeyError::HighS);
                }
                vk.verify_prehash(&prehash, &sig).map_err(|_| KeyError::BadSignature)
            }
            VerifyingInner::P256(vk) => {
                let sig =
                    p256::ecdsa::Signature::from_slice(sig).map_err(|_| KeyError::MalformedSignature)?;
                if sig.normalize_s() != sig {
                    return Err(KeyError::HighS);
                }
                vk.verify_prehash(&prehash, &sig).map_err(|_| KeyError::BadSignature)
            }
        }
    }
}

impl PartialEq for PublicKey {
    fn eq(&self, other: &Self) -> bool {
        self.alg == other.alg && self.compressed == other.compressed
    }
}

impl Eq for PublicKey {}

impl Hash for PublicKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.alg.hash(state);
        self.compressed.hash(state);
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_did_key())
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_did_key())
    }
}

/// Decodes `z` + base58btc, refusing every other multibase code: the spec
/// names base58btc only, and one key should have one string.
fn decode_base58btc(s: &str) -> Result<Vec<u8>, KeyError> {
    let payload = s.strip_prefix(BASE58BTC_PREFIX).ok_or(KeyError::NotBase58Btc)?;
    multibase::Base::Base58Btc.decode(payload).map_err(KeyError::InvalidBase58)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a broken fixture or key should fail the test loudly")]
mod tests {
    use super::*;

    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD_NO_PAD;
    use serde_json::Value;
    use std::path::{Path, PathBuf};

    fn fixture_path(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/interop/crypto").join(name)
    }

    fn read_cases(name: &str) -> Vec<Value> {
        let path = fixture_path(name);
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        let json: Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()));
        json.as_array().unwrap_or_else(|| panic!("{} is not a JSON array", path.display())).clone()
    }

    fn field<'a>(case: &'a Value, key: &str) -> Result<&'a str, String> {
        case[key].as_str().ok_or_else(|| format!("missing string field {key:?}"))
    }

    /// Panics with every failure at once, after checking cases were read.
    fn report(name: &str, count: usize, failures: &[String]) {
        assert!(count > 0, "{name}: read {count} cases, expected some");
        assert!(
            failures.is_empty(),
            "{name}: {} of {count} cases failed:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }

    /// One case of signature-fixtures.json: the key from both encodings, then
    /// the verdict on the signature.
    fn check_signature_case(case: &Value) -> Result<(), String> {
        let alg = KeyAlgorithm::from_jwt_alg(field(case, "algorithm")?).ok_or("unknown algorithm")?;
        let suite = field(case, "didDocSuite")?;
        if KeyAlgorithm::from_legacy_verification_method(suite) != Some(alg) {
            return Err(format!("didDocSuite {suite} does not name {alg}"));
        }
        let from_did = PublicKey::from_did_key(field(case, "publicKeyDid")?)
            .map_err(|e| format!("publicKeyDid: {e}"))?;
        // The fixture's publicKeyMultibase is the legacy encoding (no
        // multicodec; curve from didDocSuite).
        let from_mb = PublicKey::from_legacy_multibase(alg, field(case, "publicKeyMultibase")?)
            .map_err(|e| format!("publicKeyMultibase: {e}"))?;
        if from_did != from_mb {
            return Err(format!("keys differ: {from_did:?} vs {from_mb:?}"));
        }
        if from_did.algorithm() != alg {
            return Err(format!("did:key is {}, fixture says {alg}", from_did.algorithm()));
        }
        if from_did.to_did_key() != field(case, "publicKeyDid")? {
            return Err("did:key does not round-trip".into());
        }
        let msg = STANDARD_NO_PAD
            .decode(field(case, "messageBase64")?)
            .map_err(|e| format!("messageBase64: {e}"))?;
        let sig = STANDARD_NO_PAD
            .decode(field(case, "signatureBase64")?)
            .map_err(|e| format!("signatureBase64: {e}"))?;
        let expected = case["validSignature"].as_bool().ok_or("missing validSignature")?;
        let result = from_did.verify(&msg, &sig);
        if result.is_ok() != expected {
            return Err(format!("expected valid={expected}, got {result:?}"));
        }
        // A rejection must be for the reason the fixture is about, not by luck.
        let tags: Vec<&str> =
            case["tags"].as_array().map(|t| t.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
        match result {
            Err(KeyError::HighS) if tags.contains(&"high-s") => Ok(()),
            Err(KeyError::SignatureLength(_)) if tags.contains(&"der-encoded") => Ok(()),
            Err(e) => Err(format!("rejected for an unexpected reason: {e} (tags {tags:?})")),
            Ok(()) => Ok(()),
        }
    }

    #[test]
    fn signature_fixtures() {
        let cases = read_cases("signature-fixtures.json");
        let mut failures = Vec::new();
        for (i, case) in cases.iter().enumerate() {
            if let Err(e) = check_signature_case(case) {
                let comment = case["comment"].as_str().unwrap_or("?");
                failures.push(format!("  [{i}] {comment}: {e}"));
            }
        }
        report("signature-fixtures.json", cases.len(), &failures);
    }

    fn check_w3c_case(alg: KeyAlgorithm, secret: &[u8], expected_did: &str) -> Result<(), String> {
        let key = SigningKey::from_bytes_for(alg, secret).map_err(|e| e.to_string())?;
        let did = key.public_key().to_did_key();
        if did != expected_did {
            return Err(format!("derived {did}, expected {expected_did}"));
        }
        let parsed = PublicKey::from_did_key(expected_did).map_err(|e| e.to_string())?;
        if parsed != key.public_key() || parsed.to_did_key() != expected_did {
            return Err("did:key does not round-trip".into());
        }
        if parsed.algorithm() != alg {
            return Err(format!("parsed as {}", parsed.algorithm()));
        }
        Ok(())
    }

    #[test]
    fn w3c_didkey_k256() {
        let cases = read_cases("w3c_didkey_K256.json");
        let mut failures = Vec::new();
        for (i, case) in cases.iter().enumerate() {
            let result = field(case, "privateKeyBytesHex")
                .and_then(|h| hex::decode(h).map_err(|e| e.to_string()))
                .and_then(|secret| check_w3c_case(KeyAlgorithm::K256, &secret, field(case, "publicDidKey")?));
            if let Err(e) = result {
                failures.push(format!("  [{i}]: {e}"));
            }
        }
        report("w3c_didkey_K256.json", cases.len(), &failures);
    }

    #[test]
    fn w3c_didkey_p256() {
        let cases = read_cases("w3c_didkey_P256.json");
        let mut failures = Vec::new();
        for (i, case) in cases.iter().enumerate() {
            let result = field(case, "privateKeyBytesBase58")
                .and_then(|b| multibase::Base::Base58Btc.decode(b).map_err(|e| e.to_string()))
                .and_then(|secret| check_w3c_case(KeyAlgorithm::P256, &secret, field(case, "publicDidKey")?));
            if let Err(e) = result {
                failures.push(format!("  [{i}]: {e}"));
            }
        }
        report("w3c_didkey_P256.json", cases.len(), &failures);
    }

    /// How a table row says which error it expects.
    type ExpectErr = fn(&KeyError) -> bool;

    const ALGS: [KeyAlgorithm; 2] = [KeyAlgorithm::K256, KeyAlgorithm::P256];

    #[test]
    fn sign_verify_round_trip() {
        for alg in ALGS {
            let key = SigningKey::generate_for(alg);
            assert_eq!(key.algorithm(), alg);
            let public = key.public_key();
            let sig = key.sign(b"hello atproto");
            assert_eq!(public.verify(b"hello atproto", &sig).ok(), Some(()), "{alg}");
            // Deterministic (RFC 6979): same key and message, same bytes.
            assert_eq!(sig, key.sign(b"hello atproto"), "{alg}");
            // Verification through the string forms gives the same verdict.
            let reparsed = PublicKey::from_did_key(&public.to_did_key()).unwrap();
            assert_eq!(reparsed.verify(b"hello atproto", &sig).ok(), Some(()), "{alg}");
            assert!(
                matches!(public.verify(b"hello atproto!", &sig), Err(KeyError::BadSignature)),
                "{alg}: wrong message verified"
            );
            let other = SigningKey::generate_for(alg).public_key();
            assert!(other.verify(b"hello atproto", &sig).is_err(), "{alg}: wrong key verified");
        }
    }

    #[test]
    fn k256_is_the_default() {
        assert_eq!(SigningKey::generate().algorithm(), KeyAlgorithm::K256);
        let did = SigningKey::generate().public_key().to_did_key();
        assert!(did.starts_with("did:key:zQ3s"), "{did}");
        let did = SigningKey::generate_for(KeyAlgorithm::P256).public_key().to_did_key();
        assert!(did.starts_with("did:key:zDna"), "{did}");
    }

    /// s > n/2 exactly when s differs from its normalized form.
    fn is_high_s(alg: KeyAlgorithm, sig: &[u8; SIGNATURE_LEN]) -> bool {
        match alg {
            KeyAlgorithm::K256 => {
                let s = k256::ecdsa::Signature::from_slice(sig).unwrap();
                s.normalize_s() != s
            }
            KeyAlgorithm::P256 => {
                let s = p256::ecdsa::Signature::from_slice(sig).unwrap();
                s.normalize_s() != s
            }
        }
    }

    #[test]
    fn signatures_are_always_low_s() {
        // About half of raw ECDSA signatures are high-S, so 64 messages per
        // curve would miss a missing normalization with odds of 2^-64.
        for alg in ALGS {
            let key = SigningKey::generate_for(alg);
            for i in 0u32..64 {
                let msg = i.to_be_bytes();
                let sig = key.sign(&msg);
                assert!(!is_high_s(alg, &sig), "{alg}: message {i} signed high-S");
                assert_eq!(key.public_key().verify(&msg, &sig).ok(), Some(()));
            }
        }
    }

    /// Turns a low-S signature into its high-S twin (s -> n - s), which is
    /// valid plain ECDSA and must still be rejected.
    fn to_high_s(alg: KeyAlgorithm, sig: &[u8; SIGNATURE_LEN]) -> [u8; SIGNATURE_LEN] {
        let (r, s) = sig.split_at(32);
        let mut out = [0u8; SIGNATURE_LEN];
        out[..32].copy_from_slice(r);
        match alg {
            KeyAlgorithm::K256 => {
                let s = k256::NonZeroScalar::try_from(s).unwrap();
                out[32..].copy_from_slice(&(-s).to_bytes());
            }
            KeyAlgorithm::P256 => {
                let s = p256::NonZeroScalar::try_from(s).unwrap();
                out[32..].copy_from_slice(&(-s).to_bytes());
            }
        }
        out
    }

    #[test]
    fn high_s_twin_is_rejected() {
        for alg in ALGS {
            let key = SigningKey::generate_for(alg);
            let sig = key.sign(b"msg");
            let high = to_high_s(alg, &sig);
            assert!(is_high_s(alg, &high), "{alg}");
            assert!(
                matches!(key.public_key().verify(b"msg", &high), Err(KeyError::HighS)),
                "{alg}: high-S twin accepted"
            );
        }
    }

    #[test]
    fn any_flipped_bit_fails() {
        for alg in ALGS {
            let key = SigningKey::generate_for(alg);
            let public = key.public_key();
            let msg = b"flip me";
            let sig = key.sign(msg);
            for bit in 0..SIGNATURE_LEN * 8 {
                let mut bad = sig;
                bad[bit / 8] ^= 1 << (bit % 8);
                assert!(public.verify(msg, &bad).is_err(), "{alg}: sig bit {bit}");
            }
            for bit in 0..msg.len() * 8 {
                let mut bad = *msg;
                bad[bit / 8] ^= 1 << (bit % 8);
                assert!(public.verify(&bad, &sig).is_err(), "{alg}: msg bit {bit}");
            }
        }
    }

    #[test]
    fn malformed_signatures_are_rejected() {
        let key = SigningKey::generate();
        let public = key.public_key();
        let sig = key.sign(b"m");
        let table: [(&str, Vec<u8>, ExpectErr); 5] = [
            ("empty", vec![], |e| matches!(e, KeyError::SignatureLength(0))),
            ("63 bytes", sig[..63].to_vec(), |e| matches!(e, KeyError::SignatureLength(63))),
            ("65 bytes", [&sig[..], &[0]].concat(), |e| matches!(e, KeyError::SignatureLength(65))),
            ("zero r and s", vec![0; 64], |e| matches!(e, KeyError::MalformedSignature)),
            ("r and s >= n", vec![0xff; 64], |e| matches!(e, KeyError::MalformedSignature)),
        ];
        let mut failures = Vec::new();
        for (name, bad, expect) in &table {
            match public.verify(b"m", bad) {
                Err(e) if expect(&e) => {}
                other => failures.push(format!("  {name}: got {other:?}")),
            }
        }
        report("malformed signatures", table.len(), &failures);
    }

    #[test]
    fn hex_and_bytes_round_trip() {
        for alg in ALGS {
            let key = SigningKey::generate_for(alg);
            let hex_str = key.to_hex();
            assert_eq!(hex_str.len(), 64);
            let back = SigningKey::from_hex_for(alg, &hex_str).unwrap();
            assert_eq!(back.to_bytes(), key.to_bytes());
            assert_eq!(back.public_key(), key.public_key());
            let upper = SigningKey::from_hex_for(alg, &hex_str.to_uppercase()).unwrap();
            assert_eq!(upper.to_bytes(), key.to_bytes());
            let back = SigningKey::from_bytes_for(alg, &key.to_bytes()).unwrap();
            assert_eq!(back.public_key(), key.public_key());
        }
        // The K256 fixture's first key through the default (k256) constructors.
        let hex_str = "9085d2bef69286a6cbb51623c8fa258629945cd55ca705cc4e66700396894e0c";
        let key = SigningKey::from_hex(hex_str).unwrap();
        assert_eq!(key.to_hex(), hex_str);
        assert_eq!(
            key.public_key().to_did_key(),
            "did:key:zQ3shokFTS3brHcDQrn82RUDfCZESWL1ZdCEJwekUDPQiYBme"
        );
    }

    #[test]
    fn bad_secret_keys_are_rejected() {
        let k256_order = "fffffffffffffffffffffffffffffffebaaedce6af48a03bbfd25e8cd0364141";
        let p256_order = "ffffffff00000000ffffffffffffffffbce6faada7179e84f3b9cac2fc632551";
        let zero = "00".repeat(32);
        let short = "11".repeat(31);
        let table: [(&str, KeyAlgorithm, &str, ExpectErr); 6] = [
            ("zero", KeyAlgorithm::K256, &zero, |e| {
                matches!(e, KeyError::InvalidSecretKey(KeyAlgorithm::K256))
            }),
            ("k256 order", KeyAlgorithm::K256, k256_order, |e| matches!(e, KeyError::InvalidSecretKey(_))),
            ("p256 order", KeyAlgorithm::P256, p256_order, |e| matches!(e, KeyError::InvalidSecretKey(_))),
            // The curve crates would left-pad this; we must not.
            ("31 bytes", KeyAlgorithm::K256, &short, |e| matches!(e, KeyError::SecretKeyLength(31))),
            ("not hex", KeyAlgorithm::K256, "zz", |e| matches!(e, KeyError::InvalidHex(_))),
            ("odd length", KeyAlgorithm::K256, "abc", |e| matches!(e, KeyError::InvalidHex(_))),
        ];
        let mut failures = Vec::new();
        for (name, alg, input, expect) in &table {
            match SigningKey::from_hex_for(*alg, input) {
                Err(e) if expect(&e) => {}
                Err(e) => failures.push(format!("  {name}: wrong error {e:?}")),
                Ok(k) => failures.push(format!("  {name}: accepted as {k:?}")),
            }
        }
        report("bad secret keys", table.len(), &failures);
    }

    #[test]
    fn bad_public_key_strings_are_rejected() {
        let good = "did:key:zQ3shqwJEJyMBsBXCWyCBpUBMqxcon9oHB7mCvx4sSpMdLJwc";
        let k256_key = PublicKey::from_did_key(good).unwrap();
        // The same point behind an unknown multicodec (ed25519-pub, 0xed).
        let ed_prefixed = multibase::encode(
            multibase::Base::Base58Btc,
            [&[0xed, 0x01][..], k256_key.compressed_bytes()].concat(),
        );
        // The uncompressed point: valid SEC1, but not the spec's multikey form.
        let uncompressed = {
            let vk = k256::ecdsa::VerifyingKey::from_sec1_bytes(k256_key.compressed_bytes()).unwrap();
            let point = vk.to_sec1_point(false);
            multibase::encode(multibase::Base::Base58Btc, [&K256_MULTICODEC[..], point.as_bytes()].concat())
        };
        // An x coordinate with no point on the curve.
        let off_curve = multibase::encode(
            multibase::Base::Base58Btc,
            [&K256_MULTICODEC[..], &[0x02], &[0xff; 32][..]].concat(),
        );
        let table: [(&str, String, ExpectErr); 8] = [
            ("no prefix", good.trim_start_matches("did:key:").to_string(), |e| {
                matches!(e, KeyError::NotDidKey)
            }),
            ("did:web", "did:web:example.com".into(), |e| matches!(e, KeyError::NotDidKey)),
            ("base32 multibase", "did:key:bafkqaaa".into(), |e| matches!(e, KeyError::NotBase58Btc)),
            ("bad base58", "did:key:z0OIl".into(), |e| matches!(e, KeyError::InvalidBase58(_))),
            ("empty", "did:key:".into(), |e| matches!(e, KeyError::NotBase58Btc)),
            ("ed25519 multicodec", format!("did:key:{ed_prefixed}"), |e| {
                matches!(e, KeyError::UnsupportedMulticodec)
            }),
            ("uncompressed", format!("did:key:{uncompressed}"), |e| {
                matches!(e, KeyError::CompressedKeyLength { len: 65, .. })
            }),
            ("off curve", format!("did:key:{off_curve}"), |e| {
                matches!(e, KeyError::InvalidPublicKey(KeyAlgorithm::K256))
            }),
        ];
        let mut failures = Vec::new();
        for (name, input, expect) in &table {
            match PublicKey::from_did_key(input) {
                Err(e) if expect(&e) => {}
                Err(e) => failures.push(format!("  {name}: wrong error {e:?}")),
                Ok(k) => failures.push(format!("  {name}: accepted as {k:?}")),
            }
        }
        report("bad public keys", table.len(), &failures);
    }

    #[test]
    fn sec1_forms_give_one_key() {
        for alg in ALGS {
            let public = SigningKey::generate_for(alg).public_key();
            let uncompressed = match alg {
                KeyAlgorithm::K256 => k256::ecdsa::VerifyingKey::from_sec1_bytes(public.compressed_bytes())
                    .unwrap()
                    .to_sec1_point(false)
                    .as_bytes()
                    .to_vec(),
                KeyAlgorithm::P256 => p256::ecdsa::VerifyingKey::from_sec1_bytes(public.compressed_bytes())
                    .unwrap()
                    .to_sec1_point(false)
                    .as_bytes()
                    .to_vec(),
            };
            assert_eq!(uncompressed.len(), 65);
            let from_full = PublicKey::from_sec1_bytes(alg, &uncompressed).unwrap();
            assert_eq!(from_full, public);
            assert_eq!(from_full.compressed_bytes(), public.compressed_bytes());
            assert_eq!(PublicKey::from_multibase(&public.to_multibase()).unwrap(), public);
            // A point is not valid on the other curve in general; never mix them up.
            let other = if alg == KeyAlgorithm::K256 { KeyAlgorithm::P256 } else { KeyAlgorithm::K256 };
            if let Ok(k) = PublicKey::from_sec1_bytes(other, public.compressed_bytes()) {
                assert_ne!(k, public);
            }
        }
    }

    #[test]
    fn spec_examples_parse() {
        // The two examples in the cryptography spec's "Encoded Examples".
        let table = [
            ("zDnaembgSGUhZULN2Caob4HLJPaxBh92N7rtH21TErzqf8HQo", KeyAlgorithm::P256),
            ("zQ3shqwJEJyMBsBXCWyCBpUBMqxcon9oHB7mCvx4sSpMdLJwc", KeyAlgorithm::K256),
        ];
        for (multikey, alg) in table {
            let key = PublicKey::from_multibase(multikey).unwrap();
            assert_eq!(key.algorithm(), alg);
            assert_eq!(key.to_multibase(), multikey);
            assert_eq!(key.to_did_key(), format!("did:key:{multikey}"));
            assert_eq!(key.to_string(), key.to_did_key());
        }
    }

    #[test]
    fn debug_hides_the_secret() {
        for alg in ALGS {
            let key = SigningKey::generate_for(alg);
            let debug = format!("{key:?}");
            assert!(!debug.contains(&key.to_hex()), "{debug}");
            assert!(debug.contains("redacted"), "{debug}");
            assert!(debug.contains(&key.public_key().to_did_key()), "{debug}");
        }
    }

    #[test]
    fn jwt_alg_names() {
        for alg in ALGS {
            assert_eq!(KeyAlgorithm::from_jwt_alg(alg.jwt_alg()), Some(alg));
        }
        assert_eq!(KeyAlgorithm::K256.jwt_alg(), "ES256K");
        assert_eq!(KeyAlgorithm::P256.jwt_alg(), "ES256");
        assert_eq!(KeyAlgorithm::from_jwt_alg("none"), None);
        assert_eq!(KeyAlgorithm::from_jwt_alg("HS256"), None);
    }
}
