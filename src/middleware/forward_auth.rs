//! `forward_auth`: each request is first put to an authentication service, as nginx's
//! `auth_request`, Traefik's `forwardAuth` and Caddy's `forward_auth` do. The proxy sends
//! that service a `GET` with the client's credentials and where the request was going; a
//! 2xx answer lets the request through, with headers of the answer (the user it
//! authenticated, say) added to the request the origin sees; any other answer (a `401`
//! with `WWW-Authenticate`, a `403`, a `302` to a login page) is what the client gets:
//! its status, headers and body.
//!
//! ```yaml
//! services:
//!   auth: { url: "http://127.0.0.1:9000" }
//! middleware_services:
//!   - name: sso
//!     type: forward_auth
//!     config:
//!       service: auth                   # a service of `services`: its endpoints,
//!                                       # balancing, retries, TLS and timeouts
//!       path: /verify                   # the target asked for, after the service's
//!                                       # URL path (default /)
//!       request_headers: [authorization, cookie]   # copied from the client (default)
//!       response_headers: [x-user-id]   # copied from a 2xx answer to the origin's request
//!       client_headers: [set-cookie]    # copied from a 2xx answer to the client's response
//!       timeout: 10s                    # for the whole exchange (default 10s; 0: the
//!                                       # service's own timeouts only)
//! ```
//!
//! Phases: `request` (the proxy sends the request, see `Outcome::Ask`, and hands the
//! answer to `answered`), and `response`, which adds a 2xx answer's `client_headers` (a
//! session cookie the auth service renewed, say) to the response, an event stream's too.
//! The request to the auth service carries `X-Forwarded-Method`, `X-Forwarded-Proto`, `X-Forwarded-Host`, `X-Forwarded-Uri` and `X-Forwarded-For` (the
//! client's address, through `trusted_proxies`); several `Cookie` lines (HTTP/2 sends one
//! per cookie) go as one. What the client itself sent under a `response_headers` name
//! never reaches the origin, whatever the answer, nor under the name spelled with
//! underscores (`X_User_Id`, which CGI-style servers read as `X-User-Id`): only the auth
//! service sets those. Names that frame or route a request (`Host`, `Content-Length`,
//! `Transfer-Encoding`, `Connection` ...) and the forwarding headers the proxy sets are
//! refused in all three lists when the config loads. An auth service that cannot be reached,
//! fails, answers `1xx` or does not answer within `timeout` answers the client 502, 503
//! or 504 naming the middleware and the service: no request passes unasked. A refusal's
//! body is relayed up to 64 KiB (larger: 502); a 2xx answer's body is not used. Its
//! requests are counted as a route of their own, `forward_auth:<name>`
//! (`streamgate_requests_total` and the duration histogram), kept across reloads.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_LENGTH, COOKIE, TRANSFER_ENCODING};
use pingora_error::Result;
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::Session;
use serde::Deserialize;

use super::{header_name, Ask, BodyFilter, Context, Middleware, Outcome, Reply};
use crate::http_util::{request_host, scheme};
use crate::metrics::{Metrics, RouteMetrics};
use crate::upstream::service::Service;
use crate::values::Dur;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub service: String,
    #[serde(default = "default_path")]
    pub path: String,
    #[serde(default = "default_request_headers")]
    pub request_headers: Vec<String>,
    #[serde(default)]
    pub response_headers: Vec<String>,
    #[serde(default)]
    pub client_headers: Vec<String>,
    #[serde(default)]
    pub timeout: Option<Dur>,
}

fn default_path() -> String {
    "/".into()
}

fn default_request_headers() -> Vec<String> {
    vec!["authorization".into(), "cookie".into()]
}

/// The headers the auth service is told where the request was going by.
const FORWARDED: [&str; 5] = [
    "x-forwarded-method",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-forwarded-uri",
    "x-forwarded-for",
];

/// Names that frame or route a request, or that the proxy sets on the origin's request:
/// neither copied to the auth service nor from its answer.
const RESERVED: [&str; 14] = [
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
    "expect",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-real-ip",
];

/// The headers of 2xx answers for the client's response (`client_headers`), kept in the
/// request's values until the response hook adds them.
#[derive(Clone, Default)]
struct ForClient(Vec<(HeaderName, HeaderValue)>);

/// How long the whole exchange with the auth service may take, unless `timeout` says.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

pub struct ForwardAuth {
    service: Arc<Service>,
    /// The target asked for: the service's URL path, then `path`.
    target: String,
    request_headers: Vec<HeaderName>,
    response_headers: Vec<HeaderName>,
    client_headers: Vec<HeaderName>,
    timeout: Option<Duration>,
    /// The name its requests are counted under, and their handles.
    route: String,
    metrics: Arc<RouteMetrics>,
}

