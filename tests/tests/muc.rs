//! The MUC service and archive, end to end: history on join and XEP-0313 queries
//! with XEP-0059 paging, on per-user IRC room archives.

use std::collections::HashSet;
use std::time::Duration;

use anyhow::{Result, bail};
use isthmus_tests::scenario::{IRC_DOMAIN, IrcSetup, T, moderate_iq, room};
use isthmus_tests::{IrcClient, Stanza, XmppClient, XmppServerKind};

/// The text between `<tag ...>` and `</tag>` in some XML.
fn inner<'a>(xml: &'a str, tag: &str) -> Option<&'a str> {
    let start = xml.find(&format!("<{tag}"))?;
    let open_end = start + xml[start..].find('>')?;
    if xml[..open_end].ends_with('/') {
        return Some("");
    }
    let close = open_end + xml[open_end..].find(&format!("</{tag}>"))?;
    Some(&xml[open_end + 1..close])
}

/// Send a MAM query and collect (results, fin iq).
async fn mam(c: &mut XmppClient, room: &str, qid: &str, rsm: &str, form: &str) -> Result<(Vec<Stanza>, Stanza)> {
    c.send_raw(&format!(
        "<iq type='set' id='{qid}' to='{room}'><query xmlns='urn:xmpp:mam:2' queryid='{qid}'>{form}<set xmlns='http://jabber.org/protocol/rsm'>{rsm}</set></query></iq>"
    ))
    .await?;
    let mut results = Vec::new();
    loop {
        let st = c
            .expect(T, |st| (st.kind == "iq" && st.id == qid) || st.xml.contains(&format!("queryid=\"{qid}\"")))
            .await?;
        if st.kind == "iq" {
            if st.type_ != "result" {
                bail!("MAM query failed: {}", st.xml);
            }
            return Ok((results, st));
        }
        results.push(st);
    }
}

async fn fill(bob: &mut IrcClient, alice: &mut XmppClient, channel: &str, prefix: &str, n: usize) -> Result<()> {
    for i in 0..n {
        bob.privmsg(channel, &format!("{prefix} {i}")).await?;
    }
    let last = format!("{prefix} {}", n - 1);
    alice.expect(Duration::from_secs(60), |st| st.body.as_deref() == Some(last.as_str())).await?;
    Ok(())
}

async fn history_on_join_honours_maxstanzas(xmpp: XmppServerKind) -> Result<()> {
    let s = IrcSetup::start_xmpp(xmpp, "").await?;
    let mut bob = IrcClient::connect(s.irc.port(), "bob").await?;
    bob.join("#hist").await?;
    let room = room("#hist");
    let mut alice = s.join("alice", "r", &room, "alice").await?;
    fill(&mut bob, &mut alice, "#hist", "history", 6).await?;
    alice.send_raw(&format!("<presence to='{room}/alice' type='unavailable'/>")).await?;
    alice.expect(T, |st| st.kind == "presence" && st.type_ == "unavailable" && st.has_status(110)).await?;

    alice.clear_buffer();
    alice.join_with_history(&room, "alice", 3).await?;
    alice.expect(T, |st| st.kind == "presence" && st.has_status(110) && st.type_ != "unavailable").await?;
    let mut replayed = Vec::new();
    loop {
        // From the room only: the server's notice about the closed IRC connection may come late.
        let st = alice.expect(T, |st| st.kind == "message" && st.from.starts_with(room.as_str())).await?;
        if st.xml.contains("<subject") {
            break;
        }
        assert!(st.xml.contains("urn:xmpp:delay"), "history is delayed: {}", st.xml);
        assert_eq!(st.from, format!("{room}/bob"));
        replayed.push(st.body.unwrap_or_default());
    }
    assert_eq!(replayed, vec!["history 3", "history 4", "history 5"], "exactly the last 3, before the subject");
    Ok(())
}

async fn mam_pages_500_messages_back_without_gaps_or_repeats(xmpp: XmppServerKind) -> Result<()> {
    let s = IrcSetup::start_xmpp(xmpp, "").await?;
    let mut bob = IrcClient::connect(s.irc.port(), "bob").await?;
    bob.join("#mam").await?;
    let room = room("#mam");
    let mut alice = s.join("alice", "r", &room, "alice").await?;
    fill(&mut bob, &mut alice, "#mam", "archived", 500).await?;

    // page backwards from the newest, 50 at a time
    let mut pages = Vec::new();
    let mut before = String::new();
    for n in 0.. {
        let rsm = format!("<max>50</max><before>{before}</before>");
        let (results, fin) = mam(&mut alice, &room, &format!("q{n}"), &rsm, "").await?;
        assert!(results.len() <= 50);
        if let Some(first) = results.first() {
            assert!(
                first.xml.contains("<message xmlns=\"jabber:client\""),
                "the forwarded message is in the client namespace: {}",
                first.xml
            );
        }
        let bodies: Vec<String> =
            results.iter().map(|r| inner(&r.xml, "body").unwrap_or_default().to_owned()).collect();
        let ids: Vec<String> = results
            .iter()
            .filter_map(|r| {
                r.xml
                    .split("<result")
                    .nth(1)
                    .and_then(|t| t.split(" id=\"").nth(1))
                    .map(|t| t.split('"').next().unwrap_or("").to_owned())
            })
            .collect();
        pages.push((bodies, ids));
        let complete = fin.xml.contains("complete=\"true\"");
        if complete {
            break;
        }
        before = inner(&fin.xml, "first").unwrap_or_default().to_owned();
        assert!(!before.is_empty(), "an incomplete page names its first item: {}", fin.xml);
        assert!(n < 20, "paging must end");
    }
    pages.reverse();
    let bodies: Vec<String> = pages.iter().flat_map(|(b, _)| b.clone()).collect();
    let ids: Vec<String> = pages.iter().flat_map(|(_, i)| i.clone()).collect();
    let expected: Vec<String> = (0..500).map(|i| format!("archived {i}")).collect();
    assert_eq!(bodies.len(), 500, "500 messages");
    assert_eq!(bodies, expected, "none missing, none repeated, in order");
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 500, "500 distinct archive ids");
    assert_eq!(pages.len(), 10, "ten pages of 50");
    Ok(())
}

