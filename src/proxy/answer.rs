//! Answers the proxy writes itself: a middleware's direct answer (after the chain's
//! response hooks), refusals before routing, and the status and one-line reason for an
//! error (502, 504, 503 ...).

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_LENGTH};
use pingora_error::{Error, ErrorSource, ErrorType, Result};
use pingora_http::ResponseHeader;
use pingora_proxy::Session;

use crate::middleware::Reply;
use crate::relay::RequestCtx;
use crate::routing::Route;

/// Answers a request directly with `reply`, after every response hook of the route's
/// chain has seen it.
pub async fn answer(
    session: &mut Session,
    ctx: &mut RequestCtx,
    route: &Route,
    reply: Reply,
) -> Result<()> {
    let mut header = reply_header(&reply)?;
    ctx.status = Some(reply.status);
    if ctx.chain.sse.announced && matches!(reply.status, 429 | 503) {
        route.metrics.sse_refused();
    }
    for instance in route.chain.iter() {
        // A direct answer's body is complete: body filters are not needed.
        let _ = instance
            .middleware
            .response(session, &mut header, &mut ctx.chain)?;
    }
    write(session, header, reply.body).await
}

fn reply_header(reply: &Reply) -> Result<ResponseHeader> {
    let mut header = ResponseHeader::build(reply.status, Some(reply.headers.len() + 2))?;
    for (name, value) in &reply.headers {
        header.append_header(name.clone(), value.clone())?;
    }
    header.insert_header(CONTENT_LENGTH, reply.body.len())?;
    if !header.headers.contains_key(CACHE_CONTROL) {
        header.insert_header(CACHE_CONTROL, "no-store")?;
    }
    Ok(header)
}

/// Writes `reply` as it is (no chain: for answers before a route is known).
pub async fn write_reply(session: &mut Session, reply: Reply) -> Result<()> {
    let header = reply_header(&reply)?;
    write(session, header, reply.body).await
}

async fn write(session: &mut Session, header: ResponseHeader, body: Bytes) -> Result<()> {
    let empty = body.is_empty();
    session
        .write_response_header(Box::new(header), empty)
        .await?;
    if !empty {
        session.write_response_body(Some(body), true).await?;
    }
    Ok(())
}

/// The status and one-line reason for an error, or `None` when the client is gone.
pub fn error_response(e: &Error, service: Option<&str>) -> Option<(u16, String)> {
    let service = service.map_or_else(String::new, |s| format!("service `{s}`: "));
    let what = match e.etype() {
        ErrorType::HTTPStatus(code) => {
            let reason = e.context.as_ref().map(|c| c.as_str().to_string());
            return Some((*code, reason.unwrap_or_else(|| format!("error {code}"))));
        }
        ErrorType::ConnectTimedout => (504, "connecting to the origin timed out"),
        ErrorType::ReadTimedout => (504, "the origin did not answer in time"),
        ErrorType::WriteTimedout if e.esource() == &ErrorSource::Upstream => {
            (504, "sending the request to the origin timed out")
        }
        ErrorType::ConnectRefused => (502, "the origin refused the connection"),
        ErrorType::TLSHandshakeFailure | ErrorType::InvalidCert | ErrorType::HandshakeError
            if e.esource() == &ErrorSource::Upstream =>
        {
            return Some((
                502,
                format!("{service}TLS to the origin failed: {}", tls_reason(e)),
            ))
        }
        ErrorType::ConnectNoRoute => (502, "no network route to the origin"),
        _ => match e.esource() {
            ErrorSource::Upstream => {
                return Some((
                    502,
                    format!("{service}the origin failed: {}", e.etype().as_str()),
                ))
            }
            ErrorSource::Downstream => match e.etype() {
                ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed => {
                    return None
                }
                _ => (400, "the request could not be read"),
            },
            _ => (500, "internal error"),
        },
    };
    Some((what.0, format!("{service}{}", what.1)))
}

/// The reason for a failed TLS handshake, on one line: rustls' words after Pingora's
/// wrapping (`TLS connect() failed: TLSHandshakeFailure context: .. cause: `), such as
/// `invalid peer certificate: UnknownIssuer, SNI: feed.internal`.
fn tls_reason(e: &Error) -> String {
    let context = e.context.as_ref().map(|c| c.as_str().to_string());
    let context = context.unwrap_or_else(|| e.etype().as_str().to_string());
    let reason = match context.rfind(" cause: ") {
        Some(at) => &context[at + " cause: ".len()..],
        None => context
            .strip_prefix("TLS connect() failed: ")
            .unwrap_or(&context),
    };
    reason.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::http_error;

    #[test]
    fn error_statuses() {
        let refused = Error::new(ErrorType::ConnectRefused).into_up();
        assert_eq!(
            error_response(&refused, Some("web")),
            Some((
                502,
                "service `web`: the origin refused the connection".into()
            ))
        );
        let timeout = Error::new(ErrorType::ReadTimedout).into_up();
        assert_eq!(error_response(&timeout, None).map(|r| r.0), Some(504));
        let gone = Error::new(ErrorType::ConnectionClosed).into_down();
        assert_eq!(error_response(&gone, None), None);
        let tls = Error::explain(
            ErrorType::TLSHandshakeFailure,
            "TLS connect() failed: TLSHandshakeFailure context: tls connect error cause: \
             invalid peer certificate: UnknownIssuer, SNI: feed.internal",
        )
        .into_up();
        assert_eq!(
            error_response(&tls, Some("feed")),
            Some((
                502,
                "service `feed`: TLS to the origin failed: invalid peer certificate: \
                 UnknownIssuer, SNI: feed.internal"
                    .into()
            ))
        );
        let status = http_error(502, "service `x`: cannot resolve `y`");
        assert_eq!(
            error_response(&status, None),
            Some((502, "service `x`: cannot resolve `y`".into()))
        );
    }
}
