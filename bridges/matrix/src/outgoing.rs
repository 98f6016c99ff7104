//! The common model → Matrix event contents (JSON as the client-server API
//! spells it): messages with replies and threads, file events (`m.image`,
//! `m.file`, … of a file uploaded by `media`), edits (`m.replace`) and
//! reactions (`m.annotation`). Redactions, typing and receipts are API calls,
//! made in `session`.

use isthmus_core::markup::styling_to_html;
use isthmus_core::model::{Message, TextFormat};
use isthmus_core::network::DeliveryError;
use isthmus_core::outbox::Receipt;
use serde_json::{Value, json};
use tracing::warn;

use crate::convert;

/// The `m.room.message` content for a message. `reply_to` and `thread` are event
/// ids on Matrix (the router already translated them where it knew them).
pub fn message_content(m: &Message) -> Value {
    let mut content = base_content(m);
    if let Some(relation) = relation(m) {
        content["m.relates_to"] = relation;
    }
    content
}

/// The `m.relates_to` of a message that answers or continues a thread.
fn relation(m: &Message) -> Option<Value> {
    let reply = m.reply_to.as_ref().map(|r| r.target.0.clone()).filter(|t| t.starts_with('$'));
    let thread = m.thread.as_ref().map(|t| t.0.clone()).filter(|t| t.starts_with('$'));
    match (thread, reply) {
        (Some(root), reply) => {
            let in_reply_to = reply.clone().unwrap_or_else(|| root.clone());
            Some(json!({
                "rel_type": "m.thread",
                "event_id": root,
                "is_falling_back": reply.is_none(),
                "m.in_reply_to": {"event_id": in_reply_to},
            }))
        }
        (None, Some(target)) => Some(json!({"m.in_reply_to": {"event_id": target}})),
        (None, None) => None,
    }
}

/// A file uploaded to the homeserver, to be announced in a room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadedFile {
    /// Its `mxc://` URI.
    pub url: String,
    pub name: String,
    /// Its MIME type, without parameters.
    pub mime: String,
    pub size: u64,
    /// For an encrypted room: the event's `file` object (with the URL and how to decrypt).
    pub encrypted: Option<Value>,
}

/// The `msgtype` of a file of type `mime`.
pub fn file_msgtype(mime: &str) -> &'static str {
    match mime.split('/').next().map(str::to_ascii_lowercase).as_deref() {
        Some("image") => "m.image",
        Some("video") => "m.video",
        Some("audio") => "m.audio",
        _ => "m.file",
    }
}

/// The `m.room.message` content announcing `file`, sent for message `m` (whose
/// reply and thread it keeps).
pub fn file_content(m: &Message, file: &UploadedFile) -> Value {
    let mut content = json!({
        "msgtype": file_msgtype(&file.mime),
        "body": file.name,
        "filename": file.name,
        "info": {"mimetype": file.mime, "size": file.size},
    });
    match &file.encrypted {
        Some(encrypted) => content["file"] = encrypted.clone(),
        None => content["url"] = json!(file.url),
    }
    if let Some(relation) = relation(m) {
        content["m.relates_to"] = relation;
    }
    content
}

/// The text that goes as its own `m.text` beside the files of `m`: its body without
/// the files' URLs, when anything is left (the HTML body only when nothing was removed).
pub fn text_beside_files(m: &Message) -> Option<Message> {
    let mut body = m.body.clone();
    for a in &m.attachments {
        body = body.replace(&a.url, "");
    }
    let body = body.trim();
    if body.is_empty() {
        return None;
    }
    let formatted = if body == m.body { m.formatted.clone() } else { None };
    Some(Message { body: body.to_owned(), formatted, attachments: Vec::new(), ..m.clone() })
}

/// The body as sent: the message's, with the files' URLs it does not name (edits;
/// new messages send files as file events).
fn full_body(m: &Message) -> String {
    let mut body = m.body.clone();
    for a in &m.attachments {
        if !body.contains(&a.url) {
            if !body.is_empty() {
                body.push('\n');
            }
            body.push_str(&a.url);
        }
    }
    body
}

/// The message's own HTML body, if it has one.
fn own_html(m: &Message) -> Option<String> {
    m.formatted.as_ref().filter(|f| f.format == TextFormat::Html).map(|f| f.text.clone())
}