async fn mam_time_and_sender_filters(xmpp: XmppServerKind) -> Result<()> {
    let s = IrcSetup::start_xmpp(xmpp, "").await?;
    let mut bob = IrcClient::connect(s.irc.port(), "bob").await?;
    bob.join("#mamtime").await?;
    let room = room("#mamtime");
    let mut alice = s.join("alice", "r", &room, "alice").await?;
    fill(&mut bob, &mut alice, "#mamtime", "early", 5).await?;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let cut = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    tokio::time::sleep(Duration::from_millis(100)).await;
    fill(&mut bob, &mut alice, "#mamtime", "late", 4).await?;
    alice.send_groupchat(&room, "from alice").await?;
    alice.expect(T, |st| st.body.as_deref() == Some("from alice")).await?;

    let form = |extra: &str| {
        format!(
            "<x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE' type='hidden'><value>urn:xmpp:mam:2</value></field>{extra}</x>"
        )
    };
    let (results, _) = mam(
        &mut alice,
        &room,
        "t1",
        "<max>50</max>",
        &form(&format!("<field var='start'><value>{cut}</value></field>")),
    )
    .await?;
    let bodies: Vec<&str> = results.iter().filter_map(|r| inner(&r.xml, "body")).collect();
    assert_eq!(bodies, vec!["late 0", "late 1", "late 2", "late 3", "from alice"], "only what came after `start`");
    let (results, _) =
        mam(&mut alice, &room, "t2", "<max>50</max>", &form(&format!("<field var='end'><value>{cut}</value></field>")))
            .await?;
    assert_eq!(results.len(), 5, "only what came before `end`");
    let with = format!("<field var='with'><value>{room}/alice</value></field>");
    let (results, _) = mam(&mut alice, &room, "t3", "<max>50</max>", &form(&with)).await?;
    let bodies: Vec<&str> = results.iter().filter_map(|r| inner(&r.xml, "body")).collect();
    assert_eq!(bodies, vec!["from alice"], "only alice's messages");
    // another account sees nothing of alice's personal archive
    let mut carol = XmppClient::connect(&s.prosody, "carol@localhost/r", "carolpass").await?;
    let (results, _) = mam(&mut carol, &room, "t4", "<max>50</max>", "").await?;
    assert!(results.is_empty(), "per-user archive: carol was never in the room");
    Ok(())
}

fn stanza_id(xml: &str) -> String {
    let tag = xml.split("<stanza-id").nth(1).unwrap_or_default();
    tag.split(" id=\"").nth(1).and_then(|t| t.split('"').next()).unwrap_or_default().to_owned()
}

fn privmsg_text<'a>(line: &'a str, target: &str) -> Option<&'a str> {
    let marker = format!(" PRIVMSG {target} :");
    line.find(&marker).map(|i| &line[i + marker.len()..])
}

