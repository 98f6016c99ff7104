//! Isthmus IRC bridge.
//!
//! Personal mode, Biboumi style: each XMPP user gets their own IRC connection to
//! each server they use, shared by all of their XMPP resources. Rooms are spelled
//! `#channel%server` and people `nick%server` (the server alone names the
//! server); a network entry with a pinned server also accepts `#channel` and `nick`.
//!
//! - [`address`]: parsing and building those identifiers;
//! - [`text`]: making XMPP text safe and correctly sized for IRC lines;
//! - [`flood`]: the per-connection token bucket;
//! - [`format`]: IRC formatting codes ↔ XEP-0393 styling;
//! - [`fallback`]: how corrections, retractions and reactions look on IRC;
//! - [`wire`]: decoding lines that are not UTF-8 (the server's fallback encoding);
//! - [`settings`]: each user's own nick and logins per server (`configure`);
//! - [`certfp`]: the client certificates the gateway makes for users (SASL EXTERNAL);
//! - [`connection`]: one IRC connection and the task that translates its traffic;
//! - `fuzzing`: that translation driven by hand, for the fuzz targets and unit tests;
//! - this file: [`IrcNetwork`], the [`Network`] the router talks to.
//!
//! Depends on `isthmus-core` and `isthmus-config` only.

pub mod address;
mod answers;
pub mod certfp;
pub mod connection;
pub mod fallback;
pub mod flood;
pub mod format;
#[doc(hidden)]
pub mod fuzzing;
pub mod settings;
pub mod text;
pub mod wire;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use isthmus_config::IrcNetworkConfig;
use isthmus_core::jid::BareJid;
use isthmus_core::model::{ChatKind, Event, EventKind, NetworkId, RemoteId};
use isthmus_core::network::{
    Capabilities, Confirmation, Delivered, DeliveryError, EventSink, Network, RoomListing, SettingField, SettingValues,
    SettingsError,
};
use isthmus_core::store::Store;
use tokio::sync::Mutex;
use tracing::{debug, info, warn};

use crate::address::IrcTarget;
use crate::connection::{Connection, ConnectionKey, ReconnectPolicy};
use crate::settings::UserSettings;

/// A message handed to the connection: confirmed once the server acknowledged it.
fn delivered((_, confirmation): (usize, Confirmation)) -> Delivered {
    Delivered::later(confirmation)
}

/// One configured IRC network (one component domain), with every user's connections.
pub struct IrcNetwork {
    id: NetworkId,
    config: Arc<IrcNetworkConfig>,
    sink: EventSink,
    connections: Mutex<HashMap<ConnectionKey, Arc<Connection>>>,
    /// Connections closed because their user left every channel, until they have
    /// quit: a new connection of the same user to the same server waits for that,
    /// so that the old one's nick is free again and its last lines come first.
    closing: std::sync::Mutex<HashMap<ConnectionKey, Arc<Connection>>>,
    policy: ReconnectPolicy,
    /// Where each user's own settings per server are kept (none: `configure` is unavailable).
    store: Option<Store>,
}

impl IrcNetwork {
    pub fn new(id: NetworkId, config: IrcNetworkConfig, store: Option<Store>, sink: EventSink) -> Arc<Self> {
        let policy = ReconnectPolicy::with_limit(config.max_concurrent_connects);
        Self::with_policy(id, config, store, sink, policy)
    }

    /// Like [`IrcNetwork::new`] with explicit reconnect timing.
    pub fn with_policy(
        id: NetworkId,
        config: IrcNetworkConfig,
        store: Option<Store>,
        sink: EventSink,
        policy: ReconnectPolicy,
    ) -> Arc<Self> {
        let connections = Mutex::new(HashMap::new());
        let closing = std::sync::Mutex::new(HashMap::new());
        Arc::new(IrcNetwork { id, config: Arc::new(config), sink, connections, closing, policy, store })
    }

