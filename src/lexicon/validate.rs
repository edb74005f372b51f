//! Validation of data (records, in their atproto JSON form) against the
//! schemas of a [`Catalog`].
//!
//! Errors carry the path of the offending value in the style of the
//! reference implementation (`Record/embed/images/0/alt must be a string`),
//! because clients already show those messages to people.
//!
//! What this does not check: data-model rules that hold for every value
//! whatever its schema (no floats in unexpected fields, well-formed nested
//! blobs and links inside `unknown`), which `atp::data` enforces when the
//! record is converted to DAG-CBOR. Fields the schema does not mention are
//! ignored, as the spec requires for schema evolution.

use std::fmt;

use serde_json::{Map, Value};
use unicode_segmentation::UnicodeSegmentation;

use crate::atp::syntax::{
    AtIdentifier, AtUri, Datetime, Did, Handle, Language, Nsid, RecordKey, Tid, parse_cid, validate_uri,
};

use super::Catalog;
use super::schema::{
    ArraySchema, BlobSchema, BytesSchema, IntegerSchema, ObjectSchema, RecordKeyType, Ref, Schema,
    StringFormat, StringSchema, UnionSchema,
};

/// How deeply nested (objects and arrays) a value may be. JSON parsing and
/// `atp::data` already bound nesting (at 128 and 100); this is the backstop
/// for values built in code, so validation can never exhaust the stack.
const MAX_DEPTH: usize = 128;

/// The outcome of validating a record that broke no rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validation {
    /// The record matches its collection's lexicon.
    Valid,
    /// The catalog has no lexicon for the collection, so nothing was
    /// checked (the spec's optimistic validation then accepts the record).
    Unknown,
}

/// Why a record does not satisfy its lexicon. `path` names the value,
/// starting at `Record`; it is empty for problems with the record key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ValidationError {
    path: String,
    problem: Problem,
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.problem)
        } else {
            write!(f, "{} {}", self.path, self.problem)
        }
    }
}

impl ValidationError {
    fn new(path: &str, problem: Problem) -> Self {
        Self { path: path.to_owned(), problem }
    }

    /// Where the problem is, e.g. `Record/embed/images/0/alt`.
    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn problem(&self) -> &Problem {
        &self.problem
    }

    /// True when the fault lies with the catalog (a reference to a
    /// definition it lacks, or to one of a kind that cannot be referenced)
    /// rather than with the data. A PDS reports these as "could not
    /// validate", not as the client's error.
    pub fn is_schema_problem(&self) -> bool {
        matches!(self.problem, Problem::UnresolvedRef(_) | Problem::BadRefTarget { .. })
    }
}

