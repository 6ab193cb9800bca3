//! The admin listener: a separate Pingora service (`admin: { listen, token }`) that shows
//! what the proxy is doing and takes a few commands. Loopback by default; any other address
//! needs `admin.token`, and with a token every endpoint needs `Authorization: Bearer
//! <token>` (compared in constant time). Mutating endpoints are POST only.
//!
//! | endpoint | answer |
//! | --- | --- |
//! | `GET /healthz` | the process is alive |
//! | `GET /readyz` | a config is loaded and being served |
//! | `GET /config` | every config file as loaded, secrets redacted, with version and load time |
//! | `GET /routes` | the route table in precedence order, with each route's chain |
//! | `GET /upstreams` | services, their URL, affinity, SSE limits and open streams; each endpoint's health, open requests and pinned sessions |
//! | `GET /sse/connections` | open tracked streams; filters `route`, `service`, `client`, `min_age`; `limit`, `offset` |
//! | `GET /sse/connections/{id}` | one stream |
//! | `POST /reload` | the same reload as `SIGHUP`: the new version, or the validation error (422) |
//! | `DELETE /sse/connections/{id}` | ends that stream at its next event boundary, with a `retry:` hint |
//! | `GET /metrics` | Prometheus text format |
//! | `GET /` | the live dashboard (one page, assets embedded) |
//! | `GET /events` | the dashboard's feed: an SSE stream of snapshots, one a second |
//!
//! Browsers cannot put a bearer token on a page load or an `EventSource`, so the token is
//! also accepted as a `token` query parameter (percent-decoded: the dashboard encodes it).
//!
//! A web page the operator visits must not drive the API, token or not:
//! - **`Host`** must name this listener: its own IP, the IP the connection came in on, a
//!   loopback IP, `localhost`, or a name in `admin.allowed_hosts` (any port, because
//!   container port mappings change it). A page that rebinds its own DNS name to
//!   127.0.0.1 still sends its own name, and gets `403`.
//! - **Requests that change state** (anything but GET and HEAD) are refused with `403` when
//!   they come from another site: `Sec-Fetch-Site: cross-site`, or an `Origin` that is not
//!   `http(s)://` + the request's own `Host`. The dashboard's own requests pass; a form a
//!   foreign page posts to `/reload` does not.
//! - With `admin.open_probes`, `/healthz` and `/readyz` answer without the token, for
//!   orchestrator probes; everything else still needs it.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::Bytes;
use http::Method;
use pingora_core::apps::{HttpServerApp, ReusedHttpStream};
use pingora_core::protocols::http::ServerSession;
use pingora_core::server::ShutdownWatch;
use pingora_http::ResponseHeader;
use serde_json::{json, Value};
use subtle::ConstantTimeEq;

use crate::config::{AdminConfig, Config};
use crate::sse::tracker::StreamEntry;
use crate::sse::CloseReason;

/// Keys whose values `/config` hides.
const SECRET_KEYS: &[&str] = &["password", "token", "secret", "users", "keys"];

/// Words that make a key secret wherever they appear in it: config keys, and the header
/// names of a `headers` middleware (`authorization`, `cookie`, `x-api-key`, ...).
const SECRET_WORDS: &[&str] = &[
    "password",
    "passwd",
    "secret",
    "token",
    "authorization",
    "cookie",
    "api-key",
    "api_key",
    "apikey",
    "private-key",
    "private_key",
    "credential",
    "x-auth",
];

const DASHBOARD: &str = include_str!("dashboard.html");

/// How often the dashboard feed sends a snapshot.
const FEED_INTERVAL: Duration = Duration::from_secs(1);

pub struct Admin {
    config: Arc<ArcSwap<Config>>,
    settings: AdminConfig,
}

/// The admin app for `config`'s `admin` block, and the address it listens on.
pub fn app(config: Arc<ArcSwap<Config>>) -> Option<(Admin, SocketAddr)> {
    let settings = config.load().admin.clone()?;
    let listen = settings.listen;
    Some((Admin { config, settings }, listen))
}

