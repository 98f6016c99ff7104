//! Making XMPP text safe and correctly sized for IRC.
//!
//! An IRC line is at most 512 bytes including the CR LF and the prefix the server
//! adds when relaying (`:nick!user@host PRIVMSG #chan :`). A body is first cut at
//! its line breaks (CR, LF and NUL can never reach the wire, so a body can never
//! become a second IRC command), then each line is cut into pieces that fit,
//! at UTF-8 character boundaries, so the pieces concatenate back to the line.

/// The longest IRC line, CR LF included (RFC 1459 / 2812).
pub const MAX_LINE: usize = 512;

/// Room left for the server's `nick!user@host` when we do not know ours yet.
const UNKNOWN_USERHOST: usize = 1 + 10 + 1 + 63;

/// Bytes available for the text of a `command target :text` line as the server relays it.
///
/// `prefix` is our `nick!user@host` when known, else an upper bound is assumed from `nick`.
pub fn text_budget(command: &str, target: &str, nick: &str, prefix: Option<&str>) -> usize {
    let prefix_len = prefix.map(str::len).unwrap_or(nick.len() + UNKNOWN_USERHOST);
    // ":" prefix " " command " " target " :" text "\r\n"
    let overhead = 1 + prefix_len + 1 + command.len() + 1 + target.len() + 2 + 2;
    MAX_LINE.saturating_sub(overhead).max(1)
}

/// Split `body` into IRC-safe lines of at most `budget` bytes each.
///
/// Line breaks in the body start new IRC lines; empty lines are dropped (IRC cannot
/// carry them); NUL and CR are removed. Pieces never split a UTF-8 character.
pub fn split_lines(body: &str, budget: usize) -> Vec<String> {
    let mut out = Vec::new();
    for raw in body.split('\n') {
        let line: String = raw.chars().filter(|c| *c != '\r' && *c != '\0').collect();
        if line.is_empty() {
            continue;
        }
        let mut rest = line.as_str();
        while !rest.is_empty() {
            let mut cut = rest.len().min(budget.max(4));
            while !rest.is_char_boundary(cut) {
                cut -= 1;
            }
            out.push(rest[..cut].to_owned());
            rest = &rest[cut..];
        }
    }
    out
}

/// A single-line parameter (nick, topic, part reason): cut at the first line break,
/// NUL removed.
pub fn one_line(text: &str) -> String {
    text.split(['\r', '\n']).next().unwrap_or("").chars().filter(|c| *c != '\0').collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn injection_attempts_stay_text() {
        let lines = split_lines("hello\r\nQUIT :x\r\nPRIVMSG #other :x\0y", 400);
        assert_eq!(lines, vec!["hello", "QUIT :x", "PRIVMSG #other :xy"]);
        assert!(lines.iter().all(|l| !l.contains(['\r', '\n', '\0'])));
    }

    #[test]
    fn long_multibyte_text_splits_on_char_boundaries_and_reassembles() {
        let body = "é€😀a".repeat(150); // 2+3+4+1 bytes per group
        let lines = split_lines(&body, 100);
        assert!(lines.iter().all(|l| l.len() <= 100 && !l.is_empty()));
        assert_eq!(lines.concat(), body);
    }

    #[test]
    fn budget_accounts_for_prefix_and_target() {
        let b = text_budget("PRIVMSG", "#test", "alice", Some("alice!~alice@127.0.0.1"));
        let relayed = format!(":alice!~alice@127.0.0.1 PRIVMSG #test :{}\r\n", "x".repeat(b));
        assert_eq!(relayed.len(), MAX_LINE);
        assert!(text_budget("PRIVMSG", "#test", "alice", None) < b);
    }

    #[test]
    fn empty_lines_dropped() {
        assert_eq!(split_lines("a\n\n\r\nb", 10), vec!["a", "b"]);
        assert!(split_lines("", 10).is_empty());
    }

    #[test]
    fn one_line_cuts_at_break() {
        assert_eq!(one_line("topic\r\nQUIT"), "topic");
    }
}
