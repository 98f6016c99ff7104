//! The Telegram bridge end to end: real Prosody, slixmpp on the XMPP side, and the
//! Bot API emulator (`tests/emulators/telegram_bot_api.py`) reached through the
//! bridge's `api_url`, as a self-hosted Bot API server would be.

use std::collections::HashSet;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use isthmus_tests::scenario::{SECRET, T};
use isthmus_tests::telegram::{BOT_TOKEN, TelegramEmulator, user};
use isthmus_tests::{Isthmus, Prosody, ProsodyOptions, Stanza, XmppClient};
use serde_json::{Value, json};

const DOMAIN: &str = "telegram.localhost";
const LOBBY: &str = "lobby@telegram.localhost";
const CHAT: i64 = -1001;

struct Setup {
    emu: TelegramEmulator,
    prosody: Prosody,
    gateway: Isthmus,
}

fn config(prosody: &Prosody, emu: &TelegramEmulator, portals: &str) -> String {
    format!(
        "xmpp:\n  component:\n    port: {}\n    secret: {SECRET}\naccess: {{ allow: [localhost], admins: [carol@localhost] }}\nstore:\n  url: sqlite://{{dir}}/isthmus.db\n\
         telegram:\n  - domain: {DOMAIN}\n    token: \"{BOT_TOKEN}\"\n    api_url: \"{}\"\n    poll_timeout_secs: 2\n    portals:\n{portals}",
        prosody.component_port(),
        emu.api_url()
    )
}

impl Setup {
    /// The emulator with the supergroup `CHAT` (and whatever `chats` adds), Prosody
    /// with alice and carol, and the gateway with `portals` (YAML list items).
    async fn start(portals: &str) -> Result<Setup> {
        let emu = TelegramEmulator::start().await?;
        emu.group(CHAT, "supergroup", "Lobby", false).await?;
        let prosody = Prosody::start(ProsodyOptions {
            users: vec![("alice".into(), "alicepass".into()), ("carol".into(), "carolpass".into())],
            components: vec![(DOMAIN.into(), SECRET.into())],
            ..Default::default()
        })
        .await?;
        let gateway = Isthmus::start(&config(&prosody, &emu, portals), &[]).await?;
        gateway.wait_log("component link established", 1, T).await.with_context(|| gateway.log())?;
        gateway.wait_log("Telegram bot ready", 1, T).await.with_context(|| gateway.log())?;
        Ok(Setup { emu, prosody, gateway })
    }

    async fn enter(&self, user: &str, room: &str, nick: &str) -> Result<XmppClient> {
        let mut xmpp = XmppClient::connect(&self.prosody, &format!("{user}@localhost"), &format!("{user}pass")).await?;
        xmpp.join(room, nick).await?;
        xmpp.expect(T, |s| s.kind == "presence" && s.from == format!("{room}/{nick}") && s.has_status(110))
            .await
            .with_context(|| format!("{user} did not enter {room}; gateway log:\n{}", self.gateway.log()))?;
        Ok(xmpp)
    }
}

fn groupchat_from<'a>(room: &'a str, nick: &'a str, body: &'a str) -> impl Fn(&Stanza) -> bool + 'a {
    move |s| {
        s.kind == "message"
            && s.type_ == "groupchat"
            && s.from == format!("{room}/{nick}")
            && s.body.as_deref() == Some(body)
    }
}

fn entity(kind: &str, offset: u64, length: u64) -> Value {
    json!({"type": kind, "offset": offset, "length": length})
}

