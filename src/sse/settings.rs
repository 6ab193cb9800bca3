//! SSE settings: the `sse:` block as written (global, per service, and as the `sse`
//! middleware's config) and the effective settings a stream runs with, each key taken from
//! the most specific block that sets it.

use std::time::Duration;

use serde::Deserialize;

use crate::values::Dur;

/// Default `header_timeout`.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// Default `drain_period`.
pub const DEFAULT_DRAIN_PERIOD: Duration = Duration::from_secs(10);

/// Default `finish_period`.
pub const DEFAULT_FINISH_PERIOD: Duration = Duration::from_secs(300);

/// `sse:`, globally, per service, and as the `sse` middleware's config. Unset keys inherit.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SseFile {
    pub enabled: Option<bool>,
    pub flush_interval: Option<Dur>,
    /// Longest the origin may take to send the response headers of a stream.
    pub header_timeout: Option<Dur>,
    /// Longest silence from the origin between events.
    pub read_timeout: Option<Dur>,
    pub write_timeout: Option<Dur>,
    /// After this long a stream is ended at an event boundary with a `retry:` hint.
    pub max_lifetime: Option<Dur>,
    /// A tracked stream whose origin sent nothing for this long is closed by the cleanup
    /// task.
    pub inactive_threshold: Option<Dur>,
    /// When the origin has been silent this long, send the client a comment line.
    pub heartbeat_interval: Option<Dur>,
    /// What the client gets when the origin fails mid-stream.
    pub on_upstream_error: Option<OnUpstreamError>,
    /// On shutdown or upgrade, `GET` streams (which clients reopen with `Last-Event-ID`)
    /// are ended at random moments over this period.
    pub drain_period: Option<Dur>,
    /// On shutdown or upgrade, streams of other methods (answers their clients cannot ask
    /// for again) keep streaming until they end by themselves, for at most this long.
    pub finish_period: Option<Dur>,
    /// The origin honours `Last-Event-ID`: when it fails mid-stream, continue the client's
    /// stream from another origin connection.
    pub resume: Option<bool>,
    /// Most resumes of one stream within `resume_window`.
    pub resume_attempts: Option<u32>,
    pub resume_window: Option<Dur>,
    /// Register every stream (open, close, counters) and log its open and close.
    pub connection_tracking: Option<bool>,
    /// Most event streams open at once under this block.
    pub max_connections: Option<usize>,
    /// Most event streams one client address may have open at once under this block.
    pub max_connections_per_client: Option<usize>,
}

/// `on_upstream_error:` what a client sees when its origin dies mid-stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnUpstreamError {
    /// The stream just ends (HTTP/1.1: without its last chunk, so it reads as cut).
    #[default]
    End,
    /// A last `event: error` with a short JSON reason, then a clean end.
    Event,
}

/// Effective SSE settings of a service: its `sse:` block over the global one.
/// `None` durations mean no limit (written `0` in the config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SseSettings {
    /// When false, event streams are proxied like any other response.
    pub enabled: bool,
    /// Coalesce writes for at most this long; `None` flushes every chunk at once.
    pub flush_interval: Option<Duration>,
    /// Longest the origin may take to send a stream's response headers.
    pub header_timeout: Option<Duration>,
    /// `header_timeout` was written in some `sse` block (else it is the default).
    pub header_timeout_set: bool,
    /// Longest silence from the origin between events.
    pub read_timeout: Option<Duration>,
    /// Longest a write to the client may block.
    pub write_timeout: Option<Duration>,
    /// Streams older than this are ended at an event boundary with a `retry:` hint.
    pub max_lifetime: Option<Duration>,
    /// Tracked streams whose origin is silent this long are closed by the cleanup task.
    pub inactive_threshold: Option<Duration>,
    /// Origin silence after which the client gets a comment line; `None`: never.
    pub heartbeat_interval: Option<Duration>,
    /// What the client sees when the origin fails mid-stream.
    pub on_upstream_error: OnUpstreamError,
    /// On shutdown or upgrade, `GET` streams end at random moments spread over this period.
    pub drain_period: Duration,
    /// On shutdown or upgrade, streams of other methods may finish within this.
    pub finish_period: Duration,
    /// Continue a stream whose origin failed from another origin connection, with
    /// `Last-Event-ID`.
    pub resume: bool,
    /// Most resumes of one stream within `resume_window`.
    pub resume_attempts: u32,
    pub resume_window: Duration,
    /// Register each stream in the live registry and log its open and close.
    pub connection_tracking: bool,
    /// Most event streams open at once under this block; `None` for no limit.
    pub max_connections: Option<usize>,
    /// Most event streams one client address may have open at once under this block.
    pub max_connections_per_client: Option<usize>,
}

impl SseSettings {
    /// These settings with the keys set in `file` replaced.
    pub fn overlay(&self, file: &SseFile) -> SseSettings {
        SseSettings {
            enabled: file.enabled.unwrap_or(self.enabled),
            flush_interval: file
                .flush_interval
                .map_or(self.flush_interval, |d| d.limit()),
            header_timeout: file
                .header_timeout
                .map_or(self.header_timeout, |d| d.limit()),
            header_timeout_set: self.header_timeout_set || file.header_timeout.is_some(),
            read_timeout: file.read_timeout.map_or(self.read_timeout, |d| d.limit()),
            write_timeout: file.write_timeout.map_or(self.write_timeout, |d| d.limit()),
            max_lifetime: file.max_lifetime.map_or(self.max_lifetime, |d| d.limit()),
            inactive_threshold: file
                .inactive_threshold
                .map_or(self.inactive_threshold, |d| d.limit()),
            heartbeat_interval: file
                .heartbeat_interval
                .map_or(self.heartbeat_interval, |d| d.limit()),
            on_upstream_error: file.on_upstream_error.unwrap_or(self.on_upstream_error),
            drain_period: file.drain_period.map_or(self.drain_period, |d| d.0),
            finish_period: file.finish_period.map_or(self.finish_period, |d| d.0),
            resume: file.resume.unwrap_or(self.resume),
            resume_attempts: file.resume_attempts.unwrap_or(self.resume_attempts),
            resume_window: file.resume_window.map_or(self.resume_window, |d| d.0),
            connection_tracking: file.connection_tracking.unwrap_or(self.connection_tracking),
            max_connections: file.max_connections.or(self.max_connections),
            max_connections_per_client: file
                .max_connections_per_client
                .or(self.max_connections_per_client),
        }
    }
}

