//! The admin listener, metrics and the access log, end to end.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{client, free_port, guard, sse_get, After, Events, Origin, Proxy};
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

    let text = guard("the metrics to show the stream", async {
        loop {
            let (_, text) = admin_get(admin, "/metrics").await;
            if text.contains("streamgate_sse_streams_open{route=\"live\",service=\"feed\"} 1") {
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

/// Collects the access log lines of this test process.
struct Capture(Arc<Mutex<Vec<String>>>);

impl log::Log for Capture {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.target() == streamgate::access_log::TARGET
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            if let Ok(mut lines) = self.0.lock() {
                lines.push(record.args().to_string());
            }
        }
    }

    fn flush(&self) {}
}

#[tokio::test(flavor = "multi_thread")]
async fn access_log_writes_one_json_line_per_request() {
    let lines = Arc::new(Mutex::new(Vec::new()));
    log::set_boxed_logger(Box::new(Capture(lines.clone()))).expect("logger");
    log::set_max_level(log::LevelFilter::Info);
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
    let lines = guard("two access log lines", async {
        loop {
            let snapshot = lines.lock().expect("lines").clone();
            if snapshot.len() >= 2 {
                return snapshot;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
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
