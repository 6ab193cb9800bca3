//! `basic_auth`: HTTP Basic credentials checked at the edge, compared in constant time.
//!
//! ```yaml
//! type: basic_auth
//! config:
//!   realm: streamgate                 # shown by browsers (default "streamgate")
//!   users: { alice: "s3cret" }        # user: password
//!   users_file: users.txt             # and/or "user:password" lines, relative to the config file
//! ```
//!
//! Phase: `request`. A missing or wrong credential is answered `401` with
//! `WWW-Authenticate: Basic realm=".."` and never reaches the origin. The file is read when
//! the config loads and on every reload; blank lines and lines starting with `#` are skipped.

use std::path::Path;

use base64::Engine;
use http::header::{HeaderValue, AUTHORIZATION, WWW_AUTHENTICATE};
use pingora_error::Result;
use pingora_proxy::Session;
use serde::Deserialize;

use super::credentials::{matches_any, read_lines};
use super::{Context, Middleware, Outcome, Reply};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
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

pub struct BasicAuth {
    /// `user:password` byte strings.
    credentials: Vec<Vec<u8>>,
    challenge: HeaderValue,
}

impl BasicAuth {
    pub fn new(config: &Config, base: &Path) -> Result<Self, String> {
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

impl Middleware for BasicAuth {
    fn request(&self, session: &mut Session, _ctx: &mut Context) -> Result<Outcome> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_credentials_decode_and_compare() {
        let config: Config = serde_yaml::from_str("users: { alice: s3cret }").expect("c");
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
}
