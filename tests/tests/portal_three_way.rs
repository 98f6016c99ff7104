//! One portal on three sides: an XMPP room (real Prosody), a Matrix room (real
//! Synapse, through the gateway's application service) and a Telegram group (the
//! Bot API emulator), the Telegram group linked at run time by an admin. A message
//! from each side reaches the other two exactly once, with its sender's name.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use isthmus_tests::process::free_port;
use isthmus_tests::scenario::{SECRET, T};
use isthmus_tests::telegram::{BOT_TOKEN, TelegramEmulator, user};
use isthmus_tests::{
    AppServiceRegistration, Isthmus, MatrixClient, Prosody, ProsodyOptions, Synapse, SynapseOptions, XmppClient,
};
use serde_json::json;

const MATRIX: &str = "matrix.localhost";
const TELEGRAM: &str = "telegram.localhost";
const ROOM: &str = "lobby@matrix.localhost";
const CHAT: i64 = -1001;
const ALICE_PUPPET: &str = "@_xmpp_alice=40localhost:localhost";
const BOT: &str = "@isthmus:localhost";

async fn wait_member(bob: &MatrixClient, room: &str, user: &str) -> Result<()> {
    let deadline = tokio::time::Instant::now() + T;
    while !bob.joined_members(room).await?.contains_key(user) {
        if tokio::time::Instant::now() >= deadline {
            bail!("{user} did not join {room}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// The bodies of `m.room.message` events in the room, by sender.
async fn matrix_bodies(bob: &MatrixClient, room: &str) -> Result<Vec<(String, String)>> {
    Ok(bob
        .history(room)
        .await?
        .iter()
        .filter(|e| e["type"] == "m.room.message")
        .filter_map(|e| Some((e["sender"].as_str()?.to_owned(), e["content"]["body"].as_str()?.to_owned())))
        .collect())
}

#[tokio::test]
async fn xmpp_matrix_and_telegram_in_one_portal() -> Result<()> {
    let as_port = free_port();
    let registration = AppServiceRegistration {
        id: MATRIX.into(),
        as_token: "three-way-as-token".into(),
        hs_token: "three-way-hs-token".into(),
        url: format!("http://127.0.0.1:{as_port}"),
        sender_localpart: "isthmus".into(),
        user_regex: "^@_xmpp_.*:localhost$".into(),
        alias_regex: None,
    };
    let synapse = Synapse::start(SynapseOptions { app_service: Some(registration) }).await?;
    let bob_user = synapse.register("bob", "bob-mx-pass", false).await?;
    let bob = synapse.client(&bob_user)?;
    bob.set_display_name("Bob Matrix").await?;
    let room_id = bob.create_room_with(json!({"preset": "public_chat", "name": "Lobby"})).await?;
    let emu = TelegramEmulator::start().await?;
    emu.group(CHAT, "supergroup", "Lobby", false).await?;
    let prosody = Prosody::start(ProsodyOptions {
        users: vec![("alice".into(), "alicepass".into()), ("carol".into(), "carolpass".into())],
        components: vec![(MATRIX.into(), SECRET.into()), (TELEGRAM.into(), SECRET.into())],
        ..Default::default()
    })
    .await?;
    let config = format!(
        r#"xmpp:
  component:
    port: {port}
    secret: {SECRET}
access: {{ allow: [localhost], admins: [carol@localhost] }}
store:
  url: sqlite://{{dir}}/isthmus.db
matrix:
  - domain: {MATRIX}
    data_dir: "{{dir}}/matrix"
    appservice:
      homeserver: {hs}
      server_name: localhost
      listen: "127.0.0.1:{as_port}"
      as_token: three-way-as-token
      hs_token: three-way-hs-token
    portals:
      - {{ name: lobby, room: "{room_id}" }}
telegram:
  - domain: {TELEGRAM}
    token: "{BOT_TOKEN}"
    api_url: "{api}"
    poll_timeout_secs: 2
"#,
        port = prosody.component_port(),
        hs = synapse.base_url(),
        api = emu.api_url()
    );
    let gateway = Isthmus::start(&config, &[]).await?;
    gateway.wait_log("Matrix portal room ready", 1, T).await.with_context(|| gateway.log())?;
    gateway.wait_log("Telegram bot ready", 1, T).await.with_context(|| gateway.log())?;
    wait_member(&bob, &room_id, BOT).await?;

    // The admin links the Telegram group to the Matrix portal.
    let mut carol = XmppClient::connect(&prosody, "carol@localhost", "carolpass").await?;
    carol
        .send_raw(&format!(
            "<message to='{TELEGRAM}' type='chat' id='c1'><body>link {ROOM} {TELEGRAM} {CHAT}</body></message>"
        ))
        .await?;
    let linked = carol.expect(T, |s| s.from == TELEGRAM && s.body.is_some()).await?;
    assert!(linked.body.as_deref().is_some_and(|b| b.starts_with("Linked")), "{:?}", linked.body);

    let mut alice = XmppClient::connect(&prosody, "alice@localhost", "alicepass").await?;
    alice.join(ROOM, "alice").await?;
    alice
        .expect(T, |s| s.kind == "presence" && s.from == format!("{ROOM}/alice") && s.has_status(110))
        .await
        .with_context(|| gateway.log())?;
    wait_member(&bob, &room_id, ALICE_PUPPET).await?;

    // From XMPP: Matrix (alice's own Matrix user) and Telegram (the bot, her nick bold).
    alice.send_groupchat_with_id(ROOM, "from xmpp", "x1").await?;
    bob.wait_for(&room_id, T, |e| e["sender"] == ALICE_PUPPET && e["content"]["body"] == "from xmpp").await?;
    emu.wait_sent(CHAT, T, |m| m["text"] == "alice: from xmpp").await.with_context(|| gateway.log())?;

    // From Matrix: XMPP from Bob's nick, Telegram by the bot with Bob's name.
    bob.send_text(&room_id, "from matrix").await?;
    alice
        .expect(T, |s| s.from == format!("{ROOM}/Bob Matrix") && s.body.as_deref() == Some("from matrix"))
        .await
        .with_context(|| gateway.log())?;
    emu.wait_sent(CHAT, T, |m| m["text"] == "Bob Matrix: from matrix").await.with_context(|| gateway.log())?;

    // From Telegram: XMPP from Tom's nick, Matrix by the bot for Tom.
    let tom = user(1001, "Tom", "tom");
    emu.say(CHAT, &tom, "from telegram", json!({})).await?;
    alice
        .expect(T, |s| s.from == format!("{ROOM}/Tom") && s.body.as_deref() == Some("from telegram"))
        .await
        .with_context(|| gateway.log())?;
    bob.wait_for(&room_id, T, |e| e["sender"] == BOT && e["content"]["body"] == "<Tom> from telegram")
        .await
        .with_context(|| gateway.log())?;

    // Exactly once everywhere, nothing looped back.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let on_matrix = matrix_bodies(&bob, &room_id).await?;
    let count = |body: &str| on_matrix.iter().filter(|(_, b)| b == body).count();
    assert_eq!(count("from xmpp"), 1, "{on_matrix:?}");
    assert_eq!(count("from matrix"), 1, "{on_matrix:?}");
    assert_eq!(count("<Tom> from telegram"), 1, "{on_matrix:?}");
    assert!(!on_matrix.iter().any(|(_, b)| b.contains("alice: ") || b.contains("Bob Matrix:")), "{on_matrix:?}");
    let on_telegram: Vec<String> =
        emu.sent(CHAT).await?.iter().filter_map(|m| m["text"].as_str().map(str::to_owned)).collect();
    assert_eq!(
        on_telegram,
        vec!["alice: from xmpp".to_owned(), "Bob Matrix: from matrix".to_owned()],
        "{on_telegram:?}"
    );
    let rest = alice.drain(Duration::from_secs(1)).await?;
    let seen = |body: &str| {
        alice
            .seen()
            .iter()
            .filter(|x| x.contains(&format!("<body>{body}</body>")) && x.contains("type=\"groupchat\""))
            .count()
    };
    assert_eq!(seen("from matrix"), 1, "{rest:?}");
    assert_eq!(seen("from telegram"), 1, "{rest:?}");
    assert_eq!(seen("from xmpp"), 1, "the reflection, once");
    Ok(())
}
