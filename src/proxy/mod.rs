//! The one `impl ProxyHttp`: each hook dispatches to routing, upstream and SSE code.
//!
//! A request's path through the hooks:
//!
//! ```text
//! request_filter          TLS older than the listener's min_version (403);
//!                         reject bad paths (400); route lookup (404 on a miss); note
//!                         whether the client asked for SSE; run the chain's request hooks
//!                         (a direct answer skips the rest, response hooks still run);
//!                         take SSE limit slots (503 when full)
//! request_body_filter     the chain's request_body hooks (size limits)
//! upstream_peer           resolve the service address (502 on failure); build the peer
//!                         with SSE-aware timeouts
//! fail_to_connect         no retries (endpoint retries come with service discovery)
//! upstream_request_filter path prefix, Host policy, X-Forwarded-*, X-Real-IP; then the
//!                         chain's upstream_request hooks
//! response_filter         SSE response? fix its headers (no Content-Length, no-cache,
//!                         X-Accel-Buffering), set the client write timeout, start the
//!                         stream record; then the chain's response hooks, which may
//!                         install body filters
//! response_body_filter    body filters in chain order (synchronous, never holding an
//!                         event back); then SSE pacing when flush_interval > 0
//! fail_to_proxy           502/504 (or the status a hook chose) with a one-line reason
//! logging                 the chain's logging hooks; SSE streams: one info line with
//!                         duration, bytes and how it ended
//! ```
//!
//! A `GET` that asks for an event stream does not go through Pingora's proxy loop past
//! `request_filter`: [`relay`] connects to the origin and streams the response itself,
//! calling `upstream_request_filter`, `response_filter` and the body filters the same way,
//! because only a loop of its own can act while the origin is silent (heartbeats, timeouts,
//! `max_lifetime`, draining). An event stream that arrives for any other request (no
//! `Accept: text/event-stream`) streams through Pingora's loop and `response_body_filter`,
//! unbuffered and observed, and the admin API can end it at its next event boundary, but the
//! timer-driven features do not apply to it.

mod relay;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::Bytes;
use http::header::{ACCEPT, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE};
use pingora_core::connectors::http::Connector;
use pingora_core::connectors::ConnectorOptions;
use pingora_core::modules::http::HttpModules;
use pingora_core::server::configuration::ServerConf;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorSource, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};

use crate::config::Config;
use crate::endpoints::Lease;
use crate::http_util::{client_ip, request_host, scheme};
use crate::metrics::OpenStream;
use crate::middleware::{BodyFilter, Outcome, Reply};
use crate::routing::{NoRoute, Route};
use crate::sse::limits::{ClientSlotGuard, SlotGuard};
use crate::sse::scanner::EventScanner;
use crate::sse::tracker::{StreamInfo, TrackGuard, TRACKER};
use crate::sse::{self, FlushPacer, SseSettings};

/// The proxy. Holds the current config; a request keeps the route (and so the service and
/// middleware chain) it matched for its whole life, whatever a reload does meanwhile.
pub struct StreamGate {
    config: Arc<ArcSwap<Config>>,
    /// Connects relayed event streams to their origins.
    connector: Connector,
}

impl StreamGate {
    /// `server` is Pingora's server config: the relay's connector takes the same options
    /// as Pingora's own (its `ca_file`, the default trust for https origins, included).
    pub fn new(config: Arc<ArcSwap<Config>>, server: &ServerConf) -> Self {
        StreamGate {
            config,
            connector: Connector::new(Some(ConnectorOptions::from_server_conf(server))),
        }
    }
}

/// Per-request state: what the origin design's middleware `Context` carries (the request
/// and response are the session's and the hooks' arguments).
#[derive(Default)]
pub struct RequestCtx {
    /// The route this request matched, set in `request_filter`: its service and chain.
    pub route: Option<Arc<Route>>,
    /// A typed value map the middlewares of a chain share.
    pub values: http::Extensions,
    /// The effective SSE settings: the service's, overlaid by any `sse` middleware.
    pub sse: SseSettings,
    /// The client asked for an event stream (`Accept: text/event-stream`) and SSE is
    /// enabled: the upstream read timeout is the SSE one and stream limits apply.
    pub sse_request: bool,
    /// Set when the response turned out to be an event stream.
    pub stream: Option<SseStream>,
    /// The origin address, once chosen.
    pub upstream: Option<SocketAddr>,
    /// The chosen endpoint, counted open while the request lives.
    pub lease: Option<Lease>,
    /// Endpoints this request failed to connect to (retries go elsewhere).
    pub tried: Vec<SocketAddr>,
    /// When the request arrived.
    pub started: Option<Instant>,
    /// The response status, once known.
    pub status: Option<u16>,
    /// Request body bytes seen so far (for size limits).
    pub request_body_bytes: u64,
    /// Limit slots held while this request lives.
    pub slots: Vec<SlotGuard>,
    pub client_slots: Vec<ClientSlotGuard>,
    /// The stream's registry entry, with `connection_tracking`.
    pub tracked: Option<TrackGuard>,
    /// The request is an event stream relayed by [`relay`].
    pub relayed: bool,
    body_filters: Vec<Box<dyn BodyFilter>>,
}