struct Answer {
    status: u16,
    content_type: &'static str,
    body: Bytes,
}

impl Answer {
    fn json(status: u16, value: Value) -> Self {
        Answer {
            status,
            content_type: "application/json",
            body: Bytes::from(value.to_string()),
        }
    }

    fn error(status: u16, message: &str) -> Self {
        Answer::json(status, json!({ "error": message }))
    }
}

#[async_trait]
impl HttpServerApp for Admin {
    async fn process_new_http(
        self: &Arc<Self>,
        mut session: ServerSession,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        if !matches!(session.read_request().await, Ok(true)) {
            return None;
        }
        let req = session.req_header();
        if req.uri.path() == "/events"
            && req.method == Method::GET
            && self.refusal(&session).is_none()
        {
            if let Err(e) = self.feed(&mut session, shutdown.clone()).await {
                log::debug!("admin: dashboard feed ended: {e}");
            }
            return None;
        }
        let answer = self.answer(&session);
        let result = async {
            let mut header = ResponseHeader::build(answer.status, Some(3))?;
            header.insert_header("content-type", answer.content_type)?;
            header.insert_header("content-length", answer.body.len())?;
            header.insert_header("cache-control", "no-store")?;
            session.write_response_header(Box::new(header)).await?;
            session.write_response_body(answer.body, true).await
        };
        if let Err(e) = result.await {
            log::debug!("admin: could not answer: {e}");
        }
        None
    }
}

impl Admin {
    /// Why this request gets no answer but a refusal: a foreign `Host`, a cross-site
    /// request that would change state, a missing or wrong token.
    fn refusal(&self, session: &ServerSession) -> Option<Answer> {
        let req = session.req_header();
        let host = req.headers.get(http::header::HOST).map(|h| h.as_bytes());
        let local = session
            .server_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        if !host_allowed(host, local, &self.settings) {
            return Some(Answer::error(
                403,
                "the Host header does not name this admin listener (add the name to \
                 admin.allowed_hosts)",
            ));
        }
        let safe = req.method == Method::GET || req.method == Method::HEAD;
        if !safe && cross_site(req) {
            return Some(Answer::error(
                403,
                "requests from another site may not change anything here",
            ));
        }
        let probe = matches!(req.uri.path(), "/healthz" | "/readyz");
        let open = probe && self.settings.open_probes;
        if !open && !self.authorized(session) {
            return Some(Answer::error(401, "a valid bearer token is required"));
        }
        None
    }

    fn authorized(&self, session: &ServerSession) -> bool {
        let Some(token) = &self.settings.token else {
            return true;
        };
        let from_header = session
            .get_header("authorization")
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
            .map(<[u8]>::to_vec);
        let from_query = || {
            let query = session.req_header().uri.query()?;
            let value = query
                .split('&')
                .find_map(|pair| pair.strip_prefix("token="))?;
            Some(percent_encoding::percent_decode_str(value).collect::<Vec<u8>>())
        };
        let presented = from_header.or_else(from_query).unwrap_or_default();
        presented.ct_eq(token.as_bytes()).into()
    }

    /// The dashboard's feed: a snapshot event every second until the client leaves or the
    /// process shuts down.
    async fn feed(
        &self,
        session: &mut ServerSession,
        mut shutdown: ShutdownWatch,
    ) -> pingora_error::Result<()> {
        let mut header = ResponseHeader::build(200, Some(3))?;
        header.insert_header("content-type", "text/event-stream")?;
        header.insert_header("cache-control", "no-cache")?;
        session.write_response_header(Box::new(header)).await?;
        loop {
            let snapshot = snapshot(&self.config.load());
            let event = format!("event: snapshot\ndata: {snapshot}\n\n");
            session
                .write_response_body(Bytes::from(event), false)
                .await?;
            tokio::select! {
                _ = tokio::time::sleep(FEED_INTERVAL) => {}
                _ = shutdown.changed() => break,
            }
        }
        session.write_response_body(Bytes::new(), true).await
    }

