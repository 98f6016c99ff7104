//! Guards on the shape of incoming XML, applied to the bytes before they reach
//! the XML parser. Building and dropping an element tree recurses once per
//! level, so an unbounded depth (`<a><a><a>…`) would overflow the stack; and
//! the parser refuses names and attribute values over 8 KiB, which would end
//! the whole stream.
//!
//! - [`NestingCounter`]: client streams past [`MAX_DEPTH`] are refused with an
//!   error, and so is markup RFC 6120 §11.1 forbids (comments, processing
//!   instructions after the XML declaration, document type declarations).
//! - [`XmlShaper`] / [`Shaped`]: the component link, where the XMPP server
//!   forwards what anyone sends, trims the excess instead and stays up
//!   (forbidden markup is left out).
//!
//! Both scan with one [`Markup`] lexer for what is not an element: CDATA
//! sections (whose content is text, whatever it looks like), comments,
//! processing instructions and declarations, so that no `<` or `>` inside them
//! is ever counted as a tag. The scans run in constant memory per byte.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Deepest nesting accepted, counting the stream element (a stanza is level 2).
pub const MAX_DEPTH: u32 = 64;

/// What a `<!…>` or `<?…>` turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MarkupKind {
    /// `<![CDATA[…]]>`: text.
    Cdata,
    /// `<!--…-->`.
    Comment,
    /// `<!DOCTYPE …>` or any other `<!…>`.
    Declaration,
    /// `<?…?>`.
    ProcessingInstruction,
}

/// Where the lexer of one `<!…>` or `<?…>` stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MarkupState {
    /// After `<!`: `matched` bytes of `--` (comment) or `[CDATA[` (CDATA) seen so far.
    Bang { matched: u8, cdata: bool },
    /// Inside a CDATA section, after `brackets` (at most 2) consecutive `]`.
    Cdata { brackets: u8 },
    /// Inside a comment, after `dashes` (at most 2) consecutive `-`.
    Comment { dashes: u8 },
    /// Inside a declaration: ends at a `>` outside quotes and `[…]`.
    Declaration { quote: Option<u8>, brackets: u32 },
    /// Inside a processing instruction, `question` if the last byte was `?`.
    Pi { question: bool },
}

/// What one byte did to a [`Markup`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MarkupStep {
    /// Still inside; the kind is not known yet or was known before.
    Inside,
    /// The kind became known with this byte.
    Known(MarkupKind),
    /// This byte ended the markup.
    Ended,
}

const CDATA_OPEN: &[u8] = b"[CDATA[";

/// Lexer for markup that is not an element, from the byte after `<!` or `<?`
/// to the byte that ends it. Constant state: nothing an attacker sends makes it grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Markup(MarkupState);

impl Markup {
    fn bang() -> Markup {
        Markup(MarkupState::Bang { matched: 0, cdata: false })
    }

    fn pi() -> Markup {
        Markup(MarkupState::Pi { question: false })
    }

    fn kind(&self) -> Option<MarkupKind> {
        match self.0 {
            MarkupState::Bang { .. } => None,
            MarkupState::Cdata { .. } => Some(MarkupKind::Cdata),
            MarkupState::Comment { .. } => Some(MarkupKind::Comment),
            MarkupState::Declaration { .. } => Some(MarkupKind::Declaration),
            MarkupState::Pi { .. } => Some(MarkupKind::ProcessingInstruction),
        }
    }

