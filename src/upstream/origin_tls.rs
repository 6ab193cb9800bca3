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
//! - **A client certificate is per peer** (`HttpPeer::client_cert_key`, from `tls.client_cert`
//!   and `tls.client_key`): presented to an origin that asks for one (mutual TLS).
//!   Pingora's `CertKey` parses the chain with `expect` (made here, at load) and its
//!   connector converts the key with `unwrap` at each handshake, so every certificate of
//!   the chain is parsed first, the key read as Pingora will read it, and rustls' client
//!   configuration made from them once. The pool keys on the certificates' serials; the
//!   peer's `group_key` takes a hash of the certificates and key as well.
//! - **ALPN is `http/1.1` only.** The SSE relay (`proxy/relay.rs`) drives Pingora's HTTP/1
//!   client session; h2 to origins is not offered.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use pingora_core::protocols::tls::CaType;
use pingora_core::protocols::ALPN;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_core::utils::tls::{CertKey, WrappedX509};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::pem::{expiry, read_pair, PairError};

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
    /// The certificate presented to an origin that asks for one.
    pub client: Option<ClientCert>,
}

/// A client certificate (`tls.client_cert`, its chain after it) and its key
/// (`tls.client_key`), loaded and checked.
#[derive(Clone)]
pub struct ClientCert {
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    /// The leaf's subject (`CN=...`).
    pub subject: String,
    /// End of the leaf's validity, in seconds since the Unix epoch.
    pub not_after: i64,
    cert_key: Arc<CertKey>,
    /// A hash of the certificates and key: part of the peer's pool group.
    fingerprint: u64,
}

impl fmt::Debug for ClientCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientCert")
            .field("cert_path", &self.cert_path)
            .field("subject", &self.subject)
            .finish()
    }
}

impl ClientCert {
    /// Reads the PEM certificate chain at `cert` and the PEM key at `key` (see
    /// [`crate::pem::read_pair`]), and checks them as Pingora's connector will read them:
    /// every certificate parsed, the key's type told from its DER, and rustls' client
    /// configuration made from them (a leaf it cannot use fails every handshake).
    pub fn load(cert: &Path, key: &Path) -> Result<ClientCert, PairError> {
        let pair = read_pair(cert, key)?;
        let name = cert.display();
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        let mut ders = Vec::with_capacity(pair.chain.len());
        let chain = pair.chain;
        for (i, der) in chain.iter().enumerate() {
            parsed(der)
                .map_err(|e| PairError::Cert(format!("{name}: certificate {} {e}", i + 1)))?;
            der.as_ref().hash(&mut hasher);
            ders.push(der.to_vec());
        }
        // The key as Pingora's connector reads it at each handshake (its type told from
        // its DER, `unwrap`ped), and rustls' client configuration made from it.
        let secret = pair.key.secret_der().to_vec();
        let Ok(as_read) = PrivateKeyDer::try_from(secret.clone()) else {
            return Err(PairError::Key(format!(
                "{}: the key's type cannot be told from its DER encoding; write it as PKCS#8 \
                 (`BEGIN PRIVATE KEY`)",
                key.display()
            )));
        };
        let provider = rustls::crypto::ring::default_provider();
        if let Err(e) = rustls::sign::CertifiedKey::from_der(chain, as_read, &provider) {
            return Err(PairError::Cert(format!(
                "{name} cannot be presented with {}: {e}",
                key.display()
            )));
        }
        secret.hash(&mut hasher);
        Ok(ClientCert {
            cert_path: cert.to_path_buf(),
            key_path: key.to_path_buf(),
            subject: pair.subject,
            not_after: pair.not_after,
            cert_key: Arc::new(CertKey::new(ders, secret)),
            fingerprint: hasher.finish(),
        })
    }
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
            let wrapped = parsed(&der).map_err(|e| format!("{name}: certificate {n} {e}"))?;
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

/// A certificate parsed as Pingora's connector parses it: checked here, when the config
/// loads, because its own parser panics on one it cannot read.
fn parsed(der: &CertificateDer) -> Result<WrappedX509, String> {
    WrappedX509::try_new(der.to_vec(), |raw| {
        X509Certificate::from_der(raw).map(|(_, cert)| cert)
    })
    .map_err(|e| format!("does not parse: {e}"))
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
    /// A hash of what the handshake presents and trusts (verification, name, the CA's and
    /// the client certificate's contents): a health check made with other settings is made
    /// anew when a reload changes them, a renewed file included.
    pub fn identity(&self) -> u64 {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        (self.verify, &self.sni).hash(&mut hasher);
        self.ca.as_ref().map(|ca| ca.fingerprint).hash(&mut hasher);
        self.client
            .as_ref()
            .map(|c| c.fingerprint)
            .hash(&mut hasher);
        hasher.finish()
    }

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
        if let Some(client) = &self.client {
            peer.client_cert_key = Some(client.cert_key.clone());
            peer.group_key ^= client.fingerprint;
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
            )?,
            None => f.write_str(", system CA store")?,
        }
        if let Some(client) = &self.client {
            write!(
                f,
                ", client certificate {} ({}, expires {})",
                client.subject,
                client.cert_path.display(),
                expiry(client.not_after)
            )?;
        }
        Ok(())
    }
}
