//! Soak: a million event streams opened and closed through the release binary, a bounded
//! number at once, and a check that none of them left anything behind.
//!
//! ```text
//! bench/soak.sh                        # builds, then runs this with its defaults
//! cargo run --release --example soak -- --streams 1000000 --concurrency 2000 --budget 15m
//! ```
//!
//! Starts an SSE origin in this process (its first event goes out at once), the release
//! binary (`--proxy`) in front of it with stream tracking on and an admin listener, then
//! opens streams over loopback, at most `--concurrency` at a time: each connects, asks for
//! `/events`, reads its first event and closes. After `--warmup` streams (allocator arenas,
//! worker threads) and once the registry is empty, it takes the proxy's resident memory and
//! open descriptors; then it runs `--streams` more, or as many as fit in `--budget`, and
//! says which. Once the proxy has let go of them, it measures again. Pass: resident memory
//! within 10% of the start, the stream registry (`/sse/connections`) empty, no more
//! descriptors open than at the start, and no stream failed. Exit status 0 on a pass, 1 on
//! a fail.

#[path = "support/process.rs"]
mod process;
#[path = "support/sse_origin.rs"]
mod sse_origin;

use std::net::SocketAddr;
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use process::{open_fds, rss_kib};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

const USAGE: &str = "usage: soak [--streams N] [--concurrency N] [--warmup N] [--budget 15m] \
                     [--proxy PATH]";

/// How long one stream may take, connect to first event, before it counts as failed.
const STREAM_LIMIT: Duration = Duration::from_secs(10);

/// How often progress is printed.
const PROGRESS: Duration = Duration::from_secs(30);

struct Args {
    streams: u64,
    concurrency: usize,
    warmup: u64,
    budget: Duration,
    proxy: String,
}

impl Default for Args {
    fn default() -> Self {
        Args {
            streams: 1_000_000,
            concurrency: 2_000,
            warmup: 100_000,
            budget: Duration::from_secs(15 * 60),
            proxy: "target/release/streamgate".into(),
        }
    }
}

/// `--flag value` pairs over the defaults.
fn parse_args(words: &[String]) -> Result<Args, String> {
    let mut args = Args::default();
    for pair in words.chunks(2) {
        let [flag, value] = pair else {
            return Err(USAGE.into());
        };
        let count = || {
            let digits = value.replace('_', "");
            digits.parse::<u64>().map_err(|e| format!("{flag}: {e}"))
        };
        match flag.as_str() {
            "--streams" => args.streams = count()?,
            "--concurrency" => args.concurrency = count()?.max(1) as usize,
            "--warmup" => args.warmup = count()?,
            "--budget" => {
                args.budget =
                    humantime::parse_duration(value).map_err(|e| format!("{flag}: {e}"))?
            }
            "--proxy" => args.proxy = value.clone(),
            _ => return Err(USAGE.into()),
        }
    }
    Ok(args)
}

/// How a stream failed.
#[derive(Debug, Clone, Copy)]
enum Failure {
    /// The connection to the proxy was not made.
    Connect,
    /// The request could not be written, or reading the answer failed.
    Io,
    /// The proxy closed the connection before the first event.
    Closed,
    /// No first event within [`STREAM_LIMIT`].
    Slow,
}

/// The counts of a run.
#[derive(Default)]
struct Tally {
    done: AtomicU64,
    /// Failures by kind, in [`Failure`] order.
    failed: [AtomicU64; 4],
    first_error: std::sync::Mutex<Option<String>>,
}

impl Tally {
    fn record(&self, outcome: Result<(), (Failure, String)>) {
        self.done.fetch_add(1, Ordering::Relaxed);
        if let Err((kind, e)) = outcome {
            self.failed[kind as usize].fetch_add(1, Ordering::Relaxed);
            if let Ok(mut first) = self.first_error.lock() {
                first.get_or_insert(e);
            }
        }
    }

    fn failed(&self) -> u64 {
        self.failed.iter().map(|f| f.load(Ordering::Relaxed)).sum()
    }

    /// The failures by kind, for the report.
    fn failures(&self) -> String {
        let kinds = [
            Failure::Connect,
            Failure::Io,
            Failure::Closed,
            Failure::Slow,
        ];
        let counts: Vec<String> = kinds
            .iter()
            .map(|k| format!("{k:?} {}", self.failed[*k as usize].load(Ordering::Relaxed)))
            .collect();
        format!("{} failed ({})", self.failed(), counts.join(", "))
    }
}

