//! The registry of open SSE streams (`connection_tracking: true`).
//!
//! Each tracked stream has an entry: id, client, host, path, route, service, upstream
//! address, start time, last activity, events, bytes and last event id. The entry belongs to
//! a [`TrackGuard`] held by the stream; the stream closes it with its [`CloseReason`], and
//! a guard dropped without a close (the runtime dropping the stream at shutdown, where
//! Pingora's `logging` hook never runs) closes with `error`. Either way the entry is removed
//! and the close is logged.
//!
//! Counters are atomics updated per chunk; the map is locked only when a stream opens or
//! closes, and the last event id only when it changes.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use futures_util::task::AtomicWaker;

use super::CloseReason;

/// One open stream.
#[derive(Debug)]
pub struct StreamEntry {
    pub id: u64,
    /// What was known when it opened.
    pub info: StreamInfo,
    pub started: SystemTime,
    started_at: Instant,
    /// Milliseconds after `started` of the last chunk from the origin.
    last_activity_ms: AtomicU64,
    events: AtomicU64,
    bytes: AtomicU64,
    last_event_id: Mutex<String>,
    /// Why this stream was asked to end (the admin API, the cleanup task); the first ask
    /// wins.
    end: OnceLock<CloseReason>,
    /// Wakes the stream's relay when an end is asked for.
    end_waker: AtomicWaker,
    /// The origin now (it changes when a stream resumes on another endpoint).
    upstream: Mutex<Option<SocketAddr>>,
}

impl StreamEntry {
    /// Asks the proxy to end this stream at its next event boundary (with a `retry:` hint),
    /// giving the reason its close will be logged with.
    pub fn request_end(&self, reason: CloseReason) {
        if self.end.set(reason).is_ok() {
            self.end_waker.wake();
        }
    }

    /// Why the stream was asked to end, if it was.
    pub fn end_requested(&self) -> Option<CloseReason> {
        self.end.get().copied()
    }

    /// The origin the stream reads from now.
    pub fn upstream(&self) -> Option<SocketAddr> {
        self.upstream.lock().ok().and_then(|u| *u)
    }

    /// The stream moved to another origin (resume).
    pub fn set_upstream(&self, addr: SocketAddr) {
        if let Ok(mut u) = self.upstream.lock() {
            *u = Some(addr);
        }
    }

    /// Ready once an end has been asked for; else `cx`'s task (the stream's relay, the one
    /// waiter) is woken when it is. No lock: the relay asks at every event.
    pub fn poll_end_asked(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<CloseReason> {
        self.end_waker.register(cx.waker());
        match self.end_requested() {
            Some(reason) => std::task::Poll::Ready(reason),
            None => std::task::Poll::Pending,
        }
    }

    pub fn events(&self) -> u64 {
        self.events.load(Ordering::Relaxed)
    }

    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    pub fn last_event_id(&self) -> String {
        self.last_event_id
            .lock()
            .map(|id| id.clone())
            .unwrap_or_default()
    }

    /// How long since the origin last sent anything.
    pub fn idle(&self) -> Duration {
        let last = Duration::from_millis(self.last_activity_ms.load(Ordering::Relaxed));
        self.started_at.elapsed().saturating_sub(last)
    }

    pub fn age(&self) -> Duration {
        self.started_at.elapsed()
    }

    /// Records a chunk from the origin: its size, the events it completed and, when it
    /// changed, the last event id.
    pub fn record(&self, bytes: usize, events: u64, last_id: Option<&[u8]>) {
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        self.events.fetch_add(events, Ordering::Relaxed);
        self.last_activity_ms.store(
            self.started_at.elapsed().as_millis() as u64,
            Ordering::Relaxed,
        );
        if let Some(id) = last_id {
            if let Ok(mut current) = self.last_event_id.lock() {
                if current.as_bytes() != id {
                    current.clear();
                    current.push_str(&String::from_utf8_lossy(id));
                }
            }
        }
    }
}

/// What is known about a stream when it opens.
#[derive(Debug, Default)]
pub struct StreamInfo {
    pub client: Option<IpAddr>,
    pub host: String,
    pub path: String,
    pub route: String,
    pub service: String,
    pub upstream: Option<SocketAddr>,
    /// `inactive_threshold` of the stream's settings: the cleanup task closes it after
    /// this much origin silence.
    pub inactive_threshold: Option<Duration>,
}

/// A stream that ended, as the dashboard lists it.
#[derive(Debug, Clone)]
pub struct Closed {
    pub id: u64,
    pub route: String,
    pub client: Option<IpAddr>,
    pub duration: Duration,
    pub events: u64,
    pub reason: CloseReason,
    pub at: SystemTime,
}

/// How many recent closes are kept.
const RECENT: usize = 50;

#[derive(Debug, Default)]
pub struct Tracker {
    streams: Mutex<HashMap<u64, Arc<StreamEntry>>>,
    next_id: AtomicU64,
    recent: Mutex<VecDeque<Closed>>,
}

impl Tracker {
    /// Registers a stream; it stays registered until its guard is closed or dropped.
    pub fn open(self: &Arc<Self>, info: StreamInfo) -> TrackGuard {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let upstream = info.upstream;
        let entry = Arc::new(StreamEntry {
            id,
            info,
            started: SystemTime::now(),
            started_at: Instant::now(),
            last_activity_ms: AtomicU64::new(0),
            events: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            last_event_id: Mutex::new(String::new()),
            end: OnceLock::new(),
            end_waker: AtomicWaker::new(),
            upstream: Mutex::new(upstream),
        });
        if let Ok(mut streams) = self.streams.lock() {
            streams.insert(id, entry.clone());
        }
        log::info!(
            "sse stream {id} opened: route={} client={} path={}",
            entry.info.route,
            entry.info.client.map(|c| c.to_string()).unwrap_or_default(),
            entry.info.path
        );
        TrackGuard {
            tracker: self.clone(),
            entry,
            closed: false,
        }
    }

