//! HTTP/1 edges, over raw sockets: pipelined requests, the limits on a request head,
//! headers a `Connection` header names, and what a client's mistakes leave in the log.
//!
//! Every test here captures the log (`common::logs`), so that the logger is the capturing
//! one whichever test of the process runs first: `RUST_LOG` shows nothing for these tests.

use crate::common;

use common::raw::{exchange, status_of};
use common::{logs, After, Origin, Proxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn config(origin: &str) -> String {
    format!(
        "services:\n  web:\n    url: \"{origin}\"\nhost_rules:\n  - pattern: \"*\"\n    target: web\n"
    )
}

/// An origin that answers `METHOD TARGET BODY`.
async fn echo() -> Origin {
    Origin::start(|head, mut conn| async move {
        let body = conn.read_body(&head).await.unwrap_or_default();
        let text = format!(
            "{} {} {}",
            head.method,
            head.target,
            String::from_utf8_lossy(&body)
        );
        match conn.respond(200, &text).await {
            Ok(()) => After::KeepAlive(conn),
            Err(_) => After::Close,
        }
    })
    .await
}

/// What a proxy in front of `origin` answers to `request` (a `200`, read until the proxy
/// closes the connection).
async fn answered(origin: &Origin, request: &[u8]) -> String {
    let proxy = Proxy::start(&config(&origin.url())).await;
    let (status, wire) = exchange(proxy.addr, request).await;
    assert_eq!(status, 200, "{wire}");
    wire
}

/// The answers in `wire`, each with a `Content-Length` body: (head, body).
fn answers(mut wire: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    while let Some(end) = wire.find("\r\n\r\n") {
        let head = &wire[..end];
        let len: usize = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().to_string())
            })
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let body = &wire[end + 4..end + 4 + len];
        out.push((head.to_string(), body.to_string()));
        wire = &wire[end + 4 + len..];
    }
    out
}

