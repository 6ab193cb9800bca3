//! `services`: each service's URL or discovery, TLS to its origins, `Host` policy,
//! timeouts, SSE settings, load balancing, health checks, retries and session affinity.

use std::cell::OnceCell;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use http::HeaderValue;

use super::{dir_of, Parts};
use crate::config::file::{OriginTlsFile, ServiceFile, TimeoutsFile};
use crate::error::{ConfigError, ConfigErrorKind as Kind};
use crate::middleware::size_limit::ByteSize;
use crate::pem::{expired, expiry, PairError};
use crate::sse::SseSettings;
use crate::state::State;
use crate::upstream::connect::LocalAddrs;
use crate::upstream::discovery::{self, DiscoveryFile};
use crate::upstream::endpoints::Timing;
use crate::upstream::origin_tls::{self, CaBundle, ClientCert, OriginTls};
use crate::upstream::{
    url_endpoints, Algorithm, Endpoints, HashKey, HostHeader, Scheme, Service, ServiceUrl, Timeouts,
};
use crate::yaml::{KeyPath, Source};

/// Every service of every file; a name defined twice is refused where it is defined again.
pub fn services(
    sources: &[Source],
    parts: &[Parts],
    global_sse: &SseSettings,
    base: &Path,
    state: &State,
    local: &Arc<LocalAddrs>,
) -> Result<BTreeMap<String, Arc<Service>>, ConfigError> {
    let mut services = BTreeMap::new();
    let mut defined_in: BTreeMap<String, usize> = BTreeMap::new();
    let defaults = Defaults {
        sse: global_sse,
        local,
        system_trust: OnceCell::new(),
    };
    for (src, part) in parts.iter().enumerate() {
        for (name, file) in part.services {
            let path = KeyPath::root().key("services").key(name);
            if let Some(&first) = defined_in.get(name) {
                let first = sources[first].file.display().to_string();
                return Err(sources[src].error(
                    path,
                    Kind::DuplicateService {
                        name: name.clone(),
                        first,
                    },
                ));
            }
            // Paths in a service (`tls.ca_file`) are relative to the file defining it.
            let dir = dir_of(sources, src, base);
            let built = service(&sources[src], &path, name, file, &defaults, dir, state)?;
            defined_in.insert(name.clone(), src);
            services.insert(name.clone(), Arc::new(built));
        }
    }
    Ok(services)
}

/// The largest `request_buffer`: what one request may make the proxy hold.
const MAX_REQUEST_BUFFER: usize = 16 << 20;

/// The longest `request_buffer_wait`: how long a request may be held back from its origin.
const MAX_REQUEST_BUFFER_WAIT: std::time::Duration = std::time::Duration::from_secs(60);
/// Most spare connections `preconnect` may ask for, per endpoint and worker thread.
const MAX_PRECONNECT: usize = 256;

/// `timeouts:` over the defaults.
fn timeouts(file: Option<&TimeoutsFile>) -> Timeouts {
    let base = Timeouts::default();
    let Some(file) = file else {
        return base;
    };
    Timeouts {
        connect: file.connect.map_or(base.connect, |d| d.limit()),
        read: file.read.map_or(base.read, |d| d.limit()),
        write: file.write.map_or(base.write, |d| d.limit()),
        idle: file.idle.map_or(base.idle, |d| d.limit()),
    }
}

/// What a service takes from the top level of the config.
struct Defaults<'a> {
    /// The top-level `sse` settings, which the service's own overlay.
    sse: &'a SseSettings,
    /// The local addresses of connections to origins (`client_bind_to_ipv4`/`_ipv6`).
    local: &'a Arc<LocalAddrs>,
    /// The system's store of trusted certificates, loaded at most once per config load
    /// (`origin_tls::system_trust`), for the health checks.
    system_trust: OnceCell<Result<usize, String>>,
}

