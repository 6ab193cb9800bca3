//! `api_key`: API keys in a header or the query string, compared in constant time.
//!
//! ```yaml
//! type: api_key
//! config:
//!   header: x-api-key                 # where the key is looked for (default x-api-key)
//!   query: api_key                    # optional: also accept ?api_key=...
//!   strip_query: true                 # remove ?api_key=... before the origin (default true)
//!   strip_header: true                # remove the key header before the origin (default true)
//!   keys: ["k1", "k2"]
//!   keys_file: keys.txt               # and/or one key per line, relative to the config file
//! ```
//!
//! Phases: `request` and `upstream_request`. A missing or wrong key is answered `401` (with
//! `WWW-Authenticate: ApiKey header="x-api-key"`, naming the header) and never reaches the
//! origin. The key is the proxy's credential, not the origin's: its header is taken out of
//! the request the origin gets unless `strip_header: false`, and a key sent in the query
//! (every `query` parameter, also percent-encoded spellings of its name) unless
//! `strip_query: false`; the access log redacts a query key either way. The file is read when the
//! config loads and on every reload; blank lines and lines starting with `#` are skipped.

use std::path::Path;

use http::header::{HeaderName, HeaderValue};
use http::uri::{PathAndQuery, Uri};
use pingora_error::{Error, ErrorType, Result};
use pingora_http::RequestHeader;
use pingora_proxy::Session;
use serde::Deserialize;

use super::credentials::{matches_any, read_lines};
use super::{header_name, Context, Middleware, Outcome, Reply};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_key_header")]
    pub header: String,
    #[serde(default)]
    pub query: Option<String>,
    /// Remove the `query` parameter from what the origin gets (default true).
    #[serde(default = "default_strip")]
    pub strip_query: bool,
    /// Remove the key's header from what the origin gets (default true).
    #[serde(default = "default_strip")]
    pub strip_header: bool,
    #[serde(default)]
    pub keys: Vec<String>,
    #[serde(default)]
    pub keys_file: Option<String>,
}

fn default_strip() -> bool {
    true
}

fn default_key_header() -> String {
    "x-api-key".into()
}

pub struct ApiKey {
    header: HeaderName,
    /// What a `401` says in `WWW-Authenticate`: where the key goes.
    challenge: HeaderValue,
    query: Option<String>,
    strip_query: bool,
    strip_header: bool,
    keys: Vec<Vec<u8>>,
}

impl ApiKey {
    pub fn new(config: &Config, base: &Path) -> Result<Self, String> {
        let mut keys: Vec<Vec<u8>> = config.keys.iter().map(|k| k.clone().into_bytes()).collect();
        if let Some(file) = &config.keys_file {
            keys.extend(read_lines(base, file)?.into_iter().map(String::into_bytes));
        }
        if keys.is_empty() {
            return Err("no keys: set keys or keys_file".into());
        }
        let header = header_name(&config.header)?;
        let challenge = HeaderValue::try_from(format!("ApiKey header=\"{}\"", header.as_str()))
            .map_err(|e| e.to_string())?;
        Ok(ApiKey {
            header,
            challenge,
            query: config.query.clone(),
            strip_query: config.strip_query,
            strip_header: config.strip_header,
            keys,
        })
    }

    fn key_in_query<'a>(&self, query: Option<&'a str>) -> Option<&'a str> {
        let name = self.query.as_deref()?;
        query?
            .split('&')
            .filter_map(|pair| pair.split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v)
    }
}

/// `query` without the parameters named `name` (compared percent-decoded); `None` when
/// there is none.
fn without_param(query: &str, name: &str) -> Option<String> {
    let named = |pair: &str| {
        let key = pair.split_once('=').map_or(pair, |(k, _)| k);
        key == name || percent_encoding::percent_decode_str(key).eq(name.bytes())
    };
    if !query.split('&').any(named) {
        return None;
    }
    let kept: Vec<&str> = query.split('&').filter(|p| !named(p)).collect();
    Some(kept.join("&"))
}

impl Middleware for ApiKey {
    fn request(&self, session: &mut Session, _ctx: &mut Context) -> Result<Outcome> {
        let req = session.req_header();
        let presented = req
            .headers
            .get(&self.header)
            .map(|v| v.as_bytes())
            .or_else(|| self.key_in_query(req.uri.query()).map(str::as_bytes));
        if presented.is_some_and(|k| matches_any(&self.keys, k)) {
            return Ok(Outcome::Continue);
        }
        // A 401 names its challenge (RFC 9110 11.6.1).
        Ok(Outcome::Respond(
            Reply::text(401, "a valid API key is required")
                .with_header(http::header::WWW_AUTHENTICATE, self.challenge.clone()),
        ))
    }

    fn upstream_request(
        &self,
        _session: &mut Session,
        request: &mut RequestHeader,
        _ctx: &mut Context,
    ) -> Result<()> {
        if self.strip_header {
            request.remove_header(&self.header);
        }
        let Some(name) = self.query.as_deref().filter(|_| self.strip_query) else {
            return Ok(());
        };
        let Some(kept) = request.uri.query().and_then(|q| without_param(q, name)) else {
            return Ok(());
        };
        let path = request.uri.path();
        let target = if kept.is_empty() {
            path.to_string()
        } else {
            format!("{path}?{kept}")
        };
        let mut parts = request.uri.clone().into_parts();
        parts.path_and_query = Some(
            PathAndQuery::try_from(target)
                .map_err(|e| Error::because(ErrorType::InternalError, "api_key: strip", e))?,
        );
        let uri = Uri::from_parts(parts)
            .map_err(|e| Error::because(ErrorType::InternalError, "api_key: strip", e))?;
        request.set_uri(uri);
        Ok(())
    }

    fn secret_query_param(&self) -> Option<&str> {
        self.query.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_come_from_config_and_files() {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::write(dir.path().join("keys.txt"), "# ops\nk-file\n\n").expect("write");
        let config: Config =
            serde_yaml::from_str("keys: [k1]\nkeys_file: keys.txt\nquery: api_key").expect("c");
        let auth = ApiKey::new(&config, dir.path()).expect("auth");
        assert!(matches_any(&auth.keys, b"k-file"));
        assert!(matches_any(&auth.keys, b"k1"));
        assert!(!matches_any(&auth.keys, b"k2"));
        assert_eq!(auth.key_in_query(Some("a=1&api_key=k1")), Some("k1"));
        let missing: Config = serde_yaml::from_str("keys_file: nope.txt").expect("c");
        assert!(ApiKey::new(&missing, dir.path()).is_err());
        let empty: Config = serde_yaml::from_str("header: x-key").expect("c");
        assert!(ApiKey::new(&empty, dir.path()).is_err());
    }

    #[test]
    fn the_query_key_is_taken_out() {
        assert_eq!(without_param("a=1&b=2", "api_key"), None);
        assert_eq!(without_param("api_key=k", "api_key").as_deref(), Some(""));
        assert_eq!(
            without_param("a=1&api_key=k&b=2&api%5Fkey=k2&api_key", "api_key").as_deref(),
            Some("a=1&b=2")
        );
        assert_eq!(without_param("xapi_key=1", "api_key"), None);
    }
}