/// What is wrong at [`ValidationError::path`]. The `Display` text is the
/// second half of the message, after the path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("must be {0}")]
    WrongType(&'static str),
    #[error("must have the property \"{0}\"")]
    MissingProperty(String),
    #[error("must be {0}")]
    NotConst(String),
    #[error("must be one of ({})", .0.join("|"))]
    NotInEnum(Vec<String>),
    #[error("can not be greater than {0}")]
    TooLarge(i64),
    #[error("can not be less than {0}")]
    TooSmall(i64),
    #[error("must not be longer than {0} characters")]
    StringTooLong(u64),
    #[error("must not be shorter than {0} characters")]
    StringTooShort(u64),
    #[error("must not be longer than {0} graphemes")]
    TooManyGraphemes(u64),
    #[error("must not be shorter than {0} graphemes")]
    TooFewGraphemes(u64),
    #[error("must not be larger than {0} bytes")]
    BytesTooLong(u64),
    #[error("must not be smaller than {0} bytes")]
    BytesTooShort(u64),
    #[error("must not have more than {0} elements")]
    TooManyElements(u64),
    #[error("must not have fewer than {0} elements")]
    TooFewElements(u64),
    #[error("must be a valid {}", .0.as_str())]
    Format(StringFormat),
    #[error("must be an object which includes the \"$type\" property")]
    MissingType,
    #[error("$type must not end in #main: use the bare NSID")]
    MainSuffix,
    #[error("$type must be one of {}", .0.join(", "))]
    NotInUnion(Vec<String>),
    #[error("must be {0}")]
    RecordType(String),
    #[error("mimeType {mime:?} is not accepted (accepted: {})", .accept.join(", "))]
    BlobMimeType { mime: String, accept: Vec<String> },
    #[error("must not be larger than {0} bytes")]
    BlobTooLarge(u64),
    #[error("must be a plain object, not a blob, CID link or bytes")]
    CompoundUnknown,
    #[error("record key {rkey:?} is not valid for {collection}, whose key type is {key}")]
    RecordKey { rkey: String, collection: String, key: String },
    #[error("{0} is not a record type")]
    NotARecordType(String),
    #[error("is nested too deeply")]
    TooDeep,
    #[error("refers to {0}, which is not in the lexicon catalog")]
    UnresolvedRef(String),
    #[error("refers to {target}, a {kind}, which cannot be referenced")]
    BadRefTarget { target: String, kind: &'static str },
}

/// Validates `value` as a record of `collection` stored under `rkey`.
///
/// Returns [`Validation::Unknown`] when the catalog has no lexicon for the
/// collection: deciding whether that is acceptable (optimistic validation)
/// or not (`validate: true`) is the caller's business.
///
/// # Errors
/// The first rule the record key or the record breaks.
pub fn validate_record(
    catalog: &Catalog,
    collection: &str,
    rkey: &str,
    value: &Value,
) -> Result<Validation, ValidationError> {
    let Some(doc) = catalog.get(collection) else {
        return Ok(Validation::Unknown);
    };
    let Some(record) = doc.record() else {
        return Err(ValidationError::new("", Problem::NotARecordType(collection.to_owned())));
    };
    check_record_key(collection, &record.key, rkey)?;

    let mut v = Validator { catalog, path: String::from("Record"), depth: 0 };
    let obj = v.as_object(value)?;
    match obj.get("$type") {
        Some(Value::String(ty)) if ty == collection => {}
        _ => {
            return Err(v.at("$type", |v| v.fail(Problem::RecordType(collection.to_owned()))));
        }
    }
    v.object(doc.id().as_str(), &record.record, obj)?;
    Ok(Validation::Valid)
}

fn check_record_key(collection: &str, key: &RecordKeyType, rkey: &str) -> Result<(), ValidationError> {
    let ok = RecordKey::new(rkey).is_ok()
        && match key {
            RecordKeyType::Any => true,
            RecordKeyType::Tid => Tid::new(rkey).is_ok(),
            RecordKeyType::Nsid => Nsid::new(rkey).is_ok(),
            RecordKeyType::Literal(literal) => literal.as_str() == rkey,
        };
    if ok {
        Ok(())
    } else {
        Err(ValidationError::new(
            "",
            Problem::RecordKey {
                rkey: rkey.to_owned(),
                collection: collection.to_owned(),
                key: key.to_string(),
            },
        ))
    }
}

struct Validator<'c> {
    catalog: &'c Catalog,
    /// The path of the value being checked. Segments are appended and
    /// truncated in place so the happy path allocates nothing per field.
    path: String,
    depth: usize,
}

impl<'c> Validator<'c> {
    fn fail(&self, problem: Problem) -> ValidationError {
        ValidationError::new(&self.path, problem)
    }

    fn at<T>(&mut self, segment: &str, f: impl FnOnce(&mut Self) -> T) -> T {
        let len = self.path.len();
        self.path.push('/');
        self.path.push_str(segment);
        let out = f(self);
        self.path.truncate(len);
        out
    }

