//! The gateway's XMPP side: turns stanzas from the component links into core
//! events for the router, and core events from the networks into stanzas.
//!
//! Each configured network is served on its own component domain. Rooms are
//! personal (one IRC connection per XMPP user), so room state is kept per
//! (room JID, XMPP account): which of the account's resources are in the room,
//! the nick the network gave, the occupants and the subject. The XMPP side is
//! itself a [`Network`] (named `xmpp`) so the router treats every side alike.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};

use async_trait::async_trait;
use isthmus_core::address::Escaping;
use isthmus_core::model::{
    Affiliation, ChatKind, ChatRef, Event, EventKind, LeaveKind, NetworkId, Occupant, Quote, Role, Sender,
};
use isthmus_core::network::{Capabilities, Confirmation, Delivered, DeliveryError, Network};
use isthmus_core::outbox::Receipt;
use isthmus_core::portal::Portals;
use isthmus_core::router::Router;
use isthmus_core::store::{ArchiveEntry, ArchiveQuery, RoomSessionRecord, next_archive_id};
use tokio::sync::mpsc;
use tokio_xmpp::Stanza;
use tokio_xmpp::parsers::delay::Delay;
use tokio_xmpp::parsers::disco::{DiscoInfoQuery, DiscoInfoResult};
use tokio_xmpp::parsers::forwarding::Forwarded;
use tokio_xmpp::parsers::iq::Iq;
use tokio_xmpp::parsers::jid::{BareJid, FullJid, Jid};
use tokio_xmpp::parsers::mam::{Fin, Query as MamQuery, Result_ as MamResult};
use tokio_xmpp::parsers::message::{Id, Lang, Message, MessageType};
use tokio_xmpp::parsers::minidom::Element;
use tokio_xmpp::parsers::muc::muc::History;
use tokio_xmpp::parsers::muc::user::{Item, MucUser, Status};
use tokio_xmpp::parsers::muc::{self, Muc};
use tokio_xmpp::parsers::ns;
use tokio_xmpp::parsers::presence::{Presence, Type as PresenceType};
use tokio_xmpp::parsers::rsm::{First, SetResult};
use tokio_xmpp::parsers::stanza_error::{DefinedCondition, ErrorType, StanzaError};
use tokio_xmpp::parsers::stanza_id::OriginId;
use tracing::{Instrument, debug, info, warn};

/// Whether an unavailable presence says the device's connection ended rather than
/// that its user left: the XMPP server sends one for each room the device was in,
/// with a status saying why. Prosody's is `Disconnected: ` and the reason: on
/// shutdown `Received SIGTERM` (or the admin's reason), for a dropped connection
/// `closed`, `read timeout`, `connection-timeout`, `Hibernating too long`…; a
/// client that leaves the room or logs out cleanly gets none.
fn connection_ended(p: &Presence) -> bool {
    p.statuses.values().any(|s| s.starts_with("Disconnected: "))
}

/// Rooms one XMPP account may be in on one gateway (each may hold a remote
/// connection and an archive): a join past it is refused with resource-constraint.
pub(crate) const MAX_ROOMS_PER_ACCOUNT: usize = 256;

/// Requests (iqs) being answered at once, over all domains.
pub(crate) const MAX_REQUESTS: usize = 256;

use crate::archive::Archive;
use crate::stanza::{self, bare, full};

/// One component domain and the network it serves.
#[derive(Debug, Clone)]
pub struct Domain {
    pub name: String,
    pub network: NetworkId,
    pub escaping: Escaping,
    /// Human name for disco (e.g. "IRC").
    pub kind: &'static str,
    /// Stay in remote rooms when the account's last device leaves (a bouncer).
    pub persistent: bool,
    /// How long the account stays in a remote room after its last device vanished
    /// without leaving (a bounce), waiting for a device to come back.
    pub reconnect_grace: std::time::Duration,
    /// JIDs and domains allowed to use this network; `"*"` is everyone, empty nobody.
    pub allow: Vec<String>,
    /// Bare JIDs with admin rights (`access.admins`): the admin commands (see `admin`).
    pub admins: Vec<String>,
    /// The state of the domain's link to the XMPP server, for the admin's link status.
    pub link: Arc<crate::admin::LinkState>,
    /// The gateway never waits on the link (see `link`): bounded by count.
    pub outgoing: OutgoingQueue,
}

pub use crate::outgoing::{Outgoing, OutgoingQueue};

/// Where one XMPP account stands in one room.
#[derive(Debug, Default)]
pub(crate) struct RoomSession {
    /// The network confirmed the join.
    pub(crate) joined: bool,
    /// The nick the network gave the account.
    pub(crate) nick: String,
    /// The nick the account asked for (to report status 210 when they differ).
    requested_nick: String,
    /// Resources in the room.
    pub(crate) resources: HashSet<FullJid>,
    /// Resources waiting for the network to confirm the join.
    pub(crate) pending: HashSet<FullJid>,
    pub(crate) occupants: BTreeMap<String, Occupant>,
    topic: Option<String>,
    /// The history each entering resource asked for (MUC `<history/>`).
    history: HashMap<FullJid, Option<History>>,
    /// The room key (IRC channel key) the join used.
    password: Option<String>,
    /// Restored from the store at start: the devices think they are still in the
    /// room, so the network's confirmation of the rejoin resends them its state.
    restored: bool,
    /// Who each occupant is, by nick: for real JIDs and profiles.
    pub(crate) people: HashMap<String, Person>,
    /// The account's join created the room on its network (status 201 on entering).
    created: bool,
    /// The account's own role, as the network last reported it (moderators may
    /// remove others' messages, XEP-0425).
    pub(crate) own_role: Role,
    /// When the last device vanished (a bounce): the account stays in the room for
    /// the domain's reconnect grace, then leaves unless a device came back.
    vanished_at: Option<std::time::Instant>,
}

/// Who an occupant is: their network, their id there, their real JID.
#[derive(Debug, Clone)]
pub(crate) struct Person {
    pub(crate) network: NetworkId,
    pub(crate) id: String,
    pub(crate) real: Option<BareJid>,
}

pub(crate) type RoomKey = (BareJid, BareJid); // (room, account)

/// The origin-ids (XEP-0359) of the last messages XMPP users sent, with the key
/// each got, so a resend is recognised. Bounded: the oldest are forgotten first.
/// (account, origin-id) → the message key it got.
type OriginKey = (BareJid, String);

#[derive(Default)]
struct RecentOrigins {
    /// The keys by origin-id, and the origin-ids oldest first (to forget the oldest).
    inner: Mutex<(HashMap<OriginKey, String>, std::collections::VecDeque<OriginKey>)>,
}

impl RecentOrigins {
    /// How many origin-ids are remembered.
    const CAPACITY: usize = 20_000;

    /// The key of an earlier message from `account` with this origin-id.
    fn key_of(&self, account: &BareJid, origin_id: &str) -> Option<String> {
        let guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        guard.0.get(&(account.clone(), origin_id.to_owned())).cloned()
    }

    /// Remember that the message with this origin-id was bridged under `key`.
    fn remember(&self, account: &BareJid, origin_id: &str, key: &str) {
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (map, order) = &mut *guard;
        let id = (account.clone(), origin_id.to_owned());
        if map.insert(id.clone(), key.to_owned()).is_some() {
            return;
        }
        order.push_back(id);
        if order.len() > Self::CAPACITY
            && let Some(old) = order.pop_front()
        {
            map.remove(&old);
        }
    }
}

/// The XMPP side of the gateway.
pub struct Gateway {
    domains: HashMap<String, Domain>,
    by_network: HashMap<NetworkId, String>,
    pub(crate) router: OnceLock<Router>,
    rooms: Mutex<HashMap<RoomKey, RoomSession>>,
    id: NetworkId,
    pub(crate) archive: Archive,
    /// Messages replayed on join when the client does not say how many.
    default_history: u32,
    /// Origin-ids of recent messages from XMPP users, to recognise resends.
    recent_origins: RecentOrigins,
    /// Room sessions to store, in order (written by one task).
    session_log: OnceLock<mpsc::UnboundedSender<(String, String, Option<RoomSessionRecord>)>>,
    /// Portal rooms: group chats shared by every XMPP user, linked by the router to
    /// rooms on other networks. Their chat is spelled on the XMPP side (the room JID).
    portals: Portals,
    /// People's profiles (names, pictures), as the networks gave them.
    pub(crate) profiles: crate::puppet::Profiles,
    /// The gateway itself, for background tasks.
    pub(crate) me: OnceLock<std::sync::Weak<Gateway>>,
}

pub(crate) fn muc_role(role: Role) -> muc::user::Role {
    match role {
        Role::Moderator => muc::user::Role::Moderator,
        Role::Participant => muc::user::Role::Participant,
        Role::Visitor => muc::user::Role::Visitor,
    }
}

pub(crate) fn muc_affiliation(a: Affiliation) -> muc::user::Affiliation {
    match a {
        Affiliation::Owner => muc::user::Affiliation::Owner,
        Affiliation::Admin => muc::user::Affiliation::Admin,
        Affiliation::Member => muc::user::Affiliation::Member,
        Affiliation::None => muc::user::Affiliation::None,
        Affiliation::Outcast => muc::user::Affiliation::Outcast,
    }
}

/// An occupant presence from `room/nick`.
pub(crate) fn occupant_presence(
    from: Jid,
    to: &FullJid,
    item: Item,
    statuses: Vec<Status>,
    unavailable: bool,
) -> Stanza {
    let p = if unavailable { Presence::unavailable() } else { Presence::available() };
    let muc_user = MucUser::new().with_items(vec![item]).with_statuses(statuses);
    Stanza::Presence(p.with_from(from).with_to(Jid::from(to.clone())).with_payload(muc_user))
}

impl Gateway {
    pub fn new(domains: Vec<Domain>, archive: Archive, default_history: u32) -> Arc<Gateway> {
        Self::with_portals(domains, archive, default_history, Portals::in_memory())
    }

