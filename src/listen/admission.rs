//! Admission of client connections: each listener's cap on the connections it has open at
//! once (`max_connections`), its wait for a new connection's first bytes (`idle_timeout`;
//! the wait between keep-alive requests is set per request, in the proxy's
//! `early_request_filter`), and its bound on the time a request head of an HTTP/1.x
//! connection takes from its first byte (`request_header_timeout`), for every request of
//! the connection (the server says when it is about to read one and when it has read its
//! head: [`Admitted::expect_head`], [`Admitted::head_read`]).
//!
//! Each listener has a [`Gate`]; the server's app (`server::admission::Admitting`) passes
//! every accepted connection through it ([`Gate::admit`]): a connection over the cap is
//! closed at once and counted; any other is wrapped in an [`Admitted`] stream that holds
//! the listener's slot until the connection is dropped, wherever it goes (an event stream
//! carried in a task of its own takes the connection out of Pingora's hands, and may give
//! it back for the client's next request), and that ends the connection when its first
//! bytes, or a request head, do not come in time.
//!
//! Pingora gives a plain connection to the app at once; a TLS one after its handshake,
//! which Pingora bounds by 60 s itself.
//!
//! [`Admitted`] also gathers small writes until a flush, so a response head and a small
//! body go out in one write, as the MSS-sized buffer Pingora would otherwise keep for every
//! connection does (the listeners turn that one off): this one holds memory only while
//! something is gathered, not for as long as an event stream or an idle keep-alive
//! connection is open. A small vectored write (an event with its chunk framing) is sent
//! as one plain write, copied together on the stack.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora_core::protocols::raw_connect::ProxyDigest;
use pingora_core::protocols::tls::{SslDigest, TlsRef};
use pingora_core::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType, ALPN, IO,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

use super::Listener;
use crate::http_util::socket_digest;
use crate::metrics::{ListenerMetrics, Metrics};

/// Writes smaller than this are gathered until a flush, or until the next write would not
/// fit (Pingora's own buffer size for connections: one Ethernet MSS).
const GATHER: usize = 1460;

/// A vectored write of at most this many bytes (an event with its chunk framing) is copied
/// together and sent with one plain write: the kernel's vectored write path costs more
/// than the copy (2.3% of the proxy's time at 9,000 streams went to `vfs_writev` alone).
const SEND_WHOLE: usize = 2048;

/// How often, at most, a listener at its cap says so in the log.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

/// One listener's admission: its cap, its count of open connections, its idle wait.
pub struct Gate {
    listener: Listener,
    open: AtomicUsize,
    metrics: ListenerMetrics,
    /// When the last refusal was logged, in milliseconds after `created`.
    logged: AtomicU64,
    created: Instant,
}

impl Gate {
    pub fn new(listener: &Listener, metrics: &Metrics) -> Arc<Gate> {
        Arc::new(Gate {
            metrics: metrics.listener(&listener.addr.to_string()),
            listener: listener.clone(),
            open: AtomicUsize::new(0),
            logged: AtomicU64::new(0),
            created: Instant::now(),
        })
    }

    /// The listener this gate admits to.
    pub fn listener(&self) -> &Listener {
        &self.listener
    }

    /// `stream`, admitted, and counted as served by `worker` when there is one: unless
    /// `max_connections` are open, when it is refused (counted, and dropped by the caller,
    /// which closes it).
    pub fn admit(
        self: &Arc<Self>,
        stream: Stream,
        worker: Option<(&Arc<Workers>, usize)>,
    ) -> Option<Admitted> {
        let Some(slot) = self.enter() else {
            self.refused();
            return None;
        };
        let (peer, local) = addresses(&*stream, &self.listener);
        Some(Admitted {
            peer,
            local,
            gathered: Vec::new(),
            first: first_deadline(&self.listener),
            in_head: false,
            on_line: true,
            next_head: AtomicU8::new(HEAD_NONE),
            gate: self.clone(),
            stream,
            _slot: slot,
            _served: worker.map(|(workers, w)| workers.serve(w)),
        })
    }

