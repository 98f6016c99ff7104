//! Rendering: core events as the stanzas each XMPP device in a room or chat gets.

use super::*;

impl Gateway {
    /// Who the person with `id` on `network` is, with their real JID.
    pub(super) fn person(&self, network: &NetworkId, id: &str) -> Person {
        Person { network: network.clone(), id: id.to_owned(), real: self.real_jid(network, id) }
    }

    /// What `network` renders natively, if it runs.
    pub(crate) fn capabilities_of(&self, network: &NetworkId) -> Option<Capabilities> {
        Some(self.router.get()?.network(network)?.capabilities())
    }

    /// Render a network event for the XMPP account it belongs to.
    /// Stanzas for an event, and the resources that just entered the room (they still
    /// need occupants, history and subject).
    pub(super) fn render(
        &self,
        event: &Event,
        chat_jid: &BareJid,
    ) -> Result<(Vec<Stanza>, Vec<FullJid>), DeliveryError> {
        let account = event.account.clone().ok_or_else(|| DeliveryError::Rejected("no XMPP account named".into()))?;
        let mut out = Vec::new();
        let mut entering = Vec::new();
        match event.chat.kind {
            ChatKind::Room => self.render_room(event, &account, chat_jid, &mut out, &mut entering),
            ChatKind::Direct | ChatKind::Service => {
                if let EventKind::Typing(state) = &event.kind {
                    let mut m = Message::new_with_type(MessageType::Chat, Some(Jid::from(account.clone())));
                    m.from = Some(Jid::from(chat_jid.clone()));
                    m.payloads.push(stanza::empty(chat_state_name(*state), ns::CHATSTATES));
                    out.push(Stanza::Message(m));
                }
                if let EventKind::Status { text } = &event.kind {
                    let mut m = stanza::message(
                        MessageType::Chat,
                        Jid::from(chat_jid.clone()),
                        Jid::from(account.clone()),
                        text,
                    );
                    m.id = Some(stanza::new_id());
                    out.push(Stanza::Message(m));
                }
                if let Some(m) =
                    stanza::rendered(event, MessageType::Chat, Jid::from(chat_jid.clone()), Jid::from(account))
                {
                    let sid = m.id.as_ref().map(|i| i.0.clone()).unwrap_or_default();
                    out.push(Stanza::Message(stanza::with_stanza_id(m, &sid, chat_jid)));
                }
            }
        }
        Ok((out, entering))
    }