async fn corrections_reactions_and_retractions_reach_irc_by_policy(xmpp: XmppServerKind) -> Result<()> {
    let s = IrcSetup::start_xmpp(xmpp, "    fallbacks: { retractions: notice }").await?;
    let mut bob = IrcClient::connect(s.irc.port(), "bob").await?;
    bob.join("#edits").await?;
    let room = room("#edits");
    let mut alice = s.join("alice", "r", &room, "alice").await?;
    let msg = |id: &str, body: &str, extra: &str| {
        format!("<message to='{room}' type='groupchat' id='{id}'><body>{body}</body>{extra}</message>")
    };

    alice.send_raw(&msg("m1", "first version", "")).await?;
    bob.expect_line(T, |l| privmsg_text(l, "#edits") == Some("first version")).await?;
    let own = alice.expect(T, |st| st.id == "m1" && st.kind == "message").await?;
    let own_sid = stanza_id(&own.xml);
    assert!(!own_sid.is_empty(), "reflection carries a stanza-id: {}", own.xml);

    // a correction, then a correction of the correction
    alice.send_raw(&msg("m2", "second version", "<replace xmlns='urn:xmpp:message-correct:0' id='m1'/>")).await?;
    bob.expect_line(T, |l| privmsg_text(l, "#edits") == Some("[edit] second version")).await?;
    alice.send_raw(&msg("m3", "third version", "<replace xmlns='urn:xmpp:message-correct:0' id='m2'/>")).await?;
    bob.expect_line(T, |l| privmsg_text(l, "#edits") == Some("[edit] third version")).await?;
    let echo = alice.expect(T, |st| st.id == "m3" && st.kind == "message").await?;
    assert!(
        echo.xml.contains("urn:xmpp:message-correct:0"),
        "the correction is reflected as a correction: {}",
        echo.xml
    );

    // a reaction to bob's message, by its stanza-id
    bob.privmsg("#edits", "nice").await?;
    let nice = alice.expect(T, |st| st.body.as_deref() == Some("nice")).await?;
    let nice_sid = stanza_id(&nice.xml);
    alice
        .send_raw(&format!(
            "<message to='{room}' type='groupchat' id='r1'><reactions xmlns='urn:xmpp:reactions:0' id='{nice_sid}'><reaction>👍</reaction></reactions></message>"
        ))
        .await?;
    bob.expect_line(T, |l| privmsg_text(l, "#edits") == Some("\u{1}ACTION reacted 👍 to bob: \"nice\"\u{1}")).await?;

    // retracting the first message (by its stanza-id), with the XEP-0428 fallback body
    alice
        .send_raw(&msg(
            "x1",
            "This person attempted to retract a previous message, but it's unsupported by your client.",
            &format!("<retract xmlns='urn:xmpp:message-retract:1' id='{own_sid}'/><fallback xmlns='urn:xmpp:fallback:0' for='urn:xmpp:message-retract:1'/>"),
        ))
        .await?;
    let line = bob.expect_line(T, |l| privmsg_text(l, "#edits").is_some()).await?;
    assert_eq!(
        privmsg_text(&line, "#edits"),
        Some("\u{1}ACTION deleted a message: \"first version\"\u{1}"),
        "policy notice, no fallback body"
    );
    // the retracted message leaves alice's archive of the room
    let bodies = mam_bodies(&mut alice, &room, "after-retraction").await?;
    assert!(!bodies.iter().any(|b| b == "first version") && bodies.iter().any(|b| b == "nice"), "{bodies:?}");

    // the id map: the original and both corrections share one key; reaction and retraction are recorded
    let db = format!("sqlite://{}/isthmus.db", s.gateway.dir().display());
    let pool = sqlx::SqlitePool::connect(&db).await?;
    let keys: Vec<(String, String)> = sqlx::query_as(
        "SELECT remote_id, msg_key FROM message_map WHERE network = 'xmpp' AND remote_id IN ('m1', 'm2', 'm3', 'r1', 'x1')",
    )
    .fetch_all(&pool)
    .await?;
    let key_of = |id: &str| keys.iter().find(|(r, _)| r == id).map(|(_, k)| k.clone());
    assert!(key_of("m1").is_some(), "{keys:?}");
    assert_eq!(key_of("m2"), key_of("m1"), "a correction joins the original");
    assert_eq!(key_of("m3"), key_of("m1"), "a correction of a correction targets the original");
    assert!(key_of("r1").is_some() && key_of("x1").is_some(), "reaction and retraction are in the id map: {keys:?}");
    Ok(())
}

/// XEP-0425 in an IRC room. IRC cannot take a line back: a channel operator's
/// moderation is shown on IRC as the retraction policy shows a user's own
/// retraction (here `notice`), the moderator's devices get the XEP-0425 removal,
/// and the message leaves the account's archive; the room advertises moderation.
#[tokio::test]
async fn moderation_in_an_irc_room_follows_the_retraction_policy() -> Result<()> {
    let s = IrcSetup::start("    fallbacks: { retractions: notice }").await?;
    let mut bob = IrcClient::connect(s.irc.port(), "bob").await?;
    bob.join("#mod").await?; // first in: bob is operator
    let room = room("#mod");
    let mut alice = s.join("alice", "r", &room, "alice").await?;
    alice
        .send_raw(&format!(
            "<iq type='get' to='{room}' id='info1'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>"
        ))
        .await?;
    let info = alice.expect(T, |st| st.kind == "iq" && st.id == "info1").await?;
    assert!(info.xml.contains("urn:xmpp:message-moderate:1"), "an IRC room advertises moderation: {}", info.xml);

    let mut dave = IrcClient::connect(s.irc.port(), "dave").await?;
    dave.join("#mod").await?;
    dave.privmsg("#mod", "hello all").await?;
    dave.privmsg("#mod", "buy cheap stuff").await?;
    alice.expect(T, |st| st.body.as_deref() == Some("hello all")).await?;
    let spam = alice.expect(T, |st| st.body.as_deref() == Some("buy cheap stuff")).await?;
    let sid = stanza_id(&spam.xml);
    assert!(!sid.is_empty(), "{}", spam.xml);

    // No operator yet: refused, and nothing reaches IRC.
    alice.send_raw(&moderate_iq(&room, "mod1", &sid, "spam")).await?;
    let refused = alice.expect(T, |st| st.kind == "iq" && st.id == "mod1").await?;
    assert!(refused.type_ == "error" && refused.xml.contains("<forbidden"), "{}", refused.xml);

    // bob makes alice an operator: a moderator.
    bob.send_line("MODE #mod +o alice").await?;
    let own = format!("{room}/alice");
    alice.expect(T, |st| st.kind == "presence" && st.from == own && st.xml.contains("role=\"moderator\"")).await?;

    // A stanza-id the room's archive does not hold.
    alice.send_raw(&moderate_iq(&room, "mod2", "no-such-id", "spam")).await?;
    let unknown = alice.expect(T, |st| st.kind == "iq" && st.id == "mod2").await?;
    assert!(unknown.type_ == "error" && unknown.xml.contains("<item-not-found"), "{}", unknown.xml);

    alice.send_raw(&moderate_iq(&room, "mod3", &sid, "spam")).await?;
    let done = alice.expect(T, |st| st.kind == "iq" && st.id == "mod3").await?;
    assert_eq!(done.type_, "result", "{}", done.xml);
    let removal = alice
        .expect(T, |st| st.kind == "message" && st.from == room && st.xml.contains("urn:xmpp:message-moderate:1"))
        .await?;
    let retract = removal.xml.split("<retract ").nth(1).and_then(|t| t.split('>').next()).unwrap_or_default();
    assert!(retract.contains(&format!("id=\"{sid}\"")), "the removal names the message: {}", removal.xml);
    assert!(removal.xml.contains(&format!("by=\"{own}\"")), "{}", removal.xml);
    assert!(removal.xml.contains("<reason>spam</reason>"), "{}", removal.xml);
    let line = bob.expect_line(T, |l| privmsg_text(l, "#mod").is_some_and(|t| t.contains("removed a message"))).await?;
    assert!(line.starts_with(":alice!"), "{line}");
    assert_eq!(
        privmsg_text(&line, "#mod"),
        Some("\u{1}ACTION removed a message by dave: \"buy cheap stuff\" (reason: spam)\u{1}"),
        "the retraction policy's notice, naming whose message"
    );
    let later = bob.drain(Duration::from_millis(500)).await?;
    assert!(!later.iter().any(|l| l.contains("removed a message")), "one notice only: {later:?}");

    // The archive forgets it: MAM returns the rest only.
    assert_eq!(mam_bodies(&mut alice, &room, "q1").await?, ["hello all"]);
    Ok(())
}

