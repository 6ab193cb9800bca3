//! Property tests (proptest) of what reads untrusted or hand-written bytes: the config
//! loader, the SSE event scanner, and path normalization with the route table (a path and
//! its other spellings route alike and reach the origin as one path). The chunked decoder
//! has its own beside the code, in `src/relay/origin.rs`.
//!
//! CI runs proptest's default number of cases; a longer run sets `PROPTEST_CASES`:
//!
//! ```sh
//! PROPTEST_CASES=100000 cargo nextest run --locked prop_
//! ```

use std::borrow::Cow;
use std::path::Path;
use std::sync::OnceLock;

use pingora_http::RequestHeader;
use proptest::prelude::*;
use streamgate::relay::inbound::canonicalize;
use streamgate::routing::{normalize_path, PathRefusal};
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

// --- Path normalization and routing --------------------------------------------------

/// Characters a normalized segment may hold: unreserved ones, a few sub-delims, and
/// escapes of reserved or non-ASCII bytes.
fn segment() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        4 => proptest::char::ranges(vec!['a'..='z', 'A'..='Z', '0'..='9'].into())
            .prop_map(|c| c.to_string()),
        2 => prop::sample::select(vec!["-", ".", "_", "~", "!", "$", "&", "'", "(", ")",
            "*", "+", ",", "=", ":", "@"]).prop_map(str::to_string),
        1 => prop::sample::select(vec!["%20", "%3F", "%23", "%25", "%C3%A9", "%3A", "%3B"])
            .prop_map(str::to_string),
    ];
    proptest::collection::vec(piece, 1..8)
        .prop_map(|pieces| pieces.concat())
        .prop_filter("not a dot segment", |s| s != "." && s != "..")
}

/// A normalized path: segments joined by single slashes, maybe a trailing slash.
fn normalized() -> impl Strategy<Value = String> {
    (proptest::collection::vec(segment(), 0..6), any::<bool>()).prop_map(|(segments, trailing)| {
        let mut path = String::from("/");
        path.push_str(&segments.join("/"));
        if trailing && !segments.is_empty() {
            path.push('/');
        }
        path
    })
}

/// Another spelling of `path`: unreserved characters percent-encoded at random (in
/// either case), escapes in lower case, slashes repeated.
fn respell(path: &str, choices: &[u8]) -> String {
    let mut out = String::new();
    let mut choice = choices.iter().cycle();
    let mut next = || choice.next().copied().unwrap_or(0);
    let bytes = path.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        let roll = next();
        if c == b'%' {
            let escape = &path[i..i + 3];
            out.push_str(&if roll % 2 == 0 {
                escape.to_ascii_lowercase()
            } else {
                escape.to_string()
            });
            i += 3;
            continue;
        }
        match c {
            b'/' => {
                for _ in 0..=(roll % 3) {
                    out.push('/');
                }
            }
            c if is_unreserved(c) && roll % 3 == 0 => {
                let escaped = format!("%{c:02X}");
                out.push_str(&if roll % 2 == 0 {
                    escaped.to_ascii_lowercase()
                } else {
                    escaped
                });
            }
            c => out.push(char::from(c)),
        }
        i += 1;
    }
    out
}

/// `/admin/*` and friends beside a catch-all: the shape of the bypass, as a config.
fn routes() -> &'static Config {
    static CONFIG: OnceLock<Config> = OnceLock::new();
    CONFIG.get_or_init(|| {
        let text = "services:\n  s: { url: \"http://127.0.0.1:9\" }\n\
            host_rules:\n  - pattern: \"*\"\n    target: s\n    route_rules:\n\
            \x20     - { pattern: \"/admin/*\", target: s, name: admin }\n\
            \x20     - { pattern: \"/admin/users\", target: s, name: admin-users }\n\
            \x20     - { pattern: \"/api/v1/*\", target: s, name: api }\n\
            \x20     - { pattern: \"~^/u/[0-9]+$\", target: s, name: user }\n";
        Config::from_text(Path::new("routes.yaml"), text, Path::new(".")).expect("config")
    })
}

/// What the proxy makes of a request for `target`: the route it takes (or why none) and
/// the target the origin gets.
fn through_the_proxy(target: &str) -> Result<(String, String), String> {
    let mut req =
        RequestHeader::build("GET", target.as_bytes(), None).map_err(|e| e.to_string())?;
    req.insert_header("host", "example.com")
        .map_err(|e| e.to_string())?;
    canonicalize(&mut req).map_err(|e| e.to_string())?;
    let route = match routes()
        .routes
        .lookup(Some("example.com"), Some(80), req.uri.path())
    {
        Ok(route) => route.name.clone(),
        Err(miss) => format!("{miss:?}"),
    };
    Ok((route, String::from_utf8_lossy(req.raw_path()).into_owned()))
}

