//! The columns that hold credentials, sealed with the store's [`SecretBox`]:
//! `accounts.credentials` (e.g. a Matrix login's access token), `user_settings.settings`
//! (an IRC user's SASL and server passwords, client certificate key, on-connect
//! commands) and `room_sessions.password` (room passwords, IRC channel keys).
//!
//! Values are sealed on their way in and opened on their way out, bound to their
//! row by the associated data; [`Store::seal_existing`] seals, once, the values a
//! store written before sealing existed holds in clear.

use std::sync::Arc;

use tracing::warn;

use super::*;
use crate::secrets::{self, SecretBox, SecretError};

fn account_ad(xmpp_jid: &str, network: &str) -> Vec<u8> {
    secrets::associated(&["accounts", xmpp_jid, network])
}

fn settings_ad(account: &str, network: &str, target: &str) -> Vec<u8> {
    secrets::associated(&["user_settings", account, network, target])
}

fn room_ad(room: &str, account: &str) -> Vec<u8> {
    secrets::associated(&["room_sessions", room, account])
}

/// What [`Store::seal_existing`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SealReport {
    /// Values found in clear and sealed now.
    pub sealed: u64,
    /// Values already sealed with the key.
    pub already: u64,
    /// Sealed values with the right key that do not open (altered, or moved to another row).
    pub unreadable: u64,
}

impl Store {
    /// This store with `secrets`: from now on credentials are sealed with it.
    pub fn with_secrets(mut self, secrets: SecretBox) -> Store {
        self.secrets = Some(Arc::new(secrets));
        self
    }

    /// The key credentials are sealed with, if the store has one.
    pub fn secrets(&self) -> Option<&SecretBox> {
        self.secrets.as_deref()
    }

    fn seal_bytes(&self, value: &[u8], ad: &[u8]) -> Vec<u8> {
        match &self.secrets {
            Some(s) if !value.is_empty() => s.seal(value, ad),
            _ => value.to_vec(),
        }
    }

    fn open_bytes(&self, table: &'static str, value: Vec<u8>, ad: &[u8]) -> Result<Vec<u8>> {
        if !secrets::is_sealed(&value) {
            return Ok(value); // in clear: written before sealing (sealed at the next start)
        }
        let secrets = self.secrets.as_ref().ok_or(StoreError::Sealed { table, source: SecretError::NoKey })?;
        secrets.open(&value, ad).map_err(|source| StoreError::Sealed { table, source })
    }

    fn seal_string(&self, value: &str, ad: &[u8]) -> String {
        match &self.secrets {
            Some(s) => s.seal_text(value, ad),
            None => value.to_owned(),
        }
    }

    fn open_string(&self, table: &'static str, value: String, ad: &[u8]) -> Result<String> {
        if !secrets::is_sealed_text(&value) {
            return Ok(value);
        }
        let secrets = self.secrets.as_ref().ok_or(StoreError::Sealed { table, source: SecretError::NoKey })?;
        secrets.open_text(&value, ad).map_err(|source| StoreError::Sealed { table, source })
    }

    pub(super) fn seal_credentials(&self, a: &AccountRecord) -> Vec<u8> {
        self.seal_bytes(&a.credentials, &account_ad(&a.xmpp_jid, &a.network))
    }

    pub(super) fn open_account(&self, mut a: AccountRecord) -> Result<AccountRecord> {
        let ad = account_ad(&a.xmpp_jid, &a.network);
        a.credentials = self.open_bytes("accounts", std::mem::take(&mut a.credentials), &ad)?;
        Ok(a)
    }

    pub(super) fn seal_settings(&self, account: &str, network: &str, target: &str, settings: &str) -> String {
        self.seal_string(settings, &settings_ad(account, network, target))
    }

    pub(super) fn open_settings(&self, account: &str, network: &str, target: &str, settings: String) -> Result<String> {
        self.open_string("user_settings", settings, &settings_ad(account, network, target))
    }

    pub(super) fn seal_room_password(&self, room: &str, account: &str, password: Option<&str>) -> Option<String> {
        password.map(|p| self.seal_string(p, &room_ad(room, account)))
    }