    /// A slot for one more connection, unless `max_connections` are open.
    fn enter(self: &Arc<Self>) -> Option<Slot> {
        let max = self.listener.max_connections;
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        self.metrics.open.inc();
        Some(Slot(self.clone()))
    }

    fn refused(&self) {
        self.metrics.refused.inc();
        let now = self.created.elapsed().as_millis() as u64;
        let last = self.logged.load(Ordering::Relaxed);
        let due = last == 0 || now.saturating_sub(last) >= REFUSAL_LOG_EVERY.as_millis() as u64;
        if due
            && self
                .logged
                .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            log::warn!(
                "listener {}: {} connections open (max_connections); closing new ones \
                 as they are accepted (counted in streamgate_connections_refused_total)",
                self.listener.addr,
                self.listener.max_connections
            );
        }
    }
}

/// A listener's slot, held as long as the connection is.
struct Slot(Arc<Gate>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        self.0.metrics.open.dec();
    }
}

impl fmt::Debug for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Slot({})", self.0.listener.addr)
    }
}

/// The worker threads of a listener group (one copy of the proxy each, every copy
/// accepting on the group's listeners): how many connections each serves, and how many
/// another has handed it that it has not admitted yet. What spreads connections over the
/// workers (`server::accept`): the kernel wakes every worker for a new connection and the
/// first to ask gets it, so a handful of connections (a burst of event streams) could all
/// land on one thread while the other idles.
pub struct Workers {
    serving: Box<[AtomicUsize]>,
    coming: Box<[AtomicUsize]>,
}

impl Workers {
    pub fn new(count: usize) -> Arc<Workers> {
        let counters = || (0..count).map(|_| AtomicUsize::new(0)).collect();
        Arc::new(Workers {
            serving: counters(),
            coming: counters(),
        })
    }

    fn load(&self, worker: usize) -> usize {
        self.serving[worker].load(Ordering::Relaxed) + self.coming[worker].load(Ordering::Relaxed)
    }

    /// The worker that should serve a connection `me` accepted, when it is not `me`: the
    /// least loaded other one, when `me` has at least one more than it and one in sixteen
    /// more (two connections spread one each, four two each; thousands move only when
    /// they are well apart, so few are handed on).
    pub fn lighter(&self, me: usize) -> Option<usize> {
        let mine = self.load(me);
        let (to, least) = (0..self.serving.len())
            .filter(|w| *w != me)
            .map(|w| (w, self.load(w)))
            .min_by_key(|(_, load)| *load)?;
        (mine > least + least / 16).then_some(to)
    }

    /// A connection is on its way to `worker`.
    pub fn coming(&self, worker: usize) {
        self.coming[worker].fetch_add(1, Ordering::Relaxed);
    }

