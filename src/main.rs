//! `streamgate [-c FILE] [-t] [-d] [-u]`: Pingora's standard flags. Without `-c` it serves
//! the embedded default config (a demo SSE origin behind 127.0.0.1:8080).
//!
//! `streamgate connections|upstreams|health [..]` ask a running instance's admin API
//! instead. A subcommand may follow `-c FILE`, and the last `-c` counts (a container's
//! entrypoint names the default config; `docker run IMAGE -t` checks it).

use std::path::Path;
use std::process::ExitCode;

use pingora_core::server::configuration::Opt;
use streamgate::diagnose::{self, Invocation};
use streamgate::{build_server, Config};

fn main() -> ExitCode {
    streamgate::logging::init();
    let opt = match diagnose::invocation(std::env::args().skip(1).collect()) {
        Invocation::Diagnose(args) => return diagnose::run(&args),
        Invocation::Serve(args) => Opt::parse_from_args(args),
    };
    let loaded = match &opt.conf {
        Some(path) => Config::load(Path::new(path)),
        None => Config::embedded(),
    };
    let config = match loaded {
        Ok(config) => config,
        Err(e) => {
            eprintln!("streamgate: configuration error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let trust = match config.default_trust() {
        Ok(trust) => trust,
        Err(e) => {
            eprintln!("streamgate: {e}");
            return ExitCode::FAILURE;
        }
    };
    if opt.test {
        let files: Vec<String> = config
            .files
            .iter()
            .map(|f| f.display().to_string())
            .collect();
        println!("streamgate: configuration ok: {}", files.join(", "));
        print!("{}", config.describe());
        println!("https origins without a ca_file of their own trust {trust}");
        return ExitCode::SUCCESS;
    }
    build_server(config, Some(opt)).run_forever()
}
