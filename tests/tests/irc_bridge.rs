//! The IRC bridge end to end: real ngIRCd, real Prosody, slixmpp on the XMPP side
//! and a raw IRC client on the other.

use std::time::Duration;

use anyhow::Result;
use isthmus_tests::scenario::{IRC_DOMAIN, IrcSetup, T, room};
use isthmus_tests::{IrcClient, IrcServerKind};

fn privmsg_text<'a>(line: &'a str, target: &str) -> Option<&'a str> {
    let marker = format!(" PRIVMSG {target} :");
    line.find(&marker).map(|i| &line[i + marker.len()..])
}

async fn crlf_in_a_body_never_becomes_an_irc_command(kind: IrcServerKind) -> Result<()> {
    let s = IrcSetup::start_on(kind, "").await?;
    let mut bob = IrcClient::connect(s.irc.port(), "bob").await?;
    bob.join("#test").await?;
    bob.join("#other").await?;
    let room = room("#test");
    let mut alice = s.join("alice", "r", &room, "alice").await?;
    alice
        .send_raw(&format!(
            "<message to='{room}' type='groupchat' id='inj'><body>safe&#13;&#10;QUIT :x&#13;&#10;PRIVMSG #other :x</body></message>"
        ))
        .await?;
    for expected in ["safe", "QUIT :x", "PRIVMSG #other :x"] {
        let line = bob.expect_line(T, |l| privmsg_text(l, "#test") == Some(expected)).await?;
        assert!(line.starts_with(":alice!"), "{line}");
    }
    // still connected, and nothing reached #other
    alice.send_groupchat(&room, "still here").await?;
    bob.expect_line(T, |l| privmsg_text(l, "#test") == Some("still here")).await?;
    assert!(bob.expect_line(Duration::from_millis(500), |l| l.contains("#other :x")).await.is_err());
    assert!(bob.expect_line(Duration::from_millis(100), |l| l.contains("QUIT")).await.is_err(), "alice did not quit");
    Ok(())
}

async fn long_multibyte_message_is_split_on_line_and_char_boundaries(kind: IrcServerKind) -> Result<()> {
    let s = IrcSetup::start_on(kind, "").await?;
    let mut bob = IrcClient::connect(s.irc.port(), "bob").await?;
    bob.join("#test").await?;
    let room = room("#test");
    let mut alice = s.join("alice", "r", &room, "alice").await?;
    let body = "é€😀a".repeat(200); // 2,000 bytes, 2-, 3- and 4-byte characters
    assert_eq!(body.len(), 2000);
    alice.send_groupchat(&room, &body).await?;
    let mut received = String::new();
    let mut lines = 0;
    while received.len() < body.len() {
        let line = bob.expect_line(T, |l| privmsg_text(l, "#test").is_some()).await?;
        assert!(line.len() + 2 <= 512, "a relayed line fits in 512 bytes with CR LF: {} bytes", line.len() + 2);
        received.push_str(privmsg_text(&line, "#test").unwrap_or_default());
        lines += 1;
    }
    assert_eq!(received, body, "the pieces reassemble to the original");
    assert!(lines >= 4, "2,000 bytes need several lines (got {lines})");
    Ok(())
}

async fn nick_collision_gives_status_210_with_the_assigned_nick(kind: IrcServerKind) -> Result<()> {
    let s = IrcSetup::start_on(kind, "").await?;
    let mut squatter = IrcClient::connect(s.irc.port(), "alice").await?;
    squatter.join("#test").await?;
    let room = room("#test");
    let mut alice = isthmus_tests::XmppClient::connect(&s.prosody, "alice@localhost/r", "alicepass").await?;
    alice.join(&room, "alice").await?;
    let me = alice.expect(T, |st| st.kind == "presence" && st.has_status(110)).await?;
    assert_eq!(me.from, format!("{room}/alice_"), "the nick IRC assigned");
    assert!(me.has_status(210), "status 210: {}", me.xml);
    // the squatter appears under its own nick
    alice.expect(T, |st| st.kind == "presence" && st.from == format!("{room}/alice")).await?;
    Ok(())
}

async fn two_resources_share_one_irc_connection(kind: IrcServerKind) -> Result<()> {
    let s = IrcSetup::start_on(kind, "").await?;
    let mut bob = IrcClient::connect(s.irc.port(), "bob").await?;
    bob.join("#test").await?;
    let room = room("#test");
    let mut phone = s.join("alice", "phone", &room, "alice").await?;
    let mut laptop = s.join("alice", "laptop", &room, "alice").await?;
    bob.privmsg("#test", "to every device").await?;
    for c in [&mut phone, &mut laptop] {
        let m = c.expect(T, |st| st.body.as_deref() == Some("to every device")).await?;
        assert_eq!(m.from, format!("{room}/bob"));
    }
    // One IRC connection: the channel holds bob and one alice, and the server counts two users.
    bob.clear_buffer();
    bob.send_line("NAMES #test").await?;
    let names = bob.expect_line(T, |l| l.contains(" 353 ")).await?;
    let nicks: Vec<&str> = names.rsplit(':').next().unwrap_or("").split_whitespace().collect();
    let mut nicks: Vec<String> = nicks.iter().map(|n| n.trim_start_matches(['@', '+']).to_owned()).collect();
    nicks.sort();
    assert_eq!(nicks, vec!["alice", "bob"], "{names}");
    bob.send_line("LUSERS").await?;
    let lusers = bob.expect_line(T, |l| l.contains(" 251 ")).await?;
    assert!(lusers.contains("There are 2 users"), "{lusers}");
    // a message from one device reaches IRC once
    laptop.send_groupchat(&room, "from the laptop").await?;
    bob.expect_line(T, |l| privmsg_text(l, "#test") == Some("from the laptop")).await?;
    assert!(
        bob.expect_line(Duration::from_millis(500), |l| privmsg_text(l, "#test") == Some("from the laptop"))
            .await
            .is_err()
    );
    // and both devices see it reflected
    phone.expect(T, |st| st.body.as_deref() == Some("from the laptop")).await?;
    Ok(())
}

async fn irc_outage_queues_messages_and_delivers_them_in_order(kind: IrcServerKind) -> Result<()> {
    let mut s = IrcSetup::start_on(kind, "").await?;
    let mut bob = IrcClient::connect(s.irc.port(), "bob").await?;
    bob.join("#test").await?;
    let room = room("#test");
    let mut alice = s.join("alice", "r", &room, "alice").await?;

    s.irc.stop().await;
    let notice = alice
        .expect(T, |st| {
            st.kind == "message"
                && st.from == room
                && st.body.as_deref().is_some_and(|b| b.contains("Lost the connection"))
        })
        .await?;
    assert_eq!(notice.type_, "groupchat");
    let texts: Vec<String> = (0..5).map(|i| format!("during the outage {i}")).collect();
    for t in &texts {
        alice.send_groupchat(&room, t).await?;
    }
    s.irc.restart().await?;
    let mut bob = IrcClient::connect(s.irc.port(), "bob").await?;
    bob.join("#test").await?;
    let mut got = Vec::new();
    while got.len() < texts.len() {
        let line = bob
            .expect_line(Duration::from_secs(30), |l| {
                privmsg_text(l, "#test").is_some_and(|t| t.starts_with("during the outage"))
            })
            .await?;
        assert!(line.starts_with(":alice!"), "{line}");
        got.push(privmsg_text(&line, "#test").unwrap_or_default().to_owned());
    }
    assert_eq!(got, texts, "every message, in order");
    alice.expect(T, |st| st.from == room && st.body.as_deref().is_some_and(|b| b.contains("Reconnected"))).await?;
    // and the room works normally again
    bob.privmsg("#test", "welcome back").await?;
    alice.expect(T, |st| st.body.as_deref() == Some("welcome back")).await?;
    // Each was reflected once: a server's echo of a line queued during the outage is not bridged again.
    for t in &texts {
        let copies = alice.seen().iter().filter(|x| x.contains(&format!("<body>{t}</body>"))).count();
        assert_eq!(copies, 1, "{t:?} reached alice {copies} times");
    }
    Ok(())
}

async fn actions_private_messages_and_topics(kind: IrcServerKind) -> Result<()> {
    let s = IrcSetup::start_on(kind, "").await?;
    let mut bob = IrcClient::connect(s.irc.port(), "bob").await?;
    bob.join("#chat").await?; // first in: bob is operator
    bob.send_line("TOPIC #chat :the first topic").await?;
    bob.expect_line(T, |l| l.contains("TOPIC #chat")).await?;
    let room = room("#chat");
    let mut alice = isthmus_tests::XmppClient::connect(&s.prosody, "alice@localhost/r", "alicepass").await?;
    alice.join(&room, "alice").await?;
    // subject on join
    let subject = alice.expect(T, |st| st.kind == "message" && st.xml.contains("<subject")).await?;
    assert!(subject.xml.contains("the first topic"), "{}", subject.xml);
    // the operator is a moderator
    let op = alice.expect(T, |st| st.kind == "presence" && st.from == format!("{room}/bob")).await?;
    assert!(op.xml.contains("role=\"moderator\""), "{}", op.xml);

    // /me both ways
    alice.send_groupchat(&room, "/me waves").await?;
    bob.expect_line(T, |l| privmsg_text(l, "#chat") == Some("\u{1}ACTION waves\u{1}")).await?;
    bob.privmsg("#chat", "\u{1}ACTION dances\u{1}").await?;
    alice.expect(T, |st| st.body.as_deref() == Some("/me dances")).await?;

    // topic change
    bob.send_line("TOPIC #chat :a new topic").await?;
    let m = alice.expect(T, |st| st.kind == "message" && st.xml.contains("a new topic")).await?;
    assert_eq!(m.from, format!("{room}/bob"));

    // private messages both ways, bob as a contact nick%server@domain
    let bob_jid = format!("bob%127.0.0.1@{IRC_DOMAIN}");
    bob.privmsg("alice", "psst").await?;
    let pm = alice.expect(T, |st| st.kind == "message" && st.body.as_deref() == Some("psst")).await?;
    assert_eq!(pm.from, bob_jid);
    assert_eq!(pm.type_, "chat");
    alice.send_raw(&format!("<message to='{bob_jid}' type='chat' id='pm1'><body>hello bob</body></message>")).await?;
    let line = bob.expect_line(T, |l| privmsg_text(l, "bob") == Some("hello bob")).await?;
    assert!(line.starts_with(":alice!"), "{line}");

    // kick
    bob.send_line("KICK #chat alice :behave").await?;
    let kicked = alice.expect(T, |st| st.kind == "presence" && st.has_status(307)).await?;
    assert_eq!(kicked.type_, "unavailable");
    assert!(kicked.has_status(110), "it is alice's own presence: {}", kicked.xml);
    assert!(kicked.xml.contains("behave"), "{}", kicked.xml);
    Ok(())
}

