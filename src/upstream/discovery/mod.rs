//! Service discovery: where a service's endpoints come from.
//!
//! This module owns the `discovery:` config block of a service (the serde file model,
//! strict like the rest of the config) and its three sources, each an implementation of
//! Pingora's [`ServiceDiscovery`]:
//!
//! - `static`: the listed endpoints, served by Pingora's own [`Static`].
//! - `dns`: A, AAAA or SRV records, queried afresh on every `discover()` ([`DnsDiscovery`]).
//! - `file`: a YAML list of endpoints, re-read on every `discover()` ([`FileDiscovery`]),
//!   with a change signal ([`FileWatch`]) so a rewrite is picked up without waiting for the
//!   next poll.
//!
//! The contract for every source: `discover()` returns the whole current set, or an error
//! that names what failed (the DNS name, the file and line). It never returns an empty set
//! as a success: an empty answer is an error, so a caller that keeps the last good set on
//! error (as Pingora's `LoadBalancer::update` does) never drops every endpoint because a
//! record vanished or a file was caught half-written.
//!
//! ```yaml
//! discovery:                       # exactly one of the three
//!   static: ["10.0.0.1:8080", { address: "10.0.0.2:8080", weight: 3 }]
//! discovery:
//!   dns: { name: api.internal, port: 8080, record: A, refresh: 10s, server: "10.0.0.53:53" }
//! discovery:
//!   dns: { name: _http._tcp.api.internal, record: SRV }
//! discovery:
//!   file: { path: endpoints.yaml, refresh: 2s }
//! ```

pub mod dns;
pub mod file;
pub mod system;

use std::collections::{BTreeSet, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use pingora::lb::discovery::{ServiceDiscovery, Static};
use pingora::lb::Backend;
use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

use crate::values::Dur;

pub use dns::DnsDiscovery;
pub use file::{FileDiscovery, FileWatch};
pub use system::{static_discovery, SystemResolver};

/// The largest weight an endpoint may have. Pingora's weighted selection keeps one slot
/// per weight unit and its consistent hashing 160 ring points per unit, so weights are
/// relative and kept small. SRV weights (0 to 65535) are scaled into `1..=MAX_WEIGHT`.
pub const MAX_WEIGHT: usize = 100;

/// Default `refresh` of `dns` discovery.
pub const DNS_REFRESH: Duration = Duration::from_secs(10);
/// Default `timeout` of one DNS query attempt.
pub const DNS_TIMEOUT: Duration = Duration::from_secs(5);
/// Default `refresh` of `file` discovery (the change signal usually comes first).
pub const FILE_REFRESH: Duration = Duration::from_secs(2);
/// What [`refresh_interval`] answers for `static`, whose set never changes: re-listing it
/// is a no-op, so a caller may as well not poll it at all.
pub const STATIC_REFRESH: Duration = Duration::from_secs(60);

/// `discovery:` of a service: exactly one source.
///
/// Written as a mapping with one key, `static`, `dns` or `file` (serde_yaml 0.9 reads
/// externally tagged enums only from YAML tags, so the one-key form is checked by hand).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "DiscoveryRaw")]
pub enum DiscoveryFile {
    /// `static: [endpoint, ...]`: a fixed, non-empty list without duplicates.
    Static(EndpointList),
    /// `dns: {...}`: A, AAAA or SRV records.
    Dns(DnsFile),
    /// `file: {...}`: a YAML file listing the endpoints.
    File(EndpointsFile),
}

/// `discovery:` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DiscoveryRaw {
    #[serde(default, rename = "static")]
    static_: Option<EndpointList>,
    #[serde(default)]
    dns: Option<DnsFile>,
    #[serde(default)]
    file: Option<EndpointsFile>,
}

impl TryFrom<DiscoveryRaw> for DiscoveryFile {
    type Error = String;

