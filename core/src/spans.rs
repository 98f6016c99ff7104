//! Styled text as plain text plus spans over it (bold from here to there), the
//! form networks such as Telegram carry styling in ("entities", counted in UTF-16
//! code units), and back to the model's XEP-0393 body.
//!
//! [`styling_to_spans`] reads XEP-0393 with the one styling parser in
//! [`crate::markup`] (its HTML is a closed vocabulary this module wrote the other
//! half of) and takes the markers out; [`spans_to_styling`] writes the markers
//! back, line by line, where XEP-0393 lets a span be (not across a line break,
//! not next to whitespace). Both take linear time in their input and bounded stack.

use std::ops::Range;

use crate::markup;

/// What a span says about its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpanKind {
    Bold,
    Italic,
    Strike,
    /// Inline code.
    Code,
    /// A preformatted block.
    Pre,
    /// A quoted block.
    Quote,
    /// The text is a link to the URL.
    Link(String),
}

/// A span over a text, by byte offsets (always on character boundaries).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    pub range: Range<usize>,
    pub kind: SpanKind,
}

/// Text without markers, and the spans that style it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Spanned {
    pub text: String,
    pub spans: Vec<Span>,
}

fn unescape_into(text: &str, out: &mut String) {
    let mut rest = text;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        let (c, len) = if rest.starts_with("&amp;") {
            ('&', 5)
        } else if rest.starts_with("&lt;") {
            ('<', 4)
        } else if rest.starts_with("&gt;") {
            ('>', 4)
        } else if rest.starts_with("&quot;") {
            ('"', 6)
        } else {
            ('&', 1)
        };
        out.push(c);
        rest = &rest[len..];
    }
    out.push_str(rest);
}

/// XEP-0393 styled text → plain text and spans.
pub fn styling_to_spans(styled: &str) -> Spanned {
    let Some(html) = markup::styling_to_html(styled) else {
        return Spanned { text: styled.to_owned(), spans: Vec::new() };
    };
    let mut out = Spanned { text: String::with_capacity(styled.len()), spans: Vec::new() };
    // Open elements: (kind, start); `pre` holds a `code` that is not a span of its own.
    let mut open: Vec<(Option<SpanKind>, usize)> = Vec::new();
    let mut rest = html.as_str();
    while !rest.is_empty() {
        let Some(lt) = rest.find('<') else {
            unescape_into(rest, &mut out.text);
            break;
        };
        unescape_into(&rest[..lt], &mut out.text);
        rest = &rest[lt..];
        let Some(gt) = rest.find('>') else {
            unescape_into(rest, &mut out.text);
            break;
        };
        let tag = &rest[1..gt];
        rest = &rest[gt + 1..];
        if tag == "br" {
            out.text.push('\n');
            continue;
        }
        if let Some(name) = tag.strip_prefix('/') {
            if let Some((kind, start)) = open.pop() {
                if let Some(kind) = kind {
                    out.spans.push(Span { range: start..out.text.len(), kind });
                }
                if name == "blockquote" || name == "pre" {
                    // Blocks end their line.
                    if !rest.is_empty() && !rest.starts_with("<br>") && !out.text.ends_with('\n') {
                        out.text.push('\n');
                    }
                }
            }
            continue;
        }
        if (tag == "blockquote" || tag == "pre") && !out.text.is_empty() && !out.text.ends_with('\n') {
            out.text.push('\n');
        }
        let in_pre = open.last().is_some_and(|(k, _)| *k == Some(SpanKind::Pre));
        let kind = match tag {
            "strong" => Some(SpanKind::Bold),
            "em" => Some(SpanKind::Italic),
            "del" => Some(SpanKind::Strike),
            "code" if in_pre => None,
            "code" => Some(SpanKind::Code),
            "pre" => Some(SpanKind::Pre),
            "blockquote" => Some(SpanKind::Quote),
            _ => None,
        };
        open.push((kind, out.text.len()));
    }
    while let Some((kind, start)) = open.pop() {
        if let Some(kind) = kind {
            out.spans.push(Span { range: start..out.text.len(), kind });
        }
    }
    out.spans.retain(|s| !s.range.is_empty());
    out.spans.sort_by_key(|s| (s.range.start, std::cmp::Reverse(s.range.end)));
    out
}

fn marker(kind: &SpanKind) -> Option<&'static str> {
    match kind {
        SpanKind::Bold => Some("*"),
        SpanKind::Italic => Some("_"),
        SpanKind::Strike => Some("~"),
        SpanKind::Code => Some("`"),
        _ => None,
    }
}

