//! Recording a finished request: the chain's logging hooks, the route's and service's
//! metrics, the access log line, and how its event stream (if it was one) ended.

use pingora_core::protocols::http::ServerSession;
use pingora_error::{Error, ErrorSource, ErrorType};
use pingora_http::RequestHeader;

use super::context::RequestCtx;
use crate::access_log::{self, Entry};
use crate::config::AccessLog;
use crate::sse::CloseReason;

/// Whether an error a request ended with is ordinary, not worth an error log line: a
/// client that went away; anything that ended a started event stream (client gone, origin
/// gone, a timeout, a deliberate cut), which the close line reports at info level.
pub fn quiet(ctx: &RequestCtx, error: &Error) -> bool {
    let client_gone = error.esource() == &ErrorSource::Downstream
        && matches!(
            error.etype(),
            ErrorType::ConnectionClosed | ErrorType::ReadError | ErrorType::WriteError
        );
    let stream_end = ctx.stream.is_some()
        && (error.esource() != &ErrorSource::Internal || error.etype() == &CUT);
    client_gone || stream_end
}

/// The error type of a stream cut on purpose (`finish_period` ran out).
pub const CUT: ErrorType = ErrorType::Custom("cut");

/// Logs how a request that went on in a task of its own failed, as Pingora logs the
/// others: ordinary ends at debug level, anything else as an error.
pub fn log_error(request: &RequestHeader, ctx: &RequestCtx, e: &Error) {
    if quiet(ctx, e) {
        log::debug!("stream ended: {e}");
    } else {
        log::error!(
            "Fail to proxy: {e}, {} {}, request id: {}",
            request.method,
            request.uri,
            ctx.request_id().unwrap_or("-")
        );
    }
}

/// Records what a Pingora session says about a request that ended with `e`.
pub fn finished_session(
    session: &ServerSession,
    e: Option<&Error>,
    ctx: &mut RequestCtx,
    log: AccessLog,
) {
    if ctx.detached {
        return;
    }
    if let Some(written) = session.response_written() {
        ctx.status = Some(written.status.as_u16());
    }
    finished(session.req_header(), session.body_bytes_sent(), e, ctx, log);
}

/// Records the request `request` (`ctx`), of which `sent` body bytes went to the client,
/// that ended with `e` (`None`: it finished).
pub fn finished(
    request: &RequestHeader,
    sent: usize,
    e: Option<&Error>,
    ctx: &mut RequestCtx,
    log: AccessLog,
) {
    let status = ctx.status.unwrap_or(0);
    if let Some(stream) = ctx.stream.as_mut() {
        stream.close(CloseReason::of(e));
        if let Some(e) = e {
            stream.close_with(CloseReason::of(Some(e)), e.to_string());
        }
    }
    if let Some(route) = &ctx.route {
        for instance in route.chain.iter() {
            instance.middleware.logging(request, &ctx.chain);
        }
        route.metrics.request(status, ctx.started.elapsed());
        if let Some(e) = e.filter(|e| e.esource() == &ErrorSource::Upstream) {
            match e.etype() {
                ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout => {
                    route.service.metrics.timeout()
                }
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
    let stream = ctx.stream.as_ref().map(|s| {
        (
            s.events(),
            s.reason().unwrap_or(CloseReason::Error),
            s.entry().is_some(),
        )
    });
    if log.enabled {
        let chain = ctx.route.iter().flat_map(|r| r.chain.iter());
        let secret_params: Vec<&str> = chain
            .filter_map(|i| i.middleware.secret_query_param())
            .collect();
        access_log::write(
            log.format,
            &Entry {
                request,
                client: ctx.chain.client,
                bytes: sent,
                route: ctx.route.as_ref().map(|r| r.name.as_str()),
                service: ctx.service_name(),
                upstream: ctx.upstream.addr(),
                duration: ctx.started.elapsed(),
                request_id: ctx.request_id(),
                status,
                sse: stream.map(|(events, reason, _)| (events, reason)),
                error: e,
                secret_params: &secret_params,
            },
        );
    }
    // A tracked stream logs its close when its entry goes; an untracked one here.
    if let (Some((events, reason, false)), Some(s)) = (stream, ctx.stream.as_ref()) {
        log::info!(
            "sse stream ended: route={} client={} request_id={} duration={:.3}s \
             events={events} bytes={} last_event_id={:?} reason={reason}{}",
            ctx.route.as_ref().map_or("", |r| r.name.as_str()),
            ctx.chain
                .client
                .map(|ip| ip.to_string())
                .unwrap_or_default(),
            ctx.request_id().unwrap_or("-"),
            s.age().as_secs_f64(),
            sent,
            String::from_utf8_lossy(s.last_id()),
            e.map(|e| format!(" detail=\"{e}\"")).unwrap_or_default(),
        );
    }
}
