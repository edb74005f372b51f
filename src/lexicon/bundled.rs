//! Where the schemas Roost validates offline come from: the pure half.
//!
//! Roost must validate `com.atproto.*`, `app.bsky.*` and `chat.bsky.*`
//! records with no network, without reading `../shared` at run time and
//! without a copy of the official JSON files in its own tree.
//!
//! # The source: `@atproto/api` from the npm registry, pinned
//!
//! Bluesky's own client package `@atproto/api` (MIT, about 1 MB packed)
//! carries the official lexicon documents as data:
//! `dist/client/lexicons.js` is a generated object literal,
//! `schemaDict`, one entry per document. The only change its code generator
//! makes is to write every reference in absolute form (`lex:nsid#name`);
//! [`normalize_refs`] turns that back into the lexicon language's own
//! spelling, so the documents equal the official files in meaning. Measured
//! against the official set at the same upstream commit (the test
//! `bundle_covers_the_official_lexicons` prints the counts), version
//! 0.20.42 carries 385 of its 402 documents, each identical in meaning:
//! every `com.atproto.*`, `app.bsky.*`, `chat.bsky.*` and `tools.ozone.*`
//! document except the ten `permission-set` documents (`app.bsky.auth*`,
//! `chat.bsky.authFullChatClient`), which the code generator skips. Those
//! matter only to OAuth `include:` scopes, and network resolution covers
//! them. Not carried either: the third-party `site.standard.*` and
//! Bluesky-internal `internal.bsky.*` documents of the upstream directory.
//!
//! Alternatives measured and rejected:
//! - `jacquard-api` (crates.io, MPL-2.0 code): its run-time documents cover
//!   73 of 317 and drop blob `accept`/`maxSize`; the raw JSON its package
//!   also carries lags upstream (of the 402 official documents, 8 missing,
//!   among them the record `app.bsky.actor.contentVisibilityDeclaration`,
//!   and 27 in older versions) and compiling it pulls about 300 crates into the build.
//! - `@atcute/*`, the PyPI `atproto` SDK, the newer `@atproto/pds`: typed
//!   code or a schema DSL, no documents.
//!
//! The package is fetched once, by `roost lexicons install` (or on the
//! first `roost serve`), from a pinned version whose SHA-512 is compiled
//! in, so what runs is exactly what was reviewed; it is then parsed, every
//! document meta-validated, and the set written to one bundle file that
//! later starts load offline. That I/O lives in `crate::lexicon_store`; this
//! module is the pure part: reading `schemaDict` (a strict parser for the
//! object-literal subset the generator emits, never a JavaScript engine)
//! and the bundle's format.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Number, Value};

use super::{Catalog, LexiconError};

/// NSID prefixes Roost must validate without the network.
pub const OFFLINE_NAMESPACES: &[&str] = &["com.atproto.", "app.bsky.", "chat.bsky."];

impl Catalog {
    /// Builds a catalog from lexicon documents in their JSON text form,
    /// e.g. an `include_str!` table.
    ///
    /// # Errors
    /// The first text that is not JSON or not a valid lexicon.
    pub fn from_json_sources<'a>(sources: impl IntoIterator<Item = &'a str>) -> Result<Self, LexiconError> {
        let mut catalog = Self::new();
        for text in sources {
            let json: Value = serde_json::from_str(text)
                .map_err(|e| LexiconError::new(None, "", format!("not JSON: {e}")))?;
            catalog.add_document(&json)?;
        }
        Ok(catalog)
    }

    /// Whether `nsid` belongs to the namespaces Roost validates offline.
    pub fn is_offline_namespace(nsid: &str) -> bool {
        OFFLINE_NAMESPACES.iter().any(|prefix| nsid.starts_with(prefix))
    }
}

/// Where a bundle's documents came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleSource {
    /// The npm package, e.g. `@atproto/api`.
    pub package: String,
    pub version: String,
    /// The package tarball's `sha512-<base64>` integrity string.
    pub integrity: String,
}

/// The installed set of lexicon documents: one JSON file, written whole.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Bundle {
    pub source: BundleSource,
    /// Lexicon documents in their JSON form, in NSID order.
    pub documents: Vec<Value>,
}

