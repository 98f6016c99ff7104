//! The supervisor of one IRC connection: connects (SASL, registration), keeps it
//! connected with backoff, writes what is queued for it with flood control and
//! acknowledgement PINGs, and hands what the server says to the reader.

use super::*;

impl Supervisor {
    pub(super) async fn run(mut self) {
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

    pub(super) async fn connect(&self) -> Result<(Client, irc::client::ClientStream), String> {
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
    pub(super) async fn client_certificate(
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
    pub(super) async fn session(
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

    pub(super) async fn serve(
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
    pub(super) async fn fail_first_connect(&self, reason: &str) {
        warn!(reason, "cannot connect to IRC server");
        self.conn.closed.store(true, Ordering::Release);
        let rooms: Vec<String> = self.conn.lock().channels.drain().map(|(_, c)| c.name).collect();
        let reader = Reader::detached(self.conn.clone(), self.sink.clone());
        for room in rooms {
            reader.emit_room_as(&room, reader.own_sender(), EventKind::JoinFailed { reason: reason.to_owned() }).await;
        }
    }

    /// The server went away: say so in every room, and prepare to rejoin them.
    pub(super) async fn outage(&self, reason: &str, wait: Duration) {
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

impl SaslLogin {
    pub(super) fn of(server: &IrcServerConfig) -> Option<SaslLogin> {
        let sasl = server.sasl.as_ref()?;
        match sasl.mechanism {
            SaslMechanism::Plain => Some(SaslLogin::Plain {
                username: sasl.username.clone()?,
                password: sasl.password.as_ref()?.expose().to_owned(),
            }),
            SaslMechanism::External => Some(SaslLogin::External { authzid: sasl.username.clone() }),
        }
    }

    pub(super) fn mechanism(&self) -> &'static str {
        match self {
            SaslLogin::Plain { .. } => "PLAIN",
            SaslLogin::External { .. } => "EXTERNAL",
        }
    }

    /// Whom the login is for, as the user knows it.
    pub(super) fn who(&self) -> String {
        match self {
            SaslLogin::Plain { username, .. } => username.clone(),
            SaslLogin::External { authzid: Some(account) } => format!("{account} (client certificate)"),
            SaslLogin::External { authzid: None } => "the client certificate's account".to_owned(),
        }
    }

    /// What to check when the login failed.
    pub(super) fn hint(&self) -> &'static str {
        match self {
            SaslLogin::Plain { .. } => "check the SASL username and password",
            SaslLogin::External { .. } => {
                "check that the client certificate's fingerprint is registered with the services account (e.g. NickServ CERT ADD)"
            }
        }
    }

    /// The `AUTHENTICATE` payloads: base64 in pieces of at most 400 bytes, a `+`
    /// after a last piece of exactly 400, or alone for an empty response (IRCv3 SASL).
    pub(super) fn payloads(&self) -> Vec<String> {
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
