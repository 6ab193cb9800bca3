//! `ip_filter`: allow and deny lists of networks, on the client address.
//!
//! ```yaml
//! type: ip_filter
//! config:
//!   allow: ["10.0.0.0/8", "192.168.1.7"]   # when set, only these may pass
//!   deny: ["10.0.9.0/24"]                  # checked first: deny wins
//! ```
//!
//! The client address is the request's one ([`Context::client`]): the TCP peer, or, when
//! the peer is one of the top-level `trusted_proxies`, the rightmost address of
//! `X-Forwarded-For` (every line of it) that is not a trusted proxy, so a client cannot
//! spoof its way in by sending the header itself. It is the address limits, rate limits and
//! logs use.
//!
//! Phase: `request`; refuses with `403`.

use std::net::IpAddr;

use ipnet::IpNet;
use pingora_error::Result;
use pingora_proxy::Session;
use serde::Deserialize;

use super::{Context, Middleware, Outcome, Reply, TrustedProxiesAtTop};
use crate::http_util::in_nets;
pub use crate::http_util::Net;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub allow: Vec<Net>,
    #[serde(default)]
    pub deny: Vec<Net>,
    /// Refused: the top-level key is the only one.
    #[serde(default)]
    pub trusted_proxies: Option<TrustedProxiesAtTop>,
}

pub struct IpFilter {
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
}

impl IpFilter {
    pub fn new(config: &Config) -> Self {
        let nets = |v: &[Net]| v.iter().map(|n| n.0).collect::<Vec<_>>();
        IpFilter {
            allow: nets(&config.allow),
            deny: nets(&config.deny),
        }
    }

    pub fn permits(&self, ip: &IpAddr) -> bool {
        if in_nets(&self.deny, ip) {
            return false;
        }
        self.allow.is_empty() || in_nets(&self.allow, ip)
    }
}

impl Middleware for IpFilter {
    fn request(&self, _session: &mut Session, ctx: &mut Context) -> Result<Outcome> {
        let Some(client) = ctx.client else {
            return Ok(Outcome::Continue);
        };
        if self.permits(&client) {
            Ok(Outcome::Continue)
        } else {
            Ok(Outcome::Respond(Reply::text(
                403,
                &format!("client address {client} is not allowed"),
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(allow: &[&str], deny: &[&str]) -> IpFilter {
        let yaml = format!("allow: {allow:?}\ndeny: {deny:?}\n");
        IpFilter::new(&serde_yaml::from_str(&yaml).expect("config"))
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn deny_wins_and_allow_limits() {
        let f = filter(&["10.0.0.0/8"], &["10.0.9.0/24"]);
        assert!(f.permits(&ip("10.1.2.3")));
        assert!(!f.permits(&ip("10.0.9.1")));
        assert!(!f.permits(&ip("192.168.1.1")));
        let open = filter(&[], &["::1"]);
        assert!(open.permits(&ip("192.168.1.1")));
        assert!(!open.permits(&ip("::1")));
    }

    #[test]
    fn bad_networks_are_refused() {
        assert!(serde_yaml::from_str::<Config>("allow: [\"10.0.0.0/33\"]").is_err());
        assert!(serde_yaml::from_str::<Config>("deny: [\"nope\"]").is_err());
        let own = serde_yaml::from_str::<Config>("trusted_proxies: [127.0.0.1]");
        let err = own.expect_err("a filter's own trusted proxies").to_string();
        assert!(err.contains("at the top level"), "{err}");
    }
}
