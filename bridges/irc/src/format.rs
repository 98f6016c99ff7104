//! IRC formatting codes ↔ XEP-0393 message styling.
//!
//! | IRC | code | XEP-0393 |
//! |---|---|---|
//! | bold | `\x02` | `*bold*` |
//! | italic | `\x1d` | `_italic_` |
//! | strikethrough | `\x1e` | `~strike~` |
//! | monospace | `\x11` | `` `mono` `` |
//! | underline, reverse, colours (`\x1f`, `\x16`, `\x03NN,NN`, `\x04RRGGBB`) | | no equivalent: stripped |
//! | reset | `\x0f` | closes every open span |
//!
//! Towards IRC only well-formed XEP-0393 spans are converted (the opening marker at
//! the start or after a space, followed by a non-space; the closing one after a
//! non-space and followed by the end, a space or punctuation), so `2*3*4` stays as it is.

const STYLES: [(char, char); 4] = [('\u{2}', '*'), ('\u{1d}', '_'), ('\u{1e}', '~'), ('\u{11}', '`')];

/// IRC text → plain text with XEP-0393 styling, in one pass (the spans open at
/// a time are at most four, one per code). Each code becomes at most one marker and
/// each span at most one closing marker more: the output is at most twice as
/// long as the input.
pub fn irc_to_styling(text: &str) -> String {
    if !text.chars().any(|c| (c as u32) < 0x20) {
        return text.to_owned();
    }
    let mut out = String::with_capacity(text.len());
    // Open XEP-0393 markers, innermost last, each with where its content starts in `out`.
    let mut open: Vec<(char, usize)> = Vec::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if let Some(&(_, marker)) = STYLES.iter().find(|(code, _)| *code == c) {
            if let Some(i) = open.iter().rposition(|(m, _)| *m == marker) {
                // close the span and any opened inside it
                for span in open.drain(i..).rev() {
                    close(&mut out, span);
                }
            } else {
                out.push(marker);
                open.push((marker, out.len()));
            }
            continue;
        }
        match c {
            '\u{f}' => {
                while let Some(span) = open.pop() {
                    close(&mut out, span);
                }
            }
            '\u{3}' => {
                // \x03[fg[,bg]] with one or two digits each; a background needs a foreground
                let mut fg = false;
                for _ in 0..2 {
                    if chars.peek().is_some_and(char::is_ascii_digit) {
                        chars.next();
                        fg = true;
                    }
                }
                if fg && chars.peek() == Some(&',') {
                    let mut look = chars.clone();
                    look.next();
                    if look.peek().is_some_and(char::is_ascii_digit) {
                        chars.next();
                        for _ in 0..2 {
                            if chars.peek().is_some_and(char::is_ascii_digit) {
                                chars.next();
                            }
                        }
                    }
                }
            }
            '\u{4}' => {
                for _ in 0..6 {
                    if chars.peek().is_some_and(char::is_ascii_hexdigit) {
                        chars.next();
                    }
                }
            }
            '\u{1f}' | '\u{16}' => {}
            c => out.push(c),
        }
    }
    while let Some(span) = open.pop() {
        close(&mut out, span);
    }
    out
}

/// End the span opened by `marker` whose content starts at `start`; an empty
/// span carries nothing (`**` is no span), so its opening marker goes instead.
fn close(out: &mut String, (marker, start): (char, usize)) {
    if out.len() == start {
        out.truncate(start - marker.len_utf8());
    } else {
        out.push(marker);
    }
}

