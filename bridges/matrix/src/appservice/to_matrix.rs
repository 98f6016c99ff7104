//! XMPP (and other networks) → Matrix in portal rooms: the bot and the puppets
//! joining, messages, edits, redactions, reactions, typing and receipts, as a
//! puppet or by the bot.

use super::*;

impl Portals {
    /// The room id of a portal room, once the bot is in it (resolving, joining and
    /// loading its members first if needed).
    pub(super) async fn ready_room(&self, chat_id: &str) -> Result<String, DeliveryError> {
        if let Some(id) = self.state().ready.get(chat_id) {
            return Ok(id.clone());
        }
        let _one = self.setup.lock().await;
        if let Some(id) = self.state().ready.get(chat_id) {
            return Ok(id.clone());
        }
        let room_id = if chat_id.starts_with('#') {
            let r = self
                .hs
                .call(reqwest::Method::GET, &format!("/_matrix/client/v3/directory/room/{}", enc(chat_id)), None, None)
                .await
                .map_err(|e| e.delivery(&format!("the portal room {chat_id} cannot be found")))?;
            r["room_id"]
                .as_str()
                .ok_or_else(|| DeliveryError::Unavailable(format!("the homeserver gave no room id for {chat_id}")))?
                .to_owned()
        } else {
            chat_id.to_owned()
        };
        self.state().chat_of.insert(room_id.clone(), chat_id.to_owned());
        // Joining again when already in is harmless; it also accepts an invitation.
        let path = format!("/_matrix/client/v3/join/{}", enc(chat_id));
        self.hs.call(reqwest::Method::POST, &path, None, Some(&json!({}))).await.map_err(|e| {
            e.delivery(&format!(
                "the gateway's Matrix user {} cannot join the portal room {chat_id} (invite it, or make the room public)",
                self.bot
            ))
        })?;
        let state = self.room_state(&room_id).await?;
        let mut st = self.state();
        st.members.insert(room_id.clone(), joined_members(&state));
        st.ready.insert(chat_id.to_owned(), room_id.clone());
        Ok(room_id)
    }

    pub(super) async fn room_state(&self, room_id: &str) -> Result<Vec<Value>, DeliveryError> {
        let path = format!("/_matrix/client/v3/rooms/{}/state", enc(room_id));
        let v = self
            .hs
            .call(reqwest::Method::GET, &path, None, None)
            .await
            .map_err(|e| e.delivery(&format!("cannot read the state of the Matrix room {room_id}")))?;
        Ok(v.as_array().cloned().unwrap_or_default())
    }

    /// Make sure the puppet exists; a new one gets `nick` as its global display name.
    pub(super) async fn ensure_registered(&self, puppet: &str, nick: &str) -> Result<(), DeliveryError> {
        if self.state().registered.contains(puppet) {
            return Ok(());
        }
        let local = puppet.strip_prefix('@').and_then(|p| p.split(':').next()).unwrap_or_default();
        let body = json!({"type": "m.login.application_service", "username": local, "inhibit_login": true});
        let fresh = match self.hs.call(reqwest::Method::POST, "/_matrix/client/v3/register", None, Some(&body)).await {
            Ok(_) => true,
            Err(e) if e.errcode() == Some("M_USER_IN_USE") => false,
            Err(e) => return Err(e.delivery(&format!("cannot create the Matrix user {puppet}"))),
        };
        if fresh {
            info!(puppet, "Matrix puppet registered");
            let path = format!("/_matrix/client/v3/profile/{}/displayname", enc(puppet));
            let body = json!({"displayname": nick});
            if let Err(e) = self.hs.call(reqwest::Method::PUT, &path, Some(puppet), Some(&body)).await {
                warn!(puppet, error = %e, "cannot set the puppet's display name");
            }
        }
        self.state().registered.insert(puppet.to_owned());
        Ok(())
    }

