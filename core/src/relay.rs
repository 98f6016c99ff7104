//! Relayed identities: how a person from another network appears where the
//! gateway cannot give them an account of their own (a Telegram bot's messages, a
//! Matrix bot account, an IRC relay connection).
//!
//! A [`RelayTemplate`] is written by the admin (`"{nick}: {text}"`) and renders a
//! message as the bot says it, telling the bridge where the nick is so it can
//! style it (a bold entity on Telegram).

use std::ops::Range;

use thiserror::Error;

/// The template a network's bot speaks for someone with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayTemplate {
    before_nick: String,
    between: String,
    after_text: String,
    /// Whether `{nick}` comes before `{text}` (it may be left out: `{text}` alone).
    has_nick: bool,
}

/// A template that cannot work; the text is for the admin.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
#[error(
    "a relay template holds `{{text}}` once and `{{nick}}` at most once, before it (e.g. \"{{nick}}: {{text}}\"); `{0}` does not"
)]
pub struct BadTemplate(pub String);

/// A message as the bot says it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relayed {
    pub text: String,
    /// Where the nick is in `text` (bytes).
    pub nick: Option<Range<usize>>,
    /// Where the message's own text starts in `text` (bytes): spans of the message
    /// move by this much.
    pub text_at: usize,
}

impl Default for RelayTemplate {
    fn default() -> Self {
        RelayTemplate::parse(RelayTemplate::DEFAULT).unwrap_or(RelayTemplate {
            before_nick: String::new(),
            between: ": ".into(),
            after_text: String::new(),
            has_nick: true,
        })
    }
}

impl RelayTemplate {
    /// What bots say when the admin wrote nothing.
    pub const DEFAULT: &'static str = "{nick}: {text}";

    pub fn parse(template: &str) -> Result<Self, BadTemplate> {
        let bad = || BadTemplate(template.to_owned());
        let (head, after_text) = template.split_once("{text}").ok_or_else(bad)?;
        if after_text.contains("{text}") || after_text.contains("{nick}") {
            return Err(bad());
        }
        let (before_nick, between, has_nick) = match head.split_once("{nick}") {
            Some((b, m)) if !m.contains("{nick}") => (b, m, true),
            Some(_) => return Err(bad()),
            None => ("", head, false),
        };
        Ok(RelayTemplate {
            before_nick: before_nick.to_owned(),
            between: between.to_owned(),
            after_text: after_text.to_owned(),
            has_nick,
        })
    }

    /// `text` as said for `nick`; a `/me` action is `nick text` whatever the template.
    pub fn render(&self, nick: &str, text: &str, action: bool) -> Relayed {
        if action {
            return Relayed { text: format!("{nick} {text}"), nick: Some(0..nick.len()), text_at: nick.len() + 1 };
        }
        let mut out = String::with_capacity(text.len() + nick.len() + 16);
        out.push_str(&self.before_nick);
        let nick_range = self.has_nick.then(|| {
            let start = out.len();
            out.push_str(nick);
            start..out.len()
        });
        out.push_str(&self.between);
        let text_at = out.len();
        out.push_str(text);
        out.push_str(&self.after_text);
        Relayed { text: out, nick: nick_range, text_at }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_render_and_say_where_the_nick_is() {
        let t = RelayTemplate::default();
        let r = t.render("Alice", "hi", false);
        assert_eq!(r.text, "Alice: hi");
        assert_eq!(r.nick, Some(0..5));
        assert_eq!(&r.text[r.text_at..], "hi");
        let t = RelayTemplate::parse("[{nick}] {text} (bridged)").expect("valid");
        let r = t.render("Bob", "yo", false);
        assert_eq!(r.text, "[Bob] yo (bridged)");
        assert_eq!(&r.text[r.nick.clone().expect("nick")], "Bob");
        assert_eq!(t.render("Bob", "waves", true).text, "Bob waves");
        assert_eq!(RelayTemplate::parse("{text}").expect("valid").render("x", "y", false).nick, None);
    }

    #[test]
    fn bad_templates_are_refused() {
        for t in ["{nick}", "{text} {nick}", "{text}{text}", "{nick}{nick}{text}", ""] {
            assert!(RelayTemplate::parse(t).is_err(), "{t}");
        }
    }
}
