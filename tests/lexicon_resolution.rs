//! Network lexicon resolution against a local publisher: a mock that plays
//! PLC directory, `did:web` host and PDS on 127.0.0.1, with the DNS TXT
//! answers injected through the `TxtLookup` trait (or pinned by
//! configuration), so nothing leaves the machine.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::get;
use common::{Options, TestPds};
use roost::atp::syntax::Nsid;
use roost::lexicon::Catalog;
use roost::lexicon::resolve::{LexiconCache, ResolveError, Resolver};
use roost::lexicon_net::{NetworkFetcher, TxtLookup, guarded_client};
use serde_json::{Value, json};

const PLC_DID: &str = "did:plc:abcdefghijklmnopqrstuvwx";
const THING: &str = "com.example.fun.thing";
const DEFS: &str = "com.example.fun.defs";

/// The publisher: DID documents and `com.atproto.lexicon.schema` records.
struct Publisher {
    url: String,
    web_did: String,
    /// How many schema records were served, to see the cache at work.
    fetches: AtomicUsize,
    /// The PDS endpoint its DID documents name.
    endpoint: std::sync::Mutex<String>,
}

fn schema(id: &str, defs: Value) -> Value {
    json!({ "$type": "com.atproto.lexicon.schema", "lexicon": 1, "id": id, "defs": defs })
}

fn schemas() -> HashMap<String, Value> {
    let thing = schema(
        THING,
        json!({ "main": { "type": "record", "key": "tid", "record": {
            "type": "object", "required": ["tag"],
            "properties": { "tag": { "type": "ref", "ref": "com.example.fun.defs#tag" } },
        }}}),
    );
    let defs = schema(
        DEFS,
        json!({ "tag": { "type": "object", "required": ["name"],
            "properties": { "name": { "type": "string", "maxLength": 10 } } } }),
    );
    HashMap::from([(THING.to_owned(), thing), (DEFS.to_owned(), defs)])
}

impl Publisher {
    fn did_doc(&self, did: &str) -> Value {
        json!({
            "@context": ["https://www.w3.org/ns/did/v1"],
            "id": did,
            "service": [{ "id": "#atproto_pds", "type": "AtprotoPersonalDataServer",
                          "serviceEndpoint": *self.endpoint.lock().expect("lock") }],
        })
    }
}

async fn start_publisher() -> Arc<Publisher> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let publisher = Arc::new(Publisher {
        url: format!("http://127.0.0.1:{port}"),
        web_did: format!("did:web:localhost%3A{port}"),
        fetches: AtomicUsize::new(0),
        endpoint: std::sync::Mutex::new(format!("http://127.0.0.1:{port}")),
    });
    let schemas = Arc::new(schemas());
    let app = axum::Router::new()
        .route(
            "/.well-known/did.json",
            get(|State(p): State<Arc<Publisher>>| async move { Json(p.did_doc(&p.web_did)) }),
        )
        .route(
            "/xrpc/com.atproto.repo.getRecord",
            get({
                let schemas = schemas.clone();
                move |State(p): State<Arc<Publisher>>, Query(q): Query<HashMap<String, String>>| async move {
                    p.fetches.fetch_add(1, Ordering::SeqCst);
                    let ok = q.get("collection").map(String::as_str) == Some("com.atproto.lexicon.schema");
                    match (ok, q.get("rkey").and_then(|k| schemas.get(k))) {
                        (true, Some(value)) => {
                            let uri = format!("at://{}/com.atproto.lexicon.schema/{}", q["repo"], q["rkey"]);
                            (StatusCode::OK, Json(json!({ "uri": uri, "value": value })))
                        }
                        _ => (
                            StatusCode::BAD_REQUEST,
                            Json(json!({ "error": "RecordNotFound", "message": "Could not locate record" })),
                        ),
                    }
                }
            }),
        )
        .route(
            "/{did}",
            get(|State(p): State<Arc<Publisher>>, Path(did): Path<String>| async move {
                if did == PLC_DID { Ok(Json(p.did_doc(&did))) } else { Err(StatusCode::NOT_FOUND) }
            }),
        )
        .with_state(publisher.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.expect("serve") });
    publisher
}

/// TXT answers from a table: what the tests inject in place of DNS.
struct StaticTxt(HashMap<String, Vec<String>>);

impl TxtLookup for StaticTxt {
    fn txt<'a>(
        &'a self,
        name: &'a str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Vec<String>, String>> + Send + 'a>> {
        Box::pin(async move { Ok(self.0.get(name).cloned().unwrap_or_default()) })
    }
}

fn fetcher(publisher: &Publisher, txt: &[(&str, &str)], allow_private: bool) -> NetworkFetcher {
    common::install_crypto();
    let txt = StaticTxt(txt.iter().map(|(k, v)| (k.to_string(), vec![v.to_string()])).collect());
    NetworkFetcher::new(
        Box::new(txt),
        guarded_client(allow_private).expect("client"),
        reqwest::Client::new(),
        publisher.url.clone(),
        allow_private,
    )
}

