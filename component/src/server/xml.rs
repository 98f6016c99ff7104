//! Small helpers for the embedded server's stanzas, which it handles as plain
//! `minidom` elements in the `jabber:client` namespace.

use tokio_xmpp::minidom::rxml::{Namespace, NcName};
use tokio_xmpp::minidom::{Element, Node};

pub const CLIENT: &str = "jabber:client";
pub const COMPONENT: &str = "jabber:component:accept";
pub const STANZAS: &str = "urn:ietf:params:xml:ns:xmpp-stanzas";
pub const STREAMS: &str = "urn:ietf:params:xml:ns:xmpp-streams";
pub const SASL: &str = "urn:ietf:params:xml:ns:xmpp-sasl";
pub const TLS: &str = "urn:ietf:params:xml:ns:xmpp-tls";
pub const BIND: &str = "urn:ietf:params:xml:ns:xmpp-bind";
pub const SESSION: &str = "urn:ietf:params:xml:ns:xmpp-session";
pub const ROSTER: &str = "jabber:iq:roster";
pub const CARBONS: &str = "urn:xmpp:carbons:2";
pub const FORWARD: &str = "urn:xmpp:forward:0";
pub const HINTS: &str = "urn:xmpp:hints";
pub const PING: &str = "urn:xmpp:ping";
pub const DISCO_INFO: &str = "http://jabber.org/protocol/disco#info";
pub const DISCO_ITEMS: &str = "http://jabber.org/protocol/disco#items";
pub const VERSION: &str = "jabber:iq:version";

fn ncname(name: &str) -> NcName {
    // Only called with the literal attribute names below.
    NcName::try_from(name).unwrap_or_else(|_| NcName::try_from("x").expect("`x` is a valid name"))
}

/// Set (or, with `None`, remove) an attribute without a namespace.
pub fn set_attr(el: &mut Element, name: &str, value: Option<&str>) {
    match value {
        Some(v) => {
            el.attrs_mut().insert(Namespace::NONE, ncname(name), v.to_owned());
        }
        None => {
            el.attrs_mut().remove(&Namespace::NONE, name);
        }
    }
}

/// A new element with attributes.
pub fn elem(name: &str, ns: &str, attrs: &[(&str, &str)]) -> Element {
    let mut el = Element::bare(name, ns);
    for (k, v) in attrs {
        set_attr(&mut el, k, Some(v));
    }
    el
}

pub fn with_child(mut el: Element, child: Element) -> Element {
    el.append_child(child);
    el
}

pub fn with_text(mut el: Element, text: &str) -> Element {
    el.append_text(text);
    el
}

/// The same element with `from` as its namespace replaced by `to`, deep.
pub fn rename_ns(el: &Element, from: &str, to: &str) -> Element {
    let ns = if el.ns() == from { to.to_owned() } else { el.ns() };
    let mut out = Element::bare(el.name(), ns);
    *out.attrs_mut() = el.attrs().clone();
    for node in el.nodes() {
        match node {
            Node::Element(child) => {
                out.append_child(rename_ns(child, from, to));
            }
            Node::Text(t) => out.append_text_node(t.clone()),
        }
    }
    out
}

/// An error reply to `el` (RFC 6120 §8.3), from its addressee back to its sender.
pub fn error_reply(el: &Element, kind: &str, condition: &str, text: Option<&str>) -> Element {
    let mut reply = el.clone();
    // Errors keep the original payload of messages and presences, but never of iqs.
    if el.name() == "iq" {
        reply = Element::bare("iq", el.ns());
        set_attr(&mut reply, "id", el.attr("id"));
    }
    set_attr(&mut reply, "type", Some("error"));
    set_attr(&mut reply, "from", el.attr("to"));
    set_attr(&mut reply, "to", el.attr("from"));
    let mut error = elem("error", CLIENT, &[("type", kind)]);
    error.append_child(Element::bare(condition, STANZAS));
    if let Some(t) = text {
        error.append_child(with_text(elem("text", STANZAS, &[("xml:lang", "en")]), t));
    }
    reply.append_child(error);
    reply
}

/// An empty result (or one with `payload`) to an iq.
pub fn iq_result(iq: &Element, payload: Option<Element>) -> Element {
    let mut reply = elem("iq", CLIENT, &[("type", "result")]);
    set_attr(&mut reply, "id", iq.attr("id"));
    set_attr(&mut reply, "from", iq.attr("to"));
    set_attr(&mut reply, "to", iq.attr("from"));
    if let Some(p) = payload {
        reply.append_child(p);
    }
    reply
}

/// The bare part of a JID string (`a@b/c` → `a@b`).
pub fn bare(jid: &str) -> &str {
    jid.split_once('/').map(|(b, _)| b).unwrap_or(jid)
}

/// The domain part of a JID string.
pub fn domain(jid: &str) -> &str {
    let b = bare(jid);
    b.rsplit_once('@').map(|(_, d)| d).unwrap_or(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jid_parts() {
        assert_eq!(bare("a@b/c/d"), "a@b");
        assert_eq!(domain("a@b/c@d"), "b");
        assert_eq!(domain("irc.localhost"), "irc.localhost");
        assert_eq!(domain("#x%irc@irc.localhost/nick"), "irc.localhost");
    }

    #[test]
    fn errors_swap_addresses_and_drop_iq_payloads() {
        let iq: Element = "<iq xmlns='jabber:client' type='get' id='1' from='a@b/c' to='b'><query xmlns='q'/></iq>"
            .parse()
            .expect("xml");
        let e = error_reply(&iq, "cancel", "service-unavailable", None);
        assert_eq!(e.attr("to"), Some("a@b/c"));
        assert_eq!(e.attr("from"), Some("b"));
        assert_eq!(e.attr("type"), Some("error"));
        assert!(e.get_child("query", "q").is_none());
        assert!(e.get_child("error", CLIENT).is_some());
    }

    #[test]
    fn namespaces_are_renamed_deep() {
        let m: Element = "<message xmlns='jabber:client'><body>x</body><x xmlns='y'/></message>".parse().expect("xml");
        let c = rename_ns(&m, CLIENT, COMPONENT);
        assert_eq!(c.ns(), COMPONENT);
        assert!(c.get_child("body", COMPONENT).is_some());
        assert!(c.get_child("x", "y").is_some());
    }
}
