//! The component link's guards on the shape of incoming XML
//! (`component/src/nesting.rs`), fed in arbitrary splits across reads.
//!
//! Input with an even first byte is raw bytes, after a count of split offsets
//! and the offsets: the shaper gives the same output however the input is
//! split, keeps UTF-8 valid, leaves small input alone, and its output never
//! nests deeper than `MAX_DEPTH` (checked where the depth counter and the
//! shaper read tags alike: no quotes, no declarations). The depth counter gives
//! the same verdict however its input is split.
//!
//! With an odd first byte the rest describes a well-formed document, deep and
//! with long names and values: shaped, it must still parse, and be the original
//! with the subtrees past `MAX_DEPTH` left out and names and values cut.

#![no_main]

use isthmus_component::nesting::{MAX_DEPTH, MAX_NAME, MAX_VALUE, NestingCounter, XmlShaper};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use tokio_xmpp::minidom::{Element, Node};

fuzz_target!(|data: &[u8]| {
    let Some((mode, rest)) = data.split_first() else { return };
    if mode % 2 == 0 {
        let (input, splits) = raw_input(rest);
        check_raw(input, &splits);
    } else if let Ok((tree, doc, splits)) = document(&mut Unstructured::new(rest)) {
        check_document(&tree, &doc, &splits);
    }
});

/// Shape `input` cut after each of the offsets in `splits` (taken modulo its length).
fn shape_split(input: &[u8], splits: &[usize]) -> Vec<u8> {
    let mut cuts: Vec<usize> = splits.iter().map(|s| s % (input.len() + 1)).collect();
    cuts.sort_unstable();
    let mut shaper = XmlShaper::default();
    let mut out = Vec::new();
    let mut from = 0;
    for cut in cuts.into_iter().chain([input.len()]) {
        shaper.shape(&input[from..cut], &mut out);
        from = cut;
    }
    out
}

/// One byte `n`, `n` split offsets of two bytes each, then the input.
fn raw_input(data: &[u8]) -> (&[u8], Vec<usize>) {
    let Some((n, rest)) = data.split_first() else { return (data, Vec::new()) };
    let offsets = rest.len().min(2 * usize::from(*n));
    let (offsets, input) = rest.split_at(offsets);
    (input, offsets.chunks(2).map(|c| c.iter().fold(0, |acc, b| acc * 256 + usize::from(*b))).collect())
}

fn check_raw(input: &[u8], splits: &[usize]) {
    let whole = shape_split(input, &[]);
    assert_eq!(shape_split(input, splits), whole, "output depends on how the input was split");
    let bytewise: Vec<usize> = (1..input.len()).collect();
    assert_eq!(shape_split(input, &bytewise), whole, "output differs when read byte by byte");

    if std::str::from_utf8(input).is_ok() {
        assert!(std::str::from_utf8(&whole).is_ok(), "valid UTF-8 in, invalid out");
    }

    // Too short for a name or value over its cap, too few tags to nest too deep: untouched
    // (but a final `<` that opens a tag waits for the byte that says what kind of tag).
    // Comments, instructions and declarations (`<!`, `<?`) are left out, so only input without them.
    let tags = input.iter().filter(|b| **b == b'<').count();
    let markup = input.iter().any(|b| matches!(b, b'!' | b'?'));
    if input.len() <= MAX_NAME && tags <= MAX_DEPTH as usize && !markup {
        let held = input.strip_suffix(b"<").is_some_and(|rest| whole == rest);
        assert!(whole == input || held, "small input changed:\n{input:?}\n{whole:?}");
    }

    if !input.iter().any(|b| matches!(b, b'\'' | b'"' | b'?' | b'!')) {
        assert!(NestingCounter::default().feed(&whole).is_ok(), "shaped output nests deeper than {MAX_DEPTH}");
    }

    let at_once = NestingCounter::default().feed(input);
    let mut counter = NestingCounter::default();
    let mut cuts: Vec<usize> = splits.iter().map(|s| s % (input.len() + 1)).collect();
    cuts.sort_unstable();
    let mut from = 0;
    let mut split_verdict = Ok(());
    for cut in cuts.into_iter().chain([input.len()]) {
        split_verdict = counter.feed(&input[from..cut]);
        if split_verdict.is_err() {
            break;
        }
        from = cut;
    }
    assert_eq!(split_verdict, at_once, "depth verdict depends on how the input was split");
}

/// A generated element: its name, attributes (raw, escaped as written) and content.
#[derive(Debug, Clone, PartialEq)]
struct Tree {
    name: String,
    attrs: Vec<(String, String)>,
    children: Vec<Content>,
}

#[derive(Debug, Clone, PartialEq)]
enum Content {
    Element(Tree),
    Text(String),
}

/// Pieces names are made of: characters of 1 to 4 bytes, all valid in XML names.
const NAME_PIECES: [&str; 4] = ["a", "é", "€", "😀"];
/// Pieces values and text are made of, already escaped.
const VALUE_PIECES: [&str; 10] = ["v", " ", "é", "€", "😀", "&amp;", "&lt;", "&gt;", "&quot;", "&#233;"];

fn name(u: &mut Unstructured) -> Result<String> {
    let piece = NAME_PIECES[u.choose_index(NAME_PIECES.len())?];
    let long = u.ratio(1, 4)?;
    let count = if long { u.int_in_range(MAX_NAME / 4 - 4..=MAX_NAME + 8)? } else { u.int_in_range(0..=3)? };
    Ok(format!("e{}", piece.repeat(count)))
}

