//! `--scenario peers`: streamgate side by side with other proxies in one run, each started
//! fresh for every measurement and stopped by its PID, in interleaved rounds (every proxy
//! runs round 1 before any runs round 2; even rounds go through the list backwards).
//!
//! - **Streams**, per tier of `--tiers`: that many event streams (one connection each,
//!   opened `--ramp` a second), one `--size`-byte event per `--interval` each. After every
//!   stream has its response head (or failed) and `--warmup`, a steady window of
//!   `--seconds`: latency of the events received in it (the origin stamps each event with
//!   `CLOCK_MONOTONIC` just before writing it; the client subtracts on receipt), the
//!   proxy's CPU (utime + stime of its processes) over it per event delivered, and its
//!   resident memory (VmRSS of its processes) at its end less the same before the first
//!   stream, per stream. Also the time to first event (connect start to first event
//!   parsed), streams established, failed and dropped, and ids skipped or repeated.
//! - **Burst**: `--burst-streams` streams of `--burst` events of `--burst-size` bytes,
//!   written by the origin as fast as it can; events a second at the client from the first
//!   connect to the last event, and the proxy's CPU seconds over the burst.
//! - **Plain**: keep-alive GETs of `--plain-size`-byte bodies over `--conns` connections
//!   for `--plain-seconds`, with `wrk -t2` when it is installed, else this program's own
//!   client; requests a second and proxy CPU per request.
//!
//! The origin is this program again (`--scenario origin`) in a process of its own on
//! `--origin`, so neither it nor the client holds more than one side of each stream's
//! connections (one process may open at most 20,000 files here). Every run is one JSON line
//! in `OUT/results.jsonl`; the tables (medians, then each round in brackets) are printed
//! and written to `OUT/table.txt`.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::{
    cpu_seconds, micros_now, open_h1, open_streams, process_tree, throughput, tree_cpu_seconds,
    tree_rss_kib, Args, Run, Tally, Target,
};

/// The peers scenario's own settings.
pub struct Settings {
    pub peers: Vec<Peer>,
    pub tiers: Vec<usize>,
    pub origin: SocketAddr,
    pub out: Option<PathBuf>,
    pub ramp: u64,
    pub size: usize,
    pub burst: u64,
    pub burst_streams: usize,
    pub burst_size: usize,
    pub plain_seconds: u64,
    pub plain_size: usize,
    /// Streams opened and closed one after another per run (0: none).
    pub opens: usize,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            peers: Vec::new(),
            tiers: vec![1000, 9000],
            origin: ([127, 0, 0, 1], 18180).into(),
            out: None,
            ramp: 2000,
            size: 256,
            burst: 500_000,
            burst_streams: 4,
            burst_size: 512,
            plain_seconds: 10,
            plain_size: 128,
            opens: 3000,
        }
    }
}

/// A proxy to measure: it listens on 127.0.0.1:`port` and forwards to the origin. `None`:
/// `direct`, the client talks to the origin itself.
pub struct Peer {
    name: String,
    listen: Option<(u16, String)>,
}

impl Peer {
    /// `direct`, or `NAME=PORT:COMMAND` (run by `sh -c`, in the foreground).
    pub fn parse(spec: &str) -> Result<Peer, String> {
        if spec == "direct" {
            return Ok(Peer {
                name: spec.into(),
                listen: None,
            });
        }
        let usage = || format!("--peer {spec}: expected direct or NAME=PORT:COMMAND");
        let (name, rest) = spec.split_once('=').ok_or_else(usage)?;
        let (port, command) = rest.split_once(':').ok_or_else(usage)?;
        let port = port.parse().map_err(|_| usage())?;
        Ok(Peer {
            name: name.into(),
            listen: Some((port, command.into())),
        })
    }
}

/// A process this scenario started: stopped by its PID (SIGTERM, then SIGKILL after 10 s),
/// with any process it left behind, when it is dropped.
struct Started {
    name: String,
    child: Child,
}