    /// `account`'s own settings for `server` (the defaults when none are stored).
    async fn user_settings(&self, account: &BareJid, server: &str) -> Result<UserSettings, SettingsError> {
        let store = self.store.as_ref().ok_or(SettingsError::NotSupported)?;
        let unavailable = |e: String| SettingsError::Unavailable(format!("cannot read your settings: {e}"));
        match store.user_settings(&account.to_string(), self.id.as_str(), server).await {
            Ok(Some(json)) => serde_json::from_str(&json).map_err(|e| unavailable(e.to_string())),
            Ok(None) => Ok(UserSettings::default()),
            Err(e) => Err(unavailable(e.to_string())),
        }
    }

    /// The server a chat id names, when it names a server this gateway connects to.
    fn settings_server(&self, id: &str) -> Result<String, SettingsError> {
        let target = IrcTarget::parse(id, self.config.pinned_server.as_deref())
            .map_err(|e| SettingsError::Invalid(e.to_string()))?;
        if !target.name.is_empty() {
            return Err(SettingsError::NotSupported);
        }
        if !self.config.servers.contains_key(&target.server) && !self.config.allow_unlisted_servers {
            return Err(SettingsError::Invalid(Self::unlisted(&target.server).to_string()));
        }
        Ok(target.server)
    }

    pub fn config(&self) -> &IrcNetworkConfig {
        &self.config
    }

    /// The live connection of `account` to `server`, if any.
    pub async fn connection(&self, account: &BareJid, server: &str) -> Option<Arc<Connection>> {
        let key = ConnectionKey { account: account.clone(), server: server.to_owned() };
        let map = self.connections.lock().await;
        map.get(&key).filter(|c| c.is_alive()).cloned()
    }

    fn unlisted(server: &str) -> DeliveryError {
        DeliveryError::Forbidden(format!(
            "the IRC server `{server}` is not one this gateway connects to; ask the admin to add it"
        ))
    }

    /// The open connection of `account` to `server`, or the reason there is none.
    async fn open_connection(&self, account: &BareJid, server: &str) -> Result<Arc<Connection>, DeliveryError> {
        if !self.config.servers.contains_key(server) && !self.config.allow_unlisted_servers {
            return Err(Self::unlisted(server));
        }
        self.connection(account, server)
            .await
            .ok_or_else(|| DeliveryError::Unavailable(format!("not connected to {server}: join a room on it first")))
    }

    /// How long a new connection waits for the same user's previous one to quit.
    const QUIT_WAIT: Duration = Duration::from_secs(5);

    fn closing(&self) -> std::sync::MutexGuard<'_, HashMap<ConnectionKey, Arc<Connection>>> {
        self.closing.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The connection of `account` to `server`, opened with `nick` when there is none.
    async fn connect(&self, account: &BareJid, server: &str, nick: &str) -> Result<Arc<Connection>, DeliveryError> {
        let key = ConnectionKey { account: account.clone(), server: server.to_owned() };
        // Left and joined again at once: the previous connection quits first.
        let previous = self.closing().remove(&key);
        if let Some(previous) = previous
            && !previous.wait_finished(Self::QUIT_WAIT).await
        {
            debug!(account = %account, server, "the previous IRC connection did not finish quitting in time");
        }
        let mut map = self.connections.lock().await;
        if let Some(conn) = map.get(&key).filter(|c| c.is_alive()) {
            return Ok(conn.clone());
        }
        let max = self.config.max_servers_per_account;
        let open = map.iter().filter(|(k, c)| &k.account == account && c.is_alive()).count();
        if open >= max {
            warn!(account = %account, server, open, max, "IRC connection refused: the account has as many as it may");
            return Err(DeliveryError::Forbidden(format!(
                "you are connected to {open} IRC servers through this gateway, as many as it allows ({max}): \
                 leave every channel of one of them first"
            )));
        }
        let server_config = match self.config.servers.get(server) {
            Some(s) => s.clone(),
            None if self.config.allow_unlisted_servers => Default::default(),
            None => return Err(Self::unlisted(server)),
        };
        // The user's own settings win over the admin's defaults.
        let user = match self.user_settings(account, server).await {
            Ok(u) => u,
            Err(SettingsError::NotSupported) => UserSettings::default(),
            Err(e) => {
                warn!(account = %account, server, error = %e, "connecting without the user's settings");
                UserSettings::default()
            }
        };
        let (server_config, identity) = user.over(server_config);
        let nick = user.nick.as_deref().unwrap_or(nick);
        info!(account = %account, server, nick, "opening IRC connection");
        let conn = Connection::open(
            self.id.clone(),
            key.clone(),
            nick.to_owned(),
            server_config,
            identity,
            self.config.clone(),
            self.sink.clone(),
            self.policy.clone(),
        );
        map.insert(key, conn.clone());
        Ok(conn)
    }