    fn try_from(raw: DiscoveryRaw) -> Result<Self, String> {
        let given: Vec<&str> = [
            ("static", raw.static_.is_some()),
            ("dns", raw.dns.is_some()),
            ("file", raw.file.is_some()),
        ]
        .into_iter()
        .filter_map(|(key, set)| set.then_some(key))
        .collect();
        match (raw.static_, raw.dns, raw.file) {
            (Some(list), None, None) => Ok(DiscoveryFile::Static(list)),
            (None, Some(dns), None) => Ok(DiscoveryFile::Dns(dns)),
            (None, None, Some(file)) => Ok(DiscoveryFile::File(file)),
            (None, None, None) => {
                Err("give one source of endpoints: `static`, `dns` or `file`".into())
            }
            _ => Err(format!(
                "give exactly one source of endpoints, not `{}`",
                given.join("` and `")
            )),
        }
    }
}

impl fmt::Display for DiscoveryFile {
    /// One line for `streamgate -t` and logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DiscoveryFile::Static(list) => {
                let all: Vec<String> = list.0.iter().map(EndpointFile::to_string).collect();
                write!(f, "static [{}]", all.join(", "))
            }
            DiscoveryFile::Dns(dns) => {
                write!(f, "dns {} {}", dns.record, dns.name)?;
                if let Some(port) = dns.port {
                    write!(f, " port {port}")?;
                }
                match dns.server {
                    Some(server) => write!(f, " via {server}")?,
                    None => write!(f, " via the system resolver")?,
                }
                write!(f, " every {}", humantime::format_duration(dns.refresh.0))
            }
            DiscoveryFile::File(file) => write!(
                f,
                "file {} every {}",
                file.path,
                humantime::format_duration(file.refresh_interval())
            ),
        }
    }
}

/// One endpoint: `"10.0.0.1:8080"`, or `{ address: "10.0.0.2:8080", weight: 3 }`.
///
/// The address is an IP literal and a port (names belong to `dns` discovery); the weight
/// is relative, from 1 (the default) to [`MAX_WEIGHT`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndpointFile {
    pub address: SocketAddr,
    pub weight: usize,
}

impl EndpointFile {
    /// The endpoint as Pingora's load balancer takes it.
    pub fn backend(&self) -> Backend {
        backend(self.address, self.weight)
    }
}

impl fmt::Display for EndpointFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.weight == 1 {
            write!(f, "{}", self.address)
        } else {
            write!(f, "{} (weight {})", self.address, self.weight)
        }
    }
}

/// A Pingora backend for `addr` with `weight`.
pub(crate) fn backend(addr: SocketAddr, weight: usize) -> Backend {
    Backend {
        addr: pingora_core::protocols::l4::socket::SocketAddr::Inet(addr),
        weight,
        ext: http::Extensions::new(),
    }
}

fn parse_endpoint_address(raw: &str) -> Result<SocketAddr, String> {
    let raw = raw.trim();
    if let Ok(addr) = raw.parse::<SocketAddr>() {
        if addr.port() == 0 {
            return Err(format!(
                "endpoint `{raw}`: port 0 is not a port to connect to"
            ));
        }
        return Ok(addr);
    }
    if raw.parse::<IpAddr>().is_ok() {
        return Err(format!(
            "endpoint `{raw}` has no port: write `{raw}:PORT` (IPv6: `[ADDR]:PORT`)"
        ));
    }
    Err(format!(
        "invalid endpoint address `{raw}`: write an IP and a port, like `10.0.0.1:8080` or \
         `[fd00::1]:8080` (for a host name use `dns` discovery)"
    ))
}

/// Deserialises a string with `parse`. The check runs inside the visitor so that
/// serde_yaml places its error at the value's own line, not at the enclosing mapping.
fn parse_str<'de, D, T>(
    d: D,
    expecting: &'static str,
    parse: fn(&str) -> Result<T, String>,
) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
{
    struct StrVisitor<T> {
        expecting: &'static str,
        parse: fn(&str) -> Result<T, String>,
    }

    impl<T> Visitor<'_> for StrVisitor<T> {
        type Value = T;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str(self.expecting)
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
            (self.parse)(v).map_err(E::custom)
        }
    }

    d.deserialize_str(StrVisitor { expecting, parse })
}

/// The `address` of an endpoint, parsed where it is written so its error has a line.
struct EndpointAddr(SocketAddr);

