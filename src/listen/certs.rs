//! TLS termination: certificates loaded and checked when the config loads, and how one is
//! chosen for a handshake.
//!
//! Each TLS listener's certificates ([`ListenerTls`]) are part of the config, so they are
//! read and validated with it: at start, by `streamgate -t`, and on every reload. A file
//! that does not parse or a key that does not match its certificate fails the whole
//! config, so a reload with a broken pair keeps the old certificates.
//!
//! Pingora fixes a listener's TLS settings when it starts; what it lets change later is the
//! certificate resolver's answer. The resolver (`server::listeners`) reads the live config
//! at each handshake and picks the certificate for the client's SNI name
//! ([`ListenerTls::select`]) from whatever was loaded last, so a renewed certificate is
//! served from the next handshake on, without a restart.
//!
//! `min_version: "1.3"`: Pingora's rustls acceptor always enables TLS 1.2 and 1.3, so the
//! floor is enforced in two steps. The resolver refuses a ClientHello that offers no TLS
//! 1.3 cipher suite (a client that cannot do 1.3; the handshake fails with an alert), and
//! [`below_min_version`] refuses requests on a connection that still negotiated 1.2.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use pingora_proxy::Session;
use rustls::server::ClientHello;
use rustls::sign::CertifiedKey;

use super::TlsVersion;
use crate::pattern::HostPattern;
use crate::pem::{self, PairError};

/// A certificate chain and its key, loaded and checked.
#[derive(Debug)]
pub struct LoadedCert {
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    pub key: Arc<CertifiedKey>,
    /// The DNS names and IP addresses the leaf certificate is valid for.
    pub names: Vec<String>,
    /// The SNI names this certificate is chosen for: `hosts`, or else its DNS names.
    pub hosts: Vec<HostPattern>,
    /// End of validity, in seconds since the Unix epoch.
    pub not_after: i64,
}

impl LoadedCert {
    /// `2027-01-01T00:00:00Z (in 400 days)`, or `(EXPIRED)`.
    pub fn expiry(&self) -> String {
        pem::expiry(self.not_after)
    }
}

/// Loads a TLS listener's certificate chain and key ([`pem::read_pair`]); `hosts` are the SNI
/// names it is chosen for (default: its DNS names).
pub fn load_pair(
    cert_path: &Path,
    key_path: &Path,
    hosts: Option<Vec<HostPattern>>,
) -> Result<LoadedCert, PairError> {
    let pair = pem::read_pair(cert_path, key_path)?;
    let hosts = hosts.unwrap_or_else(|| {
        pair.names
            .iter()
            .filter_map(|n| HostPattern::try_from(n.clone()).ok())
            .collect()
    });
    Ok(LoadedCert {
        cert_path: cert_path.to_path_buf(),
        key_path: key_path.to_path_buf(),
        key: Arc::new(CertifiedKey::new(pair.chain, pair.signer)),
        names: pair.names,
        hosts,
        not_after: pair.not_after,
    })
}

/// One TLS listener's certificates and protocol floor.
#[derive(Debug)]
pub struct ListenerTls {
    pub min_version: TlsVersion,
    /// In config order; the first is the default.
    pub certs: Vec<LoadedCert>,
    exact: HashMap<String, usize>,
    /// Wildcard suffixes (with their leading dot), longest first.
    wildcards: Vec<(String, usize)>,
    default: usize,
}

impl ListenerTls {
    /// `certs` must not be empty (the config requires one).
    pub fn new(min_version: TlsVersion, certs: Vec<LoadedCert>) -> Self {
        let mut exact = HashMap::new();
        let mut wildcards = Vec::new();
        let mut default = None;
        for (i, cert) in certs.iter().enumerate() {
            for host in &cert.hosts {
                match host {
                    // An earlier certificate keeps a name it already claimed.
                    HostPattern::Exact(name) => {
                        exact.entry(name.clone()).or_insert(i);
                    }
                    HostPattern::Wildcard(suffix) => {
                        if !wildcards.iter().any(|(s, _)| s == suffix) {
                            wildcards.push((suffix.clone(), i));
                        }
                    }
                    HostPattern::Any => {
                        default.get_or_insert(i);
                    }
                }
            }
        }
        wildcards.sort_by_key(|(suffix, _)| std::cmp::Reverse(suffix.len()));
        ListenerTls {
            min_version,
            certs,
            exact,
            wildcards,
            default: default.unwrap_or(0),
        }
    }

    /// The certificate for an SNI name: an exact host, then the longest wildcard, then the
    /// default (the first, or the one with `hosts: ["*"]`).
    pub fn select(&self, sni: Option<&str>) -> Option<&LoadedCert> {
        let index = sni
            .map(|name| name.trim_end_matches('.').to_ascii_lowercase())
            .and_then(|name| {
                self.exact.get(&name).copied().or_else(|| {
                    self.wildcards
                        .iter()
                        .find(|(suffix, _)| name.ends_with(suffix.as_str()))
                        .map(|&(_, i)| i)
                })
            })
            .unwrap_or(self.default);
        self.certs.get(index)
    }
}