    /// Runs `f` one level deeper, failing once [`MAX_DEPTH`] is reached.
    fn nested<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, ValidationError>,
    ) -> Result<T, ValidationError> {
        if self.depth >= MAX_DEPTH {
            return Err(self.fail(Problem::TooDeep));
        }
        self.depth += 1;
        let out = f(self);
        self.depth -= 1;
        out
    }

    /// A JSON object that is a data-model map: `{"$link": ..}` and
    /// `{"$bytes": ..}` are a link and bytes in the JSON encoding, not maps.
    fn as_object<'v>(&self, value: &'v Value) -> Result<&'v Map<String, Value>, ValidationError> {
        match value {
            Value::Object(obj) if !is_link(obj) && !is_bytes(obj) => Ok(obj),
            _ => Err(self.fail(Problem::WrongType("an object"))),
        }
    }

    /// `doc` is the id of the document `schema` belongs to, against which
    /// local `#name` references resolve.
    fn field(&mut self, doc: &'c str, schema: &'c Schema, value: &Value) -> Result<(), ValidationError> {
        match schema {
            Schema::Null(_) => match value {
                Value::Null => Ok(()),
                _ => Err(self.fail(Problem::WrongType("null"))),
            },
            Schema::Boolean(b) => {
                let Value::Bool(got) = value else {
                    return Err(self.fail(Problem::WrongType("a boolean")));
                };
                match b.const_value {
                    Some(want) if want != *got => Err(self.fail(Problem::NotConst(want.to_string()))),
                    _ => Ok(()),
                }
            }
            Schema::Integer(i) => self.integer(i, value),
            Schema::String(s) => self.string(s, value),
            Schema::Bytes(b) => self.bytes(b, value),
            Schema::CidLink(_) => match value {
                Value::Object(obj) if link_cid(obj).is_some() => Ok(()),
                _ => Err(self.fail(Problem::WrongType("a CID link"))),
            },
            Schema::Blob(b) => self.blob(b, value),
            Schema::Array(a) => self.array(doc, a, value),
            Schema::Object(o) => {
                let obj = self.as_object(value)?;
                self.object(doc, o, obj)
            }
            Schema::Ref(r) => self.reference(doc, &r.target, value),
            Schema::Union(u) => self.union(doc, u, value),
            Schema::Unknown(_) => self.unknown(value),
            // Meta-validation keeps these out of field positions; reaching
            // one means a ref pointed at it.
            Schema::Params(_)
            | Schema::Permission(_)
            | Schema::Token(_)
            | Schema::Record(_)
            | Schema::Query(_)
            | Schema::Procedure(_)
            | Schema::Subscription(_)
            | Schema::PermissionSet(_) => {
                Err(self.fail(Problem::BadRefTarget { target: doc.to_owned(), kind: schema.type_name() }))
            }
        }
    }

    fn object(
        &mut self,
        doc: &'c str,
        schema: &'c ObjectSchema,
        obj: &Map<String, Value>,
    ) -> Result<(), ValidationError> {
        self.nested(|v| {
            for name in &schema.required {
                if !obj.contains_key(name) {
                    return Err(v.fail(Problem::MissingProperty(name.clone())));
                }
            }
            for (name, prop) in &schema.properties {
                let Some(value) = obj.get(name) else { continue };
                if value.is_null() && schema.nullable.iter().any(|n| n == name) {
                    continue;
                }
                v.at(name, |v| v.field(doc, prop, value))?;
            }
            Ok(())
        })
    }

    fn integer(&self, schema: &IntegerSchema, value: &Value) -> Result<(), ValidationError> {
        let Some(n) = as_integer(value) else {
            return Err(self.fail(Problem::WrongType("an integer")));
        };
        if let Some(want) = schema.const_value
            && n != want
        {
            return Err(self.fail(Problem::NotConst(want.to_string())));
        }
        if let Some(allowed) = &schema.enum_values
            && !allowed.contains(&n)
        {
            let allowed = allowed.iter().map(i64::to_string).collect();
            return Err(self.fail(Problem::NotInEnum(allowed)));
        }
        if let Some(max) = schema.maximum
            && n > max
        {
            return Err(self.fail(Problem::TooLarge(max)));
        }
        if let Some(min) = schema.minimum
            && n < min
        {
            return Err(self.fail(Problem::TooSmall(min)));
        }
        Ok(())
    }

    fn string(&self, schema: &StringSchema, value: &Value) -> Result<(), ValidationError> {
        let Value::String(s) = value else {
            return Err(self.fail(Problem::WrongType("a string")));
        };
        if let Some(want) = &schema.const_value
            && s != want
        {
            return Err(self.fail(Problem::NotConst(want.clone())));
        }
        if let Some(allowed) = &schema.enum_values
            && !allowed.contains(s)
        {
            return Err(self.fail(Problem::NotInEnum(allowed.clone())));
        }
        let bytes = s.len() as u64;
        if let Some(max) = schema.max_length
            && bytes > max
        {
            return Err(self.fail(Problem::StringTooLong(max)));
        }
        if let Some(min) = schema.min_length
            && bytes < min
        {
            return Err(self.fail(Problem::StringTooShort(min)));
        }
        // A grapheme is at least one byte, so the byte length bounds the
        // count from above and the segmentation can often be skipped.
        let max_graphemes = schema.max_graphemes.filter(|&max| bytes > max);
        if max_graphemes.is_some() || schema.min_graphemes.is_some() {
            let count = s.graphemes(true).count() as u64;
            if let Some(max) = max_graphemes
                && count > max
            {
                return Err(self.fail(Problem::TooManyGraphemes(max)));
            }
            if let Some(min) = schema.min_graphemes
                && count < min
            {
                return Err(self.fail(Problem::TooFewGraphemes(min)));
            }
        }
        match schema.format {
            Some(format) if !format_ok(format, s) => Err(self.fail(Problem::Format(format))),
            _ => Ok(()),
        }
    }

    fn bytes(&self, schema: &BytesSchema, value: &Value) -> Result<(), ValidationError> {
        let len = match value {
            Value::Object(obj) if is_bytes(obj) => {
                obj.get("$bytes").and_then(Value::as_str).and_then(base64_decoded_len)
            }
            _ => None,
        };
        let Some(len) = len else {
            return Err(self.fail(Problem::WrongType("a byte array")));
        };
        if let Some(max) = schema.max_length
            && len > max
        {
            return Err(self.fail(Problem::BytesTooLong(max)));
        }
        if let Some(min) = schema.min_length
            && len < min
        {
            return Err(self.fail(Problem::BytesTooShort(min)));
        }
        Ok(())
    }

    fn blob(&self, schema: &BlobSchema, value: &Value) -> Result<(), ValidationError> {
        let Some(blob) = value.as_object().and_then(as_blob) else {
            return Err(self.fail(Problem::WrongType("a blob ref")));
        };
        if let Some(accept) = &schema.accept
            && !accept.iter().any(|pattern| mime_matches(pattern, blob.mime_type))
        {
            return Err(
                self.fail(Problem::BlobMimeType { mime: blob.mime_type.to_owned(), accept: accept.clone() })
            );
        }
        match schema.max_size {
            Some(max) if blob.size > max => Err(self.fail(Problem::BlobTooLarge(max))),
            _ => Ok(()),
        }
    }

    fn array(&mut self, doc: &'c str, schema: &'c ArraySchema, value: &Value) -> Result<(), ValidationError> {
        let Value::Array(items) = value else {
            return Err(self.fail(Problem::WrongType("an array")));
        };
        let len = items.len() as u64;
        if let Some(max) = schema.max_length
            && len > max
        {
            return Err(self.fail(Problem::TooManyElements(max)));
        }
        if let Some(min) = schema.min_length
            && len < min
        {
            return Err(self.fail(Problem::TooFewElements(min)));
        }
        self.nested(|v| {
            for (i, item) in items.iter().enumerate() {
                v.at(&i.to_string(), |v| v.field(doc, &schema.items, item))?;
            }
            Ok(())
        })
    }

    /// A `ref` field: the data has the shape of the target directly, with
    /// no `$type` needed (except for records, which always carry one).
    ///
    /// Not counted towards [`MAX_DEPTH`]: a ref cannot point at a ref or a
    /// union (those cannot be named), so every step through one consumes a
    /// level of the data, which is what the limit bounds.
    fn reference(&mut self, doc: &'c str, target: &str, value: &Value) -> Result<(), ValidationError> {
        let (target_doc, schema) = self.resolve(doc, target)?;
        match schema {
            Schema::Record(record) => {
                let obj = self.as_object(value)?;
                match obj.get("$type") {
                    Some(Value::String(ty)) if ty == target_doc => {}
                    _ => {
                        return Err(self.at("$type", |v| v.fail(Problem::RecordType(target_doc.to_owned()))));
                    }
                }
                self.object(target_doc, &record.record, obj)
            }
            Schema::Token(_) => {
                Err(self.fail(Problem::BadRefTarget { target: full_ref(doc, target), kind: "token" }))
            }
            _ => self.field(target_doc, schema, value),
        }
    }

    fn union(&mut self, doc: &'c str, schema: &'c UnionSchema, value: &Value) -> Result<(), ValidationError> {
        let ty = match value {
            Value::Object(obj) if !is_link(obj) && !is_bytes(obj) => match obj.get("$type") {
                Some(Value::String(ty)) if !ty.is_empty() => ty,
                _ => return Err(self.fail(Problem::MissingType)),
            },
            _ => return Err(self.fail(Problem::MissingType)),
        };
        // Otherwise an open union could be dodged by spelling a listed
        // variant with the suffix the spec forbids.
        if ty.ends_with("#main") {
            return Err(self.fail(Problem::MainSuffix));
        }
        let matched =
            schema.refs.iter().find(|r| Ref::parse(r).is_some_and(|parsed| parsed.matches_type(doc, ty)));
        match matched {
            Some(target) => self.variant(doc, target, value),
            // An open union may gain variants later; data written against
            // a newer lexicon than ours is accepted as is.
            None if !schema.closed => Ok(()),
            None => {
                Err(self.fail(Problem::NotInUnion(schema.refs.iter().map(|r| full_ref(doc, r)).collect())))
            }
        }
    }

    /// A union variant: its target must be an object or a record.
    fn variant(&mut self, doc: &'c str, target: &str, value: &Value) -> Result<(), ValidationError> {
        let (target_doc, schema) = self.resolve(doc, target)?;
        let object = match schema {
            Schema::Object(object) => object,
            Schema::Record(record) => &record.record,
            other => {
                return Err(self
                    .fail(Problem::BadRefTarget { target: full_ref(doc, target), kind: other.type_name() }));
            }
        };
        let obj = self.as_object(value)?;
        self.object(target_doc, object, obj)
    }

    /// `unknown`: any map, but not one that spells a blob, link or bytes.
    fn unknown(&self, value: &Value) -> Result<(), ValidationError> {
        match value {
            Value::Object(obj) if is_link(obj) || is_bytes(obj) || is_blob_shaped(obj) => {
                Err(self.fail(Problem::CompoundUnknown))
            }
            Value::Object(_) => Ok(()),
            _ => Err(self.fail(Problem::WrongType("an object"))),
        }
    }

    fn resolve(&self, doc: &'c str, target: &str) -> Result<(&'c str, &'c Schema), ValidationError> {
        let found = Ref::parse(target).and_then(|r| {
            let target_doc = self.catalog.get(r.doc(doc))?;
            let schema = target_doc.def(r.name)?;
            Some((target_doc.id().as_str(), schema))
        });
        found.ok_or_else(|| self.fail(Problem::UnresolvedRef(full_ref(doc, target))))
    }
}

