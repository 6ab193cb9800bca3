//! TLS termination and HTTP/2 downstream, end to end: certificates from a test CA made here,
//! SNI and ALPN as real clients negotiate them, twenty event streams on one HTTP/2
//! connection, a stream reset closing only its own upstream, h2c, redirects to https,
//! certificates renewed on disk, broken ones refused, and `-t`'s certificate report.

use crate::common;
use common::binary::succeeded;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::ca::{Ca, Issued};
use common::{eventually, guard, listening, After, Origin, Proxy};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// A proxy started from a config file in a temporary directory, next to its certificates.
struct Site {
    dir: tempfile::TempDir,
    ca: Ca,
}

impl Site {
    /// Writes `certs` (stem and names) and the config made by `config` (given the
    /// directory), then starts the proxy and waits until every listener in `wait` listens.
    async fn start(
        certs: &[(&str, &[&str])],
        config: impl FnOnce(&Path) -> String,
        wait: &[SocketAddr],
    ) -> (Site, Vec<Issued>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Ca::new();
        let issued: Vec<Issued> = certs
            .iter()
            .map(|(stem, names)| {
                let issued = ca.issue(names);
                issued.write(dir.path(), stem);
                issued
            })
            .collect();
        let path = dir.path().join("streamgate.yaml");
        std::fs::write(&path, config(dir.path())).expect("write config");
        Proxy::start_file(&path).await;
        for addr in wait {
            listening(*addr).await;
        }
        (Site { dir, ca }, issued)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// What a client does about TLS 1.3.
#[derive(Clone, Copy, PartialEq)]
enum Tls12 {
    /// Both versions, 1.3 preferred.
    No,
    /// TLS 1.2 only, offering no 1.3 cipher suite (as OpenSSL with `-no_tls1_3`).
    Only,
    /// TLS 1.2 only, yet offering 1.3 cipher suites (as rustls restricted to 1.2).
    OffersTls13Suites,
}

fn tls_config(ca: &Ca, alpn: &[&[u8]], tls12: Tls12) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert.der().clone()).expect("CA root");
    let mut provider = rustls::crypto::ring::default_provider();
    if tls12 == Tls12::Only {
        provider.cipher_suites.retain(|s| s.tls13().is_none());
    }
    let versions: &[&rustls::SupportedProtocolVersion] = match tls12 {
        Tls12::No => &[&rustls::version::TLS13, &rustls::version::TLS12],
        _ => &[&rustls::version::TLS12],
    };
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(versions)
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// A TLS connection to `addr` with `sni`, verified against the test CA.
async fn tls_connect(
    ca: &Ca,
    addr: SocketAddr,
    sni: &str,
    alpn: &[&[u8]],
) -> std::io::Result<TlsStream<TcpStream>> {
    tls_connect_with(tls_config(ca, alpn, Tls12::No), addr, sni).await
}

async fn tls_connect_with(
    config: Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    sni: &str,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(sni.to_string()).expect("server name");
    TlsConnector::from(config).connect(name, tcp).await
}

/// The certificate the server presented.
fn served(stream: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    let (_, conn) = stream.get_ref();
    conn.peer_certificates()
        .and_then(|c| c.first())
        .expect("a server certificate")
        .clone()
}

fn alpn(stream: &TlsStream<TcpStream>) -> Option<Vec<u8>> {
    stream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec)
}

/// A reqwest client that trusts the test CA and resolves `host` to `addr`.
fn https_client(ca: &Ca, host: &str, addr: SocketAddr) -> reqwest::Client {
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca.pem().as_bytes()).expect("CA"))
        .resolve(host, addr)
        .pool_max_idle_per_host(0)
        .build()
        .expect("client")
}

/// The `certificates` entry for the `main` pair.
const MAIN_CERT: &str = "        - { cert: DIR/main.pem, key: DIR/main.key }\n";

fn tls_listener(port: u16, dir: &Path, certs: &str, extra: &str) -> String {
    format!(
        "  - address: \"127.0.0.1:{port}\"\n    tls:\n      certificates:\n{certs}{extra}",
        certs = certs.replace("DIR", &dir.display().to_string())
    )
}