#[tokio::test]
async fn a_group_chat_both_ways_with_styling_edits_replies_reactions_and_deletes() -> Result<()> {
    let s = Setup::start("      - { name: lobby, chat: -1001 }\n").await?;
    let mut alice = s.enter("alice", LOBBY, "alice").await?;
    let tom = user(1001, "Tom", "tom");

    // Telegram → XMPP: entities after an emoji (UTF-16 offsets) become styling.
    let first = s
        .emu
        .say(CHAT, &tom, "😀 bold and code", json!({"entities": [entity("bold", 3, 4), entity("code", 12, 4)]}))
        .await?;
    // Tom entered the room when he first spoke.
    alice.expect(T, |st| st.kind == "presence" && st.from == format!("{LOBBY}/Tom")).await?;
    alice.expect(T, groupchat_from(LOBBY, "Tom", "😀 *bold* and `code`")).await.with_context(|| s.gateway.log())?;

    // XMPP → Telegram: the bot says it, the nick bold, styling as entities, no parse mode.
    alice.send_groupchat_with_id(LOBBY, "*hi* 😀 `x`", "a1").await?;
    let reflection = alice.expect(T, groupchat_from(LOBBY, "alice", "*hi* 😀 `x`")).await?;
    let sent = s.emu.wait_sent(CHAT, T, |m| m["text"] == "alice: hi 😀 x").await.with_context(|| s.gateway.log())?;
    assert_eq!(sent["parse_mode"], Value::Null, "{sent}");
    assert_eq!(sent["entities"], json!([entity("bold", 0, 5), entity("bold", 7, 2), entity("code", 13, 1)]), "{sent}");
    let bot_message = sent["message_id"].as_i64().context("message_id")?;

    // A correction from XMPP edits the bot's message, the nick kept.
    alice
        .send_raw(&format!(
            "<message type='groupchat' to='{LOBBY}' id='a2'><body>hi _again_</body>\
             <replace xmlns='urn:xmpp:message-correct:0' id='a1'/></message>"
        ))
        .await?;
    let edited = s
        .emu
        .wait_sent(CHAT, T, |m| m["message_id"].as_i64() == Some(bot_message) && m["text"] == "alice: hi again")
        .await?;
    assert_eq!(edited["entities"], json!([entity("bold", 0, 5), entity("italic", 10, 5)]), "{edited}");

    // Telegram → XMPP: a reply to the bot's message answers alice's; an edit is a correction.
    s.emu.say(CHAT, &tom, "yes", json!({"reply_to_message_id": bot_message})).await?;
    let reply = alice.expect(T, groupchat_from(LOBBY, "Tom", "yes")).await?;
    let alice_sid = reflection.stanza_id().context("the reflection has a stanza-id")?;
    assert!(
        reply.xml.contains("urn:xmpp:reply:0") && reply.xml.contains(&alice_sid),
        "the reply names alice's message ({alice_sid}): {}",
        reply.xml
    );
    s.emu
        .control("edit", json!({"chat_id": CHAT, "message_id": first["message_id"], "text": "😀 bold and more"}))
        .await?;
    let correction = alice.expect(T, |st| st.body.as_deref() == Some("😀 bold and more")).await?;
    assert!(correction.xml.contains("urn:xmpp:message-correct:0"), "{}", correction.xml);

    // A reaction on Telegram is native on XMPP.
    s.emu
        .control(
            "reaction",
            json!({"chat_id": CHAT, "message_id": bot_message, "user": tom, "new_reaction": [{"type": "emoji", "emoji": "👍"}]}),
        )
        .await?;
    let reaction =
        alice.expect(T, |st| st.xml.contains("urn:xmpp:reactions:0")).await.with_context(|| s.gateway.log())?;
    assert!(reaction.xml.contains("👍") && reaction.xml.contains(&alice_sid), "{}", reaction.xml);

    // A reply from XMPP is a Telegram reply to Tom's message.
    let tom_sid = alice
        .seen()
        .iter()
        .find(|x| x.contains("😀 *bold* and `code`"))
        .and_then(|x| {
            x.split("<stanza-id")
                .nth(1)
                .and_then(|r| r.split(" id=\"").nth(1))
                .map(|r| r.split('"').next().unwrap_or("").to_owned())
        })
        .context("Tom's first message had a stanza-id")?;
    alice
        .send_raw(&format!(
            "<message type='groupchat' to='{LOBBY}' id='a3'><body>agreed</body>\
             <reply xmlns='urn:xmpp:reply:0' to='{LOBBY}/Tom' id='{tom_sid}'/></message>"
        ))
        .await?;
    let answer = s.emu.wait_sent(CHAT, T, |m| m["text"] == "alice: agreed").await?;
    assert_eq!(answer["reply_to_message"]["message_id"], first["message_id"], "{answer}");

    // A retraction from XMPP deletes the bot's message.
    alice
        .send_raw(&format!(
            "<message type='groupchat' to='{LOBBY}' id='a4'><retract xmlns='urn:xmpp:message-retract:1' id='{alice_sid}'/>\
             <body>retracted</body></message>"
        ))
        .await?;
    s.emu.wait_sent(CHAT, T, |m| m["message_id"].as_i64() == Some(bot_message) && m["deleted"] == true).await?;

    // Nothing the bot said came back.
    let rest = alice.drain(Duration::from_secs(2)).await?;
    assert!(!rest.iter().any(|st| st.body.as_deref().is_some_and(|b| b.starts_with("alice:"))), "{rest:?}");
    Ok(())
}

