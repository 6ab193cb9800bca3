//! Prometheus metrics of one server instance, served on the admin listener's `/metrics`.
//!
//! Families are `prometheus` vectors labelled by route and service name (never by raw
//! path). A config resolves the handles of its routes and services once, when it is built
//! ([`Metrics::route`], [`Metrics::service`]), so recording a request is a few atomic
//! additions on handles it already holds. Handles of a route that a reload keeps are the
//! same series, so counting goes on; after a reload [`Metrics::retain`] removes the series
//! of routes and services the new config no longer has. Open-stream gauges drop with the
//! stream, even when Pingora's `logging` hook never runs (see `relay::stream`).
//! Services with `affinity` get their own handles ([`Metrics::affinity`]): pins created,
//! requests that found their pin (hits) or not (misses), pins dropped by reason, and the
//! pins held now.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::core::Collector;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use serde_json::{json, Value};

use crate::sse::drain::Outcome;
use crate::sse::CloseReason;

const DURATION_BOUNDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
const LIFETIME_BOUNDS: &[f64] = &[1.0, 10.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0];
const GAP_BOUNDS: &[f64] = &[0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 15.0, 30.0, 60.0, 300.0];

/// Response status classes counted by `streamgate_requests_total`.
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

const ROUTE: &[&str] = &["route", "service"];

/// Every family of one server instance.
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    duration: HistogramVec,
    sse_open: IntGaugeVec,
    sse_opened: IntCounterVec,
    sse_closed: IntCounterVec,
    sse_refused: IntCounterVec,
    sse_resumed: IntCounterVec,
    sse_drained: IntCounterVec,
    sse_events: IntCounterVec,
    sse_bytes: IntCounterVec,
    sse_lifetime: HistogramVec,
    sse_first_event: HistogramVec,
    sse_gap: HistogramVec,
    connect_errors: IntCounterVec,
    timeouts: IntCounterVec,
    pins_created: IntCounterVec,
    pin_hits: IntCounterVec,
    pin_misses: IntCounterVec,
    pins_dropped: IntCounterVec,
    pins: IntGaugeVec,
    config_info: IntGaugeVec,
    config_loaded: IntGauge,
    connections_open: IntGaugeVec,
    connections_refused: IntCounterVec,
    connections_idle: IntCounterVec,
    connections_slow_head: IntCounterVec,
    /// The handles given out, by label set: the dashboard's totals, and what to prune.
    handed: Mutex<Handed>,
}

#[derive(Default)]
struct Handed {
    routes: BTreeMap<(String, String), Arc<RouteMetrics>>,
    services: BTreeMap<String, Arc<ServiceMetrics>>,
    affinity: BTreeMap<String, Arc<AffinityMetrics>>,
    version: Option<String>,
}

/// Why a pin of session affinity was dropped: the `reason` label of
/// `streamgate_affinity_pins_dropped_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinDrop {
    /// A `DELETE` carrying the session was answered 2xx, or the origin cleared the cookie.
    Deleted,
    /// Not used for the affinity's `ttl`.
    Expired,
    /// The least recently used pin, to stay within `max_entries`.
    Evicted,
    /// Its endpoint was down, ejected, or refused this request's connection.
    EndpointDown,
    /// Its endpoint left discovery.
    EndpointLeft,
}

impl PinDrop {
    pub const ALL: [PinDrop; 5] = [
        PinDrop::Deleted,
        PinDrop::Expired,
        PinDrop::Evicted,
        PinDrop::EndpointDown,
        PinDrop::EndpointLeft,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PinDrop::Deleted => "deleted",
            PinDrop::Expired => "expired",
            PinDrop::Evicted => "evicted",
            PinDrop::EndpointDown => "endpoint_down",
            PinDrop::EndpointLeft => "endpoint_left",
        }
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let vec = IntCounterVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| unreachable!("metric {name}: {e}"));
    register(registry, &vec);
    vec
}

fn histogram(
    registry: &Registry,
    name: &str,
    help: &str,
    bounds: &[f64],
    labels: &[&str],
) -> HistogramVec {
    let opts = HistogramOpts::new(name, help).buckets(bounds.to_vec());
    let vec =
        HistogramVec::new(opts, labels).unwrap_or_else(|e| unreachable!("metric {name}: {e}"));
    register(registry, &vec);
    vec
}

