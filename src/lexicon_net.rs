//! Network lexicon resolution: the I/O half of `lexicon::resolve`, and the
//! application's lexicon state (the offline catalog plus, when
//! `PDS_LEXICON_RESOLUTION` is on, a cached resolver for the rest).
//!
//! For an NSID outside the catalog: the `_lexicon.<authority>` TXT record
//! (or a pin from `PDS_LEXICON_AUTHORITIES`) names a DID; the DID document
//! (PLC directory or `did:web`) names its PDS; that PDS's
//! `com.atproto.repo.getRecord` returns the `com.atproto.lexicon.schema`
//! record. Results, failures included, are cached in memory with a TTL.
//!
//! Every URL here except the configured PLC directory comes from someone
//! else's DNS or DID document, so requests go through [`guarded_client`]:
//! HTTPS only, no redirects, size and time limits, and the guard of
//! [`crate::net`], which refuses loopback, private, link-local and other
//! non-public addresses (dev mode allows them, for local test networks).

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use serde_json::Value;

use crate::atp::syntax::{AtUri, Did, Nsid};
use crate::lexicon::Catalog;
use crate::lexicon::resolve::{LexiconCache, LexiconFetcher, Resolver};
use crate::net::Refusal;
pub use crate::net::{HickoryTxt, TxtLookup};

/// How long one resolution (all its lookups together) may take on the
/// write path before the record is treated as of an unknown lexicon.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Failures are retried sooner than successes expire: a publisher fixing
/// their DNS should not wait an hour.
const FAILED_TTL: Duration = Duration::from_secs(300);
/// A schema record or DID document is small; anything bigger is refused.
const MAX_RESPONSE_BYTES: usize = 1 << 20;

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Operator-pinned authorities (`PDS_LEXICON_AUTHORITIES`), answered as if
/// DNS had said `did=<DID>`, in front of another lookup (or none).
pub struct PinnedTxt {
    pins: HashMap<String, String>,
    fallback: Option<Box<dyn TxtLookup>>,
}

impl PinnedTxt {
    /// `pins` maps an NSID authority domain (`example.com` for
    /// `com.example.*`) to a DID.
    pub fn new(
        pins: impl IntoIterator<Item = (String, String)>,
        fallback: Option<Box<dyn TxtLookup>>,
    ) -> Self {
        Self { pins: pins.into_iter().collect(), fallback }
    }
}

impl TxtLookup for PinnedTxt {
    fn txt<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Vec<String>, String>> {
        Box::pin(async move {
            let domain = name.strip_prefix("_lexicon.").unwrap_or(name);
            if let Some(did) = self.pins.get(domain) {
                return Ok(vec![format!("did={did}")]);
            }
            match &self.fallback {
                Some(dns) => dns.txt(name).await,
                None => Ok(Vec::new()),
            }
        })
    }
}

/// The HTTP client for URLs learnt from the network (see the module doc).
///
/// # Errors
/// The TLS backend cannot be set up.
pub fn guarded_client(allow_private: bool) -> anyhow::Result<reqwest::Client> {
    Ok(crate::net::client_builder(!allow_private).timeout(Duration::from_secs(10)).build()?)
}

/// Fetches DNS answers, DID documents and schema records.
pub struct NetworkFetcher {
    txt: Box<dyn TxtLookup>,
    /// For URLs from DID documents and `did:web` hosts.
    guarded: reqwest::Client,
    /// For the configured PLC directory, which the operator chose.
    plc_http: reqwest::Client,
    plc_url: String,
    allow_private: bool,
}

impl NetworkFetcher {
    pub fn new(
        txt: Box<dyn TxtLookup>,
        guarded: reqwest::Client,
        plc_http: reqwest::Client,
        plc_url: String,
        allow_private: bool,
    ) -> Self {
        Self { txt, guarded, plc_http, plc_url: plc_url.trim_end_matches('/').to_owned(), allow_private }
    }

