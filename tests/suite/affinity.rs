//! Session affinity learned from responses, end to end, against a pair of stateful replicas
//! that behave like MCP servers: each issues `Mcp-Session-Id` on the first `POST` of a
//! session, answers 404 for sessions it did not issue, and ends a session on `DELETE`.
//! Sessions of every kind of request (a `POST` answered with JSON, a `POST` answered with an
//! event stream, a `GET` event stream, a resumed one), over HTTP/1.1 and h2c; pins dropped
//! on `DELETE`, on `ttl`, when their endpoint is refused, ejected or leaves discovery; the
//! bound on the table; pins across reloads.

use crate::common;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use common::{client, eventually, free_port, listening, After, Conn, Origin, Proxy};
use tokio::io::{AsyncBufReadExt, AsyncReadExt};
use tokio::net::TcpStream;

const SESSION: &str = "mcp-session-id";

/// One replica of a stateful server.
struct Replica {
    name: &'static str,
    origin: Origin,
}

impl Replica {
    async fn start(name: &'static str) -> Replica {
        let sessions: Arc<Mutex<HashSet<String>>> = Arc::default();
        let issued = Arc::new(AtomicUsize::new(0));
        let origin = Origin::start(move |head, mut conn| {
            let (sessions, issued) = (sessions.clone(), issued.clone());
            async move {
                read_body(&head, &mut conn).await;
                let session = head.header(SESSION).map(str::to_string);
                let known = session
                    .as_ref()
                    .is_some_and(|s| sessions.lock().expect("sessions").contains(s));
                let me = format!("{{\"replica\":\"{name}\"}}");
                let _ = match (head.method.as_str(), session) {
                    ("POST", None) => {
                        let id = format!("{name}-{}", issued.fetch_add(1, Ordering::SeqCst));
                        sessions.lock().expect("sessions").insert(id.clone());
                        respond(&mut conn, 200, "application/json", &[(SESSION, &id)], &me).await
                    }
                    (_, Some(_)) if !known => {
                        let body =
                            format!("{{\"error\":\"unknown session\",\"replica\":\"{name}\"}}");
                        respond(&mut conn, 404, "application/json", &[], &body).await
                    }
                    ("DELETE", Some(id)) => {
                        sessions.lock().expect("sessions").remove(&id);
                        respond(&mut conn, 200, "application/json", &[], &me).await
                    }
                    ("POST", Some(_)) if head.target.ends_with("/stream") => {
                        let events = format!("data: {me}\n\ndata: {me}\n\n");
                        respond(&mut conn, 200, "text/event-stream", &[], &events).await
                    }
                    ("POST", Some(_)) => {
                        respond(&mut conn, 200, "application/json", &[], &me).await
                    }
                    ("GET", Some(_)) if head.target.ends_with("/resumable") => {
                        // The first stream breaks after one event; a resumed one ends.
                        let resumed = head.header("last-event-id").is_some();
                        let id = if resumed { 2 } else { 1 };
                        let sent = async {
                            conn.sse_head().await?;
                            conn.chunk(&format!("id: {id}\ndata: {me}\n\n")).await?;
                            if resumed {
                                conn.end().await?;
                            }
                            Ok::<(), std::io::Error>(())
                        };
                        sent.await
                    }
                    ("GET", Some(_)) => {
                        let events = format!("data: {me}\n\n");
                        respond(&mut conn, 200, "text/event-stream", &[], &events).await
                    }
                    _ => respond(&mut conn, 405, "text/plain", &[], "no").await,
                };
                After::Close
            }
        })
        .await;
        Replica { name, origin }
    }

    fn addr(&self) -> SocketAddr {
        self.origin.addr
    }

    /// Stops accepting connections, and waits until a connect is refused.
    async fn stop(&self) {
        self.origin.stop();
        let addr = self.addr();
        eventually("the replica to refuse connections", || async move {
            TcpStream::connect(addr).await.is_err()
        })
        .await;
    }
}

