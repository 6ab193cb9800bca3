//! `rate_limit`: requests per second per key, with a burst; `429` with `Retry-After`.
//!
//! ```yaml
//! type: rate_limit
//! config:
//!   rate: 10              # sustained requests per second per key (may be fractional)
//!   burst: 20             # how many may come at once (default: rate, at least 1)
//!   key: client_ip        # or header:X-Api-Key (falls back to the client address)
//!   max_keys: 65536       # most keys with a bucket at once (default 65536)
//! ```
//!
//! A token bucket per key. It runs in the `request` phase, once per request, so for SSE it
//! limits how often streams are opened, never the events of an open stream.
//!
//! The client address is the request's one ([`Context::client`]): the TCP peer, or behind
//! the top-level `trusted_proxies`, the rightmost untrusted address of every
//! `X-Forwarded-For` line, IPv4-mapped addresses as IPv4. A client behind a trusted proxy
//! cannot escape its bucket by adding forged `X-Forwarded-For` values of its own.
//!
//! Memory is bounded whatever clients send: header values are kept as a keyed 64-bit hash
//! (a long or fresh value costs 8 bytes, not its length), and the buckets, in sharded
//! maps, never number more than `max_keys`. A shard that reaches its share first drops its
//! full buckets (a key that comes back gets a full one anyway: nothing is lost); if that
//! is not enough, it drops the buckets used longest ago, down to three quarters of its
//! share, so the sweep runs once per many new keys. A client that picks a fresh key per
//! request therefore cycles through a bounded table; the price is that, while the table
//! is full, a key idle long enough to be dropped starts again with a full burst.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

use http::header::{HeaderName, HeaderValue, RETRY_AFTER};
use pingora_error::Result;
use pingora_proxy::Session;
use serde::Deserialize;

use super::{header_name, Context, Middleware, Outcome, Reply, TrustedProxiesAtTop};

const SHARDS: usize = 16;

/// `max_keys` when the config does not say.
const DEFAULT_MAX_KEYS: usize = 65_536;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub rate: f64,
    #[serde(default)]
    pub burst: Option<u32>,
    #[serde(default = "default_key")]
    pub key: String,
    /// Refused: the top-level key is the only one.
    #[serde(default)]
    pub trusted_proxies: Option<TrustedProxiesAtTop>,
    /// The most keys with a bucket at once.
    #[serde(default)]
    pub max_keys: Option<usize>,
}

fn default_key() -> String {
    "client_ip".into()
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Ip(IpAddr),
    /// A header value's keyed hash.
    Value(u64),
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
    shards: Vec<Mutex<HashMap<Key, Bucket>>>,
    /// Buckets one shard may hold.
    shard_cap: usize,
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
        let max_keys = config.max_keys.unwrap_or(DEFAULT_MAX_KEYS);
        if max_keys < SHARDS {
            return Err(format!("max_keys must be at least {SHARDS}"));
        }
        Ok(RateLimit {
            rate: config.rate,
            burst,
            header,
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            shard_cap: max_keys / SHARDS,
            hasher: Default::default(),
        })
    }

    /// Buckets held now, over all shards.
    #[cfg(test)]
    fn keys(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().map_or(0, |m| m.len()))
            .sum()
    }

    /// Makes room in a full shard: full buckets go first, then the longest unused, down to
    /// three quarters of the cap.
    fn sweep(&self, buckets: &mut HashMap<Key, Bucket>, now: Instant) {
        let (rate, burst) = (self.rate, self.burst);
        buckets.retain(|_, b| {
            b.tokens + now.saturating_duration_since(b.last).as_secs_f64() * rate < burst
        });
        let keep = self.shard_cap - self.shard_cap / 4;
        if buckets.len() <= keep {
            return;
        }
        let mut ages: Vec<Instant> = buckets.values().map(|b| b.last).collect();
        let cut = buckets.len() - keep;
        let (_, oldest_kept, _) = ages.select_nth_unstable(cut);
        let oldest_kept = *oldest_kept;
        buckets.retain(|_, b| b.last >= oldest_kept);
        // Ties at the cut may keep a few more; never more than the cap.
        if buckets.len() >= self.shard_cap {
            let extra: Vec<Key> = buckets.keys().take(buckets.len() - keep).cloned().collect();
            for key in extra {
                buckets.remove(&key);
            }
        }
    }

    /// Takes a token for `key` at `now`; on refusal, the seconds until one is available.
    fn take(&self, key: Key, now: Instant) -> Result<(), u64> {
        let shard = &self.shards[self.hasher.hash_one(&key) as usize % SHARDS];
        let mut buckets = shard.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= self.shard_cap && !buckets.contains_key(&key) {
            self.sweep(&mut buckets, now);
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

impl Middleware for RateLimit {
    fn request(&self, session: &mut Session, ctx: &mut Context) -> Result<Outcome> {
        let by_header = self
            .header
            .as_ref()
            .and_then(|h| session.get_header(h))
            .map(|v| Key::Value(self.hasher.hash_one(v.as_bytes())));
        let key = match by_header {
            Some(k) => k,
            None => match ctx.client {
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
            trusted_proxies: None,
            max_keys: None,
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
        let k = || Key::Value(7);
        assert_eq!(l.take(k(), t0), Ok(()));
        assert_eq!(l.take(k(), t0), Err(10));
    }

    #[test]
    fn a_fresh_key_per_request_keeps_the_table_bounded() {
        let l = RateLimit::new(&Config {
            rate: 0.001,
            burst: Some(5),
            key: default_key(),
            trusted_proxies: None,
            max_keys: Some(1024),
        })
        .expect("limiter");
        let t0 = Instant::now();
        // A slow rate: no bucket refills, so none is ever full and droppable for free.
        for i in 0..20_000u64 {
            let now = t0 + Duration::from_micros(i);
            assert_eq!(l.take(Key::Value(i), now), Ok(()));
            assert!(l.keys() <= 1024, "{} keys after {i}", l.keys());
        }
        // A key in steady use survives the churn: it is never the longest unused.
        let l = limiter(0.001, 2);
        let t0 = Instant::now();
        let steady = || Key::Value(u64::MAX);
        assert_eq!(l.take(steady(), t0), Ok(()));
        for i in 0..200_000u64 {
            let now = t0 + Duration::from_micros(i + 1);
            let _ = l.take(Key::Value(i), now);
            if i % 1000 == 0 {
                let _ = l.take(steady(), now);
            }
        }
        assert!(l.keys() <= DEFAULT_MAX_KEYS);
        assert!(
            l.take(steady(), t0 + Duration::from_secs(1)).is_err(),
            "its bucket was kept, empty"
        );
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
        assert!(bad("rate: 1\nmax_keys: 3"));
        assert!(serde_yaml::from_str::<Config>("rate: 1\ntrusted_proxies: []").is_err());
    }
}
