//! Small helpers for building and reading stanzas with xmpp-parsers.

use std::time::SystemTime;

use tokio_xmpp::Stanza;
use tokio_xmpp::parsers::date::DateTime;
use tokio_xmpp::parsers::delay::Delay;
use tokio_xmpp::parsers::jid::{BareJid, FullJid, Jid};
use tokio_xmpp::parsers::message::{Id, Lang, Message, MessageType};
use tokio_xmpp::parsers::minidom::Element;
use tokio_xmpp::parsers::presence::Presence;
use tokio_xmpp::parsers::stanza_error::{DefinedCondition, ErrorType, StanzaError};
use tokio_xmpp::parsers::stanza_id::{OriginId, StanzaId};

/// Parse a JID, `None` when it is not valid.
pub fn parse_jid(s: &str) -> Option<Jid> {
    Jid::new(s).ok()
}

/// A bare JID `local@domain`.
pub fn bare(local: &str, domain: &str) -> Option<BareJid> {
    BareJid::new(&format!("{local}@{domain}")).ok()
}

/// A full JID `bare/resource`.
pub fn full(bare: &BareJid, resource: &str) -> Option<FullJid> {
    FullJid::new(&format!("{bare}/{resource}")).ok()
}

/// An XMPP timestamp for `time`.
pub fn datetime(time: SystemTime) -> Option<DateTime> {
    let utc: chrono::DateTime<chrono::Utc> = time.into();
    utc.to_rfc3339_opts(chrono::SecondsFormat::Millis, true).parse().ok()
}

/// XEP-0203 delay for a message that happened at `time`, stamped by `from`.
pub fn delay(time: SystemTime, from: &BareJid) -> Option<Delay> {
    Some(Delay { from: Some(Jid::from(from.clone())), stamp: datetime(time)?, data: None })
}

/// A message with one body and no language.
pub fn message(type_: MessageType, from: Jid, to: Jid, body: &str) -> Message {
    let mut m = Message::new_with_type(type_, Some(to));
    m.from = Some(from);
    if !body.is_empty() {
        m.bodies.insert(Lang::default(), body.to_owned());
    }
    m
}

/// Set the XEP-0359 stanza-id (assigned by `by`) on a message.
pub fn with_stanza_id(mut m: Message, id: &str, by: &BareJid) -> Message {
    m.payloads.push(StanzaId { id: id.to_owned(), by: Jid::from(by.clone()) }.into());
    m
}

/// The message's own id for matching: XEP-0359 origin-id, else the id attribute.
pub fn origin_id(m: &Message) -> Option<String> {
    m.payloads
        .iter()
        .find(|p| p.is("origin-id", tokio_xmpp::parsers::ns::SID))
        .and_then(|p| OriginId::try_from(p.clone()).ok())
        .map(|o| o.id)
        .or_else(|| m.id.as_ref().map(|i| i.0.clone()))
}

/// The plain body of a message, if any.
pub fn body(m: &Message) -> Option<String> {
    m.get_best_body_cloned(vec!["en"]).map(|(_, b)| b)
}

pub fn error(type_: ErrorType, condition: DefinedCondition, text: &str) -> StanzaError {
    StanzaError::new(type_, condition, "en", text)
}

/// An error reply to a message.
pub fn message_error(original: &Message, type_: ErrorType, condition: DefinedCondition, text: &str) -> Option<Stanza> {
    let mut m = Message::error(original.from.clone()?);
    m.from = original.to.clone();
    m.id = original.id.clone();
    m.payloads.push(error(type_, condition, text).into());
    Some(Stanza::Message(m))
}

/// An error reply to a presence.
pub fn presence_error(from: Jid, to: Jid, type_: ErrorType, condition: DefinedCondition, text: &str) -> Stanza {
    let mut p = Presence::error().with_from(from).with_to(to);
    p.payloads.push(error(type_, condition, text).into());
    Stanza::Presence(p)
}

/// An element with the given name and namespace and no children.
pub fn empty(name: &str, ns: &str) -> Element {
    Element::builder(name, ns).build()
}

/// A message id for stanzas the gateway creates.
pub fn new_id() -> Id {
    Id(uuid::Uuid::new_v4().to_string())
}