fn register<C: Collector + Clone + 'static>(registry: &Registry, collector: &C) {
    if let Err(e) = registry.register(Box::new(collector.clone())) {
        log::error!("metrics: cannot register a family: {e}");
    }
}

impl Metrics {
    pub fn new() -> Self {
        let r = Registry::new();
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            let vec = IntGaugeVec::new(Opts::new(name, help), labels)
                .unwrap_or_else(|e| unreachable!("metric {name}: {e}"));
            register(&r, &vec);
            vec
        };
        let sse_open = gauge_vec(
            "streamgate_sse_streams_open",
            "SSE streams open now.",
            ROUTE,
        );
        let config_info = gauge_vec(
            "streamgate_config_info",
            "The config version being served.",
            &["version"],
        );
        let connections_open = gauge_vec(
            "streamgate_connections_open",
            "Client connections open now, by listener.",
            &["listener"],
        );
        let config_loaded = IntGauge::new(
            "streamgate_config_loaded_timestamp_seconds",
            "When the config was loaded.",
        )
        .unwrap_or_else(|e| unreachable!("metric: {e}"));
        register(&r, &config_loaded);
        Metrics {
            requests: counter(
                &r,
                "streamgate_requests_total",
                "Requests answered, by route, service and status class.",
                &["route", "service", "class"],
            ),
            duration: histogram(
                &r,
                "streamgate_request_duration_seconds",
                "Time from request to the end of the response.",
                DURATION_BOUNDS,
                ROUTE,
            ),
            sse_open,
            sse_opened: counter(
                &r,
                "streamgate_sse_streams_opened_total",
                "SSE streams started.",
                ROUTE,
            ),
            sse_closed: counter(
                &r,
                "streamgate_sse_streams_closed_total",
                "SSE streams ended, by reason.",
                &["route", "service", "reason"],
            ),
            sse_refused: counter(
                &r,
                "streamgate_sse_streams_refused_total",
                "SSE streams refused by a limit (max_connections, per client, rate limits).",
                ROUTE,
            ),
            sse_resumed: counter(
                &r,
                "streamgate_sse_streams_resumed_total",
                "SSE streams continued on another origin connection after their origin failed (resume).",
                ROUTE,
            ),
            sse_drained: counter(
                &r,
                "streamgate_sse_streams_drained_total",
                "SSE streams that were open when a shutdown or upgrade began, by how they ended: \
                 reconnect (a GET stream told to come back), finished (ended by itself within \
                 finish_period), cut (stopped when finish_period ran out).",
                &["route", "service", "outcome"],
            ),
            sse_events: counter(
                &r,
                "streamgate_sse_events_total",
                "SSE events sent to clients.",
                ROUTE,
            ),
            sse_bytes: counter(
                &r,
                "streamgate_sse_bytes_total",
                "SSE body bytes from origins.",
                ROUTE,
            ),
            sse_lifetime: histogram(
                &r,
                "streamgate_sse_stream_duration_seconds",
                "How long SSE streams lasted.",
                LIFETIME_BOUNDS,
                ROUTE,
            ),
            sse_first_event: histogram(
                &r,
                "streamgate_sse_first_event_seconds",
                "Time from the stream's response header to its first event.",
                GAP_BOUNDS,
                ROUTE,
            ),
            sse_gap: histogram(
                &r,
                "streamgate_sse_event_gap_seconds",
                "Time between consecutive events of a stream.",
                GAP_BOUNDS,
                ROUTE,
            ),
            connect_errors: counter(
                &r,
                "streamgate_upstream_connect_errors_total",
                "Failed connections to origins.",
                &["service"],
            ),
            timeouts: counter(
                &r,
                "streamgate_upstream_timeouts_total",
                "Origin connect, read or write timeouts.",
                &["service"],
            ),
            pins_created: counter(
                &r,
                "streamgate_affinity_pins_created_total",
                "Session values pinned to the endpoint that issued them (affinity).",
                &["service"],
            ),
            pin_hits: counter(
                &r,
                "streamgate_affinity_hits_total",
                "Requests carrying a session value that went to its pinned endpoint.",
                &["service"],
            ),
            pin_misses: counter(
                &r,
                "streamgate_affinity_misses_total",
                "Requests carrying a session value that were balanced as usual (no pin, or its endpoint unusable).",
                &["service"],
            ),
            pins_dropped: counter(
                &r,
                "streamgate_affinity_pins_dropped_total",
                "Pins dropped, by reason.",
                &["service", "reason"],
            ),
            pins: gauge_vec(
                "streamgate_affinity_pins",
                "Pins held now.",
                &["service"],
            ),
            config_info,
            config_loaded,
            connections_open,
            connections_refused: counter(
                &r,
                "streamgate_connections_refused_total",
                "Client connections closed as they were accepted because the listener had \
                 max_connections open.",
                &["listener"],
            ),
            connections_idle: counter(
                &r,
                "streamgate_connections_idle_closed_total",
                "Client connections closed because they sent nothing within the listener's \
                 idle_timeout before their first request.",
                &["listener"],
            ),
            connections_slow_head: counter(
                &r,
                "streamgate_connections_slow_head_closed_total",
                "Client connections closed because the head of a request did not arrive \
                 whole within the listener's request_header_timeout.",
                &["listener"],
            ),
            registry: r,
            handed: Mutex::new(Handed::default()),
        }
    }

    fn handed(&self) -> std::sync::MutexGuard<'_, Handed> {
        self.handed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The handles of a route (and the service it sends to); called when a config is
    /// built, never per request.
    pub fn route(&self, route: &str, service: &str) -> Arc<RouteMetrics> {
        let mut handed = self.handed();
        let key = (route.to_string(), service.to_string());
        if let Some(m) = handed.routes.get(&key) {
            return m.clone();
        }
        let l = [route, service];
        let m = Arc::new(RouteMetrics {
            route: route.to_string(),
            service: service.to_string(),
            requests: CLASSES
                .map(|class| self.requests.with_label_values(&[route, service, class])),
            duration: self.duration.with_label_values(&l),
            sse_open: self.sse_open.with_label_values(&l),
            sse_opened: self.sse_opened.with_label_values(&l),
            sse_closed: CloseReason::ALL.map(|r| {
                self.sse_closed
                    .with_label_values(&[route, service, r.as_str()])
            }),
            sse_refused: self.sse_refused.with_label_values(&l),
            sse_resumed: self.sse_resumed.with_label_values(&l),
            sse_drained: Outcome::ALL.map(|o| {
                self.sse_drained
                    .with_label_values(&[route, service, o.as_str()])
            }),
            sse_events: self.sse_events.with_label_values(&l),
            sse_bytes: self.sse_bytes.with_label_values(&l),
            sse_lifetime: self.sse_lifetime.with_label_values(&l),
            sse_first_event: self.sse_first_event.with_label_values(&l),
            sse_gap: self.sse_gap.with_label_values(&l),
        });
        handed.routes.insert(key, m.clone());
        m
    }

    /// The handles of a service; called when a config is built.
    pub fn service(&self, name: &str) -> Arc<ServiceMetrics> {
        let mut handed = self.handed();
        if let Some(m) = handed.services.get(name) {
            return m.clone();
        }
        let m = Arc::new(ServiceMetrics {
            connect_errors: self.connect_errors.with_label_values(&[name]),
            timeouts: self.timeouts.with_label_values(&[name]),
        });
        handed.services.insert(name.to_string(), m.clone());
        m
    }

    /// The affinity handles of a service; called when a config with `affinity` on that
    /// service is built.
    pub fn affinity(&self, service: &str) -> Arc<AffinityMetrics> {
        let mut handed = self.handed();
        if let Some(m) = handed.affinity.get(service) {
            return m.clone();
        }
        let l = [service];
        let m = Arc::new(AffinityMetrics {
            created: self.pins_created.with_label_values(&l),
            hits: self.pin_hits.with_label_values(&l),
            misses: self.pin_misses.with_label_values(&l),
            dropped: PinDrop::ALL
                .map(|r| self.pins_dropped.with_label_values(&[service, r.as_str()])),
            pins: self.pins.with_label_values(&l),
        });
        handed.affinity.insert(service.to_string(), m.clone());
        m
    }

    /// The handles of the listener on `addr`; called when the listening services are built.
    /// Listeners do not change in a running process, so these are never pruned.
    pub fn listener(&self, addr: &str) -> ListenerMetrics {
        let l = [addr];
        ListenerMetrics {
            open: self.connections_open.with_label_values(&l),
            refused: self.connections_refused.with_label_values(&l),
            idle: self.connections_idle.with_label_values(&l),
            slow_head: self.connections_slow_head.with_label_values(&l),
        }
    }

    /// Records the config version being served and when it was loaded.
    pub fn config_loaded(&self, version: &str, unix_seconds: u64) {
        let mut handed = self.handed();
        if let Some(old) = handed.version.replace(version.to_string()) {
            let _ = self.config_info.remove_label_values(&[&old]);
        }
        self.config_info.with_label_values(&[version]).set(1);
        self.config_loaded
            .set(i64::try_from(unix_seconds).unwrap_or(i64::MAX));
    }

    /// Keeps the series of these routes, services and services with affinity, and removes
    /// every other one: called once a reloaded config serves, so a renamed or removed route
    /// stops being exported. Requests still finishing on a removed route record into
    /// handles nobody exports.
    pub fn retain(
        &self,
        routes: &BTreeSet<(String, String)>,
        services: &BTreeSet<String>,
        affinity: &BTreeSet<String>,
    ) {
        let mut handed = self.handed();
        // A route with streams still open on it keeps its series until a reload after they
        // ended: they are still open (and a route added back meanwhile counts them on).
        let gone: Vec<(String, String)> = handed
            .routes
            .iter()
            .filter(|(k, m)| !routes.contains(*k) && m.sse_open_now() <= 0)
            .map(|(k, _)| k.clone())
            .collect();
        for key in gone {
            handed.routes.remove(&key);
            let l = [key.0.as_str(), key.1.as_str()];
            for class in CLASSES {
                let _ = self.requests.remove_label_values(&[l[0], l[1], class]);
            }
            for reason in CloseReason::ALL {
                let _ = self
                    .sse_closed
                    .remove_label_values(&[l[0], l[1], reason.as_str()]);
            }
            for outcome in Outcome::ALL {
                let _ = self
                    .sse_drained
                    .remove_label_values(&[l[0], l[1], outcome.as_str()]);
            }
            let _ = self.duration.remove_label_values(&l);
            let _ = self.sse_open.remove_label_values(&l);
            for vec in [
                &self.sse_opened,
                &self.sse_refused,
                &self.sse_resumed,
                &self.sse_events,
                &self.sse_bytes,
            ] {
                let _ = vec.remove_label_values(&l);
            }
            for vec in [&self.sse_lifetime, &self.sse_first_event, &self.sse_gap] {
                let _ = vec.remove_label_values(&l);
            }
        }
        let gone: Vec<String> = handed
            .services
            .keys()
            .filter(|k| !services.contains(*k))
            .cloned()
            .collect();
        for name in gone {
            handed.services.remove(&name);
            let _ = self.connect_errors.remove_label_values(&[&name]);
            let _ = self.timeouts.remove_label_values(&[&name]);
        }
        let gone: Vec<String> = handed
            .affinity
            .keys()
            .filter(|k| !affinity.contains(*k))
            .cloned()
            .collect();
        for name in gone {
            handed.affinity.remove(&name);
            for vec in [&self.pins_created, &self.pin_hits, &self.pin_misses] {
                let _ = vec.remove_label_values(&[&name]);
            }
            for reason in PinDrop::ALL {
                let _ = self
                    .pins_dropped
                    .remove_label_values(&[&name, reason.as_str()]);
            }
            let _ = self.pins.remove_label_values(&[&name]);
        }
    }

    /// Per-route totals for the dashboard: route, service, open streams, streams opened,
    /// events, bytes, requests.
    pub fn route_summaries(&self) -> Vec<Value> {
        self.handed()
            .routes
            .values()
            .map(|m| {
                json!({
                    "route": m.route,
                    "service": m.service,
                    "open": m.sse_open.get(),
                    "opened": m.sse_opened.get(),
                    "events": m.sse_events.get(),
                    "bytes": m.sse_bytes.get(),
                    "requests": m.requests.iter().map(IntCounter::get).sum::<u64>(),
                })
            })
            .collect()
    }

    /// Every family in the Prometheus text exposition format.
    pub fn render(&self) -> String {
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|e| format!("# metrics could not be encoded: {e}\n"))
    }
}

