//! Shared harness for Roost's Rust integration tests.
//!
//! * [`MockPlc`]: an in-process PLC directory (axum on 127.0.0.1:0) that
//!   accepts a genesis operation only if its signature verifies against one
//!   of its rotation keys and the DID is the hash of the signed operation.
//! * [`TestPds`]: a Roost server built from [`Config::for_tests`] in a fresh
//!   data directory, served on 127.0.0.1:0 on a task of the test's runtime.
//! * [`Xrpc`]: a small HTTP client with XRPC helpers, also used against the
//!   real binary in `crash_safety.rs`.
//! * [`verify_repo`]: exports a repository with `sync.getRepo` and checks it
//!   end to end (CAR CIDs, commit signature against the PLC document's key,
//!   MST leaves against `listRecords`).

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path as AxPath, State};
use axum::http::StatusCode as AxStatus;
use axum::routing::get;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use cid::Cid;
use ipld_core::ipld::Ipld;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use roost::app::App;
use roost::atp::car::CarReader;
use roost::atp::data::{decode_cbor_strict, encode_cbor, ipld_to_json, json_to_ipld};
use roost::atp::keys::{PublicKey, SigningKey};
use roost::config::Config;

pub const HANDLE: &str = "alice.test";
pub const PASSWORD: &str = "hunter2-correct-horse";
pub const EMAIL: &str = "alice@example.com";

/// reqwest is built with rustls but no crypto provider; pick ring (idempotent).
pub fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

pub fn http_client() -> reqwest::Client {
    install_crypto();
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("reqwest client")
}

// ---------------------------------------------------------------------------
// Mock PLC directory

/// Everything the mock PLC directory has seen.
#[derive(Default)]
struct PlcLog {
    /// Accepted operations by DID, in order.
    ops: HashMap<String, Vec<Value>>,
    /// Every POST by DID, accepted or not.
    posts: HashMap<String, usize>,
    rejected: usize,
}

pub struct MockPlc {
    pub url: String,
    pub port: u16,
    log: Arc<Mutex<PlcLog>>,
    shutdown: Mutex<Option<oneshot::Sender<()>>>,
}

/// `did:plc:` + the first 24 characters of base32-lower(SHA-256(DAG-CBOR(op))).
pub fn plc_did_for(op: &Value) -> Result<String, String> {
    let ipld = json_to_ipld(op).map_err(|e| format!("op is not data-model JSON: {e}"))?;
    let bytes = encode_cbor(&ipld).map_err(|e| format!("op does not encode: {e}"))?;
    let hash = Sha256::digest(&bytes);
    let b32 = multibase::encode(multibase::Base::Base32Lower, hash);
    Ok(format!("did:plc:{}", &b32[1..25]))
}

/// Signs `op` (without `sig`) with `key` the way PLC wants: base64url (no
/// padding) of the signature over the DAG-CBOR of the unsigned op.
pub fn sign_plc_op(mut op: Value, key: &SigningKey) -> Value {
    if let Some(obj) = op.as_object_mut() {
        obj.remove("sig");
    }
    let bytes = encode_cbor(&json_to_ipld(&op).expect("op ipld")).expect("op cbor");
    op["sig"] = Value::String(URL_SAFE_NO_PAD.encode(key.sign(&bytes)));
    op
}

