//! The common message model.
//!
//! Every network translates its own events into [`Event`]s and back. The model
//! is the union of what XMPP, IRC, Matrix, Telegram and Discord carry: plain and
//! formatted bodies, attachments, replies, threads, corrections, retractions,
//! full reaction sets, membership, topics, typing and read markers. A network
//! that cannot render something natively still receives it and applies its own
//! documented fallback (see [`crate::network::Capabilities`]).

use std::fmt;
use std::time::SystemTime;

use jid::BareJid;
use serde::{Deserialize, Serialize};

use crate::outbox::Receipt;

/// The configured name of a network, e.g. `irc` or `libera`. The XMPP side is [`NetworkId::xmpp`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NetworkId(String);

impl NetworkId {
    /// Name reserved for the XMPP side of the gateway.
    pub const XMPP: &'static str = "xmpp";

    pub fn new(name: impl Into<String>) -> Self {
        NetworkId(name.into())
    }
    pub fn xmpp() -> Self {
        NetworkId(Self::XMPP.to_owned())
    }
    pub fn is_xmpp(&self) -> bool {
        self.0 == Self::XMPP
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NetworkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An identifier as a remote network spells it (channel, room id, user id, snowflake…).
///
/// IRC identifiers carry their server, Biboumi style: `#chan%irc.server`, `nick%irc.server`,
/// and the bare server name for the server itself.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RemoteId(pub String);

impl RemoteId {
    pub fn new(id: impl Into<String>) -> Self {
        RemoteId(id.into())
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RemoteId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Which kind of conversation an event belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ChatKind {
    /// A group conversation (IRC channel, Matrix room, Telegram group, Discord channel): a MUC on XMPP.
    Room,
    /// A one-to-one conversation with a remote person: a contact on XMPP.
    Direct,
    /// The remote server or service itself (IRC server notices, raw commands).
    Service,
}

/// The conversation an event is about: a room or contact on one network.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ChatRef {
    pub network: NetworkId,
    pub kind: ChatKind,
    pub id: RemoteId,
}

impl ChatRef {
    pub fn room(network: NetworkId, id: impl Into<String>) -> Self {
        ChatRef { network, kind: ChatKind::Room, id: RemoteId::new(id) }
    }
    pub fn direct(network: NetworkId, id: impl Into<String>) -> Self {
        ChatRef { network, kind: ChatKind::Direct, id: RemoteId::new(id) }
    }
    pub fn service(network: NetworkId, id: impl Into<String>) -> Self {
        ChatRef { network, kind: ChatKind::Service, id: RemoteId::new(id) }
    }
    /// The scope under which message ids of this chat are stored in the id map.
    pub fn scope(&self) -> String {
        format!("{}:{}", self.network, self.id)
    }
}

/// The logical identity of one bridged message across all networks (a UUID).
///
/// The id map stores, for each key, the ids the message has on each network.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MessageKey(pub String);

impl MessageKey {
    pub fn generate() -> Self {
        MessageKey(uuid::Uuid::new_v4().to_string())
    }
}

impl fmt::Display for MessageKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A reference to an earlier message (reply, correction, retraction, reaction, marker target).
///
/// Inside an event it is spelled in the id space of the network that holds the
/// event at that moment: the origin's ids when the bridge emits it, the
/// destination's ids when the router hands it over.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MessageRef(pub String);

/// Who did it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sender {
    /// The sender's id on the origin network (IRC `nick%server`, mxid, bare JID on XMPP…).
    pub id: RemoteId,
    /// The name to show (IRC nick, MUC nick, display name).
    pub nick: String,
    /// True when this is the gateway user's own action as seen from the remote network
    /// (their own join confirmed, their own message echoed).
    pub is_self: bool,
}

impl Sender {
    pub fn new(id: impl Into<String>, nick: impl Into<String>) -> Self {
        Sender { id: RemoteId::new(id), nick: nick.into(), is_self: false }
    }
    pub fn own(id: impl Into<String>, nick: impl Into<String>) -> Self {
        Sender { id: RemoteId::new(id), nick: nick.into(), is_self: true }
    }
}

/// Markup flavour of a formatted body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TextFormat {
    /// XHTML/HTML subset (Matrix `org.matrix.custom.html`, Telegram HTML).
    Html,
    /// XEP-0393 message styling (also close to Discord/Telegram markdown).
    Styling,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FormattedBody {
    pub format: TextFormat,
    pub text: String,
}

/// A file attached to a message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    /// Where the file can be fetched (HTTP upload URL, Matrix media URL made fetchable, …).
    pub url: String,
    pub name: Option<String>,
    pub mime: Option<String>,
    pub size: Option<u64>,
}

/// The message a reply answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplyTo {
    pub target: MessageRef,
    /// Who wrote the quoted message, when known (for fallbacks on networks without replies).
    pub author: Option<String>,
    /// A short quote of the target for text fallbacks.
    pub quote: Option<String>,
}

