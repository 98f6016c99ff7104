//! Portal rooms on Matrix: one Matrix room shared by every XMPP user of the
//! gateway, where each XMPP user is a Matrix user of their own (a puppet of the
//! gateway's application service, `@_xmpp_<escaped JID>:localhost`).
//!
//! - `xmpp_users_appear_as_their_own_matrix_users_in_a_portal`: the whole way,
//!   a real Synapse with the gateway's registration, Prosody with the gateway as
//!   `matrix.localhost`, slixmpp joining `lobby@matrix.localhost`.
//! - `a_bot_account_speaks_for_xmpp_users_in_a_portal`: the same without an
//!   application service: one bot account speaks for everyone (`<nick> text`).
//! - `power_level_changes_reach_portal_occupants`: a Matrix member's power level
//!   change is their new MUC role and affiliation for the XMPP occupants.
//! - `portal_puppets_on_synapse`: the Matrix bridge alone (no XMPP), driven
//!   through the `Network` trait as the router drives it, every Matrix-side
//!   effect checked on Synapse and every event for XMPP read from its sink.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use isthmus_core::model::{
    Affiliation, ChatRef, Event, EventKind, LeaveKind, Message, MessageKey, MessageRef, NetworkId, Sender,
};
use isthmus_core::network::{DeliveryError, EventSink, EventStream, Network};
use isthmus_tests::matrix::MatrixError;
use isthmus_tests::matrix_scenario::{oob_url, serve_file};
use isthmus_tests::process::free_port;
use isthmus_tests::scenario::{SECRET, T};
use isthmus_tests::{
    AppServiceRegistration, Isthmus, MatrixClient, Prosody, ProsodyOptions, Synapse, SynapseOptions, XmppClient,
};
use serde_json::{Value, json};

const DOMAIN: &str = "matrix.localhost";
const AS_TOKEN: &str = "isthmus-test-as-token";
const HS_TOKEN: &str = "isthmus-test-hs-token";
/// The puppet of alice@localhost.
const ALICE_PUPPET: &str = "@_xmpp_alice=40localhost:localhost";
const BOT: &str = "@isthmus:localhost";

fn registration(as_port: u16) -> AppServiceRegistration {
    AppServiceRegistration {
        id: DOMAIN.into(),
        as_token: AS_TOKEN.into(),
        hs_token: HS_TOKEN.into(),
        url: format!("http://127.0.0.1:{as_port}"),
        sender_localpart: "isthmus".into(),
        user_regex: "^@_xmpp_.*:localhost$".into(),
        alias_regex: None,
    }
}

/// The `matrix:` entry of the gateway's configuration.
fn matrix_config(synapse: &Synapse, as_port: u16, room: &str) -> String {
    let media_port = free_port();
    format!(
        r#"matrix:
  - domain: {DOMAIN}
    data_dir: "{{dir}}/matrix"
    fetch_private_addresses: true
    media:
      listen: "127.0.0.1:{media_port}"
      public_url: "http://127.0.0.1:{media_port}/media"
    appservice:
      homeserver: {hs}
      server_name: localhost
      listen: "127.0.0.1:{as_port}"
      as_token: {AS_TOKEN}
      hs_token: {HS_TOKEN}
    portals:
      - name: lobby
        room: "{room}"
"#,
        hs = synapse.base_url()
    )
}

/// The user's display name in the room, from its member event.
async fn member_name(bob: &MatrixClient, room: &str, user: &str) -> Result<Option<String>> {
    Ok(bob.joined_members(room).await?.get(user).cloned().flatten())
}

