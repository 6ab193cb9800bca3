//! Load tool for streamgate, four scenarios, and the origin they share.
//!
//! ```text
//! cargo build --release
//! cargo run --release --example bench -- --streams 1000 --seconds 20     # SSE (default)
//! cargo run --release --example bench -- --scenario chain --seconds 5    # middleware cost
//! cargo run --release --example bench -- --scenario observability       # access log cost
//! bench/peers.sh                                                          # beside the peers
//! ```
//!
//! `--scenario sse`: per-event latency and per-stream memory, through streamgate and
//! straight to the origin, in one run.
//!
//! It starts an SSE origin in this process (each stream gets one event per `--interval`,
//! spread evenly over the interval, each carrying its send time), opens `--streams`
//! streams (`--ramp` a second, default 2000; 0: all at once) straight to the origin and
//! measures the delivery latency of every event, then
//! starts the release binary (`--proxy`, default `target/release/streamgate`) in front of
//! the same origin and does the same through it. The proxy's resident memory is read from
//! /proc before and after the streams open.
//!
//! `--post` asks for each stream with a `POST` and a small JSON body (an LLM prompt's
//! shape) instead of a `GET`; `--accept VALUE` sets the stream requests' `Accept`
//! (default `text/event-stream`; an LLM SDK says `application/json`). Both apply to the
//! HTTP/2 phase too.
//!
//! `--tls` puts a TLS listener in front (a self-signed certificate made at start; ALPN h2
//! and http/1.1), and `--h2` adds a phase with the same streams over HTTP/2 on `--conns`
//! connections (ALPN h2 with `--tls`, else h2c with prior knowledge) after the HTTP/1.1
//! phase (one connection per stream), each phase with a fresh proxy process:
//!
//! ```text
//! cargo run --release --example bench -- --streams 1000 --seconds 20 --tls --h2 --conns 10
//! ```
//!
//! `--scenario chain`: plain request throughput (small responses, keep-alive, `--conns`
//! connections) through two proxies side by side, one with an empty middleware chain and
//! one with five typical middlewares (request_id, headers, ip_filter, rate_limit, cors),
//! alternating between them for `--rounds` rounds of `--seconds` each.
//!
//! `--scenario observability`: the same comparison between the access log off and on
//! (lines formatted and written to a discarded stderr); metrics are recorded in both.
//!
//! `--scenario peers`: streamgate side by side with other proxies, each given as
//! `--peer NAME=PORT:COMMAND` (or `--peer direct`, no proxy), over stream tiers, a burst and
//! plain requests; see `support/peers.rs`. `bench/peers.sh` runs it with the usual peers.
//!
//! `--scenario origin --origin ADDR`: only the origin (`support/sse_origin.rs`), in the
//! foreground, until it is killed; the peers scenario runs it as a process of its own.
//!
//! Only loopback addresses are used.

#[path = "support/peers.rs"]
mod peers;
#[path = "support/process.rs"]
mod process;
#[path = "support/sse_origin.rs"]
mod sse_origin;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use process::{rss_kib, Process};

/// Microseconds of `CLOCK_MONOTONIC`. The clock is the machine's, not the process's, so an
/// origin in another process stamps events on the same clock the client reads.
fn micros_now() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec it is given, which lives on this stack.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

struct Args {
    pin: bool,
    scenario: String,
    conns: usize,
    rounds: usize,
    streams: usize,
    seconds: u64,
    interval: Duration,
    warmup: Duration,
    proxy: String,
    mode: String,
    threads: usize,
    tls: bool,
    h2: bool,
    post: bool,
    /// The `Accept` header of every stream request.
    accept: String,
    /// The peers scenario's settings.
    peers: peers::Settings,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        pin: false,
        scenario: "sse".into(),
        conns: 32,
        rounds: 3,
        streams: 1000,
        seconds: 20,
        interval: Duration::from_secs(1),
        warmup: Duration::from_secs(3),
        proxy: "target/release/streamgate".into(),
        mode: "both".into(),
        threads: 2,
        tls: false,
        h2: false,
        post: false,
        accept: "text/event-stream".into(),
        peers: peers::Settings::default(),
    };
    let number = |v: String| v.parse::<u64>().map_err(|e| format!("{v}: {e}"));
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        let p = &mut args.peers;
        match flag.as_str() {
            "--scenario" => args.scenario = value()?,
            "--pin" => args.pin = true,
            "--conns" => args.conns = number(value()?)? as usize,
            "--rounds" => args.rounds = number(value()?)? as usize,
            "--streams" => args.streams = number(value()?)? as usize,
            "--seconds" => args.seconds = number(value()?)?,
            "--interval" => {
                args.interval = humantime::parse_duration(&value()?).map_err(|e| format!("{e}"))?
            }
            "--warmup" => {
                args.warmup = humantime::parse_duration(&value()?).map_err(|e| format!("{e}"))?
            }
            "--proxy" => args.proxy = value()?,
            "--mode" => args.mode = value()?,
            "--threads" => args.threads = number(value()?)? as usize,
            "--tls" => args.tls = true,
            "--h2" => args.h2 = true,
            "--post" => args.post = true,
            "--accept" => args.accept = value()?,
            "--peer" => p.peers.push(peers::Peer::parse(&value()?)?),
            "--tiers" => {
                p.tiers = value()?
                    .split([',', ' '])
                    .filter(|t| !t.is_empty())
                    .map(|t| number(t.to_string()).map(|n| n as usize))
                    .collect::<Result<_, _>>()?
            }
            "--origin" => p.origin = value()?.parse().map_err(|e| format!("--origin: {e}"))?,
            "--out" => p.out = Some(PathBuf::from(value()?)),
            "--ramp" => p.ramp = number(value()?)?,
            "--size" => p.size = number(value()?)? as usize,
            "--burst" => p.burst = number(value()?)?,
            "--burst-streams" => p.burst_streams = number(value()?)? as usize,
            "--burst-size" => p.burst_size = number(value()?)? as usize,
            "--plain-seconds" => p.plain_seconds = number(value()?)?,
            "--plain-size" => p.plain_size = number(value()?)? as usize,
            "--opens" => p.opens = number(value()?)? as usize,
            "-h" | "--help" => {
                return Err(
                    "usage: bench [--scenario sse|chain|observability|peers|origin] [--streams N] \
                            [--seconds S] [--interval 1s] [--warmup 3s] \
                            [--mode both|direct|proxy] [--proxy PATH] [--threads N] \
                            [--conns N] [--rounds N] [--pin] [--tls] [--h2] [--post] [--accept V] [--ramp 2000]\n\
                 peers:  --peer direct | --peer NAME=PORT:COMMAND ... [--tiers 1000,9000] \
                            [--origin 127.0.0.1:18180] [--out DIR] [--ramp 2000] [--size 256] \
                            [--burst 500000] [--burst-streams 4] [--burst-size 512] \
                            [--plain-seconds 10] [--plain-size 128] [--opens 3000]"
                        .into(),
                )
            }
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(args)
}