isthmus_tests::on_both_xmpp_servers!(
    history_on_join_honours_maxstanzas,
    mam_pages_500_messages_back_without_gaps_or_repeats,
    mam_time_and_sender_filters,
    corrections_reactions_and_retractions_reach_irc_by_policy
);

async fn ad_hoc_and_chat_commands(xmpp: XmppServerKind) -> Result<()> {
    let s = IrcSetup::start_xmpp(xmpp, "").await?;
    let mut bob = IrcClient::connect(s.irc.port(), "bob").await?;
    bob.join("#cmd").await?;
    let room = room("#cmd");
    let mut alice = s.join("alice", "r", &room, "alice").await?;

    // the command list
    alice
        .send_raw("<iq type='get' id='l1' to='irc.localhost'><query xmlns='http://jabber.org/protocol/disco#items' node='http://jabber.org/protocol/commands'/></iq>")
        .await?;
    let list = alice.expect(T, |st| st.kind == "iq" && st.id == "l1").await?;
    for node in ["status", "rooms", "leave"] {
        assert!(list.xml.contains(&format!("node=\"{node}\"")), "{node} listed: {}", list.xml);
    }
    // status: one IRC connection, in #cmd
    alice
        .send_raw("<iq type='set' id='c1' to='irc.localhost'><command xmlns='http://jabber.org/protocol/commands' node='status' action='execute'/></iq>")
        .await?;
    let status = alice.expect(T, |st| st.kind == "iq" && st.id == "c1").await?;
    assert!(status.xml.contains("status=\"completed\""), "{}", status.xml);
    assert!(status.xml.contains("127.0.0.1: connected as alice, in #cmd"), "{}", status.xml);

    // the same as a chat command, and help
    alice.send_raw("<message to='irc.localhost' type='chat' id='h1'><body>help</body></message>").await?;
    let help = alice
        .expect(T, |st| st.from == "irc.localhost" && st.body.as_deref().is_some_and(|b| b.contains("leave")))
        .await?;
    assert!(help.body.unwrap_or_default().contains("status"));
    alice.send_raw("<message to='irc.localhost' type='chat' id='s1'><body>rooms</body></message>").await?;
    alice.expect(T, |st| st.from == "irc.localhost" && st.body.as_deref() == Some(room.as_str())).await?;

    // leave, in two steps: the form lists the room, submitting it leaves
    alice
        .send_raw("<iq type='set' id='c2' to='irc.localhost'><command xmlns='http://jabber.org/protocol/commands' node='leave' action='execute'/></iq>")
        .await?;
    let form = alice.expect(T, |st| st.kind == "iq" && st.id == "c2").await?;
    assert!(form.xml.contains("status=\"executing\"") && form.xml.contains(&room), "{}", form.xml);
    let session =
        form.xml.split("sessionid=\"").nth(1).and_then(|t| t.split('"').next()).unwrap_or_default().to_owned();
    alice
        .send_raw(&format!(
            "<iq type='set' id='c3' to='irc.localhost'><command xmlns='http://jabber.org/protocol/commands' node='leave' sessionid='{session}'><x xmlns='jabber:x:data' type='submit'><field var='room'><value>{room}</value></field></x></command></iq>"
        ))
        .await?;
    let done = alice.expect(T, |st| st.kind == "iq" && st.id == "c3").await?;
    assert!(done.xml.contains("status=\"completed\""), "{}", done.xml);
    alice.expect(T, |st| st.kind == "presence" && st.type_ == "unavailable" && st.has_status(110)).await?;
    bob.expect_line(T, |l| l.contains("PART #cmd") || l.contains("QUIT")).await?;
    Ok(())
}

