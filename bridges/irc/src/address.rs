//! IRC identifiers in Biboumi form: `#channel%server`, `nick%server`, `server`.

use thiserror::Error;

/// The characters that begin a channel name.
const CHANNEL_PREFIXES: [char; 4] = ['#', '&', '+', '!'];

/// What an IRC chat id names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IrcTarget {
    /// A channel (`#chan`), a nick, or empty for the server itself.
    pub name: String,
    /// The server name as configured (the key in `servers`).
    pub server: String,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum AddressError {
    #[error("`{0}` names no IRC server: use `#channel%server` or `nick%server`")]
    NoServer(String),
    #[error("`{0}` is not a valid IRC name: it is empty or contains spaces, commas or control characters")]
    BadName(String),
    #[error(
        "`{0}` names no channel or nick before the `%`: write `#channel%server` or `nick%server`, or just `server` for the server"
    )]
    EmptyName(String),
    #[error("`{0}` is not a valid IRC channel: a channel needs a name after its `#`")]
    BadChannel(String),
    #[error("`{0}` is not a valid IRC nick: a nick cannot begin with `:` or `$` nor contain `!`, `@`, `%`, `*` or `?`")]
    BadNick(String),
}

impl IrcTarget {
    /// Parse a chat id; `pinned` is the network's pinned server, if any.
    pub fn parse(id: &str, pinned: Option<&str>) -> Result<IrcTarget, AddressError> {
        let (name, server) = match id.rsplit_once('%') {
            Some((name, server)) => (name, server),
            None if id.starts_with(CHANNEL_PREFIXES) => match pinned {
                Some(p) => (id, p),
                None => return Err(AddressError::NoServer(id.to_owned())),
            },
            None => match pinned {
                Some(p) => (id, p),
                // A bare word is a server (`irc.libera.chat@irc.example.org`).
                None => ("", id),
            },
        };
        if server.is_empty() || server.contains([' ', '/', '@']) {
            return Err(AddressError::NoServer(id.to_owned()));
        }
        if name.contains([' ', ',', '\r', '\n', '\0', '\x07']) || name.chars().any(char::is_control) {
            return Err(AddressError::BadName(id.to_owned()));
        }
        // An empty name is the server only when written as the bare server name: `%server`
        // is a mistake, and must not reach the server's console (raw commands).
        if name.is_empty() && id.contains('%') {
            return Err(AddressError::EmptyName(id.to_owned()));
        }
        if name.starts_with(CHANNEL_PREFIXES) && name.chars().count() < 2 {
            return Err(AddressError::BadChannel(id.to_owned()));
        }
        // A nick is a single IRC target: a leading `:` would end the command's
        // parameters, `$`/masks and `nick!user@host`/`user%host` forms name other targets.
        if !name.is_empty()
            && !name.starts_with(CHANNEL_PREFIXES)
            && (name.starts_with([':', '$']) || name.contains(['!', '@', '%', '*', '?']))
        {
            return Err(AddressError::BadNick(id.to_owned()));
        }
        Ok(IrcTarget { name: name.to_owned(), server: server.to_owned() })
    }

    pub fn is_channel(&self) -> bool {
        self.name.starts_with(CHANNEL_PREFIXES)
    }
}

/// The chat id of `name` (channel or nick) on `server`.
pub fn chat_id(name: &str, server: &str) -> String {
    format!("{name}%{server}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_biboumi_forms() {
        let t = IrcTarget::parse("#test%127.0.0.1", None).unwrap();
        assert_eq!(t, IrcTarget { name: "#test".into(), server: "127.0.0.1".into() });
        assert!(t.is_channel());
        let t = IrcTarget::parse("bob%irc.example.org", None).unwrap();
        assert_eq!(t.name, "bob");
        assert!(!t.is_channel());
        let t = IrcTarget::parse("irc.example.org", None).unwrap();
        assert_eq!(t, IrcTarget { name: "".into(), server: "irc.example.org".into() });
    }

    #[test]
    fn pinned_server_allows_short_forms() {
        assert_eq!(IrcTarget::parse("#test", Some("libera")).unwrap().server, "libera");
        assert_eq!(IrcTarget::parse("bob", Some("libera")).unwrap().name, "bob");
        assert_eq!(IrcTarget::parse("#test", None), Err(AddressError::NoServer("#test".into())));
    }

    #[test]
    fn rejects_names_that_could_inject() {
        assert!(IrcTarget::parse("#a b%srv", None).is_err());
        assert!(IrcTarget::parse("#a,#b%srv", None).is_err());
        assert!(IrcTarget::parse("#a%", None).is_err());
    }

    #[test]
    fn empty_or_malformed_names_are_errors_not_other_entities() {
        use AddressError::*;
        assert_eq!(IrcTarget::parse("%127.0.0.1", None), Err(EmptyName("%127.0.0.1".into())));
        assert_eq!(IrcTarget::parse("%libera", Some("libera")), Err(EmptyName("%libera".into())));
        assert_eq!(IrcTarget::parse("#%127.0.0.1", None), Err(BadChannel("#%127.0.0.1".into())));
        assert_eq!(IrcTarget::parse("&%srv", None), Err(BadChannel("&%srv".into())));
        for nick in [":bob%srv", "$*%srv", "bob!u@h%srv", "a@b%srv", "a%b%srv", "a*%srv", "a?%srv"] {
            assert_eq!(IrcTarget::parse(nick, None), Err(BadNick(nick.into())), "{nick}");
        }
        assert_eq!(IrcTarget::parse(":bob", Some("libera")), Err(BadNick(":bob".into())));
        assert_eq!(IrcTarget::parse("bob smith%srv", None), Err(BadName("bob smith%srv".into())));
        assert_eq!(IrcTarget::parse("bob\u{1}%srv", None), Err(BadName("bob\u{1}%srv".into())));
        // Still fine: channels with `%` or `:` inside, nicks with IRC's special characters.
        assert_eq!(IrcTarget::parse("#a%b%srv", None).map(|t| t.name), Ok("#a%b".into()));
        assert_eq!(IrcTarget::parse("[bob]\\^_|%srv", None).map(|t| t.name), Ok("[bob]\\^_|".into()));
        assert_eq!(IrcTarget::parse("irc.server", None).map(|t| t.name), Ok(String::new()));
    }
}