/// The end-to-end encryption a message uses, if any: OMEMO (legacy and 2),
/// OpenPGP (XEP-0027 and XEP-0373).
pub fn encryption(m: &Message) -> Option<&'static str> {
    m.payloads.iter().find_map(|p| {
        if p.is("encrypted", "eu.siacs.conversations.axolotl") || p.is("encrypted", "urn:xmpp:omemo:2") {
            Some("OMEMO")
        } else if p.is("x", "jabber:x:encrypted") || p.is("openpgp", "urn:xmpp:openpgp:0") {
            Some("OpenPGP")
        } else {
            None
        }
    })
}

/// Stanzas nested in payloads (forwarded messages) belong to `jabber:client`, but
/// xmpp-parsers built for components writes `jabber:component:accept`: rewrite them.
pub fn client_namespace(el: Element) -> Element {
    const COMPONENT: &str = "jabber:component:accept";
    let ns = if el.ns() == COMPONENT { "jabber:client".to_owned() } else { el.ns() };
    let mut builder = Element::builder(el.name(), ns);
    for ((attr_ns, name), value) in el.attrs() {
        builder = builder.attr_ns(attr_ns.clone(), name.clone(), value.clone());
    }
    for node in el.nodes() {
        builder = match node {
            tokio_xmpp::parsers::minidom::Node::Element(child) => builder.append(client_namespace(child.clone())),
            tokio_xmpp::parsers::minidom::Node::Text(t) => builder.append(t.clone()),
        };
    }
    builder.build()
}

/// What a message from an XMPP user means: a correction (XEP-0308), a retraction
/// (XEP-0424), a full reaction set (XEP-0444), a plain message (with its reply
/// target, XEP-0461, and files, XEP-0066), or, without a body, a chat state
/// (XEP-0085). Bodies that are only fallbacks for those (XEP-0428) are not
/// relayed as text. `None`: nothing to bridge.
pub fn event_kind(m: &Message, body: &str) -> Option<isthmus_core::model::EventKind> {
    use isthmus_core::model::{EventKind, MessageRef};
    use tokio_xmpp::parsers::message_correct::Replace;
    use tokio_xmpp::parsers::reactions::Reactions;

    for p in &m.payloads {
        if p.is("replace", tokio_xmpp::parsers::ns::MESSAGE_CORRECT)
            && let Ok(r) = Replace::try_from(p.clone())
        {
            return Some(EventKind::Correction { target: MessageRef(r.id.0), message: content(m, body) });
        }
        if p.is("retract", crate::xep::NS_RETRACT)
            && let Ok(r) = crate::xep::Retract::try_from(p.clone())
        {
            return Some(EventKind::Retraction { target: MessageRef(r.id), moderator: None, reason: None });
        }
        if p.is("reactions", tokio_xmpp::parsers::ns::REACTIONS)
            && let Ok(r) = Reactions::try_from(p.clone())
        {
            let emojis = r.reactions.into_iter().map(|e| e.emoji).collect();
            return Some(EventKind::Reactions { target: MessageRef(r.id), emojis });
        }
    }
    if body.is_empty() {
        // XEP-0333: the sender has read everything up to this message.
        if let Some(id) = m.payloads.iter().find(|p| p.is("displayed", NS_MARKERS)).and_then(|p| p.attr("id")) {
            return Some(EventKind::Displayed { target: MessageRef(id.to_owned()) });
        }
        // A bare chat state (XEP-0085): typing notifications.
        return m.payloads.iter().find_map(chat_state).map(EventKind::Typing);
    }
    Some(EventKind::Message(content(m, body)))
}

/// The content of a message: the body without reply fallbacks, its reply target, its files.
fn content(m: &Message, body: &str) -> isthmus_core::model::Message {
    use isthmus_core::model::{Attachment, Message as Content, MessageRef, ReplyTo};

    let mut out = Content::text(body);
    let reply = m
        .payloads
        .iter()
        .find(|p| p.is("reply", crate::xep::NS_REPLY))
        .and_then(|p| crate::xep::Reply::try_from(p.clone()).ok());
    if let Some(reply) = reply {
        let fallback = m
            .payloads
            .iter()
            .filter(|p| p.is("fallback", crate::xep::NS_FALLBACK))
            .filter_map(|p| crate::xep::Fallback::try_from(p.clone()).ok())
            .find(|f| f.for_.as_deref() == Some(crate::xep::NS_REPLY));
        if let Some(f) = fallback {
            out.body = f.strip(body);
        }
        let author = reply.to.as_deref().and_then(parse_jid).and_then(|j| j.resource().map(|r| r.to_string()));
        out.reply_to = Some(ReplyTo { target: MessageRef(reply.id), author, quote: None });
    }
    for p in m.payloads.iter().filter(|p| p.is("x", tokio_xmpp::parsers::ns::OOB)) {
        let Some(url) = p.get_child("url", tokio_xmpp::parsers::ns::OOB).map(|u| u.text()) else { continue };
        let url = url.trim().to_owned();
        if !(url.starts_with("https://") || url.starts_with("http://")) {
            continue;
        }
        // The body of a file message is its URL, for clients without XEP-0066.
        if out.body.trim() == url {
            out.body.clear();
        }
        let name = url.rsplit('/').next().filter(|n| !n.is_empty()).map(str::to_owned);
        out.attachments.push(Attachment { url, name, mime: None, size: None });
    }
    out
}

