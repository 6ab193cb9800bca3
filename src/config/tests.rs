//! Config loading: what loads, and what is refused with which file, line and key.

use std::fs;
use std::path::Path;
use std::time::Duration;

use super::*;
use crate::error::ConfigErrorKind as Kind;
use crate::listen::{ListenerKind, TlsVersion};
use crate::upstream::{Algorithm, HostHeader};

fn load(text: &str) -> Result<Config, ConfigError> {
    Config::from_text(Path::new("main.yaml"), text, Path::new("."))
}

/// Loads `text`, expecting an error at `line` about `key`; returns the error.
#[track_caller]
fn refused(text: &str, line: u32, key: &str) -> ConfigError {
    match load(text) {
        Ok(_) => panic!("config should be refused:\n{text}"),
        Err(e) => {
            assert_eq!(e.file, Path::new("main.yaml"), "{e}");
            assert_eq!(e.line, Some(line), "{e}");
            assert_eq!(e.key, key, "{e}");
            e
        }
    }
}

const GOOD: &str = r#"
threads: 4
grace_period_seconds: 7
listen: ["127.0.0.1:8080", "[::1]:8080"]
sse:
  flush_interval: 20ms
  write_timeout: 10s
services:
  feed:
    url: "http://127.0.0.1:9000/prefix/"
    host_header: upstream
    timeouts: { connect: 1s, read: 0 }
    sse: { read_timeout: 30s, enabled: true }
  web:
    url: "http://web.internal"
host_rules:
  - pattern: "*"
    target: web
    route_rules:
      - pattern: "/events/*"
        target: feed
"#;

#[test]
fn a_full_config_loads_into_the_runtime_model() {
    let config = load(GOOD).expect("loads");
    assert_eq!(config.server.threads, 4);
    assert_eq!(config.server.grace_period_seconds, Some(7));
    assert_eq!(config.listen.len(), 2);
    let feed = &config.services["feed"];
    assert_eq!(feed.url.prefix, "/prefix");
    assert_eq!(feed.url.port, 9000);
    assert_eq!(feed.timeouts.connect, Some(Duration::from_secs(1)));
    assert_eq!(feed.timeouts.read, None, "0 means no limit");
    assert_eq!(
        feed.timeouts.write,
        Some(Duration::from_secs(60)),
        "default"
    );
    // Service sse overrides the global block key by key.
    assert_eq!(feed.sse.flush_interval, Some(Duration::from_millis(20)));
    assert_eq!(feed.sse.read_timeout, Some(Duration::from_secs(30)));
    assert_eq!(feed.sse.write_timeout, Some(Duration::from_secs(10)));
    let web = &config.services["web"];
    assert_eq!(web.url.port, 80);
    let route = config
        .routes
        .lookup(Some("x"), Some(8080), "/events/1")
        .expect("route");
    assert_eq!(route.service.name, "feed");
}

#[test]
fn no_listen_means_the_default_address() {
    let config = load("services: {}\n").expect("loads");
    assert_eq!(config.listen, vec!["0.0.0.0:8080".parse().expect("addr")]);
    let empty = load("").expect("an empty file is a config that routes nothing");
    assert!(empty.services.is_empty());
}

#[test]
fn typos_are_refused_with_line_and_key() {
    refused("threads: 2\nservics: {}\n", 2, "servics");
    let e = refused(
        "services:\n  web:\n    urll: \"http://x\"\n",
        3,
        "services.web.urll",
    );
    assert!(e.to_string().contains("unknown"), "{e}");
    refused("sse:\n  flush: 1s\n", 2, "sse.flush");
    refused(
        "services:\n  w: { url: \"http://x\" }\nhost_rules:\n  - pattern: \"*\"\n    taget: w\n",
        5,
        "host_rules[0].taget",
    );
}

#[test]
fn bad_values_are_refused_with_line_and_key() {
    refused(
        "services:\n  w:\n    url: \"ftp://x\"\n",
        3,
        "services.w.url",
    );
    refused(
        "services:\n  w:\n    url: \"http://\"\n",
        3,
        "services.w.url",
    );
    refused("sse:\n  read_timeout: 5\n", 2, "sse.read_timeout");
    refused("sse:\n  read_timeout: fast\n", 2, "sse.read_timeout");
    refused("listen: [\"localhost:80\"]\n", 1, "listen[0]");
    refused("threads: two\n", 1, "threads");
    refused(
        "services:\n  w:\n    url: \"http://x\"\n    host_header: \"bad\\nvalue\"\n",
        4,
        "services.w.host_header",
    );
    let rules = |pattern: &str| {
        format!(
            "services:\n  w: {{ url: \"http://x\" }}\nhost_rules:\n  - pattern: \"*\"\n    \
             route_rules:\n      - pattern: \"{pattern}\"\n        target: w\n"
        )
    };
    refused(&rules("~("), 6, "host_rules[0].route_rules[0].pattern");
    refused(&rules("events"), 6, "host_rules[0].route_rules[0].pattern");
    refused(&rules("/a*b"), 6, "host_rules[0].route_rules[0].pattern");
    refused(
        "services:\n  w: { url: \"http://x\" }\nhost_rules:\n  - pattern: \"a.*.com\"\n",
        4,
        "host_rules[0].pattern",
    );
}

