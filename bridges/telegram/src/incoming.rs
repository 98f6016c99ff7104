//! Telegram → the model: what one update says, as events of the portal chat it
//! happened in.
//!
//! Text and its entities (UTF-16 offsets) become the model's XEP-0393 body
//! through [`isthmus_core::spans`]; a reply names the message it answers; an
//! edit is a correction of the message's own id; a reaction update is the
//! person's full reaction set. Chats are `CHAT` or, for a topic of a forum
//! supergroup, `CHAT/TOPIC`.

use isthmus_core::model::{Message, MessageRef, ReplyTo};
use isthmus_core::spans::{self, Span, SpanKind};
use teloxide_core::types::{MessageEntity, MessageEntityKind, ReactionType, User};

/// The name to show for a Telegram user: their first and last name, else @username.
pub fn display_name(user: &User) -> String {
    let mut name = user.first_name.trim().to_owned();
    if let Some(last) = user.last_name.as_deref().map(str::trim).filter(|l| !l.is_empty()) {
        if !name.is_empty() {
            name.push(' ');
        }
        name.push_str(last);
    }
    if name.is_empty() {
        name = user.username.clone().unwrap_or_else(|| format!("user{}", user.id.0));
    }
    // A nick is one line.
    name.replace(['\n', '\r'], " ")
}

/// The chat id a message belongs to: the chat, or its topic in a forum supergroup.
pub fn chat_id(msg: &teloxide_core::types::Message) -> String {
    // Only forum supergroups have topic messages (a reply thread elsewhere is no topic).
    match (msg.is_topic_message, msg.thread_id) {
        (true, Some(thread)) => format!("{}/{}", msg.chat.id.0, thread.0.0),
        _ => msg.chat.id.0.to_string(),
    }
}

/// Telegram entities → spans over `text` (entities that do not fit are left out).
pub fn spans_of(text: &str, entities: &[MessageEntity]) -> Vec<Span> {
    entities
        .iter()
        .filter_map(|e| {
            let kind = match &e.kind {
                MessageEntityKind::Bold => SpanKind::Bold,
                MessageEntityKind::Italic => SpanKind::Italic,
                MessageEntityKind::Strikethrough => SpanKind::Strike,
                MessageEntityKind::Code => SpanKind::Code,
                MessageEntityKind::Pre { .. } => SpanKind::Pre,
                MessageEntityKind::Blockquote | MessageEntityKind::ExpandableBlockquote => SpanKind::Quote,
                MessageEntityKind::TextLink { url } => SpanKind::Link(url.to_string()),
                _ => return None,
            };
            Some(Span { range: spans::byte_range(text, e.offset, e.length)?, kind })
        })
        .collect()
}

/// The model's body for a text and its entities.
pub fn styled_body(text: &str, entities: Option<&[MessageEntity]>) -> String {
    match entities {
        Some(e) if !e.is_empty() => spans::spans_to_styling(text, &spans_of(text, e)),
        _ => text.to_owned(),
    }
}

/// The longest quote of a replied-to message carried for text fallbacks.
const QUOTE_CHARS: usize = 120;

/// A file a message carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IncomingFile {
    pub file_id: String,
    pub name: String,
    pub mime: Option<String>,
    pub size: u64,
    /// What it is, for notices (`photo`, `voice message`…).
    pub what: &'static str,
}

