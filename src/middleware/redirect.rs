//! `redirect`: answers with a redirect built from a template.
//!
//! ```yaml
//! type: redirect
//! config:
//!   status: 308                                  # 301, 302 (default), 303, 307 or 308
//!   location: "https://{host}{path}{query}"      # http to https
//! ```
//!
//! Template variables: `{scheme}`, `{host}` (without port), `{port}` (as the client sent
//! it, may be empty), `{path}`, `{query}` (with its `?`, or empty), `{uri}` (path and query).
//! Unknown variables are refused when the config loads.
//!
//! Phase: `request`; always answers (put it on the routes that should redirect).

use http::header::{HeaderValue, LOCATION};
use pingora_error::Result;
use pingora_proxy::Session;
use serde::Deserialize;

use super::{Context, Middleware, Outcome, Reply};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_status")]
    pub status: u16,
    pub location: String,
}

fn default_status() -> u16 {
    302
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Scheme,
    Host,
    Port,
    Path,
    Query,
    Uri,
}

pub struct Redirect {
    status: u16,
    parts: Vec<Part>,
}

impl Redirect {
    pub fn new(config: &Config) -> Result<Self, String> {
        if ![301, 302, 303, 307, 308].contains(&config.status) {
            return Err(format!(
                "status {} is not a redirect status (301, 302, 303, 307, 308)",
                config.status
            ));
        }
        Ok(Redirect {
            status: config.status,
            parts: parse_template(&config.location)?,
        })
    }

    fn location(&self, scheme: &str, authority: &str, path: &str, query: Option<&str>) -> String {
        let (host, port) = split_authority(authority);
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Scheme => out.push_str(scheme),
                Part::Host => out.push_str(host),
                Part::Port => out.push_str(port),
                Part::Path => out.push_str(path),
                Part::Query => {
                    if let Some(q) = query {
                        out.push('?');
                        out.push_str(q);
                    }
                }
                Part::Uri => {
                    out.push_str(path);
                    if let Some(q) = query {
                        out.push('?');
                        out.push_str(q);
                    }
                }
            }
        }
        out
    }
}

fn split_authority(authority: &str) -> (&str, &str) {
    if authority.starts_with('[') {
        return match authority.find("]:") {
            Some(i) => (&authority[..=i], &authority[i + 2..]),
            None => (authority, ""),
        };
    }
    authority.rsplit_once(':').unwrap_or((authority, ""))
}

fn parse_template(template: &str) -> Result<Vec<Part>, String> {
    let mut parts = Vec::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        if open > 0 {
            parts.push(Part::Text(rest[..open].to_string()));
        }
        let close = rest[open..]
            .find('}')
            .ok_or_else(|| format!("unclosed `{{` in `{template}`"))?;
        let var = &rest[open + 1..open + close];
        parts.push(match var {
            "scheme" => Part::Scheme,
            "host" => Part::Host,
            "port" => Part::Port,
            "path" => Part::Path,
            "query" => Part::Query,
            "uri" => Part::Uri,
            other => {
                return Err(format!(
                    "unknown variable `{{{other}}}`: use scheme, host, port, path, query or uri"
                ))
            }
        });
        rest = &rest[open + close + 1..];
    }
    if !rest.is_empty() {
        parts.push(Part::Text(rest.to_string()));
    }
    Ok(parts)
}

impl Middleware for Redirect {
    fn request(&self, session: &mut Session, _ctx: &mut Context) -> Result<Outcome> {
        let req = session.req_header();
        let authority = crate::http_util::request_host(req).unwrap_or("");
        let location = self.location("http", authority, req.uri.path(), req.uri.query());
        let value = HeaderValue::from_str(&location).map_err(|_| {
            crate::error::http_error(400, "the request cannot be redirected".to_string())
        })?;
        Ok(Outcome::Respond(
            Reply::text(self.status, &format!("moved to {location}")).with_header(LOCATION, value),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redirect(location: &str) -> Redirect {
        Redirect::new(&Config {
            status: 308,
            location: location.into(),
        })
        .expect("redirect")
    }

    #[test]
    fn templates_expand() {
        let r = redirect("https://{host}{path}{query}");
        assert_eq!(
            r.location("http", "a.example.com:8080", "/x/y", Some("q=1")),
            "https://a.example.com/x/y?q=1"
        );
        assert_eq!(r.location("http", "a.test", "/", None), "https://a.test/");
        let r = redirect("{scheme}://new.test:{port}{uri}");
        assert_eq!(
            r.location("http", "[::1]:81", "/p", Some("a")),
            "http://new.test:81/p?a"
        );
    }

    #[test]
    fn bad_templates_and_statuses_are_refused() {
        assert!(Redirect::new(&Config {
            status: 308,
            location: "https://{hots}/".into()
        })
        .is_err());
        assert!(Redirect::new(&Config {
            status: 308,
            location: "https://{host".into()
        })
        .is_err());
        assert!(Redirect::new(&Config {
            status: 200,
            location: "/".into()
        })
        .is_err());
    }
}
