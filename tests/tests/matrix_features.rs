//! Edits, replies, reactions and redactions between Matrix and XMPP, each both
//! ways, asserting the native Matrix event on one side and the native XEP on the
//! other (XEP-0308, XEP-0461, XEP-0444, XEP-0424, XEP-0425 moderation); and a
//! direct chat as a contact.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use isthmus_core::address::Escaping;
use isthmus_tests::matrix_scenario::{MATRIX_DOMAIN, MatrixSetup, matrix_jid};
use isthmus_tests::scenario::{T, moderate_iq};
use isthmus_tests::{MatrixClient, Stanza, XmppClient};
use serde_json::{Value, json};

const DOMAIN: &str = MATRIX_DOMAIN;

fn jid(matrix_id: &str) -> Result<String> {
    matrix_jid(matrix_id)
}

async fn join(alice: &mut XmppClient, room_jid: &str) -> Result<()> {
    alice.join(room_jid, "Alice").await?;
    let p = alice
        .expect(Duration::from_secs(30), |m| m.kind == "presence" && m.from == format!("{room_jid}/Alice"))
        .await?;
    if !p.has_status(110) {
        bail!("join failed: {}", p.xml);
    }
    Ok(())
}

fn attr(xml: &str, element: &str, name: &str) -> Option<String> {
    let start = xml.find(&format!("<{element} "))?;
    let tail = &xml[start..];
    let tail = &tail[..tail.find('>')?];
    let needle = format!("{name}=\"");
    let v = tail.split(&needle).nth(1)?;
    Some(v[..v.find('"')?].to_owned())
}

fn from_bob(room_jid: &str) -> impl Fn(&Stanza) -> bool + '_ {
    move |m: &Stanza| m.kind == "message" && m.type_ == "groupchat" && m.from == format!("{room_jid}/Bob Matrix")
}