isthmus_tests::on_both_irc_servers!(
    crlf_in_a_body_never_becomes_an_irc_command,
    long_multibyte_message_is_split_on_line_and_char_boundaries,
    nick_collision_gives_status_210_with_the_assigned_nick,
    two_resources_share_one_irc_connection,
    irc_outage_queues_messages_and_delivers_them_in_order,
    actions_private_messages_and_topics
);

async fn tls_verifies_certificates(kind: IrcServerKind) -> Result<()> {
    let s = IrcSetup::start_on(kind, "").await?;
    let mut bob = IrcClient::connect(s.irc.port(), "bob").await?;
    bob.join("#tls").await?;
    // `localhost` trusts the test CA: the TLS connection is verified and works.
    let room = room("#tls").replace("%127.0.0.1@", "%localhost@");
    let mut alice = s.join("alice", "r", &room, "alice").await?;
    alice.send_groupchat(&room, "over verified TLS").await?;
    bob.expect_line(T, |l| privmsg_text(l, "#tls") == Some("over verified TLS")).await?;
    // `unverified.localhost` is the same server without the CA: the certificate is refused,
    // and the user is told why.
    let bad = room.replace("%localhost@", "%unverified.localhost@");
    alice.join(&bad, "alice").await?;
    let err = alice.expect(T, |st| st.kind == "presence" && st.from.starts_with(&bad) && st.type_ == "error").await?;
    assert!(err.xml.to_lowercase().contains("certificate"), "the error names the certificate problem: {}", err.xml);
    Ok(())
}

isthmus_tests::on_both_irc_servers!(tls_verifies_certificates);

async fn invalid_utf8_from_irc_keeps_the_connection(kind: IrcServerKind) -> Result<()> {
    let s = IrcSetup::start_on(kind, "").await?;
    let mut bob = IrcClient::connect(s.irc.port(), "bob").await?;
    bob.join("#test").await?;
    let room = room("#test");
    let mut alice = s.join("alice", "r", &room, "alice").await?;
    bob.send_bytes(b"PRIVMSG #test :caf\xe9 \xff\xfe ok\r\n").await?;
    let m =
        alice.expect(T, |st| st.body.as_deref().is_some_and(|b| b.starts_with("caf") && b.ends_with(" ok"))).await?;
    assert_eq!(m.from, format!("{room}/bob"));
    bob.privmsg("#test", "after the bad bytes").await?;
    alice.expect(T, |st| st.body.as_deref() == Some("after the bad bytes")).await?;
    Ok(())
}

isthmus_tests::on_both_irc_servers!(invalid_utf8_from_irc_keeps_the_connection);

async fn formatting_maps_to_message_styling(kind: IrcServerKind) -> Result<()> {
    let s = IrcSetup::start_on(kind, "").await?;
    let mut bob = IrcClient::connect(s.irc.port(), "bob").await?;
    bob.join("#test").await?;
    let room = room("#test");
    let mut alice = s.join("alice", "r", &room, "alice").await?;
    bob.privmsg("#test", "\u{2}bold\u{2} \u{1d}it\u{1d} \u{3}4,2red\u{3} plain").await?;
    alice.expect(T, |st| st.body.as_deref() == Some("*bold* _it_ red plain")).await?;
    alice.send_groupchat(&room, "a *strong* word, 2*3*4").await?;
    bob.expect_line(T, |l| privmsg_text(l, "#test") == Some("a \u{2}strong\u{2} word, 2*3*4")).await?;
    Ok(())
}

isthmus_tests::on_both_irc_servers!(formatting_maps_to_message_styling);

