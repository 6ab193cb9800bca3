//! Event streams relayed by streamgate's own loop.
//!
//! Pingora's proxy loop calls the proxy only when the origin sends something. An event
//! stream also has to act while its origin is silent: send heartbeats, cut a stream whose
//! origin stopped talking (`read_timeout`), end it at `max_lifetime`, when the admin API or
//! the cleanup task asks, or when the process drains for a shutdown or an upgrade. So a
//! request that asks for an event stream (`GET` with `Accept: text/event-stream`) is relayed
//! here, from `request_filter`, through the same header handling and per-chunk pipeline
//! Pingora's loop gets ([`super::headers`], [`super::stream`]):
//!
//! ```text
//! connect       the service's address, Pingora's connector and peer options
//! request       Pingora's hop-by-hop rules, then upstream_request_filter (rewrite, chain)
//! header        read under header_timeout (504 when it runs out), then response_filter
//!               (SSE header rules, stream record, chain); written at once
//! body          not an event stream: forwarded chunk by chunk until it ends
//!               event stream: one select! over
//!                 origin chunk  -> observed, body filters, written and flushed
//!                 client gone   -> upstream dropped at once            (client_closed)
//!                 read_timeout  -> origin silent too long              (idle_timeout)
//!                 heartbeat     -> `:` comment, only between events
//!                 max_lifetime / drain / admin / cleanup
//!                               -> end at the next event boundary with a `retry:` hint
//! ```
//!
//! An origin that fails mid-stream leaves the client stream cut (an HTTP/1.1 client sees no
//! last chunk), or with `on_upstream_error: event`, when it failed between two events, ends
//! it cleanly after an `event: error` carrying a JSON reason. A half-sent event is never
//! completed by the proxy: a client drops it, as the SSE specification says.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header;
use http::{Method, Version};
use pingora_core::connectors::http::Connector;
use pingora_core::protocols::http::client::HttpSession as OriginSession;
use pingora_error::{Error, ErrorType, Result};
use pingora_http::ResponseHeader;
use pingora_proxy::Session;
use tokio::time::{sleep_until, Instant as Deadline};

use super::context::RequestCtx;
use super::headers::{self, frame_for_client, strip_request_hop_by_hop, strip_response_hop_by_hop};
use super::resume::{drop_repeated, remember_ids, RecentIds, MAX_HELD_EVENT};
use super::stream::filter_own;
use crate::error::http_error;
use crate::sse::drain::drain_deadline;
use crate::sse::{self, CloseReason, OnUpstreamError};
use crate::state::State;
use crate::upstream::{Attempts, Lease};

/// A deliberate end: why (for the close log) and the `retry:` hint the client gets last.
#[derive(Debug, Clone, Copy)]
struct Ending {
    reason: CloseReason,
    hint: &'static [u8],
}

impl Ending {
    const LIFETIME: Ending = Ending {
        reason: CloseReason::MaxLifetime,
        hint: sse::END_HINT,
    };
    const DRAIN: Ending = Ending {
        reason: CloseReason::Drain,
        hint: sse::DRAIN_HINT,
    };
}

/// The relay of one server instance: its state and the connector to origins.
pub struct Relay<'a> {
    pub state: &'a State,
    pub connector: &'a Connector,
}

/// Whether `request_filter` hands this request to the relay: a bodiless `GET` that asks for
/// an event stream.
pub fn relays(session: &mut Session, ctx: &RequestCtx) -> bool {
    ctx.chain.sse.announced && session.req_header().method == Method::GET && session.is_body_empty()
}

