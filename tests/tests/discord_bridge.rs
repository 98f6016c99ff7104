//! The Discord bridge end to end: real Prosody, slixmpp on the XMPP side, and the
//! Discord API emulator (`tests/emulators/discord_api.py`) reached through the
//! bridge's `api_url` and `cdn_url` (REST, the gateway from `GET /gateway/bot`,
//! webhooks), as a proxy in front of Discord would be.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use anyhow::{Context, Result};
use isthmus_tests::discord::{BOT_TOKEN, DiscordEmulator, GENERAL, RANDOM, ann, tom};
use isthmus_tests::scenario::{SECRET, T};
use isthmus_tests::{Isthmus, Prosody, ProsodyOptions, Stanza, XmppClient};
use serde_json::{Value, json};

const DOMAIN: &str = "discord.localhost";
const LOBBY: &str = "general@discord.localhost";
/// Tom's server nickname: what XMPP shows.
const TOMMY: &str = "Tommy";

struct Setup {
    emu: DiscordEmulator,
    prosody: Prosody,
    gateway: Isthmus,
}

fn config(prosody: &Prosody, emu: &DiscordEmulator) -> String {
    format!(
        "xmpp:\n  component:\n    port: {}\n    secret: {SECRET}\naccess: {{ allow: [localhost] }}\nstore:\n  url: sqlite://{{dir}}/isthmus.db\n\
         discord:\n  - domain: {DOMAIN}\n    token: \"{BOT_TOKEN}\"\n    api_url: \"{url}\"\n    cdn_url: \"{url}\"\n    portals:\n      - {{ name: general, channel: \"{GENERAL}\" }}\n",
        prosody.component_port(),
        url = emu.url(),
    )
}

/// IDENTIFYs a fifth of a second apart (Discord: 5 s), and the bridge's debug log.
const ENV: &[(&str, &str)] = &[
    ("ISTHMUS_TEST_DISCORD_IDENTIFY_INTERVAL_MS", "200"),
    ("RUST_LOG", "info,isthmus=debug,isthmus_core=debug,isthmus_discord=debug"),
];

impl Setup {
    async fn start() -> Result<Setup> {
        Self::start_on(DiscordEmulator::start().await?).await
    }

    async fn start_on(emu: DiscordEmulator) -> Result<Setup> {
        let prosody = Prosody::start(ProsodyOptions {
            users: vec![("alice".into(), "alicepass".into()), ("carol".into(), "carolpass".into())],
            components: vec![(DOMAIN.into(), SECRET.into())],
            ..Default::default()
        })
        .await?;
        let gateway = Isthmus::start(&config(&prosody, &emu), ENV).await?;
        gateway.wait_log("component link established", 1, T).await.with_context(|| gateway.log())?;
        gateway.wait_log("Discord bot ready", 1, T).await.with_context(|| gateway.log())?;
        Ok(Setup { emu, prosody, gateway })
    }

    async fn enter(&self, user: &str, nick: &str) -> Result<XmppClient> {
        let mut xmpp = XmppClient::connect(&self.prosody, &format!("{user}@localhost"), &format!("{user}pass")).await?;
        xmpp.join(LOBBY, nick).await?;
        xmpp.expect(T, |s| s.kind == "presence" && s.from == format!("{LOBBY}/{nick}") && s.has_status(110))
            .await
            .with_context(|| format!("{user} did not enter {LOBBY}; gateway log:\n{}", self.gateway.log()))?;
        Ok(xmpp)
    }

    /// Restart the gateway and wait until its bot is back.
    async fn restart(&mut self, kill: bool) -> Result<()> {
        if kill {
            self.gateway.kill().await;
        } else {
            self.gateway.stop().await;
        }
        self.gateway.restart().await?;
        self.gateway.wait_log("Discord bot ready", 1, T).await.with_context(|| self.gateway.log())
    }
}

fn groupchat_from<'a>(nick: &'a str, body: &'a str) -> impl Fn(&Stanza) -> bool + 'a {
    move |s| {
        s.kind == "message"
            && s.type_ == "groupchat"
            && s.from == format!("{LOBBY}/{nick}")
            && s.body.as_deref() == Some(body)
    }
}

