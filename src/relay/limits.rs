//! Stream limits taken before the origin is contacted: a request that announces an event
//! stream takes a slot under the global and the service's `max_connections` and
//! `max_connections_per_client` (an `sse` middleware took its own already), and is refused
//! when one is full.

use pingora_proxy::Session;

use super::context::RequestCtx;
use crate::config::Config;
use crate::http_util::client_ip;
use crate::middleware::sse::{client_limit_reply, limit_reply};
use crate::middleware::Reply;
use crate::routing::Route;

/// Takes the slots an announced stream needs; the answer to send when a limit is full.
pub fn admit(
    config: &Config,
    route: &Route,
    session: &Session,
    ctx: &mut RequestCtx,
) -> Option<Reply> {
    let sse = &mut ctx.chain.sse;
    let limits = [
        (config.sse_limit.as_ref(), "this proxy"),
        (route.service.sse_limit.as_ref(), "this service"),
    ];
    for (slots, scope) in limits {
        let Some(slots) = slots else { continue };
        match slots.try_acquire() {
            Some(guard) => sse.slots.push(guard),
            None => return Some(limit_reply(slots.max(), scope)),
        }
    }
    let client_limits = [
        config.sse_client_limit.as_ref(),
        route.service.sse_client_limit.as_ref(),
    ];
    let client = client_ip(session)?;
    for slots in client_limits.into_iter().flatten() {
        match slots.try_acquire(client) {
            Some(guard) => sse.client_slots.push(guard),
            None => return Some(client_limit_reply(slots.max())),
        }
    }
    None
}
