//! Listeners as the config describes them: what each `listen` entry is (plain, TLS, h2c,
//! redirect to https), the HTTP/2 settings, the TLS floor, and ([`certs`]) the certificates
//! of TLS listeners. The Pingora services that serve them are built in `server`.

pub mod admission;
pub mod certs;

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

pub use certs::{ListenerTls, LoadedCert};

/// Default `http2.max_concurrent_streams`: room for a page's event streams and its other
/// requests on one connection (Pingora's own default is 100).
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 256;
/// Default `http2.idle_timeout`: a connection with no open stream for this long closes.
pub const DEFAULT_H2_IDLE_TIMEOUT: Duration = Duration::from_secs(180);
/// Default `tcp_keepalive`: idle time before the first probe on an accepted connection.
pub const DEFAULT_TCP_KEEPALIVE: Duration = Duration::from_secs(60);
/// Default `idle_timeout`: a client connection with no request in progress for this long
/// closes.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default `request_header_timeout`: the most a client may take to send the head of a
/// request once it has started it.
pub const DEFAULT_REQUEST_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Descriptors kept out of the default `max_connections`: listening sockets, idle pooled
/// origin connections, config and certificate files, the admin API, logs.
const RESERVED_FDS: u64 = 100;

/// One `listen` entry, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    pub addr: SocketAddr,
    pub kind: ListenerKind,
    /// Idle time before TCP keepalive probes start; `None`: off.
    pub tcp_keepalive: Option<Duration>,
    /// A new connection is handed to the proxy once its client has sent something (or this
    /// long after it connected, whole seconds: Linux's `TCP_DEFER_ACCEPT`); `None` (the
    /// default, as in nginx and HAProxy): at once.
    pub defer_accept: Option<Duration>,
    /// Client connections open at once; one more is closed as it is accepted.
    pub max_connections: usize,
    /// How long a client connection may send nothing while no request is in progress
    /// (before its first request, between keep-alive requests); `None`: no limit. Whole
    /// seconds: Pingora keeps its keep-alive wait in seconds.
    pub idle_timeout: Option<Duration>,
    /// How long an HTTP/1.x client may take to send the whole head of a request (each of a
    /// kept-alive connection), from its first byte (a client that sends it a byte at a time would otherwise hold
    /// its connection and a `max_connections` slot for as long as it likes); `None`: no
    /// limit.
    pub request_header_timeout: Option<Duration>,
}

impl Listener {
    /// A listener of `kind` on `addr` with the default settings.
    pub fn new(addr: SocketAddr, kind: ListenerKind) -> Self {
        Listener {
            addr,
            kind,
            tcp_keepalive: Some(DEFAULT_TCP_KEEPALIVE),
            defer_accept: None,
            max_connections: default_max_connections(),
            idle_timeout: Some(DEFAULT_IDLE_TIMEOUT),
            request_header_timeout: Some(DEFAULT_REQUEST_HEADER_TIMEOUT),
        }
    }

    /// Whether a connection accepted on `local` came through this listener: its exact
    /// address, or this listener is bound to the unspecified address on that port.
    pub fn accepts(&self, local: SocketAddr) -> bool {
        self.addr == local || (self.addr.port() == local.port() && self.addr.ip().is_unspecified())
    }
}

/// The default `max_connections` of a listener: what the process's open-file limit leaves
/// room for, after a reserve, when every client connection also holds one to its origin.
pub fn default_max_connections() -> usize {
    let files = open_file_limit().unwrap_or(1024);
    usize::try_from(files.saturating_sub(RESERVED_FDS) / 2)
        .unwrap_or(usize::MAX)
        .max(1)
}

/// The process's open-file limit (the soft one, which is what `accept` runs into).
pub fn open_file_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given.
    let got = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    (got == 0).then_some(limit.rlim_cur)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerKind {
    /// Plain HTTP/1.1, and HTTP/2 with prior knowledge when `h2c`.
    Plain { h2c: bool },
    /// Plain HTTP answered with a 308 to `https://host[:https_port]/path`.
    Redirect { https_port: u16 },
    /// TLS; its certificates are in [`Config::tls`] under the same address. `http2`:
    /// ALPN offers h2 before http/1.1.
    Tls { http2: bool },
}

