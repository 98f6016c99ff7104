//! Matrix timeline events → what they mean for the common model.
//!
//! [`parse`] reads one event as the homeserver sent it (JSON, already decrypted
//! when the room is encrypted) into an [`Incoming`]: a message, an edit, a
//! reaction, a redaction, a membership change or a topic. Resolving names and
//! reaction sets needs the session's state and happens in `session`.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use isthmus_core::markup::html_to_styling_with;
use isthmus_core::model::{Attachment, FormattedBody, Message, MessageRef, ReplyTo, TextFormat};
use serde_json::Value;
use thiserror::Error;

/// A timeline event the bridge cannot read.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("event without `{0}`")]
    Missing(&'static str),
    #[error("`{field}` has the wrong type (expected {expected})")]
    WrongType { field: &'static str, expected: &'static str },
}

/// What one timeline event means.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    Message {
        message: Message,
    },
    /// An edit (`m.replace`) of `target`, with the new content.
    Edit {
        target: MessageRef,
        message: Message,
    },
    /// One reaction (`m.annotation`) by the sender.
    Reaction {
        target: MessageRef,
        key: String,
    },
    /// An event withdrawn (a message, or one of the reactions).
    Redaction {
        redacts: String,
        reason: Option<String>,
    },
    /// `user`'s membership changed (or their display name, when both are `join`).
    Member {
        user: String,
        membership: String,
        previous: Option<String>,
        displayname: Option<String>,
        previous_displayname: Option<String>,
        reason: Option<String>,
    },
    Topic {
        text: String,
    },
    /// The room's power levels changed (`m.room.power_levels`): the users' levels now
    /// and, when the homeserver gave it, before.
    PowerLevels {
        now: UserLevels,
        before: Option<UserLevels>,
    },
    /// Anything else (state the bridge does not show, unknown types, redacted leftovers).
    Other,
}

/// The users' part of an `m.room.power_levels` content: who has which level.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserLevels {
    pub users: BTreeMap<String, i64>,
    /// The level of everyone not listed.
    pub users_default: i64,
}

impl UserLevels {
    /// From an `m.room.power_levels` content (levels may be strings in old room versions).
    pub fn from_content(content: &Value) -> UserLevels {
        let users = content
            .get("users")
            .and_then(Value::as_object)
            .map(|u| u.iter().filter_map(|(user, l)| Some((user.clone(), level(l)?))).collect())
            .unwrap_or_default();
        UserLevels { users, users_default: content.get("users_default").and_then(level).unwrap_or(0) }
    }

    pub fn level(&self, user: &str) -> i64 {
        self.users.get(user).copied().unwrap_or(self.users_default)
    }
}

/// A power level as a state event spells it: a number, or a string in old room versions.
pub fn level(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// The envelope every timeline event has.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    pub event_id: String,
    pub sender: String,
    pub time: SystemTime,
    /// Present on the echo of an event this very device sent.
    pub transaction_id: Option<String>,
}

fn str_field<'a>(v: &'a Value, field: &'static str) -> Result<&'a str, ParseError> {
    match v.get(field) {
        None | Some(Value::Null) => Err(ParseError::Missing(field)),
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(ParseError::WrongType { field, expected: "a string" }),
    }
}

fn opt_str(v: &Value, field: &str) -> Option<String> {
    v.get(field).and_then(Value::as_str).map(str::to_owned)
}

/// Read the envelope and the meaning of one timeline event.
pub fn parse(ev: &Value) -> Result<(Envelope, Incoming), ParseError> {
    let (env, mut incoming) = parse_unstyled(ev)?;
    if let Some(m) = text_of(&mut incoming)
        && let Some(html) = html_to_style(m)
    {
        let styled = styled(&html);
        set_styled(m, Some(styled), &html);
    }
    Ok((env, incoming))
}

