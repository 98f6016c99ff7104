//! The gateway's XMPP side: turns stanzas from the component links into core
//! events for the router, and core events from the networks into stanzas.
//!
//! Each configured network is served on its own component domain. Rooms are
//! personal (one IRC connection per XMPP user), so room state is kept per
//! (room JID, XMPP account): which of the account's resources are in the room,
//! the nick the network gave, the occupants and the subject. The XMPP side is
//! itself a [`Network`] (named `xmpp`) so the router treats every side alike.
//!
//! Here: the domains, the room state, stanza dispatch and the `Network` side; by
//! concern in the submodules: [`presence`] (joins, nicks, leaves), [`message`]
//! (messages from XMPP users), [`iq`] (the iq table and the archive),
//! [`portal`] (shared rooms) and [`render`] (events as stanzas).

mod iq;
mod message;
mod portal;
mod presence;
mod render;

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