    /// A gateway also serving the portal rooms of `portals` (room JIDs on its domains).
    pub fn with_portals(
        domains: Vec<Domain>,
        archive: Archive,
        default_history: u32,
        portals: Portals,
    ) -> Arc<Gateway> {
        let by_network = domains.iter().map(|d| (d.network.clone(), d.name.clone())).collect();
        let gateway = Arc::new(Gateway {
            domains: domains.into_iter().map(|d| (d.name.clone(), d)).collect(),
            by_network,
            router: OnceLock::new(),
            rooms: Mutex::new(HashMap::new()),
            id: NetworkId::xmpp(),
            archive,
            default_history,
            session_log: OnceLock::new(),
            recent_origins: RecentOrigins::default(),
            portals,
            profiles: crate::puppet::Profiles::new(),
            me: OnceLock::new(),
        });
        let _ = gateway.me.set(Arc::downgrade(&gateway));
        gateway
    }

    /// The domain named `name`, if the gateway serves it.
    pub(crate) fn domains_get(&self, name: &str) -> Option<Domain> {
        self.domains.get(name).cloned()
    }

    /// Whether the gateway serves the domain `name`.
    pub(crate) fn serves(&self, name: &str) -> bool {
        self.domains.contains_key(name)
    }

    /// Connect the gateway to the router (once, after the router is built), and
    /// start storing room sessions through the router's store.
    pub fn attach(&self, router: Router) {
        let (tx, mut rx) = mpsc::unbounded_channel::<(String, String, Option<RoomSessionRecord>)>();
        let store = router.store().clone();
        tokio::spawn(async move {
            while let Some((room, account, record)) = rx.recv().await {
                let mut delay = std::time::Duration::from_millis(50);
                loop {
                    let result = match &record {
                        Some(r) => store.upsert_room_session(r).await,
                        None => store.delete_room_session(&room, &account).await,
                    };
                    match result {
                        Ok(()) => break,
                        Err(e) => {
                            warn!(error = %e, room, account, "cannot store the room session; retrying");
                            tokio::time::sleep(delay).await;
                            delay = (delay * 2).min(std::time::Duration::from_secs(5));
                        }
                    }
                }
            }
        });
        let _ = self.session_log.set(tx);
        let _ = self.router.set(router);
    }

    /// Store where `account` stands in `room` now (or that it left).
    pub(crate) fn save_session(&self, room: &BareJid, account: &BareJid) {
        let record = self.rooms().get(&(room.clone(), account.clone())).map(|s| {
            let mut resources: Vec<String> =
                s.resources.iter().chain(s.pending.iter()).map(|r| r.to_string()).collect();
            resources.sort();
            resources.dedup();
            RoomSessionRecord {
                room: room.to_string(),
                account: account.to_string(),
                nick: if s.nick.is_empty() { s.requested_nick.clone() } else { s.nick.clone() },
                password: s.password.clone(),
                resources,
            }
        });
        if let Some(log) = self.session_log.get() {
            let _ = log.send((room.to_string(), account.to_string(), record));
        }
    }