/// One stream: connect, ask, read up to the end of the first event, close.
async fn stream(proxy: SocketAddr) -> Result<(), (Failure, String)> {
    let mut conn = TcpStream::connect(proxy)
        .await
        .map_err(|e| (Failure::Connect, format!("connect: {e}")))?;
    conn.write_all(b"GET /events HTTP/1.1\r\nhost: soak\r\naccept: text/event-stream\r\n\r\n")
        .await
        .map_err(|e| (Failure::Io, format!("request: {e}")))?;
    let mut got = Vec::with_capacity(512);
    let mut buf = [0u8; 512];
    loop {
        let n = conn
            .read(&mut buf)
            .await
            .map_err(|e| (Failure::Io, format!("read: {e}")))?;
        if n == 0 {
            let got = String::from_utf8_lossy(&got);
            return Err((
                Failure::Closed,
                format!("closed before the first event: {got:?}"),
            ));
        }
        got.extend_from_slice(&buf[..n]);
        let body = got.windows(4).position(|w| w == b"\r\n\r\n");
        if body.is_some_and(|at| got[at + 4..].windows(2).any(|w| w == b"\n\n")) {
            return Ok(());
        }
    }
}

/// Opens `count` streams (or as many as fit in `budget`), at most `concurrency` at once,
/// printing progress with the proxy's memory and descriptors.
async fn run(
    proxy: SocketAddr,
    pid: u32,
    count: u64,
    concurrency: usize,
    budget: Duration,
) -> (Arc<Tally>, Duration) {
    let tally = Arc::new(Tally::default());
    let slots = Arc::new(Semaphore::new(concurrency));
    let began = Instant::now();
    let mut reported = began;
    for _ in 0..count {
        if began.elapsed() >= budget {
            break;
        }
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        let counts = tally.clone();
        tokio::spawn(async move {
            let outcome = tokio::time::timeout(STREAM_LIMIT, stream(proxy))
                .await
                .unwrap_or_else(|_| Err((Failure::Slow, "no first event within 10 s".into())));
            counts.record(outcome);
            drop(slot);
        });
        if reported.elapsed() >= PROGRESS {
            reported = Instant::now();
            let done = tally.done.load(Ordering::Relaxed);
            println!(
                "  {:>7.0}s  {done:>9} streams  {:>6.0}/s  proxy: {} KiB resident, {} descriptors",
                began.elapsed().as_secs_f64(),
                done as f64 / began.elapsed().as_secs_f64(),
                rss_kib(pid).unwrap_or(0),
                open_fds(pid).unwrap_or(0),
            );
        }
    }
    // Every stream started has ended once all the slots are free again.
    let _all = slots.acquire_many(concurrency as u32).await;
    (tally, began.elapsed())
}

/// `GET path` on the admin listener; the body.
async fn admin_get(admin: SocketAddr, path: &str) -> Result<String, String> {
    let mut conn = TcpStream::connect(admin).await.map_err(|e| e.to_string())?;
    let request = format!("GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n");
    conn.write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut answer = Vec::new();
    conn.read_to_end(&mut answer)
        .await
        .map_err(|e| e.to_string())?;
    let answer = String::from_utf8_lossy(&answer);
    let (_, body) = answer.split_once("\r\n\r\n").ok_or("no body")?;
    Ok(body.to_string())
}

/// Streams in the registry (`/sse/connections`).
async fn registry(admin: SocketAddr) -> Result<u64, String> {
    let body = admin_get(admin, "/sse/connections").await?;
    let view: serde_json::Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
    view["total"]
        .as_u64()
        .ok_or_else(|| format!("no total in {body}"))
}

/// The sum of the metric `name` over its series.
async fn gauge(admin: SocketAddr, name: &str) -> Result<f64, String> {
    let body = admin_get(admin, "/metrics").await?;
    Ok(body
        .lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// Waits until the proxy holds no stream and no client connection, then until its
/// resident memory stops falling (what it frees after a burst goes back within seconds),
/// at most 30 s each.
async fn settle(admin: SocketAddr, pid: u32) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let streams = registry(admin).await?;
        let open = gauge(admin, "streamgate_connections_open").await?;
        if streams == 0 && open == 0.0 {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "after 30 s still {streams} streams in the registry, {open} connections open"
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut lowest = rss_kib(pid).unwrap_or(0);
    let mut since = Instant::now();
    while since.elapsed() < Duration::from_secs(8) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = rss_kib(pid).unwrap_or(0);
        if now < lowest {
            lowest = now;
            since = Instant::now();
        }
    }
    Ok(())
}

fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| e.to_string())
}