/// IRCv3 where offered (InspIRCd): server-time becomes a XEP-0203 delay, msgid enters the id map.
/// Where not (ngIRCd): no delay, no ids.
async fn ircv3_server_time_and_msgid(kind: IrcServerKind) -> Result<()> {
    let s = IrcSetup::start_on(kind, "").await?;
    let mut bob = IrcClient::connect(s.irc.port(), "bob").await?;
    bob.join("#test").await?;
    let room = room("#test");
    let mut alice = s.join("alice", "r", &room, "alice").await?;
    bob.privmsg("#test", "tagged").await?;
    let m = alice.expect(T, |st| st.body.as_deref() == Some("tagged")).await?;
    let db = format!("sqlite://{}/isthmus.db", s.gateway.dir().display());
    let pool = sqlx::SqlitePool::connect(&db).await?;
    // Id map entries are written in the background, in batches: give them a moment.
    let expected = if kind == IrcServerKind::Inspircd { 1 } else { 0 };
    let mut ids = 0;
    for _ in 0..50 {
        (ids,) =
            sqlx::query_as("SELECT count(*) FROM message_map WHERE network = 'irc.localhost'").fetch_one(&pool).await?;
        if ids == expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    match kind {
        IrcServerKind::Inspircd => {
            assert!(m.xml.contains("urn:xmpp:delay"), "server-time gives a delay: {}", m.xml);
            assert!(s.gateway.log().contains("IRCv3 capabilities enabled"), "negotiated");
            assert_eq!(ids, 1, "the msgid is in the id map");
        }
        IrcServerKind::Ngircd => {
            assert!(!m.xml.contains("urn:xmpp:delay"), "no server-time, no delay: {}", m.xml);
            assert_eq!(ids, 0, "no msgid, nothing to map");
        }
    }
    Ok(())
}

isthmus_tests::on_both_irc_servers!(ircv3_server_time_and_msgid);

async fn server_commands_modes_and_subject(kind: IrcServerKind) -> Result<()> {
    let s = IrcSetup::start_on(kind, "").await?;
    let mut bob = IrcClient::connect(s.irc.port(), "bob").await?;
    bob.join("#modes").await?; // bob is operator
    let room = room("#modes");
    let mut alice = s.join("alice", "r", &room, "alice").await?;
    let own = format!("{room}/alice");

    // raw commands to the server's JID; the replies come back from it
    let server_jid = format!("127.0.0.1@{IRC_DOMAIN}");
    alice
        .send_raw(&format!("<message to='{server_jid}' type='chat' id='raw1'><body>WHOIS bob</body></message>"))
        .await?;
    let reply =
        alice.expect(T, |st| st.from == server_jid && st.body.as_deref().is_some_and(|b| b.contains("bob"))).await?;
    assert_eq!(reply.type_, "chat");

    // IRC modes become MUC roles
    bob.send_line("MODE #modes +v alice").await?;
    let voiced = alice
        .expect(T, |st| st.kind == "presence" && st.from == own && st.xml.contains("affiliation=\"member\""))
        .await?;
    assert!(voiced.has_status(110), "{}", voiced.xml);
    bob.send_line("MODE #modes +o alice").await?;
    alice.expect(T, |st| st.kind == "presence" && st.from == own && st.xml.contains("role=\"moderator\"")).await?;

    // now an operator, alice changes the subject from XMPP
    alice
        .send_raw(&format!(
            "<message to='{room}' type='groupchat' id='subj'><subject>set from xmpp</subject></message>"
        ))
        .await?;
    let line = bob.expect_line(T, |l| l.contains("TOPIC #modes")).await?;
    assert!(line.starts_with(":alice!") && line.ends_with(":set from xmpp"), "{line}");
    Ok(())
}

isthmus_tests::on_both_irc_servers!(server_commands_modes_and_subject);

async fn nick_change_from_xmpp(kind: IrcServerKind) -> Result<()> {
    let s = IrcSetup::start_on(kind, "").await?;
    let mut bob = IrcClient::connect(s.irc.port(), "bob").await?;
    bob.join("#test").await?;
    let room = room("#test");
    let mut alice = s.join("alice", "r", &room, "alice").await?;
    alice.send_raw(&format!("<presence to='{room}/alicia'/>")).await?;
    let line = bob.expect_line(T, |l| l.contains(" NICK ")).await?;
    assert!(line.starts_with(":alice!") && line.ends_with("alicia"), "{line}");
    let gone =
        alice.expect(T, |st| st.kind == "presence" && st.from == format!("{room}/alice") && st.has_status(303)).await?;
    assert_eq!(gone.type_, "unavailable");
    assert!(gone.has_status(110) && gone.xml.contains("nick=\"alicia\""), "{}", gone.xml);
    let back = alice.expect(T, |st| st.kind == "presence" && st.from == format!("{room}/alicia")).await?;
    assert!(back.has_status(110), "{}", back.xml);
    // messages now come from the new nick
    alice.send_groupchat(&room, "renamed").await?;
    let line = bob.expect_line(T, |l| privmsg_text(l, "#test") == Some("renamed")).await?;
    assert!(line.starts_with(":alicia!"), "{line}");
    Ok(())
}

isthmus_tests::on_both_irc_servers!(nick_change_from_xmpp);

async fn channel_keys_receipts_and_vcards(kind: IrcServerKind) -> Result<()> {
    let s = IrcSetup::start_on(kind, "").await?;
    let mut bob = IrcClient::connect(s.irc.port(), "bob").await?;
    bob.join("#locked").await?;
    bob.send_line("MODE #locked +k sesame").await?;
    bob.expect_line(T, |l| l.contains("MODE #locked +k")).await?;
    let room = room("#locked");
    let mut alice = isthmus_tests::XmppClient::connect(&s.prosody, "alice@localhost/r", "alicepass").await?;
    // without the key: refused, with the server's reason
    alice.join(&room, "alice").await?;
    let err = alice.expect(T, |st| st.kind == "presence" && st.type_ == "error").await?;
    assert!(err.xml.contains("<error"), "{}", err.xml);
    // the key is the room password
    alice.send_raw(&format!("<presence to='{room}/alice'><x xmlns='http://jabber.org/protocol/muc'><password>sesame</password></x></presence>")).await?;
    alice.expect(T, |st| st.kind == "presence" && st.has_status(110)).await?;

    // a private message asking for a receipt gets it once IRC accepted it
    let bob_jid = format!("bob%127.0.0.1@{IRC_DOMAIN}");
    alice
        .send_raw(&format!("<message to='{bob_jid}' type='chat' id='rq1'><body>receipt please</body><request xmlns='urn:xmpp:receipts'/></message>"))
        .await?;
    bob.expect_line(T, |l| privmsg_text(l, "bob") == Some("receipt please")).await?;
    let receipt = alice.expect(T, |st| st.kind == "message" && st.xml.contains("urn:xmpp:receipts")).await?;
    assert_eq!(receipt.from, bob_jid);
    assert!(receipt.xml.contains("id=\"rq1\""), "{}", receipt.xml);

    // puppets have a vCard with their IRC nick
    alice.send_raw(&format!("<iq type='get' id='vc1' to='{bob_jid}'><vCard xmlns='vcard-temp'/></iq>")).await?;
    let vcard = alice.expect(T, |st| st.kind == "iq" && st.id == "vc1").await?;
    assert_eq!(vcard.type_, "result", "{}", vcard.xml);
    assert!(vcard.xml.contains("<NICKNAME>bob</NICKNAME>"), "{}", vcard.xml);
    Ok(())
}

isthmus_tests::on_both_irc_servers!(channel_keys_receipts_and_vcards);

async fn a_resent_message_is_bridged_once_and_reflected_again(kind: IrcServerKind) -> Result<()> {
    let s = IrcSetup::start_on(kind, "").await?;
    let mut bob = IrcClient::connect(s.irc.port(), "bob").await?;
    bob.join("#test").await?;
    let room = room("#test");
    let mut alice = s.join("alice", "r", &room, "alice").await?;
    // The same message twice, as a client resends after a failed stream resumption.
    let stanza = format!(
        "<message to='{room}' type='groupchat' id='once'><body>only once</body>\
         <origin-id xmlns='urn:xmpp:sid:0' id='origin-once'/></message>"
    );
    alice.send_raw(&stanza).await?;
    let first = alice.expect(T, |st| st.id == "once" && st.body.as_deref() == Some("only once")).await?;
    alice.send_raw(&stanza).await?;
    let second = alice.expect(T, |st| st.id == "once" && st.body.as_deref() == Some("only once")).await?;
    let (first_id, second_id) = (first.stanza_id(), second.stanza_id());
    assert!(first_id.is_some(), "no stanza-id in {}", first.xml);
    assert_eq!(first_id, second_id, "the resend is reflected with the first one's stanza-id");
    // A different message afterwards arrives, and the resent one arrived once.
    alice.send_groupchat(&room, "next").await?;
    bob.expect_line(T, |l| privmsg_text(l, "#test") == Some("next")).await?;
    let copies = bob.seen().iter().filter(|l| privmsg_text(l, "#test") == Some("only once")).count();
    assert_eq!(copies, 1, "the resent message reached IRC {copies} times");
    Ok(())
}
isthmus_tests::on_both_irc_servers!(a_resent_message_is_bridged_once_and_reflected_again);

/// XEP-0085 chat states ↔ IRCv3 `+typing` (InspIRCd carries client tags; on
/// ngIRCd there is nothing to send, and nothing breaks).
async fn typing_notifications_both_ways_where_the_server_carries_them(kind: IrcServerKind) -> Result<()> {
    let s = IrcSetup::start_on(kind, "").await?;
    let tags = kind == IrcServerKind::Inspircd;
    let mut bob = if tags {
        IrcClient::connect_with_caps(s.irc.port(), "bob", &["message-tags"]).await?
    } else {
        IrcClient::connect(s.irc.port(), "bob").await?
    };
    bob.join("#test").await?;
    let room = room("#test");
    let mut alice = s.join("alice", "r", &room, "alice").await?;
    bob.expect_line(T, |l| l.starts_with(":alice") && l.contains(" JOIN ")).await?;
    let composing = "<composing xmlns='http://jabber.org/protocol/chatstates'/>";
    alice.send_raw(&format!("<message to='{room}' type='groupchat' id='cs1'>{composing}</message>")).await?;
    alice.send_groupchat(&room, "done typing").await?;
    let text = bob.expect_line(T, |l| privmsg_text(l, "#test") == Some("done typing")).await?;
    // InspIRCd sends the target as a trailing parameter: `TAGMSG :#test`.
    let typing = bob.seen().iter().find(|l| l.contains(" TAGMSG ") && l.ends_with("#test")).cloned();
    if tags {
        let typing = typing.ok_or_else(|| anyhow::anyhow!("no TAGMSG before {text}"))?;
        assert!(typing.starts_with("@") && typing.contains("+typing=active") && typing.contains(":alice!"), "{typing}");
        bob.send_line("@+typing=active TAGMSG #test").await?;
        let st = alice.expect(T, |st| st.from == format!("{room}/bob") && st.xml.contains("composing")).await?;
        assert!(st.body.is_none() && st.type_ == "groupchat", "{}", st.xml);
        bob.send_line("@+typing=done TAGMSG #test").await?;
        alice.expect(T, |st| st.from == format!("{room}/bob") && st.xml.contains("<active")).await?;
    } else {
        assert!(typing.is_none(), "{typing:?}");
    }
    // No error came back for the chat state.
    assert!(!alice.seen().iter().any(|x| x.contains("id=\"cs1\"") && x.contains("type=\"error\"")));
    Ok(())
}
isthmus_tests::on_both_irc_servers!(typing_notifications_both_ways_where_the_server_carries_them);

/// The gateway's room directory (disco#items on its domain) lists the channels of
/// the servers the user is connected to (IRC LIST), as room JIDs; a LIST the user
/// types to the server's JID still answers there.
async fn the_room_directory_lists_the_servers_channels(kind: IrcServerKind) -> Result<()> {
    let s = IrcSetup::start_on(kind, "").await?;
    let mut bob = IrcClient::connect(s.irc.port(), "bob").await?;
    bob.join("#listed").await?;
    bob.send_line("TOPIC #listed :the listed one").await?;
    let mut alice = s.join("alice", "r", &room("#dir"), "alice").await?;
    alice
        .send_raw(&format!(
            "<iq type='get' to='{IRC_DOMAIN}' id='dir1'><query xmlns='http://jabber.org/protocol/disco#items'/></iq>"
        ))
        .await?;
    let items = alice.expect(T, |st| st.kind == "iq" && st.id == "dir1").await?;
    assert_eq!(items.type_, "result", "{}", items.xml);
    let listed = room("#listed");
    assert!(items.xml.contains(&format!("jid=\"{listed}\"")), "#listed is in the directory: {}", items.xml);
    assert!(items.xml.contains("the listed one"), "with its topic: {}", items.xml);
    assert!(items.xml.contains(&format!("jid=\"{}\"", room("#dir"))), "{}", items.xml);

    let server_jid = format!("127.0.0.1@{IRC_DOMAIN}");
    alice.send_raw(&format!("<message to='{server_jid}' type='chat' id='list'><body>LIST</body></message>")).await?;
    alice.expect(T, |st| st.from == server_jid && st.body.as_deref().is_some_and(|b| b.contains("#listed"))).await?;
    Ok(())
}

isthmus_tests::on_both_irc_servers!(the_room_directory_lists_the_servers_channels);

/// The IRC ids the gateway's id map holds for the message `key` (written in
/// batches in the background: waits up to 5 s for `want` of them).
async fn mapped_irc_ids(s: &IrcSetup, key: &str, want: usize) -> Result<Vec<String>> {
    let db = format!("sqlite://{}/isthmus.db", s.gateway.dir().display());
    let pool = sqlx::SqlitePool::connect(&db).await?;
    let mut ids = Vec::new();
    for _ in 0..50 {
        ids = sqlx::query_as::<_, (String,)>(
            "SELECT remote_id FROM message_map WHERE network = 'irc.localhost' AND msg_key = ? ORDER BY part",
        )
        .bind(key)
        .fetch_all(&pool)
        .await?
        .into_iter()
        .map(|(id,)| id)
        .collect();
        if ids.len() >= want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(ids)
}

/// IRCv3 echo-message with labeled-response (InspIRCd): a message from XMPP is
/// confirmed by the server's echo, which brings the IRC msgid into the id map and
/// is not bridged again; the sender sees exactly one reflection and IRC one line.
/// Without echo-message (ngIRCd) the reflection comes with the server's answer to
/// the PING written after the line, and no id is mapped. A message the server
/// refuses comes back as an error of that message on both.
async fn echo_message_confirms_what_xmpp_sends(kind: IrcServerKind) -> Result<()> {
    let s = IrcSetup::start_on(kind, "").await?;
    let echoes = kind == IrcServerKind::Inspircd;
    let mut bob = IrcClient::connect_with_caps(s.irc.port(), "bob", &["message-tags"]).await?;
    bob.join("#test").await?;
    let room = room("#test");
    let mut alice = s.join("alice", "r", &room, "alice").await?;
    alice
        .send_raw(&format!("<message to='{room}' type='groupchat' id='e1'><body>echoed once</body></message>"))
        .await?;
    let reflection = alice.expect(T, |st| st.id == "e1" && st.body.as_deref() == Some("echoed once")).await?;
    assert_eq!(reflection.from, format!("{room}/alice"));
    let line = bob.expect_line(T, |l| privmsg_text(l, "#test") == Some("echoed once")).await?;
    // A fence: everything about the first message has arrived once this has.
    alice.send_groupchat(&room, "fence").await?;
    bob.expect_line(T, |l| privmsg_text(l, "#test") == Some("fence")).await?;
    alice.expect(T, |st| st.body.as_deref() == Some("fence")).await?;
    bob.privmsg("#test", "fence from irc").await?;
    alice.expect(T, |st| st.body.as_deref() == Some("fence from irc")).await?;
    let seen: Vec<&String> = alice.seen().iter().filter(|x| x.contains("echoed once")).collect();
    assert_eq!(seen.len(), 1, "the XMPP sender saw the message {} times: {seen:#?}", seen.len());
    let lines = bob.seen().iter().filter(|l| privmsg_text(l, "#test") == Some("echoed once")).count();
    assert_eq!(lines, 1, "IRC saw the message {lines} times");
    let key = reflection.stanza_id().ok_or_else(|| anyhow::anyhow!("no stanza-id in {}", reflection.xml))?;
    let ids = mapped_irc_ids(&s, &key, usize::from(echoes)).await?;
    let enabled = s.gateway.log().lines().find(|l| l.contains("IRCv3 capabilities enabled")).map(str::to_owned);
    if echoes {
        let enabled = enabled.unwrap_or_default();
        assert!(enabled.contains("echo-message") && enabled.contains("labeled-response"), "{enabled}");
        // The msgid the other IRC user saw is the one the echo brought into the id map.
        let msgid = line
            .strip_prefix('@')
            .and_then(|tags| tags.split(' ').next())
            .and_then(|tags| tags.split(';').find_map(|t| t.strip_prefix("msgid=")))
            .ok_or_else(|| anyhow::anyhow!("no msgid on {line}"))?;
        assert_eq!(ids, [msgid], "the id map holds the echo's msgid");
    } else {
        assert!(enabled.as_deref().is_none_or(|l| !l.contains("echo-message")), "{enabled:?}");
        assert!(ids.is_empty(), "no echo, no ids: {ids:?}");
    }
    // A message the server refuses: its error answers the message itself (matched by
    // label, or to the oldest line to that target that the server has not confirmed).
    let nobody = format!("nobody%127.0.0.1@{IRC_DOMAIN}");
    alice.send_raw(&format!("<message to='{nobody}' type='chat' id='e2'><body>anyone?</body></message>")).await?;
    let error = alice.expect(T, |st| st.id == "e2").await?;
    assert_eq!(error.type_, "error", "{}", error.xml);
    assert!(error.xml.contains("No such nick"), "{}", error.xml);
    Ok(())
}
isthmus_tests::on_both_irc_servers!(echo_message_confirms_what_xmpp_sends);

/// Lines that are not UTF-8 arrive decoded with the server's `encoding_fallback`:
/// latin-1 by default, another encoding where configured; UTF-8 lines stay UTF-8.
async fn lines_that_are_not_utf8_use_the_fallback_encoding(kind: IrcServerKind) -> Result<()> {
    let s = IrcSetup::start_on(kind, "").await?;
    let mut bob = IrcClient::connect(s.irc.port(), "bob").await?;
    bob.join("#test").await?;
    let room = room("#test");
    let mut alice = s.join("alice", "r", &room, "alice").await?;
    bob.send_bytes(b"PRIVMSG #test :caf\xe9 cr\xe8me br\xfbl\xe9e\r\n").await?;
    let m = alice.expect(T, |st| st.body.as_deref() == Some("café crème brûlée")).await?;
    assert_eq!(m.from, format!("{room}/bob"));
    bob.send_bytes("PRIVMSG #test :déjà vu, in UTF-8 😀\r\n".as_bytes()).await?;
    alice.expect(T, |st| st.body.as_deref() == Some("déjà vu, in UTF-8 😀")).await?;
    drop(alice);

    let s = IrcSetup::start_on_server(kind, "        encoding_fallback: windows-1251", "").await?;
    let mut bob = IrcClient::connect(s.irc.port(), "bob").await?;
    bob.join("#test").await?;
    let mut alice = s.join("alice", "r", &room, "alice").await?;
    bob.send_bytes(b"PRIVMSG #test :\xcf\xf0\xe8\xe2\xe5\xf2\r\n").await?;
    alice.expect(T, |st| st.body.as_deref() == Some("Привет")).await?;
    // What the gateway writes stays UTF-8.
    alice.send_groupchat(&room, "ответ").await?;
    bob.expect_line(T, |l| privmsg_text(l, "#test") == Some("ответ")).await?;
    Ok(())
}
isthmus_tests::on_both_irc_servers!(lines_that_are_not_utf8_use_the_fallback_encoding);

/// The server's JID on the test IRC server.
fn server_jid() -> String {
    format!("127.0.0.1@{IRC_DOMAIN}")
}

/// SASL PLAIN against InspIRCd with Atheme services: an account registered with
/// NickServ, the gateway logs in to it during registration and the server says so
/// (900 to the user, 330 in WHOIS).
#[tokio::test]
async fn sasl_plain_logs_in_to_the_services_account() -> Result<()> {
    let irc = isthmus_tests::peers::IrcServer::start_with_services().await?;
    let mut carol = IrcClient::connect(irc.port(), "carol").await?;
    carol.privmsg("NickServ", "REGISTER secretpw carol@example.org").await?;
    carol.expect_line(T, |l| l.starts_with(":NickServ!") && l.contains("registered")).await?;
    carol.send_line("QUIT").await?;
    let sasl = "        sasl: { mechanism: plain, username: carol, password: secretpw }";
    let s = IrcSetup::start_on_running(irc, sasl, "").await?;
    let mut bob = IrcClient::connect(s.irc.port(), "bob").await?;
    bob.join("#test").await?;
    let mut alice = s.join("alice", "r", &room("#test"), "alice").await?;
    alice
        .expect(T, |st| {
            st.from == server_jid() && st.body.as_deref().is_some_and(|b| b.contains("You are now logged in as carol"))
        })
        .await?;
    bob.send_line("WHOIS alice").await?;
    let account = bob.expect_line(T, |l| l.split(' ').nth(1) == Some("330")).await?;
    assert!(account.contains(" alice carol "), "{account}");
    assert!(s.gateway.log().contains("logged in with SASL"));
    Ok(())
}

/// A SASL login that fails reaches the user as a clear message, and the
/// connection goes on without the account; where the server offers no SASL
/// (ngIRCd) the user is told so.
async fn sasl_failure_reaches_the_user(kind: IrcServerKind) -> Result<()> {
    let irc = match kind {
        IrcServerKind::Inspircd => isthmus_tests::peers::IrcServer::start_with_services().await?,
        IrcServerKind::Ngircd => isthmus_tests::peers::IrcServer::start_kind(kind).await?,
    };
    let sasl = "        sasl: { mechanism: plain, username: carol, password: wrong }";
    let s = IrcSetup::start_on_running(irc, sasl, "").await?;
    let mut alice = s.join("alice", "r", &room("#test"), "alice").await?;
    let expected = match kind {
        IrcServerKind::Inspircd => "SASL PLAIN login as carol failed on 127.0.0.1",
        IrcServerKind::Ngircd => "127.0.0.1 does not offer SASL: not logged in as carol",
    };
    let m = alice
        .expect(T, |st| st.from == server_jid() && st.body.as_deref().is_some_and(|b| b.contains(expected)))
        .await?;
    assert!(m.body.as_deref().is_some_and(|b| b.contains("without logging in")), "{}", m.xml);
    // Still connected and in the room.
    let mut bob = IrcClient::connect(s.irc.port(), "bob").await?;
    bob.join("#test").await?;
    alice.send_groupchat(&room("#test"), "still here").await?;
    bob.expect_line(T, |l| privmsg_text(l, "#test") == Some("still here")).await?;
    Ok(())
}
isthmus_tests::on_both_irc_servers!(sasl_failure_reaches_the_user);

/// `on_connect` lines go out right after registration, before anything the user sends.
async fn on_connect_commands_are_sent_after_registration(kind: IrcServerKind) -> Result<()> {
    let on_connect = "        on_connect: [\"PRIVMSG bob :hello from on_connect\"]";
    let s = IrcSetup::start_on_server(kind, on_connect, "").await?;
    let mut bob = IrcClient::connect(s.irc.port(), "bob").await?;
    bob.join("#test").await?;
    let room = room("#test");
    let mut alice = s.join("alice", "r", &room, "alice").await?;
    let line = bob.expect_line(T, |l| privmsg_text(l, "bob") == Some("hello from on_connect")).await?;
    assert!(line.starts_with(":alice!"), "{line}");
    alice.send_groupchat(&room, "after on_connect").await?;
    bob.expect_line(T, |l| privmsg_text(l, "#test") == Some("after on_connect")).await?;
    Ok(())
}
isthmus_tests::on_both_irc_servers!(on_connect_commands_are_sent_after_registration);

/// IRC kicks reach XMPP as unavailable presences with status 307; a kick right
/// after a ban covering the victim (MODE +b) as a ban, status 301; the victim's
/// own presence carries 110 too.
async fn kicks_and_bans_become_muc_status_codes(kind: IrcServerKind) -> Result<()> {
    let s = IrcSetup::start_on(kind, "").await?;
    let mut bob = IrcClient::connect(s.irc.port(), "bob").await?;
    bob.join("#kb").await?; // first in: channel operator
    let room = room("#kb");
    let mut alice = s.join("alice", "r", &room, "alice").await?;
    let mut carol = s.join("carol", "r", &room, "carol").await?;
    carol.expect(T, |st| st.kind == "presence" && st.from == format!("{room}/alice")).await?;
    bob.expect_line(T, |l| l.starts_with(":carol!") && l.contains(" JOIN ")).await?;
    bob.send_line("MODE #kb +b alice!*@*").await?;
    bob.send_line("KICK #kb alice :banned").await?;
    let own = alice.expect(T, |st| st.kind == "presence" && st.from == format!("{room}/alice")).await?;
    assert!(own.xml.contains("unavailable") && own.xml.contains("code=\"301\""), "{}", own.xml);
    assert!(own.xml.contains("code=\"110\""), "{}", own.xml);
    let seen = carol.expect(T, |st| st.kind == "presence" && st.from == format!("{room}/alice")).await?;
    assert!(seen.xml.contains("unavailable") && seen.xml.contains("code=\"301\""), "{}", seen.xml);
    assert!(!seen.xml.contains("code=\"307\""), "{}", seen.xml);
    bob.send_line("KICK #kb carol :out").await?;
    let own = carol.expect(T, |st| st.kind == "presence" && st.from == format!("{room}/carol")).await?;
    assert!(own.xml.contains("unavailable") && own.xml.contains("code=\"307\""), "{}", own.xml);
    assert!(!own.xml.contains("code=\"301\""), "{}", own.xml);
    Ok(())
}
isthmus_tests::on_both_irc_servers!(kicks_and_bans_become_muc_status_codes);

/// After an IRC server restart every user of it reconnects, at most
/// `max_concurrent_connects` attempts at once (an attempt lasts until the server
/// registered it; InspIRCd takes about a second per registration, so attempts
/// queue): the gateway logs each attempt with how many are in flight.
#[tokio::test]
async fn reconnects_after_a_server_restart_stay_under_the_cap() -> Result<()> {
    let mut s = IrcSetup::start_on(IrcServerKind::Inspircd, "    max_concurrent_connects: 1").await?;
    let room = room("#test");
    let mut users = Vec::new();
    for user in ["alice", "bob", "carol"] {
        users.push(s.join(user, "r", &room, user).await?);
    }
    s.irc.restart().await?;
    for user in &mut users {
        user.expect(Duration::from_secs(60), |st| st.body.as_deref().is_some_and(|b| b.contains("Reconnected")))
            .await?;
    }
    let log = s.gateway.log();
    let attempts: Vec<(u32, usize)> = log
        .lines()
        .filter(|l| l.contains("connecting to the IRC server"))
        .filter_map(|l| {
            let field = |name: &str| l.split(&format!("{name}=")).nth(1)?.split(' ').next().map(str::to_owned);
            Some((field("attempt")?.parse().ok()?, field("in_flight")?.parse().ok()?))
        })
        .collect();
    let reconnects = attempts.iter().filter(|(attempt, _)| *attempt > 1).count();
    assert!(reconnects >= 3, "every user reconnected: {attempts:?}");
    let most = attempts.iter().map(|(_, in_flight)| *in_flight).max().unwrap_or(0);
    assert_eq!(most, 1, "at most 1 attempt in flight: {attempts:?}");
    let waited = log.matches("waiting for a connection slot").count();
    println!("connection attempts (attempt, in flight): {attempts:?}; {waited} waited for a slot");
    Ok(())
}

/// The `configure` command on the server's JID: listed there, its form sets the
/// nick the next connection uses (the IRC side sees the user arrive with it); the
/// chat form changes it again; an invalid nick or a password with a line break
/// is refused with the reason and changes nothing; passwords are never echoed.
#[tokio::test]
async fn configure_sets_the_nick_for_the_next_connection() -> Result<()> {
    let s = IrcSetup::start("").await?;
    let mut bob = IrcClient::connect(s.irc.port(), "bob").await?;
    bob.join("#conf").await?;
    let room = room("#conf");
    let server = server_jid();
    let mut alice = isthmus_tests::XmppClient::connect(&s.prosody, "alice@localhost/r", "alicepass").await?;
    let command = |id: &str, inner: &str| {
        format!(
            "<iq type='set' id='{id}' to='{server}'><command xmlns='http://jabber.org/protocol/commands' node='configure'{inner}</command></iq>"
        )
    };

    // listed on the server's JID
    alice
        .send_raw(&format!("<iq type='get' id='l1' to='{server}'><query xmlns='http://jabber.org/protocol/disco#items' node='http://jabber.org/protocol/commands'/></iq>"))
        .await?;
    let list = alice.expect(T, |st| st.kind == "iq" && st.id == "l1").await?;
    assert!(list.type_ == "result" && list.xml.contains("node=\"configure\""), "{}", list.xml);

    // the form, then a nick and a SASL password through it
    alice.send_raw(&command("c1", " action='execute'>")).await?;
    let form = alice.expect(T, |st| st.kind == "iq" && st.id == "c1").await?;
    assert!(form.xml.contains("status=\"executing\""), "{}", form.xml);
    for var in ["nick", "sasl_user", "sasl_password", "password", "on_connect"] {
        assert!(form.xml.contains(&format!("var=\"{var}\"")), "{var} in {}", form.xml);
    }
    assert!(form.xml.contains("text-private") && form.xml.contains("text-multi"), "{}", form.xml);
    let session =
        form.xml.split("sessionid=\"").nth(1).and_then(|t| t.split('"').next()).unwrap_or_default().to_owned();
    let submit = |id: &str, fields: &str| {
        command(id, &format!(" sessionid='{session}'><x xmlns='jabber:x:data' type='submit'>{fields}</x>"))
    };
    alice
        .send_raw(&submit(
            "c2",
            "<field var='nick'><value>wonder</value></field><field var='sasl_password'><value>pw-never-shown</value></field>",
        ))
        .await?;
    let done = alice.expect(T, |st| st.kind == "iq" && st.id == "c2").await?;
    assert!(done.xml.contains("status=\"completed\"") && done.xml.contains("nick: wonder"), "{}", done.xml);
    assert!(done.xml.contains("sasl_password: set") && !done.xml.contains("pw-never-shown"), "{}", done.xml);

    // the form shows the current values, never the password
    alice.send_raw(&command("c3", " action='execute'>")).await?;
    let form = alice.expect(T, |st| st.kind == "iq" && st.id == "c3").await?;
    assert!(form.xml.contains("<value>wonder</value>") && !form.xml.contains("pw-never-shown"), "{}", form.xml);

    // an invalid nick and a password with a line break: refused with the reason
    alice.send_raw(&submit("c4", "<field var='nick'><value>9lives</value></field>")).await?;
    let refused = alice.expect(T, |st| st.kind == "iq" && st.id == "c4").await?;
    assert!(refused.type_ == "error" && refused.xml.contains("`9lives` is not a valid IRC nick"), "{}", refused.xml);
    alice
        .send_raw(&submit(
            "c5",
            "<field var='nick'><value>other</value></field><field var='password'><value>a&#13;&#10;QUIT</value></field>",
        ))
        .await?;
    let refused = alice.expect(T, |st| st.kind == "iq" && st.id == "c5").await?;
    assert!(refused.type_ == "error" && refused.xml.contains("cannot contain line breaks"), "{}", refused.xml);

    // joining: IRC sees the configured nick, XMPP is told it was assigned (210)
    alice.join(&room, "alice").await?;
    let own = alice.expect(T, |st| st.kind == "presence" && st.from.starts_with(&room) && st.has_status(110)).await?;
    assert!(own.from.ends_with("/wonder") && own.has_status(210), "{}", own.xml);
    bob.expect_line(T, |l| l.starts_with(":wonder!") && l.contains("JOIN")).await?;

    // the chat form: an invalid nick changes nothing, a valid one is for the next connection
    let chat =
        |id: &str, body: &str| format!("<message to='{server}' type='chat' id='{id}'><body>{body}</body></message>");
    let from_server = |text: &'static str| {
        let server = server.clone();
        move |st: &isthmus_tests::xmpp::Stanza| {
            st.from == server && st.body.as_deref().is_some_and(|b| b.contains(text))
        }
    };
    alice.send_raw(&chat("m1", "configure nick=marvel sasl_user=x colour=red")).await?;
    alice.expect(T, from_server("Nothing changed: unknown setting `colour`")).await?;
    alice.send_raw(&chat("m2", "configure nick=bad,nick")).await?;
    alice.expect(T, from_server("Nothing changed: `bad,nick` is not a valid IRC nick")).await?;
    alice.send_raw(&chat("m3", "configure")).await?;
    let shown = alice.expect(T, from_server("Your settings here")).await?;
    let shown = shown.body.unwrap_or_default();
    assert!(shown.contains("nick: wonder") && shown.contains("sasl_user: (default)"), "{shown}");
    alice.send_raw(&chat("m4", "configure nick=marvel")).await?;
    alice.expect(T, from_server("nick: marvel")).await?;
    alice.send_raw(&format!("<message to='{IRC_DOMAIN}' type='chat' id='h1'><body>help</body></message>")).await?;
    let help = alice.expect(T, |st| st.from == IRC_DOMAIN && st.body.is_some()).await?;
    assert!(help.body.as_deref().is_some_and(|b| b.contains("configure name=value")), "{}", help.xml);

    // leave (the connection closes), join again: the new nick
    alice.send_raw(&format!("<presence to='{room}/wonder' type='unavailable'/>")).await?;
    bob.expect_line(T, |l| l.starts_with(":wonder!") && (l.contains("PART") || l.contains("QUIT"))).await?;
    alice.join(&room, "alice").await?;
    let own =
        alice.expect(T, |st| st.kind == "presence" && st.from == format!("{room}/marvel") && st.has_status(110)).await;
    let Ok(own) = own else {
        let log = s.gateway.log();
        panic!("{own:?}\n{}", &log[log.len().saturating_sub(6000)..]);
    };
    assert!(own.has_status(210), "{}", own.xml);
    bob.expect_line(T, |l| l.starts_with(":marvel!") && l.contains("JOIN")).await?;
    assert!(!s.gateway.log().contains("pw-never-shown"), "a password reached the log");
    Ok(())
}

/// SASL through `configure` (no SASL in the admin's configuration): the user's
/// services account on InspIRCd with Atheme is logged in to at the next connection.
#[tokio::test]
async fn configure_sasl_logs_in_to_the_users_services_account() -> Result<()> {
    let irc = isthmus_tests::peers::IrcServer::start_with_services().await?;
    let mut dave = IrcClient::connect(irc.port(), "dave").await?;
    dave.privmsg("NickServ", "REGISTER davepass1 dave@example.org").await?;
    dave.expect_line(T, |l| l.starts_with(":NickServ!") && l.contains("registered")).await?;
    dave.send_line("QUIT").await?;
    let s = IrcSetup::start_on_running(irc, "", "").await?;
    let mut alice = isthmus_tests::XmppClient::connect(&s.prosody, "alice@localhost/r", "alicepass").await?;
    let server = server_jid();
    alice
        .send_raw(&format!(
            "<message to='{server}' type='chat' id='m1'><body>configure sasl_user=dave sasl_password=davepass1</body></message>"
        ))
        .await?;
    let changed = alice.expect(T, |st| st.from == server && st.body.is_some()).await?;
    let text = changed.body.unwrap_or_default();
    assert!(text.contains("sasl_user: dave") && text.contains("sasl_password: set"), "{text}");
    assert!(!text.contains("davepass1"), "{text}");
    let mut bob = IrcClient::connect(s.irc.port(), "bob").await?;
    bob.join("#test").await?;
    alice.join(&room("#test"), "alice").await?;
    alice.expect(T, |st| st.kind == "presence" && st.from.starts_with(&room("#test")) && st.has_status(110)).await?;
    alice
        .expect(T, |st| {
            st.from == server && st.body.as_deref().is_some_and(|b| b.contains("You are now logged in as dave"))
        })
        .await?;
    bob.send_line("WHOIS alice").await?;
    let account = bob.expect_line(T, |l| l.split(' ').nth(1) == Some("330")).await?;
    assert!(account.contains(" alice dave "), "{account}");
    assert!(!s.gateway.log().contains("davepass1"), "a password reached the log");
    Ok(())
}

/// The server's JID of the test IRC server's TLS port.
fn tls_server_jid() -> String {
    format!("localhost@{IRC_DOMAIN}")
}

/// The SASL EXTERNAL settings for a certificate, as server YAML (indented 8).
fn sasl_external(cert: &isthmus_tests::peers::ClientCertificate) -> String {
    format!(
        "        sasl: {{ mechanism: external, client_cert: \"{}\", client_key: \"{}\" }}",
        cert.cert.display(),
        cert.key.display()
    )
}

/// SASL EXTERNAL against InspIRCd (TLS, gnutls) with Atheme: the fingerprint of
/// a client certificate is added to a NickServ account; the gateway presents the
/// certificate on its TLS connection and logs in to that account with it (900
/// to the user, 330 in WHOIS).
#[tokio::test]
async fn sasl_external_logs_in_with_the_client_certificate() -> Result<()> {
    let certs = tempfile::tempdir()?;
    let cert = isthmus_tests::peers::client_certificate(certs.path(), "gateway")?;
    let irc = isthmus_tests::peers::IrcServer::start_with_services().await?;
    let mut erin = IrcClient::connect(irc.port(), "erin").await?;
    erin.privmsg("NickServ", "REGISTER erinpass1 erin@example.org").await?;
    erin.expect_line(T, |l| l.starts_with(":NickServ!") && l.contains("registered")).await?;
    erin.privmsg("NickServ", &format!("CERT ADD {}", cert.fingerprint)).await?;
    let added = erin.expect_line(T, |l| l.starts_with(":NickServ!") && l.contains(&cert.fingerprint)).await?;
    assert!(added.contains("Added"), "{added}");
    erin.send_line("QUIT").await?;

    let s = IrcSetup::start_on_running_tls(irc, &sasl_external(&cert)).await?;
    let mut bob = IrcClient::connect(s.irc.port(), "bob").await?;
    bob.join("#test").await?;
    let room = room("#test").replace("%127.0.0.1@", "%localhost@");
    let mut alice = s.join("alice", "r", &room, "alice").await?;
    alice
        .expect(T, |st| {
            st.from == tls_server_jid()
                && st.body.as_deref().is_some_and(|b| b.contains("You are now logged in as erin"))
        })
        .await?;
    bob.send_line("WHOIS alice").await?;
    let account = bob.expect_line(T, |l| l.split(' ').nth(1) == Some("330")).await?;
    assert!(account.contains(" alice erin "), "{account}");
    alice.send_groupchat(&room, "logged in by certificate").await?;
    bob.expect_line(T, |l| privmsg_text(l, "#test") == Some("logged in by certificate")).await?;
    let log = s.gateway.log();
    assert!(log.contains("logged in with SASL") && log.contains("EXTERNAL"), "{log}");
    Ok(())
}

/// SASL EXTERNAL with a certificate no account knows: the user is told on the
/// server's JID what failed and what to check, stays connected and in the room
/// without the account, and the gateway does not retry in a loop.
#[tokio::test]
async fn sasl_external_with_an_unknown_certificate_says_so() -> Result<()> {
    let certs = tempfile::tempdir()?;
    let cert = isthmus_tests::peers::client_certificate(certs.path(), "stranger")?;
    let irc = isthmus_tests::peers::IrcServer::start_with_services().await?;
    let s = IrcSetup::start_on_running_tls(irc, &sasl_external(&cert)).await?;
    let mut bob = IrcClient::connect(s.irc.port(), "bob").await?;
    bob.join("#test").await?;
    let room = room("#test").replace("%127.0.0.1@", "%localhost@");
    let mut alice = s.join("alice", "r", &room, "alice").await?;
    let failed = alice
        .expect(T, |st| {
            st.from == tls_server_jid()
                && st.body.as_deref().is_some_and(|b| {
                    b.contains("SASL EXTERNAL login as the client certificate's account failed on localhost")
                })
        })
        .await?;
    let text = failed.body.unwrap_or_default();
    assert!(text.contains("without logging in") && text.contains("NickServ CERT ADD"), "{text}");
    bob.send_line("WHOIS alice").await?;
    let end = bob.expect_line(T, |l| l.split(' ').nth(1) == Some("318")).await?;
    assert!(!bob.seen().iter().any(|l| l.split(' ').nth(1) == Some("330")), "no account: {end}");
    alice.send_groupchat(&room, "still here").await?;
    bob.expect_line(T, |l| privmsg_text(l, "#test") == Some("still here")).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(s.gateway.log().matches("connecting to the IRC server").count(), 1, "one connection, no retries");
    Ok(())
}

/// The SHA-256 fingerprint in the gateway's answer to `configure certfp=…`.
fn sha256_fingerprint(answer: &str) -> String {
    let line = answer.lines().find_map(|l| l.strip_prefix("SHA-256 fingerprint: ")).unwrap_or_default();
    line.trim().to_owned()
}

/// Per-user SASL EXTERNAL on InspIRCd (TLS, gnutls, `hash="sha256"`) with Atheme,
/// no SASL in the admin's configuration: the user registers a services account
/// from XMPP through the server's JID, has the gateway make a client certificate
/// (`configure certfp=generate`), adds its fingerprint with NickServ CERT ADD, and
/// the next connection presents the certificate and logs in with it (900 on the
/// server's JID, 330 in WHOIS). Asking again shows the same fingerprint; the
/// private key is never shown nor logged.
#[tokio::test]
async fn configure_certfp_logs_in_with_a_generated_certificate() -> Result<()> {
    let irc = isthmus_tests::peers::IrcServer::start_with_services().await?;
    let s = IrcSetup::start_on_running_tls(irc, "").await?;
    let mut bob = IrcClient::connect(s.irc.port(), "bob").await?;
    bob.join("#test").await?;
    let room = room("#test").replace("%127.0.0.1@", "%localhost@");
    let server = tls_server_jid();
    let chat =
        |id: &str, body: &str| format!("<message to='{server}' type='chat' id='{id}'><body>{body}</body></message>");
    let mut alice = s.join("alice", "r", &room, "alice").await?;
    bob.expect_line(T, |l| l.starts_with(":alice!") && l.contains(" JOIN ")).await?;

    // a services account, from XMPP through the server's JID
    alice.send_raw(&chat("r1", "PRIVMSG NickServ :REGISTER alicepw1 alice@example.org")).await?;
    alice.expect(T, |st| st.body.as_deref().is_some_and(|b| b.contains("registered"))).await?;
    // (registering logs this connection in: that is not the certificate's doing)
    alice
        .expect(T, |st| st.from == server && st.body.as_deref().is_some_and(|b| b.contains("logged in as alice")))
        .await?;

    // the certificate: its fingerprint and what to do with it, never the key
    alice.send_raw(&chat("c1", "configure certfp=generate")).await?;
    let answer =
        alice.expect(T, |st| st.from == server && st.body.as_deref().is_some_and(|b| b.contains("certfp"))).await?;
    let text = answer.body.unwrap_or_default();
    let fingerprint = sha256_fingerprint(&text);
    assert!(fingerprint.len() == 64 && fingerprint.chars().all(|c| c.is_ascii_hexdigit()), "{text}");
    assert!(text.contains(&format!("PRIVMSG NickServ :CERT ADD {fingerprint}")), "{text}");
    assert!(text.contains("SHA-512 fingerprint: "), "{text}");
    assert!(text.find("SHA-256") < text.find("SHA-512"), "SHA-256 first: {text}");
    assert!(!text.contains("PRIVATE KEY"), "{text}");

    // asked again: the same certificate; `configure` shows it too
    alice.send_raw(&chat("c2", "configure certfp=generate")).await?;
    let again =
        alice.expect(T, |st| st.from == server && st.body.as_deref().is_some_and(|b| b.contains("certfp"))).await?;
    let again = again.body.unwrap_or_default();
    assert!(again.starts_with("Nothing changed") && sha256_fingerprint(&again) == fingerprint, "{again}");
    alice.send_raw(&chat("c3", "configure")).await?;
    let shown = alice
        .expect(T, |st| st.from == server && st.body.as_deref().is_some_and(|b| b.contains("Your settings")))
        .await?;
    let shown = shown.body.unwrap_or_default();
    assert!(shown.contains(&format!("certfp: {fingerprint}")), "{shown}");

    // registered with the account, from XMPP
    alice.send_raw(&chat("r2", &format!("PRIVMSG NickServ :CERT ADD {fingerprint}"))).await?;
    let added =
        alice.expect(T, |st| st.from != server && st.body.as_deref().is_some_and(|b| b.contains(&fingerprint))).await?;
    assert!(added.body.as_deref().is_some_and(|b| b.contains("Added")), "{}", added.xml);

    // leave (the connection closes), join again: logged in by the certificate
    alice.send_raw(&format!("<presence to='{room}/alice' type='unavailable'/>")).await?;
    bob.expect_line(T, |l| l.starts_with(":alice!") && (l.contains("PART") || l.contains("QUIT"))).await?;
    alice.clear_buffer();
    alice.join(&room, "alice").await?;
    let joined =
        alice.expect(T, |st| st.kind == "presence" && st.from == format!("{room}/alice") && st.has_status(110)).await;
    if let Err(e) = joined {
        let log = s.gateway.log();
        panic!("{e}\n{}", &log[log.len().saturating_sub(8000)..]);
    }
    alice
        .expect(T, |st| {
            st.from == server && st.body.as_deref().is_some_and(|b| b.contains("You are now logged in as alice"))
        })
        .await?;
    bob.expect_line(T, |l| l.starts_with(":alice!") && l.contains(" JOIN ")).await?;
    bob.send_line("WHOIS alice").await?;
    let account = bob.expect_line(T, |l| l.split(' ').nth(1) == Some("330")).await?;
    assert!(account.contains(" alice alice "), "{account}");
    let log = s.gateway.log();
    assert!(log.contains("logged in with SASL") && log.contains("EXTERNAL"), "{log}");
    assert!(!log.contains("PRIVATE KEY"), "the private key reached the log");
    Ok(())
}

/// A client certificate on a server the gateway reaches without TLS is refused
/// with the reason, through the chat command and the ad-hoc form, and nothing
/// changes.
#[tokio::test]
async fn configure_certfp_without_tls_is_refused() -> Result<()> {
    let s = IrcSetup::start("").await?;
    let server = server_jid();
    let mut alice = isthmus_tests::XmppClient::connect(&s.prosody, "alice@localhost/r", "alicepass").await?;
    alice
        .send_raw(&format!(
            "<message to='{server}' type='chat' id='m1'><body>configure certfp=generate</body></message>"
        ))
        .await?;
    let refused = alice.expect(T, |st| st.from == server && st.body.is_some()).await?;
    let text = refused.body.unwrap_or_default();
    assert!(text.starts_with("Nothing changed: a client certificate needs TLS"), "{text}");
    assert!(text.contains("127.0.0.1 without TLS") && text.contains("sasl_user"), "{text}");

    let command = |id: &str, inner: &str| {
        format!(
            "<iq type='set' id='{id}' to='{server}'><command xmlns='http://jabber.org/protocol/commands' node='configure'{inner}</command></iq>"
        )
    };
    alice.send_raw(&command("c1", " action='execute'>")).await?;
    let form = alice.expect(T, |st| st.kind == "iq" && st.id == "c1").await?;
    assert!(form.xml.contains("var=\"certfp\""), "{}", form.xml);
    let session =
        form.xml.split("sessionid=\"").nth(1).and_then(|t| t.split('"').next()).unwrap_or_default().to_owned();
    alice
        .send_raw(&command(
            "c2",
            &format!(
                " sessionid='{session}'><x xmlns='jabber:x:data' type='submit'><field var='certfp'><value>generate</value></field></x>"
            ),
        ))
        .await?;
    let refused = alice.expect(T, |st| st.kind == "iq" && st.id == "c2").await?;
    assert!(refused.type_ == "error" && refused.xml.contains("needs TLS"), "{}", refused.xml);

    alice.send_raw(&format!("<message to='{server}' type='chat' id='m2'><body>configure</body></message>")).await?;
    let shown = alice
        .expect(T, |st| st.from == server && st.body.as_deref().is_some_and(|b| b.contains("Your settings")))
        .await?;
    let shown = shown.body.unwrap_or_default();
    assert!(shown.contains("certfp: (default)"), "nothing changed: {shown}");
    Ok(())
}

/// A server password (PASS) on ngIRCd: with the wrong one the join fails with
/// the server's reason (the room join error and a message from the server's JID),
/// once, without retrying; the user sets the right one with `configure` and the
/// next join works, and what the user says reaches IRC.
#[tokio::test]
async fn server_password_wrong_then_right() -> Result<()> {
    let irc = isthmus_tests::peers::IrcServer::start_ngircd_with_password("letmein").await?;
    let s = IrcSetup::start_on_running(irc, "        password: wrong", "").await?;
    let mut bob = IrcClient::connect_with_password(s.irc.port(), "bob", "letmein").await?;
    bob.join("#test").await?;
    let room = room("#test");
    let server = server_jid();
    let mut alice = isthmus_tests::XmppClient::connect(&s.prosody, "alice@localhost/r", "alicepass").await?;
    alice.join(&room, "alice").await?;
    let refused =
        alice.expect(T, |st| st.kind == "presence" && st.from.starts_with(&room) && st.type_ == "error").await?;
    assert!(refused.xml.contains("did not let us log in"), "{}", refused.xml);
    assert!(refused.xml.to_lowercase().contains("password"), "the error names the password: {}", refused.xml);
    let told = alice.expect(T, |st| st.from == server && st.body.is_some()).await?;
    assert!(told.body.as_deref().is_some_and(|b| b.contains("did not let us log in")), "{}", told.xml);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        s.gateway.log().matches("connecting to the IRC server").count(),
        1,
        "no retries with a refused password"
    );

    alice
        .send_raw(&format!(
            "<message to='{server}' type='chat' id='p1'><body>configure password=letmein</body></message>"
        ))
        .await?;
    alice.expect(T, |st| st.from == server && st.body.as_deref().is_some_and(|b| b.contains("password: set"))).await?;
    alice.join(&room, "alice").await?;
    alice.expect(T, |st| st.kind == "presence" && st.from == format!("{room}/alice") && st.has_status(110)).await?;
    bob.expect_line(T, |l| l.starts_with(":alice!") && l.contains(" JOIN ")).await?;
    alice.send_groupchat(&room, "with the right password").await?;
    bob.expect_line(T, |l| privmsg_text(l, "#test") == Some("with the right password")).await?;
    assert!(!s.gateway.log().contains("letmein"), "a password reached the log");
    Ok(())
}