#[test]
fn references_and_duplicates_are_refused_with_line_and_key() {
    let e = refused(
        "services:\n  w: { url: \"http://x\" }\nhost_rules:\n  - pattern: \"*\"\n    target: nope\n",
        5,
        "host_rules[0].target",
    );
    assert!(
        matches!(e.kind, Kind::UnknownService(ref s) if s == "nope"),
        "{e}"
    );
    refused(
        "services:\n  w: { url: \"http://x\" }\nhost_rules:\n  - pattern: \"*\"\n    \
         route_rules:\n      - pattern: /a\n        target: w\n      - pattern: /b\n        \
         target: x\n",
        9,
        "host_rules[0].route_rules[1].target",
    );
    // A key given twice: the line where it is repeated.
    refused(
        "services:\n  w: { url: \"http://x\" }\n  w: { url: \"http://y\" }\n",
        3,
        "services",
    );
    refused(
        "services:\n  w: { url: \"http://x\", url: \"http://y\" }\n",
        2,
        "services.w",
    );
    refused(
        "services:\n  w: { url: \"http://x\" }\nhost_rules:\n  - pattern: \"a.test\"\n    \
         target: w\n  - pattern: \"A.test\"\n    target: w\n",
        6,
        "host_rules[1].pattern",
    );
    refused(
        "services:\n  w: { url: \"http://x\" }\nhost_rules:\n  - pattern: \"*\"\n    \
         route_rules:\n      - pattern: /a/*\n        target: w\n      - pattern: /a/*\n        \
         target: w\n",
        8,
        "host_rules[0].route_rules[1].pattern",
    );
    refused(
        "listen: [\"127.0.0.1:1\", \"127.0.0.1:1\"]\n",
        1,
        "listen[1]",
    );
}

#[test]
fn includes_merge_in_lexical_order_and_report_their_own_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let main = dir.path().join("main.yaml");
    fs::create_dir(dir.path().join("conf.d")).expect("mkdir");
    fs::write(
        &main,
        "include: [\"conf.d/*.yaml\"]\nservices:\n  web: { url: \"http://127.0.0.1:1\" }\n",
    )
    .expect("write");
    fs::write(
        dir.path().join("conf.d/b.yaml"),
        "host_rules:\n  - pattern: \"*\"\n    target: api\n",
    )
    .expect("write");
    fs::write(
        dir.path().join("conf.d/a.yaml"),
        "services:\n  api: { url: \"http://127.0.0.1:2\" }\n",
    )
    .expect("write");
    let config = Config::load(&main).expect("loads");
    assert_eq!(config.files.len(), 3);
    assert!(config.files[1].ends_with("conf.d/a.yaml"));
    assert_eq!(
        config
            .routes
            .lookup(Some("h"), None, "/")
            .expect("route")
            .service
            .name,
        "api"
    );

    // A service defined twice across files names both files.
    fs::write(
        dir.path().join("conf.d/c.yaml"),
        "\nservices:\n  web: { url: \"http://127.0.0.1:3\" }\n",
    )
    .expect("write");
    let e = Config::load(&main).expect_err("duplicate service");
    assert!(e.file.ends_with("conf.d/c.yaml"), "{e}");
    assert_eq!(e.line, Some(3));
    assert_eq!(e.key, "services.web");
    assert!(e.to_string().contains("main.yaml"), "{e}");
    fs::remove_file(dir.path().join("conf.d/c.yaml")).expect("rm");

    // Included files take services and host rules only.
    fs::write(dir.path().join("conf.d/d.yaml"), "threads: 3\n").expect("write");
    let e = Config::load(&main).expect_err("pingora keys belong to the main file");
    assert!(e.file.ends_with("conf.d/d.yaml"), "{e}");
    assert_eq!(e.key, "threads");
    fs::remove_file(dir.path().join("conf.d/d.yaml")).expect("rm");

    // A missing plain path is an error; a glob that matches nothing is not.
    fs::write(&main, "include: [\"missing.yaml\"]\n").expect("write");
    let e = Config::load(&main).expect_err("missing include");
    assert_eq!(e.key, "include[0]");
    fs::write(&main, "include: [\"none/*.yaml\"]\n").expect("write");
    Config::load(&main).expect("empty glob");
}

#[test]
fn a_typical_sse_config_loads_as_written() {
    let text = include_str!("../../tests/fixtures/sse_example.yaml");
    let config = load(text).unwrap_or_else(|e| panic!("{e}"));
    let service = &config.services["sse-service"];
    assert_eq!(service.sse.flush_interval, Some(Duration::from_millis(50)));
    assert_eq!(
        service.sse.max_connections,
        Some(1000),
        "inherited from the global block"
    );
    assert!(service.sse.connection_tracking);
    assert_eq!(service.url.host, "backend-sse");
    assert_eq!(config.sse_limit.as_ref().map(|s| s.max()), Some(1000));
    let instance = &config.middlewares["sse_support"];
    assert_eq!(instance.kind, "sse");
    let route = config
        .routes
        .lookup(Some("sse.example.com"), Some(80), "/events/x")
        .expect("route");
    assert_eq!(route.service.name, "sse-service");
    let chain: Vec<&str> = route.chain.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(
        chain,
        ["sse_support"],
        "named at host and route level, runs once"
    );
}

