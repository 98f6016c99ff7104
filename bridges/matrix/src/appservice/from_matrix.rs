//! Matrix → XMPP in portal rooms: the homeserver's transactions (or the bot's
//! sync), timeline events, membership and power levels, ephemeral events, as
//! core events for the router.

use super::*;

impl Portals {
    /// Process one transaction (once per id). `true` once what it carried is taken in
    /// for good by the router (the homeserver may then forget it); `false` when the
    /// gateway is shutting down (the homeserver is to send it again).
    pub async fn transaction(&self, id: &str, txn: Transaction) -> bool {
        let mut seen = self.transactions.lock().await;
        if seen.contains(id) {
            debug!(txn = id, "transaction already processed");
            return true;
        }
        debug!(txn = id, events = txn.events.len(), ephemeral = txn.ephemeral.len(), "transaction");
        if !self.process_batch(&txn.events, &txn.ephemeral).await {
            return false;
        }
        seen.insert(id);
        true
    }

    /// Hand the timeline events (each with its `room_id`) and then the ephemeral ones to
    /// the router; `true` once the timeline events are taken in for good.
    pub(super) async fn process_batch(&self, events: &[Value], ephemeral: &[Value]) -> bool {
        for ev in events {
            self.timeline(ev).await;
        }
        let routed = std::mem::take(&mut *self.routed.lock().unwrap_or_else(|e| e.into_inner()));
        for r in routed {
            if !r.wait().await {
                return false;
            }
        }
        for ev in ephemeral {
            self.ephemeral(ev).await;
        }
        true
    }

    /// The bot's account: the stored access token when the homeserver still takes it,
    /// else a password login (whose token is stored).
    pub(super) async fn bot_login(
        &self,
        config: &MatrixPortalBotConfig,
        data_dir: &std::path::Path,
    ) -> Result<(), String> {
        let token_file = data_dir.join(BOT_TOKEN_FILE);
        if let Ok(text) = std::fs::read_to_string(&token_file)
            && let Ok(stored) = serde_json::from_str::<Value>(&text)
            && stored["user_id"] == config.user_id.as_str()
            && let Some(token) = stored["access_token"].as_str()
        {
            *self.hs.token.lock().unwrap_or_else(|e| e.into_inner()) = token.to_owned();
            match self.hs.call(reqwest::Method::GET, "/_matrix/client/v3/account/whoami", None, None).await {
                Ok(_) => return Ok(()),
                Err(HsError::Refused { status: 401, .. }) => {
                    info!("the stored bot login is no longer valid: logging in")
                }
                Err(e) => return Err(format!("the homeserver does not answer: {e}")),
            }
        }
        self.hs.token.lock().unwrap_or_else(|e| e.into_inner()).clear();
        let body = json!({
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": config.user_id},
            "password": config.password.expose(),
            "initial_device_display_name": "Isthmus portal rooms",
        });
        let r = self
            .hs
            .call(reqwest::Method::POST, "/_matrix/client/v3/login", None, Some(&body))
            .await
            .map_err(|e| format!("the homeserver refused the bot's login as {}: {e}", config.user_id))?;
        let token = r["access_token"].as_str().ok_or("the homeserver's login answer has no access_token")?;
        *self.hs.token.lock().unwrap_or_else(|e| e.into_inner()) = token.to_owned();
        let stored = json!({"user_id": config.user_id, "device_id": r["device_id"], "access_token": token});
        write_private(&token_file, stored.to_string().as_bytes())?;
        info!(device = %r["device_id"], "the portal bot logged in");
        Ok(())
    }