/// The file of a message, if it has one the bridge hands on; an animated
/// sticker is said as text instead (`Err`).
pub fn file_of(msg: &teloxide_core::types::Message) -> Option<Result<IncomingFile, String>> {
    let file =
        |meta: &teloxide_core::types::FileMeta, name: Option<&String>, default: &str, mime: Option<String>, what| {
            Some(Ok(IncomingFile {
                file_id: meta.id.0.clone(),
                name: name.cloned().unwrap_or_else(|| default.to_owned()),
                mime,
                size: u64::from(meta.size),
                what,
            }))
        };
    if let Some(sizes) = msg.photo() {
        let largest = sizes.iter().max_by_key(|p| u64::from(p.width) * u64::from(p.height))?;
        return file(&largest.file, None, "photo.jpg", Some("image/jpeg".into()), "photo");
    }
    if let Some(d) = msg.document() {
        return file(&d.file, d.file_name.as_ref(), "document", d.mime_type.as_ref().map(|m| m.to_string()), "file");
    }
    if let Some(v) = msg.video() {
        return file(&v.file, v.file_name.as_ref(), "video.mp4", v.mime_type.as_ref().map(|m| m.to_string()), "video");
    }
    if let Some(v) = msg.voice() {
        let mime = v.mime_type.as_ref().map(|m| m.to_string()).or(Some("audio/ogg".into()));
        return file(&v.file, None, "voice.ogg", mime, "voice message");
    }
    if let Some(a) = msg.audio() {
        return file(&a.file, a.file_name.as_ref(), "audio.mp3", a.mime_type.as_ref().map(|m| m.to_string()), "audio");
    }
    if let Some(a) = msg.animation() {
        let mime = a.mime_type.as_ref().map(|m| m.to_string());
        return file(&a.file, a.file_name.as_ref(), "animation.mp4", mime, "animation");
    }
    if let Some(st) = msg.sticker() {
        let emoji = st.emoji.clone().unwrap_or_default();
        if st.is_static() {
            return file(&st.file, None, "sticker.webp", Some("image/webp".into()), "sticker");
        }
        return Some(Err(format!("[sticker {emoji}]").replace(" ]", "]")));
    }
    None
}

/// A message's content in the model (`None`: nothing the bridge carries). Files
/// are added by the bridge (their links need the media proxy).
pub fn message_of(msg: &teloxide_core::types::Message) -> Option<Message> {
    let (text, entities) = match (msg.text(), msg.caption()) {
        (Some(t), _) => (t, msg.entities()),
        (None, Some(c)) => (c, msg.caption_entities()),
        (None, None) if file_of(msg).is_some() => ("", None),
        (None, None) => return None,
    };
    let mut m = Message::text(styled_body(text, entities));
    if let Some(r) = msg.reply_to_message().filter(|r| r.forum_topic_created().is_none()) {
        m.reply_to = Some(ReplyTo {
            target: MessageRef(r.id.0.to_string()),
            author: r.from.as_ref().map(display_name),
            quote: r.text().or(r.caption()).map(|t| t.chars().take(QUOTE_CHARS).collect()),
        });
    }
    Some(m)
}

/// The emojis of a reaction list (custom emoji and paid reactions have none).
pub fn emojis(reactions: &[ReactionType]) -> Vec<String> {
    reactions
        .iter()
        .filter_map(|r| match r {
            ReactionType::Emoji { emoji } => Some(emoji.clone()),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entity(kind: MessageEntityKind, offset: usize, length: usize) -> MessageEntity {
        MessageEntity { kind, offset, length }
    }

    #[test]
    fn entities_after_emoji_land_on_the_right_text() {
        // 😀 is two UTF-16 units: "bold" starts at unit 3.
        let text = "😀 bold and code";
        let body =
            styled_body(text, Some(&[entity(MessageEntityKind::Bold, 3, 4), entity(MessageEntityKind::Code, 12, 4)]));
        assert_eq!(body, "😀 *bold* and `code`");
    }

    #[test]
    fn entities_that_do_not_fit_are_left_out() {
        let text = "😀 x";
        assert_eq!(styled_body(text, Some(&[entity(MessageEntityKind::Bold, 1, 1)])), "😀 x", "splits the emoji");
        assert_eq!(styled_body(text, Some(&[entity(MessageEntityKind::Bold, 3, 40)])), "😀 x", "past the end");
        assert_eq!(styled_body("a", Some(&[entity(MessageEntityKind::Mention, 0, 1)])), "a");
    }

    #[test]
    fn links_keep_their_url() {
        let url: url::Url = "https://example.org/a".parse().expect("url");
        let body = styled_body("see here", Some(&[entity(MessageEntityKind::TextLink { url }, 4, 4)]));
        assert_eq!(body, "see here <https://example.org/a>");
    }
}