    fn answer(&self, session: &ServerSession) -> Answer {
        if let Some(refusal) = self.refusal(session) {
            return refusal;
        }
        let req = session.req_header();
        let path = req.uri.path();
        let query = req.uri.query().unwrap_or("");
        let get = req.method == Method::GET || req.method == Method::HEAD;
        let config = self.config.load_full();
        match (path, get, req.method == Method::POST) {
            ("/healthz", true, _) => Answer::json(200, json!({ "status": "ok" })),
            // A draining process (shutting down or handing over to a new one) is not ready:
            // load balancers should stop sending it streams.
            ("/readyz", true, _) if config.state.drain.draining() => Answer::json(
                503,
                json!({ "ready": false, "draining": true, "version": config.version }),
            ),
            ("/readyz", true, _) => {
                Answer::json(200, json!({ "ready": true, "version": config.version }))
            }
            ("/config", true, _) => Answer::json(200, config_view(&config)),
            ("/routes", true, _) => Answer::json(200, routes_view(&config)),
            ("/upstreams", true, _) => Answer::json(200, upstreams_view(&config)),
            ("/sse/connections", true, _) => match connections_view(&config, query) {
                Ok(v) => Answer::json(200, v),
                Err(e) => Answer::error(400, &e),
            },
            ("/reload", _, true) => match crate::reload::reload(&self.config) {
                Ok(done) => Answer::json(
                    200,
                    json!({
                        "reloaded": true,
                        "version": done.config.version,
                        "middlewares_loaded": done.loaded,
                        "middlewares_unloaded": done.unloaded,
                        "not_applied_until_upgrade": done.not_applied,
                    }),
                ),
                Err(e) => Answer::json(422, json!({ "reloaded": false, "error": e.to_string() })),
            },
            ("/", true, _) => Answer {
                status: 200,
                content_type: "text/html; charset=utf-8",
                body: Bytes::from_static(DASHBOARD.as_bytes()),
            },
            (p, _, _) if req.method == Method::DELETE && p.starts_with("/sse/connections/") => {
                let id = p.trim_start_matches("/sse/connections/").parse::<u64>();
                match id {
                    Ok(id) if config.state.tracker.request_end(id, CloseReason::Ended) => {
                        Answer::json(202, json!({ "id": id, "ending": true }))
                    }
                    _ => Answer::error(404, "no such open stream"),
                }
            }
            ("/metrics", true, _) => Answer {
                status: 200,
                content_type: "text/plain; version=0.0.4; charset=utf-8",
                body: Bytes::from(config.state.metrics.render()),
            },
            (p, true, _) if p.starts_with("/sse/connections/") => {
                let id = p.trim_start_matches("/sse/connections/").parse::<u64>();
                match id.ok().and_then(|id| {
                    let streams = config.state.tracker.snapshot();
                    streams.into_iter().find(|e| e.id == id)
                }) {
                    Some(entry) => Answer::json(200, stream_view(&entry)),
                    None => Answer::error(404, "no such open stream"),
                }
            }
            (
                "/healthz" | "/readyz" | "/config" | "/routes" | "/upstreams" | "/metrics"
                | "/sse/connections",
                false,
                _,
            ) => Answer::error(405, "use GET"),
            ("/reload", _, false) => Answer::error(405, "use POST"),
            _ => Answer::error(404, "no such endpoint"),
        }
    }
}

/// Whether `Host` names this admin listener: an IP it listens on or was reached at, a
/// loopback IP, `localhost`, or an allowed name; the port is not compared. No `Host` at
/// all (HTTP/1.0 tools) passes: browsers always send one.
fn host_allowed(host: Option<&[u8]>, local: Option<IpAddr>, settings: &AdminConfig) -> bool {
    let Some(host) = host else {
        return true;
    };
    let Ok(host) = std::str::from_utf8(host) else {
        return false;
    };
    let name = match host.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((inner, port)) if port.is_empty() || port.starts_with(':') => inner,
            _ => return false,
        },
        None => match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            Some(_) => return false,
            None => host,
        },
    };
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    if let Ok(ip) = name.parse::<IpAddr>() {
        return ip.is_loopback()
            || (ip == settings.listen.ip() && !ip.is_unspecified())
            || Some(ip) == local;
    }
    name == "localhost" || settings.allowed_hosts.contains(&name)
}