/// The origin: every connection is an SSE stream with one event per `interval`, each
/// carrying its send time.
async fn origin(interval: Duration, streams: usize) -> SocketAddr {
    sse_origin::start(interval, streams, micros_now).await
}

/// Where a run is: streams opening and warming up, measuring, or done.
const WARMING: u8 = 0;
const MEASURING: u8 = 1;
const DONE: u8 = 2;

/// What the streams of one run share: the phase, how many streams have settled (got their
/// response head or failed), and the signal that ends them.
struct Run {
    phase: AtomicU8,
    settled: AtomicUsize,
    settled_signal: Notify,
    stop: watch::Sender<bool>,
}

impl Run {
    fn new() -> Arc<Run> {
        Arc::new(Run {
            phase: AtomicU8::new(WARMING),
            settled: AtomicUsize::new(0),
            settled_signal: Notify::new(),
            stop: watch::channel(false).0,
        })
    }

    fn measure(&self) {
        self.phase.store(MEASURING, Ordering::Relaxed);
    }

    fn measuring(&self) -> bool {
        self.phase.load(Ordering::Relaxed) == MEASURING
    }

    /// Ends the measurement and every stream of the run.
    fn stop(&self) {
        self.phase.store(DONE, Ordering::Relaxed);
        let _ = self.stop.send(true);
    }

    fn settle(&self) {
        self.settled.fetch_add(1, Ordering::Relaxed);
        self.settled_signal.notify_waiters();
    }

    /// Waits until `n` streams have settled; false if `budget` ran out first.
    async fn wait_settled(&self, n: usize, budget: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + budget;
        loop {
            let signal = self.settled_signal.notified();
            if self.settled.load(Ordering::Relaxed) >= n {
                return true;
            }
            if tokio::time::timeout_at(deadline, signal).await.is_err() {
                return false;
            }
        }
    }
}

/// A byte stream to the proxy: TCP, or TLS over TCP.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Where the streams of a phase go, and how.
#[derive(Clone)]
struct Target {
    addr: SocketAddr,
    /// TLS to the proxy (SNI `bench.test`), trusting the bench's own certificate.
    tls: Option<Arc<rustls::ClientConfig>>,
    /// `Some(n)`: HTTP/2, the streams spread over `n` connections; `None`: HTTP/1.1,
    /// one connection per stream.
    h2_conns: Option<usize>,
    /// Streams asked for with a `POST` and a small JSON body (as an LLM prompt is)
    /// instead of a `GET`.
    post: bool,
    /// The `Accept` header the stream requests carry.
    accept: String,
}

impl Target {
    fn plain(addr: SocketAddr) -> Target {
        Target {
            addr,
            tls: None,
            h2_conns: None,
            post: false,
            accept: "text/event-stream".into(),
        }
    }

    async fn connect(&self, alpn: &[u8]) -> Result<Box<dyn Io>, String> {
        let tcp = TcpStream::connect(self.addr)
            .await
            .map_err(|e| format!("connect {}: {e}", self.addr))?;
        let _ = tcp.set_nodelay(true);
        let Some(tls) = &self.tls else {
            return Ok(Box::new(tcp));
        };
        let mut config = (**tls).clone();
        config.alpn_protocols = vec![alpn.to_vec()];
        let name =
            rustls::pki_types::ServerName::try_from("bench.test").map_err(|e| e.to_string())?;
        let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS handshake: {e}"))?;
        Ok(Box::new(stream))
    }
}

fn new_histogram() -> Histogram<u64> {
    Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("histogram bounds")
}

/// How a stream ended.
enum Outcome {
    /// No `200` response head: refused, timed out, or another status.
    Failed(String),
    /// Ran until the run stopped it.
    Stopped,
    /// The body ended (a burst does; an endless stream should not).
    Ended,
    /// A read failed, or the connection closed mid-body.
    Broken(String),
}

/// What one stream saw.
struct StreamStats {
    /// Delivery latency (µs) of the events received while measuring.
    latency: Histogram<u64>,
    /// From the start of the connect to the first event, µs.
    first_event: Option<u64>,
    events: u64,
    measured_events: u64,
    /// Event ids skipped, and ids seen again (ids run 1, 2, 3, ... on each stream).
    gaps: u64,
    duplicates: u64,
    last_id: u64,
    outcome: Outcome,
}

