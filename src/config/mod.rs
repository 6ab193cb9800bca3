//! Loading and validating the config: the main file, the files it includes, and Pingora's
//! server settings that share the main file's top level.
//!
//! The file model ([`file`]) is parsed strictly; this module merges the files, resolves
//! service references, and compiles the validated runtime model ([`Config`]) that the
//! proxy serves. Every error names the file, the line and the key.

pub mod file;
pub mod locate;

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::HeaderValue;
use once_cell::sync::Lazy;
use pingora_core::server::configuration::ServerConf;
use serde::de::DeserializeOwned;

use crate::discovery::DiscoveryFile;
use crate::endpoints::{Algorithm, Endpoints, PassiveHealth, Timing};
use crate::error::{ConfigError, ConfigErrorKind as Kind};
use crate::listeners::{Http2Settings, Listener, ListenerKind, DEFAULT_TCP_KEEPALIVE};
use crate::metrics;
use crate::middleware::{join_levels, Chain, Instance, MiddlewareFile};
use crate::origin_tls::{self, CaBundle, OriginTls};
use crate::routing::{HostRoutes, Route, RouteTable};
use crate::sse::limits::{self, ClientSlots, Slots};
use crate::sse::SseSettings;
use crate::tls::{self, ListenerTls, PairError};
use crate::upstream::{url_endpoints, HostHeader, Scheme, Service, ServiceUrl, Timeouts};
use file::{
    AccessLogFormat, Dur, HashKeyFile, HealthCheckFile, HealthCheckKind, HostRuleFile,
    IncludedFile, ListenFile, MainFile, ServiceFile, TimeoutsFile,
};
use locate::KeyPath;
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_load_balancing::health_check::{HealthCheck, HttpHealthCheck, TcpHealthCheck};

/// The config `streamgate` serves when started without `-c`: a listener on
/// 127.0.0.1:8080 in front of the built-in demo SSE origin.
pub const EMBEDDED: &str = include_str!("../../conf/default.yaml");

/// Where the embedded config says it comes from in messages.
pub const EMBEDDED_NAME: &str = "<embedded default config>";

/// Seconds of grace period after the longest `drain_period` when `grace_period_seconds`
/// is not set.
pub const DRAIN_MARGIN_SECS: u64 = 2;

/// Listen address when the main file has no `listen`.
const DEFAULT_LISTEN: &str = "0.0.0.0:8080";

/// A validated config, ready to serve.
#[derive(Debug)]
pub struct Config {
    /// The main file (or [`EMBEDDED_NAME`]).
    pub source: PathBuf,
    /// Every file that was read, main file first.
    pub files: Vec<PathBuf>,
    /// The directories include globs search, where new files may appear.
    pub include_roots: Vec<PathBuf>,
    /// A hash of every file's text: the config's version in logs.
    pub version: String,
    pub loaded_at: SystemTime,
    /// Pingora's own settings from the main file. [`crate::build_server`] takes them out.
    pub server: ServerConf,
    /// Pingora's worker thread count, kept to tell a reload that it cannot change it.
    pub threads: usize,
    /// Every listener's address, in file order (what each one is: [`Config::listeners`]).
    pub listen: Vec<SocketAddr>,
    pub listeners: Vec<Listener>,
    /// The certificates of each TLS listener, by its address. Reloaded with the config.
    pub tls: BTreeMap<SocketAddr, Arc<ListenerTls>>,
    pub http2: Http2Settings,
    /// Address of the built-in demo origin, when `demo:` is set.
    pub demo: Option<SocketAddr>,
    /// The global `sse.max_connections` counter.
    pub sse_limit: Option<Arc<Slots>>,
    /// The global `sse.max_connections_per_client` counters.
    pub sse_client_limit: Option<Arc<ClientSlots>>,
    pub services: BTreeMap<String, Arc<Service>>,
    /// Every `middleware_services` instance by name (enabled or not).
    pub middlewares: Instances,
    pub routes: RouteTable,
    /// The admin listener, when `admin:` is set.
    pub admin: Option<AdminConfig>,
    pub access_log: AccessLog,
    /// Each file's text as loaded, for the admin API's `/config` (secrets redacted there).
    pub texts: Vec<(PathBuf, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    pub token: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AccessLog {
    pub enabled: bool,
    pub format: AccessLogFormat,
}

/// Middleware instances by name.
pub type Instances = BTreeMap<String, Arc<Instance>>;

/// One file's parts that merge across files.
struct Parts<'a> {
    services: &'a BTreeMap<String, ServiceFile>,
    host_rules: &'a [HostRuleFile],
    middleware_services: &'a [MiddlewareFile],
}

/// The chains of one host rule: for its own target, and for each route rule.
struct RuleChains {
    host: Chain,
    routes: Vec<Chain>,
}

impl Config {
    /// Loads and validates `path` and everything it includes.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::load_reusing(path, &BTreeMap::new())
    }