/// Whether a request comes from a page of another site: the browser says so in
/// `Sec-Fetch-Site`, or its `Origin` is not this `Host` (`null` included).
fn cross_site(req: &pingora_http::RequestHeader) -> bool {
    let header = |name| req.headers.get(name).map(|v| v.as_bytes());
    if header("sec-fetch-site").is_some_and(|v| v.eq_ignore_ascii_case(b"cross-site")) {
        return true;
    }
    let Some(origin) = header("origin") else {
        return false;
    };
    let authority = origin
        .strip_prefix(b"http://")
        .or_else(|| origin.strip_prefix(b"https://"));
    match (authority, header("host")) {
        (Some(authority), Some(host)) => !authority.eq_ignore_ascii_case(host),
        _ => true,
    }
}

fn unix_seconds(t: std::time::SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

/// Every config file as loaded, parsed to JSON, with secret values replaced.
fn config_view(config: &Config) -> Value {
    let files: Vec<Value> = config
        .texts
        .iter()
        .map(|(path, text)| {
            let parsed: serde_yaml::Value = serde_yaml::from_str(text).unwrap_or_default();
            json!({ "file": path.display().to_string(), "content": redact(yaml_to_json(parsed)) })
        })
        .collect();
    json!({
        "version": config.version,
        "loaded_at": unix_seconds(config.loaded_at),
        "files": files,
    })
}

fn yaml_to_json(value: serde_yaml::Value) -> Value {
    serde_json::to_value(value).unwrap_or(Value::Null)
}

fn redact(value: Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| {
                    let v = if secret_key(&k) && !(v.is_null() || v.is_boolean()) {
                        Value::String("<redacted>".into())
                    } else {
                        redact(v)
                    };
                    (k, v)
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.into_iter().map(redact).collect()),
        other => other,
    }
}

/// Whether a key's value is a secret: a credential key of the config (`token`, `users`,
/// `keys`, `password`, ...) or a header name that carries one. Keys naming where a secret
/// is kept (`token_env`, `keys_file`) are not secrets themselves.
fn secret_key(key: &str) -> bool {
    let lower = key.to_ascii_lowercase();
    if lower.ends_with("_env") || lower.ends_with("_file") {
        return false;
    }
    SECRET_KEYS.contains(&lower.as_str()) || SECRET_WORDS.iter().any(|w| lower.contains(w))
}

fn routes_view(config: &Config) -> Value {
    let mut out = Vec::new();
    for (host, routes) in config.routes.describe() {
        for (path, route) in routes {
            out.push(json!({
                "host": host,
                "path": path,
                "route": route.name,
                "service": route.service.name,
                "chain": route.chain.iter().map(|i| json!({ "name": i.name, "type": i.kind })).collect::<Vec<_>>(),
            }));
        }
    }
    Value::Array(out)
}

fn upstreams_view(config: &Config) -> Value {
    let streams = config.state.tracker.snapshot();
    let services: Vec<Value> = config
        .services
        .values()
        .map(|s| {
            let endpoints: Vec<Value> = s
                .endpoints
                .snapshot()
                .iter()
                .map(|e| {
                    json!({
                        "address": e.addr.to_string(),
                        "weight": e.weight,
                        "healthy": e.healthy,
                        "ejected": e.ejected,
                        "open": e.open,
                        "requests": e.chosen,
                        "pins": e.pins,
                    })
                })
                .collect();
            let affinity = s.affinity.as_ref().map(|a| {
                json!({
                    "source": a.source.to_string(),
                    "ttl_seconds": a.ttl.map(|t| t.as_secs_f64()),
                    "max_entries": a.max_entries,
                    "pins": s.endpoints.pins().len(),
                })
            });
            json!({
                "service": s.name,
                "url": s.url.to_string(),
                "load_balancing": s.endpoints.algorithm().as_str(),
                "affinity": affinity,
                "endpoints": endpoints,
                "discovery_error": s.endpoints.discovery_error(),
                "tracked_sse_streams": streams.iter().filter(|e| e.info.service == s.name).count(),
                "sse_open_streams": s.sse_limit.as_ref().map(|l| l.open()),
                "sse_max_connections": s.sse.max_connections,
            })
        })
        .collect();
    Value::Array(services)
}

