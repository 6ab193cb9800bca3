//! The admin listener, metrics and the access log, end to end.

use crate::common;

use std::time::Duration;

use common::{client, free_port, guard, logs, sse_get, After, Events, Origin, Proxy};
use serde_json::Value;

async fn sse_origin() -> Origin {
    Origin::start(|head, mut conn| async move {
        if head.target.starts_with("/events") {
            conn.sse_head().await.expect("head");
            let _ = conn.chunk("id: 7\ndata: hello\n\n").await;
            conn.closed().await;
            return After::Close;
        }
        match conn.respond(200, "ok").await {
            Ok(()) => After::KeepAlive(conn),
            Err(_) => After::Close,
        }
    })
    .await
}

fn config(origin: &Origin, admin_port: u16, admin_extra: &str) -> String {
    format!(
        "admin: {{ listen: \"127.0.0.1:{admin_port}\"{admin_extra} }}\n\
         sse: {{ connection_tracking: true }}\n\
         services:\n  feed: {{ url: \"{}\" }}\n\
         middleware_services:\n  - {{ name: key, type: api_key, config: {{ keys: [sekrit], header: x-key }} }}\n  \
         - {{ name: ids, type: request_id }}\n\
         middlewares: [ids]\n\
         host_rules:\n  - pattern: \"*\"\n    target: feed\n    route_rules:\n      \
         - {{ pattern: /events/*, target: feed, name: live }}\n      \
         - {{ pattern: /private, target: feed, middlewares: [key] }}\n",
        origin.url()
    )
}

