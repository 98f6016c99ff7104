//! The reader of one IRC connection: what the server says (joins, names, modes,
//! messages, echoes, numerics) as core events for the router.

use super::*;

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
    pub(super) fn nick_refused(&self) -> Result<(), String> {
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
    pub(super) fn send_now(&self, command: Command) {
        if let Some(s) = &self.sender
            && let Err(e) = s.send(self.wire.encode(command.into()))
        {
            warn!(error = %e, "IRC write failed");
        }
    }

    pub(super) fn sender(&self, nick: &str) -> Sender {
        let is_self = fold(nick) == fold(&self.conn.lock().nick);
        Sender { id: RemoteId::new(chat_id(nick, &self.conn.key.server)), nick: nick.to_owned(), is_self }
    }

    pub(super) fn event(&self, chat: ChatRef, nick: &str, kind: EventKind) -> Event {
        Event::new(self.conn.network.clone(), chat, self.sender(nick), kind).with_account(self.conn.key.account.clone())
    }

    pub(super) async fn emit(&self, event: Event) {
        if self.sink.emit(event).await.is_err() {
            debug!("router gone; dropping IRC event during shutdown");
        }
    }

    pub(super) async fn emit_room(&self, channel: &str, nick: &str, kind: EventKind) {
        self.emit_room_as(channel, self.sender(nick), kind).await;
    }

    pub(super) async fn emit_room_as(&self, channel: &str, sender: Sender, kind: EventKind) {
        let chat = ChatRef::room(self.conn.network.clone(), chat_id(channel, &self.conn.key.server));
        let event =
            Event::new(self.conn.network.clone(), chat, sender, kind).with_account(self.conn.key.account.clone());
        self.emit(event).await;
    }

    /// The user's own sender identity, whatever the server thinks the nick is now.
    pub(super) fn own_sender(&self) -> Sender {
        let mut sender = self.sender(&self.conn.nick());
        sender.is_self = true;
        sender
    }

    /// The JID spelling of a channel the server names.
    pub(super) fn channel_name(&self, channel: &str) -> String {
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
    pub(super) fn notify_user(&self, text: String) {
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
    pub(super) fn echoed(&self, message: &IrcMessage, target: &str) -> bool {
        if !self.conn.lock().enabled.iter().any(|c| c == "echo-message") {
            return false;
        }
        let Some(pending) = self.take_echo(label_of(message), Some(target)) else { return false };
        lock_echo(&pending.echo).line_done(Meta::of(message).msgid);
        true
    }

    /// The line waiting for its echo that `label` names or, with no label, the
    /// oldest one to `target` (echoes come back in the order the lines went out).
    pub(super) fn take_echo(&self, label: Option<&str>, target: Option<&str>) -> Option<PendingEcho> {
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
    pub(super) fn negotiate(&self, sub: &CapSubCommand, a: Option<&str>, b: Option<&str>) {
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

    pub(super) fn occupant(&self, nick: &str, prefixes: &str) -> Occupant {
        let (role, affiliation) = roles(prefixes);
        Occupant { id: RemoteId::new(chat_id(nick, &self.conn.key.server)), nick: nick.to_owned(), role, affiliation }
    }

    pub(super) async fn relay_text(&self, nick: Option<&str>, target: &str, text: &str, notice: bool, meta: &Meta) {
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
