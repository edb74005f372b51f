//! Blob storage end to end, over HTTP against an in-process server (and, for
//! the restart cases, a server restarted on the same data directory):
//! uploads (CID, MIME sniffing, size limit, streaming without a length,
//! aborted uploads), the two tiers (SQLite and the large store) checked on the
//! filesystem, `getBlob` with its headers and byte ranges, the record↔blob
//! lifecycle (references checked at write time, release on last reference,
//! edits, batches), `listBlobs`, the unused-blob TTL sweep, the crash-safe
//! deletion queue, and the same lifecycle on S3-compatible storage when
//! `ROOST_TEST_S3_ENDPOINT` names one (scripts/test starts moto for it).

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::*;
use roost::config::{Config, S3Config};

const POST: &str = "app.bsky.feed.post";
const PROFILE: &str = "app.bsky.actor.profile";
const UPLOAD: &str = "com.atproto.repo.uploadBlob";

// ---------------------------------------------------------------------------
// Helpers

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("expected a string, got {v}"))
}

/// The CID a blob must get, computed here independently of roost: CIDv1,
/// raw codec (0x55), sha2-256 multihash (0x12) of the bytes, base32.
fn raw_cid(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    let mh = multihash::Multihash::<64>::wrap(0x12, &digest).expect("sha256 multihash");
    let cid = cid::Cid::new_v1(0x55, mh).to_string();
    assert!(cid.starts_with("bafkrei"), "a raw sha256 CIDv1 in base32 starts with bafkrei: {cid}");
    cid
}

/// `n` pseudo-random bytes, distinct per `seed` (SHA-256 in counter mode).
fn noise(seed: &str, n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(n + 32);
    let mut i: u64 = 0;
    while out.len() < n {
        let mut h = Sha256::new();
        h.update(seed.as_bytes());
        h.update(i.to_le_bytes());
        out.extend_from_slice(&h.finalize());
        i += 1;
    }
    out.truncate(n);
    out
}

/// Bytes that start like a PNG file (what MIME sniffing looks at), `n` long.
fn png_like(seed: &str, n: usize) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec();
    out.extend(noise(seed, n.saturating_sub(out.len())));
    out.truncate(n);
    out
}

/// A unique seed per call, so tests never share blobs by accident.
fn seed(tag: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_nanos();
    format!("{tag}-{nanos}-{}", std::process::id())
}

fn cfg(f: impl FnOnce(&mut Config) + Send + 'static) -> Option<Configure> {
    Some(Box::new(f))
}

/// uploadBlob with a raw body; (status, JSON body).
async fn upload(
    pds: &TestPds,
    access: &str,
    bytes: &[u8],
    content_type: Option<&str>,
) -> (StatusCode, Value) {
    let r = pds.post_raw(UPLOAD, Some(access), content_type, bytes.to_vec()).await;
    (r.status, r.json())
}

/// uploadBlob that must succeed; checks the response shape and the CID, and
/// returns the `blob` object (ready to put in a record).
async fn upload_ok(pds: &TestPds, access: &str, bytes: &[u8], content_type: &str) -> Value {
    let (status, body) = upload(pds, access, bytes, Some(content_type)).await;
    assert_eq!(status, StatusCode::OK, "uploadBlob: {body}");
    let blob = &body["blob"];
    assert_eq!(blob["$type"], "blob", "{body}");
    assert_eq!(blob["ref"]["$link"], raw_cid(bytes), "the CID is CIDv1 raw sha256 of the bytes: {body}");
    assert_eq!(blob["size"], bytes.len(), "{body}");
    assert!(blob["mimeType"].as_str().is_some_and(|m| m.contains('/')), "{body}");
    assert_eq!(body.as_object().map(|o| o.len()), Some(1), "only `blob` in the response: {body}");
    assert_eq!(blob.as_object().map(|o| o.len()), Some(4), "$type, ref, mimeType, size: {body}");
    blob.clone()
}

fn cid_of(blob: &Value) -> String {
    s(&blob["ref"]["$link"]).to_owned()
}

/// A post with an images embed holding `blobs`.
fn post_with_images(text: &str, blobs: &[&Value]) -> Value {
    let images: Vec<Value> = blobs.iter().map(|b| json!({ "image": b, "alt": "test image" })).collect();
    json!({
        "$type": POST,
        "text": text,
        "createdAt": "2024-01-01T00:00:00.000Z",
        "embed": { "$type": "app.bsky.embed.images", "images": images },
    })
}

fn profile_with_avatar(name: &str, avatar: Option<&Value>) -> Value {
    let mut p = json!({ "$type": PROFILE, "displayName": name });
    if let Some(a) = avatar {
        p["avatar"] = a.clone();
    }
    p
}

/// getBlob as a raw reqwest response (headers needed).
async fn get_blob(pds: &TestPds, cid: &str, range: Option<&str>) -> reqwest::Response {
    let url = format!(
        "{}/xrpc/com.atproto.sync.getBlob?{}",
        pds.base_url,
        query_string(&[("did", pds.did.as_str()), ("cid", cid)])
    );
    let mut req = pds.http.get(url);
    if let Some(r) = range {
        req = req.header("range", r);
    }
    req.send().await.expect("GET getBlob")
}

fn header(resp: &reqwest::Response, name: &str) -> Option<String> {
    resp.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
}

/// getBlob must return exactly `bytes`, with the stored type and safe headers.
#[track_caller]
fn check_full_blob_headers(resp: &reqwest::Response, mime: &str, len: usize) {
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(resp, "content-type").as_deref(), Some(mime));
    assert_eq!(header(resp, "content-length"), Some(len.to_string()));
    assert_eq!(header(resp, "x-content-type-options").as_deref(), Some("nosniff"));
    let csp = header(resp, "content-security-policy").expect("content-security-policy header");
    assert!(csp.contains("default-src 'none'"), "CSP must forbid everything: {csp}");
}

async fn assert_blob_bytes(pds: &TestPds, cid: &str, bytes: &[u8]) {
    let resp = get_blob(pds, cid, None).await;
    let status = resp.status();
    let body = resp.bytes().await.expect("getBlob body");
    assert_eq!(status, StatusCode::OK, "getBlob {cid}: {}", String::from_utf8_lossy(&body));
    assert!(
        body[..] == bytes[..],
        "getBlob {cid}: {} bytes back, {} uploaded, or different",
        body.len(),
        bytes.len()
    );
}

async fn assert_blob_not_found(pds: &TestPds, cid: &str) {
    let resp = get_blob(pds, cid, None).await;
    let status = resp.status();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    assert_xrpc_error(status, &body, 400, "BlobNotFound");
}

/// Every regular file under `dir` (recursively); empty when `dir` is missing.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// The large-store file holding `cid`, found by name anywhere under `dir`.
fn stored_file(dir: &Path, cid: &str) -> Option<PathBuf> {
    let found: Vec<PathBuf> = files_under(dir)
        .into_iter()
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.contains(cid)))
        .collect();
    assert!(found.len() <= 1, "more than one file for {cid}: {found:?}");
    found.into_iter().next()
}

fn blob_dir(pds: &TestPds) -> PathBuf {
    pds.data_dir.join("blobs")
}

fn tmp_dir(pds: &TestPds) -> PathBuf {
    pds.data_dir.join("tmp")
}

