//! Services: where a route's requests go and how they get there.
//!
//! A [`Service`] is built once per config from `services.<name>`: its URL (host, port,
//! path prefix), the `Host` header policy, its timeouts, its effective SSE settings and its
//! endpoints ([`super::endpoints`]: discovery, health, load balancing). Per request it
//! chooses an endpoint (names are resolved by discovery, never by Pingora's peer, so nothing
//! panics), builds the Pingora peer with the timeouts that fit the request, and rewrites the
//! upstream request (path prefix, `Host`, `X-Forwarded-*`).
//! An `https` service also carries its [`OriginTls`] settings, which [`Service::peer`]
//! applies to the peer.
//!
//! [`Attempts`] is the one home of retries: the endpoints a request has tried and whether a
//! failed connect may go on to another one.
//!
//! A service with `affinity` ([`Affinity`]) sends a request that carries a pinned session
//! value to its pinned endpoint, and learns pins from the responses
//! ([`Service::learn_affinity`]).

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http::header::{HeaderName, HeaderValue, HOST};
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::ErrorType;
use pingora_http::{RequestHeader, ResponseHeader};
use serde::Deserialize;

use pingora_load_balancing::health_check::HealthCheck;

use super::affinity::Affinity;
use super::balancing::{Algorithm, HashKey};
use super::connect::{LocalAddrs, TcpConnect};
use super::discovery::{static_discovery, SystemResolver};
use super::endpoints::{Endpoints, Lease, Timing, Unavailable};
use super::health::PassiveHealth;
use super::origin_tls::OriginTls;
use crate::http_util::{ip_text, AddedHeaders};
use crate::metrics::{Metrics, ServiceMetrics};
use crate::sse::limits::{self, ClientSlots, Slots};
use crate::sse::SseSettings;

/// How often a service URL's host name is resolved again.
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

