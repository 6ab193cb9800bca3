//! Loading: the main file and the files it includes, the top-level key check (streamgate's
//! keys beside Pingora's), Pingora's server settings, and the assembly of the parts that
//! [`super::build`] makes into a [`Config`].

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use once_cell::sync::Lazy;
use pingora_core::server::configuration::ServerConf;

use super::build::{self, Parts};
use super::file::{self, IncludedFile, MainFile};
use super::{AccessLog, AdminConfig, Config, Instances, TokenSource, DRAIN_MARGIN_SECS};
use crate::error::{ConfigError, ConfigErrorKind as Kind};
use crate::listen::LoadedCert;
use crate::middleware::MiddlewareConfig;
use crate::sse::SseSettings;
use crate::state::State;
use crate::upstream::connect::LocalAddrs;
use crate::upstream::origin_tls::{CaBundle, OriginTls};
use crate::yaml::{KeyPath, Source};

/// Loads `path` and what it includes for the server `state` belongs to. `previous` are the
/// middleware instances of the config being replaced (kept when unchanged and stateful).
pub fn from_file(
    path: &Path,
    state: &Arc<State>,
    previous: &Instances,
) -> Result<Config, ConfigError> {
    let text =
        std::fs::read_to_string(path).map_err(|e| ConfigError::new(path, "", Kind::Io(e)))?;
    let base = path.parent().unwrap_or_else(|| Path::new("."));
    from_text(path, &text, base, state, previous)
}

