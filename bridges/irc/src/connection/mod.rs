//! One IRC connection of one XMPP user to one server, kept up across outages,
//! and the translation of its traffic into core events.
//!
//! A [`Connection`] outlives the TCP connections under it: a supervisor task
//! connects, registers, rejoins the user's channels, and when the server goes
//! away tells each room, waits (exponential backoff with jitter, under a cap on
//! concurrent reconnects shared by the whole network) and starts again.
//! Everything the user sends goes through one ordered queue that is only
//! drained while the server has registered us and our channels are rejoined,
//! paced by the [`TokenBucket`]; what the user sends during an outage waits
//! there and goes out, in order, after the reconnect.
//!
//! A channel join is reported once the occupant list (NAMES) is complete, so
//! the XMPP side can send the occupants, then the user's own presence, then the subject.

mod handle;
mod reader;
mod supervisor;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use irc::client::prelude::{Client, Command, Config as IrcClientConfig, Prefix, Response};
use irc::proto::Message as IrcMessage;
use irc::proto::{CapSubCommand, ChannelMode, Mode};
use isthmus_config::{IrcNetworkConfig, IrcServerConfig, SaslMechanism};
use isthmus_core::jid::BareJid;
use isthmus_core::model::{
    Affiliation, ChatRef, ChatState, Event, EventKind, LeaveKind, Message, NetworkId, Occupant, RemoteId, Role, Sender,
};
use isthmus_core::network::{Confirmation, Confirmer, DeliveryError, EventSink};
use isthmus_core::outbox::Receipt;
use rand::Rng;
use tokio::sync::{Notify, Semaphore, mpsc};
use tracing::{Instrument, debug, info, warn};

use crate::address::chat_id;
use crate::certfp::ClientIdentity;
use crate::flood::TokenBucket;
use crate::text::{one_line, split_lines, text_budget};
use crate::wire::Wire;

/// Whose connection to which server.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ConnectionKey {
    pub account: BareJid,
    /// Server name as configured and as it appears in JIDs.
    pub server: String,
}

/// A channel as this connection sees it.
#[derive(Debug, Default)]
struct Channel {
    /// The spelling used in the room JID (as the user asked to join it).
    name: String,
    /// Our own JOIN came back: we are in.
    joined: bool,
    /// The join was reported to the router (after the end of NAMES).
    announced: bool,
    /// Rejoining after a reconnect: the next end of NAMES completes it.
    rejoining: bool,
    /// Channel key, for rejoins.
    key: Option<String>,
    /// Channel status prefixes (`~&@%+`) by lower-cased nick.
    prefixes: HashMap<String, String>,
    /// Occupants before an outage, to report who came and went meanwhile.
    before: HashMap<String, Occupant>,
    topic: Option<String>,
    /// Occupants by lower-cased nick.
    members: HashMap<String, Occupant>,
    /// `nick!user@host` of occupants whose JOIN we saw, by lower-cased nick.
    hostmasks: HashMap<String, String>,
    /// Ban masks set lately (MODE +b): a kick they match is a ban.
    recent_bans: VecDeque<String>,
}

/// How many recent ban masks a channel remembers.
const RECENT_BANS: usize = 16;

/// Whether ban `mask` (`nick!user@host` with `*` and `?`) covers `nick`, whose
/// full mask is `hostmask` when known; otherwise only a ban by nick alone counts.
fn ban_covers(mask: &str, nick: &str, hostmask: Option<&str>) -> bool {
    let mask = fold(mask);
    match hostmask {
        Some(full) => wildmatch::WildMatch::new(&mask).matches(&fold(full)),
        // Unknown user and host: only a ban by nick (`nick!*@*`) is known to cover it.
        None => {
            let (nick_part, rest) = mask.split_once('!').unwrap_or((&mask, ""));
            rest.chars().all(|c| matches!(c, '*' | '@')) && wildmatch::WildMatch::new(nick_part).matches(&fold(nick))
        }
    }
}

