//! XEPs that xmpp-parsers does not cover yet, declared with `xso` in one place,
//! each with its rejection tests: XEP-0424 message retraction, XEP-0425 message
//! moderation, XEP-0461 replies,
//! the XEP-0428 fallback indication they rely on, and XEP-0050 ad-hoc commands.

use xso::{AsXml, FromXml};

/// XEP-0424 namespace.
pub const NS_RETRACT: &str = "urn:xmpp:message-retract:1";
/// XEP-0425 namespace (version 0.3 and later).
pub const NS_MODERATE: &str = "urn:xmpp:message-moderate:1";
/// XEP-0428 namespace.
pub const NS_FALLBACK: &str = "urn:xmpp:fallback:0";
/// XEP-0461 namespace.
pub const NS_REPLY: &str = "urn:xmpp:reply:0";

/// `<reply to='…' id='…'/>`: this message answers the message with this id (in a
/// MUC, the room's stanza-id of it), written by `to`.
#[derive(FromXml, AsXml, PartialEq, Debug, Clone)]
#[xml(namespace = NS_REPLY, name = "reply")]
pub struct Reply {
    /// The author of the message answered (an occupant JID in a MUC).
    #[xml(attribute(default))]
    pub to: Option<String>,
    /// The id of the message answered.
    #[xml(attribute)]
    pub id: String,
}

/// `<body start='…' end='…'/>` in a fallback: the part of the body (in Unicode
/// code points) that is only the fallback; without both, all of it.
#[derive(FromXml, AsXml, PartialEq, Debug, Clone)]
#[xml(namespace = NS_FALLBACK, name = "body")]
pub struct FallbackBody {
    #[xml(attribute(default))]
    pub start: Option<usize>,
    #[xml(attribute(default))]
    pub end: Option<usize>,
}

/// `<retract id='…'/>`: the sender withdraws the message with this id (in a MUC,
/// the room's stanza-id of it).
#[derive(FromXml, AsXml, PartialEq, Debug, Clone)]
#[xml(namespace = NS_RETRACT, name = "retract")]
pub struct Retract {
    /// The id of the message withdrawn.
    #[xml(attribute)]
    pub id: String,
    /// Present when a moderator removed someone else's message (XEP-0425).
    #[xml(child(default))]
    pub moderated: Option<Moderated>,
    /// Why the message was removed (XEP-0425 puts it in the retraction namespace).
    #[xml(extract(default, fields(text(type_ = String))))]
    pub reason: Option<String>,
}

impl Retract {
    /// The author's own withdrawal of the message `id` (XEP-0424).
    pub fn own(id: String) -> Retract {
        Retract { id, moderated: None, reason: None }
    }
}

/// `<moderated by='…'/>` in a retraction: a moderator, named by their occupant
/// JID when known, removed the message.
#[derive(FromXml, AsXml, PartialEq, Debug, Clone)]
#[xml(namespace = NS_MODERATE, name = "moderated")]
pub struct Moderated {
    /// The moderator's occupant JID.
    #[xml(attribute(default))]
    pub by: Option<String>,
}

/// `<moderate id='…'><retract/><reason>…</reason></moderate>`: a moderator asks
/// the room (by an IQ set) to remove the message with this stanza-id.
#[derive(FromXml, AsXml, PartialEq, Debug, Clone)]
#[xml(namespace = NS_MODERATE, name = "moderate")]
pub struct Moderate {
    /// The room's stanza-id of the message to remove.
    #[xml(attribute)]
    pub id: String,
    /// Asks for a retraction (the only action XEP-0425 defines).
    #[xml(flag(namespace = NS_RETRACT, name = "retract"))]
    pub retract: bool,
    /// Why, shown to the occupants.
    #[xml(extract(default, fields(text(type_ = String))))]
    pub reason: Option<String>,
}

/// `<fallback for='…'/>`: the body (or part of it) is only there for clients that
/// do not understand the `for` namespace.
#[derive(FromXml, AsXml, PartialEq, Debug, Clone)]
#[xml(namespace = NS_FALLBACK, name = "fallback")]
pub struct Fallback {
    /// The namespace the fallback stands in for.
    #[xml(attribute(name = "for", default))]
    pub for_: Option<String>,
    /// Which parts of the body are fallback text.
    #[xml(child(n = ..))]
    pub bodies: Vec<FallbackBody>,
}

