//! One rule: a response whose `Content-Type` is `text/event-stream` is an event stream and
//! gets the whole lifecycle, whatever the request's method, body, `Accept` or HTTP version:
//! a `POST` with a JSON body asking for `application/json` (as LLM SDKs send), a `curl`
//! style `GET` with `Accept: */*`, HTTP/2. Limits count streams, not requests that asked for
//! one. Request bodies stream to the origin as they arrive. A drain lets answers finish.

use crate::common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{client, eventually, guard, read_to_end, read_until, After, Events, Origin, Proxy};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::{broadcast, mpsc, Mutex};

/// One service `feed` with `sse` settings, every path routed to it.
fn config(origin: &Origin, service: &str) -> String {
    format!(
        "services:\n  feed:\n    url: \"{}\"\n{service}\
         host_rules:\n  - pattern: \"*\"\n    target: feed\n",
        origin.url()
    )
}

/// A chat-completion style request: a `POST` with a JSON body that accepts JSON.
fn chat_post(url: String) -> reqwest::RequestBuilder {
    client()
        .post(url)
        .header("accept", "application/json")
        .header("content-type", "application/json")
        .body(r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}"#)
}

/// What the test tells an origin stream to do next.
#[derive(Debug, Clone)]
enum Step {
    Send(&'static str),
    End,
    /// The origin closes the connection in the middle of the body.
    Cut,
}

/// An origin that reads each request's body (reported on the returned receiver, with the
/// path), answers with an event-stream head at once, and then sends what the test says,
/// step by step. Streams that get no step wait until the proxy closes them, then report
/// `closed <path>`.
async fn scripted_origin() -> (
    Origin,
    mpsc::UnboundedReceiver<String>,
    broadcast::Sender<Step>,
) {
    let (seen_tx, seen) = mpsc::unbounded_channel();
    let (steps, _) = broadcast::channel(64);
    let steps_for_origin = steps.clone();
    let origin = Origin::start(move |head, mut conn| {
        let seen_tx = seen_tx.clone();
        let mut steps = steps_for_origin.subscribe();
        async move {
            let body = conn.read_body(&head).await.unwrap_or_default();
            let _ = seen_tx.send(format!(
                "{} {} {}",
                head.method,
                head.target,
                String::from_utf8_lossy(&body)
            ));
            if conn.sse_head().await.is_err() {
                return After::Close;
            }
            if head.target.starts_with("/quiet") {
                conn.closed().await;
                let _ = seen_tx.send(format!("closed {}", head.target));
                return After::Close;
            }
            while let Ok(step) = steps.recv().await {
                match step {
                    Step::Send(event) => {
                        if conn.chunk(event).await.is_err() {
                            return After::Close;
                        }
                    }
                    Step::End => {
                        let _ = conn.end().await;
                        return After::Close;
                    }
                    Step::Cut => return After::Close,
                }
            }
            After::Close
        }
    })
    .await;
    (origin, seen, steps)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_post_answered_by_an_event_stream_gets_the_whole_lifecycle() {
    let (origin, mut seen, steps) = scripted_origin().await;
    let proxy = Proxy::start(&config(
        &origin,
        "    timeouts: { read: 300ms }\n    \
         sse: { heartbeat_interval: 100ms, connection_tracking: true, max_connections: 1 }\n",
    ))
    .await;
    let response = chat_post(proxy.url("/v1/chat/completions"))
        .send()
        .await
        .expect("answer");
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    assert_eq!(response.headers()["x-accel-buffering"], "no");
    let got = guard("the origin to get the body", seen.recv()).await;
    assert_eq!(
        got.as_deref(),
        Some(
            r#"POST /v1/chat/completions {"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}"#
        )
    );

    // The model "thinks" before its first token: the client gets heartbeats meanwhile,
    // and the service's ordinary read timeout (300 ms) does not cut the silence (five
    // heartbeats are at least 500 ms).
    let mut events = Events::new(response);
    for _ in 0..5 {
        assert_eq!(events.next().await.as_deref(), Some(":"));
    }
    // Tracked while open, and counted against max_connections.
    let tracked = proxy.state.tracker.snapshot();
    assert_eq!(tracked.len(), 1);
    assert_eq!(tracked[0].info.path, "/v1/chat/completions");
    let second = chat_post(proxy.url("/quiet/second"))
        .send()
        .await
        .expect("answer");
    assert_eq!(second.status(), 503, "one stream over the limit is refused");
    assert_eq!(second.headers()["retry-after"], "5");
    // The refused stream's origin connection is closed.
    let mut reports = Vec::new();
    guard("the refused stream's origin connection to close", async {
        while !reports.iter().any(|r: &String| r == "closed /quiet/second") {
            reports.push(seen.recv().await.expect("origin report"));
        }
    })
    .await;

    // Tokens in lockstep: each arrives before the origin sends the next.
    for token in ["data: {\"t\":\"Hel\"}\n\n", "data: {\"t\":\"lo\"}\n\n"] {
        steps.send(Step::Send(token)).expect("step");
        let event = loop {
            match events.next().await {
                Some(e) if e == ":" => continue,
                other => break other,
            }
        };
        assert_eq!(event.as_deref(), Some(token.trim_end()));
    }
    steps.send(Step::Send("data: [DONE]\n\n")).expect("step");
    steps.send(Step::End).expect("end");
    loop {
        match events.next().await {
            Some(e) if e == ":" => continue,
            Some(e) => assert_eq!(e, "data: [DONE]"),
            None => break,
        }
    }
    eventually("the entry to go", || async {
        proxy.state.tracker.is_empty()
    })
    .await;
    assert_eq!(
        proxy.state.tracker.recent()[0].reason.as_str(),
        "origin_closed"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn header_timeout_and_the_sse_read_timeout_apply_to_streams_not_announced() {
    let origin = Origin::start(|head, mut conn| async move {
        let _ = conn.read_body(&head).await;
        if head.target == "/slow" {
            conn.closed().await;
            return After::Close;
        }
        let _ = conn.sse_head().await;
        let _ = conn.chunk("data: one\n\n").await;
        conn.closed().await;
        After::Close
    })
    .await;
    let proxy = Proxy::start(&config(
        &origin,
        "    sse: { header_timeout: 200ms, read_timeout: 300ms, connection_tracking: true }\n",
    ))
    .await;
    let slow = chat_post(proxy.url("/slow")).send().await.expect("answer");
    assert_eq!(slow.status(), 504);
    let body = slow.text().await.expect("body");
    assert!(body.contains("no response header within 200ms"), "{body}");

    let quiet = chat_post(proxy.url("/quiet")).send().await.expect("answer");
    let mut events = Events::new(quiet);
    assert_eq!(events.next().await.as_deref(), Some("data: one"));
    let end = guard("the read timeout", events.next_raw()).await;
    assert!(
        matches!(end, Some(Err(_))),
        "a stream cut by a silent origin reads as cut: {end:?}"
    );
    eventually("the entry to go", || async {
        proxy.state.tracker.is_empty()
    })
    .await;
    assert_eq!(
        proxy.state.tracker.recent()[0].reason.as_str(),
        "idle_timeout"
    );
}

/// A request that did not ask for a stream waits for its head as long as its service's
/// `timeouts.read` says when no config sets `header_timeout` (an LLM completion asked for
/// without streaming can be slow): here shorter than the 30 s default, so the test sees it.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_not_announcing_a_stream_waits_its_read_timeout_for_the_head() {
    let origin = Origin::start(|head, mut conn| async move {
        let _ = conn.read_body(&head).await;
        conn.closed().await;
        After::Close
    })
    .await;
    let proxy = Proxy::start(&config(&origin, "    timeouts: { read: 300ms }\n")).await;
    let slow = chat_post(proxy.url("/slow")).send().await.expect("answer");
    assert_eq!(slow.status(), 504);
    let body = slow.text().await.expect("body");
    assert!(body.contains("no response header within 300ms"), "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn curl_style_streams_get_heartbeats_limits_and_admin_ends() {
    let (origin, mut seen, _steps) = scripted_origin().await;
    let admin = common::free_port();
    let proxy = Proxy::start(&format!(
        "admin: {{ listen: \"127.0.0.1:{admin}\" }}\n{}",
        config(
            &origin,
            "    sse: { heartbeat_interval: 50ms, connection_tracking: true, max_connections: 2 }\n",
        )
    ))
    .await;
    // What curl sends: no mention of event streams.
    let curl = |path: &str| {
        client()
            .get(proxy.url(path))
            .header("accept", "*/*")
            .header("user-agent", "curl/8.5.0")
            .send()
    };
    let mut first = Events::new(curl("/quiet/a").await.expect("answer"));
    assert_eq!(first.next().await.as_deref(), Some(":"), "a heartbeat");
    let second = curl("/quiet/b").await.expect("answer");
    assert_eq!(second.status(), 200);
    let third = curl("/quiet/c").await.expect("answer");
    assert_eq!(third.status(), 503, "the third stream is over the limit");

    // The admin API ends the first stream at once, though its origin is silent.
    let id = proxy.state.tracker.snapshot()[0].id;
    let ended = client()
        .delete(format!("http://127.0.0.1:{admin}/sse/connections/{id}"))
        .send()
        .await
        .expect("admin");
    assert_eq!(ended.status(), 202);
    loop {
        match first.next().await {
            Some(e) if e == ":" => continue,
            Some(e) => {
                assert_eq!(e, "retry: 3000");
                break;
            }
            None => panic!("the hint comes before the end"),
        }
    }
    while let Some(e) = first.next().await {
        assert_eq!(e, ":", "only heartbeats before the end");
    }
    guard("the ended stream's origin connection to close", async {
        while seen.recv().await.as_deref() != Some("closed /quiet/a") {}
    })
    .await;
    // Its task (on either worker thread) frees the slot as it ends.
    eventually("the ended stream to leave the registry", || async {
        proxy.state.tracker.snapshot().len() == 1
    })
    .await;
    let fourth = curl("/quiet/d").await.expect("answer");
    assert_eq!(
        fourth.status(),
        200,
        "the ended stream's slot is free again"
    );
    drop(second);
}

#[tokio::test(flavor = "multi_thread")]
async fn limits_hold_exactly_under_a_storm_of_announced_and_unannounced_streams() {
    let (release_tx, _) = broadcast::channel::<()>(1);
    let origin = Origin::start({
        let release_tx = release_tx.clone();
        move |head, mut conn| {
            let mut release = release_tx.subscribe();
            async move {
                let _ = conn.read_body(&head).await;
                conn.sse_head().await.expect("head");
                let _ = conn.chunk("data: in\n\n").await;
                let _ = release.recv().await;
                let _ = conn.end().await;
                After::Close
            }
        }
    })
    .await;
    let proxy = Proxy::start(&format!(
        "sse: {{ max_connections: 10, connection_tracking: true }}\n{}",
        config(&origin, "    sse: { max_connections: 15 }\n")
    ))
    .await;
    // Half the clients say they want an event stream, half are POSTs that do not.
    let storm = (0..200).map(|i| {
        let url = proxy.url("/events");
        tokio::spawn(async move {
            let request = if i % 2 == 0 {
                client().get(url).header("accept", "text/event-stream")
            } else {
                chat_post(url)
            };
            let response = request.send().await.expect("answer");
            let status = response.status().as_u16();
            let retry = response.headers().contains_key("retry-after");
            // Keep served streams open until every client has its answer.
            (status, retry, response)
        })
    });
    let answered: Vec<_> = futures_util::future::join_all(storm)
        .await
        .into_iter()
        .map(|r| r.expect("task"))
        .collect();
    let served = answered.iter().filter(|(s, ..)| *s == 200).count();
    let refused = answered
        .iter()
        .filter(|(s, retry, _)| *s == 503 && *retry)
        .count();
    assert_eq!((served, refused), (10, 190), "exactly the limit is served");
    assert_eq!(proxy.state.tracker.len(), 10, "never one stream over");
    let _ = release_tx.send(());
    drop(answered);
    eventually("every stream to end", || async {
        proxy.state.tracker.is_empty()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_event_stream_over_http2_gets_the_lifecycle() {
    let (origin, mut seen, steps) = scripted_origin().await;
    let port = common::free_port();
    let text = format!(
        "listen:\n  - {{ address: \"127.0.0.1:{port}\", h2c: true }}\n{}",
        config(
            &origin,
            "    sse: { heartbeat_interval: 50ms, connection_tracking: true, max_connections: 1 }\n"
        )
    );
    let config = streamgate::Config::from_text(
        std::path::Path::new("h2.yaml"),
        &text,
        std::path::Path::new("."),
    )
    .expect("config");
    let state = config.state.clone();
    std::thread::spawn(move || {
        streamgate::build_server(config, None).run(pingora_core::server::RunArgs::default())
    });
    common::listening(format!("127.0.0.1:{port}").parse().expect("addr")).await;
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .expect("client");
    let response = h2
        .post(format!("http://127.0.0.1:{port}/v1/chat"))
        .header("accept", "application/json")
        .body("{\"q\":1}")
        .send()
        .await
        .expect("answer");
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(response.status(), 200);
    assert_eq!(
        guard("the origin to get the body", seen.recv())
            .await
            .as_deref(),
        Some("POST /v1/chat {\"q\":1}")
    );
    let mut events = Events::new(response);
    assert_eq!(events.next().await.as_deref(), Some(":"), "a heartbeat");
    assert_eq!(state.tracker.len(), 1, "tracked");
    let refused = h2
        .post(format!("http://127.0.0.1:{port}/quiet"))
        .body("{}")
        .send()
        .await
        .expect("answer");
    assert_eq!(refused.status(), 503, "counted against max_connections");
    steps.send(Step::Send("data: token\n\n")).expect("step");
    loop {
        match events.next().await {
            Some(e) if e == ":" => continue,
            other => {
                assert_eq!(other.as_deref(), Some("data: token"));
                break;
            }
        }
    }
    steps.send(Step::End).expect("end");
    while let Some(e) = events.next().await {
        assert_eq!(e, ":");
    }
    eventually("the entry to go", || async { state.tracker.is_empty() }).await;
}

/// Over HTTP/2 a stream goes on after Pingora's request ends (the request's task holds only
/// the stream): it ends cleanly when its origin does, is reset when its origin fails, and
/// is recorded either way (access log, close reason) when it ends, not before.
#[tokio::test(flavor = "multi_thread")]
async fn an_http2_stream_is_ended_or_reset_as_its_origin_is_and_recorded_then() {
    common::logs::capture();
    let (origin, mut seen, steps) = scripted_origin().await;
    let proxy = Proxy::start_h2c(&format!(
        "access_log: {{ format: json }}\n{}",
        config(&origin, "    sse: { connection_tracking: true }\n")
    ))
    .await;
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .expect("client");
    let mine = |path: &'static str| {
        let host = format!("\"host\":\"{}\"", proxy.addr);
        move || {
            common::logs::records(|r| {
                r.target == streamgate::access_log::TARGET
                    && r.text.contains(&host)
                    && r.text.contains(&format!("\"path\":\"{path}\""))
            })
        }
    };

    // An LLM-style POST whose origin ends the stream: the client sees a clean end.
    let response = h2
        .post(format!("http://{}/v1/chat", proxy.addr))
        .header("accept", "application/json")
        .header("content-type", "application/json")
        .body(r#"{"stream":true}"#)
        .send()
        .await
        .expect("answer");
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    guard("the origin to get the request", seen.recv()).await;
    let mut events = Events::new(response);
    steps.send(Step::Send("data: token\n\n")).expect("step");
    assert_eq!(events.next().await.as_deref(), Some("data: token"));
    assert!(mine("/v1/chat")().is_empty(), "recorded only when it ends");
    assert_eq!(proxy.state.tracker.len(), 1);
    steps.send(Step::End).expect("end");
    assert_eq!(events.next().await, None, "ended cleanly");
    eventually("the stream to be closed", || async {
        proxy.state.tracker.is_empty()
    })
    .await;
    let closed = proxy.state.tracker.recent();
    assert_eq!(closed[0].reason.as_str(), "origin_closed");
    assert_eq!(closed[0].events, 1);
    eventually("its access log line", || async {
        !mine("/v1/chat")().is_empty()
    })
    .await;
    let line = &mine("/v1/chat")()[0].text;
    assert!(line.contains("\"status\":200"), "{line}");
    assert!(line.contains("\"sse_close\":\"origin_closed\""), "{line}");
    assert!(line.contains("\"sse_events\":1"), "{line}");

    // A GET stream whose origin fails in the middle: the client's stream is reset.
    let mut response = h2
        .get(format!("http://{}/feed", proxy.addr))
        .header("accept", "text/event-stream")
        .send()
        .await
        .expect("answer");
    guard("the origin to get the request", seen.recv()).await;
    steps.send(Step::Send("data: one\n\n")).expect("step");
    let first = guard("the first event", response.chunk())
        .await
        .expect("read");
    assert_eq!(first.as_deref(), Some(&b"data: one\n\n"[..]));
    steps.send(Step::Cut).expect("cut");
    let cut = guard("the stream to be reset", response.chunk()).await;
    assert!(cut.is_err(), "a failed origin is not a clean end: {cut:?}");
    eventually("the cut stream to be closed", || async {
        proxy.state.tracker.is_empty()
    })
    .await;
    assert_eq!(
        proxy.state.tracker.recent()[0].reason.as_str(),
        "origin_error"
    );
    eventually("its access log line", || async {
        !mine("/feed")().is_empty()
    })
    .await;
    let line = &mine("/feed")()[0].text;
    assert!(line.contains("\"sse_close\":\"origin_error\""), "{line}");
    assert!(line.contains("\"error\":"), "{line}");
}

#[tokio::test(flavor = "multi_thread")]
async fn request_bodies_stream_to_the_origin_as_they_arrive() {
    // The origin reports each chunk of a chunked body as it arrives, and echoes sizes.
    let (chunks_tx, mut chunks) = mpsc::unbounded_channel::<Vec<u8>>();
    let origin = Origin::start(move |head, mut conn| {
        let chunks_tx = chunks_tx.clone();
        async move {
            let mut total = 0;
            if head.header("transfer-encoding").is_some() {
                while let Ok(Some(chunk)) = conn.read_chunk().await {
                    total += chunk.len();
                    let _ = chunks_tx.send(chunk);
                }
            } else {
                total = conn.read_body(&head).await.map(|b| b.len()).unwrap_or(0);
            }
            if head.target == "/fail" {
                // Reads the body, then closes without an answer.
                return After::Close;
            }
            let body = format!("{} {} {total}", head.method, head.target);
            match conn.respond(200, &body).await {
                Ok(()) => After::KeepAlive(conn),
                Err(_) => After::Close,
            }
        }
    })
    .await;
    let proxy = Proxy::start(&config(&origin, "")).await;

    // A chunked upload: the origin has the first part before the client sends the second
    // (once `request_buffer_wait` is over).
    let (parts_tx, parts_rx) = mpsc::unbounded_channel::<Result<Vec<u8>, std::io::Error>>();
    let upload = tokio::spawn(
        client()
            .put(proxy.url("/upload"))
            .body(reqwest::Body::wrap_stream(tokio_stream_from(parts_rx)))
            .send(),
    );
    parts_tx.send(Ok(b"first part".to_vec())).expect("part");
    let first = guard("the first part at the origin", chunks.recv()).await;
    assert_eq!(first.as_deref(), Some(&b"first part"[..]));
    parts_tx.send(Ok(b"second".to_vec())).expect("part");
    let second = guard("the second part at the origin", chunks.recv()).await;
    assert_eq!(second.as_deref(), Some(&b"second"[..]));
    drop(parts_tx);
    let response = guard("the upload's answer", upload)
        .await
        .expect("task")
        .expect("answer");
    assert_eq!(response.text().await.expect("body"), "PUT /upload 16");

    // A large body with a length arrives whole.
    let big = vec![b'x'; 3 * 1024 * 1024 + 7];
    let response = client()
        .post(proxy.url("/big"))
        .body(big.clone())
        .send()
        .await
        .expect("answer");
    assert_eq!(
        response.text().await.expect("body"),
        format!("POST /big {}", big.len())
    );

    // Expect: 100-continue: the proxy says continue, then the body flows.
    let mut raw = TcpStream::connect(proxy.addr).await.expect("connect");
    raw.write_all(
        b"POST /expect HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\nexpect: 100-continue\r\n\r\n",
    )
    .await
    .expect("head");
    let mut reader = BufReader::new(raw);
    let mut line = String::new();
    guard("100 Continue", reader.read_line(&mut line))
        .await
        .expect("read");
    assert!(line.starts_with("HTTP/1.1 100"), "{line:?}");
    line.clear();
    reader.read_line(&mut line).await.expect("read");
    assert_eq!(line, "\r\n");
    reader.get_mut().write_all(b"hello").await.expect("body");
    let mut answer = String::new();
    guard("the answer", async {
        while !answer.ends_with("POST /expect 5") {
            let mut buf = [0u8; 256];
            let n = reader.read(&mut buf).await.expect("read");
            assert!(n > 0, "closed early: {answer:?}");
            answer.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    })
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // An origin that fails after the 100: the client still gets the 502 with its reason.
    let mut raw = TcpStream::connect(proxy.addr).await.expect("connect");
    raw.write_all(
        b"POST /fail HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\nexpect: 100-continue\r\n\r\n",
    )
    .await
    .expect("head");
    read_until(&mut raw, "100 Continue", |got| got.ends_with(b"\r\n\r\n")).await;
    raw.write_all(b"hello").await.expect("body");
    let (answer, _) = read_to_end(&mut raw, "the 502").await;
    assert!(answer.starts_with("HTTP/1.1 502"), "{answer}");

    // An HTTP/1.0 client's Expect is ignored: no 1xx, which it may not know.
    let mut raw = TcpStream::connect(proxy.addr).await.expect("connect");
    raw.write_all(
        b"POST /expect10 HTTP/1.0\r\nhost: x\r\ncontent-length: 5\r\nexpect: 100-continue\r\n\r\nhello",
    )
    .await
    .expect("request");
    let (answer, _) = read_to_end(&mut raw, "the answer").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("POST /expect10 5"), "{answer}");
}

/// A stream of the parts a channel receives, for a streamed request body.
fn tokio_stream_from(
    mut rx: mpsc::UnboundedReceiver<Result<Vec<u8>, std::io::Error>>,
) -> impl futures_util::Stream<Item = Result<Vec<u8>, std::io::Error>> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_drain_lets_answers_finish_cuts_them_at_finish_period_and_hints_get_streams() {
    // Every stream sends one event every 40 ms; `/short` ends after six of them.
    let origin = Origin::start(|head, mut conn| async move {
        let _ = conn.read_body(&head).await;
        let _ = conn.sse_head().await;
        let last = if head.target == "/short" { 6 } else { u64::MAX };
        for id in 1..=last {
            if conn
                .chunk(&format!("id: {id}\ndata: {id}\n\n"))
                .await
                .is_err()
            {
                return After::Close;
            }
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
        let _ = conn.end().await;
        After::Close
    })
    .await;
    let proxy = Proxy::start(&config(
        &origin,
        "    sse: { drain_period: 100ms, finish_period: 600ms, on_upstream_error: event }\n",
    ))
    .await;
    let mut short = Events::new(chat_post(proxy.url("/short")).send().await.expect("answer"));
    let mut long = Events::new(chat_post(proxy.url("/long")).send().await.expect("answer"));
    let mut get = Events::new(common::sse_get(proxy.url("/get")).await);
    for events in [&mut short, &mut long, &mut get] {
        assert_eq!(events.next().await.as_deref(), Some("id: 1\ndata: 1"));
    }
    proxy.state.drain.start();

    // The GET stream is told to come back; the short answer runs to its end; the long one
    // is stopped at an event boundary when finish_period runs out, with the error event.
    let mut last = String::new();
    while let Some(e) = get.next().await {
        last = e;
    }
    assert_eq!(last, "retry: 250");
    let mut ids = Vec::new();
    while let Some(e) = short.next().await {
        ids.push(e);
    }
    assert_eq!(ids.len(), 5, "the rest of the short answer: {ids:?}");
    assert_eq!(ids.last().map(String::as_str), Some("id: 6\ndata: 6"));
    let mut tail = Vec::new();
    while let Some(e) = long.next().await {
        tail.push(e);
    }
    let error = tail.last().expect("events");
    assert!(
        error.starts_with("event: error\ndata: {\"error\":\"shutdown\""),
        "{tail:?}"
    );
    assert!(
        tail[..tail.len() - 1]
            .iter()
            .all(|e| e.starts_with("id: ") && e.lines().count() == 2),
        "only whole events before it: {tail:?}"
    );
    let metrics = proxy.state.metrics.render();
    for outcome in ["reconnect", "finished", "cut"] {
        assert!(
            metrics.contains(&format!(
                "streamgate_sse_streams_drained_total{{outcome=\"{outcome}\",route=\"*\",service=\"feed\"}} 1"
            )),
            "{outcome}: {metrics}"
        );
    }
}

/// A chat-style `POST` as raw bytes, with `extra` header lines.
fn raw_chat(path: &str, extra: &str) -> Vec<u8> {
    let body = r#"{"model":"m","stream":true}"#;
    format!(
        "POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n{extra}\
         content-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread")]
async fn curl_reuses_its_connection_after_a_post_stream() {
    // curl as an LLM client: a prompt answered by an event stream, sent after `100
    // Continue` (as curl does for large bodies, and older curls for any over 1 KiB), then a
    // second request on the same connection.
    let origin = Origin::post_streams("plain").await;
    let proxy = Proxy::start(&config(&origin, "")).await;
    let prompt = format!(r#"{{"prompt":"{}"}}"#, "x".repeat(2000));
    let url = proxy.url("/v1/chat");
    let after = proxy.url("/after");
    let curl = tokio::task::spawn_blocking(move || {
        std::process::Command::new("curl")
            .args(["-sS", "--no-buffer", "-H", "content-type: application/json"])
            .args(["-H", "expect: 100-continue"])
            .args(["--data-binary", &prompt, &url, "--next"])
            .args(["-w", " connects=%{num_connects}", &after])
            .output()
    });
    let out = guard("curl", curl).await.expect("task").expect("run curl");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout, "data: token\n\nplain connects=0",
        "one connection for both"
    );
}

/// After a POST stream's first event: tells the origin to finish it, and reads until the
/// next request's answer (`plain`), which must come after the stream's last chunk.
async fn finish_then_next(conn: &mut TcpStream, go: &broadcast::Sender<()>) {
    go.send(()).expect("go");
    let rest = read_until(conn, "the stream's end and the next answer", |got| {
        String::from_utf8_lossy(got).contains("plain")
    })
    .await;
    let rest = String::from_utf8_lossy(&rest).into_owned();
    let end = rest.find("\r\n0\r\n\r\n").expect("the last chunk");
    let next = rest.find("HTTP/1.1 200").expect("the next answer");
    assert!(rest.contains("data: b") && end < next, "{rest}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_post_streams_connection_serves_the_next_request_after_it() {
    // POST streams send `data: a`, wait for the test's go, send `data: b` and end; a HEAD
    // gets an event stream's head; any other request gets `plain`. Connections are kept.
    let (go, _) = broadcast::channel::<()>(8);
    let go_for_origin = go.clone();
    let origin = Origin::start(move |head, mut conn| {
        let mut go = go_for_origin.subscribe();
        async move {
            let _ = conn.read_body(&head).await;
            let sent = match head.method.as_str() {
                "POST" => {
                    async {
                        conn.sse_head().await?;
                        conn.chunk("data: a\n\n").await?;
                        let _ = go.recv().await;
                        conn.chunk("data: b\n\n").await?;
                        conn.end().await
                    }
                    .await
                }
                "HEAD" => conn.sse_head().await,
                _ => conn.respond(200, "plain").await,
            };
            match sent {
                Ok(()) => After::KeepAlive(conn),
                Err(_) => After::Close,
            }
        }
    })
    .await;
    let proxy = Proxy::start(&config(&origin, "")).await;
    let mut conn = TcpStream::connect(proxy.addr).await.expect("connect");
    let has = |got: &[u8], what: &str| String::from_utf8_lossy(got).contains(what);
    const NEXT: &[u8] = b"GET /after HTTP/1.1\r\nhost: x\r\n\r\n";

    // The stream's head says the connection is kept; the next request, sent while the
    // stream is still open (pipelined), is answered on it after the stream's last chunk.
    conn.write_all(&raw_chat("/chat", "")).await.expect("send");
    let got = read_until(&mut conn, "the first event", |got| has(got, "data: a")).await;
    let head = String::from_utf8_lossy(&got).to_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("connection: keep-alive\r\n"), "{head}");
    assert!(head.contains("transfer-encoding: chunked\r\n"), "{head}");
    conn.write_all(NEXT).await.expect("send the next request");
    // Time for the proxy to read the start of it while the stream is open (the answer must
    // come either way).
    tokio::time::sleep(Duration::from_millis(50)).await;
    finish_then_next(&mut conn, &go).await;

    // The next request in the same packet as the POST.
    conn.write_all(&[raw_chat("/chat", ""), NEXT.to_vec()].concat())
        .await
        .expect("send");
    read_until(&mut conn, "the event", |got| has(got, "data: a")).await;
    finish_then_next(&mut conn, &go).await;

    // A chunked request body, the next request after the stream.
    conn.write_all(
        b"POST /chat HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n\
          2\r\n{}\r\n0\r\n\r\n",
    )
    .await
    .expect("send");
    read_until(&mut conn, "the event", |got| has(got, "data: a")).await;
    go.send(()).expect("go");
    read_until(&mut conn, "the stream's end", |got| {
        got.ends_with(b"\r\n0\r\n\r\n")
    })
    .await;
    conn.write_all(NEXT).await.expect("send");
    read_until(&mut conn, "the next answer", |got| has(got, "plain")).await;

    // A POST that waits for `100 Continue` before sending its body: kept all the same.
    conn.write_all(
        b"POST /chat HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\ncontent-length: 2\r\n\r\n",
    )
    .await
    .expect("send");
    read_until(&mut conn, "100 Continue", |got| got.ends_with(b"\r\n\r\n")).await;
    conn.write_all(b"{}").await.expect("send the body");
    let got = read_until(&mut conn, "the event", |got| has(got, "data: a")).await;
    let head = String::from_utf8_lossy(&got).to_lowercase();
    assert!(head.contains("connection: keep-alive\r\n"), "{head}");
    conn.write_all(NEXT).await.expect("send the next request");
    finish_then_next(&mut conn, &go).await;

    // A HEAD answered by an event stream's head: nothing but the head, then the next
    // answer.
    let head = b"HEAD /chat HTTP/1.1\r\nhost: x\r\n\r\n";
    conn.write_all(&[&head[..], NEXT].concat())
        .await
        .expect("send");
    let got = read_until(&mut conn, "the next answer", |got| has(got, "plain")).await;
    let got = String::from_utf8_lossy(&got).into_owned();
    let (_, after) = got.split_once("\r\n\r\n").expect("the HEAD's head");
    assert!(after.starts_with("HTTP/1.1 200"), "{got:?}");

    // A POST stream whose client asks to close: its head says so, and the connection ends
    // with the stream.
    conn.write_all(&raw_chat("/chat", "connection: close\r\n"))
        .await
        .expect("send");
    let got = read_until(&mut conn, "the event", |got| has(got, "data: a")).await;
    assert!(
        String::from_utf8_lossy(&got)
            .to_lowercase()
            .contains("connection: close\r\n"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    go.send(()).expect("go");
    let (rest, _) = read_to_end(&mut conn, "the close after the stream").await;
    assert!(rest.ends_with("\r\n0\r\n\r\n"), "{rest:?}");

    // While the process drains, a kept-alive connection is closed after its stream: the
    // client's next request goes to the process that takes over.
    let mut conn = TcpStream::connect(proxy.addr).await.expect("connect");
    conn.write_all(&raw_chat("/chat", "")).await.expect("send");
    read_until(&mut conn, "the event", |got| has(got, "data: a")).await;
    proxy.state.drain.start();
    go.send(()).expect("go");
    let (rest, _) = read_to_end(&mut conn, "the close after the stream").await;
    assert!(rest.ends_with("\r\n0\r\n\r\n"), "{rest:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stray_client_byte_before_the_origin_answers_loses_no_event() {
    // A GET stream's client sends a byte that belongs to no request while the proxy waits
    // for the origin, which then answers with its head and first event in one write: the
    // stream goes on, from its first event.
    let (go, _) = broadcast::channel::<()>(8);
    let go_for_origin = go.clone();
    let origin = Origin::start(move |_, mut conn| {
        let mut go = go_for_origin.subscribe();
        async move {
            let _ = go.recv().await;
            let sent = conn
                .write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                      transfer-encoding: chunked\r\n\r\n9\r\ndata: a\n\n\r\n",
                )
                .await;
            if sent.is_ok() {
                let _ = go.recv().await;
                let _ = conn.chunk("data: b\n\n").await;
                let _ = conn.end().await;
            }
            After::Close
        }
    })
    .await;
    let proxy = Proxy::start(&config(&origin, "")).await;
    for round in 0..8 {
        let mut conn = TcpStream::connect(proxy.addr).await.expect("connect");
        conn.write_all(b"GET /feed HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .expect("send");
        eventually("the origin has the request", || async {
            origin.connections() > round
        })
        .await;
        conn.write_all(b"x").await.expect("the stray byte");
        tokio::time::sleep(Duration::from_millis(20)).await;
        go.send(()).expect("go");
        tokio::time::sleep(Duration::from_millis(20)).await;
        go.send(()).expect("go on");
        let got = read_until(&mut conn, "the second event", |got| {
            String::from_utf8_lossy(got).contains("data: b")
        })
        .await;
        let got = String::from_utf8_lossy(&got);
        assert!(got.contains("data: a\n\n"), "round {round}: {got}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upgraded_connection_relays_bytes_both_ways() {
    let origin = Origin::start(|head, mut conn| async move {
        assert_eq!(head.header("upgrade"), Some("echo"));
        assert_eq!(head.header("connection"), Some("upgrade"));
        let _ = conn
            .write(
                b"HTTP/1.1 101 Switching Protocols\r\nupgrade: echo\r\nconnection: upgrade\r\n\r\n",
            )
            .await;
        let mut buf = [0u8; 64];
        loop {
            match conn.reader.read(&mut buf).await {
                Ok(0) | Err(_) => return After::Close,
                Ok(n) => {
                    if conn.write(&buf[..n]).await.is_err() {
                        return After::Close;
                    }
                }
            }
        }
    })
    .await;
    let proxy = Proxy::start(&config(&origin, "")).await;
    let mut raw = TcpStream::connect(proxy.addr).await.expect("connect");
    raw.write_all(b"GET /ws HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n")
        .await
        .expect("head");
    let mut reader = BufReader::new(raw);
    let mut head = String::new();
    guard("the 101", async {
        while !head.ends_with("\r\n\r\n") {
            let mut line = String::new();
            reader.read_line(&mut line).await.expect("read");
            head.push_str(&line);
        }
    })
    .await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    for word in ["ping", "pong and more"] {
        reader
            .get_mut()
            .write_all(word.as_bytes())
            .await
            .expect("write");
        let mut got = vec![0u8; word.len()];
        guard("the echo", reader.read_exact(&mut got))
            .await
            .expect("read");
        assert_eq!(got, word.as_bytes());
    }
}

/// An upgrade to `h2c` is not passed on (the client would speak HTTP/2 to the origin past
/// the proxy's routes and middleware): the origin gets a plain request and the client its
/// plain answer.
#[tokio::test(flavor = "multi_thread")]
async fn an_upgrade_to_h2c_goes_as_a_plain_request() {
    let origin = Origin::start(|head, mut conn| async move {
        let seen = format!(
            "upgrade={:?} connection={:?}",
            head.header("upgrade"),
            head.header("connection")
        );
        let _ = conn.respond(200, &seen).await;
        After::Close
    })
    .await;
    let proxy = Proxy::start(&config(&origin, "")).await;
    for upgrade in ["h2c", "H2C", "foo, h2c"] {
        let mut raw = TcpStream::connect(proxy.addr).await.expect("connect");
        let request = format!(
            "GET /x HTTP/1.1\r\nhost: x\r\nconnection: upgrade, http2-settings\r\n\
             upgrade: {upgrade}\r\nhttp2-settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n"
        );
        raw.write_all(request.as_bytes()).await.expect("head");
        let got = read_until(&mut raw, "the answer", |got| {
            got.ends_with(b"connection=None")
        })
        .await;
        let got = String::from_utf8_lossy(&got);
        assert!(got.starts_with("HTTP/1.1 200"), "{upgrade}: {got}");
        assert!(
            got.contains("upgrade=None connection=None"),
            "{upgrade}: {got}"
        );
    }
}

/// The origin may answer while a long stream is open: plain requests and streams share
/// one proxy without waiting for each other.
#[tokio::test(flavor = "multi_thread")]
async fn plain_answers_pass_while_streams_are_open() {
    let served = Arc::new(AtomicUsize::new(0));
    let hold = Arc::new(Mutex::new(()));
    let guard_lock = hold.clone().lock_owned().await;
    let origin = Origin::start({
        let (served, hold) = (served.clone(), hold.clone());
        move |head, mut conn| {
            let (served, hold) = (served.clone(), hold.clone());
            async move {
                if head.target == "/stream" {
                    let _ = conn.sse_head().await;
                    let _ = conn.chunk("data: open\n\n").await;
                    let _lock = hold.lock().await;
                    let _ = conn.end().await;
                    return After::Close;
                }
                served.fetch_add(1, Ordering::SeqCst);
                match conn.respond(200, "plain").await {
                    Ok(()) => After::KeepAlive(conn),
                    Err(_) => After::Close,
                }
            }
        }
    })
    .await;
    let proxy = Proxy::start(&config(&origin, "")).await;
    let mut stream = Events::new(
        client()
            .post(proxy.url("/stream"))
            .body("{}")
            .send()
            .await
            .expect("answer"),
    );
    assert_eq!(stream.next().await.as_deref(), Some("data: open"));
    for _ in 0..20 {
        let r = client()
            .get(proxy.url("/plain"))
            .send()
            .await
            .expect("answer");
        assert_eq!(r.text().await.expect("body"), "plain");
    }
    assert_eq!(served.load(Ordering::SeqCst), 20);
    drop(guard_lock);
    assert_eq!(stream.next().await, None);
}
