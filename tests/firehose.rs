//! `com.atproto.sync.subscribeRepos` over a real WebSocket (tokio-tungstenite)
//! against an in-process Roost.
//!
//! Every frame is split into its two DAG-CBOR objects (the header length comes
//! from `serde_ipld_dagcbor::de::from_reader_once` on a `Cursor`) and both are
//! re-checked with `decode_cbor_strict` (canonical encoding). Every `#commit`
//! is verified independently of Roost with jacquard-repo; see [`Chain`] for
//! exactly what is checked with which library.
//!
//! Tests: cursor edge cases (0, mid-log, latest, future, malformed, huge query
//! strings), the replay→live cutover under concurrent writes, client frames,
//! restart on the same data directory, a slow consumer next to a healthy one
//! (with the process RSS), and the per-IP and global subscriber limits.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cid::Cid;
use futures::{SinkExt, StreamExt};
use ipld_core::ipld::Ipld;
use reqwest::StatusCode;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::{self, Message};

use jacquard_repo::commit::firehose::{FirehoseCommit, to_invertible_op};
use jacquard_repo::commit::{Commit as JCommit, UnsignedCommit as JUnsignedCommit};
use jacquard_repo::mst::VerifiedWriteOp;
use jacquard_repo::{MemoryBlockStore, Mst};

use common::{Options, TestPds, plc_signing_key, post, vm_rss_kib};
use roost::atp::data::decode_cbor_strict;

const SUBSCRIBE: &str = "/xrpc/com.atproto.sync.subscribeRepos";
/// How long a frame that is expected may take to arrive.
const FRAME_WAIT: Duration = Duration::from_secs(10);
/// How long to watch for a frame that must not come.
const QUIET: Duration = Duration::from_millis(300);

// ---------------------------------------------------------------------------
// Frames

/// One event-stream frame: the raw bytes and its two decoded objects.
#[derive(Clone)]
struct Frame {
    raw: Vec<u8>,
    /// Bytes taken by the header object.
    cut: usize,
    op: i64,
    t: Option<String>,
    body: BTreeMap<String, Ipld>,
}

impl Frame {
    fn parse(raw: Vec<u8>) -> Frame {
        let mut cursor = std::io::Cursor::new(raw.as_slice());
        let _: Ipld = serde_ipld_dagcbor::de::from_reader_once(&mut cursor).expect("frame header decodes");
        let cut = usize::try_from(cursor.position()).expect("cut");
        assert!(cut < raw.len(), "frame has no body");
        let header = decode_cbor_strict(&raw[..cut]).expect("header is canonical DAG-CBOR");
        let body = decode_cbor_strict(&raw[cut..]).expect("body is canonical DAG-CBOR");
        let Ipld::Map(header) = header else { panic!("header is not a map") };
        let op = match header.get("op") {
            Some(Ipld::Integer(op)) => i64::try_from(*op).expect("op"),
            other => panic!("header op: {other:?}"),
        };
        let t = match header.get("t") {
            Some(Ipld::String(t)) => Some(t.clone()),
            None => None,
            other => panic!("header t: {other:?}"),
        };
        match op {
            1 => assert!(t.is_some(), "op 1 without t"),
            -1 => assert!(t.is_none(), "error frame with t"),
            _ => panic!("unknown op {op}"),
        }
        let Ipld::Map(body) = body else { panic!("body is not a map") };
        Frame { raw, cut, op, t, body }
    }

    fn body_bytes(&self) -> &[u8] {
        &self.raw[self.cut..]
    }

    fn t(&self) -> &str {
        self.t.as_deref().unwrap_or("<error>")
    }

    fn seq(&self) -> i64 {
        match self.body.get("seq") {
            Some(Ipld::Integer(s)) => i64::try_from(*s).expect("seq"),
            other => panic!("{} frame without seq: {other:?}", self.t()),
        }
    }

    fn str(&self, field: &str) -> Option<&str> {
        match self.body.get(field) {
            Some(Ipld::String(s)) => Some(s),
            _ => None,
        }
    }

    fn link(&self, field: &str) -> Option<Cid> {
        match self.body.get(field) {
            Some(Ipld::Link(c)) => Some(*c),
            _ => None,
        }
    }

    fn bytes(&self, field: &str) -> &[u8] {
        match self.body.get(field) {
            Some(Ipld::Bytes(b)) => b,
            other => panic!("{} frame: {field} is not bytes: {other:?}", self.t()),
        }
    }

    /// `(error, message)` of an error frame.
    fn error(&self) -> (String, String) {
        assert_eq!(self.op, -1, "not an error frame: {}", self.t());
        (self.str("error").expect("error name").to_owned(), self.str("message").unwrap_or("").to_owned())
    }
}

// ---------------------------------------------------------------------------
// WebSocket helpers

fn ws_url(port: u16, query: &str) -> String {
    format!("ws://127.0.0.1:{port}{SUBSCRIBE}{query}")
}

type Ws = WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(port: u16, query: &str) -> Ws {
    match tokio_tungstenite::connect_async(ws_url(port, query)).await {
        Ok((ws, resp)) => {
            assert_eq!(resp.status().as_u16(), 101);
            ws
        }
        Err(e) => panic!("subscribeRepos{query}: {}", describe(&e)),
    }
}

fn describe(e: &tungstenite::Error) -> String {
    match e {
        tungstenite::Error::Http(resp) => format!(
            "HTTP {} {}",
            resp.status(),
            String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default())
        ),
        other => other.to_string(),
    }
}

/// Connects expecting a refusal before the upgrade: (status, JSON body).
async fn connect_refused(port: u16, query: &str) -> (u16, Value) {
    match tokio_tungstenite::connect_async(ws_url(port, query)).await {
        Ok(_) => panic!("subscribeRepos{} was upgraded; expected a refusal", &query[..query.len().min(80)]),
        Err(tungstenite::Error::Http(resp)) => {
            let body = resp.body().clone().unwrap_or_default();
            (resp.status().as_u16(), serde_json::from_slice(&body).unwrap_or(Value::Null))
        }
        Err(e) => panic!("expected an HTTP refusal, got {e}"),
    }
}

