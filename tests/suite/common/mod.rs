//! Test harness: a scriptable HTTP/1.1 origin on a real socket, the proxy started from
//! `build_server` on a real socket, and helpers to read SSE events as a client sees them.
//!
//! Every test gets its own Pingora server with its own state (so tests may share a process,
//! as under plain `cargo test`); it is never shut down, the process exit ends it.

#![allow(dead_code)]

pub mod binary;
pub mod ca;
pub mod logs;
pub mod raw;
pub mod resume;

use std::future::Future;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::server::{RunArgs, ShutdownSignal, ShutdownSignalWatch};
use streamgate::{build_server, Config, State};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// Upper bound for anything a test awaits: a hang fails the test instead of stalling CI.
pub const GUARD: Duration = Duration::from_secs(10);

/// Awaits `fut`, failing the test if it takes longer than [`GUARD`].
pub async fn guard<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(GUARD, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out waiting for: {what}"),
    }
}

/// Polls `check` until it holds (at most [`GUARD`]): for state the test can only observe.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    guard(what, async {
        while !check().await {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

/// An origin whose every stream sends `count` events made by `event`, each only after the
/// test acknowledged the previous one on the returned sender.
pub async fn lockstep(
    count: usize,
    event: fn(usize) -> String,
) -> (Origin, mpsc::UnboundedSender<()>) {
    let (ack_tx, ack_rx) = mpsc::unbounded_channel::<()>();
    let ack_rx = Arc::new(tokio::sync::Mutex::new(ack_rx));
    let origin = Origin::start(move |_, mut conn| {
        let ack_rx = ack_rx.clone();
        async move {
            let mut acks = ack_rx.lock().await;
            conn.sse_head().await.expect("head");
            for i in 0..count {
                conn.chunk(&event(i)).await.expect("event");
                if acks.recv().await.is_none() {
                    break;
                }
            }
            let _ = conn.end().await;
            After::Close
        }
    })
    .await;
    (origin, ack_tx)
}

/// A request as the origin received it.
#[derive(Debug, Clone)]
pub struct Head {
    pub method: String,
    pub target: String,
    pub headers: Vec<(String, String)>,
}

impl Head {
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }

    /// Every value of header `name`, in order.
    pub fn headers_named(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// The first value of header `name` among `headers`.
pub fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// A connection to the origin, handed to the test's handler after the request head.
pub struct Conn {
    pub reader: BufReader<TcpStream>,
}

impl Conn {
    pub async fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.reader.get_mut().write_all(bytes).await
    }

    /// A complete response with a `Content-Length` body.
    pub async fn respond(&mut self, status: u16, body: &str) -> std::io::Result<()> {
        let head = format!(
            "HTTP/1.1 {status} X\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        self.write(head.as_bytes()).await
    }

    /// The head of a chunked `text/event-stream` response.
    pub async fn sse_head(&mut self) -> std::io::Result<()> {
        self.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n",
        )
        .await
    }

    /// One chunk of a chunked body.
    pub async fn chunk(&mut self, data: &str) -> std::io::Result<()> {
        let framed = format!("{:x}\r\n{data}\r\n", data.len());
        self.write(framed.as_bytes()).await
    }

    /// The terminating chunk.
    pub async fn end(&mut self) -> std::io::Result<()> {
        self.write(b"0\r\n\r\n").await
    }

    /// Reads the request body `head` announced (by Content-Length or chunked), whole.
    pub async fn read_body(&mut self, head: &Head) -> std::io::Result<Vec<u8>> {
        let mut body = Vec::new();
        if head
            .header("transfer-encoding")
            .is_some_and(|te| te.eq_ignore_ascii_case("chunked"))
        {
            while let Some(chunk) = self.read_chunk().await? {
                body.extend_from_slice(&chunk);
            }
            return Ok(body);
        }
        let len: usize = head
            .header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        body.resize(len, 0);
        self.reader.read_exact(&mut body).await?;
        Ok(body)
    }

    /// Reads one chunk of a chunked request body; `None` after the last chunk (and its
    /// empty trailer line).
    pub async fn read_chunk(&mut self) -> std::io::Result<Option<Vec<u8>>> {
        let mut line = String::new();
        if self.reader.read_line(&mut line).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
            .map_err(|_| std::io::Error::other(format!("bad chunk size {line:?}")))?;
        let mut data = vec![0u8; size + 2];
        if size == 0 {
            // The empty line after the last chunk (no trailers from the proxy).
            line.clear();
            self.reader.read_line(&mut line).await?;
            return Ok(None);
        }
        self.reader.read_exact(&mut data).await?;
        data.truncate(size);
        Ok(Some(data))
    }

    /// Waits until the peer (the proxy) closes the connection.
    pub async fn closed(&mut self) {
        let mut buf = [0u8; 1024];
        loop {
            match self.reader.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }
}

/// What a handler decides after answering: keep the connection for the next request or not.
pub enum After {
    KeepAlive(Conn),
    Close,
}

/// A scriptable origin on 127.0.0.1.
pub struct Origin {
    pub addr: SocketAddr,
    /// Every request head, in arrival order.
    pub requests: mpsc::UnboundedReceiver<Head>,
    connections: Arc<AtomicUsize>,
    accepting: tokio::task::JoinHandle<()>,
}

impl Origin {
    /// Starts an origin whose `handler` answers each request.
    pub async fn start<F, Fut>(handler: F) -> Origin
    where
        F: Fn(Head, Conn) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = After> + Send + 'static,
    {
        Origin::start_at("127.0.0.1:0", handler).await
    }

    /// [`Origin::start`], where each request first reports what the origin had read with
    /// its head, before reading anything more (`seen`: how much of the body came with it).
    pub async fn start_seeing<F, Fut>(handler: F) -> (Origin, mpsc::UnboundedReceiver<Vec<u8>>)
    where
        F: Fn(Head, Conn) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = After> + Send + 'static,
    {
        use tokio::io::AsyncBufReadExt;
        let (seen_tx, seen) = mpsc::unbounded_channel::<Vec<u8>>();
        let handler = Arc::new(handler);
        let origin = Origin::start(move |head, mut conn| {
            let (seen_tx, handler) = (seen_tx.clone(), handler.clone());
            async move {
                let with_head = conn.reader.fill_buf().await.expect("read").to_vec();
                let _ = seen_tx.send(with_head);
                handler(head, conn).await
            }
        })
        .await;
        (origin, seen)
    }

    /// [`Origin::start`] on a given address (another loopback address, a given port).
    pub async fn start_at<F, Fut>(bind: &str, handler: F) -> Origin
    where
        F: Fn(Head, Conn) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = After> + Send + 'static,
    {
        let listener = TcpListener::bind(bind).await.expect("bind origin");
        let addr = listener.local_addr().expect("origin addr");
        let (tx, requests) = mpsc::unbounded_channel();
        let connections = Arc::new(AtomicUsize::new(0));
        let handler = Arc::new(handler);
        let count = connections.clone();
        let accepting = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let handler = handler.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut conn = Conn {
                        reader: BufReader::new(stream),
                    };
                    while let Some(head) = read_head(&mut conn.reader).await {
                        let _ = tx.send(head.clone());
                        match handler(head, conn).await {
                            After::KeepAlive(c) => conn = c,
                            After::Close => return,
                        }
                    }
                });
            }
        });
        Origin {
            addr,
            requests,
            connections,
            accepting,
        }
    }

    /// Stops listening: new connections are refused; open ones carry on.
    pub fn stop(&self) {
        self.accepting.abort();
    }

    /// An origin that answers every request with `200` and `body`, keeping connections.
    pub async fn plain(body: &'static str) -> Origin {
        Origin::start(move |_, mut conn| async move {
            match conn.respond(200, body).await {
                Ok(()) => After::KeepAlive(conn),
                Err(_) => After::Close,
            }
        })
        .await
    }

    /// An origin that answers a `POST` (its body read) with a short event stream, one
    /// `data: token` event, and any other request with `200` and `body`, keeping
    /// connections: an LLM endpoint's shape.
    pub async fn post_streams(body: &'static str) -> Origin {
        Origin::start(move |head, mut conn| async move {
            let _ = conn.read_body(&head).await;
            let answered = if head.method == "POST" {
                async {
                    conn.sse_head().await?;
                    conn.chunk("data: token\n\n").await?;
                    conn.end().await
                }
                .await
            } else {
                conn.respond(200, body).await
            };
            match answered {
                Ok(()) => After::KeepAlive(conn),
                Err(_) => After::Close,
            }
        })
        .await
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    pub async fn next_request(&mut self) -> Head {
        guard("the origin to receive a request", self.requests.recv())
            .await
            .expect("origin request channel")
    }
}

