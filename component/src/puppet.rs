//! People of other networks as XMPP entities (puppets): their real JIDs in room
//! occupant items, their profiles (vCard-temp, XEP-0054), the avatar hash
//! (XEP-0153), nickname (XEP-0172) and capabilities (XEP-0115) their presences
//! carry, and the answers to subscriptions and probes sent to them.
//!
//! Profiles come from each network through [`Network::profile`]; they are cached
//! per (network, account, person), and fetched in the background when a person
//! appears in a room, so a picture found later is announced with a new presence.

use std::collections::HashMap;
use std::sync::Arc;

use isthmus_core::model::{ChatKind, ChatRef, NetworkId};
use isthmus_core::network::{AvatarData, Profile};
use tokio_xmpp::Stanza;
use tokio_xmpp::parsers::caps;
use tokio_xmpp::parsers::hashes::Algo;
use tokio_xmpp::parsers::jid::{BareJid, Jid};
use tokio_xmpp::parsers::minidom::Element;
use tokio_xmpp::parsers::nick::Nick;
use tokio_xmpp::parsers::ns;
use tokio_xmpp::parsers::presence::{Presence, Type as PresenceType};
use tokio_xmpp::parsers::vcard::{Binval, Photo, Type as PhotoType, VCard};
use tokio_xmpp::parsers::vcard_update::{Photo as UpdatePhoto, VCardUpdate};
use tracing::{debug, warn};
use xso::exports::rxml::{Namespace, NcName};

use crate::gateway::{Domain, Gateway};

/// Largest picture the gateway fetches and serves in a vCard.
const MAX_AVATAR_BYTES: usize = 512 * 1024;

/// Whose profile: the network, the account looking (personal mode) and the person's id.
pub(crate) type ProfileKey = (NetworkId, Option<BareJid>, String);

/// A profile as the XMPP side serves it.
#[derive(Debug, Clone)]
pub(crate) struct CachedProfile {
    /// The name to show.
    pub(crate) name: String,
    /// The picture, its media type and its SHA-1 (XEP-0153).
    pub(crate) photo: Option<(Vec<u8>, String, [u8; 20])>,
}

/// The profile cache.
pub(crate) struct Profiles {
    known: std::sync::Mutex<HashMap<ProfileKey, Arc<CachedProfile>>>,
    /// Bounds concurrent fetches (a join to a big room asks for many).
    fetching: tokio::sync::Semaphore,
}

impl Profiles {
    pub(crate) fn new() -> Self {
        Profiles { known: Default::default(), fetching: tokio::sync::Semaphore::new(4) }
    }

    pub(crate) fn get(&self, key: &ProfileKey) -> Option<Arc<CachedProfile>> {
        self.known.lock().unwrap_or_else(|p| p.into_inner()).get(key).cloned()
    }

    /// Most profiles kept; past it the cache starts over (profiles are fetched again).
    const CAPACITY: usize = 50_000;

    fn put(&self, key: ProfileKey, profile: Arc<CachedProfile>) {
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        if known.len() >= Self::CAPACITY {
            known.clear();
        }
        known.insert(key, profile);
    }
}

/// The SHA-1 of some bytes (XEP-0153 avatar ids), with xmpp-parsers' hashing.
fn sha1(data: &[u8]) -> Option<[u8; 20]> {
    caps::hash_caps(data, Algo::Sha_1).ok()?.hash.try_into().ok()
}

/// The media type the first bytes of an image show (for networks that do not say).
fn sniff_mime(data: &[u8]) -> &'static str {
    if data.starts_with(b"\x89PNG") {
        "image/png"
    } else if data.starts_with(b"\xff\xd8") {
        "image/jpeg"
    } else if data.starts_with(b"GIF8") {
        "image/gif"
    } else if data.len() > 12 && &data[..4] == b"RIFF" && &data[8..12] == b"WEBP" {
        "image/webp"
    } else {
        "application/octet-stream"
    }
}

/// Set the `jid` attribute of the `<item/>` in a MUC presence: the occupant's real
/// JID (xmpp-parsers' item only holds full JIDs; puppets and accounts are bare).
pub(crate) fn with_real_jid(stanza: Stanza, real: Option<&BareJid>) -> Stanza {
    let (mut p, real) = match (stanza, real) {
        (Stanza::Presence(p), Some(real)) => (p, real),
        (other, _) => return other,
    };
    for payload in p.payloads.iter_mut().filter(|e| e.is("x", ns::MUC_USER)) {
        if let Some(item) = payload.get_child_mut("item", ns::MUC_USER) {
            item.set_attr(Namespace::NONE, NcName::try_from("jid").expect("a constant valid name"), real.to_string());
        }
    }
    Stanza::Presence(p)
}

