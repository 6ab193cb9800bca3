//! The access log: one line per request on the `streamgate::access` log target, so it can
//! be routed or filtered on its own (`RUST_LOG=streamgate::access=info`). `combined` is the
//! familiar Apache/nginx line with streamgate's fields appended; `json` is one object per
//! line. Event streams add their event count and how they ended.

use std::time::SystemTime;

use pingora_error::Error;
use pingora_proxy::Session;
use serde_json::json;

use crate::config::file::AccessLogFormat;
use crate::proxy::RequestCtx;

pub const TARGET: &str = "streamgate::access";

/// What one line says about a request.
pub struct Entry<'a> {
    pub session: &'a Session,
    pub ctx: &'a RequestCtx,
    pub status: u16,
    /// For event streams: events sent and the close reason.
    pub sse: Option<(u64, &'a str)>,
    pub error: Option<&'a Error>,
}

/// Writes the line, unless the target is filtered out (then nothing is formatted).
pub fn write(format: AccessLogFormat, entry: &Entry<'_>) {
    if !log::log_enabled!(target: TARGET, log::Level::Info) {
        return;
    }
    let req = entry.session.req_header();
    let client = entry
        .session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip().to_string())
        .unwrap_or_else(|| "-".into());
    let host = req
        .uri
        .authority()
        .map(|a| a.as_str())
        .or_else(|| req.headers.get(http::header::HOST)?.to_str().ok())
        .unwrap_or("-");
    let header = |name: http::header::HeaderName| {
        req.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
    };
    let ctx = entry.ctx;
    let route = ctx.route.as_ref().map_or("-", |r| r.name.as_str());
    let service = ctx.service_name().unwrap_or("-");
    let upstream = ctx
        .upstream
        .map(|u| u.to_string())
        .unwrap_or_else(|| "-".into());
    let duration = ctx.started.map_or(0.0, |s| s.elapsed().as_secs_f64());
    let bytes = entry.session.body_bytes_sent();
    let path = req.uri.path_and_query().map_or("/", |p| p.as_str());
    let time = humantime::format_rfc3339_millis(SystemTime::now());
    let request_id = ctx.request_id().unwrap_or("-");
    match format {
        AccessLogFormat::Combined => {
            let sse = entry
                .sse
                .map(|(events, reason)| format!(" sse_events={events} sse_close={reason}"))
                .unwrap_or_default();
            log::info!(
                target: TARGET,
                "{client} - - [{time}] \"{} {path} {:?}\" {} {bytes} \"{}\" \"{}\" host={host} \
                 route={route} service={service} upstream={upstream} duration={duration:.6} \
                 request_id={request_id}{sse}",
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
                "client": client,
                "host": host,
                "method": req.method.as_str(),
                "path": path,
                "status": entry.status,
                "bytes": bytes,
                "duration": duration,
                "route": route,
                "service": service,
                "upstream": upstream,
                "request_id": request_id,
            });
            if let Some((events, reason)) = entry.sse {
                line["sse_events"] = json!(events);
                line["sse_close"] = json!(reason);
            }
            if let Some(e) = entry.error {
                line["error"] = json!(e.to_string());
            }
            log::info!(target: TARGET, "{line}");
        }
    }
}