isthmus_tests::on_both_xmpp_servers!(ad_hoc_and_chat_commands);

/// An ad-hoc command on `to`; returns the answer (any type).
async fn command(c: &mut XmppClient, to: &str, id: &str, node: &str) -> Result<Stanza> {
    c.send_raw(&format!(
        "<iq type='set' id='{id}' to='{to}'><command xmlns='http://jabber.org/protocol/commands' node='{node}' action='execute'/></iq>"
    ))
    .await?;
    c.expect(T, |st| st.kind == "iq" && st.id == id).await
}

/// Commands on a room's own address: the room, the gateway domain and the IRC
/// server's address advertise XEP-0050 in disco#info; the room lists `status` and
/// `leave`; `status` tells the nick, the devices and the IRC connection; someone
/// not in the room is refused (`forbidden`, with a text, as IQ and as chat); a
/// chat message to the room's bare JID is a command and never reaches IRC;
/// `leave` (a form to confirm, then its submission) parts on IRC and sends each
/// of the account's devices its own unavailable self-presence.
async fn commands_on_a_room_address(xmpp: XmppServerKind) -> Result<()> {
    let s = IrcSetup::start_xmpp(xmpp, "").await?;
    let mut bob = IrcClient::connect(s.irc.port(), "bob").await?;
    bob.join("#rc").await?;
    let room = room("#rc");
    let server = format!("127.0.0.1@{IRC_DOMAIN}");
    let mut alice = s.join("alice", "r", &room, "alice").await?;
    let mut phone = s.join("alice", "phone", &room, "alice").await?;
    bob.expect_line(T, |l| l.starts_with(":alice!") && l.contains("JOIN")).await?;

    for (i, jid) in [IRC_DOMAIN, server.as_str(), room.as_str()].into_iter().enumerate() {
        let id = format!("info{i}");
        alice
            .send_raw(&format!(
                "<iq type='get' id='{id}' to='{jid}'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>"
            ))
            .await?;
        let info = alice.expect(T, |st| st.kind == "iq" && st.id == id).await?;
        assert_eq!(info.type_, "result", "{jid}: {}", info.xml);
        assert!(info.xml.contains("var=\"http://jabber.org/protocol/commands\""), "{jid}: {}", info.xml);
    }
    alice
        .send_raw(&format!(
            "<iq type='get' id='items' to='{room}'><query xmlns='http://jabber.org/protocol/disco#items' node='http://jabber.org/protocol/commands'/></iq>"
        ))
        .await?;
    let items = alice.expect(T, |st| st.kind == "iq" && st.id == "items").await?;
    assert_eq!(items.type_, "result", "{}", items.xml);
    for node in ["status", "leave"] {
        let listed = items
            .xml
            .split("<item")
            .any(|i| i.contains(&format!("node=\"{node}\"")) && i.contains(&format!("jid=\"{room}\"")));
        assert!(listed, "{node} on the room: {}", items.xml);
    }

    // status: joined as alice, two devices, bob in the room, the IRC connection up
    let status = command(&mut alice, &room, "st1", "status").await?;
    assert_eq!(status.type_, "result", "{}", status.xml);
    assert!(status.xml.contains("status=\"completed\""), "{}", status.xml);
    for part in [
        "joined as alice",
        "2 of your devices in it",
        "Others in the room: 1",
        "IRC server 127.0.0.1: connected as alice, in #rc",
    ] {
        assert!(status.xml.contains(part), "`{part}` missing: {}", status.xml);
    }

    // carol is not in the room: refused, as a command and as chat
    let mut carol = XmppClient::connect(&s.prosody, "carol@localhost/r", "carolpass").await?;
    for (id, node) in [("cst", "status"), ("clv", "leave")] {
        let refused = command(&mut carol, &room, id, node).await?;
        assert_eq!(refused.type_, "error", "{}", refused.xml);
        assert!(refused.xml.contains("<forbidden"), "{}", refused.xml);
        assert!(refused.xml.contains("you are not in this room"), "{}", refused.xml);
    }
    carol.send_raw(&format!("<message to='{room}' type='chat' id='cl'><body>leave</body></message>")).await?;
    let told = carol.expect(T, |st| st.kind == "message" && st.from == room).await?;
    assert_eq!(told.type_, "chat", "{}", told.xml);
    assert!(told.body.as_deref().is_some_and(|b| b.contains("you are not in this room")), "{}", told.xml);
    let unknown = command(&mut alice, &room, "un1", "rooms").await?;
    assert!(unknown.type_ == "error" && unknown.xml.contains("<item-not-found"), "{}", unknown.xml);

    // the chat form: help and status answer in chat from the room's bare JID; nothing reaches IRC
    alice.send_raw(&format!("<message to='{room}' type='chat' id='h1'><body>help</body></message>")).await?;
    let help = alice.expect(T, |st| st.kind == "message" && st.type_ == "chat" && st.from == room).await?;
    let help = help.body.unwrap_or_default();
    assert!(help.contains("status") && help.contains("leave") && help.contains("groupchat"), "{help}");
    alice.send_raw(&format!("<message to='{room}' type='chat' id='h2'><body>status</body></message>")).await?;
    let status = alice.expect(T, |st| st.kind == "message" && st.type_ == "chat" && st.from == room).await?;
    assert!(status.body.as_deref().is_some_and(|b| b.contains("connected as alice, in #rc")), "{}", status.xml);
    assert!(
        bob.expect_line(Duration::from_secs(2), |l| l.contains("PRIVMSG #rc")).await.is_err(),
        "a command to the room's address reached IRC"
    );

    // leave, in two steps: a form to confirm (nothing happens yet), then its submission;
    // every device gets its own unavailable self-presence; IRC sees the PART
    let form = command(&mut alice, &room, "lv0", "leave").await?;
    assert!(form.xml.contains("status=\"executing\"") && form.xml.contains("var=\"confirm\""), "{}", form.xml);
    assert!(
        bob.expect_line(Duration::from_secs(1), |l| l.contains("PART #rc")).await.is_err(),
        "the first step already left"
    );
    let session =
        form.xml.split("sessionid=\"").nth(1).and_then(|t| t.split('"').next()).unwrap_or_default().to_owned();
    alice
        .send_raw(&format!(
            "<iq type='set' id='lv1' to='{room}'><command xmlns='http://jabber.org/protocol/commands' node='leave' sessionid='{session}'><x xmlns='jabber:x:data' type='submit'><field var='confirm'><value>1</value></field></x></command></iq>"
        ))
        .await?;
    let left = alice.expect(T, |st| st.kind == "iq" && st.id == "lv1").await?;
    assert_eq!(left.type_, "result", "{}", left.xml);
    assert!(left.xml.contains("status=\"completed\"") && left.xml.contains(&format!("Left {room}.")), "{}", left.xml);
    for device in [&mut alice, &mut phone] {
        let gone = device
            .expect(T, |st| {
                st.kind == "presence"
                    && st.type_ == "unavailable"
                    && st.from == format!("{room}/alice")
                    && st.has_status(110)
            })
            .await?;
        assert!(gone.to.starts_with(&device.jid), "{} got {}", device.jid, gone.xml);
    }
    bob.expect_line(T, |l| l.starts_with(":alice!") && (l.contains("PART #rc") || l.contains("QUIT"))).await?;
    // out of the room now: commands are refused to alice too
    let after = command(&mut alice, &room, "st2", "status").await?;
    assert!(after.type_ == "error" && after.xml.contains("<forbidden"), "{}", after.xml);
    Ok(())
}

