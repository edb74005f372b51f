//! Signed repository commits (repository spec, version 3).
//!
//! A commit names the account, the MST root and a `rev` (a TID that strictly
//! increases). The signature covers the DAG-CBOR of the commit without `sig`.

use cid::Cid;
use serde::{Deserialize, Serialize};

use super::data::{cid_for_cbor, decode_cbor_serde, encode_cbor_serde};
use super::keys::{PublicKey, SigningKey};

pub const REPO_VERSION: u64 = 3;

// Fields in DAG-CBOR canonical order (length first, then bytewise).
#[derive(Serialize)]
struct UnsignedWire<'a> {
    did: &'a str,
    rev: &'a str,
    data: Cid,
    prev: Option<Cid>,
    version: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    pub did: String,
    pub rev: String,
    #[serde(with = "serde_bytes")]
    pub sig: Vec<u8>,
    pub data: Cid,
    /// Always null in version 3, but the field must be present.
    pub prev: Option<Cid>,
    pub version: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error("commit is not valid DAG-CBOR: {0}")]
    Decode(String),
    #[error("unsupported repo version {0}")]
    Version(u64),
    #[error("commit signature does not verify")]
    BadSignature,
    #[error("commit is for {found}, expected {expected}")]
    WrongDid { expected: String, found: String },
    #[error("encoding commit: {0}")]
    Encode(String),
}

/// A signed commit block, ready to store.
pub struct SignedCommit {
    pub cid: Cid,
    pub bytes: Vec<u8>,
    pub commit: Commit,
}

fn unsigned_bytes(did: &str, rev: &str, data: Cid) -> Result<Vec<u8>, CommitError> {
    encode_cbor_serde(&UnsignedWire { did, rev, data, prev: None, version: REPO_VERSION })
        .map_err(|e| CommitError::Encode(e.to_string()))
}

/// Builds and signs a version 3 commit.
pub fn sign(did: &str, rev: &str, data: Cid, key: &SigningKey) -> Result<SignedCommit, CommitError> {
    let sig = key.sign(&unsigned_bytes(did, rev, data)?).to_vec();
    let commit =
        Commit { did: did.to_owned(), rev: rev.to_owned(), sig, data, prev: None, version: REPO_VERSION };
    let bytes = encode_cbor_serde(&commit).map_err(|e| CommitError::Encode(e.to_string()))?;
    Ok(SignedCommit { cid: cid_for_cbor(&bytes), bytes, commit })
}

/// Decodes a commit block without checking its signature.
pub fn decode(bytes: &[u8]) -> Result<Commit, CommitError> {
    let commit: Commit = decode_cbor_serde(bytes).map_err(|e| CommitError::Decode(e.to_string()))?;
    if commit.version != REPO_VERSION {
        return Err(CommitError::Version(commit.version));
    }
    Ok(commit)
}

/// Decodes a commit and checks its DID and signature.
pub fn verify(bytes: &[u8], did: &str, key: &PublicKey) -> Result<Commit, CommitError> {
    let commit = decode(bytes)?;
    if commit.did != did {
        return Err(CommitError::WrongDid { expected: did.to_owned(), found: commit.did });
    }
    let unsigned = unsigned_bytes(&commit.did, &commit.rev, commit.data)?;
    key.verify(&unsigned, &commit.sig).map_err(|_| CommitError::BadSignature)?;
    Ok(commit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_then_verify_round_trips_and_detects_tampering() {
        let key = SigningKey::generate();
        let data = cid_for_cbor(b"\xa0");
        let signed = sign("did:plc:abc", "3l3qo2vuowo2b", data, &key).expect("sign");
        let commit = verify(&signed.bytes, "did:plc:abc", &key.public_key()).expect("verify");
        assert_eq!(commit, signed.commit);
        assert!(matches!(
            verify(&signed.bytes, "did:plc:other", &key.public_key()),
            Err(CommitError::WrongDid { .. })
        ));
        let other = SigningKey::generate();
        assert!(matches!(
            verify(&signed.bytes, "did:plc:abc", &other.public_key()),
            Err(CommitError::BadSignature)
        ));
    }
}