#[derive(Debug, Default)]
struct State {
    nick: String,
    /// Our `nick!user@host` as the server relays it, learnt from our own JOIN.
    prefix: Option<String>,
    channels: HashMap<String, Channel>,
    /// Channels still to be rejoined before the queue may be drained.
    pending_rejoins: usize,
    /// IRCv3 capabilities the server offers, and those enabled on this connection.
    offered: Vec<String>,
    enabled: Vec<String>,
    /// A channel LIST under way: what came so far, and who waits for the end.
    listing: Option<Listing>,
    /// Message lines written and not yet acknowledged, oldest first: each waits
    /// for its echo (IRCv3 echo-message), an error about it, or the answer to a
    /// PING written after it (the server handles a client's lines in order).
    echoes: VecDeque<PendingEcho>,
    /// The last IRCv3 label given to a line (labeled-response).
    last_label: u64,
    /// The number of the next acknowledgement PING; lines written now wait for it.
    next_ack: u64,
    /// An acknowledgement PING is on its way and unanswered.
    ack_in_flight: bool,
    /// Channels (case-folded) the user left whose PART the server has not
    /// answered yet: that answer is about the old stay, not about a rejoin since.
    parting: HashSet<String>,
    /// Why the server refused this connection (464 wrong password, 465 banned,
    /// or its ERROR), for the user when it closes the connection.
    refusal: Option<String>,
    /// Nick and topic changes waiting for the server's answer.
    answers: crate::answers::Pending,
}

/// A message line written to the server, waiting for its acknowledgement.
#[derive(Debug)]
struct PendingEcho {
    /// The acknowledgement PING that settles it at the latest.
    ack: u64,
    /// The line's IRCv3 label, where the server offers labeled-response.
    label: Option<String>,
    /// The target, case-folded (matches unlabeled echoes, in order).
    target: String,
    echo: Arc<Mutex<EchoWait>>,
}

/// One message's lines waiting for their acknowledgements; the message is
/// confirmed (with the ids the server gave its lines, where it echoes them)
/// once every line is acknowledged.
#[derive(Debug)]
pub(crate) struct EchoWait {
    remaining: usize,
    ids: Vec<String>,
    confirmer: Option<Confirmer>,
}

impl EchoWait {
    /// One line came back (with its `msgid`, if any), or left unconfirmed.
    fn line_done(&mut self, id: Option<String>) {
        self.ids.extend(id);
        self.remaining = self.remaining.saturating_sub(1);
        if self.remaining == 0
            && let Some(c) = self.confirmer.take()
        {
            c.confirm(std::mem::take(&mut self.ids));
        }
    }

    /// The server refused a line: the whole message is refused.
    fn refuse(&mut self, text: String) {
        self.fail(DeliveryError::Rejected(text));
    }

    /// The message is not confirmed, and why.
    fn fail(&mut self, error: DeliveryError) {
        if let Some(c) = self.confirmer.take() {
            c.refuse(error);
        }
    }
}

fn lock_echo(echo: &Mutex<EchoWait>) -> std::sync::MutexGuard<'_, EchoWait> {
    echo.lock().unwrap_or_else(|p| p.into_inner())
}

/// The replies to one LIST command (RPL_LIST … RPL_LISTEND).
#[derive(Debug, Default)]
struct Listing {
    channels: Vec<ListedChannel>,
    waiters: Vec<tokio::sync::oneshot::Sender<Vec<ListedChannel>>>,
}

/// One channel in the server's LIST.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedChannel {
    pub name: String,
    pub users: u32,
    pub topic: String,
}

/// Numeric replies that are part of registration or handled elsewhere: not shown to the user.
const SILENT_REPLIES: &[u16] = &[
    1, 2, 3, 4, 5, 42, 250, 251, 252, 253, 254, 255, 265, 266, 331, 332, 333, 353, 366, 372, 375, 376, 396, 422, 433,
    403, 405, 471, 473, 474, 475,
];

/// MUC role and affiliation for IRC channel prefixes: `~`/`&` owner, `@` admin,
/// `%` moderator member, `+` member with voice.
fn roles(prefixes: &str) -> (Role, Affiliation) {
    if prefixes.contains(['~', '&']) {
        (Role::Moderator, Affiliation::Owner)
    } else if prefixes.contains('@') {
        (Role::Moderator, Affiliation::Admin)
    } else if prefixes.contains('%') {
        (Role::Moderator, Affiliation::Member)
    } else if prefixes.contains('+') {
        (Role::Participant, Affiliation::Member)
    } else {
        (Role::Participant, Affiliation::None)
    }
}