impl Fallback {
    /// `body` without the parts this fallback marks (the whole body when no range is given).
    pub fn strip(&self, body: &str) -> String {
        if self.bodies.is_empty() {
            return String::new();
        }
        let chars: Vec<char> = body.chars().collect();
        let mut keep = vec![true; chars.len()];
        for b in &self.bodies {
            let (start, end) = match (b.start, b.end) {
                (Some(s), Some(e)) if s <= e => (s.min(chars.len()), e.min(chars.len())),
                (None, None) => (0, chars.len()),
                _ => continue,
            };
            keep[start..end].iter_mut().for_each(|k| *k = false);
        }
        chars.iter().zip(keep).filter(|(_, k)| *k).map(|(c, _)| *c).collect()
    }
}

/// XEP-0050 namespace.
pub const NS_COMMANDS: &str = "http://jabber.org/protocol/commands";

/// `<command/>`: a request to run an ad-hoc command, or its answer.
#[derive(FromXml, AsXml, PartialEq, Debug, Clone)]
#[xml(namespace = NS_COMMANDS, name = "command")]
pub struct AdHocCommand {
    /// Which command.
    #[xml(attribute)]
    pub node: String,
    /// Ties the steps of a multi-step command together.
    #[xml(attribute(default))]
    pub sessionid: Option<String>,
    /// `execute` (default), `next`, `complete`, `cancel`…
    #[xml(attribute(default))]
    pub action: Option<String>,
    /// In answers: `executing`, `completed` or `canceled`.
    #[xml(attribute(default))]
    pub status: Option<String>,
    /// The form to fill in, or the filled-in form.
    #[xml(child(default))]
    pub form: Option<tokio_xmpp::parsers::data_forms::DataForm>,
    /// Texts for the user.
    #[xml(child(n = ..))]
    pub notes: Vec<Note>,
}

/// `<note type='info|warn|error'>text</note>` in a command answer.
#[derive(FromXml, AsXml, PartialEq, Debug, Clone)]
#[xml(namespace = NS_COMMANDS, name = "note")]
pub struct Note {
    /// `info`, `warn` or `error`.
    #[xml(attribute(name = "type", default))]
    pub type_: Option<String>,
    /// The text.
    #[xml(text)]
    pub text: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_xmpp::parsers::minidom::Element;

    fn parse<T: TryFrom<Element, Error = xso::error::FromElementError>>(xml: &str) -> Result<T, String> {
        let el: Element = xml.parse().map_err(|e| format!("{e:?}"))?;
        T::try_from(el).map_err(|e| e.to_string())
    }

    #[test]
    fn retract_valid_and_round_trip() {
        let r: Retract = parse("<retract xmlns='urn:xmpp:message-retract:1' id='abc'/>").expect("valid");
        assert_eq!(r.id, "abc");
        let el: Element = r.clone().into();
        assert_eq!(Retract::try_from(el).expect("round trip"), r);
    }

    #[test]
    fn retract_rejections() {
        let e = parse::<Retract>("<retract xmlns='urn:xmpp:message-retract:1'/>").expect_err("missing id");
        assert!(e.contains("id"), "{e}");
        // Extensions the XEP may add later are tolerated, as XMPP expects of receivers.
        let r = parse::<Retract>("<retract xmlns='urn:xmpp:message-retract:1' id='a' foo='b'/>").expect("unknown attr");
        assert_eq!(r.id, "a");
        let r = parse::<Retract>("<retract xmlns='urn:xmpp:message-retract:1' id='a'><x/></retract>")
            .expect("unknown child");
        assert_eq!(r.id, "a");
        assert!(parse::<Retract>("<retract xmlns='urn:xmpp:message-retract:0' id='a'/>").is_err(), "other namespace");
    }

    #[test]
    fn moderated_retraction_round_trip() {
        let r: Retract = parse(
            "<retract xmlns='urn:xmpp:message-retract:1' id='s1'><moderated xmlns='urn:xmpp:message-moderate:1' by='room@muc/mod'/><reason>spam</reason></retract>",
        )
        .expect("valid");
        assert_eq!(r.moderated.as_ref().and_then(|m| m.by.as_deref()), Some("room@muc/mod"));
        assert_eq!(r.reason.as_deref(), Some("spam"));
        let el: Element = r.clone().into();
        assert_eq!(Retract::try_from(el).expect("round trip"), r);
        let own: Element = Retract::own("s2".into()).into();
        assert!(own.children().next().is_none(), "a self-retraction has no moderation children");
    }

