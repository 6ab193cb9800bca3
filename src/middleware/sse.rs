//! `sse`: SSE settings per route. Marks event-stream requests and applies its
//! own SSE settings to the routes it is on.
//!
//! ```yaml
//! type: sse
//! config:                      # the keys of the global `sse` block; unset keys inherit
//!   enabled: true              # false: treat event streams on these routes as ordinary
//!   flush_interval: 100ms
//!   header_timeout: 10s
//!   read_timeout: 0
//!   write_timeout: 0
//!   heartbeat_interval: 15s    # comment lines while the origin is silent, between events
//!   max_lifetime: 1h           # end after the current event, with a retry hint
//!   inactive_threshold: 5m     # the cleanup task closes tracked streams silent this long
//!   on_upstream_error: event   # a last `event: error` when the origin dies
//!   drain_period: 10s          # spread of the ends on shutdown or upgrade
//!   connection_tracking: true  # register each stream, log its open and close
//!   max_connections: 1000      # streams open at once through this instance
//!   max_connections_per_client: 5   # per client address
//! ```
//!
//! Phase: `request`. It overlays its settings on the service's, marks whether the request
//! asks for an event stream (`ctx.sse.announced`, and `IsSse` in the value map), and adds
//! its own `max_connections` and `max_connections_per_client` to the limits the request's
//! stream counts against. They are taken with the global and the service's ones: before the
//! origin is contacted when the request asked for a stream, else when the answer turns out
//! to be one; a full limit answers `503` (`429` for the per-client limit) with
//! `Retry-After`.

use std::sync::Arc;

use http::header::{HeaderValue, ACCEPT, RETRY_AFTER};
use pingora_error::Result;
use pingora_proxy::Session;

use super::{Context, Middleware, Outcome, Reply};
use crate::sse::limits::{self, Limit, Refusal};
use crate::sse::{self, SseFile};

pub type Config = SseFile;

/// Set in the request's value map when this middleware saw an event-stream request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IsSse(pub bool);

/// Seconds a client refused by a limit is told to wait.
pub const LIMIT_RETRY_AFTER: u32 = 5;

pub struct SseMiddleware {
    config: SseFile,
    slots: Option<std::sync::Arc<limits::Slots>>,
    client_slots: Option<std::sync::Arc<limits::ClientSlots>>,
}

impl SseMiddleware {
    /// An instance named `name`, whose limits count in `limits`.
    pub fn new(config: &Config, name: &str, limits: &limits::Registry) -> Self {
        SseMiddleware {
            config: config.clone(),
            slots: config
                .max_connections
                .map(|max| limits.slots(&format!("middleware:{name}"), max)),
            client_slots: config
                .max_connections_per_client
                .map(|max| limits.client_slots(&format!("middleware:{name}"), max)),
        }
    }
}

impl Middleware for SseMiddleware {
    fn request(&self, session: &mut Session, ctx: &mut Context) -> Result<Outcome> {
        let sse = &mut ctx.sse;
        sse.set_settings(Arc::new(sse.settings().overlay(&self.config)));
        sse.announced = sse.settings().enabled
            && session
                .get_header(ACCEPT)
                .is_some_and(|v| sse::accepts_event_stream(v.as_bytes()));
        ctx.values.insert(IsSse(sse.announced));
        if let Some(slots) = &self.slots {
            sse.limits.applying.push(Limit::Streams {
                slots: slots.clone(),
                scope: "this route",
            });
        }
        if let Some(slots) = &self.client_slots {
            sse.limits.applying.push(Limit::PerClient(slots.clone()));
        }
        Ok(Outcome::Continue)
    }
}

/// The answer to a stream a limit refused: `503` (`429` for a per-client limit) with
/// `Retry-After`.
pub fn refusal_reply(refusal: Refusal) -> Reply {
    match refusal {
        Refusal::Full { max, scope } => limit_reply(max, scope),
        Refusal::Client { max } => client_limit_reply(max),
    }
}

/// The `429` for a stream refused by a `max_connections_per_client` limit.
pub fn client_limit_reply(max: usize) -> Reply {
    Reply::text(
        429,
        &format!("too many open event streams from this client (limit {max})"),
    )
    .with_header(RETRY_AFTER, HeaderValue::from(LIMIT_RETRY_AFTER))
}

/// The `503` for a stream refused by a `max_connections` limit.
pub fn limit_reply(max: usize, scope: &str) -> Reply {
    Reply::text(
        503,
        &format!("too many open event streams for {scope} (limit {max})"),
    )
    .with_header(RETRY_AFTER, HeaderValue::from(LIMIT_RETRY_AFTER))
}