    fn step(&mut self, b: u8) -> MarkupStep {
        match self.0 {
            MarkupState::Bang { matched, cdata } => {
                let want: &[u8] = match (matched, cdata) {
                    (0, _) => b"",
                    (_, true) => CDATA_OPEN,
                    (_, false) => b"--",
                };
                if matched == 0 && (b == b'-' || b == b'[') {
                    self.0 = MarkupState::Bang { matched: 1, cdata: b == b'[' };
                    return MarkupStep::Inside;
                }
                if matched > 0 && want.get(usize::from(matched)) == Some(&b) {
                    let matched = matched + 1;
                    if usize::from(matched) == want.len() {
                        self.0 =
                            if cdata { MarkupState::Cdata { brackets: 0 } } else { MarkupState::Comment { dashes: 0 } };
                        return MarkupStep::Known(self.kind().unwrap_or(MarkupKind::Declaration));
                    }
                    self.0 = MarkupState::Bang { matched, cdata };
                    return MarkupStep::Inside;
                }
                // Anything else after `<!` is a declaration; this byte is its first.
                self.0 = MarkupState::Declaration { quote: None, brackets: 0 };
                if self.step(b) == MarkupStep::Ended {
                    return MarkupStep::Ended;
                }
                MarkupStep::Known(MarkupKind::Declaration)
            }
            MarkupState::Cdata { brackets } => {
                if b == b'>' && brackets == 2 {
                    return MarkupStep::Ended;
                }
                self.0 = MarkupState::Cdata { brackets: if b == b']' { (brackets + 1).min(2) } else { 0 } };
                MarkupStep::Inside
            }
            MarkupState::Comment { dashes } => {
                if b == b'>' && dashes == 2 {
                    return MarkupStep::Ended;
                }
                self.0 = MarkupState::Comment { dashes: if b == b'-' { (dashes + 1).min(2) } else { 0 } };
                MarkupStep::Inside
            }
            MarkupState::Declaration { quote, brackets } => {
                self.0 = match (quote, b) {
                    (Some(q), _) if q == b => MarkupState::Declaration { quote: None, brackets },
                    (Some(_), _) => return MarkupStep::Inside,
                    (None, b'\'' | b'"') => MarkupState::Declaration { quote: Some(b), brackets },
                    (None, b'[') => MarkupState::Declaration { quote, brackets: brackets.saturating_add(1) },
                    (None, b']') => MarkupState::Declaration { quote, brackets: brackets.saturating_sub(1) },
                    (None, b'>') if brackets == 0 => return MarkupStep::Ended,
                    _ => return MarkupStep::Inside,
                };
                MarkupStep::Inside
            }
            MarkupState::Pi { question } => {
                if b == b'>' && question {
                    return MarkupStep::Ended;
                }
                self.0 = MarkupState::Pi { question: b == b'?' };
                MarkupStep::Inside
            }
        }
    }
}

/// Why a client stream was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Elements nested past [`MAX_DEPTH`].
    TooDeep,
    /// Markup XMPP forbids (RFC 6120 §11.1): a comment, a processing instruction
    /// after the XML declaration, or a document type declaration.
    Restricted(MarkupKind),
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::TooDeep => write!(f, "XML nested deeper than {MAX_DEPTH} levels"),
            Refused::Restricted(MarkupKind::Comment) => f.write_str("XML comments are not allowed in XMPP"),
            Refused::Restricted(MarkupKind::ProcessingInstruction) => {
                f.write_str("processing instructions are not allowed in XMPP")
            }
            Refused::Restricted(_) => f.write_str("document type declarations are not allowed in XMPP"),
        }
    }
}

impl std::error::Error for Refused {}

/// Where a [`NestingCounter`] stands between two bytes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum CounterState {
    #[default]
    Text,
    /// Right after `<`: the next byte says what kind of tag this is.
    TagStart,
    /// Inside a start tag (`opening`) or an end tag, within `quote` if any.
    Tag {
        opening: bool,
        quote: Option<u8>,
    },
    Markup(Markup),
}

/// Tracks element depth across reads, and refuses markup XMPP forbids.
#[derive(Default)]
pub struct NestingCounter {
    depth: u32,
    state: CounterState,
    /// Whether any element was opened yet (before it, the XML declaration may stand).
    started: bool,
    prev: u8,
    refused: Option<Refused>,
}

impl NestingCounter {
    /// Account for `bytes`; an error once nesting went past [`MAX_DEPTH`] or
    /// forbidden markup was seen (and for everything after).
    pub fn feed(&mut self, bytes: &[u8]) -> Result<(), Refused> {
        self.scan(bytes).map_err(|(_, r)| r)
    }

    /// Why the stream was refused, once it was.
    pub fn refused(&self) -> Option<Refused> {
        self.refused
    }

