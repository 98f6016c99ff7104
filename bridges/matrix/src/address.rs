//! What a Matrix identifier names: a room (`!id:server`, or `!id` from room
//! version 12 on), a room alias
//! (`#alias:server`) or a person (`@user:server`).
//!
//! The ids are case-sensitive; in JIDs they are spelled with
//! [`isthmus_core::address::Escaping::CaseSensitive`], so they come back here exactly.

use isthmus_core::model::ChatKind;

/// A Matrix identifier, by its sigil.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MatrixTarget {
    /// `!opaque:server`
    Room(String),
    /// `#alias:server`
    Alias(String),
    /// `@localpart:server`
    User(String),
}

impl MatrixTarget {
    /// Parse an identifier; `None` when it is not one (no sigil, no server name).
    pub fn parse(id: &str) -> Option<MatrixTarget> {
        let mut chars = id.chars();
        let sigil = chars.next()?;
        let rest = chars.as_str();
        if id.len() > 255 || id.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return None;
        }
        // Room ids of room version 12 have no server part (`!opaque`).
        if sigil == '!' && !rest.is_empty() && !rest.contains(':') {
            return Some(MatrixTarget::Room(id.to_owned()));
        }
        let (local, server) = rest.split_once(':')?;
        if server.is_empty() {
            return None;
        }
        match sigil {
            '!' if !local.is_empty() => Some(MatrixTarget::Room(id.to_owned())),
            '#' if !local.is_empty() => Some(MatrixTarget::Alias(id.to_owned())),
            '@' if !local.is_empty() => Some(MatrixTarget::User(id.to_owned())),
            _ => None,
        }
    }

    /// How the XMPP side presents it.
    pub fn chat_kind(&self) -> ChatKind {
        match self {
            MatrixTarget::Room(_) | MatrixTarget::Alias(_) => ChatKind::Room,
            MatrixTarget::User(_) => ChatKind::Direct,
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            MatrixTarget::Room(s) | MatrixTarget::Alias(s) | MatrixTarget::User(s) => s,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sigils_name_kinds() {
        assert_eq!(MatrixTarget::parse("!AbC:localhost"), Some(MatrixTarget::Room("!AbC:localhost".into())));
        assert_eq!(MatrixTarget::parse("!Xy_9-Zq"), Some(MatrixTarget::Room("!Xy_9-Zq".into())));
        assert_eq!(MatrixTarget::parse("#Room:m.org").map(|t| t.chat_kind()), Some(ChatKind::Room));
        assert_eq!(MatrixTarget::parse("@Bob:m.org:8448").map(|t| t.chat_kind()), Some(ChatKind::Direct));
    }

    #[test]
    fn what_is_not_an_identifier_is_refused() {
        for bad in
            ["", "!", "#abc", "@abc", "!:server", "@bob:", "bob:server", "@a b:server", "$event:server", "@a\u{7}:s"]
        {
            assert_eq!(MatrixTarget::parse(bad), None, "{bad:?}");
        }
    }
}
