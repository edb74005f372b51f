//! Request limits like the reference PDS's: requests per IP per five
//! minutes, repository write points per account per hour and per day
//! (create 3, update 2, delete 1) and logins per identifier. Refusals are
//! `429 RateLimitExceeded` with `RateLimit-*` headers (the IETF draft the
//! reference PDS and the official clients use).
//!
//! GCRA through governor: a limit of N per window is a burst of N that
//! refills evenly over the window, so there is no cliff at window edges.

use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue};
use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};

type Keyed<K> = RateLimiter<K, DefaultKeyedStateStore<K>, DefaultClock, StateInformationMiddleware>;

/// One named limit: `max` per `window`, per key.
pub struct Limit<K: Hash + Eq + Clone> {
    name: &'static str,
    max: u32,
    window: Duration,
    limiter: Keyed<K>,
}

/// A refusal, rendered by `XrpcError::rate_limited_by`.
#[derive(Debug, Clone)]
pub struct Exceeded {
    pub name: &'static str,
    pub max: u32,
    pub window: Duration,
    pub retry_after: Duration,
}

impl Exceeded {
    /// `RateLimit-*` headers (and `Retry-After`) for the 429.
    pub fn headers(&self) -> HeaderMap {
        let mut h = HeaderMap::new();
        let reset = crate::db::now_unix() + self.retry_after.as_secs().max(1) as i64;
        let mut put = |name: &'static str, value: String| {
            if let Ok(v) = HeaderValue::from_str(&value) {
                h.insert(name, v);
            }
        };
        put("ratelimit-limit", self.max.to_string());
        put("ratelimit-remaining", "0".into());
        put("ratelimit-reset", reset.to_string());
        put("ratelimit-policy", format!("{};w={}", self.max, self.window.as_secs()));
        put("retry-after", self.retry_after.as_secs().max(1).to_string());
        h
    }
}

impl<K: Hash + Eq + Clone> Limit<K> {
    pub fn new(name: &'static str, max: u32, window: Duration) -> Self {
        let burst = NonZeroU32::new(max).unwrap_or(NonZeroU32::MIN);
        let period = window / burst.get();
        let quota = Quota::with_period(period.max(Duration::from_nanos(1)))
            .unwrap_or_else(|| Quota::per_second(burst))
            .allow_burst(burst);
        Limit {
            name,
            max,
            window,
            limiter: RateLimiter::keyed(quota).with_middleware::<StateInformationMiddleware>(),
        }
    }

    /// Takes `cost` units for `key`, or says when to come back.
    pub fn take(&self, key: &K, cost: u32) -> Result<(), Exceeded> {
        let exceeded = |retry_after| {
            metrics::counter!("roost_rate_limited_total", "limit" => self.name).increment(1);
            Exceeded { name: self.name, max: self.max, window: self.window, retry_after }
        };
        let cost = NonZeroU32::new(cost).unwrap_or(NonZeroU32::MIN);
        match self.limiter.check_key_n(key, cost) {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(not_until)) => Err(exceeded(not_until.wait_time_from(DefaultClock::default().now()))),
            // More than the whole burst at once can never pass.
            Err(_) => Err(exceeded(self.window)),
        }
    }

    /// Forgets keys whose bucket is full again (bounded memory).
    pub fn shrink(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }
}

/// Write costs, as the reference PDS counts them.
pub const CREATE_POINTS: u32 = 3;
pub const UPDATE_POINTS: u32 = 2;
pub const DELETE_POINTS: u32 = 1;

pub struct RateLimits {
    pub enabled: bool,
    pub global: Limit<IpAddr>,
    pub writes_hour: Limit<String>,
    pub writes_day: Limit<String>,
    pub login_5min: Limit<String>,
    pub login_day: Limit<String>,
}