/// A WebSocket from a given local address (127.0.0.x), with an optional
/// receive buffer size set before connecting.
async fn connect_from(
    local: &str,
    port: u16,
    query: &str,
    recv_buffer: Option<u32>,
) -> Result<WebSocketStream<tokio::net::TcpStream>, tungstenite::Error> {
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    if let Some(size) = recv_buffer {
        sock.set_recv_buffer_size(size).expect("SO_RCVBUF");
    }
    sock.bind(format!("{local}:0").parse::<SocketAddr>().expect("local addr")).expect("bind");
    let stream = sock.connect(([127, 0, 0, 1], port).into()).await.expect("TCP connect");
    tokio_tungstenite::client_async(ws_url(port, query), stream).await.map(|(ws, _)| ws)
}

/// Sends a WebSocket upgrade request for `target` over a plain TCP socket;
/// the response status, or None if the server closed without one.
async fn raw_upgrade(port: u16, target: &str) -> Option<u16> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut sock = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.expect("connect");
    let request = format!(
        "GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    // The server may answer and close before it has read all of a huge request.
    let _ = sock.write_all(request.as_bytes()).await;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    let read = async {
        while !head.windows(2).any(|w| w == b"\r\n") {
            match sock.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(FRAME_WAIT, read).await.expect("a response or a close in time");
    let line = String::from_utf8_lossy(&head);
    line.strip_prefix("HTTP/1.1 ").and_then(|rest| rest.get(..3)).and_then(|code| code.parse().ok())
}

#[derive(Debug)]
enum Next {
    Frame(Vec<u8>),
    /// The stream ended: a Close frame, EOF, or an error (described).
    Closed(String),
    Timeout,
}

async fn next<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut WebSocketStream<S>, wait: Duration) -> Next {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return Next::Timeout,
            Ok(None) => return Next::Closed("end of stream".into()),
            Ok(Some(Err(e))) => return Next::Closed(format!("error: {e}")),
            Ok(Some(Ok(Message::Binary(b)))) => return Next::Frame(b.to_vec()),
            Ok(Some(Ok(Message::Close(c)))) => return Next::Closed(format!("close frame {c:?}")),
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)))) => {}
            Ok(Some(Ok(Message::Text(t)))) => panic!("server sent a text message: {t}"),
        }
    }
}

async fn frame<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut WebSocketStream<S>) -> Frame {
    match next(ws, FRAME_WAIT).await {
        Next::Frame(raw) => Frame::parse(raw),
        other => panic!("expected a frame, got {other:?}"),
    }
}

async fn frames<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut WebSocketStream<S>, n: usize) -> Vec<Frame> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(frame(ws).await);
    }
    out
}

async fn assert_quiet<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut WebSocketStream<S>, what: &str) {
    match next(ws, QUIET).await {
        Next::Timeout => {}
        Next::Frame(raw) => {
            let f = Frame::parse(raw);
            panic!("{what}: unexpected {} frame (seq {:?})", f.t(), f.body.get("seq"))
        }
        Next::Closed(why) => panic!("{what}: stream closed: {why}"),
    }
}

/// Reads until the stream ends; returns the frames and how it ended.
async fn drain<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut WebSocketStream<S>,
    wait: Duration,
) -> (Vec<Frame>, String) {
    let mut out = Vec::new();
    loop {
        match next(ws, wait).await {
            Next::Frame(raw) => out.push(Frame::parse(raw)),
            Next::Closed(why) => return (out, why),
            Next::Timeout => return (out, "timeout (still open)".into()),
        }
    }
}

// ---------------------------------------------------------------------------
// Independent verification

/// The account's `#atproto` key from the mock PLC's DID document, decoded
/// with the `multibase` and `k256` crates directly (not Roost's key code).
async fn k256_key(pds: &TestPds) -> k256::ecdsa::VerifyingKey {
    let (_, doc) = plc_signing_key(&pds.http, &pds.plc.url, &pds.did).await;
    let mb = doc["verificationMethod"][0]["publicKeyMultibase"].as_str().expect("publicKeyMultibase");
    let (base, bytes) = multibase::decode(mb).expect("multibase");
    assert_eq!(base, multibase::Base::Base58Btc);
    assert_eq!(&bytes[..2], &[0xe7, 0x01], "repo keys are secp256k1 (multicodec 0xe7)");
    k256::ecdsa::VerifyingKey::from_sec1_bytes(&bytes[2..]).expect("secp256k1 point")
}

fn check_cid(cid: &Cid, data: &[u8]) {
    assert_eq!(cid.version(), cid::Version::V1, "CIDv1");
    assert_eq!(cid.hash().code(), 0x12, "sha2-256");
    assert!(cid.codec() == 0x71 || cid.codec() == 0x55, "dag-cbor or raw codec");
    assert_eq!(cid.hash().digest(), Sha256::digest(data).as_slice(), "block {cid} does not hash to its CID");
}

/// Verifies the commit block with jacquard-repo's `Commit` model and the
/// `k256` crate. Returns `commit.data`.
///
/// jacquard's own `Commit::verify` takes a `jacquard_common::types::crypto::
/// PublicKey`, a type this crate cannot name (jacquard-common is not a
/// dependency and jacquard-repo does not re-export it), so the signature is
/// checked here with `k256` over the unsigned commit as jacquard re-encodes
/// it. Roost's own `atp::commit::verify` is run as well, as a cross-check.
fn verify_commit_block(
    bytes: &[u8],
    did: &str,
    rev: &str,
    key: &k256::ecdsa::VerifyingKey,
    roost_key: &roost::atp::keys::PublicKey,
) -> Cid {
    use k256::ecdsa::signature::Verifier as _;
    let commit: JCommit<&str> = JCommit::from_cbor(bytes).expect("jacquard decodes the commit");
    assert_eq!(commit.did.as_str(), did, "commit did");
    assert_eq!(commit.version, 3, "commit version");
    assert_eq!(commit.rev.as_str(), rev, "commit rev == event rev");
    assert_eq!(commit.to_cbor().expect("re-encode"), bytes, "jacquard re-encodes the commit byte for byte");
    let unsigned = JUnsignedCommit {
        did: commit.did.clone(),
        version: commit.version,
        data: commit.data,
        rev: commit.rev.clone(),
        prev: commit.prev,
    };
    let msg = serde_ipld_dagcbor::to_vec(&unsigned).expect("unsigned commit encodes");
    let sig = k256::ecdsa::Signature::from_slice(&commit.sig).expect("64-byte compact signature");
    assert_eq!(sig.normalize_s(), sig, "signature must be low-S");
    key.verify(&msg, &sig).expect("commit signature verifies (k256, key from the PLC DID document)");
    let roost_commit = roost::atp::commit::verify(bytes, did, roost_key).expect("roost commit::verify");
    assert_eq!(roost_commit.data, commit.data);
    commit.data
}

