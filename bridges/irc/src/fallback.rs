//! IRC has no edits, deletions or reactions. The bridge still receives them (other
//! networks in a portal get them natively) and shows them on IRC by the policy the
//! admin chose (`fallbacks:` in the network's YAML):
//!
//! | event | policy | IRC line |
//! |---|---|---|
//! | correction | `mark` (default) | `[edit] the corrected text` |
//! | retraction | `notice` | `/me deleted a message: "quote…"` |
//! | retraction | `ignore` (default) | nothing |
//! | moderation (someone else's message removed) | `notice` | `/me removed a message by bob: "quote…" (reason: spam)` |
//! | moderation | `ignore` (default) | nothing |
//! | reaction | `action` (default) | `/me reacted 👍 to bob: "quote…"`, or `/me removed their reaction to …` |
//! | reply | `quote` (default) | `bob: > quote… ↵ the reply` |
//! | reply | `nick` | `bob: the reply` |
//! | reply | `ignore` | `the reply` |
//!
//! A reply's own XEP-0428 fallback (the quote a client puts in the body) is taken
//! out when the message arrives, so only this quote shows.

use isthmus_config::{CorrectionFallback, IrcFallbacks, ReactionFallback, ReplyFallback, RetractionFallback};
use isthmus_core::model::{Event, EventKind, Message, Quote};

/// Longest quote of the target message.
const QUOTE_CHARS: usize = 60;

/// The quoted target, after `: `, with its author after `author_word` (` to bob`) when given.
fn about(context: Option<&Quote>, author_word: Option<&str>) -> String {
    let Some(q) = context else { return String::new() };
    let mut text: String = q.text.chars().take(QUOTE_CHARS).collect();
    if q.text.chars().count() > QUOTE_CHARS {
        text.push('…');
    }
    let text = text.replace(['\r', '\n'], " ");
    match author_word {
        Some(word) => format!(" {word} {}: \"{text}\"", q.author),
        None => format!(": \"{text}\""),
    }
}

/// Longest quote of the message a reply answers (the reply follows on the same line).
const REPLY_QUOTE_CHARS: usize = 40;

/// `message` as IRC shows a reply by `policy`, or `None` when it goes as it is (not
/// a reply, an action, nothing known of the target, or the policy says so).
pub fn reply(message: &Message, policy: ReplyFallback) -> Option<Message> {
    let r = message.reply_to.as_ref().filter(|_| !message.action)?;
    let author = r.author.as_deref().map(|a| a.replace(['\r', '\n', ' '], "")).filter(|a| !a.is_empty());
    let quote =
        r.quote.as_deref().map(|q| q.split_whitespace().collect::<Vec<_>>().join(" ")).filter(|q| !q.is_empty());
    let prefix = match (policy, author, quote) {
        (ReplyFallback::Ignore, ..) | (ReplyFallback::Nick, None, _) | (ReplyFallback::Quote, None, None) => {
            return None;
        }
        (ReplyFallback::Nick, Some(a), _) | (ReplyFallback::Quote, Some(a), None) => format!("{a}: "),
        (ReplyFallback::Quote, author, Some(q)) => {
            let mut text: String = q.chars().take(REPLY_QUOTE_CHARS).collect();
            if q.chars().count() > REPLY_QUOTE_CHARS {
                text.push('…');
            }
            match author {
                Some(a) => format!("{a}: > {text} ↵ "),
                None => format!("> {text} ↵ "),
            }
        }
    };
    let mut out = message.clone();
    out.body = format!("{prefix}{}", message.body);
    // The formatted body would say it without the prefix: IRC is sent the plain one.
    out.formatted = None;
    Some(out)
}

