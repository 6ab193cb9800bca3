//! Prometheus metrics, recorded with atomics and rendered in the text exposition format on
//! the admin listener's `/metrics`.
//!
//! Counters are kept per route and service name (never per raw path) in process-wide
//! registries, so a config reload keeps counting. Ordinary requests are recorded once, in
//! Pingora's `logging` hook; SSE counters are updated per chunk with relaxed atomics, and
//! the open-stream gauge is tied to the stream's lifetime (it drops with the request even
//! when `logging` never runs).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use once_cell::sync::Lazy;
use serde_json::{json, Value};

/// Why an SSE stream closed, as counted in `streamgate_sse_streams_closed_total` and
/// logged on close:
/// - `client_closed`: the client went away;
/// - `origin_closed`: the origin finished the stream;
/// - `origin_error`: the origin failed mid-stream (reset, broken framing);
/// - `idle_timeout`: the origin was silent longer than `read_timeout`, or longer than
///   `inactive_threshold` and the cleanup task closed the stream;
/// - `max_lifetime`: the stream reached `max_lifetime` and was ended with a `retry:` hint;
/// - `drain`: the process was shutting down or upgrading and ended the stream with a hint;
/// - `ended`: the admin API ended it;
/// - `error`: anything else (a write to the client timed out, an internal error).
pub const CLOSE_REASONS: &[&str] = &[
    "client_closed",
    "origin_closed",
    "origin_error",
    "idle_timeout",
    "max_lifetime",
    "drain",
    "ended",
    "error",
];

const DURATION_BOUNDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
const LIFETIME_BOUNDS: &[f64] = &[1.0, 10.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0];
const GAP_BOUNDS: &[f64] = &[0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 15.0, 30.0, 60.0, 300.0];

/// A histogram with fixed bucket bounds (seconds).
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    buckets: Vec<AtomicU64>,
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, value: Duration) {
        let secs = value.as_secs_f64();
        if let Some(i) = self.bounds.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.sum_micros
            .fetch_add(value.as_micros() as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        for (bound, bucket) in self.bounds.iter().zip(&self.buckets) {
            cumulative += bucket.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {count}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
    }
}

/// Counters of one route (and the service it sends to).
#[derive(Debug)]
pub struct RouteMetrics {
    route: String,
    service: String,
    /// By status class: 1xx to 5xx.
    requests: [AtomicU64; 5],
    pub duration: Histogram,
    sse_open: AtomicI64,
    sse_opened: AtomicU64,
    sse_closed: [AtomicU64; CLOSE_REASONS.len()],
    sse_refused: AtomicU64,
    sse_resumed: AtomicU64,
    sse_events: AtomicU64,
    sse_bytes: AtomicU64,
    pub sse_lifetime: Histogram,
    pub sse_first_event: Histogram,
    pub sse_gap: Histogram,
}

impl RouteMetrics {
    fn new(route: &str, service: &str) -> Self {
        RouteMetrics {
            route: route.to_string(),
            service: service.to_string(),
            requests: Default::default(),
            duration: Histogram::new(DURATION_BOUNDS),
            sse_open: AtomicI64::new(0),
            sse_opened: AtomicU64::new(0),
            sse_closed: Default::default(),
            sse_refused: AtomicU64::new(0),
            sse_resumed: AtomicU64::new(0),
            sse_events: AtomicU64::new(0),
            sse_bytes: AtomicU64::new(0),
            sse_lifetime: Histogram::new(LIFETIME_BOUNDS),
            sse_first_event: Histogram::new(GAP_BOUNDS),
            sse_gap: Histogram::new(GAP_BOUNDS),
        }
    }

    /// One finished request.
    pub fn request(&self, status: u16, duration: Duration) {
        if let Some(class) = (status / 100).checked_sub(1).filter(|c| *c < 5) {
            self.requests[class as usize].fetch_add(1, Ordering::Relaxed);
        }
        self.duration.observe(duration);
    }

    /// A stream whose origin failed continued from another origin connection.
    pub fn sse_resumed(&self) {
        self.sse_resumed.fetch_add(1, Ordering::Relaxed);
    }

    pub fn sse_refused(&self) {
        self.sse_refused.fetch_add(1, Ordering::Relaxed);
    }

    pub fn sse_chunk(&self, bytes: usize, events: u64) {
        self.sse_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        self.sse_events.fetch_add(events, Ordering::Relaxed);
    }

    /// A stream started: counts it open until the returned gauge drops.
    pub fn sse_opened(self: &Arc<Self>) -> OpenStream {
        self.sse_opened.fetch_add(1, Ordering::Relaxed);
        self.sse_open.fetch_add(1, Ordering::Relaxed);
        OpenStream {
            metrics: self.clone(),
            reason: "error",
            started: std::time::Instant::now(),
        }
    }

    pub fn sse_open_now(&self) -> i64 {
        self.sse_open.load(Ordering::Relaxed)
    }
}

/// Holds a stream in the open-streams gauge; counts its close (with `reason`) on drop.
#[derive(Debug)]
pub struct OpenStream {
    metrics: Arc<RouteMetrics>,
    pub reason: &'static str,
    started: std::time::Instant,
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.metrics.sse_open.fetch_sub(1, Ordering::Relaxed);
        self.metrics.sse_lifetime.observe(self.started.elapsed());
        let i = CLOSE_REASONS
            .iter()
            .position(|r| *r == self.reason)
            .unwrap_or(CLOSE_REASONS.len() - 1);
        self.metrics.sse_closed[i].fetch_add(1, Ordering::Relaxed);
    }
}