isthmus_tests::on_both_xmpp_servers!(commands_on_a_room_address);

async fn persistent_channels_keep_the_user_on_irc(xmpp: XmppServerKind) -> Result<()> {
    let s = IrcSetup::start_xmpp(xmpp, "    persistent_channels: true").await?;
    let mut bob = IrcClient::connect(s.irc.port(), "bob").await?;
    bob.join("#bouncer").await?;
    let room = room("#bouncer");
    let alice = s.join("alice", "r", &room, "alice").await?;
    bob.expect_line(T, |l| l.starts_with(":alice!") && l.contains("JOIN")).await?;
    alice.disconnect().await; // the XMPP server tells the gateway alice left
    for i in 0..3 {
        bob.privmsg("#bouncer", &format!("while away {i}")).await?;
    }
    // alice never left IRC
    assert!(bob.expect_line(Duration::from_secs(1), |l| l.contains("PART") || l.contains("QUIT")).await.is_err());
    let mut alice = XmppClient::connect(&s.prosody, "alice@localhost/r2", "alicepass").await?;
    alice.join_with_history(&room, "alice", 10).await?;
    alice.expect(T, |st| st.kind == "presence" && st.has_status(110)).await?;
    let mut missed = Vec::new();
    loop {
        let st = alice.expect(T, |st| st.kind == "message" && st.from.starts_with(room.as_str())).await?;
        if st.xml.contains("<subject") {
            break;
        }
        missed.push(st.body.unwrap_or_default());
    }
    assert_eq!(missed, vec!["while away 0", "while away 1", "while away 2"], "nothing missed");
    Ok(())
}

isthmus_tests::on_both_xmpp_servers!(persistent_channels_keep_the_user_on_irc);

/// The start tag of the first `<name …>` element in namespace `xmlns` in some XML.
fn tag_in<'a>(xml: &'a str, name: &str, xmlns: &str) -> Option<&'a str> {
    let mut rest = xml;
    while let Some(i) = rest.find(&format!("<{name} ")) {
        let tag = &rest[i..i + rest[i..].find('>')? + 1];
        if tag.contains(&format!("xmlns=\"{xmlns}\"")) {
            return Some(tag);
        }
        rest = &rest[i + 1..];
    }
    None
}

/// The value of attribute `attr` in a start tag.
fn attr(tag: &str, attr: &str) -> Option<String> {
    let i = tag.find(&format!(" {attr}=\""))? + attr.len() + 3;
    Some(tag[i..i + tag[i..].find('"')?].to_owned())
}

const NS_CAPS: &str = "http://jabber.org/protocol/caps";

