//! The middleware chain: the trait every middleware type implements, the part of a
//! request's state the chain reads and writes ([`Context`]), the outcome of the request
//! hook, the table of types that turns `middleware_services` entries into instances, and
//! the per-route chain.
//!
//! # Hooks
//!
//! All hooks default to no-ops; a type implements the ones it needs.
//!
//! | hook | Pingora phase | may |
//! | --- | --- | --- |
//! | `request` | `request_filter` | answer directly with [`Outcome::Respond`], or have the proxy ask another service first ([`Outcome::Ask`]) |
//! | `answered` | `request_filter` | decide on that service's answer, as `request` would |
//! | `request_body` | `request_body_filter` | refuse the body with an error status |
//! | `upstream_request` | `upstream_request_filter` | change what the origin sees |
//! | `response` | `response_filter` | change the response header; return a [`BodyFilter`] |
//! | `logging` | `logging` | observe the finished request |
//!
//! Response bodies go through the [`BodyFilter`]s that `response` hooks returned, per chunk
//! and synchronously, like Pingora's own body filters. A body filter must never hold back an
//! SSE stream: whatever it has once an event is complete, it passes on.
//!
//! # Chain order
//!
//! A route's chain is built once, when the config loads: the global `middlewares`, then the
//! host rule's, then the route rule's. Within each level, higher `priority` runs first, ties
//! in the order listed. An instance named at two levels runs once, at its first place. With
//!
//! ```yaml
//! middleware_services:
//!   - { name: ids,  type: request_id }
//!   - { name: cors, type: cors, priority: 10 }
//!   - { name: auth, type: api_key, priority: 20, config: { keys: [k1] } }
//! middlewares: [ids, cors]                 # global
//! host_rules:
//!   - pattern: "*"
//!     middlewares: [auth, ids]             # host
//! ```
//!
//! the chain is `cors, ids, auth`: global first (cors outranks ids), then host (ids already
//! ran). Request hooks run in chain order; a middleware that answers skips the origin and the
//! rest of the request hooks, but every `response` hook of the chain still sees the answer
//! (so CORS headers reach a 401).

pub mod api_key;
pub mod basic_auth;
pub mod body_replace;
pub mod compress;
pub mod cors;
mod credentials;
pub mod forward_auth;
pub mod headers;
pub mod ip_filter;
pub mod rate_limit;
pub mod redirect;
pub mod request_id;
pub mod rewrite;
pub mod size_limit;
pub mod sse;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use pingora_error::Result;
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::Session;
use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

use crate::http_util::AddedHeaders;
use crate::metrics::{Metrics, RouteMetrics};
use crate::sse::{limits, SseRequest};
use crate::upstream::service::Service;

/// What the middlewares of a chain read and write of a request.
#[derive(Debug, Default)]
pub struct Context {
    /// The client's address: the peer, or behind `trusted_proxies`, the address they
    /// forwarded for (IPv4-mapped addresses as IPv4).
    pub client: Option<std::net::IpAddr>,
    /// A typed value map the middlewares of a chain share.
    pub values: http::Extensions,
    /// The id the `request_id` middleware gave this request.
    pub id: Option<HeaderValue>,
    /// What the request knows about event streams: its settings (which an `sse` middleware
    /// overlays), whether it asked for one, the limit slots it holds.
    pub sse: SseRequest,
    /// Request body bytes seen so far (for size limits).
    pub request_body_bytes: u64,
    /// Headers added to the request the origin sees, written with its head: the proxy's
    /// forwarding headers (set before the `upstream_request` hooks run) and those of the
    /// chain. A hook that removes a request header removes it here too.
    pub added: AddedHeaders,
}

impl Context {
    /// The id the `request_id` middleware gave this request.
    pub fn request_id(&self) -> Option<&str> {
        self.id.as_ref()?.to_str().ok()
    }
}

/// A middleware's own `trusted_proxies`: refused where it is written. The client address
/// is computed once per request, with the top-level `trusted_proxies`, and every
/// middleware, limit and log uses that one ([`Context::client`]).
#[derive(Debug)]
pub struct TrustedProxiesAtTop;

impl<'de> Deserialize<'de> for TrustedProxiesAtTop {
    fn deserialize<D: Deserializer<'de>>(_: D) -> Result<Self, D::Error> {
        Err(de::Error::custom(
            "`trusted_proxies` is set once, at the top level of the main file: every \
             middleware, limit and log uses the client address it defines",
        ))
    }
}

/// A direct answer from a middleware.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: Bytes,
}

impl Reply {
    /// A short plain-text answer: `"{status} {reason}\n"`.
    pub fn text(status: u16, reason: &str) -> Self {
        Reply {
            status,
            headers: vec![(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            )],
            body: Bytes::from(format!("{status} {reason}\n")),
        }
    }

