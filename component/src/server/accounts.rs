//! Accounts of the embedded server: SCRAM credentials (SHA-1 and SHA-256 salted
//! passwords with their salt and iteration count), how they are made from a
//! password, stored, and checked (SCRAM in `scram.rs`, PLAIN here).

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use isthmus_core::store::{LocalUserRecord, Store, StoreError};
use sasl::secret::{Pbkdf2Sha1, Pbkdf2Sha256};
use subtle::ConstantTimeEq;
use thiserror::Error;

/// PBKDF2 rounds for new credentials unless the configuration says otherwise
/// (`xmpp.embedded.scram_iterations`); RFC 7677 asks for at least 4096.
pub const DEFAULT_ITERATIONS: u32 = 10_000;

#[derive(Debug, Error)]
pub enum AccountError {
    #[error("`{0}` is not an account JID: expected name@domain")]
    BadJid(String),
    #[error("a password hash must look like `scram:ITER$SALT$SHA1$SHA256` (from `isthmus user hash`), got `{0}`")]
    BadHash(String),
    #[error("the password is empty")]
    EmptyPassword,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot derive the key: {0}")]
    Derive(String),
}

/// The SCRAM credentials of one account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub sha1: Pbkdf2Sha1,
    pub sha256: Pbkdf2Sha256,
}

impl Credentials {
    /// Derive fresh credentials (new random salt, `iterations` rounds) from a password.
    pub fn from_password(password: &str, iterations: u32) -> Result<Credentials, AccountError> {
        if password.is_empty() {
            return Err(AccountError::EmptyPassword);
        }
        let salt: [u8; 16] = rand::random();
        Ok(Credentials {
            sha1: Pbkdf2Sha1::derive(password, &salt, iterations).map_err(|e| AccountError::Derive(e.to_string()))?,
            sha256: Pbkdf2Sha256::derive(password, &salt, iterations)
                .map_err(|e| AccountError::Derive(e.to_string()))?,
        })
    }

    /// Does `password` match? (for SASL PLAIN; constant-time comparison)
    pub fn check(&self, password: &str) -> bool {
        match Pbkdf2Sha256::derive(password, &self.sha256.salt, self.sha256.iterations) {
            Ok(d) => d.digest.ct_eq(&self.sha256.digest).into(),
            Err(_) => false,
        }
    }

    /// The one-line form used in YAML (`password_hash`): `scram:ITER$SALT$SHA1$SHA256`.
    pub fn to_hash_string(&self) -> String {
        format!(
            "scram:{}${}${}${}",
            self.sha256.iterations,
            B64.encode(&self.sha256.salt),
            B64.encode(&self.sha1.digest),
            B64.encode(&self.sha256.digest)
        )
    }

    pub fn from_hash_string(s: &str) -> Result<Credentials, AccountError> {
        let bad = || AccountError::BadHash(s.chars().take(40).collect());
        let rest = s.strip_prefix("scram:").ok_or_else(bad)?;
        let parts: Vec<&str> = rest.split('$').collect();
        let [iter, salt, sha1, sha256] = parts.as_slice() else { return Err(bad()) };
        let iterations: u32 = iter.parse().map_err(|_| bad())?;
        let salt = B64.decode(salt).map_err(|_| bad())?;
        let sha1 = B64.decode(sha1).map_err(|_| bad())?;
        let sha256 = B64.decode(sha256).map_err(|_| bad())?;
        if sha1.len() != 20 || sha256.len() != 32 || iterations == 0 {
            return Err(bad());
        }
        Ok(Credentials {
            sha1: Pbkdf2Sha1 { salt: salt.clone(), iterations, digest: sha1 },
            sha256: Pbkdf2Sha256 { salt, iterations, digest: sha256 },
        })
    }

