//! The Matrix bridge in an end-to-end encrypted room: a real Synapse, Prosody with
//! Isthmus attached as the `matrix.localhost` component, slixmpp on the XMPP side,
//! and on the Matrix side bob as a real E2EE client (matrix-sdk, its own device and
//! crypto store). The gateway's device of alice's account must decrypt what bob
//! sends and encrypt what alice sends so that bob's device can decrypt it; the
//! homeserver itself only ever holds `m.room.encrypted` events.

// matrix-sdk's sync future is deep: proving it `Send` for `tokio::spawn` needs more than 128.
#![recursion_limit = "256"]

use std::time::Duration;

use anyhow::{Context, Result, bail};
use isthmus_tests::MatrixClient;
use isthmus_tests::XmppClient;
use isthmus_tests::matrix_scenario::{
    MATRIX_DOMAIN, MatrixSetup, is_groupchat_from, join_room, login_adhoc, matrix_jid as jid, oob_url, serve_file,
};
use isthmus_tests::scenario::T;
use isthmus_tests::synapse::MatrixUser;
use matrix_sdk::attachment::AttachmentConfig;
use matrix_sdk::config::SyncSettings;
use matrix_sdk::deserialized_responses::EncryptionInfo;
use matrix_sdk::media::{MediaFormat, MediaRequestParameters};
use matrix_sdk::ruma::api::client::room::create_room::v3::{Request as CreateRoomRequest, RoomPreset};
use matrix_sdk::ruma::events::room::MediaSource;
use matrix_sdk::ruma::events::room::encrypted::OriginalSyncRoomEncryptedEvent;
use matrix_sdk::ruma::events::room::message::{MessageType, OriginalSyncRoomMessageEvent, RoomMessageEventContent};
use matrix_sdk::ruma::{OwnedEventId, OwnedUserId, UserId};
use matrix_sdk::{Client, Room, RoomMemberships};
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

const DOMAIN: &str = MATRIX_DOMAIN;
/// Key exchange (device queries, one-time key claims, to-device room keys) takes a few syncs.
const E2EE_T: Duration = Duration::from_secs(60);

/// The gateway log lines that matter for encryption, and its warnings and errors (the last 80).
fn gateway_crypto_log(s: &MatrixSetup) -> String {
    let log = s.gateway.log();
    let keys = [
        "WARN",
        "ERROR",
        "crypt",
        "megolm",
        "olm",
        "room key",
        "room_key",
        "to-device",
        "to_device",
        "keys_query",
        "keys/query",
        "keys/claim",
        "one-time",
        "not bridged",
        "Matrix delivery",
        "UTD",
    ];
    let lines: Vec<&str> = log.lines().filter(|l| keys.iter().any(|k| l.contains(k))).collect();
    let shown = &lines[lines.len().saturating_sub(80)..];
    format!(
        "gateway log ({} in {}), {} of {} relevant lines:\n{}",
        s.gateway.log_path().display(),
        s.gateway.dir().display(),
        shown.len(),
        lines.len(),
        shown.join("\n")
    )
}

/// What bob's matrix-sdk client got from its sync, in order.
#[derive(Debug, Clone)]
enum Seen {
    /// A message, decrypted when `encryption` is set.
    Message {
        event_id: OwnedEventId,
        sender: OwnedUserId,
        body: String,
        encryption: Option<EncryptionInfo>,
        /// Where a file message's file is (and, encrypted, how to decrypt it).
        source: Option<MediaSource>,
    },
    /// An `m.room.encrypted` event bob's device could not decrypt.
    Undecryptable { event_id: OwnedEventId, sender: OwnedUserId, content: String },
}

/// Bob as a real E2EE client: matrix-sdk with a SQLite store, syncing in the background.
struct Bob {
    client: Client,
    seen: mpsc::UnboundedReceiver<Seen>,
    log: Vec<Seen>,
    sync: JoinHandle<()>,
    _dir: TempDir,
}

impl Drop for Bob {
    fn drop(&mut self) {
        self.sync.abort();
    }
}

