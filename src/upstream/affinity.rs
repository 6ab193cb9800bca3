//! Session affinity learned from responses: a session value an origin issues (in a header,
//! such as MCP's `Mcp-Session-Id`, or in a cookie) is pinned to the endpoint that issued
//! it, and later requests carrying that value go to that endpoint.
//!
//! ```yaml
//! affinity: { header: Mcp-Session-Id, ttl: 30m, max_entries: 100000 }
//! affinity: { cookie: SESSIONID }          # the session cookie's name instead
//! ```
//!
//! ```text
//! request carrying the value  pinned endpoint up, not ejected, and not refused by this
//!                             request?  yes -> that endpoint (a hit)
//!                                       no  -> balanced as usual, the pin dropped (a miss)
//!                             no pin        -> balanced as usual (a miss)
//! response carrying a value   pinned to the endpoint that sent it (again: its use is
//!                             refreshed)
//! DELETE answered 2xx         the request's pin dropped (MCP ends sessions this way); so is
//!                             a Set-Cookie that empties the cookie or sets Max-Age=0
//! connect failure             a pinned request moves to another endpoint only when its
//!                             endpoint refused the connection (see `Attempts`)
//! ```
//!
//! The table ([`Pins`]) is keyed by a 64-bit SipHash of the value under a random key of
//! the table's own (the value itself is not kept); values over [`MAX_VALUE`] bytes are
//! neither pinned nor looked up. A pin holds its endpoint's address and when it was last
//! used. Pins not used for `ttl` are forgotten (at the latest on the next upkeep tick), and
//! the table holds at most `max_entries`, dropping the least recently used: about
//! [`BYTES_PER_PIN`] bytes each. The table belongs to the service's endpoint set (see
//! [`super::endpoints`]), so it survives reloads that keep the set, and the registry hands
//! it to the new set when the endpoint settings change; pins whose endpoint is gone are
//! dropped when they are next used, or when discovery removes that endpoint.
//!
//! Two values that hash alike (about one chance in 2^64 per pair) share a pin: the second
//! session's requests go where the first's do, and its origin answers as for an unknown
//! session. No lock is held across an await.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::fmt;
use std::hash::BuildHasher;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use http::header::SET_COOKIE;
use http::{HeaderName, Method};
use lru::LruCache;
use pingora_http::{RequestHeader, ResponseHeader};
use serde::Deserialize;

use super::endpoints::{Endpoints, Lease, Unavailable};
use crate::metrics::{AffinityMetrics, PinDrop};
use crate::values::Dur;

/// The longest session value that is pinned; longer ones are balanced as usual.
pub const MAX_VALUE: usize = 256;

/// Default `ttl`: how long a pin lives without being used.
pub const DEFAULT_TTL: Duration = Duration::from_secs(30 * 60);

/// Default `max_entries`.
pub const DEFAULT_MAX_ENTRIES: usize = 100_000;

/// Heap bytes one pin takes at most: its LRU node (key, address, time, two links: 72
/// bytes, an 80-byte chunk for glibc's malloc) and its share of the table's hash index (17
/// bytes a slot, filled to between 7/16 and 7/8). Measured by `tests/affinity_memory.rs`:
/// 102 bytes a pin with 100,000 pins, 119 just after the index grew (57,345 pins).
pub const BYTES_PER_PIN: usize = 120;

/// `affinity:` of a service, as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AffinityRaw {
    #[serde(default)]
    header: Option<SessionHeader>,
    #[serde(default)]
    cookie: Option<CookieName>,
    #[serde(default)]
    ttl: Option<Dur>,
    #[serde(default)]
    max_entries: Option<NonZeroUsize>,
}

/// `affinity:` of a service: where the session value is, how long an unused pin lives
/// (`0`: until evicted) and how many pins the table holds.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "AffinityRaw")]
pub struct AffinityFile {
    pub source: SessionSource,
    pub ttl: Option<Duration>,
    pub max_entries: usize,
}

impl TryFrom<AffinityRaw> for AffinityFile {
    type Error = String;