#[tokio::test]
async fn edits_replies_reactions_and_redactions_both_ways() -> Result<()> {
    let s = MatrixSetup::start().await?;
    let mut alice = s.alice_linked("phone").await?;
    // Room ids are case-sensitive (upper-case letters in every random id): the JID carries them exactly.
    let room = s.bob.create_room(Some("Features"), &[&s.alice_mx.user_id], false).await?;
    assert!(room.chars().any(|c| c.is_ascii_uppercase()), "{room}");
    let room_jid = jid(&room)?;
    assert_eq!(
        Escaping::CaseSensitive.from_localpart(&room_jid.to_lowercase().replace(&format!("@{DOMAIN}"), ""))?,
        room
    );
    join(&mut alice, &room_jid).await?;

    // Matrix → XMPP.
    let original = s.bob.send_text(&room, "original").await?;
    let m = alice.expect(T, |m| from_bob(&room_jid)(m) && m.body.as_deref() == Some("original")).await?;
    let k1 = m.id.clone();
    assert_eq!(attr(&m.xml, "stanza-id", "id").as_deref(), Some(k1.as_str()), "{}", m.xml);

    s.bob
        .send_event(
            &room,
            "m.room.message",
            json!({"msgtype": "m.text", "body": "* edited", "m.new_content": {"msgtype": "m.text", "body": "edited"},
                   "m.relates_to": {"rel_type": "m.replace", "event_id": original}}),
        )
        .await?;
    let m = alice.expect(T, |m| from_bob(&room_jid)(m) && m.body.as_deref() == Some("edited")).await?;
    assert_eq!(attr(&m.xml, "replace", "id").as_deref(), Some(k1.as_str()), "correction: {}", m.xml);
    assert!(m.xml.contains("urn:xmpp:message-correct:0"));

    s.bob
        .send_event(
            &room,
            "m.room.message",
            json!({"msgtype": "m.text", "body": "> <@bob:localhost> original\n\na reply",
                   "m.relates_to": {"m.in_reply_to": {"event_id": original}}}),
        )
        .await?;
    let m = alice.expect(T, |m| from_bob(&room_jid)(m) && m.xml.contains("urn:xmpp:reply:0")).await?;
    assert_eq!(m.body.as_deref(), Some("a reply"), "the Matrix fallback is removed: {}", m.xml);
    assert_eq!(attr(&m.xml, "reply", "id").as_deref(), Some(k1.as_str()), "{}", m.xml);

    let reaction = s
        .bob
        .send_event(
            &room,
            "m.reaction",
            json!({"m.relates_to": {"rel_type": "m.annotation", "event_id": original, "key": "👍"}}),
        )
        .await?;
    let m = alice.expect(T, |m| from_bob(&room_jid)(m) && m.xml.contains("urn:xmpp:reactions:0")).await?;
    assert_eq!(attr(&m.xml, "reactions", "id").as_deref(), Some(k1.as_str()), "{}", m.xml);
    assert!(m.xml.contains("<reaction>👍</reaction>"), "{}", m.xml);
    s.bob.redact(&room, &reaction, None).await?;
    let m = alice.expect(T, |m| from_bob(&room_jid)(m) && m.xml.contains("urn:xmpp:reactions:0")).await?;
    assert!(!m.xml.contains("<reaction>"), "reaction removed: the set is empty: {}", m.xml);

    s.bob.redact(&room, &original, Some("mistake")).await?;
    let m = alice.expect(T, |m| from_bob(&room_jid)(m) && m.xml.contains("urn:xmpp:message-retract:1")).await?;
    assert_eq!(attr(&m.xml, "retract", "id").as_deref(), Some(k1.as_str()), "{}", m.xml);

    // XMPP → Matrix.
    alice
        .send_raw(&format!("<message type='groupchat' to='{room_jid}' id='x1'><body>from xmpp</body></message>"))
        .await?;
    let reflection =
        alice.expect(T, |m| m.kind == "message" && m.id == "x1" && m.from == format!("{room_jid}/Alice")).await?;
    let s1 = attr(&reflection.xml, "stanza-id", "id").context("no stanza-id on the reflection")?;
    let mine = s.bob.wait_for(&room, T, |e| e["content"]["body"] == "from xmpp").await?;
    let mine_id = mine["event_id"].as_str().context("event id")?.to_owned();
    assert_eq!(mine["sender"], json!(s.alice_mx.user_id));

    alice
        .send_raw(&format!(
            "<message type='groupchat' to='{room_jid}' id='x2'><body>from xmpp, corrected</body>\
             <replace xmlns='urn:xmpp:message-correct:0' id='x1'/></message>"
        ))
        .await?;
    let edit = s
        .bob
        .wait_for(&room, T, |e| {
            e["content"]["m.relates_to"]["rel_type"] == "m.replace" && e["sender"] == json!(s.alice_mx.user_id)
        })
        .await
        .map_err(|e| e.context(s.log_tail()))?;
    assert_eq!(edit["content"]["m.relates_to"]["event_id"], json!(mine_id), "{edit}");
    assert_eq!(edit["content"]["m.new_content"]["body"], "from xmpp, corrected");

    let question = s.bob.send_text(&room, "question?").await?;
    let q = alice.expect(T, |m| from_bob(&room_jid)(m) && m.body.as_deref() == Some("question?")).await?;
    let fallback = "> Bob Matrix: question?\n";
    alice
        .send_raw(&format!(
            "<message type='groupchat' to='{room_jid}' id='x3'><body>{fallback}the answer</body>\
             <reply xmlns='urn:xmpp:reply:0' to='{room_jid}/Bob Matrix' id='{}'/>\
             <fallback xmlns='urn:xmpp:fallback:0' for='urn:xmpp:reply:0'><body start='0' end='{}'/></fallback></message>",
            q.id,
            fallback.chars().count()
        ))
        .await?;
    let reply = s.bob.wait_for(&room, T, |e| e["content"]["body"] == "the answer").await?;
    assert_eq!(reply["content"]["m.relates_to"]["m.in_reply_to"]["event_id"], json!(question), "{reply}");

    alice
        .send_raw(&format!(
            "<message type='groupchat' to='{room_jid}' id='x4'><reactions xmlns='urn:xmpp:reactions:0' id='{}'>\
             <reaction>🎉</reaction></reactions></message>",
            q.id
        ))
        .await?;
    let r = s.bob.wait_for(&room, T, |e| e["type"] == "m.reaction" && e["sender"] == json!(s.alice_mx.user_id)).await?;
    assert_eq!(r["content"]["m.relates_to"], json!({"rel_type": "m.annotation", "event_id": question, "key": "🎉"}));
    assert_eq!(r["sender"], json!(s.alice_mx.user_id));
    let reaction_id = r["event_id"].as_str().context("event id")?.to_owned();
    alice
        .send_raw(&format!(
            "<message type='groupchat' to='{room_jid}' id='x5'><reactions xmlns='urn:xmpp:reactions:0' id='{}'/></message>",
            q.id
        ))
        .await?;
    let removal = s.bob.wait_for(&room, T, |e| e["type"] == "m.room.redaction" && redacts(e) == reaction_id).await?;
    assert_eq!(removal["sender"], json!(s.alice_mx.user_id));

    alice
        .send_raw(&format!(
            "<message type='groupchat' to='{room_jid}' id='x6'><retract xmlns='urn:xmpp:message-retract:1' id='{s1}'/>\
             <fallback xmlns='urn:xmpp:fallback:0' for='urn:xmpp:message-retract:1'/><body>retracted</body></message>"
        ))
        .await?;
    s.bob.wait_for(&room, T, |e| e["type"] == "m.room.redaction" && redacts(e) == mine_id).await?;

    // Read markers: a Matrix read receipt is a displayed marker (XEP-0333) and back.
    s.bob
        .call(
            reqwest::Method::POST,
            &format!("/_matrix/client/v3/rooms/{}/receipt/m.read/{}", enc(&room), enc(&reply_event_id(&reply))),
            Some(&json!({})),
        )
        .await?;
    let marker = alice.expect(T, |m| from_bob(&room_jid)(m) && m.xml.contains("urn:xmpp:chat-markers:0")).await?;
    assert!(marker.xml.contains("<displayed"), "{}", marker.xml);
    // Read markers only move forward: mark a message newer than anything alice sent.
    let newest = s.bob.send_text(&room, "read me").await?;
    let read_me = alice.expect(T, |m| from_bob(&room_jid)(m) && m.body.as_deref() == Some("read me")).await?;
    // Bob watches new receipts from here on (incremental sync; an initial sync's receipts may lag).
    let first = s.bob.call(reqwest::Method::GET, "/_matrix/client/v3/sync?timeout=0", None).await?;
    let mut since = first["next_batch"].as_str().context("no next_batch")?.to_owned();
    alice
        .send_raw(&format!(
            "<message type='groupchat' to='{room_jid}' id='x7'><displayed xmlns='urn:xmpp:chat-markers:0' id='{}'/></message>",
            read_me.id
        ))
        .await?;
    let user = s.alice_mx.user_id.clone();
    ephemeral_until(&s.bob, &mut since, &room, "alice's read marker as a Matrix receipt", |events| {
        let receipts = Value::Array(events.to_vec()).to_string();
        receipts.contains(&newest) && receipts.contains(&user)
    })
    .await?;
    let gone = s.bob.event(&room, &mine_id).await?;
    assert_eq!(gone["content"], json!({}), "the message is redacted on Matrix: {gone}");
    Ok(())
}