fn nsid(s: &str) -> Nsid {
    Nsid::new(s).expect("nsid")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolves_a_lexicon_and_its_references_and_caches_them() {
    let publisher = start_publisher().await;
    let txt = [("_lexicon.fun.example.com", &*format!("did={PLC_DID}"))];
    let ttl = Duration::from_secs(600);
    let resolver = Resolver::new(fetcher(&publisher, &txt, true), LexiconCache::new(ttl, ttl));
    let base = Catalog::new();
    let now = Instant::now();

    let catalog = resolver.resolve(&base, &nsid(THING), now).await.expect("resolves");
    assert!(catalog.contains(THING) && catalog.contains(DEFS), "the referenced document is fetched too");
    assert_eq!(publisher.fetches.load(Ordering::SeqCst), 2);
    let good = json!({ "$type": THING, "tag": { "name": "short" } });
    let bad = json!({ "$type": THING, "tag": { "name": "far too long a name" } });
    assert!(catalog.validate_record(THING, "3kabcdefghijk", &good).is_ok());
    assert!(catalog.validate_record(THING, "3kabcdefghijk", &bad).is_err());

    // Within the TTL: from the cache, no request.
    resolver.resolve(&base, &nsid(THING), now + ttl / 2).await.expect("cached");
    assert_eq!(publisher.fetches.load(Ordering::SeqCst), 2, "served from the cache");
    // Past it: fetched again.
    resolver.resolve(&base, &nsid(THING), now + ttl).await.expect("refetched");
    assert_eq!(publisher.fetches.load(Ordering::SeqCst), 4, "expired entries are fetched again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_reported_and_cached() {
    let publisher = start_publisher().await;
    let ttl = Duration::from_secs(60);
    let now = Instant::now();

    // No TXT record: no DNS walking, a clear error.
    let resolver = Resolver::new(fetcher(&publisher, &[], true), LexiconCache::new(ttl, ttl));
    let err = resolver.resolve(&Catalog::new(), &nsid(THING), now).await.expect_err("no authority");
    assert_eq!(err, ResolveError::NoAuthority("_lexicon.fun.example.com".into()));

    // An authority whose repository lacks the schema.
    let txt = [("_lexicon.other.example.com", &*format!("did={PLC_DID}"))];
    let resolver = Resolver::new(fetcher(&publisher, &txt, true), LexiconCache::new(ttl, ttl));
    let missing = nsid("com.example.other.nothing");
    let err = resolver.resolve(&Catalog::new(), &missing, now).await.expect_err("no record");
    assert!(matches!(err, ResolveError::Fetch { .. }), "{err:?}");
    let before = publisher.fetches.load(Ordering::SeqCst);
    let again = resolver.resolve(&Catalog::new(), &missing, now).await.expect_err("cached failure");
    assert_eq!(again, err);
    assert_eq!(publisher.fetches.load(Ordering::SeqCst), before, "a failure is cached too");
}

/// Outside dev mode, addresses learnt from the network must be public: a DID
/// document pointing at loopback (or a name resolving to it) is refused
/// before any request is made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_public_addresses_are_refused_outside_dev_mode() {
    let publisher = start_publisher().await;
    let txt = [("_lexicon.fun.example.com", &*format!("did={PLC_DID}"))];
    let ttl = Duration::from_secs(60);
    let port = publisher.url.rsplit(':').next().expect("port").to_owned();
    for endpoint in
        [publisher.url.clone(), format!("https://127.0.0.1:{port}"), format!("https://localhost:{port}")]
    {
        *publisher.endpoint.lock().expect("lock") = endpoint.clone();
        let resolver = Resolver::new(fetcher(&publisher, &txt, false), LexiconCache::new(ttl, ttl));
        let err = resolver.resolve(&Catalog::new(), &nsid(THING), Instant::now()).await.expect_err(&endpoint);
        let ResolveError::Fetch { reason, .. } = &err else { panic!("{endpoint}: {err:?}") };
        assert!(reason.contains("refusing") || reason.contains("no public address"), "{endpoint}: {reason}");
    }
    assert_eq!(publisher.fetches.load(Ordering::SeqCst), 0, "no schema request reached the mock");
}

/// The switch on a running server: records of a collection nobody bundled
/// are validated against the published lexicon (authority pinned by
/// configuration, DID on `did:web`), and stay `unknown` with it off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_with_resolution_on_validates_published_lexicons() {
    let publisher = start_publisher().await;
    for enabled in [true, false] {
        let did = publisher.web_did.clone();
        let pds = TestPds::spawn_with(Options {
            configure: Some(Box::new(move |c| {
                c.lexicons.resolution = enabled;
                c.lexicons.authorities = vec![("fun.example.com".into(), did)];
            })),
            ..Options::default()
        })
        .await;
        let (access, _) = pds.login().await;
        let create = |record: Value| {
            let body = json!({ "repo": pds.did, "collection": THING, "record": record });
            let (pds, access) = (&pds, access.clone());
            async move { pds.post("com.atproto.repo.createRecord", Some(&access), &body).await }
        };
        let (status, body) =
            create(json!({ "$type": THING, "tag": { "name": "far too long a name" } })).await;
        if enabled {
            assert_eq!(status.as_u16(), 400, "{body}");
            assert!(body["message"].as_str().unwrap_or("").contains("tag/name"), "{body}");
            let (status, body) = create(json!({ "$type": THING, "tag": { "name": "ok" } })).await;
            assert_eq!(status.as_u16(), 200, "{body}");
            assert_eq!(body["validationStatus"], "valid");
        } else {
            assert_eq!(status.as_u16(), 200, "{body}");
            assert_eq!(body["validationStatus"], "unknown");
        }
    }
}
