//! The loop that carries an event stream, whatever request it answers.
//!
//! An event stream has to act while its origin is silent: send heartbeats, cut a stream
//! whose origin stopped talking (`read_timeout`), end it at `max_lifetime`, when the admin
//! API or the cleanup task asks, or when the process drains for a shutdown or an upgrade.
//! So once an answer is known to be an event stream, this loop carries it:
//!
//! ```text
//! one select! over
//!   origin chunk  -> the stream's pipeline (scan, record, filter, pace), then written
//!   client gone   -> the origin connection dropped at once            (client_closed)
//!   read_timeout  -> the origin silent too long: resume, or end       (idle_timeout)
//!   heartbeat     -> `:` comment, only between events
//!   max_lifetime / admin / cleanup
//!                 -> end at the next event boundary with a `retry:` hint
//!   drain         -> a GET stream (its client reopens it with Last-Event-ID): end at a
//!                    random moment within drain_period, at an event boundary, with a
//!                    `retry:` hint                                     (drain)
//!                    any other stream (an answer its client cannot ask for again): keep
//!                    streaming until it ends by itself, for at most finish_period, then
//!                    stop at an event boundary                         (cut)
//! ```
//!
//! An origin that fails mid-stream leaves the client stream cut (an HTTP/1.1 client sees no
//! last chunk), or with `on_upstream_error: event`, when it failed between two events, ends
//! it cleanly after an `event: error` carrying a JSON reason. A half-sent event is never
//! completed by the proxy: a client drops it, as the SSE specification says. With `resume`
//! (GET streams), a failed or silent origin is replaced by another endpoint asked for the
//! events after the last one the client received.

use std::future::poll_fn;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::FutureExt;
use http::header;
use pingora_core::protocols::http::ServerSession;
use pingora_error::{Error, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use tokio::time::{sleep_until, Instant as Deadline};

use super::client::Client;
use super::context::RequestCtx;
use super::exchange::{write_body, Link, Opened, Relay};
use super::origin::Framing;
use super::resume::Held;
use super::stream::filter_own;
use crate::sse::drain::{drain_deadline, Outcome};
use crate::sse::{self, CloseReason, OnUpstreamError, SseSettings};
use crate::upstream::Attempts;

/// A deliberate end: why (for the close log) and what the client gets last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// `retry: 3000`: the stream reached max_lifetime, or the admin API or the cleanup
    /// task asked (with this reason).
    Hint(CloseReason),
    /// `retry: 250`: a GET stream drained for a shutdown or an upgrade.
    Drain,
    /// finish_period ran out: the error event (with `on_upstream_error: event`) and a
    /// clean end, or else a cut.
    Cut,
}

