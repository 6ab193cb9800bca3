//! Services with many endpoints, end to end: each load-balancing algorithm, weights,
//! consistent hashing, least connections over long-lived streams, active and passive
//! health, all-down 503, retries on connect failure, file discovery, and SSE streams that
//! resume on another endpoint.

use crate::common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::resume::Counting;
use common::{client, eventually, free_port, guard, sse_get, After, Events, Origin, Proxy};

/// A config with one service `feed` over `endpoints` (YAML list items) and `extra` keys.
fn config(endpoints: &[String], extra: &str) -> String {
    format!(
        "services:\n  feed:\n    discovery:\n      static: [{}]\n{extra}\
         host_rules:\n  - {{ pattern: \"*\", target: feed }}\n",
        endpoints.join(", ")
    )
}

fn quoted(origin: &Origin) -> String {
    format!("\"{}\"", origin.addr)
}

/// An origin answering every request with `name`.
async fn named(name: &'static str) -> Origin {
    Origin::plain(name).await
}

/// Sends `n` GETs (with `header`, if any) and counts the answers by body.
async fn spread(proxy: &Proxy, n: usize, header: Option<(&str, String)>) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    let http = client();
    for _ in 0..n {
        let mut request = http.get(proxy.url("/"));
        if let Some((name, value)) = &header {
            request = request.header(*name, value);
        }
        let response = request.send().await.expect("response");
        assert_eq!(response.status(), 200);
        *counts
            .entry(response.text().await.expect("body"))
            .or_default() += 1;
    }
    counts
}

#[tokio::test(flavor = "multi_thread")]
async fn round_robin_and_weights_divide_requests_exactly() {
    let (a, b, c) = (named("a").await, named("b").await, named("c").await);
    let all = [quoted(&a), quoted(&b), quoted(&c)];
    let proxy = Proxy::start(&config(&all, "    load_balancing: round_robin\n")).await;
    let counts = spread(&proxy, 30, None).await;
    assert_eq!((counts["a"], counts["b"], counts["c"]), (10, 10, 10));

    let weighted = [
        format!("{{ address: \"{}\", weight: 1 }}", a.addr),
        format!("{{ address: \"{}\", weight: 2 }}", b.addr),
        format!("{{ address: \"{}\", weight: 3 }}", c.addr),
    ];
    let proxy = Proxy::start(&config(
        &weighted,
        "    load_balancing: weighted_round_robin\n",
    ))
    .await;
    let counts = spread(&proxy, 60, None).await;
    assert_eq!((counts["a"], counts["b"], counts["c"]), (10, 20, 30));

    let proxy = Proxy::start(&config(&weighted, "    load_balancing: random\n")).await;
    let counts = spread(&proxy, 300, None).await;
    assert!(
        counts.len() == 3 && counts["c"] > counts["a"],
        "weighted random: {counts:?}"
    );
}

/// Writes the endpoint list of file discovery the way deploy tools do: a new file, renamed
/// over the old one.
fn write_endpoints(path: &std::path::Path, origins: &[&Origin]) {
    let list: Vec<String> = origins
        .iter()
        .map(|o| format!("- \"{}\"\n", o.addr))
        .collect();
    let fresh = path.with_extension("new");
    std::fs::write(&fresh, list.concat()).expect("write endpoints");
    std::fs::rename(&fresh, path).expect("rename endpoints");
}

