//! The one `impl ProxyHttp`: each hook dispatches to routing, the middleware chain and the
//! relay; [`answer`] turns errors into the status and reason the client gets.
//!
//! A request's path through the hooks:
//!
//! ```text
//! early_request_filter  the listener's idle_timeout: the wait for the connection's next
//!                  request
//! request_filter   TLS older than the listener's min_version (403); the head checked and
//!                  brought to one form (relay::inbound: one spelling of the path,
//!                  origin-form, Host; 400/431); route lookup on that path (404 on a
//!                  miss); the client address (through trusted proxies); the chain's
//!                  request hooks (a direct answer skips the rest, response hooks still
//!                  run); an announced event stream takes its limit slots (503/429 when
//!                  full); then the relay carries the request to its origin and the
//!                  answer back (relay::exchange), whatever the request: a pinned session
//!                  goes to its own endpoint, responses teach new pins (upstream::affinity)
//! fail_to_proxy    an error before the response began: 502/504 (or the status in the
//!                  error) with a one-line reason
//! logging          metrics, the chain's logging hooks, the access log, the close of a
//!                  stream (relay::record)
//! ```
//!
//! Every proxied request is carried by streamgate's own loop rather than Pingora's proxy
//! loop, so an event stream gets its whole lifecycle (heartbeats, timeouts, limits,
//! lifetime, drain) whatever request it answers: Pingora's loop calls the proxy only when
//! the origin sends something, and an event stream has to act while its origin is silent.
//! Pingora still accepts and parses requests, runs TLS and HTTP/2, pools origin
//! connections and makes TLS ones (`upstream::connect`), and serves keep-alive connections.

pub mod answer;

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use http::header::ACCEPT;
use pingora_core::modules::http::HttpModules;
use pingora_core::server::configuration::ServerConf;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorSource, ErrorType, Result};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};

use crate::config::Config;
use crate::http_util::{answer_written, request_host, session_client};
use crate::listen::admission;
use crate::listen::certs::below_min_version;
use crate::middleware::{Ask, Instance, Outcome, Reply};
use crate::relay::client::Handback;
use crate::relay::reply::{answer, write_reply};
use crate::relay::{self, Relay, RequestCtx};
use crate::sse;
use crate::state::State;
use crate::upstream::connect::Connector;
use crate::upstream::Attempts;
use answer::error_response;

/// The proxy. Holds the current config; a request keeps the route (and so the service and
/// middleware chain) it matched for its whole life, whatever a reload does meanwhile.
pub struct StreamGate {
    config: Arc<ArcSwap<Config>>,
    state: Arc<State>,
    /// Carries requests to their origins (and holds the connector and its pool).
    relay: Arc<Relay>,
}

impl StreamGate {
    /// `server` is Pingora's server config: the connector takes the same options as
    /// Pingora's own (its `ca_file`, the default trust for https origins, and the pool size
    /// included).
    /// `handback` is where client connections kept alive after a stream carried in a task of
    /// its own go; the service's admission connects it to the app.
    pub fn new(
        config: Arc<ArcSwap<Config>>,
        state: Arc<State>,
        server: &ServerConf,
        handback: Arc<Handback>,
    ) -> Self {
        StreamGate {
            relay: Arc::new(Relay {
                state: state.clone(),
                connector: Connector::new(server),
                handback,
            }),
            config,
            state,
        }
    }

    /// Sends the request a middleware asked for ([`Outcome::Ask`]) and hands it the
    /// answer ([`crate::middleware::Middleware::answered`]), counting the exchange under
    /// the middleware's route. A failure answers the client with its status and a reason
    /// naming the middleware and its service (not the request's own).
    async fn ask(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        instance: &Instance,
        ask: Ask,
    ) -> Result<Outcome> {
        let metrics = ask.metrics.clone();
        let service = ask.service.name.clone();
        let started = Instant::now();
        let asked = self.relay.ask(session, ctx.chain.client, ask).await;
        let (answer, body) = match asked {
            Ok(answered) => answered,
            // The client's own failure (gone, reset) is not the service's.
            Err(e) if e.esource() == &ErrorSource::Downstream => return Err(e),
            Err(e) => {
                let Some((status, reason)) = error_response(&e, Some(&service)) else {
                    return Err(e);
                };
                metrics.request(status, started.elapsed());
                let reason = format!("middleware `{}`: {reason}", instance.name);
                return Err(crate::error::http_error(status, reason));
            }
        };
        metrics.request(answer.status.as_u16(), started.elapsed());
        instance
            .middleware
            .answered(&answer, &body, session, &mut ctx.chain)
    }
}

