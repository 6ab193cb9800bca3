//! `request_id`: gives every request an id, passes it to the origin, returns it to the
//! client and puts it in the logs.
//!
//! ```yaml
//! type: request_id
//! config:
//!   header: x-request-id    # default
//! ```
//!
//! Phases: `request` (keeps a well-formed incoming id, else sets a new UUID v4) and
//! `response` (echoes it). Never short-circuits.

use async_trait::async_trait;
use http::header::{HeaderName, HeaderValue};
use pingora_error::Result;
use pingora_http::ResponseHeader;
use pingora_proxy::Session;
use serde::Deserialize;

use super::{header_name, BodyFilter, Middleware, Outcome};
use crate::proxy::RequestCtx;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_header")]
    pub header: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            header: default_header(),
        }
    }
}

fn default_header() -> String {
    "x-request-id".into()
}

pub struct RequestId {
    header: HeaderName,
}

impl RequestId {
    pub fn new(config: &Config) -> Result<Self, String> {
        Ok(RequestId {
            header: header_name(&config.header)?,
        })
    }
}

/// An incoming id is kept when it is short and printable; anything else is replaced.
fn acceptable(v: &HeaderValue) -> bool {
    let b = v.as_bytes();
    !b.is_empty() && b.len() <= 128 && b.iter().all(|c| c.is_ascii_graphic())
}

#[async_trait]
impl Middleware for RequestId {
    async fn request(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<Outcome> {
        let id = match session.get_header(&self.header) {
            Some(v) if acceptable(v) => String::from_utf8_lossy(v.as_bytes()).into_owned(),
            _ => {
                let id = uuid::Uuid::new_v4().to_string();
                session
                    .req_header_mut()
                    .insert_header(self.header.clone(), id.as_str())?;
                id
            }
        };
        ctx.request_id = Some(id);
        Ok(Outcome::Continue)
    }

    fn response(
        &self,
        _session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<Option<Box<dyn BodyFilter>>> {
        if let Some(id) = &ctx.request_id {
            response.insert_header(self.header.clone(), id.as_str())?;
        }
        Ok(None)
    }
}
