//! The contract between the core and each bridge.
//!
//! A bridge (one crate per network) implements [`Network`]: the router hands it
//! events to render on its network through [`Network::deliver`], and the bridge
//! hands the router what happens on its network through an [`EventSink`].
//! What a network can render natively beyond plain messages is declared in
//! [`Capabilities`]; for the rest the bridge applies its documented fallback
//! (a correction as a marked new line on IRC, for example), but it always
//! receives the event, so other networks in the same portal still get it natively.

use std::sync::Arc;

use async_trait::async_trait;
use thiserror::Error;
use tokio::sync::mpsc;

use std::collections::BTreeMap;

use crate::model::{ChatKind, Event, NetworkId, RemoteId};

/// What a network renders natively.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capabilities {
    pub formatted_bodies: bool,
    pub attachments: bool,
    pub replies: bool,
    pub threads: bool,
    pub corrections: bool,
    pub retractions: bool,
    pub reactions: bool,
    pub typing: bool,
    pub read_markers: bool,
    /// The network confirms what it accepted by echoing it back with its own id
    /// (IRCv3 echo-message, Matrix sync): the echo is the confirmation.
    pub echoes_own_messages: bool,
    /// Rooms exist only while someone is in them (IRC channels): a join that finds
    /// the room empty created it.
    pub rooms_exist_while_occupied: bool,
}

impl Capabilities {
    /// What a bot-bridged network renders natively (Telegram, Discord): formatted
    /// text, replies, edits, deletes, reactions and typing; no files, threads or
    /// read markers unless the bridge adds them.
    pub const fn bot() -> Self {
        Capabilities {
            formatted_bodies: true,
            attachments: false,
            replies: true,
            threads: false,
            corrections: true,
            retractions: true,
            reactions: true,
            typing: true,
            read_markers: false,
            echoes_own_messages: false,
            rooms_exist_while_occupied: false,
        }
    }

    /// Everything rendered natively.
    pub const fn all() -> Self {
        Capabilities {
            formatted_bodies: true,
            attachments: true,
            replies: true,
            threads: true,
            corrections: true,
            retractions: true,
            reactions: true,
            typing: true,
            read_markers: true,
            echoes_own_messages: true,
            rooms_exist_while_occupied: false,
        }
    }
}

/// What a successful delivery produced on the destination network.
#[derive(Debug, Default)]
pub struct Delivered {
    /// The ids the destination gave the event, in order (one XMPP message can become
    /// several IRC lines). Empty when the network has no ids (plain IRC).
    pub remote_ids: Vec<String>,
    /// The network confirms the event later (IRCv3 echo-message): its ids come
    /// then, and whatever tells the sender it was accepted waits for it.
    pub confirmation: Option<Confirmation>,
}

impl Delivered {
    pub fn ids(remote_ids: Vec<String>) -> Self {
        Delivered { remote_ids, confirmation: None }
    }

    /// Accepted, confirmed later through `confirmation`.
    pub fn later(confirmation: Confirmation) -> Self {
        Delivered { remote_ids: Vec::new(), confirmation: Some(confirmation) }
    }
}

/// A network's later word on a delivery it accepted: the ids it gave the event
/// once the remote side confirmed it (an IRC server echoing the message back), or
/// why the remote side refused it after all.
#[derive(Debug)]
pub struct Confirmation(tokio::sync::oneshot::Receiver<Result<Vec<String>, DeliveryError>>);

/// The network's end of a [`Confirmation`].
#[derive(Debug)]
pub struct Confirmer(tokio::sync::oneshot::Sender<Result<Vec<String>, DeliveryError>>);

impl Confirmation {
    pub fn channel() -> (Confirmer, Confirmation) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        (Confirmer(tx), Confirmation(rx))
    }

    /// Wait for the word. A network that dropped its end without one (it shut
    /// down, or lost the connection after sending) counts as accepted without ids.
    pub async fn wait(self) -> Result<Vec<String>, DeliveryError> {
        self.0.await.unwrap_or(Ok(Vec::new()))
    }
}

impl Confirmer {
    /// The remote side accepted the event and gave it these ids.
    pub fn confirm(self, ids: Vec<String>) {
        let _ = self.0.send(Ok(ids));
    }

