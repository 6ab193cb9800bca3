//! The SSE supervisor: a background service that starts the drain of open streams when
//! the process begins to shut down (`SIGTERM`, or `SIGQUIT` after handing the listeners to a
//! new process with `-u`), and runs the origin design's cleanup task, which closes tracked
//! streams whose origin has been silent longer than their `inactive_threshold`.
//!
//! The drain itself happens in each stream's relay ([`crate::proxy`]): when the drain
//! starts, every stream picks a random moment within its `drain_period` and ends at the
//! first event boundary after it, with a `retry:` hint, so clients come back (to the new
//! process) spread over the period instead of all at once.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use once_cell::sync::Lazy;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use tokio::sync::watch;

use super::tracker::TRACKER;

/// How often the cleanup task looks for inactive streams.
const CLEANUP_EVERY: Duration = Duration::from_millis(250);

/// When the drain started, once it has.
static DRAIN: Lazy<watch::Sender<Option<Instant>>> = Lazy::new(|| watch::channel(None).0);

/// Starts draining open streams (idempotent). The supervisor calls it when the process
/// begins to shut down.
pub fn start_drain() {
    DRAIN.send_if_modified(|started| {
        let first = started.is_none();
        if first {
            *started = Some(Instant::now());
        }
        first
    });
}

/// Whether the process is draining: no new streams are taken.
pub fn draining() -> bool {
    DRAIN.borrow().is_some()
}

/// A receiver that changes once, when the drain starts.
pub fn drain_signal() -> watch::Receiver<Option<Instant>> {
    DRAIN.subscribe()
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

pub struct Supervisor;

#[async_trait]
impl BackgroundService for Supervisor {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut cleanup = tokio::time::interval(CLEANUP_EVERY);
        cleanup.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut watching = true;
        // On SIGQUIT (the `-u` handover) Pingora sends the listening sockets to the new
        // process and then waits five seconds before it announces the shutdown. The drain
        // starts at once instead: clients that come back meanwhile reach the new process,
        // or are told to retry if the old one still accepts them.
        let mut quit = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::quit())
            .map_err(|e| log::warn!("cannot watch SIGQUIT ({e}); draining at shutdown"))
            .ok();
        loop {
            let handover = async {
                match quit.as_mut() {
                    Some(quit) => quit.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                Some(()) = handover, if !draining() => {
                    log::info!(
                        "SIGQUIT: handing over; draining {} tracked SSE stream(s)",
                        TRACKER.len()
                    );
                    start_drain();
                }
                changed = shutdown.changed(), if watching => {
                    watching = false;
                    if changed.is_ok() && *shutdown.borrow() {
                        log::info!(
                            "shutting down: draining {} tracked SSE stream(s)",
                            TRACKER.len()
                        );
                        start_drain();
                    }
                }
                _ = cleanup.tick() => {
                    let ended = TRACKER.end_inactive();
                    if ended > 0 {
                        log::info!("cleanup: closing {ended} inactive SSE stream(s)");
                    }
                }
            }
        }
    }
}
