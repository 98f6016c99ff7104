//! Isthmus Matrix bridge.
//!
//! Personal mode: an XMPP user links their own Matrix account (`login` on the
//! network's domain, with a homeserver, user and password); the gateway logs in
//! with matrix-sdk as a device of that account, keeps its keys and room state
//! under the configured data directory, and syncs. Rooms are MUCs addressed by
//! room id or alias (`!id:server`, `#alias:server`); direct chats are contacts
//! addressed by user id (`@user:server`). The link survives restarts: the
//! session is stored (table `accounts`) and restored without a new login.
//!
//! - [`address`]: what an identifier names;
//! - [`incoming`]: Matrix timeline events → the common model;
//! - [`outgoing`]: the common model → Matrix event contents;
//! - [`media`]: files both ways (the media proxy for XMPP clients, uploads to the homeserver);
//! - [`net_guard`]: which addresses a user may make the gateway reach (file links, homeservers);
//! - [`session`]: one linked account (client, sync loop, sending);
//! - [`appservice`]: portal rooms shared by everyone, where XMPP users are Matrix
//!   users of the gateway's application service;
//! - this file: [`MatrixNetwork`], the [`Network`] the router talks to, and linking.
//!
//! Depends on `isthmus-core` and `isthmus-config` only.

pub mod address;
pub mod appservice;
pub mod convert;
pub mod incoming;
pub mod media;
pub mod net_guard;
pub mod outgoing;
pub mod session;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};

use async_trait::async_trait;
use isthmus_config::MatrixNetworkConfig;
use isthmus_core::jid::BareJid;
use isthmus_core::model::{ChatKind, Event, EventKind, NetworkId};
use isthmus_core::network::{
    Capabilities, Delivered, DeliveryError, EventSink, LoginError, LoginField, LoginValues, Network, Profile,
    RoomListing,
};
use isthmus_core::store::{AccountRecord, Store};
use matrix_sdk::authentication::matrix::MatrixSession;
use matrix_sdk::store::RoomLoadSettings;
use matrix_sdk::{Client, SessionMeta};
use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use tracing::{debug, info, warn};

use crate::address::MatrixTarget;
use crate::session::Session;

/// What is stored for a linked account (the `credentials` column).
#[derive(Serialize, Deserialize)]
struct StoredLogin {
    homeserver: String,
    /// Encrypts the device's store on disk. Only logins made by a store without a
    /// key (and older ones) keep it here; else it is derived from the store's key
    /// ([`MatrixNetwork::derived_passphrase`]) and stored nowhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    store_passphrase: Option<String>,
    session: MatrixSession,
}

/// The HKDF label of the Matrix crypto store's passphrase.
const STORE_PASSPHRASE_LABEL: &str = "isthmus matrix crypto store passphrase v1";

/// One configured Matrix network (one component domain), with every user's login.
pub struct MatrixNetwork {
    id: NetworkId,
    config: MatrixNetworkConfig,
    data_dir: PathBuf,
    store: Store,
    sink: EventSink,
    sessions: Mutex<HashMap<BareJid, Arc<Session>>>,
    /// The media proxy, when configured and listening; kept to keep it running.
    _media: Option<media::MediaProxy>,
    /// Portal rooms, when an application service or a bot account is configured.
    portals: Option<Arc<appservice::Portals>>,
    /// Fetches the files XMPP users send, with the network's address policy.
    fetcher: Arc<media::Fetcher>,
}

fn not_linked() -> DeliveryError {
    DeliveryError::Forbidden(
        "you have no Matrix account linked here: run the `login` command on this gateway's address first".into(),
    )
}

/// A file-system-safe, unique name for an account's directory.
fn dir_name(account: &BareJid) -> String {
    account
        .as_str()
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' => (b as char).to_string(),
            b'@' => "_at_".to_owned(),
            _ => format!("%{b:02x}"),
        })
        .collect()
}

