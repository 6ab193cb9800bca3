//! Parsing of the `discovery:` block and of endpoint files: good forms, and bad ones with
//! the messages, keys and lines a user would see.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use super::*;

/// A service as the config would hold it, so errors carry the `discovery.` key path.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Service {
    discovery: DiscoveryFile,
}

/// Parses `yaml` as a service; `Err` is `line: key: message`.
fn parse(yaml: &str) -> Result<DiscoveryFile, String> {
    let de = serde_yaml::Deserializer::from_str(yaml);
    serde_path_to_error::deserialize::<_, Service>(de)
        .map(|s| s.discovery)
        .map_err(|e| {
            let line = e.inner().location().map(|l| l.line()).unwrap_or(0);
            format!("{line}: {}: {}", e.path(), e.inner())
        })
}

fn ok(yaml: &str) -> DiscoveryFile {
    match parse(yaml) {
        Ok(d) => d,
        Err(e) => panic!("expected {yaml:?} to parse, got {e}"),
    }
}

fn err(yaml: &str) -> String {
    match parse(yaml) {
        Ok(d) => panic!("expected {yaml:?} to fail, got {d:?}"),
        Err(e) => e,
    }
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("test address")
}

#[test]
fn static_takes_both_endpoint_forms() {
    let d = ok(r#"
discovery:
  static:
    - "10.0.0.1:8080"
    - { address: "10.0.0.2:8080", weight: 3 }
    - address: "[fd00::1]:80"
"#);
    let DiscoveryFile::Static(list) = &d else {
        panic!("not static: {d:?}")
    };
    assert_eq!(
        list.0,
        vec![
            EndpointFile {
                address: addr("10.0.0.1:8080"),
                weight: 1
            },
            EndpointFile {
                address: addr("10.0.0.2:8080"),
                weight: 3
            },
            EndpointFile {
                address: addr("[fd00::1]:80"),
                weight: 1
            },
        ]
    );
    let backends = list.backends();
    assert_eq!(backends.len(), 3);
    assert!(backends.iter().any(|b| b.weight == 3));
    assert_eq!(refresh_interval(&d), STATIC_REFRESH);
    assert_eq!(
        d.to_string(),
        "static [10.0.0.1:8080, 10.0.0.2:8080 (weight 3), [fd00::1]:80]"
    );
}

#[test]
fn bad_endpoints_are_refused_at_their_line() {
    let e = err("discovery:\n  static:\n    - \"10.0.0.1:8080\"\n    - \"api.internal:80\"\n");
    assert!(e.starts_with("4: discovery.static[1]: "), "{e}");
    assert!(
        e.contains("invalid endpoint address `api.internal:80`"),
        "{e}"
    );
    assert!(e.contains("dns"), "points to dns discovery: {e}");

    let e = err("discovery:\n  static: [\"10.0.0.1\"]\n");
    assert!(e.contains("has no port"), "{e}");

    let e = err("discovery:\n  static:\n    - { address: \"10.0.0.1:80\", weight: 0 }\n");
    assert!(e.starts_with("3: discovery.static[0].weight: "), "{e}");
    assert!(e.contains("weight 0 is out of range"), "{e}");

    let e = err("discovery:\n  static:\n    - { address: \"10.0.0.1:80\", weight: 101 }\n");
    assert!(e.contains("from 1 to 100"), "{e}");

    let e = err("discovery:\n  static:\n    - { address: \"10.0.0.1:80\", weight: -1 }\n");
    assert!(e.contains("out of range"), "{e}");

    let e = err("discovery:\n  static:\n    - { address: \"10.0.0.1:80\", wieght: 2 }\n");
    assert!(e.contains("unknown field `wieght`"), "{e}");

    let e = err("discovery:\n  static:\n    - { weight: 2 }\n");
    assert!(e.contains("missing field `address`"), "{e}");

    let e = err("discovery:\n  static:\n    - 8080\n");
    assert!(e.contains("an endpoint such as"), "{e}");

    let e = err("discovery:\n  static:\n    - \"10.0.0.1:0\"\n");
    assert!(e.contains("port 0"), "{e}");
}

#[test]
fn static_lists_are_non_empty_without_duplicates() {
    let e = err("discovery:\n  static: []\n");
    assert!(e.contains("the endpoint list is empty"), "{e}");

    let e = err("discovery:\n  static: [\"10.0.0.1:80\", { address: \"10.0.0.1:80\" }]\n");
    assert!(e.contains("`10.0.0.1:80` is listed twice"), "{e}");
}

#[test]
fn exactly_one_source() {
    let e = err("discovery:\n  static: [\"10.0.0.1:80\"]\n  file: { path: x.yaml }\n");
    assert!(e.contains(": discovery: "), "{e}");
    assert!(e.contains("not `static` and `file`"), "{e}");

    let e = err("discovery:\n  consul: { name: x }\n");
    assert!(e.contains("unknown field `consul`"), "{e}");
    assert!(
        e.contains("`static`, `dns`, `file`"),
        "lists the choices: {e}"
    );

    let e = err("discovery: {}\n");
    assert!(e.contains(": discovery: "), "{e}");
    assert!(e.contains("give one source"), "{e}");
}

#[test]
fn dns_defaults_and_full_form() {
    let d = ok("discovery:\n  dns: { name: api.internal, port: 8080 }\n");
    assert_eq!(
        d,
        DiscoveryFile::Dns(DnsFile {
            name: "api.internal".into(),
            port: Some(8080),
            record: RecordKind::A,
            refresh: Dur(DNS_REFRESH),
            server: None,
            timeout: Dur(DNS_TIMEOUT),
        })
    );
    assert_eq!(refresh_interval(&d), Duration::from_secs(10));
    assert_eq!(
        d.to_string(),
        "dns A api.internal port 8080 via the system resolver every 10s"
    );

    let d = ok(r#"
discovery:
  dns:
    name: _http._tcp.api.internal.
    record: SRV
    refresh: 500ms
    server: "127.0.0.1:5353"
    timeout: 1s
"#);
    let DiscoveryFile::Dns(dns) = &d else {
        panic!("not dns: {d:?}")
    };
    assert_eq!(dns.record, RecordKind::SRV);
    assert_eq!(dns.port, None);
    assert_eq!(dns.server, Some(addr("127.0.0.1:5353")));
    assert_eq!(dns.timeout, Dur(Duration::from_secs(1)));
    assert_eq!(refresh_interval(&d), Duration::from_millis(500));

    let d =
        ok("discovery:\n  dns: { name: api.internal, port: 80, record: aaaa, server: \"::1\" }\n");
    let DiscoveryFile::Dns(dns) = &d else {
        panic!("not dns: {d:?}")
    };
    assert_eq!(dns.record, RecordKind::AAAA);
    assert_eq!(
        dns.server,
        Some(addr("[::1]:53")),
        "a bare IP means port 53"
    );
}

#[test]
fn bad_dns_blocks_are_refused() {
    let e = err("discovery:\n  dns: { name: api.internal }\n");
    assert!(e.contains("`port` is required for A records"), "{e}");

    let e = err("discovery:\n  dns: { name: api.internal, record: AAAA }\n");
    assert!(e.contains("`port` is required for AAAA records"), "{e}");

    let e = err("discovery:\n  dns: { name: _x._tcp.api.internal, record: SRV, port: 80 }\n");
    assert!(e.contains("carry their own ports"), "{e}");

    let e = err("discovery:\n  dns: { name: api.internal, port: 0 }\n");
    assert!(e.contains("port` 0"), "{e}");

    let e = err("discovery:\n  dns:\n    name: api.internal\n    port: 80\n    record: MX\n");
    assert!(e.starts_with("5: discovery.dns.record: "), "{e}");
    assert!(e.contains("unknown variant `MX`"), "{e}");

    let e = err("discovery:\n  dns:\n    name: 10.0.0.1\n    port: 80\n");
    assert!(e.starts_with("3: discovery.dns.name: "), "{e}");
    assert!(e.contains("is an IP address"), "{e}");

    let e = err("discovery:\n  dns:\n    name: api.internal\n    port: 80\n    refresh: 0\n");
    assert!(e.starts_with("5: discovery.dns.refresh: "), "{e}");
    assert!(e.contains("0 is not allowed"), "{e}");

    let e = err("discovery:\n  dns:\n    name: api.internal\n    port: 80\n    refresh: 10\n");
    assert!(e.contains("needs a unit"), "{e}");

    let e =
        err("discovery:\n  dns:\n    name: api.internal\n    port: 80\n    server: dns.local\n");
    assert!(e.starts_with("5: discovery.dns.server: "), "{e}");
    assert!(e.contains("invalid DNS server `dns.local`"), "{e}");

    let e = err("discovery:\n  dns:\n    name: api.internal\n    port: 80\n    ttl: 5s\n");
    assert!(e.contains("unknown field `ttl`"), "{e}");

    let e = err("discovery:\n  dns:\n    port: 80\n");
    assert!(e.contains("missing field `name`"), "{e}");
}

#[test]
fn file_form() {
    let d = ok("discovery:\n  file: { path: endpoints.yaml }\n");
    assert_eq!(refresh_interval(&d), FILE_REFRESH);
    assert_eq!(d.to_string(), "file endpoints.yaml every 2s");

    let d = ok("discovery:\n  file: { path: /etc/sg/endpoints.yaml, refresh: 250ms }\n");
    assert_eq!(refresh_interval(&d), Duration::from_millis(250));

    let e = err("discovery:\n  file: { path: \"\" }\n");
    assert!(e.contains("`path` is empty"), "{e}");
    let e = err("discovery:\n  file: { path: x.yaml, refresh: 0 }\n");
    assert!(e.contains("0 is not allowed"), "{e}");
    let e = err("discovery:\n  file: { path: x.yaml, watch: true }\n");
    assert!(e.contains("unknown field `watch`"), "{e}");
}

#[test]
fn builds_each_source() {
    let base = Path::new("/etc/streamgate");
    let d = ok("discovery:\n  static: [\"10.0.0.1:80\"]\n");
    assert!(build(&d, base).is_ok());
    assert!(matches!(watch(&d, base), Ok(None)));
    let d = ok("discovery:\n  dns: { name: api.internal, port: 80, server: \"127.0.0.1:53\" }\n");
    assert!(build(&d, base).is_ok());
    let d = ok("discovery:\n  file: { path: endpoints.yaml }\n");
    assert!(build(&d, base).is_ok());
    let DiscoveryFile::File(f) = &d else {
        panic!("not file: {d:?}")
    };
    assert_eq!(
        FileDiscovery::new(f, base).path(),
        Path::new("/etc/streamgate/endpoints.yaml")
    );
}

#[tokio::test]
async fn static_discovers_its_list() {
    let d =
        ok("discovery:\n  static: [\"10.0.0.1:80\", { address: \"10.0.0.2:80\", weight: 2 }]\n");
    let source = build(&d, Path::new(".")).expect("static builds");
    let (backends, health) = source.discover().await.expect("static discovers");
    assert!(health.is_empty());
    let got: Vec<(String, usize)> = backends
        .iter()
        .map(|b| (b.addr.to_string(), b.weight))
        .collect();
    assert_eq!(
        got,
        vec![("10.0.0.1:80".into(), 1), ("10.0.0.2:80".into(), 2)]
    );
}

#[test]
fn endpoint_files_parse_with_file_and_line() {
    let path = Path::new("/srv/endpoints.yaml");
    let list = file::parse(
        path,
        "- \"10.0.0.1:80\"\n- { address: \"10.0.0.2:80\", weight: 5 }\n",
    )
    .expect("parses");
    assert_eq!(list.0.len(), 2);

    let e = file::parse(path, "- \"10.0.0.1:80\"\n- \"10.0.0.2\"\n")
        .err()
        .unwrap_or_default();
    assert!(e.starts_with("/srv/endpoints.yaml:2:"), "{e}");
    assert!(e.contains("`[1]`"), "names the entry: {e}");
    assert!(e.contains("has no port"), "{e}");

    let e = file::parse(path, "- \"10.0.0.1:80\"\n- { address: [\n")
        .err()
        .unwrap_or_default();
    assert!(e.starts_with("/srv/endpoints.yaml:"), "{e}");

    let e = file::parse(path, "endpoints: [\"10.0.0.1:80\"]\n")
        .err()
        .unwrap_or_default();
    assert!(e.starts_with("/srv/endpoints.yaml:1:"), "{e}");

    let e = file::parse(path, "  \n").err().unwrap_or_default();
    assert_eq!(
        e,
        "/srv/endpoints.yaml: the endpoints file is empty: list at least one endpoint"
    );
}
