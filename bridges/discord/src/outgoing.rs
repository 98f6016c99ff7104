//! The model → Discord: what a webhook posts for someone from another network.
//!
//! The body's XEP-0393 styling becomes Discord markdown (`*b*` → `**b**`, `_i_`
//! → `*i*`, `~s~` → `~~s~~`, code, code blocks, quotes, links as masked links),
//! and everything else is escaped, so text that only looks like markdown or a
//! mention (`<@123>`, `[x](y)`, `# `) shows as it was written; URLs are left
//! whole. The webhook's username is the sender's nick, made acceptable to
//! Discord. A reply is a short quote with a jump link above the text; texts longer
//! than Discord takes are cut with a mark saying so.

use isthmus_core::model::Message;
use isthmus_core::spans::{self, Span, SpanKind};

/// The most characters one Discord message holds.
pub const MAX_CONTENT_CHARS: usize = 2000;
/// The longest webhook username.
pub const MAX_USERNAME_CHARS: usize = 80;
/// How much of a replied-to message is quoted.
const REPLY_QUOTE_CHARS: usize = 100;

/// `nick` as a webhook username Discord accepts: one line of 1 to 80 characters,
/// without "discord" or "clyde" in any case (a letter of those is swapped for a
/// look-alike digit), never "everyone" or "here".
pub fn username(nick: &str) -> String {
    let mut chars: Vec<char> = crate::incoming::one_line(nick).chars().take(MAX_USERNAME_CHARS).collect();
    for (word, swap, to) in [("discord", 4, '0'), ("clyde", 4, '3')] {
        let w: Vec<char> = word.chars().collect();
        for i in 0..chars.len().saturating_sub(w.len() - 1) {
            if chars[i..i + w.len()].iter().zip(&w).all(|(c, w)| c.to_lowercase().eq(std::iter::once(*w))) {
                chars[i + swap] = to;
            }
        }
    }
    let mut name: String = chars.into_iter().collect();
    if matches!(name.to_lowercase().as_str(), "everyone" | "here") {
        name.push_str(" (xmpp)");
    }
    name
}

/// Whether `c` is read as markdown by Discord anywhere in a line.
fn special(c: char) -> bool {
    matches!(c, '\\' | '*' | '_' | '~' | '`' | '|' | '<' | '[' | ']')
}

/// Byte ranges of bare URLs in `text`.
fn urls(text: &str) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(found) = ["https://", "http://"].iter().filter_map(|p| text[from..].find(p)).min() {
        let start = from + found;
        let end = text[start..]
            .find(|c: char| c.is_whitespace() || matches!(c, '<' | '>' | '"'))
            .map_or(text.len(), |e| start + e);
        out.push(start..end);
        from = end;
    }
    out
}

/// Escape plain `text` for Discord, bare URLs aside. `line_start`: the text starts a line.
fn escape_into(out: &mut String, text: &str, mut line_start: bool) {
    let links = urls(text);
    let mut link = links.iter().peekable();
    let mut skip_to = 0;
    for (i, c) in text.char_indices() {
        if i < skip_to {
            continue;
        }
        if let Some(r) = link.peek()
            && r.start == i
        {
            out.push_str(&text[r.start..r.end]);
            skip_to = r.end;
            link.next();
            line_start = false;
            continue;
        }
        let block = line_start && matches!(c, '-' | '+' | '=') && text[i + 1..].starts_with(['#', ' ']);
        let after = &text[i + c.len_utf8()..];
        let needs = match c {
            // Headings and quotes only at the start of a line.
            '>' | '#' => line_start,
            // `@everyone` and `@here` never ping (allowed mentions), but would show as mentions.
            '@' => after.starts_with("everyone") || after.starts_with("here"),
            _ => special(c),
        };
        if needs || block {
            out.push('\\');
        }
        out.push(c);
        line_start = c == '\n';
    }
}

/// The markers Discord writes a span with.
fn markers(kind: &SpanKind, content: &str) -> Option<(String, String)> {
    Some(match kind {
        SpanKind::Bold => ("**".into(), "**".into()),
        SpanKind::Italic => ("*".into(), "*".into()),
        SpanKind::Strike => ("~~".into(), "~~".into()),
        SpanKind::Code if content.contains('`') => ("`` ".into(), " ``".into()),
        SpanKind::Code => ("`".into(), "`".into()),
        _ => return None,
    })
}