/// Like [`parse`], but the body of a message with an HTML body is still the event's
/// plain `body`: [`style`] makes it the HTML as XEP-0393 styling.
pub fn parse_unstyled(ev: &Value) -> Result<(Envelope, Incoming), ParseError> {
    let event_id = str_field(ev, "event_id")?.to_owned();
    let sender = str_field(ev, "sender")?.to_owned();
    let kind = str_field(ev, "type")?;
    let ts = match ev.get("origin_server_ts") {
        Some(Value::Number(n)) => {
            n.as_u64().ok_or(ParseError::WrongType { field: "origin_server_ts", expected: "a positive integer" })?
        }
        None => return Err(ParseError::Missing("origin_server_ts")),
        Some(_) => return Err(ParseError::WrongType { field: "origin_server_ts", expected: "an integer" }),
    };
    let envelope = Envelope {
        event_id,
        sender,
        time: SystemTime::UNIX_EPOCH + Duration::from_millis(ts),
        transaction_id: ev.get("unsigned").and_then(|u| opt_str(u, "transaction_id")),
    };
    let empty = Value::Object(Default::default());
    let content = ev.get("content").unwrap_or(&empty);
    let relates = content.get("m.relates_to");
    let incoming = match kind {
        "m.room.message" => {
            if content.get("msgtype").is_none() {
                // A redacted message keeps no content.
                Incoming::Other
            } else if let Some(target) = relates
                .filter(|r| r.get("rel_type").and_then(Value::as_str) == Some("m.replace"))
                .and_then(|r| opt_str(r, "event_id"))
            {
                let new = content.get("m.new_content").unwrap_or(content);
                Incoming::Edit { target: MessageRef(target), message: message(new, None)? }
            } else {
                Incoming::Message { message: message(content, relates)? }
            }
        }
        "m.sticker" => {
            let mut m = message(content, relates)?;
            if let Some(url) = opt_str(content, "url") {
                m.attachments.push(attachment(content, url));
            }
            Incoming::Message { message: m }
        }
        "m.reaction" => match relates {
            Some(r) if r.get("rel_type").and_then(Value::as_str) == Some("m.annotation") => Incoming::Reaction {
                target: MessageRef(str_field(r, "event_id")?.to_owned()),
                key: str_field(r, "key")?.to_owned(),
            },
            _ => Incoming::Other,
        },
        "m.room.redaction" => {
            // Room version 11 moved `redacts` into the content.
            let redacts = opt_str(content, "redacts").or_else(|| opt_str(ev, "redacts"));
            match redacts {
                Some(redacts) => Incoming::Redaction { redacts, reason: opt_str(content, "reason") },
                None => return Err(ParseError::Missing("redacts")),
            }
        }
        "m.room.member" => {
            let prev = ev.get("unsigned").and_then(|u| u.get("prev_content"));
            Incoming::Member {
                user: str_field(ev, "state_key")?.to_owned(),
                membership: str_field(content, "membership")?.to_owned(),
                previous: prev.and_then(|p| opt_str(p, "membership")),
                displayname: opt_str(content, "displayname"),
                previous_displayname: prev.and_then(|p| opt_str(p, "displayname")),
                reason: opt_str(content, "reason"),
            }
        }
        "m.room.topic" => Incoming::Topic { text: opt_str(content, "topic").unwrap_or_default() },
        "m.room.power_levels" if ev.get("state_key").and_then(Value::as_str) == Some("") => Incoming::PowerLevels {
            now: UserLevels::from_content(content),
            before: ev.get("unsigned").and_then(|u| u.get("prev_content")).map(UserLevels::from_content),
        },
        _ => Incoming::Other,
    };
    Ok((envelope, incoming))
}

fn attachment(content: &Value, url: String) -> Attachment {
    let info = content.get("info");
    Attachment {
        url,
        name: opt_str(content, "filename").or_else(|| opt_str(content, "body")),
        mime: info.and_then(|i| opt_str(i, "mimetype")),
        size: info.and_then(|i| i.get("size")).and_then(Value::as_u64),
    }
}

