//! Service discovery against real sockets: a small DNS server on 127.0.0.1 whose records
//! the test changes at runtime (and can make fail), and endpoint files rewritten the way
//! deploy tools do it. The library is called directly, and once through the proxy.

use crate::common;

use std::collections::{BTreeSet, HashMap};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};

use common::guard;
use hickory_resolver::proto::op::{Message, MessageType, ResponseCode};
use hickory_resolver::proto::rr::rdata::{A, AAAA, SRV};
use hickory_resolver::proto::rr::{Name, RData, Record, RecordType};
use pingora::lb::discovery::ServiceDiscovery;
use pingora::lb::Backend;
use streamgate::upstream::discovery::{self, DiscoveryFile};
use tokio::net::UdpSocket;

/// How the test DNS server treats queries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Answer,
    ServFail,
    /// Read queries and never answer them.
    Silent,
}

#[derive(Default)]
struct Zone {
    /// Records by lower-case fully qualified name and type.
    records: HashMap<(String, RecordType), Vec<RData>>,
    mode: Option<Mode>,
    queries: usize,
}

/// An authoritative-looking DNS server over UDP on 127.0.0.1, port 0. Names it does not
/// hold get NXDOMAIN; names it holds with other types get an empty NOERROR answer. Every
/// record has a TTL of an hour, so an answer seen fresh proves nothing was cached.
struct DnsServer {
    addr: SocketAddr,
    zone: Arc<Mutex<Zone>>,
}

fn key(name: &str) -> String {
    let mut name = name.to_ascii_lowercase();
    if !name.ends_with('.') {
        name.push('.');
    }
    name
}

fn fqdn(name: &str) -> Name {
    Name::from_ascii(key(name)).expect("test name")
}

impl DnsServer {
    async fn start() -> DnsServer {
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind dns");
        let addr = socket.local_addr().expect("dns addr");
        let zone = Arc::new(Mutex::new(Zone::default()));
        let served = zone.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let Ok((len, peer)) = socket.recv_from(&mut buf).await else {
                    return;
                };
                let Ok(query) = Message::from_vec(&buf[..len]) else {
                    continue;
                };
                let Some(reply) = answer(&served, &query) else {
                    continue;
                };
                if let Ok(bytes) = reply.to_vec() {
                    let _ = socket.send_to(&bytes, peer).await;
                }
            }
        });
        DnsServer { addr, zone }
    }

    fn zone(&self) -> std::sync::MutexGuard<'_, Zone> {
        self.zone.lock().expect("zone lock")
    }

    fn set(&self, name: &str, kind: RecordType, data: Vec<RData>) {
        let mut zone = self.zone();
        if data.is_empty() {
            zone.records.remove(&(key(name), kind));
        } else {
            zone.records.insert((key(name), kind), data);
        }
    }

    fn set_a(&self, name: &str, ips: &[[u8; 4]]) {
        let data = ips
            .iter()
            .map(|ip| RData::A(A::from(Ipv4Addr::from(*ip))))
            .collect();
        self.set(name, RecordType::A, data);
    }

    fn set_aaaa(&self, name: &str, ips: &[Ipv6Addr]) {
        let data = ips.iter().map(|ip| RData::AAAA(AAAA::from(*ip))).collect();
        self.set(name, RecordType::AAAA, data);
    }

    /// `(priority, weight, port, target)` records.
    fn set_srv(&self, name: &str, records: &[(u16, u16, u16, &str)]) {
        let data = records
            .iter()
            .map(|(priority, weight, port, target)| {
                RData::SRV(SRV::new(*priority, *weight, *port, fqdn(target)))
            })
            .collect();
        self.set(name, RecordType::SRV, data);
    }

    fn mode(&self, mode: Mode) {
        self.zone().mode = Some(mode);
    }

    fn queries(&self) -> usize {
        self.zone().queries
    }
}