impl Bundle {
    /// Reads the documents out of `@atproto/api`'s `dist/client/lexicons.js`
    /// and puts their references back into lexicon spelling. Every document
    /// is meta-validated, so a bundle that builds is one that loads.
    ///
    /// # Errors
    /// The file has no `schemaDict`, it holds something other than plain
    /// data, or a document is not a valid lexicon.
    pub fn from_schema_dict_js(source: BundleSource, js: &str) -> Result<Self, LexiconError> {
        let dict = parse_schema_dict(js)?;
        let Value::Object(entries) = dict else {
            return Err(LexiconError::new(None, "schemaDict", "is not an object"));
        };
        let mut documents: Vec<Value> = entries.into_iter().map(|(_, doc)| normalize_refs(doc)).collect();
        documents.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
        let bundle = Bundle { source, documents };
        bundle.catalog()?;
        Ok(bundle)
    }

    /// The documents as a catalog.
    ///
    /// # Errors
    /// The first document that is not a valid lexicon.
    pub fn catalog(&self) -> Result<Catalog, LexiconError> {
        let mut catalog = Catalog::new();
        for doc in &self.documents {
            catalog.add_document(doc)?;
        }
        Ok(catalog)
    }
}

/// Rewrites the code generator's absolute references (`lex:nsid#name`,
/// `lex:nsid`) into the spelling of the lexicon files: `#name` inside the
/// same document, `nsid#name` or `nsid` elsewhere. Only `ref` of a `ref`
/// and `refs` of a `union` are references; any other string is left alone.
pub fn normalize_refs(doc: Value) -> Value {
    let id = doc.get("id").and_then(Value::as_str).unwrap_or_default().to_owned();
    let spell = |r: &str| -> String {
        let r = r.strip_prefix("lex:").unwrap_or(r);
        match r.split_once('#') {
            Some((nsid, name)) if nsid == id => format!("#{name}"),
            _ => r.to_owned(),
        }
    };
    fn walk(v: Value, spell: &dyn Fn(&str) -> String) -> Value {
        match v {
            Value::Object(map) => {
                let ty = map.get("type").and_then(Value::as_str).map(str::to_owned);
                let out: Map<String, Value> = map
                    .into_iter()
                    .map(|(k, v)| {
                        let v = match (ty.as_deref(), k.as_str(), v) {
                            (Some("ref"), "ref", Value::String(r)) => Value::String(spell(&r)),
                            (Some("union"), "refs", Value::Array(refs)) => Value::Array(
                                refs.into_iter()
                                    .map(|r| match r {
                                        Value::String(r) => Value::String(spell(&r)),
                                        other => other,
                                    })
                                    .collect(),
                            ),
                            (_, _, v) => walk(v, spell),
                        };
                        (k, v)
                    })
                    .collect();
                Value::Object(out)
            }
            Value::Array(items) => Value::Array(items.into_iter().map(|v| walk(v, spell)).collect()),
            other => other,
        }
    }
    walk(doc, &spell)
}

/// Finds `schemaDict` in the generated module (ES or CommonJS output) and
/// parses its value.
///
/// # Errors
/// No `schemaDict` assignment, or a value outside the data subset.
pub fn parse_schema_dict(js: &str) -> Result<Value, LexiconError> {
    let start = ["export const schemaDict = ", "exports.schemaDict = "]
        .iter()
        .find_map(|marker| js.find(marker).map(|at| at + marker.len()))
        .ok_or_else(|| LexiconError::new(None, "schemaDict", "not found in the module"))?;
    let mut parser = Literal { src: js.as_bytes(), pos: start };
    let value = parser.value(0)?;
    parser.skip_space();
    if parser.peek() != Some(b';') {
        return Err(parser.error("expected `;` after the object"));
    }
    Ok(value)
}

/// Nesting deeper than this is refused (lexicons nest a few dozen levels).
const MAX_DEPTH: usize = 128;

/// A parser for the JSON-like subset of JavaScript the lexicon code
/// generator writes: objects with identifier or string keys, arrays,
/// single- or double-quoted strings, integers, `true`, `false`, `null`,
/// trailing commas and comments. Anything else (an expression, a call, a
/// template) is an error: the package is data to this parser, never code.
struct Literal<'a> {
    src: &'a [u8],
    pos: usize,
}

