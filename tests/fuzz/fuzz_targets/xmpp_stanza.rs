//! Stanzas from the component link → core events. The bytes follow an open
//! `jabber:component:accept` stream header, go through the link's `XmlShaper`
//! and are parsed; every top-level element is read as a message, presence or
//! iq with xmpp-parsers, and messages go through what the gateway does with
//! them (`stanza::encryption`, `body`, `event_kind`, `origin_id`,
//! `message_error`, `client_namespace`). Every element anywhere that is one
//! of the gateway's own XEP types (`xep`) must survive serialising and parsing.

#![no_main]

use isthmus_component::nesting::XmlShaper;
use isthmus_component::stanza::{
    body, chat_state, client_namespace, encryption, event_kind, message_error, origin_id,
};
use isthmus_component::xep::{AdHocCommand, Fallback, Retract};
use isthmus_core::model::{ChatRef, Event, EventKind, MessageRef, NetworkId, Sender, is_carriable};
use libfuzzer_sys::fuzz_target;
use tokio_xmpp::minidom::{Element, Node};
use tokio_xmpp::parsers::iq::Iq;
use tokio_xmpp::parsers::message::{Message, MessageType};
use tokio_xmpp::parsers::message_correct::Replace;
use tokio_xmpp::parsers::ns;
use tokio_xmpp::parsers::presence::Presence;
use tokio_xmpp::parsers::reactions::Reactions;
use tokio_xmpp::parsers::stanza_error::{DefinedCondition, ErrorType, StanzaError};
use tokio_xmpp::parsers::stanza_id::OriginId;

const HEADER: &[u8] =
    b"<stream:stream xmlns='jabber:component:accept' xmlns:stream='http://etherx.jabber.org/streams' from='irc.example.org'>";
const FOOTER: &[u8] = b"</stream:stream>";

fuzz_target!(|data: &[u8]| {
    let mut shaper = XmlShaper::default();
    let mut doc = Vec::new();
    for part in [HEADER, data, FOOTER] {
        shaper.shape(part, &mut doc);
    }
    let Ok(stream) = Element::from_reader(&doc[..]) else { return };
    check_own_xeps(&stream);
    for el in stream.children() {
        match el.name() {
            "message" => {
                if let Ok(m) = Message::try_from(el.clone()) {
                    check_message(&m);
                }
            }
            "presence" => {
                let _ = Presence::try_from(el.clone());
            }
            "iq" => {
                let _ = Iq::try_from(el.clone());
            }
            _ => {}
        }
    }
});

/// The payload that decides what a message means, as `event_kind` documents it:
/// the first valid correction, retraction or reaction set.
enum Special {
    Correction(String),
    Retraction(String),
    Reactions(String, Vec<String>),
}

fn special(p: &Element) -> Option<Special> {
    if p.is("replace", ns::MESSAGE_CORRECT)
        && let Ok(r) = Replace::try_from(p.clone())
    {
        return Some(Special::Correction(r.id.0));
    }
    if let Ok(r) = Retract::try_from(p.clone()) {
        return Some(Special::Retraction(r.id));
    }
    if p.is("reactions", ns::REACTIONS)
        && let Ok(r) = Reactions::try_from(p.clone())
    {
        return Some(Special::Reactions(r.id, r.reactions.into_iter().map(|e| e.emoji).collect()));
    }
    None
}

