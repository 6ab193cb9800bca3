//! `dns` discovery: a service's endpoints from A, AAAA or SRV records.
//!
//! Every `discover()` asks the server again: the resolver's cache is cleared first, so a
//! record change is seen on the next refresh whatever its TTL (the caller's `refresh` is
//! the only clock). Failures are errors that name the DNS name, the record type and the
//! server; the caller keeps its last good set.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use async_trait::async_trait;
use hickory_resolver::config::{NameServerConfigGroup, ResolveHosts, ResolverConfig};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::ProtoErrorKind;
use hickory_resolver::{Name, ResolveError, TokioResolver};
use pingora::lb::discovery::ServiceDiscovery;
use pingora::lb::Backend;

use super::{backend, discovery_error, DnsFile, RecordKind, MAX_WEIGHT};

/// Checks a `dns.name` as written: a DNS name, not an IP address.
pub(crate) fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("`name` is empty: write the DNS name to query".into());
    }
    if name.parse::<IpAddr>().is_ok() || name.parse::<SocketAddr>().is_ok() {
        return Err(format!(
            "`{name}` is an IP address, not a DNS name: list addresses with `static` discovery"
        ));
    }
    Name::from_utf8(name)
        .map(drop)
        .map_err(|e| format!("invalid DNS name `{name}`: {e}"))
}

/// Endpoints from DNS records (see [`DnsFile`] for the keys).
pub struct DnsDiscovery {
    name: Name,
    /// The name as written, for messages.
    written: String,
    record: RecordKind,
    port: Option<u16>,
    /// "127.0.0.1:5353" or "the system resolver", for messages.
    via: String,
    /// One query attempt's timeout, for messages.
    timeout: Duration,
    resolver: TokioResolver,
}

impl DnsDiscovery {
    /// A resolver for `file`: its `server` when set (UDP, TCP for long answers), else the
    /// system's configuration from `/etc/resolv.conf`, read now. No query is sent here, and
    /// no runtime is needed.
    pub fn new(file: &DnsFile) -> Result<Self, String> {
        check_name(&file.name)?;
        let name = Name::from_utf8(&file.name)
            .map_err(|e| format!("invalid DNS name `{}`: {e}", file.name))?;
        let provider = TokioConnectionProvider::default();
        let (mut builder, via) = match file.server {
            Some(server) => {
                let servers =
                    NameServerConfigGroup::from_ips_clear(&[server.ip()], server.port(), true);
                let config = ResolverConfig::from_parts(None, vec![], servers);
                let mut builder = TokioResolver::builder_with_config(config, provider);
                // A server named in the config is asked, not /etc/hosts.
                builder.options_mut().use_hosts_file = ResolveHosts::Never;
                (builder, server.to_string())
            }
            None => {
                let builder = TokioResolver::builder_tokio().map_err(|e| {
                    format!(
                        "DNS discovery of `{}`: cannot read the system resolver's \
                         configuration ({e}); set `server`",
                        file.name
                    )
                })?;
                (builder, "the system resolver".to_string())
            }
        };
        builder.options_mut().timeout = file.timeout.0;
        Ok(DnsDiscovery {
            name,
            written: file.name.clone(),
            record: file.record,
            port: file.port,
            via,
            timeout: file.timeout.0,
            resolver: builder.build(),
        })
    }

    /// The current endpoints. `Err` names the name, the record type, the server and the
    /// reason (timeout, NXDOMAIN, SERVFAIL, no records).
    pub async fn resolve(&self) -> Result<BTreeSet<Backend>, String> {
        self.resolver.clear_cache();
        let addrs = match (self.record, self.port) {
            (RecordKind::A, Some(port)) => self
                .ipv4(&self.name)
                .await
                .map_err(|e| self.failed(&self.written, "A", &e))?
                .into_iter()
                .map(|ip| (SocketAddr::new(ip, port), 1))
                .collect(),
            (RecordKind::AAAA, Some(port)) => self
                .ipv6(&self.name)
                .await
                .map_err(|e| self.failed(&self.written, "AAAA", &e))?
                .into_iter()
                .map(|ip| (SocketAddr::new(ip, port), 1))
                .collect(),
            (RecordKind::SRV, _) => self.srv().await?,
            // DnsFile refuses A and AAAA without a port.
            (_, None) => {
                return Err(format!(
                    "DNS discovery of `{}`: {} records need a `port`",
                    self.written, self.record
                ))
            }
        };
        if addrs.is_empty() {
            return Err(format!(
                "DNS {} lookup of `{}` via {} failed: no addresses",
                self.record, self.written, self.via
            ));
        }
        Ok(addrs
            .into_iter()
            .map(|(addr, weight)| backend(addr, weight))
            .collect())
    }

    async fn ipv4(&self, name: &Name) -> Result<Vec<IpAddr>, ResolveError> {
        let found = self.resolver.ipv4_lookup(name.clone()).await?;
        Ok(found.iter().map(|a| IpAddr::V4(a.0)).collect())
    }

    async fn ipv6(&self, name: &Name) -> Result<Vec<IpAddr>, ResolveError> {
        let found = self.resolver.ipv6_lookup(name.clone()).await?;
        Ok(found.iter().map(|a| IpAddr::V6(a.0)).collect())
    }

