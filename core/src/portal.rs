//! Portals: one XMPP room shared by everyone, linked to any number of chats on
//! any networks (two on the same network included).
//!
//! A [`Portal`] names its XMPP room (a chat on the `xmpp` network whose id is the
//! room's JID) and its member chats. The [`Portals`] directory is what the router
//! asks for an event's destinations and what the XMPP side asks whether a room is
//! shared; it changes at run time (an admin links or unlinks a chat, a Telegram
//! group becomes a supergroup) and keeps every change in the store, so a restart
//! finds the portals as they were. Portals written in the configuration are
//! defined again at each start: their members are always there, and members linked
//! at run time are added to them.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use thiserror::Error;
use tracing::info;

use crate::model::{ChatKind, ChatRef, NetworkId};
use crate::store::Store;

/// One portal: its XMPP room and the chats it links.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Portal {
    /// The portal's name (the admin's handle for it).
    pub name: String,
    /// The XMPP room: a chat on [`NetworkId::xmpp`] whose id is the room's bare JID.
    pub room: ChatRef,
    /// The chats on other networks, in the order they were linked.
    pub members: Vec<ChatRef>,
}

impl Portal {
    /// Every chat of the portal, the XMPP room first.
    pub fn chats(&self) -> Vec<ChatRef> {
        std::iter::once(self.room.clone()).chain(self.members.iter().cloned()).collect()
    }
}

/// Why a portal could not be changed; the text is for the admin.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum PortalError {
    #[error("`{chat}` on {network} is already linked to the portal `{portal}`")]
    AlreadyLinked { network: String, chat: String, portal: String },
    #[error("there is no portal `{0}`")]
    Unknown(String),
    #[error("`{chat}` on {network} is not linked to any portal")]
    NotLinked { network: String, chat: String },
    #[error("a portal's name is letters, digits, `-`, `_`, `.` and `@` (at most 64), not `{0}`")]
    BadName(String),
    #[error("the room `{room}` is already the portal `{portal}`'s")]
    RoomTaken { room: String, portal: String },
    #[error("the portal `{0}` is new: say which XMPP room it is")]
    NoRoom(String),
    #[error("the portals could not be stored: {0}")]
    Store(String),
}

#[derive(Default)]
struct State {
    by_name: BTreeMap<String, Arc<Portal>>,
    by_chat: HashMap<ChatRef, Arc<Portal>>,
}

impl State {
    fn put(&mut self, portal: Portal) {
        if let Some(old) = self.by_name.remove(&portal.name) {
            for c in old.chats() {
                self.by_chat.remove(&c);
            }
        }
        let portal = Arc::new(portal);
        for c in portal.chats() {
            self.by_chat.insert(c, portal.clone());
        }
        self.by_name.insert(portal.name.clone(), portal);
    }

    fn remove(&mut self, name: &str) {
        if let Some(old) = self.by_name.remove(name) {
            for c in old.chats() {
                self.by_chat.remove(&c);
            }
        }
    }
}

/// The directory of portals. Cheap to clone; every clone sees every change.
#[derive(Clone, Default)]
pub struct Portals {
    state: Arc<RwLock<State>>,
    store: Option<Store>,
}

impl std::fmt::Debug for Portals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Portals").field("portals", &self.read().by_name.len()).finish()
    }
}

/// Whether `name` can name a portal (a portal written under a network's own
/// section is named by its room's JID).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'))
}

fn room_chat(room: &str) -> ChatRef {
    ChatRef::room(NetworkId::xmpp(), room)
}

impl Portals {
    /// A directory kept in memory only (tests, tools).
    pub fn in_memory() -> Self {
        Portals::default()
    }

