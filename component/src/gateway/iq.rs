//! IQs to rooms and the gateway: the room archive (XEP-0313) and the rest of the
//! iq table.

use super::*;

impl Gateway {
    /// XEP-0313 query on a room's archive: the requester's own archive of an IRC room
    /// (those rooms are personal) and the room's shared archive (a portal room's only
    /// one: anyone allowed on the domain may join it and see it), filtered by time and
    /// sender, paged with XEP-0059.
    pub(super) async fn mam_query(
        &self,
        domain: &Domain,
        from: &Jid,
        room: &BareJid,
        id: &str,
        payload: Element,
    ) -> Iq {
        let bad = |text: &str| {
            Iq::from_error(id.to_owned(), StanzaError::new(ErrorType::Modify, DefinedCondition::BadRequest, "en", text))
        };
        if !Self::allowed(domain, from) {
            let err = StanzaError::new(ErrorType::Auth, DefinedCondition::Forbidden, "en", Self::NOT_ALLOWED);
            return Iq::from_error(id.to_owned(), err);
        }
        let query = match MamQuery::try_from(payload) {
            Ok(q) => q,
            Err(e) => return bad(&format!("invalid archive query: {e}")),
        };
        let mut q = ArchiveQuery {
            room: room.to_string(),
            owner: Some(from.to_bare().to_string()),
            max: 50,
            ..Default::default()
        };
        for field in query.form.iter().flat_map(|f| f.fields.iter()) {
            let value = field.values.first().map(String::as_str).unwrap_or_default();
            let time = || value.parse::<tokio_xmpp::parsers::date::DateTime>().map(|d| d.0.timestamp_micros());
            match field.var.as_deref() {
                Some("start") => match time() {
                    Ok(t) => q.start_us = Some(t),
                    Err(_) => return bad("`start` is not a date-time"),
                },
                Some("end") => match time() {
                    Ok(t) => q.end_us = Some(t),
                    Err(_) => return bad("`end` is not a date-time"),
                },
                Some("with") => match value.parse::<Jid>() {
                    // In a room archive, `with` names an occupant (room/nick).
                    Ok(j) => match j.resource() {
                        Some(nick) => q.with_nick = Some(nick.to_string()),
                        None => q.with_jid = Some(j.to_string()),
                    },
                    Err(_) => return bad("`with` is not a JID"),
                },
                _ => {}
            }
        }
        if let Some(set) = &query.set {
            if let Some(max) = set.max {
                q.max = max.min(isthmus_core::store::MAX_PAGE as usize) as u32;
            }
            q.after = set.after.clone().filter(|a| !a.is_empty());
            match &set.before {
                Some(b) if b.is_empty() => q.last_page = true,
                Some(b) => q.before = Some(b.clone()),
                None => {}
            }
        }
        let page = match self.archive.query(&q).await {
            Ok(p) => p,
            Err(e) => {
                warn!(error = %e, "archive query failed");
                let err = StanzaError::new(
                    ErrorType::Wait,
                    DefinedCondition::InternalServerError,
                    "en",
                    "the archive is unavailable right now",
                );
                return Iq::from_error(id.to_owned(), err);
            }
        };
        for e in &page.entries {
            let Some(mut message) = archived_message(e, room, from.clone()) else { continue };
            let delay =
                message.payloads.iter().position(|p| p.is("delay", ns::DELAY)).map(|i| message.payloads.remove(i));
            message.to = None;
            let result = MamResult {
                id: e.stanza_id.clone(),
                queryid: query.queryid.clone(),
                forwarded: Forwarded { delay: delay.and_then(|d| Delay::try_from(d).ok()), message },
            };
            let mut wrapper = Message::normal(Some(from.clone()));
            wrapper.from = Some(Jid::from(room.clone()));
            wrapper.id = Some(stanza::new_id());
            wrapper.payloads.push(stanza::client_namespace(result.into()));
            self.send(domain, Stanza::Message(wrapper)).await;
        }
        let fin = Fin {
            complete: page.complete,
            set: SetResult { first: page.first.map(|item| First { index: None, item }), last: page.last, count: None },
        };
        Iq::from_result(id.to_owned(), Some(fin))
    }

