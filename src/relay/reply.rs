//! Answers the proxy gives itself: a middleware's direct answer or a refusal by a limit
//! (after every response hook of the route's chain has seen it, so CORS and header
//! middlewares decorate a 401 or 503 too), and answers before a route is known.

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_LENGTH};
use pingora_error::Result;
use pingora_http::ResponseHeader;
use pingora_proxy::Session;

use super::context::RequestCtx;
use super::stream::apply_filters;
use crate::middleware::Reply;
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
    let mut filters = Vec::new();
    for instance in route.chain.iter() {
        let hook = instance
            .middleware
            .response(session, &mut header, &mut ctx.chain)?;
        filters.extend(hook);
    }
    // The body goes through the filters the hooks installed (a `compress` that announced
    // an encoding, a `body_replace`), whole: an answer relayed from a middleware's service
    // (`forward_auth`) may be a page of any size.
    let mut body = Some(reply.body);
    apply_filters(&mut filters, &mut body, true)?;
    let body = body.unwrap_or_default();
    if header.headers.contains_key(CONTENT_LENGTH) {
        header.insert_header(CONTENT_LENGTH, body.len())?;
    }
    write(session, header, body).await
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
