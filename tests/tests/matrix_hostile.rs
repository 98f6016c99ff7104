//! Hostile text through a real Synapse: markup nested as deep as a sender
//! likes, from Matrix (`<b>` × 16,000 and `<blockquote>` × 4,000 in `formatted_body`)
//! and from XMPP (a line of 20,000 `>`, 30 kB of styling openers never
//! closed). Each once overflowed the stack or stalled the gateway; now each
//! arrives, converted within bounds, and the gateway goes on serving.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use isthmus_tests::matrix_scenario::{MATRIX_DOMAIN, MatrixSetup, is_groupchat_from, join_room, matrix_jid};
use isthmus_tests::scenario::T;
use serde_json::json;

#[tokio::test]
async fn deeply_nested_markup_both_ways_hurts_nothing() -> Result<()> {
    let s = MatrixSetup::start().await?;
    let pid = s.gateway.pid().context("gateway running")?;
    let mut alice = s.alice_linked("phone").await?;
    let room = s.bob.create_room(Some("Hostile"), &[&s.alice_mx.user_id], false).await?;
    let room_jid = matrix_jid(&room)?;
    let joined = join_room(&mut alice, &room_jid, "Alice").await?;
    assert!(joined.has_status(110), "{}", joined.xml);
    let bob_nick = format!("{room_jid}/Bob Matrix");

    // Matrix → XMPP: HTML opened deeper than any stack would carry, never closed
    // (as much as fits in one Matrix event of 64 KiB).
    for (name, open, depth) in [("bold", "<b>", 16_000), ("quote", "<blockquote>", 4_000)] {
        let html = format!("{}deep {name}", open.repeat(depth));
        s.bob
            .send_event(
                &room,
                "m.room.message",
                json!({"msgtype": "m.text", "body": format!("deep {name}"), "format": "org.matrix.custom.html", "formatted_body": html}),
            )
            .await?;
        let got = alice
            .expect(T, |m| {
                m.kind == "message"
                    && m.from == bob_nick
                    && m.body.as_deref().is_some_and(|b| b.contains(&format!("deep {name}")))
            })
            .await?;
        let body = got.body.unwrap_or_default();
        assert!(body.len() < 4096, "the {name} bomb converts to a short body ({} bytes)", body.len());
        println!("{name} × {depth} from Matrix reached XMPP as {:?}", &body[..body.len().min(120)]);
    }

    // XMPP → Matrix: a line of 20,000 `>`, then 200 kB of unclosed openers.
    let quotes = format!("{} deep quote", ">".repeat(20_000));
    alice.send_groupchat(&room_jid, &quotes).await?;
    let seen = s
        .bob
        .wait_for(&room, T, |e| {
            e["sender"] == json!(s.alice_mx.user_id)
                && e["content"]["body"].as_str().is_some_and(|b| b.ends_with("deep quote"))
        })
        .await?;
    let html = seen["content"]["formatted_body"].as_str().unwrap_or_default();
    assert!(
        html.matches("<blockquote>").count() <= 32,
        "quote depth capped: {} levels",
        html.matches("<blockquote>").count()
    );

    let openers: String = (0..40_000).map(|i| format!("*w{i} ")).collect();
    let started = Instant::now();
    // (30 kB: a Matrix event holds at most 64 KiB; larger messages are refused to their sender)
    alice.send_groupchat(&room_jid, &openers[..openers.len().min(30_000)]).await?;
    s.bob.wait_for(&room, T, |e| e["content"]["body"].as_str().is_some_and(|b| b.starts_with("*w0 *w1 "))).await?;
    println!("30 kB of unclosed openers reached Matrix in {:?}", started.elapsed());

    // The same process serves on, both ways, at once.
    assert_eq!(s.gateway.pid(), Some(pid), "the gateway is the same process");
    let started = Instant::now();
    s.bob.send_text(&room, "still there?").await?;
    alice.expect(T, |m| is_groupchat_from(m, &bob_nick, "still there?")).await?;
    alice.send_groupchat(&room_jid, "yes").await?;
    s.bob.wait_for(&room, T, |e| e["content"]["body"] == "yes").await?;
    let round = started.elapsed();
    println!("an ordinary message each way after the hostile ones: {round:?}");
    assert!(round < Duration::from_secs(5), "ordinary messages are not held up: {round:?}");
    assert_eq!(s.gateway.log().matches("panicked").count(), 0, "nothing panicked");
    Ok(())
}

/// A login to a homeserver that never answers (a stranger's own server, say)
/// holds up nobody else: other requests to the same gateway domain are
/// answered at once while it waits.
#[tokio::test]
async fn a_login_that_hangs_holds_up_no_one_else() -> Result<()> {
    // Accepts connections and never answers them.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let silent_url = format!("http://127.0.0.1:{}", silent.local_addr()?.port());
    let held = tokio::spawn(async move {
        let mut kept = Vec::new();
        while let Ok((tcp, _)) = silent.accept().await {
            kept.push(tcp);
        }
    });
    let s = MatrixSetup::start_with_homeservers(&[&silent_url]).await?;
    let mut alice = s.alice("phone").await?;
    alice
        .send_raw(&format!(
            "<iq type='set' to='{MATRIX_DOMAIN}' id='hang1'><command xmlns='http://jabber.org/protocol/commands' node='login' action='execute'/></iq>"
        ))
        .await?;
    let form = alice.expect(T, |m| m.kind == "iq" && m.id == "hang1").await?;
    let session =
        form.xml.split("sessionid=\"").nth(1).and_then(|r| r.split('"').next()).context("sessionid")?.to_owned();
    alice
        .send_raw(&format!(
            "<iq type='set' to='{MATRIX_DOMAIN}' id='hang2'><command xmlns='http://jabber.org/protocol/commands' node='login' sessionid='{session}'>\
             <x xmlns='jabber:x:data' type='submit'><field var='homeserver'><value>{silent_url}</value></field>\
             <field var='user'><value>alice</value></field><field var='password'><value>x</value></field></x></command></iq>"
        ))
        .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // While alice's login waits, carol is answered at once, and alice's other requests too.
    let mut carol = s.xmpp("carol", "r").await?;
    for (who, client) in [("carol", &mut carol), ("alice", &mut alice)] {
        let started = Instant::now();
        let id = format!("info-{who}");
        client
            .send_raw(&format!(
                "<iq type='get' to='{MATRIX_DOMAIN}' id='{id}'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>"
            ))
            .await?;
        let info = client.expect(T, |m| m.kind == "iq" && m.id == id).await?;
        let waited = started.elapsed();
        println!("{who}'s disco#info answered in {waited:?} while a login hangs");
        assert_eq!(info.type_, "result", "{}", info.xml);
        assert!(waited < Duration::from_secs(2), "{who} waited {waited:?} behind the hanging login");
    }
    let pending = alice.drain(Duration::from_millis(100)).await?;
    assert!(!pending.iter().any(|m| m.id == "hang2"), "the login was still waiting on the silent homeserver");
    held.abort();
    Ok(())
}
