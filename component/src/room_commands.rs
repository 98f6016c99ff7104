//! Commands on a room's address (`room@domain`): as XEP-0050 ad-hoc commands, and
//! as chat messages (type `chat`, not `groupchat`) to the room's bare JID, the way
//! the gateway's domain takes `help`, `status`…
//!
//! | command | what it does |
//! |---|---|
//! | `status` | where you stand in this room: joined or not, your nick, your devices, and the connection it goes through (IRC: the server and whether the connection is up; a portal: the rooms it is linked to) |
//! | `leave` | leave the room for all your devices (each gets its own unavailable presence), and on its network as when the last device leaves (IRC: PART; a portal: the puppet leaves; a personal Matrix room stays joined on Matrix); as an ad-hoc command in two steps, a form to confirm then its submission |
//!
//! Only an account with a session in the room (joined, joining, or kept in it on a
//! persistent network) may run them; others get `forbidden` (as chat: the reason).
//! Groupchat messages to the room are what is said in it, never commands.

use isthmus_core::model::{ChatKind, ChatRef, ChatState, Event, EventKind, NetworkId, Sender};
use tokio_xmpp::parsers::data_forms::{DataForm, DataFormType, Field, FieldType};
use tokio_xmpp::parsers::iq::Iq;
use tokio_xmpp::parsers::jid::{BareJid, Jid};
use tokio_xmpp::parsers::message::{Message, MessageType};
use tokio_xmpp::parsers::minidom::Element;
use tokio_xmpp::parsers::stanza_error::{DefinedCondition, ErrorType};

use crate::commands::completed;
use crate::gateway::{Domain, Gateway};
use crate::stanza;
use crate::xep::AdHocCommand;

/// (node, description) of the commands on a room's address.
pub const ROOM_COMMANDS: &[(&str, &str)] =
    &[("status", "Show how you are in this room"), ("leave", "Leave this room (all your devices)")];

/// What a user not in the room is told.
pub const NOT_IN_ROOM: &str = "you are not in this room: join it to use its commands";

/// The field of the `leave` form that confirms it.
const CONFIRM: &str = "confirm";

/// The `leave` form: one boolean to confirm.
fn confirm_form(room: &BareJid) -> DataForm {
    let field = Field {
        var: Some(CONFIRM.into()),
        type_: FieldType::Boolean,
        label: Some(format!("Leave {room} on all your devices?")),
        required: true,
        desc: None,
        options: vec![],
        values: vec!["1".into()],
        media: vec![],
        validate: None,
    };
    let mut form = DataForm::new(DataFormType::Form, "", vec![field]);
    form.title = Some(format!("Leave {room}"));
    form
}

fn help_text() -> String {
    let mut text = "Commands on this room's address (also available as ad-hoc commands):\nhelp — this list".to_owned();
    for (name, desc) in ROOM_COMMANDS {
        text.push_str(&format!("\n{name} — {desc}"));
    }
    text.push_str("\nTo talk in the room, send groupchat messages to it.");
    text
}

impl Gateway {
    /// `to` as a room of `domain`'s network (or a portal room), if it is one.
    fn room_target(&self, domain: &Domain, to: &Jid) -> Option<ChatRef> {
        self.chat_of(domain, to).ok().filter(|c| c.kind == ChatKind::Room)
    }

    /// Whether `account` has a session in `room` (joined, joining, or kept joined).
    fn has_room_session(&self, room: &BareJid, account: &BareJid) -> bool {
        self.rooms().contains_key(&(room.clone(), account.clone()))
    }

    /// disco#items on a room's address: its commands for the commands node, no
    /// items otherwise; `None` when `to` is not a room.
    pub(crate) fn room_items(&self, domain: &Domain, to: &Jid, query: &Element) -> Option<Element> {
        self.room_target(domain, to)?;
        Some(crate::commands::command_list(&to.to_bare(), query, ROOM_COMMANDS))
    }

    /// Whether an ad-hoc command to `to` is for a room (see [`Gateway::adhoc_room`]).
    pub(crate) fn is_room_address(&self, domain: &Domain, to: &Jid) -> bool {
        to.resource().is_none() && self.room_target(domain, to).is_some()
    }

    /// `status` of `room` for `account`.
    async fn room_status_text(&self, domain: &Domain, room: &BareJid, account: &BareJid, chat: &ChatRef) -> String {
        let mut lines = vec![format!("Room {room}")];
        let standing = self.rooms().get(&(room.clone(), account.clone())).map(|s| {
            let devices = s.resources.len();
            let state = if s.joined {
                format!("joined as {}", s.nick)
            } else {
                "joining (waiting for the network to answer)".to_owned()
            };
            let devices = match (devices, s.pending.len()) {
                (0, 0) => "no device of yours in it (you stay joined on the network)".to_owned(),
                (0, p) => format!("{p} of your devices waiting to enter"),
                (1, _) => "1 of your devices in it".to_owned(),
                (n, _) => format!("{n} of your devices in it"),
            };
            (state, devices, s.occupants.len())
        });
        match standing {
            Some((state, devices, others)) => {
                lines.push(format!("You: {state}; {devices}"));
                lines.push(format!("Others in the room: {others}"));
            }
            None => lines.push("You: not in the room".to_owned()),
        }
        let Some(router) = self.router.get() else {
            lines.push("The gateway is starting.".to_owned());
            return lines.join("\n");
        };
        if chat.network.is_xmpp() {
            // A portal: one room shared by every XMPP user, linked to rooms elsewhere.
            lines.push("A shared room: everyone here sees the same conversation and history".to_owned());
            let probe = Event::new(
                NetworkId::xmpp(),
                chat.clone(),
                Sender::new(account.to_string(), String::new()),
                EventKind::Typing(ChatState::Active),
            );
            for (network, linked) in router.destinations(&probe) {
                let Some(net) = router.network(&network) else {
                    lines.push(format!("Linked to {} on {network} (not running)", linked.id));
                    continue;
                };
                lines.push(format!("Linked to {} on {network}", net.display_name(linked.id.as_str())));
                lines.extend(net.chat_status(None, linked.id.as_str()).await);
            }
        } else {
            match router.network(&chat.network) {
                Some(net) => {
                    let connection = net.chat_status(Some(account), chat.id.as_str()).await;
                    if connection.is_empty() {
                        lines.push(format!("No {} connection", domain.kind));
                    }
                    lines.extend(connection);
                }
                None => lines.push(format!("The {} network is not running", domain.kind)),
            }
        }
        lines.join("\n")
    }