/// Wait until the gateway's archive holds `n` entries with `body`.
async fn archived_until(s: &MatrixSetup, body: &str, n: i64) -> Result<()> {
    let db = sqlx::SqlitePool::connect(&format!("sqlite://{}/isthmus.db", s.gateway.dir().display())).await?;
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let (count,): (i64,) =
            sqlx::query_as("SELECT COUNT(*) FROM archive WHERE body = ?1").bind(body).fetch_one(&db).await?;
        if count == n {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("{count} archive entries with {body:?}, expected {n}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn moderation_both_ways() -> Result<()> {
    let s = MatrixSetup::start().await?;
    let mut alice = s.alice_linked("phone").await?;

    // A room where bob (power 100) moderates and alice is a plain participant.
    let room = s.bob.create_room(Some("Moderated"), &[&s.alice_mx.user_id], false).await?;
    let room_jid = jid(&room)?;
    join(&mut alice, &room_jid).await?;
    alice
        .send_raw(&format!(
            "<iq type='get' to='{room_jid}' id='info1'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>"
        ))
        .await?;
    let info = alice.expect(T, |m| m.kind == "iq" && m.id == "info1").await?;
    assert!(info.xml.contains("urn:xmpp:message-moderate:1"), "a Matrix room advertises moderation: {}", info.xml);

    // Matrix → XMPP: bob removes alice's message with a reason.
    alice
        .send_raw(&format!("<message type='groupchat' to='{room_jid}' id='m1'><body>off topic</body></message>"))
        .await?;
    let reflection =
        alice.expect(T, |m| m.kind == "message" && m.id == "m1" && m.from == format!("{room_jid}/Alice")).await?;
    let s1 = attr(&reflection.xml, "stanza-id", "id").context("no stanza-id on the reflection")?;
    let mine = s.bob.wait_for(&room, T, |e| e["content"]["body"] == "off topic").await?;
    let mine_id = mine["event_id"].as_str().context("event id")?.to_owned();
    archived_until(&s, "off topic", 1).await?;
    s.bob.redact(&room, &mine_id, Some("please stay on topic")).await?;
    let m = alice
        .expect(T, |m| m.kind == "message" && m.from == room_jid && m.xml.contains("urn:xmpp:message-moderate:1"))
        .await
        .map_err(|e| e.context(s.log_tail()))?;
    assert_eq!(attr(&m.xml, "retract", "id").as_deref(), Some(s1.as_str()), "{}", m.xml);
    assert_eq!(attr(&m.xml, "moderated", "by"), Some(format!("{room_jid}/Bob Matrix")), "{}", m.xml);
    assert!(m.xml.contains("<reason>please stay on topic</reason>"), "{}", m.xml);
    // Alice's archive of the room forgets it (MAM, history on join).
    archived_until(&s, "off topic", 0).await?;

    // XMPP → Matrix: alice is no moderator here, so her request is refused.
    let theirs = s.bob.send_text(&room, "bob's words").await?;
    let m = alice.expect(T, |m| from_bob(&room_jid)(m) && m.body.as_deref() == Some("bob's words")).await?;
    alice.send_raw(&moderate_iq(&room_jid, "mod1", &m.id, "no")).await?;
    let refused = alice.expect(T, |m| m.kind == "iq" && m.id == "mod1").await?;
    assert_eq!(refused.type_, "error", "{}", refused.xml);
    assert!(refused.xml.contains("<forbidden"), "{}", refused.xml);
    assert_eq!(s.bob.event(&room, &theirs).await?["content"]["body"], "bob's words", "nothing was removed");

    // A room where alice has power 50: a Matrix moderator, a MUC moderator.
    // (bob created the room: newer room versions let no power level name its creator.)
    let levels = json!({"users": {s.alice_mx.user_id.clone(): 50}});
    let room = s
        .bob
        .create_room_with(json!({"preset": "private_chat", "name": "Moderated by alice",
            "invite": [s.alice_mx.user_id], "power_level_content_override": levels}))
        .await?;
    let room_jid = jid(&room)?;
    join(&mut alice, &room_jid).await?;
    let theirs = s.bob.send_text(&room, "spam spam").await?;
    let m = alice.expect(T, |m| from_bob(&room_jid)(m) && m.body.as_deref() == Some("spam spam")).await?;
    alice.send_raw(&moderate_iq(&room_jid, "mod2", "no-such-id", "spam")).await?;
    let unknown = alice.expect(T, |m| m.kind == "iq" && m.id == "mod2").await?;
    assert!(unknown.type_ == "error" && unknown.xml.contains("<item-not-found"), "{}", unknown.xml);
    alice.send_raw(&moderate_iq(&room_jid, "mod3", &m.id, "spam")).await?;
    let done = alice.expect(T, |m| m.kind == "iq" && m.id == "mod3").await.map_err(|e| e.context(s.log_tail()))?;
    assert_eq!(done.type_, "result", "{}", done.xml);
    let redaction = s.bob.wait_for(&room, T, |e| e["type"] == "m.room.redaction" && redacts(e) == theirs).await?;
    assert_eq!(redaction["sender"], json!(s.alice_mx.user_id), "{redaction}");
    assert_eq!(redaction["content"]["reason"], "spam", "{redaction}");
    let gone = s.bob.event(&room, &theirs).await?;
    assert_eq!(gone["content"], json!({}), "bob's message is redacted on Matrix: {gone}");
    Ok(())
}

/// The occupant presence from `room_jid/nick` (not an unavailable one) with this role.
fn role_presence<'a>(room_jid: &'a str, nick: &'a str, role: &'a str) -> impl Fn(&Stanza) -> bool + 'a {
    move |m: &Stanza| {
        m.kind == "presence"
            && m.type_ != "unavailable"
            && m.from == format!("{room_jid}/{nick}")
            && attr(&m.xml, "item", "role").as_deref() == Some(role)
    }
}

