//! The drain signal of one server instance: set once, when the process begins to shut down
//! (`SIGTERM`, or `SIGQUIT` after handing the listeners to a new process with `-u`).
//!
//! Each stream's loop watches it: when the drain starts, every stream picks a random moment
//! within its `drain_period` ([`drain_deadline`]) and ends at the first event boundary after
//! it, with a `retry:` hint, so clients come back (to the new process) spread over the
//! period instead of all at once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// How a stream open during a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A `GET` stream, ended at an event boundary with a `retry:` hint: its client comes
    /// back (to the new process) with `Last-Event-ID`.
    Reconnect,
    /// A stream of another method that ended by itself within `finish_period`.
    Finished,
    /// A stream of another method still running when `finish_period` ran out.
    Cut,
}

impl Outcome {
    pub const ALL: [Outcome; 3] = [Outcome::Reconnect, Outcome::Finished, Outcome::Cut];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Reconnect => "reconnect",
            Outcome::Finished => "finished",
            Outcome::Cut => "cut",
        }
    }
}

/// When the drain started, once it has, and how the streams it met ended.
#[derive(Debug)]
pub struct Drain {
    started: watch::Sender<Option<Instant>>,
    outcomes: [AtomicU64; 3],
}

impl Default for Drain {
    fn default() -> Self {
        Drain {
            started: watch::channel(None).0,
            outcomes: Default::default(),
        }
    }
}

impl Drain {
    /// Starts draining open streams (idempotent).
    pub fn start(&self) {
        self.started.send_if_modified(|started| {
            let first = started.is_none();
            if first {
                *started = Some(Instant::now());
            }
            first
        });
    }

    /// Whether the process is draining: no new streams are taken.
    pub fn draining(&self) -> bool {
        self.started.borrow().is_some()
    }

    /// A receiver that changes once, when the drain starts.
    pub fn signal(&self) -> watch::Receiver<Option<Instant>> {
        self.started.subscribe()
    }

    /// Resolves when the drain has started, with the moment it did.
    pub async fn started(&self) -> Instant {
        let mut signal = self.signal();
        loop {
            if let Some(started) = *signal.borrow_and_update() {
                return started;
            }
            if signal.changed().await.is_err() {
                // The sender lives as long as `self`: never reached.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Counts a stream that ended during the drain.
    pub fn ended(&self, outcome: Outcome) {
        self.outcomes[outcome as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// How many streams ended each way during the drain, as one line for the log.
    pub fn summary(&self) -> String {
        Outcome::ALL
            .iter()
            .map(|o| {
                let n = self.outcomes[*o as usize].load(Ordering::Relaxed);
                format!("{} {n}", o.as_str())
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// When a stream should end during a drain that started at `started`: a uniformly random
/// moment within `period`.
pub fn drain_deadline(started: Instant, period: Duration) -> Instant {
    let millis = period.as_millis().min(u128::from(u64::MAX)) as u64;
    let far = started + Duration::from_secs(86_400 * 365);
    started
        .checked_add(Duration::from_millis(fastrand::u64(0..=millis)))
        .map_or(far, |at| at.min(far))
}