/// The message in an `m.room.message` content (or an edit's `m.new_content`).
fn message(content: &Value, relates: Option<&Value>) -> Result<Message, ParseError> {
    let msgtype = content.get("msgtype").and_then(Value::as_str).unwrap_or("m.text");
    let mut body = match content.get("body") {
        Some(Value::String(s)) => s.clone(),
        None | Some(Value::Null) => String::new(),
        Some(_) => return Err(ParseError::WrongType { field: "body", expected: "a string" }),
    };
    let reply_target = relates.and_then(|r| r.get("m.in_reply_to")).and_then(|r| opt_str(r, "event_id"));
    let thread = relates
        .filter(|r| r.get("rel_type").and_then(Value::as_str) == Some("m.thread"))
        .and_then(|r| opt_str(r, "event_id"))
        .map(MessageRef);
    let mut formatted = None;
    if content.get("format").and_then(Value::as_str) == Some("org.matrix.custom.html")
        && let Some(html) = opt_str(content, "formatted_body")
    {
        formatted = Some(FormattedBody { format: TextFormat::Html, text: strip_html_reply_fallback(&html) });
    }
    // A reply inside a thread that only falls back to a reply is a thread message.
    let falling_back = relates.and_then(|r| r.get("is_falling_back")).and_then(Value::as_bool).unwrap_or(false);
    let reply_to = match reply_target {
        Some(target) if !(thread.is_some() && falling_back) => {
            body = strip_reply_fallback(&body);
            Some(ReplyTo { target: MessageRef(target), author: None, quote: None })
        }
        _ => None,
    };
    let mut m = Message {
        body,
        formatted,
        attachments: Vec::new(),
        reply_to,
        thread,
        action: msgtype == "m.emote",
        notice: msgtype == "m.notice",
    };
    if matches!(msgtype, "m.image" | "m.file" | "m.audio" | "m.video") {
        // A file of an encrypted room is in `file`, with how to decrypt it.
        let url =
            opt_str(content, "url").or_else(|| content.get("file").and_then(crate::media::encrypted_attachment_url));
        if let Some(url) = url {
            let a = attachment(content, url);
            // The body of a file event is its name unless a caption was given.
            if a.name.as_deref() == Some(m.body.as_str()) || opt_str(content, "filename").is_none() {
                m.body.clear();
            }
            m.attachments.push(a);
        }
    }
    Ok(m)
}

/// The message of a message or an edit.
fn text_of(incoming: &mut Incoming) -> Option<&mut Message> {
    match incoming {
        Incoming::Message { message } | Incoming::Edit { message, .. } => Some(message),
        _ => None,
    }
}

/// The HTML body to show as styling, if any.
fn html_to_style(m: &Message) -> Option<String> {
    m.formatted.as_ref().filter(|f| f.format == TextFormat::Html && !m.body.is_empty()).map(|f| f.text.clone())
}

/// The HTML as XEP-0393 styling; mentions keep the name only.
fn styled(html: &str) -> String {
    html_to_styling_with(html, &|href| !is_mention_link(href))
}

/// The body becomes `styled` (or, without it, the HTML's text), unless that is empty.
fn set_styled(m: &mut Message, styled: Option<String>, html: &str) {
    let text = styled.unwrap_or_else(|| crate::convert::html_text(html));
    if !text.is_empty() {
        m.body = text;
    }
}

/// What XMPP (and every network without HTML) shows is the HTML as XEP-0393
/// styling: converted with a deadline (see [`crate::convert`]); past it, the HTML's
/// text only. `event_id` names the event in the logs.
pub async fn style(incoming: &mut Incoming, event_id: &str) {
    let Some(m) = text_of(incoming) else { return };
    let Some(html) = html_to_style(m) else { return };
    let input = html.clone();
    let out = crate::convert::bounded("HTML to styling", event_id, html.len(), None, move || styled(&input)).await;
    set_styled(m, out, &html);
}

/// Cut a message or edit from `room_id` too long for an XMPP stanza (see
/// [`crate::convert::fit_for_xmpp`]).
pub fn fit_for_xmpp(incoming: &mut Incoming, room_id: &str, event_id: &str) {
    if let Some(m) = text_of(incoming) {
        m.body = crate::convert::fit_for_xmpp(std::mem::take(&mut m.body), room_id, event_id);
    }
}

/// A matrix.to link (a mention "pill"): its text, the person's or room's name, says it all.
fn is_mention_link(href: &str) -> bool {
    href.starts_with("https://matrix.to/#/")
}

/// Drop the `> <@user> quoted` lines older clients put before a reply.
pub fn strip_reply_fallback(body: &str) -> String {
    if !body.starts_with("> ") {
        return body.to_owned();
    }
    let mut lines = body.split('\n');
    let mut rest = Vec::new();
    let mut in_quote = true;
    for line in lines.by_ref() {
        if in_quote {
            if line.starts_with('>') {
                continue;
            }
            in_quote = false;
            if line.is_empty() {
                continue;
            }
        }
        rest.push(line);
    }
    rest.join("\n")
}

