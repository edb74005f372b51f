//! Malformed requests: each must get the expected 4xx/5xx status and XRPC
//! error name, a JSON `{"error", "message"}` body, and leave the repository
//! exactly as it was (same `getLatestCommit` before and after).
//!
//! All cases run against one server and every mismatch is collected, so one
//! run reports every failing case at once.

mod common;

use reqwest::Method;
use serde_json::{Value, json};

use common::*;

const POST: &str = "app.bsky.feed.post";

#[derive(Clone, Copy)]
enum Auth {
    None,
    Access,
    Refresh,
    /// A literal Authorization header value.
    Header(&'static str),
    /// The access token with its signature altered.
    TamperedAccess,
    /// An unsigned (`alg: none`) token with the access token's claims.
    AlgNone,
    /// A token correctly signed with the server's JWT secret, but wrong.
    Minted(Mint),
}

#[derive(Clone, Copy, Debug)]
enum Mint {
    /// An access token whose `exp` has passed.
    Expired,
    /// `aud` is some other service.
    WrongAudience,
    /// `sub` is another DID, with our live session id.
    OtherDid,
    /// No `sid` claim.
    NoSession,
    /// A `sid` that names no session.
    UnknownSession,
}

/// Signs session claims with the server's own HS256 secret.
fn mint(secret: &[u8], aud: &str, sub: &str, sid: Option<&str>, expired: bool) -> String {
    use jwt_simple::prelude::{Claims, Clock, Duration, HS256Key, MACLike};
    let mut custom = serde_json::Map::new();
    custom.insert("scope".into(), json!("com.atproto.access"));
    if let Some(sid) = sid {
        custom.insert("sid".into(), json!(sid));
    }
    let mut claims =
        Claims::with_custom_claims(custom, Duration::from_mins(5)).with_audience(aud).with_subject(sub);
    if expired {
        let past = Clock::now_since_epoch() - Duration::from_hours(2);
        claims.issued_at = Some(past);
        claims.invalid_before = Some(past);
        claims.expires_at = Some(past + Duration::from_mins(5));
    }
    HS256Key::from_bytes(secret).authenticate(claims).expect("sign a JWT")
}

struct Case {
    name: String,
    method: Method,
    /// Path and query, e.g. `/xrpc/com.atproto.repo.getRecord?repo=...`.
    path: String,
    auth: Auth,
    content_type: Option<&'static str>,
    body: Option<Vec<u8>>,
    /// Acceptable (status, error) pairs; the first is Roost's intended answer.
    expect: Vec<(u16, &'static str)>,
}

fn case(name: impl Into<String>, method: Method, path: String, expect: (u16, &'static str)) -> Case {
    Case {
        name: name.into(),
        method,
        path,
        auth: Auth::None,
        content_type: None,
        body: None,
        expect: vec![expect],
    }
}

impl Case {
    fn auth(mut self, auth: Auth) -> Self {
        self.auth = auth;
        self
    }
    fn json(mut self, body: &Value) -> Self {
        self.content_type = Some("application/json");
        self.body = Some(serde_json::to_vec(body).expect("json"));
        self
    }
    fn raw(mut self, content_type: Option<&'static str>, body: impl Into<Vec<u8>>) -> Self {
        self.content_type = content_type;
        self.body = Some(body.into());
        self
    }
    fn or(mut self, alt: (u16, &'static str)) -> Self {
        self.expect.push(alt);
        self
    }
}

fn xrpc(nsid: &str) -> String {
    format!("/xrpc/{nsid}")
}

fn query(nsid: &str, q: &[(&str, &str)]) -> String {
    format!("/xrpc/{nsid}?{}", query_string(q))
}

/// An authenticated POST of a JSON body to a procedure.
fn write(name: impl Into<String>, nsid: &str, body: Value, expect: (u16, &'static str)) -> Case {
    case(name, Method::POST, xrpc(nsid), expect).auth(Auth::Access).json(&body)
}

const INVALID: (u16, &str) = (400, "InvalidRequest");

fn post_record(text: &str) -> Value {
    json!({ "$type": POST, "text": text, "createdAt": "2024-01-01T00:00:00.000Z" })
}

fn nested(depth: usize) -> Value {
    let mut v = json!("leaf");
    for _ in 0..depth {
        v = json!({ "n": v });
    }
    v
}

fn cases(did: &str) -> Vec<Case> {
    let create = "com.atproto.repo.createRecord";
    let put = "com.atproto.repo.putRecord";
    let delete = "com.atproto.repo.deleteRecord";
    let apply = "com.atproto.repo.applyWrites";
    let rec = post_record("hi");
    let create_with = |record: Value| json!({ "repo": did, "collection": POST, "record": record });
    let with_field = |field: &str, value: Value| {
        let mut record = post_record("hi");
        record[field] = value;
        create_with(record)
    };
    let apply_create = |rkey: &str| json!({ "$type": "com.atproto.repo.applyWrites#create", "collection": POST, "rkey": rkey, "value": post_record(rkey) });
    let too_long_rkey = "k".repeat(513);
    let huge = vec![b'x'; 2 * 1024 * 1024 + 512 * 1024];
    let mut huge_json = br#"{"repo":""#.to_vec();
    huge_json.extend(std::iter::repeat_n(b'a', 2 * 1024 * 1024 + 100));
    huge_json.extend(br#""}"#);
    let big_record = create_with(json!({ "$type": POST, "text": "y".repeat(1024 * 1024 + 10) }));

    let mut v = vec![
        // --- The body itself
        case("invalid JSON body", Method::POST, xrpc(create), INVALID)
            .auth(Auth::Access)
            .raw(Some("application/json"), br#"{"repo": "did"#.to_vec()),
        case("empty body", Method::POST, xrpc(create), INVALID)
            .auth(Auth::Access)
            .raw(Some("application/json"), Vec::new()),
        write("JSON array body", create, json!([1, 2]), INVALID),
        write("record missing", create, json!({ "repo": did, "collection": POST }), INVALID),
        write("repo missing", create, json!({ "collection": POST, "record": rec }), INVALID),
        write(
            "collection is a number",
            create,
            json!({ "repo": did, "collection": 42, "record": rec }),
            INVALID,
        ),
        write(
            "rkey is a number",
            create,
            json!({ "repo": did, "collection": POST, "rkey": 7, "record": rec }),
            INVALID,
        ),
        case("wrong Content-Type (text/plain)", Method::POST, xrpc(create), INVALID)
            .auth(Auth::Access)
            .raw(Some("text/plain"), serde_json::to_vec(&create_with(rec.clone())).expect("json")),
        case("no Content-Type", Method::POST, xrpc(create), INVALID)
            .auth(Auth::Access)
            .raw(None, serde_json::to_vec(&create_with(rec.clone())).expect("json")),
        case("body of 2.5 MiB", Method::POST, xrpc(create), (413, "PayloadTooLarge"))
            .auth(Auth::Access)
            .raw(Some("application/json"), huge),
        case("JSON body of 2 MiB+", Method::POST, xrpc(create), (413, "PayloadTooLarge"))
            .auth(Auth::Access)
            .raw(Some("application/json"), huge_json),
        write("record over the JSON limit (1 MiB)", create, big_record, (413, "PayloadTooLarge")),
        // --- Collections and record keys
        write(
            "invalid NSID collection",
            create,
            json!({ "repo": did, "collection": "not an nsid", "record": rec }),
            INVALID,
        ),
        write(
            "two-segment collection",
            create,
            json!({ "repo": did, "collection": "app.bsky", "record": rec }),
            INVALID,
        ),
        write(
            "collection with a slash",
            create,
            json!({ "repo": did, "collection": "app.bsky.feed.post/x", "record": rec }),
            INVALID,
        ),
        write(
            "rkey ..",
            create,
            json!({ "repo": did, "collection": POST, "rkey": "..", "record": rec }),
            INVALID,
        ),
        write(
            "rkey .",
            create,
            json!({ "repo": did, "collection": POST, "rkey": ".", "record": rec }),
            INVALID,
        ),
        write(
            "rkey a/b",
            create,
            json!({ "repo": did, "collection": POST, "rkey": "a/b", "record": rec }),
            INVALID,
        ),
        write(
            "rkey empty",
            create,
            json!({ "repo": did, "collection": POST, "rkey": "", "record": rec }),
            INVALID,
        ),
        write(
            "rkey with a space",
            create,
            json!({ "repo": did, "collection": POST, "rkey": "a b", "record": rec }),
            INVALID,
        ),
        write(
            "rkey 513 chars",
            create,
            json!({ "repo": did, "collection": POST, "rkey": too_long_rkey, "record": rec }),
            INVALID,
        ),
        write(
            "putRecord rkey ..",
            put,
            json!({ "repo": did, "collection": POST, "rkey": "..", "record": rec }),
            INVALID,
        ),
        write(
            "putRecord rkey a/b",
            put,
            json!({ "repo": did, "collection": POST, "rkey": "a/b", "record": rec }),
            INVALID,
        ),
        write(
            "deleteRecord rkey a/b",
            delete,
            json!({ "repo": did, "collection": POST, "rkey": "a/b" }),
            INVALID,
        ),
        write(
            "deleteRecord rkey ..",
            delete,
            json!({ "repo": did, "collection": POST, "rkey": ".." }),
            INVALID,
        ),
        write(
            "create over an existing record",
            create,
            json!({ "repo": did, "collection": POST, "rkey": "seed", "record": rec }),
            INVALID,
        ),
        // --- Record contents
        write(
            "$type differs from the collection",
            create,
            create_with(json!({ "$type": "app.bsky.feed.like", "text": "x" })),
            INVALID,
        ),
        write("$type not a string", create, create_with(json!({ "$type": 5 })), INVALID),
        write("record is a string", create, create_with(json!("just text")), INVALID),
        write("record is an array", create, create_with(json!([rec])), INVALID),
        write("record with a float", create, with_field("score", json!(1.5)), INVALID),
        write("record with a nested float", create, with_field("facets", json!([{ "x": 0.25 }])), INVALID),
        write(
            "record with an integer beyond i64",
            create,
            with_field("big", json!(18446744073709551615u64)),
            INVALID,
        ),
        write("malformed $link", create, with_field("ref", json!({ "$link": "notacid" })), INVALID),
        write(
            "$link with extra keys",
            create,
            with_field(
                "ref",
                json!({ "$link": "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm", "x": 1 }),
            ),
            INVALID,
        ),
        write("$link not a string", create, with_field("ref", json!({ "$link": 5 })), INVALID),
        write(
            "CIDv0 $link",
            create,
            with_field("ref", json!({ "$link": "QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG" })),
            INVALID,
        ),
        write(
            "malformed $bytes",
            create,
            with_field("data", json!({ "$bytes": "!!!not base64!!!" })),
            INVALID,
        ),
        write("$bytes not a string", create, with_field("data", json!({ "$bytes": [1, 2] })), INVALID),
        write(
            "malformed blob",
            create,
            with_field(
                "embed",
                json!({ "$type": "blob", "ref": "nope", "mimeType": "image/png", "size": 1 }),
            ),
            INVALID,
        ),
        write("record nested 110 deep", create, with_field("deep", nested(110)), INVALID),
        write("record nested 200 deep", create, with_field("deep", nested(200)), INVALID),
        // --- The repo parameter
        write(
            "repo is an invalid DID",
            create,
            json!({ "repo": "did:plc:", "collection": POST, "record": rec }),
            INVALID,
        ),
        write(
            "repo is an invalid handle",
            create,
            json!({ "repo": "not a handle!", "collection": POST, "record": rec }),
            INVALID,
        ),
        write(
            "repo is another DID",
            create,
            json!({ "repo": "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa", "collection": POST, "record": rec }),
            INVALID,
        )
        .or((403, "AccountNotFound")),
        write(
            "repo is another handle",
            create,
            json!({ "repo": "bob.test", "collection": POST, "record": rec }),
            INVALID,
        )
        .or((403, "AccountNotFound")),
        write(
            "deleteRecord in another repo",
            delete,
            json!({ "repo": "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa", "collection": POST, "rkey": "seed" }),
            INVALID,
        )
        .or((403, "AccountNotFound")),
        // --- Credentials
        write("no auth", create, create_with(rec.clone()), (401, "AuthenticationRequired")).auth(Auth::None),
        write("Basic auth", create, create_with(rec.clone()), (401, "AuthenticationRequired"))
            .auth(Auth::Header("Basic YWxpY2U6aHVudGVyMg==")),
        write("empty bearer", create, create_with(rec.clone()), (401, "AuthenticationRequired"))
            .auth(Auth::Header("Bearer ")),
        write("garbage bearer token", create, create_with(rec.clone()), (400, "InvalidToken"))
            .auth(Auth::Header("Bearer not.a.jwt")),
        write("refresh token used as access token", create, create_with(rec.clone()), (400, "InvalidToken"))
            .auth(Auth::Refresh),
        write("access token with a bad signature", create, create_with(rec.clone()), (400, "InvalidToken"))
            .auth(Auth::TamperedAccess),
        write(
            "expired access token (valid signature)",
            create,
            create_with(rec.clone()),
            (400, "ExpiredToken"),
        )
        .auth(Auth::Minted(Mint::Expired)),
        write(
            "access token for another audience (valid signature)",
            create,
            create_with(rec.clone()),
            (400, "InvalidToken"),
        )
        .auth(Auth::Minted(Mint::WrongAudience)),
        write(
            "access token naming another DID with our session (valid signature)",
            create,
            create_with(rec.clone()),
            (400, "InvalidToken"),
        )
        .auth(Auth::Minted(Mint::OtherDid)),
        write(
            "access token without sid (valid signature)",
            create,
            create_with(rec.clone()),
            (400, "InvalidToken"),
        )
        .auth(Auth::Minted(Mint::NoSession)),
        write(
            "access token with an unknown sid (valid signature)",
            create,
            create_with(rec.clone()),
            (400, "InvalidToken"),
        )
        .auth(Auth::Minted(Mint::UnknownSession)),
        write("alg:none access token", create, create_with(rec.clone()), (400, "InvalidToken"))
            .auth(Auth::AlgNone),
        case(
            "refreshSession with an access token",
            Method::POST,
            xrpc("com.atproto.server.refreshSession"),
            (400, "InvalidToken"),
        )
        .auth(Auth::Access),
        case(
            "getSession with a refresh token",
            Method::GET,
            xrpc("com.atproto.server.getSession"),
            (400, "InvalidToken"),
        )
        .auth(Auth::Refresh),
        case(
            "createSession without password",
            Method::POST,
            xrpc("com.atproto.server.createSession"),
            INVALID,
        )
        .json(&json!({ "identifier": "alice.test" })),
        case("createSession as text/plain", Method::POST, xrpc("com.atproto.server.createSession"), INVALID)
            .raw(Some("text/plain"), br#"{"identifier":"alice.test","password":"x"}"#.to_vec()),
        // --- Swaps
        write(
            "swapCommit not a CID",
            create,
            json!({ "repo": did, "collection": POST, "record": rec, "swapCommit": "notacid" }),
            INVALID,
        ),
        write(
            "swapCommit a number",
            put,
            json!({ "repo": did, "collection": POST, "rkey": "seed", "record": rec, "swapCommit": 5 }),
            INVALID,
        ),
        write(
            "swapRecord not a CID",
            put,
            json!({ "repo": did, "collection": POST, "rkey": "seed", "record": rec, "swapRecord": "notacid" }),
            INVALID,
        ),
        write(
            "swapRecord a number",
            put,
            json!({ "repo": did, "collection": POST, "rkey": "seed", "record": rec, "swapRecord": 5 }),
            INVALID,
        ),
        write(
            "deleteRecord swapRecord not a CID",
            delete,
            json!({ "repo": did, "collection": POST, "rkey": "seed", "swapRecord": "bafy" }),
            INVALID,
        ),
        // --- applyWrites
        write(
            "applyWrites with 201 writes",
            apply,
            json!({ "repo": did, "writes": (0..201).map(|i| apply_create(&format!("w{i}"))).collect::<Vec<_>>() }),
            INVALID,
        ),
        write(
            "applyWrites unknown write $type",
            apply,
            json!({ "repo": did, "writes": [{ "$type": "com.atproto.repo.applyWrites#upsert", "collection": POST, "rkey": "x", "value": rec }] }),
            INVALID,
        ),
        write(
            "applyWrites with one bad rkey among good writes",
            apply,
            json!({ "repo": did, "writes": [apply_create("good1"), apply_create("a/b"), apply_create("good2")] }),
            INVALID,
        ),
        write(
            "applyWrites with one bad record among good writes",
            apply,
            json!({ "repo": did, "writes": [apply_create("good3"), { "$type": "com.atproto.repo.applyWrites#create", "collection": POST, "rkey": "bad", "value": { "$type": POST, "f": 0.5 } }] }),
            INVALID,
        ),
        write(
            "applyWrites creating an existing record",
            apply,
            json!({ "repo": did, "writes": [apply_create("good4"), apply_create("seed")] }),
            INVALID,
        ),
        write("applyWrites writes not a list", apply, json!({ "repo": did, "writes": {} }), INVALID),
        // --- HTTP methods and unknown methods
        case("GET on a procedure", Method::GET, xrpc(create), INVALID),
        case(
            "POST on a query",
            Method::POST,
            query("com.atproto.repo.getRecord", &[("repo", did), ("collection", POST), ("rkey", "seed")]),
            INVALID,
        )
        .raw(Some("application/json"), b"{}".to_vec()),
        case("PUT on a procedure", Method::PUT, xrpc(create), INVALID)
            .auth(Auth::Access)
            .json(&create_with(rec.clone())),
        case("unknown method (GET)", Method::GET, xrpc("com.example.nope"), (501, "MethodNotImplemented")),
        case("unknown method (POST)", Method::POST, xrpc("com.example.nope"), (501, "MethodNotImplemented"))
            .auth(Auth::Access)
            .json(&json!({})),
        // --- Query parameters
        case(
            "listRecords limit=0",
            Method::GET,
            query("com.atproto.repo.listRecords", &[("repo", did), ("collection", POST), ("limit", "0")]),
            INVALID,
        ),
        case(
            "listRecords limit=101",
            Method::GET,
            query("com.atproto.repo.listRecords", &[("repo", did), ("collection", POST), ("limit", "101")]),
            INVALID,
        ),
        case(
            "listRecords limit=-1",
            Method::GET,
            query("com.atproto.repo.listRecords", &[("repo", did), ("collection", POST), ("limit", "-1")]),
            INVALID,
        ),
        case(
            "listRecords limit=abc",
            Method::GET,
            query("com.atproto.repo.listRecords", &[("repo", did), ("collection", POST), ("limit", "abc")]),
            INVALID,
        ),
        case(
            "listRecords reverse=maybe",
            Method::GET,
            query(
                "com.atproto.repo.listRecords",
                &[("repo", did), ("collection", POST), ("reverse", "maybe")],
            ),
            INVALID,
        ),
        case(
            "listRecords without collection",
            Method::GET,
            query("com.atproto.repo.listRecords", &[("repo", did)]),
            INVALID,
        ),
        case(
            "listRecords bad collection",
            Method::GET,
            query("com.atproto.repo.listRecords", &[("repo", did), ("collection", "nope")]),
            INVALID,
        ),
        case(
            "listRecords duplicate limit",
            Method::GET,
            format!(
                "{}&limit=2",
                query("com.atproto.repo.listRecords", &[("repo", did), ("collection", POST), ("limit", "1")])
            ),
            INVALID,
        ),
        case(
            "getRecord of a missing record",
            Method::GET,
            query("com.atproto.repo.getRecord", &[("repo", did), ("collection", POST), ("rkey", "missing")]),
            (400, "RecordNotFound"),
        ),
        case(
            "getRecord bad rkey",
            Method::GET,
            query("com.atproto.repo.getRecord", &[("repo", did), ("collection", POST), ("rkey", "..")]),
            INVALID,
        ),
        case(
            "getRecord cid not a CID",
            Method::GET,
            query(
                "com.atproto.repo.getRecord",
                &[("repo", did), ("collection", POST), ("rkey", "seed"), ("cid", "xyz")],
            ),
            INVALID,
        ),
        case(
            "getRecord bad repo",
            Method::GET,
            query("com.atproto.repo.getRecord", &[("repo", "did:"), ("collection", POST), ("rkey", "seed")]),
            INVALID,
        ),
        case(
            "getRecord invalid UTF-8 in query",
            Method::GET,
            format!("/xrpc/com.atproto.repo.getRecord?repo=%FF%FE&collection={POST}&rkey=seed"),
            INVALID,
        ),
        case(
            "getRepo since=notatid",
            Method::GET,
            query("com.atproto.sync.getRepo", &[("did", did), ("since", "notatid")]),
            INVALID,
        ),
        case(
            "getRepo did=notadid",
            Method::GET,
            query("com.atproto.sync.getRepo", &[("did", "notadid")]),
            INVALID,
        ),
        case(
            "getRepo of an unknown DID",
            Method::GET,
            query("com.atproto.sync.getRepo", &[("did", "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa")]),
            (400, "RepoNotFound"),
        ),
        case("getRepo without did", Method::GET, xrpc("com.atproto.sync.getRepo"), INVALID),
        case(
            "getLatestCommit of an unknown DID",
            Method::GET,
            query("com.atproto.sync.getLatestCommit", &[("did", "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa")]),
            (400, "RepoNotFound"),
        ),
        case(
            "sync.getRecord bad rkey",
            Method::GET,
            query("com.atproto.sync.getRecord", &[("did", did), ("collection", POST), ("rkey", "a/b")]),
            INVALID,
        ),
        case(
            "getBlocks cids not a CID",
            Method::GET,
            query("com.atproto.sync.getBlocks", &[("did", did), ("cids", "notacid")]),
            INVALID,
        ),
        case(
            "getBlocks without did",
            Method::GET,
            query(
                "com.atproto.sync.getBlocks",
                &[("cids", "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm")],
            ),
            INVALID,
        ),
        case(
            "listRepos limit=0",
            Method::GET,
            query("com.atproto.sync.listRepos", &[("limit", "0")]),
            INVALID,
        ),
        case(
            "resolveHandle invalid handle",
            Method::GET,
            query("com.atproto.identity.resolveHandle", &[("handle", "not a handle")]),
            INVALID,
        ),
        case(
            "describeRepo invalid repo",
            Method::GET,
            query("com.atproto.repo.describeRepo", &[("repo", "@@")]),
            INVALID,
        ),
    ];
    // Every writing method refuses each credential problem the same way.
    for nsid in [put, delete, apply] {
        let body = match nsid {
            "com.atproto.repo.applyWrites" => json!({ "repo": did, "writes": [apply_create("z")] }),
            _ => json!({ "repo": did, "collection": POST, "rkey": "seed", "record": rec }),
        };
        v.push(
            write(format!("{nsid} without auth"), nsid, body.clone(), (401, "AuthenticationRequired"))
                .auth(Auth::None),
        );
        v.push(
            write(format!("{nsid} with a garbage token"), nsid, body.clone(), (400, "InvalidToken"))
                .auth(Auth::Header("Bearer garbage")),
        );
        v.push(
            write(format!("{nsid} with the refresh token"), nsid, body, (400, "InvalidToken"))
                .auth(Auth::Refresh),
        );
    }
    v
}

fn tamper_signature(token: &str) -> String {
    let (rest, sig) = token.rsplit_once('.').expect("jwt");
    let mut sig: Vec<u8> = sig.bytes().collect();
    sig[0] = if sig[0] == b'A' { b'B' } else { b'A' };
    format!("{rest}.{}", String::from_utf8(sig).expect("ascii"))
}

fn alg_none(token: &str) -> String {
    use base64::Engine as _;
    let payload = token.split('.').nth(1).expect("payload");
    let header = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
    format!("{header}.{payload}.")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_are_refused_cleanly_and_change_nothing() {
    let mut pds = TestPds::spawn().await;
    // Many cases are refused before their body is read; the server then
    // closes the connection, and a pooled client could race that close on
    // its next request. A fresh connection per request keeps this about the
    // server's answers, not about connection reuse.
    pds.xrpc.http = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .expect("client");
    let (access, refresh) = pds.login().await;
    pds.create(&access, POST, Some("seed"), post_record("seed")).await;
    let seed = pds.record(&pds.did, POST, "seed").await;

    let tampered = format!("Bearer {}", tamper_signature(&access));
    let none = format!("Bearer {}", alg_none(&access));
    let access_h = format!("Bearer {access}");
    // Tokens signed with the server's real secret, to reach the checks
    // behind the signature. First a positive control: a well-formed one works.
    let secret =
        roost::config::Config::for_tests(pds.data_dir.clone(), pds.plc.url.clone(), HANDLE, PASSWORD)
            .jwt_secret
            .expect("test config has a JWT secret");
    let sid = jwt_claims(&access)["sid"].as_str().expect("access token has sid").to_owned();
    let aud = "did:web:localhost";
    let good = mint(secret.as_bytes(), aud, &pds.did, Some(&sid), false);
    let (status, body) = pds.get_auth("com.atproto.server.getSession", &good, &[]).await;
    assert_eq!(status.as_u16(), 200, "minted control token: {body}");
    let minted = |m: Mint| {
        let token = match m {
            Mint::Expired => mint(secret.as_bytes(), aud, &pds.did, Some(&sid), true),
            Mint::WrongAudience => {
                mint(secret.as_bytes(), "did:web:other.example", &pds.did, Some(&sid), false)
            }
            Mint::OtherDid => {
                mint(secret.as_bytes(), aud, "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa", Some(&sid), false)
            }
            Mint::NoSession => mint(secret.as_bytes(), aud, &pds.did, None, false),
            Mint::UnknownSession => {
                mint(secret.as_bytes(), aud, &pds.did, Some("0123456789abcdef0123456789abcdef"), false)
            }
        };
        format!("Bearer {token}")
    };
    let refresh_h = format!("Bearer {refresh}");
    let mut failures = Vec::new();
    let all = cases(&pds.did);
    let count = all.len();
    for c in all {
        let before = pds.latest().await;
        let mut headers: Vec<(&str, &str)> = Vec::new();
        let minted_h;
        let auth = match c.auth {
            Auth::Minted(m) => {
                minted_h = minted(m);
                Some(minted_h.as_str())
            }
            Auth::None => None,
            Auth::Access => Some(access_h.as_str()),
            Auth::Refresh => Some(refresh_h.as_str()),
            Auth::Header(h) => Some(h),
            Auth::TamperedAccess => Some(tampered.as_str()),
            Auth::AlgNone => Some(none.as_str()),
        };
        if let Some(a) = auth {
            headers.push(("authorization", a));
        }
        if let Some(ct) = c.content_type {
            headers.push(("content-type", ct));
        }
        let resp = match pds.try_request(c.method.clone(), &c.path, &headers, c.body.clone()).await {
            Ok(r) => r,
            Err(e) => {
                failures.push(format!("{}: no HTTP response ({e})", c.name));
                continue;
            }
        };
        let body: Option<Value> = serde_json::from_slice(&resp.body).ok();
        let got = (
            resp.status.as_u16(),
            body.as_ref().and_then(|b| b["error"].as_str()).unwrap_or("<none>").to_owned(),
        );
        let mut problems = Vec::new();
        if resp.status.is_server_error() && !c.expect.iter().any(|(s, _)| *s >= 500) {
            problems.push("5xx".to_owned());
        }
        if !c.expect.iter().any(|(s, e)| *s == got.0 && *e == got.1) {
            problems.push(format!("expected {:?}, got {} {}", c.expect[0], got.0, got.1));
        }
        let well_formed = body.as_ref().is_some_and(|b| {
            b.as_object().is_some_and(|o| {
                o["error"].is_string()
                    && o.get("message").is_some_and(Value::is_string)
                    && o.keys().all(|k| k == "error" || k == "message")
            })
        });
        if !well_formed {
            problems.push(format!(
                "not an XRPC error body: {:?}",
                resp.text().chars().take(200).collect::<String>()
            ));
        }
        if !resp.content_type.as_deref().is_some_and(|ct| ct.starts_with("application/json")) {
            problems.push(format!("Content-Type {:?}", resp.content_type));
        }
        let after = pds.latest().await;
        if after != before {
            problems.push(format!("repository changed: {before:?} -> {after:?}"));
        }
        if !problems.is_empty() {
            failures.push(format!(
                "{} ({} {}): {}",
                c.name,
                c.method,
                c.path.chars().take(120).collect::<String>(),
                problems.join("; ")
            ));
        }
    }
    // The seed record and the session are intact, and the server still works.
    assert_eq!(pds.record(&pds.did, POST, "seed").await, seed);
    for rkey in ["good1", "good2", "good3", "good4", "bad", "w0", "z"] {
        assert!(pds.record(&pds.did, POST, rkey).await.is_none(), "{rkey} was written");
    }
    let (status, body) = pds.get_auth("com.atproto.server.getSession", &access, &[]).await;
    assert_eq!(status.as_u16(), 200, "{body}");
    pds.create(&access, POST, Some("after"), post_record("still works")).await;
    pds.verify().await;
    assert!(
        failures.is_empty(),
        "{} of {count} malformed requests were mishandled:\n  {}",
        failures.len(),
        failures.join("\n  ")
    );
}
