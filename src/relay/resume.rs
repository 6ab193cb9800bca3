//! What a `resume` stream remembers to continue on another origin without a gap or a
//! repeat: it forwards only whole events (a dead origin's half event never reaches the
//! client), and it drops events whose id it already sent (an origin asked to continue
//! after `Last-Event-ID` may send that event again). What it remembers is bounded whatever
//! the origin sends: at most 256 ids and 8 KiB of them, ids over 64 bytes kept as a keyed
//! 64-bit hash.

use std::collections::hash_map::RandomState;
use std::collections::VecDeque;
use std::hash::BuildHasher;

use bytes::{Bytes, BytesMut};
use pingora_error::{Error, ErrorType, Result};

use crate::sse;
use crate::sse::scanner::EventScanner;

/// The longest event a `resume` stream holds back until it is complete.
const MAX_HELD_EVENT: usize = 1 << 20;

/// How many recent event ids a resumed stream remembers to drop repeats.
const RECENT_IDS: usize = 256;

/// The most bytes of ids a stream remembers, whatever their count: a peer that sends long
/// ids gets fewer of them remembered, never more memory.
const RECENT_ID_BYTES: usize = 8 * 1024;

/// Ids up to this long are remembered as they are; a longer one by a keyed 64-bit hash
/// (8 bytes), so one huge id cannot take the whole budget.
const LONG_ID: usize = 64;

/// One remembered id.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    Id(Vec<u8>),
    Long(u64),
}

impl Seen {
    fn bytes(&self) -> usize {
        match self {
            Seen::Id(id) => id.len(),
            Seen::Long(_) => 8,
        }
    }
}

/// The ids of the events a stream sent last, oldest first: at most [`RECENT_IDS`] of them
/// and [`RECENT_ID_BYTES`] of id bytes.
#[derive(Debug, Default)]
struct RecentIds {
    seen: VecDeque<Seen>,
    bytes: usize,
    hasher: RandomState,
}

impl RecentIds {
    fn key(&self, id: &[u8]) -> Seen {
        if id.len() <= LONG_ID {
            Seen::Id(id.to_vec())
        } else {
            Seen::Long(self.hasher.hash_one(id))
        }
    }

    fn contains(&self, id: &[u8]) -> bool {
        if id.len() <= LONG_ID {
            self.seen
                .iter()
                .any(|s| matches!(s, Seen::Id(seen) if seen == id))
        } else {
            let hash = self.hasher.hash_one(id);
            self.seen.iter().any(|s| *s == Seen::Long(hash))
        }
    }

    fn push(&mut self, id: &[u8]) {
        let seen = self.key(id);
        self.bytes += seen.bytes();
        self.seen.push_back(seen);
        while self.seen.len() > RECENT_IDS || self.bytes > RECENT_ID_BYTES {
            match self.seen.pop_front() {
                Some(old) => self.bytes -= old.bytes(),
                None => break,
            }
        }
    }

    /// How many ids are remembered.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.seen.len()
    }

    /// The bytes of ids (or their hashes) remembered.
    #[cfg(test)]
    fn bytes(&self) -> usize {
        self.bytes
    }
}

/// What a `resume` stream holds between its origin and its client: the part of an event
/// not yet whole, a scanner following it to find where events end, and the ids recently
/// sent. Made only for a stream that resumes (boxed by its loop), kept across resumes.
#[derive(Debug, Default)]
pub struct Held {
    /// Bytes from the origin after the last whole event; never a whole event.
    tail: BytesMut,
    /// Follows what arrives into `tail`.
    scanner: EventScanner,
    /// Where the events completed by the chunk at hand end in `tail`; empty between chunks.
    ends: Vec<usize>,
    recent: RecentIds,
    /// The stream continues from another origin: repeats are dropped.
    resumed: bool,
}

impl Held {
    /// `chunk` from the origin: the whole events it completes, as they go to the client
    /// (see [`pass_on`]); the rest is held. An error when more than [`MAX_HELD_EVENT`]
    /// bytes of one event would be held: not an event stream one can resume.
    pub fn take(&mut self, chunk: &[u8]) -> Result<Bytes> {
        let held = self.tail.len();
        self.tail.extend_from_slice(chunk);
        let ends = &mut self.ends;
        self.scanner.feed_with(chunk, |end| ends.push(held + end));
        if self.tail.len() > MAX_HELD_EVENT {
            return Err(Error::explain(
                ErrorType::InvalidHTTPHeader,
                format!("an event longer than {MAX_HELD_EVENT} bytes"),
            )
            .into_up());
        }
        let whole = self.ends.last().copied().unwrap_or(0);
        let events = self.tail.split_to(whole).freeze();
        let events = pass_on(events, &self.ends, &mut self.recent, self.resumed);
        self.ends.clear();
        Ok(events)
    }

