//! streamgate: an edge reverse proxy on Pingora whose first-class feature is Server-Sent
//! Events.
//!
//! [`build_server`] turns a validated [`Config`] into a Pingora [`Server`] with the proxy
//! service (and the demo origin when the config asks for it). `main.rs` and the
//! end-to-end tests both start the proxy through it.

pub mod config;
pub mod demo;
pub mod error;
pub mod proxy;
pub mod routing;
pub mod sse;
pub mod upstream;

use pingora_core::server::configuration::Opt;
use pingora_core::server::Server;

pub use config::Config;
pub use proxy::StreamGate;

/// Builds the Pingora server for `config`. `opt` carries Pingora's command-line flags
/// (`-d`, `-u`); its config path, if any, has already been read into `config`.
pub fn build_server(config: Config, opt: Option<Opt>) -> Server {
    let opt = opt.map(|mut opt| {
        opt.conf = None;
        opt
    });
    let mut server = Server::new_with_opt_and_conf(opt, config.server);
    server.bootstrap();

    let mut proxy = pingora_proxy::http_proxy_service_with_name(
        &server.configuration,
        StreamGate::new(config.routes),
        "streamgate",
    );
    for addr in &config.listen {
        proxy.add_tcp(&addr.to_string());
    }
    server.add_service(proxy);

    if let Some(addr) = config.demo {
        server.add_service(demo::service(&addr.to_string()));
    }
    server
}
