//! An incremental scanner of the SSE framing, fed the chunks of a stream as they pass.
//!
//! It follows the event-stream format of the HTML specification: lines end in LF, CR or
//! CRLF (a CRLF split across two chunks is one line end); a line starting with `:` is a
//! comment; an empty line dispatches the event; a leading UTF-8 BOM is skipped. It counts
//! dispatched events (blocks with at least one `data` field) and bytes, tells whether the
//! stream is between events (where something may be inserted without splitting one), and
//! remembers the last event id as a client would (the `id` buffer applies at dispatch; an
//! `id` containing NUL is ignored).
//!
//! It never alters or delays a chunk, and allocates nothing per chunk: the id is kept in a
//! buffer reused across events (ids longer than [`MAX_ID`] bytes are cut there). A line
//! whose end is in the chunk is taken whole with its end: the end is found with one
//! `memchr` (an empty line, the end of an event, by its first byte), the field by the
//! line's first bytes, and an id is copied as one slice, so a stream's bytes are not
//! looked at one by one. Only a line split across chunks is followed byte by byte up to
//! its colon, and from there it jumps to the line's end the same way.

/// Longest event id kept, in bytes.
pub const MAX_ID: usize = 256;

const BOM: &[u8] = b"\xEF\xBB\xBF";

/// Which field the current line is, as far as its name has been read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Line {
    /// Nothing on this line yet.
    Start,
    /// Reading the field name; holds how many bytes of it so far and a short copy.
    Name { len: usize, name: [u8; 5] },
    /// After the `:` of an `id` field.
    IdValue { skipped_space: bool },
    /// After the `:` of a `data` field, or any other field, or in a comment.
    Other,
}

#[derive(Debug, Clone)]
pub struct EventScanner {
    line: Line,
    /// The previous byte was a CR: a LF now is the same line end.
    after_cr: bool,
    /// That CR ended an empty line.
    blank_cr: bool,
    /// Bytes of the BOM matched so far at the start of the stream; `None` once decided.
    bom: Option<usize>,
    /// The current event has a `data` field.
    has_data: bool,
    /// The current event has any field (so the stream is inside an event).
    in_event: bool,
    /// The `id` being read on the current line.
    id_line: Vec<u8>,
    id_line_nul: bool,
    /// The last event ID buffer (set by `id` lines, applied at dispatch) is `ids[buffer]`,
    /// the last event id dispatched to the client `ids[last]`: a dispatch points `last` at
    /// the buffer rather than copying it, and an `id` line, which must not change the
    /// dispatched id, is written into the other slot when both point at one.
    ids: [Vec<u8>; 2],
    buffer: usize,
    last: usize,
    events: u64,
    bytes: u64,
}

impl Default for EventScanner {
    fn default() -> Self {
        EventScanner {
            line: Line::Start,
            after_cr: false,
            blank_cr: false,
            bom: Some(0),
            has_data: false,
            in_event: false,
            id_line: Vec::with_capacity(32),
            id_line_nul: false,
            ids: [Vec::with_capacity(32), Vec::with_capacity(32)],
            buffer: 0,
            last: 0,
            events: 0,
            bytes: 0,
        }
    }
}

impl EventScanner {
    pub fn new() -> Self {
        EventScanner::default()
    }

    /// Follows `chunk`; returns how many events it completed.
    pub fn feed(&mut self, chunk: &[u8]) -> u64 {
        self.feed_with(chunk, |_| {})
    }

