//! Services: where a route's requests go and how they get there.
//!
//! A [`Service`] is built once per config from `services.<name>`: its URL (host, port,
//! path prefix), the `Host` header policy, its timeouts and its effective SSE settings.
//! Per request it resolves the address (IP literals at load time, names through the
//! system resolver with a short cache, never panicking), builds the Pingora peer with the
//! timeouts that fit the request, and rewrites the upstream request (path prefix, `Host`,
//! `X-Forwarded-*`). An `https` service also carries its [`OriginTls`] settings, which
//! [`Service::peer`] applies to the peer.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, HOST};
use pingora_core::upstreams::peer::HttpPeer;
use pingora_http::RequestHeader;
use serde::Deserialize;

use crate::metrics::ServiceMetrics;
use crate::origin_tls::OriginTls;
use crate::sse::limits::{self, ClientSlots, Slots};
use crate::sse::SseSettings;

/// How long a resolved host name is reused before asking the resolver again.
const DNS_CACHE: Duration = Duration::from_secs(5);

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// How the proxy talks to a service's origins: `services.<name>.scheme`, or the URL's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheme {
    #[default]
    Http,
    /// TLS to the origin (see [`OriginTls`]).
    Https,
}

impl Scheme {
    pub fn default_port(self) -> u16 {
        match self {
            Scheme::Http => 80,
            Scheme::Https => 443,
        }
    }
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        })
    }
}

/// `services.<name>.url`, parsed: `http[s]://host[:port][/prefix]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceUrl {
    pub scheme: Scheme,
    pub host: String,
    pub port: u16,
    /// Path prefix without a trailing slash; empty when the URL has no path.
    pub prefix: String,
    ip: Option<IpAddr>,
}

impl TryFrom<String> for ServiceUrl {
    type Error = String;

    fn try_from(raw: String) -> Result<Self, String> {
        let bad = |why: &str| format!("invalid service URL `{raw}`: {why}");
        let uri: http::Uri = raw.parse().map_err(|e| bad(&format!("{e}")))?;
        let scheme = match uri.scheme_str() {
            Some("http") => Scheme::Http,
            Some("https") => Scheme::Https,
            Some(other) => {
                return Err(bad(&format!(
                    "unsupported scheme `{other}`, use http:// or https://"
                )))
            }
            None => return Err(bad("missing scheme, write http://host:port")),
        };
        let authority = uri.authority().ok_or_else(|| bad("missing host"))?;
        if authority.as_str().contains('@') {
            return Err(bad("user info is not allowed in a service URL"));
        }
        let host = authority.host().to_string();
        if host.is_empty() {
            return Err(bad("missing host"));
        }
        if uri.query().is_some() {
            return Err(bad("a query string is not allowed in a service URL"));
        }
        let port = authority.port_u16().unwrap_or(scheme.default_port());
        let ip = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .ok();
        Ok(ServiceUrl {
            scheme,
            host,
            port,
            prefix: uri.path().trim_end_matches('/').to_string(),
            ip,
        })
    }
}

impl ServiceUrl {
    /// `host:port`, or `host` alone for the scheme's default port, as a `Host` header
    /// would carry it.
    pub fn authority(&self) -> String {
        if self.port == self.scheme.default_port() {
            self.host.clone()
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The host as an IP address, when it is an IP literal.
    pub fn ip(&self) -> Option<IpAddr> {
        self.ip
    }
}

/// `scheme://authority/prefix`, as `-t` and the admin API show it.
impl fmt::Display for ServiceUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}{}", self.scheme, self.authority(), self.prefix)
    }
}

/// What `Host` the origin sees: `services.<name>.host_header`.
#[derive(Debug, Clone)]
pub enum HostHeader {
    /// The client's `Host` (the default).
    Passthrough,
    /// A fixed value: the service URL's authority for `upstream`, or a literal.
    Fixed(HeaderValue),
}

/// Timeouts for ordinary (non-SSE) requests. `None` means no limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timeouts {
    pub connect: Option<Duration>,
    /// Longest wait for the response header and between body reads.
    pub read: Option<Duration>,
    pub write: Option<Duration>,
    /// How long an idle upstream keep-alive connection stays in the pool.
    pub idle: Option<Duration>,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Some(Duration::from_secs(5)),
            read: Some(Duration::from_secs(60)),
            write: Some(Duration::from_secs(60)),
            idle: Some(Duration::from_secs(60)),
        }
    }
}

#[derive(Debug)]
struct Resolved {
    addr: SocketAddr,
    at: Instant,
}

/// A named upstream service.
#[derive(Debug)]
pub struct Service {
    pub name: String,
    pub url: ServiceUrl,
    pub host_header: HostHeader,
    pub timeouts: Timeouts,
    pub sse: SseSettings,
    /// The counter behind `sse.max_connections` of this service.
    pub sse_limit: Option<Arc<Slots>>,
    /// The counters behind `sse.max_connections_per_client` of this service.
    pub sse_client_limit: Option<Arc<ClientSlots>>,
    pub metrics: Arc<ServiceMetrics>,
    /// TLS to the origin: set exactly when the service is `https`.
    pub tls: Option<OriginTls>,
    resolved: ArcSwapOption<Resolved>,
}

