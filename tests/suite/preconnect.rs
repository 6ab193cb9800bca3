//! `preconnect`: spare origin connections kept ready for the next request to an endpoint,
//! so that a new event stream does not wait for a connect (or a TLS handshake).

use crate::common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{eventually, read_head, sse_get, Events, Proxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

/// An origin that numbers its connections in the order it accepts them and answers every
/// request with an event stream of one event, held open until the proxy closes it.
struct Numbered {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    /// The number of the connection each request came on, in arrival order.
    served: Arc<Mutex<Vec<usize>>>,
}

impl Numbered {
    async fn start() -> Numbered {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let served = Arc::new(Mutex::new(Vec::new()));
        let (count, log) = (accepted.clone(), served.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let number = count.fetch_add(1, Ordering::SeqCst) + 1;
                let log = log.clone();
                tokio::spawn(async move {
                    let mut reader = BufReader::new(stream);
                    if read_head(&mut reader).await.is_none() {
                        return; // a spare the proxy closed unused
                    }
                    log.lock().expect("log").push(number);
                    let stream = reader.get_mut();
                    let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                                transfer-encoding: chunked\r\n\r\n";
                    let event = format!("data: conn {number}\n\n");
                    let chunk = format!("{:x}\r\n{event}\r\n", event.len());
                    let _ = stream.write_all(format!("{head}{chunk}").as_bytes()).await;
                    let mut rest = [0u8; 64];
                    while matches!(stream.read(&mut rest).await, Ok(n) if n > 0) {}
                });
            }
        });
        Numbered {
            addr,
            accepted,
            served,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    fn served(&self) -> Vec<usize> {
        self.served.lock().expect("served").clone()
    }
}

fn config(ready: &Numbered, cold: &Numbered) -> String {
    format!(
        "services:\n  ready:\n    url: \"http://{}\"\n    preconnect: 1\n  \
         cold:\n    url: \"http://{}\"\n\
         host_rules:\n  - pattern: \"*\"\n    target: ready\n    route_rules:\n      \
         - pattern: \"/cold/*\"\n        target: cold\n",
        ready.addr, cold.addr
    )
}

async fn first_event(url: String) -> (Events, String) {
    let mut events = Events::new(sse_get(url).await);
    let first = events.next().await.expect("a first event");
    (events, first)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_next_stream_goes_out_on_a_connection_made_before_it_was_asked_for() {
    let ready = Numbered::start().await;
    let cold = Numbered::start().await;
    let proxy = Proxy::start(&config(&ready, &cold)).await;

    let (_a, first) = first_event(proxy.url("/ready/a")).await;
    assert_eq!(first, "data: conn 1");
    // A spare connection is opened once the first stream has its own, before any second
    // request exists.
    eventually("a spare connection to the origin", || async {
        ready.accepted() == 2
    })
    .await;
    assert_eq!(ready.served(), vec![1]);
    // The origin has accepted the spare; the proxy puts it in its pool just after its
    // connect returns: a moment for that, so the next request cannot come before it.
    tokio::time::sleep(Duration::from_millis(100)).await;

    let (_b, first) = first_event(proxy.url("/ready/b")).await;
    assert_eq!(first, "data: conn 2", "the second stream took the spare");
    assert_eq!(ready.served(), vec![1, 2]);
    // The spare it took is replaced.
    eventually("the spare replaced", || async { ready.accepted() == 3 }).await;

    // A service without `preconnect` connects when a request needs it, and only then.
    let (_c, first) = first_event(proxy.url("/cold/c")).await;
    assert_eq!(first, "data: conn 1");
    let (_d, first) = first_event(proxy.url("/cold/d")).await;
    assert_eq!(first, "data: conn 2");
    assert_eq!(cold.accepted(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn no_spare_is_made_while_the_process_drains() {
    let ready = Numbered::start().await;
    let cold = Numbered::start().await;
    let proxy = Proxy::start(&config(&ready, &cold)).await;
    proxy.state.drain.start();
    // While draining, a new stream is still carried (and soon ended with a retry hint).
    // While draining, a new request is still carried: here a `POST` answered by a stream
    // (a `GET` one would be told to come back to the next process).
    let mut held = Vec::new();
    for path in ["/ready/a", "/ready/b"] {
        let response = common::client()
            .post(proxy.url(path))
            .body("{}")
            .send()
            .await
            .expect("response");
        let mut events = Events::new(response);
        assert!(events.next().await.is_some());
        held.push(events);
    }
    assert_eq!(ready.served(), vec![1, 2], "each stream connected itself");
    assert_eq!(ready.accepted(), 2);
}