fn answer(zone: &Mutex<Zone>, query: &Message) -> Option<Message> {
    let mut zone = zone.lock().ok()?;
    zone.queries += 1;
    let mut reply = Message::new();
    reply
        .set_id(query.id())
        .set_message_type(MessageType::Response)
        .set_op_code(query.op_code())
        .set_recursion_desired(query.recursion_desired())
        .set_recursion_available(true)
        .set_authoritative(true);
    for q in query.queries() {
        reply.add_query(q.clone());
    }
    match zone.mode.unwrap_or(Mode::Answer) {
        Mode::Silent => return None,
        Mode::ServFail => {
            reply.set_response_code(ResponseCode::ServFail);
            return Some(reply);
        }
        Mode::Answer => {}
    }
    let q = query.queries().first()?;
    let name = key(&q.name().to_ascii());
    match zone.records.get(&(name.clone(), q.query_type())) {
        Some(data) => {
            for rdata in data {
                reply.add_answer(Record::from_rdata(q.name().clone(), 3600, rdata.clone()));
            }
        }
        None if zone.records.keys().any(|(n, _)| *n == name) => {}
        None => {
            reply.set_response_code(ResponseCode::NXDomain);
        }
    }
    Some(reply)
}

fn source(yaml: &str, base: &Path) -> Box<dyn ServiceDiscovery + Send + Sync> {
    let file: DiscoveryFile = serde_yaml::from_str(yaml).expect("discovery config");
    discovery::build(&file, base).expect("discovery builds")
}

fn dns(server: &DnsServer, body: &str) -> Box<dyn ServiceDiscovery + Send + Sync> {
    // Short query timeouts: the silent-server case must fail fast.
    source(
        &format!(
            "dns: {{ {body}, server: \"{}\", timeout: 200ms }}",
            server.addr
        ),
        Path::new("."),
    )
}

/// The discovered set as sorted `(address, weight)` pairs.
async fn endpoints(source: &dyn ServiceDiscovery) -> Result<Vec<(String, usize)>, String> {
    let (backends, health): (BTreeSet<Backend>, _) = guard("discover", source.discover())
        .await
        .map_err(|e| e.to_string())?;
    assert!(health.is_empty(), "every backend is enabled");
    let mut all: Vec<(String, usize)> = backends
        .iter()
        .map(|b| (b.addr.to_string(), b.weight))
        .collect();
    all.sort();
    Ok(all)
}

fn pairs(list: &[(&str, usize)]) -> Vec<(String, usize)> {
    let mut all: Vec<(String, usize)> = list.iter().map(|(a, w)| (a.to_string(), *w)).collect();
    all.sort();
    all
}

async fn expect_err(source: &dyn ServiceDiscovery) -> String {
    match endpoints(source).await {
        Ok(found) => panic!("expected discovery to fail, found {found:?}"),
        Err(e) => {
            eprintln!("discover() failed as expected: {e}");
            e
        }
    }
}

#[tokio::test]
async fn a_records_become_endpoints_and_changes_are_seen_on_the_next_discover() {
    let server = DnsServer::start().await;
    server.set_a("api.test", &[[127, 0, 0, 10], [127, 0, 0, 11]]);
    let source = dns(&server, "name: api.test, port: 8080");

    assert_eq!(
        endpoints(&*source).await,
        Ok(pairs(&[("127.0.0.10:8080", 1), ("127.0.0.11:8080", 1)]))
    );

    // The records carry a TTL of an hour: the change is seen because nothing is cached.
    server.set_a("api.test", &[[127, 0, 0, 12]]);
    assert_eq!(
        endpoints(&*source).await,
        Ok(pairs(&[("127.0.0.12:8080", 1)]))
    );
    assert!(server.queries() >= 2);
}