    /// An XEP-0050 request on a room's address.
    pub(crate) async fn adhoc_room(&self, domain: &Domain, from: &Jid, to: &Jid, id: &str, payload: Element) -> Iq {
        let error = |type_, cond, text: &str| crate::commands::adhoc_error(id, type_, cond, text);
        let cmd = match crate::commands::adhoc_request(domain, from, id, payload) {
            Ok(c) => c,
            Err(answer) => return *answer,
        };
        let (room, account) = (to.to_bare(), from.to_bare());
        let Some(chat) = self.room_target(domain, to) else {
            return error(ErrorType::Cancel, DefinedCondition::ItemNotFound, "this address is not a room");
        };
        if !ROOM_COMMANDS.iter().any(|(name, _)| *name == cmd.node) {
            let text = format!("no command `{}` on a room; see the command list", cmd.node);
            return error(ErrorType::Cancel, DefinedCondition::ItemNotFound, &text);
        }
        if !self.has_room_session(&room, &account) {
            return error(ErrorType::Auth, DefinedCondition::Forbidden, NOT_IN_ROOM);
        }
        if cmd.action.as_deref() == Some("cancel") {
            let answer = AdHocCommand { status: Some("canceled".into()), notes: vec![], form: None, ..cmd };
            return Iq::Result { from: None, to: None, id: id.to_owned(), payload: Some(answer.into()) };
        }
        let answer = match cmd.node.as_str() {
            "status" => completed("status", cmd.sessionid, self.room_status_text(domain, &room, &account, &chat).await),
            _ => match cmd.form.as_ref().filter(|f| f.type_ == DataFormType::Submit) {
                // First step: ask to confirm (a stray or repeated request leaves nothing).
                None => AdHocCommand {
                    node: "leave".into(),
                    sessionid: Some(uuid::Uuid::new_v4().to_string()),
                    action: None,
                    status: Some("executing".into()),
                    form: Some(confirm_form(&room)),
                    notes: vec![],
                },
                Some(form) => {
                    let value =
                        form.fields.iter().find(|f| f.var.as_deref() == Some(CONFIRM)).and_then(|f| f.values.first());
                    match value.map(String::as_str) {
                        Some("1" | "true") => {
                            completed("leave", cmd.sessionid, self.leave_text(domain, &account, &room).await)
                        }
                        Some("0" | "false") => {
                            completed("leave", cmd.sessionid, "Nothing done: you stay in the room.".to_owned())
                        }
                        _ => {
                            let text = format!("`{CONFIRM}` must be true or false");
                            return error(ErrorType::Modify, DefinedCondition::BadRequest, &text);
                        }
                    }
                }
            },
        };
        Iq::Result { from: None, to: None, id: id.to_owned(), payload: Some(answer.into()) }
    }

    /// A chat message (type `chat`, with a body) to a room's bare JID: a command,
    /// answered here. `false` when the message is not one (not to a room, another type).
    pub(crate) async fn chat_room_command(&self, domain: &Domain, m: &Message, from: &Jid, to: &Jid) -> bool {
        if m.type_ != MessageType::Chat || to.resource().is_some() {
            return false;
        }
        let Some(body) = stanza::body(m) else { return false };
        let Some(chat) = self.room_target(domain, to) else { return false };
        let (room, account) = (to.to_bare(), from.to_bare());
        let word = body.split_whitespace().next().map(str::to_lowercase);
        let reply = match word.as_deref() {
            Some("help") | None => help_text(),
            Some(w) if ROOM_COMMANDS.iter().any(|(name, _)| *name == w) && !self.has_room_session(&room, &account) => {
                format!("Not done: {NOT_IN_ROOM}.")
            }
            Some("status") => self.room_status_text(domain, &room, &account, &chat).await,
            Some("leave") => self.leave_text(domain, &account, &room).await,
            Some(other) => format!("Unknown command `{other}`: nothing was sent to the room.\n{}", help_text()),
        };
        self.answer_chat(domain, Jid::from(room), from.clone(), &reply).await;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn help_names_every_room_command() {
        let help = help_text();
        for (name, _) in ROOM_COMMANDS {
            assert!(help.contains(name), "{name} missing from {help}");
        }
    }
}
