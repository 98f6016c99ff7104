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
//! HTML is read with `html5ever` into a flat tree of this module's own (generic
//! HTML: no Matrix knowledge here); text going into HTML is escaped with
//! `html-escape`. Lists become `• item` / `1. item` lines; unknown elements keep
//! their text; `script`, `style` and `head` are dropped. Styling spans follow
//! XEP-0393 §6: an opening directive at the start of a line, after whitespace or
//! after another opening directive, not followed by whitespace; a closing one not
//! preceded by whitespace; no span across lines, none empty, nothing styled inside
//! code; the first closing directive after an opening one ends its span.
//!
//! # Cost on hostile input
//!
//! Both directions take time linear in the input and stack space independent of it:
//!
//! - styled text is read in one pass per line with a stack of open spans (at most
//!   four deep: a span cannot hold one of its own directive) and written as HTML as
//!   it is read, without a tree: the output is its only allocation but the stack of
//!   open quotes; quotes count at most [`MAX_QUOTE_DEPTH`] levels, deeper `>` are
//!   text of the deepest quote;
//! - the HTML tree is a flat arena (no recursive drop), walked with an explicit
//!   stack; elements deeper than [`MAX_ELEMENT_DEPTH`] contribute their text only,
//!   quotes nest at most [`MAX_HTML_QUOTE_DEPTH`] levels, a span inside a span of the
//!   same directive is not marked again, and the URLs written after links' text
//!   add up to at most the length of the input (the parser clones unclosed links).
//!
//! Output bounds (asserted by the tests and the `markup` fuzz target):
//! `styling_to_html(t).len() <= 25 * t.len()` (the longest expansion is a `>`
//! becoming `<blockquote></blockquote>`) and
//! `html_to_styling(h).len() <= 24 * h.len()` (the longest is a line break inside
//! `<pre>` inside eight quotes and three spans: a quote prefix and span markers per
//! line).

use std::borrow::Cow;
use std::cell::RefCell;
use std::rc::Rc;

use html5ever::tendril::{StrTendril, TendrilSink};
use html5ever::tree_builder::{ElementFlags, NodeOrText, QuirksMode, TreeSink};
use html5ever::{Attribute, LocalName, ParseOpts, QualName, local_name, ns, parse_fragment};

/// The four span directives of XEP-0393 and the HTML element each becomes.
const SPANS: [(char, &str); 4] = [('*', "strong"), ('_', "em"), ('~', "del"), ('`', "code")];

/// How many `>` levels styled text can quote; a deeper `>` is text of the deepest quote.
pub const MAX_QUOTE_DEPTH: usize = 32;

/// How deep in the HTML tree elements keep their meaning; deeper ones contribute their text only.
pub const MAX_ELEMENT_DEPTH: usize = 64;

/// How many `<blockquote>` levels become `> ` prefixes; deeper ones are paragraphs.
pub const MAX_HTML_QUOTE_DEPTH: usize = 8;

/// The most output bytes [`styling_to_html`] writes per input byte.
pub const STYLING_TO_HTML_FACTOR: usize = 25;

/// The most output bytes [`html_to_styling`] writes per input byte.
pub const HTML_TO_STYLING_FACTOR: usize = 24;

/// The index in [`SPANS`] of `` ` ``: a code span, whose content is not styled.
const CODE: usize = 3;

/// The index in [`SPANS`] of the directive `b` (a byte of the text), if it is one.
fn directive_index(b: u8) -> Option<usize> {
    SPANS.iter().position(|(d, _)| *d as u32 == u32::from(b))
}

fn is_directive(c: char) -> bool {
    SPANS.iter().any(|(d, _)| *d == c)
}

fn escape(text: &str, out: &mut String) {
    html_escape::encode_text_to_string(text, out);
}

fn open_tag(k: usize, out: &mut String) {
    out.push('<');
    out.push_str(SPANS[k].1);
    out.push('>');
}

fn close_tag(k: usize, out: &mut String) {
    out.push_str("</");
    out.push_str(SPANS[k].1);
    out.push('>');
}

/// Where the first closing directive `SPANS[k]` of `line` at `from` or later is (one
/// not preceded by whitespace), `line.len()` when there is none.
fn find_closer(line: &str, k: usize, from: usize) -> usize {
    let bytes = line.as_bytes();
    let d = SPANS[k].0 as u8;
    let mut p = from;
    while let Some(offset) = bytes.get(p..).and_then(|rest| rest.iter().position(|&b| b == d)) {
        let j = p + offset;
        if line[..j].chars().next_back().is_some_and(|c| !c.is_whitespace()) {
            return j;
        }
        p = j + 1;
    }
    line.len()
}

/// A span being written: its directive's index, where its content starts and where its closing directive is.
#[derive(Clone, Copy, Default)]
struct OpenSpan {
    k: usize,
    start: usize,
    end: usize,
}

