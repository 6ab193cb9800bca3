//! What an event stream over HTTP/2 holds on the heap while it is open, counted by a
//! global allocator of this test binary (it holds this one test): a stream is carried on
//! after Pingora's request, so Pingora's per-request future (about 16 KiB) is not among
//! what it holds. The proxy, its origin and its client all run in this process, so the
//! count covers the three; the bound leaves room for the client's and the origin's share.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[path = "support/counting.rs"]
mod counting;

const STREAMS: usize = 200;

/// Heap bytes a stream may hold, the proxy's, its client's and its origin's share
/// together: about 13.3 KiB carried on after the request, 29.6 KiB held in it.
const BOUND: isize = 20 * 1024;

/// An origin answering every request with an event-stream head and one event, then
/// holding the connection open.
async fn origin() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if conn.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let answer = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                              transfer-encoding: chunked\r\n\r\nb\r\ndata: one\n\n\r\n";
                if conn.write_all(answer.as_bytes()).await.is_err() {
                    return;
                }
                let _ = conn.read(&mut byte).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread")]
async fn an_http2_stream_holds_no_request_future_of_pingoras() {
    let origin = origin().await;
    let port = TcpListener::bind("127.0.0.1:0")
        .await
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let text = format!(
        "threads: 1\nlisten:\n  - {{ address: \"127.0.0.1:{port}\", h2c: true }}\n\
         services:\n  feed:\n    url: \"http://{origin}\"\n\
         host_rules:\n  - pattern: \"*\"\n    target: feed\n"
    );
    let config = streamgate::Config::from_text(
        std::path::Path::new("h2.yaml"),
        &text,
        std::path::Path::new("."),
    )
    .expect("config");
    std::thread::spawn(move || {
        streamgate::build_server(config, None).run(pingora_core::server::RunArgs::default())
    });
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    while TcpStream::connect(addr).await.is_err() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .expect("client");
    let open = |n: usize| {
        let client = client.clone();
        async move {
            let mut streams = Vec::new();
            for i in 0..n {
                let mut response = client
                    .get(format!("http://{addr}/s/{i}"))
                    .header("accept", "text/event-stream")
                    .send()
                    .await
                    .expect("answer");
                let first = response.chunk().await.expect("read");
                assert_eq!(first.as_deref(), Some(&b"data: one\n\n"[..]));
                streams.push(response);
            }
            streams
        }
    };
    // The connection, the pools and the runtimes' first allocations before counting.
    let warm = open(20).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = counting::held();
    let streams = open(STREAMS).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let per_stream = (counting::held() - before) / STREAMS as isize;
    assert!(
        per_stream < BOUND,
        "{per_stream} heap bytes per HTTP/2 stream (bound {BOUND})"
    );
    drop((warm, streams));
}
