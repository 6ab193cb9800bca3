//! The client's request head as everything after it sees it: checked, and brought to one
//! form, before it is routed.
//!
//! Pingora has parsed the head and already refused what it cannot frame (conflicting
//! `Content-Length`s, a final transfer coding other than `chunked`, several `Host` lines, a
//! `Host` that differs from an absolute-form target's authority, a head over 1 MiB or with
//! more than 256 lines: 400, written by Pingora before any hook runs). [`canonicalize`]
//! refuses what is left that the proxy and an origin could read differently, and rewrites
//! the head in place so that routing, the middlewares, the logs and the origin all see one
//! spelling of the request:
//!
//! - a head with more than [`MAX_FIELDS`] header lines or over [`MAX_HEAD`] bytes: 431;
//! - an HTTP/1.1 request without `Host` (RFC 9112 3.2): 400;
//! - a target that is neither origin-form (`/path`) nor absolute-form (`http://host/path`),
//!   such as the `%20/p` Pingora makes of a request line with two spaces, or `*`: 400;
//! - a target that is not UTF-8: 400 (routing would see another path than the origin);
//! - a path [`normalize_path`] refuses: 400 with its reason;
//! - an absolute-form target becomes origin-form, with `Host` set to its authority (RFC
//!   9112 3.2.2: the target's authority wins);
//! - the path becomes its normalized form; the query is kept as it was.

use std::borrow::Cow;
use std::fmt;

use http::header::HOST;
use http::uri::{PathAndQuery, Uri};
use http::{HeaderValue, Version};
use pingora_http::RequestHeader;

use crate::routing::{normalize_path, PathRefusal};

/// Most header lines a request head may have (Pingora itself refuses more than 256 with 400).
pub const MAX_FIELDS: usize = 128;
/// Most bytes a request head's target and header lines may take (Pingora itself refuses a
/// head over 1 MiB with 400).
pub const MAX_HEAD: usize = 64 * 1024;

/// Why a request head is refused; [`Refusal::status`] and [`Refusal::reason`] are the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// More than [`MAX_FIELDS`] header lines.
    TooManyFields,
    /// More than [`MAX_HEAD`] bytes of target and headers.
    HeadTooLarge,
    /// HTTP/1.1 without `Host`.
    NoHost,
    /// A `Host` that is not a host and port (a space, `@`, a control character...).
    BadHost,
    /// A target that is not UTF-8.
    NotUtf8,
    /// The path (or a target that is not a path at all).
    Path(PathRefusal),
}

impl Refusal {
    pub fn status(self) -> u16 {
        match self {
            Refusal::TooManyFields | Refusal::HeadTooLarge => 431,
            Refusal::NoHost | Refusal::BadHost | Refusal::NotUtf8 | Refusal::Path(_) => 400,
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            Refusal::TooManyFields => "the request has too many header lines",
            Refusal::HeadTooLarge => "the request's header section is too large",
            Refusal::NoHost => "an HTTP/1.1 request needs a Host header",
            Refusal::BadHost => "the Host header is not a host name or address with a port",
            Refusal::NotUtf8 => "the request target is not UTF-8",
            Refusal::Path(refusal) => refusal.reason(),
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.reason())
    }
}

/// Checks `req` and rewrites it to its one form (see the module documentation).
pub fn canonicalize(req: &mut RequestHeader) -> Result<(), Refusal> {
    if req.headers.len() > MAX_FIELDS {
        return Err(Refusal::TooManyFields);
    }
    let size = req.raw_path().len()
        + req
            .headers
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len() + 4)
            .sum::<usize>();
    if size > MAX_HEAD {
        return Err(Refusal::HeadTooLarge);
    }
    if req.version == Version::HTTP_11 && !req.headers.contains_key(HOST) {
        return Err(Refusal::NoHost);
    }
    // A Host is an authority without user info (RFC 9110 7.2): a name, an IPv4 address or
    // a bracketed IPv6 one, and a port; what else it holds would reach the origin, the
    // routes and `X-Forwarded-Host` as it is.
    if req
        .headers
        .get_all(HOST)
        .iter()
        .any(|host| !host.as_bytes().iter().all(|&b| is_authority_byte(b)))
    {
        return Err(Refusal::BadHost);
    }
    if !req.raw_path_is_utf8() {
        return Err(Refusal::NotUtf8);
    }
    let authority = match req.raw_path().first() {
        Some(b'/') => None,
        _ => Some(
            absolute_form_authority(req.raw_path())
                .ok_or(Refusal::Path(PathRefusal::NotAbsolute))?,
        ),
    };
    let path = normalize_path(req.uri.path()).map_err(Refusal::Path)?;
    if matches!(path, Cow::Borrowed(_)) && authority.is_none() {
        return Ok(());
    }
    let target = match req.uri.query() {
        Some(query) => format!("{path}?{query}"),
        None => path.into_owned(),
    };
    // Normalizing only drops slashes, decodes unreserved characters and upper-cases hex
    // digits, so what parsed as a URI before still does; refused all the same if not.
    let path_and_query =
        PathAndQuery::try_from(target).map_err(|_| Refusal::Path(PathRefusal::NotAbsolute))?;
    let mut parts = req.uri.clone().into_parts();
    parts.path_and_query = Some(path_and_query);
    let uri = Uri::from_parts(parts).map_err(|_| Refusal::Path(PathRefusal::NotAbsolute))?;
    req.set_uri(uri);
    if let Some(authority) = authority {
        // Pingora refused a Host that differs; HTTP/1.0 may have sent none.
        let _ = req.insert_header(HOST, authority);
    }
    Ok(())
}