async fn soak(args: Args) -> Result<bool, String> {
    let origin = sse_origin::start(Duration::from_secs(1), 1, || 0).await;
    let (port, admin_port) = (free_port()?, free_port()?);
    let dir = std::env::temp_dir().join(format!("streamgate-soak-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let config = dir.join("soak.yaml");
    std::fs::write(
        &config,
        format!(
            "threads: 2\npid_file: {dir}/sg.pid\nupgrade_sock: {dir}/sg.sock\n\
             grace_period_seconds: 1\ngraceful_shutdown_timeout_seconds: 1\n\
             listen: [\"127.0.0.1:{port}\"]\nadmin: {{ listen: \"127.0.0.1:{admin_port}\" }}\n\
             access_log: {{ enabled: false }}\nsse: {{ connection_tracking: true }}\n\
             services:\n  origin: {{ url: \"http://{origin}\" }}\n\
             host_rules:\n  - {{ pattern: \"*\", target: origin }}\n",
            dir = dir.display()
        ),
    )
    .map_err(|e| e.to_string())?;
    let log = std::fs::File::create(dir.join("proxy.log")).map_err(|e| e.to_string())?;
    let proxy = process::start(
        Command::new(&args.proxy),
        &args.proxy,
        &config,
        "warn",
        Stdio::from(log),
    )?;
    let pid = proxy.0.id();
    let addr: SocketAddr = format!("127.0.0.1:{port}")
        .parse()
        .map_err(|e| format!("{e}"))?;
    let admin: SocketAddr = format!("127.0.0.1:{admin_port}")
        .parse()
        .map_err(|e| format!("{e}"))?;
    let waited = Instant::now();
    while registry(admin).await.is_err() {
        if waited.elapsed() > Duration::from_secs(10) {
            return Err(format!(
                "the proxy did not start; see {}",
                dir.join("proxy.log").display()
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "soak: {} streams at most {} at once (budget {}), after a warm-up of {}; proxy pid {pid}, log {}",
        args.streams,
        args.concurrency,
        humantime::format_duration(args.budget),
        args.warmup,
        dir.join("proxy.log").display()
    );

    let (warm, took) = run(addr, pid, args.warmup, args.concurrency, Duration::MAX).await;
    println!(
        "warm-up: {} streams in {:.1}s, {}",
        warm.done.load(Ordering::Relaxed),
        took.as_secs_f64(),
        warm.failures()
    );
    settle(admin, pid).await?;
    let (rss_start, fds_start) = (rss_kib(pid).unwrap_or(0), open_fds(pid).unwrap_or(0));
    println!("start: {rss_start} KiB resident, {fds_start} descriptors open, registry empty");

    let (tally, took) = run(addr, pid, args.streams, args.concurrency, args.budget).await;
    let (done, failed) = (tally.done.load(Ordering::Relaxed), tally.failed());
    let settled = settle(admin, pid).await;
    let (rss_end, fds_end) = (rss_kib(pid).unwrap_or(0), open_fds(pid).unwrap_or(0));
    let streams_left = registry(admin).await?;
    let open_gauge = gauge(admin, "streamgate_sse_streams_open").await?;
    let opened = gauge(admin, "streamgate_sse_streams_opened_total").await?;
    println!(
        "run: {done} streams opened and closed in {:.1}s ({:.0}/s), {}{}",
        took.as_secs_f64(),
        done as f64 / took.as_secs_f64(),
        tally.failures(),
        if done < args.streams {
            format!("; stopped by the budget before {}", args.streams)
        } else {
            String::new()
        }
    );
    if let Some(e) = tally.first_error.lock().ok().and_then(|f| f.clone()) {
        println!("  first failure: {e}");
    }
    if let Err(e) = &settled {
        println!("  {e}");
    }
    println!(
        "end: {rss_end} KiB resident ({:+.1}% of the start), {fds_end} descriptors open, \
         {streams_left} streams in the registry, streamgate_sse_streams_open {open_gauge}, \
         streamgate_sse_streams_opened_total {opened}",
        (rss_end as f64 / rss_start.max(1) as f64 - 1.0) * 100.0
    );
    let checks = [
        (
            "resident memory within 10% of the start",
            rss_end as f64 <= rss_start as f64 * 1.10,
        ),
        (
            "stream registry empty",
            streams_left == 0 && open_gauge == 0.0,
        ),
        ("descriptors back", fds_end <= fds_start),
        ("no stream failed", failed == 0 && warm.failed() == 0),
    ];
    for (what, ok) in checks {
        println!("  {} {what}", if ok { "pass" } else { "FAIL" });
    }
    Ok(checks.iter().all(|(_, ok)| *ok))
}

#[tokio::main]
async fn main() -> ExitCode {
    let words: Vec<String> = std::env::args().skip(1).collect();
    let outcome = match parse_args(&words) {
        Ok(args) => soak(args).await,
        Err(usage) => {
            eprintln!("{usage}");
            return ExitCode::from(2);
        }
    };
    match outcome {
        Ok(true) => {
            println!("soak: pass");
            ExitCode::SUCCESS
        }
        Ok(false) => {
            println!("soak: FAIL");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("soak: {e}");
            ExitCode::FAILURE
        }
    }
}
