//! The origin the load tools share. Connections are kept alive; each request is answered
//! by its path:
//!
//! - `/events[?size=S]`: an endless event stream with one event per `interval`, continuing
//!   after the request's `Last-Event-ID`, each carrying the microseconds of `now()` taken
//!   just before it is written (for latency) and padded to `S` bytes when `size` is given.
//!   New streams start spread over the interval when `spread` is above 1 (the events of
//!   many streams opened at once then do not all go out together); otherwise, and for a
//!   resumed stream (one with `Last-Event-ID`, as an origin with a backlog would), the
//!   first event goes out at once.
//! - `/burst?count=N&size=S`: events 1 to N of `S` bytes written as fast as the socket takes
//!   them, in writes of up to 64 KiB, then the end of the body.
//! - any other path (`/plain?size=S`): an `S`-byte `text/plain` body (default `ok`).
//!
//! Bodies of event responses are chunked, one chunk per event, so a proxy has to decode and
//! encode them again.

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// How the origin paces and stamps events.
#[derive(Clone, Copy)]
pub struct Origin {
    pub interval: Duration,
    /// Spread the first events of this many streams evenly over one interval (0 or 1: no
    /// spread, the first event goes out at once).
    pub spread: usize,
    /// The time an event carries, read just before the event is written.
    pub now: fn() -> u64,
}

/// A listener on `addr` with a backlog as deep as the system allows (somaxconn), not
/// tokio's 1,024: thousands of streams may connect at once, and a dropped SYN costs the
/// stream a second or more.
pub fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(65_535)
}

/// An origin on a free loopback port, serving until the process ends.
pub async fn start(interval: Duration, streams: usize, now: fn() -> u64) -> SocketAddr {
    let listener = listen("127.0.0.1:0".parse().expect("addr")).expect("bind origin");
    let addr = listener.local_addr().expect("addr");
    serve(
        listener,
        Origin {
            interval,
            spread: streams,
            now,
        },
    );
    addr
}

/// Serves every connection `listener` accepts, in the background.
pub fn serve(listener: TcpListener, origin: Origin) {
    tokio::spawn(async move {
        let mut n: u64 = 0;
        while let Ok((stream, _)) = listener.accept().await {
            let offset = match origin.spread {
                0 | 1 => Duration::ZERO,
                spread => origin
                    .interval
                    .mul_f64((n % spread as u64) as f64 / spread as f64),
            };
            n += 1;
            tokio::spawn(connection(stream, origin, offset));
        }
    });
}

/// One request's path and the headers the origin looks at.
struct Request {
    path: String,
    query: Vec<(String, String)>,
    last_event_id: Option<u64>,
}

impl Request {
    fn parse(head: &[u8]) -> Request {
        let head = String::from_utf8_lossy(head);
        let target = head.split_whitespace().nth(1).unwrap_or("/");
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        Request {
            path: path.to_string(),
            query: query
                .split('&')
                .filter_map(|pair| pair.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            last_event_id: head.lines().find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case("last-event-id")
                    .then(|| value.trim().parse().ok())
                    .flatten()
            }),
        }
    }

    fn number(&self, key: &str) -> Option<u64> {
        self.query
            .iter()
            .find(|(k, _)| k == key)
            .and_then(|(_, v)| v.parse().ok())
    }
}

