//! `rate_limit`: requests per second per key, with a burst; `429` with `Retry-After`.
//!
//! ```yaml
//! type: rate_limit
//! config:
//!   rate: 10              # sustained requests per second per key (may be fractional)
//!   burst: 20             # how many may come at once (default: rate, at least 1)
//!   key: client_ip        # or header:X-Api-Key (falls back to the client address)
//!   trusted_proxies: []   # as in ip_filter: whose X-Forwarded-For names the client
//! ```
//!
//! A token bucket per key. It runs in the `request` phase, once per request, so for SSE it
//! limits how often streams are opened, never the events of an open stream. Buckets live in
//! sharded maps; full (idle) buckets are dropped when a shard grows large, so memory stays
//! bounded by the number of recently active keys.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

use async_trait::async_trait;
use http::header::{HeaderName, HeaderValue, RETRY_AFTER};
use ipnet::IpNet;
use pingora_error::Result;
use pingora_proxy::Session;
use serde::Deserialize;

use super::{header_name, Context, Middleware, Outcome, Reply};
use crate::http_util::{session_client, Net};

const SHARDS: usize = 16;
/// Above this many buckets a shard drops its full ones.
const SHARD_SWEEP: usize = 4096;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub rate: f64,
    #[serde(default)]
    pub burst: Option<u32>,
    #[serde(default = "default_key")]
    pub key: String,
    #[serde(default)]
    pub trusted_proxies: Vec<Net>,
}

fn default_key() -> String {
    "client_ip".into()
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Ip(IpAddr),
    Value(Vec<u8>),
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

pub struct RateLimit {
    rate: f64,
    burst: f64,
    header: Option<HeaderName>,
    trusted: Vec<IpNet>,
    shards: Vec<Mutex<HashMap<Key, Bucket>>>,
    hasher: std::collections::hash_map::RandomState,
}

impl RateLimit {
    pub fn new(config: &Config) -> Result<Self, String> {
        if !(config.rate.is_finite() && config.rate > 0.0) {
            return Err("rate must be a positive number of requests per second".into());
        }
        let header = match config.key.as_str() {
            "client_ip" => None,
            other => match other.strip_prefix("header:") {
                Some(name) => Some(header_name(name.trim())?),
                None => return Err(format!("key `{other}`: use client_ip or header:NAME")),
            },
        };
        let burst = config
            .burst
            .map_or(config.rate.ceil().max(1.0), |b| f64::from(b.max(1)));
        Ok(RateLimit {
            rate: config.rate,
            burst,
            header,
            trusted: config.trusted_proxies.iter().map(|n| n.0).collect(),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: Default::default(),
        })
    }

    /// Takes a token for `key` at `now`; on refusal, the seconds until one is available.
    fn take(&self, key: Key, now: Instant) -> Result<(), u64> {
        let shard = &self.shards[self.hasher.hash_one(&key) as usize % SHARDS];
        let mut buckets = shard.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() > SHARD_SWEEP {
            let (rate, burst) = (self.rate, self.burst);
            buckets
                .retain(|_, b| b.tokens + now.duration_since(b.last).as_secs_f64() * rate < burst);
        }
        let bucket = buckets.entry(key).or_insert(Bucket {
            tokens: self.burst,
            last: now,
        });
        let elapsed = now.saturating_duration_since(bucket.last).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.rate).min(self.burst);
        bucket.last = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - bucket.tokens) / self.rate).ceil().max(1.0) as u64)
        }
    }
}

#[async_trait]
impl Middleware for RateLimit {
    async fn request(&self, session: &mut Session, _ctx: &mut Context) -> Result<Outcome> {
        let by_header = self
            .header
            .as_ref()
            .and_then(|h| session.get_header(h))
            .map(|v| Key::Value(v.as_bytes().to_vec()));
        let key = match by_header {
            Some(k) => k,
            None => match session_client(session, &self.trusted) {
                Some(ip) => Key::Ip(ip),
                None => return Ok(Outcome::Continue),
            },
        };
        match self.take(key, Instant::now()) {
            Ok(()) => Ok(Outcome::Continue),
            Err(wait) => Ok(Outcome::Respond(
                Reply::text(429, "rate limit exceeded")
                    .with_header(RETRY_AFTER, HeaderValue::from(wait)),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn limiter(rate: f64, burst: u32) -> RateLimit {
        RateLimit::new(&Config {
            rate,
            burst: Some(burst),
            key: default_key(),
            trusted_proxies: Vec::new(),
        })
        .expect("limiter")
    }

    #[test]
    fn burst_then_rate() {
        let l = limiter(2.0, 3);
        let t0 = Instant::now();
        let k = || Key::Ip("192.0.2.1".parse().expect("ip"));
        for _ in 0..3 {
            assert_eq!(l.take(k(), t0), Ok(()));
        }
        assert_eq!(l.take(k(), t0), Err(1));
        // Half a second at 2/s refills one token.
        assert_eq!(l.take(k(), t0 + Duration::from_millis(500)), Ok(()));
        assert!(l.take(k(), t0 + Duration::from_millis(500)).is_err());
        // Other keys have their own bucket.
        assert_eq!(
            l.take(Key::Ip("192.0.2.2".parse().expect("ip")), t0),
            Ok(())
        );
    }

    #[test]
    fn slow_rates_ask_for_longer_waits() {
        let l = limiter(0.1, 1);
        let t0 = Instant::now();
        let k = || Key::Value(b"user".to_vec());
        assert_eq!(l.take(k(), t0), Ok(()));
        assert_eq!(l.take(k(), t0), Err(10));
    }

    #[test]
    fn bad_configs_are_refused() {
        let bad = |yaml: &str| {
            RateLimit::new(&serde_yaml::from_str::<Config>(yaml).expect("parse")).is_err()
        };
        assert!(bad("rate: 0"));
        assert!(bad("rate: -1"));
        assert!(bad("rate: 1\nkey: cookie"));
        assert!(!bad("rate: 1\nkey: header:X-Api-Key"));
    }
}
