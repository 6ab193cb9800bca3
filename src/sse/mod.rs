//! Server-Sent Events: what an event stream is and the rules it gets, with the pieces
//! every stream path shares and that need nothing of the proxy around them:
//!
//! - detection (`Content-Type: text/event-stream`, `Accept` asking for one) and the
//!   response-header rules (no `Content-Length`, `Cache-Control: no-cache`,
//!   `X-Accel-Buffering: no`); the id of one event ([`event_id`]);
//! - [`settings`]: the `sse:` block and the effective settings of a stream;
//! - [`scanner`]: the incremental event scanner; [`pacer`]: `flush_interval` pacing;
//! - [`limits`]: open-stream counters; [`tracker`]: the registry of open streams;
//!   [`drain`]: the drain signal; [`supervisor`]: the background task that starts the drain
//!   at shutdown and closes inactive streams; [`close`]: why a stream ended.
//!
//! The per-chunk pipeline and the loop that carries a stream live in `relay`, which sits
//! above the upstream and middleware code these pieces are used by.

pub mod close;
pub mod drain;
pub mod limits;
mod pacer;
pub mod scanner;
pub mod settings;
pub mod supervisor;
pub mod tracker;

use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CACHE_CONTROL};
use http::Version;
use once_cell::sync::Lazy;
use pingora_http::ResponseHeader;

pub use close::CloseReason;
pub use pacer::FlushPacer;
pub use settings::{OnUpstreamError, SseFile, SseSettings};

use crate::http_util::{drop_content_length, list_accepts, media_essence};

/// What a request knows about event streams before its response arrives: the settings it
/// runs with, whether it asked for a stream, and the limits a stream of it counts against.
#[derive(Debug, Default)]
pub struct SseRequest {
    /// The effective settings: the service's (shared), overlaid by any `sse` middleware
    /// (a copy of the request's own); none before the request is routed. Held for as long
    /// as a stream is open, by every stream: shared, it is a pointer rather than 208 bytes.
    shared: Option<Arc<SseSettings>>,
    /// The client asked for an event stream (`Accept: text/event-stream`) and SSE is
    /// enabled: stream limits are taken before the origin is contacted. Any other request
    /// whose answer is an event stream takes them when the answer arrives.
    pub announced: bool,
    /// The limits that apply, and the slots held while the request lives.
    pub limits: limits::Limits,
}

/// The settings of a request not routed yet.
static UNROUTED: Lazy<SseSettings> = Lazy::new(SseSettings::default);

impl SseRequest {
    /// The settings the request runs with.
    pub fn settings(&self) -> &SseSettings {
        self.shared.as_deref().unwrap_or(&UNROUTED)
    }

    /// The settings, to keep beside the request (a stream's loop).
    pub fn shared_settings(&self) -> Arc<SseSettings> {
        self.shared
            .clone()
            .unwrap_or_else(|| Arc::new(SseSettings::default()))
    }

    /// Runs the request with `settings` (its service's, or a middleware's overlay).
    pub fn set_settings(&mut self, settings: Arc<SseSettings>) {
        self.shared = Some(settings);
    }
}

static X_ACCEL_BUFFERING: HeaderName = HeaderName::from_static("x-accel-buffering");

/// What a stream ended by the proxy gets last: come back in three seconds.
pub const END_HINT: &[u8] = b"retry: 3000\n\n";

/// What a stream ended by a drain gets last: come back at once (the jitter of the drain
/// already spreads the reconnects).
pub const DRAIN_HINT: &[u8] = b"retry: 250\n\n";

/// The heartbeat: an SSE comment line and the blank line after it.
pub const HEARTBEAT: &[u8] = b":\n\n";

/// The last event a client gets, with `on_upstream_error: event`, when its stream ends
/// abnormally: `event: error` and one line of JSON, `{"error": kind, "reason": ...}`, where
/// `kind` is `upstream` (the origin failed) or `shutdown` (the proxy stopped the stream).
pub fn error_event(kind: &str, reason: &str) -> Bytes {
    let json = serde_json::json!({ "error": kind, "reason": reason });
    Bytes::from(format!("event: error\ndata: {json}\n\n"))
}