impl Service {
    pub fn new(
        name: String,
        url: ServiceUrl,
        host_header: HostHeader,
        timeouts: Timeouts,
        sse: SseSettings,
    ) -> Self {
        let sse_limit = sse
            .max_connections
            .map(|max| limits::slots(&format!("service:{name}"), max));
        let metrics = crate::metrics::service(&name);
        let sse_client_limit = sse
            .max_connections_per_client
            .map(|max| limits::client_slots(&format!("service:{name}"), max));
        Service {
            name,
            url,
            host_header,
            timeouts,
            sse,
            sse_limit,
            sse_client_limit,
            metrics,
            tls: None,
            resolved: ArcSwapOption::empty(),
        }
    }

    /// Sets the TLS settings of an `https` service.
    pub fn with_tls(mut self, tls: Option<OriginTls>) -> Self {
        self.tls = tls;
        self
    }

    #[cfg(test)]
    pub fn for_tests(name: &str) -> Self {
        let url = ServiceUrl::try_from("http://127.0.0.1:1".to_string()).expect("test url");
        Service::new(
            name.to_string(),
            url,
            HostHeader::Passthrough,
            Timeouts::default(),
            SseSettings::default(),
        )
    }

    /// The address to connect to. Host names go through the system resolver, cached for a
    /// few seconds; a failure is an error message, never a panic.
    pub async fn address(&self) -> Result<SocketAddr, String> {
        if let Some(ip) = self.url.ip {
            return Ok(SocketAddr::new(ip, self.url.port));
        }
        if let Some(cached) = self.resolved.load().as_deref() {
            if cached.at.elapsed() < DNS_CACHE {
                return Ok(cached.addr);
            }
        }
        let host = self.url.host.as_str();
        let addr = tokio::net::lookup_host((host, self.url.port))
            .await
            .map_err(|e| format!("cannot resolve `{host}`: {e}"))?
            .next()
            .ok_or_else(|| format!("`{host}` resolves to no address"))?;
        self.resolved.store(Some(Arc::new(Resolved {
            addr,
            at: Instant::now(),
        })));
        Ok(addr)
    }

    /// The Pingora peer for one request. An SSE request (`sse` holds its effective
    /// settings) reads with the SSE read timeout (usually none), because Pingora fixes an
    /// upstream connection's read timeout when the request is sent. An `https` service's
    /// peer speaks TLS with the service's SNI, verification and CA (see [`OriginTls`]).
    pub fn peer(&self, addr: SocketAddr, sse: Option<&SseSettings>) -> Box<HttpPeer> {
        let sni = self
            .tls
            .as_ref()
            .map_or_else(String::new, |t| t.sni.clone());
        let mut peer = HttpPeer::new(addr, self.tls.is_some(), sni);
        if let Some(tls) = &self.tls {
            tls.apply(&mut peer);
        }
        let options = &mut peer.options;
        options.connection_timeout = self.timeouts.connect;
        options.read_timeout = match sse {
            Some(sse) => sse.read_timeout,
            None => self.timeouts.read,
        };
        options.write_timeout = self.timeouts.write;
        options.idle_timeout = self.timeouts.idle;
        Box::new(peer)
    }

    /// Rewrites the request the origin will see: joins the service's path prefix, applies
    /// the `Host` policy and sets the forwarding headers.
    pub fn rewrite_request(
        &self,
        req: &mut RequestHeader,
        client: Option<IpAddr>,
        proto: &'static str,
    ) -> pingora_error::Result<()> {
        let original_host = req
            .uri
            .authority()
            .map(|a| a.as_str().to_string())
            .or_else(|| {
                req.headers
                    .get(HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_string)
            });
        if !self.url.prefix.is_empty() || req.uri.authority().is_some() {
            let path = req.uri.path_and_query().map_or("/", |pq| pq.as_str());
            let joined = format!("{}{}", self.url.prefix, path);
            let uri = http::Uri::try_from(joined).map_err(|e| {
                crate::error::http_error(400, format!("cannot build the upstream path: {e}"))
            })?;
            req.set_uri(uri);
        }
        match &self.host_header {
            HostHeader::Passthrough => {
                if let Some(host) = &original_host {
                    if req.headers.get(HOST).is_none() {
                        req.insert_header(HOST, host.as_str())?;
                    }
                }
            }
            HostHeader::Fixed(value) => req.insert_header(HOST, value.clone())?,
        }
        if let Some(ip) = client {
            let ip = ip.to_string();
            // Append to what earlier proxies recorded, across repeated header lines.
            let mut forwarded = String::new();
            for prior in req.headers.get_all(&X_FORWARDED_FOR) {
                if let Ok(prior) = prior.to_str() {
                    forwarded.push_str(prior.trim());
                    forwarded.push_str(", ");
                }
            }
            forwarded.push_str(&ip);
            req.insert_header(Bytes::from_static(b"X-Forwarded-For"), forwarded)?;
            req.insert_header(Bytes::from_static(b"X-Real-IP"), ip)?;
        }
        req.insert_header(Bytes::from_static(b"X-Forwarded-Proto"), proto)?;
        if let Some(host) = original_host {
            req.insert_header(Bytes::from_static(b"X-Forwarded-Host"), host)?;
        }
        Ok(())
    }
}
