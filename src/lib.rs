//! streamgate: an edge reverse proxy on Pingora whose first-class feature is Server-Sent
//! Events.
//!
//! [`build_server`] turns a validated [`Config`] into a Pingora server with the proxy
//! service (and the demo origin when the config asks for it). `main.rs` and the
//! end-to-end tests both start the proxy through it.
//!
//! Modules, from the bottom up (a module imports only modules of lower layers, or of its
//! own layer without a cycle; `tests/suite/architecture.rs` checks it):
//!
//! ```text
//! values error http_util net pattern    leaf types and helpers; certificate files
//! pem yaml
//! sse                                    event-stream rules, scanner, limits, tracker, drain
//! metrics access_log logging             Prometheus families; the access log and logger
//! upstream                               services, endpoints, balancing, health, discovery
//! middleware                             the chain's trait, context and types
//! routing listen                         the route table; listeners and certificates
//! state                                  what a server instance owns across reloads
//! config                                 files -> validated runtime model
//! relay                                  the request context, headers, the stream pipeline,
//!                                        the loop of our own
//! proxy                                  the ProxyHttp impl and the answers it writes
//! server admin reload diagnose demo      the server around the proxy
//! ```

pub mod access_log;
pub mod admin;
pub mod config;
pub mod demo;
pub mod diagnose;
pub mod error;
pub mod http_util;
pub mod listen;
pub mod logging;
pub mod metrics;
pub mod middleware;
pub mod net;
pub mod pattern;
pub mod pem;
pub mod proxy;
pub mod relay;
pub mod reload;
pub mod routing;
pub mod server;
pub mod sse;
pub mod state;
pub mod upstream;
pub mod values;
pub mod yaml;

pub use config::Config;
pub use proxy::StreamGate;
pub use server::build_server;
pub use state::State;