/// The stanza-id the room gave a message.
fn stanza_id(xml: &str) -> Option<String> {
    xml.split("<stanza-id")
        .nth(1)
        .and_then(|r| r.split(" id=\"").nth(1))
        .map(|r| r.split('"').next().unwrap_or("").to_owned())
}

/// Bodies `nick` said in the room, each with the stanza-ids it came with, in order of first arrival.
fn said_by(xmpp: &XmppClient, nick: &str, prefix: &str) -> (Vec<String>, HashMap<String, HashSet<String>>) {
    let mut ids: HashMap<String, HashSet<String>> = HashMap::new();
    let mut order = Vec::new();
    for xml in xmpp.seen() {
        let Some(body) = xml.split("<body>").nth(1).and_then(|b| b.split("</body>").next()) else { continue };
        if !body.starts_with(prefix) || !xml.contains(&format!("from=\"{LOBBY}/{nick}\"")) || xml.contains("<replace") {
            continue;
        }
        let entry = ids.entry(body.to_owned()).or_default();
        if entry.is_empty() {
            order.push(body.to_owned());
        }
        entry.insert(stanza_id(&xml).unwrap_or_default());
    }
    (order, ids)
}

/// Each of `texts` reached `xmpp` from `nick` once (one stanza-id), in order.
fn once_each_in_order(xmpp: &XmppClient, nick: &str, prefix: &str, texts: &[String]) {
    let (order, ids) = said_by(xmpp, nick, prefix);
    let missing: Vec<&String> = texts.iter().filter(|t| !ids.contains_key(*t)).collect();
    assert!(missing.is_empty(), "lost: {missing:?}");
    let twice: Vec<_> = ids.iter().filter(|(_, s)| s.len() > 1).collect();
    assert!(twice.is_empty(), "bridged twice (two stanza-ids): {twice:?}");
    assert_eq!(order, texts, "in order");
}

