//! Recording a finished request: the chain's logging hooks, the route's and service's
//! metrics, the access log line, and how its event stream (if it was one) ended.

use pingora_error::{Error, ErrorSource, ErrorType};
use pingora_proxy::Session;

use super::context::RequestCtx;
use crate::access_log::{self, Entry};
use crate::config::AccessLog;
use crate::http_util::client_ip;
use crate::sse::CloseReason;

/// Records the request `ctx` that ended with `e` (`None`: it finished).
pub fn finished(session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx, log: AccessLog) {
    let status = session
        .response_written()
        .map_or(ctx.status.unwrap_or(0), |r| r.status.as_u16());
    if let Some(stream) = ctx.stream.as_mut() {
        stream.close(CloseReason::of(e));
        if let Some(e) = e {
            stream.close_with(CloseReason::of(Some(e)), e.to_string());
        }
    }
    if let Some(route) = &ctx.route {
        for instance in route.chain.iter() {
            instance.middleware.logging(session, &ctx.chain);
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
                session,
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
            client_ip(session)
                .map(|ip| ip.to_string())
                .unwrap_or_default(),
            ctx.request_id().unwrap_or("-"),
            s.age().as_secs_f64(),
            session.body_bytes_sent(),
            String::from_utf8_lossy(s.last_id()),
            e.map(|e| format!(" detail=\"{e}\"")).unwrap_or_default(),
        );
    }
}
