//! Endpoint health: active checks (Pingora's `HttpHealthCheck` and `TcpHealthCheck`, run by
//! the upkeep task) and passive ejection after consecutive failures.
//!
//! ```yaml
//! health_check: { type: http, path: /healthz, interval: 5s, timeout: 1s,
//!                 healthy_threshold: 2, unhealthy_threshold: 3 }
//! passive_health: { failures: 3, cooldown: 10s }
//! ```

use std::sync::Arc;
use std::time::Duration;

use pingora_core::upstreams::peer::PeerOptions;
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_load_balancing::health_check::{HealthCheck, HttpHealthCheck, TcpHealthCheck};
use serde::Deserialize;

use super::connect::{LocalAddrs, TcpConnect};
use super::origin_tls::OriginTls;
use super::service::ServiceUrl;
use crate::values::Dur;

/// Passive health: `failures` consecutive failures eject an endpoint for `cooldown`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PassiveHealth {
    pub failures: u32,
    pub cooldown: Duration,
}

/// `health_check:` active checks of every endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckFile {
    #[serde(rename = "type", default)]
    pub kind: HealthCheckKind,
    /// Path of the HTTP check (default `/`).
    #[serde(default)]
    pub path: Option<String>,
    /// `Host` of the HTTP check (default: the service URL's host).
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub interval: Option<Dur>,
    #[serde(default)]
    pub timeout: Option<Dur>,
    /// Consecutive successes that bring a down endpoint back (default 2).
    #[serde(default)]
    pub healthy_threshold: Option<usize>,
    /// Consecutive failures that take an endpoint out (default 3).
    #[serde(default)]
    pub unhealthy_threshold: Option<usize>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthCheckKind {
    /// A `GET` of `path`; a 2xx or 3xx answer is healthy.
    #[default]
    Http,
    /// A TCP connect.
    Tcp,
}

/// `passive_health:` eject an endpoint after consecutive failures.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PassiveHealthFile {
    #[serde(default)]
    pub failures: Option<u32>,
    #[serde(default)]
    pub cooldown: Option<Dur>,
}

/// A setting of `health_check:` that cannot be used: the key and why.
pub type CheckError = (&'static str, String);

/// With local addresses set, a check connects through streamgate's connect, which binds
/// to them, instead of Pingora's, which a check's connector would make from none.
fn from_local(options: &mut PeerOptions, timeout: Duration, local: &Arc<LocalAddrs>) {
    if !local.is_empty() {
        options.custom_l4 = Some(Arc::new(TcpConnect {
            timeout: Some(timeout),
            local: local.clone(),
        }));
    }
}

impl HealthCheckFile {
    /// The active check this block asks for against `url` (over TLS with `tls`), and how
    /// often it runs.
    /// Checks connect from one of the `local` addresses, as the service's requests do.
    pub fn build(
        &self,
        url: &ServiceUrl,
        tls: Option<&OriginTls>,
        local: &Arc<LocalAddrs>,
    ) -> Result<(Box<dyn HealthCheck + Send + Sync>, Duration), CheckError> {
        let threshold = |value: Option<usize>, default: usize, key: &'static str| match value {
            Some(0) => Err((key, "at least 1".to_string())),
            v => Ok(v.unwrap_or(default)),
        };
        let healthy = threshold(self.healthy_threshold, 2, "healthy_threshold")?;
        let unhealthy = threshold(self.unhealthy_threshold, 3, "unhealthy_threshold")?;
        let timeout = self.timeout.map_or(Duration::from_secs(1), |d| d.0);
        let interval = match self.interval {
            Some(Dur(d)) if d.is_zero() => {
                return Err(("interval", "an interval above 0".to_string()))
            }
            Some(Dur(d)) => d,
            None => Duration::from_secs(5),
        };
        let check: Box<dyn HealthCheck + Send + Sync> = match self.kind {
            HealthCheckKind::Tcp => {
                let mut check = TcpHealthCheck::new();
                check.consecutive_success = healthy;
                check.consecutive_failure = unhealthy;
                check.peer_template.options.connection_timeout = Some(timeout);
                check.peer_template.options.total_connection_timeout = Some(timeout);
                from_local(&mut check.peer_template.options, timeout, local);
                check
            }
            HealthCheckKind::Http => {
                let host = self.host.clone().unwrap_or_else(|| url.authority());
                let target = self.path.as_deref().unwrap_or("/");
                let bad = |e: String| ("path", e);
                if !target.starts_with('/') {
                    return Err(bad(format!("`{target}` must start with /")));
                }
                let mut req = RequestHeader::build("GET", target.as_bytes(), None)
                    .map_err(|e| bad(e.to_string()))?;
                req.insert_header(http::header::HOST, host.as_str())
                    .map_err(|e| ("host", e.to_string()))?;
                req.insert_header(http::header::USER_AGENT, "streamgate-health-check")
                    .map_err(|e| bad(e.to_string()))?;
                let mut check = HttpHealthCheck::new(&host, tls.is_some());
                if let Some(tls) = tls {
                    check.peer_template.sni = tls.sni.clone();
                    tls.apply(&mut check.peer_template);
                }
                check.req = req;
                check.consecutive_success = healthy;
                check.consecutive_failure = unhealthy;
                check.peer_template.options.connection_timeout = Some(timeout);
                check.peer_template.options.total_connection_timeout = Some(timeout);
                check.peer_template.options.read_timeout = Some(timeout);
                from_local(&mut check.peer_template.options, timeout, local);
                check.validator = Some(Box::new(|resp: &ResponseHeader| {
                    let status = resp.status.as_u16();
                    if (200..400).contains(&status) {
                        Ok(())
                    } else {
                        pingora_error::Error::e_explain(
                            pingora_error::ErrorType::HTTPStatus(status),
                            format!("health check answered {status}"),
                        )
                    }
                }));
                Box::new(check)
            }
        };
        Ok((check, interval))
    }
}

impl PassiveHealthFile {
    /// The passive health this block asks for; the error names the key at fault.
    pub fn build(&self) -> Result<PassiveHealth, CheckError> {
        let failures = self.failures.unwrap_or(3);
        if failures == 0 {
            return Err(("failures", "at least 1".to_string()));
        }
        Ok(PassiveHealth {
            failures,
            cooldown: self.cooldown.map_or(Duration::from_secs(10), |d| d.0),
        })
    }
}
