//! Connecting to an origin over TCP without a turn of the event loop when the connection
//! is made at once.
//!
//! Pingora's connector waits for a new socket to report it is writable before it hands the
//! connection over, and tokio learns that only at the loop's next poll of its reactor:
//! after every task ready before it has run. To a loopback origin (a sidecar, a model
//! server on the same host) the handshake is complete when `connect` returns, so that turn
//! is pure wait, and the request waited a second one, since tokio does no I/O on a socket
//! before its first readiness event (the relay's `OriginConn::send_head` writes the head
//! itself first). Here a send of nothing right after `connect` tells whether the
//! connection is made (it is then, or the connect failed, or it is still under way), and
//! only one still under way is waited for, within the service's connect timeout.
//!
//! A new connection to a plain (not TLS) origin is made here directly ([`Connector`]), set up
//! as Pingora's connector sets one up (`TCP_NODELAY`, TCP keepalive): Pingora's connect
//! future holds room for a TLS handshake (8 KiB, boxed and moved twice per connection, even
//! when no TLS is spoken), all of it on the way from a request to its origin. It is a
//! [`Tcp`], the socket alone, not Pingora's L4 stream (see `net`). TLS origins go through
//! Pingora's connector, which calls [`TcpConnect`] for their TCP part.
//!
//! A service with `preconnect` has spare connections made here ahead of its requests
//! ([`Connector::preconnect`]): a new stream then takes one the origin has already
//! accepted, and its request goes out without a connect or a wait for the origin's accept
//! loop. Spares are kept beside Pingora's pool, not in it, so that how many are ready is
//! known exactly, per worker thread and peer.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora_core::connectors::l4::Connect;
use pingora_core::connectors::{ConnectorOptions, TransportConnector};
use pingora_core::protocols::l4::ext::set_tcp_keepalive;
use pingora_core::protocols::l4::socket::SocketAddr;
use pingora_core::protocols::l4::stream::Stream;
use pingora_core::protocols::{Stream as IoStream, IO};
use pingora_core::server::configuration::ServerConf;
use pingora_core::upstreams::peer::{HttpPeer, Peer};
use pingora_error::{Error, ErrorType, OrErr, Result};
use socket2::{Domain, Protocol, Socket, Type};

use crate::net::Tcp;

/// Pingora's L4 connect for TCP origins (`PeerOptions::custom_l4`): what Pingora does
/// after it (TCP keepalive, `TCP_NODELAY`, the socket's digest, TLS) is unchanged.
#[derive(Debug)]
pub struct TcpConnect {
    /// The service's connect timeout (Pingora applies it to its own connect only).
    pub timeout: Option<Duration>,
    /// The local addresses connections are made from.
    pub local: Arc<LocalAddrs>,
}

/// The local addresses connections to origins are made from: Pingora's
/// `client_bind_to_ipv4` and `client_bind_to_ipv6` (which its own connect reads, and this
/// one, taking its place, must too), one of the origin's address family at random for
/// each connection, its port the kernel's choice when the connection is made
/// (`IP_BIND_ADDRESS_NO_PORT`, so that binding does not use up ports as a listener's
/// bind would); none for a family: the kernel chooses the address too.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct LocalAddrs {
    v4: Vec<IpAddr>,
    v6: Vec<IpAddr>,
    /// A hash of both lists (0 when both are empty), for the pool: see [`LocalAddrs::key`].
    key: u64,
}

impl LocalAddrs {
    pub fn new(v4: Vec<IpAddr>, v6: Vec<IpAddr>) -> LocalAddrs {
        use std::hash::{Hash, Hasher};
        let key = if v4.is_empty() && v6.is_empty() {
            0
        } else {
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            (&v4, &v6).hash(&mut hasher);
            hasher.finish()
        };
        LocalAddrs { v4, v6, key }
    }

