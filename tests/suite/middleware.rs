//! The middleware chain and every built-in type, end to end over real sockets.

use crate::common;

use std::sync::Arc;

use common::{client, guard, lockstep, sse_get, After, Events, Origin, Proxy};
use tokio::sync::{mpsc, Mutex};

/// A config with one service `web` at `origin`, the given middleware definitions, global
/// chain, and one catch-all host rule with `host_mw` and a `/r/*` route with `route_mw`.
fn config(origin: &Origin, defs: &str, global: &str, host_mw: &str, route_mw: &str) -> String {
    format!(
        "services:\n  web:\n    url: \"{}\"\n\
         middleware_services:\n{defs}\
         middlewares: [{global}]\n\
         host_rules:\n  - pattern: \"*\"\n    target: web\n    middlewares: [{host_mw}]\n\
         \x20   route_rules:\n      - pattern: /r/*\n        target: web\n        middlewares: [{route_mw}]\n",
        origin.url()
    )
}

fn values(response: &reqwest::Response, name: &str) -> Vec<String> {
    response
        .headers()
        .get_all(name)
        .iter()
        .map(|v| v.to_str().unwrap_or_default().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn chain_runs_global_host_route_by_priority_and_each_instance_once() {
    let origin = Origin::plain("ok").await;
    let mark = |name: &str, priority: i32| {
        format!(
            "  - {{ name: {name}, type: headers, priority: {priority}, \
             config: {{ response: {{ add: {{ x-chain: {name} }} }} }} }}\n"
        )
    };
    let defs = [
        mark("g_low", 0),
        mark("g_high", 5),
        mark("h", 0),
        mark("r_low", -1),
        mark("r_high", 100),
        "  - { name: off, type: headers, enabled: false, config: { response: { add: { x-chain: off } } } }\n".into(),
    ]
    .concat();
    let proxy = Proxy::start(&config(
        &origin,
        &defs,
        "g_low, g_high",
        "h, g_low, off",
        "r_low, r_high, h",
    ))
    .await;
    let response = client()
        .get(proxy.url("/r/x"))
        .send()
        .await
        .expect("response");
    assert_eq!(
        values(&response, "x-chain"),
        ["g_high", "g_low", "h", "r_high", "r_low"]
    );
    let response = client()
        .get(proxy.url("/other"))
        .send()
        .await
        .expect("response");
    assert_eq!(values(&response, "x-chain"), ["g_high", "g_low", "h"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_direct_answer_skips_the_origin_but_response_hooks_still_run() {
    let mut origin = Origin::plain("ok").await;
    let defs = "  - { name: cors, type: cors }\n\
                \x20 - { name: auth, type: api_key, config: { keys: [k1] } }\n\
                \x20 - { name: hdr, type: headers, config: { response: { set: { x-edge: yes } } } }\n";
    let proxy = Proxy::start(&config(&origin, defs, "cors, auth, hdr", "", "")).await;
    let refused = client()
        .get(proxy.url("/"))
        .header("origin", "https://app.test")
        .send()
        .await
        .expect("response");
    assert_eq!(refused.status(), 401);
    assert_eq!(refused.headers()["access-control-allow-origin"], "*");
    assert_eq!(
        refused.headers()["x-edge"],
        "yes",
        "hooks after the answering one still run"
    );
    let ok = client()
        .get(proxy.url("/"))
        .header("x-api-key", "k1")
        .send()
        .await
        .expect("response");
    assert_eq!(ok.status(), 200);
    // Only the authorised request reached the origin.
    let head = origin.next_request().await;
    assert_eq!(head.target, "/");
    assert_eq!(head.header("x-api-key"), None, "the key is not passed on");
    assert!(origin.requests.try_recv().is_err());
}

#[tokio::test(flavor = "multi_thread")]
async fn headers_change_what_origin_and_client_see() {
    let origin = Origin::start(|_, mut conn| async move {
        let head = "HTTP/1.1 200 OK\r\nserver: secret-origin\r\ncontent-length: 2\r\n\r\nok";
        match conn.write(head.as_bytes()).await {
            Ok(()) => After::KeepAlive(conn),
            Err(_) => After::Close,
        }
    })
    .await;
    let mut origin = origin;
    let defs = "  - name: hdr\n    type: headers\n    config:\n      request:\n        \
                set: { x-env: prod }\n        add: { x-trace: edge }\n        remove: [cookie]\n      \
                response:\n        set: { x-frame-options: DENY }\n        remove: [server]\n";
    let proxy = Proxy::start(&config(&origin, defs, "hdr", "", "")).await;
    let response = client()
        .get(proxy.url("/"))
        .header("cookie", "session=1")
        .header("x-trace", "client")
        .send()
        .await
        .expect("response");
    assert_eq!(response.headers()["x-frame-options"], "DENY");
    assert!(response.headers().get("server").is_none());
    let head = origin.next_request().await;
    assert_eq!(head.header("x-env"), Some("prod"));
    assert!(head.header("cookie").is_none());
    let traces: Vec<_> = head
        .headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case("x-trace"))
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(traces, ["client", "edge"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn rewrite_changes_the_path_the_origin_sees() {
    let mut origin = Origin::plain("ok").await;
    let defs = "  - { name: rw, type: rewrite, config: { strip_prefix: /r, regex: { pattern: '^/u/([0-9]+)$', replacement: '/users/$1' } } }\n";
    let proxy = Proxy::start(&config(&origin, defs, "", "", "rw")).await;
    assert!(client()
        .get(proxy.url("/r/u/42?x=1"))
        .send()
        .await
        .expect("r")
        .status()
        .is_success());
    assert_eq!(origin.next_request().await.target, "/users/42?x=1");
    assert!(client()
        .get(proxy.url("/r/other"))
        .send()
        .await
        .expect("r")
        .status()
        .is_success());
    assert_eq!(origin.next_request().await.target, "/other");
}

#[tokio::test(flavor = "multi_thread")]
async fn redirect_answers_with_the_templated_location() {
    let origin = Origin::plain("ok").await;
    let defs = "  - { name: https, type: redirect, config: { status: 308, location: 'https://{host}{path}{query}' } }\n";
    let proxy = Proxy::start(&config(&origin, defs, "", "", "https")).await;
    let no_follow = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let response = no_follow
        .get(proxy.url("/r/a?b=1"))
        .header("host", "shop.test:8080")
        .send()
        .await
        .expect("response");
    assert_eq!(response.status(), 308);
    assert_eq!(response.headers()["location"], "https://shop.test/r/a?b=1");
    // Routes without it are proxied.
    assert_eq!(
        client()
            .get(proxy.url("/x"))
            .send()
            .await
            .expect("r")
            .status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn ip_filter_denies_and_trusts_forwarded_for_only_from_trusted_proxies() {
    let origin = Origin::plain("ok").await;
    let defs = "  - { name: deny_local, type: ip_filter, config: { deny: [127.0.0.0/8] } }\n\
                \x20 - { name: allow_office, type: ip_filter, config: { allow: [198.51.100.0/24] } }\n";
    let proxy = Proxy::start(&config(&origin, defs, "", "", "deny_local")).await;
    let denied = client().get(proxy.url("/r/x")).send().await.expect("r");
    assert_eq!(denied.status(), 403);
    assert_eq!(
        client()
            .get(proxy.url("/x"))
            .send()
            .await
            .expect("r")
            .status(),
        200
    );

    let trusted = "trusted_proxies: [127.0.0.1]\n".to_string();
    let proxy = Proxy::start(&(trusted + &config(&origin, defs, "", "allow_office", ""))).await;
    let via_office = client()
        .get(proxy.url("/x"))
        .header("x-forwarded-for", "198.51.100.9")
        .send()
        .await
        .expect("r");
    assert_eq!(via_office.status(), 200, "127.0.0.1 is a trusted proxy");
    let spoofed = client()
        .get(proxy.url("/x"))
        .header("x-forwarded-for", "198.51.100.9, 203.0.113.1")
        .send()
        .await
        .expect("r");
    assert_eq!(
        spoofed.status(),
        403,
        "the nearest untrusted hop is the client"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn behind_a_trusted_proxy_forged_forwarded_for_lines_do_not_escape_a_rate_limit() {
    let mut origin = Origin::plain("ok").await;
    let defs = "  - { name: rl, type: rate_limit, config: { rate: 0.01, burst: 2 } }\n";
    // The test plays the load balancer (127.0.0.1, trusted): it appends the address it
    // saw as the last X-Forwarded-For line, after whatever the client sent.
    let trusted = "trusted_proxies: [127.0.0.1]\n".to_string();
    let proxy = Proxy::start(&(trusted + &config(&origin, defs, "rl", "", ""))).await;
    let send = |lines: Vec<String>| {
        let mut request = client().get(proxy.url("/x"));
        for line in lines {
            request = request.header("x-forwarded-for", line);
        }
        async move { request.send().await.expect("answer").status().as_u16() }
    };
    let mut statuses = Vec::new();
    for n in 0..4 {
        // Two forged lines, new addresses each time (one of them a "trusted" one), then
        // the balancer's: the client is 198.51.100.7 (once written IPv4-mapped).
        let real = if n == 1 {
            "::ffff:198.51.100.7"
        } else {
            "198.51.100.7"
        };
        statuses.push(
            send(vec![
                format!("203.0.113.{n}, 10.0.0.{n}"),
                format!("127.0.0.1, 192.0.2.{n}"),
                real.to_string(),
            ])
            .await,
        );
    }
    assert_eq!(
        statuses,
        [200, 200, 429, 429],
        "one bucket for 198.51.100.7"
    );
    // Another client behind the same balancer has a bucket of its own.
    assert_eq!(send(vec!["198.51.100.8".into()]).await, 200);
    // The origin is told who the client is, and the whole chain of addresses.
    let head = origin.next_request().await;
    assert_eq!(head.header("x-real-ip"), Some("198.51.100.7"));
    assert_eq!(
        head.header("x-forwarded-for"),
        Some("203.0.113.0, 10.0.0.0, 127.0.0.1, 192.0.2.0, 198.51.100.7, 127.0.0.1")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_middleware_of_its_own_trusted_proxies_is_refused_at_its_key() {
    let origin = Origin::plain("ok").await;
    for (kind, setting) in [("ip_filter", "allow: []"), ("rate_limit", "rate: 1")] {
        let defs = format!(
            "  - name: m\n    type: {kind}\n    config:\n      {setting}\n      trusted_proxies: [127.0.0.1]\n"
        );
        let err = common::config_error(&format!(
            "listen: [\"127.0.0.1:1\"]\n{}",
            config(&origin, &defs, "", "", "")
        ));
        assert!(
            err.starts_with("test.yaml:10:7: `middleware_services[0].config.trusted_proxies`"),
            "{kind}: {err}"
        );
        assert!(err.contains("at the top level"), "{kind}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn basic_auth_challenges_and_admits() {
    let origin = Origin::plain("ok").await;
    let defs =
        "  - { name: auth, type: basic_auth, config: { realm: ops, users: { alice: s3cret } } }\n";
    let proxy = Proxy::start(&config(&origin, defs, "auth", "", "")).await;
    let refused = client().get(proxy.url("/")).send().await.expect("r");
    assert_eq!(refused.status(), 401);
    assert_eq!(refused.headers()["www-authenticate"], "Basic realm=\"ops\"");
    let wrong = client()
        .get(proxy.url("/"))
        .basic_auth("alice", Some("nope"))
        .send()
        .await
        .expect("r");
    assert_eq!(wrong.status(), 401);
    let ok = client()
        .get(proxy.url("/"))
        .basic_auth("alice", Some("s3cret"))
        .send()
        .await
        .expect("r");
    assert_eq!(ok.status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn api_key_in_header_or_query() {
    let mut origin = Origin::plain("ok").await;
    let defs =
        "  - { name: key, type: api_key, config: { header: x-key, query: key, keys: [abc] } }\n";
    let proxy = Proxy::start(&config(&origin, defs, "key", "", "")).await;
    let status = |path: &'static str, key: Option<&'static str>| {
        let url = proxy.url(path);
        async move {
            let mut req = client().get(url);
            if let Some(k) = key {
                req = req.header("x-key", k);
            }
            req.send().await.expect("r").status().as_u16()
        }
    };
    assert_eq!(status("/", None).await, 401);
    assert_eq!(status("/", Some("abd")).await, 401);
    assert_eq!(status("/", Some("abc")).await, 200);
    assert_eq!(
        origin.next_request().await.header("x-key"),
        None,
        "the key is the proxy's: its header is taken out"
    );
    assert_eq!(status("/?a=1&key=abc", None).await, 200);
    assert_eq!(
        origin.next_request().await.target,
        "/?a=1",
        "and the query's"
    );
    let refused = client().get(proxy.url("/")).send().await.expect("r");
    assert_eq!(
        refused.headers()["www-authenticate"],
        "ApiKey header=\"x-key\"",
        "a 401 names its challenge"
    );

    // An origin that wants the key gets it when asked.
    let defs = "  - { name: key, type: api_key, config: { header: x-key, keys: [abc], strip_header: false } }\n";
    let proxy = Proxy::start(&config(&origin, defs, "key", "", "")).await;
    let kept = client()
        .get(proxy.url("/"))
        .header("x-key", "abc")
        .send()
        .await
        .expect("r");
    assert_eq!(kept.status(), 200);
    assert_eq!(origin.next_request().await.header("x-key"), Some("abc"));
}

#[tokio::test(flavor = "multi_thread")]
async fn rate_limit_refuses_with_retry_after_and_counts_stream_opens_not_events() {
    let origin = Origin::start(|head, mut conn| async move {
        if head.target.starts_with("/r/") {
            conn.sse_head().await.expect("head");
            for i in 0..5 {
                conn.chunk(&format!("data: {i}\n\n")).await.expect("event");
            }
            conn.end().await.expect("end");
            return After::Close;
        }
        match conn.respond(200, "ok").await {
            Ok(()) => After::KeepAlive(conn),
            Err(_) => After::Close,
        }
    })
    .await;
    let defs = "  - { name: rl, type: rate_limit, config: { rate: 0.01, burst: 2 } }\n\
                \x20 - { name: streams, type: rate_limit, config: { rate: 0.01, burst: 1, key: 'header:x-user' } }\n";
    let proxy = Proxy::start(&config(&origin, defs, "", "rl", "streams")).await;
    assert_eq!(
        client()
            .get(proxy.url("/a"))
            .send()
            .await
            .expect("r")
            .status(),
        200
    );
    assert_eq!(
        client()
            .get(proxy.url("/a"))
            .send()
            .await
            .expect("r")
            .status(),
        200
    );
    let limited = client().get(proxy.url("/a")).send().await.expect("r");
    assert_eq!(limited.status(), 429);
    let retry: u64 = limited.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!(retry >= 1);

    // On the stream route the host-level limiter is spent too, so use a fresh proxy where
    // only the per-user stream limiter applies.
    let proxy = Proxy::start(&config(&origin, defs, "", "", "streams")).await;
    let stream = client()
        .get(proxy.url("/r/events"))
        .header("x-user", "u1")
        .header("accept", "text/event-stream")
        .send()
        .await
        .expect("r");
    assert_eq!(stream.status(), 200);
    let mut events = Events::new(stream);
    for i in 0..5 {
        assert_eq!(
            events.next().await,
            Some(format!("data: {i}")),
            "events are not limited"
        );
    }
    let second = client()
        .get(proxy.url("/r/events"))
        .header("x-user", "u1")
        .header("accept", "text/event-stream")
        .send()
        .await
        .expect("r");
    assert_eq!(second.status(), 429, "a second stream open is");
    let other_user = client()
        .get(proxy.url("/r/events"))
        .header("x-user", "u2")
        .send()
        .await
        .expect("r");
    assert_eq!(other_user.status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn cors_answers_preflights_and_marks_sse_responses() {
    let mut origin = Origin::start(|_, mut conn| async move {
        conn.sse_head().await.expect("head");
        conn.chunk("data: hi\n\n").await.expect("event");
        conn.end().await.expect("end");
        After::Close
    })
    .await;
    let defs = "  - name: cors\n    type: cors\n    config:\n      allow_origins: [\"https://app.test\"]\n      \
                allow_methods: [GET]\n      allow_credentials: true\n      expose_headers: [x-request-id]\n      max_age: 10m\n";
    let proxy = Proxy::start(&config(&origin, defs, "cors", "", "")).await;
    let preflight = client()
        .request(reqwest::Method::OPTIONS, proxy.url("/events"))
        .header("origin", "https://app.test")
        .header("access-control-request-method", "GET")
        .header("access-control-request-headers", "last-event-id")
        .send()
        .await
        .expect("r");
    assert_eq!(preflight.status(), 204);
    let h = preflight.headers();
    assert_eq!(h["access-control-allow-origin"], "https://app.test");
    assert_eq!(h["access-control-allow-methods"], "GET");
    assert_eq!(h["access-control-allow-headers"], "last-event-id");
    assert_eq!(h["access-control-allow-credentials"], "true");
    assert_eq!(h["access-control-max-age"], "600");
    let stranger = client()
        .request(reqwest::Method::OPTIONS, proxy.url("/events"))
        .header("origin", "https://evil.test")
        .header("access-control-request-method", "GET")
        .send()
        .await
        .expect("r");
    assert_eq!(stranger.status(), 403);
    assert!(
        origin.requests.try_recv().is_err(),
        "preflights never reach the origin"
    );

    let stream = client()
        .get(proxy.url("/events"))
        .header("origin", "https://app.test")
        .header("accept", "text/event-stream")
        .send()
        .await
        .expect("r");
    assert_eq!(
        stream.headers()["access-control-allow-origin"],
        "https://app.test"
    );
    assert_eq!(
        stream.headers()["access-control-expose-headers"],
        "x-request-id"
    );
    assert_eq!(stream.headers()["content-type"], "text/event-stream");
    let mut events = Events::new(stream);
    assert_eq!(events.next().await.as_deref(), Some("data: hi"));
}

#[tokio::test(flavor = "multi_thread")]
async fn request_id_is_set_passed_on_and_returned() {
    let mut origin = Origin::plain("ok").await;
    let defs = "  - { name: ids, type: request_id }\n";
    let proxy = Proxy::start(&config(&origin, defs, "ids", "", "")).await;
    let response = client().get(proxy.url("/")).send().await.expect("r");
    let id = response.headers()["x-request-id"]
        .to_str()
        .expect("ascii")
        .to_string();
    assert_eq!(id.len(), 36, "a UUID: {id}");
    assert_eq!(
        origin.next_request().await.header("x-request-id"),
        Some(id.as_str())
    );
    let kept = client()
        .get(proxy.url("/"))
        .header("x-request-id", "abc-123")
        .send()
        .await
        .expect("r");
    assert_eq!(kept.headers()["x-request-id"], "abc-123");
    assert_eq!(
        origin.next_request().await.header("x-request-id"),
        Some("abc-123")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn request_size_limit_refuses_large_bodies() {
    let mut origin = Origin::start(|head, mut conn| async move {
        // Read and discard the body (with its length, or chunked to its last chunk), then
        // answer.
        use tokio::io::{AsyncBufReadExt, AsyncReadExt};
        if head.header("transfer-encoding").is_some() {
            let mut line = String::new();
            loop {
                line.clear();
                if conn.reader.read_line(&mut line).await.unwrap_or(0) == 0 {
                    return After::Close;
                }
                let size = usize::from_str_radix(line.trim(), 16).unwrap_or(0);
                let mut data = vec![0u8; size + 2];
                if conn.reader.read_exact(&mut data).await.is_err() {
                    return After::Close;
                }
                if size == 0 {
                    break;
                }
            }
        }
        let len: usize = head
            .header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0u8; len];
        if conn.reader.read_exact(&mut body).await.is_err() {
            return After::Close;
        }
        match conn.respond(200, "ok").await {
            Ok(()) => After::KeepAlive(conn),
            Err(_) => After::Close,
        }
    })
    .await;
    let defs = "  - { name: small, type: request_size_limit, config: { max: 1KiB } }\n";
    let proxy = Proxy::start(&config(&origin, defs, "small", "", "")).await;
    let ok = client()
        .post(proxy.url("/"))
        .body(vec![b'a'; 1024])
        .send()
        .await
        .expect("r");
    assert_eq!(ok.status(), 200);
    origin.next_request().await;
    let big = client()
        .post(proxy.url("/"))
        .body(vec![b'a'; 1025])
        .send()
        .await
        .expect("r");
    assert_eq!(big.status(), 413);
    assert!(
        origin.requests.try_recv().is_err(),
        "refused before the origin"
    );

    // A chunked body has no declared length: it is counted as it streams. The client is
    // still sending when the 413 is written; the proxy reads the rest of the body before
    // it closes, so the close is not a reset that could discard the answer unread.
    for _ in 0..10 {
        let chunks = futures_util::stream::iter(
            (0..64).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b'b'; 16 * 1024]))),
        );
        let streamed = client()
            .post(proxy.url("/"))
            .body(reqwest::Body::wrap_stream(chunks))
            .send()
            .await
            .expect("the 413, not a reset");
        assert_eq!(streamed.status(), 413);
        assert!(streamed
            .text()
            .await
            .expect("body")
            .contains("larger than 1024"));
    }
    assert!(
        origin.requests.try_recv().is_err(),
        "refused before the origin"
    );

    // Pieces within the limit are gathered (`request_buffer`), not sent on, and counted as
    // they come: a body refused at its second piece never reached the origin at all.
    let pieces = futures_util::stream::iter(
        (0..2).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b'c'; 600]))),
    );
    let refused = client()
        .post(proxy.url("/"))
        .body(reqwest::Body::wrap_stream(pieces))
        .send()
        .await
        .expect("the 413");
    assert_eq!(refused.status(), 413);
    assert!(
        origin.requests.try_recv().is_err(),
        "a body refused at its second piece sent nothing"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sse_middleware_limits_open_streams_and_frees_slots_when_streams_end() {
    let (release_tx, release_rx) = mpsc::unbounded_channel::<()>();
    let release_rx = Arc::new(Mutex::new(release_rx));
    let origin = Origin::start(move |_, mut conn| {
        let release_rx = release_rx.clone();
        async move {
            conn.sse_head().await.expect("head");
            conn.chunk("data: open\n\n").await.expect("event");
            let _ = release_rx.lock().await.recv().await;
            let _ = conn.end().await;
            After::Close
        }
    })
    .await;
    let defs = "  - { name: one_stream, type: sse, config: { max_connections: 1, connection_tracking: true } }\n";
    let proxy = Proxy::start(&config(&origin, defs, "", "", "one_stream")).await;
    let open = || {
        client()
            .get(proxy.url("/r/events"))
            .header("accept", "text/event-stream")
            .send()
    };
    let first = open().await.expect("r");
    assert_eq!(first.status(), 200);
    let mut events = Events::new(first);
    assert_eq!(events.next().await.as_deref(), Some("data: open"));
    let refused = open().await.expect("r");
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers()["retry-after"], "5");
    // Ordinary requests on the route are not streams and are not counted.
    assert_eq!(
        client()
            .get(proxy.url("/plain"))
            .send()
            .await
            .expect("r")
            .status(),
        200
    );

    release_tx.send(()).expect("release");
    assert_eq!(events.next().await, None);
    // The slot is free once the first stream has ended.
    let second = guard("a slot to free up", async {
        loop {
            let r = open().await.expect("r");
            if r.status() == 200 {
                return r;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    let mut events = Events::new(second);
    assert_eq!(events.next().await.as_deref(), Some("data: open"));
    release_tx.send(()).expect("release");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_typical_sse_config_runs_as_written() {
    let mut origin = Origin::start(|_, mut conn| async move {
        conn.sse_head().await.expect("head");
        conn.chunk("data: from the example\n\n")
            .await
            .expect("event");
        conn.end().await.expect("end");
        After::Close
    })
    .await;
    let example = include_str!("../fixtures/sse_example.yaml")
        .replace("http://backend-sse:8080", &origin.url())
        .replace("    port: 80\n", "");
    let proxy = Proxy::start(&example).await;
    let response = client()
        .get(proxy.url("/events/live"))
        .header("host", "sse.example.com")
        .header("accept", "text/event-stream")
        .send()
        .await
        .expect("r");
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-accel-buffering"], "no");
    let mut events = Events::new(response);
    assert_eq!(
        events.next().await.as_deref(),
        Some("data: from the example")
    );
    assert_eq!(origin.next_request().await.target, "/events/live");
}

#[tokio::test(flavor = "multi_thread")]
async fn body_replace_rewrites_a_live_stream_event_by_event() {
    let (origin, ack) =
        lockstep(4, |i| format!("id: {i}\ndata: http://internal.svc/{i}\n\n")).await;
    let defs = "  - { name: rw, type: body_replace, config: { replacements: [{ literal: 'http://internal.svc', with: 'https://api.test' }] } }\n";
    let proxy = Proxy::start(&config(&origin, defs, "rw", "", "")).await;
    let response = sse_get(proxy.url("/events")).await;
    assert!(response.headers().get("content-length").is_none());
    let mut events = Events::new(response);
    for i in 0..4 {
        assert_eq!(
            events.next().await,
            Some(format!("id: {i}\ndata: https://api.test/{i}")),
            "each event arrives rewritten before the origin sends the next"
        );
        ack.send(()).expect("ack");
    }
    assert_eq!(events.next().await, None);
}

#[tokio::test(flavor = "multi_thread")]
async fn body_replace_finds_matches_split_across_chunks() {
    let origin = Origin::start(|_, mut conn| async move {
        conn.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ntransfer-encoding: chunked\r\n\r\n",
        )
        .await
        .expect("head");
        for piece in [
            "<a href=\"http://inter",
            "nal.svc/a\">",
            "x</a> http://internal.s",
            "vc",
        ] {
            conn.chunk(piece).await.expect("chunk");
            tokio::task::yield_now().await;
        }
        conn.end().await.expect("end");
        After::Close
    })
    .await;
    let defs = "  - { name: rw, type: body_replace, config: { replacements: [{ literal: 'http://internal.svc', with: 'https://api.test' }] } }\n";
    let proxy = Proxy::start(&config(&origin, defs, "rw", "", "")).await;
    let text = client()
        .get(proxy.url("/"))
        .send()
        .await
        .expect("r")
        .text()
        .await
        .expect("body");
    assert_eq!(
        text,
        "<a href=\"https://api.test/a\">x</a> https://api.test"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn compress_on_sse_flushes_so_each_event_decodes_on_arrival() {
    let (origin, ack) = lockstep(4, |i| format!("data: event {i} {}\n\n", "x".repeat(200))).await;
    let defs = "  - { name: gz, type: compress, config: { algorithms: [gzip], sse: true } }\n";
    let proxy = Proxy::start(&config(&origin, defs, "gz", "", "")).await;
    let mut response = sse_get_gzip(proxy.url("/events")).await;
    assert_eq!(response.headers()["content-encoding"], "gzip");
    assert!(response.headers().get("content-length").is_none());
    let mut wire = Vec::new();
    for i in 0..4 {
        let want = format!("data: event {i} ");
        guard("the compressed event to decode", async {
            loop {
                let chunk = response.chunk().await.expect("read").expect("more data");
                wire.extend_from_slice(&chunk);
                if gunzip_prefix(&wire).contains(&want) {
                    break;
                }
            }
        })
        .await;
        ack.send(()).expect("ack");
    }
    while let Some(chunk) = response.chunk().await.expect("read") {
        wire.extend_from_slice(&chunk);
    }
    let mut all = String::new();
    use std::io::Read;
    flate2::read::GzDecoder::new(&wire[..])
        .read_to_string(&mut all)
        .expect("a complete gzip stream");
    assert_eq!(all.matches("data: event").count(), 4);
}

/// Events whose lines end in a lone CR (the event-stream format allows LF, CR or CRLF):
/// each reaches the client before the origin sends the next on every path that holds bytes
/// back until an event is whole: `compress` with `sse: true` (flushed per event),
/// `body_replace` (rewritten per event) and `resume` (only whole events sent). A trailing
/// CR ends its line; waiting to see whether an LF follows would hold every such event
/// until the next one, and lose the last one when the origin ends.
#[tokio::test(flavor = "multi_thread")]
async fn events_ending_in_a_lone_cr_are_not_held_back() {
    let compress = "middleware_services:\n  - { name: gz, type: compress, config: { algorithms: [gzip], sse: true } }\nmiddlewares: [gz]\n";
    let replace = "middleware_services:\n  - { name: rw, type: body_replace, config: { replacements: [{ literal: internal.svc, with: api.test }] } }\nmiddlewares: [rw]\n";
    let resume = "    sse: { resume: true }\n";
    for (case, service, chain) in [
        ("compress", "", compress),
        ("body_replace", "", replace),
        ("resume", resume, ""),
    ] {
        let (origin, ack) = lockstep(4, |i| format!("id: {i}\rdata: internal.svc {i}\r\r")).await;
        let config = format!(
            "services:\n  web:\n    url: \"{}\"\n{service}{chain}\
             host_rules:\n  - pattern: \"*\"\n    target: web\n",
            origin.url()
        );
        let proxy = Proxy::start(&config).await;
        let mut response = sse_get_gzip(proxy.url("/events")).await;
        let mut wire = Vec::new();
        for i in 0..4 {
            let host = if case == "body_replace" {
                "api.test"
            } else {
                "internal.svc"
            };
            let want = format!("id: {i}\rdata: {host} {i}\r\r");
            guard(
                &format!("{case}: event {i} before the origin sends the next"),
                async {
                    loop {
                        let text = if case == "compress" {
                            gunzip_prefix(&wire)
                        } else {
                            String::from_utf8_lossy(&wire).into_owned()
                        };
                        if text.contains(&want) {
                            break;
                        }
                        let chunk = response.chunk().await.expect("read");
                        wire.extend_from_slice(&chunk.expect("the stream goes on"));
                    }
                },
            )
            .await;
            ack.send(()).expect("ack");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn compress_leaves_sse_alone_by_default_and_compresses_pages() {
    let origin = Origin::start(|head, mut conn| async move {
        if head.target == "/events" {
            conn.sse_head().await.expect("head");
            conn.chunk("data: plain\n\n").await.expect("event");
            conn.end().await.expect("end");
            return After::Close;
        }
        let page = "<p>hello</p>".repeat(200);
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: {}\r\n\r\n{page}",
            page.len()
        );
        conn.write(head.as_bytes()).await.expect("page");
        After::Close
    })
    .await;
    let defs = "  - { name: c, type: compress }\n";
    let proxy = Proxy::start(&config(&origin, defs, "c", "", "")).await;
    let sse = client()
        .get(proxy.url("/events"))
        .header("accept-encoding", "gzip, br")
        .send()
        .await
        .expect("r");
    assert!(sse.headers().get("content-encoding").is_none());
    let page = client()
        .get(proxy.url("/page"))
        .header("accept-encoding", "gzip, br")
        .send()
        .await
        .expect("r");
    assert_eq!(page.headers()["content-encoding"], "br");
    assert_eq!(page.headers()["vary"], "accept-encoding");
    let bytes = page.bytes().await.expect("body");
    let mut text = String::new();
    use std::io::Read;
    brotli::Decompressor::new(&bytes[..], 4096)
        .read_to_string(&mut text)
        .expect("brotli");
    assert_eq!(text, "<p>hello</p>".repeat(200));
}

/// An event stream asked for by a client that takes gzip.
async fn sse_get_gzip(url: String) -> reqwest::Response {
    client()
        .get(url)
        .header("accept", "text/event-stream")
        .header("accept-encoding", "gzip")
        .send()
        .await
        .expect("the proxy answers")
}

fn gunzip_prefix(wire: &[u8]) -> String {
    use std::io::Read;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let mut d = flate2::read::GzDecoder::new(wire);
    while let Ok(n) = d.read(&mut buf) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// An authentication service for `forward_auth`: `Bearer good` is alice (2xx, naming her
/// in `x-user-id`), anything else a `401` with a challenge, a cookie and a body.
async fn auth_service() -> Origin {
    Origin::start(|head, mut conn| async move {
        let answer = match head.header("authorization") {
            Some("Bearer good") => {
                "HTTP/1.1 204 No Content\r\nx-user-id: alice\r\nx-other: kept back\r\n\
                 set-cookie: session=renewed\r\n\r\n"
                    .to_string()
            }
            _ => {
                let body = "sign in first";
                format!(
                    "HTTP/1.1 401 Unauthorized\r\nwww-authenticate: Bearer realm=\"feed\"\r\n\
                     set-cookie: next=/page\r\nkeep-alive: timeout=99\r\n\
                     content-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                )
            }
        };
        match conn.write(answer.as_bytes()).await {
            Ok(()) => After::KeepAlive(conn),
            Err(_) => After::Close,
        }
    })
    .await
}

/// `forward_auth`: every request, plain or an LLM's `POST` event stream, is first put to
/// the auth service (through the service's URL path, with the client's credentials and
/// where it was going); a 2xx lets it through with the user the service named (what the
/// client sent under that name never arrives), anything else is the client's answer as
/// the service gave it, its requests are counted under the middleware's own route, and
/// an auth service that cannot be reached is a 502 naming the middleware and service.
#[tokio::test(flavor = "multi_thread")]
async fn forward_auth_asks_the_auth_service_first() {
    let mut auth = auth_service().await;
    let mut origin = Origin::post_streams("hello").await;
    let dead = common::free_port();
    let proxy = Proxy::start_h2c(&format!(
        "services:\n  app: {{ url: \"{}\" }}\n  auth: {{ url: \"{}/auth\" }}\n  \
         dead: {{ url: \"http://127.0.0.1:{dead}\" }}\n\
         middleware_services:\n  - name: sso\n    type: forward_auth\n    config: \
         {{ service: auth, path: /verify, response_headers: [x-user-id], \
         client_headers: [set-cookie] }}\n  \
         - {{ name: down, type: forward_auth, config: {{ service: dead }} }}\n\
         host_rules:\n  - pattern: \"*\"\n    target: app\n    middlewares: [sso]\n    \
         route_rules:\n      - {{ pattern: /down, target: app, middlewares: [down] }}\n",
        origin.url(),
        auth.url()
    ))
    .await;

    let ok = client()
        .get(proxy.url("/page?q=1"))
        .header("authorization", "Bearer good")
        .header("x-user-id", "mallory")
        .send()
        .await
        .expect("answer");
    assert_eq!(ok.status(), 200);
    assert_eq!(
        ok.headers()["set-cookie"],
        "session=renewed",
        "client_headers reach the client"
    );
    assert_eq!(ok.text().await.expect("body"), "hello");
    let asked = auth.next_request().await;
    assert_eq!(
        (asked.method.as_str(), asked.target.as_str()),
        ("GET", "/auth/verify")
    );
    for (name, value) in [
        ("host", auth.addr.to_string()),
        ("authorization", "Bearer good".into()),
        ("x-forwarded-method", "GET".into()),
        ("x-forwarded-proto", "http".into()),
        ("x-forwarded-host", proxy.addr.to_string()),
        ("x-forwarded-uri", "/page?q=1".into()),
        ("x-forwarded-for", "127.0.0.1".into()),
    ] {
        assert_eq!(asked.header(name), Some(value.as_str()), "{name}");
    }
    assert_eq!(asked.header("x-user-id"), None);
    let seen = origin.next_request().await;
    assert_eq!(
        seen.headers_named("x-user-id"),
        ["alice"],
        "the spoofed one is gone"
    );
    assert_eq!(seen.header("x-other"), None, "only the headers named pass");

    // An LLM's request: a POST answered by an event stream, authenticated first, over
    // HTTP/1.1 and over HTTP/2 (h2c).
    let h2c = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .expect("client");
    for (client, version) in [(client(), "1.1"), (h2c, "2")] {
        let stream = client
            .post(proxy.url("/v1/chat"))
            .header("authorization", "Bearer good")
            .header("accept", "text/event-stream")
            .body("{\"prompt\":\"hi\"}")
            .send()
            .await
            .expect("answer");
        assert_eq!(stream.status(), 200, "HTTP/{version}");
        assert_eq!(stream.headers()["set-cookie"], "session=renewed");
        assert_eq!(
            Events::new(stream).next().await.as_deref(),
            Some("data: token"),
            "HTTP/{version}"
        );
        assert_eq!(
            auth.next_request().await.header("x-forwarded-method"),
            Some("POST")
        );
        let seen = origin.next_request().await;
        assert_eq!(
            (seen.method.as_str(), seen.header("x-user-id")),
            ("POST", Some("alice")),
            "HTTP/{version}"
        );
    }

    // Refused: the auth service's answer, as it gave it (its hop-by-hop headers aside).
    let refused = sse_get(proxy.url("/events")).await;
    assert_eq!(refused.status(), 401);
    assert_eq!(
        refused.headers()["www-authenticate"],
        "Bearer realm=\"feed\""
    );
    assert_eq!(refused.headers()["set-cookie"], "next=/page");
    assert!(refused.headers().get("keep-alive").is_none());
    assert_eq!(refused.text().await.expect("body"), "sign in first");
    auth.next_request().await;
    assert!(
        origin.requests.try_recv().is_err(),
        "nothing reached the origin"
    );

    // The route's own chain runs after the host's: alice is let through by `sso`, then
    // `down` cannot reach its service.
    let down = client()
        .get(proxy.url("/down"))
        .header("authorization", "Bearer good")
        .send()
        .await
        .expect("answer");
    assert_eq!(down.status(), 502);
    assert_eq!(
        down.text().await.expect("body").trim_end(),
        "502 middleware `down`: service `dead`: the origin refused the connection"
    );

    let metrics = proxy.state.metrics.render();
    for line in [
        "streamgate_requests_total{class=\"2xx\",route=\"forward_auth:sso\",service=\"auth\"} 4",
        "streamgate_requests_total{class=\"4xx\",route=\"forward_auth:sso\",service=\"auth\"} 1",
        "streamgate_requests_total{class=\"5xx\",route=\"forward_auth:down\",service=\"dead\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} in:\n{metrics}");
    }
}

#[test]
fn forward_auth_settings_are_checked_at_load() {
    let text = |config: &str| {
        format!(
            "services:\n  auth: {{ url: \"http://127.0.0.1:9\" }}\n\
             middleware_services:\n  - name: sso\n    type: forward_auth\n    config: {config}\n"
        )
    };
    for (config, says) in [
        (
            "{ service: nope }",
            "no service `nope` (the services: auth)",
        ),
        (
            "{ service: auth, path: verify }",
            "`path: verify` must start with /",
        ),
        (
            "{ service: auth, response_headers: [x-forwarded-for] }",
            "`response_headers` cannot name `x-forwarded-for`",
        ),
        (
            "{ service: auth, response_headers: [Transfer-Encoding] }",
            "`response_headers` cannot name `transfer-encoding`: it frames or routes",
        ),
        (
            "{ service: auth, request_headers: [host] }",
            "`request_headers` cannot name `host`",
        ),
        (
            "{ service: auth, client_headers: [content-length] }",
            "`client_headers` cannot name `content-length`",
        ),
        (
            "{ service: auth, request_headers: [\"bad name\"] }",
            "`bad name` is not a valid header name",
        ),
        ("{ path: / }", "missing field `service`"),
    ] {
        let error = common::config_error(&text(config));
        assert!(
            error.contains("test.yaml:6:") && error.contains(says),
            "{config}: {error}"
        );
    }
}

/// A request body that arrives while the auth service is still deciding is left for the
/// origin, whole: watching the client for a close meanwhile would have read it.
#[tokio::test(flavor = "multi_thread")]
async fn forward_auth_leaves_a_body_that_comes_later_to_the_origin() {
    use tokio::io::AsyncWriteExt;
    let (decide, decisions) = mpsc::unbounded_channel::<()>();
    let decisions = Arc::new(Mutex::new(decisions));
    let mut auth = Origin::start(move |_, mut conn| {
        let decisions = decisions.clone();
        async move {
            decisions.lock().await.recv().await;
            match conn
                .write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                .await
            {
                Ok(()) => After::KeepAlive(conn),
                Err(_) => After::Close,
            }
        }
    })
    .await;
    let origin = Origin::start(|head, mut conn| async move {
        let body = conn.read_body(&head).await.unwrap_or_default();
        let echo = format!("got {}", String::from_utf8_lossy(&body));
        match conn.respond(200, &echo).await {
            Ok(()) => After::KeepAlive(conn),
            Err(_) => After::Close,
        }
    })
    .await;
    let proxy = Proxy::start(&format!(
        "services:\n  app: {{ url: \"{}\" }}\n  auth: {{ url: \"{}\" }}\n\
         middleware_services:\n  - {{ name: sso, type: forward_auth, config: {{ service: auth }} }}\n\
         middlewares: [sso]\nhost_rules:\n  - {{ pattern: \"*\", target: app }}\n",
        origin.url(),
        auth.url()
    ))
    .await;
    let mut conn = tokio::net::TcpStream::connect(proxy.addr)
        .await
        .expect("connect");
    conn.write_all(b"POST /v1/chat HTTP/1.1\r\nhost: x\r\ncontent-length: 13\r\n\r\n")
        .await
        .expect("head");
    auth.next_request().await;
    conn.write_all(b"{\"prompt\":1}\n").await.expect("body");
    // The body is in the proxy's socket before the auth service answers.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    decide.send(()).expect("decide");
    let answer = common::read_until(&mut conn, "the origin's answer", |got| {
        got.ends_with(b"got {\"prompt\":1}\n")
    })
    .await;
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
}

/// A refusal page passes through the chain's `compress` as any answer does (its body
/// compressed, as its header then says), a client's header spelled with underscores for a
/// `response_headers` name never reaches the origin, and an auth service that does not
/// answer within `timeout` is a 504 naming the middleware and the service.
#[tokio::test(flavor = "multi_thread")]
async fn forward_auth_refusals_are_compressed_and_slow_services_time_out() {
    let page = format!("<html>{}</html>", "please sign in ".repeat(200));
    let login = page.clone();
    let auth = Origin::start(move |head, mut conn| {
        let page = login.clone();
        async move {
            let answer = match head.header("authorization") {
                Some("Bearer good") => "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n".into(),
                _ => format!(
                    "HTTP/1.1 401 Unauthorized\r\ncontent-type: text/html\r\n\
                     content-length: {}\r\n\r\n{page}",
                    page.len()
                ),
            };
            match conn.write(answer.as_bytes()).await {
                Ok(()) => After::KeepAlive(conn),
                Err(_) => After::Close,
            }
        }
    })
    .await;
    // Accepts, reads the request, never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let silent_addr = silent.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = silent.accept().await {
            held.push(conn);
        }
    });
    let mut origin = Origin::plain("hello").await;
    let proxy = Proxy::start(&format!(
        "services:\n  app: {{ url: \"{}\" }}\n  auth: {{ url: \"{}\" }}\n  \
         silent: {{ url: \"http://{silent_addr}\" }}\n\
         middleware_services:\n  \
         - {{ name: sso, type: forward_auth, config: {{ service: auth, response_headers: [x-user-id] }} }}\n  \
         - {{ name: slow, type: forward_auth, config: {{ service: silent, timeout: 300ms }} }}\n  \
         - {{ name: zip, type: compress, config: {{ algorithms: [gzip], content_types: [text/html] }} }}\n\
         middlewares: [zip]\n\
         host_rules:\n  - pattern: \"*\"\n    target: app\n    middlewares: [sso]\n    \
         route_rules:\n      - {{ pattern: /slow, target: app, middlewares: [slow] }}\n",
        origin.url(),
        auth.url()
    ))
    .await;

    let refused = client()
        .get(proxy.url("/"))
        .header("accept-encoding", "gzip")
        .send()
        .await
        .expect("answer");
    assert_eq!(refused.status(), 401);
    assert_eq!(refused.headers()["content-encoding"], "gzip");
    let wire = refused.bytes().await.expect("body");
    assert!(wire.len() < page.len(), "compressed");
    assert_eq!(gunzip_prefix(&wire), page);

    let ok = client()
        .get(proxy.url("/"))
        .header("authorization", "Bearer good")
        .header("x_user_id", "mallory")
        .send()
        .await
        .expect("answer");
    assert_eq!(ok.status(), 200);
    let seen = origin.next_request().await;
    assert_eq!(
        seen.header("x_user_id"),
        None,
        "the disguised spelling is gone too"
    );

    let slow = client()
        .get(proxy.url("/slow"))
        .header("authorization", "Bearer good")
        .send()
        .await
        .expect("answer");
    assert_eq!(slow.status(), 504);
    assert_eq!(
        slow.text().await.expect("body").trim_end(),
        "504 middleware `slow`: service `silent`: no whole answer within 300ms"
    );
}
