//! Records are validated against their lexicons when the schema is known,
//! with the reference PDS's `validate` semantics. The official schemas are
//! read in place from `../shared/lexicons` through `PDS_LEXICON_DIRECTORY`;
//! the offline bundle (the pinned `@atproto/api` package) is compared with
//! them document by document and then used to validate in place of them.
//!
//! The bundle tests need the package: `ROOST_LEXICON_PACKAGE` names a local
//! tarball, otherwise it is downloaded once from the npm registry into the
//! test target directory (its SHA-512 is checked either way).

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;

use common::{Options, TestPds};
use reqwest::StatusCode;
use roost::lexicon::Bundle;
use roost::lexicon_store;
use serde_json::{Value, json};
use tokio::sync::OnceCell;

async fn pds() -> TestPds {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/lexicons");
    assert!(dir.is_dir(), "official lexicons missing at {}", dir.display());
    TestPds::spawn_with(Options {
        configure: Some(Box::new(move |c| c.lexicon_directory = Some(dir))),
        ..Options::default()
    })
    .await
}

fn post(text: Value) -> Value {
    json!({ "$type": "app.bsky.feed.post", "text": text, "createdAt": "2026-11-25T12:00:00.000Z" })
}

async fn create(
    pds: &TestPds,
    access: &str,
    collection: &str,
    record: Value,
    validate: Option<bool>,
) -> (StatusCode, Value) {
    let mut body = json!({ "repo": pds.did, "collection": collection, "record": record });
    if let Some(v) = validate {
        body["validate"] = json!(v);
    }
    pds.post("com.atproto.repo.createRecord", Some(access), &body).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn known_lexicons_are_enforced_and_unknown_ones_pass_as_unknown() {
    let pds = pds().await;
    let (access, _) = pds.login().await;
    let before = pds.latest_commit(&pds.did).await;

    let (status, body) = create(&pds, &access, "app.bsky.feed.post", post(json!(42)), None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"], "InvalidRequest");
    assert_eq!(body["message"], "Record/text must be a string", "{body}");

    let long = "é".repeat(301);
    let (status, body) = create(&pds, &access, "app.bsky.feed.post", post(json!(long)), None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body["message"].as_str().unwrap_or("").contains("graphemes"), "{body}");
    assert_eq!(pds.latest_commit(&pds.did).await, before, "rejected records must not commit");

    let (status, body) = create(&pds, &access, "app.bsky.feed.post", post(json!("hello")), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["validationStatus"], "valid");

    let custom = json!({ "$type": "com.example.thing", "anything": [1, 2, 3] });
    let (status, body) = create(&pds, &access, "com.example.thing", custom.clone(), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["validationStatus"], "unknown");

    let (status, body) = create(&pds, &access, "com.example.thing", custom.clone(), Some(true)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");

    let (status, body) = create(&pds, &access, "app.bsky.feed.post", post(json!(42)), Some(false)).await;
    assert_eq!(status, StatusCode::OK, "validate=false skips the lexicon: {body}");
    assert!(body.get("validationStatus").is_none(), "{body}");
}

// ---------------------------------------------------------------------------
// The offline bundle

/// The pinned package's tarball, verified and parsed once per test binary.
async fn bundle() -> &'static Bundle {
    static BUNDLE: OnceCell<Bundle> = OnceCell::const_new();
    BUNDLE
        .get_or_init(|| async {
            let tgz = match std::env::var_os("ROOST_LEXICON_PACKAGE") {
                Some(path) => std::fs::read(&path).expect("read ROOST_LEXICON_PACKAGE"),
                None => {
                    let cache = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
                        .join(format!("lexicon-package-{}.tgz", lexicon_store::VERSION));
                    match std::fs::read(&cache) {
                        Ok(bytes) => bytes,
                        Err(_) => {
                            common::install_crypto();
                            let http = reqwest::Client::new();
                            let bytes = lexicon_store::download(&http, lexicon_store::DEFAULT_REGISTRY)
                                .await
                                .expect("download the pinned package (or set ROOST_LEXICON_PACKAGE)");
                            std::fs::write(&cache, &bytes).expect("cache the package");
                            bytes
                        }
                    }
                }
            };
            lexicon_store::bundle_from_tarball(&tgz).expect("the pinned package builds a bundle")
        })
        .await
}

fn official() -> BTreeMap<String, Value> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/lexicons");
    let mut out = BTreeMap::new();
    let mut stack = vec![dir];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("read the official lexicons") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "json") {
                let doc: Value = serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("JSON");
                out.insert(doc["id"].as_str().expect("id").to_owned(), doc);
            }
        }
    }
    out
}

