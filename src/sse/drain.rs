//! The drain signal of one server instance: set once, when the process begins to shut down
//! (`SIGTERM`, or `SIGQUIT` after handing the listeners to a new process with `-u`).
//!
//! Each stream's loop watches it: when the drain starts, every stream picks a random moment
//! within its `drain_period` ([`drain_deadline`]) and ends at the first event boundary after
//! it, with a `retry:` hint, so clients come back (to the new process) spread over the
//! period instead of all at once.
//!
//! A stream's loop asks again every time it wakes, which is at every event, so asking costs
//! no lock: each watcher has a waker slot of its own ([`Watch`]), registered in a list once
//! when the watch is made and woken once when the drain starts.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::task::AtomicWaker;
use slab::Slab;

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

/// When the drain started, once it has, who is waiting for it, and how the streams it met
/// ended.
#[derive(Debug, Default)]
pub struct Drain {
    started: OnceLock<Instant>,
    /// The watchers' waker slots, woken when the drain starts.
    watchers: Mutex<Slab<Arc<AtomicWaker>>>,
    outcomes: [AtomicU64; 3],
}

impl Drain {
    /// Starts draining open streams (idempotent).
    pub fn start(&self) {
        if self.started.set(Instant::now()).is_err() {
            return;
        }
        // A watcher registers its waker before it looks at `started`, and is in the list
        // before its first look: either it sees the drain, or it is woken here.
        let watchers = self.watchers.lock().unwrap_or_else(|e| e.into_inner());
        for (_, waker) in watchers.iter() {
            waker.wake();
        }
    }

    /// Whether the process is draining: no new streams are taken.
    pub fn draining(&self) -> bool {
        self.started.get().is_some()
    }

    /// When the drain started, if it has.
    pub fn started_at(&self) -> Option<Instant> {
        self.started.get().copied()
    }

    /// A watcher of the drain, for a loop that asks at every turn ([`Watch::poll_started`]).
    pub fn watch(&self) -> Watch<'_> {
        let waker = Arc::new(AtomicWaker::new());
        let key = self
            .watchers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(waker.clone());
        Watch {
            drain: self,
            key,
            waker,
        }
    }

    /// Resolves when the drain has started, with the moment it did.
    pub fn started(&self) -> impl Future<Output = Instant> + '_ {
        let watch = self.watch();
        std::future::poll_fn(move |cx| watch.poll_started(cx))
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

/// One watcher of the drain; it leaves the list when dropped.
#[derive(Debug)]
pub struct Watch<'a> {
    drain: &'a Drain,
    key: usize,
    waker: Arc<AtomicWaker>,
}

impl Watch<'_> {
    /// Ready with the moment the drain started, once it has; else `cx`'s task is woken
    /// when it does. No lock: an atomic waker slot and a load.
    pub fn poll_started(&self, cx: &mut Context<'_>) -> Poll<Instant> {
        self.waker.register(cx.waker());
        match self.drain.started.get() {
            Some(started) => Poll::Ready(*started),
            None => Poll::Pending,
        }
    }
}

impl Drop for Watch<'_> {
    fn drop(&mut self) {
        let mut watchers = self
            .drain
            .watchers
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        watchers.try_remove(self.key);
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Waker;

    /// A waker that counts its wakes.
    struct Count(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn counting() -> (Arc<Count>, Waker) {
        let count = Arc::new(Count(Default::default()));
        (count.clone(), Waker::from(count))
    }

    #[test]
    fn every_watcher_is_woken_once_when_the_drain_starts_and_a_late_one_sees_it() {
        let drain = Drain::default();
        let mut watches: Vec<_> = (0..3).map(|_| drain.watch()).collect();
        let counts: Vec<_> = watches
            .iter()
            .map(|watch| {
                let (count, waker) = counting();
                let pending = watch.poll_started(&mut Context::from_waker(&waker));
                assert!(pending.is_pending(), "no drain yet");
                count
            })
            .collect();
        // A watcher that leaves is not woken, and leaves the list.
        drop(watches.pop());
        assert_eq!(drain.watchers.lock().expect("watchers").len(), 2);
        assert!(!drain.draining());

        drain.start();
        let started = drain.started_at().expect("started");
        drain.start();
        assert_eq!(drain.started_at(), Some(started), "the first start holds");
        let woken: Vec<_> = counts.iter().map(|c| c.0.load(Ordering::SeqCst)).collect();
        assert_eq!(woken, [1, 1, 0]);

        let late = drain.watch();
        let (_, waker) = counting();
        assert_eq!(
            late.poll_started(&mut Context::from_waker(&waker)),
            Poll::Ready(started)
        );
    }

    #[tokio::test]
    async fn started_resolves_when_the_drain_starts() {
        let drain = Arc::new(Drain::default());
        let waiting = tokio::spawn({
            let drain = drain.clone();
            async move { drain.started().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        drain.start();
        let started = waiting.await.expect("waiter");
        assert_eq!(Some(started), drain.started_at());
        assert_eq!(
            drain.watchers.lock().expect("watchers").len(),
            0,
            "the waiter left"
        );
    }
}