    /// The remote side refused the event.
    pub fn refuse(self, error: DeliveryError) {
        let _ = self.0.send(Err(error));
    }
}

/// Why a delivery did not happen. Every variant carries a text fit for the sender.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum DeliveryError {
    /// The destination is temporarily unreachable; retrying later may succeed.
    #[error("{0}")]
    Unavailable(String),
    /// The destination refused this event (bad target, not joined, too long…).
    #[error("{0}")]
    Rejected(String),
    /// The sender may not do this.
    #[error("{0}")]
    Forbidden(String),
    /// What the sender asked for is taken (a nickname someone else has).
    #[error("{0}")]
    Conflict(String),
    /// No network by that name is configured.
    #[error("no network named `{0}` is configured")]
    UnknownNetwork(String),
}

impl DeliveryError {
    /// Whether a later retry may succeed.
    pub fn is_temporary(&self) -> bool {
        matches!(self, DeliveryError::Unavailable(_))
    }
}

/// One value a user gives to link their account on a network (a field of the
/// ad-hoc form and of in-band registration; a word of the `login` chat command).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginField {
    /// The field's name (`homeserver`, `user`, `password`).
    pub var: &'static str,
    /// What to show next to it.
    pub label: &'static str,
    /// Never echoed (a password or token).
    pub secret: bool,
    pub required: bool,
    /// Filled in when the user gives nothing.
    pub default: Option<String>,
}

/// The values a user gave for a network's [`LoginField`]s, by `var`.
pub type LoginValues = BTreeMap<String, String>;

/// Why linking or unlinking an account did not work; the text is for the user.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum LoginError {
    /// What the user gave cannot work (missing field, malformed address, not allowed here).
    #[error("{0}")]
    Invalid(String),
    /// The remote side refused (wrong password, unknown user).
    #[error("{0}")]
    Refused(String),
    /// The remote side could not be reached; trying again later may work.
    #[error("{0}")]
    Unavailable(String),
    /// This network has no accounts to link.
    #[error("this network has no accounts to link")]
    NotSupported,
}

/// How a [`SettingField`] is entered and shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SettingKind {
    /// One line of text.
    Text,
    /// One line never echoed back (a password): the form leaves it empty, and
    /// an empty answer keeps what is stored.
    Secret,
    /// Several lines (one value each).
    Lines,
}

/// One per-user setting a network keeps for one of its chats (an IRC server):
/// a field of the `configure` ad-hoc form, a `name=value` word of the chat command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingField {
    /// The field's name (`nick`, `sasl_password`).
    pub var: &'static str,
    /// What to show next to it.
    pub label: &'static str,
    pub kind: SettingKind,
    /// The current value (one per line for [`SettingKind::Lines`]); always empty for secrets.
    pub values: Vec<String>,
    /// Whether a value is stored (for secrets, whose value is never shown).
    pub is_set: bool,
}

/// Changed settings by `var`: a missing var is unchanged, an empty list (or a
/// single empty value) clears the setting.
pub type SettingValues = BTreeMap<String, Vec<String>>;

/// Why settings could not be shown or changed; the text is for the user. Nothing
/// is changed when this is returned.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum SettingsError {
    /// A value cannot work (an invalid nick, a line break in a password, an unknown field).
    #[error("{0}")]
    Invalid(String),
    /// The settings could not be read or written.
    #[error("{0}")]
    Unavailable(String),
    /// This chat has no settings.
    #[error("there are no settings here")]
    NotSupported,
}

/// A room a user can join, for the room directory (disco#items on the network's domain).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomListing {
    pub id: RemoteId,
    /// The room's name, when it has one.
    pub name: Option<String>,
}

/// A person as their network describes them: what the XMPP side shows in vCards
/// (XEP-0054), avatar hashes (XEP-0153) and nicknames (XEP-0172).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Profile {
    /// The name the person chose (a Matrix display name, an IRC nick).
    pub display_name: Option<String>,
    /// Their picture, when they have one.
    pub avatar: Option<Avatar>,
}

/// A person's picture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Avatar {
    pub data: AvatarData,
    /// The media type (`image/png`), when the network says or the bytes show it.
    pub mime: Option<String>,
}