impl RequestCtx {
    /// The service this request goes to.
    pub fn service_name(&self) -> Option<&str> {
        self.route.as_ref().map(|r| r.service.name.as_str())
    }

    /// The id the `request_id` middleware gave this request.
    pub fn request_id(&self) -> Option<&str> {
        let crate::middleware::request_id::Id(id) = self.values.get()?;
        id.to_str().ok()
    }

    /// The URL the request was sent to at the origin, once the origin is chosen.
    pub fn target_url(&self, path_and_query: &str) -> Option<String> {
        let route = self.route.as_ref()?;
        let addr = self.upstream?;
        Some(format!(
            "{}://{addr}{}{path_and_query}",
            route.service.url.scheme, route.service.url.prefix
        ))
    }
}

/// An SSE response in flight.
pub struct SseStream {
    started: Instant,
    pacer: Option<FlushPacer>,
    scanner: EventScanner,
    /// When the last event completed, for the gap histogram.
    last_event_at: Option<Instant>,
    /// Keeps the stream in the open-streams gauge; counts its close on drop.
    open: OpenStream,
    /// The admin API asked to end this stream and the `retry:` hint has gone out
    /// (streams through Pingora's loop).
    ending: bool,
    /// How the stream ended, when the proxy knows better than the final error.
    reason: Option<&'static str>,
}

