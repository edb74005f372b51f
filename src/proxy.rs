//! Forwarding the XRPC methods Roost does not serve (feeds, notifications,
//! chat, reports…) to the service that does, as the account.
//!
//! The target is the `atproto-proxy` header (`did#service_id`, resolved
//! through the DID document) or the configured default for the method's
//! namespace. Each call carries a service-auth JWT from [`crate::service_auth`].
//! Outbound connections go through the guard in [`crate::net`] (private and
//! loopback addresses refused, checked after DNS resolution, so a hostname
//! cannot smuggle one in) unless `PDS_DISABLE_SSRF_PROTECTION=true`.

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::config::{ProxyConfig, ServiceEndpoint};
use crate::net::Refusal;

/// Account-management methods that must be called on the PDS directly, never
/// proxied or service-authed (the reference PDS's list).
pub const PROTECTED_METHODS: &[&str] = &[
    "com.atproto.admin.sendEmail",
    "com.atproto.identity.requestPlcOperationSignature",
    "com.atproto.identity.signPlcOperation",
    "com.atproto.identity.updateHandle",
    "com.atproto.server.activateAccount",
    "com.atproto.server.confirmEmail",
    "com.atproto.server.createAppPassword",
    "com.atproto.server.deactivateAccount",
    "com.atproto.server.getAccountInviteCodes",
    "com.atproto.server.listAppPasswords",
    "com.atproto.server.requestAccountDelete",
    "com.atproto.server.requestEmailConfirmation",
    "com.atproto.server.requestEmailUpdate",
    "com.atproto.server.revokeAppPassword",
    "com.atproto.server.updateEmail",
];

/// Methods a non-privileged app password may not reach (DMs, as the reference PDS).
pub const PRIVILEGED_METHODS: &[&str] = &[
    "chat.bsky.actor.deleteAccount",
    "chat.bsky.actor.exportAccountData",
    "chat.bsky.convo.deleteMessageForSelf",
    "chat.bsky.convo.getConvo",
    "chat.bsky.convo.getConvoForMembers",
    "chat.bsky.convo.getLog",
    "chat.bsky.convo.getMessages",
    "chat.bsky.convo.leaveConvo",
    "chat.bsky.convo.listConvos",
    "chat.bsky.convo.muteConvo",
    "chat.bsky.convo.sendMessage",
    "chat.bsky.convo.sendMessageBatch",
    "chat.bsky.convo.unmuteConvo",
    "chat.bsky.convo.updateRead",
    "com.atproto.server.createAccount",
];

/// Where a call goes and who it is for (`aud` of the service token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub url: String,
    pub aud: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("{0}")]
    BadHeader(&'static str),
    #[error("could not resolve proxy did")]
    UnresolvableDid,
    #[error("could not resolve proxy did service url")]
    NoServiceEndpoint,
    #[error("proxy target is not allowed: {0}")]
    Forbidden(String),
}

/// The default service for a method when the client names none.
pub fn default_target(config: &ProxyConfig, nsid: &str) -> Option<Target> {
    let service: Option<&ServiceEndpoint> = if nsid == "com.atproto.moderation.createReport" {
        config.report.as_ref()
    } else if nsid.starts_with("tools.ozone.") {
        config.moderation.as_ref()
    } else if nsid.starts_with("app.bsky.") {
        config.appview.as_ref()
    } else if nsid.starts_with("chat.bsky.") {
        config.chat.as_ref()
    } else {
        None
    };
    service.map(|s| Target { url: s.url.clone(), aud: s.did.clone() })
}

/// Splits an `atproto-proxy` header into DID and `#service_id` (the
/// reference PDS's rules and messages).
pub fn parse_proxy_header(value: &str) -> Result<(&str, &str), ProxyError> {
    let Some(hash) = value.find('#') else {
        return Err(ProxyError::BadHeader("no service id specified in proxy header"));
    };
    if hash == 0 {
        return Err(ProxyError::BadHeader("no did specified in proxy header"));
    }
    if hash == value.len() - 1 {
        return Err(ProxyError::BadHeader("no service id specified in proxy header"));
    }
    if value[hash + 1..].contains('#') {
        return Err(ProxyError::BadHeader("invalid proxy header format"));
    }
    if value.contains(' ') {
        return Err(ProxyError::BadHeader("proxy header cannot contain spaces"));
    }
    let did = &value[..hash];
    if crate::atp::syntax::Did::new(did).is_err() {
        return Err(ProxyError::BadHeader("invalid did in proxy header"));
    }
    Ok((did, &value[hash..]))
}

