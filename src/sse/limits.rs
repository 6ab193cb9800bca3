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

/// A limit an event stream counts against.
#[derive(Debug, Clone)]
pub enum Limit {
    /// `max_connections` of a block: `scope` names it in the refusal ("this proxy",
    /// "this service", "this route").
    Streams {
        slots: Arc<Slots>,
        scope: &'static str,
    },
    /// `max_connections_per_client` of a block.
    PerClient(Arc<ClientSlots>),
}

/// Why a stream was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// A `max_connections` limit is full.
    Full { max: usize, scope: &'static str },
    /// The client has `max` streams open under a `max_connections_per_client` limit.
    Client { max: usize },
}

/// The limits one request's event stream counts against, and the slots it holds.
#[derive(Debug, Default)]
pub struct Limits {
    /// Every limit that applies, most general first.
    pub applying: Vec<Limit>,
    held: Vec<SlotGuard>,
    held_by_client: Vec<ClientSlotGuard>,
}

impl Limits {
    /// Takes a slot under every applying limit for a stream of `client`; on a full one, the
    /// refusal (and nothing is held). Taking them again is a no-op.
    pub fn take(&mut self, client: Option<IpAddr>) -> Result<(), Refusal> {
        if !self.held.is_empty() || !self.held_by_client.is_empty() {
            return Ok(());
        }
        let mut held = Vec::new();
        let mut held_by_client = Vec::new();
        for limit in &self.applying {
            match limit {
                Limit::Streams { slots, scope } => match slots.try_acquire() {
                    Some(guard) => held.push(guard),
                    None => {
                        return Err(Refusal::Full {
                            max: slots.max(),
                            scope,
                        })
                    }
                },
                Limit::PerClient(slots) => {
                    let Some(client) = client else { continue };
                    match slots.try_acquire(client) {
                        Some(guard) => held_by_client.push(guard),
                        None => return Err(Refusal::Client { max: slots.max() }),
                    }
                }
            }
        }
        // Every slot is taken, or (on a refusal above) the ones taken are released as
        // `held` drops.
        self.held = held;
        self.held_by_client = held_by_client;
        Ok(())
    }

    /// Whether the request holds slots (its stream is being counted).
    pub fn holding(&self) -> bool {
        !self.held.is_empty() || !self.held_by_client.is_empty()
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
