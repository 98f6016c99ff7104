//! MUC presence: joins (with the occupants, the self-presence and history on
//! entering), nick changes, leaves (and the grace a vanished device gets), and
//! bounces.

use super::*;

impl Gateway {
    pub(super) async fn handle_presence(&self, domain: &Domain, p: Presence) {
        if matches!(p.type_, PresenceType::Subscribe | PresenceType::Unsubscribe | PresenceType::Probe) {
            // Subscriptions and probes (from bare JIDs) to people and to the gateway itself.
            if let (Some(from), Some(to)) = (&p.from, &p.to)
                && Self::allowed(domain, from)
            {
                self.presence_to_entity(domain, from, to, p.type_.clone()).await;
            }
            return;
        }
        let (Some(from), Some(to)) = (p.from.clone().and_then(|j| j.try_into_full().ok()), p.to.clone()) else {
            return;
        };
        let account = from.to_bare();
        if p.type_ == PresenceType::None && !Self::allowed(domain, &Jid::from(from.clone())) {
            let s = stanza::presence_error(
                to,
                Jid::from(from),
                ErrorType::Auth,
                DefinedCondition::Forbidden,
                Self::NOT_ALLOWED,
            );
            return self.send(domain, s).await;
        }
        match p.type_ {
            PresenceType::None => {}
            // A device gone with its connection (its server shutting down, the connection
            // dropped) did not leave: it is not told, and the account may stay for the grace.
            PresenceType::Unavailable => return self.leave(domain, &from, &to, !connection_ended(&p)).await,
            PresenceType::Error => return self.bounced(domain, &from, &to, &p.payloads).await,
            // Subscription answers and the rest need no answer.
            _ => return,
        }
        let Some(muc) = p.payloads.iter().find(|e| e.is("x", ns::MUC)).and_then(|e| Muc::try_from(e.clone()).ok())
        else {
            // Inside a room, presence to another nick is a nick change; otherwise a status change.
            return self.change_nick(domain, &from, &to).await;
        };
        let chat = match self.chat_of(domain, &to) {
            Ok(c) if c.kind == ChatKind::Room => c,
            Ok(_) => {
                let s = stanza::presence_error(
                    to.clone(),
                    Jid::from(from),
                    ErrorType::Cancel,
                    DefinedCondition::ItemNotFound,
                    "this address is not a room",
                );
                return self.send(domain, s).await;
            }
            Err(text) => {
                let s = stanza::presence_error(
                    to.clone(),
                    Jid::from(from),
                    ErrorType::Modify,
                    DefinedCondition::JidMalformed,
                    &text,
                );
                return self.send(domain, s).await;
            }
        };
        let room = to.to_bare();
        let Some(nick) = to.resource().map(|r| r.as_str().to_owned()) else {
            let s = stanza::presence_error(
                to.clone(),
                Jid::from(from),
                ErrorType::Modify,
                DefinedCondition::JidMalformed,
                "a nickname is required to join",
            );
            return self.send(domain, s).await;
        };
        if self.is_portal(&room) && self.nick_taken(&room, &account, &nick) {
            let s = stanza::presence_error(
                to.clone(),
                Jid::from(from),
                ErrorType::Cancel,
                DefinedCondition::Conflict,
                "this nickname is already used in the room",
            );
            return self.send(domain, s).await;
        }
        let new_room = !self.rooms().contains_key(&(room.clone(), account.clone()));
        if new_room && self.rooms().keys().filter(|(_, a)| *a == account).count() >= MAX_ROOMS_PER_ACCOUNT {
            let text = format!("you are in {MAX_ROOMS_PER_ACCOUNT} rooms of this gateway already: leave one first");
            let s = stanza::presence_error(
                to,
                Jid::from(from),
                ErrorType::Wait,
                DefinedCondition::ResourceConstraint,
                &text,
            );
            return self.send(domain, s).await;
        }
        let already = {
            let mut rooms = self.rooms();
            let session = rooms.entry((room.clone(), account.clone())).or_default();
            session.history.insert(from.clone(), muc.history.clone());
            if session.joined {
                session.resources.insert(from.clone());
                true
            } else {
                let first = session.pending.is_empty();
                session.pending.insert(from.clone());
                session.requested_nick = nick.clone();
                session.password = muc.password.clone();
                !first // a join is already under way for this account
            }
        };
        self.save_session(&room, &account);
        if already {
            return self.enter(domain, &room, &account, &[from]).await;
        }
        info!(account = %account, room = %room, nick, "joining room");
        let event =
            self.user_event(chat, &account, nick.clone(), EventKind::JoinRequest { nick, password: muc.password });
        let report = self.route(event).await;
        if let Some(e) = report.and_then(|r| r.first_error().cloned()) {
            self.rooms().remove(&(room.clone(), account.clone()));
            self.save_session(&room, &account);
            let condition = match e {
                DeliveryError::Forbidden(_) => DefinedCondition::Forbidden,
                DeliveryError::Unavailable(_) => DefinedCondition::RemoteServerNotFound,
                _ => DefinedCondition::NotAcceptable,
            };
            let s = stanza::presence_error(to, Jid::from(from), ErrorType::Cancel, condition, &e.to_string());
            self.send(domain, s).await;
        }
    }

