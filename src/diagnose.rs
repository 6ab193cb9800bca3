//! `streamgate connections`, `streamgate upstreams` and `streamgate health`: fault
//! diagnosis and health checks from the command line. They ask a running instance's admin
//! API; the first two print readable tables, `health` exits 0 when the instance answers
//! `/healthz` (or `/readyz` with `--ready`) with 200 and 1 otherwise (a container
//! `HEALTHCHECK` needs no curl in the image).
//!
//! ```text
//! streamgate connections [-c FILE | --admin HOST:PORT] [--token T] [--route R]
//!                        [--service S] [--client IP] [--min-age 30s]
//! streamgate upstreams   [-c FILE | --admin HOST:PORT] [--token T]
//! streamgate health      [-c FILE | --admin HOST:PORT] [--token T] [--ready]
//! ```
//!
//! The admin address comes from `--admin`, else from the config file's `admin.listen`
//! (`-c`), else 127.0.0.1:9901 (an unspecified address such as 0.0.0.0 is asked on
//! loopback); the token from `--token`, the config, or `STREAMGATE_ADMIN_TOKEN`.
//!
//! [`invocation`] reads the whole command line: a subcommand may come after `-c FILE`
//! (a container's `ENTRYPOINT` names the config, `docker run IMAGE health` adds the rest),
//! and when `-c` is given more than once the last one counts.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use serde_json::Value;

use crate::config::Config;

/// The subcommands.
pub const COMMANDS: &[&str] = &["connections", "upstreams", "health"];

/// What a command line asks for, with `-c` given once at most.
#[derive(Debug, PartialEq, Eq)]
pub enum Invocation {
    /// A subcommand: its arguments, the subcommand first.
    Diagnose(Vec<String>),
    /// Serving (or `-t`): the arguments for Pingora's parser, the program name first.
    Serve(Vec<String>),
}

/// Reads `args` (without the program name): the last `-c FILE` / `--conf FILE` /
/// `--conf=FILE` wins, and a subcommand is recognised after them.
pub fn invocation(args: Vec<String>) -> Invocation {
    let mut conf: Option<String> = None;
    let mut rest = Vec::new();
    let mut it = args.into_iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "-c" | "--conf" => match it.next() {
                Some(value) => conf = Some(value),
                // Left for the parser to complain about.
                None => rest.push(arg),
            },
            _ => match arg.strip_prefix("--conf=") {
                Some(value) => conf = Some(value.to_string()),
                None => rest.push(arg),
            },
        }
    }
    let conf = conf.map(|c| vec!["-c".to_string(), c]).unwrap_or_default();
    match rest.first() {
        Some(command) if COMMANDS.contains(&command.as_str()) => {
            let mut out = vec![rest.remove(0)];
            out.extend(conf);
            out.extend(rest);
            Invocation::Diagnose(out)
        }
        _ => {
            let mut out = vec!["streamgate".to_string()];
            out.extend(conf);
            out.extend(rest);
            Invocation::Serve(out)
        }
    }
}

const DEFAULT_ADMIN: &str = "127.0.0.1:9901";

struct Target {
    addr: SocketAddr,
    token: Option<String>,
}

/// Runs a subcommand; `args` are the arguments after the binary name.
pub fn run(args: &[String]) -> ExitCode {
    match run_inner(args) {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("streamgate: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_inner(args: &[String]) -> Result<String, String> {
    let (command, rest) = args.split_first().ok_or("no subcommand")?;
    let mut admin: Option<String> = None;
    let mut config: Option<String> = None;
    let mut token = std::env::var("STREAMGATE_ADMIN_TOKEN").ok();
    let mut query: Vec<String> = Vec::new();
    let mut ready = false;
    let mut it = rest.iter();
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--admin" => admin = Some(value()?),
            "-c" | "--conf" => config = Some(value()?),
            "--token" => token = Some(value()?),
            "--route" if command == "connections" => query.push(format!("route={}", value()?)),
            "--service" if command == "connections" => query.push(format!("service={}", value()?)),
            "--client" if command == "connections" => query.push(format!("client={}", value()?)),
            "--min-age" if command == "connections" => query.push(format!("min_age={}", value()?)),
            "--ready" if command == "health" => ready = true,
            other => return Err(format!("{command}: unknown flag {other}")),
        }
    }
    let target = target(admin, config, token)?;
    match command.as_str() {
        "connections" => {
            query.push("limit=1000".into());
            let body = get(&target, &format!("/sse/connections?{}", query.join("&")))?;
            Ok(connections_table(&body))
        }
        "upstreams" => Ok(upstreams_table(&get(&target, "/upstreams")?)),
        "health" => {
            let path = if ready { "/readyz" } else { "/healthz" };
            let body = get(&target, path)?;
            let version = body["version"]
                .as_str()
                .map(|v| format!(", config {v}"))
                .unwrap_or_default();
            Ok(format!(
                "streamgate at {}: {path} ok{version}\n",
                target.addr
            ))
        }
        other => Err(format!("unknown subcommand {other}")),
    }
}