#[tokio::test]
async fn a_channel_both_ways_with_styling_mentions_edits_replies_reactions_and_deletes() -> Result<()> {
    let s = Setup::start().await?;
    let mut alice = s.enter("alice", "alice").await?;
    let (tom, ann) = (tom(), ann());
    let ann_id = ann["id"].as_str().context("id")?;

    // Discord → XMPP: markdown becomes styling, mentions readable names; Tom enters under his server nick.
    let first = s
        .emu
        .say(
            GENERAL,
            &tom,
            &format!("**bold** and *it* ~~gone~~ `code` <@{ann_id}> <@&400000000000000001> <#300000000000000002>"),
            json!({"mentions": [ann_id]}),
        )
        .await?;
    alice.expect(T, |st| st.kind == "presence" && st.from == format!("{LOBBY}/{TOMMY}")).await?;
    let tom_first = alice
        .expect(T, groupchat_from(TOMMY, "*bold* and _it_ ~gone~ `code` @Ann @mods #random"))
        .await
        .with_context(|| s.gateway.log())?;
    let tom_sid = stanza_id(&tom_first.xml).context("Tom's message has a stanza-id")?;

    // XMPP → Discord: through the webhook, as alice, styling as markdown, nothing pinging.
    alice.send_groupchat_with_id(LOBBY, "*hi* _there_ `x` @everyone <@1>", "a1").await?;
    let reflection = alice.expect(T, groupchat_from("alice", "*hi* _there_ `x` @everyone <@1>")).await?;
    let alice_sid = reflection.stanza_id().context("the reflection has a stanza-id")?;
    let posted = s.emu.wait_message(GENERAL, T, |m| m["username"] == "alice").await.with_context(|| s.gateway.log())?;
    assert_eq!(posted["content"], "**hi** *there* `x` \\@everyone \\<@1>", "{posted}");
    assert_eq!(posted["allowed_mentions"], json!({"parse": []}), "nothing bridged may ping: {posted}");
    assert_eq!(posted["mention_everyone"], false, "{posted}");
    let alice_msg = posted["id"].as_str().context("id")?.to_owned();

    // Each XMPP sender is their own nick on the webhook, made acceptable to Discord.
    let mut carol = s.enter("carol", "DiscordFan").await?;
    carol.send_groupchat_with_id(LOBBY, "me too", "c1").await?;
    let by_carol = s.emu.wait_message(GENERAL, T, |m| m["content"] == "me too").await?;
    assert_eq!(by_carol["username"], "Disc0rdFan", "{by_carol}");
    assert_eq!(by_carol["webhook_id"], posted["webhook_id"], "one webhook for the channel");

    // A correction from XMPP edits the webhook's message.
    alice
        .send_raw(&format!(
            "<message type='groupchat' to='{LOBBY}' id='a2'><body>hi ~again~</body>\
             <replace xmlns='urn:xmpp:message-correct:0' id='a1'/></message>"
        ))
        .await?;
    s.emu.wait_message(GENERAL, T, |m| m["id"] == alice_msg.as_str() && m["content"] == "hi ~~again~~").await?;

    // Discord → XMPP: Tom replies to alice's message: a reply to her stanza.
    s.emu
        .say(GENERAL, &tom, "yes", json!({"message_reference": {"message_id": alice_msg, "channel_id": GENERAL}}))
        .await?;
    let reply = alice.expect(T, groupchat_from(TOMMY, "yes")).await.with_context(|| s.gateway.log())?;
    assert!(
        reply.xml.contains("urn:xmpp:reply:0") && reply.xml.contains(&alice_sid),
        "the reply names alice's message ({alice_sid}): {}",
        reply.xml
    );

    // XMPP → Discord: alice replies to Tom: a short quote and a jump link above her text.
    alice
        .send_raw(&format!(
            "<message type='groupchat' to='{LOBBY}' id='a3'><body>agreed</body>\
             <reply xmlns='urn:xmpp:reply:0' to='{LOBBY}/{TOMMY}' id='{tom_sid}'/></message>"
        ))
        .await?;
    let answer =
        s.emu.wait_message(GENERAL, T, |m| m["content"].as_str().is_some_and(|c| c.ends_with("\nagreed"))).await?;
    let first_id = first["id"].as_str().context("id")?;
    let link = format!("{}/channels/{}/{GENERAL}/{first_id}", s.emu.url(), isthmus_tests::discord::GUILD);
    let content = answer["content"].as_str().unwrap_or_default();
    assert!(content.starts_with("> **Tommy** bold and it gone code @Ann @mods #random [↪]("), "{content}");
    assert!(content.contains(&format!("[↪]({link})")), "{content}");

    // Tom edits his first message: a correction; a link preview is not one.
    s.emu.control("edit", json!({"message_id": first_id, "content": "**bold** and more"})).await?;
    let correction = alice.expect(T, |st| st.body.as_deref() == Some("*bold* and more")).await?;
    assert!(
        correction.xml.contains("urn:xmpp:message-correct:0") && correction.xml.contains(&tom_sid),
        "{}",
        correction.xml
    );
    s.emu.control("link_preview", json!({"message_id": first_id, "url": "https://example.org"})).await?;

    // Reactions both ways: Tom's on alice's message is native on XMPP; alice's is the bot's.
    s.emu.control("reaction", json!({"message_id": alice_msg, "user": tom, "emoji": "👍", "action": "add"})).await?;
    let reaction =
        alice.expect(T, |st| st.xml.contains("urn:xmpp:reactions:0")).await.with_context(|| s.gateway.log())?;
    assert!(reaction.xml.contains("👍") && reaction.xml.contains(&alice_sid), "{}", reaction.xml);
    alice
        .send_raw(&format!(
            "<message type='groupchat' to='{LOBBY}' id='a4'><reactions xmlns='urn:xmpp:reactions:0' id='{tom_sid}'>\
             <reaction>🎉</reaction></reactions><store xmlns='urn:xmpp:hints'/></message>"
        ))
        .await?;
    s.emu
        .wait_message(GENERAL, T, |m| m["id"] == first_id && m["reactions"].to_string().contains("🎉"))
        .await
        .with_context(|| s.gateway.log())?;

    // A retraction from XMPP deletes the webhook's message.
    alice
        .send_raw(&format!(
            "<message type='groupchat' to='{LOBBY}' id='a5'><retract xmlns='urn:xmpp:message-retract:1' id='{alice_sid}'/>\
             <body>retracted</body></message>"
        ))
        .await?;
    s.emu.wait_message(GENERAL, T, |m| m["id"] == alice_msg.as_str() && m["deleted"] == true).await?;

    // Tom deletes a message after editing it: the correction, then the retraction of the original.
    let second = s.emu.say(GENERAL, &tom, "typo", json!({})).await?;
    let typo = alice.expect(T, groupchat_from(TOMMY, "typo")).await?;
    let typo_sid = stanza_id(&typo.xml).context("stanza-id")?;
    s.emu.control("edit", json!({"message_id": second["id"], "content": "fixed"})).await?;
    alice.expect(T, |st| st.body.as_deref() == Some("fixed") && st.xml.contains(&typo_sid)).await?;
    s.emu.control("delete", json!({"message_id": second["id"]})).await?;
    // The retraction names the original.
    alice
        .expect(T, |st| st.xml.contains("urn:xmpp:message-retract:1") && st.xml.contains(&typo_sid))
        .await
        .with_context(|| s.gateway.log())?;

    // Nothing looped: no webhook message came back to XMPP, none was posted twice.
    let rest = alice.drain(Duration::from_secs(2)).await?;
    let (_, from_alice) = said_by(&alice, "alice", "");
    assert!(from_alice.values().all(|ids| ids.len() == 1), "alice's messages came back: {from_alice:?}");
    let corrections =
        rest.iter().filter(|st| st.xml.contains("urn:xmpp:message-correct:0") && st.xml.contains(&tom_sid)).count();
    assert_eq!(corrections, 0, "a link preview is no edit: {rest:?}");
    let posted: Vec<String> =
        s.emu.posted(GENERAL).await?.iter().filter_map(|m| m["content"].as_str().map(str::to_owned)).collect();
    assert_eq!(posted.len(), 3, "alice's, carol's and the reply, once each: {posted:?}");
    let echoes = alice.seen().iter().filter(|x| x.contains("me too</body>")).count();
    assert_eq!(echoes, 1, "carol's message reached alice once, from carol");
    Ok(())
}