/// The sync v1.1 chain of one account as seen on the stream.
///
/// For every `#commit`:
/// * the body deserializes as jacquard-api's `subscribeRepos#commit`
///   (`FirehoseCommit`, lexicon types: Did, Tid, Datetime, CidLink);
/// * the CAR parses with `jacquard_repo::car::parse_car_bytes`, its root is
///   the commit, and every block hashes to its CID (checked here with sha2);
/// * the commit block's signature, as in [`verify_commit_block`];
/// * the new MST is loaded with `jacquard_repo::Mst` from the event's blocks
///   only: every create/update path maps to the op's `cid` (whose record block
///   is in the CAR), every delete path is absent;
/// * each op is turned into a `VerifiedWriteOp` with jacquard's
///   `to_invertible_op` and inverted with `Mst::invert_op` on a second MST
///   loaded from the event's blocks only (each must return `Ok(true)`; a
///   missing block is an error, which jacquard's own `validate_v1_1` would
///   silently skip), and the resulting root must equal `prevData`;
/// * `since` is the previous event's rev, `prevData` the previous commit's
///   MST root, revs increase.
struct Chain {
    did: String,
    key: k256::ecdsa::VerifyingKey,
    roost_key: roost::atp::keys::PublicKey,
    last_seq: Option<i64>,
    rev: Option<String>,
    data: Option<Cid>,
    commits: usize,
    ops: usize,
}

impl Chain {
    async fn new(pds: &TestPds) -> Chain {
        let (roost_key, _) = plc_signing_key(&pds.http, &pds.plc.url, &pds.did).await;
        Chain {
            did: pds.did.clone(),
            key: k256_key(pds).await,
            roost_key,
            last_seq: None,
            rev: None,
            data: None,
            commits: 0,
            ops: 0,
        }
    }

    /// Checks a frame and its place in the stream (seq must be the next one).
    async fn check(&mut self, f: &Frame) {
        assert_eq!(f.op, 1, "unexpected error frame: {:?}", f.error());
        let seq = f.seq();
        if let Some(last) = self.last_seq {
            assert_eq!(seq, last + 1, "seq must increase by one (no gap, no duplicate)");
        }
        self.last_seq = Some(seq);
        assert!(f.str("time").is_some(), "{} without time", f.t());
        match f.t() {
            "#identity" | "#account" => assert_eq!(f.str("did"), Some(self.did.as_str())),
            "#sync" => {
                assert_eq!(f.str("did"), Some(self.did.as_str()));
                let rev = f.str("rev").expect("sync rev").to_owned();
                let car = jacquard_repo::car::parse_car_bytes(f.bytes("blocks")).await.expect("sync CAR");
                let block = car.blocks.get(&car.root).expect("sync CAR holds its root commit");
                check_cid(&car.root, block);
                let data = verify_commit_block(block, &self.did, &rev, &self.key, &self.roost_key);
                self.advance(rev, data);
            }
            "#commit" => self.check_commit(f).await,
            other => panic!("unexpected frame type {other}"),
        }
    }

    fn advance(&mut self, rev: String, data: Cid) {
        if let Some(prev) = &self.rev {
            assert!(rev > *prev, "rev {rev} must be after {prev}");
        }
        self.rev = Some(rev);
        self.data = Some(data);
    }

    async fn check_commit(&mut self, f: &Frame) {
        let fc: FirehoseCommit =
            serde_ipld_dagcbor::from_slice(f.body_bytes()).expect("body is a lexicon subscribeRepos#commit");
        assert_eq!(fc.repo.as_str(), self.did);
        assert!(!fc.too_big && !fc.rebase, "tooBig/rebase are deprecated and false");
        assert!(fc.blobs.is_empty(), "no blobs in these tests");
        let rev = fc.rev.as_str().to_owned();
        let commit_cid = f.link("commit").expect("commit link");
        let prev_data = f.link("prevData").expect("sync v1.1: prevData is present");
        if let Some(prev_rev) = &self.rev {
            assert_eq!(f.str("since"), Some(prev_rev.as_str()), "since == previous rev");
        }
        if let Some(data) = self.data {
            assert_eq!(prev_data, data, "prevData == previous commit's MST root");
        }
        assert!(!fc.ops.is_empty() && fc.ops.len() <= 200, "1..=200 ops");

        let car = jacquard_repo::car::parse_car_bytes(&fc.blocks).await.expect("commit CAR parses");
        assert_eq!(car.root, commit_cid, "CAR root is the commit");
        for (cid, data) in &car.blocks {
            check_cid(cid, data);
        }
        let commit_bytes = car.blocks.get(&commit_cid).expect("commit block in the CAR");
        let data = verify_commit_block(commit_bytes, &self.did, &rev, &self.key, &self.roost_key);

        // Ops against the new tree.
        let new_mst = Mst::load(Arc::new(MemoryBlockStore::new_from_blocks(car.blocks.clone())), data, None);
        let mut paths = std::collections::HashSet::new();
        for op in &f.body_ops() {
            assert!(paths.insert(op.path.clone()), "path {} appears twice in one commit", op.path);
            let found = new_mst.get(&op.path).await.unwrap_or_else(|e| panic!("MST get {}: {e}", op.path));
            match op.action.as_str() {
                "create" | "update" => {
                    let cid = op.cid.expect("create/update has cid");
                    assert_eq!(found, Some(cid), "{} {} not in the new MST", op.action, op.path);
                    let block = car.blocks.get(&cid).unwrap_or_else(|| panic!("record {cid} not in the CAR"));
                    decode_cbor_strict(block).expect("record block is DAG-CBOR");
                    assert_eq!(op.action == "update", op.prev.is_some(), "prev only (and always) on update");
                }
                "delete" => {
                    assert!(op.cid.is_none(), "delete has cid null");
                    assert!(op.prev.is_some(), "sync v1.1: delete has prev");
                    assert_eq!(found, None, "deleted {} still in the new MST", op.path);
                }
                other => panic!("unknown action {other}"),
            }
        }

        // Inversion on a tree loaded only from the event's blocks.
        let mut mst = Mst::load(Arc::new(MemoryBlockStore::new_from_blocks(car.blocks.clone())), data, None);
        for op in fc.ops.iter().rev() {
            let vop: VerifiedWriteOp = to_invertible_op(op).expect("op is invertible (v1.1 fields present)");
            let shown = format!("{vop:?}");
            match mst.invert_op(vop).await {
                Ok(true) => {}
                Ok(false) => panic!("op {shown} does not invert"),
                Err(e) => panic!("inverting {shown}: {e} (a block missing from the event?)"),
            }
        }
        let inverted = mst.get_pointer().await.expect("inverted root (all nodes in the event?)");
        assert_eq!(inverted, prev_data, "inverting the ops must give prevData");

        self.commits += 1;
        self.ops += fc.ops.len();
        self.advance(rev, data);
    }