    pub fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }

    /// Mixed into a peer's pool group, so that a connection made from other addresses (a
    /// reload changed them) is not taken from the pool for a request made with these.
    pub fn key(&self) -> u64 {
        self.key
    }

    /// The address a connection to `to` is made from, if one is set for its family.
    fn pick(&self, to: &std::net::SocketAddr) -> Option<std::net::SocketAddr> {
        let list = if to.is_ipv4() { &self.v4 } else { &self.v6 };
        let ip = match list.len() {
            0 => return None,
            1 => list[0],
            n => list[fastrand::usize(..n)],
        };
        Some(std::net::SocketAddr::new(ip, 0))
    }
}

#[async_trait]
impl Connect for TcpConnect {
    async fn connect(&self, addr: &SocketAddr) -> Result<Stream> {
        let SocketAddr::Inet(addr) = addr else {
            return Error::e_explain(ErrorType::InternalError, "not a TCP address");
        };
        self.tcp(addr).await
    }
}

/// Connections to origins: Pingora's connector and its pool, with new connections to plain
/// origins made here (see the module docs), unless Pingora's settings move connects to
/// threads of their own (`upstream_connect_offload_threadpools`), which its connector does;
/// and the spare connections a service's `preconnect` asks for ([`Connector::preconnect`]).
/// Cloned, it is the same connector.
#[derive(Clone)]
pub struct Connector(Arc<Inner>);

struct Inner {
    pingora: TransportConnector,
    direct: bool,
    /// Spare connections by peer (its reuse hash), made ahead of the requests that take
    /// them.
    spares: parking_lot::Mutex<HashMap<u64, Spares>>,
}

/// A peer's spare connections: made and never used, oldest first; how many are being
/// made; whether a task closes them as they pass the idle timeout.
#[derive(Default)]
struct Spares {
    ready: VecDeque<(Instant, IoStream)>,
    making: usize,
    sweeping: bool,
    /// When a spare last failed to connect: none are made for [`SPARE_BACKOFF`] after.
    failed: Option<Instant>,
}

/// How long no spare is made to a peer after one failed to connect, so that a peer
/// that refuses them is not asked again by every request.
const SPARE_BACKOFF: Duration = Duration::from_secs(1);

impl Spares {
    /// Nothing ready, being made, swept or remembered: the entry can go.
    fn unused(&self) -> bool {
        self.ready.is_empty()
            && self.making == 0
            && !self.sweeping
            && self.failed.is_none_or(|at| at.elapsed() >= SPARE_BACKOFF)
    }
}

impl Connector {
    /// With Pingora's connector options from `server` (its `ca_file`, the default trust
    /// for https origins, and the pool size included).
    pub fn new(server: &ServerConf) -> Self {
        Connector(Arc::new(Inner {
            pingora: TransportConnector::new(Some(ConnectorOptions::from_server_conf(server))),
            direct: server.upstream_connect_offload_threadpool().is_none(),
            spares: parking_lot::Mutex::new(HashMap::new()),
        }))
    }

    /// An idle connection for `peer`, if there is one: a pooled one (used before), else,
    /// with `spares` (the service's `preconnect`), a spare (never used). Either may have
    /// been closed by the origin meanwhile; a spare found closed, or older than the peer's
    /// idle timeout, is dropped here.
    pub async fn reused(&self, peer: &HttpPeer, spares: bool) -> Option<IoStream> {
        match self.0.pingora.reused_stream(peer).await {
            Some(stream) => Some(stream),
            None if spares => self.spare(peer),
            None => None,
        }
    }

    /// Gives `stream` to the pool under `key` (the peer's reuse hash), for `idle` at most.
    pub fn release(&self, stream: IoStream, key: u64, idle: Option<Duration>) {
        self.0.pingora.release_stream(stream, key, idle);
    }