/// The IRC message standing for `event`, or `None` when the policy says nothing is sent.
pub fn render(event: &Event, policy: &IrcFallbacks) -> Option<Message> {
    let context = event.context.as_ref();
    match &event.kind {
        EventKind::Correction { message, .. } => match policy.corrections {
            CorrectionFallback::Mark => {
                Some(Message { body: format!("[edit] {}", message.body), ..Message::default() })
            }
            CorrectionFallback::Ignore => None,
        },
        EventKind::Retraction { moderator: None, .. } => match policy.retractions {
            RetractionFallback::Notice => Some(Message {
                body: format!("deleted a message{}", about(context, None)),
                action: true,
                ..Message::default()
            }),
            RetractionFallback::Ignore => None,
        },
        EventKind::Retraction { moderator: Some(_), reason, .. } => match policy.retractions {
            RetractionFallback::Notice => {
                let reason = reason.as_deref().map(|r| format!(" (reason: {})", r.replace(['\r', '\n'], " ")));
                Some(Message {
                    body: format!("removed a message{}{}", about(context, Some("by")), reason.unwrap_or_default()),
                    action: true,
                    ..Message::default()
                })
            }
            RetractionFallback::Ignore => None,
        },
        EventKind::Reactions { emojis, .. } => match policy.reactions {
            ReactionFallback::Action if emojis.is_empty() => Some(Message {
                body: format!("removed their reaction{}", about(context, Some("to"))),
                action: true,
                ..Message::default()
            }),
            ReactionFallback::Action => Some(Message {
                body: format!("reacted {}{}", emojis.join(" "), about(context, Some("to"))),
                action: true,
                ..Message::default()
            }),
            ReactionFallback::Ignore => None,
        },
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use isthmus_core::model::{ChatRef, MessageRef, NetworkId, ReplyTo, Sender};

    fn replying(author: Option<&str>, quote: Option<&str>, body: &str) -> Message {
        let reply_to = ReplyTo {
            target: MessageRef("m1".into()),
            author: author.map(str::to_owned),
            quote: quote.map(str::to_owned),
        };
        Message { reply_to: Some(reply_to), ..Message::text(body) }
    }

    #[test]
    fn replies_say_whom_and_what_they_answer() {
        let body = |m: Option<Message>| m.map(|m| m.body);
        let long = format!("are we\nmeeting {}", "x".repeat(50));
        let m = replying(Some("bob"), Some(&long), "yes");
        let want = format!("bob: > are we meeting {}… ↵ yes", "x".repeat(40 - "are we meeting ".len()));
        assert_eq!(body(reply(&m, ReplyFallback::Quote)), Some(want));
        assert_eq!(body(reply(&m, ReplyFallback::Nick)), Some("bob: yes".into()));
        assert_eq!(reply(&m, ReplyFallback::Ignore), None);
        let m = replying(Some("bob"), Some("short"), "ok");
        assert_eq!(body(reply(&m, ReplyFallback::Quote)), Some("bob: > short ↵ ok".into()));
        assert_eq!(body(reply(&replying(None, Some("hi"), "ok"), ReplyFallback::Quote)), Some("> hi ↵ ok".into()));
        assert_eq!(body(reply(&replying(Some("bob"), None, "ok"), ReplyFallback::Quote)), Some("bob: ok".into()));
        assert_eq!(reply(&replying(None, None, "ok"), ReplyFallback::Quote), None);
        assert_eq!(reply(&Message::text("plain"), ReplyFallback::Quote), None);
        let action = Message { action: true, ..replying(Some("bob"), Some("hi"), "waves") };
        assert_eq!(reply(&action, ReplyFallback::Quote), None, "an action goes as it is");
    }

    fn event(kind: EventKind, context: Option<Quote>) -> Event {
        let mut e = Event::new(
            NetworkId::xmpp(),
            ChatRef::room(NetworkId::new("irc"), "#c%s"),
            Sender::own("a@x", "alice"),
            kind,
        );
        e.context = context;
        e
    }

    fn quote() -> Option<Quote> {
        Some(Quote { author: "bob".into(), text: "a".repeat(70) })
    }

    #[test]
    fn defaults() {
        let p = IrcFallbacks::default();
        let fix = EventKind::Correction { target: MessageRef("m1".into()), message: Message::text("fixed") };
        assert_eq!(render(&event(fix, None), &p).map(|m| m.body), Some("[edit] fixed".into()));
        let retract = EventKind::Retraction { target: MessageRef("m1".into()), moderator: None, reason: None };
        assert_eq!(render(&event(retract, quote()), &p), None);
        let react =
            EventKind::Reactions { target: MessageRef("m1".into()), emojis: vec!["👍".into(), "🎉".into()] };
        let m = render(&event(react, quote()), &p).expect("a line");
        assert!(m.action);
        assert_eq!(m.body, format!("reacted 👍 🎉 to bob: \"{}…\"", "a".repeat(60)));
        let unreact = EventKind::Reactions { target: MessageRef("m1".into()), emojis: vec![] };
        assert!(render(&event(unreact, None), &p).expect("a line").body.starts_with("removed their reaction"));
    }

    #[test]
    fn other_policies() {
        let p = IrcFallbacks {
            corrections: CorrectionFallback::Ignore,
            retractions: RetractionFallback::Notice,
            reactions: ReactionFallback::Ignore,
            replies: ReplyFallback::Nick,
        };
        let fix = EventKind::Correction { target: MessageRef("m1".into()), message: Message::text("fixed") };
        assert_eq!(render(&event(fix, None), &p), None);
        let retract = EventKind::Retraction { target: MessageRef("m1".into()), moderator: None, reason: None };
        let q = Some(Quote { author: "alice".into(), text: "oops\\nline".into() });
        assert_eq!(render(&event(retract, q), &p).map(|m| m.body), Some("deleted a message: \"oops\\nline\"".into()));
        let react = EventKind::Reactions { target: MessageRef("m1".into()), emojis: vec!["👍".into()] };
        assert_eq!(render(&event(react, None), &p), None);
        let moderated = EventKind::Retraction {
            target: MessageRef("m1".into()),
            moderator: Some("alice".into()),
            reason: Some("spam\nagain".into()),
        };
        let q = Some(Quote { author: "bob".into(), text: "buy now".into() });
        let m = render(&event(moderated.clone(), q), &p).expect("a line");
        assert!(m.action);
        assert_eq!(m.body, "removed a message by bob: \"buy now\" (reason: spam again)");
        assert_eq!(render(&event(moderated, None), &IrcFallbacks::default()), None);
    }
}