async fn connection(mut stream: TcpStream, origin: Origin, offset: Duration) {
    let _ = stream.set_nodelay(true);
    let mut buf = vec![0u8; 16 * 1024];
    let mut pending = Vec::new();
    loop {
        // Answer every complete request head in hand (pipelined plain requests are answered
        // in one write), then read more.
        let mut replies = Vec::new();
        while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            let request = Request::parse(&pending[..end]);
            pending.drain(..end + 4);
            let size = request.number("size").map(|s| s as usize);
            if request.path.starts_with("/events") || request.path.starts_with("/burst") {
                if !replies.is_empty() && stream.write_all(&replies).await.is_err() {
                    return;
                }
                replies.clear();
                let sent = if request.path.starts_with("/burst") {
                    let count = request.number("count").unwrap_or(100_000);
                    burst(&mut stream, count, size.unwrap_or(512), origin.now).await
                } else {
                    let first = match request.last_event_id {
                        Some(_) => Duration::ZERO,
                        None => offset,
                    };
                    let from = request.last_event_id.unwrap_or(0);
                    events(&mut stream, origin, first, from, size).await
                };
                if sent.is_err() {
                    return;
                }
            } else {
                let body = match size {
                    Some(size) => vec![b'x'; size],
                    None => b"ok".to_vec(),
                };
                let _ = write!(
                    replies,
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n",
                    body.len()
                );
                replies.extend_from_slice(&body);
            }
        }
        if !replies.is_empty() && stream.write_all(&replies).await.is_err() {
            return;
        }
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(k) => pending.extend_from_slice(&buf[..k]),
        }
    }
}

const EVENT_HEAD: &str = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                          cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n";

/// Appends event `id` as one chunk: `id: <id>`, then `data: <now()>`, padded with `x` so the
/// event is `size` bytes when `size` is given. `event` is scratch space.
fn push_event(out: &mut Vec<u8>, event: &mut Vec<u8>, id: u64, sent: u64, size: Option<usize>) {
    event.clear();
    let _ = write!(event, "id: {id}\ndata: {sent}");
    if let Some(size) = size {
        let pad = size.saturating_sub(event.len() + 3);
        if pad > 0 {
            event.push(b' ');
            event.resize(event.len() + pad, b'x');
        }
    }
    event.extend_from_slice(b"\n\n");
    let _ = write!(out, "{:x}\r\n", event.len());
    out.extend_from_slice(event);
    out.extend_from_slice(b"\r\n");
}

/// An endless stream: event `from + 1` after `first`, then one per interval.
async fn events(
    stream: &mut TcpStream,
    origin: Origin,
    first: Duration,
    from: u64,
    size: Option<usize>,
) -> std::io::Result<()> {
    stream.write_all(EVENT_HEAD.as_bytes()).await?;
    let mut next = tokio::time::Instant::now() + first;
    let mut id = from;
    let (mut chunk, mut event) = (Vec::new(), Vec::new());
    let mut ignored = [0u8; 1024];
    loop {
        // Waiting for the next event, notice a peer that closed at once rather than at the
        // next write, so a finished run's connections do not linger into the next. An event
        // already due goes out without a timer, which would round up to the next millisecond.
        if tokio::time::Instant::now() < next {
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {}
                read = stream.read(&mut ignored) => match read {
                    Ok(0) | Err(_) => return Ok(()),
                    Ok(_) => continue,
                },
            }
        }
        next += origin.interval;
        id += 1;
        chunk.clear();
        push_event(&mut chunk, &mut event, id, (origin.now)(), size);
        stream.write_all(&chunk).await?;
    }
}

/// `count` events as fast as the socket takes them, in writes of up to 64 KiB.
async fn burst(
    stream: &mut TcpStream,
    count: u64,
    size: usize,
    now: fn() -> u64,
) -> std::io::Result<()> {
    const WRITE: usize = 64 * 1024;
    stream.write_all(EVENT_HEAD.as_bytes()).await?;
    let mut out = Vec::with_capacity(WRITE + size + 64);
    let mut event = Vec::with_capacity(size + 32);
    let mut id = 0;
    while id < count {
        out.clear();
        // Whole events only: stop before the one that would pass 64 KiB.
        while id < count && out.len() + size + 32 <= WRITE.max(size + 32) {
            id += 1;
            push_event(&mut out, &mut event, id, now(), Some(size));
        }
        stream.write_all(&out).await?;
    }
    stream.write_all(b"0\r\n\r\n").await
}
