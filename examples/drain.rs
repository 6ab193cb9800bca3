//! The `-u` handover under load: how long it takes and whether any event is lost.
//!
//! ```text
//! cargo build --release
//! cargo run --release --example drain -- --streams 9000 --drain 10s
//! ```
//!
//! Starts an SSE origin in this process that honours `Last-Event-ID` (each stream sends
//! `id: n` once per `--interval`), the release binary (`--proxy`) in front of it with
//! `sse.drain_period` set to `--drain`, and `--streams` clients that reconnect the way
//! `EventSource` does (after the `retry:` delay, with `Last-Event-ID`). Once every stream is
//! flowing it starts a second process with `-u`, sends `SIGQUIT` to the first, and reports:
//! when the old process exited, when each client was streaming from the new one, and how
//! many event ids were missing or repeated in what each client saw (the goal is none).
//!
//! Only loopback addresses are used. The open-file limit of this machine (20,000) allows
//! about 9,000 streams: this process holds the client and the origin side of each.

#[path = "support/process.rs"]
mod process;
#[path = "support/sse_origin.rs"]
mod sse_origin;

use std::process::{Command, Stdio};

use process::Process;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

struct Args {
    streams: usize,
    drain: String,
    interval: Duration,
    proxy: String,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        streams: 1000,
        drain: "10s".into(),
        interval: Duration::from_secs(1),
        proxy: "target/release/streamgate".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--streams" => args.streams = value()?.parse().map_err(|e| format!("{e}"))?,
            "--drain" => args.drain = value()?,
            "--interval" => {
                args.interval = humantime::parse_duration(&value()?).map_err(|e| e.to_string())?
            }
            "--proxy" => args.proxy = value()?,
            _ => {
                return Err(
                    "usage: drain [--streams N] [--drain 10s] [--interval 1s] [--proxy PATH]"
                        .into(),
                )
            }
        }
    }
    Ok(args)
}

/// What one client saw.
#[derive(Default)]
struct Seen {
    ids: Vec<u64>,
    connections: usize,
    /// When the first event arrived on the connection after the drain hint.
    resumed_at: Option<Instant>,
    hinted: bool,
}

/// A client that keeps one stream open, reconnecting like `EventSource`.
async fn client(
    http: reqwest::Client,
    url: String,
    seen: Arc<Mutex<Seen>>,
    flowing: Arc<AtomicUsize>,
) {
    let mut retry = Duration::from_millis(250);
    loop {
        let (last, hinted) = {
            let s = seen.lock().expect("seen");
            (s.ids.last().copied(), s.hinted)
        };
        let mut request = http.get(&url).header("accept", "text/event-stream");
        if let Some(id) = last {
            request = request.header("last-event-id", id.to_string());
        }
        if let Ok(mut response) = request.send().await {
            seen.lock().expect("seen").connections += 1;
            let mut text = String::new();
            let mut first = true;
            while let Ok(Some(chunk)) = response.chunk().await {
                text.push_str(&String::from_utf8_lossy(&chunk));
                while let Some(end) = text.find("\n\n") {
                    let event: String = text.drain(..end + 2).collect();
                    let mut s = seen.lock().expect("seen");
                    for line in event.lines() {
                        if let Some(id) = line.strip_prefix("id: ").and_then(|v| v.parse().ok()) {
                            if s.ids.is_empty() {
                                flowing.fetch_add(1, Ordering::Relaxed);
                            }
                            s.ids.push(id);
                            if first && hinted && s.resumed_at.is_none() {
                                s.resumed_at = Some(Instant::now());
                            }
                            first = false;
                        } else if let Some(ms) = line.strip_prefix("retry: ") {
                            s.hinted = true;
                            retry = ms.parse().map(Duration::from_millis).unwrap_or(retry);
                        }
                    }
                }
            }
        }
        tokio::time::sleep(retry).await;
    }
}

fn start(args: &Args, config: &std::path::Path, upgrade: bool) -> Process {
    let mut command = Command::new(&args.proxy);
    if upgrade {
        command.arg("-u");
    }
    let child = command
        .arg("-c")
        .arg(config)
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            eprintln!(
                "cannot start {} ({e}); run `cargo build --release` first",
                args.proxy
            );
            std::process::exit(1)
        });
    Process(child)
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    sorted
        .get(((sorted.len() as f64 - 1.0) * q).round() as usize)
        .copied()
        .unwrap_or_default()
}

