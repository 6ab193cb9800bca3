//! Ordinary proxying, end to end: routing precedence, 404/502/504 with reasons,
//! forwarding headers, path prefixes, Host policy, keep-alive reuse.

use crate::common;

use std::time::Duration;

use common::{client, free_port, After, Origin, Proxy};

async fn get(proxy: &Proxy, host: &str, path: &str) -> (u16, String) {
    let response = client()
        .get(proxy.url(path))
        .header("host", host)
        .send()
        .await
        .expect("response");
    let status = response.status().as_u16();
    (status, response.text().await.expect("body"))
}

#[tokio::test(flavor = "multi_thread")]
async fn routing_precedence_across_hosts_and_paths() {
    let names = [
        "exact",
        "exact-events",
        "exact-live",
        "exact-special",
        "regex",
        "wild",
        "wild-deep",
        "any",
    ];
    let mut origins = Vec::new();
    for name in names {
        origins.push(Origin::plain(name).await);
    }
    let mut config = String::from("services:\n");
    for (name, origin) in names.iter().zip(&origins) {
        config.push_str(&format!("  {name}:\n    url: \"{}\"\n", origin.url()));
    }
    config.push_str(
        r#"host_rules:
  - pattern: "*"
    target: any
  - pattern: "*.example.com"
    target: wild
  - pattern: "*.deep.example.com"
    target: wild-deep
  - pattern: "api.example.com"
    target: exact
    route_rules:
      - pattern: "~^/events/live/[0-9]+$"
        target: regex
      - pattern: "/events/*"
        target: exact-events
      - pattern: "/events/live/*"
        target: exact-live
      - pattern: "/events/live/special"
        target: exact-special
"#,
    );
    let proxy = Proxy::start(&config).await;
    let cases = [
        ("api.example.com", "/", "exact"),
        ("API.EXAMPLE.COM:443", "/", "exact"),
        ("api.example.com", "/events", "exact-events"),
        ("api.example.com", "/events/x?y=1", "exact-events"),
        ("api.example.com", "/eventsx", "exact"),
        ("api.example.com", "/events/live/7", "exact-live"),
        ("api.example.com", "/events/live/special", "exact-special"),
        ("other.example.com", "/events/live/7", "wild"),
        ("x.deep.example.com", "/", "wild-deep"),
        ("example.com", "/", "any"),
        ("localhost", "/", "any"),
    ];
    for (host, path, want) in cases {
        let (status, body) = get(&proxy, host, path).await;
        assert_eq!((status, body.as_str()), (200, want), "{host}{path}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn regexes_apply_when_no_exact_or_prefix_matches() {
    let regex = Origin::plain("regex").await;
    let prefix = Origin::plain("prefix").await;
    let config = format!(
        r#"services:
  regex: {{ url: "{}" }}
  prefix: {{ url: "{}" }}
host_rules:
  - pattern: "*"
    route_rules:
      - pattern: "~^/v[0-9]+/stream$"
        target: regex
      - pattern: "/v1/*"
        target: prefix
"#,
        regex.url(),
        prefix.url()
    );
    let proxy = Proxy::start(&config).await;
    assert_eq!(get(&proxy, "h", "/v1/stream").await.1, "prefix");
    assert_eq!(get(&proxy, "h", "/v2/stream").await.1, "regex");
}

#[tokio::test(flavor = "multi_thread")]
async fn no_matching_rule_is_a_404_with_a_reason() {
    let origin = Origin::plain("ok").await;
    let config = format!(
        r#"services:
  web: {{ url: "{}" }}
host_rules:
  - pattern: "known.test"
    route_rules:
      - pattern: "/only"
        target: web
"#,
        origin.url()
    );
    let proxy = Proxy::start(&config).await;
    assert_eq!(get(&proxy, "known.test", "/only").await, (200, "ok".into()));
    let (status, body) = get(&proxy, "unknown.test", "/").await;
    assert_eq!(status, 404);
    assert!(body.contains("no route for host `unknown.test`"), "{body}");
    let (status, body) = get(&proxy, "known.test", "/other").await;
    assert_eq!(status, 404);
    assert!(body.contains("no route for path `/other`"), "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn refused_connection_is_a_502_naming_the_service() {
    let closed = free_port();
    let config = format!(
        "services:\n  gone:\n    url: \"http://127.0.0.1:{closed}\"\n\
         host_rules:\n  - pattern: \"*\"\n    target: gone\n"
    );
    let proxy = Proxy::start(&config).await;
    let (status, body) = get(&proxy, "h", "/").await;
    assert_eq!(status, 502);
    assert!(body.contains("service `gone`"), "{body}");
    assert!(body.contains("refused"), "{body}");
}

/// `client_bind_to_ipv4` (Pingora's, read by streamgate's own connect, which takes the
/// place of Pingora's): every connection to an origin is made from one of the addresses
/// given, for plain requests and event streams alike; an address that is not the host's
/// is a 502 with the reason; an entry that is not an address of its family is refused
/// with its file, line and key (Pingora's connector panicked on it at start).
#[tokio::test(flavor = "multi_thread")]
async fn connections_to_origins_are_made_from_client_bind_to_ipv4() {
    let (from_tx, mut from) = tokio::sync::mpsc::unbounded_channel();
    let origin = Origin::start(move |head, mut conn| {
        let from_tx = from_tx.clone();
        async move {
            let peer = conn.reader.get_ref().peer_addr().expect("peer");
            let _ = from_tx.send((head.target.clone(), peer.ip()));
            if head.header("accept") == Some("text/event-stream") {
                let _ = conn.sse_head().await;
                let _ = conn.chunk("data: one\n\n").await;
                let _ = conn.end().await;
            } else {
                let _ = conn.respond(200, "ok").await;
            }
            After::Close
        }
    })
    .await;
    let routes = format!(
        "services:\n  o:\n    url: \"{}\"\n    health_check: {{ path: /health, interval: 200ms }}\n\
         host_rules:\n  - {{ pattern: \"*\", target: o }}\n",
        origin.url()
    );
    let proxy = Proxy::start(&format!(
        "client_bind_to_ipv4: [\"127.0.0.2\", \"127.0.0.3\"]\n{routes}"
    ))
    .await;
    for _ in 0..32 {
        assert_eq!(get(&proxy, "h", "/plain").await, (200, "ok".into()));
    }
    let response = common::sse_get(proxy.url("/events")).await;
    let mut events = common::Events::new(response);
    assert_eq!(events.next().await.as_deref(), Some("data: one"));
    let expected: std::collections::HashSet<std::net::IpAddr> = ["127.0.0.2", "127.0.0.3"]
        .map(|ip| ip.parse().expect("ip"))
        .into();
    let mut seen = std::collections::HashMap::<String, std::collections::HashSet<_>>::new();
    // The requests' connections, and the health checks' (every 200 ms) from both too.
    common::guard("the health checks from both addresses", async {
        while seen.get("/health") != Some(&expected) || seen.len() < 3 {
            let (target, ip) = from.recv().await.expect("a connection");
            seen.entry(target).or_default().insert(ip);
        }
    })
    .await;
    assert_eq!(seen["/plain"], expected, "from each address given");
    assert!(
        seen.values().all(|ips| ips.is_subset(&expected)),
        "{seen:?}"
    );

    let bound = format!("client_bind_to_ipv4: [\"127.0.0.2\", \"127.0.0.3\"]\n{routes}");
    let described = streamgate::Config::from_text(
        std::path::Path::new("t.yaml"),
        &bound,
        std::path::Path::new("."),
    )
    .expect("loads")
    .describe();
    assert!(
        described.contains("connections to origins are made from: 127.0.0.2, 127.0.0.3 "),
        "{described}"
    );

    let unchecked = routes.replace("    health_check: { path: /health, interval: 200ms }\n", "");
    let away = Proxy::start(&format!(
        "client_bind_to_ipv4: [\"192.0.2.1\"]\n{unchecked}"
    ))
    .await;
    let (status, body) = get(&away, "h", "/").await;
    assert_eq!(status, 502, "{body}");
    let reason = format!(
        "service `o`: binding the connection to {} to 192.0.2.1: ",
        origin.addr
    );
    assert!(body.contains(&reason), "{body}");

    for (key, good, value) in [
        ("client_bind_to_ipv4", "127.0.0.9", "10.0.0.300"),
        ("client_bind_to_ipv4", "127.0.0.9", "::1"),
        ("client_bind_to_ipv6", "::1", "127.0.0.1"),
    ] {
        let error = common::config_error(&format!("{key}: [\"{good}\", \"{value}\"]\n"));
        assert!(
            error.contains("test.yaml:1:") && error.contains(&format!("`{key}[1]`")),
            "{error}"
        );
        assert!(
            error.contains(&format!("`{value}` is not an IPv")),
            "{error}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn silent_origin_is_a_504_naming_the_service() {
    let origin = Origin::start(|_, mut conn| async move {
        conn.closed().await;
        After::Close
    })
    .await;
    let config = format!(
        "services:\n  slow:\n    url: \"{}\"\n    timeouts: {{ read: 300ms }}\n\
         host_rules:\n  - pattern: \"*\"\n    target: slow\n",
        origin.url()
    );
    let proxy = Proxy::start(&config).await;
    let (status, body) = get(&proxy, "h", "/").await;
    assert_eq!(status, 504);
    assert!(body.contains("service `slow`"), "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn forwarding_headers_and_host_passthrough() {
    let mut origin = Origin::plain("ok").await;
    let config = format!(
        "services:\n  web:\n    url: \"{}\"\nhost_rules:\n  - pattern: \"*\"\n    target: web\n",
        origin.url()
    );
    let proxy = Proxy::start(&config).await;
    let response = client()
        .get(proxy.url("/p"))
        .header("host", "app.example.com")
        .header("x-forwarded-for", "203.0.113.9")
        .header("x-real-ip", "198.51.100.1")
        .send()
        .await
        .expect("response");
    assert_eq!(response.status(), 200);
    let head = origin.next_request().await;
    assert_eq!(head.header("host"), Some("app.example.com"));
    assert_eq!(
        head.header("x-forwarded-for"),
        Some("203.0.113.9, 127.0.0.1")
    );
    assert_eq!(head.header("x-real-ip"), Some("127.0.0.1"));
    assert_eq!(head.header("x-forwarded-proto"), Some("http"));
    assert_eq!(head.header("x-forwarded-host"), Some("app.example.com"));
}

/// The forwarding headers are written with the head; the chain's `headers` middleware
/// still removes, replaces and adds to them as it does to any header, each exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn the_chain_edits_forwarding_headers_like_any_other() {
    let mut origin = Origin::plain("ok").await;
    let config = format!(
        "services:\n  web:\n    url: \"{}\"\n\
         middleware_services:\n  - name: fwd\n    type: headers\n    config:\n\
         \x20     request:\n        remove: [x-real-ip]\n\
         \x20       set: {{ x-forwarded-proto: https }}\n\
         \x20       add: {{ x-forwarded-for: 192.0.2.1 }}\n\
         host_rules:\n  - pattern: \"*\"\n    target: web\n    middlewares: [fwd]\n",
        origin.url()
    );
    let proxy = Proxy::start(&config).await;
    let response = client()
        .get(proxy.url("/p"))
        .header("host", "app.example.com")
        .header("x-forwarded-proto", "ftp")
        .send()
        .await
        .expect("response");
    assert_eq!(response.status(), 200);
    let head = origin.next_request().await;
    let all = |name: &str| head.headers_named(name);
    assert_eq!(all("x-real-ip"), Vec::<&str>::new());
    assert_eq!(all("x-forwarded-proto"), ["https"]);
    assert_eq!(all("x-forwarded-for"), ["127.0.0.1", "192.0.2.1"]);
    assert_eq!(all("x-forwarded-host"), ["app.example.com"]);
    assert_eq!(all("host"), ["app.example.com"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn path_prefix_and_upstream_host_header() {
    let mut origin = Origin::plain("ok").await;
    let config = format!(
        "services:\n  api:\n    url: \"{}/base/\"\n    host_header: upstream\n\
         \x20 literal:\n    url: \"{}/v2\"\n    host_header: internal.svc\n\
         host_rules:\n  - pattern: \"*\"\n    target: api\n    route_rules:\n\
         \x20     - pattern: \"/lit/*\"\n        target: literal\n",
        origin.url(),
        origin.url()
    );
    let proxy = Proxy::start(&config).await;
    assert_eq!(get(&proxy, "a.test", "/x/y?q=1&r=2").await.0, 200);
    let head = origin.next_request().await;
    assert_eq!(head.target, "/base/x/y?q=1&r=2");
    assert_eq!(head.header("host"), Some(origin.addr.to_string().as_str()));
    assert_eq!(head.header("x-forwarded-host"), Some("a.test"));

    assert_eq!(get(&proxy, "a.test", "/").await.0, 200);
    assert_eq!(origin.next_request().await.target, "/base/");

    assert_eq!(get(&proxy, "a.test", "/lit/z").await.0, 200);
    let head = origin.next_request().await;
    assert_eq!(head.target, "/v2/lit/z");
    assert_eq!(head.header("host"), Some("internal.svc"));
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_connections_are_reused() {
    let origin = Origin::plain("ok").await;
    let config = format!(
        "services:\n  web:\n    url: \"{}\"\nhost_rules:\n  - pattern: \"*\"\n    target: web\n",
        origin.url()
    );
    let proxy = Proxy::start(&config).await;
    // Ten requests one after another, each on a new client connection or all on one kept
    // alive: each worker thread (two) keeps a pool of its own, so one origin connection
    // each at most.
    for _ in 0..5 {
        assert_eq!(get(&proxy, "h", "/").await, (200, "ok".into()));
    }
    let client = client();
    for _ in 0..5 {
        let response = client.get(proxy.url("/")).send().await.expect("response");
        assert_eq!(response.text().await.expect("body"), "ok");
    }
    assert!(origin.connections() <= 2, "{}", origin.connections());
    // With one thread, one pool: one origin connection for all of them.
    let origin = Origin::plain("ok").await;
    let proxy = Proxy::start(&format!(
        "threads: 1\nservices:\n  web:\n    url: \"{}\"\nhost_rules:\n  - pattern: \"*\"\n    target: web\n",
        origin.url()
    ))
    .await;
    for _ in 0..5 {
        assert_eq!(get(&proxy, "h", "/").await, (200, "ok".into()));
    }
    assert_eq!(origin.connections(), 1, "five requests over one connection");
}

#[tokio::test(flavor = "multi_thread")]
async fn dot_segments_are_refused() {
    let origin = Origin::plain("ok").await;
    let config = format!(
        "services:\n  web:\n    url: \"{}\"\nhost_rules:\n  - pattern: \"*\"\n    route_rules:\n\
         \x20     - pattern: \"/public/*\"\n        target: web\n",
        origin.url()
    );
    let proxy = Proxy::start(&config).await;
    // Sent raw: an HTTP client would normalise the path away.
    let mut stream = tokio::net::TcpStream::connect(proxy.addr)
        .await
        .expect("connect");
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream
        .write_all(b"GET /public/%2e%2e/admin HTTP/1.1\r\nhost: h\r\nconnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut answer))
        .await
        .expect("answer in time")
        .expect("read");
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
}
