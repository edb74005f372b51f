//! did:plc operations, DID documents and the key files.
//!
//! Keys live in `<data>/keys/` as hex files with mode 0600 and are parsed once
//! at start. The genesis operation is built and signed here; the DID is the
//! truncated base32 SHA-256 of the signed operation (PLC spec).

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use anyhow::Context as _;
use base64::Engine as _;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::atp::data::{encode_cbor, json_to_ipld};
use crate::atp::keys::{PublicKey, SigningKey};

/// Writes a secret file readable only by its owner. The file is created with
/// mode 0600 before any byte is written, then renamed into place.
pub fn write_secret_file(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

pub fn read_key_file(path: &Path) -> anyhow::Result<SigningKey> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    SigningKey::from_hex(text.trim()).with_context(|| format!("parsing key in {}", path.display()))
}

/// The name of an account's repo key file in the key directory.
pub fn repo_key_file_name(did: &str) -> String {
    format!("{}.repo.key", did.replace(':', "_"))
}

/// The signing keys of local accounts and the PLC rotation key.
pub struct KeyStore {
    dir: PathBuf,
    rotation: SigningKey,
    repo_keys: RwLock<HashMap<String, SigningKey>>,
}

impl KeyStore {
    /// Opens (creating if needed) the key directory; the rotation key comes
    /// from configuration or from `plc-rotation.key`.
    pub fn open(dir: PathBuf, rotation_hex: Option<&str>) -> anyhow::Result<KeyStore> {
        std::fs::create_dir_all(&dir)?;
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        }
        let rotation = match rotation_hex {
            Some(hex) => {
                SigningKey::from_hex(hex.trim()).context("PDS_PLC_ROTATION_KEY_K256_PRIVATE_KEY_HEX")?
            }
            None => {
                let path = dir.join("plc-rotation.key");
                if path.exists() {
                    read_key_file(&path)?
                } else {
                    let key = SigningKey::generate();
                    write_secret_file(&path, &key.to_hex())?;
                    key
                }
            }
        };
        Ok(KeyStore { dir, rotation, repo_keys: RwLock::new(HashMap::new()) })
    }

    pub fn rotation_key(&self) -> &SigningKey {
        &self.rotation
    }

    fn repo_key_path(&self, did: &str) -> PathBuf {
        self.dir.join(repo_key_file_name(did))
    }

    /// Stores a new account's repo key under its DID.
    pub fn save_repo_key(&self, did: &str, key: &SigningKey) -> anyhow::Result<()> {
        write_secret_file(&self.repo_key_path(did), &key.to_hex())?;
        self.repo_keys.write().unwrap_or_else(|p| p.into_inner()).insert(did.to_owned(), key.clone());
        Ok(())
    }

    /// Forgets a deleted account's key (a missing file is fine).
    pub fn remove_repo_key(&self, did: &str) -> anyhow::Result<()> {
        self.repo_keys.write().unwrap_or_else(|p| p.into_inner()).remove(did);
        match std::fs::remove_file(self.repo_key_path(did)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    /// The repo signing key of a local account (parsed once, then cached).
    pub fn repo_key(&self, did: &str) -> anyhow::Result<SigningKey> {
        if let Some(k) = self.repo_keys.read().unwrap_or_else(|p| p.into_inner()).get(did) {
            return Ok(k.clone());
        }
        let key = read_key_file(&self.repo_key_path(did))?;
        self.repo_keys.write().unwrap_or_else(|p| p.into_inner()).insert(did.to_owned(), key.clone());
        Ok(key)
    }
}

/// A signed did:plc genesis operation and the DID it defines.
pub struct GenesisOp {
    pub did: String,
    pub op: Value,
}

pub fn genesis_op(
    rotation: &SigningKey,
    repo_key: &PublicKey,
    handle: &str,
    endpoint: &str,
) -> anyhow::Result<GenesisOp> {
    let op = signed_plc_op(rotation, repo_key, handle, endpoint, None)?;
    let signed = encode_cbor(&json_to_ipld(&op)?)?;
    let hash = Sha256::digest(&signed);
    let b32 = base32_lower(&hash);
    Ok(GenesisOp { did: format!("did:plc:{}", &b32[..24]), op })
}

/// The next operation after `prev` (the signed op now at the head of the
/// DID's log): same keys and service, a new handle. Signed with the rotation key.
pub fn update_handle_op(
    rotation: &SigningKey,
    repo_key: &PublicKey,
    handle: &str,
    endpoint: &str,
    prev: &Value,
) -> anyhow::Result<Value> {
    let prev_cid = crate::atp::data::cid_for_cbor(&encode_cbor(&json_to_ipld(prev)?)?);
    signed_plc_op(rotation, repo_key, handle, endpoint, Some(prev_cid.to_string()))
}

fn signed_plc_op(
    rotation: &SigningKey,
    repo_key: &PublicKey,
    handle: &str,
    endpoint: &str,
    prev: Option<String>,
) -> anyhow::Result<Value> {
    let mut op = json!({
        "type": "plc_operation",
        "rotationKeys": [rotation.public_key().to_did_key()],
        "verificationMethods": { "atproto": repo_key.to_did_key() },
        "alsoKnownAs": [format!("at://{handle}")],
        "services": {
            "atproto_pds": { "type": "AtprotoPersonalDataServer", "endpoint": endpoint }
        },
        "prev": prev,
    });
    let unsigned = encode_cbor(&json_to_ipld(&op)?)?;
    let sig = rotation.sign(&unsigned);
    op["sig"] = Value::String(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sig));
    Ok(op)
}