    /// Bring the puppet into the room with `nick` as its display name there.
    pub(super) async fn join_puppet(&self, room_id: &str, puppet: &str, nick: &str) -> Result<(), DeliveryError> {
        let known = self.state().members.get(room_id).and_then(|m| m.get(puppet).cloned());
        let member_path = format!("/_matrix/client/v3/rooms/{}/state/m.room.member/{}", enc(room_id), enc(puppet));
        let rename = json!({"membership": "join", "displayname": nick});
        match known {
            Some(Some(name)) if name == nick => return Ok(()),
            Some(_) => {
                self.hs
                    .call(reqwest::Method::PUT, &member_path, Some(puppet), Some(&rename))
                    .await
                    .map_err(|e| e.delivery(&format!("cannot set {puppet}'s name in {room_id}")))?;
            }
            None => {
                let join = format!("/_matrix/client/v3/rooms/{}/join", enc(room_id));
                // Synapse takes the display name from the join; others get it set just after.
                let body = json!({"displayname": nick});
                let what = format!("{puppet} cannot join the Matrix room {room_id}");
                match self.hs.call(reqwest::Method::POST, &join, Some(puppet), Some(&body)).await {
                    Ok(_) => {}
                    Err(HsError::Refused { status: 403, .. }) => {
                        // Not a public room: the bot invites the puppet.
                        let invite = format!("/_matrix/client/v3/rooms/{}/invite", enc(room_id));
                        self.hs
                            .call(reqwest::Method::POST, &invite, None, Some(&json!({"user_id": puppet})))
                            .await
                            .map_err(|e| e.delivery(&format!("{} cannot invite {puppet}", self.bot)))?;
                        self.hs
                            .call(reqwest::Method::POST, &join, Some(puppet), Some(&body))
                            .await
                            .map_err(|e| e.delivery(&what))?;
                    }
                    Err(e) => return Err(e.delivery(&what)),
                }
                let member = self.hs.call(reqwest::Method::GET, &member_path, None, None).await;
                let name = member.ok().and_then(|m| m["displayname"].as_str().map(str::to_owned));
                if name.as_deref() != Some(nick) {
                    self.hs
                        .call(reqwest::Method::PUT, &member_path, Some(puppet), Some(&rename))
                        .await
                        .map_err(|e| e.delivery(&format!("cannot set {puppet}'s name in {room_id}")))?;
                }
                info!(puppet, room = room_id, nick, "Matrix puppet joined a portal room");
            }
        }
        self.state().members.entry(room_id.to_owned()).or_default().insert(puppet.to_owned(), Some(nick.to_owned()));
        Ok(())
    }

    /// An XMPP user enters the portal: their puppet joins, and XMPP learns who is there.
    pub(super) async fn enter(
        &self,
        chat: &ChatRef,
        room_id: &str,
        jid: &str,
        nick: &str,
    ) -> Result<(), DeliveryError> {
        if let Some(puppet) = self.puppet_of(jid)? {
            self.ensure_registered(&puppet, nick).await?;
            self.join_puppet(room_id, &puppet, nick).await?;
        }
        let state = self.room_state(room_id).await?;
        let powers = Powers::from_state(&state);
        let members = joined_members(&state);
        let mut occupants: Vec<Occupant> =
            members.keys().filter(|u| !self.is_ours(u)).map(|u| powers.occupant(u, nick_in(&members, u))).collect();
        occupants.sort_by(|a, b| a.nick.cmp(&b.nick));
        self.state().members.insert(room_id.to_owned(), members);
        let event = Event::new(
            self.network.clone(),
            chat.clone(),
            Sender::own(jid, nick),
            EventKind::SelfJoined { nick: nick.to_owned(), occupants, topic: topic_of(&state) },
        );
        self.sink.emit(event).await.map_err(|e| DeliveryError::Unavailable(e.to_string()))
    }

    /// Whether `user` is in the room, as far as the gateway knows.
    pub(super) fn joined(&self, room_id: &str, user: &str) -> bool {
        self.state().members.get(room_id).is_some_and(|m| m.contains_key(user))
    }

    /// The puppet is in the room (joining it with `nick` when it is not).
    pub(super) async fn ensure_in(&self, room_id: &str, puppet: &str, nick: &str) -> Result<(), DeliveryError> {
        if self.joined(room_id, puppet) {
            return Ok(());
        }
        self.ensure_registered(puppet, nick).await?;
        self.join_puppet(room_id, puppet, nick).await
    }

    pub(super) async fn send(
        &self,
        room_id: &str,
        puppet: Option<&str>,
        kind: &str,
        content: &Value,
        txn: &str,
    ) -> Result<String, DeliveryError> {
        let path = format!("/_matrix/client/v3/rooms/{}/send/{}/{}", enc(room_id), enc(kind), enc(txn));
        let r = self
            .hs
            .call(reqwest::Method::PUT, &path, puppet, Some(content))
            .await
            .map_err(|e| e.delivery("the Matrix room did not take the message"))?;
        r["event_id"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| DeliveryError::Unavailable("the homeserver gave no event id".into()))
    }