fn routes(origin: &Origin) -> String {
    format!(
        "services:\n  feed: {{ url: \"{}\" }}\nhost_rules:\n  - pattern: \"*\"\n    target: feed\n",
        origin.url()
    )
}

/// A proxy with the `main` certificate (for `example.test`) on one TLS listener at `port`,
/// routing to `origin`; `top` goes before the `listen` key, `tail` after the routes.
async fn main_site(port: u16, origin: &Origin, top: &str, tail: &str) -> (Site, Vec<Issued>) {
    Site::start(
        &[("main", &["example.test"])],
        |dir| {
            format!(
                "{top}listen:\n{}{}{tail}",
                tls_listener(port, dir, MAIN_CERT, ""),
                routes(origin)
            )
        },
        &[addr(port)],
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn sni_picks_the_certificate_and_alpn_the_protocol() {
    let mut origin = Origin::plain("hello").await;
    let [h2, h1_only, tls13] = common::free_ports();
    let certs = "        - { cert: DIR/main.pem, key: DIR/main.key }\n        \
                 - { cert: DIR/wild.pem, key: DIR/wild.key, hosts: [\"*.wild.test\"] }\n";
    let (site, issued) = Site::start(
        &[
            ("main", &["example.test", "www.example.test"]),
            ("wild", &["*.wild.test"]),
        ],
        |dir| {
            format!(
                "listen:\n{}{}{}{}",
                tls_listener(h2, dir, certs, ""),
                tls_listener(h1_only, dir, certs, "    http2: false\n"),
                tls_listener(tls13, dir, certs, "      min_version: \"1.3\"\n"),
                routes(&origin)
            )
        },
        &[addr(h2), addr(h1_only), addr(tls13)],
    )
    .await;
    let (main, wild) = (&issued[0].der, &issued[1].der);
    let both: &[&[u8]] = &[b"h2", b"http/1.1"];

    let conn = tls_connect(&site.ca, addr(h2), "www.example.test", both)
        .await
        .expect("handshake");
    assert_eq!(&served(&conn), main);
    assert_eq!(alpn(&conn).as_deref(), Some(&b"h2"[..]));
    let conn = tls_connect(&site.ca, addr(h2), "a.wild.test", both)
        .await
        .expect("handshake");
    assert_eq!(&served(&conn), wild, "the wildcard certificate by SNI");
    let conn = tls_connect(&site.ca, addr(h2), "example.test", &[b"http/1.1"])
        .await
        .expect("handshake");
    assert_eq!(alpn(&conn).as_deref(), Some(&b"http/1.1"[..]));
    // An unknown name gets the default certificate (which the client then refuses).
    let unknown = tls_connect(&site.ca, addr(h2), "unknown.test", both).await;
    assert!(
        unknown.is_err(),
        "the default certificate is not for unknown.test"
    );

    let conn = tls_connect(&site.ca, addr(h1_only), "example.test", both)
        .await
        .expect("handshake");
    assert_eq!(
        alpn(&conn).as_deref(),
        Some(&b"http/1.1"[..]),
        "http2: false offers HTTP/1.1 only"
    );

    // min_version 1.3: a client that cannot do TLS 1.3 fails the handshake; one that offers
    // 1.3 cipher suites but settles on 1.2 is refused per request; 1.3 clients get through.
    let no_tls13 = tls_config(&site.ca, both, Tls12::Only);
    let refused = tls_connect_with(no_tls13.clone(), addr(tls13), "example.test").await;
    assert!(refused.is_err(), "a TLS 1.2 client on a 1.3 listener");
    let conn = tls_connect(&site.ca, addr(tls13), "example.test", both)
        .await
        .expect("TLS 1.3 handshake");
    assert_eq!(
        conn.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    let mut settles = tls_connect_with(
        tls_config(&site.ca, &[b"http/1.1"], Tls12::OffersTls13Suites),
        addr(tls13),
        "example.test",
    )
    .await
    .expect("the handshake passes: the client offers TLS 1.3 suites");
    assert_eq!(
        settles.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    settles
        .write_all(b"GET / HTTP/1.1\r\nhost: example.test\r\n\r\n")
        .await
        .expect("request");
    let mut head = [0u8; 12];
    guard("the refusal", settles.read_exact(&mut head))
        .await
        .expect("response");
    assert_eq!(&head, b"HTTP/1.1 403");
    tls_connect_with(no_tls13, addr(h2), "example.test")
        .await
        .expect("TLS 1.2 is fine where min_version is 1.2");

    // Requests through both protocols; the origin hears they came over https.
    let client = https_client(&site.ca, "example.test", addr(h2));
    let url = format!("https://example.test:{h2}/x");
    let response = client.get(&url).send().await.expect("h2 request");
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(response.text().await.expect("body"), "hello");
    let head = origin.next_request().await;
    assert_eq!(head.header("x-forwarded-proto"), Some("https"));
    assert_eq!(
        head.header("x-forwarded-host"),
        Some(&*format!("example.test:{h2}"))
    );
    let client = https_client(&site.ca, "example.test", addr(h1_only));
    let url = format!("https://example.test:{h1_only}/x");
    let response = client.get(&url).send().await.expect("h1 request");
    assert_eq!(response.version(), reqwest::Version::HTTP_11);
    assert_eq!(
        origin.next_request().await.header("x-forwarded-proto"),
        Some("https")
    );
}

/// An origin whose every `/s/{i}` stream sends `data: /s/{i} {round}` each time the test
/// announces a round, and reports the path when the proxy closes that connection. Other
/// paths answer `plain`. Responses carry the HTTP/1.1 connection headers that HTTP/2 forbids.
async fn feeds() -> (
    Origin,
    watch::Sender<usize>,
    mpsc::UnboundedReceiver<String>,
) {
    let (round_tx, round_rx) = watch::channel(0usize);
    let (closed_tx, closed) = mpsc::unbounded_channel();
    let origin = Origin::start(move |head, mut conn| {
        let mut rounds = round_rx.clone();
        let closed_tx = closed_tx.clone();
        async move {
            if !head.target.starts_with("/s/") {
                let _ = conn.respond(200, "plain").await;
                return After::KeepAlive(conn);
            }
            conn.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: keep-alive\r\n\
                  keep-alive: timeout=5\r\ntransfer-encoding: chunked\r\n\r\n",
            )
            .await
            .expect("head");
            let (mut read, mut write) = conn.reader.into_inner().into_split();
            let mut buf = [0u8; 256];
            loop {
                tokio::select! {
                    changed = rounds.changed() => {
                        if changed.is_err() {
                            break;
                        }
                        let round = *rounds.borrow_and_update();
                        let event = format!("data: {} {round}\n\n", head.target);
                        let chunk = format!("{:x}\r\n{event}\r\n", event.len());
                        if write.write_all(chunk.as_bytes()).await.is_err() {
                            let _ = closed_tx.send(head.target.clone());
                            break;
                        }
                    }
                    n = read.read(&mut buf) => {
                        if matches!(n, Ok(0) | Err(_)) {
                            let _ = closed_tx.send(head.target.clone());
                            break;
                        }
                    }
                }
            }
            After::Close
        }
    })
    .await;
    (origin, round_tx, closed)
}

/// One HTTP/2 response body, read event by event.
struct H2Events {
    body: h2::RecvStream,
    buf: String,
}

impl H2Events {
    async fn next(&mut self) -> Option<String> {
        guard("the next event on an HTTP/2 stream", async {
            loop {
                if let Some(event) = common::take_event(&mut self.buf) {
                    return Some(event);
                }
                let data = self.body.data().await?.expect("stream data");
                let _ = self.body.flow_control().release_capacity(data.len());
                self.buf.push_str(&String::from_utf8_lossy(&data));
            }
        })
        .await
    }
}

/// An HTTP/2 connection (TLS, ALPN h2) to the proxy.
/// Also returns the connection's driver, which ends when the connection closes.
async fn h2_connect(
    site: &Site,
    port: u16,
) -> (h2::client::SendRequest<Bytes>, tokio::task::JoinHandle<()>) {
    let tls = tls_connect(&site.ca, addr(port), "example.test", &[b"h2"])
        .await
        .expect("handshake");
    assert_eq!(alpn(&tls).as_deref(), Some(&b"h2"[..]));
    let (client, connection) = h2::client::handshake(tls).await.expect("h2 handshake");
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    (client, driver)
}

fn get(port: u16, path: &str, sse: bool) -> http::Request<()> {
    let mut request = http::Request::builder().uri(format!("https://example.test:{port}{path}"));
    if sse {
        request = request.header("accept", "text/event-stream");
    }
    request.body(()).expect("request")
}

/// Opens `count` event streams `/s/0..` on one HTTP/2 connection; returns each one's
/// stream handle (to reset it) and its events, after checking its response head.
async fn open_streams(
    client: &mut h2::client::SendRequest<Bytes>,
    port: u16,
    count: usize,
) -> Vec<(h2::SendStream<Bytes>, H2Events)> {
    let mut streams = Vec::new();
    for i in 0..count {
        let ready = client.clone().ready().await.expect("connection ready");
        *client = ready;
        let (response, send) = client
            .send_request(get(port, &format!("/s/{i}"), true), true)
            .expect("send request");
        // The head arrives before the origin sent any event (no round announced yet).
        let response = guard("response headers", response).await.expect("response");
        assert_eq!(response.status(), 200);
        let headers = response.headers();
        assert_eq!(headers["content-type"], "text/event-stream");
        assert_eq!(headers["cache-control"], "no-cache");
        for name in [
            "content-length",
            "connection",
            "keep-alive",
            "transfer-encoding",
        ] {
            assert!(
                headers.get(name).is_none(),
                "{name} over HTTP/2: {headers:?}"
            );
        }
        streams.push((
            send,
            H2Events {
                body: response.into_body(),
                buf: String::new(),
            },
        ));
    }
    streams
}

async fn h2_site() -> (
    Site,
    u16,
    watch::Sender<usize>,
    mpsc::UnboundedReceiver<String>,
    Origin,
) {
    let (origin, rounds, closed) = feeds().await;
    let port = common::free_port();
    let h2 = "http2: { max_concurrent_streams: 32, idle_timeout: 300ms }\n";
    let (site, _) = main_site(port, &origin, "", h2).await;
    (site, port, rounds, closed, origin)
}

#[tokio::test(flavor = "multi_thread")]
async fn twenty_event_streams_share_one_http2_connection() {
    let (site, port, rounds, mut closed, mut origin) = h2_site().await;
    let (mut client, _) = h2_connect(&site, port).await;
    let mut streams = open_streams(&mut client, port, 20).await;
    assert_eq!(
        client.current_max_send_streams(),
        32,
        "http2.max_concurrent_streams reaches the client"
    );
    for _ in 0..20 {
        let head = origin.next_request().await;
        assert_eq!(head.header("x-forwarded-proto"), Some("https"));
    }
    // The idle timeout (300ms) closes a connection with nothing open, never one whose
    // streams are open but quiet.
    let (_idle, idle_driver) = h2_connect(&site, port).await;
    guard("the idle connection to close", idle_driver)
        .await
        .expect("driver");
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    for round in 1..=3 {
        rounds.send(round).expect("origin streams");
        // Every stream gets its own event before the origin sends the next round.
        for (i, (_, events)) in streams.iter_mut().enumerate() {
            assert_eq!(
                events.next().await.as_deref(),
                Some(&*format!("data: /s/{i} {round}"))
            );
        }
        // An ordinary request on the same connection is not held back by the streams.
        let ready = client.clone().ready().await.expect("ready");
        client = ready;
        let (response, _) = client
            .send_request(get(port, "/plain", false), true)
            .expect("send");
        let response = guard("a plain response", response).await.expect("response");
        let mut body = response.into_body();
        let data = guard("a plain body", body.data()).await;
        assert_eq!(data.and_then(Result::ok).as_deref(), Some(&b"plain"[..]));
    }
    assert!(closed.try_recv().is_err(), "no upstream closed");
}

#[tokio::test(flavor = "multi_thread")]
async fn resetting_one_stream_closes_its_upstream_and_leaves_the_others() {
    let (site, port, rounds, mut closed, _origin) = h2_site().await;
    let (mut client, _) = h2_connect(&site, port).await;
    let mut streams = open_streams(&mut client, port, 20).await;
    rounds.send(1).expect("origin streams");
    for (_, events) in streams.iter_mut() {
        assert!(events.next().await.is_some());
    }

    streams[7].0.send_reset(h2::Reason::CANCEL);
    let gone = guard("the reset stream's upstream to close", closed.recv()).await;
    assert_eq!(gone.as_deref(), Some("/s/7"));

    for round in 2..=3 {
        rounds.send(round).expect("origin streams");
        for (i, (_, events)) in streams.iter_mut().enumerate().filter(|(i, _)| *i != 7) {
            assert_eq!(
                events.next().await.as_deref(),
                Some(&*format!("data: /s/{i} {round}"))
            );
        }
    }
    assert!(
        closed.try_recv().is_err(),
        "only the reset stream's upstream closed"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn h2c_and_redirect_listeners() {
    let mut origin = Origin::plain("hello").await;
    let [h2c, redirect, tls] = common::free_ports();
    let (_site, _) = Site::start(
        &[("main", &["example.test"])],
        |dir| {
            format!(
                "listen:\n  - {{ address: \"127.0.0.1:{h2c}\", h2c: true, defer_accept: 5s }}\n  \
                 - {{ address: \"127.0.0.1:{redirect}\", redirect_http: true, defer_accept: 5s }}\n{}{}",
                tls_listener(tls, dir, MAIN_CERT, "    defer_accept: 5s\n"),
                routes(&origin)
            )
        },
        &[addr(h2c), addr(redirect), addr(tls)],
    )
    .await;

    // h2c: HTTP/2 with prior knowledge, and HTTP/1.1 on the same listener.
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .expect("client");
    let response = h2
        .get(format!("http://127.0.0.1:{h2c}/x"))
        .send()
        .await
        .expect("h2c request");
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(response.text().await.expect("body"), "hello");
    assert_eq!(
        origin.next_request().await.header("x-forwarded-proto"),
        Some("http")
    );
    let response = common::client()
        .get(format!("http://127.0.0.1:{h2c}/x"))
        .send()
        .await
        .expect("h1 request");
    assert_eq!(response.version(), reqwest::Version::HTTP_11);

    // redirect_http: 308 to the same host and path on the TLS listener's port.
    let no_redirects = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let response = no_redirects
        .get(format!("http://127.0.0.1:{redirect}/a/b?c=d"))
        .header("host", format!("Example.test:{redirect}"))
        .send()
        .await
        .expect("redirect");
    assert_eq!(response.status(), 308);
    assert_eq!(
        response.headers()["location"],
        format!("https://Example.test:{tls}/a/b?c=d").as_str()
    );

    // Every kind of listener takes its socket settings: `defer_accept` (a silent connection
    // is held back by the kernel until its protocol's first byte comes: the HTTP/2 preface,
    // a request, a TLS record) and the TCP keepalive (60 s unless set), which accepted
    // connections inherit from the listening socket.
    for (port, first) in [(h2c, b"P"), (redirect, b"G"), (tls, b"\x16")] {
        let mut conn = TcpStream::connect(addr(port)).await.expect("connect");
        let (state, _, _) = common::server_side(addr(port), &conn);
        assert_eq!(
            state, 3,
            "listener {port}: held back until the client speaks"
        );
        conn.write_all(first).await.expect("first byte");
        common::eventually("the connection handed over", || async {
            common::server_side(addr(port), &conn).0 == 1
        })
        .await;
        let (_, kind, when) = common::server_side(addr(port), &conn);
        assert_eq!(kind, 2, "listener {port}: a keepalive timer");
        assert!(
            when <= std::time::Duration::from_secs(60) && when > std::time::Duration::from_secs(50),
            "listener {port}: fires in {when:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_post_streams_tls_connection_serves_the_next_request() {
    // A POST answered by a short event stream; anything else gets `plain`.
    let origin = Origin::post_streams("plain").await;
    let port = common::free_port();
    let (site, _) = main_site(port, &origin, "", "").await;
    let mut tls = tls_connect(&site.ca, addr(port), "example.test", &[b"http/1.1"])
        .await
        .expect("TLS");
    let body = r#"{"prompt":"hi"}"#;
    let post = format!(
        "POST /chat HTTP/1.1\r\nhost: example.test\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n{body}",
        body.len()
    );
    // Read until `done` holds for what came on this connection.
    async fn read_until(tls: &mut TlsStream<TcpStream>, done: &str) -> String {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        guard(done, async {
            while !String::from_utf8_lossy(&got).contains(done) {
                let n = tls.read(&mut buf).await.expect("read");
                assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
                got.extend_from_slice(&buf[..n]);
            }
        })
        .await;
        String::from_utf8_lossy(&got).into_owned()
    }
    tls.write_all(post.as_bytes()).await.expect("send");
    let stream = read_until(&mut tls, "\r\n0\r\n\r\n").await;
    let lower = stream.to_lowercase();
    assert!(lower.contains("connection: keep-alive\r\n"), "{stream}");
    assert!(stream.contains("data: token"), "{stream}");
    // The next request on the same TLS connection.
    tls.write_all(b"GET /next HTTP/1.1\r\nhost: example.test\r\n\r\n")
        .await
        .expect("send");
    let next = read_until(&mut tls, "plain").await;
    assert!(next.starts_with("HTTP/1.1 200"), "{next}");
}

/// Over TLS as over plain TCP, a request body sent in pieces a pause apart within the
/// service's `request_buffer_wait` is gathered and reaches the origin whole, with its head,
/// in one read (each piece a TLS record of its own, read by the proxy as it comes).
#[tokio::test(flavor = "multi_thread")]
async fn a_request_body_in_pieces_is_gathered_over_tls_too() {
    let (origin, mut seen) = Origin::start_seeing(|head, mut conn| async move {
        let body = conn.read_body(&head).await.expect("body");
        let _ = conn.respond(200, &format!("got {}", body.len())).await;
        After::Close
    })
    .await;
    let port = common::free_port();
    let (site, _) = Site::start(
        &[("main", &["example.test"])],
        |dir| {
            format!(
                "listen:\n{}services:\n  feed: {{ url: \"{}\", request_buffer_wait: 30s }}\n\
                 host_rules:\n  - pattern: \"*\"\n    target: feed\n",
                tls_listener(port, dir, MAIN_CERT, ""),
                origin.url()
            )
        },
        &[addr(port)],
    )
    .await;
    let mut tls = tls_connect(&site.ca, addr(port), "example.test", &[b"http/1.1"])
        .await
        .expect("TLS");
    let head = "POST /chat HTTP/1.1\r\nhost: example.test\r\ntransfer-encoding: chunked\r\n\
                connection: close\r\n\r\n";
    let pieces = [
        format!("{head}5\r\n{{\"a\":\r\n"),
        "2\r\n1,\r\n".to_string(),
        "4\r\n\"b\":\r\n".to_string(),
        "2\r\n2}\r\n0\r\n\r\n".to_string(),
    ];
    for piece in &pieces {
        tls.write_all(piece.as_bytes()).await.expect("piece");
        tls.flush().await.expect("flush");
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    let with_head = guard("the request at the origin", seen.recv())
        .await
        .expect("seen");
    assert_eq!(
        String::from_utf8_lossy(&with_head),
        "5\r\n{\"a\":\r\n2\r\n1,\r\n4\r\n\"b\":\r\n2\r\n2}\r\n0\r\n\r\n"
    );
    let mut answer = Vec::new();
    guard("the answer", tls.read_to_end(&mut answer))
        .await
        .expect("answer");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.ends_with("got 13"), "{answer}");
}

/// Over TLS as over plain TCP, a request head sent a byte at a time is cut at the
/// listener's `request_header_timeout`: a connection's first head, and a later one on a
/// connection kept after a `POST` event stream and a `GET`.
#[tokio::test(flavor = "multi_thread")]
async fn slow_request_heads_are_cut_over_tls_too() {
    let origin = Origin::post_streams("plain").await;
    let port = common::free_port();
    let (site, _) = Site::start(
        &[("main", &["example.test"])],
        |dir| {
            let limit = "    request_header_timeout: 500ms\n";
            format!(
                "listen:\n{}{}",
                tls_listener(port, dir, MAIN_CERT, limit),
                routes(&origin)
            )
        },
        &[addr(port)],
    )
    .await;
    let connect = || tls_connect(&site.ca, addr(port), "example.test", &[b"http/1.1"]);
    // Starts a head, sends the rest a byte every 100 ms for 2 s, and returns what came
    // back before the proxy closed the connection.
    async fn slow_head(tls: &mut TlsStream<TcpStream>) -> String {
        let mut sent = tls
            .write_all(b"GET / HTTP/1.1\r\nhost: example.test\r\nx-slow: ")
            .await
            .is_ok();
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            sent = sent && tls.write_all(b"a").await.is_ok() && tls.flush().await.is_ok();
        }
        let mut got = Vec::new();
        guard("the proxy to close the slow connection", async {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = tls.read(&mut buf).await {
                got.extend_from_slice(&buf[..n]);
            }
        })
        .await;
        String::from_utf8_lossy(&got).into_owned()
    }
    let mut first = connect().await.expect("TLS");
    let got = slow_head(&mut first).await;
    assert!(!got.contains("200"), "{got}");

    let mut kept = connect().await.expect("TLS");
    kept.write_all(b"POST /chat HTTP/1.1\r\nhost: example.test\r\ncontent-length: 2\r\n\r\n{}")
        .await
        .expect("send");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    guard("the stream and the next answer", async {
        let mut asked = false;
        while !String::from_utf8_lossy(&got).contains("plain") {
            let n = kept.read(&mut buf).await.expect("read");
            assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
            if !asked && String::from_utf8_lossy(&got).contains("\r\n0\r\n\r\n") {
                asked = true;
                kept.write_all(b"GET /next HTTP/1.1\r\nhost: example.test\r\n\r\n")
                    .await
                    .expect("send");
            }
        }
    })
    .await;
    let got = slow_head(&mut kept).await;
    assert!(!got.contains("200"), "a later head: {got}");
}

#[tokio::test(flavor = "multi_thread")]
async fn renewed_certificates_are_served_and_broken_ones_refused() {
    let origin = Origin::plain("hello").await;
    let [tls, admin] = common::free_ports();
    let admin_listener = format!("admin: {{ listen: \"127.0.0.1:{admin}\" }}\n");
    let (site, issued) = main_site(tls, &origin, &admin_listener, "").await;
    let handshake = || async {
        served(
            &tls_connect(&site.ca, addr(tls), "example.test", &[b"http/1.1"])
                .await
                .expect("handshake"),
        )
    };
    assert_eq!(handshake().await, issued[0].der);

    // A renewed pair written over the files is served without a restart.
    let renewed = site.ca.issue(&["example.test"]);
    renewed.write(site.dir.path(), "main");
    eventually("the renewed certificate to be served", || async {
        handshake().await == renewed.der
    })
    .await;

    // A broken pair is refused on reload, naming the file; the last good one stays.
    std::fs::write(site.path("main.key"), site.ca.issue(&["x.test"]).key_pem).expect("write");
    let answer = common::client()
        .post(format!("http://127.0.0.1:{admin}/reload"))
        .send()
        .await
        .expect("admin");
    assert_eq!(answer.status(), 422);
    let body = answer.text().await.expect("body");
    assert!(
        body.contains("main.key is not the private key of the certificate"),
        "{body}"
    );
    assert_eq!(
        handshake().await,
        renewed.der,
        "the old certificate still serves"
    );
}

#[test]
fn dash_t_reports_certificates_and_refuses_mismatched_keys() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new();
    ca.issue(&["example.test", "*.example.test"])
        .write(dir.path(), "main");
    let other = ca.issue(&["other.test"]);
    let config = dir.path().join("streamgate.yaml");
    let text = format!("listen:\n{}", tls_listener(1, dir.path(), MAIN_CERT, ""));
    std::fs::write(&config, &text).expect("write");
    let check = || {
        Command::new(common::binary::BIN)
            .args(["-t", "-c"])
            .arg(&config)
            .output()
            .expect("run streamgate -t")
    };
    let out = check();
    let stdout = succeeded(&out);
    assert!(
        stdout.contains("names: example.test, *.example.test"),
        "{stdout}"
    );
    assert!(stdout.contains("expires: "), "{stdout}");
    assert!(stdout.contains("days)"), "{stdout}");

    std::fs::write(dir.path().join("main.key"), other.key_pem).expect("write");
    let out = check();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("streamgate.yaml:5:")
            && stderr.contains("`listen[0].tls.certificates[0].key`"),
        "{stderr}"
    );
    assert!(
        stderr.contains("main.key is not the private key"),
        "{stderr}"
    );
}