/// Like [`from_file`], with the main file's text already read; includes resolve against
/// `base`.
pub fn from_text(
    file: &Path,
    text: &str,
    base: &Path,
    state: &Arc<State>,
    previous: &Instances,
) -> Result<Config, ConfigError> {
    let main = Source {
        file: file.to_path_buf(),
        text: text.to_string(),
    };
    let top_level = check_top_level_keys(&main)?;
    let mut server: ServerConf = main.parse()?;
    if !top_level.contains_key("work_stealing") {
        // One single-threaded runtime per worker thread, each connection (and its streams)
        // on one of them: less cross-thread waking per event than tokio's work-stealing
        // pool, measured in the README's performance section.
        server.work_stealing = false;
    }
    let mut server = server.validate().map_err(|e| {
        main.error(
            KeyPath::root(),
            Kind::Invalid(format!("Pingora server setting: {e}")),
        )
    })?;
    top_level_ca_file(&main, &mut server, base)?;
    upgrade_paths(&main, &server)?;
    let local = Arc::new(local_addrs(&main, &server)?);
    let parsed: MainFile = main.parse()?;
    let mut sources = vec![main];
    let mut included = Vec::new();
    for (i, pattern) in parsed.include.iter().enumerate() {
        for path in expand_include(&sources[0], i, pattern, base)? {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| ConfigError::new(&path, "", Kind::Io(e)))?;
            let source = Source { file: path, text };
            let file: IncludedFile = source.parse()?;
            included.push(file);
            sources.push(source);
        }
    }
    // Every file's parts, in the order of `sources`.
    let parts: Vec<Parts> = std::iter::once(Parts {
        services: &parsed.services,
        host_rules: &parsed.host_rules,
        middleware_services: &parsed.middleware_services,
    })
    .chain(included.iter().map(|f| Parts {
        services: &f.services,
        host_rules: &f.host_rules,
        middleware_services: &f.middleware_services,
    }))
    .collect();

    let global_sse = match &parsed.sse {
        Some(sse) => SseSettings::default().overlay(sse),
        None => SseSettings::default(),
    };
    let services = build::services(&sources, &parts, &global_sse, base, state, &local)?;
    let middlewares = build::middlewares(&sources, &parts, base, state, previous, &services)?;
    let routes = build::routes(
        &sources,
        &parts,
        &parsed.middlewares,
        &services,
        &middlewares,
        state,
    )?;
    let listeners = build::listeners(&sources[0], parsed.listen.as_deref(), base)?;
    let http2 = build::http2(&sources[0], parsed.http2.as_ref())?;
    let admin = admin(&sources[0], parsed.admin.as_ref(), base)?;
    let access_log = AccessLog {
        enabled: parsed
            .access_log
            .as_ref()
            .and_then(|a| a.enabled)
            .unwrap_or(true),
        format: parsed
            .access_log
            .as_ref()
            .and_then(|a| a.format)
            .unwrap_or_default(),
    };
    if server.grace_period_seconds.is_none() {
        // The grace period is how long a shutting-down process may keep serving what it
        // has: as long as the longest drain or finish period, plus a little for the last
        // streams' event boundaries. The process exits as soon as nothing is left (see
        // `sse::supervisor`), so a long period costs nothing when streams end early.
        let drain = services
            .values()
            .flat_map(|s| [s.sse.drain_period, s.sse.finish_period])
            .chain(sse_middleware_periods(&parts))
            .chain([global_sse.drain_period, global_sse.finish_period])
            .max()
            .unwrap_or_default();
        server.grace_period_seconds = Some(drain.as_secs_f64().ceil() as u64 + DRAIN_MARGIN_SECS);
    }
    let certs: Vec<&LoadedCert> = listeners.tls.values().flat_map(|t| &t.certs).collect();
    let origin_tls: Vec<u64> = services
        .values()
        .filter_map(|s| s.tls.as_ref().map(OriginTls::identity))
        .collect();
    let version = version_of(&sources, &certs, &origin_tls);
    let texts = sources
        .iter()
        .map(|s| (s.file.clone(), s.text.clone()))
        .collect();
    let include_roots = parsed
        .include
        .iter()
        .map(|pattern| {
            base.join(pattern)
                .components()
                .take_while(|c| !glob_has_wildcard(&c.as_os_str().to_string_lossy()))
                .collect::<PathBuf>()
        })
        .collect();
    // Every file a change to which should reload the config: config files, certificates,
    // CA bundles, client certificates toward origins.
    let mut files: Vec<PathBuf> = sources.into_iter().map(|s| s.file).collect();
    let origin_tls = services.values().filter_map(|s| s.tls.as_ref());
    let ca_files = origin_tls
        .clone()
        .filter_map(|tls| tls.ca.as_ref().map(|ca| &ca.path));
    let client_files = origin_tls
        .filter_map(|tls| tls.client.as_ref())
        .flat_map(|client| [&client.cert_path, &client.key_path]);
    for path in certs
        .iter()
        .flat_map(|cert| [&cert.cert_path, &cert.key_path])
        .chain(ca_files)
        .chain(client_files)
    {
        if !files.contains(path) {
            files.push(path.clone());
        }
    }
    Ok(Config {
        state: state.clone(),
        source: file.to_path_buf(),
        include_roots,
        files,
        version,
        loaded_at: SystemTime::now(),
        pingora: match serde_yaml::to_value(&server) {
            Ok(serde_yaml::Value::Mapping(settings)) => settings,
            _ => serde_yaml::Mapping::new(),
        },
        server,
        listen: listeners.listeners.iter().map(|l| l.addr).collect(),
        listeners: listeners.listeners,
        tls: listeners.tls,
        http2,
        demo: parsed.demo.map(|d| d.listen.0),
        sse_limit: global_sse
            .max_connections
            .map(|max| state.limits.slots("global", max)),
        sse_client_limit: global_sse
            .max_connections_per_client
            .map(|max| state.limits.client_slots("global", max)),
        services,
        middlewares,
        routes,
        admin,
        access_log,
        trusted_proxies: parsed.trusted_proxies.iter().map(|n| n.0).collect(),
        texts,
    })
}

/// The drain and finish periods `sse` middlewares set.
fn sse_middleware_periods(parts: &[Parts]) -> Vec<std::time::Duration> {
    parts
        .iter()
        .flat_map(|p| p.middleware_services)
        .filter_map(|entry| match &entry.config {
            MiddlewareConfig::Sse(sse) => Some([sse.drain_period, sse.finish_period]),
            _ => None,
        })
        .flatten()
        .flatten()
        .map(|d| d.0)
        .collect()
}

/// Pingora's top-level `ca_file`, the trust of https services without a `ca_file` of their
/// own: relative to the main file (as every path in the config is), and loaded and checked
/// as a service's bundle is. Pingora reads it in each connector it builds at start and
/// panics on a file it cannot load, so a missing or broken one is refused here, with its
/// line, at start and by `-t`.
fn top_level_ca_file(
    main: &Source,
    server: &mut ServerConf,
    base: &Path,
) -> Result<(), ConfigError> {
    let Some(ca_file) = &server.ca_file else {
        return Ok(());
    };
    let path = base.join(ca_file);
    CaBundle::load(&path)
        .map_err(|why| main.error(KeyPath::root().key("ca_file"), Kind::Invalid(why)))?;
    server.ca_file = Some(path.display().to_string());
    Ok(())
}