/// The endpoint of service `id` (`#bsky_appview`) in a DID document; entries
/// may name it relatively or with the full DID.
pub fn service_endpoint(doc: &Value, did: &str, id: &str) -> Option<String> {
    doc.get("service")?.as_array()?.iter().find_map(|s| {
        let sid = s.get("id")?.as_str()?;
        if sid == id || sid.strip_prefix(did) == Some(id) {
            s.get("serviceEndpoint")?.as_str().map(str::to_owned)
        } else {
            None
        }
    })
}

/// An HTTP client for untrusted destinations: public addresses only (unless
/// disabled for tests), no redirects, bounded time.
pub fn outbound_client(config: &ProxyConfig) -> anyhow::Result<reqwest::Client> {
    Ok(crate::net::client_builder(!config.disable_ssrf_protection)
        .read_timeout(Duration::from_secs(config.timeout_secs))
        .build()?)
}

/// Checks a URL's scheme and, for IP literals (which skip DNS), the address.
pub fn check_url(url: &str, config: &ProxyConfig, dev_mode: bool) -> Result<reqwest::Url, ProxyError> {
    let parsed = reqwest::Url::parse(url).map_err(|_| ProxyError::Forbidden(format!("invalid url {url}")))?;
    let allow_http = dev_mode || config.disable_ssrf_protection;
    crate::net::check_url(&parsed, allow_http, !config.disable_ssrf_protection).map_err(|refusal| {
        ProxyError::Forbidden(match refusal {
            Refusal::Scheme(other) => format!("scheme {other}"),
            Refusal::NoHost => "no host".into(),
            Refusal::Localhost => "localhost".into(),
            Refusal::Address(ip) => ip.to_string(),
        })
    })?;
    Ok(parsed)
}

const DID_CACHE_ENTRIES: usize = 1024;
const DID_CACHE_TTL: Duration = Duration::from_secs(10 * 60);
/// A DID document is small; anything bigger is not one.
const MAX_DID_DOCUMENT_BYTES: usize = 64 * 1024;

/// Resolves DID documents (did:plc through the configured directory, did:web
/// over HTTPS) with a small TTL cache.
pub struct DidResolver {
    plc: reqwest::Client,
    outbound: reqwest::Client,
    plc_url: String,
    config: ProxyConfig,
    dev_mode: bool,
    cache: Mutex<lru::LruCache<String, (Instant, Arc<Value>)>>,
}

impl DidResolver {
    pub fn new(
        plc: reqwest::Client,
        outbound: reqwest::Client,
        plc_url: String,
        config: ProxyConfig,
        dev_mode: bool,
    ) -> Self {
        let entries = NonZeroUsize::new(DID_CACHE_ENTRIES).unwrap_or(NonZeroUsize::MIN);
        DidResolver {
            plc,
            outbound,
            plc_url,
            config,
            dev_mode,
            cache: Mutex::new(lru::LruCache::new(entries)),
        }
    }

    pub async fn resolve(&self, did: &str) -> Result<Arc<Value>, ProxyError> {
        if let Ok(mut cache) = self.cache.lock()
            && let Some((at, doc)) = cache.get(did)
            && at.elapsed() < DID_CACHE_TTL
        {
            return Ok(doc.clone());
        }
        let doc = Arc::new(self.fetch(did).await?);
        if let Ok(mut cache) = self.cache.lock() {
            cache.put(did.to_owned(), (Instant::now(), doc.clone()));
        }
        Ok(doc)
    }

    async fn fetch(&self, did: &str) -> Result<Value, ProxyError> {
        let (client, url) = if did.starts_with("did:plc:") {
            // The PLC directory is configured by the operator, so it is trusted.
            (&self.plc, format!("{}/{}", self.plc_url, did))
        } else if let Some(rest) = did.strip_prefix("did:web:") {
            if rest.contains(':') {
                return Err(ProxyError::UnresolvableDid); // did:web with a path: not for services
            }
            let host = rest.replace("%3A", ":").replace("%3a", ":");
            let scheme = if self.dev_mode && host.starts_with("localhost") { "http" } else { "https" };
            let url = format!("{scheme}://{host}/.well-known/did.json");
            check_url(&url, &self.config, self.dev_mode)?;
            (&self.outbound, url)
        } else {
            return Err(ProxyError::UnresolvableDid);
        };
        let response =
            crate::telemetry::send(client.get(&url)).await.map_err(|_| ProxyError::UnresolvableDid)?;
        if !response.status().is_success() {
            return Err(ProxyError::UnresolvableDid);
        }
        let body = read_capped(response, MAX_DID_DOCUMENT_BYTES).await.ok_or(ProxyError::UnresolvableDid)?;
        let doc: Value = serde_json::from_slice(&body).map_err(|_| ProxyError::UnresolvableDid)?;
        if doc.get("id").and_then(Value::as_str) != Some(did) {
            return Err(ProxyError::UnresolvableDid);
        }
        Ok(doc)
    }