#[tokio::test(flavor = "multi_thread")]
async fn consistent_hash_keeps_users_when_an_unrelated_endpoint_goes() {
    let (a, b, c) = (named("a").await, named("b").await, named("c").await);
    let dir = tempfile::tempdir().expect("tempdir");
    let list = dir.path().join("feed-endpoints.yaml");
    write_endpoints(&list, &[&a, &b, &c]);
    let port = free_port();
    let main = dir.path().join("streamgate.yaml");
    std::fs::write(
        &main,
        format!(
            "listen: [\"127.0.0.1:{port}\"]\n\
             services:\n  feed:\n    discovery: {{ file: {{ path: feed-endpoints.yaml }} }}\n    \
             load_balancing: consistent_hash\n    hash_key: header:x-user\n\
             host_rules:\n  - {{ pattern: \"*\", target: feed }}\n"
        ),
    )
    .expect("write config");
    let proxy = Proxy::start_file(&main).await;
    let mut home = HashMap::new();
    for user in 0..30 {
        let counts = spread(&proxy, 3, Some(("x-user", format!("u{user}")))).await;
        assert_eq!(
            counts.len(),
            1,
            "user {user} always lands on one endpoint: {counts:?}"
        );
        home.insert(user, counts.into_keys().next().expect("one"));
    }
    assert!(
        home.values().any(|h| h == "c"),
        "some user lives on c: {home:?}"
    );
    // The file loses c: only c's users move.
    write_endpoints(&list, &[&a, &b]);
    eventually("discovery to drop c", || async {
        let mut moved = true;
        for (user, _) in home.iter().filter(|(_, h)| *h == "c") {
            let counts = spread(&proxy, 1, Some(("x-user", format!("u{user}")))).await;
            moved &= !counts.contains_key("c");
        }
        moved
    })
    .await;
    for user in 0..30 {
        let counts = spread(&proxy, 2, Some(("x-user", format!("u{user}")))).await;
        let now = counts.into_keys().next().expect("one");
        if home[&user] != "c" {
            assert_eq!(
                now, home[&user],
                "user {user} moved although its endpoint stayed"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn least_connections_spreads_300_streams_within_one_of_even() {
    let origin = || {
        Origin::start(|_, mut conn| async move {
            conn.sse_head().await.expect("head");
            let _ = conn.chunk("data: open\n\n").await;
            conn.closed().await;
            After::Close
        })
    };
    let (a, b, c) = (origin().await, origin().await, origin().await);
    let proxy = Proxy::start(&config(&[quoted(&a), quoted(&b), quoted(&c)], "")).await;
    let mut open = Vec::new();
    for _ in 0..300 {
        let mut events = Events::new(sse_get(proxy.url("/events")).await);
        assert_eq!(events.next().await.as_deref(), Some("data: open"));
        open.push(events);
    }
    let counts = [a.connections(), b.connections(), c.connections()];
    let (min, max) = (counts.iter().min(), counts.iter().max());
    assert!(
        max.zip(min).is_some_and(|(max, min)| max - min <= 1)
            && counts.iter().sum::<usize>() == 300,
        "streams per endpoint: {counts:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn active_checks_take_an_endpoint_out_and_bring_it_back() {
    let a = named("a").await;
    let healthy = Arc::new(AtomicBool::new(true));
    let b = Origin::start({
        let healthy = healthy.clone();
        move |head, mut conn| {
            let healthy = healthy.clone();
            async move {
                let answer = if head.target == "/healthz" && !healthy.load(Ordering::SeqCst) {
                    conn.respond(503, "sick").await
                } else {
                    conn.respond(200, "b").await
                };
                match answer {
                    Ok(()) => After::KeepAlive(conn),
                    Err(_) => After::Close,
                }
            }
        }
    })
    .await;
    let proxy = Proxy::start(&config(
        &[quoted(&a), quoted(&b)],
        "    load_balancing: round_robin\n    health_check: { type: http, path: /healthz, \
         interval: 50ms, timeout: 1s, healthy_threshold: 2, unhealthy_threshold: 2 }\n",
    ))
    .await;
    let both = spread(&proxy, 10, None).await;
    assert_eq!(both.len(), 2, "{both:?}");
    healthy.store(false, Ordering::SeqCst);
    eventually("b to be taken out", || async {
        !spread(&proxy, 4, None).await.contains_key("b")
    })
    .await;
    assert_eq!(spread(&proxy, 10, None).await["a"], 10);
    healthy.store(true, Ordering::SeqCst);
    eventually("b to come back", || async {
        spread(&proxy, 4, None).await.contains_key("b")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn every_endpoint_down_answers_503_naming_the_service() {
    let dead = [
        format!("\"127.0.0.1:{}\"", free_port()),
        format!("\"127.0.0.1:{}\"", free_port()),
    ];
    let proxy = Proxy::start(&config(
        &dead,
        "    health_check: { type: tcp, interval: 50ms, unhealthy_threshold: 1 }\n",
    ))
    .await;
    eventually("both endpoints to be marked down", || async {
        let r = client().get(proxy.url("/")).send().await.expect("response");
        r.status() == 503
    })
    .await;
    let r = client().get(proxy.url("/")).send().await.expect("response");
    assert_eq!(r.status(), 503);
    let body = r.text().await.expect("body");
    assert!(
        body.contains("service `feed`") && body.contains("every endpoint is down"),
        "{body}"
    );
    let stream = sse_get(proxy.url("/events")).await;
    assert_eq!(stream.status(), 503, "the SSE relay answers the same");
}

#[tokio::test(flavor = "multi_thread")]
async fn connect_failures_are_retried_on_another_endpoint() {
    let live = Origin::start(|head, mut conn| async move {
        if head.target == "/events" {
            conn.sse_head().await.expect("head");
            let _ = conn.chunk("data: live\n\n").await;
            let _ = conn.end().await;
            return After::Close;
        }
        match conn.respond(200, "live").await {
            Ok(()) => After::KeepAlive(conn),
            Err(_) => After::Close,
        }
    })
    .await;
    let dead = format!("\"127.0.0.1:{}\"", free_port());
    let proxy = Proxy::start(&config(
        &[dead, quoted(&live)],
        "    load_balancing: round_robin\n    retries: 1\n",
    ))
    .await;
    for _ in 0..6 {
        let r = client().get(proxy.url("/")).send().await.expect("response");
        assert_eq!(r.status(), 200, "a refused connect is retried elsewhere");
        let mut events = Events::new(sse_get(proxy.url("/events")).await);
        assert_eq!(events.next().await.as_deref(), Some("data: live"));
    }
}

/// An origin that honours `Last-Event-ID` (starting at that id again, so the proxy has a
/// repeat to drop) and, when `dies_after` is set, dies in the middle of the event after it.
async fn counting(dies_after: Option<u64>) -> Origin {
    Counting {
        interval: Duration::from_millis(10),
        repeat_last: true,
        dies_after,
    }
    .start()
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_resumed_stream_continues_on_another_endpoint_without_gap_or_repeat() {
    let dying = counting(Some(20)).await;
    let steady = counting(None).await;
    let proxy = Proxy::start(&config(
        &[quoted(&dying), quoted(&steady)],
        "    load_balancing: consistent_hash\n    hash_key: header:x-user\n    \
         sse: { resume: true, resume_attempts: 2, resume_window: 1m }\n",
    ))
    .await;
    // Find a user whose streams start on the dying origin.
    let mut user = 0;
    let mut events = loop {
        let r = client()
            .get(proxy.url("/events"))
            .header("accept", "text/event-stream")
            .header("x-user", format!("u{user}"))
            .send()
            .await
            .expect("response");
        let mut events = Events::new(r);
        events.next().await.expect("first event");
        if dying.connections() > 0 {
            break events;
        }
        user += 1;
    };
    let steady_before = steady.connections();
    let mut ids = vec![1u64];
    guard("40 events over the switch", async {
        while ids.len() < 40 {
            let event = events.next().await.expect("the stream goes on");
            let id = event
                .lines()
                .find_map(|l| l.strip_prefix("id: "))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no id in {event:?}"));
            assert!(
                !event.contains("half"),
                "half an event reached the client: {event:?}"
            );
            ids.push(id);
        }
    })
    .await;
    let expected: Vec<u64> = (1..=40).collect();
    assert_eq!(ids, expected, "contiguous, no duplicates");
    assert_eq!(
        steady.connections(),
        steady_before + 1,
        "resumed once, on the other endpoint"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn tracked_streams_to_an_endpoint_that_leaves_discovery_end_with_a_hint() {
    let streaming = |name: &'static str| {
        Origin::start(move |_, mut conn| async move {
            conn.sse_head().await.expect("head");
            let _ = conn.chunk(&format!("data: {name}\n\n")).await;
            conn.closed().await;
            After::Close
        })
    };
    let (a, b) = (streaming("a").await, streaming("b").await);
    let dir = tempfile::tempdir().expect("tempdir");
    let list = dir.path().join("endpoints.yaml");
    write_endpoints(&list, &[&a]);
    let port = free_port();
    let main = dir.path().join("streamgate.yaml");
    std::fs::write(
        &main,
        format!(
            "listen: [\"127.0.0.1:{port}\"]\nsse: {{ connection_tracking: true }}\n\
             services:\n  feed:\n    discovery: {{ file: {{ path: endpoints.yaml }} }}\n\
             host_rules:\n  - {{ pattern: \"*\", target: feed }}\n"
        ),
    )
    .expect("write config");
    let proxy = Proxy::start_file(&main).await;
    let mut events = Events::new(sse_get(proxy.url("/events")).await);
    assert_eq!(events.next().await.as_deref(), Some("data: a"));
    write_endpoints(&list, &[&b]);
    assert_eq!(events.next().await.as_deref(), Some("retry: 3000"));
    assert_eq!(events.next().await, None, "ended cleanly, to come back");
    let mut again = Events::new(sse_get(proxy.url("/events")).await);
    assert_eq!(again.next().await.as_deref(), Some("data: b"));
}