    /// The stream continues from another origin: the half event held from the one that
    /// failed is dropped, and from now on events whose id was sent are dropped.
    pub fn resumed(&mut self) {
        self.tail.clear();
        self.scanner = EventScanner::new();
        self.resumed = true;
    }
}

/// `events` (whole events, ending at `ends`) as they go to the client: after a resume
/// (`resumed`) without those whose id was already sent; the ids of those that go are
/// remembered (within the count and byte bounds). Each event is looked at once.
fn pass_on(events: Bytes, ends: &[usize], recent: &mut RecentIds, resumed: bool) -> Bytes {
    let mut kept = bytes::BytesMut::new();
    let mut dropped = false;
    let mut sent_ids = Vec::new();
    let mut start = 0;
    for &end in ends {
        let event = &events[start..end];
        let id = sse::event_id(event).filter(|id| !id.is_empty());
        if resumed && id.is_some_and(|id| recent.contains(id)) {
            if !dropped {
                kept.extend_from_slice(&events[..start]);
                dropped = true;
            }
        } else {
            if dropped {
                kept.extend_from_slice(event);
            }
            sent_ids.extend(id);
        }
        start = end;
    }
    // Remembered after the check, so that a chunk is checked against what went before it.
    for id in sent_ids {
        recent.push(id);
    }
    if dropped {
        kept.freeze()
    } else {
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: &[u8]) -> Vec<u8> {
        let mut e = b"id: ".to_vec();
        e.extend_from_slice(id);
        e.extend_from_slice(b"\ndata: x\n\n");
        e
    }

    fn take(held: &mut Held, chunk: &[u8]) -> Bytes {
        held.take(chunk).expect("an event stream")
    }

    #[test]
    fn repeats_are_dropped() {
        let mut held = Held::default();
        let first = b"id: 1\ndata: a\n\nid: 2\ndata: b\n\n";
        assert_eq!(
            &take(&mut held, first)[..],
            first,
            "nothing dropped before a resume"
        );
        held.resumed();
        let out = take(&mut held, b"id: 2\ndata: b\n\nid: 3\ndata: c\n\n");
        assert_eq!(&out[..], b"id: 3\ndata: c\n\n");
        let out = take(
            &mut held,
            b"id: 4\ndata: d\n\nid: 3\ndata: c\n\nid: 5\ndata: e\n\n",
        );
        assert_eq!(
            &out[..],
            b"id: 4\ndata: d\n\nid: 5\ndata: e\n\n",
            "one dropped between two kept"
        );
        let long = vec![b'x'; 10_000];
        assert!(!take(&mut held, &event(&long)).is_empty());
        let out = take(&mut held, &event(&long));
        assert!(out.is_empty(), "a long id is remembered by its hash");
        let mut other = long.clone();
        other[9_999] = b'y';
        assert!(!take(&mut held, &event(&other)).is_empty());
    }

    #[test]
    fn only_whole_events_pass_and_a_failed_origins_half_event_is_dropped() {
        let mut held = Held::default();
        let out = take(&mut held, b"id: 1\ndata: a\r\n\r\nid: 2\nda");
        assert_eq!(&out[..], b"id: 1\ndata: a\r\n\r\n");
        assert!(take(&mut held, b"ta: half").is_empty(), "held until whole");
        held.resumed();
        let out = take(&mut held, b"id: 3\ndata: c\n\n");
        assert_eq!(&out[..], b"id: 3\ndata: c\n\n", "nothing of the half event");
        let endless = vec![b'x'; MAX_HELD_EVENT + 1];
        assert!(held.take(&endless).is_err(), "an event too long to hold");
    }

    #[test]
    fn memory_is_bounded_in_count_and_bytes() {
        let mut held = Held::default();
        for i in 0..10_000 {
            take(&mut held, &event(format!("{i}").as_bytes()));
        }
        assert_eq!(held.recent.len(), RECENT_IDS);
        let mut held = Held::default();
        for i in 0..2_000u32 {
            // Ids as long as may be kept verbatim, then far longer ones.
            let id = if i % 2 == 0 {
                vec![b'a' + (i % 26) as u8; LONG_ID]
            } else {
                vec![b'b'; 5_000 + i as usize]
            };
            take(&mut held, &event(&id));
            let bytes = held.recent.bytes();
            assert!(bytes <= RECENT_ID_BYTES, "{bytes}");
        }
        assert!(held.recent.len() < RECENT_IDS, "long ids: fewer of them");
        // The newest are the ones kept.
        let last = vec![b'b'; 5_000 + 1_999];
        assert!(held.recent.contains(&last));
    }
}