#[tokio::test]
async fn flood_control_holds_a_burst_and_loses_nothing() -> Result<()> {
    let s = Setup::start("      - { name: lobby, chat: -1001 }\n").await?;
    let mut alice = s.enter("alice", LOBBY, "alice").await?;
    s.emu.control("ratelimit", json!({"chat_id": CHAT, "calls": 20, "per_secs": 1, "retry_after": 1})).await?;
    for i in 0..100 {
        alice.send_groupchat_with_id(LOBBY, &format!("burst {i}"), &format!("b{i}")).await?;
    }
    s.emu.wait_sent(CHAT, Duration::from_secs(90), |m| m["text"] == "alice: burst 99").await?;
    let texts: Vec<String> =
        s.emu.sent(CHAT).await?.iter().filter_map(|m| m["text"].as_str().map(str::to_owned)).collect();
    let expected: Vec<String> = (0..100).map(|i| format!("alice: burst {i}")).collect();
    assert_eq!(texts, expected, "every message once, in order");
    let calls = s.emu.get("calls?method=sendMessage").await?;
    let refused = calls.as_array().map(|c| c.iter().filter(|c| c["status"] == 429).count()).unwrap_or(0);
    assert!(refused > 0, "the limiter never answered 429: the test did not test flood control");
    let errors = alice.drain(Duration::from_secs(1)).await?;
    assert!(!errors.iter().any(|st| st.type_ == "error"), "{errors:?}");
    Ok(())
}