impl StreamStats {
    fn new() -> StreamStats {
        StreamStats {
            latency: new_histogram(),
            first_event: None,
            events: 0,
            measured_events: 0,
            gaps: 0,
            duplicates: 0,
            last_id: 0,
            outcome: Outcome::Stopped,
        }
    }

    /// One event, read at `now` on a stream whose connect started at `started`.
    fn event(
        &mut self,
        id: Option<u64>,
        sent: Option<u64>,
        now: u64,
        started: u64,
        measuring: bool,
    ) {
        self.events += 1;
        if self.first_event.is_none() {
            self.first_event = Some(now.saturating_sub(started));
        }
        if let Some(id) = id {
            if id <= self.last_id {
                self.duplicates += 1;
            } else {
                self.gaps += id - self.last_id - 1;
                self.last_id = id;
            }
        }
        if measuring {
            self.measured_events += 1;
            if let Some(sent) = sent {
                self.latency
                    .saturating_record(now.saturating_sub(sent).max(1));
            }
        }
    }
}

/// The events of an SSE body, fed in pieces as they arrive. Only what the bench needs is
/// read: the `id:` field and the number at the start of `data:` (the send time); padding
/// and other fields are skipped. Lines end with LF or CRLF.
#[derive(Default)]
struct EventScanner {
    /// The start of a line split across two pieces.
    partial: Vec<u8>,
    id: Option<u64>,
    sent: Option<u64>,
    fields: bool,
}

impl EventScanner {
    /// Calls `on_event(id, sent)` for each event that `bytes` completes.
    fn feed(&mut self, mut bytes: &[u8], on_event: &mut impl FnMut(Option<u64>, Option<u64>)) {
        while let Some(nl) = memchr::memchr(b'\n', bytes) {
            if self.partial.is_empty() {
                self.line(&bytes[..nl], on_event);
            } else {
                let mut line = std::mem::take(&mut self.partial);
                line.extend_from_slice(&bytes[..nl]);
                self.line(&line, on_event);
                line.clear();
                self.partial = line;
            }
            bytes = &bytes[nl + 1..];
        }
        self.partial.extend_from_slice(bytes);
    }

    fn line(&mut self, line: &[u8], on_event: &mut impl FnMut(Option<u64>, Option<u64>)) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            if self.fields {
                on_event(self.id.take(), self.sent.take());
            }
            self.fields = false;
            return;
        }
        self.fields = true;
        if let Some(value) = line.strip_prefix(b"id:") {
            self.id = leading_number(value);
        } else if let Some(value) = line.strip_prefix(b"data:") {
            self.sent = leading_number(value);
        }
    }
}

/// The decimal number at the start of a field value (after one optional space).
fn leading_number(value: &[u8]) -> Option<u64> {
    let value = value.strip_prefix(b" ").unwrap_or(value);
    let digits = value.iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&value[..digits]).ok()?.parse().ok()
}

/// An HTTP/1.1 response body as it arrives, by its framing.
enum Body {
    Chunked(Chunked),
    Length(u64),
    UntilClose,
}

/// Where a chunked body's decoder is.
enum ChunkState {
    SizeLine,
    Data(usize),
    /// The CRLF after a chunk's data; how many of its bytes are still to come.
    DataEnd(usize),
    Trailers,
    Done,
}

struct Chunked {
    state: ChunkState,
    line: Vec<u8>,
}

impl Body {
    fn of(headers: &[httparse::Header]) -> Body {
        let value = |name: &str| {
            headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| String::from_utf8_lossy(h.value).to_ascii_lowercase())
        };
        if value("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            return Body::Chunked(Chunked {
                state: ChunkState::SizeLine,
                line: Vec::new(),
            });
        }
        match value("content-length").and_then(|v| v.trim().parse().ok()) {
            Some(length) => Body::Length(length),
            None => Body::UntilClose,
        }
    }

    /// Passes the body's content in `input` to `out`; true once the body is complete.
    fn feed(&mut self, mut input: &[u8], out: &mut impl FnMut(&[u8])) -> Result<bool, String> {
        let chunked = match self {
            Body::UntilClose => {
                out(input);
                return Ok(false);
            }
            Body::Length(left) => {
                let take = input.len().min(*left as usize);
                out(&input[..take]);
                *left -= take as u64;
                return Ok(*left == 0);
            }
            Body::Chunked(chunked) => chunked,
        };
        while !input.is_empty() {
            match chunked.state {
                ChunkState::SizeLine | ChunkState::Trailers => {
                    let Some(nl) = memchr::memchr(b'\n', input) else {
                        chunked.line.extend_from_slice(input);
                        if chunked.line.len() > 4096 {
                            return Err("chunk size line too long".into());
                        }
                        break;
                    };
                    chunked.line.extend_from_slice(&input[..nl]);
                    input = &input[nl + 1..];
                    let line = chunked.line.trim_ascii();
                    chunked.state = match chunked.state {
                        ChunkState::Trailers if line.is_empty() => ChunkState::Done,
                        ChunkState::Trailers => ChunkState::Trailers,
                        _ => match chunk_size(line) {
                            Some(0) => ChunkState::Trailers,
                            Some(size) => ChunkState::Data(size),
                            None => {
                                let line = String::from_utf8_lossy(line);
                                return Err(format!("bad chunk size line {line:?}"));
                            }
                        },
                    };
                    chunked.line.clear();
                }
                ChunkState::Data(left) => {
                    let take = left.min(input.len());
                    out(&input[..take]);
                    input = &input[take..];
                    chunked.state = match left - take {
                        0 => ChunkState::DataEnd(2),
                        left => ChunkState::Data(left),
                    };
                }
                ChunkState::DataEnd(left) => {
                    let take = left.min(input.len());
                    input = &input[take..];
                    chunked.state = match left - take {
                        0 => ChunkState::SizeLine,
                        left => ChunkState::DataEnd(left),
                    };
                }
                ChunkState::Done => break,
            }
        }
        Ok(matches!(chunked.state, ChunkState::Done))
    }
}