    /// One sync of the bot from `since` (`None`: the first, whose history is not bridged);
    /// its `next_batch` once what it carried is taken in.
    pub(super) async fn bot_sync(&self, since: Option<&str>) -> Result<Option<String>, HsError> {
        let path = match since {
            Some(since) => format!("/_matrix/client/v3/sync?timeout=30000&since={}", enc(since)),
            None => format!("/_matrix/client/v3/sync?filter={}", enc(r#"{"room":{"timeline":{"limit":1}}}"#)),
        };
        let r = self.hs.call_raw(reqwest::Method::GET, &path, None, None, Duration::from_secs(90)).await?;
        // Invitations to portal rooms are accepted.
        for room_id in
            r["rooms"]["invite"].as_object().map(|o| o.keys().cloned().collect::<Vec<_>>()).unwrap_or_default()
        {
            let chat_id = self.state().chat_of.get(&room_id).cloned();
            match chat_id {
                Some(chat_id) => {
                    info!(room = %room_id, "the portal bot was invited to a portal room");
                    self.state().ready.remove(&chat_id);
                    if let Err(e) = self.ready_room(&chat_id).await {
                        warn!(room = %room_id, error = %e, "cannot join the portal room");
                    }
                }
                None => debug!(room = %room_id, "invitation to a room that is no portal: ignored"),
            }
        }
        let with_room = |room_id: &str, events: &Value| -> Vec<Value> {
            events
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| {
                    let mut e = e.clone();
                    e["room_id"] = json!(room_id);
                    e
                })
                .collect()
        };
        let mut events = Vec::new();
        let mut ephemeral = Vec::new();
        if since.is_some() {
            for (room_id, room) in r["rooms"]["join"].as_object().into_iter().flatten() {
                if room["timeline"]["limited"] == true {
                    warn!(room = %room_id, "the sync skipped events of a portal room (too many at once)");
                }
                events.extend(with_room(room_id, &room["timeline"]["events"]));
                ephemeral.extend(with_room(room_id, &room["ephemeral"]["events"]));
            }
        }
        if !self.process_batch(&events, &ephemeral).await {
            return Ok(None);
        }
        Ok(r["next_batch"].as_str().map(str::to_owned))
    }

    pub(super) fn chat(&self, chat_id: &str) -> ChatRef {
        ChatRef::room(self.network.clone(), chat_id)
    }

    /// Hand a timeline event to the router; the transaction carrying it is acknowledged
    /// once every such event is taken in for good.
    pub(super) async fn emit(&self, event: Event) {
        if let Ok(routed) = self.sink.emit_routed(event).await {
            self.routed.lock().unwrap_or_else(|e| e.into_inner()).push(routed);
        }
    }

    pub(super) async fn timeline(&self, ev: &Value) {
        let Some(room_id) = ev["room_id"].as_str() else { return };
        let chat_id = self.state().chat_of.get(room_id).cloned();
        // The bot invited to a portal room accepts.
        if ev["type"] == "m.room.member" && ev["state_key"] == self.bot.as_str() {
            if ev["content"]["membership"] == "invite" {
                match chat_id {
                    Some(chat_id) => {
                        info!(room = room_id, "the gateway's Matrix user was invited to a portal room");
                        self.state().ready.remove(&chat_id);
                        if let Err(e) = self.ready_room(&chat_id).await {
                            warn!(room = room_id, error = %e, "cannot join the portal room");
                        }
                    }
                    None => info!(room = room_id, "invitation to a room that is no portal: ignored"),
                }
            } else if ev["content"]["membership"] != "join"
                && let Some(chat_id) = &chat_id
            {
                warn!(room = room_id, "the gateway's Matrix user is no longer in a portal room");
                self.state().ready.remove(chat_id);
            }
            return;
        }
        let Some(chat_id) = chat_id else {
            debug!(room = room_id, "event of a room that is no portal");
            return;
        };
        let (env, mut incoming) = match incoming::parse_unstyled(ev) {
            Ok(x) => x,
            Err(e) => {
                warn!(room = room_id, error = %e, "Matrix event not bridged");
                return;
            }
        };
        incoming::style(&mut incoming, &env.event_id).await;
        incoming::fit_for_xmpp(&mut incoming, room_id, &env.event_id);
        let chat = self.chat(&chat_id);
        if let Incoming::Member { user, membership, previous, displayname, reason, .. } = incoming {
            self.member(&chat, room_id, &env, user, membership, previous, displayname, reason).await;
            return;
        }
        if let Incoming::PowerLevels { now, before } = &incoming {
            self.levels_changed(&chat, room_id, &env, now, before.as_ref()).await;
            return;
        }
        if self.is_ours(&env.sender) {
            // Our own puppets' reactions are kept to remove them later.
            match &incoming {
                Incoming::Reaction { target, key } => {
                    self.state().reactions.add(room_id, &target.0, &env.sender, key, &env.event_id);
                }
                Incoming::Redaction { redacts, .. } => {
                    self.state().reactions.remove(redacts);
                }
                _ => {}
            }
            return;
        }
        let nick = self.state().members.get(room_id).map(|m| nick_in(m, &env.sender)).unwrap_or(env.sender.clone());
        let sender = Sender::new(env.sender.clone(), nick);
        let kind = match incoming {
            Incoming::Message { message } => EventKind::Message(message),
            Incoming::Edit { target, message } => EventKind::Correction { target, message },
            Incoming::Reaction { target, key } => {
                let emojis = self.state().reactions.add(room_id, &target.0, &env.sender, &key, &env.event_id);
                EventKind::Reactions { target, emojis }
            }
            Incoming::Redaction { redacts, reason } => {
                let removed = self.state().reactions.remove(&redacts);
                match removed {
                    Some((target, reactor, emojis)) => {
                        if self.is_ours(&reactor) {
                            return;
                        }
                        let nick =
                            self.state().members.get(room_id).map(|m| nick_in(m, &reactor)).unwrap_or(reactor.clone());
                        let event = Event::new(
                            self.network.clone(),
                            chat,
                            Sender::new(reactor, nick),
                            EventKind::Reactions { target: MessageRef(target), emojis },
                        )
                        .with_origin_id(env.event_id.clone())
                        .at(env.time);
                        self.emit(event).await;
                        return;
                    }
                    None => {
                        let moderator = self.moderator_of(room_id, &redacts, &env.sender, &sender.nick).await;
                        EventKind::Retraction { target: MessageRef(redacts), moderator, reason }
                    }
                }
            }
            Incoming::Topic { text } => EventKind::Topic { text },
            Incoming::Member { .. } | Incoming::PowerLevels { .. } | Incoming::Other => return,
        };
        let kind = crate::media::proxied(&self.network, kind);
        let event = Event::new(self.network.clone(), chat, sender, kind).with_origin_id(env.event_id).at(env.time);
        self.emit(event).await;
    }

    /// The portal room's power levels changed: its Matrix members whose MUC role or
    /// affiliation follows a new level get a role change on XMPP.
    pub(super) async fn levels_changed(
        &self,
        chat: &ChatRef,
        room_id: &str,
        env: &incoming::Envelope,
        now: &UserLevels,
        before: Option<&UserLevels>,
    ) {
        let members = self.state().members.get(room_id).cloned().unwrap_or_default();
        let others = members.keys().map(String::as_str).filter(|u| !self.is_ours(u));
        for (user, role, affiliation) in crate::session::role_changes(now, before, others) {
            let nick = nick_in(&members, &user);
            let event = Event::new(
                self.network.clone(),
                chat.clone(),
                Sender::new(user, nick),
                EventKind::RoleChanged { role, affiliation },
            )
            .with_origin_id(env.event_id.clone())
            .at(env.time);
            self.emit(event).await;
        }
    }

    /// A membership change: someone (not ours) entered, left or changed name; a puppet removed by someone.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn member(
        &self,
        chat: &ChatRef,
        room_id: &str,
        env: &incoming::Envelope,
        user: String,
        membership: String,
        previous: Option<String>,
        displayname: Option<String>,
        reason: Option<String>,
    ) {
        let (was_in, old_nick, new_nick, actor_nick) = {
            let mut st = self.state();
            let members = st.members.entry(room_id.to_owned()).or_default();
            let was_in = previous.as_deref().map_or(members.contains_key(&user), |p| p == "join");
            let old_nick = nick_in(members, &user);
            let actor_nick = nick_in(members, &env.sender);
            if membership == "join" {
                members.insert(user.clone(), displayname);
            } else {
                members.remove(&user);
            }
            let new_nick = nick_in(members, &user);
            (was_in, old_nick, new_nick, actor_nick)
        };
        let removal = |by: Option<String>| match (membership.as_str(), by) {
            ("ban", by) => LeaveKind::Ban { by },
            (_, Some(by)) => LeaveKind::Kick { by: Some(by) },
            _ => LeaveKind::Part,
        };
        if self.is_ours(&user) {
            // A puppet removed by someone else: its XMPP user is out of the portal.
            if let Some(jid) = self.puppet_jid(&user)
                && env.sender != user
                && was_in
                && matches!(membership.as_str(), "leave" | "ban")
            {
                let kind = EventKind::Left { kind: removal(Some(actor_nick)), reason };
                let event = Event::new(self.network.clone(), chat.clone(), Sender::own(jid, old_nick), kind)
                    .with_origin_id(env.event_id.clone())
                    .at(env.time);
                self.emit(event).await;
            }
            return;
        }
        let (sender, kind) = match membership.as_str() {
            "join" if !was_in => {
                let occupant = Occupant {
                    id: RemoteId::new(user.clone()),
                    nick: new_nick.clone(),
                    role: Role::Participant,
                    affiliation: Affiliation::Member,
                };
                (Sender::new(user, new_nick), EventKind::Joined { occupant })
            }
            "join" if old_nick != new_nick => (Sender::new(user, old_nick), EventKind::NickChanged { new_nick }),
            "leave" | "ban" if was_in => {
                let by = (env.sender != user).then_some(actor_nick);
                (Sender::new(user, old_nick), EventKind::Left { kind: removal(by), reason })
            }
            _ => return,
        };
        let event = Event::new(self.network.clone(), chat.clone(), sender, kind)
            .with_origin_id(env.event_id.clone())
            .at(env.time);
        self.emit(event).await;
    }