    /// An answer with no body.
    pub fn empty(status: u16) -> Self {
        Reply {
            status,
            headers: Vec::new(),
            body: Bytes::new(),
        }
    }

    pub fn with_header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }
}

/// What the request hook decided.
#[derive(Debug)]
pub enum Outcome {
    Continue,
    Respond(Reply),
    /// Ask another service first (`forward_auth`): the proxy sends the request and hands
    /// the answer to the middleware's `answered` hook, which decides.
    Ask(Box<Ask>),
}

/// A request a middleware has the proxy send before it decides ([`Outcome::Ask`]): a
/// head alone, written as it is (the service's `host_header` and path rules are not
/// applied), to a service of the config, through its endpoints, retries, pool, TLS and
/// timeouts as a request routed there goes.
#[derive(Debug)]
pub struct Ask {
    pub service: Arc<Service>,
    pub request: RequestHeader,
    /// For the whole exchange, the answer's body included.
    pub timeout: Option<std::time::Duration>,
    /// The route name its requests are counted under, and its handles.
    pub route: String,
    pub metrics: Arc<RouteMetrics>,
}

/// Per-request state for rewriting a response body, created by a `response` hook.
pub trait BodyFilter: Send + Sync {
    /// Called for every body chunk, in order. May replace the chunk; must not keep a
    /// complete SSE event back.
    fn filter(&mut self, body: &mut Option<Bytes>, end_of_stream: bool) -> Result<()>;
}

/// A middleware type.
pub trait Middleware: Send + Sync {
    fn request(&self, _session: &mut Session, _ctx: &mut Context) -> Result<Outcome> {
        Ok(Outcome::Continue)
    }

    /// The answer to the request `request` had the proxy send ([`Outcome::Ask`]), with its
    /// whole body: decides as `request` would have (an `Ask` here is an error).
    fn answered(
        &self,
        _answer: &ResponseHeader,
        _body: &Bytes,
        _session: &mut Session,
        _ctx: &mut Context,
    ) -> Result<Outcome> {
        Ok(Outcome::Continue)
    }

    fn request_body(
        &self,
        _body: &Option<Bytes>,
        _end_of_stream: bool,
        _ctx: &mut Context,
    ) -> Result<()> {
        Ok(())
    }

    fn upstream_request(
        &self,
        _session: &mut Session,
        _request: &mut RequestHeader,
        _ctx: &mut Context,
    ) -> Result<()> {
        Ok(())
    }

    fn response(
        &self,
        _session: &mut Session,
        _response: &mut ResponseHeader,
        _ctx: &mut Context,
    ) -> Result<Option<Box<dyn BodyFilter>>> {
        Ok(None)
    }

    fn logging(&self, _request: &RequestHeader, _ctx: &Context) {}

    /// The (route, service) labels the requests it asks ([`Outcome::Ask`]) are counted
    /// under, kept across reloads like the route table's.
    fn counted_as(&self) -> Option<(&str, &str)> {
        None
    }

    /// A query parameter that carries a credential for this middleware (`api_key`'s
    /// `query`): the access log redacts its value whatever its name.
    fn secret_query_param(&self) -> Option<&str> {
        None
    }
}

/// A configured middleware: one `middleware_services` entry, built.
pub struct Instance {
    pub name: String,
    pub kind: &'static str,
    pub priority: i32,
    pub enabled: bool,
    /// The type and config as loaded, to tell whether a reload changed this instance.
    pub fingerprint: String,
    pub middleware: Arc<dyn Middleware>,
}

impl fmt::Debug for Instance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Instance")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("priority", &self.priority)
            .field("enabled", &self.enabled)
            .finish()
    }
}

/// A route's middleware chain, in run order.
pub type Chain = Arc<[Arc<Instance>]>;

/// What building a middleware may need besides its config.
pub struct Build<'a> {
    /// The `middleware_services` name of the instance.
    pub name: &'a str,
    /// The directory of the file that defined it, for config keys that name files.
    pub base: &'a std::path::Path,
    /// The server's limit counters (the `sse` type's `max_connections`).
    pub limits: &'a limits::Registry,
    /// The config's services (the one `forward_auth` asks).
    pub services: &'a BTreeMap<String, Arc<Service>>,
    pub metrics: &'a Metrics,
}

