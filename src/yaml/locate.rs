//! Finds the line and column of a key path in a YAML document.
//!
//! serde_yaml reports positions for errors it finds itself (syntax, types, unknown fields,
//! values that fail to parse). Errors found after deserialisation, such as a reference to a
//! service that does not exist, only know their key path; this module walks the YAML event
//! stream to turn that path back into a position, so every config error names a line.

use std::fmt;

use yaml_rust2::parser::{Event, Parser};
use yaml_rust2::scanner::Marker;

/// One step of a key path: a mapping key or a sequence index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seg {
    Key(String),
    Index(usize),
}

/// A key path such as `host_rules[0].route_rules[2].target`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyPath(pub Vec<Seg>);

impl KeyPath {
    pub fn root() -> Self {
        KeyPath(Vec::new())
    }

    pub fn key(&self, key: &str) -> Self {
        let mut segs = self.0.clone();
        segs.push(Seg::Key(key.to_string()));
        KeyPath(segs)
    }

    pub fn index(&self, index: usize) -> Self {
        let mut segs = self.0.clone();
        segs.push(Seg::Index(index));
        KeyPath(segs)
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                Seg::Key(k) if i == 0 => write!(f, "{k}")?,
                Seg::Key(k) => write!(f, ".{k}")?,
                Seg::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

/// Line (1-based) and column (1-based) of the node at `path`: for a mapping key, the key
/// itself. `None` when the document does not parse or the path is not in it.
pub fn locate(source: &str, path: &KeyPath) -> Option<(usize, usize)> {
    let (events, root) = parse(source)?;
    let marker = events[find(&events, root, &path.0)?].1;
    Some((marker.line(), marker.col() + 1))
}

/// Line and column of the second `key` in the mapping at `path`: where a key given twice
/// is repeated.
pub fn locate_repeated(source: &str, path: &KeyPath, key: &str) -> Option<(usize, usize)> {
    let (events, root) = parse(source)?;
    let mut at = find(&events, root, &path.0)?;
    if matches!(path.0.last(), Some(Seg::Key(_))) {
        // `find` gives a mapping key; its value follows it.
        at = skip(&events, at)?;
    }
    if !matches!(events.get(at)?.0, Event::MappingStart(..)) {
        return None;
    }
    let mut seen = false;
    let mut i = at + 1;
    while !matches!(events.get(i)?.0, Event::MappingEnd) {
        if matches!(&events[i].0, Event::Scalar(k, ..) if k == key) {
            if seen {
                let marker = events[i].1;
                return Some((marker.line(), marker.col() + 1));
            }
            seen = true;
        }
        i = skip(&events, skip(&events, i)?)?;
    }
    None
}

/// The events of `source` and the index of its root node.
fn parse(source: &str) -> Option<(Vec<(Event, Marker)>, usize)> {
    let mut parser = Parser::new_from_str(source);
    let mut events: Vec<(Event, Marker)> = Vec::new();
    loop {
        let (event, marker) = parser.next_token().ok()?;
        let end = event == Event::StreamEnd;
        events.push((event, marker));
        if end {
            break;
        }
    }
    // The root node follows StreamStart and DocumentStart.
    let root = events
        .iter()
        .position(|(e, _)| !matches!(e, Event::StreamStart | Event::DocumentStart))?;
    Some((events, root))
}

/// Index of the event that starts the node at `path` from the node at `at` (for a mapping
/// key, the key).
fn find(events: &[(Event, Marker)], at: usize, path: &[Seg]) -> Option<usize> {
    let Some((first, rest)) = path.split_first() else {
        events.get(at)?;
        return Some(at);
    };
    match (&events.get(at)?.0, first) {
        (Event::MappingStart(..), Seg::Key(wanted)) => {
            let mut i = at + 1;
            while !matches!(events.get(i)?.0, Event::MappingEnd) {
                let value = skip(events, i)?;
                if matches!(&events[i].0, Event::Scalar(k, ..) if k == wanted) {
                    return if rest.is_empty() {
                        Some(i)
                    } else {
                        find(events, value, rest)
                    };
                }
                i = skip(events, value)?;
            }
            None
        }
        (Event::SequenceStart(..), Seg::Index(wanted)) => {
            let mut i = at + 1;
            for _ in 0..*wanted {
                if matches!(events.get(i)?.0, Event::SequenceEnd) {
                    return None;
                }
                i = skip(events, i)?;
            }
            if matches!(events.get(i)?.0, Event::SequenceEnd) {
                return None;
            }
            find(events, i, rest)
        }
        _ => None,
    }
}

/// Index of the event after the node that starts at `at`.
fn skip(events: &[(Event, Marker)], at: usize) -> Option<usize> {
    match events.get(at)?.0 {
        Event::MappingStart(..) | Event::SequenceStart(..) => {
            let mut depth = 0usize;
            for (i, (event, _)) in events.iter().enumerate().skip(at) {
                match event {
                    Event::MappingStart(..) | Event::SequenceStart(..) => depth += 1,
                    Event::MappingEnd | Event::SequenceEnd => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(i + 1);
                        }
                    }
                    _ => {}
                }
            }
            None
        }
        _ => Some(at + 1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "\
threads: 2
services:
  web:
    url: http://127.0.0.1:1
host_rules:
  - pattern: a.example.com
    route_rules:
      - pattern: /x
        target: web
      - pattern: /y
        target: nope
";

    #[test]
    fn finds_nested_keys_and_indexes() {
        let path = KeyPath::root()
            .key("host_rules")
            .index(0)
            .key("route_rules")
            .index(1)
            .key("target");
        assert_eq!(path.to_string(), "host_rules[0].route_rules[1].target");
        assert_eq!(locate(DOC, &path), Some((11, 9)));
        assert_eq!(
            locate(DOC, &KeyPath::root().key("services").key("web")),
            Some((3, 3))
        );
    }

    #[test]
    fn finds_a_repeated_key() {
        let doc = "services:\n  a:\n    url: x\n  b: { url: y }\n  a:\n    url: z\n";
        let services = KeyPath::root().key("services");
        assert_eq!(locate_repeated(doc, &services, "a"), Some((5, 3)));
        assert_eq!(locate_repeated(doc, &services, "b"), None);
        assert_eq!(
            locate_repeated("a: 1\na: 2\n", &KeyPath::root(), "a"),
            Some((2, 1))
        );
    }

    #[test]
    fn missing_paths_and_bad_yaml_give_none() {
        assert_eq!(locate(DOC, &KeyPath::root().key("nope")), None);
        assert_eq!(
            locate(DOC, &KeyPath::root().key("host_rules").index(3)),
            None
        );
        assert_eq!(locate("a: [", &KeyPath::root().key("a")), None);
    }
}
