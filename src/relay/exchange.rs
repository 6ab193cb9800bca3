//! An exchange: one request carried to its origin and the answer back, by streamgate's own
//! loop, for every proxied request (any method, with or without a body, HTTP/1.1 or
//! HTTP/2 from the client).
//!
//! ```text
//! request_filter ...   routing, the chain's request hooks (a hook's own request, such as
//!                      `forward_auth`'s, goes to its service as below: Relay::ask),
//!                      announced-stream limits
//! connect              an endpoint by the service's balancing (`upstream::connect`: Pingora's
//!                      pool, then a spare made ahead (`preconnect`), else a plain TCP
//!                      connect of streamgate's own, TLS through Pingora's connector); a
//!                      failed connect moves on while `retries` allow (Attempts); with
//!                      `preconnect`, spares for the next requests are made meanwhile
//! request              the client's head after the hop-by-hop rules, the service's
//!                      rewriting and the chain's upstream_request hooks; the body streamed
//!                      as it arrives, through the chain's request_body hooks (size limits);
//!                      `Expect: 100-continue` is answered here, once the request was admitted
//! response head        within header_timeout for a request that announced an event stream,
//!                      else within timeouts.read (and header_timeout when a config sets
//!                      it: `SseSettings::head_limit`), watching the client meanwhile; a
//!                      reused connection the origin had closed is replaced by a fresh one
//!                      for an idempotent bodiless request, or any request whose head did
//!                      not go out; else 502 (either way not held against the endpoint)
//! event stream?        Content-Type text/event-stream, whatever the request was: limits
//!                      taken now if the request had not announced it (503/429 when full,
//!                      the origin connection closed), then the stream's own loop
//!                      (super::events) with the whole lifecycle; once the request body
//!                      is in, over HTTP/1.1 in a task of its own (Relay::detach), over
//!                      HTTP/2 after Pingora's request, in its task (Relay::carry)
//! otherwise            the body forwarded as it comes, through the chain's body filters,
//!                      each read under timeouts.read; `101 Switching Protocols` relays
//!                      bytes both ways; the connection goes back to the pool when the
//!                      exchange ended cleanly
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt as _;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, EXPECT, TRANSFER_ENCODING};
use http::{Method, Version};
use pingora_core::protocols::http::ServerSession;
use pingora_core::protocols::Stream as L4Stream;
use pingora_core::upstreams::peer::Peer;
use pingora_error::{Error, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::Session;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::carried;
use super::client::{Client, Handback, Raw};
use super::context::RequestCtx;
use super::events;
use super::headers::{self, frame_for_client, strip_request_hop_by_hop, strip_response_hop_by_hop};
use super::origin::{Framing, OriginConn};
use super::stream::apply_filters;
use crate::config::AccessLog;
use crate::error::http_error;
use crate::http_util::remove_request_header;
use crate::middleware::Ask;
use crate::routing::Route;
use crate::sse;
use crate::sse::drain::drain_deadline;
use crate::state::State;
use crate::upstream::connect::Connector;
use crate::upstream::Attempts;

/// How long an origin that stopped reading a request body is given to show its answer.
const EARLY_ANSWER: Duration = Duration::from_millis(200);

/// The relay of one server instance: its state and the connector to origins.
pub struct Relay {
    pub state: Arc<State>,
    pub connector: Connector,
    /// Where a client connection kept alive after a stream carried in its own task goes.
    pub handback: Arc<Handback>,
}

/// An origin connection in use, and the pool key of the peer it was made for: what giving
/// it back needs (the peer itself is not kept for the life of a stream).
pub struct Link {
    pub conn: OriginConn,
    pub pool_key: u64,
}

/// An origin connection with its response head.
pub struct Opened {
    pub link: Link,
    pub head: ResponseHeader,
}

impl Relay {
    /// Carries the request to its origin and the answer back (see the module docs). `Ok`
    /// means the response was sent whole; an error before the response header means the
    /// proxy answers 502/504 (or the status in the error) with the reason, and after it the
    /// client connection is closed, so a cut response reads as cut.
    pub async fn run(
        self: &Arc<Self>,
        session: &mut Session,
        ctx: &mut RequestCtx,
        access_log: AccessLog,
    ) -> Result<()> {
        let method = session.req_header().method.clone();
        if ctx.chain.sse.announced && method == Method::GET && self.state.drain.draining() {
            return Box::pin(events::turn_away(session.as_mut(), ctx)).await;
        }
        let (request, body) = self.upstream_request(session, ctx).await?;
        let mut opened = self
            .open(&mut Client::Session(session.as_mut()), ctx, &request, body)
            .await?;
        let route = ctx.route()?.clone();
        let sse::SseSettings {
            enabled,
            resume: resumable,
            ..
        } = *ctx.chain.sse.settings();
        let is_stream = enabled
            && opened
                .head
                .headers
                .get(CONTENT_TYPE)
                .is_some_and(|v| sse::is_event_stream(v.as_bytes()));
        if is_stream && !ctx.chain.sse.announced {
            // A stream the request did not announce counts against the limits now; over one,
            // the client is refused and the origin connection closed.
            if let Some(reply) = super::limits::take(ctx, ctx.chain.client) {
                drop(opened);
                route.metrics.sse_refused();
                return Box::pin(super::reply::answer(session, ctx, &route, reply)).await;
            }
        }
        let upgraded = opened.head.status == 101;
        strip_response_hop_by_hop(&mut opened.head, upgraded);
        headers::response(
            session,
            &mut opened.head,
            is_stream,
            ctx,
            &self.state.tracker,
        )
        .await?;
        if !upgraded {
            frame_for_client(&mut opened.head, session.req_header().version)?;
        }
        let Opened { link, head } = opened;
        let bodiless = link.conn.body_done();
        let downstream = session.as_mut();
        let reconnects = request.method == Method::GET;
        // A stream leaves Pingora's request once its request body is in: over HTTP/1.1 to a
        // task of its own, where a `GET` (nothing more to read) closes its connection after
        // it (clients reopen streams on a new one) and any other keeps it for the client's
        // next request; over HTTP/2 its session goes with it, after its head, to run on in
        // the request's task (see `carried`). The answer to a `HEAD` has no body to carry:
        // Pingora's session writes its head.
        let apart = ctx.stream.is_some()
            && !upgraded
            && request.method != Method::HEAD
            && (reconnects || downstream.is_body_done());
        let resume = |request| (resumable && reconnects).then(|| Box::new(request));
        if apart && matches!(downstream, ServerSession::H1(_)) {
            let resume = resume(request);
            let stream = self.detach(session, ctx, Box::new(link), head, resume, access_log)?;
            start(stream).await;
            return Ok(());
        }
        // Over HTTP/2 only once the request body is in, a `GET`'s too.
        let carries = apart
            && matches!(downstream, ServerSession::H2(_))
            && downstream.is_body_done()
            && carried::open();
        downstream
            .write_response_header(Box::new(head))
            .await
            .map_err(|e| e.into_down())?;
        if carries {
            let resume = resume(request);
            self.carry(session, ctx, Box::new(link), resume, reconnects, access_log);
            return Ok(());
        }
        if upgraded {
            return Box::pin(self.splice(downstream, ctx, link)).await;
        }
        if ctx.stream.is_some() {
            let link = Box::new(link);
            let resume = (resumable && reconnects).then_some(&request);
            let mut client = Client::Session(downstream);
            let stream = events::relay(self, &mut client, ctx, link, resume, reconnects);
            return Box::pin(stream).await;
        }
        if bodiless {
            write_body(downstream, None, true).await?;
            self.release(link, ctx);
            return Ok(());
        }
        self.forward_body(downstream, ctx, link).await
    }

    /// Carries the event stream on `link` in a task of its own, with the client's connection
    /// taken out of Pingora's request: what a long-lived stream holds is then only its own
    /// state (the connection, the context, a small read buffer), not Pingora's session and
    /// per-request future, which end here. Done for streams over HTTP/1.1 whose request
    /// body was read. A `GET` stream (`resume` is its request, with `sse.resume`) closes its
    /// connection after it: its client reopens it on a new one, and in a drain must reach
    /// the process that takes over. Any other stream answers a request its client will not
    /// send again, on a connection the client may keep alive: after a clean end that
    /// connection goes back to the server for the next request (`client::Handback`), unless
    /// the process is draining. Streams over HTTP/2 are carried on in their request's own
    /// task instead (see [`Relay::carry`]). The response `head` is written by the stream's
    /// task, with the first body bytes if the origin sent any with its head; the caller
    /// starts it (see [`start`]).
    fn detach(
        self: &Arc<Self>,
        session: &mut Session,
        ctx: &mut RequestCtx,
        link: Box<Link>,
        head: ResponseHeader,
        resume: Option<Box<RequestHeader>>,
        access_log: AccessLog,
    ) -> Result<Apart> {
        let facts = super::client::LogFacts::of(session.req_header());
        let reconnects = facts.method == Method::GET;
        let downstream = take_session(session);
        let write_timeout = ctx.chain.sse.settings().write_timeout;
        let mut raw = Raw::take(downstream, head, write_timeout, !reconnects)?;
        let mut owned = std::mem::take(ctx);
        ctx.detached = true;
        let relay = self.clone();
        Ok(Box::pin(async move {
            let client = &mut Client::Raw(&mut raw);
            let error = relay
                .relay_apart(client, &mut owned, link, resume.as_deref(), reconnects)
                .await;
            relay.record_apart(
                &facts.request(),
                raw.sent,
                error.as_deref(),
                owned,
                access_log,
            );
            if error.is_none() {
                let handback = (!relay.state.drain.draining()).then_some(&*relay.handback);
                raw.finish(handback).await;
            }
        }))
    }

    /// Carries the event stream on `link`, whose response head is written, on after
    /// Pingora's request (see [`carried`]): the client's HTTP/2 session is taken out of the
    /// request and goes with the stream, and the stream is recorded when it ends. A
    /// stream that cannot be handed over (no slot) stays in the request.
    fn carry(
        self: &Arc<Self>,
        session: &mut Session,
        ctx: &mut RequestCtx,
        link: Box<Link>,
        resume: Option<Box<RequestHeader>>,
        reconnects: bool,
        access_log: AccessLog,
    ) {
        let mut downstream = take_session(session);
        let mut owned = std::mem::take(ctx);
        ctx.detached = true;
        let relay = self.clone();
        let stream = async move {
            let client = &mut Client::Session(&mut downstream);
            let error = relay
                .relay_apart(client, &mut owned, link, resume.as_deref(), reconnects)
                .await;
            let sent = downstream.body_bytes_sent();
            relay.record_apart(
                downstream.req_header(),
                sent,
                error.as_deref(),
                owned,
                access_log,
            );
            if error.is_none() {
                // The end is written; this only makes sure of it. After an error the
                // session is dropped unfinished: its client gets the stream reset.
                let _ = downstream.finish().await;
            }
        };
        if let Err(stream) = carried::hand(Box::pin(stream)) {
            // Not reached: `carries` checked the slot is open. Run it all the same, apart
            // from the guard of Pingora's HTTP/2 loop, and say so.
            log::error!(
                "an HTTP/2 stream could not be carried in its request's task: \
                 http2.idle_timeout does not see it"
            );
            tokio::spawn(stream);
        }
    }

    /// The loop of a stream carried apart from Pingora's request; its error, if it failed.
    async fn relay_apart(
        &self,
        client: &mut Client<'_>,
        ctx: &mut RequestCtx,
        link: Box<Link>,
        resume: Option<&RequestHeader>,
        reconnects: bool,
    ) -> Option<Box<Error>> {
        let error = events::relay(self, client, ctx, link, resume, reconnects)
            .await
            .err();
        if error.is_some() {
            // If nothing went out, the head at least: the client sees the stream cut.
            let _ = client.send_head().await;
        }
        error
    }

    /// Records a stream carried apart from Pingora's request as it ends (`error`: how it
    /// failed), `sent` body bytes to its client; its context (limits, registry entry) goes
    /// with it.
    fn record_apart(
        &self,
        request: &RequestHeader,
        sent: usize,
        error: Option<&Error>,
        mut ctx: RequestCtx,
        access_log: AccessLog,
    ) {
        if let Some(e) = error {
            super::record::log_error(&self.state.client_errors, request, &ctx, e);
        }
        super::record::finished(request, sent, error, &mut ctx, access_log);
    }

    /// The request the origin gets, and how its body is framed.
    async fn upstream_request(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<(RequestHeader, Framing)> {
        let mut request = session.req_header().clone();
        request.set_version(Version::HTTP_11);
        let upgrade = session.is_upgrade_req();
        strip_request_hop_by_hop(&mut request, upgrade);
        remove_request_header(&mut request, &EXPECT);
        let body = if session.is_body_empty() {
            remove_request_header(&mut request, &CONTENT_LENGTH);
            Framing::None
        } else {
            match declared_length(session.req_header()) {
                Some(len) => {
                    request.insert_header(CONTENT_LENGTH, len)?;
                    if len == 0 {
                        Framing::None
                    } else {
                        Framing::Length(len)
                    }
                }
                None => {
                    remove_request_header(&mut request, &CONTENT_LENGTH);
                    request.insert_header(TRANSFER_ENCODING, "chunked")?;
                    Framing::Chunked(super::origin::ChunkState::Size)
                }
            }
        };
        headers::upstream_request(session, &mut request, ctx).await?;
        Ok((request, body))
    }

    /// Connects to an endpoint (moving on to others after connect failures, as `retries`
    /// allow), sends the request and its body, and reads the response head. A reused
    /// connection that the origin had closed meanwhile (it failed before any byte of an
    /// answer) is replaced by a fresh one to the same endpoint when the request can be sent
    /// again: idempotent and without a body, or its head never went out whole. Otherwise
    /// the answer is 502. Either way that is the pool's race with the origin's keep-alive
    /// timeout, not the endpoint's failure, and its passive health is not charged.
    pub async fn open(
        &self,
        client: &mut Client<'_>,
        ctx: &mut RequestCtx,
        request: &RequestHeader,
        body: Framing,
    ) -> Result<Opened> {
        let route = ctx.route()?.clone();
        let service = &route.service;
        let announced = ctx.chain.sse.announced;
        // A stream's settings shape its origin connection (its read timeout); shared, so
        // this future, which every request carries, holds a pointer.
        let settings = announced.then(|| ctx.chain.sse.shared_settings());
        loop {
            let lease = ctx
                .upstream
                .attempts
                .next(service, request, ctx.chain.client)
                .await?;
            let peer = service.peer(lease.addr, settings.as_deref());
            // The pool first, then a spare; a new connection's future is small for a plain
            // origin, boxed for a TLS one (`Connector::connect`), so this future, which
            // every request carries, stays small.
            let pooled = self.connector.reused(&peer, service.preconnect > 0).await;
            let connected = match pooled {
                Some(stream) => Ok((stream, true)),
                None => self
                    .connector
                    .connect(&peer, service.tcp())
                    .await
                    .map(|stream| (stream, false)),
            };
            let (stream, reused) = match connected {
                Ok(connected) => connected,
                Err(e) => {
                    if ctx.upstream.attempts.connect_failed(&lease, &e) {
                        continue;
                    }
                    return Err(e.into_up());
                }
            };
            if service.preconnect > 0 {
                // Spares for the next requests, made once this one has gone out.
                self.connector
                    .preconnect(&peer, service.tcp(), service.preconnect);
            }
            ctx.upstream.lease = Some(lease);
            let mut conn = OriginConn::new(stream, reused);
            let mut sent = self
                .send_and_read_head(client, ctx, &mut conn, request, body)
                .await;
            // Sent again: an idempotent request without a body, or any request whose head
            // never went out whole (no byte of its body was read from the client yet).
            let replayable =
                !conn.head_sent || (body == Framing::None && is_idempotent(&request.method));
            if sent.as_ref().is_err_and(|e| stale_reuse(&conn, e)) && replayable {
                log::debug!(
                    "a pooled connection to {} was closed by the origin; sending again on a new one",
                    peer.address()
                );
                let stream = self
                    .connector
                    .connect(&peer, service.tcp())
                    .await
                    .map_err(|e| e.into_up())?;
                conn = OriginConn::new(stream, false);
                sent = self
                    .send_and_read_head(client, ctx, &mut conn, request, body)
                    .await;
            }
            return match sent {
                Ok(head) => Ok(Opened {
                    link: Link {
                        conn,
                        pool_key: peer.reuse_hash(),
                    },
                    head,
                }),
                // The pool's race with the origin's keep-alive timeout, not the endpoint's
                // failure: not held against it. The request may have reached the origin, so
                // it is not sent again.
                Err(e) if stale_reuse(&conn, &e) => Err(http_error(
                    502,
                    format!(
                        "service `{}`: the origin closed a reused connection before answering; \
                         the {} request had gone out and is not sent again",
                        service.name, request.method
                    ),
                )),
                Err(e) => {
                    if e.esource() == &pingora_error::ErrorSource::Upstream {
                        if let Some(lease) = &ctx.upstream.lease {
                            lease.failed();
                        }
                    }
                    Err(e)
                }
            };
        }
    }

    /// Writes the request head and body on `conn` and reads the response head in time,
    /// watching the client while it waits.
    async fn send_and_read_head(
        &self,
        client: &mut Client<'_>,
        ctx: &mut RequestCtx,
        conn: &mut OriginConn,
        request: &RequestHeader,
        body: Framing,
    ) -> Result<ResponseHeader> {
        let route = ctx.route()?.clone();
        let service = &route.service;
        let write_timeout = service.timeouts.write;
        within(
            write_timeout,
            conn.send_head(request, &ctx.chain.added, body),
            "sending the request",
        )
        .await?;
        if body != Framing::None {
            let Client::Session(session) = client else {
                return Err(Error::explain(
                    ErrorType::InternalError,
                    "a request body without the client's session",
                ));
            };
            // An HTTP/1.0 client's `Expect` is ignored, and it gets no 1xx (RFC 9110 10.1.1,
            // 15.2): it may not know one.
            let continues = {
                let request = session.req_header();
                request.version >= Version::HTTP_11
                    && request
                        .headers
                        .get(EXPECT)
                        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
            };
            if continues {
                // Pingora turns keep-alive off when it writes any response before the body
                // is read; `100 Continue` only asks for the body, so it keeps it on.
                let close_if_answered_early = |session: &mut ServerSession, close: bool| {
                    if let ServerSession::H1(v1) = session {
                        v1.set_close_on_response_before_downstream_finish(close);
                    }
                };
                close_if_answered_early(session, false);
                let sent = session.write_continue_response().await;
                close_if_answered_early(session, true);
                sent.map_err(|e| e.into_down())?;
            }
            if let Err(e) = self.send_body(session, ctx, conn, write_timeout).await {
                // An origin may answer (and stop reading) before the body is whole: then
                // its answer is what the client gets.
                if e.esource() != &pingora_error::ErrorSource::Upstream {
                    return Err(e);
                }
                let early = tokio::time::timeout(EARLY_ANSWER, conn.read_head(&request.method));
                return match early.await {
                    Ok(Ok(head)) => Ok(head),
                    _ => Err(e),
                };
            }
        }
        let limit = ctx
            .chain
            .sse
            .settings()
            .head_limit(ctx.chain.sse.announced, service.timeouts.read);
        let method = request.method.clone();
        let head = async {
            match limit {
                Some(limit) => tokio::time::timeout(limit, conn.read_head(&method))
                    .await
                    .map_err(|_| limit),
                None => Ok(conn.read_head(&method).await),
            }
        };
        let read = tokio::select! {
            read = head => read,
            gone = client.gone() => {
                let e = match gone {
                    Err(e) => e,
                    Ok(()) => Error::explain(ErrorType::ConnectionClosed, "the client sent data"),
                };
                return Err(e.into_down());
            }
        };
        match read {
            Ok(head) => head,
            Err(limit) => {
                service.metrics.timeout();
                if let Some(lease) = &ctx.upstream.lease {
                    lease.failed();
                }
                Err(http_error(
                    504,
                    format!(
                        "service `{}`: the origin sent no response header within {}",
                        service.name,
                        humantime::format_duration(limit)
                    ),
                ))
            }
        }
    }

    /// Sends the client's request body to the origin, through the chain's `request_body`
    /// hooks: up to the service's `request_buffer` bytes are gathered first, for at most
    /// `request_buffer_wait` from the first piece, so a body that ends within them goes
    /// whole, with the request head, in one write; past them (or from the first byte,
    /// with a buffer of 0) it is streamed as it arrives.
    ///
    /// An origin that answers once it has the head and closes without reading the body
    /// (an event stream that ignores its `POST`'s body) would get body bytes sent later
    /// after its close, or unread at it; its kernel then resets the connection and drops
    /// what it had not yet sent of the answer. Gathering the body keeps a short one from
    /// arriving in parts, however the client sent it (HTTP/2 DATA frames, chunks).
    async fn send_body(
        &self,
        session: &mut ServerSession,
        ctx: &mut RequestCtx,
        conn: &mut OriginConn,
        write_timeout: Option<Duration>,
    ) -> Result<()> {
        let route = ctx.route()?.clone();
        let (buffer, wait) = (
            route.service.request_buffer,
            route.service.request_buffer_wait,
        );
        // How much of the body is held with the head so far (while `gathering`), and
        // until when more of it is waited for.
        let mut gathering = buffer > 0;
        let mut held = 0;
        let mut gather_until = None;
        // What the client sent right behind a chunk, read without waiting for more.
        let mut ahead: Option<Option<Bytes>> = None;
        loop {
            let chunk = match (ahead.take(), gather_until) {
                (Some(chunk), _) => chunk,
                (None, Some(until)) => {
                    match tokio::time::timeout_at(until, session.read_request_body()).await {
                        Ok(read) => read.map_err(|e| e.into_down())?,
                        Err(_) => {
                            // The rest is slow to come: what was held goes, and the rest
                            // is streamed.
                            (gathering, gather_until) = (false, None);
                            let sent = conn.send_held();
                            within(write_timeout, sent, "sending the request body").await?;
                            continue;
                        }
                    }
                }
                (None, None) => session
                    .read_request_body()
                    .await
                    .map_err(|e| e.into_down())?,
            };
            let end = chunk.is_none();
            for instance in route.chain.iter() {
                instance
                    .middleware
                    .request_body(&chunk, end, &mut ctx.chain)?;
            }
            let Some(data) = chunk else {
                // Sends what is held, checking a body with a length was whole.
                let sent = conn.finish_body();
                return within(write_timeout, sent, "sending the request body").await;
            };
            // A body's end that came with its last data goes in the same write (see above).
            if let Some(next) = session.read_request_body().now_or_never() {
                ahead = Some(next.map_err(|e| e.into_down())?);
            }
            let last = matches!(ahead, Some(None));
            if gathering
                && !last
                && held + data.len() <= buffer
                && gather_until.is_none_or(|until| tokio::time::Instant::now() < until)
            {
                conn.hold_body(&data)?;
                held += data.len();
                gather_until.get_or_insert_with(|| tokio::time::Instant::now() + wait);
                continue;
            }
            // The end, or past the buffer or the wait: this piece goes with what is held,
            // and the rest is streamed.
            (gathering, gather_until) = (false, None);
            within(
                write_timeout,
                conn.send_body(&data, last),
                "sending the request body",
            )
            .await?;
        }
    }

    /// Forwards a response that is not an event stream, as it comes.
    async fn forward_body(
        &self,
        session: &mut ServerSession,
        ctx: &mut RequestCtx,
        mut link: Link,
    ) -> Result<()> {
        let read_timeout = ctx.route()?.service.timeouts.read;
        loop {
            let mut body = within(
                read_timeout,
                link.conn.read_body(),
                "reading the response body",
            )
            .await?;
            let end = body.is_none() || link.conn.body_done();
            apply_filters(&mut ctx.body_filters, &mut body, end)?;
            if end {
                // The origin's answer is whole: its connection goes back to the pool before
                // the client has the last bytes, so the client's next request can take it.
                self.release(link, ctx);
                return write_body(session, body, true).await;
            }
            write_body(session, body, false).await?;
        }
    }

    /// `101 Switching Protocols`: bytes both ways as they are, until either side closes or
    /// both are silent for `timeouts.read`, or, once the process drains, at a random moment
    /// within the drain period (its client reconnects, to the new process after an upgrade,
    /// as a drained GET stream's does).
    async fn splice(
        &self,
        session: &mut ServerSession,
        ctx: &mut RequestCtx,
        link: Link,
    ) -> Result<()> {
        let idle = ctx.route()?.service.timeouts.read;
        let (mut origin, early) = link.conn.into_raw();
        if !early.is_empty() {
            write_body(session, Some(early.freeze()), false).await?;
        }
        let drain = self.state.drain.clone();
        let period = ctx.chain.sse.settings().drain_period;
        let drained = async move {
            let at = drain_deadline(drain.started().await, period);
            tokio::time::sleep_until(at.into()).await;
        };
        tokio::pin!(drained);
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let step = async {
                tokio::select! {
                    from_client = session.read_request_body() => {
                        match from_client.map_err(|e| e.into_down())? {
                            Some(data) => {
                                origin.write_all(&data).await.map_err(|e| {
                                    Error::because(ErrorType::WriteError, "writing to the origin", e).into_up()
                                })?;
                                origin.flush().await.map_err(|e| {
                                    Error::because(ErrorType::WriteError, "writing to the origin", e).into_up()
                                })?;
                                Ok::<bool, Box<Error>>(true)
                            }
                            None => Ok(false),
                        }
                    }
                    from_origin = origin.read(&mut buf) => {
                        let n = from_origin.map_err(|e| {
                            Error::because(ErrorType::ReadError, "reading from the origin", e).into_up()
                        })?;
                        if n == 0 {
                            return Ok(false);
                        }
                        write_body(session, Some(Bytes::copy_from_slice(&buf[..n])), false).await?;
                        Ok(true)
                    }
                }
            };
            let open = tokio::select! {
                open = within(idle, step, "an upgraded connection was idle") => open?,
                () = &mut drained => {
                    log::debug!("an upgraded connection ends: the process drains");
                    false
                }
            };
            if !open {
                let _ = session.write_response_body(Bytes::new(), true).await;
                shutdown(&mut origin).await;
                return Ok(());
            }
        }
    }

    /// Sends a middleware's request ([`Ask`]: a head alone) to its service and reads the
    /// answer, as a request routed to that service would go (its endpoints, retries,
    /// passive health, pool, TLS and timeouts; the client watched while the head is awaited,
    /// unless its request body is still to come) under the middleware's own route, all of
    /// it within the ask's `timeout`. The answer's `Connection`-named headers are taken out;
    /// its body is read whole up to [`ASK_BODY_LIMIT`]: past that, a 2xx answer's is left
    /// unread (its connection is closed) and any other is a 502. An informational answer
    /// (`101`) is a 502 too.
    pub async fn ask(
        &self,
        session: &mut Session,
        client: Option<std::net::IpAddr>,
        ask: Ask,
    ) -> Result<(ResponseHeader, Bytes)> {
        let Ask {
            service,
            request,
            timeout,
            route,
            metrics,
        } = ask;
        let name = service.name.clone();
        let mut ctx = RequestCtx::default();
        ctx.chain.client = client;
        ctx.upstream.attempts = Attempts::new(service.retries);
        ctx.route = Some(Arc::new(Route {
            name: route,
            service,
            chain: Arc::new([]),
            metrics,
        }));
        let exchange = self.ask_within(session, &mut ctx, &request);
        match timeout {
            None => exchange.await,
            Some(limit) => tokio::time::timeout(limit, exchange)
                .await
                .unwrap_or_else(|_| {
                    Err(http_error(
                        504,
                        format!(
                            "service `{name}`: no whole answer within {}",
                            humantime::format_duration(limit)
                        ),
                    ))
                }),
        }
    }

    async fn ask_within(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        request: &RequestHeader,
    ) -> Result<(ResponseHeader, Bytes)> {
        let service = ctx.route()?.service.clone();
        let mut client = Client::Session(session.as_mut());
        let Opened { mut link, mut head } =
            self.open(&mut client, ctx, request, Framing::None).await?;
        if let Some(lease) = &ctx.upstream.lease {
            lease.succeeded();
        }
        if head.status.is_informational() {
            return Err(http_error(
                502,
                format!(
                    "service `{}`: an informational answer ({}) where a final one belongs",
                    service.name,
                    head.status.as_u16()
                ),
            ));
        }
        strip_response_hop_by_hop(&mut head, false);
        let mut body = BytesMut::new();
        while !link.conn.body_done() {
            let read = link.conn.read_body();
            let what = "reading the answer's body";
            let Some(chunk) = within(service.timeouts.read, read, what).await? else {
                break;
            };
            if body.len() + chunk.len() > ASK_BODY_LIMIT {
                if head.status.is_success() {
                    return Ok((head, Bytes::new()));
                }
                return Err(http_error(
                    502,
                    format!(
                        "service `{}`: an answer with a body over {} KiB",
                        service.name,
                        ASK_BODY_LIMIT >> 10
                    ),
                ));
            }
            body.extend_from_slice(&chunk);
        }
        self.release(link, ctx);
        Ok((head, body.freeze()))
    }

    /// Gives the connection back to the pool when the exchange ended cleanly.
    pub fn release(&self, link: Link, ctx: &RequestCtx) {
        let idle = ctx.route.as_ref().and_then(|r| r.service.timeouts.idle);
        if let Some(stream) = link.conn.into_reusable() {
            self.connector.release(stream, link.pool_key, idle);
        }
    }
}

/// The most of an answer's body a middleware's request ([`Relay::ask`]) reads.
pub const ASK_BODY_LIMIT: usize = 64 << 10;

/// A future to be started (see [`start`]): a stream carried apart, a new connection.
pub type Apart = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Starts `stream`: its first turn runs now, in the caller's task, and the rest in a task
/// of its own. For an event stream carried apart (the caller is its request) the response
/// head, and the event the origin sent with it, go out at once rather than when the new
/// task's turn comes, behind every task ready before it and the end of Pingora's request
/// (15-18 µs later on average while 9,000 streams open); for a new connection (the caller
/// is the accept loop, `server::accept`) its request is read and sent on at once. A
/// future may be polled from one task and then another: each turn registers the waker it
/// is given.
pub async fn start(mut stream: Apart) {
    let first = std::future::poll_fn(|cx| Poll::Ready(stream.as_mut().poll(cx))).await;
    if first.is_pending() {
        tokio::spawn(stream);
    }
}

/// Takes the client's session out of Pingora's request, for a stream carried apart; what
/// Pingora finishes after the request instead has nothing to keep alive.
fn take_session(session: &mut Session) -> Box<ServerSession> {
    let mut placeholder = ServerSession::new_http1(Box::new(std::io::Cursor::new(Vec::new())));
    placeholder.set_keepalive(None);
    std::mem::replace(&mut session.downstream_session, Box::new(placeholder))
}

/// Runs `fut` under `limit` (none: no limit); running out is a timeout of `what`.
pub async fn within<T>(
    limit: Option<Duration>,
    fut: impl std::future::Future<Output = Result<T>>,
    what: &str,
) -> Result<T> {
    match limit {
        None => fut.await,
        Some(limit) => match tokio::time::timeout(limit, fut).await {
            Ok(done) => done,
            Err(_) => Err(Error::explain(
                ErrorType::ReadTimedout,
                format!("{what}: nothing for {}", humantime::format_duration(limit)),
            )
            .into_up()),
        },
    }
}

/// Writes to the client; a failure is the client's (gone, or too slow for write_timeout).
pub async fn write_body(session: &mut ServerSession, body: Option<Bytes>, end: bool) -> Result<()> {
    if body.is_none() && !end {
        return Ok(());
    }
    session
        .write_response_body(body.unwrap_or_default(), end)
        .await
        .map_err(|e| e.into_down())
}

async fn shutdown(stream: &mut L4Stream) {
    let _ = stream.shutdown().await;
}

/// The request body length the client declared, when it declared one it can be held to.
fn declared_length(req: &RequestHeader) -> Option<u64> {
    if req.headers.contains_key(TRANSFER_ENCODING) {
        return None;
    }
    let mut found = None;
    for value in req.headers.get_all(CONTENT_LENGTH) {
        for part in value.as_bytes().split(|b| *b == b',') {
            let len = std::str::from_utf8(part.trim_ascii())
                .ok()?
                .parse::<u64>()
                .ok()?;
            if found.is_some_and(|f| f != len) {
                return None;
            }
            found = Some(len);
        }
    }
    found
}

/// Methods a request may be sent again with, having had no effect the first time.
fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// Whether `e` on `conn` is what a pooled connection that the origin had closed looks
/// like: a reused connection that failed before any byte of an answer.
fn stale_reuse(conn: &OriginConn, e: &Error) -> bool {
    conn.reused
        && !conn.answered
        && matches!(
            e.etype(),
            ErrorType::ConnectionClosed | ErrorType::ReadError | ErrorType::WriteError
        )
        && e.esource() != &pingora_error::ErrorSource::Downstream
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// A stream's first turn runs before `start` returns, in the caller's task; what is
    /// left runs on in a task of its own, woken as any task is.
    #[tokio::test]
    async fn a_stream_takes_its_first_turn_at_once_and_the_rest_in_a_task() {
        let turns = Arc::new(AtomicUsize::new(0));
        let (go, wait) = tokio::sync::oneshot::channel::<()>();
        let (done, finished) = tokio::sync::oneshot::channel::<()>();
        let counted = turns.clone();
        start(Box::pin(async move {
            counted.fetch_add(1, Ordering::SeqCst);
            let _ = wait.await;
            counted.fetch_add(1, Ordering::SeqCst);
            let _ = done.send(());
        }))
        .await;
        assert_eq!(
            turns.load(Ordering::SeqCst),
            1,
            "the first turn ran at once"
        );
        go.send(()).expect("the stream waits");
        finished.await.expect("the rest ran in its task");
        assert_eq!(turns.load(Ordering::SeqCst), 2);

        // A stream that ends in its first turn leaves no task behind.
        let ended = Arc::new(AtomicUsize::new(0));
        let counted = ended.clone();
        start(Box::pin(async move {
            counted.fetch_add(1, Ordering::SeqCst);
        }))
        .await;
        assert_eq!(ended.load(Ordering::SeqCst), 1);
    }
}