/// The HTML body of `m`: its own, else its XEP-0393 styling as HTML, converted
/// with a deadline (see [`crate::convert`]); `None` past it (plain text then).
async fn bounded_html(m: &Message, body: &str, ctx: Sending<'_>) -> Option<String> {
    if let Some(html) = own_html(m) {
        return Some(html);
    }
    let text = body.to_owned();
    crate::convert::bounded("styling to HTML", ctx.id, text.len(), ctx.stored, move || styling_to_html(&text))
        .await
        .flatten()
}

/// What the bounded conversions need to know of the copy being sent.
#[derive(Debug, Clone, Copy)]
pub struct Sending<'a> {
    /// Names the message in the logs (its transaction id).
    pub id: &'a str,
    /// Its outbox row, stored before a conversion goes aside.
    pub stored: Option<&'a Receipt>,
}

/// `msgtype`, `body` and the HTML body of a message (the plain body is XEP-0393 styled
/// text, as the model carries it: its styling becomes the HTML body).
fn base_content(m: &Message) -> Value {
    let body = full_body(m);
    let html = own_html(m).or_else(|| styling_to_html(&body));
    content_of(m, body, html)
}

fn content_of(m: &Message, body: String, html: Option<String>) -> Value {
    let msgtype = if m.action {
        "m.emote"
    } else if m.notice {
        "m.notice"
    } else {
        "m.text"
    };
    let mut content = json!({"msgtype": msgtype, "body": body});
    if let Some(html) = html {
        content["format"] = json!("org.matrix.custom.html");
        content["formatted_body"] = json!(html);
    }
    content
}

/// An edit of `target` (always the original event) to `m`.
pub fn edit_content(target: &str, m: &Message) -> Value {
    edit_of(target, base_content(m))
}

fn edit_of(target: &str, new: Value) -> Value {
    let mut content = new.clone();
    content["body"] = json!(format!("* {}", new["body"].as_str().unwrap_or_default()));
    if let Some(html) = new.get("formatted_body").and_then(Value::as_str) {
        content["formatted_body"] = json!(format!("* {html}"));
    }
    content["m.new_content"] = new;
    content["m.relates_to"] = json!({"rel_type": "m.replace", "event_id": target});
    content
}

/// [`message_content`] within the limits: the styling converted with a deadline,
/// and refused ([`DeliveryError::Rejected`], with the limit and the size) when too
/// large for the homeserver. The HTML body goes when it alone makes it too large.
pub async fn message_content_bounded(m: &Message, ctx: Sending<'_>) -> Result<Value, DeliveryError> {
    bounded_content(m, ctx, |base| {
        let mut content = base;
        if let Some(relation) = relation(m) {
            content["m.relates_to"] = relation;
        }
        content
    })
    .await
}

/// [`edit_content`] within the limits (see [`message_content_bounded`]).
pub async fn edit_content_bounded(target: &str, m: &Message, ctx: Sending<'_>) -> Result<Value, DeliveryError> {
    bounded_content(m, ctx, |base| edit_of(target, base)).await
}