/// A byte an authority without user info may hold (RFC 3986 reg-name, IP-literal, port).
fn is_authority_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=%:[]".contains(&b)
}

/// The authority of an absolute-form target (`http://host[:port]/path`), as a `Host`
/// value; `None` for anything else.
fn absolute_form_authority(target: &[u8]) -> Option<HeaderValue> {
    let uri = Uri::try_from(target).ok()?;
    let scheme = uri.scheme_str()?;
    if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
        return None;
    }
    HeaderValue::from_str(uri.authority()?.as_str()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(target: &[u8], version: Version, headers: &[(&str, &str)]) -> RequestHeader {
        let mut req = RequestHeader::build("GET", target, None).expect("request");
        req.set_version(version);
        for (name, value) in headers {
            req.append_header(name.to_string(), *value).expect("header");
        }
        req
    }

    fn canonical(target: &[u8], headers: &[(&str, &str)]) -> Result<(String, String), Refusal> {
        let mut req = request(target, Version::HTTP_11, headers);
        canonicalize(&mut req)?;
        let wire = String::from_utf8_lossy(req.raw_path()).into_owned();
        let host = req.headers[HOST].to_str().expect("host").to_string();
        Ok((wire, host))
    }

    #[test]
    fn one_spelling_goes_on() {
        let host = [("host", "a.example")];
        for (target, wire) in [
            (&b"/%61dmin//users?x=%2F&y"[..], "/admin/users?x=%2F&y"),
            (b"/plain?q", "/plain?q"),
            (b"http://a.example/x//y?q=1", "/x/y?q=1"),
            (b"http://a.example", "/"),
        ] {
            let expected = Ok((wire.to_string(), "a.example".to_string()));
            assert_eq!(canonical(target, &host), expected, "{target:?}");
        }
    }

    #[test]
    fn an_absolute_form_target_names_the_host() {
        let mut req = request(b"http://b.example:8080/x", Version::HTTP_10, &[]);
        assert_eq!(canonicalize(&mut req), Ok(()));
        assert_eq!(req.raw_path(), b"/x");
        assert_eq!(req.headers[HOST], "b.example:8080");
    }

    #[test]
    fn what_is_refused() {
        let host = [("host", "a.example")];
        let refused = |target: &[u8]| canonical(target, &host).err();
        assert_eq!(
            refused(b"/a/../b"),
            Some(Refusal::Path(PathRefusal::DotSegment))
        );
        assert_eq!(refused(b"*"), Some(Refusal::Path(PathRefusal::NotAbsolute)));
        assert_eq!(
            refused(b"%20/p"),
            Some(Refusal::Path(PathRefusal::NotAbsolute))
        );
        assert_eq!(
            refused(b"ftp://a.example/x"),
            Some(Refusal::Path(PathRefusal::NotAbsolute))
        );
        assert_eq!(refused(b"/caf\xe9"), Some(Refusal::NotUtf8));
        assert_eq!(canonical(b"/x", &[]).err(), Some(Refusal::NoHost));
        for bad in ["a b", "user@a.example", "a.example/x", "a\tb"] {
            assert_eq!(
                canonical(b"/x", &[("host", bad)]).err(),
                Some(Refusal::BadHost),
                "{bad:?}"
            );
        }
        for good in [
            "a.example:8080",
            "[::1]:80",
            "127.0.0.1",
            "xn--caf-dma.example",
            "",
        ] {
            assert!(canonical(b"/x", &[("host", good)]).is_ok(), "{good:?}");
        }
        let mut old = request(b"/x", Version::HTTP_10, &[]);
        assert_eq!(canonicalize(&mut old), Ok(()), "HTTP/1.0 needs no Host");

        let many: Vec<(String, String)> = (0..=MAX_FIELDS)
            .map(|i| (format!("x-{i}"), "v".into()))
            .collect();
        let many: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(canonical(b"/x", &many).err(), Some(Refusal::TooManyFields));
        let big = "v".repeat(MAX_HEAD);
        assert_eq!(
            canonical(b"/x", &[("host", "a"), ("cookie", &big)]).err(),
            Some(Refusal::HeadTooLarge)
        );
        assert_eq!(Refusal::HeadTooLarge.status(), 431);
    }
}