/// Plain text and spans → Discord markdown.
pub fn render(text: &str, spans: &[Span]) -> String {
    let valid = |s: &Span| {
        s.range.start < s.range.end
            && s.range.end <= text.len()
            && text.is_char_boundary(s.range.start)
            && text.is_char_boundary(s.range.end)
    };
    // (position, order, tie, what): closers before openers at one position; outer spans
    // open first and close last.
    let mut inserts: Vec<(usize, u8, usize, String)> = Vec::new();
    // Ranges whose text is written as it is (code).
    let mut verbatim: Vec<std::ops::Range<usize>> = Vec::new();
    let mut quoted = vec![false; text.matches('\n').count() + 1];
    let line_of = |pos: usize| text[..pos].matches('\n').count();
    for s in spans.iter().filter(|s| valid(s)) {
        let r = s.range.clone();
        let len = r.end - r.start;
        match &s.kind {
            SpanKind::Quote => {
                let last = line_of(r.end.saturating_sub(1).max(r.start));
                for q in quoted.iter_mut().take(last + 1).skip(line_of(r.start)) {
                    *q = true;
                }
            }
            SpanKind::Pre => {
                let at_start = r.start == 0 || text[..r.start].ends_with('\n');
                let at_end = r.end == text.len() || text[r.end..].starts_with('\n');
                inserts.push((r.start, 3, usize::MAX - len, if at_start { "```\n" } else { "\n```\n" }.into()));
                inserts.push((r.end, 0, len, if at_end { "\n```" } else { "\n```\n" }.into()));
                verbatim.push(r);
            }
            SpanKind::Link(url) => {
                if &text[r.clone()] == url {
                    continue;
                }
                let url = url.replace(' ', "%20").replace(')', "%29");
                inserts.push((r.start, 2, usize::MAX - len, "[".into()));
                inserts.push((r.end, 1, len, format!("](<{url}>)")));
            }
            kind => {
                let Some((open, close)) = markers(kind, &text[r.clone()]) else { continue };
                // Markers must touch text: one pair per line, whitespace outside.
                let mut from = r.start;
                for piece in text[r.clone()].split('\n') {
                    let lead = piece.len() - piece.trim_start().len();
                    let core = piece.trim();
                    if !core.is_empty() {
                        let a = from + lead;
                        let b = a + core.len();
                        inserts.push((a, 2, usize::MAX - (b - a), open.clone()));
                        inserts.push((b, 1, b - a, close.clone()));
                        if matches!(kind, SpanKind::Code) {
                            verbatim.push(a..b);
                        }
                    }
                    from += piece.len() + 1;
                }
            }
        }
    }
    inserts.sort_by_key(|a| (a.0, a.1, a.2));
    let mut out = String::with_capacity(text.len() + text.len() / 8 + 16);
    let mut cuts: Vec<usize> = inserts.iter().map(|i| i.0).collect();
    cuts.extend(verbatim.iter().flat_map(|r| [r.start, r.end]));
    cuts.extend(text.match_indices('\n').flat_map(|(i, _)| [i, i + 1]));
    cuts.push(text.len());
    cuts.sort_unstable();
    cuts.dedup();
    let mut next = inserts.iter().peekable();
    let mut at = 0;
    let mut line = 0;
    if quoted.first() == Some(&true) {
        out.push_str("> ");
    }
    for cut in cuts {
        if cut > at {
            let piece = &text[at..cut];
            if piece == "\n" {
                out.push('\n');
                line += 1;
                if quoted.get(line) == Some(&true) {
                    out.push_str("> ");
                }
            } else if verbatim.iter().any(|r| r.start <= at && cut <= r.end) {
                out.push_str(piece);
            } else {
                let line_start = at == 0 || text[..at].ends_with('\n');
                escape_into(&mut out, piece, line_start);
            }
            at = cut;
        }
        while let Some((pos, _, _, what)) = next.peek() {
            if *pos > cut {
                break;
            }
            out.push_str(what);
            next.next();
        }
    }
    out
}

/// XEP-0393 styled text → Discord markdown.
pub fn to_markdown(body: &str) -> String {
    let s = spans::styling_to_spans(body);
    render(&s.text, &s.spans)
}

/// What a replied-to message was, for the quote above a reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replied {
    pub author: Option<String>,
    pub text: Option<String>,
    /// Its jump link.
    pub link: String,
}