/// The XEP-0115 `<c/>` of a presence verifies: slixmpp's own algorithm over what the
/// entity answers at `node#ver` gives `ver`. Returns the disco#info answer.
async fn caps_verify(c: &mut XmppClient, presence: &Stanza) -> Result<String> {
    let Some(caps) = tag_in(&presence.xml, "c", NS_CAPS) else { bail!("no entity capabilities: {}", presence.xml) };
    let (node, ver) = (attr(caps, "node").unwrap_or_default(), attr(caps, "ver").unwrap_or_default());
    assert_eq!(attr(caps, "hash").as_deref(), Some("sha-1"), "{caps}");
    assert!(!node.is_empty() && !ver.is_empty(), "{caps}");
    let (computed, info) = c.verstring(&presence.from, &format!("{node}#{ver}"), "sha-1").await?;
    assert_eq!(computed, ver, "the hash of what {} answers: {info}", presence.from);
    Ok(info)
}

/// Occupants are non-anonymous: each remote person's real JID (their puppet, to
/// chat with them) is in their occupant item, the self-presence says 100 and the
/// room's disco#info `muc_nonanonymous`; joining an empty IRC channel created it
/// (201). Presences carry entity capabilities that verify against the entity's own
/// disco#info; people have vCards and answer subscriptions with their nick.
async fn occupants_have_real_jids_caps_and_vcards(xmpp: XmppServerKind) -> Result<()> {
    let s = IrcSetup::start_xmpp(xmpp, "").await?;
    let mut bob = IrcClient::connect(s.irc.port(), "bob").await?;
    bob.join("#real").await?;
    let room = room("#real");
    let bob_jid = format!("bob%127.0.0.1@{IRC_DOMAIN}");
    let mut alice = XmppClient::connect(&s.prosody, "alice@localhost/r", "alicepass").await?;
    alice.join(&room, "alice").await?;
    let own =
        alice.expect(T, |st| st.kind == "presence" && st.from == format!("{room}/alice") && st.has_status(110)).await?;
    assert!(own.has_status(100), "the room is non-anonymous: {}", own.xml);
    assert!(!own.has_status(201), "bob was there: the room existed: {}", own.xml);
    let bob_presence = alice.expect(T, |st| st.kind == "presence" && st.from == format!("{room}/bob")).await?;
    let item = tag_in(&bob_presence.xml, "item", "http://jabber.org/protocol/muc#user")
        .or_else(|| bob_presence.xml.split("<item").nth(1))
        .unwrap_or_default()
        .to_owned();
    assert!(item.contains(&format!("jid=\"{bob_jid}\"")), "bob's real JID is his puppet: {}", bob_presence.xml);
    assert!(bob_presence.xml.contains("vcard-temp:x:update"), "avatar state (XEP-0153): {}", bob_presence.xml);

    // the room says it is non-anonymous
    alice
        .send_raw(&format!(
            "<iq type='get' id='di1' to='{room}'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>"
        ))
        .await?;
    let info = alice.expect(T, |st| st.kind == "iq" && st.id == "di1").await?;
    assert!(info.xml.contains("var=\"muc_nonanonymous\""), "{}", info.xml);

    // the real JID reaches the person
    alice
        .send_raw(&format!("<message to='{bob_jid}' type='chat' id='pm1'><body>hello from the item</body></message>"))
        .await?;
    bob.expect_line(T, |l| l.starts_with(":alice!") && l.ends_with("PRIVMSG bob :hello from the item")).await?;

    // capabilities of an occupant verify against what the occupant JID answers
    let occupant_info = caps_verify(&mut alice, &bob_presence).await?;
    assert!(occupant_info.contains("vcard-temp"), "{occupant_info}");

    // the occupant's and the puppet's vCards: the IRC nick, no picture
    for (id, to) in [("v1", format!("{room}/bob")), ("v2", bob_jid.clone())] {
        alice.send_raw(&format!("<iq type='get' id='{id}' to='{to}'><vCard xmlns='vcard-temp'/></iq>")).await?;
        let vcard = alice.expect(T, |st| st.kind == "iq" && st.id == id).await?;
        assert_eq!(vcard.type_, "result", "{}", vcard.xml);
        assert_eq!(inner(&vcard.xml, "NICKNAME"), Some("bob"), "{}", vcard.xml);
        assert!(!vcard.xml.contains("<PHOTO"), "IRC has no pictures: {}", vcard.xml);
    }

    // a nick change on IRC changes the real JID with it
    bob.send_line("NICK bobby").await?;
    let renamed = alice
        .expect(T, |st| st.kind == "presence" && st.from == format!("{room}/bobby") && st.type_ != "unavailable")
        .await?;
    assert!(renamed.xml.contains(&format!("jid=\"bobby%127.0.0.1@{IRC_DOMAIN}\"")), "{}", renamed.xml);

    // subscribing to the puppet and to the gateway: accepted, then their presence with
    // capabilities (verified), the puppet's with its nick (XEP-0172) and avatar state
    let bobby_jid = format!("bobby%127.0.0.1@{IRC_DOMAIN}");
    for to in [bobby_jid.as_str(), IRC_DOMAIN] {
        // (the XMPP server turns the `subscribed` answer into a roster push; the
        // presence that follows shows it was accepted: it reaches the bare JID)
        alice.send_raw(&format!("<presence to='{to}' type='subscribe'/>")).await?;
        let p = alice
            .expect(T, |st| st.kind == "presence" && st.from == to && (st.type_.is_empty() || st.type_ == "available"))
            .await?;
        let info = caps_verify(&mut alice, &p).await?;
        if to == IRC_DOMAIN {
            assert!(info.contains("category=\"gateway\""), "{info}");
        } else {
            assert_eq!(inner(&p.xml, "nick"), Some("bobby"), "XEP-0172 nick: {}", p.xml);
            assert!(p.xml.contains("<photo />") || p.xml.contains("<photo/>"), "known: no picture: {}", p.xml);
        }
    }

    // an empty channel: alice's join creates it
    let fresh = isthmus_tests::scenario::room("#fresh");
    alice.join(&fresh, "alice").await?;
    let own = alice
        .expect(T, |st| st.kind == "presence" && st.from == format!("{fresh}/alice") && st.has_status(110))
        .await?;
    assert!(own.has_status(201), "the join created the channel: {}", own.xml);
    // the instant-room confirmation clients send after 201 is accepted
    alice
        .send_raw(&format!(
            "<iq type='set' id='own1' to='{fresh}'><query xmlns='http://jabber.org/protocol/muc#owner'><x xmlns='jabber:x:data' type='submit'/></query></iq>"
        ))
        .await?;
    let ok = alice.expect(T, |st| st.kind == "iq" && st.id == "own1").await?;
    assert_eq!(ok.type_, "result", "{}", ok.xml);
    Ok(())
}

