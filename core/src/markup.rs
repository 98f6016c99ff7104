//! Conversions between the markups a message body can carry: HTML (Matrix
//! `org.matrix.custom.html`, Telegram's HTML) and XEP-0393 message styling (the
//! plain body of the model, what XMPP clients render).
//!
//! | XEP-0393 | HTML |
//! |---|---|
//! | `*strong*` | `<strong>` (from `<b>`, `<strong>`, headings) |
//! | `_emphasis_` | `<em>` (from `<i>`, `<em>`) |
//! | `~strike~` | `<del>` (from `<del>`, `<s>`, `<strike>`) |
//! | `` `code` `` | `<code>` |
//! | a ```` ``` ```` block | `<pre><code>` |
//! | `> ` quote lines | `<blockquote>` |
//! | line break | `<br>` |
//! | the link's text and URL (`text <url>`, the URL alone when it is the text) | `<a href>` |
//!
//! HTML is read with `ruma-html` (an html5ever tree, generic HTML: no Matrix
//! knowledge here); text going into HTML is escaped with `html-escape`. Lists
//! become `• item` / `1. item` lines; unknown elements keep their text; `script`,
//! `style` and `head` are dropped. Styling spans follow XEP-0393 §6: an opening
//! directive at the start of a line, after whitespace or after another opening
//! directive, not followed by whitespace; a closing one not preceded by
//! whitespace; no span across lines, none empty, nothing styled inside code.

use ruma_html::{Html, NodeData, NodeRef};

/// The four span directives of XEP-0393 and the HTML element each becomes.
const SPANS: [(char, &str); 4] = [('*', "strong"), ('_', "em"), ('~', "del"), ('`', "code")];

/// A piece of one line of styled text.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Inline {
    Text(String),
    /// A span opened and closed by `directive`, with what it holds (only text for `` ` ``).
    Span(char, Vec<Inline>),
}

/// A block of styled text.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Block {
    /// One line of text (without its line break).
    Line(Vec<Inline>),
    /// A preformatted block: its lines, unstyled.
    Code(Vec<String>),
    /// Lines quoted with `>`: their own blocks.
    Quote(Vec<Block>),
}

/// Parse one line's spans (XEP-0393 §6.2).
fn parse_spans(chars: &[char]) -> Vec<Inline> {
    let mut out = Vec::new();
    let mut text = String::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let can_open = i == 0
            || chars[i - 1].is_whitespace()
            || (SPANS.iter().any(|(d, _)| *d == chars[i - 1]) && chars[i - 1] != c);
        if can_open && SPANS.iter().any(|(d, _)| *d == c) && chars.get(i + 1).is_some_and(|n| !n.is_whitespace()) {
            // the first closing directive not preceded by whitespace, at least one character in
            let close = (i + 2..chars.len()).find(|&j| chars[j] == c && !chars[j - 1].is_whitespace());
            if let Some(j) = close {
                if !text.is_empty() {
                    out.push(Inline::Text(std::mem::take(&mut text)));
                }
                let inner = &chars[i + 1..j];
                let content = if c == '`' { vec![Inline::Text(inner.iter().collect())] } else { parse_spans(inner) };
                out.push(Inline::Span(c, content));
                i = j + 1;
                continue;
            }
        }
        text.push(c);
        i += 1;
    }
    if !text.is_empty() {
        out.push(Inline::Text(text));
    }
    out
}

/// Parse lines into blocks (XEP-0393 §6.1): code blocks, quotes, plain lines.
fn parse_blocks(lines: &[&str]) -> Vec<Block> {
    let mut blocks = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        if line.starts_with("```") {
            // A preformatted block runs to a line that is exactly ``` (or the end of its parent).
            let end = (i + 1..lines.len()).find(|&j| lines[j] == "```");
            let body_end = end.unwrap_or(lines.len());
            blocks.push(Block::Code(lines[i + 1..body_end].iter().map(|l| (*l).to_owned()).collect()));
            i = end.map_or(lines.len(), |e| e + 1);
        } else if line.starts_with('>') {
            let mut quoted = Vec::new();
            while i < lines.len() && lines[i].starts_with('>') {
                let rest = &lines[i][1..];
                quoted.push(rest.strip_prefix(' ').unwrap_or(rest));
                i += 1;
            }
            blocks.push(Block::Quote(parse_blocks(&quoted)));
        } else {
            let chars: Vec<char> = line.chars().collect();
            blocks.push(Block::Line(parse_spans(&chars)));
            i += 1;
        }
    }
    blocks
}

