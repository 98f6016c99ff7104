//! Commands on the gateway's domain: as XEP-0050 ad-hoc commands and as chat
//! messages to the domain's JID (`help` lists them).
//!
//! | command | what it does |
//! |---|---|
//! | `status` | your connections on this network, and the channels in each |
//! | `rooms` | the rooms you are in through this gateway |
//! | `leave` | leave a room (a form lists your rooms; as chat: `leave ROOM-JID`) |
//! | `login` | link your account on networks that have accounts (Matrix): a form; as chat it only points to the form (a password is never taken in a chat message) |
//! | `logout` | unlink it |
//!
//! Commands on a network's service addresses (an IRC server's) are in [`crate::settings`];
//! the admins' commands (`users`, `disconnect`, `link-status`, `announce`) in [`crate::admin`].
//!
//! disco#items on the domain without a node is the room directory: the rooms
//! the network lists for the asking account. In-band registration (XEP-0077) on
//! the domain is `login` as a form (and `<remove/>` is `logout`), for clients
//! that offer "register with this gateway".

use isthmus_core::model::{EventKind, LeaveKind};
use isthmus_core::network::{LoginError, LoginValues, Network};
use tokio_xmpp::Stanza;
use tokio_xmpp::parsers::data_forms::{DataForm, DataFormType, Field, FieldType, Option_};
use tokio_xmpp::parsers::ibr::{FormQuery, LegacyQuery, RemoveQuery};
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

/// The commands of networks with accounts to link.
pub const LOGIN_COMMANDS: &[(&str, &str)] = &[("login", "Link your account"), ("logout", "Unlink your account")];

/// disco#items on the domain: the command list for the commands node (with the
/// admin commands for an admin), nothing otherwise.
pub fn command_items(domain: &Jid, query: &Element, with_login: bool, admin: bool) -> Element {
    let logins = if with_login { LOGIN_COMMANDS } else { &[] };
    let admins = if admin { crate::admin::ADMIN_COMMANDS } else { &[] };
    command_list(&domain.to_bare(), query, COMMANDS.iter().chain(logins).chain(admins))
}

/// The disco#items answer of `jid` to `query`: `commands` (node, description) for
/// the XEP-0050 commands node, no items for any other node.
pub(crate) fn command_list<'a>(
    jid: &BareJid,
    query: &Element,
    commands: impl IntoIterator<Item = &'a (&'a str, &'a str)>,
) -> Element {
    let node = query.attr("node");
    let mut out = Element::builder("query", ns::DISCO_ITEMS);
    if let Some(n) = node {
        out = out.attr(attr("node"), n);
    }
    if node == Some(NS_COMMANDS) {
        for (name, desc) in commands {
            out = out.append(
                Element::builder("item", ns::DISCO_ITEMS)
                    .attr(attr("jid"), jid.to_string())
                    .attr(attr("node"), *name)
                    .attr(attr("name"), *desc)
                    .build(),
            );
        }
    }
    out.build()
}

/// An attribute name from a constant of this file.
pub(crate) fn attr(name: &'static str) -> xso::exports::rxml::NcName {
    xso::exports::rxml::NcName::try_from(name).expect("constant attribute names are valid XML names")
}

/// The error answer to the XEP-0050 request `id`.
pub(crate) fn adhoc_error(id: &str, type_: ErrorType, condition: DefinedCondition, text: &str) -> Iq {
    Iq::from_error(id.to_owned(), StanzaError::new(type_, condition, "en", text))
}

/// What every XEP-0050 request goes through first: the sender must be allowed on
/// the domain, and the payload must be a command. `Err` is the answer to send.
pub(crate) fn adhoc_request(domain: &Domain, from: &Jid, id: &str, payload: Element) -> Result<AdHocCommand, Box<Iq>> {
    if !Gateway::allowed(domain, from) {
        return Err(Box::new(adhoc_error(id, ErrorType::Auth, DefinedCondition::Forbidden, Gateway::NOT_ALLOWED)));
    }
    AdHocCommand::try_from(payload).map_err(|e| {
        let text = format!("invalid command request: {e}");
        Box::new(adhoc_error(id, ErrorType::Modify, DefinedCondition::BadRequest, &text))
    })
}

