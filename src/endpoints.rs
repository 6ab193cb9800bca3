//! A service's endpoints: a live set kept up to date by discovery and active health checks,
//! and the choice of one per request.
//!
//! Membership and active health are Pingora's (`pingora_load_balancing::Backends` with a
//! `ServiceDiscovery` and a `TcpHealthCheck`/`HttpHealthCheck`). On top of that, per
//! endpoint, streamgate keeps what Pingora does not: how many requests and streams are open
//! on it (for `least_connections`, which is what spreads long-lived SSE streams evenly) and
//! its passive health (consecutive failures, and the moment its ejection ends).
//!
//! Choosing:
//!
//! ```text
//! candidates = current members that are healthy (active), not ejected (passive), and not
//!              already tried by this request
//! none left  -> 503 naming the service, at once (no connect timeout is waited for)
//! algorithm  -> round_robin | weighted_round_robin | random (weighted) |
//!               least_connections (ties rotate) | consistent_hash (Ketama, falls through
//!               to the next node on the ring)
//! ```
//!
//! The choice is a [`Lease`]: the endpoint counts as open until the lease drops.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use once_cell::sync::Lazy;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use pingora_ketama::{Bucket, Continuum};
use pingora_load_balancing::discovery::ServiceDiscovery;
use pingora_load_balancing::health_check::HealthCheck;
use pingora_load_balancing::{Backend, Backends};

/// How an endpoint is chosen: `services.<name>.load_balancing`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    RoundRobin,
    WeightedRoundRobin,
    Random,
    LeastConnections,
    ConsistentHash,
}

impl Algorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::RoundRobin => "round_robin",
            Algorithm::WeightedRoundRobin => "weighted_round_robin",
            Algorithm::Random => "random",
            Algorithm::LeastConnections => "least_connections",
            Algorithm::ConsistentHash => "consistent_hash",
        }
    }
}

/// Passive health: `failures` consecutive failures eject an endpoint for `cooldown`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PassiveHealth {
    pub failures: u32,
    pub cooldown: Duration,
}

/// Why no endpoint could be chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unavailable {
    /// Discovery has not produced any endpoint (yet, or its source is empty or failing).
    NoEndpoints(String),
    /// Every endpoint is down (active checks) or ejected (passive checks).
    AllDown,
    /// Every endpoint that is up has been tried by this request.
    Exhausted,
}

/// What streamgate tracks per endpoint.
#[derive(Debug)]
pub struct EndpointState {
    pub addr: SocketAddr,
    /// Requests and streams open on it now.
    open: AtomicUsize,
    /// Consecutive failures (passive health).
    failures: AtomicU32,
    /// Milliseconds after [`EPOCH`] when its ejection ends; 0: not ejected.
    ejected_until: AtomicU64,
    /// Requests sent to it in total.
    chosen: AtomicU64,
}

static EPOCH: Lazy<Instant> = Lazy::new(Instant::now);

/// Points a weight unit gets on pingora-ketama's ring (its `POINT_MULTIPLE`).
const RING_POINTS_PER_WEIGHT: usize = 160;

/// While discovery has never succeeded, requests retry it at most this often.
const FIRST_DISCOVERY_RETRY: Duration = Duration::from_secs(1);

fn now_ms() -> u64 {
    EPOCH.elapsed().as_millis() as u64
}

impl EndpointState {
    fn new(addr: SocketAddr) -> Self {
        EndpointState {
            addr,
            open: AtomicUsize::new(0),
            failures: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            chosen: AtomicU64::new(0),
        }
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    pub fn chosen(&self) -> u64 {
        self.chosen.load(Ordering::Relaxed)
    }

    pub fn ejected(&self) -> bool {
        self.ejected_until.load(Ordering::Relaxed) > now_ms()
    }
}

/// An endpoint chosen for one request: counted open until dropped.
#[derive(Debug)]
pub struct Lease {
    pub addr: SocketAddr,
    state: Arc<EndpointState>,
    passive: Option<PassiveHealth>,
}

impl Lease {
    /// The origin failed this request (connect failure, timeout, broken response): counts
    /// toward passive ejection.
    pub fn failed(&self) {
        let Some(passive) = self.passive else { return };
        let failures = self.state.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures >= passive.failures {
            let until = now_ms() + passive.cooldown.as_millis() as u64;
            self.state.ejected_until.store(until, Ordering::Relaxed);
            self.state.failures.store(0, Ordering::Relaxed);
            log::warn!(
                "endpoint {} ejected for {} after {failures} consecutive failures",
                self.addr,
                humantime::format_duration(passive.cooldown)
            );
        }
    }

