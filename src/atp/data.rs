//! The atproto data model (<https://atproto.com/specs/data-model>): values as
//! [`Ipld`], their two encodings (canonical DAG-CBOR and atproto JSON), and
//! CIDs.
//!
//! Every entry point validates against the data model, not just against
//! CBOR or JSON: no floats, integers within signed 64 bits, CIDv1 links,
//! `$type` a non-empty string, well-formed blob objects, and no map keys
//! `$link`/`$bytes` (those spell links and bytes in JSON, so a map holding
//! them could not round-trip). Both directions enforce the same rules, so
//! anything [`encode_cbor`] writes, [`decode_cbor_strict`] reads back, and
//! anything [`json_to_ipld`] accepts, [`encode_cbor`] encodes.

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine as _;
use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD_NO_PAD};
use cid::{Cid, Version};
use ipld_core::ipld::Ipld;
use multihash::Multihash;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use sha2::{Digest as _, Sha256};

/// Multicodec for DAG-CBOR: links to records, MST nodes and commits.
pub const DAG_CBOR: u64 = 0x71;
/// Multicodec for raw bytes: links to blobs.
pub const RAW: u64 = 0x55;
/// Multihash code for sha2-256, the only hash atproto writes.
pub const SHA2_256: u64 = 0x12;

/// Deepest nesting of lists and maps accepted anywhere. It is below the
/// recursion limit of `serde_ipld_dagcbor`'s decoder (so whatever we encode
/// we can decode) and it bounds the recursion of our own walks, which run on
/// small async-task stacks.
pub const MAX_DEPTH: usize = 100;

/// Largest integer-valued float accepted from JSON (2^53 - 1). Beyond it a
/// JSON literal such as `9007199254740993.0` no longer denotes one integer.
const MAX_SAFE_FLOAT_INT: f64 = 9_007_199_254_740_991.0;

/// `$bytes` input: standard alphabet, padding optional (the spec allows
/// both). Output uses [`STANDARD_NO_PAD`].
const BASE64_IN: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Why a value is not valid under the atproto data model, or could not be
/// encoded or decoded. `path` is a JSON-pointer-like location (`/` is the
/// root).
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: floats are not allowed in the atproto data model")]
    Float { path: String },
    #[error("{path}: integer {value} is outside the signed 64-bit range")]
    IntegerOutOfRange { path: String, value: String },
    #[error("{path}: invalid link: {reason}")]
    InvalidLink { path: String, reason: String },
    #[error("{path}: invalid $bytes: {reason}")]
    InvalidBytes { path: String, reason: String },
    #[error("{path}: $type must be a non-empty string")]
    InvalidType { path: String },
    #[error("{path}: invalid blob: {reason}")]
    InvalidBlob { path: String, reason: &'static str },
    #[error("{path}: map key {key:?} is reserved for the JSON encoding of links and bytes")]
    ReservedKey { path: String, key: String },
    #[error("{path}: nested deeper than {MAX_DEPTH} lists/maps")]
    TooDeep { path: String },
    #[error("not a record: {0}")]
    NotARecord(&'static str),
    #[error("invalid DAG-CBOR: {0}")]
    Cbor(String),
    #[error("DAG-CBOR is not in canonical form (re-encoding gives different bytes)")]
    NonCanonical,
    #[error("cannot encode DAG-CBOR: {0}")]
    Encode(String),
    #[error("value does not have the expected shape: {0}")]
    Shape(String),
}

/// A `{"$type": "blob", ref, mimeType, size}` reference found in a value.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BlobRef {
    pub cid: Cid,
    pub mime_type: String,
    pub size: u64,
}

// ---------------------------------------------------------------------------
// CIDs

fn sha256_multihash(bytes: &[u8]) -> Multihash<64> {
    digest_multihash(&Sha256::digest(bytes).into())
}

fn digest_multihash(digest: &[u8; 32]) -> Multihash<64> {
    match Multihash::<64>::wrap(SHA2_256, digest) {
        Ok(mh) => mh,
        // `wrap` only fails for digests longer than 64 bytes; sha2-256 gives 32.
        Err(_) => unreachable!("a 32-byte digest always fits a Multihash<64>"),
    }
}

/// CIDv1, dag-cbor, sha2-256 of already-encoded DAG-CBOR bytes.
pub fn cid_for_cbor(bytes: &[u8]) -> Cid {
    Cid::new_v1(DAG_CBOR, sha256_multihash(bytes))
}

/// CIDv1, raw, sha2-256 of blob bytes.
pub fn cid_for_raw(bytes: &[u8]) -> Cid {
    Cid::new_v1(RAW, sha256_multihash(bytes))
}

