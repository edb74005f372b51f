//! Proxying to the AppView and other services, service-auth tokens, app
//! passwords and preferences, against a real Roost and a mock upstream that
//! records what it receives and checks every service token's signature.

mod common;

use std::sync::{Arc, Mutex};

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::*;
use reqwest::Method;
use roost::config::ServiceEndpoint;
use serde_json::{Value, json};

/// What the mock upstream saw.
#[derive(Clone, Debug)]
struct Seen {
    method: String,
    path_and_query: String,
    headers: HeaderMap,
    body: Vec<u8>,
}

#[derive(Clone)]
struct Upstream {
    port: u16,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Upstream {
    /// Starts the mock; it serves `/.well-known/did.json` for
    /// `did:web:localhost%3A<port>` with a `#test_svc` pointing at itself.
    async fn start() -> Upstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let upstream = Upstream { port, seen: Arc::default() };
        let app = axum::Router::new().fallback(respond).with_state(upstream.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.ok() });
        upstream
    }

    fn did(&self) -> String {
        format!("did:web:localhost%3A{}", self.port)
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn last(&self) -> Seen {
        self.seen.lock().expect("lock").last().cloned().expect("upstream saw a request")
    }

    fn count(&self) -> usize {
        self.seen.lock().expect("lock").len()
    }
}

async fn respond(State(up): State<Upstream>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, 10 << 20).await.expect("body").to_vec();
    let path = parts.uri.path().to_owned();
    if path == "/.well-known/did.json" {
        return axum::Json(json!({
            "id": up.did(),
            "service": [{"id": "#test_svc", "type": "TestService", "serviceEndpoint": format!("http://localhost:{}", up.port)}]
        }))
        .into_response();
    }
    up.seen.lock().expect("lock").push(Seen {
        method: parts.method.to_string(),
        path_and_query: parts.uri.path_and_query().map(|p| p.to_string()).unwrap_or_default(),
        headers: parts.headers.clone(),
        body: body.clone(),
    });
    match path.as_str() {
        "/xrpc/app.bsky.test.boom" => {
            (StatusCode::INTERNAL_SERVER_ERROR, axum::Json(json!({"error": "Boom", "message": "it broke"})))
                .into_response()
        }
        "/xrpc/app.bsky.test.missing" => {
            (StatusCode::BAD_REQUEST, axum::Json(json!({"error": "NotFound", "message": "no such thing"})))
                .into_response()
        }
        "/xrpc/app.bsky.test.big" => vec![b'x'; 100_000].into_response(),
        "/xrpc/app.bsky.test.hang" => {
            tokio::time::sleep(std::time::Duration::from_secs(30)).await;
            "too late".into_response()
        }
        // 100 MB, chunked (no content-length): only streaming limits can stop it.
        "/xrpc/app.bsky.test.huge" => {
            let chunk = bytes::Bytes::from(vec![b'x'; 1 << 20]);
            let stream = futures::stream::iter((0..100).map(move |_| Ok::<_, std::io::Error>(chunk.clone())));
            axum::body::Body::from_stream(stream).into_response()
        }
        _ if parts.method == Method::POST => (
            [("content-type", "application/json"), ("atproto-repo-rev", "3kabc"), ("x-internal", "secret")],
            body,
        )
            .into_response(),
        _ => (
            [
                ("atproto-repo-rev", "3kzzz"),
                ("atproto-content-labelers", "did:plc:labeler"),
                ("x-internal", "secret"),
            ],
            axum::Json(json!({"feed": [], "echo": parts.uri.query()})),
        )
            .into_response(),
    }
}

fn claims_of(token: &str) -> (Value, Value, Vec<u8>, String) {
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "a JWT: {token}");
    let decode = |p: &str| -> Value {
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(p).expect("base64url")).expect("json")
    };
    (
        decode(parts[0]),
        decode(parts[1]),
        URL_SAFE_NO_PAD.decode(parts[2]).expect("sig"),
        format!("{}.{}", parts[0], parts[1]),
    )
}