impl MatrixNetwork {
    /// `base_dir` is the configuration file's directory (for a relative `data_dir`).
    pub fn new(
        id: NetworkId,
        config: MatrixNetworkConfig,
        base_dir: &Path,
        store: Store,
        sink: EventSink,
    ) -> Arc<MatrixNetwork> {
        let data_dir = config.resolved_data_dir(base_dir).join(dir_name_of_domain(&config.domain));
        let acting = match (&config.appservice, &config.bot) {
            (Some(a), _) => Some(appservice::Acting::Appservice(a.clone())),
            (None, Some(b)) => Some(appservice::Acting::Bot { config: b.clone(), data_dir: data_dir.clone() }),
            (None, None) => None,
        };
        let fetcher = Arc::new(media::Fetcher::new(config.fetch_private_addresses));
        let portals = acting.map(|acting| {
            appservice::Portals::new(id.clone(), acting, config.portals.clone(), sink.clone(), fetcher.clone())
        });
        Arc::new_cyclic(|me: &Weak<MatrixNetwork>| {
            let media = config.media.as_ref().and_then(|media_config| {
                let me = me.clone();
                let clients: media::Clients = Arc::new(move || {
                    let me = me.clone();
                    Box::pin(async move {
                        match me.upgrade() {
                            Some(net) => net.sessions.lock().await.values().map(|s| s.client.clone()).collect(),
                            None => Vec::new(),
                        }
                    })
                });
                let fallback = portals.clone().map(|portals| -> media::Fallback {
                    Arc::new(move |server, media_id| {
                        let portals = portals.clone();
                        Box::pin(async move { portals.download_media(&server, &media_id).await })
                    })
                });
                let started = media::start(&id, media_config, &data_dir, clients, fallback);
                if let Err(e) = &started {
                    let what = "the Matrix media proxy is not running: files keep their mxc:// addresses";
                    tracing::error!(network = %id, error = %e, "{what}");
                }
                started.ok()
            });
            MatrixNetwork {
                id,
                config,
                data_dir,
                store,
                sink,
                sessions: Mutex::new(HashMap::new()),
                _media: media,
                portals,
                fetcher,
            }
        })
    }

    /// Portal rooms: start the application service's transaction server and bring its
    /// bot into every portal room. Call once, after [`MatrixNetwork::restore`];
    /// does nothing without `appservice`.
    pub async fn start_portals(&self) {
        if let Some(portals) = &self.portals {
            portals.start().await;
        }
    }

    fn account_dir(&self, account: &BareJid) -> PathBuf {
        self.data_dir.join(dir_name(account))
    }

    /// The passphrase of `account`'s crypto store, derived from the store's key.
    fn derived_passphrase(&self, account: &BareJid) -> Option<String> {
        let secrets = self.store.secrets()?;
        let context = format!("{}\n{account}", self.id.as_str());
        Some(secrets.derive(STORE_PASSPHRASE_LABEL, context.as_bytes()).iter().map(|b| format!("{b:02x}")).collect())
    }

    async fn client(&self, homeserver: &str, dir: &Path, passphrase: &str) -> Result<Client, String> {
        Client::builder()
            .homeserver_url(homeserver)
            .sqlite_store(dir, Some(passphrase))
            .build()
            .await
            .map_err(|e| format!("cannot set up the Matrix client for {homeserver}: {e}"))
    }