/// Polls `cond` every 50 ms until it holds or `limit` passes.
async fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if cond() {
            return true;
        }
        if start.elapsed() > limit {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Stops `pds` and starts it again on the same directory and PLC, with
/// `configure` applied. Returns the new server and whatever owns the
/// directory (keep it alive for the test's length).
async fn restart(pds: TestPds, configure: Option<Configure>) -> (TestPds, Option<tempfile::TempDir>) {
    let dir = pds.data_dir.clone();
    let plc = pds.plc.clone();
    let tmp = pds.stop().await;
    let pds = TestPds::spawn_with(Options { dir: Some(dir), plc: Some(plc), configure }).await;
    (pds, tmp)
}

/// A `Db` on the server's database file, for what only the database shows.
async fn open_db(data_dir: &Path) -> roost::db::Db {
    roost::db::Db::open(&data_dir.join("roost.sqlite")).await.expect("open the database file")
}

/// Waits up to 3 s for the deletion queue to be empty.
async fn queue_drains(db: &roost::db::Db) -> bool {
    let start = Instant::now();
    loop {
        if db.pending_deletions(10).await.expect("pending deletions").is_empty() {
            return true;
        }
        if start.elapsed() > Duration::from_secs(3) {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn list_blobs(pds: &TestPds, extra: &[(&str, &str)]) -> Value {
    let mut q = vec![("did", pds.did.as_str())];
    q.extend_from_slice(extra);
    let (status, body) = pds.get("com.atproto.sync.listBlobs", &q).await;
    assert_eq!(status, StatusCode::OK, "listBlobs: {body}");
    body
}

fn cids(list: &Value) -> Vec<String> {
    list["cids"].as_array().expect("cids").iter().map(|c| s(c).to_owned()).collect()
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// An uploadBlob over a raw socket with `Transfer-Encoding: chunked`, so no
/// Content-Length reaches the server (this reqwest has no streaming bodies).
/// Sends `data` in `chunk`-sized pieces and reads the response concurrently
/// (the server may answer before the body is done). (status, JSON body).
async fn upload_chunked(pds: &TestPds, access: &str, data: Vec<u8>, chunk: usize) -> (u16, Value) {
    let sock = TcpStream::connect(("127.0.0.1", pds.port)).await.expect("connect");
    let (mut rd, mut wr) = sock.into_split();
    let head = format!(
        "POST /xrpc/{UPLOAD} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nAuthorization: Bearer {access}\r\n\
         Content-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        pds.port
    );
    let writer = tokio::spawn(async move {
        wr.write_all(head.as_bytes()).await?;
        for piece in data.chunks(chunk) {
            wr.write_all(format!("{:x}\r\n", piece.len()).as_bytes()).await?;
            wr.write_all(piece).await?;
            wr.write_all(b"\r\n").await?;
            wr.flush().await?;
        }
        wr.write_all(b"0\r\n\r\n").await?;
        wr.flush().await?;
        // Keep the write half open until the reader is done.
        tokio::time::sleep(Duration::from_secs(30)).await;
        Ok::<_, std::io::Error>(())
    });
    let response = tokio::time::timeout(Duration::from_secs(30), read_http_response(&mut rd))
        .await
        .expect("a response within 30 s");
    writer.abort();
    response
}

/// Reads one HTTP/1.1 response with a Content-Length body.
async fn read_http_response(rd: &mut (impl AsyncReadExt + Unpin)) -> (u16, Value) {
    let mut buf = Vec::new();
    let mut piece = [0u8; 8192];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let status: u16 = head
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("bad status line: {head}"));
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length").then(|| v.trim().parse().ok())?
                })
                .unwrap_or_else(|| panic!("no content-length in {head}"));
            if buf.len() >= end + 4 + len {
                let body = &buf[end + 4..end + 4 + len];
                let json = serde_json::from_slice(body)
                    .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into()));
                return (status, json);
            }
        }
        match rd.read(&mut piece).await {
            Ok(0) => panic!("connection closed before a full response: {}", String::from_utf8_lossy(&buf)),
            Ok(n) => buf.extend_from_slice(&piece[..n]),
            Err(e) => panic!("reading the response: {e}; got so far: {}", String::from_utf8_lossy(&buf)),
        }
    }
}