impl Gateway {
    /// The real JID of a person with id `id` on `network`: their puppet JID on the
    /// network's domain; on the XMPP side (portal rooms) the account itself. In a
    /// portal, an id that is a JID with a localpart is an XMPP account.
    pub(crate) fn real_jid(&self, network: &NetworkId, id: &str) -> Option<BareJid> {
        if network.is_xmpp() {
            return BareJid::new(id).ok().filter(|j| j.node().is_some());
        }
        if let Ok(j) = BareJid::new(id)
            && j.node().is_some()
            && !self.serves(j.domain().as_str())
        {
            return Some(j);
        }
        self.chat_jid(&ChatRef::direct(network.clone(), id)).map(|(_, j)| j)
    }

    /// The network a room's occupants belong to: the room's own, or for portal
    /// rooms (spelled on the XMPP side) the network the event came from.
    pub(crate) fn people_network(chat_network: &NetworkId, origin: &NetworkId) -> NetworkId {
        if chat_network.is_xmpp() { origin.clone() } else { chat_network.clone() }
    }

    /// The profile of `id` on `network` as `account` sees it, from the cache or the network.
    pub(crate) async fn profile(
        &self,
        network: &NetworkId,
        account: Option<&BareJid>,
        id: &str,
    ) -> Option<Arc<CachedProfile>> {
        let key = (network.clone(), account.cloned(), id.to_owned());
        if let Some(p) = self.profiles.get(&key) {
            return Some(p);
        }
        let net = self.router.get()?.network(network)?;
        let _permit = self.profiles.fetching.acquire().await.ok()?;
        if let Some(p) = self.profiles.get(&key) {
            return Some(p);
        }
        let profile = match net.profile(account, id).await {
            Ok(p) => p,
            Err(e) => {
                debug!(network = %network, id, error = %e, "profile unavailable");
                Profile::default()
            }
        };
        let photo = match profile.avatar {
            Some(avatar) => {
                let bytes = match avatar.data {
                    AvatarData::Bytes(b) => Some(b),
                    AvatarData::Url(url) => fetch(&url).await,
                };
                bytes.filter(|b| !b.is_empty() && b.len() <= MAX_AVATAR_BYTES).and_then(|b| {
                    let mime = avatar.mime.clone().unwrap_or_else(|| sniff_mime(&b).to_owned());
                    let hash = sha1(&b)?;
                    Some((b, mime, hash))
                })
            }
            None => None,
        };
        let name = profile.display_name.filter(|n| !n.is_empty()).unwrap_or_else(|| net.display_name(id));
        let cached = Arc::new(CachedProfile { name, photo });
        self.profiles.put(key, cached.clone());
        Some(cached)
    }

    /// What a presence from a person carries: capabilities (hashed from what the
    /// entity answers to disco#info, `info_name` being its identity name), the
    /// avatar hash when the profile is known (XEP-0153; an empty update otherwise),
    /// and with `nick` their nickname (XEP-0172, not in rooms, where the nick is the resource).
    pub(crate) fn person_payloads(&self, info_name: &str, profile: Option<&CachedProfile>, nick: bool) -> Vec<Element> {
        let mut out = crate::disco::caps_payloads(&crate::disco::person(info_name));
        let update = match profile {
            Some(p) => VCardUpdate { photo: Some(UpdatePhoto { data: p.photo.as_ref().map(|(_, _, h)| *h) }) },
            None => VCardUpdate { photo: None },
        };
        out.push(update.into());
        if let (true, Some(p)) = (nick, profile) {
            out.push(Nick(p.name.clone()).into());
        }
        out
    }

    /// The vCard (XEP-0054) of a person: their name and, when they have one, picture.
    pub(crate) fn person_vcard(profile: &CachedProfile) -> Element {
        let text = |name: &str, value: &str| Element::builder(name, ns::VCARD).append(value.to_owned()).build();
        let vcard = VCard {
            photo: profile.photo.as_ref().map(|(data, mime, _)| Photo {
                type_: PhotoType { data: mime.clone() },
                binval: Binval { data: data.clone() },
            }),
            payloads: vec![text("FN", &profile.name), text("NICKNAME", &profile.name)],
        };
        vcard.into()
    }

    /// Learn, in the background, the profiles of people who just appeared in `room`
    /// for `account`; a picture found is announced to the account's resources there
    /// with a new presence carrying its hash (XEP-0153).
    pub(crate) fn learn_profiles(
        &self,
        network: NetworkId,
        account: Option<BareJid>,
        room: BareJid,
        viewer: BareJid,
        people: Vec<(String, String)>,
    ) {
        let Some(me) = self.me.get().and_then(std::sync::Weak::upgrade) else { return };
        if self.router.get().and_then(|r| r.network(&network)).is_none() {
            return;
        }
        tokio::spawn(async move {
            for (id, nick) in people {
                let key = (network.clone(), account.clone(), id.clone());
                if me.profiles.get(&key).is_some() {
                    continue;
                }
                let Some(profile) = me.profile(&network, account.as_ref(), &id).await else { continue };
                if profile.photo.is_some() {
                    me.announce_avatar(&room, &viewer, &nick).await;
                }
            }
        });
    }

