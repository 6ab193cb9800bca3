//! The accept loop of every listener: a new connection is served at once, in the loop's
//! own turn, as far as it goes without waiting (a plain connection's request read,
//! routed, its origin connected and sent the request; a TLS one's handshake answered),
//! and the rest of it runs in a task of its own.
//!
//! Pingora's accept loop spawns a task for each connection and goes on accepting. With
//! one thread per runtime (`work_stealing: false`, the default) the new task is queued
//! behind every task already ready (under load, every stream with an event to relay),
//! so a connection waited that long before its request was even read: 156-197 µs per
//! open on average while 9,000 streams ran, against 81 µs from nginx's accept to its
//! read of the request. The connection's first turn here runs where it was accepted,
//! as the first turn of an event stream does (`relay::exchange::start`), whose future is
//! then moved to its own task.
//!
//! What a connection is given is what Pingora's loop gives it: `TCP_NODELAY` on, the
//! listener's keepalive inherited from the listening socket; over TLS, the handshake made
//! by Pingora's acceptor within 60 s. A plain connection is the socket alone
//! (`net::Tcp`), not Pingora's L4 stream (376 bytes for as long as it is open, see `net`),
//! which TLS's acceptor takes, and neither holds a socket digest (its addresses, 400
//! bytes): its admission keeps the two addresses and gives each request's session a digest
//! of them (`listen::admission::Admitted`), so an event stream carried apart from its
//! request holds none. The stream has no read or write buffer of its own. Pingora's listeners default to a 64 KiB
//! read buffer per connection, zeroed when it is accepted: for an event stream, whose
//! client sends one request head and then only listens, most of what the stream would
//! cost; Pingora reads request heads and bodies into buffers of their own, so the socket
//! is read directly. Nor a write buffer (Pingora's is 1,460 bytes, kept for the
//! connection's life): an admitted connection gathers small writes only while it has some
//! (see `listen::admission::Admitted`). The app then serves it, request after
//! request, as Pingora's `handle_event` does.
//!
//! With several worker threads (a copy of the proxy on each, all accepting on the same
//! listening sockets), the kernel wakes them all for a new connection and the first to
//! ask gets it: a few connections (four event streams in a burst) could all land on one
//! thread while the other idles, a quarter of the rate either way from run to run. So a
//! worker that serves more connections than another (`listen::admission::Workers`) hands
//! the one it accepted to the least loaded worker's loop ([`Spread`]), which serves it as
//! if it had accepted it: connections spread as HAProxy's threads spread theirs.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use pingora_core::apps::ServerApp;
use pingora_core::listeners::tls::Acceptor;
use pingora_core::protocols::l4::stream::Stream as L4Stream;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::listening::Service;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

use crate::listen::admission::Workers;
use crate::net::Tcp;
use crate::relay::exchange::{start, Apart};

/// How long accepting pauses after the process ran out of descriptors (as Pingora's loop
/// does): the connections waiting meanwhile stay in the listen queue.
const OUT_OF_DESCRIPTORS_PAUSE: Duration = Duration::from_secs(1);

/// How long a client has for its TLS handshake (Pingora's bound).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);

/// A connection accepted, with its peer's address.
type Accepted = (TcpStream, SocketAddr);

/// Where one worker's loop on one listener takes connections that other workers accepted
/// on it and handed over.
#[derive(Default)]
pub struct Inbox {
    queue: parking_lot::Mutex<Queue>,
    notify: Notify,
}

#[derive(Default)]
struct Queue {
    connections: VecDeque<Accepted>,
    /// The loop has stopped: nothing is handed over any more.
    closed: bool,
}

impl Inbox {
    /// Leaves `conn` for the loop; gives it back when the loop has stopped.
    fn hand(&self, conn: Accepted) -> Option<Accepted> {
        let mut queue = self.queue.lock();
        if queue.closed {
            return Some(conn);
        }
        queue.connections.push_back(conn);
        drop(queue);
        self.notify.notify_one();
        None
    }