/// Paths made of the words the table routes on, so lookups hit every route.
fn routed_path() -> impl Strategy<Value = String> {
    let word = prop::sample::select(vec![
        "admin", "users", "api", "v1", "u", "42", "7", "x.y", "~a", "-",
    ]);
    (proptest::collection::vec(word, 1..5), any::<bool>()).prop_map(|(words, trailing)| {
        let mut path = format!("/{}", words.join("/"));
        if trailing {
            path.push('/');
        }
        path
    })
}

proptest! {
    #[test]
    fn prop_path_normalization_never_panics(raw in any::<String>()) {
        let _ = normalize_path(&raw);
    }

    #[test]
    fn prop_path_normalization_never_panics_on_escapes(
        raw in "/[%/.;a-fA-F0-9\\\\\\x00;]{0,24}",
    ) {
        let _ = normalize_path(&raw);
    }

    #[test]
    fn prop_a_normalized_path_is_a_fixed_point(raw in "/[a-zA-Z0-9%/._~;:-]{0,40}") {
        if let Ok(once) = normalize_path(&raw) {
            let twice = normalize_path(&once);
            prop_assert_eq!(twice.as_deref(), Ok(once.as_ref()));
            prop_assert!(matches!(twice, Ok(Cow::Borrowed(_))));
        }
    }

    #[test]
    fn prop_every_spelling_normalizes_to_the_same_path(
        path in normalized(),
        choices in proptest::collection::vec(any::<u8>(), 1..64),
    ) {
        let same = normalize_path(&path);
        prop_assert_eq!(same.as_deref(), Ok(path.as_str()));
        let spelling = respell(&path, &choices);
        let respelled = normalize_path(&spelling);
        prop_assert_eq!(respelled.as_deref(), Ok(path.as_str()), "{}", spelling);
    }

    #[test]
    fn prop_ambiguous_forms_are_refused(
        path in normalized(),
        at in any::<prop::sample::Index>(),
        form in prop::sample::select(vec![
            ("%2F", PathRefusal::EncodedSlash),
            ("%2f", PathRefusal::EncodedSlash),
            ("%5C", PathRefusal::Backslash),
            ("%5c", PathRefusal::Backslash),
            ("\\", PathRefusal::Backslash),
            ("%00", PathRefusal::ControlCharacter),
            ("\0", PathRefusal::ControlCharacter),
            ("/..;/", PathRefusal::DotSegment),
            ("/../", PathRefusal::DotSegment),
            ("/%2e%2E/", PathRefusal::DotSegment),
            ("/./", PathRefusal::DotSegment),
            ("/.%2e;x/", PathRefusal::DotSegment),
        ]),
    ) {
        // Inserted at a character boundary after the leading slash.
        let boundaries: Vec<usize> = (1..=path.len()).filter(|i| path.is_char_boundary(*i)).collect();
        let cut = boundaries[at.index(boundaries.len())];
        // Not inside an escape, where the inserted text would be read differently.
        let cut = match path[..cut].rfind('%') {
            Some(p) if cut - p < 3 => p,
            _ => cut,
        }.max(1);
        let raw = format!("{}{}{}", &path[..cut], form.0, &path[cut..]);
        prop_assert_eq!(normalize_path(&raw), Err(form.1), "{}", raw);
    }

    #[test]
    fn prop_spellings_route_and_go_on_alike(
        path in routed_path(),
        choices in proptest::collection::vec(any::<u8>(), 1..64),
        query in proptest::option::of("[a-z0-9=&%/.]{0,12}"),
    ) {
        let query = query.map(|q| format!("?{q}")).unwrap_or_default();
        let spelling = respell(&path, &choices);
        let (route, forwarded) = through_the_proxy(&format!("{spelling}{query}"))
            .map_err(|e| TestCaseError::fail(format!("{spelling}: {e}")))?;
        let (same_route, same) = through_the_proxy(&path)
            .map_err(|e| TestCaseError::fail(format!("{path}: {e}")))?;
        prop_assert_eq!(&route, &same_route, "{} routes like {}", spelling, path);
        prop_assert_eq!(forwarded, format!("{same}{query}"), "{}", spelling);
    }
}

/// RFC 3986 unreserved characters: percent-encoding them does not change a path.
fn is_unreserved(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~')
}
