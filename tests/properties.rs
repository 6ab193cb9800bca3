//! Property tests (proptest) of what reads untrusted or hand-written bytes: the config
//! loader and the SSE event scanner. (Path normalization and routing have theirs beside
//! the code, in `src/routing/path.rs`.)
//!
//! CI runs proptest's default number of cases; a longer run sets `PROPTEST_CASES`:
//!
//! ```sh
//! PROPTEST_CASES=100000 cargo nextest run --locked prop_
//! ```

use std::path::Path;

use proptest::prelude::*;
use streamgate::sse::scanner::{EventScanner, MAX_ID};
use streamgate::Config;

// --- The config loader ----------------------------------------------------------------

/// The shipped configs, the seeds that mutations start from.
fn seeds() -> Vec<(String, String)> {
    let conf = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf");
    [
        "streamgate.yaml",
        "production.yaml",
        "default.yaml",
        "conf.d/notifications.yaml",
    ]
    .iter()
    .map(|name| {
        let text = std::fs::read_to_string(conf.join(name)).expect("seed config");
        (name.to_string(), text)
    })
    .collect()
}

/// Text that YAML, serde and the config's own checks each read in their own way.
const SNIPPETS: &[&str] = &[
    "\n",
    ": ",
    "- ",
    "  ",
    "    ",
    "\t",
    "{",
    "}",
    "[",
    "]",
    "\"",
    "'",
    ",",
    "#",
    "0",
    "-1",
    "65536",
    "1e999",
    "0x10",
    "~",
    "null",
    "true",
    "&a ",
    "*a",
    "!!str ",
    "!!binary ",
    "? ",
    "|",
    ">",
    "5s",
    "0ms",
    "100ms",
    "9999999999999999999d",
    "0.0.0.0:99999",
    "[::1]:80",
    "http://",
    "https://x:0/",
    "~[",
    "~^/(",
    "/x/*",
    "*.",
    "%",
    "@",
    "\u{e9}",
    "\u{feff}",
    "\0",
    "---\n",
    "...\n",
    "<<: ",
    "name: x",
    "type: headers",
    "type: nope",
    "config: ",
    "target: nope",
    "pattern: ",
    "url: ",
    "discovery: ",
    "tls: ",
    "include: ",
];

#[derive(Debug, Clone)]
enum Mutation {
    Delete {
        at: prop::sample::Index,
        len: usize,
    },
    Insert {
        at: prop::sample::Index,
        snippet: &'static str,
    },
    CopyLine {
        from: prop::sample::Index,
        to: prop::sample::Index,
    },
    DropLine {
        at: prop::sample::Index,
    },
    Truncate {
        at: prop::sample::Index,
    },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        2 => (any::<prop::sample::Index>(), 1usize..12)
            .prop_map(|(at, len)| Mutation::Delete { at, len }),
        4 => (any::<prop::sample::Index>(), prop::sample::select(SNIPPETS))
            .prop_map(|(at, snippet)| Mutation::Insert { at, snippet }),
        1 => (any::<prop::sample::Index>(), any::<prop::sample::Index>())
            .prop_map(|(from, to)| Mutation::CopyLine { from, to }),
        1 => any::<prop::sample::Index>().prop_map(|at| Mutation::DropLine { at }),
        1 => any::<prop::sample::Index>().prop_map(|at| Mutation::Truncate { at }),
    ]
}