    /// Rejoin, after a restart, every room accounts were in: the devices keep their
    /// place (they never saw the gateway go) and get the room's state again once the
    /// network confirms. Returns how many sessions were restored.
    pub async fn restore_sessions(&self) -> usize {
        let Some(router) = self.router.get() else { return 0 };
        let records = match router.store().room_sessions().await {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "cannot read the room sessions; rooms are not rejoined");
                return 0;
            }
        };
        let mut restored = 0;
        for r in records {
            let (Ok(room), Ok(account)) = (BareJid::new(&r.room), BareJid::new(&r.account)) else { continue };
            let domain = room.domain().to_string();
            let Some(domain) = self.domains.get(&domain).cloned() else {
                debug!(room = %room, "stored room session for a domain no longer configured; dropped");
                self.save_session(&room, &account);
                continue;
            };
            let chat = match self.chat_of(&domain, &Jid::from(room.clone())) {
                Ok(c) if c.kind == ChatKind::Room => c,
                _ => continue,
            };
            let resources: HashSet<FullJid> = r.resources.iter().filter_map(|j| FullJid::new(j).ok()).collect();
            {
                let mut rooms = self.rooms();
                let session = rooms.entry((room.clone(), account.clone())).or_default();
                session.joined = true;
                session.restored = true;
                session.nick = r.nick.clone();
                session.requested_nick = r.nick.clone();
                session.password = r.password.clone();
                for res in &resources {
                    session.history.insert(res.clone(), Some(History::new().with_maxstanzas(0)));
                }
                session.resources = resources;
            }
            // It had no device left when the gateway stopped: it was waiting for one to
            // come back, and waits again (persistent channels wait for good).
            let vanished = r.resources.is_empty() && !domain.persistent;
            let since = std::time::Instant::now();
            if vanished && let Some(s) = self.rooms().get_mut(&(room.clone(), account.clone())) {
                s.vanished_at = Some(since);
            }
            info!(account = %account, room = %room, nick = %r.nick, "rejoining room after restart");
            let event = self.user_event(
                chat,
                &account,
                r.nick.clone(),
                EventKind::JoinRequest { nick: r.nick, password: r.password },
            );
            if let Some(e) = self.route(event).await.and_then(|rep| rep.first_error().cloned()) {
                warn!(account = %account, room = %room, error = %e, "cannot rejoin room after restart");
                self.rooms().remove(&(room.clone(), account.clone()));
                self.save_session(&room, &account);
                continue;
            }
            if vanished {
                self.leave_after_grace(&domain, room, account, since);
            }
            restored += 1;
        }
        restored
    }

    pub(crate) fn rooms(&self) -> std::sync::MutexGuard<'_, HashMap<RoomKey, RoomSession>> {
        self.rooms.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) async fn send(&self, domain: &Domain, stanza: Stanza) {
        self.send_after(domain, stanza, None);
    }

    /// Queue a stanza that is written only once `receipt` is confirmed.
    fn send_after(&self, domain: &Domain, stanza: Stanza, receipt: Option<Receipt>) {
        domain.outgoing.push(&domain.name, stanza, receipt);
    }

    async fn send_all(&self, domain: &Domain, stanzas: Vec<Stanza>) {
        self.send_all_after(domain, stanzas, None);
    }

    /// Queue stanzas in order, the first one carrying `receipt` (the rest follow it).
    fn send_all_after(&self, domain: &Domain, stanzas: Vec<Stanza>, mut receipt: Option<Receipt>) {
        for s in stanzas {
            self.send_after(domain, s, receipt.take());
        }
    }

    /// The room or contact JID of a chat on a network.
    pub(crate) fn chat_jid(&self, chat: &ChatRef) -> Option<(Domain, BareJid)> {
        if chat.network.is_xmpp() {
            // A portal room: the chat is the room's JID itself.
            let jid = BareJid::new(chat.id.as_str()).ok()?;
            let domain = self.domains.get(jid.domain().as_str())?.clone();
            return Some((domain, jid));
        }
        let domain = self.domains.get(self.by_network.get(&chat.network)?)?.clone();
        if chat.id.as_str().is_empty() {
            // The network itself (notices about the account): the domain's own JID.
            let jid = BareJid::new(&domain.name).ok()?;
            return Some((domain, jid));
        }
        let local = domain.escaping.to_localpart(chat.id.as_str()).ok()?;
        let jid = bare(&local, &domain.name)?;
        Some((domain, jid))
    }

    /// Tell every device in a room on `domain` about its link to the XMPP server: a
    /// groupchat notice from the room itself, stamped `at`. Queued behind what the
    /// link already holds, so a notice of the loss, sent while the link is down,
    /// reaches the devices first once it is back, before what was said meanwhile.
    /// Returns how many devices it was sent to.
    pub fn link_notice(&self, domain: &str, text: &str, at: std::time::SystemTime) -> usize {
        let Some(domain) = self.domains.get(domain) else { return 0 };
        let sessions: Vec<(BareJid, Vec<FullJid>)> = self
            .rooms()
            .iter()
            .filter(|((room, _), s)| room.domain().as_str() == domain.name && s.joined)
            .map(|((room, _), s)| (room.clone(), s.resources.iter().cloned().collect()))
            .collect();
        let mut sent = 0;
        for (room, resources) in sessions {
            for res in resources {
                let mut m = stanza::message(MessageType::Groupchat, Jid::from(room.clone()), Jid::from(res), text);
                m.id = Some(stanza::new_id());
                if let Some(delay) = stanza::delay(at, &room) {
                    m.payloads.push(delay.into());
                }
                self.send_after(domain, Stanza::Message(m), None);
                sent += 1;
            }
        }
        sent
    }

    /// Handle one stanza that arrived on `domain`'s link.
    pub async fn handle(self: &Arc<Self>, domain: &str, stanza: Stanza) {
        let Some(domain) = self.domains.get(domain).cloned() else { return };
        match stanza {
            Stanza::Presence(p) => self.handle_presence(&domain, p).await,
            Stanza::Message(m) => self.handle_message(&domain, m).await,
            // A request is answered on its own task: one that waits on a remote server
            // (a login to a slow homeserver, an IRC LIST) holds up no other stanza of the
            // domain. At most MAX_REQUESTS at once; past them, `resource-constraint`.
            Stanza::Iq(iq) => {
                static REQUESTS: OnceLock<Arc<tokio::sync::Semaphore>> = OnceLock::new();
                let requests = REQUESTS.get_or_init(|| Arc::new(tokio::sync::Semaphore::new(MAX_REQUESTS)));
                match requests.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let gateway = self.clone();
                        let task = async move {
                            gateway.handle_iq(&domain, iq).await;
                            drop(permit);
                        };
                        tokio::spawn(task.in_current_span());
                    }
                    Err(_) => {
                        if let Iq::Get { from: Some(from), to: Some(to), id, .. }
                        | Iq::Set { from: Some(from), to: Some(to), id, .. } = iq
                        {
                            warn!(%from, "too many requests at once; one refused");
                            let text = "too many requests are being answered: try again in a moment";
                            let err =
                                StanzaError::new(ErrorType::Wait, DefinedCondition::ResourceConstraint, "en", text);
                            self.send(&domain, Stanza::Iq(Iq::from_error(id, err).with_to(from).with_from(to))).await;
                        }
                    }
                }
            }
        }
    }

    /// Whether `jid` may use `domain`'s network: its bare JID or its domain is listed.
    pub(crate) fn allowed(domain: &Domain, jid: &Jid) -> bool {
        admits(&domain.allow, jid)
    }

    pub(crate) const NOT_ALLOWED: &'static str =
        "you are not allowed to use this gateway; ask its admin to add your address";

    /// Interpret the localpart of a JID on `domain` as a chat of its network.
    pub(crate) fn chat_of(&self, domain: &Domain, to: &Jid) -> Result<ChatRef, String> {
        let room = to.to_bare();
        if self.portals.is_room(room.as_str()) {
            return Ok(ChatRef::room(NetworkId::xmpp(), room.to_string()));
        }
        let node = to.node().ok_or_else(|| "this address is the gateway itself, not a room or person".to_owned())?;
        let id = domain.escaping.from_localpart(node.as_str()).map_err(|e| e.to_string())?;
        let router = self.router.get().ok_or("the gateway is starting")?;
        let network = router.network(&domain.network).ok_or("this network is not running")?;
        let kind = network.chat_kind(&id).ok_or_else(|| format!("`{id}` is not a valid address on {}", domain.kind))?;
        Ok(ChatRef { network: domain.network.clone(), kind, id: isthmus_core::model::RemoteId::new(id) })
    }

    async fn handle_presence(&self, domain: &Domain, p: Presence) {
        if matches!(p.type_, PresenceType::Subscribe | PresenceType::Unsubscribe | PresenceType::Probe) {
            // Subscriptions and probes (from bare JIDs) to people and to the gateway itself.
            if let (Some(from), Some(to)) = (&p.from, &p.to)
                && Self::allowed(domain, from)
            {
                self.presence_to_entity(domain, from, to, p.type_.clone()).await;
            }
            return;
        }
        let (Some(from), Some(to)) = (p.from.clone().and_then(|j| j.try_into_full().ok()), p.to.clone()) else {
            return;
        };
        let account = from.to_bare();
        if p.type_ == PresenceType::None && !Self::allowed(domain, &Jid::from(from.clone())) {
            let s = stanza::presence_error(
                to,
                Jid::from(from),
                ErrorType::Auth,
                DefinedCondition::Forbidden,
                Self::NOT_ALLOWED,
            );
            return self.send(domain, s).await;
        }
        match p.type_ {
            PresenceType::None => {}
            // A device gone with its connection (its server shutting down, the connection
            // dropped) did not leave: it is not told, and the account may stay for the grace.
            PresenceType::Unavailable => return self.leave(domain, &from, &to, !connection_ended(&p)).await,
            PresenceType::Error => return self.bounced(domain, &from, &to, &p.payloads).await,
            // Subscription answers and the rest need no answer.
            _ => return,
        }
        let Some(muc) = p.payloads.iter().find(|e| e.is("x", ns::MUC)).and_then(|e| Muc::try_from(e.clone()).ok())
        else {
            // Inside a room, presence to another nick is a nick change; otherwise a status change.
            return self.change_nick(domain, &from, &to).await;
        };
        let chat = match self.chat_of(domain, &to) {
            Ok(c) if c.kind == ChatKind::Room => c,
            Ok(_) => {
                let s = stanza::presence_error(
                    to.clone(),
                    Jid::from(from),
                    ErrorType::Cancel,
                    DefinedCondition::ItemNotFound,
                    "this address is not a room",
                );
                return self.send(domain, s).await;
            }
            Err(text) => {
                let s = stanza::presence_error(
                    to.clone(),
                    Jid::from(from),
                    ErrorType::Modify,
                    DefinedCondition::JidMalformed,
                    &text,
                );
                return self.send(domain, s).await;
            }
        };
        let room = to.to_bare();
        let Some(nick) = to.resource().map(|r| r.as_str().to_owned()) else {
            let s = stanza::presence_error(
                to.clone(),
                Jid::from(from),
                ErrorType::Modify,
                DefinedCondition::JidMalformed,
                "a nickname is required to join",
            );
            return self.send(domain, s).await;
        };
        if self.is_portal(&room) && self.nick_taken(&room, &account, &nick) {
            let s = stanza::presence_error(
                to.clone(),
                Jid::from(from),
                ErrorType::Cancel,
                DefinedCondition::Conflict,
                "this nickname is already used in the room",
            );
            return self.send(domain, s).await;
        }
        let new_room = !self.rooms().contains_key(&(room.clone(), account.clone()));
        if new_room && self.rooms().keys().filter(|(_, a)| *a == account).count() >= MAX_ROOMS_PER_ACCOUNT {
            let text = format!("you are in {MAX_ROOMS_PER_ACCOUNT} rooms of this gateway already: leave one first");
            let s = stanza::presence_error(
                to,
                Jid::from(from),
                ErrorType::Wait,
                DefinedCondition::ResourceConstraint,
                &text,
            );
            return self.send(domain, s).await;
        }
        let already = {
            let mut rooms = self.rooms();
            let session = rooms.entry((room.clone(), account.clone())).or_default();
            session.history.insert(from.clone(), muc.history.clone());
            if session.joined {
                session.resources.insert(from.clone());
                true
            } else {
                let first = session.pending.is_empty();
                session.pending.insert(from.clone());
                session.requested_nick = nick.clone();
                session.password = muc.password.clone();
                !first // a join is already under way for this account
            }
        };
        self.save_session(&room, &account);
        if already {
            return self.enter(domain, &room, &account, &[from]).await;
        }
        info!(account = %account, room = %room, nick, "joining room");
        let event =
            self.user_event(chat, &account, nick.clone(), EventKind::JoinRequest { nick, password: muc.password });
        let report = self.route(event).await;
        if let Some(e) = report.and_then(|r| r.first_error().cloned()) {
            self.rooms().remove(&(room.clone(), account.clone()));
            self.save_session(&room, &account);
            let condition = match e {
                DeliveryError::Forbidden(_) => DefinedCondition::Forbidden,
                DeliveryError::Unavailable(_) => DefinedCondition::RemoteServerNotFound,
                _ => DefinedCondition::NotAcceptable,
            };
            let s = stanza::presence_error(to, Jid::from(from), ErrorType::Cancel, condition, &e.to_string());
            self.send(domain, s).await;
        }
    }

    /// A joined resource asked for another nick (XEP-0045 §7.6): ask the network;
    /// the change shows when the network confirms it (status 303).
    async fn change_nick(&self, domain: &Domain, from: &FullJid, to: &Jid) {
        let Some(new_nick) = to.resource().map(|r| r.to_string()) else { return };
        let room = to.to_bare();
        let account = from.to_bare();
        let current = self
            .rooms()
            .get(&(room.clone(), account.clone()))
            .filter(|s| s.joined && s.resources.contains(from))
            .map(|s| s.nick.clone());
        let (Some(current), Ok(chat)) = (current, self.chat_of(domain, to)) else { return };
        if current == new_nick {
            return;
        }
        if self.is_portal(&room) {
            let s = stanza::presence_error(
                to.clone(),
                Jid::from(from.clone()),
                ErrorType::Cancel,
                DefinedCondition::NotAcceptable,
                "nick changes are not supported in shared rooms yet: leave and join again with the new nick",
            );
            return self.send(domain, s).await;
        }
        let event = self.user_event(chat, &account, current, EventKind::NickChanged { new_nick });
        if let Some(e) = self.route(event).await.and_then(|r| r.first_error().cloned()) {
            // §7.6: a nick someone else has is a conflict; the nick stays.
            let condition = match e {
                DeliveryError::Conflict(_) => DefinedCondition::Conflict,
                _ => DefinedCondition::NotAcceptable,
            };
            let s = stanza::presence_error(
                to.clone(),
                Jid::from(from.clone()),
                ErrorType::Cancel,
                condition,
                &e.to_string(),
            );
            self.send(domain, s).await;
        }
    }

    /// An event from `account` about `chat`. Personal chats carry the account (the
    /// network acts for it); portal rooms are shared, so the sender alone says who.
    pub(crate) fn user_event(&self, chat: ChatRef, account: &BareJid, nick: String, kind: EventKind) -> Event {
        let portal = chat.network.is_xmpp();
        let event = Event::new(NetworkId::xmpp(), chat, Sender::own(account.to_string(), nick), kind);
        if portal { event } else { event.with_account(account.clone()) }
    }

    /// The network domain named `name`.
    pub(crate) fn domain(&self, name: &str) -> Option<&Domain> {
        self.domains.get(name)
    }

    /// The router, once attached.
    pub(crate) fn router(&self) -> Option<&isthmus_core::router::Router> {
        self.router.get()
    }

    /// The portal directory (shared with the router).
    pub(crate) fn portal_directory(&self) -> &Portals {
        &self.portals
    }

    /// Whether `room` is a portal room.
    pub(crate) fn is_portal(&self, room: &BareJid) -> bool {
        self.portals.is_room(room.as_str())
    }

    /// Whether someone other than `account` is `nick` in portal `room`.
    fn nick_taken(&self, room: &BareJid, account: &BareJid, nick: &str) -> bool {
        self.rooms()
            .iter()
            .filter(|((r, _), s)| r == room && s.joined)
            .any(|((_, a), s)| a != account && (s.nick == nick || s.occupants.contains_key(nick)))
    }

    /// An event of a portal room from another network (no account: the room is
    /// shared): every XMPP account in the room sees it. The join confirmation and
    /// refusal are for the account that asked (the sender).
    async fn deliver_portal(&self, event: Event) -> Result<Delivered, DeliveryError> {
        let (domain, room) = self
            .chat_jid(&event.chat)
            .ok_or_else(|| DeliveryError::Rejected(format!("`{}` is not a room of this gateway", event.chat.id)))?;
        let key = event.key.0.clone();
        match &event.kind {
            EventKind::SelfJoined { .. } | EventKind::JoinFailed { .. } => {
                let account = BareJid::new(event.sender.id.as_str())
                    .map_err(|_| DeliveryError::Rejected("a join answer must name the XMPP account".into()))?;
                if self.rooms().get(&(room.clone(), account.clone())).is_some_and(|s| s.joined) {
                    // A portal on several networks: each answers the join; the first
                    // answer entered the room, the others bring their people.
                    self.more_occupants(&domain, &room, &account, &event);
                    return Ok(Delivered::ids(vec![key]));
                }
                let mut copy = event.clone();
                copy.account = Some(account.clone());
                let joined = matches!(event.kind, EventKind::SelfJoined { .. });
                if let EventKind::SelfJoined { occupants, .. } = &mut copy.kind {
                    // The other XMPP users in the room are occupants too.
                    let others: Vec<Occupant> = self
                        .rooms()
                        .iter()
                        .filter(|((r, a), s)| r == &room && a != &account && s.joined)
                        .map(|((_, a), s)| Occupant {
                            id: isthmus_core::model::RemoteId::new(a.to_string()),
                            nick: s.nick.clone(),
                            role: Role::Participant,
                            affiliation: Affiliation::Member,
                        })
                        .collect();
                    occupants.extend(others);
                }
                let (stanzas, entering) = self.render(&copy, &room)?;
                self.send_all_after(&domain, stanzas, event.receipt.clone());
                self.save_session(&room, &account);
                self.enter(&domain, &room, &account, &entering).await;
                if joined {
                    let nick = match &event.kind {
                        EventKind::SelfJoined { nick, .. } => nick.clone(),
                        _ => String::new(),
                    };
                    let occupant = Occupant {
                        id: isthmus_core::model::RemoteId::new(account.to_string()),
                        nick: nick.clone(),
                        role: Role::Participant,
                        affiliation: Affiliation::Member,
                    };
                    let arrival = Event::new(
                        NetworkId::xmpp(),
                        event.chat.clone(),
                        Sender::new(account.to_string(), nick),
                        EventKind::Joined { occupant },
                    );
                    self.portal_fanout(&domain, &room, &arrival, &account);
                }
            }
            _ => {
                // Shared: archived once for everyone, whoever is in the room now.
                self.archive_event(&event, &room, None);
                let mut receipt = event.receipt.clone();
                for account in self.portal_accounts(&room, None) {
                    let mut copy = event.clone();
                    // About one of the XMPP users (a puppet kicked on the other side): their
                    // own event for them, someone else's for the others.
                    copy.sender.is_self = event.sender.is_self && event.sender.id.as_str() == account.as_str();
                    copy.account = Some(account.clone());
                    let (stanzas, _) = self.render(&copy, &room)?;
                    self.send_all_after(&domain, stanzas, receipt.take());
                    if copy.sender.is_self && matches!(copy.kind, EventKind::Left { .. }) {
                        self.save_session(&room, &account);
                    }
                }
                if let Some(r) = receipt {
                    r.confirm().await;
                }
            }
        }
        Ok(Delivered::ids(vec![key]))
    }

    /// Another member network's answer to a join already answered: its occupants
    /// enter the room for `account` (a refusal is only logged: the room is joined).
    fn more_occupants(&self, domain: &Domain, room: &BareJid, account: &BareJid, event: &Event) {
        let EventKind::SelfJoined { occupants, .. } = &event.kind else {
            if let EventKind::JoinFailed { reason } = &event.kind {
                warn!(room = %room, network = %event.origin, reason, "a portal member refused a join the room already had");
            }
            return;
        };
        for occupant in occupants {
            let known = self
                .rooms()
                .get(&(room.clone(), account.clone()))
                .is_some_and(|s| s.occupants.contains_key(&occupant.nick));
            if known {
                continue;
            }
            let mut arrival = Event::new(
                event.origin.clone(),
                event.chat.clone(),
                Sender::new(occupant.id.as_str(), occupant.nick.clone()),
                EventKind::Joined { occupant: occupant.clone() },
            );
            arrival.account = Some(account.clone());
            match self.render(&arrival, room) {
                Ok((stanzas, _)) => self.send_all_after(domain, stanzas, None),
                Err(e) => debug!(error = %e, "an occupant of another portal member could not be shown"),
            }
        }
    }

    /// The accounts with a session in portal `room`, but `except`.
    fn portal_accounts(&self, room: &BareJid, except: Option<&BareJid>) -> Vec<BareJid> {
        self.rooms()
            .iter()
            .filter(|((r, a), s)| r == room && s.joined && Some(a) != except)
            .map(|((_, a), _)| a.clone())
            .collect()
    }

    /// Show what one XMPP user did in portal `room` to the other XMPP users there
    /// (the router only carries it to the other networks).
    pub(crate) fn portal_fanout(&self, domain: &Domain, room: &BareJid, event: &Event, from_account: &BareJid) {
        if !self.is_portal(room) {
            return;
        }
        for account in self.portal_accounts(room, Some(from_account)) {
            let mut copy = event.clone();
            copy.account = Some(account.clone());
            copy.receipt = None;
            // Someone else's action, as this account sees it.
            copy.sender.is_self = false;
            let mut out = Vec::new();
            let mut entering = Vec::new();
            self.render_room(&copy, &account, room, &mut out, &mut entering);
            self.send_all_after(domain, out, None);
        }
    }

    pub(crate) async fn route(&self, event: Event) -> Option<isthmus_core::router::RouteReport> {
        Some(self.router.get()?.route(event).await)
    }

    /// What a resource gets when it enters a joined room: every occupant, then
    /// itself (110, and 210 when the network changed the nick), then history
    /// from the archive, then the subject.
    async fn enter(&self, domain: &Domain, room: &BareJid, account: &BareJid, resources: &[FullJid]) {
        let key = (room.clone(), account.clone());
        let created = self.rooms().get_mut(&key).is_some_and(|s| std::mem::take(&mut s.created));
        let viewer = (!self.is_portal(room)).then(|| account.clone());
        for res in resources {
            let (presences, history, topic) = {
                let mut rooms = self.rooms();
                let Some(session) = rooms.get_mut(&key) else { return };
                let mut out = Vec::new();
                for nick in session.occupants.keys() {
                    out.extend(self.other_presence(room, session, nick, viewer.as_ref(), res, vec![]));
                }
                if let Some(from) = full(room, &session.nick) {
                    let item =
                        Item::new(muc::user::Affiliation::None, muc::user::Role::Participant).with_jid(res.clone());
                    let mut codes = vec![Status::NonAnonymousRoom, Status::SelfPresence];
                    if session.nick != session.requested_nick {
                        codes.push(Status::AssignedNick);
                    }
                    if created {
                        codes.push(Status::RoomHasBeenCreated);
                    }
                    out.push(occupant_presence(Jid::from(from), res, item, codes, false));
                }
                (out, session.history.remove(res).flatten(), session.topic.clone())
            };
            // History is what was said before the device entered: a message it sends
            // right after its self-presence is already live, not history too.
            let entered_us = isthmus_core::store::now_us();
            self.send_all(domain, presences).await;
            for m in self.history(room, account, res, history, entered_us).await {
                self.send(domain, Stanza::Message(m)).await;
            }
            let mut subject = Message::groupchat(Some(Jid::from(res.clone())));
            subject.from = Some(Jid::from(room.clone()));
            subject.id = Some(stanza::new_id());
            subject.subjects.insert(Lang::default(), topic.unwrap_or_default());
            self.send(domain, Stanza::Message(subject)).await;
        }
    }

    /// Who the person with `id` on `network` is, with their real JID.
    fn person(&self, network: &NetworkId, id: &str) -> Person {
        Person { network: network.clone(), id: id.to_owned(), real: self.real_jid(network, id) }
    }

    /// What `network` renders natively, if it runs.
    pub(crate) fn capabilities_of(&self, network: &NetworkId) -> Option<Capabilities> {
        Some(self.router.get()?.network(network)?.capabilities())
    }

    /// The available presence of occupant `nick` (someone other than the account) for
    /// `to`: their standing, real JID (the room is not anonymous), capabilities and
    /// avatar hash as far as their profile is known (`viewer`: whose view of it).
    pub(crate) fn other_presence(
        &self,
        room: &BareJid,
        session: &RoomSession,
        nick: &str,
        viewer: Option<&BareJid>,
        to: &FullJid,
        codes: Vec<Status>,
    ) -> Option<Stanza> {
        let o = session.occupants.get(nick)?;
        let from = full(room, nick)?;
        let item = Item::new(muc_affiliation(o.affiliation), muc_role(o.role));
        let person = session.people.get(nick);
        let mut p = crate::puppet::with_real_jid(
            occupant_presence(Jid::from(from), to, item, codes, false),
            person.and_then(|p| p.real.as_ref()),
        );
        let profile = person
            .filter(|p| !p.network.is_xmpp())
            .and_then(|p| self.profiles.get(&(p.network.clone(), viewer.cloned(), p.id.clone())));
        if let Stanza::Presence(presence) = &mut p {
            presence.payloads.extend(self.person_payloads(nick, profile.as_deref(), false));
        }
        Some(p)
    }

    /// The history a resource asked for on join, as delayed groupchat messages:
    /// what the archive holds from before `until_us`.
    async fn history(
        &self,
        room: &BareJid,
        account: &BareJid,
        to: &FullJid,
        asked: Option<History>,
        until_us: i64,
    ) -> Vec<Message> {
        let asked = asked.unwrap_or_default();
        let max = asked.maxstanzas.unwrap_or(self.default_history);
        if max == 0 || asked.maxchars == Some(0) {
            return Vec::new();
        }
        let mut start_us = asked.seconds.map(|s| isthmus_core::store::now_us() - i64::from(s) * 1_000_000);
        if let Some(since) = &asked.since {
            let t = since.0.timestamp_micros();
            start_us = Some(start_us.map_or(t, |s| s.max(t)));
        }
        // The newest `max` entries, a page at a time from the newest backwards.
        let mut entries = Vec::new();
        let mut before = None;
        while entries.len() < max as usize {
            let q = ArchiveQuery {
                room: room.to_string(),
                owner: Some(account.to_string()),
                start_us,
                end_us: Some(until_us),
                last_page: before.is_none(),
                before: before.clone(),
                max: max - entries.len() as u32,
                ..Default::default()
            };
            let page = match self.archive.query(&q).await {
                Ok(page) => page,
                Err(e) => {
                    warn!(error = %e, room = %room, "history on join unavailable");
                    return Vec::new();
                }
            };
            let done = page.complete || page.entries.is_empty();
            before = page.first.clone();
            let mut older = page.entries;
            older.append(&mut entries);
            entries = older;
            if done {
                break;
            }
        }
        if let Some(maxchars) = asked.maxchars {
            // Keep the newest messages whose bodies fit in maxchars.
            let mut total = 0usize;
            let keep = entries
                .iter()
                .rev()
                .take_while(|e| {
                    total += e.body.chars().count();
                    total <= maxchars as usize
                })
                .count();
            entries.drain(..entries.len() - keep);
        }
        entries.iter().filter_map(|e| archived_message(e, room, Jid::from(to.clone()))).collect()
    }

    /// Record a message from another network in `room`'s archive of `owner` (`None`:
    /// the room's shared archive); a retraction removes its target from it.
    fn archive_event(&self, event: &Event, room: &BareJid, owner: Option<&BareJid>) {
        if let EventKind::Retraction { target, .. } = &event.kind {
            // Withdrawn or removed on its network: the archive forgets it too.
            self.archive.forget(room.as_str(), owner.map(|o| o.as_str()), &target.0);
            return;
        }
        let EventKind::Message(msg) = &event.kind else { return };
        let body = stanza::rendered_body(msg);
        let sender_jid = event.sender.id.as_str().to_owned();
        // The sender's contact JID on the gateway (in a portal, on the network they came from).
        let network = Self::people_network(&event.chat.network, &event.origin);
        let puppet = self.chat_jid(&ChatRef::direct(network, sender_jid)).map(|(_, j)| j.to_string());
        let origin_id = event.origin_ids.first().cloned();
        let entry = archive_entry(room, owner, &event.key.0, origin_id, &event.sender.nick, puppet, &body, event.time);
        self.archive.record(entry);
    }

    /// The XMPP server bounced what the gateway sent to a device in a room. A
    /// permanent error (the device went offline, e.g. while the gateway was down and
    /// its sessions were restored) means it is no longer there: it leaves the room,
    /// as XEP-0045 services do, and the gateway stops sending to it.
    async fn bounced(&self, domain: &Domain, device: &FullJid, to: &Jid, payloads: &[Element]) {
        let permanent = payloads
            .iter()
            .filter(|p| p.name() == "error")
            .filter_map(|p| StanzaError::try_from(p.clone()).ok())
            .any(|e| e.type_ == ErrorType::Cancel);
        if permanent {
            debug!(device = %device, room = %to.to_bare(), "the device is gone; removing it from the room");
            self.leave(domain, device, to, false).await;
        }
    }

    /// A device leaves a room: `tell` it so (its own unavailable presence), unless
    /// it is gone already (a bounce, or its connection ended). When the account's
    /// last device vanished that way, the account stays in the room for the domain's
    /// reconnect grace.
    async fn leave(&self, domain: &Domain, from: &FullJid, to: &Jid, tell: bool) {
        let room = to.to_bare();
        let account = from.to_bare();
        let (last, nick, lingering) = {
            let mut rooms = self.rooms();
            let key = (room.clone(), account.clone());
            let Some(session) = rooms.get_mut(&key) else { return };
            let was_in = session.resources.remove(from) | session.pending.remove(from);
            if !was_in {
                return;
            }
            let nick = session.nick.clone();
            let mut last = session.resources.is_empty() && session.pending.is_empty();
            let mut lingering = None;
            if last && domain.persistent && session.joined {
                // Persistent channels: the account stays in the channel while no device is
                // in the room; messages keep being archived for history on the next join.
                last = false;
            } else if last && !tell && session.joined && !domain.reconnect_grace.is_zero() {
                // Vanished without leaving: it may be back in a moment (its XMPP server
                // restarted, its connection dropped). What is said meanwhile is archived
                // for its history on the next join.
                let now = std::time::Instant::now();
                session.vanished_at = Some(now);
                lingering = Some(now);
                last = false;
            } else if last {
                rooms.remove(&key);
            }
            (last, nick, lingering)
        };
        self.save_session(&room, &account);
        if let Some(own) = full(&room, if nick.is_empty() { "you" } else { &nick }).filter(|_| tell) {
            let item = Item::new(muc::user::Affiliation::None, muc::user::Role::None);
            let s = occupant_presence(Jid::from(own), from, item, vec![Status::SelfPresence], true);
            self.send(domain, s).await;
        }
        if let Some(since) = lingering {
            info!(account = %account, room = %room, grace = ?domain.reconnect_grace,
                "the account's last device vanished; staying in the room in case it comes back");
            self.leave_after_grace(domain, room, account, since);
        } else if last {
            self.part(domain, &room, &account, nick).await;
        }
    }

    /// After the domain's reconnect grace, leave the remote room unless a device of
    /// the account came back since it vanished at `since`.
    fn leave_after_grace(&self, domain: &Domain, room: BareJid, account: BareJid, since: std::time::Instant) {
        let Some(me) = self.me.get().and_then(std::sync::Weak::upgrade) else { return };
        let domain = domain.clone();
        tokio::spawn(async move {
            tokio::time::sleep(domain.reconnect_grace).await;
            let nick = {
                let mut rooms = me.rooms();
                let key = (room.clone(), account.clone());
                let still_gone = rooms
                    .get(&key)
                    .is_some_and(|s| s.resources.is_empty() && s.pending.is_empty() && s.vanished_at == Some(since));
                if !still_gone {
                    return;
                }
                rooms.remove(&key).map(|s| s.nick).unwrap_or_default()
            };
            info!(account = %account, room = %room, "no device came back in time; leaving the room");
            me.save_session(&room, &account);
            me.part(&domain, &room, &account, nick).await;
        });
    }

    /// The account leaves the room on its network (its session is gone).
    async fn part(&self, domain: &Domain, room: &BareJid, account: &BareJid, nick: String) {
        if let Ok(chat) = self.chat_of(domain, &Jid::from(room.clone())) {
            let event = self.user_event(chat, account, nick, EventKind::Left { kind: LeaveKind::Part, reason: None });
            self.portal_fanout(domain, room, &event, account);
            self.route(event).await;
        }
    }

    async fn handle_message(&self, domain: &Domain, m: Message) {
        if m.type_ == MessageType::Error {
            if let (Some(Ok(from)), Some(to)) = (m.from.clone().map(Jid::try_into_full), m.to.as_ref()) {
                self.bounced(domain, &from, to, &m.payloads).await;
            }
            return;
        }
        let (Some(from), Some(to)) = (m.from.clone(), m.to.clone()) else { return };
        let account = from.to_bare();
        if !Self::allowed(domain, &from) {
            if let Some(e) = stanza::message_error(&m, ErrorType::Auth, DefinedCondition::Forbidden, Self::NOT_ALLOWED)
            {
                self.send(domain, e).await;
            }
            return;
        }
        if to.node().is_none() && m.type_ != MessageType::Groupchat {
            // Messages to the gateway itself are commands (`help` lists them).
            return self.chat_command(domain, &m, &from).await;
        }
        if to.node().is_some() && self.chat_room_command(domain, &m, &from, &to).await {
            // A chat message to a room's bare JID: a command on the room (`help` lists them).
            return;
        }
        if to.node().is_some() && m.type_ != MessageType::Groupchat && self.chat_settings(domain, &m, &from, &to).await
        {
            // `configure …` on a service address (an IRC server's): settings, not a raw command.
            return;
        }
        if let Some(kind) = stanza::encryption(&m) {
            // Never relayed, not even the fallback body: the remote side could not read it,
            // and the gateway must not pretend it can.
            let text = format!(
                "This {kind} message was not sent: the gateway cannot read end-to-end encrypted messages, so they cannot be bridged. Send it unencrypted to reach the other side."
            );
            if let Some(e) = stanza::message_error(&m, ErrorType::Modify, DefinedCondition::NotAcceptable, &text) {
                self.send(domain, e).await;
            }
            return;
        }
        if m.type_ == MessageType::Groupchat
            && stanza::body(&m).is_none()
            && let Some((_, subject)) = m.get_best_subject_cloned(vec!["en"])
        {
            return self.set_subject(domain, &m, &account, &to, subject).await;
        }
        let body = stanza::body(&m).unwrap_or_default();
        let Some(kind) = stanza::event_kind(&m, &body) else { return };
        // Typing notifications and read markers are best effort: no reflection, no error back.
        let typing = matches!(kind, EventKind::Typing(_) | EventKind::Displayed { .. });
        let chat = match self.chat_of(domain, &to) {
            Ok(c) => c,
            // Typing notifications are best effort: never an error back.
            Err(_) if typing => return,
            Err(text) => {
                if let Some(e) = stanza::message_error(&m, ErrorType::Modify, DefinedCondition::ItemNotFound, &text) {
                    self.send(domain, e).await;
                }
                return;
            }
        };
        let room = to.to_bare();
        let nick = if chat.kind == ChatKind::Room {
            let nick = self.rooms().get(&(room.clone(), account.clone())).and_then(|s| {
                (s.joined && from.try_as_full().is_ok_and(|f| s.resources.contains(f))).then(|| s.nick.clone())
            });
            match nick {
                Some(nick) => nick,
                None if typing => return,
                None => {
                    if let Some(e) = stanza::message_error(
                        &m,
                        ErrorType::Cancel,
                        DefinedCondition::NotAcceptable,
                        "join the room before sending messages to it",
                    ) {
                        self.send(domain, e).await;
                    }
                    return;
                }
            }
        } else {
            account.node().map(|n| n.to_string()).unwrap_or_default()
        };
        if typing {
            let event = self.user_event(chat, &account, nick, kind);
            self.portal_fanout(domain, &room, &event, &account);
            self.route(event).await;
            return;
        }
        let origin_id = stanza::origin_id(&m);
        let is_message = matches!(kind, EventKind::Message(_));
        let mut event = self.user_event(chat.clone(), &account, nick.clone(), kind);
        if let Some(id) = &origin_id {
            event = event.with_origin_id(id.clone());
        }
        // Retractions and reactions in a room name their target by the room's stanza-id,
        // which is the event key: record it too, and quote the target for text fallbacks.
        // In a room the stanza-id comes first: it is what other networks' references
        // (reactions, replies, retractions) are rendered back to on XMPP.
        let key_id = event.key.0.clone();
        if chat.kind == ChatKind::Room {
            event.origin_ids.insert(0, key_id);
        } else {
            event = event.with_origin_id(key_id);
        }
        // Only this room's archive as the account sees it is quoted; the account's own
        // message it retracts leaves that archive once the retraction is accepted.
        let mut retracted = None;
        if let Some(target) = event.kind.target().filter(|_| !matches!(event.kind, EventKind::Correction { .. }))
            && let Ok(Some(e)) = self.archive.get(&target.0).await
            && crate::archive::visible(&e, room.as_str(), account.as_str())
        {
            let own = e.sender_jid.as_deref() == Some(account.as_str());
            if own && matches!(event.kind, EventKind::Retraction { .. }) {
                retracted = Some(target.0.clone());
            }
            event.context = Some(Quote { author: e.sender_nick, text: e.body });
        }
        // A reply quotes its target too, for networks that show replies as text.
        if let EventKind::Message(msg) = &mut event.kind
            && let Some(r) = msg.reply_to.as_mut()
            && let Ok(Some(e)) = self.archive.get(&r.target.0).await
            && crate::archive::visible(&e, room.as_str(), account.as_str())
        {
            r.author.get_or_insert(e.sender_nick);
            r.quote = Some(e.body);
        }
        // A resend (same origin-id from the same account, e.g. after a failed stream
        // resumption) is not bridged again; in a room it is reflected again, with the
        // first one's stanza-id, so the client knows it arrived.
        let resent = origin_id.as_ref().and_then(|id| self.recent_origins.key_of(&account, id));
        if let Some(first) = resent {
            debug!(origin_id = ?origin_id, key = %first, from = %from, "resent message not bridged again");
            if chat.kind == ChatKind::Room {
                let reflections = self.reflections(&m, &room, &account, &nick, &body, &first);
                self.send_all_after(domain, reflections, None);
            }
            return;
        }
        let key = event.key.clone();
        if chat.kind == ChatKind::Room {
            self.portal_fanout(domain, &room, &event, &account);
        }
        let span = tracing::info_span!("xmpp-message", key = %key, origin_id = ?origin_id, from = %from);
        let Some(mut report) = self.route(event).instrument(span).await else { return };
        if let Some(e) = report.first_error() {
            let condition = match e {
                DeliveryError::Forbidden(_) => DefinedCondition::Forbidden,
                DeliveryError::Unavailable(_) => DefinedCondition::RecipientUnavailable,
                _ => DefinedCondition::NotAcceptable,
            };
            if let Some(err) = stanza::message_error(&m, ErrorType::Cancel, condition, &e.to_string()) {
                self.send(domain, err).await;
            }
            return;
        }
        if let Some(id) = &origin_id {
            self.recent_origins.remember(&account, id, &key.0);
        }
        if let Some(target) = retracted {
            self.archive.forget(room.as_str(), Some(account.as_str()), &target);
        }
        // What tells the sender the message was accepted: a XEP-0184 receipt (the
        // remote network accepted it) in a direct chat, the reflection in a room.
        let mut accepted = Vec::new();
        if chat.kind != ChatKind::Room
            && m.payloads.iter().any(|p| p.is("request", ns::RECEIPTS))
            && let Some(id) = &m.id
        {
            let mut receipt = Message::new_with_type(MessageType::Chat, Some(from.clone()));
            receipt.from = Some(to.clone());
            receipt.id = Some(stanza::new_id());
            receipt.payloads.push(
                Element::builder("received", ns::RECEIPTS)
                    .attr(xso::exports::rxml::NcName::try_from("id").expect("a constant valid name"), id.0.clone())
                    .build(),
            );
            accepted.push(Stanza::Message(receipt));
        }
        let mut archived = None;
        if chat.kind == ChatKind::Room {
            if is_message {
                // A portal room's messages go to its shared archive, once.
                let owner = (!self.is_portal(&room)).then_some(&account);
                let account_jid = Some(account.to_string());
                let now = std::time::SystemTime::now();
                let entry = archive_entry(&room, owner, &key.0, origin_id.clone(), &nick, account_jid, &body, now);
                archived = Some((self.archive.clone(), entry));
            }
            accepted.extend(self.reflections(&m, &room, &account, &nick, &body, &key.0));
        }
        // Sent only once the outbox holds the message (it must survive a crash from
        // here on), and where the network confirms later (IRC echo-message), once it did.
        let confirmation =
            report.deliveries.iter_mut().find_map(|(_, r)| r.as_mut().ok().and_then(|d| d.confirmation.take()));
        Self::send_accepted(domain, &m, accepted, report.persisted.clone(), confirmation, archived);
    }

    /// Tell the sender their message was accepted (`stanzas`, the first one held
    /// until `persisted` opens), and keep it in the room's archive (`archived`).
    /// With a `confirmation` both wait for the network's word; a refusal reaches
    /// the sender as an error instead, and the message is not archived.
    fn send_accepted(
        domain: &Domain,
        m: &Message,
        stanzas: Vec<Stanza>,
        mut persisted: Option<Receipt>,
        confirmation: Option<Confirmation>,
        archived: Option<(Archive, ArchiveEntry)>,
    ) {
        let archive = move || {
            if let Some((archive, entry)) = archived {
                archive.record(entry);
            }
        };
        let mut send = move |domain: &Domain, stanzas: Vec<Stanza>| {
            for stanza in stanzas {
                domain.outgoing.push(&domain.name, stanza, persisted.take());
            }
        };
        let Some(confirmation) = confirmation else {
            archive();
            return send(domain, stanzas);
        };
        // As long as it takes: a message kept while the network is unreachable is
        // confirmed once it reconnects and the message arrived.
        let (domain, m) = (domain.clone(), m.clone());
        tokio::spawn(async move {
            let stanzas = match confirmation.wait().await {
                Ok(_) => {
                    archive();
                    stanzas
                }
                Err(e) => {
                    // Refused, or in doubt: it was never said for sure, so it stays out of
                    // the room's history.
                    debug!(id = ?m.id, error = %e, "the network did not confirm the message; not archived");
                    // Not `wait`: a client that sends it again may make it arrive twice.
                    let condition = match e {
                        DeliveryError::Unavailable(_) => DefinedCondition::RecipientUnavailable,
                        _ => DefinedCondition::NotAcceptable,
                    };
                    stanza::message_error(&m, ErrorType::Cancel, condition, &e.to_string()).into_iter().collect()
                }
            };
            send(&domain, stanzas);
        });
    }

    /// MUC semantics: the sender's resources see their own message reflected, with
    /// its id and the room's stanza-id (`key`). The whole stanza is reflected
    /// (corrections, reactions and retractions included), so the user's other
    /// devices apply it too.
    fn reflections(
        &self,
        m: &Message,
        room: &BareJid,
        account: &BareJid,
        nick: &str,
        body: &str,
        key: &str,
    ) -> Vec<Stanza> {
        let resources: Vec<FullJid> = self
            .rooms()
            .get(&(room.clone(), account.clone()))
            .map(|s| s.resources.iter().cloned().collect())
            .unwrap_or_default();
        let Some(from_occupant) = full(room, nick) else { return Vec::new() };
        resources
            .into_iter()
            .map(|res| {
                let mut echo =
                    stanza::message(MessageType::Groupchat, Jid::from(from_occupant.clone()), Jid::from(res), body);
                echo.id = m.id.clone();
                echo.payloads.extend(m.payloads.iter().filter(|p| !p.is("stanza-id", ns::SID)).cloned());
                Stanza::Message(stanza::with_stanza_id(echo, key, room))
            })
            .collect()
    }

    /// A MUC subject change: the network's topic.
    async fn set_subject(&self, domain: &Domain, m: &Message, account: &BareJid, to: &Jid, subject: String) {
        let nick = self.rooms().get(&(to.to_bare(), account.clone())).filter(|s| s.joined).map(|s| s.nick.clone());
        let (Some(nick), Ok(chat)) = (nick, self.chat_of(domain, to)) else {
            if let Some(e) =
                stanza::message_error(m, ErrorType::Cancel, DefinedCondition::NotAcceptable, "join the room first")
            {
                self.send(domain, e).await;
            }
            return;
        };
        let event = self.user_event(chat, account, nick, EventKind::Topic { text: subject });
        // §8.1: a subject change the network refuses to the user is `auth`/`forbidden`.
        if let Some(e) = self.route(event).await.and_then(|r| r.first_error().cloned())
            && let type_ = if matches!(e, DeliveryError::Forbidden(_)) { ErrorType::Auth } else { ErrorType::Cancel }
            && let Some(err) = stanza::message_error(m, type_, DefinedCondition::Forbidden, &e.to_string())
        {
            self.send(domain, err).await;
        }
    }

    /// XEP-0313 query on a room's archive: the requester's own archive of an IRC room
    /// (those rooms are personal) and the room's shared archive (a portal room's only
    /// one: anyone allowed on the domain may join it and see it), filtered by time and
    /// sender, paged with XEP-0059.
    async fn mam_query(&self, domain: &Domain, from: &Jid, room: &BareJid, id: &str, payload: Element) -> Iq {
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

    async fn handle_iq(&self, domain: &Domain, iq: Iq) {
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

    /// Render a network event for the XMPP account it belongs to.
    /// Stanzas for an event, and the resources that just entered the room (they still
    /// need occupants, history and subject).
    fn render(&self, event: &Event, chat_jid: &BareJid) -> Result<(Vec<Stanza>, Vec<FullJid>), DeliveryError> {
        let account = event.account.clone().ok_or_else(|| DeliveryError::Rejected("no XMPP account named".into()))?;
        let mut out = Vec::new();
        let mut entering = Vec::new();
        match event.chat.kind {
            ChatKind::Room => self.render_room(event, &account, chat_jid, &mut out, &mut entering),
            ChatKind::Direct | ChatKind::Service => {
                if let EventKind::Typing(state) = &event.kind {
                    let mut m = Message::new_with_type(MessageType::Chat, Some(Jid::from(account.clone())));
                    m.from = Some(Jid::from(chat_jid.clone()));
                    m.payloads.push(stanza::empty(chat_state_name(*state), ns::CHATSTATES));
                    out.push(Stanza::Message(m));
                }
                if let EventKind::Status { text } = &event.kind {
                    let mut m = stanza::message(
                        MessageType::Chat,
                        Jid::from(chat_jid.clone()),
                        Jid::from(account.clone()),
                        text,
                    );
                    m.id = Some(stanza::new_id());
                    out.push(Stanza::Message(m));
                }
                if let Some(m) =
                    stanza::rendered(event, MessageType::Chat, Jid::from(chat_jid.clone()), Jid::from(account))
                {
                    let sid = m.id.as_ref().map(|i| i.0.clone()).unwrap_or_default();
                    out.push(Stanza::Message(stanza::with_stanza_id(m, &sid, chat_jid)));
                }
            }
        }
        Ok((out, entering))
    }

    pub(crate) fn render_room(
        &self,
        event: &Event,
        account: &BareJid,
        room: &BareJid,
        out: &mut Vec<Stanza>,
        entering: &mut Vec<FullJid>,
    ) {
        let key = (room.clone(), account.clone());
        let mut rooms = self.rooms();
        let Some(session) = rooms.get_mut(&key) else {
            debug!(room = %room, account = %account, "event for a room the account is not in; ignored");
            return;
        };
        let nick = &event.sender.nick;
        // Whose people these are (portal rooms: the network the event came from), and
        // whose view of their profiles (personal rooms: the account's).
        let people_net = Self::people_network(&event.chat.network, &event.origin);
        let viewer = (!event.chat.network.is_xmpp()).then(|| account.clone());
        match &event.kind {
            EventKind::SelfJoined { nick, occupants, topic } => {
                session.joined = true;
                session.nick = nick.clone();
                session.occupants = occupants.iter().map(|o| (o.nick.clone(), o.clone())).collect();
                session.people =
                    occupants.iter().map(|o| (o.nick.clone(), self.person(&people_net, o.id.as_str()))).collect();
                // A room that exists only while occupied, found empty: this join created it.
                session.created = occupants.is_empty()
                    && !session.restored
                    && !self.is_portal(room)
                    && self.capabilities_of(&event.chat.network).is_some_and(|c| c.rooms_exist_while_occupied);
                session.topic = topic.clone();
                let people = occupants.iter().map(|o| (o.id.0.clone(), o.nick.clone())).collect();
                self.learn_profiles(people_net.clone(), viewer.clone(), room.clone(), account.clone(), people);
                let pending: Vec<FullJid> = session.pending.drain().collect();
                session.resources.extend(pending.iter().cloned());
                entering.extend(pending);
                if std::mem::take(&mut session.restored) {
                    // Rejoined after a restart: the devices get the room's state again.
                    entering.extend(session.resources.iter().cloned());
                    entering.sort_by_key(|j| j.to_string());
                    entering.dedup();
                }
            }
            EventKind::JoinFailed { reason } if session.restored => {
                // The rejoin after a restart failed: the devices are told they are out.
                let item = Item::new(muc::user::Affiliation::None, muc::user::Role::None).with_reason(reason.clone());
                if let Some(from) = full(room, &session.nick) {
                    for res in session.resources.iter().chain(session.pending.iter()) {
                        let codes = vec![Status::SelfPresence, Status::ServiceErrorKick];
                        out.push(occupant_presence(Jid::from(from.clone()), res, item.clone(), codes, true));
                    }
                }
                rooms.remove(&key);
            }
            EventKind::JoinFailed { reason } => {
                let pending: Vec<FullJid> = session.pending.drain().collect();
                if session.resources.is_empty() {
                    rooms.remove(&key);
                }
                for res in pending {
                    let from = full(room, nick).map(Jid::from).unwrap_or_else(|| Jid::from(room.clone()));
                    out.push(stanza::presence_error(
                        from,
                        Jid::from(res),
                        ErrorType::Auth,
                        DefinedCondition::NotAuthorized,
                        reason,
                    ));
                }
            }
            EventKind::Joined { occupant } => {
                session.occupants.insert(occupant.nick.clone(), occupant.clone());
                session.people.insert(occupant.nick.clone(), self.person(&people_net, occupant.id.as_str()));
                for res in &session.resources {
                    out.extend(self.other_presence(room, session, &occupant.nick, viewer.as_ref(), res, vec![]));
                }
                let people = vec![(occupant.id.0.clone(), occupant.nick.clone())];
                self.learn_profiles(people_net.clone(), viewer.clone(), room.clone(), account.clone(), people);
            }
            EventKind::Left { .. } if event.sender.is_self && !session.joined && !session.pending.is_empty() => {
                // Our own leave reported late (the network answering a leave made
                // before this join): it must not end the join now under way.
                debug!(room = %room, account = %account, "a late leave of an earlier stay; ignored");
            }
            EventKind::Left { kind, reason } => {
                let mut codes = match kind {
                    LeaveKind::Kick { .. } => vec![Status::Kicked],
                    LeaveKind::Ban { .. } => vec![Status::Banned],
                    LeaveKind::Disconnected => vec![Status::ServiceErrorKick],
                    _ => vec![],
                };
                let mut item = Item::new(muc::user::Affiliation::None, muc::user::Role::None);
                if let Some(r) = reason {
                    item = item.with_reason(r.clone());
                }
                let targets: Vec<FullJid> = session.resources.iter().cloned().collect();
                let mut real = None;
                if event.sender.is_self {
                    codes.push(Status::SelfPresence);
                    rooms.remove(&key);
                } else {
                    session.occupants.remove(nick);
                    real = session.people.remove(nick).and_then(|p| p.real);
                }
                if let Some(from) = full(room, nick) {
                    for res in &targets {
                        let p = occupant_presence(Jid::from(from.clone()), res, item.clone(), codes.clone(), true);
                        out.push(crate::puppet::with_real_jid(p, real.as_ref()));
                    }
                }
            }
            EventKind::NickChanged { new_nick } => {
                let mut occupant = session.occupants.remove(nick);
                let old_person = session.people.remove(nick);
                if event.sender.is_self {
                    session.nick = new_nick.clone();
                } else if let Some(o) = occupant.as_mut() {
                    // Where the id is the nick (IRC), the person's JID changes with it.
                    let new_id = match self.router.get().and_then(|r| r.network(&people_net)) {
                        Some(net) => net.renamed_id(o.id.as_str(), new_nick),
                        None => o.id.0.clone(),
                    };
                    o.nick = new_nick.clone();
                    o.id = isthmus_core::model::RemoteId::new(new_id.clone());
                    session.occupants.insert(new_nick.clone(), o.clone());
                    session.people.insert(new_nick.clone(), self.person(&people_net, &new_id));
                }
                let old_real = old_person.and_then(|p| p.real);
                let (aff, role) = occupant.map(|o| (o.affiliation, o.role)).unwrap_or_default();
                let mut codes = vec![Status::NewNick];
                if event.sender.is_self {
                    codes.push(Status::SelfPresence);
                }
                for res in &session.resources {
                    if let (Some(old), Some(new)) = (full(room, nick), full(room, new_nick)) {
                        let item = Item::new(muc_affiliation(aff), muc_role(role)).with_nick(new_nick.clone());
                        let p = occupant_presence(Jid::from(old), res, item, codes.clone(), true);
                        out.push(crate::puppet::with_real_jid(p, old_real.as_ref()));
                        if event.sender.is_self {
                            let item = Item::new(muc_affiliation(aff), muc_role(role)).with_jid(res.clone());
                            out.push(occupant_presence(Jid::from(new), res, item, vec![Status::SelfPresence], false));
                        } else {
                            out.extend(self.other_presence(room, session, new_nick, viewer.as_ref(), res, vec![]));
                        }
                    }
                }
            }
            EventKind::RoleChanged { role, affiliation } => {
                if let Some(o) = session.occupants.get_mut(nick) {
                    o.role = *role;
                    o.affiliation = *affiliation;
                }
                if event.sender.is_self {
                    session.own_role = *role;
                }
                let is_self = event.sender.is_self;
                // The account's own occupant is its nick in the room, whatever name the
                // network gave the change (a Matrix display name).
                let nick = if is_self { &session.nick } else { nick };
                if let Some(from) = full(room, nick) {
                    for res in &session.resources {
                        let mut item = Item::new(muc_affiliation(*affiliation), muc_role(*role));
                        let mut codes = vec![];
                        if is_self {
                            item = item.with_jid(res.clone());
                            codes.push(Status::SelfPresence);
                            out.push(occupant_presence(Jid::from(from.clone()), res, item, codes, false));
                        } else {
                            out.extend(self.other_presence(room, session, nick, viewer.as_ref(), res, vec![]));
                        }
                    }
                }
            }
            EventKind::Topic { text } => {
                session.topic = Some(text.clone());
                for res in &session.resources {
                    let from = full(room, nick).map(Jid::from).unwrap_or_else(|| Jid::from(room.clone()));
                    let mut m = Message::groupchat(Some(Jid::from(res.clone())));
                    m.from = Some(from);
                    m.id = Some(stanza::new_id());
                    m.subjects.insert(Lang::default(), text.clone());
                    out.push(Stanza::Message(m));
                }
            }
            EventKind::Message(_)
            | EventKind::Correction { .. }
            | EventKind::Retraction { .. }
            | EventKind::Reactions { .. }
            | EventKind::Displayed { .. } => {
                let Some(from) = full(room, nick) else { return };
                for res in &session.resources {
                    let Some(m) = stanza::rendered(
                        event,
                        MessageType::Groupchat,
                        Jid::from(from.clone()),
                        Jid::from(res.clone()),
                    ) else {
                        continue;
                    };
                    // Message ids double as stanza-ids: references from any side name them.
                    let sid = m.id.as_ref().map(|i| i.0.clone()).unwrap_or_default();
                    out.push(Stanza::Message(stanza::with_stanza_id(m, &sid, room)));
                }
                if !self.is_portal(room) {
                    // Portal rooms' messages are archived once, shared (see `archive_event`).
                    self.archive_event(event, room, Some(account));
                }
            }
            EventKind::Typing(state) => {
                let Some(from) = full(room, nick) else { return };
                for res in &session.resources {
                    let mut m = Message::new_with_type(MessageType::Groupchat, Some(Jid::from(res.clone())));
                    m.from = Some(Jid::from(from.clone()));
                    m.payloads.push(stanza::empty(chat_state_name(*state), ns::CHATSTATES));
                    out.push(Stanza::Message(m));
                }
            }
            EventKind::Status { text } => {
                for res in &session.resources {
                    let mut m =
                        stanza::message(MessageType::Groupchat, Jid::from(room.clone()), Jid::from(res.clone()), text);
                    m.id = Some(stanza::new_id());
                    out.push(Stanza::Message(m));
                }
            }
            _ => {}
        }
    }
}

#[async_trait]
impl Network for Gateway {
    fn id(&self) -> &NetworkId {
        &self.id
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::all()
    }

    fn chat_kind(&self, _id: &str) -> Option<ChatKind> {
        Some(ChatKind::Room)
    }

    async fn deliver(&self, event: Event) -> Result<Delivered, DeliveryError> {
        if event.account.is_none() && event.chat.network.is_xmpp() {
            return self.deliver_portal(event).await;
        }
        let (domain, chat_jid) = self.chat_jid(&event.chat).ok_or_else(|| {
            DeliveryError::Rejected(format!("`{}` has no JID on any configured domain", event.chat.id))
        })?;
        let (stanzas, entering) = self.render(&event, &chat_jid)?;
        self.send_all_after(&domain, stanzas, event.receipt.clone());
        if let Some(account) = &event.account {
            let changes_session = match &event.kind {
                EventKind::SelfJoined { .. } | EventKind::JoinFailed { .. } => true,
                EventKind::Left { .. } | EventKind::NickChanged { .. } => event.sender.is_self,
                _ => false,
            };
            if changes_session && event.chat.kind == ChatKind::Room {
                self.save_session(&chat_jid, account);
            }
            self.enter(&domain, &chat_jid, account, &entering).await;
        }
        Ok(Delivered::ids(vec![event.key.0.clone()]))
    }

    /// A message sent again shows once: it carries the same stanza-id (the event's
    /// key), by which XMPP clients and the room archive know it.
    fn redelivery_shows_once(&self) -> bool {
        true
    }

    /// An XMPP user's message accepted before a restart: delivered now (the room
    /// reflects it, as it would have), or in doubt or refused (an error names the
    /// message, so the client marks it). In a direct chat only a failure is said, as
    /// a message from the contact.
    async fn replayed(&self, event: &Event, destination: &NetworkId, outcome: Result<(), DeliveryError>) {
        let Some(account) = &event.account else {
            debug!(key = %event.key, "the outcome of a portal message sent before the restart is not reported");
            return;
        };
        let Some((domain, chat_jid)) = self.chat_jid(&event.chat) else { return };
        // The room's stanza-id is the key; the client's own id is the other one.
        let id = event.origin_ids.iter().find(|id| **id != event.key.0).cloned();
        if event.chat.kind != ChatKind::Room {
            if let Err(e) = outcome {
                let quote = match &event.kind {
                    EventKind::Message(m) => format!(" («{}»)", m.body.chars().take(80).collect::<String>()),
                    _ => String::new(),
                };
                let text = format!("Your message{quote} to {destination}: {e}");
                let notice = stanza::message(MessageType::Chat, Jid::from(chat_jid), Jid::from(account.clone()), &text);
                self.send(&domain, Stanza::Message(notice)).await;
            }
            return;
        }
        let (nick, resources): (String, Vec<FullJid>) = match self.rooms().get(&(chat_jid.clone(), account.clone())) {
            Some(s) => (s.nick.clone(), s.resources.iter().cloned().collect()),
            None => return,
        };
        match outcome {
            Ok(()) => {
                let EventKind::Message(msg) = &event.kind else { return };
                let Some(from_occupant) = full(&chat_jid, &nick) else { return };
                // From the body alone: the stored copy's references are in the
                // destination's id space, so `stanza::rendered` would point them astray.
                let body = stanza::rendered_body(msg);
                for res in resources {
                    let mut echo = stanza::message(
                        MessageType::Groupchat,
                        Jid::from(from_occupant.clone()),
                        Jid::from(res),
                        &body,
                    );
                    echo.id = id.clone().map(Id);
                    if let Some(id) = &id {
                        echo.payloads.push(OriginId { id: id.clone() }.into());
                    }
                    self.send(&domain, Stanza::Message(stanza::with_stanza_id(echo, &event.key.0, &chat_jid))).await;
                }
                let owner = (!self.is_portal(&chat_jid)).then_some(account);
                let entry = archive_entry(
                    &chat_jid,
                    owner,
                    &event.key.0,
                    id,
                    &nick,
                    Some(account.to_string()),
                    &body,
                    event.time,
                );
                self.archive.record(entry);
            }
            Err(e) => {
                info!(key = %event.key, room = %chat_jid, error = %e, "a message sent before the restart is reported failed");
                for res in resources {
                    let mut error = Message::error(Jid::from(res));
                    error.from = Some(Jid::from(chat_jid.clone()));
                    error.id = id.clone().map(Id);
                    error.payloads.push(
                        stanza::error(ErrorType::Cancel, DefinedCondition::RecipientUnavailable, &e.to_string()).into(),
                    );
                    self.send(&domain, Stanza::Message(error)).await;
                }
            }
        }
    }
}

/// XEP-0045 room owners' namespace.
const NS_MUC_OWNER: &str = "http://jabber.org/protocol/muc#owner";

/// The XEP-0085 element name of a chat state.
fn chat_state_name(state: isthmus_core::model::ChatState) -> &'static str {
    use isthmus_core::model::ChatState;
    match state {
        ChatState::Active => "active",
        ChatState::Composing => "composing",
        ChatState::Paused => "paused",
        ChatState::Inactive => "inactive",
        ChatState::Gone => "gone",
    }
}