// ---------------------------------------------------------------------------
// Upload

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_returns_a_raw_cid_and_a_sniffed_mime_type() {
    let pds = TestPds::spawn().await;
    let (access, _) = pds.login().await;

    // A PNG declared as text/plain is stored and reported as a PNG.
    let png = png_like(&seed("png"), 3000);
    let blob = upload_ok(&pds, &access, &png, "text/plain").await;
    assert_eq!(blob["mimeType"], "image/png");
    let resp = get_blob(&pds, &cid_of(&blob), None).await;
    check_full_blob_headers(&resp, "image/png", png.len());

    // HTML (declared as such) must never come back as a page.
    let html = format!("<!DOCTYPE html><html><body><script>alert(1)</script>{}</body></html>", seed("h"));
    let blob = upload_ok(&pds, &access, html.as_bytes(), "text/html").await;
    assert_eq!(blob["mimeType"], "application/octet-stream");
    let resp = get_blob(&pds, &cid_of(&blob), None).await;
    check_full_blob_headers(&resp, "application/octet-stream", html.len());
    // SVG (scriptable) likewise, whatever it is declared as.
    let svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\"><script>alert(1)</script><!-- {} --></svg>",
        seed("svg")
    );
    let blob = upload_ok(&pds, &access, svg.as_bytes(), "image/svg+xml").await;
    assert_eq!(blob["mimeType"], "application/octet-stream");

    // Bytes nothing recognises keep the declared type (parameters dropped).
    let text = format!("just some words {}", seed("t"));
    let blob = upload_ok(&pds, &access, text.as_bytes(), "text/plain; charset=utf-8").await;
    assert_eq!(blob["mimeType"], "text/plain");

    // The same bytes again: the same blob.
    let again = upload_ok(&pds, &access, &png, "image/png").await;
    assert_eq!(cid_of(&again), raw_cid(&png));
    assert_eq!(again["mimeType"], "image/png");

    // Without a token: refused, nothing stored.
    let other = noise(&seed("anon"), 100);
    let (status, body) = upload(&pds, "", &other, Some("application/octet-stream")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    let r = pds.post_raw(UPLOAD, None, Some("application/octet-stream"), other.clone()).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text());
    assert_blob_not_found(&pds, &raw_cid(&other)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_blobs_live_in_sqlite_and_large_ones_in_the_disk_store() {
    // A blob directory outside the data directory, to show the setting is used.
    let blobs_tmp = tempfile::tempdir().expect("tempdir");
    let blobs = blobs_tmp.path().join("large");
    let b2 = blobs.clone();
    let pds = TestPds::spawn_with(Options {
        configure: cfg(move |c| {
            c.blobstore.sqlite_max_bytes = 1024;
            c.blobstore.disk_location = b2;
        }),
        ..Options::default()
    })
    .await;
    let (access, _) = pds.login().await;

    let at_limit = noise(&seed("1024"), 1024);
    let over = noise(&seed("1025"), 1025);
    // Larger than the router's 2 MiB body limit for other routes.
    let big = png_like(&seed("big"), 3 * 1024 * 1024 + 7);
    let small = upload_ok(&pds, &access, &at_limit, "application/octet-stream").await;
    let large = upload_ok(&pds, &access, &over, "application/octet-stream").await;
    let huge = upload_ok(&pds, &access, &big, "image/png").await;

    assert_eq!(stored_file(&blobs, &cid_of(&small)), None, "a blob of sqlite_max_bytes stays in SQLite");
    for (blob, bytes) in [(&large, &over), (&huge, &big)] {
        let path = stored_file(&blobs, &cid_of(blob))
            .unwrap_or_else(|| panic!("{} is not under {}", cid_of(blob), blobs.display()));
        assert!(std::fs::read(&path).expect("read blob file") == **bytes, "file content != upload");
    }
    assert_eq!(files_under(&blobs).len(), 2, "{:?}", files_under(&blobs));
    assert_eq!(stored_file(&blob_dir(&pds), &cid_of(&large)), None, "nothing in the default location");
    assert!(
        files_under(&tmp_dir(&pds)).is_empty(),
        "temporary files left: {:?}",
        files_under(&tmp_dir(&pds))
    );

    for (blob, bytes) in [(&small, &at_limit), (&large, &over), (&huge, &big)] {
        assert_blob_bytes(&pds, &cid_of(blob), bytes).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_limit_refuses_bigger_bodies_with_or_without_a_length() {
    const LIMIT: u64 = 100 * 1024;
    let pds = TestPds::spawn_with(Options {
        configure: cfg(|c| {
            c.blobstore.upload_limit = LIMIT;
            c.blobstore.sqlite_max_bytes = 1024;
        }),
        ..Options::default()
    })
    .await;
    let (access, _) = pds.login().await;

    // With a Content-Length over the limit: refused up front.
    let too_big = noise(&seed("big"), LIMIT as usize + 1);
    let (status, body) = upload(&pds, &access, &too_big, Some("application/octet-stream")).await;
    assert_xrpc_error(status, &body, 413, "PayloadTooLarge");

    // Without a length (chunked): refused once the stream passes the limit.
    let streamed = noise(&seed("stream"), LIMIT as usize + 64 * 1024);
    let (status, body) = upload_chunked(&pds, &access, streamed.clone(), 8 * 1024).await;
    assert_xrpc_error(StatusCode::from_u16(status).expect("status"), &body, 413, "PayloadTooLarge");

    assert!(files_under(&blob_dir(&pds)).is_empty(), "files left: {:?}", files_under(&blob_dir(&pds)));
    assert!(
        eventually(Duration::from_secs(2), || files_under(&tmp_dir(&pds)).is_empty()).await,
        "temporary files left behind: {:?}",
        files_under(&tmp_dir(&pds))
    );
    assert_blob_not_found(&pds, &raw_cid(&too_big)).await;
    assert_blob_not_found(&pds, &raw_cid(&streamed)).await;
    assert_blob_not_found(&pds, &raw_cid(&streamed[..LIMIT as usize])).await;

    // Exactly the limit is fine, by either route.
    let at_limit = noise(&seed("at"), LIMIT as usize);
    upload_ok(&pds, &access, &at_limit, "application/octet-stream").await;
    let at_limit2 = noise(&seed("at2"), LIMIT as usize);
    let (status, body) = upload_chunked(&pds, &access, at_limit2.clone(), 8 * 1024).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["blob"]["ref"]["$link"], raw_cid(&at_limit2));
    assert_blob_bytes(&pds, &raw_cid(&at_limit2), &at_limit2).await;
    assert_eq!(files_under(&blob_dir(&pds)).len(), 2, "{:?}", files_under(&blob_dir(&pds)));
    assert!(files_under(&tmp_dir(&pds)).is_empty(), "{:?}", files_under(&tmp_dir(&pds)));
}

/// A client that goes away in the middle of an upload must not leave its
/// temporary file behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_upload_leaves_no_temporary_file() {
    let pds = TestPds::spawn().await;
    let (access, _) = pds.login().await;
    let tmp = tmp_dir(&pds);
    let mut sock = TcpStream::connect(("127.0.0.1", pds.port)).await.expect("connect");
    let head = format!(
        "POST /xrpc/{UPLOAD} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nAuthorization: Bearer {access}\r\n\
         Content-Type: application/octet-stream\r\nContent-Length: 1000000\r\n\r\n",
        pds.port
    );
    sock.write_all(head.as_bytes()).await.expect("write head");
    sock.write_all(&noise(&seed("abort"), 64 * 1024)).await.expect("write some body");
    sock.flush().await.expect("flush");
    // The upload is under way: its temporary file exists.
    assert!(
        eventually(Duration::from_secs(5), || !files_under(&tmp).is_empty()).await,
        "the upload never created its temporary file under {}",
        tmp.display()
    );
    drop(sock);
    assert!(
        eventually(Duration::from_secs(3), || files_under(&tmp).is_empty()).await,
        "an aborted upload left {:?} behind",
        files_under(&tmp)
    );
    assert!(files_under(&blob_dir(&pds)).is_empty(), "{:?}", files_under(&blob_dir(&pds)));
    // The server is fine afterwards.
    let bytes = noise(&seed("after"), 2000);
    upload_ok(&pds, &access, &bytes, "application/octet-stream").await;
}

// ---------------------------------------------------------------------------
// getBlob

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_blob_serves_bytes_headers_and_ranges_from_both_tiers() {
    let pds = TestPds::spawn_with(Options {
        configure: cfg(|c| c.blobstore.sqlite_max_bytes = 1024),
        ..Options::default()
    })
    .await;
    let (access, _) = pds.login().await;
    let small_bytes = png_like(&seed("small"), 500);
    let large_bytes = png_like(&seed("large"), 5000);
    let small = upload_ok(&pds, &access, &small_bytes, "image/png").await;
    let large = upload_ok(&pds, &access, &large_bytes, "image/png").await;
    assert!(stored_file(&blob_dir(&pds), &cid_of(&small)).is_none());
    assert!(stored_file(&blob_dir(&pds), &cid_of(&large)).is_some());

    for (blob, bytes) in [(&small, &small_bytes), (&large, &large_bytes)] {
        let cid = cid_of(blob);
        let n = bytes.len();
        let resp = get_blob(&pds, &cid, None).await;
        check_full_blob_headers(&resp, "image/png", n);
        assert!(resp.bytes().await.expect("body")[..] == bytes[..], "{cid}: bytes differ");

        // A closed range.
        let resp = get_blob(&pds, &cid, Some("bytes=10-19")).await;
        assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT, "{cid}");
        assert_eq!(header(&resp, "content-range"), Some(format!("bytes 10-19/{n}")));
        assert_eq!(header(&resp, "content-length").as_deref(), Some("10"));
        assert_eq!(header(&resp, "content-type").as_deref(), Some("image/png"));
        assert_eq!(header(&resp, "x-content-type-options").as_deref(), Some("nosniff"));
        assert!(header(&resp, "content-security-policy").is_some());
        assert_eq!(&resp.bytes().await.expect("body")[..], &bytes[10..20], "{cid}: range bytes");

        // An open range: to the end.
        let resp = get_blob(&pds, &cid, Some(&format!("bytes={}-", n - 7))).await;
        assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT);
        assert_eq!(header(&resp, "content-range"), Some(format!("bytes {}-{}/{n}", n - 7, n - 1)));
        assert_eq!(&resp.bytes().await.expect("body")[..], &bytes[n - 7..]);

        // An end past the last byte is clamped to it.
        let resp = get_blob(&pds, &cid, Some(&format!("bytes={}-{}", n - 3, n + 100))).await;
        assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT);
        assert_eq!(header(&resp, "content-range"), Some(format!("bytes {}-{}/{n}", n - 3, n - 1)));
        assert_eq!(&resp.bytes().await.expect("body")[..], &bytes[n - 3..]);

        // Out of range: a 416 that names the length (RFC 9110 §15.5.17),
        // so a client can retry with a range that fits.
        for bad in [format!("bytes={n}-"), format!("bytes={}-{}", n + 10, n + 20)] {
            let resp = get_blob(&pds, &cid, Some(&bad)).await;
            assert_eq!(resp.status(), StatusCode::RANGE_NOT_SATISFIABLE, "{cid} {bad}");
            assert_eq!(header(&resp, "content-range"), Some(format!("bytes */{n}")), "{cid} {bad}");
        }
    }

    // Unknown and malformed CIDs.
    assert_blob_not_found(&pds, &raw_cid(b"never uploaded")).await;
    let resp = get_blob(&pds, "not-a-cid", None).await;
    let status = resp.status();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    assert_xrpc_error(status, &body, 400, "InvalidRequest");
}