impl Bob {
    async fn login(homeserver: &str, user: &MatrixUser) -> Result<Bob> {
        let dir = tempfile::Builder::new().prefix("isthmus-bob-sdk-").tempdir()?;
        let client = Client::builder()
            .homeserver_url(homeserver)
            .sqlite_store(dir.path(), None)
            .build()
            .await
            .context("build bob's matrix-sdk client")?;
        let localpart = user.user_id.trim_start_matches('@').split(':').next().unwrap_or_default();
        client
            .matrix_auth()
            .login_username(localpart, &user.password)
            .initial_device_display_name("bob's matrix-sdk")
            .send()
            .await
            .context("bob's matrix-sdk login")?;
        let (tx, seen) = mpsc::unbounded_channel();
        let tx2 = tx.clone();
        client.add_event_handler(move |ev: OriginalSyncRoomMessageEvent, enc: Option<EncryptionInfo>| {
            let tx = tx.clone();
            async move {
                let source = match &ev.content.msgtype {
                    MessageType::Image(c) => Some(c.source.clone()),
                    MessageType::File(c) => Some(c.source.clone()),
                    _ => None,
                };
                let _ = tx.send(Seen::Message {
                    event_id: ev.event_id,
                    sender: ev.sender,
                    body: ev.content.body().to_owned(),
                    encryption: enc,
                    source,
                });
            }
        });
        client.add_event_handler(move |ev: OriginalSyncRoomEncryptedEvent| {
            let tx = tx2.clone();
            async move {
                let content = serde_json::to_string(&ev.content).unwrap_or_default();
                let _ = tx.send(Seen::Undecryptable { event_id: ev.event_id, sender: ev.sender, content });
            }
        });
        // One sync before anything else: it uploads the device's identity and one-time keys.
        client.sync_once(SyncSettings::default()).await.context("bob's first sync")?;
        let c = client.clone();
        let sync = tokio::spawn(async move {
            if let Err(e) = c.sync(SyncSettings::default().timeout(Duration::from_secs(5))).await {
                eprintln!("bob's matrix-sdk sync ended: {e}");
            }
        });
        Ok(Bob { client, seen, log: Vec::new(), sync, _dir: dir })
    }

    /// The first message (already seen or arriving within `timeout`) matching `pred`;
    /// on timeout, everything bob's client saw.
    async fn expect(&mut self, timeout: Duration, pred: impl Fn(&Seen) -> bool) -> Result<Seen> {
        if let Some(s) = self.log.iter().find(|s| pred(s)) {
            return Ok(s.clone());
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.seen.recv()).await {
                Ok(Some(s)) => {
                    self.log.push(s.clone());
                    if pred(&s) {
                        return Ok(s);
                    }
                }
                Ok(None) => bail!("bob's event handlers are gone; seen: {:#?}", self.log),
                Err(_) => {
                    bail!("bob's matrix-sdk client saw no matching event within {timeout:?}; seen: {:#?}", self.log)
                }
            }
        }
    }
}