/// Checks a service token the way a receiving service does: signature with
/// the key in the issuer's DID document, then the claims.
async fn check_service_token(pds: &TestPds, token: &str, aud: &str, lxm: Option<&str>) -> Value {
    let (header, claims, sig, signed) = claims_of(token);
    assert_eq!(header["alg"], "ES256K", "{header}");
    assert_eq!(header["typ"], "JWT");
    let (key, _) = plc_signing_key(&http_client(), &pds.plc.url, &pds.did).await;
    key.verify(signed.as_bytes(), &sig).expect("service token verifies with the account's #atproto key");
    assert_eq!(claims["iss"], pds.did.as_str());
    assert_eq!(claims["aud"], aud);
    match lxm {
        Some(lxm) => assert_eq!(claims["lxm"], lxm),
        None => assert!(claims.get("lxm").is_none(), "{claims}"),
    }
    assert!(claims["jti"].as_str().is_some_and(|j| j.len() >= 16), "{claims}");
    claims
}

fn bearer(headers: &HeaderMap) -> String {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .expect("upstream got a bearer token")
        .to_owned()
}

async fn spawn_with_upstream(up: &Upstream, ssrf_protection: bool) -> TestPds {
    let (url, did) = (up.url(), up.did());
    TestPds::spawn_with(Options {
        configure: Some(Box::new(move |c| {
            c.proxy.appview = Some(ServiceEndpoint { url: url.clone(), did: did.clone() });
            c.proxy.chat = Some(ServiceEndpoint { url, did: "did:web:chat.test".into() });
            c.proxy.disable_ssrf_protection = !ssrf_protection;
        })),
        ..Options::default()
    })
    .await
}