    pub(crate) fn render_room(
        &self,
        event: &Event,
        account: &BareJid,
        room: &BareJid,
        out: &mut Vec<Stanza>,
        entering: &mut Vec<FullJid>,
    ) {
        let key = (room.clone(), account.clone());
        let mut rooms = self.rooms();
        let Some(session) = rooms.get_mut(&key) else {
            debug!(room = %room, account = %account, "event for a room the account is not in; ignored");
            return;
        };
        let nick = &event.sender.nick;
        // Whose people these are (portal rooms: the network the event came from), and
        // whose view of their profiles (personal rooms: the account's).
        let people_net = Self::people_network(&event.chat.network, &event.origin);
        let viewer = (!event.chat.network.is_xmpp()).then(|| account.clone());
        match &event.kind {
            EventKind::SelfJoined { nick, occupants, topic } => {
                session.joined = true;
                session.nick = nick.clone();
                session.occupants = occupants.iter().map(|o| (o.nick.clone(), o.clone())).collect();
                session.people =
                    occupants.iter().map(|o| (o.nick.clone(), self.person(&people_net, o.id.as_str()))).collect();
                // A room that exists only while occupied, found empty: this join created it.
                session.created = occupants.is_empty()
                    && !session.restored
                    && !self.is_portal(room)
                    && self.capabilities_of(&event.chat.network).is_some_and(|c| c.rooms_exist_while_occupied);
                session.topic = topic.clone();
                let people = occupants.iter().map(|o| (o.id.0.clone(), o.nick.clone())).collect();
                self.learn_profiles(people_net.clone(), viewer.clone(), room.clone(), account.clone(), people);
                let pending: Vec<FullJid> = session.pending.drain().collect();
                session.resources.extend(pending.iter().cloned());
                entering.extend(pending);
                if std::mem::take(&mut session.restored) {
                    // Rejoined after a restart: the devices get the room's state again.
                    entering.extend(session.resources.iter().cloned());
                    entering.sort_by_key(|j| j.to_string());
                    entering.dedup();
                }
            }
            EventKind::JoinFailed { reason } if session.restored => {
                // The rejoin after a restart failed: the devices are told they are out.
                let item = Item::new(muc::user::Affiliation::None, muc::user::Role::None).with_reason(reason.clone());
                if let Some(from) = full(room, &session.nick) {
                    for res in session.resources.iter().chain(session.pending.iter()) {
                        let codes = vec![Status::SelfPresence, Status::ServiceErrorKick];
                        out.push(occupant_presence(Jid::from(from.clone()), res, item.clone(), codes, true));
                    }
                }
                rooms.remove(&key);
            }
            EventKind::JoinFailed { reason } => {
                let pending: Vec<FullJid> = session.pending.drain().collect();
                if session.resources.is_empty() {
                    rooms.remove(&key);
                }
                for res in pending {
                    let from = full(room, nick).map(Jid::from).unwrap_or_else(|| Jid::from(room.clone()));
                    out.push(stanza::presence_error(
                        from,
                        Jid::from(res),
                        ErrorType::Auth,
                        DefinedCondition::NotAuthorized,
                        reason,
                    ));
                }
            }
            EventKind::Joined { occupant } => {
                session.occupants.insert(occupant.nick.clone(), occupant.clone());
                session.people.insert(occupant.nick.clone(), self.person(&people_net, occupant.id.as_str()));
                for res in &session.resources {
                    out.extend(self.other_presence(room, session, &occupant.nick, viewer.as_ref(), res, vec![]));
                }
                let people = vec![(occupant.id.0.clone(), occupant.nick.clone())];
                self.learn_profiles(people_net.clone(), viewer.clone(), room.clone(), account.clone(), people);
            }
            EventKind::Left { .. } if event.sender.is_self && !session.joined && !session.pending.is_empty() => {
                // Our own leave reported late (the network answering a leave made
                // before this join): it must not end the join now under way.
                debug!(room = %room, account = %account, "a late leave of an earlier stay; ignored");
            }
            EventKind::Left { kind, reason } => {
                let mut codes = match kind {
                    LeaveKind::Kick { .. } => vec![Status::Kicked],
                    LeaveKind::Ban { .. } => vec![Status::Banned],
                    LeaveKind::Disconnected => vec![Status::ServiceErrorKick],
                    _ => vec![],
                };
                let mut item = Item::new(muc::user::Affiliation::None, muc::user::Role::None);
                if let Some(r) = reason {
                    item = item.with_reason(r.clone());
                }
                let targets: Vec<FullJid> = session.resources.iter().cloned().collect();
                let mut real = None;
                if event.sender.is_self {
                    codes.push(Status::SelfPresence);
                    rooms.remove(&key);
                } else {
                    session.occupants.remove(nick);
                    real = session.people.remove(nick).and_then(|p| p.real);
                }
                if let Some(from) = full(room, nick) {
                    for res in &targets {
                        let p = occupant_presence(Jid::from(from.clone()), res, item.clone(), codes.clone(), true);
                        out.push(crate::puppet::with_real_jid(p, real.as_ref()));
                    }
                }
            }
            EventKind::NickChanged { new_nick } => {
                let mut occupant = session.occupants.remove(nick);
                let old_person = session.people.remove(nick);
                if event.sender.is_self {
                    session.nick = new_nick.clone();
                } else if let Some(o) = occupant.as_mut() {
                    // Where the id is the nick (IRC), the person's JID changes with it.
                    let new_id = match self.router.get().and_then(|r| r.network(&people_net)) {
                        Some(net) => net.renamed_id(o.id.as_str(), new_nick),
                        None => o.id.0.clone(),
                    };
                    o.nick = new_nick.clone();
                    o.id = isthmus_core::model::RemoteId::new(new_id.clone());
                    session.occupants.insert(new_nick.clone(), o.clone());
                    session.people.insert(new_nick.clone(), self.person(&people_net, &new_id));
                }
                let old_real = old_person.and_then(|p| p.real);
                let (aff, role) = occupant.map(|o| (o.affiliation, o.role)).unwrap_or_default();
                let mut codes = vec![Status::NewNick];
                if event.sender.is_self {
                    codes.push(Status::SelfPresence);
                }
                for res in &session.resources {
                    if let (Some(old), Some(new)) = (full(room, nick), full(room, new_nick)) {
                        let item = Item::new(muc_affiliation(aff), muc_role(role)).with_nick(new_nick.clone());
                        let p = occupant_presence(Jid::from(old), res, item, codes.clone(), true);
                        out.push(crate::puppet::with_real_jid(p, old_real.as_ref()));
                        if event.sender.is_self {
                            let item = Item::new(muc_affiliation(aff), muc_role(role)).with_jid(res.clone());
                            out.push(occupant_presence(Jid::from(new), res, item, vec![Status::SelfPresence], false));
                        } else {
                            out.extend(self.other_presence(room, session, new_nick, viewer.as_ref(), res, vec![]));
                        }
                    }
                }
            }
            EventKind::RoleChanged { role, affiliation } => {
                if let Some(o) = session.occupants.get_mut(nick) {
                    o.role = *role;
                    o.affiliation = *affiliation;
                }
                if event.sender.is_self {
                    session.own_role = *role;
                }
                let is_self = event.sender.is_self;
                // The account's own occupant is its nick in the room, whatever name the
                // network gave the change (a Matrix display name).
                let nick = if is_self { &session.nick } else { nick };
                if let Some(from) = full(room, nick) {
                    for res in &session.resources {
                        let mut item = Item::new(muc_affiliation(*affiliation), muc_role(*role));
                        let mut codes = vec![];
                        if is_self {
                            item = item.with_jid(res.clone());
                            codes.push(Status::SelfPresence);
                            out.push(occupant_presence(Jid::from(from.clone()), res, item, codes, false));
                        } else {
                            out.extend(self.other_presence(room, session, nick, viewer.as_ref(), res, vec![]));
                        }
                    }
                }
            }
            EventKind::Topic { text } => {
                session.topic = Some(text.clone());
                for res in &session.resources {
                    let from = full(room, nick).map(Jid::from).unwrap_or_else(|| Jid::from(room.clone()));
                    let mut m = Message::groupchat(Some(Jid::from(res.clone())));
                    m.from = Some(from);
                    m.id = Some(stanza::new_id());
                    m.subjects.insert(Lang::default(), text.clone());
                    out.push(Stanza::Message(m));
                }
            }
            EventKind::Message(_)
            | EventKind::Correction { .. }
            | EventKind::Retraction { .. }
            | EventKind::Reactions { .. }
            | EventKind::Displayed { .. } => {
                let Some(from) = full(room, nick) else { return };
                for res in &session.resources {
                    let Some(m) = stanza::rendered(
                        event,
                        MessageType::Groupchat,
                        Jid::from(from.clone()),
                        Jid::from(res.clone()),
                    ) else {
                        continue;
                    };
                    // Message ids double as stanza-ids: references from any side name them.
                    let sid = m.id.as_ref().map(|i| i.0.clone()).unwrap_or_default();
                    out.push(Stanza::Message(stanza::with_stanza_id(m, &sid, room)));
                }
                if !self.is_portal(room) {
                    // Portal rooms' messages are archived once, shared (see `archive_event`).
                    self.archive_event(event, room, Some(account));
                }
            }
            EventKind::Typing(state) => {
                let Some(from) = full(room, nick) else { return };
                for res in &session.resources {
                    let mut m = Message::new_with_type(MessageType::Groupchat, Some(Jid::from(res.clone())));
                    m.from = Some(Jid::from(from.clone()));
                    m.payloads.push(stanza::empty(chat_state_name(*state), ns::CHATSTATES));
                    out.push(Stanza::Message(m));
                }
            }
            EventKind::Status { text } => {
                for res in &session.resources {
                    let mut m =
                        stanza::message(MessageType::Groupchat, Jid::from(room.clone()), Jid::from(res.clone()), text);
                    m.id = Some(stanza::new_id());
                    out.push(Stanza::Message(m));
                }
            }
            _ => {}
        }
    }
}
