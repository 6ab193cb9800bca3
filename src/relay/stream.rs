//! An event stream in flight, and its per-chunk pipeline: the one path every chunk of every
//! stream takes, whatever loop carries it.
//!
//! ```text
//! chunk from the origin
//!   -> scan      the event scanner follows the framing (events, last id, boundaries);
//!                when the stream is ending, only the part up to the current event's end
//!                is kept
//!   -> record    route metrics (events, bytes, first event, gaps) and the tracked entry
//!   -> filter    the chain's body filters, in chain order
//!   -> pace      `flush_interval`: how long to hold the chunk before writing it
//! ```
//!
//! Bytes of the proxy's own (heartbeats, `retry:` hints, the error event) skip the scan and
//! the record but pass the filters ([`filter_own`]), so a compressed stream stays decodable.
//!
//! A [`Stream`] also owns the stream's accounting: it is counted open in the metrics from
//! [`Stream::open`] until it drops, and its registry entry (with `connection_tracking`)
//! lives as long as it does. When it drops, however the request ended (even when the
//! runtime drops it at shutdown and Pingora's `logging` never runs), the close is counted
//! and logged once, with the one reason stored here.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use pingora_error::Result;

use crate::metrics::RouteMetrics;
use crate::middleware::BodyFilter;
use crate::sse::scanner::EventScanner;
use crate::sse::tracker::{StreamInfo, TrackGuard, Tracker};
use crate::sse::{CloseReason, FlushPacer, SseSettings};

/// An SSE response in flight.
pub struct Stream {
    started: Instant,
    metrics: Arc<RouteMetrics>,
    scanner: EventScanner,
    pacer: Option<FlushPacer>,
    /// When the last event completed, for the gap histogram.
    last_event_at: Option<Instant>,
    /// The registry entry, with `connection_tracking`.
    tracked: Option<TrackGuard>,
    /// How the stream ended, once the proxy knows; `error` if it never learns.
    reason: Option<CloseReason>,
    /// What went wrong, for the close log line.
    detail: Option<String>,
}

impl Stream {
    /// A stream starts: counted open under `metrics`, registered in `tracker` when its
    /// settings track connections.
    pub fn open(
        settings: &SseSettings,
        metrics: Arc<RouteMetrics>,
        tracker: &Arc<Tracker>,
        info: impl FnOnce() -> StreamInfo,
    ) -> Stream {
        metrics.sse_opened();
        Stream {
            started: Instant::now(),
            metrics,
            scanner: EventScanner::new(),
            pacer: settings.flush_interval.map(FlushPacer::new),
            last_event_at: None,
            tracked: settings.connection_tracking.then(|| tracker.open(info())),
            reason: None,
            detail: None,
        }
    }

    /// The per-chunk pipeline (see the module docs) for `chunk` from the origin, which it
    /// may replace, read `now`. With `ending`, only the bytes up to the end of the current
    /// event are kept. Returns how long to hold the chunk before writing it. (The end of
    /// the body is not a chunk: it passes the filters with [`filter_own`].)
    pub fn chunk(
        &mut self,
        now: Instant,
        chunk: &mut Option<Bytes>,
        filters: &mut [Box<dyn BodyFilter>],
        ending: bool,
    ) -> Result<Option<Duration>> {
        if let Some(data) = chunk.as_mut() {
            let events = if ending {
                let before = self.scanner.events();
                let n = self.scanner.feed_to_boundary(data);
                data.truncate(n);
                self.scanner.events() - before
            } else {
                self.scanner.feed(data)
            };
            self.record(data.len(), events, now);
        }
        apply_filters(filters, chunk, false)?;
        let written = chunk.as_ref().is_some_and(|b| !b.is_empty());
        Ok(match &mut self.pacer {
            Some(pacer) if written => pacer.delay(now),
            _ => None,
        })
    }

    /// Counts `len` bytes from the origin, read `now`, that completed `events` events.
    fn record(&mut self, len: usize, events: u64, now: Instant) {
        if let Some(tracked) = &self.tracked {
            let id = (events > 0).then(|| self.scanner.last_id());
            tracked.entry.record(len, events, id);
        }
        self.metrics.sse_chunk(len, events);
        if events > 0 {
            match self.last_event_at {
                None => self.metrics.sse_first_event(now - self.started),
                Some(last) => self.metrics.sse_gap(now - last),
            }
            self.last_event_at = Some(now);
        }
    }

    /// Whether the stream is between two events (no event half sent).
    pub fn at_boundary(&self) -> bool {
        self.scanner.at_boundary()
    }

    pub fn events(&self) -> u64 {
        self.scanner.events()
    }

    /// The id of the last complete event (empty when none had one).
    pub fn last_id(&self) -> &[u8] {
        self.scanner.last_id()
    }

    pub fn age(&self) -> Duration {
        self.started.elapsed()
    }

    /// The registry entry, when the stream is tracked.
    pub fn entry(&self) -> Option<&Arc<crate::sse::tracker::StreamEntry>> {
        self.tracked.as_ref().map(|t| &t.entry)
    }

    /// Notes how the stream ended; the first reason given wins.
    pub fn close(&mut self, reason: CloseReason) {
        self.reason.get_or_insert(reason);
    }

    /// Notes how the stream ended and what went wrong; the first of each wins.
    pub fn close_with(&mut self, reason: CloseReason, detail: String) {
        self.reason.get_or_insert(reason);
        self.detail.get_or_insert(detail);
    }

    /// How the stream ended, as far as the proxy knows now.
    pub fn reason(&self) -> Option<CloseReason> {
        self.reason
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let reason = self.reason.unwrap_or(CloseReason::Error);
        self.metrics.sse_closed(reason, self.started.elapsed());
        if let Some(tracked) = self.tracked.take() {
            tracked.close(reason, self.detail.as_deref());
        }
    }
}

/// Runs `filters` (in chain order) over `body`.
pub fn apply_filters(
    filters: &mut [Box<dyn BodyFilter>],
    body: &mut Option<Bytes>,
    end_of_stream: bool,
) -> Result<()> {
    for filter in filters.iter_mut() {
        filter.filter(body, end_of_stream)?;
    }
    Ok(())
}

/// Bytes of the proxy's own (a heartbeat, a hint, an error event) through the filters; an
/// empty `bytes` is nothing to write (the end of the body, when `end`).
pub fn filter_own(
    filters: &mut [Box<dyn BodyFilter>],
    bytes: Bytes,
    end: bool,
) -> Result<Option<Bytes>> {
    let mut body = (!bytes.is_empty()).then_some(bytes);
    apply_filters(filters, &mut body, end)?;
    Ok(body)
}