/// The char boundary at or before byte `at`.
fn boundary(text: &str, at: usize) -> usize {
    let mut at = at.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

fn apply(text: &mut String, m: &Mutation) {
    let len = text.len().max(1);
    match m {
        Mutation::Delete { at, len: n } => {
            let start = boundary(text, at.index(len));
            let end = boundary(text, start + n);
            text.replace_range(start..end, "");
        }
        Mutation::Insert { at, snippet } => {
            let at = boundary(text, at.index(len));
            text.insert_str(at, snippet);
        }
        Mutation::CopyLine { from, to } => {
            let lines: Vec<&str> = text.lines().collect();
            if lines.is_empty() {
                return;
            }
            let line = lines[from.index(lines.len())].to_string();
            let mut out: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
            out.insert(to.index(out.len() + 1), line);
            *text = out.join("\n");
        }
        Mutation::DropLine { at } => {
            let mut lines: Vec<&str> = text.lines().collect();
            if !lines.is_empty() {
                lines.remove(at.index(lines.len()));
            }
            *text = lines.join("\n");
        }
        Mutation::Truncate { at } => {
            let at = boundary(text, at.index(len));
            text.truncate(at);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        // Each case loads a whole config (regexes, TLS checks, services): fewer cases than
        // the cheap properties, unless PROPTEST_CASES says otherwise.
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(128),
        ..ProptestConfig::default()
    })]

    #[test]
    fn prop_config_errors_always_name_a_file_and_a_line(
        seed in any::<prop::sample::Index>(),
        mutations in proptest::collection::vec(mutation(), 1..5),
    ) {
        let seeds = seeds();
        let (name, text) = &seeds[seed.index(seeds.len())];
        let mut text = text.clone();
        for m in &mutations {
            apply(&mut text, m);
        }
        // An empty directory: includes match nothing, relative paths name nothing.
        let dir = tempfile::tempdir().expect("temp dir");
        let base = dir.path();
        let file = base.join(name.replace('/', "_"));
        // Never a panic: a panic fails the case with its input.
        match Config::from_text(&file, &text, base) {
            Ok(_) => {}
            Err(e) => {
                prop_assert!(
                    e.file == file || e.file.starts_with(base),
                    "error names another file: {e}\n---\n{text}"
                );
                prop_assert!(e.line.is_some(), "error without a line: {e}\n---\n{text}");
            }
        }
    }
}

// --- The SSE scanner against a reference parser ----------------------------------------

/// What a client following the WHATWG event-stream rules has seen after `stream`:
/// events dispatched, the last event ID, and whether it stands between events.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    events: u64,
    last_id: Vec<u8>,
    between_events: bool,
}

/// The WHATWG "event stream interpretation", written plainly, on bytes: one leading BOM
/// is ignored; lines end in CRLF, LF or CR; a line starting with `:` is a comment; a
/// field is `name[: value]` (one space after the colon dropped; no colon: the whole line
/// is the name); `data` appends to the data buffer, `id` without NUL sets the last event
/// ID buffer; a blank line dispatches: the last event ID is set from its buffer, and an
/// event is dispatched when the data buffer is not empty. Data after the last line end is
/// not yet a line. The id is compared cut at the scanner's [`MAX_ID`].
fn reference(stream: &[u8]) -> Seen {
    let mut s = stream;
    if s.starts_with(b"\xEF\xBB\xBF") {
        s = &s[3..];
    }
    let mut lines = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            b'\n' => {
                lines.push(&s[start..i]);
                i += 1;
                start = i;
            }
            b'\r' => {
                lines.push(&s[start..i]);
                i += if s.get(i + 1) == Some(&b'\n') { 2 } else { 1 };
                start = i;
            }
            _ => i += 1,
        }
    }
    // A BOM that has not fully arrived yet is not content yet either.
    let partial_bom = !stream.is_empty() && b"\xEF\xBB\xBF".starts_with(stream) && stream.len() < 3;
    let pending = start < s.len();
    let (mut events, mut data, mut id_buffer, mut last_id) =
        (0u64, Vec::new(), Vec::new(), Vec::new());
    let mut fields_in_block = false;
    for line in lines {
        if line.is_empty() {
            last_id = id_buffer.clone();
            if !data.is_empty() {
                events += 1;
            }
            data.clear();
            fields_in_block = false;
            continue;
        }
        if line[0] == b':' {
            continue;
        }
        fields_in_block = true;
        let (name, value) = match line.iter().position(|&b| b == b':') {
            Some(p) => {
                let v = &line[p + 1..];
                (&line[..p], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &b""[..]),
        };
        match name {
            b"data" => {
                data.extend_from_slice(value);
                data.push(b'\n');
            }
            b"id" if !value.contains(&0) => id_buffer = value.to_vec(),
            _ => {}
        }
    }
    last_id.truncate(MAX_ID);
    Seen {
        events,
        last_id,
        between_events: !pending && !fields_in_block && !partial_bom,
    }
}

fn observe(scanner: &EventScanner) -> Seen {
    Seen {
        events: scanner.events(),
        last_id: scanner.last_id().to_vec(),
        between_events: scanner.at_boundary(),
    }
}