    /// Follows `chunk` as [`EventScanner::feed`] does, and calls `at_end` with the offset
    /// in `chunk` just past each empty line (the end of an event, or of a block of
    /// comments), in order: there a client stands between events. When a CR ended an empty
    /// line at the end of the chunk before, an LF starting this one (which makes it a CRLF)
    /// moves that end past it, to 1.
    pub fn feed_with(&mut self, chunk: &[u8], mut at_end: impl FnMut(usize)) -> u64 {
        self.bytes += chunk.len() as u64;
        let before = self.events;
        let mut rest = chunk;
        if let Some(matched) = self.bom {
            let mut m = matched;
            while m < BOM.len() && !rest.is_empty() && rest[0] == BOM[m] {
                rest = &rest[1..];
                m += 1;
            }
            self.bom = if m == BOM.len() || !rest.is_empty() {
                None
            } else {
                Some(m)
            };
            if m > 0 && m < BOM.len() && self.bom.is_none() {
                // A partial BOM followed by other bytes: those bytes were content, the start
                // of a field with a name that is neither `id` nor `data`.
                self.in_event = true;
                self.line = Line::Other;
            }
        }
        // Offsets in `rest` are this much further in `chunk`.
        let base = chunk.len() - rest.len();
        let mut i = 0;
        while i < rest.len() {
            if self.line == Line::Start && !self.after_cr {
                // A line whose end is in this chunk is taken whole, its end with it.
                let end = if matches!(rest[i], b'\r' | b'\n') {
                    Some(0)
                } else {
                    memchr::memchr2(b'\r', b'\n', &rest[i..])
                };
                if let Some(len) = end {
                    if len == 0 {
                        self.dispatch();
                    } else {
                        self.whole_line(&rest[i..i + len]);
                    }
                    i += len + 1;
                    if rest[i - 1] == b'\r' {
                        // A CRLF is one line end; a CR at the chunk's end may be half of one.
                        match rest.get(i) {
                            Some(b'\n') => i += 1,
                            Some(_) => {}
                            None => {
                                self.after_cr = true;
                                self.blank_cr = len == 0;
                            }
                        }
                    }
                    if len == 0 {
                        at_end(base + i);
                    }
                    continue;
                }
            }
            let b = rest[i];
            i += 1;
            if self.after_cr {
                self.after_cr = false;
                if b == b'\n' {
                    if self.blank_cr {
                        at_end(base + i);
                    }
                    continue;
                }
            }
            match b {
                b'\r' | b'\n' => {
                    let blank = self.end_line();
                    if b == b'\r' {
                        self.after_cr = true;
                        self.blank_cr = blank;
                    }
                    if blank {
                        at_end(base + i);
                    }
                }
                _ => {
                    self.byte(b);
                    // The rest of a data line, a comment or another field is nothing to
                    // follow byte by byte: skip to its end (most of a stream's bytes).
                    if self.line == Line::Other {
                        i = memchr::memchr2(b'\r', b'\n', &rest[i..]).map_or(rest.len(), |k| i + k);
                    }
                }
            }
        }
        self.events - before
    }

    /// Follows the non-empty `line` and its end, from the start of a line: the state its
    /// bytes one by one through [`EventScanner::byte`] and [`EventScanner::end_line`]
    /// would leave. A field's name is what precedes its first colon, so `data` and `id`
    /// are told by the line's first bytes alone.
    fn whole_line(&mut self, line: &[u8]) {
        let named =
            |name: &[u8]| line.starts_with(name) && line.get(name.len()).is_none_or(|&b| b == b':');
        match line[0] {
            b':' => {}
            b'd' if named(b"data") => {
                self.in_event = true;
                self.has_data = true;
            }
            b'i' if named(b"id") => {
                self.in_event = true;
                let value = line.get(3..).unwrap_or_default();
                // One space after the colon is part of the syntax, not the value.
                let id = value.strip_prefix(b" ").unwrap_or(value);
                // An id containing NUL is ignored. (Ids are short: a plain loop, not memchr's
                // setup.)
                if !id.contains(&0) {
                    let slot = self.id_slot();
                    self.ids[slot].clear();
                    self.ids[slot].extend_from_slice(&id[..id.len().min(MAX_ID)]);
                }
            }
            _ => self.in_event = true,
        }
    }

    fn byte(&mut self, b: u8) {
        self.line = match self.line {
            Line::Start if b == b':' => Line::Other,
            Line::Start => {
                self.in_event = true;
                let mut name = [0u8; 5];
                name[0] = b;
                Line::Name { len: 1, name }
            }
            Line::Name { len, name } if b == b':' => self.field(&name[..len.min(5)], len),
            Line::Name { len, mut name } => {
                if len < name.len() {
                    name[len] = b;
                }
                Line::Name { len: len + 1, name }
            }
            Line::IdValue { skipped_space } => {
                if !skipped_space && b == b' ' {
                    // One space after the colon is part of the syntax, not the value.
                } else if b == 0 {
                    self.id_line_nul = true;
                } else if self.id_line.len() < MAX_ID {
                    self.id_line.push(b);
                }
                Line::IdValue {
                    skipped_space: true,
                }
            }
            Line::Other => Line::Other,
        };
    }

    /// The field whose name just ended with `:`.
    fn field(&mut self, name: &[u8], len: usize) -> Line {
        match (name, len) {
            (b"id", 2) => {
                self.id_line.clear();
                self.id_line_nul = false;
                Line::IdValue {
                    skipped_space: false,
                }
            }
            (b"data", 4) => {
                self.has_data = true;
                Line::Other
            }
            _ => Line::Other,
        }
    }

