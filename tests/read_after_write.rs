//! Read-after-write through the AppView proxy: a mock AppView that has not
//! indexed the account's newest writes (its `atproto-repo-rev` is older than
//! the repository's) answers with canned bodies, and Roost splices the fresh
//! post, reply, like and profile into them.

mod common;

use std::sync::{Arc, Mutex};

use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use common::*;
use roost::config::ServiceEndpoint;
use serde_json::{Value, json};

const BOB: &str = "did:plc:bobbobbobbobbobbobbobbob";

/// A well-formed CID for strong refs to posts that live only in the mock.
fn some_cid() -> String {
    roost::atp::data::cid_for_cbor(b"\xa0").to_string()
}

fn bob_post(rkey: &str) -> String {
    format!("at://{BOB}/app.bsky.feed.post/{rkey}")
}

/// What the mock AppView saw of one request.
#[derive(Clone, Debug)]
struct Seen {
    path_and_query: String,
    headers: HeaderMap,
}

#[derive(Clone)]
struct AppView {
    port: u16,
    /// The rev the mock claims to have indexed for the account.
    rev: Arc<Mutex<String>>,
    /// The account's DID (canned bodies mention it).
    did: Arc<Mutex<String>>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl AppView {
    async fn start() -> AppView {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let appview = AppView { port, rev: Arc::default(), did: Arc::default(), seen: Arc::default() };
        let app = axum::Router::new().fallback(respond).with_state(appview.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.ok() });
        appview
    }

    fn set_rev(&self, rev: &str) {
        *self.rev.lock().expect("lock") = rev.to_owned();
    }

    fn seen(&self, nsid: &str) -> Vec<Seen> {
        let prefix = format!("/xrpc/{nsid}");
        self.seen
            .lock()
            .expect("lock")
            .iter()
            .filter(|s| s.path_and_query.starts_with(&prefix))
            .cloned()
            .collect()
    }
}

/// A post view as the AppView would show it.
fn post_view(uri: &str, did: &str, name: &str, indexed_at: &str) -> Value {
    json!({
        "uri": uri,
        "cid": some_cid(),
        "author": {"did": did, "handle": format!("{name}.test"), "displayName": name},
        "record": {"$type": "app.bsky.feed.post", "text": "indexed long ago", "createdAt": indexed_at},
        "replyCount": 0, "repostCount": 0, "likeCount": 2, "quoteCount": 0,
        "indexedAt": indexed_at,
    })
}

/// The canned body of `nsid`, pretty-printed so that a re-serialisation
/// would show (byte-for-byte checks).
fn canned(nsid: &str, did: &str) -> Option<String> {
    let body = match nsid {
        "app.bsky.feed.getTimeline" => json!({"cursor": "c1", "feed": [
            {"post": post_view(&bob_post("old"), BOB, "bob", "2023-01-01T00:00:00.000Z")},
        ]}),
        "app.bsky.feed.getAuthorFeed" => json!({"feed": [
            {"post": post_view(&format!("at://{did}/app.bsky.feed.post/old"), did, "Old Alice", "2023-01-01T00:00:00.000Z")},
        ]}),
        "app.bsky.actor.getProfile" => json!({
            "did": did, "handle": "alice.test", "displayName": "Old Alice", "description": "old bio",
            "followersCount": 5,
        }),
        "app.bsky.actor.getProfiles" => json!({"profiles": [
            {"did": BOB, "handle": "bob.test", "displayName": "bob"},
            {"did": did, "handle": "alice.test", "displayName": "Old Alice"},
        ]}),
        "app.bsky.feed.getPostThread" => json!({"thread": {
            "$type": "app.bsky.feed.defs#threadViewPost",
            "post": post_view(&bob_post("root"), BOB, "bob", "2023-01-01T00:00:00.000Z"),
            "replies": [{
                "$type": "app.bsky.feed.defs#threadViewPost",
                "post": post_view(&bob_post("other-reply"), BOB, "bob", "2023-01-02T00:00:00.000Z"),
                "replies": [],
            }],
        }}),
        "app.bsky.feed.getActorLikes" => json!({"feed": [
            {"post": post_view(&bob_post("liked-before"), BOB, "bob", "2023-01-01T00:00:00.000Z")},
        ]}),
        _ => return None,
    };
    Some(serde_json::to_string_pretty(&body).expect("json"))
}