#[tokio::test]
async fn kill_9_during_a_burst_from_telegram_loses_and_repeats_nothing() -> Result<()> {
    let mut s = Setup::start("      - { name: lobby, chat: -1001 }\n").await?;
    let mut alice = s.enter("alice", LOBBY, "alice").await?;
    let tom = user(1001, "Tom", "tom");
    let texts: Vec<String> = (0..500).map(|i| format!("tg {i}")).collect();
    s.emu.control("messages", json!({"chat_id": CHAT, "from": tom, "texts": texts})).await?;
    // Kill the gateway while the burst is on its way.
    alice.expect(T, groupchat_from(LOBBY, "Tom", "tg 20")).await.with_context(|| s.gateway.log())?;
    s.gateway.kill().await;
    let pending = s.emu.get(&format!("updates_pending?token={BOT_TOKEN}")).await?;
    if pending["pending"].as_u64().unwrap_or(0) == 0 {
        bail!("the whole burst was confirmed before the kill: nothing was in flight ({pending})");
    }
    s.gateway.restart().await?;
    s.gateway.wait_log("Telegram bot ready", 1, T).await?;
    alice
        .expect(Duration::from_secs(60), groupchat_from(LOBBY, "Tom", "tg 499"))
        .await
        .with_context(|| s.gateway.log())?;
    let rest = alice.drain(Duration::from_secs(3)).await?;
    drop(rest);
    // Each message reached alice with one stanza-id (a copy delivered again keeps its id), in order.
    let mut ids: std::collections::HashMap<String, HashSet<String>> = std::collections::HashMap::new();
    let mut order = Vec::new();
    for xml in alice.seen() {
        let Some(body) = xml.split("<body>").nth(1).and_then(|b| b.split("</body>").next()) else { continue };
        if !body.starts_with("tg ") || !xml.contains(&format!("from=\"{LOBBY}/Tom\"")) {
            continue;
        }
        let sid =
            xml.split("<stanza-id").nth(1).and_then(|r| r.split(" id=\"").nth(1)).and_then(|r| r.split('"').next());
        let entry = ids.entry(body.to_owned()).or_default();
        if entry.is_empty() {
            order.push(body.to_owned());
        }
        entry.insert(sid.unwrap_or("").to_owned());
    }
    let missing: Vec<&String> = texts.iter().filter(|t| !ids.contains_key(*t)).collect();
    assert!(missing.is_empty(), "lost across kill -9: {missing:?}");
    let twice: Vec<(&String, &HashSet<String>)> = ids.iter().filter(|(_, s)| s.len() > 1).collect();
    assert!(twice.is_empty(), "bridged twice (two stanza-ids): {twice:?}");
    assert_eq!(order, texts, "in order");
    let pending = s.emu.get(&format!("updates_pending?token={BOT_TOKEN}")).await?;
    assert_eq!(pending["pending"], 0, "the bridge left updates unconfirmed: {pending}");
    Ok(())
}

#[tokio::test]
async fn a_group_that_becomes_a_supergroup_keeps_its_portal() -> Result<()> {
    let s = Setup::start("      - { name: lobby, chat: -1001 }\n      - { name: small, chat: -77 }\n").await?;
    s.emu.group(-77, "group", "Small", false).await?;
    let small = "small@telegram.localhost";
    let mut alice = s.enter("alice", small, "alice").await?;
    let tom = user(1001, "Tom", "tom");
    s.emu.say(-77, &tom, "before", json!({})).await?;
    alice.expect(T, groupchat_from(small, "Tom", "before")).await.with_context(|| s.gateway.log())?;
    let migrated = s.emu.control("migrate", json!({"chat_id": -77})).await?;
    let new_chat = migrated["new_chat_id"].as_i64().context("new_chat_id")?;
    // Said on the supergroup: still the same room.
    s.emu.say(new_chat, &tom, "after", json!({})).await?;
    alice.expect(T, groupchat_from(small, "Tom", "after")).await.with_context(|| s.gateway.log())?;
    alice.send_groupchat_with_id(small, "still here", "m1").await?;
    s.emu.wait_sent(new_chat, T, |m| m["text"] == "alice: still here").await.with_context(|| s.gateway.log())?;

    // After a restart the configuration's old id means the supergroup: one copy, in the new chat.
    let mut s = s;
    s.gateway.stop().await;
    s.gateway.restart().await?;
    s.gateway.wait_log("Telegram bot ready", 1, T).await?;
    // alice stays in the room: the gateway restores her session.
    s.gateway.wait_log("restored the state of the previous run", 1, T).await.with_context(|| s.gateway.log())?;
    alice.send_groupchat_with_id(small, "after restart", "m2").await?;
    s.emu.wait_sent(new_chat, T, |m| m["text"] == "alice: after restart").await.with_context(|| s.gateway.log())?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let copies = s.emu.sent(new_chat).await?.iter().filter(|m| m["text"] == "alice: after restart").count();
    assert_eq!(copies, 1, "sent once");
    assert!(s.emu.sent(-77).await?.is_empty(), "nothing went to the old group");
    s.emu.say(new_chat, &tom, "still after", json!({})).await?;
    alice.expect(T, groupchat_from(small, "Tom", "still after")).await?;
    Ok(())
}