/// Plain text and spans → XEP-0393 styled text. Spans out of bounds or not on
/// character boundaries are ignored; a span that covers several lines is marked
/// on each of them; links are written `text <url>` (the URL alone when it is the text).
pub fn spans_to_styling(text: &str, spans: &[Span]) -> String {
    let valid = |r: &Range<usize>| {
        r.start < r.end && r.end <= text.len() && text.is_char_boundary(r.start) && text.is_char_boundary(r.end)
    };
    // (position, order, what): openers after closers at one position, longer spans open first.
    let mut inserts: Vec<(usize, u8, (usize, usize), String)> = Vec::new();
    let mut quote_lines: Vec<bool> = Vec::new();
    let mut pre: Vec<Range<usize>> = Vec::new();
    let line_starts: Vec<usize> = std::iter::once(0).chain(text.match_indices('\n').map(|(i, _)| i + 1)).collect();
    for (n, s) in spans.iter().enumerate().filter(|(_, s)| valid(&s.range)) {
        match &s.kind {
            SpanKind::Quote => {
                if quote_lines.is_empty() {
                    quote_lines = vec![false; line_starts.len()];
                }
                for (n, &start) in line_starts.iter().enumerate() {
                    let end = line_starts.get(n + 1).map_or(text.len(), |e| e - 1);
                    if start < s.range.end && end >= s.range.start {
                        quote_lines[n] = true;
                    }
                }
            }
            SpanKind::Pre => pre.push(s.range.clone()),
            SpanKind::Link(url) => {
                let label = &text[s.range.clone()];
                if label != url {
                    inserts.push((s.range.end, 0, (0, 0), format!(" <{url}>")));
                }
            }
            kind => {
                let Some(m) = marker(kind) else { continue };
                // Per line, trimmed of whitespace at its ends (markers must touch text).
                let mut from = s.range.start;
                for piece in text[s.range.clone()].split('\n') {
                    let lead = piece.len() - piece.trim_start().len();
                    let core = piece.trim();
                    if !core.is_empty() {
                        let a = from + lead;
                        let b = a + core.len();
                        // Longer spans open first and close last; of equal ones, the
                        // one opened later closes first.
                        inserts.push((a, 2, (usize::MAX - (b - a), n), m.to_owned()));
                        inserts.push((b, 1, (b - a, usize::MAX - n), m.to_owned()));
                    }
                    from += piece.len() + 1;
                }
            }
        }
    }
    for r in &pre {
        let at_line_start = r.start == 0 || text[..r.start].ends_with('\n');
        inserts.push((r.start, 3, (0, 0), if at_line_start { "```\n".into() } else { "\n```\n".into() }));
        let at_line_end = r.end == text.len() || text[r.end..].starts_with('\n');
        inserts.push((r.end, 0, (0, 0), if at_line_end { "\n```".into() } else { "\n```\n".into() }));
    }
    inserts.sort_by(|a, b| (a.0, a.1, a.2).cmp(&(b.0, b.1, b.2)));
    let mut out = String::with_capacity(text.len() + inserts.len() * 2 + 16);
    let mut line = 0;
    let mut at = 0;
    let mut next = inserts.iter().peekable();
    let quote_at = |n: usize| quote_lines.get(n).copied().unwrap_or(false);
    if quote_at(0) {
        out.push_str("> ");
    }
    for (i, c) in text.char_indices() {
        while let Some((pos, _, _, what)) = next.peek() {
            if *pos > i {
                break;
            }
            out.push_str(&text[at..i]);
            at = i;
            out.push_str(what);
            next.next();
        }
        if c == '\n' {
            out.push_str(&text[at..=i]);
            at = i + 1;
            line += 1;
            if quote_at(line) {
                out.push_str("> ");
            }
        }
    }
    out.push_str(&text[at..]);
    for (_, _, _, what) in next {
        out.push_str(what);
    }
    out
}

/// The UTF-16 length of `text` (what Telegram counts entity offsets in).
pub fn utf16_len(text: &str) -> usize {
    text.chars().map(char::len_utf16).sum()
}

/// Byte offsets → UTF-16 offsets for each of `offsets` (sorted or not), in one pass over `text`.
pub fn utf16_offsets(text: &str, offsets: &[usize]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..offsets.len()).collect();
    order.sort_by_key(|&i| offsets[i]);
    let mut out = vec![0; offsets.len()];
    let (mut byte, mut units) = (0usize, 0usize);
    let mut chars = text.chars();
    for i in order {
        while byte < offsets[i] {
            let Some(c) = chars.next() else { break };
            byte += c.len_utf8();
            units += c.len_utf16();
        }
        out[i] = units;
    }
    out
}