impl RateLimits {
    pub fn new(enabled: bool) -> Self {
        const MINUTE: u64 = 60;
        RateLimits {
            enabled,
            global: Limit::new("global", 3000, Duration::from_secs(5 * MINUTE)),
            writes_hour: Limit::new("repo-write-hour", 5000, Duration::from_secs(60 * MINUTE)),
            writes_day: Limit::new("repo-write-day", 35000, Duration::from_secs(24 * 60 * MINUTE)),
            login_5min: Limit::new("auth-identifier-5min", 30, Duration::from_secs(5 * MINUTE)),
            login_day: Limit::new("auth-identifier-day", 300, Duration::from_secs(24 * 60 * MINUTE)),
        }
    }

    pub fn request(&self, ip: IpAddr) -> Result<(), Exceeded> {
        if !self.enabled {
            return Ok(());
        }
        self.global.take(&ip, 1)
    }

    /// Charges an account's repository writes (both windows).
    pub fn writes(&self, did: &str, points: u32) -> Result<(), Exceeded> {
        if !self.enabled || points == 0 {
            return Ok(());
        }
        let key = did.to_owned();
        self.writes_hour.take(&key, points)?;
        self.writes_day.take(&key, points)
    }

    /// Charges a login attempt against its identifier (both windows).
    pub fn login(&self, identifier: &str) -> Result<(), Exceeded> {
        if !self.enabled {
            return Ok(());
        }
        let key = identifier.to_owned();
        self.login_5min.take(&key, 1)?;
        self.login_day.take(&key, 1)
    }

    pub fn shrink(&self) {
        self.global.shrink();
        self.writes_hour.shrink();
        self.writes_day.shrink();
        self.login_5min.shrink();
        self.login_day.shrink();
    }
}

/// The client's address. With `trusted_proxies` = 0 it is the peer. With N
/// trusted reverse proxies in front (Caddy in the bundle is one), each
/// appended the address it saw to `X-Forwarded-For`, so the client is the
/// N-th entry from the right; entries left of it are the client's own
/// claims and never used. A peer on a public address is a client talking
/// to us directly, so its header is ignored too.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted_proxies: usize) -> IpAddr {
    if trusted_proxies == 0 || crate::net::is_public(peer) {
        return peer;
    }
    let entries: Vec<IpAddr> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|s| s.trim().parse::<IpAddr>().ok())
        .collect();
    entries.len().checked_sub(trusted_proxies).and_then(|i| entries.get(i).copied()).unwrap_or(peer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_limit_refuses_past_its_burst_and_names_itself() {
        let limit: Limit<String> = Limit::new("test", 5, Duration::from_secs(300));
        let key = "k".to_owned();
        for _ in 0..5 {
            limit.take(&key, 1).expect("within the burst");
        }
        let e = limit.take(&key, 1).expect_err("sixth is refused");
        assert_eq!((e.name, e.max), ("test", 5));
        assert!(e.retry_after > Duration::ZERO && e.retry_after <= Duration::from_secs(60), "{e:?}");
        assert_eq!(e.headers()["ratelimit-policy"], "5;w=300");
        limit.take(&"other".to_owned(), 5).expect("keys are independent");
        assert!(limit.take(&"big".to_owned(), 6).is_err(), "a cost above the burst never passes");
    }

    #[test]
    fn forwarded_for_counts_only_behind_a_private_proxy() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("6.6.6.6, 203.0.113.9"));
        let public: IpAddr = "8.8.4.4".parse().expect("ip");
        assert_eq!(client_ip(public, &h, 1), public, "a public peer cannot spoof");
        let caddy: IpAddr = "172.18.0.3".parse().expect("ip");
        assert_eq!(client_ip(caddy, &h, 0), caddy, "no trusted proxy: the header means nothing");
        assert_eq!(client_ip(caddy, &h, 1), "203.0.113.9".parse::<IpAddr>().expect("ip"));
        assert_eq!(client_ip(caddy, &h, 2), "6.6.6.6".parse::<IpAddr>().expect("ip"), "CDN then Caddy");
        assert_eq!(client_ip(caddy, &h, 3), caddy, "fewer entries than proxies: the peer");
        assert_eq!(client_ip(caddy, &HeaderMap::new(), 1), caddy);
    }
}
