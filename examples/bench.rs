//! Load tool for streamgate, three scenarios.
//!
//! ```text
//! cargo build --release
//! cargo run --release --example bench -- --streams 1000 --seconds 20     # SSE (default)
//! cargo run --release --example bench -- --scenario chain --seconds 5    # middleware cost
//! cargo run --release --example bench -- --scenario observability       # access log cost
//! ```
//!
//! `--scenario sse`: per-event latency and per-stream memory, through streamgate and
//! straight to the origin, in one run.
//!
//! It starts an SSE origin in this process (each stream gets one event per `--interval`,
//! spread evenly over the interval, each carrying its send time), opens `--streams`
//! streams straight to the origin and measures the delivery latency of every event, then
//! starts the release binary (`--proxy`, default `target/release/streamgate`) in front of
//! the same origin and does the same through it. The proxy's resident memory is read from
//! /proc before and after the streams open.
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
//! Only loopback addresses are used.

#[path = "support/process.rs"]
mod process;
#[path = "support/sse_origin.rs"]
mod sse_origin;

use std::net::SocketAddr;

use process::{rss_kib, Process};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use once_cell::sync::Lazy;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Barrier};

static EPOCH: Lazy<Instant> = Lazy::new(Instant::now);

fn micros_now() -> u64 {
    EPOCH.elapsed().as_micros() as u64
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
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--scenario" => args.scenario = value()?,
            "--pin" => args.pin = true,
            "--conns" => args.conns = value()?.parse().map_err(|e| format!("{e}"))?,
            "--rounds" => args.rounds = value()?.parse().map_err(|e| format!("{e}"))?,
            "--streams" => args.streams = value()?.parse().map_err(|e| format!("{e}"))?,
            "--seconds" => args.seconds = value()?.parse().map_err(|e| format!("{e}"))?,
            "--interval" => {
                args.interval = humantime::parse_duration(&value()?).map_err(|e| format!("{e}"))?
            }
            "--warmup" => {
                args.warmup = humantime::parse_duration(&value()?).map_err(|e| format!("{e}"))?
            }
            "--proxy" => args.proxy = value()?,
            "--mode" => args.mode = value()?,
            "--threads" => args.threads = value()?.parse().map_err(|e| format!("{e}"))?,
            "--tls" => args.tls = true,
            "--h2" => args.h2 = true,
            "-h" | "--help" => return Err(
                "usage: bench [--scenario sse|chain|observability] [--streams N] [--seconds S] \
                            [--interval 1s] [--warmup 3s] [--mode both|direct|proxy] \
                            [--proxy PATH] [--threads N] [--conns N] [--rounds N] [--pin] \
                            [--tls] [--h2]"
                    .into(),
            ),
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
}

impl Target {
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

fn new_histogram() -> Result<Histogram<u64>, String> {
    Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).map_err(|e| e.to_string())
}

/// Records the latency of every complete `data: <send time>` line in `pending` (read at
/// `now`) while measuring, and drops what it consumed.
fn record_events(pending: &mut Vec<u8>, now: u64, phase: &AtomicU8, hist: &mut Histogram<u64>) {
    let mut consumed = 0;
    while let Some(at) = find(&pending[consumed..], b"data: ") {
        let digits_start = consumed + at + 6;
        let Some(nl) = pending[digits_start..].iter().position(|&b| b == b'\n') else {
            break;
        };
        let digits = &pending[digits_start..digits_start + nl];
        if let Some(sent) = std::str::from_utf8(digits)
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
        {
            if phase.load(Ordering::Relaxed) == MEASURING {
                hist.saturating_record(now.saturating_sub(sent).max(1));
            }
        }
        consumed = digits_start + nl + 1;
    }
    pending.drain(..consumed);
}