#[test]
fn every_shipped_config_loads() {
    let conf = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf");
    for name in [
        "streamgate.yaml",
        "default.yaml",
        "conf.d/notifications.yaml",
    ] {
        Config::load(&conf.join(name)).unwrap_or_else(|e| panic!("{e}"));
    }
    Config::embedded().expect("embedded config");
}

#[test]
fn the_embedded_config_grace_period_covers_its_drain_and_finish_periods() {
    // Every service of the embedded config, and the global block, may drain and finish
    // within the grace period; Pingora stops the process when it runs out.
    let config = Config::embedded().expect("embedded config");
    let longest = config
        .services
        .values()
        .flat_map(|s| [s.sse.drain_period, s.sse.finish_period])
        .max()
        .expect("a service");
    assert_eq!(
        config.server.grace_period_seconds,
        Some(longest.as_secs_f64().ceil() as u64 + DRAIN_MARGIN_SECS),
        "the embedded config sets no grace period of its own: it follows its periods"
    );
}

#[test]
fn a_full_example_loads_as_written() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/full_example.yaml");
    let config = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.server.grace_period_seconds, Some(30));
    let feed = &config.services["sse-service"];
    assert_eq!(feed.sse.flush_interval, Some(Duration::from_millis(50)));
    let on_80 = config
        .routes
        .lookup(Some("sse.example.com"), Some(80), "/x");
    assert_eq!(on_80.expect("route").service.name, "sse-service");
    let on_8080 = config
        .routes
        .lookup(Some("sse.example.com"), Some(8080), "/x");
    assert_eq!(on_8080.expect("route").service.name, "web");
}

const MW_BASE: &str = "services:\n  w: { url: \"http://x\" }\n";

#[test]
fn middleware_errors_name_line_and_key() {
    let e = refused(
        &format!("{MW_BASE}middleware_services:\n  - name: a\n    type: nope\n"),
        5,
        "middleware_services[0].type",
    );
    assert!(
        e.to_string().contains("unknown middleware type `nope`"),
        "{e}"
    );
    refused(
        &format!(
            "{MW_BASE}middleware_services:\n  - name: a\n    type: headers\n    config:\n      \
             response:\n        sett: {{}}\n"
        ),
        8,
        "middleware_services[0].config.response.sett",
    );
    refused(
        &format!(
            "{MW_BASE}middleware_services:\n  - name: a\n    type: ip_filter\n    config:\n      \
             allow: [\"10.0.0.0/40\"]\n"
        ),
        7,
        "middleware_services[0].config.allow[0]",
    );
    // Errors found when building the instance point at its config.
    refused(
        &format!(
            "{MW_BASE}middleware_services:\n  - name: a\n    type: rate_limit\n    config:\n      \
             rate: 0\n"
        ),
        6,
        "middleware_services[0].config",
    );
    let e = refused(
        &format!("{MW_BASE}middlewares: [ghost]\n"),
        3,
        "middlewares[0]",
    );
    assert!(
        matches!(e.kind, Kind::UnknownMiddleware(ref n) if n == "ghost"),
        "{e}"
    );
    refused(
        &format!(
            "{MW_BASE}host_rules:\n  - pattern: \"*\"\n    target: w\n    route_rules:\n      \
             - pattern: /a\n        target: w\n        middlewares: [ghost]\n"
        ),
        9,
        "host_rules[0].route_rules[0].middlewares[0]",
    );
    refused(
        &format!(
            "{MW_BASE}middleware_services:\n  - {{ name: a, type: request_id }}\n  \
             - {{ name: a, type: cors }}\n"
        ),
        5,
        "middleware_services[1].name",
    );
}

#[test]
fn chains_are_built_per_route() {
    let config = load(&format!(
        "{MW_BASE}middleware_services:\n  - {{ name: ids, type: request_id }}\n  \
         - {{ name: cors, type: cors, priority: 10 }}\n  \
         - {{ name: auth, type: api_key, priority: 20, config: {{ keys: [k1] }} }}\n  \
         - {{ name: off, type: cors, enabled: false }}\n\
         middlewares: [ids, cors]\n\
         host_rules:\n  - pattern: \"*\"\n    target: w\n    middlewares: [auth, ids, off]\n    \
         route_rules:\n      - {{ pattern: /open, target: w }}\n"
    ))
    .expect("loads");
    let chain = |path: &str| -> Vec<String> {
        let route = config.routes.lookup(Some("h"), None, path).expect("route");
        route.chain.iter().map(|i| i.name.clone()).collect()
    };
    assert_eq!(chain("/"), ["cors", "ids", "auth"]);
    assert_eq!(chain("/open"), ["cors", "ids", "auth"]);
    assert_eq!(
        config.middlewares.len(),
        4,
        "disabled instances are defined, not run"
    );
}

#[test]
fn an_admin_listener_off_loopback_needs_a_token() {
    refused("admin: { listen: \"0.0.0.0:9901\" }\n", 1, "admin.listen");
    let config = load("admin: { listen: \"0.0.0.0:9901\", token: t }\n").expect("loads");
    assert_eq!(config.admin.and_then(|a| a.token).as_deref(), Some("t"));
    assert!(load("admin: { listen: \"127.0.0.1:9901\" }\n").is_ok());
    refused("access_log: { format: xml }\n", 1, "access_log.format");
}