async fn respond(State(av): State<AppView>, request: Request) -> Response {
    let (parts, _) = request.into_parts();
    let path_and_query = parts.uri.path_and_query().map(|p| p.to_string()).unwrap_or_default();
    av.seen.lock().expect("lock").push(Seen { path_and_query, headers: parts.headers.clone() });
    let rev = av.rev.lock().expect("lock").clone();
    let did = av.did.lock().expect("lock").clone();
    let nsid = parts.uri.path().trim_start_matches("/xrpc/");
    let query = parts.uri.query().unwrap_or_default();
    if query.contains("mode=text") {
        return ([("content-type", "text/plain"), ("atproto-repo-rev", rev.as_str())], "not json at all")
            .into_response();
    }
    if query.contains("mode=broken") {
        return ([("content-type", "application/json"), ("atproto-repo-rev", rev.as_str())], "{\"feed\": [")
            .into_response();
    }
    if query.contains("mode=norev") {
        let body = canned(nsid, &did).unwrap_or_default();
        return ([("content-type", "application/json")], body).into_response();
    }
    if nsid == "app.bsky.feed.getPostThread"
        && query.contains(&format!("uri=at%3A%2F%2F{}", did.replace(':', "%3A")))
    {
        // The account's own posts are all too fresh for this AppView.
        return (
            axum::http::StatusCode::BAD_REQUEST,
            [("content-type", "application/json"), ("atproto-repo-rev", rev.as_str())],
            r#"{"error":"NotFound","message":"Post not found"}"#,
        )
            .into_response();
    }
    if nsid == "app.bsky.feed.getPosts" {
        let uris: Vec<String> = form_urlencoded::parse(query.as_bytes())
            .filter(|(k, _)| k == "uris")
            .map(|(_, v)| v.into_owned())
            .collect();
        let posts: Vec<Value> = uris
            .iter()
            .filter(|u| u.starts_with(&format!("at://{BOB}/")))
            .map(|u| post_view(u, BOB, "bob", "2023-03-01T00:00:00.000Z"))
            .collect();
        return axum::Json(json!({ "posts": posts })).into_response();
    }
    match canned(nsid, &did) {
        Some(body) => {
            ([("content-type", "application/json; charset=utf-8"), ("atproto-repo-rev", rev.as_str())], body)
                .into_response()
        }
        None => (axum::http::StatusCode::NOT_FOUND, "no such method").into_response(),
    }
}

async fn spawn(av: &AppView) -> TestPds {
    let (url, did) = (format!("http://127.0.0.1:{}", av.port), format!("did:web:localhost%3A{}", av.port));
    let pds = TestPds::spawn_with(Options {
        configure: Some(Box::new(move |c| {
            c.proxy.appview = Some(ServiceEndpoint { url, did });
            c.proxy.disable_ssrf_protection = true;
        })),
        ..Options::default()
    })
    .await;
    *av.did.lock().expect("lock") = pds.did.clone();
    pds
}

/// A response through Roost, headers included.
struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The `Atproto-Upstream-Lag` header, which must be a number of milliseconds.
    fn lag(&self) -> Option<u64> {
        self.header("atproto-upstream-lag")
            .map(|v| v.parse().unwrap_or_else(|_| panic!("lag {v} is not a number")))
    }
}

async fn get(pds: &TestPds, access: &str, nsid: &str, query: &[(&str, &str)]) -> Answer {
    let url = format!("{}/xrpc/{nsid}?{}", pds.base_url, serde_urlencoded::to_string(query).expect("query"));
    let response = http_client()
        .get(url)
        .bearer_auth(access)
        .header("accept-encoding", "gzip")
        .send()
        .await
        .expect("request");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.bytes().await.expect("body").to_vec();
    assert_eq!(status, 200, "{nsid}: {}", String::from_utf8_lossy(&body));
    Answer { status, headers, body }
}

