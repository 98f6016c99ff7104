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

impl Connection {
    /// Start a connection; it connects in the background and keeps reconnecting until closed.
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        network: NetworkId,
        key: ConnectionKey,
        nick: String,
        server: IrcServerConfig,
        identity: Option<ClientIdentity>,
        net_config: Arc<IrcNetworkConfig>,
        sink: EventSink,
        policy: ReconnectPolicy,
    ) -> Arc<Connection> {
        let (conn, rx) = Connection::unconnected(network, key.clone(), &nick);
        let span = tracing::info_span!("irc", account = %key.account, server = %key.server);
        let wire = server.fallback_encoding().map(Wire::new).unwrap_or_default();
        let supervisor = Supervisor { conn: conn.clone(), sink, server, identity, net_config, policy, queue: rx, wire };
        tokio::spawn(supervisor.run().instrument(span));
        conn
    }

    /// A connection with no task behind it, and the queue of what it would send.
    pub(crate) fn unconnected(
        network: NetworkId,
        key: ConnectionKey,
        nick: &str,
    ) -> (Arc<Connection>, mpsc::UnboundedReceiver<Box<Queued>>) {
        let nick = one_line(nick).replace([' ', ','], "_");
        let (tx, rx) = mpsc::unbounded_channel();
        let state = Arc::new(Mutex::new(State { nick, ..Default::default() }));
        let conn = Arc::new(Connection {
            network,
            key,
            outgoing: tx,
            state,
            closed: AtomicBool::new(false),
            online: AtomicBool::new(false),
            close_signal: Notify::new(),
            finished: tokio::sync::watch::Sender::new(false),
        });
        (conn, rx)
    }

    /// Whether the server currently has us registered.
    pub fn is_online(&self) -> bool {
        self.online.load(Ordering::Acquire)
    }

    /// Whether this connection still serves its user (it may be reconnecting).
    pub fn is_alive(&self) -> bool {
        !self.closed.load(Ordering::Acquire)
    }

    /// Stop for good: QUIT now if connected, never reconnect.
    pub fn close(&self, reason: &str) {
        let _ = self.send(Command::QUIT(Some(one_line(reason))));
        self.closed.store(true, Ordering::Release);
        self.close_signal.notify_one();
    }

    /// Whether the connection has stopped for good.
    pub fn has_finished(&self) -> bool {
        *self.finished.borrow()
    }

    /// Wait until a closed connection has finished quitting, at most `timeout`;
    /// returns whether it has.
    pub async fn wait_finished(&self, timeout: Duration) -> bool {
        let mut done = self.finished.subscribe();
        matches!(tokio::time::timeout(timeout, done.wait_for(|d| *d)).await, Ok(Ok(_)))
    }

    /// Channels the user is in (or joining), sorted.
    pub fn channel_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.lock().channels.values().map(|c| c.name.clone()).collect();
        names.sort();
        names
    }

    pub fn nick(&self) -> String {
        self.lock().nick.clone()
    }

    /// The server's public channels (LIST), or `None` when the server did not
    /// finish answering within `timeout`. Concurrent callers share one LIST.
    pub async fn list_channels(&self, timeout: Duration) -> Option<Vec<ListedChannel>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let start = {
            let mut state = self.lock();
            let listing = state.listing.get_or_insert_with(Listing::default);
            listing.waiters.push(tx);
            listing.waiters.len() == 1
        };
        if start && self.send(Command::LIST(None, None)).is_err() {
            self.lock().listing = None;
            return None;
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(channels)) => Some(channels),
            _ => None,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A poisoned lock only means another task panicked mid-update; the state is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn send(&self, command: Command) -> Result<(), DeliveryError> {
        self.send_with(command, None)
    }

    fn send_with(&self, command: Command, receipt: Option<Receipt>) -> Result<(), DeliveryError> {
        self.outgoing
            .send(Box::new(Queued { message: IrcMessage::from(command), receipt, echo: None }))
            .map_err(|_| DeliveryError::Unavailable(format!("the connection to {} is closed", self.key.server)))
    }

    /// Join `channel` (with its key, if any). The join is reported when the server confirms it.
    pub fn join(&self, channel: &str, key: Option<&str>) -> Result<(), DeliveryError> {
        {
            let mut st = self.lock();
            let ch = st.channels.entry(fold(channel)).or_default();
            ch.name = channel.to_owned();
            ch.key = key.map(one_line);
        }
        self.send(Command::JOIN(channel.to_owned(), key.map(one_line), None))
    }

    /// Leave a channel; returns whether the user is still in any channel here.
    /// The leave is done for the XMPP side now: the server's answer (our own
    /// PART) is not reported, so that it cannot end a rejoin made meanwhile.
    pub fn part(&self, channel: &str, reason: Option<&str>) -> Result<bool, DeliveryError> {
        self.send(Command::PART(channel.to_owned(), reason.map(one_line)))?;
        let mut st = self.lock();
        st.channels.remove(&fold(channel));
        st.parting.insert(fold(channel));
        Ok(!st.channels.is_empty())
    }

    /// Ask for another nick on this server (it changes in every channel); the
    /// answer says whether the server refused it.
    pub fn change_nick(&self, nick: &str) -> Result<crate::answers::Answer, DeliveryError> {
        let nick = one_line(nick);
        if nick.is_empty() || nick.contains([' ', ',', ':', '!', '@']) {
            return Err(DeliveryError::Rejected(format!("`{nick}` cannot be an IRC nickname")));
        }
        let answer = self.lock().answers.nick(&nick);
        self.send(Command::NICK(nick))?;
        Ok(answer)
    }

    /// Set a channel's topic; the answer says whether the server refused it.
    pub fn set_topic(&self, channel: &str, topic: &str) -> Result<crate::answers::Answer, DeliveryError> {
        let answer = self.lock().answers.topic(&fold(channel));
        self.send(Command::TOPIC(channel.to_owned(), Some(one_line(topic))))?;
        Ok(answer)
    }

    /// Send raw IRC commands typed by the user, one per line. Every line is parsed
    /// first: nothing is sent unless all of them are valid commands.
    pub fn send_raw(&self, text: &str) -> Result<(), DeliveryError> {
        let mut commands = Vec::new();
        for line in text.split('\n').map(|l| l.trim_end_matches('\r')).filter(|l| !l.trim().is_empty()) {
            let line = line.replace('\0', "");
            let message = format!("{line}\r\n")
                .parse::<IrcMessage>()
                .map_err(|e| DeliveryError::Rejected(format!("`{line}` is not a valid IRC command: {e}")))?;
            commands.push(message.command);
        }
        if commands.is_empty() {
            return Err(DeliveryError::Rejected("type an IRC command, e.g. `WHOIS nick`".into()));
        }
        for c in commands {
            self.send(c)?;
        }
        Ok(())
    }

    /// Tell `target` the user is typing (IRCv3 `+typing` on TAGMSG), when the server
    /// carries client tags; otherwise there is nothing to send. Returns whether it was sent.
    pub fn send_typing(&self, target: &str, state: ChatState) -> Result<bool, DeliveryError> {
        if !self.lock().enabled.iter().any(|c| c == "message-tags") {
            return Ok(false);
        }
        let value = match state {
            ChatState::Composing => "active",
            ChatState::Paused => "paused",
            ChatState::Active | ChatState::Inactive | ChatState::Gone => "done",
        };
        let message = IrcMessage {
            tags: Some(vec![irc::proto::message::Tag("+typing".to_owned(), Some(value.to_owned()))]),
            prefix: None,
            command: Command::Raw("TAGMSG".to_owned(), vec![target.to_owned()]),
        };
        self.outgoing
            .send(Box::new(Queued { message, receipt: None, echo: None }))
            .map_err(|_| DeliveryError::Unavailable(format!("the connection to {} is closed", self.key.server)))?;
        Ok(true)
    }

    /// Send a message as one or more lines; returns how many lines were queued and
    /// the confirmation that comes once the server acknowledged them all (their
    /// echoes where it echoes messages, else its answer to a PING written after
    /// them). The outbox receipt, if any, is marked written right before the first
    /// line is written.
    pub fn send_message(
        &self,
        target: &str,
        message: &Message,
        mut receipt: Option<Receipt>,
    ) -> Result<(usize, Confirmation), DeliveryError> {
        let (nick, prefix) = {
            let st = self.lock();
            (st.nick.clone(), st.prefix.clone())
        };
        let (body, action) = match message.body.strip_prefix("/me ") {
            Some(rest) => (rest, true),
            None => (message.body.as_str(), message.action),
        };
        let mut budget =
            text_budget(if message.notice { "NOTICE" } else { "PRIVMSG" }, target, &nick, prefix.as_deref());
        if action {
            budget = budget.saturating_sub("\u{1}ACTION \u{1}".len()).max(1);
        }
        let lines = split_lines(&crate::format::styling_to_irc(body), budget);
        if lines.is_empty() {
            return Err(DeliveryError::Rejected("an empty message cannot be sent to IRC".into()));
        }
        // Every line waits for the server's acknowledgement; where the server echoes
        // messages when it is written (a reconnect may come in between), its echo is
        // that acknowledgement, so that no echo is bridged as a message of its own.
        let (confirmer, confirmation) = Confirmation::channel();
        let echo =
            Arc::new(Mutex::new(EchoWait { remaining: lines.len(), ids: Vec::new(), confirmer: Some(confirmer) }));
        for line in &lines {
            let text = if action { format!("\u{1}ACTION {line}\u{1}") } else { line.clone() };
            let command = if message.notice {
                Command::NOTICE(target.to_owned(), text)
            } else {
                Command::PRIVMSG(target.to_owned(), text)
            };
            let queued =
                Queued { message: IrcMessage::from(command), receipt: receipt.take(), echo: Some(echo.clone()) };
            self.outgoing
                .send(Box::new(queued))
                .map_err(|_| DeliveryError::Unavailable(format!("the connection to {} is closed", self.key.server)))?;
        }
        Ok((lines.len(), confirmation))
    }

    /// A message line is being written: it waits for its acknowledgement (its echo,
    /// labelled where the server offers labeled-response, or the answer to the next
    /// acknowledgement PING).
    fn expect_ack(&self, queued: &mut Queued) {
        let Some(echo) = queued.echo.take() else { return };
        let mut st = self.lock();
        let echoes = st.enabled.iter().any(|c| c == "echo-message");
        let label = (echoes && st.enabled.iter().any(|c| c == "labeled-response")).then(|| {
            st.last_label += 1;
            format!("i{}", st.last_label)
        });
        if let Some(label) = &label {
            queued
                .message
                .tags
                .get_or_insert_with(Vec::new)
                .push(irc::proto::message::Tag("label".to_owned(), Some(label.clone())));
        }
        let target = match &queued.message.command {
            Command::PRIVMSG(t, _) | Command::NOTICE(t, _) => fold(t),
            _ => String::new(),
        };
        let ack = st.next_ack;
        st.echoes.push_back(PendingEcho { ack, label, target, echo });
    }

    /// The acknowledgement PING to write after lines that wait for one, unless one
    /// is on its way already (its answer is followed by the next one).
    fn ack_ping(&self) -> Option<Command> {
        let mut st = self.lock();
        if st.ack_in_flight || st.echoes.back().is_none_or(|p| p.ack != st.next_ack) {
            return None;
        }
        st.ack_in_flight = true;
        let token = format!("{ACK_TOKEN}{}", st.next_ack);
        st.next_ack += 1;
        Some(Command::PING(token, None))
    }

    /// The server answered acknowledgement PING `n`: every line written before it
    /// was handled (those it neither echoed nor refused are confirmed without ids).
    /// Returns the next acknowledgement PING, for lines written since.
    fn acknowledged(&self, n: u64) -> Option<Command> {
        let settled: Vec<PendingEcho> = {
            let mut st = self.lock();
            st.ack_in_flight = false;
            let upto = st.echoes.iter().position(|p| p.ack > n).unwrap_or(st.echoes.len());
            st.echoes.drain(..upto).collect()
        };
        for pending in settled {
            lock_echo(&pending.echo).line_done(None);
        }
        self.ack_ping()
    }
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