/// CIDv1, raw, from a SHA-256 digest computed elsewhere (streamed uploads).
pub fn cid_for_raw_digest(digest: &[u8; 32]) -> Cid {
    Cid::new_v1(RAW, digest_multihash(digest))
}

/// Parses a CID from its string form, accepting only CIDv1 in canonical
/// base32 (the blessed string encoding). Re-encoding must give back the
/// input: `Cid::from_str` alone would ignore trailing bytes after the
/// multihash and accept other bases or an `/ipfs/` prefix.
fn parse_cid(s: &str) -> Result<Cid, String> {
    let cid = Cid::try_from(s).map_err(|e| format!("{s:?} is not a CID ({e})"))?;
    if cid.version() != Version::V1 {
        return Err(format!("{s:?} is a CIDv0; only CIDv1 is allowed"));
    }
    if cid.to_string() != s {
        return Err(format!("{s:?} is not a canonical base32 CIDv1 string"));
    }
    Ok(cid)
}

// ---------------------------------------------------------------------------
// Paths for error messages

#[derive(Clone, Copy)]
enum Seg<'a> {
    Key(&'a str),
    Index(usize),
}

struct PathDisplay<'p, 'a>(&'p [Seg<'a>]);

impl fmt::Display for PathDisplay<'_, '_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("/");
        }
        for seg in self.0 {
            match seg {
                // JSON-pointer escaping so keys containing '/' stay unambiguous.
                Seg::Key(k) => write!(f, "/{}", k.replace('~', "~0").replace('/', "~1"))?,
                Seg::Index(i) => write!(f, "/{i}")?,
            }
        }
        Ok(())
    }
}

fn path_str(path: &[Seg<'_>]) -> String {
    PathDisplay(path).to_string()
}

// ---------------------------------------------------------------------------
// Validation shared by the JSON and CBOR paths

/// Checks a whole value against the data model.
///
/// # Errors
/// The first violation found, with its path.
pub fn validate(v: &Ipld) -> Result<(), DataError> {
    validate_at(v, &mut Vec::new())
}

fn validate_at<'a>(v: &'a Ipld, path: &mut Vec<Seg<'a>>) -> Result<(), DataError> {
    match v {
        Ipld::Null | Ipld::Bool(_) | Ipld::String(_) | Ipld::Bytes(_) => Ok(()),
        Ipld::Float(_) => Err(DataError::Float { path: path_str(path) }),
        Ipld::Integer(i) => check_integer(*i, path),
        Ipld::Link(cid) => check_link(cid, path),
        Ipld::List(items) => {
            check_depth(path)?;
            for (i, item) in items.iter().enumerate() {
                path.push(Seg::Index(i));
                validate_at(item, path)?;
                path.pop();
            }
            Ok(())
        }
        Ipld::Map(map) => {
            check_depth(path)?;
            for key in map.keys() {
                if key == "$link" || key == "$bytes" {
                    return Err(DataError::ReservedKey { path: path_str(path), key: key.clone() });
                }
            }
            check_map(map, path)?;
            for (k, item) in map {
                path.push(Seg::Key(k));
                validate_at(item, path)?;
                path.pop();
            }
            Ok(())
        }
    }
}

