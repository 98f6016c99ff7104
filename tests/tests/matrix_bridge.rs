//! The Matrix bridge end to end: a real Synapse, Prosody with Isthmus attached as
//! the `matrix.localhost` component, slixmpp on the XMPP side and a raw
//! client-server API client on the Matrix side.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use isthmus_tests::matrix_scenario::{
    MATRIX_DOMAIN, MatrixSetup, is_groupchat_from, join_room, login_adhoc, matrix_jid, oob_url, serve_file, xml_escape,
};
use isthmus_tests::scenario::T;
use serde_json::{Value, json};

const DOMAIN: &str = MATRIX_DOMAIN;

fn jid(matrix_id: &str) -> Result<String> {
    matrix_jid(matrix_id)
}

/// Link an account, see the room in the directory, join it, talk both ways; then
/// restart Isthmus and talk again without a new login.
#[tokio::test]
async fn link_join_talk_and_survive_a_restart() -> Result<()> {
    let mut s = MatrixSetup::start().await?;
    let mut alice = s.alice("phone").await?;

    // Before linking, joining a Matrix room is refused with a clear text.
    let room_id = s.bob.create_room(Some("Isthmus Test"), &[&s.alice_mx.user_id], false).await?;
    let room_jid = jid(&room_id)?;
    let refused = join_room(&mut alice, &room_jid, "Alice").await?;
    if refused.type_ != "error" || !refused.xml.contains("login") {
        bail!("joining before login must fail and say to log in: {}", refused.xml);
    }

    // A wrong password is refused and says so.
    let wrong = login_adhoc(&mut alice, "alice", "not-the-password").await?;
    if !wrong.contains("type=\"error\"") || !wrong.contains("wrong user name or password") {
        bail!("a wrong password must be refused with the reason: {wrong}");
    }
    let done = login_adhoc(&mut alice, "alice", &s.alice_mx.password).await?;
    if !done.contains("status=\"completed\"") || !done.contains(&s.alice_mx.user_id) {
        bail!("login did not complete: {done}");
    }

    // The room alice was invited to is announced by the gateway.
    let invite = alice
        .expect(T, |m| {
            m.kind == "message" && m.from == DOMAIN && m.body.as_deref().is_some_and(|b| b.contains("invited"))
        })
        .await?;
    assert!(invite.body.as_deref().is_some_and(|b| b.contains(&room_id)), "{:?}", invite.body);

    let joined = join_room(&mut alice, &room_jid, "Alice").await?;
    assert!(joined.has_status(110), "self-presence: {}", joined.xml);
    // Bob is an occupant under his display name, with his real JID.
    let bob_presence = alice.expect(T, |m| m.kind == "presence" && m.from == format!("{room_jid}/Bob Matrix")).await?;
    assert!(bob_presence.xml.contains(&xml_escape(&jid(s.bob.user_id())?)) || bob_presence.xml.contains("Bob Matrix"));

    // The room directory lists it under its name.
    alice
        .send_raw(&format!(
            "<iq type='get' to='{DOMAIN}' id='items1'><query xmlns='http://jabber.org/protocol/disco#items'/></iq>"
        ))
        .await?;
    let items = alice.expect(T, |m| m.kind == "iq" && m.id == "items1").await?;
    assert!(items.xml.contains(&room_jid) && items.xml.contains("Isthmus Test"), "{}", items.xml);

    // Matrix → XMPP.
    s.bob.send_text(&room_id, "hello from matrix").await?;
    alice.expect(T, |m| is_groupchat_from(m, &format!("{room_jid}/Bob Matrix"), "hello from matrix")).await?;
    // XMPP → Matrix, from alice's own Matrix account; the reflection comes back to XMPP.
    alice.send_groupchat(&room_jid, "hello from xmpp").await?;
    alice.expect(T, |m| is_groupchat_from(m, &format!("{room_jid}/Alice"), "hello from xmpp")).await?;
    let seen = s
        .bob
        .wait_for(&room_id, T, |e| e["type"] == "m.room.message" && e["content"]["body"] == "hello from xmpp")
        .await?;
    assert_eq!(seen["sender"], json!(s.alice_mx.user_id));
    // Sent once: Matrix's echo of it is not bridged back.
    let echoes = alice.drain(Duration::from_secs(2)).await?;
    assert!(
        !echoes.iter().any(|m| m.body.as_deref() == Some("hello from xmpp")),
        "the Matrix echo came back: {echoes:?}"
    );

    // Restart: the login and the room survive without a new login.
    alice.disconnect().await;
    s.gateway.restart().await?;
    s.gateway.wait_log("component link established", 2, T).await?;
    let mut alice = s.alice("laptop").await?;
    let joined = join_room(&mut alice, &room_jid, "Alice").await?;
    assert!(joined.has_status(110), "{}", joined.xml);
    s.bob.send_text(&room_id, "after the restart").await?;
    alice.expect(T, |m| is_groupchat_from(m, &format!("{room_jid}/Bob Matrix"), "after the restart")).await?;
    alice.send_groupchat(&room_jid, "xmpp after the restart").await?;
    s.bob
        .wait_for(&room_id, T, |e| {
            e["content"]["body"] == "xmpp after the restart" && e["sender"] == json!(s.alice_mx.user_id)
        })
        .await?;
    // One gateway device: the restart reused it.
    let alice_mx = s.synapse.client(&s.alice_mx)?;
    let devices: Value = alice_mx.call(reqwest::Method::GET, "/_matrix/client/v3/devices", None).await?;
    let gateway_devices = devices["devices"]
        .as_array()
        .map(|d| d.iter().filter(|d| d["display_name"].as_str().is_some_and(|n| n.starts_with("Isthmus"))).count())
        .unwrap_or(0);
    assert_eq!(gateway_devices, 1, "{devices}");
    assert_eq!(s.gateway.log().matches("Matrix account linked account=").count(), 1, "one login only");
    Ok(())
}

