//! Exiting as soon as a shutdown has nothing left to serve.
//!
//! Pingora, once told to shut down (`SIGTERM`, or after handing its listeners to a new
//! process on `SIGQUIT`), sleeps out the whole `grace_period_seconds` before it exits. The
//! grace period has to be as long as the longest drain or finish period, so that streams
//! can end the way their settings say; but most shutdowns have nothing open that long. This
//! background service watches the requests and streams in flight once the shutdown began,
//! and ends the process when none is left.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;

use crate::state::State;

/// How often the count is looked at while waiting.
const POLL: Duration = Duration::from_millis(50);

/// How long nothing may be in flight before the process exits: the last bytes a request
/// wrote may still be on their way through its connection (an HTTP/2 connection's task
/// sends what its streams queued, the drain's `retry:` hint among them).
const SETTLE: Duration = Duration::from_millis(250);

/// How often the wait says what it is waiting for.
const REPORT: Duration = Duration::from_secs(5);

pub struct Exit {
    pub state: Arc<State>,
}

#[async_trait]
impl BackgroundService for Exit {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        while !*shutdown.borrow() {
            if shutdown.changed().await.is_err() {
                return;
            }
        }
        let began = Instant::now();
        let mut reported = began;
        let mut idle_since: Option<Instant> = None;
        loop {
            let left = self.state.in_flight.count();
            let settled = match (left, idle_since) {
                (0, Some(since)) => since.elapsed() >= SETTLE,
                (0, None) => {
                    idle_since = Some(Instant::now());
                    false
                }
                _ => {
                    idle_since = None;
                    false
                }
            };
            if settled {
                log::info!(
                    "shutdown: nothing left to serve after {:.1}s (streams open at the drain: {}); exiting",
                    began.elapsed().as_secs_f64(),
                    self.state.drain.summary()
                );
                std::process::exit(0);
            }
            if reported.elapsed() >= REPORT {
                reported = Instant::now();
                log::info!(
                    "shutdown: waiting for {left} request(s) and stream(s) to end ({:.0}s so far)",
                    began.elapsed().as_secs_f64()
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }
}
