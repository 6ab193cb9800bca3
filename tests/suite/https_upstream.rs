//! HTTPS upstreams end to end: an origin served over TLS (tokio-rustls, with certificates
//! from a test CA made here) behind the proxy. Event streams go through the relay
//! (`Accept: text/event-stream`) and plain requests alike; both verify
//! the origin with the configured CA, send the configured SNI (none for an IP), offer only
//! http/1.1, and answer 502 with a TLS reason when verification fails. `verify: false`
//! accepts an untrusted certificate; `-t` shows the https URL and refuses a missing CA file.

use crate::common;
use common::binary::succeeded;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::ca::{Ca, Issued};
use common::{client, guard, read_head, sse_get, Events, Head, Proxy};
use tokio::io::{AsyncBufRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Mutex};
use tokio_rustls::rustls::server::Acceptor;
use tokio_rustls::LazyConfigAcceptor;

/// Events per stream the origin sends, each only after the test acknowledged the last.
const EVENTS: usize = 3;

/// What the origin saw of one TLS ClientHello.
#[derive(Debug, Clone, PartialEq)]
struct Hello {
    sni: Option<String>,
    alpn: Vec<String>,
}

/// An origin serving over TLS: `/events` is an event stream in lockstep with the test's
/// acknowledgements, any other path answers `200 hello over tls`.
struct TlsOrigin {
    addr: SocketAddr,
    hellos: mpsc::UnboundedReceiver<Hello>,
    requests: mpsc::UnboundedReceiver<Head>,
    acks: mpsc::UnboundedSender<()>,
    /// The client certificate (DER) presented in each completed handshake, if any.
    client_certs: mpsc::UnboundedReceiver<Option<Vec<u8>>>,
}

impl TlsOrigin {
    async fn start(bind: SocketAddr, cert: &Issued) -> TlsOrigin {
        TlsOrigin::start_with(bind, cert, None).await
    }

    /// An origin that requires a client certificate issued by `clients`, when given.
    async fn start_with(bind: SocketAddr, cert: &Issued, clients: Option<&Ca>) -> TlsOrigin {
        let (chain, key) = cert.rustls_pair();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("versions");
        let builder = match clients {
            None => builder.with_no_client_auth(),
            Some(clients) => {
                let mut roots = rustls::RootCertStore::empty();
                roots.add(clients.cert.der().clone()).expect("client CA");
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .build()
                .expect("client verifier");
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder
            .with_single_cert(chain, key)
            .expect("origin certificate");
        // Offer h2 too: the proxy must still pick http/1.1.
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let config = Arc::new(config);
        let listener = TcpListener::bind(bind).await.expect("bind origin");
        let addr = listener.local_addr().expect("origin addr");
        let (hello_tx, hellos) = mpsc::unbounded_channel();
        let (request_tx, requests) = mpsc::unbounded_channel();
        let (acks, ack_rx) = mpsc::unbounded_channel::<()>();
        let ack_rx = Arc::new(Mutex::new(ack_rx));
        let (client_tx, client_certs) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let config = config.clone();
                let client_tx = client_tx.clone();
                let hello_tx = hello_tx.clone();
                let request_tx = request_tx.clone();
                let ack_rx = ack_rx.clone();
                tokio::spawn(async move {
                    let Ok(start) = LazyConfigAcceptor::new(Acceptor::default(), tcp).await else {
                        return;
                    };
                    let hello = start.client_hello();
                    let _ = hello_tx.send(Hello {
                        sni: hello.server_name().map(str::to_string),
                        alpn: hello
                            .alpn()
                            .map(|protocols| {
                                protocols
                                    .map(|p| String::from_utf8_lossy(p).into_owned())
                                    .collect()
                            })
                            .unwrap_or_default(),
                    });
                    // A proxy that rejects the certificate ends the handshake here.
                    let Ok(tls) = start.into_stream(config).await else {
                        return;
                    };
                    let presented = tls.get_ref().1.peer_certificates();
                    let _ = client_tx.send(presented.and_then(|c| c.first()).map(|c| c.to_vec()));
                    let mut conn = BufReader::new(tls);
                    while let Some(head) = read_head(&mut conn).await {
                        let events = head.target.starts_with("/events");
                        let _ = request_tx.send(head);
                        let served = if events {
                            serve_events(&mut conn, &ack_rx).await
                        } else {
                            respond(&mut conn, "hello over tls").await
                        };
                        if served.is_err() || events {
                            return;
                        }
                    }
                });
            }
        });
        TlsOrigin {
            addr,
            hellos,
            requests,
            acks,
            client_certs,
        }
    }

    async fn next_hello(&mut self) -> Hello {
        guard("a TLS handshake at the origin", self.hellos.recv())
            .await
            .expect("hello channel")
    }

    async fn next_request(&mut self) -> Head {
        guard("a request at the origin", self.requests.recv())
            .await
            .expect("request channel")
    }

    /// The next request for `target`, past any other (a health check's, say).
    async fn next_request_for(&mut self, target: &str) -> Head {
        loop {
            let head = self.next_request().await;
            if head.target == target {
                return head;
            }
        }
    }
}

