//! The config files as written: serde structs that reject unknown keys.
//!
//! Values that can be checked on their own (URLs, patterns, durations, addresses) are parsed
//! here, so their errors carry serde_yaml's line and column. Cross-references (service
//! names) are resolved in [`super`], which locates its errors by key path.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

pub use crate::middleware::MiddlewareFile;
use crate::routing::{HostPattern, PathPattern};
use crate::upstream::{Scheme, ServiceUrl};

/// Keys of the main file that belong to streamgate. The main file's other top-level keys
/// must be Pingora server settings.
pub const OWN_KEYS: &[&str] = &[
    "listen",
    "http2",
    "include",
    "demo",
    "sse",
    "services",
    "host_rules",
    "middleware_services",
    "middlewares",
    "admin",
    "access_log",
];

/// The main config file (streamgate's part; Pingora's keys are read by Pingora's
/// `ServerConf` from the same text).
#[derive(Debug, Deserialize)]
pub struct MainFile {
    #[serde(default)]
    pub listen: Option<Vec<ListenFile>>,
    #[serde(default)]
    pub http2: Option<Http2File>,
    #[serde(default)]
    pub include: Vec<String>,
    #[serde(default)]
    pub demo: Option<DemoFile>,
    #[serde(default)]
    pub sse: Option<SseFile>,
    #[serde(default)]
    pub services: BTreeMap<String, ServiceFile>,
    #[serde(default)]
    pub host_rules: Vec<HostRuleFile>,
    #[serde(default)]
    pub middleware_services: Vec<MiddlewareFile>,
    #[serde(default)]
    pub middlewares: Vec<String>,
    #[serde(default)]
    pub admin: Option<AdminFile>,
    #[serde(default)]
    pub access_log: Option<AccessLogFile>,
}

/// `admin:`: the admin listener (health, config, routes, streams, reload, metrics).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminFile {
    pub listen: ListenAddr,
    /// Required when `listen` is not a loopback address.
    #[serde(default)]
    pub token: Option<String>,
}

/// `access_log:`: one line per request on the `streamgate::access` log target.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessLogFile {
    #[serde(default)]
    pub enabled: Option<bool>,
    #[serde(default)]
    pub format: Option<AccessLogFormat>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessLogFormat {
    #[default]
    Combined,
    Json,
}

/// A file named by `include`: more services, host rules and middleware instances.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IncludedFile {
    #[serde(default)]
    pub services: BTreeMap<String, ServiceFile>,
    #[serde(default)]
    pub host_rules: Vec<HostRuleFile>,
    #[serde(default)]
    pub middleware_services: Vec<MiddlewareFile>,
}

/// `demo:`: start the built-in demo SSE origin on this address.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DemoFile {
    pub listen: ListenAddr,
}

/// `sse:`, globally, per service, and as the `sse` middleware's config. Unset keys inherit.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SseFile {
    pub enabled: Option<bool>,
    pub flush_interval: Option<Dur>,
    /// Longest the origin may take to send the response headers of a stream.
    pub header_timeout: Option<Dur>,
    /// Longest silence from the origin between events.
    pub read_timeout: Option<Dur>,
    pub write_timeout: Option<Dur>,
    /// After this long a stream is ended at an event boundary with a `retry:` hint.
    pub max_lifetime: Option<Dur>,
    /// A tracked stream whose origin sent nothing for this long is closed by the cleanup
    /// task.
    pub inactive_threshold: Option<Dur>,
    /// When the origin has been silent this long, send the client a comment line.
    pub heartbeat_interval: Option<Dur>,
    /// What the client gets when the origin fails mid-stream.
    pub on_upstream_error: Option<OnUpstreamError>,
    /// On shutdown or upgrade, open streams are ended at random moments over this period.
    pub drain_period: Option<Dur>,
    /// The origin honours `Last-Event-ID`: when it fails mid-stream, continue the client's
    /// stream from another origin connection.
    pub resume: Option<bool>,
    /// Most resumes of one stream within `resume_window`.
    pub resume_attempts: Option<u32>,
    pub resume_window: Option<Dur>,
    /// Register every stream (open, close, counters) and log its open and close.
    pub connection_tracking: Option<bool>,
    /// Most event streams open at once under this block.
    pub max_connections: Option<usize>,
    /// Most event streams one client address may have open at once under this block.
    pub max_connections_per_client: Option<usize>,
}