/// An excerpt of an earlier message, for networks that render references as text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quote {
    /// Who wrote it.
    pub author: String,
    /// What it said (possibly shortened).
    pub text: String,
}

/// A chat message's content.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Message {
    /// Plain-text body, always present (may be empty when only attachments are sent).
    pub body: String,
    pub formatted: Option<FormattedBody>,
    pub attachments: Vec<Attachment>,
    pub reply_to: Option<ReplyTo>,
    /// Thread identifier in the origin network's id space.
    pub thread: Option<MessageRef>,
    /// `/me` action (IRC CTCP ACTION, XMPP body starting with `/me `).
    pub action: bool,
    /// A notice rather than a conversational message (IRC NOTICE, Matrix m.notice).
    pub notice: bool,
}

impl Message {
    pub fn text(body: impl Into<String>) -> Self {
        Message { body: body.into(), ..Default::default() }
    }
}

/// A person's place in a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Role {
    Moderator,
    #[default]
    Participant,
    Visitor,
}

/// A person's standing in a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Affiliation {
    Owner,
    Admin,
    Member,
    #[default]
    None,
    Outcast,
}

/// One person present in a room.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Occupant {
    pub id: RemoteId,
    pub nick: String,
    pub role: Role,
    pub affiliation: Affiliation,
}

/// Why someone left a room.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LeaveKind {
    /// Left the room (IRC PART).
    Part,
    /// Left the network (IRC QUIT): gone from every room.
    Quit,
    /// Removed by someone.
    Kick { by: Option<String> },
    /// Removed and banned.
    Ban { by: Option<String> },
    /// The gateway lost its link to the network.
    Disconnected,
}

/// Typing notifications (XEP-0085 states; Matrix/Telegram/Discord typing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChatState {
    Active,
    Composing,
    Paused,
    Inactive,
    Gone,
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum EventKind {
    /// A new message.
    Message(Message),
    /// A replacement for an earlier message (the target is always the original, never a correction).
    Correction { target: MessageRef, message: Message },
    /// An earlier message withdrawn by its author, or removed by a moderator.
    Retraction { target: MessageRef, moderator: Option<String>, reason: Option<String> },
    /// The full set of reactions the sender now has on the target (empty = all removed).
    Reactions { target: MessageRef, emojis: Vec<String> },
    /// The gateway user's own join completed: their nick as the network gave it, who is there, the topic.
    SelfJoined { nick: String, occupants: Vec<Occupant>, topic: Option<String> },
    /// The gateway user asked to join a room (XMPP → network); `password` is the room key.
    JoinRequest { nick: String, password: Option<String> },
    /// A join failed; the text says why.
    JoinFailed { reason: String },
    /// Someone else entered the room.
    Joined { occupant: Occupant },
    /// Someone (the gateway user when `sender.is_self`) left the room.
    Left { kind: LeaveKind, reason: Option<String> },
    /// Someone changed nick.
    NickChanged { new_nick: String },
    /// Someone's role or affiliation changed.
    RoleChanged { role: Role, affiliation: Affiliation },
    /// The room topic, set by the sender.
    Topic { text: String },
    /// Typing state of the sender.
    Typing(ChatState),
    /// The sender has displayed everything up to the target.
    Displayed { target: MessageRef },
    /// A notice about the gateway or link state (server away, reconnected) to show in the chat.
    Status { text: String },
}