/// Bob sets `user`'s power level in `room`, keeping the rest of the room's power levels.
async fn set_level(bob: &MatrixClient, room: &str, user: &str, level: i64) -> Result<()> {
    let mut levels = bob.state(room, "m.room.power_levels", "").await?;
    levels["users"][user] = json!(level);
    bob.send_state(room, "m.room.power_levels", "", levels).await?;
    Ok(())
}

#[tokio::test]
async fn power_level_changes_are_role_changes() -> Result<()> {
    let s = MatrixSetup::start().await?;
    let carol_user = s.synapse.register("carol", "carol-mx-pass", false).await?;
    let carol = s.synapse.client(&carol_user)?;
    carol.set_display_name("Carol Matrix").await?;
    let mut alice = s.alice_linked("phone").await?;

    // bob (power 100) made the room; carol and alice are plain members.
    let room = s.bob.create_room(Some("Levels"), &[&s.alice_mx.user_id, carol.user_id()], false).await?;
    carol.join(&room).await?;
    let room_jid = jid(&room)?;
    join(&mut alice, &room_jid).await?;
    let p = alice.expect(T, role_presence(&room_jid, "Carol Matrix", "participant")).await?;
    assert_eq!(attr(&p.xml, "item", "affiliation").as_deref(), Some("member"), "{}", p.xml);

    // Alice, no moderator yet, may not remove bob's message.
    s.bob.send_text(&room, "spam spam").await?;
    let spam = alice.expect(T, |m| from_bob(&room_jid)(m) && m.body.as_deref() == Some("spam spam")).await?;
    let theirs = s.bob.wait_for(&room, T, |e| e["content"]["body"] == "spam spam").await?;
    let theirs = theirs["event_id"].as_str().context("event id")?.to_owned();
    alice.send_raw(&moderate_iq(&room_jid, "mod1", &spam.id, "spam")).await?;
    let refused = alice.expect(T, |m| m.kind == "iq" && m.id == "mod1").await?;
    assert!(refused.type_ == "error" && refused.xml.contains("<forbidden"), "{}", refused.xml);

    // bob raises carol to 50: alice sees carol become a moderator (an admin).
    set_level(&s.bob, &room, carol.user_id(), 50).await?;
    let p = alice
        .expect(T, role_presence(&room_jid, "Carol Matrix", "moderator"))
        .await
        .map_err(|e| e.context(s.log_tail()))?;
    assert_eq!(attr(&p.xml, "item", "affiliation").as_deref(), Some("admin"), "{}", p.xml);
    assert!(!p.has_status(110), "carol's presence is no self-presence: {}", p.xml);

    // bob raises alice: her own self-presence says so, and now she may moderate.
    set_level(&s.bob, &room, &s.alice_mx.user_id, 50).await?;
    let me =
        alice.expect(T, role_presence(&room_jid, "Alice", "moderator")).await.map_err(|e| e.context(s.log_tail()))?;
    assert!(me.has_status(110), "alice's own role change is her self-presence: {}", me.xml);
    assert_eq!(attr(&me.xml, "item", "affiliation").as_deref(), Some("admin"), "{}", me.xml);
    alice.send_raw(&moderate_iq(&room_jid, "mod2", &spam.id, "spam")).await?;
    let done = alice.expect(T, |m| m.kind == "iq" && m.id == "mod2").await.map_err(|e| e.context(s.log_tail()))?;
    assert_eq!(done.type_, "result", "{}", done.xml);
    let redaction = s.bob.wait_for(&room, T, |e| e["type"] == "m.room.redaction" && redacts(e) == theirs).await?;
    assert_eq!(redaction["sender"], json!(s.alice_mx.user_id), "{redaction}");

    // bob demotes carol again: back to a participant.
    set_level(&s.bob, &room, carol.user_id(), 0).await?;
    let p = alice.expect(T, role_presence(&room_jid, "Carol Matrix", "participant")).await?;
    assert_eq!(attr(&p.xml, "item", "affiliation").as_deref(), Some("member"), "{}", p.xml);
    Ok(())
}