async fn write_flush<W: AsyncWrite + Unpin>(w: &mut W, bytes: &[u8]) -> std::io::Result<()> {
    w.write_all(bytes).await?;
    w.flush().await
}

async fn respond<S: AsyncBufRead + AsyncWrite + Unpin>(
    conn: &mut S,
    body: &str,
) -> std::io::Result<()> {
    let response = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    write_flush(conn, response.as_bytes()).await
}

async fn serve_events<S: AsyncBufRead + AsyncWrite + Unpin>(
    conn: &mut S,
    acks: &Mutex<mpsc::UnboundedReceiver<()>>,
) -> std::io::Result<()> {
    let mut acks = acks.lock().await;
    write_flush(
        conn,
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n",
    )
    .await?;
    for i in 0..EVENTS {
        let event = format!("id: {i}\ndata: event {i}\n\n");
        let chunk = format!("{:x}\r\n{event}\r\n", event.len());
        write_flush(conn, chunk.as_bytes()).await?;
        if acks.recv().await.is_none() {
            break;
        }
    }
    write_flush(conn, b"0\r\n\r\n").await
}

/// The address `localhost` resolves to first: where the proxy will connect for a
/// `https://localhost` service.
async fn localhost() -> SocketAddr {
    tokio::net::lookup_host(("localhost", 0))
        .await
        .expect("resolve localhost")
        .next()
        .expect("localhost has an address")
}

/// Writes the config (one service `feed` with `service` as its keys, routed for every
/// host) into `dir` and returns its path.
fn write_config(dir: &Path, port: u16, service: &str) -> PathBuf {
    let text = format!(
        "listen: [\"127.0.0.1:{port}\"]\nservices:\n  feed:\n{service}host_rules:\n  \
         - pattern: \"*\"\n    target: feed\n"
    );
    let path = dir.join("streamgate.yaml");
    std::fs::write(&path, text).expect("write config");
    path
}

/// Starts a proxy in front of a service with `service`'s keys (indented four spaces).
async fn start_proxy(dir: &Path, service: &str) -> Proxy {
    Proxy::start_file(&write_config(dir, common::free_port(), service)).await
}

fn write_ca(dir: &Path, ca: &Ca) {
    std::fs::write(dir.join("ca.pem"), ca.pem()).expect("write CA");
}

async fn get(proxy: &Proxy, path: &str) -> (u16, String) {
    let response = client()
        .get(proxy.url(path))
        .send()
        .await
        .expect("the proxy answers");
    let status = response.status().as_u16();
    (status, response.text().await.expect("body"))
}

/// An event stream through the proxy from `origin`, acknowledging each event as it
/// arrives, to its clean end.
async fn lockstep_stream(proxy: &Proxy, origin: &TlsOrigin) {
    let response = sse_get(proxy.url("/events")).await;
    assert_eq!(response.status(), 200);
    let mut events = Events::new(response);
    for i in 0..EVENTS {
        let event = events.next().await.expect("an event");
        assert_eq!(event, format!("id: {i}\ndata: event {i}"));
        origin.acks.send(()).expect("ack");
    }
    assert_eq!(events.next().await, None, "the stream ends cleanly");
}

async fn get_events(proxy: &Proxy) -> (u16, String) {
    let response = sse_get(proxy.url("/events")).await;
    let status = response.status().as_u16();
    (status, response.text().await.expect("body"))
}