/// A file both ways: bob's `m.image` reaches XMPP as an XEP-0066 link to the
/// gateway's media proxy that yields the same bytes (and only links it handed out
/// work); alice's XEP-0066 file reaches Matrix as an uploaded `m.image`.
#[tokio::test]
async fn an_image_both_ways() -> Result<()> {
    let s = MatrixSetup::start().await?;
    let mut alice = s.alice("phone").await?;
    let done = login_adhoc(&mut alice, "alice", &s.alice_mx.password).await?;
    if !done.contains("status=\"completed\"") {
        bail!("login did not complete: {done}");
    }
    let room_id = s.bob.create_room(Some("Files"), &[&s.alice_mx.user_id], false).await?;
    let room_jid = jid(&room_id)?;
    alice
        .expect(T, |m| {
            m.kind == "message" && m.from == DOMAIN && m.body.as_deref().is_some_and(|b| b.contains(&room_id))
        })
        .await?;
    let joined = join_room(&mut alice, &room_jid, "Alice").await?;
    assert!(joined.has_status(110), "self-presence: {}", joined.xml);

    // Matrix → XMPP: a PNG-like blob (every byte value, so nothing survives a text conversion).
    let mut png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec();
    png.extend((0..4096u32).map(|i| (i * 7 + i / 256) as u8));
    let mxc = s.bob.upload(&png, "image/png", "pixel.png").await?;
    s.bob
        .send_event(
            &room_id,
            "m.room.message",
            json!({"msgtype": "m.image", "body": "pixel.png", "url": mxc,
                   "info": {"mimetype": "image/png", "size": png.len()}}),
        )
        .await?;
    let from_bob = format!("{room_jid}/Bob Matrix");
    let got = alice
        .expect(T, |m| {
            m.kind == "message" && m.type_ == "groupchat" && m.from == from_bob && m.xml.contains("jabber:x:oob")
        })
        .await?;
    let url = oob_url(&got.xml).with_context(|| format!("no XEP-0066 URL in {}", got.xml))?;
    assert!(url.starts_with(&format!("{}/", s.media_url)), "not a media proxy link: {url}");
    assert!(!url.contains("mxc://"), "{url}");
    assert_eq!(got.body.as_deref(), Some(url.as_str()), "the body of a file message is its URL: {}", got.xml);
    let response = reqwest::get(&url).await.with_context(|| format!("GET {url}"))?;
    assert_eq!(response.status(), reqwest::StatusCode::OK, "GET {url}");
    let header = |name: reqwest::header::HeaderName| {
        response.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned()
    };
    assert_eq!(header(reqwest::header::CONTENT_TYPE), "image/png");
    assert_eq!(header(reqwest::header::CONTENT_LENGTH), png.len().to_string());
    let fetched = response.bytes().await?;
    assert!(fetched[..] == png[..], "the proxy gave {} other bytes", fetched.len());
    // Only links the gateway handed out work: another token, or the token on another file, is 404.
    let token = url
        .strip_prefix(&format!("{}/", s.media_url))
        .and_then(|rest| rest.split('/').next())
        .context("no token in the link")?
        .to_owned();
    let other_token: String = token.chars().map(|c| if c == '0' { '1' } else { '0' }).collect();
    let forged = url.replacen(&token, &other_token, 1);
    assert_eq!(reqwest::get(&forged).await?.status(), reqwest::StatusCode::NOT_FOUND, "{forged}");
    let media_id = mxc.rsplit('/').next().context("no media id")?;
    let other_file = url.replacen(&format!("/{media_id}/"), "/AnotherMediaId/", 1);
    assert_ne!(other_file, url);
    assert_eq!(reqwest::get(&other_file).await?.status(), reqwest::StatusCode::NOT_FOUND, "{other_file}");
    let outside = format!("{}/{token}/example.org/{media_id}/x.png", s.media_url);
    assert_eq!(reqwest::get(&outside).await?.status(), reqwest::StatusCode::NOT_FOUND, "{outside}");

    // XMPP → Matrix: alice's client uploaded a file elsewhere (a tiny HTTP server here)
    // and sends its URL as XEP-0066, the body being the URL.
    let mut photo = b"\x89PNG\r\n\x1a\nalice".to_vec();
    photo.extend((0..2048u32).map(|i| (i * 13 + 5) as u8));
    let (port, server) = serve_file(photo.clone(), "image/png", 3).await?;
    let file_url = format!("http://127.0.0.1:{port}/upload/k3y/photo.png");
    alice
        .send_raw(&format!(
            "<message type='groupchat' to='{room_jid}' id='file1'><body>{file_url}</body>\
             <x xmlns='jabber:x:oob'><url>{file_url}</url></x></message>"
        ))
        .await?;
    let event = s
        .bob
        .wait_for(&room_id, T, |e| {
            e["type"] == "m.room.message"
                && e["sender"] == json!(s.alice_mx.user_id)
                && e["content"]["url"].as_str().is_some_and(|u| u.starts_with("mxc://"))
        })
        .await?;
    let content = &event["content"];
    assert_eq!(content["msgtype"], "m.image", "{event}");
    assert_eq!(content["info"]["mimetype"], "image/png", "{event}");
    assert_eq!(content["info"]["size"], json!(photo.len()), "{event}");
    assert_eq!(content["body"], "photo.png", "{event}");
    let uploaded = s.bob.download(content["url"].as_str().unwrap_or_default()).await?;
    assert!(uploaded == photo, "the homeserver holds {} other bytes", uploaded.len());
    // The body was only the URL: no text event besides the file.
    let history = s.bob.messages(&room_id, 30).await?;
    assert!(
        !history.iter().any(|e| e["sender"] == json!(s.alice_mx.user_id) && e["content"]["body"] == json!(file_url)),
        "the URL was sent as text too: {history:?}"
    );
    server.abort();
    Ok(())
}