impl Started {
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        let pid = self.pid();
        let tree = crate::process_tree(pid);
        signal(pid, libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if matches!(self.child.try_wait(), Ok(None)) {
            eprintln!("{} (pid {pid}) did not stop on SIGTERM: SIGKILL", self.name);
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        // Workers whose parent was killed outright live on under init.
        for pid in tree.into_iter().skip(1) {
            if Path::new(&format!("/proc/{pid}")).exists() {
                signal(pid, libc::SIGKILL);
            }
        }
    }
}

fn signal(pid: u32, signal: libc::c_int) {
    // SAFETY: kill(2) takes plain integers and touches no memory of this process.
    unsafe { libc::kill(pid as libc::pid_t, signal) };
}

/// Runs `command` through `sh -c` (as its own process, not the shell's child), output
/// appended to `log`, and waits until `addr` accepts connections.
async fn start(
    name: &str,
    command: &mut Command,
    addr: SocketAddr,
    log: &Path,
) -> Result<Started, String> {
    if TcpStream::connect(addr).await.is_ok() {
        return Err(format!("{addr} is already in use"));
    }
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| format!("{}: {e}", log.display()))?;
    let child = command
        .stdin(Stdio::null())
        .stdout(file.try_clone().map_err(|e| e.to_string())?)
        .stderr(file)
        .spawn()
        .map_err(|e| format!("cannot start {name}: {e}"))?;
    let mut started = Started {
        name: name.into(),
        child,
    };
    for _ in 0..300 {
        if TcpStream::connect(addr).await.is_ok() && listens_alone(started.pid(), addr.port()) {
            return Ok(started);
        }
        if let Ok(Some(status)) = started.child.try_wait() {
            return Err(format!("{name} exited ({status}); see {}", log.display()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(format!(
        "{name} did not listen on {addr} within 15 s, or another process listens there too"
    ))
}

/// Whether every socket listening on `port` (IPv4) belongs to `pid` or a process below
/// it. A proxy that finds its port taken may keep retrying (Pingora does), and listeners
/// with SO_REUSEPORT share a port: either way another process would answer the client.
fn listens_alone(pid: u32, port: u16) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/tcp") else {
        return true;
    };
    // sl local_address rem_address st ... inode: the port is hex after the colon; state
    // 0A is LISTEN; the inode is the tenth field.
    let listening: Vec<String> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local_port = fields.get(1)?.rsplit_once(':')?.1;
            if u16::from_str_radix(local_port, 16).ok()? != port || *fields.get(3)? != "0A" {
                return None;
            }
            Some(format!("socket:[{}]", fields.get(9)?))
        })
        .collect();
    let mut owned = Vec::new();
    for pid in crate::process_tree(pid) {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(link) = std::fs::read_link(fd.path()) {
                owned.push(link.to_string_lossy().into_owned());
            }
        }
    }
    !listening.is_empty() && listening.iter().all(|socket| owned.contains(socket))
}

/// A proxy started for one run, or none for `direct`.
struct Proxy {
    process: Option<Started>,
    target: Target,
    /// Its resident memory before the first connection of the run, KiB.
    idle_rss: Option<u64>,
}

impl Proxy {
    async fn start(peer: &Peer, args: &Args, out: &Path) -> Result<Proxy, String> {
        // Every stream of the run is asked for the same way (`--post`, `--accept`).
        let target = |addr| Target {
            post: args.post,
            accept: args.accept.clone(),
            ..Target::plain(addr)
        };
        let Some((port, command)) = &peer.listen else {
            return Ok(Proxy {
                process: None,
                target: target(args.peers.origin),
                idle_rss: None,
            });
        };
        let addr = SocketAddr::from(([127, 0, 0, 1], *port));
        let log = out.join(format!("{}.log", peer.name));
        let mut sh = Command::new("sh");
        sh.arg("-c").arg(format!("exec {command}"));
        let process = start(&peer.name, &mut sh, addr, &log).await?;
        // Let workers finish starting before the baseline is read.
        tokio::time::sleep(Duration::from_millis(500)).await;
        Ok(Proxy {
            idle_rss: Some(tree_rss_kib(process.pid())),
            process: Some(process),
            target: target(addr),
        })
    }

    fn rss(&self) -> Option<u64> {
        self.process.as_ref().map(|p| tree_rss_kib(p.pid()))
    }

    fn cpu(&self) -> Option<f64> {
        self.process.as_ref().map(|p| tree_cpu_seconds(p.pid()))
    }
}

fn round_order(peers: &[Peer], round: usize) -> Vec<&Peer> {
    let mut order: Vec<&Peer> = peers.iter().collect();
    if round % 2 == 0 {
        order.reverse();
    }
    order
}

fn quantile_us(h: &hdrhistogram::Histogram<u64>, q: f64) -> Option<u64> {
    (!h.is_empty()).then(|| h.value_at_quantile(q))
}

