//! One IRC connection of one XMPP user to one server, and the task that turns
//! its traffic into core events.
//!
//! Outgoing lines go through a queue drained by a writer task that waits until
//! the server has accepted the registration (001) and paces lines with the
//! [`TokenBucket`]. Incoming lines are translated into [`Event`]s for the router:
//! a channel join is reported once the occupant list (NAMES) is complete, so the
//! XMPP side can send the occupants, then the user's own presence, then the subject.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use irc::client::prelude::{Client, Command, Config as IrcClientConfig, Prefix, Response};
use irc::proto::Message as IrcMessage;
use isthmus_config::{IrcNetworkConfig, IrcServerConfig};
use isthmus_core::jid::BareJid;
use isthmus_core::model::{
    Affiliation, ChatRef, Event, EventKind, LeaveKind, Message, NetworkId, Occupant, RemoteId, Role, Sender,
};
use isthmus_core::network::{DeliveryError, EventSink};
use tokio::sync::{mpsc, watch};
use tracing::{Instrument, debug, info, warn};

use crate::address::chat_id;
use crate::flood::TokenBucket;
use crate::text::{one_line, split_lines, text_budget};

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
    topic: Option<String>,
    /// Occupants by lower-cased nick.
    members: HashMap<String, Occupant>,
}

#[derive(Debug, Default)]
struct State {
    nick: String,
    /// Our `nick!user@host` as the server relays it, learnt from our own JOIN.
    prefix: Option<String>,
    channels: HashMap<String, Channel>,
}

/// A live IRC connection.
pub struct Connection {
    network: NetworkId,
    key: ConnectionKey,
    outgoing: mpsc::UnboundedSender<IrcMessage>,
    state: Arc<Mutex<State>>,
    alive: Arc<AtomicBool>,
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
    /// Connect and register; returns once the TCP (and TLS) connection is up.
    pub async fn open(
        network: NetworkId,
        key: ConnectionKey,
        nick: String,
        server: IrcServerConfig,
        net_config: Arc<IrcNetworkConfig>,
        sink: EventSink,
    ) -> Result<Arc<Connection>, DeliveryError> {
        let nick = one_line(&nick).replace([' ', ','], "_");
        let config = IrcClientConfig {
            nickname: Some(nick.clone()),
            alt_nicks: vec![format!("{nick}_"), format!("{nick}__"), format!("{nick}___")],
            username: Some(ident_for(&key.account)),
            realname: Some(net_config.realname.clone()),
            server: Some(server.host_or(&key.server).to_owned()),
            port: Some(server.port()),
            use_tls: Some(server.tls),
            dangerously_accept_invalid_certs: Some(!server.tls_verify),
            cert_path: server.tls_ca_file.as_ref().map(|p| p.display().to_string()),
            password: server.password.as_ref().map(|p| p.expose().to_owned()),
            encoding: Some("UTF-8".to_owned()),
            ping_time: Some(60),
            ping_timeout: Some(30),
            ..Default::default()
        };
        let mut client = Client::from_config(config)
            .await
            .map_err(|e| DeliveryError::Unavailable(format!("cannot connect to IRC server {}: {e}", key.server)))?;
        client.identify().map_err(|e| DeliveryError::Unavailable(format!("cannot register on {}: {e}", key.server)))?;
        let stream = client
            .stream()
            .map_err(|e| DeliveryError::Unavailable(format!("IRC connection to {} failed: {e}", key.server)))?;

        let (tx, rx) = mpsc::unbounded_channel();
        let (registered_tx, registered_rx) = watch::channel(false);
        let state = Arc::new(Mutex::new(State { nick: nick.clone(), ..Default::default() }));
        let alive = Arc::new(AtomicBool::new(true));
        let conn = Arc::new(Connection { network, key: key.clone(), outgoing: tx, state, alive });

        let span = tracing::info_span!("irc", account = %key.account, server = %key.server);
        let flood =
            TokenBucket::new(net_config.flood.enabled, net_config.flood.burst, net_config.flood.lines_per_second);
        tokio::spawn(writer(client.sender(), rx, registered_rx, flood, conn.alive.clone()).instrument(span.clone()));
        let reader =
            Reader { conn: conn.clone(), sink, on_connect: server.on_connect.clone(), registered: registered_tx };
        tokio::spawn(reader.run(client, stream).instrument(span));
        Ok(conn)
    }

    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
    }

    pub fn nick(&self) -> String {
        self.lock().nick.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A poisoned lock only means another task panicked mid-update; the state is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn send(&self, command: Command) -> Result<(), DeliveryError> {
        self.outgoing
            .send(IrcMessage::from(command))
            .map_err(|_| DeliveryError::Unavailable(format!("the connection to {} is closed", self.key.server)))
    }

    /// Join `channel` (with its key, if any). The join is reported when the server confirms it.
    pub fn join(&self, channel: &str, key: Option<&str>) -> Result<(), DeliveryError> {
        self.lock().channels.entry(fold(channel)).or_default().name = channel.to_owned();
        self.send(Command::JOIN(channel.to_owned(), key.map(one_line), None))
    }

    pub fn part(&self, channel: &str, reason: Option<&str>) -> Result<(), DeliveryError> {
        self.send(Command::PART(channel.to_owned(), reason.map(one_line)))
    }

    pub fn set_topic(&self, channel: &str, topic: &str) -> Result<(), DeliveryError> {
        self.send(Command::TOPIC(channel.to_owned(), Some(one_line(topic))))
    }

    /// Send a message as one or more lines; returns how many lines were queued.
    pub fn send_message(&self, target: &str, message: &Message) -> Result<usize, DeliveryError> {
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
        let lines = split_lines(body, budget);
        if lines.is_empty() {
            return Err(DeliveryError::Rejected("an empty message cannot be sent to IRC".into()));
        }
        for line in &lines {
            let text = if action { format!("\u{1}ACTION {line}\u{1}") } else { line.clone() };
            let command = if message.notice {
                Command::NOTICE(target.to_owned(), text)
            } else {
                Command::PRIVMSG(target.to_owned(), text)
            };
            self.send(command)?;
        }
        Ok(lines.len())
    }
}