fn service(
    source: &Source,
    path: &KeyPath,
    name: &str,
    file: &ServiceFile,
    defaults: &Defaults<'_>,
    dir: &Path,
    state: &State,
) -> Result<Service, ConfigError> {
    let url = match (&file.url, &file.discovery) {
        (Some(url), None) => url.0.clone(),
        (None, Some(discovery)) => discovery_url(source, path, file, discovery)?,
        (Some(_), Some(_)) => {
            return Err(source.error(
                path.key("discovery"),
                Kind::Invalid("give either `url` or `discovery`, not both".into()),
            ))
        }
        (None, None) => {
            return Err(source.error(
                path.clone(),
                Kind::Invalid("a service needs `url` or `discovery`".into()),
            ))
        }
    };
    let tls = origin_tls(source, path, &url, file, dir)?;
    let host_header = match file.host_header.as_deref() {
        None | Some("passthrough") => HostHeader::Passthrough,
        Some("upstream") => {
            HostHeader::Fixed(HeaderValue::from_str(&url.authority()).map_err(|e| {
                source.error(path.key("url"), Kind::Invalid(format!("bad host: {e}")))
            })?)
        }
        Some(literal) => HostHeader::Fixed(HeaderValue::from_str(literal).map_err(|_| {
            source.error(
                path.key("host_header"),
                Kind::Invalid(format!(
                    "`{literal}` is not a valid header value; use `passthrough`, \
                     `upstream` or a host name"
                )),
            )
        })?),
    };
    let sse = match &file.sse {
        Some(sse) => defaults.sse.overlay(sse),
        None => *defaults.sse,
    };
    let algorithm = file.load_balancing.unwrap_or(if sse.enabled {
        Algorithm::LeastConnections
    } else {
        Algorithm::RoundRobin
    });
    if file.hash_key.is_some() && algorithm != Algorithm::ConsistentHash {
        return Err(source.error(
            path.key("hash_key"),
            Kind::Invalid("hash_key applies only to `load_balancing: consistent_hash`".into()),
        ));
    }
    let passive = file
        .passive_health
        .as_ref()
        .map(|p| p.build())
        .transpose()
        .map_err(|(key, why)| {
            source.error(path.key("passive_health").key(key), Kind::Invalid(why))
        })?;
    if file.health_check.is_some() {
        // Pingora's checks each build a connector, which loads the system's store of
        // trusted certificates (whatever the top-level `ca_file`) and panics when it
        // cannot: loaded first here, its failure this key's error.
        if let Err(why) = defaults.system_trust.get_or_init(origin_tls::system_trust) {
            return Err(source.error(path.key("health_check"), Kind::Invalid(why.clone())));
        }
    }
    let health = file
        .health_check
        .as_ref()
        .map(|check| check.build(&url, tls.as_ref(), defaults.local))
        .transpose()
        .map_err(|(key, why)| {
            source.error(path.key("health_check").key(key), Kind::Invalid(why))
        })?;
    // What the endpoints and their health checks are made of: the checks' TLS and local
    // addresses too, so that a reload that changes them (a renewed client certificate, a
    // new bind list) makes them anew.
    let fingerprint = format!(
        "{url:?} {:?} {algorithm:?} {:?} {:?} {} {:?} {}",
        file.discovery,
        file.health_check,
        file.passive_health,
        dir.display(),
        tls.as_ref().map(OriginTls::identity),
        defaults.local.key()
    );
    let endpoints = state
        .endpoints
        .shared(name, fingerprint, || {
            let interval = health.as_ref().map(|(_, every)| *every);
            let check = health.map(|(c, _)| c);
            let mut built = match &file.discovery {
                None => url_endpoints(name, &url, algorithm, check, passive),
                Some(discovery) => {
                    let refresh = match discovery {
                        DiscoveryFile::Static(_) => None,
                        other => Some(discovery::refresh_interval(other)),
                    };
                    let mut built = Endpoints::new(
                        name,
                        discovery::build(discovery, dir)?,
                        check,
                        algorithm,
                        passive,
                        Timing {
                            refresh,
                            health_interval: None,
                        },
                    );
                    built.set_watch(discovery::watch(discovery, dir)?);
                    built
                }
            };
            built.set_health_interval(interval);
            Ok(built)
        })
        .map_err(|e| source.error(path.key("discovery"), Kind::Invalid(e)))?;
    let mut service = Service::new(
        name.to_string(),
        url,
        sse,
        endpoints,
        &state.limits,
        &state.metrics,
    )
    .with_tls(tls);
    let client_cert = service.tls.as_ref().and_then(|tls| tls.client.as_ref());
    if let Some(client) = client_cert.filter(|c| expired(c.not_after)) {
        let why = format!(
            "the client certificate {} expires {}: an origin that checks it refuses it",
            client.cert_path.display(),
            expiry(client.not_after)
        );
        let warning = source.error(path.key("tls").key("client_cert"), Kind::Invalid(why));
        service.warnings.push(format!("warning: {warning}"));
    }
    service.local_addrs = defaults.local.clone();
    service.host_header = host_header;
    service.timeouts = timeouts(file.timeouts.as_ref());
    service.hash_key = file.hash_key.clone().unwrap_or(HashKey::ClientIp);
    service.retries = file.retries.unwrap_or(0);
    if let Some(spares) = file.preconnect {
        if spares > MAX_PRECONNECT {
            let why = format!("at most {MAX_PRECONNECT} spare connections per endpoint");
            return Err(source.error(path.key("preconnect"), Kind::Invalid(why)));
        }
        service.preconnect = spares;
    }
    if let Some(ByteSize(size)) = file.request_buffer {
        service.request_buffer = usize::try_from(size)
            .ok()
            .filter(|size| *size <= MAX_REQUEST_BUFFER)
            .ok_or_else(|| {
                let why = format!("at most {} MiB", MAX_REQUEST_BUFFER >> 20);
                source.error(path.key("request_buffer"), Kind::Invalid(why))
            })?;
    }
    if let Some(wait) = file.request_buffer_wait {
        if wait.0 > MAX_REQUEST_BUFFER_WAIT {
            let why = format!("at most {}s", MAX_REQUEST_BUFFER_WAIT.as_secs());
            return Err(source.error(path.key("request_buffer_wait"), Kind::Invalid(why)));
        }
        service.request_buffer_wait = wait.0;
    }
    service.discovery = file.discovery.as_ref().map(|d| d.to_string());
    if let Some(affinity) = &file.affinity {
        service.affinity = Some(affinity.build(state.metrics.affinity(name)));
        let one_endpoint = match &file.discovery {
            None => service.url.ip().is_some(),
            Some(DiscoveryFile::Static(list)) => list.0.len() == 1,
            Some(_) => false,
        };
        if one_endpoint {
            let why = "affinity on a service with one endpoint: every request goes there anyway";
            let warning = source.error(path.key("affinity"), Kind::Invalid(why.into()));
            service.warnings.push(format!("warning: {warning}"));
        }
    }
    Ok(service)
}

