//! SSE through the proxy, end to end: unbuffered delivery, headers first, SSE timeouts,
//! disconnects on either side, Last-Event-ID.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use common::{client, guard, lockstep, sse_get, After, Events, Origin, Proxy};
use tokio::sync::{mpsc, oneshot, Mutex};

fn config(origin: &Origin, extra_service: &str) -> String {
    format!(
        "services:\n  feed:\n    url: \"{}\"\n{extra_service}\
         host_rules:\n  - pattern: \"*\"\n    target: feed\n",
        origin.url()
    )
}

/// Events `id: i` / `data: event i`, sent in lockstep with the test's acknowledgements. If
/// the proxy held any event back, the client would never see it and the test would stop at
/// the guard.
async fn lockstep_origin(count: usize) -> (Origin, mpsc::UnboundedSender<()>) {
    lockstep(count, |i| format!("id: {i}\ndata: event {i}\n\n")).await
}

async fn each_event_arrives_before_the_next_is_sent(service_sse: &str) {
    let (origin, ack) = lockstep_origin(5).await;
    let proxy = Proxy::start(&config(&origin, service_sse)).await;
    let response = sse_get(proxy.url("/events")).await;
    let mut events = Events::new(response);
    for i in 0..5 {
        let event = events.next().await.expect("an event");
        assert_eq!(event, format!("id: {i}\ndata: event {i}"));
        ack.send(()).expect("ack");
    }
    assert_eq!(
        events.next().await,
        None,
        "stream ends cleanly after the origin ends"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn each_event_arrives_before_the_origin_sends_the_next() {
    each_event_arrives_before_the_next_is_sent("").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn flush_interval_coalesces_but_never_holds_an_event() {
    each_event_arrives_before_the_next_is_sent("    sse: { flush_interval: 100ms }\n").await;
}

/// An origin that writes `first` (in one write), then holds the rest until the test sends
/// on the returned channel, then writes `rest` and closes. For one request.
async fn holding_origin(
    first: &'static [u8],
    rest: &'static [u8],
) -> (Origin, oneshot::Sender<()>) {
    let (go_tx, go_rx) = oneshot::channel::<()>();
    let go_rx = Arc::new(Mutex::new(Some(go_rx)));
    let origin = Origin::start(move |_, mut conn| {
        let go_rx = go_rx.clone();
        async move {
            conn.write(first).await.expect("first write");
            let go = go_rx.lock().await.take().expect("one request");
            let _ = go.await;
            conn.write(rest).await.expect("rest");
            After::Close
        }
    })
    .await;
    (origin, go_tx)
}

#[tokio::test(flavor = "multi_thread")]
async fn headers_arrive_before_the_first_event() {
    // The origin sends a Content-Length the proxy must drop for SSE.
    let (origin, go_tx) = holding_origin(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n\
          content-length: 13\r\n\r\n",
        b"data: first\n\n",
    )
    .await;
    let proxy = Proxy::start(&config(&origin, "")).await;
    let response = guard(
        "response headers while the origin holds its first event",
        client().get(proxy.url("/events")).send(),
    )
    .await
    .expect("response");
    let headers = response.headers();
    assert_eq!(headers["content-type"], "text/event-stream; charset=utf-8");
    assert!(headers.get("content-length").is_none());
    assert_eq!(headers["cache-control"], "no-cache");
    assert_eq!(headers["x-accel-buffering"], "no");
    assert!(headers.get("content-encoding").is_none());
    go_tx.send(()).expect("origin waiting");
    let mut events = Events::new(response);
    assert_eq!(events.next().await.as_deref(), Some("data: first"));
}

/// The origin sends its head and part of an event in one write, then holds the rest: the
/// client has the head at once (the proxy writes a head with the first body bytes when it
/// can, and never waits for them), whether the part is relayed as it is, held back until
/// its event is whole (`resume`), or paced (`flush_interval`).
async fn head_arrives_while_the_origin_holds_the_rest_of_an_event(service_sse: &str) {
    let (origin, go_tx) = holding_origin(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\nid: 1\ndata: fir",
        b"st\n\n",
    )
    .await;
    let proxy = Proxy::start(&config(&origin, service_sse)).await;
    let response = guard(
        "response headers while the origin holds the rest of its first event",
        sse_get(proxy.url("/events")),
    )
    .await;
    assert_eq!(response.headers()["connection"], "close");
    assert!(response.headers().get("date").is_some());
    go_tx.send(()).expect("origin waiting");
    let mut events = Events::new(response);
    assert_eq!(events.next().await.as_deref(), Some("id: 1\ndata: first"));
    assert_eq!(events.next().await, None);
}

#[tokio::test(flavor = "multi_thread")]
async fn head_arrives_before_the_rest_of_an_event_relayed_as_it_comes() {
    head_arrives_while_the_origin_holds_the_rest_of_an_event("").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn head_arrives_before_the_rest_of_an_event_held_for_resume() {
    head_arrives_while_the_origin_holds_the_rest_of_an_event(
        "    sse: { resume: true, resume_attempts: 1, resume_window: 1m }\n",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn head_arrives_before_the_rest_of_an_event_paced_by_flush_interval() {
    head_arrives_while_the_origin_holds_the_rest_of_an_event(
        "    sse: { flush_interval: 500ms }\n",
    )
    .await;
}

/// Answers with an `HTTP/{version}` head of `kind`, two events in chunks and the body's
/// end, and closes, reading nothing more of the request.
async fn two_events_and_close(mut conn: common::Conn, version: &str, kind: &str) -> After {
    let head = format!(
        "HTTP/{version} 200 OK\r\ncontent-type: {kind}\r\ntransfer-encoding: chunked\r\n\r\n"
    );
    conn.write(head.as_bytes()).await.expect("head");
    conn.chunk("data: one\n\n").await.expect("one");
    conn.chunk("data: two\n\n").await.expect("two");
    conn.end().await.expect("end");
    After::Close
}

/// An HTTP/1.0 client knows no chunked coding: what reaches it has no `Transfer-Encoding`,
/// the body as it is, ended by the close, under the proxy's own `HTTP/1.1` status line
/// whatever the origin's was. A `GET` stream (carried in a task of its own), a `POST`
/// stream (in Pingora's session) and a plain chunked answer alike.
#[tokio::test(flavor = "multi_thread")]
async fn an_http10_client_gets_bodies_unchunked() {
    use tokio::io::AsyncWriteExt;
    let origin = Origin::start(|head, conn| async move {
        let (version, kind) = match head.target.as_str() {
            "/plain" => ("1.1", "text/plain"),
            "/old" => ("1.0", "text/event-stream"),
            _ => ("1.1", "text/event-stream"),
        };
        two_events_and_close(conn, version, kind).await
    })
    .await;
    let proxy = Proxy::start(&config(&origin, "")).await;
    for request in [
        "GET /events HTTP/1.0\r\nHost: a\r\nAccept: text/event-stream\r\n\r\n",
        "GET /old HTTP/1.0\r\nHost: a\r\nAccept: text/event-stream\r\n\r\n",
        "POST /events HTTP/1.0\r\nHost: a\r\nContent-Length: 2\r\n\r\n{}",
        "GET /plain HTTP/1.0\r\nHost: a\r\n\r\n",
    ] {
        let mut conn = tokio::net::TcpStream::connect(proxy.addr)
            .await
            .expect("connect");
        conn.write_all(request.as_bytes()).await.expect("request");
        let (answer, _) = common::read_to_end(&mut conn, request).await;
        let (head, body) = answer.split_once("\r\n\r\n").expect("a response head");
        assert!(head.starts_with("HTTP/1.1 200 "), "{request}: {head}");
        assert!(
            !head.to_ascii_lowercase().contains("transfer-encoding"),
            "{request}: {head}"
        );
        assert_eq!(body, "data: one\n\ndata: two\n\n", "{request}");
    }
}

/// An origin that answers a `POST` as soon as it has its head, and closes without reading
/// the body, still has its whole stream reach the client: the body goes out with the head
/// (and a chunked body's end with its data), so it is not the origin's kernel that gets it
/// after the close and answers with a reset that would drop the stream's last events from
/// the proxy's socket. Repeated: the reset was a race, lost about once in thirty.
#[tokio::test(flavor = "multi_thread")]
async fn a_post_stream_whose_origin_never_reads_the_body_keeps_its_end() {
    use tokio::io::AsyncWriteExt;
    let origin =
        Origin::start(|_, conn| two_events_and_close(conn, "1.1", "text/event-stream")).await;
    let proxy = Proxy::start(&config(&origin, "")).await;
    for request in [
        "POST /chat HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
        "POST /chat HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\
         Connection: close\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    ] {
        for _ in 0..60 {
            let mut conn = tokio::net::TcpStream::connect(proxy.addr)
                .await
                .expect("connect");
            conn.write_all(request.as_bytes()).await.expect("request");
            let (answer, _) = common::read_to_end(&mut conn, request).await;
            assert!(
                answer.ends_with("data: two\n\n\r\n0\r\n\r\n"),
                "{request}: {answer}"
            );
        }
    }
}

/// The same origin behind an HTTP/2 client's `POST` streams: the body comes in HTTP/2 DATA
/// frames (the end of it in a frame of its own, or with the last data), and goes to the
/// origin with the request head all the same, so every answer keeps its last event.
#[tokio::test(flavor = "multi_thread")]
async fn an_http2_post_stream_whose_origin_never_reads_the_body_keeps_its_end() {
    let origin =
        Origin::start(|_, conn| two_events_and_close(conn, "1.1", "text/event-stream")).await;
    let proxy = Proxy::start_h2c(&config(&origin, "")).await;
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .expect("client");
    for streamed in [false, true] {
        for _ in 0..40 {
            let body = if streamed {
                // A body of unknown length: DATA frames, then an empty one that ends it.
                let parts = [Ok::<_, std::io::Error>("{"), Ok("}")];
                reqwest::Body::wrap_stream(futures_util::stream::iter(parts))
            } else {
                reqwest::Body::from("{}")
            };
            let response = h2
                .post(format!("http://{}/chat", proxy.addr))
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .expect("answer");
            assert_eq!(response.version(), reqwest::Version::HTTP_2);
            let mut events = Events::new(response);
            assert_eq!(events.next().await.as_deref(), Some("data: one"));
            assert_eq!(events.next().await.as_deref(), Some("data: two"));
            assert_eq!(events.next().await, None, "streamed body: {streamed}");
        }
    }
}

/// An HTTP/2 body with a length whose end comes in a frame of its own, after the body was
/// gathered, still completes the request: the origin's connection is kept for the next.
#[tokio::test(flavor = "multi_thread")]
async fn a_gathered_http2_body_with_a_length_leaves_its_origin_connection_reusable() {
    let origin = Origin::start(|head, mut conn| async move {
        let body = conn.read_body(&head).await.expect("body");
        let answer = String::from_utf8_lossy(&body).into_owned();
        match conn.respond(200, &answer).await {
            Ok(()) => After::KeepAlive(conn),
            Err(_) => After::Close,
        }
    })
    .await;
    let proxy = Proxy::start_h2c(&config(&origin, "    request_buffer_wait: 30s\n")).await;
    let tcp = tokio::net::TcpStream::connect(proxy.addr)
        .await
        .expect("connect");
    let (mut client, connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    for _ in 0..2 {
        client = client.ready().await.expect("ready");
        let request = http::Request::post(format!("http://{}/upload", proxy.addr))
            .header("content-length", "2")
            .body(())
            .expect("request");
        let (response, mut send) = client.send_request(request, false).expect("send");
        send.send_data(bytes::Bytes::from_static(b"{}"), false)
            .expect("data");
        // The end in a frame of its own, once the body is gathered.
        tokio::time::sleep(Duration::from_millis(50)).await;
        send.send_data(bytes::Bytes::new(), true).expect("end");
        let mut body = guard("the answer", response)
            .await
            .expect("answer")
            .into_body();
        let data = guard("its body", body.data())
            .await
            .expect("data")
            .expect("ok");
        assert_eq!(&data[..], b"{}");
    }
    assert_eq!(origin.connections(), 1, "the origin connection was reused");
}

/// A request body is gathered up to the service's `request_buffer` (64 KiB by default),
/// for at most `request_buffer_wait` (20 ms by default), before the request goes: one
/// sent in two parts a pause apart within the wait reaches the origin whole, with its
/// head, in one read, and the origin that answers without reading it still gets its
/// answer through. Past the buffer, past the wait, or with `request_buffer: 0`, the body
/// is streamed: the origin has the head and the first part before the client sends the
/// rest (the client waits for that, so with the body held this would never finish).
#[tokio::test(flavor = "multi_thread")]
async fn a_request_body_is_gathered_up_to_request_buffer_then_streamed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // `seen`: what the origin had read with the head, before reading anything more.
    let (origin, mut seen) = Origin::start_seeing(|head, mut conn| async move {
        if head.target == "/upload" {
            let body = conn.read_body(&head).await.expect("body");
            let _ = conn.respond(200, &body.len().to_string()).await;
            return After::Close;
        }
        two_events_and_close(conn, "1.1", "text/event-stream").await
    })
    .await;
    let proxy = Proxy::start(&format!(
        "services:\n  gathered:\n    url: \"{url}\"\n    request_buffer_wait: 30s\n  \
         waited:\n    url: \"{url}\"\n  small:\n    url: \"{url}\"\n    request_buffer: 1KiB\n  \
         streamed:\n    url: \"{url}\"\n    request_buffer: 0\n\
         host_rules:\n{rules}",
        rules = ["gathered", "waited", "small", "streamed"]
            .map(|name| format!("  - pattern: \"{name}\"\n    target: {name}\n"))
            .concat(),
        url = origin.url()
    ))
    .await;

    // Gathered: the two parts reach the origin as one body, and the answer whole.
    let mut client = tokio::net::TcpStream::connect(proxy.addr)
        .await
        .expect("connect");
    let head = "POST /chat HTTP/1.1\r\nHost: gathered\r\nTransfer-Encoding: chunked\r\n\
                Connection: close\r\n\r\n";
    client
        .write_all(format!("{head}1\r\n{{\r\n").as_bytes())
        .await
        .expect("first part");
    tokio::time::sleep(Duration::from_millis(100)).await;
    client
        .write_all(b"1\r\n}\r\n0\r\n\r\n")
        .await
        .expect("second part");
    let with_head = guard("the request at the origin", seen.recv())
        .await
        .expect("seen");
    // Each piece keeps its own chunk; all of them, and the end, in the one read.
    assert_eq!(
        String::from_utf8_lossy(&with_head),
        "1\r\n{\r\n1\r\n}\r\n0\r\n\r\n"
    );
    let (answer, _) = common::read_to_end(&mut client, "the answer").await;
    assert!(answer.ends_with("data: two\n\n\r\n0\r\n\r\n"), "{answer}");

    // Past the buffer, past the wait (20 ms by default) and with no buffer: the origin has
    // the head and body bytes while the client still holds the rest back.
    for (host, first) in [("small", 2000), ("waited", 10), ("streamed", 10)] {
        let mut client = tokio::net::TcpStream::connect(proxy.addr)
            .await
            .expect("connect");
        let head = format!(
            "POST /upload HTTP/1.1\r\nHost: {host}\r\nContent-Length: 3000\r\n\
             Connection: close\r\n\r\n"
        );
        client
            .write_all(format!("{head}{}", "x".repeat(first)).as_bytes())
            .await
            .expect("first part");
        let with_head = guard("the request at the origin", seen.recv())
            .await
            .expect("seen");
        assert!(!with_head.is_empty() && with_head.len() <= first, "{host}");
        client
            .write_all("x".repeat(3000 - first).as_bytes())
            .await
            .expect("the rest");
        let mut answer = String::new();
        guard("the answer", client.read_to_string(&mut answer))
            .await
            .expect("answer");
        assert!(answer.ends_with("\r\n\r\n3000"), "{host}: {answer}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn origin_cache_control_is_kept() {
    let origin = Origin::start(|_, mut conn| async move {
        conn.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                     cache-control: private, max-age=0\r\ntransfer-encoding: chunked\r\n\r\n",
        )
        .await
        .expect("head");
        conn.chunk("data: x\n\n").await.expect("event");
        conn.end().await.expect("end");
        After::Close
    })
    .await;
    let proxy = Proxy::start(&config(&origin, "")).await;
    let response = client().get(proxy.url("/")).send().await.expect("response");
    assert_eq!(response.headers()["cache-control"], "private, max-age=0");
}

#[tokio::test(flavor = "multi_thread")]
async fn quiet_stream_outlives_the_ordinary_read_timeout() {
    // The ordinary read timeout is 300 ms; the origin is silent for 1.2 s between events.
    let origin = Origin::start(|head, mut conn| async move {
        if head.target == "/plain" {
            tokio::time::sleep(Duration::from_millis(1200)).await;
            let _ = conn.respond(200, "late").await;
            return After::Close;
        }
        conn.sse_head().await.expect("head");
        conn.chunk("data: one\n\n").await.expect("event");
        tokio::time::sleep(Duration::from_millis(1200)).await;
        conn.chunk("data: two\n\n").await.expect("event");
        conn.end().await.expect("end");
        After::Close
    })
    .await;
    let service = "    timeouts: { read: 300ms }\n    sse: { read_timeout: 0 }\n";
    let proxy = Proxy::start(&config(&origin, service)).await;

    let response = sse_get(proxy.url("/events")).await;
    let mut events = Events::new(response);
    assert_eq!(events.next().await.as_deref(), Some("data: one"));
    assert_eq!(events.next().await.as_deref(), Some("data: two"));
    assert_eq!(events.next().await, None);

    // The same silence on an ordinary request is cut by the ordinary timeout.
    let plain = client()
        .get(proxy.url("/plain"))
        .send()
        .await
        .expect("response");
    assert_eq!(plain.status(), 504);
}

#[tokio::test(flavor = "multi_thread")]
async fn sse_read_timeout_cuts_a_silent_origin() {
    let origin = Origin::start(|_, mut conn| async move {
        conn.sse_head().await.expect("head");
        conn.chunk("data: one\n\n").await.expect("event");
        conn.closed().await;
        After::Close
    })
    .await;
    let proxy = Proxy::start(&config(&origin, "    sse: { read_timeout: 300ms }\n")).await;
    let response = sse_get(proxy.url("/events")).await;
    let mut events = Events::new(response);
    assert_eq!(events.next().await.as_deref(), Some("data: one"));
    assert!(
        events.until_end().await.is_err(),
        "a stream cut by a timeout must not look complete"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn client_disconnect_closes_the_upstream_connection() {
    let (closed_tx, closed_rx) = oneshot::channel::<()>();
    let closed_tx = Arc::new(Mutex::new(Some(closed_tx)));
    let origin = Origin::start(move |_, mut conn| {
        let closed_tx = closed_tx.clone();
        async move {
            conn.sse_head().await.expect("head");
            conn.chunk("data: hello\n\n").await.expect("event");
            conn.closed().await;
            if let Some(tx) = closed_tx.lock().await.take() {
                let _ = tx.send(());
            }
            After::Close
        }
    })
    .await;
    let proxy = Proxy::start(&config(&origin, "")).await;
    let response = sse_get(proxy.url("/events")).await;
    let mut events = Events::new(response);
    assert_eq!(events.next().await.as_deref(), Some("data: hello"));
    drop(events);
    guard("the proxy to close the upstream connection", closed_rx)
        .await
        .expect("origin saw the close");
}

#[tokio::test(flavor = "multi_thread")]
async fn origin_death_ends_the_client_stream() {
    let origin = Origin::start(|_, mut conn| async move {
        conn.sse_head().await.expect("head");
        conn.chunk("data: last words\n\n").await.expect("event");
        // Dropping the connection without the terminating chunk: the origin died.
        After::Close
    })
    .await;
    let proxy = Proxy::start(&config(&origin, "")).await;
    let response = sse_get(proxy.url("/events")).await;
    let mut events = Events::new(response);
    assert_eq!(events.next().await.as_deref(), Some("data: last words"));
    assert!(
        events.until_end().await.is_err(),
        "a truncated stream must end with an error, not look complete"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn last_event_id_reaches_the_origin_unchanged() {
    let mut origin = Origin::start(|_, mut conn| async move {
        conn.sse_head().await.expect("head");
        conn.end().await.expect("end");
        After::Close
    })
    .await;
    let proxy = Proxy::start(&config(&origin, "")).await;
    let response = client()
        .get(proxy.url("/events"))
        .header("accept", "text/event-stream")
        .header("last-event-id", "  opaque-ID:42  ")
        .send()
        .await
        .expect("response");
    assert_eq!(response.status(), 200);
    let head = origin.next_request().await;
    assert_eq!(head.header("last-event-id"), Some("opaque-ID:42"));
}

#[tokio::test(flavor = "multi_thread")]
async fn sse_disabled_leaves_the_response_alone() {
    let origin = Origin::start(|_, mut conn| async move {
        conn.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: 9\r\n\r\ndata: x\n\n")
            .await
            .expect("response");
        After::Close
    })
    .await;
    let proxy = Proxy::start(&config(&origin, "    sse: { enabled: false }\n")).await;
    let response = client().get(proxy.url("/")).send().await.expect("response");
    assert_eq!(response.headers()["content-length"], "9");
    assert!(response.headers().get("x-accel-buffering").is_none());
}

/// Waits until the proxy's registry of open streams holds `n` entries.
async fn tracked(
    proxy: &Proxy,
    n: usize,
) -> Vec<std::sync::Arc<streamgate::sse::tracker::StreamEntry>> {
    let tracker = &proxy.state.tracker;
    guard("the stream registry to settle", async {
        loop {
            if tracker.len() == n {
                return tracker.snapshot();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn tracked_streams_are_registered_and_removed_however_they_end() {
    let (origin, ack) = lockstep_origin(3).await;
    let proxy = Proxy::start(&config(&origin, "    sse: { connection_tracking: true }\n")).await;
    let open = || {
        client()
            .get(proxy.url("/events/live"))
            .header("accept", "text/event-stream")
            .send()
    };
    // Ends when the origin ends.
    let mut events = Events::new(open().await.expect("r"));
    assert!(events.next().await.is_some());
    let entries = tracked(&proxy, 1).await;
    assert_eq!(entries[0].info.path, "/events/live");
    assert_eq!(entries[0].info.service, "feed");
    ack.send(()).expect("ack");
    assert!(events.next().await.is_some());
    ack.send(()).expect("ack");
    assert!(events.next().await.is_some());
    assert_eq!(entries[0].events(), 3);
    assert_eq!(entries[0].last_event_id(), "2");
    ack.send(()).expect("ack");
    assert_eq!(events.next().await, None);
    tracked(&proxy, 0).await;

    // Ends when the client goes.
    let mut events = Events::new(open().await.expect("r"));
    assert!(events.next().await.is_some());
    tracked(&proxy, 1).await;
    drop(events);
    tracked(&proxy, 0).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn many_streams_leave_nothing_behind() {
    let origin = Origin::start(|_, mut conn| async move {
        conn.sse_head().await.expect("head");
        let _ = conn.chunk("id: 1\ndata: x\n\n").await;
        conn.closed().await;
        After::Close
    })
    .await;
    let proxy = Proxy::start(&config(&origin, "    sse: { connection_tracking: true }\n")).await;
    for round in 0..4 {
        let mut open = Vec::new();
        for _ in 0..50 {
            let r = sse_get(proxy.url("/events")).await;
            let mut events = Events::new(r);
            assert_eq!(
                events.next().await.as_deref(),
                Some("id: 1\ndata: x"),
                "round {round}"
            );
            open.push(events);
        }
        tracked(&proxy, 50).await;
        drop(open);
        tracked(&proxy, 0).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn per_client_limit_refuses_with_429_before_the_origin() {
    let mut origin = Origin::start(|_, mut conn| async move {
        conn.sse_head().await.expect("head");
        let _ = conn.chunk("data: x\n\n").await;
        conn.closed().await;
        After::Close
    })
    .await;
    let proxy = Proxy::start(&config(
        &origin,
        "    sse: { max_connections_per_client: 2 }\n",
    ))
    .await;
    let open = || {
        client()
            .get(proxy.url("/events"))
            .header("accept", "text/event-stream")
            .send()
    };
    let first = open().await.expect("r");
    let second = open().await.expect("r");
    assert_eq!(
        (first.status().as_u16(), second.status().as_u16()),
        (200, 200)
    );
    origin.next_request().await;
    origin.next_request().await;
    let third = open().await.expect("r");
    assert_eq!(third.status(), 429);
    assert_eq!(third.headers()["retry-after"], "5");
    assert!(
        origin.requests.try_recv().is_err(),
        "refused before the origin"
    );
    drop(first);
    let again = guard("a slot to free up", async {
        loop {
            let r = open().await.expect("r");
            if r.status() == 200 {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    drop((second, again));
}