/// Where a picture is: already fetched by the bridge (through the account's own
/// client, e.g. Matrix media), or at a public URL the XMPP side fetches itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AvatarData {
    Bytes(Vec<u8>),
    Url(String),
}

/// A network a bridge connects to.
#[async_trait]
pub trait Network: Send + Sync + 'static {
    /// The configured name of this network.
    fn id(&self) -> &NetworkId;

    /// What this network renders natively.
    fn capabilities(&self) -> Capabilities;

    /// What a remote id names on this network (a room, a person, the service), or
    /// `None` when it is not a valid id here. The XMPP side asks this to interpret a
    /// JID localpart.
    fn chat_kind(&self, id: &str) -> Option<ChatKind>;

    /// The name to show for a remote id (a person's nick, a room's name). By default the id itself.
    fn display_name(&self, id: &str) -> String {
        id.to_owned()
    }

    /// The profile of the person `id` as `account` sees them (`None`: a portal, seen
    /// by the gateway itself). By default only the [`Network::display_name`]; a network
    /// with pictures fetches them here. Called when an XMPP client asks for the
    /// person's vCard and when the person appears in a room; the XMPP side caches it.
    async fn profile(&self, _account: Option<&jid::BareJid>, id: &str) -> Result<Profile, DeliveryError> {
        Ok(Profile { display_name: Some(self.display_name(id)), avatar: None })
    }

    /// The id a person has after changing nick to `new_nick`, on networks where the
    /// id is the nick (IRC `nick%server`). By default the id does not change.
    fn renamed_id(&self, id: &str, _new_nick: &str) -> String {
        id.to_owned()
    }

    /// Whether the chat `id` can be linked to a portal while the gateway runs (the
    /// bridge serves whatever the portal directory holds). By default not: such a
    /// network's portals are those of its configuration.
    fn links_portals_at_run_time(&self, _id: &str) -> bool {
        false
    }

    /// One line per connection of `account` to this network, for status commands.
    async fn account_status(&self, _account: &jid::BareJid) -> Vec<String> {
        Vec::new()
    }

    /// How `account` reaches the chat `id` through this network, one line per
    /// connection involved (`None`: a portal room, reached by the gateway itself),
    /// for a room's `status` command. By default the account's connections
    /// ([`Network::account_status`]).
    async fn chat_status(&self, account: Option<&jid::BareJid>, _id: &str) -> Vec<String> {
        match account {
            Some(account) => self.account_status(account).await,
            None => Vec::new(),
        }
    }

    /// The XMPP accounts with a session on this network now (an IRC connection, a
    /// Matrix login), sorted, for the admin's `users` command; `None` (the default)
    /// when the network does not report them. Each one's sessions are told by
    /// [`Network::account_status`].
    async fn accounts(&self) -> Option<Vec<jid::BareJid>> {
        None
    }

    /// Close `account`'s sessions on this network for an admin, saying `reason` where
    /// the network shows one (an IRC QUIT): nothing is unlinked or logged out, and
    /// the account may come back. Returns a line per session closed; `None` (the
    /// default) when the network cannot do this.
    async fn disconnect(&self, _account: &jid::BareJid, _reason: &str) -> Option<Vec<String>> {
        None
    }

    /// The state of this network's connections as a whole (per IRC server: how many
    /// are online), for the admin's link status. Empty by default.
    async fn connections_status(&self) -> Vec<String> {
        Vec::new()
    }

    /// What a user gives to link their account (empty: this network needs no login,
    /// like IRC, where a connection opens at the first join).
    fn login_fields(&self) -> Vec<LoginField> {
        Vec::new()
    }

    /// Link `account` to a remote account with the given values; on success, a text
    /// for the user saying who they are now on the network.
    async fn login(&self, _account: &jid::BareJid, _values: &LoginValues) -> Result<String, LoginError> {
        Err(LoginError::NotSupported)
    }

    /// Unlink `account`'s remote account; on success, a text for the user.
    async fn logout(&self, _account: &jid::BareJid) -> Result<String, LoginError> {
        Err(LoginError::NotSupported)
    }

    /// `account`'s own settings for the chat `id` (an IRC server), with their
    /// current values, or [`SettingsError::NotSupported`] when it has none.
    async fn settings(&self, _account: &jid::BareJid, _id: &str) -> Result<Vec<SettingField>, SettingsError> {
        Err(SettingsError::NotSupported)
    }

    /// Change `account`'s settings for the chat `id`; on success, a text for the
    /// user saying what changed. All or nothing: an invalid value changes nothing.
    async fn configure(
        &self,
        _account: &jid::BareJid,
        _id: &str,
        _values: &SettingValues,
    ) -> Result<String, SettingsError> {
        Err(SettingsError::NotSupported)
    }

    /// The rooms `account` can join, for the room directory.
    async fn rooms(&self, _account: &jid::BareJid) -> Vec<RoomListing> {
        Vec::new()
    }

    /// Render one event on this network. References inside the event
    /// ([`crate::model::MessageRef`]) are already in this network's id space
    /// where the id map knew them.
    async fn deliver(&self, event: Event) -> Result<Delivered, DeliveryError>;

    /// Whether an event this network may have got already can be delivered again
    /// without being shown twice (XMPP: clients and archives know a message by its
    /// stanza-id, which is the event's key). After a crash, such a network gets what
    /// was being written to it again; any other is not sent it twice.
    fn redelivery_shows_once(&self) -> bool {
        false
    }

    /// What became of an event from this network that an earlier run accepted and
    /// had not yet delivered to `destination` when it stopped: delivered after the
    /// restart, or not (it was being written when the gateway stopped and may not
    /// have arrived, or it is refused now). The network tells the sender; by
    /// default nothing is said.
    async fn replayed(&self, _event: &Event, _destination: &NetworkId, _outcome: Result<(), DeliveryError>) {}
}