/// The validation the mock applies to `POST /{did}`.
pub fn check_genesis_op(did: &str, op: &Value) -> Result<(), String> {
    let obj = op.as_object().ok_or("operation is not a JSON object")?;
    if obj.get("type").and_then(Value::as_str) != Some("plc_operation") {
        return Err("type must be plc_operation".into());
    }
    if !obj.get("prev").is_some_and(Value::is_null) {
        return Err("only genesis operations (prev: null) are accepted".into());
    }
    let sig = obj.get("sig").and_then(Value::as_str).ok_or("sig missing or not a string")?;
    let sig = URL_SAFE_NO_PAD.decode(sig).map_err(|e| format!("sig is not base64url: {e}"))?;
    let mut unsigned = op.clone();
    if let Some(o) = unsigned.as_object_mut() {
        o.remove("sig");
    }
    let unsigned =
        encode_cbor(&json_to_ipld(&unsigned).map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
    let rotation = obj
        .get("rotationKeys")
        .and_then(Value::as_array)
        .filter(|keys| !keys.is_empty())
        .ok_or("rotationKeys missing or empty")?;
    let mut verified = false;
    for key in rotation {
        let key = key.as_str().ok_or("rotation key is not a string")?;
        let key = PublicKey::from_did_key(key).map_err(|e| format!("rotation key {key}: {e}"))?;
        if key.verify(&unsigned, &sig).is_ok() {
            verified = true;
        }
    }
    if !verified {
        return Err("signature does not verify against any rotation key".into());
    }
    let atproto_key = obj
        .get("verificationMethods")
        .and_then(|v| v.get("atproto"))
        .and_then(Value::as_str)
        .ok_or("verificationMethods.atproto missing")?;
    PublicKey::from_did_key(atproto_key).map_err(|e| format!("atproto key: {e}"))?;
    obj.get("services")
        .and_then(|s| s.get("atproto_pds"))
        .and_then(|s| s.get("endpoint"))
        .and_then(Value::as_str)
        .ok_or("services.atproto_pds.endpoint missing")?;
    let expected = plc_did_for(op)?;
    if expected != did {
        return Err(format!("DID mismatch: the op hashes to {expected}, not {did}"));
    }
    Ok(())
}

/// The checks PLC applies to a non-genesis operation: `prev` is the CID of
/// the current head, and a rotation key of the head signed it.
pub fn check_update_op(prev: &Value, op: &Value) -> Result<(), String> {
    let prev_cid = roost::atp::data::cid_for_cbor(
        &encode_cbor(&json_to_ipld(prev).map_err(|e| e.to_string())?).map_err(|e| e.to_string())?,
    );
    if op.get("prev").and_then(Value::as_str) != Some(prev_cid.to_string().as_str()) {
        return Err(format!("prev must be {prev_cid}"));
    }
    let sig = op.get("sig").and_then(Value::as_str).ok_or("sig missing")?;
    let sig = URL_SAFE_NO_PAD.decode(sig).map_err(|e| format!("sig is not base64url: {e}"))?;
    let mut unsigned = op.clone();
    if let Some(o) = unsigned.as_object_mut() {
        o.remove("sig");
    }
    let unsigned =
        encode_cbor(&json_to_ipld(&unsigned).map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
    let keys = prev.get("rotationKeys").and_then(Value::as_array).ok_or("head has no rotationKeys")?;
    let signed_by_rotation_key = keys
        .iter()
        .filter_map(Value::as_str)
        .any(|k| PublicKey::from_did_key(k).is_ok_and(|key| key.verify(&unsigned, &sig).is_ok()));
    if !signed_by_rotation_key {
        return Err("signature does not verify against the head's rotation keys".into());
    }
    Ok(())
}

/// The DID document a PLC directory renders for the latest operation.
pub fn plc_did_document(did: &str, op: &Value) -> Value {
    let key = op["verificationMethods"]["atproto"].as_str().unwrap_or_default();
    json!({
        "@context": [
            "https://www.w3.org/ns/did/v1",
            "https://w3id.org/security/multikey/v1",
            "https://w3id.org/security/suites/secp256k1-2019/v1"
        ],
        "id": did,
        "alsoKnownAs": op["alsoKnownAs"],
        "verificationMethod": [{
            "id": format!("{did}#atproto"),
            "type": "Multikey",
            "controller": did,
            "publicKeyMultibase": key.strip_prefix("did:key:").unwrap_or(key),
        }],
        "service": [{
            "id": "#atproto_pds",
            "type": "AtprotoPersonalDataServer",
            "serviceEndpoint": op["services"]["atproto_pds"]["endpoint"],
        }]
    })
}

type PlcState = Arc<Mutex<PlcLog>>;

async fn plc_post(
    State(log): State<PlcState>,
    AxPath(did): AxPath<String>,
    body: Bytes,
) -> (AxStatus, Json<Value>) {
    let mut log = log.lock().expect("plc log");
    *log.posts.entry(did.clone()).or_default() += 1;
    let op: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            log.rejected += 1;
            return (AxStatus::BAD_REQUEST, Json(json!({ "message": format!("invalid JSON: {e}") })));
        }
    };
    if let Some(prev) = log.ops.get(&did).and_then(|ops| ops.last()).cloned() {
        return match check_update_op(&prev, &op) {
            Ok(()) => {
                log.ops.entry(did).or_default().push(op);
                (AxStatus::OK, Json(json!({})))
            }
            Err(message) => {
                log.rejected += 1;
                (AxStatus::BAD_REQUEST, Json(json!({ "message": message })))
            }
        };
    }
    match check_genesis_op(&did, &op) {
        Ok(()) => {
            log.ops.insert(did, vec![op]);
            (AxStatus::OK, Json(json!({})))
        }
        Err(message) => {
            log.rejected += 1;
            (AxStatus::BAD_REQUEST, Json(json!({ "message": message })))
        }
    }
}

