//! What happens to the request header on its way to the origin and to the response header
//! on its way back, whichever loop carries the request: the service's rewriting and the
//! chain's `upstream_request` hooks; what the service learns from the answer (session
//! affinity), the SSE header rules, the start of a stream, and the chain's `response` hooks
//! (which may install body filters).

use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderName, TRANSFER_ENCODING};
use http::Version;
use pingora_error::Result;
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::Session;

use super::context::RequestCtx;
use super::stream::Stream;
use crate::http_util::{client_ip, request_host, scheme};
use crate::sse;
use crate::sse::tracker::{StreamInfo, Tracker};

/// Headers that describe one connection and never cross a proxy. The last,
/// `Transfer-Encoding`, is a request's only: a response's stays, the relay having framed
/// and classified the answer by it.
static HOP_BY_HOP: [HeaderName; 10] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
    HeaderName::from_static("http2-settings"),
    TRANSFER_ENCODING,
];

/// Which of [`HOP_BY_HOP`] a head holds, found in one pass over its names rather than a
/// lookup for each (most heads hold none): a bit each, bit `i` for `HOP_BY_HOP[i]`.
#[derive(Clone, Copy)]
struct HopByHop(u16);

impl HopByHop {
    fn of(headers: &HeaderMap) -> HopByHop {
        HopByHop(headers.keys().fold(0, |found, name| {
            match HOP_BY_HOP.iter().position(|hop| hop == name) {
                Some(i) => found | 1 << i,
                None => found,
            }
        }))
    }

    fn has(self, name: &HeaderName) -> bool {
        self.names().any(|held| held == name)
    }

    /// The hop-by-hop names the head holds.
    fn names(self) -> impl Iterator<Item = &'static HeaderName> {
        (0..HOP_BY_HOP.len())
            .filter(move |i| self.0 & 1 << i != 0)
            .map(|i| &HOP_BY_HOP[i])
    }
}

/// The request the origin sees: path prefix, `Host` policy, `X-Forwarded-*`, then the
/// chain's `upstream_request` hooks.
pub async fn upstream_request(
    session: &mut Session,
    request: &mut RequestHeader,
    ctx: &mut RequestCtx,
) -> Result<()> {
    let route = ctx.route()?.clone();
    route.service.rewrite_request(
        request,
        &mut ctx.chain.added,
        client_ip(session),
        ctx.chain.client,
        scheme(session),
    )?;
    for instance in route.chain.iter() {
        instance
            .middleware
            .upstream_request(session, request, &mut ctx.chain)?;
    }
    Ok(())
}

/// The response header from the origin, before it goes to the client: an event stream
/// (`is_sse`, as the caller found it) gets the SSE rules and starts its [`Stream`]; then
/// the chain's `response` hooks run and the body filters they return are installed.
pub async fn response(
    session: &mut Session,
    response: &mut ResponseHeader,
    is_sse: bool,
    ctx: &mut RequestCtx,
    tracker: &Arc<Tracker>,
) -> Result<()> {
    let route = ctx.route()?.clone();
    if let Some(lease) = &ctx.upstream.lease {
        lease.succeeded();
        let request = session.req_header();
        route.service.learn_affinity(request, response, lease.addr);
    }
    let settings = *ctx.chain.sse.settings();
    if is_sse {
        sse::fix_response_header(response, session.req_header().version)?;
        if settings.write_timeout.is_some() {
            session.set_write_timeout(settings.write_timeout);
        }
        let upstream = ctx.upstream.addr();
        let client = ctx.chain.client;
        ctx.stream = Some(Stream::open(
            &settings,
            route.metrics.clone(),
            tracker,
            || {
                let req = session.req_header();
                StreamInfo {
                    client,
                    host: request_host(req).unwrap_or_default().to_string(),
                    path: req.uri.path().to_string(),
                    route: route.name.clone(),
                    service: route.service.name.clone(),
                    upstream,
                    inactive_threshold: settings.inactive_threshold,
                }
            },
        ));
    }
    ctx.status = Some(response.status.as_u16());
    for instance in route.chain.iter() {
        if let Some(filter) = instance
            .middleware
            .response(session, response, &mut ctx.chain)?
        {
            ctx.body_filters.push(filter);
        }
    }
    Ok(())
}

/// Removes what belongs to the client's connection, and the headers its `Connection`
/// names (RFC 9110 7.6.1), except those the proxy sets itself. An upgrade request
/// (WebSocket, or another protocol) keeps `Upgrade` and says `Connection: upgrade`; but
/// not an upgrade to `h2c`: once upgraded, the client would speak HTTP/2 to the origin
/// directly, its requests past the proxy's routes and middleware ("h2c smuggling"), so it
/// goes as a plain request. (Over HTTP/2 a request cannot carry `Connection` at all: the h2
/// layer refuses it.)
pub fn strip_request_hop_by_hop(request: &mut RequestHeader, upgrade: bool) {
    let protocol = upgrade
        .then(|| request.headers.get(header::UPGRADE).cloned())
        .flatten()
        .filter(|p| {
            !p.as_bytes()
                .split(|b| *b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"h2c"))
        });
    let keep = [
        "host",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
    ];
    let present = HopByHop::of(&request.headers);
    if present.has(&header::CONNECTION) {
        for name in nominated(&request.headers, &keep) {
            request.remove_header(&name);
        }
    }
    for name in present.names() {
        request.remove_header(name);
    }
    if let Some(protocol) = protocol {
        // Cannot fail: both are valid header values.
        let _ = request.insert_header(header::UPGRADE, protocol);
        let _ = request.insert_header(header::CONNECTION, "upgrade");
    }
}