    async fn check_all(&mut self, frames: &[Frame]) {
        for f in frames {
            self.check(f).await;
        }
    }
}

struct Op {
    action: String,
    path: String,
    cid: Option<Cid>,
    prev: Option<Cid>,
}

impl Frame {
    /// The ops of a `#commit`, read generically (independent of jacquard).
    fn body_ops(&self) -> Vec<Op> {
        let Some(Ipld::List(ops)) = self.body.get("ops") else { panic!("commit without ops list") };
        ops.iter()
            .map(|op| {
                let Ipld::Map(m) = op else { panic!("op is not a map") };
                let s = |k: &str| match m.get(k) {
                    Some(Ipld::String(s)) => s.clone(),
                    other => panic!("op {k}: {other:?}"),
                };
                let link = |k: &str| match m.get(k) {
                    Some(Ipld::Link(c)) => Some(*c),
                    None | Some(Ipld::Null) => None,
                    other => panic!("op {k}: {other:?}"),
                };
                assert!(m.contains_key("cid"), "op cid is required (null for deletes)");
                Op { action: s("action"), path: s("path"), cid: link("cid"), prev: link("prev") }
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------
// Writes

async fn apply_writes(pds: &TestPds, access: &str, writes: Vec<Value>) -> Value {
    let (status, out) = pds
        .post("com.atproto.repo.applyWrites", Some(access), &json!({ "repo": pds.did, "writes": writes }))
        .await;
    assert_eq!(status, StatusCode::OK, "applyWrites: {out}");
    out
}

fn create(collection: &str, rkey: &str, value: Value) -> Value {
    json!({ "$type": "com.atproto.repo.applyWrites#create", "collection": collection, "rkey": rkey, "value": value })
}

fn update(collection: &str, rkey: &str, value: Value) -> Value {
    json!({ "$type": "com.atproto.repo.applyWrites#update", "collection": collection, "rkey": rkey, "value": value })
}

fn delete(collection: &str, rkey: &str) -> Value {
    json!({ "$type": "com.atproto.repo.applyWrites#delete", "collection": collection, "rkey": rkey })
}

fn like(n: usize) -> Value {
    json!({
        "$type": "app.bsky.feed.like",
        "subject": { "uri": format!("at://did:plc:abc/app.bsky.feed.post/{n}"), "cid": "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm" },
        "createdAt": "2024-01-01T00:00:00.000Z",
    })
}

/// A mix of single and batched creates, updates and deletes in two
/// collections; returns the number of commits made.
async fn mixed_writes(pds: &TestPds, access: &str) -> usize {
    let mut commits = 0;
    for i in 0..5 {
        pds.create(access, "app.bsky.feed.post", Some(&format!("p{i}")), post(&format!("post {i}"))).await;
        commits += 1;
    }
    pds.put(access, "app.bsky.feed.post", "p1", post("post 1, edited")).await; // update
    pds.put(access, "app.bsky.feed.post", "p9", post("put as create")).await; // create via put
    pds.delete(access, "app.bsky.feed.post", "p2").await;
    commits += 3;
    // One commit with create + update + delete.
    apply_writes(
        pds,
        access,
        vec![
            create("app.bsky.feed.like", "l0", like(0)),
            update("app.bsky.feed.post", "p3", post("post 3, edited")),
            delete("app.bsky.feed.post", "p4"),
        ],
    )
    .await;
    commits += 1;
    // Bigger batches: a deeper tree, then many updates and deletes in one commit.
    let batch: Vec<Value> =
        (0..120).map(|i| create("app.bsky.feed.like", &format!("b{i:03}"), like(i))).collect();
    apply_writes(pds, access, batch).await;
    let mixed: Vec<Value> = (0..120)
        .step_by(3)
        .flat_map(|i| {
            [
                delete("app.bsky.feed.like", &format!("b{i:03}")),
                update("app.bsky.feed.like", &format!("b{:03}", i + 1), like(1000 + i)),
            ]
        })
        .collect();
    apply_writes(pds, access, mixed).await;
    commits += 2;
    commits
}

// ---------------------------------------------------------------------------
// Tests

/// cursor=0 replays everything (account creation, then commits, all
/// verified); a mid-log cursor replays exactly the suffix, byte for byte; the
/// latest cursor replays nothing and then goes live; a future cursor gets a
/// `FutureCursor` error frame and a close; malformed cursors and oversized
/// query strings are refused before the upgrade.
#[tokio::test]
async fn cursor_replay_and_edges() {
    let pds = TestPds::spawn().await;
    let (access, _) = pds.login().await;
    let commits = mixed_writes(&pds, &access).await;
    let total = 3 + commits;

    // cursor=0: everything, in order.
    let mut ws = connect(pds.port, "?cursor=0").await;
    let all = frames(&mut ws, total).await;
    assert_quiet(&mut ws, "after a full replay").await;
    let kinds: Vec<&str> = all.iter().map(Frame::t).collect();
    assert_eq!(&kinds[..3], ["#identity", "#account", "#sync"], "account creation events first");
    assert!(kinds[3..].iter().all(|k| *k == "#commit"), "then one #commit per write: {kinds:?}");
    assert_eq!(all[0].seq(), 1);
    assert_eq!(all[0].str("handle"), Some(common::HANDLE));
    assert_eq!(all[1].body.get("active"), Some(&Ipld::Bool(true)));
    let mut chain = Chain::new(&pds).await;
    chain.check_all(&all).await;
    assert_eq!(chain.commits, commits);
    let last = all.last().expect("frames").seq();
    assert_eq!(last, total as i64);
    let (head_cid, head_rev) = pds.latest().await;
    assert_eq!(chain.rev.as_deref(), Some(head_rev.as_str()), "the stream ends at the repo head");
    assert_eq!(all.last().expect("last").link("commit").expect("commit").to_string(), head_cid);

    // Mid-log: exactly the suffix, byte for byte.
    for cursor in [1, 3, 5, last - 1] {
        let mut ws = connect(pds.port, &format!("?cursor={cursor}")).await;
        let got = frames(&mut ws, (last - cursor) as usize).await;
        assert_quiet(&mut ws, "after a mid-log replay").await;
        for (g, want) in got.iter().zip(&all[cursor as usize..]) {
            assert_eq!(g.raw, want.raw, "replay from {cursor}: seq {} differs", want.seq());
        }
    }

    // Latest: nothing replayed, then live (also for a cursor-less subscriber).
    let mut at_head = connect(pds.port, &format!("?cursor={last}")).await;
    let mut live = connect(pds.port, "").await;
    assert_quiet(&mut at_head, "cursor at the head").await;
    assert_quiet(&mut live, "no cursor").await;
    pds.create(&access, "app.bsky.feed.post", Some("live"), post("live")).await;
    let f = frame(&mut at_head).await;
    assert_eq!(f.seq(), last + 1);
    assert_eq!(frame(&mut live).await.raw, f.raw, "live and cursor subscribers get the same bytes");
    chain.check(&f).await;
    let last = last + 1;

    // Future cursor: an error frame, then the stream closes.
    for cursor in [last + 1, last + 1000, i64::MAX] {
        let mut ws = connect(pds.port, &format!("?cursor={cursor}")).await;
        let f = frame(&mut ws).await;
        assert_eq!(f.error().0, "FutureCursor", "cursor {cursor}");
        match next(&mut ws, FRAME_WAIT).await {
            Next::Closed(_) => {}
            other => panic!("stream must close after FutureCursor, got {other:?}"),
        }
    }

    // Malformed cursors: 400 before the upgrade.
    for bad in ["abc", "-1", "1.5", "", "0x10", "99999999999999999999999", "1&cursor=2"] {
        let (status, body) = connect_refused(pds.port, &format!("?cursor={bad}")).await;
        assert_eq!(status, 400, "cursor={bad}: {body}");
        assert_eq!(body["error"], "InvalidRequest", "cursor={bad}: {body}");
    }

    // Huge query strings (sent raw: the client's URI type stops at 64 KiB).
    // Over the HTTP layer's limit: a 4xx. Under it, the unknown parameter is
    // ignored and the stream starts. Never a panic; the server keeps serving.
    for size in [8 * 1024, 60 * 1024, 200 * 1024, 1024 * 1024] {
        let target = format!("{SUBSCRIBE}?cursor={last}&pad={}", "a".repeat(size));
        let status = raw_upgrade(pds.port, &target).await;
        match status {
            Some(101) => assert!(size <= 64 * 1024, "a {size}-byte query string was accepted"),
            Some(s) => assert!((400..500).contains(&s), "pad {size}: HTTP {s}"),
            None => panic!("pad {size}: connection closed without a response"),
        }
    }
    let status = raw_upgrade(pds.port, &format!("{SUBSCRIBE}?cursor={}", "9".repeat(200_000))).await;
    assert!(status.is_some_and(|s| (400..500).contains(&s)), "200 kB cursor: {status:?}");
    pds.create(&access, "app.bsky.feed.post", Some("after-huge"), post("still alive")).await;
    let f = frame(&mut live).await;
    chain.check(&f).await;
    assert_eq!(f.seq(), last + 1);
}

/// A subscriber that connects with cursor=0 while writes are in flight gets
/// every event exactly once (the replay→live cutover has no gap and no
/// duplicate), and a second live subscriber sees the same bytes.
#[tokio::test]
async fn cutover_under_concurrent_writes() {
    let pds = Arc::new(TestPds::spawn().await);
    let (access, _) = pds.login().await;
    let writes = 120usize;
    let writer = {
        let pds = pds.clone();
        let access = access.clone();
        tokio::spawn(async move {
            for i in 0..writes {
                pds.create(&access, "app.bsky.feed.post", None, post(&format!("w{i}"))).await;
            }
        })
    };
    let mut early = connect(pds.port, "").await;
    // Let some writes land, then replay from the start while they continue.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let mut replayer = connect(pds.port, "?cursor=0").await;
    let overlapped = !writer.is_finished();
    let got = frames(&mut replayer, 3 + writes).await;
    writer.await.expect("writer");
    assert_quiet(&mut replayer, "after the cutover").await;
    let mut chain = Chain::new(&pds).await;
    chain.check_all(&got).await;
    assert_eq!(chain.commits, writes);
    eprintln!("cutover: the replay started while writes were still running: {overlapped}");
    // The early live subscriber has a suffix of the same stream, same bytes.
    let first = frame(&mut early).await;
    let start = (first.seq() - 1) as usize;
    assert_eq!(first.raw, got[start].raw);
    let rest = frames(&mut early, got.len() - start - 1).await;
    for (a, b) in rest.iter().zip(&got[start + 1..]) {
        assert_eq!(a.raw, b.raw);
    }
}

/// Text, binary, ping frames from a client are ignored (its stream goes on);
/// an oversized one gets that client closed cleanly while another
/// subscriber keeps receiving.
#[tokio::test]
async fn client_frames_are_ignored_or_close_cleanly() {
    let pds = TestPds::spawn().await;
    let (access, _) = pds.login().await;
    let mut chatty = connect(pds.port, "").await;
    let mut other = connect(pds.port, "").await;
    chatty.send(Message::text("hello server")).await.expect("text");
    chatty.send(Message::binary(vec![0xa1, 0x61, 0x61, 0x01])).await.expect("binary");
    chatty.send(Message::Ping(vec![1, 2, 3].into())).await.expect("ping");
    // The ping is answered.
    let pong = tokio::time::timeout(FRAME_WAIT, chatty.next()).await.expect("pong in time");
    assert!(matches!(pong, Some(Ok(Message::Pong(ref p))) if p.as_ref() == [1, 2, 3]), "{pong:?}");
    pds.create(&access, "app.bsky.feed.post", Some("a"), post("a")).await;
    let a = frame(&mut chatty).await;
    assert_eq!(frame(&mut other).await.raw, a.raw);

    // 64 KiB is over the server's 16 KiB limit for client messages.
    chatty.send(Message::binary(vec![0u8; 64 * 1024])).await.expect("big binary");
    let (extra, why) = drain(&mut chatty, FRAME_WAIT).await;
    assert!(extra.is_empty(), "no frames after an oversized client message");
    assert!(!why.starts_with("timeout"), "the server must close the stream: {why}");

    pds.create(&access, "app.bsky.feed.post", Some("b"), post("b")).await;
    let b = frame(&mut other).await;
    assert_eq!(b.seq(), a.seq() + 1);
    // And new subscribers are admitted as usual.
    let mut again = connect(pds.port, &format!("?cursor={}", a.seq())).await;
    assert_eq!(frame(&mut again).await.raw, b.raw);
}

/// Restarting on the same data directory: a live subscriber's stream ends
/// with the server; a cursor replay afterwards is byte-identical for the old
/// events; new events continue the sequence with no reuse, and a subscriber
/// resuming from its last seq gets exactly the new ones.
#[tokio::test]
async fn restart_keeps_the_log() {
    let pds = TestPds::spawn().await;
    let plc = pds.plc.clone();
    let (access, _) = pds.login().await;
    let mut live = connect(pds.port, "?cursor=0").await;
    for i in 0..10 {
        pds.create(&access, "app.bsky.feed.post", Some(&format!("r{i}")), post(&format!("r{i}"))).await;
    }
    let before = frames(&mut live, 13).await;
    let mut chain = Chain::new(&pds).await;
    chain.check_all(&before).await;
    let last_before = before.last().expect("frames").seq();

    let dir = pds.data_dir.clone();
    let tmp = pds.stop().await.expect("owned temp dir");
    let (rest, why) = drain(&mut live, FRAME_WAIT).await;
    assert!(rest.is_empty(), "no frames after shutdown");
    assert!(!why.starts_with("timeout"), "the stream ends when the server stops: {why}");

    let pds = TestPds::spawn_with(Options { dir: Some(dir), plc: Some(plc), ..Options::default() }).await;
    let (access, _) = pds.login().await;
    let mut resumed = connect(pds.port, &format!("?cursor={last_before}")).await;
    assert_quiet(&mut resumed, "resume at the head after restart").await;
    for i in 10..15 {
        pds.create(&access, "app.bsky.feed.post", Some(&format!("r{i}")), post(&format!("r{i}"))).await;
    }
    let after = frames(&mut resumed, 5).await;
    assert_eq!(after[0].seq(), last_before + 1, "seq continues after the restart");
    chain.check_all(&after).await;

    let mut replay = connect(pds.port, "?cursor=0").await;
    let all = frames(&mut replay, before.len() + after.len()).await;
    assert_quiet(&mut replay, "after replay").await;
    for (a, b) in all.iter().zip(before.iter().chain(&after)) {
        assert_eq!(a.raw, b.raw, "seq {}: replay after restart differs", b.seq());
    }
    drop(tmp);
}

/// One subscriber never reads (small receive buffer, never polled) while
/// another reads everything. The healthy one must get every event in order;
/// the stuck one is cut off (`ConsumerTooSlow` once it reads, then a close);
/// memory stays bounded.
#[tokio::test]
async fn slow_consumer_is_dropped_healthy_one_is_not() {
    const BATCHES: usize = 16;
    const PER_BATCH: usize = 50;
    let pds = TestPds::spawn().await;
    let (access, _) = pds.login().await;
    let rss_start = vm_rss_kib();
    let peak = Arc::new(AtomicU64::new(rss_start));
    let sampler = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                peak.fetch_max(vm_rss_kib(), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    let mut stuck = connect_from("127.0.0.1", pds.port, "", Some(4096)).await.expect("stuck subscriber");
    let mut healthy = connect(pds.port, "").await;
    let reader = tokio::spawn(async move {
        let mut got = Vec::with_capacity(BATCHES);
        let mut bytes = 0usize;
        while got.len() < BATCHES {
            let f = frame(&mut healthy).await;
            bytes += f.raw.len();
            got.push(f);
        }
        (got, bytes, healthy)
    });
    // 10 kB records: each commit frame is ~0.5 MB, ~8 MB in all, more than
    // twice what the socket buffers between the server and the stuck client
    // hold (it reads ~3 MB, then the error frame). Fewer, larger records than
    // "6000 small creates" keep the test short. A client that reads nothing
    // is cut off by the send timeout (SEND_TIMEOUT, 15 s); the other path,
    // `RecvError::Lagged` once the server task is 4096 frames (LIVE_BUFFER)
    // behind, needs a client that reads, slowly, while > 4096 events are
    // written plus what its socket buffers hold: thousands of commits, which
    // the firehose_load example does in release mode (--lag-events).
    let text = "x".repeat(10_000);
    let t0 = Instant::now();
    for b in 0..BATCHES {
        let writes = (0..PER_BATCH)
            .map(|i| create("app.bsky.feed.post", &format!("s{b:02}x{i:03}"), post(&text)))
            .collect();
        apply_writes(&pds, &access, writes).await;
    }
    let pushed = Instant::now();
    let (got, bytes, mut healthy) = reader.await.expect("healthy reader");
    let delivered = Instant::now();
    let mut chain = Chain::new(&pds).await;
    chain.check_all(&got).await;
    assert_eq!(chain.ops, BATCHES * PER_BATCH);
    assert_eq!(got[0].seq(), 4);
    assert!(bytes > 6_000_000, "only {bytes} bytes pushed");

    // The server gives up on a send after 15 s (SEND_TIMEOUT in
    // xrpc/subscribe.rs); wait that long past the last write, then read.
    tokio::time::sleep_until((pushed + Duration::from_secs(16)).into()).await;
    let (seen, why) = drain(&mut stuck, Duration::from_secs(20)).await;
    let rss_peak = peak.load(Ordering::Relaxed);
    sampler.abort();
    let rss_end = vm_rss_kib();
    let mut expect = 4;
    let mut too_slow = false;
    for f in &seen {
        if f.op == -1 {
            assert_eq!(f.error().0, "ConsumerTooSlow");
            too_slow = true;
            continue;
        }
        assert!(!too_slow, "frames after the error frame");
        assert_eq!(f.seq(), expect, "the stuck subscriber's frames are a prefix, in order");
        expect += 1;
    }
    eprintln!(
        "slow consumer: pushed {BATCHES}x{PER_BATCH} creates ({:.1} MB of frames) in {:.2?}, healthy had all \
         {:.2?} after the last write; stuck subscriber read {} frames later, error frame: {too_slow}, end: {why}; \
         RSS start {} MiB, peak {} MiB, end {} MiB",
        bytes as f64 / 1e6,
        pushed - t0,
        delivered - pushed,
        seen.iter().filter(|f| f.op == 1).count(),
        rss_start / 1024,
        rss_peak / 1024,
        rss_end / 1024,
    );
    assert!(seen.len() < BATCHES || too_slow, "the stuck subscriber was not cut off");
    assert!(!why.starts_with("timeout"), "the stuck subscriber's stream must end: {why}");
    // Bounded: the backlog is a few MB; allow generous slack for the
    // allocator and the other tests running in this process.
    assert!(rss_peak - rss_start < 512 * 1024, "RSS grew by {} MiB", (rss_peak - rss_start) / 1024);

    // The healthy subscriber is still live.
    pds.create(&access, "app.bsky.feed.post", Some("after"), post("after")).await;
    let f = frame(&mut healthy).await;
    assert_eq!(f.seq(), got.last().expect("got").seq() + 1);
}

/// `firehose_max_per_ip` = 2: a third subscriber from 127.0.0.1 gets HTTP
/// 429 `RateLimitExceeded`; another address is still admitted; once one
/// closes a new one is admitted. `firehose_max_subscribers` = 3 caps the total.
#[tokio::test]
async fn subscriber_limits() {
    let pds = TestPds::spawn_with(Options {
        configure: Some(Box::new(|c| {
            c.firehose_max_per_ip = 2;
            c.firehose_max_subscribers = 3;
        })),
        ..Options::default()
    })
    .await;
    let refused = |r: Result<WebSocketStream<tokio::net::TcpStream>, tungstenite::Error>| match r {
        Ok(_) => panic!("admitted over the limit"),
        Err(tungstenite::Error::Http(resp)) => {
            let body: Value =
                serde_json::from_slice(resp.body().as_deref().unwrap_or_default()).unwrap_or(Value::Null);
            assert_eq!(resp.status().as_u16(), 429, "{body}");
            assert_eq!(body["error"], "RateLimitExceeded", "{body}");
        }
        Err(e) => panic!("expected 429, got {e}"),
    };
    let mut a = connect_from("127.0.0.1", pds.port, "", None).await.expect("first");
    let _b = connect_from("127.0.0.1", pds.port, "", None).await.expect("second");
    refused(connect_from("127.0.0.1", pds.port, "", None).await);
    let (status, body) = connect_refused(pds.port, "").await;
    assert_eq!((status, body["error"].as_str()), (429, Some("RateLimitExceeded")));
    // Another address has its own allowance, up to the global cap.
    let _c = connect_from("127.0.0.2", pds.port, "", None).await.expect("other address");
    refused(connect_from("127.0.0.3", pds.port, "", None).await);

    // A closes; its slot comes back.
    a.close(None).await.expect("close");
    let (_, why) = drain(&mut a, FRAME_WAIT).await;
    assert!(!why.starts_with("timeout"), "{why}");
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut d = loop {
        match connect_from("127.0.0.1", pds.port, "?cursor=0", None).await {
            Ok(ws) => break ws,
            Err(e) if Instant::now() < deadline => {
                assert!(matches!(e, tungstenite::Error::Http(_)), "{e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("slot not released within 5 s: {}", describe(&e)),
        }
    };
    assert_eq!(frame(&mut d).await.t(), "#identity", "the new subscriber works");
    refused(connect_from("127.0.0.1", pds.port, "", None).await);
}

/// Shutting the server down while subscribers are replaying: their streams
/// must end cleanly (a close, no error frame), not carry on replaying after
/// `App::serve` has returned and then fail on the closed database.
#[tokio::test]
async fn shutdown_ends_replaying_streams_cleanly() {
    let pds = TestPds::spawn().await;
    let (access, _) = pds.login().await;
    // ~8 MB of log: more than the socket buffers hold.
    let text = "x".repeat(10_000);
    for b in 0..16 {
        let writes =
            (0..50).map(|i| create("app.bsky.feed.post", &format!("s{b:02}x{i:03}"), post(&text))).collect();
        apply_writes(&pds, &access, writes).await;
    }
    // One subscriber that does not read, one that has read a single frame.
    let mut stuck = connect_from("127.0.0.1", pds.port, "?cursor=0", Some(4096)).await.expect("stuck");
    let mut slow = connect_from("127.0.0.1", pds.port, "?cursor=0", None).await.expect("reading");
    assert_eq!(frame(&mut slow).await.t(), "#identity");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stopped = Instant::now();
    let tmp = pds.stop().await;
    let stop_took = stopped.elapsed();
    let mut failures = Vec::new();
    // A consumer that does not read must not hold shutdown for the 15 s send
    // timeout: sends race the shutdown signal, and serve() waits at most 3 s.
    if stop_took > Duration::from_secs(6) {
        failures.push(format!("stop() took {stop_took:.2?} with a stuck subscriber"));
    }
    for (name, ws) in [("reading", &mut slow), ("stuck", &mut stuck)] {
        let (got, why) = drain(ws, FRAME_WAIT).await;
        let errors: Vec<_> = got.iter().filter(|f| f.op == -1).map(Frame::error).collect();
        eprintln!(
            "shutdown (stop() took {stop_took:.2?}): {name} subscriber got {} more frames after stop(), \
             errors {errors:?}, end: {why}",
            got.len()
        );
        if why.starts_with("timeout") {
            failures.push(format!("{name}: the stream did not end at shutdown"));
        }
        if !errors.is_empty() {
            failures.push(format!("{name}: the stream must end cleanly at shutdown, got {errors:?}"));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
    drop(tmp);
}

fn text(f: &Frame, field: &str) -> Option<String> {
    match f.body.get(field) {
        Some(Ipld::String(s)) => Some(s.clone()),
        _ => None,
    }
}

fn flag(f: &Frame, field: &str) -> Option<bool> {
    match f.body.get(field) {
        Some(Ipld::Bool(b)) => Some(*b),
        _ => None,
    }
}

/// Status changes and handle changes reach the firehose as the sync spec
/// says: `#account` on deactivate/activate/delete, `#identity` + `#sync` on
/// activation, `#identity` on a handle change (after the PLC update).
#[tokio::test]
async fn account_lifecycle_events() {
    let pds = TestPds::spawn().await;
    let (access, _) = pds.login().await;
    let mut ws = connect(pds.port, "").await;

    let (status, body) = pds.post("com.atproto.server.deactivateAccount", Some(&access), &json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let f = frame(&mut ws).await;
    assert_eq!(
        (f.t(), text(&f, "did"), flag(&f, "active")),
        ("#account", Some(pds.did.clone()), Some(false))
    );
    assert_eq!(text(&f, "status").as_deref(), Some("deactivated"));
    let (status, body) = pds
        .post(
            "com.atproto.repo.createRecord",
            Some(&access),
            &json!({"repo": pds.did, "collection": "app.bsky.feed.post", "record": post("while away")}),
        )
        .await;
    assert_eq!((status.as_u16(), body["error"].as_str()), (400, Some("AccountDeactivated")), "{body}");
    let (_, st) = pds.get_auth("com.atproto.server.checkAccountStatus", &access, &[]).await;
    assert_eq!(st["activated"], false, "{st}");
    assert_eq!(st["validDid"], true, "the mock PLC holds our key and endpoint: {st}");

    let (status, _) = pds.post("com.atproto.server.activateAccount", Some(&access), &json!(null)).await;
    assert_eq!(status, StatusCode::OK);
    let got = frames(&mut ws, 3).await;
    let kinds: Vec<&str> = got.iter().map(Frame::t).collect();
    assert_eq!(kinds, ["#identity", "#account", "#sync"]);
    assert_eq!(text(&got[0], "handle"), Some(pds.handle.clone()));
    assert_eq!(flag(&got[1], "active"), Some(true));
    let (_, rev) = pds.latest_commit(&pds.did).await;
    assert_eq!(text(&got[2], "rev"), Some(rev));
    let (_, st) = pds.get_auth("com.atproto.server.checkAccountStatus", &access, &[]).await;
    assert_eq!(st["activated"], true);
    assert!(st["indexedRecords"].as_i64().is_some() && st["repoBlocks"].as_i64().unwrap_or(0) > 0, "{st}");

    // A new handle: signed PLC update (checked by the mock: prev chain and
    // rotation-key signature), then #identity.
    let (status, body) = pds
        .post("com.atproto.identity.updateHandle", Some(&access), &json!({"handle": "Renamed.test"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let f = frame(&mut ws).await;
    assert_eq!((f.t(), text(&f, "handle").as_deref()), ("#identity", Some("renamed.test")));
    let ops = pds.plc.ops(&pds.did);
    assert_eq!(ops.len(), 2, "genesis + update");
    assert_eq!(ops[1]["alsoKnownAs"], json!(["at://renamed.test"]));
    let (status, body) = pds.get("com.atproto.identity.resolveHandle", &[("handle", "renamed.test")]).await;
    assert_eq!((status, body["did"].as_str()), (StatusCode::OK, Some(pds.did.as_str())));
    let (status, body) = pds
        .post("com.atproto.identity.updateHandle", Some(&access), &json!({"handle": "nobody.invalid"}))
        .await;
    assert_eq!(status.as_u16(), 400, "an external handle must resolve to the DID first: {body}");
    let (status, body) =
        pds.post("com.atproto.identity.updateHandle", Some(&access), &json!({"handle": "no spaces"})).await;
    assert_eq!((status.as_u16(), body["error"].as_str()), (400, Some("InvalidHandle")), "{body}");

    // An admin takedown: #account takendown, no login, no repo; lifting it
    // emits what an activation does.
    let admin = format!(
        "Basic {}",
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, "admin:admin-pass")
    );
    let takedown = |applied: bool| json!({"subject": {"$type": "com.atproto.admin.defs#repoRef", "did": pds.did}, "takedown": {"applied": applied, "ref": "case-1"}});
    let post_admin = |body: Value| {
        let admin = admin.clone();
        let pds = &pds;
        async move {
            pds.request(
                reqwest::Method::POST,
                "/xrpc/com.atproto.admin.updateSubjectStatus",
                &[("authorization", admin.as_str()), ("content-type", "application/json")],
                Some(body.to_string().into_bytes()),
            )
            .await
        }
    };
    let resp = post_admin(takedown(true)).await;
    assert_eq!(resp.status, StatusCode::OK, "{}", resp.text());
    let f = frame(&mut ws).await;
    assert_eq!(
        (f.t(), flag(&f, "active"), text(&f, "status").as_deref()),
        ("#account", Some(false), Some("takendown"))
    );
    let (status, body) = pds
        .post(
            "com.atproto.server.createSession",
            None,
            &json!({"identifier": "renamed.test", "password": pds.password}),
        )
        .await;
    assert_eq!((status.as_u16(), body["error"].as_str()), (401, Some("AccountTakedown")), "{body}");
    let (status, body) = pds.get("com.atproto.sync.getLatestCommit", &[("did", &pds.did)]).await;
    assert_eq!(body["error"], "RepoTakendown", "{status} {body}");
    let resp = post_admin(takedown(false)).await;
    assert_eq!(resp.status, StatusCode::OK, "{}", resp.text());
    let kinds: Vec<String> = frames(&mut ws, 3).await.iter().map(|f| f.t().to_owned()).collect();
    assert_eq!(kinds, ["#identity", "#account", "#sync"]);
    let (access, _) = pds.login_as("renamed.test", &pds.password).await;

    // Deletion needs the out-of-band token.
    let (status, _) = pds.post("com.atproto.server.requestAccountDelete", Some(&access), &json!(null)).await;
    assert_eq!(status, StatusCode::OK);
    let db = roost::db::Db::open(&pds.data_dir.join("roost.sqlite")).await.expect("db");
    let token = db.account_token(&pds.did, "delete_account").await.expect("query").expect("token stored");
    let (status, body) = pds
        .post(
            "com.atproto.server.deleteAccount",
            None,
            &json!({"did": pds.did, "password": pds.password, "token": "wrong-token"}),
        )
        .await;
    assert_eq!((status.as_u16(), body["error"].as_str()), (400, Some("InvalidToken")), "{body}");
    let (status, body) = pds
        .post(
            "com.atproto.server.deleteAccount",
            None,
            &json!({"did": pds.did, "password": "bad", "token": token}),
        )
        .await;
    assert_eq!(status.as_u16(), 401, "{body}");
    let (status, body) = pds
        .post(
            "com.atproto.server.deleteAccount",
            None,
            &json!({"did": pds.did, "password": pds.password, "token": token}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let f = frame(&mut ws).await;
    assert_eq!(
        (f.t(), flag(&f, "active"), text(&f, "status").as_deref()),
        ("#account", Some(false), Some("deleted"))
    );
    let (status, _) = pds.get("com.atproto.sync.getLatestCommit", &[("did", &pds.did)]).await;
    assert_eq!(status.as_u16(), 400);
    let (status, _) = pds
        .post(
            "com.atproto.server.createSession",
            None,
            &json!({"identifier": pds.handle, "password": pds.password}),
        )
        .await;
    assert_eq!(status.as_u16(), 401);
    assert_eq!(db.repo_counts(&pds.did).await.expect("counts").blocks, 0, "no block left behind");
}