/// Carries the event stream coming on `link`; its header has been written.
/// `reconnects`: the client asks for the stream again (a `GET`: EventSource, MCP's GET
/// stream, with Last-Event-ID), so a drain tells it to; any other stream is an answer that
/// would be lost, and finishes instead. `resume`: the request to send again when the
/// origin fails (with `sse.resume`).
pub async fn relay(
    relay: &Relay,
    client: &mut Client<'_>,
    ctx: &mut RequestCtx,
    mut link: Box<Link>,
    resume: Option<&RequestHeader>,
    reconnects: bool,
) -> Result<()> {
    // The route's settings, shared: the loop's future holds a pointer, not a copy of each
    // duration it reads, for as long as the stream is open.
    let settings = ctx.chain.sse.shared_settings();
    // With `resume`, only whole events go to the client (the rest is held), so a stream
    // continued from another origin never shows half an event; ids recently sent are
    // remembered so an origin that repeats them is not believed twice. Boxed: most
    // streams do not resume, and their loop should not carry it.
    let mut held = resume.is_some().then(Box::<Held>::default);
    let mut resumes: std::collections::VecDeque<Instant> = Default::default();
    let started = Instant::now();
    let lifetime_end = settings.max_lifetime.and_then(|d| started.checked_add(d));
    let drain = relay.state.drain.watch();
    let mut drain_end = relay
        .state
        .drain
        .started_at()
        .map(|t| drain_at(&settings, reconnects, t));
    let entry = ctx.stream.as_ref().and_then(|s| s.entry()).cloned();
    let mut watch_client = true;
    // The last bytes from the origin (read timeout) and to the client (heartbeats).
    let mut last_origin = started;
    let mut last_sent = started;
    let mut ending: Option<Ending> = None;
    // One timer for every deadline (read timeout, heartbeat, lifetime, drain), armed for
    // the earliest. An event moves the read-timeout and heartbeat deadlines later without
    // touching the timer: when it fires before anything is due, it is armed again.
    let timer = sleep_until(Deadline::now());
    tokio::pin!(timer);
    let mut armed: Option<Instant> = None;
    // Body bytes the origin had ready with its head, read before the head is written so
    // both go in one write; kept across turns until the read branch takes them.
    let mut ready = None;
    loop {
        let at_boundary = ctx.stream.as_ref().is_some_and(|s| s.at_boundary());
        if let Some(end) = ending.filter(|_| at_boundary) {
            return Box::pin(end_stream(client, ctx, end, relay)).await;
        }
        let timed_end = [
            lifetime_end.map(|t| (t, Ending::Hint(CloseReason::MaxLifetime))),
            drain_end.map(|t| {
                (
                    t,
                    if reconnects {
                        Ending::Drain
                    } else {
                        Ending::Cut
                    },
                )
            }),
        ]
        .into_iter()
        .flatten()
        .min_by_key(|(t, _)| *t)
        .filter(|_| ending.is_none());
        let silent_limit = settings
            .read_timeout
            .and_then(|t| last_origin.checked_add(t));
        let heartbeat_at = settings
            .heartbeat_interval
            .and_then(|i| last_sent.checked_add(i))
            .filter(|_| at_boundary);
        let next = [timed_end.map(|(t, _)| t), silent_limit, heartbeat_at]
            .into_iter()
            .flatten()
            .min();
        if let Some(next) = next.filter(|next| armed.is_none_or(|armed| *next < armed)) {
            timer.as_mut().reset(Deadline::from_std(next));
            armed = Some(next);
        }
        // Set when the origin failed or went silent: resume, or end.
        let mut failed: Option<Box<Error>> = None;
        // A response head not yet written goes with the first body bytes if the origin
        // has them ready, else now: the client has the head without waiting for an event.
        if client.head_pending() && ready.is_none() {
            ready = link.conn.read_body().now_or_never();
            if ready.is_none() {
                client.send_head().await?;
            }
        }

        // The origin's branch first: when it has a chunk, the others are not polled for
        // nothing. They still are at every turn it has none, and at least every so many
        // chunks in a burst, when tokio's budget makes the read wait.
        tokio::select! {
            biased;
            read = async {
                match ready.take() {
                    Some(read) => read,
                    None => link.conn.read_body().await,
                }
            } => match read {
                Ok(Some(chunk)) => {
                    last_origin = Instant::now();
                    let chunk = match held.as_mut() {
                        Some(held) => held.take(&chunk).inspect_err(|_| {
                            close(ctx, CloseReason::OriginError);
                        })?,
                        None => chunk,
                    };
                    if !chunk.is_empty() {
                        last_sent = last_origin;
                        relay_chunk(client, ctx, last_origin, chunk, ending.is_some()).await?;
                    }
                }
                Ok(None) => {
                    close(ctx, CloseReason::OriginClosed);
                    if drain_end.is_some() && !reconnects {
                        drained(relay, ctx, Outcome::Finished);
                    }
                    relay.release(*link, ctx);
                    return Box::pin(send_own(client, ctx, Bytes::new(), true)).await;
                }
                Err(e) => failed = Some(e),
            },
            gone = client.gone(), if watch_client => match gone {
                // Bytes where none belong (Pingora calls them a connect error): stop
                // listening, keep streaming.
                Err(e) if e.etype() == &ErrorType::ConnectError => watch_client = false,
                Err(e) => {
                    close(ctx, CloseReason::ClientClosed);
                    return Err(e.into_down());
                }
                Ok(_) => watch_client = false,
            },
            reason = poll_fn(|cx| end_asked(entry.as_deref(), cx)), if entry.is_some() && ending.is_none() => {
                ending = Some(Ending::Hint(reason));
            }
            () = &mut timer, if armed.is_some() => {
                armed = None;
                let now = Instant::now();
                if let Some((_, end)) = timed_end.filter(|(t, _)| *t <= now) {
                    ending = Some(end);
                }
                if silent_limit.is_some_and(|t| t <= now) {
                    let limit = settings.read_timeout.unwrap_or_default();
                    let e = Error::explain(
                        ErrorType::ReadTimedout,
                        format!(
                            "the origin sent nothing for {}",
                            humantime::format_duration(limit)
                        ),
                    );
                    failed = Some(e.into_up());
                } else if heartbeat_at.is_some_and(|t| t <= now) {
                    send_own(client, ctx, Bytes::from_static(sse::HEARTBEAT), false).await?;
                    last_sent = Instant::now();
                }
            }
            started = poll_fn(|cx| drain.poll_started(cx)), if drain_end.is_none() => {
                drain_end = Some(drain_at(&settings, reconnects, started));
            }
        }
        if let Some(e) = failed {
            let at_boundary = ctx.stream.as_ref().is_some_and(|s| s.at_boundary());
            if held.is_some() && relay.state.drain.draining() && at_boundary {
                // The client would come back to the next process anyway.
                return Box::pin(end_stream(client, ctx, Ending::Drain, relay)).await;
            }
            if let Some(request) = resume {
                let resumed_origin =
                    Box::pin(try_resume(relay, client, ctx, &mut resumes, &e, request)).await;
                if let Some(next) = resumed_origin {
                    *link = next.link;
                    ready = None;
                    if let Some(held) = held.as_mut() {
                        held.resumed();
                    }
                    last_origin = Instant::now();
                    continue;
                }
            }
            let finished = ctx.stream.as_ref().and_then(|s| s.reason());
            if finished == Some(CloseReason::OriginClosed) {
                return Box::pin(send_own(client, ctx, Bytes::new(), true)).await;
            }
            return Box::pin(origin_failed(client, ctx, e)).await;
        }
    }
}