impl EventKind {
    /// A short name for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::Message(_) => "message",
            EventKind::Correction { .. } => "correction",
            EventKind::Retraction { .. } => "retraction",
            EventKind::Reactions { .. } => "reactions",
            EventKind::SelfJoined { .. } => "self-joined",
            EventKind::JoinRequest { .. } => "join-request",
            EventKind::JoinFailed { .. } => "join-failed",
            EventKind::Joined { .. } => "joined",
            EventKind::Left { .. } => "left",
            EventKind::NickChanged { .. } => "nick-changed",
            EventKind::RoleChanged { .. } => "role-changed",
            EventKind::Topic { .. } => "topic",
            EventKind::Typing(_) => "typing",
            EventKind::Displayed { .. } => "displayed",
            EventKind::Status { .. } => "status",
        }
    }

    /// Whether this kind of event gets an entry in the message id map (its own ids are
    /// needed later: edits and retractions target messages, removing a Matrix reaction
    /// redacts the reaction event).
    pub fn is_message_like(&self) -> bool {
        matches!(
            self,
            EventKind::Message(_)
                | EventKind::Correction { .. }
                | EventKind::Retraction { .. }
                | EventKind::Reactions { .. }
        )
    }

    /// The message this event refers to, if it is a correction, retraction, reaction or marker.
    pub fn target(&self) -> Option<&MessageRef> {
        match self {
            EventKind::Correction { target, .. }
            | EventKind::Retraction { target, .. }
            | EventKind::Reactions { target, .. }
            | EventKind::Displayed { target } => Some(target),
            _ => None,
        }
    }
}

/// One thing that happened, on one network, in one chat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// The logical message key (shared by every copy of this event on every network).
    pub key: MessageKey,
    /// The network the event came from (`xmpp` for the XMPP side).
    pub origin: NetworkId,
    /// The ids the event has on its origin network (XMPP origin-id / message id, IRC msgid,
    /// Matrix event id…). Empty when the network gives none.
    pub origin_ids: Vec<String>,
    /// Personal mode: the XMPP account whose session this is (IRC connection owner,
    /// Matrix login). `None` for portal rooms shared by everyone.
    #[serde(with = "opt_bare_jid")]
    pub account: Option<BareJid>,
    /// The conversation, spelled as the network holding the event at that moment knows it.
    pub chat: ChatRef,
    pub sender: Sender,
    /// When it happened (remote server time when the network says, else reception time).
    pub time: SystemTime,
    /// True when `time` came from the remote side (IRC server-time, history replay).
    pub delayed: bool,
    pub kind: EventKind,
    /// The message a correction, retraction or reaction refers to, as text, for
    /// networks that can only render those as text (filled when the origin knows it).
    pub context: Option<Quote>,
    /// Set on the copy handed to a destination when the event waits in the durable
    /// outbox: the destination confirms it right before the event leaves the process.
    #[serde(skip)]
    pub receipt: Option<Receipt>,
    /// Set by a bridge that waits until the router has taken the event in for good
    /// ([`crate::network::EventSink::emit_routed`]).
    #[serde(skip)]
    pub routed: Option<crate::network::RoutedSignal>,
}

