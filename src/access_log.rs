//! The access log: one line per request on the `streamgate::access` log target, so it can
//! be routed or filtered on its own (`RUST_LOG=streamgate::access=info`). `combined` is the
//! familiar Apache/nginx line with streamgate's fields appended (`sse_events` and
//! `sse_close` are `-` for ordinary requests); `json` is one object per line. Event streams
//! add their event count and how they ended.
//!
//! Nothing a client sends can forge or break a line, and no credential in a query string
//! is written:
//! - the values of query parameters whose names carry credentials are written as
//!   `REDACTED`, in both formats: names containing `key`, `token`, `password`, `secret`,
//!   `signature`, `credential`, `session` (`api_key`, `apikey`, `access_token`,
//!   `client_secret`, `X-Amz-Signature`, ...), `sig`, `pwd`, `pass`, `auth`, and the query
//!   parameter of every `api_key` middleware on the request's route, whatever its name
//!   (names compare percent-decoded and case-insensitively);
//! - in the combined format, `"`, `\`, control characters and bytes outside printable
//!   ASCII in the path, `Referer`, `User-Agent`, `Host` and the request id are written as
//!   `\xHH` (nginx's escaping), and so are spaces outside the quoted fields. The JSON
//!   format is escaped by the JSON encoder.

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime};

use pingora_error::Error;
use pingora_http::RequestHeader;
use serde_json::json;

use crate::http_util;
use crate::sse::CloseReason;
use crate::values::AccessLogFormat;

pub const TARGET: &str = "streamgate::access";

/// Shows `-` for nothing, without allocating.
struct Maybe<T>(Option<T>);

impl<T: std::fmt::Display> std::fmt::Display for Maybe<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(v) => v.fmt(f),
            None => f.write_str("-"),
        }
    }
}

/// Microseconds shown as seconds with six decimals, with integer formatting only.
struct Seconds(u128);

impl std::fmt::Display for Seconds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{:06}", self.0 / 1_000_000, self.0 % 1_000_000)
    }
}

/// Words that make a query parameter's value a credential wherever they appear in its name.
const SECRET_WORDS: &[&str] = &[
    "key",
    "token",
    "password",
    "passwd",
    "secret",
    "signature",
    "credential",
    "session",
];

/// Names that are credentials on their own.
const SECRET_NAMES: &[&str] = &["sig", "pwd", "pass", "auth"];

/// What replaces a redacted value.
pub const REDACTED: &str = "REDACTED";

/// Whether the query parameter `name` (as written, maybe percent-encoded) carries a
/// credential: by the words above, or because it is one of `also` (the query parameters
/// of the route's `api_key` middlewares).
pub fn secret_param(name: &str, also: &[&str]) -> bool {
    // Borrowed unless the name has escapes: no allocation per parameter.
    let decoded = percent_encoding::percent_decode_str(name).decode_utf8_lossy();
    let name = decoded.as_bytes();
    let is = |other: &str| name.eq_ignore_ascii_case(other.as_bytes());
    let holds = |word: &str| {
        name.windows(word.len())
            .any(|w| w.eq_ignore_ascii_case(word.as_bytes()))
    };
    SECRET_NAMES.iter().any(|n| is(n))
        || SECRET_WORDS.iter().any(|w| holds(w))
        || also.iter().any(|a| is(a))
}

/// `path_and_query` with the values of credential parameters replaced by [`REDACTED`];
/// borrowed when there is nothing to hide.
pub fn redact_query<'a>(path_and_query: &'a str, also: &[&str]) -> Cow<'a, str> {
    let Some((path, query)) = path_and_query.split_once('?') else {
        return Cow::Borrowed(path_and_query);
    };
    let hides = |pair: &str| {
        pair.split_once('=')
            .is_some_and(|(name, value)| !value.is_empty() && secret_param(name, also))
    };
    if !query.split('&').any(hides) {
        return Cow::Borrowed(path_and_query);
    }
    let mut out = String::with_capacity(path_and_query.len());
    out.push_str(path);
    for (i, pair) in query.split('&').enumerate() {
        out.push(if i == 0 { '?' } else { '&' });
        match pair.split_once('=') {
            Some((name, _)) if hides(pair) => {
                out.push_str(name);
                out.push('=');
                out.push_str(REDACTED);
            }
            _ => out.push_str(pair),
        }
    }
    Cow::Owned(out)
}