    /// A new connection for `peer`, a peer of a service whose TCP connect is `tcp`: made
    /// here when the peer is a plain TCP one, with what Pingora's connector gives a new
    /// connection (`TCP_NODELAY`, TCP keepalive when the peer asks for it), as a [`Tcp`]
    /// (see the module docs); by Pingora's connector otherwise.
    pub async fn connect(&self, peer: &HttpPeer, tcp: &TcpConnect) -> Result<IoStream> {
        let plain = self.0.direct
            && !peer.tls()
            && peer.get_proxy().is_none()
            && peer.options.tracer.is_none();
        let (true, SocketAddr::Inet(addr)) = (plain, peer.address()) else {
            return Box::pin(self.0.pingora.new_stream(peer)).await;
        };
        let socket = tcp.socket(addr).await?;
        if let Some(keepalive) = &peer.options.tcp_keepalive {
            set_tcp_keepalive(&socket, keepalive)?;
        }
        socket
            .set_nodelay(true)
            .or_err(ErrorType::ConnectError, "failed to set_nodelay")?;
        Ok(Box::new(Tcp::from(socket)))
    }

    /// Makes spare connections to `peer` in the background, each in a task of its own,
    /// until `want` are ready or being made (a service's `preconnect`): the next requests
    /// to it take one instead of connecting, so their head goes out without a connect and
    /// without waiting for the origin to accept. A connect that fails is logged (at
    /// debug), and none is made to the peer for [`SPARE_BACKOFF`] after it. A spare not
    /// taken within the peer's idle timeout is closed then.
    pub fn preconnect(&self, peer: &HttpPeer, tcp: &Arc<TcpConnect>, want: usize) {
        let key = peer.reuse_hash();
        let missing = {
            let mut spares = self.0.spares.lock();
            let spares = spares.entry(key).or_default();
            let backoff = spares.failed.is_some_and(|at| at.elapsed() < SPARE_BACKOFF);
            let missing = if backoff {
                0
            } else {
                want.saturating_sub(spares.ready.len() + spares.making)
            };
            spares.making += missing;
            missing
        };
        for _ in 0..missing {
            let (connector, peer, tcp) = (self.clone(), peer.clone(), tcp.clone());
            tokio::spawn(async move {
                let made = connector.connect(&peer, &tcp).await;
                let sweep = {
                    let mut spares = connector.0.spares.lock();
                    let spares = spares.entry(key).or_default();
                    spares.making -= 1;
                    match made {
                        Ok(stream) => spares.ready.push_back((Instant::now(), stream)),
                        Err(e) => {
                            log::debug!("a spare connection to {}: {e}", peer.address());
                            spares.failed = Some(Instant::now());
                        }
                    }
                    let idle = peer.options.idle_timeout;
                    let sweep = idle.filter(|_| !spares.sweeping && !spares.ready.is_empty());
                    spares.sweeping |= sweep.is_some();
                    sweep
                };
                if let Some(idle) = sweep {
                    connector.sweep(key, idle).await;
                }
            });
        }
    }

    /// Closes the spares under `key` as they pass `idle`, until there are none (one such
    /// loop per peer at a time: the first spare made when none was sweeping starts it).
    async fn sweep(&self, key: u64, idle: Duration) {
        loop {
            let next = {
                let mut all = self.0.spares.lock();
                let Some(spares) = all.get_mut(&key) else {
                    return;
                };
                while spares
                    .ready
                    .front()
                    .is_some_and(|(made, _)| made.elapsed() >= idle)
                {
                    spares.ready.pop_front();
                }
                match spares.ready.front() {
                    Some((made, _)) => *made + idle,
                    None => {
                        spares.sweeping = false;
                        if spares.unused() {
                            all.remove(&key);
                        }
                        return;
                    }
                }
            };
            tokio::time::sleep_until(next.into()).await;
        }
    }

