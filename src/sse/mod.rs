//! Server-Sent Events: detection, the response-header rules every SSE response gets, and
//! write pacing for `flush_interval`.
//!
//! What "correct by default" means here:
//! - a response is SSE when its `Content-Type` is `text/event-stream` (parameters allowed);
//! - its headers go out at once and it never carries `Content-Length` (so Pingora streams
//!   it chunked and flushes every chunk), is never compressed by the proxy, and gets
//!   `Cache-Control: no-cache` and `X-Accel-Buffering: no` unless the origin set them;
//! - with `flush_interval: 0` every upstream chunk is written and flushed as it arrives.

pub mod limits;
mod pacer;
pub mod scanner;
pub mod supervisor;
pub mod tracker;

use std::time::Duration;

use bytes::Bytes;

use http::header::{HeaderName, HeaderValue, CACHE_CONTROL};
use http::Version;
use pingora_http::ResponseHeader;

pub use pacer::FlushPacer;

pub use crate::config::file::OnUpstreamError;
use crate::config::file::SseFile;
use crate::http_util::{drop_content_length, list_accepts, media_essence};

static X_ACCEL_BUFFERING: HeaderName = HeaderName::from_static("x-accel-buffering");

/// What a stream ended by the proxy gets last: come back in three seconds.
pub const END_HINT: &[u8] = b"retry: 3000\n\n";

/// What a stream ended by a drain gets last: come back at once (the jitter of the drain
/// already spreads the reconnects).
pub const DRAIN_HINT: &[u8] = b"retry: 250\n\n";

/// The heartbeat: an SSE comment line and the blank line after it.
pub const HEARTBEAT: &[u8] = b":\n\n";

/// Default `header_timeout`.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// Default `drain_period`.
pub const DEFAULT_DRAIN_PERIOD: Duration = Duration::from_secs(10);

/// The last event a client gets when the origin fails mid-stream with
/// `on_upstream_error: event`: `event: error` and a one-line JSON reason.
pub fn error_event(reason: &str) -> Bytes {
    let json = serde_json::json!({ "error": "upstream", "reason": reason });
    Bytes::from(format!("event: error\ndata: {json}\n\n"))
}

/// Effective SSE settings of a service: its `sse:` block over the global one.
/// `None` durations mean no limit (written `0` in the config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SseSettings {
    /// When false, event streams are proxied like any other response.
    pub enabled: bool,
    /// Coalesce writes for at most this long; `None` flushes every chunk at once.
    pub flush_interval: Option<Duration>,
    /// Longest the origin may take to send a stream's response headers.
    pub header_timeout: Option<Duration>,
    /// Longest silence from the origin between events.
    pub read_timeout: Option<Duration>,
    /// Longest a write to the client may block.
    pub write_timeout: Option<Duration>,
    /// Streams older than this are ended at an event boundary with a `retry:` hint.
    pub max_lifetime: Option<Duration>,
    /// Tracked streams whose origin is silent this long are closed by the cleanup task.
    pub inactive_threshold: Option<Duration>,
    /// Origin silence after which the client gets a comment line; `None`: never.
    pub heartbeat_interval: Option<Duration>,
    /// What the client sees when the origin fails mid-stream.
    pub on_upstream_error: OnUpstreamError,
    /// On shutdown or upgrade, streams end at random moments spread over this period.
    pub drain_period: Duration,
    /// Continue a stream whose origin failed from another origin connection, with
    /// `Last-Event-ID`.
    pub resume: bool,
    /// Most resumes of one stream within `resume_window`.
    pub resume_attempts: u32,
    pub resume_window: Duration,
    /// Register each stream in the live registry and log its open and close.
    pub connection_tracking: bool,
    /// Most event streams open at once under this block; `None` for no limit.
    pub max_connections: Option<usize>,
    /// Most event streams one client address may have open at once under this block.
    pub max_connections_per_client: Option<usize>,
}

impl SseSettings {
    /// These settings with the keys set in `file` replaced.
    pub fn overlay(&self, file: &SseFile) -> SseSettings {
        SseSettings {
            enabled: file.enabled.unwrap_or(self.enabled),
            flush_interval: file
                .flush_interval
                .map_or(self.flush_interval, |d| d.limit()),
            header_timeout: file
                .header_timeout
                .map_or(self.header_timeout, |d| d.limit()),
            read_timeout: file.read_timeout.map_or(self.read_timeout, |d| d.limit()),
            write_timeout: file.write_timeout.map_or(self.write_timeout, |d| d.limit()),
            max_lifetime: file.max_lifetime.map_or(self.max_lifetime, |d| d.limit()),
            inactive_threshold: file
                .inactive_threshold
                .map_or(self.inactive_threshold, |d| d.limit()),
            heartbeat_interval: file
                .heartbeat_interval
                .map_or(self.heartbeat_interval, |d| d.limit()),
            on_upstream_error: file.on_upstream_error.unwrap_or(self.on_upstream_error),
            drain_period: file.drain_period.map_or(self.drain_period, |d| d.0),
            resume: file.resume.unwrap_or(self.resume),
            resume_attempts: file.resume_attempts.unwrap_or(self.resume_attempts),
            resume_window: file.resume_window.map_or(self.resume_window, |d| d.0),
            connection_tracking: file.connection_tracking.unwrap_or(self.connection_tracking),
            max_connections: file.max_connections.or(self.max_connections),
            max_connections_per_client: file
                .max_connections_per_client
                .or(self.max_connections_per_client),
        }
    }
}

