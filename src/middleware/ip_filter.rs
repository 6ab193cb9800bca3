//! `ip_filter`: allow and deny lists of networks, on the client address.
//!
//! ```yaml
//! type: ip_filter
//! config:
//!   allow: ["10.0.0.0/8", "192.168.1.7"]   # when set, only these may pass
//!   deny: ["10.0.9.0/24"]                  # checked first: deny wins
//!   trusted_proxies: ["127.0.0.1/32"]      # only from these is X-Forwarded-For believed
//! ```
//!
//! The client address is the TCP peer. When the peer is a trusted proxy, `X-Forwarded-For` is
//! read from the right, skipping trusted proxies, and the first other address is the client:
//! a client cannot spoof its way in by sending the header itself.
//!
//! Phase: `request`; refuses with `403`.

use std::net::IpAddr;

use async_trait::async_trait;
use ipnet::IpNet;
use pingora_error::Result;
use pingora_proxy::Session;
use serde::{Deserialize, Deserializer};

use super::{Context, Middleware, Outcome, Reply};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub allow: Vec<Net>,
    #[serde(default)]
    pub deny: Vec<Net>,
    #[serde(default)]
    pub trusted_proxies: Vec<Net>,
}

/// A network (`10.0.0.0/8`) or a single address.
#[derive(Debug, Clone, Copy)]
pub struct Net(pub IpNet);

impl<'de> Deserialize<'de> for Net {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        let raw = raw.trim();
        raw.parse::<IpNet>()
            .or_else(|_| raw.parse::<IpAddr>().map(IpNet::from))
            .map(Net)
            .map_err(|_| serde::de::Error::custom(format!("`{raw}` is not an address or CIDR")))
    }
}

pub struct IpFilter {
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
    trusted: Vec<IpNet>,
}

impl IpFilter {
    pub fn new(config: &Config) -> Self {
        let nets = |v: &[Net]| v.iter().map(|n| n.0).collect();
        IpFilter {
            allow: nets(&config.allow),
            deny: nets(&config.deny),
            trusted: nets(&config.trusted_proxies),
        }
    }

    /// The client's address, seen through trusted proxies.
    pub fn client(&self, peer: IpAddr, forwarded: Option<&str>) -> IpAddr {
        client_ip(peer, forwarded, &self.trusted)
    }

    pub fn permits(&self, ip: &IpAddr) -> bool {
        if self.deny.iter().any(|n| n.contains(ip)) {
            return false;
        }
        self.allow.is_empty() || self.allow.iter().any(|n| n.contains(ip))
    }
}

/// The client's address: the TCP peer, or, when the peer is one of `trusted` proxies, the
/// first address in `X-Forwarded-For` from the right that is not a trusted proxy.
pub fn client_ip(peer: IpAddr, forwarded: Option<&str>, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let mut client = peer;
    for hop in forwarded.into_iter().flat_map(|list| list.rsplit(',')) {
        match hop.trim().parse::<IpAddr>() {
            Ok(ip) => {
                client = ip;
                if !is_trusted(&ip) {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    client
}

/// The client address of a session, seen through `trusted` proxies.
pub fn session_client(session: &Session, trusted: &[IpNet]) -> Option<IpAddr> {
    let peer = crate::http_util::client_ip(session)?;
    let forwarded = session
        .get_header("x-forwarded-for")
        .and_then(|v| v.to_str().ok());
    Some(client_ip(peer, forwarded, trusted))
}

#[async_trait]
impl Middleware for IpFilter {
    async fn request(&self, session: &mut Session, _ctx: &mut Context) -> Result<Outcome> {
        let Some(client) = session_client(session, &self.trusted) else {
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
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let f = filter(&[], &[], &["127.0.0.1", "10.0.0.0/8"]);
        // Untrusted peer: its header is ignored.
        assert_eq!(
            f.client(ip("203.0.113.5"), Some("10.9.9.9")),
            ip("203.0.113.5")
        );
        // Trusted chain: the first untrusted hop from the right.
        assert_eq!(
            f.client(ip("127.0.0.1"), Some("1.2.3.4, 198.51.100.7, 10.0.0.2")),
            ip("198.51.100.7")
        );
        assert_eq!(f.client(ip("127.0.0.1"), None), ip("127.0.0.1"));
    }

    #[test]
    fn bad_networks_are_refused() {
        assert!(serde_yaml::from_str::<Config>("allow: [\"10.0.0.0/33\"]").is_err());
        assert!(serde_yaml::from_str::<Config>("deny: [\"nope\"]").is_err());
    }
}
