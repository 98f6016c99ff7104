//! Reversible mapping of remote identifiers into JID localparts.
//!
//! Remote ids (IRC `#chan%server`, Matrix `!Room:server`, Telegram chat ids,
//! Discord snowflakes) become JID localparts with XEP-0106 escaping, so a JID
//! can always be turned back into the remote id it came from.
//!
//! XMPP servers lowercase localparts (nodeprep / PRECIS), which would destroy
//! ids of case-sensitive networks such as Matrix. For those, [`Escaping::CaseSensitive`]
//! additionally writes each upper-case ASCII letter as `^` followed by its
//! lower-case form, and `^` itself as `^^`: `!AbC:m.org` ↔ `!^ab^c\3am.org`.
//! The result is all lower case, survives any case folding, and decodes exactly.

use thiserror::Error;

/// How a network's identifiers are spelled in JIDs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Escaping {
    /// The network compares ids without regard to case (IRC): plain XEP-0106.
    CaseInsensitive,
    /// The network's ids are case-sensitive (Matrix): XEP-0106 plus `^` case marks.
    CaseSensitive,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum AddressError {
    #[error("an empty identifier cannot be a JID localpart")]
    Empty,
    #[error("`{0}` is longer than the 1023 bytes a JID localpart may hold")]
    TooLong(String),
    #[error("`{0}` contains a character that cannot appear in a JID (control character)")]
    Forbidden(String),
    #[error("`{local}` is not a valid escaped identifier: {why}")]
    BadEscape { local: String, why: &'static str },
}

/// XEP-0106 table: character ↔ escape sequence.
const XEP0106: [(char, &str); 10] = [
    (' ', "\\20"),
    ('"', "\\22"),
    ('&', "\\26"),
    ('\'', "\\27"),
    ('/', "\\2f"),
    (':', "\\3a"),
    ('<', "\\3c"),
    ('>', "\\3e"),
    ('@', "\\40"),
    ('\\', "\\5c"),
];

impl Escaping {
    /// Spell a remote id as a JID localpart.
    pub fn to_localpart(self, remote: &str) -> Result<String, AddressError> {
        if remote.is_empty() {
            return Err(AddressError::Empty);
        }
        if remote.chars().any(char::is_control) {
            return Err(AddressError::Forbidden(remote.to_owned()));
        }
        let mut out = String::with_capacity(remote.len() + 8);
        for c in remote.chars() {
            if let Some((_, esc)) = XEP0106.iter().find(|(ch, _)| *ch == c) {
                out.push_str(esc);
            } else if self == Escaping::CaseSensitive && c == '^' {
                out.push_str("^^");
            } else if self == Escaping::CaseSensitive && c.is_ascii_uppercase() {
                out.push('^');
                out.push(c.to_ascii_lowercase());
            } else {
                out.push(c);
            }
        }
        if out.len() > 1023 {
            return Err(AddressError::TooLong(remote.to_owned()));
        }
        Ok(out)
    }

    /// Turn a JID localpart back into the remote id. Case folding by the XMPP server
    /// is undone for case-sensitive networks; for case-insensitive ones the id comes
    /// back as the server spelled it.
    pub fn from_localpart(self, local: &str) -> Result<String, AddressError> {
        if local.is_empty() {
            return Err(AddressError::Empty);
        }
        let bad = |why| AddressError::BadEscape { local: local.to_owned(), why };
        let mut out = String::with_capacity(local.len());
        let mut chars = local.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '\\' => {
                    let hex: String = chars.clone().take(2).collect();
                    match XEP0106.iter().find(|(_, esc)| esc[1..].eq_ignore_ascii_case(&hex)) {
                        Some((ch, _)) => {
                            out.push(*ch);
                            chars.next();
                            chars.next();
                        }
                        // XEP-0106: a backslash not starting an escape sequence stands for itself.
                        None => out.push('\\'),
                    }
                }
                '^' if self == Escaping::CaseSensitive => match chars.next() {
                    Some('^') => out.push('^'),
                    Some(l) if l.is_ascii_alphabetic() => out.push(l.to_ascii_uppercase()),
                    _ => return Err(bad("`^` must be followed by a letter or another `^`")),
                },
                c if self == Escaping::CaseSensitive => out.push(c.to_ascii_lowercase()),
                c => out.push(c),
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::Escaping::*;
    use super::*;

    #[test]
    fn irc_ids_keep_biboumi_form() {
        assert_eq!(CaseInsensitive.to_localpart("#test%127.0.0.1").unwrap(), "#test%127.0.0.1");
        assert_eq!(CaseInsensitive.to_localpart("alice%irc.libera.chat").unwrap(), "alice%irc.libera.chat");
        assert_eq!(CaseInsensitive.from_localpart("#test%127.0.0.1").unwrap(), "#test%127.0.0.1");
    }

    #[test]
    fn xep0106_characters_round_trip() {
        let id = "a b\"c&d'e/f:g<h>i@j\\k";
        let local = CaseInsensitive.to_localpart(id).unwrap();
        assert_eq!(local, "a\\20b\\22c\\26d\\27e\\2ff\\3ag\\3ch\\3ei\\40j\\5ck");
        assert_eq!(CaseInsensitive.from_localpart(&local).unwrap(), id);
    }

    #[test]
    fn matrix_ids_survive_lowercasing() {
        for id in ["!AbCdEf:matrix.org", "@Alice:Example.ORG", "#Room^x:m.org", "!^^:x"] {
            let local = CaseSensitive.to_localpart(id).unwrap();
            assert_eq!(local, local.to_lowercase(), "escaped form must be lower case");
            assert_eq!(CaseSensitive.from_localpart(&local.to_lowercase()).unwrap(), id);
        }
        assert_eq!(CaseSensitive.to_localpart("!AbC:m.org").unwrap(), "!^ab^c\\3am.org");
    }

    #[test]
    fn lone_backslash_stands_for_itself() {
        assert_eq!(CaseInsensitive.from_localpart("a\\zz").unwrap(), "a\\zz");
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!(CaseInsensitive.to_localpart(""), Err(AddressError::Empty));
        assert!(matches!(CaseInsensitive.to_localpart("a\nb"), Err(AddressError::Forbidden(_))));
        assert!(matches!(CaseInsensitive.to_localpart(&"x".repeat(1024)), Err(AddressError::TooLong(_))));
        assert!(matches!(CaseSensitive.from_localpart("a^1"), Err(AddressError::BadEscape { .. })));
        assert!(matches!(CaseSensitive.from_localpart("a^"), Err(AddressError::BadEscape { .. })));
    }
}