/// Leaving a room and joining it again at once, several times in a row: every
/// join gets its self-presence (110) under the same nick, whether the leave
/// closed the IRC connection (the last channel on the server) or not (another
/// channel keeps it open). The server's late answers to the leave (PART, the old
/// connection's QUIT) must not end the new stay.
async fn leave_and_rejoin_at_once_gets_the_self_presence_every_time(kind: IrcServerKind) -> Result<()> {
    let s = IrcSetup::start_on(kind, "").await?;
    let mut bob = IrcClient::connect(s.irc.port(), "bob").await?;
    bob.join("#race").await?;
    let room = room("#race");
    let mut alice = s.join("alice", "r", &room, "alice").await?;
    let own = |room: String| {
        move |st: &isthmus_tests::xmpp::Stanza| {
            st.kind == "presence"
                && st.from == format!("{room}/alice")
                && st.has_status(110)
                && !st.xml.contains("unavailable")
        }
    };
    let mut keeper = None;
    for keep_open in [false, true] {
        if keep_open {
            // another device of alice's in another channel on the server keeps the connection open
            keeper = Some(s.join("alice", "other", &isthmus_tests::scenario::room("#keep"), "alice").await?);
        }
        for round in 0..5 {
            alice.send_raw(&format!("<presence to='{room}/alice' type='unavailable'/>")).await?;
            alice.join(&room, "alice").await?;
            let joined = alice.expect(T, own(room.clone())).await;
            if let Err(e) = joined {
                let log = s.gateway.log();
                panic!("round {round} (keep_open: {keep_open}): {e}\n{}", &log[log.len().saturating_sub(6000)..]);
            }
            // the room works: a message from IRC arrives
            bob.privmsg("#race", &format!("round {round} {keep_open}")).await?;
            alice.expect(T, |st| st.body.as_deref() == Some(format!("round {round} {keep_open}").as_str())).await?;
        }
    }
    drop(keeper);
    Ok(())
}
isthmus_tests::on_both_irc_servers!(leave_and_rejoin_at_once_gets_the_self_presence_every_time);