#[test]
fn the_admin_token_comes_from_one_place_each_checked() {
    refused(
        "admin:\n  listen: \"0.0.0.0:9901\"\n  token: a\n  token_env: B\n",
        4,
        "admin.token_env",
    );
    let e = refused(
        "admin:\n  listen: \"0.0.0.0:9901\"\n  token_env: STREAMGATE_UNSET_TEST_VARIABLE\n",
        3,
        "admin.token_env",
    );
    assert!(e.to_string().contains("is not set"), "{e}");
    refused(
        "admin:\n  listen: \"0.0.0.0:9901\"\n  token_file: /nonexistent/token\n",
        3,
        "admin.token_file",
    );
    refused(
        "admin:\n  listen: \"127.0.0.1:9901\"\n  token: \"\"\n",
        3,
        "admin.token",
    );
    refused(
        "admin:\n  listen: \"127.0.0.1:9901\"\n  allowed_hosts: [ok.example, \"http://x/\"]\n",
        3,
        "admin.allowed_hosts[1]",
    );
    std::env::set_var("STREAMGATE_CONFIG_TEST_TOKEN", "t0");
    let config = load(
        "admin:\n  listen: \"0.0.0.0:9901\"\n  token_env: STREAMGATE_CONFIG_TEST_TOKEN\n  \
         open_probes: true\n  allowed_hosts: [Admin.Example.]\n",
    )
    .expect("loads");
    let admin = config.admin.expect("admin");
    assert_eq!(admin.token.as_deref(), Some("t0"));
    assert!(admin.open_probes);
    assert_eq!(admin.allowed_hosts, ["admin.example"]);
    assert_eq!(
        admin.token_source,
        TokenSource::Env("STREAMGATE_CONFIG_TEST_TOKEN".into())
    );
}

#[test]
fn any_pingora_setting_is_passed_through_but_typos_beside_them_are_not() {
    let config = load(
        "work_stealing: false\nupstream_keepalive_pool_size: 7\nmax_retries: 2\n\
         daemon_wait_for_ready: false\nservices: {}\n",
    )
    .expect("Pingora's own keys load");
    assert!(!config.server.work_stealing);
    assert_eq!(config.server.upstream_keepalive_pool_size, 7);
    refused("work_steeling: false\n", 1, "work_steeling");
}

#[test]
fn work_stealing_is_off_unless_the_file_turns_it_on() {
    let default = load("services: {}\n").expect("loads");
    assert!(!default.server.work_stealing);
    let on = load("work_stealing: true\nservices: {}\n").expect("loads");
    assert!(on.server.work_stealing);
}

/// A self-signed certificate for `names` and its key, written to `dir` as
/// `{stem}.pem` and `{stem}.key`.
fn write_cert(dir: &Path, stem: &str, names: &[&str]) {
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let made = rcgen::generate_simple_self_signed(names).expect("rcgen");
    fs::write(dir.join(format!("{stem}.pem")), made.cert.pem()).expect("write");
    fs::write(
        dir.join(format!("{stem}.key")),
        made.key_pair.serialize_pem(),
    )
    .expect("write");
}

#[test]
fn a_tls_example_loads_as_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    fs::create_dir(dir.path().join("certs")).expect("mkdir");
    write_cert(&dir.path().join("certs"), "example", &["example.com"]);
    write_cert(&dir.path().join("certs"), "wild", &["*.example.com"]);
    let main = dir.path().join("main.yaml");
    fs::write(
        &main,
        r#"
listen:
  - "0.0.0.0:8080"                       # plain, as before
  - address: "0.0.0.0:8443"
    tls:
      certificates:                       # chosen by SNI; the first is the default
        - { cert: certs/example.pem, key: certs/example.key }          # paths relative to the config file
        - { cert: certs/wild.pem, key: certs/wild.key, hosts: ["*.example.com"] }
      min_version: "1.2"
    http2: true                           # ALPN h2 + http/1.1; false = http/1.1 only
    h2c: false                            # plaintext HTTP/2 on a plain listener, for internal hops
"#,
    )
    .expect("write");
    let config = Config::load(&main).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.listen.len(), 2);
    assert_eq!(config.listeners[1].kind, ListenerKind::Tls { http2: true });
    let tls = &config.tls[&config.listen[1]];
    assert_eq!(tls.min_version, TlsVersion::V1_2);
    let pick = |sni| {
        tls.select(Some(sni))
            .expect("a certificate")
            .cert_path
            .clone()
    };
    assert!(pick("a.example.com").ends_with("certs/wild.pem"));
    assert!(pick("example.com").ends_with("certs/example.pem"));
    assert!(
        pick("other.test").ends_with("certs/example.pem"),
        "the default"
    );
    // Certificate files are watched for reloads like the config's own files.
    assert!(config.files.iter().any(|f| f.ends_with("certs/wild.key")));
    let described = config.describe();
    assert!(
        described.contains("certs/example.pem (default)"),
        "{described}"
    );
    assert!(described.contains("names: *.example.com"), "{described}");
    assert!(described.contains("expires: "), "{described}");
}