/// By default the gateway fetches no file from a loopback, private or link-local
/// address: the sender gets an error saying so, the address is never contacted and
/// nothing reaches Matrix. (`an_image_both_ways` is the allowed case, the setting on.)
#[tokio::test]
async fn a_file_on_a_private_address_is_refused_by_default() -> Result<()> {
    let s = MatrixSetup::start_with_fetch_policy(Default::default(), "", false).await?;
    let mut alice = s.alice_linked("phone").await?;
    let room_id = s.bob.create_room(Some("No SSRF"), &[&s.alice_mx.user_id], false).await?;
    let room_jid = jid(&room_id)?;
    let joined = join_room(&mut alice, &room_jid, "Alice").await?;
    assert!(joined.has_status(110), "{}", joined.xml);
    let (port, server) = serve_file(b"internal secret".to_vec(), "text/plain", 1).await?;
    for (id, file_url) in [
        ("ssrf1", format!("http://127.0.0.1:{port}/admin/secret.txt")),
        ("ssrf2", format!("http://localhost:{port}/admin/secret.txt")),
    ] {
        alice
            .send_raw(&format!(
                "<message type='groupchat' to='{room_jid}' id='{id}'><body>{file_url}</body>\
                 <x xmlns='jabber:x:oob'><url>{file_url}</url></x></message>"
            ))
            .await?;
        let err = alice.expect(T, |m| m.kind == "message" && m.id == id && m.type_ == "error").await?;
        assert!(err.xml.contains("does not fetch files from such addresses"), "{}", err.xml);
        assert!(err.xml.contains("fetch_private_addresses"), "says how to allow it: {}", err.xml);
    }
    // A message after them still goes through, and nothing of the refused ones did.
    alice.send_groupchat(&room_jid, "after the refusals").await?;
    s.bob.wait_for(&room_id, T, |e| e["content"]["body"] == "after the refusals").await?;
    let history = s.bob.messages(&room_id, 30).await?;
    assert!(
        !history.iter().any(|e| e["content"]["body"].as_str().is_some_and(|b| b.contains("secret.txt"))),
        "a refused file reached Matrix: {history:?}"
    );
    assert!(!server.is_finished(), "the private address was contacted");
    server.abort();
    Ok(())
}

