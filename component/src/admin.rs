//! Admin commands on each network's domain, for the accounts listed in
//! `access.admins` (bare JIDs, matched exactly and without regard to case; no
//! domains, no wildcards). As XEP-0050 ad-hoc commands and as chat messages to the
//! domain's JID, like the other commands of [`crate::commands`]:
//!
//! | command | what it does |
//! |---|---|
//! | `users` | the XMPP accounts using this network: each one's sessions (IRC: a connection per server, with its nick and state; Matrix: the login's mxid) and the rooms it is in |
//! | `disconnect` | a form with an account's JID (and a reason): closes its sessions on this network (IRC: QUIT with the reason; Matrix: the sync stops, the device stays logged in) and takes it out of its rooms (each device gets an unavailable self-presence with the reason, status 333) |
//! | `link-status` | the component link (or the embedded server), the network's connections, the durable outbox per destination (rows waiting and the oldest one's age), the rooms joined |
//! | `announce` | a form with a text: sent to every room joined on this network, from the room, to each device in it |
//! | `portals`, `link`, `unlink` | the portals (see [`crate::portal_admin`]) |
//!
//! Others do not see them in the command list and get `forbidden` (with a text)
//! when they run one. An admin must also be allowed to use the network.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use isthmus_core::model::{EventKind, LeaveKind};
use tokio_xmpp::Stanza;
use tokio_xmpp::parsers::data_forms::{DataForm, DataFormType, Field, FieldType};
use tokio_xmpp::parsers::iq::Iq;
use tokio_xmpp::parsers::jid::{BareJid, FullJid, Jid};
use tokio_xmpp::parsers::message::MessageType;
use tokio_xmpp::parsers::muc::user::{Affiliation, Item, MucUser, Role, Status};
use tokio_xmpp::parsers::presence::Presence;
use tokio_xmpp::parsers::stanza_error::{DefinedCondition, ErrorType};
use tracing::info;

use crate::commands::{adhoc_error, completed};
use crate::gateway::{Domain, Gateway};
use crate::stanza;
use crate::xep::AdHocCommand;

/// (node, description) of the admin commands.
pub const ADMIN_COMMANDS: &[(&str, &str)] = &[
    ("users", "List the accounts using this network and their sessions (admin)"),
    ("disconnect", "Close an account's sessions on this network (admin)"),
    ("link-status", "Show the link, the connections and the outbox (admin)"),
    ("announce", "Send a message to every room joined on this network (admin)"),
    ("portals", "List the portals and the chats they link (admin)"),
    ("link", "Link a chat to a portal (admin)"),
    ("unlink", "Take a chat out of its portal (admin)"),
];

/// What someone not in `access.admins` is told.
pub const NOT_ADMIN: &str = "this command is for the gateway's admins (access.admins)";

/// The reason given when an admin disconnects someone without saying why.
pub const DEFAULT_REASON: &str = "disconnected by the gateway's admin";

/// Whether `node` names an admin command.
pub fn is_admin_node(node: &str) -> bool {
    ADMIN_COMMANDS.iter().any(|(name, _)| *name == node)
}

/// Whether `jid` is one of `admins`: its bare JID, exactly, without regard to case.
/// An entry that is not a bare JID with a local part (a domain, a full JID) matches nobody.
pub fn is_admin(admins: &[String], jid: &Jid) -> bool {
    let bare = jid.to_bare();
    if bare.node().is_none() {
        return false;
    }
    admins.iter().any(|entry| {
        let entry = entry.trim();
        entry.contains('@')
            && !entry.contains('/')
            && (entry.eq_ignore_ascii_case(bare.as_str()) || BareJid::new(entry).is_ok_and(|e| e == bare))
    })
}

/// The commands `jid` sees in the command list of a domain whose admins are `admins`.
pub fn visible_commands(admins: &[String], jid: &Jid) -> &'static [(&'static str, &'static str)] {
    if is_admin(admins, jid) { ADMIN_COMMANDS } else { &[] }
}

/// The state of one domain's link to the XMPP server, for `link-status`.
#[derive(Debug)]
pub struct LinkState {
    /// In-process (embedded mode): always up.
    embedded: bool,
    inner: Mutex<LinkInner>,
}

