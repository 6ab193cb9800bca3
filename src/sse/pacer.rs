//! Write pacing for `flush_interval > 0`.
//!
//! Pingora writes and flushes one downstream chunk per upstream read and lets a body filter
//! hold a chunk by returning a delay. While a chunk is held, Pingora keeps reading the
//! origin, and everything that arrived meanwhile goes out with the next write. So pacing is:
//! a chunk that comes after a quiet spell (longer than the interval) is never held; a chunk
//! that follows a write by less than the interval is held until one interval after that
//! write; the chunks that queued up behind a held chunk are released without a further
//! hold. No chunk waits longer than the interval (plus scheduling delay).

use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct FlushPacer {
    interval: Duration,
    last_write: Option<Instant>,
    /// When the last hold ended: chunks seen right after it queued up during it.
    hold_end: Option<Instant>,
}

impl FlushPacer {
    pub fn new(interval: Duration) -> Self {
        FlushPacer {
            interval,
            last_write: None,
            hold_end: None,
        }
    }

    /// How long to hold the chunk that is about to be written at `now`.
    pub fn delay(&mut self, now: Instant) -> Option<Duration> {
        if let Some(end) = self.hold_end {
            if now.saturating_duration_since(end) < self.interval / 4 {
                self.last_write = Some(now);
                return None;
            }
            self.hold_end = None;
        }
        match self.last_write {
            Some(last) if now < last + self.interval => {
                let until = last + self.interval;
                self.hold_end = Some(until);
                self.last_write = Some(until);
                Some(until - now)
            }
            _ => {
                self.last_write = Some(now);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn sparse_chunks_are_never_held() {
        let mut p = FlushPacer::new(50 * MS);
        let t0 = Instant::now();
        for i in 0..5 {
            assert_eq!(p.delay(t0 + i * 100 * MS), None);
        }
    }

    #[test]
    fn bursts_are_coalesced_and_no_chunk_waits_past_the_interval() {
        let mut p = FlushPacer::new(50 * MS);
        let t0 = Instant::now();
        assert_eq!(p.delay(t0), None);
        // Arrives 5 ms after a write: held until 50 ms.
        assert_eq!(p.delay(t0 + 5 * MS), Some(45 * MS));
        // Chunks that queued while it was held go out with it, unheld.
        assert_eq!(p.delay(t0 + 50 * MS), None);
        assert_eq!(p.delay(t0 + 50 * MS), None);
        // A new burst later is held again, at most one interval after the last write.
        assert_eq!(p.delay(t0 + 70 * MS), Some(30 * MS));
        assert_eq!(p.delay(t0 + 100 * MS), None);
        // And after a quiet spell, nothing is held.
        assert_eq!(p.delay(t0 + 500 * MS), None);
    }
}