/// The IRCv3 capabilities the bridge uses when offered.
/// (InspIRCd 3 labels its replies only for clients that also take `batch`.)
const WANTED_CAPS: &[&str] =
    &["server-time", "message-tags", "multi-prefix", "echo-message", "labeled-response", "batch"];

/// Reconnect timing and the network-wide cap on concurrent connection attempts.
#[derive(Debug, Clone)]
pub struct ReconnectPolicy {
    pub initial: Duration,
    pub max: Duration,
    pub gate: Arc<Semaphore>,
    /// The gate's size: how many attempts may be in flight at once.
    pub limit: usize,
}

impl ReconnectPolicy {
    /// The default timing with at most `limit` connection attempts at once.
    pub fn with_limit(limit: usize) -> Self {
        let limit = limit.max(1);
        ReconnectPolicy { gate: Arc::new(Semaphore::new(limit)), limit, ..Default::default() }
    }
}

impl Default for ReconnectPolicy {
    fn default() -> Self {
        ReconnectPolicy {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(60),
            gate: Arc::new(Semaphore::new(8)),
            limit: 8,
        }
    }
}

/// One user's connection to one IRC server, across reconnects.
pub struct Connection {
    network: NetworkId,
    key: ConnectionKey,
    /// Boxed: a queue block holds 32 items, and an unboxed message is ~250 bytes.
    outgoing: mpsc::UnboundedSender<Box<Queued>>,
    state: Arc<Mutex<State>>,
    /// The user left every channel: the supervisor quits and does not reconnect.
    closed: AtomicBool,
    /// Registered and rejoined: what the user sends goes out now.
    online: AtomicBool,
    close_signal: Notify,
    /// The supervisor has stopped: the server has seen our QUIT (or the connection is gone).
    finished: tokio::sync::watch::Sender<bool>,
}

/// IRC compares names case-insensitively (RFC 1459 casemapping).
pub fn fold(name: &str) -> String {
    name.chars()
        .map(|c| match c {
            '[' => '{',
            ']' => '}',
            '\\' => '|',
            '~' => '^',
            c => c.to_ascii_lowercase(),
        })
        .collect()
}

/// An IRC username (ident) from a JID localpart: letters and digits only.
fn ident_for(account: &BareJid) -> String {
    let ident: String = account
        .node()
        .map(|n| n.as_str())
        .unwrap_or("isthmus")
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(10)
        .collect();
    if ident.is_empty() { "isthmus".to_owned() } else { ident }
}

/// An error with its causes ("an io error occurred: invalid peer certificate: …").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let c = cause.to_string();
        if !text.contains(&c) {
            text = format!("{text}: {c}");
        }
        source = cause.source();
    }
    text
}

/// Spread reconnects of many connections over time: 50–150 % of the delay.
fn jitter(delay: Duration) -> Duration {
    delay.mul_f64(rand::rng().random_range(0.5..1.5))
}

/// Keeps one [`Connection`] connected and translates its traffic.
struct Supervisor {
    conn: Arc<Connection>,
    sink: EventSink,
    server: IrcServerConfig,
    /// The client certificate the gateway made for the user here, if any.
    identity: Option<ClientIdentity>,
    net_config: Arc<IrcNetworkConfig>,
    policy: ReconnectPolicy,
    queue: mpsc::UnboundedReceiver<Box<Queued>>,
    /// How this server's lines are decoded.
    wire: Wire,
}

/// Most lines written in one batch (one durable commit for their receipts).
const MAX_BATCH: usize = 64;

/// The start of the acknowledgement PINGs' tokens (the PING's number follows).
const ACK_TOKEN: &str = "isthmus-ack-";