#[derive(Debug)]
struct LinkInner {
    up: bool,
    since: SystemTime,
    /// Why it went down, while it is.
    reason: Option<String>,
}

impl LinkState {
    /// A component link, connecting.
    pub fn component() -> Arc<LinkState> {
        let inner = LinkInner { up: false, since: SystemTime::now(), reason: Some("connecting".into()) };
        Arc::new(LinkState { embedded: false, inner: Mutex::new(inner) })
    }

    /// The embedded server's in-process link: up for good.
    pub fn embedded() -> Arc<LinkState> {
        let inner = LinkInner { up: true, since: SystemTime::now(), reason: None };
        Arc::new(LinkState { embedded: true, inner: Mutex::new(inner) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LinkInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The link is established.
    pub fn up(&self) {
        *self.lock() = LinkInner { up: true, since: SystemTime::now(), reason: None };
    }

    /// The link was lost (or could not be made), for `reason`.
    pub fn down(&self, reason: &str) {
        let mut inner = self.lock();
        if inner.up || inner.reason.is_none() {
            inner.since = SystemTime::now();
        }
        inner.up = false;
        inner.reason = Some(reason.to_owned());
    }

    /// Whether the link is up.
    pub fn is_up(&self) -> bool {
        self.lock().up
    }

    /// One line: up or down, since when, and why.
    pub fn describe(&self, now: SystemTime) -> String {
        let inner = self.lock();
        let age = age(now.duration_since(inner.since).unwrap_or_default());
        match (self.embedded, inner.up, &inner.reason) {
            (true, _, _) => format!("in process (embedded server), up for {age}"),
            (false, true, _) => format!("component link up for {age}"),
            (false, false, reason) => {
                format!("component link DOWN for {age} ({})", reason.as_deref().unwrap_or("unknown reason"))
            }
        }
    }
}

/// A duration for people: `42 s`, `3 min 5 s`, `2 h 10 min`, `3 d 4 h`.
pub fn age(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min {} s", s / 60, s % 60),
        3600..86_400 => format!("{} h {} min", s / 3600, s % 3600 / 60),
        _ => format!("{} d {} h", s / 86_400, s % 86_400 / 3600),
    }
}

/// The outbox lines of `link-status`: every destination with rows waiting, and
/// this network's and the XMPP side's even when nothing waits. (destination, rows,
/// oldest row's creation in µs since the epoch).
pub fn outbox_lines(network: &str, depth: &[(String, i64, i64)], now_us: i64) -> Vec<String> {
    let mut lines = Vec::new();
    for wanted in [network, "xmpp"] {
        if !depth.iter().any(|(d, _, _)| d == wanted) {
            lines.push(format!("{wanted}: 0 waiting"));
        }
    }
    for (destination, rows, oldest_us) in depth {
        let oldest = Duration::from_micros(u64::try_from(now_us.saturating_sub(*oldest_us)).unwrap_or(0));
        lines.push(format!("{destination}: {rows} waiting, the oldest for {}", age(oldest)));
    }
    lines.sort();
    lines
}

/// One room of an account, for `users`: (room, nick, devices).
type RoomLine = (BareJid, String, usize);

fn field(var: &str, type_: FieldType, label: &str, required: bool) -> Field {
    Field {
        var: Some(var.into()),
        type_,
        label: Some(label.into()),
        required,
        desc: None,
        options: vec![],
        values: vec![],
        media: vec![],
        validate: None,
    }
}

/// A first step: `form`, with a new session.
fn executing(node: &str, title: String, fields: Vec<Field>) -> AdHocCommand {
    let mut form = DataForm::new(DataFormType::Form, "", fields);
    form.title = Some(title);
    AdHocCommand {
        node: node.to_owned(),
        sessionid: Some(uuid::Uuid::new_v4().to_string()),
        action: None,
        status: Some("executing".into()),
        form: Some(form),
        notes: vec![],
    }
}

/// The values of `var` in a submitted form (`None`: no such field, i.e. the first step).
fn values<'a>(cmd: &'a AdHocCommand, var: &str) -> Option<&'a [String]> {
    let form = cmd.form.as_ref().filter(|f| f.type_ == DataFormType::Submit)?;
    form.fields.iter().find(|f| f.var.as_deref() == Some(var)).map(|f| f.values.as_slice())
}

