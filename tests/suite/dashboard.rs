//! The admin dashboard in a real browser: headless Chromium (Debian package `chromium`,
//! installed by `.ci/run`), driven over the DevTools protocol.

use crate::common;

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, guard, sse_get, After, Events, Origin, Proxy};
use serde_json::{json, Value};
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

struct Browser {
    child: Child,
    _profile: tempfile::TempDir,
    socket: WebSocket<MaybeTlsStream<TcpStream>>,
    next_id: u64,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Browser {
    /// Starts headless Chromium with a fresh profile and attaches to its first page.
    fn start() -> Browser {
        let profile = tempfile::tempdir().expect("profile dir");
        let child = Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-quic",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromium is installed by .ci/run (Debian package chromium)");
        // Chromium writes the port it chose into the profile.
        let port_file = profile.path().join("DevToolsActivePort");
        let deadline = Instant::now() + Duration::from_secs(20);
        let port: u16 = loop {
            if let Some(port) = std::fs::read_to_string(&port_file)
                .ok()
                .and_then(|t| t.lines().next().and_then(|l| l.trim().parse().ok()))
            {
                break port;
            }
            assert!(Instant::now() < deadline, "chromium did not start");
            std::thread::sleep(Duration::from_millis(50));
        };
        let list: Value = loop {
            let listed = http_get(port, "/json/list").and_then(|b| serde_json::from_str(&b).ok());
            if let Some(v) = listed {
                break v;
            }
            assert!(Instant::now() < deadline, "no DevTools target list");
            std::thread::sleep(Duration::from_millis(50));
        };
        let page = list
            .as_array()
            .and_then(|targets| targets.iter().find(|t| t["type"] == "page"))
            .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            .expect("a page target")
            .to_string();
        let (socket, _) = tungstenite::connect(page).expect("DevTools websocket");
        Browser {
            child,
            _profile: profile,
            socket,
            next_id: 0,
        }
    }

    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let message = json!({ "id": id, "method": method, "params": params });
        self.socket
            .send(Message::Text(message.to_string().into()))
            .expect("send");
        loop {
            let reply = self.socket.read().expect("read");
            if let Message::Text(text) = reply {
                let v: Value = serde_json::from_str(&text).expect("json");
                if v["id"] == id {
                    return v;
                }
            }
        }
    }

    /// Evaluates `expression` in the page and returns its value.
    fn eval(&mut self, expression: &str) -> Value {
        let v = self.call(
            "Runtime.evaluate",
            json!({ "expression": expression, "returnByValue": true }),
        );
        v["result"]["result"]["value"].clone()
    }

    /// Evaluates `expression` until it is true.
    fn wait_for(&mut self, what: &str, expression: &str) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while self.eval(expression) != Value::Bool(true) {
            assert!(Instant::now() < deadline, "the page never showed: {what}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A plain HTTP/1.1 GET on loopback, returning the body (read by its Content-Length:
/// the DevTools server keeps connections open).
fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n\r\n"
    )
    .ok()?;
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf).ok()?;
        if n == 0 {
            return None;
        }
        data.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&data).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            if body.len() >= length {
                return Some(body.to_string());
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_shows_a_live_stream_and_ends_it() {
    let origin = Origin::start(|_, mut conn| async move {
        conn.sse_head().await.expect("head");
        for i in 0.. {
            if conn
                .chunk(&format!("id: {i}\ndata: tick\n\n"))
                .await
                .is_err()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        After::Close
    })
    .await;
    let admin = free_port();
    let proxy = Proxy::start(&format!(
        "admin: {{ listen: \"127.0.0.1:{admin}\" }}\nsse: {{ connection_tracking: true }}\n\
         services:\n  feed: {{ url: \"{}\" }}\n\
         host_rules:\n  - {{ pattern: \"*\", target: feed, name: dashboard-route }}\n",
        origin.url()
    ))
    .await;
    let stream = sse_get(proxy.url("/events")).await;
    let mut events = Events::new(stream);
    assert!(events.next().await.is_some());

    let dashboard = format!("http://127.0.0.1:{admin}/");
    tokio::task::block_in_place(|| {
        let mut browser = Browser::start();
        browser.call("Page.navigate", json!({ "url": dashboard }));
        browser.wait_for(
            "the stream's route in the open streams table",
            "!!document.querySelector('#streams tbody tr[data-route=\"dashboard-route\"]')",
        );
        browser.eval("document.querySelector('#streams button.end').click()");
        browser.wait_for(
            "the stream to leave the table",
            "document.querySelectorAll('#streams tbody tr').length === 0",
        );
        browser.wait_for(
            "the close in the recent closes",
            "document.querySelector('#recent tbody').textContent.includes('ended')",
        );
    });
    // The client saw the retry hint, then the end of the stream.
    assert_eq!(
        guard("the hint", async {
            loop {
                match events.next().await {
                    Some(e) if e.starts_with("retry:") => return e,
                    Some(_) => continue,
                    None => panic!("the stream ended without a retry hint"),
                }
            }
        })
        .await,
        "retry: 3000"
    );
    // Ended on purpose, between two events: a clean end, not a cut.
    assert!(events.until_end().await.is_ok());
}
