//! Open-stream limits (`max_connections`, `max_connections_per_client`), exact under
//! concurrent opens.
//!
//! A [`Slots`] counts the event streams open under one limit: global, per service, or per
//! `sse` middleware instance. Taking a slot is one atomic increment that is undone if it
//! went over the limit, so no interleaving of concurrent opens ever admits one stream too
//! many. The slot is released when its [`SlotGuard`] drops, whichever way the request ends.
//!
//! Counters are kept per name in the server's [`Registry`], so a config reload keeps
//! counting the streams that are already open; the limit itself follows the new config.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

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

/// Streams open per client address under one `max_connections_per_client`.
#[derive(Debug)]
pub struct ClientSlots {
    open: Mutex<HashMap<IpAddr, usize>>,
    max: AtomicUsize,
}

impl ClientSlots {
    /// Takes a slot for `client`, or `None` when it already has `max` streams open.
    pub fn try_acquire(self: &Arc<Self>, client: IpAddr) -> Option<ClientSlotGuard> {
        let max = self.max.load(Ordering::Relaxed);
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let count = open.entry(client).or_insert(0);
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(ClientSlotGuard {
            slots: self.clone(),
            client,
        })
    }

    pub fn max(&self) -> usize {
        self.max.load(Ordering::Relaxed)
    }
}

/// One client's open stream; releases its slot on drop.
#[derive(Debug)]
pub struct ClientSlotGuard {
    slots: Arc<ClientSlots>,
    client: IpAddr,
}

impl Drop for ClientSlotGuard {
    fn drop(&mut self) {
        let mut open = self.slots.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = open.get_mut(&self.client) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.client);
            }
        }
    }
}

/// The limit counters of one server instance, by name (`global`, `service:feed`,
/// `middleware:limit`).
#[derive(Debug, Default)]
pub struct Registry {
    slots: Mutex<HashMap<String, Arc<Slots>>>,
    client_slots: Mutex<HashMap<String, Arc<ClientSlots>>>,
}

impl Registry {
    /// The counter for `name`, with its limit set to `max`. Called when a config is built,
    /// never per request.
    pub fn slots(&self, name: &str, max: usize) -> Arc<Slots> {
        let mut registry = self.slots.lock().unwrap_or_else(|p| p.into_inner());
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

    /// The per-client counters for `name`, with their limit set to `max`.
    pub fn client_slots(&self, name: &str, max: usize) -> Arc<ClientSlots> {
        let mut registry = self.client_slots.lock().unwrap_or_else(|p| p.into_inner());
        let slots = registry
            .entry(name.to_string())
            .or_insert_with(|| {
                Arc::new(ClientSlots {
                    open: Mutex::new(HashMap::new()),
                    max: AtomicUsize::new(max),
                })
            })
            .clone();
        slots.max.store(max, Ordering::Relaxed);
        slots
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_one_over_under_concurrent_opens() {
        let s = Registry::default().slots("test:concurrent", 50);
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
    fn per_client_limits_count_each_address() {
        let s = Registry::default().client_slots("test:clients", 2);
        let a: IpAddr = "192.0.2.1".parse().expect("ip");
        let b: IpAddr = "192.0.2.2".parse().expect("ip");
        let g1 = s.try_acquire(a).expect("first");
        let _g2 = s.try_acquire(a).expect("second");
        assert!(s.try_acquire(a).is_none());
        assert!(s.try_acquire(b).is_some());
        drop(g1);
        assert!(s.try_acquire(a).is_some());
    }

    #[test]
    fn reload_keeps_the_count_and_takes_the_new_limit() {
        let registry = Registry::default();
        let a = registry.slots("test:reload", 1);
        let guard = a.try_acquire().expect("slot");
        let b = registry.slots("test:reload", 2);
        assert_eq!(b.open(), 1);
        assert!(b.try_acquire().is_some());
        drop(guard);
    }
}