/// RFC 4648 base32, lowercase, no padding (the PLC DID alphabet).
fn base32_lower(bytes: &[u8]) -> String {
    // multibase's base32 lower is exactly this encoding, prefixed with 'b'.
    let encoded = multibase::encode(multibase::Base::Base32Lower, bytes);
    encoded[1..].to_owned()
}

/// The DID document Roost describes for a local account (returned by
/// createSession and describeRepo; the PLC directory holds the real one).
pub fn did_document(did: &str, handle: &str, repo_key: &PublicKey, endpoint: &str) -> Value {
    json!({
        "@context": [
            "https://www.w3.org/ns/did/v1",
            "https://w3id.org/security/multikey/v1",
            "https://w3id.org/security/suites/secp256k1-2019/v1"
        ],
        "id": did,
        "alsoKnownAs": [format!("at://{handle}")],
        "verificationMethod": [{
            "id": format!("{did}#atproto"),
            "type": "Multikey",
            "controller": did,
            "publicKeyMultibase": repo_key.to_multibase(),
        }],
        "service": [{
            "id": "#atproto_pds",
            "type": "AtprotoPersonalDataServer",
            "serviceEndpoint": endpoint,
        }]
    })
}

/// Talks to the PLC directory.
pub struct PlcClient {
    http: reqwest::Client,
    base: String,
}

impl PlcClient {
    pub fn new(http: reqwest::Client, base: String) -> Self {
        PlcClient { http, base }
    }

    /// Submits an operation. A directory that already holds this DID with the
    /// same genesis (a resumed first start) counts as success.
    pub async fn submit(&self, did: &str, op: &Value) -> anyhow::Result<()> {
        let url = format!("{}/{}", self.base, did);
        let resp = crate::telemetry::send(self.http.post(&url).json(op))
            .await
            .with_context(|| format!("POST {url}"))?;
        if resp.status().is_success() {
            return Ok(());
        }
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        if self.has_did(did).await.unwrap_or(false) {
            tracing::info!(did, "PLC directory already has this DID; resuming");
            return Ok(());
        }
        anyhow::bail!(
            "PLC directory refused the operation ({status}): {}",
            body.chars().take(300).collect::<String>()
        )
    }

    /// The operation at the head of `did`'s log (`prev` for the next one).
    pub async fn last_op(&self, did: &str) -> anyhow::Result<Value> {
        let url = format!("{}/{}/log/last", self.base, did);
        let resp = crate::telemetry::send(self.http.get(&url)).await.with_context(|| format!("GET {url}"))?;
        if !resp.status().is_success() {
            anyhow::bail!("PLC directory has no log for {did} ({})", resp.status());
        }
        Ok(resp.json().await?)
    }

    pub async fn has_did(&self, did: &str) -> anyhow::Result<bool> {
        let resp = crate::telemetry::send(self.http.get(format!("{}/{}", self.base, did))).await?;
        Ok(resp.status().is_success())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn genesis_did_is_derived_from_the_signed_op() {
        let rotation = SigningKey::generate();
        let repo = SigningKey::generate();
        let g = genesis_op(&rotation, &repo.public_key(), "alice.test", "http://localhost:2583").expect("op");
        assert!(g.did.starts_with("did:plc:") && g.did.len() == 32, "{}", g.did);
        // The signature verifies over the op without `sig`.
        let mut unsigned = g.op.clone();
        let sig = unsigned.as_object_mut().and_then(|o| o.remove("sig")).expect("sig");
        let sig =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(sig.as_str().expect("str")).expect("b64");
        let bytes = encode_cbor(&json_to_ipld(&unsigned).expect("ipld")).expect("cbor");
        rotation.public_key().verify(&bytes, &sig).expect("signature verifies");
    }

    #[test]
    fn secret_files_are_owner_only() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("k.key");
        write_secret_file(&path, "abc").expect("write");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}