#[tokio::test]
async fn a_group_that_is_no_portal_cannot_be_joined_or_written_to() -> Result<()> {
    let s = Setup::start("      - { name: lobby, chat: -1001 }\n").await?;
    s.emu.group(-1003, "supergroup", "Private", false).await?;
    let mut alice = XmppClient::connect(&s.prosody, "alice@localhost", "alicepass").await?;
    let room = "-1003@telegram.localhost";
    alice.join(room, "alice").await?;
    let answer = alice.expect(T, |st| st.kind == "presence" && st.from.starts_with(room)).await?;
    assert!(answer.type_ == "error" && answer.xml.contains("not a portal"), "{}", answer.xml);
    alice.send_groupchat_with_id(room, "let me in", "x1").await?;
    let refused = alice.expect(T, |st| st.kind == "message" && st.type_ == "error").await?;
    assert!(
        refused.xml.contains("not a portal")
            || refused.xml.contains("not-acceptable")
            || refused.xml.contains("forbidden"),
        "{}",
        refused.xml
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(s.emu.sent(-1003).await?.is_empty(), "the bot spoke in a group that is no portal");
    Ok(())
}

#[tokio::test]
async fn two_forum_topics_are_two_rooms() -> Result<()> {
    let s = Setup::start("      - { name: lobby, chat: -1001 }\n      - { name: news, chat: -1002, topic: 1 }\n      - { name: chat, chat: -1002, topic: 2 }\n").await?;
    s.emu.group(-1002, "supergroup", "Forum", true).await?;
    let t2 = s.emu.control("topic", json!({"chat_id": -1002, "name": "News"})).await?;
    let t3 = s.emu.control("topic", json!({"chat_id": -1002, "name": "Chat"})).await?;
    let (t2, t3) = (t2["message_thread_id"].as_i64().context("t2")?, t3["message_thread_id"].as_i64().context("t3")?);
    if (t2, t3) != (1, 2) {
        bail!("the emulator numbered the topics {t2} and {t3}; the portals name 1 and 2");
    }
    let news = "news@telegram.localhost";
    let chat = "chat@telegram.localhost";
    let mut alice = s.enter("alice", news, "alice").await?;
    let mut carol = s.enter("carol", chat, "carol").await?;
    let tom = user(1001, "Tom", "tom");
    s.emu.say(-1002, &tom, "in news", json!({"message_thread_id": 1})).await?;
    s.emu.say(-1002, &tom, "in chat", json!({"message_thread_id": 2})).await?;
    alice.expect(T, groupchat_from(news, "Tom", "in news")).await.with_context(|| s.gateway.log())?;
    carol.expect(T, groupchat_from(chat, "Tom", "in chat")).await?;
    let stray = alice.drain(Duration::from_secs(2)).await?;
    assert!(!stray.iter().any(|st| st.body.as_deref() == Some("in chat")), "{stray:?}");
    carol.send_groupchat_with_id(chat, "to the chat topic", "c1").await?;
    let sent = s.emu.wait_sent(-1002, T, |m| m["text"] == "carol: to the chat topic").await?;
    assert_eq!(sent["message_thread_id"], 2, "{sent}");
    Ok(())
}

/// Send an admin chat command to the domain and wait for the gateway's reply.
async fn command(xmpp: &mut XmppClient, text: &str) -> Result<String> {
    xmpp.send_raw(&format!("<message to='{DOMAIN}' type='chat' id='cmd'><body>{text}</body></message>")).await?;
    let reply = xmpp.expect(T, |st| st.kind == "message" && st.from == DOMAIN && st.body.is_some()).await?;
    Ok(reply.body.unwrap_or_default())
}

#[tokio::test]
async fn an_admin_links_and_unlinks_a_group_at_run_time_and_it_is_kept() -> Result<()> {
    let mut s = Setup::start("      - { name: lobby, chat: -1001 }\n").await?;
    s.emu.group(-1003, "supergroup", "Extra", false).await?;
    let extra = "extra@telegram.localhost";
    let mut carol = XmppClient::connect(&s.prosody, "carol@localhost", "carolpass").await?;
    // Not an admin: refused.
    let mut alice = XmppClient::connect(&s.prosody, "alice@localhost", "alicepass").await?;
    let refused = command(&mut alice, &format!("link extra {DOMAIN} -1003 {extra}")).await?;
    assert!(refused.starts_with("Forbidden"), "{refused}");
    let missing_room = command(&mut carol, &format!("link extra {DOMAIN} -1003")).await?;
    assert!(missing_room.contains("say which XMPP room"), "{missing_room}");
    let linked = command(&mut carol, &format!("link extra {DOMAIN} -1003 {extra}")).await?;
    assert!(linked.starts_with("Linked -1003"), "{linked}");
    let list = command(&mut carol, "portals").await?;
    assert!(list.contains(&format!("extra ({extra}):\n  {DOMAIN} -1003")), "{list}");
    let again = command(&mut carol, &format!("link other {DOMAIN} -1003 other@{DOMAIN}")).await?;
    assert!(again.contains("already linked to the portal `extra`"), "{again}");

    // Kept across a restart.
    s.gateway.stop().await;
    s.gateway.restart().await?;
    s.gateway.wait_log("Telegram bot ready", 1, T).await?;
    let mut alice = s.enter("alice", extra, "alice").await?;
    let tom = user(1001, "Tom", "tom");
    s.emu.say(-1003, &tom, "linked at run time", json!({})).await?;
    alice.expect(T, groupchat_from(extra, "Tom", "linked at run time")).await.with_context(|| s.gateway.log())?;
    alice.send_groupchat_with_id(extra, "hello extra", "e1").await?;
    s.emu.wait_sent(-1003, T, |m| m["text"] == "alice: hello extra").await?;

    let mut carol = XmppClient::connect(&s.prosody, "carol@localhost", "carolpass").await?;
    let unlinked = command(&mut carol, &format!("unlink {DOMAIN} -1003")).await?;
    assert!(unlinked.contains("no longer part of the portal extra"), "{unlinked}");
    s.emu.say(-1003, &tom, "after unlink", json!({})).await?;
    let rest = alice.drain(Duration::from_secs(3)).await?;
    assert!(!rest.iter().any(|st| st.body.as_deref() == Some("after unlink")), "{rest:?}");
    let none = command(&mut carol, &format!("unlink {DOMAIN} -1003")).await?;
    assert!(none.contains("not linked to any portal"), "{none}");
    Ok(())
}

#[tokio::test]
async fn a_group_both_ways_on_the_embedded_server() -> Result<()> {
    let emu = TelegramEmulator::start().await?;
    emu.group(CHAT, "supergroup", "Lobby", false).await?;
    let port = isthmus_tests::process::free_port();
    let mut yaml = format!(
        "xmpp:\n  mode: embedded\n  embedded:\n    domain: localhost\n    listen: 127.0.0.1:{port}\n    users:\n"
    );
    for (user, hash) in isthmus_tests::scenario::embedded_password_hashes()? {
        yaml += &format!("      - {{ jid: {user}@localhost, password_hash: \"{hash}\" }}\n");
    }
    yaml += &format!(
        "store:\n  url: sqlite://{{dir}}/isthmus.db\ntelegram:\n  - domain: {DOMAIN}\n    token: \"{BOT_TOKEN}\"\n    api_url: \"{}\"\n    poll_timeout_secs: 2\n    relay_template: \"[{{nick}}] {{text}}\"\n    portals:\n      - {{ name: lobby, chat: -1001 }}\n",
        emu.api_url()
    );
    let gateway = Isthmus::start(&yaml, &[]).await?;
    gateway.wait_log("accepting XMPP clients", 1, T).await.with_context(|| gateway.log())?;
    gateway.wait_log("Telegram bot ready", 1, T).await.with_context(|| gateway.log())?;
    let server = isthmus_tests::peers::EmbeddedC2s { port, ca_file: gateway.dir().join("tls/localhost.crt") };
    let mut alice = XmppClient::connect(&server, "alice@localhost", "alicepass").await?;
    alice.join(LOBBY, "alice").await?;
    alice.expect(T, |st| st.kind == "presence" && st.from == format!("{LOBBY}/alice") && st.has_status(110)).await?;
    let tom = user(1001, "Tom", "tom");
    emu.say(CHAT, &tom, "over the embedded server", json!({"entities": [entity("italic", 9, 8)]})).await?;
    alice.expect(T, groupchat_from(LOBBY, "Tom", "over the _embedded_ server")).await.with_context(|| gateway.log())?;
    alice.send_groupchat_with_id(LOBBY, "back ~again~", "x1").await?;
    // The admin's template, the nick still bold.
    let sent = emu.wait_sent(CHAT, T, |m| m["text"] == "[alice] back again").await.with_context(|| gateway.log())?;
    assert_eq!(sent["entities"], json!([entity("bold", 1, 5), entity("strikethrough", 13, 5)]), "{sent}");
    Ok(())
}

/// A 1×1 PNG.
const PNG: &str = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==";

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn oob_urls(xml: &str) -> Vec<String> {
    xml.split("<url>").skip(1).filter_map(|r| r.split("</url>").next()).map(|u| u.replace("&amp;", "&")).collect()
}

#[tokio::test]
async fn photos_documents_albums_and_files_too_big_both_ways() -> Result<()> {
    use base64::Engine;
    let emu = TelegramEmulator::start().await?;
    emu.group(CHAT, "supergroup", "Lobby", false).await?;
    let prosody = Prosody::start(ProsodyOptions {
        users: vec![("alice".into(), "alicepass".into())],
        components: vec![(DOMAIN.into(), SECRET.into())],
        ..Default::default()
    })
    .await?;
    let media_port = isthmus_tests::process::free_port();
    let portals = format!(
        "      - {{ name: lobby, chat: -1001 }}\n    media: {{ listen: \"127.0.0.1:{media_port}\", public_url: \"http://127.0.0.1:{media_port}/tg-media\" }}\n    fetch_private_addresses: true\n"
    );
    let gateway = Isthmus::start(&config(&prosody, &emu, &portals), &[]).await?;
    gateway.wait_log("Telegram bot ready", 1, T).await.with_context(|| gateway.log())?;
    let s = Setup { emu, prosody, gateway };
    let mut alice = s.enter("alice", LOBBY, "alice").await?;
    let tom = user(1001, "Tom", "tom");
    let png = base64::engine::general_purpose::STANDARD.decode(PNG)?;
    let http = reqwest::Client::builder().no_proxy().build()?;

    // Telegram → XMPP: a photo with a caption, through the media proxy (no token in the link).
    s.emu
        .say(
            CHAT,
            &tom,
            "",
            json!({"text": null, "photo": {"bytes_b64": PNG, "width": 1, "height": 1}, "caption": "look"}),
        )
        .await?;
    let photo = alice
        .expect(T, |st| st.from == format!("{LOBBY}/Tom") && st.xml.contains("jabber:x:oob"))
        .await
        .with_context(|| s.gateway.log())?;
    assert!(photo.body.as_deref().is_some_and(|b| b.starts_with("look\n")), "{:?}", photo.body);
    let url = oob_urls(&photo.xml).into_iter().next().context("an OOB link")?;
    assert!(url.starts_with(&format!("http://127.0.0.1:{media_port}/tg-media/")) && !url.contains(BOT_TOKEN), "{url}");
    let got = http.get(&url).send().await?;
    assert_eq!(got.headers()["content-type"], "image/jpeg", "the link's name says what it is");
    assert_eq!(got.bytes().await?.to_vec(), png);
    let forged = url.replace("/tg-media/telegram.localhost/", "/tg-media/telegram.localhost/0");
    assert_eq!(http.get(&forged).send().await?.status(), 404, "only signed links are served");

    // A document keeps its name and type.
    let notes = b"some notes\n".to_vec();
    let b64 = base64::engine::general_purpose::STANDARD.encode(&notes);
    s.emu
        .say(
            CHAT,
            &tom,
            "",
            json!({"text": null, "document": {"bytes_b64": b64, "file_name": "notes.txt", "mime_type": "text/plain"}}),
        )
        .await?;
    let doc = alice.expect(T, |st| st.from == format!("{LOBBY}/Tom") && st.xml.contains("notes.txt")).await?;
    let url = oob_urls(&doc.xml).into_iter().next().context("an OOB link")?;
    assert_eq!(http.get(&url).send().await?.bytes().await?.to_vec(), notes);

    // An album: each picture, in order.
    for caption in ["one", "two"] {
        s.emu.say(CHAT, &tom, "", json!({"text": null, "photo": {"bytes_b64": PNG, "width": 1, "height": 1}, "caption": caption, "media_group_id": "album1"})).await?;
    }
    alice.expect(T, |st| st.body.as_deref().is_some_and(|b| b.starts_with("one\n"))).await?;
    alice.expect(T, |st| st.body.as_deref().is_some_and(|b| b.starts_with("two\n"))).await?;

    // Too big for the Bot API to hand out: a notice, no link.
    let big = base64::engine::general_purpose::STANDARD.encode(vec![7u8; 21 * 1024 * 1024]);
    s.emu.say(CHAT, &tom, "", json!({"text": null, "document": {"bytes_b64": big, "file_name": "big.bin", "mime_type": "application/octet-stream"}})).await?;
    let notice = alice.expect(T, |st| st.body.as_deref().is_some_and(|b| b.contains("big.bin"))).await?;
    assert!(notice.body.as_deref().is_some_and(|b| b.contains("more than the 20 MB")), "{:?}", notice.body);
    assert!(!notice.xml.contains("jabber:x:oob"), "{}", notice.xml);

    // XMPP → Telegram: a picture goes as a photo, a text file as a document, each fetched and uploaded.
    let (port, _served) = isthmus_tests::matrix_scenario::serve_file(png.clone(), "image/png", 1).await?;
    let pic = format!("http://127.0.0.1:{port}/cat.png");
    alice
        .send_raw(&format!(
            "<message type='groupchat' to='{LOBBY}' id='f1'><body>{pic}</body><x xmlns='jabber:x:oob'><url>{pic}</url></x></message>"
        ))
        .await?;
    let sent = s.emu.wait_sent(CHAT, T, |m| m["photo"].is_array()).await.with_context(|| s.gateway.log())?;
    assert_eq!(sent["file_sha256"], sha256_hex(&png), "{sent}");
    assert_eq!(sent["caption"], "alice:", "{sent}");
    let (port, _served) = isthmus_tests::matrix_scenario::serve_file(notes.clone(), "text/plain", 1).await?;
    let file = format!("http://127.0.0.1:{port}/notes.txt");
    alice
        .send_raw(&format!(
            "<message type='groupchat' to='{LOBBY}' id='f2'><body>my notes\n{file}</body><x xmlns='jabber:x:oob'><url>{file}</url></x></message>"
        ))
        .await?;
    let sent = s.emu.wait_sent(CHAT, T, |m| m["document"].is_object()).await.with_context(|| s.gateway.log())?;
    assert_eq!(sent["file_sha256"], sha256_hex(&notes), "{sent}");
    assert_eq!(sent["caption"], "alice: my notes", "{sent}");
    assert_eq!(sent["document"]["file_name"], "notes.txt", "{sent}");
    Ok(())
}