#[test]
fn listener_forms_load_into_their_kinds() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_cert(dir.path(), "a", &["a.test"]);
    let d = dir.path().display();
    let config = load(&format!(
        "listen:\n  - \"127.0.0.1:1\"\n  - {{ address: \"127.0.0.1:2\", h2c: true, tcp_keepalive: 0, \
         max_connections: 7, idle_timeout: 0, defer_accept: 0 }}\n  \
         - {{ address: \"127.0.0.1:3\", redirect_http: true, defer_accept: 5s }}\n  \
         - address: \"127.0.0.1:4\"\n    http2: false\n    tls:\n      min_version: 1.3\n      \
         certificates: [{{ cert: {d}/a.pem, key: {d}/a.key }}]\n\
         http2: {{ max_concurrent_streams: 10, idle_timeout: 0 }}\n"
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    let kinds: Vec<ListenerKind> = config.listeners.iter().map(|l| l.kind).collect();
    assert_eq!(
        kinds,
        [
            ListenerKind::Plain { h2c: false },
            ListenerKind::Plain { h2c: true },
            ListenerKind::Redirect { https_port: 4 },
            ListenerKind::Tls { http2: false },
        ]
    );
    assert_eq!(
        config.listeners[0].tcp_keepalive,
        Some(Duration::from_secs(60))
    );
    assert_eq!(config.listeners[1].tcp_keepalive, None);
    assert_eq!(
        config.listeners[0].max_connections,
        crate::listen::default_max_connections()
    );
    assert_eq!(
        config.listeners[0].idle_timeout,
        Some(Duration::from_secs(60))
    );
    assert_eq!(config.listeners[1].max_connections, 7);
    assert_eq!(config.listeners[1].idle_timeout, None, "0: no idle limit");
    assert_eq!(config.listeners[0].defer_accept, None, "at once unless set");
    assert_eq!(config.listeners[1].defer_accept, None, "0: at once");
    assert_eq!(
        config.listeners[2].defer_accept,
        Some(Duration::from_secs(5))
    );
    assert_eq!(config.tls.len(), 1);
    assert_eq!(
        config.tls[&config.listen[3]].min_version,
        TlsVersion::V1_3,
        "an unquoted 1.3 is a version too"
    );
    assert_eq!(config.http2.max_concurrent_streams, 10);
    assert_eq!(config.http2.idle_timeout, None);
    let defaults = load("services: {}\n").expect("loads").http2;
    assert_eq!(defaults.max_concurrent_streams, 256);
    assert_eq!(defaults.idle_timeout, Some(Duration::from_secs(180)));
}

#[test]
fn bad_listeners_are_refused_with_line_and_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_cert(dir.path(), "a", &["a.test"]);
    write_cert(dir.path(), "b", &["b.test"]);
    let d = dir.path().display();
    let tls = |extra: &str, cert: &str, key: &str| {
        format!(
            "listen:\n  - address: \"127.0.0.1:1\"\n    tls:\n      certificates:\n        \
             - cert: {d}/{cert}\n          key: {d}/{key}\n{extra}"
        )
    };
    // Unknown keys, in the listener, in tls, in a certificate.
    refused(
        "listen:\n  - address: \"127.0.0.1:1\"\n    tsl: {}\n",
        3,
        "listen[0].tsl",
    );
    refused(
        &tls("      min_versoin: \"1.2\"\n", "a.pem", "a.key"),
        7,
        "listen[0].tls.min_versoin",
    );
    refused(
        "listen:\n  - address: \"127.0.0.1:1\"\n    tls:\n      certificates:\n        \
         - { cert: a, key: b, host: [x] }\n",
        5,
        "listen[0].tls.certificates[0].host",
    );
    let e = refused("listen:\n  - { h2c: true }\n", 2, "listen[0]");
    assert!(e.to_string().contains("missing field `address`"), "{e}");
    refused("listen: [8080]\n", 1, "listen[0]");
    // Certificate files: missing, not a certificate, a key of another certificate, no key.
    let cert = "listen[0].tls.certificates[0].cert";
    let key = "listen[0].tls.certificates[0].key";
    for (cert_file, key_file, line, at, says) in [
        ("missing.pem", "a.key", 5, cert, "missing.pem"),
        ("a.key", "a.key", 5, cert, "no certificate"),
        (
            "a.pem",
            "b.key",
            6,
            key,
            "b.key is not the private key of the certificate in",
        ),
        ("a.pem", "a.pem", 6, key, "no PEM private key"),
    ] {
        let e = refused(&tls("", cert_file, key_file), line, at);
        assert!(e.to_string().contains(says), "{e}");
    }
    // Versions, options that contradict the listener's kind.
    let e = refused(
        &tls("      min_version: \"1.1\"\n", "a.pem", "a.key"),
        7,
        "listen[0].tls.min_version",
    );
    assert!(e.to_string().contains("1.2"), "{e}");
    refused(
        &tls("    h2c: true\n", "a.pem", "a.key"),
        7,
        "listen[0].h2c",
    );
    refused(
        &tls("    redirect_http: true\n", "a.pem", "a.key"),
        7,
        "listen[0].redirect_http",
    );
    refused(
        "listen:\n  - address: \"127.0.0.1:1\"\n    tls: { certificates: [] }\n",
        3,
        "listen[0].tls",
    );
    refused(
        "listen:\n  - { address: \"127.0.0.1:1\", http2: true }\n",
        2,
        "listen[0].http2",
    );
    refused(
        "listen:\n  - { address: \"127.0.0.1:1\", redirect_http: true, h2c: true }\n",
        2,
        "listen[0].h2c",
    );
    refused(
        "listen:\n  - \"127.0.0.1:1\"\n  - { address: \"127.0.0.1:1\", h2c: true }\n",
        3,
        "listen[1]",
    );
    refused(
        "http2:\n  max_concurrent_streams: 0\n",
        2,
        "http2.max_concurrent_streams",
    );
    refused("http2:\n  ping_interval: 10s\n", 2, "http2.ping_interval");
}