async fn plc_doc(State(log): State<PlcState>, AxPath(did): AxPath<String>) -> (AxStatus, Json<Value>) {
    let log = log.lock().expect("plc log");
    match log.ops.get(&did).and_then(|ops| ops.last()) {
        Some(op) => (AxStatus::OK, Json(plc_did_document(&did, op))),
        None => (AxStatus::NOT_FOUND, Json(json!({ "message": format!("DID not registered: {did}") }))),
    }
}

async fn plc_ops_log(State(log): State<PlcState>, AxPath(did): AxPath<String>) -> (AxStatus, Json<Value>) {
    let log = log.lock().expect("plc log");
    match log.ops.get(&did) {
        Some(ops) => (AxStatus::OK, Json(Value::Array(ops.clone()))),
        None => (AxStatus::NOT_FOUND, Json(json!({ "message": format!("DID not registered: {did}") }))),
    }
}

async fn plc_last_op(State(log): State<PlcState>, AxPath(did): AxPath<String>) -> (AxStatus, Json<Value>) {
    let log = log.lock().expect("plc log");
    match log.ops.get(&did).and_then(|ops| ops.last()) {
        Some(op) => (AxStatus::OK, Json(op.clone())),
        None => (AxStatus::NOT_FOUND, Json(json!({ "message": format!("DID not registered: {did}") }))),
    }
}

impl MockPlc {
    pub async fn start() -> Arc<MockPlc> {
        let log: PlcState = Arc::default();
        let router = axum::Router::new()
            .route("/{did}", get(plc_doc).post(plc_post))
            .route("/{did}/log", get(plc_ops_log))
            .route("/{did}/log/last", get(plc_last_op))
            .with_state(log.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind plc");
        let port = listener.local_addr().expect("plc addr").port();
        let (tx, rx) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = axum::serve(listener, router)
                .with_graceful_shutdown(async move {
                    let _ = rx.await;
                })
                .await;
        });
        Arc::new(MockPlc {
            url: format!("http://127.0.0.1:{port}"),
            port,
            log,
            shutdown: Mutex::new(Some(tx)),
        })
    }

    /// Operations accepted for `did`.
    pub fn ops(&self, did: &str) -> Vec<Value> {
        let log = self.log.lock().expect("plc log");
        log.ops.get(did).cloned().unwrap_or_default()
    }

    /// POSTs received for `did` (accepted or rejected).
    pub fn posts(&self, did: &str) -> usize {
        let log = self.log.lock().expect("plc log");
        log.posts.get(did).copied().unwrap_or(0)
    }

    /// POSTs received for any DID.
    pub fn total_posts(&self) -> usize {
        let log = self.log.lock().expect("plc log");
        log.posts.values().sum()
    }

    pub fn rejected(&self) -> usize {
        self.log.lock().expect("plc log").rejected
    }

    pub fn dids(&self) -> Vec<String> {
        let log = self.log.lock().expect("plc log");
        log.ops.keys().cloned().collect()
    }
}