/// The size on a chunk's size line (hex digits, then perhaps `;` and extensions).
fn chunk_size(line: &[u8]) -> Option<usize> {
    let digits = line.split(|&b| b == b';').next()?.trim_ascii();
    if digits.is_empty() || digits.len() > 12 {
        return None;
    }
    digits.iter().try_fold(0usize, |size, &b| {
        Some(size * 16 + (b as char).to_digit(16)? as usize)
    })
}

/// How long a stream may take to connect and get its response head.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// The body of a `POST` stream request (`--post`): a prompt's shape.
const PROMPT: &str = r#"{"prompt":"hello"}"#;

/// Connects, sends `GET path` (or a `POST` with a prompt) and reads the response head;
/// returns the connection, the body bytes read with the head, and the body's framing.
async fn open_h1(target: &Target, path: &str) -> Result<(Box<dyn Io>, Vec<u8>, Body), String> {
    let mut io = target.connect(b"http/1.1").await?;
    let request = if target.post {
        format!(
            "POST {path} HTTP/1.1\r\nhost: bench.test\r\naccept: {}\r\n\
             content-type: application/json\r\ncontent-length: {}\r\n\r\n{PROMPT}",
            target.accept,
            PROMPT.len()
        )
    } else {
        format!(
            "GET {path} HTTP/1.1\r\nhost: bench.test\r\naccept: {}\r\n\r\n",
            target.accept
        )
    };
    io.write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut pending = Vec::with_capacity(4096);
    let mut buf = [0u8; 4096];
    loop {
        let k = io.read(&mut buf).await.map_err(|e| e.to_string())?;
        if k == 0 {
            return Err("closed before the response head".into());
        }
        pending.extend_from_slice(&buf[..k]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(&pending).map_err(|e| e.to_string())? {
            httparse::Status::Partial if pending.len() > 64 * 1024 => {
                return Err("response head over 64 KiB".into())
            }
            httparse::Status::Partial => continue,
            httparse::Status::Complete(len) => {
                if response.code != Some(200) {
                    return Err(format!("status {}", response.code.unwrap_or(0)));
                }
                let body = Body::of(response.headers);
                return Ok((io, pending.split_off(len), body));
            }
        }
    }
}

/// One HTTP/1.1 event stream (`/events...` or `/burst...`): records every event until the
/// body ends or the run stops.
async fn h1_stream(target: Target, path: String, run: Arc<Run>) -> StreamStats {
    let mut stats = StreamStats::new();
    let started = micros_now();
    let mut stop = run.stop.subscribe();
    let opened = tokio::select! {
        _ = stop.changed() => Err("stopped before the response head".to_string()),
        opened = tokio::time::timeout(OPEN_TIMEOUT, open_h1(&target, &path)) => {
            opened.unwrap_or_else(|_| Err(format!("no response head within {OPEN_TIMEOUT:?}")))
        }
    };
    run.settle();
    let (mut io, first, mut body) = match opened {
        Ok(opened) => opened,
        Err(e) => {
            stats.outcome = Outcome::Failed(e);
            return stats;
        }
    };
    let mut scanner = EventScanner::default();
    let mut buf = vec![0u8; 64 * 1024];
    let mut read = first.len();
    buf[..read].copy_from_slice(&first);
    let mut now = micros_now();
    loop {
        let measuring = run.measuring();
        let mut on_event = |id, sent| stats.event(id, sent, now, started, measuring);
        match body.feed(&buf[..read], &mut |data| scanner.feed(data, &mut on_event)) {
            Ok(false) => {}
            Ok(true) => {
                stats.outcome = Outcome::Ended;
                return stats;
            }
            Err(e) => {
                stats.outcome = Outcome::Broken(e);
                return stats;
            }
        }
        let result = tokio::select! {
            _ = stop.changed() => return stats,
            result = io.read(&mut buf) => result,
        };
        now = micros_now();
        read = match result {
            Ok(0) if matches!(body, Body::UntilClose) => {
                stats.outcome = Outcome::Ended;
                return stats;
            }
            Ok(0) => {
                stats.outcome = Outcome::Broken("closed mid-body".into());
                return stats;
            }
            Ok(read) => read,
            Err(e) => {
                stats.outcome = Outcome::Broken(e.to_string());
                return stats;
            }
        };
    }
}

/// One HTTP/2 connection: its driver runs in the background; returns the handle that
/// opens streams on it.
async fn h2_connection(target: &Target) -> Result<h2::client::SendRequest<Bytes>, String> {
    let io = target.connect(b"h2").await?;
    let (send, connection) = h2::client::handshake(io)
        .await
        .map_err(|e| format!("h2 handshake: {e}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(send)
}

/// Sends the request of one HTTP/2 stream and waits for its `200` head.
async fn open_h2(
    send: h2::client::SendRequest<Bytes>,
    scheme: &str,
    post: bool,
    accept: &str,
) -> Result<h2::RecvStream, String> {
    let mut send = send.ready().await.map_err(|e| e.to_string())?;
    let uri = format!("{scheme}://bench.test/events");
    let request = if post {
        http::Request::post(uri)
            .header("content-type", "application/json")
            .header("content-length", PROMPT.len())
    } else {
        http::Request::get(uri)
    }
    .header("accept", accept)
    .body(())
    .map_err(|e| e.to_string())?;
    let (response, mut body) = send
        .send_request(request, !post)
        .map_err(|e| e.to_string())?;
    if post {
        body.send_data(Bytes::from_static(PROMPT.as_bytes()), true)
            .map_err(|e| e.to_string())?;
    }
    let response = response.await.map_err(|e| e.to_string())?;
    if response.status() != 200 {
        return Err(format!("status {}", response.status()));
    }
    Ok(response.into_body())
}

/// One HTTP/2 stream on a shared connection, measured like [`h1_stream`].
async fn h2_stream(
    send: h2::client::SendRequest<Bytes>,
    scheme: &'static str,
    target: Target,
    run: Arc<Run>,
) -> StreamStats {
    let mut stats = StreamStats::new();
    let started = micros_now();
    let mut stop = run.stop.subscribe();
    let opened = tokio::select! {
        _ = stop.changed() => Err("stopped before the response head".to_string()),
        opened = tokio::time::timeout(OPEN_TIMEOUT, open_h2(send, scheme, target.post, &target.accept)) => {
            opened.unwrap_or_else(|_| Err(format!("no response head within {OPEN_TIMEOUT:?}")))
        }
    };
    run.settle();
    let mut body = match opened {
        Ok(body) => body,
        Err(e) => {
            stats.outcome = Outcome::Failed(e);
            return stats;
        }
    };
    let mut scanner = EventScanner::default();
    loop {
        let data = tokio::select! {
            _ = stop.changed() => return stats,
            data = body.data() => data,
        };
        let now = micros_now();
        let data = match data {
            None => {
                stats.outcome = Outcome::Ended;
                return stats;
            }
            Some(Err(e)) => {
                stats.outcome = Outcome::Broken(e.to_string());
                return stats;
            }
            Some(Ok(data)) => data,
        };
        let _ = body.flow_control().release_capacity(data.len());
        let measuring = run.measuring();
        scanner.feed(&data, &mut |id, sent| {
            stats.event(id, sent, now, started, measuring)
        });
    }
}

/// The streams of a run, added up.
struct Tally {
    latency: Histogram<u64>,
    first_event: Histogram<u64>,
    events: u64,
    measured_events: u64,
    established: usize,
    failed: usize,
    /// Established streams that ended before the run stopped them, by error or not.
    broken: usize,
    ended: usize,
    gaps: u64,
    duplicates: u64,
    first_error: Option<String>,
}

impl Tally {
    async fn collect(tasks: Vec<JoinHandle<StreamStats>>) -> Tally {
        let mut tally = Tally {
            latency: new_histogram(),
            first_event: new_histogram(),
            events: 0,
            measured_events: 0,
            established: 0,
            failed: 0,
            broken: 0,
            ended: 0,
            gaps: 0,
            duplicates: 0,
            first_error: None,
        };
        for task in tasks {
            let stats = match task.await {
                Ok(stats) => stats,
                Err(e) => {
                    tally.failed += 1;
                    tally.first_error.get_or_insert(format!("task failed: {e}"));
                    continue;
                }
            };
            let _ = tally.latency.add(&stats.latency);
            if let Some(first) = stats.first_event {
                tally.first_event.saturating_record(first.max(1));
            }
            tally.events += stats.events;
            tally.measured_events += stats.measured_events;
            tally.gaps += stats.gaps;
            tally.duplicates += stats.duplicates;
            match stats.outcome {
                Outcome::Failed(e) => {
                    tally.failed += 1;
                    tally.first_error.get_or_insert(e);
                    continue;
                }
                Outcome::Broken(e) => {
                    tally.broken += 1;
                    tally.first_error.get_or_insert(e);
                }
                Outcome::Ended => tally.ended += 1,
                Outcome::Stopped => {}
            }
            tally.established += 1;
        }
        tally
    }
}

/// Opens `n` event streams to `target` (`path` over HTTP/1.1, or `/events` over HTTP/2
/// with `target.h2_conns`), `ramp` a second (0: as fast as they spawn).
async fn open_streams(
    target: &Target,
    path: &str,
    n: usize,
    ramp: u64,
    run: &Arc<Run>,
) -> Result<Vec<JoinHandle<StreamStats>>, String> {
    let mut connections = Vec::new();
    for _ in 0..target.h2_conns.map_or(0, |c| c.max(1)) {
        connections.push(h2_connection(target).await?);
    }
    let scheme = if target.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        if ramp > 0 {
            tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / ramp as f64)).await;
        } else {
            tokio::task::yield_now().await;
        }
        let run = run.clone();
        tasks.push(match connections.get(i % connections.len().max(1)) {
            Some(send) => tokio::spawn(h2_stream(send.clone(), scheme, target.clone(), run)),
            None => tokio::spawn(h1_stream(target.clone(), path.to_string(), run)),
        });
    }
    Ok(tasks)
}

