//! The lexicon schema language (<https://atproto.com/specs/lexicon>) as Rust
//! types, and the rules a document must follow before Roost will use it
//! ("meta-validation").
//!
//! Parsing is two passes. Serde turns each definition into a [`Schema`]
//! (which catches unknown `type`s and ill-typed fields); then [`check_doc`]
//! walks the result for the rules serde cannot express: which kinds may be
//! named definitions, primary types only as `main`, `params` only under
//! `parameters`, well-formed refs, consistent limits. Unknown fields are
//! ignored everywhere, as the spec asks of schema evolution.

use std::collections::BTreeMap;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer};
use serde_json::Value;

use crate::atp::syntax::{Language, Nsid, RecordKey};

use super::LexiconError;

/// A lexicon document that passed meta-validation.
#[derive(Debug, Clone)]
pub struct LexiconDoc {
    id: Nsid,
    revision: Option<u64>,
    description: Option<String>,
    defs: BTreeMap<String, Schema>,
}

impl LexiconDoc {
    /// Parses and meta-validates a lexicon document in its JSON form.
    ///
    /// # Errors
    /// A [`LexiconError`] naming the first rule the document breaks.
    pub fn from_json(json: &Value) -> Result<Self, LexiconError> {
        let obj =
            json.as_object().ok_or_else(|| LexiconError::new(None, "", "a lexicon must be a JSON object"))?;
        // Checked before anything else so a future lexicon version is
        // reported as such, not as whatever field it changed.
        if obj.get("lexicon").and_then(Value::as_u64) != Some(1) {
            return Err(LexiconError::new(None, "lexicon", "must be the integer 1"));
        }
        let id = obj
            .get("id")
            .and_then(Value::as_str)
            .ok_or_else(|| LexiconError::new(None, "id", "must be a string"))?;
        let id = Nsid::new(id).map_err(|e| LexiconError::new(None, "id", e.to_string()))?;
        let fail = |path: &str, reason: String| LexiconError::new(Some(&id), path, reason);

        let revision = match obj.get("revision") {
            None => None,
            Some(v) => {
                Some(v.as_u64().ok_or_else(|| fail("revision", "must be a non-negative integer".into()))?)
            }
        };
        let description = match obj.get("description") {
            None => None,
            Some(v) => {
                Some(v.as_str().ok_or_else(|| fail("description", "must be a string".into()))?.to_owned())
            }
        };
        let raw_defs = obj
            .get("defs")
            .and_then(Value::as_object)
            .ok_or_else(|| fail("defs", "must be an object".into()))?;
        if raw_defs.is_empty() {
            return Err(fail("defs", "a lexicon needs at least one definition".into()));
        }
        let mut defs = BTreeMap::new();
        for (name, raw) in raw_defs {
            let path = format!("defs/{name}");
            // Where a kind may be named is checked before its fields, so the
            // error names the real problem rather than a field it lacks.
            if let Some(kind) = raw.get("type").and_then(Value::as_str) {
                named_kind_allowed(name, kind).map_err(|reason| fail(&path, reason))?;
            }
            // Parsed one by one so the error can say which definition.
            let schema = Schema::deserialize(raw).map_err(|e| fail(&path, e.to_string()))?;
            defs.insert(name.clone(), schema);
        }
        let doc = Self { id, revision, description, defs };
        check_doc(&doc)?;
        Ok(doc)
    }

    pub fn id(&self) -> &Nsid {
        &self.id
    }

    pub fn revision(&self) -> Option<u64> {
        self.revision
    }

    pub fn description(&self) -> Option<&str> {
        self.description.as_deref()
    }

    pub fn defs(&self) -> &BTreeMap<String, Schema> {
        &self.defs
    }

    pub fn def(&self, name: &str) -> Option<&Schema> {
        self.defs.get(name)
    }

    /// The `main` definition if it is a record type.
    pub fn record(&self) -> Option<&RecordSchema> {
        match self.defs.get("main") {
            Some(Schema::Record(record)) => Some(record),
            _ => None,
        }
    }
}