/// The byte range of a UTF-16 range of `text`; `None` when it is out of bounds or
/// splits a character.
pub fn byte_range(text: &str, offset: usize, length: usize) -> Option<Range<usize>> {
    let (mut units, mut start) = (0usize, None);
    let end_units = offset.checked_add(length)?;
    for (i, c) in text.char_indices() {
        if units == offset && start.is_none() {
            start = Some(i);
        }
        if units == end_units {
            return Some(start?..i);
        }
        if units > end_units {
            return None;
        }
        units += c.len_utf16();
    }
    if units == offset && start.is_none() {
        start = Some(text.len());
    }
    (units == end_units).then_some(start?..text.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(range: Range<usize>, kind: SpanKind) -> Span {
        Span { range, kind }
    }

    #[test]
    fn styling_becomes_spans_without_markers() {
        let s = styling_to_spans("😀 *bold* and _it_ `c<d>` ~x~");
        assert_eq!(s.text, "😀 bold and it c<d> x");
        let b = s.text.find("bold").expect("b");
        assert_eq!(s.spans[0], span(b..b + 4, SpanKind::Bold));
        let c = s.text.find("c<d>").expect("c");
        assert!(s.spans.contains(&span(c..c + 4, SpanKind::Code)));
        assert_eq!(styling_to_spans("plain & <simple>").text, "plain & <simple>");
        assert!(styling_to_spans("plain").spans.is_empty());
    }

    #[test]
    fn blocks_become_spans() {
        let s = styling_to_spans("> quoted\nafter\n```\nlet x = 1;\n```");
        assert_eq!(s.text, "quoted\nafter\nlet x = 1;");
        assert!(s.spans.contains(&span(0..6, SpanKind::Quote)));
        let p = s.text.find("let").expect("pre");
        assert!(s.spans.contains(&span(p..s.text.len(), SpanKind::Pre)));
    }

    #[test]
    fn spans_become_styling() {
        let text = "😀 bold and it";
        let b = text.find("bold").expect("b");
        let out = spans_to_styling(text, &[span(b..b + 4, SpanKind::Bold), span(b + 9..b + 11, SpanKind::Italic)]);
        assert_eq!(out, "😀 *bold* and _it_");
        // Whitespace at a span's ends stays outside its markers; lines are marked one by one.
        assert_eq!(spans_to_styling("a b c", &[span(1..4, SpanKind::Bold)]), "a *b* c");
        assert_eq!(spans_to_styling("one\ntwo", &[span(0..7, SpanKind::Strike)]), "~one~\n~two~");
        assert_eq!(spans_to_styling("q\nx", &[span(0..1, SpanKind::Quote)]), "> q\nx");
        assert_eq!(
            spans_to_styling("see", &[span(0..3, SpanKind::Link("https://e.org".into()))]),
            "see <https://e.org>"
        );
        assert_eq!(spans_to_styling("ab", &[span(0..9, SpanKind::Bold)]), "ab", "out of bounds is ignored");
        assert_eq!(spans_to_styling("code: x=1", &[span(6..9, SpanKind::Pre)]), "code: \n```\nx=1\n```");
        // Nested spans close inside out.
        assert_eq!(spans_to_styling("ab", &[span(0..2, SpanKind::Bold), span(0..2, SpanKind::Italic)]), "*_ab_*");
    }

    #[test]
    fn round_trip() {
        for t in ["*a* _b_ ~c~ `d`", "😀😀 *x y* z", "> q\n> r\ns", "plain"] {
            let s = styling_to_spans(t);
            assert_eq!(spans_to_styling(&s.text, &s.spans), t, "{t}");
        }
    }

    #[test]
    fn utf16_counts_astral_characters_twice() {
        let t = "😀 a";
        assert_eq!(utf16_len(t), 4);
        assert_eq!(utf16_offsets(t, &[t.len(), 0, 4]), vec![4, 0, 2]);
        assert_eq!(byte_range(t, 3, 1), Some(5..6));
        assert_eq!(byte_range(t, 0, 2), Some(0..4));
        assert_eq!(byte_range(t, 1, 1), None, "splits the emoji");
        assert_eq!(byte_range(t, 3, 9), None);
        assert_eq!(byte_range(t, 4, 0), Some(6..6));
    }
}