    /// The origin answered: its failure count starts over.
    pub fn succeeded(&self) {
        self.state.failures.store(0, Ordering::Relaxed);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.state.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What is derived from one membership: the members in order, the weighted schedule and
/// the hash ring.
struct Schedule {
    /// The membership this was built from (compared by pointer).
    members: Arc<BTreeSet<Backend>>,
    list: Vec<(Backend, Arc<EndpointState>)>,
    /// Indices into `list`, each repeated by its weight (interleaved).
    weighted: Vec<usize>,
    ring: Option<Continuum>,
}

/// How discovery and checks are scheduled.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Re-run discovery this often; `None`: once (static lists).
    pub refresh: Option<Duration>,
    /// Run active health checks this often; `None`: no active checks.
    pub health_interval: Option<Duration>,
}

/// A service's endpoints.
pub struct Endpoints {
    service: String,
    backends: Backends,
    algorithm: Algorithm,
    passive: Option<PassiveHealth>,
    timing: Timing,
    schedule: ArcSwap<Schedule>,
    cursor: AtomicUsize,
    states: Mutex<HashMap<SocketAddr, Arc<EndpointState>>>,
    /// Discovery has produced a set at least once.
    discovered: AtomicBool,
    last_error: Mutex<Option<String>>,
    next_refresh: Mutex<Instant>,
    next_check: Mutex<Instant>,
    refreshing: tokio::sync::Mutex<()>,
    checking: AtomicBool,
    /// A file source's change signal, taken by the background task.
    watch: Mutex<Option<crate::discovery::FileWatch>>,
    /// Requests waiting for the first discovery queue here.
    first: tokio::sync::Mutex<()>,
    last_attempt: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for Endpoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoints")
            .field("service", &self.service)
            .field("algorithm", &self.algorithm)
            .field("members", &self.backends.get_backend().len())
            .finish()
    }
}

impl Endpoints {
    pub fn new(
        service: &str,
        discovery: Box<dyn ServiceDiscovery + Send + Sync>,
        health_check: Option<Box<dyn HealthCheck + Send + Sync>>,
        algorithm: Algorithm,
        passive: Option<PassiveHealth>,
        timing: Timing,
    ) -> Self {
        let mut backends = Backends::new(discovery);
        if let Some(check) = health_check {
            backends.set_health_check(check);
        }
        let empty = Schedule {
            members: backends.get_backend(),
            list: Vec::new(),
            weighted: Vec::new(),
            ring: None,
        };
        Endpoints {
            service: service.to_string(),
            backends,
            algorithm,
            passive,
            timing,
            schedule: ArcSwap::from_pointee(empty),
            cursor: AtomicUsize::new(0),
            states: Mutex::new(HashMap::new()),
            discovered: AtomicBool::new(false),
            last_error: Mutex::new(None),
            next_refresh: Mutex::new(Instant::now()),
            next_check: Mutex::new(Instant::now()),
            refreshing: tokio::sync::Mutex::new(()),
            checking: AtomicBool::new(false),
            watch: Mutex::new(None),
            first: tokio::sync::Mutex::new(()),
            last_attempt: Mutex::new(None),
        }
    }

    /// Re-runs discovery whenever `watch` signals a change (as well as every `refresh`).
    pub fn set_watch(&mut self, watch: Option<crate::discovery::FileWatch>) {
        self.watch = Mutex::new(watch);
    }

    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// Runs active health checks this often (`None`: none), the first right away.
    pub fn set_health_interval(&mut self, every: Option<Duration>) {
        self.timing.health_interval = every;
    }