/// One schema definition or field type. The same type serves named
/// definitions and nested fields; which kinds may appear where is checked
/// by meta-validation, not by the type system, because the JSON form does
/// not separate them either.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Schema {
    Null(PlainSchema),
    Boolean(BooleanSchema),
    Integer(IntegerSchema),
    String(StringSchema),
    Bytes(BytesSchema),
    CidLink(PlainSchema),
    Blob(BlobSchema),
    Array(ArraySchema),
    Object(ObjectSchema),
    Params(ParamsSchema),
    Permission(PermissionSchema),
    Token(PlainSchema),
    Ref(RefSchema),
    Union(UnionSchema),
    Unknown(PlainSchema),
    Record(RecordSchema),
    Query(QuerySchema),
    Procedure(ProcedureSchema),
    Subscription(SubscriptionSchema),
    PermissionSet(PermissionSetSchema),
}

impl Schema {
    /// The `type` string of this schema, for messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::Null(_) => "null",
            Self::Boolean(_) => "boolean",
            Self::Integer(_) => "integer",
            Self::String(_) => "string",
            Self::Bytes(_) => "bytes",
            Self::CidLink(_) => "cid-link",
            Self::Blob(_) => "blob",
            Self::Array(_) => "array",
            Self::Object(_) => "object",
            Self::Params(_) => "params",
            Self::Permission(_) => "permission",
            Self::Token(_) => "token",
            Self::Ref(_) => "ref",
            Self::Union(_) => "union",
            Self::Unknown(_) => "unknown",
            Self::Record(_) => "record",
            Self::Query(_) => "query",
            Self::Procedure(_) => "procedure",
            Self::Subscription(_) => "subscription",
            Self::PermissionSet(_) => "permission-set",
        }
    }

    /// Record and the XRPC and permission-set types, which describe a whole
    /// document and so may only be its `main` definition.
    pub fn is_primary(&self) -> bool {
        matches!(
            self,
            Self::Record(_)
                | Self::Query(_)
                | Self::Procedure(_)
                | Self::Subscription(_)
                | Self::PermissionSet(_)
        )
    }
}