impl<'de> Deserialize<'de> for EndpointAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        parse_str(
            d,
            "an IP and a port, like \"10.0.0.1:8080\"",
            parse_endpoint_address,
        )
        .map(EndpointAddr)
    }
}

/// The `weight` of an endpoint: `1..=MAX_WEIGHT`.
struct Weight(usize);

impl Default for Weight {
    fn default() -> Self {
        Weight(1)
    }
}

impl<'de> Deserialize<'de> for Weight {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct WeightVisitor;

        impl Visitor<'_> for WeightVisitor {
            type Value = Weight;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(f, "a whole number from 1 to {MAX_WEIGHT}")
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Weight, E> {
                match usize::try_from(v) {
                    Ok(w) if (1..=MAX_WEIGHT).contains(&w) => Ok(Weight(w)),
                    _ => Err(E::custom(format!(
                        "weight {v} is out of range: weights are relative, from 1 to \
                         {MAX_WEIGHT} (0 would never be chosen; remove the endpoint instead)"
                    ))),
                }
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Weight, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => Err(E::custom(format!(
                        "weight {v} is out of range: weights are relative, from 1 to \
                         {MAX_WEIGHT}"
                    ))),
                }
            }
        }

        d.deserialize_any(WeightVisitor)
    }
}

/// The mapping form of an endpoint.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EndpointMap {
    address: EndpointAddr,
    #[serde(default)]
    weight: Weight,
}

impl<'de> Deserialize<'de> for EndpointFile {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct EndpointVisitor;

        impl<'de> Visitor<'de> for EndpointVisitor {
            type Value = EndpointFile;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    "an endpoint such as \"10.0.0.1:8080\", or a mapping with `address` and \
                     optionally `weight`",
                )
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<EndpointFile, E> {
                parse_endpoint_address(v)
                    .map(|address| EndpointFile { address, weight: 1 })
                    .map_err(E::custom)
            }

            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<EndpointFile, A::Error> {
                EndpointMap::deserialize(de::value::MapAccessDeserializer::new(map)).map(|m| {
                    EndpointFile {
                        address: m.address.0,
                        weight: m.weight.0,
                    }
                })
            }
        }

        d.deserialize_any(EndpointVisitor)
    }
}

/// A list of endpoints: `static:` and the contents of a discovery file. Never empty, no
/// address twice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointList(pub Vec<EndpointFile>);

impl EndpointList {
    /// The set Pingora's load balancer takes.
    pub fn backends(&self) -> BTreeSet<Backend> {
        self.0.iter().map(EndpointFile::backend).collect()
    }
}

impl<'de> Deserialize<'de> for EndpointList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let list = Vec::<EndpointFile>::deserialize(d)?;
        if list.is_empty() {
            return Err(de::Error::custom(
                "the endpoint list is empty: list at least one endpoint",
            ));
        }
        let mut seen = HashSet::new();
        for endpoint in &list {
            if !seen.insert(endpoint.address) {
                return Err(de::Error::custom(format!(
                    "endpoint `{}` is listed twice (to give it more traffic, give it a weight)",
                    endpoint.address
                )));
            }
        }
        Ok(EndpointList(list))
    }
}

/// Which DNS records `dns` discovery asks for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum RecordKind {
    /// IPv4 addresses; the port comes from `port`.
    #[default]
    #[serde(alias = "a")]
    A,
    /// IPv6 addresses; the port comes from `port`.
    #[serde(alias = "aaaa")]
    AAAA,
    /// Service records: targets, ports, priorities and weights (RFC 2782).
    #[serde(alias = "srv")]
    SRV,
}

impl fmt::Display for RecordKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RecordKind::A => "A",
            RecordKind::AAAA => "AAAA",
            RecordKind::SRV => "SRV",
        })
    }
}

