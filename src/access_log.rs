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
use std::cell::RefCell;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pingora_error::Error;
use pingora_http::RequestHeader;
use serde_json::json;

use crate::http_util;
use crate::sse::CloseReason;
use crate::values::AccessLogFormat;

pub const TARGET: &str = crate::logging::TARGET;

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

/// A combined line, built by hand into a reused buffer: Rust's formatting machinery took
/// about twice the instructions for the same line (a dozen arguments, each dispatched, and
/// integers padded through the generic path).
struct Line<'a>(&'a mut String);

impl Line<'_> {
    fn text(&mut self, s: &str) -> &mut Self {
        self.0.push_str(s);
        self
    }

    fn uint(&mut self, n: u64) -> &mut Self {
        self.text(itoa::Buffer::new().format(n))
    }

    /// `n` with at least `width` digits, zeros in front.
    fn padded(&mut self, n: u64, width: usize) -> &mut Self {
        let mut digits = itoa::Buffer::new();
        let digits = digits.format(n);
        for _ in digits.len()..width {
            self.0.push('0');
        }
        self.text(digits)
    }

    fn ip(&mut self, ip: IpAddr) -> &mut Self {
        match ip {
            IpAddr::V4(v4) => {
                let [a, b, c, d] = v4.octets();
                self.uint(a.into()).text(".").uint(b.into()).text(".");
                self.uint(c.into()).text(".").uint(d.into())
            }
            IpAddr::V6(v6) => {
                let _ = write!(self.0, "{v6}");
                self
            }
        }
    }

    fn maybe_ip(&mut self, ip: Option<IpAddr>) -> &mut Self {
        match ip {
            Some(ip) => self.ip(ip),
            None => self.text("-"),
        }
    }

    fn socket(&mut self, addr: Option<SocketAddr>) -> &mut Self {
        let Some(addr) = addr else {
            return self.text("-");
        };
        match addr.ip() {
            ip @ IpAddr::V4(_) => self.ip(ip).text(":"),
            ip @ IpAddr::V6(_) => self.text("[").ip(ip).text("]:"),
        };
        self.uint(addr.port().into())
    }

    /// Bytes from the request: `"`, `\`, control characters, bytes outside printable
    /// ASCII and (unless `spaces`) spaces become `\xHH`, so a value can neither end its
    /// field nor start a new line.
    fn escaped(&mut self, bytes: &[u8], spaces: bool) -> &mut Self {
        const HEX: &[u8; 16] = b"0123456789ABCDEF";
        let plain =
            |b: u8| ((0x21..0x7f).contains(&b) && b != b'"' && b != b'\\') || (spaces && b == b' ');
        let mut rest = bytes;
        while !rest.is_empty() {
            let run = rest.iter().position(|&b| !plain(b)).unwrap_or(rest.len());
            // A run of printable ASCII is UTF-8.
            self.0
                .push_str(std::str::from_utf8(&rest[..run]).unwrap_or_default());
            let Some(&b) = rest.get(run) else { break };
            self.0.push_str("\\x");
            self.0.push(HEX[usize::from(b >> 4)].into());
            self.0.push(HEX[usize::from(b & 0xf)].into());
            rest = &rest[run + 1..];
        }
        self
    }

    /// A quoted field's content (spaces kept).
    fn quoted(&mut self, bytes: &[u8]) -> &mut Self {
        self.escaped(bytes, true)
    }

    /// An unquoted field (spaces escaped too).
    fn bare(&mut self, bytes: &[u8]) -> &mut Self {
        self.escaped(bytes, false)
    }

    /// The time as RFC 3339 in UTC with milliseconds; the part up to the second is
    /// formatted once a second per thread.
    fn time(&mut self, now: SystemTime) -> &mut Self {
        thread_local! {
            static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
        }
        let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
        let second = since.as_secs();
        SECOND.with(|cached| {
            let mut cached = cached.borrow_mut();
            if cached.0 != second {
                let whole = UNIX_EPOCH + Duration::from_secs(second);
                let text = humantime::format_rfc3339_seconds(whole).to_string();
                cached.1 = text.trim_end_matches('Z').to_string();
                cached.0 = second;
            }
            self.0.push_str(&cached.1);
        });
        self.text(".")
            .padded(since.subsec_millis().into(), 3)
            .text("Z")
    }
}

