//! Per-user settings of a network's chats (an IRC server's address): the
//! `configure` ad-hoc command (XEP-0050 with a XEP-0004 form) on that address,
//! and its chat form, a message `configure name=value …` to the same address.
//!
//! The fields come from the network ([`Network::settings`]); this module only
//! turns them into forms and text. Secrets are never echoed: the form leaves
//! them empty, and an empty answer keeps the stored value.

use std::sync::Arc;

use isthmus_core::model::ChatKind;
use isthmus_core::network::{Network, SettingField, SettingKind, SettingValues, SettingsError};
use tokio_xmpp::parsers::data_forms::{DataForm, DataFormType, Field, FieldType};
use tokio_xmpp::parsers::iq::Iq;
use tokio_xmpp::parsers::jid::{BareJid, Jid};
use tokio_xmpp::parsers::message::Message;
use tokio_xmpp::parsers::minidom::Element;
use tokio_xmpp::parsers::stanza_error::{DefinedCondition, ErrorType};

use crate::gateway::{Domain, Gateway};
use crate::stanza;
use crate::xep::{AdHocCommand, Note};

/// The command's node and description.
pub const CONFIGURE: (&str, &str) = ("configure", "Your settings for this server (nick, logins)");

/// The chat command's usage.
pub const USAGE: &str = "configure name=value … (values with spaces in quotes; `name=` clears; repeat on_connect=… for several lines; `configure` alone shows the settings)";

fn field_type(kind: SettingKind) -> FieldType {
    match kind {
        SettingKind::Text => FieldType::TextSingle,
        SettingKind::Secret => FieldType::TextPrivate,
        SettingKind::Lines => FieldType::TextMulti,
    }
}

/// The form showing `fields` with their current values (secrets left empty).
fn form(fields: &[SettingField], title: String) -> DataForm {
    let fields = fields
        .iter()
        .map(|f| Field {
            var: Some(f.var.into()),
            type_: field_type(f.kind),
            label: Some(f.label.into()),
            required: false,
            desc: (f.kind == SettingKind::Secret).then(|| if f.is_set { "set" } else { "not set" }.to_owned()),
            options: vec![],
            values: if f.kind == SettingKind::Secret { vec![] } else { f.values.clone() },
            media: vec![],
            validate: None,
        })
        .collect();
    let mut form = DataForm::new(DataFormType::Form, "", fields);
    form.title = Some(title);
    form
}

/// The changes a submitted form asks for: secrets left empty are unchanged,
/// multi-line values are split into lines.
fn submitted(form: &DataForm, fields: &[SettingField]) -> SettingValues {
    form.fields
        .iter()
        .filter_map(|f| {
            let var = f.var.clone()?;
            if var == "FORM_TYPE" {
                return None;
            }
            let kind = fields.iter().find(|s| s.var == var).map(|s| s.kind);
            if kind == Some(SettingKind::Secret) && f.values.iter().all(|v| v.is_empty()) {
                return None;
            }
            if kind == Some(SettingKind::Lines) {
                let lines = f.values.iter().flat_map(|v| v.split('\n').map(|l| l.trim_end_matches('\r').to_owned()));
                return Some((var, lines.collect()));
            }
            Some((var, f.values.clone()))
        })
        .collect()
}

/// The chat command's words (`name=value`, quoted as in a shell) as changes.
fn parse_words(words: &str) -> Result<SettingValues, String> {
    let tokens = shlex::split(words).ok_or_else(|| format!("unbalanced quotes. Usage: {USAGE}"))?;
    let mut values = SettingValues::new();
    for token in tokens {
        let (name, value) =
            token.split_once('=').ok_or_else(|| format!("`{token}` is not name=value. Usage: {USAGE}"))?;
        let entry = values.entry(name.to_lowercase()).or_default();
        if !value.is_empty() {
            entry.push(value.to_owned());
        }
    }
    Ok(values)
}

/// The settings as text (secrets say only whether they are set).
fn describe(fields: &[SettingField]) -> String {
    let lines: Vec<String> = fields
        .iter()
        .map(|f| match f.kind {
            SettingKind::Secret => format!("{}: {}", f.var, if f.is_set { "set" } else { "not set" }),
            _ if f.values.is_empty() => format!("{}: (default)", f.var),
            _ => format!("{}: {}", f.var, f.values.join(" | ")),
        })
        .collect();
    format!("Your settings here:\n{}\nChange them with: {USAGE}", lines.join("\n"))
}

fn condition(e: &SettingsError) -> (ErrorType, DefinedCondition) {
    match e {
        SettingsError::Invalid(_) => (ErrorType::Modify, DefinedCondition::BadRequest),
        SettingsError::Unavailable(_) => (ErrorType::Wait, DefinedCondition::InternalServerError),
        SettingsError::NotSupported => (ErrorType::Cancel, DefinedCondition::ItemNotFound),
    }
}

