//! Discord → the model: a message's markdown as the model's XEP-0393 body, its
//! mentions as readable names, its author's name, replies and files.
//!
//! Discord's markdown is read by a small parser of the rules Discord documents
//! (bold `**`, italics `*`/`_`, underline `__`, strike `~~`, spoilers `||`,
//! inline code and code blocks, `> ` and `>>> ` quotes, `#` headings, `-#`
//! subtext, masked links, `\` escapes) into plain text and spans, which
//! [`isthmus_core::spans::spans_to_styling`] writes as XEP-0393. Mentions
//! (`<@id>`, `<@&id>`, `<#id>`, custom emoji, timestamps) become what Discord shows
//! in their place. The parser is bounded: nesting deeper than [`MAX_DEPTH`] is
//! left as text, and its work is at worst quadratic in a message of at most a few
//! thousand characters.

use isthmus_core::model::{Attachment, Message, MessageRef, ReplyTo};
use isthmus_core::spans::{self, Span, SpanKind};
use twilight_model::channel::Message as DiscordMessage;

/// How deep styles nest before the rest is taken as text.
pub const MAX_DEPTH: usize = 12;

/// The longest quote of a replied-to message carried for text fallbacks.
const QUOTE_CHARS: usize = 120;

/// What mentions name: users, roles and channels by id.
pub trait Names {
    fn user(&self, id: u64) -> Option<String>;
    fn role(&self, id: u64) -> Option<String>;
    fn channel(&self, id: u64) -> Option<String>;
}

/// Names known to nobody (tests; a message whose mentions cannot be resolved).
pub struct NoNames;

impl Names for NoNames {
    fn user(&self, _: u64) -> Option<String> {
        None
    }
    fn role(&self, _: u64) -> Option<String> {
        None
    }
    fn channel(&self, _: u64) -> Option<String> {
        None
    }
}

/// The name to show for a message's author: their server nickname, else their
/// display name, else their username (a webhook's messages: the name it posted under).
pub fn author_name(msg: &DiscordMessage) -> String {
    let name = msg
        .member
        .as_ref()
        .and_then(|m| m.nick.clone())
        .or_else(|| msg.author.global_name.clone())
        .filter(|n| !n.trim().is_empty())
        .unwrap_or_else(|| msg.author.name.clone());
    one_line(&name)
}

/// A nick is one line.
pub fn one_line(name: &str) -> String {
    let n = name.replace(['\n', '\r'], " ");
    let n = n.trim();
    if n.is_empty() { "?".into() } else { n.to_owned() }
}

/// Discord markdown → XEP-0393 styled text.
pub fn to_styling(content: &str, names: &dyn Names) -> String {
    let (text, spans) = parse(content, names);
    spans::spans_to_styling(&text, &spans)
}

/// Discord markdown → plain text and spans over it.
pub fn parse(content: &str, names: &dyn Names) -> (String, Vec<Span>) {
    let mut p = Parser { out: String::with_capacity(content.len()), spans: Vec::new(), names };
    p.blocks(content);
    (p.out, p.spans)
}

struct Parser<'a> {
    out: String,
    spans: Vec<Span>,
    names: &'a dyn Names,
}

/// Where the line starting at `s` ends: the first line break outside a code block.
fn line_end(s: &str) -> usize {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\n' => return i,
            b'`' if s[i..].starts_with("```") => match s[i + 3..].find("```") {
                Some(close) => i += 3 + close + 3,
                None => i += 3,
            },
            b'\\' => i += 2,
            _ => i += 1,
        }
    }
    b.len()
}