fn target(
    admin: Option<String>,
    config: Option<String>,
    token: Option<String>,
) -> Result<Target, String> {
    let from_config = match &config {
        Some(path) => Config::load(Path::new(path))
            .map_err(|e| e.to_string())?
            .admin
            .ok_or_else(|| format!("{path} has no `admin:` block"))?
            .into(),
        None => None,
    };
    let addr = match (&admin, &from_config) {
        (Some(a), _) => a.clone(),
        (None, Some(c)) => c.listen.to_string(),
        (None, None) => DEFAULT_ADMIN.to_string(),
    };
    let mut addr = addr
        .to_socket_addrs()
        .map_err(|e| format!("admin address {addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("admin address {addr} resolves to nothing"))?;
    // A listener on every address is asked on loopback.
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr.ip() {
            IpAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
            IpAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
        });
    }
    Ok(Target {
        addr,
        token: token.or(from_config.and_then(|c| c.token)),
    })
}

/// A GET to the admin API, returning the parsed JSON body.
fn get(target: &Target, path: &str) -> Result<Value, String> {
    let timeout = Duration::from_secs(5);
    let mut stream = TcpStream::connect_timeout(&target.addr, timeout).map_err(|e| {
        format!(
            "cannot reach the admin API at {} ({e}); is `admin:` set in the config?",
            target.addr
        )
    })?;
    let _ = stream.set_read_timeout(Some(timeout));
    let auth = target
        .token
        .as_ref()
        .map(|t| format!("authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "GET {path} HTTP/1.1\r\nhost: {}\r\n{auth}connection: close\r\n\r\n",
        target.addr
    );
    stream
        .write_all(request.as_bytes())
        .map_err(|e| e.to_string())?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or("malformed admin answer")?;
    let status = head.split_whitespace().nth(1).unwrap_or("?");
    let json: Value = serde_json::from_str(body).map_err(|e| format!("admin answer: {e}"))?;
    if status != "200" {
        let reason = json["error"].as_str().unwrap_or("error");
        return Err(format!("admin API answered {status}: {reason}"));
    }
    Ok(json)
}

fn seconds(v: &Value) -> String {
    let s = v.as_f64().unwrap_or(0.0);
    if s >= 3600.0 {
        format!("{:.1}h", s / 3600.0)
    } else if s >= 60.0 {
        format!("{:.1}m", s / 60.0)
    } else {
        format!("{s:.1}s")
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// Lays rows out in columns as wide as their widest cell.
fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        padded.join("  ").trim_end().to_string() + "\n"
    };
    let mut out = line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        out.push_str(&line(row));
    }
    out
}

fn connections_table(body: &Value) -> String {
    let items = body["items"].as_array().cloned().unwrap_or_default();
    let rows = items
        .iter()
        .map(|e| {
            vec![
                text(&e["id"]),
                seconds(&e["age_seconds"]),
                seconds(&e["idle_seconds"]),
                text(&e["events"]),
                text(&e["bytes"]),
                text(&e["client"]),
                text(&e["route"]),
                text(&e["service"]),
                text(&e["path"]),
                text(&e["last_event_id"]),
            ]
        })
        .collect();
    let mut out = table(
        &[
            "ID", "AGE", "IDLE", "EVENTS", "BYTES", "CLIENT", "ROUTE", "SERVICE", "PATH", "LAST-ID",
        ],
        rows,
    );
    out.push_str(&format!(
        "{} open stream(s)\n",
        body["total"].as_u64().unwrap_or(0)
    ));
    out
}