#[async_trait]
impl ProxyHttp for StreamGate {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            in_flight: Some(self.state.in_flight.enter()),
            ..RequestCtx::default()
        }
    }

    /// No downstream modules: Pingora's compression module holds event streams until their
    /// end, and nothing else is wanted.
    fn init_downstream_modules(&self, _modules: &mut HttpModules) {}

    /// The listener's `idle_timeout` becomes the wait for this connection's next request
    /// (its first one was waited for at admission, `server::admission`). Left alone when
    /// Pingora already turned keep-alive off (the process is shutting down).
    async fn early_request_filter(
        &self,
        session: &mut Session,
        _ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some(admitted) = session
            .as_downstream()
            .stream()
            .and_then(admission::admitted)
        {
            admitted.head_read();
        }
        if session.get_keepalive().is_none() {
            return Ok(());
        }
        let config = self.config.load();
        let local = session.server_addr().and_then(|a| a.as_inet()).copied();
        if let Some(listener) = local.and_then(|local| config.listener(local)) {
            // Pingora counts the wait in whole seconds; 0 means no limit.
            let wait = listener.idle_timeout.map_or(0, |d| d.as_secs().max(1));
            session.set_keepalive(Some(wait));
        }
        Ok(())
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let config = self.config.load_full();
        let listener = session.server_addr().and_then(|a| a.as_inet()).copied();
        let tls = listener.and_then(|local| config.listener_tls(local));
        if let Some(min) = tls.and_then(|tls| below_min_version(session, tls)) {
            let reply = Reply::text(403, &format!("this listener requires TLS {min} or newer"));
            Box::pin(write_reply(session, reply)).await?;
            return Ok(true);
        }
        // Requests that arrive together on one HTTP/1.1 connection are answered in turn.
        session.as_mut().set_pipelining_enabled(true);
        if let Err(refusal) = relay::inbound::canonicalize(session.req_header_mut()) {
            let reply = Reply::text(refusal.status(), refusal.reason());
            Box::pin(write_reply(session, reply)).await?;
            return Ok(true);
        }
        let req = session.req_header();
        let host = request_host(req);
        let port = listener.map(|a| a.port());
        let route = match config.routes.lookup(host, port, req.uri.path()) {
            Ok(route) => route.clone(),
            Err(miss) => {
                let reason = miss.reason(host, req.uri.path());
                Box::pin(write_reply(session, Reply::text(404, &reason))).await?;
                return Ok(true);
            }
        };
        ctx.chain.client = session_client(session, &config.trusted_proxies);
        let sse = &mut ctx.chain.sse;
        sse.set_settings(route.service.sse.clone());
        sse.announced = sse.settings().enabled
            && session
                .get_header(ACCEPT)
                .is_some_and(|v| sse::accepts_event_stream(v.as_bytes()));
        ctx.route = Some(route.clone());
        ctx.upstream.attempts = Attempts::new(route.service.retries);
        relay::limits::collect(&config, &route, ctx);

        for instance in route.chain.iter() {
            let mut outcome = instance.middleware.request(session, &mut ctx.chain)?;
            if let Outcome::Ask(ask) = outcome {
                outcome = Box::pin(self.ask(session, ctx, instance, *ask)).await?;
            }
            match outcome {
                Outcome::Continue => {}
                Outcome::Respond(reply) => {
                    Box::pin(answer(session, ctx, &route, reply)).await?;
                    return Ok(true);
                }
                Outcome::Ask(_) => {
                    return Err(Error::explain(
                        ErrorType::InternalError,
                        format!("middleware `{}` asked twice", instance.name),
                    ))
                }
            }
        }
        if ctx.chain.sse.announced {
            if let Some(reply) = relay::limits::take(ctx, ctx.chain.client) {
                Box::pin(answer(session, ctx, &route, reply)).await?;
                return Ok(true);
            }
        }
        self.relay.run(session, ctx, config.access_log).await?;
        Ok(true)
    }

    /// Never called: `request_filter` hands every request to the relay. Answers 500 rather
    /// than panic if Pingora ever asks.
    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        Err(Error::explain(
            ErrorType::InternalError,
            "every request is carried by the relay",
        ))
    }

    /// Pingora's error log line for a request: method, target (credentials in the query
    /// redacted, as in the access log), host, request id.
    fn request_summary(&self, session: &Session, ctx: &RequestCtx) -> String {
        relay::record::summary(session.req_header(), ctx)
    }

    /// Ordinary ends and clients' mistakes are logged here, at debug and (throttled) info
    /// level; Pingora's error line is for the proxy's own failures.
    fn suppress_error_log(&self, session: &Session, ctx: &RequestCtx, error: &Error) -> bool {
        relay::record::log_unless_failure(&self.state.client_errors, ctx, error, || {
            self.request_summary(session, ctx)
        })
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let code = match error_response(e, ctx.service_name()) {
            // After a `100 Continue` too: the error still gets its answer.
            Some((code, reason)) if answer_written(session).is_none() => {
                match write_reply(session, Reply::text(code, &reason)).await {
                    // Not when reading the client is what failed.
                    Ok(()) if e.esource() != &ErrorSource::Downstream => linger(session).await,
                    Ok(()) => {}
                    Err(write_error) => {
                        log::debug!("could not send the {code} response: {write_error}");
                    }
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
        relay::record::finished_session(session, e, ctx, access_log);
    }
}

/// How long a connection whose request was refused while its body was still arriving
/// goes on reading (and discarding) that body before it is closed.
const LINGER: Duration = Duration::from_secs(5);

/// Reads what is left of the request body, for at most [`LINGER`], once an answer has been
/// written before the body ended (a `413` once a streamed body passes `request_size_limit`,
/// an origin failing during an upload). Closing a connection with unread bytes makes the
/// kernel reset it, and a reset may discard the answer before the client reads it; read to
/// the body's end, the close is an orderly one. Nothing is kept. Not over HTTP/2, where
/// the stream is reset, not the connection.
async fn linger(session: &mut Session) {
    let http = session.as_mut();
    if http.is_http2() || http.is_body_done() {
        return;
    }
    match tokio::time::timeout(LINGER, http.drain_request_body()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => log::debug!("the rest of a refused request body: {e}"),
        Err(_) => log::debug!("the rest of a refused request body took longer than {LINGER:?}"),
    }
}