impl Supervisor {
    async fn run(mut self) {
        let mut delay = self.policy.initial;
        let mut flood = TokenBucket::new(
            self.net_config.flood.enabled,
            self.net_config.flood.burst,
            self.net_config.flood.lines_per_second,
        );
        let mut attempt = 0u32;
        while self.conn.is_alive() {
            attempt += 1;
            // A cap on concurrent connection attempts across the whole network: an
            // attempt holds its slot until the server has registered it (or it failed).
            let slot = match self.policy.gate.clone().try_acquire_owned() {
                Ok(slot) => slot,
                Err(_) => {
                    info!(limit = self.policy.limit, "waiting for a connection slot");
                    let Ok(slot) = self.policy.gate.clone().acquire_owned().await else { break };
                    slot
                }
            };
            let in_flight = self.policy.limit.saturating_sub(self.policy.gate.available_permits());
            info!(attempt, in_flight, limit = self.policy.limit, "connecting to the IRC server");
            let connected = Box::pin(self.connect()).await;
            let reason = match connected {
                Ok((client, stream)) => {
                    delay = self.policy.initial;
                    if attempt > 1 {
                        info!("reconnected to IRC server");
                    }
                    self.conn.lock().refusal = None;
                    let (reason, registered) = self.session(client, stream, &mut flood, slot).await;
                    // What the server said when it refused us (a wrong password, a ban…).
                    let reason = match self.conn.lock().refusal.take() {
                        Some(refusal) if !registered => refusal,
                        _ => reason,
                    };
                    if !registered && attempt == 1 && self.conn.is_alive() {
                        // Never registered: the joins waiting on this connection fail
                        // now with the server's reason, rather than retrying forever.
                        let text = format!("{} did not let us log in: {reason}", self.conn.key.server);
                        Reader::detached(self.conn.clone(), self.sink.clone()).notify_user(text.clone());
                        Box::pin(self.fail_first_connect(&text)).await;
                        break;
                    }
                    reason
                }
                Err(e) => {
                    drop(slot);
                    if attempt == 1 {
                        // Never connected: the joins waiting on this connection fail now, with the reason.
                        Box::pin(self.fail_first_connect(&e)).await;
                        break;
                    }
                    e
                }
            };
            self.conn.online.store(false, Ordering::Release);
            if !self.conn.is_alive() {
                break;
            }
            let wait = jitter(delay);
            warn!(%reason, retry_in = ?wait, "IRC connection lost; reconnecting");
            Box::pin(self.outage(&reason, wait)).await;
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.conn.close_signal.notified() => {}
            }
            delay = (delay * 2).min(self.policy.max);
        }
        info!("IRC connection closed");
        self.conn.finished.send_replace(true);
    }

    async fn connect(&self) -> Result<(Client, irc::client::ClientStream), String> {
        let key = &self.conn.key;
        let nick = self.conn.nick();
        // The user's certificate file lives until the connection is made.
        let (client_cert_path, client_cert_pass, _cert_file) = self.client_certificate().await?;
        let config = IrcClientConfig {
            nickname: Some(nick.clone()),
            // None: a refused nick is the reader's to handle (`Reader::nick_refused`).
            alt_nicks: vec![],
            username: Some(ident_for(&key.account)),
            realname: Some(self.net_config.realname.clone()),
            server: Some(self.server.host_or(&key.server).to_owned()),
            port: Some(self.server.port()),
            use_tls: Some(self.server.tls),
            dangerously_accept_invalid_certs: Some(!self.server.tls_verify),
            cert_path: self.server.tls_ca_file.as_ref().map(|p| p.display().to_string()),
            client_cert_path,
            client_cert_pass,
            password: self.server.password.as_ref().map(|p| p.expose().to_owned()),
            encoding: Some(crate::wire::LIBRARY_ENCODING.to_owned()),
            ping_time: Some(60),
            ping_timeout: Some(30),
            ..Default::default()
        };
        let mut client = Client::from_config(config)
            .await
            .map_err(|e| format!("cannot connect to {}: {}", key.server, error_chain(&e)))?;
        // Registration with capability negotiation: CAP LS 302 first; the reader
        // answers the server's list and ends negotiation (CAP END) to complete it.
        let register = || -> irc::error::Result<()> {
            client.send(Command::CAP(None, CapSubCommand::LS, Some("302".to_owned()), None))?;
            if let Some(p) = &self.server.password {
                client.send(self.wire.encode(Command::PASS(p.expose().to_owned()).into()))?;
            }
            client.send(self.wire.encode(Command::NICK(nick.clone()).into()))?;
            let user = Command::USER(ident_for(&key.account), "0".to_owned(), self.net_config.realname.clone());
            client.send(self.wire.encode(user.into()))
        };
        register().map_err(|e| format!("cannot register on {}: {e}", key.server))?;
        let stream = client.stream().map_err(|e| format!("connection to {} failed: {e}", key.server))?;
        Ok((client, stream))
    }

    /// The TLS client certificate (SASL EXTERNAL), as the IRC library takes it
    /// with rustls: the certificate's PEM file, and the private key's PEM text.
    /// The user's own certificate goes first, written to a temporary file (returned
    /// to be kept until the connection is made); else the admin's `client_cert`,
    /// with the key from `client_key` or from the certificate's file.
    async fn client_certificate(
        &self,
    ) -> Result<(Option<String>, Option<String>, Option<tempfile::NamedTempFile>), String> {
        if let Some(identity) = &self.identity {
            let file = identity.cert_file().map_err(|e| e.to_string())?;
            let path = file.path().display().to_string();
            return Ok((Some(path), Some(identity.key_pem.clone()), Some(file)));
        }
        let Some(sasl) = self.server.sasl.as_ref().filter(|s| s.mechanism == SaslMechanism::External) else {
            return Ok((None, None, None));
        };
        let Some(cert) = &sasl.client_cert else { return Ok((None, None, None)) };
        let key_file = sasl.client_key.as_ref().unwrap_or(cert);
        let key = tokio::fs::read_to_string(key_file)
            .await
            .map_err(|e| format!("cannot read the client certificate's key {}: {e}", key_file.display()))?;
        Ok((Some(cert.display().to_string()), Some(key), None))
    }

    /// Serve one TCP connection until it ends; returns why it ended, and whether
    /// the server had registered us.
    async fn session(
        &mut self,
        client: Client,
        stream: irc::client::ClientStream,
        flood: &mut TokenBucket,
        slot: tokio::sync::OwnedSemaphorePermit,
    ) -> (String, bool) {
        let mut registered = false;
        let reason = self.serve(client, stream, flood, slot, &mut registered).await;
        (reason, registered)
    }

    async fn serve(
        &mut self,
        client: Client,
        mut stream: irc::client::ClientStream,
        flood: &mut TokenBucket,
        slot: tokio::sync::OwnedSemaphorePermit,
        registered: &mut bool,
    ) -> String {
        let mut slot = Some(slot);
        let sender = client.sender();
        let reader = Reader {
            conn: self.conn.clone(),
            sink: self.sink.clone(),
            on_connect: self.server.on_connect.clone(),
            sender: Some(sender.clone()),
            wire: self.wire,
            sasl: SaslLogin::of(&self.server),
            welcomed: AtomicBool::new(false),
            alt_nicks_tried: Default::default(),
        };
        // Registered and rejoined: give up waiting for slow rejoins after this long.
        let rejoin_deadline = tokio::time::sleep(Duration::from_secs(3600));
        tokio::pin!(rejoin_deadline);
        let mut deadline_armed = false;
        loop {
            let online = self.conn.is_online();
            let welcomed = tokio::select! {
                message = stream.next() => match incoming(&reader, message).await {
                    Ok(welcomed) => welcomed,
                    Err(reason) => return reason,
                },
                line = self.queue.recv(), if online => match line {
                    Some(line) => {
                        flood.take().await;
                        // What else is queued goes too, as far as the flood budget allows:
                        // one durable commit covers the whole batch.
                        let mut batch = vec![*line];
                        while batch.len() < MAX_BATCH && flood.try_take() {
                            match self.queue.try_recv() {
                                Ok(line) => batch.push(*line),
                                Err(_) => {
                                    flood.give_back();
                                    break;
                                }
                            }
                        }
                        let receipts: Vec<Receipt> = batch.iter_mut().filter_map(|q| q.receipt.take()).collect();
                        // Marked written in the durable outbox first: after a crash from here
                        // on, they are in doubt (they may have arrived), never sent twice.
                        futures::future::join_all(receipts.iter().map(Receipt::sending)).await;
                        for mut q in batch {
                            self.conn.expect_ack(&mut q);
                            if let Err(e) = sender.send(self.wire.encode(q.message)) {
                                return format!("write failed: {e}");
                            }
                        }
                        // What the server answers to this comes after it handled the lines.
                        if let Some(ping) = self.conn.ack_ping()
                            && let Err(e) = sender.send(ping)
                        {
                            return format!("write failed: {e}");
                        }
                        // The IRC library writes when its stream is polled: have it write them
                        // out now, before anything else can make them wait in memory.
                        match stream.next().now_or_never() {
                            Some(message) => match incoming(&reader, message).await {
                                Ok(welcomed) => welcomed,
                                Err(reason) => return reason,
                            },
                            None => false,
                        }
                    }
                    None => return "shutting down".to_owned(),
                },
                _ = &mut rejoin_deadline, if deadline_armed && !online => {
                    warn!("channels did not all rejoin in time; sending queued messages anyway");
                    self.conn.online.store(true, Ordering::Release);
                    deadline_armed = false;
                    false
                }
                _ = self.conn.close_signal.notified() => {
                    // Send what is queued (the QUIT last), then stop.
                    while let Ok(line) = self.queue.try_recv() {
                        let Queued { message, receipt, .. } = *line;
                        if let Some(r) = receipt {
                            r.confirm().await;
                        }
                        let _ = sender.send(self.wire.encode(message));
                    }
                    // The IRC library writes while its stream is polled: keep polling until
                    // the server closes the connection after the QUIT (or a short while).
                    let drained = async { while let Some(Ok(_)) = stream.next().await {} };
                    let _ = tokio::time::timeout(Duration::from_secs(2), drained).await;
                    return "closed".to_owned();
                }
            };
            if welcomed {
                // Registered: the connection attempt is over.
                drop(slot.take());
                *registered = true;
            }
            if welcomed && !self.conn.is_online() {
                rejoin_deadline.as_mut().reset(tokio::time::Instant::now() + Duration::from_secs(10));
                deadline_armed = true;
            }
        }
    }

    /// The first connection attempt failed: fail the pending joins and close.
    async fn fail_first_connect(&self, reason: &str) {
        warn!(reason, "cannot connect to IRC server");
        self.conn.closed.store(true, Ordering::Release);
        let rooms: Vec<String> = self.conn.lock().channels.drain().map(|(_, c)| c.name).collect();
        let reader = Reader::detached(self.conn.clone(), self.sink.clone());
        for room in rooms {
            reader.emit_room_as(&room, reader.own_sender(), EventKind::JoinFailed { reason: reason.to_owned() }).await;
        }
    }

    /// The server went away: say so in every room, and prepare to rejoin them.
    async fn outage(&self, reason: &str, wait: Duration) {
        let (nick, rooms) = {
            let mut st = self.conn.lock();
            st.pending_rejoins = 0;
            st.offered.clear();
            st.enabled.clear();
            // Written before the outage and never acknowledged: the server may or may
            // not have handled them, so they are not written again; the sender hears so.
            st.ack_in_flight = false;
            for pending in st.echoes.drain(..) {
                lock_echo(&pending.echo).fail(DeliveryError::Unavailable(format!(
                    "the connection to {} was lost before the server confirmed this message: it may not have arrived",
                    self.conn.key.server
                )));
            }
            let rooms: Vec<String> = st
                .channels
                .values_mut()
                .filter(|c| c.announced)
                .map(|c| {
                    c.joined = false;
                    c.name.clone()
                })
                .collect();
            (st.nick.clone(), rooms)
        };
        let reader = Reader::detached(self.conn.clone(), self.sink.clone());
        let text = format!(
            "Lost the connection to {}: {reason}. Reconnecting in {}s; what you send meanwhile is kept and sent after the reconnect.",
            self.conn.key.server,
            wait.as_secs().max(1)
        );
        for room in rooms {
            reader.emit_room(&room, &nick, EventKind::Status { text: text.clone() }).await;
        }
    }
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