fn stream_view(e: &StreamEntry) -> Value {
    json!({
        "id": e.id,
        "client": e.info.client.map(|c| c.to_string()),
        "host": e.info.host,
        "path": e.info.path,
        "route": e.info.route,
        "service": e.info.service,
        "upstream": e.upstream().map(|u| u.to_string()),
        "started": unix_seconds(e.started),
        "age_seconds": e.age().as_secs_f64(),
        "idle_seconds": e.idle().as_secs_f64(),
        "events": e.events(),
        "bytes": e.bytes(),
        "last_event_id": e.last_event_id(),
    })
}

/// What the dashboard shows, in one JSON object.
fn snapshot(config: &Config) -> Value {
    let tracker = &config.state.tracker;
    let streams: Vec<Value> = tracker
        .snapshot()
        .iter()
        .take(500)
        .map(|e| stream_view(e))
        .collect();
    let recent: Vec<Value> = tracker
        .recent()
        .iter()
        .map(|c| {
            json!({
                "id": c.id,
                "route": c.route,
                "client": c.client.map(|ip| ip.to_string()),
                "duration_seconds": c.duration.as_secs_f64(),
                "events": c.events,
                "reason": c.reason.as_str(),
                "at": unix_seconds(c.at),
            })
        })
        .collect();
    json!({
        "version": config.version,
        "streams": streams,
        "routes": config.state.metrics.route_summaries(),
        "upstreams": upstreams_view(config),
        "recent": recent,
    })
}

