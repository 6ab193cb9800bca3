//! Small HTTP helpers the proxy and several middleware types share: media types, `Accept`-
//! style lists, response framing, and who and what a request addresses.

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};

use bytes::{Bytes, BytesMut};
use http::header::{HeaderMap, CONTENT_LENGTH, HOST, TRANSFER_ENCODING};
use http::header::{HeaderName, HeaderValue};
use http::Version;
use ipnet::IpNet;
use pingora_core::protocols::http::ServerSession;
use pingora_core::protocols::l4::socket::SocketAddr as PeerAddr;
use pingora_core::protocols::SocketDigest;
use pingora_http::{RequestHeader, ResponseHeader};
use serde::{Deserialize, Deserializer};

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

/// The TCP peer's address (an IPv4-mapped IPv6 address as the IPv4 address it is).
pub fn client_ip(session: &ServerSession) -> Option<IpAddr> {
    Some(session.client_addr()?.as_inet()?.ip().to_canonical())
}

/// A network (`10.0.0.0/8`) or a single address, as written in a list of them
/// (`trusted_proxies`, `allow`, `deny`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Net(pub IpNet);

impl<'de> Deserialize<'de> for Net {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        let raw = raw.trim();
        raw.parse::<IpNet>()
            .or_else(|_| raw.parse::<IpAddr>().map(IpNet::from))
            .map(Net)
            .map_err(|_| serde::de::Error::custom(format!("`{raw}` is not an address or CIDR")))
    }
}

/// Whether `ip` is in one of `nets`.
pub fn in_nets(nets: &[IpNet], ip: &IpAddr) -> bool {
    nets.iter().any(|n| n.contains(ip))
}

/// The client's address: the TCP peer, or, when the peer is one of the `trusted` proxies,
/// the rightmost address of `X-Forwarded-For` (every line of it, in order) that is not a
/// trusted proxy. An address a trusted proxy could not have written (garbage) stops the
/// walk at the last address believed. Addresses are canonical: an IPv4-mapped IPv6
/// address is the IPv4 address.
pub fn forwarded_client(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let peer = peer.to_canonical();
    if !in_nets(trusted, &peer) {
        return peer;
    }
    let hops = headers
        .get_all("x-forwarded-for")
        .iter()
        .rev()
        .flat_map(|line| line.as_bytes().rsplit(|b| *b == b','));
    let mut client = peer;
    for hop in hops {
        let parsed = std::str::from_utf8(hop.trim_ascii())
            .ok()
            .and_then(|h| h.parse::<IpAddr>().ok());
        let Some(ip) = parsed.map(|ip| ip.to_canonical()) else {
            break;
        };
        client = ip;
        if !in_nets(trusted, &ip) {
            break;
        }
    }
    client
}

/// The client address of a request, seen through `trusted` proxies.
pub fn session_client(session: &ServerSession, trusted: &[IpNet]) -> Option<IpAddr> {
    let peer = client_ip(session)?;
    Some(forwarded_client(
        peer,
        &session.req_header().headers,
        trusted,
    ))
}

/// The final response head written to the client, if one was: an informational one (the
/// `100 Continue` a request body waited for) is not the answer.
pub fn answer_written(session: &ServerSession) -> Option<&ResponseHeader> {
    session
        .response_written()
        .filter(|r| !r.status.is_informational())
}

/// `https` when the request came over TLS, else `http`: what `X-Forwarded-Proto` says.
pub fn scheme(session: &ServerSession) -> &'static str {
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

/// A socket digest for the connection `fd` whose `peer` and (when known) `local` addresses
/// are given, as Pingora's own accept and connect fill them in: Pingora's sessions and
/// logs read them from it without asking the kernel.
pub fn socket_digest(fd: i32, peer: Option<SocketAddr>, local: Option<SocketAddr>) -> SocketDigest {
    let digest = SocketDigest::from_raw_fd(fd);
    if let Some(peer) = peer {
        let _ = digest.peer_addr.set(Some(PeerAddr::Inet(peer)));
    }
    if let Some(local) = local {
        let _ = digest.local_addr.set(Some(PeerAddr::Inet(local)));
    }
    digest
}

/// `ip` as text, as `Display` writes it: an IPv4 address digit by digit (the formatting
/// machinery costs ten times as much, for every proxied request's forwarding headers),
/// IPv6 through `Display`.
pub fn ip_text(ip: IpAddr) -> String {
    let IpAddr::V4(v4) = ip else {
        return ip.to_string();
    };
    let mut text = String::with_capacity(15);
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            text.push('.');
        }
        if octet >= 100 {
            text.push(char::from(b'0' + octet / 100));
        }
        if octet >= 10 {
            text.push(char::from(b'0' + octet / 10 % 10));
        }
        text.push(char::from(b'0' + octet % 10));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_written_as_display_writes_them() {
        for addr in [
            "0.0.0.0",
            "127.0.0.1",
            "255.255.255.255",
            "10.0.100.9",
            "1.20.3.199",
            "192.168.10.250",
            "::1",
            "2001:db8::8a2e:370:7334",
            "::ffff:10.1.2.3",
        ] {
            let ip: IpAddr = addr.parse().expect("an address");
            assert_eq!(ip_text(ip), ip.to_string(), "{addr}");
        }
    }

    fn xff(lines: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for line in lines {
            headers.append("x-forwarded-for", line.parse().expect("value"));
        }
        headers
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let trusted: Vec<IpNet> = vec![
            "127.0.0.1/32".parse().expect("net"),
            "10.0.0.0/8".parse().expect("net"),
        ];
        // Untrusted peer: its header is ignored.
        assert_eq!(
            forwarded_client(ip("203.0.113.5"), &xff(&["10.9.9.9"]), &trusted),
            ip("203.0.113.5")
        );
        // Trusted chain: the first untrusted hop from the right.
        assert_eq!(
            forwarded_client(
                ip("127.0.0.1"),
                &xff(&["1.2.3.4, 198.51.100.7, 10.0.0.2"]),
                &trusted
            ),
            ip("198.51.100.7")
        );
        // Every line counts, the last one nearest: a forged first line does not win.
        assert_eq!(
            forwarded_client(
                ip("127.0.0.1"),
                &xff(&["6.6.6.6", "198.51.100.7"]),
                &trusted
            ),
            ip("198.51.100.7")
        );
        assert_eq!(
            forwarded_client(ip("127.0.0.1"), &xff(&[]), &trusted),
            ip("127.0.0.1")
        );
        // IPv4-mapped IPv6 is IPv4, as a peer and in the header.
        assert_eq!(
            forwarded_client(
                ip("::ffff:127.0.0.1"),
                &xff(&["::ffff:198.51.100.7"]),
                &trusted
            ),
            ip("198.51.100.7")
        );
    }

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