    /// Runs discovery now. A failure keeps the last good set (and is logged, and reported
    /// by [`Endpoints::choose`] while no set was ever found).
    pub async fn refresh(&self) {
        let _one_at_a_time = self.refreshing.lock().await;
        let before = self.backends.get_backend();
        match self.backends.update(|_| {}).await {
            Ok(()) => {
                self.end_streams_of_removed(&before);
                self.discovered.store(true, Ordering::Release);
                if let Ok(mut e) = self.last_error.lock() {
                    if e.take().is_some() {
                        log::info!("service `{}`: discovery works again", self.service);
                    }
                }
            }
            Err(e) => {
                let message = e.to_string();
                log::warn!(
                    "service `{}`: discovery failed ({message}); keeping the last set of {} endpoint(s)",
                    self.service,
                    self.backends.get_backend().len()
                );
                if let Ok(mut last) = self.last_error.lock() {
                    *last = Some(message);
                }
            }
        }
        if let Some(every) = self.timing.refresh {
            if let Ok(mut next) = self.next_refresh.lock() {
                *next = Instant::now() + every;
            }
        }
    }

    /// Tracked event streams to endpoints that discovery removed end at their next event
    /// boundary with a `retry:` hint (reason `drain`), so their clients come back to the
    /// endpoints that remain; untracked ones run until they end by themselves.
    fn end_streams_of_removed(&self, before: &BTreeSet<Backend>) {
        let after = self.backends.get_backend();
        let removed: Vec<SocketAddr> = before
            .iter()
            .filter(|b| !after.iter().any(|a| a.addr == b.addr))
            .filter_map(|b| b.addr.as_inet().copied())
            .collect();
        if removed.is_empty() {
            return;
        }
        log::info!(
            "service `{}`: endpoint(s) {} left discovery",
            self.service,
            removed
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        for entry in crate::sse::tracker::TRACKER.snapshot() {
            let on_removed = entry.upstream().is_some_and(|u| removed.contains(&u));
            if on_removed && entry.info.service == self.service {
                entry.request_end("drain");
            }
        }
    }

    /// Discovery for a request that found no set yet: one lookup at a time, and while it
    /// keeps failing at most one a second (the others answer with the last error).
    async fn first_discovery(&self) {
        let _one_at_a_time = self.first.lock().await;
        if self.discovered.load(Ordering::Acquire) {
            return;
        }
        let recent = self
            .last_attempt
            .lock()
            .ok()
            .and_then(|t| *t)
            .is_some_and(|t| t.elapsed() < FIRST_DISCOVERY_RETRY);
        if recent {
            return;
        }
        if let Ok(mut t) = self.last_attempt.lock() {
            *t = Some(Instant::now());
        }
        self.refresh().await;
    }

    /// One pass of active health checks.
    pub async fn check_health(&self) {
        self.backends.run_health_check(true).await;
    }

    /// What the background task should run now: discovery, health checks.
    fn due(&self) -> (bool, bool) {
        let now = Instant::now();
        let refresh = self.timing.refresh.is_some()
            && self.next_refresh.lock().is_ok_and(|next| *next <= now);
        let check = self.timing.health_interval.is_some_and(|every| {
            self.next_check.lock().is_ok_and(|mut next| {
                let due = *next <= now;
                if due {
                    *next = now + every;
                }
                due
            })
        });
        (refresh, check)
    }

    /// The schedule for the current membership, rebuilt when it changed.
    fn schedule(&self) -> Arc<Schedule> {
        let current = self.schedule.load_full();
        let members = self.backends.get_backend();
        if Arc::ptr_eq(&current.members, &members) {
            return current;
        }
        let mut states = lock(&self.states);
        let mut list = Vec::with_capacity(members.len());
        for backend in members.iter() {
            let Some(addr) = backend.addr.as_inet().copied() else {
                continue;
            };
            let state = states
                .entry(addr)
                .or_insert_with(|| Arc::new(EndpointState::new(addr)))
                .clone();
            list.push((backend.clone(), state));
        }
        // Keep the state of endpoints that left while leases on them are open.
        states.retain(|addr, state| {
            Arc::strong_count(state) > 1 || list.iter().any(|(_, s)| s.addr == *addr)
        });
        drop(states);
        let weighted = interleave(&list.iter().map(|(b, _)| b.weight).collect::<Vec<_>>());
        let ring = (self.algorithm == Algorithm::ConsistentHash).then(|| {
            let buckets: Vec<Bucket> = list
                .iter()
                .map(|(b, s)| Bucket::new(s.addr, b.weight.clamp(1, u32::MAX as usize) as u32))
                .collect();
            Continuum::new(&buckets)
        });
        let built = Arc::new(Schedule {
            members,
            list,
            weighted,
            ring,
        });
        self.schedule.store(built.clone());
        built
    }

    /// The current endpoints with their state, for the admin API and `streamgate upstreams`.
    pub fn snapshot(&self) -> Vec<EndpointView> {
        let schedule = self.schedule();
        schedule
            .list
            .iter()
            .map(|(backend, state)| EndpointView {
                addr: state.addr,
                weight: backend.weight,
                healthy: self.backends.ready(backend),
                ejected: state.ejected(),
                open: state.open(),
                chosen: state.chosen(),
            })
            .collect()
    }

    /// The last discovery error, while it keeps failing.
    pub fn discovery_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|e| e.clone())
    }