    /// The open streams, oldest first.
    pub fn snapshot(&self) -> Vec<Arc<StreamEntry>> {
        let mut all: Vec<_> = self
            .streams
            .lock()
            .map(|s| s.values().cloned().collect())
            .unwrap_or_default();
        all.sort_by_key(|e| e.id);
        all
    }

    /// The most recent closes, newest first.
    pub fn recent(&self) -> Vec<Closed> {
        self.recent
            .lock()
            .map(|r| r.iter().rev().cloned().collect())
            .unwrap_or_default()
    }

    /// Asks stream `id` to end; false when no such stream is open.
    pub fn request_end(&self, id: u64, reason: CloseReason) -> bool {
        let entry = self.streams.lock().ok().and_then(|s| s.get(&id).cloned());
        entry.map(|e| e.request_end(reason)).is_some()
    }

    /// The cleanup task's sweep: asks every stream whose origin has been silent longer
    /// than its `inactive_threshold` to end. Returns how many were asked.
    pub fn end_inactive(&self) -> usize {
        let mut asked = 0;
        for entry in self.snapshot() {
            let Some(threshold) = entry.info.inactive_threshold else {
                continue;
            };
            if entry.end_requested().is_none() && entry.idle() >= threshold {
                entry.request_end(CloseReason::IdleTimeout);
                asked += 1;
            }
        }
        asked
    }

    pub fn len(&self) -> usize {
        self.streams.lock().map(|s| s.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A tracked stream: its entry stays in the registry until the guard is closed or dropped.
#[derive(Debug)]
pub struct TrackGuard {
    tracker: Arc<Tracker>,
    pub entry: Arc<StreamEntry>,
    closed: bool,
}

impl TrackGuard {
    /// Removes the entry and logs the close with `reason` (and what went wrong, if known).
    pub fn close(mut self, reason: CloseReason, detail: Option<&str>) {
        self.tracker.remove(&self.entry, reason, detail);
        self.closed = true;
    }
}

impl Drop for TrackGuard {
    fn drop(&mut self) {
        if !self.closed {
            self.tracker.remove(&self.entry, CloseReason::Error, None);
        }
    }
}

impl Tracker {
    fn remove(&self, e: &StreamEntry, reason: CloseReason, detail: Option<&str>) {
        // Recorded as closed before it leaves the open streams: a reader on another thread
        // that no longer sees it open finds its close.
        if let Ok(mut recent) = self.recent.lock() {
            if recent.len() == RECENT {
                recent.pop_front();
            }
            recent.push_back(Closed {
                id: e.id,
                route: e.info.route.clone(),
                client: e.info.client,
                duration: e.age(),
                events: e.events(),
                reason,
                at: SystemTime::now(),
            });
        }
        if let Ok(mut streams) = self.streams.lock() {
            streams.remove(&e.id);
        }
        log::info!(
            "sse stream {} closed: route={} client={} duration={:.3}s events={} bytes={} \
             last_event_id={:?} reason={reason}{}",
            e.id,
            e.info.route,
            e.info.client.map(|c| c.to_string()).unwrap_or_default(),
            e.age().as_secs_f64(),
            e.events(),
            e.bytes(),
            e.last_event_id(),
            detail
                .map(|d| format!(" detail=\"{d}\""))
                .unwrap_or_default()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_live_as_long_as_their_guards() {
        let local = Arc::new(Tracker::default());
        let a = local.open(StreamInfo {
            route: "r".into(),
            ..StreamInfo::default()
        });
        let b = local.open(StreamInfo::default());
        assert_eq!(local.len(), 2);
        a.entry.record(10, 2, Some(b"41"));
        a.entry.record(5, 1, Some(b"42"));
        let snap = local.snapshot();
        assert_eq!(snap[0].events(), 3);
        assert_eq!(snap[0].bytes(), 15);
        assert_eq!(snap[0].last_event_id(), "42");
        a.close(CloseReason::OriginClosed, None);
        assert_eq!(local.len(), 1);
        assert_eq!(local.recent()[0].reason, CloseReason::OriginClosed);
        drop(b);
        assert!(local.is_empty());
        assert_eq!(local.recent()[0].reason, CloseReason::Error);
    }
}
