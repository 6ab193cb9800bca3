//! Recording a finished request: the chain's logging hooks, the route's and service's
//! metrics, the access log line, and how its event stream (if it was one) ended.

use pingora_core::protocols::http::ServerSession;
use pingora_error::{Error, ErrorSource, ErrorType};
use pingora_http::RequestHeader;

use super::context::RequestCtx;
use crate::access_log::{self, Entry};
use crate::config::AccessLog;
use crate::http_util::answer_written;
use crate::logging::Throttle;
use crate::sse::CloseReason;

/// How an error a request ended with is logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// Ordinary, at debug level: a client that went away; anything that ended a started
    /// event stream (client gone, origin gone, a timeout, a deliberate cut), which the close
    /// line reports at info level.
    Ordinary,
    /// The client's mistake, at info level and at most a few lines a second: a malformed
    /// request body (chunked framing, trailers), a body that ended early, a client too slow
    /// to send it, an answer 4xx. Never a server error, and a client must not be able to
    /// flood the log with them.
    Client,
    /// Anything else: an error line.
    Failure,
}

/// How `error`, which the request of `ctx` ended with, is logged.
pub fn severity(ctx: &RequestCtx, error: &Error) -> Severity {
    let downstream = error.esource() == &ErrorSource::Downstream;
    let client_gone = downstream
        && matches!(
            error.etype(),
            ErrorType::ConnectionClosed | ErrorType::ReadError | ErrorType::WriteError
        );
    let stream_end = ctx.stream.is_some()
        && (error.esource() != &ErrorSource::Internal || error.etype() == &CUT);
    if client_gone || stream_end {
        Severity::Ordinary
    } else if downstream || matches!(error.etype(), ErrorType::HTTPStatus(400..=499)) {
        Severity::Client
    } else {
        Severity::Failure
    }
}

/// The error type of a stream cut on purpose (`finish_period` ran out).
pub const CUT: ErrorType = ErrorType::Custom("cut");

/// Logs `e` when it is not a failure of the proxy's (see [`Severity`]) and says whether it
/// did: a failure is left to the caller's error line. `summary` says which request it was.
pub fn log_unless_failure(
    throttle: &Throttle,
    ctx: &RequestCtx,
    e: &Error,
    summary: impl FnOnce() -> String,
) -> bool {
    match severity(ctx, e) {
        Severity::Ordinary => log::debug!("request ended: {e}"),
        Severity::Client => {
            if let Some(left_out) = throttle.admit() {
                let earlier = match left_out {
                    0 => String::new(),
                    n => format!(" ({n} similar lines left out before this one)"),
                };
                log::info!("client error: {e}, {}{earlier}", summary());
            }
        }
        Severity::Failure => return false,
    }
    true
}

/// Logs how a request that went on in a task of its own failed, as Pingora logs the
/// others.
pub fn log_error(throttle: &Throttle, request: &RequestHeader, ctx: &RequestCtx, e: &Error) {
    let summary = || summary(request, ctx);
    if !log_unless_failure(throttle, ctx, e, summary) {
        log::error!("Fail to proxy: {e}, {}", summary());
    }
}

/// A request on one line for error logs: method, target (credentials in the query
/// redacted, as in the access log), host, request id.
pub fn summary(request: &RequestHeader, ctx: &RequestCtx) -> String {
    let line = access_log::summary(request, &ctx.secret_params());
    match ctx.request_id() {
        Some(id) => format!("{line}, request id: {id}"),
        None => line,
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
    if let Some(written) = answer_written(session) {
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
        match e {
            // What went wrong, for a tracked stream's close line.
            Some(e) if stream.entry().is_some() => {
                stream.close_with(CloseReason::of(Some(e)), e.to_string())
            }
            _ => stream.close(CloseReason::of(e)),
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
        let secret_params = ctx.secret_params();
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
    // A tracked stream logs its close when its entry goes (at info: `connection_tracking`
    // asks for a line per open and close); an untracked one here, at debug.
    if let (Some((events, reason, false)), Some(s)) = (stream, ctx.stream.as_ref()) {
        log::debug!(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::http_error;

    #[test]
    fn clients_mistakes_are_not_failures() {
        let ctx = RequestCtx::default();
        let of = |e: Box<Error>| severity(&ctx, &e);
        let chunk = ErrorType::Custom("InvalidChunk");
        assert_eq!(of(Error::new(chunk).into_down()), Severity::Client);
        assert_eq!(
            of(Error::new(ErrorType::InvalidHTTPHeader).into_down()),
            Severity::Client
        );
        assert_eq!(of(http_error(413, "too large")), Severity::Client);
        assert_eq!(
            of(Error::new(ErrorType::ConnectionClosed).into_down()),
            Severity::Ordinary
        );
        assert_eq!(
            of(Error::new(ErrorType::ReadError).into_up()),
            Severity::Failure
        );
        assert_eq!(of(http_error(502, "no origin")), Severity::Failure);
    }
}