    /// A connection on its way to `worker` reached it (it is admitted next, or dropped).
    pub fn arrived(&self, worker: usize) {
        let _ = self.coming[worker]
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    /// `worker` serves one more connection, until the guard drops.
    fn serve(self: &Arc<Self>, worker: usize) -> Served {
        self.serving[worker].fetch_add(1, Ordering::Relaxed);
        Served(self.clone(), worker)
    }
}

/// A connection counted as served by a worker, as long as it is open.
struct Served(Arc<Workers>, usize);

impl Drop for Served {
    fn drop(&mut self) {
        self.0.serving[self.1].fetch_sub(1, Ordering::Relaxed);
    }
}

/// The deadline a new connection starts with: its first bytes within `idle_timeout`. Made
/// also when only `request_header_timeout` is set (it is what the first bytes turn into),
/// then for as good as never.
fn first_deadline(listener: &Listener) -> Option<Pin<Box<Sleep>>> {
    const NEVER: Duration = Duration::from_secs(86_400 * 365);
    let wait = match (listener.idle_timeout, listener.request_header_timeout) {
        (Some(idle), _) => idle,
        (None, Some(_)) => NEVER,
        (None, None) => return None,
    };
    Some(Box::pin(tokio::time::sleep(wait)))
}

/// Nothing to do for a later request: none is expected, or its head's deadline runs.
const HEAD_NONE: u8 = 0;
/// A request of a kept-alive connection is about to be read: its first bytes start the
/// deadline for its head.
const HEAD_EXPECTED: u8 = 1;
/// The server has read the request's head: a deadline running for it is over.
const HEAD_READ: u8 = 2;

/// The admitted connection `stream` is, if it is one.
pub fn admitted(stream: &Stream) -> Option<&Admitted> {
    stream.as_any().downcast_ref()
}

/// The addresses of the client connection `stream`, accepted on `listener`, asked of the
/// kernel (the accept loop sets no digest): the local one only when the listener is bound
/// to the unspecified address, otherwise it is the listener's.
fn addresses(stream: &dyn IO, listener: &Listener) -> (Option<SocketAddr>, Option<SocketAddr>) {
    let peer = socket2::SockRef::from(&socket(stream))
        .peer_addr()
        .ok()
        .and_then(|a| a.as_socket());
    let local = Some(listener.addr)
        .filter(|addr| !addr.ip().is_unspecified())
        .or_else(|| local_addr(stream));
    (peer, local)
}

/// The address the client connection `stream` reached, asked of the kernel.
pub fn local_addr(stream: &dyn IO) -> Option<SocketAddr> {
    socket2::SockRef::from(&socket(stream))
        .local_addr()
        .ok()?
        .as_socket()
}

/// The socket of `stream`, to ask the kernel about.
fn socket(stream: &dyn IO) -> std::os::fd::BorrowedFd<'_> {
    // SAFETY: the descriptor is the stream's socket, open while `stream` is borrowed.
    unsafe { std::os::fd::BorrowedFd::borrow_raw(stream.id()) }
}

/// An admitted client connection: the stream itself, the listener's slot, and, until its
/// first bytes arrive, the deadline for them (`idle_timeout`), then, until the head of its
/// first request is read, the deadline for that (`request_header_timeout`); and the same
/// deadline for the head of each later request on the connection, from its first byte.
pub struct Admitted {
    stream: Stream,
    /// The client's address and the address it reached, for the socket digest each
    /// request's session is given ([`GetSocketDigest`]): kept here, 64 bytes, rather than
    /// as a digest (400) the connection would hold for as long as it is open.
    peer: Option<SocketAddr>,
    local: Option<SocketAddr>,
    /// Bytes written but not sent yet; empty and unallocated between flushes.
    gathered: Vec<u8>,
    gate: Arc<Gate>,
    first: Option<Pin<Box<Sleep>>>,
    /// `first` bounds a request's head (its first bytes came).
    in_head: bool,
    /// While `in_head`: the current line of the head has a byte other than CR so far; an
    /// LF that ends an empty line ends the head.
    on_line: bool,
    /// Where a later request's head stands (`HEAD_*`), as the server says.
    next_head: AtomicU8,
    _slot: Slot,
    /// The worker thread serving it, counted (when the listener has several).
    _served: Option<Served>,
}

impl Admitted {
    /// The server is about to read a request on this connection: its head is bounded by
    /// `request_header_timeout` from its first byte, as the first request's is. (The wait
    /// for that byte is the keep-alive wait, Pingora's.)
    pub fn expect_head(&self) {
        self.next_head.store(HEAD_EXPECTED, Ordering::Relaxed);
    }

    /// The server has read the head of the request it expected: the deadline is over
    /// (also when the head came whole with an earlier read, pipelined, and no read of its
    /// own started one).
    pub fn head_read(&self) {
        self.next_head.store(HEAD_READ, Ordering::Relaxed);
    }