/// kill -9 Isthmus while a Matrix burst flows to XMPP, restart it: nothing is
/// bridged twice, everything sent while it was down arrives, in order. The
/// restarted gateway resumes the sync from the last point whose events were safe
/// in the router, not from where its client's store had got to.
#[tokio::test]
async fn a_kill_during_a_matrix_burst_duplicates_nothing_and_loses_nothing_stored() -> Result<()> {
    const N: usize = 150;
    const KILL_AT: usize = 60;
    let mut s = MatrixSetup::start().await?;
    let mut alice = s.alice_linked("phone").await?;
    let room_id = s.bob.create_room(Some("Burst"), &[&s.alice_mx.user_id], false).await?;
    let room_jid = jid(&room_id)?;
    let joined = join_room(&mut alice, &room_jid, "Alice").await?;
    assert!(joined.has_status(110), "{}", joined.xml);
    for i in 0..N {
        if i == KILL_AT {
            s.gateway.kill().await;
        }
        s.bob.send_text(&room_id, &format!("burst-{i}")).await?;
    }
    s.gateway.restart().await?;
    let mut got: Vec<usize> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while tokio::time::Instant::now() < deadline && got.iter().filter(|&&i| i >= KILL_AT).count() < N - KILL_AT {
        for m in alice.drain(Duration::from_secs(2)).await? {
            if m.kind == "message"
                && m.type_ == "groupchat"
                && m.from == format!("{room_jid}/Bob Matrix")
                && let Some(i) = m.body.as_deref().and_then(|b| b.strip_prefix("burst-")).and_then(|n| n.parse().ok())
            {
                got.push(i);
            }
        }
    }
    let mut sorted = got.clone();
    sorted.sort_unstable();
    sorted.dedup();
    let duplicates = got.len() - sorted.len();
    let missing: Vec<usize> = (0..N).filter(|i| !sorted.contains(i)).collect();
    println!(
        "Matrix burst across a kill: {N} sent, {} received, {duplicates} duplicated, missing {missing:?}",
        got.len()
    );
    assert_eq!(duplicates, 0, "arrival order: {got:?}");
    assert!(got.windows(2).all(|w| w[0] < w[1]), "in order: {got:?}");
    // Sent while the gateway was down: none may be missing.
    assert!(missing.iter().all(|&i| i < KILL_AT), "missing after the kill: {missing:?}");
    // Before the kill, only what was already written to the XMPP server's socket can be
    // gone (one run right before the kill; the server drops what it had not read).
    if let (Some(first), Some(last)) = (missing.first(), missing.last()) {
        assert_eq!(last - first + 1, missing.len(), "one run: {missing:?}");
    }
    Ok(())
}