isthmus_tests::on_both_xmpp_servers!(occupants_have_real_jids_caps_and_vcards);

/// Rows of `room`'s archive whose body starts with `prefix`.
async fn archived_count(pool: &sqlx::SqlitePool, room: &str, prefix: &str) -> Result<i64> {
    let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM archive WHERE room = ?1 AND body LIKE ?2")
        .bind(room)
        .bind(format!("{prefix}%"))
        .fetch_one(pool)
        .await?;
    Ok(n)
}

/// The bodies MAM returns for `room`, oldest first.
async fn mam_bodies(c: &mut XmppClient, room: &str, qid: &str) -> Result<Vec<String>> {
    let (results, _) = mam(c, room, qid, "<max>50</max>", "").await?;
    Ok(results.iter().filter_map(|r| inner(&r.xml, "body")).map(str::to_owned).collect())
}

/// Archive retention (`archive.retention_days`, default 7; 0 keeps everything):
/// messages older than the retention are no longer returned by MAM, and the
/// pruning task (at start, then hourly) removes them from the store, while recent
/// ones stay. "Old" messages are made old by moving their time back in the store.
async fn mam_retention_prunes_expired_messages(xmpp: XmppServerKind) -> Result<()> {
    for (retention, kept) in [("", false), ("archive:\n  retention_days: 0\n", true)] {
        let mut s = IrcSetup::start_xmpp(xmpp, retention).await?;
        let mut bob = IrcClient::connect(s.irc.port(), "bob").await?;
        bob.join("#retain").await?;
        let room = room("#retain");
        let mut alice = s.join("alice", "r", &room, "alice").await?;
        fill(&mut bob, &mut alice, "#retain", "old", 3).await?;
        fill(&mut bob, &mut alice, "#retain", "new", 2).await?;
        assert_eq!(mam_bodies(&mut alice, &room, "r0").await?, ["old 0", "old 1", "old 2", "new 0", "new 1"]);

        // eight days pass for the "old" messages
        let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}/isthmus.db", s.gateway.dir().display())).await?;
        let eight_days_us: i64 = 8 * 86_400 * 1_000_000;
        sqlx::query("UPDATE archive SET time_us = time_us - ?1 WHERE room = ?2 AND body LIKE 'old %'")
            .bind(eight_days_us)
            .bind(&room)
            .execute(&pool)
            .await?;
        let all = ["old 0", "old 1", "old 2", "new 0", "new 1"];
        let expected: &[&str] = if kept { &all } else { &all[3..] };
        assert_eq!(mam_bodies(&mut alice, &room, "r1").await?, expected, "expired messages are not returned");

        // the pruning task runs at start: the expired rows are gone from the store
        s.gateway.restart().await?;
        let ready =
            if xmpp == XmppServerKind::Embedded { "accepting XMPP clients" } else { "component link established" };
        s.gateway.wait_log(ready, 2, T).await?;
        if !kept {
            s.gateway.wait_log("archive retention applied", 2, T).await?;
        }
        assert_eq!(archived_count(&pool, &room, "old ").await?, if kept { 3 } else { 0 }, "retention {retention:?}");
        assert_eq!(archived_count(&pool, &room, "new ").await?, 2, "recent messages stay");
        // (a new connection: with the embedded server, the restart ended the first one)
        let mut alice = XmppClient::connect(&s.prosody, "alice@localhost/r2", "alicepass").await?;
        assert_eq!(mam_bodies(&mut alice, &room, "r2").await?, expected, "after pruning");
        if kept {
            assert!(!s.gateway.log().contains("archive retention applied"), "0 keeps everything: no pruning task");
        }
    }
    Ok(())
}

isthmus_tests::on_both_xmpp_servers!(mam_retention_prunes_expired_messages);