/// The handles of one listener.
#[derive(Debug)]
pub struct ListenerMetrics {
    /// Client connections open now.
    pub open: IntGauge,
    /// Connections closed at accept: `max_connections` were open.
    pub refused: IntCounter,
    /// Connections closed for sending nothing within `idle_timeout` before a request.
    pub idle: IntCounter,
    /// Connections closed for not sending a request's head within
    /// `request_header_timeout`.
    pub slow_head: IntCounter,
}

/// The handles of one route (and the service it sends to).
#[derive(Debug)]
pub struct RouteMetrics {
    route: String,
    service: String,
    requests: [IntCounter; 5],
    duration: Histogram,
    sse_open: IntGauge,
    sse_opened: IntCounter,
    sse_closed: [IntCounter; CloseReason::ALL.len()],
    sse_refused: IntCounter,
    sse_resumed: IntCounter,
    sse_drained: [IntCounter; 3],
    sse_events: IntCounter,
    sse_bytes: IntCounter,
    sse_lifetime: Histogram,
    sse_first_event: Histogram,
    sse_gap: Histogram,
}

impl RouteMetrics {
    /// One finished request.
    pub fn request(&self, status: u16, duration: Duration) {
        if let Some(class) = (status / 100).checked_sub(1).filter(|c| *c < 5) {
            self.requests[class as usize].inc();
        }
        self.duration.observe(duration.as_secs_f64());
    }