/// One line for `streamgate -t`: what each stream of a service gets.
impl std::fmt::Display for SseSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if !self.enabled {
            return f.write_str("off (event streams proxied like any response)");
        }
        let time = |d: Option<Duration>| match d {
            Some(d) => humantime::format_duration(d).to_string(),
            None => "none".to_string(),
        };
        write!(
            f,
            "header_timeout {}, read_timeout {}, heartbeat {}, max_lifetime {}, \
             inactive_threshold {}, drain {}, on_upstream_error {}, tracking {}",
            time(self.header_timeout),
            time(self.read_timeout),
            time(self.heartbeat_interval),
            time(self.max_lifetime),
            time(self.inactive_threshold),
            humantime::format_duration(self.drain_period),
            match self.on_upstream_error {
                OnUpstreamError::End => "end",
                OnUpstreamError::Event => "event",
            },
            if self.connection_tracking {
                "on"
            } else {
                "off"
            },
        )?;
        if self.resume {
            write!(
                f,
                ", resume (at most {} per {})",
                self.resume_attempts,
                humantime::format_duration(self.resume_window)
            )?;
        }
        if let Some(max) = self.max_connections {
            write!(f, ", max_connections {max}")?;
        }
        if let Some(max) = self.max_connections_per_client {
            write!(f, ", max_connections_per_client {max}")?;
        }
        Ok(())
    }
}

impl Default for SseSettings {
    fn default() -> Self {
        SseSettings {
            enabled: true,
            flush_interval: None,
            header_timeout: Some(DEFAULT_HEADER_TIMEOUT),
            read_timeout: None,
            write_timeout: None,
            max_lifetime: None,
            inactive_threshold: None,
            heartbeat_interval: None,
            on_upstream_error: OnUpstreamError::End,
            drain_period: DEFAULT_DRAIN_PERIOD,
            resume: false,
            resume_attempts: 3,
            resume_window: Duration::from_secs(60),
            connection_tracking: false,
            max_connections: None,
            max_connections_per_client: None,
        }
    }
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

/// The end of the last complete event in `data` (after its blank line), if any. SSE lines
/// end in LF, CR or CRLF; an event ends at an empty line.
pub fn last_event_end(data: &[u8]) -> Option<usize> {
    event_ends(data).last()
}

/// The end of the first complete event in `data` (after its blank line), if any.
pub fn first_event_end(data: &[u8]) -> Option<usize> {
    event_ends(data).next()
}

/// The end of each complete event in `data`, in order. A CR at the very end may be the
/// first half of a CRLF, so it ends nothing yet.
fn event_ends(data: &[u8]) -> impl Iterator<Item = usize> + '_ {
    let mut i = 0;
    let mut line_start = 0;
    std::iter::from_fn(move || {
        while i < data.len() {
            let b = data[i];
            if b != b'\n' && b != b'\r' {
                i += 1;
                continue;
            }
            let mut next = i + 1;
            if b == b'\r' && data.get(next) == Some(&b'\n') {
                next += 1;
            } else if b == b'\r' && next == data.len() {
                i = data.len();
                return None;
            }
            let empty = i == line_start;
            line_start = next;
            i = next;
            if empty {
                return Some(next);
            }
        }
        None
    })
}

/// The value of the last `id` field of one complete event, if it has one.
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
        .next_back()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_and_their_ids() {
        assert_eq!(first_event_end(b"id: 1\ndata: a\n\nid: 2\n"), Some(15));
        assert_eq!(first_event_end(b"data: a\r\n\r\n"), Some(11));
        assert_eq!(first_event_end(b"data: a\n"), None);
        assert_eq!(event_id(b"id: 7\ndata: x\n\n"), Some(&b"7"[..]));
        assert_eq!(event_id(b"id:8\rdata: x\r\r"), Some(&b"8"[..]));
        assert_eq!(event_id(b"data: x\n\n"), None);
        assert_eq!(event_id(b"idx: 1\n\n"), None);
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
    fn event_ends_follow_all_line_endings() {
        assert_eq!(last_event_end(b"data: a\n\n"), Some(9));
        assert_eq!(last_event_end(b"data: a\r\rdata: b"), Some(9));
        assert_eq!(last_event_end(b"data: a\r\n\r\n"), Some(11));
        assert_eq!(
            last_event_end(b"data: a\r\n\r"),
            None,
            "CR may start a CRLF"
        );
        assert_eq!(last_event_end(b"data: a\n"), None);
        assert_eq!(last_event_end(b"\n"), Some(1));
        assert_eq!(last_event_end(b"a\n\nb\n\nc"), Some(6));
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
