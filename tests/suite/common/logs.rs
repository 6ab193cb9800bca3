//! The log of this test process, captured. `log` takes one logger per process, so the
//! first test that asks installs it and every later test shares it: a test picks its own
//! records, by its proxy's address or a path only it requests.

use std::sync::{Mutex, OnceLock};

/// One captured log record.
#[derive(Clone, Debug)]
pub struct Record {
    pub level: log::Level,
    pub target: String,
    pub text: String,
}

static RECORDS: OnceLock<Mutex<Vec<Record>>> = OnceLock::new();

struct Capture;

impl log::Log for Capture {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::Level::Info
    }

    fn log(&self, record: &log::Record<'_>) {
        if let Some(records) = RECORDS.get() {
            if let Ok(mut records) = records.lock() {
                records.push(Record {
                    level: record.level(),
                    target: record.target().to_string(),
                    text: record.args().to_string(),
                });
            }
        }
    }

    fn flush(&self) {}
}

/// Captures every record at `info` and above from now on (once per process).
pub fn capture() {
    if RECORDS.set(Mutex::new(Vec::new())).is_ok() {
        assert!(
            log::set_boxed_logger(Box::new(Capture)).is_ok(),
            "another logger came first (RUST_LOG set?): this test reads the log"
        );
        log::set_max_level(log::LevelFilter::Info);
    }
}

/// The records captured so far that `keep` selects, in order.
pub fn records(keep: impl Fn(&Record) -> bool) -> Vec<Record> {
    capture();
    let records = RECORDS.get().expect("capturing").lock().expect("records");
    records.iter().filter(|r| keep(r)).cloned().collect()
}
