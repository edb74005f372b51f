//! Handle verification for `updateHandle`: a handle outside this server's
//! domains must already point at the account, by DNS TXT `_atproto.<handle>`
//! (`did=<did>`) or `https://<handle>/.well-known/atproto-did` (the handle spec).

use crate::net::{HickoryTxt, TxtLookup};

/// A well-known answer is one DID; anything longer is not one.
const MAX_WELL_KNOWN_BYTES: usize = 2048;

pub struct HandleResolver {
    dns: Option<Box<dyn TxtLookup>>,
    /// SSRF-safe client (`crate::proxy::outbound_client`).
    http: reqwest::Client,
}

impl HandleResolver {
    pub fn new(http: reqwest::Client) -> Self {
        let dns: Option<Box<dyn TxtLookup>> = match HickoryTxt::from_system() {
            Ok(r) => Some(Box::new(r)),
            Err(e) => {
                tracing::warn!(error = %e, "no DNS resolver configuration; handles resolve over HTTPS only");
                None
            }
        };
        HandleResolver { dns, http }
    }

    /// The DID `handle` points at, if exactly one; DNS first, then HTTPS.
    pub async fn resolve(&self, handle: &str) -> Option<String> {
        if let Some(did) = self.resolve_dns(handle).await {
            return Some(did);
        }
        self.resolve_well_known(handle).await
    }

    async fn resolve_dns(&self, handle: &str) -> Option<String> {
        let records = self.dns.as_ref()?.txt(&format!("_atproto.{handle}.")).await.ok()?;
        let dids: Vec<String> =
            records.iter().filter_map(|txt| txt.strip_prefix("did=").map(str::to_owned)).collect();
        // More than one `did=` record is ambiguous: the spec says fail.
        match dids.as_slice() {
            [did] => Some(did.clone()),
            _ => None,
        }
    }

    async fn resolve_well_known(&self, handle: &str) -> Option<String> {
        let response =
            crate::telemetry::send(self.http.get(format!("https://{handle}/.well-known/atproto-did")))
                .await
                .ok()?;
        if !response.status().is_success() {
            return None;
        }
        let body = crate::proxy::read_capped(response, MAX_WELL_KNOWN_BYTES).await?;
        let did = String::from_utf8(body).ok()?.lines().next()?.trim().to_owned();
        crate::atp::syntax::Did::new(did.as_str()).ok().map(|_| did)
    }
}