/// A finished command with one note (for the domain's, the admin's and rooms' commands).
pub(crate) fn completed(node: &str, sessionid: Option<String>, text: String) -> AdHocCommand {
    AdHocCommand {
        node: node.to_owned(),
        sessionid,
        action: None,
        status: Some("completed".into()),
        form: None,
        notes: vec![Note { type_: Some("info".into()), text }],
    }
}

impl Gateway {
    pub(crate) fn network_of(&self, domain: &Domain) -> Option<std::sync::Arc<dyn Network>> {
        self.router.get().and_then(|r| r.network(&domain.network))
    }

    /// Whether `domain`'s network has accounts to link.
    pub(crate) fn has_login(&self, domain: &Domain) -> bool {
        self.network_of(domain).is_some_and(|n| !n.login_fields().is_empty())
    }

    /// disco#items on the domain: the rooms its network lists for `from`.
    pub(crate) async fn room_directory(&self, domain: &Domain, from: &Jid) -> Element {
        let mut out = Element::builder("query", ns::DISCO_ITEMS);
        if Gateway::allowed(domain, from)
            && let Some(network) = self.network_of(domain)
        {
            for room in network.rooms(&from.to_bare()).await {
                let Ok(local) = domain.escaping.to_localpart(room.id.as_str()) else { continue };
                let Some(jid) = crate::stanza::bare(&local, &domain.name) else { continue };
                let mut item = Element::builder("item", ns::DISCO_ITEMS).attr(attr("jid"), jid.to_string());
                item = item.attr(attr("name"), room.name.unwrap_or_else(|| room.id.0.clone()));
                out = out.append(item.build());
            }
        }
        out.build()
    }

    /// Run `login` with the values given; the text to show the user.
    async fn login_text(&self, domain: &Domain, account: &BareJid, values: &LoginValues) -> String {
        let Some(network) = self.network_of(domain) else { return "This network is not running.".into() };
        match network.login(account, values).await {
            Ok(text) => text,
            Err(e) => format!("Login failed: {e}"),
        }
    }

    async fn logout_text(&self, domain: &Domain, account: &BareJid) -> String {
        let Some(network) = self.network_of(domain) else { return "This network is not running.".into() };
        match network.logout(account).await {
            Ok(text) => text,
            Err(e) => format!("Logout failed: {e}"),
        }
    }

    /// The `login` form: one field per value the network needs.
    fn login_form(&self, domain: &Domain) -> DataForm {
        let fields = self
            .network_of(domain)
            .map(|n| n.login_fields())
            .unwrap_or_default()
            .into_iter()
            .map(|f| Field {
                var: Some(f.var.into()),
                type_: if f.secret { FieldType::TextPrivate } else { FieldType::TextSingle },
                label: Some(f.label.into()),
                required: f.required,
                desc: None,
                options: vec![],
                values: f.default.into_iter().collect(),
                media: vec![],
                validate: None,
            })
            .collect();
        let mut form = DataForm::new(DataFormType::Form, "", fields);
        form.title = Some(format!("Link your {} account", domain.kind));
        form
    }

    /// XEP-0077 get: the form to link an account (the network's login fields).
    pub(crate) async fn register_form(&self, domain: &Domain, from: &Jid, id: String) -> Iq {
        if let Some(e) = self.register_refusal(domain, from) {
            return Iq::from_error(id, e);
        }
        let query = FormQuery {
            instructions: Some(format!(
                "Link your {} account: the gateway logs in as one more device of it. Send `<remove/>` to unlink it.",
                domain.kind
            )),
            form: self.login_form(domain),
        };
        Iq::from_result(id, Some(query))
    }