    fn target(&self, event: &Event) -> Result<IrcTarget, DeliveryError> {
        IrcTarget::parse(event.chat.id.as_str(), self.config.pinned_server.as_deref())
            .map_err(|e| DeliveryError::Rejected(e.to_string()))
    }
}

#[async_trait]
impl Network for IrcNetwork {
    fn id(&self) -> &NetworkId {
        &self.id
    }

    fn capabilities(&self) -> Capabilities {
        // A channel exists while someone is in it: joining an empty one creates it.
        Capabilities { rooms_exist_while_occupied: true, ..Capabilities::default() }
    }

    fn renamed_id(&self, id: &str, new_nick: &str) -> String {
        match IrcTarget::parse(id, self.config.pinned_server.as_deref()) {
            Ok(t) if !t.is_channel() && !t.name.is_empty() => address::chat_id(new_nick, &t.server),
            _ => id.to_owned(),
        }
    }

    async fn account_status(&self, account: &BareJid) -> Vec<String> {
        let map = self.connections.lock().await;
        let mut lines: Vec<String> = map
            .iter()
            .filter(|(k, c)| &k.account == account && c.is_alive())
            .map(|(k, c)| {
                let channels = c.channel_names();
                let state =
                    if c.is_online() { format!("connected as {}", c.nick()) } else { "reconnecting".to_owned() };
                if channels.is_empty() {
                    format!("{}: {state}", k.server)
                } else {
                    format!("{}: {state}, in {}", k.server, channels.join(", "))
                }
            })
            .collect();
        lines.sort();
        lines
    }

    async fn accounts(&self) -> Option<Vec<BareJid>> {
        let map = self.connections.lock().await;
        let mut accounts: Vec<BareJid> =
            map.iter().filter(|(_, c)| c.is_alive()).map(|(k, _)| k.account.clone()).collect();
        accounts.sort();
        accounts.dedup();
        Some(accounts)
    }

    async fn disconnect(&self, account: &BareJid, reason: &str) -> Option<Vec<String>> {
        let closed: Vec<(ConnectionKey, Arc<Connection>)> = {
            let mut map = self.connections.lock().await;
            let keys: Vec<ConnectionKey> = map.keys().filter(|k| &k.account == account).cloned().collect();
            keys.into_iter().filter_map(|k| map.remove(&k).map(|c| (k, c))).collect()
        };
        let mut lines = Vec::new();
        let mut closing = self.closing();
        closing.retain(|_, c| !c.has_finished());
        for (key, conn) in closed {
            if !conn.is_alive() {
                continue;
            }
            info!(account = %account, server = %key.server, reason, "IRC connection closed by an admin");
            lines.push(format!("{}: quit as {}", key.server, conn.nick()));
            conn.close(reason);
            // A new connection of the same user waits for this one to have quit.
            closing.insert(key, conn);
        }
        lines.sort();
        Some(lines)
    }

    async fn connections_status(&self) -> Vec<String> {
        let map = self.connections.lock().await;
        // Per server: (connections, online).
        let mut servers: std::collections::BTreeMap<&str, (usize, usize)> = std::collections::BTreeMap::new();
        for (k, c) in map.iter().filter(|(_, c)| c.is_alive()) {
            let entry = servers.entry(k.server.as_str()).or_default();
            entry.0 += 1;
            entry.1 += usize::from(c.is_online());
        }
        if servers.is_empty() {
            return vec!["no IRC connections".to_owned()];
        }
        servers
            .into_iter()
            .map(|(server, (all, online))| {
                let down = all - online;
                let mut line =
                    format!("{server}: {all} connection{}, {online} online", if all == 1 { "" } else { "s" });
                if down > 0 {
                    line += &format!(", {down} reconnecting");
                }
                line
            })
            .collect()
    }