    /// The URL is fit for the guarded client: HTTPS (HTTP only when private
    /// addresses are allowed, i.e. dev mode), and an IP-literal host must be
    /// public, since such a host never reaches the guarded resolver.
    fn check_url(&self, url: &reqwest::Url) -> anyhow::Result<()> {
        crate::net::check_url(url, self.allow_private, !self.allow_private).map_err(|refusal| match refusal {
            Refusal::Scheme(other) => anyhow!("refusing a {other}: URL from the network: {url}"),
            Refusal::NoHost => anyhow!("no host in {url}"),
            Refusal::Localhost => anyhow!("refusing non-public host localhost"),
            Refusal::Address(ip) => anyhow!("refusing non-public address {ip}"),
        })
    }

    async fn get_json(&self, client: &reqwest::Client, url: reqwest::Url) -> anyhow::Result<Value> {
        let mut resp = crate::telemetry::send(client.get(url.clone()))
            .await
            .with_context(|| format!("fetching {url}"))?;
        if !resp.status().is_success() {
            bail!("{url}: HTTP {}", resp.status());
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await? {
            body.extend_from_slice(&chunk);
            if body.len() > MAX_RESPONSE_BYTES {
                bail!("{url}: response larger than {MAX_RESPONSE_BYTES} bytes");
            }
        }
        serde_json::from_slice(&body).with_context(|| format!("{url}: not JSON"))
    }

    /// The DID document of `did`.
    ///
    /// Not `proxy::DidResolver`, on purpose: that one follows the proxy's
    /// switch (`PDS_DISABLE_SSRF_PROTECTION`), so in dev mode it still refuses
    /// local `did:web` hosts that lexicon resolution must reach; it serves plain
    /// HTTP only to `localhost*` (here also to IP literals), caps documents at
    /// 64 KiB (here 1 MiB), and caches successes for ten minutes where lexicon
    /// resolution has its own cache with a shorter lifetime for failures.
    async fn did_document(&self, did: &Did) -> anyhow::Result<Value> {
        let did = did.as_str();
        let doc = if did.starts_with("did:plc:") {
            let url = reqwest::Url::parse(&format!("{}/{did}", self.plc_url))?;
            self.get_json(&self.plc_http, url).await?
        } else if let Some(host) = did.strip_prefix("did:web:") {
            // atproto allows did:web only for a whole host (no path); a port
            // is percent-encoded (`localhost%3A8080`).
            if host.contains(':') {
                bail!("did:web with a path is not supported: {did}");
            }
            let host = host.replace("%3A", ":").replace("%3a", ":");
            // Plain HTTP only for a local test host in dev mode.
            let bare = host.rsplit_once(':').map_or(host.as_str(), |(h, _)| h);
            let local = bare == "localhost" || bare.parse::<IpAddr>().is_ok();
            let scheme = if self.allow_private && local { "http" } else { "https" };
            let url = reqwest::Url::parse(&format!("{scheme}://{host}/.well-known/did.json"))?;
            self.check_url(&url)?;
            self.get_json(&self.guarded, url).await?
        } else {
            bail!("unsupported DID method: {did}");
        };
        if doc.get("id").and_then(Value::as_str) != Some(did) {
            bail!("the DID document of {did} names another DID");
        }
        Ok(doc)
    }
}

/// The `#atproto_pds` service endpoint of a DID document.
pub fn pds_endpoint(doc: &Value) -> Option<&str> {
    let id = doc.get("id").and_then(Value::as_str).unwrap_or_default();
    doc.get("service")?.as_array()?.iter().find_map(|s| {
        let sid = s.get("id")?.as_str()?;
        let is_pds = (sid == "#atproto_pds" || sid.strip_prefix(id) == Some("#atproto_pds"))
            && s.get("type")?.as_str()? == "AtprotoPersonalDataServer";
        is_pds.then(|| s.get("serviceEndpoint")?.as_str()).flatten()
    })
}

impl LexiconFetcher for NetworkFetcher {
    fn txt_records(&self, name: &str) -> impl Future<Output = Result<Vec<String>, String>> + Send {
        // The trait's future may not borrow `name`.
        let name = name.to_owned();
        async move { self.txt.txt(&name).await }
    }

