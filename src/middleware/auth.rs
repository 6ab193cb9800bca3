//! `basic_auth` and `api_key`: credentials checked at the edge, compared in constant time.
//!
//! ```yaml
//! type: basic_auth
//! config:
//!   realm: streamgate                 # shown by browsers (default "streamgate")
//!   users: { alice: "s3cret" }        # user: password
//!   users_file: users.txt             # and/or "user:password" lines, relative to the config file
//! ---
//! type: api_key
//! config:
//!   header: x-api-key                 # where the key is looked for (default x-api-key)
//!   query: api_key                    # optional: also accept ?api_key=...
//!   keys: ["k1", "k2"]
//!   keys_file: keys.txt               # and/or one key per line
//! ```
//!
//! Phase: `request`. A missing or wrong credential is answered `401` (with
//! `WWW-Authenticate: Basic realm=".."` for `basic_auth`) and never reaches the origin.
//! Files are read when the config loads (and on every reload); blank lines and lines starting
//! with `#` are skipped.

use std::path::Path;

use async_trait::async_trait;
use base64::Engine;
use http::header::{HeaderName, HeaderValue, AUTHORIZATION, WWW_AUTHENTICATE};
use pingora_error::Result;
use pingora_proxy::Session;
use serde::Deserialize;
use subtle::ConstantTimeEq;

use super::{header_name, Middleware, Outcome, Reply};
use crate::proxy::RequestCtx;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BasicConfig {
    #[serde(default = "default_realm")]
    pub realm: String,
    #[serde(default)]
    pub users: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub users_file: Option<String>,
}

fn default_realm() -> String {
    "streamgate".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
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

/// Non-empty, non-comment lines of a credentials file.
fn read_lines(base: &Path, file: &str) -> Result<Vec<String>, String> {
    let path = base.join(file);
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect())
}

/// Whether `candidate` equals one of `known`, without an early exit on the first match or
/// mismatch, so timing does not tell which byte differed.
fn matches_any(known: &[Vec<u8>], candidate: &[u8]) -> bool {
    let mut found = subtle::Choice::from(0u8);
    for k in known {
        found |= k.as_slice().ct_eq(candidate);
    }
    found.into()
}

pub struct BasicAuth {
    /// `user:password` byte strings.
    credentials: Vec<Vec<u8>>,
    challenge: HeaderValue,
}

impl BasicAuth {
    pub fn new(config: &BasicConfig, base: &Path) -> Result<Self, String> {
        let mut credentials: Vec<Vec<u8>> = config
            .users
            .iter()
            .map(|(u, p)| format!("{u}:{p}").into_bytes())
            .collect();
        if let Some(file) = &config.users_file {
            for line in read_lines(base, file)? {
                if !line.contains(':') {
                    return Err(format!("{file}: lines must be user:password"));
                }
                credentials.push(line.into_bytes());
            }
        }
        if credentials.is_empty() {
            return Err("no users: set users or users_file".into());
        }
        if config.realm.contains('"') {
            return Err("realm must not contain a double quote".into());
        }
        let challenge = HeaderValue::from_str(&format!("Basic realm=\"{}\"", config.realm))
            .map_err(|_| "realm must be printable ASCII".to_string())?;
        Ok(BasicAuth {
            credentials,
            challenge,
        })
    }

    fn presented(&self, header: Option<&HeaderValue>) -> Option<Vec<u8>> {
        let value = header?.to_str().ok()?;
        let (scheme, encoded) = value.trim().split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("basic") {
            return None;
        }
        base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .ok()
    }
}

#[async_trait]
impl Middleware for BasicAuth {
    async fn request(&self, session: &mut Session, _ctx: &mut RequestCtx) -> Result<Outcome> {
        let ok = self
            .presented(session.get_header(AUTHORIZATION))
            .is_some_and(|c| matches_any(&self.credentials, &c));
        if ok {
            return Ok(Outcome::Continue);
        }
        Ok(Outcome::Respond(
            Reply::text(401, "authentication required")
                .with_header(WWW_AUTHENTICATE, self.challenge.clone()),
        ))
    }
}

pub struct ApiKey {
    header: HeaderName,
    query: Option<String>,
    keys: Vec<Vec<u8>>,
}

impl ApiKey {
    pub fn new(config: &ApiKeyConfig, base: &Path) -> Result<Self, String> {
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
    async fn request(&self, session: &mut Session, _ctx: &mut RequestCtx) -> Result<Outcome> {
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
    fn basic_credentials_decode_and_compare() {
        let config: BasicConfig = serde_yaml::from_str("users: { alice: s3cret }").expect("c");
        let auth = BasicAuth::new(&config, Path::new(".")).expect("auth");
        let good = HeaderValue::from_static("Basic YWxpY2U6czNjcmV0");
        let c = auth.presented(Some(&good)).expect("decoded");
        assert!(matches_any(&auth.credentials, &c));
        let bad = HeaderValue::from_static("Basic YWxpY2U6d3Jvbmc=");
        let c = auth.presented(Some(&bad)).expect("decoded");
        assert!(!matches_any(&auth.credentials, &c));
        assert!(auth
            .presented(Some(&HeaderValue::from_static("Bearer x")))
            .is_none());
    }

    #[test]
    fn keys_come_from_config_and_files() {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::write(dir.path().join("keys.txt"), "# ops\nk-file\n\n").expect("write");
        let config: ApiKeyConfig =
            serde_yaml::from_str("keys: [k1]\nkeys_file: keys.txt\nquery: api_key").expect("c");
        let auth = ApiKey::new(&config, dir.path()).expect("auth");
        assert!(matches_any(&auth.keys, b"k-file"));
        assert!(matches_any(&auth.keys, b"k1"));
        assert!(!matches_any(&auth.keys, b"k2"));
        assert_eq!(auth.key_in_query(Some("a=1&api_key=k1")), Some("k1"));
        let missing: ApiKeyConfig = serde_yaml::from_str("keys_file: nope.txt").expect("c");
        assert!(ApiKey::new(&missing, dir.path()).is_err());
        let empty: ApiKeyConfig = serde_yaml::from_str("header: x-key").expect("c");
        assert!(ApiKey::new(&empty, dir.path()).is_err());
    }
}