    /// XEP-0077 set: link with the submitted form (or the legacy username and
    /// password fields), or unlink with `<remove/>`.
    pub(crate) async fn register_submit(&self, domain: &Domain, from: &Jid, id: String, payload: Element) -> Iq {
        if let Some(e) = self.register_refusal(domain, from) {
            return Iq::from_error(id, e);
        }
        let account = from.to_bare();
        let Some(network) = self.network_of(domain) else {
            let e = StanzaError::new(ErrorType::Wait, DefinedCondition::ServiceUnavailable, "en", "not running");
            return Iq::from_error(id, e);
        };
        let result = if RemoveQuery::try_from(payload.clone()).is_ok_and(|r| r.remove) {
            network.logout(&account).await
        } else {
            let values: LoginValues = if let Ok(q) = FormQuery::try_from(payload.clone()) {
                q.form
                    .fields
                    .iter()
                    .filter_map(|f| Some((f.var.clone()?, f.values.first().cloned().unwrap_or_default())))
                    .collect()
            } else if let Ok(q) = LegacyQuery::try_from(payload) {
                [("user", q.username), ("password", q.password)]
                    .into_iter()
                    .filter_map(|(k, v)| Some((k.to_owned(), v?)))
                    .collect()
            } else {
                let e = StanzaError::new(
                    ErrorType::Modify,
                    DefinedCondition::BadRequest,
                    "en",
                    "expected a filled-in registration form",
                );
                return Iq::from_error(id, e);
            };
            network.login(&account, &values).await
        };
        match result {
            Ok(_) => Iq::Result { from: None, to: None, id, payload: None },
            Err(e) => {
                let (type_, condition) = match e {
                    LoginError::Invalid(_) => (ErrorType::Modify, DefinedCondition::NotAcceptable),
                    LoginError::Refused(_) => (ErrorType::Auth, DefinedCondition::NotAuthorized),
                    LoginError::Unavailable(_) => (ErrorType::Wait, DefinedCondition::RemoteServerTimeout),
                    LoginError::NotSupported => (ErrorType::Cancel, DefinedCondition::FeatureNotImplemented),
                };
                Iq::from_error(id, StanzaError::new(type_, condition, "en", e.to_string()))
            }
        }
    }

    /// Why `from` cannot register on `domain`, if it cannot.
    fn register_refusal(&self, domain: &Domain, from: &Jid) -> Option<StanzaError> {
        if !Gateway::allowed(domain, from) {
            return Some(StanzaError::new(ErrorType::Auth, DefinedCondition::Forbidden, "en", Gateway::NOT_ALLOWED));
        }
        if !self.has_login(domain) {
            let text = format!("{} has no accounts to link: join its rooms directly", domain.kind);
            return Some(StanzaError::new(ErrorType::Cancel, DefinedCondition::ServiceUnavailable, "en", text));
        }
        None
    }

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
    pub(crate) async fn leave_room(&self, domain: &Domain, account: &BareJid, room: &BareJid) -> bool {
        let Some(session) = self.rooms().remove(&(room.clone(), account.clone())) else { return false };
        self.save_session(room, account);
        for res in session.resources.iter().chain(session.pending.iter()) {
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
            let event = self.user_event(
                chat,
                account,
                session.nick.clone(),
                EventKind::Left { kind: LeaveKind::Part, reason: None },
            );
            self.portal_fanout(domain, room, &event, account);
            self.route(event).await;
        }
        true
    }