fn escaped(u: &mut Unstructured, long: bool) -> Result<String> {
    let count = if long { u.int_in_range(MAX_VALUE / 6..=MAX_VALUE + 16)? } else { u.int_in_range(0..=8)? };
    let mut s = String::new();
    for _ in 0..count {
        s.push_str(VALUE_PIECES[u.choose_index(VALUE_PIECES.len())?]);
    }
    Ok(s)
}

/// Elements are opened, filled and closed by a stream of small choices, so the
/// depth can reach well past the limit.
fn document(u: &mut Unstructured) -> Result<(Tree, String, Vec<usize>)> {
    let mut stack = vec![Tree { name: "root".into(), attrs: vec![], children: vec![] }];
    while !u.is_empty() && stack.len() < 4 * MAX_DEPTH as usize {
        match u.int_in_range(0..=7u8)? {
            0..=3 => {
                let mut attrs = Vec::new();
                for i in 0..u.int_in_range(0..=2)? {
                    let long = u.ratio(1, 3)?;
                    attrs.push((format!("a{i}"), escaped(u, long)?));
                }
                stack.push(Tree { name: name(u)?, attrs, children: vec![] });
            }
            4 | 5 => {
                let text = escaped(u, false)?;
                stack.last_mut().expect("the root stays").children.push(Content::Text(text));
            }
            _ => close(&mut stack),
        }
    }
    while stack.len() > 1 {
        close(&mut stack);
    }
    let root = stack.pop().expect("the root stays");
    let splits: Vec<u16> = u.arbitrary().unwrap_or_default();
    let mut doc = String::new();
    write(&root, &mut doc, true);
    Ok((root, doc, splits.into_iter().map(usize::from).collect()))
}

fn close(stack: &mut Vec<Tree>) {
    if stack.len() > 1 {
        let done = stack.pop().expect("more than the root");
        stack.last_mut().expect("the root stays").children.push(Content::Element(done));
    }
}

fn write(tree: &Tree, out: &mut String, root: bool) {
    out.push('<');
    out.push_str(&tree.name);
    if root {
        out.push_str(" xmlns='urn:example:fuzz'");
    }
    for (k, v) in &tree.attrs {
        out.push_str(&format!(" {k}='{v}'"));
    }
    if tree.children.is_empty() {
        out.push_str("/>");
        return;
    }
    out.push('>');
    for child in &tree.children {
        match child {
            Content::Element(e) => write(e, out, false),
            Content::Text(t) => out.push_str(t),
        }
    }
    out.push_str(&format!("</{}>", tree.name));
}

/// The longest prefix of `s` whose characters all start before byte `limit`.
fn cut_name(s: &str) -> String {
    s.char_indices().take_while(|(i, _)| *i < MAX_NAME).map(|(_, c)| c).collect()
}

/// A value as written, cut where the shaper cuts it: at the first character
/// starting past `MAX_VALUE` bytes that is not inside a reference.
fn cut_value(s: &str) -> &str {
    let mut in_ref = false;
    for (i, c) in s.char_indices() {
        if i >= MAX_VALUE && !in_ref {
            return &s[..i];
        }
        match c {
            '&' => in_ref = true,
            ';' => in_ref = false,
            _ => {}
        }
    }
    s
}

fn unescape(s: &str) -> String {
    s.replace("&amp;", "\u{0}")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#233;", "é")
        .replace('\u{0}', "&")
}

/// What the parser must give for `tree` at `depth` after shaping, in the form
/// [`canonical`] gives: names and decoded values cut, too-deep subtrees gone,
/// adjacent texts merged.
fn expected(tree: &Tree, depth: u32) -> (String, Vec<(String, String)>, Vec<Canon>) {
    let attrs = tree.attrs.iter().map(|(k, v)| (k.clone(), unescape(cut_value(v)))).collect();
    let mut children = Vec::new();
    for child in &tree.children {
        match child {
            Content::Element(e) if depth < MAX_DEPTH => children.push(Canon::Element(expected(e, depth + 1))),
            Content::Element(_) => {}
            Content::Text(t) => push_text(&mut children, &unescape(t)),
        }
    }
    (cut_name(&tree.name), sorted(attrs), children)
}

#[derive(Debug, PartialEq)]
enum Canon {
    Element((String, Vec<(String, String)>, Vec<Canon>)),
    Text(String),
}

fn push_text(children: &mut Vec<Canon>, text: &str) {
    if text.is_empty() {
        return;
    }
    if let Some(Canon::Text(t)) = children.last_mut() {
        t.push_str(text);
    } else {
        children.push(Canon::Text(text.to_owned()));
    }
}

fn sorted(mut attrs: Vec<(String, String)>) -> Vec<(String, String)> {
    attrs.sort();
    attrs
}

fn canonical(el: &Element) -> (String, Vec<(String, String)>, Vec<Canon>) {
    let attrs = el.attrs().iter().map(|((_, k), v)| (k.to_string(), v.to_string())).collect();
    let mut children = Vec::new();
    for node in el.nodes() {
        match node {
            Node::Element(e) => children.push(Canon::Element(canonical(e))),
            Node::Text(t) => push_text(&mut children, t),
        }
    }
    (el.name().to_owned(), sorted(attrs), children)
}

fn check_document(tree: &Tree, doc: &str, splits: &[usize]) {
    let shaped = shape_split(doc.as_bytes(), splits);
    let parsed = match Element::from_reader(&shaped[..]) {
        Ok(el) => el,
        Err(e) => panic!("shaped document refused by the parser: {e}"),
    };
    assert_eq!(canonical(&parsed), expected(tree, 1), "shaped document is not the original trimmed");
}
