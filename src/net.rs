//! The outbound guard: the one place that decides which addresses the server
//! may connect to for URLs it did not choose (proxy targets, `did:web`
//! documents, handle checks, lexicon authorities' PDSes), and the one DNS TXT
//! lookup (handles' `_atproto`, lexicons' `_lexicon`).
//!
//! The check runs in a reqwest DNS resolver, on the addresses actually
//! connected to, so a name cannot pass a check and then resolve elsewhere (no
//! rebinding window). IP-literal hosts never reach the resolver, so
//! [`check_url`] covers them. Whether the guard is on is the caller's choice
//! (`PDS_DISABLE_SSRF_PROTECTION` for the proxy, dev mode for lexicons); this
//! module holds no configuration.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;

/// Whether an address is reachable on the public internet. Written out
/// because `IpAddr::is_global` is still unstable; covers the special-purpose
/// ranges an attacker could aim a request at.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            !(v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || a == 0
                || (a == 100 && (64..128).contains(&b)) // shared address space (CGNAT)
                || (a == 192 && b == 0 && c == 0) // IETF protocol assignments (192.0.0.0/24)
                || (a == 198 && (b == 18 || b == 19)) // benchmarking
                || a >= 240) // reserved
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let [first, second, ..] = v6.segments();
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00 // unique local
                || (first & 0xffc0) == 0xfe80 // link local
                || first == 0x2001 && second == 0x0db8 // documentation
                || first == 0x0064 && second == 0xff9b) // NAT64 can reach private v4
        }
    }
}

/// A DNS resolver for reqwest that drops non-public addresses.
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

/// The common base of every client for untrusted destinations: Roost's user
/// agent, a connect timeout, no redirects (a redirect would be a URL nobody
/// checked) and, when `guard`, the public-only resolver. Callers add their
/// own request timeouts.
pub fn client_builder(guard: bool) -> reqwest::ClientBuilder {
    let builder = reqwest::Client::builder()
        .user_agent(concat!("roost/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(Duration::from_secs(5))
        .redirect(reqwest::redirect::Policy::none());
    if guard { builder.dns_resolver(Arc::new(PublicOnlyResolver)) } else { builder }
}

/// Why [`check_url`] refused a URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    Scheme(String),
    NoHost,
    Localhost,
    Address(IpAddr),
}

/// Checks a URL's scheme (`https`, or `http` when `allow_http`) and, when
/// `guard`, its host: `localhost` and non-public IP literals (which skip DNS,
/// so the resolver never sees them) are refused.
///
/// # Errors
/// The URL is refused, and why.
pub fn check_url(url: &reqwest::Url, allow_http: bool, guard: bool) -> Result<(), Refusal> {
    match url.scheme() {
        "https" => {}
        "http" if allow_http => {}
        other => return Err(Refusal::Scheme(other.to_owned())),
    }
    let ip = match url.host() {
        None => return Err(Refusal::NoHost),
        Some(_) if !guard => return Ok(()),
        Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip),
        Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip),
        Some(url::Host::Domain(d)) if d.eq_ignore_ascii_case("localhost") => return Err(Refusal::Localhost),
        Some(url::Host::Domain(_)) => return Ok(()),
    };
    if is_public(ip) { Ok(()) } else { Err(Refusal::Address(ip)) }
}

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// DNS TXT lookups, behind a trait so tests answer without a DNS server.
pub trait TxtLookup: Send + Sync {
    /// The TXT values at `name`; empty when the name has none.
    fn txt<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Vec<String>, String>>;
}

/// The system's DNS, through hickory (the resolver `/etc/resolv.conf` names).
pub struct HickoryTxt(hickory_resolver::TokioResolver);

impl HickoryTxt {
    /// # Errors
    /// The system DNS configuration cannot be read.
    pub fn from_system() -> anyhow::Result<Self> {
        let resolver = hickory_resolver::TokioResolver::builder_tokio()
            .context("reading the system DNS configuration")?
            .build()
            .context("building the DNS resolver")?;
        Ok(Self(resolver))
    }
}

impl TxtLookup for HickoryTxt {
    fn txt<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Vec<String>, String>> {
        Box::pin(async move {
            match self.0.txt_lookup(name).await {
                Ok(lookup) => Ok(lookup
                    .answers()
                    .iter()
                    .filter_map(|record| match &record.data {
                        hickory_resolver::proto::rr::RData::TXT(txt) => Some(
                            txt.txt_data.iter().map(|part| String::from_utf8_lossy(part)).collect::<String>(),
                        ),
                        _ => None,
                    })
                    .collect()),
                Err(e) if e.is_no_records_found() => Ok(Vec::new()),
                Err(e) => Err(e.to_string()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            "192.0.0.1",
            "192.0.2.1",
            "198.18.0.1",
            "240.0.0.1",
            "::1",
            "::",
            "fc00::1",
            "fd12::1",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "2001:db8::1",
            "64:ff9b::a00:1",
        ] {
            assert!(!is_public(ip.parse().expect("ip")), "{ip} must not be public");
        }
        // 192.0.1.0/24 is ordinary allocated space, next to the special 192.0.0.0/24.
        for ip in
            ["1.1.1.1", "8.8.8.8", "192.0.1.1", "2606:4700:4700::1111", "2606:4700::1111", "::ffff:1.1.1.1"]
        {
            assert!(is_public(ip.parse().expect("ip")), "{ip} is public");
        }
    }
}
