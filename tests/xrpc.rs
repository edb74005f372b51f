//! End-to-end tests over HTTP against an in-process Roost server: plain
//! routes, sessions, record writes and reads, repository export and its
//! verification, key files, and restart on the same data directory.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use cid::Cid;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use common::*;
use roost::atp::keys::SigningKey;

const POST: &str = "app.bsky.feed.post";
const PROFILE: &str = "app.bsky.actor.profile";

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("expected a string, got {v}"))
}

// ---------------------------------------------------------------------------
// The harness itself

/// The mock PLC must be able to say no, or every identity check downstream
/// proves nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mock_plc_rejects_tampered_operations() {
    let plc = MockPlc::start().await;
    let http = http_client();
    let rotation = SigningKey::generate();
    let repo_key = SigningKey::generate();
    let genesis =
        roost::identity::genesis_op(&rotation, &repo_key.public_key(), "bob.test", "http://localhost:1234")
            .expect("genesis op");
    assert_eq!(plc_did_for(&genesis.op).expect("did"), genesis.did);
    let submit = |did: String, op: Value| {
        let http = http.clone();
        let url = format!("{}/{did}", plc.url);
        async move {
            let r = http.post(url).json(&op).send().await.expect("POST plc");
            r.status()
        }
    };

    // Tampered content, submitted under the original DID: hash mismatch.
    let mut tampered = genesis.op.clone();
    tampered["alsoKnownAs"] = json!(["at://mallory.test"]);
    assert_eq!(submit(genesis.did.clone(), tampered.clone()).await, StatusCode::BAD_REQUEST);
    // Tampered content under its own (recomputed) DID: the signature fails.
    let tampered_did = plc_did_for(&tampered).expect("did");
    assert!(
        check_genesis_op(&tampered_did, &tampered)
            .expect_err("a tampered op must not verify")
            .contains("signature")
    );
    assert_eq!(submit(tampered_did.clone(), tampered).await, StatusCode::BAD_REQUEST);
    // Signed by a key that is not a rotation key.
    let other = SigningKey::generate();
    let forged = sign_plc_op(genesis.op.clone(), &other);
    let forged_did = plc_did_for(&forged).expect("did");
    assert_eq!(submit(forged_did, forged).await, StatusCode::BAD_REQUEST);
    // Unsigned, and not a genesis op.
    let mut unsigned = genesis.op.clone();
    unsigned.as_object_mut().expect("object").remove("sig");
    let unsigned_did = plc_did_for(&unsigned).expect("did");
    assert_eq!(submit(unsigned_did, unsigned).await, StatusCode::BAD_REQUEST);
    let mut with_prev = genesis.op.clone();
    with_prev["prev"] = json!("bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm");
    let with_prev = sign_plc_op(with_prev, &rotation);
    let with_prev_did = plc_did_for(&with_prev).expect("did");
    assert_eq!(submit(with_prev_did, with_prev).await, StatusCode::BAD_REQUEST);
    // A valid op under someone else's DID.
    assert_eq!(
        submit("did:plc:aaaaaaaaaaaaaaaaaaaaaaaa".into(), genesis.op.clone()).await,
        StatusCode::BAD_REQUEST
    );
    assert!(plc.dids().is_empty(), "nothing may have been accepted yet");

    // The genuine op is accepted once, and rendered as a DID document.
    assert_eq!(submit(genesis.did.clone(), genesis.op.clone()).await, StatusCode::OK);
    assert_eq!(
        submit(genesis.did.clone(), genesis.op.clone()).await,
        StatusCode::BAD_REQUEST,
        "a second genesis for an existing DID"
    );
    let (key, doc) = plc_signing_key(&http, &plc.url, &genesis.did).await;
    assert_eq!(key, repo_key.public_key());
    assert_eq!(doc["alsoKnownAs"], json!(["at://bob.test"]));
    assert_eq!(doc["service"][0]["id"], "#atproto_pds");
    assert_eq!(doc["service"][0]["serviceEndpoint"], "http://localhost:1234");
    let log: Value = http
        .get(format!("{}/{}/log", plc.url, genesis.did))
        .send()
        .await
        .expect("log")
        .json()
        .await
        .expect("log json");
    assert_eq!(log, json!([genesis.op]));
    let missing =
        http.get(format!("{}/did:plc:bbbbbbbbbbbbbbbbbbbbbbbb", plc.url)).send().await.expect("get");
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    assert_eq!(plc.ops(&genesis.did).len(), 1);
}