#[test]
fn stream_lifecycle_settings_inherit_and_zero_disables() {
    let config = load(
        "sse: { heartbeat_interval: 15s, max_lifetime: 1h, drain_period: 4s, finish_period: 3s }\n\
         services:\n  feed:\n    url: \"http://127.0.0.1:1\"\n    \
         sse: { header_timeout: 0, inactive_threshold: 2m, on_upstream_error: event, heartbeat_interval: 0 }\n\
         host_rules:\n  - { pattern: \"*\", target: feed }\n",
    )
    .expect("loads");
    let sse = &config.services["feed"].sse;
    assert_eq!(sse.header_timeout, None);
    assert_eq!(
        sse.heartbeat_interval, None,
        "0 turns the global heartbeat off"
    );
    assert_eq!(sse.max_lifetime, Some(Duration::from_secs(3600)));
    assert_eq!(sse.inactive_threshold, Some(Duration::from_secs(120)));
    assert_eq!(sse.on_upstream_error, crate::sse::OnUpstreamError::Event);
    assert_eq!(sse.drain_period, Duration::from_secs(4));
    assert_eq!(sse.finish_period, Duration::from_secs(3));
    // Pingora's grace period follows the longest drain or finish period when it is not set.
    assert_eq!(
        config.server.grace_period_seconds,
        Some(4 + DRAIN_MARGIN_SECS)
    );
    let longer = load(
        "sse: { drain_period: 4s, finish_period: 1s }\n\
         services:\n  feed:\n    url: \"http://127.0.0.1:1\"\n    sse: { finish_period: 9s }\n\
         middleware_services:\n  - { name: s, type: sse, config: { finish_period: 20s } }\n\
         host_rules:\n  - { pattern: \"*\", target: feed }\n",
    )
    .expect("loads");
    assert_eq!(
        longer.server.grace_period_seconds,
        Some(20 + DRAIN_MARGIN_SECS),
        "an sse middleware's period counts too"
    );
    let defaults = load("").expect("loads");
    assert_eq!(
        defaults.server.grace_period_seconds,
        Some(crate::sse::settings::DEFAULT_FINISH_PERIOD.as_secs() + DRAIN_MARGIN_SECS)
    );
}

#[test]
fn bad_stream_lifecycle_settings_are_refused_at_their_key() {
    refused(
        "sse:\n  on_upstream_error: retry\n",
        2,
        "sse.on_upstream_error",
    );
    refused(
        "sse:\n  heartbeat_interval: soon\n",
        2,
        "sse.heartbeat_interval",
    );
    refused("sse:\n  max_lifetme: 1h\n", 2, "sse.max_lifetme");
}

