//! The endpoints of a service given by its `url`: the address itself for an IP literal
//! ([`static_discovery`]), or the host name through the system resolver
//! ([`SystemResolver`]).

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;

use async_trait::async_trait;
use pingora_load_balancing::discovery::ServiceDiscovery;
use pingora_load_balancing::Backend;

/// Static discovery from a list of `(address, weight)`.
pub fn static_discovery(list: &[(SocketAddr, usize)]) -> Box<dyn ServiceDiscovery + Send + Sync> {
    let backends: BTreeSet<Backend> = list
        .iter()
        .map(|(addr, weight)| Backend {
            addr: pingora_core::protocols::l4::socket::SocketAddr::Inet(*addr),
            weight: *weight,
            ext: http::Extensions::new(),
        })
        .collect();
    pingora_load_balancing::discovery::Static::new(backends)
}

/// Discovery of a service URL's host name through the system resolver (`url:` with a
/// name), refreshed every few seconds.
pub struct SystemResolver {
    pub host: String,
    pub port: u16,
}

#[async_trait]
impl ServiceDiscovery for SystemResolver {
    async fn discover(&self) -> pingora_error::Result<(BTreeSet<Backend>, HashMap<u64, bool>)> {
        let addrs = tokio::net::lookup_host((self.host.as_str(), self.port))
            .await
            .map_err(|e| {
                pingora_error::Error::explain(
                    pingora_error::ErrorType::ConnectNoRoute,
                    format!("cannot resolve `{}`: {e}", self.host),
                )
            })?;
        let backends: BTreeSet<Backend> = addrs
            .map(|addr| Backend {
                addr: pingora_core::protocols::l4::socket::SocketAddr::Inet(addr),
                weight: 1,
                ext: http::Extensions::new(),
            })
            .collect();
        if backends.is_empty() {
            return Err(pingora_error::Error::explain(
                pingora_error::ErrorType::ConnectNoRoute,
                format!("`{}` resolves to no address", self.host),
            ));
        }
        Ok((backends, HashMap::new()))
    }
}