async fn wait_member(bob: &MatrixClient, room: &str, user: &str, present: bool) -> Result<()> {
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let members = bob.joined_members(room).await?;
        if members.contains_key(user) == present {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "{user} {} the room within {T:?}; members: {members:?}",
                if present { "did not join" } else { "did not leave" }
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Synapse with the gateway's application service, bob on it with a public room
/// made with `room` (createRoom options), Prosody with `users` (password
/// `USERpass`), and the gateway serving that room as the portal `lobby`.
struct PortalSetup {
    _synapse: Synapse,
    bob: MatrixClient,
    room_id: String,
    prosody: Prosody,
    gateway: Isthmus,
}

impl PortalSetup {
    async fn start(users: &[&str], room: Value) -> Result<PortalSetup> {
        let as_port = free_port();
        let synapse = Synapse::start(SynapseOptions { app_service: Some(registration(as_port)) }).await?;
        let bob_user = synapse.register("bob", "bob-mx-pass", false).await?;
        let bob = synapse.client(&bob_user)?;
        bob.set_display_name("Bob Matrix").await?;
        // A public room: the bot and the puppets join by themselves.
        let room_id = bob.create_room_with(room).await?;
        let prosody = Prosody::start(ProsodyOptions {
            users: users.iter().map(|u| (u.to_string(), format!("{u}pass"))).collect(),
            components: vec![(DOMAIN.into(), SECRET.into())],
            ..Default::default()
        })
        .await?;
        let config = format!(
            "xmpp:\n  component:\n    port: {}\n    secret: {SECRET}\naccess: {{ allow: [localhost] }}\nstore:\n  url: sqlite://{{dir}}/isthmus.db\n{}",
            prosody.component_port(),
            matrix_config(&synapse, as_port, &room_id)
        );
        let gateway = Isthmus::start(&config, &[]).await?;
        gateway.wait_log("component link established", 1, T).await?;
        if gateway.wait_log("Matrix portal room ready", 1, T).await.is_err() {
            bail!(
                "the gateway never made its Matrix bot join the portal room (is MatrixNetwork::start_portals called \
                 after restore() in component/src/app.rs?); log:\n{}",
                gateway.log()
            );
        }
        wait_member(&bob, &room_id, BOT, true).await?;
        Ok(PortalSetup { _synapse: synapse, bob, room_id, prosody, gateway })
    }
}

#[tokio::test]
async fn xmpp_users_appear_as_their_own_matrix_users_in_a_portal() -> Result<()> {
    let PortalSetup { _synapse, bob, room_id, prosody, gateway } = PortalSetup::start(
        &["alice"],
        json!({"preset": "public_chat", "name": "Lobby", "topic": "The portal's topic"}),
    )
    .await?;

    // Alice enters the portal from XMPP.
    let mut alice = XmppClient::connect(&prosody, "alice@localhost/phone", "alicepass").await?;
    let room_jid = format!("lobby@{DOMAIN}");
    alice.join(&room_jid, "Alice").await?;
    let joined = alice
        .expect(Duration::from_secs(30), |s| {
            s.kind == "presence" && s.from == format!("{room_jid}/Alice") && (s.has_status(110) || s.type_ == "error")
        })
        .await
        .context("no answer to alice's join of the portal")?;
    if joined.type_ == "error" {
        bail!("the gateway refused alice's join of the portal: {}", joined.xml);
    }

    // On Matrix: her own user, registered and joined under her nick.
    wait_member(&bob, &room_id, ALICE_PUPPET, true).await?;
    assert_eq!(member_name(&bob, &room_id, ALICE_PUPPET).await?.as_deref(), Some("Alice"));
    // On XMPP: bob is an occupant under his display name.
    alice.expect(T, |s| s.kind == "presence" && s.from == format!("{room_jid}/Bob Matrix")).await?;

    // XMPP → Matrix, sent as alice's puppet.
    alice.send_groupchat(&room_jid, "hello from xmpp").await?;
    let seen = bob
        .wait_for(&room_id, T, |e| e["type"] == "m.room.message" && e["content"]["body"] == "hello from xmpp")
        .await?;
    assert_eq!(seen["sender"], json!(ALICE_PUPPET));

    // Matrix → XMPP, from bob's nick in the portal.
    bob.send_text(&room_id, "hello from matrix").await?;
    alice
        .expect(T, |s| {
            s.kind == "message"
                && s.type_ == "groupchat"
                && s.from == format!("{room_jid}/Bob Matrix")
                && s.body.as_deref() == Some("hello from matrix")
        })
        .await?;
    // What the puppet said is not bridged back as a second copy.
    let rest = alice.drain(Duration::from_secs(2)).await?;
    let copies = rest.iter().filter(|s| s.body.as_deref() == Some("hello from xmpp")).count();
    assert!(copies <= 1, "alice's message came back {copies} more times: {rest:?}");

    // A file each way. Matrix → XMPP: no XMPP user has a Matrix account linked, so
    // the media proxy downloads bob's image through the application service.
    let mut picture = b"\x89PNG\r\n\x1a\nportal".to_vec();
    picture.extend((0..1024u32).map(|i| (i * 11 + 1) as u8));
    let mxc = bob.upload(&picture, "image/png", "portal.png").await?;
    bob.send_event(
        &room_id,
        "m.room.message",
        json!({"msgtype": "m.image", "body": "portal.png", "url": mxc, "info": {"mimetype": "image/png", "size": picture.len()}}),
    )
    .await?;
    let m = alice.expect(T, |s| s.from == format!("{room_jid}/Bob Matrix") && s.xml.contains("jabber:x:oob")).await?;
    let url = oob_url(&m.xml).context("no XEP-0066 URL")?;
    let response = reqwest::get(&url).await?;
    assert_eq!(response.status(), reqwest::StatusCode::OK, "{url}\n{}", gateway.log());
    assert!(response.bytes().await?.as_ref() == picture.as_slice(), "the proxy served other bytes");
    // XMPP → Matrix: alice's file, uploaded by her puppet.
    let mut photo = b"\x89PNG\r\n\x1a\nalice-portal".to_vec();
    photo.extend((0..1024u32).map(|i| (i * 5 + 2) as u8));
    let (port, server) = serve_file(photo.clone(), "image/png", 1).await?;
    let file_url = format!("http://127.0.0.1:{port}/up/photo.png");
    alice
        .send_raw(&format!(
            "<message type='groupchat' to='{room_jid}' id='pfile'><body>{file_url}</body>\
             <x xmlns='jabber:x:oob'><url>{file_url}</url></x></message>"
        ))
        .await?;
    let event = bob
        .wait_for(&room_id, T, |e| e["sender"] == json!(ALICE_PUPPET) && e["content"]["msgtype"] == "m.image")
        .await?;
    assert_eq!(event["content"]["body"], "photo.png", "{event}");
    let uploaded = bob.download(event["content"]["url"].as_str().unwrap_or_default()).await?;
    assert!(uploaded == photo, "the homeserver holds {} other bytes", uploaded.len());
    server.abort();
    Ok(())
}

/// Without an application service: the gateway's bot account (logged in with the
/// password in the YAML) speaks for every XMPP user (`<nick> text`), and what happens
/// in the room reaches every XMPP occupant through the bot's own sync. The room is
/// invite-only and the bot is invited after the gateway started (its sync accepts).
#[tokio::test]
async fn a_bot_account_speaks_for_xmpp_users_in_a_portal() -> Result<()> {
    let synapse = Synapse::start(SynapseOptions::default()).await?;
    let bob_user = synapse.register("bob", "bob-mx-pass", false).await?;
    let bot_user = synapse.register("gatewaybot", "bot-mx-pass", false).await?;
    let bob = synapse.client(&bob_user)?;
    bob.set_display_name("Bob Matrix").await?;
    let room_id = bob.create_room_with(json!({"preset": "private_chat", "name": "Bot lobby"})).await?;
    let prosody = Prosody::start(ProsodyOptions {
        users: vec![("alice".into(), "alicepass".into()), ("carol".into(), "carolpass".into())],
        components: vec![(DOMAIN.into(), SECRET.into())],
        ..Default::default()
    })
    .await?;
    let config = format!(
        r#"xmpp:
  component:
    port: {port}
    secret: {SECRET}
access:
  allow: [localhost]
store:
  url: sqlite://{{dir}}/isthmus.db
matrix:
  - domain: {DOMAIN}
    data_dir: "{{dir}}/matrix"
    fetch_private_addresses: true
    media:
      listen: "127.0.0.1:{media_port}"
      public_url: "http://127.0.0.1:{media_port}/media"
    bot:
      homeserver: {hs}
      user_id: "{bot}"
      password: ${{ISTHMUS_BOT_PASSWORD}}
    portals:
      - name: lobby
        room: "{room_id}"
"#,
        port = prosody.component_port(),
        hs = synapse.base_url(),
        bot = bot_user.user_id,
        media_port = free_port(),
    );
    let gateway = Isthmus::start(&config, &[("ISTHMUS_BOT_PASSWORD", bot_user.password.as_str())]).await?;
    gateway.wait_log("component link established", 1, T).await?;
    gateway.wait_log("the portal bot logged in", 1, T).await.with_context(|| gateway.log())?;
    // Invited now, the bot joins from its sync.
    bob.invite(&room_id, &bot_user.user_id).await?;
    wait_member(&bob, &room_id, &bot_user.user_id, true).await.with_context(|| gateway.log())?;

    let room_jid = format!("lobby@{DOMAIN}");
    let mut occupants = Vec::new();
    for (user, nick) in [("alice", "Alice"), ("carol", "Carol")] {
        let mut xmpp =
            XmppClient::connect(&prosody, &format!("{user}@localhost/phone"), &format!("{user}pass")).await?;
        xmpp.join(&room_jid, nick).await?;
        let joined = xmpp
            .expect(Duration::from_secs(30), |s| {
                s.kind == "presence"
                    && s.from == format!("{room_jid}/{nick}")
                    && (s.has_status(110) || s.type_ == "error")
            })
            .await?;
        if joined.type_ == "error" {
            bail!("the gateway refused {user}'s join of the bot portal: {}", joined.xml);
        }
        // Bob is an occupant; the bot is not (it is the gateway).
        xmpp.expect(T, |s| s.kind == "presence" && s.from == format!("{room_jid}/Bob Matrix")).await?;
        occupants.push(xmpp);
    }
    // No Matrix user of their own: only bob and the bot are in the room.
    let members = bob.joined_members(&room_id).await?;
    assert_eq!(members.len(), 2, "{members:?}");

    // XMPP → Matrix: the bot says it, prefixed with the nick; a correction edits it.
    occupants[0].send_groupchat_with_id(&room_jid, "hello *from* xmpp", "a1").await?;
    let seen = bob
        .wait_for(&room_id, T, |e| e["type"] == "m.room.message" && e["content"]["body"] == "<Alice> hello *from* xmpp")
        .await?;
    assert_eq!(seen["sender"], json!(bot_user.user_id));
    assert_eq!(seen["content"]["formatted_body"], "&lt;Alice&gt; hello <strong>from</strong> xmpp", "{seen}");
    occupants[0]
        .send_raw(&format!(
            "<message type='groupchat' to='{room_jid}' id='a2'><body>hello again</body>\
             <replace xmlns='urn:xmpp:message-correct:0' id='a1'/></message>"
        ))
        .await?;
    let edit = bob.wait_for(&room_id, T, |e| e["content"]["m.new_content"]["body"] == "<Alice> hello again").await?;
    assert_eq!(edit["content"]["m.relates_to"]["event_id"], seen["event_id"], "{edit}");
    assert_eq!(edit["sender"], json!(bot_user.user_id));

    // Matrix → XMPP: every occupant gets bob's message from his nick.
    bob.send_text(&room_id, "hello from matrix").await?;
    for xmpp in &mut occupants {
        xmpp.expect(T, |s| {
            s.kind == "message"
                && s.type_ == "groupchat"
                && s.from == format!("{room_jid}/Bob Matrix")
                && s.body.as_deref() == Some("hello from matrix")
        })
        .await?;
    }
    // What the bot said is not bridged back.
    let rest = occupants[1].drain(Duration::from_secs(2)).await?;
    let echoes = rest.iter().filter(|s| s.body.as_deref().is_some_and(|b| b.contains("<Alice>"))).count();
    assert_eq!(echoes, 0, "the bot's own messages came back: {rest:?}");

    // A file each way: bob's image is downloaded through the bot's login (nobody has a
    // Matrix account linked); alice's is uploaded by the bot, captioned with her nick.
    let picture = b"\x89PNG\r\n\x1a\nbot-portal".to_vec();
    let mxc = bob.upload(&picture, "image/png", "b.png").await?;
    bob.send_event(&room_id, "m.room.message", json!({"msgtype": "m.image", "body": "b.png", "url": mxc})).await?;
    let m = occupants[1]
        .expect(T, |s| s.from == format!("{room_jid}/Bob Matrix") && s.xml.contains("jabber:x:oob"))
        .await?;
    let url = oob_url(&m.xml).context("no XEP-0066 URL")?;
    let response = reqwest::get(&url).await?;
    assert_eq!(response.status(), reqwest::StatusCode::OK, "{url}");
    assert!(response.bytes().await?.as_ref() == picture.as_slice(), "the proxy served other bytes");
    let photo = b"\x89PNG\r\n\x1a\nalice-bot-portal".to_vec();
    let (port, server) = serve_file(photo.clone(), "image/png", 1).await?;
    let file_url = format!("http://127.0.0.1:{port}/up/photo.png");
    occupants[0]
        .send_raw(&format!(
            "<message type='groupchat' to='{room_jid}' id='bfile'><body>{file_url}</body>\
             <x xmlns='jabber:x:oob'><url>{file_url}</url></x></message>"
        ))
        .await?;
    let event = bob
        .wait_for(&room_id, T, |e| e["sender"] == json!(bot_user.user_id) && e["content"]["msgtype"] == "m.image")
        .await?;
    assert_eq!(event["content"]["body"], "<Alice> photo.png", "{event}");
    assert_eq!(event["content"]["filename"], "photo.png", "{event}");
    let uploaded = bob.download(event["content"]["url"].as_str().unwrap_or_default()).await?;
    assert!(uploaded == photo, "the homeserver holds {} other bytes", uploaded.len());
    server.abort();
    Ok(())
}

/// Log `user` in and enter the portal as `nick`, asking for `history` messages of
/// history; returns the client once its self-presence (110) arrived.
async fn enter_portal(prosody: &Prosody, user: &str, nick: &str, history: u32) -> Result<XmppClient> {
    let mut xmpp = XmppClient::connect(prosody, &format!("{user}@localhost/phone"), &format!("{user}pass")).await?;
    let room_jid = format!("lobby@{DOMAIN}");
    xmpp.join_with_history(&room_jid, nick, history).await?;
    let joined = xmpp
        .expect(Duration::from_secs(30), |s| {
            s.kind == "presence" && s.from == format!("{room_jid}/{nick}") && (s.has_status(110) || s.type_ == "error")
        })
        .await?;
    if joined.type_ == "error" {
        bail!("the gateway refused {user}'s join of the portal: {}", joined.xml);
    }
    Ok(xmpp)
}

/// A portal room is one conversation for everyone, so it keeps one shared archive:
/// what a Matrix user and an XMPP user said reaches the join history and a MAM
/// query of an XMPP user who entered later, each message exactly once, stored
/// once without an owner. The portal's `status` command says it is shared and
/// what it is linked to.
/// Power levels in a portal: a Matrix member raised to 50 becomes a moderator (an
/// admin) for the XMPP occupants, and a participant again when lowered.
#[tokio::test]
async fn power_level_changes_reach_portal_occupants() -> Result<()> {
    let PortalSetup { _synapse, bob, room_id, prosody, gateway } =
        PortalSetup::start(&["alice"], json!({"preset": "public_chat", "name": "Lobby"})).await?;
    let dave_user = _synapse.register("dave", "dave-mx-pass", false).await?;
    let dave = _synapse.client(&dave_user)?;
    dave.set_display_name("Dave Matrix").await?;
    dave.join(&room_id).await?;
    let room_jid = format!("lobby@{DOMAIN}");
    let dave_nick = format!("{room_jid}/Dave Matrix");
    let dave_as = |role: &'static str, affiliation: &'static str| {
        let from = dave_nick.clone();
        move |s: &isthmus_tests::Stanza| {
            s.kind == "presence"
                && s.type_ != "unavailable"
                && s.from == from
                && s.xml.contains(&format!("role=\"{role}\""))
                && s.xml.contains(&format!("affiliation=\"{affiliation}\""))
        }
    };
    let mut alice = enter_portal(&prosody, "alice", "Alice", 0).await?;
    alice.expect(T, dave_as("participant", "member")).await?;

    for (level, role, affiliation) in [(50, "moderator", "admin"), (0, "participant", "member")] {
        let mut levels = bob.state(&room_id, "m.room.power_levels", "").await?;
        levels["users"][dave.user_id()] = json!(level);
        bob.send_state(&room_id, "m.room.power_levels", "", levels).await?;
        alice
            .expect(T, dave_as(role, affiliation))
            .await
            .with_context(|| format!("dave at level {level}; log:\n{}", gateway.log()))?;
    }
    Ok(())
}

#[tokio::test]
async fn a_portal_room_keeps_one_shared_archive() -> Result<()> {
    let PortalSetup { _synapse, bob, room_id, prosody, gateway } =
        PortalSetup::start(&["alice", "carol", "dave"], json!({"preset": "public_chat", "name": "Lobby"})).await?;
    let room_jid = format!("lobby@{DOMAIN}");

    let mut alice = enter_portal(&prosody, "alice", "Alice", 0).await?;
    let mut carol = enter_portal(&prosody, "carol", "Carol", 0).await?;
    wait_member(&bob, &room_id, "@_xmpp_carol=40localhost:localhost", true).await?;

    // One message from Matrix, one from carol: both seen live by alice.
    bob.send_text(&room_id, "shared from matrix").await?;
    let from_bob = |s: &isthmus_tests::Stanza| {
        s.type_ == "groupchat"
            && s.from == format!("{room_jid}/Bob Matrix")
            && s.body.as_deref() == Some("shared from matrix")
    };
    alice.expect(T, from_bob).await?;
    carol.expect(T, from_bob).await?;
    carol.send_groupchat(&room_jid, "shared from carol").await?;
    let from_carol = |s: &isthmus_tests::Stanza| {
        s.type_ == "groupchat"
            && s.from == format!("{room_jid}/Carol")
            && s.body.as_deref() == Some("shared from carol")
    };
    carol.expect(T, from_carol).await?;
    alice.expect(T, from_carol).await?;
    bob.wait_for(&room_id, T, |e| e["content"]["body"] == "shared from carol").await?;
    // Anything coming back late (an echo) would show in the archive below.
    alice.drain(Duration::from_secs(2)).await?;

    // Dave enters later: the history on join has both, once each, oldest first.
    let mut dave = enter_portal(&prosody, "dave", "Dave", 20).await?;
    let mut history = Vec::new();
    loop {
        let m = dave.expect(T, |s| s.kind == "message" && s.from.starts_with(room_jid.as_str())).await?;
        if m.xml.contains("<subject") {
            break;
        }
        assert!(m.xml.contains("urn:xmpp:delay"), "history is delayed: {}", m.xml);
        history.push((m.from.clone(), m.body.clone().unwrap_or_default()));
    }
    assert_eq!(
        history,
        vec![
            (format!("{room_jid}/Bob Matrix"), "shared from matrix".to_owned()),
            (format!("{room_jid}/Carol"), "shared from carol".to_owned()),
        ],
        "dave's history on join"
    );

    // Dave's MAM query of the room: the same two, once each.
    dave.send_raw(&format!(
        "<iq type='set' id='mam1' to='{room_jid}'><query xmlns='urn:xmpp:mam:2' queryid='q1'/></iq>"
    ))
    .await?;
    let mut found = Vec::new();
    loop {
        let st = dave.expect(T, |s| (s.kind == "iq" && s.id == "mam1") || s.xml.contains("queryid=\"q1\"")).await?;
        if st.kind == "iq" {
            assert_eq!(st.type_, "result", "{}", st.xml);
            assert!(st.xml.contains("complete=\"true\""), "{}", st.xml);
            break;
        }
        let body = st.xml.split("<body>").nth(1).and_then(|b| b.split("</body>").next()).unwrap_or_default();
        found.push(body.to_owned());
    }
    assert_eq!(found, ["shared from matrix", "shared from carol"], "dave's MAM query");

    // Stored once each, in the room's shared archive (no owner).
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}/isthmus.db", gateway.dir().display())).await?;
    let rows: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT body, owner FROM archive WHERE room = ?1 ORDER BY archive_id")
            .bind(&room_jid)
            .fetch_all(&pool)
            .await?;
    assert_eq!(
        rows,
        vec![("shared from matrix".to_owned(), None), ("shared from carol".to_owned(), None)],
        "the archive rows of the portal"
    );

    // The portal's status: shared, linked to the Matrix room.
    dave.send_raw(&format!(
        "<iq type='set' id='st1' to='{room_jid}'><command xmlns='http://jabber.org/protocol/commands' node='status' action='execute'/></iq>"
    ))
    .await?;
    let status = dave.expect(T, |s| s.kind == "iq" && s.id == "st1").await?;
    assert_eq!(status.type_, "result", "{}", status.xml);
    for part in ["joined as Dave", "A shared room", "Linked to"] {
        assert!(status.xml.contains(part), "`{part}` missing: {}", status.xml);
    }
    Ok(())
}

// --- the bridge alone ---------------------------------------------------------------

/// What the bridge hands the router, taken in as the router does (its
/// acknowledgement fired, so the bridge acknowledges the homeserver's transaction).
type Events = tokio::sync::mpsc::UnboundedReceiver<Event>;

fn take_in(mut stream: EventStream) -> Events {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(mut e) = stream.recv().await {
            if let Some(routed) = e.routed.take() {
                routed.fire();
            }
            if tx.send(e).is_err() {
                break;
            }
        }
    });
    rx
}

