//! `api_key`: API keys in a header or the query string, compared in constant time.
//!
//! ```yaml
//! type: api_key
//! config:
//!   header: x-api-key                 # where the key is looked for (default x-api-key)
//!   query: api_key                    # optional: also accept ?api_key=...
//!   keys: ["k1", "k2"]
//!   keys_file: keys.txt               # and/or one key per line, relative to the config file
//! ```
//!
//! Phase: `request`. A missing or wrong key is answered `401` and never reaches the origin.
//! The file is read when the config loads and on every reload; blank lines and lines
//! starting with `#` are skipped.

use std::path::Path;

use async_trait::async_trait;
use http::header::HeaderName;
use pingora_error::Result;
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
    #[serde(default)]
    pub keys: Vec<String>,
    #[serde(default)]
    pub keys_file: Option<String>,
}

fn default_key_header() -> String {
    "x-api-key".into()
}

pub struct ApiKey {
    header: HeaderName,
    query: Option<String>,
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
        Ok(ApiKey {
            header: header_name(&config.header)?,
            query: config.query.clone(),
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

#[async_trait]
impl Middleware for ApiKey {
    async fn request(&self, session: &mut Session, _ctx: &mut Context) -> Result<Outcome> {
        let req = session.req_header();
        let presented = req
            .headers
            .get(&self.header)
            .map(|v| v.as_bytes())
            .or_else(|| self.key_in_query(req.uri.query()).map(str::as_bytes));
        if presented.is_some_and(|k| matches_any(&self.keys, k)) {
            return Ok(Outcome::Continue);
        }
        Ok(Outcome::Respond(Reply::text(
            401,
            "a valid API key is required",
        )))
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
}