impl Drop for MockPlc {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.lock().ok().and_then(|mut s| s.take()) {
            let _ = tx.send(());
        }
    }
}

/// Fetches `did`'s document from a PLC directory and returns its `#atproto`
/// key and the document.
pub async fn plc_signing_key(http: &reqwest::Client, plc_url: &str, did: &str) -> (PublicKey, Value) {
    let resp = http.get(format!("{plc_url}/{did}")).send().await.expect("GET DID document");
    assert_eq!(resp.status(), StatusCode::OK, "PLC has no document for {did}");
    let doc: Value = resp.json().await.expect("DID document JSON");
    assert_eq!(doc["id"], did);
    let vm = doc["verificationMethod"]
        .as_array()
        .and_then(|vms| vms.iter().find(|vm| vm["id"] == format!("{did}#atproto") || vm["id"] == "#atproto"))
        .unwrap_or_else(|| panic!("no #atproto verification method in {doc}"));
    assert_eq!(vm["type"], "Multikey");
    let key = PublicKey::from_multibase(vm["publicKeyMultibase"].as_str().expect("multibase"))
        .expect("publicKeyMultibase parses");
    (key, doc)
}

// ---------------------------------------------------------------------------
// HTTP client

/// A raw HTTP response.
#[derive(Debug)]
pub struct Resp {
    pub status: StatusCode,
    pub content_type: Option<String>,
    pub body: Vec<u8>,
}

impl Resp {
    /// The body as JSON, or `Value::String(text)` when it is not JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&self.body).into_owned()))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// `a=1&b=2`, form-encoded.
pub fn query_string(query: &[(&str, &str)]) -> String {
    let mut s = form_urlencoded::Serializer::new(String::new());
    for (k, v) in query {
        s.append_pair(k, v);
    }
    s.finish()
}

#[derive(Clone)]
pub struct Xrpc {
    pub base_url: String,
    pub http: reqwest::Client,
}

impl Xrpc {
    pub fn new(base_url: impl Into<String>) -> Xrpc {
        Xrpc { base_url: base_url.into(), http: http_client() }
    }

    /// Any request to `path` (which starts with `/`).
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Vec<u8>>,
    ) -> Resp {
        self.try_request(method.clone(), path, headers, body)
            .await
            .unwrap_or_else(|e| panic!("{method} {path} failed: {e}"))
    }

    pub async fn try_request(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Vec<u8>>,
    ) -> Result<Resp, reqwest::Error> {
        let mut req = self.http.request(method, format!("{}{path}", self.base_url));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(body) = body {
            req = req.body(body);
        }
        let resp = req.send().await?;
        let status = resp.status();
        let content_type = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = resp.bytes().await?.to_vec();
        Ok(Resp { status, content_type, body })
    }

    fn xrpc_path(nsid: &str, query: &[(&str, &str)]) -> String {
        if query.is_empty() {
            format!("/xrpc/{nsid}")
        } else {
            format!("/xrpc/{nsid}?{}", query_string(query))
        }
    }

    /// GET an XRPC query; the raw response.
    pub async fn get_raw(&self, nsid: &str, query: &[(&str, &str)]) -> Resp {
        self.request(Method::GET, &Self::xrpc_path(nsid, query), &[], None).await
    }

    /// GET an XRPC query; status and JSON body.
    pub async fn get(&self, nsid: &str, query: &[(&str, &str)]) -> (StatusCode, Value) {
        let r = self.get_raw(nsid, query).await;
        (r.status, r.json())
    }

    /// GET an XRPC query with a bearer token.
    pub async fn get_auth(&self, nsid: &str, bearer: &str, query: &[(&str, &str)]) -> (StatusCode, Value) {
        let auth = format!("Bearer {bearer}");
        let r = self
            .request(Method::GET, &Self::xrpc_path(nsid, query), &[("authorization", auth.as_str())], None)
            .await;
        (r.status, r.json())
    }