#[tokio::test]
async fn event_streams_and_plain_requests_reach_an_https_origin_verified_with_its_ca() {
    let ca = Ca::new();
    let mut origin = TlsOrigin::start(localhost().await, &ca.issue(&["localhost"])).await;
    let dir = tempfile::tempdir().expect("tempdir");
    write_ca(dir.path(), &ca);
    let port = origin.addr.port();
    let proxy = start_proxy(
        dir.path(),
        &format!("    url: \"https://localhost:{port}\"\n    tls: {{ ca_file: ca.pem }}\n"),
    )
    .await;

    // An event stream, through the relay: each event arrives before the next is sent.
    lockstep_stream(&proxy, &origin).await;
    let hello = origin.next_hello().await;
    assert_eq!(
        hello.sni.as_deref(),
        Some("localhost"),
        "SNI is the URL host"
    );
    assert_eq!(hello.alpn, ["http/1.1"], "only http/1.1 is offered");
    let head = origin.next_request().await;
    assert_eq!(head.target, "/events");
    assert_eq!(head.header("accept"), Some("text/event-stream"));

    // A plain GET.
    assert_eq!(get(&proxy, "/plain").await, (200, "hello over tls".into()));
    let hello = origin.next_hello().await;
    assert_eq!(hello.sni.as_deref(), Some("localhost"));
    assert_eq!(hello.alpn, ["http/1.1"]);
    assert_eq!(origin.next_request().await.target, "/plain");
}

#[tokio::test]
async fn the_configured_sni_reaches_the_origin_and_is_verified() {
    let ca = Ca::new();
    let bind = SocketAddr::from(([127, 0, 0, 1], 0));
    let mut origin = TlsOrigin::start(bind, &ca.issue(&["feed.internal"])).await;
    let dir = tempfile::tempdir().expect("tempdir");
    write_ca(dir.path(), &ca);
    let proxy = start_proxy(
        dir.path(),
        &format!(
            "    url: \"https://{}\"\n    tls:\n      sni: feed.internal\n      \
             ca_file: ca.pem\n",
            origin.addr
        ),
    )
    .await;
    assert_eq!(get(&proxy, "/x").await, (200, "hello over tls".into()));
    let hello = origin.next_hello().await;
    assert_eq!(hello.sni.as_deref(), Some("feed.internal"));
    origin.next_request().await;
}

#[tokio::test]
async fn an_ip_host_without_sni_sends_none_and_is_verified_against_the_ip() {
    let ca = Ca::new();
    let bind = SocketAddr::from(([127, 0, 0, 1], 0));
    let mut origin = TlsOrigin::start(bind, &ca.issue(&["127.0.0.1"])).await;
    let dir = tempfile::tempdir().expect("tempdir");
    write_ca(dir.path(), &ca);
    let proxy = start_proxy(
        dir.path(),
        &format!(
            "    url: \"https://{}\"\n    tls: {{ ca_file: ca.pem }}\n",
            origin.addr
        ),
    )
    .await;
    assert_eq!(get(&proxy, "/x").await, (200, "hello over tls".into()));
    assert_eq!(origin.next_hello().await.sni, None, "no SNI for an IP");

    // The same IP, a certificate for a name only: refused, for both request paths.
    let mut named = TlsOrigin::start(bind, &ca.issue(&["feed.internal"])).await;
    let other = tempfile::tempdir().expect("tempdir");
    write_ca(other.path(), &ca);
    let proxy = start_proxy(
        other.path(),
        &format!(
            "    url: \"https://{}\"\n    tls: {{ ca_file: ca.pem }}\n",
            named.addr
        ),
    )
    .await;
    for (status, body) in [get(&proxy, "/x").await, get_events(&proxy).await] {
        assert_eq!(status, 502, "{body}");
        assert!(
            body.starts_with("502 service `feed`: TLS to the origin failed: ")
                && body.contains("not valid for name \"127.0.0.1\""),
            "{body}"
        );
    }
    assert!(named.requests.try_recv().is_err(), "no request got through");
}

