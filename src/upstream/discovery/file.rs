//! `file` discovery: a service's endpoints listed in a YAML file that something else
//! (a deploy tool, an operator) rewrites.
//!
//! Every `discover()` reads and parses the file again. A missing, empty or broken file is
//! an error naming the file (and the line, for a parse error); the caller keeps its last
//! good set. [`FileWatch`] says promptly when the file changed, so the caller need not wait
//! for its next `refresh` poll.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use notify::{RecursiveMode, Watcher};
use pingora::lb::discovery::ServiceDiscovery;
use pingora::lb::Backend;
use tokio::sync::mpsc;

use super::{discovery_error, EndpointList, EndpointsFile};

/// After a change, how long the file must stay quiet before [`FileWatch::changed`]
/// returns: writers that rewrite a file in place do it in several steps.
const SETTLE: Duration = Duration::from_millis(50);
/// The longest [`FileWatch::changed`] waits for the file to settle.
const MAX_SETTLE: Duration = Duration::from_millis(500);

/// Endpoints from a YAML file (see [`EndpointsFile`] for the format).
pub struct FileDiscovery {
    path: PathBuf,
}

impl FileDiscovery {
    /// The discovery for `file`, whose path is relative to `base` (the directory of the
    /// config file that names it). The file is not read here.
    pub fn new(file: &EndpointsFile, base: &Path) -> Self {
        FileDiscovery {
            path: base.join(&file.path),
        }
    }

    /// The endpoints file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads and parses the file now. `Err` is `file:line:column: key: reason` for a parse
    /// error, `file: reason` otherwise.
    pub async fn read(&self) -> Result<EndpointList, String> {
        let text = tokio::fs::read_to_string(&self.path).await.map_err(|e| {
            format!(
                "{}: cannot read the endpoints file: {e}",
                self.path.display()
            )
        })?;
        parse(&self.path, &text)
    }

    /// Starts watching the file: [`FileWatch::changed`] returns after each change. The
    /// directory is watched, not the file, so a file replaced by rename (as deploy tools
    /// do) or created later is seen. Fails when the directory cannot be watched.
    pub fn watch(&self) -> Result<FileWatch, String> {
        FileWatch::new(&self.path)
    }
}

#[async_trait]
impl ServiceDiscovery for FileDiscovery {
    /// Reads the file now. On `Err` (missing, unreadable, empty or broken file; the message
    /// names the file and, for a parse error, the line) the caller keeps the last good set.
    /// Every backend is reported enabled.
    async fn discover(&self) -> pingora_error::Result<(BTreeSet<Backend>, HashMap<u64, bool>)> {
        let endpoints = self.read().await.map_err(discovery_error)?;
        Ok((endpoints.backends(), HashMap::new()))
    }
}

/// Parses the text of an endpoints file: a YAML list of endpoints.
pub fn parse(path: &Path, text: &str) -> Result<EndpointList, String> {
    if text.trim().is_empty() {
        return Err(format!(
            "{}: the endpoints file is empty: list at least one endpoint",
            path.display()
        ));
    }
    crate::yaml::parse_yaml(path, text).map_err(|e| e.to_string())
}

/// A change signal for one file: a file-system watch on its directory and the channel it
/// reports to. Dropping it stops the watch.
pub struct FileWatch {
    _watcher: notify::RecommendedWatcher,
    events: mpsc::UnboundedReceiver<()>,
}

impl FileWatch {
    /// Watches `path` (through its directory, which must exist).
    pub fn new(path: &Path) -> Result<FileWatch, String> {
        let name = path
            .file_name()
            .ok_or_else(|| format!("{}: not a file name", path.display()))?
            .to_os_string();
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let (tx, events) = mpsc::unbounded_channel();
        let handler = move |event: notify::Result<notify::Event>| {
            let relevant = match event {
                Ok(event) => {
                    // An overflowed queue may have lost the event we wanted.
                    event.need_rescan()
                        || (!matches!(event.kind, notify::EventKind::Access(_))
                            && event
                                .paths
                                .iter()
                                .any(|p| p.file_name() == Some(name.as_os_str())))
                }
                Err(_) => true,
            };
            if relevant {
                let _ = tx.send(());
            }
        };
        let mut watcher = notify::recommended_watcher(handler)
            .map_err(|e| format!("{}: cannot watch for changes: {e}", path.display()))?;
        watcher
            .watch(&dir, RecursiveMode::NonRecursive)
            .map_err(|e| format!("{}: cannot watch for changes: {e}", dir.display()))?;
        Ok(FileWatch {
            _watcher: watcher,
            events,
        })
    }

    /// Waits until the file changed (created, written, renamed over, removed), then until
    /// it has been quiet for a moment (at most half a second), so the caller reads the
    /// finished file. Changes made before the call and not yet reported count. Returns
    /// `false` when the watch has stopped (no more changes will be reported).
    pub async fn changed(&mut self) -> bool {
        if self.events.recv().await.is_none() {
            return false;
        }
        let deadline = tokio::time::Instant::now() + MAX_SETTLE;
        loop {
            let quiet = tokio::time::Instant::now() + SETTLE;
            match tokio::time::timeout_at(quiet.min(deadline), self.events.recv()).await {
                Ok(Some(())) if tokio::time::Instant::now() < deadline => continue,
                // A change was seen; the next call reports that the watch stopped.
                _ => return true,
            }
        }
    }
}