/// Drop the `<mx-reply>…</mx-reply>` block older clients put before a reply.
pub fn strip_html_reply_fallback(html: &str) -> String {
    match (html.find("<mx-reply>"), html.find("</mx-reply>")) {
        (Some(start), Some(end)) if start < end => {
            format!("{}{}", &html[..start], &html[end + "</mx-reply>".len()..])
        }
        _ => html.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn ev(kind: &str, content: Value) -> Value {
        json!({"event_id": "$E1", "sender": "@Bob:localhost", "type": kind, "origin_server_ts": 1_700_000_000_000u64, "content": content})
    }

    #[test]
    fn text_emote_notice_and_html() {
        let (env, inc) = parse(&ev("m.room.message", json!({"msgtype": "m.text", "body": "hi"}))).unwrap();
        assert_eq!(env.event_id, "$E1");
        assert_eq!(env.sender, "@Bob:localhost");
        assert_eq!(env.time, SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_000));
        assert_eq!(inc, Incoming::Message { message: Message::text("hi") });
        let (_, inc) = parse(&ev("m.room.message", json!({"msgtype": "m.emote", "body": "waves"}))).unwrap();
        assert!(matches!(inc, Incoming::Message { message } if message.action && message.body == "waves"));
        let (_, inc) = parse(&ev("m.room.message", json!({"msgtype": "m.notice", "body": "n"}))).unwrap();
        assert!(matches!(inc, Incoming::Message { message } if message.notice));
        let (_, inc) = parse(&ev(
            "m.room.message",
            json!({"msgtype": "m.text", "body": "*b*", "format": "org.matrix.custom.html", "formatted_body": "<b>b</b>"}),
        ))
        .unwrap();
        let Incoming::Message { message } = inc else { panic!("not a message") };
        assert_eq!(message.formatted, Some(FormattedBody { format: TextFormat::Html, text: "<b>b</b>".into() }));
        // The body is the HTML as XEP-0393 styling (clients' markdown source is not styling);
        // mentions keep the name only.
        let (_, inc) = parse(&ev(
            "m.room.message",
            json!({"msgtype": "m.text", "body": "**b** Bob: ~~s~~", "format": "org.matrix.custom.html",
                   "formatted_body": "<strong>b</strong> <a href=\"https://matrix.to/#/@bob:l\">Bob</a>: <del>s</del>"}),
        ))
        .unwrap();
        let Incoming::Message { message } = inc else { panic!("not a message") };
        assert_eq!(message.body, "*b* Bob: ~s~");
    }

    #[test]
    fn echo_of_own_device_is_recognised() {
        let mut e = ev("m.room.message", json!({"msgtype": "m.text", "body": "x"}));
        e["unsigned"] = json!({"transaction_id": "t1"});
        assert_eq!(parse(&e).unwrap().0.transaction_id.as_deref(), Some("t1"));
    }

    #[test]
    fn edits_target_the_original_with_the_new_content() {
        let (_, inc) = parse(&ev(
            "m.room.message",
            json!({"msgtype": "m.text", "body": "* fixed", "m.new_content": {"msgtype": "m.text", "body": "fixed"},
                   "m.relates_to": {"rel_type": "m.replace", "event_id": "$orig"}}),
        ))
        .unwrap();
        assert_eq!(inc, Incoming::Edit { target: MessageRef("$orig".into()), message: Message::text("fixed") });
    }

    #[test]
    fn replies_lose_their_fallback() {
        let (_, inc) = parse(&ev(
            "m.room.message",
            json!({"msgtype": "m.text", "body": "> <@a:l> quoted\n> more\n\nanswer",
                   "format": "org.matrix.custom.html", "formatted_body": "<mx-reply><blockquote>q</blockquote></mx-reply>answer",
                   "m.relates_to": {"m.in_reply_to": {"event_id": "$q"}}}),
        ))
        .unwrap();
        let Incoming::Message { message } = inc else { panic!("not a message") };
        assert_eq!(message.body, "answer");
        assert_eq!(message.formatted.map(|f| f.text), Some("answer".into()));
        assert_eq!(message.reply_to.map(|r| r.target), Some(MessageRef("$q".into())));
    }

    #[test]
    fn files_become_attachments() {
        let (_, inc) = parse(&ev(
            "m.room.message",
            json!({"msgtype": "m.image", "body": "cat.png", "url": "mxc://localhost/abc",
                   "info": {"mimetype": "image/png", "size": 42}}),
        ))
        .unwrap();
        let Incoming::Message { message } = inc else { panic!("not a message") };
        assert_eq!(message.body, "");
        assert_eq!(
            message.attachments,
            vec![Attachment {
                url: "mxc://localhost/abc".into(),
                name: Some("cat.png".into()),
                mime: Some("image/png".into()),
                size: Some(42)
            }]
        );
    }

    #[test]
    fn reactions_redactions_members_topics() {
        let (_, inc) = parse(&ev(
            "m.reaction",
            json!({"m.relates_to": {"rel_type": "m.annotation", "event_id": "$t", "key": "👍"}}),
        ))
        .unwrap();
        assert_eq!(inc, Incoming::Reaction { target: MessageRef("$t".into()), key: "👍".into() });
        let (_, inc) = parse(&ev("m.room.redaction", json!({"redacts": "$t", "reason": "oops"}))).unwrap();
        assert_eq!(inc, Incoming::Redaction { redacts: "$t".into(), reason: Some("oops".into()) });
        let mut old = ev("m.room.redaction", json!({}));
        old["redacts"] = json!("$u");
        assert_eq!(parse(&old).unwrap().1, Incoming::Redaction { redacts: "$u".into(), reason: None });
        let mut m = ev("m.room.member", json!({"membership": "join", "displayname": "Bobby"}));
        m["state_key"] = json!("@Bob:localhost");
        m["unsigned"] = json!({"prev_content": {"membership": "join", "displayname": "Bob"}});
        assert_eq!(
            parse(&m).unwrap().1,
            Incoming::Member {
                user: "@Bob:localhost".into(),
                membership: "join".into(),
                previous: Some("join".into()),
                displayname: Some("Bobby".into()),
                previous_displayname: Some("Bob".into()),
                reason: None,
            }
        );
        assert_eq!(parse(&ev("m.room.topic", json!({"topic": "t"}))).unwrap().1, Incoming::Topic { text: "t".into() });
        assert_eq!(parse(&ev("m.room.power_levels", json!({}))).unwrap().1, Incoming::Other);
        assert_eq!(parse(&ev("m.room.message", json!({}))).unwrap().1, Incoming::Other);
    }

    #[test]
    fn malformed_events_are_refused_with_the_reason() {
        let mut e = ev("m.room.message", json!({"msgtype": "m.text", "body": "x"}));
        e.as_object_mut().unwrap().remove("event_id");
        assert_eq!(parse(&e), Err(ParseError::Missing("event_id")));
        let mut e = ev("m.room.message", json!({"msgtype": "m.text", "body": "x"}));
        e["sender"] = json!(5);
        assert_eq!(parse(&e), Err(ParseError::WrongType { field: "sender", expected: "a string" }));
        let mut e = ev("m.room.message", json!({"msgtype": "m.text", "body": "x"}));
        e["origin_server_ts"] = json!(-1);
        assert!(matches!(parse(&e), Err(ParseError::WrongType { field: "origin_server_ts", .. })));
        let e = ev("m.room.message", json!({"msgtype": "m.text", "body": ["x"]}));
        assert_eq!(parse(&e), Err(ParseError::WrongType { field: "body", expected: "a string" }));
        let e = ev("m.reaction", json!({"m.relates_to": {"rel_type": "m.annotation", "event_id": "$t"}}));
        assert_eq!(parse(&e), Err(ParseError::Missing("key")));
        let e = ev("m.room.redaction", json!({}));
        assert_eq!(parse(&e), Err(ParseError::Missing("redacts")));
        let e = ev("m.room.member", json!({"membership": "join"}));
        assert_eq!(parse(&e), Err(ParseError::Missing("state_key")));
    }

    #[test]
    fn power_levels_now_and_before() {
        let mut e = ev(
            "m.room.power_levels",
            json!({"users": {"@bob:l": 100, "@carol:l": 50, "@dan:l": "50"}, "users_default": 0}),
        );
        e["state_key"] = json!("");
        e["unsigned"] = json!({"prev_content": {"users": {"@bob:l": 100, "@dan:l": 50, "@eve:l": 50}}});
        let (_, inc) = parse(&e).unwrap();
        let Incoming::PowerLevels { now, before: Some(before) } = inc else { panic!("not power levels: {inc:?}") };
        assert_eq!(now.level("@dan:l"), 50);
        assert_eq!(now.level("@nobody:l"), 0);
        assert_eq!((before.level("@carol:l"), before.level("@eve:l")), (0, 50));
        // Only the room's own power levels (empty state key) count.
        e["state_key"] = json!("x");
        assert_eq!(parse(&e).unwrap().1, Incoming::Other);
    }
}