#[test]
fn https_services_load_with_their_tls_settings() {
    let dir = tempfile::tempdir().expect("tempdir");
    fs::create_dir_all(dir.path().join("certs")).expect("mkdir");
    fs::create_dir_all(dir.path().join("conf.d")).expect("mkdir");
    write_cert(&dir.path().join("certs"), "ca", &["ca.test"]);
    write_cert(&dir.path().join("conf.d"), "own", &["own.test"]);
    let main = dir.path().join("main.yaml");
    fs::write(
        &main,
        r#"
include: ["conf.d/*.yaml"]
services:
  feed:
    url: "https://feed.example:8443/api/"
    scheme: https
    host_header: upstream
    tls: { sni: feed.internal, ca_file: certs/ca.pem }
  plain:
    url: "https://origin.example"
    host_header: upstream
  ip:
    url: "https://[::1]:9443"
    tls: { verify: false, client_cert: certs/ca.pem, client_key: certs/ca.key }
  web:
    url: "http://web.example"
    scheme: http
"#,
    )
    .expect("write");
    fs::write(
        dir.path().join("conf.d/more.yaml"),
        "services:\n  more:\n    url: \"https://more.example\"\n    \
         tls: { ca_file: own.pem }\n",
    )
    .expect("write");
    let config = Config::load(&main).unwrap_or_else(|e| panic!("{e}"));

    let feed = &config.services["feed"];
    let tls = feed.tls.as_ref().expect("https service has tls");
    assert_eq!(feed.url.port, 8443);
    assert!(tls.verify);
    assert_eq!(tls.sni, "feed.internal");
    let ca = tls.ca.as_ref().expect("ca_file");
    assert_eq!(ca.path, dir.path().join("certs/ca.pem"));
    assert_eq!(ca.len(), 1);
    assert!(
        config.files.contains(&ca.path),
        "a CA file is watched like the config files"
    );
    let peer = feed.peer("127.0.0.1:8443".parse().expect("addr"), None);
    assert!(peer.is_tls());
    assert_eq!(peer.sni, "feed.internal");
    assert!(peer.options.verify_cert && peer.options.verify_hostname);
    assert!(peer.options.ca.is_some());
    assert_eq!(
        peer.options.alpn,
        pingora_core::protocols::ALPN::H1,
        "the relay speaks HTTP/1.1 to origins"
    );

    let plain = &config.services["plain"];
    let tls = plain.tls.as_ref().expect("tls defaults");
    assert_eq!(plain.url.port, 443);
    assert_eq!((tls.verify, tls.sni.as_str()), (true, "origin.example"));
    assert!(tls.ca.is_none(), "the system store");
    assert!(
        matches!(&plain.host_header, HostHeader::Fixed(v) if v == "origin.example"),
        "port 443 is left out of an https Host"
    );

    let ip = &config.services["ip"];
    let tls = ip.tls.as_ref().expect("tls");
    assert_eq!(
        tls.sni, "::1",
        "an IP host is the server name, never an empty SNI"
    );
    let peer = ip.peer("[::1]:9443".parse().expect("addr"), None);
    assert!(!peer.options.verify_cert && !peer.options.verify_hostname);
    let client = tls.client.as_ref().expect("client_cert");
    assert_eq!(client.subject, "CN=rcgen self signed cert");
    for path in ["certs/ca.pem", "certs/ca.key"] {
        assert!(
            config.files.contains(&dir.path().join(path)),
            "{path} is watched like the config files"
        );
    }
    assert!(peer.client_cert_key.is_some(), "presented to the origin");
    let without = crate::upstream::origin_tls::OriginTls {
        client: None,
        ..tls.clone()
    };
    let mut bare = pingora_core::upstreams::peer::HttpPeer::new(
        "[::1]:9443".parse::<std::net::SocketAddr>().expect("addr"),
        true,
        "::1".into(),
    );
    without.apply(&mut bare);
    assert_ne!(
        peer.group_key, bare.group_key,
        "connections made with the certificate are pooled apart from ones made without"
    );

    let web = &config.services["web"];
    assert!(web.tls.is_none());
    assert!(!web
        .peer("127.0.0.1:80".parse().expect("addr"), None)
        .is_tls());

    let more = config.services["more"].tls.as_ref().expect("tls");
    assert_eq!(
        more.ca.as_ref().map(|ca| ca.path.clone()),
        Some(dir.path().join("conf.d/own.pem")),
        "relative to the file that defines the service"
    );

    let described = config.describe();
    for line in [
        "https://feed.example:8443/api",
        "tls: verify, sni feed.internal, CA ",
        "https://origin.example\n",
        "tls: verify, sni origin.example, system CA store",
        "https://[::1]:9443",
        "tls: NO certificate verification, no SNI (IP ::1), system CA store, client \
         certificate CN=rcgen self signed cert (",
        "http://web.example\n",
    ] {
        assert!(described.contains(line), "{line:?} in:\n{described}");
    }
}

#[test]
fn bad_https_settings_are_refused_with_line_and_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().display();
    fs::write(dir.path().join("junk.pem"), "not a certificate\n").expect("write");
    fs::write(
        dir.path().join("bad.pem"),
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )
    .expect("write");
    let service = |keys: &str| format!("services:\n  w:\n{keys}");

    let e = refused(
        &service("    url: \"https://x\"\n    scheme: http\n"),
        4,
        "services.w.scheme",
    );
    assert!(e.to_string().contains("disagrees with the URL"), "{e}");
    refused(
        &service("    url: \"http://x\"\n    scheme: https\n"),
        4,
        "services.w.scheme",
    );
    refused(
        &service("    url: \"https://x\"\n    scheme: ftp\n"),
        4,
        "services.w.scheme",
    );
    let e = refused(
        &service("    url: \"http://x\"\n    tls: { verify: true }\n"),
        4,
        "services.w.tls",
    );
    assert!(e.to_string().contains("https"), "{e}");
    refused(
        &service("    url: \"https://x\"\n    tls:\n      verfy: false\n"),
        5,
        "services.w.tls.verfy",
    );
    for sni in ["\"\"", "\"not a name\""] {
        refused(
            &service(&format!(
                "    url: \"https://x\"\n    tls:\n      sni: {sni}\n"
            )),
            5,
            "services.w.tls.sni",
        );
    }
    for (file, why) in [
        ("missing.pem", "cannot read"),
        ("junk.pem", "holds no certificate"),
        ("bad.pem", ""),
    ] {
        let e = refused(
            &service(&format!(
                "    url: \"https://x\"\n    tls:\n      verify: true\n      ca_file: {d}/{file}\n"
            )),
            6,
            "services.w.tls.ca_file",
        );
        let text = e.to_string();
        assert!(text.contains(file) && text.contains(why), "{text}");
    }
}

