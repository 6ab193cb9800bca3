//! Why an event stream ended: one closed set shared by the close log line, the registry's
//! recent closes, `streamgate_sse_streams_closed_total`, the access log and the admin API.

use std::fmt;

use pingora_error::{Error, ErrorSource, ErrorType};

/// Why an SSE stream closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseReason {
    /// The client went away.
    ClientClosed,
    /// The origin finished the stream.
    OriginClosed,
    /// The origin failed mid-stream (reset, broken framing).
    OriginError,
    /// The origin was silent longer than `read_timeout`, or longer than
    /// `inactive_threshold` and the cleanup task closed the stream.
    IdleTimeout,
    /// The stream reached `max_lifetime` and was ended with a `retry:` hint.
    MaxLifetime,
    /// The process was shutting down or upgrading, or the stream's endpoint left discovery,
    /// and the stream was ended with a hint.
    Drain,
    /// The admin API ended it.
    Ended,
    /// An answer its client cannot ask for again (a `POST` stream, say) was still streaming
    /// when a shutdown's `finish_period` ran out, and was stopped at an event boundary.
    Cut,
    /// Anything else (a write to the client timed out, an internal error).
    Error,
}

impl CloseReason {
    /// Every reason, in the order of their discriminants.
    pub const ALL: [CloseReason; 9] = [
        CloseReason::ClientClosed,
        CloseReason::OriginClosed,
        CloseReason::OriginError,
        CloseReason::IdleTimeout,
        CloseReason::MaxLifetime,
        CloseReason::Drain,
        CloseReason::Ended,
        CloseReason::Cut,
        CloseReason::Error,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::ClientClosed => "client_closed",
            CloseReason::OriginClosed => "origin_closed",
            CloseReason::OriginError => "origin_error",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::MaxLifetime => "max_lifetime",
            CloseReason::Drain => "drain",
            CloseReason::Ended => "ended",
            CloseReason::Cut => "cut",
            CloseReason::Error => "error",
        }
    }

    /// How a stream ended, from the error it ended with (`None`: the origin finished it).
    pub fn of(e: Option<&Error>) -> CloseReason {
        match e {
            None => CloseReason::OriginClosed,
            Some(e) => match (e.esource(), e.etype()) {
                (ErrorSource::Downstream, _) => CloseReason::ClientClosed,
                (ErrorSource::Upstream, ErrorType::ReadTimedout) => CloseReason::IdleTimeout,
                (ErrorSource::Upstream, _) => CloseReason::OriginError,
                _ => CloseReason::Error,
            },
        }
    }
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_is_in_discriminant_order() {
        for (i, reason) in CloseReason::ALL.iter().enumerate() {
            assert_eq!(*reason as usize, i);
        }
    }

    #[test]
    fn errors_map_to_reasons() {
        let gone = Error::new(ErrorType::ConnectionClosed).into_down();
        assert_eq!(CloseReason::of(Some(&gone)), CloseReason::ClientClosed);
        let silent = Error::new(ErrorType::ReadTimedout).into_up();
        assert_eq!(CloseReason::of(Some(&silent)), CloseReason::IdleTimeout);
        let reset = Error::new(ErrorType::ReadError).into_up();
        assert_eq!(CloseReason::of(Some(&reset)), CloseReason::OriginError);
        assert_eq!(CloseReason::of(None), CloseReason::OriginClosed);
    }
}
