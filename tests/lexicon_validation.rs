//! Records are validated against their lexicons when the schema is known,
//! with the reference PDS's `validate` semantics. The official schemas are
//! read in place from `../shared/lexicons` through `PDS_LEXICON_DIRECTORY`.

mod common;

use std::path::PathBuf;

use common::{Options, TestPds};
use reqwest::StatusCode;
use serde_json::{Value, json};

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