#[tokio::test]
async fn an_untrusted_certificate_is_a_502_naming_the_service_and_tls() {
    let origin_ca = Ca::new();
    let mut origin = TlsOrigin::start(localhost().await, &origin_ca.issue(&["localhost"])).await;
    let port = origin.addr.port();
    // Another CA in ca_file, and no ca_file at all (the system store): both refuse.
    let dir = tempfile::tempdir().expect("tempdir");
    write_ca(dir.path(), &Ca::new());
    let wrong_ca = start_proxy(
        dir.path(),
        &format!("    url: \"https://localhost:{port}\"\n    tls: {{ ca_file: ca.pem }}\n"),
    )
    .await;
    let other = tempfile::tempdir().expect("tempdir");
    let system = start_proxy(
        other.path(),
        &format!("    url: \"https://localhost:{port}\"\n"),
    )
    .await;
    // The system store does not know the test CA at all; a CA of the same name in
    // ca_file fails on the signature instead.
    for (proxy, why) in [(&wrong_ca, "BadSignature"), (&system, "UnknownIssuer")] {
        for (status, body) in [get(proxy, "/x").await, get_events(proxy).await] {
            assert_eq!(status, 502, "{body}");
            assert!(
                body.starts_with("502 service `feed`: TLS to the origin failed: ")
                    && body.contains(&format!("invalid peer certificate: {why}"))
                    && !body.trim_end().contains('\n'),
                "one line naming the service and TLS: {body}"
            );
        }
    }
    assert!(
        origin.requests.try_recv().is_err(),
        "no request got through"
    );
}

#[tokio::test]
async fn verify_false_accepts_an_untrusted_certificate() {
    let untrusted = Ca::new().issue(&["somewhere.else"]);
    let mut origin = TlsOrigin::start(localhost().await, &untrusted).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let port = origin.addr.port();
    let proxy = start_proxy(
        dir.path(),
        &format!("    url: \"https://localhost:{port}\"\n    tls: {{ verify: false }}\n"),
    )
    .await;
    assert_eq!(get(&proxy, "/x").await, (200, "hello over tls".into()));
    let mut events = Events::new(sse_get(proxy.url("/events")).await);
    assert_eq!(events.next().await.as_deref(), Some("id: 0\ndata: event 0"));
    assert_eq!(
        origin.next_hello().await.sni.as_deref(),
        Some("localhost"),
        "SNI is still sent"
    );
}

#[test]
fn check_prints_https_services_and_refuses_a_missing_ca_file() {
    let bin = common::binary::BIN;
    let dir = tempfile::tempdir().expect("tempdir");
    write_ca(dir.path(), &Ca::new());
    let ok = write_config(
        dir.path(),
        18443,
        "    url: \"https://feed.internal:8443/api\"\n    tls: { ca_file: ca.pem }\n",
    );
    let out = Command::new(bin)
        .args(["-t", "-c"])
        .arg(&ok)
        .output()
        .expect("run streamgate -t");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("https://feed.internal:8443/api"),
        "{stdout}"
    );
    assert!(
        stdout.contains("tls: verify, sni feed.internal, CA "),
        "{stdout}"
    );

    let missing = write_config(
        dir.path(),
        18443,
        "    url: \"https://feed.internal\"\n    tls:\n      ca_file: certs/missing.pem\n",
    );
    let out = Command::new(bin)
        .args(["-t", "-c"])
        .arg(&missing)
        .output()
        .expect("run streamgate -t");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("streamgate.yaml:6:")
            && stderr.contains("`services.feed.tls.ca_file`")
            && stderr.contains("certs/missing.pem"),
        "{stderr}"
    );
}