fn connection_header(head: &str) -> Option<String> {
    head.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case("connection")
            .then(|| value.trim().to_ascii_lowercase())
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn pipelined_requests_are_answered_in_order() {
    logs::capture();
    let origin = echo().await;
    let proxy = Proxy::start(&config(&origin.url())).await;
    let (_, wire) = exchange(
        proxy.addr,
        b"GET /one HTTP/1.1\r\nHost: h\r\n\r\n\
          POST /two HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello\
          GET /three HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
    )
    .await;
    let answers = answers(&wire);
    let bodies: Vec<&str> = answers.iter().map(|(_, body)| body.as_str()).collect();
    assert_eq!(
        bodies,
        ["GET /one ", "POST /two hello", "GET /three "],
        "{wire}"
    );
    let connection: Vec<Option<String>> = answers
        .iter()
        .map(|(head, _)| connection_header(head))
        .collect();
    assert_eq!(
        connection,
        [
            Some("keep-alive".into()),
            Some("keep-alive".into()),
            Some("close".into())
        ]
    );
}

/// A `GET` event stream over HTTP/1.1 goes on in a task of its own and its connection ends
/// with it: the head says `Connection: close`, so no client sends a request after it.
#[tokio::test(flavor = "multi_thread")]
async fn an_event_stream_that_ends_its_connection_says_so() {
    logs::capture();
    let origin = Origin::start(|_, mut conn| async move {
        let _ = conn.sse_head().await;
        let _ = conn.chunk("data: 1\n\n").await;
        let _ = conn.end().await;
        After::Close
    })
    .await;
    let wire = answered(
        &origin,
        b"GET /events HTTP/1.1\r\nHost: h\r\nAccept: text/event-stream\r\n\r\n",
    )
    .await;
    let head = &wire[..wire.find("\r\n\r\n").expect("a head")];
    assert_eq!(connection_header(head).as_deref(), Some("close"), "{wire}");
    assert!(wire.contains("data: 1"), "{wire}");
}

#[tokio::test(flavor = "multi_thread")]
async fn heads_over_the_limits_are_refused_with_431() {
    logs::capture();
    let origin = Origin::plain("ok").await;
    let proxy = Proxy::start(&config(&origin.url())).await;
    let with =
        |extra: String| format!("GET / HTTP/1.1\r\nHost: h\r\n{extra}Connection: close\r\n\r\n");
    let lines = |n: usize| (0..n).map(|i| format!("X-{i}: v\r\n")).collect::<String>();
    let (status, answer) = exchange(proxy.addr, with(lines(10)).as_bytes()).await;
    assert_eq!(status, 200, "{answer}");
    let (status, answer) = exchange(proxy.addr, with(lines(130)).as_bytes()).await;
    assert_eq!(status, 431, "{answer}");
    assert!(
        answer.ends_with("the request has too many header lines\n"),
        "{answer}"
    );
    let cookie = format!("Cookie: c={}\r\n", "v".repeat(70 * 1024));
    let (status, answer) = exchange(proxy.addr, with(cookie).as_bytes()).await;
    assert_eq!(status, 431, "{answer}");
    // Over Pingora's own limit (256 lines; 1 MiB) the head is refused before any hook of
    // ours runs, with Pingora's 400.
    let (status, _) = exchange(proxy.addr, with(lines(300)).as_bytes()).await;
    assert_eq!(status, 400);
}

/// RFC 9110 7.6.1: the headers a `Connection` header names are hop-by-hop, both ways.
#[tokio::test(flavor = "multi_thread")]
async fn headers_named_in_connection_do_not_cross_the_proxy() {
    logs::capture();
    let mut origin = Origin::start(|_, mut conn| async move {
        let _ = conn
            .write(
                b"HTTP/1.1 200 OK\r\nConnection: X-Hop, keep-alive\r\nX-Hop: 1\r\nX-End: 2\r\n\
                  Content-Length: 2\r\n\r\nok",
            )
            .await;
        After::KeepAlive(conn)
    })
    .await;
    let wire = answered(
        &origin,
        b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close, X-Secret\r\nX-Secret: s\r\nX-Kept: k\r\n\r\n",
    )
    .await;
    let request = origin.next_request().await;
    assert_eq!(request.header("x-secret"), None);
    assert_eq!(request.header("x-kept"), Some("k"));
    let head = wire.to_ascii_lowercase();
    assert!(!head.contains("x-hop"), "{wire}");
    assert!(head.contains("x-end: 2"), "{wire}");
}

// --- The log -------------------------------------------------------------------------

fn logged(level: log::Level, containing: &str) -> Vec<String> {
    logs::records(|r| r.level == level && r.text.contains(containing))
        .into_iter()
        .map(|r| r.text)
        .collect()
}

/// A malformed chunked body is the client's mistake: an info line (at most a few a
/// second), never an error line; and no log line shows a credential from the query.
#[tokio::test(flavor = "multi_thread")]
async fn client_mistakes_are_not_error_lines_and_logs_hide_query_credentials() {
    logs::capture();
    let origin = Origin::start(|head, mut conn| async move {
        let _ = conn.read_body(&head).await;
        let _ = conn.respond(200, "ok").await;
        After::Close
    })
    .await;
    let proxy = Proxy::start(&config(&origin.url())).await;
    for i in 0..3 {
        let request = format!(
            "POST /mistake/{i}?token=s3cret&x=1 HTTP/1.1\r\nHost: h\r\n\
             Transfer-Encoding: chunked\r\n\r\n5x\r\nhello\r\n0\r\n\r\n"
        );
        let (status, answer) = exchange(proxy.addr, request.as_bytes()).await;
        assert_eq!(status, 400, "{answer}");
    }
    let info = logged(log::Level::Info, "/mistake/");
    assert!(!info.is_empty(), "an info line for a client's mistake");
    assert!(info[0].contains("token=REDACTED&x=1"), "{info:?}");
    assert_eq!(logged(log::Level::Error, "/mistake/"), Vec::<String>::new());

    // A failure of the proxy's own is an error line, with the query redacted too.
    let closed = common::free_port();
    let proxy = Proxy::start(&config(&format!("http://127.0.0.1:{closed}"))).await;
    let mut conn = tokio::net::TcpStream::connect(proxy.addr)
        .await
        .expect("connect");
    conn.write_all(b"GET /failure?api_key=k3y HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut answer = String::new();
    let _ = common::guard("an answer", conn.read_to_string(&mut answer)).await;
    assert_eq!(status_of(&answer), 502, "{answer}");
    let errors = logged(log::Level::Error, "/failure");
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].contains("/failure?api_key=REDACTED"),
        "{errors:?}"
    );
    for r in logs::records(|_| true) {
        assert!(
            !r.text.contains("s3cret") && !r.text.contains("k3y"),
            "a credential logged: {}",
            r.text
        );
    }
}
