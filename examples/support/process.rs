//! The release binary as the load tools run it: a child process killed when its guard
//! drops, and what `/proc` says of it (resident memory, open descriptors). Each tool uses
//! what it needs of it.

#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command, Stdio};

/// Kills the child when dropped, however the tool ends.
pub struct Process(pub Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `command` (the release binary, or a wrapper such as `taskset` around it, `binary`
/// naming it for the error) with `-c config`, logging at `rust_log` to `stderr`.
pub fn start(
    mut command: Command,
    binary: &str,
    config: &Path,
    rust_log: &str,
    stderr: Stdio,
) -> Result<Process, String> {
    command
        .arg("-c")
        .arg(config)
        .env("RUST_LOG", rust_log)
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .map(Process)
        .map_err(|e| format!("cannot start {binary} ({e}); run `cargo build --release` first"))
}

/// The resident memory of process `pid`, in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The descriptors process `pid` has open.
pub fn open_fds(pid: u32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}