#[test]
fn services_with_many_endpoints_load() {
    let config = load(
        "services:\n  feed:\n    discovery:\n      static: [\"127.0.0.1:1\", { address: \"127.0.0.1:2\", weight: 3 }]\n    \
         load_balancing: consistent_hash\n    hash_key: cookie:session\n    \
         health_check: { type: tcp, interval: 2s, unhealthy_threshold: 2 }\n    \
         passive_health: { failures: 2, cooldown: 5s }\n    retries: 1\n    \
         sse: { resume: true, resume_attempts: 5, resume_window: 2m }\n\
         host_rules:\n  - { pattern: \"*\", target: feed }\n",
    )
    .expect("loads");
    let feed = &config.services["feed"];
    assert_eq!(feed.endpoints.algorithm(), Algorithm::ConsistentHash);
    assert_eq!(feed.retries, 1);
    assert_eq!(feed.preconnect, 0, "no spare connections unless asked for");
    assert_eq!(feed.request_buffer, crate::upstream::DEFAULT_REQUEST_BUFFER);
    let buffered = load(
        "services:\n  up:\n    url: \"http://127.0.0.1:1\"\n    request_buffer: 64KiB\n    \
         request_buffer_wait: 5ms\n",
    )
    .expect("loads");
    assert_eq!(buffered.services["up"].request_buffer, 64 * 1024);
    let spares =
        load("services:\n  up: { url: \"http://127.0.0.1:1\", preconnect: 4 }\n").expect("loads");
    assert_eq!(spares.services["up"].preconnect, 4);
    assert_eq!(
        buffered.services["up"].request_buffer_wait,
        std::time::Duration::from_millis(5)
    );
    assert!(feed.sse.resume);
    assert_eq!(feed.sse.resume_attempts, 5);
    let plain =
        load("services:\n  web: { url: \"http://127.0.0.1:1\", sse: { enabled: false } }\n")
            .expect("loads");
    assert_eq!(
        plain.services["web"].endpoints.algorithm(),
        Algorithm::RoundRobin,
        "least_connections is the default only for services that stream SSE"
    );
}

#[test]
fn bad_endpoint_settings_are_refused_at_their_key() {
    let service = |body: &str| format!("services:\n  feed:\n{body}");
    refused(
        &service("    url: \"http://127.0.0.1:1\"\n    discovery: { static: [\"127.0.0.1:2\"] }\n"),
        4,
        "services.feed.discovery",
    );
    refused(&service("    retries: 1\n"), 2, "services.feed");
    for bad in [
        "request_buffer: 17MiB",
        "request_buffer: lots",
        "request_buffer_wait: soon",
        "preconnect: 257",
        "preconnect: -1",
    ] {
        let key = bad.split(':').next().expect("key");
        let e = refused(
            &service(&format!("    url: \"http://127.0.0.1:1\"\n    {bad}\n")),
            4,
            &format!("services.feed.{key}"),
        );
        assert!(!e.to_string().is_empty());
    }
    refused(
        &service("    url: \"http://127.0.0.1:1\"\n    hash_key: path\n"),
        4,
        "services.feed.hash_key",
    );
    refused(
        &service("    url: \"http://127.0.0.1:1\"\n    load_balancing: fastest\n"),
        4,
        "services.feed.load_balancing",
    );
    refused(
        &service("    url: \"http://127.0.0.1:1\"\n    load_balancing: consistent_hash\n    hash_key: \"header:\"\n"),
        5,
        "services.feed.hash_key",
    );
    refused(
        &service("    url: \"http://127.0.0.1:1\"\n    health_check: { interval: 0 }\n"),
        4,
        "services.feed.health_check.interval",
    );
    refused(
        &service("    url: \"http://127.0.0.1:1\"\n    passive_health: { failures: 0 }\n"),
        4,
        "services.feed.passive_health.failures",
    );
}

#[test]
fn affinity_loads_and_a_single_endpoint_is_warned_about() {
    let config = load(
        "services:\n  mcp:\n    discovery: { static: [\"127.0.0.1:1\", \"127.0.0.1:2\"] }\n    \
         load_balancing: round_robin\n    \
         affinity: { header: Mcp-Session-Id, ttl: 10m, max_entries: 500 }\n  \
         one:\n    url: \"http://127.0.0.1:3\"\n    affinity: { cookie: sid }\n",
    )
    .expect("loads");
    let mcp = config.services["mcp"].affinity.as_ref().expect("affinity");
    assert_eq!(mcp.source.to_string(), "header mcp-session-id");
    assert_eq!(mcp.ttl, Some(Duration::from_secs(600)));
    assert_eq!(mcp.max_entries, 500);
    let warnings: Vec<&str> = config.warnings().collect();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].starts_with("warning: main.yaml:8:5: `services.one.affinity`: ")
            && warnings[0].contains("one endpoint"),
        "{warnings:?}"
    );
    let described = config.describe();
    assert!(
        described
            .contains("affinity: header mcp-session-id, ttl 10m, at most 500 pins (up to 0.1 MiB)"),
        "{described}"
    );
    assert!(described.contains(warnings[0]), "{described}");
}

#[test]
fn bad_affinity_settings_are_refused_at_their_key() {
    let service = |affinity: &str| {
        format!(
            "services:\n  feed:\n    discovery: {{ static: [\"127.0.0.1:1\", \"127.0.0.1:2\"] }}\n    \
             affinity:\n{affinity}"
        )
    };
    refused(
        &service("      header: Mcp-Session-Id\n      tll: 30m\n"),
        6,
        "services.feed.affinity.tll",
    );
    refused(
        &service("      header: \"bad name\"\n"),
        5,
        "services.feed.affinity.header",
    );
    refused(
        &service("      header: Mcp-Session-Id\n      max_entries: 0\n"),
        6,
        "services.feed.affinity.max_entries",
    );
    refused(
        &service("      header: Mcp-Session-Id\n      ttl: 30\n"),
        6,
        "services.feed.affinity.ttl",
    );
    let e = refused(
        &service("      header: a\n      cookie: b\n"),
        4,
        "services.feed.affinity",
    );
    assert!(e.to_string().contains("not both"), "{e}");
    refused(&service("      ttl: 1m\n"), 4, "services.feed.affinity");
}