    /// A joined resource asked for another nick (XEP-0045 §7.6): ask the network;
    /// the change shows when the network confirms it (status 303).
    pub(super) async fn change_nick(&self, domain: &Domain, from: &FullJid, to: &Jid) {
        let Some(new_nick) = to.resource().map(|r| r.to_string()) else { return };
        let room = to.to_bare();
        let account = from.to_bare();
        let current = self
            .rooms()
            .get(&(room.clone(), account.clone()))
            .filter(|s| s.joined && s.resources.contains(from))
            .map(|s| s.nick.clone());
        let (Some(current), Ok(chat)) = (current, self.chat_of(domain, to)) else { return };
        if current == new_nick {
            return;
        }
        if self.is_portal(&room) {
            let s = stanza::presence_error(
                to.clone(),
                Jid::from(from.clone()),
                ErrorType::Cancel,
                DefinedCondition::NotAcceptable,
                "nick changes are not supported in shared rooms yet: leave and join again with the new nick",
            );
            return self.send(domain, s).await;
        }
        let event = self.user_event(chat, &account, current, EventKind::NickChanged { new_nick });
        if let Some(e) = self.route(event).await.and_then(|r| r.first_error().cloned()) {
            // §7.6: a nick someone else has is a conflict; the nick stays.
            let condition = match e {
                DeliveryError::Conflict(_) => DefinedCondition::Conflict,
                _ => DefinedCondition::NotAcceptable,
            };
            let s = stanza::presence_error(
                to.clone(),
                Jid::from(from.clone()),
                ErrorType::Cancel,
                condition,
                &e.to_string(),
            );
            self.send(domain, s).await;
        }
    }

    /// What a resource gets when it enters a joined room: every occupant, then
    /// itself (110, and 210 when the network changed the nick), then history
    /// from the archive, then the subject.
    pub(super) async fn enter(&self, domain: &Domain, room: &BareJid, account: &BareJid, resources: &[FullJid]) {
        let key = (room.clone(), account.clone());
        let created = self.rooms().get_mut(&key).is_some_and(|s| std::mem::take(&mut s.created));
        let viewer = (!self.is_portal(room)).then(|| account.clone());
        for res in resources {
            let (presences, history, topic) = {
                let mut rooms = self.rooms();
                let Some(session) = rooms.get_mut(&key) else { return };
                let mut out = Vec::new();
                for nick in session.occupants.keys() {
                    out.extend(self.other_presence(room, session, nick, viewer.as_ref(), res, vec![]));
                }
                if let Some(from) = full(room, &session.nick) {
                    let item =
                        Item::new(muc::user::Affiliation::None, muc::user::Role::Participant).with_jid(res.clone());
                    let mut codes = vec![Status::NonAnonymousRoom, Status::SelfPresence];
                    if session.nick != session.requested_nick {
                        codes.push(Status::AssignedNick);
                    }
                    if created {
                        codes.push(Status::RoomHasBeenCreated);
                    }
                    out.push(occupant_presence(Jid::from(from), res, item, codes, false));
                }
                (out, session.history.remove(res).flatten(), session.topic.clone())
            };
            // History is what was said before the device entered: a message it sends
            // right after its self-presence is already live, not history too.
            let entered_us = isthmus_core::store::now_us();
            self.send_all(domain, presences).await;
            for m in self.history(room, account, res, history, entered_us).await {
                self.send(domain, Stanza::Message(m)).await;
            }
            let mut subject = Message::groupchat(Some(Jid::from(res.clone())));
            subject.from = Some(Jid::from(room.clone()));
            subject.id = Some(stanza::new_id());
            subject.subjects.insert(Lang::default(), topic.unwrap_or_default());
            self.send(domain, Stanza::Message(subject)).await;
        }
    }

