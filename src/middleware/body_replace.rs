//! `body_replace`: response modification: literal or regex replacement
//! in response bodies of chosen content types, streamed.
//!
//! ```yaml
//! type: body_replace
//! config:
//!   content_types: [text/html, text/event-stream]   # default: text/html, text/plain,
//!                                                   #   application/json, text/event-stream
//!   replacements:
//!     - { literal: "http://internal.svc", with: "https://api.example.com" }
//!     - { regex: "token=[A-Za-z0-9]+", with: "token=***" }   # $1.. refer to groups
//!   max_match: 1KiB        # longest text a rule can match (default: the longest literal,
//!                          # or 1KiB when there are regexes)
//! ```
//!
//! It never buffers a whole body. Ordinary bodies are rewritten as they stream, holding back
//! at most `max_match - 1` bytes so that a match split across chunks is still found (those
//! bytes are searched again with the next chunk, nothing more). Event streams are rewritten
//! event by event: every complete event in a chunk goes out at once, rewritten; only an
//! event's unfinished tail waits for its end (at most 1 MiB, then it goes out unrewritten),
//! and each byte is searched for an event end once, however small the chunks. The rules
//! run as one combined regex, leftmost match first.
//!
//! Phases: `upstream_request` (asks the origin for an uncompressed body, since compressed
//! bytes cannot be rewritten) and `response` (drops `Content-Length`, which no longer holds,
//! and installs the body filter). Compressed responses are passed through untouched.

use bytes::{Bytes, BytesMut};
use http::header::{ACCEPT_ENCODING, CONTENT_ENCODING, CONTENT_TYPE};
use pingora_error::Result;
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::Session;
use regex::bytes::Regex;
use serde::Deserialize;

use super::size_limit::ByteSize;
use super::{BodyFilter, Context, Middleware};
use crate::http_util::{drop_content_length, media_essence, remove_request_header};
use crate::sse;
use crate::sse::scanner::EventScanner;

/// Longest event kept back waiting for its end; a longer one goes out unrewritten.
const MAX_EVENT: usize = 1024 * 1024;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_types")]
    pub content_types: Vec<String>,
    pub replacements: Vec<Rule>,
    #[serde(default)]
    pub max_match: Option<ByteSize>,
}

fn default_types() -> Vec<String> {
    [
        "text/html",
        "text/plain",
        "application/json",
        "text/event-stream",
    ]
    .map(String::from)
    .to_vec()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    #[serde(default)]
    pub literal: Option<String>,
    #[serde(default)]
    pub regex: Option<String>,
    pub with: String,
}

/// The compiled rules, shared by every request's filter.
#[derive(Debug)]
struct Rules {
    /// All rules as one alternation; group `r{i}` is rule i.
    combined: Regex,
    replacements: Vec<String>,
    /// Each rule's own regex, to expand `$1`-style references within its match.
    own: Vec<Regex>,
    max_match: usize,
}

impl Rules {
    fn replace(&self, data: &[u8], out: &mut BytesMut) {
        let mut pos = 0;
        for caps in self.combined.captures_iter(data) {
            let Some(whole) = caps.get(0) else { continue };
            out.extend_from_slice(&data[pos..whole.start()]);
            self.expand(&caps, whole.as_bytes(), out);
            pos = whole.end();
        }
        out.extend_from_slice(&data[pos..]);
    }

    fn expand(&self, caps: &regex::bytes::Captures<'_>, matched: &[u8], out: &mut BytesMut) {
        let Some(i) = (0..self.own.len()).find(|i| caps.name(&format!("r{i}")).is_some()) else {
            out.extend_from_slice(matched);
            return;
        };
        let mut expanded = Vec::new();
        if let Some(own) = self.own[i].captures(matched) {
            own.expand(self.replacements[i].as_bytes(), &mut expanded);
        }
        out.extend_from_slice(&expanded);
    }
}

pub struct BodyReplace {
    types: Vec<String>,
    rules: std::sync::Arc<Rules>,
}