/// The fields of /proc/PID/stat after the command name (which may contain spaces), so
/// field N of the line (1-based) is at index N - 3.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// CPU time (user + system, all threads) a process has used so far, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let Some(fields) = stat_fields(pid) else {
        return 0.0;
    };
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15, in USER_HZ ticks (100 a second on Linux).
    (ticks(11) + ticks(12)) / 100.0
}

/// `pid` and every process below it (nginx's workers under its master, say).
fn process_tree(pid: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(child) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
                continue;
            };
            // The parent's pid is field 4.
            if let Some(parent) = stat_fields(child).and_then(|f| f.get(1)?.parse().ok()) {
                parents.push((child, parent));
            }
        }
    }
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        tree.extend(
            parents
                .iter()
                .filter(|(_, p)| *p == parent)
                .map(|(c, _)| *c),
        );
        i += 1;
    }
    tree
}

/// Resident memory summed over a process tree, KiB.
fn tree_rss_kib(pid: u32) -> u64 {
    process_tree(pid).into_iter().filter_map(rss_kib).sum()
}

/// CPU seconds summed over a process tree.
fn tree_cpu_seconds(pid: u32) -> f64 {
    process_tree(pid).into_iter().map(cpu_seconds).sum()
}

struct Report {
    label: String,
    hist: Histogram<u64>,
    errors: usize,
    memory: Option<(u64, u64)>,
}