    /// Ends the current line; whether it was empty (the end of an event).
    fn end_line(&mut self) -> bool {
        let blank = self.line == Line::Start;
        match self.line {
            Line::Start => self.dispatch(),
            // A field name without a colon is the whole name with an empty value.
            Line::Name { len, name } => {
                let _ = self.field(&name[..len.min(5)], len);
                if matches!((&name[..len.min(5)], len), (b"id", 2)) {
                    self.set_id_buffer();
                }
            }
            Line::IdValue { .. } => self.set_id_buffer(),
            Line::Other => {}
        }
        self.line = Line::Start;
        blank
    }

    fn set_id_buffer(&mut self) {
        if !self.id_line_nul {
            let slot = self.id_slot();
            self.ids[slot].clear();
            self.ids[slot].extend_from_slice(&self.id_line);
        }
    }

    /// The slot the last event ID buffer is to be written in: not the dispatched id's.
    fn id_slot(&mut self) -> usize {
        if self.buffer == self.last {
            self.buffer ^= 1;
        }
        self.buffer
    }

    fn dispatch(&mut self) {
        if !self.in_event {
            return;
        }
        self.last = self.buffer;
        if self.has_data {
            self.events += 1;
        }
        self.has_data = false;
        self.in_event = false;
    }

    /// Follows `chunk` only up to the first event boundary in it and returns how many of
    /// its bytes that is (0 when the stream is already at one; `chunk.len()` when the
    /// chunk ends inside an event). Used to end a stream right after its current event.
    pub fn feed_to_boundary(&mut self, chunk: &[u8]) -> usize {
        if self.at_boundary() {
            return 0;
        }
        for i in 0..chunk.len() {
            self.feed(&chunk[i..i + 1]);
            if self.at_boundary() {
                // A CRLF's LF belongs to the line end just seen.
                let lf = self.after_cr && chunk.get(i + 1) == Some(&b'\n');
                if lf {
                    self.feed(b"\n");
                }
                return i + 1 + usize::from(lf);
            }
        }
        chunk.len()
    }

    /// Events dispatched so far.
    pub fn events(&self) -> u64 {
        self.events
    }

    /// Bytes seen so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The id of the last dispatched event (what a client would send as `Last-Event-ID`).
    pub fn last_id(&self) -> &[u8] {
        &self.ids[self.last]
    }

