//! The handle the rest of the bridge holds on a connection: opening it, joining
//! and parting channels, sending messages, and its state for status commands.

use super::*;

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

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A poisoned lock only means another task panicked mid-update; the state is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn send(&self, command: Command) -> Result<(), DeliveryError> {
        self.send_with(command, None)
    }

    pub(super) fn send_with(&self, command: Command, receipt: Option<Receipt>) -> Result<(), DeliveryError> {
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
    pub(super) fn expect_ack(&self, queued: &mut Queued) {
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
    pub(super) fn ack_ping(&self) -> Option<Command> {
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
    pub(super) fn acknowledged(&self, n: u64) -> Option<Command> {
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