/// What stands for the URL of a service given by `discovery`: its scheme (`scheme:`,
/// default http), and as host the DNS name, or the first listed address, which is what
/// `host_header: upstream`, the health check's `Host` and the default TLS server name use.
fn discovery_url(
    source: &Source,
    path: &KeyPath,
    file: &ServiceFile,
    discovery: &DiscoveryFile,
) -> Result<ServiceUrl, ConfigError> {
    let scheme = file.scheme.unwrap_or(Scheme::Http);
    let authority = match discovery {
        DiscoveryFile::Dns(dns) => match dns.port {
            Some(port) => format!("{}:{port}", dns.name),
            None => dns.name.clone(),
        },
        DiscoveryFile::Static(list) => list
            .0
            .first()
            .map_or_else(|| "localhost".to_string(), |e| e.address.to_string()),
        DiscoveryFile::File(_) => "localhost".to_string(),
    };
    ServiceUrl::try_from(format!("{scheme}://{authority}"))
        .map_err(|why| source.error(path.key("discovery"), Kind::Invalid(why)))
}

/// The TLS settings of an https service (`None` for http), after checking that `scheme`
/// agrees with the URL and that `tls` is only on https; the CA file is loaded here.
fn origin_tls(
    source: &Source,
    path: &KeyPath,
    url: &ServiceUrl,
    file: &ServiceFile,
    dir: &Path,
) -> Result<Option<OriginTls>, ConfigError> {
    let invalid = |key: KeyPath, why: String| source.error(key, Kind::Invalid(why));
    if let Some(scheme) = file.scheme.filter(|s| *s != url.scheme) {
        return Err(invalid(
            path.key("scheme"),
            format!(
                "`scheme: {scheme}` disagrees with the URL `{url}`; drop `scheme` or make \
                 them agree"
            ),
        ));
    }
    let tls_file = file.tls.as_ref();
    if url.scheme == Scheme::Http {
        return match tls_file {
            Some(_) => Err(invalid(
                path.key("tls"),
                format!("`tls` is for https services; `{url}` is plain http"),
            )),
            None => Ok(None),
        };
    }
    let tls_path = path.key("tls");
    let defaults = OriginTlsFile::default();
    let tls_file = tls_file.unwrap_or(&defaults);
    let sni = match &tls_file.sni {
        Some(sni) => {
            origin_tls::check_sni(sni).map_err(|why| invalid(tls_path.key("sni"), why))?;
            sni.clone()
        }
        // An IP literal is the server name itself (never an empty SNI: see origin_tls).
        None => match url.ip() {
            Some(ip) => ip.to_string(),
            None => {
                origin_tls::check_sni(&url.host)
                    .map_err(|why| invalid(path.key("url"), format!("{why}: set `tls.sni`")))?;
                url.host.clone()
            }
        },
    };
    let ca = match &tls_file.ca_file {
        Some(ca_file) => Some(
            CaBundle::load(&dir.join(ca_file))
                .map_err(|why| invalid(tls_path.key("ca_file"), why))?,
        ),
        None => None,
    };
    let client = match (&tls_file.client_cert, &tls_file.client_key) {
        (None, None) => None,
        (Some(_), None) => {
            return Err(invalid(
                tls_path.key("client_cert"),
                "`client_cert` needs `client_key`, the file of its private key".into(),
            ))
        }
        (None, Some(_)) => {
            return Err(invalid(
                tls_path.key("client_key"),
                "`client_key` needs `client_cert`, the file of its certificate".into(),
            ))
        }
        (Some(cert), Some(key)) => Some(
            ClientCert::load(&dir.join(cert), &dir.join(key)).map_err(|e| match e {
                PairError::Cert(why) => invalid(tls_path.key("client_cert"), why),
                PairError::Key(why) => invalid(tls_path.key("client_key"), why),
            })?,
        ),
    };
    Ok(Some(OriginTls {
        verify: tls_file.verify.unwrap_or(true),
        sni,
        ca,
        client,
    }))
}