/// One line of an event stream, without its end.
fn line() -> impl Strategy<Value = Vec<u8>> {
    let name = prop::sample::select(vec![
        "data", "id", "event", "retry", "dat", "ids", "", " data", "DATA", "i",
    ]);
    let colon = prop::sample::select(vec![":", ": ", "::", ":  ", ""]);
    let value = prop_oneof![
        8 => proptest::collection::vec(
            prop::sample::select(vec!["x", "1", " ", ":", "\0", "\u{e9}", "id", "data: "]),
            0..6,
        )
        .prop_map(|v| v.concat()),
        1 => "[a-z0-9]{250,300}",
    ];
    prop_oneof![
        6 => (name, colon, value).prop_map(|(n, c, v)| format!("{n}{c}{v}").into_bytes()),
        1 => "[ -~]{0,8}".prop_map(|c| format!(":{c}").into_bytes()),
        2 => Just(Vec::new()),
    ]
}

/// A stream: maybe a BOM (or part of one), lines with mixed line ends, maybe a last line
/// without its end.
fn stream() -> impl Strategy<Value = Vec<u8>> {
    let end = prop::sample::select(vec!["\n", "\r", "\r\n"]);
    let bom = prop::sample::select(vec!["", "", "", "\u{feff}", "\u{feff}\u{feff}"]);
    (
        bom,
        proptest::collection::vec((line(), end), 0..16),
        proptest::option::of(line()),
        any::<bool>(),
    )
        .prop_map(|(bom, lines, last, cut_bom)| {
            let mut out = bom.as_bytes().to_vec();
            if cut_bom && out.len() == 3 {
                out.truncate(2);
                out.extend_from_slice(b"data");
            }
            for (l, e) in lines {
                out.extend_from_slice(&l);
                out.extend_from_slice(e.as_bytes());
            }
            if let Some(l) = last {
                out.extend_from_slice(&l);
            }
            out
        })
}

/// Chunk boundaries: cut points into a stream of any length.
fn cuts() -> impl Strategy<Value = Vec<prop::sample::Index>> {
    proptest::collection::vec(any::<prop::sample::Index>(), 0..12)
}

fn chunks<'a>(stream: &'a [u8], cuts: &[prop::sample::Index]) -> Vec<&'a [u8]> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c.index(stream.len() + 1)).collect();
    points.push(0);
    points.push(stream.len());
    points.sort_unstable();
    points.dedup();
    points.windows(2).map(|w| &stream[w[0]..w[1]]).collect()
}

proptest! {
    #[test]
    fn prop_scanner_agrees_with_the_reference_after_every_chunk(
        stream in stream(),
        cuts in cuts(),
    ) {
        let mut scanner = EventScanner::new();
        let mut seen = 0;
        for chunk in chunks(&stream, &cuts) {
            let before = scanner.events();
            let completed = scanner.feed(chunk);
            seen += chunk.len();
            prop_assert_eq!(completed, scanner.events() - before);
            prop_assert_eq!(observe(&scanner), reference(&stream[..seen]), "after {:?}", &stream[..seen]);
        }
        prop_assert_eq!(scanner.bytes(), stream.len() as u64);
    }

    #[test]
    fn prop_feed_to_boundary_stops_at_the_first_event_end(
        stream in stream(),
        at in any::<prop::sample::Index>(),
    ) {
        let split = at.index(stream.len() + 1);
        let (head, rest) = stream.split_at(split);
        let mut scanner = EventScanner::new();
        scanner.feed(head);
        let was_between = scanner.at_boundary();
        let n = scanner.feed_to_boundary(rest);
        prop_assert_eq!(observe(&scanner), reference(&stream[..split + n]));
        if was_between {
            prop_assert_eq!(n, 0);
        } else if n < rest.len() {
            prop_assert!(scanner.at_boundary());
        }
        // No earlier point was between events, except the CR of a CRLF whose LF it took.
        for k in 1..n {
            let crlf = k + 1 == n && rest[k - 1] == b'\r' && rest[k] == b'\n';
            prop_assert!(
                crlf || !reference(&stream[..split + k]).between_events,
                "stopped at {} of {:?}, but {} was already between events", n, rest, k
            );
        }
    }
}
