//! Small value types of the config vocabulary that modules at every level read. Nothing
//! here imports anything else of the crate, so any module may use it.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// A duration: a humantime string (`100ms`, `30s`, `1h`) or `0` for none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl Dur {
    /// `0` means no limit.
    pub fn limit(self) -> Option<Duration> {
        (!self.0.is_zero()).then_some(self.0)
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct DurVisitor;

        impl Visitor<'_> for DurVisitor {
            type Value = Dur;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration such as `100ms` or `30s`, or 0 for none")
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Dur, E> {
                if v == 0 {
                    Ok(Dur(Duration::ZERO))
                } else {
                    Err(E::custom(format!(
                        "a duration needs a unit: write `{v}s` or `{v}ms`, or 0 for none"
                    )))
                }
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Dur, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => Err(E::custom("a duration cannot be negative")),
                }
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Dur, E> {
                if v.trim() == "0" {
                    return Ok(Dur(Duration::ZERO));
                }
                humantime::parse_duration(v.trim())
                    .map(Dur)
                    .map_err(|e| E::custom(format!("invalid duration `{v}`: {e}")))
            }
        }

        d.deserialize_any(DurVisitor)
    }
}

/// `access_log.format`: how each access log line is written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessLogFormat {
    /// The Apache/nginx combined line with streamgate's fields appended.
    #[default]
    Combined,
    /// One JSON object per line.
    Json,
}
