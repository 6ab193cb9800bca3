//! `request_size_limit`: refuses request bodies over a size with `413`.
//!
//! ```yaml
//! type: request_size_limit
//! config:
//!   max: 1MiB        # bytes, or with a unit: KB, KiB, MB, MiB, GB, GiB
//! ```
//!
//! Phases: `request` (a declared `Content-Length` over the limit is refused before the
//! origin is contacted) and `request_body` (a chunked body is counted as it streams and
//! cut with `413` once it passes the limit).

use bytes::Bytes;
use pingora_error::Result;
use pingora_proxy::Session;
use serde::{Deserialize, Deserializer};

use super::{Context, Middleware, Outcome, Reply};
use crate::error::http_error;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub max: ByteSize,
}

/// A size in bytes: an integer, or a string with a unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(ByteSize(n)),
            Raw::S(s) => parse_size(&s)
                .map(ByteSize)
                .map_err(serde::de::Error::custom),
        }
    }
}

pub fn parse_size(raw: &str) -> Result<u64, String> {
    let s = raw.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("invalid size `{raw}`: write bytes or e.g. `1MiB`"))?;
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1000,
        "kib" | "k" => 1024,
        "mb" => 1000 * 1000,
        "mib" | "m" => 1024 * 1024,
        "gb" => 1000 * 1000 * 1000,
        "gib" | "g" => 1024 * 1024 * 1024,
        other => return Err(format!("invalid size `{raw}`: unknown unit `{other}`")),
    };
    n.checked_mul(factor)
        .ok_or_else(|| format!("invalid size `{raw}`: too large"))
}

pub struct SizeLimit {
    max: u64,
}

impl SizeLimit {
    pub fn new(config: &Config) -> Self {
        SizeLimit { max: config.max.0 }
    }

    fn reason(&self) -> String {
        format!("the request body is larger than {} bytes", self.max)
    }
}

impl Middleware for SizeLimit {
    fn request(&self, session: &mut Session, _ctx: &mut Context) -> Result<Outcome> {
        let declared = session
            .get_header(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        if declared.is_some_and(|n| n > self.max) {
            return Ok(Outcome::Respond(Reply::text(413, &self.reason())));
        }
        Ok(Outcome::Continue)
    }

    fn request_body(
        &self,
        body: &Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut Context,
    ) -> Result<()> {
        ctx.request_body_bytes += body.as_ref().map_or(0, |b| b.len() as u64);
        if ctx.request_body_bytes > self.max {
            return Err(http_error(413, self.reason()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("10"), Ok(10));
        assert_eq!(parse_size("1KiB"), Ok(1024));
        assert_eq!(parse_size("2 MB"), Ok(2_000_000));
        assert_eq!(parse_size("1mib"), Ok(1_048_576));
        assert!(parse_size("1 parsec").is_err());
        assert!(parse_size("MiB").is_err());
    }
}
