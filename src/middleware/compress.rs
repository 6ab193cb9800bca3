//! `compress`: gzip or brotli for responses the client accepts, by content type and size;
//! for event streams only when asked, and then flushed at every event.
//!
//! ```yaml
//! type: compress
//! config:
//!   algorithms: [br, gzip]     # preference order (default)
//!   level: 5                   # 1 (fast) to 9 (small); brotli uses it as its quality too
//!   min_size: 1KiB             # responses with a smaller Content-Length stay as they are
//!   content_types: [text/html, text/css, text/plain, application/javascript,
//!                   application/json, image/svg+xml]        # default
//!   sse: false                 # true: compress text/event-stream as well
//! ```
//!
//! Pingora's own compression module holds data until the end of a stream, so streamgate
//! never installs it. Here, an ordinary body is compressed as it streams; an event stream
//! (with `sse: true`) gets a sync flush whenever a chunk completes an event, so every event
//! is decodable by the client as soon as it arrives. Responses already encoded, marked
//! `Cache-Control: no-transform`, or without a body are left alone.
//!
//! Phase: `response` (sets `Content-Encoding` and `Vary`, drops `Content-Length`, installs
//! the encoder as a body filter).

use std::io::Write;

use bytes::Bytes;
use flate2::write::GzEncoder;
use http::header::{
    ACCEPT_ENCODING, CACHE_CONTROL, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE, VARY,
};
use http::Method;
use pingora_error::{Error, ErrorType, Result};
use pingora_http::ResponseHeader;
use pingora_proxy::Session;
use serde::Deserialize;

use super::size_limit::ByteSize;
use super::{BodyFilter, Context, Middleware};
use crate::http_util::{drop_content_length, list_accepts, media_essence};
use crate::sse;
use crate::sse::scanner::EventScanner;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<String>,
    #[serde(default = "default_level")]
    pub level: u32,
    #[serde(default = "default_min_size")]
    pub min_size: ByteSize,
    #[serde(default = "default_types")]
    pub content_types: Vec<String>,
    #[serde(default)]
    pub sse: bool,
}

fn default_algorithms() -> Vec<String> {
    vec!["br".into(), "gzip".into()]
}

fn default_level() -> u32 {
    5
}

fn default_min_size() -> ByteSize {
    ByteSize(1024)
}

fn default_types() -> Vec<String> {
    [
        "text/html",
        "text/css",
        "text/plain",
        "application/javascript",
        "application/json",
        "image/svg+xml",
    ]
    .map(String::from)
    .to_vec()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    Gzip,
    Brotli,
}

impl Algorithm {
    fn token(self) -> &'static str {
        match self {
            Algorithm::Gzip => "gzip",
            Algorithm::Brotli => "br",
        }
    }
}

pub struct Compress {
    algorithms: Vec<Algorithm>,
    level: u32,
    min_size: u64,
    types: Vec<String>,
    sse: bool,
}

impl Compress {
    pub fn new(config: &Config) -> Result<Self, String> {
        let algorithms = config
            .algorithms
            .iter()
            .map(|a| match a.as_str() {
                "gzip" => Ok(Algorithm::Gzip),
                "br" => Ok(Algorithm::Brotli),
                other => Err(format!("unknown algorithm `{other}`: use br or gzip")),
            })
            .collect::<Result<Vec<_>, _>>()?;
        if algorithms.is_empty() {
            return Err("algorithms is empty".into());
        }
        if !(1..=9).contains(&config.level) {
            return Err("level must be between 1 and 9".into());
        }
        Ok(Compress {
            algorithms,
            level: config.level,
            min_size: config.min_size.0,
            types: config
                .content_types
                .iter()
                .map(|t| t.trim().to_ascii_lowercase())
                .collect(),
            sse: config.sse,
        })
    }

    /// The first configured algorithm the client accepts (`q` above zero).
    fn negotiate(&self, accept: &[u8]) -> Option<Algorithm> {
        let accepted = |token: &str| {
            list_accepts(accept, |name| {
                name.eq_ignore_ascii_case(token.as_bytes()) || name == b"*"
            })
        };
        self.algorithms
            .iter()
            .copied()
            .find(|a| accepted(a.token()))
    }
}

impl Middleware for Compress {
    fn response(
        &self,
        session: &mut Session,
        response: &mut ResponseHeader,
        _ctx: &mut Context,
    ) -> Result<Option<Box<dyn BodyFilter>>> {
        let req = session.req_header();
        let status = response.status.as_u16();
        if req.method == Method::HEAD
            || status < 200
            || status == 204
            || status == 304
            || response.headers.contains_key(CONTENT_ENCODING)
            || response
                .headers
                .get(CACHE_CONTROL)
                .is_some_and(|v| v.to_str().is_ok_and(|v| v.contains("no-transform")))
        {
            return Ok(None);
        }
        let Some(content_type) = response.headers.get(CONTENT_TYPE) else {
            return Ok(None);
        };
        let events = sse::is_event_stream(content_type.as_bytes());
        if events && !self.sse {
            return Ok(None);
        }
        let ty = media_essence(content_type.as_bytes());
        if !events
            && !self
                .types
                .iter()
                .any(|t| ty.eq_ignore_ascii_case(t.as_bytes()))
        {
            return Ok(None);
        }
        let length = response
            .headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if !events && length.is_some_and(|n| n < self.min_size) {
            return Ok(None);
        }
        let Some(algorithm) = req
            .headers
            .get(ACCEPT_ENCODING)
            .and_then(|a| self.negotiate(a.as_bytes()))
        else {
            return Ok(None);
        };
        response.insert_header(CONTENT_ENCODING, algorithm.token())?;
        response.append_header(VARY, "accept-encoding")?;
        drop_content_length(response, session.req_header().version)?;
        let encoder = match algorithm {
            Algorithm::Gzip => Encoder::Gzip(GzEncoder::new(
                Vec::new(),
                flate2::Compression::new(self.level),
            )),
            Algorithm::Brotli => Encoder::Brotli(Box::new(brotli::CompressorWriter::new(
                Vec::new(),
                4096,
                self.level,
                22,
            ))),
        };
        Ok(Some(Box::new(CompressFilter {
            encoder: Some(encoder),
            events: events.then(EventScanner::new),
        })))
    }
}