    pub(super) async fn redact(
        &self,
        room_id: &str,
        puppet: Option<&str>,
        target: &str,
        reason: Option<&str>,
        txn: &str,
    ) -> Result<String, DeliveryError> {
        if !target.starts_with('$') {
            return Err(DeliveryError::Rejected(format!("`{target}` is no Matrix event: nothing to retract")));
        }
        let path = format!("/_matrix/client/v3/rooms/{}/redact/{}/{}", enc(room_id), enc(target), enc(txn));
        let body = match reason {
            Some(r) => json!({"reason": r}),
            None => json!({}),
        };
        let r = self
            .hs
            .call(reqwest::Method::PUT, &path, puppet, Some(&body))
            .await
            .map_err(|e| e.delivery("the Matrix room did not take the retraction"))?;
        Ok(r["event_id"].as_str().unwrap_or_default().to_owned())
    }

    /// Fetch an attachment and upload it to the homeserver as the puppet (or the bot).
    pub(super) async fn upload(&self, puppet: Option<&str>, a: &Attachment) -> Result<UploadedFile, DeliveryError> {
        let refused =
            |why: String| DeliveryError::Rejected(format!("the file {} cannot be sent to Matrix: {why}", a.url));
        let (bytes, served) = self.fetcher.fetch(&a.url, crate::media::MAX_FILE_BYTES).await.map_err(refused)?;
        let name = crate::media::attachment_name(a);
        let mime = crate::media::choose_mime(a.mime.as_deref(), served.as_deref(), &name);
        let size = bytes.len() as u64;
        let path = format!("/_matrix/media/v3/upload?filename={}", enc(&name));
        let body = Some((bytes, mime.essence_str().to_owned()));
        let r = self
            .hs
            .call_raw(reqwest::Method::POST, &path, puppet, body, Duration::from_secs(600))
            .await
            .map_err(|e| e.delivery(&format!("cannot upload {}", a.url)))?;
        let url = r["content_uri"]
            .as_str()
            .ok_or_else(|| DeliveryError::Unavailable("the homeserver gave no content_uri for the upload".into()))?;
        Ok(UploadedFile { url: url.to_owned(), name, mime: mime.essence_str().to_owned(), size, encrypted: None })
    }

    /// Send `m`; `speaker` is the nick that prefixes what the bot says for someone.
    pub(super) async fn send_message(
        &self,
        room_id: &str,
        puppet: Option<&str>,
        m: &Message,
        speaker: Option<&str>,
        txn: &str,
        stored: Option<&Receipt>,
    ) -> Result<Vec<String>, DeliveryError> {
        let ctx = outgoing::Sending { id: txn, stored };
        let spoken;
        let m = match speaker {
            Some(nick) => {
                spoken = spoken_by(nick, m);
                &spoken
            }
            None => m,
        };
        if m.attachments.is_empty() {
            let content = outgoing::message_content_bounded(m, ctx).await?;
            return Ok(vec![self.send(room_id, puppet, "m.room.message", &content, txn).await?]);
        }
        let mut files = Vec::with_capacity(m.attachments.len());
        for a in &m.attachments {
            files.push(self.upload(puppet, a).await?);
        }
        let mut ids = Vec::with_capacity(files.len() + 1);
        if let Some(text) = outgoing::text_beside_files(m) {
            let content = outgoing::message_content_bounded(&text, ctx).await?;
            ids.push(self.send(room_id, puppet, "m.room.message", &content, txn).await?);
        }
        for (i, file) in files.iter().enumerate() {
            let mut content = outgoing::file_content(m, file);
            if let Some(nick) = speaker {
                // The file's caption says whose it is.
                content["body"] = json!(format!("<{nick}> {}", file.name));
            }
            ids.push(self.send(room_id, puppet, "m.room.message", &content, &format!("{txn}-file{i}")).await?);
        }
        Ok(ids)
    }

    /// The puppet's reactions on `target`, read from the homeserver when none are known
    /// (after a restart).
    pub(super) async fn reactions_of(&self, room_id: &str, target: &str, puppet: &str) -> Vec<(String, String)> {
        let have = self.state().reactions.of(room_id, target, puppet);
        if !have.is_empty() {
            return have;
        }
        let path = format!(
            "/_matrix/client/v1/rooms/{}/relations/{}/m.annotation/m.reaction?limit=100",
            enc(room_id),
            enc(target)
        );
        if let Ok(r) = self.hs.call(reqwest::Method::GET, &path, Some(puppet), None).await {
            let mut st = self.state();
            for e in r["chunk"].as_array().into_iter().flatten().filter(|e| e["sender"] == puppet) {
                let key = e["content"]["m.relates_to"]["key"].as_str();
                if let (Some(key), Some(id)) = (key, e["event_id"].as_str()) {
                    st.reactions.add(room_id, target, puppet, key, id);
                }
            }
        }
        self.state().reactions.of(room_id, target, puppet)
    }

