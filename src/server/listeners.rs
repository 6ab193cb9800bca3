//! The Pingora services that serve the listeners (see `listen` for what each one is), the
//! certificate resolver of TLS listeners, and the redirect-to-https app.
//!
//! Pingora sets HTTP/2 options (`h2c`, the idle timeout, the h2 settings) per service,
//! not per listener, so listeners are grouped: one proxy service for TLS listeners and
//! plain HTTP/1.1 ones, a second for plain listeners that also take HTTP/2 with prior
//! knowledge (`h2c`), and for each `redirect_http` listener a small service that answers
//! every request with a 308 to the https form. Each proxy service runs as one copy per
//! worker thread (see [`workers`]). The proxy services share one config handle and one
//! state, so a reload reaches every listener at once and limits count across threads.
//! Every listening socket is made here, when the service that listens on it starts, with
//! the listener's TCP keepalive and `defer_accept` set on it once, and every listener is
//! accepted on by streamgate's loop (`accept`; see [`Listening`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, HOST, LOCATION};
use http::{Response, StatusCode};
use pingora_core::apps::http_app::ServeHttp;
use pingora_core::apps::HttpServerOptions;
use pingora_core::apps::ServerApp;
use pingora_core::listeners::tls::TlsSettings;
use pingora_core::listeners::ALPN;
use pingora_core::protocols::http::v2::server::default_h2_options;
use pingora_core::protocols::http::ServerSession;
use pingora_core::server::configuration::ServerConf;
use pingora_core::server::{Fds, ListenFds, ShutdownWatch};
use pingora_core::services::{Service as ServiceTrait, ServiceWithDependents};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use socket2::SockRef;

use super::accept::{self, Inbox, Spread};
use super::admission::Admitting;
use super::carrying::Carrying;
use crate::config::Config;
use crate::listen::admission::{Gate, Workers};
use crate::listen::{Listener, ListenerKind, ListenerTls};
use crate::proxy::StreamGate;
use crate::relay::client::Handback;
use crate::state::State;

/// Keepalive probes sent before a silent peer is given up.
const KEEPALIVE_PROBES: u32 = 6;

/// The services serving `config`'s listeners, sharing `current`.
pub fn services(
    server_conf: &Arc<ServerConf>,
    config: &Config,
    current: &Arc<ArcSwap<Config>>,
    state: &Arc<State>,
) -> Vec<Box<dyn ServiceWithDependents>> {
    let mut services: Vec<Box<dyn ServiceWithDependents>> = Vec::new();
    for h2c in [false, true] {
        let group: Vec<&Listener> = config
            .listeners
            .iter()
            .filter(|l| match l.kind {
                ListenerKind::Plain { h2c: on } => on == h2c,
                ListenerKind::Tls { .. } => !h2c,
                ListenerKind::Redirect { .. } => false,
            })
            .filter(|l| {
                let missing =
                    matches!(l.kind, ListenerKind::Tls { .. }) && !config.tls.contains_key(&l.addr);
                if missing {
                    log::error!("{}: no certificates loaded; not listening", l.addr);
                }
                !missing
            })
            .collect();
        if group.is_empty() {
            continue;
        }
        let name = if h2c { "streamgate h2c" } else { "streamgate" };
        let gates: Vec<Arc<Gate>> = group.iter().map(|l| Gate::new(l, &state.metrics)).collect();
        let workers = workers(server_conf);
        // Connections spread over the workers (see `accept::Spread`).
        let spreading = (workers > 1).then(|| {
            let inboxes: HashMap<String, Arc<[Inbox]>> = group
                .iter()
                .map(|l| {
                    let inboxes: Arc<[Inbox]> = (0..workers).map(|_| Inbox::default()).collect();
                    (l.addr.to_string(), inboxes)
                })
                .collect();
            (Workers::new(workers), Arc::new(inboxes))
        });
        for worker in 0..workers {
            let handback = Arc::new(Handback::default());
            let mut app = pingora_proxy::http_proxy(
                server_conf,
                StreamGate::new(
                    current.clone(),
                    state.clone(),
                    server_conf,
                    handback.clone(),
                ),
            );
            let mut options = HttpServerOptions::default();
            options.h2c = h2c;
            options.h2_idle_timeout = config.http2.idle_timeout;
            app.server_options = Some(options);
            let mut h2 = default_h2_options();
            h2.max_concurrent_streams(config.http2.max_concurrent_streams);
            app.h2_options = Some(h2);
            let mut admitting =
                Admitting::new(Carrying::new(app), gates.clone()).handing_back(handback);
            if let Some((spread, _)) = &spreading {
                admitting = admitting.worker(spread.clone(), worker);
            }
            let mut proxy = Listening::new(
                if workers == 1 {
                    name.to_string()
                } else {
                    format!("{name} {worker}")
                },
                admitting,
            );
            if let Some((spread, inboxes)) = &spreading {
                proxy = proxy.spread(spread.clone(), worker, inboxes.clone());
            }
            if !server_conf.work_stealing {
                proxy = proxy.one_thread();
            }
            for listener in &group {
                proxy = match listener.kind {
                    ListenerKind::Tls { http2 } => {
                        match tls_settings(listener, http2, config, current) {
                            Some(settings) => proxy.tls(listener.addr, settings),
                            None => proxy,
                        }
                    }
                    _ => proxy.plain(listener.addr),
                };
            }
            if worker == 0 {
                proxy = proxy.owner(&group);
            }
            services.push(Box::new(proxy));
        }
    }

    for listener in &config.listeners {
        if let ListenerKind::Redirect { https_port } = listener.kind {
            let gate = Gate::new(listener, &state.metrics);
            let redirect = Listening::new(
                format!("streamgate redirect {}", listener.addr),
                Admitting::new(Redirect { https_port }, vec![gate]),
            );
            services.push(Box::new(redirect.plain(listener.addr).owner(&[listener])));
        }
    }
    services
}