/// When a stream ends once a drain started at `t`: a `GET` stream (its client reconnects)
/// at a random moment within `drain_period`, any other after `finish_period`.
fn drain_at(settings: &SseSettings, reconnects: bool, t: Instant) -> Instant {
    if reconnects {
        drain_deadline(t, settings.drain_period)
    } else {
        t.checked_add(settings.finish_period)
            .unwrap_or_else(|| t + Duration::from_secs(86_400 * 365))
    }
}

/// Resumes the stream after `e` when its settings allow one more resume now: opens it again
/// from another endpoint (the same one when it is the only one up), asking for the events
/// after the last one the client received.
async fn try_resume(
    relay: &Relay,
    client: &mut Client<'_>,
    ctx: &mut RequestCtx,
    resumes: &mut std::collections::VecDeque<Instant>,
    e: &Error,
    request: &RequestHeader,
) -> Option<Opened> {
    let settings = *ctx.chain.sse.settings();
    if relay.state.drain.draining() {
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
    let mut again = request.clone();
    let last_id = ctx
        .stream
        .as_ref()
        .map(|s| s.last_id().to_vec())
        .filter(|id| !id.is_empty());
    if let Some(id) = &last_id {
        again.insert_header("last-event-id", id.as_slice()).ok()?;
    }
    ctx.upstream.attempts = failed.map_or_else(|| Attempts::new(0), Attempts::avoiding);
    let mut opened = relay.open(client, ctx, &again, Framing::None).await;
    if opened.is_err() && failed.is_some() {
        ctx.upstream.attempts = Attempts::new(0);
        opened = relay.open(client, ctx, &again, Framing::None).await;
    }
    let opened = match opened {
        Ok(opened) => opened,
        Err(e) => {
            log::info!("resume failed: {e}");
            return None;
        }
    };
    if opened.head.status == 204 {
        // In SSE, 204 means: do not reconnect. The stream ends cleanly.
        log::info!("resume: the origin answered 204, the stream is over");
        close(ctx, CloseReason::OriginClosed);
        return None;
    }
    if !streams(&opened.head) {
        if let Some(lease) = &ctx.upstream.lease {
            lease.failed();
        }
        log::info!("resume failed: the origin did not answer with an event stream");
        return None;
    }
    if let Some(lease) = &ctx.upstream.lease {
        lease.succeeded();
        if let Some(entry) = ctx.stream.as_ref().and_then(|s| s.entry()) {
            entry.set_upstream(lease.addr);
        }
    }
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
        String::from_utf8_lossy(last_id.as_deref().unwrap_or_default()),
    );
    Some(opened)
}

/// Whether a response head starts an event stream.
fn streams(head: &ResponseHeader) -> bool {
    head.status == 200
        && head
            .headers
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| sse::is_event_stream(v.as_bytes()))
}

/// One chunk from the origin, read `now`: through the stream's pipeline, then written. When
/// the stream is ending, only the part up to the current event's end is sent.
async fn relay_chunk(
    client: &mut Client<'_>,
    ctx: &mut RequestCtx,
    now: Instant,
    chunk: Bytes,
    ending: bool,
) -> Result<()> {
    let Some(stream) = ctx.stream.as_mut() else {
        return Ok(());
    };
    let mut body = Some(chunk);
    if let Some(delay) = stream.chunk(now, &mut body, &mut ctx.body_filters, ending)? {
        // Boxed: only paced streams wait here, and the loop's future, which would hold the
        // room for it, is held for as long as a stream is open.
        Box::pin(hold_back(client, delay)).await?;
    }
    client.write(body, false).await
}