/// The next event from the bridge matching `pred`, within `timeout`.
async fn next_event(events: &mut Events, timeout: Duration, pred: impl Fn(&Event) -> bool) -> Result<Event> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut seen = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(e)) if pred(&e) => return Ok(e),
            Ok(Some(e)) => seen.push(format!("{} from {} ({:?})", e.kind.name(), e.sender.id, e.kind)),
            Ok(None) => bail!("the bridge's sink closed; before: {seen:#?}"),
            Err(_) => bail!("no matching event within {timeout:?}; seen: {seen:#?}"),
        }
    }
}

/// Everything from the bridge until it is quiet for `quiet`.
async fn drain(events: &mut Events, quiet: Duration) -> Vec<Event> {
    let mut out = Vec::new();
    while let Ok(Some(e)) = tokio::time::timeout(quiet, events.recv()).await {
        out.push(e);
    }
    out
}

fn from_alice(net: &NetworkId, room: &str, key: &str, kind: EventKind) -> Event {
    let mut e =
        Event::new(NetworkId::xmpp(), ChatRef::room(net.clone(), room), Sender::own("alice@localhost", "Alice"), kind);
    e.key = MessageKey(key.into());
    e
}

#[tokio::test]
async fn portal_puppets_on_synapse() -> Result<()> {
    let as_port = free_port();
    let synapse = Synapse::start(SynapseOptions { app_service: Some(registration(as_port)) }).await?;
    let bob_user = synapse.register("bob", "bob-mx-pass", false).await?;
    let bob = synapse.client(&bob_user)?;
    bob.set_display_name("Bob Matrix").await?;
    // A private room the bot is invited to: the bot accepts, and invites the puppets.
    let room_id = bob
        .create_room_with(
            json!({"preset": "private_chat", "name": "Lobby", "topic": "The portal's topic", "invite": [BOT]}),
        )
        .await?;

    let dir = tempfile::tempdir()?;
    let yaml = format!(
        "xmpp:\n  component:\n    port: 5347\n    secret: {SECRET}\naccess: {{ allow: [localhost] }}\nstore:\n  url: sqlite://{{dir}}/isthmus.db\n{}",
        matrix_config(&synapse, as_port, &room_id)
    )
    .replace("{dir}", &dir.path().display().to_string());
    let config =
        isthmus_config::from_str(&yaml, &dir.path().join("isthmus.yaml")).map_err(|e| anyhow::anyhow!("{e}"))?;
    let store =
        isthmus_core::store::Store::connect(&format!("sqlite://{}/isthmus.db", dir.path().display()), 1).await?;
    store.migrate().await?;
    let (sink, stream) = EventSink::channel(256);
    let mut events = take_in(stream);
    let net_id = NetworkId::new(DOMAIN);
    let net = isthmus_matrix::MatrixNetwork::new(net_id.clone(), config.matrix[0].clone(), dir.path(), store, sink);
    net.start_portals().await;
    wait_member(&bob, &room_id, BOT, true).await?;
    let portal = ChatRef::room(net_id.clone(), room_id.clone());

    // The transaction server checks the homeserver's token.
    let as_url = format!("http://127.0.0.1:{as_port}");
    let status_of = |r: Result<Value>| r.err().and_then(|e| e.downcast_ref::<MatrixError>().map(|m| m.status));
    let anonymous = MatrixClient::from_token(&as_url, "@hs:localhost", "")?;
    let wrong = MatrixClient::from_token(&as_url, "@hs:localhost", "not-the-token")?;
    let homeserver = MatrixClient::from_token(&as_url, "@hs:localhost", HS_TOKEN)?;
    let user_path = |u: &str| format!("/_matrix/app/v1/users/{}", isthmus_tests::matrix::encode(u));
    let get = reqwest::Method::GET;
    assert_eq!(status_of(anonymous.call(get.clone(), &user_path("@nobody:localhost"), None).await), Some(401));
    assert_eq!(status_of(wrong.call(get.clone(), &user_path("@nobody:localhost"), None).await), Some(403));
    assert_eq!(status_of(homeserver.call(get.clone(), &user_path("@_xmpp_nobody:localhost"), None).await), Some(404));

    // An unknown room is refused with a clear text.
    let refused =
        net.deliver(from_alice(&net_id, "!elsewhere:localhost", "k0", EventKind::Message(Message::text("x")))).await;
    assert!(matches!(&refused, Err(DeliveryError::Rejected(t)) if t.contains("not a portal room")), "{refused:?}");

    // Alice enters: her puppet is registered, invited, joined under her nick; XMPP learns who is there.
    net.deliver(from_alice(&net_id, &room_id, "k1", EventKind::JoinRequest { nick: "Alice".into(), password: None }))
        .await?;
    let joined = next_event(&mut events, T, |e| matches!(e.kind, EventKind::SelfJoined { .. })).await?;
    assert_eq!(joined.account, None);
    assert_eq!(joined.chat, portal);
    assert_eq!(joined.sender, Sender::own("alice@localhost", "Alice"));
    let EventKind::SelfJoined { nick, occupants, topic } = &joined.kind else { unreachable!() };
    assert_eq!(nick, "Alice");
    assert_eq!(topic.as_deref(), Some("The portal's topic"));
    assert_eq!(occupants.len(), 1, "only bob, not the bot nor the puppet: {occupants:?}");
    assert_eq!((occupants[0].id.as_str(), occupants[0].nick.as_str()), (bob.user_id(), "Bob Matrix"));
    assert_eq!(occupants[0].affiliation, Affiliation::Owner);
    wait_member(&bob, &room_id, ALICE_PUPPET, true).await?;
    assert_eq!(member_name(&bob, &room_id, ALICE_PUPPET).await?.as_deref(), Some("Alice"));
    // The room is not public: the bot invited her puppet.
    bob.wait_for(&room_id, T, |e| {
        e["type"] == "m.room.member"
            && e["state_key"] == ALICE_PUPPET
            && e["content"]["membership"] == "invite"
            && e["sender"] == BOT
    })
    .await?;
    assert_eq!(
        status_of(homeserver.call(get.clone(), &user_path(ALICE_PUPPET), None).await),
        None,
        "a known puppet is 200"
    );

    // A message as the puppet; a replay of the same event is the same Matrix event.
    let hello = from_alice(&net_id, &room_id, "k2", EventKind::Message(Message::text("hello from xmpp")));
    let ids = net.deliver(hello.clone()).await?.remote_ids;
    assert_eq!(ids.len(), 1);
    let seen = bob
        .wait_for(&room_id, T, |e| e["type"] == "m.room.message" && e["content"]["body"] == "hello from xmpp")
        .await?;
    assert_eq!((seen["sender"].as_str(), seen["event_id"].as_str()), (Some(ALICE_PUPPET), Some(ids[0].as_str())));
    assert_eq!(net.deliver(hello).await?.remote_ids, ids, "a replay is deduplicated by its transaction id");
    let hello_id = ids[0].clone();

    // Bob's message reaches XMPP as his, in the portal, with no account; the puppet's does not come back.
    let bob_msg = bob.send_text(&room_id, "hello from matrix").await?;
    let got = next_event(&mut events, T, |e| matches!(&e.kind, EventKind::Message(m) if m.body == "hello from matrix"))
        .await?;
    assert_eq!((got.account.clone(), got.chat.clone()), (None, portal.clone()));
    assert_eq!(got.sender, Sender::new(bob.user_id(), "Bob Matrix"));
    assert_eq!(got.origin_ids, vec![bob_msg.clone()]);

    // Reactions as the puppet: a full set each time.
    let react = |key: &str, emojis: &[&str]| {
        from_alice(
            &net_id,
            &room_id,
            key,
            EventKind::Reactions {
                target: MessageRef(bob_msg.clone()),
                emojis: emojis.iter().map(|e| e.to_string()).collect(),
            },
        )
    };
    let r = net.deliver(react("k3", &["👍", "🎉"])).await?.remote_ids;
    assert_eq!(r.len(), 2);
    let rel = bob.relations(&room_id, &bob_msg, Some("m.annotation")).await?;
    assert_eq!(rel.iter().filter(|e| e["sender"] == ALICE_PUPPET).count(), 2, "{rel:?}");
    net.deliver(react("k4", &["🎉"])).await?;
    let rel = bob.relations(&room_id, &bob_msg, Some("m.annotation")).await?;
    let keys: Vec<&str> = rel
        .iter()
        .filter(|e| e["sender"] == ALICE_PUPPET)
        .filter_map(|e| e["content"]["m.relates_to"]["key"].as_str())
        .collect();
    assert_eq!(keys, vec!["🎉"], "the removed reaction is redacted");

    // A correction and a retraction of her message.
    let fix = from_alice(
        &net_id,
        &room_id,
        "k2",
        EventKind::Correction { target: MessageRef(hello_id.clone()), message: Message::text("hello, fixed") },
    )
    .with_origin_id("xmpp-correction-1");
    net.deliver(fix).await?;
    let edit = bob.wait_for(&room_id, T, |e| e["content"]["m.relates_to"]["rel_type"] == "m.replace").await?;
    assert_eq!(
        (edit["sender"].as_str(), edit["content"]["m.new_content"]["body"].as_str()),
        (Some(ALICE_PUPPET), Some("hello, fixed"))
    );
    net.deliver(
        from_alice(
            &net_id,
            &room_id,
            "k2",
            EventKind::Retraction { target: MessageRef(hello_id.clone()), moderator: None, reason: None },
        )
        .with_origin_id("xmpp-retraction-1"),
    )
    .await?;
    bob.wait_for(&room_id, T, |e| e["type"] == "m.room.redaction" && e["sender"] == ALICE_PUPPET).await?;

    // Bob reacts, renames, leaves: the full set, a nick change, a departure.
    let reaction = bob
        .send_event(
            &room_id,
            "m.reaction",
            json!({"m.relates_to": {"rel_type": "m.annotation", "event_id": hello_id, "key": "❤️"}}),
        )
        .await?;
    let got = next_event(&mut events, T, |e| matches!(e.kind, EventKind::Reactions { .. })).await?;
    assert_eq!(got.kind, EventKind::Reactions { target: MessageRef(hello_id.clone()), emojis: vec!["❤️".into()] });
    bob.redact(&room_id, &reaction, None).await?;
    let got = next_event(&mut events, T, |e| matches!(e.kind, EventKind::Reactions { .. })).await?;
    assert_eq!(got.kind, EventKind::Reactions { target: MessageRef(hello_id.clone()), emojis: vec![] });
    bob.set_display_name("Robert").await?;
    let got = next_event(&mut events, T, |e| matches!(e.kind, EventKind::NickChanged { .. })).await?;
    assert_eq!(
        (got.sender.nick.as_str(), &got.kind),
        ("Bob Matrix", &EventKind::NickChanged { new_nick: "Robert".into() })
    );

    // A transaction retried by the homeserver is processed once.
    let fake = json!({"events": [{
        "type": "m.room.message", "room_id": room_id, "sender": bob.user_id(), "event_id": "$fake-1",
        "origin_server_ts": 1_700_000_000_000u64, "content": {"msgtype": "m.text", "body": "once"}
    }]});
    let put = reqwest::Method::PUT;
    homeserver.call(put.clone(), "/_matrix/app/v1/transactions/test-retry-1", Some(&fake)).await?;
    homeserver.call(put.clone(), "/_matrix/app/v1/transactions/test-retry-1", Some(&fake)).await?;
    let later = drain(&mut events, Duration::from_secs(2)).await;
    let once = later.iter().filter(|e| matches!(&e.kind, EventKind::Message(m) if m.body == "once")).count();
    assert_eq!(once, 1, "{later:?}");
    assert!(
        !later.iter().any(|e| e.sender.id.as_str() == ALICE_PUPPET || e.sender.id.as_str() == BOT),
        "events of the bot or a puppet were bridged: {later:?}"
    );
    assert_eq!(status_of(wrong.call(put, "/_matrix/app/v1/transactions/test-retry-2", Some(&fake)).await), Some(403));

    // Alice leaves: her puppet leaves the room.
    net.deliver(from_alice(&net_id, &room_id, "k5", EventKind::Left { kind: LeaveKind::Part, reason: None })).await?;
    wait_member(&bob, &room_id, ALICE_PUPPET, false).await?;
    // Bob leaves too: XMPP sees him go.
    bob.leave(&room_id).await?;
    let got = next_event(&mut events, T, |e| matches!(e.kind, EventKind::Left { .. })).await?;
    assert_eq!((got.sender.id.as_str(), got.sender.is_self), (bob.user_id(), false));
    Ok(())
}