    /// POST a JSON body to an XRPC procedure.
    pub async fn post(&self, nsid: &str, bearer: Option<&str>, body: &Value) -> (StatusCode, Value) {
        let r = self
            .post_raw(nsid, bearer, Some("application/json"), serde_json::to_vec(body).expect("json"))
            .await;
        (r.status, r.json())
    }

    pub async fn post_raw(
        &self,
        nsid: &str,
        bearer: Option<&str>,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> Resp {
        let auth = bearer.map(|b| format!("Bearer {b}"));
        let mut headers = Vec::new();
        if let Some(a) = &auth {
            headers.push(("authorization", a.as_str()));
        }
        if let Some(ct) = content_type {
            headers.push(("content-type", ct));
        }
        self.request(Method::POST, &format!("/xrpc/{nsid}"), &headers, Some(body)).await
    }

    /// createSession; panics unless it succeeds. Returns (access, refresh).
    pub async fn login_as(&self, identifier: &str, password: &str) -> (String, String) {
        let (status, body) = self
            .post(
                "com.atproto.server.createSession",
                None,
                &json!({ "identifier": identifier, "password": password }),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "createSession({identifier}): {body}");
        (
            body["accessJwt"].as_str().expect("accessJwt").to_owned(),
            body["refreshJwt"].as_str().expect("refreshJwt").to_owned(),
        )
    }

    /// `sync.getLatestCommit`: (cid, rev).
    pub async fn latest_commit(&self, did: &str) -> (String, String) {
        let (status, body) = self.get("com.atproto.sync.getLatestCommit", &[("did", did)]).await;
        assert_eq!(status, StatusCode::OK, "getLatestCommit: {body}");
        (body["cid"].as_str().expect("cid").to_owned(), body["rev"].as_str().expect("rev").to_owned())
    }

    /// `repo.getRecord`: Some(cid, value) or None for RecordNotFound.
    pub async fn record(&self, did: &str, collection: &str, rkey: &str) -> Option<(String, Value)> {
        let (status, body) = self
            .get("com.atproto.repo.getRecord", &[("repo", did), ("collection", collection), ("rkey", rkey)])
            .await;
        match status {
            StatusCode::OK => Some((body["cid"].as_str().expect("cid").to_owned(), body["value"].clone())),
            StatusCode::BAD_REQUEST if body["error"] == "RecordNotFound" => None,
            _ => panic!("getRecord {collection}/{rkey}: {status} {body}"),
        }
    }

    /// Every record of a collection via `listRecords` paging: `rkey -> (cid, value)`.
    pub async fn list_all(&self, did: &str, collection: &str) -> BTreeMap<String, (String, Value)> {
        let mut out = BTreeMap::new();
        let mut cursor: Option<String> = None;
        for _ in 0..10_000 {
            let mut query = vec![("repo", did), ("collection", collection), ("limit", "100")];
            if let Some(c) = &cursor {
                query.push(("cursor", c.as_str()));
            }
            let (status, body) = self.get("com.atproto.repo.listRecords", &query).await;
            assert_eq!(status, StatusCode::OK, "listRecords: {body}");
            for r in body["records"].as_array().expect("records") {
                let uri = r["uri"].as_str().expect("uri");
                let prefix = format!("at://{did}/{collection}/");
                let rkey =
                    uri.strip_prefix(&prefix).unwrap_or_else(|| panic!("uri {uri} not under {prefix}"));
                let prev = out.insert(
                    rkey.to_owned(),
                    (r["cid"].as_str().expect("cid").to_owned(), r["value"].clone()),
                );
                assert!(prev.is_none(), "listRecords returned {uri} twice");
            }
            match body["cursor"].as_str() {
                Some(c) => cursor = Some(c.to_owned()),
                None => return out,
            }
        }
        panic!("listRecords never ended");
    }

    /// `describeRepo`'s collections.
    pub async fn collections(&self, did: &str) -> Vec<String> {
        let (status, body) = self.get("com.atproto.repo.describeRepo", &[("repo", did)]).await;
        assert_eq!(status, StatusCode::OK, "describeRepo: {body}");
        body["collections"]
            .as_array()
            .expect("collections")
            .iter()
            .map(|c| c.as_str().expect("collection").to_owned())
            .collect()
    }
}

/// The claims of a JWT (no verification).
pub fn jwt_claims(token: &str) -> Value {
    let payload = token.split('.').nth(1).expect("JWT has a payload");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).expect("payload base64")).expect("claims JSON")
}

