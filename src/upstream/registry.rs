//! Every service's endpoints of one server instance, across reloads, and the background
//! task that keeps them current.
//!
//! A reload that leaves a service's endpoint settings alone keeps its live set, its health
//! and its open counts: [`Registry::shared`] hands the new config the endpoints the old one
//! had. A reload that changes them gets a new set, which takes over the old set's affinity
//! pins. [`Upkeep`] re-runs discovery and active health checks when they are due, for every
//! service of the current config and of older ones still serving requests.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;

use super::affinity::Pins;
use super::endpoints::Endpoints;
use crate::sse::tracker::Tracker;

/// How often the background task looks at what is due.
const TICK: Duration = Duration::from_millis(100);

/// A service's endpoints in the registry, with the fingerprint of their settings, and its
/// affinity pins (which outlive a set that a refused reload built and dropped).
#[derive(Debug)]
struct Registered {
    fingerprint: String,
    endpoints: Weak<Endpoints>,
    pins: Weak<Pins>,
}

/// The endpoints of every service, by name.
#[derive(Debug, Default)]
pub struct Registry {
    services: Mutex<HashMap<String, Registered>>,
    /// The registry of open streams: streams to an endpoint that leaves discovery are ended
    /// through it.
    tracker: Arc<Tracker>,
}

impl Registry {
    pub fn new(tracker: Arc<Tracker>) -> Self {
        Registry {
            services: Mutex::new(HashMap::new()),
            tracker,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Registered>> {
        self.services.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The endpoints of service `name` whose endpoint settings print as `fingerprint`: the
    /// live ones when a previous config had the same, else new ones from `build`.
    pub fn shared(
        &self,
        name: &str,
        fingerprint: String,
        build: impl FnOnce() -> Result<Endpoints, String>,
    ) -> Result<Arc<Endpoints>, String> {
        let mut services = self.lock();
        let previous = services.get(name);
        if let Some(known) = previous.filter(|r| r.fingerprint == fingerprint) {
            if let Some(live) = known.endpoints.upgrade() {
                return Ok(live);
            }
        }
        let pins = previous.and_then(|r| r.pins.upgrade());
        let mut built = build()?;
        built.set_tracker(self.tracker.clone());
        if let Some(pins) = pins {
            built.adopt_pins(pins);
        }
        let endpoints = Arc::new(built);
        let registered = Registered {
            fingerprint,
            endpoints: Arc::downgrade(&endpoints),
            pins: Arc::downgrade(endpoints.pins()),
        };
        services.insert(name.to_string(), registered);
        Ok(endpoints)
    }

    /// The endpoints some config still uses.
    fn live(&self) -> Vec<Arc<Endpoints>> {
        let mut services = self.lock();
        services.retain(|_, r| r.endpoints.strong_count() > 0 || r.pins.strong_count() > 0);
        services
            .values()
            .filter_map(|r| r.endpoints.upgrade())
            .collect()
    }
}

/// The background task: runs what is due (discovery, health checks) for every service.
pub struct Upkeep {
    pub registry: Arc<Registry>,
}

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
            for endpoints in self.registry.live() {
                endpoints.upkeep();
            }
        }
    }
}