impl std::fmt::Display for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ", self.addr)?;
        match self.kind {
            ListenerKind::Plain { h2c: false } => f.write_str("http/1.1"),
            ListenerKind::Plain { h2c: true } => f.write_str("http/1.1 + h2c"),
            ListenerKind::Redirect { https_port } => {
                write!(f, "redirect to https (port {https_port})")
            }
            ListenerKind::Tls { http2: true } => f.write_str("tls, alpn h2 + http/1.1"),
            ListenerKind::Tls { http2: false } => f.write_str("tls, alpn http/1.1"),
        }?;
        write!(f, ", max_connections {}", self.max_connections)?;
        match self.idle_timeout {
            Some(idle) => write!(f, ", idle_timeout {}", humantime::format_duration(idle)),
            None => f.write_str(", idle_timeout none"),
        }?;
        match self.request_header_timeout {
            Some(t) => write!(
                f,
                ", request_header_timeout {}",
                humantime::format_duration(t)
            ),
            None => f.write_str(", request_header_timeout none"),
        }?;
        match self.defer_accept {
            Some(defer) => write!(f, ", defer_accept {}", humantime::format_duration(defer)),
            None => f.write_str(", defer_accept off"),
        }
    }
}

/// `http2:`, for every HTTP/2 connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Http2Settings {
    pub max_concurrent_streams: u32,
    /// Close a connection that has had no open stream for this long. A connection with any
    /// stream open (an event stream, however quiet) is never closed by it.
    pub idle_timeout: Option<Duration>,
}

impl Default for Http2Settings {
    fn default() -> Self {
        Http2Settings {
            max_concurrent_streams: DEFAULT_MAX_CONCURRENT_STREAMS,
            idle_timeout: Some(DEFAULT_H2_IDLE_TIMEOUT),
        }
    }
}

/// The oldest TLS version a listener accepts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum TlsVersion {
    #[default]
    V1_2,
    V1_3,
}

impl fmt::Display for TlsVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TlsVersion::V1_2 => "1.2",
            TlsVersion::V1_3 => "1.3",
        })
    }
}

impl<'de> Deserialize<'de> for TlsVersion {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct VersionVisitor;

        impl Visitor<'_> for VersionVisitor {
            type Value = TlsVersion;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("\"1.2\" or \"1.3\"")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<TlsVersion, E> {
                match v
                    .trim()
                    .trim_start_matches("TLSv")
                    .trim_start_matches("TLS")
                {
                    "1.2" => Ok(TlsVersion::V1_2),
                    "1.3" => Ok(TlsVersion::V1_3),
                    _ => Err(E::custom(format!(
                        "unsupported TLS version `{v}`: write \"1.2\" or \"1.3\" \
                         (older versions are not offered)"
                    ))),
                }
            }

            // `min_version: 1.3` without quotes is a YAML number.
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<TlsVersion, E> {
                self.visit_str(&v.to_string())
            }
        }

        d.deserialize_any(VersionVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_cap_fits_the_open_file_limit() {
        let files = open_file_limit().expect("getrlimit");
        let max = default_max_connections() as u64;
        assert!(max >= 1);
        // Two descriptors a connection (the client's and its origin's) and the reserve.
        assert!(
            files < RESERVED_FDS + 2 || 2 * max + RESERVED_FDS <= files,
            "{max} of {files}"
        );
    }

    #[test]
    fn a_listener_on_the_unspecified_address_accepts_any_local_address() {
        let any = Listener::new(
            "0.0.0.0:80".parse().expect("addr"),
            ListenerKind::Plain { h2c: false },
        );
        assert!(any.accepts("127.0.0.1:80".parse().expect("addr")));
        assert!(!any.accepts("127.0.0.1:81".parse().expect("addr")));
        let one = Listener::new(
            "10.0.0.1:80".parse().expect("addr"),
            ListenerKind::Plain { h2c: false },
        );
        assert!(!one.accepts("127.0.0.1:80".parse().expect("addr")));
    }
}