    /// The available presence of occupant `nick` (someone other than the account) for
    /// `to`: their standing, real JID (the room is not anonymous), capabilities and
    /// avatar hash as far as their profile is known (`viewer`: whose view of it).
    pub(crate) fn other_presence(
        &self,
        room: &BareJid,
        session: &RoomSession,
        nick: &str,
        viewer: Option<&BareJid>,
        to: &FullJid,
        codes: Vec<Status>,
    ) -> Option<Stanza> {
        let o = session.occupants.get(nick)?;
        let from = full(room, nick)?;
        let item = Item::new(muc_affiliation(o.affiliation), muc_role(o.role));
        let person = session.people.get(nick);
        let mut p = crate::puppet::with_real_jid(
            occupant_presence(Jid::from(from), to, item, codes, false),
            person.and_then(|p| p.real.as_ref()),
        );
        let profile = person
            .filter(|p| !p.network.is_xmpp())
            .and_then(|p| self.profiles.get(&(p.network.clone(), viewer.cloned(), p.id.clone())));
        if let Stanza::Presence(presence) = &mut p {
            presence.payloads.extend(self.person_payloads(nick, profile.as_deref(), false));
        }
        Some(p)
    }

    /// The history a resource asked for on join, as delayed groupchat messages:
    /// what the archive holds from before `until_us`.
    pub(super) async fn history(
        &self,
        room: &BareJid,
        account: &BareJid,
        to: &FullJid,
        asked: Option<History>,
        until_us: i64,
    ) -> Vec<Message> {
        let asked = asked.unwrap_or_default();
        let max = asked.maxstanzas.unwrap_or(self.default_history);
        if max == 0 || asked.maxchars == Some(0) {
            return Vec::new();
        }
        let mut start_us = asked.seconds.map(|s| isthmus_core::store::now_us() - i64::from(s) * 1_000_000);
        if let Some(since) = &asked.since {
            let t = since.0.timestamp_micros();
            start_us = Some(start_us.map_or(t, |s| s.max(t)));
        }
        // The newest `max` entries, a page at a time from the newest backwards.
        let mut entries = Vec::new();
        let mut before = None;
        while entries.len() < max as usize {
            let q = ArchiveQuery {
                room: room.to_string(),
                owner: Some(account.to_string()),
                start_us,
                end_us: Some(until_us),
                last_page: before.is_none(),
                before: before.clone(),
                max: max - entries.len() as u32,
                ..Default::default()
            };
            let page = match self.archive.query(&q).await {
                Ok(page) => page,
                Err(e) => {
                    warn!(error = %e, room = %room, "history on join unavailable");
                    return Vec::new();
                }
            };
            let done = page.complete || page.entries.is_empty();
            before = page.first.clone();
            let mut older = page.entries;
            older.append(&mut entries);
            entries = older;
            if done {
                break;
            }
        }
        if let Some(maxchars) = asked.maxchars {
            // Keep the newest messages whose bodies fit in maxchars.
            let mut total = 0usize;
            let keep = entries
                .iter()
                .rev()
                .take_while(|e| {
                    total += e.body.chars().count();
                    total <= maxchars as usize
                })
                .count();
            entries.drain(..entries.len() - keep);
        }
        entries.iter().filter_map(|e| archived_message(e, room, Jid::from(to.clone()))).collect()
    }

