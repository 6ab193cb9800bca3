//! The end-to-end suite: real proxies (`build_server` or the real binary) on real sockets,
//! against origins each test starts. One test binary, one module per subject, so that the
//! suite links once; `cargo nextest run` still runs each test in a process of its own, and
//! plain `cargo test` runs them side by side in one (every proxy has its own state).

mod common;

mod admin;
mod affinity;
mod architecture;
mod balancing;
mod cli;
mod connections;
mod dashboard;
mod discovery;
mod edges;
mod exits;
mod https_upstream;
mod lifecycle;
mod middleware;
mod paths;
mod preconnect;
mod properties;
mod proxy;
mod reload;
mod smuggling;
mod sse;
mod stale_connections;
mod streams;
mod tls;
