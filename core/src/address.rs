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
    ///
    /// Only the spelling [`Escaping::to_localpart`] gives is accepted, so that the JID
    /// an entity is addressed at is exactly the JID it answers from: a backslash must
    /// begin one of the XEP-0106 escapes (in lower case; a backslash itself is `\5c`),
    /// the characters those escapes stand for must not appear raw, and on case-sensitive
    /// networks an upper-case letter is `^` and the lower-case letter. Anything else is
    /// [`AddressError::BadEscape`], never a different id.
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
                    match XEP0106.iter().find(|(_, esc)| esc[1..] == hex) {
                        Some((ch, _)) => {
                            out.push(*ch);
                            chars.next();
                            chars.next();
                        }
                        None => {
                            return Err(bad(
                                "a backslash must begin one of the XEP-0106 escapes \\20 \\22 \\26 \\27 \\2f \\3a \\3c \\3e \\40 \\5c (a backslash itself is written \\5c)",
                            ));
                        }
                    }
                }
                c if XEP0106.iter().any(|(ch, _)| *ch == c) => {
                    return Err(bad("spaces and the characters \" & ' / : < > @ must be written as XEP-0106 escapes"));
                }
                c if c.is_control() => return Err(bad("control characters cannot appear in a JID")),
                '^' if self == Escaping::CaseSensitive => match chars.next() {
                    Some('^') => out.push('^'),
                    Some(l) if l.is_ascii_lowercase() => out.push(l.to_ascii_uppercase()),
                    _ => return Err(bad("`^` must be followed by a lower-case letter or another `^`")),
                },
                c if self == Escaping::CaseSensitive && c.is_ascii_uppercase() => {
                    return Err(bad("upper-case letters are written `^` and the lower-case letter"));
                }
                c => out.push(c),
            }
        }
        // The checks above are meant to make this hold; it is what callers rely on.
        if self.to_localpart(&out).as_deref() != Ok(local) {
            return Err(bad("it is not the spelling the gateway gives this identifier"));
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
    fn localparts_not_in_the_gateways_spelling_are_refused() {
        // A backslash that begins no escape: `#acc\0ajoin` would decode to an id whose
        // JID is `#acc\5c0ajoin`, so the room would answer from another address.
        for local in ["#acc\\0ajoin%irc.server", "a\\zz", "a\\", "a\\5", "a\\2F", "a\\5C"] {
            for mode in [CaseInsensitive, CaseSensitive] {
                assert!(matches!(mode.from_localpart(local), Err(AddressError::BadEscape { .. })), "{local}");
            }
        }
        assert_eq!(CaseInsensitive.from_localpart("#acc\\5c0ajoin%irc.server").unwrap(), "#acc\\0ajoin%irc.server");
        assert_eq!(CaseInsensitive.to_localpart("#acc\\0ajoin%irc.server").unwrap(), "#acc\\5c0ajoin%irc.server");
        // Raw characters that have an escape, upper case where case marks are used.
        assert!(CaseInsensitive.from_localpart("a b").is_err());
        assert!(CaseInsensitive.from_localpart("a/b").is_err());
        assert!(CaseSensitive.from_localpart("!Abc\\3am.org").is_err());
        assert!(CaseSensitive.from_localpart("!^Abc\\3am.org").is_err());
        assert_eq!(CaseInsensitive.from_localpart("#Chan%Server").unwrap(), "#Chan%Server");
    }

    /// A small deterministic generator (xorshift64*), so failures reproduce.
    struct Gen(u64);

    impl Gen {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        /// A string of pieces chosen to hit escapes valid and invalid, separators,
        /// case and non-ASCII text.
        fn string(&mut self) -> String {
            const PIECES: &[&str] = &[
                "\\",
                "\\20",
                "\\22",
                "\\26",
                "\\27",
                "\\2f",
                "\\2F",
                "\\3a",
                "\\3c",
                "\\3e",
                "\\40",
                "\\5c",
                "\\5C",
                "\\0a",
                "\\zz",
                "\\5",
                "\\2",
                "%",
                "@",
                "/",
                " ",
                ":",
                "\"",
                "&",
                "'",
                "<",
                ">",
                "#",
                "!",
                "^",
                "^^",
                "^a",
                "^A",
                "^1",
                "a",
                "z",
                "A",
                "Z",
                "0",
                "9",
                ".",
                "-",
                "_",
                "é",
                "É",
                "ß",
                "中",
                "İ",
                "ﬁ",
                "\u{7}",
                "irc.server",
                "#chan",
            ];
            let len = (self.next() % 9) as usize;
            (0..len).map(|_| PIECES[(self.next() % PIECES.len() as u64) as usize]).collect()
        }
    }

    #[test]
    fn every_id_and_every_accepted_localpart_round_trips() {
        let mut g = Gen(0x9e37_79b9_7f4a_7c15);
        let (mut accepted, mut refused) = (0, 0);
        for _ in 0..100_000 {
            let s = g.string();
            for mode in [CaseInsensitive, CaseSensitive] {
                // id → localpart → id
                if let Ok(local) = mode.to_localpart(&s) {
                    assert_eq!(
                        mode.from_localpart(&local).as_deref(),
                        Ok(s.as_str()),
                        "{mode:?} id {s:?} via {local:?}"
                    );
                    if mode == CaseSensitive {
                        assert!(!local.chars().any(|c| c.is_ascii_uppercase()), "{local:?} survives case folding");
                    }
                } else {
                    assert!(s.is_empty() || s.chars().any(char::is_control), "{mode:?} refused {s:?}");
                }
                // localpart → id → localpart, or refused
                match mode.from_localpart(&s) {
                    Ok(id) => {
                        assert_eq!(
                            mode.to_localpart(&id).as_deref(),
                            Ok(s.as_str()),
                            "{mode:?} local {s:?} via {id:?}"
                        );
                        accepted += 1;
                    }
                    Err(_) => refused += 1,
                }
            }
        }
        assert!(
            accepted > 10_000 && refused > 10_000,
            "both outcomes exercised: {accepted} accepted, {refused} refused"
        );
    }

    #[test]
    fn ids_survive_real_jids() {
        // Through a parsed JID (nodeprep folds case and normalises): the node the
        // gateway gets back either decodes to an id spelled back as that node, or is
        // refused; ids of ASCII text come back exactly (case-sensitive) or up to case.
        let mut g = Gen(0x0123_4567_89ab_cdef);
        for _ in 0..20_000 {
            let s = g.string();
            for mode in [CaseInsensitive, CaseSensitive] {
                let Ok(local) = mode.to_localpart(&s) else { continue };
                let Ok(jid) = jid::BareJid::new(&format!("{local}@irc.example.org")) else { continue };
                let Some(node) = jid.node() else { continue };
                let node = node.as_str();
                match mode.from_localpart(node) {
                    Ok(id) => {
                        assert_eq!(mode.to_localpart(&id).as_deref(), Ok(node), "{mode:?} {s:?}");
                        if s.is_ascii() {
                            match mode {
                                CaseSensitive => assert_eq!(id, s, "{node:?}"),
                                CaseInsensitive => assert_eq!(id, s.to_ascii_lowercase(), "{node:?}"),
                            }
                        }
                    }
                    Err(e) => assert!(!s.is_ascii(), "{mode:?} ASCII id {s:?} refused back as {node:?}: {e}"),
                }
            }
        }
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