/// Holds a chunk back for `delay` (`flush_interval`); the head is not.
async fn hold_back(client: &mut Client<'_>, delay: Duration) -> Result<()> {
    client.send_head().await?;
    tokio::time::sleep(delay).await;
    Ok(())
}

/// Writes bytes of the proxy's own (a heartbeat, a hint, an error event) through the
/// route's body filters, so a compressed stream stays decodable.
async fn send_own(
    client: &mut Client<'_>,
    ctx: &mut RequestCtx,
    bytes: Bytes,
    end: bool,
) -> Result<()> {
    let body = filter_own(&mut ctx.body_filters, bytes, end)?;
    client.write(body, end).await
}

/// Ends the stream on purpose, between two events.
async fn end_stream(
    client: &mut Client<'_>,
    ctx: &mut RequestCtx,
    end: Ending,
    relay: &Relay,
) -> Result<()> {
    match end {
        Ending::Hint(reason) => {
            close(ctx, reason);
            send_own(client, ctx, Bytes::from_static(sse::END_HINT), true).await
        }
        Ending::Drain => {
            close(ctx, CloseReason::Drain);
            drained(relay, ctx, Outcome::Reconnect);
            send_own(client, ctx, Bytes::from_static(sse::DRAIN_HINT), true).await
        }
        Ending::Cut => {
            drained(relay, ctx, Outcome::Cut);
            let period = humantime::format_duration(ctx.chain.sse.settings().finish_period);
            let why = format!("the proxy shut down; the answer was cut after {period}");
            if let Some(stream) = ctx.stream.as_mut() {
                stream.close_with(CloseReason::Cut, why.clone());
            }
            if ctx.chain.sse.settings().on_upstream_error == OnUpstreamError::Event {
                let event = sse::error_event("shutdown", &why);
                return send_own(client, ctx, event, true).await;
            }
            // Cut, not ended: an HTTP/1.1 client sees no last chunk, so it can tell.
            Err(Error::explain(super::record::CUT, why))
        }
    }
}

/// Counts how a stream open during a drain ended.
fn drained(relay: &Relay, ctx: &RequestCtx, outcome: Outcome) {
    relay.state.drain.ended(outcome);
    if let Some(route) = &ctx.route {
        route.metrics.sse_drained(outcome);
    }
}

/// The origin failed or went silent mid-stream.
async fn origin_failed(client: &mut Client<'_>, ctx: &mut RequestCtx, e: Box<Error>) -> Result<()> {
    let reason = if e.etype() == &ErrorType::ReadTimedout {
        CloseReason::IdleTimeout
    } else {
        CloseReason::OriginError
    };
    let at_boundary = ctx.stream.as_ref().is_some_and(|s| s.at_boundary());
    if ctx.chain.sse.settings().on_upstream_error == OnUpstreamError::Event && at_boundary {
        // Ended cleanly, so `logging` sees no error to count.
        if reason == CloseReason::IdleTimeout {
            if let Some(route) = &ctx.route {
                route.service.metrics.timeout();
            }
        }
        if let Some(stream) = ctx.stream.as_mut() {
            stream.close_with(reason, e.to_string());
        }
        let event = sse::error_event("upstream", &e.to_string());
        return send_own(client, ctx, event, true).await;
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
pub async fn turn_away(session: &mut ServerSession, ctx: &mut RequestCtx) -> Result<()> {
    let mut header = ResponseHeader::build(200, Some(4))?;
    header.insert_header(header::CONTENT_TYPE, "text/event-stream")?;
    header.insert_header(header::CACHE_CONTROL, "no-store")?;
    header.insert_header(header::CONTENT_LENGTH, sse::DRAIN_HINT.len())?;
    ctx.status = Some(200);
    session.set_keepalive(None);
    session
        .write_response_header(Box::new(header))
        .await
        .map_err(|e| e.into_down())?;
    write_body(session, Some(Bytes::from_static(sse::DRAIN_HINT)), true).await
}

/// Ready once an end was asked for the tracked stream `entry`; never for an untracked one.
fn end_asked(
    entry: Option<&crate::sse::tracker::StreamEntry>,
    cx: &mut std::task::Context<'_>,
) -> std::task::Poll<CloseReason> {
    match entry {
        Some(entry) => entry.poll_end_asked(cx),
        None => std::task::Poll::Pending,
    }
}
