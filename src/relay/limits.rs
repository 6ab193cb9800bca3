//! Stream limits: a request collects the limits its event stream would count against (the
//! global `sse` block's, its service's, then any `sse` middleware's), and takes a slot under
//! each either before its origin is contacted (it announced an event stream) or when its
//! answer turns out to be one. Never one stream over a limit is served.

use std::net::IpAddr;

use super::context::RequestCtx;
use crate::config::Config;
use crate::middleware::sse::refusal_reply;
use crate::middleware::Reply;
use crate::routing::Route;
use crate::sse::limits::Limit;

/// Adds the global and the service's limits to the request's (before the chain runs, so
/// the refusal names the most general full limit).
pub fn collect(config: &Config, route: &Route, ctx: &mut RequestCtx) {
    let applying = &mut ctx.chain.sse.limits.applying;
    let blocks = [
        (
            config.sse_limit.as_ref(),
            config.sse_client_limit.as_ref(),
            "this proxy",
        ),
        (
            route.service.sse_limit.as_ref(),
            route.service.sse_client_limit.as_ref(),
            "this service",
        ),
    ];
    for (slots, client_slots, scope) in blocks {
        if let Some(slots) = slots {
            applying.push(Limit::Streams {
                slots: slots.clone(),
                scope,
            });
        }
        if let Some(slots) = client_slots {
            applying.push(Limit::PerClient(slots.clone()));
        }
    }
}

/// Takes the request's slots for a stream of `client`; the answer when a limit is full.
pub fn take(ctx: &mut RequestCtx, client: Option<IpAddr>) -> Option<Reply> {
    ctx.chain.sse.limits.take(client).err().map(refusal_reply)
}