async fn admin_get(port: u16, path: &str) -> (u16, String) {
    let r = client()
        .get(format!("http://127.0.0.1:{port}{path}"))
        .send()
        .await
        .expect("admin answers");
    (r.status().as_u16(), r.text().await.expect("body"))
}

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_endpoints_show_routes_streams_config_and_reload() {
    let origin = sse_origin().await;
    let admin = free_port();
    let proxy = Proxy::start(&config(&origin, admin, "")).await;
    let stream = sse_get(proxy.url("/events/a")).await;
    let mut events = Events::new(stream);
    assert_eq!(events.next().await.as_deref(), Some("id: 7\ndata: hello"));

    assert_eq!(admin_get(admin, "/healthz").await.0, 200);
    let ready = json(&admin_get(admin, "/readyz").await.1);
    assert_eq!(ready["ready"], true);

    let routes = json(&admin_get(admin, "/routes").await.1);
    let live = routes
        .as_array()
        .expect("array")
        .iter()
        .find(|r| r["route"] == "live")
        .expect("the live route");
    assert_eq!(live["service"], "feed");
    assert_eq!(live["chain"][0]["name"], "ids");

    let streams = guard("the stream to be listed", async {
        loop {
            let v = json(&admin_get(admin, "/sse/connections?route=live").await.1);
            if v["total"] == 1 && v["items"][0]["events"] == 1 {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let item = &streams["items"][0];
    assert_eq!(item["path"], "/events/a");
    assert_eq!(item["last_event_id"], "7");
    assert_eq!(item["client"], "127.0.0.1");
    let id = item["id"].as_u64().expect("id");
    let one = json(&admin_get(admin, &format!("/sse/connections/{id}")).await.1);
    assert_eq!(one["route"], "live");
    let none = json(&admin_get(admin, "/sse/connections?service=other").await.1);
    assert_eq!(none["total"], 0);
    assert_eq!(admin_get(admin, "/sse/connections?nope=1").await.0, 400);
    assert_eq!(admin_get(admin, "/sse/connections/999999").await.0, 404);

    let config_view = admin_get(admin, "/config").await.1;
    assert!(config_view.contains("api_key"), "{config_view}");
    assert!(
        !config_view.contains("sekrit"),
        "secrets are redacted: {config_view}"
    );

    let upstreams = json(&admin_get(admin, "/upstreams").await.1);
    assert_eq!(upstreams[0]["service"], "feed");
    assert_eq!(upstreams[0]["tracked_sse_streams"], 1);

    assert_eq!(
        admin_get(admin, "/reload").await.0,
        405,
        "reload is POST only"
    );
    let reloaded = client()
        .post(format!("http://127.0.0.1:{admin}/reload"))
        .send()
        .await
        .expect("reload");
    // The test config is not a file on disk: the reload reports why it was refused.
    assert_eq!(reloaded.status(), 422);
    assert_eq!(admin_get(admin, "/nope").await.0, 404);

    drop(events);
    guard("the stream to leave the list", async {
        loop {
            let v = json(&admin_get(admin, "/sse/connections").await.1);
            if v["total"] == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_token_is_required_when_set() {
    let origin = sse_origin().await;
    let admin = free_port();
    let _proxy = Proxy::start(&config(&origin, admin, ", token: \"t0ken\"")).await;
    assert_eq!(admin_get(admin, "/healthz").await.0, 401);
    let ok = client()
        .get(format!("http://127.0.0.1:{admin}/healthz"))
        .bearer_auth("t0ken")
        .send()
        .await
        .expect("admin");
    assert_eq!(ok.status(), 200);
    let wrong = client()
        .get(format!("http://127.0.0.1:{admin}/healthz"))
        .bearer_auth("t0kem")
        .send()
        .await
        .expect("admin");
    assert_eq!(wrong.status(), 401);
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_requests_and_streams_and_pass_promtool() {
    let origin = sse_origin().await;
    let admin = free_port();
    let proxy = Proxy::start(&config(&origin, admin, "")).await;
    for _ in 0..3 {
        let r = client().get(proxy.url("/x")).send().await.expect("r");
        let status = r.status();
        assert_eq!(status, 200, "{}", r.text().await.unwrap_or_default());
    }
    assert_eq!(
        client()
            .get(proxy.url("/private"))
            .send()
            .await
            .expect("r")
            .status(),
        401
    );
    let stream = sse_get(proxy.url("/events/m")).await;
    let mut events = Events::new(stream);
    assert!(events.next().await.is_some());

    // A request is counted when its response has ended, which may be after the client
    // has its head: wait for the third plain answer as well as for the stream.
    let text = guard("the metrics to show the stream and every answer", async {
        loop {
            let (_, text) = admin_get(admin, "/metrics").await;
            if text.contains("streamgate_sse_streams_open{route=\"live\",service=\"feed\"} 1")
                && text.contains(
                    "streamgate_requests_total{class=\"2xx\",route=\"*\",service=\"feed\"} 3",
                )
                && text.contains(
                    "streamgate_requests_total{class=\"4xx\",route=\"*/private\",service=\"feed\"} 1",
                )
            {
                return text;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        text.contains("streamgate_requests_total{class=\"2xx\",route=\"*\",service=\"feed\"} 3"),
        "{text}"
    );
    assert!(text.contains(
        "streamgate_requests_total{class=\"4xx\",route=\"*/private\",service=\"feed\"} 1"
    ));
    assert!(text.contains("streamgate_sse_events_total{route=\"live\",service=\"feed\"} 1"));
    assert!(
        !text.contains("/x\""),
        "labels are route names, never raw paths"
    );

    // The exposition is valid for Prometheus itself.
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("metrics.txt");
    std::fs::write(&file, &text).expect("write");
    let out = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&file).expect("open"))
        .output()
        .expect("promtool is installed by .ci/run (Debian package prometheus)");
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    drop(events);
    guard("the stream close to be counted", async {
        loop {
            let (_, text) = admin_get(admin, "/metrics").await;
            if text.contains(
                "streamgate_sse_streams_closed_total{reason=\"client_closed\",route=\"live\",service=\"feed\"} 1",
            ) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// The first `n` access log lines of requests to `proxy`.
async fn access_lines(proxy: &Proxy, n: usize) -> Vec<String> {
    // As the combined format and the JSON one write it, whole.
    let host = [
        format!("host={} ", proxy.addr),
        format!("\"host\":\"{}\"", proxy.addr),
    ];
    guard("the access log lines", async {
        loop {
            let mine: Vec<String> = logs::records(|r| {
                r.target == streamgate::access_log::TARGET
                    && host.iter().any(|h| r.text.contains(h.as_str()))
            })
            .into_iter()
            .map(|r| r.text)
            .collect();
            if mine.len() >= n {
                return mine;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn access_log_writes_one_json_line_per_request() {
    logs::capture();
    let origin = sse_origin().await;
    let proxy = Proxy::start(&format!(
        "access_log: {{ format: json }}\n{}",
        config(&origin, free_port(), "")
    ))
    .await;
    let r = client()
        .get(proxy.url("/x?y=1"))
        .header("user-agent", "test-agent")
        .send()
        .await
        .expect("r");
    let request_id = r.headers()["x-request-id"]
        .to_str()
        .expect("id")
        .to_string();
    let stream = sse_get(proxy.url("/events/z")).await;
    let mut events = Events::new(stream);
    assert!(events.next().await.is_some());
    drop(events);
    let mut lines = access_lines(&proxy, 2).await;
    // Served by either worker thread, the two lines may come in either order.
    lines.sort_by_key(|line| !line.contains("/x?y=1"));
    let plain = json(&lines[0]);
    assert_eq!(plain["path"], "/x?y=1");
    assert_eq!(plain["status"], 200);
    assert_eq!(plain["route"], "*");
    assert_eq!(plain["service"], "feed");
    assert_eq!(plain["request_id"], request_id.as_str());
    assert!(plain["upstream"]
        .as_str()
        .is_some_and(|u| u.starts_with("127.0.0.1:")));
    let sse = json(&lines[1]);
    assert_eq!(sse["route"], "live");
    assert_eq!(sse["sse_events"], 1);
    assert_eq!(sse["sse_close"], "client_closed");
}

/// One raw HTTP/1.1 request to the admin listener (any `Host`, any headers); the status.
async fn raw_status(port: u16, request: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    s.write_all(request.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    guard("the admin answer", s.read_to_end(&mut out))
        .await
        .expect("read");
    let text = String::from_utf8_lossy(&out);
    text.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {text:?}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_answers_only_its_own_host_and_refuses_cross_site_changes() {
    let origin = sse_origin().await;
    let admin = free_port();
    let _proxy = Proxy::start(&config(&origin, admin, "")).await;
    let get =
        |host: &str| format!("GET /config HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n");
    // DNS rebinding: a page whose own name now resolves to 127.0.0.1 sends its name.
    assert_eq!(raw_status(admin, &get("evil.example:9901")).await, 403);
    assert_eq!(raw_status(admin, &get("127.0.0.1.evil.example")).await, 403);
    for host in [
        format!("127.0.0.1:{admin}"),
        format!("localhost:{admin}"),
        "localhost:19901".to_string(),
    ] {
        assert_eq!(raw_status(admin, &get(&host)).await, 200, "{host}");
    }

    let post = |extra: &str| {
        format!(
            "POST /reload HTTP/1.1\r\nhost: 127.0.0.1:{admin}\r\n{extra}content-length: 0\r\n\
             connection: close\r\n\r\n"
        )
    };
    // A form on a foreign page, posted by the operator's browser.
    assert_eq!(
        raw_status(admin, &post("origin: http://evil.example\r\n")).await,
        403
    );
    assert_eq!(raw_status(admin, &post("origin: null\r\n")).await, 403);
    assert_eq!(
        raw_status(admin, &post("sec-fetch-site: cross-site\r\n")).await,
        403
    );
    let delete = format!(
        "DELETE /sse/connections/1 HTTP/1.1\r\nhost: 127.0.0.1:{admin}\r\n\
         origin: http://localhost:3000\r\nconnection: close\r\n\r\n"
    );
    assert_eq!(raw_status(admin, &delete).await, 403);
    // The dashboard's own requests, and tools that send no Origin, get through (the
    // reload itself is refused: the test config is not a file).
    let own = format!("origin: http://127.0.0.1:{admin}\r\nsec-fetch-site: same-origin\r\n");
    assert_eq!(raw_status(admin, &post(&own)).await, 422);
    assert_eq!(raw_status(admin, &post("")).await, 422);
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_token_in_the_query_is_percent_decoded_and_probes_may_stay_open() {
    let origin = sse_origin().await;
    let admin = free_port();
    // A base64 token, as the dashboard sends it: encodeURIComponent.
    let _proxy = Proxy::start(&config(
        &origin,
        admin,
        ", token: \"q+8/Zz==\", open_probes: true",
    ))
    .await;
    assert_eq!(
        admin_get(admin, "/config?token=q%2B8%2FZz%3D%3D").await.0,
        200
    );
    assert_eq!(
        admin_get(admin, "/config?token=q%2b8%2fZz%3d%3d").await.0,
        200
    );
    assert_eq!(admin_get(admin, "/config?token=q+8/Zz==").await.0, 200);
    assert_eq!(admin_get(admin, "/config?token=q%2B8%2FZz").await.0, 401);
    assert_eq!(admin_get(admin, "/config").await.0, 401);
    // Orchestrator probes need no token with `open_probes`; nothing else opens.
    assert_eq!(admin_get(admin, "/healthz").await.0, 200);
    assert_eq!(admin_get(admin, "/readyz").await.0, 200);
    assert_eq!(admin_get(admin, "/routes").await.0, 401);
    assert_eq!(admin_get(admin, "/metrics").await.0, 401);
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_token_comes_from_an_environment_variable_or_a_file() {
    let origin = sse_origin().await;
    std::env::set_var("STREAMGATE_TEST_ADMIN_TOKEN", "from-env\n");
    let admin = free_port();
    let _proxy = Proxy::start(&config(
        &origin,
        admin,
        ", token_env: STREAMGATE_TEST_ADMIN_TOKEN",
    ))
    .await;
    assert_eq!(admin_get(admin, "/healthz").await.0, 401);
    assert_eq!(admin_get(admin, "/healthz?token=from-env").await.0, 200);

    let dir = tempfile::tempdir().expect("dir");
    std::fs::write(dir.path().join("token"), "from-file\n").expect("write");
    let admin = free_port();
    let file = dir.path().join("streamgate.yaml");
    std::fs::write(
        &file,
        format!(
            "listen: [\"127.0.0.1:{}\"]\n{}",
            free_port(),
            config(&origin, admin, ", token_file: token")
        ),
    )
    .expect("write");
    let _proxy = Proxy::start_file(&file).await;
    common::listening(format!("127.0.0.1:{admin}").parse().expect("addr")).await;
    assert_eq!(admin_get(admin, "/healthz").await.0, 401);
    assert_eq!(admin_get(admin, "/healthz?token=from-file").await.0, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn config_view_hides_credentials_set_as_header_values() {
    let origin = sse_origin().await;
    let admin = free_port();
    let _proxy = Proxy::start(&format!(
        "admin: {{ listen: \"127.0.0.1:{admin}\" }}\n\
         services:\n  feed: {{ url: \"{}\" }}\n\
         middleware_services:\n  \
         - {{ name: key, type: api_key, config: {{ keys: [sekrit] }} }}\n  \
         - name: upstream-auth\n    type: headers\n    config:\n      request:\n        \
         set: {{ authorization: \"Bearer upstream-s3cret\", x-service-token: tok-s3cret, x-env: prod }}\n        \
         add: {{ cookie: \"sid=cookie-s3cret\" }}\n\
         host_rules:\n  - {{ pattern: \"*\", target: feed, middlewares: [upstream-auth, key] }}\n",
        origin.url()
    ))
    .await;
    let (status, view) = admin_get(admin, "/config").await;
    assert_eq!(status, 200);
    for secret in ["upstream-s3cret", "tok-s3cret", "cookie-s3cret", "sekrit"] {
        assert!(!view.contains(secret), "{secret} shown: {view}");
    }
    assert!(
        view.contains("prod") && view.contains("<redacted>"),
        "{view}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn api_keys_leave_the_query_and_the_combined_log_escapes_and_redacts() {
    logs::capture();
    let mut origin = Origin::plain("ok").await;
    let proxy = Proxy::start(&format!(
        "access_log: {{ format: combined }}\n\
         services:\n  web: {{ url: \"{}\" }}\n\
         middleware_services:\n  \
         - {{ name: key, type: api_key, config: {{ keys: [sekrit], query: api_key }} }}\n  \
         - {{ name: kept, type: api_key, config: {{ keys: [sekrit2], query: k, strip_query: false }} }}\n\
         host_rules:\n  - pattern: \"*\"\n    target: web\n    route_rules:\n      \
         - {{ pattern: /stripped, target: web, middlewares: [key] }}\n      \
         - {{ pattern: /kept, target: web, middlewares: [kept] }}\n",
        origin.url()
    ))
    .await;
    // The test origin reads heads as UTF-8: non-ASCII bytes here are UTF-8 too.
    let agent =
        http::HeaderValue::from_bytes("evil\" 200 0 \"-\" \"x\tzé".as_bytes()).expect("value");
    let r = client()
        .get(proxy.url("/stripped?a=1&api_key=sekrit&b=2"))
        .header("user-agent", agent)
        .header("referer", "http://a/\"q\"")
        .send()
        .await
        .expect("r");
    assert_eq!(r.status(), 200);
    assert_eq!(origin.next_request().await.target, "/stripped?a=1&b=2");
    let r = client()
        .get(proxy.url("/kept?k=sekrit2&access_token=t0k"))
        .send()
        .await
        .expect("r");
    assert_eq!(r.status(), 200);
    assert_eq!(
        origin.next_request().await.target,
        "/kept?k=sekrit2&access_token=t0k",
        "strip_query: false keeps it for the origin"
    );
    let mut lines = access_lines(&proxy, 2).await;
    // Served by either worker thread, the two lines may come in either order.
    lines.sort_by_key(|line| !line.contains("/stripped"));
    let all = lines.join("\n");
    assert!(!all.contains("sekrit") && !all.contains("t0k"), "{all}");
    assert!(
        lines[0].contains("\"GET /stripped?a=1&api_key=REDACTED&b=2 HTTP/1.1\""),
        "{}",
        lines[0]
    );
    assert!(
        lines[0].contains(
            "\"http://a/\\x22q\\x22\" \"evil\\x22 200 0 \\x22-\\x22 \\x22x\\x09z\\xC3\\xA9\" host="
        ),
        "{}",
        lines[0]
    );
    assert!(
        lines[1].contains("/kept?k=REDACTED&access_token=REDACTED "),
        "{}",
        lines[1]
    );
    // Every quote left in a line is one of the format's own six.
    for line in &lines {
        assert_eq!(line.matches('"').count(), 6, "{line}");
    }
}
