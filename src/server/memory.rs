//! Handing memory back to the system after a burst.
//!
//! glibc's allocator keeps what a thread freed in that thread's arena, for its next
//! allocations, rather than giving the pages back. A proxy that served thousands of
//! streams at once and then few keeps the resident memory of the burst: measured with a
//! million streams opened and closed 2,000 at a time, the resident memory rose by a
//! step each time a worker's arena grew (105 to 166 MiB) and never came down, although
//! nothing was left open. This background service asks glibc to return free pages
//! (`malloc_trim`) when the requests and streams in flight have fallen to half of their
//! peak since the last time, at most every few seconds, so a steady load is left alone and
//! the memory of a burst goes back once it is over.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;

use crate::state::State;

/// How often the count in flight is looked at.
const CHECK: Duration = Duration::from_secs(5);

/// A peak smaller than this is not worth a trim.
const MIN_PEAK: usize = 64;

pub struct Trim {
    pub state: Arc<State>,
}

#[async_trait]
impl BackgroundService for Trim {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut peak = 0;
        loop {
            tokio::select! {
                () = tokio::time::sleep(CHECK) => {}
                _ = shutdown.changed() => return,
            }
            let now = self.state.in_flight.count();
            peak = peak.max(now);
            if peak >= MIN_PEAK && now <= peak / 2 {
                let began = Instant::now();
                let released = trim();
                log::debug!(
                    "in flight {now}, peak {peak}: returned free memory to the system \
                     ({released}) in {:?}",
                    began.elapsed()
                );
                peak = now;
            }
        }
    }
}

/// Asks the allocator to return its free pages; says whether it could.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() -> &'static str {
    // SAFETY: malloc_trim only walks glibc's own arenas, under their locks.
    match unsafe { libc::malloc_trim(0) } {
        0 => "nothing to return",
        _ => "some returned",
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() -> &'static str {
    "not with this allocator"
}