/// Counters of one service's upstream connections.
#[derive(Debug, Default)]
pub struct ServiceMetrics {
    connect_errors: AtomicU64,
    timeouts: AtomicU64,
}

impl ServiceMetrics {
    pub fn connect_error(&self) {
        self.connect_errors.fetch_add(1, Ordering::Relaxed);
    }

    pub fn timeout(&self) {
        self.timeouts.fetch_add(1, Ordering::Relaxed);
    }
}

/// Route metrics by (route, service).
type RouteRegistry = BTreeMap<(String, String), Arc<RouteMetrics>>;

static ROUTES: Lazy<Mutex<RouteRegistry>> = Lazy::new(Default::default);
static SERVICES: Lazy<Mutex<BTreeMap<String, Arc<ServiceMetrics>>>> = Lazy::new(Default::default);
static CONFIG: Lazy<Mutex<(String, u64)>> = Lazy::new(Default::default);

/// The counters of a route; called when a config is built.
pub fn route(route: &str, service: &str) -> Arc<RouteMetrics> {
    let mut all = ROUTES.lock().unwrap_or_else(|p| p.into_inner());
    all.entry((route.to_string(), service.to_string()))
        .or_insert_with(|| Arc::new(RouteMetrics::new(route, service)))
        .clone()
}

/// The counters of a service; called when a config is built.
pub fn service(name: &str) -> Arc<ServiceMetrics> {
    let mut all = SERVICES.lock().unwrap_or_else(|p| p.into_inner());
    all.entry(name.to_string()).or_default().clone()
}