impl BodyReplace {
    pub fn new(config: &Config) -> Result<Self, String> {
        if config.replacements.is_empty() {
            return Err("replacements is empty".into());
        }
        let mut parts = Vec::new();
        let mut own = Vec::new();
        let mut longest_literal = 0;
        let mut has_regex = false;
        for (i, rule) in config.replacements.iter().enumerate() {
            let pattern = match (&rule.literal, &rule.regex) {
                (Some(l), None) if !l.is_empty() => {
                    longest_literal = longest_literal.max(l.len());
                    regex::escape(l)
                }
                (None, Some(r)) => {
                    has_regex = true;
                    r.clone()
                }
                _ => {
                    return Err(format!(
                        "replacements[{i}]: set exactly one of literal, regex"
                    ))
                }
            };
            own.push(
                Regex::new(&pattern)
                    .map_err(|e| format!("replacements[{i}]: invalid regex: {e}"))?,
            );
            parts.push(format!("(?P<r{i}>{pattern})"));
        }
        let combined = Regex::new(&parts.join("|")).map_err(|e| format!("invalid rules: {e}"))?;
        let max_match = match config.max_match {
            Some(ByteSize(n)) if n > 0 => usize::try_from(n).map_err(|_| "max_match too large")?,
            Some(_) => return Err("max_match must be at least 1 byte".into()),
            None if has_regex => 1024,
            None => longest_literal,
        }
        .max(longest_literal);
        Ok(BodyReplace {
            types: config
                .content_types
                .iter()
                .map(|t| t.trim().to_ascii_lowercase())
                .collect(),
            rules: std::sync::Arc::new(Rules {
                combined,
                replacements: config.replacements.iter().map(|r| r.with.clone()).collect(),
                own,
                max_match,
            }),
        })
    }

    fn applies_to(&self, content_type: &[u8]) -> bool {
        let essence = media_essence(content_type);
        self.types
            .iter()
            .any(|t| essence.eq_ignore_ascii_case(t.as_bytes()))
    }
}

impl Middleware for BodyReplace {
    fn upstream_request(
        &self,
        _session: &mut Session,
        request: &mut RequestHeader,
        _ctx: &mut Context,
    ) -> Result<()> {
        remove_request_header(request, &ACCEPT_ENCODING);
        Ok(())
    }

    fn response(
        &self,
        session: &mut Session,
        response: &mut ResponseHeader,
        _ctx: &mut Context,
    ) -> Result<Option<Box<dyn BodyFilter>>> {
        let Some(content_type) = response.headers.get(CONTENT_TYPE) else {
            return Ok(None);
        };
        if !self.applies_to(content_type.as_bytes())
            || response
                .headers
                .get(CONTENT_ENCODING)
                .is_some_and(|e| !e.as_bytes().eq_ignore_ascii_case(b"identity"))
        {
            return Ok(None);
        }
        let events = sse::is_event_stream(content_type.as_bytes());
        drop_content_length(response, session.req_header().version)?;
        Ok(Some(Box::new(ReplaceFilter::new(
            self.rules.clone(),
            events,
        ))))
    }
}

/// One response's rewriting state: the bytes held back for a match or event not yet whole.
struct ReplaceFilter {
    rules: std::sync::Arc<Rules>,
    /// Event streams: follows what arrives, to find where events end; each byte is looked
    /// at once, so an event that arrives in many small chunks costs time linear in its
    /// length, not in its length times the number of chunks.
    events: Option<EventScanner>,
    carry: BytesMut,
}

impl ReplaceFilter {
    fn new(rules: std::sync::Arc<Rules>, events: bool) -> Self {
        ReplaceFilter {
            rules,
            events: events.then(EventScanner::new),
            carry: BytesMut::new(),
        }
    }

    /// Ordinary bodies: where the held-back tail of `data` starts (a match may still grow
    /// from there).
    fn split_point(&self, data: &[u8]) -> usize {
        data.len()
            .saturating_sub(self.rules.max_match.saturating_sub(1))
    }

    fn process(&mut self, chunk: Option<&Bytes>, end_of_stream: bool) -> Option<Bytes> {
        // The end of the last whole event in the carry: it holds none before this chunk.
        let mut last_end = None;
        if let Some(chunk) = chunk {
            let held = self.carry.len();
            self.carry.extend_from_slice(chunk);
            if let Some(scanner) = &mut self.events {
                scanner.feed_with(chunk, |end| last_end = Some(held + end));
            }
        }
        if self.events.is_some() && !end_of_stream {
            let split = match last_end {
                Some(end) => end,
                None if self.carry.len() > MAX_EVENT => self.carry.len(),
                None => return None,
            };
            let whole = self.carry.split_to(split);
            let mut out = BytesMut::with_capacity(whole.len() + 64);
            self.rules.replace(&whole, &mut out);
            return (!out.is_empty()).then(|| out.freeze());
        }
        let data = std::mem::take(&mut self.carry);
        let mut out = BytesMut::with_capacity(data.len() + 64);
        if end_of_stream {
            self.rules.replace(&data, &mut out);
        } else {
            // Matches that start before `limit` are whole; later ones may still grow.
            let limit = self.split_point(&data);
            let mut pos = 0;
            for caps in self.rules.combined.captures_iter(&data) {
                let Some(whole) = caps.get(0) else { continue };
                if whole.start() >= limit {
                    break;
                }
                out.extend_from_slice(&data[pos..whole.start()]);
                self.rules.expand(&caps, whole.as_bytes(), &mut out);
                pos = whole.end();
            }
            let emit_to = pos.max(limit);
            out.extend_from_slice(&data[pos..emit_to]);
            self.carry.extend_from_slice(&data[emit_to..]);
        }
        (!out.is_empty()).then(|| out.freeze())
    }
}