/// A reference as a data `$type` would spell it, for messages.
fn full_ref(doc: &str, target: &str) -> String {
    match Ref::parse(target) {
        Some(r) if r.name == "main" => r.doc(doc).to_owned(),
        Some(r) => format!("{}#{}", r.doc(doc), r.name),
        None => target.to_owned(),
    }
}

/// A JSON number that denotes an integer. Integral floats within 2^53 count,
/// as in `atp::data` (JavaScript writes them and cannot tell the difference).
fn as_integer(value: &Value) -> Option<i64> {
    const MAX_SAFE: f64 = 9_007_199_254_740_991.0;
    let n = value.as_number()?;
    n.as_i64().or_else(|| {
        if n.is_u64() {
            return None; // beyond i64: not a data-model integer
        }
        let f = n.as_f64()?;
        (f.fract() == 0.0 && f.abs() <= MAX_SAFE).then_some(f as i64)
    })
}

fn format_ok(format: StringFormat, s: &str) -> bool {
    match format {
        StringFormat::AtIdentifier => AtIdentifier::new(s).is_ok(),
        StringFormat::AtUri => AtUri::new(s).is_ok(),
        StringFormat::Cid => parse_cid(s).is_ok(),
        StringFormat::Datetime => Datetime::new(s).is_ok(),
        StringFormat::Did => Did::new(s).is_ok(),
        StringFormat::Handle => Handle::new(s).is_ok(),
        StringFormat::Language => Language::new(s).is_ok(),
        StringFormat::Nsid => Nsid::new(s).is_ok(),
        StringFormat::RecordKey => RecordKey::new(s).is_ok(),
        StringFormat::Tid => Tid::new(s).is_ok(),
        StringFormat::Uri => validate_uri(s).is_ok(),
    }
}