/// Drains the outgoing queue once registered, paced by the token bucket.
async fn writer(
    sender: irc::client::Sender,
    mut rx: mpsc::UnboundedReceiver<IrcMessage>,
    mut registered: watch::Receiver<bool>,
    mut flood: TokenBucket,
    alive: Arc<AtomicBool>,
) {
    if registered.wait_for(|r| *r).await.is_err() {
        return;
    }
    while let Some(message) = rx.recv().await {
        flood.take().await;
        if let Err(e) = sender.send(message) {
            warn!(error = %e, "IRC write failed");
            alive.store(false, Ordering::Release);
            return;
        }
    }
}

/// Translates one connection's incoming traffic.
struct Reader {
    conn: Arc<Connection>,
    sink: EventSink,
    on_connect: Vec<String>,
    registered: watch::Sender<bool>,
}

impl Reader {
    async fn run(self, client: Client, mut stream: irc::client::ClientStream) {
        let _client = client; // keeps the connection's state alive as long as the stream
        let reason = loop {
            match stream.next().await {
                Some(Ok(message)) => self.handle(message).await,
                Some(Err(e)) => break e.to_string(),
                None => break "the server closed the connection".to_owned(),
            }
        };
        info!(%reason, "IRC connection ended");
        self.conn.alive.store(false, Ordering::Release);
        let channels: Vec<String> = {
            let mut st = self.conn.lock();
            let names = st.channels.values().filter(|c| c.announced).map(|c| c.name.clone()).collect();
            st.channels.clear();
            names
        };
        let nick = self.conn.nick();
        for channel in channels {
            self.emit_room(
                &channel,
                &nick,
                EventKind::Status { text: format!("Disconnected from {}: {reason}", self.conn.key.server) },
            )
            .await;
            self.emit_room(
                &channel,
                &nick,
                EventKind::Left { kind: LeaveKind::Disconnected, reason: Some(reason.clone()) },
            )
            .await;
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
        let chat = ChatRef::room(self.conn.network.clone(), chat_id(channel, &self.conn.key.server));
        self.emit(self.event(chat, nick, kind)).await;
    }

    /// The JID spelling of a channel the server names.
    fn channel_name(&self, channel: &str) -> String {
        self.conn.lock().channels.get(&fold(channel)).map(|c| c.name.clone()).unwrap_or_else(|| channel.to_owned())
    }

    async fn handle(&self, message: IrcMessage) {
        let nick = match &message.prefix {
            Some(Prefix::Nickname(nick, _, _)) => Some(nick.clone()),
            _ => None,
        };
        match message.command {
            Command::Response(Response::RPL_WELCOME, ref args) => {
                if let Some(me) = args.first() {
                    self.conn.lock().nick = me.clone();
                }
                info!(nick = %self.conn.nick(), "registered on IRC server");
                for line in &self.on_connect {
                    match line.parse::<IrcMessage>() {
                        Ok(m) => {
                            let _ = self.conn.outgoing.send(m);
                        }
                        Err(e) => warn!(line, error = %e, "on_connect line is not a valid IRC command; skipped"),
                    }
                }
                let _ = self.registered.send(true);
            }
            Command::JOIN(ref channel, _, _) => {
                let Some(nick) = nick else { return };
                if self.sender(&nick).is_self {
                    let mut st = self.conn.lock();
                    st.prefix = message.prefix.as_ref().map(|p| p.to_string());
                    let ch = st.channels.entry(fold(channel)).or_default();
                    if ch.name.is_empty() {
                        ch.name = channel.clone();
                    }
                    ch.joined = true;
                    ch.members.clear();
                    return;
                }
                let occupant = self.occupant(&nick, "");
                let name = {
                    let mut st = self.conn.lock();
                    let Some(ch) = st.channels.get_mut(&fold(channel)) else { return };
                    ch.members.insert(fold(&nick), occupant.clone());
                    if !ch.announced {
                        return;
                    }
                    ch.name.clone()
                };
                self.emit_room(&name, &nick, EventKind::Joined { occupant }).await;
            }
            Command::Response(Response::RPL_TOPIC, ref args) if args.len() >= 3 => {
                let mut st = self.conn.lock();
                if let Some(ch) = st.channels.get_mut(&fold(&args[1])) {
                    ch.topic = Some(args[2].clone());
                }
            }
            Command::Response(Response::RPL_NAMREPLY, ref args) if args.len() >= 4 => {
                let names: Vec<Occupant> = args[3]
                    .split_whitespace()
                    .map(|entry| {
                        let bare = entry.trim_start_matches(['~', '&', '@', '%', '+']);
                        self.occupant(bare, &entry[..entry.len() - bare.len()])
                    })
                    .collect();
                let mut st = self.conn.lock();
                if let Some(ch) = st.channels.get_mut(&fold(&args[2])) {
                    for o in names {
                        ch.members.insert(fold(&o.nick), o);
                    }
                }
            }
            Command::Response(Response::RPL_ENDOFNAMES, ref args) if args.len() >= 2 => {
                let announce = {
                    let mut st = self.conn.lock();
                    let nick = st.nick.clone();
                    match st.channels.get_mut(&fold(&args[1])) {
                        Some(ch) if ch.joined && !ch.announced => {
                            ch.announced = true;
                            let mut occupants: Vec<Occupant> =
                                ch.members.values().filter(|o| fold(&o.nick) != fold(&nick)).cloned().collect();
                            occupants.sort_by(|a, b| a.nick.cmp(&b.nick));
                            Some((ch.name.clone(), nick, occupants, ch.topic.clone()))
                        }
                        _ => None,
                    }
                };
                if let Some((name, nick, occupants, topic)) = announce {
                    self.emit_room(&name, &nick, EventKind::SelfJoined { nick: nick.clone(), occupants, topic }).await;
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
                self.conn.lock().channels.remove(&fold(&args[1]));
                let text = args.get(2).cloned().unwrap_or_else(|| format!("{code:?}"));
                let me = self.conn.nick();
                self.emit_room(&name, &me, EventKind::JoinFailed { reason: text }).await;
            }
            Command::TOPIC(ref channel, Some(ref topic)) => {
                let Some(nick) = nick else { return };
                let name = self.channel_name(channel);
                if let Some(ch) = self.conn.lock().channels.get_mut(&fold(channel)) {
                    ch.topic = Some(topic.clone());
                }
                self.emit_room(&name, &nick, EventKind::Topic { text: topic.clone() }).await;
            }
            Command::PRIVMSG(ref target, ref text) | Command::NOTICE(ref target, ref text) => {
                let notice = matches!(message.command, Command::NOTICE(..));
                self.relay_text(nick.as_deref(), target, text, notice).await;
            }
            Command::PART(ref channel, ref reason) => {
                let Some(nick) = nick else { return };
                let name = self.channel_name(channel);
                let is_self = self.sender(&nick).is_self;
                {
                    let mut st = self.conn.lock();
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
                {
                    let mut st = self.conn.lock();
                    if is_self {
                        st.channels.remove(&fold(channel));
                    } else if let Some(ch) = st.channels.get_mut(&fold(channel)) {
                        ch.members.remove(&fold(victim));
                    }
                }
                self.emit_room(
                    &name,
                    victim,
                    EventKind::Left { kind: LeaveKind::Kick { by: nick }, reason: reason.clone() },
                )
                .await;
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
                for room in rooms {
                    let mut sender = self.sender(&nick);
                    sender.is_self = fold(new_nick) == fold(&self.conn.nick());
                    let chat = ChatRef::room(self.conn.network.clone(), chat_id(&room, &self.conn.key.server));
                    let event = Event::new(
                        self.conn.network.clone(),
                        chat,
                        sender,
                        EventKind::NickChanged { new_nick: new_nick.clone() },
                    )
                    .with_account(self.conn.key.account.clone());
                    self.emit(event).await;
                }
            }
            Command::ERROR(ref text) => warn!(text, "IRC server sent ERROR"),
            _ => {}
        }
    }

    fn occupant(&self, nick: &str, prefixes: &str) -> Occupant {
        let (role, affiliation) = if prefixes.contains(['~', '&']) {
            (Role::Moderator, Affiliation::Owner)
        } else if prefixes.contains('@') {
            (Role::Moderator, Affiliation::Admin)
        } else if prefixes.contains('%') {
            (Role::Moderator, Affiliation::Member)
        } else if prefixes.contains('+') {
            (Role::Participant, Affiliation::Member)
        } else {
            (Role::Participant, Affiliation::None)
        };
        Occupant { id: RemoteId::new(chat_id(nick, &self.conn.key.server)), nick: nick.to_owned(), role, affiliation }
    }

    async fn relay_text(&self, nick: Option<&str>, target: &str, text: &str, notice: bool) {
        let (body, action) = match text.strip_prefix("\u{1}ACTION ") {
            Some(rest) => (rest.trim_end_matches('\u{1}'), true),
            None if text.starts_with('\u{1}') => return, // other CTCP requests are not chat
            None => (text, false),
        };
        let message = Message { body: body.to_owned(), action, notice, ..Default::default() };
        let server = &self.conn.key.server;
        let network = self.conn.network.clone();
        match nick {
            Some(nick) if target.starts_with(['#', '&', '+', '!']) => {
                let name = self.channel_name(target);
                self.emit_room(&name, nick, EventKind::Message(message)).await;
            }
            Some(nick) => {
                let chat = ChatRef::direct(network, chat_id(nick, server));
                self.emit(self.event(chat, nick, EventKind::Message(message))).await;
            }
            None => {
                // From the server itself: shown on the server's JID.
                let chat = ChatRef::service(network.clone(), server.clone());
                let sender = Sender::new(server.clone(), server.clone());
                let event = Event::new(network, chat, sender, EventKind::Message(message))
                    .with_account(self.conn.key.account.clone());
                self.emit(event).await;
            }
        }
    }
}
