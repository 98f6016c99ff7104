//! The model → Telegram: how the bot says what someone from another network said.
//!
//! The body's XEP-0393 styling becomes entities (UTF-16 offsets, never a parse
//! mode), the sender's nick goes in front by the relay template and is bold, and
//! files are offered as their links. Texts longer than Telegram takes are cut
//! with a mark saying so.

use isthmus_core::model::Message;
use isthmus_core::relay::RelayTemplate;
use isthmus_core::spans::{self, SpanKind};

use crate::api::{Entity, EntityKind, OutgoingText};

/// The most UTF-16 units a Telegram text holds.
pub const MAX_TEXT_UNITS: usize = 4096;

/// What the bot sends for `nick`'s message `m`.
pub fn relayed_text(template: &RelayTemplate, nick: &str, m: &Message) -> OutgoingText {
    let mut body = m.body.clone();
    for a in &m.attachments {
        if !body.contains(&a.url) {
            if !body.is_empty() {
                body.push('\n');
            }
            body.push_str(&a.url);
        }
    }
    let styled = spans::styling_to_spans(&body);
    let relayed = template.render(nick, &styled.text, m.action);
    // (byte range, kind) over the relayed text.
    let mut ranges: Vec<(std::ops::Range<usize>, EntityKind)> = Vec::new();
    if let Some(r) = relayed.nick.clone().filter(|r| !r.is_empty()) {
        ranges.push((r, EntityKind::Bold));
    }
    for s in styled.spans {
        let kind = match s.kind {
            SpanKind::Bold => EntityKind::Bold,
            SpanKind::Italic => EntityKind::Italic,
            SpanKind::Strike => EntityKind::Strike,
            SpanKind::Code => EntityKind::Code,
            SpanKind::Pre => EntityKind::Pre,
            SpanKind::Quote => EntityKind::Blockquote,
            SpanKind::Link(url) => EntityKind::Link(url),
        };
        ranges.push((s.range.start + relayed.text_at..s.range.end + relayed.text_at, kind));
    }
    let mut text = relayed.text;
    // Cut at the limit, on a character boundary, saying so.
    if spans::utf16_len(&text) > MAX_TEXT_UNITS {
        const MARK: &str = " […]";
        let mut units = 0;
        let mut cut = 0;
        for (i, c) in text.char_indices() {
            if units + c.len_utf16() > MAX_TEXT_UNITS - MARK.len() {
                break;
            }
            units += c.len_utf16();
            cut = i + c.len_utf8();
        }
        text.truncate(cut);
        text.push_str(MARK);
        for (r, _) in &mut ranges {
            r.end = r.end.min(cut);
            r.start = r.start.min(r.end);
        }
        ranges.retain(|(r, _)| !r.is_empty());
    }
    let offsets: Vec<usize> = ranges.iter().flat_map(|(r, _)| [r.start, r.end]).collect();
    let units = spans::utf16_offsets(&text, &offsets);
    let entities = ranges
        .into_iter()
        .enumerate()
        .map(|(i, (_, kind))| Entity { kind, offset: units[2 * i], length: units[2 * i + 1] - units[2 * i] })
        .collect();
    OutgoingText { text, entities, reply_to: None }
}

/// A text saying what `nick` did where Telegram has no native form for it.
pub fn notice(nick: &str, what: &str) -> OutgoingText {
    let text = format!("{nick} {what}");
    let length = spans::utf16_len(nick);
    OutgoingText { text, entities: vec![Entity { kind: EntityKind::Bold, offset: 0, length }], reply_to: None }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_nick_is_bold_and_styling_becomes_entities() {
        let t = relayed_text(&RelayTemplate::default(), "Al😀ce", &Message::text("😀 *hi* `x`"));
        assert_eq!(t.text, "Al😀ce: 😀 hi x");
        assert_eq!(t.entities[0], Entity { kind: EntityKind::Bold, offset: 0, length: 6 });
        // "Al😀ce: " is 8 units, then 😀 (2) and a space: "hi" at 11.
        assert_eq!(t.entities[1], Entity { kind: EntityKind::Bold, offset: 11, length: 2 });
        assert_eq!(t.entities[2], Entity { kind: EntityKind::Code, offset: 14, length: 1 });
    }

    #[test]
    fn long_texts_are_cut_within_the_limit() {
        let t = relayed_text(&RelayTemplate::default(), "a", &Message::text("😀".repeat(5000)));
        assert!(spans::utf16_len(&t.text) <= MAX_TEXT_UNITS);
        assert!(t.text.ends_with("[…]"));
    }

    #[test]
    fn actions_and_files() {
        let m = Message { action: true, ..Message::text("waves") };
        assert_eq!(relayed_text(&RelayTemplate::default(), "Bob", &m).text, "Bob waves");
        let mut m = Message::text("");
        m.attachments.push(isthmus_core::model::Attachment {
            url: "https://e.org/f.png".into(),
            name: None,
            mime: None,
            size: None,
        });
        assert_eq!(relayed_text(&RelayTemplate::default(), "Bob", &m).text, "Bob: https://e.org/f.png");
    }
}