/// The one list of middleware types: each row is the type name as written in the config,
/// the variant holding its config, the module that implements it, and how an instance is
/// built from its config (`c`) and the [`Build`] context (`b`). Everything else (the config
/// enum, the list of names, parsing and building) is generated from it.
macro_rules! middleware_types {
    (|$c:ident, $b:ident| $($name:literal => $variant:ident($module:ident) = $build:expr;)*) => {
        /// The per-type config of a `middleware_services` entry.
        #[derive(Debug)]
        pub enum MiddlewareConfig {
            $($variant($module::Config),)*
        }

        /// Every type name, for error messages.
        pub const TYPES: &[&str] = &[$($name),*];

        impl MiddlewareConfig {
            /// Deserialises `config` for `kind` straight from the YAML, so errors keep
            /// their line.
            fn from_map<'de, A: MapAccess<'de>>(kind: &str, map: &mut A) -> Result<Self, A::Error> {
                Ok(match kind {
                    $($name => Self::$variant(map.next_value()?),)*
                    other => return Err(de::Error::custom(unknown_type(other))),
                })
            }

            /// The same, from an already parsed value (when `config` came before `type`).
            fn from_value(kind: &str, value: serde_yaml::Value) -> Result<Self, String> {
                let value = match value {
                    serde_yaml::Value::Null => serde_yaml::Value::Mapping(Default::default()),
                    v => v,
                };
                Ok(match kind {
                    $($name => Self::$variant(
                        serde_yaml::from_value(value).map_err(|e| e.to_string())?,
                    ),)*
                    other => return Err(unknown_type(other)),
                })
            }

            /// The type name as written in the config.
            pub fn kind(&self) -> &'static str {
                match self {
                    $(Self::$variant(_) => $name,)*
                }
            }

            /// Builds the middleware.
            pub fn build(&self, $b: &Build<'_>) -> Result<Box<dyn Middleware>, String> {
                Ok(match self {
                    $(Self::$variant($c) => Box::new($build) as Box<dyn Middleware>,)*
                })
            }
        }
    };
}

middleware_types! {
    |c, b|
    "sse" => Sse(sse) = sse::SseMiddleware::new(c, b.name, b.limits);
    "headers" => Headers(headers) = headers::Headers::new(c)?;
    "rewrite" => Rewrite(rewrite) = rewrite::Rewrite::new(c)?;
    "redirect" => Redirect(redirect) = redirect::Redirect::new(c)?;
    "ip_filter" => IpFilter(ip_filter) = ip_filter::IpFilter::new(c);
    "basic_auth" => BasicAuth(basic_auth) = basic_auth::BasicAuth::new(c, b.base)?;
    "api_key" => ApiKey(api_key) = api_key::ApiKey::new(c, b.base)?;
    "rate_limit" => RateLimit(rate_limit) = rate_limit::RateLimit::new(c)?;
    "cors" => Cors(cors) = cors::Cors::new(c)?;
    "request_id" => RequestId(request_id) = request_id::RequestId::new(c)?;
    "request_size_limit" => RequestSizeLimit(size_limit) = size_limit::SizeLimit::new(c);
    "body_replace" => BodyReplace(body_replace) = body_replace::BodyReplace::new(c)?;
    "compress" => Compress(compress) = compress::Compress::new(c)?;
    "forward_auth" => ForwardAuth(forward_auth) =
        forward_auth::ForwardAuth::new(c, b.name, b.services, b.metrics)?;
}

impl MiddlewareConfig {
    /// Whether an unchanged instance should be carried over a reload rather than rebuilt:
    /// only types with state worth keeping (rate limiter buckets). Types that read files
    /// are always rebuilt, so a reload picks up new credentials.
    pub fn keeps_state(&self) -> bool {
        matches!(self, Self::RateLimit(_))
    }
}

fn unknown_type(kind: &str) -> String {
    format!(
        "unknown middleware type `{kind}`; the types are: {}",
        TYPES.join(", ")
    )
}

/// A `middleware_services` entry as written.
#[derive(Debug)]
pub struct MiddlewareFile {
    pub name: String,
    pub config: MiddlewareConfig,
    pub enabled: bool,
    pub priority: i32,
}

impl<'de> Deserialize<'de> for MiddlewareFile {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(EntryVisitor)
    }
}

/// A middleware type name, checked where it is written.
struct TypeName(String);

impl<'de> Deserialize<'de> for TypeName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Checked inside the visitor, so the parser marks the error at the value.
        struct NameVisitor;

        impl Visitor<'_> for NameVisitor {
            type Value = TypeName;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a middleware type name")
            }

            fn visit_str<E: de::Error>(self, name: &str) -> Result<TypeName, E> {
                if TYPES.contains(&name) {
                    Ok(TypeName(name.to_string()))
                } else {
                    Err(E::custom(unknown_type(name)))
                }
            }
        }

        d.deserialize_str(NameVisitor)
    }
}

struct EntryVisitor;