async fn call(
    pds: &TestPds,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Resp {
    pds.request(method, path, headers, body.map(<[u8]>::to_vec)).await
}

#[tokio::test]
async fn appview_calls_are_forwarded_with_a_verifiable_service_token() {
    let up = Upstream::start().await;
    let pds = spawn_with_upstream(&up, false).await;
    let (access, _) = pds.login().await;
    let auth = format!("Bearer {access}");

    let resp = call(
        &pds,
        Method::GET,
        "/xrpc/app.bsky.feed.getTimeline?limit=5&cursor=abc",
        &[
            ("authorization", &auth),
            ("accept-language", "fr"),
            ("atproto-accept-labelers", "did:plc:l"),
            ("x-other", "no"),
        ],
        None,
    )
    .await;
    assert_eq!(resp.status, StatusCode::OK, "{}", resp.text());
    assert_eq!(resp.json()["echo"], "limit=5&cursor=abc");
    let seen = up.last();
    assert_eq!(seen.method, "GET");
    assert_eq!(seen.path_and_query, "/xrpc/app.bsky.feed.getTimeline?limit=5&cursor=abc");
    assert_eq!(seen.headers.get("accept-language").map(|v| v.as_bytes()), Some(&b"fr"[..]));
    assert_eq!(seen.headers.get("atproto-accept-labelers").map(|v| v.as_bytes()), Some(&b"did:plc:l"[..]));
    assert!(seen.headers.get("x-other").is_none(), "unlisted request headers stay home");
    let token = bearer(&seen.headers);
    assert_ne!(token, access, "the session token never leaves the PDS");
    let claims = check_service_token(&pds, &token, &up.did(), Some("app.bsky.feed.getTimeline")).await;
    let (iat, exp) = (claims["iat"].as_i64().expect("iat"), claims["exp"].as_i64().expect("exp"));
    assert!(exp > iat && exp - iat <= 60, "short-lived: {claims}");

    // Response headers clients rely on pass through, others do not.
    let raw = pds
        .http
        .get(format!("{}/xrpc/app.bsky.feed.getTimeline", pds.base_url))
        .bearer_auth(&access)
        .send()
        .await
        .expect("GET");
    assert_eq!(raw.headers()["atproto-repo-rev"], "3kzzz");
    assert_eq!(raw.headers()["atproto-content-labelers"], "did:plc:labeler");
    assert!(raw.headers().get("x-internal").is_none());

    // A procedure: body and content type go up, the reply comes back.
    let body = br#"{"interactions":[{"item":"at://x","event":"app.bsky.feed.defs#interactionLike"}]}"#;
    let resp = call(
        &pds,
        Method::POST,
        "/xrpc/app.bsky.feed.sendInteractions",
        &[("authorization", &auth), ("content-type", "application/json")],
        Some(body),
    )
    .await;
    assert_eq!(resp.status, StatusCode::OK, "{}", resp.text());
    assert_eq!(resp.body, body);
    let seen = up.last();
    assert_eq!(seen.body, body);
    assert_eq!(seen.headers["content-type"], "application/json");
    check_service_token(&pds, &bearer(&seen.headers), &up.did(), Some("app.bsky.feed.sendInteractions"))
        .await;
}

#[tokio::test]
async fn atproto_proxy_header_resolves_the_service_through_the_did_document() {
    let up = Upstream::start().await;
    let pds = spawn_with_upstream(&up, false).await;
    let (access, _) = pds.login().await;
    let auth = format!("Bearer {access}");
    let header = format!("{}#test_svc", up.did());
    let resp = call(
        &pds,
        Method::GET,
        "/xrpc/com.example.thing.get?x=1",
        &[("authorization", &auth), ("atproto-proxy", &header)],
        None,
    )
    .await;
    assert_eq!(resp.status, StatusCode::OK, "{}", resp.text());
    let seen = up.last();
    assert_eq!(seen.path_and_query, "/xrpc/com.example.thing.get?x=1");
    check_service_token(&pds, &bearer(&seen.headers), &header, Some("com.example.thing.get")).await;

    for (bad, want) in [
        (format!("{}#nope", up.did()), "could not resolve proxy did service url"),
        ("did:web:unresolvable.invalid#svc".to_owned(), "could not resolve proxy did"),
        ("did:web:x".to_owned(), "no service id specified in proxy header"),
        ("#svc".to_owned(), "no did specified in proxy header"),
    ] {
        let resp = call(
            &pds,
            Method::GET,
            "/xrpc/com.example.thing.get",
            &[("authorization", &auth), ("atproto-proxy", &bad)],
            None,
        )
        .await;
        assert_xrpc_error(resp.status, &resp.json(), 400, "InvalidRequest");
        assert_eq!(resp.json()["message"], want, "{bad}");
    }
}

#[tokio::test]
async fn upstream_errors_and_limits_become_clear_xrpc_errors() {
    let up = Upstream::start().await;
    let pds = spawn_with_upstream(&up, false).await;
    let (access, _) = pds.login().await;
    let auth = format!("Bearer {access}");

    let resp = call(&pds, Method::GET, "/xrpc/app.bsky.test.boom", &[("authorization", &auth)], None).await;
    assert_eq!(resp.status, StatusCode::BAD_GATEWAY);
    assert_eq!(resp.json(), json!({"error": "Boom", "message": "it broke"}));
    let resp =
        call(&pds, Method::GET, "/xrpc/app.bsky.test.missing", &[("authorization", &auth)], None).await;
    assert_eq!(resp.status, StatusCode::BAD_REQUEST);
    assert_eq!(resp.json(), json!({"error": "NotFound", "message": "no such thing"}));

    // No credentials, protected methods, nothing configured.
    let resp = call(&pds, Method::GET, "/xrpc/app.bsky.feed.getTimeline", &[], None).await;
    assert_xrpc_error(resp.status, &resp.json(), 401, "AuthenticationRequired");
    let resp = call(
        &pds,
        Method::POST,
        "/xrpc/com.atproto.identity.signPlcOperation",
        &[("authorization", &auth)],
        Some(b"{}"),
    )
    .await;
    assert_xrpc_error(resp.status, &resp.json(), 400, "InvalidToken");
    let resp =
        call(&pds, Method::GET, "/xrpc/com.example.nothing.here", &[("authorization", &auth)], None).await;
    assert_xrpc_error(resp.status, &resp.json(), 501, "MethodNotImplemented");
    let before = up.count();
    let resp =
        call(&pds, Method::PUT, "/xrpc/app.bsky.feed.getTimeline", &[("authorization", &auth)], None).await;
    assert_xrpc_error(resp.status, &resp.json(), 400, "InvalidRequest");
    assert_eq!(up.count(), before, "refused calls never reach the upstream");

    // An oversized request body is refused before it is sent.
    let big = vec![b' '; 3 * 1024 * 1024];
    let resp = call(
        &pds,
        Method::POST,
        "/xrpc/app.bsky.feed.sendInteractions",
        &[("authorization", &auth), ("content-type", "application/json")],
        Some(&big),
    )
    .await;
    assert_xrpc_error(resp.status, &resp.json(), 413, "PayloadTooLarge");
    drop(pds);

    // A response over the cap is refused; an unreachable upstream is a 502.
    let (url, did) = (up.url(), up.did());
    let pds = TestPds::spawn_with(Options {
        configure: Some(Box::new(move |c| {
            c.proxy.appview = Some(ServiceEndpoint { url, did });
            c.proxy.max_response_bytes = 10_000;
            c.proxy.chat =
                Some(ServiceEndpoint { url: "http://127.0.0.1:9".into(), did: "did:web:chat.test".into() });
        })),
        ..Options::default()
    })
    .await;
    let (access, _) = pds.login().await;
    let auth = format!("Bearer {access}");
    let resp = call(&pds, Method::GET, "/xrpc/app.bsky.test.big", &[("authorization", &auth)], None).await;
    assert_xrpc_error(resp.status, &resp.json(), 502, "UpstreamFailure");
    let resp =
        call(&pds, Method::GET, "/xrpc/chat.bsky.convo.listConvos", &[("authorization", &auth)], None).await;
    assert_xrpc_error(resp.status, &resp.json(), 502, "UpstreamFailure");
}

#[tokio::test]
async fn ssrf_protection_refuses_private_targets() {
    let up = Upstream::start().await;
    let pds = spawn_with_upstream(&up, true).await;
    let (access, _) = pds.login().await;
    let auth = format!("Bearer {access}");
    // The configured AppView is on loopback: refused, never contacted.
    let resp =
        call(&pds, Method::GET, "/xrpc/app.bsky.feed.getTimeline", &[("authorization", &auth)], None).await;
    assert_xrpc_error(resp.status, &resp.json(), 400, "InvalidRequest");
    assert!(resp.json()["message"].as_str().unwrap_or("").contains("not allowed"), "{}", resp.text());
    // A did:web on localhost is not resolved either.
    let header = format!("{}#test_svc", up.did());
    let resp = call(
        &pds,
        Method::GET,
        "/xrpc/com.example.thing.get",
        &[("authorization", &auth), ("atproto-proxy", &header)],
        None,
    )
    .await;
    assert_xrpc_error(resp.status, &resp.json(), 400, "InvalidRequest");
    assert_eq!(up.count(), 0, "nothing reached the private upstream");
}

#[tokio::test]
async fn service_auth_tokens_follow_the_reference_rules() {
    let pds = TestPds::spawn().await;
    let (access, _) = pds.login().await;
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("time").as_secs() as i64;
    let aud = "did:web:api.bsky.app#bsky_appview";
    let (status, body) = pds
        .get_auth(
            "com.atproto.server.getServiceAuth",
            &access,
            &[("aud", aud), ("lxm", "app.bsky.feed.getFeedSkeleton")],
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    check_service_token(
        &pds,
        body["token"].as_str().expect("token"),
        aud,
        Some("app.bsky.feed.getFeedSkeleton"),
    )
    .await;
    let exp = (now + 1800).to_string();
    let (status, body) = pds
        .get_auth(
            "com.atproto.server.getServiceAuth",
            &access,
            &[("aud", aud), ("lxm", "app.bsky.feed.getFeedSkeleton"), ("exp", &exp)],
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let claims = check_service_token(
        &pds,
        body["token"].as_str().expect("token"),
        aud,
        Some("app.bsky.feed.getFeedSkeleton"),
    )
    .await;
    assert_eq!(claims["exp"].as_i64(), Some(now + 1800));

    let past = (now - 10).to_string();
    let far = (now + 7200).to_string();
    let two_min = (now + 120).to_string();
    let cases: Vec<(Vec<(&str, &str)>, &str, &str)> = vec![
        (vec![("aud", aud), ("exp", &past)], "BadExpiration", "expiration is in past"),
        (vec![("aud", aud), ("lxm", "app.bsky.x.y"), ("exp", &far)], "BadExpiration", "more than an hour"),
        (vec![("aud", aud), ("exp", &two_min)], "BadExpiration", "method-less"),
        (
            vec![("aud", aud), ("lxm", "com.atproto.server.createAppPassword")],
            "InvalidRequest",
            "protected method",
        ),
        (vec![("aud", "not-a-did")], "InvalidRequest", "aud"),
        (vec![("aud", aud), ("lxm", "not an nsid")], "InvalidRequest", "lxm"),
    ];
    for (query, error, message) in cases {
        let (status, body) = pds.get_auth("com.atproto.server.getServiceAuth", &access, &query).await;
        assert_xrpc_error(status, &body, 400, error);
        assert!(body["message"].as_str().unwrap_or("").contains(message), "{query:?}: {body}");
    }
    let (status, body) = pds.get("com.atproto.server.getServiceAuth", &[("aud", aud)]).await;
    assert_xrpc_error(status, &body, 401, "AuthenticationRequired");
}

#[tokio::test]
async fn app_passwords_open_restricted_sessions_and_revoke_them() {
    let up = Upstream::start().await;
    let pds = spawn_with_upstream(&up, false).await;
    let (access, _) = pds.login().await;

    let (status, created) =
        pds.post("com.atproto.server.createAppPassword", Some(&access), &json!({"name": "Graysky"})).await;
    assert_eq!(status, StatusCode::OK, "{created}");
    let app_pw = created["password"].as_str().expect("password").to_owned();
    assert!(
        regex::Regex::new("^[a-z2-7]{4}-[a-z2-7]{4}-[a-z2-7]{4}-[a-z2-7]{4}$").expect("re").is_match(&app_pw),
        "{app_pw}"
    );
    assert_eq!(created["privileged"], false);
    let (status, dup) =
        pds.post("com.atproto.server.createAppPassword", Some(&access), &json!({"name": "Graysky"})).await;
    assert_xrpc_error(status, &dup, 400, "InvalidRequest");
    let (_, privileged) = pds
        .post(
            "com.atproto.server.createAppPassword",
            Some(&access),
            &json!({"name": "DMs", "privileged": true}),
        )
        .await;
    let (status, list) = pds.get_auth("com.atproto.server.listAppPasswords", &access, &[]).await;
    assert_eq!(status, StatusCode::OK);
    let names: Vec<&str> =
        list["passwords"].as_array().expect("list").iter().filter_map(|p| p["name"].as_str()).collect();
    assert_eq!(names.len(), 2, "{list}");
    assert!(list.to_string().find(&app_pw).is_none(), "the list never shows passwords");

    // Log in with the app password: a restricted session.
    let (app_access, app_refresh) = pds.login_as(&pds.handle, &app_pw).await;
    assert_eq!(jwt_claims(&app_access)["scope"], "com.atproto.appPass");
    let (status, body) = pds.get_auth("com.atproto.server.getSession", &app_access, &[]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) =
        pds.post("com.atproto.server.createAppPassword", Some(&app_access), &json!({"name": "x"})).await;
    assert_xrpc_error(status, &body, 400, "InvalidToken");
    let (status, body) = pds.get_auth("com.atproto.server.listAppPasswords", &app_access, &[]).await;
    assert_xrpc_error(status, &body, 400, "InvalidToken");
    // DMs need a privileged app password.
    let resp = call(
        &pds,
        Method::GET,
        "/xrpc/chat.bsky.convo.listConvos",
        &[("authorization", &format!("Bearer {app_access}"))],
        None,
    )
    .await;
    assert_xrpc_error(resp.status, &resp.json(), 400, "InvalidToken");
    let (status, body) = pds
        .get_auth(
            "com.atproto.server.getServiceAuth",
            &app_access,
            &[("aud", "did:web:chat.test"), ("lxm", "chat.bsky.convo.sendMessage")],
        )
        .await;
    assert_xrpc_error(status, &body, 400, "InvalidRequest");
    // But the timeline works.
    let resp = call(
        &pds,
        Method::GET,
        "/xrpc/app.bsky.feed.getTimeline",
        &[("authorization", &format!("Bearer {app_access}"))],
        None,
    )
    .await;
    assert_eq!(resp.status, StatusCode::OK, "{}", resp.text());
    // Refreshing keeps the restricted scope.
    let (status, refreshed) =
        pds.post("com.atproto.server.refreshSession", Some(&app_refresh), &json!(null)).await;
    assert_eq!(status, StatusCode::OK, "{refreshed}");
    let refreshed_access = refreshed["accessJwt"].as_str().expect("access").to_owned();
    assert_eq!(jwt_claims(&refreshed_access)["scope"], "com.atproto.appPass");

    let (priv_access, _) = pds.login_as(&pds.handle, privileged["password"].as_str().expect("pw")).await;
    assert_eq!(jwt_claims(&priv_access)["scope"], "com.atproto.appPassPrivileged");
    let resp = call(
        &pds,
        Method::GET,
        "/xrpc/chat.bsky.convo.listConvos",
        &[("authorization", &format!("Bearer {priv_access}"))],
        None,
    )
    .await;
    assert_eq!(resp.status, StatusCode::OK, "{}", resp.text());

    // Revoking ends its sessions at once and the password no longer logs in.
    let (status, _) =
        pds.post("com.atproto.server.revokeAppPassword", Some(&access), &json!({"name": "Graysky"})).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = pds.get_auth("com.atproto.server.getSession", &refreshed_access, &[]).await;
    assert_xrpc_error(status, &body, 400, "InvalidToken");
    let (status, body) = pds
        .post(
            "com.atproto.server.createSession",
            None,
            &json!({"identifier": pds.handle, "password": app_pw}),
        )
        .await;
    assert_xrpc_error(status, &body, 401, "AuthenticationRequired");
    let (status, _) = pds.get_auth("com.atproto.server.getSession", &priv_access, &[]).await;
    assert_eq!(status, StatusCode::OK, "other app passwords' sessions live on");
}

#[tokio::test]
async fn preferences_are_stored_locally_with_the_reference_rules() {
    let up = Upstream::start().await;
    let pds = spawn_with_upstream(&up, false).await;
    let (access, _) = pds.login().await;
    let (status, body) = pds.get_auth("app.bsky.actor.getPreferences", &access, &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, json!({"preferences": []}));
    let prefs = json!([
        {"$type": "app.bsky.actor.defs#adultContentPref", "enabled": false},
        {"$type": "app.bsky.actor.defs#personalDetailsPref", "birthDate": "1990-01-01T00:00:00.000Z"},
        {"$type": "app.bsky.actor.defs#savedFeedsPrefV2", "items": [{"id": "a", "type": "timeline", "value": "following", "pinned": true}]},
    ]);
    let (status, body) =
        pds.post("app.bsky.actor.putPreferences", Some(&access), &json!({"preferences": prefs})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, body) = pds.get_auth("app.bsky.actor.getPreferences", &access, &[]).await;
    assert_eq!(body["preferences"], prefs, "stored in order, as given");
    assert_eq!(up.count(), 0, "preferences never go to the AppView");

    for (bad, message) in [
        (
            json!([{"$type": "com.example.pref", "x": 1}]),
            "Some preferences are not in the app.bsky namespace",
        ),
        (json!([{"enabled": true}]), "Input/preferences/0 is missing a $type"),
    ] {
        let (status, body) =
            pds.post("app.bsky.actor.putPreferences", Some(&access), &json!({"preferences": bad})).await;
        assert_xrpc_error(status, &body, 400, "InvalidRequest");
        assert_eq!(body["message"], message);
    }

    // An app-password session neither sees nor drops the personal details.
    let (_, created) =
        pds.post("com.atproto.server.createAppPassword", Some(&access), &json!({"name": "app"})).await;
    let (app_access, _) = pds.login_as(&pds.handle, created["password"].as_str().expect("pw")).await;
    let (_, body) = pds.get_auth("app.bsky.actor.getPreferences", &app_access, &[]).await;
    assert_eq!(body["preferences"].as_array().map(Vec::len), Some(2), "{body}");
    assert!(!body.to_string().contains("birthDate"));
    let (status, body) = pds
        .post(
            "app.bsky.actor.putPreferences",
            Some(&app_access),
            &json!({"preferences": [{"$type": "app.bsky.actor.defs#personalDetailsPref", "birthDate": "2000-01-01T00:00:00.000Z"}]}),
        )
        .await;
    assert_xrpc_error(status, &body, 400, "InvalidRequest");
    let (status, _) = pds
        .post(
            "app.bsky.actor.putPreferences",
            Some(&app_access),
            &json!({"preferences": [{"$type": "app.bsky.actor.defs#adultContentPref", "enabled": true}]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (_, body) = pds.get_auth("app.bsky.actor.getPreferences", &access, &[]).await;
    let types: Vec<&str> =
        body["preferences"].as_array().expect("prefs").iter().filter_map(|p| p["$type"].as_str()).collect();
    assert_eq!(
        types,
        ["app.bsky.actor.defs#personalDetailsPref", "app.bsky.actor.defs#adultContentPref"],
        "{body}"
    );
}

#[tokio::test]
async fn hanging_and_huge_upstreams_end_cleanly_with_bounded_memory() {
    let up = Upstream::start().await;
    let (url, did) = (up.url(), up.did());
    let pds = TestPds::spawn_with(Options {
        configure: Some(Box::new(move |c| {
            c.proxy.appview = Some(ServiceEndpoint { url, did });
            c.proxy.timeout_secs = 1;
        })),
        ..Options::default()
    })
    .await;
    let (access, _) = pds.login().await;
    let auth = format!("Bearer {access}");
    let started = std::time::Instant::now();
    let resp = call(&pds, Method::GET, "/xrpc/app.bsky.test.hang", &[("authorization", &auth)], None).await;
    assert_xrpc_error(resp.status, &resp.json(), 504, "UpstreamTimeout");
    assert!(started.elapsed() < std::time::Duration::from_secs(10), "no hang: {:?}", started.elapsed());

    // 100 MB through a 16 MiB cap: the stream is cut, nothing buffers it.
    let before = vm_rss_kib();
    let resp = pds
        .http
        .get(format!("{}/xrpc/app.bsky.test.huge", pds.base_url))
        .bearer_auth(&access)
        .send()
        .await
        .expect("headers arrive");
    assert_eq!(resp.status(), StatusCode::OK);
    let mut received = 0usize;
    let mut stream = resp.bytes_stream();
    let mut cut = false;
    while let Some(chunk) = futures::StreamExt::next(&mut stream).await {
        match chunk {
            Ok(c) => received += c.len(),
            Err(_) => {
                cut = true;
                break;
            }
        }
    }
    assert!(cut, "the oversized body must end in an error, not look complete ({received} bytes)");
    assert!(received <= 16 * 1024 * 1024 + (1 << 20), "at most the cap got through: {received}");
    let grown_mib = vm_rss_kib().saturating_sub(before) / 1024;
    assert!(grown_mib < 48, "proxying 100 MB grew RSS by {grown_mib} MiB");
}