/// A room message the IRC server refuses (InspIRCd with echo-message and labels:
/// 404 on a moderated channel) comes back to the sender as an error instead of
/// a reflection, never reaches IRC, and stays out of the room's history, while
/// what was said stays in it.
#[tokio::test]
async fn a_refused_room_message_is_an_error_and_stays_out_of_the_history() -> Result<()> {
    let s = IrcSetup::start_on(IrcServerKind::Inspircd, "").await?;
    let mut bob = IrcClient::connect(s.irc.port(), "bob").await?;
    bob.join("#mod").await?;
    bob.send_line("MODE #mod +m").await?;
    bob.expect_line(T, |l| l.contains(" MODE #mod ") && l.contains("+m")).await?;
    let room = room("#mod");
    let mut alice = s.join("alice", "r", &room, "alice").await?;
    alice
        .send_raw(&format!("<message to='{room}' type='groupchat' id='x1'><body>not allowed</body></message>"))
        .await?;
    let error = alice.expect(T, |st| st.id == "x1").await?;
    assert_eq!(error.type_, "error", "{}", error.xml);
    assert!(error.xml.contains("#mod"), "the server's reason: {}", error.xml);
    bob.send_line("MODE #mod +v alice").await?;
    alice
        .expect(T, |st| {
            st.kind == "presence" && st.from == format!("{room}/alice") && st.xml.contains("affiliation=\"member\"")
        })
        .await?;
    alice
        .send_raw(&format!("<message to='{room}' type='groupchat' id='x2'><body>allowed now</body></message>"))
        .await?;
    alice.expect(T, |st| st.id == "x2" && st.type_ == "groupchat").await?;
    bob.privmsg("#mod", "from bob").await?;
    alice.expect(T, |st| st.body.as_deref() == Some("from bob")).await?;
    assert!(!bob.seen().iter().any(|l| l.contains("not allowed")), "the refused message reached IRC");

    let mut phone = isthmus_tests::XmppClient::connect(&s.prosody, "alice@localhost/phone", "alicepass").await?;
    phone.join_with_history(&room, "alice", 20).await?;
    phone.expect(T, |st| st.body.as_deref() == Some("from bob")).await?;
    let history: Vec<String> = phone.seen().iter().filter(|x| x.contains("<body>")).cloned().collect();
    assert!(history.iter().any(|x| x.contains("allowed now")), "{history:#?}");
    assert!(!history.iter().any(|x| x.contains("not allowed")), "the refused message is in the history: {history:#?}");
    Ok(())
}

