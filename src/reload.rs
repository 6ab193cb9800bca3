//! Live config reload: on `SIGHUP`, and when a config file changes on disk.
//!
//! The new config (main file and includes) is read and validated aside; only when it is
//! whole is it swapped in, atomically. Requests in flight keep the route, service and
//! middleware chain they matched, so SSE streams on routes that still exist keep streaming.
//! Stateful middleware instances (rate limiters) whose config did not change are carried
//! over with their state; new or enabled ones are loaded, removed or disabled ones unloaded. A config that
//! fails validation is refused and logged with file, line and key; the old one keeps
//! serving. Listeners and thread counts cannot change in a running process: a reload that
//! changes them says so and points to `-u`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use notify::{RecursiveMode, Watcher};
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use tokio::sync::mpsc;

use crate::config::Config;
use crate::error::ConfigError;

/// How long file events must settle before a reload (editors write in several steps).
const DEBOUNCE: Duration = Duration::from_millis(250);

/// The background service that reloads the config.
pub struct Reloader {
    current: Arc<ArcSwap<Config>>,
}

impl Reloader {
    pub fn new(current: Arc<ArcSwap<Config>>) -> Self {
        Reloader { current }
    }
}

/// The outcome of a successful reload.
#[derive(Debug)]
pub struct Reloaded {
    pub config: Arc<Config>,
    /// Settings that changed in the files but keep their old values until a restart or a
    /// `-u` upgrade: `listen`, `http2`, `threads`, `demo`, `admin`, and Pingora's settings
    /// but the local addresses of origin connections. (Certificates do change.)
    pub not_applied: Vec<String>,
    pub loaded: Vec<String>,
    pub unloaded: Vec<String>,
}

/// Reloads the config in `current` from its files. On success the new config is live and
/// returned, and the metrics of routes and services it no longer has are gone; on failure
/// nothing changes.
pub fn reload(current: &ArcSwap<Config>) -> Result<Reloaded, ConfigError> {
    let old = current.load_full();
    let new = read(&old)?;
    Ok(swap_in(current, old, new))
}

/// [`reload`], for files seen changing on disk: when their text is what is serving (a
/// file touched, or written again as it was), nothing is swapped, logged as reloaded or
/// counted, and `None` is returned.
pub fn reload_if_changed(current: &ArcSwap<Config>) -> Result<Option<Reloaded>, ConfigError> {
    let old = current.load_full();
    let new = read(&old)?;
    if new.version == old.version {
        log::debug!(
            "config files changed on disk, their text did not: still version {}",
            old.version
        );
        return Ok(None);
    }
    Ok(Some(swap_in(current, old, new)))
}

/// The config `old` was loaded from, read again and validated aside.
fn read(old: &Config) -> Result<Arc<Config>, ConfigError> {
    old.reload().map(Arc::new).map_err(|e| {
        log::error!(
            "config reload refused, still serving version {}: {e}",
            old.version
        );
        e
    })
}

/// Pingora's settings that a reload does apply: streamgate's own connect reads them.
const APPLIED_AT_RELOAD: [&str; 2] = ["client_bind_to_ipv4", "client_bind_to_ipv6"];

/// Makes `new` the live config in place of `old`.
fn swap_in(current: &ArcSwap<Config>, old: Arc<Config>, new: Arc<Config>) -> Reloaded {
    let mut not_applied: Vec<String> = [
        ("listen", new.listeners != old.listeners),
        ("http2", new.http2 != old.http2),
        ("demo", new.demo != old.demo),
        ("admin", new.admin != old.admin),
    ]
    .into_iter()
    .filter(|(_, changed)| *changed)
    .map(|(key, _)| key.to_string())
    .collect();
    // Pingora reads its settings once, as the server starts.
    not_applied.extend(
        new.pingora
            .iter()
            .filter(|(key, value)| old.pingora.get(*key) != Some(*value))
            .filter_map(|(key, _)| key.as_str())
            .filter(|key| !APPLIED_AT_RELOAD.contains(key))
            .map(str::to_string),
    );
    if !not_applied.is_empty() {
        log::warn!(
            "config reload: [{}] cannot change in a running process; they stay as they were \
             until a restart or a `streamgate -u` upgrade",
            not_applied.join(", ")
        );
    }
    let enabled = |c: &Config| -> BTreeSet<String> {
        c.middlewares
            .values()
            .filter(|i| i.enabled)
            .map(|i| i.name.clone())
            .collect()
    };
    let (before, after) = (enabled(&old), enabled(&new));
    let loaded: Vec<_> = after.difference(&before).cloned().collect();
    let unloaded: Vec<_> = before.difference(&after).cloned().collect();
    current.store(new.clone());
    let metrics = &new.state.metrics;
    metrics.config_loaded(&new.version, new.loaded_secs());
    let (routes, services, affinity) = new.metric_labels();
    metrics.retain(&routes, &services, &affinity);
    for warning in new.warnings() {
        log::warn!("{warning}");
    }
    log::info!(
        "config reloaded: version {} (was {}), loaded at {}s since epoch; \
         middlewares loaded: [{}], unloaded: [{}]",
        new.version,
        old.version,
        new.loaded_at
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs(),
        loaded.join(", "),
        unloaded.join(", ")
    );
    Reloaded {
        config: new,
        not_applied,
        loaded,
        unloaded,
    }
}