/// The top-level `ca_file` (Pingora's) is the trust of https services without a `ca_file`
/// of their own, found beside the config file whatever the working directory, and checked
/// when the config loads as a service's is: a missing one is refused by `-t` and at start
/// with its file, line and key (Pingora's connectors, which load it at start, panicked).
#[tokio::test]
async fn the_top_level_ca_file_is_the_trust_of_services_without_one() {
    let ca = Ca::new();
    let origin = TlsOrigin::start(localhost().await, &ca.issue(&["localhost"])).await;
    let dir = tempfile::tempdir().expect("tempdir");
    write_ca(dir.path(), &ca);
    let config = |ca_file: &str| {
        let text = format!(
            "ca_file: {ca_file}\nlisten: [\"127.0.0.1:{}\"]\nservices:\n  feed:\n    \
             url: \"https://localhost:{}\"\nhost_rules:\n  - pattern: \"*\"\n    target: feed\n",
            common::free_port(),
            origin.addr.port()
        );
        let path = dir.path().join("streamgate.yaml");
        std::fs::write(&path, text).expect("write config");
        path
    };
    let check = |path: &Path| {
        Command::new(common::binary::BIN)
            .args(["-t", "-c"])
            .arg(path)
            .current_dir("/")
            .output()
            .expect("run streamgate -t")
    };

    let path = config("ca.pem");
    let out = check(&path);
    let stdout = succeeded(&out);
    let expected = format!("trust ca_file {}", dir.path().join("ca.pem").display());
    assert!(stdout.contains(&expected), "{stdout}");
    let proxy = Proxy::start_file(&path).await;
    let response = sse_get(proxy.url("/events")).await;
    assert_eq!(response.status(), 200);
    let mut events = Events::new(response);
    for i in 0..EVENTS {
        assert_eq!(
            events.next().await.expect("an event"),
            format!("id: {i}\ndata: event {i}")
        );
        origin.acks.send(()).expect("ack");
    }
    assert_eq!(events.next().await, None, "the stream ends cleanly");
    assert_eq!(get(&proxy, "/plain").await, (200, "hello over tls".into()));

    let path = config("missing.pem");
    let out = check(&path);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let at = format!("{}:1:1: `ca_file`: cannot read ", path.display());
    assert!(
        stderr.contains(&at) && stderr.contains("missing.pem"),
        "{stderr}"
    );
    let out = Command::new(common::binary::BIN)
        .arg("-c")
        .arg(&path)
        .output()
        .expect("run streamgate");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&at) && !stderr.contains("panicked"),
        "{stderr}"
    );
}

/// Pingora's connectors load the system's store of trusted certificates at start (the
/// files `SSL_CERT_FILE` and `SSL_CERT_DIR` name, when set) and panicked when they could
/// not: `-t` and the start load it first and end with the reason; a store that loads is
/// counted by `-t`.
#[test]
fn a_system_store_that_cannot_load_ends_the_start_with_the_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(
        dir.path(),
        common::free_port(),
        "    url: \"https://feed.internal\"\n",
    );
    let run = |args: &[&str], config: &Path, file: &Path, dir: &Path| {
        Command::new(common::binary::BIN)
            .args(args)
            .arg(config)
            .env("SSL_CERT_FILE", file)
            .env("SSL_CERT_DIR", dir)
            .output()
            .expect("run streamgate")
    };
    let (absent, no_dir) = (dir.path().join("absent.pem"), dir.path().join("absent"));
    for args in [&["-t", "-c"][..], &["-c"]] {
        let out = run(args, &path, &absent, &no_dir);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains("the system's trusted certificates (SSL_CERT_FILE=")
                && stderr.contains("absent.pem")
                && stderr.contains("cannot be loaded")
                && !stderr.contains("panicked"),
            "{args:?}: {stderr}"
        );
    }
    // Pingora's health checks load the system's store whatever the top-level `ca_file`
    // (their connectors take no options): a service with one names its key.
    let ca = Ca::new();
    std::fs::write(dir.path().join("ca.pem"), ca.pem()).expect("write CA");
    let checked = dir.path().join("checked.yaml");
    std::fs::write(
        &checked,
        "ca_file: ca.pem\nservices:\n  feed:\n    url: \"http://127.0.0.1:1\"\n    \
         health_check: { type: tcp }\n",
    )
    .expect("write config");
    let out = run(&["-t", "-c"], &checked, &absent, &no_dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("checked.yaml:5:5: `services.feed.health_check`: the system's trusted")
            && !stderr.contains("panicked"),
        "{stderr}"
    );

    let store = dir.path().join("store");
    std::fs::create_dir(&store).expect("store dir");
    std::fs::write(dir.path().join("bundle.pem"), ca.pem() + &Ca::new().pem()).expect("bundle");
    let out = run(&["-t", "-c"], &path, &dir.path().join("bundle.pem"), &store);
    let stdout = succeeded(&out);
    assert!(
        stdout.contains("trust the system's store (2 certificates)"),
        "{stdout}"
    );
}

