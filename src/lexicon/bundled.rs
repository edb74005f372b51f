//! Where the schemas Roost validates offline come from.
//!
//! Roost must validate `com.atproto.*`, `app.bsky.*` and `chat.bsky.*`
//! records with no network, without reading `../shared` at run time and
//! without a copy of the official JSON files in its own tree.
//!
//! # Why not `jacquard-api`
//!
//! `jacquard-api` (MPL-2.0) generates, per lexicon, a
//! `LexiconSchema::lexicon_doc()` returning a `LexiconDoc` that serializes
//! to lexicon JSON. Measured against the official files (0.12.2, features
//! `app_bsky`, `chat_bsky`, `com_atproto`), it is not faithful enough to
//! validate against:
//!
//! - blob `accept` and `maxSize` are always dropped (the generator emits
//!   `LexBlob { ..Default::default() }` and checks them in typed code
//!   instead), so a 3 MB `text/plain` "image" or a GIF avatar validates;
//!   `const`, `default` and `knownValues` are dropped too;
//! - only documents with a generated struct exist: 73 of the 317 official
//!   documents in those namespaces, with no queries or procedures and no
//!   string-only `defs` documents (`com.atproto.moderation.defs` is absent,
//!   so `app.bsky.labeler.service` has dangling refs and cannot be
//!   validated at all); `streaming`-gated documents need another feature;
//! - it lags upstream (no `app.bsky.actor.contentVisibilityDeclaration`;
//!   older limits and missing properties elsewhere);
//! - there is no registry of documents (the generated impls do not submit
//!   to `inventory`), so Roost would keep a hand list of 73 type paths to
//!   redo on every upgrade;
//! - it pulls in `jacquard-common` with a second `reqwest`, `k256`, `p256`
//!   and `rand` major version, `chrono`, `miette` and more (about 300
//!   crates) into the production build.
//!
//! # The design instead: lexicon JSON as data
//!
//! Schemas are data; the cheapest faithful form is the official JSON text
//! itself, embedded with `include_str!` (no code generation, so it costs
//! about as much to compile as a string literal) and parsed at start-up:
//! 317 documents, 523 KB, about 15 ms. The text lives in a small data-only
//! crate outside Roost's repository (upstream `lexicons/` at a pinned
//! commit, MIT/Apache-2.0 like upstream, exposing
//! `pub static LEXICONS: &[&str]`), so Roost depends on it like on any
//! crate and upgrades it by bumping a version. Roost then has:
//!
//! ```ignore
//! impl Catalog {
//!     pub fn bundled() -> Result<Catalog, LexiconError> {
//!         Catalog::from_json_sources(lexicon_data::LEXICONS.iter().copied()
//!             .filter(|text| in_offline_namespace(text)))
//!     }
//! }
//! ```
//!
//! and a test that the bundled set equals `../shared/lexicons` for the
//! offline namespaces, so drift shows up in CI. What this module provides
//! now is the loading half, [`Catalog::from_json_sources`], which is what
//! `bundled` reduces to once the data crate exists.

use serde_json::Value;

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