/// Asserts an XRPC error response: status, `error` name, and a string `message`.
#[track_caller]
pub fn assert_xrpc_error(status: StatusCode, body: &Value, want_status: u16, want_error: &str) {
    assert_eq!(status.as_u16(), want_status, "unexpected status; body: {body}");
    assert_eq!(body["error"], want_error, "unexpected error name; body: {body}");
    assert!(body["message"].is_string(), "error without message: {body}");
}

// ---------------------------------------------------------------------------
// CAR and repository verification

/// Parses a CAR with roost's reader (which checks every block's CID).
pub fn parse_car(bytes: &[u8]) -> (Vec<Cid>, Vec<(Cid, Vec<u8>)>) {
    let (reader, header) = CarReader::new(std::io::Cursor::new(bytes)).expect("CAR header");
    let blocks = reader.collect::<Result<Vec<_>, _>>().expect("CAR blocks (CIDs verified)");
    (header.roots, blocks)
}

pub fn block_map(blocks: &[(Cid, Vec<u8>)]) -> HashMap<Cid, Arc<[u8]>> {
    blocks.iter().map(|(c, d)| (*c, Arc::from(d.as_slice()))).collect()
}

/// Every MST node reachable from `root` (decoding nodes generically).
pub fn mst_nodes(blocks: &HashMap<Cid, Arc<[u8]>>, root: Cid) -> HashSet<Cid> {
    let mut seen = HashSet::new();
    let mut stack = vec![root];
    while let Some(cid) = stack.pop() {
        if !seen.insert(cid) {
            continue;
        }
        let bytes = blocks.get(&cid).unwrap_or_else(|| panic!("MST node {cid} missing from the CAR"));
        let node = decode_cbor_strict(bytes).expect("MST node decodes");
        let Ipld::Map(map) = node else { panic!("MST node {cid} is not a map") };
        match map.get("l") {
            Some(Ipld::Link(l)) => stack.push(*l),
            Some(Ipld::Null) => {}
            other => panic!("MST node {cid}: bad l {other:?}"),
        }
        let Some(Ipld::List(entries)) = map.get("e") else { panic!("MST node {cid}: e missing") };
        for e in entries {
            let Ipld::Map(e) = e else { panic!("MST entry not a map") };
            match e.get("t") {
                Some(Ipld::Link(t)) => stack.push(*t),
                Some(Ipld::Null) => {}
                other => panic!("MST entry in {cid}: bad t {other:?}"),
            }
        }
    }
    seen
}

/// A verified export of a repository.
pub struct RepoSnapshot {
    pub commit_cid: Cid,
    pub rev: String,
    pub data: Cid,
    /// The CAR's blocks, in order.
    pub car_blocks: Vec<(Cid, Vec<u8>)>,
    pub blocks: HashMap<Cid, Arc<[u8]>>,
    /// `collection/rkey -> record cid` from the MST.
    pub leaves: BTreeMap<String, Cid>,
    pub mst_nodes: HashSet<Cid>,
}

