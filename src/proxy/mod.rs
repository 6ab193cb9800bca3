//! The one `impl ProxyHttp`: each hook dispatches to routing, the middleware chain and the
//! relay; [`answer`] writes the answers the proxy gives itself.
//!
//! A request's path through the hooks:
//!
//! ```text
//! request_filter          TLS older than the listener's min_version (403);
//!                         reject bad paths (400); route lookup (404 on a miss); run the
//!                         chain's request hooks (a direct answer skips the rest, response
//!                         hooks still run); take SSE limit slots (503/429 when full);
//!                         an event-stream GET goes to the relay's own loop from here
//! request_body_filter     the chain's request_body hooks (size limits)
//! upstream_peer           choose an endpoint (a pinned session's own; 503 when none is
//!                         up); build the peer with the timeouts that fit the request
//! fail_to_connect         retry on another endpoint while `retries` allow (a pinned
//!                         request only when its endpoint refused)
//! upstream_request_filter path prefix, Host policy, X-Forwarded-*, then the chain's
//!                         upstream_request hooks                     (relay::headers)
//! response_filter         learn affinity pins; SSE response? fix its headers, start the
//!                         stream; then the chain's response hooks, which may install
//!                         body filters
//! response_body_filter    an end asked for by the admin API, at an event boundary; then
//!                         the per-chunk pipeline                     (relay::stream)
//! fail_to_proxy           502/504 (or the status a hook chose) with a one-line reason
//! logging                 metrics, the chain's logging hooks, the access log, the close
//!                         of a stream                                (relay::record)
//! ```
//!
//! A `GET` that asks for an event stream does not go through Pingora's proxy loop past
//! `request_filter`: the relay ([`crate::relay::Relay`]) connects to the origin and streams
//! the response itself, through the same header handling and per-chunk pipeline, because
//! only a loop of its own can act while the origin is silent (heartbeats, timeouts,
//! `max_lifetime`, draining). An event stream that arrives for any other request streams
//! through Pingora's loop, unbuffered and observed, and the admin API can end it at its
//! next event boundary, but the timer-driven features do not apply to it.

pub mod answer;

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::Bytes;
use http::header::ACCEPT;
use pingora_core::connectors::http::Connector;
use pingora_core::connectors::ConnectorOptions;
use pingora_core::modules::http::HttpModules;
use pingora_core::server::configuration::ServerConf;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorSource, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};

use crate::config::Config;
use crate::http_util::request_host;
use crate::listen::certs::below_min_version;
use crate::middleware::{Outcome, Reply};
use crate::relay::{self, exchange, Relay, RequestCtx};
use crate::routing::has_dot_segment;
use crate::sse;
use crate::state::State;
use crate::upstream::Attempts;
use answer::{answer, error_response, write_reply};

/// The proxy. Holds the current config; a request keeps the route (and so the service and
/// middleware chain) it matched for its whole life, whatever a reload does meanwhile.
pub struct StreamGate {
    config: Arc<ArcSwap<Config>>,
    state: Arc<State>,
    /// Connects relayed event streams to their origins.
    connector: Connector,
}

impl StreamGate {
    /// `server` is Pingora's server config: the relay's connector takes the same options
    /// as Pingora's own (its `ca_file`, the default trust for https origins, included).
    pub fn new(config: Arc<ArcSwap<Config>>, state: Arc<State>, server: &ServerConf) -> Self {
        StreamGate {
            config,
            state,
            connector: Connector::new(Some(ConnectorOptions::from_server_conf(server))),
        }
    }
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
        let config = self.config.load();
        let listener = session.server_addr().and_then(|a| a.as_inet()).copied();
        let tls = listener.and_then(|local| config.listener_tls(local));
        if let Some(min) = tls.and_then(|tls| below_min_version(session, tls)) {
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
        let port = listener.map(|a| a.port());
        let route = match config.routes.lookup(host, port, req.uri.path()) {
            Ok(route) => route.clone(),
            Err(miss) => {
                let reason = miss.reason(host, req.uri.path());
                write_reply(session, Reply::text(404, &reason)).await?;
                return Ok(true);
            }
        };
        let sse = &mut ctx.chain.sse;
        sse.settings = route.service.sse;
        sse.announced = sse.settings.enabled
            && session
                .get_header(ACCEPT)
                .is_some_and(|v| sse::accepts_event_stream(v.as_bytes()));
        ctx.route = Some(route.clone());
        ctx.upstream.attempts = Attempts::new(route.service.retries);

        for instance in route.chain.iter() {
            if let Outcome::Respond(reply) =
                instance.middleware.request(session, &mut ctx.chain).await?
            {
                answer(session, ctx, &route, reply).await?;
                return Ok(true);
            }
        }
        if ctx.chain.sse.announced {
            if let Some(reply) = relay::limits::admit(&config, &route, session, ctx) {
                answer(session, ctx, &route, reply).await?;
                return Ok(true);
            }
        }
        if exchange::relays(session, ctx) {
            let relay = Relay {
                state: &self.state,
                connector: &self.connector,
            };
            relay.run(session, ctx).await?;
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
            instance
                .middleware
                .request_body(body, end_of_stream, &mut ctx.chain)?;
        }
        Ok(())
    }

    async fn upstream_peer(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let route = ctx.route()?.clone();
        let lease = ctx.upstream.attempts.next(&route.service, session).await?;
        let sse = &ctx.chain.sse;
        let peer = route
            .service
            .peer(lease.addr, sse.announced.then_some(&sse.settings));
        ctx.upstream.lease = Some(lease);
        Ok(peer)
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        // Nothing was sent yet: another endpoint may take the request, up to `retries`.
        if let Some(lease) = ctx.upstream.lease.take() {
            let again = ctx.upstream.attempts.connect_failed(&lease, &e);
            e.set_retry(again);
        }
        e
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        relay::headers::upstream_request(session, upstream_request, ctx).await
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        relay::headers::response(session, upstream_response, ctx, &self.state.tracker).await
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<Duration>> {
        let Some(stream) = ctx.stream.as_mut() else {
            relay::stream::apply_filters(&mut ctx.body_filters, body, end_of_stream)?;
            return Ok(None);
        };
        if stream.hinted {
            return Err(Error::explain(
                ErrorType::InternalError,
                "stream ended through the admin API",
            ));
        }
        let asked = stream.entry().and_then(|e| e.end_requested());
        if let Some(reason) = asked {
            if stream.at_boundary() && !end_of_stream {
                // Between two events: tell the client when to come back, then end the
                // stream when the origin next sends something. The chunk that arrived is
                // not delivered; a client resuming with Last-Event-ID gets it again.
                *body = Some(Bytes::from_static(sse::END_HINT));
                stream.hinted = true;
                stream.close(reason);
                return Ok(None);
            }
        }
        stream.chunk(body, &mut ctx.body_filters, false, end_of_stream)
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
        let code = match error_response(e, ctx.service_name()) {
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
        let access_log = self.config.load().access_log;
        relay::record::finished(session, e, ctx, access_log);
    }
}