    /// Like [`Config::load`], keeping the middleware instances of `previous` whose type and
    /// config did not change (so a rate limiter keeps its buckets across a reload).
    pub fn load_reusing(path: &Path, previous: &Instances) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| ConfigError::new(path, "", Kind::Io(e)))?;
        let base = path.parent().unwrap_or_else(|| Path::new("."));
        Config::build(path, &text, base, previous)
    }

    /// The embedded default config.
    pub fn embedded() -> Result<Config, ConfigError> {
        Config::from_text(Path::new(EMBEDDED_NAME), EMBEDDED, Path::new("."))
    }

    /// Reads this config's files again (the same main file), reusing unchanged middleware.
    pub fn reload(&self) -> Result<Config, ConfigError> {
        if self.source == Path::new(EMBEDDED_NAME) {
            return Config::build(&self.source, EMBEDDED, Path::new("."), &self.middlewares);
        }
        Config::load_reusing(&self.source, &self.middlewares)
    }

    /// Parses a main file whose text is already read; includes resolve against `base`.
    pub fn from_text(file: &Path, text: &str, base: &Path) -> Result<Config, ConfigError> {
        Config::build(file, text, base, &BTreeMap::new())
    }

    fn build(
        file: &Path,
        text: &str,
        base: &Path,
        previous: &Instances,
    ) -> Result<Config, ConfigError> {
        let main = Source {
            file: file.to_path_buf(),
            text: text.to_string(),
        };
        check_top_level_keys(&main)?;
        let server: ServerConf = main.parse()?;
        let server = server.validate().map_err(|e| {
            main.error(
                KeyPath::root(),
                Kind::Invalid(format!("Pingora server setting: {e}")),
            )
        })?;
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
        // Every file's parts, tagged with the index of its source.
        let files: Vec<Parts> = std::iter::once(Parts {
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
        let mut services = BTreeMap::new();
        let mut defined_in: BTreeMap<String, usize> = BTreeMap::new();
        for (src, part) in files.iter().enumerate() {
            for (name, service) in part.services {
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
                let dir = match src {
                    0 => base,
                    _ => sources[src].file.parent().unwrap_or(base),
                };
                let built = build_service(&sources[src], &path, name, service, &global_sse, dir)?;
                defined_in.insert(name.clone(), src);
                services.insert(name.clone(), Arc::new(built));
            }
        }

        let mut middlewares: Instances = BTreeMap::new();
        let mut mw_defined_in: BTreeMap<String, usize> = BTreeMap::new();
        for (src, part) in files.iter().enumerate() {
            let source = &sources[src];
            let dir = source.file.parent().unwrap_or(base);
            for (i, entry) in part.middleware_services.iter().enumerate() {
                let path = KeyPath::root().key("middleware_services").index(i);
                if let Some(&first) = mw_defined_in.get(&entry.name) {
                    return Err(source.error(
                        path.key("name"),
                        Kind::DuplicateMiddleware {
                            name: entry.name.clone(),
                            first: sources[first].file.display().to_string(),
                        },
                    ));
                }
                let instance = build_instance(source, &path, entry, dir, previous)?;
                mw_defined_in.insert(entry.name.clone(), src);
                middlewares.insert(entry.name.clone(), Arc::new(instance));
            }
        }
        let resolve = |source: &Source, path: KeyPath, names: &[String]| {
            names
                .iter()
                .enumerate()
                .map(|(i, name)| {
                    middlewares.get(name).cloned().ok_or_else(|| {
                        source.error(path.index(i), Kind::UnknownMiddleware(name.clone()))
                    })
                })
                .collect::<Result<Vec<_>, _>>()
        };
        let global_chain = resolve(
            &sources[0],
            KeyPath::root().key("middlewares"),
            &parsed.middlewares,
        )?;

        let mut routes = RouteTable::default();
        for (src, part) in files.iter().enumerate() {
            for (i, rule) in part.host_rules.iter().enumerate() {
                let source = &sources[src];
                let path = KeyPath::root().key("host_rules").index(i);
                let host_chain = resolve(source, path.key("middlewares"), &rule.middlewares)?;
                let mut route_chains = Vec::with_capacity(rule.route_rules.len());
                for (j, route) in rule.route_rules.iter().enumerate() {
                    let rpath = path.key("route_rules").index(j).key("middlewares");
                    let own = resolve(source, rpath, &route.middlewares)?;
                    route_chains.push(join_levels(vec![
                        global_chain.clone(),
                        host_chain.clone(),
                        own,
                    ]));
                }
                let host_default = join_levels(vec![global_chain.clone(), host_chain]);
                let rule_chains = RuleChains {
                    host: host_default,
                    routes: route_chains,
                };
                add_host_rule(&mut routes, source, &path, rule, &services, rule_chains)?;
            }
        }

        let built = build_listeners(&sources[0], parsed.listen.as_deref(), base)?;
        let http2 = build_http2(&sources[0], parsed.http2.as_ref())?;

        let admin = match &parsed.admin {
            Some(admin) => {
                let listen = admin.listen.0;
                if !listen.ip().is_loopback() && admin.token.as_deref().is_none_or(str::is_empty) {
                    return Err(sources[0].error(
                        KeyPath::root().key("admin").key("listen"),
                        Kind::Invalid(format!(
                            "{listen} is reachable from other machines: set admin.token"
                        )),
                    ));
                }
                Some(AdminConfig {
                    listen,
                    token: admin.token.clone(),
                })
            }
            None => None,
        };
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
        let certs: Vec<&tls::LoadedCert> = built.tls.values().flat_map(|t| &t.certs).collect();
        let version = version_of(&sources, &certs);
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
        let mut server = server;
        if server.grace_period_seconds.is_none() {
            // Pingora waits the whole grace period before it exits: make it as long as the
            // longest drain, plus a little for the last streams' event boundaries, rather
            // than Pingora's five minutes.
            let drain = services
                .values()
                .map(|s: &Arc<Service>| s.sse.drain_period)
                .chain([global_sse.drain_period])
                .max()
                .unwrap_or_default();
            server.grace_period_seconds =
                Some(drain.as_secs_f64().ceil() as u64 + DRAIN_MARGIN_SECS);
        }
        let mut files: Vec<PathBuf> = sources.into_iter().map(|s| s.file).collect();
        let ca_files = services
            .values()
            .filter_map(|s| s.tls.as_ref()?.ca.as_ref().map(|ca| &ca.path));
        for path in certs
            .iter()
            .flat_map(|cert| [&cert.cert_path, &cert.key_path])
            .chain(ca_files)
        {
            if !files.contains(path) {
                files.push(path.clone());
            }
        }
        Ok(Config {
            source: file.to_path_buf(),
            include_roots,
            files,
            version,
            loaded_at: SystemTime::now(),
            threads: server.threads,
            server,
            listen: built.listeners.iter().map(|l| l.addr).collect(),
            listeners: built.listeners,
            tls: built.tls,
            http2,
            demo: parsed.demo.map(|d| d.listen.0),
            sse_limit: global_sse
                .max_connections
                .map(|max| limits::slots("global", max)),
            sse_client_limit: global_sse
                .max_connections_per_client
                .map(|max| limits::client_slots("global", max)),
            services,
            middlewares,
            routes,
            admin,
            access_log,
            texts,
        })
    }

    /// Load time in seconds since the Unix epoch.
    pub fn loaded_secs(&self) -> u64 {
        self.loaded_at
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs()
    }

    /// A readable summary of what this config serves, for `streamgate -t`.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        out.push_str("listen:\n");
        for listener in &self.listeners {
            out.push_str(&format!("  {listener}\n"));
            let Some(tls) = self.tls.get(&listener.addr) else {
                continue;
            };
            out.push_str(&format!("    min TLS version {}\n", tls.min_version));
            for (i, cert) in tls.certs.iter().enumerate() {
                let hosts: Vec<String> = cert.hosts.iter().map(|h| h.to_string()).collect();
                out.push_str(&format!(
                    "    {}{}\n      names: {}\n      expires: {}\n      chosen for: {}\n",
                    cert.cert_path.display(),
                    if i == 0 { " (default)" } else { "" },
                    cert.names.join(", "),
                    cert.expiry(),
                    if hosts.is_empty() {
                        "-".to_string()
                    } else {
                        hosts.join(", ")
                    },
                ));
            }
        }
        if let Some(demo) = self.demo {
            out.push_str(&format!("demo origin: {demo}\n"));
        }
        out.push_str("services:\n");
        for service in self.services.values() {
            out.push_str(&format!("  {:<20} {}\n", service.name, service.url));
            out.push_str(&format!(
                "  {:<20} endpoints: {}, {}{}\n",
                "",
                service.discovery.as_deref().unwrap_or("the URL"),
                service.endpoints.algorithm().as_str(),
                if service.retries > 0 {
                    format!(", {} retries", service.retries)
                } else {
                    String::new()
                }
            ));
            if let Some(tls) = &service.tls {
                out.push_str(&format!("  {:<20} tls: {tls}\n", ""));
            }
            out.push_str(&format!("  {:<20} sse: {}\n", "", service.sse));
        }
        if let Some(grace) = self.server.grace_period_seconds {
            out.push_str(&format!("shutdown grace period: {grace}s\n"));
        }
        if !self.middlewares.is_empty() {
            out.push_str("middlewares:\n");
            for instance in self.middlewares.values() {
                out.push_str(&format!(
                    "  {:<20} {:<18} priority {}{}\n",
                    instance.name,
                    instance.kind,
                    instance.priority,
                    if instance.enabled { "" } else { " (disabled)" }
                ));
            }
        }
        out.push_str("routes (in precedence order):\n");
        for (host, routes) in self.routes.describe() {
            for (path, route) in routes {
                let chain: Vec<&str> = route.chain.iter().map(|i| i.name.as_str()).collect();
                out.push_str(&format!(
                    "  {host:<24} {path:<28} -> {:<16} [{}]",
                    route.service.name, route.name
                ));
                if !chain.is_empty() {
                    out.push_str(&format!(" chain: {}", chain.join(", ")));
                }
                out.push('\n');
            }
        }
        out
    }
}

