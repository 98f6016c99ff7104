//! The common model → Matrix event contents (JSON as the client-server API
//! spells it): messages with replies and threads, edits (`m.replace`) and
//! reactions (`m.annotation`). Redactions, typing and receipts are API calls,
//! made in `session`.

use isthmus_core::model::{Message, TextFormat};
use serde_json::{Value, json};

/// The `m.room.message` content for a message. `reply_to` and `thread` are event
/// ids on Matrix (the router already translated them where it knew them).
pub fn message_content(m: &Message) -> Value {
    let mut content = base_content(m);
    let reply = m.reply_to.as_ref().map(|r| r.target.0.clone()).filter(|t| t.starts_with('$'));
    let thread = m.thread.as_ref().map(|t| t.0.clone()).filter(|t| t.starts_with('$'));
    match (thread, reply) {
        (Some(root), reply) => {
            let in_reply_to = reply.clone().unwrap_or_else(|| root.clone());
            content["m.relates_to"] = json!({
                "rel_type": "m.thread",
                "event_id": root,
                "is_falling_back": reply.is_none(),
                "m.in_reply_to": {"event_id": in_reply_to},
            });
        }
        (None, Some(target)) => {
            content["m.relates_to"] = json!({"m.in_reply_to": {"event_id": target}});
        }
        (None, None) => {}
    }
    content
}

/// `msgtype`, `body` and the HTML body of a message.
fn base_content(m: &Message) -> Value {
    let msgtype = if m.action {
        "m.emote"
    } else if m.notice {
        "m.notice"
    } else {
        "m.text"
    };
    let mut body = m.body.clone();
    for a in &m.attachments {
        // Files as links until they are uploaded to the homeserver.
        if !body.contains(&a.url) {
            if !body.is_empty() {
                body.push('\n');
            }
            body.push_str(&a.url);
        }
    }
    let mut content = json!({"msgtype": msgtype, "body": body});
    if let Some(f) = m.formatted.as_ref().filter(|f| f.format == TextFormat::Html) {
        content["format"] = json!("org.matrix.custom.html");
        content["formatted_body"] = json!(f.text);
    }
    content
}

/// An edit of `target` (always the original event) to `m`.
pub fn edit_content(target: &str, m: &Message) -> Value {
    let new = base_content(m);
    let mut content = new.clone();
    content["body"] = json!(format!("* {}", new["body"].as_str().unwrap_or_default()));
    if let Some(html) = new.get("formatted_body").and_then(Value::as_str) {
        content["formatted_body"] = json!(format!("* {html}"));
    }
    content["m.new_content"] = new;
    content["m.relates_to"] = json!({"rel_type": "m.replace", "event_id": target});
    content
}

/// One reaction `key` on `target`.
pub fn reaction_content(target: &str, key: &str) -> Value {
    json!({"m.relates_to": {"rel_type": "m.annotation", "event_id": target, "key": key}})
}

#[cfg(test)]
mod tests {
    use isthmus_core::model::{Attachment, FormattedBody, MessageRef, ReplyTo};

    use super::*;

    #[test]
    fn plain_emote_notice() {
        assert_eq!(message_content(&Message::text("hi")), json!({"msgtype": "m.text", "body": "hi"}));
        let m = Message { action: true, ..Message::text("waves") };
        assert_eq!(message_content(&m)["msgtype"], "m.emote");
        let m = Message { notice: true, ..Message::text("n") };
        assert_eq!(message_content(&m)["msgtype"], "m.notice");
    }

    #[test]
    fn html_and_attachments() {
        let m = Message {
            formatted: Some(FormattedBody { format: TextFormat::Html, text: "<b>x</b>".into() }),
            attachments: vec![Attachment { url: "https://h/f.png".into(), name: None, mime: None, size: None }],
            ..Message::text("x")
        };
        assert_eq!(
            message_content(&m),
            json!({"msgtype": "m.text", "body": "x\nhttps://h/f.png", "format": "org.matrix.custom.html", "formatted_body": "<b>x</b>"})
        );
        let styling = Message {
            formatted: Some(FormattedBody { format: TextFormat::Styling, text: "*x*".into() }),
            ..Message::text("*x*")
        };
        assert_eq!(message_content(&styling), json!({"msgtype": "m.text", "body": "*x*"}));
    }

    #[test]
    fn replies_and_threads() {
        let m = Message {
            reply_to: Some(ReplyTo { target: MessageRef("$q".into()), author: None, quote: None }),
            ..Message::text("a")
        };
        assert_eq!(message_content(&m)["m.relates_to"], json!({"m.in_reply_to": {"event_id": "$q"}}));
        // A target the id map did not know (an XMPP id) is no Matrix event: no relation.
        let m = Message {
            reply_to: Some(ReplyTo { target: MessageRef("xmpp-id".into()), author: None, quote: None }),
            ..Message::text("a")
        };
        assert!(message_content(&m).get("m.relates_to").is_none());
        let m = Message { thread: Some(MessageRef("$root".into())), ..Message::text("t") };
        assert_eq!(
            message_content(&m)["m.relates_to"],
            json!({"rel_type": "m.thread", "event_id": "$root", "is_falling_back": true, "m.in_reply_to": {"event_id": "$root"}})
        );
    }

    #[test]
    fn edits_and_reactions() {
        assert_eq!(
            edit_content("$o", &Message::text("new")),
            json!({"msgtype": "m.text", "body": "* new", "m.new_content": {"msgtype": "m.text", "body": "new"},
                   "m.relates_to": {"rel_type": "m.replace", "event_id": "$o"}})
        );
        assert_eq!(
            reaction_content("$o", "👍"),
            json!({"m.relates_to": {"rel_type": "m.annotation", "event_id": "$o", "key": "👍"}})
        );
    }
}
