//! XEPs that xmpp-parsers does not cover yet, declared with `xso` in one place,
//! each with its rejection tests: XEP-0424 message retraction and the XEP-0428
//! fallback indication it relies on.

use xso::{AsXml, FromXml};

/// XEP-0424 namespace.
pub const NS_RETRACT: &str = "urn:xmpp:message-retract:1";
/// XEP-0428 namespace.
pub const NS_FALLBACK: &str = "urn:xmpp:fallback:0";

/// `<retract id='…'/>`: the sender withdraws the message with this id (in a MUC,
/// the room's stanza-id of it).
#[derive(FromXml, AsXml, PartialEq, Debug, Clone)]
#[xml(namespace = NS_RETRACT, name = "retract")]
pub struct Retract {
    /// The id of the message withdrawn.
    #[xml(attribute)]
    pub id: String,
}

/// `<fallback for='…'/>`: the body (or part of it) is only there for clients that
/// do not understand the `for` namespace.
#[derive(FromXml, AsXml, PartialEq, Debug, Clone)]
#[xml(namespace = NS_FALLBACK, name = "fallback")]
pub struct Fallback {
    /// The namespace the fallback stands in for.
    #[xml(attribute(name = "for", default))]
    pub for_: Option<String>,
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
}
