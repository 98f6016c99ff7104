//! One message never holds up the others, size limits answer the sender, and a
//! crash during a conversion loses nothing: real Prosody and Synapse, alice's own
//! Matrix login (personal rooms).

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use isthmus_tests::matrix_scenario::{MatrixSetup, is_groupchat_from, join_room, matrix_jid};
use isthmus_tests::scenario::T;
use isthmus_tests::{MatrixClient, XmppClient};
use serde_json::json;

/// Generous: an ordinary message takes milliseconds.
const PROMPT: Duration = Duration::from_secs(1);

/// Bob's room with alice invited, joined by alice on XMPP; its JID.
async fn room(s: &MatrixSetup, alice: &mut XmppClient, name: &str) -> Result<(String, String)> {
    let room_id = s.bob.create_room(Some(name), &[&s.alice_mx.user_id], false).await?;
    let room_jid = matrix_jid(&room_id)?;
    // The invitation reaches the gateway's sync first.
    alice.expect(T, |m| m.kind == "message" && m.body.as_deref().is_some_and(|b| b.contains(&room_id))).await?;
    let joined = join_room(alice, &room_jid, "Alice").await?;
    if !joined.has_status(110) {
        bail!("alice could not join {name}: {}", joined.xml);
    }
    Ok((room_id, room_jid))
}

/// XMPP → Matrix: how long until bob sees `body` in `room_id`.
async fn to_matrix(
    alice: &mut XmppClient,
    bob: &MatrixClient,
    room_id: &str,
    room_jid: &str,
    body: &str,
) -> Result<Duration> {
    let sent = Instant::now();
    alice.send_groupchat(room_jid, body).await?;
    bob.wait_for(room_id, T, |e| e["content"]["body"] == body).await?;
    Ok(sent.elapsed())
}

/// Matrix → XMPP: how long until alice gets bob's `body` in `room_jid`.
async fn to_xmpp(
    alice: &mut XmppClient,
    bob: &MatrixClient,
    room_id: &str,
    room_jid: &str,
    body: &str,
) -> Result<Duration> {
    let sent = Instant::now();
    bob.send_text(room_id, body).await?;
    alice.expect(T, |m| is_groupchat_from(m, &format!("{room_jid}/Bob Matrix"), body)).await?;
    Ok(sent.elapsed())
}