/// What every run needs: the settings, the output folder, and the origin's process.
struct Bench<'a> {
    args: &'a Args,
    out: PathBuf,
    origin: u32,
}

impl Bench<'_> {
    /// CPU seconds used so far by this process (the client) and by the origin: when either
    /// grows by about a second a second, the harness, not the proxy, is the limit.
    fn harness_cpu(&self) -> (f64, f64) {
        (cpu_seconds(std::process::id()), cpu_seconds(self.origin))
    }

    fn harness_cpu_since(&self, before: (f64, f64)) -> Value {
        let now = self.harness_cpu();
        json!({ "client_cpu_s": now.0 - before.0, "origin_cpu_s": now.1 - before.1 })
    }
}

/// Adds the fields of `extra` (an object) to `run`.
fn merged(mut run: Value, extra: Value) -> Value {
    if let (Some(run), Value::Object(extra)) = (run.as_object_mut(), extra) {
        run.extend(extra);
    }
    run
}

/// How the streams are asked for, for the tables' titles: nothing for a `GET` with an SSE
/// `Accept` (EventSource's request).
fn asked(args: &Args) -> String {
    let method = if args.post { "POST" } else { "GET" };
    if !args.post && args.accept == "text/event-stream" {
        return String::new();
    }
    format!(" ({method} with Accept: {})", args.accept)
}

/// One run of a stream tier through one proxy.
async fn streams_run(bench: &Bench<'_>, peer: &Peer, streams: usize) -> Result<Value, String> {
    let args = bench.args;
    let s = &args.peers;
    let proxy = Proxy::start(peer, bench.args, &bench.out).await?;
    let run = Run::new();
    let path = format!("/events?size={}", s.size);
    let tasks = open_streams(&proxy.target, &path, streams, s.ramp, &run).await?;
    let ramp = Duration::from_secs_f64(streams as f64 / s.ramp.max(1) as f64);
    let settled = run
        .wait_settled(streams, ramp + Duration::from_secs(15))
        .await;
    if !settled {
        eprintln!("  {}: not every stream was answered in time", peer.name);
    }
    tokio::time::sleep(args.warmup).await;
    let cpu_before = proxy.cpu();
    let harness_before = bench.harness_cpu();
    let started = Instant::now();
    run.measure();
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    let rss_end = proxy.rss();
    let cpu_used = proxy.cpu().zip(cpu_before).map(|(end, start)| end - start);
    let harness = bench.harness_cpu_since(harness_before);
    run.stop();
    let steady = started.elapsed().as_secs_f64();
    let t = Tally::collect(tasks).await;
    drop(proxy.process);
    if let Some(e) = &t.first_error {
        eprintln!("  {}: first stream error: {e}", peer.name);
    }
    let per_stream = rss_end
        .zip(proxy.idle_rss)
        .map(|(end, idle)| (end as f64 - idle as f64) / streams as f64);
    let run = json!({
        "scenario": "streams",
        "streams": streams,
        "proxy": peer.name,
        "established": t.established,
        "failed": t.failed,
        "dropped": t.broken + t.ended,
        "gaps": t.gaps,
        "duplicates": t.duplicates,
        "events": t.events,
        "steady_events": t.measured_events,
        "steady_seconds": steady,
        "latency_p50_us": quantile_us(&t.latency, 0.5),
        "latency_p90_us": quantile_us(&t.latency, 0.9),
        "latency_p99_us": quantile_us(&t.latency, 0.99),
        "latency_max_us": quantile_us(&t.latency, 1.0),
        "ttfe_p50_ms": quantile_us(&t.first_event, 0.5).map(|us| us as f64 / 1000.0),
        "ttfe_p99_ms": quantile_us(&t.first_event, 0.99).map(|us| us as f64 / 1000.0),
        "rss_idle_kib": proxy.idle_rss,
        "rss_end_kib": rss_end,
        "rss_per_stream_kib": per_stream,
        "cpu_steady_s": cpu_used,
        "cpu_us_per_event": cpu_used.map(|c| c * 1e6 / t.measured_events.max(1) as f64),
    });
    Ok(merged(run, harness))
}