    /// Chooses an endpoint for a request. `key` is the consistent-hash input; `tried` are
    /// the endpoints this request already failed on (retries go elsewhere).
    pub async fn choose(&self, key: &[u8], tried: &[SocketAddr]) -> Result<Lease, Unavailable> {
        if !self.discovered.load(Ordering::Acquire) {
            self.first_discovery().await;
        }
        let schedule = self.schedule();
        if schedule.list.is_empty() {
            let why = self
                .discovery_error()
                .unwrap_or_else(|| "discovery found no endpoint".to_string());
            return Err(Unavailable::NoEndpoints(why));
        }
        let up = |i: usize| {
            let (backend, state) = &schedule.list[i];
            self.backends.ready(backend) && !state.ejected()
        };
        let usable = |i: usize| up(i) && !tried.contains(&schedule.list[i].1.addr);
        if !(0..schedule.list.len()).any(up) {
            return Err(Unavailable::AllDown);
        }
        let n = schedule.list.len();
        let turn = self.cursor.fetch_add(1, Ordering::Relaxed);
        let chosen = match self.algorithm {
            Algorithm::RoundRobin => (0..n).map(|k| (turn + k) % n).find(|&i| usable(i)),
            Algorithm::WeightedRoundRobin => {
                let w = &schedule.weighted;
                (0..w.len())
                    .map(|k| w[(turn + k) % w.len()])
                    .find(|&i| usable(i))
            }
            Algorithm::Random => {
                let total: usize = (0..n)
                    .filter(|&i| usable(i))
                    .map(|i| schedule.list[i].0.weight.max(1))
                    .sum();
                if total == 0 {
                    None
                } else {
                    let mut pick = fastrand::usize(0..total);
                    (0..n).filter(|&i| usable(i)).find(|&i| {
                        let w = schedule.list[i].0.weight.max(1);
                        if pick < w {
                            true
                        } else {
                            pick -= w;
                            false
                        }
                    })
                }
            }
            Algorithm::LeastConnections => (0..n)
                .map(|k| (turn + k) % n)
                .filter(|&i| usable(i))
                .min_by_key(|&i| schedule.list[i].1.open()),
            Algorithm::ConsistentHash => schedule.ring.as_ref().and_then(|ring| {
                // The ring's iterator wraps around forever: one lap is enough.
                let points: usize = schedule.list.iter().map(|(b, _)| b.weight.max(1)).sum();
                ring.node_iter(key)
                    .take(points.saturating_mul(RING_POINTS_PER_WEIGHT))
                    .find_map(|addr| {
                        (0..n).find(|&i| schedule.list[i].1.addr == *addr && usable(i))
                    })
            }),
        };
        let Some(i) = chosen else {
            return Err(Unavailable::Exhausted);
        };
        let state = schedule.list[i].1.clone();
        state.open.fetch_add(1, Ordering::Relaxed);
        state.chosen.fetch_add(1, Ordering::Relaxed);
        Ok(Lease {
            addr: state.addr,
            state,
            passive: self.passive,
        })
    }
}

/// One endpoint as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointView {
    pub addr: SocketAddr,
    pub weight: usize,
    /// Up by the active checks (always, without them).
    pub healthy: bool,
    /// Ejected by the passive checks.
    pub ejected: bool,
    pub open: usize,
    pub chosen: u64,
}

