//! IRC text handling: XMPP bodies cut into IRC lines (`text::split_lines`),
//! single-line parameters (`text::one_line`), and IRC formatting codes ↔
//! XEP-0393 styling (`format`). Input: two bytes of line budget, then the text.

#![no_main]

use isthmus_irc::format::{irc_to_styling, styling_to_irc};
use isthmus_irc::text::{MAX_LINE, one_line, split_lines, text_budget};
use libfuzzer_sys::fuzz_target;

/// IRC formatting codes, and the XEP-0393 marker of those that have one.
const STYLES: [(char, char); 4] = [('\u{2}', '*'), ('\u{1d}', '_'), ('\u{1e}', '~'), ('\u{11}', '`')];
const OTHER_CODES: [char; 5] = ['\u{3}', '\u{4}', '\u{f}', '\u{16}', '\u{1f}'];

fn is_code(c: char) -> bool {
    STYLES.iter().any(|(code, _)| *code == c) || OTHER_CODES.contains(&c)
}

fn is_marker(c: char) -> bool {
    STYLES.iter().any(|(_, m)| *m == c)
}

fuzz_target!(|data: &[u8]| {
    let [a, b, rest @ ..] = data else { return };
    let budget = usize::from(u16::from_le_bytes([*a, *b])) % 600;
    let text = String::from_utf8_lossy(rest);
    check_split_lines(&text, budget);
    check_one_line(&text);
    check_irc_to_styling(&text);
    check_styling_to_irc(&text);
    check_relayed_lines(&text, budget);
});

/// Every source line (CR and NUL removed, empty ones dropped) is cut into
/// non-empty pieces of at most the budget (4 bytes at least, so any character
/// fits) that concatenate back to it, each as long as the budget allows.
fn check_split_lines(body: &str, budget: usize) {
    let lines = split_lines(body, budget);
    let cap = budget.max(4);
    let mut pieces = lines.iter();
    for raw in body.split('\n') {
        let source: String = raw.chars().filter(|c| *c != '\r' && *c != '\0').collect();
        let mut rest = source.as_str();
        while !rest.is_empty() {
            let piece = pieces.next().expect("a piece for each part of a non-empty line");
            assert!(!piece.is_empty() && piece.len() <= cap, "piece of {} bytes for budget {budget}", piece.len());
            assert!(!piece.contains(['\r', '\n', '\0']), "line break or NUL in {piece:?}");
            assert!(rest.starts_with(piece.as_str()), "{piece:?} is not the next part of {rest:?}");
            rest = &rest[piece.len()..];
            if let Some(next) = rest.chars().next() {
                assert!(piece.len() + next.len_utf8() > cap, "{piece:?} was cut short of budget {budget}");
            }
        }
    }
    assert!(pieces.next().is_none(), "pieces left over that come from no line");
}

/// The text up to its first line break, NULs removed.
fn check_one_line(text: &str) {
    let line = one_line(text);
    assert!(!line.contains(['\r', '\n', '\0']), "{line:?}");
    let without_nul: String = text.chars().filter(|c| *c != '\0').collect();
    assert!(without_nul.starts_with(&line), "{line:?} is not the start of {without_nul:?}");
    assert!(without_nul[line.len()..].chars().next().is_none_or(|c| c == '\r' || c == '\n'), "cut before a break");
}

/// No formatting code survives; what is removed is only codes, colour numbers
/// (digits, hex digits, the comma) and markers of empty spans; text without
/// control characters is untouched.
fn check_irc_to_styling(text: &str) {
    let out = irc_to_styling(text);
    if !text.chars().any(|c| (c as u32) < 0x20) {
        assert_eq!(out, text, "plain text changed");
    }
    assert!(!out.chars().any(is_code), "formatting code left in {out:?}");
    let content = |s: &str| -> String {
        s.chars().filter(|c| !(is_code(*c) || is_marker(*c) || c.is_ascii_hexdigit() || *c == ',')).collect()
    };
    assert_eq!(content(&out), content(text), "text other than formatting was lost or added");
}

/// Styling markers become codes in pairs on one line; every other character
/// stays where it was. Text with no formatting codes comes back unchanged
/// through `irc_to_styling`.
fn check_styling_to_irc(text: &str) {
    let out = styling_to_irc(text);
    let (src, dst): (Vec<char>, Vec<char>) = (text.chars().collect(), out.chars().collect());
    assert_eq!(src.len(), dst.len(), "{text:?} → {out:?}");
    for (src, dst) in src.split(|c| *c == '\n').zip(dst.split(|c| *c == '\n')) {
        let mut converted = [0usize; STYLES.len()];
        for (s, d) in src.iter().zip(dst) {
            if s != d {
                let style = STYLES.iter().position(|pair| *pair == (*d, *s));
                let Some(style) = style else { panic!("{s:?} became {d:?} in {text:?}") };
                converted[style] += 1;
            }
        }
        assert!(converted.iter().all(|n| n % 2 == 0), "unpaired codes in {out:?}");
    }
    if !text.chars().any(is_code) {
        assert_eq!(irc_to_styling(&out), text, "styling did not survive the way to IRC and back");
    }
}

/// A body sent the way `Connection::send_message` sends it fits in an IRC line
/// as the server relays it, whenever the prefix and target leave room for text.
fn check_relayed_lines(text: &str, budget: usize) {
    let prefix = "alice!~alice@host.example.org";
    let target = format!("#{}", "c".repeat(budget % 480));
    let budget = text_budget("PRIVMSG", &target, "alice", Some(prefix));
    let frame = format!(":{prefix} PRIVMSG {target} :\r\n").len();
    for line in split_lines(&styling_to_irc(text), budget) {
        if frame + 4 <= MAX_LINE {
            assert!(frame + line.len() <= MAX_LINE, "relayed line of {} bytes", frame + line.len());
        }
    }
}
