//! The SSE supervisor: a background service that starts the drain of open streams when
//! the process begins to shut down (`SIGTERM`, or `SIGQUIT` after handing the listeners to a
//! new process with `-u`), and runs the cleanup task, which closes tracked streams whose
//! origin has been silent longer than their `inactive_threshold`.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;

use super::drain::Drain;
use super::tracker::Tracker;

/// How often the cleanup task looks for inactive streams.
const CLEANUP_EVERY: Duration = Duration::from_millis(250);

/// The supervisor of one server instance's streams.
pub struct Supervisor {
    pub tracker: Arc<Tracker>,
    pub drain: Arc<Drain>,
}

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
                Some(()) = handover, if !self.drain.draining() => {
                    log::info!(
                        "SIGQUIT: handing over; draining {} tracked SSE stream(s)",
                        self.tracker.len()
                    );
                    self.drain.start();
                }
                changed = shutdown.changed(), if watching => {
                    watching = false;
                    if changed.is_ok() && *shutdown.borrow() {
                        log::info!(
                            "shutting down: draining {} tracked SSE stream(s)",
                            self.tracker.len()
                        );
                        self.drain.start();
                    }
                }
                _ = cleanup.tick() => {
                    let ended = self.tracker.end_inactive();
                    if ended > 0 {
                        log::info!("cleanup: closing {ended} inactive SSE stream(s)");
                    }
                }
            }
        }
    }
}
