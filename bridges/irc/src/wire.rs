//! How lines are decoded and encoded on the wire.
//!
//! The IRC library decodes every line with one fixed encoding, which would turn a
//! line that is not UTF-8 into replacement characters. So the library is set to
//! `x-user-defined`, which maps each byte of 0x80–0xFF to one private-use
//! character (U+F780–U+F7FF) and back, losing nothing; this module turns those
//! characters back into bytes and decodes the line itself: as UTF-8 where it is
//! valid UTF-8, else with the server's fallback encoding (`encoding_fallback`).
//! What the bridge writes is UTF-8, spelt the same way for the library to write.

use encoding_rs::Encoding;
use irc::proto::Message as IrcMessage;
use tracing::debug;

/// The encoding the IRC library is given: every byte maps to one character and back.
pub const LIBRARY_ENCODING: &str = "x-user-defined";

/// The private-use block `x-user-defined` maps bytes 0x80–0xFF to.
const HIGH_BYTES: u32 = 0xF700;

/// Decoding of one server's lines.
#[derive(Debug, Clone, Copy)]
pub struct Wire {
    fallback: &'static Encoding,
}

impl Default for Wire {
    fn default() -> Self {
        Wire { fallback: encoding_rs::WINDOWS_1252 }
    }
}

impl Wire {
    /// Lines that are not UTF-8 decoded as `fallback`.
    pub fn new(fallback: &'static Encoding) -> Wire {
        Wire { fallback }
    }

    /// A line as the server sent it: UTF-8, or the fallback encoding.
    pub fn decode(&self, message: IrcMessage) -> IrcMessage {
        let line = message.to_string();
        if line.is_ascii() {
            return message;
        }
        let Some(bytes) = line.chars().map(byte_of).collect::<Option<Vec<u8>>>() else {
            return message;
        };
        let text = match String::from_utf8(bytes) {
            Ok(text) => text,
            Err(e) => {
                let (text, _, _) = self.fallback.decode(e.as_bytes());
                debug!(encoding = self.fallback.name(), "a line that is not UTF-8 decoded with the fallback");
                text.into_owned()
            }
        };
        text.parse().unwrap_or(message)
    }

    /// A line to write as UTF-8, spelt for the library's encoding.
    pub fn encode(&self, message: IrcMessage) -> IrcMessage {
        let line = message.to_string();
        if line.is_ascii() {
            return message;
        }
        let spelt: String = line.bytes().map(char_of).collect();
        spelt.parse().unwrap_or(message)
    }
}

/// The byte a character of the library's encoding stands for.
fn byte_of(c: char) -> Option<u8> {
    match c as u32 {
        b @ 0..=0x7F => Some(b as u8),
        c @ 0xF780..=0xF7FF => Some((c - HIGH_BYTES) as u8),
        _ => None,
    }
}

/// The character of the library's encoding that stands for a byte.
fn char_of(b: u8) -> char {
    if b < 0x80 { char::from(b) } else { char::from_u32(HIGH_BYTES + u32::from(b)).unwrap_or('?') }
}

#[cfg(test)]
mod tests {
    use irc::proto::Command;

    use super::*;

    fn spelt(bytes: &[u8]) -> IrcMessage {
        bytes.iter().map(|&b| char_of(b)).collect::<String>().parse().expect("a valid line")
    }

    fn privmsg(text: &str) -> Command {
        Command::PRIVMSG("#t".to_owned(), text.to_owned())
    }

    #[test]
    fn utf8_lines_stay_utf8_and_others_use_the_fallback() {
        let wire = Wire::new(encoding_rs::WINDOWS_1252);
        let m = wire.decode(spelt(":bob!b@h PRIVMSG #t :caf\u{e9} \u{1f600}\r\n".as_bytes()));
        assert_eq!(m.command, privmsg("caf\u{e9} \u{1f600}"));
        let m = wire.decode(spelt(b":bob!b@h PRIVMSG #t :caf\xe9 cr\xe8me\r\n"));
        assert_eq!(m.command, privmsg("caf\u{e9} cr\u{e8}me"));
        let cyrillic =
            Wire::new(encoding_rs::WINDOWS_1251).decode(spelt(b":bob!b@h PRIVMSG #t :\xcf\xf0\xe8\xe2\xe5\xf2\r\n"));
        assert_eq!(cyrillic.command, privmsg("\u{41f}\u{440}\u{438}\u{432}\u{435}\u{442}"));
    }

    #[test]
    fn what_is_written_is_utf8_bytes_spelt_one_character_each() {
        let out = Wire::default().encode(privmsg("caf\u{e9} \u{1f600}").into()).to_string();
        let bytes: Vec<u8> = out.chars().map(|c| byte_of(c).expect("spelt")).collect();
        assert_eq!(bytes, "PRIVMSG #t :caf\u{e9} \u{1f600}\r\n".as_bytes());
    }
}