impl Gateway {
    /// Whether `jid` is an admin of the gateway (see [`is_admin`]).
    pub(crate) fn is_admin(domain: &Domain, jid: &Jid) -> bool {
        is_admin(&domain.admins, jid)
    }

    /// An admin command as XEP-0050 (`cmd` is parsed, its sender allowed on the domain).
    pub(crate) async fn admin_adhoc(&self, domain: &Domain, from: &Jid, id: &str, cmd: AdHocCommand) -> Iq {
        if !Self::is_admin(domain, from) {
            return adhoc_error(id, ErrorType::Auth, DefinedCondition::Forbidden, NOT_ADMIN);
        }
        let admin = from.to_bare();
        let session = cmd.sessionid.clone();
        let answer = match cmd.node.as_str() {
            "users" => completed("users", None, self.users_text(domain).await),
            "link-status" => completed("link-status", None, self.link_status_text(domain).await),
            "disconnect" => match values(&cmd, "account") {
                None => executing(
                    "disconnect",
                    format!("Disconnect an account from {}", domain.name),
                    vec![
                        field("account", FieldType::JidSingle, "Account (bare JID)", true),
                        Field {
                            values: vec![DEFAULT_REASON.into()],
                            ..field("reason", FieldType::TextSingle, "Reason", false)
                        },
                    ],
                ),
                Some(account) => {
                    let Some(account) = account.first().and_then(|a| BareJid::new(a.trim()).ok()) else {
                        let text = "`account` must be a bare JID (user@server)";
                        return adhoc_error(id, ErrorType::Modify, DefinedCondition::BadRequest, text);
                    };
                    let reason = values(&cmd, "reason").and_then(|r| r.first()).map(|r| r.trim()).unwrap_or_default();
                    let reason = if reason.is_empty() { DEFAULT_REASON } else { reason };
                    completed("disconnect", session, self.disconnect_account(domain, &admin, &account, reason).await)
                }
            },
            "announce" => match values(&cmd, "text") {
                None => executing(
                    "announce",
                    format!("Announce in every room of {}", domain.name),
                    vec![field("text", FieldType::TextMulti, "Announcement", true)],
                ),
                Some(lines) => {
                    let text = lines.join("\n");
                    if text.trim().is_empty() {
                        let text = "`text` is empty: nothing to announce";
                        return adhoc_error(id, ErrorType::Modify, DefinedCondition::BadRequest, text);
                    }
                    completed("announce", session, self.announce(domain, &admin, &text).await)
                }
            },
            "portals" => completed("portals", None, self.portals_text()),
            node @ ("link" | "unlink") => {
                let value = |var: &str| values(&cmd, var).and_then(|v| v.first()).map(|v| v.trim().to_owned());
                match (node, value("network"), value("chat")) {
                    (_, None, _) | (_, _, None) => {
                        let title =
                            if node == "link" { "Link a chat to a portal" } else { "Take a chat out of its portal" };
                        executing(node, title.to_owned(), crate::portal_admin::fields(node))
                    }
                    ("link", Some(network), Some(chat)) => {
                        let Some(portal) = value("portal").filter(|p| !p.is_empty()) else {
                            let text = "`portal` is empty: name the portal";
                            return adhoc_error(id, ErrorType::Modify, DefinedCondition::BadRequest, text);
                        };
                        let room = value("room");
                        completed(node, session, self.link_portal(&portal, &network, &chat, room.as_deref()).await)
                    }
                    (_, Some(network), Some(chat)) => {
                        completed(node, session, self.unlink_portal(&network, &chat).await)
                    }
                }
            }
            other => {
                let text = format!("no command `{other}`; see the command list");
                return adhoc_error(id, ErrorType::Cancel, DefinedCondition::ItemNotFound, &text);
            }
        };
        Iq::Result { from: None, to: None, id: id.to_owned(), payload: Some(answer.into()) }
    }