impl Gateway {
    /// The network and chat id of `to` when it is a network's service address
    /// (an IRC server), the only addresses with settings.
    fn settings_target(&self, domain: &Domain, to: &Jid) -> Option<(Arc<dyn Network>, String)> {
        let chat = self.chat_of(domain, to).ok().filter(|c| c.kind == ChatKind::Service)?;
        let network = self.router.get()?.network(&domain.network)?;
        Some((network, chat.id.0))
    }

    /// disco#items with the commands node on a service address: `configure`.
    pub(crate) fn settings_items(&self, domain: &Domain, to: &Jid, query: &Element) -> Option<Element> {
        query.attr("node")?;
        self.settings_target(domain, to)?;
        Some(crate::commands::command_list(&to.to_bare(), query, [&CONFIGURE]))
    }

    /// An XEP-0050 request on a service address: `configure`, a form then its submission.
    pub(crate) async fn adhoc_settings(&self, domain: &Domain, from: &Jid, to: &Jid, id: &str, payload: Element) -> Iq {
        let error = |type_, cond, text: &str| crate::commands::adhoc_error(id, type_, cond, text);
        let cmd = match crate::commands::adhoc_request(domain, from, id, payload) {
            Ok(c) => c,
            Err(answer) => return *answer,
        };
        let Some((network, chat)) = self.settings_target(domain, to).filter(|_| cmd.node == CONFIGURE.0) else {
            let text = format!("no command `{}` here; see the command list", cmd.node);
            return error(ErrorType::Cancel, DefinedCondition::ItemNotFound, &text);
        };
        if cmd.action.as_deref() == Some("cancel") {
            let answer = AdHocCommand { status: Some("canceled".into()), notes: vec![], form: None, ..cmd };
            return Iq::Result { from: None, to: None, id: id.to_owned(), payload: Some(answer.into()) };
        }
        let account = from.to_bare();
        let fields = match network.settings(&account, &chat).await {
            Ok(f) => f,
            Err(e) => {
                let (type_, cond) = condition(&e);
                return error(type_, cond, &e.to_string());
            }
        };
        let answer = match cmd.form.as_ref().filter(|f| f.type_ == DataFormType::Submit) {
            None => AdHocCommand {
                node: CONFIGURE.0.into(),
                sessionid: Some(uuid::Uuid::new_v4().to_string()),
                action: None,
                status: Some("executing".into()),
                form: Some(form(&fields, format!("Your settings for {}", network.display_name(&chat)))),
                notes: vec![],
            },
            Some(submission) => match network.configure(&account, &chat, &submitted(submission, &fields)).await {
                Ok(text) => AdHocCommand {
                    node: CONFIGURE.0.into(),
                    sessionid: cmd.sessionid.clone(),
                    action: None,
                    status: Some("completed".into()),
                    form: None,
                    notes: vec![Note { type_: Some("info".into()), text }],
                },
                Err(e) => {
                    let (type_, cond) = condition(&e);
                    return error(type_, cond, &format!("Nothing changed: {e}"));
                }
            },
        };
        Iq::Result { from: None, to: None, id: id.to_owned(), payload: Some(answer.into()) }
    }

    /// A chat message `configure …` to a service address: handled (and answered)
    /// here, `false` for any other message (raw commands for the network).
    pub(crate) async fn chat_settings(&self, domain: &Domain, m: &Message, from: &Jid, to: &Jid) -> bool {
        let body = stanza::body(m).unwrap_or_default();
        let trimmed = body.trim_start();
        let (word, rest) = trimmed.split_once(char::is_whitespace).unwrap_or((trimmed, ""));
        if !word.eq_ignore_ascii_case(CONFIGURE.0) {
            return false;
        }
        let Some((network, chat)) = self.settings_target(domain, to) else { return false };
        let account: BareJid = from.to_bare();
        let reply = if rest.trim().is_empty() {
            match network.settings(&account, &chat).await {
                Ok(fields) => describe(&fields),
                Err(e) => format!("No settings: {e}"),
            }
        } else {
            match parse_words(rest) {
                Err(text) => format!("Nothing changed: {text}"),
                Ok(values) => match network.configure(&account, &chat, &values).await {
                    Ok(text) => text,
                    Err(e) => format!("Nothing changed: {e}"),
                },
            }
        };
        self.answer_chat(domain, to.clone(), from.clone(), &reply).await;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_words_become_changes() {
        let v = parse_words("nick=bob sasl_password= on_connect=\"PRIVMSG x :hi there\" on_connect='MODE bob +i'")
            .expect("valid");
        assert_eq!(v["nick"], vec!["bob".to_owned()]);
        assert!(v["sasl_password"].is_empty());
        assert_eq!(v["on_connect"], vec!["PRIVMSG x :hi there".to_owned(), "MODE bob +i".to_owned()]);
        assert!(parse_words("nick bob").is_err());
        assert!(parse_words("nick=\"bob").is_err());
    }
}