// ---------------------------------------------------------------------------
// Plain routes and identity

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_routes_identity_and_server_description() {
    let pds = TestPds::spawn().await;

    let health = pds.request(Method::GET, "/xrpc/_health", &[], None).await;
    assert_eq!(health.status, StatusCode::OK);
    assert!(health.json()["version"].as_str().is_some_and(|v| !v.is_empty()), "{}", health.text());

    let banner = pds.request(Method::GET, "/", &[], None).await;
    assert_eq!(banner.status, StatusCode::OK);
    assert!(
        banner.content_type.as_deref().is_some_and(|c| c.starts_with("text/plain")),
        "{:?}",
        banner.content_type
    );
    assert!(banner.text().contains("AT Protocol"), "{}", banner.text());
    assert!(banner.text().contains("/xrpc/"), "{}", banner.text());

    let (status, desc) = pds.get("com.atproto.server.describeServer", &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(desc["did"], "did:web:localhost");
    assert_eq!(desc["availableUserDomains"], json!([".test"]));

    // /.well-known/atproto-did answers by Host.
    for host in ["alice.test", "ALICE.test", "alice.test:443"] {
        let r = pds.request(Method::GET, "/.well-known/atproto-did", &[("host", host)], None).await;
        assert_eq!(r.status, StatusCode::OK, "Host {host}: {}", r.text());
        assert_eq!(r.text().trim(), pds.did, "Host {host}");
    }
    let r = pds.request(Method::GET, "/.well-known/atproto-did", &[("host", "nobody.test")], None).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);

    let (status, body) = pds.get("com.atproto.identity.resolveHandle", &[("handle", "alice.test")]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["did"], pds.did.as_str());
    let (status, body) = pds.get("com.atproto.identity.resolveHandle", &[("handle", "Alice.TEST")]).await;
    assert_eq!(status, StatusCode::OK, "handles are case-insensitive: {body}");
    assert_eq!(body["did"], pds.did.as_str());
    let (status, body) = pds.get("com.atproto.identity.resolveHandle", &[("handle", "nobody.test")]).await;
    assert_xrpc_error(status, &body, 400, "HandleNotFound");

    // The PLC directory has the DID with this server as its PDS and the
    // same key that describeRepo reports.
    assert_eq!(pds.plc.ops(&pds.did).len(), 1);
    let (key, doc) = plc_signing_key(&pds.http, &pds.plc.url, &pds.did).await;
    assert_eq!(doc["alsoKnownAs"], json!(["at://alice.test"]));
    assert_eq!(doc["service"][0]["serviceEndpoint"], format!("http://localhost:{}", pds.port));
    let (status, repo) = pds.get("com.atproto.repo.describeRepo", &[("repo", HANDLE)]).await;
    assert_eq!(status, StatusCode::OK, "{repo}");
    assert_eq!(repo["did"], pds.did.as_str());
    assert_eq!(repo["handle"], HANDLE);
    assert_eq!(repo["handleIsCorrect"], true);
    assert_eq!(repo["didDoc"]["verificationMethod"][0]["publicKeyMultibase"], key.to_multibase());
    assert_eq!(repo["didDoc"]["service"][0]["serviceEndpoint"], format!("http://localhost:{}", pds.port));
    assert_eq!(repo["collections"], json!([]));
}

// ---------------------------------------------------------------------------
// Sessions

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_session_by_handle_did_and_email() {
    let pds = TestPds::spawn().await;
    for identifier in
        [HANDLE.to_owned(), "Alice.TEST".to_owned(), pds.did.clone(), EMAIL.to_owned(), EMAIL.to_uppercase()]
    {
        let (status, body) = pds
            .post(
                "com.atproto.server.createSession",
                None,
                &json!({ "identifier": identifier, "password": PASSWORD }),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "login as {identifier}: {body}");
        assert_eq!(body["did"], pds.did.as_str());
        assert_eq!(body["handle"], HANDLE);
        assert_eq!(body["email"], EMAIL);
        assert_eq!(body["active"], true);
        assert_eq!(body["didDoc"]["id"], pds.did.as_str());
        let access = s(&body["accessJwt"]);
        let refresh = s(&body["refreshJwt"]);
        assert_eq!(jwt_claims(access)["scope"], "com.atproto.access");
        assert_eq!(jwt_claims(access)["sub"], pds.did.as_str());
        assert_eq!(jwt_claims(refresh)["scope"], "com.atproto.refresh");
        assert!(jwt_claims(refresh)["jti"].is_string());
    }

    for (identifier, password) in [
        (HANDLE, "wrong password"),
        ("nobody.test", PASSWORD),
        ("nobody@example.com", PASSWORD),
        ("did:plc:aaaaaaaaaaaaaaaaaaaaaaaa", PASSWORD),
        (HANDLE, ""),
    ] {
        let (status, body) = pds
            .post(
                "com.atproto.server.createSession",
                None,
                &json!({ "identifier": identifier, "password": password }),
            )
            .await;
        assert_xrpc_error(status, &body, 401, "AuthenticationRequired");
    }

    let (access, _) = pds.login().await;
    let (status, me) = pds.get_auth("com.atproto.server.getSession", &access, &[]).await;
    assert_eq!(status, StatusCode::OK, "{me}");
    assert_eq!(me["did"], pds.did.as_str());
    assert_eq!(me["handle"], HANDLE);
    assert_eq!(me["email"], EMAIL);
    assert_eq!(me["active"], true);
    assert!(me.get("accessJwt").is_none(), "getSession must not mint tokens");
    let (status, body) = pds.get("com.atproto.server.getSession", &[]).await;
    assert_xrpc_error(status, &body, 401, "AuthenticationRequired");
}