    /// An admin command as a chat message (`command` and the words after it); the reply.
    pub(crate) async fn admin_chat(&self, domain: &Domain, from: &Jid, command: &str, rest: &str) -> String {
        if !Self::is_admin(domain, from) {
            return format!("Forbidden: {NOT_ADMIN}.");
        }
        let admin = from.to_bare();
        match command {
            "users" => self.users_text(domain).await,
            "link-status" => self.link_status_text(domain).await,
            "disconnect" => {
                let mut words = rest.trim().splitn(2, char::is_whitespace);
                match words.next().and_then(|a| BareJid::new(a).ok()) {
                    Some(account) => {
                        let reason = words.next().map(str::trim).filter(|r| !r.is_empty()).unwrap_or(DEFAULT_REASON);
                        self.disconnect_account(domain, &admin, &account, reason).await
                    }
                    None => "Usage: disconnect ACCOUNT-JID [REASON]".to_owned(),
                }
            }
            "announce" if !rest.trim().is_empty() => self.announce(domain, &admin, rest.trim()).await,
            "announce" => "Usage: announce TEXT".to_owned(),
            other => match self.portal_chat_command(other, rest).await {
                Some(reply) => reply,
                None => format!("Unknown command `{other}`."),
            },
        }
    }

    /// Every account with a session on `domain`'s network or a room on the domain,
    /// sorted, with its rooms there: (room, nick, devices).
    fn accounts_and_rooms(&self, domain: &Domain, reported: &[BareJid]) -> Vec<(BareJid, Vec<RoomLine>)> {
        let mut by_account: std::collections::BTreeMap<String, (BareJid, Vec<RoomLine>)> =
            reported.iter().map(|a| (a.to_string(), (a.clone(), Vec::new()))).collect();
        for ((room, account), s) in self.rooms().iter() {
            if room.domain().as_str() != domain.name {
                continue;
            }
            let devices = s.resources.len() + s.pending.len();
            let nick = if s.joined { s.nick.clone() } else { format!("{} (joining)", s.nick) };
            by_account.entry(account.to_string()).or_insert_with(|| (account.clone(), Vec::new())).1.push((
                room.clone(),
                nick,
                devices,
            ));
        }
        by_account
            .into_values()
            .map(|(account, mut rooms)| {
                rooms.sort_by_key(|(r, _, _)| r.to_string());
                (account, rooms)
            })
            .collect()
    }

    /// `users`: each account, its sessions on the network, its rooms.
    pub(crate) async fn users_text(&self, domain: &Domain) -> String {
        let network = self.network_of(domain);
        let reported = match &network {
            Some(n) => n.accounts().await,
            None => None,
        };
        let accounts = self.accounts_and_rooms(domain, reported.as_deref().unwrap_or_default());
        let mut text = String::new();
        if reported.is_none() {
            text.push_str(&format!("{} does not report its sessions: rooms only.\n", domain.kind));
        }
        if accounts.is_empty() {
            text.push_str(&format!("No account uses {} now.", domain.name));
            return text;
        }
        text.push_str(&format!(
            "{} account{} on {}:",
            accounts.len(),
            if accounts.len() == 1 { "" } else { "s" },
            domain.name
        ));
        for (account, rooms) in accounts {
            text.push_str(&format!("\n{account}"));
            let sessions = match &network {
                Some(n) => n.account_status(&account).await,
                None => Vec::new(),
            };
            if sessions.is_empty() {
                text.push_str(&format!("\n  no {} connection", domain.kind));
            }
            for line in sessions {
                text.push_str(&format!("\n  {} {line}", domain.kind));
            }
            for (room, nick, devices) in rooms {
                let plural = if devices == 1 { "" } else { "s" };
                text.push_str(&format!("\n  room {room} as {nick}, {devices} device{plural}"));
            }
        }
        text
    }