/// Indices `0..weights.len()` each repeated `weight` times, spread out (smooth weighted
/// round robin, as nginx does it), so a heavy endpoint does not take its turns in a row.
fn interleave(weights: &[usize]) -> Vec<usize> {
    let weights: Vec<i64> = weights.iter().map(|w| (*w).clamp(1, 1000) as i64).collect();
    let total: i64 = weights.iter().sum();
    let mut current = vec![0i64; weights.len()];
    let mut out = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for i in 0..weights.len() {
            current[i] += weights[i];
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        out.push(best);
    }
    out
}

/// Every service's endpoints, so a reload that leaves a service's endpoint settings alone
/// keeps its set, its health and its open counts, and so the background task can reach
/// them.
static REGISTRY: Lazy<Mutex<HashMap<String, Registered>>> =
    Lazy::new(|| Mutex::new(HashMap::new()));

/// A service's endpoints in the registry, with the fingerprint of their settings.
type Registered = (String, Weak<Endpoints>);

/// The endpoints of service `name` whose endpoint settings print as `fingerprint`: the
/// live ones when a previous config had the same, else new ones from `build`.
pub fn shared(
    name: &str,
    fingerprint: String,
    build: impl FnOnce() -> Result<Endpoints, String>,
) -> Result<Arc<Endpoints>, String> {
    let mut registry = lock(&REGISTRY);
    if let Some((print, weak)) = registry.get(name) {
        if *print == fingerprint {
            if let Some(live) = weak.upgrade() {
                return Ok(live);
            }
        }
    }
    let endpoints = Arc::new(build()?);
    registry.insert(name.to_string(), (fingerprint, Arc::downgrade(&endpoints)));
    Ok(endpoints)
}

fn live() -> Vec<Arc<Endpoints>> {
    let mut registry = lock(&REGISTRY);
    registry.retain(|_, (_, weak)| weak.strong_count() > 0);
    registry.values().filter_map(|(_, w)| w.upgrade()).collect()
}

/// Locks `m`; a panic elsewhere while it was held leaves plain data, still usable.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// How often the background task looks at what is due.
const TICK: Duration = Duration::from_millis(100);

/// The background task: re-runs discovery and active health checks when they are due, for
/// every service of the current config (and of older ones still serving requests).
pub struct Upkeep;

#[async_trait]
impl BackgroundService for Upkeep {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tick.tick() => {}
            }
            for endpoints in live() {
                let watch = endpoints.watch.lock().ok().and_then(|mut w| w.take());
                if let Some(mut watch) = watch {
                    let weak = Arc::downgrade(&endpoints);
                    tokio::spawn(async move {
                        while watch.changed().await {
                            let Some(endpoints) = weak.upgrade() else {
                                return;
                            };
                            endpoints.refresh().await;
                        }
                    });
                }
                let (refresh, check) = endpoints.due();
                if refresh && endpoints.refreshing.try_lock().is_ok() {
                    let e = endpoints.clone();
                    tokio::spawn(async move { e.refresh().await });
                }
                if check && !endpoints.checking.swap(true, Ordering::AcqRel) {
                    let e = endpoints.clone();
                    tokio::spawn(async move {
                        e.check_health().await;
                        e.checking.store(false, Ordering::Release);
                    });
                }
            }
        }
    }
}

/// Static discovery from a list of `(address, weight)`.
pub fn static_discovery(list: &[(SocketAddr, usize)]) -> Box<dyn ServiceDiscovery + Send + Sync> {
    let backends: BTreeSet<Backend> = list
        .iter()
        .map(|(addr, weight)| Backend {
            addr: pingora_core::protocols::l4::socket::SocketAddr::Inet(*addr),
            weight: *weight,
            ext: http::Extensions::new(),
        })
        .collect();
    pingora_load_balancing::discovery::Static::new(backends)
}

/// Discovery of a service URL's host name through the system resolver (`url:` with a
/// name), refreshed every few seconds.
pub struct SystemResolver {
    pub host: String,
    pub port: u16,
}