    /// Log back in every account linked in an earlier run and start syncing them.
    /// Returns how many were restored.
    pub async fn restore(&self) -> usize {
        let records = match self.store.accounts_of_network(self.id.as_str()).await {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "cannot read the linked Matrix accounts");
                return 0;
            }
        };
        let mut restored = 0;
        for record in records {
            let Ok(account) = BareJid::new(&record.xmpp_jid) else { continue };
            match self.restore_one(&account, &record).await {
                Ok(session) => {
                    session.start(false);
                    self.sessions.lock().await.insert(account, session);
                    restored += 1;
                }
                Err(e) => warn!(account = %record.xmpp_jid, error = %e, "cannot restore the Matrix login"),
            }
        }
        restored
    }

    async fn restore_one(&self, account: &BareJid, record: &AccountRecord) -> Result<Arc<Session>, String> {
        let stored: StoredLogin =
            serde_json::from_slice(&record.credentials).map_err(|e| format!("unreadable stored login: {e}"))?;
        let dir = self.account_dir(account);
        let passphrase = stored
            .store_passphrase
            .clone()
            .or_else(|| self.derived_passphrase(account))
            .ok_or("the stored login has no store passphrase, and the store has no key to derive it")?;
        let client = self.client(&stored.homeserver, &dir, &passphrase).await?;
        let user_id = stored.session.meta.user_id.clone();
        client
            .matrix_auth()
            .restore_session(stored.session, RoomLoadSettings::default())
            .await
            .map_err(|e| format!("cannot restore the session: {e}"))?;
        info!(account = %account, user = %user_id, "Matrix login restored");
        let resume_from = serde_json::from_str::<serde_json::Value>(&record.settings)
            .ok()
            .and_then(|v| v.get(session::SYNC_TOKEN).and_then(|t| t.as_str()).map(str::to_owned));
        Ok(Session::new(
            account.clone(),
            self.id.clone(),
            client,
            user_id,
            self.sink.clone(),
            dir,
            self.store.clone(),
            resume_from,
            self.fetcher.clone(),
        ))
    }

    async fn session(&self, account: &BareJid) -> Result<Arc<Session>, DeliveryError> {
        self.sessions.lock().await.get(account).cloned().ok_or_else(not_linked)
    }
}

fn dir_name_of_domain(domain: &str) -> String {
    domain.chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '-' { c } else { '_' }).collect()
}

#[async_trait]
impl Network for MatrixNetwork {
    fn id(&self) -> &NetworkId {
        &self.id
    }

    fn capabilities(&self) -> Capabilities {
        // Files are uploaded to the homeserver (see `media`); our own events come back
        // in the sync but are recognised by their transaction id, not used as receipts.
        Capabilities { echoes_own_messages: false, ..Capabilities::all() }
    }

    fn chat_kind(&self, id: &str) -> Option<ChatKind> {
        if id.is_empty() {
            return Some(ChatKind::Service);
        }
        MatrixTarget::parse(id).map(|t| t.chat_kind())
    }

    fn login_fields(&self) -> Vec<LoginField> {
        vec![
            LoginField {
                var: "homeserver",
                label: "Homeserver URL",
                secret: false,
                required: true,
                default: self.config.default_homeserver.clone(),
            },
            LoginField {
                var: "user",
                label: "Matrix user (@name:server or name)",
                secret: false,
                required: true,
                default: None,
            },
            LoginField { var: "password", label: "Password", secret: true, required: true, default: None },
        ]
    }

    async fn login(&self, account: &BareJid, values: &LoginValues) -> Result<String, LoginError> {
        let get = |k: &str| values.get(k).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty());
        let homeserver = get("homeserver")
            .or_else(|| self.config.default_homeserver.clone())
            .ok_or_else(|| LoginError::Invalid("give the homeserver's URL (https://…)".into()))?;
        if !(homeserver.starts_with("https://") || homeserver.starts_with("http://")) {
            return Err(LoginError::Invalid(format!("`{homeserver}` is not a homeserver URL: expected https://HOST")));
        }
        if !self.config.allows_homeserver(&homeserver) {
            return Err(LoginError::Invalid(format!(
                "this gateway does not connect to {homeserver}; allowed: {}",
                self.config.allowed_homeservers.join(", ")
            )));
        }
        net_guard::check_homeserver(&self.config, &homeserver).await.map_err(LoginError::Invalid)?;
        let user = get("user").ok_or_else(|| LoginError::Invalid("give your Matrix user name".into()))?;
        let password = values
            .get("password")
            .filter(|p| !p.is_empty())
            .ok_or_else(|| LoginError::Invalid("give your Matrix password".into()))?;