/// Poll until `user` is a joined member of `room` in bob's client's own view.
async fn wait_joined(room: &Room, user: &UserId, timeout: Duration) -> Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let members = room.members_no_sync(RoomMemberships::JOIN).await?;
        if members.iter().any(|m| m.user_id() == user) {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            let ids: Vec<String> = members.iter().map(|m| m.user_id().to_string()).collect();
            bail!("bob's client does not see {user} joined in {} within {timeout:?}; joined: {ids:?}", room.room_id());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Check that the homeserver holds `event_id` encrypted, and nowhere the plaintext.
async fn assert_encrypted_on_server(bob_raw: &MatrixClient, room_id: &str, event_id: &str, plain: &str) -> Result<()> {
    let ev = bob_raw.event(room_id, event_id).await?;
    let text = ev.to_string();
    if ev["type"] != "m.room.encrypted"
        || ev["content"]["algorithm"] != "m.megolm.v1.aes-sha2"
        || !ev["content"]["ciphertext"].is_string()
        || ev["content"].get("body").is_some()
        || text.contains(plain)
    {
        bail!("the homeserver holds {event_id} not as a Megolm-encrypted event: {text}");
    }
    Ok(())
}

/// Bob creates an encrypted room `name` and invites alice's Matrix account; alice
/// links it on XMPP and enters the room's MUC. The room (bob's view), its id, its
/// JID and alice on XMPP.
async fn encrypted_room_with_alice(
    s: &MatrixSetup,
    bob: &Bob,
    name: &str,
) -> Result<(Room, String, String, XmppClient)> {
    let alice_uid = UserId::parse(&s.alice_mx.user_id)?;
    let mut request = CreateRoomRequest::new();
    request.name = Some(name.into());
    request.preset = Some(RoomPreset::PrivateChat);
    request.invite = vec![alice_uid.clone()];
    request.initial_state = vec![serde_json::from_value(json!({
        "type": "m.room.encryption",
        "state_key": "",
        "content": {"algorithm": "m.megolm.v1.aes-sha2"},
    }))?];
    let room = bob.client.create_room(request).await.context("bob creates the encrypted room")?;
    let room_id = room.room_id().to_string();
    let room_jid = jid(&room_id)?;
    let state: Value = s
        .bob
        .call(
            reqwest::Method::GET,
            &format!("/_matrix/client/v3/rooms/{}/state/m.room.encryption/", enc(&room_id)),
            None,
        )
        .await?;
    assert_eq!(state["algorithm"], "m.megolm.v1.aes-sha2", "the room's encryption state: {state}");

    // Alice links her account on XMPP and joins the room as a MUC.
    let mut alice = s.alice("phone").await?;
    let done = login_adhoc(&mut alice, "alice", &s.alice_mx.password).await?;
    if !done.contains("status=\"completed\"") || !done.contains(&s.alice_mx.user_id) {
        bail!("login did not complete: {done}");
    }
    alice
        .expect(T, |m| {
            m.kind == "message" && m.from == DOMAIN && m.body.as_deref().is_some_and(|b| b.contains(&room_id))
        })
        .await
        .context("the invitation to the encrypted room was not announced")?;
    let joined = join_room(&mut alice, &room_jid, "Alice").await?;
    if !joined.has_status(110) {
        bail!("alice could not enter the encrypted room: {}\n{}", joined.xml, gateway_crypto_log(s));
    }
    alice.expect(T, |m| m.kind == "presence" && m.from == format!("{room_jid}/Bob Matrix")).await?;
    wait_joined(&room, &alice_uid, T).await?;
    Ok((room, room_id, room_jid, alice))
}

/// bob (matrix-sdk, E2EE) and alice (XMPP, through the gateway's device of her Matrix
/// account) talk both ways in an encrypted room; the homeserver sees only ciphertext.
#[tokio::test]
async fn a_message_both_ways_in_an_encrypted_room() -> Result<()> {
    let s = MatrixSetup::start().await?;
    let mut bob = Bob::login(&s.synapse.base_url(), &s.bob_user).await?;
    let alice_uid = UserId::parse(&s.alice_mx.user_id)?;
    let (room, room_id, room_jid, mut alice) = encrypted_room_with_alice(&s, &bob, "Isthmus E2EE").await?;

    // Matrix → XMPP: bob's client encrypts; the gateway's device decrypts.
    let from_bob = "E2EE hello from matrix";
    let sent = room.send(RoomMessageEventContent::text_plain(from_bob)).await.context("bob sends")?;
    if sent.encryption_info.is_none() {
        bail!("bob's client sent in clear in an encrypted room");
    }
    let bob_event = sent.response.event_id.to_string();
    if let Err(e) = alice.expect(E2EE_T, |m| is_groupchat_from(m, &format!("{room_jid}/Bob Matrix"), from_bob)).await {
        bail!("alice did not get bob's encrypted message ({bob_event}) in clear: {e:#}\n{}", gateway_crypto_log(&s));
    }

    // XMPP → Matrix: the gateway encrypts for bob's device; bob's client decrypts.
    let from_alice = "E2EE hello from xmpp";
    alice.send_groupchat(&room_jid, from_alice).await?;
    alice
        .expect(T, |m| is_groupchat_from(m, &format!("{room_jid}/Alice"), from_alice))
        .await
        .with_context(|| format!("alice's message was not reflected\n{}", gateway_crypto_log(&s)))?;
    let got = bob
        .expect(E2EE_T, |e| match e {
            Seen::Message { body, sender, .. } => body == from_alice && *sender == alice_uid,
            Seen::Undecryptable { sender, .. } => *sender == alice_uid,
        })
        .await
        .with_context(|| gateway_crypto_log(&s))?;
    let alice_event = match got {
        Seen::Message { event_id, encryption: Some(info), .. } => {
            assert_eq!(info.sender, alice_uid, "the sender the Megolm session vouches for: {info:?}");
            event_id
        }
        Seen::Message { event_id, encryption: None, .. } => {
            bail!("bob got alice's message {event_id} in clear, not encrypted")
        }
        Seen::Undecryptable { event_id, content, .. } => {
            bail!("bob's device could not decrypt alice's message {event_id}: {content}\n{}", gateway_crypto_log(&s))
        }
    };
    // Fetched again by id, it is still decryptable and decrypted to the same text.
    let fetched = room.event(&alice_event, None).await?;
    let decrypted: Value = serde_json::from_str(fetched.raw().json().get())?;
    assert!(fetched.encryption_info().is_some(), "fetched again, {alice_event} is not decrypted: {decrypted}");
    assert_eq!(decrypted["type"], "m.room.message", "{decrypted}");
    assert_eq!(decrypted["content"]["body"], from_alice, "{decrypted}");
    assert_eq!(decrypted["sender"], json!(s.alice_mx.user_id), "{decrypted}");

    // Sent once: the gateway's own (encrypted) echo is not bridged back to XMPP.
    let echoes = alice.drain(Duration::from_secs(2)).await?;
    assert!(!echoes.iter().any(|m| m.body.as_deref() == Some(from_alice)), "the Matrix echo came back: {echoes:?}");

    // On the wire: the homeserver holds both as Megolm ciphertext, and no plaintext anywhere.
    assert_encrypted_on_server(&s.bob, &room_id, &bob_event, from_bob).await?;
    assert_encrypted_on_server(&s.bob, &room_id, alice_event.as_str(), from_alice).await?;
    let history = s.bob.history(&room_id).await?;
    let clear: Vec<&Value> = history
        .iter()
        .filter(|e| {
            e["type"] == "m.room.message" || e.to_string().contains(from_bob) || e.to_string().contains(from_alice)
        })
        .collect();
    assert!(clear.is_empty(), "the homeserver holds messages in clear: {clear:#?}");
    let encrypted = history.iter().filter(|e| e["type"] == "m.room.encrypted").count();
    assert_eq!(encrypted, 2, "two encrypted events in the room: {history:#?}");
    let raw_alice = s.bob.event(&room_id, alice_event.as_str()).await?;
    assert_eq!(raw_alice["sender"], json!(s.alice_mx.user_id), "{raw_alice}");
    Ok(())
}

/// Files in an encrypted room: bob's encrypted image reaches XMPP as a media proxy
/// link that serves it decrypted (the homeserver holds only ciphertext), and alice's
/// XEP-0066 file reaches bob as an encrypted attachment his device decrypts.
#[tokio::test]
async fn an_image_both_ways_in_an_encrypted_room() -> Result<()> {
    let s = MatrixSetup::start().await?;
    let mut bob = Bob::login(&s.synapse.base_url(), &s.bob_user).await?;
    let alice_uid = UserId::parse(&s.alice_mx.user_id)?;
    let (room, _room_id, room_jid, mut alice) = encrypted_room_with_alice(&s, &bob, "E2EE files").await?;

    // Matrix → XMPP.
    let mut picture = b"\x89PNG\r\n\x1a\nbob-secret".to_vec();
    picture.extend((0..4096u32).map(|i| (i * 7 + 3) as u8));
    let mime: mime::Mime = "image/png".parse()?;
    let sent = room
        .send_attachment("secret.png", &mime, picture.clone(), AttachmentConfig::new())
        .await
        .context("bob sends an encrypted image")?;
    let sent_raw = s.bob.event(room.room_id().as_str(), sent.event_id.as_str()).await?;
    assert_eq!(sent_raw["type"], "m.room.encrypted", "{sent_raw}");
    let m = alice
        .expect(E2EE_T, |m| m.from == format!("{room_jid}/Bob Matrix") && m.xml.contains("jabber:x:oob"))
        .await
        .with_context(|| gateway_crypto_log(&s))?;
    let url = oob_url(&m.xml).context("no XEP-0066 URL")?;
    assert!(url.starts_with(&s.media_url) && url.ends_with("/secret.png"), "{url}");
    let response = reqwest::get(&url).await?;
    assert_eq!(response.status(), reqwest::StatusCode::OK, "{url}");
    assert_eq!(response.headers()["content-type"], "image/png");
    let got = response.bytes().await?;
    assert!(got.as_ref() == picture.as_slice(), "the proxy served {} other bytes", got.len());
    // The homeserver itself holds the file encrypted.
    let Some(MediaSource::Encrypted(file)) =
        (match bob.expect(T, |e| matches!(e, Seen::Message { event_id, .. } if *event_id == sent.event_id)).await? {
            Seen::Message { source, .. } => source,
            Seen::Undecryptable { .. } => None,
        })
    else {
        bail!("bob's own image is no encrypted attachment");
    };
    let stored = s.bob.download(file.url.as_str()).await?;
    assert!(stored.len() == picture.len() && stored != picture, "the homeserver holds the file in clear");
    // Changing the key in the link is refused (it is under the link's token).
    let segments: Vec<&str> = url.rsplitn(3, '/').collect();
    // The key's first letter changed (to another letter: the key is random).
    let first = segments[1].chars().find(char::is_ascii_alphabetic).context("the key has letters")?;
    let other = if first == 'Z' { "Y" } else { "Z" };
    let tampered = url.replacen(segments[1], &segments[1].replacen(first, other, 1), 1);
    assert_ne!(tampered, url);
    assert_eq!(reqwest::get(&tampered).await?.status(), reqwest::StatusCode::NOT_FOUND, "{tampered}");

    // XMPP → Matrix.
    let mut photo = b"\x89PNG\r\n\x1a\nalice-secret".to_vec();
    photo.extend((0..2048u32).map(|i| (i * 13 + 5) as u8));
    let (port, server) = serve_file(photo.clone(), "image/png", 1).await?;
    let file_url = format!("http://127.0.0.1:{port}/upload/k3y/photo.png");
    alice
        .send_raw(&format!(
            "<message type='groupchat' to='{room_jid}' id='efile'><body>{file_url}</body>\
             <x xmlns='jabber:x:oob'><url>{file_url}</url></x></message>"
        ))
        .await?;
    let got = bob
        .expect(E2EE_T, |e| match e {
            Seen::Message { sender, source, .. } => *sender == alice_uid && source.is_some(),
            Seen::Undecryptable { sender, .. } => *sender == alice_uid,
        })
        .await
        .with_context(|| gateway_crypto_log(&s))?;
    let Seen::Message { body, encryption, source: Some(source), event_id, .. } = got else {
        bail!("bob's device could not decrypt alice's file: {got:?}\n{}", gateway_crypto_log(&s));
    };
    assert_eq!(body, "photo.png");
    assert!(encryption.is_some(), "the file event was sent in clear");
    let MediaSource::Encrypted(file) = &source else { bail!("alice's file was uploaded in clear: {source:?}") };
    let stored = s.bob.download(file.url.as_str()).await?;
    assert!(stored != photo, "the homeserver holds alice's file in clear");
    let decrypted = bob
        .client
        .media()
        .get_media_content(&MediaRequestParameters { source, format: MediaFormat::File }, false)
        .await
        .context("bob's client downloads and decrypts alice's file")?;
    assert!(decrypted == photo, "bob decrypted {} other bytes", decrypted.len());
    let raw = s.bob.event(room.room_id().as_str(), event_id.as_str()).await?;
    assert_eq!(raw["type"], "m.room.encrypted", "{raw}");
    server.abort();
    Ok(())
}

/// Percent-encode one path segment.
fn enc(s: &str) -> String {
    isthmus_tests::matrix::encode(s)
}