    /// Bytes came: when a later request was expected, its head's deadline starts. The
    /// first request's deadlines are its own (`first` is running for them).
    fn start_head(&mut self) {
        let state = self.next_head.get_mut();
        if *state != HEAD_EXPECTED {
            return;
        }
        *state = HEAD_NONE;
        if self.first.is_some() {
            return;
        }
        if let Some(limit) = self.gate.listener.request_header_timeout {
            self.first = Some(Box::pin(tokio::time::sleep(limit)));
            self.in_head = true;
            self.on_line = true;
        }
    }

    fn idle_error(&mut self) -> io::Error {
        self.first = None;
        if self.in_head {
            self.gate.metrics.slow_head.inc();
            return io::Error::new(
                io::ErrorKind::TimedOut,
                "the client did not send its request head within the listener's \
                 request_header_timeout",
            );
        }
        self.gate.metrics.idle.inc();
        io::Error::new(
            io::ErrorKind::TimedOut,
            "the client sent nothing within the listener's idle_timeout",
        )
    }

    /// After a read that gave `got` while a deadline runs: the first bytes start the head's
    /// deadline (not for HTTP/2, whose connection preface comes first and whose requests are
    /// bounded by its own settings); the head's end (an empty line), or the end of the
    /// connection, ends it. A peek passes `consumed: false`: its bytes are read again.
    fn after_bytes(&mut self, got: &[u8], consumed: bool) {
        let Some(deadline) = self.first.as_mut() else {
            return;
        };
        if got.is_empty() {
            self.first = None;
            return;
        }
        if !self.in_head {
            self.in_head = true;
            match self.gate.listener.request_header_timeout {
                Some(limit) if !got.starts_with(b"PRI ") => {
                    deadline.as_mut().reset(tokio::time::Instant::now() + limit);
                }
                _ => {
                    self.first = None;
                    return;
                }
            }
        }
        if !consumed {
            return;
        }
        // Line by line (a head's lines are found with memchr, not byte by byte).
        let mut rest = got;
        while let Some(lf) = memchr::memchr(b'\n', rest) {
            if !self.on_line && rest[..lf].iter().all(|&b| b == b'\r') {
                self.first = None;
                return;
            }
            self.on_line = false;
            rest = &rest[lf + 1..];
        }
        self.on_line |= rest.iter().any(|&b| b != b'\r');
    }

    /// Sends what is gathered, and gives its memory back once it is all out.
    fn poll_send_gathered(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.gathered.is_empty() {
            let n = ready!(Pin::new(&mut self.stream).poll_write(cx, &self.gathered))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.gathered.drain(..n);
        }
        self.gathered = Vec::new();
        Poll::Ready(Ok(()))
    }

    /// Keeps `parts` (`len` bytes in all) to go with the next write.
    fn gather<'b>(
        &mut self,
        parts: impl IntoIterator<Item = &'b [u8]>,
        len: usize,
    ) -> Poll<io::Result<usize>> {
        if len == 0 {
            return Poll::Ready(Ok(0));
        }
        if self.gathered.capacity() == 0 {
            self.gathered.reserve_exact(GATHER);
        }
        for part in parts {
            self.gathered.extend_from_slice(part);
        }
        Poll::Ready(Ok(len))
    }
}

impl fmt::Debug for Admitted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Admitted")
            .field("stream", &self.stream)
            .field("waiting", &self.first.is_some())
            .finish()
    }
}

impl AsyncRead for Admitted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let got = &buf.filled()[before..];
                if !got.is_empty() {
                    this.start_head();
                }
                this.after_bytes(got, true);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => {
                this.first = None;
                Poll::Ready(Err(e))
            }
            Poll::Pending => {
                if this.first.is_some() && *this.next_head.get_mut() == HEAD_READ {
                    this.first = None;
                }
                match this.first.as_mut().map(|t| t.as_mut().poll(cx)) {
                    Some(Poll::Ready(())) => Poll::Ready(Err(this.idle_error())),
                    _ => Poll::Pending,
                }
            }
        }
    }
}

