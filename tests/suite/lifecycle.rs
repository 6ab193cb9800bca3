//! The life of an event stream past its first event: header timeout, heartbeats, the end at
//! `max_lifetime`, the cleanup of inactive streams, the error event, and the drain.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use common::resume::{contiguous, counting_origin, Resumer};
use common::{client, eventually, guard, sse_get, After, Events, Origin, Proxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, Mutex};

fn config(origin: &Origin, service_sse: &str) -> String {
    format!(
        "services:\n  feed:\n    url: \"{}\"\n    sse: {{ {service_sse} }}\n\
         host_rules:\n  - pattern: \"*\"\n    target: feed\n",
        origin.url()
    )
}

/// An origin that runs `steps` of its stream one by one, each after the test says so.
async fn stepped_origin(steps: &'static [&'static str]) -> (Origin, mpsc::UnboundedSender<()>) {
    let (tx, rx) = mpsc::unbounded_channel::<()>();
    let rx = Arc::new(Mutex::new(rx));
    let origin = Origin::start(move |_, mut conn| {
        let rx = rx.clone();
        async move {
            let mut go = rx.lock().await;
            conn.sse_head().await.expect("head");
            for step in steps {
                if go.recv().await.is_none() {
                    break;
                }
                if conn.chunk(step).await.is_err() {
                    return After::Close;
                }
            }
            conn.closed().await;
            After::Close
        }
    })
    .await;
    (origin, tx)
}