#[tokio::test]
async fn aaaa_records_become_endpoints() {
    let server = DnsServer::start().await;
    let ips: [Ipv6Addr; 2] = [
        "fd00::1".parse().expect("ip"),
        "fd00::2".parse().expect("ip"),
    ];
    server.set_aaaa("v6.api.test", &ips);
    server.set_a("v6.api.test", &[[127, 0, 0, 1]]);
    let source = dns(&server, "name: v6.api.test, port: 443, record: AAAA");
    assert_eq!(
        endpoints(&*source).await,
        Ok(pairs(&[("[fd00::1]:443", 1), ("[fd00::2]:443", 1)]))
    );
}

#[tokio::test]
async fn srv_uses_the_best_priority_with_its_ports_and_weights() {
    let server = DnsServer::start().await;
    server.set_srv(
        "_http._tcp.api.test",
        &[
            (10, 3, 9001, "a.api.test"),
            (10, 1, 9002, "b.api.test"),
            (10, 0, 9003, "c.api.test"),
            // A target that does not exist is skipped, not fatal.
            (10, 7, 9005, "gone.api.test"),
            (20, 5, 9004, "d.api.test"),
        ],
    );
    server.set_a("a.api.test", &[[127, 0, 0, 21]]);
    server.set_aaaa("a.api.test", &["fd00::21".parse().expect("ip")]);
    server.set_a("b.api.test", &[[127, 0, 0, 22], [127, 0, 0, 23]]);
    server.set_a("c.api.test", &[[127, 0, 0, 24]]);
    server.set_a("d.api.test", &[[127, 0, 0, 25]]);
    let source = dns(&server, "name: _http._tcp.api.test, record: SRV");

    assert_eq!(
        endpoints(&*source).await,
        Ok(pairs(&[
            ("127.0.0.21:9001", 3),
            ("[fd00::21]:9001", 3),
            ("127.0.0.22:9002", 1),
            ("127.0.0.23:9002", 1),
            // Weight 0 counts as 1.
            ("127.0.0.24:9003", 1),
        ]))
    );

    // The priority-10 group is withdrawn: the backup group takes over.
    server.set_srv("_http._tcp.api.test", &[(20, 5, 9004, "d.api.test")]);
    assert_eq!(
        endpoints(&*source).await,
        Ok(pairs(&[("127.0.0.25:9004", 5)]))
    );

    // Large SRV weights are scaled into 1..=100, keeping their ratio.
    server.set_srv(
        "_http._tcp.api.test",
        &[(0, 60000, 80, "a.api.test"), (0, 15000, 81, "d.api.test")],
    );
    assert_eq!(
        endpoints(&*source).await,
        Ok(pairs(&[
            ("127.0.0.21:80", 100),
            ("[fd00::21]:80", 100),
            ("127.0.0.25:81", 25),
        ]))
    );
}

#[tokio::test]
async fn resolver_failures_are_errors_that_name_the_name() {
    let server = DnsServer::start().await;
    server.set_a("api.test", &[[127, 0, 0, 10]]);
    server.set_aaaa("v6only.api.test", &["fd00::1".parse().expect("ip")]);

    let missing = dns(&server, "name: missing.api.test, port: 80");
    let e = expect_err(&*missing).await;
    assert!(e.contains("`missing.api.test`"), "{e}");
    assert!(e.contains("NXDOMAIN"), "{e}");
    assert!(
        e.contains(&server.addr.to_string()),
        "names the server: {e}"
    );

    let no_a = dns(&server, "name: v6only.api.test, port: 80");
    let e = expect_err(&*no_a).await;
    assert!(e.contains("`v6only.api.test`"), "{e}");
    assert!(e.contains("no A records"), "{e}");

    let srv = dns(&server, "name: _http._tcp.api.test, record: SRV");
    let e = expect_err(&*srv).await;
    assert!(e.contains("SRV lookup of `_http._tcp.api.test`"), "{e}");

    let source = dns(&server, "name: api.test, port: 80");
    assert_eq!(
        endpoints(&*source).await,
        Ok(pairs(&[("127.0.0.10:80", 1)]))
    );

    server.mode(Mode::ServFail);
    let e = expect_err(&*source).await;
    assert!(e.contains("`api.test`"), "{e}");
    assert!(e.contains("SERVFAIL"), "{e}");

    server.mode(Mode::Silent);
    let e = expect_err(&*source).await;
    assert!(e.contains("A lookup of `api.test`"), "{e}");
    assert!(e.contains("no answer within 200ms"), "{e}");

    // The server comes back: so do the endpoints.
    server.mode(Mode::Answer);
    assert_eq!(
        endpoints(&*source).await,
        Ok(pairs(&[("127.0.0.10:80", 1)]))
    );
}