/// Spare connections (`preconnect`) to an https origin: made with their handshake done, kept
/// although the origin sends session tickets on them unasked, and the next stream goes out
/// on one without a handshake of its own.
#[tokio::test]
async fn the_next_stream_takes_a_spare_whose_handshake_is_done() {
    let ca = Ca::new();
    let mut origin = TlsOrigin::start(localhost().await, &ca.issue(&["localhost"])).await;
    let dir = tempfile::tempdir().expect("tempdir");
    write_ca(dir.path(), &ca);
    let port = common::free_port();
    let text = format!(
        "threads: 1\nlisten: [\"127.0.0.1:{port}\"]\nservices:\n  feed:\n    \
         url: \"https://localhost:{}\"\n    tls: {{ ca_file: ca.pem }}\n    preconnect: 2\n\
         host_rules:\n  - {{ pattern: \"*\", target: feed }}\n",
        origin.addr.port()
    );
    let path = dir.path().join("streamgate.yaml");
    std::fs::write(&path, text).expect("write config");
    let proxy = Proxy::start_file(&path).await;
    let stream = |origin: &mut TlsOrigin| {
        let acks = origin.acks.clone();
        let url = proxy.url("/events");
        async move {
            let mut events = Events::new(sse_get(url).await);
            for _ in 0..EVENTS {
                events.next().await.expect("an event");
                acks.send(()).expect("ack");
            }
            assert_eq!(events.next().await, None, "the stream ends cleanly");
        }
    };
    // The first stream connects (a handshake), and two spares follow (two more).
    stream(&mut origin).await;
    for _ in 0..3 {
        origin.next_hello().await;
    }
    // Their session tickets have reached the proxy by the time the next stream comes.
    tokio::time::sleep(Duration::from_millis(200)).await;
    stream(&mut origin).await;
    // The second stream took a spare: one more handshake, for the spare that replaces it.
    origin.next_hello().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        origin.hellos.try_recv().is_err(),
        "four handshakes in all: the first stream's, two spares, one replacement"
    );
    assert_eq!(origin.next_request().await.target, "/events");
    assert_eq!(origin.next_request().await.target, "/events");
}

/// An origin (certificate by `ca`) that requires a client certificate by `clients`, and a
/// proxy in front of it that presents `client` (written into `dir`), its HTTP health
/// checks every 100 ms.
async fn mutual_tls(dir: &Path, ca: &Ca, clients: &Ca, client: &Issued) -> (TlsOrigin, Proxy) {
    let origin =
        TlsOrigin::start_with(localhost().await, &ca.issue(&["localhost"]), Some(clients)).await;
    write_ca(dir, ca);
    client.write(dir, "proxy");
    let port = origin.addr.port();
    let proxy = start_proxy(
        dir,
        &format!(
            "    url: \"https://localhost:{port}\"\n    tls: {{ ca_file: ca.pem, \
             client_cert: proxy.pem, client_key: proxy.key }}\n    health_check: \
             {{ type: http, path: /health, interval: 100ms }}\n"
        ),
    )
    .await;
    (origin, proxy)
}

/// Mutual TLS toward the origin: with `tls.client_cert` and `tls.client_key` the proxy
/// presents that certificate to an origin that requires one, on event streams (the relay),
/// plain requests and HTTP health checks alike; without them such
/// an origin is a 502 naming the service and the origin's TLS alert.
#[tokio::test]
async fn a_client_certificate_is_presented_to_an_origin_that_asks_for_one() {
    let ca = Ca::new();
    let clients = Ca::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let client = clients.issue_client("streamgate-proxy", false);
    let (mut origin, proxy) = mutual_tls(dir.path(), &ca, &clients, &client).await;
    let port = origin.addr.port();

    lockstep_stream(&proxy, &origin).await;
    origin.next_request_for("/events").await;
    assert_eq!(get(&proxy, "/plain").await, (200, "hello over tls".into()));
    origin.next_request_for("/plain").await;
    origin.next_request_for("/health").await;
    let mut presented = Vec::new();
    while let Ok(cert) = origin.client_certs.try_recv() {
        presented.push(cert);
    }
    assert!(presented.len() >= 3, "{} handshakes", presented.len());
    assert!(
        presented
            .iter()
            .all(|c| c.as_deref() == Some(client.der.as_ref())),
        "every handshake presented the configured certificate"
    );

    // The same origin behind a proxy without a client certificate: refused.
    let other = tempfile::tempdir().expect("tempdir");
    write_ca(other.path(), &ca);
    let without = start_proxy(
        other.path(),
        &format!("    url: \"https://localhost:{port}\"\n    tls: {{ ca_file: ca.pem }}\n"),
    )
    .await;
    for (status, body) in [get(&without, "/x").await, get_events(&without).await] {
        assert_eq!(status, 502, "{body}");
        assert_eq!(
            body.trim_end(),
            "502 service `feed`: TLS to the origin failed: received fatal alert: \
             CertificateRequired"
        );
    }
}