/// Write one line's spans (XEP-0393 §6.2) as HTML in one pass; `true` when it has any.
///
/// An opening directive at `i` starts a span when the first closing directive of
/// its kind at `i + 2` or later (not preceded by whitespace) lies inside the span
/// that holds `i`; the span's content is read the same way, bounded by its closer.
/// Since `i` only grows, the first closer of each directive is found by a search
/// that only moves forward, and a span's tags are written when it opens and at
/// its closer: no tree, and no allocation but the output's.
fn spans_to_html(line: &str, out: &mut String) -> bool {
    let bytes = line.as_bytes();
    let n = bytes.len();
    // Per directive, the first closer at or after the last position asked for.
    let mut closers = [0usize; 4];
    // A span cannot hold one of its own directive: at most four are open.
    let mut stack = [OpenSpan::default(); 4];
    let mut depth = 0;
    let mut styled = false;
    // line[text..i] is text not written yet
    let mut text = 0;
    let mut i = 0;
    loop {
        // Close the spans whose closing directive is here (an inner one can end just before its parent's).
        while depth > 0 && stack[depth - 1].end == i {
            escape(&line[text..i], out);
            depth -= 1;
            close_tag(stack[depth].k, out);
            i += 1;
            text = i;
        }
        if i >= n {
            break;
        }
        let (start, end) = if depth == 0 { (0, n) } else { (stack[depth - 1].start, stack[depth - 1].end) };
        if let Some(k) = directive_index(bytes[i]) {
            let can_open = i == start
                || line[..i]
                    .chars()
                    .next_back()
                    .is_some_and(|p| p.is_whitespace() || (is_directive(p) && u32::from(p) != u32::from(bytes[i])));
            if can_open && i + 1 < end && line[i + 1..].chars().next().is_some_and(|c| !c.is_whitespace()) {
                // the first closing directive at least one character in
                if closers[k] < i + 2 {
                    closers[k] = find_closer(line, k, i + 2);
                }
                let j = closers[k];
                if j < end && (k == CODE || depth < stack.len()) {
                    escape(&line[text..i], out);
                    styled = true;
                    open_tag(k, out);
                    if k == CODE {
                        // nothing is styled inside code
                        escape(&line[i + 1..j], out);
                        close_tag(k, out);
                        i = j + 1;
                    } else {
                        stack[depth] = OpenSpan { k, start: i + 1, end: j };
                        depth += 1;
                        i += 1;
                    }
                    text = i;
                    continue;
                }
            }
        }
        i += 1;
    }
    escape(&line[text..], out);
    // Every span ends before the line does.
    while depth > 0 {
        depth -= 1;
        close_tag(stack[depth].k, out);
    }
    styled
}

/// One quote level being written: whether its last block is a line (the next line
/// then starts with a line break), and whether it has a preformatted block open
/// (and with a line already).
#[derive(Default)]
struct QuoteLevel {
    after_line: bool,
    code: Option<bool>,
}

/// Writes the HTML of styled text block by block, as its lines are read.
struct HtmlWriter {
    out: String,
    /// The open quotes, the text itself first.
    levels: Vec<QuoteLevel>,
    /// Whether anything was styled: a span, a quote or a preformatted block.
    styled: bool,
}

impl HtmlWriter {
    fn close_code(&mut self, depth: usize) {
        if self.levels[depth].code.take().is_some() {
            self.out.push_str("</code></pre>");
        }
    }

    fn open_quote(&mut self) {
        if let Some(parent) = self.levels.last_mut() {
            parent.after_line = false;
        }
        self.levels.push(QuoteLevel::default());
        self.out.push_str("<blockquote>");
        self.styled = true;
    }

    /// End the innermost open quote.
    fn close_quote(&mut self) {
        if self.levels.len() > 1 {
            self.close_code(self.levels.len() - 1);
            self.levels.pop();
            self.out.push_str("</blockquote>");
        }
    }

    fn open_code(&mut self, depth: usize) {
        self.levels[depth] = QuoteLevel { after_line: false, code: Some(false) };
        self.out.push_str("<pre><code>");
        self.styled = true;
    }

    fn code_line(&mut self, depth: usize, line: &str) {
        if self.levels[depth].code.replace(true) == Some(true) {
            self.out.push('\n');
        }
        escape(line, &mut self.out);
    }

    fn line(&mut self, depth: usize, line: &str) {
        if std::mem::replace(&mut self.levels[depth].after_line, true) {
            self.out.push_str("<br>");
        }
        self.styled |= spans_to_html(line, &mut self.out);
    }
}

/// XEP-0393 styled text → HTML; `None` when the text carries no styling at all
/// (its plain form says everything).
///
/// Blocks (XEP-0393 §6.1) are read in one pass over the lines with a stack of
/// open quotes, and written as they are read: a line goes down one level per
/// leading `>` (and the space after it) while the level it reaches has no
/// preformatted block open; a preformatted block runs to a line that is exactly
/// ```` ``` ```` or to the end of its quote.
pub fn styling_to_html(text: &str) -> Option<String> {
    let mut w =
        HtmlWriter { out: String::with_capacity(text.len() + 32), levels: vec![QuoteLevel::default()], styled: false };
    for line in text.split('\n') {
        let mut rest = line;
        let mut depth = 0;
        loop {
            if w.levels[depth].code.is_some() {
                if rest == "```" {
                    w.close_code(depth);
                } else {
                    w.code_line(depth, rest);
                }
                break;
            }
            if depth < MAX_QUOTE_DEPTH
                && let Some(quoted) = rest.strip_prefix('>')
            {
                rest = quoted.strip_prefix(' ').unwrap_or(quoted);
                depth += 1;
                if w.levels.len() <= depth {
                    w.open_quote();
                }
                continue;
            }
            while w.levels.len() > depth + 1 {
                w.close_quote();
            }
            if rest.starts_with("```") {
                w.open_code(depth);
            } else {
                w.line(depth, rest);
            }
            break;
        }
    }
    while w.levels.len() > 1 {
        w.close_quote();
    }
    w.close_code(0);
    w.styled.then_some(w.out)
}

/// No node.
const NIL: usize = usize::MAX;

enum NodeKind {
    Document,
    Text(StrTendril),
    /// An element: its local name, and its `href` when it has one.
    Element(LocalName, Option<StrTendril>),
    /// A comment, a processing instruction.
    Other,
}

/// A node of [`Tree`], linked to its parent, children and siblings by index.
struct Node {
    kind: NodeKind,
    parent: usize,
    first_child: usize,
    last_child: usize,
    prev: usize,
    next: usize,
}