impl Parser<'_> {
    fn blocks(&mut self, src: &str) {
        let mut rest = src;
        let mut quote_rest = false;
        loop {
            let mut line = &rest[..line_end(rest).min(rest.len())];
            let after = &rest[line.len()..];
            let start = self.out.len();
            let mut quoted = quote_rest;
            if !quote_rest {
                if let Some(r) = line.strip_prefix(">>> ") {
                    quote_rest = true;
                    quoted = true;
                    line = r;
                } else if let Some(r) = line.strip_prefix("> ") {
                    quoted = true;
                    line = r;
                }
            }
            // Headings are bold; subtext is plain.
            let heading = ["### ", "## ", "# "].iter().find_map(|h| line.strip_prefix(h));
            if let Some(h) = heading {
                let at = self.out.len();
                self.inline(h, 0);
                self.span(at, SpanKind::Bold);
            } else if let Some(sub) = line.strip_prefix("-# ") {
                self.inline(sub, 0);
            } else {
                self.inline(line, 0);
            }
            if quoted {
                self.span(start, SpanKind::Quote);
            }
            match after.strip_prefix('\n') {
                Some(next) => {
                    self.out.push('\n');
                    rest = next;
                }
                None => break,
            }
        }
    }

    fn span(&mut self, start: usize, kind: SpanKind) {
        if start < self.out.len() {
            self.spans.push(Span { range: start..self.out.len(), kind });
        }
    }

    /// Inline markdown of `s` (one line, code blocks aside).
    fn inline(&mut self, s: &str, depth: usize) {
        let b = s.as_bytes();
        let mut i = 0;
        // Where literal text starts (copied when a rule matches or at the end).
        let mut lit = 0;
        while i < b.len() {
            let rest = &s[i..];
            let matched = match b[i] {
                b'\\' => rest.chars().nth(1).filter(char::is_ascii_punctuation).map(|c| {
                    self.out.push_str(&s[lit..i]);
                    self.out.push(c);
                    2
                }),
                b'`' => self.code(s, i, &mut lit),
                b'<' => self.mention(rest).map(|(text, len)| {
                    self.out.push_str(&s[lit..i]);
                    self.out.push_str(&text);
                    len
                }),
                b'[' => self.masked_link(rest, depth, &s[lit..i]),
                _ if depth < MAX_DEPTH => self.styled(s, i, depth, &s[lit..i]),
                _ => None,
            };
            match matched {
                Some(len) => {
                    i += len;
                    lit = i;
                }
                None => i += rest.chars().next().map_or(1, char::len_utf8),
            }
        }
        self.out.push_str(&s[lit..]);
    }

    /// Code blocks and inline code at `i`.
    fn code(&mut self, s: &str, i: usize, lit: &mut usize) -> Option<usize> {
        let rest = &s[i..];
        if let Some(body) = rest.strip_prefix("```") {
            let close = body.find("```")?;
            let mut inner = &body[..close];
            // A language name on the opening line is not part of the code.
            if let Some((first, code)) = inner.split_once('\n')
                && !first.contains(' ')
                && first.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '_' | '#' | '.'))
            {
                inner = code;
            }
            let inner = inner.strip_suffix('\n').unwrap_or(inner);
            if inner.trim().is_empty() {
                return None;
            }
            self.out.push_str(&s[*lit..i]);
            let start = self.out.len();
            self.out.push_str(inner);
            self.span(start, SpanKind::Pre);
            return Some(3 + close + 3);
        }
        let (open, body) = if let Some(b) = rest.strip_prefix("``") { ("``", b) } else { ("`", &rest[1..]) };
        let close = body.find(open)?;
        let mut inner = &body[..close];
        if open == "``" {
            inner = inner.strip_prefix(' ').unwrap_or(inner);
            inner = inner.strip_suffix(' ').unwrap_or(inner);
        }
        if inner.is_empty() || inner.contains('\n') {
            return None;
        }
        self.out.push_str(&s[*lit..i]);
        let start = self.out.len();
        self.out.push_str(inner);
        self.span(start, SpanKind::Code);
        Some(open.len() * 2 + close)
    }

    /// `<@id>`, `<@!id>`, `<@&id>`, `<#id>`, `<:name:id>`, `<a:name:id>`,
    /// `<t:secs[:style]>`, `</command:id>` and `<https://…>`: the text shown, and the length read.
    fn mention(&self, rest: &str) -> Option<(String, usize)> {
        let end = rest.find('>')?;
        let inner = &rest[1..end];
        let len = end + 1;
        let id = |s: &str| s.parse::<u64>().ok().filter(|_| !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()));
        let text = if let Some(r) = inner.strip_prefix("@&") {
            let r = id(r)?;
            format!("@{}", self.names.role(r).unwrap_or_else(|| "deleted-role".into()))
        } else if let Some(u) = inner.strip_prefix("@!").or_else(|| inner.strip_prefix('@')) {
            let u = id(u)?;
            format!("@{}", self.names.user(u).unwrap_or_else(|| "unknown-user".into()))
        } else if let Some(c) = inner.strip_prefix('#') {
            let c = id(c)?;
            format!("#{}", self.names.channel(c).unwrap_or_else(|| "unknown-channel".into()))
        } else if let Some(e) = inner.strip_prefix("a:").or_else(|| inner.strip_prefix(':')) {
            let (name, eid) = e.split_once(':')?;
            id(eid)?;
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '~') {
                return None;
            }
            format!(":{name}:")
        } else if let Some(t) = inner.strip_prefix("t:") {
            let secs = t.split(':').next().and_then(|s| s.parse::<i64>().ok())?;
            utc(secs)?
        } else if let Some(c) = inner.strip_prefix('/') {
            let (name, cid) = c.rsplit_once(':')?;
            id(cid)?;
            format!("/{name}")
        } else if (inner.starts_with("https://") || inner.starts_with("http://"))
            && !inner.contains(char::is_whitespace)
        {
            inner.to_owned()
        } else {
            return None;
        };
        Some((text, len))
    }

    /// `[label](https://…)`: the label with a link span.
    fn masked_link(&mut self, rest: &str, depth: usize, before: &str) -> Option<usize> {
        let mid = rest.find("](")?;
        let label = &rest[1..mid];
        let tail = &rest[mid + 2..];
        let close = tail.find(')')?;
        let url = tail[..close].trim_start_matches('<').trim_end_matches('>');
        if label.is_empty()
            || label.contains(['[', ']', '\n'])
            || !(url.starts_with("https://") || url.starts_with("http://"))
            || url.contains(char::is_whitespace)
        {
            return None;
        }
        self.out.push_str(before);
        let start = self.out.len();
        self.inline(label, depth + 1);
        self.span(start, SpanKind::Link(url.to_owned()));
        Some(mid + 2 + close + 1)
    }

    /// Bold, italics, underline, strike and spoilers at `i`.
    fn styled(&mut self, s: &str, i: usize, depth: usize, before: &str) -> Option<usize> {
        let rest = &s[i..];
        let prev = s[..i].chars().next_back();
        let (open, kind): (&str, Option<SpanKind>) = if rest.starts_with("**") {
            ("**", Some(SpanKind::Bold))
        } else if rest.starts_with("__") {
            ("__", None)
        } else if rest.starts_with("~~") {
            ("~~", Some(SpanKind::Strike))
        } else if rest.starts_with("||") {
            ("||", None)
        } else if rest.starts_with('*') {
            ("*", Some(SpanKind::Italic))
        } else if rest.starts_with('_') && !prev.is_some_and(char::is_alphanumeric) {
            ("_", Some(SpanKind::Italic))
        } else {
            return None;
        };
        let body = &rest[open.len()..];
        if open == "*" && body.starts_with(char::is_whitespace) {
            return None;
        }
        let close = closing(body, open)?;
        let inner = &body[..close];
        if inner.is_empty() {
            return None;
        }
        self.out.push_str(before);
        let start = self.out.len();
        if open == "||" {
            // A spoiler stays marked as one: XEP-0393 has no way to hide text.
            self.out.push_str("||");
            self.inline(inner, depth + 1);
            self.out.push_str("||");
        } else {
            self.inline(inner, depth + 1);
        }
        if let Some(kind) = kind {
            self.span(start, kind);
        }
        Some(open.len() * 2 + close)
    }
}