/// An archived message as a delayed groupchat message from its occupant JID.
fn archived_message(e: &ArchiveEntry, room: &BareJid, to: Jid) -> Option<Message> {
    let from = full(room, &e.sender_nick)?;
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_micros(u64::try_from(e.time_us).ok()?);
    let mut m = stanza::message(MessageType::Groupchat, Jid::from(from), to, &e.body);
    m.id = Some(stanza::new_id());
    m.payloads.push(stanza::delay(time, room)?.into());
    Some(stanza::with_stanza_id(m, &e.stanza_id, room))
}

/// An archive entry for a room message: in the archive of `owner` (an account's own, in IRC
/// rooms), or in the room's shared archive (`None`, portal rooms).
#[allow(clippy::too_many_arguments)]
fn archive_entry(
    room: &BareJid,
    owner: Option<&BareJid>,
    key: &str,
    origin_id: Option<String>,
    nick: &str,
    sender_jid: Option<String>,
    body: &str,
    time: std::time::SystemTime,
) -> ArchiveEntry {
    let time_us = time.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0);
    ArchiveEntry {
        archive_id: next_archive_id(),
        stanza_id: key.to_owned(),
        origin_id,
        room: room.to_string(),
        owner: owner.map(BareJid::to_string),
        sender_nick: nick.to_owned(),
        sender_jid,
        time_us,
        body: body.to_owned(),
        payload: None,
    }
}

