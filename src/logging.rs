//! The process's logger: env_logger for everything, except that access log lines (target
//! `streamgate::access`) take a short path.
//!
//! `RUST_LOG` filters both as usual. env_logger formats every record through its styling
//! layer (which scans each line for colour escapes even when it writes none), about 10,000
//! instructions a line; that is most of the cost of an access log line, written once per
//! request. Access lines already carry their own time, so they are written as they are: one
//! `write` to stderr from a reused per-thread buffer.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::io::Write as _;

use log::{Log, Metadata, Record};

use crate::access_log::TARGET;

struct Logger {
    inner: env_logger::Logger,
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        self.inner.enabled(metadata)
    }

    fn log(&self, record: &Record<'_>) {
        if record.target() != TARGET {
            self.inner.log(record);
            return;
        }
        if !self.inner.matches(record) {
            return;
        }
        thread_local! {
            static LINE: RefCell<String> = RefCell::new(String::with_capacity(512));
        }
        LINE.with(|line| {
            let mut line = line.borrow_mut();
            line.clear();
            let _ = writeln!(line, "{}", record.args());
            let _ = std::io::stderr().write_all(line.as_bytes());
        });
    }

    fn flush(&self) {
        self.inner.flush();
    }
}

/// Installs the logger; `info` unless `RUST_LOG` says otherwise.
pub fn init() {
    let inner =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).build();
    let max = inner.filter();
    if log::set_boxed_logger(Box::new(Logger { inner })).is_ok() {
        log::set_max_level(max);
    }
}