/// Reads one request head (request line and headers) off `reader`; `None` at the end of
/// the connection.
pub async fn read_head<R: AsyncBufRead + Unpin>(reader: &mut R) -> Option<Head> {
    let mut line = String::new();
    if reader.read_line(&mut line).await.ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let target = parts.next()?.to_string();
    let mut headers = Vec::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).await.ok()? == 0 {
            return None;
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':')?;
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    Some(Head {
        method,
        target,
        headers,
    })
}

/// Takes the first whole SSE event (up to its blank line) off the front of `buf`.
pub fn take_event(buf: &mut String) -> Option<String> {
    let end = buf.find("\n\n")?;
    let event = buf[..end].to_string();
    buf.drain(..end + 2);
    Some(event)
}

/// `N` ports that were free a moment ago.
pub fn free_ports<const N: usize>() -> [u16; N] {
    std::array::from_fn(|_| free_port())
}

/// The server's side (`server`, the address it listens on) of the client connection
/// `conn`, from /proc/net/tcp: its state (1 established, 3 a connection the kernel has
/// not handed over yet), its timer's kind (0 none, 1 retransmit, 2 keepalive) and how long
/// until that fires.
pub fn server_side(server: SocketAddr, conn: &TcpStream) -> (u8, u8, Duration) {
    let hex = |a: SocketAddr| match a {
        SocketAddr::V4(v4) => format!(
            "{:08X}:{:04X}",
            u32::from_le_bytes(v4.ip().octets()),
            v4.port()
        ),
        SocketAddr::V6(_) => unreachable!("the tests listen on 127.0.0.1"),
    };
    let (local, remote) = (hex(server), hex(conn.local_addr().expect("address")));
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    let row = table
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() > 5 && f[1] == local && f[2] == remote)
        .expect("the server's side of the connection");
    let state = u8::from_str_radix(row[3], 16).expect("state");
    let (kind, when) = row[5].split_once(':').expect("tr:tm->when");
    let kind = u8::from_str_radix(kind, 16).expect("timer kind");
    // In clock ticks (USER_HZ, 100 a second).
    let ticks = u64::from_str_radix(when, 16).expect("timer expiry");
    (state, kind, Duration::from_millis(ticks * 10))
}