#[async_trait]
impl ServiceDiscovery for SystemResolver {
    async fn discover(&self) -> pingora_error::Result<(BTreeSet<Backend>, HashMap<u64, bool>)> {
        let addrs = tokio::net::lookup_host((self.host.as_str(), self.port))
            .await
            .map_err(|e| {
                pingora_error::Error::explain(
                    pingora_error::ErrorType::ConnectNoRoute,
                    format!("cannot resolve `{}`: {e}", self.host),
                )
            })?;
        let backends: BTreeSet<Backend> = addrs
            .map(|addr| Backend {
                addr: pingora_core::protocols::l4::socket::SocketAddr::Inet(addr),
                weight: 1,
                ext: http::Extensions::new(),
            })
            .collect();
        if backends.is_empty() {
            return Err(pingora_error::Error::explain(
                pingora_error::ErrorType::ConnectNoRoute,
                format!("`{}` resolves to no address", self.host),
            ));
        }
        Ok((backends, HashMap::new()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn endpoints(list: &[(u16, usize)], algorithm: Algorithm) -> Endpoints {
        let list: Vec<_> = list.iter().map(|(p, w)| (addr(*p), *w)).collect();
        Endpoints::new(
            "t",
            static_discovery(&list),
            None,
            algorithm,
            Some(PassiveHealth {
                failures: 2,
                cooldown: Duration::from_secs(60),
            }),
            Timing {
                refresh: None,
                health_interval: None,
            },
        )
    }

    #[test]
    fn interleave_spreads_weights() {
        assert_eq!(interleave(&[1, 1]), vec![0, 1]);
        assert_eq!(interleave(&[3, 1]), vec![0, 0, 1, 0]);
        let five = interleave(&[5, 1, 1]);
        assert_eq!(five, vec![0, 0, 1, 0, 2, 0, 0], "nginx's order");
    }

    #[tokio::test]
    async fn each_algorithm_distributes() {
        let rr = endpoints(&[(1, 1), (2, 1), (3, 1)], Algorithm::RoundRobin);
        let mut seen = Vec::new();
        for _ in 0..6 {
            seen.push(rr.choose(b"", &[]).await.expect("lease").addr.port());
        }
        assert_eq!(seen, vec![1, 2, 3, 1, 2, 3]);

        let wrr = endpoints(&[(1, 3), (2, 1)], Algorithm::WeightedRoundRobin);
        let mut ones = 0;
        for _ in 0..400 {
            if wrr.choose(b"", &[]).await.expect("lease").addr.port() == 1 {
                ones += 1;
            }
        }
        assert_eq!(ones, 300);

        let lc = endpoints(&[(1, 1), (2, 1)], Algorithm::LeastConnections);
        let a = lc.choose(b"", &[]).await.expect("lease");
        let b = lc.choose(b"", &[]).await.expect("lease");
        assert_ne!(a.addr, b.addr);
        drop(a);
        let c = lc.choose(b"", &[]).await.expect("lease");
        assert_ne!(c.addr, b.addr, "the endpoint with fewer open goes next");

        let ch = endpoints(&[(1, 1), (2, 1), (3, 1)], Algorithm::ConsistentHash);
        let first = ch.choose(b"user-7", &[]).await.expect("lease").addr;
        for _ in 0..10 {
            assert_eq!(ch.choose(b"user-7", &[]).await.expect("lease").addr, first);
        }
    }

    #[tokio::test]
    async fn consistent_hash_with_every_endpoint_tried_is_exhausted() {
        let ch = endpoints(&[(1, 1)], Algorithm::ConsistentHash);
        let only = ch.choose(b"k", &[]).await.expect("lease");
        assert_eq!(
            ch.choose(b"k", &[only.addr]).await.err(),
            Some(Unavailable::Exhausted)
        );
    }

    #[tokio::test]
    async fn retries_skip_tried_and_passive_health_ejects() {
        let e = endpoints(&[(1, 1), (2, 1)], Algorithm::RoundRobin);
        let first = e.choose(b"", &[]).await.expect("lease");
        let second = e.choose(b"", &[first.addr]).await.expect("lease");
        assert_ne!(first.addr, second.addr);
        assert_eq!(
            e.choose(b"", &[first.addr, second.addr]).await.err(),
            Some(Unavailable::Exhausted)
        );
        first.failed();
        first.failed();
        for _ in 0..4 {
            assert_eq!(e.choose(b"", &[]).await.expect("lease").addr, second.addr);
        }
        second.failed();
        second.failed();
        assert_eq!(e.choose(b"", &[]).await.err(), Some(Unavailable::AllDown));
    }
}
