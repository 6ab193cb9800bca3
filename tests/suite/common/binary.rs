//! The real binary in tests: starting it, signalling it, waiting for it to serve and to
//! exit.

use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use super::{client, guard};

/// The `streamgate` binary this test build goes with.
pub const BIN: &str = env!("CARGO_BIN_EXE_streamgate");

/// Kills the child when the test ends, however it ends.
pub struct Running(pub Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The standard output of a run of the binary that must have succeeded (its standard
/// error is the failure's message otherwise).
pub fn succeeded(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Sends `sig` (`-TERM`, `-QUIT`, ...) to process `pid`.
pub fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

/// Waits until `url` answers with a success status.
pub async fn wait_listening(url: &str) {
    guard("the binary to serve", async {
        loop {
            if let Ok(r) = client().get(url).send().await {
                if r.status().is_success() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

/// Starts `bin -c config` (with `-u` for an upgrade), logging warnings only.
pub fn start_binary(config: &Path, upgrade: bool) -> Child {
    let mut cmd = Command::new(BIN);
    if upgrade {
        cmd.arg("-u");
    }
    cmd.arg("-c")
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn")
}

/// Waits for the child to exit by itself (at most the harness's guard).
pub async fn exited(child: &mut Child) -> ExitStatus {
    guard("the process to exit by itself", wait_exit(child)).await
}

/// Waits for the child to exit by itself, at most `limit`; returns how it exited and how
/// long after the call.
pub async fn exited_within(child: &mut Child, limit: Duration) -> (ExitStatus, Duration) {
    let began = Instant::now();
    match tokio::time::timeout(limit, wait_exit(child)).await {
        Ok(status) => (status, began.elapsed()),
        Err(_) => panic!("the process did not exit within {limit:?}"),
    }
}

async fn wait_exit(child: &mut Child) -> ExitStatus {
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