    /// The directory as the store holds it.
    pub async fn load(store: Store) -> Result<Self, PortalError> {
        let rows = store.all_portal_members().await.map_err(|e| PortalError::Store(e.to_string()))?;
        let mut grouped: BTreeMap<String, (Option<ChatRef>, Vec<ChatRef>)> = BTreeMap::new();
        for (name, network, id) in rows {
            let entry = grouped.entry(name).or_default();
            let chat =
                ChatRef { network: NetworkId::new(network), kind: ChatKind::Room, id: crate::model::RemoteId(id) };
            if chat.network.is_xmpp() {
                entry.0 = Some(chat);
            } else {
                entry.1.push(chat);
            }
        }
        let mut state = State::default();
        for (name, (room, members)) in grouped {
            if let Some(room) = room {
                state.put(Portal { name, room, members });
            }
        }
        Ok(Portals { state: Arc::new(RwLock::new(state)), store: Some(store) })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    async fn persist(&self, portal: &Portal) -> Result<(), PortalError> {
        let Some(store) = &self.store else { return Ok(()) };
        let members: Vec<(String, String)> =
            portal.chats().into_iter().map(|c| (c.network.to_string(), c.id.0)).collect();
        store.set_portal_members(&portal.name, &members).await.map_err(|e| PortalError::Store(e.to_string()))
    }

    /// The portal a chat (the XMPP room or a member) belongs to.
    pub fn of(&self, chat: &ChatRef) -> Option<Arc<Portal>> {
        let state = self.read();
        state.by_chat.get(chat).cloned().or_else(|| {
            // Rooms are looked up whatever kind the caller gave.
            (chat.kind != ChatKind::Room)
                .then(|| state.by_chat.get(&ChatRef { kind: ChatKind::Room, ..chat.clone() }).cloned())
                .flatten()
        })
    }

    /// For a network reached through portals only (a bot network): refuse an event
    /// that is no portal's (a personal room made of a chat's address would make
    /// the bot speak wherever a user likes). `what` names the network's chats.
    pub fn require_portal_event(
        &self,
        event: &crate::model::Event,
        what: &str,
    ) -> Result<(), crate::network::DeliveryError> {
        if event.account.is_none() && self.of(&event.chat).is_some() {
            return Ok(());
        }
        Err(crate::network::DeliveryError::Forbidden(format!(
            "`{}` is not a portal: {what} are reached through the portals the gateway's admin links",
            event.chat.id
        )))
    }

    /// Whether the XMPP room `room` (a bare JID) is a portal's.
    pub fn is_room(&self, room: &str) -> bool {
        self.read().by_chat.get(&room_chat(room)).is_some_and(|p| p.room.id.as_str() == room)
    }

    /// The portal named `name`.
    pub fn get(&self, name: &str) -> Option<Arc<Portal>> {
        self.read().by_name.get(name).cloned()
    }

    /// Every portal, by name.
    pub fn list(&self) -> Vec<Arc<Portal>> {
        self.read().by_name.values().cloned().collect()
    }

    /// The member chats a network has in portals (what a bridge serves).
    pub fn chats_on(&self, network: &NetworkId) -> Vec<ChatRef> {
        self.read().by_name.values().flat_map(|p| p.members.iter().filter(|c| &c.network == network).cloned()).collect()
    }

    /// Define a portal from the configuration: its room and members are there, with
    /// any members linked to it at run time kept.
    pub async fn define(&self, name: &str, room: &str, members: Vec<ChatRef>) -> Result<(), PortalError> {
        if !valid_name(name) {
            return Err(PortalError::BadName(name.to_owned()));
        }
        let portal = {
            let mut state = self.write();
            let mut all = members;
            if let Some(old) = state.by_name.get(name) {
                for m in &old.members {
                    if !all.contains(m) {
                        all.push(m.clone());
                    }
                }
            }
            if let Some(other) = state.by_chat.get(&room_chat(room)).filter(|p| p.name != name) {
                return Err(PortalError::RoomTaken { room: room.to_owned(), portal: other.name.clone() });
            }
            for m in &all {
                if let Some(other) = state.by_chat.get(m).filter(|p| p.name != name) {
                    return Err(PortalError::AlreadyLinked {
                        network: m.network.to_string(),
                        chat: m.id.to_string(),
                        portal: other.name.clone(),
                    });
                }
            }
            let portal = Portal { name: name.to_owned(), room: room_chat(room), members: all };
            state.put(portal.clone());
            portal
        };
        self.persist(&portal).await
    }

    /// Link `member` to the portal `name`, creating it with the XMPP room `room` when
    /// it does not exist yet.
    pub async fn link(&self, name: &str, room: Option<&str>, member: ChatRef) -> Result<Arc<Portal>, PortalError> {
        if !valid_name(name) {
            return Err(PortalError::BadName(name.to_owned()));
        }
        let portal = {
            let mut state = self.write();
            if let Some(other) = state.by_chat.get(&member) {
                return Err(PortalError::AlreadyLinked {
                    network: member.network.to_string(),
                    chat: member.id.to_string(),
                    portal: other.name.clone(),
                });
            }
            let portal = match state.by_name.get(name) {
                Some(p) => {
                    let mut p = (**p).clone();
                    p.members.push(member);
                    p
                }
                None => {
                    let room = room.ok_or_else(|| PortalError::NoRoom(name.to_owned()))?;
                    if let Some(other) = state.by_chat.get(&room_chat(room)) {
                        return Err(PortalError::RoomTaken { room: room.to_owned(), portal: other.name.clone() });
                    }
                    Portal { name: name.to_owned(), room: room_chat(room), members: vec![member] }
                }
            };
            state.put(portal.clone());
            portal
        };
        self.persist(&portal).await?;
        info!(portal = name, members = portal.members.len(), "portal linked");
        Ok(Arc::new(portal))
    }

    /// Take `member` out of its portal; the portal goes when no member is left.
    /// Returns the portal's name.
    pub async fn unlink(&self, member: &ChatRef) -> Result<String, PortalError> {
        let (name, left) = {
            let mut state = self.write();
            let Some(p) = state.by_chat.get(member).cloned().filter(|p| &p.room != member) else {
                return Err(PortalError::NotLinked {
                    network: member.network.to_string(),
                    chat: member.id.to_string(),
                });
            };
            let mut p = (*p).clone();
            p.members.retain(|m| m != member);
            let name = p.name.clone();
            if p.members.is_empty() {
                state.remove(&name);
                (name, None)
            } else {
                state.put(p.clone());
                (name, Some(p))
            }
        };
        match (&left, &self.store) {
            (Some(p), _) => self.persist(p).await?,
            (None, Some(store)) => store.delete_portal(&name).await.map_err(|e| PortalError::Store(e.to_string()))?,
            (None, None) => {}
        }
        info!(portal = %name, "portal member unlinked");
        Ok(name)
    }

    /// A member chat got a new id on its network (a Telegram group upgraded to a
    /// supergroup): the portal follows it. Returns the portal's name.
    pub async fn relink(&self, old: &ChatRef, new: ChatRef) -> Result<String, PortalError> {
        let portal = {
            let mut state = self.write();
            let Some(p) = state.by_chat.get(old).cloned() else {
                return Err(PortalError::NotLinked { network: old.network.to_string(), chat: old.id.to_string() });
            };
            let mut p = (*p).clone();
            for m in &mut p.members {
                if m == old {
                    *m = new.clone();
                }
            }
            state.put(p.clone());
            p
        };
        self.persist(&portal).await?;
        info!(portal = %portal.name, from = %old.id, to = %new.id, "portal member moved");
        Ok(portal.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tg(id: &str) -> ChatRef {
        ChatRef::room(NetworkId::new("telegram"), id)
    }

    #[tokio::test]
    async fn link_unlink_and_reload() {
        let dir = tempfile::tempdir().expect("dir");
        let url = format!("sqlite://{}", dir.path().join("p.db").display());
        let store = Store::connect(&url, 1).await.expect("store");
        store.migrate().await.expect("migrate");
        let portals = Portals::load(store.clone()).await.expect("load");
        assert_eq!(portals.link("lobby", None, tg("-1")).await, Err(PortalError::NoRoom("lobby".into())));
        portals.link("lobby", Some("lobby@t.example"), tg("-1")).await.expect("link");
        portals.link("lobby", None, tg("-2")).await.expect("second chat on the same network");
        assert!(matches!(
            portals.link("other", Some("o@t.example"), tg("-2")).await,
            Err(PortalError::AlreadyLinked { .. })
        ));
        assert!(portals.is_room("lobby@t.example"));
        let p = portals.of(&tg("-2")).expect("portal of member");
        assert_eq!(p.chats().len(), 3);
        let again = Portals::load(store.clone()).await.expect("reload");
        assert_eq!(again.get("lobby").expect("kept").members, vec![tg("-1"), tg("-2")]);
        portals.relink(&tg("-1"), tg("-1001")).await.expect("relink");
        assert!(portals.of(&tg("-1")).is_none());
        assert_eq!(
            Portals::load(store.clone()).await.expect("reload").get("lobby").expect("kept").members[0],
            tg("-1001")
        );
        portals.unlink(&tg("-2")).await.expect("unlink");
        portals.unlink(&tg("-1001")).await.expect("unlink last");
        assert!(portals.get("lobby").is_none());
        assert!(Portals::load(store).await.expect("reload").list().is_empty());
        assert!(matches!(portals.unlink(&tg("-2")).await, Err(PortalError::NotLinked { .. })));
        assert_eq!(portals.link("a b", Some("x@y"), tg("-9")).await, Err(PortalError::BadName("a b".into())));
        portals.link("one", Some("one@t.example"), tg("-5")).await.expect("link");
        assert!(matches!(
            portals.link("two", Some("one@t.example"), tg("-6")).await,
            Err(PortalError::RoomTaken { .. })
        ));
        assert!(matches!(
            portals.define("three", "one@t.example", vec![tg("-7")]).await,
            Err(PortalError::RoomTaken { .. })
        ));
    }

    #[tokio::test]
    async fn configured_portals_keep_members_linked_at_run_time() {
        let portals = Portals::in_memory();
        portals.define("lobby", "lobby@t.example", vec![tg("-1")]).await.expect("define");
        portals.link("lobby", None, tg("-2")).await.expect("link");
        portals.define("lobby", "lobby@t.example", vec![tg("-1")]).await.expect("define again");
        assert_eq!(portals.get("lobby").expect("portal").members, vec![tg("-1"), tg("-2")]);
        assert_eq!(portals.chats_on(&NetworkId::new("telegram")).len(), 2);
    }
}
