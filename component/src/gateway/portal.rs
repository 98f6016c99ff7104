//! Portal rooms on the XMPP side: events of other networks shown to every XMPP
//! user in the room, what one XMPP user does shown to the others, and the
//! answers of several member networks to one join.

use super::*;

impl Gateway {
    /// An event from `account` about `chat`. Personal chats carry the account (the
    /// network acts for it); portal rooms are shared, so the sender alone says who.
    pub(crate) fn user_event(&self, chat: ChatRef, account: &BareJid, nick: String, kind: EventKind) -> Event {
        let portal = chat.network.is_xmpp();
        let event = Event::new(NetworkId::xmpp(), chat, Sender::own(account.to_string(), nick), kind);
        if portal { event } else { event.with_account(account.clone()) }
    }

    /// The network domain named `name`.
    pub(crate) fn domain(&self, name: &str) -> Option<&Domain> {
        self.domains.get(name)
    }

    /// The router, once attached.
    pub(crate) fn router(&self) -> Option<&isthmus_core::router::Router> {
        self.router.get()
    }

    /// The portal directory (shared with the router).
    pub(crate) fn portal_directory(&self) -> &Portals {
        &self.portals
    }

    /// Whether `room` is a portal room.
    pub(crate) fn is_portal(&self, room: &BareJid) -> bool {
        self.portals.is_room(room.as_str())
    }

    /// Whether someone other than `account` is `nick` in portal `room`.
    pub(super) fn nick_taken(&self, room: &BareJid, account: &BareJid, nick: &str) -> bool {
        self.rooms()
            .iter()
            .filter(|((r, _), s)| r == room && s.joined)
            .any(|((_, a), s)| a != account && (s.nick == nick || s.occupants.contains_key(nick)))
    }

    /// An event of a portal room from another network (no account: the room is
    /// shared): every XMPP account in the room sees it. The join confirmation and
    /// refusal are for the account that asked (the sender).
    pub(super) async fn deliver_portal(&self, event: Event) -> Result<Delivered, DeliveryError> {
        let (domain, room) = self
            .chat_jid(&event.chat)
            .ok_or_else(|| DeliveryError::Rejected(format!("`{}` is not a room of this gateway", event.chat.id)))?;
        let key = event.key.0.clone();
        match &event.kind {
            EventKind::SelfJoined { .. } | EventKind::JoinFailed { .. } => {
                let account = BareJid::new(event.sender.id.as_str())
                    .map_err(|_| DeliveryError::Rejected("a join answer must name the XMPP account".into()))?;
                if self.rooms().get(&(room.clone(), account.clone())).is_some_and(|s| s.joined) {
                    // A portal on several networks: each answers the join; the first
                    // answer entered the room, the others bring their people.
                    self.more_occupants(&domain, &room, &account, &event);
                    return Ok(Delivered::ids(vec![key]));
                }
                let mut copy = event.clone();
                copy.account = Some(account.clone());
                let joined = matches!(event.kind, EventKind::SelfJoined { .. });
                if let EventKind::SelfJoined { occupants, .. } = &mut copy.kind {
                    // The other XMPP users in the room are occupants too.
                    let others: Vec<Occupant> = self
                        .rooms()
                        .iter()
                        .filter(|((r, a), s)| r == &room && a != &account && s.joined)
                        .map(|((_, a), s)| Occupant {
                            id: isthmus_core::model::RemoteId::new(a.to_string()),
                            nick: s.nick.clone(),
                            role: Role::Participant,
                            affiliation: Affiliation::Member,
                        })
                        .collect();
                    occupants.extend(others);
                }
                let (stanzas, entering) = self.render(&copy, &room)?;
                self.send_all_after(&domain, stanzas, event.receipt.clone());
                self.save_session(&room, &account);
                self.enter(&domain, &room, &account, &entering).await;
                if joined {
                    let nick = match &event.kind {
                        EventKind::SelfJoined { nick, .. } => nick.clone(),
                        _ => String::new(),
                    };
                    let occupant = Occupant {
                        id: isthmus_core::model::RemoteId::new(account.to_string()),
                        nick: nick.clone(),
                        role: Role::Participant,
                        affiliation: Affiliation::Member,
                    };
                    let arrival = Event::new(
                        NetworkId::xmpp(),
                        event.chat.clone(),
                        Sender::new(account.to_string(), nick),
                        EventKind::Joined { occupant },
                    );
                    self.portal_fanout(&domain, &room, &arrival, &account);
                }
            }
            _ => {
                // Shared: archived once for everyone, whoever is in the room now.
                self.archive_event(&event, &room, None);
                let mut receipt = event.receipt.clone();
                for account in self.portal_accounts(&room, None) {
                    let mut copy = event.clone();
                    // About one of the XMPP users (a puppet kicked on the other side): their
                    // own event for them, someone else's for the others.
                    copy.sender.is_self = event.sender.is_self && event.sender.id.as_str() == account.as_str();
                    copy.account = Some(account.clone());
                    let (stanzas, _) = self.render(&copy, &room)?;
                    self.send_all_after(&domain, stanzas, receipt.take());
                    if copy.sender.is_self && matches!(copy.kind, EventKind::Left { .. }) {
                        self.save_session(&room, &account);
                    }
                }
                if let Some(r) = receipt {
                    r.confirm().await;
                }
            }
        }
        Ok(Delivered::ids(vec![key]))
    }