/// An HTML tree as html5ever builds it, in one vector: every operation the parser
/// asks for takes constant time (but moving a node's children), and dropping it
/// does not recurse.
struct Tree {
    nodes: RefCell<Vec<Node>>,
    /// The name handles of nodes that are not elements carry (never asked for).
    no_name: Rc<QualName>,
}

/// A node of [`Tree`] as the parser holds it: its index and, for an element, its name.
#[derive(Clone)]
struct Handle {
    id: usize,
    name: Rc<QualName>,
}

impl Tree {
    fn new() -> Self {
        let document =
            Node { kind: NodeKind::Document, parent: NIL, first_child: NIL, last_child: NIL, prev: NIL, next: NIL };
        Tree { nodes: RefCell::new(vec![document]), no_name: Rc::new(QualName::new(None, ns!(), local_name!(""))) }
    }

    fn add(&self, kind: NodeKind) -> usize {
        let mut nodes = self.nodes.borrow_mut();
        nodes.push(Node { kind, parent: NIL, first_child: NIL, last_child: NIL, prev: NIL, next: NIL });
        nodes.len() - 1
    }

    fn other(&self, kind: NodeKind) -> Handle {
        Handle { id: self.add(kind), name: self.no_name.clone() }
    }

    fn detach(nodes: &mut [Node], id: usize) {
        let Node { parent, prev, next, .. } = nodes[id];
        if parent == NIL {
            return;
        }
        if prev == NIL {
            nodes[parent].first_child = next;
        } else {
            nodes[prev].next = next;
        }
        if next == NIL {
            nodes[parent].last_child = prev;
        } else {
            nodes[next].prev = prev;
        }
        let node = &mut nodes[id];
        node.parent = NIL;
        node.prev = NIL;
        node.next = NIL;
    }

    fn append_node(nodes: &mut [Node], parent: usize, id: usize) {
        Self::detach(nodes, id);
        let last = nodes[parent].last_child;
        nodes[id].parent = parent;
        nodes[id].prev = last;
        if last == NIL {
            nodes[parent].first_child = id;
        } else {
            nodes[last].next = id;
        }
        nodes[parent].last_child = id;
    }

    fn insert_before(nodes: &mut [Node], sibling: usize, id: usize) {
        Self::detach(nodes, id);
        let Node { parent, prev, .. } = nodes[sibling];
        if parent == NIL {
            return;
        }
        nodes[id].parent = parent;
        nodes[id].prev = prev;
        nodes[id].next = sibling;
        nodes[sibling].prev = id;
        if prev == NIL {
            nodes[parent].first_child = id;
        } else {
            nodes[prev].next = id;
        }
    }

    /// Add `text` to the text node `id` when it is one.
    fn extend_text(nodes: &mut [Node], id: usize, text: &StrTendril) -> bool {
        if id != NIL
            && let NodeKind::Text(existing) = &mut nodes[id].kind
        {
            existing.push_tendril(text);
            return true;
        }
        false
    }

    /// The children of `id`, last first (the order a stack pops them in is then theirs).
    fn children_reversed(&self, id: usize) -> impl Iterator<Item = usize> + '_ {
        let nodes = self.nodes.borrow();
        let mut child = nodes[id].last_child;
        std::iter::from_fn(move || {
            if child == NIL {
                return None;
            }
            let this = child;
            child = nodes[this].prev;
            Some(this)
        })
    }
}

impl TreeSink for Tree {
    type Handle = Handle;
    type Output = Self;
    type ElemName<'a> = &'a QualName;

    fn finish(self) -> Self {
        self
    }