    #[test]
    fn moderate_request_valid_and_rejections() {
        let m: Moderate = parse(
            "<moderate xmlns='urn:xmpp:message-moderate:1' id='s1'><retract xmlns='urn:xmpp:message-retract:1'/><reason>off topic</reason></moderate>",
        )
        .expect("valid");
        assert_eq!((m.id.as_str(), m.retract, m.reason.as_deref()), ("s1", true, Some("off topic")));
        let m: Moderate = parse("<moderate xmlns='urn:xmpp:message-moderate:1' id='s1'/>").expect("no action parsed");
        assert!(!m.retract && m.reason.is_none());
        let e = parse::<Moderate>(
            "<moderate xmlns='urn:xmpp:message-moderate:1'><retract xmlns='urn:xmpp:message-retract:1'/></moderate>",
        )
        .expect_err("missing id");
        assert!(e.contains("id"), "{e}");
        assert!(
            parse::<Moderate>("<moderate xmlns='urn:xmpp:message-moderate:0' id='a'/>").is_err(),
            "other namespace"
        );
    }

    #[test]
    fn fallback_valid_and_rejections() {
        let f: Fallback =
            parse("<fallback xmlns='urn:xmpp:fallback:0' for='urn:xmpp:message-retract:1'/>").expect("valid");
        assert_eq!(f.for_.as_deref(), Some(NS_RETRACT));
        let f: Fallback = parse("<fallback xmlns='urn:xmpp:fallback:0'/>").expect("for is optional");
        assert_eq!(f.for_, None);
        let f = parse::<Fallback>("<fallback xmlns='urn:xmpp:fallback:0' bar='x'/>").expect("unknown attr tolerated");
        assert_eq!(f.for_, None);
        assert!(parse::<Fallback>("<fallback xmlns='urn:xmpp:other' for='x'/>").is_err(), "other namespace");
    }

    #[test]
    fn reply_valid_round_trip_and_rejections() {
        let r: Reply = parse("<reply xmlns='urn:xmpp:reply:0' to='room@muc/bob' id='s1'/>").expect("valid");
        assert_eq!((r.to.as_deref(), r.id.as_str()), (Some("room@muc/bob"), "s1"));
        let el: Element = r.clone().into();
        assert_eq!(Reply::try_from(el).expect("round trip"), r);
        let r: Reply = parse("<reply xmlns='urn:xmpp:reply:0' id='s1'/>").expect("to is optional");
        assert_eq!(r.to, None);
        let e = parse::<Reply>("<reply xmlns='urn:xmpp:reply:0' to='x'/>").expect_err("missing id");
        assert!(e.contains("id"), "{e}");
        assert!(parse::<Reply>("<reply xmlns='urn:xmpp:reply:1' id='a'/>").is_err(), "other namespace");
    }

    #[test]
    fn fallback_ranges_strip_only_the_fallback() {
        let f: Fallback =
            parse("<fallback xmlns='urn:xmpp:fallback:0' for='urn:xmpp:reply:0'><body start='0' end='9'/></fallback>")
                .expect("valid");
        assert_eq!(f.strip("> bob: é\nthe answer"), "the answer");
        let whole: Fallback =
            parse("<fallback xmlns='urn:xmpp:fallback:0' for='x'><body/></fallback>").expect("no range");
        assert_eq!(whole.strip("all of it"), "");
        let bad: Fallback = parse("<fallback xmlns='urn:xmpp:fallback:0' for='x'><body start='5' end='2'/></fallback>")
            .expect("parsed");
        assert_eq!(bad.strip("reversed range keeps everything"), "reversed range keeps everything");
        let past: Fallback =
            parse("<fallback xmlns='urn:xmpp:fallback:0' for='x'><body start='3' end='99'/></fallback>")
                .expect("parsed");
        assert_eq!(past.strip("abcdef"), "abc");
        assert!(
            parse::<Fallback>("<fallback xmlns='urn:xmpp:fallback:0'><body start='x' end='2'/></fallback>").is_err(),
            "a range must be numbers"
        );
    }

    #[test]
    fn command_valid_round_trip_and_rejections() {
        let c: AdHocCommand = parse(
            "<command xmlns='http://jabber.org/protocol/commands' node='status' action='execute'><note type='info'>hi</note></command>",
        )
        .expect("valid");
        assert_eq!((c.node.as_str(), c.action.as_deref(), c.notes.len()), ("status", Some("execute"), 1));
        assert_eq!(c.notes[0].text, "hi");
        let el: Element = c.clone().into();
        assert_eq!(AdHocCommand::try_from(el).expect("round trip"), c);
        let e =
            parse::<AdHocCommand>("<command xmlns='http://jabber.org/protocol/commands'/>").expect_err("missing node");
        assert!(e.contains("node"), "{e}");
        let e = parse::<AdHocCommand>(
            "<command xmlns='http://jabber.org/protocol/commands' node='x'><x xmlns='jabber:x:data' type='bogus'/></command>",
        )
        .expect_err("bad form");
        assert!(!e.is_empty());
    }
}