/// Streams opened one after another through one proxy, each closed once its first event
/// is in: what opening a stream costs the proxy alone, without the queueing of the stream
/// tiers (where thousands open at once and wait for each other's work). The proxy's
/// processor time and its threads' context switches (voluntary and not, from /proc) are
/// counted over the whole series and divided by the streams.
async fn opens_run(bench: &Bench<'_>, peer: &Peer) -> Result<Value, String> {
    let s = &bench.args.peers;
    let proxy = Proxy::start(peer, bench.args, &bench.out).await?;
    let path = format!("/events?size={}", s.size);
    // A few unmeasured first: the proxy's first connections set up what later ones reuse.
    for _ in 0..20 {
        let _ = first_event(&proxy.target, &path).await;
    }
    let pid = proxy.process.as_ref().map(Started::pid);
    let cpu_before = proxy.cpu();
    let switches_before = pid.map(tree_switches);
    let mut ttfe = hdrhistogram::Histogram::<u64>::new(3).map_err(|e| e.to_string())?;
    let mut failed = 0;
    for _ in 0..s.opens {
        match first_event(&proxy.target, &path).await {
            Ok(took) => {
                let _ = ttfe.record(took.as_micros() as u64);
            }
            Err(_) => failed += 1,
        }
    }
    // The last streams' ends are the proxy's work too.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let cpu = proxy.cpu().zip(cpu_before).map(|(end, start)| end - start);
    let switches = pid
        .map(tree_switches)
        .zip(switches_before)
        .map(|(end, start)| end - start);
    let per = |total: f64| total / s.opens.max(1) as f64;
    Ok(json!({
        "scenario": "opens",
        "proxy": peer.name,
        "streams": s.opens,
        "failed": failed,
        "ttfe_p50_ms": quantile_us(&ttfe, 0.5).map(|us| us as f64 / 1000.0),
        "ttfe_p99_ms": quantile_us(&ttfe, 0.99).map(|us| us as f64 / 1000.0),
        "cpu_us_per_stream": cpu.map(|c| per(c * 1e6)),
        "switches_per_stream": switches.map(|n| per(n as f64)),
    }))
}

/// Opens a stream on `path` on a new connection (as the tiers do, [`open_h1`]), reads
/// until its first event is in (giving up after 10 s), and closes it: how long that took.
async fn first_event(target: &Target, path: &str) -> Result<Duration, String> {
    let began = Instant::now();
    let opened = async {
        let (mut io, mut body, _) = open_h1(target, path).await?;
        let mut buf = [0u8; 4096];
        // The first event's end (its framing uses CRLFs only).
        while !body.windows(2).any(|w| w == b"\n\n") {
            let read = io.read(&mut buf).await.map_err(|e| e.to_string())?;
            if read == 0 {
                return Err("closed before the first event".to_string());
            }
            body.extend_from_slice(&buf[..read]);
        }
        Ok(())
    };
    tokio::time::timeout(Duration::from_secs(10), opened)
        .await
        .map_err(|_| "no first event within 10 s".to_string())??;
    Ok(began.elapsed())
}

/// Context switches (voluntary and not) of every thread of a process tree so far.
fn tree_switches(pid: u32) -> u64 {
    let mut total = 0;
    for process in process_tree(pid) {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{process}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
                continue;
            };
            total += status
                .lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>();
        }
    }
    total
}

/// One burst through one proxy.
async fn burst_run(bench: &Bench<'_>, peer: &Peer) -> Result<Value, String> {
    let s = &bench.args.peers;
    let proxy = Proxy::start(peer, bench.args, &bench.out).await?;
    let run = Run::new();
    let path = format!("/burst?count={}&size={}", s.burst, s.burst_size);
    let cpu_before = proxy.cpu();
    let harness_before = bench.harness_cpu();
    let started = micros_now();
    let tasks = open_streams(&proxy.target, &path, s.burst_streams, 0, &run).await?;
    // A bound on the run whatever happens: 10 s plus 10 µs an event.
    let limit = Duration::from_secs(10) + Duration::from_micros(10 * s.burst);
    let guard = {
        let run = run.clone();
        tokio::spawn(async move {
            tokio::time::sleep(limit).await;
            run.stop();
        })
    };
    let t = Tally::collect(tasks).await;
    let seconds = (micros_now() - started) as f64 / 1e6;
    guard.abort();
    let cpu = proxy.cpu().zip(cpu_before).map(|(end, start)| end - start);
    let harness = bench.harness_cpu_since(harness_before);
    drop(proxy.process);
    if let Some(e) = &t.first_error {
        eprintln!("  {}: first stream error: {e}", peer.name);
    }
    let run = json!({
        "scenario": "burst",
        "proxy": peer.name,
        "streams": s.burst_streams,
        "events_per_stream": s.burst,
        "size": s.burst_size,
        "completed": t.ended,
        "failed": t.failed + t.broken,
        "events": t.events,
        "gaps": t.gaps,
        "duplicates": t.duplicates,
        "seconds": seconds,
        "events_per_s": t.events as f64 / seconds,
        "mb_per_s": (t.events * s.burst_size as u64) as f64 / seconds / 1e6,
        "cpu_s": cpu,
    });
    Ok(merged(run, harness))
}