impl AsyncWrite for Admitted {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.gathered.len() + buf.len() > GATHER {
            ready!(this.poll_send_gathered(cx))?;
        }
        if buf.len() >= GATHER {
            return Pin::new(&mut this.stream).poll_write(cx, buf);
        }
        this.gather([buf], buf.len())
    }

    /// A vectored write comes whole (an event stream's chunk with its framing): it goes
    /// out at once, beside what was gathered before it if it fits there, in one plain write
    /// if it is small (see [`SEND_WHOLE`]), else as it is.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let len = bufs.iter().map(|b| b.len()).sum::<usize>();
        if !this.gathered.is_empty() {
            if this.gathered.len() + len <= GATHER {
                return this.gather(bufs.iter().map(|b| &**b), len);
            }
            ready!(this.poll_send_gathered(cx))?;
        }
        if bufs.len() > 1 && len <= SEND_WHOLE {
            // Not zeroed first: that alone cost as much as the copy.
            let mut space = [std::mem::MaybeUninit::<u8>::uninit(); SEND_WHOLE];
            let mut whole = ReadBuf::uninit(&mut space);
            for buf in bufs {
                whole.put_slice(buf);
            }
            return Pin::new(&mut this.stream).poll_write(cx, whole.filled());
        }
        Pin::new(&mut this.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send_gathered(cx))?;
        Pin::new(&mut this.stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send_gathered(cx))?;
        Pin::new(&mut this.stream).poll_shutdown(cx)
    }
}

#[async_trait]
impl Shutdown for Admitted {
    async fn shutdown(&mut self) {
        let _ = std::future::poll_fn(|cx| self.poll_send_gathered(cx)).await;
        self.stream.shutdown().await
    }
}

impl UniqueID for Admitted {
    fn id(&self) -> UniqueIDType {
        self.stream.id()
    }
}

impl Ssl for Admitted {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.stream.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.stream.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.stream.selected_alpn_proto()
    }
}

impl GetTimingDigest for Admitted {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.stream.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.stream.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.stream.get_write_pending_time()
    }
}

impl GetProxyDigest for Admitted {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.stream.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.stream.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for Admitted {
    /// One made now from the addresses kept here. Pingora asks once per request (an
    /// HTTP/1.x session holds it for the request) or per connection (HTTP/2), so an event
    /// stream carried apart from its request holds none.
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        let digest = socket_digest(self.stream.id(), self.peer, self.local);
        Some(Arc::new(digest))
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.stream.set_socket_digest(digest)
    }
}

#[async_trait]
impl Peek for Admitted {
    /// Peeking (Pingora looks for the HTTP/2 preface on h2c listeners) waits for bytes too:
    /// it is bounded by the same deadline as a first read.
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        let Some(deadline) = self.first.as_mut() else {
            return self.stream.try_peek(buf).await;
        };
        let peeked = tokio::select! {
            peeked = self.stream.try_peek(buf) => peeked,
            () = deadline.as_mut() => return Err(self.idle_error()),
        };
        match &peeked {
            Ok(true) => self.after_bytes(buf, false),
            _ => self.first = None,
        }
        peeked
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use pingora_core::protocols::l4::socket::SocketAddr as PeerAddr;
    use pingora_core::protocols::l4::stream::Stream as L4Stream;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;
    use crate::listen::ListenerKind;

    /// An admitted connection over real loopback sockets (unbuffered, as the listeners
    /// make them), and the peer that reads what it sends.
    async fn admitted() -> (Admitted, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr: SocketAddr = listener.local_addr().expect("address");
        let peer = TcpStream::connect(addr).await.expect("connect");
        let (accepted, _) = listener.accept().await.expect("accept");
        let gate = Gate::new(
            &Listener::new(addr, ListenerKind::Plain { h2c: false }),
            &Metrics::new(),
        );
        let slot = gate.enter().expect("a slot");
        let stream: Stream = Box::new(L4Stream::from(accepted));
        let (peer_addr, local) = addresses(&*stream, gate.listener());
        let admitted = Admitted {
            stream,
            peer: peer_addr,
            local,
            gathered: Vec::new(),
            gate,
            first: None,
            in_head: false,
            on_line: true,
            next_head: AtomicU8::new(HEAD_NONE),
            _slot: slot,
            _served: None,
        };
        (admitted, peer)
    }