/// The XEP-0085 chat state a payload carries.
pub fn chat_state(p: &Element) -> Option<isthmus_core::model::ChatState> {
    use isthmus_core::model::ChatState;
    if p.ns() != tokio_xmpp::parsers::ns::CHATSTATES {
        return None;
    }
    Some(match p.name() {
        "active" => ChatState::Active,
        "composing" => ChatState::Composing,
        "paused" => ChatState::Paused,
        "inactive" => ChatState::Inactive,
        "gone" => ChatState::Gone,
        _ => return None,
    })
}

/// The stanza rendering a message-like event (message, correction, retraction,
/// reaction set, displayed marker) from `from` to `to`; `None` for other kinds.
///
/// References keep the id the router gave them on the XMPP side (the message id,
/// which for messages the gateway relays is also its stanza-id). A correction
/// carries its own id: it shares the original's key, and reusing it would make
/// clients drop it as a duplicate.
pub fn rendered(event: &isthmus_core::model::Event, type_: MessageType, from: Jid, to: Jid) -> Option<Message> {
    use isthmus_core::model::EventKind;
    use tokio_xmpp::parsers::message_correct::Replace;
    use tokio_xmpp::parsers::reactions::{Reaction, Reactions};

    let own_id = || event.origin_ids.first().cloned().unwrap_or_else(|| new_id().0);
    let mut m = match &event.kind {
        EventKind::Message(msg) => {
            let mut m = content_stanza(msg, type_, from, to);
            m.id = Some(Id(event.key.0.clone()));
            m
        }
        EventKind::Correction { target, message } => {
            let mut m = content_stanza(message, type_, from, to);
            m.id = Some(Id(format!("{}-edit-{}", event.key.0, own_id())));
            m.payloads.push(Replace { id: Id(target.0.clone()) }.into());
            m
        }
        EventKind::Retraction { target, moderator: None, .. } => {
            let mut m = message(
                type_,
                from,
                to,
                "This person retracted a previous message; your client does not show retractions.",
            );
            m.id = Some(Id(event.key.0.clone()));
            m.payloads.push(crate::xep::Retract::own(target.0.clone()).into());
            m.payloads.push(crate::xep::Fallback { for_: Some(crate::xep::NS_RETRACT.into()), bodies: vec![] }.into());
            m.payloads.push(empty("store", NS_HINTS));
            m
        }
        EventKind::Retraction { target, moderator: Some(moderator), reason } => {
            // XEP-0425: the room itself announces it, naming the moderator by occupant JID.
            let room = from.to_bare();
            let by = full(&room, moderator).map(|j| j.to_string());
            let text = match reason {
                Some(r) => format!("A moderator removed a previous message: {r}"),
                None => "A moderator removed a previous message.".to_owned(),
            };
            let mut m = message(type_, Jid::from(room), to, &text);
            m.id = Some(Id(event.key.0.clone()));
            let moderated = Some(crate::xep::Moderated { by });
            m.payloads.push(crate::xep::Retract { id: target.0.clone(), moderated, reason: reason.clone() }.into());
            m.payloads.push(crate::xep::Fallback { for_: Some(crate::xep::NS_RETRACT.into()), bodies: vec![] }.into());
            m.payloads.push(crate::xep::Fallback { for_: Some(crate::xep::NS_MODERATE.into()), bodies: vec![] }.into());
            m.payloads.push(empty("store", NS_HINTS));
            m
        }
        EventKind::Reactions { target, emojis } => {
            let mut m = message(type_, from, to, "");
            m.id = Some(Id(event.key.0.clone()));
            let reactions = emojis.iter().map(|e| Reaction { emoji: e.clone() }).collect();
            m.payloads.push(Reactions { id: target.0.clone(), reactions }.into());
            m.payloads.push(empty("store", NS_HINTS));
            m
        }
        EventKind::Displayed { target } => {
            let mut m = message(type_, from, to, "");
            m.id = Some(new_id());
            m.payloads.push(
                Element::builder("displayed", NS_MARKERS)
                    .attr(xso::exports::rxml::NcName::try_from("id").expect("a constant valid name"), target.0.clone())
                    .build(),
            );
            m
        }
        _ => return None,
    };
    if event.delayed
        && matches!(event.kind, EventKind::Message(_))
        && let Some(d) = m.from.as_ref().and_then(|f| delay(event.time, &f.to_bare()))
    {
        m.payloads.push(d.into());
    }
    Some(m)
}