async fn refresh(pds: &TestPds, token: &str) -> (StatusCode, Value) {
    pds.post("com.atproto.server.refreshSession", Some(token), &json!({})).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_rotates_and_tolerates_a_retry_within_the_grace_window() {
    let pds = TestPds::spawn().await;
    let (a0, r0) = pds.login().await;

    let (status, first) = refresh(&pds, &r0).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    let (a1, r1) = (s(&first["accessJwt"]), s(&first["refreshJwt"]));
    assert_ne!(jwt_claims(r1)["jti"], jwt_claims(&r0)["jti"], "rotated");
    assert_eq!(first["did"], pds.did.as_str());

    // A retry with the used token (a lost response) gets the same successor.
    let (status, retry) = refresh(&pds, &r0).await;
    assert_eq!(status, StatusCode::OK, "retry within grace: {retry}");
    assert_eq!(jwt_claims(s(&retry["refreshJwt"]))["jti"], jwt_claims(r1)["jti"]);

    // The successor works, and every access token of the session still does.
    let (status, second) = refresh(&pds, r1).await;
    assert_eq!(status, StatusCode::OK, "{second}");
    for access in [a0.as_str(), a1, s(&retry["accessJwt"]), s(&second["accessJwt"])] {
        let (status, body) = pds.get_auth("com.atproto.server.getSession", access, &[]).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }

    // An access token is not a refresh token.
    let (status, body) = refresh(&pds, &a0).await;
    assert_xrpc_error(status, &body, 400, "InvalidToken");
    let (status, body) = pds.post("com.atproto.server.refreshSession", None, &json!({})).await;
    assert_xrpc_error(status, &body, 401, "AuthenticationRequired");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reusing_a_refresh_token_after_the_grace_window_revokes_the_session() {
    let pds = TestPds::spawn_with(Options {
        configure: Some(Box::new(|c| c.refresh_grace_seconds = 0)),
        ..Options::default()
    })
    .await;
    let (a0, r0) = pds.login().await;
    let (bystander_access, bystander_refresh) = pds.login().await;

    let (status, first) = refresh(&pds, &r0).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    let (a1, r1) = (s(&first["accessJwt"]).to_owned(), s(&first["refreshJwt"]).to_owned());
    // Grace 0 still counts whole seconds: step past the second of use.
    tokio::time::sleep(Duration::from_millis(1100)).await;

    let (status, body) = refresh(&pds, &r0).await;
    assert_xrpc_error(status, &body, 400, "InvalidToken");
    for access in [&a0, &a1] {
        let (status, body) = pds.get_auth("com.atproto.server.getSession", access, &[]).await;
        assert_xrpc_error(status, &body, 400, "InvalidToken");
    }
    let (status, body) = refresh(&pds, &r1).await;
    assert_xrpc_error(status, &body, 400, "InvalidToken");

    // Only the compromised session ends.
    let (status, body) = pds.get_auth("com.atproto.server.getSession", &bystander_access, &[]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = refresh(&pds, &bystander_refresh).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

/// The chain of used refresh tokens is Roost's theft detector: a token that
/// was used once and is presented again after the grace window ends the
/// session. That must hold however many legitimate rotations came after it
/// (an attacker replays an old token, not the newest one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_an_old_refresh_token_revokes_the_session_after_later_rotations() {
    let pds = TestPds::spawn_with(Options {
        configure: Some(Box::new(|c| c.refresh_grace_seconds = 0)),
        ..Options::default()
    })
    .await;
    let (_, r0) = pds.login().await;
    let (status, first) = refresh(&pds, &r0).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // The legitimate client rotates again, past r0's grace window.
    let (status, second) = refresh(&pds, s(&first["refreshJwt"])).await;
    assert_eq!(status, StatusCode::OK, "{second}");
    let (a2, r2) = (s(&second["accessJwt"]), s(&second["refreshJwt"]));

    // The thief replays r0.
    let (status, body) = refresh(&pds, &r0).await;
    assert_xrpc_error(status, &body, 400, "InvalidToken");
    let (status, body) = pds.get_auth("com.atproto.server.getSession", a2, &[]).await;
    assert_xrpc_error(status, &body, 400, "InvalidToken");
    let (status, body) = refresh(&pds, r2).await;
    assert_xrpc_error(status, &body, 400, "InvalidToken");
}

/// Refreshes of different sessions at the same moment are independent:
/// none may fail because another one was writing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_refreshes_of_different_sessions_all_succeed() {
    let pds = Arc::new(TestPds::spawn().await);
    let mut sessions = Vec::new();
    for _ in 0..12 {
        sessions.push(pds.login().await.1);
    }
    let (access, _) = pds.login().await;
    for round in 0..3 {
        let mut tasks = Vec::new();
        for token in sessions.drain(..) {
            let pds = Arc::clone(&pds);
            tasks.push(tokio::spawn(async move { refresh(&pds, &token).await }));
        }
        // A repository write in the middle of it.
        let writer = {
            let pds = Arc::clone(&pds);
            let access = access.clone();
            tokio::spawn(
                async move { pds.create(&access, POST, None, post(&format!("round {round}"))).await },
            )
        };
        let mut failures = Vec::new();
        for t in tasks {
            let (status, body) = t.await.expect("task");
            if status == StatusCode::OK {
                sessions.push(s(&body["refreshJwt"]).to_owned());
            } else {
                failures.push(format!("{status} {body}"));
            }
        }
        writer.await.expect("writer");
        assert!(
            failures.is_empty(),
            "round {round}: {} of 12 concurrent refreshes failed: {failures:?}",
            failures.len()
        );
    }
}

/// Browser clients (e.g. the Bluesky web app) call the PDS cross-origin; the
/// reference PDS answers CORS preflights and sets
/// `Access-Control-Allow-Origin: *`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_allows_browser_clients() {
    let pds = TestPds::spawn().await;
    let preflight = pds
        .request(
            Method::OPTIONS,
            "/xrpc/com.atproto.server.createSession",
            &[
                ("origin", "https://app.example.com"),
                ("access-control-request-method", "POST"),
                ("access-control-request-headers", "content-type,authorization"),
            ],
            None,
        )
        .await;
    assert!(preflight.status.is_success(), "preflight answered {}: {}", preflight.status, preflight.text());
    let resp = pds
        .http
        .get(format!("{}/xrpc/com.atproto.server.describeServer", pds.base_url))
        .header("origin", "https://app.example.com")
        .send()
        .await
        .expect("GET");
    assert_eq!(resp.status(), StatusCode::OK);
    let acao =
        resp.headers().get("access-control-allow-origin").and_then(|v| v.to_str().ok()).map(str::to_owned);
    assert!(
        matches!(acao.as_deref(), Some("*") | Some("https://app.example.com")),
        "Access-Control-Allow-Origin: {acao:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_session_revokes_access_immediately() {
    let pds = TestPds::spawn().await;
    let (a1, r1) = pds.login().await;
    let (a2, _r2) = pds.login().await;

    // With the refresh token (as the reference clients do).
    let (status, body) = pds.post("com.atproto.server.deleteSession", Some(&r1), &json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = pds.get_auth("com.atproto.server.getSession", &a1, &[]).await;
    assert_xrpc_error(status, &body, 400, "InvalidToken");
    let (status, body) = refresh(&pds, &r1).await;
    assert_xrpc_error(status, &body, 400, "InvalidToken");
    let (status, body) = pds
        .post(
            "com.atproto.repo.createRecord",
            Some(&a1),
            &json!({ "repo": pds.did, "collection": POST, "record": post("x") }),
        )
        .await;
    assert_xrpc_error(status, &body, 400, "InvalidToken");

    // The other session is untouched; deleting it with its access token works too.
    let (status, body) = pds.get_auth("com.atproto.server.getSession", &a2, &[]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = pds.post("com.atproto.server.deleteSession", Some(&a2), &json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = pds.get_auth("com.atproto.server.getSession", &a2, &[]).await;
    assert_xrpc_error(status, &body, 400, "InvalidToken");

    let (status, body) = pds.post("com.atproto.server.deleteSession", None, &json!({})).await;
    assert_xrpc_error(status, &body, 401, "AuthenticationRequired");
}

// ---------------------------------------------------------------------------
// Records

fn rkey_of(uri: &str) -> &str {
    uri.rsplit('/').next().expect("rkey")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_lifecycle() {
    let pds = TestPds::spawn().await;
    let (access, _) = pds.login().await;
    let (genesis_cid, genesis_rev) = pds.latest().await;

    // createRecord without rkey: a TID is chosen.
    let record = post("hello world");
    let created = pds.create(&access, POST, None, record.clone()).await;
    let uri = s(&created["uri"]).to_owned();
    let rkey = rkey_of(&uri).to_owned();
    assert!(uri.starts_with(&format!("at://{}/{POST}/", pds.did)), "{uri}");
    assert!(roost::atp::syntax::Tid::new(rkey.as_str()).is_ok(), "{rkey}");
    let cid = s(&created["cid"]).to_owned();
    let (commit_cid, rev1) = pds.latest().await;
    assert_eq!(created["commit"]["cid"], commit_cid.as_str());
    assert_eq!(created["commit"]["rev"], rev1.as_str());
    assert_ne!(commit_cid, genesis_cid);
    assert!(rev1 > genesis_rev);

    let (status, got) = pds
        .get("com.atproto.repo.getRecord", &[("repo", &pds.did), ("collection", POST), ("rkey", &rkey)])
        .await;
    assert_eq!(status, StatusCode::OK, "{got}");
    assert_eq!(got["uri"], uri.as_str());
    assert_eq!(got["cid"], cid.as_str());
    assert_eq!(got["value"], record);
    // By handle, and pinned to the right / a wrong CID.
    assert_eq!(pds.record(HANDLE, POST, &rkey).await.expect("by handle").0, cid);
    let (status, _) = pds
        .get(
            "com.atproto.repo.getRecord",
            &[("repo", &pds.did), ("collection", POST), ("rkey", &rkey), ("cid", &cid)],
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = pds
        .get(
            "com.atproto.repo.getRecord",
            &[("repo", &pds.did), ("collection", POST), ("rkey", &rkey), ("cid", &genesis_cid)],
        )
        .await;
    assert_xrpc_error(status, &body, 400, "RecordNotFound");

    // A chosen rkey; creating it twice fails without a commit.
    let profile = json!({ "$type": PROFILE, "displayName": "Alice" });
    let created = pds.create(&access, PROFILE, Some("self"), profile.clone()).await;
    assert_eq!(created["uri"], format!("at://{}/{PROFILE}/self", pds.did));
    let before = pds.latest().await;
    let (status, body) = pds
        .post(
            "com.atproto.repo.createRecord",
            Some(&access),
            &json!({ "repo": pds.did, "collection": PROFILE, "rkey": "self", "record": profile }),
        )
        .await;
    assert_xrpc_error(status, &body, 400, "InvalidRequest");
    assert_eq!(pds.latest().await, before);

    // putRecord: update, then the identical content is a no-op.
    let profile2 = json!({ "$type": PROFILE, "displayName": "Alice B." });
    let updated = pds.put(&access, PROFILE, "self", profile2.clone()).await;
    assert_ne!(updated["cid"], created["cid"]);
    let after_update = pds.latest().await;
    assert_eq!(updated["commit"]["cid"], after_update.0.as_str());
    assert!(after_update.1 > before.1);
    let again = pds.put(&access, PROFILE, "self", profile2.clone()).await;
    assert_eq!(again["cid"], updated["cid"]);
    assert!(again.get("commit").is_none(), "no-op put made a commit: {again}");
    assert_eq!(pds.latest().await, after_update);
    assert_eq!(pds.record(&pds.did, PROFILE, "self").await.expect("profile").1, profile2);
    // putRecord of a new key creates it.
    let put_new = pds.put(&access, POST, "put-created", post("made by put")).await;
    assert!(put_new["commit"].is_object(), "{put_new}");
    assert!(pds.record(&pds.did, POST, "put-created").await.is_some());

    // deleteRecord; a second delete is a no-op without a commit.
    let deleted = pds.delete(&access, PROFILE, "self").await;
    let after_delete = pds.latest().await;
    assert_eq!(deleted["commit"]["cid"], after_delete.0.as_str());
    assert!(pds.record(&pds.did, PROFILE, "self").await.is_none());
    let again = pds.delete(&access, PROFILE, "self").await;
    assert!(again.get("commit").is_none(), "{again}");
    assert_eq!(pds.latest().await, after_delete);

    // applyWrites: create (chosen and generated rkeys), update, delete, in one commit each call.
    let (status, out) = pds
        .post(
            "com.atproto.repo.applyWrites",
            Some(&access),
            &json!({
                "repo": pds.did,
                "writes": [
                    { "$type": "com.atproto.repo.applyWrites#create", "collection": POST, "rkey": "batch-a", "value": post("a") },
                    { "$type": "com.atproto.repo.applyWrites#create", "collection": POST, "value": post("b") },
                    { "$type": "com.atproto.repo.applyWrites#create", "collection": PROFILE, "rkey": "self", "value": profile },
                ],
            }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{out}");
    let results = out["results"].as_array().expect("results");
    assert_eq!(results.len(), 3);
    assert!(results.iter().all(|r| r["$type"] == "com.atproto.repo.applyWrites#createResult"));
    let generated = rkey_of(s(&results[1]["uri"])).to_owned();
    assert_eq!(out["commit"]["cid"], pds.latest().await.0.as_str());

    let (status, out) = pds
        .post(
            "com.atproto.repo.applyWrites",
            Some(&access),
            &json!({
                "repo": pds.did,
                "writes": [
                    { "$type": "com.atproto.repo.applyWrites#update", "collection": POST, "rkey": "batch-a", "value": post("a2") },
                    { "$type": "com.atproto.repo.applyWrites#delete", "collection": POST, "rkey": generated },
                    { "$type": "com.atproto.repo.applyWrites#create", "collection": POST, "rkey": "batch-c", "value": post("c") },
                ],
            }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{out}");
    let types: Vec<&str> =
        out["results"].as_array().expect("results").iter().map(|r| s(&r["$type"])).collect();
    assert_eq!(
        types,
        [
            "com.atproto.repo.applyWrites#updateResult",
            "com.atproto.repo.applyWrites#deleteResult",
            "com.atproto.repo.applyWrites#createResult"
        ]
    );
    assert_eq!(pds.record(&pds.did, POST, "batch-a").await.expect("a").1, post("a2"));
    assert!(pds.record(&pds.did, POST, &generated).await.is_none());
    assert!(pds.record(&pds.did, POST, "batch-c").await.is_some());

    let mut collections = pds.collections(&pds.did).await;
    collections.sort();
    assert_eq!(collections, [PROFILE, POST]);
    pds.verify().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_records_pages_both_ways() {
    let pds = TestPds::spawn().await;
    let (access, _) = pds.login().await;
    let rkeys: Vec<String> = (1..=7).map(|i| format!("r{i:02}")).collect();
    let writes: Vec<Value> = rkeys
        .iter()
        .map(|r| {
            json!({ "$type": "com.atproto.repo.applyWrites#create", "collection": POST, "rkey": r, "value": post(r) })
        })
        .collect();
    let (status, out) = pds
        .post("com.atproto.repo.applyWrites", Some(&access), &json!({ "repo": pds.did, "writes": writes }))
        .await;
    assert_eq!(status, StatusCode::OK, "{out}");
    pds.create(&access, PROFILE, Some("self"), json!({ "$type": PROFILE })).await;

    async fn pages(pds: &TestPds, limit: &str, reverse: bool) -> Vec<Vec<String>> {
        let mut out = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut q = vec![("repo", pds.did.as_str()), ("collection", POST), ("limit", limit)];
            if reverse {
                q.push(("reverse", "true"));
            }
            if let Some(c) = &cursor {
                q.push(("cursor", c));
            }
            let (status, body) = pds.get("com.atproto.repo.listRecords", &q).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            let page: Vec<String> = body["records"]
                .as_array()
                .expect("records")
                .iter()
                .map(|r| {
                    assert_eq!(r["value"]["$type"], POST);
                    rkey_of(s(&r["uri"])).to_owned()
                })
                .collect();
            out.push(page);
            match body["cursor"].as_str() {
                Some(c) => {
                    assert_eq!(Some(c), out.last().and_then(|p| p.last()).map(String::as_str));
                    cursor = Some(c.to_owned());
                }
                None => return out,
            }
            assert!(out.len() < 20, "paging does not end");
        }
    }
    let v = |xs: &[&str]| xs.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    assert_eq!(
        pages(&pds, "3", false).await,
        vec![v(&["r07", "r06", "r05"]), v(&["r04", "r03", "r02"]), v(&["r01"])]
    );
    assert_eq!(
        pages(&pds, "3", true).await,
        vec![v(&["r01", "r02", "r03"]), v(&["r04", "r05", "r06"]), v(&["r07"])]
    );
    let all = pages(&pds, "7", false).await;
    assert_eq!(all.concat(), v(&["r07", "r06", "r05", "r04", "r03", "r02", "r01"]));
    assert!(all.last().is_some_and(Vec::is_empty) || all.len() == 1);
    let (status, body) = pds
        .get("com.atproto.repo.listRecords", &[("repo", &pds.did), ("collection", "com.example.empty")])
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["records"], json!([]));
    assert!(body.get("cursor").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_swaps_are_refused_and_change_nothing() {
    let pds = TestPds::spawn().await;
    let (access, _) = pds.login().await;
    let c1 =
        pds.create(&access, PROFILE, Some("self"), json!({ "$type": PROFILE, "displayName": "one" })).await;
    let (commit1, _) = pds.latest().await;
    let v2 = json!({ "$type": PROFILE, "displayName": "two" });
    let (status, c2) = pds
        .post(
            "com.atproto.repo.putRecord",
            Some(&access),
            &json!({ "repo": pds.did, "collection": PROFILE, "rkey": "self", "record": v2, "swapRecord": c1["cid"] }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "matching swapRecord: {c2}");
    let state = (pds.latest().await, pds.record(&pds.did, PROFILE, "self").await);
    let v3 = json!({ "$type": PROFILE, "displayName": "three" });

    let stale: Vec<(&str, Value)> = vec![
        (
            "com.atproto.repo.putRecord",
            json!({ "repo": pds.did, "collection": PROFILE, "rkey": "self", "record": v3, "swapRecord": c1["cid"] }),
        ),
        (
            "com.atproto.repo.putRecord",
            json!({ "repo": pds.did, "collection": PROFILE, "rkey": "self", "record": v3, "swapRecord": null }),
        ),
        (
            "com.atproto.repo.putRecord",
            json!({ "repo": pds.did, "collection": PROFILE, "rkey": "self", "record": v3, "swapCommit": commit1 }),
        ),
        (
            "com.atproto.repo.deleteRecord",
            json!({ "repo": pds.did, "collection": PROFILE, "rkey": "self", "swapRecord": c1["cid"] }),
        ),
        (
            "com.atproto.repo.deleteRecord",
            json!({ "repo": pds.did, "collection": PROFILE, "rkey": "self", "swapCommit": commit1 }),
        ),
        (
            "com.atproto.repo.createRecord",
            json!({ "repo": pds.did, "collection": POST, "record": post("x"), "swapCommit": commit1 }),
        ),
        (
            "com.atproto.repo.applyWrites",
            json!({ "repo": pds.did, "swapCommit": commit1, "writes": [
                { "$type": "com.atproto.repo.applyWrites#delete", "collection": PROFILE, "rkey": "self" }
            ] }),
        ),
    ];
    for (nsid, body) in stale {
        let (status, out) = pds.post(nsid, Some(&access), &body).await;
        assert_eq!(
            (status.as_u16(), out["error"].as_str()),
            (400, Some("InvalidSwap")),
            "{nsid} {body}: {out}"
        );
        assert_eq!(
            (pds.latest().await, pds.record(&pds.did, PROFILE, "self").await),
            state,
            "a refused {nsid} changed the repository"
        );
    }
    // Swaps that match go through.
    let (commit2, _) = pds.latest().await;
    let (status, out) = pds
        .post(
            "com.atproto.repo.putRecord",
            Some(&access),
            &json!({ "repo": pds.did, "collection": PROFILE, "rkey": "self", "record": v3,
                     "swapRecord": c2["cid"], "swapCommit": commit2 }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{out}");
    let (status, out) = pds
        .post(
            "com.atproto.repo.putRecord",
            Some(&access),
            &json!({ "repo": pds.did, "collection": POST, "rkey": "fresh", "record": post("new"), "swapRecord": null }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "swapRecord null on an absent record: {out}");
}

// ---------------------------------------------------------------------------
// Sync

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_repo_verifies_and_holds_only_reachable_blocks() {
    let pds = TestPds::spawn().await;
    let (access, _) = pds.login().await;

    // The empty repository verifies too.
    let empty = pds.verify().await;
    assert!(empty.leaves.is_empty());
    assert_eq!(empty.car_blocks.len(), 2, "commit + empty MST root");

    let mut rkeys = Vec::new();
    for i in 0..12 {
        let out = pds.create(&access, POST, None, post(&format!("post {i}"))).await;
        rkeys.push(rkey_of(s(&out["uri"])).to_owned());
    }
    for r in &rkeys[0..3] {
        pds.put(&access, POST, r, post(&format!("edited {r}"))).await;
    }
    for r in &rkeys[3..7] {
        pds.delete(&access, POST, r).await;
    }
    // Two records sharing one block; deleting one must keep the block.
    let like = json!({ "$type": "app.bsky.feed.like", "createdAt": "2024-01-01T00:00:00.000Z",
                       "subject": { "uri": "at://did:plc:aaaaaaaaaaaaaaaaaaaaaaaa/app.bsky.feed.post/3k", "cid": "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm" } });
    let l1 = pds.create(&access, "app.bsky.feed.like", Some("l1"), like.clone()).await;
    let l2 = pds.create(&access, "app.bsky.feed.like", Some("l2"), like.clone()).await;
    assert_eq!(l1["cid"], l2["cid"]);
    pds.create(&access, "app.bsky.feed.like", Some("l3"), like.clone()).await;
    pds.delete(&access, "app.bsky.feed.like", "l1").await;
    // An edited-then-reverted record.
    pds.put(&access, POST, &rkeys[7], post("temporary")).await;
    pds.put(&access, POST, &rkeys[7], post("post 7")).await;

    // Edited and reverted inside one applyWrites: the tree is unchanged.
    let (status, out) = pds
        .post(
            "com.atproto.repo.applyWrites",
            Some(&access),
            &json!({ "repo": pds.did, "writes": [
                { "$type": "com.atproto.repo.applyWrites#update", "collection": POST, "rkey": rkeys[8], "value": post("flip") },
                { "$type": "com.atproto.repo.applyWrites#update", "collection": POST, "rkey": rkeys[8], "value": post("post 8") },
                { "$type": "com.atproto.repo.applyWrites#create", "collection": POST, "rkey": "tmp", "value": post("tmp") },
                { "$type": "com.atproto.repo.applyWrites#delete", "collection": POST, "rkey": "tmp" },
            ] }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{out}");

    let snap = pds.verify().await;
    assert_eq!(snap.leaves.len(), 12 - 4 + 2);
    let record_cids: HashSet<Cid> = snap.leaves.values().copied().collect();
    assert_eq!(record_cids.len(), snap.leaves.len() - 1, "l2 and l3 share a block");
    assert_eq!(
        snap.car_blocks.len(),
        1 + snap.mst_nodes.len() + record_cids.len(),
        "getRepo holds blocks unreachable from the commit (garbage not collected)"
    );
    let mut expected: HashSet<Cid> = snap.mst_nodes.clone();
    expected.insert(snap.commit_cid);
    expected.extend(record_cids);
    assert_eq!(snap.blocks.keys().copied().collect::<HashSet<_>>(), expected);

    // Repo status and listing.
    let (status, st) = pds.get("com.atproto.sync.getRepoStatus", &[("did", &pds.did)]).await;
    assert_eq!(status, StatusCode::OK, "{st}");
    assert_eq!(st["did"], pds.did.as_str());
    assert_eq!(st["active"], true);
    assert_eq!(st["rev"], snap.rev.as_str());
    let (status, list) = pds.get("com.atproto.sync.listRepos", &[]).await;
    assert_eq!(status, StatusCode::OK, "{list}");
    assert_eq!(
        list["repos"],
        json!([{ "did": pds.did, "head": snap.commit_cid.to_string(), "rev": snap.rev, "active": true }])
    );
    assert!(list.get("cursor").is_none());
    let (status, body) =
        pds.get("com.atproto.sync.getRepoStatus", &[("did", "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa")]).await;
    assert_xrpc_error(status, &body, 400, "RepoNotFound");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_repo_since_returns_only_newer_blocks() {
    let pds = TestPds::spawn().await;
    let (access, _) = pds.login().await;
    let mut old = BTreeMap::new();
    for i in 0..6 {
        let out = pds.create(&access, POST, Some(&format!("old{i}")), post(&format!("old {i}"))).await;
        old.insert(format!("old{i}"), Cid::from_str(s(&out["cid"])).expect("cid"));
    }
    let before = pds.verify().await;

    let added = pds.create(&access, POST, Some("new0"), post("new 0")).await;
    let edited = pds.put(&access, POST, "old1", post("old 1 edited")).await;
    pds.delete(&access, POST, "old2").await;
    let after = pds.verify().await;

    let resp = pds.get_raw("com.atproto.sync.getRepo", &[("did", &pds.did), ("since", &before.rev)]).await;
    assert_eq!(resp.status, StatusCode::OK, "{}", resp.text());
    let (roots, blocks) = parse_car(&resp.body);
    assert_eq!(roots, vec![after.commit_cid]);
    let got: HashSet<Cid> = blocks.iter().map(|(c, _)| *c).collect();
    let cid = |v: &Value| Cid::from_str(s(&v["cid"])).expect("cid");
    for must in [after.commit_cid, after.data, cid(&added), cid(&edited)] {
        assert!(got.contains(&must), "since-CAR lacks new block {must}");
    }
    for (rkey, c) in &old {
        if rkey != "old1" && rkey != "old2" {
            assert!(!got.contains(c), "since-CAR has {rkey}'s old record block");
        }
    }
    assert!(!got.contains(&before.commit_cid));
    assert!(
        got.iter().all(|c| after.blocks.contains_key(c)),
        "since-CAR has blocks outside the current repository"
    );
    assert!(got.len() < after.car_blocks.len());

    // Nothing is newer than the current rev.
    let resp = pds.get_raw("com.atproto.sync.getRepo", &[("did", &pds.did), ("since", &after.rev)]).await;
    assert_eq!(resp.status, StatusCode::OK);
    let (roots, blocks) = parse_car(&resp.body);
    assert_eq!(roots, vec![after.commit_cid]);
    assert!(blocks.is_empty(), "{} blocks newer than the head", blocks.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_get_record_proofs_and_get_blocks() {
    let pds = TestPds::spawn().await;
    let (access, _) = pds.login().await;
    for i in 0..20 {
        pds.create(&access, POST, Some(&format!("p{i:02}")), post(&format!("{i}"))).await;
    }
    let (commit_str, _) = pds.latest().await;
    let commit_cid = Cid::from_str(&commit_str).expect("cid");
    let (key, _) = plc_signing_key(&pds.http, &pds.plc.url, &pds.did).await;
    let (record_cid, _) = pds.record(&pds.did, POST, "p07").await.expect("p07");
    let record_cid = Cid::from_str(&record_cid).expect("cid");

    for (rkey, present) in [("p07", true), ("zz-absent", false)] {
        let resp = pds
            .get_raw("com.atproto.sync.getRecord", &[("did", &pds.did), ("collection", POST), ("rkey", rkey)])
            .await;
        assert_eq!(resp.status, StatusCode::OK, "{}", resp.text());
        assert_eq!(resp.content_type.as_deref(), Some("application/vnd.ipld.car"));
        let (roots, blocks) = parse_car(&resp.body);
        assert_eq!(roots, vec![commit_cid]);
        let map = block_map(&blocks);
        let commit = roost::atp::commit::verify(map.get(&commit_cid).expect("commit"), &pds.did, &key)
            .expect("commit verifies");
        let mut editor = roost::atp::mst::MstEditor::new(&map, commit.data);
        let found = editor.get(&format!("{POST}/{rkey}")).await.expect("the proof covers the key's path");
        if present {
            assert_eq!(found, Some(record_cid));
            assert!(map.contains_key(&record_cid), "record block in the proof");
        } else {
            assert_eq!(found, None);
        }
        assert!(blocks.len() < 20, "a proof, not the whole repository");
    }

    // getBlocks: known CIDs come back, an unknown one is an error.
    let q = format!(
        "/xrpc/com.atproto.sync.getBlocks?{}",
        query_string(&[("did", &pds.did), ("cids", &commit_str), ("cids", &record_cid.to_string())])
    );
    let resp = pds.request(Method::GET, &q, &[], None).await;
    assert_eq!(resp.status, StatusCode::OK, "{}", resp.text());
    let (roots, blocks) = parse_car(&resp.body);
    assert!(roots.is_empty());
    let got: HashSet<Cid> = blocks.iter().map(|(c, _)| *c).collect();
    assert_eq!(got, HashSet::from([commit_cid, record_cid]));

    let unknown = roost::atp::data::cid_for_cbor(b"\xa1\x61a\x01");
    let q = format!(
        "/xrpc/com.atproto.sync.getBlocks?{}",
        query_string(&[("did", &pds.did), ("cids", &commit_str), ("cids", &unknown.to_string())])
    );
    let resp = pds.request(Method::GET, &q, &[], None).await;
    assert_xrpc_error(resp.status, &resp.json(), 400, "InvalidRequest");
    assert!(resp.text().contains(&unknown.to_string()), "{}", resp.text());
}

// ---------------------------------------------------------------------------
// Files and restarts

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_and_database_files_are_owner_only() {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = |p: &std::path::Path| std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777;

    // A data directory that Roost creates itself (tempdir() would be 0700
    // already and hide what Roost does), and no configured JWT secret, so
    // one is generated into the key directory.
    let tmp = tempfile::tempdir().expect("tempdir");
    let data_dir = tmp.path().join("data");
    let pds = TestPds::spawn_with(Options {
        dir: Some(data_dir.clone()),
        configure: Some(Box::new(|c| c.jwt_secret = None)),
        ..Options::default()
    })
    .await;
    let (access, _) = pds.login().await;
    pds.create(&access, POST, None, post("x")).await;

    let keys = data_dir.join("keys");
    assert_eq!(mode(&keys), 0o700, "keys directory");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&keys).expect("keys dir") {
        let path = entry.expect("entry").path();
        let name = path.file_name().expect("name").to_string_lossy().into_owned();
        assert_eq!(mode(&path), 0o600, "{name} must be owner-only");
        assert!(!name.ends_with(".tmp"), "leftover temporary file {name}");
        names.push(name);
    }
    names.sort();
    assert!(names.contains(&"plc-rotation.key".to_owned()), "{names:?}");
    assert!(names.contains(&"jwt-secret".to_owned()), "{names:?}");
    assert_eq!(
        names.iter().filter(|n| n.ends_with(".key")).count(),
        2,
        "rotation key + one repo key: {names:?}"
    );

    // The database holds password hashes and refresh-token ids: other local
    // users must not be able to read it, either through the directory or
    // through the files themselves.
    let db = data_dir.join("roost.sqlite");
    assert!(db.is_file(), "database file at {}", db.display());
    let dir_private = mode(&data_dir) & 0o077 == 0;
    let mut readable = Vec::new();
    for suffix in ["", "-wal", "-shm"] {
        let path = data_dir.join(format!("roost.sqlite{suffix}"));
        if path.exists() && mode(&path) & 0o077 != 0 {
            readable.push(format!("roost.sqlite{suffix} {:o}", mode(&path)));
        }
    }
    assert!(
        dir_private || readable.is_empty(),
        "database readable by other users: data dir {:o}, {readable:?}",
        mode(&data_dir)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_on_the_same_data_dir_keeps_identity_and_records() {
    let dir = tempfile::tempdir().expect("tempdir");
    let plc = MockPlc::start().await;
    let opts = || Options { dir: Some(dir.path().to_owned()), plc: Some(Arc::clone(&plc)), configure: None };
    let first = TestPds::spawn_with(opts()).await;
    let did = first.did.clone();
    let (access, _) = first.login().await;
    for i in 0..5 {
        first.create(&access, POST, Some(&format!("k{i}")), post(&format!("{i}"))).await;
    }
    first.delete(&access, POST, "k3").await;
    let before_records = first.list_all(&did, POST).await;
    let before_commit = first.latest().await;
    first.stop().await;

    let second = TestPds::spawn_with(opts()).await;
    assert_eq!(second.did, did, "same DID after restart");
    assert_eq!(plc.posts(&did), 1, "no second PLC submission");
    assert_eq!(plc.ops(&did).len(), 1);
    assert_eq!(plc.total_posts(), 1, "no other DID was minted");
    assert_eq!(second.latest().await, before_commit);
    assert_eq!(second.list_all(&did, POST).await, before_records);
    // Old sessions survive the restart; writes continue the history.
    let (status, body) = second.get_auth("com.atproto.server.getSession", &access, &[]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let out = second.create(&access, POST, Some("k9"), post("after restart")).await;
    assert!(s(&out["commit"]["rev"]) > before_commit.1.as_str());
    let snap = second.verify().await;
    assert_eq!(snap.leaves.len(), 5);
    second.stop().await;
}

/// As the reference PDS: a record without `$type` takes its collection's.
#[tokio::test]
async fn record_without_type_is_given_the_collection() {
    let pds = TestPds::spawn().await;
    let (access, _) = pds.login().await;
    let (status, body) = pds
        .post(
            "com.atproto.repo.createRecord",
            Some(&access),
            &serde_json::json!({"repo": pds.did, "collection": "app.bsky.feed.post", "rkey": "notype",
                "record": {"text": "hi", "createdAt": "2024-01-01T00:00:00.000Z"}}),
        )
        .await;
    assert_eq!(status.as_u16(), 200, "{body}");
    let (_, value) = pds.record(&pds.did, "app.bsky.feed.post", "notype").await.expect("stored");
    assert_eq!(value["$type"], "app.bsky.feed.post");
}