/// While room A gets a pathological 200 kB message from XMPP (unclosed styling
/// openers before every word) and a large pathological HTML message from Matrix,
/// room B's ordinary messages go both ways within a second each. The 200 kB
/// message is refused with `not-acceptable` saying the limit and its size (Matrix
/// takes 64 KiB events); the one from Matrix arrives.
#[tokio::test]
async fn a_pathological_message_in_one_room_holds_up_no_other() -> Result<()> {
    let s = MatrixSetup::start().await?;
    let mut alice = s.alice_linked("phone").await?;
    let (room_a, jid_a) = room(&s, &mut alice, "Room A").await?;
    let (room_b, jid_b) = room(&s, &mut alice, "Room B").await?;
    // Both rooms work.
    to_matrix(&mut alice, &s.bob, &room_b, &jid_b, "b warm-up").await?;
    to_xmpp(&mut alice, &s.bob, &room_a, &jid_a, "a warm-up").await?;

    // From XMPP: 200 kB of `*` openers that never close.
    let huge = "*w ".repeat(200_000 / 3);
    alice.send_groupchat_with_id(&jid_a, &huge, "huge-1").await?;
    let mut timings = Vec::new();
    for i in 0..3 {
        timings.push(("to Matrix", to_matrix(&mut alice, &s.bob, &room_b, &jid_b, &format!("b out {i}")).await?));
        timings.push(("to XMPP", to_xmpp(&mut alice, &s.bob, &room_b, &jid_b, &format!("b in {i}")).await?));
    }
    let refusal = alice.expect(T, |m| m.kind == "message" && m.id == "huge-1" && m.type_ == "error").await?;
    assert!(refusal.xml.contains("not-acceptable"), "{}", refusal.xml);
    assert!(
        refusal.xml.contains("too large for Matrix") && refusal.xml.contains("the limit is 60000 bytes"),
        "the refusal says why: {}",
        refusal.xml
    );
    let size = serde_json::to_vec(&json!({"msgtype": "m.text", "body": huge}))?.len();
    assert!(refusal.xml.contains(&format!("would be {size} bytes")), "and the size: {}", refusal.xml);
    // Nothing of it reached room A.
    let history = s.bob.history(&room_a).await?;
    assert!(!history.iter().any(|e| e["content"]["body"].as_str().is_some_and(|b| b.len() > 1000)));

    // From Matrix: ~30 kB of HTML whose styling openers never close, nested formatting.
    let html = "<i>*w _x ".repeat(3_500);
    let plain = "*w _x ".repeat(3_500);
    let content =
        json!({"msgtype": "m.text", "body": plain, "format": "org.matrix.custom.html", "formatted_body": html});
    s.bob.send_event(&room_a, "m.room.message", content).await?;
    for i in 0..3 {
        timings.push(("to Matrix", to_matrix(&mut alice, &s.bob, &room_b, &jid_b, &format!("b out2 {i}")).await?));
        timings.push(("to XMPP", to_xmpp(&mut alice, &s.bob, &room_b, &jid_b, &format!("b in2 {i}")).await?));
    }
    let big = alice
        .expect(T, |m| {
            m.kind == "message"
                && m.from == format!("{jid_a}/Bob Matrix")
                && m.body.as_deref().is_some_and(|b| b.len() > 10_000)
        })
        .await?;
    let words = big.body.as_deref().map_or(0, |b| b.matches('w').count());
    assert_eq!(words, 3_500, "all the text arrives: {:?}", big.body.as_deref().map(|b| &b[..200.min(b.len())]));

    let slow: Vec<_> = timings.iter().filter(|(_, t)| *t >= PROMPT).collect();
    assert!(slow.is_empty(), "room B waited: {slow:?} (all: {timings:?})\n{}", s.log_tail());
    Ok(())
}

/// A message whose conversion is in progress when the gateway is killed is in the
/// outbox, not yet written: after the restart it reaches the Matrix room, once.
#[tokio::test]
async fn a_kill_during_a_conversion_loses_nothing_and_sends_once() -> Result<()> {
    let mut s = MatrixSetup::start_with_env(&[("ISTHMUS_TEST_SLOW_CONVERSION_MS", "10000")]).await?;
    let mut alice = s.alice_linked("phone").await?;
    let (room_id, room_jid) = room(&s, &mut alice, "Slow Room").await?;
    let body = "converted *slowly*, sent once";
    alice.send_groupchat(&room_jid, body).await?;
    s.gateway.wait_log("slow conversion started", 1, T).await?;
    s.gateway.kill().await;
    let before = s.bob.history(&room_id).await?;
    assert!(!before.iter().any(|e| e["content"]["body"] == body), "sent before the kill?");

    s.gateway.restart().await?;
    s.gateway.wait_log("replaying events accepted before the restart", 1, T).await?;
    let seen = s.bob.wait_for(&room_id, Duration::from_secs(60), |e| e["content"]["body"] == body).await?;
    assert_eq!(seen["sender"], json!(s.alice_mx.user_id));
    assert_eq!(seen["content"]["formatted_body"], json!("converted <strong>slowly</strong>, sent once"));
    // Nothing else is in flight that could send it again.
    s.gateway.wait_log("component link established", 2, T).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let copies = s.bob.history(&room_id).await?.iter().filter(|e| e["content"]["body"] == body).count();
    assert_eq!(copies, 1, "{}", s.log_tail());
    assert!(!s.gateway.log().contains("was being written when the gateway stopped"), "not in doubt");
    Ok(())
}