    /// `link-status`: the link, the network's connections, the outbox, the rooms.
    pub(crate) async fn link_status_text(&self, domain: &Domain) -> String {
        let now = SystemTime::now();
        let mut text = format!("{}: {}", domain.name, domain.link.describe(now));
        match self.network_of(domain) {
            Some(n) => {
                text.push_str(&format!("\n{} connections:", domain.kind));
                let lines = n.connections_status().await;
                if lines.is_empty() {
                    text.push_str(" not reported");
                }
                for line in lines {
                    text.push_str(&format!("\n  {line}"));
                }
            }
            None => text.push_str(&format!("\n{} is not running", domain.kind)),
        }
        text.push_str("\nOutbox (accepted, waiting to be delivered), per destination:");
        match self.router.get().map(|r| r.store().clone()) {
            Some(store) => match store.outbox_depth().await {
                Ok(depth) => {
                    let depth: Vec<(String, i64, i64)> =
                        depth.into_iter().map(|d| (d.destination, d.rows, d.oldest_us)).collect();
                    let now_us = isthmus_core::store::now_us();
                    for line in outbox_lines(domain.network.as_str(), &depth, now_us) {
                        text.push_str(&format!("\n  {line}"));
                    }
                }
                Err(e) => text.push_str(&format!("\n  cannot read it: {e}")),
            },
            None => text.push_str("\n  the gateway is starting"),
        }
        let (sessions, accounts, devices) = {
            let rooms = self.rooms();
            let mine: Vec<_> = rooms.iter().filter(|((room, _), _)| room.domain().as_str() == domain.name).collect();
            let accounts: std::collections::HashSet<&BareJid> = mine.iter().map(|((_, a), _)| a).collect();
            let devices: usize = mine.iter().map(|(_, s)| s.resources.len()).sum();
            (mine.iter().filter(|(_, s)| s.joined).count(), accounts.len(), devices)
        };
        text.push_str(&format!(
            "\nRooms: {sessions} joined by {accounts} account{}, {devices} device{} in them",
            if accounts == 1 { "" } else { "s" },
            if devices == 1 { "" } else { "s" }
        ));
        text
    }

    /// `disconnect`: close `account`'s sessions on the network and take it out of
    /// its rooms on the domain, saying `reason`; the text for the admin.
    pub(crate) async fn disconnect_account(
        &self,
        domain: &Domain,
        admin: &BareJid,
        account: &BareJid,
        reason: &str,
    ) -> String {
        let closed = match self.network_of(domain) {
            Some(n) => n.disconnect(account, reason).await,
            None => None,
        };
        let sessions: Vec<(BareJid, crate::gateway::RoomSession)> = {
            let mut rooms = self.rooms();
            let keys: Vec<_> = rooms
                .keys()
                .filter(|(room, a)| a == account && room.domain().as_str() == domain.name)
                .cloned()
                .collect();
            keys.into_iter().filter_map(|k| rooms.remove(&k).map(|s| (k.0, s))).collect()
        };
        info!(admin = %admin, account = %account, reason, rooms = sessions.len(), domain = %domain.name,
            "account disconnected by an admin");
        let mut devices = 0;
        for (room, session) in &sessions {
            self.save_session(room, account);
            let Ok(own) = format!("{room}/{}", session.nick).parse::<Jid>() else { continue };
            let resources: std::collections::BTreeSet<&FullJid> =
                session.resources.iter().chain(session.pending.iter()).collect();
            for res in resources {
                let item = Item::new(Affiliation::None, Role::None).with_reason(reason);
                let muc_user = MucUser::new()
                    .with_items(vec![item])
                    .with_statuses(vec![Status::SelfPresence, Status::ServiceErrorKick]);
                let mut p = Presence::unavailable().with_from(own.clone()).with_to(Jid::from(res.clone()));
                p.set_status("en", reason);
                self.send(domain, Stanza::Presence(p.with_payload(muc_user))).await;
                devices += 1;
            }
            // A portal room is shared: the others see the account leave, and its puppet leaves.
            if self.is_portal(room)
                && let Ok(chat) = self.chat_of(domain, &Jid::from(room.clone()))
            {
                let event = self.user_event(
                    chat,
                    account,
                    session.nick.clone(),
                    EventKind::Left { kind: LeaveKind::Part, reason: Some(reason.to_owned()) },
                );
                self.portal_fanout(domain, room, &event, account);
                self.route(event).await;
            }
        }
        let mut text = match closed {
            None => format!("{} cannot close sessions; ", domain.kind),
            Some(lines) if lines.is_empty() => format!("{account} had no {} session; ", domain.kind),
            Some(lines) => format!("Closed {account}'s {} sessions: {}; ", domain.kind, lines.join(", ")),
        };
        if sessions.is_empty() {
            text.push_str("it was in no room.");
        } else {
            text.push_str(&format!(
                "removed it from {} room{} ({devices} device{} told).",
                sessions.len(),
                if sessions.len() == 1 { "" } else { "s" },
                if devices == 1 { "" } else { "s" }
            ));
        }
        text
    }

