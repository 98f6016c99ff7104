//! Messages from XMPP users: routing, reflections once accepted, corrections,
//! retractions, reactions, subjects, and the room archive.

use super::*;

impl Gateway {
    /// Record a message from another network in `room`'s archive of `owner` (`None`:
    /// the room's shared archive); a retraction removes its target from it.
    pub(super) fn archive_event(&self, event: &Event, room: &BareJid, owner: Option<&BareJid>) {
        if let EventKind::Retraction { target, .. } = &event.kind {
            // Withdrawn or removed on its network: the archive forgets it too.
            self.archive.forget(room.as_str(), owner.map(|o| o.as_str()), &target.0);
            return;
        }
        let EventKind::Message(msg) = &event.kind else { return };
        let body = stanza::rendered_body(msg);
        let sender_jid = event.sender.id.as_str().to_owned();
        // The sender's contact JID on the gateway (in a portal, on the network they came from).
        let network = Self::people_network(&event.chat.network, &event.origin);
        let puppet = self.chat_jid(&ChatRef::direct(network, sender_jid)).map(|(_, j)| j.to_string());
        let origin_id = event.origin_ids.first().cloned();
        let entry = archive_entry(room, owner, &event.key.0, origin_id, &event.sender.nick, puppet, &body, event.time);
        self.archive.record(entry);
    }