/// Reads raw body text until `pattern` has arrived; returns everything read so far.
async fn read_until(response: &mut reqwest::Response, text: &mut String, pattern: &str) {
    guard(&format!("`{pattern:?}` from the proxy"), async {
        while !text.contains(pattern) {
            let chunk = response.chunk().await.expect("read").expect("more data");
            text.push_str(&String::from_utf8_lossy(&chunk));
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn an_origin_slow_to_answer_gets_504_after_header_timeout() {
    let origin = Origin::start(|_, mut conn| async move {
        conn.closed().await;
        After::Close
    })
    .await;
    let proxy = Proxy::start(&config(&origin, "header_timeout: 200ms")).await;
    let response = sse_get(proxy.url("/events")).await;
    assert_eq!(response.status(), 504);
    let body = response.text().await.expect("body");
    assert!(
        body.contains("service `feed`") && body.contains("no response header within 200ms"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn heartbeats_go_out_only_between_events() {
    let (origin, go) = stepped_origin(&["data: one\n\n", "data: tw", "o\n\n"]).await;
    let proxy = Proxy::start(&config(&origin, "heartbeat_interval: 50ms")).await;
    let mut response = sse_get(proxy.url("/events")).await;
    let mut text = String::new();
    go.send(()).expect("step");
    read_until(&mut response, &mut text, "data: one\n\n:\n\n").await;
    // The origin stops in the middle of an event, far longer than the interval.
    go.send(()).expect("step");
    read_until(&mut response, &mut text, "data: tw").await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    go.send(()).expect("step");
    read_until(&mut response, &mut text, "o\n\n:\n\n").await;
    let after_one = &text[text.find("data: one\n\n").expect("one") + 11..];
    let two = after_one.find("data: two\n\n");
    assert!(two.is_some(), "no heartbeat may split an event: {text:?}");
    assert!(
        after_one[..two.unwrap_or(0)]
            .chars()
            .all(|c| c == ':' || c == '\n'),
        "only heartbeats between the events: {text:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn heartbeats_do_not_keep_a_silent_origin_alive() {
    let (origin, go) = stepped_origin(&["data: one\n\n"]).await;
    let proxy = Proxy::start(&config(
        &origin,
        "heartbeat_interval: 30ms, read_timeout: 300ms",
    ))
    .await;
    let response = sse_get(proxy.url("/events")).await;
    go.send(()).expect("step");
    let mut events = Events::new(response);
    assert_eq!(events.next().await.as_deref(), Some("data: one"));
    assert_eq!(events.next().await.as_deref(), Some(":"));
    let end = guard("the read timeout", async {
        loop {
            match events.next_raw().await {
                Some(Ok(e)) if e == ":" => continue,
                other => return other,
            }
        }
    })
    .await;
    assert!(
        matches!(end, Some(Err(_))),
        "a stream cut by a silent origin must read as cut: {end:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn max_lifetime_ends_the_stream_after_the_current_event_with_a_retry_hint() {
    let (origin, go) =
        stepped_origin(&["data: 1\n\ndata: 2\n", "\ndata: 3\n\n", "data: 4\n\n"]).await;
    let proxy = Proxy::start(&config(&origin, "max_lifetime: 200ms")).await;
    let response = sse_get(proxy.url("/events")).await;
    go.send(()).expect("step");
    let mut events = Events::new(response);
    assert_eq!(events.next().await.as_deref(), Some("data: 1"));
    // The lifetime runs out while event 2 is half sent.
    tokio::time::sleep(Duration::from_millis(400)).await;
    go.send(()).expect("step");
    let _ = go.send(());
    assert_eq!(events.next().await.as_deref(), Some("data: 2"));
    assert_eq!(events.next().await.as_deref(), Some("retry: 3000"));
    assert_eq!(events.next().await, None, "a clean end, and no event 3");
}

/// An origin that never pauses still has its stream ended at `max_lifetime`: the loop
/// reads the origin first, and its other deadlines must not wait for the origin to rest
/// (tokio's budget makes a read or a write wait now and then, and the loop looks at them
/// at that turn).
#[tokio::test(flavor = "multi_thread")]
async fn max_lifetime_ends_a_stream_whose_origin_never_pauses() {
    let origin = Origin::start(|_, mut conn| async move {
        conn.sse_head().await.expect("head");
        // A thousand events a write: the proxy always finds more waiting.
        let batch = "data: x\n\n".repeat(1000);
        while conn.chunk(&batch).await.is_ok() {}
        After::Close
    })
    .await;
    let proxy = Proxy::start(&config(&origin, "max_lifetime: 300ms")).await;
    let mut events = Events::new(sse_get(proxy.url("/events")).await);
    let mut last = None;
    guard("the stream to end at max_lifetime", async {
        while let Some(event) = events.next().await {
            last = Some(event);
        }
    })
    .await;
    assert_eq!(
        last.as_deref(),
        Some("retry: 3000"),
        "a clean end with a hint"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cleanup_task_closes_inactive_tracked_streams() {
    let (origin, go) = stepped_origin(&["id: 7\ndata: only\n\n"]).await;
    let proxy = Proxy::start(&config(
        &origin,
        "connection_tracking: true, inactive_threshold: 300ms",
    ))
    .await;
    let response = sse_get(proxy.url("/events")).await;
    go.send(()).expect("step");
    let mut events = Events::new(response);
    assert_eq!(events.next().await.as_deref(), Some("id: 7\ndata: only"));
    assert_eq!(events.next().await.as_deref(), Some("retry: 3000"));
    assert_eq!(events.next().await, None);
    eventually("the entry to go", || async {
        proxy.state.tracker.is_empty()
    })
    .await;
    let closed = &proxy.state.tracker.recent()[0];
    assert_eq!(closed.reason.as_str(), "idle_timeout");
    assert_eq!(closed.events, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_origin_dying_between_events_sends_the_error_event_when_asked() {
    let origin = Origin::start(|_, mut conn| async move {
        conn.sse_head().await.expect("head");
        conn.chunk("data: last words\n\n").await.expect("event");
        // Gone without the terminating chunk.
        After::Close
    })
    .await;
    let proxy = Proxy::start(&config(&origin, "on_upstream_error: event")).await;
    let mut events = Events::new(sse_get(proxy.url("/events")).await);
    assert_eq!(events.next().await.as_deref(), Some("data: last words"));
    let error = events.next().await.expect("the error event");
    let data = error
        .strip_prefix("event: error\ndata: ")
        .unwrap_or_else(|| panic!("not an error event: {error:?}"));
    let json: serde_json::Value = serde_json::from_str(data).expect("JSON reason");
    assert_eq!(json["error"], "upstream");
    assert!(json["reason"].as_str().is_some_and(|r| !r.is_empty()));
    assert!(
        events.until_end().await.is_ok(),
        "after the error event the stream ends cleanly"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_drain_ends_every_stream_between_events_with_a_hint() {
    let origin = counting_origin(Duration::from_millis(10)).await;
    let admin = common::free_port();
    let proxy = Proxy::start(&format!(
        "admin: {{ listen: \"127.0.0.1:{admin}\" }}\n{}",
        config(&origin, "drain_period: 300ms, connection_tracking: true")
    ))
    .await;
    let ready = |admin: u16| async move {
        let url = format!("http://127.0.0.1:{admin}/readyz");
        client().get(url).send().await.expect("readyz").status()
    };
    assert_eq!(ready(admin).await, 200);
    let clients_n = 20;
    let clients: Vec<Resumer> = (0..clients_n)
        .map(|_| Resumer::start(proxy.addr, "/events"))
        .collect();
    eventually("every client to get events", || async {
        clients.iter().all(|c| c.events() >= 3)
    })
    .await;
    proxy.state.drain.start();
    assert_eq!(ready(admin).await, 503, "a draining process is not ready");
    eventually("every stream to be drained", || async {
        clients
            .iter()
            .all(|c| c.seen.lock().expect("seen").hints >= 1)
    })
    .await;
    // While the process drains, a new stream is told to come back rather than refused.
    let r = sse_get(proxy.url("/events")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.expect("body"), "retry: 250\n\n");
    // This process keeps draining, so reconnects are turned away too: resuming on the next
    // process is the `-u` test's part. Up to the drain, nothing was lost or repeated.
    for client in clients {
        let seen = client.stop().await;
        contiguous(&seen.ids).unwrap_or_else(|e| panic!("{e}: {:?}", seen.ids));
    }
    // A stream's close is recorded as its request ends, after its client has the hint.
    eventually("every drained stream to be closed", || async {
        proxy.state.tracker.is_empty()
    })
    .await;
    let reasons: Vec<_> = proxy
        .state
        .tracker
        .recent()
        .iter()
        .map(|c| c.reason.as_str())
        .collect();
    assert!(reasons.iter().all(|r| *r == "drain"), "{reasons:?}");
    assert!(reasons.len() >= clients_n, "{reasons:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_gone_closes_its_relayed_upstream_and_entry() {
    let (closed_tx, mut closed_rx) = mpsc::unbounded_channel::<()>();
    let origin = Origin::start(move |_, mut conn| {
        let closed_tx = closed_tx.clone();
        async move {
            conn.sse_head().await.expect("head");
            conn.chunk("data: hi\n\n").await.expect("event");
            conn.closed().await;
            let _ = closed_tx.send(());
            After::Close
        }
    })
    .await;
    let proxy = Proxy::start(&config(
        &origin,
        "connection_tracking: true, heartbeat_interval: 1h",
    ))
    .await;
    let mut events = Events::new(sse_get(proxy.url("/events")).await);
    assert_eq!(events.next().await.as_deref(), Some("data: hi"));
    assert_eq!(proxy.state.tracker.len(), 1);
    drop(events);
    guard("the upstream to close", closed_rx.recv()).await;
    eventually("the entry to go", || async {
        proxy.state.tracker.is_empty()
    })
    .await;
    assert_eq!(
        proxy.state.tracker.recent()[0].reason.as_str(),
        "client_closed"
    );
    // Not relayed: a stream without `Accept: text/event-stream` still streams.
    let plain = client().get(proxy.url("/events")).send().await.expect("r");
    assert_eq!(plain.headers()["content-type"], "text/event-stream");
}

#[tokio::test(flavor = "multi_thread")]
async fn limits_hold_exactly_under_a_storm_of_opens() {
    let open_now = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let most = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (release_tx, _) = tokio::sync::broadcast::channel::<()>(1);
    let origin = Origin::start({
        let (open_now, most, release_tx) = (open_now.clone(), most.clone(), release_tx.clone());
        move |_, mut conn| {
            let (open_now, most) = (open_now.clone(), most.clone());
            let mut release = release_tx.subscribe();
            async move {
                use std::sync::atomic::Ordering::SeqCst;
                let now = open_now.fetch_add(1, SeqCst) + 1;
                most.fetch_max(now, SeqCst);
                conn.sse_head().await.expect("head");
                let _ = conn.chunk("data: in\n\n").await;
                let _ = release.recv().await;
                open_now.fetch_sub(1, SeqCst);
                let _ = conn.end().await;
                After::Close
            }
        }
    })
    .await;
    // The global limit (10) is the tightest of three.
    let proxy = Proxy::start(&format!(
        "sse: {{ max_connections: 10 }}\n{}",
        config(
            &origin,
            "max_connections: 15, max_connections_per_client: 12"
        )
    ))
    .await;
    let storm = (0..200).map(|_| {
        let url = proxy.url("/events");
        tokio::spawn(async move { sse_get(url).await })
    });
    let mut answered = Vec::new();
    for r in futures_util::future::join_all(storm).await {
        answered.push(r.expect("task"));
    }
    let ok = answered.iter().filter(|r| r.status() == 200).count();
    let refused: Vec<_> = answered.iter().filter(|r| r.status() == 503).collect();
    assert_eq!((ok, refused.len()), (10, 190));
    assert!(refused.iter().all(|r| r.headers()["retry-after"] == "5"));
    let _ = release_tx.send(());
    drop(answered);
    assert_eq!(
        most.load(std::sync::atomic::Ordering::SeqCst),
        10,
        "never one stream over"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn early_hints_before_the_stream_are_skipped() {
    let origin = Origin::start(|_, mut conn| async move {
        let _ = conn
            .write(b"HTTP/1.1 103 Early Hints\r\nlink: </app.css>; rel=preload\r\n\r\n")
            .await;
        conn.sse_head().await.expect("head");
        let _ = conn.chunk("data: after the hints\n\n").await;
        let _ = conn.end().await;
        After::Close
    })
    .await;
    let proxy = Proxy::start(&config(&origin, "")).await;
    let response = sse_get(proxy.url("/events")).await;
    assert_eq!(response.status(), 200);
    let mut events = Events::new(response);
    assert_eq!(
        events.next().await.as_deref(),
        Some("data: after the hints")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_leaves_while_the_origin_is_silent_frees_its_slot() {
    let mut origin = Origin::start(|_, mut conn| async move {
        conn.closed().await;
        After::Close
    })
    .await;
    let proxy = Proxy::start(&config(&origin, "header_timeout: 0, max_connections: 1")).await;
    let mut waiting = tokio::net::TcpStream::connect(proxy.addr)
        .await
        .expect("connect");
    waiting
        .write_all(b"GET /events HTTP/1.1\r\nhost: t\r\naccept: text/event-stream\r\n\r\n")
        .await
        .expect("request");
    origin.next_request().await;
    // The slot is taken while the origin keeps the header back...
    let probe = || async {
        client()
            .get(proxy.url("/events"))
            .header("accept", "text/event-stream")
            .timeout(Duration::from_millis(300))
            .send()
            .await
            .map(|r| r.status().as_u16())
    };
    eventually("the first stream to hold the slot", || async {
        probe().await.is_ok_and(|status| status == 503)
    })
    .await;
    // ...and freed as soon as that client leaves, without waiting for the origin.
    drop(waiting);
    // A free slot means the request reaches the (silent) origin and times out here.
    eventually("the slot to be freed", || async { probe().await.is_err() }).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_stops_reading_is_cut_at_write_timeout() {
    let (gone_tx, mut gone) = mpsc::unbounded_channel::<usize>();
    let origin = Origin::start(move |_, mut conn| {
        let gone_tx = gone_tx.clone();
        async move {
            conn.sse_head().await.expect("head");
            let event = format!("data: {}\n\n", "x".repeat(16 * 1024));
            let mut sent = 0;
            while conn.chunk(&event).await.is_ok() {
                sent += 1;
            }
            let _ = gone_tx.send(sent);
            After::Close
        }
    })
    .await;
    let proxy = Proxy::start(&config(&origin, "write_timeout: 300ms")).await;
    let mut client = tokio::net::TcpStream::connect(proxy.addr)
        .await
        .expect("connect");
    client
        .write_all(b"GET /events HTTP/1.1\r\nhost: feed\r\naccept: text/event-stream\r\n\r\n")
        .await
        .expect("request");
    // The client reads nothing: the proxy's writes fill the socket buffers and wait, and
    // after write_timeout the stream is cut, its origin connection dropped.
    let sent = guard("the origin connection dropped", gone.recv())
        .await
        .expect("the origin's count");
    assert!(sent > 0, "events flowed before the client stalled");
    // The client's connection ends too, after what was already on its way.
    let mut rest = Vec::new();
    let _ = guard(
        "the client connection closed",
        client.read_to_end(&mut rest),
    )
    .await;
}

/// A line per stream opened and closed at info is what `connection_tracking` adds: a
/// tracked stream logs both (the close with its last event id and reason), an untracked
/// one neither (its end goes to debug).
#[tokio::test(flavor = "multi_thread")]
async fn only_a_tracked_stream_logs_its_open_and_close_at_info() {
    common::logs::capture();
    let origin = Origin::start(|_, mut conn| async move {
        conn.sse_head().await.expect("head");
        conn.chunk("id: 7\ndata: a\n\n").await.expect("event");
        conn.closed().await;
        After::Close
    })
    .await;
    let closed = |proxy: &Proxy| {
        proxy.state.metrics.render().lines().any(|l| {
            l.starts_with("streamgate_sse_streams_closed_total{reason=\"client_closed\"")
                && l.ends_with(" 1")
        })
    };
    for tracked in [false, true] {
        let proxy =
            Proxy::start(&config(&origin, &format!("connection_tracking: {tracked}"))).await;
        let path = format!("/only-info-{tracked}");
        let mut events = Events::new(sse_get(proxy.url(&path)).await);
        assert_eq!(events.next().await.as_deref(), Some("id: 7\ndata: a"));
        drop(events);
        // Counted closed after its end was logged.
        eventually("the stream's close", || async { closed(&proxy) }).await;
        let opened: Vec<String> = common::logs::records(|r| {
            r.text.starts_with("sse stream ") && r.text.contains(&format!("path={path}"))
        })
        .into_iter()
        .map(|r| r.text)
        .collect();
        if !tracked {
            assert!(opened.is_empty(), "{opened:?}");
            let ended = common::logs::records(|r| r.text.starts_with("sse stream ended"));
            assert!(
                ended.is_empty(),
                "an untracked stream's end at info: {ended:?}"
            );
            continue;
        }
        assert_eq!(opened.len(), 1, "{opened:?}");
        let id = opened[0]
            .strip_prefix("sse stream ")
            .and_then(|rest| rest.split(' ').next())
            .expect("an id");
        let close = common::logs::records(|r| {
            r.level == log::Level::Info && r.text.starts_with(&format!("sse stream {id} closed:"))
        });
        assert_eq!(close.len(), 1, "{close:?}");
        assert!(
            close[0].text.contains("last_event_id=\"7\"")
                && close[0].text.contains("reason=client_closed"),
            "{close:?}"
        );
    }
}