    fn take(&self) -> Option<Accepted> {
        self.queue.lock().connections.pop_front()
    }

    /// Stops taking connections; those left are returned.
    fn close(&self) -> VecDeque<Accepted> {
        let mut queue = self.queue.lock();
        queue.closed = true;
        std::mem::take(&mut queue.connections)
    }
}

/// How one worker's loop on a listener spreads connections: the group's workers, their
/// inboxes on this listener (one each), and which worker this loop is.
pub struct Spread {
    pub workers: Arc<Workers>,
    pub inboxes: Arc<[Inbox]>,
    pub me: usize,
}

impl Spread {
    /// Hands `conn` to a less loaded worker's loop, if one should serve it; else (or when
    /// that loop has stopped) gives it back.
    fn pass(&self, conn: Accepted) -> Option<Accepted> {
        let Some(to) = self.workers.lighter(self.me) else {
            return Some(conn);
        };
        self.workers.coming(to);
        let back = self.inboxes[to].hand(conn);
        if back.is_some() {
            self.workers.arrived(to);
        }
        back
    }

    fn inbox(&self) -> &Inbox {
        &self.inboxes[self.me]
    }

    /// The next connection handed to this loop, now arriving.
    fn take(&self) -> Option<Accepted> {
        let conn = self.inbox().take()?;
        self.workers.arrived(self.me);
        Some(conn)
    }
}

/// Accepts connections on `listener` until the server shuts down, each served by `app`,
/// over TLS with `tls`, spread over the group's workers with `spread` (see the module
/// docs). `name` names the listener in the log.
pub async fn serve<A: ServerApp + Send + Sync + 'static>(
    listener: std::net::TcpListener,
    tls: Option<Arc<Acceptor>>,
    app: Arc<A>,
    mut shutdown: ShutdownWatch,
    name: &str,
    spread: Option<Spread>,
) {
    let listener = match TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(e) => {
            log::error!("{name}: cannot listen: {e}; not serving it");
            return;
        }
    };
    let watch = shutdown.clone();
    let serve_one = |(stream, peer): Accepted| {
        let (app, shutdown) = (app.clone(), watch.clone());
        let served: Apart = match &tls {
            None => Box::pin(Service::<A>::handle_event(
                Box::new(Tcp::from(stream)),
                app,
                shutdown,
            )),
            Some(tls) => Box::pin(secured(
                tls.clone(),
                L4Stream::from(stream),
                peer,
                app,
                shutdown,
            )),
        };
        start(served)
    };
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = handed(spread.as_ref()) => {
                while let Some(conn) = spread.as_ref().and_then(Spread::take) {
                    serve_one(conn).await;
                }
                continue;
            }
            changed = shutdown.changed() => {
                if changed.is_err() || *shutdown.borrow() {
                    log::info!("Shutting down {name}");
                    break;
                }
                continue;
            }
        };
        match accepted {
            Ok((tcp, peer)) => {
                let Some(stream) = connection(tcp, peer) else {
                    continue;
                };
                let conn = match &spread {
                    Some(spread) => spread.pass((stream, peer)),
                    None => Some((stream, peer)),
                };
                if let Some(conn) = conn {
                    serve_one(conn).await;
                }
            }
            Err(e) => {
                log::error!("{name}: accept failed: {e}");
                if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) {
                    tokio::time::sleep(OUT_OF_DESCRIPTORS_PAUSE).await;
                }
            }
        }
    }
    // Connections handed over before the loop stopped are served, not dropped.
    if let Some(spread) = &spread {
        for conn in spread.inbox().close() {
            spread.workers.arrived(spread.me);
            serve_one(conn).await;
        }
    }
}

/// Waits until a connection is handed to this loop (never without `spread`).
async fn handed(spread: Option<&Spread>) {
    match spread {
        Some(spread) => spread.inbox().notify.notified().await,
        None => std::future::pending().await,
    }
}

