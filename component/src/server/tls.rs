//! The embedded server's TLS: the configured certificate, or one generated on
//! first start (rcgen) and kept beside the configuration, with its SHA-256
//! fingerprint logged so users can check what their client shows.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use thiserror::Error;
use tracing::info;

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("cannot read {0}: {1}")]
    Read(PathBuf, String),
    #[error("cannot write {0}: {1}")]
    Write(PathBuf, std::io::Error),
    #[error("cannot generate a certificate: {0}")]
    Generate(String),
    #[error("the certificate or key is not usable: {0}")]
    Rustls(#[from] rustls::Error),
}

/// A TLS acceptor and where its certificate came from.
pub struct Tls {
    pub acceptor: tokio_rustls::TlsAcceptor,
    pub cert_path: PathBuf,
    pub fingerprint: String,
}

/// Load `cert`/`key`, or create a self-signed certificate for `domain` under `dir`
/// (reused on later starts).
pub fn load_or_generate(
    cert: Option<&Path>,
    key: Option<&Path>,
    dir: &Path,
    domain: &str,
    extra_names: &[String],
) -> Result<Tls, TlsError> {
    let (cert_path, key_path) = match (cert, key) {
        (Some(c), Some(k)) => (c.to_path_buf(), k.to_path_buf()),
        _ => {
            let c = dir.join(format!("{domain}.crt"));
            let k = dir.join(format!("{domain}.key"));
            if !c.is_file() || !k.is_file() {
                generate(&c, &k, domain, extra_names)?;
                info!(path = %c.display(), "generated a self-signed certificate (give xmpp.embedded.tls_cert/tls_key to use your own)");
            }
            (c, k)
        }
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert_path)
        .map_err(|e| TlsError::Read(cert_path.clone(), e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Read(cert_path.clone(), e.to_string()))?;
    let first = certs.first().ok_or_else(|| TlsError::Read(cert_path.clone(), "no certificate in the file".into()))?;
    let fingerprint = Sha256::digest(first.as_ref()).iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":");
    let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| TlsError::Read(key_path.clone(), e.to_string()))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    Ok(Tls { acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)), cert_path, fingerprint })
}

fn generate(cert: &Path, key: &Path, domain: &str, extra_names: &[String]) -> Result<(), TlsError> {
    let mut names = vec![domain.to_owned()];
    names.extend(extra_names.iter().cloned());
    let generated = rcgen::generate_simple_self_signed(names).map_err(|e| TlsError::Generate(e.to_string()))?;
    if let Some(parent) = cert.parent() {
        std::fs::create_dir_all(parent).map_err(|e| TlsError::Write(parent.to_path_buf(), e))?;
    }
    std::fs::write(cert, generated.cert.pem()).map_err(|e| TlsError::Write(cert.to_path_buf(), e))?;
    write_private(key, generated.signing_key.serialize_pem().as_bytes())?;
    Ok(())
}

fn write_private(path: &Path, data: &[u8]) -> Result<(), TlsError> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut f = options.open(path).map_err(|e| TlsError::Write(path.to_path_buf(), e))?;
    f.write_all(data).map_err(|e| TlsError::Write(path.to_path_buf(), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_once_and_reuses() {
        let dir = tempfile::tempdir().expect("dir");
        let a = load_or_generate(None, None, dir.path(), "localhost", &[]).expect("generate");
        let b = load_or_generate(None, None, dir.path(), "localhost", &[]).expect("reuse");
        assert_eq!(a.fingerprint, b.fingerprint);
        assert_eq!(a.fingerprint.len(), 32 * 3 - 1);
    }
}