impl ForwardAuth {
    pub fn new(
        config: &Config,
        name: &str,
        services: &BTreeMap<String, Arc<Service>>,
        metrics: &Metrics,
    ) -> Result<Self, String> {
        let service = services.get(&config.service).cloned().ok_or_else(|| {
            let known: Vec<&str> = services.keys().map(String::as_str).collect();
            format!(
                "no service `{}` (the services: {})",
                config.service,
                known.join(", ")
            )
        })?;
        if !config.path.starts_with('/') {
            return Err(format!("`path: {}` must start with /", config.path));
        }
        let target = format!("{}{}", service.url.prefix, config.path);
        // Checked here, so that building the request cannot fail.
        RequestHeader::build("GET", target.as_bytes(), None)
            .map_err(|e| format!("`path: {}` is not a request target: {e}", config.path))?;
        let names = |key: &str, list: &[String]| -> Result<Vec<HeaderName>, String> {
            let mut names: Vec<HeaderName> = Vec::with_capacity(list.len());
            for raw in list {
                let name = header_name(raw)?;
                if RESERVED.contains(&name.as_str()) || FORWARDED.contains(&name.as_str()) {
                    return Err(format!(
                        "`{key}` cannot name `{name}`: it frames or routes the request, or \
                         the proxy sets it"
                    ));
                }
                if !names.contains(&name) {
                    names.push(name);
                }
            }
            Ok(names)
        };
        let request_headers = names("request_headers", &config.request_headers)?;
        let response_headers = names("response_headers", &config.response_headers)?;
        let client_headers = names("client_headers", &config.client_headers)?;
        let route = format!("forward_auth:{name}");
        let metrics = metrics.route(&route, &service.name);
        Ok(ForwardAuth {
            service,
            target,
            request_headers,
            response_headers,
            client_headers,
            timeout: config.timeout.map_or(Some(DEFAULT_TIMEOUT), |d| d.limit()),
            route,
            metrics,
        })
    }

    /// The request to the auth service for the client's request in `session`.
    fn ask(&self, session: &Session, ctx: &Context) -> Result<RequestHeader> {
        let req = session.req_header();
        let mut ask = RequestHeader::build("GET", self.target.as_bytes(), None)?;
        ask.insert_header(http::header::HOST, self.service.url.authority())?;
        let uri = req.uri.path_and_query().map_or("/", |p| p.as_str());
        let client = ctx.client.map(|ip| ip.to_string());
        let values = [
            Some(req.method.as_str()),
            Some(scheme(session.as_downstream())),
            request_host(req),
            Some(uri),
            client.as_deref(),
        ];
        for (name, value) in FORWARDED.iter().zip(values) {
            if let Some(value) = value {
                ask.insert_header(*name, value)?;
            }
        }
        for name in &self.request_headers {
            if *name == COOKIE {
                // One line, as HTTP/1.1 wants it (RFC 9113 8.2.3).
                let cookies: Vec<&[u8]> = req
                    .headers
                    .get_all(name)
                    .iter()
                    .map(|v| v.as_bytes())
                    .collect();
                if !cookies.is_empty() {
                    ask.insert_header(COOKIE, cookies.join(&b"; "[..]))?;
                }
                continue;
            }
            for value in req.headers.get_all(name) {
                ask.append_header(name.clone(), value.clone())?;
            }
        }
        Ok(ask)
    }

    /// Whether the client's header `name` is one of `response_headers`, spelled with
    /// underscores for dashes.
    fn disguised(&self, name: &HeaderName) -> bool {
        let name = name.as_str();
        name.contains('_')
            && self.response_headers.iter().any(|own| {
                own.as_str().len() == name.len()
                    && own
                        .as_str()
                        .bytes()
                        .zip(name.bytes())
                        .all(|(a, b)| a == b || (a == b'-' && b == b'_'))
            })
    }
}

impl Middleware for ForwardAuth {
    fn request(&self, session: &mut Session, ctx: &mut Context) -> Result<Outcome> {
        let request = self.ask(session, ctx)?;
        // Only the auth service speaks under these names.
        let disguised: Vec<HeaderName> = session
            .req_header()
            .headers
            .keys()
            .filter(|name| self.disguised(name))
            .cloned()
            .collect();
        for name in self.response_headers.iter().chain(&disguised) {
            ctx.added.remove(session.req_header_mut(), name);
        }
        Ok(Outcome::Ask(Box::new(Ask {
            service: self.service.clone(),
            request,
            timeout: self.timeout,
            route: self.route.clone(),
            metrics: self.metrics.clone(),
        })))
    }

    fn answered(
        &self,
        answer: &ResponseHeader,
        body: &Bytes,
        _session: &mut Session,
        ctx: &mut Context,
    ) -> Result<Outcome> {
        if answer.status.is_success() {
            for name in &self.response_headers {
                for value in answer.headers.get_all(name) {
                    let spelled = Bytes::copy_from_slice(name.as_str().as_bytes());
                    ctx.added.add(spelled, value.clone());
                }
            }
            let for_client: Vec<(HeaderName, HeaderValue)> = self
                .client_headers
                .iter()
                .flat_map(|name| {
                    let values = answer.headers.get_all(name).iter();
                    values.map(move |value| (name.clone(), value.clone()))
                })
                .collect();
            if !for_client.is_empty() {
                ctx.values
                    .get_or_insert_default::<ForClient>()
                    .0
                    .extend(for_client);
            }
            return Ok(Outcome::Continue);
        }
        // The answer goes to the client as the auth service gave it, framed anew.
        let headers = answer
            .headers
            .iter()
            .filter(|(name, _)| **name != CONTENT_LENGTH && **name != TRANSFER_ENCODING)
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect::<Vec<(HeaderName, HeaderValue)>>();
        Ok(Outcome::Respond(Reply {
            status: answer.status.as_u16(),
            headers,
            body: body.clone(),
        }))
    }

    fn response(
        &self,
        _session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut Context,
    ) -> Result<Option<Box<dyn BodyFilter>>> {
        // Whichever `forward_auth` of the chain comes first adds every one's.
        if let Some(ForClient(headers)) = ctx.values.remove::<ForClient>() {
            for (name, value) in headers {
                response.append_header(name, value)?;
            }
        }
        Ok(None)
    }

    fn counted_as(&self) -> Option<(&str, &str)> {
        Some((&self.route, &self.service.name))
    }
}