    /// SRV: the best priority's targets, each resolved to its A and AAAA addresses with the
    /// record's port and (scaled) weight. A target that does not exist or has no address
    /// is skipped with a warning; any other failure fails the whole lookup, so a
    /// transient error never shrinks the set.
    async fn srv(&self) -> Result<BTreeMap<SocketAddr, usize>, String> {
        let found = self
            .resolver
            .srv_lookup(self.name.clone())
            .await
            .map_err(|e| self.failed(&self.written, "SRV", &e))?;
        // RFC 2782: a lone target of "." means the service is not available here.
        let records: Vec<_> = found.iter().filter(|r| !r.target().is_root()).collect();
        let Some(best) = records.iter().map(|r| r.priority()).min() else {
            return Err(format!(
                "DNS SRV lookup of `{}` via {}: no targets (the service is declared \
                 unavailable)",
                self.written, self.via
            ));
        };
        let group: Vec<_> = records.iter().filter(|r| r.priority() == best).collect();
        let top = group.iter().map(|r| r.weight()).max().unwrap_or(1);
        let mut addrs = BTreeMap::new();
        for record in group {
            let weight = scale_weight(record.weight(), top);
            let target = record.target();
            let mut ips = Vec::new();
            for (kind, result) in [
                ("A", self.ipv4(target).await),
                ("AAAA", self.ipv6(target).await),
            ] {
                match result {
                    Ok(found) => ips.extend(found),
                    Err(e) if no_such_records(&e) => {}
                    Err(e) => return Err(self.failed(&target.to_string(), kind, &e)),
                }
            }
            if ips.is_empty() {
                log::warn!(
                    "DNS discovery of `{}`: SRV target `{target}` has no A or AAAA records; \
                     skipped",
                    self.written
                );
            }
            for ip in ips {
                let slot = addrs
                    .entry(SocketAddr::new(ip, record.port()))
                    .or_insert(weight);
                *slot = (*slot).max(weight);
            }
        }
        if addrs.is_empty() {
            return Err(format!(
                "DNS SRV lookup of `{}` via {}: no endpoints (no SRV target of priority {best} \
                 has an A or AAAA record)",
                self.written, self.via
            ));
        }
        Ok(addrs)
    }

    fn failed(&self, name: &str, kind: &str, e: &ResolveError) -> String {
        let reason = match e.proto().map(|p| p.kind()) {
            Some(ProtoErrorKind::NoRecordsFound { response_code, .. }) => match *response_code {
                ResponseCode::NXDomain => "no such name (NXDOMAIN)".to_string(),
                ResponseCode::NoError => format!("no {kind} records"),
                ResponseCode::ServFail => "the server answered SERVFAIL".to_string(),
                ResponseCode::Refused => "the server answered REFUSED".to_string(),
                code => format!("the server answered `{}`", code.to_str()),
            },
            Some(ProtoErrorKind::Timeout) => format!(
                "no answer within {} (each try)",
                humantime::format_duration(self.timeout)
            ),
            _ => e.to_string(),
        };
        format!(
            "DNS {kind} lookup of `{name}` via {} failed: {reason}",
            self.via
        )
    }
}

/// The name exists without such records, or does not exist (an authoritative answer,
/// unlike a timeout or SERVFAIL).
fn no_such_records(e: &ResolveError) -> bool {
    matches!(
        e.proto().map(|p| p.kind()),
        Some(ProtoErrorKind::NoRecordsFound {
            response_code: ResponseCode::NXDomain | ResponseCode::NoError,
            ..
        })
    )
}

/// An SRV weight as an endpoint weight: 0 counts as 1 (RFC 2782 gives weight-0 targets a
/// small chance, not none), and when the group's largest weight `top` exceeds
/// [`MAX_WEIGHT`] every weight is scaled so `top` becomes `MAX_WEIGHT`.
fn scale_weight(weight: u16, top: u16) -> usize {
    let (weight, top) = (usize::from(weight), usize::from(top));
    let scaled = if top > MAX_WEIGHT {
        weight * MAX_WEIGHT / top
    } else {
        weight
    };
    scaled.clamp(1, MAX_WEIGHT)
}

#[async_trait]
impl ServiceDiscovery for DnsDiscovery {
    /// Queries the records now. On `Err` (timeout, NXDOMAIN, SERVFAIL, no records, no
    /// usable SRV target) the message names the DNS name; the caller keeps the last good
    /// set. Every backend is reported enabled (health is the health check's business).
    async fn discover(&self) -> pingora_error::Result<(BTreeSet<Backend>, HashMap<u64, bool>)> {
        let backends = self.resolve().await.map_err(discovery_error)?;
        Ok((backends, HashMap::new()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_scale_into_range() {
        assert_eq!(scale_weight(0, 0), 1);
        assert_eq!(scale_weight(0, 10), 1);
        assert_eq!(scale_weight(3, 10), 3);
        assert_eq!(scale_weight(100, 100), 100);
        assert_eq!(scale_weight(65535, 65535), MAX_WEIGHT);
        assert_eq!(scale_weight(1000, 2000), 50);
        assert_eq!(scale_weight(1, 65535), 1);
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("api.internal").is_ok());
        assert!(check_name("_http._tcp.api.internal.").is_ok());
        assert!(check_name("").is_err());
        let err = check_name("10.0.0.1").err().unwrap_or_default();
        assert!(err.contains("static"), "{err}");
    }

    #[test]
    fn builds_without_a_runtime() {
        let file = DnsFile {
            name: "api.internal".into(),
            port: Some(80),
            record: RecordKind::A,
            refresh: crate::values::Dur(super::super::DNS_REFRESH),
            server: Some(SocketAddr::from(([127, 0, 0, 1], 53))),
            timeout: crate::values::Dur(super::super::DNS_TIMEOUT),
        };
        assert!(DnsDiscovery::new(&file).is_ok());
    }
}