    /// The oldest spare connection to `peer` that is still open and within the peer's
    /// idle timeout of being made; the ones found closed or too old are dropped (closed)
    /// on the way.
    fn spare(&self, peer: &HttpPeer) -> Option<IoStream> {
        let (key, idle) = (peer.reuse_hash(), peer.options.idle_timeout);
        let mut all = self.0.spares.lock();
        let spares = all.get_mut(&key)?;
        let mut found = None;
        while let Some((made, stream)) = spares.ready.pop_front() {
            if idle.is_none_or(|idle| made.elapsed() < idle) && usable(&*stream, peer.tls()) {
                found = Some(stream);
                break;
            }
        }
        if spares.unused() {
            all.remove(&key);
        }
        found
    }
}

/// Whether an idle spare can carry a request, by a peek at its socket: not if the origin
/// closed it (an end, a reset), nor, over plain TCP, if the origin sent anything unasked
/// (an HTTP server's timeout answer). Over TLS bytes may come unasked from a live origin
/// (TLS 1.3 session tickets follow the handshake), so only an end or a reset counts; an
/// alert before the close is met when the request is sent, as on any pooled connection.
fn usable(stream: &dyn IO, tls: bool) -> bool {
    let fd = stream.id();
    // SAFETY: `fd` is the stream's socket, open while `stream` is.
    let socket = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let mut byte = [std::mem::MaybeUninit::<u8>::uninit()];
    let peeked = socket2::SockRef::from(&socket)
        .recv_with_flags(&mut byte, libc::MSG_PEEK | libc::MSG_DONTWAIT);
    match peeked {
        Err(e) => e.kind() == io::ErrorKind::WouldBlock,
        Ok(n) => tls && n > 0,
    }
}

impl TcpConnect {
    /// The TCP connection to `addr`, as Pingora's L4 stream (which its TLS connector takes).
    async fn tcp(&self, addr: &std::net::SocketAddr) -> Result<Stream> {
        Ok(Stream::from(self.socket(addr).await?))
    }

    /// The TCP connection to `addr`.
    async fn socket(&self, addr: &std::net::SocketAddr) -> Result<tokio::net::TcpStream> {
        let socket = Socket::new(
            Domain::for_address(*addr),
            Type::STREAM.nonblocking(),
            Some(Protocol::TCP),
        )
        .or_err(ErrorType::SocketError, "creating a socket to the origin")?;
        if let Some(local) = self.local.pick(addr) {
            bind_without_port(&socket, local).map_err(|e| {
                Error::because(
                    ErrorType::BindError,
                    format!("binding the connection to {addr} to {}", local.ip()),
                    e,
                )
            })?;
        }
        match socket.connect(&(*addr).into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(failed(e, addr)),
        }
        // Nothing is sent: 0 once connected, "would block" while connecting, or the
        // connect's own error.
        let made = match socket.send_with_flags(&[], libc::MSG_NOSIGNAL) {
            Ok(_) => true,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
            Err(e) => return Err(failed(e, addr)),
        };
        let tcp = tokio::net::TcpStream::from_std(socket.into())
            .or_err(ErrorType::SocketError, "registering the origin connection")?;
        if !made {
            let writable = tcp.writable();
            let ready = match self.timeout {
                Some(limit) => tokio::time::timeout(limit, writable).await.map_err(|_| {
                    Error::explain(
                        ErrorType::ConnectTimedout,
                        format!("timeout {limit:?} connecting to {addr}"),
                    )
                })?,
                None => writable.await,
            };
            ready.map_err(|e| failed(e, addr))?;
            if let Some(e) = tcp.take_error().map_err(|e| failed(e, addr))? {
                return Err(failed(e, addr));
            }
        }
        Ok(tcp)
    }
}

/// Binds `socket`, not yet connected, to `local`'s address, its port chosen when it
/// connects.
fn bind_without_port(socket: &Socket, local: std::net::SocketAddr) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let on: libc::c_int = 1;
        // SAFETY: a valid descriptor, and an int option given its size.
        let set = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                (&on as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if set != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    socket.bind(&local.into())
}