#[tokio::test]
async fn srv_target_failures_fail_the_whole_lookup() {
    let server = DnsServer::start().await;
    server.set_srv("_x._tcp.api.test", &[(0, 1, 80, "gone.api.test")]);
    let source = dns(&server, "name: _x._tcp.api.test, record: SRV");
    let e = expect_err(&*source).await;
    assert!(e.contains("`_x._tcp.api.test`"), "{e}");
    assert!(
        e.contains("no SRV target of priority 0 has an A or AAAA record"),
        "{e}"
    );

    // RFC 2782: a target of "." says the service is not offered.
    server.set_srv("_x._tcp.api.test", &[(0, 1, 80, ".")]);
    let e = expect_err(&*source).await;
    assert!(e.contains("no targets"), "{e}");
}

/// Writes `text` to `path` the way deploy tools replace files: aside, then rename.
fn replace(path: &Path, text: &str) {
    let aside = path.with_extension("tmp");
    std::fs::write(&aside, text).expect("write endpoints aside");
    std::fs::rename(&aside, path).expect("rename endpoints");
}

#[tokio::test]
async fn file_discovery_reads_the_file_and_sees_a_rewrite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("endpoints.yaml");
    std::fs::write(
        &path,
        "- \"127.0.0.1:9001\"\n- { address: \"127.0.0.2:9002\", weight: 4 }\n",
    )
    .expect("write endpoints");
    let config: DiscoveryFile =
        serde_yaml::from_str("file: { path: endpoints.yaml }").expect("config");
    let source = discovery::build(&config, dir.path()).expect("builds");
    let mut changes = discovery::watch(&config, dir.path())
        .expect("watch starts")
        .expect("file discovery has a change signal");

    assert_eq!(
        endpoints(&*source).await,
        Ok(pairs(&[("127.0.0.1:9001", 1), ("127.0.0.2:9002", 4)]))
    );

    replace(&path, "- \"127.0.0.3:9003\"\n");
    assert!(guard("the change signal", changes.changed()).await);
    assert_eq!(
        endpoints(&*source).await,
        Ok(pairs(&[("127.0.0.3:9003", 1)]))
    );

    // An in-place rewrite is signalled too.
    std::fs::write(&path, "- \"127.0.0.4:9004\"\n").expect("rewrite in place");
    assert!(guard("the change signal", changes.changed()).await);
    assert_eq!(
        endpoints(&*source).await,
        Ok(pairs(&[("127.0.0.4:9004", 1)]))
    );
}

#[tokio::test]
async fn broken_or_missing_files_are_errors_with_file_and_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("endpoints.yaml");
    let config: DiscoveryFile =
        serde_yaml::from_str("file: { path: endpoints.yaml }").expect("config");
    let source = discovery::build(&config, dir.path()).expect("builds");
    let mut changes = discovery::watch(&config, dir.path())
        .expect("watch starts")
        .expect("file discovery has a change signal");
    let shown = path.display().to_string();

    let e = expect_err(&*source).await;
    assert!(e.contains(&shown), "names the file: {e}");
    assert!(e.contains("cannot read the endpoints file"), "{e}");

    replace(&path, "- \"127.0.0.1:9001\"\n- \"127.0.0.1\"\n");
    assert!(guard("the change signal", changes.changed()).await);
    let e = expect_err(&*source).await;
    assert!(
        e.contains(&format!("{shown}:2:")),
        "names file and line: {e}"
    );
    assert!(e.contains("has no port"), "{e}");

    replace(
        &path,
        "- { address: \"127.0.0.1:9001\", weight: 2 }\n- [oops\n",
    );
    let e = expect_err(&*source).await;
    assert!(e.contains(&format!("{shown}:")), "{e}");

    replace(&path, "");
    let e = expect_err(&*source).await;
    assert!(e.contains("the endpoints file is empty"), "{e}");

    replace(&path, "- \"127.0.0.5:9005\"\n");
    assert_eq!(
        endpoints(&*source).await,
        Ok(pairs(&[("127.0.0.5:9005", 1)]))
    );
}