    /// An XEP-0050 request on the domain.
    pub(crate) async fn adhoc(&self, domain: &Domain, from: &Jid, id: &str, payload: Element) -> Iq {
        let error = |cond, text: &str| adhoc_error(id, ErrorType::Modify, cond, text);
        let cmd = match adhoc_request(domain, from, id, payload) {
            Ok(c) => c,
            Err(answer) => return *answer,
        };
        if cmd.action.as_deref() == Some("cancel") {
            let answer = AdHocCommand { status: Some("canceled".into()), notes: vec![], form: None, ..cmd };
            return Iq::Result { from: None, to: None, id: id.to_owned(), payload: Some(answer.into()) };
        }
        if crate::admin::is_admin_node(&cmd.node) {
            return self.admin_adhoc(domain, from, id, cmd).await;
        }
        let account = from.to_bare();
        let answer = match cmd.node.as_str() {
            "status" => completed("status", None, self.status_text(domain, &account).await),
            "rooms" => completed("rooms", None, self.rooms_text(domain, &account)),
            "leave" => match cmd.form.as_ref().and_then(|f| f.fields.iter().find(|f| f.var.as_deref() == Some("room")))
            {
                None => {
                    // First step: the form.
                    let rooms = self.rooms_of(domain, &account);
                    if rooms.is_empty() {
                        completed("leave", None, "You are in no room.".to_owned())
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
                        Some(room) => self.leave_text(domain, &account, &room).await,
                        None => return error(DefinedCondition::BadRequest, "`room` must be a room address"),
                    };
                    completed("leave", cmd.sessionid.clone(), text)
                }
            },
            "login" if self.has_login(domain) => match cmd.form.as_ref().filter(|f| f.type_ == DataFormType::Submit) {
                None => AdHocCommand {
                    node: "login".into(),
                    sessionid: Some(uuid::Uuid::new_v4().to_string()),
                    action: None,
                    status: Some("executing".into()),
                    form: Some(self.login_form(domain)),
                    notes: vec![],
                },
                Some(form) => {
                    let values: LoginValues = form
                        .fields
                        .iter()
                        .filter_map(|f| Some((f.var.clone()?, f.values.first().cloned().unwrap_or_default())))
                        .collect();
                    let network = self.network_of(domain);
                    let result = match network {
                        Some(n) => n.login(&account, &values).await,
                        None => Err(LoginError::Unavailable("this network is not running".into())),
                    };
                    match result {
                        Ok(text) => completed("login", cmd.sessionid.clone(), text),
                        Err(e) => {
                            let condition = match e {
                                LoginError::Invalid(_) => DefinedCondition::BadRequest,
                                LoginError::Refused(_) => DefinedCondition::NotAuthorized,
                                LoginError::Unavailable(_) => DefinedCondition::RemoteServerNotFound,
                                LoginError::NotSupported => DefinedCondition::FeatureNotImplemented,
                            };
                            return error(condition, &e.to_string());
                        }
                    }
                }
            },
            "logout" if self.has_login(domain) => completed("logout", None, self.logout_text(domain, &account).await),
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
                Some(admin) if crate::admin::is_admin_node(admin) => {
                    let rest = body.trim_start().split_once(char::is_whitespace).map_or("", |(_, r)| r);
                    self.admin_chat(domain, from, admin, rest).await
                }
                Some("status") => self.status_text(domain, &account).await,
                Some("rooms") => self.rooms_text(domain, &account),
                Some("leave") => match words.next().and_then(|r| r.parse::<BareJid>().ok()) {
                    Some(room) => self.leave_text(domain, &account, &room).await,
                    None => "Usage: leave ROOM-ADDRESS (see `rooms`)".to_owned(),
                },
                Some("login") if self.has_login(domain) => {
                    let fields = self.network_of(domain).map(|n| n.login_fields()).unwrap_or_default();
                    let given: Vec<&str> = words.collect();
                    if fields.iter().any(|f| f.secret) {
                        // Chat messages are archived by servers and clients: no passwords in them.
                        login_by_form_text(
                            domain,
                            given.len() > fields.iter().filter(|f| !f.secret && f.default.is_none()).count(),
                        )
                    } else {
                        // Values in field order; a leading field with a default may be left out.
                        let skip = fields
                            .len()
                            .saturating_sub(given.len())
                            .min(fields.iter().take_while(|f| f.default.is_some()).count());
                        let mut values = LoginValues::new();
                        for (f, v) in fields.iter().skip(skip).zip(given.iter()) {
                            values.insert(f.var.to_owned(), (*v).to_owned());
                        }
                        if given.len() + skip < fields.iter().filter(|f| f.required).count() {
                            let names: Vec<&str> = fields.iter().map(|f| f.var).collect();
                            format!("Usage: login {}", names.join(" ").to_uppercase())
                        } else {
                            self.login_text(domain, &account, &values).await
                        }
                    }
                }
                Some("logout") if self.has_login(domain) => self.logout_text(domain, &account).await,
                Some("help") | None => help_text(self.has_login(domain), Self::is_admin(domain, from)),
                Some(other) => format!(
                    "Unknown command `{other}`.\n{}",
                    help_text(self.has_login(domain), Self::is_admin(domain, from))
                ),
            }
        };
        let Some(to) = m.to.clone() else { return };
        self.answer_chat(domain, to, from.clone(), &reply).await;
    }

    /// Answer a chat command: `text` from `entity` (the address the command went to) to `to`.
    pub(crate) async fn answer_chat(&self, domain: &Domain, entity: Jid, to: Jid, text: &str) {
        let mut answer = stanza::message(MessageType::Chat, entity, to, text);
        answer.id = Some(stanza::new_id());
        self.send(domain, Stanza::Message(answer)).await;
    }

    /// Leave `room` for `account` (see [`Gateway::leave_room`]), as a text for the user.
    pub(crate) async fn leave_text(&self, domain: &Domain, account: &BareJid, room: &BareJid) -> String {
        if self.leave_room(domain, account, room).await {
            format!("Left {room}.")
        } else {
            format!("You are not in {room}.")
        }
    }
}