fn check_message(m: &Message) {
    let _ = encryption(m);
    let text = body(m).unwrap_or_default();
    let kind = event_kind(m, &text);
    match (m.payloads.iter().find_map(special), &kind) {
        (Some(Special::Correction(id)), Some(EventKind::Correction { target, message })) => {
            assert_eq!(target, &MessageRef(id));
            assert_eq!(message.body, text);
        }
        (Some(Special::Retraction(id)), Some(EventKind::Retraction { target, moderator: None, reason: None })) => {
            assert_eq!(target, &MessageRef(id));
        }
        (Some(Special::Reactions(id, emojis)), Some(EventKind::Reactions { target, emojis: got })) => {
            assert_eq!(target, &MessageRef(id));
            assert_eq!(got, &emojis);
        }
        // Bodies that are only fallbacks are not relayed as text: a plain message is only a plain one.
        (None, Some(EventKind::Message(c))) => {
            assert!(!text.is_empty(), "an empty body relayed");
            assert_eq!(c, &isthmus_core::model::Message::text(text.clone()));
        }
        // Without a body, a chat state is a typing notification.
        (None, Some(EventKind::Typing(state))) => {
            assert!(text.is_empty(), "a body was taken for a chat state");
            assert_eq!(m.payloads.iter().find_map(chat_state), Some(*state));
        }
        (None, None) => {
            assert!(text.is_empty(), "a body was not relayed");
            assert!(m.payloads.iter().find_map(chat_state).is_none(), "a chat state was not relayed");
        }
        (_, kind) => panic!("event kind {kind:?} does not match the payloads of {m:?}"),
    }

    if let Some(id) = origin_id(m) {
        let from_payload = m
            .payloads
            .iter()
            .filter(|p| p.is("origin-id", ns::SID))
            .filter_map(|p| OriginId::try_from(p.clone()).ok())
            .any(|o| o.id == id);
        assert!(from_payload || m.id.as_ref().is_some_and(|i| i.0 == id), "origin id {id:?} from nowhere");
    }

    if let Some(kind) = kind {
        // As the gateway builds it, then as the router cleans it.
        let chat = ChatRef::room(NetworkId::new("irc"), "#test%irc.example.org");
        let mut event = Event::new(NetworkId::xmpp(), chat, Sender::own("me@example.org", "me"), kind);
        event.clean_text();
        let texts: Vec<&str> = match &event.kind {
            EventKind::Message(c) | EventKind::Correction { message: c, .. } => vec![&c.body],
            EventKind::Reactions { emojis, .. } => emojis.iter().map(String::as_str).collect(),
            _ => vec![],
        };
        for t in texts {
            assert!(t.chars().all(is_carriable), "{t:?} left after cleaning");
        }
    }

    match message_error(m, ErrorType::Modify, DefinedCondition::NotAcceptable, "not bridged") {
        Some(tokio_xmpp::Stanza::Message(e)) => {
            assert_eq!(e.type_, MessageType::Error);
            assert_eq!((&e.to, &e.from, &e.id), (&m.from, &m.to, &m.id), "error not addressed back");
            assert!(e.payloads.iter().any(|p| StanzaError::try_from(p.clone()).is_ok()), "no error payload");
        }
        Some(other) => panic!("a message error is a message: {other:?}"),
        None => assert!(m.from.is_none(), "no error for a message with a sender"),
    }

    let el: Element = m.clone().into();
    let client = client_namespace(el.clone());
    assert_same_shape(&el, &client);
    assert_eq!(client_namespace(client.clone()), client, "rewriting twice changed it");
}

/// The same tree with every `jabber:component:accept` element moved to `jabber:client`.
fn assert_same_shape(before: &Element, after: &Element) {
    assert_eq!(before.name(), after.name());
    let expected_ns = if before.ns() == ns::COMPONENT_ACCEPT { ns::JABBER_CLIENT.to_owned() } else { before.ns() };
    assert_eq!(after.ns(), expected_ns);
    assert_eq!(before.attrs(), after.attrs());
    let (a, b): (Vec<&Node>, Vec<&Node>) = (before.nodes().collect(), after.nodes().collect());
    assert_eq!(a.len(), b.len());
    for (x, y) in a.into_iter().zip(b) {
        match (x, y) {
            (Node::Element(x), Node::Element(y)) => assert_same_shape(x, y),
            (Node::Text(x), Node::Text(y)) => assert_eq!(x, y),
            _ => panic!("a text became an element or the other way round"),
        }
    }
}

/// The gateway's own XEP types, wherever they appear, parse back to what was written.
fn check_own_xeps(el: &Element) {
    if let Ok(r) = Retract::try_from(el.clone()) {
        assert_eq!(Retract::try_from(Element::from(r.clone())).ok(), Some(r));
    }
    if let Ok(f) = Fallback::try_from(el.clone()) {
        assert_eq!(Fallback::try_from(Element::from(f.clone())).ok(), Some(f));
    }
    if let Ok(c) = AdHocCommand::try_from(el.clone()) {
        assert_eq!(AdHocCommand::try_from(Element::from(c.clone())).ok(), Some(c));
    }
    for child in el.children() {
        check_own_xeps(child);
    }
}