impl Literal<'_> {
    fn error(&self, what: &str) -> LexiconError {
        LexiconError::new(None, "schemaDict", format!("{what} at byte {}", self.pos))
    }

    fn peek(&self) -> Option<u8> {
        self.src.get(self.pos).copied()
    }

    fn skip_space(&mut self) {
        loop {
            match (self.peek(), self.src.get(self.pos + 1)) {
                (Some(b' ' | b'\t' | b'\n' | b'\r'), _) => self.pos += 1,
                (Some(b'/'), Some(b'/')) => {
                    while self.peek().is_some_and(|c| c != b'\n') {
                        self.pos += 1;
                    }
                }
                (Some(b'/'), Some(b'*')) => {
                    let rest = &self.src[self.pos + 2..];
                    match rest.windows(2).position(|w| w == b"*/") {
                        Some(end) => self.pos += 2 + end + 2,
                        None => self.pos = self.src.len(),
                    }
                }
                _ => return,
            }
        }
    }

    fn value(&mut self, depth: usize) -> Result<Value, LexiconError> {
        if depth > MAX_DEPTH {
            return Err(self.error("nested too deeply"));
        }
        self.skip_space();
        match self.peek() {
            Some(b'{') => self.object(depth),
            Some(b'[') => self.array(depth),
            Some(b'\'' | b'"') => Ok(Value::String(self.string()?)),
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(c) if c.is_ascii_alphabetic() => match self.identifier().as_str() {
                "true" => Ok(Value::Bool(true)),
                "false" => Ok(Value::Bool(false)),
                "null" => Ok(Value::Null),
                other => Err(self.error(&format!("unexpected identifier `{other}`"))),
            },
            _ => Err(self.error("expected a value")),
        }
    }

    fn object(&mut self, depth: usize) -> Result<Value, LexiconError> {
        self.pos += 1;
        let mut map = Map::new();
        loop {
            self.skip_space();
            let key = match self.peek() {
                Some(b'}') => {
                    self.pos += 1;
                    return Ok(Value::Object(map));
                }
                Some(b'\'' | b'"') => self.string()?,
                Some(c) if c.is_ascii_alphabetic() || c == b'_' || c == b'$' => self.identifier(),
                _ => return Err(self.error("expected a key")),
            };
            self.skip_space();
            if self.peek() != Some(b':') {
                return Err(self.error("expected `:`"));
            }
            self.pos += 1;
            let value = self.value(depth + 1)?;
            if map.insert(key.clone(), value).is_some() {
                return Err(self.error(&format!("duplicate key `{key}`")));
            }
            self.skip_space();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b'}') => {}
                _ => return Err(self.error("expected `,` or `}`")),
            }
        }
    }

    fn array(&mut self, depth: usize) -> Result<Value, LexiconError> {
        self.pos += 1;
        let mut items = Vec::new();
        loop {
            self.skip_space();
            if self.peek() == Some(b']') {
                self.pos += 1;
                return Ok(Value::Array(items));
            }
            items.push(self.value(depth + 1)?);
            self.skip_space();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b']') => {}
                _ => return Err(self.error("expected `,` or `]`")),
            }
        }
    }

    fn identifier(&mut self) -> String {
        let start = self.pos;
        while self.peek().is_some_and(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'$') {
            self.pos += 1;
        }
        String::from_utf8_lossy(&self.src[start..self.pos]).into_owned()
    }

    fn number(&mut self) -> Result<Value, LexiconError> {
        let start = self.pos;
        if self.peek() == Some(b'-') {
            self.pos += 1;
        }
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.pos += 1;
        }
        // Lexicons hold integers only (the data model has no floats).
        let text = std::str::from_utf8(&self.src[start..self.pos]).unwrap_or_default();
        text.parse::<i64>().map(|n| Value::Number(Number::from(n))).map_err(|_| self.error("bad integer"))
    }

    fn string(&mut self) -> Result<String, LexiconError> {
        let quote = self.src[self.pos];
        self.pos += 1;
        let mut out: Vec<u8> = Vec::new();
        loop {
            let Some(c) = self.peek() else { return Err(self.error("unterminated string")) };
            self.pos += 1;
            match c {
                c if c == quote => break,
                b'\n' => return Err(self.error("newline in a string")),
                b'\\' => {
                    let Some(e) = self.peek() else { return Err(self.error("unterminated escape")) };
                    self.pos += 1;
                    let ch = match e {
                        b'n' => '\n',
                        b't' => '\t',
                        b'r' => '\r',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'v' => '\u{b}',
                        b'0' => '\0',
                        b'u' => self.unicode_escape()?,
                        b'x' => {
                            let hex = self.take_hex(2)?;
                            char::from_u32(hex).ok_or_else(|| self.error("bad \\x escape"))?
                        }
                        b'\'' | b'"' | b'\\' | b'/' => e as char,
                        _ => return Err(self.error("unknown escape")),
                    };
                    let mut buf = [0u8; 4];
                    out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
                }
                c => out.push(c),
            }
        }
        String::from_utf8(out).map_err(|_| self.error("string is not UTF-8"))
    }

    /// `\uXXXX` (with surrogate pairs) or `\u{X…}`.
    fn unicode_escape(&mut self) -> Result<char, LexiconError> {
        if self.peek() == Some(b'{') {
            self.pos += 1;
            let end = self.src[self.pos..]
                .iter()
                .position(|&c| c == b'}')
                .ok_or_else(|| self.error("unterminated \\u{…}"))?;
            let hex = std::str::from_utf8(&self.src[self.pos..self.pos + end]).unwrap_or_default();
            let code = u32::from_str_radix(hex, 16).map_err(|_| self.error("bad \\u{…}"))?;
            self.pos += end + 1;
            return char::from_u32(code).ok_or_else(|| self.error("bad code point"));
        }
        let high = self.take_hex(4)?;
        if (0xD800..0xDC00).contains(&high) {
            if self.src.get(self.pos..self.pos + 2) != Some(b"\\u") {
                return Err(self.error("lone surrogate"));
            }
            self.pos += 2;
            let low = self.take_hex(4)?;
            if !(0xDC00..0xE000).contains(&low) {
                return Err(self.error("bad surrogate pair"));
            }
            let code = 0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00);
            return char::from_u32(code).ok_or_else(|| self.error("bad code point"));
        }
        char::from_u32(high).ok_or_else(|| self.error("lone surrogate"))
    }

    fn take_hex(&mut self, n: usize) -> Result<u32, LexiconError> {
        let digits = self.src.get(self.pos..self.pos + n).ok_or_else(|| self.error("short escape"))?;
        let text = std::str::from_utf8(digits).map_err(|_| self.error("bad escape"))?;
        let v = u32::from_str_radix(text, 16).map_err(|_| self.error("bad escape"))?;
        self.pos += n;
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn the_generated_literal_subset_parses_like_json() {
        let js = r#"/** generated */
import { Lexicons } from '@atproto/lexicon';
export const schemaDict = {
    ComExampleThing: {
        lexicon: 1,
        id: 'com.example.thing',
        defs: {
            main: {
                type: 'record',
                description: "It's a thing \u00e9\uD83D\uDE00 \x41\n",
                key: 'tid',
                record: {
                    type: 'object',
                    required: ['tag'],
                    properties: {
                        tag: { type: 'ref', ref: 'lex:com.example.thing#tag' },
                        other: { type: 'union', refs: ['lex:com.example.other', 'lex:com.example.other#x'] },
                        n: { type: 'integer', minimum: -3, maximum: 10, }, // trailing comma
                        'title:lang': { type: 'unknown' },
                    },
                },
            },
            tag: { type: 'token', description: 'ref: lex:com.example.thing#tag stays text' },
        },
    },
};
export const schemas = Object.values(schemaDict);
"#;
        let dict = parse_schema_dict(js).expect("parses");
        let doc = normalize_refs(dict["ComExampleThing"].clone());
        let props = &doc["defs"]["main"]["record"]["properties"];
        assert_eq!(props["tag"]["ref"], "#tag");
        assert_eq!(props["other"]["refs"], json!(["com.example.other", "com.example.other#x"]));
        assert_eq!(props["n"]["minimum"], -3);
        assert!(props["title:lang"].is_object());
        assert_eq!(doc["defs"]["main"]["description"], "It's a thing é😀 A\n");
        assert_eq!(doc["defs"]["tag"]["description"], "ref: lex:com.example.thing#tag stays text");
    }

    #[test]
    fn anything_but_data_is_refused() {
        for bad in [
            "export const schemaDict = { a: foo() };",
            "export const schemaDict = { a: 1.5 };",
            "export const schemaDict = { a: `template` };",
            "export const schemaDict = { a: 1, a: 2 };",
            "export const schemaDict = { a: 'unterminated };",
            "export const schemaDict = { a: 1 }",
            "const other = {};",
        ] {
            assert!(parse_schema_dict(bad).is_err(), "{bad}");
        }
        let deep = format!("export const schemaDict = {}{};", "[".repeat(500), "]".repeat(500));
        assert!(parse_schema_dict(&deep).is_err(), "depth limit");
    }
}
