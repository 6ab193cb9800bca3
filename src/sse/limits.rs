//! Open-stream limits (`max_connections`), exact under concurrent opens.
//!
//! A [`Slots`] counts the event streams open under one limit: global, per service, or per
//! `sse` middleware instance. Taking a slot is one atomic increment that is undone if it
//! went over the limit, so no interleaving of concurrent opens ever admits one stream too
//! many. The slot is released when its [`SlotGuard`] drops, whichever way the request ends.
//!
//! Counters are kept per name for the life of the process, so a config reload keeps
//! counting the streams that are already open; the limit itself follows the new config.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use once_cell::sync::Lazy;

#[derive(Debug)]
pub struct Slots {
    open: AtomicUsize,
    max: AtomicUsize,
}

impl Slots {
    /// Takes a slot, or `None` when `max` streams are already open.
    pub fn try_acquire(self: &Arc<Self>) -> Option<SlotGuard> {
        let max = self.max.load(Ordering::Relaxed);
        let before = self.open.fetch_add(1, Ordering::AcqRel);
        if before >= max {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(SlotGuard(self.clone()))
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    pub fn max(&self) -> usize {
        self.max.load(Ordering::Relaxed)
    }
}

/// One open stream under a limit; releases its slot on drop.
#[derive(Debug)]
pub struct SlotGuard(Arc<Slots>);

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

static REGISTRY: Lazy<Mutex<HashMap<String, Arc<Slots>>>> = Lazy::new(Default::default);

/// The counter for `name` (for example `global`, `service:feed`), with its limit set to
/// `max`. Called when a config is built, never per request.
pub fn slots(name: &str, max: usize) -> Arc<Slots> {
    let mut registry = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
    let slots = registry
        .entry(name.to_string())
        .or_insert_with(|| {
            Arc::new(Slots {
                open: AtomicUsize::new(0),
                max: AtomicUsize::new(max),
            })
        })
        .clone();
    slots.max.store(max, Ordering::Relaxed);
    slots
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_one_over_under_concurrent_opens() {
        let s = slots("test:concurrent", 50);
        let held: Vec<SlotGuard> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    let s = s.clone();
                    scope
                        .spawn(move || (0..100).filter_map(|_| s.try_acquire()).collect::<Vec<_>>())
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().expect("thread"))
                .collect()
        });
        assert_eq!(held.len(), 50);
        assert_eq!(s.open(), 50);
        drop(held);
        assert_eq!(s.open(), 0);
    }

    #[test]
    fn reload_keeps_the_count_and_takes_the_new_limit() {
        let a = slots("test:reload", 1);
        let guard = a.try_acquire().expect("slot");
        let b = slots("test:reload", 2);
        assert_eq!(b.open(), 1);
        assert!(b.try_acquire().is_some());
        drop(guard);
    }
}
