//! A portal room's state as the gateway reads it: members, their display names
//! and power levels, the topic.

use super::*;

/// Who may do what in a room, from its `m.room.create` and `m.room.power_levels`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Powers {
    pub(super) users: HashMap<String, i64>,
    pub(super) default: i64,
    /// Room version 12 and later: the creators outrank everyone.
    pub(super) creators: HashSet<String>,
}

impl Powers {
    /// From a room's state events (as `GET /rooms/{roomId}/state` gives them).
    pub fn from_state(state: &[Value]) -> Powers {
        let find = |t: &str| state.iter().find(|e| e["type"] == t && e["state_key"] == "");
        let mut p = Powers::default();
        let create = find("m.room.create");
        let creator =
            create.and_then(|c| c["content"]["creator"].as_str().or_else(|| c["sender"].as_str()).map(str::to_owned));
        if let Some(c) = create {
            let version = c["content"]["room_version"].as_str().unwrap_or("1");
            let privileged =
                version.parse::<u32>().map(|v| v >= 12).unwrap_or(false) || version.starts_with("org.matrix.hydra");
            if privileged {
                p.creators.extend(c["sender"].as_str().map(str::to_owned));
                if let Some(more) = c["content"]["additional_creators"].as_array() {
                    p.creators.extend(more.iter().filter_map(Value::as_str).map(str::to_owned));
                }
            }
        }
        match find("m.room.power_levels") {
            Some(pl) => {
                let levels = UserLevels::from_content(&pl["content"]);
                p.default = levels.users_default;
                p.users = levels.users.into_iter().collect();
            }
            // Without power levels the creator may do everything.
            None => p.users.extend(creator.map(|c| (c, 100))),
        }
        p
    }

    pub fn level(&self, user: &str) -> i64 {
        if self.creators.contains(user) {
            return i64::MAX;
        }
        self.users.get(user).copied().unwrap_or(self.default)
    }

    /// A member's MUC role and affiliation: 50 and above moderate, 100 own.
    pub fn occupant(&self, user: &str, nick: String) -> Occupant {
        crate::session::occupant_at_level(user, nick, self.level(user))
    }
}

/// Joined members (user id → display name) in a room's state events.
pub fn joined_members(state: &[Value]) -> HashMap<String, Option<String>> {
    state
        .iter()
        .filter(|e| e["type"] == "m.room.member" && e["content"]["membership"] == "join")
        .filter_map(|e| {
            let user = e["state_key"].as_str()?;
            Some((user.to_owned(), e["content"]["displayname"].as_str().map(str::to_owned)))
        })
        .collect()
}

/// A room's topic in its state events.
pub fn topic_of(state: &[Value]) -> Option<String> {
    state
        .iter()
        .find(|e| e["type"] == "m.room.topic" && e["state_key"] == "")
        .and_then(|e| e["content"]["topic"].as_str())
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
}

/// The MUC nick of `user` among `members`: the display name (the localpart without
/// one), with the user id added when another member has the same display name.
pub fn nick_in(members: &HashMap<String, Option<String>>, user: &str) -> String {
    let Some(known) = members.get(user) else { return user.to_owned() };
    match known.as_deref().map(str::trim).filter(|d| !d.is_empty()) {
        Some(name) => {
            let ambiguous = members.iter().any(|(u, d)| u != user && d.as_deref().map(str::trim) == Some(name));
            if ambiguous { format!("{name} ({user})") } else { name.to_owned() }
        }
        None => user.strip_prefix('@').and_then(|u| u.split(':').next()).unwrap_or(user).to_owned(),
    }
}