/// `Range: bytes=0-<u64::MAX>` is a valid range (RFC 9110: a last-byte-pos at
/// or past the end means "to the end"); it must not overflow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_blob_range_with_a_huge_end_is_clamped() {
    let pds = TestPds::spawn_with(Options {
        configure: cfg(|c| c.blobstore.sqlite_max_bytes = 1024),
        ..Options::default()
    })
    .await;
    let (access, _) = pds.login().await;
    for n in [300usize, 3000] {
        let bytes = noise(&seed("huge-end"), n);
        let blob = upload_ok(&pds, &access, &bytes, "application/octet-stream").await;
        let resp = get_blob(&pds, &cid_of(&blob), Some(&format!("bytes=5-{}", u64::MAX))).await;
        let status = resp.status();
        let range = header(&resp, "content-range");
        let body = resp.bytes().await.expect("body");
        assert_eq!(status, StatusCode::PARTIAL_CONTENT, "size {n}: {}", String::from_utf8_lossy(&body));
        assert_eq!(range, Some(format!("bytes 5-{}/{n}", n - 1)), "size {n}");
        assert_eq!(&body[..], &bytes[5..], "size {n}");
    }
}

/// A blob whose row survives but whose bytes are gone from the store (a
/// file deleted by hand, a restore that missed the blob directory) is "not
/// found" for clients, as in the reference PDS, never a 500.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_whose_bytes_are_gone_from_the_store_is_not_found() {
    let pds = TestPds::spawn_with(Options {
        configure: cfg(|c| c.blobstore.sqlite_max_bytes = 1024),
        ..Options::default()
    })
    .await;
    let (access, _) = pds.login().await;
    let large_bytes = png_like(&seed("gone-large"), 5000);
    let large = upload_ok(&pds, &access, &large_bytes, "image/png").await;
    let file = stored_file(&blob_dir(&pds), &cid_of(&large)).expect("a large blob is a file");
    std::fs::remove_file(&file).expect("delete the stored file");

    // A SQLite-tier row whose bytes are NULL is the same fault in the other tier.
    let small_bytes = png_like(&seed("gone-small"), 500);
    let small = upload_ok(&pds, &access, &small_bytes, "image/png").await;
    let db = open_db(&pds.data_dir).await;
    sqlx::query("UPDATE blob SET data = NULL WHERE cid = ?")
        .bind(cid_of(&small))
        .execute(&db.pool)
        .await
        .expect("clear the bytes");

    for blob in [&large, &small] {
        for range in [None, Some("bytes=0-9")] {
            let resp = get_blob(&pds, &cid_of(blob), range).await;
            let status = resp.status();
            let body: Value = resp.json().await.unwrap_or(Value::Null);
            assert_xrpc_error(status, &body, 400, "BlobNotFound");
        }
    }
}

/// The blob check of a write runs inside the commit's transaction. Here a
/// second connection holds the write lock while it deletes the blob row (as
/// a sweep would); the write, which read the row before that delete
/// committed, must see the delete and refuse, not link a record to a blob
/// that no longer exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_deleted_while_a_write_waits_for_the_lock_is_not_linked() {
    let pds = TestPds::spawn().await;
    let (access, _) = pds.login().await;
    let bytes = png_like(&seed("race"), 4000);
    let blob = upload_ok(&pds, &access, &bytes, "image/png").await;
    let head = pds.latest().await;

    let db = open_db(&pds.data_dir).await;
    let mut tx = db.begin_write().await.expect("take the write lock");
    sqlx::query("DELETE FROM blob WHERE cid = ?")
        .bind(cid_of(&blob))
        .execute(&mut *tx)
        .await
        .expect("delete the row");

    let body = json!({ "repo": pds.did, "collection": POST, "record": post_with_images("race", &[&blob]) });
    let write = {
        let (base_url, access) = (pds.base_url.clone(), access.clone());
        tokio::spawn(async move {
            let resp = reqwest::Client::new()
                .post(format!("{base_url}/xrpc/com.atproto.repo.createRecord"))
                .bearer_auth(access)
                .json(&body)
                .send()
                .await
                .expect("send");
            let status = resp.status();
            (status, resp.json::<Value>().await.unwrap_or(Value::Null))
        })
    };
    // Long enough for the write to get past everything before the commit's
    // transaction and wait on the lock (SQLite's busy timeout is 10 s).
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(!write.is_finished(), "the write should be waiting for the write lock");
    tx.commit().await.expect("commit the delete");

    let (status, body) = write.await.expect("join");
    assert_xrpc_error(status, &body, 400, "BlobNotFound");
    assert_eq!(pds.latest().await, head, "a refused write must not commit");
    let links: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM record_blob")
        .fetch_one(&db.pool)
        .await
        .expect("count links");
    assert_eq!(links, 0, "no record may link to a deleted blob");
}

