//! Every scenario here runs against Prosody and against ejabberd.
//!
//! The first end-to-end path: a slixmpp client in an IRC channel through Isthmus
//! attached to Prosody as component `irc.localhost`, with a raw IRC client in the
//! channel on ngIRCd; and the same path again after Prosody restarts.

use std::time::Duration;

use anyhow::Result;
use isthmus_tests::scenario::{IrcSetup, T, room};
use isthmus_tests::{IrcClient, XmppClient, XmppServerKind};

/// alice joins through the gateway; bob (raw IRC) is in the channel; both directions asserted.
async fn both_ways(s: &IrcSetup, bob: &mut IrcClient, tag: &str) -> Result<XmppClient> {
    let room = room("#test");
    let mut alice = XmppClient::connect(&s.prosody, "alice@localhost/e2e", "alicepass").await?;
    alice.join(&room, "alice").await?;
    let own = format!("{room}/alice");
    let me = alice.expect(T, |st| st.kind == "presence" && st.from == own && st.has_status(110)).await?;
    assert!(me.type_.is_empty() || me.type_ == "available", "self-presence is available: {}", me.xml);
    // bob is listed as an occupant
    alice.expect(T, |st| st.kind == "presence" && st.from == format!("{room}/{}", bob.nick)).await?;

    let text = format!("hello from xmpp {tag}");
    alice.send_groupchat(&room, &text).await?;
    let line = bob.expect_line(T, |l| l.contains("PRIVMSG #test :") && l.contains(&text)).await?;
    assert!(line.starts_with(":alice!"), "sent by alice on IRC: {line}");
    assert!(line.ends_with(&format!("PRIVMSG #test :{text}")), "exact text: {line}");

    let reply = format!("reply from irc {tag}");
    bob.privmsg("#test", &reply).await?;
    let from = format!("{room}/{}", bob.nick);
    let m = alice.expect(T, |st| st.kind == "message" && st.body.as_deref() == Some(reply.as_str())).await?;
    assert_eq!(m.from, from, "sender is bob's occupant JID");
    assert_eq!(m.type_, "groupchat");
    Ok(alice)
}

async fn xmpp_and_irc_talk_through_the_gateway(xmpp: XmppServerKind) -> Result<()> {
    let s = IrcSetup::start_xmpp(xmpp, "").await?;
    let mut bob = IrcClient::connect(s.irc.port(), "bob").await?;
    bob.join("#test").await?;
    let alice = both_ways(&s, &mut bob, "first").await?;
    alice.disconnect().await;
    Ok(())
}

async fn gateway_reconnects_after_xmpp_server_restart(xmpp: XmppServerKind) -> Result<()> {
    let mut s = IrcSetup::start_xmpp(xmpp, "").await?;
    let mut bob = IrcClient::connect(s.irc.port(), "bob").await?;
    bob.join("#test").await?;
    let alice = both_ways(&s, &mut bob, "before").await?;
    drop(alice);

    if xmpp == XmppServerKind::Embedded {
        // The gateway is the server: restart it; clients log in again, same certificate.
        s.gateway.restart().await?;
        s.gateway.wait_log("accepting XMPP clients", 2, Duration::from_secs(30)).await?;
    } else {
        s.prosody.restart().await?;
        s.gateway.wait_log("component link established", 2, Duration::from_secs(30)).await?;
    }
    let alice = both_ways(&s, &mut bob, "after").await?;
    alice.disconnect().await;
    Ok(())
}

