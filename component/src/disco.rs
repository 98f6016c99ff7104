//! What each entity the gateway speaks for answers to disco#info (XEP-0030), and
//! the entity capabilities (XEP-0115 and XEP-0390) its presences carry, hashed
//! from that same answer with xmpp-parsers' helpers so a client can verify them.
//!
//! Entities: the gateway domain itself, a room, and a person (a puppet, reached at
//! its contact JID or at its occupant JID in a room).

use tokio_xmpp::parsers::caps::{self, Caps};
use tokio_xmpp::parsers::disco::{DiscoInfoResult, Identity};
use tokio_xmpp::parsers::ecaps2::{self, ECaps2};
use tokio_xmpp::parsers::hashes::Algo;
use tokio_xmpp::parsers::minidom::Element;
use tokio_xmpp::parsers::ns;

/// The XEP-0115 node naming the gateway's software.
pub const CAPS_NODE: &str = "https://example.org/isthmus";

/// XEP-0045 feature of rooms whose occupants' real JIDs everyone sees.
pub const MUC_NONANONYMOUS: &str = "muc_nonanonymous";

fn info(identity: Identity, mut features: Vec<&str>) -> DiscoInfoResult {
    features.sort_unstable();
    features.dedup();
    DiscoInfoResult {
        node: None,
        identities: vec![identity],
        features: features.into_iter().map(str::to_owned).collect(),
        extensions: vec![],
    }
}

/// The gateway domain of one network (`kind`: "IRC", "Matrix"); `register` when the
/// network has accounts to link (XEP-0077). It is also a room service (XEP-0045
/// `conference`), so clients offer it where they look for rooms: `conference/irc`
/// on IRC (as Biboumi), `conference/text` elsewhere (the registry has no other type).
pub fn gateway(kind: &str, register: bool) -> DiscoInfoResult {
    let mut features = vec![ns::DISCO_INFO, ns::MUC, ns::PING, crate::xep::NS_COMMANDS, ns::VERSION];
    if register {
        features.push(ns::REGISTER);
    }
    let kind_lower = kind.to_lowercase();
    let conference_type = if kind_lower == "irc" { "irc" } else { "text" };
    let mut result = info(Identity::new("gateway", kind_lower, "en", format!("Isthmus {kind} gateway")), features);
    result.identities.push(Identity::new("conference", conference_type, "en", format!("{kind} rooms")));
    result
}

/// A room named `name`. Its moderators may remove messages by XEP-0425 on every
/// network: natively where it has removal (Matrix), else as its retraction fallback
/// shows a user's own retraction (IRC); the room's archive forgets the message.
pub fn room(name: &str) -> DiscoInfoResult {
    let features = vec![
        ns::DISCO_INFO,
        ns::MUC,
        MUC_NONANONYMOUS,
        "muc_persistent",
        "muc_open",
        ns::SID,
        ns::MAM,
        ns::PING,
        ns::VCARD,
        crate::xep::NS_COMMANDS,
        crate::xep::NS_MODERATE,
    ];
    info(Identity::new("conference", "text", "en", name.to_owned()), features)
}

/// A network's service address (an IRC server): raw commands as chat, and
/// ad-hoc commands (`configure`).
pub fn service(name: &str, kind: &str) -> DiscoInfoResult {
    info(
        Identity::new("gateway", kind.to_lowercase(), "en", name.to_owned()),
        vec![ns::DISCO_INFO, crate::xep::NS_COMMANDS, ns::PING],
    )
}

/// A person on another network, named `name`: a contact or an occupant.
pub fn person(name: &str) -> DiscoInfoResult {
    info(
        Identity::new("client", "pc", "en", name.to_owned()),
        vec![ns::DISCO_INFO, ns::VCARD, ns::CHATSTATES, ns::RECEIPTS, ns::PING],
    )
}

/// The capabilities of an entity answering `info`, as presence payloads: XEP-0115
/// (SHA-1, what most clients read) and XEP-0390 (SHA-256).
pub fn caps_payloads(info: &DiscoInfoResult) -> Vec<Element> {
    let mut out = Vec::new();
    if let Ok(hash) = caps::hash_caps(&caps::compute_disco(info), Algo::Sha_1) {
        out.push(Caps::new(CAPS_NODE, hash).into());
    }
    if let Ok(hash) = ecaps2::compute_disco(info).and_then(|data| ecaps2::hash_ecaps2(&data, Algo::Sha_256)) {
        out.push(ECaps2::new(vec![hash]).into());
    }
    out
}

/// Whether a disco#info `node` asks about the capabilities advertised for `info`
/// (`node#ver` of XEP-0115, `urn:xmpp:caps#algo.hash` of XEP-0390), or is absent.
pub fn node_matches(node: Option<&str>, info: &DiscoInfoResult) -> bool {
    let Some(node) = node else { return true };
    let caps = caps_payloads(info);
    let c1 = caps.iter().find_map(|p| Caps::try_from(p.clone()).ok());
    let c2 = caps.iter().find_map(|p| ECaps2::try_from(p.clone()).ok());
    use base64::Engine;
    let b64 = |v: &[u8]| base64::engine::general_purpose::STANDARD.encode(v);
    c1.is_some_and(|c| node == format!("{}#{}", c.node, b64(&c.ver)))
        || c2.is_some_and(|c| {
            c.hashes.iter().any(|h| node == format!("{}#{}.{}", ns::ECAPS2, String::from(h.algo.clone()), b64(&h.hash)))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_verify_against_the_same_info() {
        let info = room("#chan%irc.example.org");
        let payloads = caps_payloads(&info);
        let c = Caps::try_from(payloads[0].clone()).expect("caps");
        let again = caps::hash_caps(&caps::compute_disco(&info), Algo::Sha_1).expect("hash");
        assert_eq!(c.ver, again.hash);
        use base64::Engine;
        let ver = base64::engine::general_purpose::STANDARD.encode(&c.ver);
        assert!(node_matches(Some(&format!("{CAPS_NODE}#{ver}")), &info));
        assert!(!node_matches(Some(&format!("{CAPS_NODE}#AAAA")), &info));
        assert!(node_matches(None, &info));
        let e = ECaps2::try_from(payloads[1].clone()).expect("ecaps2");
        let node =
            format!("{}#sha-256.{}", ns::ECAPS2, base64::engine::general_purpose::STANDARD.encode(&e.hashes[0].hash));
        assert!(node_matches(Some(&node), &info));
    }

    #[test]
    fn each_entity_answers_what_it_is() {
        assert!(room("r").features.iter().any(|f| f == MUC_NONANONYMOUS));
        assert!(room("r").features.iter().any(|f| f == crate::xep::NS_MODERATE));
        assert!(gateway("IRC", true).features.iter().any(|f| f == ns::REGISTER));
        assert!(!gateway("IRC", false).features.iter().any(|f| f == ns::REGISTER));
        assert_eq!(person("bob").identities[0].category, "client");
        let kinds = |info: DiscoInfoResult| -> Vec<String> {
            info.identities.iter().map(|i| format!("{}/{}", i.category, i.type_)).collect()
        };
        assert_eq!(kinds(gateway("IRC", false)), ["gateway/irc", "conference/irc"]);
        assert_eq!(kinds(gateway("Matrix", true)), ["gateway/matrix", "conference/text"]);
        for entity in [gateway("IRC", false), room("r"), service("irc.example.org", "IRC")] {
            assert!(entity.features.iter().any(|f| f == crate::xep::NS_COMMANDS), "{entity:?}");
        }
    }
}