/// Directories to watch for `config`: where its files are (those on disk: a config given
/// as text names a file that is not), and where its include globs could add new ones.
fn watch_dirs(config: &Config) -> BTreeSet<PathBuf> {
    let files = config.files.iter().filter_map(|f| {
        if f.is_dir() {
            Some(f.as_path())
        } else if f.is_file() {
            f.parent()
        } else {
            None
        }
    });
    let roots = config.include_roots.iter().map(|r| {
        if r.is_dir() {
            r.as_path()
        } else {
            r.parent().unwrap_or(r)
        }
    });
    files
        .chain(roots)
        .map(|d| {
            if d.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                d.to_path_buf()
            }
        })
        .filter(|d| d.is_dir())
        .collect()
}

fn is_config_file(path: &Path, files: &[PathBuf]) -> bool {
    files
        .iter()
        .any(|f| f == path || f.file_name() == path.file_name())
        || path.extension().is_some_and(|e| e == "yaml" || e == "yml")
}

/// Starts a watcher that sends a unit on `tx` for every change to a config file.
fn watch(config: &Config, tx: mpsc::UnboundedSender<()>) -> Option<notify::RecommendedWatcher> {
    if config.source == Path::new(crate::config::EMBEDDED_NAME) {
        return None;
    }
    let dirs = watch_dirs(config);
    if dirs.is_empty() {
        // Nothing on disk to follow (a config given as a string): no watcher, no inotify
        // instance (a user has 128 of them).
        return None;
    }
    let files = config.files.clone();
    let handler = move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event {
            let relevant = !matches!(event.kind, notify::EventKind::Access(_))
                && event.paths.iter().any(|p| is_config_file(p, &files));
            if relevant {
                let _ = tx.send(());
            }
        }
    };
    let mut watcher = match notify::recommended_watcher(handler) {
        Ok(w) => w,
        Err(e) => {
            log::warn!("cannot watch the config files ({e}); reload with SIGHUP");
            return None;
        }
    };
    for dir in dirs {
        if let Err(e) = watcher.watch(&dir, RecursiveMode::NonRecursive) {
            log::warn!("cannot watch {} ({e}); reload with SIGHUP", dir.display());
        }
    }
    Some(watcher)
}

#[async_trait]
impl BackgroundService for Reloader {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        {
            Ok(s) => Some(s),
            Err(e) => {
                log::warn!("cannot listen for SIGHUP ({e}); reload by changing the files");
                None
            }
        };
        let (tx, mut changes) = mpsc::unbounded_channel();
        let mut watcher = watch(&self.current.load(), tx.clone());
        log::info!(
            "config version {} serving (watching {} file(s))",
            self.current.load().version,
            self.current.load().files.len()
        );
        loop {
            let hup = async {
                match hangup.as_mut() {
                    Some(h) => h.recv().await,
                    None => std::future::pending().await,
                }
            };
            let reloaded = tokio::select! {
                _ = shutdown.changed() => return,
                _ = hup => {
                    log::info!("SIGHUP: reloading the config");
                    reload(&self.current).ok()
                }
                Some(()) = changes.recv() => {
                    tokio::time::sleep(DEBOUNCE).await;
                    while changes.try_recv().is_ok() {}
                    reload_if_changed(&self.current).ok().flatten()
                }
            };
            if let Some(done) = reloaded {
                // The set of files (and so of directories) may have changed.
                drop(watcher.take());
                watcher = watch(&done.config, tx.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A config given as text follows nothing on disk, so it takes no watcher (inotify
    /// instances are few: 128 a user by default); one loaded from a file follows the
    /// file's directory.
    #[test]
    fn only_files_on_disk_are_watched() {
        let text = "services: {}\n";
        let given =
            Config::from_text(Path::new("not-on-disk.yaml"), text, Path::new(".")).expect("loads");
        assert!(watch_dirs(&given).is_empty());
        let (tx, _rx) = mpsc::unbounded_channel();
        assert!(watch(&given, tx).is_none());

        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("streamgate.yaml");
        std::fs::write(&file, text).expect("write");
        let loaded = Config::load(&file).expect("loads");
        assert_eq!(
            watch_dirs(&loaded),
            BTreeSet::from([dir.path().to_path_buf()])
        );
    }
}
