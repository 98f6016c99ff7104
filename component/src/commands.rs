//! Commands on the gateway's domain: as XEP-0050 ad-hoc commands and as chat
//! messages to the domain's JID (`help` lists them).
//!
//! | command | what it does |
//! |---|---|
//! | `status` | your connections on this network, and the channels in each |
//! | `rooms` | the rooms you are in through this gateway |
//! | `leave` | leave a room (a form lists your rooms; as chat: `leave ROOM-JID`) |

use isthmus_core::model::{Event, EventKind, LeaveKind, NetworkId, Sender};
use tokio_xmpp::Stanza;
use tokio_xmpp::parsers::data_forms::{DataForm, DataFormType, Field, FieldType, Option_};
use tokio_xmpp::parsers::iq::Iq;
use tokio_xmpp::parsers::jid::{BareJid, Jid};
use tokio_xmpp::parsers::message::{Message, MessageType};
use tokio_xmpp::parsers::minidom::Element;
use tokio_xmpp::parsers::muc::user::{Item, MucUser, Status};
use tokio_xmpp::parsers::ns;
use tokio_xmpp::parsers::presence::Presence;
use tokio_xmpp::parsers::stanza_error::{DefinedCondition, ErrorType, StanzaError};

use crate::gateway::{Domain, Gateway};
use crate::stanza;
use crate::xep::{AdHocCommand, NS_COMMANDS, Note};

/// (node, description).
pub const COMMANDS: &[(&str, &str)] = &[
    ("status", "Show your connections and channels"),
    ("rooms", "List the rooms you are in"),
    ("leave", "Leave a room"),
];

/// disco#items on the domain: the command list for the commands node, nothing otherwise.
pub fn command_items(domain: &Jid, query: &Element) -> Element {
    let node = query.attr("node");
    let mut out = Element::builder("query", ns::DISCO_ITEMS);
    if let Some(n) = node {
        out = out.attr(attr("node"), n);
    }
    if node == Some(NS_COMMANDS) {
        for (name, desc) in COMMANDS {
            out = out.append(
                Element::builder("item", ns::DISCO_ITEMS)
                    .attr(attr("jid"), domain.to_string())
                    .attr(attr("node"), *name)
                    .attr(attr("name"), *desc)
                    .build(),
            );
        }
    }
    out.build()
}

/// An attribute name from a constant of this file.
fn attr(name: &'static str) -> xso::exports::rxml::NcName {
    xso::exports::rxml::NcName::try_from(name).expect("constant attribute names are valid XML names")
}

fn completed(node: &str, text: String) -> AdHocCommand {
    AdHocCommand {
        node: node.to_owned(),
        sessionid: None,
        action: None,
        status: Some("completed".into()),
        form: None,
        notes: vec![Note { type_: Some("info".into()), text }],
    }
}

impl Gateway {
    /// The rooms `account` is in on `domain`, sorted.
    fn rooms_of(&self, domain: &Domain, account: &BareJid) -> Vec<BareJid> {
        let mut rooms: Vec<BareJid> = self
            .rooms()
            .iter()
            .filter(|((room, acc), s)| acc == account && s.joined && room.domain().as_str() == domain.name)
            .map(|((room, _), _)| room.clone())
            .collect();
        rooms.sort_by_key(|r| r.to_string());
        rooms
    }

    async fn status_text(&self, domain: &Domain, account: &BareJid) -> String {
        let lines = match self.router.get().and_then(|r| r.network(&domain.network)) {
            Some(n) => n.account_status(account).await,
            None => Vec::new(),
        };
        if lines.is_empty() { format!("You have no {} connection.", domain.kind) } else { lines.join("\n") }
    }

    fn rooms_text(&self, domain: &Domain, account: &BareJid) -> String {
        let rooms = self.rooms_of(domain, account);
        if rooms.is_empty() {
            "You are in no room.".to_owned()
        } else {
            rooms.iter().map(|r| r.to_string()).collect::<Vec<_>>().join("\n")
        }
    }

    /// Leave `room` on behalf of every resource of `account`; returns whether it was joined.
    async fn leave_room(&self, domain: &Domain, account: &BareJid, room: &BareJid) -> bool {
        let Some(session) = self.rooms().remove(&(room.clone(), account.clone())) else { return false };
        for res in &session.resources {
            if let Ok(own) = format!("{room}/{}", session.nick).parse::<Jid>() {
                let muc_user = MucUser::new()
                    .with_items(vec![Item::new(
                        tokio_xmpp::parsers::muc::user::Affiliation::None,
                        tokio_xmpp::parsers::muc::user::Role::None,
                    )])
                    .with_statuses(vec![Status::SelfPresence]);
                let p = Presence::unavailable().with_from(own).with_to(Jid::from(res.clone())).with_payload(muc_user);
                self.send(domain, Stanza::Presence(p)).await;
            }
        }
        if let Ok(chat) = self.chat_of(domain, &Jid::from(room.clone())) {
            let event = Event::new(
                NetworkId::xmpp(),
                chat,
                Sender::own(account.to_string(), session.nick.clone()),
                EventKind::Left { kind: LeaveKind::Part, reason: None },
            )
            .with_account(account.clone());
            self.route(event).await;
        }
        true
    }

