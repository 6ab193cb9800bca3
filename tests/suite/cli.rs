//! The real binary: `-t` on shipped and broken configs, the no-argument demo, a
//! zero-downtime upgrade with `-u`, and the drain of open streams on `-u` and `SIGTERM`.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::binary::{exited, signal, start_binary, succeeded, wait_listening, Running, BIN};
use common::resume::{contiguous, counting_origin, Resumer};
use common::{client, eventually, free_port, guard, read_until, server_side, Events};
use tokio::io::AsyncWriteExt;

fn check(file: &Path) -> Output {
    Command::new(BIN)
        .args(["-t", "-c"])
        .arg(file)
        .output()
        .expect("run streamgate -t")
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read conf dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            yaml_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(path);
        }
    }
}

#[test]
fn every_file_under_conf_passes_the_check() {
    let mut files = Vec::new();
    yaml_files(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("conf"),
        &mut files,
    );
    assert!(
        files.len() >= 3,
        "conf/ holds the shipped configs: {files:?}"
    );
    for file in files {
        let out = check(&file);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("configuration ok"), "{stdout}");
        assert!(stdout.contains("routes (in precedence order)"), "{stdout}");
    }
}

#[test]
fn broken_configs_fail_the_check_naming_file_line_and_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases = [
        ("typo.yaml", "listen: [\"127.0.0.1:1\"]\nservics: {}\n", ":2:1: `servics`"),
        (
            "target.yaml",
            "services:\n  w: { url: \"http://x\" }\nhost_rules:\n  - pattern: \"*\"\n    target: nope\n",
            ":5:5: `host_rules[0].target`: service `nope` is not defined",
        ),
        (
            "regex.yaml",
            "services:\n  w: { url: \"http://x\" }\nhost_rules:\n  - pattern: \"*\"\n    route_rules:\n      - pattern: \"~[\"\n        target: w\n",
            ":6:9: `host_rules[0].route_rules[0].pattern`: invalid regex",
        ),
        (
            "url.yaml",
            "services:\n  w:\n    url: \"127.0.0.1:80\"\n",
            ":3:5: `services.w.url`: invalid service URL",
        ),
        (
            "upgrade.yaml",
            "threads: 1\nupgrade_sock: /nonexistent-streamgate/u.sock\n",
            ":2:1: `upgrade_sock`: /nonexistent-streamgate/u.sock: the directory \
             /nonexistent-streamgate does not exist: a `-u` upgrade would fail",
        ),
        (
            "pid.yaml",
            "pid_file: /nonexistent-streamgate/s.pid\n",
            ":1:1: `pid_file`: /nonexistent-streamgate/s.pid: the directory \
             /nonexistent-streamgate does not exist",
        ),
        (
            "log.yaml",
            "error_log: /nonexistent-streamgate/e.log\n",
            ":1:1: `error_log`: /nonexistent-streamgate/e.log: the directory \
             /nonexistent-streamgate does not exist: `-d` could not open it",
        ),
    ];
    for (name, text, expected) in cases {
        let file = dir.path().join(name);
        std::fs::write(&file, text).expect("write");
        let out = check(&file);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name} passed the check");
        assert!(
            stderr.contains(&format!("{}{expected}", file.display())),
            "{name}: {stderr}"
        );
    }
    let out = check(&dir.path().join("absent.yaml"));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("absent.yaml"));
}

#[tokio::test(flavor = "multi_thread")]
async fn without_arguments_it_serves_the_demo_stream_on_8080() {
    let _proxy = Running(
        Command::new(BIN)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn"),
    );
    wait_listening("http://127.0.0.1:8080/demo/").await;
    let response = client()
        .get("http://127.0.0.1:8080/demo/events")
        .header("last-event-id", "41")
        .send()
        .await
        .expect("response");
    assert_eq!(response.headers()["x-accel-buffering"], "no");
    let mut events = Events::new(response);
    assert_eq!(events.next().await.as_deref(), Some("retry: 2000"));
    let first = events.next().await.expect("event");
    assert!(
        first.starts_with("id: 42\nevent: tick\ndata: {\"n\":42"),
        "{first}"
    );
    let second = events.next().await.expect("event");
    assert!(second.starts_with("id: 43\n"), "{second}");
}