    pub(super) async fn ephemeral(&self, ev: &Value) {
        let Some(room_id) = ev["room_id"].as_str() else { return };
        let Some(chat_id) = self.state().chat_of.get(room_id).cloned() else { return };
        let chat = self.chat(&chat_id);
        let nick = |user: &str| self.state().members.get(room_id).map(|m| nick_in(m, user)).unwrap_or(user.to_owned());
        match ev["type"].as_str() {
            Some("m.typing") => {
                let now: HashSet<String> = ev["content"]["user_ids"]
                    .as_array()
                    .map(|a| {
                        a.iter().filter_map(Value::as_str).filter(|u| !self.is_ours(u)).map(str::to_owned).collect()
                    })
                    .unwrap_or_default();
                let before = self.state().typing.insert(room_id.to_owned(), now.clone()).unwrap_or_default();
                let changes: Vec<(String, ChatState)> = now
                    .difference(&before)
                    .map(|u| (u.clone(), ChatState::Composing))
                    .chain(before.difference(&now).map(|u| (u.clone(), ChatState::Paused)))
                    .collect();
                for (user, state) in changes {
                    let sender = Sender::new(user.clone(), nick(&user));
                    let event = Event::new(self.network.clone(), chat.clone(), sender, EventKind::Typing(state));
                    let _ = self.sink.emit(event).await;
                }
            }
            Some("m.receipt") => {
                let Some(content) = ev["content"].as_object() else { return };
                for (event_id, receipts) in content {
                    let Some(readers) = receipts.get("m.read").and_then(Value::as_object) else { continue };
                    for user in readers.keys().filter(|u| !self.is_ours(u)) {
                        let sender = Sender::new(user.clone(), nick(user));
                        let kind = EventKind::Displayed { target: MessageRef(event_id.clone()) };
                        let _ = self.sink.emit(Event::new(self.network.clone(), chat.clone(), sender, kind)).await;
                    }
                }
            }
            _ => {}
        }
    }

    /// Whether the homeserver may consider `user` ours (`GET /users/{userId}`): only
    /// puppets this gateway created; others are not made up on demand.
    pub(super) fn knows_user(&self, user: &str) -> bool {
        self.is_puppet(user) && self.state().registered.contains(user)
    }
}