    /// Resolves an `atproto-proxy` header to a target.
    pub async fn target_for_header(&self, header: &str) -> Result<Target, ProxyError> {
        let (did, service_id) = parse_proxy_header(header)?;
        let doc = self.resolve(did).await?;
        let url = service_endpoint(&doc, did, service_id).ok_or(ProxyError::NoServiceEndpoint)?;
        Ok(Target { url, aud: format!("{did}{service_id}") })
    }
}

/// Reads a response body up to `limit` bytes (`None` past it or on error).
pub async fn read_capped(mut response: reqwest::Response, limit: usize) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    while let Some(chunk) = response.chunk().await.ok()? {
        if out.len() + chunk.len() > limit {
            return None;
        }
        out.extend_from_slice(&chunk);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_header_rules_match_the_reference() {
        assert_eq!(
            parse_proxy_header("did:web:api.bsky.app#bsky_appview").expect("ok"),
            ("did:web:api.bsky.app", "#bsky_appview")
        );
        for (bad, why) in [
            ("#bsky_appview", "no did specified in proxy header"),
            ("did:web:api.bsky.app", "no service id specified in proxy header"),
            ("did:web:api.bsky.app#", "no service id specified in proxy header"),
            ("did:web:x#a#b", "invalid proxy header format"),
            ("did:web:x #a", "proxy header cannot contain spaces"),
            ("notadid#a", "invalid did in proxy header"),
        ] {
            match parse_proxy_header(bad) {
                Err(ProxyError::BadHeader(m)) => assert_eq!(m, why, "{bad}"),
                other => panic!("{bad}: {other:?}"),
            }
        }
    }

    #[test]
    fn service_endpoint_matches_relative_and_absolute_ids() {
        let doc = serde_json::json!({
            "id": "did:web:api.bsky.app",
            "service": [
                {"id": "#bsky_notif", "type": "X", "serviceEndpoint": "https://notif"},
                {"id": "did:web:api.bsky.app#bsky_appview", "type": "Y", "serviceEndpoint": "https://api"},
            ]
        });
        assert_eq!(
            service_endpoint(&doc, "did:web:api.bsky.app", "#bsky_appview").as_deref(),
            Some("https://api")
        );
        assert_eq!(
            service_endpoint(&doc, "did:web:api.bsky.app", "#bsky_notif").as_deref(),
            Some("https://notif")
        );
        assert_eq!(service_endpoint(&doc, "did:web:api.bsky.app", "#nope"), None);
    }

    #[test]
    fn urls_to_private_hosts_are_refused_unless_disabled() {
        let mut config = ProxyConfig::default();
        for url in [
            "https://127.0.0.1/x",
            "https://[::1]/x",
            "https://localhost/x",
            "http://example.com/x",
            "ftp://x/",
        ] {
            assert!(check_url(url, &config, false).is_err(), "{url}");
        }
        assert!(check_url("https://api.bsky.app/xrpc/x", &config, false).is_ok());
        config.disable_ssrf_protection = true;
        assert!(check_url("http://127.0.0.1:1234/x", &config, false).is_ok());
    }

    #[test]
    fn defaults_by_namespace() {
        let svc = |u: &str, d: &str| Some(ServiceEndpoint { url: u.into(), did: d.into() });
        let config = ProxyConfig {
            appview: svc("https://api", "did:web:api"),
            chat: svc("https://chat", "did:web:chat"),
            report: svc("https://mod", "did:plc:mod"),
            moderation: svc("https://ozone", "did:plc:ozone"),
            ..ProxyConfig::default()
        };
        let aud = |nsid: &str| default_target(&config, nsid).map(|t| t.aud);
        assert_eq!(aud("app.bsky.feed.getTimeline").as_deref(), Some("did:web:api"));
        assert_eq!(aud("chat.bsky.convo.listConvos").as_deref(), Some("did:web:chat"));
        assert_eq!(aud("com.atproto.moderation.createReport").as_deref(), Some("did:plc:mod"));
        assert_eq!(aud("tools.ozone.moderation.getRepo").as_deref(), Some("did:plc:ozone"));
        assert_eq!(aud("com.example.nope"), None);
    }
}