    /// Send the occupant `nick`'s presence again, now with its avatar hash.
    async fn announce_avatar(&self, room: &BareJid, viewer: &BareJid, nick: &str) {
        let Some(domain) = self.domains_get(room.domain().as_str()) else { return };
        let profile_viewer = (!self.is_portal(room)).then(|| viewer.clone());
        let stanzas: Vec<Stanza> = {
            let rooms = self.rooms();
            let Some(session) = rooms.get(&(room.clone(), viewer.clone())) else { return };
            session
                .resources
                .iter()
                .filter_map(|res| self.other_presence(room, session, nick, profile_viewer.as_ref(), res, vec![]))
                .collect()
        };
        for s in stanzas {
            self.send(&domain, s).await;
        }
    }

    /// A presence subscription, unsubscription or probe sent to a person or to the
    /// gateway itself: subscriptions are accepted, and the entity's presence follows
    /// (capabilities, avatar hash, nickname). Puppets are shown available: they are
    /// reachable through the gateway (the network does not tell whether they are online).
    pub(crate) async fn presence_to_entity(&self, domain: &Domain, from: &Jid, to: &Jid, type_: PresenceType) {
        let to_bare = to.to_bare();
        let entity = if to.node().is_none() {
            None
        } else {
            match self.chat_of(domain, &Jid::from(to_bare.clone())) {
                Ok(chat) if chat.kind == ChatKind::Direct => Some(chat),
                _ => return,
            }
        };
        let reply = |t: PresenceType| {
            Stanza::Presence(Presence::new(t).with_from(Jid::from(to_bare.clone())).with_to(from.to_bare()))
        };
        match type_ {
            PresenceType::Subscribe => self.send(domain, reply(PresenceType::Subscribed)).await,
            PresenceType::Unsubscribe => return self.send(domain, reply(PresenceType::Unsubscribed)).await,
            PresenceType::Probe => {}
            _ => return,
        }
        let mut available = Presence::available().with_from(Jid::from(to_bare.clone())).with_to(from.to_bare());
        match entity {
            None => {
                let info = crate::disco::gateway(domain.kind, self.has_login(domain));
                available.payloads.extend(crate::disco::caps_payloads(&info));
            }
            Some(chat) => {
                let (name, profile) = self.person_name(&chat, &from.to_bare()).await;
                available.payloads.extend(self.person_payloads(&name, profile.as_deref(), true));
            }
        }
        self.send(domain, Stanza::Presence(available)).await;
    }
}

impl Gateway {
    /// The name a person goes by for `account`, as their profile says.
    async fn person_name(&self, chat: &ChatRef, account: &BareJid) -> (String, Option<Arc<CachedProfile>>) {
        let profile = self.profile(&chat.network, Some(account), chat.id.as_str()).await;
        (profile.as_ref().map(|p| p.name.clone()).unwrap_or_else(|| chat.id.0.clone()), profile)
    }

    /// Who occupant `nick` of `room` is, as `account` sees the room.
    fn occupant_person(&self, room: &BareJid, account: &BareJid, nick: &str) -> Option<crate::gateway::Person> {
        let rooms = self.rooms();
        let session = rooms.get(&(room.clone(), account.clone())).filter(|s| s.joined)?;
        if session.nick == nick {
            return Some(crate::gateway::Person {
                network: NetworkId::xmpp(),
                id: account.to_string(),
                real: Some(account.clone()),
            });
        }
        session.people.get(nick).cloned()
    }

    /// The vCard of the entity `to` (a room, a person, an occupant), for `from`.
    pub(crate) async fn vcard(&self, domain: &Domain, from: &Jid, to: &Jid) -> Result<Element, String> {
        let account = from.to_bare();
        if let Some(nick) = to.resource() {
            let person = self
                .occupant_person(&to.to_bare(), &account, nick.as_str())
                .ok_or("there is no one with this nick in the room, as far as you can see")?;
            if person.network.is_xmpp() {
                return Err("this is an XMPP user: ask their own server for their vCard".to_owned());
            }
            let viewer = (!self.is_portal(&to.to_bare())).then_some(&account);
            let profile = self
                .profile(&person.network, viewer, &person.id)
                .await
                .ok_or("this person's network is not running")?;
            return Ok(Self::person_vcard(&profile));
        }
        let chat = self.chat_of(domain, to)?;
        if chat.kind == ChatKind::Room {
            let name = match self.router.get().and_then(|r| r.network(&chat.network)) {
                Some(network) => network.display_name(&chat.id.0),
                None => chat.id.0.clone(),
            };
            return Ok(Self::person_vcard(&CachedProfile { name, photo: None }));
        }
        let (name, profile) = self.person_name(&chat, &account).await;
        Ok(Self::person_vcard(&profile.unwrap_or_else(|| Arc::new(CachedProfile { name, photo: None }))))
    }