    /// Make the puppet's reactions on `target` exactly `emojis`.
    pub(super) async fn set_reactions(
        &self,
        room_id: &str,
        puppet: &str,
        target: &str,
        emojis: &[String],
        txn: &str,
    ) -> Result<Vec<String>, DeliveryError> {
        if !target.starts_with('$') {
            return Err(DeliveryError::Rejected("the message reacted to is not known on Matrix".into()));
        }
        let have = self.reactions_of(room_id, target, puppet).await;
        let mut ids = Vec::new();
        for (key, event_id) in &have {
            if !emojis.contains(key) {
                self.redact(room_id, Some(puppet), event_id, None, &format!("{txn}-{event_id}")).await?;
                self.state().reactions.remove(event_id);
            }
        }
        for key in emojis {
            if !have.iter().any(|(k, _)| k == key) {
                let content = outgoing::reaction_content(target, key);
                let event_id =
                    self.send(room_id, Some(puppet), "m.reaction", &content, &format!("{txn}-{key}")).await?;
                self.state().reactions.add(room_id, target, puppet, key, &event_id);
                ids.push(event_id);
            }
        }
        Ok(ids)
    }

    /// Render an XMPP user's event in a portal room, as their puppet.
    pub async fn deliver(&self, event: Event) -> Result<Delivered, DeliveryError> {
        let chat_id = event.chat.id.as_str();
        if !self.is_portal(chat_id) {
            let known: Vec<&str> = self.portals.iter().map(|p| p.room.as_str()).collect();
            return Err(DeliveryError::Rejected(format!(
                "`{chat_id}` is not a portal room of this gateway (portal rooms: {})",
                if known.is_empty() { "none".to_owned() } else { known.join(", ") }
            )));
        }
        if !event.origin.is_xmpp() {
            // Someone from another network in the portal (a Telegram person): no
            // Matrix user of their own, the bot says it for them.
            let room_id = self.ready_room(chat_id).await?;
            let txn = transaction_id(&event);
            debug!(portal = chat_id, origin = %event.origin, kind = event.kind.name(), "Matrix portal delivery by the bot for another network");
            let ids = self.deliver_as_bot(&event, &room_id, event.sender.id.as_str(), &txn).await?;
            if let Some(receipt) = &event.receipt {
                receipt.confirm().await;
            }
            return Ok(Delivered::ids(ids));
        }
        let jid = BareJid::new(event.sender.id.as_str())
            .map_err(|e| DeliveryError::Rejected(format!("`{}` is not an XMPP address: {e}", event.sender.id)))?;
        let jid = jid.as_str();
        let puppet = self.puppet_of(jid)?;
        let room_id = self.ready_room(chat_id).await?;
        let nick = event.sender.nick.as_str();
        let txn = transaction_id(&event);
        let txn = txn.as_str();
        let room = room_id.as_str();
        let Some(puppet) = puppet else {
            debug!(portal = chat_id, bot = %self.bot, kind = event.kind.name(), "Matrix portal delivery by the bot");
            let ids = self.deliver_as_bot(&event, room, jid, txn).await?;
            if let Some(receipt) = &event.receipt {
                receipt.confirm().await;
            }
            return Ok(Delivered::ids(ids));
        };
        debug!(portal = chat_id, %puppet, kind = event.kind.name(), "Matrix portal delivery");
        let ids = match &event.kind {
            EventKind::JoinRequest { nick, .. } => {
                self.enter(&event.chat, room, jid, nick).await?;
                Vec::new()
            }
            EventKind::Message(m) => {
                self.ensure_in(room, &puppet, nick).await?;
                self.send_message(room, Some(&puppet), m, None, txn, event.receipt.as_ref()).await?
            }
            EventKind::Correction { target, message } => {
                self.ensure_in(room, &puppet, nick).await?;
                let ctx = outgoing::Sending { id: txn, stored: event.receipt.as_ref() };
                let content = outgoing::edit_content_bounded(&target.0, message, ctx).await?;
                vec![self.send(room, Some(&puppet), "m.room.message", &content, txn).await?]
            }
            EventKind::Retraction { target, reason, .. } => {
                vec![self.redact(room, Some(&puppet), &target.0, reason.as_deref(), txn).await?]
            }
            EventKind::Reactions { target, emojis } => {
                self.ensure_in(room, &puppet, nick).await?;
                self.set_reactions(room, &puppet, &target.0, emojis, txn).await?
            }
            EventKind::Typing(state) => {
                if self.joined(room, &puppet) {
                    let path = format!("/_matrix/client/v3/rooms/{}/typing/{}", enc(room), enc(&puppet));
                    let typing = *state == ChatState::Composing;
                    let body =
                        if typing { json!({"typing": true, "timeout": 30000}) } else { json!({"typing": false}) };
                    self.hs
                        .call(reqwest::Method::PUT, &path, Some(&puppet), Some(&body))
                        .await
                        .map_err(|e| e.delivery("typing notification"))?;
                }
                Vec::new()
            }
            EventKind::Displayed { target } if target.0.starts_with('$') && self.joined(room, &puppet) => {
                let path = format!("/_matrix/client/v3/rooms/{}/receipt/m.read/{}", enc(room), enc(&target.0));
                self.hs
                    .call(reqwest::Method::POST, &path, Some(&puppet), Some(&json!({})))
                    .await
                    .map_err(|e| e.delivery("read receipt"))?;
                Vec::new()
            }
            EventKind::Topic { text } => {
                let path = format!("/_matrix/client/v3/rooms/{}/state/m.room.topic/", enc(room));
                self.hs
                    .call(reqwest::Method::PUT, &path, Some(&puppet), Some(&json!({"topic": text})))
                    .await
                    .map_err(|e| e.delivery("the topic"))?;
                Vec::new()
            }
            EventKind::NickChanged { new_nick } => {
                if self.joined(room, &puppet) {
                    self.join_puppet(room, &puppet, new_nick).await?;
                }
                Vec::new()
            }
            EventKind::Left { .. } if event.sender.is_self => {
                let path = format!("/_matrix/client/v3/rooms/{}/leave", enc(room));
                match self.hs.call(reqwest::Method::POST, &path, Some(&puppet), Some(&json!({}))).await {
                    Ok(_) => info!(%puppet, room, "Matrix puppet left a portal room"),
                    // Not in the room (any more): what was asked is done.
                    Err(HsError::Refused { status: 403 | 404, .. }) => {}
                    Err(e) => return Err(e.delivery(&format!("{puppet} cannot leave {room}"))),
                }
                if let Some(m) = self.state().members.get_mut(room) {
                    m.remove(&puppet);
                }
                Vec::new()
            }
            _ => Vec::new(),
        };
        if let Some(receipt) = &event.receipt {
            receipt.confirm().await;
        }
        Ok(Delivered::ids(ids))
    }