    pub(super) fn open_room_password(
        &self,
        room: &str,
        account: &str,
        password: Option<String>,
    ) -> Result<Option<String>> {
        password.map(|p| self.open_string("room_sessions", p, &room_ad(room, account))).transpose()
    }

    /// Check every sealed value against the key and seal the values still in clear
    /// (written before sealing existed), in one transaction. Values sealed with
    /// another key are an error ([`StoreError::WrongKey`]): the gateway must not run
    /// with a key that cannot open them. Without a key, does nothing.
    pub async fn seal_existing(&self) -> Result<SealReport> {
        let Some(key) = self.secrets.clone() else { return Ok(SealReport::default()) };
        let mut report = SealReport::default();
        let mut tx = self.pool.begin().await?;

        let rows = sqlx::query("SELECT xmpp_jid, network, credentials FROM accounts").fetch_all(&mut *tx).await?;
        for row in rows {
            let (jid, network): (String, String) = (row.try_get("xmpp_jid")?, row.try_get("network")?);
            let value: Vec<u8> = row.try_get::<Option<Vec<u8>>, _>("credentials")?.unwrap_or_default();
            let ad = account_ad(&jid, &network);
            if value.is_empty() {
                continue;
            }
            if secrets::is_sealed(&value) {
                check(&key, "accounts", key.open(&value, &ad), &mut report)?;
                continue;
            }
            sqlx::query("UPDATE accounts SET credentials = $1 WHERE xmpp_jid = $2 AND network = $3")
                .bind(key.seal(&value, &ad))
                .bind(&jid)
                .bind(&network)
                .execute(&mut *tx)
                .await?;
            report.sealed += 1;
        }

        let rows =
            sqlx::query("SELECT account, network, target, settings FROM user_settings").fetch_all(&mut *tx).await?;
        for row in rows {
            let (account, network, target): (String, String, String) =
                (row.try_get("account")?, row.try_get("network")?, row.try_get("target")?);
            let value: String = row.try_get("settings")?;
            let ad = settings_ad(&account, &network, &target);
            if secrets::is_sealed_text(&value) {
                check(&key, "user_settings", key.open_text(&value, &ad).map(|_| Vec::new()), &mut report)?;
                continue;
            }
            sqlx::query("UPDATE user_settings SET settings = $1 WHERE account = $2 AND network = $3 AND target = $4")
                .bind(key.seal_text(&value, &ad))
                .bind(&account)
                .bind(&network)
                .bind(&target)
                .execute(&mut *tx)
                .await?;
            report.sealed += 1;
        }

        let rows = sqlx::query("SELECT room, account, password FROM room_sessions WHERE password IS NOT NULL")
            .fetch_all(&mut *tx)
            .await?;
        for row in rows {
            let (room, account): (String, String) = (row.try_get("room")?, row.try_get("account")?);
            let value: String = row.try_get("password")?;
            let ad = room_ad(&room, &account);
            if secrets::is_sealed_text(&value) {
                check(&key, "room_sessions", key.open_text(&value, &ad).map(|_| Vec::new()), &mut report)?;
                continue;
            }
            sqlx::query("UPDATE room_sessions SET password = $1 WHERE room = $2 AND account = $3")
                .bind(key.seal_text(&value, &ad))
                .bind(&room)
                .bind(&account)
                .execute(&mut *tx)
                .await?;
            report.sealed += 1;
        }

        tx.commit().await?;
        Ok(report)
    }
}

/// Count one sealed value's check; a value of another key stops everything.
fn check(
    key: &SecretBox,
    table: &'static str,
    opened: std::result::Result<Vec<u8>, SecretError>,
    report: &mut SealReport,
) -> Result<()> {
    match opened {
        Ok(_) => report.already += 1,
        Err(SecretError::WrongKey { sealed_with, have }) => {
            return Err(StoreError::WrongKey { table, sealed_with, have });
        }
        Err(e) => {
            warn!(table, key = %key.key_id(), error = %e, "a sealed value does not open; it is left as it is");
            report.unreadable += 1;
        }
    }
    Ok(())
}