    fn parse_error(&self, _msg: Cow<'static, str>) {}

    fn get_document(&self) -> Handle {
        Handle { id: 0, name: self.no_name.clone() }
    }

    fn elem_name<'a>(&'a self, target: &'a Handle) -> &'a QualName {
        &target.name
    }

    fn create_element(&self, name: QualName, attrs: Vec<Attribute>, _flags: ElementFlags) -> Handle {
        let href = attrs.into_iter().find(|a| a.name.local.as_ref() == "href").map(|a| a.value);
        let id = self.add(NodeKind::Element(name.local.clone(), href));
        Handle { id, name: Rc::new(name) }
    }

    fn create_comment(&self, _text: StrTendril) -> Handle {
        self.other(NodeKind::Other)
    }

    fn create_pi(&self, _target: StrTendril, _data: StrTendril) -> Handle {
        self.other(NodeKind::Other)
    }

    fn append(&self, parent: &Handle, child: NodeOrText<Handle>) {
        match child {
            NodeOrText::AppendNode(node) => Self::append_node(&mut self.nodes.borrow_mut(), parent.id, node.id),
            NodeOrText::AppendText(text) => {
                let last = self.nodes.borrow()[parent.id].last_child;
                if !Self::extend_text(&mut self.nodes.borrow_mut(), last, &text) {
                    let id = self.add(NodeKind::Text(text));
                    Self::append_node(&mut self.nodes.borrow_mut(), parent.id, id);
                }
            }
        }
    }

    fn append_based_on_parent_node(&self, element: &Handle, prev_element: &Handle, child: NodeOrText<Handle>) {
        if self.nodes.borrow()[element.id].parent != NIL {
            self.append_before_sibling(element, child);
        } else {
            self.append(prev_element, child);
        }
    }

    fn append_doctype_to_document(&self, _name: StrTendril, _public_id: StrTendril, _system_id: StrTendril) {}

    fn get_template_contents(&self, target: &Handle) -> Handle {
        target.clone()
    }

    fn same_node(&self, x: &Handle, y: &Handle) -> bool {
        x.id == y.id
    }

    fn set_quirks_mode(&self, _mode: QuirksMode) {}

    fn append_before_sibling(&self, sibling: &Handle, new_node: NodeOrText<Handle>) {
        match new_node {
            NodeOrText::AppendNode(node) => Self::insert_before(&mut self.nodes.borrow_mut(), sibling.id, node.id),
            NodeOrText::AppendText(text) => {
                let prev = self.nodes.borrow()[sibling.id].prev;
                if !Self::extend_text(&mut self.nodes.borrow_mut(), prev, &text) {
                    let id = self.add(NodeKind::Text(text));
                    Self::insert_before(&mut self.nodes.borrow_mut(), sibling.id, id);
                }
            }
        }
    }

    fn add_attrs_if_missing(&self, target: &Handle, attrs: Vec<Attribute>) {
        if let NodeKind::Element(_, href @ None) = &mut self.nodes.borrow_mut()[target.id].kind {
            *href = attrs.into_iter().find(|a| a.name.local.as_ref() == "href").map(|a| a.value);
        }
    }

    fn remove_from_parent(&self, target: &Handle) {
        Self::detach(&mut self.nodes.borrow_mut(), target.id);
    }

    fn reparent_children(&self, node: &Handle, new_parent: &Handle) {
        let mut nodes = self.nodes.borrow_mut();
        let mut child = nodes[node.id].first_child;
        while child != NIL {
            let next = nodes[child].next;
            Self::append_node(&mut nodes, new_parent.id, child);
            child = next;
        }
    }
}

/// Text being written: the message, or a span's content before it is marked line by line.
struct Output {
    out: String,
    /// Whether the last thing written ends a line (or nothing was written yet).
    at_line_start: bool,
    /// How many `<blockquote>` the text is in, counted from this output's start.
    quote_depth: usize,
    /// The directive of the span this is the content of.
    directive: Option<char>,
}

/// What is left to do for an element once its children are written.
enum Step {
    /// Write a node (its depth in the tree with it).
    Node(usize, usize),
    /// An `<li>` of a list, with its number (`None` in `<ul>`).
    Item(usize, usize, Option<usize>),
    /// Mark the lines of the innermost span with its directive.
    EndSpan,
    /// End a heading: its span when it has one, then a line break.
    EndHeading(bool),
    EndQuote,
    /// End a block element (or a list): start a new line.
    EndBlock,
    /// End a link: write its URL when there is one to show.
    EndLink(Option<String>),
}

/// Writes styled text from an HTML tree, keeping track of line starts and quote depth.
struct StylingWriter<'a> {
    /// Whether a link's URL is written after its text.
    show_url: &'a dyn Fn(&str) -> bool,
    /// The message, then the content of each span being written, innermost last.
    outputs: Vec<Output>,
    /// How many links the node being written is in (one inside another is only its text).
    links: usize,
    /// How many bytes of URLs may still be written after links' text.
    url_budget: usize,
}