/// Where `open`'s closing marker is in `body` (Discord's rules: the closing `**`
/// or `*` is not followed by another `*`; `*…*` may hold `**…**`; `_` closes
/// before a non-word character; escapes are skipped).
fn closing(body: &str, open: &str) -> Option<usize> {
    let b = body.as_bytes();
    let mut j = 0;
    while j < b.len() {
        if b[j] == b'\\' {
            j += 2;
            continue;
        }
        if b[j] == b'`' {
            // Code inside a styled span is code: skip it whole.
            if let Some(close) = body[j + 1..].find('`') {
                j += close + 2;
                continue;
            }
        }
        if body[j..].starts_with(open) && j > 0 {
            let after = body[j + open.len()..].chars().next();
            let ok = match open {
                "**" | "*" => after != Some('*'),
                "__" => after != Some('_'),
                "_" => !after.is_some_and(char::is_alphanumeric),
                _ => true,
            };
            let before_ws = body[..j].ends_with(char::is_whitespace);
            if ok && !(open == "*" && before_ws) {
                return Some(j);
            }
        }
        if open == "*" && body[j..].starts_with("**") {
            // A bold span inside italics.
            if let Some(c) = closing(&body[j + 2..], "**") {
                j += 2 + c + 2;
                continue;
            }
        }
        j += body[j..].chars().next().map_or(1, char::len_utf8);
    }
    None
}

/// `secs` since the epoch as `YYYY-MM-DD HH:MM UTC`.
fn utc(secs: i64) -> Option<String> {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    if !(0..=9999).contains(&y) {
        return None;
    }
    Some(format!("{y:04}-{m:02}-{d:02} {:02}:{:02} UTC", rem / 3600, rem % 3600 / 60))
}