    /// Whether the stream is between events: at the start of a line, with no field of an
    /// unfinished event seen. Only here may something be inserted without splitting an
    /// event.
    pub fn at_boundary(&self) -> bool {
        self.line == Line::Start && !self.in_event && self.bom.is_none_or(|m| m == 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(chunks: &[&[u8]]) -> (u64, Vec<u8>, bool) {
        let mut s = EventScanner::new();
        for c in chunks {
            s.feed(c);
        }
        (s.events(), s.last_id().to_vec(), s.at_boundary())
    }

    const SAMPLE: &[u8] = b"\xEF\xBB\xBF: hello\r\nretry: 1000\r\n\r\nid: 1\ndata: a\n\nid\ndata\r\rdata: x\r\nid: 3\r\nevent: e\r\ndata: b\r\ndata: c\r\n\r\n:keepalive\n\nid: 4\x00\ndata: d\n\nid:5\ndata:e\n\nid: partial";

    #[test]
    fn counts_events_and_follows_ids() {
        let (events, last, boundary) = scan(&[SAMPLE]);
        assert_eq!(events, 5);
        assert_eq!(
            last, b"5",
            "an id with NUL is ignored; `id:5` without a space counts"
        );
        assert!(!boundary, "the stream ends inside an event");
        let mut s = EventScanner::new();
        s.feed(b"data: x\n\n");
        assert!(s.at_boundary());
        s.feed(b"data: y\n");
        assert!(!s.at_boundary());
    }

    /// The dispatched id changes only at a dispatch: an `id` line of an event still open
    /// does not show, an event without an id keeps the one before, the last of two `id`
    /// lines wins (whether each line came whole or byte by byte).
    #[test]
    fn the_last_id_changes_only_when_an_event_is_dispatched() {
        let steps: [(&[u8], &[u8]); 5] = [
            (b"id: 7\ndata: a\n\n", b"7"),
            (b"id: 8\n", b"7"),
            (b"data: b\n\n", b"8"),
            (b"data: c\n\n", b"8"),
            (b"id: 9\nid: 10\ndata: d\n\n", b"10"),
        ];
        let mut whole = EventScanner::new();
        let mut bytes = EventScanner::new();
        for (chunk, last) in steps {
            whole.feed(chunk);
            for b in chunk {
                bytes.feed(std::slice::from_ref(b));
            }
            assert_eq!(whole.last_id(), last);
            assert_eq!(bytes.last_id(), last);
        }
    }

    #[test]
    fn split_at_every_position_gives_the_same_result() {
        let whole = scan(&[SAMPLE]);
        for cut in 0..=SAMPLE.len() {
            assert_eq!(
                scan(&[&SAMPLE[..cut], &SAMPLE[cut..]]),
                whole,
                "cut at {cut}"
            );
            for cut2 in cut..=SAMPLE.len() {
                let parts = [&SAMPLE[..cut], &SAMPLE[cut..cut2], &SAMPLE[cut2..]];
                assert_eq!(scan(&parts), whole, "cuts at {cut}, {cut2}");
            }
        }
        let bytes: Vec<&[u8]> = SAMPLE.chunks(1).collect();
        assert_eq!(scan(&bytes), whole);
    }

    /// Where empty lines end in `data`, read in one pass the plainest way: a line ends at
    /// LF, CR or CRLF; an empty line ends an event.
    fn empty_line_ends(data: &[u8]) -> Vec<usize> {
        let (mut ends, mut line_start, mut i) = (Vec::new(), 0, 0);
        while i < data.len() {
            if data[i] != b'\n' && data[i] != b'\r' {
                i += 1;
                continue;
            }
            let mut next = i + 1;
            if data[i] == b'\r' && data.get(next) == Some(&b'\n') {
                next += 1;
            }
            if i == line_start {
                ends.push(next);
            }
            line_start = next;
            i = next;
        }
        ends
    }

    #[test]
    fn event_ends_follow_all_line_endings() {
        let event_ends = |data: &[u8]| {
            let mut ends = Vec::new();
            EventScanner::new().feed_with(data, |end| ends.push(end));
            ends
        };
        let last = |data: &[u8]| event_ends(data).last().copied();
        assert_eq!(event_ends(b"data: a\n\ndata: b\r\n\r\n"), [9, 20]);
        assert_eq!(event_ends(b"id: 1\ndata: a\n\nid: 2\n"), [15]);
        assert_eq!(last(b"data: a\r\rdata: b"), Some(9));
        assert_eq!(last(b"data: a\r\n\r\n"), Some(11));
        assert_eq!(
            last(b"data: a\r\n\r"),
            Some(10),
            "a CR ends its line even where an LF may follow"
        );
        assert_eq!(last(b"id: 1\rdata: a\r\r"), Some(15));
        assert_eq!(last(b"data: a\r"), None);
        assert_eq!(last(b"data: a\n"), None);
        assert_eq!(last(b"\n"), Some(1));
        assert_eq!(last(b"a\n\nb\n\nc"), Some(6));
        assert_eq!(
            last(b": comment\n\n"),
            Some(11),
            "a block of comments ends too"
        );
    }

    #[test]
    fn event_ends_are_found_incrementally_as_in_one_pass() {
        let stream: &[u8] =
            b"data: a\n\n\ndata: b\r\n\r\ndata: c\r\rid: 1\ndata: d\r\n\rdata: e\n\r\n:x\n\n\r\n";
        for sample in [stream, SAMPLE] {
            for size in 1..=sample.len() {
                let mut s = EventScanner::new();
                let mut seen = 0;
                let mut last = None;
                for chunk in sample.chunks(size) {
                    s.feed_with(chunk, |end| last = Some(seen + end));
                    seen += chunk.len();
                    // A CR ending the piece ends its line; its LF, when it comes, moves
                    // the end past it.
                    assert_eq!(
                        last,
                        empty_line_ends(&sample[..seen]).last().copied(),
                        "size {size}, after {:?}",
                        &sample[..seen]
                    );
                }
            }
        }
    }

    #[test]
    fn feed_to_boundary_stops_after_the_current_event() {
        let mut s = EventScanner::new();
        assert_eq!(
            s.feed_to_boundary(b"data: a\n\ndata: b\n\n"),
            0,
            "already between events"
        );
        s.feed(b"data: a\nda");
        let chunk = b"ta: b\n\ndata: c\n\n";
        let n = s.feed_to_boundary(chunk);
        assert_eq!(&chunk[..n], b"ta: b\n\n");
        assert_eq!(s.events(), 1);
        assert!(s.at_boundary());

        let mut s = EventScanner::new();
        s.feed(b"data: a\r\n");
        let chunk = b"\r\nrest";
        assert_eq!(s.feed_to_boundary(chunk), 2, "the CRLF is kept whole");
        assert_eq!(s.events(), 1);

        let mut s = EventScanner::new();
        s.feed(b"data: a");
        assert_eq!(s.feed_to_boundary(b"bc\n"), 3, "no boundary in the chunk");
        assert!(!s.at_boundary());
    }
}