/// Where a bridge sends what happens on its network. Cheap to clone.
#[derive(Debug, Clone)]
pub struct EventSink {
    tx: mpsc::Sender<Event>,
}

/// The receiving end of an [`EventSink`], drained by the router.
pub type EventStream = mpsc::Receiver<Event>;

/// The sink is closed: the gateway is shutting down.
#[derive(Debug, Error)]
#[error("the gateway is shutting down; event not accepted")]
pub struct SinkClosed;

impl EventSink {
    /// A sink and the stream the router reads. `capacity` bounds memory: a bridge
    /// that produces faster than the router delivers waits.
    pub fn channel(capacity: usize) -> (EventSink, EventStream) {
        let (tx, rx) = mpsc::channel(capacity);
        (EventSink { tx }, rx)
    }

    /// Hand one event to the router, waiting when it is busy.
    /// Hand an event over without waiting; `Err` gives it back when the sink is full
    /// or closed.
    pub fn try_emit(&self, event: Event) -> Result<(), Box<Event>> {
        self.tx.try_send(event).map_err(|e| Box::new(e.into_inner()))
    }

    pub async fn emit(&self, event: Event) -> Result<(), SinkClosed> {
        self.tx.send(event).await.map_err(|_| SinkClosed)
    }

    /// Hand one event to the router; the answer resolves once the router has taken
    /// it in for good: every copy is in the durable outbox (or delivered) and its
    /// ids are in the id map. A bridge that must not lose what a remote side
    /// handed it (and cannot ask for it again) acknowledges the remote side after that.
    pub async fn emit_routed(&self, mut event: Event) -> Result<Routed, SinkClosed> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        event.routed = Some(RoutedSignal(Arc::new(std::sync::Mutex::new(Some(tx)))));
        self.tx.send(event).await.map_err(|_| SinkClosed)?;
        Ok(Routed(rx))
    }
}

/// Resolves when the router has taken an event in for good (see [`EventSink::emit_routed`]).
#[derive(Debug)]
pub struct Routed(tokio::sync::oneshot::Receiver<()>);

impl Routed {
    /// Wait; `false` when the gateway shut down first.
    pub async fn wait(self) -> bool {
        self.0.await.is_ok()
    }
}

/// The router's side of [`Routed`], carried by the event (never stored).
#[derive(Debug, Clone)]
pub struct RoutedSignal(Arc<std::sync::Mutex<Option<tokio::sync::oneshot::Sender<()>>>>);

impl RoutedSignal {
    /// Tell the bridge the event is safe.
    pub fn fire(&self) {
        if let Some(tx) = self.0.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = tx.send(());
        }
    }
}

impl PartialEq for RoutedSignal {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}