/// `discovery: { dns: {...} }`.
///
/// - `name`: the DNS name to query (for SRV the full service name, such as
///   `_http._tcp.api.internal`). Write it fully qualified (or with a trailing dot) when the
///   system resolver's search domains must not apply.
/// - `port`: the endpoints' port. Required for `A` and `AAAA`; refused for `SRV`, whose
///   records carry their own ports.
/// - `record`: `A` (default), `AAAA` or `SRV`. For SRV only the targets of the best
///   (lowest) priority are used, each resolved to its A and AAAA addresses, with the SRV
///   weight (0 counts as 1; scaled into `1..=100` when larger weights are used).
/// - `refresh`: how often the records are queried again (default `10s`); every query goes
///   to the server, nothing is cached between two refreshes.
/// - `server`: the DNS server to ask, `IP` or `IP:PORT` (default: the system resolver,
///   from `/etc/resolv.conf`, read once when [`build`] runs, so a reload re-reads it).
/// - `timeout`: how long one query attempt may take (default `5s`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "DnsFileRaw")]
pub struct DnsFile {
    pub name: String,
    pub port: Option<u16>,
    pub record: RecordKind,
    pub refresh: Dur,
    pub server: Option<SocketAddr>,
    pub timeout: Dur,
}

/// `dns:` as written, checked as a whole into [`DnsFile`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DnsFileRaw {
    name: DnsName,
    #[serde(default)]
    port: Option<u16>,
    #[serde(default)]
    record: RecordKind,
    #[serde(default, deserialize_with = "positive_dur")]
    refresh: Option<Dur>,
    #[serde(default)]
    server: Option<DnsServer>,
    #[serde(default, deserialize_with = "positive_dur")]
    timeout: Option<Dur>,
}

/// `dns.name`, checked where it is written.
struct DnsName(String);

impl<'de> Deserialize<'de> for DnsName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        parse_str(d, "a DNS name", |raw| {
            let name = raw.trim().to_string();
            dns::check_name(&name).map(|()| DnsName(name))
        })
    }
}

/// `dns.server`: `IP:PORT`, or `IP` for port 53.
struct DnsServer(SocketAddr);

impl<'de> Deserialize<'de> for DnsServer {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        parse_str(d, "an IP, or an IP and a port", parse_server).map(DnsServer)
    }
}

/// A duration that must not be 0: there is no "never" for a refresh or a timeout.
fn positive_dur<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Dur>, D::Error> {
    struct PositiveVisitor;

    impl PositiveVisitor {
        /// Parses with [`Dur`]'s own rules, then refuses 0.
        fn check<'de, E: de::Error>(
            d: impl Deserializer<'de, Error = E>,
        ) -> Result<Option<Dur>, E> {
            let dur = Dur::deserialize(d)?;
            if dur.0.is_zero() {
                return Err(E::custom(
                    "0 is not allowed here: write a duration such as `500ms` or `10s`",
                ));
            }
            Ok(Some(dur))
        }
    }

    impl Visitor<'_> for PositiveVisitor {
        type Value = Option<Dur>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a duration such as `500ms` or `10s`")
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Option<Dur>, E> {
            Self::check(de::value::U64Deserializer::<E>::new(v))
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Option<Dur>, E> {
            Self::check(de::value::I64Deserializer::<E>::new(v))
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<Option<Dur>, E> {
            Self::check(de::value::StrDeserializer::<E>::new(v))
        }
    }

    d.deserialize_any(PositiveVisitor)
}

impl TryFrom<DnsFileRaw> for DnsFile {
    type Error = String;

    fn try_from(raw: DnsFileRaw) -> Result<Self, String> {
        let name = raw.name.0;
        match (raw.record, raw.port) {
            (RecordKind::SRV, Some(_)) => {
                return Err(format!(
                    "`port` is set for SRV records of `{name}`, which carry their own ports: \
                     remove `port`"
                ))
            }
            (RecordKind::A | RecordKind::AAAA, None) => {
                return Err(format!(
                    "`port` is required for {} records of `{name}`: the records only hold \
                     addresses",
                    raw.record
                ))
            }
            (_, Some(0)) => return Err("`port` 0 is not a port to connect to".into()),
            _ => {}
        }
        Ok(DnsFile {
            name,
            port: raw.port,
            record: raw.record,
            refresh: raw.refresh.unwrap_or(Dur(DNS_REFRESH)),
            server: raw.server.map(|s| s.0),
            timeout: raw.timeout.unwrap_or(Dur(DNS_TIMEOUT)),
        })
    }
}