#[tokio::test]
async fn five_gateway_restarts_leave_one_webhook() -> Result<()> {
    let mut s = Setup::start().await?;
    for round in 0..=5 {
        if round > 0 {
            s.restart(false).await?;
        }
        let mut alice = s.enter("alice", "alice").await?;
        let text = format!("round {round}");
        alice.send_groupchat_with_id(LOBBY, &text, &format!("r{round}")).await?;
        s.emu.wait_message(GENERAL, T, |m| m["content"] == text.as_str()).await.with_context(|| s.gateway.log())?;
    }
    let hooks = s.emu.webhooks(GENERAL).await?;
    assert_eq!(hooks.len(), 1, "one webhook after five restarts: {hooks:#?}");
    let posted = s.emu.posted(GENERAL).await?;
    assert_eq!(posted.len(), 6, "{posted:#?}");
    assert!(posted.iter().all(|m| m["webhook_id"] == hooks[0]["id"]), "all through it: {posted:#?}");
    let created = s.emu.calls("POST", &format!("/channels/{GENERAL}/webhooks")).await?;
    assert_eq!(created.len(), 1, "made once, found again five times: {created:#?}");
    Ok(())
}

#[tokio::test]
async fn a_webhook_deleted_on_discord_is_made_again() -> Result<()> {
    let s = Setup::start().await?;
    let mut alice = s.enter("alice", "alice").await?;
    alice.send_groupchat_with_id(LOBBY, "before", "b1").await?;
    let before = s.emu.wait_message(GENERAL, T, |m| m["content"] == "before").await?;
    let hook = before["webhook_id"].as_str().context("webhook")?.to_owned();
    // Someone deletes it (the bot may, with Manage Webhooks); the bridge makes a new one.
    let resp = reqwest::Client::new()
        .delete(format!("{}/api/v10/webhooks/{hook}", s.emu.url()))
        .header("Authorization", format!("Bot {BOT_TOKEN}"))
        .send()
        .await?;
    assert!(resp.status().is_success(), "{}", resp.status());
    alice.send_groupchat_with_id(LOBBY, "after", "b2").await?;
    let after = s.emu.wait_message(GENERAL, T, |m| m["content"] == "after").await.with_context(|| s.gateway.log())?;
    assert_ne!(after["webhook_id"], before["webhook_id"]);
    assert_eq!(s.emu.webhooks(GENERAL).await?.len(), 1);
    let errors = alice.drain(Duration::from_secs(1)).await?;
    assert!(!errors.iter().any(|st| st.type_ == "error"), "{errors:?}");
    Ok(())
}