/// Handle one item of the server's stream: `Ok(true)` when it was the welcome
/// (registration done), `Err` with the reason when the connection ended.
async fn incoming(reader: &Reader, item: Option<irc::error::Result<IrcMessage>>) -> Result<bool, String> {
    match item {
        Some(Ok(message)) => {
            let message = reader.wire.decode(message);
            let welcomed = matches!(message.command, Command::Response(Response::RPL_WELCOME, _));
            // Boxed: only one handling is alive at a time, and keeping its
            // (large) state out of the connection's task keeps idle connections small.
            Box::pin(reader.handle(message)).await;
            Ok(welcomed)
        }
        // The IRC library's answer to 433/432 (nick in use, or not valid) when it has
        // no alternative nick left: it has none, the reader chooses.
        Some(Err(irc::error::Error::NoUsableNick)) => reader.nick_refused().map(|()| false),
        Some(Err(e)) => Err(e.to_string()),
        None => Err("the server closed the connection".to_owned()),
    }
}

/// One line waiting to be written, with the outbox receipt of the event it starts.
pub(crate) struct Queued {
    message: IrcMessage,
    receipt: Option<Receipt>,
    /// The message this line belongs to waits for the server's echo.
    echo: Option<Arc<Mutex<EchoWait>>>,
}

/// Translates one connection's incoming traffic.
pub(crate) struct Reader {
    conn: Arc<Connection>,
    sink: EventSink,
    on_connect: Vec<String>,
    sender: Option<irc::client::Sender>,
    wire: Wire,
    /// The account to log in to with SASL during registration, if any.
    sasl: Option<SaslLogin>,
    /// Registered (the server's welcome came), and how many alternative nicks
    /// registration tried before.
    welcomed: AtomicBool,
    alt_nicks_tried: std::sync::atomic::AtomicUsize,
}

/// How to log in with SASL on one server.
#[derive(Clone)]
pub(crate) enum SaslLogin {
    /// PLAIN: an account's name and password.
    Plain { username: String, password: String },
    /// EXTERNAL: the TLS client certificate names the account; `authzid`, if
    /// given, is the account asked for.
    External { authzid: Option<String> },
}

/// The IRCv3 `label` tag of a message (labeled-response).
fn label_of(message: &IrcMessage) -> Option<&str> {
    message.tags.iter().flatten().find(|t| t.0 == "label").and_then(|t| t.1.as_deref())
}

/// What IRCv3 tags say about a message.
#[derive(Debug, Default)]
struct Meta {
    /// `server-time`.
    time: Option<std::time::SystemTime>,
    /// `msgid`.
    msgid: Option<String>,
}

impl Meta {
    fn of(message: &IrcMessage) -> Meta {
        let mut meta = Meta::default();
        for tag in message.tags.iter().flatten() {
            match (tag.0.as_str(), tag.1.as_deref()) {
                ("time", Some(t)) => {
                    meta.time = chrono::DateTime::parse_from_rfc3339(t).ok().map(std::time::SystemTime::from);
                }
                ("msgid", Some(id)) if !id.is_empty() => meta.msgid = Some(id.to_owned()),
                _ => {}
            }
        }
        meta
    }