/// XEP-0334 message processing hints.
pub const NS_HINTS: &str = "urn:xmpp:hints";
/// XEP-0333 chat markers.
pub const NS_MARKERS: &str = "urn:xmpp:chat-markers:0";

/// The body XMPP shows for a message: `/me` for actions, file URLs on their own lines
/// (a body that is exactly the URL lets clients show the file inline).
pub fn rendered_body(msg: &isthmus_core::model::Message) -> String {
    let mut body = if msg.action { format!("/me {}", msg.body) } else { msg.body.clone() };
    for a in &msg.attachments {
        if !body.contains(&a.url) {
            if !body.is_empty() {
                body.push('\n');
            }
            body.push_str(&a.url);
        }
    }
    body
}

/// A message's body, files (XEP-0066) and reply target (XEP-0461).
fn content_stanza(msg: &isthmus_core::model::Message, type_: MessageType, from: Jid, to: Jid) -> Message {
    let mut m = message(type_, from, to, &rendered_body(msg));
    for a in &msg.attachments {
        m.payloads.push(
            Element::builder("x", tokio_xmpp::parsers::ns::OOB)
                .append(Element::builder("url", tokio_xmpp::parsers::ns::OOB).append(a.url.clone()).build())
                .build(),
        );
    }
    if let Some(r) = &msg.reply_to {
        m.payloads.push(crate::xep::Reply { to: None, id: r.target.0.clone() }.into());
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use isthmus_core::model::{ChatRef, Event, EventKind, MessageRef, NetworkId, Sender};

    fn retraction(moderator: Option<&str>, reason: Option<&str>) -> Message {
        let net = NetworkId::new("matrix");
        let kind = EventKind::Retraction {
            target: MessageRef("s1".into()),
            moderator: moderator.map(str::to_owned),
            reason: reason.map(str::to_owned),
        };
        let event = Event::new(net.clone(), ChatRef::room(net, "!r:hs"), Sender::new("@mod:hs", "mod"), kind);
        let from = Jid::new("room@muc.example/mod").expect("valid");
        let to = Jid::new("user@example/res").expect("valid");
        rendered(&event, MessageType::Groupchat, from, to).expect("rendered")
    }

    fn retract_of(m: &Message) -> crate::xep::Retract {
        let el = m.payloads.iter().find(|p| p.is("retract", crate::xep::NS_RETRACT)).expect("a retract");
        crate::xep::Retract::try_from(el.clone()).expect("parses")
    }

    #[test]
    fn moderation_comes_from_the_room_naming_the_moderator_and_reason() {
        let m = retraction(Some("mod"), Some("spam"));
        assert_eq!(m.from.as_ref().map(|j| j.to_string()).as_deref(), Some("room@muc.example"));
        let r = retract_of(&m);
        assert_eq!(r.id, "s1");
        assert_eq!(r.moderated.and_then(|m| m.by).as_deref(), Some("room@muc.example/mod"));
        assert_eq!(r.reason.as_deref(), Some("spam"));
        assert!(body(&m).is_some_and(|b| b.contains("spam")), "the fallback body gives the reason");
    }

    #[test]
    fn self_retraction_stays_xep_0424() {
        let m = retraction(None, None);
        assert_eq!(m.from.as_ref().map(|j| j.to_string()).as_deref(), Some("room@muc.example/mod"));
        let r = retract_of(&m);
        assert_eq!((r.id.as_str(), r.moderated, r.reason), ("s1", None, None));
    }
}