    fn try_from(raw: AffinityRaw) -> Result<Self, String> {
        let source = match (raw.header, raw.cookie) {
            (Some(SessionHeader(name)), None) => SessionSource::Header(name),
            (None, Some(CookieName(name))) => SessionSource::Cookie(name),
            (None, None) => {
                return Err(
                    "give where the session value is: `header: NAME` or `cookie: NAME`".into(),
                )
            }
            (Some(_), Some(_)) => {
                return Err("give either `header` or `cookie`, not both".into());
            }
        };
        Ok(AffinityFile {
            source,
            ttl: raw.ttl.map_or(Some(DEFAULT_TTL), Dur::limit),
            max_entries: raw
                .max_entries
                .map_or(DEFAULT_MAX_ENTRIES, NonZeroUsize::get),
        })
    }
}

/// Where a request and a response carry the session value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionSource {
    /// A header, the same on requests and responses (`Mcp-Session-Id`).
    Header(HeaderName),
    /// A cookie: `Set-Cookie` on responses, `Cookie` on requests.
    Cookie(String),
}

impl fmt::Display for SessionSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SessionSource::Header(name) => write!(f, "header {name}"),
            SessionSource::Cookie(name) => write!(f, "cookie {name}"),
        }
    }
}

/// `affinity.header`: a header name.
struct SessionHeader(HeaderName);

impl<'de> Deserialize<'de> for SessionHeader {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        HeaderName::from_bytes(raw.trim().as_bytes())
            .map(SessionHeader)
            .map_err(|_| serde::de::Error::custom(format!("`{raw}` is not a header name")))
    }
}

/// `affinity.cookie`: a cookie name (an HTTP token).
struct CookieName(String);

impl<'de> Deserialize<'de> for CookieName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        let name = raw.trim();
        let token = |b: u8| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b);
        if name.is_empty() || !name.bytes().all(token) {
            return Err(serde::de::Error::custom(format!(
                "`{raw}` is not a cookie name"
            )));
        }
        Ok(CookieName(name.to_string()))
    }
}

impl AffinityFile {
    /// The affinity of a service whose metrics handles are `metrics`.
    pub fn build(&self, metrics: Arc<AffinityMetrics>) -> Affinity {
        Affinity {
            source: self.source.clone(),
            ttl: self.ttl,
            max_entries: self.max_entries,
            metrics,
        }
    }
}

/// A service's affinity settings in one config (the pins themselves are the endpoint
/// set's: [`Endpoints::pins`]).
#[derive(Debug, Clone)]
pub struct Affinity {
    pub source: SessionSource,
    /// `None`: pins live until evicted.
    pub ttl: Option<Duration>,
    pub max_entries: usize,
    metrics: Arc<AffinityMetrics>,
}

impl fmt::Display for Affinity {
    /// One line for `streamgate -t`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}, ", self.source)?;
        match self.ttl {
            Some(ttl) => write!(f, "ttl {}", humantime::format_duration(ttl))?,
            None => f.write_str("no ttl")?,
        }
        let mib = self.max_entries.saturating_mul(BYTES_PER_PIN) as f64 / (1024.0 * 1024.0);
        write!(
            f,
            ", at most {} pins (up to {mib:.1} MiB)",
            self.max_entries
        )
    }
}

/// What a response says about its session.
#[derive(Debug, PartialEq, Eq)]
enum Issued<'a> {
    Value(&'a [u8]),
    /// The session cookie was emptied or expired.
    Cleared,
}

