//! `preconnect`: spare connections to a service's endpoint, made ahead of the requests that
//! take them. The next request goes out on one the origin had already accepted; no more
//! are made than asked for; one the origin closed is never used; one not taken within the
//! service's idle timeout is closed by the proxy.

use crate::common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{client, guard, read_head, Proxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

/// A raw origin that numbers its connections as it accepts them (from 1) and answers each
/// request with `ok` and `Connection: close`, so that no connection serves two requests.
struct Origin {
    addr: SocketAddr,
    /// Connections accepted.
    accepted: Arc<AtomicUsize>,
    /// The connection each request came on, in order.
    requests: Arc<Mutex<Vec<usize>>>,
    /// Connections that ended before any request came on them (closed by the proxy).
    closed_unused: Arc<AtomicUsize>,
}

impl Origin {
    /// `give_up`: a connection with no request after this long is closed by the origin,
    /// as a server with a short keep-alive timeout closes it.
    async fn start(give_up: Option<Duration>) -> Origin {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let closed_unused = Arc::new(AtomicUsize::new(0));
        let (a, r, c) = (accepted.clone(), requests.clone(), closed_unused.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let id = a.fetch_add(1, Ordering::SeqCst) + 1;
                let (r, c) = (r.clone(), c.clone());
                tokio::spawn(async move {
                    let mut reader = BufReader::new(stream);
                    let head = match give_up {
                        Some(after) => {
                            match tokio::time::timeout(after, read_head(&mut reader)).await {
                                Ok(head) => head,
                                Err(_) => return,
                            }
                        }
                        None => read_head(&mut reader).await,
                    };
                    if head.is_none() {
                        c.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                    r.lock().expect("requests").push(id);
                    let _ = reader
                        .get_mut()
                        .write_all(
                            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                        )
                        .await;
                    let mut rest = Vec::new();
                    let _ = reader.read_to_end(&mut rest).await;
                });
            }
        });
        Origin {
            addr,
            accepted,
            requests,
            closed_unused,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// The connection the last request came on.
    fn last_request_on(&self) -> usize {
        *self
            .requests
            .lock()
            .expect("requests")
            .last()
            .expect("a request")
    }

    /// Waits until the origin has accepted `n` connections.
    async fn wait_accepted(&self, n: usize) {
        guard("the spare connections to be made", async {
            while self.accepted() < n {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
    }
}

/// The config: one worker thread (the spares are per worker), `preconnect: 2`, and
/// `extra` lines of the service.
fn config(origin: &Origin, extra: &str) -> String {
    format!(
        "threads: 1\n\
         services:\n  web:\n    url: \"http://{}\"\n    preconnect: 2\n{extra}\
         host_rules:\n  - {{ pattern: \"*\", target: web }}\n",
        origin.addr
    )
}

async fn proxy(origin: &Origin, extra: &str) -> Proxy {
    Proxy::start(&config(origin, extra)).await
}

async fn get(proxy: &Proxy) -> (u16, String) {
    let r = client().get(proxy.url("/x")).send().await.expect("answer");
    (r.status().as_u16(), r.text().await.expect("body"))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_next_requests_go_out_on_connections_made_before_them() {
    let origin = Origin::start(None).await;
    let proxy = proxy(&origin, "").await;
    // The first request connects; two spares follow it.
    assert_eq!(get(&proxy).await, (200, "ok".into()));
    assert_eq!(origin.last_request_on(), 1);
    origin.wait_accepted(3).await;
    for n in 2..=5 {
        let before = origin.accepted();
        assert_eq!(get(&proxy).await, (200, "ok".into()));
        let on = origin.last_request_on();
        assert!(
            on <= before,
            "request {n} came on connection {on}, made after it (the origin had {before})"
        );
        // The one taken is replaced: two spares again, no more.
        origin.wait_accepted(before + 1).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(origin.accepted(), 5 + 2, "five requests, two spares");
    // A POST with a body, as an LLM client sends its prompt, takes one too.
    let before = origin.accepted();
    let r = client()
        .post(proxy.url("/chat"))
        .body("{\"prompt\":\"hi\"}")
        .send()
        .await
        .expect("answer");
    assert_eq!(r.status(), 200);
    assert!(origin.last_request_on() <= before);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_spare_the_origin_closed_is_not_used() {
    // The origin closes a connection that brings no request within 100 ms.
    let origin = Origin::start(Some(Duration::from_millis(100))).await;
    let proxy = proxy(&origin, "").await;
    assert_eq!(get(&proxy).await, (200, "ok".into()));
    origin.wait_accepted(3).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    // Both spares are closed by now: the request goes out on a new connection, and is
    // answered, not refused for a connection that was gone.
    let before = origin.accepted();
    assert_eq!(get(&proxy).await, (200, "ok".into()));
    assert!(
        origin.last_request_on() > before,
        "a new connection, not a closed spare"
    );
    assert_eq!(origin.requests.lock().expect("requests").len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_spare_not_taken_within_the_idle_timeout_is_closed() {
    let origin = Origin::start(None).await;
    let proxy = proxy(&origin, "    timeouts: { idle: 150ms }\n").await;
    assert_eq!(get(&proxy).await, (200, "ok".into()));
    origin.wait_accepted(3).await;
    // Closed by the proxy when their idle time is up, with no request to find them.
    guard("the proxy to close both spares", async {
        while origin.closed_unused.load(Ordering::SeqCst) < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let before = origin.accepted();
    assert_eq!(get(&proxy).await, (200, "ok".into()));
    assert!(origin.last_request_on() > before, "a new connection");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_http2_clients_requests_take_spares_too() {
    let origin = Origin::start(None).await;
    let proxy = Proxy::start_h2c(&config(&origin, "")).await;
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .expect("client");
    let get = |path: &'static str| h2.get(proxy.url(path)).send();
    let r = get("/x").await.expect("answer");
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.text().await.expect("body"), "ok");
    origin.wait_accepted(3).await;
    for n in 2..=3 {
        let before = origin.accepted();
        let r = get("/x").await.expect("answer");
        assert_eq!(r.text().await.expect("body"), "ok");
        let on = origin.last_request_on();
        assert!(
            on <= before,
            "request {n} came on connection {on}, made after it"
        );
        origin.wait_accepted(before + 1).await;
    }
}