    pub(super) async fn handle_message(&self, domain: &Domain, m: Message) {
        if m.type_ == MessageType::Error {
            if let (Some(Ok(from)), Some(to)) = (m.from.clone().map(Jid::try_into_full), m.to.as_ref()) {
                self.bounced(domain, &from, to, &m.payloads).await;
            }
            return;
        }
        let (Some(from), Some(to)) = (m.from.clone(), m.to.clone()) else { return };
        let account = from.to_bare();
        if !Self::allowed(domain, &from) {
            if let Some(e) = stanza::message_error(&m, ErrorType::Auth, DefinedCondition::Forbidden, Self::NOT_ALLOWED)
            {
                self.send(domain, e).await;
            }
            return;
        }
        if to.node().is_none() && m.type_ != MessageType::Groupchat {
            // Messages to the gateway itself are commands (`help` lists them).
            return self.chat_command(domain, &m, &from).await;
        }
        if to.node().is_some() && self.chat_room_command(domain, &m, &from, &to).await {
            // A chat message to a room's bare JID: a command on the room (`help` lists them).
            return;
        }
        if to.node().is_some() && m.type_ != MessageType::Groupchat && self.chat_settings(domain, &m, &from, &to).await
        {
            // `configure …` on a service address (an IRC server's): settings, not a raw command.
            return;
        }
        if let Some(kind) = stanza::encryption(&m) {
            // Never relayed, not even the fallback body: the remote side could not read it,
            // and the gateway must not pretend it can.
            let text = format!(
                "This {kind} message was not sent: the gateway cannot read end-to-end encrypted messages, so they cannot be bridged. Send it unencrypted to reach the other side."
            );
            if let Some(e) = stanza::message_error(&m, ErrorType::Modify, DefinedCondition::NotAcceptable, &text) {
                self.send(domain, e).await;
            }
            return;
        }
        if m.type_ == MessageType::Groupchat
            && stanza::body(&m).is_none()
            && let Some((_, subject)) = m.get_best_subject_cloned(vec!["en"])
        {
            return self.set_subject(domain, &m, &account, &to, subject).await;
        }
        let body = stanza::body(&m).unwrap_or_default();
        let Some(kind) = stanza::event_kind(&m, &body) else { return };
        // Typing notifications and read markers are best effort: no reflection, no error back.
        let typing = matches!(kind, EventKind::Typing(_) | EventKind::Displayed { .. });
        let chat = match self.chat_of(domain, &to) {
            Ok(c) => c,
            // Typing notifications are best effort: never an error back.
            Err(_) if typing => return,
            Err(text) => {
                if let Some(e) = stanza::message_error(&m, ErrorType::Modify, DefinedCondition::ItemNotFound, &text) {
                    self.send(domain, e).await;
                }
                return;
            }
        };
        let room = to.to_bare();
        let nick = if chat.kind == ChatKind::Room {
            let nick = self.rooms().get(&(room.clone(), account.clone())).and_then(|s| {
                (s.joined && from.try_as_full().is_ok_and(|f| s.resources.contains(f))).then(|| s.nick.clone())
            });
            match nick {
                Some(nick) => nick,
                None if typing => return,
                None => {
                    if let Some(e) = stanza::message_error(
                        &m,
                        ErrorType::Cancel,
                        DefinedCondition::NotAcceptable,
                        "join the room before sending messages to it",
                    ) {
                        self.send(domain, e).await;
                    }
                    return;
                }
            }
        } else {
            account.node().map(|n| n.to_string()).unwrap_or_default()
        };
        if typing {
            let event = self.user_event(chat, &account, nick, kind);
            self.portal_fanout(domain, &room, &event, &account);
            self.route(event).await;
            return;
        }
        let origin_id = stanza::origin_id(&m);
        let is_message = matches!(kind, EventKind::Message(_));
        let mut event = self.user_event(chat.clone(), &account, nick.clone(), kind);
        if let Some(id) = &origin_id {
            event = event.with_origin_id(id.clone());
        }
        // Retractions and reactions in a room name their target by the room's stanza-id,
        // which is the event key: record it too, and quote the target for text fallbacks.
        // In a room the stanza-id comes first: it is what other networks' references
        // (reactions, replies, retractions) are rendered back to on XMPP.
        let key_id = event.key.0.clone();
        if chat.kind == ChatKind::Room {
            event.origin_ids.insert(0, key_id);
        } else {
            event = event.with_origin_id(key_id);
        }
        // Only this room's archive as the account sees it is quoted; the account's own
        // message it retracts leaves that archive once the retraction is accepted.
        let mut retracted = None;
        if let Some(target) = event.kind.target().filter(|_| !matches!(event.kind, EventKind::Correction { .. }))
            && let Ok(Some(e)) = self.archive.get(&target.0).await
            && crate::archive::visible(&e, room.as_str(), account.as_str())
        {
            let own = e.sender_jid.as_deref() == Some(account.as_str());
            if own && matches!(event.kind, EventKind::Retraction { .. }) {
                retracted = Some(target.0.clone());
            }
            event.context = Some(Quote { author: e.sender_nick, text: e.body });
        }
        // A reply quotes its target too, for networks that show replies as text.
        if let EventKind::Message(msg) = &mut event.kind
            && let Some(r) = msg.reply_to.as_mut()
            && let Ok(Some(e)) = self.archive.get(&r.target.0).await
            && crate::archive::visible(&e, room.as_str(), account.as_str())
        {
            r.author.get_or_insert(e.sender_nick);
            r.quote = Some(e.body);
        }
        // A resend (same origin-id from the same account, e.g. after a failed stream
        // resumption) is not bridged again; in a room it is reflected again, with the
        // first one's stanza-id, so the client knows it arrived.
        let resent = origin_id.as_ref().and_then(|id| self.recent_origins.key_of(&account, id));
        if let Some(first) = resent {
            debug!(origin_id = ?origin_id, key = %first, from = %from, "resent message not bridged again");
            if chat.kind == ChatKind::Room {
                let reflections = self.reflections(&m, &room, &account, &nick, &body, &first);
                self.send_all_after(domain, reflections, None);
            }
            return;
        }
        let key = event.key.clone();
        if chat.kind == ChatKind::Room {
            self.portal_fanout(domain, &room, &event, &account);
        }
        let span = tracing::info_span!("xmpp-message", key = %key, origin_id = ?origin_id, from = %from);
        let Some(mut report) = self.route(event).instrument(span).await else { return };
        if let Some(e) = report.first_error() {
            let condition = match e {
                DeliveryError::Forbidden(_) => DefinedCondition::Forbidden,
                DeliveryError::Unavailable(_) => DefinedCondition::RecipientUnavailable,
                _ => DefinedCondition::NotAcceptable,
            };
            if let Some(err) = stanza::message_error(&m, ErrorType::Cancel, condition, &e.to_string()) {
                self.send(domain, err).await;
            }
            return;
        }
        if let Some(id) = &origin_id {
            self.recent_origins.remember(&account, id, &key.0);
        }
        if let Some(target) = retracted {
            self.archive.forget(room.as_str(), Some(account.as_str()), &target);
        }
        // What tells the sender the message was accepted: a XEP-0184 receipt (the
        // remote network accepted it) in a direct chat, the reflection in a room.
        let mut accepted = Vec::new();
        if chat.kind != ChatKind::Room
            && m.payloads.iter().any(|p| p.is("request", ns::RECEIPTS))
            && let Some(id) = &m.id
        {
            let mut receipt = Message::new_with_type(MessageType::Chat, Some(from.clone()));
            receipt.from = Some(to.clone());
            receipt.id = Some(stanza::new_id());
            receipt.payloads.push(
                Element::builder("received", ns::RECEIPTS)
                    .attr(xso::exports::rxml::NcName::try_from("id").expect("a constant valid name"), id.0.clone())
                    .build(),
            );
            accepted.push(Stanza::Message(receipt));
        }
        let mut archived = None;
        if chat.kind == ChatKind::Room {
            if is_message {
                // A portal room's messages go to its shared archive, once.
                let owner = (!self.is_portal(&room)).then_some(&account);
                let account_jid = Some(account.to_string());
                let now = std::time::SystemTime::now();
                let entry = archive_entry(&room, owner, &key.0, origin_id.clone(), &nick, account_jid, &body, now);
                archived = Some((self.archive.clone(), entry));
            }
            accepted.extend(self.reflections(&m, &room, &account, &nick, &body, &key.0));
        }
        // Sent only once the outbox holds the message (it must survive a crash from
        // here on), and where the network confirms later (IRC echo-message), once it did.
        let confirmation =
            report.deliveries.iter_mut().find_map(|(_, r)| r.as_mut().ok().and_then(|d| d.confirmation.take()));
        Self::send_accepted(domain, &m, accepted, report.persisted.clone(), confirmation, archived);
    }