/// One file's text, kept to locate errors found after parsing.
struct Source {
    file: PathBuf,
    text: String,
}

impl Source {
    fn parse<T: DeserializeOwned>(&self) -> Result<T, ConfigError> {
        parse_yaml(&self.file, &self.text)
    }

    fn error(&self, path: KeyPath, kind: Kind) -> ConfigError {
        let position = locate::locate(&self.text, &path);
        ConfigError::new(&self.file, path.to_string(), kind).at(position)
    }
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
fn check_top_level_keys(main: &Source) -> Result<(), ConfigError> {
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
    Ok(())
}

/// Turns a serde_yaml error into a config error with position and key path. `path` is the
/// key path serde_path_to_error tracked (`.` for the root).
/// Parses YAML `text` from `file` into `T`; an error names the file, the line and the key
/// path. Used for config files and for the files they refer to (endpoint lists).
pub fn parse_yaml<T: DeserializeOwned>(file: &Path, text: &str) -> Result<T, ConfigError> {
    let de = serde_yaml::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let mut error = parse_error(file, &path, e.inner());
        // A value refused by its own check (`try_from`) is reported by serde_yaml at the
        // start of the enclosing mapping; the key path finds the value's own line.
        if let Some(found) = key_path(&path).and_then(|p| locate::locate(text, &p)) {
            if error.line.is_some_and(|line| (found.0 as u32) > line) {
                error = error.at(Some(found));
            }
        }
        error
    })
}

