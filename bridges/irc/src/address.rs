//! IRC identifiers in Biboumi form: `#channel%server`, `nick%server`, `server`.

use thiserror::Error;

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
}

impl IrcTarget {
    /// Parse a chat id; `pinned` is the network's pinned server, if any.
    pub fn parse(id: &str, pinned: Option<&str>) -> Result<IrcTarget, AddressError> {
        let (name, server) = match id.rsplit_once('%') {
            Some((name, server)) => (name, server),
            None if id.starts_with(['#', '&', '+', '!']) => match pinned {
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
        if name.contains([' ', ',', '\r', '\n', '\0', '\x07']) {
            return Err(AddressError::BadName(id.to_owned()));
        }
        Ok(IrcTarget { name: name.to_owned(), server: server.to_owned() })
    }

    pub fn is_channel(&self) -> bool {
        self.name.starts_with(['#', '&', '+', '!'])
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
}
