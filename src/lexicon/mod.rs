//! Lexicon schemas (<https://atproto.com/specs/lexicon>) and validation of
//! records against them.
//!
//! A [`Catalog`] holds meta-validated lexicon documents keyed by NSID;
//! [`validate_record`] checks a record (in its atproto JSON form) and its
//! record key against the catalog. The `bundled` submodule explains where
//! the offline set (`com.atproto.*`, `app.bsky.*`, `chat.bsky.*`) comes
//! from and parses it ([`Bundle`]); `resolve` holds the protocol half of
//! finding lexicons outside it at run time.
//!
//! Like `atp`, this module is pure: no I/O, no clock. The I/O lives in
//! `lexicon_store` (installing and loading the bundle) and `lexicon_net`
//! (the network half of resolution, behind the `LexiconFetcher` trait).

mod bundled;
pub mod resolve;
mod schema;
mod validate;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use serde_json::Value;

use crate::atp::syntax::Nsid;

pub use bundled::{Bundle, BundleSource, OFFLINE_NAMESPACES, normalize_refs, parse_schema_dict};
pub use schema::{
    ArraySchema, BlobSchema, Body, BooleanSchema, BytesSchema, ErrorDecl, IntegerSchema, LexiconDoc, Message,
    ObjectSchema, ParamsSchema, PermissionSchema, PermissionSetSchema, PlainSchema, ProcedureSchema,
    QuerySchema, RecordKeyType, RecordSchema, RefSchema, Schema, StringFormat, StringSchema,
    SubscriptionSchema, UnionSchema,
};
pub use validate::{Problem, Validation, ValidationError, validate_record};

use schema::Ref;

/// A lexicon document that breaks the schema language's rules.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct LexiconError {
    id: Option<String>,
    path: String,
    reason: String,
}

impl LexiconError {
    pub(crate) fn new(id: Option<&Nsid>, path: &str, reason: impl Into<String>) -> Self {
        Self { id: id.map(|id| id.as_str().to_owned()), path: path.to_owned(), reason: reason.into() }
    }

    /// The document's NSID, when it got far enough to have a valid one.
    pub fn id(&self) -> Option<&str> {
        self.id.as_deref()
    }

    /// Where in the document, e.g. `defs/main/record/properties/text`.
    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn reason(&self) -> &str {
        &self.reason
    }
}

impl fmt::Display for LexiconError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("invalid lexicon")?;
        if let Some(id) = &self.id {
            write!(f, " {id}")?;
        }
        if !self.path.is_empty() {
            write!(f, " at {}", self.path)?;
        }
        write!(f, ": {}", self.reason)
    }
}

/// A set of lexicon documents keyed by NSID.
///
/// Documents are reference-counted so that a catalog can be cloned cheaply
/// when one is extended at run time (copy-on-write behind an `Arc`, see
/// `resolve`) while requests keep validating against their snapshot.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    docs: BTreeMap<String, Arc<LexiconDoc>>,
}