/// Whether a ClientHello can negotiate TLS 1.3: it offers a TLS 1.3 cipher suite
/// (0x13xx). Every client that supports TLS 1.3 offers one, and rustls picks 1.3 whenever
/// the client supports it, so a hello without one would end up on TLS 1.2.
fn offers_tls13(hello: &ClientHello<'_>) -> bool {
    hello
        .cipher_suites()
        .iter()
        .any(|suite| suite.to_array()[0] == 0x13)
}

/// The version a connection negotiated, from Pingora's `SslDigest` (`TLSv1_2`).
fn negotiated(version: &str) -> Option<TlsVersion> {
    if version.ends_with("1_3") || version.ends_with("1.3") {
        Some(TlsVersion::V1_3)
    } else if version.ends_with("1_2") || version.ends_with("1.2") {
        Some(TlsVersion::V1_2)
    } else {
        None
    }
}

/// The second half of `min_version`: `Some(min)` when the request came over a TLS
/// connection older than its listener's (`tls`) `min_version`. The resolver refuses every
/// client that cannot do TLS 1.3 at all; a client that offers TLS 1.3 cipher suites yet
/// settles on TLS 1.2 (rustls restricted to 1.2 does) passes the handshake and is refused
/// here.
pub fn below_min_version(session: &Session, tls: &ListenerTls) -> Option<TlsVersion> {
    let ssl = session.digest()?.ssl_digest.as_ref()?;
    let min = tls.min_version;
    (negotiated(&ssl.version)? < min).then_some(min)
}

impl ListenerTls {
    /// Whether a handshake is refused before any certificate is chosen: the listener wants
    /// TLS 1.3 and the client cannot do it.
    pub fn refuses(&self, hello: &ClientHello<'_>) -> bool {
        self.min_version == TlsVersion::V1_3 && !offers_tls13(hello)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(dir: &Path, name: &str, sans: &[&str]) -> (PathBuf, PathBuf) {
        let names: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let made = rcgen::generate_simple_self_signed(names).expect("rcgen");
        let cert = dir.join(format!("{name}.pem"));
        let key = dir.join(format!("{name}.key"));
        std::fs::write(&cert, made.cert.pem()).expect("write");
        std::fs::write(&key, made.key_pair.serialize_pem()).expect("write");
        (cert, key)
    }

    #[test]
    fn sni_picks_exact_then_longest_wildcard_then_default() {
        let dir = tempfile::tempdir().expect("tempdir");
        let load = |name, sans: &[&str], hosts: Option<Vec<&str>>| {
            let (c, k) = cert(dir.path(), name, sans);
            let hosts = hosts.map(|h| {
                h.into_iter()
                    .map(|p| HostPattern::try_from(p.to_string()).expect("pattern"))
                    .collect()
            });
            load_pair(&c, &k, hosts).expect("loads")
        };
        let tls = ListenerTls::new(
            TlsVersion::V1_2,
            vec![
                load("default", &["example.com", "www.example.com"], None),
                load("wild", &["*.example.com"], None),
                load(
                    "deep",
                    &["x"],
                    Some(vec!["*.api.example.com", "Other.test"]),
                ),
            ],
        );
        let pick = |sni: Option<&str>| {
            tls.select(sni)
                .and_then(|c| c.cert_path.file_stem())
                .and_then(|s| s.to_str())
                .map(str::to_string)
        };
        assert_eq!(pick(Some("www.example.com")).as_deref(), Some("default"));
        assert_eq!(pick(Some("a.example.com")).as_deref(), Some("wild"));
        assert_eq!(pick(Some("v1.api.example.com")).as_deref(), Some("deep"));
        assert_eq!(pick(Some("other.test.")).as_deref(), Some("deep"));
        assert_eq!(pick(Some("nothing.test")).as_deref(), Some("default"));
        assert_eq!(pick(None).as_deref(), Some("default"));
        assert_eq!(tls.certs[0].names, ["example.com", "www.example.com"]);
        assert!(tls.certs[0].expiry().contains("days"));
    }

    #[test]
    fn broken_and_mismatched_pairs_name_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a_cert, _) = cert(dir.path(), "a", &["a.test"]);
        let (_, b_key) = cert(dir.path(), "b", &["b.test"]);
        let err = |r: Result<LoadedCert, PairError>| match r {
            Ok(_) => panic!("should be refused"),
            Err(e) => e,
        };
        let e = err(load_pair(&a_cert, &b_key, None));
        assert!(
            matches!(&e, PairError::Key(m) if m.contains("b.key") && m.contains("a.pem")),
            "{e:?}"
        );
        let e = err(load_pair(&dir.path().join("none.pem"), &b_key, None));
        assert!(
            matches!(&e, PairError::Cert(m) if m.contains("none.pem")),
            "{e:?}"
        );
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not a certificate\n").expect("write");
        let e = err(load_pair(&garbage, &b_key, None));
        assert!(
            matches!(&e, PairError::Cert(m) if m.contains("no certificate")),
            "{e:?}"
        );
        let e = err(load_pair(&a_cert, &garbage, None));
        assert!(
            matches!(&e, PairError::Key(m) if m.contains("garbage.pem")),
            "{e:?}"
        );
    }
}
