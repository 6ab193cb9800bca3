//! TLS from the proxy to origins: the settings of an `https` service (`services.<name>.tls`)
//! and how they reach Pingora's peer.
//!
//! Everything that can fail is done when the config loads: the `ca_file` bundle is read,
//! parsed and checked as a set of trust anchors, and `sni` must be a DNS name or an IP
//! address, so a request never meets a broken CA file. Per request, [`OriginTls::apply`]
//! only copies settings into the peer's options; Pingora's rustls connector does the
//! handshake and the verification.
//!
//! Decisions that follow from how Pingora 0.9's rustls connector reads a peer:
//!
//! - **SNI is never empty.** The connector skips certificate verification altogether when
//!   the peer's SNI is empty (nginx's behaviour), so an `https` service with an IP-literal
//!   host and no `sni` uses the IP as the server name: rustls then sends no SNI extension
//!   (SNI carries host names only) and verifies the certificate against the IP address in
//!   its subjectAltName.
//! - **A custom CA is per peer** (`PeerOptions::ca`): it replaces the system trust store for
//!   that service only. Pingora's connection pool does not key on the CA, so the peer's
//!   `group_key` is set from the bundle's contents: connections verified against one CA are
//!   never reused for a service that trusts another.
//! - **ALPN is `http/1.1` only.** The SSE relay (`proxy/relay.rs`) drives Pingora's HTTP/1
//!   client session; h2 to origins is not offered.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use pingora_core::protocols::tls::CaType;
use pingora_core::protocols::ALPN;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_core::utils::tls::WrappedX509;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use x509_parser::prelude::{FromDer, X509Certificate};

/// The TLS settings of an `https` service.
#[derive(Debug, Clone)]
pub struct OriginTls {
    /// Verify the certificate chain and that the certificate is valid for `sni`.
    pub verify: bool,
    /// The name sent as SNI and verified against the certificate; an IP address means no
    /// SNI extension and a certificate that must name that IP. Never empty.
    pub sni: String,
    /// The `ca_file` bundle; `None` trusts the system's store.
    pub ca: Option<CaBundle>,
}

/// A PEM bundle of trusted certificates, loaded and checked.
#[derive(Clone)]
pub struct CaBundle {
    pub path: PathBuf,
    certs: Arc<CaType>,
    /// A hash of the certificates: the peer's pool group.
    fingerprint: u64,
}

impl fmt::Debug for CaBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaBundle")
            .field("path", &self.path)
            .field("certificates", &self.certs.len())
            .finish()
    }
}

impl CaBundle {
    /// Reads `path` (PEM, one or more certificates). The error names the file.
    pub fn load(path: &Path) -> Result<CaBundle, String> {
        let name = path.display();
        let pem = std::fs::read(path).map_err(|e| format!("cannot read {name}: {e}"))?;
        let ders = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("{name} is not a PEM certificate file: {e}"))?;
        if ders.is_empty() {
            return Err(format!(
                "{name} holds no certificate (no `BEGIN CERTIFICATE` block)"
            ));
        }
        let mut anchors = rustls::RootCertStore::empty();
        let mut certs = Vec::with_capacity(ders.len());
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        for (i, der) in ders.into_iter().enumerate() {
            let n = i + 1;
            // Parsed here so that Pingora's connector never meets a certificate it cannot
            // parse (its own parser panics on one).
            let wrapped = WrappedX509::try_new(der.to_vec(), |raw| {
                X509Certificate::from_der(raw).map(|(_, cert)| cert)
            })
            .map_err(|e| format!("{name}: certificate {n} does not parse: {e}"))?;
            anchors
                .add(der.clone())
                .map_err(|e| format!("{name}: certificate {n} cannot be a trust anchor: {e}"))?;
            der.as_ref().hash(&mut hasher);
            certs.push(wrapped);
        }
        Ok(CaBundle {
            path: path.to_path_buf(),
            certs: Arc::from(certs.into_boxed_slice()),
            fingerprint: hasher.finish(),
        })
    }

    pub fn len(&self) -> usize {
        self.certs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.certs.is_empty()
    }
}

/// The environment variables that replace the platform's store of trusted certificates.
const TRUST_VARIABLES: [&str; 2] = ["SSL_CERT_FILE", "SSL_CERT_DIR"];

/// Loads the system's store of trusted certificates as each of Pingora's connectors loads
/// it when the server starts and the top-level `ca_file` is not set (the files
/// `SSL_CERT_FILE` and `SSL_CERT_DIR` name when set, else the platform's bundle); how many
/// certificates it holds. Pingora panics when it cannot load them, so the start (and
/// `-t`) loads them first and ends with this reason instead. A system without a store
/// loads none: https origins then need a `ca_file` (or `verify: false`).
pub fn system_trust() -> Result<usize, String> {
    let mut store = pingora_rustls::RootCertStore::empty();
    match pingora_rustls::load_platform_certs_incl_env_into_store(&mut store) {
        Ok(()) => Ok(store.len()),
        Err(e) => {
            let set: Vec<String> = TRUST_VARIABLES
                .iter()
                .filter_map(|var| Some(format!("{var}={}", std::env::var(var).ok()?)))
                .collect();
            let cause = e
                .cause
                .as_ref()
                .map_or_else(|| e.to_string(), |c| c.to_string());
            let (from, fix) = if set.is_empty() {
                (String::new(), "install a CA bundle")
            } else {
                (
                    format!(" ({})", set.join(", ")),
                    "point them at a CA bundle or unset them",
                )
            };
            Err(format!(
                "the system's trusted certificates{from} cannot be loaded: {cause}; {fix}"
            ))
        }
    }
}

/// Checks an `sni` value: a DNS name or an IP address, as rustls takes it.
pub fn check_sni(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("`sni` cannot be empty (leave it out to use the URL's host)".into());
    }
    ServerName::try_from(name)
        .map(|_| ())
        .map_err(|_| format!("`{name}` is neither a DNS name nor an IP address"))
}

impl OriginTls {
    /// Copies these settings into a peer made with `HttpPeer::new(addr, true, sni)`.
    pub fn apply(&self, peer: &mut HttpPeer) {
        let options = &mut peer.options;
        options.verify_cert = self.verify;
        options.verify_hostname = self.verify;
        options.alpn = ALPN::H1;
        if let Some(ca) = &self.ca {
            options.ca = Some(ca.certs.clone());
            peer.group_key = ca.fingerprint;
        }
    }
}

/// One line for `-t`: `verify, sni feed.internal, CA certs/ca.pem (1 certificate)`.
impl fmt::Display for OriginTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.verify {
            f.write_str("verify")?;
        } else {
            f.write_str("NO certificate verification")?;
        }
        if self.sni.parse::<std::net::IpAddr>().is_ok() {
            write!(f, ", no SNI (IP {})", self.sni)?;
        } else {
            write!(f, ", sni {}", self.sni)?;
        }
        match &self.ca {
            Some(ca) => write!(
                f,
                ", CA {} ({} certificate{})",
                ca.path.display(),
                ca.len(),
                if ca.len() == 1 { "" } else { "s" }
            ),
            None => f.write_str(", system CA store"),
        }
    }
}