    /// `announce`: `text` to every device in every room joined on the domain, from
    /// the room; the text for the admin.
    pub(crate) async fn announce(&self, domain: &Domain, admin: &BareJid, text: &str) -> String {
        let targets: Vec<(BareJid, Vec<FullJid>)> = self
            .rooms()
            .iter()
            .filter(|((room, _), s)| room.domain().as_str() == domain.name && s.joined)
            .map(|((room, _), s)| (room.clone(), s.resources.iter().cloned().collect()))
            .collect();
        let mut rooms = std::collections::HashSet::new();
        let mut devices = 0;
        for (room, resources) in targets {
            for res in resources {
                let mut m = stanza::message(MessageType::Groupchat, Jid::from(room.clone()), Jid::from(res), text);
                m.id = Some(stanza::new_id());
                self.send(domain, Stanza::Message(m)).await;
                rooms.insert(room.clone());
                devices += 1;
            }
        }
        info!(admin = %admin, domain = %domain.name, rooms = rooms.len(), devices, "announcement sent");
        format!(
            "Announced in {} room{} ({devices} device{}).",
            rooms.len(),
            if rooms.len() == 1 { "" } else { "s" },
            if devices == 1 { "" } else { "s" }
        )
    }
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
    fn admins_are_matched_by_bare_jid_without_regard_to_case() {
        let admins = list(&["Admin@Example.org"]);
        assert!(is_admin(&admins, &jid("admin@example.org")));
        assert!(is_admin(&admins, &jid("ADMIN@example.ORG/phone")), "any resource of the bare JID");
        assert!(!is_admin(&admins, &jid("admin2@example.org")));
        assert!(!is_admin(&admins, &jid("admin@example.org.evil")));
        assert!(!is_admin(&admins, &jid("other@example.org")));
    }

    #[test]
    fn domains_wildcards_and_full_jids_make_nobody_an_admin() {
        for entry in ["example.org", "*", "*@example.org", "admin@example.org/phone", ""] {
            let admins = list(&[entry]);
            for who in ["admin@example.org", "admin@example.org/phone", "example.org", "x@example.org"] {
                assert!(!is_admin(&admins, &jid(who)), "{entry:?} must not admit {who}");
            }
        }
        assert!(!is_admin(&[], &jid("admin@example.org")), "no admins: nobody");
    }

    #[test]
    fn only_admins_see_the_admin_commands() {
        let admins = list(&["admin@example.org"]);
        let seen: Vec<&str> = visible_commands(&admins, &jid("admin@example.org/pc")).iter().map(|c| c.0).collect();
        assert_eq!(seen, vec!["users", "disconnect", "link-status", "announce", "portals", "link", "unlink"]);
        assert!(visible_commands(&admins, &jid("user@example.org/pc")).is_empty());
        assert!(ADMIN_COMMANDS.iter().all(|(n, _)| is_admin_node(n)));
        assert!(!is_admin_node("status") && !is_admin_node("leave"));
    }

    #[test]
    fn the_outbox_lines_name_this_network_and_xmpp_even_when_empty() {
        let now = 100_000_000;
        assert_eq!(outbox_lines("irc.x", &[], now), vec!["irc.x: 0 waiting", "xmpp: 0 waiting"]);
        let depth = vec![("irc.x".to_owned(), 7, now - 65_000_000), ("matrix.x".to_owned(), 1, now - 2_000_000)];
        assert_eq!(
            outbox_lines("irc.x", &depth, now),
            vec![
                "irc.x: 7 waiting, the oldest for 1 min 5 s",
                "matrix.x: 1 waiting, the oldest for 2 s",
                "xmpp: 0 waiting"
            ]
        );
    }

