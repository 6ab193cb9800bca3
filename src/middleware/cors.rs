//! `cors`: answers CORS preflights at the proxy and adds CORS headers to responses,
//! including SSE responses (an `EventSource` with `withCredentials` needs them).
//!
//! ```yaml
//! type: cors
//! config:
//!   allow_origins: ["https://app.example.com"]   # or ["*"] (the default)
//!   allow_methods: [GET, POST]                   # default: GET, HEAD, POST, PUT, PATCH, DELETE
//!   allow_headers: [content-type, last-event-id] # default: whatever the preflight asks for
//!   expose_headers: [x-request-id]
//!   allow_credentials: false                     # true needs explicit origins
//!   max_age: 10m                                 # how long browsers may cache a preflight
//! ```
//!
//! Phases: `request` (a preflight, `OPTIONS` with `Origin` and
//! `Access-Control-Request-Method`, is answered `204` without contacting the origin; a
//! preflight from an origin not allowed gets `403`) and `response` (headers added when the
//! request's `Origin` is allowed).

use http::header::{self, HeaderValue};
use http::Method;
use pingora_error::Result;
use pingora_http::ResponseHeader;
use pingora_proxy::Session;
use serde::Deserialize;

use super::{header_name, header_value, BodyFilter, Context, Middleware, Outcome, Reply};
use crate::values::Dur;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "any_origin")]
    pub allow_origins: Vec<String>,
    #[serde(default = "default_methods")]
    pub allow_methods: Vec<String>,
    #[serde(default)]
    pub allow_headers: Vec<String>,
    #[serde(default)]
    pub expose_headers: Vec<String>,
    #[serde(default)]
    pub allow_credentials: bool,
    #[serde(default)]
    pub max_age: Option<Dur>,
}

fn any_origin() -> Vec<String> {
    vec!["*".into()]
}

fn default_methods() -> Vec<String> {
    ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]
        .map(String::from)
        .to_vec()
}

pub struct Cors {
    any: bool,
    origins: Vec<String>,
    credentials: bool,
    methods: HeaderValue,
    headers: Option<HeaderValue>,
    expose: Option<HeaderValue>,
    max_age: Option<HeaderValue>,
}

impl Cors {
    pub fn new(config: &Config) -> Result<Self, String> {
        let any = config.allow_origins.iter().any(|o| o == "*");
        if any && config.allow_credentials {
            return Err(
                "allow_credentials: true needs explicit allow_origins, not \"*\" (browsers refuse it)"
                    .into(),
            );
        }
        let list = |items: &[String]| -> Result<Option<HeaderValue>, String> {
            if items.is_empty() {
                return Ok(None);
            }
            header_value(&items.join(", ")).map(Some)
        };
        for h in config.allow_headers.iter().chain(&config.expose_headers) {
            header_name(h)?;
        }
        for m in &config.allow_methods {
            Method::from_bytes(m.as_bytes()).map_err(|_| format!("`{m}` is not an HTTP method"))?;
        }
        Ok(Cors {
            any,
            origins: config
                .allow_origins
                .iter()
                .map(|o| o.trim_end_matches('/').to_ascii_lowercase())
                .collect(),
            credentials: config.allow_credentials,
            methods: list(&config.allow_methods)?.unwrap_or(HeaderValue::from_static("GET")),
            headers: list(&config.allow_headers)?,
            expose: list(&config.expose_headers)?,
            max_age: config
                .max_age
                .and_then(|d| d.limit())
                .map(|d| HeaderValue::from(d.as_secs())),
        })
    }

    /// The value for `Access-Control-Allow-Origin`, when `origin` is allowed.
    fn allow(&self, origin: &HeaderValue) -> Option<HeaderValue> {
        if self.any {
            return Some(HeaderValue::from_static("*"));
        }
        let o = origin.to_str().ok()?.to_ascii_lowercase();
        self.origins.contains(&o).then(|| origin.clone())
    }
}

impl Middleware for Cors {
    fn request(&self, session: &mut Session, _ctx: &mut Context) -> Result<Outcome> {
        let req = session.req_header();
        if req.method != Method::OPTIONS {
            return Ok(Outcome::Continue);
        }
        let (Some(origin), Some(_)) = (
            req.headers.get(header::ORIGIN),
            req.headers.get(header::ACCESS_CONTROL_REQUEST_METHOD),
        ) else {
            return Ok(Outcome::Continue);
        };
        let Some(allowed) = self.allow(origin) else {
            return Ok(Outcome::Respond(Reply::text(
                403,
                "CORS origin not allowed",
            )));
        };
        let mut reply = Reply::empty(204)
            .with_header(header::ACCESS_CONTROL_ALLOW_ORIGIN, allowed)
            .with_header(header::ACCESS_CONTROL_ALLOW_METHODS, self.methods.clone())
            .with_header(header::VARY, HeaderValue::from_static("origin"));
        let asked = req
            .headers
            .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
            .cloned();
        if let Some(h) = self.headers.clone().or(asked) {
            reply = reply.with_header(header::ACCESS_CONTROL_ALLOW_HEADERS, h);
        }
        if self.credentials {
            reply = reply.with_header(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        if let Some(age) = &self.max_age {
            reply = reply.with_header(header::ACCESS_CONTROL_MAX_AGE, age.clone());
        }
        Ok(Outcome::Respond(reply))
    }

    fn response(
        &self,
        session: &mut Session,
        response: &mut ResponseHeader,
        _ctx: &mut Context,
    ) -> Result<Option<Box<dyn BodyFilter>>> {
        let Some(origin) = session.req_header().headers.get(header::ORIGIN) else {
            return Ok(None);
        };
        if response
            .headers
            .contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN)
        {
            return Ok(None);
        }
        if let Some(allowed) = self.allow(origin) {
            response.insert_header(header::ACCESS_CONTROL_ALLOW_ORIGIN, allowed)?;
            if !self.any {
                response.append_header(header::VARY, "origin")?;
            }
            if self.credentials {
                response.insert_header(header::ACCESS_CONTROL_ALLOW_CREDENTIALS, "true")?;
            }
            if let Some(expose) = &self.expose {
                response.insert_header(header::ACCESS_CONTROL_EXPOSE_HEADERS, expose.clone())?;
            }
        }
        Ok(None)
    }
}
