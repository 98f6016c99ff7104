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

fn error(type_: ErrorType, condition: DefinedCondition, text: &str) -> StanzaError {
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
/// (XEP-0424), a full reaction set (XEP-0444), a plain message, or, without a
/// body, a chat state (XEP-0085). Bodies that
/// are only fallbacks for those are not relayed as text. `None`: nothing to bridge.
pub fn event_kind(m: &Message, body: &str) -> Option<isthmus_core::model::EventKind> {
    use isthmus_core::model::{EventKind, Message as Content, MessageRef};
    use tokio_xmpp::parsers::message_correct::Replace;
    use tokio_xmpp::parsers::reactions::Reactions;

    for p in &m.payloads {
        if p.is("replace", tokio_xmpp::parsers::ns::MESSAGE_CORRECT) {
            if let Ok(r) = Replace::try_from(p.clone()) {
                return Some(EventKind::Correction { target: MessageRef(r.id.0), message: Content::text(body) });
            }
        }
        if p.is("retract", crate::xep::NS_RETRACT) {
            if let Ok(r) = crate::xep::Retract::try_from(p.clone()) {
                return Some(EventKind::Retraction { target: MessageRef(r.id), moderator: None, reason: None });
            }
        }
        if p.is("reactions", tokio_xmpp::parsers::ns::REACTIONS) {
            if let Ok(r) = Reactions::try_from(p.clone()) {
                let emojis = r.reactions.into_iter().map(|e| e.emoji).collect();
                return Some(EventKind::Reactions { target: MessageRef(r.id), emojis });
            }
        }
    }
    if body.is_empty() {
        // A bare chat state (XEP-0085): typing notifications.
        return m.payloads.iter().find_map(chat_state).map(EventKind::Typing);
    }
    Some(EventKind::Message(Content::text(body)))
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
