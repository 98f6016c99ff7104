//! XEP-0425 message moderation asked by an XMPP occupant: a room moderator sends
//! `<moderate id='STANZA-ID'><retract/><reason/></moderate>` to the room; the
//! gateway finds the message by its stanza-id, routes a retraction naming the
//! moderator to the room's network (where the router maps the id to the remote
//! message) and answers the IQ with the network's verdict. The message leaves the
//! room's archive as the moderator's account sees it. A network that cannot remove
//! messages (IRC) shows the removal by its retraction fallback, as for a user's own
//! retraction.

use isthmus_core::model::{ChatKind, EventKind, MessageRef, Quote, Role};
use isthmus_core::network::DeliveryError;
use tokio_xmpp::parsers::iq::Iq;
use tokio_xmpp::parsers::jid::Jid;
use tokio_xmpp::parsers::minidom::Element;
use tokio_xmpp::parsers::stanza_error::{DefinedCondition, ErrorType, StanzaError};
use tracing::{Instrument, info};

use crate::gateway::{Domain, Gateway};
use crate::xep::Moderate;

/// An IQ error with this condition and text.
fn refused(id: String, type_: ErrorType, condition: DefinedCondition, text: &str) -> Iq {
    Iq::from_error(id, StanzaError::new(type_, condition, "en", text))
}

/// The IQ error for a network's refusal.
pub(crate) fn delivery_refusal(id: String, e: &DeliveryError) -> Iq {
    let (type_, condition) = match e {
        DeliveryError::Forbidden(_) => (ErrorType::Auth, DefinedCondition::Forbidden),
        DeliveryError::Unavailable(_) => (ErrorType::Wait, DefinedCondition::RemoteServerTimeout),
        _ => (ErrorType::Cancel, DefinedCondition::NotAcceptable),
    };
    refused(id, type_, condition, &e.to_string())
}

impl Gateway {
    /// Answer a XEP-0425 moderation request sent by `from` to the room `to`.
    pub(crate) async fn moderate(&self, domain: &Domain, from: &Jid, to: &Jid, id: String, payload: Element) -> Iq {
        let request = match Moderate::try_from(payload) {
            Ok(r) if r.retract => r,
            Ok(_) => {
                let text = "only retraction is supported: add <retract xmlns='urn:xmpp:message-retract:1'/>";
                return refused(id, ErrorType::Modify, DefinedCondition::FeatureNotImplemented, text);
            }
            Err(e) => {
                let text = format!("not a valid moderation request: {e}");
                return refused(id, ErrorType::Modify, DefinedCondition::BadRequest, &text);
            }
        };
        if !Self::allowed(domain, from) {
            return refused(id, ErrorType::Auth, DefinedCondition::Forbidden, Self::NOT_ALLOWED);
        }
        if to.resource().is_some() {
            let text = "send moderation requests to the room, not to an occupant";
            return refused(id, ErrorType::Modify, DefinedCondition::BadRequest, text);
        }
        let chat = match self.chat_of(domain, to) {
            Ok(c) if c.kind == ChatKind::Room => c,
            Ok(_) => return refused(id, ErrorType::Cancel, DefinedCondition::BadRequest, "this is not a room"),
            Err(text) => return refused(id, ErrorType::Cancel, DefinedCondition::ItemNotFound, &text),
        };
        let room = to.to_bare();
        let account = from.to_bare();
        let standing = self.rooms().get(&(room.clone(), account.clone())).and_then(|s| {
            let present = s.joined && from.try_as_full().is_ok_and(|f| s.resources.contains(f));
            present.then(|| (s.nick.clone(), s.own_role))
        });
        let Some((nick, role)) = standing else {
            let text = "join the room before moderating it";
            return refused(id, ErrorType::Cancel, DefinedCondition::NotAcceptable, text);
        };
        if role != Role::Moderator {
            let text = "only the room's moderators may remove other people's messages";
            return refused(id, ErrorType::Auth, DefinedCondition::Forbidden, text);
        }
        // Only a message of this room that the account's archive holds (its own entries,
        // or the room's shared ones) can be named.
        let target = match self.archive.get(&request.id).await {
            Ok(Some(entry)) if crate::archive::visible(&entry, room.as_str(), account.as_str()) => entry,
            Ok(_) => {
                let text = "no message with this stanza-id in the room's archive";
                return refused(id, ErrorType::Cancel, DefinedCondition::ItemNotFound, text);
            }
            Err(e) => {
                let text = format!("the archive cannot be read: {e}");
                return refused(id, ErrorType::Wait, DefinedCondition::InternalServerError, &text);
            }
        };
        let kind = EventKind::Retraction {
            target: MessageRef(request.id.clone()),
            moderator: Some(nick.clone()),
            reason: request.reason.clone(),
        };
        let mut event = self.user_event(chat, &account, nick, kind);
        event.context = Some(Quote { author: target.sender_nick, text: target.body });
        let key = event.key.0.clone();
        event.origin_ids.insert(0, key.clone());
        self.portal_fanout(domain, &room, &event, &account);
        let span = tracing::info_span!("xmpp-moderation", key = %key, target = %request.id, from = %from);
        let Some(report) = self.route(event.clone()).instrument(span).await else {
            let text = "the gateway is starting; try again";
            return refused(id, ErrorType::Wait, DefinedCondition::ServiceUnavailable, text);
        };
        if let Some(e) = report.first_error() {
            return delivery_refusal(id, e);
        }
        info!(room = %room, target = %request.id, by = %from, "message moderated");
        // Gone from the archive too: history on join and MAM no longer return it.
        self.archive.forget(room.as_str(), Some(account.as_str()), &request.id);
        // The moderator's own devices see the removal as every occupant does.
        let mut out = Vec::new();
        let mut entering = Vec::new();
        self.render_room(&event, &account, &room, &mut out, &mut entering);
        for stanza in out {
            self.send(domain, stanza).await;
        }
        Iq::empty_result(from.clone(), id)
    }
}