async fn only_allowed_jids_may_use_the_gateway(xmpp: XmppServerKind) -> Result<()> {
    let s = IrcSetup::start_xmpp(xmpp, "    allow: [alice@localhost]").await?;
    let room = room("#test");
    let mut bob = XmppClient::connect(&s.prosody, "bob@localhost/r", "bobpass").await?;
    bob.join(&room, "bob").await?;
    let err = bob.expect(T, |st| st.kind == "presence" && st.type_ == "error").await?;
    assert!(err.xml.contains("<forbidden"), "forbidden: {}", err.xml);
    assert!(err.xml.contains("not allowed"), "with a text: {}", err.xml);
    bob.send_raw(&format!("<message to='{room}' type='groupchat' id='x'><body>sneak</body></message>")).await?;
    let err = bob.expect(T, |st| st.kind == "message" && st.type_ == "error").await?;
    assert!(err.xml.contains("<forbidden"), "{}", err.xml);
    // alice is listed
    let alice = s.join("alice", "r", &room, "alice").await?;
    alice.disconnect().await;
    Ok(())
}

async fn encrypted_messages_are_refused_and_never_relayed(xmpp: XmppServerKind) -> Result<()> {
    let s = IrcSetup::start_xmpp(xmpp, "").await?;
    let mut bob = IrcClient::connect(s.irc.port(), "bob").await?;
    bob.join("#test").await?;
    let room = room("#test");
    let mut alice = s.join("alice", "r", &room, "alice").await?;
    let payloads = [
        "<encrypted xmlns='eu.siacs.conversations.axolotl'><header sid='1'><iv>AAAA</iv></header><payload>AAAA</payload></encrypted>",
        "<encrypted xmlns='urn:xmpp:omemo:2'><header sid='1'/><payload>AAAA</payload></encrypted>",
        "<openpgp xmlns='urn:xmpp:openpgp:0'>AAAA</openpgp>",
    ];
    for (i, p) in payloads.iter().enumerate() {
        let id = format!("enc{i}");
        alice
            .send_raw(&format!(
                "<message to='{room}' type='groupchat' id='{id}'><body>I sent you an encrypted message but your client doesn't seem to support that.</body>{p}</message>"
            ))
            .await?;
        let err = alice.expect(T, |st| st.kind == "message" && st.type_ == "error" && st.id == id).await?;
        assert!(err.xml.contains("cannot be bridged"), "explains why: {}", err.xml);
    }
    alice.send_groupchat(&room, "plain after encrypted").await?;
    let line = bob.expect_line(T, |l| l.contains("PRIVMSG #test")).await?;
    assert!(line.ends_with(":plain after encrypted"), "no fallback body reached IRC before it: {line}");
    Ok(())
}

async fn self_ping_and_version(xmpp: XmppServerKind) -> Result<()> {
    let s = IrcSetup::start_xmpp(xmpp, "").await?;
    let room = room("#test");
    let mut alice = s.join("alice", "r", &room, "alice").await?;
    alice.send_raw(&format!("<iq type='get' id='sp1' to='{room}/alice'><ping xmlns='urn:xmpp:ping'/></iq>")).await?;
    let pong = alice.expect(T, |st| st.kind == "iq" && st.id == "sp1").await?;
    assert_eq!(pong.type_, "result", "joined: {}", pong.xml);
    // another account that never joined is told it is not in the room
    let mut carol = XmppClient::connect(&s.prosody, "carol@localhost/r", "carolpass").await?;
    carol.send_raw(&format!("<iq type='get' id='sp2' to='{room}/carol'><ping xmlns='urn:xmpp:ping'/></iq>")).await?;
    let err = carol.expect(T, |st| st.kind == "iq" && st.id == "sp2").await?;
    assert_eq!(err.type_, "error");
    assert!(err.xml.contains("not-acceptable"), "{}", err.xml);
    alice.send_raw("<iq type='get' id='v1' to='irc.localhost'><query xmlns='jabber:iq:version'/></iq>").await?;
    let v = alice.expect(T, |st| st.kind == "iq" && st.id == "v1").await?;
    assert!(v.xml.contains("<name>Isthmus</name>"), "{}", v.xml);
    Ok(())
}

isthmus_tests::on_both_xmpp_servers!(
    xmpp_and_irc_talk_through_the_gateway,
    gateway_reconnects_after_xmpp_server_restart,
    only_allowed_jids_may_use_the_gateway,
    encrypted_messages_are_refused_and_never_relayed,
    self_ping_and_version
);