/// How many copies of each proxy service run. Pingora's single-threaded runtimes
/// (`work_stealing: false`, the default) hand every accepted connection to a random thread
/// and leave its socket registered with the accepting thread's reactor, so each readiness
/// of the client's socket, and often each accept, wakes a second thread. One copy per
/// thread, each with a runtime of one thread, accepts on that thread (all copies share the
/// listening socket) and keeps the whole connection there: its client socket, its origin
/// connections and the pool they return to (one per copy, as in nginx's workers). With
/// work stealing, one service uses all the threads.
fn workers(server_conf: &ServerConf) -> usize {
    if server_conf.work_stealing {
        1
    } else {
        server_conf.threads.max(1)
    }
}

/// How long a copy waits for the first copy's listening sockets.
const FIRST_COPY_WAIT: Duration = Duration::from_secs(10);

/// How many times an address in use is tried, [`BIND_RETRY`] apart, before giving up: a
/// process going away may still hold it for a moment.
const BIND_TRIES: usize = 5;
const BIND_RETRY: Duration = Duration::from_millis(500);

/// A listening service: an app, the addresses it listens on (plain or TLS), and the
/// sockets streamgate prepares for them; each address is accepted on by streamgate's loop
/// (see `accept`). Pingora runs it as it runs its own listening services: on a runtime of
/// its own (one thread, unless work stealing is on), handing it the table of listening
/// sockets (passed on to the next process by a `-u` upgrade) and the shutdown signal.
///
/// The service that owns an address (the first copy of a proxy service, a redirect, the
/// admin listener, the demo origin) makes its socket when it starts, unless the table
/// has one (as after a `-u` upgrade), and sets the listener's TCP keepalive
/// (`tcp_keepalive`) on it once: every connection accepted on it inherits the setting,
/// where Pingora would set it on each accepted connection with five system calls.
/// `defer_accept` is set there too (see [`set_defer_accept`]). A socket handed over by
/// `-u` gets this process's settings. An address that cannot be listened on ends the
/// process with the reason. The owner accepts on the table's socket and closes it when it
/// stops (after a `-u` upgrade has sent it on): new connections are refused from then on.
///
/// A later copy of a proxy service accepts on the same sockets, through duplicates of
/// the owner's descriptors that it owns and closes; the shared table holds only the
/// owner's.
pub struct Listening<A> {
    name: String,
    threads: Option<usize>,
    app: Arc<A>,
    /// Each address, with its TLS settings if it is a TLS one (made into an acceptor when
    /// the service starts).
    addresses: Vec<(String, Option<TlsSettings>)>,
    role: Role,
    /// With several workers: the group's, this copy's place among them, and each
    /// address's inboxes (see `accept::Spread`).
    spread: Option<(Arc<Workers>, usize, Inboxes)>,
}