/// The value of attribute `name` in the first `<tag …>` of `xml`.
fn first_attr(xml: &str, tag: &str, name: &str) -> Option<String> {
    let start = xml.find(&format!("<{tag} "))?;
    let element = &xml[start..start + xml[start..].find('>')?];
    let value = &element[element.find(&format!(" {name}=\""))? + name.len() + 3..];
    Some(value.split('"').next()?.to_owned())
}

/// The gateway domain is a room service too (`conference/irc`, as Biboumi), so
/// clients offer it where they look for rooms; the capabilities of its presence
/// verify against that answer.
#[tokio::test]
async fn the_gateway_domain_is_a_room_service_with_matching_caps() -> Result<()> {
    let s = IrcSetup::start_on(IrcServerKind::Ngircd, "").await?;
    let mut alice = isthmus_tests::XmppClient::connect(&s.prosody, "alice@localhost/r", "alicepass").await?;
    alice
        .send_raw(&format!(
            "<iq type='get' id='gw1' to='{IRC_DOMAIN}'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>"
        ))
        .await?;
    let info = alice.expect(T, |st| st.kind == "iq" && st.id == "gw1").await?;
    assert_eq!(info.type_, "result", "{}", info.xml);
    let identities: Vec<(String, String)> = info
        .xml
        .split("<identity ")
        .skip(1)
        .map(|i| {
            let tag = format!("<identity {i}");
            (
                first_attr(&tag, "identity", "category").unwrap_or_default(),
                first_attr(&tag, "identity", "type").unwrap_or_default(),
            )
        })
        .collect();
    assert!(identities.contains(&("conference".into(), "irc".into())), "{identities:?}: {}", info.xml);
    assert!(identities.contains(&("gateway".into(), "irc".into())), "{identities:?}: {}", info.xml);
    assert!(info.xml.contains("var=\"http://jabber.org/protocol/muc\""), "{}", info.xml);

    alice.send_raw(&format!("<presence to='{IRC_DOMAIN}' type='subscribe'/>")).await?;
    let p = alice
        .expect(T, |st| {
            st.kind == "presence" && st.from == IRC_DOMAIN && (st.type_.is_empty() || st.type_ == "available")
        })
        .await?;
    let (node, ver) = (first_attr(&p.xml, "c", "node"), first_attr(&p.xml, "c", "ver"));
    let (Some(node), Some(ver)) = (node, ver) else { anyhow::bail!("no entity capabilities: {}", p.xml) };
    let (computed, answer) = alice.verstring(IRC_DOMAIN, &format!("{node}#{ver}"), "sha-1").await?;
    assert_eq!(computed, ver, "the hash of what the gateway answers: {answer}");
    assert!(answer.contains("conference"), "{answer}");
    Ok(())
}