enum Encoder {
    Gzip(GzEncoder<Vec<u8>>),
    Brotli(Box<brotli::CompressorWriter<Vec<u8>>>),
}

impl Encoder {
    fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        match self {
            Encoder::Gzip(e) => e.write_all(data),
            Encoder::Brotli(e) => e.write_all(data),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Encoder::Gzip(e) => e.flush(),
            Encoder::Brotli(e) => e.flush(),
        }
    }

    /// The compressed bytes produced so far.
    fn take(&mut self) -> Vec<u8> {
        match self {
            Encoder::Gzip(e) => std::mem::take(e.get_mut()),
            Encoder::Brotli(e) => std::mem::take(e.get_mut()),
        }
    }

    fn finish(self) -> std::io::Result<Vec<u8>> {
        match self {
            Encoder::Gzip(e) => e.finish(),
            Encoder::Brotli(e) => Ok(e.into_inner()),
        }
    }
}

struct CompressFilter {
    encoder: Option<Encoder>,
    /// Event streams: follows what passes, to flush where an event ends.
    events: Option<EventScanner>,
}

fn encode_error(e: std::io::Error) -> Box<Error> {
    Error::because(ErrorType::InternalError, "compressing the response", e)
}

impl BodyFilter for CompressFilter {
    fn filter(&mut self, body: &mut Option<Bytes>, end_of_stream: bool) -> Result<()> {
        let Some(mut encoder) = self.encoder.take() else {
            return Ok(());
        };
        let mut completes_event = false;
        if let Some(data) = body.take() {
            if let Some(scanner) = &mut self.events {
                scanner.feed_with(&data, |_| completes_event = true);
            }
            encoder.write(&data).map_err(encode_error)?;
        }
        let out = if end_of_stream {
            let mut out = encoder.take();
            out.extend(encoder.finish().map_err(encode_error)?);
            out
        } else {
            if completes_event {
                encoder.flush().map_err(encode_error)?;
            }
            let out = encoder.take();
            self.encoder = Some(encoder);
            out
        };
        *body = (!out.is_empty()).then(|| Bytes::from(out));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    fn compress(yaml: &str) -> Compress {
        Compress::new(&serde_yaml::from_str(yaml).expect("config")).expect("mw")
    }

    #[test]
    fn negotiation_follows_preference_and_q_values() {
        let c = compress("{}");
        assert_eq!(c.negotiate(b"gzip, br"), Some(Algorithm::Brotli));
        assert_eq!(c.negotiate(b"gzip;q=1, br;q=0"), Some(Algorithm::Gzip));
        assert_eq!(c.negotiate(b"identity"), None);
        assert_eq!(c.negotiate(b"*"), Some(Algorithm::Brotli));
        let gzip_only = compress("algorithms: [gzip]");
        assert_eq!(gzip_only.negotiate(b"br, gzip"), Some(Algorithm::Gzip));
        assert!(Compress::new(&serde_yaml::from_str("algorithms: [zstd]").expect("c")).is_err());
        assert!(Compress::new(&serde_yaml::from_str("level: 10").expect("c")).is_err());
    }

    #[test]
    fn every_event_is_decodable_when_it_arrives() {
        for encoder in [
            Encoder::Gzip(GzEncoder::new(Vec::new(), flate2::Compression::new(5))),
            Encoder::Brotli(Box::new(brotli::CompressorWriter::new(
                Vec::new(),
                4096,
                5,
                22,
            ))),
        ] {
            let gzip = matches!(encoder, Encoder::Gzip(_));
            let mut f = CompressFilter {
                encoder: Some(encoder),
                events: Some(EventScanner::new()),
            };
            let mut wire = Vec::new();
            for i in 0..5 {
                let mut body = Some(Bytes::from(format!("data: event {i}\n\n")));
                f.filter(&mut body, false).expect("filter");
                wire.extend_from_slice(&body.expect("output for a complete event"));
                let text = decode_prefix(&wire, gzip);
                assert!(text.ends_with(&format!("data: event {i}\n\n")), "{text:?}");
            }
            let mut body = None;
            f.filter(&mut body, true).expect("finish");
            wire.extend_from_slice(&body.unwrap_or_default());
            assert!(decode_prefix(&wire, gzip).starts_with("data: event 0"));
        }
    }

    /// Decodes as much of a (possibly unfinished) stream as is there.
    fn decode_prefix(wire: &[u8], gzip: bool) -> String {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        if gzip {
            let mut d = flate2::read::GzDecoder::new(wire);
            while let Ok(n) = d.read(&mut buf) {
                if n == 0 {
                    break;
                }
                out.extend_from_slice(&buf[..n]);
            }
        } else {
            let mut d = brotli::Decompressor::new(wire, 4096);
            while let Ok(n) = d.read(&mut buf) {
                if n == 0 {
                    break;
                }
                out.extend_from_slice(&buf[..n]);
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}
