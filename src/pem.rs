//! Certificate and key files (PEM), read and checked when the config loads: a chain and
//! its private key, checked to belong together, and when a certificate expires. What a
//! TLS listener serves (`listen::certs`) and what the proxy presents to an origin that
//! asks for a client certificate (`upstream::origin_tls`) are read here.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::{CertifiedKey, SigningKey};
use x509_parser::extensions::GeneralName;

/// Which file of a pair is at fault.
#[derive(Debug)]
pub enum PairError {
    Cert(String),
    Key(String),
}

/// A certificate chain and its private key as read from their PEM files, checked to
/// belong together.
pub struct PemPair {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub signer: Arc<dyn SigningKey>,
    /// The leaf certificate's subject, as `CN=...`.
    pub subject: String,
    /// The DNS names and IP addresses the leaf certificate is valid for.
    pub names: Vec<String>,
    /// End of the leaf's validity, in seconds since the Unix epoch.
    pub not_after: i64,
}

/// Reads a PEM certificate chain and its PEM private key, and checks that the key belongs
/// to the certificate.
pub fn read_pair(cert_path: &Path, key_path: &Path) -> Result<PemPair, PairError> {
    let cert_name = cert_path.display();
    let key_name = key_path.display();
    let pem = std::fs::read(cert_path)
        .map_err(|e| PairError::Cert(format!("cannot read {cert_name}: {e}")))?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PairError::Cert(format!("{cert_name} is not a PEM certificate file: {e}")))?;
    let leaf = chain.first().ok_or_else(|| {
        PairError::Cert(format!(
            "{cert_name} holds no certificate (no `BEGIN CERTIFICATE` block)"
        ))
    })?;
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf).map_err(|e| {
        PairError::Cert(format!("{cert_name}: the certificate does not parse: {e}"))
    })?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(dns) => names.push(dns.to_ascii_lowercase()),
                GeneralName::IPAddress(ip) => names.push(ip_text(ip)),
                _ => {}
            }
        }
    }
    let subject = parsed.subject().to_string();
    let not_after = parsed.validity().not_after.timestamp();

    let pem = std::fs::read(key_path)
        .map_err(|e| PairError::Key(format!("cannot read {key_name}: {e}")))?;
    let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        PairError::Key(format!(
            "{key_name} holds no PEM private key (PKCS#8, PKCS#1 or SEC1): {e}"
        ))
    })?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| PairError::Key(format!("{key_name}: unsupported private key: {e}")))?;
    let certified = CertifiedKey::new(vec![leaf.clone()], signer.clone());
    if let Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) =
        certified.keys_match()
    {
        return Err(PairError::Key(format!(
            "{key_name} is not the private key of the certificate in {cert_name}"
        )));
    }
    Ok(PemPair {
        chain,
        key,
        signer,
        subject,
        names,
        not_after,
    })
}

/// `2027-01-01T00:00:00Z (in 400 days)`, or `(EXPIRED)`: when a certificate whose validity
/// ends at `not_after` (seconds since the Unix epoch) expires.
pub fn expiry(not_after: i64) -> String {
    let at = end_of_validity(not_after);
    let date = humantime::format_rfc3339_seconds(at);
    match at.duration_since(SystemTime::now()) {
        Ok(left) => format!("{date} (in {} days)", left.as_secs() / 86_400),
        Err(_) => format!("{date} (EXPIRED)"),
    }
}

/// Whether a certificate whose validity ends at `not_after` has expired.
pub fn expired(not_after: i64) -> bool {
    end_of_validity(not_after) < SystemTime::now()
}

fn end_of_validity(not_after: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(not_after.max(0).unsigned_abs())
}

fn ip_text(octets: &[u8]) -> String {
    match octets.len() {
        4 => {
            let v4: [u8; 4] = octets.try_into().unwrap_or_default();
            std::net::Ipv4Addr::from(v4).to_string()
        }
        16 => {
            let v6: [u8; 16] = octets.try_into().unwrap_or_default();
            std::net::Ipv6Addr::from(v6).to_string()
        }
        _ => String::new(),
    }
}