/// The files Pingora makes in the middle of an upgrade or a start as a daemon: the
/// `upgrade_sock`, which a new process (`-u`) listens on for the old one's sockets, the
/// `pid_file` (written with `daemon` or `-d`, and read to find the old process) and the
/// `error_log` (opened with `-d`).
/// Pingora finds a missing directory only then: the new process panics, and the old one,
/// told to hand over, gives up and shuts down with no one taking its listeners. So a
/// directory that is not there is refused at load, with the line.
fn upgrade_paths(main: &Source, server: &ServerConf) -> Result<(), ConfigError> {
    let files = [
        (
            "upgrade_sock",
            Some(&server.upgrade_sock),
            "a `-u` upgrade would fail, and the old process exit with no one taking its \
             listeners",
        ),
        (
            "pid_file",
            Some(&server.pid_file),
            "`-d` could not write it, nor an upgrade find the old process",
        ),
        (
            "error_log",
            server.error_log.as_ref(),
            "`-d` could not open it (Pingora panics)",
        ),
    ];
    for (key, file, fails) in files {
        let Some(file) = file else { continue };
        let dir = match Path::new(file).parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        if !dir.is_dir() {
            return Err(main.error(
                KeyPath::root().key(key),
                Kind::Invalid(format!(
                    "{file}: the directory {} does not exist: {fails}",
                    dir.display()
                )),
            ));
        }
    }
    Ok(())
}

/// Pingora's `client_bind_to_ipv4` and `client_bind_to_ipv6`, the local addresses of
/// connections to origins: each entry an address of its family, or the entry's line is
/// the error (Pingora parses them when it builds its connectors at start, and panics on
/// one that does not parse).
fn local_addrs(main: &Source, server: &ServerConf) -> Result<LocalAddrs, ConfigError> {
    let parse = |key: &str, list: &[String], v4: bool| {
        list.iter()
            .enumerate()
            .map(|(i, text)| match text.parse::<IpAddr>() {
                Ok(ip) if ip.is_ipv4() == v4 => Ok(ip),
                _ => Err(main.error(
                    KeyPath::root().key(key).index(i),
                    Kind::Invalid(format!(
                        "`{text}` is not an IPv{} address",
                        if v4 { 4 } else { 6 }
                    )),
                )),
            })
            .collect::<Result<Vec<_>, _>>()
    };
    Ok(LocalAddrs::new(
        parse("client_bind_to_ipv4", &server.client_bind_to_ipv4, true)?,
        parse("client_bind_to_ipv6", &server.client_bind_to_ipv6, false)?,
    ))
}

/// `admin:`; an address other machines can reach needs a token. The token is inline, or
/// read from an environment variable or a file, each checked here.
fn admin(
    main: &Source,
    file: Option<&file::AdminFile>,
    base: &Path,
) -> Result<Option<AdminConfig>, ConfigError> {
    let Some(admin) = file else {
        return Ok(None);
    };
    let at = |key: &str| KeyPath::root().key("admin").key(key);
    let invalid = |key: &str, reason: String| main.error(at(key), Kind::Invalid(reason));
    let given = [
        admin.token.is_some(),
        admin.token_env.is_some(),
        admin.token_file.is_some(),
    ];
    if given.iter().filter(|g| **g).count() > 1 {
        let key = if admin.token_file.is_some() {
            "token_file"
        } else {
            "token_env"
        };
        return Err(invalid(
            key,
            "set one of token, token_env, token_file".into(),
        ));
    }
    let (token, token_source) = if let Some(token) = &admin.token {
        if token.is_empty() {
            return Err(invalid("token", "the token is empty".into()));
        }
        (Some(token.clone()), TokenSource::Inline)
    } else if let Some(name) = &admin.token_env {
        let token = std::env::var(name)
            .ok()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                invalid(
                    "token_env",
                    format!("the environment variable {name} is not set or empty"),
                )
            })?;
        (Some(token), TokenSource::Env(name.clone()))
    } else if let Some(path) = &admin.token_file {
        let full = base.join(path);
        let token = std::fs::read_to_string(&full)
            .map_err(|e| invalid("token_file", format!("cannot read {}: {e}", full.display())))?
            .trim()
            .to_string();
        if token.is_empty() {
            return Err(invalid(
                "token_file",
                format!("{} holds no token", full.display()),
            ));
        }
        (Some(token), TokenSource::File(full))
    } else {
        (None, TokenSource::None)
    };
    let listen = admin.listen.0;
    if !listen.ip().is_loopback() && token.is_none() {
        return Err(main.error(
            at("listen"),
            Kind::Invalid(format!(
                "{listen} is reachable from other machines: set admin.token, token_env or \
                 token_file"
            )),
        ));
    }
    let mut allowed_hosts = Vec::new();
    for (i, host) in admin.allowed_hosts.iter().enumerate() {
        let host = host.trim().trim_end_matches('.').to_ascii_lowercase();
        if host.is_empty() || host.contains(['/', ' ', '@']) {
            return Err(main.error(
                at("allowed_hosts").index(i),
                Kind::Invalid("a host name (without scheme or path) is expected".into()),
            ));
        }
        allowed_hosts.push(host);
    }
    Ok(Some(AdminConfig {
        listen,
        token,
        token_source,
        open_probes: admin.open_probes.unwrap_or(false),
        allowed_hosts,
    }))
}