    /// [`feed`](Self::feed), saying where it stopped: on refusal, how many
    /// bytes of `bytes` came before the one refused (they may be parsed: the
    /// stream header, the stanzas before a bad one).
    pub fn scan(&mut self, bytes: &[u8]) -> Result<(), (usize, Refused)> {
        if let Some(r) = self.refused {
            return Err((0, r));
        }
        for (i, &b) in bytes.iter().enumerate() {
            if let Err(r) = self.byte(b) {
                self.refused = Some(r);
                return Err((i, r));
            }
            self.prev = b;
        }
        Ok(())
    }

    fn byte(&mut self, b: u8) -> Result<(), Refused> {
        match self.state {
            CounterState::Text => {
                if b == b'<' {
                    self.state = CounterState::TagStart;
                }
            }
            CounterState::TagStart => match b {
                b'/' => self.state = CounterState::Tag { opening: false, quote: None },
                b'!' => self.state = CounterState::Markup(Markup::bang()),
                b'?' if self.started => return Err(Refused::Restricted(MarkupKind::ProcessingInstruction)),
                b'?' => self.state = CounterState::Markup(Markup::pi()),
                _ => {
                    self.started = true;
                    self.depth += 1;
                    if self.depth > MAX_DEPTH {
                        return Err(Refused::TooDeep);
                    }
                    self.state = CounterState::Tag { opening: true, quote: None };
                }
            },
            CounterState::Tag { opening, quote } => match (quote, b) {
                (Some(q), _) if b == q => self.state = CounterState::Tag { opening, quote: None },
                (Some(_), _) => {}
                (None, b'\'' | b'"') => self.state = CounterState::Tag { opening, quote: Some(b) },
                (None, b'>') => {
                    if !opening || self.prev == b'/' {
                        self.depth = self.depth.saturating_sub(1);
                    }
                    self.state = CounterState::Text;
                }
                _ => {}
            },
            CounterState::Markup(mut markup) => {
                match markup.step(b) {
                    MarkupStep::Known(MarkupKind::Cdata) | MarkupStep::Inside => {}
                    MarkupStep::Known(kind) => return Err(Refused::Restricted(kind)),
                    MarkupStep::Ended => {
                        if let Some(kind) = markup.kind().filter(|k| {
                            *k != MarkupKind::Cdata && (self.started || *k != MarkupKind::ProcessingInstruction)
                        }) {
                            return Err(Refused::Restricted(kind));
                        }
                        self.state = CounterState::Text;
                        return Ok(());
                    }
                }
                self.state = CounterState::Markup(markup);
            }
        }
        Ok(())
    }
}

/// Longest element name passed on; longer names are cut, the same way in start
/// and end tags, so the document stays well-formed.
pub const MAX_NAME: usize = 1024;
/// Longest attribute value passed on (the XML parser refuses tokens over 8 KiB).
pub const MAX_VALUE: usize = 4096;

#[derive(Clone, Copy, PartialEq)]
enum Lexeme {
    Text,
    /// Right after `<`, which is held back until the tag's kind is known.
    TagStart,
    Name {
        len: usize,
        cutting: bool,
    },
    InTag,
    Value {
        quote: u8,
        len: usize,
        in_ref: bool,
        cutting: bool,
    },
    /// `<?…>` and `<!…>`, no depth: CDATA sections and the XML declaration are
    /// passed on (`keep`), comments, other declarations and instructions left out.
    Markup {
        markup: Markup,
        keep: bool,
    },
}

/// Rewrites a byte stream of XML so that the XML parser never refuses it for
/// its shape: subtrees nested deeper than [`MAX_DEPTH`] are left out whole,
/// element names are cut at [`MAX_NAME`] bytes and attribute values at
/// [`MAX_VALUE`] bytes (on character boundaries, never inside a reference).
///
/// Used on the component link, where the XMPP server forwards whatever its
/// users send: one hostile stanza must cost that stanza's excess, not the link.
#[derive(Default)]
pub struct XmlShaper {
    depth: u32,
    /// Depth of the root of the subtree being left out.
    skip_from: Option<u32>,
    lexeme: Option<Lexeme>,
    closing: bool,
    /// Whether any element was opened yet (before it, the XML declaration may stand).
    started: bool,
    prev: u8,
}

fn is_continuation(b: u8) -> bool {
    b & 0xC0 == 0x80
}

impl XmlShaper {
    /// Append the shaped form of `input` to `out`.
    pub fn shape(&mut self, input: &[u8], out: &mut Vec<u8>) {
        for &b in input {
            self.byte(b, out);
            self.prev = b;
        }
    }