/// The answer to `login` in a chat message on a network whose login takes a password:
/// where the form is. `may_hold_password`: the message had more words than the
/// fields without a default that are not secret, so it may have carried the password.
fn login_by_form_text(domain: &Domain, may_hold_password: bool) -> String {
    let mut text = format!(
        "A password is not taken in a chat message (servers and clients keep messages in their archives). \
         Link your {} account with the `login` command of {} instead: your client lists it among the \
         ad-hoc commands (XEP-0050) of this address, as a form with a password field; \
         or register with this gateway (XEP-0077).",
        domain.kind, domain.name
    );
    if may_hold_password {
        text.push_str(
            " Your message was not used. If it held your password, it may be kept in an archive: consider changing it.",
        );
    }
    text
}

fn help_text(with_login: bool, admin: bool) -> String {
    let mut text = "Commands (also available as ad-hoc commands):\nhelp — this list".to_owned();
    let logins = if with_login { LOGIN_COMMANDS } else { &[] };
    for (name, desc) in COMMANDS.iter().chain(logins) {
        text.push_str(&format!("\n{name} — {desc}"));
    }
    if admin {
        text.push_str("\nFor admins (as chat: `disconnect ACCOUNT-JID [REASON]`, `announce TEXT`):");
        for (name, desc) in crate::admin::ADMIN_COMMANDS {
            text.push_str(&format!("\n{name} — {desc}"));
        }
    }
    text.push_str(&format!(
        "\nOn a server's address (IRC: server@this-domain), also as an ad-hoc command there:\n{} — {}\n  {}",
        crate::settings::CONFIGURE.0,
        crate::settings::CONFIGURE.1,
        crate::settings::USAGE
    ));
    let room: Vec<&str> = crate::room_commands::ROOM_COMMANDS.iter().map(|(name, _)| *name).collect();
    text.push_str(&format!(
        "\nOn a room's address, as a chat message there or an ad-hoc command: {} (send `help` there)",
        room.join(", ")
    ));
    text
}