#[tokio::test]
async fn resume_after_a_dropped_connection_loses_nothing() -> Result<()> {
    let s = Setup::start().await?;
    let mut alice = s.enter("alice", "alice").await?;
    let tom = tom();
    s.emu.say(GENERAL, &tom, "before the drop", json!({})).await?;
    alice.expect(T, groupchat_from(TOMMY, "before the drop")).await?;
    // The TCP connection dies without a close frame; messages are said meanwhile.
    s.emu.fault(json!({"kind": "drop"})).await?;
    let texts: Vec<String> = (0..20).map(|i| format!("gap {i}")).collect();
    s.emu.control("messages", json!({"channel_id": GENERAL, "author": tom, "contents": texts})).await?;
    alice.expect(T, groupchat_from(TOMMY, "gap 19")).await.with_context(|| s.gateway.log())?;
    alice.drain(Duration::from_secs(2)).await?;
    once_each_in_order(&alice, TOMMY, "gap ", &texts);
    let sessions = s.emu.sessions().await?;
    assert!(sessions["resume_count"].as_u64().unwrap_or(0) >= 1, "it resumed: {sessions}");
    assert_eq!(sessions["identify_count"], 1, "without identifying again: {sessions}");
    let backfills = s.emu.calls("GET", &format!("/channels/{GENERAL}/messages")).await?;
    assert!(
        !backfills.iter().any(|c| c["query"].to_string().contains("after")),
        "a resumed session needs no reading back: {backfills:?}"
    );
    Ok(())
}

#[tokio::test]
async fn invalid_session_with_150_messages_in_the_gap_arrive_once_after_re_identify() -> Result<()> {
    let s = Setup::start().await?;
    let mut alice = s.enter("alice", "alice").await?;
    let tom = tom();
    s.emu.say(GENERAL, &tom, "before the gap", json!({})).await?;
    alice.expect(T, groupchat_from(TOMMY, "before the gap")).await?;
    // Discord is away longer than a session may be resumed: the RESUME is answered
    // INVALID_SESSION, and the bridge identifies again.
    s.emu.control("config", json!({"resume_window": 1})).await?;
    s.emu.fault(json!({"kind": "outage", "secs": 4, "drop_existing": true})).await?;
    let texts: Vec<String> = (0..150).map(|i| format!("away {i}")).collect();
    s.emu.control("messages", json!({"channel_id": GENERAL, "author": tom, "contents": texts})).await?;
    alice
        .expect(Duration::from_secs(60), groupchat_from(TOMMY, "away 149"))
        .await
        .with_context(|| format!("{}\n{}", s.gateway.log(), s.emu.log()))?;
    alice.drain(Duration::from_secs(2)).await?;
    once_each_in_order(&alice, TOMMY, "away ", &texts);
    let sessions = s.emu.sessions().await?;
    assert_eq!(sessions["identify_count"], 2, "identified again after the invalid session: {sessions}");
    let pages: Vec<Value> = s
        .emu
        .calls("GET", &format!("/channels/{GENERAL}/messages"))
        .await?
        .into_iter()
        .filter(|c| c["query"].to_string().contains("after"))
        .collect();
    assert!(pages.len() >= 2, "150 messages are two pages at least: {pages:#?}");
    // Said after the new session started: live, once.
    s.emu.say(GENERAL, &tom, "live again", json!({})).await?;
    alice.expect(T, groupchat_from(TOMMY, "live again")).await?;
    let again = alice.drain(Duration::from_secs(2)).await?;
    assert!(!again.iter().any(|st| st.body.as_deref().is_some_and(|b| b.starts_with("away "))), "{again:?}");
    Ok(())
}

#[tokio::test]
async fn kill_9_of_the_gateway_loses_and_repeats_nothing() -> Result<()> {
    let mut s = Setup::start().await?;
    let mut alice = s.enter("alice", "alice").await?;
    let tom = tom();
    let texts: Vec<String> = (0..300).map(|i| format!("dc {i}")).collect();
    s.emu.control("messages", json!({"channel_id": GENERAL, "author": tom, "contents": texts})).await?;
    alice.expect(T, groupchat_from(TOMMY, "dc 20")).await.with_context(|| s.gateway.log())?;
    s.restart(true).await?;
    alice.expect(Duration::from_secs(60), groupchat_from(TOMMY, "dc 299")).await.with_context(|| s.gateway.log())?;
    alice.drain(Duration::from_secs(3)).await?;
    // What was not bridged before the kill came from reading the channel back.
    s.gateway
        .wait_log("read back what was said while the bridge was away", 1, T)
        .await
        .with_context(|| s.gateway.log())?;
    once_each_in_order(&alice, TOMMY, "dc ", &texts);
    Ok(())
}

