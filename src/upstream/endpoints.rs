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
//! algorithm  -> see [`super::balancing`]
//! ```
//!
//! A request whose session is pinned ([`super::affinity`]) gets its pinned endpoint
//! instead, as long as that endpoint is a member, healthy and not ejected.
//!
//! The choice is a [`Lease`]: the endpoint counts as open until the lease drops.
//!
//! The set also holds the service's affinity pins ([`Pins`]): they live as long as the set
//! (across reloads that keep it), are handed to the next set when a reload changes the
//! endpoint settings, and lose the endpoints discovery removes.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use pingora_load_balancing::discovery::ServiceDiscovery;
use pingora_load_balancing::health_check::HealthCheck;
use pingora_load_balancing::{Backend, Backends};

use super::affinity::Pins;
use super::balancing::{Algorithm, Plan};
use super::discovery::FileWatch;
use super::health::PassiveHealth;
use crate::sse::tracker::Tracker;
use crate::sse::CloseReason;

/// Why no endpoint could be chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unavailable {
    /// Discovery has not produced any endpoint: its source is empty.
    NoEndpoints(String),
    /// Discovery has never produced any endpoint, and its last attempt failed (a host
    /// name that does not resolve, a discovery source that cannot be read): why.
    DiscoveryFailed(String),
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
    /// Milliseconds after `since` when its ejection ends; 0: not ejected.
    ejected_until: AtomicU64,
    /// Requests sent to it in total.
    chosen: AtomicU64,
    since: Instant,
}

/// While discovery has never succeeded, requests retry it at most this often.
const FIRST_DISCOVERY_RETRY: Duration = Duration::from_secs(1);