    #[test]
    fn the_link_state_says_up_or_down_and_why() {
        let link = LinkState::component();
        let now = SystemTime::now();
        assert!(link.describe(now).starts_with("component link DOWN"), "connecting at first");
        link.up();
        assert!(link.is_up());
        let later = SystemTime::now() + Duration::from_secs(90);
        assert!(link.describe(later).contains("up for 1 min 30 s"), "{}", link.describe(later));
        link.down("stream closed");
        assert!(link.describe(SystemTime::now()).contains("(stream closed)"));
        assert!(LinkState::embedded().describe(SystemTime::now()).starts_with("in process"));
        assert_eq!(age(Duration::from_secs(2 * 86_400 + 3600)), "2 d 1 h");
    }

    fn commands_query() -> tokio_xmpp::parsers::minidom::Element {
        "<query xmlns='http://jabber.org/protocol/disco#items' node='http://jabber.org/protocol/commands'/>"
            .parse()
            .expect("a valid query")
    }

    #[test]
    fn the_command_list_has_the_admin_commands_for_admins_only() {
        let domain = jid("irc.example.org");
        let nodes = |admin: bool| -> Vec<String> {
            crate::commands::command_items(&domain, &commands_query(), false, admin)
                .children()
                .filter_map(|item| item.attr("node").map(str::to_owned))
                .collect()
        };
        assert_eq!(nodes(false), vec!["status", "rooms", "leave"]);
        assert_eq!(
            nodes(true),
            vec![
                "status",
                "rooms",
                "leave",
                "users",
                "disconnect",
                "link-status",
                "announce",
                "portals",
                "link",
                "unlink"
            ]
        );
    }

    use crate::gateway::Outgoing;
    use isthmus_core::address::Escaping;
    use isthmus_core::model::NetworkId;
    use tokio::sync::mpsc;

    const ROOM: &str = "#ops%irc.example.net@irc.example.org";

    /// A gateway on one IRC domain (no network running) where bob@example.org is in
    /// [`ROOM`] on two devices; the stanzas it sends come out of the receiver.
    async fn gateway(admins: &[&str]) -> (Arc<Gateway>, Domain, mpsc::UnboundedReceiver<Outgoing>) {
        let store = isthmus_core::store::Store::connect("sqlite::memory:", 1).await.expect("store");
        store.migrate().await.expect("migrate");
        let (tx, rx) = mpsc::unbounded_channel();
        let domain = Domain {
            name: "irc.example.org".into(),
            network: NetworkId::new("irc.example.org".to_owned()),
            escaping: Escaping::CaseInsensitive,
            kind: "IRC",
            persistent: false,
            reconnect_grace: Duration::ZERO,
            allow: list(&["example.org"]),
            admins: list(admins),
            link: LinkState::component(),
            outgoing: crate::gateway::OutgoingQueue::new(tx),
        };
        let archive = crate::archive::Archive::spawn(store, 0);
        let gateway = Gateway::new(vec![domain.clone()], archive, 20);
        {
            let mut rooms = gateway.rooms();
            let session = rooms
                .entry((BareJid::new(ROOM).expect("room"), BareJid::new("bob@example.org").expect("bob")))
                .or_default();
            session.joined = true;
            session.nick = "bob".into();
            for res in ["bob@example.org/phone", "bob@example.org/laptop"] {
                session.resources.insert(FullJid::new(res).expect("a full JID"));
            }
        }
        (gateway, domain, rx)
    }

    async fn run(gateway: &Gateway, domain: &Domain, from: &str, command: &str) -> String {
        let payload = command.parse().expect("a valid command");
        let answer = gateway.adhoc(domain, &jid(from), "c1", payload).await;
        String::from(&tokio_xmpp::parsers::minidom::Element::from(answer))
    }

    fn execute(node: &str) -> String {
        format!("<command xmlns='http://jabber.org/protocol/commands' node='{node}' action='execute'/>")
    }

    fn submit(node: &str, var: &str, value: &str) -> String {
        format!(
            "<command xmlns='http://jabber.org/protocol/commands' node='{node}' sessionid='s'>\
             <x xmlns='jabber:x:data' type='submit'><field var='{var}'><value>{value}</value></field></x></command>"
        )
    }

