//! The SSE origin the load tools share: every connection is an event stream with one
//! event per `interval`, continuing after the request's `Last-Event-ID`, each carrying the
//! microseconds of `now()` when it was sent (for latency). New streams start spread over
//! the interval, so the events of many streams do not all go out at once; a resumed stream
//! (one with `Last-Event-ID`) gets its next event at once, as an origin with a backlog would
//! send it.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;

pub async fn start(interval: Duration, streams: usize, now: fn() -> u64) -> SocketAddr {
    // A backlog as deep as the system allows (somaxconn), not tokio's 1,024: thousands of
    // streams may connect at once, and a dropped SYN costs the stream a second or more.
    let socket = TcpSocket::new_v4().expect("origin socket");
    socket
        .bind("127.0.0.1:0".parse().expect("addr"))
        .expect("bind origin");
    let listener = socket.listen(65_535).expect("listen");
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
                let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
                let last: Option<u64> = head
                    .lines()
                    .find_map(|l| l.strip_prefix("last-event-id:"))
                    .and_then(|v| v.trim().parse().ok());
                let mut id = last.unwrap_or(0);
                let header = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                              cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n";
                if stream.write_all(header.as_bytes()).await.is_err() {
                    return;
                }
                let mut next = tokio::time::Instant::now();
                if last.is_none() {
                    next += offset;
                }
                loop {
                    tokio::time::sleep_until(next).await;
                    next += interval;
                    id += 1;
                    let event = format!("id: {id}\ndata: {}\n\n", now());
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