/// A `ref` or union member that does not lead to a usable definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DanglingRef {
    /// The document holding the reference.
    pub from: String,
    /// The reference as written.
    pub target: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl Catalog {
    pub fn new() -> Self {
        Self::default()
    }

    /// Meta-validates a lexicon document (JSON form) and adds it, replacing
    /// any document with the same id. References to other documents are not
    /// required to resolve yet: documents arrive in any order (see
    /// [`Catalog::dangling_refs`]).
    ///
    /// # Errors
    /// The first rule of the schema language the document breaks.
    pub fn add_document(&mut self, json: &Value) -> Result<(), LexiconError> {
        self.insert(LexiconDoc::from_json(json)?);
        Ok(())
    }

    /// Adds an already parsed document (owned or shared), returning the one
    /// it replaces.
    pub fn insert(&mut self, doc: impl Into<Arc<LexiconDoc>>) -> Option<Arc<LexiconDoc>> {
        let doc = doc.into();
        self.docs.insert(doc.id().as_str().to_owned(), doc)
    }

    pub fn get(&self, nsid: &str) -> Option<&LexiconDoc> {
        self.docs.get(nsid).map(Arc::as_ref)
    }

    pub fn contains(&self, nsid: &str) -> bool {
        self.docs.contains_key(nsid)
    }

    pub fn len(&self) -> usize {
        self.docs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.docs.is_empty()
    }

    /// Every document, in NSID order.
    pub fn docs(&self) -> impl Iterator<Item = &LexiconDoc> {
        self.docs.values().map(Arc::as_ref)
    }

    /// [`validate_record`] against this catalog.
    ///
    /// # Errors
    /// See [`validate_record`].
    pub fn validate_record(
        &self,
        collection: &str,
        rkey: &str,
        value: &Value,
    ) -> Result<Validation, ValidationError> {
        validate_record(self, collection, rkey, value)
    }

    /// Every reference in the catalog that does not resolve to a definition
    /// of a kind it may point at: a `ref` may not target a token or an XRPC
    /// definition, a union member must be an object or a record. Empty for
    /// a catalog that is closed under references.
    pub fn dangling_refs(&self) -> Vec<DanglingRef> {
        let mut out = Vec::new();
        for doc in self.docs() {
            let from = doc.id().as_str();
            for_each_ref(doc, |target, in_union| {
                let reason = match self.lookup(from, target) {
                    None => Some("no such definition in the catalog"),
                    Some(Schema::Object(_) | Schema::Record(_)) => None,
                    Some(_) if in_union => Some("union members must be objects or records"),
                    Some(
                        Schema::Token(_)
                        | Schema::Query(_)
                        | Schema::Procedure(_)
                        | Schema::Subscription(_)
                        | Schema::PermissionSet(_),
                    ) => Some("a ref cannot point at a token or an XRPC definition"),
                    Some(_) => None,
                };
                if let Some(reason) = reason {
                    out.push(DanglingRef { from: from.to_owned(), target: target.to_owned(), reason });
                }
            });
        }
        out
    }

    /// The NSIDs that validating against `nsid` may need and the catalog
    /// lacks: documents named by references reachable from `nsid`'s
    /// document (including `nsid` itself when absent). A resolver fetches
    /// these, adds them and asks again until the answer is empty.
    pub fn missing_documents(&self, nsid: &Nsid) -> BTreeSet<Nsid> {
        let mut missing = BTreeSet::new();
        let mut seen = BTreeSet::new();
        let mut queue = vec![nsid.as_str().to_owned()];
        while let Some(id) = queue.pop() {
            if !seen.insert(id.clone()) {
                continue;
            }
            let Some(doc) = self.get(&id) else {
                if let Ok(nsid) = Nsid::new(id) {
                    missing.insert(nsid);
                }
                continue;
            };
            for_each_ref(doc, |target, _| {
                if let Some(r) = Ref::parse(target) {
                    let other = r.doc(&id);
                    if !seen.contains(other) {
                        queue.push(other.to_owned());
                    }
                }
            });
        }
        missing
    }

    /// The definition a reference written in document `from` points at.
    fn lookup(&self, from: &str, target: &str) -> Option<&Schema> {
        let r = Ref::parse(target)?;
        self.get(r.doc(from))?.def(r.name)
    }
}

/// Calls `f(target, in_union)` for every `ref` and union member in `doc`.
fn for_each_ref(doc: &LexiconDoc, mut f: impl FnMut(&str, bool)) {
    fn walk(schema: &Schema, f: &mut impl FnMut(&str, bool)) {
        let props = |properties: &BTreeMap<String, Schema>, f: &mut _| {
            properties.values().for_each(|s| walk(s, f));
        };
        match schema {
            Schema::Ref(r) => f(&r.target, false),
            Schema::Union(u) => u.refs.iter().for_each(|r| f(r, true)),
            Schema::Array(a) => walk(&a.items, f),
            Schema::Object(o) => props(&o.properties, f),
            Schema::Params(p) => props(&p.properties, f),
            Schema::Record(r) => props(&r.record.properties, f),
            Schema::Query(q) => {
                if let Some(p) = &q.parameters {
                    props(&p.properties, f);
                }
                body(q.output.as_ref(), f);
            }
            Schema::Procedure(p) => {
                if let Some(params) = &p.parameters {
                    props(&params.properties, f);
                }
                body(p.input.as_ref(), f);
                body(p.output.as_ref(), f);
            }
            Schema::Subscription(s) => {
                if let Some(p) = &s.parameters {
                    props(&p.properties, f);
                }
                walk(&s.message.schema, f);
            }
            Schema::Null(_)
            | Schema::Boolean(_)
            | Schema::Integer(_)
            | Schema::String(_)
            | Schema::Bytes(_)
            | Schema::CidLink(_)
            | Schema::Blob(_)
            | Schema::Permission(_)
            | Schema::Token(_)
            | Schema::Unknown(_)
            | Schema::PermissionSet(_) => {}
        }
    }
    fn body(body: Option<&Body>, f: &mut impl FnMut(&str, bool)) {
        if let Some(schema) = body.and_then(|b| b.schema.as_deref()) {
            walk(schema, f);
        }
    }
    for schema in doc.defs().values() {
        walk(schema, &mut f);
    }
}
