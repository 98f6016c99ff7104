//! Room and user addresses on the IRC gateway that are misspelled or malformed: they
//! are refused with an error before anything reaches IRC, never taken for another
//! channel, nick or the server; well-formed ones answer from exactly the JID used.
//! Prosody, ngIRCd, and raw IRC clients watching what the gateway sends.

use std::time::Duration;

use anyhow::Result;
use isthmus_tests::scenario::{IRC_DOMAIN, IrcSetup, T};
use isthmus_tests::{IrcClient, XmppClient};

const MUC: &str = "http://jabber.org/protocol/muc";

/// Lines from the IRC server naming `nick` as the source of a command.
fn from_nick<'a>(lines: &'a [String], nick: &str) -> Vec<&'a String> {
    lines.iter().filter(|l| l.starts_with(&format!(":{nick}!"))).collect()
}

/// `WHOIS nick` by `observer`: the channels listed (319), or `None` when there is no such nick (401).
async fn whois_channels(observer: &mut IrcClient, nick: &str) -> Result<Option<String>> {
    observer.send_line(&format!("WHOIS {nick}")).await?;
    let mut channels = String::new();
    loop {
        let line = observer.expect_line(T, |l| [" 401 ", " 319 ", " 318 "].iter().any(|c| l.contains(c))).await?;
        if line.contains(" 401 ") {
            observer.expect_line(T, |l| l.contains(" 318 ")).await?;
            return Ok(None);
        }
        if line.contains(" 318 ") {
            return Ok(Some(channels));
        }
        if let Some((_, list)) = line.split_once(&format!(" {nick} :")) {
            channels += list;
        }
    }
}

async fn join_raw(alice: &mut XmppClient, room: &str, id: &str) -> Result<()> {
    alice.send_raw(&format!("<presence to='{room}/alice' id='{id}'><x xmlns='{MUC}'/></presence>")).await
}

#[tokio::test]
async fn escaped_room_jids_are_joined_exactly_or_refused() -> Result<()> {
    let s = IrcSetup::start("").await?;
    // bob sits in the channel a wrong decoding of `#acc\0ajoin` would join.
    let mut bob = IrcClient::connect(s.irc.port(), "bob").await?;
    bob.join("#acc\\0ajoin").await?;
    bob.drain(Duration::from_millis(500)).await?;
    let mut alice = XmppClient::connect(&s.prosody, "alice@localhost/r", "alicepass").await?;

    // Backslashes beginning no XEP-0106 escape, and an escape naming a space.
    for (i, local) in
        ["#acc\\0ajoin%127.0.0.1", "#acc\\zzjoin%127.0.0.1", "#acc\\", "#a\\20b%127.0.0.1"].iter().enumerate()
    {
        let room = format!("{local}@{IRC_DOMAIN}");
        let id = format!("bad{i}");
        join_raw(&mut alice, &room, &id).await?;
        let from = format!("{room}/alice");
        let err = alice.expect(T, |st| st.kind == "presence" && st.from == from).await?;
        assert_eq!(err.type_, "error", "{room} is refused: {}", err.xml);
        assert!(err.xml.contains("jid-malformed"), "{room}: jid-malformed: {}", err.xml);
        assert!(err.xml.contains("<text"), "{room}: with a text: {}", err.xml);
    }
    let seen = bob.drain(Duration::from_secs(2)).await?;
    assert!(from_nick(&seen, "alice").is_empty(), "nothing reached IRC: {seen:?}");
    assert_eq!(whois_channels(&mut bob, "alice").await?, None, "alice never connected to IRC");

    // The spelling the gateway gives `#acc\0ajoin`: joined, and answered from that very JID.
    let room = format!("#acc\\5c0ajoin%127.0.0.1@{IRC_DOMAIN}");
    join_raw(&mut alice, &room, "good").await?;
    let own = format!("{room}/alice");
    let me = alice.expect(T, |st| st.kind == "presence" && st.has_status(110)).await?;
    assert_eq!(me.from, own, "self-presence from the JID joined: {}", me.xml);
    assert!(me.type_.is_empty() || me.type_ == "available", "{}", me.xml);
    let line = bob.expect_line(T, |l| l.starts_with(":alice!") && l.contains("JOIN")).await?;
    assert!(line.ends_with("#acc\\0ajoin"), "alice joined the channel the JID names: {line}");
    alice.send_groupchat(&room, "through the escaped room").await?;
    let line = bob.expect_line(T, |l| l.contains("through the escaped room")).await?;
    assert!(line.starts_with(":alice!") && line.contains("PRIVMSG #acc\\0ajoin :"), "{line}");
    alice.disconnect().await;
    Ok(())
}

#[tokio::test]
async fn empty_or_malformed_irc_names_are_errors_and_reach_no_one() -> Result<()> {
    let s = IrcSetup::start("").await?;
    let mut bob = IrcClient::connect(s.irc.port(), "bob").await?;
    bob.join("#chan").await?;
    // alice is connected to the IRC server, in #other, so a raw command could go out.
    let mut alice = s.join("alice", "r", &format!("#other%127.0.0.1@{IRC_DOMAIN}"), "alice").await?;
    bob.drain(Duration::from_millis(500)).await?;

    // Messages: empty nick (not the server), nicks IRC cannot have or that name other targets.
    let to = ["%127.0.0.1", "\\3abob%127.0.0.1", "bob\\40127.0.0.1%127.0.0.1", "bob!x%127.0.0.1", "$*%127.0.0.1"];
    for (i, local) in to.iter().enumerate() {
        let id = format!("m{i}");
        alice
            .send_raw(&format!(
                "<message to='{local}@{IRC_DOMAIN}' type='chat' id='{id}'><body>PRIVMSG #chan :oops {i}</body></message>"
            ))
            .await?;
        let err = alice.expect(T, |st| st.kind == "message" && st.id == id).await?;
        assert_eq!(err.type_, "error", "{local}: {}", err.xml);
        assert!(err.xml.contains("item-not-found") || err.xml.contains("jid-malformed"), "{local}: {}", err.xml);
        assert!(err.xml.contains("not a valid address"), "{local}: says why: {}", err.xml);
        assert_eq!(err.from, format!("{local}@{IRC_DOMAIN}"), "the error is from the address written");
    }
    // Joins: a channel with no name after its `#`, a "channel" spelled as a nick with `:`.
    for (i, local) in ["#%127.0.0.1", "\\3a#chan%127.0.0.1", "%127.0.0.1"].iter().enumerate() {
        let id = format!("j{i}");
        join_raw(&mut alice, &format!("{local}@{IRC_DOMAIN}"), &id).await?;
        let from = format!("{local}@{IRC_DOMAIN}/alice");
        let err = alice.expect(T, |st| st.kind == "presence" && st.from == from).await?;
        assert_eq!(err.type_, "error", "{local}: {}", err.xml);
        assert!(err.xml.contains("jid-malformed"), "{local}: {}", err.xml);
    }

    let seen = bob.drain(Duration::from_secs(2)).await?;
    assert!(!seen.iter().any(|l| l.contains("oops")), "no body reached IRC: {seen:?}");
    assert!(from_nick(&seen, "alice").is_empty(), "alice sent nothing bob sees: {seen:?}");
    let channels = whois_channels(&mut bob, "alice").await?.unwrap_or_default();
    let channels: Vec<&str> =
        channels.split_whitespace().map(|c| c.trim_start_matches(['@', '+', '%', '~', '&'])).collect();
    assert_eq!(channels, ["#other"], "alice is only in #other");
    alice.disconnect().await;
    Ok(())
}
