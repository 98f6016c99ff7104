//! Guards on the shape of incoming XML, applied to the bytes before they reach
//! the XML parser. Building and dropping an element tree recurses once per
//! level, so an unbounded depth (`<a><a><a>…`) would overflow the stack; and
//! the parser refuses names and attribute values over 8 KiB, which would end
//! the whole stream.
//!
//! - [`NestingCounter`]: client streams past [`MAX_DEPTH`] are refused with an error.
//! - [`XmlShaper`] / [`Shaped`]: the component link, where the XMPP server
//!   forwards what anyone sends, trims the excess instead and stays up.
//!
//! The scans are deliberately simple (tags, quotes, self-closing tags); they may
//! miscount inside CDATA sections and comments, which XMPP streams do not carry.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Deepest nesting accepted, counting the stream element (a stanza is level 2).
pub const MAX_DEPTH: u32 = 64;

/// Tracks element depth across reads.
#[derive(Default)]
pub struct NestingCounter {
    depth: u32,
    in_tag: bool,
    /// Right after `<`: the next byte says what kind of tag this is.
    tag_start: bool,
    opening: bool,
    quote: Option<u8>,
    prev: u8,
}

impl NestingCounter {
    /// Account for `bytes`; false once nesting went past [`MAX_DEPTH`].
    pub fn feed(&mut self, bytes: &[u8]) -> bool {
        for &b in bytes {
            if self.tag_start {
                self.tag_start = false;
                match b {
                    b'/' => self.opening = false,
                    b'?' | b'!' => {
                        self.opening = false;
                        self.in_tag = false; // declarations and comments: no depth
                    }
                    _ => {
                        self.opening = true;
                        self.depth += 1;
                        if self.depth > MAX_DEPTH {
                            return false;
                        }
                    }
                }
            } else if self.in_tag {
                match (self.quote, b) {
                    (Some(q), _) if b == q => self.quote = None,
                    (Some(_), _) => {}
                    (None, b'\'' | b'"') => self.quote = Some(b),
                    (None, b'>') => {
                        self.in_tag = false;
                        if !self.opening || self.prev == b'/' {
                            self.depth = self.depth.saturating_sub(1);
                        }
                    }
                    _ => {}
                }
            } else if b == b'<' {
                self.in_tag = true;
                self.tag_start = true;
                self.quote = None;
            }
            self.prev = b;
        }
        true
    }
}

/// The error a too-deep stream reads as.
#[derive(Debug)]
pub struct TooDeep;

impl std::fmt::Display for TooDeep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "XML nested deeper than {MAX_DEPTH} levels")
    }
}

impl std::error::Error for TooDeep {}

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
    /// `<?…>` and `<!…>`: passed through, no depth.
    Declaration,
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
                b'?' | b'!' => {
                    self.emit(b'<', out);
                    self.emit(b, out);
                    self.lexeme = Some(Lexeme::Declaration);
                }
                _ => {
                    self.closing = false;
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
            Lexeme::Declaration => {
                self.emit(b, out);
                if b == b'>' {
                    self.lexeme = Some(Lexeme::Text);
                }
            }
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

    fn depth_ok(xml: &str) -> bool {
        NestingCounter::default().feed(xml.as_bytes())
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
