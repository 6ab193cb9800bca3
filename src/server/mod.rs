//! The server: [`build_server`] turns a validated config into a Pingora [`Server`] running
//! the proxy on every listener, the admin listener, the demo origin, and the background
//! services (config reloader, stream supervisor, endpoint upkeep, the exit once a shutdown
//! has nothing left to serve).

pub mod accept;
pub mod admission;
pub mod carrying;
pub mod exit;
pub mod listeners;
pub mod memory;

use std::sync::Arc;

use arc_swap::ArcSwap;
use pingora_core::server::configuration::Opt;
use pingora_core::server::Server;
use pingora_core::services::background::background_service;

use crate::config::Config;
use crate::sse::supervisor::Supervisor;
use crate::upstream::registry::Upkeep;
use crate::{admin, demo, reload};
use listeners::Listening;

/// Builds the Pingora server for `config`. `opt` carries Pingora's command-line flags
/// (`-d`, `-u`); its config path, if any, has already been read into `config`.
///
/// The proxy runs as one or more services that share the config (see [`listeners`]: TLS
/// and plain HTTP/1.1 listeners, h2c listeners, redirects to https). Besides them (and the
/// demo origin when configured), the server runs the reloader:
/// `SIGHUP` or a change to any config file swaps in the new config without a restart.
/// Everything shares the config's [`crate::state::State`].
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
    let state = config.state.clone();
    state
        .metrics
        .config_loaded(&config.version, config.loaded_secs());
    for warning in config.warnings() {
        log::warn!("{warning}");
    }
    let connections = config
        .listeners
        .iter()
        .map(|l| l.max_connections as u64)
        .fold(0, u64::saturating_add);
    let current = Arc::new(ArcSwap::from_pointee(config));
    server.add_services(listeners::services(
        &server.configuration,
        &current.load(),
        &current,
        &state,
    ));
    if let Some((admin, addr)) = admin::app(current.clone()) {
        server.add_service(Listening::new("admin", admin).plain(addr).owner(&[]));
    }
    server.add_service(background_service(
        "config reloader",
        reload::Reloader::new(current),
    ));
    server.add_service(background_service(
        "sse supervisor",
        Supervisor {
            tracker: state.tracker.clone(),
            drain: state.drain.clone(),
        },
    ));
    server.add_service(background_service(
        "endpoint upkeep",
        Upkeep {
            registry: state.endpoints.clone(),
        },
    ));
    server.add_service(background_service(
        "memory trim",
        memory::Trim {
            state: state.clone(),
            connections,
        },
    ));
    server.add_service(background_service(
        "exit when drained",
        exit::Exit {
            state: state.clone(),
        },
    ));

    if let Some(addr) = demo {
        server.add_service(
            Listening::new("demo origin", demo::origin())
                .plain(addr)
                .owner(&[]),
        );
    }
    server
}