/// A port for a listener that a proxy binds a moment later. Not one the kernel picks
/// (`bind` to port 0): every outgoing connection of every test process takes its local port
/// from the same ephemeral range, and one could take this port before the proxy binds it,
/// leaving a test to talk to another test's listener. Ports come instead from below that
/// range, handed out in turn to all the test processes of a run through a locked counter
/// file; one that something else holds is skipped.
pub fn free_port() -> u16 {
    const FIRST: u32 = 15_000;
    let end = ephemeral_low().min(32_768);
    let kernels = || {
        StdListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port()
    };
    if end < FIRST + 1_000 {
        return kernels();
    }
    let path = std::env::temp_dir().join("streamgate-test-ports");
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path);
    // Another user's counter file: the kernel's pick, as before.
    let Ok(mut counter) = opened else {
        return kernels();
    };
    // Held until `counter` is closed at the end of this function.
    // SAFETY: flock only takes a lock on the descriptor, which `counter` keeps open.
    let locked = unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&counter), libc::LOCK_EX) };
    assert_eq!(
        locked,
        0,
        "lock the port counter: {}",
        std::io::Error::last_os_error()
    );
    let mut text = String::new();
    std::io::Read::read_to_string(&mut counter, &mut text).expect("read the port counter");
    let mut next = text.trim().parse::<u32>().unwrap_or(FIRST);
    let port = loop {
        if !(FIRST..end).contains(&next) {
            next = FIRST;
        }
        let candidate = next as u16;
        next += 1;
        if StdListener::bind(("127.0.0.1", candidate)).is_ok() {
            break candidate;
        }
    };
    std::io::Seek::rewind(&mut counter).expect("rewind the port counter");
    counter.set_len(0).expect("truncate the port counter");
    std::io::Write::write_all(&mut counter, next.to_string().as_bytes())
        .expect("write the port counter");
    port
}

