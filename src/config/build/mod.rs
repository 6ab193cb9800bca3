//! Building each part of the runtime model from the files as written. Each function takes
//! the parsed files ([`Parts`], one per file, in the order of their [`Source`]s) and
//! locates its errors in the file that holds the key at fault.

mod listeners;
mod routes;
mod services;

use std::collections::BTreeMap;

use super::file::{HostRuleFile, MiddlewareFile, ServiceFile};
use crate::yaml::Source;

pub use listeners::{http2, listeners, Listeners};
pub use routes::{middlewares, routes};
pub use services::services;

/// One file's parts that merge across files.
pub struct Parts<'a> {
    pub services: &'a BTreeMap<String, ServiceFile>,
    pub host_rules: &'a [HostRuleFile],
    pub middleware_services: &'a [MiddlewareFile],
}

/// The directory paths in `sources[src]` are relative to: the main file's `base`, or an
/// included file's own directory.
fn dir_of<'a>(sources: &'a [Source], src: usize, base: &'a std::path::Path) -> &'a std::path::Path {
    match src {
        0 => base,
        _ => sources[src].file.parent().unwrap_or(base),
    }
}