/// Exports `did`'s repository and checks it: CAR CIDs, root == latest commit,
/// commit signature against the PLC document's key, MST leaves ==
/// `listRecords` for every collection (cids and values), and every record
/// block present.
pub async fn verify_repo(x: &Xrpc, did: &str, plc_url: &str) -> RepoSnapshot {
    let (latest_cid, latest_rev) = x.latest_commit(did).await;
    let resp = x.get_raw("com.atproto.sync.getRepo", &[("did", did)]).await;
    assert_eq!(resp.status, StatusCode::OK, "getRepo: {}", resp.text());
    assert_eq!(resp.content_type.as_deref(), Some("application/vnd.ipld.car"));
    let (roots, car_blocks) = parse_car(&resp.body);
    assert_eq!(roots.len(), 1, "getRepo CAR must have exactly one root");
    let commit_cid = roots[0];
    assert_eq!(commit_cid.to_string(), latest_cid, "CAR root != getLatestCommit (no writes were running)");
    let mut distinct = HashSet::new();
    for (cid, _) in &car_blocks {
        assert!(distinct.insert(*cid), "block {cid} appears twice in the CAR");
    }
    let blocks = block_map(&car_blocks);
    let (key, _doc) = plc_signing_key(&x.http, plc_url, did).await;
    let commit_bytes = blocks.get(&commit_cid).expect("commit block in CAR");
    let commit = roost::atp::commit::verify(commit_bytes, did, &key)
        .expect("commit signature verifies against the PLC document's key");
    assert_eq!(commit.rev, latest_rev);
    let leaves: BTreeMap<String, Cid> = roost::atp::mst::collect_leaves(&blocks, commit.data)
        .await
        .expect("MST walk over the CAR's blocks")
        .into_iter()
        .collect();
    let nodes = mst_nodes(&blocks, commit.data);

    // The MST against the records index, collection by collection.
    let mut collections: BTreeSet<String> = x.collections(did).await.into_iter().collect();
    let from_leaves: BTreeSet<String> =
        leaves.keys().map(|k| k.split_once('/').expect("key has /").0.to_owned()).collect();
    assert_eq!(collections, from_leaves, "describeRepo collections != MST collections");
    collections.extend(from_leaves);
    let mut listed = BTreeMap::new();
    for collection in &collections {
        for (rkey, (cid, value)) in x.list_all(did, collection).await {
            let key = format!("{collection}/{rkey}");
            let cid: Cid = cid.parse().expect("listRecords cid");
            let block =
                blocks.get(&cid).unwrap_or_else(|| panic!("record block {cid} of {key} not in the CAR"));
            let decoded = decode_cbor_strict(block).expect("record block decodes");
            assert_eq!(ipld_to_json(&decoded), value, "listRecords value of {key} != its block");
            listed.insert(key, cid);
        }
    }
    assert_eq!(leaves, listed, "MST leaves != listRecords");
    RepoSnapshot {
        commit_cid,
        rev: commit.rev,
        data: commit.data,
        car_blocks,
        blocks,
        leaves,
        mst_nodes: nodes,
    }
}

// ---------------------------------------------------------------------------
// The in-process server

/// A last change to the configuration before `App::build`.
pub type Configure = Box<dyn FnOnce(&mut Config) + Send>;

/// How to start a [`TestPds`].
#[derive(Default)]
pub struct Options {
    /// Data directory (default: a fresh temporary directory owned by the server).
    pub dir: Option<PathBuf>,
    /// PLC directory to use (default: a fresh mock).
    pub plc: Option<Arc<MockPlc>>,
    /// Last changes to the configuration before `App::build`.
    pub configure: Option<Configure>,
}

pub struct TestPds {
    pub xrpc: Xrpc,
    pub base_url: String,
    pub port: u16,
    pub handle: String,
    pub password: String,
    pub email: String,
    pub did: String,
    pub plc: Arc<MockPlc>,
    pub data_dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl std::ops::Deref for TestPds {
    type Target = Xrpc;
    fn deref(&self) -> &Xrpc {
        &self.xrpc
    }
}

impl TestPds {
    pub async fn spawn() -> TestPds {
        Self::spawn_with(Options::default()).await
    }

    pub async fn spawn_in(dir: &Path) -> TestPds {
        Self::spawn_with(Options { dir: Some(dir.to_owned()), ..Options::default() }).await
    }