/// Endpoints for a service given by its `url`: the address itself for an IP literal, else
/// the host name through the system resolver, re-resolved every few seconds.
pub fn url_endpoints(
    service: &str,
    url: &ServiceUrl,
    algorithm: Algorithm,
    health_check: Option<Box<dyn HealthCheck + Send + Sync>>,
    passive: Option<PassiveHealth>,
) -> Endpoints {
    let health_interval = None;
    match url.ip {
        Some(ip) => Endpoints::new(
            service,
            static_discovery(&[(SocketAddr::new(ip, url.port), 1)]),
            health_check,
            algorithm,
            passive,
            Timing {
                refresh: None,
                health_interval,
            },
        ),
        None => Endpoints::new(
            service,
            Box::new(SystemResolver {
                host: url
                    .host
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_string(),
                port: url.port,
            }),
            health_check,
            algorithm,
            passive,
            Timing {
                refresh: Some(DNS_CACHE),
                health_interval,
            },
        ),
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

/// `request_buffer` when the config gives none: as much as an HTTP/2 client may send
/// before its first window update (and Pingora's HTTP/1 read), so a body a client
/// sends without waiting goes whole; a longer one is streamed on from there.
pub const DEFAULT_REQUEST_BUFFER: usize = 64 * 1024;

/// `request_buffer_wait` when the config gives none: a body a program writes in pieces
/// (HTTP/2 DATA frames, chunks) has them within it; an upload that streams on starts
/// that much later.
pub const DEFAULT_REQUEST_BUFFER_WAIT: Duration = Duration::from_millis(20);

/// A named upstream service.
#[derive(Debug)]
pub struct Service {
    pub name: String,
    pub url: ServiceUrl,
    pub host_header: HostHeader,
    pub timeouts: Timeouts,
    pub sse: Arc<SseSettings>,
    /// The counter behind `sse.max_connections` of this service.
    pub sse_limit: Option<Arc<Slots>>,
    /// The counters behind `sse.max_connections_per_client` of this service.
    pub sse_client_limit: Option<Arc<ClientSlots>>,
    pub metrics: Arc<ServiceMetrics>,
    /// The live set of endpoints and how one is chosen.
    pub endpoints: Arc<Endpoints>,
    /// What `consistent_hash` hashes.
    pub hash_key: HashKey,
    /// Further endpoints a request may try when connecting fails.
    pub retries: u32,
    /// Spare connections kept ready to each endpoint a request went to, per worker
    /// thread (`preconnect`; `upstream::connect::Connector::preconnect`).
    pub preconnect: usize,
    /// How many bytes of a request body are gathered before the request goes to the
    /// origin (`request_buffer`): a body that ends within them goes whole with its head.
    pub request_buffer: usize,
    /// How long a body that comes in pieces is waited for before what was gathered goes
    /// and the rest is streamed (`request_buffer_wait`).
    pub request_buffer_wait: Duration,
    /// Where the endpoints come from, for `-t` (`None`: the URL).
    pub discovery: Option<String>,
    /// TLS to the origin: set exactly when the service is `https`.
    pub tls: Option<OriginTls>,
    /// Session affinity (`affinity:`): requests carrying a pinned session value go to the
    /// endpoint that issued it.
    pub affinity: Option<Affinity>,
    /// What the config's author should know about this service although it is valid
    /// (file, line, key and why), for `-t` and the log.
    pub warnings: Vec<String>,
    /// The local addresses its connections are made from (the top-level
    /// `client_bind_to_ipv4` and `client_bind_to_ipv6`).
    pub local_addrs: Arc<LocalAddrs>,
    /// The connect every peer of this service uses, made at the first request (after the
    /// config has set `timeouts`), shared by the rest.
    connect: OnceLock<Arc<TcpConnect>>,
}

impl Service {
    /// A service whose limit counters and metrics belong to `limits` and `metrics` (the
    /// server instance's).
    /// `host_header` starts as passthrough and `timeouts` as the defaults.
    pub fn new(
        name: String,
        url: ServiceUrl,
        sse: SseSettings,
        endpoints: Arc<Endpoints>,
        limits: &limits::Registry,
        metrics: &Metrics,
    ) -> Self {
        let sse_limit = sse
            .max_connections
            .map(|max| limits.slots(&format!("service:{name}"), max));
        let metrics = metrics.service(&name);
        let sse_client_limit = sse
            .max_connections_per_client
            .map(|max| limits.client_slots(&format!("service:{name}"), max));
        Service {
            name,
            url,
            host_header: HostHeader::Passthrough,
            timeouts: Timeouts::default(),
            sse: Arc::new(sse),
            sse_limit,
            sse_client_limit,
            metrics,
            endpoints,
            hash_key: HashKey::ClientIp,
            retries: 0,
            preconnect: 0,
            request_buffer: DEFAULT_REQUEST_BUFFER,
            request_buffer_wait: DEFAULT_REQUEST_BUFFER_WAIT,
            discovery: None,
            tls: None,
            affinity: None,
            warnings: Vec::new(),
            local_addrs: Arc::default(),
            connect: OnceLock::new(),
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
        let endpoints = Arc::new(url_endpoints(name, &url, Algorithm::RoundRobin, None, None));
        Service::new(
            name.to_string(),
            url,
            SseSettings::default(),
            endpoints,
            &limits::Registry::default(),
            &Metrics::new(),
        )
    }

    /// The hash input of `consistent_hash` for request `req` from `client`.
    pub fn hash_input(&self, req: &RequestHeader, client: Option<IpAddr>) -> Vec<u8> {
        match &self.hash_key {
            HashKey::ClientIp => client
                .map(|ip| ip.to_string().into_bytes())
                .unwrap_or_default(),
            HashKey::Header(name) => req
                .headers
                .get(name)
                .map(|v| v.as_bytes().to_vec())
                .unwrap_or_default(),
            HashKey::Cookie(name) => crate::http_util::request_cookie(req, name)
                .map(<[u8]>::to_vec)
                .unwrap_or_default(),
            HashKey::Path => req.uri.path().as_bytes().to_vec(),
        }
    }

    /// Chooses the endpoint for a request that has already failed on `tried` (of which
    /// `refused` refused the connection); the error is the status and reason to answer
    /// with. A request carrying a pinned session value goes to its pinned endpoint while
    /// that is up and has not refused it.
    pub async fn choose(
        &self,
        req: &RequestHeader,
        client: Option<IpAddr>,
        tried: &[SocketAddr],
        refused: &[SocketAddr],
    ) -> Result<Lease, Box<pingora_error::Error>> {
        let key = match self.endpoints.algorithm() {
            Algorithm::ConsistentHash => self.hash_input(req, client),
            _ => Vec::new(),
        };
        let pinned = self
            .affinity
            .as_ref()
            .and_then(|a| Some((a, a.session(req)?)));
        let chosen = match pinned {
            Some((affinity, value)) => {
                affinity
                    .choose(&self.endpoints, value, &key, tried, refused)
                    .await
            }
            None => self.endpoints.choose(&key, tried).await,
        };
        chosen.map_err(|why| {
            let name = &self.name;
            match why {
                Unavailable::NoEndpoints(detail) => crate::error::http_error(
                    503,
                    format!("service `{name}`: no endpoint available ({detail})"),
                ),
                // The origin cannot be reached at all: a gateway failure, as a refused
                // connection is.
                Unavailable::DiscoveryFailed(detail) => crate::error::http_error(
                    502,
                    format!("service `{name}`: no endpoint available: {detail}"),
                ),
                Unavailable::AllDown => crate::error::http_error(
                    503,
                    format!("service `{name}`: every endpoint is down"),
                ),
                Unavailable::Exhausted => crate::error::http_error(
                    502,
                    format!(
                        "service `{name}`: connecting failed on every endpoint tried ({})",
                        tried.len()
                    ),
                ),
            }
        })
    }

    /// Learns session affinity from the response header `resp` to `req`, which endpoint
    /// `from` sent (every response header, whichever loop carries the request).
    pub fn learn_affinity(&self, req: &RequestHeader, resp: &ResponseHeader, from: SocketAddr) {
        if let Some(affinity) = &self.affinity {
            affinity.learn(self.endpoints.pins(), req, resp, from);
        }
    }

    /// How the service's endpoints are connected to over TCP (under TLS too).
    pub fn tcp(&self) -> &Arc<TcpConnect> {
        self.connect.get_or_init(|| {
            Arc::new(TcpConnect {
                timeout: self.timeouts.connect,
                local: self.local_addrs.clone(),
            })
        })
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
        peer.group_key ^= self.local_addrs.key();
        let options = &mut peer.options;
        options.connection_timeout = self.timeouts.connect;
        options.custom_l4 = Some(self.tcp().clone());
        options.read_timeout = match sse {
            Some(sse) => sse.read_timeout,
            None => self.timeouts.read,
        };
        options.write_timeout = self.timeouts.write;
        options.idle_timeout = self.timeouts.idle;
        Box::new(peer)
    }

    /// Rewrites the request the origin will see: joins the service's path prefix and
    /// applies the `Host` policy; replaces what the client sent as forwarding headers with
    /// the proxy's own, which `added` writes with the head: `peer` (the TCP peer) is
    /// appended to `X-Forwarded-For`, as every proxy on the way does; `X-Real-IP` is
    /// `client`, the address seen through the trusted proxies.
    pub fn rewrite_request(
        &self,
        req: &mut RequestHeader,
        added: &mut AddedHeaders,
        peer: Option<IpAddr>,
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
            HostHeader::Passthrough => match &original_host {
                Some(host) => {
                    if req.headers.get(HOST).is_none() {
                        req.insert_header(HOST, host.as_str())?;
                    }
                }
                // An HTTP/1.0 client may name no host; HTTP/1.1 to the origin needs one.
                None => req.insert_header(HOST, self.url.authority())?,
            },
            HostHeader::Fixed(value) => req.insert_header(HOST, value.clone())?,
        }
        // Without proxies in front, both headers name the peer: it is formatted once.
        let peer_text = peer.map(ip_text);
        let real_ip = client.or(peer).map(|ip| match &peer_text {
            Some(text) if Some(ip) == peer => text.clone(),
            _ => ip_text(ip),
        });
        let forwarded_for = peer_text.map(|ip| {
            // Append to what earlier proxies recorded, across repeated header lines.
            let mut forwarded = String::new();
            for prior in req.headers.get_all(&X_FORWARDED_FOR) {
                if let Ok(prior) = prior.to_str() {
                    forwarded.push_str(prior.trim());
                    forwarded.push_str(", ");
                }
            }
            if forwarded.is_empty() {
                ip
            } else {
                forwarded + &ip
            }
        });
        added.set_forwarding(req, forwarded_for, real_ip, proto, original_host);
        Ok(())
    }
}

/// The endpoints one request has tried, and whether another one may be tried after a
/// failed connect: at most `retries` more, and never once the request was sent (a request
/// that reached an origin may have had effects there). A request sent to its pinned
/// endpoint (affinity) moves only when that endpoint refused the connection: a timeout or
/// a failed handshake may be passing, and another endpoint does not know the session.
#[derive(Debug, Default)]
pub struct Attempts {
    tried: Vec<SocketAddr>,
    /// The endpoints of `tried` that refused the connection.
    refused: Vec<SocketAddr>,
    retries_left: u32,
}

impl Attempts {
    pub fn new(retries: u32) -> Self {
        Attempts {
            tried: Vec::new(),
            refused: Vec::new(),
            retries_left: retries,
        }
    }

    /// Attempts that stay away from `addr` (a stream resuming after its origin failed),
    /// unless the request's session is pinned there.
    pub fn avoiding(addr: SocketAddr) -> Self {
        Attempts {
            tried: vec![addr],
            refused: Vec::new(),
            retries_left: 0,
        }
    }

    /// Chooses an endpoint of `service` the request `req` from `client` has not tried yet
    /// (or its pinned one).
    pub async fn next(
        &mut self,
        service: &Service,
        req: &RequestHeader,
        client: Option<IpAddr>,
    ) -> Result<Lease, Box<pingora_error::Error>> {
        let lease = service
            .choose(req, client, &self.tried, &self.refused)
            .await?;
        self.tried.push(lease.addr);
        Ok(lease)
    }

    /// The endpoint chosen last.
    pub fn last(&self) -> Option<SocketAddr> {
        self.tried.last().copied()
    }

    /// Connecting to `lease` failed with `e`: the failure counts toward the endpoint's
    /// passive health, and the answer says whether another endpoint may be tried.
    pub fn connect_failed(&mut self, lease: &Lease, e: &pingora_error::Error) -> bool {
        lease.failed();
        let refused = e.etype() == &ErrorType::ConnectRefused;
        if refused {
            self.refused.push(lease.addr);
        }
        if self.retries_left == 0 {
            return false;
        }
        if lease.pinned() && !refused {
            log::info!(
                "not retrying elsewhere: the session is pinned to {}, which failed with {e}",
                lease.addr
            );
            return false;
        }
        self.retries_left -= 1;
        log::info!("retrying on another endpoint after {}: {e}", lease.addr);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::discovery::static_discovery;
    use crate::upstream::endpoints::Timing;

    /// Every peer of a service connects with one connector, which carries the service's
    /// connect timeout: nothing is allocated for it per request.
    #[test]
    fn peers_share_the_services_connect_and_its_timeout() {
        let mut service = Service::for_tests("t");
        service.timeouts.connect = Some(Duration::from_millis(250));
        let addr = SocketAddr::from(([127, 0, 0, 1], 1));
        let connect = |peer: &HttpPeer| peer.options.custom_l4.clone().expect("a connect");
        let (one, two) = (service.peer(addr, None), service.peer(addr, None));
        assert!(Arc::ptr_eq(&connect(&one), &connect(&two)));
        let shown = format!("{:?}", connect(&one));
        assert!(shown.contains("250ms"), "{shown}");
    }

    /// Connections made from other local addresses (`client_bind_to_ipv4`, changed by a
    /// reload) are pooled apart: a peer's pool key follows the addresses; none set keeps
    /// the key a service without them has.
    #[test]
    fn the_local_addresses_are_part_of_the_pool_key() {
        use pingora_core::upstreams::peer::Peer;
        let addr = SocketAddr::from(([127, 0, 0, 1], 1));
        let key = |local: Option<[u8; 4]>| {
            let mut service = Service::for_tests("t");
            if let Some(ip) = local {
                service.local_addrs = Arc::new(LocalAddrs::new(vec![ip.into()], Vec::new()));
            }
            service.peer(addr, None).reuse_hash()
        };
        let (none, two, three) = (
            key(None),
            key(Some([127, 0, 0, 2])),
            key(Some([127, 0, 0, 3])),
        );
        assert_ne!(two, three);
        assert_ne!(none, two);
        assert_eq!(
            key(Some([127, 0, 0, 2])),
            two,
            "the same addresses, the same key"
        );
    }

    #[tokio::test]
    async fn a_pinned_request_moves_only_when_its_endpoint_refused() {
        let a = SocketAddr::from(([127, 0, 0, 1], 1));
        let b = SocketAddr::from(([127, 0, 0, 1], 2));
        let endpoints = Endpoints::new(
            "t",
            static_discovery(&[(a, 1), (b, 1)]),
            None,
            Algorithm::RoundRobin,
            None,
            Timing {
                refresh: None,
                health_interval: None,
            },
        );
        let error = |etype| pingora_error::Error::new(etype);
        let pinned = endpoints
            .choose_pinned(b"", &[], Some(a))
            .await
            .expect("lease");
        let mut attempts = Attempts::new(3);
        for etype in [
            ErrorType::ConnectTimedout,
            ErrorType::TLSHandshakeFailure,
            ErrorType::ConnectNoRoute,
        ] {
            let e = error(etype);
            assert!(!attempts.connect_failed(&pinned, &e), "{e}");
        }
        assert!(attempts.connect_failed(&pinned, &error(ErrorType::ConnectRefused)));
        assert_eq!(attempts.refused, vec![a]);
        let balanced = endpoints.choose(b"", &[]).await.expect("lease");
        assert!(attempts.connect_failed(&balanced, &error(ErrorType::ConnectTimedout)));
    }
}