fn is_plain(blocks: &[Block]) -> bool {
    blocks.iter().all(|b| match b {
        Block::Line(inlines) => inlines.iter().all(|i| matches!(i, Inline::Text(_))),
        _ => false,
    })
}

fn escape(text: &str, out: &mut String) {
    html_escape::encode_text_to_string(text, out);
}

fn inlines_to_html(inlines: &[Inline], out: &mut String) {
    for inline in inlines {
        match inline {
            Inline::Text(t) => escape(t, out),
            Inline::Span(d, content) => {
                let tag = SPANS.iter().find(|(s, _)| s == d).map_or("span", |(_, t)| t);
                out.push('<');
                out.push_str(tag);
                out.push('>');
                inlines_to_html(content, out);
                out.push_str("</");
                out.push_str(tag);
                out.push('>');
            }
        }
    }
}

fn blocks_to_html(blocks: &[Block], out: &mut String) {
    for (n, block) in blocks.iter().enumerate() {
        let next_is_line = matches!(blocks.get(n + 1), Some(Block::Line(_)));
        match block {
            Block::Line(inlines) => {
                inlines_to_html(inlines, out);
                if next_is_line {
                    out.push_str("<br>");
                }
            }
            Block::Code(lines) => {
                out.push_str("<pre><code>");
                escape(&lines.join("\n"), out);
                out.push_str("</code></pre>");
            }
            Block::Quote(inner) => {
                out.push_str("<blockquote>");
                blocks_to_html(inner, out);
                out.push_str("</blockquote>");
            }
        }
    }
}

/// XEP-0393 styled text → HTML; `None` when the text carries no styling at all
/// (its plain form says everything).
pub fn styling_to_html(text: &str) -> Option<String> {
    let lines: Vec<&str> = text.split('\n').collect();
    let blocks = parse_blocks(&lines);
    if is_plain(&blocks) {
        return None;
    }
    let mut out = String::with_capacity(text.len() + 32);
    blocks_to_html(&blocks, &mut out);
    Some(out)
}

/// Writes styled text from an HTML tree, keeping track of line starts and quote depth.
struct StylingWriter<'a> {
    /// Whether a link's URL is written after its text.
    show_url: &'a dyn Fn(&str) -> bool,
    out: String,
    /// Whether the last thing written ends a line (or nothing was written yet).
    at_line_start: bool,
    /// How many `<blockquote>` the text is in.
    quote_depth: usize,
    /// Inside `<pre>`: whitespace is kept as it is.
    preformatted: bool,
}