/// `on_upstream_error:` what a client sees when its origin dies mid-stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnUpstreamError {
    /// The stream just ends (HTTP/1.1: without its last chunk, so it reads as cut).
    #[default]
    End,
    /// A last `event: error` with a short JSON reason, then a clean end.
    Event,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceFile {
    /// One origin (`http://host:port/prefix`); or `discovery` for many.
    #[serde(default)]
    pub url: Option<ServiceUrlFile>,
    /// Where the endpoints come from: `static`, `dns` or `file`.
    #[serde(default)]
    pub discovery: Option<crate::discovery::DiscoveryFile>,
    /// `http` or `https`; with `url`, it must agree with the URL's scheme.
    #[serde(default)]
    pub scheme: Option<Scheme>,
    /// TLS to the origin; only on an https service.
    #[serde(default)]
    pub tls: Option<OriginTlsFile>,
    #[serde(default)]
    pub host_header: Option<String>,
    #[serde(default)]
    pub timeouts: Option<TimeoutsFile>,
    #[serde(default)]
    pub sse: Option<SseFile>,
    /// How an endpoint is chosen; default `least_connections` when the service streams
    /// SSE (its `sse` is enabled), else `round_robin`.
    #[serde(default)]
    pub load_balancing: Option<crate::endpoints::Algorithm>,
    /// The input of `consistent_hash`: `client_ip` (default), `header:NAME`,
    /// `cookie:NAME` or `path`.
    #[serde(default)]
    pub hash_key: Option<HashKeyFile>,
    #[serde(default)]
    pub health_check: Option<HealthCheckFile>,
    #[serde(default)]
    pub passive_health: Option<PassiveHealthFile>,
    /// Further endpoints to try when connecting fails (never once a request was sent).
    #[serde(default)]
    pub retries: Option<u32>,
}

/// `hash_key:` what `consistent_hash` hashes.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum HashKeyFile {
    ClientIp,
    Header(http::HeaderName),
    Cookie(String),
    Path,
}

impl TryFrom<String> for HashKeyFile {
    type Error = String;

    fn try_from(raw: String) -> Result<Self, String> {
        match raw.split_once(':') {
            None if raw == "client_ip" => Ok(HashKeyFile::ClientIp),
            None if raw == "path" => Ok(HashKeyFile::Path),
            Some(("header", name)) => http::HeaderName::from_bytes(name.trim().as_bytes())
                .map(HashKeyFile::Header)
                .map_err(|_| format!("`{name}` is not a header name")),
            Some(("cookie", name)) if !name.trim().is_empty() => {
                Ok(HashKeyFile::Cookie(name.trim().to_string()))
            }
            _ => Err(format!(
                "unknown hash key `{raw}`: use client_ip, header:NAME, cookie:NAME or path"
            )),
        }
    }
}

/// `health_check:` active checks of every endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckFile {
    #[serde(rename = "type", default)]
    pub kind: HealthCheckKind,
    /// Path of the HTTP check (default `/`).
    #[serde(default)]
    pub path: Option<String>,
    /// `Host` of the HTTP check (default: the service URL's host).
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub interval: Option<Dur>,
    #[serde(default)]
    pub timeout: Option<Dur>,
    /// Consecutive successes that bring a down endpoint back (default 2).
    #[serde(default)]
    pub healthy_threshold: Option<usize>,
    /// Consecutive failures that take an endpoint out (default 3).
    #[serde(default)]
    pub unhealthy_threshold: Option<usize>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthCheckKind {
    /// A `GET` of `path`; a 2xx or 3xx answer is healthy.
    #[default]
    Http,
    /// A TCP connect.
    Tcp,
}

/// `passive_health:` eject an endpoint after consecutive failures.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PassiveHealthFile {
    #[serde(default)]
    pub failures: Option<u32>,
    #[serde(default)]
    pub cooldown: Option<Dur>,
}

/// `services.<name>.tls`: how the proxy speaks TLS to an https service's origin.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OriginTlsFile {
    /// Verify the certificate chain and name (default true).
    pub verify: Option<bool>,
    /// The server name sent and verified (default: the URL's host).
    pub sni: Option<String>,
    /// PEM bundle of trusted CAs, relative to the file that defines the service (default:
    /// the system's store).
    pub ca_file: Option<String>,
}

/// `services.<name>.timeouts`: for ordinary requests. SSE reads use `sse.read_timeout`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeoutsFile {
    pub connect: Option<Dur>,
    pub read: Option<Dur>,
    pub write: Option<Dur>,
    pub idle: Option<Dur>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostRuleFile {
    pub pattern: HostPatternFile,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub target: Option<String>,
    #[serde(default)]
    pub route_rules: Vec<RouteRuleFile>,
    #[serde(default)]
    pub middlewares: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteRuleFile {
    pub pattern: PathPatternFile,
    #[serde(default)]
    pub name: Option<String>,
    pub target: String,
    #[serde(default)]
    pub middlewares: Vec<String>,
}

/// Newtypes so serde reports parse failures of these values at their position.
macro_rules! parsed_string {
    ($name:ident, $inner:ty) => {
        #[derive(Debug, Clone)]
        pub struct $name(pub $inner);

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let raw = String::deserialize(d)?;
                <$inner>::try_from(raw)
                    .map($name)
                    .map_err(de::Error::custom)
            }
        }
    };
}