/// Reads the request body (by `content-length`, or chunked), so nothing is left unread.
async fn read_body(head: &common::Head, conn: &mut Conn) {
    if let Some(length) = head.header("content-length").and_then(|l| l.parse().ok()) {
        let mut body = vec![0u8; length];
        conn.reader
            .read_exact(&mut body)
            .await
            .expect("request body");
        return;
    }
    if head.header("transfer-encoding") != Some("chunked") {
        return;
    }
    loop {
        let mut line = String::new();
        conn.reader.read_line(&mut line).await.expect("chunk size");
        let size = usize::from_str_radix(line.trim(), 16).expect("chunk size");
        let mut chunk = vec![0u8; size + 2];
        conn.reader.read_exact(&mut chunk).await.expect("chunk");
        if size == 0 {
            return;
        }
    }
}

/// A whole response; the connection closes after it.
async fn respond(
    conn: &mut Conn,
    status: u16,
    content_type: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> std::io::Result<()> {
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    let head = format!(
        "HTTP/1.1 {status} X\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n\
         connection: close\r\n{extra}\r\n{body}",
        body.len()
    );
    conn.write(head.as_bytes()).await
}

/// The kinds of request an MCP client sends.
#[derive(Debug, Clone, Copy)]
enum Kind {
    /// `POST` without a session: the replica issues one.
    Initialize,
    /// `POST` answered with JSON.
    Json,
    /// `POST` answered with an event stream.
    PostStream,
    /// `GET` event stream (relayed by streamgate's own loop).
    Stream,
    /// `DELETE`: ends the session.
    Delete,
}

/// What one request got: status, the replica that answered, the session it issued.
#[derive(Debug)]
struct Answer {
    status: u16,
    replica: String,
    issued: Option<String>,
}

async fn call(http: &reqwest::Client, base: &str, kind: Kind, session: Option<&str>) -> Answer {
    let request = match kind {
        Kind::Initialize | Kind::Json => http
            .post(format!("{base}/mcp"))
            .header("accept", "application/json, text/event-stream")
            .body("{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/list\"}"),
        Kind::PostStream => http
            .post(format!("{base}/mcp/stream"))
            .header("accept", "application/json, text/event-stream")
            .body("{\"jsonrpc\":\"2.0\",\"id\":2,\"method\":\"tools/call\"}"),
        Kind::Stream => http
            .get(format!("{base}/mcp"))
            .header("accept", "text/event-stream"),
        Kind::Delete => http.delete(format!("{base}/mcp")),
    };
    let request = match session {
        Some(id) => request.header(SESSION, id),
        None => request,
    };
    let response = request.send().await.expect("the proxy answers");
    let status = response.status().as_u16();
    let issued = response
        .headers()
        .get(SESSION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let streams = response
        .headers()
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    let body = response.text().await.expect("body");
    if matches!(kind, Kind::PostStream | Kind::Stream) && status == 200 {
        assert!(streams && body.starts_with("data: "), "{kind:?}: {body:?}");
    }
    let replica = body
        .split("\"replica\":\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_default()
        .to_string();
    Answer {
        status,
        replica,
        issued,
    }
}

/// Starts a session: the id and the replica that holds it.
async fn initialize(http: &reqwest::Client, base: &str) -> (String, String) {
    let answer = call(http, base, Kind::Initialize, None).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    (answer.issued.expect("a session id"), answer.replica)
}

/// A service `mcp` over `endpoints` with `extra` service keys, and a route to it.
fn service(endpoints: &[&Replica], extra: &str) -> String {
    let list: Vec<String> = endpoints
        .iter()
        .map(|r| format!("\"{}\"", r.addr()))
        .collect();
    format!(
        "services:\n  mcp:\n    discovery: {{ static: [{}] }}\n    load_balancing: round_robin\n\
         {extra}host_rules:\n  - {{ pattern: \"*\", target: mcp }}\n",
        list.join(", ")
    )
}

const AFFINITY: &str = "    affinity: { header: Mcp-Session-Id, ttl: 30m, max_entries: 1000 }\n";

/// The value of a metric series of service `mcp` (`labels` without the service).
fn metric(proxy: &Proxy, name: &str, labels: &str) -> u64 {
    let text = proxy.state.metrics.render();
    let series = match labels {
        "" => format!("{name}{{service=\"mcp\"}} "),
        labels => format!("{name}{{{labels},service=\"mcp\"}} "),
    };
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn dropped(proxy: &Proxy, reason: &str) -> u64 {
    metric(
        proxy,
        "streamgate_affinity_pins_dropped_total",
        &format!("reason=\"{reason}\""),
    )
}

/// The pins per endpoint address, as `GET /upstreams` on the admin listener shows them.
async fn pins_per_endpoint(admin: u16) -> HashMap<String, u64> {
    let body = client()
        .get(format!("http://127.0.0.1:{admin}/upstreams"))
        .send()
        .await
        .expect("admin answers")
        .text()
        .await
        .expect("body");
    let view: serde_json::Value = serde_json::from_str(&body).expect("json");
    let mcp = view
        .as_array()
        .and_then(|services| services.iter().find(|s| s["service"] == "mcp"))
        .expect("service mcp");
    mcp["endpoints"]
        .as_array()
        .expect("endpoints")
        .iter()
        .map(|e| {
            let addr = e["address"].as_str().expect("address").to_string();
            (addr, e["pins"].as_u64().expect("pins"))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn twenty_sessions_each_reach_their_replica_with_every_kind_of_request() {
    let (a, b) = (Replica::start("a").await, Replica::start("b").await);
    let admin = free_port();
    let proxy = Proxy::start(&format!(
        "admin: {{ listen: \"127.0.0.1:{admin}\" }}\n{}",
        service(&[&a, &b], AFFINITY)
    ))
    .await;
    listening(SocketAddr::from(([127, 0, 0, 1], admin))).await;
    let http = client();
    let base = proxy.url("");
    let mut sessions = Vec::new();
    for _ in 0..20 {
        let (id, home) = initialize(&http, &base).await;
        for kind in [Kind::Json, Kind::PostStream, Kind::Stream, Kind::Json] {
            let answer = call(&http, &base, kind, Some(&id)).await;
            assert_eq!(
                (answer.status, answer.replica.as_str()),
                (200, home.as_str()),
                "{kind:?} of session {id}"
            );
        }
        sessions.push((id, home));
    }
    let on_a = sessions.iter().filter(|(_, home)| home == "a").count();
    assert!(on_a > 0 && on_a < 20, "sessions spread: {on_a} of 20 on a");
    assert_eq!(
        metric(&proxy, "streamgate_affinity_pins_created_total", ""),
        20
    );
    assert_eq!(metric(&proxy, "streamgate_affinity_hits_total", ""), 80);
    assert_eq!(metric(&proxy, "streamgate_affinity_misses_total", ""), 0);
    assert_eq!(metric(&proxy, "streamgate_affinity_pins", ""), 20);
    let pins = pins_per_endpoint(admin).await;
    assert_eq!(pins[&a.addr().to_string()], on_a as u64, "{pins:?}");
    assert_eq!(pins[&b.addr().to_string()], 20 - on_a as u64, "{pins:?}");

    // DELETE ends each session and drops its pin; the ended session is unknown everywhere.
    for (id, home) in &sessions {
        let answer = call(&http, &base, Kind::Delete, Some(id)).await;
        assert_eq!(
            (answer.status, answer.replica.as_str()),
            (200, home.as_str())
        );
    }
    assert_eq!(dropped(&proxy, "deleted"), 20);
    assert_eq!(metric(&proxy, "streamgate_affinity_pins", ""), 0);
    assert!(pins_per_endpoint(admin).await.values().all(|n| *n == 0));
    let (id, _) = &sessions[0];
    assert_eq!(call(&http, &base, Kind::Json, Some(id)).await.status, 404);
    assert_eq!(metric(&proxy, "streamgate_affinity_misses_total", ""), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn without_affinity_sessions_fail_as_a_new_user_would_see() {
    let (a, b) = (Replica::start("a").await, Replica::start("b").await);
    let proxy = Proxy::start(&service(&[&a, &b], "")).await;
    let http = client();
    let base = proxy.url("");
    let (id, _) = initialize(&http, &base).await;
    let answer = call(&http, &base, Kind::Json, Some(&id)).await;
    assert_eq!(
        answer.status, 404,
        "round robin sends it to the other replica"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_session_over_h2c_reaches_its_replica() {
    let (a, b) = (Replica::start("a").await, Replica::start("b").await);
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let main = dir.path().join("streamgate.yaml");
    std::fs::write(
        &main,
        format!(
            "listen:\n  - {{ address: \"127.0.0.1:{port}\", h2c: true }}\n{}",
            service(&[&a, &b], AFFINITY)
        ),
    )
    .expect("write config");
    let proxy = Proxy::start_file(&main).await;
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .expect("client");
    let base = proxy.url("");
    for _ in 0..2 {
        let (id, home) = initialize(&h2, &base).await;
        for kind in [Kind::Json, Kind::PostStream, Kind::Stream] {
            let answer = call(&h2, &base, kind, Some(&id)).await;
            assert_eq!(
                (answer.status, answer.replica.as_str()),
                (200, home.as_str()),
                "{kind:?} over h2c"
            );
        }
    }
    let version = h2.get(proxy.url("/mcp")).send().await.expect("r").version();
    assert_eq!(version, reqwest::Version::HTTP_2);
    assert_eq!(metric(&proxy, "streamgate_affinity_hits_total", ""), 6);
}

#[tokio::test(flavor = "multi_thread")]
async fn unused_pins_are_forgotten_after_the_ttl() {
    let (a, b) = (Replica::start("a").await, Replica::start("b").await);
    let proxy = Proxy::start(&service(
        &[&a, &b],
        "    affinity: { header: Mcp-Session-Id, ttl: 200ms }\n",
    ))
    .await;
    let (id, _) = initialize(&client(), &proxy.url("")).await;
    assert!(!id.is_empty());
    assert_eq!(
        metric(&proxy, "streamgate_affinity_pins_created_total", ""),
        1
    );
    eventually("the pin to expire", || async {
        metric(&proxy, "streamgate_affinity_pins", "") == 0
    })
    .await;
    assert_eq!(dropped(&proxy, "expired"), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_or_ejected_endpoint_loses_its_pins_and_only_a_refusal_moves_a_retry() {
    let (a, b) = (Replica::start("a").await, Replica::start("b").await);
    let proxy = Proxy::start(&service(
        &[&a, &b],
        &format!(
            "{AFFINITY}    retries: 1\n    passive_health: {{ failures: 1, cooldown: 10m }}\n"
        ),
    ))
    .await;
    let http = client();
    let base = proxy.url("");
    let mut on_a = Vec::new();
    while on_a.len() < 2 {
        let (id, home) = initialize(&http, &base).await;
        if home == a.name {
            on_a.push(id);
        }
    }
    a.stop().await;
    // The pinned replica refuses the connection: the retry goes to the other one, which
    // does not know the session (the client would start a new one), and the pin goes.
    let answer = call(&http, &base, Kind::Json, Some(&on_a[0])).await;
    assert_eq!((answer.status, answer.replica.as_str()), (404, b.name));
    // That failure ejected a (`failures: 1`): the other session's pin goes too, without a
    // connection attempt.
    let answer = call(&http, &base, Kind::Stream, Some(&on_a[1])).await;
    assert_eq!((answer.status, answer.replica.as_str()), (404, b.name));
    assert_eq!(dropped(&proxy, "endpoint_down"), 2);
    assert_eq!(metric(&proxy, "streamgate_affinity_misses_total", ""), 2);
    // A new session lands on b and stays there.
    let (id, home) = initialize(&http, &base).await;
    assert_eq!(home, b.name);
    assert_eq!(call(&http, &base, Kind::Json, Some(&id)).await.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_resumed_stream_of_a_pinned_session_goes_back_to_its_replica() {
    let (a, b) = (Replica::start("a").await, Replica::start("b").await);
    let proxy = Proxy::start(&service(
        &[&a, &b],
        &format!("{AFFINITY}    sse: {{ resume: true, resume_attempts: 1, resume_window: 1m }}\n"),
    ))
    .await;
    let http = client();
    let (id, home) = initialize(&http, &proxy.url("")).await;
    let response = http
        .get(proxy.url("/mcp/resumable"))
        .header("accept", "text/event-stream")
        .header(SESSION, &id)
        .send()
        .await
        .expect("stream");
    let mut events = common::Events::new(response);
    let me = format!("{{\"replica\":\"{home}\"}}");
    for n in 1..=2 {
        let expected = format!("id: {n}\ndata: {me}");
        assert_eq!(events.next().await, Some(expected), "event {n}");
    }
    assert_eq!(events.next().await, None, "ended cleanly after the resume");
    assert_eq!(metric(&proxy, "streamgate_affinity_hits_total", ""), 2);
}

/// Writes file discovery's endpoint list as deploy tools do: aside, then renamed over it.
fn write_endpoints(path: &Path, replicas: &[&Replica]) {
    let list: Vec<String> = replicas
        .iter()
        .map(|r| format!("- \"{}\"\n", r.addr()))
        .collect();
    let fresh = path.with_extension("new");
    std::fs::write(&fresh, list.concat()).expect("write endpoints");
    std::fs::rename(&fresh, path).expect("rename endpoints");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_endpoint_that_leaves_discovery_takes_its_pins() {
    let (a, b) = (Replica::start("a").await, Replica::start("b").await);
    let dir = tempfile::tempdir().expect("tempdir");
    let list = dir.path().join("mcp-endpoints.yaml");
    write_endpoints(&list, &[&a, &b]);
    let port = free_port();
    let main = dir.path().join("streamgate.yaml");
    std::fs::write(
        &main,
        format!(
            "listen: [\"127.0.0.1:{port}\"]\n\
             services:\n  mcp:\n    discovery: {{ file: {{ path: mcp-endpoints.yaml }} }}\n    \
             load_balancing: round_robin\n{AFFINITY}\
             host_rules:\n  - {{ pattern: \"*\", target: mcp }}\n"
        ),
    )
    .expect("write config");
    let proxy = Proxy::start_file(&main).await;
    let http = client();
    let base = proxy.url("");
    let mut homes: HashMap<String, Vec<String>> = HashMap::new();
    for _ in 0..4 {
        let (id, home) = initialize(&http, &base).await;
        homes.entry(home).or_default().push(id);
    }
    assert_eq!((homes["a"].len(), homes["b"].len()), (2, 2), "{homes:?}");
    write_endpoints(&list, &[&b]);
    eventually("a's pins to go with a", || async {
        dropped(&proxy, "endpoint_left") == 2
    })
    .await;
    assert_eq!(metric(&proxy, "streamgate_affinity_pins", ""), 2);
    for id in &homes["a"] {
        let answer = call(&http, &base, Kind::Json, Some(id)).await;
        assert_eq!((answer.status, answer.replica.as_str()), (404, "b"));
    }
    for id in &homes["b"] {
        let answer = call(&http, &base, Kind::PostStream, Some(id)).await;
        assert_eq!((answer.status, answer.replica.as_str()), (200, "b"));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_table_holds_at_most_max_entries_under_ten_times_as_many_sessions() {
    let (a, b) = (Replica::start("a").await, Replica::start("b").await);
    let proxy = Proxy::start(&service(
        &[&a, &b],
        "    affinity: { header: Mcp-Session-Id, max_entries: 10 }\n",
    ))
    .await;
    let http = client();
    let base = proxy.url("");
    let mut sessions = Vec::new();
    for _ in 0..100 {
        sessions.push(initialize(&http, &base).await);
        assert!(metric(&proxy, "streamgate_affinity_pins", "") <= 10);
    }
    assert_eq!(metric(&proxy, "streamgate_affinity_pins", ""), 10);
    assert_eq!(dropped(&proxy, "evicted"), 90);
    // The ten most recent sessions still reach their replica; the oldest has no pin.
    for (id, home) in &sessions[90..] {
        let answer = call(&http, &base, Kind::Json, Some(id)).await;
        assert_eq!(
            (answer.status, answer.replica.as_str()),
            (200, home.as_str())
        );
    }
    assert_eq!(metric(&proxy, "streamgate_affinity_hits_total", ""), 10);
    let _ = call(&http, &base, Kind::Json, Some(&sessions[0].0)).await;
    assert_eq!(metric(&proxy, "streamgate_affinity_misses_total", ""), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn pins_survive_reloads_and_keep_their_endpoints_when_the_set_changes() {
    let (a, b, c) = (
        Replica::start("a").await,
        Replica::start("b").await,
        Replica::start("c").await,
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let (port, admin) = (free_port(), free_port());
    let main = dir.path().join("streamgate.yaml");
    let write = |endpoints: &[&Replica], ttl: &str| {
        let text = format!(
            "listen: [\"127.0.0.1:{port}\"]\nadmin: {{ listen: \"127.0.0.1:{admin}\" }}\n{}",
            service(
                endpoints,
                &format!("    affinity: {{ header: Mcp-Session-Id, ttl: {ttl} }}\n")
            )
        );
        std::fs::write(&main, text).expect("write config");
    };
    write(&[&a, &b], "30m");
    let proxy = Proxy::start_file(&main).await;
    listening(SocketAddr::from(([127, 0, 0, 1], admin))).await;
    let reload = || async {
        let response = client()
            .post(format!("http://127.0.0.1:{admin}/reload"))
            .send()
            .await
            .expect("admin answers");
        assert_eq!(
            response.status(),
            200,
            "{}",
            response.text().await.expect("body")
        );
    };
    let http = client();
    let base = proxy.url("");
    let mut sessions = Vec::new();
    for _ in 0..4 {
        sessions.push(initialize(&http, &base).await);
    }
    let reach_home = |sessions: Vec<(String, String)>| {
        let (http, base) = (http.clone(), base.clone());
        async move {
            for (id, home) in &sessions {
                let answer = call(&http, &base, Kind::Json, Some(id)).await;
                assert_eq!(
                    (answer.status, answer.replica.as_str()),
                    (200, home.as_str()),
                    "session {id}"
                );
            }
        }
    };

    // Affinity settings change, endpoint settings do not: the same set, the same pins.
    write(&[&a, &b], "20m");
    reload().await;
    reach_home(sessions.clone()).await;
    // The endpoint settings change (c joins): a new set, which takes the pins over.
    write(&[&a, &b, &c], "20m");
    reload().await;
    reach_home(sessions.clone()).await;
    let pins = pins_per_endpoint(admin).await;
    assert_eq!(
        (
            pins[&a.addr().to_string()],
            pins[&b.addr().to_string()],
            pins[&c.addr().to_string()]
        ),
        (2, 2, 0),
        "{pins:?}"
    );
    assert_eq!(metric(&proxy, "streamgate_affinity_misses_total", ""), 0);
    // a leaves with a reload: its sessions are balanced as usual; b's stay on b.
    write(&[&b, &c], "20m");
    reload().await;
    let (gone, kept): (Vec<_>, Vec<_>) = sessions.into_iter().partition(|(_, h)| h == "a");
    reach_home(kept).await;
    for (id, _) in &gone {
        assert_eq!(call(&http, &base, Kind::Json, Some(id)).await.status, 404);
    }
    assert_eq!(dropped(&proxy, "endpoint_left"), 2);
}