/// The content a webhook posts for the message `m`.
pub fn content(m: &Message, replied: Option<&Replied>) -> String {
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
    let mut spans = styled.spans;
    if m.action && !styled.text.is_empty() {
        spans.push(Span { range: 0..styled.text.len(), kind: SpanKind::Italic });
    }
    let text = render(&styled.text, &spans);
    let mut out = String::new();
    if let Some(r) = replied {
        out.push_str("> ");
        if let Some(a) = &r.author {
            out.push_str("**");
            escape_into(&mut out, &crate::incoming::one_line(a), false);
            out.push_str("** ");
        }
        if let Some(t) = &r.text {
            let one: String = t.split_whitespace().collect::<Vec<_>>().join(" ");
            let short: String = one.chars().take(REPLY_QUOTE_CHARS).collect();
            escape_into(&mut out, &short, false);
            if one.chars().count() > REPLY_QUOTE_CHARS {
                out.push('…');
            }
            out.push(' ');
        }
        out.push_str(&format!("[↪]({})\n", r.link));
    }
    out.push_str(&text);
    cut(out)
}

/// `text` within Discord's limit, on a character boundary, marked when cut.
pub fn cut(mut text: String) -> String {
    if text.chars().count() <= MAX_CONTENT_CHARS {
        return text;
    }
    const MARK: &str = " […]";
    let keep = MAX_CONTENT_CHARS - MARK.chars().count();
    let at = text.char_indices().nth(keep).map_or(text.len(), |(i, _)| i);
    text.truncate(at);
    text.push_str(MARK);
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn styling_becomes_markdown() {
        assert_eq!(to_markdown("*bold* _it_ ~gone~ `x_y`"), "**bold** *it* ~~gone~~ `x_y`");
        assert_eq!(to_markdown("> quoted\nafter"), "> quoted\nafter");
        assert_eq!(to_markdown("```\nlet *x* = 1;\n```"), "```\nlet *x* = 1;\n```");
        assert_eq!(to_markdown("`a`b`"), "`a`b\\`");
    }

    #[test]
    fn look_alikes_are_escaped_and_urls_kept() {
        assert_eq!(to_markdown("2*3 <@123> [x](y) a|b"), "2\\*3 \\<@123> \\[x\\](y) a\\|b");
        assert_eq!(to_markdown("# not a title"), "\\# not a title");
        assert_eq!(to_markdown("-# not small"), "\\-# not small");
        assert_eq!(to_markdown("see https://e.org/a_b*c ok"), "see https://e.org/a_b*c ok");
        assert_eq!(to_markdown("@everyone @Ann :smile: a > b #1"), "\\@everyone @Ann :smile: a > b #1");
    }

    #[test]
    fn usernames_discord_accepts() {
        assert_eq!(username("alice"), "alice");
        assert_eq!(username("DiscordFan"), "Disc0rdFan");
        assert_eq!(username("clyde"), "clyd3");
        assert_eq!(username("here"), "here (xmpp)");
        assert_eq!(username("a\nb"), "a b");
        assert_eq!(username(""), "?");
        assert_eq!(username(&"x".repeat(100)).chars().count(), 80);
        for n in ["DISCORD", "my discord", "Clyde!"] {
            let u = username(n).to_lowercase();
            assert!(!u.contains("discord") && !u.contains("clyde"), "{n} → {u}");
        }
    }

    #[test]
    fn replies_quote_and_link() {
        let r = Replied {
            author: Some("Tom".into()),
            text: Some("what about *this*".into()),
            link: "https://discord.com/channels/1/2/3".into(),
        };
        assert_eq!(
            content(&Message::text("agreed"), Some(&r)),
            "> **Tom** what about \\*this\\* [↪](https://discord.com/channels/1/2/3)\nagreed"
        );
    }

    #[test]
    fn actions_files_and_long_texts() {
        let m = Message { action: true, ..Message::text("waves") };
        assert_eq!(content(&m, None), "*waves*");
        let mut m = Message::text("");
        m.attachments.push(isthmus_core::model::Attachment {
            url: "https://e.org/f_1.png".into(),
            name: None,
            mime: None,
            size: None,
        });
        assert_eq!(content(&m, None), "https://e.org/f_1.png");
        let long = content(&Message::text("é".repeat(5000)), None);
        assert_eq!(long.chars().count(), MAX_CONTENT_CHARS);
        assert!(long.ends_with("[…]"));
    }
}