    fn apply(&self, mut event: Event) -> Event {
        if let Some(t) = self.time {
            event = event.with_time(t);
        }
        if let Some(id) = &self.msgid {
            event = event.with_origin_id(id.clone());
        }
        event
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use isthmus_core::model::ChatKind;

    use super::*;
    use crate::fuzzing::Harness;

    const SERVER: &str = "irc.example.org";

    fn harness() -> Harness {
        let account: BareJid = "me@example.org".parse().expect("a valid JID");
        Harness::new(NetworkId::new("irc"), account, SERVER, "me")
    }

    fn line(h: &mut Harness, text: &str) -> Vec<Event> {
        h.handle(format!("{text}\r\n").parse().expect("a valid IRC line"))
    }

    /// A SASL failure the server reports is told to the user from the server's
    /// address; handling the line needs no runtime (found by fuzzing: it panicked).
    #[test]
    fn a_sasl_failure_reaches_the_user_without_a_runtime() {
        let mut h = harness();
        let events = line(&mut h, ":irc.example.org 905 me :SASL message too long");
        let told = events.iter().any(|e| {
            e.chat.id.as_str() == SERVER
                && matches!(&e.kind, EventKind::Message(m) if m.notice && m.body.contains("login") && m.body.contains("too long"))
        });
        assert!(told, "{events:?}");
    }

    /// A refusal's reason quoted to the user keeps no IRC formatting codes: they
    /// become styling (found by fuzzing: a 905 whose text held `\x11`).
    #[test]
    fn a_quoted_server_reason_carries_no_formatting_codes() {
        let mut h = harness();
        let events = line(&mut h, ":irc.example.org 905 me :\x02bad\x02 \x11mono\x11 \x0304red");
        let body = events
            .iter()
            .find_map(|e| match &e.kind {
                EventKind::Message(m) if e.chat.id.as_str() == SERVER => Some(m.body.clone()),
                _ => None,
            })
            .expect("the user is told");
        assert!(body.contains("*bad* `mono` red"), "{body:?}");
        assert!(!body.chars().any(|c| c.is_control()), "{body:?}");
    }

    /// The one event a line produced.
    fn one(h: &mut Harness, text: &str) -> Event {
        let mut events = line(h, text);
        assert_eq!(events.len(), 1, "one event expected from {text:?}: {events:?}");
        events.remove(0)
    }

    /// Joins `#Test` (as the user spells it) and completes it; returns the join's events.
    fn joined(h: &mut Harness) -> Vec<Event> {
        h.connection().join("#Test", None).expect("the queue is open");
        let mut events = line(h, ":me!~me@host JOIN #test");
        events.extend(line(h, ":irc.example.org 353 me = #test :@me +bob carol"));
        events.extend(line(h, ":irc.example.org 332 me #test :the topic"));
        events.extend(line(h, ":irc.example.org 366 me #test :End of /NAMES list."));
        events
    }

    #[test]
    fn a_join_is_reported_once_names_are_complete() {
        let mut h = harness();
        let events = joined(&mut h);
        assert_eq!(events.len(), 1, "{events:?}");
        let e = &events[0];
        assert_eq!(e.chat, ChatRef::room(NetworkId::new("irc"), "#Test%irc.example.org"));
        assert!(e.sender.is_self);
        let EventKind::SelfJoined { nick, occupants, topic } = &e.kind else { panic!("{e:?}") };
        assert_eq!(nick, "me");
        assert_eq!(topic.as_deref(), Some("the topic"));
        let who: Vec<_> = occupants.iter().map(|o| (o.nick.as_str(), o.role, o.affiliation)).collect();
        assert_eq!(
            who,
            [("bob", Role::Participant, Affiliation::Member), ("carol", Role::Participant, Affiliation::None)]
        );
    }

    #[test]
    fn a_tagged_privmsg_becomes_a_room_message_with_time_and_id() {
        let mut h = harness();
        joined(&mut h);
        let e = &one(&mut h, "@time=2024-01-02T03:04:05.000Z;msgid=abc :bob!b@h PRIVMSG #test :\u{2}hi\u{2} there");
        assert_eq!(e.chat.id.as_str(), "#Test%irc.example.org");
        assert_eq!(
            (e.sender.nick.as_str(), e.sender.id.as_str(), e.sender.is_self),
            ("bob", "bob%irc.example.org", false)
        );
        assert_eq!(e.origin_ids, ["abc"]);
        assert!(e.delayed);
        assert_eq!(e.time, SystemTime::UNIX_EPOCH + Duration::from_secs(1_704_164_645));
        let EventKind::Message(m) = &e.kind else { panic!("{e:?}") };
        assert_eq!((m.body.as_str(), m.action, m.notice), ("*hi* there", false, false));
    }

    #[test]
    fn ctcp_action_is_a_me_message_and_other_ctcp_is_dropped() {
        let mut h = harness();
        joined(&mut h);
        let e = one(&mut h, ":bob!b@h PRIVMSG #test :\u{1}ACTION waves\u{1}");
        let EventKind::Message(m) = &e.kind else { panic!("{e:?}") };
        assert_eq!((m.body.as_str(), m.action), ("waves", true));
        assert!(line(&mut h, ":bob!b@h PRIVMSG #test :\u{1}VERSION\u{1}").is_empty());
    }

    #[test]
    fn private_messages_and_server_notices_go_to_their_chats() {
        let mut h = harness();
        let e = one(&mut h, ":bob!b@h NOTICE me :psst");
        assert_eq!(e.chat, ChatRef::direct(NetworkId::new("irc"), "bob%irc.example.org"));
        assert!(matches!(&e.kind, EventKind::Message(m) if m.body == "psst" && m.notice));
        let e = one(&mut h, ":irc.example.org NOTICE * :*** Looking up your hostname");
        assert_eq!(e.chat.kind, ChatKind::Service);
        assert_eq!(e.chat.id.as_str(), SERVER);
    }

    #[test]
    fn a_kick_after_a_ban_covering_the_victim_is_a_ban() {
        let mut h = harness();
        joined(&mut h);
        line(&mut h, ":dave!d@dave.host JOIN #test");
        line(&mut h, ":bob!b@h MODE #test +b *!*@dave.host");
        let e = one(&mut h, ":bob!b@h KICK #test dave :bye");
        assert_eq!(
            e.kind,
            EventKind::Left { kind: LeaveKind::Ban { by: Some("bob".into()) }, reason: Some("bye".into()) }
        );
        let e = one(&mut h, ":bob!b@h KICK #test carol :out");
        assert_eq!(
            e.kind,
            EventKind::Left { kind: LeaveKind::Kick { by: Some("bob".into()) }, reason: Some("out".into()) }
        );
        assert!(ban_covers("Carol!*@*", "carol", None));
        assert!(!ban_covers("*!*@other.host", "carol", Some("carol!c@carol.host")));
        assert!(!ban_covers("*!*@other.host", "carol", None), "the host is unknown");
    }

    #[test]
    fn quit_leaves_every_room_the_nick_was_in() {
        let mut h = harness();
        joined(&mut h);
        let e = one(&mut h, ":bob!b@h QUIT :bye");
        assert_eq!(e.sender.nick, "bob");
        assert_eq!(e.kind, EventKind::Left { kind: LeaveKind::Quit, reason: Some("bye".into()) });
        assert!(line(&mut h, ":bob!b@h QUIT :again").is_empty(), "bob is in no room any more");
    }

    #[test]
    fn the_answer_to_our_own_part_does_not_end_a_rejoin() {
        let mut h = harness();
        joined(&mut h);
        assert!(!h.connection().part("#Test", None).expect("the queue is open"), "no channel left");
        h.connection().join("#Test", Some("key")).expect("the queue is open");
        assert!(line(&mut h, ":me!~me@host PART #test :bye").is_empty(), "the leave was reported already");
        let events = joined(&mut h);
        assert!(matches!(events.as_slice(), [e] if matches!(e.kind, EventKind::SelfJoined { .. })), "{events:?}");
        // A PART the user did not ask for (e.g. sent as a raw command) is still reported.
        let e = one(&mut h, ":me!~me@host PART #test");
        assert!(e.sender.is_self && matches!(e.kind, EventKind::Left { kind: LeaveKind::Part, .. }), "{e:?}");
    }

    #[test]
    fn the_servers_refusal_before_registration_is_kept_for_the_user() {
        let mut h = harness();
        assert!(line(&mut h, ":irc.example.org 464 me :Password incorrect").is_empty());
        let refusal = h.connection().lock().refusal.clone().unwrap_or_default();
        assert!(refusal.contains("server password was refused (Password incorrect)"), "{refusal}");
        line(&mut h, "ERROR :Closing link: (Bad password)");
        assert_eq!(h.connection().lock().refusal.as_deref(), Some(refusal.as_str()), "the first reason is kept");
    }

    #[test]
    fn sasl_external_sends_the_authorization_identity() {
        assert_eq!(SaslLogin::External { authzid: None }.payloads(), ["+"]);
        assert_eq!(SaslLogin::External { authzid: Some("erin".into()) }.payloads(), ["ZXJpbg=="]);
        let plain = SaslLogin::Plain { username: "u".into(), password: "p".into() };
        assert_eq!((plain.mechanism(), plain.payloads()), ("PLAIN", vec!["AHUAcA==".to_owned()]));
    }
}