fn check_integer(i: i128, path: &[Seg<'_>]) -> Result<(), DataError> {
    if i64::try_from(i).is_err() {
        return Err(DataError::IntegerOutOfRange { path: path_str(path), value: i.to_string() });
    }
    Ok(())
}

fn check_link(cid: &Cid, path: &[Seg<'_>]) -> Result<(), DataError> {
    if cid.version() != Version::V1 {
        return Err(DataError::InvalidLink {
            path: path_str(path),
            reason: format!("{cid} is a CIDv0; only CIDv1 is allowed"),
        });
    }
    Ok(())
}

/// Called before descending into a container's children.
fn check_depth(path: &[Seg<'_>]) -> Result<(), DataError> {
    if path.len() >= MAX_DEPTH {
        return Err(DataError::TooDeep { path: path_str(path) });
    }
    Ok(())
}

/// Map-level rules: `$type` where present is a non-empty string, and a
/// `$type: "blob"` map has the blob shape. Other `$`-prefixed keys are left
/// alone: the spec says to ignore unknown `$` fields so the protocol can
/// grow.
fn check_map(map: &BTreeMap<String, Ipld>, path: &[Seg<'_>]) -> Result<(), DataError> {
    match map.get("$type") {
        None => Ok(()),
        Some(Ipld::String(t)) if t == "blob" => check_blob(map, path),
        Some(Ipld::String(t)) if !t.is_empty() => Ok(()),
        Some(_) => Err(DataError::InvalidType { path: path_str(path) }),
    }
}

fn check_blob(map: &BTreeMap<String, Ipld>, path: &[Seg<'_>]) -> Result<(), DataError> {
    let fail = |reason| Err(DataError::InvalidBlob { path: path_str(path), reason });
    if !matches!(map.get("ref"), Some(Ipld::Link(_))) {
        return fail("ref must be a link");
    }
    match map.get("mimeType") {
        Some(Ipld::String(m)) if !m.is_empty() => {}
        _ => return fail("mimeType must be a non-empty string"),
    }
    match map.get("size") {
        // The spec says "positive"; the reference implementation accepts 0
        // (empty files exist), so we do too.
        Some(Ipld::Integer(n)) if *n >= 0 && i64::try_from(*n).is_ok() => Ok(()),
        _ => fail("size must be a non-negative integer"),
    }
}

// ---------------------------------------------------------------------------
// JSON

/// Converts atproto JSON into a data-model value: `{"$link": cid}` becomes a
/// link, `{"$bytes": base64}` becomes bytes, integer-valued numbers become
/// integers.
///
/// # Errors
/// Floats, integers outside i64, malformed `$link`/`$bytes` objects
/// (including ones with extra keys), empty or non-string `$type`, malformed
/// blobs, nesting deeper than [`MAX_DEPTH`].
pub fn json_to_ipld(v: &Value) -> Result<Ipld, DataError> {
    json_at(v, &mut Vec::new())
}

fn json_at<'a>(v: &'a Value, path: &mut Vec<Seg<'a>>) -> Result<Ipld, DataError> {
    Ok(match v {
        Value::Null => Ipld::Null,
        Value::Bool(b) => Ipld::Bool(*b),
        Value::String(s) => Ipld::String(s.clone()),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Ipld::Integer(i.into())
            } else if let Some(u) = n.as_u64() {
                return Err(DataError::IntegerOutOfRange { path: path_str(path), value: u.to_string() });
            } else {
                // An integer written with a fraction or exponent (`123.0`,
                // `1e3`) is still an integer: JavaScript cannot tell them
                // apart, and the valid fixtures include `123.0`.
                let f = n.as_f64().unwrap_or(f64::NAN);
                if f.fract() == 0.0 && f.abs() <= MAX_SAFE_FLOAT_INT {
                    Ipld::Integer((f as i64).into())
                } else {
                    return Err(DataError::Float { path: path_str(path) });
                }
            }
        }
        Value::Array(items) => {
            check_depth(path)?;
            let mut out = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                path.push(Seg::Index(i));
                out.push(json_at(item, path)?);
                path.pop();
            }
            Ipld::List(out)
        }
        Value::Object(obj) => {
            if let Some(link) = obj.get("$link") {
                let fail =
                    |reason: &str| DataError::InvalidLink { path: path_str(path), reason: reason.to_owned() };
                if obj.len() != 1 {
                    return Err(fail("a $link object must have no other keys"));
                }
                let s = link.as_str().ok_or_else(|| fail("$link must be a string"))?;
                return parse_cid(s).map(Ipld::Link).map_err(|r| fail(&r));
            }
            if let Some(bytes) = obj.get("$bytes") {
                let fail = |reason: String| DataError::InvalidBytes { path: path_str(path), reason };
                if obj.len() != 1 {
                    return Err(fail("a $bytes object must have no other keys".into()));
                }
                let s = bytes.as_str().ok_or_else(|| fail("$bytes must be a string".into()))?;
                return BASE64_IN.decode(s).map(Ipld::Bytes).map_err(|e| fail(format!("not base64: {e}")));
            }
            check_depth(path)?;
            let mut map = BTreeMap::new();
            for (k, item) in obj {
                path.push(Seg::Key(k));
                let value = json_at(item, path)?;
                path.pop();
                map.insert(k.clone(), value);
            }
            check_map(&map, path)?;
            Ipld::Map(map)
        }
    })
}

/// Converts a data-model value to atproto JSON (links as `{"$link"}`, bytes
/// as unpadded `{"$bytes"}`). Total, so it assumes a valid value (as every
/// constructor in this module returns): a float becomes a JSON number (null
/// if not finite) and an integer beyond 64 bits a lossy float.
pub fn ipld_to_json(v: &Ipld) -> Value {
    match v {
        Ipld::Null => Value::Null,
        Ipld::Bool(b) => Value::Bool(*b),
        Ipld::Integer(i) => match (i64::try_from(*i), u64::try_from(*i)) {
            (Ok(n), _) => Value::from(n),
            (_, Ok(n)) => Value::from(n),
            _ => Value::from(*i as f64),
        },
        Ipld::Float(f) => serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number),
        Ipld::String(s) => Value::String(s.clone()),
        Ipld::Bytes(b) => single("$bytes", Value::String(STANDARD_NO_PAD.encode(b))),
        Ipld::Link(cid) => single("$link", Value::String(cid.to_string())),
        Ipld::List(items) => Value::Array(items.iter().map(ipld_to_json).collect()),
        Ipld::Map(map) => Value::Object(map.iter().map(|(k, v)| (k.clone(), ipld_to_json(v))).collect()),
    }
}