impl<'de> Visitor<'de> for EntryVisitor {
    type Value = MiddlewareFile;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a middleware: name, type, and optionally enabled, priority, config")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<MiddlewareFile, A::Error> {
        let mut name: Option<String> = None;
        let mut kind: Option<String> = None;
        let mut enabled: Option<bool> = None;
        let mut priority: Option<i32> = None;
        let mut config: Option<MiddlewareConfig> = None;
        let mut early_config: Option<serde_yaml::Value> = None;
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "name" => name = Some(map.next_value()?),
                "type" => kind = Some(map.next_value::<TypeName>()?.0),
                "enabled" => enabled = Some(map.next_value()?),
                "priority" => priority = Some(map.next_value()?),
                "config" => match &kind {
                    Some(kind) => config = Some(MiddlewareConfig::from_map(kind, &mut map)?),
                    None => early_config = Some(map.next_value()?),
                },
                other => {
                    return Err(de::Error::unknown_field(
                        other,
                        &["name", "type", "enabled", "priority", "config"],
                    ))
                }
            }
        }
        let name = name.ok_or_else(|| de::Error::missing_field("name"))?;
        let kind = kind.ok_or_else(|| de::Error::missing_field("type"))?;
        let config = match config {
            Some(c) => c,
            None => {
                MiddlewareConfig::from_value(&kind, early_config.unwrap_or(serde_yaml::Value::Null))
                    .map_err(|e| de::Error::custom(format!("config: {e}")))?
            }
        };
        Ok(MiddlewareFile {
            name,
            config,
            enabled: enabled.unwrap_or(true),
            priority: priority.unwrap_or(0),
        })
    }
}

/// Orders one level of a chain: higher priority first, ties in listed order.
pub fn sort_level(level: &mut [Arc<Instance>]) {
    level.sort_by_key(|i| std::cmp::Reverse(i.priority));
}

/// Joins the levels into a chain: each instance once, at its first place; disabled
/// instances are left out.
pub fn join_levels(levels: Vec<Vec<Arc<Instance>>>) -> Chain {
    let mut chain: Vec<Arc<Instance>> = Vec::new();
    for mut level in levels {
        sort_level(&mut level);
        for instance in level {
            if instance.enabled && !chain.iter().any(|i| i.name == instance.name) {
                chain.push(instance);
            }
        }
    }
    chain.into()
}

/// Parses a header name from config.
pub fn header_name(raw: &str) -> Result<HeaderName, String> {
    HeaderName::from_bytes(raw.as_bytes())
        .map_err(|_| format!("`{raw}` is not a valid header name"))
}

/// Parses a header value from config.
pub fn header_value(raw: &str) -> Result<HeaderValue, String> {
    HeaderValue::from_str(raw).map_err(|_| format!("`{raw}` is not a valid header value"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(name: &str, priority: i32, enabled: bool) -> Arc<Instance> {
        Arc::new(Instance {
            name: name.into(),
            kind: "headers",
            priority,
            enabled,
            fingerprint: String::new(),
            middleware: Arc::new(headers::Headers::new(&headers::Config::default()).expect("mw")),
        })
    }

    #[test]
    fn chain_order_levels_priority_and_run_once() {
        let ids = instance("ids", 0, true);
        let cors = instance("cors", 10, true);
        let auth = instance("auth", 20, true);
        let off = instance("off", 99, false);
        let low = instance("low", -5, true);
        let chain = join_levels(vec![
            vec![ids.clone(), cors.clone()],
            vec![low.clone(), auth.clone(), ids.clone(), off],
            vec![cors.clone(), instance("last", 100, true)],
        ]);
        let names: Vec<&str> = chain.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["cors", "ids", "auth", "low", "last"]);
    }

    #[test]
    fn entries_parse_with_type_before_or_after_config() {
        let a: MiddlewareFile = serde_yaml::from_str(
            "name: a\ntype: headers\npriority: 3\nconfig: { response: { set: { x-a: '1' } } }\n",
        )
        .expect("parse");
        assert_eq!(a.config.kind(), "headers");
        assert_eq!(a.priority, 3);
        assert!(a.enabled);
        let b: MiddlewareFile = serde_yaml::from_str(
            "config: { response: { set: { x-a: '1' } } }\nname: b\ntype: headers\n",
        )
        .expect("parse");
        assert_eq!(b.config.kind(), "headers");
        let e = serde_yaml::from_str::<MiddlewareFile>("name: c\ntype: nope\n")
            .expect_err("unknown type");
        assert!(
            e.to_string().contains("unknown middleware type `nope`"),
            "{e}"
        );
        let e = serde_yaml::from_str::<MiddlewareFile>(
            "name: c\ntype: headers\nconfig:\n  response:\n    sett: {}\n",
        )
        .expect_err("unknown key");
        assert_eq!(e.location().map(|l| l.line()), Some(5), "{e}");
    }
}
