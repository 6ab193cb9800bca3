//! The floor streamgate stands on: a Pingora 0.9 proxy with no features at all (one
//! `upstream_peer` to one origin, nothing else), built with the same Pingora features and
//! measured beside streamgate, so the cost that is streamgate's own is known.
//!
//! ```text
//! cargo build --release --example floor
//! target/release/examples/floor --listen 127.0.0.1:18187 --upstream 127.0.0.1:18180 [--threads 2]
//!     [--work-stealing false]
//! ```
//!
//! Pingora's defaults otherwise (work stealing on), so `--work-stealing false` measures
//! the setting streamgate makes its default.
//!
//! It is what `bench/peers.sh` runs as `floor`, beside streamgate, nginx and HAProxy.

use std::net::SocketAddr;

use async_trait::async_trait;
use pingora_core::server::configuration::{Opt, ServerConf};
use pingora_core::server::Server;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::Result;
use pingora_proxy::{ProxyHttp, Session};

struct Floor {
    upstream: SocketAddr,
}

#[async_trait]
impl ProxyHttp for Floor {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(self.upstream, false, String::new())))
    }
}

fn main() {
    // Pingora's own errors (on stderr; `RUST_LOG` filters), as streamgate logs them.
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("error")).init();
    let mut listen = "127.0.0.1:18187".to_string();
    let mut upstream: SocketAddr = ([127, 0, 0, 1], 18180).into();
    let mut threads = 2;
    let mut work_stealing = true;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = args.next().unwrap_or_default();
        match arg.as_str() {
            "--listen" => listen = value,
            "--upstream" => match value.parse() {
                Ok(addr) => upstream = addr,
                Err(e) => {
                    eprintln!("--upstream {value}: {e}");
                    std::process::exit(2);
                }
            },
            "--threads" => threads = value.parse().unwrap_or(threads),
            "--work-stealing" => work_stealing = value != "false",
            other => {
                eprintln!("unknown argument {other}; see the module docs");
                std::process::exit(2);
            }
        }
    }
    let conf = ServerConf {
        threads,
        work_stealing,
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(0),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None::<Opt>, conf);
    server.bootstrap();
    let mut proxy = pingora_proxy::http_proxy_service(&server.configuration, Floor { upstream });
    proxy.add_tcp(&listen);
    server.add_service(proxy);
    server.run_forever();
}