    /// An XEP-0050 request on the domain.
    pub(crate) async fn adhoc(&self, domain: &Domain, from: &Jid, id: &str, payload: Element) -> Iq {
        let error =
            |cond, text: &str| Iq::from_error(id.to_owned(), StanzaError::new(ErrorType::Modify, cond, "en", text));
        if !Gateway::allowed(domain, from) {
            let err = StanzaError::new(ErrorType::Auth, DefinedCondition::Forbidden, "en", Gateway::NOT_ALLOWED);
            return Iq::from_error(id.to_owned(), err);
        }
        let cmd = match AdHocCommand::try_from(payload) {
            Ok(c) => c,
            Err(e) => return error(DefinedCondition::BadRequest, &format!("invalid command request: {e}")),
        };
        if cmd.action.as_deref() == Some("cancel") {
            let answer = AdHocCommand { status: Some("canceled".into()), notes: vec![], form: None, ..cmd };
            return Iq::Result { from: None, to: None, id: id.to_owned(), payload: Some(answer.into()) };
        }
        let account = from.to_bare();
        let answer = match cmd.node.as_str() {
            "status" => completed("status", self.status_text(domain, &account).await),
            "rooms" => completed("rooms", self.rooms_text(domain, &account)),
            "leave" => match cmd.form.as_ref().and_then(|f| f.fields.iter().find(|f| f.var.as_deref() == Some("room")))
            {
                None => {
                    // First step: the form.
                    let rooms = self.rooms_of(domain, &account);
                    if rooms.is_empty() {
                        completed("leave", "You are in no room.".to_owned())
                    } else {
                        let field = Field {
                            var: Some("room".into()),
                            type_: FieldType::ListSingle,
                            label: Some("Room to leave".into()),
                            required: true,
                            desc: None,
                            options: rooms.iter().map(|r| Option_ { label: None, value: r.to_string() }).collect(),
                            values: vec![],
                            media: vec![],
                            validate: None,
                        };
                        let form = DataForm::new(DataFormType::Form, "", vec![field]);
                        AdHocCommand {
                            node: "leave".into(),
                            sessionid: Some(uuid::Uuid::new_v4().to_string()),
                            action: None,
                            status: Some("executing".into()),
                            form: Some(form),
                            notes: vec![],
                        }
                    }
                }
                Some(field) => {
                    let room = field.values.first().and_then(|v| v.parse::<BareJid>().ok());
                    let text = match room {
                        Some(room) if self.leave_room(domain, &account, &room).await => format!("Left {room}."),
                        Some(room) => format!("You are not in {room}."),
                        None => return error(DefinedCondition::BadRequest, "`room` must be a room address"),
                    };
                    AdHocCommand { sessionid: cmd.sessionid.clone(), ..completed("leave", text) }
                }
            },
            other => {
                return error(DefinedCondition::ItemNotFound, &format!("no command `{other}`; see the command list"));
            }
        };
        Iq::Result { from: None, to: None, id: id.to_owned(), payload: Some(answer.into()) }
    }

    /// A chat message to the domain: the same commands, in text.
    pub(crate) async fn chat_command(&self, domain: &Domain, m: &Message, from: &Jid) {
        let account = from.to_bare();
        let body = stanza::body(m).unwrap_or_default();
        let mut words = body.split_whitespace();
        let reply = if !Gateway::allowed(domain, from) {
            Gateway::NOT_ALLOWED.to_owned()
        } else {
            match words.next().map(str::to_lowercase).as_deref() {
                Some("status") => self.status_text(domain, &account).await,
                Some("rooms") => self.rooms_text(domain, &account),
                Some("leave") => match words.next().and_then(|r| r.parse::<BareJid>().ok()) {
                    Some(room) if self.leave_room(domain, &account, &room).await => format!("Left {room}."),
                    Some(room) => format!("You are not in {room}."),
                    None => "Usage: leave ROOM-ADDRESS (see `rooms`)".to_owned(),
                },
                Some("help") | None => help_text(),
                Some(other) => format!("Unknown command `{other}`.\n{}", help_text()),
            }
        };
        let Some(to) = m.to.clone() else { return };
        let mut answer = stanza::message(MessageType::Chat, to, from.clone(), &reply);
        answer.id = Some(stanza::new_id());
        self.send(domain, Stanza::Message(answer)).await;
    }
}

fn help_text() -> String {
    let mut text = "Commands (also available as ad-hoc commands):\nhelp — this list".to_owned();
    for (name, desc) in COMMANDS {
        text.push_str(&format!("\n{name} — {desc}"));
    }
    text
}