async fn run_phase(label: &str, target: Target, args: &Args, proxy_pid: Option<u32>) -> Report {
    let baseline = proxy_pid.and_then(rss_kib);
    let run = Run::new();
    let tasks = match open_streams(&target, "/events", args.streams, args.peers.ramp, &run).await {
        Ok(tasks) => tasks,
        Err(e) => {
            eprintln!("{label}: {e}");
            std::process::exit(1);
        }
    };
    let ramp = args.streams as u64 / args.peers.ramp.max(1);
    let open_budget = Duration::from_secs(10 + ramp + args.streams as u64 / 500);
    if !run.wait_settled(args.streams, open_budget).await {
        eprintln!("{label}: not every stream opened within {open_budget:?}");
    }
    tokio::time::sleep(args.warmup).await;
    let memory = proxy_pid
        .and_then(rss_kib)
        .zip(baseline)
        .map(|(open, base)| (base, open));
    run.measure();
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    run.stop();
    let tally = Tally::collect(tasks).await;
    if let Some(e) = &tally.first_error {
        eprintln!("{label}: stream error: {e}");
    }
    Report {
        label: label.to_string(),
        hist: tally.latency,
        errors: tally.failed + tally.broken + tally.ended,
        memory,
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The certificate of the bench's TLS listener (`bench.test`, self-signed) and a client
/// configuration that trusts it.
struct Pki {
    cert_pem: String,
    key_pem: String,
    client: Arc<rustls::ClientConfig>,
}

impl Pki {
    fn new() -> Result<Pki, String> {
        let made = rcgen::generate_simple_self_signed(vec!["bench.test".to_string()])
            .map_err(|e| e.to_string())?;
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(made.cert.der().clone())
            .map_err(|e| e.to_string())?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Pki {
            cert_pem: made.cert.pem(),
            key_pem: made.key_pair.serialize_pem(),
            client: Arc::new(client),
        })
    }
}

async fn start_proxy(
    args: &Args,
    origin: SocketAddr,
    middleware: &str,
    rust_log: &str,
    tls: Option<&Pki>,
) -> Result<(Process, SocketAddr), String> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port();
    let dir = std::env::temp_dir().join(format!("streamgate-bench-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let config = dir.join("bench.yaml");
    // TLS: ALPN offers h2 and http/1.1. Plain with --h2: h2c beside HTTP/1.1.
    let listen = match tls {
        Some(pki) => {
            std::fs::write(dir.join("bench.pem"), &pki.cert_pem).map_err(|e| e.to_string())?;
            std::fs::write(dir.join("bench.key"), &pki.key_pem).map_err(|e| e.to_string())?;
            format!(
                "listen:\n  - address: \"127.0.0.1:{port}\"\n    tls: {{ certificates: \
                 [{{ cert: bench.pem, key: bench.key }}] }}\n"
            )
        }
        None if args.h2 => format!("listen:\n  - {{ address: \"127.0.0.1:{port}\", h2c: true }}\n"),
        None => format!("listen: [\"127.0.0.1:{port}\"]\n"),
    };
    std::fs::write(
        &config,
        format!(
            "threads: {threads}\npid_file: {dir}/sg.pid\nupgrade_sock: {dir}/sg.sock\n\
             grace_period_seconds: 1\ngraceful_shutdown_timeout_seconds: 1\n\
             {listen}\
             services:\n  origin:\n    url: \"http://{origin}\"\n\
             {middleware}\
             host_rules:\n  - pattern: \"*\"\n    target: origin\n",
            threads = args.threads,
            dir = dir.display()
        ),
    )
    .map_err(|e| e.to_string())?;
    // With `--pin`, the proxy gets CPU 1 to itself and this process stays on CPU 0, so the
    // proxy is what limits throughput, not the load generator it shares the machine with.
    let command = if args.pin {
        let mut c = Command::new("taskset");
        c.args(["-c", "1"]).arg(&args.proxy);
        c
    } else {
        Command::new(&args.proxy)
    };
    let proxy = process::start(command, &args.proxy, &config, rust_log, Stdio::null())?;
    let addr: SocketAddr = format!("127.0.0.1:{port}")
        .parse()
        .map_err(|e| format!("{e}"))?;
    for _ in 0..200 {
        if TcpStream::connect(addr).await.is_ok() {
            return Ok((proxy, addr));
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    Err("the proxy did not start listening".into())
}

fn print(reports: &[Report], args: &Args) {
    println!(
        "\n{} SSE streams, one event per {:?} each, measured for {} s after a {:?} warm-up",
        args.streams, args.interval, args.seconds, args.warmup
    );
    println!(
        "{:<18} {:>9} {:>7} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "path", "events", "errors", "p50 µs", "p90 µs", "p99 µs", "p99.9 µs", "max µs"
    );
    for r in reports {
        let h = &r.hist;
        println!(
            "{:<18} {:>9} {:>7} {:>9} {:>9} {:>9} {:>9} {:>9}",
            r.label,
            h.len(),
            r.errors,
            h.value_at_quantile(0.50),
            h.value_at_quantile(0.90),
            h.value_at_quantile(0.99),
            h.value_at_quantile(0.999),
            h.max()
        );
    }
    if let Some((direct, proxied)) = reports.split_first().filter(|(d, _)| d.label == "direct") {
        for proxied in proxied {
            let added = |q: f64| {
                proxied.hist.value_at_quantile(q) as i64 - direct.hist.value_at_quantile(q) as i64
            };
            println!(
                "added by the proxy ({}): p50 {} µs, p99 {} µs",
                proxied.label,
                added(0.50),
                added(0.99)
            );
        }
    }
    for r in reports {
        if let Some((base, open)) = r.memory {
            let per = (open.saturating_sub(base)) as f64 / args.streams as f64;
            println!(
                "proxy resident memory ({}): {base} KiB idle, {open} KiB with {} streams open: \
                 {per:.1} KiB per stream",
                r.label, args.streams
            );
        }
    }
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    // The client and the origin open thousands of sockets from several threads: size the
    // descriptor table now, as streamgate does, so that its growth (an RCU grace period
    // each doubling, every thread waiting) does not show in any proxy's figures.
    let _ = streamgate::server::memory::reserve_descriptors(u64::MAX);
    if args.pin {
        let pid = std::process::id().to_string();
        let pinned = Command::new("taskset")
            .args(["-a", "-p", "-c", "0", &pid])
            .stdout(Stdio::null())
            .status();
        if !pinned.is_ok_and(|s| s.success()) {
            eprintln!("--pin needs taskset (util-linux) and two CPUs");
            std::process::exit(2);
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    if args.scenario == "chain" {
        runtime.block_on(chain_scenario(&args));
        return;
    }
    if args.scenario == "observability" {
        runtime.block_on(observability_scenario(&args));
        return;
    }
    if args.scenario == "origin" {
        runtime.block_on(origin_scenario(&args));
        return;
    }
    if args.scenario == "peers" {
        if let Err(e) = runtime.block_on(peers::run(&args)) {
            eprintln!("peers: {e}");
            std::process::exit(1);
        }
        return;
    }
    runtime.block_on(async {
        let origin = origin(args.interval, args.streams).await;
        let mut reports = Vec::new();
        if args.mode == "both" || args.mode == "direct" {
            let target = Target {
                post: args.post,
                accept: args.accept.clone(),
                ..Target::plain(origin)
            };
            reports.push(run_phase("direct", target, &args, None).await);
        }
        if args.mode == "both" || args.mode == "proxy" {
            let pki = match args.tls.then(Pki::new).transpose() {
                Ok(pki) => pki,
                Err(e) => {
                    eprintln!("cannot make the bench certificate: {e}");
                    std::process::exit(1);
                }
            };
            let tls = pki.as_ref().map(|p| p.client.clone());
            let suffix = if tls.is_some() { " tls" } else { "" };
            let post = if args.post { " post" } else { "" };
            let mut phases = vec![(format!("proxy h1{suffix}{post}"), None)];
            if args.h2 {
                phases.push((
                    format!("proxy h2{suffix}{post} x{}", args.conns),
                    Some(args.conns),
                ));
            }
            // A fresh proxy process per phase, so each one's memory is its own.
            for (label, h2_conns) in phases {
                match start_proxy(&args, origin, "", "error", pki.as_ref()).await {
                    Ok((proxy, addr)) => {
                        let pid = proxy.0.id();
                        let target = Target {
                            addr,
                            tls: tls.clone(),
                            h2_conns,
                            post: args.post,
                            accept: args.accept.clone(),
                        };
                        reports.push(run_phase(&label, target, &args, Some(pid)).await);
                    }
                    Err(e) => {
                        eprintln!("{e}");
                        std::process::exit(1);
                    }
                }
            }
        }
        print(&reports, &args);
    });
}

/// The origin alone, on `--origin`, until the process is killed.
async fn origin_scenario(args: &Args) {
    let listener = match sse_origin::listen(args.peers.origin) {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("origin: cannot listen on {}: {e}", args.peers.origin);
            std::process::exit(1);
        }
    };
    sse_origin::serve(
        listener,
        sse_origin::Origin {
            interval: args.interval,
            spread: 0,
            now: micros_now,
        },
    );
    std::future::pending::<()>().await;
}

/// The five typical middlewares of the chain scenario.
const CHAIN: &str = "middleware_services:\n\
  - { name: ids, type: request_id }\n\
  - { name: hdr, type: headers, config: { request: { set: { x-edge: bench } }, response: { set: { x-content-type-options: nosniff } } } }\n\
  - { name: ipf, type: ip_filter, config: { allow: [127.0.0.0/8], deny: [10.0.0.0/8] } }\n\
  - { name: rl, type: rate_limit, config: { rate: 1000000000, burst: 1000000000 } }\n\
  - { name: cors, type: cors }\n\
middlewares: [ids, hdr, ipf, rl, cors]\n";

/// One keep-alive connection sending `GET path` back to back until `stop`; returns how many
/// got a 200.
async fn http_client(
    target: SocketAddr,
    path: &str,
    mut stop: watch::Receiver<bool>,
) -> Result<u64, String> {
    let mut stream = TcpStream::connect(target)
        .await
        .map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    let request = format!("GET {path} HTTP/1.1\r\nhost: bench\r\norigin: https://app.test\r\n\r\n");
    let request = request.as_bytes();
    let mut buf = vec![0u8; 16 * 1024];
    let mut pending: Vec<u8> = Vec::new();
    let mut ok = 0;
    loop {
        if *stop.borrow() {
            return Ok(ok);
        }
        stream.write_all(request).await.map_err(|e| e.to_string())?;
        // Read one response: head, then Content-Length bytes.
        loop {
            if let Some(end) = find(&pending, b"\r\n\r\n") {
                let head = &pending[..end];
                let len = content_length(head);
                if pending.len() >= end + 4 + len {
                    if !head.starts_with(b"HTTP/1.1 200") {
                        let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
                        return Err(String::from_utf8_lossy(line).into_owned());
                    }
                    pending.drain(..end + 4 + len);
                    ok += 1;
                    break;
                }
            }
            let n = tokio::select! {
                _ = stop.changed() => return Ok(ok),
                n = stream.read(&mut buf) => n.map_err(|e| e.to_string())?,
            };
            if n == 0 {
                return Err("connection closed".into());
            }
            pending.extend_from_slice(&buf[..n]);
        }
    }
}

/// The `Content-Length` of a response head, found without allocating.
fn content_length(head: &[u8]) -> usize {
    head.split(|&b| b == b'\n')
        .find_map(|line| {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let (name, value) = line.split_at(line.iter().position(|&b| b == b':')?);
            name.eq_ignore_ascii_case(b"content-length")
                .then(|| std::str::from_utf8(&value[1..]).ok()?.trim().parse().ok())
                .flatten()
        })
        .unwrap_or(0)
}

/// Requests a second over `conns` keep-alive connections sending `GET path` for `seconds`,
/// and how many connections failed.
async fn throughput(target: SocketAddr, path: &str, conns: usize, seconds: u64) -> (f64, usize) {
    let (stop_tx, stop_rx) = watch::channel(false);
    let tasks: Vec<_> = (0..conns)
        .map(|_| {
            let (path, stop) = (path.to_string(), stop_rx.clone());
            tokio::spawn(async move { http_client(target, &path, stop).await })
        })
        .collect();
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let _ = stop_tx.send(true);
    let mut total = 0;
    let mut errors = 0;
    for t in tasks {
        match t.await {
            Ok(Ok(n)) => total += n,
            Ok(Err(e)) => {
                if errors == 0 {
                    eprintln!("client error: {e}");
                }
                errors += 1;
            }
            Err(_) => errors += 1,
        }
    }
    (total as f64 / started.elapsed().as_secs_f64(), errors)
}

/// One side of an A/B throughput comparison.
struct Variant {
    label: &'static str,
    config: String,
    rust_log: &'static str,
}

async fn chain_scenario(args: &Args) {
    // BENCH_CHAIN=ids,hdr runs a subset, to find what one middleware costs.
    let chain_config = match std::env::var("BENCH_CHAIN") {
        Ok(names) => CHAIN.replace("[ids, hdr, ipf, rl, cors]", &format!("[{names}]")),
        Err(_) => CHAIN.to_string(),
    };
    let quiet = "access_log: { enabled: false }\n";
    compare(
        args,
        Variant {
            label: "empty chain",
            config: quiet.to_string(),
            rust_log: "error",
        },
        Variant {
            label: "5 middlewares",
            config: format!("{quiet}{chain_config}"),
            rust_log: "error",
        },
    )
    .await;
}

/// Access log off versus on (written, to a discarded stderr); metrics are always on.
async fn observability_scenario(args: &Args) {
    compare(
        args,
        Variant {
            label: "access log off",
            config: "access_log: { enabled: false }\n".into(),
            rust_log: "error",
        },
        Variant {
            label: "access log on",
            config: "access_log: { enabled: true, format: combined }\n".into(),
            rust_log: "error,streamgate::access=info",
        },
    )
    .await;
}

async fn compare(args: &Args, a: Variant, b: Variant) {
    // Any path but /events and /burst gets a two-byte answer.
    let origin = origin(args.interval, 0).await;
    let mut procs = Vec::new();
    for v in [&a, &b] {
        match start_proxy(args, origin, &v.config, v.rust_log, None).await {
            Ok(p) => procs.push(p),
            Err(e) => {
                eprintln!("{e}");
                std::process::exit(1);
            }
        }
    }
    let targets: Vec<(SocketAddr, u32)> = procs.iter().map(|(p, addr)| (*addr, p.0.id())).collect();
    // Warm both up (connection pools, allocator).
    for (addr, _) in &targets {
        throughput(*addr, "/bench", args.conns, 1).await;
    }
    let mut rates = [0.0f64; 2];
    let mut cpu = [0.0f64; 2];
    println!(
        "\nplain GET, {} keep-alive connections, {} rounds of {} s per proxy, alternating A-B, B-A",
        args.conns, args.rounds, args.seconds
    );
    println!(
        "{:<8} {:>18} {:>18} {:>16} {:>16}",
        "round",
        format!("{} req/s", a.label),
        format!("{} req/s", b.label),
        "A CPU µs/req",
        "B CPU µs/req"
    );
    for round in 1..=args.rounds {
        let mut row = [(0.0, 0.0, 0); 2];
        // A-B, then B-A: neither proxy always runs second.
        let order = if round % 2 == 1 { [0, 1] } else { [1, 0] };
        for i in order {
            let (addr, pid) = targets[i];
            let before = cpu_seconds(pid);
            let (rate, errors) = throughput(addr, "/bench", args.conns, args.seconds).await;
            let used = cpu_seconds(pid) - before;
            let per_request = used * 1e6 / (rate * args.seconds as f64).max(1.0);
            rates[i] += rate;
            cpu[i] += per_request;
            row[i] = (rate, per_request, errors);
        }
        println!(
            "{round:<8} {:>18.0} {:>18.0} {:>16.1} {:>16.1}{}",
            row[0].0,
            row[1].0,
            row[0].1,
            row[1].1,
            if row[0].2 + row[1].2 > 0 {
                "  (errors)"
            } else {
                ""
            }
        );
    }
    let n = args.rounds as f64;
    let (ra, rb) = (rates[0] / n, rates[1] / n);
    let (ca, cb) = (cpu[0] / n, cpu[1] / n);
    println!("{:<8} {ra:>18.0} {rb:>18.0} {ca:>16.1} {cb:>16.1}", "mean");
    println!(
        "{} costs {:.1}% of the throughput and {:.1}% more proxy CPU per request than {}",
        b.label,
        (1.0 - rb / ra) * 100.0,
        (cb / ca - 1.0) * 100.0,
        a.label
    );
}
