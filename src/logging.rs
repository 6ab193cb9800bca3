//! The process's logger, env_logger, filtered by `RUST_LOG` as usual; the short path access
//! log lines take; and [`Throttle`], which bounds the lines a peer can cause.
//!
//! Lines are `[time LEVEL target] message`, env_logger's layout, written without colour
//! (env_logger's styling layer scanned every line for escape codes even when writing to a
//! file) and without its indenting of continuation lines: a record is formatted once into
//! the logger's buffer and written with one `write`. Access lines carry their own time and
//! are built whole by `access_log`, so [`access_line`] writes them as they are.

use std::io::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Instant;

/// The log target of access log lines (`streamgate::access`).
pub const TARGET: &str = "streamgate::access";

/// Whether [`init`] installed the logger (a test may have installed its own).
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// Installs the logger; `info` unless `RUST_LOG` says otherwise.
pub fn init() {
    let logger =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
            .format(|out, record| {
                writeln!(
                    out,
                    "[{} {:<5} {}] {}",
                    out.timestamp(),
                    record.level(),
                    record.target(),
                    record.args()
                )
            })
            .build();
    let max = logger.filter();
    if log::set_boxed_logger(Box::new(Logger(logger))).is_ok() {
        log::set_max_level(max);
        INSTALLED.store(true, Ordering::Release);
    }
}

/// env_logger, with Pingora's report of a race it recovers from logged at `debug`: taking a
/// pooled origin connection while the task that watched it idle, on another thread, has not
/// quite let go of it. Pingora then drops that connection and the request connects anew,
/// so nothing failed; but it says so at `error`. It needs the watcher and the request on
/// two threads at once: with Pingora's own layout for several single-threaded runtimes
/// (one pool for all, connections on random threads) it happened about once in 400-700
/// requests under keep-alive load here, Pingora without streamgate's code included. With a
/// copy of the proxy and its pool per thread (`server::listeners`) it cannot; with
/// `work_stealing: true` a stolen watcher still can, though none was seen in 8 s of load.
struct Logger(env_logger::Logger);

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        self.0.enabled(metadata)
    }

    fn log(&self, record: &log::Record<'_>) {
        if !is_pool_race(record) {
            return self.0.log(record);
        }
        let lowered = log::Record::builder()
            .args(*record.args())
            .level(log::Level::Debug)
            .target(record.target())
            .module_path(record.module_path())
            .file(record.file())
            .line(record.line())
            .build();
        if self.0.enabled(lowered.metadata()) {
            self.0.log(&lowered);
        }
    }

    fn flush(&self) {
        self.0.flush()
    }
}

/// Pingora's "failed to acquire reusable stream" (see [`Logger`]).
fn is_pool_race(record: &log::Record<'_>) -> bool {
    record.level() == log::Level::Error
        && record.target() == "pingora_core::connectors"
        && record.args().as_str() == Some("failed to acquire reusable stream")
}

/// Writes an access log `line` (ending in a newline): straight to stderr when [`init`]
/// installed the logger, else through `log` (whose logger gets the line without its
/// newline). The caller has asked `log_enabled!` for [`TARGET`], which applies
/// `RUST_LOG`'s filter.
pub fn access_line(line: &str) {
    if INSTALLED.load(Ordering::Acquire) {
        let _ = std::io::stderr().write_all(line.as_bytes());
    } else {
        log::info!(target: TARGET, "{}", line.trim_end_matches('\n'));
    }
}

/// Lets at most `per_second` lines through in each second and counts the rest, so that a
/// peer who can cause a line cannot flood the log, and the next line let through can say
/// how many were left out. Lock-free; two threads at a second's turn may let a line or two
/// more through.
#[derive(Debug)]
pub struct Throttle {
    per_second: u32,
    start: Instant,
    /// The second (since `start`) being counted.
    second: AtomicU64,
    /// Lines asked for in that second.
    asked: AtomicU32,
    /// Lines left out since the last one let through.
    left_out: AtomicU64,
}

impl Throttle {
    pub fn new(per_second: u32) -> Self {
        Throttle {
            per_second,
            start: Instant::now(),
            second: AtomicU64::new(0),
            asked: AtomicU32::new(0),
            left_out: AtomicU64::new(0),
        }
    }

    /// `Some(n)` when a line may be written now, `n` lines having been left out before it;
    /// `None` when this one is left out.
    pub fn admit(&self) -> Option<u64> {
        let now = self.start.elapsed().as_secs();
        let second = self.second.load(Ordering::Acquire);
        if now != second
            && self
                .second
                .compare_exchange(second, now, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            self.asked.store(0, Ordering::Release);
        }
        if self.asked.fetch_add(1, Ordering::AcqRel) < self.per_second {
            Some(self.left_out.swap(0, Ordering::AcqRel))
        } else {
            self.left_out.fetch_add(1, Ordering::AcqRel);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record<'a>(level: log::Level, target: &'a str, args: std::fmt::Arguments<'a>) -> bool {
        is_pool_race(
            &log::Record::builder()
                .level(level)
                .target(target)
                .args(args)
                .build(),
        )
    }

    #[test]
    fn only_pingoras_pool_race_is_lowered() {
        let connectors = "pingora_core::connectors";
        let race = format_args!("failed to acquire reusable stream");
        assert!(record(log::Level::Error, connectors, race));
        let other = format_args!("failed to connect");
        assert!(!record(log::Level::Error, connectors, other));
        let race = format_args!("failed to acquire reusable stream");
        assert!(!record(log::Level::Error, "streamgate::relay", race));
        let race = format_args!("failed to acquire reusable stream");
        assert!(!record(log::Level::Warn, connectors, race));
    }

    #[test]
    fn a_throttle_lets_through_its_rate_and_counts_the_rest() {
        let throttle = Throttle::new(3);
        let admitted: Vec<Option<u64>> = (0..5).map(|_| throttle.admit()).collect();
        assert_eq!(admitted, [Some(0), Some(0), Some(0), None, None]);
        // A new second: the next line says how many were left out.
        throttle.second.store(u64::MAX, Ordering::Release);
        assert_eq!(throttle.admit(), Some(2));
        assert_eq!(throttle.admit(), Some(0));
    }
}