/// A nick change to a nick someone has on IRC is refused as XEP-0045 §7.6 says:
/// a presence error `conflict` from the occupant JID asked for; the nick stays on
/// both sides (no `alice_` chosen on the user's behalf).
#[tokio::test]
async fn a_nick_change_to_a_taken_nick_is_a_conflict() -> Result<()> {
    let s = IrcSetup::start_on(IrcServerKind::Ngircd, "").await?;
    let mut bob = IrcClient::connect(s.irc.port(), "bob").await?;
    bob.join("#test").await?;
    let room = room("#test");
    let mut alice = s.join("alice", "r", &room, "alice").await?;
    alice.send_raw(&format!("<presence to='{room}/bob' id='nick1'/>")).await?;
    let error = alice.expect(T, |st| st.kind == "presence" && st.type_ == "error").await?;
    assert_eq!(error.from, format!("{room}/bob"), "{}", error.xml);
    assert!(error.xml.contains("<conflict"), "{}", error.xml);
    // the nick is unchanged: what alice says comes from `alice` on IRC
    alice.send_groupchat(&room, "still alice").await?;
    let line = bob.expect_line(T, |l| privmsg_text(l, "#test") == Some("still alice")).await?;
    assert!(line.starts_with(":alice!"), "{line}");
    assert!(!bob.seen().iter().any(|l| l.contains(" NICK ")), "the nick changed on IRC: {:#?}", bob.seen());
    assert!(!alice.seen().iter().any(|x| x.contains("code=\"303\"")), "the nick changed on XMPP: {:#?}", alice.seen());
    // and a free nick still works
    alice.send_raw(&format!("<presence to='{room}/alicia'/>")).await?;
    let line = bob.expect_line(T, |l| l.contains(" NICK ")).await?;
    assert!(line.starts_with(":alice!") && line.ends_with("alicia"), "{line}");
    Ok(())
}