/// Each address of a listener group, and the inbox of each worker's loop on it.
type Inboxes = Arc<HashMap<String, Arc<[Inbox]>>>;

enum Role {
    /// Makes the sockets: each address, as the service names it, and what is set on it.
    Owner(Vec<(String, SocketSettings)>),
    /// Accepts on the owner's sockets, through duplicates.
    Copy,
}

/// What is set on a listening socket once, for every connection it accepts: the
/// listener's `tcp_keepalive` (inherited by accepted sockets) and `defer_accept` (the
/// kernel hands a connection over once its client has sent something).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct SocketSettings {
    keepalive: Option<Duration>,
    defer_accept: Option<Duration>,
}

impl SocketSettings {
    /// The settings of `listener`; none for an address without one (the admin listener,
    /// the demo origin).
    fn of(listener: Option<&Listener>) -> Self {
        listener.map_or_else(SocketSettings::default, |l| SocketSettings {
            keepalive: l.tcp_keepalive,
            defer_accept: l.defer_accept,
        })
    }
}

impl<A: ServerApp + Send + Sync + 'static> Listening<A> {
    /// `app`, listening on nothing yet; a copy of the service that owns its addresses
    /// unless made their [`Listening::owner`].
    pub fn new(name: impl Into<String>, app: A) -> Self {
        Listening {
            name: name.into(),
            threads: None,
            app: Arc::new(app),
            addresses: Vec::new(),
            role: Role::Copy,
            spread: None,
        }
    }

    /// Spreads the connections it accepts over `workers`, as worker `me`, through the
    /// `inboxes` of each address.
    fn spread(mut self, workers: Arc<Workers>, me: usize, inboxes: Inboxes) -> Self {
        self.spread = Some((workers, me, inboxes));
        self
    }

    /// Listens on the plain TCP address `addr`.
    pub fn plain(mut self, addr: impl ToString) -> Self {
        self.addresses.push((addr.to_string(), None));
        self
    }

    /// Listens on `addr` over TLS with `settings`.
    fn tls(mut self, addr: impl ToString, settings: TlsSettings) -> Self {
        self.addresses.push((addr.to_string(), Some(settings)));
        self
    }

    /// Runs on one thread (a runtime of its own, not work stealing).
    fn one_thread(mut self) -> Self {
        self.threads = Some(1);
        self
    }

    /// Owns the addresses it listens on, each with the socket settings of the listener in
    /// `listeners` on that address (none for an address that has no listener there: the
    /// admin listener, the demo origin).
    pub fn owner(mut self, listeners: &[&Listener]) -> Self {
        let sockets = self
            .addresses
            .iter()
            .map(|(addr, _)| {
                let listener = listeners.iter().find(|l| l.addr.to_string() == *addr);
                (addr.clone(), SocketSettings::of(listener.copied()))
            })
            .collect();
        self.role = Role::Owner(sockets);
        self
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServiceTrait for Listening<A> {
    async fn start_service(
        &mut self,
        fds: Option<ListenFds>,
        shutdown: ShutdownWatch,
        _listeners_per_fd: usize,
    ) {
        // Without a shared table (Pingora always passes one on Unix), one of its own.
        let shared = fds.unwrap_or_else(|| Arc::new(parking_lot::Mutex::new(Fds::new())));
        let addrs: Vec<String> = self.addresses.iter().map(|(a, _)| a.clone()).collect();
        let sockets = match &self.role {
            Role::Owner(sockets) => {
                for (addr, settings) in sockets {
                    listening_socket(&shared, addr, *settings).await;
                }
                let table = shared.lock();
                addrs
                    .iter()
                    .filter_map(|addr| Some((addr.clone(), *table.get(addr)?)))
                    .collect()
            }
            Role::Copy => duplicates(&shared, &addrs, &self.name).await,
        };
        tokio::spawn(keep_next_wake_near());
        let accepting = self.addresses.iter_mut().filter_map(|(addr, tls)| {
            let fd = sockets.get(addr).copied()?;
            // SAFETY: `fd` is open, and this listener alone closes it (see above).
            let listener = unsafe { std::net::TcpListener::from_raw_fd(fd) };
            let tls = tls.take().map(|settings| Arc::new(settings.build()));
            let app = self.app.clone();
            let shutdown = shutdown.clone();
            let name = format!("{} {addr}", self.name);
            let spread = self.spread.as_ref().and_then(|(workers, me, inboxes)| {
                Some(Spread {
                    workers: workers.clone(),
                    inboxes: inboxes.get(addr.as_str())?.clone(),
                    me: *me,
                })
            });
            Some(async move { accept::serve(listener, tls, app, shutdown, &name, spread).await })
        });
        futures_util::future::join_all(accepting.collect::<Vec<_>>()).await;
        self.app.cleanup().await;
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn threads(&self) -> Option<usize> {
        self.threads
    }

    fn listen_addresses(&self) -> Option<Vec<String>> {
        Some(self.addresses.iter().map(|(a, _)| a.clone()).collect())
    }
}

/// Keeps a timer armed on this thread's runtime that is never more than [`NEAR`] away.
/// Tokio wakes a runtime's own reactor (a write to its eventfd, and a turn of its loop
/// for nothing) whenever a timer is armed earlier than every other timer it has: on a
/// thread with no other timer, each request's timeouts (the client's first bytes, the
/// origin's response head) did so, twice per connection. With this one always nearer,
/// they never are.
async fn keep_next_wake_near() {
    loop {
        tokio::time::sleep(NEAR).await;
    }
}

/// See [`keep_next_wake_near`].
const NEAR: Duration = Duration::from_secs(1);

/// Puts a listening socket for `addr` in `shared`, bound now unless the table has one,
/// and gives it `settings`. An address that cannot be bound ends the process.
async fn listening_socket(shared: &ListenFds, addr: &str, settings: SocketSettings) {
    let existing = shared.lock().get(addr).copied();
    let fd = match existing {
        Some(fd) => fd,
        None => match bind(addr).await {
            Ok(listener) => {
                let fd = listener.into_raw_fd();
                shared.lock().add(addr.to_string(), fd);
                fd
            }
            Err(e) => {
                log::error!("cannot listen on {addr}: {e}; exiting");
                std::process::exit(1);
            }
        },
    };
    // SAFETY: the table owns `fd` and keeps it open until the owner's accept loop, started
    // after this, stops and closes it.
    let socket = unsafe { BorrowedFd::borrow_raw(fd) };
    if let Err(e) = set_keepalive(SockRef::from(&socket), settings.keepalive) {
        log::error!("{addr}: cannot set the listening socket's TCP keepalive: {e}");
    }
    if let Err(e) = set_defer_accept(socket, settings.defer_accept) {
        log::error!("{addr}: cannot set the listening socket's defer_accept: {e}");
    }
}

/// A listening socket on `addr` (address reuse on, non-blocking as tokio's reactor
/// needs), trying again while the address is in use.
async fn bind(addr: &str) -> std::io::Result<std::net::TcpListener> {
    let parsed: SocketAddr = addr
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut tries = 1;
    loop {
        match std::net::TcpListener::bind(parsed) {
            Ok(listener) => {
                listener.set_nonblocking(true)?;
                return Ok(listener);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && tries < BIND_TRIES => {
                log::warn!("{addr} is in use, will try again");
                tries += 1;
                tokio::time::sleep(BIND_RETRY).await;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                return Err(std::io::Error::new(
                    e.kind(),
                    format!("{e} (tried {BIND_TRIES} times, {BIND_RETRY:?} apart)"),
                ))
            }
            Err(e) => return Err(e),
        }
    }
}

/// Sets TCP keepalive on `socket` (a listening socket: the connections it accepts inherit
/// it): the first probe after `idle` of silence, then every `idle` (10 s at most), and the
/// peer given up after [`KEEPALIVE_PROBES`] unanswered; `None`: off.
fn set_keepalive(socket: SockRef<'_>, idle: Option<Duration>) -> std::io::Result<()> {
    let Some(idle) = idle else {
        return socket.set_keepalive(false);
    };
    let params = socket2::TcpKeepalive::new()
        .with_time(idle)
        .with_interval(idle.min(Duration::from_secs(10)))
        .with_retries(KEEPALIVE_PROBES);
    socket.set_tcp_keepalive(&params)
}

/// Sets Linux's `TCP_DEFER_ACCEPT` on a listening socket: a connection is handed over
/// (made acceptable, and its listener's readiness signalled) once its client has sent
/// something, or once `defer` has passed (whole seconds); `None`: at once. Every protocol
/// served here has the client speak first (an HTTP request, a TLS ClientHello, the HTTP/2
/// preface), so the proxy's first read of a connection finds its first bytes, without a
/// wait on the reactor in between, and a connection that sends nothing holds no
/// descriptor and no `max_connections` slot until then. Set to 0 as well, so a socket
/// handed over by `-u` loses a setting the new config turned off.
#[cfg(target_os = "linux")]
fn set_defer_accept(socket: BorrowedFd<'_>, defer: Option<Duration>) -> std::io::Result<()> {
    let secs = defer.map_or(0, |d| {
        libc::c_int::try_from(d.as_secs()).unwrap_or(libc::c_int::MAX)
    });
    // SAFETY: `socket` is an open descriptor for the call's length, and the option's value
    // is a c_int read from the pointer and length given.
    let set = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            std::ptr::from_ref(&secs).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if set == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Elsewhere there is no `TCP_DEFER_ACCEPT`: connections are handed over at once.
#[cfg(not(target_os = "linux"))]
fn set_defer_accept(_socket: BorrowedFd<'_>, defer: Option<Duration>) -> std::io::Result<()> {
    match defer {
        Some(_) => Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "TCP_DEFER_ACCEPT is Linux's; connections are handed over at once",
        )),
        None => Ok(()),
    }
}

/// Duplicates of the descriptors `shared` holds for `addrs`, by address, waiting (at most
/// [`FIRST_COPY_WAIT`]) for the first copy to put them there. An address missing from it
/// is logged, and not listened on.
async fn duplicates(shared: &ListenFds, addrs: &[String], service: &str) -> HashMap<String, RawFd> {
    let mut own = HashMap::new();
    let waited = Instant::now();
    for addr in addrs {
        let fd = loop {
            let first = shared.lock().get(addr).copied();
            if first.is_some() || waited.elapsed() > FIRST_COPY_WAIT {
                break first;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        match fd.map(duplicate) {
            Some(Ok(copy)) => {
                own.insert(addr.clone(), copy);
            }
            Some(Err(e)) => log::error!("{service}: {addr}: cannot share the socket: {e}"),
            None => log::error!("{service}: {addr}: the first copy never listened"),
        }
    }
    own
}

/// A new descriptor of the socket `fd` (close-on-exec), owned by the caller.
fn duplicate(fd: RawFd) -> std::io::Result<RawFd> {
    // SAFETY: F_DUPFD_CLOEXEC only reads `fd`; a closed one is an error, not UB.
    let copy = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if copy < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(copy)
}

/// The TLS settings of a TLS listener (`http2`: it offers h2 by ALPN); `None` (logged)
/// when they cannot be made.
fn tls_settings(
    listener: &Listener,
    http2: bool,
    config: &Config,
    current: &Arc<ArcSwap<Config>>,
) -> Option<TlsSettings> {
    let tls = config.tls.get(&listener.addr)?;
    let resolver = CertResolver::new(current.clone(), listener.addr, tls.clone());
    let mut settings = match TlsSettings::intermediate("", "") {
        Ok(settings) => settings,
        Err(e) => {
            log::error!("{}: TLS settings: {e}; not listening", listener.addr);
            return None;
        }
    };
    settings.set_cert_resolver(Arc::new(resolver));
    settings.set_alpn(if http2 { ALPN::H2H1 } else { ALPN::H1 });
    Some(settings)
}

/// The certificate resolver of the TLS listener on `addr`. It looks the listener up in
/// the live config at each handshake; `initial` serves when a reload dropped the listener
/// from the config (the socket stays until a restart or an upgrade).
#[derive(Debug)]
pub struct CertResolver {
    config: Arc<ArcSwap<Config>>,
    addr: SocketAddr,
    initial: Arc<ListenerTls>,
}

impl CertResolver {
    pub fn new(config: Arc<ArcSwap<Config>>, addr: SocketAddr, initial: Arc<ListenerTls>) -> Self {
        CertResolver {
            config,
            addr,
            initial,
        }
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let config = self.config.load();
        let tls = config.tls.get(&self.addr).unwrap_or(&self.initial);
        if tls.refuses(&hello) {
            // No certificate: rustls ends the handshake with a handshake_failure alert.
            log::debug!(
                "TLS handshake on {} refused: the client cannot do TLS 1.3 (min_version)",
                self.addr
            );
            return None;
        }
        tls.select(hello.server_name()).map(|c| c.key.clone())
    }
}

/// Answers every request on a `redirect_http` listener with a 308 to its https form:
/// the same host and path, on the https port (the first TLS listener's, else 443).
pub struct Redirect {
    https_port: u16,
}

#[async_trait]
impl ServeHttp for Redirect {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        let host = req
            .uri
            .host()
            .or_else(|| req.headers.get(HOST)?.to_str().ok())
            .map(host_without_port)
            .filter(|h| is_host(h));
        let path = req.uri.path_and_query().map_or("/", |pq| pq.as_str());
        let built = match host {
            Some(host) => Response::builder()
                .status(StatusCode::PERMANENT_REDIRECT)
                .header(LOCATION, https_url(host, self.https_port, path))
                .header(CONTENT_LENGTH, 0)
                .body(Vec::new()),
            None => {
                let body = b"no valid Host header to redirect to https with\n".to_vec();
                Response::builder()
                    .status(StatusCode::BAD_REQUEST)
                    .header(CONTENT_TYPE, "text/plain")
                    .header(CONTENT_LENGTH, body.len())
                    .body(body)
            }
        };
        built.unwrap_or_else(|_| {
            let mut response = Response::new(Vec::new());
            *response.status_mut() = StatusCode::BAD_REQUEST;
            response
        })
    }
}

/// `example.com:8080` -> `example.com`, `[::1]:8080` -> `[::1]`.
fn host_without_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.find(']').map_or(host, |end| &host[..=end]);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

/// A host name or IP literal, nothing that could change the URL's shape.
fn is_host(host: &str) -> bool {
    !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._[]:".contains(&b))
}

fn https_url(host: &str, port: u16, path: &str) -> String {
    if port == 443 {
        format!("https://{host}{path}")
    } else {
        format!("https://{host}:{port}{path}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The proxy services `text` gets, as (name, threads).
    fn proxy_services(text: &str) -> Vec<(String, Option<usize>)> {
        let path = std::path::Path::new("main.yaml");
        let mut config =
            Config::from_text(path, text, std::path::Path::new(".")).expect("the config loads");
        let server_conf = Arc::new(std::mem::take(&mut config.server));
        let state = config.state.clone();
        let current = Arc::new(ArcSwap::from_pointee(config));
        services(&server_conf, &current.load(), &current, &state)
            .iter()
            .map(|s| (s.name().to_string(), s.threads()))
            .collect()
    }

    #[test]
    fn each_worker_thread_serves_its_own_copy_of_the_proxy() {
        let listeners =
            "listen:\n  - \"127.0.0.1:1\"\n  - { address: \"127.0.0.1:2\", h2c: true }\n\
                         services:\n  o:\n    url: \"http://127.0.0.1:3\"\n";
        let one = |name: &str| (name.to_string(), Some(1));
        assert_eq!(
            proxy_services(&format!("threads: 3\n{listeners}")),
            [
                one("streamgate 0"),
                one("streamgate 1"),
                one("streamgate 2"),
                one("streamgate h2c 0"),
                one("streamgate h2c 1"),
                one("streamgate h2c 2"),
            ]
        );
        // With work stealing, one service runs on all the threads.
        assert_eq!(
            proxy_services(&format!("threads: 3\nwork_stealing: true\n{listeners}")),
            [
                ("streamgate".to_string(), None),
                ("streamgate h2c".to_string(), None)
            ]
        );
    }

    #[test]
    fn redirect_targets() {
        assert_eq!(host_without_port("Example.com:8080"), "Example.com");
        assert_eq!(host_without_port("[::1]:8080"), "[::1]");
        assert_eq!(host_without_port("[::1]"), "[::1]");
        assert_eq!(host_without_port("example.com"), "example.com");
        assert!(!is_host("evil.com/x"));
        assert!(!is_host(""));
        assert_eq!(https_url("a.test", 443, "/x?y"), "https://a.test/x?y");
        assert_eq!(https_url("a.test", 8443, "/"), "https://a.test:8443/");
    }
}
