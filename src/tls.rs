//! TLS for the NBD handshake (`NBD_OPT_STARTTLS`), with rustls: TLS 1.2 and 1.3, a server
//! certificate and key from PEM files, and optionally client certificates checked against a CA.
//!
//! When `[server.tls]` is configured, TLS is required of every client (the spec's FORCEDTLS):
//! a client that does not start TLS gets `NBD_REP_ERR_TLS_REQD` and no export.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig};

/// `[server.tls]`: where the certificate and key are, and whom to ask client certificates of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// The server's certificate chain, PEM.
    pub certificate: PathBuf,
    /// The server's private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// When set, clients must present a certificate signed by one of these CAs (PEM).
    pub client_ca: Option<PathBuf>,
}

/// A problem with the TLS settings, naming the key it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsProblem {
    /// `certificate`, `key` or `client_ca`.
    pub key: &'static str,
    /// What is wrong.
    pub message: String,
}

fn problem(key: &'static str, message: String) -> TlsProblem {
    TlsProblem { key, message }
}

/// Builds the acceptor for `settings`; every problem is returned with its key. Warnings (a
/// private key others can read) are returned beside the acceptor.
pub fn acceptor(settings: &TlsSettings) -> Result<(TlsAcceptor, Vec<String>), Vec<TlsProblem>> {
    let mut problems = Vec::new();
    let mut warnings = Vec::new();
    let certs = read_certs("certificate", &settings.certificate).unwrap_or_else(|p| {
        problems.push(p);
        Vec::new()
    });
    let key = match read_key(&settings.key) {
        Ok((k, w)) => {
            warnings.extend(w);
            Some(k)
        }
        Err(p) => {
            problems.push(p);
            None
        }
    };
    let verifier = match &settings.client_ca {
        None => None,
        Some(path) => match read_certs("client_ca", path) {
            Err(p) => {
                problems.push(p);
                None
            }
            Ok(cas) => {
                let mut roots = RootCertStore::empty();
                let mut bad = None;
                for ca in cas {
                    if let Err(e) = roots.add(ca) {
                        bad = Some(e);
                    }
                }
                if let Some(e) = bad {
                    problems.push(problem(
                        "client_ca",
                        format!("{}: not a usable CA certificate: {e}", path.display()),
                    ));
                    None
                } else {
                    match WebPkiClientVerifier::builder_with_provider(
                        Arc::new(roots),
                        Arc::new(rustls::crypto::ring::default_provider()),
                    )
                    .build()
                    {
                        Ok(v) => Some(v),
                        Err(e) => {
                            problems.push(problem("client_ca", format!("{}: {e}", path.display())));
                            None
                        }
                    }
                }
            }
        },
    };
    let (Some(key), true) = (key, problems.is_empty()) else {
        return Err(problems);
    };
    let builder =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| vec![problem("certificate", e.to_string())])?;
    let builder = match verifier {
        Some(v) => builder.with_client_cert_verifier(v),
        None => builder.with_no_client_auth(),
    };
    let config = builder.with_single_cert(certs, key).map_err(|e| {
        vec![problem(
            "key",
            format!(
                "{} does not go with the certificate {}: {e}",
                settings.key.display(),
                settings.certificate.display()
            ),
        )]
    })?;
    Ok((TlsAcceptor::from(Arc::new(config)), warnings))
}

fn read_file(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsProblem> {
    fs::read(path).map_err(|e| problem(key, format!("cannot read {}: {e}", path.display())))
}

fn read_certs(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsProblem> {
    let pem = read_file(key, path)?;
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(&pem).collect();
    match certs {
        Ok(c) if !c.is_empty() => Ok(c),
        Ok(_) => Err(problem(
            key,
            format!("{} holds no PEM certificate", path.display()),
        )),
        Err(e) => Err(problem(
            key,
            format!("{}: bad PEM certificate: {e}", path.display()),
        )),
    }
}

/// The private key, and a warning when users other than its owner and group can read it.
fn read_key(path: &Path) -> Result<(PrivateKeyDer<'static>, Vec<String>), TlsProblem> {
    let pem = read_file("key", path)?;
    let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        problem(
            "key",
            format!("{} holds no usable PEM private key: {e}", path.display()),
        )
    })?;
    let mut warnings = Vec::new();
    if let Ok(meta) = fs::metadata(path)
        && meta.permissions().mode() & 0o004 != 0
    {
        warnings.push(format!(
            "the private key {} is readable by every user: chmod o-r it (0600 or 0640)",
            path.display()
        ));
    }
    Ok((key, warnings))
}

/// The names a client certificate vouches for: its subject's common names and its DNS, e-mail
/// and URI subject alternative names.
pub fn certificate_names(cert: &CertificateDer<'_>) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, x)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
        return Vec::new();
    };
    let mut names: Vec<String> = x
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(str::to_owned))
        .collect();
    if let Ok(Some(san)) = x.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::DNSName(s) | GeneralName::RFC822Name(s) | GeneralName::URI(s) => {
                    names.push((*s).to_owned());
                }
                _ => {}
            }
        }
    }
    names
}
