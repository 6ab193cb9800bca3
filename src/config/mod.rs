//! The config: the main file, the files it includes, and Pingora's server settings that
//! share the main file's top level, turned into the validated runtime model the proxy
//! serves ([`Config`]). Every error names the file, the line and the key.
//!
//! - [`file`]: the files as written (strict serde structs);
//! - [`load`]: reading the main file and its includes, the top-level key check, the
//!   version hash;
//! - [`build`]: building each part: services, middleware and routes, listeners;
//! - [`describe`]: the summary `streamgate -t` prints.
//!
//! A config holds handles into its server's [`State`] (metrics, limit counters, endpoint
//! sets), so a reload keeps counting where the previous config left off.

pub mod build;
pub mod describe;
pub mod file;
pub mod load;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use pingora_core::server::configuration::ServerConf;

use crate::error::ConfigError;
use crate::listen::{Http2Settings, Listener, ListenerTls};
use crate::middleware::Instance;
use crate::routing::RouteTable;
use crate::sse::limits::{ClientSlots, Slots};
use crate::state::State;
use crate::upstream::Service;
use crate::values::AccessLogFormat;

/// The config `streamgate` serves when started without `-c`: a listener on
/// 127.0.0.1:8080 in front of the built-in demo SSE origin.
pub const EMBEDDED: &str = include_str!("../../conf/default.yaml");

/// Where the embedded config says it comes from in messages.
pub const EMBEDDED_NAME: &str = "<embedded default config>";

/// Seconds of grace period after the longest `drain_period` when `grace_period_seconds`
/// is not set.
pub const DRAIN_MARGIN_SECS: u64 = 2;

/// A validated config, ready to serve.
#[derive(Debug)]
pub struct Config {
    /// The server state this config's handles belong to.
    pub state: Arc<State>,
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
    /// Pingora's settings as they took effect (the file's, with streamgate's defaults),
    /// by key, kept to tell a reload which of them it cannot change (`threads` among
    /// them).
    pub pingora: serde_yaml::Mapping,
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
    /// Proxies whose `X-Forwarded-For` names the client: the client address limits, rate
    /// limits, filters and logs use is the one they forwarded for.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Each file's text as loaded, for the admin API's `/config` (secrets redacted there).
    pub texts: Vec<(PathBuf, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// The bearer token every endpoint needs (`token`, `token_env` or `token_file`).
    pub token: Option<String>,
    /// Where the token came from, for `-t`.
    pub token_source: TokenSource,
    /// `/healthz` and `/readyz` answer without the token.
    pub open_probes: bool,
    /// Extra host names `Host` may carry, lower-case, without a trailing dot.
    pub allowed_hosts: Vec<String>,
}

/// Where the admin token came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    None,
    Inline,
    Env(String),
    File(PathBuf),
}