impl StylingWriter<'_> {
    fn push_text(&mut self, text: &str) {
        for c in text.chars() {
            if self.at_line_start && c != '\n' {
                for _ in 0..self.quote_depth {
                    self.out.push_str("> ");
                }
                self.at_line_start = false;
            }
            self.out.push(c);
            if c == '\n' {
                self.at_line_start = true;
            }
        }
    }

    /// Start a new line unless at the start of one already.
    fn break_line(&mut self) {
        if !self.at_line_start {
            self.newline();
        }
    }

    fn newline(&mut self) {
        if self.at_line_start && self.quote_depth > 0 {
            // an empty quoted line keeps its marker
            for _ in 0..self.quote_depth {
                self.out.push('>');
            }
        }
        self.out.push('\n');
        self.at_line_start = true;
    }

    /// HTML text outside `<pre>`: runs of whitespace are one space, none at a line start.
    fn push_flowing(&mut self, text: &str) {
        let mut collapsed = String::with_capacity(text.len());
        let mut space = false;
        for c in text.chars() {
            if c.is_whitespace() {
                space = true;
            } else {
                if space && !(collapsed.is_empty() && (self.at_line_start || self.out.ends_with(' '))) {
                    collapsed.push(' ');
                }
                space = false;
                collapsed.push(c);
            }
        }
        // A trailing space stays; a text that is only space keeps one unless the
        // output already ends a line or a word.
        if space && (!collapsed.is_empty() || (!self.at_line_start && !self.out.ends_with(' '))) {
            collapsed.push(' ');
        }
        self.push_text(&collapsed);
    }

    fn children(&mut self, node: &NodeRef) {
        for child in node.children() {
            self.node(&child);
        }
    }

    /// A span: its directive around its content, when it has any.
    fn span(&mut self, directive: char, node: &NodeRef) {
        let mut inner = StylingWriter {
            show_url: self.show_url,
            out: String::new(),
            at_line_start: false,
            quote_depth: 0,
            preformatted: self.preformatted,
        };
        inner.children(node);
        let content = inner.out;
        // A span lives on one line: its lines are styled one by one.
        let mut first = true;
        for line in content.split('\n') {
            if !first {
                self.newline();
            }
            first = false;
            let trimmed = line.trim();
            if trimmed.is_empty() {
                self.push_text(line);
                continue;
            }
            let lead = &line[..line.len() - line.trim_start().len()];
            let trail = &line[line.trim_end().len()..];
            self.push_text(lead);
            self.push_text(&format!("{directive}{trimmed}{directive}"));
            self.push_text(trail);
        }
    }

    fn node(&mut self, node: &NodeRef) {
        match node.data() {
            NodeData::Text(text) => {
                let text = text.borrow();
                if self.preformatted {
                    self.push_text(&text);
                } else {
                    self.push_flowing(&text);
                }
            }
            NodeData::Element(element) => {
                let name = element.name.local.as_ref().to_ascii_lowercase();
                match name.as_str() {
                    "script" | "style" | "head" | "title" => {}
                    "br" => self.newline(),
                    "b" | "strong" => self.span('*', node),
                    "i" | "em" => self.span('_', node),
                    "s" | "del" | "strike" => self.span('~', node),
                    "code" if !self.preformatted => {
                        let mut text = String::new();
                        collect_text(node, &mut text);
                        let text = text.replace('\n', " ");
                        if !text.trim().is_empty() {
                            self.push_text(&format!("`{}`", text.trim()));
                        }
                    }
                    "pre" => {
                        self.break_line();
                        let mut text = String::new();
                        collect_text(node, &mut text);
                        self.push_text("```\n");
                        self.push_text(text.strip_suffix('\n').unwrap_or(&text));
                        self.break_line();
                        self.push_text("```");
                        self.newline();
                    }
                    "blockquote" => {
                        self.break_line();
                        self.quote_depth += 1;
                        self.children(node);
                        self.break_line();
                        self.quote_depth -= 1;
                    }
                    "h1" | "h2" | "h3" | "h4" | "h5" | "h6" => {
                        self.break_line();
                        self.span('*', node);
                        self.newline();
                    }
                    "p" | "div" | "tr" => {
                        self.break_line();
                        self.children(node);
                        self.break_line();
                    }
                    "ul" | "ol" => {
                        self.break_line();
                        let ordered = name == "ol";
                        let mut number = 0usize;
                        for item in node.children() {
                            let is_item =
                                item.as_element().is_some_and(|e| e.name.local.as_ref().eq_ignore_ascii_case("li"));
                            if !is_item {
                                continue;
                            }
                            number += 1;
                            self.break_line();
                            if ordered {
                                self.push_text(&format!("{number}. "));
                            } else {
                                self.push_text("• ");
                            }
                            self.children(&item);
                        }
                        self.break_line();
                    }
                    "a" => {
                        let href = element
                            .attrs
                            .borrow()
                            .iter()
                            .find(|a| a.name.local.as_ref() == "href")
                            .map(|a| a.value.to_string());
                        let mut text = String::new();
                        collect_text(node, &mut text);
                        match href {
                            Some(href) if !href.is_empty() && text.trim() != href && !text.trim().is_empty() => {
                                self.children(node);
                                if (self.show_url)(&href) {
                                    self.push_text(&format!(" <{href}>"));
                                }
                            }
                            Some(href) if !href.is_empty() && text.trim().is_empty() => self.push_text(&href),
                            _ => self.children(node),
                        }
                    }
                    _ => self.children(node),
                }
            }
            NodeData::Document => self.children(node),
            _ => {}
        }
    }
}

fn collect_text(node: &NodeRef, out: &mut String) {
    for child in node.children() {
        match child.data() {
            NodeData::Text(t) => out.push_str(&t.borrow()),
            NodeData::Element(e) if e.name.local.as_ref().eq_ignore_ascii_case("br") => out.push('\n'),
            NodeData::Element(_) => collect_text(&child, out),
            _ => {}
        }
    }
}

/// HTML → XEP-0393 styled text (what an XMPP client shows for it).
pub fn html_to_styling(html: &str) -> String {
    html_to_styling_with(html, &|_| true)
}