#[tokio::test]
async fn a_burst_of_50_from_xmpp_under_429s_arrives_in_order() -> Result<()> {
    let s = Setup::start().await?;
    let mut alice = s.enter("alice", "alice").await?;
    // Prime the webhook, then limit the channel's webhook to 5 calls a second
    // by a shared limit (the resource's, as Discord has them): the client's own
    // bucket headers do not show it, so only the 429s tell the bridge.
    alice.send_groupchat_with_id(LOBBY, "warm up", "w").await?;
    s.emu.wait_message(GENERAL, T, |m| m["content"] == "warm up").await?;
    s.emu
        .fault(json!({"kind": "ratelimit", "route": "POST /webhooks/{id}/{token}", "calls": 5, "per_secs": 1, "scope": "shared"}))
        .await?;
    for i in 0..50 {
        alice.send_groupchat_with_id(LOBBY, &format!("burst {i}"), &format!("b{i}")).await?;
    }
    s.emu
        .wait_message(GENERAL, Duration::from_secs(120), |m| m["content"] == "burst 49")
        .await
        .with_context(|| s.gateway.log())?;
    let texts: Vec<String> = s
        .emu
        .posted(GENERAL)
        .await?
        .iter()
        .filter_map(|m| m["content"].as_str().map(str::to_owned))
        .filter(|t| t.starts_with("burst "))
        .collect();
    let expected: Vec<String> = (0..50).map(|i| format!("burst {i}")).collect();
    assert_eq!(texts, expected, "every message once, in order");
    let calls: Vec<Value> = s
        .emu
        .calls("POST", "/webhooks/")
        .await?
        .into_iter()
        .filter(|c| c["body"].to_string().contains("burst "))
        .collect();
    let refused = calls.iter().filter(|c| c["status"] == 429).count();
    eprintln!("burst: {} calls, {refused} answered 429", calls.len());
    assert!(refused > 0, "Discord never answered 429: the test did not test rate limits ({} calls)", calls.len());
    // Each 429 is waited out (Retry-After), not retried in a tight loop.
    assert!(refused < 200, "{refused} refusals for 50 messages");
    let errors = alice.drain(Duration::from_secs(1)).await?;
    assert!(!errors.iter().any(|st| st.type_ == "error"), "{errors:?}");
    Ok(())
}

#[tokio::test]
async fn without_the_message_content_intent_the_operator_is_told_what_to_enable() -> Result<()> {
    let emu = DiscordEmulator::start_with(&[]).await?;
    let s = Setup::start_on(emu).await?;
    s.gateway
        .wait_log("MESSAGE CONTENT INTENT is off for the application", 1, T)
        .await
        .with_context(|| s.gateway.log())?;
    assert!(s.gateway.log().contains("Privileged Gateway Intents"), "{}", s.gateway.log());
    let _alice = s.enter("alice", "alice").await?;
    s.emu.say(GENERAL, &tom(), "invisible", json!({})).await?;
    s.gateway.wait_log("a message from Discord arrived empty", 1, T).await.with_context(|| s.gateway.log())?;
    Ok(())
}

#[tokio::test]
async fn a_channel_that_is_no_portal_cannot_be_joined_or_written_to() -> Result<()> {
    let s = Setup::start().await?;
    let mut alice = XmppClient::connect(&s.prosody, "alice@localhost", "alicepass").await?;
    let room = format!("{RANDOM}@{DOMAIN}");
    alice.join(&room, "alice").await?;
    let answer = alice.expect(T, |st| st.kind == "presence" && st.from.starts_with(&room)).await?;
    assert!(answer.type_ == "error" && answer.xml.contains("not a portal"), "{}", answer.xml);
    alice.send_groupchat_with_id(&room, "let me in", "x1").await?;
    alice.expect(T, |st| st.kind == "message" && st.type_ == "error").await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(s.emu.posted(RANDOM).await?.is_empty(), "the bot spoke in a channel that is no portal");
    Ok(())
}
