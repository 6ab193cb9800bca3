//! `rewrite`: changes the request path before it goes to the origin.
//!
//! ```yaml
//! type: rewrite
//! config:
//!   strip_prefix: /api                       # /api/v1/x -> /v1/x
//!   replace_prefix: { from: /old, to: /new } # /old/x -> /new/x
//!   regex: { pattern: "^/u/([0-9]+)$", replacement: "/users/$1" }
//! ```
//!
//! The operations apply in that order, each only when it matches; the query string is kept.
//! Prefixes match on segment boundaries (`/api` does not strip from `/apix`). Routing has
//! already happened, so a rewrite never changes which route a request takes; the service's
//! own URL prefix is joined after it.
//!
//! Phase: `request`. Never short-circuits.

use pingora_error::Result;
use pingora_proxy::Session;
use regex::Regex;
use serde::Deserialize;

use super::{Context, Middleware, Outcome};
use crate::error::http_error;
use crate::pattern::prefix_matches;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub strip_prefix: Option<String>,
    #[serde(default)]
    pub replace_prefix: Option<Replace>,
    #[serde(default)]
    pub regex: Option<RegexRewrite>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Replace {
    pub from: String,
    pub to: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegexRewrite {
    pub pattern: String,
    pub replacement: String,
}

pub struct Rewrite {
    strip: Option<String>,
    replace: Option<(String, String)>,
    regex: Option<(Regex, String)>,
}

fn clean_prefix(p: &str) -> Result<String, String> {
    if !p.starts_with('/') {
        return Err(format!("prefix `{p}` must start with /"));
    }
    Ok(p.trim_end_matches('/').to_string())
}

impl Rewrite {
    pub fn new(config: &Config) -> Result<Self, String> {
        if config.strip_prefix.is_none()
            && config.replace_prefix.is_none()
            && config.regex.is_none()
        {
            return Err("set at least one of strip_prefix, replace_prefix, regex".into());
        }
        Ok(Rewrite {
            strip: config
                .strip_prefix
                .as_deref()
                .map(clean_prefix)
                .transpose()?,
            replace: config
                .replace_prefix
                .as_ref()
                .map(|r| Ok::<_, String>((clean_prefix(&r.from)?, clean_prefix(&r.to)?)))
                .transpose()?,
            regex: config
                .regex
                .as_ref()
                .map(|r| {
                    Regex::new(&r.pattern)
                        .map(|re| (re, r.replacement.clone()))
                        .map_err(|e| format!("invalid regex `{}`: {e}", r.pattern))
                })
                .transpose()?,
        })
    }

    /// The rewritten path, or `None` when nothing applies.
    pub fn apply(&self, path: &str) -> Option<String> {
        let mut out: Option<String> = None;
        let current = |out: &Option<String>| out.clone().unwrap_or_else(|| path.to_string());
        if let Some(prefix) = &self.strip {
            let p = current(&out);
            if prefix_matches(prefix, &p) {
                let rest = &p[prefix.len()..];
                out = Some(if rest.is_empty() {
                    "/".into()
                } else {
                    rest.into()
                });
            }
        }
        if let Some((from, to)) = &self.replace {
            let p = current(&out);
            if prefix_matches(from, &p) {
                let joined = format!("{to}{}", &p[from.len()..]);
                out = Some(if joined.is_empty() {
                    "/".into()
                } else {
                    joined
                });
            }
        }
        if let Some((re, replacement)) = &self.regex {
            let p = current(&out);
            if re.is_match(&p) {
                out = Some(re.replace(&p, replacement.as_str()).into_owned());
            }
        }
        out
    }
}

impl Middleware for Rewrite {
    fn request(&self, session: &mut Session, _ctx: &mut Context) -> Result<Outcome> {
        let uri = &session.req_header().uri;
        let Some(path) = self.apply(uri.path()) else {
            return Ok(Outcome::Continue);
        };
        let target = match uri.query() {
            Some(q) => format!("{path}?{q}"),
            None => path,
        };
        let uri = http::Uri::try_from(target)
            .map_err(|e| http_error(500, format!("rewrite produced an invalid path: {e}")))?;
        session.req_header_mut().set_uri(uri);
        Ok(Outcome::Continue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rewrite(yaml: &str) -> Rewrite {
        Rewrite::new(&serde_yaml::from_str(yaml).expect("config")).expect("rewrite")
    }

    #[test]
    fn prefixes_and_regexes() {
        let r = rewrite("strip_prefix: /api/");
        assert_eq!(r.apply("/api/v1/x").as_deref(), Some("/v1/x"));
        assert_eq!(r.apply("/api").as_deref(), Some("/"));
        assert_eq!(r.apply("/apix"), None);
        let r = rewrite("replace_prefix: { from: /old, to: /new }");
        assert_eq!(r.apply("/old/a").as_deref(), Some("/new/a"));
        let r = rewrite("regex: { pattern: '^/u/([0-9]+)$', replacement: '/users/$1' }");
        assert_eq!(r.apply("/u/42").as_deref(), Some("/users/42"));
        assert_eq!(r.apply("/u/x"), None);
    }

    #[test]
    fn empty_or_bad_configs_are_refused() {
        assert!(Rewrite::new(&Config::default()).is_err());
        assert!(Rewrite::new(&serde_yaml::from_str("strip_prefix: api").expect("c")).is_err());
        assert!(Rewrite::new(
            &serde_yaml::from_str("regex: { pattern: '(', replacement: x }").expect("c")
        )
        .is_err());
    }
}