#[async_trait]
impl ProxyHttp for StreamGate {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx::default()
    }

    /// No downstream modules: Pingora's compression module holds event streams until their
    /// end, and nothing else is wanted.
    fn init_downstream_modules(&self, _modules: &mut HttpModules) {}

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        ctx.started = Some(Instant::now());
        if let Some(min) = crate::tls::below_min_version(session, &self.config.load()) {
            let reply = Reply::text(403, &format!("this listener requires TLS {min} or newer"));
            write_reply(session, reply).await?;
            return Ok(true);
        }
        let req = session.req_header();
        if has_dot_segment(req.uri.path()) {
            let reply = Reply::text(400, "the path contains `.` or `..` segments");
            write_reply(session, reply).await?;
            return Ok(true);
        }
        let host = request_host(req);
        let port = session
            .server_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.port());
        let config = self.config.load();
        let route = match config.routes.lookup(host, port, req.uri.path()) {
            Ok(route) => route.clone(),
            Err(miss) => {
                let reason = match miss {
                    NoRoute::Host => format!("no route for host `{}`", host.unwrap_or("")),
                    NoRoute::Path => format!(
                        "no route for path `{}` on host `{}`",
                        req.uri.path(),
                        host.unwrap_or("")
                    ),
                };
                write_reply(session, Reply::text(404, &reason)).await?;
                return Ok(true);
            }
        };
        ctx.sse = route.service.sse;
        ctx.sse_request = ctx.sse.enabled
            && session
                .get_header(ACCEPT)
                .is_some_and(|v| sse::accepts_event_stream(v.as_bytes()));
        ctx.route = Some(route.clone());

        for instance in route.chain.iter() {
            if let Outcome::Respond(reply) = instance.middleware.request(session, ctx).await? {
                self.answer(session, ctx, &route, reply).await?;
                return Ok(true);
            }
        }

        if ctx.sse_request {
            let limits = [
                (config.sse_limit.as_ref(), "this proxy"),
                (route.service.sse_limit.as_ref(), "this service"),
            ];
            for (slots, scope) in limits {
                let Some(slots) = slots else { continue };
                match slots.try_acquire() {
                    Some(guard) => ctx.slots.push(guard),
                    None => {
                        let reply = crate::middleware::sse::limit_reply(slots.max(), scope);
                        self.answer(session, ctx, &route, reply).await?;
                        return Ok(true);
                    }
                }
            }
            let client_limits = [
                config.sse_client_limit.as_ref(),
                route.service.sse_client_limit.as_ref(),
            ];
            for slots in client_limits.into_iter().flatten() {
                let Some(client) = client_ip(session) else {
                    break;
                };
                match slots.try_acquire(client) {
                    Some(guard) => ctx.client_slots.push(guard),
                    None => {
                        let reply = crate::middleware::sse::client_limit_reply(slots.max());
                        self.answer(session, ctx, &route, reply).await?;
                        return Ok(true);
                    }
                }
            }
        }
        if relay::relays(session, ctx) {
            self.relay(session, ctx).await?;
            return Ok(true);
        }
        Ok(false)
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        // A request answered before routing has no chain to run.
        let Some(route) = ctx.route.clone() else {
            return Ok(());
        };
        for instance in route.chain.iter() {
            instance.middleware.request_body(body, end_of_stream, ctx)?;
        }
        Ok(())
    }

    async fn upstream_peer(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let route = route(ctx)?.clone();
        let service = &route.service;
        let lease = service.choose(session, &ctx.tried).await?;
        let addr = lease.addr;
        ctx.upstream = Some(addr);
        ctx.tried.push(addr);
        ctx.lease = Some(lease);
        Ok(service.peer(addr, ctx.sse_request.then_some(&ctx.sse)))
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        // Nothing was sent yet: another endpoint may take the request, up to `retries`.
        if let Some(lease) = ctx.lease.take() {
            lease.failed();
        }
        let retries = ctx.route.as_ref().map_or(0, |r| r.service.retries) as usize;
        let again = ctx.tried.len() <= retries;
        if again {
            log::info!(
                "retrying on another endpoint after {}: {e}",
                ctx.upstream.map(|a| a.to_string()).unwrap_or_default()
            );
        }
        e.set_retry(again);
        e
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let client = client_ip(session);
        let route = route(ctx)?.clone();
        route
            .service
            .rewrite_request(upstream_request, client, scheme(session))?;
        for instance in route.chain.iter() {
            instance
                .middleware
                .upstream_request(session, upstream_request, ctx)?;
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let route = route(ctx)?.clone();
        if let Some(lease) = &ctx.lease {
            lease.succeeded();
        }
        let settings = ctx.sse;
        let is_sse = settings.enabled
            && upstream_response
                .headers
                .get(CONTENT_TYPE)
                .is_some_and(|v| sse::is_event_stream(v.as_bytes()));
        if is_sse {
            sse::fix_response_header(upstream_response, session.req_header().version)?;
            if settings.write_timeout.is_some() {
                session.set_write_timeout(settings.write_timeout);
            }
            ctx.stream = Some(SseStream {
                started: Instant::now(),
                pacer: settings.flush_interval.map(FlushPacer::new),
                scanner: EventScanner::new(),
                last_event_at: None,
                open: route.metrics.sse_opened(),
                ending: false,
                reason: None,
            });
            if settings.connection_tracking {
                let req = session.req_header();
                ctx.tracked = Some(TRACKER.open(StreamInfo {
                    client: client_ip(session),
                    host: request_host(req).unwrap_or_default().to_string(),
                    path: req.uri.path().to_string(),
                    route: route.name.clone(),
                    service: route.service.name.clone(),
                    upstream: ctx.upstream,
                    inactive_threshold: settings.inactive_threshold,
                }));
            }
        }
        ctx.status = Some(upstream_response.status.as_u16());
        for instance in route.chain.iter() {
            if let Some(filter) = instance
                .middleware
                .response(session, upstream_response, ctx)?
            {
                ctx.body_filters.push(filter);
            }
        }
        Ok(())
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<Duration>> {
        if let (Some(stream), Some(tracked)) = (ctx.stream.as_mut(), ctx.tracked.as_mut()) {
            if stream.ending {
                return Err(Error::explain(
                    ErrorType::InternalError,
                    "stream ended through the admin API",
                ));
            }
            let asked = tracked.entry.end_requested();
            if let Some(reason) = asked.filter(|_| !ctx.relayed) {
                if stream.scanner.at_boundary() && !end_of_stream {
                    // Between two events: tell the client when to come back, then end the
                    // stream when the origin next sends something. The chunk that arrived
                    // is not delivered; a client resuming with Last-Event-ID gets it again.
                    *body = Some(Bytes::from_static(sse::END_HINT));
                    stream.ending = true;
                    stream.reason = Some(reason);
                    return Ok(None);
                }
            }
        }
        if let (Some(stream), Some(chunk)) = (ctx.stream.as_mut(), body.as_ref()) {
            // Follows what the origin sent, before any middleware rewrites it.
            let events = stream.scanner.feed(chunk);
            let len = chunk.len();
            self.record_chunk(ctx, len, events);
        }
        self.apply_body_filters(ctx, body, end_of_stream)?;
        let pacer = ctx.stream.as_mut().and_then(|s| s.pacer.as_mut());
        match pacer {
            Some(pacer) if !end_of_stream && body.as_ref().is_some_and(|b| !b.is_empty()) => {
                Ok(pacer.delay(Instant::now()))
            }
            _ => Ok(None),
        }
    }

    /// Pingora's error log line for a request: its own summary, plus the request id.
    fn request_summary(&self, session: &Session, ctx: &RequestCtx) -> String {
        let summary = session.as_ref().request_summary();
        match ctx.request_id() {
            Some(id) => format!("{summary}, request id: {id}"),
            None => summary,
        }
    }

    fn suppress_error_log(&self, _session: &Session, ctx: &RequestCtx, error: &Error) -> bool {
        // A started event stream always ends with an "error" (client gone, origin gone,
        // timeout); `logging` reports those at info level with the reason. A client that
        // hangs up before its answer is ordinary too.
        let client_gone = error.esource() == &ErrorSource::Downstream
            && matches!(
                error.etype(),
                ErrorType::ConnectionClosed | ErrorType::ReadError | ErrorType::WriteError
            );
        if client_gone && ctx.stream.is_none() {
            log::debug!("client closed the connection: {error}");
        }
        client_gone || (ctx.stream.is_some() && error.esource() != &ErrorSource::Internal)
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let service = ctx.route.as_ref().map(|r| r.service.name.as_str());
        let code = match error_response(e, service) {
            Some((code, reason)) if session.response_written().is_none() => {
                if let Err(write_error) = write_reply(session, Reply::text(code, &reason)).await {
                    log::debug!("could not send the {code} response: {write_error}");
                }
                code
            }
            Some((code, _)) => code,
            None => 0,
        };
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        let status = session
            .response_written()
            .map_or(ctx.status.unwrap_or(0), |r| r.status.as_u16());
        let reason = match ctx.stream.as_ref().and_then(|s| s.reason) {
            Some(reason) => reason,
            None => close_reason(e),
        };
        if let Some(route) = &ctx.route {
            for instance in route.chain.iter() {
                instance.middleware.logging(session, ctx);
            }
            let elapsed = ctx.started.map(|s| s.elapsed()).unwrap_or_default();
            route.metrics.request(status, elapsed);
            if let Some(e) = e.filter(|e| e.esource() == &ErrorSource::Upstream) {
                match e.etype() {
                    ErrorType::ConnectTimedout
                    | ErrorType::ReadTimedout
                    | ErrorType::WriteTimedout => route.service.metrics.timeout(),
                    ErrorType::ConnectRefused
                    | ErrorType::ConnectNoRoute
                    | ErrorType::ConnectError
                    | ErrorType::ConnectProxyFailure
                    | ErrorType::TLSHandshakeFailure
                    | ErrorType::InvalidCert
                    | ErrorType::HandshakeError => route.service.metrics.connect_error(),
                    _ => {}
                }
            }
        }
        let access = self.config.load().access_log;
        if access.enabled {
            let sse = ctx.stream.as_ref().map(|s| (s.scanner.events(), reason));
            crate::access_log::write(
                access.format,
                &crate::access_log::Entry {
                    session,
                    ctx,
                    status,
                    sse,
                    error: e,
                },
            );
        }
        let Some(stream) = ctx.stream.as_mut() else {
            return;
        };
        stream.open.reason = reason;
        if let Some(tracked) = ctx.tracked.as_mut() {
            // The guard logs the close when it drops, with this reason.
            tracked.reason = reason;
            if let Some(e) = e {
                tracked.detail = Some(e.to_string());
            }
            return;
        }
        let Some(stream) = ctx.stream.as_ref() else {
            return;
        };
        let route = ctx.route.as_ref().map_or("", |r| r.name.as_str());
        let client = client_ip(session)
            .map(|ip| ip.to_string())
            .unwrap_or_default();
        log::info!(
            "sse stream ended: route={route} client={client} request_id={} duration={:.3}s \
             events={} bytes={} last_event_id={:?} reason={reason}{}",
            ctx.request_id().unwrap_or("-"),
            stream.started.elapsed().as_secs_f64(),
            stream.scanner.events(),
            session.body_bytes_sent(),
            String::from_utf8_lossy(stream.scanner.last_id()),
            e.map(|e| format!(" detail=\"{e}\"")).unwrap_or_default(),
        );
    }
}

/// How a stream ended, from the error Pingora finished it with.
fn close_reason(e: Option<&Error>) -> &'static str {
    match e {
        None => "origin_closed",
        Some(e) => match (e.esource(), e.etype()) {
            (ErrorSource::Downstream, _) => "client_closed",
            (ErrorSource::Upstream, ErrorType::ReadTimedout) => "idle_timeout",
            (ErrorSource::Upstream, _) => "origin_error",
            _ => "error",
        },
    }
}