/// XEP-0393 styling → IRC formatting codes, in one pass: a marker that can open a
/// span takes the first marker after it on its line that can close one, as a scan
/// to that closer would find it; the closers are listed once, in order, and a
/// cursor per marker only moves forward. Spans do not nest (their content is
/// copied as it is), and each marker becomes one code: the output has the length
/// of the input.
pub fn styling_to_irc(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let is_closer = |j: usize, marker: char| {
        chars[j] == marker
            && !chars[j - 1].is_whitespace()
            && chars.get(j + 1).is_none_or(|n| n.is_whitespace() || n.is_ascii_punctuation())
    };
    // The closers of each marker, and where the line being read ends.
    let mut closers: [Vec<usize>; 4] = Default::default();
    for j in 1..chars.len() {
        if let Some(k) = STYLES.iter().position(|(_, m)| is_closer(j, *m)) {
            closers[k].push(j);
        }
    }
    let mut cursors = [0usize; 4];
    let mut line_end = 0;
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        if i == 0 || i > line_end {
            // past the line break: find the next one
            line_end = (i..chars.len()).find(|&j| chars[j] == '\n').unwrap_or(chars.len());
        }
        let c = chars[i];
        let at_start = i == 0 || chars[i - 1].is_whitespace();
        if let Some(k) = STYLES.iter().position(|(_, m)| *m == c)
            && at_start
            && chars.get(i + 1).is_some_and(|n| !n.is_whitespace() && *n != c)
        {
            // the first closing marker on the same line, at least one character in
            while cursors[k] < closers[k].len() && closers[k][cursors[k]] < i + 2 {
                cursors[k] += 1;
            }
            if let Some(&j) = closers[k].get(cursors[k])
                && j < line_end
            {
                let code = STYLES[k].0;
                out.push(code);
                out.extend(&chars[i + 1..j]);
                out.push(code);
                i = j + 1;
                continue;
            }
        }
        out.push(c);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn irc_codes_become_styling() {
        assert_eq!(irc_to_styling("a \u{2}bold\u{2} and \u{1d}it\u{1d}"), "a *bold* and _it_");
        assert_eq!(irc_to_styling("\u{1e}gone\u{1e} \u{11}code\u{11}"), "~gone~ `code`");
        assert_eq!(irc_to_styling("\u{2}unclosed"), "*unclosed*");
        assert_eq!(irc_to_styling("\u{2}\u{1d}both\u{f} plain"), "*_both_* plain");
    }

    #[test]
    fn colours_and_unmappable_codes_are_stripped() {
        assert_eq!(irc_to_styling("\u{3}4red\u{3} \u{3}04,12on blue\u{3} 5,3"), "red on blue 5,3");
        assert_eq!(irc_to_styling("\u{3},5 comma kept"), ",5 comma kept");
        assert_eq!(irc_to_styling("\u{1f}under\u{1f} \u{16}rev\u{16} \u{4}ff0000hex"), "under rev hex");
        assert_eq!(irc_to_styling("\u{2}\u{2}empty"), "empty");
        assert_eq!(irc_to_styling("\u{2}\u{1d}\u{f}empty\u{2}\u{1d}\u{2}"), "empty");
    }

    #[test]
    fn doubled_markers_typed_as_text_stay() {
        // Only empty spans the codes would make are dropped, never the sender's own `**` or `__`.
        for (irc, styled) in [
            ("\u{2}note:\u{2} call __init__ or 2**8", "*note:* call __init__ or 2**8"),
            ("\u{3}04**\u{3}", "**"),
            ("\u{2}a\u{2}\u{2}b\u{2}", "*a**b*"),
        ] {
            assert_eq!(irc_to_styling(irc), styled, "{irc:?}");
        }
    }

    #[test]
    fn plain_text_is_untouched() {
        let s = "nothing *special* here: 2*3*4";
        assert_eq!(irc_to_styling(s), s);
    }

    #[test]
    fn styling_becomes_irc_codes() {
        assert_eq!(
            styling_to_irc("a *bold* _it_ ~s~ `m`."),
            "a \u{2}bold\u{2} \u{1d}it\u{1d} \u{1e}s\u{1e} \u{11}m\u{11}."
        );
    }

    #[test]
    fn only_well_formed_spans_convert() {
        for s in ["2*3*4", "* not bold *", "*open only", "snake_case_name", "**", "a * b"] {
            assert_eq!(styling_to_irc(s), s, "{s}");
        }
        assert_eq!(styling_to_irc("*not\nacross lines*"), "*not\nacross lines*");
    }

    #[test]
    fn round_trip() {
        let s = "say *hello* to _everyone_";
        assert_eq!(irc_to_styling(&styling_to_irc(s)), s);
    }

    /// Run `f` on a thread with a small stack, as a converter of remote text must be able to.
    fn small_stack<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::Builder::new().stack_size(256 * 1024).spawn(f).expect("thread").join().expect("converter panicked")
    }

    #[test]
    fn unclosed_markers_towards_irc() {
        // 240 kB of openers none of which closes (each one scanned to the end of the line before)
        let text = "*word ".repeat(40_000);
        let t = text.clone();
        assert_eq!(small_stack(move || styling_to_irc(&t)), text);
        // one closer at the end: the first opener takes it, as a scan would find it
        let closed = format!("{text}*end*");
        let out = small_stack(move || styling_to_irc(&closed));
        assert_eq!(out, format!("\u{2}word {}*end\u{2}", &text[6..]));
        // a closer on the next line does not count
        let lines = format!("{}\n*end*", text.trim_end());
        let l = lines.clone();
        assert_eq!(small_stack(move || styling_to_irc(&l)), format!("{}\n\u{2}end\u{2}", text.trim_end()));
    }

    #[test]
    fn long_runs_towards_irc() {
        for text in ["*".repeat(200_000), "_".repeat(200_000), "`".repeat(200_000), "*_~`".repeat(50_000)] {
            let t = text.clone();
            let out = small_stack(move || styling_to_irc(&t));
            assert_eq!(out.len(), text.len());
            if text.starts_with("*_") {
                // `*_~` then `` ` ``: the first span closes at the next `*` before a `_` (punctuation)
                assert!(out.starts_with("\u{2}_~`\u{2}_~`"), "{:?}", &out[..20]);
            } else {
                assert_eq!(out, text);
            }
        }
    }

    #[test]
    fn many_codes_towards_styling() {
        let bold = "\u{2}".repeat(200_000);
        assert_eq!(small_stack(move || irc_to_styling(&bold)), "");
        let spans = "\u{2}a\u{1d}b ".repeat(40_000);
        let s = spans.clone();
        let out = small_stack(move || irc_to_styling(&s));
        assert!(out.len() <= 2 * spans.len());
        // a code closes the spans opened after its own
        assert_eq!(&out[..14], "*a_b _*a_b *a*");
        let colours = "\u{3}04x".repeat(50_000);
        assert_eq!(small_stack(move || irc_to_styling(&colours)), "x".repeat(50_000));
        let digits = format!("\u{3}{}", "1".repeat(200_000));
        assert_eq!(small_stack(move || irc_to_styling(&digits)), "1".repeat(199_998));
    }
}
