//! `ip_filter`: allow and deny lists of networks, on the client address.
//!
//! ```yaml
//! type: ip_filter
//! config:
//!   allow: ["10.0.0.0/8", "192.168.1.7"]   # when set, only these may pass
//!   deny: ["10.0.9.0/24"]                  # checked first: deny wins
//!   trusted_proxies: ["127.0.0.1/32"]      # default: the top-level trusted_proxies
//! ```
//!
//! The client address is the TCP peer. When the peer is a trusted proxy, `X-Forwarded-For`
//! (every line of it) is read from the right, skipping trusted proxies, and the first other
//! address is the client: a client cannot spoof its way in by sending the header itself.
//! Without `trusted_proxies` of its own, the filter uses the request's client address as
//! the top-level `trusted_proxies` defines it (the one limits and logs use).
//!
//! Phase: `request`; refuses with `403`.

use std::net::IpAddr;

use async_trait::async_trait;
use ipnet::IpNet;
use pingora_error::Result;
use pingora_proxy::Session;
use serde::Deserialize;

use super::{Context, Middleware, Outcome, Reply};
pub use crate::http_util::Net;
use crate::http_util::{in_nets, session_client};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub allow: Vec<Net>,
    #[serde(default)]
    pub deny: Vec<Net>,
    #[serde(default)]
    pub trusted_proxies: Option<Vec<Net>>,
}

pub struct IpFilter {
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
    /// Its own trusted proxies; `None`: the request's client address as the top-level
    /// `trusted_proxies` defines it.
    trusted: Option<Vec<IpNet>>,
}

impl IpFilter {
    pub fn new(config: &Config) -> Self {
        let nets = |v: &[Net]| v.iter().map(|n| n.0).collect::<Vec<_>>();
        IpFilter {
            allow: nets(&config.allow),
            deny: nets(&config.deny),
            trusted: config.trusted_proxies.as_deref().map(nets),
        }
    }

    pub fn permits(&self, ip: &IpAddr) -> bool {
        if in_nets(&self.deny, ip) {
            return false;
        }
        self.allow.is_empty() || in_nets(&self.allow, ip)
    }
}

#[async_trait]
impl Middleware for IpFilter {
    async fn request(&self, session: &mut Session, ctx: &mut Context) -> Result<Outcome> {
        let client = match &self.trusted {
            Some(trusted) => session_client(session, trusted),
            None => ctx.client,
        };
        let Some(client) = client else {
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

    fn filter(allow: &[&str], deny: &[&str], trusted: &[&str]) -> IpFilter {
        let yaml = format!("allow: {allow:?}\ndeny: {deny:?}\ntrusted_proxies: {trusted:?}\n");
        IpFilter::new(&serde_yaml::from_str(&yaml).expect("config"))
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn deny_wins_and_allow_limits() {
        let f = filter(&["10.0.0.0/8"], &["10.0.9.0/24"], &[]);
        assert!(f.permits(&ip("10.1.2.3")));
        assert!(!f.permits(&ip("10.0.9.1")));
        assert!(!f.permits(&ip("192.168.1.1")));
        let open = filter(&[], &["::1"], &[]);
        assert!(open.permits(&ip("192.168.1.1")));
        assert!(!open.permits(&ip("::1")));
    }

    #[test]
    fn bad_networks_are_refused() {
        assert!(serde_yaml::from_str::<Config>("allow: [\"10.0.0.0/33\"]").is_err());
        assert!(serde_yaml::from_str::<Config>("deny: [\"nope\"]").is_err());
    }
}