/// `wrk`'s requests a second and its count of failed requests (its report is appended to
/// `log`), or `None` if it gave no rate.
fn wrk(addr: SocketAddr, path: &str, conns: usize, seconds: u64, log: &Path) -> Option<(f64, u64)> {
    let output = Command::new("wrk")
        .args(["-t2", &format!("-c{conns}"), &format!("-d{seconds}s")])
        .arg(format!("http://{addr}{path}"))
        .stdin(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    if let Ok(mut file) = OpenOptions::new().create(true).append(true).open(log) {
        let _ = writeln!(file, "{text}{}", String::from_utf8_lossy(&output.stderr));
    }
    let number = |prefix: &str| -> Vec<u64> {
        text.lines()
            .filter_map(|l| l.trim().strip_prefix(prefix))
            .flat_map(|rest| {
                rest.split(|c: char| !c.is_ascii_digit())
                    .filter_map(|n| n.parse().ok())
                    .collect::<Vec<u64>>()
            })
            .collect()
    };
    let rate = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())?;
    let errors = number("Non-2xx or 3xx responses:").iter().sum::<u64>()
        + number("Socket errors:").iter().sum::<u64>();
    Some((rate, errors))
}

/// One plain-request run through one proxy.
async fn plain_run(bench: &Bench<'_>, peer: &Peer, use_wrk: bool) -> Result<Value, String> {
    let args = bench.args;
    let s = &args.peers;
    let proxy = Proxy::start(peer, bench.args, &bench.out).await?;
    let addr = proxy.target.addr;
    let path = format!("/plain?size={}", s.plain_size);
    // One second of the same load first: connection pools filled, code paths warm.
    throughput(addr, &path, args.conns, 1).await;
    let cpu_before = proxy.cpu();
    let (seconds, conns) = (s.plain_seconds, args.conns);
    let (rate, errors) = if use_wrk {
        let path = path.clone();
        let log = bench.out.join(format!("{}.wrk.txt", peer.name));
        tokio::task::spawn_blocking(move || wrk(addr, &path, conns, seconds, &log))
            .await
            .ok()
            .flatten()
            .ok_or("wrk gave no Requests/sec")?
    } else {
        let (rate, errors) = throughput(addr, &path, conns, seconds).await;
        (rate, errors as u64)
    };
    let cpu = proxy.cpu().zip(cpu_before).map(|(end, start)| end - start);
    drop(proxy.process);
    Ok(json!({
        "scenario": "plain",
        "proxy": peer.name,
        "client": if use_wrk { "wrk -t2" } else { "bench" },
        "conns": conns,
        "seconds": seconds,
        "size": s.plain_size,
        "requests_per_s": rate,
        "errors": errors,
        "cpu_us_per_request": cpu.map(|c| c * 1e6 / (rate * seconds as f64).max(1.0)),
    }))
}

/// A column of a table: its title, the JSON field, and how a value is shown (`None`: a
/// count, shown for every round; `Some(d)`: the median with `d` decimals, then the rounds).
type Column = (&'static str, &'static str, Option<usize>);

const STREAM_COLUMNS: &[Column] = &[
    ("established", "established", None),
    ("failed", "failed", None),
    ("dropped", "dropped", None),
    ("gaps", "gaps", None),
    ("dups", "duplicates", None),
    ("p50 µs", "latency_p50_us", Some(0)),
    ("p99 µs", "latency_p99_us", Some(0)),
    ("TTFE p50 ms", "ttfe_p50_ms", Some(1)),
    ("TTFE p99 ms", "ttfe_p99_ms", Some(1)),
    ("KiB/stream", "rss_per_stream_kib", Some(1)),
    ("CPU µs/event", "cpu_us_per_event", Some(1)),
];