/// How the request line names the HTTP version.
fn version(version: http::Version) -> &'static str {
    match version {
        http::Version::HTTP_09 => "HTTP/0.9",
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_11 => "HTTP/1.1",
        http::Version::HTTP_2 => "HTTP/2.0",
        http::Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/?",
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
    let host = http_util::request_host(req).unwrap_or("-");
    let header =
        |name: http::header::HeaderName| req.headers.get(name).map_or(&b"-"[..], |v| v.as_bytes());
    let route = entry.route.unwrap_or("-");
    let service = entry.service.unwrap_or("-");
    let micros = entry.duration.as_micros() as u64;
    let bytes = entry.bytes;
    let path = redact_query(
        req.uri.path_and_query().map_or("/", |p| p.as_str()),
        entry.secret_params,
    );
    let now = SystemTime::now();
    let request_id = entry.request_id.unwrap_or("-");
    match format {
        AccessLogFormat::Combined => {
            thread_local! {
                static BUFFER: RefCell<String> = RefCell::new(String::with_capacity(512));
            }
            BUFFER.with(|buffer| {
                let mut buffer = buffer.borrow_mut();
                buffer.clear();
                let mut line = Line(&mut buffer);
                line.maybe_ip(entry.client)
                    .text(" - - [")
                    .time(now)
                    .text("] \"");
                line.bare(req.method.as_str().as_bytes()).text(" ");
                line.bare(path.as_bytes()).text(" ");
                line.text(version(req.version)).text("\" ");
                line.uint(entry.status.into()).text(" ").uint(bytes as u64);
                line.text(" \"").quoted(header(http::header::REFERER));
                line.text("\" \"").quoted(header(http::header::USER_AGENT));
                line.text("\" host=").bare(host.as_bytes());
                line.text(" route=")
                    .text(route)
                    .text(" service=")
                    .text(service);
                line.text(" upstream=").socket(entry.upstream);
                line.text(" duration=").uint(micros / 1_000_000).text(".");
                line.padded(micros % 1_000_000, 6);
                line.text(" request_id=").bare(request_id.as_bytes());
                match entry.sse {
                    Some((events, reason)) => {
                        line.text(" sse_events=").uint(events);
                        line.text(" sse_close=").text(reason.as_str())
                    }
                    None => line.text(" sse_events=- sse_close=-"),
                };
                buffer.push('\n');
                crate::logging::access_line(&buffer);
            });
        }
        AccessLogFormat::Json => {
            let mut line = json!({
                "time": humantime::format_rfc3339_millis(now).to_string(),
                "client": entry.client.map(|ip| ip.to_string()),
                "host": host,
                "method": req.method.as_str(),
                "path": path.as_ref(),
                "status": entry.status,
                "bytes": bytes,
                "duration": micros as f64 / 1e6,
                "route": route,
                "service": service,
                "upstream": entry.upstream.map(|u| u.to_string()),
                "request_id": request_id,
            });
            if let Some((events, reason)) = entry.sse {
                line["sse_events"] = json!(events);
                line["sse_close"] = json!(reason.as_str());
            }
            if let Some(e) = entry.error {
                line["error"] = json!(e.to_string());
            }
            let mut text = line.to_string();
            text.push('\n');
            crate::logging::access_line(&text);
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
        let line = |s: &[u8], spaces: bool| {
            let mut out = String::new();
            Line(&mut out).escaped(s, spaces);
            out
        };
        let q = |s: &[u8]| line(s, true);
        assert_eq!(q(b"Mozilla/5.0 (X11)"), "Mozilla/5.0 (X11)");
        assert_eq!(q(b"a\" 200 0 \"-\" \"x"), "a\\x22 200 0 \\x22-\\x22 \\x22x");
        assert_eq!(q(b"a\tb\\c\x7f\xff"), "a\\x09b\\x5Cc\\x7F\\xFF");
        assert_eq!(q(b"line\nbreak\r"), "line\\x0Abreak\\x0D");
        assert_eq!(line(b"a b", false), "a\\x20b");
        assert_eq!(line(b"", false), "");
    }

    #[test]
    fn numbers_addresses_and_times_are_written_by_hand_as_fmt_would() {
        let mut out = String::new();
        let mut line = Line(&mut out);
        line.uint(0)
            .text(" ")
            .uint(u64::MAX)
            .text(" ")
            .padded(42, 6)
            .text(" ");
        line.padded(1_234_567, 6).text(" ").maybe_ip(None).text(" ");
        line.ip("10.0.255.1".parse().expect("v4"))
            .text(" ")
            .ip("::1".parse().expect("v6"));
        line.text(" ")
            .socket(Some("127.0.0.1:8080".parse().expect("sa")))
            .text(" ");
        line.socket(Some("[::1]:9".parse().expect("sa6")))
            .text(" ")
            .socket(None);
        assert_eq!(
            out,
            "0 18446744073709551615 000042 1234567 - 10.0.255.1 ::1 127.0.0.1:8080 [::1]:9 -"
        );
        let when = UNIX_EPOCH + Duration::from_millis(1_700_000_000_007);
        let mut out = String::new();
        Line(&mut out).time(when);
        assert_eq!(out, humantime::format_rfc3339_millis(when).to_string());
        let later = when + Duration::from_millis(1_993);
        let mut out = String::new();
        Line(&mut out).time(later);
        assert_eq!(out, humantime::format_rfc3339_millis(later).to_string());
    }
}
