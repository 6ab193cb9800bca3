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

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use pingora_error::Result;
use pingora_http::ResponseHeader;
use pingora_proxy::Session;
use serde::Deserialize;

use super::{header_name, BodyFilter, Context, Middleware, Outcome};

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
    /// The name as configured, handed to Pingora as bytes.
    wire_name: Bytes,
}

impl RequestId {
    pub fn new(config: &Config) -> Result<Self, String> {
        Ok(RequestId {
            header: header_name(&config.header)?,
            wire_name: Bytes::copy_from_slice(config.header.as_bytes()),
        })
    }
}

/// An incoming id is kept when it is short and printable; anything else is replaced.
fn acceptable(v: &HeaderValue) -> bool {
    let b = v.as_bytes();
    !b.is_empty() && b.len() <= 128 && b.iter().all(|c| c.is_ascii_graphic())
}

impl Middleware for RequestId {
    fn request(&self, session: &mut Session, ctx: &mut Context) -> Result<Outcome> {
        let id = match session.get_header(&self.header) {
            Some(v) if acceptable(v) => v.clone(),
            _ => {
                let mut buf = uuid::Uuid::encode_buffer();
                let text = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buf);
                let id = HeaderValue::from_str(text).map_err(|_| {
                    pingora_error::Error::explain(pingora_error::ErrorType::InternalError, "uuid")
                })?;
                // Written with the head the origin gets (see `AddedHeaders`).
                ctx.added.set(
                    session.req_header_mut(),
                    &self.header,
                    self.wire_name.clone(),
                    id.clone(),
                );
                id
            }
        };
        ctx.id = Some(id);
        Ok(Outcome::Continue)
    }

    fn response(
        &self,
        _session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut Context,
    ) -> Result<Option<Box<dyn BodyFilter>>> {
        if let Some(id) = &ctx.id {
            response.insert_header(self.wire_name.clone(), id.clone())?;
        }
        Ok(None)
    }
}
