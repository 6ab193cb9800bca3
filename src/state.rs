//! What one server instance owns beyond its config: the registries that outlive reloads.
//!
//! One [`State`] is made for a server (with the first config it loads) and handed, as an
//! `Arc`, to every config built after it, to the proxy, the admin API and the background
//! services. Nothing here is process-wide, so two servers can live in one process (the test
//! suite runs many).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::logging::Throttle;
use crate::metrics::Metrics;
use crate::sse::drain::Drain;
use crate::sse::limits;
use crate::sse::tracker::Tracker;
use crate::upstream::registry::Registry;

/// Most log lines a second about clients' mistakes.
const CLIENT_ERROR_LINES: u32 = 10;

/// The registries of one server instance.
#[derive(Debug)]
pub struct State {
    /// Every metric family; a config resolves its routes' handles here.
    pub metrics: Metrics,
    /// Open event streams (`connection_tracking`).
    pub tracker: Arc<Tracker>,
    /// Open-stream counters of `max_connections` limits, by name.
    pub limits: limits::Registry,
    /// Every service's endpoints, kept across reloads.
    pub endpoints: Arc<Registry>,
    /// Set when the process starts to shut down or hand over.
    pub drain: Arc<Drain>,
    /// Requests being served now (an event stream counts until it ends): a shutting-down
    /// process exits as soon as this is zero.
    pub in_flight: Arc<InFlight>,
    /// Bounds the log lines about clients' mistakes (malformed bodies and the like).
    pub client_errors: Throttle,
}

/// A count of requests being served.
#[derive(Debug, Default)]
pub struct InFlight(AtomicUsize);

impl InFlight {
    /// Counts one request until the returned guard drops.
    pub fn enter(self: &Arc<Self>) -> InFlightGuard {
        self.0.fetch_add(1, Ordering::AcqRel);
        InFlightGuard(self.clone())
    }

    pub fn count(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }
}

/// One request in flight.
#[derive(Debug)]
pub struct InFlightGuard(Arc<InFlight>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0 .0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl State {
    pub fn new() -> Arc<State> {
        let tracker = Arc::new(Tracker::default());
        Arc::new(State {
            metrics: Metrics::new(),
            endpoints: Arc::new(Registry::new(tracker.clone())),
            tracker,
            limits: limits::Registry::default(),
            drain: Arc::new(Drain::default()),
            in_flight: Arc::new(InFlight::default()),
            client_errors: Throttle::new(CLIENT_ERROR_LINES),
        })
    }
}