/// Whether an allow list lets `jid` in: `"*"` (everyone), its bare JID or its
/// domain, compared without case. An empty list lets nobody in.
fn admits(allow: &[String], jid: &Jid) -> bool {
    let bare = jid.to_bare().to_string();
    let host = jid.domain().as_str();
    allow.iter().any(|a| a == "*" || a.eq_ignore_ascii_case(&bare) || a.eq_ignore_ascii_case(host))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jid(s: &str) -> Jid {
        Jid::new(s).expect("a valid JID")
    }

    fn list(entries: &[&str]) -> Vec<String> {
        entries.iter().map(|e| e.to_string()).collect()
    }

    #[test]
    fn an_empty_allow_list_admits_nobody() {
        assert!(!admits(&[], &jid("alice@example.org/phone")));
        assert!(!admits(&[], &jid("example.org")));
    }

    #[test]
    fn a_star_admits_everyone() {
        assert!(admits(&list(&["*"]), &jid("alice@example.org/phone")));
        assert!(admits(&list(&["example.net", "*"]), &jid("mallory@elsewhere.test")));
        // Only the whole entry: no wildcard patterns.
        assert!(!admits(&list(&["*.example.org"]), &jid("alice@chat.example.org")));
    }

    #[test]
    fn a_bare_jid_admits_that_account_only() {
        let allow = list(&["Alice@Example.org"]);
        assert!(admits(&allow, &jid("alice@example.org/phone")));
        assert!(admits(&allow, &jid("alice@example.org")));
        assert!(!admits(&allow, &jid("bob@example.org/phone")));
        assert!(!admits(&allow, &jid("example.org")));
    }

    #[test]
    fn a_domain_admits_its_accounts_and_no_other_domain() {
        let allow = list(&["example.org"]);
        assert!(admits(&allow, &jid("alice@example.org/phone")));
        assert!(admits(&allow, &jid("bob@EXAMPLE.org")));
        assert!(!admits(&allow, &jid("alice@sub.example.org")));
        assert!(!admits(&allow, &jid("alice@example.org.evil.test")));
        assert!(!admits(&allow, &jid("example.org@evil.test")));
    }

    fn presence(xml: &str) -> Presence {
        let e: Element = xml.parse().expect("valid XML");
        Presence::try_from(e).expect("a presence")
    }

    #[test]
    fn an_unavailable_presence_with_prosodys_disconnect_status_is_a_connection_ending() {
        let gone = |status: &str| {
            presence(&format!(
                "<presence xmlns='jabber:component:accept' type='unavailable'><status>{status}</status></presence>"
            ))
        };
        assert!(connection_ended(&gone("Disconnected: Received SIGTERM")));
        assert!(connection_ended(&gone("Disconnected: closed")));
        assert!(connection_ended(&gone("Disconnected: Hibernating too long")));
        // A leave, a logout, or a status of the user's own.
        assert!(!connection_ended(&presence("<presence xmlns='jabber:component:accept' type='unavailable'/>")));
        assert!(!connection_ended(&gone("gone fishing")));
        assert!(!connection_ended(&gone("Disconnected")));
    }
}