fn single(key: &str, v: Value) -> Value {
    let mut obj = serde_json::Map::new();
    obj.insert(key.to_owned(), v);
    Value::Object(obj)
}

/// [`json_to_ipld`] for a record: the top level must be an object with a
/// `$type` string. Whether `$type` names a real lexicon is the lexicon
/// layer's business.
///
/// # Errors
/// Anything [`json_to_ipld`] rejects, or a top level that is not an object
/// with `$type`.
pub fn record_from_json(v: &Value) -> Result<Ipld, DataError> {
    if !v.is_object() {
        return Err(DataError::NotARecord("the top level must be a JSON object"));
    }
    let ipld = json_to_ipld(v)?;
    match &ipld {
        Ipld::Map(map) if map.contains_key("$type") => Ok(ipld),
        // `{"$link": ..}` / `{"$bytes": ..}` at the top convert to non-maps.
        Ipld::Map(_) => Err(DataError::NotARecord("missing $type")),
        _ => Err(DataError::NotARecord("the top level must be a map, not a link or bytes")),
    }
}

// ---------------------------------------------------------------------------
// DAG-CBOR

/// Encodes a value as canonical DAG-CBOR (map keys sorted by length, then
/// bytes; minimal integer and length heads), after checking the data model.
///
/// # Errors
/// Any data-model violation (see [`validate`]).
pub fn encode_cbor(v: &Ipld) -> Result<Vec<u8>, DataError> {
    validate(v)?;
    serde_ipld_dagcbor::to_vec(v).map_err(|e| DataError::Encode(e.to_string()))
}

/// Decodes DAG-CBOR, accepting only the canonical encoding of a data-model
/// value.
///
/// Why so strict: a value has exactly one canonical DAG-CBOR encoding, and
/// its CID is the hash of those bytes. Accepting another encoding of the
/// same value would let two CIDs name one record and make re-encoding (for
/// example when we re-serve or re-sign it) change the CID. The decoder
/// already rejects unsorted or duplicate keys, non-minimal heads,
/// indefinite lengths, non-42 tags and trailing bytes; we then check the
/// data model (no floats, i64 integers, CIDv1 links, `$type`, blobs) and
/// finally re-encode and compare bytes, which catches whatever else slips
/// through (for example junk after the multihash inside a tag-42 CID).
///
/// # Errors
/// Malformed or non-canonical CBOR, or a data-model violation.
pub fn decode_cbor_strict(bytes: &[u8]) -> Result<Ipld, DataError> {
    let v: Ipld = serde_ipld_dagcbor::from_slice(bytes).map_err(|e| DataError::Cbor(e.to_string()))?;
    validate(&v)?;
    let canonical = serde_ipld_dagcbor::to_vec(&v).map_err(|e| DataError::Encode(e.to_string()))?;
    if canonical != bytes {
        return Err(DataError::NonCanonical);
    }
    Ok(v)
}

/// Encodes a typed struct (MST node, commit) as canonical DAG-CBOR. It goes
/// through [`Ipld`] so the same data-model checks apply as for
/// [`encode_cbor`]. Use `#[serde(with = "serde_bytes")]` for byte fields,
/// or they encode as lists of integers.
///
/// # Errors
/// A value serde cannot represent, or a data-model violation.
pub fn encode_cbor_serde<T: Serialize + ?Sized>(v: &T) -> Result<Vec<u8>, DataError> {
    let ipld = ipld_core::serde::to_ipld(v).map_err(|e| DataError::Encode(e.to_string()))?;
    encode_cbor(&ipld)
}

/// Decodes a typed struct with the full strictness of
/// [`decode_cbor_strict`].
///
/// # Errors
/// Anything [`decode_cbor_strict`] rejects, or bytes of the wrong shape for
/// `T`.
pub fn decode_cbor_serde<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, DataError> {
    let ipld = decode_cbor_strict(bytes)?;
    ipld_core::serde::from_ipld(ipld).map_err(|e| DataError::Shape(e.to_string()))
}