/// A connect that failed, typed as Pingora types its own (refused, no route, timed out).
fn failed(e: io::Error, addr: &std::net::SocketAddr) -> Box<Error> {
    let etype = match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => ErrorType::ConnectRefused,
        Some(libc::ENETUNREACH | libc::EHOSTUNREACH) => ErrorType::ConnectNoRoute,
        Some(libc::ETIMEDOUT) => ErrorType::ConnectTimedout,
        _ => ErrorType::ConnectError,
    };
    Error::because(etype, format!("connecting to {addr}"), e)
}

/// Loopback origins and connections to them, for tests here and in the relay.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// A loopback listener standing for an origin, and its address as a peer's.
    pub async fn loopback() -> (tokio::net::TcpListener, SocketAddr) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        (listener, SocketAddr::Inet(addr))
    }

    /// A new TCP connection to `target`, made as a TLS origin's is under its handshake.
    pub async fn connected(target: &SocketAddr) -> Result<Stream> {
        TcpConnect {
            timeout: Some(Duration::from_secs(1)),
            local: Arc::default(),
        }
        .connect(target)
        .await
    }

    /// A new connection to the plain origin `target`, made as the services make them.
    pub async fn plain(target: &SocketAddr) -> IoStream {
        let SocketAddr::Inet(addr) = target else {
            unreachable!("a TCP address")
        };
        let tcp = TcpConnect {
            timeout: Some(Duration::from_secs(1)),
            local: Arc::default(),
        };
        let peer = HttpPeer::new(*addr, false, String::new());
        Connector::new(&ServerConf::default())
            .connect(&peer, &tcp)
            .await
            .expect("connects")
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::testing::{connected, loopback};
    use super::*;

    /// What `stream` writes arrives at the connection `listener` accepts.
    async fn reaches<S>(listener: &tokio::net::TcpListener, stream: &mut S)
    where
        S: tokio::io::AsyncWrite + Unpin + ?Sized,
    {
        let (mut accepted, _) = listener.accept().await.expect("accept");
        stream.write_all(b"hello").await.expect("write");
        stream.flush().await.expect("flush");
        let mut got = [0u8; 5];
        accepted.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"hello");
    }

    #[tokio::test]
    async fn a_loopback_connection_is_ready_at_once_and_failures_keep_their_type() {
        let (listener, target) = loopback().await;
        let mut stream = connected(&target).await.expect("connects");
        reaches(&listener, &mut stream).await;
        drop(listener);
        let refused = connected(&target).await.expect_err("nobody listens");
        assert_eq!(refused.etype(), &ErrorType::ConnectRefused);
    }

    /// `client_bind_to_ipv4`: a connection is made from one of the addresses given (every
    /// 127/8 address is the loopback's), and one that is not the host's fails with the
    /// reason, named a bind error.
    #[tokio::test]
    async fn connections_are_made_from_the_local_addresses_given() {
        let (listener, target) = loopback().await;
        let SocketAddr::Inet(addr) = target else {
            unreachable!("a TCP address")
        };
        let from = |ips: &[[u8; 4]]| TcpConnect {
            timeout: Some(Duration::from_secs(1)),
            local: Arc::new(LocalAddrs::new(
                ips.iter().map(|ip| IpAddr::from(*ip)).collect(),
                Vec::new(),
            )),
        };
        let locals = [[127, 0, 0, 2], [127, 0, 0, 3]];
        let tcp = from(&locals);
        let peer = HttpPeer::new(addr, false, String::new());
        let connector = Connector::new(&ServerConf::default());
        let mut seen = std::collections::HashSet::new();
        for _ in 0..32 {
            let _stream = connector.connect(&peer, &tcp).await.expect("connects");
            let (_, client) = listener.accept().await.expect("accept");
            seen.insert(client.ip());
        }
        let expected = locals.iter().map(|ip| IpAddr::from(*ip)).collect();
        assert_eq!(seen, expected, "each of the addresses, and only they");

        let tcp = from(&[[192, 0, 2, 1]]);
        let Err(e) = connector.connect(&peer, &tcp).await else {
            panic!("connected from an address not the host's")
        };
        assert_eq!(e.etype, ErrorType::BindError);
        let reason = e.to_string();
        assert!(reason.contains("to 192.0.2.1"), "{reason}");
    }

    /// A plain peer is connected here, set up as Pingora's connector sets up its own
    /// (`TCP_NODELAY` on), as the socket alone: no digest, nothing of Pingora's L4 stream,
    /// which each event stream would hold; a failure keeps its type.
    #[tokio::test]
    async fn a_plain_origin_is_connected_as_pingora_connects_one() {
        let (listener, target) = loopback().await;
        let SocketAddr::Inet(addr) = target else {
            unreachable!("a TCP address")
        };
        let tcp = TcpConnect {
            timeout: Some(Duration::from_secs(1)),
            local: Arc::default(),
        };
        let peer = HttpPeer::new(addr, false, String::new());
        let connector = Connector::new(&ServerConf::default());
        let mut stream = connector.connect(&peer, &tcp).await.expect("connects");
        assert!(stream.get_socket_digest().is_none(), "no digest held");
        assert!(crate::net::tcp(&*stream).is_some(), "the socket alone");
        let fd = pingora_core::protocols::UniqueID::id(&*stream);
        // SAFETY: `fd` is the stream's socket, open while `stream` is.
        let socket = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        let reached = socket2::SockRef::from(&socket).peer_addr().expect("peer");
        assert_eq!(reached.as_socket(), Some(addr));
        let nodelay = socket2::SockRef::from(&socket)
            .tcp_nodelay()
            .expect("TCP_NODELAY");
        assert!(nodelay, "TCP_NODELAY on");
        reaches(&listener, &mut stream).await;
        drop(listener);
        let refused = connector
            .connect(&peer, &tcp)
            .await
            .expect_err("nobody listens");
        assert_eq!(refused.etype(), &ErrorType::ConnectRefused);
    }

    /// A peer that refuses spares is not asked for more by every request: none for
    /// `SPARE_BACKOFF` after a failure, then again.
    #[tokio::test]
    async fn spares_that_fail_to_connect_are_not_asked_for_again_at_once() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
        let peer = HttpPeer::new(addr, false, String::new());
        let tcp = Arc::new(TcpConnect {
            timeout: Some(Duration::from_secs(1)),
            local: Arc::default(),
        });
        let connector = Connector::new(&ServerConf::default());
        let key = peer.reuse_hash();
        let settled = || async {
            while connector
                .0
                .spares
                .lock()
                .get(&key)
                .is_none_or(|s| s.making > 0)
            {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        // Nobody listens: both are refused.
        connector.preconnect(&peer, &tcp, 2);
        settled().await;
        assert!(connector.0.spares.lock()[&key].failed.is_some());
        // The origin is back, but within the backoff no spare is made.
        let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
        connector.preconnect(&peer, &tcp, 2);
        let accepted = tokio::time::timeout(Duration::from_millis(200), listener.accept()).await;
        assert!(accepted.is_err(), "no spare within the backoff");
        assert!(connector.spare(&peer).is_none());
        // After it, both are made.
        connector
            .0
            .spares
            .lock()
            .get_mut(&key)
            .expect("remembered")
            .failed = Some(Instant::now() - SPARE_BACKOFF);
        connector.preconnect(&peer, &tcp, 2);
        let mut origin_sides = Vec::new();
        for _ in 0..2 {
            origin_sides.push(listener.accept().await.expect("a spare"));
        }
        settled().await;
        assert!(connector.spare(&peer).is_some());
        assert!(connector.spare(&peer).is_some());
        assert!(connector.spare(&peer).is_none(), "two, as asked");
    }
}