/// One HTTP/1.1 client stream: records the latency of each event that arrives while
/// measuring, until `stop` fires.
async fn client(
    target: Target,
    ready: Arc<Barrier>,
    phase: Arc<AtomicU8>,
    mut stop: watch::Receiver<bool>,
) -> Result<Histogram<u64>, String> {
    let mut hist = new_histogram()?;
    let mut stream = target.connect(b"http/1.1").await?;
    stream
        .write_all(b"GET /events HTTP/1.1\r\nhost: bench.test\r\naccept: text/event-stream\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 8192];
    let mut pending: Vec<u8> = Vec::with_capacity(8192);
    let mut connected = false;
    loop {
        let k = tokio::select! {
            _ = stop.changed() => break,
            read = stream.read(&mut buf) => match read {
                Ok(0) => return Err("stream ended early".into()),
                Ok(k) => k,
                Err(e) => return Err(e.to_string()),
            },
        };
        let now = micros_now();
        pending.extend_from_slice(&buf[..k]);
        if !connected {
            if !pending.windows(4).any(|w| w == b"\r\n\r\n") {
                continue;
            }
            if !pending.starts_with(b"HTTP/1.1 200") {
                return Err(String::from_utf8_lossy(&pending[..pending.len().min(200)]).into());
            }
            connected = true;
            // A stream that failed to open never reaches the barrier: stop still ends the
            // wait, so the phase finishes and counts the failure.
            tokio::select! {
                _ = stop.changed() => break,
                _ = ready.wait() => {}
            }
        }
        record_events(&mut pending, now, &phase, &mut hist);
    }
    Ok(hist)
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

/// One HTTP/2 stream on a shared connection, measured like [`client`].
async fn h2_client(
    send: h2::client::SendRequest<Bytes>,
    scheme: &'static str,
    ready: Arc<Barrier>,
    phase: Arc<AtomicU8>,
    mut stop: watch::Receiver<bool>,
) -> Result<Histogram<u64>, String> {
    let mut hist = new_histogram()?;
    let mut send = send.ready().await.map_err(|e| e.to_string())?;
    let request = http::Request::get(format!("{scheme}://bench.test/events"))
        .header("accept", "text/event-stream")
        .body(())
        .map_err(|e| e.to_string())?;
    let (response, _) = send
        .send_request(request, true)
        .map_err(|e| e.to_string())?;
    let response = response.await.map_err(|e| e.to_string())?;
    if response.status() != 200 {
        return Err(format!("status {}", response.status()));
    }
    tokio::select! {
        _ = stop.changed() => return Ok(hist),
        _ = ready.wait() => {}
    }
    let mut body = response.into_body();
    let mut pending: Vec<u8> = Vec::with_capacity(8192);
    loop {
        let data = tokio::select! {
            _ = stop.changed() => break,
            data = body.data() => match data {
                None => return Err("stream ended early".into()),
                Some(Err(e)) => return Err(e.to_string()),
                Some(Ok(data)) => data,
            },
        };
        let now = micros_now();
        let _ = body.flow_control().release_capacity(data.len());
        pending.extend_from_slice(&data);
        record_events(&mut pending, now, &phase, &mut hist);
    }
    Ok(hist)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

struct Report {
    label: String,
    hist: Histogram<u64>,
    errors: usize,
    memory: Option<(u64, u64)>,
}

async fn run_phase(label: &str, target: Target, args: &Args, proxy_pid: Option<u32>) -> Report {
    let baseline = proxy_pid.and_then(rss_kib);
    let ready = Arc::new(Barrier::new(args.streams + 1));
    let phase = Arc::new(AtomicU8::new(WARMING));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = Vec::with_capacity(args.streams);
    let mut connections = Vec::new();
    if let Some(conns) = target.h2_conns {
        for _ in 0..conns.max(1) {
            match h2_connection(&target).await {
                Ok(send) => connections.push(send),
                Err(e) => {
                    eprintln!("{label}: {e}");
                    std::process::exit(1);
                }
            }
        }
    }
    let scheme = if target.tls.is_some() {
        "https"
    } else {
        "http"
    };
    for i in 0..args.streams {
        let (ready, phase, stop) = (ready.clone(), phase.clone(), stop_rx.clone());
        tasks.push(match connections.get(i % connections.len().max(1)) {
            Some(send) => tokio::spawn(h2_client(send.clone(), scheme, ready, phase, stop)),
            None => tokio::spawn(client(target.clone(), ready, phase, stop)),
        });
        tokio::task::yield_now().await;
    }
    let open_budget = Duration::from_secs(10 + args.streams as u64 / 500);
    if tokio::time::timeout(open_budget, ready.wait())
        .await
        .is_err()
    {
        eprintln!("{label}: not every stream opened within {open_budget:?}");
    }
    tokio::time::sleep(args.warmup).await;
    let memory = proxy_pid
        .and_then(rss_kib)
        .zip(baseline)
        .map(|(open, base)| (base, open));
    phase.store(MEASURING, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    let _ = stop_tx.send(true);
    let mut hist = new_histogram().expect("histogram");
    let mut errors = 0;
    for task in tasks {
        match task.await {
            Ok(Ok(h)) => hist.add(h).expect("merge"),
            Ok(Err(e)) => {
                if errors == 0 {
                    eprintln!("{label}: stream error: {e}");
                }
                errors += 1;
            }
            Err(e) => {
                eprintln!("{label}: task failed: {e}");
                errors += 1;
            }
        }
    }
    Report {
        label: label.to_string(),
        hist,
        errors,
        memory,
    }
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
    Lazy::force(&EPOCH);
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
    runtime.block_on(async {
        let origin = origin(args.interval, args.streams).await;
        let mut reports = Vec::new();
        if args.mode == "both" || args.mode == "direct" {
            let direct = Target {
                addr: origin,
                tls: None,
                h2_conns: None,
            };
            reports.push(run_phase("direct", direct, &args, None).await);
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
            let mut phases = vec![(format!("proxy h1{suffix}"), None)];
            if args.h2 {
                phases.push((
                    format!("proxy h2{suffix} x{}", args.conns),
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

/// The five typical middlewares of the chain scenario.
const CHAIN: &str = "middleware_services:\n\
  - { name: ids, type: request_id }\n\
  - { name: hdr, type: headers, config: { request: { set: { x-edge: bench } }, response: { set: { x-content-type-options: nosniff } } } }\n\
  - { name: ipf, type: ip_filter, config: { allow: [127.0.0.0/8], deny: [10.0.0.0/8] } }\n\
  - { name: rl, type: rate_limit, config: { rate: 1000000000, burst: 1000000000 } }\n\
  - { name: cors, type: cors }\n\
middlewares: [ids, hdr, ipf, rl, cors]\n";

/// A keep-alive origin answering every request with a two-byte body.
async fn plain_origin() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind origin");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = stream.set_nodelay(true);
                let mut buf = vec![0u8; 16 * 1024];
                let mut pending = Vec::new();
                loop {
                    let n = match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    pending.extend_from_slice(&buf[..n]);
                    let mut answers = 0;
                    while let Some(end) = find(&pending, b"\r\n\r\n") {
                        pending.drain(..end + 4);
                        answers += 1;
                    }
                    let reply = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nok";
                    let mut out = Vec::with_capacity(reply.len() * answers);
                    for _ in 0..answers {
                        out.extend_from_slice(reply);
                    }
                    if stream.write_all(&out).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// One keep-alive connection sending requests back to back until `stop`; returns how many
/// got a 200.
async fn http_client(target: SocketAddr, mut stop: watch::Receiver<bool>) -> Result<u64, String> {
    let mut stream = TcpStream::connect(target)
        .await
        .map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    let request = b"GET /bench HTTP/1.1\r\nhost: bench\r\norigin: https://app.test\r\n\r\n";
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

/// CPU time (user + system) a process has used so far, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

async fn throughput(target: SocketAddr, conns: usize, seconds: u64) -> (f64, usize) {
    let (stop_tx, stop_rx) = watch::channel(false);
    let tasks: Vec<_> = (0..conns)
        .map(|_| tokio::spawn(http_client(target, stop_rx.clone())))
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
    let origin = plain_origin().await;
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
        throughput(*addr, args.conns, 1).await;
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
            let (rate, errors) = throughput(addr, args.conns, args.seconds).await;
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
