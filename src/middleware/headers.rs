//! `headers`: set, add and remove request and response headers.
//!
//! ```yaml
//! type: headers
//! config:
//!   request:                        # what the origin sees (applied after routing)
//!     set: { x-env: prod }          # replace any existing value
//!     add: { x-trace: edge }        # append another value
//!     remove: [cookie]
//!   response:                       # what the client sees, also on direct answers
//!     set: { strict-transport-security: "max-age=63072000" }
//!     remove: [server, x-powered-by]
//! ```
//!
//! Phases: `upstream_request` and `response`. Never short-circuits. Names and values are
//! checked when the config loads.

use std::collections::BTreeMap;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use pingora_error::Result;
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::Session;
use serde::Deserialize;

use super::{header_name, header_value, BodyFilter, Context, Middleware};
use crate::http_util::remove_response_header;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub request: Ops,
    #[serde(default)]
    pub response: Ops,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ops {
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    #[serde(default)]
    pub add: BTreeMap<String, String>,
    #[serde(default)]
    pub remove: Vec<String>,
}

/// A header's name, as written in the config (Pingora keeps that case on the wire; handing
/// it over as bytes also spares a conversion per request), and its value.
struct Pair {
    name: HeaderName,
    spelled: Bytes,
    value: HeaderValue,
}

impl std::fmt::Debug for Pair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {:?}", self.name, self.value)
    }
}

#[derive(Debug, Default)]
struct Compiled {
    set: Vec<Pair>,
    add: Vec<Pair>,
    remove: Vec<HeaderName>,
}

impl Compiled {
    fn new(ops: &Ops) -> Result<Self, String> {
        let pairs = |m: &BTreeMap<String, String>| {
            m.iter()
                .map(|(k, v)| {
                    Ok(Pair {
                        name: header_name(k)?,
                        spelled: Bytes::copy_from_slice(k.as_bytes()),
                        value: header_value(v)?,
                    })
                })
                .collect::<Result<Vec<_>, String>>()
        };
        Ok(Compiled {
            set: pairs(&ops.set)?,
            add: pairs(&ops.add)?,
            remove: ops
                .remove
                .iter()
                .map(|n| header_name(n))
                .collect::<Result<_, _>>()?,
        })
    }
}

pub struct Headers {
    request: Compiled,
    response: Compiled,
}

impl Headers {
    pub fn new(config: &Config) -> Result<Self, String> {
        Ok(Headers {
            request: Compiled::new(&config.request)?,
            response: Compiled::new(&config.response)?,
        })
    }
}

impl Middleware for Headers {
    fn upstream_request(
        &self,
        _session: &mut Session,
        request: &mut RequestHeader,
        ctx: &mut Context,
    ) -> Result<()> {
        // Set and added headers go out as lines of the head (see `AddedHeaders`).
        for name in &self.request.remove {
            ctx.added.remove(request, name);
        }
        for pair in &self.request.set {
            ctx.added.set(
                request,
                &pair.name,
                pair.spelled.clone(),
                pair.value.clone(),
            );
        }
        for pair in &self.request.add {
            ctx.added.add(pair.spelled.clone(), pair.value.clone());
        }
        Ok(())
    }

    fn response(
        &self,
        _session: &mut Session,
        response: &mut ResponseHeader,
        _ctx: &mut Context,
    ) -> Result<Option<Box<dyn BodyFilter>>> {
        for name in &self.response.remove {
            remove_response_header(response, name);
        }
        for pair in &self.response.set {
            response.insert_header(pair.spelled.clone(), pair.value.clone())?;
        }
        for pair in &self.response.add {
            response.append_header(pair.spelled.clone(), pair.value.clone())?;
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_names_and_values_are_refused() {
        let mut c = Config::default();
        c.request.set.insert("bad name".into(), "v".into());
        assert!(Headers::new(&c).is_err());
        let mut c = Config::default();
        c.response.add.insert("x".into(), "bad\nvalue".into());
        assert!(Headers::new(&c).is_err());
    }
}
