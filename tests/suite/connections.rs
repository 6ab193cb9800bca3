//! Client connections on a listener: `idle_timeout` closes a connection that sends nothing
//! before its first request or between keep-alive requests (on plain and h2c listeners),
//! never an event stream, however quiet; `max_connections` closes connections over the cap
//! as they are accepted, and counts them; `defer_accept` has the kernel hand a connection
//! over once its client speaks; `tcp_keepalive` reaches every accepted connection.

use crate::common;

use std::time::{Duration, Instant};

use common::{
    config_error, eventually, guard, read_to_end, read_until, server_side, After, Events, Origin,
    Proxy,
};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

fn config(origin: &Origin) -> String {
    format!(
        "services:\n  web: {{ url: \"{}\" }}\nhost_rules:\n  - {{ pattern: \"*\", target: web }}\n",
        origin.url()
    )
}

/// The value of the metric series `series` (name and labels, as rendered).
fn metric(proxy: &Proxy, series: &str) -> f64 {
    proxy
        .state
        .metrics
        .render()
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Waits until the proxy closes `conn`; returns what it sent before and how long it took.
async fn closed_by_proxy(conn: &mut TcpStream) -> (String, Duration) {
    let began = Instant::now();
    let (sent, ended) = read_to_end(conn, "the proxy to close the connection").await;
    (sent, ended - began)
}

/// Sends a GET for `/` on `conn` and reads its whole `ok` answer.
async fn request(conn: &mut TcpStream) {
    conn.write_all(b"GET / HTTP/1.1\r\nhost: t\r\n\r\n")
        .await
        .expect("request");
    let got = read_until(conn, "the answer", |got| got.ends_with(b"\r\n\r\nok")).await;
    assert!(got.starts_with(b"HTTP/1.1 200"), "{got:?}");
}

/// The count `name` of the proxy's listener.
fn counted(proxy: &Proxy, name: &str) -> f64 {
    metric(proxy, &format!("{name}{{listener=\"{}\"}}", proxy.addr))
}

async fn connections_open(proxy: &Proxy, n: f64) {
    eventually(&format!("{n} connections open"), || async {
        counted(proxy, "streamgate_connections_open") == n
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_sends_nothing_is_closed_after_the_idle_timeout() {
    let origin = Origin::plain("ok").await;
    for options in ["idle_timeout: 1s", "idle_timeout: 1s, h2c: true"] {
        let proxy = Proxy::start_listening(options, &config(&origin)).await;
        // Before any request: plain reads, and on an h2c listener the look for the HTTP/2
        // preface, both give up after the idle timeout.
        let mut silent = TcpStream::connect(proxy.addr).await.expect("connect");
        let (sent, took) = closed_by_proxy(&mut silent).await;
        eprintln!("{options}: a silent connection closed after {took:?}");
        assert_eq!(sent, "", "closed without an answer");
        assert_eq!(
            counted(&proxy, "streamgate_connections_idle_closed_total"),
            1.0
        );
        // Between keep-alive requests.
        let mut keepalive = TcpStream::connect(proxy.addr).await.expect("connect");
        request(&mut keepalive).await;
        request(&mut keepalive).await;
        let (sent, took) = closed_by_proxy(&mut keepalive).await;
        eprintln!("{options}: an idle keep-alive connection closed after {took:?}");
        assert_eq!(sent, "");
        connections_open(&proxy, 0.0).await;
    }
}

/// An HTTP/2 request whose header block never ends (`HEADERS` without `END_HEADERS`, then
/// a small `CONTINUATION` now and then) opens no stream, so its connection is closed by
/// `http2.idle_timeout` as any connection with no stream open is, not held for as long as
/// the client keeps dribbling (`request_header_timeout` bounds HTTP/1.x heads only).
/// h2's own bound on `CONTINUATION` frames (five, with Pingora's 64 KiB header list) would
/// end it too, later: the frames the client got out before the close tell which did.
#[tokio::test(flavor = "multi_thread")]
async fn an_http2_header_block_that_never_ends_is_closed_by_the_idle_timeout() {
    use crate::smuggling::frame;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let origin = Origin::plain("ok").await;
    let body = format!("http2: {{ idle_timeout: 1s }}\n{}", config(&origin));
    let proxy = Proxy::start_listening("h2c: true", &body).await;
    let conn = TcpStream::connect(proxy.addr).await.expect("connect");
    let (mut read, mut write) = conn.into_split();
    let mut start = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    start.extend_from_slice(&frame(0x4, 0, 0, &[]));
    // HEADERS on stream 1, END_STREAM only: `:method: GET` (HPACK static index 2).
    start.extend_from_slice(&frame(0x1, 0x1, 1, &[0x82]));
    write.write_all(&start).await.expect("preface and HEADERS");
    let sent = Arc::new(AtomicUsize::new(0));
    let counted_sent = sent.clone();
    let dribble = tokio::spawn(async move {
        // `x: y` (a literal, not indexed), never END_HEADERS, one every 700 ms.
        for _ in 0..8 {
            tokio::time::sleep(Duration::from_millis(700)).await;
            if write
                .write_all(&frame(0x9, 0, 1, &[0x00, 0x01, b'x', 0x01, b'y']))
                .await
                .is_err()
            {
                return;
            }
            counted_sent.fetch_add(1, Ordering::SeqCst);
        }
    });
    let mut got = Vec::new();
    let _ = guard(
        "the proxy to close the connection",
        tokio::io::AsyncReadExt::read_to_end(&mut read, &mut got),
    )
    .await;
    let before_close = sent.load(Ordering::SeqCst);
    dribble.abort();
    assert!(
        before_close < 5,
        "closed after {before_close} CONTINUATION frames: by h2's bound, not the idle timeout"
    );
    connections_open(&proxy, 0.0).await;
}

/// Sends `bytes` on `conn` in pieces of `piece` bytes, one every 100 ms.
async fn paced(conn: &mut TcpStream, bytes: &[u8], piece: usize) {
    for piece in bytes.chunks(piece) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        conn.write_all(piece).await.expect("a piece");
    }
}

/// Starts a request head on `conn` and sends the rest a byte every 100 ms for 2 s (writes
/// fail once the proxy has closed); what the proxy sent before it closed.
async fn slow_head(conn: &mut TcpStream) -> String {
    conn.write_all(b"GET / HTTP/1.1\r\nhost: t\r\nx-slow: ")
        .await
        .expect("start a head");
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if conn.write_all(b"a").await.is_err() {
            break;
        }
    }
    read_to_end(conn, "the proxy to close the slow connection")
        .await
        .0
}

/// A client that starts its request and then sends it a byte at a time (slowloris) is
/// closed once `request_header_timeout` has passed since its first byte, and counted,
/// whether it is the connection's first request or a later one; the deadline is for the
/// head alone: a body sent slowly after it is read whole.
#[tokio::test(flavor = "multi_thread")]
async fn a_head_sent_a_byte_at_a_time_is_cut_at_the_request_header_timeout() {
    let origin = Origin::start(|head, mut conn| async move {
        let body = conn.read_body(&head).await.unwrap_or_default();
        match conn.respond(200, &format!("got {}", body.len())).await {
            Ok(()) => After::KeepAlive(conn),
            Err(_) => After::Close,
        }
    })
    .await;
    // With the idle timeout on, and off: the head's deadline does not hang on it.
    for options in [
        "request_header_timeout: 500ms",
        "idle_timeout: 0, request_header_timeout: 500ms",
    ] {
        let proxy = Proxy::start_listening(options, &config(&origin)).await;
        let mut slow = TcpStream::connect(proxy.addr).await.expect("connect");
        let sent = slow_head(&mut slow).await;
        assert!(!sent.contains("200"), "{options}: {sent}");
        assert_eq!(
            counted(&proxy, "streamgate_connections_slow_head_closed_total"),
            1.0,
            "{options}"
        );
    }
    let proxy = Proxy::start_listening("request_header_timeout: 500ms", &config(&origin)).await;
    // A whole head, then its body a byte at a time for longer than the head's limit.
    let mut upload = TcpStream::connect(proxy.addr).await.expect("connect");
    upload
        .write_all(b"POST / HTTP/1.1\r\nhost: t\r\ncontent-length: 10\r\n\r\n")
        .await
        .expect("head");
    paced(&mut upload, b"bbbbbbbbbb", 1).await;
    let got = read_until(&mut upload, "the answer", |got| got.ends_with(b"got 10")).await;
    assert!(got.starts_with(b"HTTP/1.1 200"), "{got:?}");
    // The next request on the same connection, its head in pieces within the limit:
    // answered.
    paced(&mut upload, b"GET / HTTP/1.1\r\nhost: t\r\n\r\n", 10).await;
    let got = read_until(&mut upload, "the next answer", |got| {
        got.ends_with(b"got 0")
    })
    .await;
    assert!(got.starts_with(b"HTTP/1.1 200"), "{got:?}");
    // A later head of the kept-alive connection sent a byte at a time: bounded as the
    // first head is, cut once the limit has passed since its first byte, and counted.
    let sent = slow_head(&mut upload).await;
    assert!(!sent.contains("200"), "{sent}");
    assert_eq!(
        counted(&proxy, "streamgate_connections_slow_head_closed_total"),
        1.0
    );
    // A head that came with the request before it (pipelined), then its body a byte at a
    // time for longer than the limit: the head was read, nothing waits for it, and the
    // body is read whole.
    let mut piped = TcpStream::connect(proxy.addr).await.expect("connect");
    piped
        .write_all(
            b"GET / HTTP/1.1\r\nhost: t\r\n\r\n\
              POST / HTTP/1.1\r\nhost: t\r\ncontent-length: 10\r\n\r\n",
        )
        .await
        .expect("two heads");
    paced(&mut piped, b"bbbbbbbbbb", 1).await;
    let got = read_until(&mut piped, "both answers", |got| got.ends_with(b"got 10")).await;
    let got = String::from_utf8_lossy(&got);
    assert_eq!(got.matches("HTTP/1.1 200").count(), 2, "{got}");
    assert_eq!(
        counted(&proxy, "streamgate_connections_slow_head_closed_total"),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_kept_after_a_post_stream_keeps_the_listeners_idle_timeout() {
    // POSTs get a short event stream, anything else `ok`; connections are kept.
    let origin = Origin::post_streams("ok").await;
    for options in ["idle_timeout: 1s", "idle_timeout: 1s, h2c: true"] {
        let proxy = Proxy::start_listening(options, &config(&origin)).await;
        let mut conn = TcpStream::connect(proxy.addr).await.expect("connect");
        conn.write_all(b"POST /chat HTTP/1.1\r\nhost: t\r\ncontent-length: 2\r\n\r\n{}")
            .await
            .expect("request");
        read_until(&mut conn, "the stream", |got| {
            got.ends_with(b"\r\n0\r\n\r\n")
        })
        .await;
        // Handed back: idle for the listener's idle timeout (carried over from the
        // stream's request, not Pingora's default of 60 s), it is closed and its slot
        // given back.
        let (sent, took) = closed_by_proxy(&mut conn).await;
        eprintln!("{options}: idle after a POST stream, closed after {took:?}");
        assert_eq!(sent, "");
        connections_open(&proxy, 0.0).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_event_stream_outlives_the_idle_timeout() {
    // One event, then a silence three times the idle timeout, then another and the end.
    let origin = Origin::start(|head, mut conn| async move {
        let _ = conn.read_body(&head).await;
        conn.sse_head().await.expect("head");
        conn.chunk("data: before\n\n").await.expect("event");
        tokio::time::sleep(Duration::from_secs(3)).await;
        let _ = conn.chunk("data: after\n\n").await;
        let _ = conn.end().await;
        After::Close
    })
    .await;
    let proxy = Proxy::start_listening("idle_timeout: 1s", &config(&origin)).await;
    let client = common::client();
    // A GET stream and a POST answered with a stream (each carried in a task of its own),
    // both quiet on the client's side throughout.
    let get = client
        .get(proxy.url("/events"))
        .header("accept", "text/event-stream")
        .send();
    let post = client
        .post(proxy.url("/chat"))
        .header("accept", "application/json")
        .body("{}")
        .send();
    let (get, post) = tokio::join!(get, post);
    for response in [get.expect("get"), post.expect("post")] {
        assert_eq!(response.status(), 200);
        let mut events = Events::new(response);
        assert_eq!(events.next().await.as_deref(), Some("data: before"));
        assert_eq!(events.next().await.as_deref(), Some("data: after"));
        assert_eq!(events.next().await, None, "a clean end");
    }
    assert_eq!(
        counted(&proxy, "streamgate_connections_idle_closed_total"),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_over_max_connections_are_closed_as_they_are_accepted() {
    let origin = Origin::plain("ok").await;
    let proxy = Proxy::start_listening("max_connections: 3", &config(&origin)).await;
    // The harness's own probe may still be open.
    connections_open(&proxy, 0.0).await;
    let mut open: Vec<TcpStream> = Vec::new();
    for _ in 0..3 {
        let mut conn = TcpStream::connect(proxy.addr).await.expect("connect");
        request(&mut conn).await;
        open.push(conn);
    }
    // The fourth: the kernel completes the handshake, the proxy closes it unanswered.
    let mut over = TcpStream::connect(proxy.addr).await.expect("connect");
    let _ = over.write_all(b"GET / HTTP/1.1\r\nhost: t\r\n\r\n").await;
    let (sent, _) = closed_by_proxy(&mut over).await;
    assert_eq!(sent, "", "no answer over the cap");
    assert_eq!(counted(&proxy, "streamgate_connections_refused_total"), 1.0);
    // The three admitted ones still serve.
    for conn in &mut open {
        request(conn).await;
    }
    // One closes: room for another.
    drop(open.pop());
    connections_open(&proxy, 2.0).await;
    let mut again = TcpStream::connect(proxy.addr).await.expect("connect");
    request(&mut again).await;
    assert_eq!(counted(&proxy, "streamgate_connections_open"), 3.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_reaches_the_proxy_once_its_client_speaks() {
    let origin = Origin::plain("ok").await;
    let default = Proxy::start(&config(&origin)).await;
    let off = Proxy::start_listening("defer_accept: 0", &config(&origin)).await;
    let on = Proxy::start_listening("defer_accept: 5s", &config(&origin)).await;
    let h2c = Proxy::start_listening("defer_accept: 5s, h2c: true", &config(&origin)).await;
    for (proxy, deferred) in [(&default, false), (&off, false), (&on, true), (&h2c, true)] {
        // The harness's own probe may still be open.
        connections_open(proxy, 0.0).await;
        let mut conn = TcpStream::connect(proxy.addr).await.expect("connect");
        if deferred {
            // Connected, nothing sent: the kernel holds the connection back (its SYN-ACK
            // timer running), so the proxy spends no descriptor, task or slot on it; still
            // so a moment later (it would be handed over after the 5 s).
            for _ in 0..2 {
                let (state, timer, _) = server_side(proxy.addr, &conn);
                assert_eq!((state, timer), (3, 1), "{}: held back", proxy.addr);
                assert_eq!(counted(proxy, "streamgate_connections_open"), 0.0);
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        } else {
            // Handed over at once (once the kernel has taken the handshake's last ACK).
            eventually("the connection established on the proxy's side", || async {
                server_side(proxy.addr, &conn).0 == 1
            })
            .await;
            connections_open(proxy, 1.0).await;
        }
        // Its request hands it over, and it is served.
        request(&mut conn).await;
        assert_eq!(server_side(proxy.addr, &conn).0, 1);
        connections_open(proxy, 1.0).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn accepted_connections_get_the_listeners_tcp_keepalive() {
    let origin = Origin::plain("ok").await;
    for (options, keepalive) in [
        ("tcp_keepalive: 7s", Some(Duration::from_secs(7))),
        ("tcp_keepalive: 0", None),
    ] {
        let proxy = Proxy::start_listening(options, &config(&origin)).await;
        let mut conn = TcpStream::connect(proxy.addr).await.expect("connect");
        request(&mut conn).await;
        let (_, kind, when) = server_side(proxy.addr, &conn);
        match keepalive {
            // The first probe after the idle time, counted from the last bytes.
            Some(idle) => {
                assert_eq!(kind, 2, "{options}: a keepalive timer");
                assert!(
                    when <= idle && when > idle / 2,
                    "{options}: fires in {when:?}"
                );
            }
            None => assert_eq!(kind, 0, "{options}: no timer"),
        }
    }
}

/// A listener with `options` is refused by the loader with `reason` at the key's line.
fn refused(options: &str, key: &str, reason: &str) {
    let err = config_error(&format!(
        "listen:\n  - address: \"127.0.0.1:1\"\n    {options}\nservices:\n  web: {{ url: \"http://127.0.0.1:2\" }}\n\
         host_rules:\n  - {{ pattern: \"*\", target: web }}\n"
    ));
    assert!(err.starts_with("test.yaml:3:"), "{err}");
    assert!(err.contains(key) && err.contains(reason), "{err}");
}

#[test]
fn bad_listener_settings_are_refused_with_file_line_and_key() {
    refused("max_connections: 0", "max_connections", "at least 1");
    refused("max_connections: -1", "max_connections", "");
    refused("idle_timeout: 1500ms", "idle_timeout", "whole seconds");
    refused("idle_timeout: 5", "idle_timeout", "unit");
    refused("idle_timout: 5s", "idle_timout", "unknown field");
    refused(
        "defer_accept: 500ms",
        "defer_accept",
        "whole seconds up to 60s",
    );
    refused(
        "defer_accept: 61s",
        "defer_accept",
        "whole seconds up to 60s",
    );
}