    /// What the entity `to` answers to disco#info (the same answer its capabilities hash).
    pub(crate) async fn disco_info(
        &self,
        domain: &Domain,
        from: &Jid,
        to: &Jid,
    ) -> Result<tokio_xmpp::parsers::disco::DiscoInfoResult, String> {
        let Some(node) = to.node() else {
            return Ok(crate::disco::gateway(domain.kind, self.has_login(domain)));
        };
        let chat = self.chat_of(domain, to)?;
        match (chat.kind, to.resource()) {
            (ChatKind::Room, Some(nick)) => {
                self.occupant_person(&to.to_bare(), &from.to_bare(), nick.as_str())
                    .ok_or("there is no one with this nick in the room, as far as you can see")?;
                Ok(crate::disco::person(nick.as_str()))
            }
            (ChatKind::Room, None) => Ok(crate::disco::room(node.as_str())),
            (ChatKind::Service, _) => {
                let name = self.router.get().and_then(|r| r.network(&chat.network)).map(|n| n.display_name(&chat.id.0));
                Ok(crate::disco::service(&name.unwrap_or_else(|| chat.id.0.clone()), domain.kind))
            }
            _ => Ok(crate::disco::person(&self.person_name(&chat, &from.to_bare()).await.0)),
        }
    }
}

/// Fetch a picture a network gave by URL: bounded in size and time, through the
/// same fetcher as files, which refuses loopback, private and other special
/// addresses (the URL comes from a remote party) and ignores proxy settings.
async fn fetch(url: &str) -> Option<Vec<u8>> {
    static FETCHER: std::sync::OnceLock<isthmus_matrix::media::Fetcher> = std::sync::OnceLock::new();
    let fetcher = FETCHER.get_or_init(|| isthmus_matrix::media::Fetcher::new(false));
    match fetcher.fetch(url, MAX_AVATAR_BYTES as u64).await {
        Ok((bytes, _)) => Some(bytes),
        Err(e) => {
            warn!(url, error = %e, "cannot fetch a picture");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_xmpp::parsers::muc::user::{Affiliation, Item, MucUser, Role};

    #[test]
    fn avatar_ids_are_sha1_and_types_are_sniffed() {
        let hex: String = sha1(b"abc").expect("hash").iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "a9993e364706816aba3e25717850c26c9cd0d89d");
        assert_eq!(sniff_mime(b"\x89PNG\r\n\x1a\n...."), "image/png");
        assert_eq!(sniff_mime(b"\xff\xd8\xff\xe0"), "image/jpeg");
        assert_eq!(sniff_mime(b"GIF89a"), "image/gif");
        assert_eq!(sniff_mime(b"RIFF\0\0\0\0WEBPVP8 "), "image/webp");
        assert_eq!(sniff_mime(b"??"), "application/octet-stream");
    }

    #[tokio::test]
    async fn a_picture_on_a_loopback_address_is_never_fetched() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("listen");
        let port = listener.local_addr().expect("address").port();
        for url in [format!("http://127.0.0.1:{port}/a.png"), format!("http://localhost:{port}/a.png")] {
            assert_eq!(fetch(&url).await, None, "{url}");
        }
        let accepted = tokio::time::timeout(std::time::Duration::from_millis(300), listener.accept()).await;
        assert!(accepted.is_err(), "the fetcher connected to a loopback address");
    }

    #[test]
    fn the_real_jid_goes_on_the_item() {
        let room: Jid = "#c%irc.example.org@irc.example.org/bob".parse().expect("jid");
        let to: tokio_xmpp::parsers::jid::FullJid = "alice@example.org/r".parse().expect("jid");
        let user = MucUser::new().with_items(vec![Item::new(Affiliation::None, Role::Participant)]);
        let p = Presence::available().with_from(room).with_to(Jid::from(to)).with_payload(user);
        let real: BareJid = "bob%irc.example.org@irc.example.org".parse().expect("jid");
        let Stanza::Presence(p) = with_real_jid(Stanza::Presence(p), Some(&real)) else { panic!("a presence") };
        let x = p.payloads.iter().find(|e| e.is("x", ns::MUC_USER)).expect("muc#user");
        assert_eq!(x.get_child("item", ns::MUC_USER).and_then(|i| i.attr("jid")), Some(real.as_str()));
    }
}