fn feed_uris(body: &Value) -> Vec<String> {
    body["feed"]
        .as_array()
        .expect("feed")
        .iter()
        .map(|i| i["post"]["uri"].as_str().expect("uri").to_owned())
        .collect()
}

/// Every method under test with the parameters a client would send.
fn calls(did: &str) -> Vec<(&'static str, Vec<(&'static str, String)>)> {
    vec![
        ("app.bsky.feed.getTimeline", vec![("limit", "30".into())]),
        ("app.bsky.feed.getAuthorFeed", vec![("actor", did.to_owned())]),
        ("app.bsky.actor.getProfile", vec![("actor", did.to_owned())]),
        ("app.bsky.actor.getProfiles", vec![("actors", did.to_owned()), ("actors", BOB.to_owned())]),
        ("app.bsky.feed.getPostThread", vec![("uri", bob_post("root"))]),
        ("app.bsky.feed.getActorLikes", vec![("actor", did.to_owned())]),
    ]
}

async fn get_owned(pds: &TestPds, access: &str, nsid: &str, query: &[(&'static str, String)]) -> Answer {
    let query: Vec<(&str, &str)> = query.iter().map(|(k, v)| (*k, v.as_str())).collect();
    get(pds, access, nsid, &query).await
}

#[tokio::test]
async fn fresh_writes_show_before_the_appview_indexes_them() {
    let av = AppView::start().await;
    let pds = spawn(&av).await;
    let (access, _) = pds.login().await;
    let did = pds.did.clone();

    // Something the AppView has indexed, so its rev is from this repository's history.
    pds.create(&access, "app.bsky.feed.post", None, post("indexed already")).await;
    let (_, indexed_rev) = pds.latest().await;
    av.set_rev(&indexed_rev);

    // Nothing new yet: every body passes untouched, byte for byte.
    for (nsid, query) in calls(&did) {
        let answer = get_owned(&pds, &access, nsid, &query).await;
        assert_eq!(answer.text(), canned(nsid, &did).expect("canned"), "{nsid}");
        assert_eq!(answer.lag(), None, "{nsid}");
    }

    // The writes the AppView has not seen.
    let avatar = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR read-after-write avatar".to_vec();
    let upload = pds.post_raw("com.atproto.repo.uploadBlob", Some(&access), Some("image/png"), avatar).await;
    assert_eq!(upload.status.as_u16(), 200, "{}", upload.text());
    let blob = upload.json()["blob"].clone();
    let avatar_cid = blob["ref"]["$link"].as_str().expect("cid").to_owned();
    pds.put(
        &access,
        "app.bsky.actor.profile",
        "self",
        json!({"$type": "app.bsky.actor.profile", "displayName": "Alice Fresh", "description": "new bio", "avatar": blob}),
    )
    .await;
    let fresh = pds.create(&access, "app.bsky.feed.post", None, post("just posted")).await;
    let fresh_uri = fresh["uri"].as_str().expect("uri").to_owned();
    let reply = json!({
        "$type": "app.bsky.feed.post",
        "text": "a reply",
        "createdAt": "2024-01-01T00:00:00.000Z",
        "reply": {
            "root": {"uri": bob_post("root"), "cid": some_cid()},
            "parent": {"uri": bob_post("root"), "cid": some_cid()},
        },
    });
    let reply = pds.create(&access, "app.bsky.feed.post", None, reply).await;
    let reply_uri = reply["uri"].as_str().expect("uri").to_owned();
    let like = json!({
        "$type": "app.bsky.feed.like",
        "subject": {"uri": bob_post("liked"), "cid": some_cid()},
        "createdAt": "2024-01-01T00:00:00.000Z",
    });
    let like = pds.create(&access, "app.bsky.feed.like", None, like).await;
    let like_uri = like["uri"].as_str().expect("uri").to_owned();
    let avatar_url = format!("/xrpc/com.atproto.sync.getBlob?did={did}&cid={avatar_cid}");

    // Timeline: both new posts on top, newest first, with the fresh profile as author.
    let answer = get(&pds, &access, "app.bsky.feed.getTimeline", &[("limit", "30")]).await;
    assert!(answer.lag().is_some(), "Atproto-Upstream-Lag is set");
    assert_eq!(answer.header("atproto-repo-rev"), Some(indexed_rev.as_str()), "the upstream's rev passes on");
    let body = answer.json();
    assert_eq!(feed_uris(&body), vec![reply_uri.clone(), fresh_uri.clone(), bob_post("old")]);
    assert_eq!(body["cursor"], "c1");
    let spliced = &body["feed"][1]["post"];
    assert_eq!(spliced["record"]["text"], "just posted");
    assert_eq!(spliced["cid"], fresh["cid"]);
    assert_eq!(spliced["likeCount"], 0);
    assert_eq!(spliced["author"]["did"], did.as_str());
    assert_eq!(spliced["author"]["handle"], "alice.test");
    assert_eq!(spliced["author"]["displayName"], "Alice Fresh");
    assert!(spliced["author"]["avatar"].as_str().is_some_and(|a| a.ends_with(&avatar_url)), "{spliced}");

    // Author feed (own): new posts on top, the old post's author refreshed.
    let body = get(&pds, &access, "app.bsky.feed.getAuthorFeed", &[("actor", &did)]).await.json();
    assert_eq!(feed_uris(&body)[..2], [reply_uri.clone(), fresh_uri.clone()]);
    assert_eq!(body["feed"][2]["post"]["author"]["displayName"], "Alice Fresh");
    let body =
        get(&pds, &access, "app.bsky.feed.getAuthorFeed", &[("actor", &did), ("filter", "posts_no_replies")])
            .await
            .json();
    assert_eq!(feed_uris(&body)[0], fresh_uri, "no replies under posts_no_replies");
    assert_eq!(feed_uris(&body).len(), 2);
    // Someone else's feed stays as the AppView sent it.
    let answer = get(&pds, &access, "app.bsky.feed.getAuthorFeed", &[("actor", BOB)]).await;
    assert_eq!(answer.text(), canned("app.bsky.feed.getAuthorFeed", &did).expect("canned"));

    // Profile and profiles: the fresh record's fields.
    let answer = get(&pds, &access, "app.bsky.actor.getProfile", &[("actor", &did)]).await;
    assert!(answer.lag().is_some());
    let body = answer.json();
    assert_eq!(body["displayName"], "Alice Fresh");
    assert_eq!(body["description"], "new bio");
    assert!(body["avatar"].as_str().is_some_and(|a| a.ends_with(&avatar_url)), "{body}");
    assert_eq!(body["followersCount"], 5, "the AppView's other fields stay");
    let body =
        get(&pds, &access, "app.bsky.actor.getProfiles", &[("actors", &did), ("actors", BOB)]).await.json();
    assert_eq!(body["profiles"][0], json!({"did": BOB, "handle": "bob.test", "displayName": "bob"}));
    assert_eq!(body["profiles"][1]["displayName"], "Alice Fresh");

    // Thread: the reply first under its parent.
    let body = get(&pds, &access, "app.bsky.feed.getPostThread", &[("uri", &bob_post("root"))]).await.json();
    let replies = body["thread"]["replies"].as_array().expect("replies");
    assert_eq!(replies.len(), 2);
    assert_eq!(replies[0]["post"]["uri"], reply_uri.as_str());
    assert_eq!(replies[0]["post"]["record"]["text"], "a reply");
    assert_eq!(replies[1]["post"]["uri"], bob_post("other-reply").as_str());

    // The fresh reply itself, which the AppView cannot find: a local thread
    // under the AppView's thread of its parent.
    let answer = get(&pds, &access, "app.bsky.feed.getPostThread", &[("uri", &reply_uri)]).await;
    assert!(answer.lag().is_some());
    let body = answer.json();
    assert_eq!(body["thread"]["post"]["uri"], reply_uri.as_str());
    assert_eq!(body["thread"]["post"]["author"]["displayName"], "Alice Fresh");
    assert_eq!(body["thread"]["parent"]["post"]["uri"], bob_post("root").as_str());
    let ancestor_query = av.seen("app.bsky.feed.getPostThread").last().expect("seen").path_and_query.clone();
    assert!(ancestor_query.contains("depth=0"), "{ancestor_query}");

    // Likes: the liked post (fetched from the AppView as the account) on top, marked liked.
    let body = get(&pds, &access, "app.bsky.feed.getActorLikes", &[("actor", &did)]).await.json();
    assert_eq!(feed_uris(&body), vec![bob_post("liked"), bob_post("liked-before")]);
    assert_eq!(body["feed"][0]["post"]["viewer"]["like"], like_uri.as_str());
    assert_eq!(body["feed"][0]["post"]["likeCount"], 3);
    let get_posts = av.seen("app.bsky.feed.getPosts");
    assert_eq!(get_posts.len(), 1, "one getPosts for the liked posts");
    let token = get_posts[0].headers["authorization"].to_str().expect("ascii").trim_start_matches("Bearer ");
    let claims = jwt_claims(token);
    assert_eq!(claims["iss"], did.as_str());
    assert_eq!(claims["lxm"], "app.bsky.feed.getPosts");

    // These methods ask for a plain body whatever the client accepts.
    for seen in av.seen("app.bsky.feed.getTimeline") {
        assert_eq!(seen.headers["accept-encoding"], "identity");
    }

    // Bodies that are not JSON, or no rev header: passed through unchanged.
    let answer = get(&pds, &access, "app.bsky.feed.getTimeline", &[("mode", "text")]).await;
    assert_eq!(answer.text(), "not json at all");
    assert_eq!(answer.header("content-type"), Some("text/plain"));
    assert_eq!(answer.lag(), None);
    let answer = get(&pds, &access, "app.bsky.feed.getTimeline", &[("mode", "broken")]).await;
    assert_eq!(answer.text(), "{\"feed\": [");
    assert_eq!(answer.lag(), None);
    let answer = get(&pds, &access, "app.bsky.feed.getTimeline", &[("mode", "norev")]).await;
    assert_eq!(answer.text(), canned("app.bsky.feed.getTimeline", &did).expect("canned"));
    assert_eq!(answer.lag(), None);

    // Once the AppView has caught up, everything is its own again, byte for byte.
    let (_, latest) = pds.latest().await;
    av.set_rev(&latest);
    let query = serde_urlencoded::to_string([("uri", &reply_uri)]).expect("query");
    let url = format!("{}/xrpc/app.bsky.feed.getPostThread?{query}", pds.base_url);
    let response = http_client().get(url).bearer_auth(&access).send().await.expect("request");
    assert_eq!(response.status().as_u16(), 400, "NotFound passes through when the AppView is current");
    assert_eq!(response.json::<Value>().await.expect("json")["error"], "NotFound");
    for (nsid, query) in calls(&did) {
        let answer = get_owned(&pds, &access, nsid, &query).await;
        assert_eq!(answer.status, 200);
        assert_eq!(answer.text(), canned(nsid, &did).expect("canned"), "{nsid}");
        assert_eq!(answer.lag(), None, "{nsid}");
    }
}

#[tokio::test]
async fn a_rev_from_before_the_repository_splices_nothing() {
    // An AppView rev older than every record (an account that moved here):
    // every record would look fresh, so nothing is spliced (as the reference PDS).
    let av = AppView::start().await;
    let pds = spawn(&av).await;
    let (access, _) = pds.login().await;
    av.set_rev("2222222222222");
    pds.create(&access, "app.bsky.feed.post", None, post("old history")).await;
    let answer = get(&pds, &access, "app.bsky.feed.getTimeline", &[]).await;
    assert_eq!(answer.text(), canned("app.bsky.feed.getTimeline", &pds.did).expect("canned"));
    assert_eq!(answer.lag(), None);
}