/// Per-route totals for the dashboard: route, service, open streams, streams opened,
/// events, bytes, requests.
pub fn route_summaries() -> Vec<Value> {
    ROUTES
        .lock()
        .map(|r| {
            r.values()
                .map(|m| {
                    json!({
                        "route": m.route,
                        "service": m.service,
                        "open": m.sse_open_now(),
                        "opened": m.sse_opened.load(Ordering::Relaxed),
                        "events": m.sse_events.load(Ordering::Relaxed),
                        "bytes": m.sse_bytes.load(Ordering::Relaxed),
                        "requests": m.requests.iter().map(|n| n.load(Ordering::Relaxed)).sum::<u64>(),
                    })
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Records the config version being served.
pub fn config_loaded(version: &str, unix_seconds: u64) {
    let mut config = CONFIG.lock().unwrap_or_else(|p| p.into_inner());
    *config = (version.to_string(), unix_seconds);
}

/// Escapes a label value for the exposition format.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// All metrics in the Prometheus text exposition format.
pub fn render() -> String {
    let mut out = String::with_capacity(16 * 1024);
    let routes: Vec<Arc<RouteMetrics>> = ROUTES
        .lock()
        .map(|r| r.values().cloned().collect())
        .unwrap_or_default();
    let services: Vec<(String, Arc<ServiceMetrics>)> = SERVICES
        .lock()
        .map(|s| s.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default();
    let labels = |m: &RouteMetrics| {
        format!(
            "route=\"{}\",service=\"{}\"",
            label(&m.route),
            label(&m.service)
        )
    };

    let (version, loaded) = CONFIG.lock().map(|c| c.clone()).unwrap_or_default();
    out.push_str("# HELP streamgate_config_info The config version being served.\n");
    out.push_str("# TYPE streamgate_config_info gauge\n");
    let _ = writeln!(
        out,
        "streamgate_config_info{{version=\"{}\"}} 1",
        label(&version)
    );
    out.push_str("# HELP streamgate_config_loaded_timestamp_seconds When the config was loaded.\n");
    out.push_str("# TYPE streamgate_config_loaded_timestamp_seconds gauge\n");
    let _ = writeln!(out, "streamgate_config_loaded_timestamp_seconds {loaded}");

    out.push_str(
        "# HELP streamgate_requests_total Requests answered, by route, service and status class.\n",
    );
    out.push_str("# TYPE streamgate_requests_total counter\n");
    for m in &routes {
        for (i, n) in m.requests.iter().enumerate() {
            let _ = writeln!(
                out,
                "streamgate_requests_total{{{},class=\"{}xx\"}} {}",
                labels(m),
                i + 1,
                n.load(Ordering::Relaxed)
            );
        }
    }
    out.push_str("# HELP streamgate_request_duration_seconds Time from request to the end of the response.\n");
    out.push_str("# TYPE streamgate_request_duration_seconds histogram\n");
    for m in &routes {
        m.duration
            .render(&mut out, "streamgate_request_duration_seconds", &labels(m));
    }

    let counter = |out: &mut String, name: &str, help: &str, get: &dyn Fn(&RouteMetrics) -> u64| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} counter");
        for m in &routes {
            let _ = writeln!(out, "{name}{{{}}} {}", labels(m), get(m));
        }
    };
    out.push_str("# HELP streamgate_sse_streams_open SSE streams open now.\n");
    out.push_str("# TYPE streamgate_sse_streams_open gauge\n");
    for m in &routes {
        let _ = writeln!(
            out,
            "streamgate_sse_streams_open{{{}}} {}",
            labels(m),
            m.sse_open_now()
        );
    }
    counter(
        &mut out,
        "streamgate_sse_streams_opened_total",
        "SSE streams started.",
        &|m| m.sse_opened.load(Ordering::Relaxed),
    );
    out.push_str("# HELP streamgate_sse_streams_closed_total SSE streams ended, by reason.\n");
    out.push_str("# TYPE streamgate_sse_streams_closed_total counter\n");
    for m in &routes {
        for (reason, n) in CLOSE_REASONS.iter().zip(&m.sse_closed) {
            let _ = writeln!(
                out,
                "streamgate_sse_streams_closed_total{{{},reason=\"{reason}\"}} {}",
                labels(m),
                n.load(Ordering::Relaxed)
            );
        }
    }
    counter(
        &mut out,
        "streamgate_sse_streams_refused_total",
        "SSE streams refused by a limit (max_connections, per client, rate limits).",
        &|m| m.sse_refused.load(Ordering::Relaxed),
    );
    counter(
        &mut out,
        "streamgate_sse_streams_resumed_total",
        "SSE streams continued on another origin connection after their origin failed (resume).",
        &|m| m.sse_resumed.load(Ordering::Relaxed),
    );
    counter(
        &mut out,
        "streamgate_sse_events_total",
        "SSE events sent to clients.",
        &|m| m.sse_events.load(Ordering::Relaxed),
    );
    counter(
        &mut out,
        "streamgate_sse_bytes_total",
        "SSE body bytes from origins.",
        &|m| m.sse_bytes.load(Ordering::Relaxed),
    );
    type Pick = fn(&RouteMetrics) -> &Histogram;
    let histograms: [(&str, &str, Pick); 3] = [
        (
            "streamgate_sse_stream_duration_seconds",
            "How long SSE streams lasted.",
            |m| &m.sse_lifetime,
        ),
        (
            "streamgate_sse_first_event_seconds",
            "Time from the stream's response header to its first event.",
            |m| &m.sse_first_event,
        ),
        (
            "streamgate_sse_event_gap_seconds",
            "Time between consecutive events of a stream.",
            |m| &m.sse_gap,
        ),
    ];
    for (name, help, get) in histograms {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        for m in &routes {
            get(m).render(&mut out, name, &labels(m));
        }
    }

    out.push_str(
        "# HELP streamgate_upstream_connect_errors_total Failed connections to origins.\n",
    );
    out.push_str("# TYPE streamgate_upstream_connect_errors_total counter\n");
    for (name, m) in &services {
        let _ = writeln!(
            out,
            "streamgate_upstream_connect_errors_total{{service=\"{}\"}} {}",
            label(name),
            m.connect_errors.load(Ordering::Relaxed)
        );
    }
    out.push_str(
        "# HELP streamgate_upstream_timeouts_total Origin connect, read or write timeouts.\n",
    );
    out.push_str("# TYPE streamgate_upstream_timeouts_total counter\n");
    for (name, m) in &services {
        let _ = writeln!(
            out,
            "streamgate_upstream_timeouts_total{{service=\"{}\"}} {}",
            label(name),
            m.timeouts.load(Ordering::Relaxed)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_renders() {
        let m = route("metrics-test \"quoted\"", "svc");
        m.request(200, Duration::from_millis(3));
        m.request(503, Duration::from_millis(30));
        {
            let mut open = m.sse_opened();
            m.sse_chunk(100, 2);
            assert_eq!(m.sse_open_now(), 1);
            open.reason = "client_closed";
        }
        assert_eq!(m.sse_open_now(), 0);
        let text = render();
        let l = "route=\"metrics-test \\\"quoted\\\"\",service=\"svc\"";
        assert!(
            text.contains(&format!("streamgate_requests_total{{{l},class=\"2xx\"}} 1")),
            "{text}"
        );
        assert!(text.contains(&format!("streamgate_requests_total{{{l},class=\"5xx\"}} 1")));
        assert!(text.contains(&format!(
            "streamgate_sse_streams_closed_total{{{l},reason=\"client_closed\"}} 1"
        )));
        assert!(text.contains(&format!("streamgate_sse_events_total{{{l}}} 2")));
        assert!(text.contains(&format!(
            "streamgate_request_duration_seconds_bucket{{{l},le=\"0.005\"}} 1"
        )));
    }
}
