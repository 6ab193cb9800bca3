//! The process's memory: its descriptor table, sized once at start, and what a burst
//! leaves behind, handed back after it.
//!
//! Linux grows a process's table of open descriptors by doubling it, and in a process with
//! several threads each growth waits for an RCU grace period (10-15 ms measured here) while
//! every thread that opens or accepts a connection waits with it. A fresh process taking
//! its first thousands of streams (a deploy, every client reconnecting at once) stalled at
//! 256, 512, 1,024 ... 16,384 descriptors: about one stream in twenty of the first 2,000
//! waited more than 3 ms for its first event (with the table sized, one in two hundred at
//! most). The table never shrinks, so [`Trim`] first sizes it
//! for the connections the listeners admit (each with one to its origin): one descriptor
//! put at the top and closed again leaves it grown. A single-threaded nginx worker does
//! not wait for the grace period; HAProxy, with threads, stalls like this too.
//!
//! glibc's allocator keeps what a thread freed in that thread's arena, for its next
//! allocations, rather than giving the pages back. A proxy that served thousands of
//! streams at once and then few keeps the resident memory of the burst: measured with a
//! million streams opened and closed 2,000 at a time, the resident memory rose by a
//! step each time a worker's arena grew (105 to 166 MiB) and never came down, although
//! nothing was left open. [`Trim`] asks glibc to return free pages
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

/// The most descriptors the table is sized for up front: 32,767 streams' worth, 512 KiB
/// of kernel memory. Beyond, the table grows as connections come (a few more doublings).
const RESERVE_AT_MOST: u64 = 65_536;

/// Descriptors beside the connections: listening sockets, pooled origin connections, the
/// runtimes' pollers, files, logs.
const RESERVE_BESIDE: u64 = 128;

pub struct Trim {
    pub state: Arc<State>,
    /// The client connections the listeners admit at once, all together.
    pub connections: u64,
}

#[async_trait]
impl BackgroundService for Trim {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        // Here, not as the server is built: a daemon's table is sized again by its fork.
        let wanted = self
            .connections
            .saturating_mul(2)
            .saturating_add(RESERVE_BESIDE);
        match reserve_descriptors(wanted) {
            Ok(size) => log::debug!("descriptor table sized for {size}"),
            Err(e) => log::warn!("could not size the descriptor table up front: {e}"),
        }
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

/// Grows the descriptor table now to hold `wanted` descriptors, at most
/// [`RESERVE_AT_MOST`] and the open-file limit; returns the count it was sized for.
pub fn reserve_descriptors(wanted: u64) -> std::io::Result<u64> {
    use std::os::fd::AsRawFd;
    let limit = crate::listen::open_file_limit().unwrap_or(1024);
    let size = wanted.min(RESERVE_AT_MOST).min(limit);
    let Ok(top @ 1..) = libc::c_int::try_from(size.saturating_sub(1)) else {
        return Ok(0);
    };
    let file = std::fs::File::open("/dev/null")?;
    // SAFETY: duplicates a descriptor this function owns onto the lowest free number at
    // or above `top`; the copy is closed below and nothing else learns its number.
    let copy = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_DUPFD_CLOEXEC, top) };
    if copy < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `copy` is this function's own descriptor, closed once.
    unsafe { libc::close(copy) };
    Ok(size)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The table's size, as the kernel reports it (`FDSize` in /proc/self/status).
    fn table_size() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").expect("status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("FDSize:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("FDSize")
    }

    #[test]
    fn the_descriptor_table_is_sized_up_front_within_the_open_file_limit() {
        let limit = crate::listen::open_file_limit().expect("limit");
        let wanted = 3_000.min(limit);
        assert_eq!(reserve_descriptors(wanted).expect("reserve"), wanted);
        assert!(table_size() >= wanted, "{} < {wanted}", table_size());
        // Never past the limit (fcntl would refuse), nor past the cap.
        assert!(reserve_descriptors(u64::MAX).expect("reserve") <= limit.min(RESERVE_AT_MOST));
        assert_eq!(reserve_descriptors(0).expect("nothing"), 0);
    }
}