/// [`html_to_styling`], where a link whose text is not its URL shows the URL only when
/// `show_url` says so (a network's mentions are links whose text says it all).
pub fn html_to_styling_with(html: &str, show_url: &dyn Fn(&str) -> bool) -> String {
    let tree = Html::parse(html);
    let mut writer =
        StylingWriter { show_url, out: String::new(), at_line_start: true, quote_depth: 0, preformatted: false };
    for child in tree.children() {
        writer.node(&child);
    }
    let out = writer.out;
    out.trim().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_become_html() {
        assert_eq!(
            styling_to_html("*bold* _it_ `code` ~gone~").as_deref(),
            Some("<strong>bold</strong> <em>it</em> <code>code</code> <del>gone</del>")
        );
        assert_eq!(styling_to_html("*_both_*").as_deref(), Some("<strong><em>both</em></strong>"));
        // nothing is styled inside code
        assert_eq!(styling_to_html("`*x*`").as_deref(), Some("<code>*x*</code>"));
    }

    #[test]
    fn plain_text_has_no_html() {
        for s in ["plain", "2*3*4", "* not bold *", "*open only", "snake_case_name", "**", "a * b", "line\nline"] {
            assert_eq!(styling_to_html(s), None, "{s}");
        }
    }

    #[test]
    fn text_is_escaped() {
        assert_eq!(
            styling_to_html("*<b>&</b>* <script>").as_deref(),
            Some("<strong>&lt;b&gt;&amp;&lt;/b&gt;</strong> &lt;script&gt;")
        );
    }

    #[test]
    fn blocks_become_html() {
        assert_eq!(
            styling_to_html("look:\n```\nlet *x* = <y>;\n```\n> quoted *b*\n>> deeper\nafter").as_deref(),
            Some(
                "look:<pre><code>let *x* = &lt;y&gt;;</code></pre><blockquote>quoted <strong>b</strong>\
                 <blockquote>deeper</blockquote></blockquote>after"
            )
        );
        assert_eq!(styling_to_html("*a*\nb").as_deref(), Some("<strong>a</strong><br>b"));
    }

    #[test]
    fn html_becomes_styling() {
        assert_eq!(
            html_to_styling("<b>bold</b> <i>it</i> <code>x &lt; y</code> <del>old</del> <strong>s</strong> <em>e</em>"),
            "*bold* _it_ `x < y` ~old~ *s* _e_"
        );
        assert_eq!(html_to_styling("a<br>b<br/>\nc"), "a\nb\nc");
        assert_eq!(html_to_styling("<p>one</p><p>two</p>"), "one\ntwo");
        assert_eq!(
            html_to_styling("<pre><code>fn main() {\n    x\n}\n</code></pre>"),
            "```\nfn main() {\n    x\n}\n```"
        );
        assert_eq!(html_to_styling("<blockquote>q <b>b</b></blockquote>answer"), "> q *b*\nanswer");
        assert_eq!(html_to_styling("<blockquote><p>a</p><p>b</p></blockquote>"), "> a\n> b");
        assert_eq!(html_to_styling("<ul><li>one</li><li>two</li></ul>"), "• one\n• two");
        assert_eq!(html_to_styling("<ol><li>one</li><li>two</li></ol>"), "1. one\n2. two");
        assert_eq!(html_to_styling("<h1>Title</h1>text"), "*Title*\ntext");
        assert_eq!(html_to_styling("x<script>alert(1)</script>y"), "xy");
        assert_eq!(html_to_styling("<b> spaced </b>out"), "*spaced* out");
    }

    #[test]
    fn links_keep_text_and_url() {
        assert_eq!(
            html_to_styling(r#"see <a href="https://example.org/x">the page</a>"#),
            "see the page <https://example.org/x>"
        );
        assert_eq!(html_to_styling(r#"<a href="https://example.org">https://example.org</a>"#), "https://example.org");
        assert_eq!(html_to_styling(r#"<a href="https://example.org"></a>"#), "https://example.org");
        assert_eq!(html_to_styling("<a>no href</a>"), "no href");
        let mention = r#"hi <a href="https://chat.example/u/bob">Bob</a>"#;
        assert_eq!(html_to_styling_with(mention, &|href| !href.starts_with("https://chat.example/u/")), "hi Bob");
    }

    #[test]
    fn round_trips() {
        for s in ["*bold* _it_ `code`", "say ~this~ and *_that_*", "```\ncode *x*\n```", "> quoted\nreply"] {
            let html = styling_to_html(s).unwrap_or_else(|| panic!("{s} has styling"));
            assert_eq!(html_to_styling(&html), s, "{s} via {html}");
        }
    }
}