parsed_string!(HostPatternFile, HostPattern);
parsed_string!(PathPatternFile, PathPattern);
parsed_string!(ServiceUrlFile, ServiceUrl);

/// A listen address: `host:port` with an IP literal.
#[derive(Debug, Clone, Copy)]
pub struct ListenAddr(pub SocketAddr);

impl ListenAddr {
    fn parse(raw: &str) -> Result<Self, String> {
        raw.parse().map(ListenAddr).map_err(|_| {
            format!(
                "invalid listen address `{raw}`: write an IP and a port, \
                 like `0.0.0.0:8080` or `[::]:8080`"
            )
        })
    }
}

impl<'de> Deserialize<'de> for ListenAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        ListenAddr::parse(&raw).map_err(de::Error::custom)
    }
}

/// One `listen` entry: an address alone (plain HTTP/1.1), or a mapping with `address` and
/// the listener's options.
#[derive(Debug)]
pub enum ListenFile {
    Addr(ListenAddr),
    Full(ListenerFile),
}

impl ListenFile {
    pub fn address(&self) -> SocketAddr {
        match self {
            ListenFile::Addr(a) => a.0,
            ListenFile::Full(l) => l.address.0,
        }
    }
}

impl<'de> Deserialize<'de> for ListenFile {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ListenVisitor;

        impl<'de> Visitor<'de> for ListenVisitor {
            type Value = ListenFile;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an address such as \"0.0.0.0:8080\", or a mapping with `address`")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<ListenFile, E> {
                ListenAddr::parse(v)
                    .map(ListenFile::Addr)
                    .map_err(E::custom)
            }

            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<ListenFile, A::Error> {
                ListenerFile::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(ListenFile::Full)
            }
        }

        d.deserialize_any(ListenVisitor)
    }
}

/// The mapping form of a `listen` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerFile {
    pub address: ListenAddr,
    /// Terminate TLS on this listener.
    #[serde(default)]
    pub tls: Option<TlsFile>,
    /// TLS listeners: offer HTTP/2 by ALPN (default true).
    #[serde(default)]
    pub http2: Option<bool>,
    /// Plain listeners: accept HTTP/2 with prior knowledge beside HTTP/1.1.
    #[serde(default)]
    pub h2c: Option<bool>,
    /// Plain listeners: answer every request with a 308 to its https form.
    #[serde(default)]
    pub redirect_http: Option<bool>,
    /// TCP keepalive on accepted connections: idle time before the first probe; 0 = off.
    #[serde(default)]
    pub tcp_keepalive: Option<Dur>,
}

/// `listen[].tls`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFile {
    pub certificates: Vec<CertificateFile>,
    #[serde(default)]
    pub min_version: Option<TlsVersion>,
}

/// `listen[].tls.certificates[]`: a certificate chain and its key, PEM files relative to
/// the config file. `hosts` (SNI names) default to the certificate's own DNS names.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateFile {
    pub cert: String,
    pub key: String,
    #[serde(default)]
    pub hosts: Option<Vec<HostPatternFile>>,
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

/// `http2:`: settings of every HTTP/2 connection (TLS listeners with `http2`, h2c).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Http2File {
    pub max_concurrent_streams: Option<u32>,
    pub idle_timeout: Option<Dur>,
}

/// A duration: a humantime string (`100ms`, `30s`, `1h`) or `0` for none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl Dur {
    /// `0` means no limit.
    pub fn limit(self) -> Option<Duration> {
        (!self.0.is_zero()).then_some(self.0)
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct DurVisitor;

        impl Visitor<'_> for DurVisitor {
            type Value = Dur;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration such as `100ms` or `30s`, or 0 for none")
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Dur, E> {
                if v == 0 {
                    Ok(Dur(Duration::ZERO))
                } else {
                    Err(E::custom(format!(
                        "a duration needs a unit: write `{v}s` or `{v}ms`, or 0 for none"
                    )))
                }
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Dur, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => Err(E::custom("a duration cannot be negative")),
                }
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Dur, E> {
                if v.trim() == "0" {
                    return Ok(Dur(Duration::ZERO));
                }
                humantime::parse_duration(v.trim())
                    .map(Dur)
                    .map_err(|e| E::custom(format!("invalid duration `{v}`: {e}")))
            }
        }

        d.deserialize_any(DurVisitor)
    }
}
