//! Small HTTP helpers the proxy and several middleware types share: media types, `Accept`-
//! style lists, response framing, and who and what a request addresses.

use std::net::IpAddr;

use http::header::{CONTENT_LENGTH, HOST, TRANSFER_ENCODING};
use http::Version;
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::Session;

/// The media type of a `Content-Type` value, without parameters or surrounding space.
pub fn media_essence(content_type: &[u8]) -> &[u8] {
    content_type
        .split(|&b| b == b';')
        .next()
        .unwrap_or_default()
        .trim_ascii()
}

/// Whether a comma-separated list such as `Accept` or `Accept-Encoding` has an entry for
/// which `wanted` holds and that is not refused with `q=0`.
pub fn list_accepts(list: &[u8], wanted: impl Fn(&[u8]) -> bool) -> bool {
    list.split(|&b| b == b',').any(|item| {
        let mut parts = item.split(|&b| b == b';');
        let name = parts.next().unwrap_or_default().trim_ascii();
        let refused = parts.any(|p| {
            let p = p.trim_ascii();
            p.len() > 2
                && p[..2].eq_ignore_ascii_case(b"q=")
                && p[2..].iter().all(|&b| b == b'0' || b == b'.')
        });
        wanted(name) && !refused
    })
}

/// Drops a `Content-Length` that a rewritten or streamed body no longer honours; an
/// HTTP/1.1 response then goes out chunked, which Pingora flushes chunk by chunk.
pub fn drop_content_length(
    header: &mut ResponseHeader,
    downstream: Version,
) -> pingora_error::Result<()> {
    if header.remove_header(&CONTENT_LENGTH).is_some()
        && downstream == Version::HTTP_11
        && !header.headers.contains_key(TRANSFER_ENCODING)
    {
        header.insert_header(TRANSFER_ENCODING, "chunked")?;
    }
    Ok(())
}

/// The TCP peer's address.
pub fn client_ip(session: &Session) -> Option<IpAddr> {
    Some(session.client_addr()?.as_inet()?.ip())
}

/// `https` when the request came over TLS, else `http`: what `X-Forwarded-Proto` says.
pub fn scheme(session: &Session) -> &'static str {
    let tls = session.digest().is_some_and(|d| d.ssl_digest.is_some());
    if tls {
        "https"
    } else {
        "http"
    }
}

/// The host the client addressed: the URI authority (HTTP/2, absolute-form) or `Host`.
pub fn request_host(req: &RequestHeader) -> Option<&str> {
    req.uri
        .authority()
        .map(|a| a.as_str())
        .or_else(|| req.headers.get(HOST)?.to_str().ok())
}

/// The value of cookie `name` in the request's `Cookie` headers (HTTP/2 clients may send
/// one header per cookie), as sent.
pub fn request_cookie<'a>(req: &'a RequestHeader, name: &str) -> Option<&'a [u8]> {
    req.headers
        .get_all(http::header::COOKIE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b';'))
        .find_map(|pair| {
            let pair = pair.trim_ascii();
            let (k, v) = pair.split_at(pair.iter().position(|b| *b == b'=')?);
            (k.trim_ascii() == name.as_bytes()).then(|| v[1..].trim_ascii())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_and_essences() {
        assert_eq!(media_essence(b" Text/HTML ; charset=utf-8"), b"Text/HTML");
        let is = |t: &'static [u8]| move |n: &[u8]| n.eq_ignore_ascii_case(t);
        assert!(list_accepts(b"gzip, br;q=0.5", is(b"br")));
        assert!(!list_accepts(b"gzip, br;q=0", is(b"br")));
        assert!(!list_accepts(b"gzip", is(b"br")));
        assert!(
            list_accepts(b"br;q=", is(b"br")),
            "an empty q is not a refusal"
        );
    }
}
