//! The access log: one line per request on the `streamgate::access` log target, so it can
//! be routed or filtered on its own (`RUST_LOG=streamgate::access=info`). `combined` is the
//! familiar Apache/nginx line with streamgate's fields appended (`sse_events` and
//! `sse_close` are `-` for ordinary requests); `json` is one object per line. Event streams
//! add their event count and how they ended.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime};

use pingora_error::Error;
use pingora_http::RequestHeader;
use serde_json::json;

use crate::http_util;
use crate::sse::CloseReason;
use crate::values::AccessLogFormat;

pub const TARGET: &str = "streamgate::access";

/// Shows `-` for nothing, without allocating.
struct Maybe<T>(Option<T>);

impl<T: std::fmt::Display> std::fmt::Display for Maybe<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(v) => v.fmt(f),
            None => f.write_str("-"),
        }
    }
}

/// Microseconds shown as seconds with six decimals, with integer formatting only.
struct Seconds(u128);

impl std::fmt::Display for Seconds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{:06}", self.0 / 1_000_000, self.0 % 1_000_000)
    }
}

/// What one line says about a request.
pub struct Entry<'a> {
    pub request: &'a RequestHeader,
    /// The client's address (through trusted proxies).
    pub client: Option<IpAddr>,
    /// Body bytes sent to the client.
    pub bytes: usize,
    pub route: Option<&'a str>,
    pub service: Option<&'a str>,
    /// The origin it was sent to.
    pub upstream: Option<SocketAddr>,
    /// From the request's arrival to now.
    pub duration: Duration,
    pub request_id: Option<&'a str>,
    pub status: u16,
    /// For event streams: events sent and the close reason.
    pub sse: Option<(u64, CloseReason)>,
    pub error: Option<&'a Error>,
}

/// Writes the line, unless the target is filtered out (then nothing is formatted).
pub fn write(format: AccessLogFormat, entry: &Entry<'_>) {
    if !log::log_enabled!(target: TARGET, log::Level::Info) {
        return;
    }
    let req = entry.request;
    let client = Maybe(entry.client);
    let host = http_util::request_host(req).unwrap_or("-");
    let header = |name: http::header::HeaderName| {
        req.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
    };
    let route = entry.route.unwrap_or("-");
    let service = entry.service.unwrap_or("-");
    let upstream = Maybe(entry.upstream);
    let micros = entry.duration.as_micros();
    let duration = Seconds(micros);
    let bytes = entry.bytes;
    let path = req.uri.path_and_query().map_or("/", |p| p.as_str());
    let time = humantime::format_rfc3339_millis(SystemTime::now());
    let request_id = entry.request_id.unwrap_or("-");
    match format {
        AccessLogFormat::Combined => {
            let (events, close) = match entry.sse {
                Some((events, reason)) => (Maybe(Some(events)), reason.as_str()),
                None => (Maybe(None), "-"),
            };
            log::info!(
                target: TARGET,
                "{client} - - [{time}] \"{} {path} {:?}\" {} {bytes} \"{}\" \"{}\" host={host} \
                 route={route} service={service} upstream={upstream} duration={duration} \
                 request_id={request_id} sse_events={events} sse_close={close}",
                req.method,
                req.version,
                entry.status,
                header(http::header::REFERER),
                header(http::header::USER_AGENT),
            );
        }
        AccessLogFormat::Json => {
            let mut line = json!({
                "time": time.to_string(),
                "client": client.0.map(|ip| ip.to_string()),
                "host": host,
                "method": req.method.as_str(),
                "path": path,
                "status": entry.status,
                "bytes": bytes,
                "duration": micros as f64 / 1e6,
                "route": route,
                "service": service,
                "upstream": upstream.0.map(|u| u.to_string()),
                "request_id": request_id,
            });
            if let Some((events, reason)) = entry.sse {
                line["sse_events"] = json!(events);
                line["sse_close"] = json!(reason.as_str());
            }
            if let Some(e) = entry.error {
                line["error"] = json!(e.to_string());
            }
            log::info!(target: TARGET, "{line}");
        }
    }
}