/// An accepted connection with `TCP_NODELAY` on. `None` (logged at debug) when the socket
/// cannot be set up: the peer is gone already.
fn connection(tcp: TcpStream, peer: SocketAddr) -> Option<TcpStream> {
    if let Err(e) = tcp.set_nodelay(true) {
        log::debug!("a connection from {peer} closed as it was accepted: {e}");
        return None;
    }
    Some(tcp)
}

/// Serves `stream` over TLS once its handshake is made (within [`HANDSHAKE_TIMEOUT`]);
/// a failed handshake is logged, as Pingora's loop does.
async fn secured<A: ServerApp + Send + Sync + 'static>(
    tls: Arc<Acceptor>,
    stream: L4Stream,
    peer: SocketAddr,
    app: Arc<A>,
    shutdown: ShutdownWatch,
) {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.tls_handshake(stream)).await {
        Ok(Ok(stream)) => Service::<A>::handle_event(Box::new(stream), app, shutdown).await,
        Ok(Err(e)) => log::error!("Downstream handshake error from {peer}: {e}"),
        Err(_) => log::error!("Downstream handshake timeout from {peer}"),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use async_trait::async_trait;
    use pingora_core::protocols::Stream;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::task::Id;

    use super::*;

    /// What the app saw of one connection.
    #[derive(Debug, Clone, Copy)]
    struct Seen {
        /// The task its first turn ran in, and the task the rest ran in.
        first: Option<Id>,
        rest: Option<Id>,
        nodelay: bool,
        /// Whether the stream holds a socket digest.
        digest: bool,
        /// Whether it is the socket alone (`net::Tcp`).
        socket_alone: bool,
    }

    /// Answers `hello` with `ok`, then waits for `bye`.
    #[derive(Default)]
    struct Greeter(Mutex<Vec<Seen>>);

    #[async_trait]
    impl ServerApp for Greeter {
        async fn process_new(
            self: &Arc<Self>,
            mut stream: Stream,
            _shutdown: &ShutdownWatch,
        ) -> Option<Stream> {
            let first = tokio::task::try_id();
            let mut hello = [0u8; 5];
            stream.read_exact(&mut hello).await.ok()?;
            stream.write_all(b"ok").await.ok()?;
            stream.flush().await.ok()?;
            let mut bye = [0u8; 3];
            stream.read_exact(&mut bye).await.ok()?;
            // SAFETY: the stream owns its descriptor and keeps it open for this borrow.
            let socket = unsafe { std::os::fd::BorrowedFd::borrow_raw(stream.id()) };
            self.0.lock().expect("lock").push(Seen {
                first,
                rest: tokio::task::try_id(),
                nodelay: socket2::SockRef::from(&socket)
                    .tcp_nodelay()
                    .unwrap_or(false),
                digest: stream.get_socket_digest().is_some(),
                socket_alone: crate::net::tcp(&*stream).is_some(),
            });
            None
        }
    }

    /// Serves one connection to 127.0.0.1 on a listener bound to `bind`, stops the loop
    /// and reports what the app saw, the address it reached and the loop's task.
    async fn greet(bind: &str) -> (Seen, SocketAddr, Id) {
        let listener = std::net::TcpListener::bind(bind).expect("bind");
        listener.set_nonblocking(true).expect("non-blocking");
        let port = listener.local_addr().expect("address").port();
        let app = Arc::new(Greeter::default());
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        let serving = tokio::spawn({
            let app = app.clone();
            async move { serve(listener, None, app, shutdown, "test", None).await }
        });
        let reached = SocketAddr::from(([127, 0, 0, 1], port));
        let mut client = TcpStream::connect(reached).await.expect("connect");
        client.write_all(b"hello").await.expect("write");
        let mut ok = [0u8; 2];
        client.read_exact(&mut ok).await.expect("read");
        assert_eq!(&ok, b"ok");
        client.write_all(b"bye").await.expect("write");
        let seen = loop {
            if let Some(seen) = app.0.lock().expect("lock").first().copied() {
                break seen;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let task = serving.id();
        stop.send(true).expect("the loop listens");
        serving.await.expect("the loop ends");
        drop(client);
        (seen, reached, task)
    }

    /// A connection is served in the accept loop's task up to its first wait (its answer
    /// to `hello` is written there), and in a task of its own after it; it is given
    /// `TCP_NODELAY`, as the socket alone, with no socket digest (its admission keeps the
    /// addresses, see `listen::admission`). The loop ends when the server shuts down, and closes its
    /// listening socket.
    #[tokio::test]
    async fn a_connection_takes_its_first_turn_in_the_accept_loop() {
        let (seen, reached, task) = greet("127.0.0.1:0").await;
        assert_eq!(seen.first, Some(task), "the first turn, in the loop's task");
        assert!(
            seen.rest.is_some() && seen.rest != seen.first,
            "the rest, in a task of its own"
        );
        assert!(seen.nodelay);
        assert!(!seen.digest, "no digest held by the connection");
        assert!(seen.socket_alone, "not Pingora's L4 stream");
        assert!(
            TcpStream::connect(reached).await.is_err(),
            "the listening socket is closed with the loop"
        );
    }

    /// Notes the thread that serves each connection, and holds it until its client goes.
    struct Holder(Arc<Mutex<Vec<std::thread::ThreadId>>>);

    #[async_trait]
    impl pingora_core::apps::HttpServerApp for Holder {
        async fn process_new_http(
            self: &Arc<Self>,
            mut session: pingora_core::protocols::http::ServerSession,
            _shutdown: &ShutdownWatch,
        ) -> Option<pingora_core::apps::ReusedHttpStream> {
            self.0
                .lock()
                .expect("lock")
                .push(std::thread::current().id());
            let _ = session.read_request().await;
            None
        }
    }

    /// Two workers, each a loop on a thread of its own accepting on one listener, spread
    /// four connections two and two, whichever of them the kernel gives each one to (it
    /// wakes both, the first to ask gets it): the worker that serves more hands the one it
    /// accepted to the other's loop, where it is served.
    #[tokio::test]
    async fn connections_spread_over_the_workers() {
        use crate::listen::admission::Gate;
        use crate::listen::{Listener, ListenerKind};
        use crate::metrics::Metrics;
        use crate::server::admission::Admitting;

        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("non-blocking");
        let addr = listener.local_addr().expect("address");
        let gate = Gate::new(
            &Listener::new(addr, ListenerKind::Plain { h2c: false }),
            &Metrics::new(),
        );
        let workers = Workers::new(2);
        let inboxes: Arc<[Inbox]> = (0..2).map(|_| Inbox::default()).collect();
        let served = Arc::new(Mutex::new(Vec::new()));
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        let threads: Vec<_> = (0..2)
            .map(|me| {
                let listener = listener.try_clone().expect("a duplicate");
                let app = Admitting::new(Holder(served.clone()), vec![gate.clone()])
                    .worker(workers.clone(), me);
                let spread = Spread {
                    workers: workers.clone(),
                    inboxes: inboxes.clone(),
                    me,
                };
                let shutdown = shutdown.clone();
                std::thread::spawn(move || {
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("a runtime")
                        .block_on(serve(
                            listener,
                            None,
                            Arc::new(app),
                            shutdown,
                            "test",
                            Some(spread),
                        ))
                })
            })
            .collect();
        drop(listener);
        let mut clients = Vec::new();
        for n in 1..=4 {
            clients.push(TcpStream::connect(addr).await.expect("connect"));
            while served.lock().expect("lock").len() < n {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        let served = served.lock().expect("lock").clone();
        let on_first = served.iter().filter(|t| **t == served[0]).count();
        assert_eq!(on_first, 2, "two connections on each thread: {served:?}");
        stop.send(true).expect("the loops listen");
        drop(clients);
        for thread in threads {
            thread.join().expect("the loop ends");
        }
    }
}