async fn run(args: Args) -> Result<(), String> {
    let origin = sse_origin::start(args.interval, args.streams, || 0).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port();
    let dir = std::env::temp_dir().join(format!("streamgate-drain-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let config = dir.join("drain.yaml");
    std::fs::write(
        &config,
        format!(
            "threads: 2\npid_file: {dir}/sg.pid\nupgrade_sock: {dir}/sg.sock\n\
             graceful_shutdown_timeout_seconds: 1\nlisten: [\"127.0.0.1:{port}\"]\n\
             sse: {{ drain_period: {drain} }}\n\
             services:\n  origin: {{ url: \"http://{origin}\" }}\n\
             host_rules:\n  - {{ pattern: \"*\", target: origin }}\n",
            dir = dir.display(),
            drain = args.drain,
        ),
    )
    .map_err(|e| e.to_string())?;
    let mut old = start(&args, &config, false);
    let url = format!("http://127.0.0.1:{port}/events");
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }

    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .map_err(|e| e.to_string())?;
    let flowing = Arc::new(AtomicUsize::new(0));
    let clients: Vec<Arc<Mutex<Seen>>> = (0..args.streams)
        .map(|_| Arc::new(Mutex::new(Seen::default())))
        .collect();
    for seen in &clients {
        tokio::spawn(client(
            http.clone(),
            url.clone(),
            seen.clone(),
            flowing.clone(),
        ));
        tokio::task::yield_now().await;
    }
    let deadline = Instant::now() + Duration::from_secs(30 + args.streams as u64 / 200);
    while flowing.load(Ordering::Relaxed) < args.streams {
        if Instant::now() > deadline {
            return Err(format!(
                "only {} of {} streams flowing",
                flowing.load(Ordering::Relaxed),
                args.streams
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(args.interval * 2).await;

    // The new process first (it waits for the listening sockets), then SIGQUIT to the old.
    let _new = start(&args, &config, true);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let quit = Instant::now();
    let status = Command::new("kill")
        .args(["-QUIT", &old.0.id().to_string()])
        .status()
        .map_err(|e| e.to_string())?;
    if !status.success() {
        return Err("kill -QUIT failed".into());
    }
    let mut old_exit = None;
    let deadline = quit + Duration::from_secs(120);
    loop {
        if old_exit.is_none() && old.0.try_wait().map_err(|e| e.to_string())?.is_some() {
            old_exit = Some(quit.elapsed());
        }
        let resumed = clients
            .iter()
            .filter(|c| c.lock().expect("seen").resumed_at.is_some())
            .count();
        if old_exit.is_some() && resumed == args.streams {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "after 120 s: {resumed} of {} clients resumed, old process exited: {}",
                args.streams,
                old_exit.is_some()
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Let every client see a few events from the new process, then check the ids.
    tokio::time::sleep(args.interval * 3).await;

    let mut resumed: Vec<Duration> = Vec::new();
    let (mut missing, mut repeated, mut events) = (0u64, 0u64, 0u64);
    for seen in &clients {
        let s = seen.lock().expect("seen");
        if let Some(at) = s.resumed_at {
            resumed.push(at - quit);
        }
        events += s.ids.len() as u64;
        for pair in s.ids.windows(2) {
            match pair[1].cmp(&(pair[0] + 1)) {
                std::cmp::Ordering::Greater => missing += pair[1] - pair[0] - 1,
                std::cmp::Ordering::Less => repeated += 1,
                std::cmp::Ordering::Equal => {}
            }
        }
    }
    resumed.sort();
    println!(
        "\n{} SSE streams, drain_period {}, one event per {:?} each",
        args.streams, args.drain, args.interval
    );
    println!(
        "old process exited {:.2} s after SIGQUIT",
        old_exit.unwrap_or_default().as_secs_f64()
    );
    println!(
        "clients streaming from the new process after SIGQUIT: p50 {:.2} s, p99 {:.2} s, last {:.2} s",
        quantile(&resumed, 0.5).as_secs_f64(),
        quantile(&resumed, 0.99).as_secs_f64(),
        quantile(&resumed, 1.0).as_secs_f64()
    );
    println!("events received: {events}; ids missing: {missing}; ids repeated: {repeated}");
    Ok(())
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    if let Err(e) = runtime.block_on(run(args)) {
        eprintln!("{e}");
        std::process::exit(1);
    }
}