    /// Tell the sender their message was accepted (`stanzas`, the first one held
    /// until `persisted` opens), and keep it in the room's archive (`archived`).
    /// With a `confirmation` both wait for the network's word; a refusal reaches
    /// the sender as an error instead, and the message is not archived.
    pub(super) fn send_accepted(
        domain: &Domain,
        m: &Message,
        stanzas: Vec<Stanza>,
        mut persisted: Option<Receipt>,
        confirmation: Option<Confirmation>,
        archived: Option<(Archive, ArchiveEntry)>,
    ) {
        let archive = move || {
            if let Some((archive, entry)) = archived {
                archive.record(entry);
            }
        };
        let mut send = move |domain: &Domain, stanzas: Vec<Stanza>| {
            for stanza in stanzas {
                domain.outgoing.push(&domain.name, stanza, persisted.take());
            }
        };
        let Some(confirmation) = confirmation else {
            archive();
            return send(domain, stanzas);
        };
        // As long as it takes: a message kept while the network is unreachable is
        // confirmed once it reconnects and the message arrived.
        let (domain, m) = (domain.clone(), m.clone());
        tokio::spawn(async move {
            let stanzas = match confirmation.wait().await {
                Ok(_) => {
                    archive();
                    stanzas
                }
                Err(e) => {
                    // Refused, or in doubt: it was never said for sure, so it stays out of
                    // the room's history.
                    debug!(id = ?m.id, error = %e, "the network did not confirm the message; not archived");
                    // Not `wait`: a client that sends it again may make it arrive twice.
                    let condition = match e {
                        DeliveryError::Unavailable(_) => DefinedCondition::RecipientUnavailable,
                        _ => DefinedCondition::NotAcceptable,
                    };
                    stanza::message_error(&m, ErrorType::Cancel, condition, &e.to_string()).into_iter().collect()
                }
            };
            send(&domain, stanzas);
        });
    }

    /// MUC semantics: the sender's resources see their own message reflected, with
    /// its id and the room's stanza-id (`key`). The whole stanza is reflected
    /// (corrections, reactions and retractions included), so the user's other
    /// devices apply it too.
    pub(super) fn reflections(
        &self,
        m: &Message,
        room: &BareJid,
        account: &BareJid,
        nick: &str,
        body: &str,
        key: &str,
    ) -> Vec<Stanza> {
        let resources: Vec<FullJid> = self
            .rooms()
            .get(&(room.clone(), account.clone()))
            .map(|s| s.resources.iter().cloned().collect())
            .unwrap_or_default();
        let Some(from_occupant) = full(room, nick) else { return Vec::new() };
        resources
            .into_iter()
            .map(|res| {
                let mut echo =
                    stanza::message(MessageType::Groupchat, Jid::from(from_occupant.clone()), Jid::from(res), body);
                echo.id = m.id.clone();
                echo.payloads.extend(m.payloads.iter().filter(|p| !p.is("stanza-id", ns::SID)).cloned());
                Stanza::Message(stanza::with_stanza_id(echo, key, room))
            })
            .collect()
    }

    /// A MUC subject change: the network's topic.
    pub(super) async fn set_subject(&self, domain: &Domain, m: &Message, account: &BareJid, to: &Jid, subject: String) {
        let nick = self.rooms().get(&(to.to_bare(), account.clone())).filter(|s| s.joined).map(|s| s.nick.clone());
        let (Some(nick), Ok(chat)) = (nick, self.chat_of(domain, to)) else {
            if let Some(e) =
                stanza::message_error(m, ErrorType::Cancel, DefinedCondition::NotAcceptable, "join the room first")
            {
                self.send(domain, e).await;
            }
            return;
        };
        let event = self.user_event(chat, account, nick, EventKind::Topic { text: subject });
        // §8.1: a subject change the network refuses to the user is `auth`/`forbidden`.
        if let Some(e) = self.route(event).await.and_then(|r| r.first_error().cloned())
            && let type_ = if matches!(e, DeliveryError::Forbidden(_)) { ErrorType::Auth } else { ErrorType::Cancel }
            && let Some(err) = stanza::message_error(m, type_, DefinedCondition::Forbidden, &e.to_string())
        {
            self.send(domain, err).await;
        }
    }
}