/// Whether a `Content-Type` value is `text/event-stream`, with or without parameters.
pub fn is_event_stream(content_type: &[u8]) -> bool {
    media_essence(content_type).eq_ignore_ascii_case(b"text/event-stream")
}

/// Whether an `Accept` value asks for `text/event-stream` (and does not refuse it with
/// `q=0`).
pub fn accepts_event_stream(accept: &[u8]) -> bool {
    list_accepts(accept, is_event_stream)
}

/// Applies the SSE response rules to an event-stream response header.
pub fn fix_response_header(
    header: &mut ResponseHeader,
    downstream: Version,
) -> pingora_error::Result<()> {
    drop_content_length(header, downstream)?;
    if header.headers.get(&CACHE_CONTROL).is_none() {
        header.insert_header(CACHE_CONTROL, HeaderValue::from_static("no-cache"))?;
    }
    if header.headers.get(&X_ACCEL_BUFFERING).is_none() {
        header.insert_header(X_ACCEL_BUFFERING.clone(), HeaderValue::from_static("no"))?;
    }
    Ok(())
}

/// The value of the last `id` field of one complete event, if it has one. An `id` holding
/// NUL is ignored, as a client ignores it (and as [`scanner::EventScanner`] does).
pub fn event_id(event: &[u8]) -> Option<&[u8]> {
    event
        .split(|b| *b == b'\n' || *b == b'\r')
        .filter_map(|line| {
            let value = line.strip_prefix(b"id")?;
            if value.is_empty() {
                return Some(value);
            }
            let value = value.strip_prefix(b":")?;
            Some(value.strip_prefix(b" ").unwrap_or(value))
        })
        .rfind(|value| !value.contains(&0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_and_their_ids() {
        assert_eq!(event_id(b"id: 7\ndata: x\n\n"), Some(&b"7"[..]));
        assert_eq!(event_id(b"id:8\rdata: x\r\r"), Some(&b"8"[..]));
        assert_eq!(event_id(b"data: x\n\n"), None);
        assert_eq!(event_id(b"idx: 1\n\n"), None);
        assert_eq!(event_id(b"id: 1\nid: 2\0\ndata: x\n\n"), Some(&b"1"[..]));
    }

    #[test]
    fn detects_event_stream_content_types() {
        assert!(is_event_stream(b"text/event-stream"));
        assert!(is_event_stream(b"Text/Event-Stream; charset=utf-8"));
        assert!(is_event_stream(b" text/event-stream ;charset=utf-8"));
        assert!(!is_event_stream(b"text/event-streams"));
        assert!(!is_event_stream(b"text/plain"));
        assert!(!is_event_stream(b""));
    }

    #[test]
    fn detects_accept() {
        assert!(accepts_event_stream(b"text/event-stream"));
        assert!(accepts_event_stream(
            b"application/json, text/event-stream;q=0.9"
        ));
        assert!(!accepts_event_stream(b"text/event-stream;q=0"));
        assert!(!accepts_event_stream(b"*/*"));
        assert!(!accepts_event_stream(b"text/html"));
    }

    #[test]
    fn fixes_headers() {
        let mut h = ResponseHeader::build(200, None).expect("header");
        h.insert_header("content-type", "text/event-stream")
            .expect("insert");
        h.insert_header("content-length", "100").expect("insert");
        h.insert_header("cache-control", "private").expect("insert");
        fix_response_header(&mut h, Version::HTTP_11).expect("fix");
        assert!(h.headers.get("content-length").is_none());
        assert_eq!(h.headers["transfer-encoding"], "chunked");
        assert_eq!(h.headers["cache-control"], "private");
        assert_eq!(h.headers["x-accel-buffering"], "no");
    }
}