fn connections_view(config: &Config, query: &str) -> Result<Value, String> {
    let mut route = None;
    let mut service = None;
    let mut client = None;
    let mut min_age = Duration::ZERO;
    let mut limit = 100usize;
    let mut offset = 0usize;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "route" => route = Some(v.to_string()),
            "service" => service = Some(v.to_string()),
            "client" => client = Some(v.to_string()),
            "min_age" => {
                min_age = humantime::parse_duration(v).map_err(|e| format!("min_age: {e}"))?
            }
            "limit" => limit = v.parse().map_err(|_| "limit: a number")?,
            "offset" => offset = v.parse().map_err(|_| "offset: a number")?,
            "token" => {}
            other => return Err(format!("unknown filter `{other}`")),
        }
    }
    let matching: Vec<_> = config
        .state
        .tracker
        .snapshot()
        .into_iter()
        .filter(|e| route.as_ref().is_none_or(|r| *r == e.info.route))
        .filter(|e| service.as_ref().is_none_or(|s| *s == e.info.service))
        .filter(|e| {
            client
                .as_ref()
                .is_none_or(|c| e.info.client.is_some_and(|ip| ip.to_string() == *c))
        })
        .filter(|e| e.age() >= min_age)
        .collect();
    // Oldest first: the snapshot is in id order, which is opening order.
    let items: Vec<Value> = matching
        .iter()
        .skip(offset)
        .take(limit)
        .map(|e| stream_view(e))
        .collect();
    Ok(json!({ "total": matching.len(), "offset": offset, "items": items }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_redacted() {
        let yaml: serde_yaml::Value = serde_yaml::from_str(
            "admin: { token: t }\nmiddleware_services:\n  - { name: a, type: basic_auth, config: { users: { u: p } } }\n  - { name: k, type: api_key, config: { keys: [k1], header: x-key } }\n",
        )
        .expect("yaml");
        let out = redact(yaml_to_json(yaml)).to_string();
        assert!(!out.contains("\"t\""), "{out}");
        assert!(!out.contains("k1"), "{out}");
        assert!(!out.contains("\"p\""), "{out}");
        assert!(out.contains("x-key"), "{out}");
    }

    #[test]
    fn header_values_with_credential_names_are_redacted() {
        let yaml: serde_yaml::Value = serde_yaml::from_str(
            "admin: { token_env: ADMIN_TOKEN }\nmiddleware_services:\n  - name: h\n    type: headers\n    config:\n      request:\n        set: { Authorization: 'Bearer abc', x-upstream-token: tok1, X-Env: prod }\n        add: { Cookie: 'sid=s3', x-api-key: k9, x-client-secret: sec, x-db-password: pw }\n        remove: [cookie]\n",
        )
        .expect("yaml");
        let out = redact(yaml_to_json(yaml)).to_string();
        for secret in ["Bearer abc", "tok1", "sid=s3", "k9", "\"sec\"", "\"pw\""] {
            assert!(!out.contains(secret), "{secret} in {out}");
        }
        assert!(out.contains("prod"), "{out}");
        assert!(
            out.contains("ADMIN_TOKEN"),
            "where the token is kept is shown: {out}"
        );
        assert!(out.contains("[\"cookie\"]"), "{out}");
    }

    fn settings(listen: &str, allowed: &[&str]) -> AdminConfig {
        AdminConfig {
            listen: listen.parse().expect("addr"),
            token: None,
            token_source: crate::config::TokenSource::None,
            open_probes: false,
            allowed_hosts: allowed.iter().map(|h| h.to_string()).collect(),
        }
    }

    #[test]
    fn only_hosts_that_name_the_listener_pass() {
        let loopback = settings("127.0.0.1:9901", &[]);
        let local = Some("127.0.0.1".parse().expect("ip"));
        let ok = |h: &str, s: &AdminConfig, local| host_allowed(Some(h.as_bytes()), local, s);
        for host in [
            "127.0.0.1:9901",
            "127.0.0.1",
            "localhost:9901",
            "LOCALHOST.:19901",
            "[::1]:9901",
            "127.0.0.2:80",
        ] {
            assert!(ok(host, &loopback, local), "{host}");
        }
        for host in [
            "evil.example:9901",
            "localhost.evil.example:9901",
            "127.0.0.1.nip.io:9901",
            "10.0.0.5:9901",
            "[::1",
            "localhost:x",
            "",
        ] {
            assert!(!ok(host, &loopback, local), "{host}");
        }
        assert!(
            host_allowed(None, local, &loopback),
            "no Host: not a browser"
        );
        let open = settings("0.0.0.0:9901", &["admin.internal"]);
        let pod = Some("10.1.2.3".parse().expect("ip"));
        assert!(
            ok("10.1.2.3:9901", &open, pod),
            "the address it was reached at"
        );
        assert!(ok("admin.internal:9901", &open, pod));
        assert!(!ok("10.9.9.9:9901", &open, pod));
        assert!(!ok("0.0.0.0:9901", &open, pod));
    }

    #[test]
    fn cross_site_requests_are_recognised() {
        let req = |headers: &[(&str, &str)]| {
            let mut r = pingora_http::RequestHeader::build("POST", b"/reload", None).expect("r");
            for (k, v) in headers {
                r.insert_header(k.to_string(), v.to_string())
                    .expect("header");
            }
            r
        };
        assert!(!cross_site(&req(&[("host", "127.0.0.1:9901")])), "curl");
        assert!(!cross_site(&req(&[
            ("host", "127.0.0.1:9901"),
            ("origin", "http://127.0.0.1:9901"),
            ("sec-fetch-site", "same-origin"),
        ])));
        assert!(cross_site(&req(&[
            ("host", "127.0.0.1:9901"),
            ("origin", "http://evil.example"),
        ])));
        assert!(cross_site(&req(&[
            ("host", "127.0.0.1:9901"),
            ("origin", "null")
        ])));
        assert!(cross_site(&req(&[
            ("host", "127.0.0.1:9901"),
            ("origin", "http://localhost:3000"),
        ])));
        assert!(cross_site(&req(&[
            ("host", "127.0.0.1:9901"),
            ("sec-fetch-site", "cross-site"),
        ])));
    }
}