impl Affinity {
    /// The session value a request carries, if any (and short enough to pin).
    pub fn session<'a>(&self, req: &'a RequestHeader) -> Option<&'a [u8]> {
        let value = match &self.source {
            SessionSource::Header(name) => req.headers.get(name)?.as_bytes(),
            SessionSource::Cookie(name) => crate::http_util::request_cookie(req, name)?,
        };
        usable(value)
    }

    /// What a response says about its session: a value, or that the cookie was cleared.
    fn issued<'a>(&self, resp: &'a ResponseHeader) -> Option<Issued<'a>> {
        match &self.source {
            SessionSource::Header(name) => {
                usable(resp.headers.get(name)?.as_bytes()).map(Issued::Value)
            }
            SessionSource::Cookie(name) => resp
                .headers
                .get_all(SET_COOKIE)
                .iter()
                .find_map(|v| set_cookie(v.as_bytes(), name)),
        }
    }

    /// Chooses an endpoint for a request carrying session `value`: its pinned endpoint
    /// when that is up, not ejected and not in `refused`; else as `endpoints` balance
    /// (`key`, `tried`), and the pin is dropped.
    pub async fn choose(
        &self,
        endpoints: &Endpoints,
        value: &[u8],
        key: &[u8],
        tried: &[SocketAddr],
        refused: &[SocketAddr],
    ) -> Result<Lease, Unavailable> {
        let pins = endpoints.pins();
        let pinned = pins.lookup(self, value);
        let usable = pinned.filter(|addr| !refused.contains(addr));
        let chosen = endpoints.choose_pinned(key, tried, usable).await;
        match (&chosen, pinned) {
            (Ok(lease), Some(_)) if lease.pinned() => self.metrics.hit(),
            (_, pinned) => {
                self.metrics.miss();
                if let Some(addr) = pinned {
                    let reason = if endpoints.is_member(addr) {
                        PinDrop::EndpointDown
                    } else {
                        PinDrop::EndpointLeft
                    };
                    pins.unpin(self, value, reason);
                }
            }
        }
        chosen
    }

    /// Learns from the response header `resp` to `req`, which endpoint `from` sent: a
    /// session value it issued is pinned to it; a session it ended is unpinned.
    pub fn learn(&self, pins: &Pins, req: &RequestHeader, resp: &ResponseHeader, from: SocketAddr) {
        let ended = req.method == Method::DELETE && resp.status.is_success();
        let ended = ended || self.issued(resp) == Some(Issued::Cleared);
        if ended {
            if let Some(value) = self.session(req) {
                pins.unpin(self, value, PinDrop::Deleted);
            }
        } else if let Some(Issued::Value(value)) = self.issued(resp) {
            pins.pin(self, value, from);
        }
    }
}

/// `value` when it can be pinned: not empty, at most [`MAX_VALUE`] bytes.
fn usable(value: &[u8]) -> Option<&[u8]> {
    (!value.is_empty() && value.len() <= MAX_VALUE).then_some(value)
}

/// Cookie `name` in one `Set-Cookie` value: its value, or `Cleared` when the value is
/// empty or `Max-Age` is zero or less.
fn set_cookie<'a>(header: &'a [u8], name: &str) -> Option<Issued<'a>> {
    let mut parts = header.split(|b| *b == b';');
    let pair = parts.next()?.trim_ascii();
    let at = pair.iter().position(|b| *b == b'=')?;
    if pair[..at].trim_ascii() != name.as_bytes() {
        return None;
    }
    let value = pair[at + 1..].trim_ascii();
    let expired = parts.any(|attribute| {
        let attribute = attribute.trim_ascii();
        attribute.len() > 8
            && attribute[..8].eq_ignore_ascii_case(b"max-age=")
            && std::str::from_utf8(&attribute[8..])
                .ok()
                .and_then(|s| s.trim().parse::<i64>().ok())
                .is_some_and(|age| age <= 0)
    });
    if value.is_empty() || expired {
        return Some(Issued::Cleared);
    }
    usable(value).map(Issued::Value)
}

/// A session value's endpoint.
#[derive(Debug, Clone, Copy)]
struct Pin {
    addr: SocketAddr,
    used: Instant,
}

/// The pins of one service: session value (hashed) -> endpoint, least recently used first
/// out. Shared across reloads with the endpoint set.
pub struct Pins {
    hasher: RandomState,
    table: Mutex<Table>,
    /// The pins held, readable without the lock.
    len: AtomicUsize,
}

/// The table and the settings of the config that used it last.
struct Table {
    lru: LruCache<u64, Pin>,
    per_endpoint: HashMap<SocketAddr, usize>,
    ttl: Option<Duration>,
    max_entries: usize,
    metrics: Option<Arc<AffinityMetrics>>,
}

impl fmt::Debug for Pins {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pins")
            .field("len", &self.len())
            .finish_non_exhaustive()
    }
}

impl Default for Pins {
    fn default() -> Self {
        Pins::new()
    }
}

impl Pins {
    /// An empty table (it allocates nothing until the first pin).
    pub fn new() -> Self {
        Pins {
            hasher: RandomState::new(),
            table: Mutex::new(Table {
                lru: LruCache::unbounded(),
                per_endpoint: HashMap::new(),
                ttl: None,
                max_entries: usize::MAX,
                metrics: None,
            }),
            len: AtomicUsize::new(0),
        }
    }