fn reply_event_id(e: &Value) -> String {
    e["event_id"].as_str().unwrap_or_default().to_owned()
}

fn enc(s: &str) -> String {
    isthmus_tests::matrix::encode(s)
}

fn redacts(e: &Value) -> String {
    e["content"]["redacts"].as_str().or_else(|| e["redacts"].as_str()).unwrap_or_default().to_owned()
}

#[tokio::test]
async fn a_direct_chat_is_a_contact_both_ways() -> Result<()> {
    let s = MatrixSetup::start().await?;
    let mut alice = s.alice_linked("phone").await?;
    let bob_jid = jid(s.bob.user_id())?;

    // Matrix → XMPP: bob opens a direct chat; the gateway accepts it and bob's message
    // comes from bob's contact JID.
    let dm = s.bob.create_room(None, &[&s.alice_mx.user_id], true).await?;
    let alice_mx = MatrixClient::from_token(&s.synapse.base_url(), &s.alice_mx.user_id, &s.alice_mx.access_token)?;
    wait_joined(&alice_mx, &dm).await?;
    s.bob.send_text(&dm, "hi alice, directly").await?;
    let m = alice
        .expect(T, |m| m.kind == "message" && m.type_ == "chat" && m.body.as_deref() == Some("hi alice, directly"))
        .await?;
    assert_eq!(m.from.split('/').next(), Some(bob_jid.as_str()), "{}", m.xml);

    // XMPP → Matrix: a chat message to bob's JID lands in the same direct chat.
    alice
        .send_raw(&format!("<message type='chat' to='{bob_jid}' id='d1'><body>hi bob, directly</body></message>"))
        .await?;
    let got = s.bob.wait_for(&dm, T, |e| e["content"]["body"] == "hi bob, directly").await?;
    assert_eq!(got["sender"], json!(s.alice_mx.user_id));
    Ok(())
}