#[tokio::test]
async fn static_discovery_lists_its_endpoints() {
    let source = source(
        "static: [\"127.0.0.1:80\", { address: \"[::1]:81\", weight: 2 }]",
        Path::new("."),
    );
    assert_eq!(
        endpoints(&*source).await,
        Ok(pairs(&[("127.0.0.1:80", 1), ("[::1]:81", 2)]))
    );
}

/// An origin on `bind` answering every request with `body`.
async fn answering(bind: &str, body: &'static str) -> common::Origin {
    common::Origin::start_at(bind, move |_, mut conn| async move {
        match conn.respond(200, body).await {
            Ok(()) => common::After::Close,
            Err(_) => common::After::Close,
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn the_proxy_follows_dns_changes_and_keeps_the_last_set_when_dns_fails() {
    let server = DnsServer::start().await;
    let first = answering("127.0.0.1:0", "first").await;
    let port = first.addr.port();
    let second = answering(&format!("127.0.0.2:{port}"), "second").await;
    server.set_a("feed.test", &[[127, 0, 0, 1]]);
    let proxy = common::Proxy::start(&format!(
        "services:\n  feed:\n    discovery:\n      dns: {{ name: feed.test, port: {port}, \
         server: \"{}\", refresh: 100ms, timeout: 200ms }}\n\
         host_rules:\n  - {{ pattern: \"*\", target: feed }}\n",
        server.addr
    ))
    .await;
    let get = || async {
        let r = common::client()
            .get(proxy.url("/"))
            .send()
            .await
            .expect("response");
        (r.status().as_u16(), r.text().await.expect("body"))
    };
    assert_eq!(get().await, (200, "first".to_string()));
    server.set_a("feed.test", &[[127, 0, 0, 2]]);
    common::eventually("the new record to be used", || async {
        get().await.1 == "second"
    })
    .await;
    // DNS fails: the last good set keeps serving.
    server.mode(Mode::ServFail);
    let before = server.queries();
    common::eventually("discovery to run against the failing server", || async {
        server.queries() > before + 2
    })
    .await;
    for _ in 0..5 {
        assert_eq!(get().await, (200, "second".to_string()));
    }
    drop(second);
}

/// A service whose name has never resolved cannot reach its origin at all: `502`, as for a
/// refused connection, with why (the name and the resolver's answer) and nothing of
/// Pingora's error kinds. A service whose discovery works but finds nothing is `503`.
#[tokio::test(flavor = "multi_thread")]
async fn a_name_that_never_resolved_answers_502_with_the_reason() {
    let server = DnsServer::start().await;
    let proxy = common::Proxy::start(&format!(
        "services:\n  feed:\n    discovery:\n      dns: {{ name: missing.test, port: 80, \
         server: \"{}\", refresh: 100ms, timeout: 200ms }}\n\
         host_rules:\n  - {{ pattern: \"*\", target: feed }}\n",
        server.addr
    ))
    .await;
    let r = common::client()
        .get(proxy.url("/"))
        .send()
        .await
        .expect("response");
    assert_eq!(r.status(), 502);
    let body = r.text().await.expect("body");
    assert!(body.contains("service `feed`"), "{body}");
    assert!(body.contains("`missing.test`"), "{body}");
    assert!(body.contains("NXDOMAIN"), "{body}");
    assert!(!body.contains("context:"), "{body}");
}
