//! Forwarding the XRPC methods Roost does not serve (feeds, notifications,
//! chat, reports…) to the service that does, as the account.
//!
//! The target is the `atproto-proxy` header (`did#service_id`, resolved
//! through the DID document) or the configured default for the method's
//! namespace. Each call carries a service-auth JWT from [`crate::service_auth`].
//! Outbound connections refuse private and loopback addresses (checked after
//! DNS resolution, so a hostname cannot smuggle one in) unless
//! `PDS_DISABLE_SSRF_PROTECTION=true`.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::config::{ProxyConfig, ServiceEndpoint};

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

/// Whether an address is reachable on the public internet. Written out
/// because `IpAddr::is_global` is still unstable; covers the special-purpose
/// ranges an attacker could aim a proxy at.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            !(v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || a == 0
                || (a == 100 && (64..128).contains(&b)) // shared address space (CGNAT)
                || (a == 192 && b == 0 && v4.octets()[2] == 0) // IETF protocol assignments
                || (a == 198 && (b == 18 || b == 19)) // benchmarking
                || a >= 240) // reserved
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00 // unique local
                || (first & 0xffc0) == 0xfe80 // link local
                || first == 0x2001 && v6.segments()[1] == 0x0db8) // documentation
        }
    }
}

/// A DNS resolver for reqwest that drops non-public addresses, so the check
/// applies to the address actually connected to (no rebinding window).
struct PublicOnlyResolver;

impl reqwest::dns::Resolve for PublicOnlyResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let public: Vec<SocketAddr> = addrs.into_iter().filter(|a| is_public(a.ip())).collect();
            if public.is_empty() {
                return Err(format!("{host} resolves to no public address").into());
            }
            Ok(Box::new(public.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// An HTTP client for untrusted destinations: public addresses only (unless
/// disabled for tests), no redirects, bounded time.
pub fn outbound_client(config: &ProxyConfig) -> anyhow::Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder()
        .user_agent(concat!("roost/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(Duration::from_secs(5))
        .read_timeout(Duration::from_secs(config.timeout_secs))
        .redirect(reqwest::redirect::Policy::none());
    if !config.disable_ssrf_protection {
        builder = builder.dns_resolver(Arc::new(PublicOnlyResolver));
    }
    Ok(builder.build()?)
}

/// Checks a URL's scheme and, for IP literals (which skip DNS), the address.
pub fn check_url(url: &str, config: &ProxyConfig, dev_mode: bool) -> Result<reqwest::Url, ProxyError> {
    let parsed = reqwest::Url::parse(url).map_err(|_| ProxyError::Forbidden(format!("invalid url {url}")))?;
    match parsed.scheme() {
        "https" => {}
        "http" if dev_mode || config.disable_ssrf_protection => {}
        other => return Err(ProxyError::Forbidden(format!("scheme {other}"))),
    }
    if !config.disable_ssrf_protection {
        let ip = match parsed.host() {
            Some(url::Host::Ipv4(ip)) => Some(IpAddr::V4(ip)),
            Some(url::Host::Ipv6(ip)) => Some(IpAddr::V6(ip)),
            Some(url::Host::Domain(d)) if d.eq_ignore_ascii_case("localhost") => {
                return Err(ProxyError::Forbidden("localhost".into()));
            }
            Some(url::Host::Domain(_)) => None,
            None => return Err(ProxyError::Forbidden("no host".into())),
        };
        if let Some(ip) = ip.filter(|ip| !is_public(*ip)) {
            return Err(ProxyError::Forbidden(ip.to_string()));
        }
    }
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
    fn private_and_special_addresses_are_not_public() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fc00::1",
            "fd12::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "2001:db8::1",
            "198.18.0.1",
            "240.0.0.1",
        ] {
            assert!(!is_public(ip.parse().expect("ip")), "{ip} must not be public");
        }
        for ip in ["1.1.1.1", "8.8.8.8", "2606:4700:4700::1111", "::ffff:1.1.1.1"] {
            assert!(is_public(ip.parse().expect("ip")), "{ip} is public");
        }
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