/// `-t` names the client certificate and when it expires, warns of an expired one, and
/// refuses half a pair, a key that is not the certificate's, and a missing file, each at
/// its line and key.
#[test]
fn check_shows_the_client_certificate_and_refuses_a_broken_pair() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clients = Ca::new();
    clients
        .issue_client("streamgate-proxy", false)
        .write(dir.path(), "proxy");
    clients
        .issue_client("old-proxy", true)
        .write(dir.path(), "old");
    std::fs::copy(dir.path().join("old.key"), dir.path().join("other.key")).expect("copy");
    let check = |tls: &str| {
        let service = format!("    url: \"https://feed.internal\"\n    tls:\n{tls}");
        let path = write_config(dir.path(), 18443, &service);
        Command::new(common::binary::BIN)
            .args(["-t", "-c"])
            .arg(&path)
            .output()
            .expect("run streamgate -t")
    };
    let stdout = succeeded(&check(
        "      client_cert: proxy.pem\n      client_key: proxy.key\n",
    ));
    assert!(
        stdout.contains("client certificate CN=streamgate-proxy (")
            && stdout.contains("proxy.pem, expires ")
            && stdout.contains(" days)"),
        "{stdout}"
    );
    let stdout = succeeded(&check(
        "      client_cert: old.pem\n      client_key: old.key\n",
    ));
    assert!(
        stdout.contains("warning: ")
            && stdout.contains("`services.feed.tls.client_cert`")
            && stdout.contains("(EXPIRED)"),
        "{stdout}"
    );
    for (tls, line_key, says) in [
        (
            "      client_cert: proxy.pem\n",
            "streamgate.yaml:6:7: `services.feed.tls.client_cert`",
            "needs `client_key`",
        ),
        (
            "      client_key: proxy.key\n",
            "streamgate.yaml:6:7: `services.feed.tls.client_key`",
            "needs `client_cert`",
        ),
        (
            "      client_cert: proxy.pem\n      client_key: other.key\n",
            "streamgate.yaml:7:7: `services.feed.tls.client_key`",
            "is not the private key of the certificate in",
        ),
        (
            "      client_cert: missing.pem\n      client_key: proxy.key\n",
            "streamgate.yaml:6:7: `services.feed.tls.client_cert`",
            "missing.pem",
        ),
    ] {
        let out = check(tls);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{tls}: {stderr}");
        assert!(
            stderr.contains(line_key) && stderr.contains(says) && !stderr.contains("panick"),
            "{tls}: {stderr}"
        );
    }
}

/// A renewed client certificate (its files written again: the watcher reloads the config)
/// is presented from then on by requests and by the health checks alike: the checks are
/// made anew when the TLS they present changes.
#[tokio::test]
async fn a_renewed_client_certificate_reaches_the_health_checks_too() {
    let ca = Ca::new();
    let clients = Ca::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let first = clients.issue_client("proxy-2026", false);
    let (mut origin, _proxy) = mutual_tls(dir.path(), &ca, &clients, &first).await;
    let presented = |origin: &mut TlsOrigin| {
        let mut seen = Vec::new();
        while let Ok(cert) = origin.client_certs.try_recv() {
            seen.push(cert.unwrap_or_default());
        }
        seen
    };
    common::eventually("a health check with the first certificate", || {
        let found = presented(&mut origin)
            .iter()
            .any(|c| c[..] == first.der[..]);
        async move { found }
    })
    .await;
    // Renewed (a reload that meets the new key beside the old certificate is refused;
    // the one after the second file is written loads both).
    let renewed = clients.issue_client("proxy-2027", false);
    renewed.write(dir.path(), "proxy");
    common::eventually("a health check with the renewed certificate", || {
        let found = presented(&mut origin)
            .iter()
            .any(|c| c[..] == renewed.der[..]);
        async move { found }
    })
    .await;
}