/// Wait until `client` (alice's Matrix account, used read-only) is joined to `room`.
async fn wait_joined(client: &MatrixClient, room: &str) -> Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if client.joined_members(room).await.is_ok_and(|m| m.contains_key(client.user_id())) {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("the gateway did not accept the direct chat invitation to {room}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// XEP-0077 in-band registration on the gateway's domain links the account (the
/// network's login fields as a form) and `<remove/>` unlinks it.
#[tokio::test]
async fn in_band_registration_links_and_unlinks_an_account() -> Result<()> {
    let s = MatrixSetup::start().await?;
    let mut alice = s.alice("phone").await?;
    alice.send_raw(&format!("<iq type='get' to='{DOMAIN}' id='r1'><query xmlns='jabber:iq:register'/></iq>")).await?;
    let form = alice.expect(T, |m| m.kind == "iq" && m.id == "r1").await?;
    assert_eq!(form.type_, "result", "{}", form.xml);
    assert!(form.xml.contains("var=\"homeserver\"") && form.xml.contains("type=\"text-private\""), "{}", form.xml);
    let submit = |password: &str, id: &str| {
        format!(
            "<iq type='set' to='{DOMAIN}' id='{id}'><query xmlns='jabber:iq:register'><x xmlns='jabber:x:data' type='submit'>\
             <field var='user'><value>alice</value></field><field var='password'><value>{password}</value></field>\
             </x></query></iq>"
        )
    };
    alice.send_raw(&submit("wrong", "r2")).await?;
    let refused = alice.expect(Duration::from_secs(30), |m| m.kind == "iq" && m.id == "r2").await?;
    assert!(refused.type_ == "error" && refused.xml.contains("not-authorized"), "{}", refused.xml);
    alice.send_raw(&submit(&s.alice_mx.password, "r3")).await?;
    let ok = alice.expect(Duration::from_secs(30), |m| m.kind == "iq" && m.id == "r3").await?;
    assert_eq!(ok.type_, "result", "{}", ok.xml);
    let status = |id: &str| format!("<message type='chat' to='{DOMAIN}' id='{id}'><body>status</body></message>");
    alice.send_raw(&status("st1")).await?;
    let st = alice.expect(T, |m| m.kind == "message" && m.from == DOMAIN).await?;
    assert!(st.body.as_deref().is_some_and(|b| b.contains(&s.alice_mx.user_id)), "{:?}", st.body);
    alice
        .send_raw(&format!(
            "<iq type='set' to='{DOMAIN}' id='r4'><query xmlns='jabber:iq:register'><remove/></query></iq>"
        ))
        .await?;
    let removed = alice.expect(Duration::from_secs(30), |m| m.kind == "iq" && m.id == "r4").await?;
    assert_eq!(removed.type_, "result", "{}", removed.xml);
    alice.send_raw(&status("st2")).await?;
    let st = alice.expect(T, |m| m.kind == "message" && m.from == DOMAIN).await?;
    assert!(st.body.as_deref().is_some_and(|b| b.contains("no Matrix connection")), "{:?}", st.body);
    Ok(())
}

/// Typing notifications both ways: Matrix typing ↔ XEP-0085 chat states.
#[tokio::test]
async fn typing_notifications_both_ways() -> Result<()> {
    let s = MatrixSetup::start().await?;
    let mut alice = s.alice_linked("phone").await?;
    let room = s.bob.create_room(Some("Typing"), &[&s.alice_mx.user_id], false).await?;
    let room_jid = jid(&room)?;
    join(&mut alice, &room_jid).await?;
    let first = s.bob.call(reqwest::Method::GET, "/_matrix/client/v3/sync?timeout=0", None).await?;
    let mut since = first["next_batch"].as_str().context("no next_batch")?.to_owned();

    let typing_path = format!("/_matrix/client/v3/rooms/{}/typing/{}", enc(&room), enc(s.bob.user_id()));
    s.bob.call(reqwest::Method::PUT, &typing_path, Some(&json!({"typing": true, "timeout": 30000}))).await?;
    alice.expect(T, |m| from_bob(&room_jid)(m) && m.xml.contains("<composing") && m.body.is_none()).await?;
    s.bob.call(reqwest::Method::PUT, &typing_path, Some(&json!({"typing": false}))).await?;
    alice.expect(T, |m| from_bob(&room_jid)(m) && m.xml.contains("<paused")).await?;

    alice
        .send_raw(&format!(
            "<message type='groupchat' to='{room_jid}' id='t1'><composing xmlns='http://jabber.org/protocol/chatstates'/></message>"
        ))
        .await?;
    let user = s.alice_mx.user_id.clone();
    ephemeral_until(&s.bob, &mut since, &room, "alice's composing state as Matrix typing", |events| {
        events.iter().any(|e| e["type"] == "m.typing" && e["content"]["user_ids"].to_string().contains(&user))
    })
    .await?;
    Ok(())
}

/// Follow `client`'s incremental sync from `since` until the ephemeral events of
/// `room` in one response satisfy `done`; fails after `T` naming `what` and what came.
async fn ephemeral_until(
    client: &MatrixClient,
    since: &mut String,
    room: &str,
    what: &str,
    done: impl Fn(&[Value]) -> bool,
) -> Result<()> {
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let path = format!("/_matrix/client/v3/sync?timeout=1000&since={}", enc(since));
        let sync = client.call(reqwest::Method::GET, &path, None).await?;
        *since = sync["next_batch"].as_str().unwrap_or(since).to_owned();
        let events = sync["rooms"]["join"][room]["ephemeral"]["events"].as_array().cloned().unwrap_or_default();
        if done(&events) {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("{what} did not arrive; last ephemeral events: {events:?}");
        }
    }
}

/// XEP-0393 styling from XMPP arrives on Matrix as `org.matrix.custom.html`, and a
/// Matrix HTML body arrives on XMPP as XEP-0393 styling (links as their text and URL).
#[tokio::test]
async fn formatted_bodies_both_ways() -> Result<()> {
    let s = MatrixSetup::start().await?;
    let mut alice = s.alice_linked("phone").await?;
    let room = s.bob.create_room(Some("Formatting"), &[&s.alice_mx.user_id], false).await?;
    let room_jid = jid(&room)?;
    join(&mut alice, &room_jid).await?;

    // XMPP → Matrix: spans, then blocks (a quote and a code block, with text to escape).
    alice.send_groupchat(&room_jid, "*bold* _it_ `code`").await?;
    let e = s.bob.wait_for(&room, T, |e| e["content"]["body"] == "*bold* _it_ `code`").await?;
    assert_eq!(e["content"]["format"], "org.matrix.custom.html", "{e}");
    assert_eq!(e["content"]["formatted_body"], "<strong>bold</strong> <em>it</em> <code>code</code>", "{e}");
    alice.send_groupchat(&room_jid, "> quoted ~old~\n```\nif a < b && c {}\n```\nplain").await?;
    let e =
        s.bob.wait_for(&room, T, |e| e["content"]["body"].as_str().is_some_and(|b| b.starts_with("> quoted"))).await?;
    assert_eq!(
        e["content"]["formatted_body"],
        "<blockquote>quoted <del>old</del></blockquote><pre><code>if a &lt; b &amp;&amp; c {}</code></pre>plain",
        "{e}"
    );
    // Plain text stays plain: no HTML body.
    alice.send_groupchat(&room_jid, "2*3*4 is snake_case").await?;
    let e = s.bob.wait_for(&room, T, |e| e["content"]["body"] == "2*3*4 is snake_case").await?;
    assert!(e["content"].get("formatted_body").is_none(), "{e}");

    // Matrix → XMPP: what Element sends for markdown (the body is its markdown source).
    s.bob
        .send_event(
            &room,
            "m.room.message",
            json!({"msgtype": "m.text",
                   "body": "**bold** _it_ ~~gone~~ `x<y` [the page](https://example.org/p)\n```\nlet x = 1;\n```\n> quote",
                   "format": "org.matrix.custom.html",
                   "formatted_body": "<strong>bold</strong> <em>it</em> <del>gone</del> <code>x&lt;y</code> \
                      <a href=\"https://example.org/p\">the page</a><pre><code>let x = 1;\n</code></pre>\
                      <blockquote>\n<p>quote</p>\n</blockquote>\n"}),
        )
        .await?;
    let m =
        alice.expect(T, |m| from_bob(&room_jid)(m) && m.body.as_deref().is_some_and(|b| b.contains("bold"))).await?;
    assert_eq!(
        m.body.as_deref(),
        Some("*bold* _it_ ~gone~ `x<y` the page <https://example.org/p>\n```\nlet x = 1;\n```\n> quote"),
        "{}",
        m.xml
    );
    // A mention pill shows the name only.
    s.bob
        .send_event(
            &room,
            "m.room.message",
            json!({"msgtype": "m.text", "body": "alice: hi", "format": "org.matrix.custom.html",
                   "formatted_body": format!("<a href=\"https://matrix.to/#/{}\">alice</a>: <b>hi</b>", s.alice_mx.user_id)}),
        )
        .await?;
    let m = alice.expect(T, |m| from_bob(&room_jid)(m) && m.body.as_deref().is_some_and(|b| b.contains("hi"))).await?;
    assert_eq!(m.body.as_deref(), Some("alice: *hi*"), "{}", m.xml);
    Ok(())
}
