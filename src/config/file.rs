//! The config files as written: serde structs that reject unknown keys.
//!
//! Values that can be checked on their own (URLs, patterns, durations, addresses) are parsed
//! here, so their errors carry serde_yaml's line and column. Cross-references (service
//! names) are resolved in [`super::build`], which locates its errors by key path. Blocks
//! that belong to one part of the proxy are that part's own types, used here as they are:
//! `sse` ([`SseFile`]), `discovery`, `health_check`, `passive_health` and `affinity` (in
//! `upstream`), `middleware_services` entries (in `middleware`).

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

use crate::listen::TlsVersion;
use crate::middleware::size_limit::ByteSize;
pub use crate::middleware::MiddlewareFile;
use crate::pattern::{HostPattern, PathPattern};
pub use crate::sse::SseFile;
use crate::upstream::discovery::DiscoveryFile;
use crate::upstream::health::{HealthCheckFile, PassiveHealthFile};
use crate::upstream::{AffinityFile, Algorithm, HashKey, Scheme, ServiceUrl};
use crate::values::{AccessLogFormat, Dur};

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
    "trusted_proxies",
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
    /// Proxies in front of streamgate whose `X-Forwarded-For` names the client.
    #[serde(default)]
    pub trusted_proxies: Vec<crate::http_util::Net>,
}

/// `admin:`: the admin listener (health, config, routes, streams, reload, metrics).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminFile {
    pub listen: ListenAddr,
    /// The bearer token, inline. Required (in one of its three forms) when `listen` is not
    /// a loopback address.
    #[serde(default)]
    pub token: Option<String>,
    /// The token from this environment variable.
    #[serde(default)]
    pub token_env: Option<String>,
    /// The token from this file (surrounding whitespace trimmed), relative to the config
    /// file.
    #[serde(default)]
    pub token_file: Option<String>,
    /// With a token: `/healthz` and `/readyz` still answer without it (orchestrator
    /// probes). Default false.
    #[serde(default)]
    pub open_probes: Option<bool>,
    /// Host names besides the listener's own address and `localhost` that requests may
    /// name in `Host` (the admin API refuses others: DNS rebinding).
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceFile {
    /// One origin (`http://host:port/prefix`); or `discovery` for many.
    #[serde(default)]
    pub url: Option<ServiceUrlFile>,
    /// Where the endpoints come from: `static`, `dns` or `file`.
    #[serde(default)]
    pub discovery: Option<DiscoveryFile>,
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
    pub load_balancing: Option<Algorithm>,
    /// The input of `consistent_hash`: `client_ip` (default), `header:NAME`,
    /// `cookie:NAME` or `path`.
    #[serde(default)]
    pub hash_key: Option<HashKey>,
    #[serde(default)]
    pub health_check: Option<HealthCheckFile>,
    #[serde(default)]
    pub passive_health: Option<PassiveHealthFile>,
    /// Further endpoints to try when connecting fails (never once a request was sent).
    #[serde(default)]
    pub retries: Option<u32>,
    /// Spare connections to each endpoint in use, made ahead of the requests that take
    /// them, per worker thread (default 0: none).
    #[serde(default)]
    pub preconnect: Option<usize>,
    /// How much of a request body is gathered before the request goes to the origin
    /// (default 64 KiB; 0: streamed from its first byte).
    #[serde(default)]
    pub request_buffer: Option<ByteSize>,
    /// How long a body that comes in pieces is gathered before it is streamed (default
    /// 20ms, at most 60s).
    #[serde(default)]
    pub request_buffer_wait: Option<Dur>,
    /// Session affinity learned from responses: `header: NAME` or `cookie: NAME`, `ttl`,
    /// `max_entries`.
    #[serde(default)]
    pub affinity: Option<AffinityFile>,
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
    /// PEM certificate (its chain after it) presented to an origin that asks for one, and
    /// its PEM private key; relative to the file that defines the service.
    pub client_cert: Option<String>,
    pub client_key: Option<String>,
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
    /// Hand a new connection over once its client has sent something, or this long after
    /// it connected (whole seconds; 0, the default: at once).
    #[serde(default)]
    pub defer_accept: Option<Dur>,
    /// Client connections open at once on this listener; one more is closed as it is
    /// accepted. Default: what the open-file limit leaves room for.
    #[serde(default)]
    pub max_connections: Option<usize>,
    /// A client connection that sends nothing for this long while no request is in
    /// progress closes (default 60s, whole seconds; 0 = never).
    #[serde(default)]
    pub idle_timeout: Option<Dur>,
    /// An HTTP/1.x client that has started a request (any, on a kept-alive connection
    /// too) must have sent its whole head within this (default 10s; 0 = no limit).
    #[serde(default)]
    pub request_header_timeout: Option<Dur>,
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

/// `http2:`: settings of every HTTP/2 connection (TLS listeners with `http2`, h2c).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Http2File {
    pub max_concurrent_streams: Option<u32>,
    pub idle_timeout: Option<Dur>,
}
