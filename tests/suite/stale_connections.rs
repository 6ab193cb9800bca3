//! Pooled origin connections that the origin closed meanwhile (its keep-alive timeout, no
//! `Connection: close`): the next request is not lost to them, a request that may have
//! reached the origin is not sent twice, and none of it counts against the endpoint's
//! passive health.

use crate::common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{client, free_port, guard, listening, read_head, Proxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

/// What a raw origin does with the `n`th request (0-based) of a connection.
#[derive(Clone, Copy)]
enum Turn {
    /// Answers `200 ok` with keep-alive framing, then keeps the connection.
    Answer,
    /// Answers `200 ok` with keep-alive framing, then closes the socket silently after
    /// 100 ms, as an origin whose keep-alive timeout is short does.
    AnswerThenClose,
    /// Reads the request head and closes without answering: the request arrived on a
    /// connection the origin had just given up.
    Close,
}

/// A raw-socket origin: `turn(n)` decides for the `n`th request of each connection.
struct RawOrigin {
    addr: SocketAddr,
    /// Requests answered.
    answered: Arc<AtomicUsize>,
    /// Requests closed on unanswered.
    dropped: Arc<AtomicUsize>,
    /// Connections accepted.
    connections: Arc<AtomicUsize>,
}

impl RawOrigin {
    async fn start(turn: fn(usize) -> Turn) -> RawOrigin {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let answered = Arc::new(AtomicUsize::new(0));
        let dropped = Arc::new(AtomicUsize::new(0));
        let connections = Arc::new(AtomicUsize::new(0));
        let (a, d, c) = (answered.clone(), dropped.clone(), connections.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                let (a, d) = (a.clone(), d.clone());
                tokio::spawn(async move {
                    let mut reader = BufReader::new(stream);
                    for n in 0.. {
                        let Some(head) = read_head(&mut reader).await else {
                            return;
                        };
                        match turn(n) {
                            Turn::Close => {
                                d.fetch_add(1, Ordering::SeqCst);
                                return;
                            }
                            answer => {
                                let len: usize = head
                                    .header("content-length")
                                    .and_then(|v| v.parse().ok())
                                    .unwrap_or(0);
                                let mut body = vec![0u8; len];
                                if reader.read_exact(&mut body).await.is_err() {
                                    return;
                                }
                                // Counted before it is written: the client may have the
                                // answer before this task runs again.
                                a.fetch_add(1, Ordering::SeqCst);
                                let wrote = reader
                                    .get_mut()
                                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                                    .await;
                                if wrote.is_err() {
                                    a.fetch_sub(1, Ordering::SeqCst);
                                    return;
                                }
                                if let Turn::AnswerThenClose = answer {
                                    tokio::time::sleep(Duration::from_millis(100)).await;
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
        RawOrigin {
            addr,
            answered,
            dropped,
            connections,
        }
    }
}

/// A proxy in front of `origin` whose passive health ejects the endpoint at its first
/// failure, with an admin listener to look at it.
async fn proxy(origin: &RawOrigin) -> (Proxy, SocketAddr) {
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let proxy = Proxy::start(&format!(
        "admin: {{ listen: \"{admin}\" }}\n\
         services:\n  web:\n    url: \"http://{}\"\n    passive_health: {{ failures: 1, cooldown: 1m }}\n\
         host_rules:\n  - {{ pattern: \"*\", target: web }}\n",
        origin.addr
    ))
    .await;
    listening(admin).await;
    (proxy, admin)
}

/// Whether the admin API shows the endpoint ejected by passive health.
async fn ejected(admin: SocketAddr) -> bool {
    let text = client()
        .get(format!("http://{admin}/upstreams"))
        .send()
        .await
        .expect("admin")
        .text()
        .await
        .expect("body");
    let view: serde_json::Value = serde_json::from_str(&text).expect("json");
    let endpoint = &view[0]["endpoints"][0];
    assert_eq!(endpoint["healthy"], true, "{text}");
    endpoint["ejected"].as_bool().expect("ejected")
}

async fn get(proxy: &Proxy) -> (u16, String) {
    let r = client().get(proxy.url("/x")).send().await.expect("answer");
    (r.status().as_u16(), r.text().await.expect("body"))
}

async fn post(proxy: &Proxy) -> (u16, String) {
    let r = client()
        .post(proxy.url("/x"))
        .body("{\"n\":1}")
        .send()
        .await
        .expect("answer");
    (r.status().as_u16(), r.text().await.expect("body"))
}

#[tokio::test(flavor = "multi_thread")]
async fn an_origin_that_closes_idle_connections_silently_loses_no_request() {
    let origin = RawOrigin::start(|_| Turn::AnswerThenClose).await;
    let (proxy, admin) = proxy(&origin).await;
    assert_eq!(get(&proxy).await, (200, "ok".into()));
    // The origin has closed the pooled connection by now.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(get(&proxy).await, (200, "ok".into()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A POST with a body too: the pool noticed the close, so it goes out on a new
    // connection and is answered.
    assert_eq!(post(&proxy).await, (200, "ok".into()));
    assert_eq!(origin.answered.load(Ordering::SeqCst), 3);
    assert!(!ejected(admin).await, "not held against the endpoint");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_get_on_a_pooled_connection_the_origin_gave_up_is_sent_again_on_a_new_one() {
    // Each connection answers its first request and drops its second unanswered: a GET that
    // reuses the pooled connection meets an origin that closes it just then.
    let origin = RawOrigin::start(|n| if n == 0 { Turn::Answer } else { Turn::Close }).await;
    let (proxy, admin) = proxy(&origin).await;
    guard("a request to meet the closing connection", async {
        while origin.dropped.load(Ordering::SeqCst) == 0 {
            assert_eq!(get(&proxy).await, (200, "ok".into()));
        }
    })
    .await;
    let dropped = origin.dropped.load(Ordering::SeqCst);
    eprintln!(
        "{} answered, {dropped} dropped unanswered, {} connections",
        origin.answered.load(Ordering::SeqCst),
        origin.connections.load(Ordering::SeqCst)
    );
    assert!(!ejected(admin).await, "not held against the endpoint");
    assert_eq!(get(&proxy).await, (200, "ok".into()));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_post_that_went_out_on_a_connection_the_origin_gave_up_is_not_sent_again() {
    let origin = RawOrigin::start(|n| if n == 0 { Turn::Answer } else { Turn::Close }).await;
    let (proxy, admin) = proxy(&origin).await;
    // A GET leaves a pooled connection; the POST after it reuses it (if it does not, it is
    // answered on a new connection, and the next round tries again).
    let (refused, dropped, answered) = guard("a POST to meet the closing connection", async {
        loop {
            assert_eq!(get(&proxy).await, (200, "ok".into()));
            let dropped = origin.dropped.load(Ordering::SeqCst);
            let answered = origin.answered.load(Ordering::SeqCst);
            let (status, body) = post(&proxy).await;
            if status != 200 {
                return ((status, body), dropped, answered);
            }
        }
    })
    .await;
    eprintln!("{refused:?}");
    assert_eq!(refused.0, 502);
    assert!(
        refused
            .1
            .contains("service `web`: the origin closed a reused connection before answering"),
        "{refused:?}"
    );
    assert!(refused
        .1
        .contains("POST request had gone out and is not sent again"));
    // The origin got the POST once: it dropped it, and it was not sent again.
    assert_eq!(origin.dropped.load(Ordering::SeqCst), dropped + 1);
    assert_eq!(origin.answered.load(Ordering::SeqCst), answered);
    assert!(!ejected(admin).await, "not held against the endpoint");
    assert_eq!(get(&proxy).await, (200, "ok".into()));
}
