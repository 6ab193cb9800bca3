//! `streamgate [-c FILE] [-t] [-d] [-u]`: Pingora's standard flags. Without `-c` it serves
//! the embedded default config (a demo SSE origin behind 127.0.0.1:8080).
//!
//! `streamgate connections|upstreams [..]` ask a running instance's admin API instead.

use std::path::Path;
use std::process::ExitCode;

use pingora_core::server::configuration::Opt;
use streamgate::{build_server, Config};

fn main() -> ExitCode {
    streamgate::logging::init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args
        .first()
        .is_some_and(|a| streamgate::diagnose::COMMANDS.contains(&a.as_str()))
    {
        return streamgate::diagnose::run(&args);
    }
    let opt = Opt::parse_args();
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
    if opt.test {
        let files: Vec<String> = config
            .files
            .iter()
            .map(|f| f.display().to_string())
            .collect();
        println!("streamgate: configuration ok: {}", files.join(", "));
        print!("{}", config.describe());
        return ExitCode::SUCCESS;
    }
    build_server(config, Some(opt)).run_forever()
}