    async fn chat_status(&self, account: Option<&BareJid>, id: &str) -> Vec<String> {
        let Ok(target) = IrcTarget::parse(id, self.config.pinned_server.as_deref()) else { return Vec::new() };
        let Some(account) = account else { return Vec::new() };
        let server = &target.server;
        let line = match self.connection(account, server).await {
            None => format!("IRC server {server}: not connected"),
            Some(c) if !c.is_online() => format!("IRC server {server}: connection lost, reconnecting"),
            Some(c) => {
                let mut line = format!("IRC server {server}: connected as {}", c.nick());
                if target.is_channel() {
                    let folded = target.name.to_lowercase();
                    let inside = c.channel_names().iter().any(|n| n.to_lowercase() == folded);
                    line += &format!(", {} {}", if inside { "in" } else { "not in" }, target.name);
                }
                line
            }
        };
        vec![line]
    }

    async fn settings(&self, account: &BareJid, id: &str) -> Result<Vec<SettingField>, SettingsError> {
        let server = self.settings_server(id)?;
        Ok(self.user_settings(account, &server).await?.fields())
    }

    async fn configure(&self, account: &BareJid, id: &str, values: &SettingValues) -> Result<String, SettingsError> {
        let server = self.settings_server(id)?;
        let current = self.user_settings(account, &server).await?;
        let config = self.config.servers.get(&server).cloned().unwrap_or_default();
        let (next, changed) = current.apply(values, &server, &config)?;
        if !changed.is_empty() {
            let store = self.store.as_ref().ok_or(SettingsError::NotSupported)?;
            let json = serde_json::to_string(&next).map_err(|e| SettingsError::Unavailable(e.to_string()))?;
            store
                .set_user_settings(&account.to_string(), self.id.as_str(), &server, &json)
                .await
                .map_err(|e| SettingsError::Unavailable(format!("cannot store your settings: {e}")))?;
            info!(account = %account, server, changed = ?changed, "IRC settings changed");
        }
        Ok(next.describe(&changed, values.contains_key("certfp")))
    }

    /// The public channels of every server the account is connected to (IRC LIST).
    async fn rooms(&self, account: &BareJid) -> Vec<RoomListing> {
        let connections: Vec<(String, Arc<Connection>)> = {
            let map = self.connections.lock().await;
            map.iter()
                .filter(|(k, c)| &k.account == account && c.is_alive() && c.is_online())
                .map(|(k, c)| (k.server.clone(), c.clone()))
                .collect()
        };
        let mut rooms = Vec::new();
        for (server, conn) in connections {
            let Some(channels) = conn.list_channels(Duration::from_secs(15)).await else {
                debug!(server, "the IRC server did not finish its channel list in time");
                continue;
            };
            for c in channels {
                let name = if c.topic.is_empty() {
                    format!("{} ({} users)", c.name, c.users)
                } else {
                    format!("{} ({} users): {}", c.name, c.users, c.topic)
                };
                rooms.push(RoomListing { id: RemoteId::new(address::chat_id(&c.name, &server)), name: Some(name) });
            }
        }
        rooms.sort_by(|a, b| a.id.cmp(&b.id));
        rooms
    }

    fn display_name(&self, id: &str) -> String {
        match IrcTarget::parse(id, self.config.pinned_server.as_deref()) {
            Ok(t) if !t.name.is_empty() => t.name,
            Ok(t) => t.server,
            Err(_) => id.to_owned(),
        }
    }