impl std::fmt::Display for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenSource::None => f.write_str("no token"),
            TokenSource::Inline => f.write_str("token inline"),
            TokenSource::Env(name) => write!(f, "token from ${name}"),
            TokenSource::File(path) => write!(f, "token from {}", path.display()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AccessLog {
    pub enabled: bool,
    pub format: AccessLogFormat,
}

/// Middleware instances by name.
pub type Instances = BTreeMap<String, Arc<Instance>>;

/// [`Config::metric_labels`]: (route, service) pairs, services, services with affinity.
pub type MetricLabels = (
    BTreeSet<(String, String)>,
    BTreeSet<String>,
    BTreeSet<String>,
);

impl Config {
    /// Loads and validates `path` and everything it includes, for a new server.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        load::from_file(path, &State::new(), &BTreeMap::new())
    }

    /// What https origins without a `ca_file` of their own trust, for `-t`: the top-level
    /// `ca_file` (checked as it loaded), or the system's store, loaded here. Pingora's
    /// connectors load it as the server starts and panic when they cannot, so the start
    /// calls this first and ends with its error. An empty store is warned about for each
    /// service verified against it.
    pub fn default_trust(&self) -> Result<String, String> {
        if let Some(file) = &self.server.ca_file {
            return Ok(format!("ca_file {file}"));
        }
        let loaded = crate::upstream::origin_tls::system_trust()
            .map_err(|e| format!("{e}, or set the top-level `ca_file`"))?;
        Ok(match loaded {
            0 => {
                let verified = self.services.values().filter(|s| {
                    s.tls
                        .as_ref()
                        .is_some_and(|tls| tls.verify && tls.ca.is_none())
                });
                for service in verified {
                    log::warn!(
                        "service `{}`: the system's store of trusted certificates is empty: \
                         its origin's certificate cannot be verified (give it a `tls.ca_file`)",
                        service.name
                    );
                }
                "the system's store (empty)".to_string()
            }
            1 => "the system's store (1 certificate)".to_string(),
            n => format!("the system's store ({n} certificates)"),
        })
    }

    /// The embedded default config, for a new server.
    pub fn embedded() -> Result<Config, ConfigError> {
        load::from_text(
            Path::new(EMBEDDED_NAME),
            EMBEDDED,
            Path::new("."),
            &State::new(),
            &BTreeMap::new(),
        )
    }

    /// Parses a main file whose text is already read, for a new server; includes resolve
    /// against `base`.
    pub fn from_text(file: &Path, text: &str, base: &Path) -> Result<Config, ConfigError> {
        load::from_text(file, text, base, &State::new(), &BTreeMap::new())
    }

    /// Reads this config's files again (the same main file) for the same server, keeping
    /// the middleware instances whose type and config did not change (so a rate limiter
    /// keeps its buckets across a reload).
    pub fn reload(&self) -> Result<Config, ConfigError> {
        if self.source == Path::new(EMBEDDED_NAME) {
            return load::from_text(
                &self.source,
                EMBEDDED,
                Path::new("."),
                &self.state,
                &self.middlewares,
            );
        }
        load::from_file(&self.source, &self.state, &self.middlewares)
    }

    /// Load time in seconds since the Unix epoch.
    pub fn loaded_secs(&self) -> u64 {
        self.loaded_at
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs()
    }

    /// The label sets this config's metrics use: (route, service) pairs (the route table's,
    /// and those middlewares count their own requests under), services, and services with
    /// affinity.
    pub fn metric_labels(&self) -> MetricLabels {
        let own = self
            .middlewares
            .values()
            .filter_map(|i| i.middleware.counted_as())
            .map(|(route, service)| (route.to_string(), service.to_string()));
        let routes = self
            .routes
            .describe()
            .into_iter()
            .flat_map(|(_, routes)| routes)
            .map(|(_, route)| (route.name.clone(), route.service.name.clone()))
            .chain(own)
            .collect();
        let affinity = self
            .services
            .values()
            .filter(|s| s.affinity.is_some())
            .map(|s| s.name.clone())
            .collect();
        (routes, self.services.keys().cloned().collect(), affinity)
    }

    /// What the config's author should know although the config is valid (each names its
    /// file, line and key): logged when the config starts serving, printed by `-t`.
    pub fn warnings(&self) -> impl Iterator<Item = &str> {
        self.services
            .values()
            .flat_map(|s| s.warnings.iter().map(String::as_str))
    }

    /// The listener a connection accepted on `local` came through: the one with that exact
    /// address, or the one bound to the unspecified address on that port.
    pub fn listener(&self, local: SocketAddr) -> Option<&Listener> {
        let listeners = &self.listeners;
        listeners
            .iter()
            .find(|l| l.addr == local)
            .or_else(|| listeners.iter().find(|l| l.accepts(local)))
    }

    /// The TLS listener a connection accepted on `local` came through: its exact address,
    /// or the one bound to the unspecified address on that port.
    pub fn listener_tls(&self, local: SocketAddr) -> Option<&ListenerTls> {
        self.tls.get(&local).map(Arc::as_ref).or_else(|| {
            self.tls
                .iter()
                .find(|(addr, _)| addr.port() == local.port() && addr.ip().is_unspecified())
                .map(|(_, tls)| tls.as_ref())
        })
    }
}

#[cfg(test)]
mod tests;