    /// An XMPP user's event in a portal room where the bot speaks for everyone: messages
    /// and their corrections and retractions (the bot's own events), the topic; the rest
    /// has no Matrix form that would say whose it is.
    pub(super) async fn deliver_as_bot(
        &self,
        event: &Event,
        room: &str,
        jid: &str,
        txn: &str,
    ) -> Result<Vec<String>, DeliveryError> {
        let nick = event.sender.nick.as_str();
        Ok(match &event.kind {
            EventKind::JoinRequest { nick, .. } => {
                self.enter(&event.chat, room, jid, nick).await?;
                Vec::new()
            }
            EventKind::Message(m) => self.send_message(room, None, m, Some(nick), txn, event.receipt.as_ref()).await?,
            EventKind::Correction { target, message } => {
                let ctx = outgoing::Sending { id: txn, stored: event.receipt.as_ref() };
                let content = outgoing::edit_content_bounded(&target.0, &spoken_by(nick, message), ctx).await?;
                vec![self.send(room, None, "m.room.message", &content, txn).await?]
            }
            EventKind::Retraction { target, reason, .. } => {
                vec![self.redact(room, None, &target.0, reason.as_deref(), txn).await?]
            }
            EventKind::Topic { text } => {
                let path = format!("/_matrix/client/v3/rooms/{}/state/m.room.topic/", enc(room));
                self.hs
                    .call(reqwest::Method::PUT, &path, None, Some(&json!({"topic": text})))
                    .await
                    .map_err(|e| e.delivery("the topic"))?;
                Vec::new()
            }
            _ => Vec::new(),
        })
    }

    // --- homeserver → XMPP ----------------------------------------------------------
}