/// A type with no fields of its own (`null`, `cid-link`, `token`, `unknown`).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct PlainSchema {
    pub description: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct BooleanSchema {
    pub description: Option<String>,
    pub default: Option<bool>,
    #[serde(rename = "const")]
    pub const_value: Option<bool>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct IntegerSchema {
    pub description: Option<String>,
    pub minimum: Option<i64>,
    pub maximum: Option<i64>,
    #[serde(rename = "enum")]
    pub enum_values: Option<Vec<i64>>,
    pub default: Option<i64>,
    #[serde(rename = "const")]
    pub const_value: Option<i64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StringSchema {
    pub description: Option<String>,
    pub format: Option<StringFormat>,
    /// In UTF-8 bytes.
    pub max_length: Option<u64>,
    pub min_length: Option<u64>,
    /// In extended grapheme clusters.
    pub max_graphemes: Option<u64>,
    pub min_graphemes: Option<u64>,
    /// Suggestions only: other values are valid.
    pub known_values: Option<Vec<String>>,
    #[serde(rename = "enum")]
    pub enum_values: Option<Vec<String>>,
    pub default: Option<String>,
    #[serde(rename = "const")]
    pub const_value: Option<String>,
}

/// The string formats of the lexicon spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StringFormat {
    AtIdentifier,
    AtUri,
    Cid,
    Datetime,
    Did,
    Handle,
    Language,
    Nsid,
    RecordKey,
    Tid,
    Uri,
}

impl StringFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AtIdentifier => "at-identifier",
            Self::AtUri => "at-uri",
            Self::Cid => "cid",
            Self::Datetime => "datetime",
            Self::Did => "did",
            Self::Handle => "handle",
            Self::Language => "language",
            Self::Nsid => "nsid",
            Self::RecordKey => "record-key",
            Self::Tid => "tid",
            Self::Uri => "uri",
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BytesSchema {
    pub description: Option<String>,
    /// In decoded bytes.
    pub max_length: Option<u64>,
    pub min_length: Option<u64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BlobSchema {
    pub description: Option<String>,
    /// MIME types, each exact, `type/*` or `*/*`.
    pub accept: Option<Vec<String>>,
    pub max_size: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ArraySchema {
    pub description: Option<String>,
    pub items: Box<Schema>,
    /// In elements.
    pub max_length: Option<u64>,
    pub min_length: Option<u64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct ObjectSchema {
    pub description: Option<String>,
    pub properties: BTreeMap<String, Schema>,
    #[serde(default)]
    pub required: Vec<String>,
    #[serde(default)]
    pub nullable: Vec<String>,
}

/// HTTP query parameters of an XRPC method.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ParamsSchema {
    pub description: Option<String>,
    #[serde(default)]
    pub properties: BTreeMap<String, Schema>,
    #[serde(default)]
    pub required: Vec<String>,
}

/// One entry of a permission set. Only `resource` is common to all; the
/// other fields depend on the resource and are left for the OAuth layer,
/// which must interpret them strictly (the spec says an unknown field there
/// may narrow the permission).
#[derive(Debug, Clone, Deserialize)]
pub struct PermissionSchema {
    pub resource: String,
    #[serde(flatten)]
    pub fields: BTreeMap<String, Value>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RefSchema {
    pub description: Option<String>,
    #[serde(rename = "ref")]
    pub target: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct UnionSchema {
    pub description: Option<String>,
    pub refs: Vec<String>,
    /// Open by default: a `$type` outside `refs` is then accepted unchecked.
    #[serde(default)]
    pub closed: bool,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RecordSchema {
    pub description: Option<String>,
    #[serde(deserialize_with = "record_key_type")]
    pub key: RecordKeyType,
    #[serde(deserialize_with = "object_schema")]
    pub record: ObjectSchema,
}

/// The record-key types of <https://atproto.com/specs/record-key>.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordKeyType {
    Tid,
    Nsid,
    Any,
    /// Exactly this key, typically `self`.
    Literal(RecordKey),
}

impl std::fmt::Display for RecordKeyType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tid => f.write_str("tid"),
            Self::Nsid => f.write_str("nsid"),
            Self::Any => f.write_str("any"),
            Self::Literal(key) => write!(f, "literal:{key}"),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct QuerySchema {
    pub description: Option<String>,
    #[serde(default, deserialize_with = "params_schema")]
    pub parameters: Option<ParamsSchema>,
    pub output: Option<Body>,
    #[serde(default)]
    pub errors: Vec<ErrorDecl>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ProcedureSchema {
    pub description: Option<String>,
    #[serde(default, deserialize_with = "params_schema")]
    pub parameters: Option<ParamsSchema>,
    pub input: Option<Body>,
    pub output: Option<Body>,
    #[serde(default)]
    pub errors: Vec<ErrorDecl>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct SubscriptionSchema {
    pub description: Option<String>,
    #[serde(default, deserialize_with = "params_schema")]
    pub parameters: Option<ParamsSchema>,
    pub message: Message,
    #[serde(default)]
    pub errors: Vec<ErrorDecl>,
}

/// An XRPC request or response body.
#[derive(Debug, Clone, Deserialize)]
pub struct Body {
    pub description: Option<String>,
    pub encoding: String,
    pub schema: Option<Box<Schema>>,
}

/// The messages of a subscription.
#[derive(Debug, Clone, Deserialize)]
pub struct Message {
    pub description: Option<String>,
    pub schema: Box<Schema>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ErrorDecl {
    pub name: String,
    pub description: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PermissionSetSchema {
    pub description: Option<String>,
    pub title: Option<String>,
    #[serde(rename = "title:lang", default)]
    pub title_lang: BTreeMap<String, String>,
    pub detail: Option<String>,
    #[serde(rename = "detail:lang", default)]
    pub detail_lang: BTreeMap<String, String>,
    #[serde(deserialize_with = "permissions")]
    pub permissions: Vec<PermissionSchema>,
}

// ---------------------------------------------------------------------------
// Field deserializers for slots that admit exactly one schema kind. The JSON
// still spells the `type`, so it goes through `Schema` and must match.

fn object_schema<'de, D: Deserializer<'de>>(d: D) -> Result<ObjectSchema, D::Error> {
    match Schema::deserialize(d)? {
        Schema::Object(object) => Ok(object),
        other => Err(D::Error::custom(format_args!(
            "expected a schema of type \"object\", found \"{}\"",
            other.type_name()
        ))),
    }
}

fn params_schema<'de, D: Deserializer<'de>>(d: D) -> Result<Option<ParamsSchema>, D::Error> {
    match Schema::deserialize(d)? {
        Schema::Params(params) => Ok(Some(params)),
        other => Err(D::Error::custom(format_args!(
            "parameters must have type \"params\", found \"{}\"",
            other.type_name()
        ))),
    }
}

fn permissions<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<PermissionSchema>, D::Error> {
    Vec::<Schema>::deserialize(d)?
        .into_iter()
        .map(|schema| match schema {
            Schema::Permission(permission) => Ok(permission),
            other => Err(D::Error::custom(format_args!(
                "permissions must have type \"permission\", found \"{}\"",
                other.type_name()
            ))),
        })
        .collect()
}

fn record_key_type<'de, D: Deserializer<'de>>(d: D) -> Result<RecordKeyType, D::Error> {
    let key = String::deserialize(d)?;
    match key.as_str() {
        "tid" => Ok(RecordKeyType::Tid),
        "nsid" => Ok(RecordKeyType::Nsid),
        "any" => Ok(RecordKeyType::Any),
        other => match other.strip_prefix("literal:").map(RecordKey::new) {
            Some(Ok(literal)) => Ok(RecordKeyType::Literal(literal)),
            _ => Err(D::Error::custom(format_args!(
                "record key type must be tid, nsid, any or literal:<record key>, not {other:?}"
            ))),
        },
    }
}

// ---------------------------------------------------------------------------
// References

/// A parsed `ref`/`refs` string: `#name` (local), `nsid` (its `main`) or
/// `nsid#name`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ref<'a> {
    /// `None` for a local reference.
    pub nsid: Option<&'a str>,
    pub name: &'a str,
}

impl<'a> Ref<'a> {
    pub(crate) fn parse(s: &'a str) -> Option<Self> {
        let (nsid, name) = match s.split_once('#') {
            Some(("", name)) => (None, name),
            Some((nsid, name)) => (Some(nsid), name),
            None => (Some(s), "main"),
        };
        let nsid_ok = nsid.is_none_or(|n| Nsid::new(n).is_ok());
        (nsid_ok && is_def_name(name)).then_some(Self { nsid, name })
    }

    /// The document this reference points into, given the one it is in.
    pub(crate) fn doc<'b>(&self, from: &'b str) -> &'b str
    where
        'a: 'b,
    {
        self.nsid.unwrap_or(from)
    }

    /// Whether a data `$type` names the target of this reference. `$type`
    /// uses the bare NSID for `main` (a `#main` suffix is invalid there).
    pub(crate) fn matches_type(&self, from: &str, ty: &str) -> bool {
        let doc = self.doc(from);
        if self.name == "main" {
            ty == doc
        } else {
            ty.strip_prefix(doc).and_then(|rest| rest.strip_prefix('#')).is_some_and(|name| name == self.name)
        }
    }
}

/// Definition names are not restricted by the spec beyond being usable in
/// a fragment; the codegen fixtures use names like `ob-je-c$t` and `9`.
fn is_def_name(name: &str) -> bool {
    !name.is_empty() && !name.contains('#') && !name.chars().any(char::is_whitespace)
}

// ---------------------------------------------------------------------------
// Meta-validation: the rules serde cannot express.

/// Where a schema appears, which decides the kinds allowed there.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// A named definition under `defs`.
    Def { main: bool },
    /// An object property or array item.
    Field,
    /// A property of `params` (or the items of such an array property).
    Param,
    /// The `schema` of an XRPC input or output body.
    Body,
    /// The `schema` of a subscription message.
    Message,
}

struct Checker<'a> {
    id: &'a Nsid,
    path: String,
}

fn check_doc(doc: &LexiconDoc) -> Result<(), LexiconError> {
    let mut checker = Checker { id: &doc.id, path: String::new() };
    for (name, schema) in &doc.defs {
        checker.path = format!("defs/{name}");
        if !is_def_name(name) {
            return Err(checker.fail("definition names must be non-empty, without '#' or spaces"));
        }
        checker.schema(schema, Slot::Def { main: name == "main" })?;
    }
    Ok(())
}

impl Checker<'_> {
    fn fail(&self, reason: impl Into<String>) -> LexiconError {
        LexiconError::new(Some(self.id), &self.path, reason)
    }

    /// Runs `f` with `segment` appended to the path.
    fn at<T>(&mut self, segment: &str, f: impl FnOnce(&mut Self) -> T) -> T {
        let len = self.path.len();
        self.path.push('/');
        self.path.push_str(segment);
        let out = f(self);
        self.path.truncate(len);
        out
    }

    fn schema(&mut self, schema: &Schema, slot: Slot) -> Result<(), LexiconError> {
        self.allowed(schema, slot)?;
        match schema {
            Schema::Null(_) | Schema::CidLink(_) | Schema::Token(_) | Schema::Unknown(_) => Ok(()),
            Schema::Boolean(b) => {
                exclusive(b.default.is_some(), b.const_value.is_some()).map_err(|r| self.fail(r))
            }
            Schema::Integer(i) => exclusive(i.default.is_some(), i.const_value.is_some())
                .and_then(|()| ordered(i.minimum, i.maximum, "minimum", "maximum"))
                .map_err(|r| self.fail(r)),
            Schema::String(s) => exclusive(s.default.is_some(), s.const_value.is_some())
                .and_then(|()| ordered(s.min_length, s.max_length, "minLength", "maxLength"))
                .and_then(|()| ordered(s.min_graphemes, s.max_graphemes, "minGraphemes", "maxGraphemes"))
                .map_err(|r| self.fail(r)),
            Schema::Bytes(b) => {
                ordered(b.min_length, b.max_length, "minLength", "maxLength").map_err(|r| self.fail(r))
            }
            Schema::Blob(b) => {
                for pattern in b.accept.iter().flatten() {
                    if !is_mime_pattern(pattern) {
                        return Err(self
                            .fail(format!("accept entry {pattern:?} must be type/subtype, type/* or */*")));
                    }
                }
                Ok(())
            }
            Schema::Array(a) => {
                ordered(a.min_length, a.max_length, "minLength", "maxLength").map_err(|r| self.fail(r))?;
                // Arrays in params may only hold the scalar param types.
                let item_slot = if slot == Slot::Param { Slot::Param } else { Slot::Field };
                if slot == Slot::Param && matches!(*a.items, Schema::Array(_)) {
                    return Err(self.at("items", |c| c.fail("params cannot nest arrays")));
                }
                self.at("items", |c| c.schema(&a.items, item_slot))
            }
            Schema::Object(o) => {
                self.properties(&o.properties, &o.required, Slot::Field)?;
                if let Some(name) = o.nullable.iter().find(|n| !o.properties.contains_key(*n)) {
                    return Err(self.fail(format!("nullable property {name:?} is not defined")));
                }
                Ok(())
            }
            Schema::Params(p) => self.properties(&p.properties, &p.required, Slot::Param),
            Schema::Permission(p) => {
                if p.resource.is_empty() {
                    return Err(self.fail("permission resource must not be empty"));
                }
                Ok(())
            }
            Schema::Ref(r) => self.reference(&r.target),
            Schema::Union(u) => {
                if u.closed && u.refs.is_empty() {
                    return Err(self.fail("a closed union needs at least one ref"));
                }
                u.refs.iter().try_for_each(|r| self.reference(r))
            }
            Schema::Record(r) => self.at("record", |c| {
                c.properties(&r.record.properties, &r.record.required, Slot::Field)?;
                match r.record.nullable.iter().find(|n| !r.record.properties.contains_key(*n)) {
                    Some(name) => Err(c.fail(format!("nullable property {name:?} is not defined"))),
                    None => Ok(()),
                }
            }),
            Schema::Query(q) => {
                self.params(q.parameters.as_ref())?;
                self.body("output", q.output.as_ref())?;
                self.errors(&q.errors)
            }
            Schema::Procedure(p) => {
                self.params(p.parameters.as_ref())?;
                self.body("input", p.input.as_ref())?;
                self.body("output", p.output.as_ref())?;
                self.errors(&p.errors)
            }
            Schema::Subscription(s) => {
                self.params(s.parameters.as_ref())?;
                self.at("message", |c| c.at("schema", |c| c.schema(&s.message.schema, Slot::Message)))?;
                self.errors(&s.errors)
            }
            Schema::PermissionSet(p) => {
                for (field, map) in [("title:lang", &p.title_lang), ("detail:lang", &p.detail_lang)] {
                    if let Some(bad) = map.keys().find(|k| Language::new(k.as_str()).is_err()) {
                        return Err(self.at(field, |c| c.fail(format!("{bad:?} is not a language tag"))));
                    }
                }
                for (i, permission) in p.permissions.iter().enumerate() {
                    if permission.resource.is_empty() {
                        return Err(self.at(&format!("permissions/{i}"), |c| {
                            c.fail("permission resource must not be empty")
                        }));
                    }
                }
                Ok(())
            }
        }
    }

    /// Which kinds may appear in which slot (spec, "Lexicon Files" and the
    /// per-type sections).
    fn allowed(&self, schema: &Schema, slot: Slot) -> Result<(), LexiconError> {
        let kind = schema.type_name();
        let ok = match slot {
            Slot::Def { main } => {
                let name = if main { "main" } else { "" };
                return named_kind_allowed(name, kind).map_err(|reason| self.fail(reason));
            }
            Slot::Field => {
                !schema.is_primary()
                    && !matches!(schema, Schema::Token(_) | Schema::Params(_) | Schema::Permission(_))
            }
            Slot::Param => matches!(
                schema,
                Schema::Boolean(_) | Schema::Integer(_) | Schema::String(_) | Schema::Array(_)
            ),
            Slot::Body => matches!(schema, Schema::Object(_) | Schema::Ref(_) | Schema::Union(_)),
            Slot::Message => matches!(schema, Schema::Union(_)),
        };
        if ok {
            return Ok(());
        }
        Err(self.fail(match slot {
            Slot::Def { .. } => format!("{kind} cannot be a named definition"),
            Slot::Field => format!("{kind} cannot be used as a field type"),
            Slot::Param => format!("{kind} cannot be a parameter type"),
            Slot::Body => format!("a body schema must be an object, ref or union, not {kind}"),
            Slot::Message => format!("a message schema must be a union, not {kind}"),
        }))
    }

    fn properties(
        &mut self,
        properties: &BTreeMap<String, Schema>,
        required: &[String],
        slot: Slot,
    ) -> Result<(), LexiconError> {
        if let Some(name) = required.iter().find(|n| !properties.contains_key(*n)) {
            return Err(self.fail(format!("required property {name:?} is not defined")));
        }
        for (name, schema) in properties {
            self.at("properties", |c| c.at(name, |c| c.schema(schema, slot)))?;
        }
        Ok(())
    }

    fn params(&mut self, params: Option<&ParamsSchema>) -> Result<(), LexiconError> {
        match params {
            Some(p) => self.at("parameters", |c| c.properties(&p.properties, &p.required, Slot::Param)),
            None => Ok(()),
        }
    }

    fn body(&mut self, field: &str, body: Option<&Body>) -> Result<(), LexiconError> {
        let Some(body) = body else { return Ok(()) };
        self.at(field, |c| {
            if body.encoding.is_empty() {
                return Err(c.fail("encoding must not be empty"));
            }
            match &body.schema {
                Some(schema) => c.at("schema", |c| c.schema(schema, Slot::Body)),
                None => Ok(()),
            }
        })
    }

    fn errors(&self, errors: &[ErrorDecl]) -> Result<(), LexiconError> {
        match errors.iter().find(|e| e.name.is_empty() || e.name.chars().any(char::is_whitespace)) {
            Some(e) => {
                Err(self.fail(format!("error name {:?} must be non-empty without whitespace", e.name)))
            }
            None => Ok(()),
        }
    }

    fn reference(&self, target: &str) -> Result<(), LexiconError> {
        match Ref::parse(target) {
            Some(_) => Ok(()),
            None => Err(self.fail(format!("reference {target:?} must be #name, an NSID, or NSID#name"))),
        }
    }
}

/// Whether a definition of type `kind` may be called `name`. Refs, unions,
/// `unknown` and the sub-types describe a location rather than a reusable
/// type, so they cannot be named at all; primary types only as `main`.
fn named_kind_allowed(name: &str, kind: &str) -> Result<(), String> {
    match kind {
        "ref" | "union" | "unknown" | "params" | "permission" => {
            Err(format!("{kind} cannot be a named definition"))
        }
        "record" | "query" | "procedure" | "subscription" | "permission-set" if name != "main" => {
            Err(format!("a {kind} definition must be named main"))
        }
        _ => Ok(()),
    }
}

fn exclusive(default: bool, constant: bool) -> Result<(), String> {
    if default && constant { Err("const and default are mutually exclusive".into()) } else { Ok(()) }
}

fn ordered<T: PartialOrd + std::fmt::Display>(
    min: Option<T>,
    max: Option<T>,
    min_name: &str,
    max_name: &str,
) -> Result<(), String> {
    match (min, max) {
        (Some(min), Some(max)) if min > max => {
            Err(format!("{min_name} ({min}) is greater than {max_name} ({max})"))
        }
        _ => Ok(()),
    }
}

/// `type/subtype`, `type/*` or `*/*`; partial globs and a lone `*` are not
/// supported (spec, `blob`).
fn is_mime_pattern(pattern: &str) -> bool {
    let token =
        |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$&^_.+-".contains(&b));
    match pattern.split_once('/') {
        Some(("*", "*")) => true,
        Some((ty, "*")) => token(ty),
        Some((ty, sub)) => token(ty) && token(sub),
        None => false,
    }
}
