//! What one server instance owns beyond its config: the registries that outlive reloads.
//!
//! One [`State`] is made for a server (with the first config it loads) and handed, as an
//! `Arc`, to every config built after it, to the proxy, the admin API and the background
//! services. Nothing here is process-wide, so two servers can live in one process (the test
//! suite runs many).

use std::sync::Arc;

use crate::metrics::Metrics;
use crate::sse::drain::Drain;
use crate::sse::limits;
use crate::sse::tracker::Tracker;
use crate::upstream::registry::Registry;

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
        })
    }
}
