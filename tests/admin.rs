//! Invite-only signups, the admin API and the `roost account` / `roost
//! handle` commands against a real server.

mod common;

use std::process::Command;

use base64::Engine as _;
use common::*;
use reqwest::StatusCode;
use serde_json::{Value, json};

fn basic(password: &str) -> String {
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("admin:{password}")))
}

async fn admin_post(pds: &TestPds, nsid: &str, auth: &str, body: Value) -> (StatusCode, Value) {
    let resp = pds
        .request(
            reqwest::Method::POST,
            &format!("/xrpc/{nsid}"),
            &[("authorization", auth), ("content-type", "application/json")],
            Some(body.to_string().into_bytes()),
        )
        .await;
    (resp.status, resp.json())
}

#[tokio::test]
async fn invite_only_signup_and_admin_api() {
    let pds = TestPds::spawn().await;
    let admin = basic("admin-pass"); // Config::for_tests
    let (_, desc) = pds.get("com.atproto.server.describeServer", &[]).await;
    assert_eq!(desc["inviteCodeRequired"], true);

    let signup = |invite: Option<&str>, handle: &str, password: &str| {
        let mut body = json!({"handle": handle, "email": format!("{}@example.com", handle.replace('.', "_")), "password": password});
        if let Some(code) = invite {
            body["inviteCode"] = json!(code);
        }
        body
    };
    let (status, body) =
        pds.post("com.atproto.server.createAccount", None, &signup(None, "bob.test", "bob-password")).await;
    assert_xrpc_error(status, &body, 400, "InvalidInviteCode");
    let (status, body) = pds
        .post(
            "com.atproto.server.createAccount",
            None,
            &signup(Some("nope-code"), "bob.test", "bob-password"),
        )
        .await;
    assert_xrpc_error(status, &body, 400, "InvalidInviteCode");

    // Invite codes need the admin password.
    let (status, body) =
        admin_post(&pds, "com.atproto.server.createInviteCode", &basic("wrong"), json!({"useCount": 1}))
            .await;
    assert_xrpc_error(status, &body, 401, "AuthenticationRequired");
    let (status, body) = pds.post("com.atproto.server.createInviteCode", None, &json!({"useCount": 1})).await;
    assert_xrpc_error(status, &body, 401, "AuthenticationRequired");
    let (status, body) =
        admin_post(&pds, "com.atproto.server.createInviteCode", &admin, json!({"useCount": 1})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let code = body["code"].as_str().expect("code").to_owned();

    for (handle, password, error) in [
        ("bob.example.com", "bob-password", "InvalidHandle"),
        ("alice.test", "bob-password", "HandleNotAvailable"),
        ("bob.test", "short", "InvalidPassword"),
    ] {
        let (status, body) =
            pds.post("com.atproto.server.createAccount", None, &signup(Some(&code), handle, password)).await;
        assert_xrpc_error(status, &body, 400, error);
    }
    let (status, bob) = pds
        .post("com.atproto.server.createAccount", None, &signup(Some(&code), "Bob.test", "bob-password"))
        .await;
    assert_eq!(status, StatusCode::OK, "{bob}");
    let bob_did = bob["did"].as_str().expect("did").to_owned();
    assert_eq!(bob["handle"], "bob.test");
    assert_eq!(pds.plc.ops(&bob_did).len(), 1, "the new DID is registered with PLC");
    let bob_access = bob["accessJwt"].as_str().expect("access");
    let (status, body) = pds
        .post(
            "com.atproto.repo.createRecord",
            Some(bob_access),
            &json!({"repo": bob_did, "collection": "app.bsky.feed.post", "record": post("hi from bob")}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "the new account can post: {body}");
    verify_repo(&pds, &bob_did, &pds.plc.url).await;
    // The code is used up.
    let (status, body) = pds
        .post("com.atproto.server.createAccount", None, &signup(Some(&code), "carol.test", "carol-password"))
        .await;
    assert_xrpc_error(status, &body, 400, "InvalidInviteCode");

    // Admin: look up, reset the password (ends sessions), change the handle.
    let infos = pds
        .request(
            reqwest::Method::GET,
            &format!("/xrpc/com.atproto.admin.getAccountInfos?dids={bob_did}&dids={}", pds.did),
            &[("authorization", &admin)],
            None,
        )
        .await;
    assert_eq!(infos.status, StatusCode::OK, "{}", infos.text());
    let handles: Vec<String> = infos.json()["infos"]
        .as_array()
        .expect("infos")
        .iter()
        .filter_map(|i| i["handle"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(handles, ["bob.test", pds.handle.as_str()]);
    let (status, body) = admin_post(
        &pds,
        "com.atproto.admin.updateAccountPassword",
        &admin,
        json!({"did": bob_did, "password": "new-bob-password"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, _) = pds.get_auth("com.atproto.server.getSession", bob_access, &[]).await;
    assert_eq!(status.as_u16(), 400, "old sessions ended");
    pds.login_as("bob.test", "new-bob-password").await;
    let (status, body) = admin_post(
        &pds,
        "com.atproto.admin.updateAccountHandle",
        &admin,
        json!({"did": bob_did, "handle": "robert.test"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(pds.plc.ops(&bob_did).len(), 2, "handle change went to PLC");
    let (_, resolved) = pds.get("com.atproto.identity.resolveHandle", &[("handle", "robert.test")]).await;
    assert_eq!(resolved["did"], bob_did.as_str());
    let (status, body) =
        admin_post(&pds, "com.atproto.admin.deleteAccount", &admin, json!({"did": bob_did})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, _) = pds.get("com.atproto.sync.getLatestCommit", &[("did", &bob_did)]).await;
    assert_eq!(status.as_u16(), 400);
}

fn roost_cli(pds: &TestPds, args: &[&str], stdin: Option<&str>) -> (bool, String) {
    use std::io::Write as _;
    let mut child = Command::new(env!("CARGO_BIN_EXE_roost"))
        .args(args)
        .args(["--url", &pds.base_url])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("PDS_HOSTNAME", "localhost")
        .env("PDS_DEV_MODE", "true")
        .env("PDS_ADMIN_PASSWORD", "admin-pass")
        .env("PDS_DATA_DIRECTORY", &pds.data_dir)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run roost");
    if let Some(input) = stdin {
        child.stdin.take().expect("stdin").write_all(input.as_bytes()).expect("write stdin");
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().expect("wait");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

// Multi-threaded: the CLI runs as a child process and is waited for
// synchronously while the in-process server answers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn account_commands_drive_the_running_server() {
    let pds = TestPds::spawn().await;
    let (ok, out) = roost_cli(&pds, &["account", "create", "dave.test", "--email", "dave@example.com"], None);
    assert!(ok, "{out}");
    let password = out
        .lines()
        .find_map(|l| l.strip_prefix("password: "))
        .expect("generated password printed")
        .to_owned();
    let (access, _) = pds.login_as("dave.test", &password).await;
    let (ok, out) = roost_cli(&pds, &["account", "list"], None);
    assert!(ok && out.contains("dave.test") && out.contains(&pds.handle), "{out}");
    let (ok, out) = roost_cli(&pds, &["account", "create-invite", "--uses", "2"], None);
    assert!(ok, "{out}");
    let code = out.trim().to_owned();
    let (status, body) = pds
        .post(
            "com.atproto.server.createAccount",
            None,
            &json!({"handle": "erin.test", "password": "erin-password", "inviteCode": code}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "the CLI's invite works: {body}");
    let (ok, out) = roost_cli(
        &pds,
        &["account", "reset-password", "dave.test", "--password-stdin"],
        Some("dave-new-password\n"),
    );
    assert!(ok, "{out}");
    let (status, _) = pds.get_auth("com.atproto.server.getSession", &access, &[]).await;
    assert_eq!(status.as_u16(), 400, "reset ends sessions");
    pds.login_as("dave.test", "dave-new-password").await;
    let (ok, out) =
        roost_cli(&pds, &["account", "app-password", "dave.test", "cli-app"], Some("dave-new-password\n"));
    assert!(ok, "{out}");
    let app_pw =
        out.lines().find_map(|l| l.strip_prefix("cli-app: ")).expect("app password printed").to_owned();
    let (app_access, _) = pds.login_as("dave.test", &app_pw).await;
    assert_eq!(jwt_claims(&app_access)["scope"], "com.atproto.appPass");
    let (ok, out) = roost_cli(&pds, &["handle", "set", "dave.test", "david.test"], None);
    assert!(ok, "{out}");
    let (_, resolved) = pds.get("com.atproto.identity.resolveHandle", &[("handle", "david.test")]).await;
    assert!(resolved["did"].as_str().is_some_and(|d| d.starts_with("did:plc:")), "{resolved}");
    // Pending deletion tokens are readable only locally.
    let (status, _) = pds
        .post(
            "com.atproto.server.requestAccountDelete",
            Some(&pds.login_as("david.test", "dave-new-password").await.0),
            &json!(null),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (ok, out) = roost_cli(&pds, &["account", "tokens", "david.test"], None);
    assert!(ok && out.starts_with("delete_account: "), "{out}");
    // Wrong admin password: a clear failure, nothing changed.
    let mut bad = Command::new(env!("CARGO_BIN_EXE_roost"));
    bad.args(["account", "create", "frank.test", "--url", &pds.base_url])
        .env_clear()
        .env("PDS_HOSTNAME", "localhost")
        .env("PDS_DEV_MODE", "true")
        .env("PDS_ADMIN_PASSWORD", "not-the-password")
        .env("PDS_DATA_DIRECTORY", &pds.data_dir);
    let out = bad.output().expect("run");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("AuthenticationRequired"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A did:web account: its DID document is served here (by Host), it holds the
/// repo key, and the account works like any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn did_web_accounts_are_served_here() {
    let pds = TestPds::spawn().await;
    let (ok, out) = roost_cli(&pds, &["account", "create", "webby.test", "--did-web"], None);
    assert!(ok, "{out}");
    assert!(out.contains("did:web:webby.test"), "{out}");
    let password = out.lines().find_map(|l| l.strip_prefix("password: ")).expect("password").to_owned();
    let resp =
        pds.request(reqwest::Method::GET, "/.well-known/did.json", &[("host", "webby.test")], None).await;
    assert_eq!(resp.status, StatusCode::OK, "{}", resp.text());
    let doc = resp.json();
    assert_eq!(doc["id"], "did:web:webby.test");
    assert_eq!(doc["alsoKnownAs"], json!(["at://webby.test"]));
    assert_eq!(doc["service"][0]["serviceEndpoint"], pds.base_url.replace("127.0.0.1", "localhost").as_str());
    let multibase = doc["verificationMethod"][0]["publicKeyMultibase"].as_str().expect("key");
    let key = roost::atp::keys::PublicKey::from_multibase(multibase).expect("multikey");
    // Other hosts have no document; the PLC directory never heard of it.
    let resp =
        pds.request(reqwest::Method::GET, "/.well-known/did.json", &[("host", "nobody.test")], None).await;
    assert_eq!(resp.status, StatusCode::NOT_FOUND);
    assert!(pds.plc.ops("did:web:webby.test").is_empty());

    let (access, _) = pds.login_as("webby.test", &password).await;
    let (status, body) = pds
        .post("com.atproto.repo.createRecord", Some(&access), &json!({"repo": "did:web:webby.test", "collection": "app.bsky.feed.post", "record": post("from the web")}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // Tokens it signs verify with the key in the served document.
    let (_, token) =
        pds.get_auth("com.atproto.server.getServiceAuth", &access, &[("aud", "did:web:api.bsky.app")]).await;
    let token = token["token"].as_str().expect("token");
    let (signed, sig) = token.rsplit_once('.').expect("jwt");
    let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(sig).expect("sig");
    key.verify(signed.as_bytes(), &sig).expect("signed with the served key");
    let (_, st) = pds.get_auth("com.atproto.server.checkAccountStatus", &access, &[]).await;
    assert_eq!((st["activated"].as_bool(), st["validDid"].as_bool()), (Some(true), Some(true)), "{st}");
    // A did:web account's handle must be one this server serves.
    let (ok, out) = roost_cli(&pds, &["account", "create", "web.example.com", "--did-web"], None);
    assert!(!ok, "{out}");
}