/// Removes what belongs to the origin's connection, and the headers its `Connection` names,
/// as for requests, except those the relay framed and classified the answer by. A `101`
/// answer to an upgrade keeps `Upgrade` and `Connection`, which the client needs.
pub fn strip_response_hop_by_hop(header: &mut ResponseHeader, upgraded: bool) {
    let keep = [
        "content-length",
        "content-type",
        "transfer-encoding",
        "upgrade",
    ];
    let keep = if upgraded { &keep[..] } else { &keep[..3] };
    let present = HopByHop::of(&header.headers);
    if present.has(&header::CONNECTION) {
        for name in nominated(&header.headers, keep) {
            header.remove_header(&name);
        }
    }
    for name in present.names() {
        let needed = name == TRANSFER_ENCODING
            || upgraded && (name == header::UPGRADE || name == header::CONNECTION);
        if !needed {
            header.remove_header(name);
        }
    }
}

/// The headers `headers`' `Connection` lines name, except `keep`.
fn nominated(headers: &HeaderMap, keep: &[&str]) -> Vec<HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .filter_map(|token| HeaderName::from_bytes(token.trim_ascii()).ok())
        .filter(|name| !keep.contains(&name.as_str()))
        .collect()
}

/// A body without a length is sent chunked to an HTTP/1.1 client, so the connection can
/// be reused after it (Pingora's proxy path does the same for close-delimited origins). An
/// HTTP/1.0 client knows no chunked coding (a server must not send it one, RFC 9112 6.1):
/// it gets the body as it is, ended by the end of the connection. The status line is the
/// proxy's own, HTTP/1.1, whatever the origin's was (RFC 9110 2.5).
pub fn frame_for_client(header: &mut ResponseHeader, client: Version) -> Result<()> {
    if client <= Version::HTTP_11 {
        header.set_version(Version::HTTP_11);
    }
    let status = header.status.as_u16();
    let bodyless = status == 204 || status == 304 || (100..200).contains(&status);
    let chunked = header.headers.contains_key(TRANSFER_ENCODING);
    if client < Version::HTTP_11 {
        if chunked {
            // The relay decodes the origin's framing; a length sent beside it means nothing.
            header.remove_header(&TRANSFER_ENCODING);
            header.remove_header(&header::CONTENT_LENGTH);
        }
    } else if client == Version::HTTP_11
        && !bodyless
        && !chunked
        && !header.headers.contains_key(header::CONTENT_LENGTH)
    {
        header.insert_header(TRANSFER_ENCODING, "chunked")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SENT: [(&str, &str); 12] = [
        ("Host", "h"),
        ("Connection", "x-named, keep-alive"),
        ("Keep-Alive", "timeout=5"),
        ("Proxy-Connection", "keep-alive"),
        ("Proxy-Authorization", "Basic eA=="),
        ("TE", "trailers"),
        ("Trailer", "x-t"),
        ("Upgrade", "websocket"),
        ("HTTP2-Settings", "AAMAAABkAAQAoAAAAAIAAAAA"),
        ("Transfer-Encoding", "chunked"),
        ("X-Named", "1"),
        ("X-Kept", "2"),
    ];

    fn names(headers: &HeaderMap) -> Vec<&str> {
        let mut names: Vec<&str> = headers.keys().map(|n| n.as_str()).collect();
        names.sort_unstable();
        names
    }

    #[test]
    fn every_hop_by_hop_header_is_stripped_each_way() {
        let mut request = RequestHeader::build("GET", b"/", None).expect("request");
        for (name, value) in SENT {
            request.append_header(name, value).expect("header");
        }
        strip_request_hop_by_hop(&mut request, false);
        assert_eq!(names(&request.headers), ["host", "x-kept"]);

        let mut upgrade = RequestHeader::build("GET", b"/", None).expect("request");
        for (name, value) in SENT {
            upgrade.append_header(name, value).expect("header");
        }
        strip_request_hop_by_hop(&mut upgrade, true);
        assert_eq!(
            names(&upgrade.headers),
            ["connection", "host", "upgrade", "x-kept"]
        );
        assert_eq!(upgrade.headers["connection"], "upgrade");

        let mut response = ResponseHeader::build(200, None).expect("response");
        for (name, value) in SENT {
            response.append_header(name, value).expect("header");
        }
        strip_response_hop_by_hop(&mut response, false);
        // The answer was framed by its Transfer-Encoding, which stays.
        assert_eq!(
            names(&response.headers),
            ["host", "transfer-encoding", "x-kept"]
        );

        let mut plain = RequestHeader::build("GET", b"/", None).expect("request");
        plain.append_header("Host", "h").expect("header");
        strip_request_hop_by_hop(&mut plain, false);
        assert_eq!(names(&plain.headers), ["host"]);
    }
}