const BURST_COLUMNS: &[Column] = &[
    ("completed", "completed", None),
    ("gaps", "gaps", None),
    ("events/s", "events_per_s", Some(0)),
    ("MB/s", "mb_per_s", Some(0)),
    ("proxy CPU s", "cpu_s", Some(2)),
];

const OPEN_COLUMNS: &[Column] = &[
    ("failed", "failed", None),
    ("TTFE p50 ms", "ttfe_p50_ms", Some(3)),
    ("TTFE p99 ms", "ttfe_p99_ms", Some(3)),
    ("CPU µs/stream", "cpu_us_per_stream", Some(1)),
    ("switches/stream", "switches_per_stream", Some(2)),
];

const PLAIN_COLUMNS: &[Column] = &[
    ("errors", "errors", None),
    ("req/s", "requests_per_s", Some(0)),
    ("CPU µs/req", "cpu_us_per_request", Some(1)),
];

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    if sorted.len() % 2 == 0 {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    } else {
        sorted[mid]
    }
}

/// One row a proxy, one cell a column: the median over the rounds and each round, or
/// every round of a count.
fn table(title: &str, peers: &[Peer], runs: &[Value], columns: &[Column]) -> String {
    let mut rows = vec![std::iter::once("proxy".to_string())
        .chain(columns.iter().map(|c| c.0.to_string()))
        .collect::<Vec<_>>()];
    for peer in peers {
        let mine: Vec<&Value> = runs.iter().filter(|r| r["proxy"] == peer.name).collect();
        if mine.is_empty() {
            continue;
        }
        let mut row = vec![peer.name.clone()];
        for &(_, key, decimals) in columns {
            let values: Vec<f64> = mine.iter().filter_map(|r| r[key].as_f64()).collect();
            let show = |v: f64| format!("{v:.*}", decimals.unwrap_or(0));
            row.push(match decimals {
                _ if values.is_empty() => "-".into(),
                None => values
                    .iter()
                    .map(|&v| show(v))
                    .collect::<Vec<_>>()
                    .join("/"),
                Some(_) if values.len() == 1 => show(values[0]),
                Some(_) => format!(
                    "{} ({})",
                    show(median(&values)),
                    values
                        .iter()
                        .map(|&v| show(v))
                        .collect::<Vec<_>>()
                        .join("/")
                ),
            });
        }
        rows.push(row);
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut text = format!("\n{title}\n");
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(i, (cell, &w))| match i {
                0 => format!("{cell:<w$}"),
                _ => format!("{cell:>w$}"),
            })
            .collect();
        text.push_str(cells.join("  ").trim_end());
        text.push('\n');
    }
    text
}

/// Appends each run's JSON line to the results and keeps it for the tables.
struct Results {
    file: File,
    tables: String,
    out: PathBuf,
}

impl Results {
    fn record(&mut self, round: usize, mut run: Value) -> Value {
        run["round"] = json!(round);
        let _ = writeln!(self.file, "{run}");
        run
    }

    fn print(&mut self, table: String) {
        println!("{table}");
        self.tables.push_str(&table);
        let _ = std::fs::write(self.out.join("table.txt"), &self.tables);
    }
}