impl SaslLogin {
    fn of(server: &IrcServerConfig) -> Option<SaslLogin> {
        let sasl = server.sasl.as_ref()?;
        match sasl.mechanism {
            SaslMechanism::Plain => Some(SaslLogin::Plain {
                username: sasl.username.clone()?,
                password: sasl.password.as_ref()?.expose().to_owned(),
            }),
            SaslMechanism::External => Some(SaslLogin::External { authzid: sasl.username.clone() }),
        }
    }

    fn mechanism(&self) -> &'static str {
        match self {
            SaslLogin::Plain { .. } => "PLAIN",
            SaslLogin::External { .. } => "EXTERNAL",
        }
    }

    /// Whom the login is for, as the user knows it.
    fn who(&self) -> String {
        match self {
            SaslLogin::Plain { username, .. } => username.clone(),
            SaslLogin::External { authzid: Some(account) } => format!("{account} (client certificate)"),
            SaslLogin::External { authzid: None } => "the client certificate's account".to_owned(),
        }
    }

    /// What to check when the login failed.
    fn hint(&self) -> &'static str {
        match self {
            SaslLogin::Plain { .. } => "check the SASL username and password",
            SaslLogin::External { .. } => {
                "check that the client certificate's fingerprint is registered with the services account (e.g. NickServ CERT ADD)"
            }
        }
    }

    /// The `AUTHENTICATE` payloads: base64 in pieces of at most 400 bytes, a `+`
    /// after a last piece of exactly 400, or alone for an empty response (IRCv3 SASL).
    fn payloads(&self) -> Vec<String> {
        use base64::Engine as _;
        use sasl::client::Mechanism as _;
        let initial = match self {
            SaslLogin::Plain { username, password } => {
                sasl::client::mechanisms::Plain::new(username.clone(), password.clone()).initial()
            }
            // EXTERNAL's only message is the authorization identity (empty: the certificate's).
            SaslLogin::External { authzid } => authzid.clone().unwrap_or_default().into_bytes(),
        };
        let encoded = base64::engine::general_purpose::STANDARD.encode(initial);
        let mut pieces: Vec<String> =
            encoded.as_bytes().chunks(400).map(|c| String::from_utf8_lossy(c).into_owned()).collect();
        if pieces.last().is_none_or(|p| p.len() == 400) {
            pieces.push("+".to_owned());
        }
        pieces
    }
}