    /// A stream whose origin failed continued from another origin connection.
    pub fn sse_resumed(&self) {
        self.sse_resumed.inc();
    }

    /// A stream open when the drain began ended so.
    pub fn sse_drained(&self, outcome: Outcome) {
        self.sse_drained[outcome as usize].inc();
    }

    /// A stream refused by a limit.
    pub fn sse_refused(&self) {
        self.sse_refused.inc();
    }

    /// `bytes` from the origin that completed `events` events.
    pub fn sse_chunk(&self, bytes: usize, events: u64) {
        self.sse_bytes.inc_by(bytes as u64);
        self.sse_events.inc_by(events);
    }

    /// The first event of a stream, this long after its response header.
    pub fn sse_first_event(&self, after: Duration) {
        self.sse_first_event.observe(after.as_secs_f64());
    }

    /// An event this long after the previous one.
    pub fn sse_gap(&self, gap: Duration) {
        self.sse_gap.observe(gap.as_secs_f64());
    }

    /// A stream started.
    pub fn sse_opened(&self) {
        self.sse_opened.inc();
        self.sse_open.inc();
    }

    /// A stream that lasted `lifetime` ended for `reason`.
    pub fn sse_closed(&self, reason: CloseReason, lifetime: Duration) {
        self.sse_open.dec();
        self.sse_lifetime.observe(lifetime.as_secs_f64());
        self.sse_closed[reason as usize].inc();
    }