/// The first port of the kernel's ephemeral range (32768 unless configured otherwise).
fn ephemeral_low() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

/// Reads `conn` until `done` holds for what came (at most [`GUARD`]); panics if the peer
/// closes first. Returns what came.
pub async fn read_until(conn: &mut TcpStream, what: &str, done: impl Fn(&[u8]) -> bool) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    guard(what, async {
        while !done(&got) {
            let n = conn.read(&mut buf).await.expect("read");
            assert!(
                n > 0,
                "closed before {what}: {}",
                String::from_utf8_lossy(&got)
            );
            got.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    got
}

/// Reads `conn` until the peer closes it or it fails (at most [`GUARD`]); returns what came
/// and when it ended.
pub async fn read_to_end(conn: &mut TcpStream, what: &str) -> (String, std::time::Instant) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    guard(what, async {
        while let Ok(n @ 1..) = conn.read(&mut buf).await {
            got.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    (
        String::from_utf8_lossy(&got).into_owned(),
        std::time::Instant::now(),
    )
}

/// The error a config text is refused with, as the loader words it (file `test.yaml`).
pub fn config_error(text: &str) -> String {
    Config::from_text(Path::new("test.yaml"), text, Path::new("."))
        .err()
        .unwrap_or_else(|| panic!("the config loaded:\n{text}"))
        .to_string()
}

/// Waits until something accepts TCP connections on `addr` (a listener of a service that
/// starts beside the first one).
pub async fn listening(addr: SocketAddr) {
    guard("a listener to accept connections", async {
        while TcpStream::connect(addr).await.is_err() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

/// A running proxy.
pub struct Proxy {
    pub addr: SocketAddr,
    /// Its registries: open streams, metrics, the drain signal.
    pub state: Arc<State>,
}

impl Proxy {
    /// Starts the proxy on a fresh port. `body` is the config without `listen`: services,
    /// host rules and so on.
    pub async fn start(body: &str) -> Proxy {
        let port = free_port();
        Proxy::start_text(format!("listen: [\"127.0.0.1:{port}\"]\n{body}")).await
    }

    /// [`Proxy::start`] on a listener that speaks HTTP/2 without TLS (h2c, prior knowledge)
    /// beside HTTP/1.1.
    pub async fn start_h2c(body: &str) -> Proxy {
        Proxy::start_listening("h2c: true", body).await
    }

    /// Starts the proxy on a fresh port whose listener has `options` (`h2c: true,
    /// idle_timeout: 1s`, ...) besides its address.
    pub async fn start_listening(options: &str, body: &str) -> Proxy {
        let port = free_port();
        let listen = format!("listen:\n  - {{ address: \"127.0.0.1:{port}\", {options} }}\n");
        Proxy::start_text(listen + body).await
    }

    /// Two worker threads unless `text` says otherwise, as the shipped configs have: each
    /// runs its own copy of the proxy, so what they share (limits, the stream registry, the
    /// drain) is shared in every test.
    async fn start_text(text: String) -> Proxy {
        let text = if text.lines().any(|l| l.starts_with("threads:")) {
            text
        } else {
            format!("threads: 2\n{text}")
        };
        let config = Config::from_text(Path::new("test.yaml"), &text, Path::new("."))
            .unwrap_or_else(|e| {
                panic!("test config does not load: {e}\n{text}");
            });
        Proxy::run(config).await
    }

    /// Starts the proxy from a config file (which names its own `listen`), so that it can
    /// be changed and reloaded.
    pub async fn start_file(path: &Path) -> Proxy {
        let config = Config::load(path).unwrap_or_else(|e| panic!("test config: {e}"));
        Proxy::run(config).await
    }

    async fn run(config: Config) -> Proxy {
        // `RUST_LOG=debug cargo nextest run NAME --no-capture` shows the proxy's log.
        if std::env::var_os("RUST_LOG").is_some() {
            streamgate::logging::init();
        }
        let addr = config.listen[0];
        // The admin listener is a service of its own, which may start after the proxy's.
        let admin = config.admin.as_ref().map(|a| a.listen);
        let state = config.state.clone();
        std::thread::spawn(move || {
            build_server(config, None).run(RunArgs {
                shutdown_signal: Box::new(Never),
            })
        });
        guard("the proxy to listen", async {
            for addr in std::iter::once(addr).chain(admin) {
                while TcpStream::connect(addr).await.is_err() {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        })
        .await;
        Proxy { addr, state }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

struct Never;

#[async_trait]
impl ShutdownSignalWatch for Never {
    async fn recv(&self) -> ShutdownSignal {
        std::future::pending().await
    }
}

/// A client that does not pool connections across tests' expectations.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .expect("client")
}

/// A GET asking for an event stream, as an `EventSource` sends it.
pub async fn sse_get(url: String) -> reqwest::Response {
    client()
        .get(url)
        .header("accept", "text/event-stream")
        .send()
        .await
        .expect("the proxy answers")
}

/// Reads whole SSE events (up to the blank line) from a streaming response.
pub struct Events {
    response: reqwest::Response,
    buf: String,
}

impl Events {
    pub fn new(response: reqwest::Response) -> Self {
        Events {
            response,
            buf: String::new(),
        }
    }

    /// The next event's text without its final blank line, or `None` when the stream ended
    /// cleanly. Panics on a transport error.
    pub async fn next(&mut self) -> Option<String> {
        guard("the next event", async {
            loop {
                if let Some(end) = self.buf.find("\n\n") {
                    let event = self.buf[..end].to_string();
                    self.buf.drain(..end + 2);
                    return Some(event);
                }
                match self.response.chunk().await.expect("stream read") {
                    Some(bytes) => self.buf.push_str(&String::from_utf8_lossy(&bytes)),
                    None => return None,
                }
            }
        })
        .await
    }

    /// Like [`Events::next`], but a transport error (a cut stream) is returned, not a panic.
    pub async fn next_raw(&mut self) -> Option<Result<String, reqwest::Error>> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let event = self.buf[..end].to_string();
                self.buf.drain(..end + 2);
                return Some(Ok(event));
            }
            match self.response.chunk().await {
                Ok(Some(bytes)) => self.buf.push_str(&String::from_utf8_lossy(&bytes)),
                Ok(None) => return None,
                Err(e) => return Some(Err(e)),
            }
        }
    }

    /// Reads until the stream ends, returning whether it ended with an error (truncated)
    /// rather than cleanly.
    pub async fn until_end(&mut self) -> Result<(), reqwest::Error> {
        guard("the stream to end", async {
            while self.response.chunk().await?.is_some() {}
            Ok(())
        })
        .await
    }
}