impl SseSettings {
    /// How long the origin may take to send the response head of a request whose service
    /// reads with `read` (its `timeouts.read`). A request that `announced` an event stream
    /// (its `Accept`) waits `header_timeout`. Any other waits its service's read timeout,
    /// as any proxied request does (a slow answer that is not a stream, an LLM completion
    /// asked for without streaming, has the time its service allows), and `header_timeout`
    /// as well when a config sets it (its answer may turn out to be a stream: LLM SDKs
    /// ask for streams with `Accept: application/json`).
    pub fn head_limit(&self, announced: bool, read: Option<Duration>) -> Option<Duration> {
        if !self.enabled {
            return read;
        }
        match (announced, self.header_timeout) {
            (true, limit) => limit,
            (false, Some(limit)) if self.header_timeout_set => {
                Some(read.map_or(limit, |r| r.min(limit)))
            }
            (false, _) => read,
        }
    }
}

/// One line for `streamgate -t`: what each stream of a service gets.
impl std::fmt::Display for SseSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if !self.enabled {
            return f.write_str("off (event streams proxied like any response)");
        }
        let time = |d: Option<Duration>| match d {
            Some(d) => humantime::format_duration(d).to_string(),
            None => "none".to_string(),
        };
        write!(
            f,
            "header_timeout {}, read_timeout {}, heartbeat {}, max_lifetime {}, \
             inactive_threshold {}, drain {}, finish {}, on_upstream_error {}, tracking {}",
            time(self.header_timeout),
            time(self.read_timeout),
            time(self.heartbeat_interval),
            time(self.max_lifetime),
            time(self.inactive_threshold),
            humantime::format_duration(self.drain_period),
            humantime::format_duration(self.finish_period),
            match self.on_upstream_error {
                OnUpstreamError::End => "end",
                OnUpstreamError::Event => "event",
            },
            if self.connection_tracking {
                "on"
            } else {
                "off"
            },
        )?;
        if self.resume {
            write!(
                f,
                ", resume (at most {} per {})",
                self.resume_attempts,
                humantime::format_duration(self.resume_window)
            )?;
        }
        if let Some(max) = self.max_connections {
            write!(f, ", max_connections {max}")?;
        }
        if let Some(max) = self.max_connections_per_client {
            write!(f, ", max_connections_per_client {max}")?;
        }
        Ok(())
    }
}

impl Default for SseSettings {
    fn default() -> Self {
        SseSettings {
            enabled: true,
            flush_interval: None,
            header_timeout: Some(DEFAULT_HEADER_TIMEOUT),
            header_timeout_set: false,
            read_timeout: None,
            write_timeout: None,
            max_lifetime: None,
            inactive_threshold: None,
            heartbeat_interval: None,
            on_upstream_error: OnUpstreamError::End,
            drain_period: DEFAULT_DRAIN_PERIOD,
            finish_period: DEFAULT_FINISH_PERIOD,
            resume: false,
            resume_attempts: 3,
            resume_window: Duration::from_secs(60),
            connection_tracking: false,
            max_connections: None,
            max_connections_per_client: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_head_of_a_request_waits_as_its_kind_and_the_config_say() {
        let secs = Duration::from_secs;
        let default = SseSettings::default();
        // A stream asked for: header_timeout (30 s by default), whatever the read timeout.
        assert_eq!(default.head_limit(true, Some(secs(120))), Some(secs(30)));
        // Anything else: the service's read timeout, longer or shorter than 30 s.
        assert_eq!(default.head_limit(false, Some(secs(120))), Some(secs(120)));
        assert_eq!(default.head_limit(false, Some(secs(5))), Some(secs(5)));
        assert_eq!(default.head_limit(false, None), None);
        // header_timeout written in a config applies to every request.
        let set = default.overlay(&SseFile {
            header_timeout: Some(Dur(secs(10))),
            ..SseFile::default()
        });
        assert_eq!(set.head_limit(false, Some(secs(120))), Some(secs(10)));
        assert_eq!(set.head_limit(false, Some(secs(5))), Some(secs(5)));
        assert_eq!(set.head_limit(false, None), Some(secs(10)));
        // Set in an outer block, inherited by an inner one that sets other keys.
        let inner = set.overlay(&SseFile {
            read_timeout: Some(Dur(secs(1))),
            ..SseFile::default()
        });
        assert_eq!(inner.head_limit(false, Some(secs(120))), Some(secs(10)));
        // header_timeout: 0 lifts it: the read timeout alone.
        let off = default.overlay(&SseFile {
            header_timeout: Some(Dur(Duration::ZERO)),
            ..SseFile::default()
        });
        assert_eq!(off.head_limit(true, Some(secs(120))), None);
        assert_eq!(off.head_limit(false, Some(secs(120))), Some(secs(120)));
        // Event streams proxied like any response: the read timeout.
        let disabled = default.overlay(&SseFile {
            enabled: Some(false),
            ..SseFile::default()
        });
        assert_eq!(disabled.head_limit(true, Some(secs(120))), Some(secs(120)));
    }
}