    pub async fn spawn_with(opts: Options) -> TestPds {
        install_crypto();
        let plc = match opts.plc {
            Some(p) => p,
            None => MockPlc::start().await,
        };
        let (tmp, data_dir) = match opts.dir {
            Some(d) => (None, d),
            None => {
                let t = tempfile::tempdir().expect("tempdir");
                let p = t.path().to_owned();
                (Some(t), p)
            }
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let mut config = Config::for_tests(data_dir.clone(), plc.url.clone(), HANDLE, PASSWORD);
        config.port = port;
        if let Some(f) = opts.configure {
            f(&mut config);
        }
        let app = App::build(config).await.expect("App::build");
        let account = app
            .state
            .db
            .account_by_handle(HANDLE)
            .await
            .expect("account lookup")
            .expect("the configured account exists");
        assert_eq!(account.status, "active");
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(app.serve(listener, async move {
            let _ = rx.await;
        }));
        let base_url = format!("http://127.0.0.1:{port}");
        TestPds {
            xrpc: Xrpc::new(base_url.clone()),
            base_url,
            port,
            handle: HANDLE.into(),
            password: PASSWORD.into(),
            email: EMAIL.into(),
            did: account.did,
            plc,
            data_dir,
            _tmp: tmp,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    /// Logs the configured account in: (access, refresh).
    pub async fn login(&self) -> (String, String) {
        self.xrpc.login_as(&self.handle, &self.password).await
    }

    /// Graceful shutdown; waits for the server (and its database) to close.
    /// Returns the temporary directory, if the server owned one.
    pub async fn stop(mut self) -> Option<tempfile::TempDir> {
        // Idle keep-alive connections would hold graceful shutdown open.
        self.xrpc.http = http_client();
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(20), task)
                .await
                .expect("server stops within 20 s")
                .expect("server task")
                .expect("server returned Ok");
        }
        self._tmp.take()
    }

    pub async fn latest(&self) -> (String, String) {
        self.xrpc.latest_commit(&self.did).await
    }

    pub async fn verify(&self) -> RepoSnapshot {
        verify_repo(&self.xrpc, &self.did, &self.plc.url).await
    }

    /// createRecord; panics unless 200. Returns the response body.
    pub async fn create(&self, access: &str, collection: &str, rkey: Option<&str>, record: Value) -> Value {
        let mut body = json!({ "repo": self.did, "collection": collection, "record": record });
        if let Some(r) = rkey {
            body["rkey"] = json!(r);
        }
        let (status, out) = self.post("com.atproto.repo.createRecord", Some(access), &body).await;
        assert_eq!(status, StatusCode::OK, "createRecord: {out}");
        out
    }

    pub async fn put(&self, access: &str, collection: &str, rkey: &str, record: Value) -> Value {
        let body = json!({ "repo": self.did, "collection": collection, "rkey": rkey, "record": record });
        let (status, out) = self.post("com.atproto.repo.putRecord", Some(access), &body).await;
        assert_eq!(status, StatusCode::OK, "putRecord: {out}");
        out
    }

    pub async fn delete(&self, access: &str, collection: &str, rkey: &str) -> Value {
        let body = json!({ "repo": self.did, "collection": collection, "rkey": rkey });
        let (status, out) = self.post("com.atproto.repo.deleteRecord", Some(access), &body).await;
        assert_eq!(status, StatusCode::OK, "deleteRecord: {out}");
        out
    }
}

impl Drop for TestPds {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// A post record.
pub fn post(text: &str) -> Value {
    json!({
        "$type": "app.bsky.feed.post",
        "text": text,
        "createdAt": "2024-01-01T00:00:00.000Z",
    })
}

/// This process's resident set size in KiB (the in-process server included).
pub fn vm_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// The last 40 lines of a server's log file, for failure messages.
pub fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Waits up to 30 s for a spawned `roost serve` to answer `/xrpc/_health`;
/// panics with its log's tail if it exits first or never does.
pub async fn wait_until_healthy(x: &Xrpc, child: &mut tokio::process::Child, log: &Path) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = x.try_request(Method::GET, "/xrpc/_health", &[], None).await
            && r.status == StatusCode::OK
        {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("roost exited early ({status}):\n{}", log_tail(log));
        }
        assert!(
            std::time::Instant::now() < deadline,
            "roost did not become healthy in 30 s:\n{}",
            log_tail(log)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
