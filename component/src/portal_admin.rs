//! The admins' portal commands, on every network's domain (XEP-0050 and chat):
//!
//! | command | what it does |
//! |---|---|
//! | `portals` | every portal: its XMPP room and the chats it links |
//! | `link PORTAL NETWORK CHAT [ROOM]` | link the chat `CHAT` of the network whose domain is `NETWORK` to the portal (a new portal needs its XMPP room, `NAME@DOMAIN` on one of the gateway's domains) |
//! | `unlink NETWORK CHAT` | take the chat out of its portal (the portal goes with its last chat) |
//!
//! Changes are stored at once and kept across restarts.

use isthmus_core::model::{ChatKind, ChatRef};
use tokio_xmpp::parsers::data_forms::{Field, FieldType};
use tokio_xmpp::parsers::jid::BareJid;

use crate::gateway::Gateway;

/// (node, description) of the portal commands.
pub const PORTAL_COMMANDS: &[(&str, &str)] = &[
    ("portals", "List the portals and the chats they link (admin)"),
    ("link", "Link a chat to a portal (admin)"),
    ("unlink", "Take a chat out of its portal (admin)"),
];

/// The form fields of `link` (`with_room`: and the room, for a new portal) and `unlink`.
pub fn fields(node: &str) -> Vec<Field> {
    let f = |var: &str, label: &str, required: bool| Field {
        var: Some(var.to_owned()),
        type_: FieldType::TextSingle,
        label: Some(label.to_owned()),
        required,
        ..Field::text_single(var, "")
    };
    match node {
        "link" => vec![
            f("portal", "Portal name", true),
            f("network", "Network (its domain)", true),
            f("chat", "Chat on that network", true),
            f("room", "XMPP room of a new portal (NAME@DOMAIN)", false),
        ],
        "unlink" => vec![f("network", "Network (its domain)", true), f("chat", "Chat on that network", true)],
        _ => Vec::new(),
    }
}

impl Gateway {
    /// `portals`: one paragraph per portal.
    pub(crate) fn portals_text(&self) -> String {
        let list = self.portal_directory().list();
        if list.is_empty() {
            return "No portals. Link one with: link PORTAL NETWORK CHAT ROOM".to_owned();
        }
        let mut out = String::new();
        for p in list {
            out.push_str(&format!("{} ({}):", p.name, p.room.id));
            for m in &p.members {
                out.push_str(&format!("\n  {} {}", m.network, m.id));
            }
            out.push('\n');
        }
        out.trim_end().to_owned()
    }

    /// The chat `chat` of the network on `network_domain`, if it is one that can be
    /// linked now; else what is wrong, for the admin.
    fn portal_member(&self, network_domain: &str, chat: &str) -> Result<ChatRef, String> {
        let Some(domain) = self.domain(network_domain) else {
            return Err(format!("no network has the domain `{network_domain}`"));
        };
        let router = self.router().ok_or("the gateway is starting")?;
        let network = router.network(&domain.network).ok_or("this network is not running")?;
        match network.chat_kind(chat) {
            Some(ChatKind::Room) => {}
            _ => return Err(format!("`{chat}` is not a group chat on {}", domain.kind)),
        }
        Ok(ChatRef::room(domain.network.clone(), chat))
    }

    /// `link`: the reply for the admin.
    pub(crate) async fn link_portal(&self, portal: &str, network: &str, chat: &str, room: Option<&str>) -> String {
        let member = match self.portal_member(network, chat) {
            Ok(m) => m,
            Err(e) => return format!("Not linked: {e}."),
        };
        let linkable =
            self.router().and_then(|r| r.network(&member.network)).is_some_and(|n| n.links_portals_at_run_time(chat));
        if !linkable {
            return format!(
                "Not linked: {network} takes portals from its configuration only; add the chat to `portals` there."
            );
        }
        let room = room.map(str::trim).filter(|r| !r.is_empty());
        if let Some(room) = room {
            let ok = BareJid::new(room)
                .ok()
                .is_some_and(|j| j.node().is_some() && self.domain(j.domain().as_str()).is_some());
            if !ok {
                return format!(
                    "Not linked: `{room}` is not a room address on one of this gateway's domains (NAME@DOMAIN)."
                );
            }
        }
        match self.portal_directory().link(portal, room, member).await {
            Ok(p) => {
                format!("Linked {chat} on {network} to the portal {} ({}), kept across restarts.", p.name, p.room.id)
            }
            Err(e) => format!("Not linked: {e}."),
        }
    }

    /// `unlink`: the reply for the admin.
    pub(crate) async fn unlink_portal(&self, network: &str, chat: &str) -> String {
        let member = match self.portal_member(network, chat) {
            Ok(m) => m,
            Err(e) => return format!("Not unlinked: {e}."),
        };
        match self.portal_directory().unlink(&member).await {
            Ok(name) => format!("{chat} on {network} is no longer part of the portal {name}."),
            Err(e) => format!("Not unlinked: {e}."),
        }
    }

    /// A portal command as a chat message; `None` when `command` is not one.
    pub(crate) async fn portal_chat_command(&self, command: &str, rest: &str) -> Option<String> {
        let words: Vec<&str> = rest.split_whitespace().collect();
        Some(match (command, words.as_slice()) {
            ("portals", _) => self.portals_text(),
            ("link", [portal, network, chat]) => self.link_portal(portal, network, chat, None).await,
            ("link", [portal, network, chat, room]) => self.link_portal(portal, network, chat, Some(room)).await,
            ("link", _) => "Usage: link PORTAL NETWORK CHAT [ROOM] (ROOM, NAME@DOMAIN, for a new portal)".to_owned(),
            ("unlink", [network, chat]) => self.unlink_portal(network, chat).await,
            ("unlink", _) => "Usage: unlink NETWORK CHAT".to_owned(),
            _ => return None,
        })
    }
}
