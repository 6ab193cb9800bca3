//! `listen` and `http2`: the listeners, with the certificates of TLS ones, and the
//! settings of HTTP/2 connections.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::config::file::{Http2File, ListenAddr, ListenFile};
use crate::error::{ConfigError, ConfigErrorKind as Kind};
use crate::listen::certs::load_pair;
use crate::listen::{Http2Settings, Listener, ListenerKind, ListenerTls};
use crate::pem::PairError;
use crate::yaml::{KeyPath, Source};

/// Listen address when the main file has no `listen`.
const DEFAULT_LISTEN: &str = "0.0.0.0:8080";

/// The listeners and the certificates of the TLS ones.
pub struct Listeners {
    pub listeners: Vec<Listener>,
    pub tls: BTreeMap<SocketAddr, Arc<ListenerTls>>,
}

pub fn listeners(
    main: &Source,
    entries: Option<&[ListenFile]>,
    base: &Path,
) -> Result<Listeners, ConfigError> {
    let root = KeyPath::root().key("listen");
    let default = [ListenFile::Addr(ListenAddr(
        DEFAULT_LISTEN
            .parse()
            .map_err(|_| main.error(KeyPath::root(), Kind::Invalid("bad default listen".into())))?,
    ))];
    let entries = match entries {
        Some([]) => {
            return Err(main.error(
                root,
                Kind::Invalid("at least one listen address is needed".into()),
            ))
        }
        Some(entries) => entries,
        None => &default,
    };
    // Redirects go to the first TLS listener's port.
    let https_port = entries
        .iter()
        .find_map(|e| match e {
            ListenFile::Full(l) if l.tls.is_some() => Some(l.address.0.port()),
            _ => None,
        })
        .unwrap_or(443);
    let mut seen = HashSet::new();
    let mut built = Listeners {
        listeners: Vec::new(),
        tls: BTreeMap::new(),
    };
    for (i, entry) in entries.iter().enumerate() {
        let path = root.index(i);
        let addr = entry.address();
        if !seen.insert(addr) {
            return Err(main.error(path, Kind::Invalid(format!("{addr} is listed twice"))));
        }
        let ListenFile::Full(l) = entry else {
            built
                .listeners
                .push(Listener::new(addr, ListenerKind::Plain { h2c: false }));
            continue;
        };
        let refuse =
            |key: &str, why: &str| Err(main.error(path.key(key), Kind::Invalid(why.into())));
        let h2c = l.h2c.unwrap_or(false);
        let redirect = l.redirect_http.unwrap_or(false);
        let kind = match &l.tls {
            Some(tls) => {
                if h2c {
                    return refuse(
                        "h2c",
                        "h2c is plaintext HTTP/2; on a TLS listener HTTP/2 is offered by ALPN \
                         (`http2: true`, the default)",
                    );
                }
                if redirect {
                    return refuse(
                        "redirect_http",
                        "redirect_http belongs on a plain listener: this one already is https",
                    );
                }
                let certs_path = path.key("tls").key("certificates");
                if tls.certificates.is_empty() {
                    return refuse("tls", "`tls.certificates` needs at least one cert and key");
                }
                let mut certs = Vec::with_capacity(tls.certificates.len());
                for (j, entry) in tls.certificates.iter().enumerate() {
                    let hosts = entry
                        .hosts
                        .as_ref()
                        .map(|h| h.iter().map(|p| p.0.clone()).collect());
                    let loaded = load_pair(&base.join(&entry.cert), &base.join(&entry.key), hosts)
                        .map_err(|e| match e {
                            PairError::Cert(why) => {
                                main.error(certs_path.index(j).key("cert"), Kind::Invalid(why))
                            }
                            PairError::Key(why) => {
                                main.error(certs_path.index(j).key("key"), Kind::Invalid(why))
                            }
                        })?;
                    certs.push(loaded);
                }
                let min_version = tls.min_version.unwrap_or_default();
                built
                    .tls
                    .insert(addr, Arc::new(ListenerTls::new(min_version, certs)));
                ListenerKind::Tls {
                    http2: l.http2.unwrap_or(true),
                }
            }
            None => {
                if l.http2 == Some(true) {
                    return refuse(
                        "http2",
                        "http2 is negotiated by ALPN on TLS listeners; for plaintext HTTP/2 \
                         set `h2c: true`",
                    );
                }
                match (redirect, h2c) {
                    (true, true) => {
                        return refuse(
                            "h2c",
                            "a redirect_http listener answers every request with a redirect; \
                             h2c has no use there",
                        )
                    }
                    (true, false) => ListenerKind::Redirect { https_port },
                    (false, h2c) => ListenerKind::Plain { h2c },
                }
            }
        };
        let mut listener = Listener::new(addr, kind);
        if let Some(keepalive) = l.tcp_keepalive {
            listener.tcp_keepalive = keepalive.limit();
        }
        if let Some(max) = l.max_connections {
            if max == 0 {
                return refuse(
                    "max_connections",
                    "at least 1 connection is needed (leave the key out for the default, \
                     which fits the open-file limit)",
                );
            }
            listener.max_connections = max;
        }
        if let Some(idle) = l.idle_timeout {
            if idle.0.subsec_nanos() != 0 {
                return refuse(
                    "idle_timeout",
                    "write whole seconds (`1s`, `60s`), or 0 for none: the wait between \
                     keep-alive requests is kept in seconds",
                );
            }
            listener.idle_timeout = idle.limit();
        }
        if let Some(limit) = l.request_header_timeout {
            listener.request_header_timeout = limit.limit();
        }
        if let Some(defer) = l.defer_accept {
            if defer.0.subsec_nanos() != 0 || defer.0 > MAX_DEFER_ACCEPT {
                return refuse(
                    "defer_accept",
                    "write whole seconds up to 60s (`1s`), or 0 to hand connections over at \
                     once: the kernel counts this wait in seconds",
                );
            }
            listener.defer_accept = defer.limit();
        }
        built.listeners.push(listener);
    }
    Ok(built)
}

/// The longest `defer_accept`: a connection whose client sends nothing waits this long in
/// the kernel before the proxy sees it (and its `idle_timeout` starts).
const MAX_DEFER_ACCEPT: Duration = Duration::from_secs(60);

/// `http2:` over the defaults.
pub fn http2(main: &Source, file: Option<&Http2File>) -> Result<Http2Settings, ConfigError> {
    let defaults = Http2Settings::default();
    let Some(file) = file else {
        return Ok(defaults);
    };
    if file.max_concurrent_streams == Some(0) {
        return Err(main.error(
            KeyPath::root().key("http2").key("max_concurrent_streams"),
            Kind::Invalid("at least 1 stream per connection is needed".into()),
        ));
    }
    Ok(Http2Settings {
        max_concurrent_streams: file
            .max_concurrent_streams
            .unwrap_or(defaults.max_concurrent_streams),
        idle_timeout: file
            .idle_timeout
            .map_or(defaults.idle_timeout, |d| d.limit()),
    })
}