fn route(ctx: &RequestCtx) -> Result<&Arc<Route>> {
    ctx.route
        .as_ref()
        .ok_or_else(|| Error::explain(ErrorType::InternalError, "request has no route"))
}

/// Whether a path has `.` or `..` segments, plain or percent-encoded. Such paths could
/// match one route here and mean another path at the origin.
fn has_dot_segment(path: &str) -> bool {
    path.split('/').any(|segment| {
        let s = segment.as_bytes();
        let dot = |b: &[u8]| b == b"." || b.eq_ignore_ascii_case(b"%2e");
        match s.len() {
            1 | 3 => dot(s),
            2 => s == b"..",
            4 => (dot(&s[..1]) && dot(&s[1..])) || (dot(&s[..3]) && dot(&s[3..])),
            6 => dot(&s[..3]) && dot(&s[3..]),
            _ => false,
        }
    })
}

/// The status and one-line reason for an error, or `None` when the client is gone.
fn error_response(e: &Error, service: Option<&str>) -> Option<(u16, String)> {
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

impl StreamGate {
    /// Counts a chunk of an event stream from the origin: `len` bytes that completed
    /// `events` events (already fed to the stream's scanner).
    fn record_chunk(&self, ctx: &mut RequestCtx, len: usize, events: u64) {
        let Some(stream) = ctx.stream.as_mut() else {
            return;
        };
        if let Some(tracked) = &ctx.tracked {
            let id = (events > 0).then(|| stream.scanner.last_id());
            tracked.entry.record(len, events, id);
        }
        if let Some(route) = &ctx.route {
            route.metrics.sse_chunk(len, events);
            if events > 0 {
                let now = Instant::now();
                match stream.last_event_at {
                    None => route.metrics.sse_first_event.observe(now - stream.started),
                    Some(last) => route.metrics.sse_gap.observe(now - last),
                }
                stream.last_event_at = Some(now);
            }
        }
    }

    /// Runs the route's body filters (in chain order) over `body`.
    fn apply_body_filters(
        &self,
        ctx: &mut RequestCtx,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
    ) -> Result<()> {
        for filter in ctx.body_filters.iter_mut() {
            filter.filter(body, end_of_stream)?;
        }
        Ok(())
    }

    /// Answers a request directly with `reply`, after every response hook of the route's
    /// chain has seen it.
    async fn answer(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        route: &Route,
        reply: Reply,
    ) -> Result<()> {
        let mut header = reply_header(&reply)?;
        ctx.status = Some(reply.status);
        if ctx.sse_request && matches!(reply.status, 429 | 503) {
            route.metrics.sse_refused();
        }
        for instance in route.chain.iter() {
            // A direct answer's body is complete: body filters are not needed.
            let _ = instance.middleware.response(session, &mut header, ctx)?;
        }
        write(session, header, reply.body).await
    }
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
async fn write_reply(session: &mut Session, reply: Reply) -> Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::http_error;

    #[test]
    fn dot_segments() {
        assert!(has_dot_segment("/a/../b"));
        assert!(has_dot_segment("/a/./b"));
        assert!(has_dot_segment("/a/%2E%2e/b"));
        assert!(has_dot_segment("/a/.%2e"));
        assert!(has_dot_segment("/.."));
        assert!(!has_dot_segment("/a/..b/c"));
        assert!(!has_dot_segment("/a/b.c/"));
        assert!(!has_dot_segment("/"));
    }

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