    /// The table, following `affinity`'s settings from now on (those of the config that
    /// serves the request at hand).
    fn table(&self, affinity: Option<&Affinity>) -> MutexGuard<'_, Table> {
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(a) = affinity {
            table.ttl = a.ttl;
            table.max_entries = a.max_entries;
            if !table
                .metrics
                .as_ref()
                .is_some_and(|m| Arc::ptr_eq(m, &a.metrics))
            {
                table.metrics = Some(a.metrics.clone());
            }
        }
        table
    }

    fn key(&self, value: &[u8]) -> u64 {
        self.hasher.hash_one(value)
    }

    /// The endpoint `value` is pinned to, if its pin has not expired; the pin counts as
    /// used now.
    fn lookup(&self, affinity: &Affinity, value: &[u8]) -> Option<SocketAddr> {
        let key = self.key(value);
        let now = Instant::now();
        let mut table = self.table(Some(affinity));
        table.expire(now);
        table.trim();
        self.settle(&table);
        let pin = table.lru.get_mut(&key)?;
        pin.used = now;
        Some(pin.addr)
    }

    /// Pins `value` to `addr` (again, or anew).
    fn pin(&self, affinity: &Affinity, value: &[u8], addr: SocketAddr) {
        let key = self.key(value);
        let now = Instant::now();
        let mut table = self.table(Some(affinity));
        table.expire(now);
        let before = table.lru.put(key, Pin { addr, used: now });
        match before {
            Some(pin) if pin.addr == addr => {}
            Some(pin) => {
                table.count(pin.addr, false);
                table.count(addr, true);
                table.record(|m| m.created());
            }
            None => {
                table.count(addr, true);
                table.record(|m| m.created());
            }
        }
        table.trim();
        self.settle(&table);
    }

    /// Drops the pin of `value`, if there is one.
    fn unpin(&self, affinity: &Affinity, value: &[u8], reason: PinDrop) {
        let key = self.key(value);
        let mut table = self.table(Some(affinity));
        if let Some(pin) = table.lru.pop(&key) {
            table.count(pin.addr, false);
            table.record(|m| m.dropped(reason, 1));
        }
        self.settle(&table);
    }

    /// Drops the pins to endpoints that left discovery.
    pub fn forget_endpoints(&self, gone: &[SocketAddr]) {
        if self.is_empty() {
            return;
        }
        let mut table = self.table(None);
        if !gone.iter().any(|a| table.per_endpoint.contains_key(a)) {
            return;
        }
        let before = table.lru.len();
        table.lru.retain(|_, pin| !gone.contains(&pin.addr));
        for addr in gone {
            table.per_endpoint.remove(addr);
        }
        let dropped = before - table.lru.len();
        table.record(|m| m.dropped(PinDrop::EndpointLeft, dropped));
        self.settle(&table);
    }

    /// Forgets the pins not used for the ttl (the upkeep task calls this every tick).
    pub fn sweep(&self) {
        if self.is_empty() {
            return;
        }
        let mut table = self.table(None);
        table.expire(Instant::now());
        self.settle(&table);
    }

    /// The pins held.
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The pins to `addr`.
    pub fn count(&self, addr: SocketAddr) -> usize {
        if self.is_empty() {
            return 0;
        }
        let table = self.table(None);
        table.per_endpoint.get(&addr).copied().unwrap_or(0)
    }

    fn settle(&self, table: &Table) {
        let len = table.lru.len();
        self.len.store(len, Ordering::Relaxed);
        table.record(|m| m.set_pins(len));
    }
}

impl Table {
    fn record(&self, what: impl FnOnce(&AffinityMetrics)) {
        if let Some(metrics) = &self.metrics {
            what(metrics);
        }
    }

    /// One pin more (`true`) or fewer to `addr`.
    fn count(&mut self, addr: SocketAddr, more: bool) {
        if more {
            *self.per_endpoint.entry(addr).or_default() += 1;
        } else if let Some(n) = self.per_endpoint.get_mut(&addr) {
            *n -= 1;
            if *n == 0 {
                self.per_endpoint.remove(&addr);
            }
        }
    }

    /// Drops the pins not used for the ttl. The LRU order is the order of last use, so
    /// they are all at its end.
    fn expire(&mut self, now: Instant) {
        let Some(ttl) = self.ttl else { return };
        let mut expired = 0;
        while let Some((_, pin)) = self.lru.peek_lru() {
            if now.saturating_duration_since(pin.used) <= ttl {
                break;
            }
            let addr = pin.addr;
            self.lru.pop_lru();
            self.count(addr, false);
            expired += 1;
        }
        if expired > 0 {
            self.record(|m| m.dropped(PinDrop::Expired, expired));
        }
    }

