//! Rate limits against a real server: the per-IP request limit (keyed by the
//! proxy's `X-Forwarded-For` when the peer is a local proxy), repository
//! write points per account, and the 429 shape clients expect.

mod common;

use common::*;
use reqwest::StatusCode;
use serde_json::json;

async fn spawn_limited() -> TestPds {
    TestPds::spawn_with(Options {
        configure: Some(Box::new(|c| {
            c.rate_limits_enabled = true;
            c.trusted_proxies = 1;
        })),
        ..Options::default()
    })
    .await
}

#[tokio::test]
async fn requests_per_ip_are_limited_with_ratelimit_headers() {
    let pds = spawn_limited().await;
    let url = format!("{}/xrpc/com.atproto.server.describeServer", pds.base_url);
    let client = http_client();
    let get = |ip: &'static str| client.get(&url).header("x-forwarded-for", ip).send();
    for i in 0..3000 {
        let resp = get("203.0.113.5").await.expect("GET");
        assert_eq!(resp.status(), StatusCode::OK, "request {i} is within the limit");
    }
    // The budget refills evenly (one request per 100 ms), so a few more may
    // pass while this test runs; then the limit holds.
    let mut extra = 0;
    let resp = loop {
        let resp = get("203.0.113.5").await.expect("GET");
        if resp.status() != StatusCode::OK {
            break resp;
        }
        extra += 1;
        assert!(extra < 200, "still not limited after {} requests", 3000 + extra);
    };
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let h = resp.headers().clone();
    assert_eq!(h["ratelimit-limit"], "3000");
    assert_eq!(h["ratelimit-remaining"], "0");
    assert_eq!(h["ratelimit-policy"], "3000;w=300");
    assert!(h.contains_key("ratelimit-reset") && h.contains_key("retry-after"));
    let body: serde_json::Value = resp.json().await.expect("json");
    assert_eq!(body["error"], "RateLimitExceeded", "{body}");
    // Another client behind the same proxy is not affected; the health check never is.
    assert_eq!(get("203.0.113.6").await.expect("GET").status(), StatusCode::OK);
    let health =
        client.get(format!("{}/xrpc/_health", pds.base_url)).header("x-forwarded-for", "203.0.113.5");
    assert_eq!(health.send().await.expect("GET").status(), StatusCode::OK);
}

#[tokio::test]
async fn repository_writes_are_limited_by_points() {
    let pds = spawn_limited().await;
    let (access, _) = pds.login().await;
    // 200 creates = 600 points; the hourly budget is 5,000.
    let batch = |b: usize| {
        let writes: Vec<_> = (0..200)
            .map(|i| {
                json!({"$type": "com.atproto.repo.applyWrites#create", "collection": "app.bsky.feed.post",
                       "rkey": format!("b{b:02}i{i:03}"), "value": post("x")})
            })
            .collect();
        json!({"repo": pds.did, "writes": writes})
    };
    for b in 0..8 {
        let (status, body) = pds.post("com.atproto.repo.applyWrites", Some(&access), &batch(b)).await;
        assert_eq!(status, StatusCode::OK, "batch {b}: {body}");
    }
    let (status, body) = pds.post("com.atproto.repo.applyWrites", Some(&access), &batch(8)).await;
    assert_xrpc_error(status, &body, 429, "RateLimitExceeded");
    // A refused batch wrote nothing.
    assert!(pds.record(&pds.did, "app.bsky.feed.post", "b08i000").await.is_none());
    // Small writes still fit in what is left (5000 - 4800 = 200 points).
    let (status, body) = pds
        .post(
            "com.atproto.repo.createRecord",
            Some(&access),
            &json!({"repo": pds.did, "collection": "app.bsky.feed.post", "record": post("one more")}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
}