impl EndpointState {
    fn new(addr: SocketAddr) -> Self {
        EndpointState {
            addr,
            open: AtomicUsize::new(0),
            failures: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            chosen: AtomicU64::new(0),
            since: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.since.elapsed().as_millis() as u64
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    pub fn chosen(&self) -> u64 {
        self.chosen.load(Ordering::Relaxed)
    }

    pub fn ejected(&self) -> bool {
        self.ejected_until.load(Ordering::Relaxed) > self.now_ms()
    }
}

/// An endpoint chosen for one request: counted open until dropped.
#[derive(Debug)]
pub struct Lease {
    pub addr: SocketAddr,
    state: Arc<EndpointState>,
    passive: Option<PassiveHealth>,
    pinned: bool,
}

impl Lease {
    /// Chosen because the request's session is pinned to this endpoint.
    pub fn pinned(&self) -> bool {
        self.pinned
    }

    /// The origin failed this request (connect failure, timeout, broken response): counts
    /// toward passive ejection.
    pub fn failed(&self) {
        let Some(passive) = self.passive else { return };
        let failures = self.state.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures >= passive.failures {
            let until = self.state.now_ms() + passive.cooldown.as_millis() as u64;
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

/// What is derived from one membership: the members in order with their state, and the
/// balancing plan.
struct Schedule {
    /// The membership this was built from (compared by pointer).
    members: Arc<BTreeSet<Backend>>,
    list: Vec<(Backend, Arc<EndpointState>)>,
    plan: Plan,
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
    watch: Mutex<Option<FileWatch>>,
    /// Requests waiting for the first discovery queue here.
    first: tokio::sync::Mutex<()>,
    last_attempt: Mutex<Option<Instant>>,
    /// Where tracked streams are ended when their endpoint leaves discovery.
    tracker: Option<Arc<Tracker>>,
    /// Session affinity: which endpoint each pinned session goes to.
    pins: Arc<Pins>,
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
            plan: Plan::new(algorithm, Vec::new()),
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
            tracker: None,
            pins: Arc::new(Pins::new()),
        }
    }

    /// The affinity pins of the service.
    pub fn pins(&self) -> &Arc<Pins> {
        &self.pins
    }

    /// Takes over the pins of the set this one replaces (a reload changed the endpoint
    /// settings): pins whose endpoints remain keep working; the others are dropped when
    /// next used.
    pub fn adopt_pins(&mut self, pins: Arc<Pins>) {
        self.pins = pins;
    }

    /// Re-runs discovery whenever `watch` signals a change (as well as every `refresh`).
    pub fn set_watch(&mut self, watch: Option<FileWatch>) {
        self.watch = Mutex::new(watch);
    }

    /// Ends tracked streams in `tracker` when their endpoint leaves discovery.
    pub fn set_tracker(&mut self, tracker: Arc<Tracker>) {
        self.tracker = Some(tracker);
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
                // What went wrong, without Pingora's error kind in front of it.
                let message = e
                    .context
                    .as_ref()
                    .map_or_else(|| e.to_string(), |c| c.to_string());
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
        self.pins.forget_endpoints(&removed);
        log::info!(
            "service `{}`: endpoint(s) {} left discovery",
            self.service,
            removed
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        let Some(tracker) = &self.tracker else {
            return;
        };
        for entry in tracker.snapshot() {
            let on_removed = entry.upstream().is_some_and(|u| removed.contains(&u));
            if on_removed && entry.info.service == self.service {
                entry.request_end(CloseReason::Drain);
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

    /// Starts what is due now (the background task calls this every tick): discovery,
    /// active health checks, and the first time, the file source's change watch.
    pub(super) fn upkeep(self: &Arc<Self>) {
        self.pins.sweep();
        let watch = self.watch.lock().ok().and_then(|mut w| w.take());
        if let Some(mut watch) = watch {
            let weak = Arc::downgrade(self);
            tokio::spawn(async move {
                while watch.changed().await {
                    let Some(endpoints) = weak.upgrade() else {
                        return;
                    };
                    endpoints.refresh().await;
                }
            });
        }
        let (refresh, check) = self.due();
        if refresh && self.refreshing.try_lock().is_ok() {
            let e = self.clone();
            tokio::spawn(async move { e.refresh().await });
        }
        if check && !self.checking.swap(true, Ordering::AcqRel) {
            let e = self.clone();
            tokio::spawn(async move {
                e.check_health().await;
                e.checking.store(false, Ordering::Release);
            });
        }
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
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
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
        let plan = Plan::new(
            self.algorithm,
            list.iter().map(|(b, s)| (s.addr, b.weight)).collect(),
        );
        let built = Arc::new(Schedule {
            members,
            list,
            plan,
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
                pins: self.pins.count(state.addr),
            })
            .collect()
    }

    /// Whether `addr` is one of the current endpoints (up or not).
    pub fn is_member(&self, addr: SocketAddr) -> bool {
        self.schedule().list.iter().any(|(_, s)| s.addr == addr)
    }

    /// The last discovery error, while it keeps failing.
    pub fn discovery_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|e| e.clone())
    }

    /// Chooses an endpoint for a request. `key` is the consistent-hash input; `tried` are
    /// the endpoints this request already failed on (retries go elsewhere).
    pub async fn choose(&self, key: &[u8], tried: &[SocketAddr]) -> Result<Lease, Unavailable> {
        self.choose_pinned(key, tried, None).await
    }

    /// [`Endpoints::choose`] for a request whose session is pinned to `pinned`: that
    /// endpoint when it is a member, healthy and not ejected (whether or not it is in
    /// `tried`: the caller decides whether the pin still holds), else as usual.
    pub async fn choose_pinned(
        &self,
        key: &[u8],
        tried: &[SocketAddr],
        pinned: Option<SocketAddr>,
    ) -> Result<Lease, Unavailable> {
        if !self.discovered.load(Ordering::Acquire) {
            self.first_discovery().await;
        }
        let schedule = self.schedule();
        if schedule.list.is_empty() {
            return Err(match self.discovery_error() {
                Some(why) => Unavailable::DiscoveryFailed(why),
                None => Unavailable::NoEndpoints("discovery found no endpoint".to_string()),
            });
        }
        let up = |i: usize| {
            let (backend, state) = &schedule.list[i];
            self.backends.ready(backend) && !state.ejected()
        };
        let usable = |i: usize| up(i) && !tried.contains(&schedule.list[i].1.addr);
        let pinned = pinned
            .and_then(|addr| (0..schedule.list.len()).find(|&i| schedule.list[i].1.addr == addr))
            .filter(|&i| up(i));
        let i = match pinned {
            Some(i) => i,
            None => {
                let turn = self.cursor.fetch_add(1, Ordering::Relaxed);
                let open = |i: usize| schedule.list[i].1.open();
                let chosen = schedule.plan.pick(self.algorithm, turn, key, open, usable);
                // Why none is usable is asked only when none is.
                chosen.ok_or_else(|| {
                    if (0..schedule.list.len()).any(up) {
                        Unavailable::Exhausted
                    } else {
                        Unavailable::AllDown
                    }
                })?
            }
        };
        let state = schedule.list[i].1.clone();
        state.open.fetch_add(1, Ordering::Relaxed);
        state.chosen.fetch_add(1, Ordering::Relaxed);
        Ok(Lease {
            addr: state.addr,
            state,
            passive: self.passive,
            pinned: pinned.is_some(),
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
    /// Sessions pinned to it (affinity).
    pub pins: usize,
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
            super::super::discovery::static_discovery(&list),
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
    async fn a_pinned_endpoint_wins_while_it_is_up() {
        let e = endpoints(&[(1, 1), (2, 1), (3, 1)], Algorithm::RoundRobin);
        for _ in 0..5 {
            let lease = e
                .choose_pinned(b"", &[], Some(addr(2)))
                .await
                .expect("lease");
            assert!(lease.pinned() && lease.addr == addr(2));
        }
        // `tried` is the caller's business for the pin (a resumed stream may go back).
        let lease = e.choose_pinned(b"", &[addr(2)], Some(addr(2))).await;
        assert!(lease.expect("lease").pinned());
        let lease = e
            .choose_pinned(b"", &[], Some(addr(9)))
            .await
            .expect("lease");
        assert!(!lease.pinned(), "not a member: balanced as usual");
        assert!(!e.is_member(addr(9)) && e.is_member(addr(2)));
        lease.failed();
        let pinned = e
            .choose_pinned(b"", &[], Some(addr(2)))
            .await
            .expect("lease");
        pinned.failed();
        pinned.failed();
        let lease = e
            .choose_pinned(b"", &[], Some(addr(2)))
            .await
            .expect("lease");
        assert!(
            !lease.pinned() && lease.addr != addr(2),
            "ejected: elsewhere"
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
