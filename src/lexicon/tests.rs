//! Fixture-driven tests. Fixtures are read in place from `../shared`
//! (interop lexicon fixtures, the official lexicons, and the codegen
//! lexicons of the atproto monorepo); every test counts what it read.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::*;

fn shared(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared").join(rel)
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

/// Every `*.json` under `dir`, sorted so failures are reported stably.
fn json_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "json") {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

fn cases(path: &Path) -> Vec<Value> {
    match read_json(path) {
        Value::Array(cases) => cases,
        _ => panic!("{}: expected a JSON array", path.display()),
    }
}

/// Fails with every problem at once, after checking something was read.
fn report(what: &str, count: usize, failures: &[String]) {
    assert!(count > 0, "{what}: read no cases");
    eprintln!("{what}: {count} cases");
    assert!(failures.is_empty(), "{what}: {} of {count} failed:\n{}", failures.len(), failures.join("\n"));
}

/// A catalog of every document under `dir`, asserting each one loads.
fn load_dir(catalog: &mut Catalog, dir: &Path) -> usize {
    let files = json_files(dir);
    let mut failures = Vec::new();
    for path in &files {
        if let Err(e) = catalog.add_document(&read_json(path)) {
            failures.push(format!("{}: {e}", path.display()));
        }
    }
    report(&dir.display().to_string(), files.len(), &failures);
    files.len()
}

fn official() -> Catalog {
    let mut catalog = Catalog::new();
    load_dir(&mut catalog, &shared("lexicons"));
    catalog
}

fn interop_catalog() -> Catalog {
    let mut catalog = official();
    let n = load_dir(&mut catalog, &shared("interop/lexicon/catalog"));
    assert_eq!(n, 5, "the interop catalog has five documents");
    catalog
}

// ---------------------------------------------------------------------------
// Meta-validation

#[test]
fn interop_lexicon_valid() {
    let path = shared("interop/lexicon/lexicon-valid.json");
    let cases = cases(&path);
    let mut failures = Vec::new();
    for case in &cases {
        if let Err(e) = Catalog::new().add_document(&case["lexicon"]) {
            failures.push(format!("{}: rejected: {e}", case["name"]));
        }
    }
    report("lexicon-valid.json", cases.len(), &failures);
}

#[test]
fn interop_lexicon_invalid() {
    let path = shared("interop/lexicon/lexicon-invalid.json");
    let cases = cases(&path);
    let mut failures = Vec::new();
    for case in &cases {
        match Catalog::new().add_document(&case["lexicon"]) {
            Ok(()) => failures.push(format!("{}: accepted", case["name"])),
            Err(e) => eprintln!("  {}: {e}", case["name"]),
        }
    }
    report("lexicon-invalid.json", cases.len(), &failures);
}

#[test]
fn official_lexicons_load_and_are_closed_under_refs() {
    let catalog = official();
    assert!(catalog.len() > 300, "only {} official documents", catalog.len());
    let dangling = catalog.dangling_refs();
    assert!(dangling.is_empty(), "dangling refs: {dangling:#?}");
}

#[test]
fn codegen_lexicons_load() {
    let dir = shared("atproto-fixtures/packages/lex/lex/lexicons/com/example");
    let mut catalog = Catalog::new();
    let n = load_dir(&mut catalog, &dir);
    assert_eq!(n, 33);
    let odd = catalog.get("com.example.4-2.unsafeDefs").unwrap();
    assert!(odd.def("ob-je-c$t").is_some() && odd.def("ff-ri-n.g").is_some() && odd.def("9").is_some());
    let dangling = catalog.dangling_refs();
    assert!(dangling.is_empty(), "dangling refs: {dangling:#?}");
}

#[test]
fn meta_validation_rules() {
    let doc = |defs: Value| json!({"lexicon": 1, "id": "com.example.test", "defs": defs});
    let bad = [
        ("no defs", doc(json!({}))),
        ("version 2", json!({"lexicon": 2, "id": "com.example.test", "defs": {"a": {"type": "token"}}})),
        ("unknown type", doc(json!({"a": {"type": "float"}}))),
        ("named union", doc(json!({"a": {"type": "union", "refs": []}}))),
        ("named params", doc(json!({"a": {"type": "params", "properties": {}}}))),
        ("query not main", doc(json!({"a": {"type": "query"}}))),
        (
            "record in a field",
            doc(json!({"a": {"type": "object", "properties": {
            "r": {"type": "record", "key": "any", "record": {"type": "object", "properties": {}}}}}})),
        ),
        ("token in a field", doc(json!({"a": {"type": "object", "properties": {"t": {"type": "token"}}}}))),
        (
            "bad key type",
            doc(json!({"main": {"type": "record", "key": "uuid",
            "record": {"type": "object", "properties": {}}}})),
        ),
        (
            "record not an object",
            doc(json!({"main": {"type": "record", "key": "tid",
            "record": {"type": "string"}}})),
        ),
        (
            "closed empty union",
            doc(json!({"a": {"type": "object", "properties": {
            "u": {"type": "union", "refs": [], "closed": true}}}})),
        ),
        (
            "bad ref",
            doc(json!({"a": {"type": "object", "properties": {"r": {"type": "ref", "ref": "not an nsid"}}}})),
        ),
        ("undefined required", doc(json!({"a": {"type": "object", "required": ["x"], "properties": {}}}))),
        ("const and default", doc(json!({"a": {"type": "string", "const": "x", "default": "y"}}))),
        ("min above max", doc(json!({"a": {"type": "integer", "minimum": 5, "maximum": 1}}))),
        ("bad accept", doc(json!({"a": {"type": "blob", "accept": ["image/png*"]}}))),
        (
            "object param",
            doc(json!({"main": {"type": "query", "parameters": {"type": "params",
            "properties": {"o": {"type": "object", "properties": {}}}}}})),
        ),
        (
            "message not a union",
            doc(json!({"main": {"type": "subscription",
            "message": {"schema": {"type": "object", "properties": {}}}}})),
        ),
        ("unknown format", doc(json!({"a": {"type": "string", "format": "email"}}))),
    ];
    for (name, json) in bad {
        let result = Catalog::new().add_document(&json);
        assert!(result.is_err(), "{name}: accepted");
        eprintln!("{name}: {}", result.unwrap_err());
    }
    let err = Catalog::new()
        .add_document(&doc(json!({"a": {"type": "object", "properties": {"t": {"type": "token"}}}})))
        .unwrap_err();
    assert_eq!(err.id(), Some("com.example.test"));
    assert_eq!(err.path(), "defs/a/properties/t");
}

// ---------------------------------------------------------------------------
// Record data

#[test]
fn interop_record_data_valid() {
    let catalog = interop_catalog();
    let cases = cases(&shared("interop/lexicon/record-data-valid.json"));
    let mut failures = Vec::new();
    for case in &cases {
        let data = &case["data"];
        let collection = data["$type"].as_str().unwrap();
        let rkey = case["rkey"].as_str().unwrap();
        match validate_record(&catalog, collection, rkey, data) {
            Ok(Validation::Valid) => {}
            other => failures.push(format!("{}: {other:?}", case["name"])),
        }
    }
    report("record-data-valid.json", cases.len(), &failures);
    assert_eq!(cases.len(), 3);
}

#[test]
fn interop_record_data_invalid() {
    let catalog = interop_catalog();
    let cases = cases(&shared("interop/lexicon/record-data-invalid.json"));
    let mut failures = Vec::new();
    for case in &cases {
        let data = &case["data"];
        let collection = data["$type"].as_str().unwrap();
        let rkey = case["rkey"].as_str().unwrap();
        match validate_record(&catalog, collection, rkey, data) {
            Err(e) if !e.is_schema_problem() => eprintln!("  {}: {e}", case["name"]),
            other => failures.push(format!("{}: {other:?}", case["name"])),
        }
    }
    report("record-data-invalid.json", cases.len(), &failures);
    assert_eq!(cases.len(), 50);
}

/// Some invalid cases also lack the required `integer`, so they would fail
/// even if the rule they are about were not checked. With `integer` added
/// they must still fail, and not for a missing property.
#[test]
fn interop_record_data_invalid_for_the_right_reason() {
    let catalog = interop_catalog();
    let cases = cases(&shared("interop/lexicon/record-data-invalid.json"));
    let mut failures = Vec::new();
    let mut count = 0;
    for case in &cases {
        let mut data = case["data"].clone();
        if data.get("integer").is_some() {
            continue;
        }
        count += 1;
        data["integer"] = json!(1);
        let collection = data["$type"].as_str().unwrap().to_owned();
        match validate_record(&catalog, &collection, "demo", &data) {
            Err(e) if !matches!(e.problem(), Problem::MissingProperty(_)) => {
                eprintln!("  {}: {e}", case["name"]);
            }
            Ok(_) if case["name"] == "missing required field" => {}
            other => failures.push(format!("{}: {other:?}", case["name"])),
        }
    }
    report("record-data-invalid.json with integer added", count, &failures);
}

#[test]
fn record_keys() {
    let catalog = interop_catalog();
    let record = json!({"$type": "example.lexicon.record", "integer": 1});
    assert_eq!(validate_record(&catalog, "example.lexicon.record", "demo", &record), Ok(Validation::Valid));
    let err = validate_record(&catalog, "example.lexicon.record", "other", &record).unwrap_err();
    assert_eq!(
        err.to_string(),
        "record key \"other\" is not valid for example.lexicon.record, whose key type is literal:demo"
    );

    let catalog = official();
    let like = json!({
        "$type": "app.bsky.feed.like",
        "subject": {"uri": "at://did:plc:abc/app.bsky.feed.post/3k2la7ez2kb2a", "cid": CID},
        "createdAt": "2024-01-01T00:00:00.000Z",
    });
    assert!(validate_record(&catalog, "app.bsky.feed.like", "3k2la7ez2kb2a", &like).is_ok());
    assert!(validate_record(&catalog, "app.bsky.feed.like", "self", &like).is_err());
    assert!(validate_record(&catalog, "app.bsky.feed.like", "..", &like).is_err());
    let profile = json!({"$type": "app.bsky.actor.profile"});
    assert!(validate_record(&catalog, "app.bsky.actor.profile", "self", &profile).is_ok());
    assert!(validate_record(&catalog, "app.bsky.actor.profile", "3k2la7ez2kb2a", &profile).is_err());
    let schema = json!({"$type": "com.atproto.lexicon.schema", "lexicon": 1});
    assert!(validate_record(&catalog, "com.atproto.lexicon.schema", "com.example.thing", &schema).is_ok());
    assert!(validate_record(&catalog, "com.atproto.lexicon.schema", "3k2la7ez2kb2a", &schema).is_err());
}

#[test]
fn unknown_collections_and_non_records() {
    let catalog = official();
    let record = json!({"$type": "com.example.nothing", "x": 1});
    assert_eq!(validate_record(&catalog, "com.example.nothing", "abc", &record), Ok(Validation::Unknown));
    let err =
        validate_record(&catalog, "app.bsky.actor.defs", "abc", &json!({"$type": "app.bsky.actor.defs"}))
            .unwrap_err();
    assert_eq!(err.to_string(), "app.bsky.actor.defs is not a record type");
}

const CID: &str = "bafyreiclp443lavogvhj3d2ob2cxbfuscni2k5jk7bebjzg7khl3esabwq";
const BLOB_CID: &str = "bafkreibme22gw2h7y2h7tg2fhqotaqjucnbc24deqo72b6mkl2egezxhvy";
const TID: &str = "3k2la7ez2kb2a";
const POST_URI: &str = "at://did:plc:ewvi7nxzyoun6zhxrhs64oiz/app.bsky.feed.post/3k2la7ez2kb2a";

fn blob(mime: &str, size: u64) -> Value {
    json!({"$type": "blob", "ref": {"$link": BLOB_CID}, "mimeType": mime, "size": size})
}

/// Realistic records of the common Bluesky collections: `(collection, rkey,
/// record)`, all valid.
fn realistic_records() -> Vec<(&'static str, &'static str, Value)> {
    let strong = json!({"uri": POST_URI, "cid": CID});
    vec![
        (
            "app.bsky.feed.post",
            TID,
            json!({
                "$type": "app.bsky.feed.post",
                "text": "hello @alice.bsky.social, see https://example.com ✨",
                "createdAt": "2024-11-05T12:34:56.789Z",
                "langs": ["en", "pt-BR"],
                "facets": [
                    {
                        "index": {"byteStart": 6, "byteEnd": 24},
                        "features": [{"$type": "app.bsky.richtext.facet#mention", "did": "did:plc:ewvi7nxzyoun6zhxrhs64oiz"}]
                    },
                    {
                        "index": {"byteStart": 30, "byteEnd": 49},
                        "features": [{"$type": "app.bsky.richtext.facet#link", "uri": "https://example.com"}]
                    },
                    {
                        "index": {"byteStart": 0, "byteEnd": 5},
                        "features": [{"$type": "app.bsky.richtext.facet#tag", "tag": "hello"}]
                    }
                ],
                "reply": {"root": strong, "parent": strong},
                "embed": {
                    "$type": "app.bsky.embed.images",
                    "images": [
                        {"image": blob("image/jpeg", 123_456), "alt": "a cat", "aspectRatio": {"width": 4, "height": 3}},
                        {"image": blob("image/png", 99), "alt": ""}
                    ]
                },
                "labels": {"$type": "com.atproto.label.defs#selfLabels", "values": [{"val": "nudity"}]},
                "tags": ["cats"],
            }),
        ),
        (
            "app.bsky.actor.profile",
            "self",
            json!({
                "$type": "app.bsky.actor.profile",
                "displayName": "Alice",
                "description": "hi 👋",
                "avatar": blob("image/png", 4_000),
                "banner": blob("image/jpeg", 400_000),
                "pinnedPost": strong,
                "createdAt": "2024-01-01T00:00:00Z",
            }),
        ),
        (
            "app.bsky.feed.like",
            TID,
            json!({
                "$type": "app.bsky.feed.like",
                "subject": strong,
                "createdAt": "2024-01-01T00:00:00.000Z",
            }),
        ),
        (
            "app.bsky.graph.follow",
            TID,
            json!({
                "$type": "app.bsky.graph.follow",
                "subject": "did:plc:ewvi7nxzyoun6zhxrhs64oiz",
                "createdAt": "2024-01-01T00:00:00.000Z",
            }),
        ),
        (
            "app.bsky.feed.repost",
            TID,
            json!({
                "$type": "app.bsky.feed.repost",
                "subject": strong,
                "createdAt": "2024-01-01T00:00:00.000+02:00",
            }),
        ),
        (
            "app.bsky.graph.list",
            TID,
            json!({
                "$type": "app.bsky.graph.list",
                "purpose": "app.bsky.graph.defs#curatelist",
                "name": "Cat people",
                "description": "people who post cats",
                "descriptionFacets": [],
                "avatar": blob("image/jpeg", 1_000),
                "createdAt": "2024-01-01T00:00:00.000Z",
            }),
        ),
        (
            "app.bsky.feed.threadgate",
            TID,
            json!({
                "$type": "app.bsky.feed.threadgate",
                "post": POST_URI,
                "allow": [
                    {"$type": "app.bsky.feed.threadgate#mentionRule"},
                    {"$type": "app.bsky.feed.threadgate#listRule", "list": "at://did:plc:ewvi7nxzyoun6zhxrhs64oiz/app.bsky.graph.list/3k2la7ez2kb2a"}
                ],
                "hiddenReplies": [],
                "createdAt": "2024-01-01T00:00:00.000Z",
            }),
        ),
        (
            "app.bsky.feed.post",
            TID,
            json!({
                "$type": "app.bsky.feed.post",
                "text": "",
                "createdAt": "2024-11-05T12:34:56.789Z",
                "embed": {
                    "$type": "app.bsky.embed.recordWithMedia",
                    "record": {"$type": "app.bsky.embed.record", "record": strong},
                    "media": {"$type": "app.bsky.embed.external", "external": {
                        "uri": "https://example.com/a", "title": "A", "description": "", "thumb": blob("image/webp", 10)
                    }}
                },
            }),
        ),
    ]
}

/// Invalid variants of the realistic records, with the message expected.
fn broken_records() -> Vec<(&'static str, &'static str, Value, &'static str)> {
    let records = realistic_records();
    let post = records[0].2.clone();
    let with = |mut v: Value, pointer: &str, new: Value| {
        *v.pointer_mut(pointer).unwrap() = new;
        v
    };
    let without = |mut v: Value, key: &str| {
        v.as_object_mut().unwrap().remove(key);
        v
    };
    let graphemes_301 = "é".repeat(301);
    vec![
        (
            "app.bsky.feed.post",
            TID,
            with(post.clone(), "/embed/images/0/alt", json!(5)),
            "Record/embed/images/0/alt must be a string",
        ),
        (
            "app.bsky.feed.post",
            TID,
            with(post.clone(), "/text", json!(graphemes_301)),
            "Record/text must not be longer than 300 graphemes",
        ),
        (
            "app.bsky.feed.post",
            TID,
            without(post.clone(), "createdAt"),
            "Record must have the property \"createdAt\"",
        ),
        (
            "app.bsky.feed.post",
            TID,
            with(post.clone(), "/text", json!("a".repeat(3001))),
            "Record/text must not be longer than 3000 characters",
        ),
        (
            "app.bsky.feed.post",
            TID,
            with(post.clone(), "/createdAt", json!("yesterday")),
            "Record/createdAt must be a valid datetime",
        ),
        (
            "app.bsky.feed.post",
            TID,
            with(post.clone(), "/langs", json!(["en", "fr", "de", "es"])),
            "Record/langs must not have more than 3 elements",
        ),
        (
            "app.bsky.feed.post",
            TID,
            with(post.clone(), "/facets/1/features/0/uri", json!("not a uri")),
            "Record/facets/1/features/0/uri must be a valid uri",
        ),
        (
            "app.bsky.feed.post",
            TID,
            with(post.clone(), "/facets/0/features/0", json!({"did": "did:plc:x"})),
            "Record/facets/0/features/0 must be an object which includes the \"$type\" property",
        ),
        (
            "app.bsky.feed.post",
            TID,
            with(post.clone(), "/embed/images/0/image", blob("text/plain", 10)),
            "Record/embed/images/0/image mimeType \"text/plain\" is not accepted (accepted: image/*)",
        ),
        (
            "app.bsky.feed.post",
            TID,
            with(post.clone(), "/embed/images/1/image", blob("image/png", 3_000_000)),
            "Record/embed/images/1/image must not be larger than 2000000 bytes",
        ),
        (
            "app.bsky.feed.post",
            TID,
            with(post.clone(), "/reply/parent", json!({"uri": POST_URI})),
            "Record/reply/parent must have the property \"cid\"",
        ),
        (
            "app.bsky.feed.post",
            TID,
            with(post.clone(), "/$type", json!("app.bsky.feed.like")),
            "Record/$type must be app.bsky.feed.post",
        ),
        (
            "app.bsky.feed.post",
            TID,
            with(post.clone(), "/embed/images", json!([{}, {}, {}, {}, {}])),
            "Record/embed/images must not have more than 4 elements",
        ),
        (
            "app.bsky.feed.post",
            TID,
            with(post.clone(), "/embed/$type", json!("app.bsky.embed.images#main")),
            "Record/embed $type must not end in #main: use the bare NSID",
        ),
        (
            "app.bsky.actor.profile",
            "self",
            with(records[1].2.clone(), "/avatar", blob("image/gif", 10)),
            "Record/avatar mimeType \"image/gif\" is not accepted (accepted: image/png, image/jpeg)",
        ),
        (
            "app.bsky.feed.post",
            TID,
            with(post.clone(), "/reply/root/uri", json!("https://example.com")),
            "Record/reply/root/uri must be a valid at-uri",
        ),
        (
            "app.bsky.feed.post",
            TID,
            with(post.clone(), "/facets/0/index/byteStart", json!(-1)),
            "Record/facets/0/index/byteStart can not be less than 0",
        ),
        (
            "app.bsky.actor.profile",
            "self",
            with(records[1].2.clone(), "/avatar", json!({"cid": BLOB_CID, "mimeType": "image/png"})),
            "Record/avatar must be a blob ref",
        ),
        (
            "app.bsky.actor.profile",
            "self",
            with(records[1].2.clone(), "/displayName", json!("x".repeat(65))),
            "Record/displayName must not be longer than 64 graphemes",
        ),
        (
            "app.bsky.feed.like",
            TID,
            with(records[2].2.clone(), "/subject/cid", json!("nope")),
            "Record/subject/cid must be a valid cid",
        ),
        (
            "app.bsky.graph.follow",
            TID,
            with(records[3].2.clone(), "/subject", json!("alice.bsky.social")),
            "Record/subject must be a valid did",
        ),
        (
            "app.bsky.feed.repost",
            TID,
            with(records[4].2.clone(), "/subject", json!(POST_URI)),
            "Record/subject must be an object",
        ),
        (
            "app.bsky.graph.list",
            TID,
            with(records[5].2.clone(), "/name", json!("")),
            "Record/name must not be shorter than 1 characters",
        ),
        (
            "app.bsky.feed.threadgate",
            TID,
            with(records[6].2.clone(), "/allow/1", json!({"$type": "app.bsky.feed.threadgate#listRule"})),
            "Record/allow/1 must have the property \"list\"",
        ),
        (
            "app.bsky.feed.threadgate",
            TID,
            with(records[6].2.clone(), "/allow", json!([{}, {}, {}, {}, {}, {}])),
            "Record/allow must not have more than 5 elements",
        ),
    ]
}

fn check_realistic(catalog: &Catalog, label: &str) -> usize {
    let mut failures = Vec::new();
    let records = realistic_records();
    for (collection, rkey, record) in &records {
        match validate_record(catalog, collection, rkey, record) {
            Ok(Validation::Valid) => {}
            other => failures.push(format!("{label}: valid {collection}: {other:?}")),
        }
    }
    let broken = broken_records();
    for (collection, rkey, record, want) in &broken {
        match validate_record(catalog, collection, rkey, record) {
            Err(e) if want.is_empty() || e.to_string() == *want => {}
            other => failures.push(format!("{label}: {collection}, want {want:?}, got {other:?}")),
        }
    }
    report(label, records.len() + broken.len(), &failures);
    records.len() + broken.len()
}

#[test]
fn realistic_records_against_official_lexicons() {
    check_realistic(&official(), "official lexicons");
}

#[test]
fn deep_nesting_and_refs_to_records() {
    let mut catalog = Catalog::new();
    catalog
        .add_document(&json!({"lexicon": 1, "id": "com.example.tree", "defs": {
            "main": {"type": "record", "key": "any", "record": {"type": "object", "properties": {
                "node": {"type": "ref", "ref": "#node"},
                "embedded": {"type": "ref", "ref": "com.example.leaf"}}}},
            "node": {"type": "object", "properties": {"child": {"type": "ref", "ref": "#node"}}}
        }}))
        .unwrap();
    catalog
        .add_document(&json!({"lexicon": 1, "id": "com.example.leaf", "defs": {
            "main": {"type": "record", "key": "any", "record": {"type": "object", "required": ["n"],
                "properties": {"n": {"type": "integer"}}}}
        }}))
        .unwrap();
    let nested = |depth: usize| {
        let mut node = json!({});
        for _ in 0..depth {
            node = json!({"child": node});
        }
        json!({"$type": "com.example.tree", "node": node})
    };
    assert!(validate_record(&catalog, "com.example.tree", "k", &nested(100)).is_ok());
    let err = validate_record(&catalog, "com.example.tree", "k", &nested(200)).unwrap_err();
    assert_eq!(err.problem(), &Problem::TooDeep);

    let record = |embedded: Value| json!({"$type": "com.example.tree", "embedded": embedded});
    let ok = record(json!({"$type": "com.example.leaf", "n": 1}));
    assert!(validate_record(&catalog, "com.example.tree", "k", &ok).is_ok());
    let err = validate_record(&catalog, "com.example.tree", "k", &record(json!({"n": 1}))).unwrap_err();
    assert_eq!(err.to_string(), "Record/embedded/$type must be com.example.leaf");
    let err =
        validate_record(&catalog, "com.example.tree", "k", &record(json!({"$type": "com.example.leaf"})))
            .unwrap_err();
    assert_eq!(err.to_string(), "Record/embedded must have the property \"n\"");

    // A ref whose document is missing is the catalog's fault, not the data's.
    let mut partial = Catalog::new();
    partial.insert(catalog.get("com.example.tree").unwrap().clone());
    let err = validate_record(&partial, "com.example.tree", "k", &ok).unwrap_err();
    assert!(err.is_schema_problem(), "{err}");
    assert_eq!(
        partial.missing_documents(&crate::atp::syntax::Nsid::new("com.example.tree").unwrap()),
        [crate::atp::syntax::Nsid::new("com.example.leaf").unwrap()].into()
    );
}

// ---------------------------------------------------------------------------
// The codegen lexicons, as record schemas

fn codegen() -> Catalog {
    let mut catalog = Catalog::new();
    load_dir(&mut catalog, &shared("atproto-fixtures/packages/lex/lex/lexicons/com/example"));
    catalog
}

#[test]
fn codegen_record_values() {
    let catalog = codegen();
    let object =
        json!({"object": {"boolean": true}, "array": ["a"], "boolean": false, "integer": 1, "string": "s"});
    let cases: Vec<(&str, &str, Value, Option<&str>)> = vec![
        (
            "com.example.kitchenSink",
            TID,
            json!({
                "object": object, "array": [], "boolean": true, "integer": -3, "string": "",
                "bytes": {"$bytes": "aGVsbG8"}, "cidLink": {"$link": CID}
            }),
            None,
        ),
        (
            "com.example.kitchenSink",
            TID,
            json!({
                "object": {"object": {}, "array": [], "boolean": true, "integer": 1, "string": ""},
                "array": [], "boolean": true, "integer": 1, "string": "",
                "bytes": {"$bytes": ""}, "cidLink": {"$link": CID}
            }),
            Some("Record/object/object must have the property \"boolean\""),
        ),
        (
            "com.example.kitchenSink",
            TID,
            json!({
                "object": object, "array": [1], "boolean": true, "integer": 1, "string": "",
                "bytes": {"$bytes": ""}, "cidLink": {"$link": CID}
            }),
            Some("Record/array/0 must be a string"),
        ),
        (
            "com.example.kitchenSink",
            TID,
            json!({
                "object": object, "array": [], "boolean": true, "integer": 1, "string": "",
                "bytes": {"$bytes": ""}, "cidLink": CID
            }),
            Some("Record/cidLink must be a CID link"),
        ),
        ("com.example.kitchenSink", "not-a-tid", json!({}), Some("")),
        (
            "com.example.union",
            TID,
            json!({
                "unionOpen": {"$type": "com.example.other#thing", "anything": 1},
                "unionClosed": {"$type": "com.example.kitchenSink#subobject", "boolean": true}
            }),
            None,
        ),
        (
            "com.example.union",
            TID,
            json!({
                "unionOpen": {"$type": "com.example.kitchenSink#subobject", "boolean": 1},
                "unionClosed": {"$type": "com.example.kitchenSink#subobject", "boolean": true}
            }),
            Some("Record/unionOpen/boolean must be a boolean"),
        ),
        (
            "com.example.union",
            TID,
            json!({
                "unionOpen": {"$type": "com.example.kitchenSink#subobject", "boolean": true},
                "unionClosed": {"$type": "com.example.other#thing"}
            }),
            Some(
                "Record/unionClosed $type must be one of com.example.kitchenSink#object, com.example.kitchenSink#subobject",
            ),
        ),
        (
            "com.example.union",
            TID,
            json!({
                "unionOpen": {"$type": "com.example.kitchenSink#main", "boolean": true},
                "unionClosed": {"$type": "com.example.kitchenSink#subobject", "boolean": true}
            }),
            Some("Record/unionOpen $type must not end in #main: use the bare NSID"),
        ),
        ("com.example.unknown", TID, json!({"unknown": {"anything": [1, 2]}}), None),
        ("com.example.unknown", TID, json!({"unknown": "text"}), Some("Record/unknown must be an object")),
        (
            "com.example.unknown",
            TID,
            json!({"unknown": {"$link": CID}}),
            Some("Record/unknown must be a plain object, not a blob, CID link or bytes"),
        ),
        ("com.example.stringKnownValues", TID, json!({"myKey": "something else"}), None),
        ("com.example.stringEnum", TID, json!({"string": "c"}), Some("")),
        ("com.example.stringConst", TID, json!({"string": "b"}), Some("")),
        ("com.example.integerRange", TID, json!({"integer": 1.5}), Some("")),
        ("com.example.boolConst", TID, json!({"boolean": true}), Some("Record/boolean must be false")),
        ("com.example.integerConst", TID, json!({"integer": 0}), None),
        ("com.example.integerConst", TID, json!({"integer": 1}), Some("Record/integer must be 0")),
        ("com.example.byteLength", TID, json!({"bytes": {"$bytes": "YWI"}}), None),
        (
            "com.example.byteLength",
            TID,
            json!({"bytes": {"$bytes": "YWJjZGU"}}),
            Some("Record/bytes must not be larger than 4 bytes"),
        ),
        (
            "com.example.stringLengthNoMinLength",
            TID,
            json!({"string": "ééé"}),
            Some("Record/string must not be longer than 4 characters"),
        ),
        ("com.example.optional", TID, json!({}), None),
        ("com.example.default", TID, json!({"boolean": true}), None),
        ("com.example.default", TID, json!({}), Some("Record must have the property \"boolean\"")),
        (
            "com.example.default",
            TID,
            json!({"boolean": true, "object": null}),
            Some("Record/object must be an object"),
        ),
    ];
    let mut failures = Vec::new();
    for (collection, rkey, mut record, want) in cases.iter().cloned() {
        record["$type"] = json!(collection);
        let got = validate_record(&catalog, collection, rkey, &record);
        let ok = match (&got, want) {
            (Ok(Validation::Valid), None) => true,
            (Err(e), Some(want)) => want.is_empty() || e.to_string() == want,
            _ => false,
        };
        if !ok {
            failures.push(format!("{collection} {record}: want {want:?}, got {got:?}"));
        }
    }
    // Every record-type document gets at least one case.
    let typed: Vec<_> = catalog.docs().filter(|d| d.record().is_some()).map(|d| d.id().to_string()).collect();
    assert!(typed.len() >= 20, "{typed:?}");
    report("codegen record values", cases.len(), &failures);
}

/// Each codegen record schema, with a hand-written valid value and a value
/// that breaks it (one per schema, targeting its feature).
#[test]
fn codegen_record_schema_per_feature() {
    let catalog = codegen();
    let cases: Vec<(&str, Value, Value)> = vec![
        ("arrayLength", json!({"array": [1, 2]}), json!({"array": []})),
        ("atIdentifier", json!({"atIdentifier": "alice.test"}), json!({"atIdentifier": "@alice"})),
        ("atUri", json!({"atUri": POST_URI}), json!({"atUri": "https://x.test"})),
        ("boolConst", json!({"boolean": false}), json!({"boolean": true})),
        ("byteLength", json!({"bytes": {"$bytes": "YWJj"}}), json!({"bytes": {"$bytes": "YQ"}})),
        ("cid", json!({"cid": CID}), json!({"cid": "Qmfoo"})),
        ("datetime", json!({"datetime": "2024-01-01T00:00:00Z"}), json!({"datetime": "2024-01-01"})),
        ("default", json!({"boolean": false}), json!({"boolean": "false"})),
        ("did", json!({"did": "did:web:example.com"}), json!({"did": "did:WEB:x"})),
        ("handle", json!({"handle": "alice.test"}), json!({"handle": "alice"})),
        ("integerConst", json!({"integer": 0}), json!({"integer": -1})),
        ("integerEnum", json!({"integer": 1}), json!({"integer": 4})),
        ("integerRange", json!({"integer": 2}), json!({"integer": 100})),
        (
            "kitchenSink",
            json!({"object": {"object": {"boolean": true}, "array": [], "boolean": true, "integer": 0, "string": ""},
            "array": [], "boolean": true, "integer": 0, "string": "", "bytes": {"$bytes": ""}, "cidLink": {"$link": CID}}),
            json!({"object": {}, "array": [], "boolean": true, "integer": 0, "string": "", "bytes": {"$bytes": ""}, "cidLink": {"$link": CID}}),
        ),
        ("language", json!({"language": "en-GB"}), json!({"language": "english"})),
        ("nsid", json!({"nsid": "com.example.thing"}), json!({"nsid": "thing"})),
        ("optional", json!({"integer": 1}), json!({"integer": "1"})),
        ("stringConst", json!({"string": "a"}), json!({"string": "b"})),
        ("stringEnum", json!({"string": "a"}), json!({"string": "z"})),
        ("stringKnownValues", json!({"myKey": "other"}), json!({"myKey": 1})),
        ("stringLength", json!({"string": "abc"}), json!({"string": ""})),
        ("stringLengthGrapheme", json!({"string": "👨‍👩‍👧‍👦👨‍👩‍👧‍👦"}), json!({"string": "a"})),
        ("stringLengthNoMinLength", json!({"string": ""}), json!({"string": "abcde"})),
        (
            "union",
            json!({"unionOpen": {"$type": "x.y.z"}, "unionClosed": {"$type": "com.example.kitchenSink#subobject", "boolean": true}}),
            json!({"unionOpen": {"$type": "x.y.z"}, "unionClosed": {"$type": "x.y.z"}}),
        ),
        ("unknown", json!({"unknown": {}}), json!({"unknown": []})),
        ("uri", json!({"uri": "https://example.com"}), json!({"uri": "example.com"})),
    ];
    let mut failures = Vec::new();
    let mut covered = std::collections::BTreeSet::new();
    for (name, valid, invalid) in &cases {
        let collection = format!("com.example.{name}");
        let doc = catalog.get(&collection).unwrap_or_else(|| panic!("{collection} missing"));
        let rkey = match doc.record().map(|r| &r.key) {
            Some(RecordKeyType::Tid) => TID,
            Some(_) => "abc",
            None => panic!("{collection} is not a record"),
        };
        covered.insert(collection.clone());
        for (value, want_ok) in [(valid, true), (invalid, false)] {
            let mut value = value.clone();
            value["$type"] = json!(collection);
            let got = validate_record(&catalog, &collection, rkey, &value);
            if matches!(got, Ok(Validation::Valid)) != want_ok {
                failures.push(format!("{collection} {value}: {got:?}"));
            }
        }
    }
    let records: std::collections::BTreeSet<_> =
        catalog.docs().filter(|d| d.record().is_some()).map(|d| d.id().to_string()).collect();
    assert_eq!(covered, records, "every codegen record schema has a case");
    report("codegen record schemas", cases.len() * 2, &failures);
}

// ---------------------------------------------------------------------------
// The offline set, loaded the way `bundled` will load it (JSON text)

#[test]
fn offline_namespaces_load_from_json_text_and_are_closed() {
    let mut texts = Vec::new();
    let mut records = Vec::new();
    for path in json_files(&shared("lexicons")) {
        let text = std::fs::read_to_string(&path).unwrap();
        let id = read_json(&path)["id"].as_str().unwrap().to_owned();
        if Catalog::is_offline_namespace(&id) {
            texts.push(text);
        }
    }
    let catalog = Catalog::from_json_sources(texts.iter().map(String::as_str)).unwrap();
    for doc in catalog.docs() {
        if doc.record().is_some() {
            records.push(doc.id().to_string());
        }
    }
    // Nothing in the offline set may need tools.ozone or third-party docs.
    let dangling = catalog.dangling_refs();
    assert!(dangling.is_empty(), "dangling refs: {dangling:#?}");
    assert!(records.contains(&"app.bsky.feed.post".to_owned()), "{records:?}");
    report("offline-namespace documents", texts.len(), &[]);
    check_realistic(&catalog, "offline namespaces only");
    assert!(Catalog::from_json_sources(["{"]).is_err());
}

// ---------------------------------------------------------------------------
// Resolution

mod resolution {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Context, Poll, Waker};
    use std::time::{Duration, Instant};

    use super::*;
    use crate::atp::syntax::{AtUri, Nsid};
    use crate::lexicon::resolve::*;

    /// Polls a future that never waits (the fake fetcher is synchronous).
    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        let mut f = std::pin::pin!(f);
        match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(out) => out,
            Poll::Pending => panic!("the fake fetcher never blocks"),
        }
    }

    #[derive(Default)]
    struct Fake {
        txt: HashMap<String, Vec<String>>,
        records: HashMap<String, Value>,
        fetches: AtomicUsize,
    }

    impl LexiconFetcher for Fake {
        async fn txt_records(&self, name: &str) -> Result<Vec<String>, String> {
            Ok(self.txt.get(name).cloned().unwrap_or_default())
        }
        async fn fetch_record(&self, uri: &AtUri) -> Result<Value, String> {
            self.fetches.fetch_add(1, Ordering::SeqCst);
            self.records.get(uri.as_str()).cloned().ok_or_else(|| "404".to_owned())
        }
    }

    const DID: &str = "did:plc:ewvi7nxzyoun6zhxrhs64oiz";

    fn fake() -> Fake {
        let mut fake = Fake::default();
        fake.txt.insert("_lexicon.recipes.example.com".into(), vec!["v=spf1".into(), format!("did={DID}")]);
        let recipe = json!({
            "$type": "com.atproto.lexicon.schema", "lexicon": 1, "id": "com.example.recipes.recipe",
            "defs": {"main": {"type": "record", "key": "tid", "record": {"type": "object",
                "required": ["title"], "properties": {
                    "title": {"type": "string", "maxLength": 10},
                    "step": {"type": "ref", "ref": "com.example.recipes.defs#step"}}}}}
        });
        let defs = json!({
            "$type": "com.atproto.lexicon.schema", "lexicon": 1, "id": "com.example.recipes.defs",
            "defs": {"step": {"type": "object", "required": ["text"], "properties": {"text": {"type": "string"}}}}
        });
        for record in [recipe, defs] {
            let id = record["id"].as_str().unwrap();
            fake.records.insert(format!("at://{DID}/com.atproto.lexicon.schema/{id}"), record);
        }
        fake
    }

    #[test]
    fn pure_helpers() {
        let nsid = Nsid::new("edu.university.dept.lab.blogging.getBlogPost").unwrap();
        assert_eq!(txt_name(&nsid), "_lexicon.blogging.lab.dept.university.edu");
        let did = did_from_txt("n", &["x=1", "did=did:plc:abc"]).unwrap();
        assert_eq!(did.as_str(), "did:plc:abc");
        assert!(matches!(did_from_txt::<&str>("n", &[]), Err(ResolveError::NoAuthority(_))));
        assert!(matches!(
            did_from_txt("n", &["did=did:plc:a", "did=did:plc:b"]),
            Err(ResolveError::AmbiguousAuthority(_))
        ));
        assert!(matches!(did_from_txt("n", &["did=nope"]), Err(ResolveError::InvalidDid { .. })));
        assert_eq!(
            schema_uri(&did, &nsid).unwrap().as_str(),
            "at://did:plc:abc/com.atproto.lexicon.schema/edu.university.dept.lab.blogging.getBlogPost"
        );
        let wrong = json!({"$type": "com.atproto.lexicon.schema", "lexicon": 1, "id": "a.b.c", "defs": {"x": {"type": "token"}}});
        assert!(matches!(doc_from_record(&nsid, &wrong), Err(ResolveError::IdMismatch { .. })));
    }

    #[test]
    fn resolves_the_reference_closure_and_caches() {
        let resolver =
            Resolver::new(fake(), LexiconCache::new(Duration::from_secs(3600), Duration::from_secs(60)));
        let nsid = Nsid::new("com.example.recipes.recipe").unwrap();
        let now = Instant::now();
        // The write path awaits this inside a multi-threaded runtime.
        fn assert_send<T: Send>(_: &T) {}
        assert_send(&resolver.resolve(&Catalog::new(), &nsid, now));
        let catalog = block_on(resolver.resolve(&Catalog::new(), &nsid, now)).unwrap();
        assert!(
            catalog.contains("com.example.recipes.recipe") && catalog.contains("com.example.recipes.defs")
        );
        let record = json!({"$type": "com.example.recipes.recipe", "title": "soup", "step": {"text": 1}});
        let err = validate_record(&catalog, "com.example.recipes.recipe", TID, &record).unwrap_err();
        assert_eq!(err.to_string(), "Record/step/text must be a string");

        // A second resolution is served from the cache.
        block_on(resolver.resolve(&Catalog::new(), &nsid, now)).unwrap();
        // ...and so is a failure.
        let unknown = Nsid::new("org.nowhere.thing").unwrap();
        assert!(matches!(
            block_on(resolver.resolve(&Catalog::new(), &unknown, now)),
            Err(ResolveError::NoAuthority(_))
        ));
        let before = resolver_fetches(&resolver);
        assert_eq!(before, 2);
        // Expired entries are fetched again.
        block_on(resolver.resolve(&Catalog::new(), &nsid, now + Duration::from_secs(7200))).unwrap();
        assert_eq!(resolver_fetches(&resolver), 4);
    }

    fn resolver_fetches(resolver: &Resolver<Fake>) -> usize {
        resolver.fetcher().fetches.load(Ordering::SeqCst)
    }
}