fn is_link(obj: &Map<String, Value>) -> bool {
    obj.contains_key("$link")
}

fn is_bytes(obj: &Map<String, Value>) -> bool {
    obj.contains_key("$bytes")
}

fn is_blob_shaped(obj: &Map<String, Value>) -> bool {
    obj.get("$type").and_then(Value::as_str) == Some("blob")
}

/// The CID of `{"$link": "<cid>"}` (no other keys), if it parses.
fn link_cid(obj: &Map<String, Value>) -> Option<cid::Cid> {
    if obj.len() != 1 {
        return None;
    }
    parse_cid(obj.get("$link")?.as_str()?).ok()
}

struct Blob<'v> {
    mime_type: &'v str,
    size: u64,
}

/// A blob in the data model's JSON form: `$type: "blob"`, a `ref` link,
/// a non-empty `mimeType` and a `size`. The legacy `{cid, mimeType}` form
/// is refused: it is never valid for new writes. The spec calls `size`
/// positive; 0 is let through because an empty upload is still a blob and
/// `atp::data` treats it as one.
fn as_blob(obj: &Map<String, Value>) -> Option<Blob<'_>> {
    if !is_blob_shaped(obj) {
        return None;
    }
    link_cid(obj.get("ref")?.as_object()?)?;
    let mime_type = obj.get("mimeType")?.as_str().filter(|m| !m.is_empty())?;
    let size = u64::try_from(as_integer(obj.get("size")?)?).ok()?;
    Some(Blob { mime_type, size })
}