    pub fn sse_open_now(&self) -> i64 {
        self.sse_open.get()
    }
}

/// The handles of one service's upstream connections.
#[derive(Debug)]
pub struct ServiceMetrics {
    connect_errors: IntCounter,
    timeouts: IntCounter,
}

impl ServiceMetrics {
    pub fn connect_error(&self) {
        self.connect_errors.inc();
    }

    pub fn timeout(&self) {
        self.timeouts.inc();
    }
}

/// The handles of one service's session affinity.
#[derive(Debug)]
pub struct AffinityMetrics {
    created: IntCounter,
    hits: IntCounter,
    misses: IntCounter,
    dropped: [IntCounter; PinDrop::ALL.len()],
    pins: IntGauge,
}

impl AffinityMetrics {
    /// A session value was pinned.
    pub fn created(&self) {
        self.created.inc();
    }

    /// A request went to its pinned endpoint.
    pub fn hit(&self) {
        self.hits.inc();
    }

    /// A request carrying a session value was balanced as usual.
    pub fn miss(&self) {
        self.misses.inc();
    }

    /// `count` pins were dropped for `reason`.
    pub fn dropped(&self, reason: PinDrop, count: usize) {
        self.dropped[reason as usize].inc_by(count as u64);
    }

    /// The pins held now.
    pub fn set_pins(&self, pins: usize) {
        self.pins.set(i64::try_from(pins).unwrap_or(i64::MAX));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_renders() {
        let metrics = Metrics::new();
        let m = metrics.route("metrics-test \"quoted\"", "svc");
        m.request(200, Duration::from_millis(3));
        m.request(503, Duration::from_millis(30));
        m.sse_opened();
        m.sse_chunk(100, 2);
        assert_eq!(m.sse_open_now(), 1);
        m.sse_closed(CloseReason::ClientClosed, Duration::from_secs(1));
        assert_eq!(m.sse_open_now(), 0);
        let text = metrics.render();
        let l = "route=\"metrics-test \\\"quoted\\\"\",service=\"svc\"";
        assert!(
            text.contains(&format!("streamgate_requests_total{{class=\"2xx\",{l}}} 1")),
            "{text}"
        );
        assert!(text.contains(&format!("streamgate_requests_total{{class=\"5xx\",{l}}} 1")));
        assert!(text.contains(&format!(
            "streamgate_sse_streams_closed_total{{reason=\"client_closed\",{l}}} 1"
        )));
        assert!(text.contains(&format!("streamgate_sse_events_total{{{l}}} 2")));
        assert!(text.contains(&format!(
            "streamgate_request_duration_seconds_bucket{{{l},le=\"0.005\"}} 1"
        )));
    }

    #[test]
    fn retain_removes_the_series_of_routes_a_reload_dropped() {
        let metrics = Metrics::new();
        metrics.route("old", "svc").request(200, Duration::ZERO);
        metrics.route("kept", "svc").request(200, Duration::ZERO);
        metrics.service("svc").timeout();
        metrics.service("gone").timeout();
        metrics.affinity("svc").hit();
        metrics.affinity("gone").hit();
        let routes = BTreeSet::from([("kept".to_string(), "svc".to_string())]);
        let kept = BTreeSet::from(["svc".to_string()]);
        metrics.retain(&routes, &kept, &kept);
        let text = metrics.render();
        assert!(!text.contains("route=\"old\""), "{text}");
        assert!(text.contains("route=\"kept\""), "{text}");
        assert!(!text.contains("service=\"gone\""), "{text}");
        // The kept route counts on in the same series.
        metrics.route("kept", "svc").request(200, Duration::ZERO);
        assert!(metrics
            .render()
            .contains("streamgate_requests_total{class=\"2xx\",route=\"kept\",service=\"svc\"} 2"));
    }

    #[test]
    fn a_dropped_route_with_open_streams_keeps_its_series_until_they_end() {
        let metrics = Metrics::new();
        let old = metrics.route("old", "svc");
        old.sse_opened();
        let (no_routes, none) = (BTreeSet::new(), BTreeSet::new());
        metrics.retain(&no_routes, &none, &none);
        assert!(
            metrics
                .render()
                .contains("streamgate_sse_streams_open{route=\"old\",service=\"svc\"} 1"),
            "{}",
            metrics.render()
        );
        // Added back while the stream is open: the same series, still counting it.
        let again = metrics.route("old", "svc");
        again.sse_opened();
        assert_eq!(old.sse_open_now(), 2);
        old.sse_closed(CloseReason::ClientClosed, Duration::ZERO);
        again.sse_closed(CloseReason::ClientClosed, Duration::ZERO);
        metrics.retain(&no_routes, &none, &none);
        assert!(!metrics.render().contains("route=\"old\""));
    }

    #[test]
    fn the_config_version_is_one_series() {
        let metrics = Metrics::new();
        metrics.config_loaded("a", 1);
        metrics.config_loaded("b", 2);
        let text = metrics.render();
        assert!(!text.contains("version=\"a\""), "{text}");
        assert!(
            text.contains("streamgate_config_info{version=\"b\"} 1"),
            "{text}"
        );
    }
}