// ---------------------------------------------------------------------------
// Blobs

/// Every well-formed `{"$type": "blob", ref, mimeType, size}` in `v`, in
/// document order (map keys sorted). Legacy `{cid, mimeType}` blobs are not
/// reported: we never write them and they cannot be recognised without the
/// lexicon.
pub fn blob_refs(v: &Ipld) -> Vec<BlobRef> {
    let mut out = Vec::new();
    // An explicit stack rather than recursion: values may come from callers
    // that built them without the depth limit.
    let mut stack = vec![v];
    while let Some(v) = stack.pop() {
        match v {
            Ipld::List(items) => stack.extend(items.iter().rev()),
            Ipld::Map(map) => {
                if let Some(blob) = as_blob(map) {
                    out.push(blob);
                } else {
                    stack.extend(map.values().rev());
                }
            }
            _ => {}
        }
    }
    out
}

fn as_blob(map: &BTreeMap<String, Ipld>) -> Option<BlobRef> {
    match (map.get("$type"), map.get("ref"), map.get("mimeType"), map.get("size")) {
        (
            Some(Ipld::String(t)),
            Some(Ipld::Link(cid)),
            Some(Ipld::String(mime)),
            Some(Ipld::Integer(size)),
        ) if t == "blob" && !mime.is_empty() => {
            Some(BlobRef { cid: *cid, mime_type: mime.clone(), size: u64::try_from(*size).ok()? })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};

    fn fixture(rel: &str) -> (PathBuf, Value) {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared").join(rel);
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()));
        (path, v)
    }

    fn cases(v: &Value) -> &Vec<Value> {
        v.as_array().expect("fixture file is a JSON array")
    }

    fn b64(s: &str) -> Vec<u8> {
        BASE64_IN.decode(s).expect("fixture base64")
    }

    fn report(name: &Path, total: usize, failures: &[String]) {
        assert!(total > 0, "{}: found {total} cases, expected some", name.display());
        eprintln!("{}: {total} cases", name.display());
        assert!(
            failures.is_empty(),
            "{}: {} of {total} cases failed:\n{}",
            name.display(),
            failures.len(),
            failures.join("\n")
        );
    }

    /// What the upstream fixture runner checks: strict conversion, and the
    /// top level must be an object.
    fn parse_fixture(json: &Value) -> Result<Ipld, DataError> {
        let ipld = json_to_ipld(json)?;
        match ipld {
            Ipld::Map(_) => Ok(ipld),
            _ => Err(DataError::NotARecord("the top level must be an object")),
        }
    }

    #[test]
    fn data_model_fixtures() {
        let (path, v) = fixture("interop/data-model/data-model-fixtures.json");
        let mut failures = Vec::new();
        for (i, case) in cases(&v).iter().enumerate() {
            let json = &case["json"];
            let want_cbor = b64(case["cbor_base64"].as_str().expect("cbor_base64"));
            let want_cid = case["cid"].as_str().expect("cid");
            let mut fail = |what: String| failures.push(format!("case {i}: {what}"));
            match json_to_ipld(json).and_then(|ipld| encode_cbor(&ipld)) {
                Ok(cbor) if cbor == want_cbor => {}
                Ok(cbor) => fail(format!("cbor mismatch: got {}", STANDARD_NO_PAD.encode(cbor))),
                Err(e) => fail(format!("json -> cbor failed: {e}")),
            }
            let cid = cid_for_cbor(&want_cbor).to_string();
            if cid != want_cid {
                fail(format!("cid {cid} != {want_cid}"));
            }
            match decode_cbor_strict(&want_cbor) {
                Ok(ipld) if ipld_to_json(&ipld) == *json => {}
                Ok(ipld) => fail(format!("cbor -> json mismatch: {}", ipld_to_json(&ipld))),
                Err(e) => fail(format!("decode failed: {e}")),
            }
        }
        report(&path, cases(&v).len(), &failures);
    }

    #[test]
    fn data_model_valid() {
        let (path, v) = fixture("interop/data-model/data-model-valid.json");
        let mut failures = Vec::new();
        for case in cases(&v) {
            let note = case["note"].as_str().unwrap_or("?");
            let result = parse_fixture(&case["json"]).and_then(|ipld| {
                let cbor = encode_cbor(&ipld)?;
                let back = decode_cbor_strict(&cbor)?;
                let again = json_to_ipld(&ipld_to_json(&back))?;
                if back != ipld || again != ipld {
                    return Err(DataError::Shape("round trip changed the value".into()));
                }
                Ok(())
            });
            if let Err(e) = result {
                failures.push(format!("{note:?}: {e}"));
            }
        }
        report(&path, cases(&v).len(), &failures);
    }

    #[test]
    fn data_model_invalid() {
        // Each note is expected to fail for its stated reason, not by accident.
        let expected: &[(&str, &str)] = &[
            ("top-level not an object", "NotARecord"),
            ("float", "Float"),
            ("record with $type null", "InvalidType"),
            ("record with $type wrong type", "InvalidType"),
            ("record with empty $type string", "InvalidType"),
            ("blob with string size", "InvalidBlob"),
            ("blob with missing key", "InvalidBlob"),
            ("bytes with wrong field type", "InvalidBytes"),
            ("bytes with extra fields", "InvalidBytes"),
            ("link with wrong field type", "InvalidLink"),
            ("link with bogus CID", "InvalidLink"),
            ("link with extra fields", "InvalidLink"),
        ];
        let (path, v) = fixture("interop/data-model/data-model-invalid.json");
        let mut failures = Vec::new();
        for case in cases(&v) {
            let note = case["note"].as_str().unwrap_or("?");
            match parse_fixture(&case["json"]) {
                Ok(_) => failures.push(format!("{note:?}: accepted")),
                Err(e) => {
                    let kind = format!("{e:?}");
                    match expected.iter().find(|(n, _)| *n == note) {
                        Some((_, want)) if kind.starts_with(want) => {}
                        Some((_, want)) => {
                            failures.push(format!("{note:?}: rejected as {e} but expected {want}"))
                        }
                        // A case added upstream: rejection is what matters.
                        None => {}
                    }
                }
            }
        }
        report(&path, cases(&v).len(), &failures);
    }

    #[test]
    fn strict_decode_rejects_hand_built_bytes() {
        let cid = cid_for_cbor(b"x").to_bytes();
        let tag42 = |payload: &[u8]| {
            let mut b = vec![0xd8, 0x2a, 0x58, payload.len() as u8];
            b.extend_from_slice(payload);
            b
        };
        let mut cid_junk = vec![0x00];
        cid_junk.extend_from_slice(&cid);
        cid_junk.push(0xff);
        let mut cid_v0 = vec![0x00, 0x12, 0x20];
        cid_v0.extend_from_slice(&[7; 32]);
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("float", vec![0xa1, 0x61, b'a', 0xfb, 0x3f, 0xf8, 0, 0, 0, 0, 0, 0]),
            ("float inside list", vec![0x82, 0x01, 0xfb, 0x40, 0x09, 0x21, 0xfb, 0x54, 0x44, 0x2d, 0x18]),
            ("unsorted map keys", vec![0xa2, 0x61, b'b', 0x01, 0x61, b'a', 0x02]),
            ("longer key first", vec![0xa2, 0x62, b'a', b'a', 0x01, 0x61, b'b', 0x02]),
            ("duplicate map keys", vec![0xa2, 0x61, b'a', 0x01, 0x61, b'a', 0x02]),
            ("indefinite-length list", vec![0x9f, 0x01, 0xff]),
            ("indefinite-length map", vec![0xbf, 0x61, b'a', 0x01, 0xff]),
            ("indefinite-length string", vec![0x7f, 0x61, b'a', 0xff]),
            ("trailing bytes", vec![0xa1, 0x61, b'a', 0x01, 0x00]),
            ("two top-level values", vec![0x01, 0x02]),
            ("non-minimal integer", vec![0x18, 0x05]),
            ("non-minimal string length", vec![0x78, 0x01, b'a']),
            ("integer above i64::MAX", vec![0x1b, 0x80, 0, 0, 0, 0, 0, 0, 0]),
            ("non-string map key", vec![0xa1, 0x01, 0x02]),
            ("tag other than 42", vec![0xc1, 0x01]),
            ("undefined", vec![0xf7]),
            ("invalid utf-8", vec![0x62, 0xc3, 0x28]),
            ("truncated", vec![0x82, 0x01]),
            ("empty input", vec![]),
            ("CIDv0 in tag 42", tag42(&cid_v0)),
            ("CID missing 0x00 prefix", tag42(&cid)),
            ("junk after the multihash in a CID", tag42(&cid_junk)),
            ("empty $type", vec![0xa1, 0x65, b'$', b't', b'y', b'p', b'e', 0x60]),
            ("$link map key", vec![0xa1, 0x65, b'$', b'l', b'i', b'n', b'k', 0x61, b'x']),
        ];
        let mut failures = Vec::new();
        for (name, bytes) in &cases {
            if let Ok(v) = decode_cbor_strict(bytes) {
                failures.push(format!("{name}: accepted as {v:?}"));
            }
        }
        assert!(
            failures.is_empty(),
            "{} of {} cases accepted:\n{}",
            failures.len(),
            cases.len(),
            failures.join("\n")
        );

        // And the junk-after-CID case is caught by the re-encode comparison.
        assert!(matches!(decode_cbor_strict(&tag42(&cid_junk)), Err(DataError::NonCanonical)));
        // Canonical input is accepted.
        let mut ok = vec![0x00];
        ok.extend_from_slice(&cid);
        assert!(matches!(decode_cbor_strict(&tag42(&ok)), Ok(Ipld::Link(_))));
        assert_eq!(
            decode_cbor_strict(&[0xa2, 0x61, b'b', 0x01, 0x62, b'a', b'a', 0x02]).ok().map(|_| ()),
            Some(())
        );
    }

    #[test]
    fn json_edge_cases() {
        let ok = |j: Value| json_to_ipld(&j).unwrap_or_else(|e| panic!("{j} rejected: {e}"));
        let err = |j: Value| json_to_ipld(&j).err().unwrap_or_else(|| panic!("{j} accepted"));
        use serde_json::json;

        // Padding is optional on input; output is unpadded.
        assert_eq!(ok(json!({"$bytes": "AQI="})), Ipld::Bytes(vec![1, 2]));
        assert_eq!(ok(json!({"$bytes": "AQI"})), Ipld::Bytes(vec![1, 2]));
        assert_eq!(ok(json!({"$bytes": ""})), Ipld::Bytes(vec![]));
        assert_eq!(ipld_to_json(&Ipld::Bytes(vec![1, 2])), json!({"$bytes": "AQI"}));
        assert!(matches!(err(json!({"$bytes": "AQI-"})), DataError::InvalidBytes { .. }));

        // Integers: full i64 range, integer-valued floats within 2^53.
        assert_eq!(ok(json!(i64::MIN)), Ipld::Integer(i64::MIN.into()));
        assert_eq!(ok(json!(1e3)), Ipld::Integer(1000));
        assert_eq!(ok(json!(-0.0)), Ipld::Integer(0));
        assert!(matches!(err(json!(u64::MAX)), DataError::IntegerOutOfRange { .. }));
        assert!(matches!(err(json!(1e300)), DataError::Float { .. }));
        assert!(matches!(err(json!({"a": [0, 0.5]})), DataError::Float { ref path } if path == "/a/1"));

        // Links: canonical base32 CIDv1 only.
        let cid = "bafyreidfayvfuwqa7qlnopdjiqrxzs6blmoeu4rujcjtnci5beludirz2a";
        assert!(matches!(ok(json!({"$link": cid})), Ipld::Link(_)));
        for bad in [
            cid.to_uppercase(),
            format!("{cid}a"),
            format!("/ipfs/{cid}"),
            "QmbWqxBEKC3P8tqsKc98xmWNzrzDtRLMiMPL8wBuTGsMnR".to_owned(),
            String::new(),
        ] {
            assert!(matches!(err(json!({"$link": bad})), DataError::InvalidLink { .. }), "{bad}");
        }

        // Other `$` keys are ignored per spec; `$type` is checked anywhere.
        ok(json!({"$future": 1, "a": {"$type": "x.y.z"}}));
        assert!(
            matches!(err(json!({"a": [{"$type": ""}]})), DataError::InvalidType { ref path } if path == "/a/0")
        );
        // Blob shape.
        let blob = |size: Value, mime: Value| json!({"$type": "blob", "ref": {"$link": "bafkreiccldh766hwcnuxnf2wh6jgzepf2nlu2lvcllt63eww5p6chi4ity"}, "mimeType": mime, "size": size});
        ok(blob(json!(0), json!("image/png")));
        assert!(matches!(err(blob(json!(-1), json!("image/png"))), DataError::InvalidBlob { .. }));
        assert!(matches!(err(blob(json!(1), json!(""))), DataError::InvalidBlob { .. }));
        assert!(matches!(
            err(
                json!({"$type": "blob", "ref": "bafkreiccldh766hwcnuxnf2wh6jgzepf2nlu2lvcllt63eww5p6chi4ity", "mimeType": "a/b", "size": 1})
            ),
            DataError::InvalidBlob { .. }
        ));

        // Depth: MAX_DEPTH containers are fine, one more is not, and what we
        // accept the CBOR decoder reads back.
        let nest = |n: usize| (0..n).fold(json!(1), |acc, _| json!([acc]));
        let deepest = ok(nest(MAX_DEPTH));
        let cbor = encode_cbor(&deepest).expect("encode deepest");
        assert_eq!(decode_cbor_strict(&cbor).expect("decode deepest"), deepest);
        assert!(matches!(err(nest(MAX_DEPTH + 1)), DataError::TooDeep { .. }));
    }

    #[test]
    fn record_from_json_rules() {
        use serde_json::json;
        assert!(record_from_json(&json!({"$type": "app.bsky.feed.post", "text": "hi"})).is_ok());
        for bad in [
            json!("blah"),
            json!([1]),
            json!({"text": "hi"}),
            json!({"$type": 1}),
            json!({"$link": "bafyreidfayvfuwqa7qlnopdjiqrxzs6blmoeu4rujcjtnci5beludirz2a"}),
        ] {
            assert!(record_from_json(&bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn blob_refs_finds_nested_blobs() {
        use serde_json::json;
        let blob = |cid: &str, size: u64| json!({"$type": "blob", "ref": {"$link": cid}, "mimeType": "image/jpeg", "size": size});
        let a = "bafkreiccldh766hwcnuxnf2wh6jgzepf2nlu2lvcllt63eww5p6chi4ity";
        let b = cid_for_raw(b"hello").to_string();
        let v = json_to_ipld(&json!({
            "$type": "app.bsky.feed.post",
            "embed": {"images": [{"image": blob(a, 10000)}, {"image": blob(&b, 5)}]},
            "other": {"$type": "blobby", "ref": 1},
        }))
        .expect("valid");
        let refs = blob_refs(&v);
        assert_eq!(refs.len(), 2, "{refs:?}");
        assert_eq!(
            refs[0],
            BlobRef { cid: parse_cid(a).expect("cid"), mime_type: "image/jpeg".into(), size: 10000 }
        );
        assert_eq!(refs[1].cid.to_string(), b);
        assert_eq!(refs[1].size, 5);
    }

    #[test]
    fn known_cids_and_typed_structs() {
        // sha2-256 of the empty string, raw codec.
        assert_eq!(
            cid_for_raw(b"").to_string(),
            "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"
        );

        // The empty MST node {"e": [], "l": null} has this well-known CID
        // (see shared/atproto-fixtures/SOURCE.md).
        #[derive(Serialize, serde::Deserialize, Debug, PartialEq)]
        struct Node {
            l: Option<Cid>,
            e: Vec<Entry>,
        }
        #[derive(Serialize, serde::Deserialize, Debug, PartialEq)]
        struct Entry {
            p: u64,
            #[serde(with = "serde_bytes")]
            k: Vec<u8>,
            v: Cid,
            t: Option<Cid>,
        }
        let empty = Node { l: None, e: vec![] };
        let bytes = encode_cbor_serde(&empty).expect("encode");
        assert_eq!(
            cid_for_cbor(&bytes).to_string(),
            "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm"
        );
        assert_eq!(decode_cbor_serde::<Node>(&bytes).expect("decode"), empty);

        let node = Node {
            l: Some(cid_for_cbor(b"left")),
            e: vec![Entry { p: 0, k: b"app.bsky.feed.post/3k".to_vec(), v: cid_for_cbor(b"rec"), t: None }],
        };
        let bytes = encode_cbor_serde(&node).expect("encode");
        // Same bytes as going through Ipld by hand, and byte fields stay bytes.
        let ipld = decode_cbor_strict(&bytes).expect("strict");
        assert_eq!(encode_cbor(&ipld).expect("re-encode"), bytes);
        let Ipld::Map(m) = &ipld else { panic!("not a map") };
        let Some(Ipld::List(es)) = m.get("e") else { panic!("no e") };
        let Some(Ipld::Map(e0)) = es.first() else { panic!("no entry") };
        assert!(matches!(e0.get("k"), Some(Ipld::Bytes(_))));
        assert_eq!(decode_cbor_serde::<Node>(&bytes).expect("decode"), node);
        assert!(matches!(decode_cbor_serde::<Entry>(&bytes), Err(DataError::Shape(_))));

        // Typed encoding applies the data-model rules too.
        assert!(matches!(encode_cbor_serde(&1.5f64), Err(DataError::Float { .. })));
        assert!(matches!(encode_cbor_serde(&u64::MAX), Err(DataError::IntegerOutOfRange { .. })));
    }
}