impl StylingWriter<'_> {
    fn current(&mut self) -> &mut Output {
        let last = self.outputs.len() - 1;
        &mut self.outputs[last]
    }

    fn quote_depth(&self) -> usize {
        self.outputs.iter().map(|o| o.quote_depth).sum()
    }

    fn push_text(&mut self, text: &str) {
        let o = self.current();
        for c in text.chars() {
            if o.at_line_start && c != '\n' {
                for _ in 0..o.quote_depth {
                    o.out.push_str("> ");
                }
                o.at_line_start = false;
            }
            o.out.push(c);
            if c == '\n' {
                o.at_line_start = true;
            }
        }
    }

    /// Start a new line unless at the start of one already.
    fn break_line(&mut self) {
        if !self.current().at_line_start {
            self.newline();
        }
    }

    fn newline(&mut self) {
        let o = self.current();
        if o.at_line_start && o.quote_depth > 0 {
            // an empty quoted line keeps its marker
            for _ in 0..o.quote_depth {
                o.out.push('>');
            }
        }
        o.out.push('\n');
        o.at_line_start = true;
    }

    /// HTML text outside `<pre>`: runs of whitespace are one space, none at a line start.
    fn push_flowing(&mut self, text: &str) {
        let o = self.current();
        let (at_line_start, after_space) = (o.at_line_start, o.out.ends_with(' '));
        let mut collapsed = String::with_capacity(text.len());
        let mut space = false;
        for c in text.chars() {
            if c.is_whitespace() {
                space = true;
            } else {
                if space && !(collapsed.is_empty() && (at_line_start || after_space)) {
                    collapsed.push(' ');
                }
                space = false;
                collapsed.push(c);
            }
        }
        // A trailing space stays; a text that is only space keeps one unless the
        // output already ends a line or a word.
        if space && (!collapsed.is_empty() || (!at_line_start && !after_space)) {
            collapsed.push(' ');
        }
        self.push_text(&collapsed);
    }

    /// Start a span: its content is written apart, then marked line by line.
    /// `false` when the text is already in a span of this directive (it is not marked again).
    fn begin_span(&mut self, directive: char) -> bool {
        if self.outputs.iter().any(|o| o.directive == Some(directive)) {
            return false;
        }
        self.outputs.push(Output {
            out: String::new(),
            at_line_start: false,
            quote_depth: 0,
            directive: Some(directive),
        });
        true
    }

    /// End the innermost span: its directive around each of its lines that has any content.
    fn end_span(&mut self) {
        if self.outputs.len() < 2 {
            return;
        }
        let Some(Output { out: content, directive: Some(directive), .. }) = self.outputs.pop() else { return };
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

    fn push_children(tree: &Tree, node: usize, depth: usize, steps: &mut Vec<Step>) {
        steps.extend(tree.children_reversed(node).map(|child| Step::Node(child, depth + 1)));
    }

    /// Write the tree under `root`, one step at a time.
    fn write(&mut self, tree: &Tree, root: usize) {
        let mut steps = Vec::new();
        Self::push_children(tree, root, 0, &mut steps);
        while let Some(step) = steps.pop() {
            match step {
                Step::Node(node, depth) => self.node(tree, node, depth, &mut steps),
                Step::Item(item, depth, number) => {
                    self.break_line();
                    match number {
                        Some(number) => self.push_text(&format!("{number}. ")),
                        None => self.push_text("• "),
                    }
                    Self::push_children(tree, item, depth, &mut steps);
                }
                Step::EndSpan => self.end_span(),
                Step::EndHeading(spanned) => {
                    if spanned {
                        self.end_span();
                    }
                    self.newline();
                }
                Step::EndQuote => {
                    self.break_line();
                    let o = self.current();
                    o.quote_depth = o.quote_depth.saturating_sub(1);
                }
                Step::EndBlock => self.break_line(),
                Step::EndLink(url) => {
                    self.links -= 1;
                    if let Some(url) = url {
                        self.push_text(&format!(" <{url}>"));
                    }
                }
            }
        }
        while self.outputs.len() > 1 {
            self.end_span();
        }
    }

    /// Take up to `len` bytes of the URL budget; `false` when it does not have them.
    fn spend_url(&mut self, len: usize) -> bool {
        if len > self.url_budget {
            return false;
        }
        self.url_budget -= len;
        true
    }

    fn node(&mut self, tree: &Tree, node: usize, depth: usize, steps: &mut Vec<Step>) {
        let nodes = tree.nodes.borrow();
        let (name, href) = match &nodes[node].kind {
            NodeKind::Text(text) => {
                self.push_flowing(text);
                return;
            }
            NodeKind::Element(name, href) => (name.as_ref().to_ascii_lowercase(), href.as_ref().map(|h| h.to_string())),
            NodeKind::Document => {
                drop(nodes);
                Self::push_children(tree, node, depth, steps);
                return;
            }
            NodeKind::Other => return,
        };
        drop(nodes);
        if depth > MAX_ELEMENT_DEPTH {
            // Too deep to mean anything: its text only.
            match name.as_str() {
                "script" | "style" | "head" | "title" => {}
                "br" => self.newline(),
                _ => Self::push_children(tree, node, depth, steps),
            }
            return;
        }
        match name.as_str() {
            "script" | "style" | "head" | "title" => {}
            "br" => self.newline(),
            "b" | "strong" | "i" | "em" | "s" | "del" | "strike" => {
                let directive = match name.as_str() {
                    "b" | "strong" => '*',
                    "i" | "em" => '_',
                    _ => '~',
                };
                if self.begin_span(directive) {
                    steps.push(Step::EndSpan);
                }
                Self::push_children(tree, node, depth, steps);
            }
            "code" => {
                let text = collect_text(tree, node).replace('\n', " ");
                if !text.trim().is_empty() {
                    self.push_text(&format!("`{}`", text.trim()));
                }
            }
            "pre" => {
                self.break_line();
                let text = collect_text(tree, node);
                self.push_text("```\n");
                self.push_text(text.strip_suffix('\n').unwrap_or(&text));
                self.break_line();
                self.push_text("```");
                self.newline();
            }
            "blockquote" if self.quote_depth() < MAX_HTML_QUOTE_DEPTH => {
                self.break_line();
                self.current().quote_depth += 1;
                steps.push(Step::EndQuote);
                Self::push_children(tree, node, depth, steps);
            }
            "h1" | "h2" | "h3" | "h4" | "h5" | "h6" => {
                self.break_line();
                let spanned = self.begin_span('*');
                steps.push(Step::EndHeading(spanned));
                Self::push_children(tree, node, depth, steps);
            }
            "p" | "div" | "tr" | "blockquote" => {
                self.break_line();
                steps.push(Step::EndBlock);
                Self::push_children(tree, node, depth, steps);
            }
            "ul" | "ol" => {
                self.break_line();
                steps.push(Step::EndBlock);
                let ordered = name == "ol";
                let nodes = tree.nodes.borrow();
                let mut items = Vec::new();
                let mut child = nodes[node].first_child;
                while child != NIL {
                    if let NodeKind::Element(item, _) = &nodes[child].kind
                        && item.as_ref().eq_ignore_ascii_case("li")
                    {
                        items.push(child);
                    }
                    child = nodes[child].next;
                }
                steps.extend(
                    items
                        .into_iter()
                        .enumerate()
                        .rev()
                        .map(|(n, item)| Step::Item(item, depth + 1, ordered.then_some(n + 1))),
                );
            }
            "a" if self.links == 0 => {
                let text = collect_text(tree, node);
                match href {
                    Some(href) if !href.is_empty() && text.trim() != href && !text.trim().is_empty() => {
                        let url = ((self.show_url)(&href) && self.spend_url(href.len())).then_some(href);
                        self.links += 1;
                        steps.push(Step::EndLink(url));
                        Self::push_children(tree, node, depth, steps);
                    }
                    Some(href) if !href.is_empty() && text.trim().is_empty() => {
                        if self.spend_url(href.len()) {
                            self.push_text(&href);
                        }
                    }
                    _ => {
                        self.links += 1;
                        steps.push(Step::EndLink(None));
                        Self::push_children(tree, node, depth, steps);
                    }
                }
            }
            _ => Self::push_children(tree, node, depth, steps),
        }
    }
}

/// The text under `node`, `<br>` as a line break, without walking the stack down.
fn collect_text(tree: &Tree, node: usize) -> String {
    let mut out = String::new();
    let mut pending: Vec<usize> = tree.children_reversed(node).collect();
    let nodes = tree.nodes.borrow();
    while let Some(id) = pending.pop() {
        match &nodes[id].kind {
            NodeKind::Text(t) => out.push_str(t),
            NodeKind::Element(name, _) if name.as_ref().eq_ignore_ascii_case("br") => out.push('\n'),
            NodeKind::Element(..) => {
                let mut child = nodes[id].last_child;
                while child != NIL {
                    pending.push(child);
                    child = nodes[child].prev;
                }
            }
            _ => {}
        }
    }
    out
}

