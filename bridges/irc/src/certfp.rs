//! Client certificates the gateway makes for a user on one IRC server (CertFP,
//! as bouncers do): a key pair and a self-signed certificate (rcgen), kept in
//! the user's settings, presented on the TLS connection and used for SASL
//! EXTERNAL. The user registers its fingerprint with the services account
//! (`NickServ CERT ADD`); the private key is never shown nor logged.

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256, Sha512};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum CertError {
    #[error("cannot generate a client certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("the stored client certificate is not readable: {0}")]
    Stored(String),
    #[error("cannot hand the client certificate to the TLS library: {0}")]
    File(#[from] std::io::Error),
}

/// A generated certificate (PEM) and its private key (PKCS#8 PEM).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientIdentity {
    pub cert_pem: String,
    pub key_pem: String,
}

/// The private key is never logged.
impl std::fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sha256 = self.fingerprints().map(|f| f.sha256).unwrap_or_default();
        f.debug_struct("ClientIdentity").field("sha256", &sha256).field("key", &"<hidden>").finish()
    }
}

/// A certificate's fingerprints as IRC servers and services show them: lower-case hex of
/// the hash of the DER certificate, no colons.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprints {
    /// What InspIRCd (`hash="sha256"`), UnrealIRCd, Ergo and Atheme/Anope commonly use.
    pub sha256: String,
    /// What some networks' servers use (e.g. Solanum configured with SHA-512).
    pub sha512: String,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl ClientIdentity {
    /// A new ECDSA P-256 key pair and a self-signed client certificate for it.
    /// The certificate names no one: the services account is tied to its fingerprint.
    pub fn generate() -> Result<ClientIdentity, CertError> {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(rcgen::DnType::CommonName, "Isthmus IRC client certificate");
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.self_signed(&key)?;
        Ok(ClientIdentity { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }

    fn der(&self) -> Result<CertificateDer<'static>, CertError> {
        CertificateDer::from_pem_slice(self.cert_pem.as_bytes()).map_err(|e| CertError::Stored(e.to_string()))
    }

    pub fn fingerprints(&self) -> Result<Fingerprints, CertError> {
        let der = self.der()?;
        Ok(Fingerprints { sha256: hex(&Sha256::digest(der.as_ref())), sha512: hex(&Sha512::digest(der.as_ref())) })
    }

    /// The certificate alone in a temporary file (the IRC library reads it from a
    /// path; the key it takes as text): removed when the handle is dropped.
    pub fn cert_file(&self) -> Result<tempfile::NamedTempFile, CertError> {
        use std::io::Write as _;
        let mut file = tempfile::Builder::new().prefix("isthmus-client-cert-").suffix(".pem").tempfile()?;
        file.write_all(self.cert_pem.as_bytes())?;
        file.flush()?;
        Ok(file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_certificates_have_stable_fingerprints_and_hide_the_key() {
        let a = ClientIdentity::generate().expect("generate");
        let fp = a.fingerprints().expect("fingerprints");
        assert_eq!(fp.sha256.len(), 64);
        assert_eq!(fp.sha512.len(), 128);
        assert!(fp.sha256.chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_eq!(a.fingerprints().expect("again"), fp);
        let b = ClientIdentity::generate().expect("generate");
        assert_ne!(b.fingerprints().expect("fingerprints").sha256, fp.sha256);
        assert!(a.key_pem.contains("PRIVATE KEY"));
        let shown = format!("{a:?}");
        assert!(shown.contains(&fp.sha256) && !shown.contains("PRIVATE KEY"), "{shown}");
        let file = a.cert_file().expect("file");
        let text = std::fs::read_to_string(file.path()).expect("read");
        assert!(text.contains("BEGIN CERTIFICATE") && !text.contains("PRIVATE KEY"));
    }
}