impl Relay<'_> {
    /// Relays an event-stream request (see the module docs). `Ok` means the response was
    /// sent whole; an error before the response header means Pingora's error path answers
    /// 502/504 with the reason, and after it the client connection is closed (so the
    /// client can tell a cut stream from a finished one).
    pub async fn run(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<()> {
        if self.state.drain.draining() {
            return turn_away(session, ctx).await;
        }
        let route = ctx.route()?.clone();
        let service = &route.service;
        let attempts = Attempts::new(service.retries);
        let (mut origin, lease, attempts) = self.open_origin(session, ctx, attempts, None).await?;
        ctx.upstream.attempts = attempts;
        ctx.upstream.lease = Some(lease);
        let mut header = origin
            .response_header()
            .cloned()
            .ok_or_else(|| Error::explain(ErrorType::InvalidHTTPHeader, "no response header"))
            .map_err(|e| e.into_up())?;
        strip_response_hop_by_hop(&mut header);
        headers::response(session, &mut header, ctx, &self.state.tracker).await?;
        frame_for_client(&mut header, session.req_header().version)?;
        session
            .write_response_header(Box::new(header), false)
            .await
            .map_err(|e| e.into_down())?;

        if ctx.stream.is_none() {
            origin.set_read_timeout(service.timeouts.read);
            return self.forward_body(session, &mut origin, ctx).await;
        }
        self.stream_events(session, origin, ctx).await
    }

    /// Connects to an endpoint `attempts` has not tried (then to others, as its retries
    /// allow, after connect failures), sends the client's request (with `last_event_id`
    /// when resuming) and reads the response header under `header_timeout`. Returns the
    /// origin session, its lease, and the attempts.
    async fn open_origin(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        mut attempts: Attempts,
        last_event_id: Option<&[u8]>,
    ) -> Result<(OriginSession, Lease, Attempts)> {
        let route = ctx.route()?.clone();
        let service = &route.service;
        let (mut origin, lease) = loop {
            let lease = attempts.next(service, session).await?;
            let peer = service.peer(lease.addr, Some(&ctx.chain.sse.settings));
            match self.connector.get_http_session(&*peer).await {
                Ok((origin, _reused)) => break (origin, lease),
                Err(e) => {
                    if !attempts.connect_failed(&lease, &e) {
                        return Err(e.into_up());
                    }
                }
            }
        };

        let mut request = session.req_header().clone();
        request.set_version(Version::HTTP_11);
        strip_request_hop_by_hop(&mut request);
        headers::upstream_request(session, &mut request, ctx).await?;
        if let Some(id) = last_event_id {
            request.insert_header("last-event-id", id)?;
        }
        origin
            .write_request_header(Box::new(request))
            .await
            .map_err(|e| e.into_up())?;
        origin
            .finish_request_body()
            .await
            .map_err(|e| e.into_up())?;

        origin.set_read_timeout(None);
        // The final response header (1xx answers such as 103 Early Hints are skipped), under
        // header_timeout, while watching the client: one that leaves stops the wait.
        let header = async {
            loop {
                origin.read_response_header().await?;
                let informational = origin.response_header().is_some_and(|h| {
                    let status = h.status.as_u16();
                    (100..200).contains(&status) && status != 101
                });
                if !informational {
                    return Ok::<(), Box<Error>>(());
                }
            }
        };
        let timed = async {
            match ctx.chain.sse.settings.header_timeout {
                Some(limit) => tokio::time::timeout(limit, header).await.map_err(|_| limit),
                None => Ok(header.await),
            }
        };
        let read = tokio::select! {
            read = timed => read,
            gone = session.as_mut().read_body_or_idle(true) => {
                let e = match gone {
                    Err(e) => e,
                    Ok(_) => Error::explain(ErrorType::ConnectionClosed, "the client sent data"),
                };
                return Err(e.into_down());
            }
        };
        let read = match read {
            Ok(read) => read,
            Err(limit) => {
                service.metrics.timeout();
                lease.failed();
                return Err(http_error(
                    504,
                    format!(
                        "service `{}`: the origin sent no response header within {}",
                        service.name,
                        humantime::format_duration(limit)
                    ),
                ));
            }
        };
        if let Err(e) = read {
            lease.failed();
            return Err(e.into_up());
        }
        Ok((origin, lease, attempts))
    }

    /// After the origin of a `resume` stream failed: opens the stream again from another
    /// endpoint (the same one when it is the only one up), asking for the events after the
    /// last one the client received. `None` when that is not possible.
    async fn resume(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        failed: Option<SocketAddr>,
    ) -> Option<OriginSession> {
        let last_id = ctx
            .stream
            .as_ref()
            .map(|s| s.last_id().to_vec())
            .filter(|id| !id.is_empty());
        let avoid = failed.map_or_else(|| Attempts::new(0), Attempts::avoiding);
        let mut opened = self
            .open_origin(session, ctx, avoid, last_id.as_deref())
            .await;
        if opened.is_err() && failed.is_some() {
            opened = self
                .open_origin(session, ctx, Attempts::new(0), last_id.as_deref())
                .await;
        }
        let (origin, lease, attempts) = match opened {
            Ok(opened) => opened,
            Err(e) => {
                log::info!("resume failed: {e}");
                return None;
            }
        };
        if origin.response_header().is_some_and(|h| h.status == 204) {
            // In SSE, 204 means: do not reconnect. The stream ends cleanly.
            log::info!("resume: the origin answered 204, the stream is over");
            close(ctx, CloseReason::OriginClosed);
            return None;
        }
        let streams = origin.response_header().is_some_and(|h| {
            h.status == 200
                && h.headers
                    .get(http::header::CONTENT_TYPE)
                    .is_some_and(|v| sse::is_event_stream(v.as_bytes()))
        });
        if !streams {
            lease.failed();
            log::info!("resume failed: the origin did not answer with an event stream");
            return None;
        }
        lease.succeeded();
        if let Some(entry) = ctx.stream.as_ref().and_then(|s| s.entry()) {
            entry.set_upstream(lease.addr);
        }
        ctx.upstream.attempts = attempts;
        ctx.upstream.lease = Some(lease);
        Some(origin)
    }

    /// Forwards a response that is not an event stream, as it comes.
    async fn forward_body(
        &self,
        session: &mut Session,
        origin: &mut OriginSession,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        loop {
            let mut body = origin.read_response_body().await.map_err(|e| e.into_up())?;
            let end = body.is_none();
            super::stream::apply_filters(&mut ctx.body_filters, &mut body, end)?;
            write_body(session, body, end).await?;
            if end {
                return Ok(());
            }
        }
    }

    /// The event-stream loop (see the module docs).
    async fn stream_events(
        &self,
        session: &mut Session,
        mut origin: OriginSession,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let settings = ctx.chain.sse.settings;
        // With `resume`, only whole events go to the client (the rest waits in `tail`), so a
        // stream continued from another origin never shows half an event; ids recently sent
        // are remembered so an origin that repeats them is not believed twice.
        let mut tail = bytes::BytesMut::new();
        let mut recent_ids = RecentIds::default();
        let mut resumes: std::collections::VecDeque<Instant> = Default::default();
        let mut resumed = false;
        let started = Instant::now();
        let lifetime_end = settings.max_lifetime.and_then(|d| started.checked_add(d));
        let mut drain = self.state.drain.signal();
        let mut drain_end = drain
            .borrow_and_update()
            .map(|t| drain_deadline(t, settings.drain_period));
        let entry = ctx.stream.as_ref().and_then(|s| s.entry()).cloned();
        let mut watch_client = true;
        // The last bytes from the origin (read timeout) and to the client (heartbeats).
        let mut last_origin = started;
        let mut last_sent = started;
        let mut ending: Option<Ending> = None;
        loop {
            let at_boundary = ctx.stream.as_ref().is_some_and(|s| s.at_boundary());
            if let Some(end) = ending.filter(|_| at_boundary) {
                return end_stream(session, ctx, end).await;
            }
            let timed_end = [
                lifetime_end.map(|t| (t, Ending::LIFETIME)),
                drain_end.map(|t| (t, Ending::DRAIN)),
            ]
            .into_iter()
            .flatten()
            .min_by_key(|(t, _)| *t);
            let silent_limit = settings
                .read_timeout
                .and_then(|t| last_origin.checked_add(t));
            let heartbeat_at = settings
                .heartbeat_interval
                .and_then(|i| last_sent.checked_add(i));
            // Set when the origin failed or went silent: resume, or end.
            let mut failed: Option<Box<Error>> = None;

            tokio::select! {
                read = origin.read_response_body() => match read {
                    Ok(Some(chunk)) if settings.resume => {
                        last_origin = Instant::now();
                        tail.extend_from_slice(&chunk);
                        if tail.len() > MAX_HELD_EVENT {
                            // Not an event stream one can hold events of: no resume either.
                            close(ctx, CloseReason::OriginError);
                            return Err(Error::explain(
                                ErrorType::InvalidHTTPHeader,
                                format!("an event longer than {MAX_HELD_EVENT} bytes"),
                            )
                            .into_up());
                        }
                        let whole = sse::last_event_end(&tail).unwrap_or(0);
                        let events = tail.split_to(whole).freeze();
                        let events = if resumed {
                            drop_repeated(events, &recent_ids)
                        } else {
                            events
                        };
                        remember_ids(&events, &mut recent_ids);
                        if !events.is_empty() {
                            last_sent = last_origin;
                            relay_chunk(session, ctx, events, ending.is_some()).await?;
                        }
                    }
                    Ok(Some(chunk)) => {
                        last_origin = Instant::now();
                        last_sent = last_origin;
                        relay_chunk(session, ctx, chunk, ending.is_some()).await?;
                    }
                    Ok(None) => {
                        close(ctx, CloseReason::OriginClosed);
                        return send_own(session, ctx, Bytes::new(), true).await;
                    }
                    Err(e) => failed = Some(e.into_up()),
                },
                gone = session.as_mut().read_body_or_idle(true), if watch_client => match gone {
                    // Bytes where none belong (Pingora calls them a connect error): stop
                    // listening, keep streaming.
                    Err(e) if e.etype() == &ErrorType::ConnectError => watch_client = false,
                    Err(e) => {
                        close(ctx, CloseReason::ClientClosed);
                        return Err(e.into_down());
                    }
                    Ok(_) => watch_client = false,
                },
                reason = end_asked(entry.as_deref()), if entry.is_some() && ending.is_none() => {
                    ending = Some(Ending { reason, hint: sse::END_HINT });
                }
                _ = sleep_until(deadline(timed_end.map(|(t, _)| t))),
                    if timed_end.is_some() && ending.is_none() =>
                {
                    ending = timed_end.map(|(_, end)| end);
                }
                _ = sleep_until(deadline(silent_limit)), if silent_limit.is_some() => {
                    let limit = settings.read_timeout.unwrap_or_default();
                    let e = Error::explain(
                        ErrorType::ReadTimedout,
                        format!(
                            "the origin sent nothing for {}",
                            humantime::format_duration(limit)
                        ),
                    );
                    failed = Some(e.into_up());
                }
                _ = sleep_until(deadline(heartbeat_at)), if heartbeat_at.is_some() && at_boundary => {
                    send_own(session, ctx, Bytes::from_static(sse::HEARTBEAT), false).await?;
                    last_sent = Instant::now();
                }
                changed = drain.changed(), if drain_end.is_none() => {
                    drain_end = match changed {
                        Ok(()) => drain
                            .borrow_and_update()
                            .map(|t| drain_deadline(t, settings.drain_period)),
                        // The drain signal lives as long as the process.
                        Err(_) => None,
                    };
                }
            }
            if let Some(e) = failed {
                let at_boundary = ctx.stream.as_ref().is_some_and(|s| s.at_boundary());
                if settings.resume && self.state.drain.draining() && at_boundary {
                    // The client would come back to the next process anyway.
                    return end_stream(session, ctx, Ending::DRAIN).await;
                }
                if let Some(next) = self.try_resume(session, ctx, &mut resumes, &e).await {
                    origin = next;
                    tail.clear();
                    resumed = true;
                    last_origin = Instant::now();
                    continue;
                }
                let finished = ctx.stream.as_ref().and_then(|s| s.reason());
                if finished == Some(CloseReason::OriginClosed) {
                    return send_own(session, ctx, Bytes::new(), true).await;
                }
                return origin_failed(session, ctx, e).await;
            }
        }
    }

    /// Resumes the stream after `e` when its settings allow one more resume now.
    async fn try_resume(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        resumes: &mut std::collections::VecDeque<Instant>,
        e: &Error,
    ) -> Option<OriginSession> {
        let settings = ctx.chain.sse.settings;
        if !settings.resume || self.state.drain.draining() {
            return None;
        }
        let now = Instant::now();
        while resumes
            .front()
            .is_some_and(|t| now.duration_since(*t) > settings.resume_window)
        {
            resumes.pop_front();
        }
        if resumes.len() >= settings.resume_attempts as usize {
            log::info!(
                "origin failed ({e}); not resuming: {} resumes within {}",
                resumes.len(),
                humantime::format_duration(settings.resume_window)
            );
            return None;
        }
        resumes.push_back(now);
        let failed = ctx.upstream.lease.take().map(|lease| {
            lease.failed();
            lease.addr
        });
        let origin = self.resume(session, ctx, failed).await?;
        if let Some(route) = &ctx.route {
            route.metrics.sse_resumed();
        }
        log::info!(
            "sse stream resumed on {} after the origin {} failed ({e}), from last event id {:?}",
            ctx.upstream
                .addr()
                .map(|a| a.to_string())
                .unwrap_or_default(),
            failed.map(|a| a.to_string()).unwrap_or_default(),
            ctx.stream
                .as_ref()
                .map(|s| String::from_utf8_lossy(s.last_id()).into_owned())
                .unwrap_or_default()
        );
        Some(origin)
    }
}