    /// The XMPP server bounced what the gateway sent to a device in a room. A
    /// permanent error (the device went offline, e.g. while the gateway was down and
    /// its sessions were restored) means it is no longer there: it leaves the room,
    /// as XEP-0045 services do, and the gateway stops sending to it.
    pub(super) async fn bounced(&self, domain: &Domain, device: &FullJid, to: &Jid, payloads: &[Element]) {
        let permanent = payloads
            .iter()
            .filter(|p| p.name() == "error")
            .filter_map(|p| StanzaError::try_from(p.clone()).ok())
            .any(|e| e.type_ == ErrorType::Cancel);
        if permanent {
            debug!(device = %device, room = %to.to_bare(), "the device is gone; removing it from the room");
            self.leave(domain, device, to, false).await;
        }
    }

    /// A device leaves a room: `tell` it so (its own unavailable presence), unless
    /// it is gone already (a bounce, or its connection ended). When the account's
    /// last device vanished that way, the account stays in the room for the domain's
    /// reconnect grace.
    pub(super) async fn leave(&self, domain: &Domain, from: &FullJid, to: &Jid, tell: bool) {
        let room = to.to_bare();
        let account = from.to_bare();
        let (last, nick, lingering) = {
            let mut rooms = self.rooms();
            let key = (room.clone(), account.clone());
            let Some(session) = rooms.get_mut(&key) else { return };
            let was_in = session.resources.remove(from) | session.pending.remove(from);
            if !was_in {
                return;
            }
            let nick = session.nick.clone();
            let mut last = session.resources.is_empty() && session.pending.is_empty();
            let mut lingering = None;
            if last && domain.persistent && session.joined {
                // Persistent channels: the account stays in the channel while no device is
                // in the room; messages keep being archived for history on the next join.
                last = false;
            } else if last && !tell && session.joined && !domain.reconnect_grace.is_zero() {
                // Vanished without leaving: it may be back in a moment (its XMPP server
                // restarted, its connection dropped). What is said meanwhile is archived
                // for its history on the next join.
                let now = std::time::Instant::now();
                session.vanished_at = Some(now);
                lingering = Some(now);
                last = false;
            } else if last {
                rooms.remove(&key);
            }
            (last, nick, lingering)
        };
        self.save_session(&room, &account);
        if let Some(own) = full(&room, if nick.is_empty() { "you" } else { &nick }).filter(|_| tell) {
            let item = Item::new(muc::user::Affiliation::None, muc::user::Role::None);
            let s = occupant_presence(Jid::from(own), from, item, vec![Status::SelfPresence], true);
            self.send(domain, s).await;
        }
        if let Some(since) = lingering {
            info!(account = %account, room = %room, grace = ?domain.reconnect_grace,
                "the account's last device vanished; staying in the room in case it comes back");
            self.leave_after_grace(domain, room, account, since);
        } else if last {
            self.part(domain, &room, &account, nick).await;
        }
    }

    /// After the domain's reconnect grace, leave the remote room unless a device of
    /// the account came back since it vanished at `since`.
    pub(super) fn leave_after_grace(
        &self,
        domain: &Domain,
        room: BareJid,
        account: BareJid,
        since: std::time::Instant,
    ) {
        let Some(me) = self.me.get().and_then(std::sync::Weak::upgrade) else { return };
        let domain = domain.clone();
        tokio::spawn(async move {
            tokio::time::sleep(domain.reconnect_grace).await;
            let nick = {
                let mut rooms = me.rooms();
                let key = (room.clone(), account.clone());
                let still_gone = rooms
                    .get(&key)
                    .is_some_and(|s| s.resources.is_empty() && s.pending.is_empty() && s.vanished_at == Some(since));
                if !still_gone {
                    return;
                }
                rooms.remove(&key).map(|s| s.nick).unwrap_or_default()
            };
            info!(account = %account, room = %room, "no device came back in time; leaving the room");
            me.save_session(&room, &account);
            me.part(&domain, &room, &account, nick).await;
        });
    }

    /// The account leaves the room on its network (its session is gone).
    pub(super) async fn part(&self, domain: &Domain, room: &BareJid, account: &BareJid, nick: String) {
        if let Ok(chat) = self.chat_of(domain, &Jid::from(room.clone())) {
            let event = self.user_event(chat, account, nick, EventKind::Left { kind: LeaveKind::Part, reason: None });
            self.portal_fanout(domain, room, &event, account);
            self.route(event).await;
        }
    }
}
