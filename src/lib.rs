//! streamgate: an edge reverse proxy on Pingora whose first-class feature is Server-Sent
//! Events.
//!
//! [`build_server`] turns a validated [`Config`] into a Pingora [`Server`] with the proxy
//! service (and the demo origin when the config asks for it). `main.rs` and the
//! end-to-end tests both start the proxy through it.

pub mod access_log;
pub mod admin;
pub mod config;
pub mod demo;
pub mod diagnose;
pub mod discovery;
pub mod endpoints;
pub mod error;
pub mod http_util;
pub mod listeners;
pub mod logging;
pub mod metrics;
pub mod middleware;
pub mod origin_tls;
pub mod proxy;
pub mod reload;
pub mod routing;
pub mod sse;
pub mod tls;
pub mod upstream;

use std::sync::Arc;

use arc_swap::ArcSwap;
use pingora_core::server::configuration::Opt;
use pingora_core::server::Server;
use pingora_core::services::background::background_service;

pub use config::Config;
pub use proxy::StreamGate;

/// Builds the Pingora server for `config`. `opt` carries Pingora's command-line flags
/// (`-d`, `-u`); its config path, if any, has already been read into `config`.
///
/// The proxy runs as one or more services that share the config (see [`listeners`]: TLS
/// and plain HTTP/1.1 listeners, h2c listeners, redirects to https). Besides them (and the
/// demo origin when configured), the server runs the reloader:
/// `SIGHUP` or a change to any config file swaps in the new config without a restart.
pub fn build_server(mut config: Config, opt: Option<Opt>) -> Server {
    let opt = opt.map(|mut opt| {
        opt.conf = None;
        opt
    });
    // Pingora takes its own settings; the rest of the config is served and reloaded.
    let server_conf = std::mem::take(&mut config.server);
    let mut server = Server::new_with_opt_and_conf(opt, server_conf);
    server.bootstrap();

    let demo = config.demo;
    metrics::config_loaded(&config.version, config.loaded_secs());
    let current = Arc::new(ArcSwap::from_pointee(config));
    server.add_services(listeners::services(
        &server.configuration,
        &current.load(),
        &current,
    ));
    if let Some(admin) = admin::service(current.clone()) {
        server.add_service(admin);
    }
    server.add_service(background_service(
        "config reloader",
        reload::Reloader::new(current),
    ));
    server.add_service(background_service(
        "sse supervisor",
        sse::supervisor::Supervisor,
    ));
    server.add_service(background_service("endpoint upkeep", endpoints::Upkeep));

    if let Some(addr) = demo {
        server.add_service(demo::service(&addr.to_string()));
    }
    server
}