#[tokio::test(flavor = "multi_thread")]
async fn upgrade_with_dash_u_hands_over_without_refusing_requests() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let demo = free_port();
    let config = dir.path().join("streamgate.yaml");
    std::fs::write(
        &config,
        format!(
            "threads: 2\npid_file: {dir}/sg.pid\nupgrade_sock: {dir}/upgrade.sock\n\
             grace_period_seconds: 1\ngraceful_shutdown_timeout_seconds: 1\n\
             listen: [\"127.0.0.1:{port}\"]\ndemo: {{ listen: \"127.0.0.1:{demo}\" }}\n\
             services:\n  demo: {{ url: \"http://127.0.0.1:{demo}\" }}\n\
             host_rules:\n  - pattern: \"*\"\n    target: demo\n",
            dir = dir.path().display()
        ),
    )
    .expect("write config");
    let start = |upgrade: bool| {
        let mut cmd = Command::new(BIN);
        if upgrade {
            cmd.arg("-u");
        }
        cmd.arg("-c")
            .arg(&config)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn")
    };
    let url = format!("http://127.0.0.1:{port}/");
    let mut old = Running(start(false));
    wait_listening(&url).await;

    // Requests keep flowing while the handover happens.
    let load_url = url.clone();
    let load = tokio::spawn(async move {
        let mut failures = 0;
        for _ in 0..60 {
            match client().get(&load_url).send().await {
                Ok(r) if r.status().is_success() => {}
                _ => failures += 1,
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        failures
    });

    // The new process first, then SIGQUIT to the old one: it sends its listeners over. The
    // new one's listener has its own TCP keepalive (the old one's is the default 60 s) and
    // defers accepting until a client's first bytes (the old one's hands connections over
    // at once): a socket handed over takes the new process's settings.
    let text = std::fs::read_to_string(&config).expect("read config");
    let listen = format!("listen: [\"127.0.0.1:{port}\"]");
    let own = format!(
        "listen:\n  - {{ address: \"127.0.0.1:{port}\", tcp_keepalive: 9s, defer_accept: 5s }}"
    );
    std::fs::write(&config, text.replace(&listen, &own)).expect("write config");
    let _new = Running(start(true));
    tokio::time::sleep(Duration::from_millis(300)).await;
    signal(old.0.id(), "-QUIT");
    let exited = guard("the old process to exit", async {
        loop {
            if let Some(status) = old.0.try_wait().expect("wait") {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(exited.success(), "old process exit: {exited}");
    let failures = guard("the request loop", load).await.expect("load task");
    assert_eq!(failures, 0, "requests refused during the upgrade");
    // The new process serves alone now, with its settings on the socket it was given.
    let r = client()
        .get(&url)
        .send()
        .await
        .expect("new process answers");
    assert!(r.status().is_success());
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (state, _, _) = server_side(addr, &conn);
    assert_eq!(
        state, 3,
        "a silent connection held back by the kernel (defer_accept: 5s)"
    );
    conn.write_all(b"GET / HTTP/1.1\r\nhost: t\r\n\r\n")
        .await
        .expect("write");
    let answer = read_until(&mut conn, "the answer's head", |got| {
        got.windows(4).any(|w| w == b"\r\n\r\n")
    })
    .await;
    assert!(answer.starts_with(b"HTTP/1.1 200"), "an answer");
    let (_, kind, when) = server_side(addr, &conn);
    assert_eq!(kind, 2, "a keepalive timer");
    assert!(
        when <= Duration::from_secs(9),
        "the new process's 9 s: {when:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_address_in_use_is_tried_again_briefly_then_ends_the_process_with_the_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (port, demo) = (free_port(), free_port());
    let config = dir.path().join("streamgate.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: [\"127.0.0.1:{port}\"]\ndemo: {{ listen: \"127.0.0.1:{demo}\" }}\n\
             services:\n  demo: {{ url: \"http://127.0.0.1:{demo}\" }}\n\
             host_rules:\n  - {{ pattern: \"*\", target: demo }}\n"
        ),
    )
    .expect("write config");
    let run = || {
        Command::new(BIN)
            .arg("-c")
            .arg(&config)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn")
    };

    // Held by something else throughout: an error that names it, and exit status 1.
    let holder = std::net::TcpListener::bind(("127.0.0.1", port)).expect("hold the port");
    let child = run();
    let output = guard("the process to give up", async {
        tokio::task::spawn_blocking(move || child.wait_with_output().expect("wait"))
            .await
            .expect("join")
    })
    .await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot listen on 127.0.0.1:{port}")) && stderr.contains("in use"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");

    // Freed while it tries again (a process going away): it listens and serves.
    let child = Running(run());
    tokio::time::sleep(Duration::from_millis(700)).await;
    drop(holder);
    wait_listening(&format!("http://127.0.0.1:{port}/")).await;
    drop(child);
}

/// A config for the drain tests: streams of a counting origin, drained over `drain`.
fn drain_config(dir: &Path, port: u16, origin: &common::Origin, drain: &str) -> PathBuf {
    let config = dir.join("streamgate.yaml");
    std::fs::write(
        &config,
        format!(
            "pid_file: {dir}/sg.pid\nupgrade_sock: {dir}/upgrade.sock\n\
             graceful_shutdown_timeout_seconds: 1\n\
             listen: [\"127.0.0.1:{port}\"]\n\
             sse: {{ drain_period: {drain}, connection_tracking: true }}\n\
             services:\n  feed: {{ url: \"{}\" }}\n\
             host_rules:\n  - {{ pattern: \"*\", target: feed }}\n",
            origin.url(),
            dir = dir.display()
        ),
    )
    .expect("write config");
    config
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upgrade_drains_streams_to_the_new_process_without_losing_an_event() {
    let origin = counting_origin(Duration::from_millis(20)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let config = drain_config(dir.path(), port, &origin, "1s");
    let mut old = Running(start_binary(&config, false));
    let addr = format!("127.0.0.1:{port}").parse().expect("addr");
    wait_listening(&format!("http://{addr}/")).await;
    let clients: Vec<Resumer> = (0..50).map(|_| Resumer::start(addr, "/events")).collect();
    eventually("every client to stream", || async {
        clients.iter().all(|c| c.events() >= 3)
    })
    .await;

    let _new = Running(start_binary(&config, true));
    tokio::time::sleep(Duration::from_millis(300)).await;
    signal(old.0.id(), "-QUIT");
    let status = exited(&mut old.0).await;
    assert!(status.success(), "old process exit: {status}");

    // Every client was handed a hint, came back, and streams from the new process.
    let at_exit: Vec<u64> = clients.iter().map(|c| c.events()).collect();
    eventually("every client to stream from the new process", || async {
        clients
            .iter()
            .zip(&at_exit)
            .all(|(c, n)| c.events() >= n + 5)
    })
    .await;
    for client in clients {
        let seen = client.stop().await;
        assert!(seen.hints >= 1 && seen.connections >= 2, "{seen:?}");
        contiguous(&seen.ids).unwrap_or_else(|e| panic!("{e}: {:?}", seen.ids));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_streams_and_exits_without_sleeping_out_a_grace_period() {
    let origin = counting_origin(Duration::from_millis(20)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    // No grace_period_seconds: it follows the drain period (Pingora's own default is 300 s).
    let config = drain_config(dir.path(), port, &origin, "500ms");
    let mut proxy = Running(start_binary(&config, false));
    let addr = format!("127.0.0.1:{port}").parse().expect("addr");
    wait_listening(&format!("http://{addr}/")).await;
    let clients: Vec<Resumer> = (0..10).map(|_| Resumer::start(addr, "/events")).collect();
    eventually("every client to stream", || async {
        clients.iter().all(|c| c.events() >= 3)
    })
    .await;
    signal(proxy.0.id(), "-TERM");
    let status = exited(&mut proxy.0).await;
    assert!(status.success(), "exit: {status}");
    for client in clients {
        let seen = client.stop().await;
        assert!(seen.hints >= 1, "drained with a hint: {seen:?}");
        contiguous(&seen.ids).unwrap_or_else(|e| panic!("{e}: {:?}", seen.ids));
    }
}

/// The resident memory of process `pid`, in KiB.
/// A number of process `pid`'s `/proc` status: `VmRSS` (KiB), `FDSize`, ...
fn proc_status(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
}

fn rss_kib(pid: u32) -> u64 {
    proc_status(pid, "VmRSS")
}

/// Opens `total` event streams, `at_once` at a time; each is closed by the client after
/// its first event.
async fn open_and_close(addr: std::net::SocketAddr, total: usize, at_once: usize) {
    use tokio::io::AsyncWriteExt;
    let one = move || async move {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"GET /events HTTP/1.1\r\nhost: t\r\naccept: text/event-stream\r\n\r\n")
            .await
            .expect("request");
        common::read_until(&mut s, "the first event", |got| {
            got.windows(7).any(|w| w == b"data: x")
        })
        .await;
    };
    for _ in 0..total / at_once {
        futures_util::future::join_all((0..at_once).map(|_| one())).await;
    }
}

/// The release binary serving `listen` (one entry of the list) and `extra` keys in front
/// of `origin`, with an admin listener, started and answering: the process, its PID, the
/// admin port.
async fn start_with_admin(
    dir: &Path,
    listen: &str,
    extra: &str,
    origin: &str,
) -> (Running, u32, u16) {
    let admin = free_port();
    let config = dir.join("streamgate.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: [{listen}]
admin: {{ listen: \"127.0.0.1:{admin}\" }}
{extra}\
             services:\n  feed: {{ url: \"{origin}\" }}\n\
             host_rules:\n  - {{ pattern: \"*\", target: feed }}\n"
        ),
    )
    .expect("write config");
    let proxy = Running(start_binary(&config, false));
    let pid = proxy.0.id();
    wait_listening(&format!("http://127.0.0.1:{admin}/healthz")).await;
    (proxy, pid, admin)
}

/// The process's descriptor table is sized up front for the connections its listeners
/// admit (each with one to its origin), so that it does not grow, stalling every thread,
/// while the first streams come in.
#[tokio::test(flavor = "multi_thread")]
async fn the_descriptor_table_is_sized_for_the_listeners_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let listen = format!(
        "{{ address: \"127.0.0.1:{}\", max_connections: 1000 }}",
        free_port()
    );
    let (_proxy, pid, _) = start_with_admin(dir.path(), &listen, "", "http://127.0.0.1:9").await;
    let limit = streamgate::listen::open_file_limit().expect("limit");
    let wanted = (2 * 1000 + 128).min(limit);
    eventually("the descriptor table to be sized", || async {
        proc_status(pid, "FDSize") >= wanted
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ten_thousand_streams_leave_no_entry_and_no_memory_behind() {
    let origin = common::Origin::start(|_, mut conn| async move {
        conn.sse_head().await.expect("head");
        let _ = conn.chunk("data: x\n\n").await;
        conn.closed().await;
        common::After::Close
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let (_proxy, pid, admin) = start_with_admin(
        dir.path(),
        &format!("\"127.0.0.1:{port}\""),
        "sse: { connection_tracking: true }\n",
        &origin.url(),
    )
    .await;
    let addr = format!("127.0.0.1:{port}").parse().expect("addr");
    let open_streams = || async {
        let url = format!("http://127.0.0.1:{admin}/sse/connections");
        let view: serde_json::Value = client()
            .get(url)
            .send()
            .await
            .expect("admin")
            .text()
            .await
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .expect("json");
        view["total"].as_u64().expect("total")
    };

    // Warm up: allocator arenas, connection pools, worker threads.
    open_and_close(addr, 1_000, 200).await;
    eventually("the registry to empty", || async {
        open_streams().await == 0
    })
    .await;
    let before = rss_kib(pid);
    let took = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(120), open_and_close(addr, 10_000, 200))
        .await
        .expect("10,000 streams within two minutes");
    eprintln!("10,000 streams opened and closed in {:?}", took.elapsed());
    eventually("the registry to empty", || async {
        open_streams().await == 0
    })
    .await;
    let after = rss_kib(pid);
    eprintln!("resident memory: {before} KiB after warm-up, {after} KiB after 10,000 streams");
    assert!(
        after < before + 8 * 1024,
        "memory grew from {before} KiB to {after} KiB"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_and_upstreams_subcommands_print_tables() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (port, demo, admin) = (free_port(), free_port(), free_port());
    let config = dir.path().join("streamgate.yaml");
    std::fs::write(
        &config,
        format!(
            "pid_file: {dir}/sg.pid\nupgrade_sock: {dir}/upgrade.sock\n\
             grace_period_seconds: 0\ngraceful_shutdown_timeout_seconds: 1\n\
             listen: [\"127.0.0.1:{port}\"]\ndemo: {{ listen: \"127.0.0.1:{demo}\" }}\n\
             admin: {{ listen: \"127.0.0.1:{admin}\" }}\n\
             sse: {{ connection_tracking: true }}\n\
             services:\n  demo: {{ url: \"http://127.0.0.1:{demo}\" }}\n\
             host_rules:\n  - {{ pattern: \"*\", target: demo, name: demo-route }}\n",
            dir = dir.path().display()
        ),
    )
    .expect("write config");
    let _proxy = Running(
        Command::new(BIN)
            .arg("-c")
            .arg(&config)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn"),
    );
    wait_listening(&format!("http://127.0.0.1:{port}/")).await;
    let stream = client()
        .get(format!("http://127.0.0.1:{port}/demo/events"))
        .send()
        .await
        .expect("stream");
    let mut events = Events::new(stream);
    assert!(events.next().await.is_some());

    let connections = Command::new(BIN)
        .args(["connections", "--admin", &format!("127.0.0.1:{admin}")])
        .output()
        .expect("run connections");
    let out = String::from_utf8_lossy(&connections.stdout);
    assert!(
        connections.status.success(),
        "{}",
        String::from_utf8_lossy(&connections.stderr)
    );
    assert!(out.starts_with("ID"), "{out}");
    assert!(
        out.contains("demo-route") && out.contains("/demo/events"),
        "{out}"
    );
    assert!(out.contains("1 open stream(s)"), "{out}");

    // The admin address can come from the config file too.
    let upstreams = Command::new(BIN)
        .arg("upstreams")
        .arg("-c")
        .arg(&config)
        .output()
        .expect("run upstreams");
    let out = String::from_utf8_lossy(&upstreams.stdout);
    assert!(
        upstreams.status.success(),
        "{}",
        String::from_utf8_lossy(&upstreams.stderr)
    );
    assert!(out.contains(&format!("http://127.0.0.1:{demo}")), "{out}");

    let unreachable = Command::new(BIN)
        .args([
            "upstreams",
            "--admin",
            &format!("127.0.0.1:{}", free_port()),
        ])
        .output()
        .expect("run");
    assert!(!unreachable.status.success());
    assert!(String::from_utf8_lossy(&unreachable.stderr).contains("cannot reach the admin API"));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upgrade_lets_post_answers_finish_and_drains_get_streams() {
    // GET streams come from a counting origin (they reconnect with Last-Event-ID); POST
    // answers from one that sends 40 events, one every 50 ms, then ends.
    let counting = counting_origin(Duration::from_millis(20)).await;
    let answers = common::Origin::start(|head, mut conn| async move {
        let _ = conn.read_body(&head).await;
        if conn.sse_head().await.is_err() {
            return common::After::Close;
        }
        for id in 1..=40 {
            if conn
                .chunk(&format!("id: {id}\ndata: token {id}\n\n"))
                .await
                .is_err()
            {
                return common::After::Close;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = conn.end().await;
        common::After::Close
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let config = dir.path().join("streamgate.yaml");
    std::fs::write(
        &config,
        format!(
            "pid_file: {dir}/sg.pid\nupgrade_sock: {dir}/upgrade.sock\n\
             graceful_shutdown_timeout_seconds: 1\n\
             listen: [\"127.0.0.1:{port}\"]\n\
             sse: {{ drain_period: 1s, finish_period: 30s }}\n\
             services:\n  feed: {{ url: \"{}\" }}\n  llm: {{ url: \"{}\" }}\n\
             host_rules:\n  - pattern: \"*\"\n    target: feed\n    route_rules:\n      \
             - {{ pattern: \"/v1/*\", target: llm }}\n",
            counting.url(),
            answers.url(),
            dir = dir.path().display()
        ),
    )
    .expect("write config");
    let mut old = Running(start_binary(&config, false));
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    wait_listening(&format!("http://{addr}/")).await;
    let gets: Vec<Resumer> = (0..10).map(|_| Resumer::start(addr, "/events")).collect();
    let posts: Vec<_> = (0..20)
        .map(|_| {
            tokio::spawn(async move {
                let response = client()
                    .post(format!("http://{addr}/v1/chat/completions"))
                    .header("accept", "application/json")
                    .body("{\"stream\":true}")
                    .send()
                    .await
                    .expect("answer");
                let mut events = Events::new(response);
                let mut ids = Vec::new();
                loop {
                    match events.next_raw().await {
                        Some(Ok(event)) => ids.push(event),
                        Some(Err(e)) => panic!("the answer was cut after {ids:?}: {e}"),
                        None => return ids,
                    }
                }
            })
        })
        .collect();
    eventually("every client to stream", || async {
        gets.iter().all(|c| c.events() >= 3)
    })
    .await;

    // Mid-answer: the new process first, then SIGQUIT to the old one.
    let _new = Running(start_binary(&config, true));
    tokio::time::sleep(Duration::from_millis(300)).await;
    signal(old.0.id(), "-QUIT");
    let status = exited(&mut old.0).await;
    assert!(status.success(), "old process exit: {status}");

    // Every answer ran to its last event on the old process, cleanly ended.
    for post in posts {
        let ids = guard("an answer", post).await.expect("task");
        let expected: Vec<String> = (1..=40)
            .map(|i| format!("id: {i}\ndata: token {i}"))
            .collect();
        assert_eq!(ids, expected);
    }
    // GET streams were told to come back, and did, to the new process.
    let at_exit: Vec<u64> = gets.iter().map(|c| c.events()).collect();
    eventually(
        "every GET client to stream from the new process",
        || async { gets.iter().zip(&at_exit).all(|(c, n)| c.events() >= n + 5) },
    )
    .await;
    for client in gets {
        let seen = client.stop().await;
        assert!(seen.hints >= 1 && seen.connections >= 2, "{seen:?}");
        contiguous(&seen.ids).unwrap_or_else(|e| panic!("{e}: {:?}", seen.ids));
    }
}

/// The Dockerfile's exec-form instruction `name` (`ENTRYPOINT`, `HEALTHCHECK ... CMD`) as
/// arguments, with the image's paths replaced: the binary by the one built here, the
/// image's config by `config`.
fn dockerfile_command(name: &str, config: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Dockerfile"))
        .expect("Dockerfile");
    // Continuation lines joined, comments left out.
    let joined = text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
        .replace("\\\n", " ");
    let line = joined
        .lines()
        .find(|l| l.starts_with(name))
        .unwrap_or_else(|| panic!("no {name} in the Dockerfile"));
    let array = &line[line.find('[').expect("exec form")..];
    let args: Vec<String> = serde_json::from_str(array).expect("a JSON array");
    args.into_iter()
        .map(|a| match a.as_str() {
            "/usr/local/bin/streamgate" => BIN.to_string(),
            "/etc/streamgate/streamgate.yaml" => config.display().to_string(),
            _ => a,
        })
        .collect()
}

fn run(args: &[String], extra: &[&str]) -> Output {
    Command::new(&args[0])
        .args(&args[1..])
        .args(extra)
        .output()
        .expect("run")
}

#[test]
fn the_image_serves_the_production_config_and_checks_it_with_dash_t() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile")).expect("Dockerfile");
    assert!(
        dockerfile.contains("COPY conf/production.yaml /etc/streamgate/streamgate.yaml"),
        "the image's config is conf/production.yaml"
    );
    let production = root.join("conf/production.yaml");
    let entrypoint = dockerfile_command("ENTRYPOINT", &production);
    // `docker run IMAGE -t`
    let out = run(&entrypoint, &["-t"]);
    let stdout = succeeded(&out);
    assert!(
        stdout.contains(&format!("configuration ok: {}", production.display())),
        "{stdout}"
    );
    assert!(!stdout.contains("demo origin"), "no demo origin: {stdout}");
    assert!(stdout.contains("exits within 9s of SIGTERM"), "{stdout}");
    // `docker run IMAGE -c OTHER -t`: the last -c counts.
    let dir = tempfile::tempdir().expect("tempdir");
    let broken = dir.path().join("broken.yaml");
    std::fs::write(&broken, "listen: [\"127.0.0.1:1\"]\nservics: {}\n").expect("write");
    let out = run(&entrypoint, &["-c", &broken.display().to_string(), "-t"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("broken.yaml:2:1: `servics`"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The stop timings fit Docker's default stop timeout (10 s before SIGKILL).
    let config = streamgate::Config::load(&production).expect("loads");
    let grace = config.server.grace_period_seconds.expect("grace period");
    let stop = config
        .server
        .graceful_shutdown_timeout_seconds
        .expect("shutdown timeout");
    assert!(grace + stop < 10, "{grace} + {stop}");
    let drain = config.services["app"].sse.drain_period.as_secs();
    assert!(
        drain + streamgate::config::DRAIN_MARGIN_SECS <= grace,
        "drain {drain}"
    );
    assert!(config.demo.is_none());
    assert!(config.admin.is_some_and(|a| a.listen.ip().is_loopback()));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_health_subcommand_asks_the_admin_listener_as_the_healthcheck_does() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (port, demo, admin) = (free_port(), free_port(), free_port());
    let config = dir.path().join("streamgate.yaml");
    std::fs::write(
        &config,
        format!(
            "pid_file: {dir}/sg.pid\nupgrade_sock: {dir}/upgrade.sock\n\
             grace_period_seconds: 0\ngraceful_shutdown_timeout_seconds: 1\n\
             listen: [\"127.0.0.1:{port}\"]\ndemo: {{ listen: \"127.0.0.1:{demo}\" }}\n\
             admin: {{ listen: \"127.0.0.1:{admin}\", token_env: STREAMGATE_TEST_TOKEN }}\n\
             services:\n  demo: {{ url: \"http://127.0.0.1:{demo}\" }}\n\
             host_rules:\n  - {{ pattern: \"*\", target: demo }}\n",
            dir = dir.path().display()
        ),
    )
    .expect("write config");
    let healthcheck = dockerfile_command("HEALTHCHECK", &config);
    assert_eq!(healthcheck[1], "health", "{healthcheck:?}");
    let check = |extra: &[&str], token: Option<&str>| {
        let mut cmd = Command::new(&healthcheck[0]);
        cmd.args(&healthcheck[1..]).args(extra);
        match token {
            Some(t) => cmd.env("STREAMGATE_TEST_TOKEN", t),
            None => cmd.env_remove("STREAMGATE_TEST_TOKEN"),
        };
        cmd.output().expect("run health")
    };
    // Nothing listens yet.
    let down = check(&[], Some("s3cret"));
    assert_eq!(down.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&down.stderr).contains("cannot reach the admin API"));

    let mut proxy = Running(
        Command::new(BIN)
            .arg("-c")
            .arg(&config)
            .env("STREAMGATE_TEST_TOKEN", "s3cret")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn"),
    );
    wait_listening(&format!("http://127.0.0.1:{port}/")).await;
    common::listening(format!("127.0.0.1:{admin}").parse().expect("addr")).await;
    let up = check(&[], Some("s3cret"));
    assert_eq!(
        up.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );
    assert!(String::from_utf8_lossy(&up.stdout).contains("/healthz ok"));
    let ready = check(&["--ready"], Some("s3cret"));
    assert_eq!(
        ready.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ready.stderr)
    );
    // The token is read through the config, from the same variable.
    let wrong = check(&[], Some("other"));
    assert_eq!(wrong.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("401"));
    // In the image's argument order: `docker run IMAGE health` after the entrypoint's -c.
    let entrypoint = dockerfile_command("ENTRYPOINT", &config);
    let out = Command::new(&entrypoint[0])
        .args(&entrypoint[1..])
        .arg("health")
        .env("STREAMGATE_TEST_TOKEN", "s3cret")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(0));

    // Gone: unhealthy.
    signal(proxy.0.id(), "-TERM");
    exited(&mut proxy.0).await;
    assert_eq!(check(&[], Some("s3cret")).status.code(), Some(1));
}