    /// Another member network's answer to a join already answered: its occupants
    /// enter the room for `account` (a refusal is only logged: the room is joined).
    pub(super) fn more_occupants(&self, domain: &Domain, room: &BareJid, account: &BareJid, event: &Event) {
        let EventKind::SelfJoined { occupants, .. } = &event.kind else {
            if let EventKind::JoinFailed { reason } = &event.kind {
                warn!(room = %room, network = %event.origin, reason, "a portal member refused a join the room already had");
            }
            return;
        };
        for occupant in occupants {
            let known = self
                .rooms()
                .get(&(room.clone(), account.clone()))
                .is_some_and(|s| s.occupants.contains_key(&occupant.nick));
            if known {
                continue;
            }
            let mut arrival = Event::new(
                event.origin.clone(),
                event.chat.clone(),
                Sender::new(occupant.id.as_str(), occupant.nick.clone()),
                EventKind::Joined { occupant: occupant.clone() },
            );
            arrival.account = Some(account.clone());
            match self.render(&arrival, room) {
                Ok((stanzas, _)) => self.send_all_after(domain, stanzas, None),
                Err(e) => debug!(error = %e, "an occupant of another portal member could not be shown"),
            }
        }
    }

    /// The accounts with a session in portal `room`, but `except`.
    pub(super) fn portal_accounts(&self, room: &BareJid, except: Option<&BareJid>) -> Vec<BareJid> {
        self.rooms()
            .iter()
            .filter(|((r, a), s)| r == room && s.joined && Some(a) != except)
            .map(|((_, a), _)| a.clone())
            .collect()
    }

    /// Show what one XMPP user did in portal `room` to the other XMPP users there
    /// (the router only carries it to the other networks).
    pub(crate) fn portal_fanout(&self, domain: &Domain, room: &BareJid, event: &Event, from_account: &BareJid) {
        if !self.is_portal(room) {
            return;
        }
        for account in self.portal_accounts(room, Some(from_account)) {
            let mut copy = event.clone();
            copy.account = Some(account.clone());
            copy.receipt = None;
            // Someone else's action, as this account sees it.
            copy.sender.is_self = false;
            let mut out = Vec::new();
            let mut entering = Vec::new();
            self.render_room(&copy, &account, room, &mut out, &mut entering);
            self.send_all_after(domain, out, None);
        }
    }

    pub(crate) async fn route(&self, event: Event) -> Option<isthmus_core::router::RouteReport> {
        Some(self.router.get()?.route(event).await)
    }
}