/// A request on one line for error logs, as Pingora's own summary says it (`GET
/// /path?query, Host: host`), with the values of credential query parameters redacted as in
/// the access log.
pub fn summary(req: &RequestHeader, secret_params: &[&str]) -> String {
    let target = req.uri.path_and_query().map_or("/", |p| p.as_str());
    format!(
        "{} {}, Host: {}",
        req.method,
        redact_query(target, secret_params),
        http_util::request_host(req).unwrap_or_default()
    )
}

/// Bytes from the request written into a combined line: `"`, `\`, control characters,
/// bytes outside printable ASCII and (unless `spaces`) spaces become `\xHH`, so a value
/// can neither end its field nor start a new line.
struct Escaped<'a> {
    bytes: &'a [u8],
    spaces: bool,
}

impl std::fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let plain = |b: u8| (0x21..0x7f).contains(&b) && b != b'"' && b != b'\\';
        let mut rest = self.bytes;
        while !rest.is_empty() {
            let run = rest
                .iter()
                .position(|&b| !(plain(b) || (self.spaces && b == b' ')))
                .unwrap_or(rest.len());
            // A run of printable ASCII is UTF-8.
            f.write_str(std::str::from_utf8(&rest[..run]).unwrap_or_default())?;
            if let Some(&b) = rest.get(run) {
                write!(f, "\\x{b:02X}")?;
                rest = &rest[run + 1..];
            } else {
                rest = &[];
            }
        }
        Ok(())
    }
}

/// A quoted field's content (spaces kept).
fn quoted(bytes: &[u8]) -> Escaped<'_> {
    Escaped {
        bytes,
        spaces: true,
    }
}

/// An unquoted field (spaces escaped too).
fn bare(bytes: &[u8]) -> Escaped<'_> {
    Escaped {
        bytes,
        spaces: false,
    }
}

/// What one line says about a request.
pub struct Entry<'a> {
    pub request: &'a RequestHeader,
    /// The client's address (through trusted proxies).
    pub client: Option<IpAddr>,
    /// Body bytes sent to the client.
    pub bytes: usize,
    pub route: Option<&'a str>,
    pub service: Option<&'a str>,
    /// The origin it was sent to.
    pub upstream: Option<SocketAddr>,
    /// From the request's arrival to now.
    pub duration: Duration,
    pub request_id: Option<&'a str>,
    pub status: u16,
    /// For event streams: events sent and the close reason.
    pub sse: Option<(u64, CloseReason)>,
    pub error: Option<&'a Error>,
    /// The query parameters of the route's `api_key` middlewares, redacted like the
    /// credential names every line hides.
    pub secret_params: &'a [&'a str],
}