    /// A client of a listener bound to `bind`, and its connection as the gate admits it.
    async fn admit(bind: &str) -> (Admitted, TcpStream) {
        let listener = TcpListener::bind(bind).await.expect("bind");
        let addr: SocketAddr = listener.local_addr().expect("address");
        let port = addr.port();
        let client = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        let (accepted, _) = listener.accept().await.expect("accept");
        let gate = Gate::new(
            &Listener::new(addr, ListenerKind::Plain { h2c: false }),
            &Metrics::new(),
        );
        let admitted = gate
            .admit(Box::new(L4Stream::from(accepted)), None)
            .expect("admitted");
        (admitted, client)
    }

    /// The connection holds its two addresses, not a digest of them: each request's
    /// session is given a digest made when it asks, with both (the local one the
    /// listener's, not asked of the kernel), which goes with the session.
    #[tokio::test]
    async fn each_session_is_given_a_digest_of_the_addresses_and_the_connection_holds_none() {
        let (admitted, client) = admit("127.0.0.1:0").await;
        assert!(admitted.stream.get_socket_digest().is_none());
        let digest = admitted.get_socket_digest().expect("a digest");
        let inet = |a: Option<&PeerAddr>| a.and_then(PeerAddr::as_inet).copied();
        assert_eq!(
            inet(digest.peer_addr.get().and_then(Option::as_ref)),
            Some(client.local_addr().expect("address"))
        );
        assert_eq!(
            inet(digest.local_addr.get().and_then(Option::as_ref)),
            Some(client.peer_addr().expect("address")),
            "set, not asked of the kernel"
        );
        let again = admitted.get_socket_digest().expect("a digest");
        assert!(!Arc::ptr_eq(&digest, &again), "made for each session");
        assert_eq!(Arc::strong_count(&digest), 1, "held by nobody else");
    }

    /// On the unspecified address only the kernel knows which address a connection
    /// reached: it is asked once, as the connection is admitted.
    #[tokio::test]
    async fn a_connection_to_the_unspecified_address_asks_for_its_local_address() {
        let (admitted, client) = admit("0.0.0.0:0").await;
        let digest = admitted.get_socket_digest().expect("a digest");
        assert_eq!(
            digest.local_addr().and_then(PeerAddr::as_inet).copied(),
            Some(client.peer_addr().expect("address"))
        );
        assert_eq!(
            digest.peer_addr().and_then(PeerAddr::as_inet).copied(),
            Some(client.local_addr().expect("address"))
        );
    }

    /// Reads from `peer` until `want` bytes arrived.
    async fn read_exactly(peer: &mut TcpStream, want: usize) -> Vec<u8> {
        let mut got = vec![0; want];
        peer.read_exact(&mut got).await.expect("read");
        got
    }

    #[tokio::test]
    async fn small_writes_are_gathered_until_a_flush_and_the_buffer_is_given_back() {
        let (mut conn, mut peer) = admitted().await;
        conn.write_all(b"HTTP/1.1 200 OK\r\n\r\n")
            .await
            .expect("io");
        conn.write_all(b"hello").await.expect("io");
        assert_eq!(
            conn.gathered, b"HTTP/1.1 200 OK\r\n\r\nhello",
            "nothing sent yet"
        );
        conn.flush().await.expect("io");
        assert!(conn.gathered.is_empty());
        assert_eq!(conn.write(b"").await.expect("io"), 0);
        assert_eq!(
            conn.gathered.capacity(),
            0,
            "no memory held between flushes"
        );
        assert_eq!(
            read_exactly(&mut peer, 24).await,
            b"HTTP/1.1 200 OK\r\n\r\nhello"
        );
    }