/// Elements that never hold anything (or that the parser ignores inside a fragment).
const VOID: &[&str] = &[
    "area", "base", "basefont", "bgsound", "br", "col", "embed", "frame", "hr", "image", "img", "input", "keygen",
    "link", "meta", "param", "source", "track", "wbr", "html", "head", "body", "frameset",
];

/// The formatting elements the parser reopens when something else closes them.
const FORMATTING: &[&str] =
    &["a", "b", "big", "code", "em", "font", "i", "nobr", "s", "small", "strike", "strong", "tt", "u"];

/// Elements an end tag does not close through (scope boundaries, and `select`).
const BOUNDARIES: &[&str] = &[
    "applet",
    "caption",
    "html",
    "table",
    "td",
    "th",
    "marquee",
    "object",
    "template",
    "select",
    "button",
    "ul",
    "ol",
    "foreignobject",
    "desc",
    "title",
    "mi",
    "mo",
    "mn",
    "ms",
    "mtext",
    "annotation-xml",
];

/// Elements whose content is text up to their end tag (`plaintext`: to the end).
const RAW_TEXT: &[&str] =
    &["script", "style", "xmp", "iframe", "noembed", "noframes", "noscript", "textarea", "title", "plaintext"];

/// Where the tag starting at `start` (just after `<` and its name) ends, after its `>`;
/// `None` when the input ends inside it (the parser then drops it).
fn tag_end(bytes: &[u8], start: usize) -> Option<usize> {
    let mut i = start;
    loop {
        while i < bytes.len() && (bytes[i].is_ascii_whitespace() || bytes[i] == b'/') {
            i += 1;
        }
        match bytes.get(i)? {
            b'>' => return Some(i + 1),
            _ => {
                // an attribute name (its first character may be anything but those ending it)
                i += 1;
                while i < bytes.len()
                    && !matches!(bytes[i], b'\t' | b'\n' | b'\x0c' | b'\r' | b' ' | b'/' | b'>' | b'=')
                {
                    i += 1;
                }
                while i < bytes.len() && bytes[i].is_ascii_whitespace() {
                    i += 1;
                }
                if bytes.get(i) == Some(&b'=') {
                    i += 1;
                    while i < bytes.len() && bytes[i].is_ascii_whitespace() {
                        i += 1;
                    }
                    match bytes.get(i) {
                        Some(&quote @ (b'"' | b'\'')) => {
                            i += 1 + bytes[i + 1..].iter().position(|&b| b == quote)? + 1;
                        }
                        _ => {
                            while i < bytes.len() && !bytes[i].is_ascii_whitespace() && bytes[i] != b'>' {
                                i += 1;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Where the text of a raw-text element ends: at its end tag (or the end of the input).
fn raw_text_end(bytes: &[u8], from: usize, name: &str) -> usize {
    let mut i = from;
    while let Some(offset) = bytes[i..].windows(2).position(|w| w == b"</") {
        let at = i + offset;
        let after = at + 2 + name.len();
        if bytes.len() >= after
            && bytes[at + 2..after].eq_ignore_ascii_case(name.as_bytes())
            && bytes.get(after).is_none_or(|b| b.is_ascii_whitespace() || *b == b'/' || *b == b'>')
        {
            return at;
        }
        i = at + 2;
    }
    bytes.len()
}

/// Remove the start tags (and their end tags) that would open elements more than
/// [`MAX_ELEMENT_DEPTH`] deep, in one pass, before the parser sees them: the
/// parser's own checks walk its stack of open elements, which would take time
/// quadratic in the depth. The depth is counted as the parser would build it or
/// more (formatting elements stay counted until their own end tag, since the
/// parser reopens them), so what is kept nests no deeper than about twice the
/// limit (with the table elements the parser adds); deeper elements lose only
/// their tags, never their text.
fn cap_depth(html: &str) -> Cow<'_, str> {
    let bytes = html.as_bytes();
    let mut open: Vec<String> = Vec::new();
    let mut dropped: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    // the input as kept so far is html[..copied] minus the removed tags, in `out`
    let mut out = String::new();
    let mut copied = 0;
    let mut i = 0;
    let name_at = |from: usize| -> (String, usize) {
        let mut end = from;
        while end < bytes.len() && !matches!(bytes[end], b'\t' | b'\n' | b'\x0c' | b'\r' | b' ' | b'/' | b'>') {
            end += 1;
        }
        (String::from_utf8_lossy(&bytes[from..end]).to_ascii_lowercase(), end)
    };
    while let Some(offset) = bytes[i..].iter().position(|&b| b == b'<') {
        let lt = i + offset;
        let next = bytes.get(lt + 1).copied();
        if bytes[lt..].starts_with(b"<!--") {
            i = if bytes[lt + 4..].starts_with(b">") || bytes[lt + 4..].starts_with(b"->") {
                lt + 4
            } else {
                let ends = [&b"-->"[..], &b"--!>"[..]];
                ends.iter()
                    .filter_map(|end| {
                        bytes[lt + 4..].windows(end.len()).position(|w| w == *end).map(|p| lt + 4 + p + end.len())
                    })
                    .min()
                    .unwrap_or(bytes.len())
            };
            continue;
        }
        if matches!(next, Some(b'!' | b'?')) {
            i = bytes[lt..].iter().position(|&b| b == b'>').map_or(bytes.len(), |p| lt + p + 1);
            continue;
        }
        let (end_tag, name_start) = match next {
            Some(b'/') if bytes.get(lt + 2).is_some_and(u8::is_ascii_alphabetic) => (true, lt + 2),
            Some(b) if b.is_ascii_alphabetic() => (false, lt + 1),
            _ => {
                i = lt + 1;
                continue;
            }
        };
        let (name, after_name) = name_at(name_start);
        let Some(end) = tag_end(bytes, after_name) else { break };
        let mut remove = false;
        if end_tag {
            if let Some(count) = dropped.get_mut(&name)
                && *count > 0
            {
                *count -= 1;
                remove = true;
            } else if let Some(at) = open.iter().rposition(|o| *o == name || BOUNDARIES.contains(&o.as_str()))
                && open[at] == name
            {
                let formatting = |o: &String| FORMATTING.contains(&o.as_str());
                if name == "form" {
                    open.remove(at);
                } else if FORMATTING.contains(&name.as_str()) {
                    // the parser leaves open the blocks inside a formatting element its end tag closes
                    if open[at + 1..].iter().all(formatting) {
                        open.remove(at);
                    }
                } else {
                    // what this closes goes, but the formatting elements it closes are reopened
                    let reopened: Vec<String> = open.drain(at..).skip(1).filter(formatting).collect();
                    open.extend(reopened);
                }
            }
        } else if !VOID.contains(&name.as_str()) {
            if open.len() >= MAX_ELEMENT_DEPTH {
                *dropped.entry(name.clone()).or_insert(0) += 1;
                remove = true;
            } else {
                open.push(name.clone());
            }
        }
        if remove {
            out.push_str(&html[copied..lt]);
            copied = end;
        }
        i = end;
        if !end_tag && !remove && RAW_TEXT.contains(&name.as_str()) {
            i = if name == "plaintext" { bytes.len() } else { raw_text_end(bytes, i, &name) };
            // its end tag is read as any other, and closes it
        }
    }
    if copied == 0 {
        return Cow::Borrowed(html);
    }
    out.push_str(&html[copied..]);
    Cow::Owned(out)
}

/// HTML → XEP-0393 styled text (what an XMPP client shows for it).
pub fn html_to_styling(html: &str) -> String {
    html_to_styling_with(html, &|_| true)
}

/// [`html_to_styling`], where a link whose text is not its URL shows the URL only when
/// `show_url` says so (a network's mentions are links whose text says it all).
pub fn html_to_styling_with(html: &str, show_url: &dyn Fn(&str) -> bool) -> String {
    let parser = parse_fragment(
        Tree::new(),
        ParseOpts::default(),
        QualName::new(None, ns!(html), local_name!("div")),
        Vec::new(),
        true,
    );
    let tree = parser.one(&*cap_depth(html));
    // The fragment's content is under the `html` element the parser puts in the document.
    let root = tree.nodes.borrow()[0].first_child;
    if root == NIL {
        return String::new();
    }
    let mut writer = StylingWriter {
        show_url,
        outputs: vec![Output { out: String::new(), at_line_start: true, quote_depth: 0, directive: None }],
        links: 0,
        url_budget: html.len(),
    };
    writer.write(&tree, root);
    let out = writer.outputs.swap_remove(0).out;
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
    fn spans_around_text_beyond_ascii() {
        assert_eq!(styling_to_html("*é* `ü`").as_deref(), Some("<strong>é</strong> <code>ü</code>"));
        // a no-break space is whitespace: a span opens after it, none closes after it
        assert_eq!(styling_to_html("a\u{a0}*b*").as_deref(), Some("a\u{a0}<strong>b</strong>"));
        assert_eq!(styling_to_html("*b\u{a0}*"), None);
        assert_eq!(styling_to_html("é*b*"), None);
        assert_eq!(styling_to_html("*日本_語_*").as_deref(), Some("<strong>日本_語_</strong>"));
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

    /// Run `f` on a thread with a small stack, as a converter of remote text must be able to.
    fn small_stack<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let thread = std::thread::Builder::new().stack_size(256 * 1024).spawn(f).expect("thread");
        thread.join().expect("converter panicked or overflowed its stack")
    }

    fn to_html_bounded(text: String) -> Option<String> {
        let len = text.len();
        let html = small_stack(move || styling_to_html(&text));
        if let Some(html) = &html {
            assert!(html.len() <= STYLING_TO_HTML_FACTOR * len, "{} bytes of HTML from {len}", html.len());
        }
        html
    }

    fn to_styling_bounded(html: String, show_url: fn(&str) -> bool) -> String {
        let len = html.len();
        let out = small_stack(move || html_to_styling_with(&html, &show_url));
        assert!(out.len() <= HTML_TO_STYLING_FACTOR * len, "{} bytes of styling from {len}", out.len());
        out
    }

    #[test]
    fn unclosed_openers_stay_text() {
        // 240 kB of openers none of which closes (each one scanned to the end of the line before).
        let text = "*word ".repeat(40_000);
        assert_eq!(to_html_bounded(text.clone()), None);
        assert_eq!(to_styling_bounded(text.clone(), |_| true), text.trim());
        // the same with one closer at the very end: only the last opener reaches it
        let closed = format!("{text}*end*");
        let html = to_html_bounded(closed).expect("styled");
        // the first opener takes it: the rest is its content
        assert_eq!(html, format!("<strong>word {}*end</strong>", &text[6..]));
    }

    #[test]
    fn deep_quotes_are_capped() {
        let text = format!("{} x", ">".repeat(20_000));
        let expected = format!(
            "{}{} x{}",
            "<blockquote>".repeat(MAX_QUOTE_DEPTH),
            "&gt;".repeat(20_000 - MAX_QUOTE_DEPTH),
            "</blockquote>".repeat(MAX_QUOTE_DEPTH)
        );
        assert_eq!(to_html_bounded(text).as_deref(), Some(expected.as_str()));
        // many lines, each deeper than the cap, then one back at the top
        let lines = format!("{}out", format!("{}a\n", "> ".repeat(40)).repeat(2_000));
        let html = to_html_bounded(lines).expect("styled");
        let line = format!("{}a", "&gt; ".repeat(40 - MAX_QUOTE_DEPTH));
        let quoted = [line.as_str(); 2_000].join("<br>");
        let quotes = ("<blockquote>".repeat(MAX_QUOTE_DEPTH), "</blockquote>".repeat(MAX_QUOTE_DEPTH));
        assert_eq!(html, format!("{}{quoted}{}out", quotes.0, quotes.1));
        // and a preformatted block inside a deep quote keeps its lines
        assert_eq!(
            to_html_bounded("> > ```\n> > *x*\n> > ```\n> after".into()).as_deref(),
            Some("<blockquote><blockquote><pre><code>*x*</code></pre></blockquote>after</blockquote>")
        );
    }

    #[test]
    fn long_runs_of_one_directive() {
        for d in ['*', '_', '~', '`'] {
            let tag = SPANS.iter().find(|(s, _)| *s == d).map(|(_, t)| *t).unwrap_or("span");
            let text: String = std::iter::repeat_n(d, 200_000).collect();
            // the first two close a span around the second; no other can open after a `d`
            // (three backticks start a preformatted block)
            let expected = if d == '`' {
                "<pre><code></code></pre>".to_owned()
            } else {
                format!("<{tag}>{d}</{tag}>{}", &text[3..])
            };
            assert_eq!(to_html_bounded(text.clone()).as_deref(), Some(expected.as_str()), "{d}");
            assert_eq!(to_styling_bounded(text.clone(), |_| true), text, "{d}");
        }
    }

    #[test]
    fn alternating_directives() {
        let text = "*_~`".repeat(50_000);
        let html = to_html_bounded(text.clone()).expect("styled");
        // each span holds the three directives after its opener, then the next one opens
        assert!(html.starts_with("<strong>_~`</strong><em>~`*</em><del>`*_</del><code>*_~</code><strong>_~`</strong>"));
        assert_eq!(to_styling_bounded(text.clone(), |_| true), text);
        // spans nest at most four deep, whatever the input
        let nested = "*_~`x`~_* ".repeat(20_000);
        let html = to_html_bounded(nested).expect("styled");
        assert!(html.starts_with("<strong><em><del><code>x</code></del></em></strong> <strong>"));
    }

    #[test]
    fn thousands_of_unclosed_tags() {
        for tag in ["b", "i", "s", "div", "span", "p", "blockquote", "ul", "li", "a", "code", "table", "h1"] {
            let html = format!("{}x", format!("<{tag}>").repeat(20_000));
            let out = to_styling_bounded(html, |_| true);
            let expected = match tag {
                "b" | "h1" => "*x*".to_owned(),
                "i" => "_x_".to_owned(),
                "s" => "~x~".to_owned(),
                "code" => "`x`".to_owned(),
                "blockquote" => format!("{}x", "> ".repeat(MAX_HTML_QUOTE_DEPTH)),
                // what is in a list but in none of its items is not shown
                "ul" => String::new(),
                _ => "x".to_owned(),
            };
            assert_eq!(out, expected, "<{tag}> × 20000");
        }
    }

    #[test]
    fn deeply_nested_closed_tags() {
        for (open, close, expected) in [
            ("<b><i>", "</i></b>", "*_x_*"),
            ("<div>", "</div>", "x"),
            ("<span>", "</span>", "x"),
            // an item in an item starts a line; past the depth limit lists are only text
            ("<ul><li>", "</li></ul>", &format!("{}• x", "• \n".repeat(MAX_ELEMENT_DEPTH / 2 - 1))),
        ] {
            let html = format!("{}x{}", open.repeat(20_000), close.repeat(20_000));
            assert_eq!(to_styling_bounded(html, |_| true), expected, "{open}");
        }
        // a line break deep inside spans and quotes costs a bounded prefix per line
        let html = format!("{}<b><i><s><pre>{}</pre>", "<blockquote>".repeat(20), "x\n".repeat(20_000));
        let out = to_styling_bounded(html, |_| true);
        let prefix = "> ".repeat(MAX_HTML_QUOTE_DEPTH);
        // (the span starts on the line before the block's: an empty quoted line)
        let empty = ">".repeat(MAX_HTML_QUOTE_DEPTH);
        assert!(out.starts_with(&format!("{empty}\n{prefix}*_~```~_*\n{prefix}*_~x~_*\n")), "{}", &out[..200]);
        assert_eq!(out.lines().count(), 20_003);
    }

    #[test]
    fn many_links() {
        let html = r#"<a href="https://x/u/1">n</a> "#.repeat(20_000);
        let mentions = to_styling_bounded(html.clone(), |href| !href.starts_with("https://x/u/"));
        assert_eq!(mentions, ["n"; 20_000].join(" "));
        let links = to_styling_bounded(html, |_| true);
        assert_eq!(links, ["n <https://x/u/1>"; 20_000].join(" "));
        // the parser clones an unclosed link into every block after it: its URL is not repeated past the input's length
        let url = "u".repeat(1000);
        let html = format!(r#"<div><a href="{url}"></div>{}"#, "<div>x</div>".repeat(2_000));
        let out = to_styling_bounded(html.clone(), |_| true);
        assert!(
            out.starts_with(&format!("{url}\nx <{url}>\nx <{url}>\n")),
            "{}",
            &out.replace(url.as_str(), "URL")[..200]
        );
        assert!(out.matches(url.as_str()).count() <= html.len() / url.len());
    }
}
