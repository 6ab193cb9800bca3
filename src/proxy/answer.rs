//! The status and one-line reason for an error (502, 504, 503 ...), as the proxy answers
//! when a request fails before its response began.

use pingora_error::{Error, ErrorSource, ErrorType};

/// The status and one-line reason for an error, or `None` when the client is gone.
pub fn error_response(e: &Error, service: Option<&str>) -> Option<(u16, String)> {
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
        // A connection made from a local address the host does not have
        // (`client_bind_to_ipv4`/`_ipv6`): which, and the system's reason.
        ErrorType::BindError if e.esource() == &ErrorSource::Upstream => {
            let context = e.context.as_ref().map_or("binding failed", |c| c.as_str());
            let cause = e
                .cause
                .as_ref()
                .map_or_else(String::new, |c| format!(": {c}"));
            return Some((502, format!("{service}{context}{cause}")));
        }
        _ => match e.esource() {
            // A TLS alert from the origin after the handshake seemed done (as a TLS 1.3
            // origin refuses a missing or unknown client certificate): rustls' words.
            ErrorSource::Upstream => {
                let why = match alert(e) {
                    Some(alert) => format!("TLS to the origin failed: {alert}"),
                    None => format!("the origin failed: {}", e.etype().as_str()),
                };
                return Some((502, format!("{service}{why}")));
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

/// The TLS alert an origin sent, found under the error's causes (Pingora's errors around
/// the I/O error around rustls').
fn alert(e: &Error) -> Option<&rustls::Error> {
    let mut cause = e.cause.as_deref()?;
    for _ in 0..4 {
        if let Some(inner) = cause.downcast_ref::<Error>() {
            cause = inner.cause.as_deref()?;
        } else {
            let tls = cause
                .downcast_ref::<std::io::Error>()?
                .get_ref()?
                .downcast_ref::<rustls::Error>()?;
            return matches!(tls, rustls::Error::AlertReceived(_)).then_some(tls);
        }
    }
    None
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::http_error;

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
        let io = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRequired),
        );
        let alerted = Error::because(ErrorType::ReadError, "reading the head", io).into_up();
        assert_eq!(
            error_response(&alerted, Some("feed")),
            Some((
                502,
                "service `feed`: TLS to the origin failed: received fatal alert: \
                 CertificateRequired"
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