impl Reader {
    pub(crate) fn detached(conn: Arc<Connection>, sink: EventSink) -> Reader {
        Reader {
            conn,
            sink,
            on_connect: Vec::new(),
            sender: None,
            wire: Wire::default(),
            sasl: None,
            welcomed: AtomicBool::new(false),
            alt_nicks_tried: Default::default(),
        }
    }

    /// The server refused a nick (433 in use, 432 not valid). While registering,
    /// the next of `nick_`, `nick__`, `nick___` is tried (an error when none is
    /// left); afterwards it is the user's nick change that failed: the nick stays.
    fn nick_refused(&self) -> Result<(), String> {
        let server = &self.conn.key.server;
        if !self.welcomed.load(Ordering::Acquire) {
            let tried = self.alt_nicks_tried.fetch_add(1, Ordering::AcqRel) + 1;
            let base = self.conn.nick();
            if tried > 3 {
                return Err(format!("no usable nickname on {server}: `{base}` and `{base}___` are taken"));
            }
            self.send_now(Command::NICK(format!("{base}{}", "_".repeat(tried))));
            return Ok(());
        }
        let waiting = self.conn.lock().answers.take_nick();
        match waiting {
            Some(w) => {
                let text = format!("the nickname `{}` is taken on {server} (or not valid there)", w.nick);
                w.answer(Err(DeliveryError::Conflict(text)));
            }
            None => self.notify_user(format!("{server} refused the nickname (taken, or not valid there)")),
        }
        Ok(())
    }

    /// Send a line now, ahead of the user's queue (registration, rejoins).
    fn send_now(&self, command: Command) {
        if let Some(s) = &self.sender
            && let Err(e) = s.send(self.wire.encode(command.into()))
        {
            warn!(error = %e, "IRC write failed");
        }
    }