/// Pingora's `ServerConf` keys, read off its serialised default so they track the version.
static PINGORA_KEYS: Lazy<HashSet<String>> = Lazy::new(|| {
    let value = serde_yaml::to_value(ServerConf::default()).unwrap_or_default();
    value
        .as_mapping()
        .map(|m| {
            m.keys()
                .filter_map(|k| k.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
});

/// The main file's top level mixes our keys and Pingora's; anything else is a typo.
/// Returns the top-level mapping.
fn check_top_level_keys(main: &Source) -> Result<serde_yaml::Mapping, ConfigError> {
    let value: serde_yaml::Value = main.parse()?;
    let mapping = match value {
        serde_yaml::Value::Mapping(m) => m,
        serde_yaml::Value::Null => serde_yaml::Mapping::new(),
        _ => {
            return Err(main.error(
                KeyPath::root(),
                Kind::Invalid("the config must be a mapping of keys to values".into()),
            ))
        }
    };
    for key in mapping.keys() {
        let Some(key) = key.as_str() else {
            return Err(main.error(
                KeyPath::root(),
                Kind::Invalid("top-level keys must be strings".into()),
            ));
        };
        if !file::OWN_KEYS.contains(&key) && !PINGORA_KEYS.contains(key) {
            return Err(main.error(KeyPath::root().key(key), Kind::UnknownKey));
        }
    }
    Ok(mapping)
}

fn expand_include(
    main: &Source,
    index: usize,
    pattern: &str,
    base: &Path,
) -> Result<Vec<PathBuf>, ConfigError> {
    let err = |reason: String| {
        main.error(
            KeyPath::root().key("include").index(index),
            Kind::Include {
                pattern: pattern.to_string(),
                reason,
            },
        )
    };
    let full = base.join(pattern);
    let full = full
        .to_str()
        .ok_or_else(|| err("the path is not valid UTF-8".into()))?;
    let mut paths: Vec<PathBuf> = glob::glob(full)
        .map_err(|e| err(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| err(e.to_string()))?;
    paths.retain(|p| p.is_file());
    paths.sort();
    if paths.is_empty() && !glob_has_wildcard(pattern) {
        return Err(err("no such file".into()));
    }
    Ok(paths)
}

fn glob_has_wildcard(pattern: &str) -> bool {
    pattern.contains(['*', '?', '['])
}

/// A short hash of every file's text and every certificate: the listeners', and what each
/// https service trusts and presents (`origin_tls`, see `OriginTls::identity`), so that
/// a renewed CA bundle or client certificate is a new version the watcher reloads.
fn version_of(sources: &[Source], certs: &[&LoadedCert], origin_tls: &[u64]) -> String {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for source in sources {
        source.file.hash(&mut hasher);
        source.text.hash(&mut hasher);
    }
    for cert in certs {
        for der in &cert.key.cert {
            der.as_ref().hash(&mut hasher);
        }
    }
    origin_tls.hash(&mut hasher);
    format!("{:016x}", hasher.finish())
}