/// MIME types compare case-insensitively; `type/*` and `*/*` are globs.
fn mime_matches(pattern: &str, mime: &str) -> bool {
    match pattern.strip_suffix("/*") {
        Some("*") => true,
        Some(prefix) => mime.split_once('/').is_some_and(|(ty, _)| ty.eq_ignore_ascii_case(prefix)),
        None => pattern.eq_ignore_ascii_case(mime),
    }
}

/// The decoded length of standard base64 with optional padding, or `None`
/// if `s` is not base64. Like the reference implementation, this ignores
/// non-zero bits in the last character ("123" is two bytes), so it accepts
/// what a lenient decoder accepts.
fn base64_decoded_len(s: &str) -> Option<u64> {
    let data = s.trim_end_matches('=');
    let padding = s.len() - data.len();
    let valid_chars = data.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/');
    let rem = data.len() % 4;
    // Padding, when present, must complete the last quantum exactly.
    let padding_ok = padding == 0 || (rem != 0 && rem + padding == 4);
    (valid_chars && rem != 1 && padding_ok).then(|| (data.len() as u64 * 3) / 4)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn base64_lengths() {
        assert_eq!(base64_decoded_len(""), Some(0));
        assert_eq!(base64_decoded_len("b25l"), Some(3));
        assert_eq!(base64_decoded_len("123"), Some(2));
        assert_eq!(base64_decoded_len("YQ=="), Some(1));
        assert_eq!(base64_decoded_len("YQ"), Some(1));
        assert_eq!(base64_decoded_len("YWI="), Some(2));
        assert_eq!(base64_decoded_len("Y"), None);
        assert_eq!(base64_decoded_len("YQ="), None);
        assert_eq!(base64_decoded_len("b25l===="), None);
        assert_eq!(base64_decoded_len("a-b_"), None, "URL-safe alphabet is not base64");
        assert_eq!(base64_decoded_len("a b="), None);
    }

    #[test]
    fn mime_globs() {
        assert!(mime_matches("image/*", "image/png"));
        assert!(mime_matches("IMAGE/*", "image/png"));
        assert!(!mime_matches("image/*", "imagex/png"));
        assert!(!mime_matches("image/*", "text/plain"));
        assert!(mime_matches("*/*", "text/plain"));
        assert!(mime_matches("video/mp4", "video/MP4"));
        assert!(!mime_matches("video/mp4", "video/mp4v"));
    }

    #[test]
    fn integers() {
        assert_eq!(as_integer(&serde_json::json!(3)), Some(3));
        assert_eq!(as_integer(&serde_json::json!(3.0)), Some(3));
        assert_eq!(as_integer(&serde_json::json!(3.5)), None);
        assert_eq!(as_integer(&serde_json::json!(u64::MAX)), None);
        assert_eq!(as_integer(&serde_json::json!(1e300)), None);
        assert_eq!(as_integer(&serde_json::json!("3")), None);
    }
}