impl BodyFilter for ReplaceFilter {
    fn filter(&mut self, body: &mut Option<Bytes>, end_of_stream: bool) -> Result<()> {
        *body = self.process(body.as_ref(), end_of_stream);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(yaml: &str, events: bool) -> ReplaceFilter {
        let mw = BodyReplace::new(&serde_yaml::from_str(yaml).expect("config")).expect("mw");
        ReplaceFilter::new(mw.rules.clone(), events)
    }

    fn run(f: &mut ReplaceFilter, chunks: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, c) in chunks.iter().enumerate() {
            let chunk = Bytes::copy_from_slice(c);
            if let Some(b) = f.process(Some(&chunk), i + 1 == chunks.len()) {
                out.extend_from_slice(&b);
            }
        }
        out
    }

    #[test]
    fn a_match_split_at_every_position_is_found() {
        let body = b"see http://internal.svc/x and http://internal.svc/y.";
        let want = b"see https://api.example.com/x and https://api.example.com/y.";
        let yaml =
            "replacements: [{ literal: 'http://internal.svc', with: 'https://api.example.com' }]";
        for cut in 0..=body.len() {
            let mut f = filter(yaml, false);
            let out = run(&mut f, &[&body[..cut], &body[cut..]]);
            assert_eq!(out, want, "cut at {cut}");
        }
        // Byte by byte.
        let mut f = filter(yaml, false);
        let chunks: Vec<&[u8]> = body.chunks(1).collect();
        assert_eq!(run(&mut f, &chunks), want);
    }

    #[test]
    fn regex_rules_expand_groups_and_respect_max_match() {
        let yaml =
            "replacements: [{ regex: 'token=([a-z]+)', with: 'token=<$1-hidden>' }]\nmax_match: 32";
        let body = b"a token=abc b token=defg";
        for cut in 0..=body.len() {
            let mut f = filter(yaml, false);
            let out = run(&mut f, &[&body[..cut], &body[cut..]]);
            assert_eq!(
                out, b"a token=<abc-hidden> b token=<defg-hidden>",
                "cut {cut}"
            );
        }
    }

    #[test]
    fn events_are_rewritten_whole_and_never_held_once_complete() {
        let yaml = "replacements: [{ literal: secret, with: '******' }]";
        let mut f = filter(yaml, true);
        // A complete event goes out at once.
        let out = f.process(Some(&Bytes::from_static(b"data: secret 1\n\n")), false);
        assert_eq!(out.as_deref(), Some(&b"data: ****** 1\n\n"[..]));
        // A split event waits for its end, even with the match split too.
        assert_eq!(
            f.process(Some(&Bytes::from_static(b"data: sec")), false),
            None
        );
        let out = f.process(Some(&Bytes::from_static(b"ret 2\r\n\r\ndata: x")), false);
        assert_eq!(out.as_deref(), Some(&b"data: ****** 2\r\n\r\n"[..]));
        let out = f.process(None, true);
        assert_eq!(out.as_deref(), Some(&b"data: x"[..]));
    }

    #[test]
    fn a_long_event_in_small_chunks_is_searched_once() {
        // 1 MiB in 16-byte chunks: each chunk must cost its own length, not the carry's.
        let yaml = "replacements: [{ literal: secret, with: '******' }]";
        let mut f = filter(yaml, true);
        let line = Bytes::from_static(b"data: secret secret secret x\n");
        let mut out = Vec::new();
        for _ in 0..(MAX_EVENT / line.len() - 1) {
            for piece in line.chunks(16) {
                let chunk = Bytes::copy_from_slice(piece);
                assert!(f.process(Some(&chunk), false).is_none(), "held until whole");
            }
        }
        let scanned = |f: &ReplaceFilter| f.events.as_ref().map(|s| s.bytes());
        assert_eq!(
            scanned(&f),
            Some(f.carry.len() as u64),
            "each byte looked at once"
        );
        out.extend_from_slice(
            &f.process(Some(&Bytes::from_static(b"\n")), false)
                .expect("the event"),
        );
        assert!(out.starts_with(b"data: ****** ****** ****** x\n"));
        assert!(f.carry.is_empty());
        assert!(f.events.as_ref().is_some_and(|s| s.at_boundary()));
    }

    #[test]
    fn bad_rules_are_refused() {
        let bad =
            |yaml: &str| BodyReplace::new(&serde_yaml::from_str(yaml).expect("parse")).is_err();
        assert!(bad("replacements: []"));
        assert!(bad("replacements: [{ with: x }]"));
        assert!(bad("replacements: [{ literal: a, regex: b, with: x }]"));
        assert!(bad("replacements: [{ regex: '(', with: x }]"));
    }
}
