//! An origin that honours `Last-Event-ID`, and a client that reconnects the way
//! `EventSource` does: for tests that check no event is lost or repeated across a drain.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{After, Origin};

/// An origin whose streams send `id: n` / `data: n` every `interval`, starting after the
/// request's `Last-Event-ID` (or at 1).
pub async fn counting_origin(interval: Duration) -> Origin {
    Counting::every(interval).start().await
}

/// A counting origin with its quirks.
#[derive(Debug, Clone, Copy)]
pub struct Counting {
    pub interval: Duration,
    /// Resume at `Last-Event-ID` itself rather than after it (a repeat for the proxy to drop).
    pub repeat_last: bool,
    /// Die in the middle of the event after this id (half of it sent, no last chunk).
    pub dies_after: Option<u64>,
}

impl Counting {
    pub fn every(interval: Duration) -> Counting {
        Counting {
            interval,
            repeat_last: false,
            dies_after: None,
        }
    }

    pub async fn start(self) -> Origin {
        Origin::start(move |head, mut conn| async move {
            let last: Option<u64> = head.header("last-event-id").and_then(|id| id.parse().ok());
            let mut next = match last {
                Some(last) if self.repeat_last => last,
                Some(last) => last + 1,
                None => 1,
            };
            if conn.sse_head().await.is_err() {
                return After::Close;
            }
            loop {
                if self.dies_after.is_some_and(|last| next > last) {
                    let _ = conn.chunk(&format!("id: {next}\ndata: half")).await;
                    return After::Close;
                }
                if conn
                    .chunk(&format!("id: {next}\ndata: {next}\n\n"))
                    .await
                    .is_err()
                {
                    return After::Close;
                }
                next += 1;
                tokio::time::sleep(self.interval).await;
            }
        })
        .await
    }
}

/// What one reconnecting client saw.
#[derive(Debug, Default, Clone)]
pub struct Seen {
    /// Event ids in arrival order.
    pub ids: Vec<u64>,
    /// Connections made (1 + reconnects).
    pub connections: u64,
    /// `retry:` hints received.
    pub hints: u64,
}

/// A client that keeps one event stream open to `addr`, reconnecting with `Last-Event-ID`
/// after each end (after the stream's `retry:` delay, or 100 ms), until stopped.
pub struct Resumer {
    pub seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
    events: Arc<AtomicU64>,
}

impl Resumer {
    pub fn start(addr: std::net::SocketAddr, path: &'static str) -> Resumer {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let events = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn({
            let (seen, stop, events) = (seen.clone(), stop.clone(), events.clone());
            async move {
                let mut retry = Duration::from_millis(100);
                while !stop.load(Ordering::Relaxed) {
                    let last = seen.lock().expect("seen").ids.last().copied();
                    if let Ok(mut stream) = TcpStream::connect(addr).await {
                        seen.lock().expect("seen").connections += 1;
                        let last =
                            last.map_or(String::new(), |id| format!("last-event-id: {id}\r\n"));
                        let request = format!(
                            "GET {path} HTTP/1.1\r\nhost: test\r\naccept: text/event-stream\r\n{last}\r\n"
                        );
                        if stream.write_all(request.as_bytes()).await.is_ok() {
                            read_stream(&mut stream, &seen, &events, &mut retry, &stop).await;
                        }
                    }
                    tokio::time::sleep(retry).await;
                }
            }
        });
        Resumer {
            seen,
            stop,
            task,
            events,
        }
    }

    /// Events received so far.
    pub fn events(&self) -> u64 {
        self.events.load(Ordering::Relaxed)
    }

    pub async fn stop(self) -> Seen {
        self.stop.store(true, Ordering::Relaxed);
        self.task.abort();
        let _ = self.task.await;
        let seen = self.seen.lock().expect("seen").clone();
        seen
    }
}

/// Reads one response: skips the head, de-chunks the body, parses events.
async fn read_stream(
    stream: &mut TcpStream,
    seen: &Mutex<Seen>,
    events: &AtomicU64,
    retry: &mut Duration,
    stop: &AtomicBool,
) {
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    let mut head_done = false;
    let mut body = String::new();
    while !stop.load(Ordering::Relaxed) {
        let n = match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        raw.extend_from_slice(&buf[..n]);
        if !head_done {
            let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
                continue;
            };
            raw.drain(..end + 4);
            head_done = true;
        }
        // De-chunk whatever complete chunks are buffered.
        let mut ended = false;
        while let Some(line_end) = raw.windows(2).position(|w| w == b"\r\n") {
            let size = std::str::from_utf8(&raw[..line_end])
                .ok()
                .and_then(|s| usize::from_str_radix(s.trim(), 16).ok());
            let Some(size) = size else { return };
            if size == 0 {
                ended = true;
                break;
            }
            if raw.len() < line_end + 2 + size + 2 {
                break;
            }
            body.push_str(&String::from_utf8_lossy(
                &raw[line_end + 2..line_end + 2 + size],
            ));
            raw.drain(..line_end + 2 + size + 2);
        }
        while let Some(end) = body.find("\n\n") {
            let event: String = body.drain(..end + 2).collect();
            let mut seen = seen.lock().expect("seen");
            for line in event.lines() {
                if let Some(id) = line.strip_prefix("id: ") {
                    if let Ok(id) = id.parse() {
                        seen.ids.push(id);
                        events.fetch_add(1, Ordering::Relaxed);
                    }
                } else if let Some(ms) = line.strip_prefix("retry: ") {
                    seen.hints += 1;
                    if let Ok(ms) = ms.parse() {
                        *retry = Duration::from_millis(ms);
                    }
                }
            }
        }
        if ended {
            return;
        }
    }
}

/// Whether `ids` run 1, 2, 3, ... with no gap and no repeat; the first offence otherwise.
pub fn contiguous(ids: &[u64]) -> Result<(), String> {
    for (i, id) in ids.iter().enumerate() {
        let want = i as u64 + 1;
        if *id != want {
            return Err(format!("event {i} has id {id}, expected {want}"));
        }
    }
    Ok(())
}