    fn sender(&self, nick: &str) -> Sender {
        let is_self = fold(nick) == fold(&self.conn.lock().nick);
        Sender { id: RemoteId::new(chat_id(nick, &self.conn.key.server)), nick: nick.to_owned(), is_self }
    }

    fn event(&self, chat: ChatRef, nick: &str, kind: EventKind) -> Event {
        Event::new(self.conn.network.clone(), chat, self.sender(nick), kind).with_account(self.conn.key.account.clone())
    }

    async fn emit(&self, event: Event) {
        if self.sink.emit(event).await.is_err() {
            debug!("router gone; dropping IRC event during shutdown");
        }
    }

    async fn emit_room(&self, channel: &str, nick: &str, kind: EventKind) {
        self.emit_room_as(channel, self.sender(nick), kind).await;
    }

    async fn emit_room_as(&self, channel: &str, sender: Sender, kind: EventKind) {
        let chat = ChatRef::room(self.conn.network.clone(), chat_id(channel, &self.conn.key.server));
        let event =
            Event::new(self.conn.network.clone(), chat, sender, kind).with_account(self.conn.key.account.clone());
        self.emit(event).await;
    }

    /// The user's own sender identity, whatever the server thinks the nick is now.
    fn own_sender(&self) -> Sender {
        let mut sender = self.sender(&self.conn.nick());
        sender.is_self = true;
        sender
    }

    /// The JID spelling of a channel the server names.
    fn channel_name(&self, channel: &str) -> String {
        self.conn.lock().channels.get(&fold(channel)).map(|c| c.name.clone()).unwrap_or_else(|| channel.to_owned())
    }