        // A new login is a new device with a fresh store.
        if let Some(old) = self.sessions.lock().await.remove(account) {
            old.stop();
        }
        let dir = self.account_dir(account);
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .map_err(|e| LoginError::Unavailable(format!("cannot clear {}: {e}", dir.display())))?;
        }
        std::fs::create_dir_all(&dir)
            .map_err(|e| LoginError::Unavailable(format!("cannot create {}: {e}", dir.display())))?;
        // Derived from the store's key, so never stored; without a key, random and stored.
        let (passphrase, stored_passphrase) = match self.derived_passphrase(account) {
            Some(p) => (p, None),
            None => {
                let mut rng = rand::rng();
                let p: String = (0..32).map(|_| format!("{:02x}", rng.random::<u8>())).collect();
                (p.clone(), Some(p))
            }
        };
        let client = self.client(&homeserver, &dir, &passphrase).await.map_err(LoginError::Unavailable)?;
        let response = client
            .matrix_auth()
            .login_username(&user, password)
            .initial_device_display_name(&format!("Isthmus gateway ({account})"))
            .send()
            .await
            .map_err(|e| match e.client_api_error_kind() {
                Some(matrix_sdk::ruma::api::error::ErrorKind::Forbidden) => {
                    LoginError::Refused("the homeserver refused the login: wrong user name or password".into())
                }
                Some(kind) => LoginError::Refused(format!("the homeserver refused the login: {}", kind.errcode())),
                None => LoginError::Unavailable(format!("cannot reach {homeserver}: {e}")),
            })?;
        let session = client.matrix_auth().session().unwrap_or_else(|| MatrixSession {
            meta: SessionMeta { user_id: response.user_id.clone(), device_id: response.device_id.clone() },
            tokens: matrix_sdk::SessionTokens { access_token: response.access_token.clone(), refresh_token: None },
        });
        let stored = StoredLogin { homeserver: homeserver.clone(), store_passphrase: stored_passphrase, session };
        let credentials =
            serde_json::to_vec(&stored).map_err(|e| LoginError::Unavailable(format!("cannot store the login: {e}")))?;
        self.store
            .upsert_account(&AccountRecord {
                xmpp_jid: account.to_string(),
                network: self.id.as_str().to_owned(),
                remote_user: response.user_id.to_string(),
                credentials,
                settings: "{}".into(),
                updated_us: isthmus_core::store::now_us(),
            })
            .await
            .map_err(|e| LoginError::Unavailable(format!("cannot store the login: {e}")))?;
        let session = Session::new(
            account.clone(),
            self.id.clone(),
            client,
            response.user_id.clone(),
            self.sink.clone(),
            dir,
            self.store.clone(),
            None,
            self.fetcher.clone(),
        );
        session.start(true);
        self.sessions.lock().await.insert(account.clone(), session);
        info!(account = %account, user = %response.user_id, device = %response.device_id, "Matrix account linked");
        Ok(format!("Logged in to {homeserver} as {} (device {}).", response.user_id, response.device_id))
    }

    async fn logout(&self, account: &BareJid) -> Result<String, LoginError> {
        let session = self.sessions.lock().await.remove(account);
        let deleted = self
            .store
            .delete_account(account.as_str(), self.id.as_str())
            .await
            .map_err(|e| LoginError::Unavailable(format!("cannot remove the stored login: {e}")))?;
        let Some(session) = session else {
            return if deleted {
                Ok("The stored Matrix login was removed.".into())
            } else {
                Err(LoginError::Invalid("you have no Matrix account linked here".into()))
            };
        };
        session.stop();
        if let Err(e) = session.client.matrix_auth().logout().await {
            warn!(account = %account, error = %e, "the homeserver did not confirm the logout");
        }
        if let Err(e) = std::fs::remove_dir_all(&session.store_dir) {
            debug!(error = %e, "device store not removed");
        }
        Ok(format!("Logged out of Matrix ({}); the gateway's device was removed.", session.user_id))
    }

    async fn account_status(&self, account: &BareJid) -> Vec<String> {
        match self.sessions.lock().await.get(account) {
            Some(s) => {
                let rooms = s.joined_rooms().await.len();
                vec![format!("logged in to {} as {}, in {rooms} rooms", s.client.homeserver(), s.user_id)]
            }
            None => Vec::new(),
        }
    }

    async fn accounts(&self) -> Option<Vec<BareJid>> {
        let mut accounts: Vec<BareJid> = self.sessions.lock().await.keys().cloned().collect();
        accounts.sort();
        Some(accounts)
    }

    /// Stops the account's sync and forgets its client; the device stays logged in
    /// and its stored login is kept (restored at the next start, or replaced by a new `login`).
    async fn disconnect(&self, account: &BareJid, reason: &str) -> Option<Vec<String>> {
        let Some(session) = self.sessions.lock().await.remove(account) else { return Some(Vec::new()) };
        session.stop();
        info!(account = %account, user = %session.user_id, reason, "Matrix session stopped by an admin");
        Some(vec![format!("stopped the session of {} (its device stays logged in)", session.user_id)])
    }

    async fn connections_status(&self) -> Vec<String> {
        let logins = self.sessions.lock().await.len();
        let mut lines = vec![format!("{logins} Matrix login{} syncing", if logins == 1 { "" } else { "s" })];
        if self.portals.is_some() {
            lines.push(format!("{} portal rooms", self.config.portals.len()));
        }
        lines
    }

    async fn profile(&self, account: Option<&BareJid>, id: &str) -> Result<Profile, DeliveryError> {
        // Personal rooms: through the account's own client. Portals: the display name only.
        match account {
            Some(account) => self.session(account).await?.profile(id).await,
            None => Ok(Profile { display_name: Some(self.display_name(id)), avatar: None }),
        }
    }

    async fn rooms(&self, account: &BareJid) -> Vec<RoomListing> {
        let Ok(session) = self.session(account).await else { return Vec::new() };
        session
            .joined_rooms()
            .await
            .into_iter()
            .map(|(id, name)| RoomListing { id: isthmus_core::model::RemoteId::new(id), name })
            .collect()
    }

    async fn deliver(&self, event: Event) -> Result<Delivered, DeliveryError> {
        let Some(account) = event.account.clone() else {
            // Portal rooms are shared by everyone: no account, the XMPP user acts through their puppet.
            return match &self.portals {
                Some(portals) => portals.deliver(event).await,
                None => Err(DeliveryError::Rejected(format!(
                    "`{}` is not a portal room: this Matrix gateway has no application service (`appservice`) or `bot` for portal rooms",
                    event.chat.id
                ))),
            };
        };
        let session = self.session(&account).await?;
        let chat = &event.chat;
        debug!(account = %account, chat = %chat.id, kind = event.kind.name(), "Matrix delivery");
        // The idempotency key: the same for a replay of this very event, different for
        // every other one (a correction shares its original's key, so it adds its own id).
        let txn = appservice::transaction_id(&event);
        let txn = txn.as_str();
        let ids = match &event.kind {
            EventKind::JoinRequest { nick, .. } if chat.kind == ChatKind::Room => {
                session.enter(chat, nick).await?;
                Vec::new()
            }
            EventKind::Message(m) => session.send_message(chat, m, txn, event.receipt.as_ref()).await?,
            EventKind::Correction { target, message } => {
                session.send_edit(chat, &target.0, message, txn, event.receipt.as_ref()).await?
            }
            EventKind::Retraction { target, reason, .. } => {
                session.redact(chat, &target.0, reason.as_deref(), txn).await?
            }
            EventKind::Reactions { target, emojis } => session.set_reactions(chat, &target.0, emojis, txn).await?,
            EventKind::Typing(state) => {
                session.typing(chat, *state).await?;
                Vec::new()
            }
            EventKind::Displayed { target } => {
                session.displayed(chat, &target.0).await?;
                Vec::new()
            }
            EventKind::Topic { text } if chat.kind == ChatKind::Room => {
                session.set_topic(chat, text).await?;
                Vec::new()
            }
            // Leaving the MUC leaves the view, not the Matrix room; the rest has no Matrix form.
            _ => Vec::new(),
        };
        // Confirmed only once the homeserver has it: a replay after a crash in between
        // sends again with the same transaction id, which the homeserver deduplicates.
        if let Some(receipt) = &event.receipt {
            receipt.confirm().await;
        }
        Ok(Delivered::ids(ids))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn account_directories_are_distinct_and_safe() {
        let a = BareJid::new("alice@localhost").unwrap();
        let b = BareJid::new("alice_at_localhost@x").unwrap();
        assert_eq!(dir_name(&a), "alice_at_localhost");
        assert_ne!(dir_name(&a), dir_name(&b));
        assert!(!dir_name(&BareJid::new("a/b@x").unwrap_or(a)).contains('/'));
    }
}