    fn sent(rx: &mut mpsc::UnboundedReceiver<Outgoing>) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(item) = rx.try_recv() {
            out.push(String::from(&tokio_xmpp::parsers::minidom::Element::from(item.stanza)));
        }
        out.sort();
        out
    }

    #[tokio::test]
    async fn others_are_refused_every_admin_command_with_a_reason() {
        let (gateway, domain, mut rx) = gateway(&["admin@example.org"]).await;
        for command in [
            execute("users"),
            execute("link-status"),
            execute("disconnect"),
            submit("disconnect", "account", "bob@example.org"),
            submit("announce", "text", "hello"),
        ] {
            let answer = run(&gateway, &domain, "bob@example.org/phone", &command).await;
            assert!(answer.contains("type='error'") && answer.contains("<forbidden"), "{command}: {answer}");
            assert!(answer.contains(NOT_ADMIN), "{answer}");
        }
        assert!(sent(&mut rx).is_empty(), "nothing was sent for a refused command");
        assert_eq!(gateway.rooms().len(), 1, "bob is still in the room");
        // As chat commands: the same refusal, in words.
        let reply = gateway.admin_chat(&domain, &jid("bob@example.org/phone"), "announce", "hi").await;
        assert!(reply.contains(NOT_ADMIN), "{reply}");
    }

    #[tokio::test]
    async fn an_admin_lists_the_users_and_the_link() {
        let (gateway, domain, _rx) = gateway(&["ADMIN@example.org"]).await;
        let users = run(&gateway, &domain, "admin@example.org/pc", &execute("users")).await;
        assert!(users.contains("status='completed'"), "{users}");
        assert!(users.contains("bob@example.org"), "{users}");
        assert!(users.contains(&format!("room {ROOM} as bob, 2 devices")), "{users}");
        let status = run(&gateway, &domain, "admin@example.org/pc", &execute("link-status")).await;
        assert!(status.contains("irc.example.org: component link DOWN"), "{status}");
        assert!(status.contains("Rooms: 1 joined by 1 account, 2 devices in them"), "{status}");
    }

    #[tokio::test]
    async fn an_announcement_reaches_every_device_in_every_room() {
        let (gateway, domain, mut rx) = gateway(&["admin@example.org"]).await;
        let form = run(&gateway, &domain, "admin@example.org/pc", &execute("announce")).await;
        assert!(form.contains("status='executing'") && form.contains("var='text'"), "{form}");
        let done = run(&gateway, &domain, "admin@example.org/pc", &submit("announce", "text", "Back at noon")).await;
        assert!(done.contains("Announced in 1 room (2 devices)."), "{done}");
        let out = sent(&mut rx);
        assert_eq!(out.len(), 2, "{out:?}");
        // One to each device, in no particular order (the room's devices are a set).
        for device in ["laptop", "phone"] {
            let to = format!("to='bob@example.org/{device}'");
            let m = out.iter().find(|m| m.contains(&to)).unwrap_or_else(|| panic!("none {to}: {out:?}"));
            assert!(m.contains("type='groupchat'") && m.contains("<body>Back at noon</body>"), "{m}");
            assert!(m.contains("from='#ops%irc.example.net@irc.example.org'"), "{m}");
        }
    }

    #[tokio::test]
    async fn a_disconnected_account_leaves_its_rooms_with_the_reason() {
        let (gateway, domain, mut rx) = gateway(&["admin@example.org"]).await;
        let done =
            run(&gateway, &domain, "admin@example.org/pc", &submit("disconnect", "account", "Bob@Example.org")).await;
        assert!(done.contains("removed it from 1 room (2 devices told)"), "{done}");
        assert!(gateway.rooms().is_empty(), "the session is gone");
        let out = sent(&mut rx);
        assert_eq!(out.len(), 2, "{out:?}");
        for p in &out {
            assert!(p.contains("type='unavailable'") && p.contains("code='333'"), "{p}");
            assert!(p.contains("code='110'") && p.contains(DEFAULT_REASON), "{p}");
        }
        let bad = run(&gateway, &domain, "admin@example.org/pc", &submit("disconnect", "account", "not a jid@")).await;
        assert!(bad.contains("<bad-request"), "{bad}");
    }
}