    fn record(&self, jid: &str) -> LocalUserRecord {
        let one = |iterations: u32, salt: &[u8], digest: &[u8]| {
            format!("{iterations}${}${}", B64.encode(salt), B64.encode(digest))
        };
        LocalUserRecord {
            jid: jid.to_owned(),
            scram_sha1: one(self.sha1.iterations, &self.sha1.salt, &self.sha1.digest),
            scram_sha256: one(self.sha256.iterations, &self.sha256.salt, &self.sha256.digest),
            created_us: isthmus_core::store::now_us(),
        }
    }

    fn from_record(r: &LocalUserRecord) -> Option<Credentials> {
        let one = |s: &str| -> Option<(u32, Vec<u8>, Vec<u8>)> {
            let mut it = s.split('$');
            let iterations = it.next()?.parse().ok()?;
            let salt = B64.decode(it.next()?).ok()?;
            let digest = B64.decode(it.next()?).ok()?;
            Some((iterations, salt, digest))
        };
        let (i1, s1, d1) = one(&r.scram_sha1)?;
        let (i2, s2, d2) = one(&r.scram_sha256)?;
        Some(Credentials {
            sha1: Pbkdf2Sha1 { salt: s1, iterations: i1, digest: d1 },
            sha256: Pbkdf2Sha256 { salt: s2, iterations: i2, digest: d2 },
        })
    }
}

/// Check that `jid` is `name@domain`; returns it lower-cased (node and domain are
/// case-insensitive in XMPP).
pub fn account_jid(jid: &str) -> Result<String, AccountError> {
    match jid.split_once('@') {
        Some((node, domain)) if !node.is_empty() && !domain.is_empty() && !domain.contains('/') => {
            let parsed: jid::BareJid = jid.parse().map_err(|_| AccountError::BadJid(jid.to_owned()))?;
            Ok(parsed.to_string().to_lowercase())
        }
        _ => Err(AccountError::BadJid(jid.to_owned())),
    }
}

/// Create or change an account's password in the store (`iterations` PBKDF2 rounds).
pub async fn set_password(store: &Store, jid: &str, password: &str, iterations: u32) -> Result<(), AccountError> {
    let jid = account_jid(jid)?;
    store.upsert_local_user(&Credentials::from_password(password, iterations)?.record(&jid)).await?;
    Ok(())
}

/// An account's credentials: from the YAML list first, else the store.
pub async fn lookup(
    store: &Store,
    listed: &[(String, Credentials)],
    jid: &str,
) -> Result<Option<Credentials>, AccountError> {
    let jid = jid.to_lowercase();
    if let Some((_, c)) = listed.iter().find(|(j, _)| *j == jid) {
        return Ok(Some(c.clone()));
    }
    Ok(store.local_user(&jid).await?.as_ref().and_then(Credentials::from_record))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_string_round_trips_and_checks() {
        let c = Credentials::from_password("s3cret", 4096).expect("derive");
        let s = c.to_hash_string();
        assert!(!s.contains("s3cret"));
        let back = Credentials::from_hash_string(&s).expect("parse");
        assert_eq!(back, c);
        assert!(back.check("s3cret"));
        assert!(!back.check("wrong"));
        assert!(Credentials::from_hash_string("plain-text").is_err());
        assert!(Credentials::from_hash_string("scram:1$AA$BB").is_err());
    }

    #[test]
    fn account_jids_are_checked() {
        assert_eq!(account_jid("Alice@LocalHost").expect("valid"), "alice@localhost");
        assert!(account_jid("alice").is_err());
        assert!(account_jid("@localhost").is_err());
        assert!(account_jid("a@b/c").is_err());
    }

    #[tokio::test]
    async fn store_round_trip() {
        let store = Store::connect("sqlite::memory:", 1).await.expect("store");
        store.migrate().await.expect("migrate");
        set_password(&store, "bob@localhost", "pw", 4096).await.expect("add");
        let c = lookup(&store, &[], "Bob@localhost").await.expect("lookup").expect("exists");
        assert!(c.check("pw"));
        assert!(lookup(&store, &[], "nobody@localhost").await.expect("lookup").is_none());
    }
}