    pub(crate) async fn handle(&self, message: IrcMessage) {
        let nick = match &message.prefix {
            Some(Prefix::Nickname(nick, _, _)) => Some(nick.clone()),
            _ => None,
        };
        match message.command {
            Command::Response(Response::RPL_WELCOME, ref args) => {
                self.welcomed.store(true, Ordering::Release);
                if let Some(me) = args.first() {
                    self.conn.lock().nick = me.clone();
                }
                info!(nick = %self.conn.nick(), "registered on IRC server");
                for (n, line) in self.on_connect.iter().enumerate() {
                    match line.parse::<IrcMessage>() {
                        Ok(m) => self.send_now(m.command),
                        // Neither the line nor the error (which quotes it): it may hold a password.
                        Err(e) => {
                            let reason = match &e {
                                irc::proto::error::ProtocolError::InvalidMessage { cause, .. } => cause.to_string(),
                                _ => "unreadable".to_owned(),
                            };
                            warn!(line = n + 1, reason, "on_connect line is not a valid IRC command; skipped")
                        }
                    }
                }
                // Rejoin what the user was in before an outage; queued lines wait for it.
                let rejoins: Vec<(String, Option<String>)> = {
                    let mut st = self.conn.lock();
                    let list: Vec<_> = st
                        .channels
                        .values_mut()
                        .filter(|c| c.announced)
                        .map(|c| {
                            c.rejoining = true;
                            (c.name.clone(), c.key.clone())
                        })
                        .collect();
                    st.pending_rejoins = list.len();
                    list
                };
                for (name, key) in &rejoins {
                    self.send_now(Command::JOIN(name.clone(), key.clone(), None));
                }
                if rejoins.is_empty() {
                    self.conn.online.store(true, Ordering::Release);
                }
            }
            Command::JOIN(ref channel, _, _) => {
                let Some(nick) = nick else { return };
                if self.sender(&nick).is_self {
                    let mut st = self.conn.lock();
                    // Our PART came back before this JOIN, if the server answered it at all.
                    st.parting.remove(&fold(channel));
                    st.prefix = message.prefix.as_ref().map(|p| p.to_string());
                    let ch = st.channels.entry(fold(channel)).or_default();
                    if ch.name.is_empty() {
                        ch.name = channel.clone();
                    }
                    ch.joined = true;
                    let members = std::mem::take(&mut ch.members);
                    if ch.rejoining {
                        ch.before = members;
                    }
                    return;
                }
                let occupant = self.occupant(&nick, "");
                let name = {
                    let mut st = self.conn.lock();
                    let Some(ch) = st.channels.get_mut(&fold(channel)) else { return };
                    ch.members.insert(fold(&nick), occupant.clone());
                    if let Some(prefix) = &message.prefix {
                        ch.hostmasks.insert(fold(&nick), prefix.to_string());
                    }
                    if !ch.announced {
                        return;
                    }
                    ch.name.clone()
                };
                self.emit_room(&name, &nick, EventKind::Joined { occupant }).await;
            }
            // A LIST the gateway asked for (the room directory); a user's own LIST goes to
            // the server's JID like any other reply.
            Command::Response(Response::RPL_LISTSTART, _) if self.conn.lock().listing.is_some() => {}
            Command::Response(Response::RPL_LIST, ref args)
                if args.len() >= 3 && self.conn.lock().listing.is_some() =>
            {
                let mut state = self.conn.lock();
                if let Some(listing) = state.listing.as_mut() {
                    listing.channels.push(ListedChannel {
                        name: args[1].clone(),
                        users: args[2].parse().unwrap_or(0),
                        topic: args.get(3).cloned().unwrap_or_default(),
                    });
                }
            }
            Command::Response(Response::RPL_LISTEND, _) if self.conn.lock().listing.is_some() => {
                let done = self.conn.lock().listing.take();
                if let Some(listing) = done {
                    for waiter in listing.waiters {
                        let _ = waiter.send(listing.channels.clone());
                    }
                }
            }
            Command::Response(Response::RPL_TOPIC, ref args) if args.len() >= 3 => {
                let mut st = self.conn.lock();
                if let Some(ch) = st.channels.get_mut(&fold(&args[1])) {
                    ch.topic = Some(args[2].clone());
                }
            }
            Command::Response(Response::RPL_NAMREPLY, ref args) if args.len() >= 4 => {
                let names: Vec<(Occupant, String)> = args[3]
                    .split_whitespace()
                    .map(|entry| {
                        let bare = entry.trim_start_matches(['~', '&', '@', '%', '+']);
                        let prefixes = entry[..entry.len() - bare.len()].to_owned();
                        (self.occupant(bare, &prefixes), prefixes)
                    })
                    .collect();
                let mut st = self.conn.lock();
                if let Some(ch) = st.channels.get_mut(&fold(&args[2])) {
                    for (o, prefixes) in names {
                        ch.prefixes.insert(fold(&o.nick), prefixes);
                        ch.members.insert(fold(&o.nick), o);
                    }
                }
            }
            Command::Response(Response::RPL_ENDOFNAMES, ref args) if args.len() >= 2 => {
                enum Done {
                    First(String, String, Vec<Occupant>, Option<String>),
                    Rejoined(String, String, Vec<Occupant>, Vec<Occupant>),
                }
                let done = {
                    let mut st = self.conn.lock();
                    let nick = st.nick.clone();
                    let mut rejoined = false;
                    let done = match st.channels.get_mut(&fold(&args[1])) {
                        Some(ch) if ch.joined && ch.rejoining => {
                            ch.rejoining = false;
                            rejoined = true;
                            // Who came and went while we were away.
                            let before = std::mem::take(&mut ch.before);
                            let came =
                                ch.members.iter().filter(|(k, _)| !before.contains_key(*k)).map(|(_, o)| o.clone());
                            let went =
                                before.iter().filter(|(k, _)| !ch.members.contains_key(*k)).map(|(_, o)| o.clone());
                            let me = fold(&nick);
                            let came: Vec<Occupant> = came.filter(|o| fold(&o.nick) != me).collect();
                            let went: Vec<Occupant> = went.filter(|o| fold(&o.nick) != me).collect();
                            Some(Done::Rejoined(ch.name.clone(), nick, came, went))
                        }
                        Some(ch) if ch.joined && !ch.announced => {
                            ch.announced = true;
                            let mut occupants: Vec<Occupant> =
                                ch.members.values().filter(|o| fold(&o.nick) != fold(&nick)).cloned().collect();
                            occupants.sort_by(|a, b| a.nick.cmp(&b.nick));
                            Some(Done::First(ch.name.clone(), nick, occupants, ch.topic.clone()))
                        }
                        _ => None,
                    };
                    if rejoined {
                        st.pending_rejoins = st.pending_rejoins.saturating_sub(1);
                        if st.pending_rejoins == 0 {
                            self.conn.online.store(true, Ordering::Release);
                        }
                    }
                    done
                };
                match done {
                    Some(Done::First(name, nick, occupants, topic)) => {
                        self.emit_room(&name, &nick, EventKind::SelfJoined { nick: nick.clone(), occupants, topic })
                            .await;
                    }
                    Some(Done::Rejoined(name, nick, came, went)) => {
                        let text = format!("Reconnected to {}.", self.conn.key.server);
                        self.emit_room(&name, &nick, EventKind::Status { text }).await;
                        for o in went {
                            self.emit_room(&name, &o.nick, EventKind::Left { kind: LeaveKind::Quit, reason: None })
                                .await;
                        }
                        for occupant in came {
                            let n = occupant.nick.clone();
                            self.emit_room(&name, &n, EventKind::Joined { occupant }).await;
                        }
                    }
                    None => {}
                }
            }
            Command::Response(
                code @ (Response::ERR_NOSUCHCHANNEL
                | Response::ERR_TOOMANYCHANNELS
                | Response::ERR_CHANNELISFULL
                | Response::ERR_INVITEONLYCHAN
                | Response::ERR_BANNEDFROMCHAN
                | Response::ERR_BADCHANNELKEY),
                ref args,
            ) if args.len() >= 2 => {
                let name = self.channel_name(&args[1]);
                let was_rejoining = {
                    let mut st = self.conn.lock();
                    let rejoining = st.channels.remove(&fold(&args[1])).is_some_and(|c| c.rejoining);
                    if rejoining {
                        st.pending_rejoins = st.pending_rejoins.saturating_sub(1);
                        if st.pending_rejoins == 0 {
                            self.conn.online.store(true, Ordering::Release);
                        }
                    }
                    rejoining
                };
                let text = args.get(2).cloned().unwrap_or_else(|| format!("{code:?}"));
                let kind = if was_rejoining {
                    EventKind::Left { kind: LeaveKind::Disconnected, reason: Some(format!("could not rejoin: {text}")) }
                } else {
                    EventKind::JoinFailed { reason: text }
                };
                self.emit_room_as(&name, self.own_sender(), kind).await;
            }
            Command::TOPIC(ref channel, Some(ref topic)) => {
                let Some(nick) = nick else { return };
                let name = self.channel_name(channel);
                let is_self = self.sender(&nick).is_self;
                {
                    let mut st = self.conn.lock();
                    if is_self {
                        st.answers.topic_answered(&fold(channel), Ok(()));
                    }
                    if let Some(ch) = st.channels.get_mut(&fold(channel)) {
                        ch.topic = Some(topic.clone());
                    }
                }
                self.emit_room(&name, &nick, EventKind::Topic { text: topic.clone() }).await;
            }
            // The answer to an acknowledgement PING (`PONG server :token`, or `PONG :token`).
            Command::PONG(ref a, ref b) => {
                let token = b.as_deref().unwrap_or(a);
                if let Some(n) = token.strip_prefix(ACK_TOKEN).and_then(|n| n.parse::<u64>().ok())
                    && let Some(next) = self.conn.acknowledged(n)
                {
                    self.send_now(next);
                }
            }
            Command::PRIVMSG(ref target, ref text) | Command::NOTICE(ref target, ref text) => {
                // The echo of a line the bridge wrote (IRCv3 echo-message) confirms it: never bridged again.
                if nick.as_deref().is_some_and(|n| self.sender(n).is_self) && self.echoed(&message, target) {
                    return;
                }
                let notice = matches!(message.command, Command::NOTICE(..));
                self.relay_text(nick.as_deref(), target, text, notice, &Meta::of(&message)).await;
            }
            // IRCv3 typing notifications (a client-only tag on TAGMSG).
            Command::Raw(ref verb, ref args) if verb.eq_ignore_ascii_case("TAGMSG") => {
                let (Some(nick), Some(target)) = (nick, args.first()) else { return };
                let typing = message.tags.iter().flatten().find(|t| t.0 == "+typing").and_then(|t| t.1.as_deref());
                let state = match typing {
                    Some("active") => ChatState::Composing,
                    Some("paused") => ChatState::Paused,
                    Some("done") => ChatState::Active,
                    _ => return,
                };
                if self.sender(&nick).is_self {
                    return;
                }
                let server = &self.conn.key.server;
                let chat = if target.starts_with(['#', '&', '+', '!']) {
                    ChatRef::room(self.conn.network.clone(), chat_id(&self.channel_name(target), server))
                } else {
                    ChatRef::direct(self.conn.network.clone(), chat_id(&nick, server))
                };
                self.emit(self.event(chat, &nick, EventKind::Typing(state))).await;
            }
            Command::PART(ref channel, ref reason) => {
                let Some(nick) = nick else { return };
                let name = self.channel_name(channel);
                let is_self = self.sender(&nick).is_self;
                {
                    let mut st = self.conn.lock();
                    if is_self && st.parting.remove(&fold(channel)) {
                        // The answer to the user's own leave, already reported: the
                        // channel entry, if any, is a rejoin's and stays.
                        debug!(channel, "the server confirmed our PART");
                        return;
                    }
                    if is_self {
                        st.channels.remove(&fold(channel));
                    } else if let Some(ch) = st.channels.get_mut(&fold(channel)) {
                        ch.members.remove(&fold(&nick));
                    }
                }
                self.emit_room(&name, &nick, EventKind::Left { kind: LeaveKind::Part, reason: reason.clone() }).await;
            }
            Command::KICK(ref channel, ref victim, ref reason) => {
                let name = self.channel_name(channel);
                let is_self = self.sender(victim).is_self;
                // A kick that follows a ban covering the victim is a ban (MUC status 301).
                let banned = {
                    let mut st = self.conn.lock();
                    let own_mask = st.prefix.clone();
                    let (bans, hostmask) = if is_self {
                        let bans = st.channels.remove(&fold(channel)).map(|ch| ch.recent_bans).unwrap_or_default();
                        (bans, own_mask)
                    } else {
                        match st.channels.get_mut(&fold(channel)) {
                            Some(ch) => {
                                ch.members.remove(&fold(victim));
                                (ch.recent_bans.clone(), ch.hostmasks.remove(&fold(victim)))
                            }
                            None => (VecDeque::new(), None),
                        }
                    };
                    bans.iter().any(|mask| ban_covers(mask, victim, hostmask.as_deref()))
                };
                let kind = if banned { LeaveKind::Ban { by: nick } } else { LeaveKind::Kick { by: nick } };
                self.emit_room(&name, victim, EventKind::Left { kind, reason: reason.clone() }).await;
            }
            Command::QUIT(ref reason) => {
                let Some(nick) = nick else { return };
                let rooms: Vec<String> = {
                    let mut st = self.conn.lock();
                    st.channels
                        .values_mut()
                        .filter_map(|ch| ch.members.remove(&fold(&nick)).map(|_| ch.name.clone()))
                        .collect()
                };
                for room in rooms {
                    self.emit_room(&room, &nick, EventKind::Left { kind: LeaveKind::Quit, reason: reason.clone() })
                        .await;
                }
            }
            Command::NICK(ref new_nick) => {
                let Some(nick) = nick else { return };
                let rooms: Vec<String> = {
                    let mut st = self.conn.lock();
                    if fold(&st.nick) == fold(&nick) {
                        st.nick = new_nick.clone();
                        if let Some(w) = st.answers.take_nick() {
                            w.answer(Ok(()));
                        }
                    }
                    st.channels
                        .values_mut()
                        .filter_map(|ch| {
                            let mut o = ch.members.remove(&fold(&nick))?;
                            o.nick = new_nick.clone();
                            o.id = RemoteId::new(chat_id(new_nick, &self.conn.key.server));
                            ch.members.insert(fold(new_nick), o);
                            Some(ch.name.clone())
                        })
                        .collect()
                };
                let is_self = fold(new_nick) == fold(&self.conn.nick());
                for room in rooms {
                    let mut sender = self.sender(&nick);
                    sender.is_self = is_self;
                    self.emit_room_as(&room, sender, EventKind::NickChanged { new_nick: new_nick.clone() }).await;
                }
            }
            Command::CAP(_, ref sub, ref a, ref b) => self.negotiate(sub, a.as_deref(), b.as_deref()),
            // SASL during registration: the server is ready for the credentials.
            Command::AUTHENTICATE(ref data) if data == "+" => {
                if let Some(login) = &self.sasl {
                    for piece in login.payloads() {
                        self.send_now(Command::AUTHENTICATE(piece));
                    }
                }
            }
            Command::Response(Response::RPL_SASLSUCCESS, _) => {
                info!(mechanism = self.sasl.as_ref().map(SaslLogin::mechanism), "logged in with SASL");
                self.send_now(Command::CAP(None, CapSubCommand::END, None, None));
            }
            Command::Response(
                code @ (Response::ERR_NICKLOCKED
                | Response::ERR_SASLFAIL
                | Response::ERR_SASLTOOLONG
                | Response::ERR_SASLABORT
                | Response::ERR_SASLALREADY),
                ref args,
            ) => {
                let reason = args.last().cloned().unwrap_or_else(|| format!("{code:?}"));
                let (user, mechanism, hint) = match &self.sasl {
                    Some(l) => (l.who(), l.mechanism(), l.hint()),
                    None => (String::new(), "", "check the SASL settings"),
                };
                warn!(user, mechanism, reason, "SASL login failed");
                self.notify_user(format!(
                    "SASL {mechanism} login as {user} failed on {}: {reason}. Connecting without logging in; {hint}.",
                    self.conn.key.server
                ));
                self.send_now(Command::CAP(None, CapSubCommand::END, None, None));
            }
            // The refusal of a topic change the user asked for: theirs to get as its error.
            Command::Response(code @ (Response::ERR_CHANOPRIVSNEEDED | Response::ERR_NOTONCHANNEL), ref args)
                if args.len() >= 2 && {
                    let text = args[1..].join(" ");
                    let refusal = if code == Response::ERR_CHANOPRIVSNEEDED {
                        DeliveryError::Forbidden(text)
                    } else {
                        DeliveryError::Rejected(text)
                    };
                    self.conn.lock().answers.topic_answered(&fold(&args[1]), Err(refusal))
                } => {}
            // labeled-response: a labelled line with nothing to say.
            Command::Raw(ref verb, _) if verb.eq_ignore_ascii_case("ACK") => {
                if let Some(pending) = self.take_echo(label_of(&message), None) {
                    lock_echo(&pending.echo).line_done(None);
                }
            }
            // A labelled error about a line the bridge wrote, or (unlabelled) about the
            // oldest line waiting for its echo to that target: the server refused it.
            Command::Response(code, ref args)
                if code.is_error()
                    && args.len() >= 2
                    && (label_of(&message).is_some()
                        || matches!(code, Response::ERR_NOSUCHNICK | Response::ERR_CANNOTSENDTOCHAN))
                    && self.take_echo(label_of(&message), Some(&args[1])).is_some_and(|pending| {
                        let text = args[1..].join(" ");
                        lock_echo(&pending.echo).refuse(text);
                        true
                    }) => {}
            Command::ChannelMODE(ref channel, ref modes) => {
                let mut changed = Vec::new();
                {
                    let mut st = self.conn.lock();
                    let Some(ch) = st.channels.get_mut(&fold(channel)) else { return };
                    for mode in modes {
                        if let Mode::Plus(ChannelMode::Ban, Some(mask)) = mode {
                            if ch.recent_bans.len() == RECENT_BANS {
                                ch.recent_bans.pop_front();
                            }
                            ch.recent_bans.push_back(mask.clone());
                            continue;
                        }
                        let (plus, m, arg) = match mode {
                            Mode::Plus(m, Some(a)) => (true, m, a),
                            Mode::Minus(m, Some(a)) => (false, m, a),
                            _ => continue,
                        };
                        let prefix = match m {
                            ChannelMode::Founder => '~',
                            ChannelMode::Admin => '&',
                            ChannelMode::Oper => '@',
                            ChannelMode::Halfop => '%',
                            ChannelMode::Voice => '+',
                            _ => continue,
                        };
                        let prefixes = ch.prefixes.entry(fold(arg)).or_default();
                        if plus && !prefixes.contains(prefix) {
                            prefixes.push(prefix);
                        } else if !plus {
                            prefixes.retain(|c| c != prefix);
                        }
                        let (role, affiliation) = roles(prefixes);
                        if let Some(o) = ch.members.get_mut(&fold(arg)) {
                            o.role = role;
                            o.affiliation = affiliation;
                            changed.push((ch.name.clone(), o.nick.clone(), role, affiliation));
                        }
                    }
                }
                for (room, nick, role, affiliation) in changed {
                    self.emit_room(&room, &nick, EventKind::RoleChanged { role, affiliation }).await;
                }
            }
            Command::Response(code @ (Response::ERR_PASSWDMISMATCH | Response::ERR_YOUREBANNEDCREEP), ref args) => {
                let text = args.last().cloned().unwrap_or_else(|| format!("{code:?}"));
                warn!(text, "the IRC server refused the connection");
                let refusal = if code == Response::ERR_PASSWDMISMATCH {
                    format!("the server password was refused ({text}); check the server password")
                } else {
                    text
                };
                self.conn.lock().refusal = Some(refusal);
            }
            Command::Response(code, ref args) if !SILENT_REPLIES.contains(&(code as u16)) && args.len() >= 2 => {
                // Replies to the user's own commands (WHOIS, errors…) go to the server's JID.
                let text = args[1..].join(" ");
                self.relay_text(None, "*", &text, true, &Meta::default()).await;
            }
            Command::ERROR(ref text) => {
                warn!(text, "IRC server sent ERROR");
                self.conn.lock().refusal.get_or_insert_with(|| text.clone());
            }
            _ => {}
        }
    }

