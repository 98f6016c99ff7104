//! IRC server traffic → core events: the bytes are cut into lines and parsed
//! by the IRC codec the connection reads with, and each message goes through
//! the bridge's reader (`connection::Reader::handle`) on a connection whose
//! user asked to join `#Test` and `#other`.

#![no_main]

use bytes::BytesMut;
use irc::proto::{Command, IrcCodec, Message as IrcMessage};
use isthmus_core::jid::BareJid;
use isthmus_core::model::{ChatKind, Event, EventKind, NetworkId, is_carriable};
use isthmus_irc::format::irc_to_styling;
use isthmus_irc::fuzzing::Harness;
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;

const SERVER: &str = "irc.example.org";

fuzz_target!(|data: &[u8]| {
    let network = NetworkId::new("irc");
    let account: BareJid = "me@example.org".parse().expect("a valid JID");
    let mut harness = Harness::new(network.clone(), account.clone(), SERVER, "me");
    harness.connection().join("#Test", None).expect("the queue is open");
    harness.connection().join("#other", Some("key")).expect("the queue is open");

    let mut codec = IrcCodec::new("utf-8").expect("UTF-8 is a known encoding");
    let mut buf = BytesMut::from(data);
    buf.extend_from_slice(b"\r\n");
    while !buf.is_empty() {
        let before = buf.len();
        match codec.decode(&mut buf) {
            Ok(Some(message)) => {
                let expected = expected_message(&message);
                let events = harness.handle(message);
                for event in &events {
                    check_event(event, &network, &account);
                }
                if let Some(bodies) = expected {
                    let got: Vec<&str> = events
                        .iter()
                        .map(|e| match &e.kind {
                            EventKind::Message(m) => m.body.as_str(),
                            other => panic!("a message expected, got {other:?}"),
                        })
                        .collect();
                    assert_eq!(got, bodies);
                }
            }
            Ok(None) => break,
            // A line that does not parse ends the real connection; here it is skipped.
            Err(_) => assert!(buf.len() < before, "the codec consumed nothing"),
        }
    }
});

/// What a PRIVMSG or NOTICE must become, whoever sent it to whom (a channel,
/// us, or the server's chat for the rest): one message with the styled text,
/// the `ACTION` payload for a CTCP action, nothing for other CTCP requests.
fn expected_message(message: &IrcMessage) -> Option<Vec<String>> {
    let (Command::PRIVMSG(_, text) | Command::NOTICE(_, text)) = &message.command else { return None };
    Some(match text.strip_prefix("\u{1}ACTION ") {
        Some(action) => vec![irc_to_styling(action.trim_end_matches('\u{1}'))],
        None if text.starts_with('\u{1}') => vec![],
        None => vec![irc_to_styling(text)],
    })
}

/// Every event belongs to this connection's network and account, names its
/// chat and sender in `name%server` form, and once cleaned as the router cleans
/// it carries only text every network can carry.
fn check_event(event: &Event, network: &NetworkId, account: &BareJid) {
    assert_eq!(&event.origin, network);
    assert_eq!(&event.chat.network, network);
    assert_eq!(event.account.as_ref(), Some(account));
    let server_suffix = format!("%{SERVER}");
    match event.chat.kind {
        ChatKind::Room | ChatKind::Direct => assert!(event.chat.id.as_str().ends_with(&server_suffix), "{event:?}"),
        ChatKind::Service => assert_eq!(event.chat.id.as_str(), SERVER),
    }
    let sender_id = format!("{}{server_suffix}", event.sender.nick);
    assert!(
        event.sender.id.as_str() == sender_id
            || (event.chat.kind == ChatKind::Service && event.sender.id.as_str() == SERVER),
        "sender {:?} in {:?}",
        event.sender,
        event.chat
    );
    if let EventKind::Message(m) = &event.kind {
        assert!(
            !m.body.contains(['\u{2}', '\u{3}', '\u{4}', '\u{f}', '\u{11}', '\u{16}', '\u{1d}', '\u{1e}', '\u{1f}'])
        );
    }

    let mut cleaned = event.clone();
    cleaned.clean_text();
    for text in texts(&cleaned) {
        assert!(text.chars().all(is_carriable), "{text:?} left in {cleaned:?}");
    }
    let mut again = cleaned.clone();
    again.clean_text();
    assert_eq!(again, cleaned, "cleaning twice changed the event");
}

/// Every human-readable text of an event (the ids are not: they become JIDs
/// through their own checked escaping).
fn texts(event: &Event) -> Vec<&str> {
    let mut out = vec![event.sender.nick.as_str()];
    if let Some(q) = &event.context {
        out.extend([q.author.as_str(), q.text.as_str()]);
    }
    match &event.kind {
        EventKind::Message(m) | EventKind::Correction { message: m, .. } => {
            out.push(&m.body);
            out.extend(m.formatted.iter().map(|f| f.text.as_str()));
            out.extend(m.attachments.iter().filter_map(|a| a.name.as_deref()));
            if let Some(r) = &m.reply_to {
                out.extend(r.author.iter().chain(&r.quote).map(String::as_str));
            }
        }
        EventKind::Retraction { moderator, reason, .. } => {
            out.extend(moderator.iter().chain(reason).map(String::as_str))
        }
        EventKind::Reactions { emojis, .. } => out.extend(emojis.iter().map(String::as_str)),
        EventKind::SelfJoined { nick, occupants, topic } => {
            out.push(nick);
            out.extend(occupants.iter().map(|o| o.nick.as_str()));
            out.extend(topic.as_deref());
        }
        EventKind::JoinRequest { nick, .. } => out.push(nick),
        EventKind::JoinFailed { reason } => out.push(reason),
        EventKind::Joined { occupant } => out.push(&occupant.nick),
        EventKind::Left { reason, .. } => out.extend(reason.as_deref()),
        EventKind::NickChanged { new_nick } => out.push(new_nick),
        EventKind::Topic { text } | EventKind::Status { text } => out.push(text),
        EventKind::RoleChanged { .. } | EventKind::Typing(_) | EventKind::Displayed { .. } => {}
    }
    out
}