/// One chunk from the origin: through the stream's pipeline, then written. When the stream
/// is ending, only the part up to the current event's end is sent.
async fn relay_chunk(
    session: &mut Session,
    ctx: &mut RequestCtx,
    chunk: Bytes,
    ending: bool,
) -> Result<()> {
    let Some(stream) = ctx.stream.as_mut() else {
        return Ok(());
    };
    let mut body = Some(chunk);
    if let Some(delay) = stream.chunk(&mut body, &mut ctx.body_filters, ending, false)? {
        tokio::time::sleep(delay).await;
    }
    write_body(session, body, false).await
}

/// Writes bytes of the proxy's own (a heartbeat, a hint, an error event) through the
/// route's body filters, so a compressed stream stays decodable.
async fn send_own(
    session: &mut Session,
    ctx: &mut RequestCtx,
    bytes: Bytes,
    end: bool,
) -> Result<()> {
    let body = filter_own(&mut ctx.body_filters, bytes, end)?;
    write_body(session, body, end).await
}

/// Ends the stream on purpose, between two events: the hint, then a clean end.
async fn end_stream(session: &mut Session, ctx: &mut RequestCtx, end: Ending) -> Result<()> {
    close(ctx, end.reason);
    send_own(session, ctx, Bytes::from_static(end.hint), true).await
}