/// The forwarding headers the proxy sets on a request on its way to the origin, and how
/// they are spelled on the wire.
static FORWARDING: [(HeaderName, &str); 4] = [
    (
        HeaderName::from_static("x-forwarded-for"),
        "X-Forwarded-For",
    ),
    (HeaderName::from_static("x-real-ip"), "X-Real-IP"),
    (
        HeaderName::from_static("x-forwarded-proto"),
        "X-Forwarded-Proto",
    ),
    (
        HeaderName::from_static("x-forwarded-host"),
        "X-Forwarded-Host",
    ),
];

/// Removes header `name` from `req`. Pingora's `remove_header` costs even when the header
/// is absent (it keeps a second map of the names' spelling), so this looks first.
pub fn remove_request_header(req: &mut RequestHeader, name: &HeaderName) {
    if req.headers.contains_key(name) {
        req.remove_header(name);
    }
}

/// [`remove_request_header`] for a response.
pub fn remove_response_header(resp: &mut ResponseHeader, name: &HeaderName) {
    if resp.headers.contains_key(name) {
        resp.remove_header(name);
    }
}

/// The value of an added header line.
#[derive(Debug, Clone)]
enum LineValue {
    Text(Cow<'static, str>),
    Value(HeaderValue),
}

impl LineValue {
    fn as_bytes(&self) -> &[u8] {
        match self {
            LineValue::Text(text) => text.as_bytes(),
            LineValue::Value(value) => value.as_bytes(),
        }
    }
}

/// Headers the proxy (`X-Forwarded-For`, `X-Real-IP`, `X-Forwarded-Proto`,
/// `X-Forwarded-Host`) and the chain (`request_id`, the `headers` middleware's `set` and
/// `add`) add to the request the origin sees. They are written as lines of the head when
/// it goes out, after the request's own headers, not inserted into the request: an insert
/// through Pingora's header API parses the name again and updates two maps, which grow
/// past the size of the parsed request, about 3,000 instructions a header; a line costs a
/// copy. Names are compared without regard to case and written as given.
///
/// Whoever adds a header here removes the request's own header of that name first when it
/// replaces it (the proxy drops what the client sent under the forwarding names); removing
/// a header means removing it from both the request and here.
#[derive(Debug, Default, Clone)]
pub struct AddedHeaders {
    lines: Vec<(Bytes, LineValue)>,
}

impl AddedHeaders {
    /// Sets the forwarding headers, replacing earlier lines of those names, and removes
    /// what the client sent under them from `req`.
    pub fn set_forwarding(
        &mut self,
        req: &mut RequestHeader,
        forwarded_for: Option<String>,
        real_ip: Option<String>,
        proto: &'static str,
        host: Option<String>,
    ) {
        let values = [
            forwarded_for.map(Cow::Owned),
            real_ip.map(Cow::Owned),
            Some(Cow::Borrowed(proto)),
            host.map(Cow::Owned),
        ];
        self.lines.reserve(values.len());
        for ((name, spelled), value) in FORWARDING.iter().zip(values) {
            self.remove(req, name);
            if let Some(value) = value {
                self.lines.push((
                    Bytes::from_static(spelled.as_bytes()),
                    LineValue::Text(value),
                ));
            }
        }
    }

    /// Adds a line `name: value` after those of that name already there.
    pub fn add(&mut self, name: Bytes, value: HeaderValue) {
        self.lines.push((name, LineValue::Value(value)));
    }

    /// Replaces the lines of `name` and the request's own header `name` with one line
    /// `spelled: value`.
    pub fn set(
        &mut self,
        req: &mut RequestHeader,
        name: &HeaderName,
        spelled: Bytes,
        value: HeaderValue,
    ) {
        self.remove(req, name);
        self.add(spelled, value);
    }

    /// Removes header `name` from the lines and from the request.
    pub fn remove(&mut self, req: &mut RequestHeader, name: &HeaderName) {
        remove_request_header(req, name);
        self.lines
            .retain(|(line, _)| !line.eq_ignore_ascii_case(name.as_str().as_bytes()));
    }

    /// Appends the lines to `wire`, a head written up to its last header line.
    pub fn write(&self, wire: &mut BytesMut) {
        for (name, value) in &self.lines {
            wire.extend_from_slice(name);
            wire.extend_from_slice(b": ");
            wire.extend_from_slice(value.as_bytes());
            wire.extend_from_slice(b"\r\n");
        }
    }
}
