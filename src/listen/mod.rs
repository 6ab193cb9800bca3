//! Listeners as the config describes them: what each `listen` entry is (plain, TLS, h2c,
//! redirect to https), the HTTP/2 settings, the TLS floor, and ([`certs`]) the certificates
//! of TLS listeners. The Pingora services that serve them are built in `server`.

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

/// One `listen` entry, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    pub addr: SocketAddr,
    pub kind: ListenerKind,
    /// Idle time before TCP keepalive probes start; `None`: off.
    pub tcp_keepalive: Option<Duration>,
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