    #[tokio::test]
    async fn writes_that_do_not_fit_go_out_in_order_after_what_was_gathered() {
        let (mut conn, mut peer) = admitted().await;
        let big = vec![b'x'; GATHER * 3];
        conn.write_all(b"head").await.expect("io");
        conn.write_all(&big).await.expect("io");
        assert!(conn.gathered.is_empty(), "sent before the large write");
        conn.write_all(&vec![b'y'; GATHER - 10]).await.expect("io");
        conn.write_all(b"0123456789abc").await.expect("io");
        conn.flush().await.expect("io");
        let got = read_exactly(&mut peer, 4 + big.len() + GATHER - 10 + 13).await;
        assert_eq!(&got[..4], b"head");
        assert!(got[4..4 + big.len()].iter().all(|&b| b == b'x'));
        let rest = &got[4 + big.len()..];
        assert!(rest[..GATHER - 10].iter().all(|&b| b == b'y'));
        assert_eq!(&rest[GATHER - 10..], b"0123456789abc");
    }

    #[tokio::test]
    async fn a_vectored_write_passes_through_or_joins_what_was_gathered() {
        let (mut conn, mut peer) = admitted().await;
        let parts = [
            io::IoSlice::new(b"5\r\n"),
            io::IoSlice::new(b"data\n"),
            io::IoSlice::new(b"\r\n"),
        ];
        let n = conn.write_vectored(&parts).await.expect("io");
        assert_eq!(n, 10);
        assert_eq!(
            conn.gathered.capacity(),
            0,
            "nothing gathered for a whole chunk"
        );
        conn.write_all(b"h").await.expect("io");
        let n = conn.write_vectored(&parts).await.expect("io");
        assert_eq!(n, 10);
        assert_eq!(conn.gathered, b"h5\r\ndata\n\r\n");
        conn.flush().await.expect("io");
        // Larger than what is sent whole: it goes as it is, in order.
        let big = vec![b'z'; SEND_WHOLE + 1];
        let mut large = [
            io::IoSlice::new(b"801\r\n"),
            io::IoSlice::new(&big),
            io::IoSlice::new(b"\r\n"),
        ];
        let mut left = &mut large[..];
        while !left.is_empty() {
            let n = conn.write_vectored(left).await.expect("io");
            io::IoSlice::advance_slices(&mut left, n);
        }
        AsyncWriteExt::shutdown(&mut conn).await.expect("io");
        let mut all = Vec::new();
        peer.read_to_end(&mut all).await.expect("io");
        let mut want = b"5\r\ndata\n\r\nh5\r\ndata\n\r\n801\r\n".to_vec();
        want.extend_from_slice(&big);
        want.extend_from_slice(b"\r\n");
        assert_eq!(all, want, "every write in order, the gathered one on flush");
    }

    /// A worker hands a connection on only to one with fewer: by one when few are open,
    /// by one in sixteen when many are.
    #[test]
    fn a_connection_goes_to_a_worker_with_fewer() {
        let workers = Workers::new(2);
        let serve = |w: usize, n: usize| (0..n).map(|_| workers.serve(w)).collect::<Vec<_>>();
        assert_eq!(workers.lighter(0), None, "none open");
        let a = serve(0, 1);
        assert_eq!(workers.lighter(0), Some(1));
        assert_eq!(workers.lighter(1), None);
        let _b = serve(1, 1);
        assert_eq!(workers.lighter(0), None, "one each");
        let _a2 = serve(0, 99);
        let _b2 = serve(1, 94);
        assert_eq!(workers.lighter(0), None, "100 against 95");
        let _a3 = serve(0, 2);
        assert_eq!(workers.lighter(0), Some(1), "102 against 95");
        // Those on their way count as served.
        workers.coming(1);
        workers.coming(1);
        assert_eq!(workers.lighter(0), None, "102 against 97");
        workers.arrived(1);
        workers.arrived(1);
        drop(a);
        assert_eq!(
            workers.lighter(0),
            Some(1),
            "a closed connection is not counted"
        );
    }
}