    /// Drops the least recently used pins beyond `max_entries`.
    fn trim(&mut self) {
        let mut evicted = 0;
        while self.lru.len() > self.max_entries {
            let Some((_, pin)) = self.lru.pop_lru() else {
                break;
            };
            self.count(pin.addr, false);
            evicted += 1;
        }
        if evicted > 0 {
            self.record(|m| m.dropped(PinDrop::Evicted, evicted));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn affinity(yaml: &str, metrics: &Metrics) -> Affinity {
        let file: AffinityFile = serde_yaml::from_str(yaml).expect("affinity parses");
        file.build(metrics.affinity("svc"))
    }

    fn request(method: &str, headers: &[(&str, &str)]) -> RequestHeader {
        let mut req = RequestHeader::build(method, b"/mcp", None).expect("request");
        for (k, v) in headers {
            req.append_header(k.to_string(), *v).expect("header");
        }
        req
    }

    fn response(status: u16, headers: &[(&str, &str)]) -> ResponseHeader {
        let mut resp = ResponseHeader::build(status, None).expect("response");
        for (k, v) in headers {
            resp.append_header(k.to_string(), *v).expect("header");
        }
        resp
    }

    #[test]
    fn settings_parse_with_defaults_and_refuse_nonsense() {
        let file: AffinityFile = serde_yaml::from_str("header: Mcp-Session-Id").expect("parses");
        assert_eq!(
            file.source,
            SessionSource::Header(HeaderName::from_static("mcp-session-id"))
        );
        assert_eq!(file.ttl, Some(DEFAULT_TTL));
        assert_eq!(file.max_entries, DEFAULT_MAX_ENTRIES);
        let file: AffinityFile =
            serde_yaml::from_str("{ cookie: sid, ttl: 0, max_entries: 5 }").expect("parses");
        assert_eq!(file.source, SessionSource::Cookie("sid".into()));
        assert_eq!((file.ttl, file.max_entries), (None, 5));
        for bad in [
            "{}",
            "{ header: a, cookie: b }",
            "{ header: \"bad name\" }",
            "{ cookie: \"a;b\" }",
            "{ header: a, max_entries: 0 }",
            "{ header: a, tll: 1m }",
        ] {
            assert!(
                serde_yaml::from_str::<AffinityFile>(bad).is_err(),
                "{bad} should be refused"
            );
        }
    }

    #[test]
    fn set_cookie_values_and_clears() {
        let v = |h: &'static str| set_cookie(h.as_bytes(), "sid");
        assert_eq!(v("sid=abc; Path=/; HttpOnly"), Some(Issued::Value(b"abc")));
        assert_eq!(v("other=abc"), None);
        assert_eq!(v("sid=; Path=/"), Some(Issued::Cleared));
        assert_eq!(v("sid=abc; max-age=0"), Some(Issued::Cleared));
        assert_eq!(v("sid=abc; Max-Age=3600"), Some(Issued::Value(b"abc")));
        let long = format!("sid={}", "x".repeat(MAX_VALUE + 1));
        assert_eq!(set_cookie(long.as_bytes(), "sid"), None);
    }

    #[test]
    fn responses_pin_and_deletes_unpin() {
        let metrics = Metrics::new();
        let a = affinity("header: Mcp-Session-Id", &metrics);
        let pins = Pins::new();
        let init = request("POST", &[]);
        a.learn(
            &pins,
            &init,
            &response(200, &[("mcp-session-id", "s1")]),
            addr(1),
        );
        a.learn(
            &pins,
            &init,
            &response(200, &[("mcp-session-id", "s2")]),
            addr(2),
        );
        a.learn(&pins, &init, &response(200, &[]), addr(2));
        assert_eq!(
            (pins.len(), pins.count(addr(1)), pins.count(addr(2))),
            (2, 1, 1)
        );
        assert_eq!(pins.lookup(&a, b"s1"), Some(addr(1)));
        assert_eq!(pins.lookup(&a, b"s3"), None);

        let with_s1 = |method| request(method, &[("Mcp-Session-Id", "s1")]);
        a.learn(&pins, &with_s1("DELETE"), &response(404, &[]), addr(1));
        assert_eq!(pins.len(), 2, "a DELETE that failed ends nothing");
        a.learn(&pins, &with_s1("DELETE"), &response(204, &[]), addr(1));
        assert_eq!(pins.lookup(&a, b"s1"), None);
        assert_eq!((pins.len(), pins.count(addr(1))), (1, 0));
        let text = metrics.render();
        assert!(text.contains("streamgate_affinity_pins_created_total{service=\"svc\"} 2"));
        assert!(text.contains(
            "streamgate_affinity_pins_dropped_total{reason=\"deleted\",service=\"svc\"} 1"
        ));
        assert!(
            text.contains("streamgate_affinity_pins{service=\"svc\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn cookies_pin_and_a_cleared_cookie_unpins() {
        let metrics = Metrics::new();
        let a = affinity("cookie: sid", &metrics);
        let pins = Pins::new();
        let set = response(
            200,
            &[
                ("set-cookie", "theme=dark"),
                ("set-cookie", "sid=c1; Path=/"),
            ],
        );
        a.learn(&pins, &request("POST", &[]), &set, addr(1));
        let later = request("GET", &[("cookie", "theme=dark; sid=c1")]);
        assert_eq!(a.session(&later), Some(&b"c1"[..]));
        assert_eq!(pins.lookup(&a, b"c1"), Some(addr(1)));
        let logout = response(200, &[("set-cookie", "sid=; Max-Age=0")]);
        a.learn(&pins, &later, &logout, addr(1));
        assert!(pins.is_empty());
    }

    #[test]
    fn the_bound_holds_and_the_least_recently_used_go_first() {
        let metrics = Metrics::new();
        let a = affinity("{ header: s, max_entries: 100 }", &metrics);
        let pins = Pins::new();
        let from = request("POST", &[]);
        for i in 0..1000 {
            let value = format!("session-{i}");
            a.learn(
                &pins,
                &from,
                &response(200, &[("s", &value)]),
                addr(1 + i % 2),
            );
            // Session 0 stays in use, so it is never the least recently used.
            assert_eq!(pins.lookup(&a, b"session-0"), Some(addr(1)));
            assert!(pins.len() <= 100);
        }
        assert_eq!(pins.len(), 100);
        assert_eq!(pins.count(addr(1)) + pins.count(addr(2)), 100);
        assert_eq!(pins.lookup(&a, b"session-999"), Some(addr(2)));
        assert_eq!(pins.lookup(&a, b"session-1"), None);
        assert!(metrics.render().contains(
            "streamgate_affinity_pins_dropped_total{reason=\"evicted\",service=\"svc\"} 900"
        ));
    }

    #[test]
    fn unused_pins_expire() {
        let metrics = Metrics::new();
        let a = affinity("{ header: s, ttl: 1ms }", &metrics);
        let pins = Pins::new();
        a.learn(
            &pins,
            &request("POST", &[]),
            &response(200, &[("s", "x")]),
            addr(1),
        );
        std::thread::sleep(Duration::from_millis(5));
        pins.sweep();
        assert!(pins.is_empty());
        assert_eq!(pins.count(addr(1)), 0);
        assert!(metrics.render().contains(
            "streamgate_affinity_pins_dropped_total{reason=\"expired\",service=\"svc\"} 1"
        ));
    }

    #[test]
    fn endpoints_that_leave_take_their_pins() {
        let metrics = Metrics::new();
        let a = affinity("header: s", &metrics);
        let pins = Pins::new();
        for (value, port) in [("a", 1), ("b", 2), ("c", 1)] {
            a.learn(
                &pins,
                &request("POST", &[]),
                &response(200, &[("s", value)]),
                addr(port),
            );
        }
        pins.forget_endpoints(&[addr(1)]);
        assert_eq!(
            (pins.len(), pins.count(addr(1)), pins.count(addr(2))),
            (1, 0, 1)
        );
        assert_eq!(pins.lookup(&a, b"b"), Some(addr(2)));
    }

    #[test]
    fn long_or_empty_values_are_not_pinned() {
        let metrics = Metrics::new();
        let a = affinity("header: s", &metrics);
        let pins = Pins::new();
        let long = "x".repeat(MAX_VALUE + 1);
        for value in [long.as_str(), ""] {
            a.learn(
                &pins,
                &request("POST", &[]),
                &response(200, &[("s", value)]),
                addr(1),
            );
            assert_eq!(a.session(&request("GET", &[("s", value)])), None);
        }
        assert!(pins.is_empty());
    }
}