/// A document with every reference written one way (absolute, no `lex:`,
/// no `#main`), so two spellings of the same reference compare equal and
/// anything else that differs still differs. Written here independently of
/// the bundle's own normalisation, which it checks.
fn canonical(doc: &Value) -> Value {
    let id = doc["id"].as_str().unwrap_or_default().to_owned();
    let absolute = |r: &str| {
        let r = r.strip_prefix("lex:").unwrap_or(r);
        let r = if r.starts_with('#') { format!("{id}{r}") } else { r.to_owned() };
        r.strip_suffix("#main").map(str::to_owned).unwrap_or(r)
    };
    fn walk(v: &Value, absolute: &dyn Fn(&str) -> String) -> Value {
        match v {
            Value::Object(map) => {
                let ty = map.get("type").and_then(Value::as_str);
                Value::Object(
                    map.iter()
                        .map(|(k, v)| {
                            let v = match (ty, k.as_str(), v) {
                                (Some("ref"), "ref", Value::String(r)) => json!(absolute(r)),
                                (Some("union"), "refs", Value::Array(refs)) => Value::Array(
                                    refs.iter()
                                        .map(|r| json!(absolute(r.as_str().unwrap_or_default())))
                                        .collect(),
                                ),
                                _ => walk(v, absolute),
                            };
                            (k.clone(), v)
                        })
                        .collect(),
                )
            }
            Value::Array(items) => Value::Array(items.iter().map(|v| walk(v, absolute)).collect()),
            other => other.clone(),
        }
    }
    walk(doc, &absolute)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundle_covers_the_official_lexicons() {
    let bundle = bundle().await;
    let bundled: BTreeMap<&str, &Value> =
        bundle.documents.iter().map(|d| (d["id"].as_str().expect("id"), d)).collect();
    let official = official();
    assert!(official.len() > 300, "the official set is missing or partial: {}", official.len());

    // Per namespace: identical, different, missing.
    let mut table: BTreeMap<String, [usize; 3]> = BTreeMap::new();
    let (mut differing, mut missing) = (Vec::new(), Vec::new());
    for (id, doc) in &official {
        let ns = id.splitn(3, '.').take(2).collect::<Vec<_>>().join(".");
        let row = table.entry(ns).or_default();
        match bundled.get(id.as_str()) {
            Some(b) if canonical(b) == canonical(doc) => row[0] += 1,
            Some(_) => {
                row[1] += 1;
                differing.push(id.clone());
            }
            None => {
                row[2] += 1;
                missing.push(id.clone());
            }
        }
    }
    println!(
        "bundle {} {}: {} documents",
        bundle.source.package,
        bundle.source.version,
        bundle.documents.len()
    );
    println!("{:<16} {:>9} {:>9} {:>9}", "namespace", "identical", "different", "missing");
    for (ns, [same, diff, miss]) in &table {
        println!("{ns:<16} {same:>9} {diff:>9} {miss:>9}");
    }
    let offline: usize =
        official.keys().filter(|id| roost::lexicon::Catalog::is_offline_namespace(id)).count();
    let offline_same = official
        .iter()
        .filter(|(id, doc)| {
            roost::lexicon::Catalog::is_offline_namespace(id)
                && bundled.get(id.as_str()).is_some_and(|b| canonical(b) == canonical(doc))
        })
        .count();
    println!("offline namespaces: {offline_same} of {offline} official documents bundled and identical");

    assert!(differing.is_empty(), "bundled documents that differ from the official ones: {differing:?}");
    // What the package does not carry: the permission sets (its code
    // generator skips them; they matter only to OAuth `include:` scopes and
    // come from network resolution) and documents outside Bluesky's
    // namespaces. Every record, query, procedure and defs document is here.
    let unexpected: Vec<&String> = missing
        .iter()
        .filter(|id| {
            let permission_set = official[id.as_str()]["defs"]["main"]["type"] == "permission-set";
            let bluesky = roost::lexicon::Catalog::is_offline_namespace(id) || id.starts_with("tools.ozone.");
            bluesky && !permission_set
        })
        .collect();
    assert!(unexpected.is_empty(), "official documents missing from the bundle: {unexpected:?}");
    let records = official.values().filter(|d| d["defs"]["main"]["type"] == "record").count();
    let bundled_records = official
        .iter()
        .filter(|(id, d)| d["defs"]["main"]["type"] == "record" && bundled.contains_key(id.as_str()))
        .count();
    println!("record types: {bundled_records} of {records}");

    // The bundle loads as a closed catalog: every reference resolves.
    let catalog = bundle.catalog().expect("the bundle loads");
    assert_eq!(catalog.dangling_refs(), vec![], "references the bundle cannot resolve");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_installed_bundle_validates_records_offline() {
    let bundle = bundle().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("lexicons.json");
    lexicon_store::write_bundle(&path, bundle).expect("write the bundle");
    let configured = path.clone();
    let pds = TestPds::spawn_with(Options {
        configure: Some(Box::new(move |c| c.lexicons.bundle = Some(configured))),
        ..Options::default()
    })
    .await;
    let (access, _) = pds.login().await;

    let (status, body) = create(&pds, &access, "app.bsky.feed.post", post(json!(42)), None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["message"], "Record/text must be a string", "{body}");
    let (status, body) = create(&pds, &access, "app.bsky.feed.post", post(json!("hello")), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["validationStatus"], "valid");

    // Blob constraints survive the trip through the package: an avatar
    // must be a PNG or JPEG.
    let uploaded = pds
        .post_raw(
            "com.atproto.repo.uploadBlob",
            Some(&access),
            Some("text/plain"),
            b"plain text, no image".to_vec(),
        )
        .await;
    assert_eq!(uploaded.status, StatusCode::OK);
    let blob = uploaded.json()["blob"].clone();
    let profile = json!({ "$type": "app.bsky.actor.profile", "displayName": "x", "avatar": blob });
    let body =
        json!({ "repo": pds.did, "collection": "app.bsky.actor.profile", "rkey": "self", "record": profile });
    let (status, body) = pds.post("com.atproto.repo.putRecord", Some(&access), &body).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body["message"].as_str().unwrap_or("").contains("mimeType"), "{body}");

    // A damaged bundle stops the start instead of validating nothing.
    std::fs::write(&path, b"{ not json").expect("damage the bundle");
    assert!(lexicon_store::read_bundle(&path).is_err());
}
