//! How fast a service with several endpoints stops using one that died, and how long a
//! resumed SSE stream is silent while it switches origin.
//!
//! ```text
//! cargo run --release --example failover
//! ```
//!
//! Three origins on loopback behind streamgate (started in this process with
//! `build_server`, the release build of the library). A client sends a request every 2 ms
//! (no retries, so a request sent to a dead endpoint fails with 502). One origin is killed
//! (its listener closed: connections are refused), and the time from the kill to the last
//! failed request is reported, with active checks (`interval` 1s, `unhealthy_threshold` 2)
//! and with passive checks (`failures` 3). Then a client reads a resumable SSE stream whose
//! origin sends an event every 10 ms; the origin's connection is cut, and the longest gap
//! between two events the client saw is reported next to the usual spacing.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pingora_core::server::{RunArgs, ShutdownSignal, ShutdownSignalWatch};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A killable origin: `alive` false closes the listener and every connection.
struct TestOrigin {
    addr: SocketAddr,
    alive: Arc<AtomicBool>,
}

/// Plain answers (`Connection: close`, so no pooled connection outlives a kill), or, for
/// `/events`, an event stream from `Last-Event-ID + 1` every 10 ms.
async fn origin() -> TestOrigin {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let alive = Arc::new(AtomicBool::new(true));
    let flag = alive.clone();
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = wait_dead(&flag) => return,
            };
            let Ok((mut stream, _)) = accepted else {
                return;
            };
            let flag = flag.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 2048];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
                if !head.starts_with("get /events") {
                    let _ = stream
                        .write_all(
                            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                        )
                        .await;
                    return;
                }
                let mut id: u64 = head
                    .lines()
                    .find_map(|l| l.strip_prefix("last-event-id:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                let sse = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                           transfer-encoding: chunked\r\n\r\n";
                if stream.write_all(sse.as_bytes()).await.is_err() {
                    return;
                }
                while flag.load(Ordering::Relaxed) {
                    id += 1;
                    let event = format!("id: {id}\ndata: {id}\n\n");
                    let chunk = format!("{:x}\r\n{event}\r\n", event.len());
                    if stream.write_all(chunk.as_bytes()).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            });
        }
    });
    TestOrigin { addr, alive }
}

async fn wait_dead(flag: &AtomicBool) {
    while flag.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

struct Never;

#[async_trait::async_trait]
impl ShutdownSignalWatch for Never {
    async fn recv(&self) -> ShutdownSignal {
        std::future::pending().await
    }
}

async fn proxy(service: &str) -> SocketAddr {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let text = format!(
        "listen: [\"127.0.0.1:{port}\"]\nservices:\n  feed:\n{service}\
         host_rules:\n  - {{ pattern: \"*\", target: feed }}\n"
    );
    let config = streamgate::Config::from_text(Path::new("failover.yaml"), &text, Path::new("."))
        .unwrap_or_else(|e| panic!("{e}"));
    std::thread::spawn(move || {
        streamgate::build_server(config, None).run(RunArgs {
            shutdown_signal: Box::new(Never),
        })
    });
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    while TcpStream::connect(addr).await.is_err() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    addr
}

/// Kills one of three origins and reports how long requests kept failing.
async fn failover(label: &str, checks: &str) {
    let origins = [origin().await, origin().await, origin().await];
    let list: Vec<String> = origins.iter().map(|o| format!("\"{}\"", o.addr)).collect();
    let service = format!(
        "    discovery: {{ static: [{}] }}\n    load_balancing: round_robin\n{checks}",
        list.join(", ")
    );
    let addr = proxy(&service).await;
    let http = reqwest::Client::new();
    let url = format!("http://{addr}/");
    // Warm up, then kill origin 1.
    for _ in 0..30 {
        let _ = http.get(&url).send().await;
    }
    let killed = Instant::now();
    origins[1].alive.store(false, Ordering::Relaxed);
    let mut last_failure = None;
    let mut failures = 0;
    while killed.elapsed() < Duration::from_secs(6) {
        let ok = http
            .get(&url)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if !ok {
            failures += 1;
            last_failure = Some(killed.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    match last_failure {
        Some(t) => println!(
            "{label}: no request went to the dead endpoint after {:.0} ms ({failures} requests failed before)",
            t.as_secs_f64() * 1000.0
        ),
        None => println!("{label}: no request failed"),
    }
}

/// Cuts a resumable stream's origin and reports the longest silence the client saw.
async fn resume_gap() {
    let origins = [origin().await, origin().await];
    let service = format!(
        "    discovery: {{ static: [\"{}\", \"{}\"] }}\n    sse: {{ resume: true }}\n",
        origins[0].addr, origins[1].addr
    );
    let addr = proxy(&service).await;
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(b"GET /events HTTP/1.1\r\nhost: x\r\naccept: text/event-stream\r\n\r\n")
        .await
        .expect("request");
    let mut buf = vec![0u8; 8192];
    let mut gaps = Vec::new();
    let mut last = Instant::now();
    let mut killed = false;
    let started = Instant::now();
    let mut ids = Vec::new();
    while started.elapsed() < Duration::from_secs(3) {
        let n = match tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => n,
            _ => break,
        };
        let now = Instant::now();
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        let events = text.matches("id: ").count();
        for line in text.lines() {
            if let Some(id) = line
                .strip_prefix("id: ")
                .and_then(|v| v.parse::<u64>().ok())
            {
                ids.push(id);
            }
        }
        if events > 0 {
            gaps.push((now - last, killed));
            last = now;
        }
        if !killed && started.elapsed() > Duration::from_secs(1) {
            // The stream's origin (the first: least_connections starts there) dies.
            origins[0].alive.store(false, Ordering::Relaxed);
            killed = true;
        }
    }
    let usual = gaps
        .iter()
        .filter(|(_, after)| !after)
        .map(|(g, _)| *g)
        .max()
        .unwrap_or_default();
    let switch = gaps
        .iter()
        .filter(|(_, after)| *after)
        .map(|(g, _)| *g)
        .max()
        .unwrap_or_default();
    let contiguous = ids.windows(2).all(|w| w[1] == w[0] + 1);
    println!(
        "resume: longest silence at the switch {:.1} ms (longest before it {:.1} ms, events every 10 ms); \
         {} events, ids contiguous: {contiguous}",
        switch.as_secs_f64() * 1000.0,
        usual.as_secs_f64() * 1000.0,
        ids.len()
    );
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        failover(
            "active checks (interval 1s, unhealthy_threshold 2)",
            "    health_check: { type: tcp, interval: 1s, unhealthy_threshold: 2 }\n",
        )
        .await;
        failover(
            "passive checks (failures 3, cooldown 30s)",
            "    passive_health: { failures: 3, cooldown: 30s }\n",
        )
        .await;
        resume_gap().await;
    });
}