async fn bounded_content(m: &Message, ctx: Sending<'_>, wrap: impl Fn(Value) -> Value) -> Result<Value, DeliveryError> {
    let body = full_body(m);
    // Too large already as plain text: refused before any conversion.
    let plain = wrap(content_of(m, body.clone(), None));
    let plain_size = convert::content_size(&plain);
    if plain_size > convert::MAX_CONTENT_BYTES {
        warn!(id = ctx.id, size = plain_size, "a message too large for Matrix is refused");
        return Err(convert::too_large(plain_size));
    }
    let Some(html) = bounded_html(m, &body, ctx).await else { return Ok(plain) };
    let content = wrap(content_of(m, body, Some(html)));
    let size = convert::content_size(&content);
    if size > convert::MAX_CONTENT_BYTES {
        warn!(id = ctx.id, size, plain_size, "the HTML body would make the event too large; sent as plain text");
        return Ok(plain);
    }
    Ok(content)
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
        // XEP-0393 styling in the body becomes the HTML body.
        assert_eq!(
            message_content(&Message::text("*x* & _y_")),
            json!({"msgtype": "m.text", "body": "*x* & _y_", "format": "org.matrix.custom.html",
                   "formatted_body": "<strong>x</strong> &amp; <em>y</em>"})
        );
        assert_eq!(
            edit_content("$o", &Message::text("`c`"))["m.new_content"]["formatted_body"],
            json!("<code>c</code>")
        );
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

    const CTX: Sending<'static> = Sending { id: "txn-test", stored: None };

    #[tokio::test]
    async fn contents_too_large_for_matrix_are_refused_with_the_limit_and_the_size() {
        // Small: as before, with its styling as HTML.
        let content = message_content_bounded(&Message::text("*x*"), CTX).await.expect("fits");
        assert_eq!(content, message_content(&Message::text("*x*")));
        // 200 kB of unclosed openers: refused before any conversion, saying why.
        let body = "*a ".repeat(70_000);
        let err = message_content_bounded(&Message::text(&body), CTX).await.expect_err("too large");
        let DeliveryError::Rejected(text) = &err else { panic!("not a refusal: {err:?}") };
        let size = serde_json::to_vec(&json!({"msgtype": "m.text", "body": body})).map(|v| v.len()).unwrap_or(0);
        assert!(text.contains("60000 bytes") && text.contains(&format!("{size} bytes")), "{text}");
        // An edit counts its body twice.
        let body = "x".repeat(35_000);
        assert!(edit_content_bounded("$o", &Message::text(&body), CTX).await.is_err());
        assert!(message_content_bounded(&Message::text(&body), CTX).await.is_ok());
        // Plain text that fits but whose HTML would not: sent as plain text.
        let body = "*b* ".repeat(12_000);
        let content = message_content_bounded(&Message::text(&body), CTX).await.expect("fits as plain text");
        assert_eq!(content, json!({"msgtype": "m.text", "body": body}));
        assert!(crate::convert::content_size(&message_content(&Message::text(&body))) > convert::MAX_CONTENT_BYTES);
    }

    fn file(mime: &str) -> UploadedFile {
        UploadedFile {
            url: "mxc://localhost/abc".into(),
            name: "cat.png".into(),
            mime: mime.into(),
            size: 42,
            encrypted: None,
        }
    }

    #[test]
    fn files_are_file_events() {
        assert_eq!(
            file_content(&Message::text(""), &file("image/png")),
            json!({"msgtype": "m.image", "body": "cat.png", "filename": "cat.png", "url": "mxc://localhost/abc",
                   "info": {"mimetype": "image/png", "size": 42}})
        );
        assert_eq!(file_msgtype("video/mp4"), "m.video");
        assert_eq!(file_msgtype("audio/ogg"), "m.audio");
        assert_eq!(file_msgtype("Image/JPEG"), "m.image");
        assert_eq!(file_msgtype("application/pdf"), "m.file");
        assert_eq!(file_msgtype("garbage"), "m.file");
        // A file sent as a reply or in a thread stays there.
        let m = Message {
            reply_to: Some(ReplyTo { target: MessageRef("$q".into()), author: None, quote: None }),
            ..Message::text("")
        };
        assert_eq!(file_content(&m, &file("text/plain"))["m.relates_to"], json!({"m.in_reply_to": {"event_id": "$q"}}));
        assert_eq!(file_content(&m, &file("text/plain"))["msgtype"], "m.file");
    }

    #[test]
    fn text_beside_files_is_what_is_not_their_url() {
        let att = |url: &str| Attachment { url: url.into(), name: None, mime: None, size: None };
        // The body is only the URL (XEP-0066 as clients send it): no text.
        let m = Message { attachments: vec![att("https://h/f.png")], ..Message::text("https://h/f.png") };
        assert_eq!(text_beside_files(&m), None);
        let m = Message { attachments: vec![att("https://h/f.png")], ..Message::text("") };
        assert_eq!(text_beside_files(&m), None);
        // A caption stays, without the URL and without an HTML body that may still hold it.
        let m = Message {
            formatted: Some(FormattedBody { format: TextFormat::Html, text: "<a>https://h/f.png</a>".into() }),
            attachments: vec![att("https://h/f.png")],
            ..Message::text("look: https://h/f.png")
        };
        assert_eq!(text_beside_files(&m), Some(Message::text("look:")));
        // Text that does not name the file keeps everything but the attachments.
        let m = Message {
            formatted: Some(FormattedBody { format: TextFormat::Html, text: "<b>hi</b>".into() }),
            attachments: vec![att("https://h/f.png")],
            ..Message::text("hi")
        };
        let text = text_beside_files(&m).unwrap();
        assert_eq!((text.body.as_str(), text.attachments.len()), ("hi", 0));
        assert_eq!(text.formatted, m.formatted);
    }
}