/// The origin failed or went silent mid-stream.
async fn origin_failed(session: &mut Session, ctx: &mut RequestCtx, e: Box<Error>) -> Result<()> {
    let reason = if e.etype() == &ErrorType::ReadTimedout {
        CloseReason::IdleTimeout
    } else {
        CloseReason::OriginError
    };
    let at_boundary = ctx.stream.as_ref().is_some_and(|s| s.at_boundary());
    if ctx.chain.sse.settings.on_upstream_error == OnUpstreamError::Event && at_boundary {
        // Ended cleanly, so `logging` sees no error to count.
        if reason == CloseReason::IdleTimeout {
            if let Some(route) = &ctx.route {
                route.service.metrics.timeout();
            }
        }
        if let Some(stream) = ctx.stream.as_mut() {
            stream.close_with(reason, e.to_string());
        }
        let event = sse::error_event(&e.to_string());
        return send_own(session, ctx, event, true).await;
    }
    close(ctx, reason);
    Err(e)
}

/// Notes how the stream ended, for the close log and metrics.
fn close(ctx: &mut RequestCtx, reason: CloseReason) {
    if let Some(stream) = ctx.stream.as_mut() {
        stream.close(reason);
    }
}

/// A new stream while the process drains: an empty event stream that tells the client to
/// come back (to the process that took over the listeners) at once. `EventSource` would
/// give up for good on an error status.
async fn turn_away(session: &mut Session, ctx: &mut RequestCtx) -> Result<()> {
    let mut header = ResponseHeader::build(200, Some(4))?;
    header.insert_header(header::CONTENT_TYPE, "text/event-stream")?;
    header.insert_header(header::CACHE_CONTROL, "no-store")?;
    header.insert_header(header::CONTENT_LENGTH, sse::DRAIN_HINT.len())?;
    ctx.status = Some(200);
    session.set_keepalive(None);
    session
        .write_response_header(Box::new(header), false)
        .await
        .map_err(|e| e.into_down())?;
    write_body(session, Some(Bytes::from_static(sse::DRAIN_HINT)), true).await
}

/// Writes to the client; a failure is the client's (gone, or too slow for write_timeout).
async fn write_body(session: &mut Session, body: Option<Bytes>, end: bool) -> Result<()> {
    session
        .write_response_body(body, end)
        .await
        .map_err(|e| e.into_down())
}

/// When a timer at `at` fires; far in the future for `None` (its branch is disabled then).
fn deadline(at: Option<Instant>) -> Deadline {
    match at {
        Some(at) => Deadline::from_std(at),
        None => Deadline::now() + Duration::from_secs(86_400 * 365),
    }
}

async fn end_asked(entry: Option<&crate::sse::tracker::StreamEntry>) -> CloseReason {
    match entry {
        Some(entry) => entry.end_asked().await,
        None => std::future::pending().await,
    }
}