/// A Discord message's content in the model (`None`: nothing the bridge carries:
/// a join notice, a pin, an empty message).
pub fn message_of(msg: &DiscordMessage, names: &dyn Names) -> Option<Message> {
    use twilight_model::channel::message::MessageType;
    if !matches!(msg.kind, MessageType::Regular | MessageType::Reply) {
        return None;
    }
    let mut m = Message::text(to_styling(&msg.content, names));
    for a in &msg.attachments {
        m.attachments.push(Attachment {
            url: a.url.clone(),
            name: Some(a.filename.clone()),
            mime: a.content_type.clone(),
            size: Some(a.size),
        });
        if !m.body.is_empty() {
            m.body.push('\n');
        }
        m.body.push_str(&a.url);
    }
    for s in &msg.sticker_items {
        if !m.body.is_empty() {
            m.body.push('\n');
        }
        m.body.push_str(&format!("[sticker: {}]", s.name));
    }
    if m.body.is_empty() {
        return None;
    }
    if let Some(target) = msg.reference.as_ref().and_then(|r| r.message_id) {
        let replied = msg.referenced_message.as_deref();
        m.reply_to = Some(ReplyTo {
            target: MessageRef(target.to_string()),
            author: replied.map(author_name),
            quote: replied.map(|r| {
                let (text, _) = parse(&r.content, names);
                text.chars().take(QUOTE_CHARS).collect()
            }),
        });
    }
    Some(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Some3;
    impl Names for Some3 {
        fn user(&self, id: u64) -> Option<String> {
            (id == 1).then(|| "Tom".into())
        }
        fn role(&self, id: u64) -> Option<String> {
            (id == 2).then(|| "mods".into())
        }
        fn channel(&self, id: u64) -> Option<String> {
            (id == 3).then(|| "general".into())
        }
    }

    fn md(s: &str) -> String {
        to_styling(s, &Some3)
    }

    #[test]
    fn styles_become_xep_0393() {
        assert_eq!(md("**bold** and *it* and _it_ and ~~gone~~"), "*bold* and _it_ and _it_ and ~gone~");
        assert_eq!(md("`code` and ``a ` b``"), "`code` and `a ` b`");
        assert_eq!(md("***both***"), "_*both*_");
        assert_eq!(md("*a **b** c*"), "_a *b* c_");
        assert_eq!(md("__under__ ||secret||"), "under ||secret||");
        assert_eq!(md("## Title\nplain"), "*Title*\nplain");
        assert_eq!(md("-# small"), "small");
    }

    #[test]
    fn quotes_and_code_blocks() {
        assert_eq!(md("> quoted\nnot"), "> quoted\nnot");
        assert_eq!(md(">>> all\nof this"), "> all\n> of this");
        assert_eq!(md("```rust\nlet x = 1;\n```"), "```\nlet x = 1;\n```");
        assert_eq!(md("before\n```\na **not bold**\nb\n```\nafter"), "before\n```\na **not bold**\nb\n```\nafter");
    }

    #[test]
    fn mentions_are_readable() {
        assert_eq!(md("hi <@1> and <@!1>, <@&2> in <#3>"), "hi @Tom and @Tom, @mods in #general");
        assert_eq!(md("<@9> <@&9> <#9>"), "@unknown-user @deleted-role #unknown-channel");
        assert_eq!(md("<:blob:123> <a:dance:45>"), ":blob: :dance:");
        assert_eq!(md("at <t:0:R>"), "at 1970-01-01 00:00 UTC");
        assert_eq!(md("see <https://e.org/a_b>"), "see https://e.org/a_b");
        assert_eq!(md("a < b > c"), "a < b > c");
    }

    #[test]
    fn what_is_not_markdown_stays_text() {
        assert_eq!(md("2 * 3 * 4"), "2 * 3 * 4");
        assert_eq!(md("snake_case_name"), "snake_case_name");
        assert_eq!(md("\\*not\\* \\_it\\_"), "*not* _it_");
        assert_eq!(md("**unclosed"), "**unclosed");
        assert_eq!(md("a `` b"), "a `` b");
        assert_eq!(md("[x](not a url)"), "[x](not a url)");
    }

    #[test]
    fn masked_links_keep_their_url() {
        assert_eq!(md("see [the docs](https://e.org/d)"), "see the docs <https://e.org/d>");
    }

    #[test]
    fn deep_nesting_is_bounded() {
        let deep = "*".repeat(4000) + "x" + &"*".repeat(4000);
        let out = md(&deep);
        assert!(out.contains('x'));
        let wide = "**a ".repeat(1000);
        assert!(md(&wide).contains("a"));
    }
}