    /// Tell the user something about their connection, from the server's JID.
    fn notify_user(&self, text: String) {
        let server = self.conn.key.server.clone();
        let network = self.conn.network.clone();
        let chat = ChatRef::service(network.clone(), server.clone());
        // The text quotes the server (a refusal's reason): its formatting codes become
        // styling like every other line from IRC, never raw control characters.
        let message = Message { body: crate::format::irc_to_styling(&text), notice: true, ..Default::default() };
        let event = Event::new(network, chat, Sender::new(server.clone(), server), EventKind::Message(message))
            .with_account(self.conn.key.account.clone());
        // Not awaited: negotiation runs inside the handling of one line. Handed over
        // at once when the sink has room; otherwise a task waits for room.
        let Err(event) = self.sink.try_emit(event) else { return };
        let sink = self.sink.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    let _ = sink.emit(*event).await;
                });
            }
            // No runtime: only the line-by-line harness (fuzzing) runs the reader so.
            Err(_) => warn!("event sink full outside a runtime; notice to the user dropped"),
        }
    }

    /// Whether `message` (ours) is the echo of a line waiting for it; confirms that line.
    fn echoed(&self, message: &IrcMessage, target: &str) -> bool {
        if !self.conn.lock().enabled.iter().any(|c| c == "echo-message") {
            return false;
        }
        let Some(pending) = self.take_echo(label_of(message), Some(target)) else { return false };
        lock_echo(&pending.echo).line_done(Meta::of(message).msgid);
        true
    }

    /// The line waiting for its echo that `label` names or, with no label, the
    /// oldest one to `target` (echoes come back in the order the lines went out).
    fn take_echo(&self, label: Option<&str>, target: Option<&str>) -> Option<PendingEcho> {
        let mut st = self.conn.lock();
        let index = match (label, target) {
            (Some(label), _) => st.echoes.iter().position(|p| p.label.as_deref() == Some(label)),
            (None, Some(target)) => {
                let target = fold(target);
                st.echoes.iter().position(|p| p.target == target)
            }
            (None, None) => None,
        }?;
        st.echoes.remove(index)
    }

    /// IRCv3 capability negotiation: request what we use from what the server offers.
    fn negotiate(&self, sub: &CapSubCommand, a: Option<&str>, b: Option<&str>) {
        match sub {
            CapSubCommand::LS => {
                // `CAP * LS * :caps` continues, `CAP * LS :caps` ends the list.
                let (more, caps) = match (a, b) {
                    (Some("*"), Some(caps)) => (true, caps),
                    (Some(caps), None) => (false, caps),
                    _ => (false, ""),
                };
                let (wanted, sasl_offered) = {
                    let mut st = self.conn.lock();
                    st.offered.extend(caps.split_whitespace().map(|c| c.split('=').next().unwrap_or(c).to_owned()));
                    if more {
                        return;
                    }
                    let mut wanted: Vec<String> = WANTED_CAPS
                        .iter()
                        .filter(|c| st.offered.iter().any(|o| o == *c))
                        .map(|c| c.to_string())
                        .collect();
                    let sasl_offered = st.offered.iter().any(|o| o == "sasl");
                    if self.sasl.is_some() && sasl_offered {
                        wanted.push("sasl".to_owned());
                    }
                    (wanted, sasl_offered)
                };
                if let (Some(login), false) = (&self.sasl, sasl_offered) {
                    let text = format!(
                        "{} does not offer SASL: not logged in as {}; connecting without logging in.",
                        self.conn.key.server,
                        login.who()
                    );
                    self.notify_user(text);
                }
                if wanted.is_empty() {
                    self.send_now(Command::CAP(None, CapSubCommand::END, None, None));
                } else {
                    self.send_now(Command::CAP(None, CapSubCommand::REQ, None, Some(wanted.join(" "))));
                }
            }
            CapSubCommand::ACK => {
                let caps = b.or(a).unwrap_or_default();
                info!(caps, "IRCv3 capabilities enabled");
                self.conn.lock().enabled.extend(caps.split_whitespace().map(str::to_owned));
                if let Some(login) = self.sasl.as_ref().filter(|_| caps.split_whitespace().any(|c| c == "sasl")) {
                    // Registration ends (CAP END) once the SASL exchange has.
                    self.send_now(Command::AUTHENTICATE(login.mechanism().to_owned()));
                } else {
                    self.send_now(Command::CAP(None, CapSubCommand::END, None, None));
                }
            }
            CapSubCommand::NAK => {
                warn!(caps = ?b.or(a), "the server refused the requested capabilities");
                self.send_now(Command::CAP(None, CapSubCommand::END, None, None));
            }
            _ => {}
        }
    }

    fn occupant(&self, nick: &str, prefixes: &str) -> Occupant {
        let (role, affiliation) = roles(prefixes);
        Occupant { id: RemoteId::new(chat_id(nick, &self.conn.key.server)), nick: nick.to_owned(), role, affiliation }
    }

    async fn relay_text(&self, nick: Option<&str>, target: &str, text: &str, notice: bool, meta: &Meta) {
        let (body, action) = match text.strip_prefix("\u{1}ACTION ") {
            Some(rest) => (rest.trim_end_matches('\u{1}'), true),
            None if text.starts_with('\u{1}') => return, // other CTCP requests are not chat
            None => (text, false),
        };
        let message = Message { body: crate::format::irc_to_styling(body), action, notice, ..Default::default() };
        let server = &self.conn.key.server;
        let network = self.conn.network.clone();
        let event = match nick {
            Some(nick) if target.starts_with(['#', '&', '+', '!']) => {
                let name = self.channel_name(target);
                let chat = ChatRef::room(network, chat_id(&name, server));
                self.event(chat, nick, EventKind::Message(message))
            }
            Some(nick) if fold(target) == fold(&self.conn.nick()) => {
                let chat = ChatRef::direct(network, chat_id(nick, server));
                self.event(chat, nick, EventKind::Message(message))
            }
            // Addressed to someone else: the server's notices before registration (`*`, `AUTH`).
            _ => {
                let chat = ChatRef::service(network.clone(), server.clone());
                let sender = Sender::new(server.clone(), nick.unwrap_or(server).to_owned());
                Event::new(network, chat, sender, EventKind::Message(message))
                    .with_account(self.conn.key.account.clone())
            }
        };
        self.emit(meta.apply(event)).await;
    }
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