/// A DNS server: `IP:PORT`, or `IP` for port 53.
fn parse_server(raw: &str) -> Result<SocketAddr, String> {
    let raw = raw.trim();
    if let Ok(addr) = raw.parse::<SocketAddr>() {
        return Ok(addr);
    }
    if let Ok(ip) = raw.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, 53));
    }
    Err(format!(
        "invalid DNS server `{raw}`: write an IP, or an IP and a port, like `10.0.0.53` or \
         `127.0.0.1:5353`"
    ))
}

/// `discovery: { file: {...} }`.
///
/// - `path`: the endpoints file, relative to the directory of the config file that names
///   it. It holds a YAML list of endpoints in the same two forms as `static`:
///   ```yaml
///   - "10.0.0.1:8080"
///   - { address: "10.0.0.2:8080", weight: 3 }
///   ```
///   An empty list is refused like a broken file (the last good set stays). Replace the
///   file by writing a temporary file and renaming it over the old one, so a reader never
///   sees half of it.
/// - `refresh`: how often the file is re-read (default `2s`). A change to the file is
///   normally picked up sooner, through a file-system watch ([`FileWatch`]).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointsFile {
    #[serde(deserialize_with = "non_empty_path")]
    pub path: String,
    #[serde(default, deserialize_with = "positive_dur")]
    pub refresh: Option<Dur>,
}

impl EndpointsFile {
    /// `refresh`, or its default.
    pub fn refresh_interval(&self) -> Duration {
        // `refresh: 0` is refused when parsed; a hand-built zero falls back too.
        match self.refresh {
            Some(Dur(d)) if !d.is_zero() => d,
            _ => FILE_REFRESH,
        }
    }
}

/// `file.path`: not empty.
fn non_empty_path<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    parse_str(d, "a file path", |raw| {
        if raw.trim().is_empty() {
            Err("`path` is empty: name the endpoints file (relative to this config file)".into())
        } else {
            Ok(raw.to_string())
        }
    })
}

/// Builds the discovery for `file`. `base` is the directory of the config file that holds
/// it (`file` discovery's path is relative to it).
///
/// Nothing is queried or read here: the first `discover()` does that. A `dns` source with
/// no `server` reads the system resolver's configuration now, and fails if it cannot.
pub fn build(
    file: &DiscoveryFile,
    base: &Path,
) -> Result<Box<dyn ServiceDiscovery + Send + Sync>, String> {
    Ok(match file {
        DiscoveryFile::Static(list) => Static::new(list.backends()),
        DiscoveryFile::Dns(dns) => Box::new(DnsDiscovery::new(dns)?),
        DiscoveryFile::File(f) => Box::new(FileDiscovery::new(f, base)),
    })
}

/// How often the caller should call `discover()` for `file`: the source's `refresh` (or
/// its default). For `static` it answers [`STATIC_REFRESH`], though polling it is useless.
pub fn refresh_interval(file: &DiscoveryFile) -> Duration {
    match file {
        DiscoveryFile::Static(_) => STATIC_REFRESH,
        DiscoveryFile::Dns(dns) => dns.refresh.0,
        DiscoveryFile::File(f) => f.refresh_interval(),
    }
}

/// A change signal for `file` discovery (see [`FileWatch`]); `None` for the other sources.
/// Fails when the endpoints file's directory cannot be watched; the caller then relies on
/// `refresh` polling alone.
pub fn watch(file: &DiscoveryFile, base: &Path) -> Result<Option<FileWatch>, String> {
    match file {
        DiscoveryFile::File(f) => FileDiscovery::new(f, base).watch().map(Some),
        _ => Ok(None),
    }
}

/// The error `discover()` returns: the message names the source and what failed.
pub(crate) fn discovery_error(message: String) -> Box<pingora_error::Error> {
    pingora_error::Error::explain(pingora_error::ErrorType::Custom("DiscoveryError"), message)
}

#[cfg(test)]
mod tests;
