//! SSE load tool: per-event latency and per-stream memory, through streamgate and straight
//! to the origin, in one run.
//!
//! ```text
//! cargo build --release
//! cargo run --release --example bench -- --streams 1000 --seconds 20
//! ```
//!
//! It starts an SSE origin in this process (each stream gets one event per `--interval`,
//! spread evenly over the interval, each carrying its send time), opens `--streams`
//! streams straight to the origin and measures the delivery latency of every event, then
//! starts the release binary (`--proxy`, default `target/release/streamgate`) in front of
//! the same origin and does the same through it. The proxy's resident memory is read from
//! /proc before and after the streams open. Only loopback addresses are used.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use once_cell::sync::Lazy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Barrier};

static EPOCH: Lazy<Instant> = Lazy::new(Instant::now);

fn micros_now() -> u64 {
    EPOCH.elapsed().as_micros() as u64
}

struct Args {
    streams: usize,
    seconds: u64,
    interval: Duration,
    warmup: Duration,
    proxy: String,
    mode: String,
    threads: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        streams: 1000,
        seconds: 20,
        interval: Duration::from_secs(1),
        warmup: Duration::from_secs(3),
        proxy: "target/release/streamgate".into(),
        mode: "both".into(),
        threads: 2,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
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
            "-h" | "--help" => {
                return Err("usage: bench [--streams N] [--seconds S] [--interval 1s] \
                            [--warmup 3s] [--mode both|direct|proxy] [--proxy PATH] \
                            [--threads N]"
                    .into())
            }
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(args)
}

/// The origin: every connection is an SSE stream with one event per `interval`, the first
/// one delayed by `offset` so that streams are spread over the interval.
async fn origin(interval: Duration, streams: usize) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind origin");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut n: u64 = 0;
        while let Ok((mut stream, _)) = listener.accept().await {
            let offset = interval.mul_f64((n % streams.max(1) as u64) as f64 / streams as f64);
            n += 1;
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let mut head = Vec::new();
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => head.extend_from_slice(&buf[..k]),
                    }
                }
                let header = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                              cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n";
                if stream.write_all(header.as_bytes()).await.is_err() {
                    return;
                }
                let mut next = tokio::time::Instant::now() + offset;
                let mut id: u64 = 0;
                loop {
                    tokio::time::sleep_until(next).await;
                    next += interval;
                    id += 1;
                    let event = format!("id: {id}\ndata: {}\n\n", micros_now());
                    let chunk = format!("{:x}\r\n{event}\r\n", event.len());
                    if stream.write_all(chunk.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// Where a run is: streams opening and warming up, measuring, or done.
const WARMING: u8 = 0;
const MEASURING: u8 = 1;

/// One client stream: records the latency of each event that arrives while measuring,
/// until `stop` fires.
async fn client(
    target: SocketAddr,
    ready: Arc<Barrier>,
    phase: Arc<AtomicU8>,
    mut stop: watch::Receiver<bool>,
) -> Result<Histogram<u64>, String> {
    let mut hist =
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).map_err(|e| e.to_string())?;
    let mut stream = TcpStream::connect(target)
        .await
        .map_err(|e| format!("connect {target}: {e}"))?;
    stream
        .write_all(b"GET /events HTTP/1.1\r\nhost: bench\r\naccept: text/event-stream\r\n\r\n")
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
            ready.wait().await;
        }
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
    Ok(hist)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

struct Report {
    label: String,
    hist: Histogram<u64>,
    errors: usize,
    memory: Option<(u64, u64)>,
}

async fn run_phase(label: &str, target: SocketAddr, args: &Args, proxy_pid: Option<u32>) -> Report {
    let baseline = proxy_pid.and_then(rss_kib);
    let ready = Arc::new(Barrier::new(args.streams + 1));
    let phase = Arc::new(AtomicU8::new(WARMING));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = Vec::with_capacity(args.streams);
    for _ in 0..args.streams {
        tasks.push(tokio::spawn(client(
            target,
            ready.clone(),
            phase.clone(),
            stop_rx.clone(),
        )));
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
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
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

struct ProxyProcess(Child);

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn start_proxy(
    args: &Args,
    origin: SocketAddr,
) -> Result<(ProxyProcess, SocketAddr), String> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port();
    let dir = std::env::temp_dir().join(format!("streamgate-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let config = dir.join("bench.yaml");
    std::fs::write(
        &config,
        format!(
            "threads: {threads}\npid_file: {dir}/sg.pid\nupgrade_sock: {dir}/sg.sock\n\
             grace_period_seconds: 1\ngraceful_shutdown_timeout_seconds: 1\n\
             listen: [\"127.0.0.1:{port}\"]\n\
             services:\n  origin:\n    url: \"http://{origin}\"\n\
             host_rules:\n  - pattern: \"*\"\n    target: origin\n",
            threads = args.threads,
            dir = dir.display()
        ),
    )
    .map_err(|e| e.to_string())?;
    let child = Command::new(&args.proxy)
        .arg("-c")
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| {
            format!(
                "cannot start {} ({e}); run `cargo build --release` first",
                args.proxy
            )
        })?;
    let proxy = ProxyProcess(child);
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
        "{:<10} {:>9} {:>7} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "path", "events", "errors", "p50 µs", "p90 µs", "p99 µs", "p99.9 µs", "max µs"
    );
    for r in reports {
        let h = &r.hist;
        println!(
            "{:<10} {:>9} {:>7} {:>9} {:>9} {:>9} {:>9} {:>9}",
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
    if let [direct, proxied] = reports {
        let added = |q: f64| {
            proxied.hist.value_at_quantile(q) as i64 - direct.hist.value_at_quantile(q) as i64
        };
        println!(
            "added by the proxy: p50 {} µs, p99 {} µs",
            added(0.50),
            added(0.99)
        );
    }
    for r in reports {
        if let Some((base, open)) = r.memory {
            let per = (open.saturating_sub(base)) as f64 / args.streams as f64;
            println!(
                "proxy resident memory: {base} KiB idle, {open} KiB with {} streams open: \
                 {per:.1} KiB per stream",
                args.streams
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
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let origin = origin(args.interval, args.streams).await;
        let mut reports = Vec::new();
        if args.mode == "both" || args.mode == "direct" {
            reports.push(run_phase("direct", origin, &args, None).await);
        }
        if args.mode == "both" || args.mode == "proxy" {
            match start_proxy(&args, origin).await {
                Ok((proxy, addr)) => {
                    let pid = proxy.0.id();
                    reports.push(run_phase("streamgate", addr, &args, Some(pid)).await);
                }
                Err(e) => {
                    eprintln!("{e}");
                    std::process::exit(1);
                }
            }
        }
        print(&reports, &args);
    });
}