/// The services, then each endpoint of each service.
fn upstreams_table(body: &Value) -> String {
    let items = body.as_array().cloned().unwrap_or_default();
    let rows = items
        .iter()
        .map(|s| {
            vec![
                text(&s["service"]),
                text(&s["url"]),
                text(&s["tracked_sse_streams"]),
                text(&s["sse_open_streams"]),
                text(&s["sse_max_connections"]),
                text(&s["affinity"]["source"]),
                text(&s["affinity"]["pins"]),
            ]
        })
        .collect();
    let mut out = table(
        &[
            "SERVICE", "URL", "TRACKED", "OPEN", "LIMIT", "AFFINITY", "PINS",
        ],
        rows,
    );
    let endpoints = items
        .iter()
        .flat_map(|s| {
            let service = text(&s["service"]);
            let pinned = !s["affinity"].is_null();
            s["endpoints"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(move |e| {
                    let up = e["healthy"].as_bool() == Some(true);
                    let state = match (up, e["ejected"].as_bool() == Some(true)) {
                        (_, true) => "ejected",
                        (true, false) => "up",
                        (false, false) => "down",
                    };
                    vec![
                        service.clone(),
                        text(&e["address"]),
                        state.to_string(),
                        text(&e["weight"]),
                        text(&e["open"]),
                        text(&e["requests"]),
                        if pinned { text(&e["pins"]) } else { "-".into() },
                    ]
                })
        })
        .collect();
    out.push('\n');
    out.push_str(&table(
        &[
            "SERVICE", "ENDPOINT", "STATE", "WEIGHT", "OPEN", "REQUESTS", "PINS",
        ],
        endpoints,
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align() {
        let out = table(
            &["A", "LONGER"],
            vec![
                vec!["wide cell".into(), "x".into()],
                vec!["y".into(), "z".into()],
            ],
        );
        assert_eq!(out, "A          LONGER\nwide cell  x\ny          z\n");
    }

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|a| a.to_string()).collect()
    }

    #[test]
    fn command_lines_as_a_container_builds_them() {
        let entry = ["-c", "/etc/streamgate/streamgate.yaml"];
        let with = |extra: &[&str]| invocation(strings(&[&entry[..], extra].concat()));
        assert_eq!(
            with(&[]),
            Invocation::Serve(strings(&[
                "streamgate",
                "-c",
                "/etc/streamgate/streamgate.yaml"
            ]))
        );
        assert_eq!(
            with(&["-t"]),
            Invocation::Serve(strings(&[
                "streamgate",
                "-c",
                "/etc/streamgate/streamgate.yaml",
                "-t"
            ]))
        );
        assert_eq!(
            with(&["-c", "/mine.yaml", "-t"]),
            Invocation::Serve(strings(&["streamgate", "-c", "/mine.yaml", "-t"])),
            "the last -c wins"
        );
        assert_eq!(
            with(&["--conf=/mine.yaml"]),
            Invocation::Serve(strings(&["streamgate", "-c", "/mine.yaml"]))
        );
        assert_eq!(
            with(&["health", "--ready"]),
            Invocation::Diagnose(strings(&[
                "health",
                "-c",
                "/etc/streamgate/streamgate.yaml",
                "--ready"
            ]))
        );
        assert_eq!(
            invocation(strings(&["upstreams", "--admin", "127.0.0.1:1"])),
            Invocation::Diagnose(strings(&["upstreams", "--admin", "127.0.0.1:1"]))
        );
        assert_eq!(
            invocation(strings(&["-t", "-c"])),
            Invocation::Serve(strings(&["streamgate", "-t", "-c"]))
        );
    }

    #[test]
    fn upstreams_show_pins_per_endpoint() {
        let body = serde_json::json!([{
            "service": "mcp",
            "url": "http://10.0.0.1:8080",
            "affinity": { "source": "header mcp-session-id", "pins": 3 },
            "endpoints": [
                { "address": "10.0.0.1:8080", "weight": 1, "healthy": true, "ejected": false,
                  "open": 2, "requests": 9, "pins": 2 },
                { "address": "10.0.0.2:8080", "weight": 1, "healthy": true, "ejected": true,
                  "open": 0, "requests": 4, "pins": 1 },
            ],
        }, {
            "service": "web", "url": "http://10.0.0.9", "affinity": null,
            "endpoints": [{ "address": "10.0.0.9:80", "weight": 1, "healthy": false,
                            "ejected": false, "open": 0, "requests": 0, "pins": 0 }],
        }]);
        let out = upstreams_table(&body);
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[1].ends_with("header mcp-session-id  3"), "{out}");
        let web: Vec<&str> = lines[2].split_whitespace().collect();
        assert_eq!(web[0], "web");
        assert_eq!(web[5..], ["-", "-"], "no affinity: {out}");
        let endpoint = |addr: &str| {
            lines
                .iter()
                .map(|l| l.split_whitespace().collect::<Vec<_>>())
                .find(|cells| cells.get(1) == Some(&addr))
                .expect("endpoint row")
        };
        assert_eq!(endpoint("10.0.0.1:8080")[2..], ["up", "1", "2", "9", "2"]);
        assert_eq!(
            endpoint("10.0.0.2:8080")[2..],
            ["ejected", "1", "0", "4", "1"]
        );
        assert_eq!(endpoint("10.0.0.9:80")[2..], ["down", "1", "0", "0", "-"]);
    }

    #[test]
    fn flags_are_checked() {
        let args: Vec<String> = ["upstreams", "--route", "x"].map(String::from).to_vec();
        assert!(run_inner(&args).is_err_and(|e| e.contains("unknown flag")));
    }
}
