//! Ghosts: the people of a bot-bridged network as occupants of portal rooms.
//!
//! A bot network (Telegram, Discord) cannot always list a chat's members, so a
//! person becomes an occupant when first seen (speaking, or listed as an
//! administrator); a new name is a nick change. [`Ghosts`] keeps who is where
//! and says which event the XMPP side needs when someone is seen; the bridge emits
//! it before the person's message. Bounded: past [`MAX_PER_CHAT`] people in one
//! chat, more are not tracked (their messages still come, from their nick).

use std::collections::HashMap;
use std::sync::Mutex;

use crate::model::{Affiliation, EventKind, Occupant, RemoteId, Role};

/// The most people tracked per chat.
pub const MAX_PER_CHAT: usize = 10_000;

/// Who is in which chat (by the bridge's chat id), and under which nick.
#[derive(Debug, Default)]
pub struct Ghosts {
    chats: Mutex<HashMap<String, HashMap<String, Occupant>>>,
}

impl Ghosts {
    pub fn new() -> Self {
        Ghosts::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, HashMap<String, Occupant>>> {
        self.chats.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `id` was seen in `chat` as `nick`: the event the room needs first (they
    /// enter, or changed nick), if any.
    pub fn seen(&self, chat: &str, id: &str, nick: &str) -> Option<EventKind> {
        let mut chats = self.lock();
        let people = chats.entry(chat.to_owned()).or_default();
        let full = people.len() >= MAX_PER_CHAT;
        match people.get_mut(id) {
            Some(o) if o.nick == nick => None,
            Some(o) => {
                o.nick = nick.to_owned();
                Some(EventKind::NickChanged { new_nick: nick.to_owned() })
            }
            None if full => None,
            None => {
                let occupant = Occupant {
                    id: RemoteId::new(id),
                    nick: nick.to_owned(),
                    role: Role::Participant,
                    affiliation: Affiliation::Member,
                };
                people.insert(id.to_owned(), occupant.clone());
                Some(EventKind::Joined { occupant })
            }
        }
    }

    /// The nick `id` had in `chat` before (what a nick-change event is from).
    pub fn nick_in(&self, chat: &str, id: &str) -> Option<String> {
        self.lock().get(chat).and_then(|p| p.get(id)).map(|o| o.nick.clone())
    }

    /// Set someone's standing (a chat administrator), adding them when new.
    pub fn set_standing(&self, chat: &str, id: &str, nick: &str, role: Role, affiliation: Affiliation) {
        let mut chats = self.lock();
        let people = chats.entry(chat.to_owned()).or_default();
        if people.len() >= MAX_PER_CHAT && !people.contains_key(id) {
            return;
        }
        let o = people.entry(id.to_owned()).or_insert_with(|| Occupant {
            id: RemoteId::new(id),
            nick: nick.to_owned(),
            role,
            affiliation,
        });
        o.role = role;
        o.affiliation = affiliation;
    }

    /// Everyone in `chat`, by nick.
    pub fn occupants(&self, chat: &str) -> Vec<Occupant> {
        let mut list: Vec<Occupant> = self.lock().get(chat).map(|p| p.values().cloned().collect()).unwrap_or_default();
        list.sort_by(|a, b| a.nick.cmp(&b.nick));
        list
    }

    /// The nick of `id` in any chat (for display names).
    pub fn any_nick(&self, id: &str) -> Option<String> {
        self.lock().values().find_map(|p| p.get(id)).map(|o| o.nick.clone())
    }

    /// A chat got a new id (a Telegram group became a supergroup).
    pub fn moved(&self, old: &str, new: &str) {
        let mut chats = self.lock();
        if let Some(people) = chats.remove(old) {
            chats.insert(new.to_owned(), people);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn people_enter_once_and_renames_are_nick_changes() {
        let g = Ghosts::new();
        assert!(matches!(g.seen("c", "1", "Tom"), Some(EventKind::Joined { .. })));
        assert_eq!(g.seen("c", "1", "Tom"), None);
        assert_eq!(g.seen("c", "1", "Thomas"), Some(EventKind::NickChanged { new_nick: "Thomas".into() }));
        assert!(matches!(g.seen("d", "1", "Thomas"), Some(EventKind::Joined { .. })), "per chat");
        g.set_standing("c", "2", "Ann", Role::Moderator, Affiliation::Owner);
        let o = g.occupants("c");
        assert_eq!(o.iter().map(|o| o.nick.as_str()).collect::<Vec<_>>(), vec!["Ann", "Thomas"]);
        assert_eq!(o[0].role, Role::Moderator);
        g.moved("c", "e");
        assert!(g.occupants("c").is_empty());
        assert_eq!(g.occupants("e").len(), 2);
        assert_eq!(g.any_nick("2").as_deref(), Some("Ann"));
    }

    #[test]
    fn a_chat_holds_a_bounded_number_of_people() {
        let g = Ghosts::new();
        for i in 0..MAX_PER_CHAT + 5 {
            g.seen("c", &i.to_string(), "x");
        }
        assert_eq!(g.occupants("c").len(), MAX_PER_CHAT);
    }
}
