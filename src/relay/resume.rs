//! What a `resume` stream remembers to continue on another origin without a gap or a
//! repeat: it forwards only whole events (a dead origin's half event never reaches the
//! client), and it drops events whose id it already sent (an origin asked to continue
//! after `Last-Event-ID` may send that event again).

use std::collections::VecDeque;

use bytes::Bytes;

use crate::sse;

/// The ids of the events a stream sent last, oldest first.
pub type RecentIds = VecDeque<Vec<u8>>;

/// The longest event a `resume` stream holds back until it is complete.
pub const MAX_HELD_EVENT: usize = 1 << 20;

/// How many recent event ids a resumed stream remembers to drop repeats.
const RECENT_IDS: usize = 256;

/// `events` (whole events) without those whose id was already sent.
pub fn drop_repeated(events: Bytes, recent: &RecentIds) -> Bytes {
    let mut kept = bytes::BytesMut::with_capacity(events.len());
    let mut rest = &events[..];
    let mut dropped = false;
    while let Some(end) = sse::first_event_end(rest) {
        let (event, after) = rest.split_at(end);
        let repeat = sse::event_id(event)
            .is_some_and(|id| !id.is_empty() && recent.iter().any(|seen| seen == id));
        if repeat {
            dropped = true;
        } else {
            kept.extend_from_slice(event);
        }
        rest = after;
    }
    if dropped {
        kept.freeze()
    } else {
        events
    }
}

/// Remembers the ids of `events` (whole events), keeping the last [`RECENT_IDS`].
pub fn remember_ids(events: &[u8], recent: &mut RecentIds) {
    let mut rest = events;
    while let Some(end) = sse::first_event_end(rest) {
        if let Some(id) = sse::event_id(&rest[..end]).filter(|id| !id.is_empty()) {
            if recent.len() == RECENT_IDS {
                recent.pop_front();
            }
            recent.push_back(id.to_vec());
        }
        rest = &rest[end..];
    }
}