/// A dotted key path as serde_path_to_error prints it (`services.feed.hash_key`,
/// `listen[0]`), as a [`KeyPath`]; `None` for paths it cannot follow.
fn key_path(printed: &str) -> Option<KeyPath> {
    if printed == "." || printed.is_empty() {
        return None;
    }
    let mut path = KeyPath::root();
    for part in printed.split('.') {
        let (key, indices) = match part.find('[') {
            Some(at) => part.split_at(at),
            None => (part, ""),
        };
        if key == "?" {
            return None;
        }
        if !key.is_empty() {
            path = path.key(key);
        }
        for index in indices.split(['[', ']']).filter(|i| !i.is_empty()) {
            path = path.index(index.parse().ok()?);
        }
    }
    Some(path)
}

fn parse_error(file: &Path, path: &str, e: &serde_yaml::Error) -> ConfigError {
    let position = e.location().map(|l| (l.line(), l.column()));
    let mut message = e.to_string();
    if let Some(at) = message.rfind(" at line ") {
        message.truncate(at);
    }
    // serde_yaml prefixes its own (shorter) path; the tracked one replaces it.
    if let Some((prefix, rest)) = message.split_once(": ") {
        if !prefix.is_empty() && !prefix.contains(' ') {
            message = rest.to_string();
        }
    }
    let mut key = if path == "." {
        String::new()
    } else {
        path.to_string()
    };
    if let Some(field) = message
        .strip_prefix("unknown field `")
        .and_then(|rest| rest.split('`').next())
    {
        if !key.ends_with(field) {
            key = if key.is_empty() {
                field.to_string()
            } else {
                format!("{key}.{field}")
            };
        }
        message = format!("unknown key; {message}");
    }
    ConfigError::new(file, key, Kind::Parse(message)).at(position)
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

/// Builds a `middleware_services` entry, or reuses the previous config's middleware when
/// it keeps state and its type and config are unchanged.
fn build_instance(
    source: &Source,
    path: &KeyPath,
    entry: &MiddlewareFile,
    dir: &Path,
    previous: &Instances,
) -> Result<Instance, ConfigError> {
    let fingerprint = format!("{:?}", entry.config);
    let middleware = match previous.get(&entry.name) {
        Some(old) if old.fingerprint == fingerprint && entry.config.keeps_state() => {
            old.middleware.clone()
        }
        _ => entry
            .config
            .build(&entry.name, dir)
            .map_err(|e| source.error(path.key("config"), Kind::Invalid(e)))?
            .into(),
    };
    Ok(Instance {
        name: entry.name.clone(),
        kind: entry.config.kind(),
        priority: entry.priority,
        enabled: entry.enabled,
        fingerprint,
        middleware,
    })
}

/// A short hash of every file's text and every certificate.
fn version_of(sources: &[Source], certs: &[&tls::LoadedCert]) -> String {
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
    format!("{:016x}", hasher.finish())
}

/// The listeners and the certificates of the TLS ones.
struct Listeners {
    listeners: Vec<Listener>,
    tls: BTreeMap<SocketAddr, Arc<ListenerTls>>,
}

fn build_listeners(
    main: &Source,
    entries: Option<&[ListenFile]>,
    base: &Path,
) -> Result<Listeners, ConfigError> {
    let root = KeyPath::root().key("listen");
    let default = [ListenFile::Addr(file::ListenAddr(
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
            built.listeners.push(Listener {
                addr,
                kind: ListenerKind::Plain { h2c: false },
                tcp_keepalive: Some(DEFAULT_TCP_KEEPALIVE),
            });
            continue;
        };
        let refuse =
            |key: &str, why: &str| Err(main.error(path.key(key), Kind::Invalid(why.into())));
        let h2c = l.h2c.unwrap_or(false);
        let redirect = l.redirect_http.unwrap_or(false);
        let kind =
            match &l.tls {
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
                        let loaded =
                            tls::load_pair(&base.join(&entry.cert), &base.join(&entry.key), hosts)
                                .map_err(|e| match e {
                                    PairError::Cert(why) => main
                                        .error(certs_path.index(j).key("cert"), Kind::Invalid(why)),
                                    PairError::Key(why) => main
                                        .error(certs_path.index(j).key("key"), Kind::Invalid(why)),
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
        built.listeners.push(Listener {
            addr,
            kind,
            tcp_keepalive: l
                .tcp_keepalive
                .map_or(Some(DEFAULT_TCP_KEEPALIVE), |d| d.limit()),
        });
    }
    Ok(built)
}

fn build_http2(
    main: &Source,
    file: Option<&file::Http2File>,
) -> Result<Http2Settings, ConfigError> {
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

fn apply_timeouts(file: Option<&TimeoutsFile>) -> Timeouts {
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

fn build_service(
    source: &Source,
    path: &KeyPath,
    name: &str,
    file: &ServiceFile,
    global_sse: &SseSettings,
    dir: &Path,
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
    let tls = build_origin_tls(source, path, &url, file, dir)?;
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
        Some(sse) => global_sse.overlay(sse),
        None => *global_sse,
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
    let passive = match &file.passive_health {
        None => None,
        Some(p) => {
            let failures = p.failures.unwrap_or(3);
            if failures == 0 {
                return Err(source.error(
                    path.key("passive_health").key("failures"),
                    Kind::Invalid("at least 1".into()),
                ));
            }
            Some(PassiveHealth {
                failures,
                cooldown: p.cooldown.map_or(Duration::from_secs(10), |d| d.0),
            })
        }
    };
    let health = match &file.health_check {
        None => None,
        Some(check) => Some(health_check(
            source,
            &path.key("health_check"),
            check,
            &url,
            tls.as_ref(),
        )?),
    };
    let fingerprint = format!(
        "{url:?} {:?} {algorithm:?} {:?} {:?} {}",
        file.discovery,
        file.health_check,
        file.passive_health,
        dir.display()
    );
    let endpoints = crate::endpoints::shared(name, fingerprint, || {
        let interval = health.as_ref().map(|(_, every)| *every);
        let check = health.map(|(c, _)| c);
        let mut built = match &file.discovery {
            None => url_endpoints(name, &url, algorithm, check, passive),
            Some(discovery) => {
                let refresh = match discovery {
                    DiscoveryFile::Static(_) => None,
                    other => Some(crate::discovery::refresh_interval(other)),
                };
                let mut built = Endpoints::new(
                    name,
                    crate::discovery::build(discovery, dir)?,
                    check,
                    algorithm,
                    passive,
                    Timing {
                        refresh,
                        health_interval: None,
                    },
                );
                built.set_watch(crate::discovery::watch(discovery, dir)?);
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
        host_header,
        apply_timeouts(file.timeouts.as_ref()),
        sse,
        endpoints,
    )
    .with_tls(tls);
    service.hash_key = file.hash_key.clone().unwrap_or(HashKeyFile::ClientIp);
    service.retries = file.retries.unwrap_or(0);
    service.discovery = file.discovery.as_ref().map(|d| d.to_string());
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

/// The active check of `health_check:`, and how often it runs.
fn health_check(
    source: &Source,
    path: &KeyPath,
    file: &HealthCheckFile,
    url: &ServiceUrl,
    tls: Option<&OriginTls>,
) -> Result<(Box<dyn HealthCheck + Send + Sync>, Duration), ConfigError> {
    let threshold = |value: Option<usize>, default: usize, key: &str| match value {
        Some(0) => Err(source.error(path.key(key), Kind::Invalid("at least 1".into()))),
        v => Ok(v.unwrap_or(default)),
    };
    let healthy = threshold(file.healthy_threshold, 2, "healthy_threshold")?;
    let unhealthy = threshold(file.unhealthy_threshold, 3, "unhealthy_threshold")?;
    let timeout = file.timeout.map_or(Duration::from_secs(1), |d| d.0);
    let interval = match file.interval {
        Some(Dur(d)) if d.is_zero() => {
            return Err(source.error(
                path.key("interval"),
                Kind::Invalid("an interval above 0".into()),
            ))
        }
        Some(Dur(d)) => d,
        None => Duration::from_secs(5),
    };
    let check: Box<dyn HealthCheck + Send + Sync> = match file.kind {
        HealthCheckKind::Tcp => {
            let mut check = TcpHealthCheck::new();
            check.consecutive_success = healthy;
            check.consecutive_failure = unhealthy;
            check.peer_template.options.connection_timeout = Some(timeout);
            check.peer_template.options.total_connection_timeout = Some(timeout);
            check
        }
        HealthCheckKind::Http => {
            let host = file.host.clone().unwrap_or_else(|| url.authority());
            let target = file.path.as_deref().unwrap_or("/");
            let bad = |e: String| source.error(path.key("path"), Kind::Invalid(e));
            if !target.starts_with('/') {
                return Err(bad(format!("`{target}` must start with /")));
            }
            let mut req = RequestHeader::build("GET", target.as_bytes(), None)
                .map_err(|e| bad(e.to_string()))?;
            req.insert_header(http::header::HOST, host.as_str())
                .map_err(|e| source.error(path.key("host"), Kind::Invalid(e.to_string())))?;
            req.insert_header(http::header::USER_AGENT, "streamgate-health-check")
                .map_err(|e| bad(e.to_string()))?;
            let mut check = HttpHealthCheck::new(&host, tls.is_some());
            if let Some(tls) = tls {
                check.peer_template.sni = tls.sni.clone();
                tls.apply(&mut check.peer_template);
            }
            check.req = req;
            check.consecutive_success = healthy;
            check.consecutive_failure = unhealthy;
            check.peer_template.options.connection_timeout = Some(timeout);
            check.peer_template.options.total_connection_timeout = Some(timeout);
            check.peer_template.options.read_timeout = Some(timeout);
            check.validator = Some(Box::new(|resp: &ResponseHeader| {
                let status = resp.status.as_u16();
                if (200..400).contains(&status) {
                    Ok(())
                } else {
                    pingora_error::Error::e_explain(
                        pingora_error::ErrorType::HTTPStatus(status),
                        format!("health check answered {status}"),
                    )
                }
            }));
            Box::new(check)
        }
    };
    Ok((check, interval))
}

/// The TLS settings of an https service (`None` for http), after checking that `scheme`
/// agrees with the URL and that `tls` is only on https; the CA file is loaded here.
fn build_origin_tls(
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
    let defaults = file::OriginTlsFile::default();
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
    Ok(Some(OriginTls {
        verify: tls_file.verify.unwrap_or(true),
        sni,
        ca,
    }))
}

fn add_host_rule(
    routes: &mut RouteTable,
    source: &Source,
    path: &KeyPath,
    rule: &HostRuleFile,
    services: &BTreeMap<String, Arc<Service>>,
    chains: RuleChains,
) -> Result<(), ConfigError> {
    let service = |path: KeyPath, name: &str| {
        services
            .get(name)
            .cloned()
            .ok_or_else(|| source.error(path, Kind::UnknownService(name.to_string())))
    };
    let host = &rule.pattern.0;
    let host_label = match rule.port {
        Some(port) => format!("{host}:{port}"),
        None => host.to_string(),
    };
    let fallback = match &rule.target {
        Some(target) => {
            let name = rule.name.clone().unwrap_or_else(|| host_label.clone());
            let service = service(path.key("target"), target)?;
            Some(Arc::new(Route {
                metrics: metrics::route(&name, &service.name),
                name,
                service,
                chain: chains.host.clone(),
            }))
        }
        None => None,
    };
    let mut host_routes = HostRoutes::new(fallback);
    for ((j, route), chain) in rule.route_rules.iter().enumerate().zip(chains.routes) {
        let rpath = path.key("route_rules").index(j);
        let pattern = route.pattern.0.clone();
        let name = route
            .name
            .clone()
            .unwrap_or_else(|| format!("{host_label}{}", pattern.source()));
        let service = service(rpath.key("target"), &route.target)?;
        let compiled = Arc::new(Route {
            metrics: metrics::route(&name, &service.name),
            name,
            service,
            chain,
        });
        if !host_routes.add(pattern.clone(), compiled) {
            return Err(source.error(
                rpath.key("pattern"),
                Kind::DuplicateRouteRule(pattern.source()),
            ));
        }
    }
    if !routes.add_host(host.clone(), rule.port, host_routes) {
        return Err(source.error(path.key("pattern"), Kind::DuplicateHostRule(host_label)));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