/// A subject change the IRC server refuses (482, not a channel operator on a +t
/// channel) is an error on the subject message, as XEP-0045 §8.1 says: from the
/// room, with the message's id, `auth`/`forbidden`.
#[tokio::test]
async fn a_refused_subject_change_is_forbidden() -> Result<()> {
    let s = IrcSetup::start_on(IrcServerKind::Ngircd, "").await?;
    let mut bob = IrcClient::connect(s.irc.port(), "bob").await?;
    bob.join("#topics").await?; // bob is operator
    bob.send_line("MODE #topics +t").await?;
    let room = room("#topics");
    let mut alice = s.join("alice", "r", &room, "alice").await?;
    alice
        .send_raw(&format!(
            "<message to='{room}' type='groupchat' id='subj1'><subject>not mine to set</subject></message>"
        ))
        .await?;
    let error = alice.expect(T, |st| st.kind == "message" && st.id == "subj1").await?;
    assert_eq!(error.type_, "error", "{}", error.xml);
    assert_eq!(error.from, room, "{}", error.xml);
    assert!(error.xml.contains("<forbidden"), "{}", error.xml);
    assert_eq!(first_attr(&error.xml, "error", "type").as_deref(), Some("auth"), "{}", error.xml);
    assert!(!bob.seen().iter().any(|l| l.contains("not mine to set")), "{:#?}", bob.seen());
    Ok(())
}

/// A reply from XMPP (XEP-0461, with the XEP-0428 fallback quote in its body)
/// reaches IRC saying whom and what it answers, `bob: > quote… ↵ reply`, with the
/// client's own fallback quote taken out.
#[tokio::test]
async fn a_reply_reaches_irc_with_the_nick_and_a_short_quote() -> Result<()> {
    let s = IrcSetup::start_on(IrcServerKind::Ngircd, "").await?;
    let mut bob = IrcClient::connect(s.irc.port(), "bob").await?;
    bob.join("#test").await?;
    let room = room("#test");
    let mut alice = s.join("alice", "r", &room, "alice").await?;
    let said = "are we meeting at noon tomorrow in the usual place downstairs?";
    bob.privmsg("#test", said).await?;
    let original = alice.expect(T, |st| st.body.as_deref() == Some(said)).await?;
    let id = original.stanza_id().ok_or_else(|| anyhow::anyhow!("no stanza-id in {}", original.xml))?;
    let fallback = format!("> {said}\n");
    let end = fallback.chars().count();
    alice
        .send_raw(&format!(
            "<message to='{room}' type='groupchat' id='re1'><body>{fallback}yes, see you there</body>\
             <reply xmlns='urn:xmpp:reply:0' to='{room}/bob' id='{id}'/>\
             <fallback xmlns='urn:xmpp:fallback:0' for='urn:xmpp:reply:0'><body start='0' end='{end}'/></fallback></message>"
        ))
        .await?;
    let line = bob.expect_line(T, |l| privmsg_text(l, "#test").is_some_and(|t| t.contains("see you there"))).await?;
    assert_eq!(
        privmsg_text(&line, "#test"),
        Some("bob: > are we meeting at noon tomorrow in the u… ↵ yes, see you there"),
        "{line}"
    );
    Ok(())
}

#[tokio::test]
async fn an_account_connects_to_at_most_max_servers_per_account() -> Result<()> {
    let s = IrcSetup::start("    max_servers_per_account: 1\n").await?;
    let first = room("#first");
    let mut alice = s.join("alice", "r", &first, "alice").await?;
    // A second server (the same ngIRCd over TLS): refused, with the reason.
    let second = format!("#second%localhost@{IRC_DOMAIN}");
    alice.join(&second, "alice").await?;
    let refused = alice.expect(T, |st| st.kind == "presence" && st.from.starts_with(&second)).await?;
    assert!(
        refused.type_ == "error" && refused.xml.contains("as many as it allows (1)"),
        "the second server was not refused with the reason: {}",
        refused.xml
    );
    // Having left the first server, the second one is allowed.
    alice.send_raw(&format!("<presence to='{first}/alice' type='unavailable'/>")).await?;
    alice
        .expect(T, |st| st.kind == "presence" && st.from == format!("{first}/alice") && st.type_ == "unavailable")
        .await?;
    alice.join(&second, "alice").await?;
    alice
        .expect(Duration::from_secs(30), |st| {
            st.kind == "presence" && st.from == format!("{second}/alice") && st.has_status(110)
        })
        .await?;
    Ok(())
}
