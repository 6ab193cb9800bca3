//! The per-request context: everything the proxy knows about one request, grouped by what
//! it concerns, each fact stored once.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use super::stream::Stream;
use crate::middleware::{self, BodyFilter};
use crate::routing::Route;
use crate::state::InFlightGuard;
use crate::upstream::{Attempts, Lease};

/// One request's state, created when its header has been read.
pub struct RequestCtx {
    /// When the request arrived.
    pub started: Instant,
    /// The route it matched: its service and middleware chain. A reload never changes it.
    pub route: Option<Arc<Route>>,
    /// What the middleware chain reads and writes (values, SSE settings and limit slots,
    /// body size).
    pub chain: middleware::Context,
    /// Where the request goes.
    pub upstream: UpstreamCtx,
    /// The response body filters the chain's response hooks installed, in chain order.
    pub body_filters: Vec<Box<dyn BodyFilter>>,
    /// The response status, once known.
    pub status: Option<u16>,
    /// Set when the response is an event stream.
    pub stream: Option<Stream>,
    /// Counts the request as being served while it lives.
    pub in_flight: Option<InFlightGuard>,
    /// The request went on in a task of its own, with everything above: what Pingora
    /// holds is an empty shell, with nothing to record.
    pub detached: bool,
}

/// Where a request goes: the endpoints it tried and the one it uses now.
#[derive(Debug, Default)]
pub struct UpstreamCtx {
    /// The endpoints tried, and the retries left.
    pub attempts: Attempts,
    /// The chosen endpoint, counted open while the request uses it.
    pub lease: Option<Lease>,
}

impl UpstreamCtx {
    /// The origin the request was last sent to (or tried), for logs.
    pub fn addr(&self) -> Option<SocketAddr> {
        self.lease
            .as_ref()
            .map(|l| l.addr)
            .or_else(|| self.attempts.last())
    }
}

impl Default for RequestCtx {
    fn default() -> Self {
        RequestCtx {
            started: Instant::now(),
            route: None,
            chain: middleware::Context::default(),
            upstream: UpstreamCtx::default(),
            body_filters: Vec::new(),
            status: None,
            stream: None,
            in_flight: None,
            detached: false,
        }
    }
}

impl RequestCtx {
    /// The route this request matched; an error for a request that has none (a hook that
    /// runs only after routing).
    pub fn route(&self) -> pingora_error::Result<&Arc<Route>> {
        self.route.as_ref().ok_or_else(|| {
            pingora_error::Error::explain(
                pingora_error::ErrorType::InternalError,
                "request has no route",
            )
        })
    }

    /// The service this request goes to.
    pub fn service_name(&self) -> Option<&str> {
        self.route.as_ref().map(|r| r.service.name.as_str())
    }

    /// The query parameters the route's middlewares hold credentials in (`api_key`), which
    /// logs redact beside the usual credential names.
    pub fn secret_params(&self) -> Vec<&str> {
        let chain = self.route.iter().flat_map(|r| r.chain.iter());
        chain
            .filter_map(|i| i.middleware.secret_query_param())
            .collect()
    }

    /// The id the `request_id` middleware gave this request.
    pub fn request_id(&self) -> Option<&str> {
        self.chain.request_id()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every open stream holds its request's context: the SSE settings are shared with
    /// the service, not copied into it (872 bytes with the copy).
    #[test]
    fn a_request_context_holds_no_copy_of_its_settings() {
        let size = std::mem::size_of::<RequestCtx>();
        assert!(size <= 680, "RequestCtx is {size} bytes");
    }
}