/// The homeserver goes away while alice is in a room: the room hears of it, what
/// alice sends meanwhile reaches Matrix once the homeserver is back (once each, in
/// order), the room hears that it is back, and what was said on Matrix after that
/// reaches alice.
#[tokio::test]
async fn a_homeserver_outage_is_announced_and_loses_nothing() -> Result<()> {
    const MEANWHILE: usize = 3;
    let mut s = MatrixSetup::start().await?;
    let mut alice = s.alice_linked("phone").await?;
    let room_id = s.bob.create_room(Some("Outage"), &[&s.alice_mx.user_id], false).await?;
    let room_jid = jid(&room_id)?;
    alice
        .expect(T, |m| {
            m.kind == "message" && m.from == DOMAIN && m.body.as_deref().is_some_and(|b| b.contains("invited"))
        })
        .await?;
    let joined = join_room(&mut alice, &room_jid, "Alice").await?;
    assert!(joined.has_status(110), "{}", joined.xml);

    s.synapse.stop().await;
    let lost = alice
        .expect(Duration::from_secs(60), |m| {
            m.kind == "message"
                && m.from == room_jid
                && m.body.as_deref().is_some_and(|b| b.starts_with("Lost the connection to the Matrix homeserver"))
        })
        .await?;
    println!("while the homeserver is away the room says: {:?}", lost.body);
    for i in 0..MEANWHILE {
        alice.send_groupchat(&room_jid, &format!("meanwhile {i}")).await?;
    }
    s.synapse.restart().await?;
    let back = alice
        .expect(Duration::from_secs(90), |m| {
            m.kind == "message"
                && m.from == room_jid
                && m.body.as_deref().is_some_and(|b| b.contains("can be reached again"))
        })
        .await?;
    println!("and once it is back: {:?}", back.body);
    // Everything alice sent meanwhile reached Matrix, in order, once each.
    s.bob
        .wait_for(&room_id, Duration::from_secs(60), |e| e["content"]["body"] == format!("meanwhile {}", MEANWHILE - 1))
        .await
        .with_context(|| s.log_tail())?;
    // Alice's client hears each was accepted (the room's reflection), none refused.
    for i in 0..MEANWHILE {
        let body = format!("meanwhile {i}");
        let st = alice.expect(T, |m| m.kind == "message" && m.body.as_deref() == Some(body.as_str())).await?;
        assert!(st.type_ == "groupchat" && st.from == format!("{room_jid}/Alice"), "{}", st.xml);
    }
    s.bob.send_text(&room_id, "after the outage").await?;
    alice.expect(T, |m| is_groupchat_from(m, &format!("{room_jid}/Bob Matrix"), "after the outage")).await?;
    let meanwhile: Vec<String> = s
        .bob
        .history(&room_id)
        .await?
        .iter()
        .filter_map(|e| e["content"]["body"].as_str())
        .filter(|b| b.starts_with("meanwhile "))
        .map(str::to_owned)
        .collect();
    let expected: Vec<String> = (0..MEANWHILE).map(|i| format!("meanwhile {i}")).collect();
    println!("on Matrix, from what alice sent during the outage: {meanwhile:?}");
    assert_eq!(meanwhile, expected, "once each and in order");
    Ok(())
}