/// Writes the line, unless the target is filtered out (then nothing is formatted).
pub fn write(format: AccessLogFormat, entry: &Entry<'_>) {
    if !log::log_enabled!(target: TARGET, log::Level::Info) {
        return;
    }
    let req = entry.request;
    let client = Maybe(entry.client);
    let host = http_util::request_host(req).unwrap_or("-");
    let header =
        |name: http::header::HeaderName| req.headers.get(name).map_or(&b"-"[..], |v| v.as_bytes());
    let route = entry.route.unwrap_or("-");
    let service = entry.service.unwrap_or("-");
    let upstream = Maybe(entry.upstream);
    let micros = entry.duration.as_micros();
    let duration = Seconds(micros);
    let bytes = entry.bytes;
    let path = redact_query(
        req.uri.path_and_query().map_or("/", |p| p.as_str()),
        entry.secret_params,
    );
    let time = humantime::format_rfc3339_millis(SystemTime::now());
    let request_id = entry.request_id.unwrap_or("-");
    match format {
        AccessLogFormat::Combined => {
            let (events, close) = match entry.sse {
                Some((events, reason)) => (Maybe(Some(events)), reason.as_str()),
                None => (Maybe(None), "-"),
            };
            log::info!(
                target: TARGET,
                "{client} - - [{time}] \"{} {} {:?}\" {} {bytes} \"{}\" \"{}\" host={} \
                 route={route} service={service} upstream={upstream} duration={duration} \
                 request_id={} sse_events={events} sse_close={close}",
                bare(req.method.as_str().as_bytes()),
                bare(path.as_bytes()),
                req.version,
                entry.status,
                quoted(header(http::header::REFERER)),
                quoted(header(http::header::USER_AGENT)),
                bare(host.as_bytes()),
                bare(request_id.as_bytes()),
            );
        }
        AccessLogFormat::Json => {
            let mut line = json!({
                "time": time.to_string(),
                "client": client.0.map(|ip| ip.to_string()),
                "host": host,
                "method": req.method.as_str(),
                "path": path.as_ref(),
                "status": entry.status,
                "bytes": bytes,
                "duration": micros as f64 / 1e6,
                "route": route,
                "service": service,
                "upstream": upstream.0.map(|u| u.to_string()),
                "request_id": request_id,
            });
            if let Some((events, reason)) = entry.sse {
                line["sse_events"] = json!(events);
                line["sse_close"] = json!(reason.as_str());
            }
            if let Some(e) = entry.error {
                line["error"] = json!(e.to_string());
            }
            log::info!(target: TARGET, "{line}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_in_the_query_are_redacted() {
        let r = |q: &str| redact_query(q, &["k"]).into_owned();
        assert_eq!(r("/x"), "/x");
        assert_eq!(r("/x?a=1&b=2"), "/x?a=1&b=2");
        assert!(matches!(redact_query("/x?a=1", &[]), Cow::Borrowed(_)));
        assert_eq!(
            r("/x?api_key=s1&a=1&access_token=s2&Password=s3&k=s4"),
            "/x?api_key=REDACTED&a=1&access_token=REDACTED&Password=REDACTED&k=REDACTED"
        );
        assert_eq!(
            r("/x?apikey=s&key=s&client_secret=s&X-Amz-Signature=s&sig=s&token"),
            "/x?apikey=REDACTED&key=REDACTED&client_secret=REDACTED\
             &X-Amz-Signature=REDACTED&sig=REDACTED&token"
        );
        assert_eq!(r("/x?api%5Fkey=s&id=1"), "/x?api%5Fkey=REDACTED&id=1");
        assert_eq!(r("/x?token=&a="), "/x?token=&a=");
    }

    #[test]
    fn error_summaries_hide_credentials_too() {
        let mut req = RequestHeader::build("GET", b"/x?token=t1&a=1&k=t2", None).expect("req");
        req.insert_header("host", "a.example").expect("host");
        assert_eq!(
            summary(&req, &["k"]),
            "GET /x?token=REDACTED&a=1&k=REDACTED, Host: a.example"
        );
    }

    #[test]
    fn quotes_and_control_characters_are_escaped() {
        let q = |s: &[u8]| quoted(s).to_string();
        assert_eq!(q(b"Mozilla/5.0 (X11)"), "Mozilla/5.0 (X11)");
        assert_eq!(q(b"a\" 200 0 \"-\" \"x"), "a\\x22 200 0 \\x22-\\x22 \\x22x");
        assert_eq!(q(b"a\tb\\c\x7f\xff"), "a\\x09b\\x5Cc\\x7F\\xFF");
        assert_eq!(q(b"line\nbreak\r"), "line\\x0Abreak\\x0D");
        assert_eq!(bare(b"a b").to_string(), "a\\x20b");
        assert_eq!(bare(b"").to_string(), "");
    }
}