    fn emit(&self, b: u8, out: &mut Vec<u8>) {
        if self.skip_from.is_none() {
            out.push(b);
        }
    }

    fn byte(&mut self, b: u8, out: &mut Vec<u8>) {
        let lexeme = self.lexeme.unwrap_or(Lexeme::Text);
        match lexeme {
            Lexeme::Text => {
                if b == b'<' {
                    self.lexeme = Some(Lexeme::TagStart);
                } else {
                    self.emit(b, out);
                }
            }
            Lexeme::TagStart => match b {
                b'/' => {
                    self.closing = true;
                    self.emit(b'<', out);
                    self.emit(b, out);
                    self.lexeme = Some(Lexeme::Name { len: 0, cutting: false });
                }
                b'!' => self.lexeme = Some(Lexeme::Markup { markup: Markup::bang(), keep: false }),
                b'?' => {
                    // Only the XML declaration, before any element, is passed on.
                    let keep = !self.started;
                    if keep {
                        self.emit(b'<', out);
                        self.emit(b, out);
                    }
                    self.lexeme = Some(Lexeme::Markup { markup: Markup::pi(), keep });
                }
                _ => {
                    self.closing = false;
                    self.started = true;
                    self.depth += 1;
                    if self.skip_from.is_none() && self.depth > MAX_DEPTH {
                        self.skip_from = Some(self.depth);
                    }
                    self.emit(b'<', out);
                    self.emit(b, out);
                    self.lexeme = Some(Lexeme::Name { len: 1, cutting: false });
                }
            },
            Lexeme::Name { len, cutting } => {
                if b.is_ascii_whitespace() || b == b'/' || b == b'>' {
                    self.lexeme = Some(Lexeme::InTag);
                    self.byte(b, out);
                    return;
                }
                let len = len + 1;
                let cutting = if is_continuation(b) { cutting } else { len > MAX_NAME };
                if !cutting {
                    self.emit(b, out);
                }
                self.lexeme = Some(Lexeme::Name { len, cutting });
            }
            Lexeme::InTag => match b {
                b'\'' | b'"' => {
                    self.emit(b, out);
                    self.lexeme = Some(Lexeme::Value { quote: b, len: 0, in_ref: false, cutting: false });
                }
                b'>' => {
                    self.emit(b, out);
                    if self.closing || self.prev == b'/' {
                        self.depth = self.depth.saturating_sub(1);
                    }
                    if self.skip_from.is_some_and(|root| self.depth < root) {
                        self.skip_from = None;
                    }
                    self.lexeme = Some(Lexeme::Text);
                }
                _ => self.emit(b, out),
            },
            Lexeme::Value { quote, len, in_ref, cutting } => {
                if b == quote {
                    self.emit(b, out);
                    self.lexeme = Some(Lexeme::InTag);
                    return;
                }
                let len = len + 1;
                let cutting = cutting || (len > MAX_VALUE && !in_ref && !is_continuation(b));
                let in_ref = match b {
                    b'&' => true,
                    b';' => false,
                    _ => in_ref,
                };
                if !cutting {
                    self.emit(b, out);
                }
                self.lexeme = Some(Lexeme::Value { quote, len, in_ref, cutting });
            }
            Lexeme::Markup { mut markup, mut keep } => match markup.step(b) {
                MarkupStep::Known(MarkupKind::Cdata) => {
                    keep = true;
                    for &c in b"<!" {
                        self.emit(c, out);
                    }
                    for &c in CDATA_OPEN {
                        self.emit(c, out);
                    }
                    self.lexeme = Some(Lexeme::Markup { markup, keep });
                }
                MarkupStep::Ended => {
                    if keep {
                        self.emit(b, out);
                    }
                    self.lexeme = Some(Lexeme::Text);
                }
                MarkupStep::Inside | MarkupStep::Known(_) => {
                    if keep {
                        self.emit(b, out);
                    }
                    self.lexeme = Some(Lexeme::Markup { markup, keep });
                }
            },
        }
    }
}

/// A byte stream passed through an [`XmlShaper`].
pub struct Shaped<S> {
    inner: S,
    shaper: XmlShaper,
    pending: Vec<u8>,
    offset: usize,
}