// ---------------------------------------------------------------------------
// Records and blobs

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_may_only_reference_uploaded_blobs_with_matching_type_and_size() {
    let pds = TestPds::spawn().await;
    let (access, _) = pds.login().await;
    let bytes = png_like(&seed("ref"), 4000);
    let blob = upload_ok(&pds, &access, &bytes, "image/png").await;
    let head = pds.latest().await;

    let create = |record: Value| {
        let body = json!({ "repo": pds.did, "collection": POST, "rkey": "3kbadref00000", "record": record });
        let pds = &pds;
        let access = access.clone();
        async move { pds.post("com.atproto.repo.createRecord", Some(&access), &body).await }
    };

    // A CID never uploaded here.
    let missing = noise(&seed("missing"), 100);
    let ghost = json!({
        "$type": "blob", "ref": { "$link": raw_cid(&missing) }, "mimeType": "image/png", "size": 100,
    });
    let (status, body) = create(post_with_images("ghost", &[&ghost])).await;
    assert_xrpc_error(status, &body, 400, "BlobNotFound");
    // Wrong MIME type, wrong size.
    let mut wrong_mime = blob.clone();
    wrong_mime["mimeType"] = json!("image/jpeg");
    let (status, body) = create(post_with_images("mime", &[&wrong_mime])).await;
    assert_xrpc_error(status, &body, 400, "InvalidRequest");
    let mut wrong_size = blob.clone();
    wrong_size["size"] = json!(bytes.len() + 1);
    let (status, body) = create(post_with_images("size", &[&wrong_size])).await;
    assert_xrpc_error(status, &body, 400, "InvalidRequest");
    // One bad reference spoils the whole batch.
    let (status, body) = pds
        .post(
            "com.atproto.repo.applyWrites",
            Some(&access),
            &json!({ "repo": pds.did, "writes": [
                { "$type": "com.atproto.repo.applyWrites#create", "collection": POST, "rkey": "3kgoodref0000",
                  "value": post_with_images("good", &[&blob]) },
                { "$type": "com.atproto.repo.applyWrites#create", "collection": POST, "rkey": "3kbadref00001",
                  "value": post_with_images("ghost", &[&ghost]) },
            ]}),
        )
        .await;
    assert_xrpc_error(status, &body, 400, "BlobNotFound");

    // Nothing changed.
    assert_eq!(pds.latest().await, head, "a refused write must not commit");
    assert!(pds.list_all(&pds.did, POST).await.is_empty());
    assert!(cids(&list_blobs(&pds, &[]).await).is_empty());

    // The correct reference works, and the repo verifies.
    let out = pds.create(&access, POST, None, post_with_images("ok", &[&blob])).await;
    let rkey = s(&out["uri"]).rsplit('/').next().expect("rkey").to_owned();
    let (_, value) = pds.record(&pds.did, POST, &rkey).await.expect("record");
    assert_eq!(value["embed"]["images"][0]["image"], blob, "the blob ref round-trips");
    assert_eq!(cids(&list_blobs(&pds, &[]).await), vec![cid_of(&blob)]);
    pds.verify().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_blobs_lists_referenced_blobs_with_since_and_paging() {
    let pds = TestPds::spawn().await;
    let (access, _) = pds.login().await;
    let a = upload_ok(&pds, &access, &png_like(&seed("a"), 300), "image/png").await;
    let b = upload_ok(&pds, &access, &png_like(&seed("b"), 300), "image/png").await;
    let c = upload_ok(&pds, &access, &png_like(&seed("c"), 300), "image/png").await;
    let unused = upload_ok(&pds, &access, &png_like(&seed("u"), 300), "image/png").await;

    let first = pds.create(&access, POST, None, post_with_images("a", &[&a])).await;
    let rev1 = s(&first["commit"]["rev"]).to_owned();
    pds.create(&access, POST, None, post_with_images("b and c", &[&b, &c])).await;
    // A second reference to a: still listed once.
    pds.create(&access, POST, None, post_with_images("a again", &[&a])).await;

    let all = cids(&list_blobs(&pds, &[]).await);
    assert_eq!(
        all,
        sorted(vec![cid_of(&a), cid_of(&b), cid_of(&c)]),
        "unused {} must not be listed",
        cid_of(&unused)
    );
    // Since rev1: blobs referenced by later commits (a is referenced again).
    let since = cids(&list_blobs(&pds, &[("since", &rev1)]).await);
    assert!(since.contains(&cid_of(&b)) && since.contains(&cid_of(&c)), "{since:?}");
    assert!(!since.contains(&cid_of(&unused)));
    // Since the head: nothing.
    let (_, head_rev) = pds.latest().await;
    assert!(cids(&list_blobs(&pds, &[("since", &head_rev)]).await).is_empty());

    // Paging one by one gives the same list.
    let mut paged = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..10 {
        let mut q = vec![("limit", "1")];
        if let Some(cur) = &cursor {
            q.push(("cursor", cur.as_str()));
        }
        let page = list_blobs(&pds, &q).await;
        paged.extend(cids(&page));
        match page["cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(paged, all);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_lives_while_any_record_references_it() {
    let pds = TestPds::spawn_with(Options {
        configure: cfg(|c| c.blobstore.sqlite_max_bytes = 1024),
        ..Options::default()
    })
    .await;
    let (access, _) = pds.login().await;
    let dir = blob_dir(&pds);
    for (label, n) in [("sqlite", 600usize), ("disk", 6000)] {
        let bytes = png_like(&seed(label), n);
        let blob = upload_ok(&pds, &access, &bytes, "image/png").await;
        let cid = cid_of(&blob);
        assert_eq!(stored_file(&dir, &cid).is_some(), label == "disk", "{label}");
        let one = pds.create(&access, POST, None, post_with_images("one", &[&blob])).await;
        let two = pds.create(&access, POST, None, post_with_images("two", &[&blob])).await;
        let rkey = |v: &Value| s(&v["uri"]).rsplit('/').next().expect("rkey").to_owned();

        pds.delete(&access, POST, &rkey(&one)).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_blob_bytes(&pds, &cid, &bytes).await;
        assert_eq!(stored_file(&dir, &cid).is_some(), label == "disk", "{label}: kept while referenced");
        assert_eq!(cids(&list_blobs(&pds, &[]).await), vec![cid.clone()]);

        pds.delete(&access, POST, &rkey(&two)).await;
        assert_blob_not_found(&pds, &cid).await;
        assert!(
            eventually(Duration::from_secs(2), || stored_file(&dir, &cid).is_none()).await,
            "{label}: the file of a released blob is still there"
        );
        assert!(cids(&list_blobs(&pds, &[]).await).is_empty());
        // A record can no longer reference it.
        let (status, body) = pds
            .post(
                "com.atproto.repo.createRecord",
                Some(&access),
                &json!({ "repo": pds.did, "collection": POST, "record": post_with_images("late", &[&blob]) }),
            )
            .await;
        assert_xrpc_error(status, &body, 400, "BlobNotFound");
        // Uploading the same bytes again brings it back.
        upload_ok(&pds, &access, &bytes, "image/png").await;
        assert_blob_bytes(&pds, &cid, &bytes).await;
    }
    pds.verify().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn editing_a_record_away_from_a_blob_releases_it() {
    let pds = TestPds::spawn_with(Options {
        configure: cfg(|c| c.blobstore.sqlite_max_bytes = 1024),
        ..Options::default()
    })
    .await;
    let (access, _) = pds.login().await;
    let dir = blob_dir(&pds);
    let a_bytes = png_like(&seed("a"), 5000);
    let b_bytes = png_like(&seed("b"), 700);
    let a = upload_ok(&pds, &access, &a_bytes, "image/png").await;
    let b = upload_ok(&pds, &access, &b_bytes, "image/png").await;

    pds.put(&access, PROFILE, "self", profile_with_avatar("Alice", Some(&a))).await;
    // An edit that keeps the avatar keeps the blob.
    pds.put(&access, PROFILE, "self", profile_with_avatar("Alice A.", Some(&a))).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_blob_bytes(&pds, &cid_of(&a), &a_bytes).await;
    assert!(stored_file(&dir, &cid_of(&a)).is_some());
    assert_eq!(cids(&list_blobs(&pds, &[]).await), vec![cid_of(&a)]);

    // A new avatar: the old one goes.
    pds.put(&access, PROFILE, "self", profile_with_avatar("Alice", Some(&b))).await;
    assert_blob_not_found(&pds, &cid_of(&a)).await;
    assert!(
        eventually(Duration::from_secs(2), || stored_file(&dir, &cid_of(&a)).is_none()).await,
        "the replaced avatar's file is still on disk"
    );
    assert_blob_bytes(&pds, &cid_of(&b), &b_bytes).await;
    assert_eq!(cids(&list_blobs(&pds, &[]).await), vec![cid_of(&b)]);

    // No avatar at all: that one goes too.
    pds.put(&access, PROFILE, "self", profile_with_avatar("Alice", None)).await;
    assert_blob_not_found(&pds, &cid_of(&b)).await;
    assert!(cids(&list_blobs(&pds, &[]).await).is_empty());
    pds.verify().await;
}

/// A record created and then updated in the same applyWrites batch is linked
/// only to the blobs of its final value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_then_update_in_one_batch_links_only_the_final_blobs() {
    let pds = TestPds::spawn().await;
    let (access, _) = pds.login().await;
    let a = upload_ok(&pds, &access, &png_like(&seed("a"), 400), "image/png").await;
    let b = upload_ok(&pds, &access, &png_like(&seed("b"), 400), "image/png").await;
    let rkey = "3kbatch000000";
    let (status, body) = pds
        .post(
            "com.atproto.repo.applyWrites",
            Some(&access),
            &json!({ "repo": pds.did, "writes": [
                { "$type": "com.atproto.repo.applyWrites#create", "collection": POST, "rkey": rkey,
                  "value": post_with_images("first", &[&a]) },
                { "$type": "com.atproto.repo.applyWrites#update", "collection": POST, "rkey": rkey,
                  "value": post_with_images("second", &[&b]) },
            ]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "applyWrites: {body}");
    let (_, value) = pds.record(&pds.did, POST, rkey).await.expect("record");
    assert_eq!(value["embed"]["images"][0]["image"], b);
    assert_eq!(
        cids(&list_blobs(&pds, &[]).await),
        vec![cid_of(&b)],
        "no committed record references {} (only the batch's intermediate value did)",
        cid_of(&a)
    );
}

// ---------------------------------------------------------------------------
// Unused blobs and the deletion queue

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unused_blobs_are_swept_after_the_ttl_and_referenced_ones_never() {
    let small = |c: &mut Config| c.blobstore.sqlite_max_bytes = 1024;
    let pds = TestPds::spawn_with(Options { configure: cfg(small), ..Options::default() }).await;
    let (access, _) = pds.login().await;
    let unused_large = png_like(&seed("ul"), 5000);
    let unused_small = png_like(&seed("us"), 500);
    let used_large = png_like(&seed("rl"), 5000);
    let used_small = png_like(&seed("rs"), 500);
    let ul = upload_ok(&pds, &access, &unused_large, "image/png").await;
    let us = upload_ok(&pds, &access, &unused_small, "image/png").await;
    let rl = upload_ok(&pds, &access, &used_large, "image/png").await;
    let rs = upload_ok(&pds, &access, &used_small, "image/png").await;
    pds.create(&access, POST, None, post_with_images("kept", &[&rl, &rs])).await;
    // The TTL is in whole seconds of upload age.
    tokio::time::sleep(Duration::from_millis(2100)).await;

    // Within the TTL (default one hour), a restart (which sweeps) keeps all.
    let (pds, _tmp) = restart(pds, cfg(small)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (blob, bytes) in [(&ul, &unused_large), (&us, &unused_small), (&rl, &used_large), (&rs, &used_small)]
    {
        assert_blob_bytes(&pds, &cid_of(blob), bytes).await;
    }
    assert!(stored_file(&blob_dir(&pds), &cid_of(&ul)).is_some());

    // The sweep through the database API, with a zero TTL: unused blobs'
    // rows go, large ones are queued for deletion.
    let db = open_db(&pds.data_dir).await;
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs() as i64;
    let swept = db.sweep_unused_blobs(now).await.expect("sweep");
    assert_eq!(swept, 2, "the two unused blobs");
    assert_blob_not_found(&pds, &cid_of(&ul)).await;
    assert_blob_not_found(&pds, &cid_of(&us)).await;
    assert_blob_bytes(&pds, &cid_of(&rl), &used_large).await;
    assert_blob_bytes(&pds, &cid_of(&rs), &used_small).await;
    db.pool.close().await;

    // The server finishes the queued file deletion when it next sweeps (at
    // start); this restart also has a zero TTL, which must spare referenced blobs.
    let (pds, _tmp2) = restart(
        pds,
        cfg(move |c| {
            small(c);
            c.blobstore.unused_ttl_seconds = 0;
        }),
    )
    .await;
    let dir = blob_dir(&pds);
    assert!(
        eventually(Duration::from_secs(3), || stored_file(&dir, &cid_of(&ul)).is_none()).await,
        "the swept blob's file is still on disk"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(stored_file(&dir, &cid_of(&rl)).is_some(), "a referenced blob was swept");
    assert_blob_bytes(&pds, &cid_of(&rl), &used_large).await;
    assert_blob_bytes(&pds, &cid_of(&rs), &used_small).await;
    assert_eq!(sorted(cids(&list_blobs(&pds, &[]).await)), sorted(vec![cid_of(&rl), cid_of(&rs)]));

    // A fresh unused upload is swept by a restart with a zero TTL alone.
    let (access, _) = pds.login().await;
    let late_bytes = png_like(&seed("late"), 5000);
    let late = upload_ok(&pds, &access, &late_bytes, "image/png").await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (pds, _tmp3) = restart(
        pds,
        cfg(move |c| {
            small(c);
            c.blobstore.unused_ttl_seconds = 0;
        }),
    )
    .await;
    let dir = blob_dir(&pds);
    assert!(
        eventually(Duration::from_secs(3), || stored_file(&dir, &cid_of(&late)).is_none()).await,
        "an unused upload older than the TTL survived a sweep"
    );
    assert_blob_not_found(&pds, &cid_of(&late)).await;
    assert_blob_bytes(&pds, &cid_of(&rl), &used_large).await;
    pds.verify().await;
}

/// Uploading bytes that are already stored (unreferenced) answers with the
/// same blob ref, which the client is about to put in a record: the unused
/// TTL must count from that upload, not the first one, or the blob can be
/// swept a moment after the server said it has it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploading_again_restarts_the_unused_ttl() {
    let pds = TestPds::spawn().await;
    let (access, _) = pds.login().await;
    let bytes = png_like(&seed("ttl"), 500);
    let blob = upload_ok(&pds, &access, &bytes, "image/png").await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    // The client uploads the same image again, then (a moment later) posts.
    let again = upload_ok(&pds, &access, &bytes, "image/png").await;
    assert_eq!(again, blob);
    // A sweep with a one-second TTL runs in between.
    let db = open_db(&pds.data_dir).await;
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs() as i64;
    db.sweep_unused_blobs(now - 1).await.expect("sweep");
    db.pool.close().await;
    let (status, body) = pds
        .post(
            "com.atproto.repo.createRecord",
            Some(&access),
            &json!({
                "repo": pds.did, "collection": POST, "record": post_with_images("just uploaded", &[&again]),
            }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "a blob uploaded under a second ago was swept: {body}");
    assert_blob_bytes(&pds, &cid_of(&blob), &bytes).await;
}

/// A released large blob whose file deletion never ran (a crash right after
/// the commit) is deleted after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deletion_queue_is_finished_after_a_restart() {
    let small = |c: &mut Config| c.blobstore.sqlite_max_bytes = 1024;
    let pds = TestPds::spawn_with(Options { configure: cfg(small), ..Options::default() }).await;
    let (access, _) = pds.login().await;
    let bytes = png_like(&seed("q"), 5000);
    let blob = upload_ok(&pds, &access, &bytes, "image/png").await;
    let cid = cid_of(&blob);
    let data_dir = pds.data_dir.clone();
    let did = pds.did.clone();
    let dir = blob_dir(&pds);
    let plc = pds.plc.clone();
    let tmp = pds.stop().await;
    assert!(stored_file(&dir, &cid).is_some());

    // What a release commits (the row gone, the object queued), without the
    // deletion that follows the commit.
    let db = open_db(&data_dir).await;
    let mut tx = db.begin_write().await.expect("begin");
    let queued = sqlx::query(
        "INSERT INTO blob_deletion (did, cid, tier, enqueued_at)
         SELECT did, cid, tier, 0 FROM blob WHERE did = ? AND cid = ?",
    )
    .bind(&did)
    .bind(&cid)
    .execute(&mut *tx)
    .await
    .expect("queue")
    .rows_affected();
    assert_eq!(queued, 1);
    sqlx::query("DELETE FROM blob WHERE did = ? AND cid = ?")
        .bind(&did)
        .bind(&cid)
        .execute(&mut *tx)
        .await
        .expect("delete row");
    tx.commit().await.expect("commit");
    assert_eq!(db.pending_deletions(10).await.expect("pending").len(), 1);
    db.pool.close().await;
    assert!(stored_file(&dir, &cid).is_some(), "the file is still there before the restart");

    let pds =
        TestPds::spawn_with(Options { dir: Some(data_dir.clone()), plc: Some(plc), configure: cfg(small) })
            .await;
    assert!(
        eventually(Duration::from_secs(3), || stored_file(&dir, &cid).is_none()).await,
        "the queued deletion did not run after the restart"
    );
    assert_blob_not_found(&pds, &cid).await;
    let db = open_db(&data_dir).await;
    assert!(queue_drains(&db).await, "the queue entry must be gone once the file is");
    db.pool.close().await;
    drop(pds);
    drop(tmp);
}

/// A queued deletion of an object that has since been uploaded (and
/// referenced) again must not destroy the live blob. This is the state a
/// failed or late post-commit deletion leaves when the user re-posts the same
/// image: the queue entry outlives the row it was for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_queued_deletion_spares_a_blob_that_was_uploaded_again() {
    let small = |c: &mut Config| c.blobstore.sqlite_max_bytes = 1024;
    let pds = TestPds::spawn_with(Options { configure: cfg(small), ..Options::default() }).await;
    let (access, _) = pds.login().await;
    let bytes = png_like(&seed("again"), 5000);
    let blob = upload_ok(&pds, &access, &bytes, "image/png").await;
    let cid = cid_of(&blob);
    pds.create(&access, POST, None, post_with_images("live", &[&blob])).await;
    let dir = blob_dir(&pds);

    // A leftover queue entry for the same object, from an earlier release.
    let db = open_db(&pds.data_dir).await;
    sqlx::query("INSERT INTO blob_deletion (did, cid, tier, enqueued_at) VALUES (?, ?, 'disk', 0)")
        .bind(&pds.did)
        .bind(&cid)
        .execute(&db.pool)
        .await
        .expect("queue");
    db.pool.close().await;

    // The next queue run (at start, after a restart).
    let (pds, _tmp) = restart(pds, cfg(small)).await;
    let db = open_db(&pds.data_dir).await;
    let drained = queue_drains(&db).await;
    db.pool.close().await;
    assert!(drained, "the queue was not processed at start");
    assert!(
        stored_file(&dir, &cid).is_some(),
        "the live, referenced blob's file was deleted by a stale queue entry"
    );
    assert_blob_bytes(&pds, &cid, &bytes).await;
}

// ---------------------------------------------------------------------------
// S3

/// Prints `SKIP: why` on the process's real stderr: the test harness
/// captures `eprintln!` of passing tests, and a skip must not pass silently.
fn loud_skip(why: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "\n*** SKIP: {why} ***\n");
}

/// The S3 endpoint for these tests, or None (after a loud SKIP) when unset;
/// in CI a missing endpoint is a failure.
fn s3_endpoint() -> Option<String> {
    match std::env::var("ROOST_TEST_S3_ENDPOINT") {
        Ok(e) if !e.trim().is_empty() => Some(e.trim().trim_end_matches('/').to_owned()),
        _ => {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!(
                    "ROOST_TEST_S3_ENDPOINT is not set in CI: the S3 blob tests must run \
                     (scripts/test starts moto)"
                );
            }
            loud_skip("S3 blob tests: ROOST_TEST_S3_ENDPOINT not set");
            None
        }
    }
}

/// A fresh bucket on the S3 endpoint (moto accepts unsigned bucket creation).
async fn create_bucket(endpoint: &str, tag: &str) -> String {
    let bucket = format!("roost-{tag}-{}", &raw_cid(seed(tag).as_bytes())[10..26]);
    let http = http_client();
    let resp = http.put(format!("{endpoint}/{bucket}")).send().await.expect("PUT bucket");
    assert!(resp.status().is_success(), "creating bucket {bucket}: {}", resp.status());
    bucket
}

fn s3_config(endpoint: &str, bucket: &str) -> S3Config {
    S3Config {
        bucket: bucket.to_owned(),
        region: Some("us-east-1".into()),
        endpoint: Some(endpoint.to_owned()),
        force_path_style: true,
        access_key_id: Some("test".into()),
        secret_access_key: Some("test".into()),
    }
}

/// Keys and sizes in `bucket` (ListObjectsV2), straight from the S3 server.
async fn bucket_objects(endpoint: &str, bucket: &str) -> Vec<(String, u64)> {
    let http = http_client();
    let resp = http.get(format!("{endpoint}/{bucket}?list-type=2")).send().await.expect("list bucket");
    assert!(resp.status().is_success(), "listing {bucket}: {}", resp.status());
    let xml = resp.text().await.expect("list body");
    let mut out = Vec::new();
    for part in xml.split("<Contents>").skip(1) {
        let field = |name: &str| {
            let open = format!("<{name}>");
            let close = format!("</{name}>");
            let start = part.find(&open).map(|i| i + open.len())?;
            let end = part[start..].find(&close)? + start;
            Some(part[start..end].to_owned())
        };
        let key = field("Key").expect("Key");
        let size = field("Size").and_then(|s| s.parse().ok()).expect("Size");
        out.push((key, size));
    }
    out
}

async fn object_for(endpoint: &str, bucket: &str, cid: &str) -> Option<(String, u64)> {
    let found: Vec<_> =
        bucket_objects(endpoint, bucket).await.into_iter().filter(|(k, _)| k.contains(cid)).collect();
    assert!(found.len() <= 1, "{found:?}");
    found.into_iter().next()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_blob_lifecycle() {
    let Some(endpoint) = s3_endpoint() else { return };
    let bucket = create_bucket(&endpoint, "life").await;
    let s3 = s3_config(&endpoint, &bucket);
    let pds = TestPds::spawn_with(Options {
        configure: cfg(move |c| {
            c.blobstore.sqlite_max_bytes = 1024;
            c.blobstore.s3 = Some(s3);
        }),
        ..Options::default()
    })
    .await;
    let (access, _) = pds.login().await;
    let small_bytes = png_like(&seed("s3s"), 600);
    let large_bytes = png_like(&seed("s3l"), 7000);
    // Bigger than one 5 MiB multipart part.
    let huge_bytes = noise(&seed("s3h"), 6 * 1024 * 1024 + 3);
    let small = upload_ok(&pds, &access, &small_bytes, "image/png").await;
    let large = upload_ok(&pds, &access, &large_bytes, "image/png").await;
    let huge = upload_ok(&pds, &access, &huge_bytes, "application/octet-stream").await;

    // Large blobs are objects in the bucket, not files; small ones neither.
    let (key, size) = object_for(&endpoint, &bucket, &cid_of(&large)).await.expect("large blob object in S3");
    assert_eq!(size, large_bytes.len() as u64, "{key}");
    let (_, size) = object_for(&endpoint, &bucket, &cid_of(&huge)).await.expect("huge blob object in S3");
    assert_eq!(size, huge_bytes.len() as u64);
    assert!(object_for(&endpoint, &bucket, &cid_of(&small)).await.is_none(), "small blobs stay in SQLite");
    assert!(
        files_under(&blob_dir(&pds)).is_empty(),
        "no disk files with S3: {:?}",
        files_under(&blob_dir(&pds))
    );
    assert!(files_under(&tmp_dir(&pds)).is_empty());

    for (blob, bytes) in [(&small, &small_bytes), (&large, &large_bytes), (&huge, &huge_bytes)] {
        let cid = cid_of(blob);
        let n = bytes.len();
        let resp = get_blob(&pds, &cid, None).await;
        check_full_blob_headers(&resp, s(&blob["mimeType"]), n);
        assert!(resp.bytes().await.expect("body")[..] == bytes[..], "{cid}: bytes from S3 differ");
        let resp = get_blob(&pds, &cid, Some("bytes=10-19")).await;
        assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT);
        assert_eq!(header(&resp, "content-range"), Some(format!("bytes 10-19/{n}")));
        assert_eq!(&resp.bytes().await.expect("body")[..], &bytes[10..20]);
        let resp = get_blob(&pds, &cid, Some(&format!("bytes={n}-"))).await;
        assert_eq!(resp.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    }

    // Referenced twice, released on the last reference: the object goes.
    let one = pds.create(&access, POST, None, post_with_images("one", &[&large, &small])).await;
    let two = pds.create(&access, POST, None, post_with_images("two", &[&large])).await;
    let rkey = |v: &Value| s(&v["uri"]).rsplit('/').next().expect("rkey").to_owned();
    pds.delete(&access, POST, &rkey(&one)).await;
    assert_blob_not_found(&pds, &cid_of(&small)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(object_for(&endpoint, &bucket, &cid_of(&large)).await.is_some(), "still referenced");
    assert_blob_bytes(&pds, &cid_of(&large), &large_bytes).await;
    pds.delete(&access, POST, &rkey(&two)).await;
    assert_blob_not_found(&pds, &cid_of(&large)).await;
    let start = Instant::now();
    while object_for(&endpoint, &bucket, &cid_of(&large)).await.is_some() {
        assert!(start.elapsed() < Duration::from_secs(3), "the released blob's S3 object is still there");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The unreferenced one is kept (until the unused TTL).
    assert!(object_for(&endpoint, &bucket, &cid_of(&huge)).await.is_some());
    pds.verify().await;
}

// ---------------------------------------------------------------------------
// `roost blobs` (stats, migrate)

fn roost_bin() -> &'static str {
    env!("CARGO_BIN_EXE_roost")
}

fn has_blobs_command() -> bool {
    std::process::Command::new(roost_bin())
        .args(["blobs", "--help"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Runs `roost blobs ...` on `data_dir` with PDS_* settings; (success, output).
fn run_blobs_cli(data_dir: &Path, extra_env: &[(&str, String)], args: &[&str]) -> (bool, String) {
    let mut cmd = std::process::Command::new(roost_bin());
    cmd.arg("blobs").args(args).current_dir(data_dir);
    for (k, _) in std::env::vars() {
        if k.starts_with("PDS_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("ROOST_CONFIG", data_dir.join("no-such-roost.toml"))
        .env("PDS_HOSTNAME", "localhost")
        .env("PDS_DEV_MODE", "true")
        .env("PDS_DATA_DIRECTORY", data_dir)
        .env("PDS_SQLITE_BLOB_MAX_BYTES", "1024");
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run roost blobs");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blobs_cli_stats_counts_each_tier() {
    if !has_blobs_command() {
        loud_skip("roost blobs CLI tests: this build has no `roost blobs` subcommand");
        return;
    }
    let small = |c: &mut Config| c.blobstore.sqlite_max_bytes = 1024;
    let pds = TestPds::spawn_with(Options { configure: cfg(small), ..Options::default() }).await;
    let (access, _) = pds.login().await;
    for (i, n) in [100usize, 1024, 1025, 9000].into_iter().enumerate() {
        upload_ok(&pds, &access, &noise(&seed(&format!("st{i}")), n), "application/octet-stream").await;
    }
    let data_dir = pds.data_dir.clone();
    let tmp = pds.stop().await;
    let (ok, out) = run_blobs_cli(&data_dir, &[], &["stats"]);
    assert!(ok, "roost blobs stats: {out}");
    assert_eq!(
        parse_stats(&out),
        vec![("disk".to_owned(), 2, 1025 + 9000), ("sqlite".to_owned(), 2, 100 + 1024)],
        "{out}"
    );
    drop(tmp);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blobs_cli_migrate_disk_to_s3_and_back() {
    if !has_blobs_command() {
        loud_skip("roost blobs CLI tests: this build has no `roost blobs` subcommand");
        return;
    }
    let Some(endpoint) = s3_endpoint() else { return };
    let bucket = create_bucket(&endpoint, "migr").await;
    let small = |c: &mut Config| c.blobstore.sqlite_max_bytes = 1024;
    let pds = TestPds::spawn_with(Options { configure: cfg(small), ..Options::default() }).await;
    let (access, _) = pds.login().await;
    let mut blobs = Vec::new();
    for (i, n) in [600usize, 3000, 4000, 5000].into_iter().enumerate() {
        let bytes = png_like(&seed(&format!("m{i}")), n);
        let blob = upload_ok(&pds, &access, &bytes, "image/png").await;
        blobs.push((blob, bytes));
    }
    let refs: Vec<&Value> = blobs.iter().map(|(b, _)| b).collect();
    pds.create(&access, POST, None, post_with_images("migrating", &refs)).await;
    let dir = blob_dir(&pds);
    assert_eq!(files_under(&dir).len(), 3);
    let data_dir = pds.data_dir.clone();
    let plc = pds.plc.clone();
    let tmp = pds.stop().await;

    let s3_env = vec![
        ("PDS_BLOBSTORE_S3_BUCKET", bucket.clone()),
        ("PDS_BLOBSTORE_S3_ENDPOINT", endpoint.clone()),
        ("PDS_BLOBSTORE_S3_REGION", "us-east-1".to_owned()),
        ("PDS_BLOBSTORE_S3_FORCE_PATH_STYLE", "true".to_owned()),
        ("PDS_BLOBSTORE_S3_ACCESS_KEY_ID", "test".to_owned()),
        ("PDS_BLOBSTORE_S3_SECRET_ACCESS_KEY", "test".to_owned()),
    ];
    let large_bytes: u64 = blobs[1..].iter().map(|(_, b)| b.len() as u64).sum();
    let stats = |env: &[(&str, String)]| {
        let (ok, out) = run_blobs_cli(&data_dir, env, &["stats"]);
        assert!(ok, "roost blobs stats: {out}");
        parse_stats(&out)
    };
    assert_eq!(
        stats(&s3_env),
        vec![("disk".to_owned(), 3, large_bytes), ("sqlite".to_owned(), 1, 600)],
        "stats before migrating"
    );

    let (ok, out) = run_blobs_cli(&data_dir, &s3_env, &["migrate", "--to", "s3"]);
    assert!(ok, "roost blobs migrate --to s3: {out}");
    assert!(files_under(&dir).is_empty(), "files left on disk after migrating: {:?}", files_under(&dir));
    for (blob, bytes) in &blobs[1..] {
        let (_, size) = object_for(&endpoint, &bucket, &cid_of(blob)).await.expect("migrated object");
        assert_eq!(size, bytes.len() as u64);
    }
    assert!(object_for(&endpoint, &bucket, &cid_of(&blobs[0].0)).await.is_none(), "SQLite blobs stay");
    assert_eq!(stats(&s3_env), vec![("s3".to_owned(), 3, large_bytes), ("sqlite".to_owned(), 1, 600)]);
    // Running it again moves nothing and breaks nothing.
    let (ok, out) = run_blobs_cli(&data_dir, &s3_env, &["migrate", "--to", "s3"]);
    assert!(ok, "second migrate: {out}");

    // The server, now on S3, serves every blob, and a new large one goes to S3.
    let s3 = s3_config(&endpoint, &bucket);
    let pds = TestPds::spawn_with(Options {
        dir: Some(data_dir.clone()),
        plc: Some(plc.clone()),
        configure: cfg(move |c| {
            small(c);
            c.blobstore.s3 = Some(s3);
        }),
    })
    .await;
    for (blob, bytes) in &blobs {
        assert_blob_bytes(&pds, &cid_of(blob), bytes).await;
    }
    let (access, _) = pds.login().await;
    let new_bytes = png_like(&seed("after-migrate"), 4500);
    let new_blob = upload_ok(&pds, &access, &new_bytes, "image/png").await;
    assert!(object_for(&endpoint, &bucket, &cid_of(&new_blob)).await.is_some());
    assert!(files_under(&dir).is_empty());
    pds.verify().await;
    drop(pds.stop().await);

    // And back to disk: objects become files again, the bucket empties.
    let (ok, out) = run_blobs_cli(&data_dir, &s3_env, &["migrate", "--to", "disk"]);
    assert!(ok, "roost blobs migrate --to disk: {out}");
    for (blob, bytes) in blobs[1..].iter().chain([(new_blob.clone(), new_bytes.clone())].iter()) {
        let path = stored_file(&dir, &cid_of(blob)).expect("file back on disk");
        assert!(std::fs::read(path).expect("read") == *bytes);
        assert!(object_for(&endpoint, &bucket, &cid_of(blob)).await.is_none(), "object left in S3");
    }
    let pds =
        TestPds::spawn_with(Options { dir: Some(data_dir.clone()), plc: Some(plc), configure: cfg(small) })
            .await;
    for (blob, bytes) in &blobs {
        assert_blob_bytes(&pds, &cid_of(blob), bytes).await;
    }
    assert_blob_bytes(&pds, &cid_of(&new_blob), &new_bytes).await;
    drop(pds);
    drop(tmp);
}

/// `roost blobs stats` rows: (tier, count, bytes), header skipped.
fn parse_stats(out: &str) -> Vec<(String, u64, u64)> {
    let mut rows = Vec::new();
    for line in out.lines() {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if let [tier, count, bytes] = cols[..] {
            if let (Ok(count), Ok(bytes)) = (count.parse(), bytes.parse()) {
                rows.push((tier.to_owned(), count, bytes));
            }
        }
    }
    assert!(!rows.is_empty() || out.contains("tier"), "unreadable stats output: {out}");
    rows
}