    fn chat_kind(&self, id: &str) -> Option<ChatKind> {
        let target = IrcTarget::parse(id, self.config.pinned_server.as_deref()).ok()?;
        Some(if target.name.is_empty() {
            ChatKind::Service
        } else if target.is_channel() {
            ChatKind::Room
        } else {
            ChatKind::Direct
        })
    }

    async fn deliver(&self, event: Event) -> Result<Delivered, DeliveryError> {
        let account = event
            .account
            .clone()
            .ok_or_else(|| DeliveryError::Rejected("IRC rooms are personal: the event names no XMPP account".into()))?;
        let target = self.target(&event)?;
        debug!(account = %account, target = ?target, kind = event.kind.name(), "IRC delivery");
        match (&event.kind, event.chat.kind) {
            (EventKind::JoinRequest { nick, password }, ChatKind::Room) => {
                let conn = self.connect(&account, &target.server, nick).await?;
                conn.join(&target.name, password.as_deref())?;
                Ok(Delivered::default())
            }
            (EventKind::Left { reason, .. }, ChatKind::Room) if event.sender.is_self => {
                if let Some(conn) = self.connection(&account, &target.server).await
                    && !conn.part(&target.name, reason.as_deref())?
                {
                    // Left every channel on this server: the connection is no longer needed.
                    conn.close("left all channels");
                    let key = ConnectionKey { account, server: target.server };
                    self.connections.lock().await.remove(&key);
                    let mut closing = self.closing();
                    closing.retain(|_, c| !c.has_finished());
                    closing.insert(key, conn);
                }
                Ok(Delivered::default())
            }
            (EventKind::Message(message), ChatKind::Service) => {
                // Messages to the server's JID are raw IRC commands, one per line.
                let conn = self.open_connection(&account, &target.server).await?;
                conn.send_raw(&message.body)?;
                Ok(Delivered::default())
            }
            (EventKind::Message(message), _) => {
                let conn = self.open_connection(&account, &target.server).await?;
                // A reply says whom and what it answers, by the configured fallback.
                let reply = fallback::reply(message, self.config.fallbacks.replies);
                let message = reply.as_ref().unwrap_or(message);
                // Plain IRC gives messages no ids; with echo-message the echo brings them.
                Ok(delivered(conn.send_message(&target.name, message, event.receipt.clone())?))
            }
            (EventKind::Correction { .. } | EventKind::Retraction { .. } | EventKind::Reactions { .. }, _) => {
                // No IRC form: render the documented fallback, if any.
                let Some(message) = fallback::render(&event, &self.config.fallbacks) else {
                    return Ok(Delivered::default());
                };
                let conn = self.open_connection(&account, &target.server).await?;
                Ok(delivered(conn.send_message(&target.name, &message, event.receipt.clone())?))
            }
            (EventKind::NickChanged { new_nick }, ChatKind::Room) if event.sender.is_self => {
                let conn = self
                    .connection(&account, &target.server)
                    .await
                    .ok_or_else(|| DeliveryError::Unavailable(format!("not connected to {}", target.server)))?;
                let answer = conn.change_nick(new_nick)?;
                // Online, the server answers at once: a refusal (nick taken) is the request's error.
                if conn.is_online() {
                    answers::outcome(answer).await?;
                }
                Ok(Delivered::default())
            }
            (EventKind::Topic { text }, ChatKind::Room) => {
                let conn = self
                    .connection(&account, &target.server)
                    .await
                    .ok_or_else(|| DeliveryError::Unavailable(format!("not connected to {}", target.server)))?;
                let answer = conn.set_topic(&target.name, text)?;
                if conn.is_online() {
                    answers::outcome(answer).await?;
                }
                Ok(Delivered::default())
            }
            (EventKind::Typing(state), ChatKind::Room | ChatKind::Direct) => {
                // Best effort: only servers carrying IRCv3 client tags have typing notifications.
                if let Some(conn) = self.connection(&account, &target.server).await {
                    conn.send_typing(&target.name, *state)?;
                }
                Ok(Delivered::default())
            }
            // Everything else has no IRC form yet; accepted and not rendered.
            _ => Ok(Delivered::default()),
        }
    }
}