    pub(super) async fn handle_iq(&self, domain: &Domain, iq: Iq) {
        let (from, to, id, payload) = match iq {
            Iq::Get { from: Some(from), to: Some(to), id, payload } => (from, to, id, payload),
            Iq::Set { from: Some(from), to: Some(to), id, payload } => {
                let reply = if payload.is("query", ns::MAM) && to.node().is_some() && to.resource().is_none() {
                    self.mam_query(domain, &from, &to.to_bare(), &id, payload).await
                } else if payload.is("moderate", crate::xep::NS_MODERATE) && to.node().is_some() {
                    self.moderate(domain, &from, &to, id, payload).await
                } else if payload.is("command", crate::xep::NS_COMMANDS) && to.node().is_none() {
                    self.adhoc(domain, &from, &id, payload).await
                } else if payload.is("command", crate::xep::NS_COMMANDS) && self.is_room_address(domain, &to) {
                    self.adhoc_room(domain, &from, &to, &id, payload).await
                } else if payload.is("command", crate::xep::NS_COMMANDS) && to.resource().is_none() {
                    self.adhoc_settings(domain, &from, &to, &id, payload).await
                } else if payload.is("query", ns::REGISTER) && to.node().is_none() {
                    self.register_submit(domain, &from, id, payload).await
                } else if payload.is("query", NS_MUC_OWNER) && to.node().is_some() && to.resource().is_none() {
                    // A client confirming the room it created (an instant room, XEP-0045 §10.1.2)
                    // or cancelling: the room's configuration is the network's, nothing to change.
                    Iq::empty_result(from.clone(), id)
                } else {
                    let err = StanzaError::new(
                        ErrorType::Cancel,
                        DefinedCondition::ServiceUnavailable,
                        "en",
                        "not supported",
                    );
                    Iq::from_error(id, err)
                };
                return self.send(domain, Stanza::Iq(reply.with_to(from).with_from(to))).await;
            }
            _ => return, // results and errors (our keepalive pings come back here)
        };
        let reply = if payload.is("ping", ns::PING) && to.resource().is_some() {
            // XEP-0410 MUC self-ping: answer only while the pinging resource is in the room.
            let joined = from.try_as_full().is_ok_and(|f| {
                self.rooms().get(&(to.to_bare(), f.to_bare())).is_some_and(|s| s.joined && s.resources.contains(f))
            });
            if joined {
                Iq::empty_result(from.clone(), id)
            } else {
                let err = StanzaError::new(
                    ErrorType::Modify,
                    DefinedCondition::NotAcceptable,
                    "en",
                    "you are not in this room",
                );
                Iq::from_error(id, err)
            }
        } else if payload.is("ping", ns::PING) {
            Iq::empty_result(from.clone(), id)
        } else if payload.is("query", ns::REGISTER) && to.node().is_none() {
            self.register_form(domain, &from, id).await
        } else if let Some(items) = (payload.is("query", ns::DISCO_ITEMS) && to.node().is_some())
            .then(|| self.settings_items(domain, &to, &payload))
            .flatten()
        {
            Iq::Result { from: None, to: None, id, payload: Some(items) }
        } else if let Some(items) =
            (payload.is("query", ns::DISCO_ITEMS) && to.node().is_some() && to.resource().is_none())
                .then(|| self.room_items(domain, &to, &payload))
                .flatten()
        {
            Iq::Result { from: None, to: None, id, payload: Some(items) }
        } else if payload.is("query", ns::DISCO_ITEMS) && to.node().is_none() {
            let items = if payload.attr("node").is_some() {
                crate::commands::command_items(&to, &payload, self.has_login(domain), Self::is_admin(domain, &from))
            } else {
                self.room_directory(domain, &from).await
            };
            Iq::Result { from: None, to: None, id, payload: Some(items) }
        } else if payload.is("vCard", ns::VCARD) && to.node().is_some() {
            // vcard-temp for people (puppets and occupants) and rooms, as the network describes them.
            match self.vcard(domain, &from, &to).await {
                Ok(vcard) => Iq::Result { from: None, to: None, id, payload: Some(vcard) },
                Err(text) => {
                    Iq::from_error(id, StanzaError::new(ErrorType::Cancel, DefinedCondition::ItemNotFound, "en", text))
                }
            }
        } else if payload.is("query", ns::VERSION) {
            let version = tokio_xmpp::parsers::version::VersionResult {
                name: "Isthmus".to_owned(),
                version: env!("CARGO_PKG_VERSION").to_owned(),
                os: None,
            };
            Iq::from_result(id, Some(version))
        } else if let Some(query) =
            payload.is("query", ns::DISCO_INFO).then(|| DiscoInfoQuery::try_from(payload.clone()).ok()).flatten()
        {
            let not_found =
                |text: &str| StanzaError::new(ErrorType::Cancel, DefinedCondition::ItemNotFound, "en", text);
            match self.disco_info(domain, &from, &to).await {
                // A node is only answered when it names the capabilities the entity advertises.
                Ok(info) if crate::disco::node_matches(query.node.as_deref(), &info) => {
                    Iq::from_result(id, Some(DiscoInfoResult { node: query.node, ..info }))
                }
                Ok(_) => Iq::from_error(id, not_found("unknown node")),
                Err(text) => Iq::from_error(id, not_found(&text)),
            }
        } else {
            let err = StanzaError::new(ErrorType::Cancel, DefinedCondition::ServiceUnavailable, "en", "not supported");
            Iq::from_error(id, err)
        };
        self.send(domain, Stanza::Iq(reply.with_to(from).with_from(to))).await;
    }
}