/// JIDs as their string form (the `jid` crate has no serde support).
mod opt_bare_jid {
    use jid::BareJid;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(jid: &Option<BareJid>, s: S) -> Result<S::Ok, S::Error> {
        match jid {
            Some(j) => s.serialize_some(j.as_str()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<BareJid>, D::Error> {
        Option::<String>::deserialize(d)?.map(|s| BareJid::new(&s).map_err(serde::de::Error::custom)).transpose()
    }
}

/// Whether a character can be carried as text by every network: no control
/// characters besides tab and newline, no Unicode noncharacters (XML, for one,
/// cannot carry them, and no person types them).
pub fn is_carriable(c: char) -> bool {
    let u = c as u32;
    match u {
        0x09 | 0x0a => true,
        0x00..=0x1f | 0x7f => false,
        0xfdd0..=0xfdef => false,
        _ => u & 0xfffe != 0xfffe,
    }
}

/// Remove what [`is_carriable`] refuses, in place (no allocation when clean).
pub fn clean_text(text: &mut String) {
    if !text.chars().all(is_carriable) {
        text.retain(is_carriable);
    }
}

fn clean_opt(text: &mut Option<String>) {
    if let Some(t) = text {
        clean_text(t);
    }
}

fn clean_message(m: &mut Message) {
    clean_text(&mut m.body);
    if let Some(f) = &mut m.formatted {
        clean_text(&mut f.text);
    }
    for a in &mut m.attachments {
        clean_opt(&mut a.name);
    }
    if let Some(r) = &mut m.reply_to {
        clean_opt(&mut r.author);
        clean_opt(&mut r.quote);
    }
}

impl Event {
    /// Make every human-readable text in the event carriable by any network
    /// (see [`is_carriable`]): whatever a remote network let through, nothing
    /// leaves the router that another network's protocol cannot hold.
    pub fn clean_text(&mut self) {
        clean_text(&mut self.sender.nick);
        if let Some(q) = &mut self.context {
            clean_text(&mut q.author);
            clean_text(&mut q.text);
        }
        match &mut self.kind {
            EventKind::Message(m) => clean_message(m),
            EventKind::Correction { message, .. } => clean_message(message),
            EventKind::Retraction { moderator, reason, .. } => {
                clean_opt(moderator);
                clean_opt(reason);
            }
            EventKind::Reactions { emojis, .. } => emojis.iter_mut().for_each(clean_text),
            EventKind::SelfJoined { nick, occupants, topic } => {
                clean_text(nick);
                occupants.iter_mut().for_each(|o| clean_text(&mut o.nick));
                clean_opt(topic);
            }
            EventKind::JoinRequest { nick, .. } => clean_text(nick),
            EventKind::JoinFailed { reason } => clean_text(reason),
            EventKind::Joined { occupant } => clean_text(&mut occupant.nick),
            EventKind::Left { reason, .. } => clean_opt(reason),
            EventKind::NickChanged { new_nick } => clean_text(new_nick),
            EventKind::Topic { text } | EventKind::Status { text } => clean_text(text),
            _ => {}
        }
    }

    /// A new event happening now, with a fresh key.
    pub fn new(origin: NetworkId, chat: ChatRef, sender: Sender, kind: EventKind) -> Self {
        Event {
            key: MessageKey::generate(),
            origin,
            origin_ids: Vec::new(),
            account: None,
            chat,
            sender,
            time: SystemTime::now(),
            delayed: false,
            kind,
            context: None,
            receipt: None,
            routed: None,
        }
    }

    pub fn with_account(mut self, account: BareJid) -> Self {
        self.account = Some(account);
        self
    }

    pub fn with_origin_id(mut self, id: impl Into<String>) -> Self {
        self.origin_ids.push(id.into());
        self
    }

    /// The time the origin gave the event, for an event happening now (not history).
    pub fn at(mut self, time: SystemTime) -> Self {
        self.time = time;
        self
    }

    pub fn with_time(mut self, time: SystemTime) -> Self {
        self.time = time;
        self.delayed = true;
        self
    }
}

#[cfg(test)]
mod clean_tests {
    use super::*;

    #[test]
    fn only_what_no_network_carries_is_removed() {
        let mut t =
            "a\u{0}b\u{b}c\u{1b}[31md\u{7f}e\u{fffe}f\u{ffff}g\u{fdd0}h\u{1fffe}i\tj\nk é\u{1F600}\u{202e}".to_owned();
        clean_text(&mut t);
        assert_eq!(t, "abc[31mdefghi\tj\nk é\u{1F600}\u{202e}");
    }
}