    fn fetch_record(&self, uri: &AtUri) -> impl Future<Output = Result<Value, String>> + Send {
        let uri = uri.clone();
        async move {
            let fetch = async {
                let did = Did::new(uri.authority().to_string()).context("the schema URI names no DID")?;
                let doc = self.did_document(&did).await?;
                let endpoint = pds_endpoint(&doc).context("the DID document names no PDS")?;
                let mut url = reqwest::Url::parse(endpoint).context("bad PDS endpoint")?;
                url.set_path("/xrpc/com.atproto.repo.getRecord");
                url.query_pairs_mut()
                    .clear()
                    .append_pair("repo", did.as_str())
                    .append_pair("collection", uri.collection().map(Nsid::as_str).unwrap_or_default())
                    .append_pair("rkey", uri.rkey().map(|r| r.as_str()).unwrap_or_default());
                self.check_url(&url)?;
                let body = self.get_json(&self.guarded, url).await?;
                if body.get("uri").and_then(Value::as_str).is_some_and(|u| u != uri.to_string()) {
                    bail!("the PDS answered with another record: {}", body["uri"]);
                }
                body.get("value").cloned().context("the getRecord answer has no value")
            };
            fetch.await.map_err(|e: anyhow::Error| format!("{e:#}"))
        }
    }
}

/// The lexicons records are validated against: the catalog loaded at start
/// (bundle and `PDS_LEXICON_DIRECTORY`), and, when enabled, network
/// resolution for collections it lacks.
pub struct Lexicons {
    catalog: RwLock<Arc<Catalog>>,
    resolver: Option<Resolver<NetworkFetcher>>,
}

impl Lexicons {
    pub fn new(catalog: Catalog, resolver: Option<Resolver<NetworkFetcher>>) -> Self {
        Self { catalog: RwLock::new(Arc::new(catalog)), resolver }
    }

    /// A resolver with the usual cache lifetimes.
    pub fn resolver(fetcher: NetworkFetcher, ttl: Duration) -> Resolver<NetworkFetcher> {
        Resolver::new(fetcher, LexiconCache::new(ttl, FAILED_TTL.min(ttl)))
    }

    /// The catalog loaded at start.
    pub fn catalog(&self) -> Arc<Catalog> {
        Arc::clone(&self.catalog.read().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// A catalog to validate a record of `collection` against: the start-up
    /// catalog, extended by network resolution when that is enabled and the
    /// collection is not in it. Resolved documents live in the resolver's
    /// cache (so they expire), never in the start-up catalog. A resolution
    /// that fails or times out leaves the collection unknown; the caller
    /// decides what that means for the write.
    pub async fn for_collection(&self, collection: &Nsid) -> Arc<Catalog> {
        let base = self.catalog();
        let Some(resolver) = &self.resolver else { return base };
        if base.contains(collection.as_str()) {
            return base;
        }
        match tokio::time::timeout(RESOLVE_TIMEOUT, resolver.resolve(&base, collection, Instant::now())).await
        {
            Ok(Ok(extended)) => Arc::new(extended),
            Ok(Err(e)) => {
                tracing::info!(nsid = %collection, error = %e, "lexicon resolution failed");
                base
            }
            Err(_) => {
                tracing::info!(nsid = %collection, "lexicon resolution timed out");
                base
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pds_endpoint_is_the_atproto_pds_service() {
        let doc = serde_json::json!({
            "id": "did:plc:abc",
            "service": [
                { "id": "#other", "type": "Other", "serviceEndpoint": "https://other.example" },
                { "id": "did:plc:abc#atproto_pds", "type": "AtprotoPersonalDataServer",
                  "serviceEndpoint": "https://pds.example" },
            ],
        });
        assert_eq!(pds_endpoint(&doc), Some("https://pds.example"));
        assert_eq!(pds_endpoint(&serde_json::json!({ "id": "did:plc:abc" })), None);
    }
}