/// A one-line summary of a run for the progress log.
fn summary(run: &Value) -> String {
    let keys = [
        ("established", "established"),
        ("failed", "failed"),
        ("latency_p50_us", "p50 µs"),
        ("latency_p99_us", "p99 µs"),
        ("rss_per_stream_kib", "KiB/stream"),
        ("cpu_us_per_event", "CPU µs/event"),
        ("events_per_s", "events/s"),
        ("requests_per_s", "req/s"),
        ("cpu_s", "CPU s"),
    ];
    keys.iter()
        .filter_map(|(key, label)| {
            let v = run.get(*key)?.as_f64()?;
            let decimals = if v.fract() == 0.0 { 0 } else { 1 };
            Some(format!("{label} {v:.decimals$}"))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Measures every peer once per round with `one` (`label` names the scenario in the
/// progress log), and prints the table.
async fn scenario<'a, F, Fut>(
    args: &'a Args,
    results: &mut Results,
    (label, title): (String, String),
    columns: &[Column],
    mut one: F,
) where
    F: FnMut(&'a Peer) -> Fut,
    Fut: std::future::Future<Output = Result<Value, String>>,
{
    let peers = &args.peers.peers;
    let mut runs = Vec::new();
    for round in 1..=args.rounds.max(1) {
        for peer in round_order(peers, round) {
            eprintln!("[{label}] round {round}: {}", peer.name);
            match one(peer).await {
                Ok(run) => {
                    eprintln!("  {}", summary(&run));
                    runs.push(results.record(round, run));
                }
                Err(e) => eprintln!("  {}: {e}", peer.name),
            }
            // Let the origin see the last run's connections close.
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
    results.print(table(&title, peers, &runs, columns));
}

/// The open-file limit of this process (`ulimit -n`).
fn open_file_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

pub async fn run(args: &Args) -> Result<(), String> {
    let s = &args.peers;
    if s.peers.is_empty() {
        return Err("no --peer given (bench/peers.sh names the usual ones)".into());
    }
    let needed = s.tiers.iter().max().copied().unwrap_or(0) as u64 + 100;
    if open_file_limit().is_some_and(|limit| limit < needed) {
        eprintln!("warning: ulimit -n is below {needed}: the largest tier will not open");
    }
    let out = match &s.out {
        Some(out) => out.clone(),
        None => std::env::temp_dir().join(format!("streamgate-peers-{}", std::process::id())),
    };
    std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    let file = File::create(out.join("results.jsonl")).map_err(|e| e.to_string())?;
    let mut results = Results {
        file,
        tables: String::new(),
        out: out.clone(),
    };
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut origin = Command::new(exe);
    origin.args(["--scenario", "origin", "--origin", &s.origin.to_string()]);
    origin.args([
        "--interval",
        &humantime::format_duration(args.interval).to_string(),
    ]);
    let origin = start("origin", &mut origin, s.origin, &out.join("origin.log")).await?;
    let bench = &Bench {
        args,
        out: out.clone(),
        origin: origin.pid(),
    };
    // One unmeasured pass of the largest tier straight to the origin first: the origin and
    // this client grow their heaps for that many connections once, here, rather than in
    // the first measured run (which then took time to first event from 0.5 to 1 ms at
    // 9,000 streams, and its p99 to tens of ms, for whichever peer came first).
    if let Some(&most) = s.tiers.iter().max() {
        eprintln!("[warm-up] {most} streams straight to the origin, not measured");
        let direct = Peer {
            name: "warm-up".into(),
            listen: None,
        };
        if let Err(e) = streams_run(bench, &direct, most).await {
            eprintln!("  warm-up: {e}");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    for &streams in &s.tiers {
        let title = format!(
            "{streams} streams{}, one {} B event per {:?} each, {} s steady after ramp and \
             {:?} warm-up; median (rounds)",
            asked(args),
            s.size,
            args.interval,
            args.seconds,
            args.warmup
        );
        let label = format!("{streams} streams");
        scenario(args, &mut results, (label, title), STREAM_COLUMNS, |peer| {
            streams_run(bench, peer, streams)
        })
        .await;
    }
    if s.opens > 0 {
        let title = format!(
            "opens: {} streams{} opened one after another, each closed at its first event; \
             the proxy's CPU and context switches per stream; median (rounds)",
            s.opens,
            asked(args)
        );
        let label = "opens".to_string();
        scenario(args, &mut results, (label, title), OPEN_COLUMNS, |peer| {
            opens_run(bench, peer)
        })
        .await;
    }
    if s.burst > 0 && s.burst_streams > 0 {
        let title = format!(
            "burst: {} streams{} x {} events x {} B, written as fast as the origin can; \
             median (rounds)",
            s.burst_streams,
            asked(args),
            s.burst,
            s.burst_size
        );
        let label = "burst".to_string();
        scenario(args, &mut results, (label, title), BURST_COLUMNS, |peer| {
            burst_run(bench, peer)
        })
        .await;
    }
    if s.plain_seconds > 0 {
        let use_wrk = Command::new("wrk")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        if !use_wrk {
            eprintln!("wrk is not installed: plain requests use this program's client");
        }
        let title = format!(
            "plain: keep-alive GETs, {} B bodies, {} connections, {} s, {}; median (rounds)",
            s.plain_size,
            args.conns,
            s.plain_seconds,
            if use_wrk { "wrk -t2" } else { "bench client" }
        );
        let label = "plain".to_string();
        scenario(args, &mut results, (label, title), PLAIN_COLUMNS, |peer| {
            plain_run(bench, peer, use_wrk)
        })
        .await;
    }
    println!("\nresults: {}", out.display());
    Ok(())
}