impl<S> Shaped<S> {
    pub fn new(inner: S) -> Self {
        Shaped { inner, shaper: XmlShaper::default(), pending: Vec::new(), offset: 0 }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Shaped<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.offset < this.pending.len() {
                let n = buf.remaining().min(this.pending.len() - this.offset);
                buf.put_slice(&this.pending[this.offset..this.offset + n]);
                this.offset += n;
                return Poll::Ready(Ok(()));
            }
            this.pending.clear();
            this.offset = 0;
            let mut raw = [0u8; 8192];
            let mut raw = ReadBuf::new(&mut raw);
            match Pin::new(&mut this.inner).poll_read(cx, &mut raw) {
                Poll::Ready(Ok(())) if raw.filled().is_empty() => return Poll::Ready(Ok(())), // end of stream
                Poll::Ready(Ok(())) => this.shaper.shape(raw.filled(), &mut this.pending),
                other => return other,
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Shaped<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_xmpp::minidom::Element;

    fn depth_ok(xml: &str) -> bool {
        NestingCounter::default().feed(xml.as_bytes()).is_ok()
    }

    fn verdict(xml: &[u8]) -> Result<(), Refused> {
        let at_once = NestingCounter::default().feed(xml);
        let mut bytewise = NestingCounter::default();
        let split = xml.iter().try_for_each(|b| bytewise.feed(std::slice::from_ref(b)));
        assert_eq!(at_once, split, "the verdict depends on how the input was split");
        at_once
    }

    /// The packet that once overflowed the stack: closing tags hidden in CDATA
    /// must not make the counter believe the depth went down.
    #[test]
    fn cdata_hides_no_closing_tags() {
        let header = "<?xml version='1.0'?><stream:stream xmlns='jabber:client' to='localhost'>";
        let unit = format!("{}<![CDATA[{}]]>", "<a>".repeat(60), "</>".repeat(60));
        let packet = format!("{header}{}", unit.repeat(3));
        assert_eq!(verdict(packet.as_bytes()), Err(Refused::TooDeep));
        // CDATA itself is allowed, whatever it holds
        let ok = format!("{header}<message><body><![CDATA[<a><b>]]]]>x]]></body></message>");
        assert_eq!(verdict(ok.as_bytes()), Ok(()));
        let ok = format!("{header}<message><body><![CDATA[{}]]></body></message>", "<a>".repeat(1000));
        assert_eq!(verdict(ok.as_bytes()), Ok(()));
    }

    #[test]
    fn forbidden_markup_is_refused() {
        let header = "<?xml version='1.0'?><stream:stream xmlns='jabber:client' to='localhost'>";
        assert_eq!(
            verdict(b"<?xml version='1.0'?><!DOCTYPE x [<!ENTITY a 'b'>]><stream:stream>"),
            Err(Refused::Restricted(MarkupKind::Declaration))
        );
        assert_eq!(verdict(format!("{header}<!-- hi -->").as_bytes()), Err(Refused::Restricted(MarkupKind::Comment)));
        assert_eq!(
            verdict(format!("{header}<?pi x?>").as_bytes()),
            Err(Refused::Restricted(MarkupKind::ProcessingInstruction))
        );
        assert_eq!(verdict(format!("{header}<!>").as_bytes()), Err(Refused::Restricted(MarkupKind::Declaration)));
        assert_eq!(verdict(format!("{header}<![CDAT>").as_bytes()), Err(Refused::Restricted(MarkupKind::Declaration)));
        // once refused, always refused
        let mut c = NestingCounter::default();
        assert!(c.feed(format!("{header}<!--").as_bytes()).is_err());
        assert!(c.feed(b"-->").is_err());
        // a `>` or quote in text or inside a CDATA section is no tag
        assert_eq!(verdict(format!("{header}<m>a > b ' \" <![CDATA[ ' ]]></m>").as_bytes()), Ok(()));
    }

    #[test]
    fn ordinary_streams_pass_and_deep_ones_do_not() {
        let header = "<?xml version='1.0'?><stream:stream xmlns='jabber:client' to='a>b'>";
        let stanza = "<message to='x' id='/>'><body>a &gt; b</body><x xmlns='y'/></message>";
        assert!(depth_ok(&format!("{header}{}", stanza.repeat(1000))));
        assert!(depth_ok(&format!("{header}{}{}", "<a>".repeat(60), "</a>".repeat(60))));
        assert!(!depth_ok(&format!("{header}{}", "<a>".repeat(100))));
        assert!(!depth_ok(&format!("{header}{}", "<a x='1'>".repeat(65))));
        // self-closing siblings never add up
        assert!(depth_ok(&format!("{header}<m>{}</m>", "<e/>".repeat(10_000))));
    }

    fn shaped(xml: &str) -> String {
        let mut out = Vec::new();
        let mut shaper = XmlShaper::default();
        // byte by byte, as the worst split across reads
        for b in xml.as_bytes() {
            shaper.shape(std::slice::from_ref(b), &mut out);
        }
        String::from_utf8(out).expect("shaped output stays UTF-8")
    }

    #[test]
    fn shaping_counts_no_tags_in_cdata_and_drops_comments() {
        let header = "<?xml version='1.0'?><stream:stream xmlns='jabber:component:accept' to='a'>";
        // closing tags inside CDATA do not lower the depth: the subtree is still cut
        let deep =
            format!("<message>{}<![CDATA[{}]]>{}</message>", "<a>".repeat(100), "</a>".repeat(100), "</a>".repeat(100));
        let kept = MAX_DEPTH as usize - 2;
        assert_eq!(
            shaped(&format!("{header}{deep}")),
            format!("{header}<message>{}{}</message>", "<a>".repeat(kept), "</a>".repeat(kept))
        );
        // CDATA passes on as it is; comments, instructions and declarations are left out
        let cdata = "<message><body><![CDATA[a <b> ]] ]]]></body></message>";
        assert_eq!(shaped(&format!("{header}{cdata}")), format!("{header}{cdata}"));
        assert_eq!(
            shaped(&format!(
                "{header}<message><!-- <a> -- > --><?pi <a>?><!DOCTYPE x [<!ENTITY y '>'>]><body/></message>"
            )),
            format!("{header}<message><body/></message>")
        );
        let parsed: Element = shaped("<m xmlns='x'><![CDATA[<a>&amp;]]><!--c--></m>").parse().expect("parses");
        assert_eq!(parsed.text(), "<a>&amp;");
    }

    #[test]
    fn shaping_keeps_ordinary_xml_and_trims_the_excess() {
        let header = "<?xml version='1.0'?><stream:stream xmlns='jabber:component:accept' to='a>b'>";
        let stanza = "<message to='x' id='/>'><body>a &gt; b &lt; c</body><x xmlns='y'/></message>";
        assert_eq!(shaped(&format!("{header}{stanza}")), format!("{header}{stanza}"));

        // a subtree past the limit is left out whole; the stanza and what follows stay
        let deep = format!("<message id='d'>{}{}</message>{stanza}", "<a>".repeat(100), "</a>".repeat(100));
        let kept = MAX_DEPTH as usize - 2; // the stream and the message take two levels
        assert_eq!(
            shaped(&format!("{header}{deep}")),
            format!("{header}<message id='d'>{}{}</message>{stanza}", "<a>".repeat(kept), "</a>".repeat(kept))
        );

        // long attribute values are cut on a character boundary, never inside a reference
        let value = format!("{}&amp;{}", "v".repeat(MAX_VALUE - 2), "é".repeat(5000));
        let out = shaped(&format!("{header}<message x='{value}' id='1'/>"));
        assert!(out.contains(&format!("x='{}&amp;' id='1'/>", "v".repeat(MAX_VALUE - 2))), "{}", &out[..200]);
        let out = shaped(&format!("{header}<message x='{}' id='1'/>", "é".repeat(5000)));
        assert!(out.ends_with("' id='1'/>"));

        // long names are cut the same way in start and end tags
        let name = format!("e{}", "é".repeat(MAX_NAME));
        let out = shaped(&format!("<{name} a='1'>t</{name}>"));
        let cut: String = name
            .chars()
            .scan(0, |len, c| {
                *len += c.len_utf8();
                (*len <= MAX_NAME + 1).then_some(c)
            })
            .collect();
        assert_eq!(out, format!("<{cut} a='1'>t</{cut}>"));
    }
}
