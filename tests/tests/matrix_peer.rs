//! The Matrix test harness against a real Synapse: users registered by shared secret,
//! rooms, messages, edits, reactions, redactions, media and aliases read back through
//! the raw client-server API client. No gateway here: this proves the far end the
//! Matrix bridge tests stand on.

use std::time::Duration;

use anyhow::Result;
use isthmus_tests::{AppServiceRegistration, MatrixClient, MatrixError, Synapse, SynapseOptions};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(10);

fn body_is(e: &Value, body: &str) -> bool {
    e["type"] == "m.room.message" && e["content"]["body"] == body
}

#[tokio::test]
async fn conversation_edit_reaction_redaction() -> Result<()> {
    let hs = Synapse::start(SynapseOptions::default()).await?;
    let alice_user = hs.register("alice", "alicepass", false).await?;
    hs.register("bob", "bobpass", false).await?;
    assert_eq!(alice_user.user_id, "@alice:localhost");
    let alice = hs.client(&alice_user)?;
    // Bob logs in with his password rather than using the registration's token.
    let bob = MatrixClient::login(&hs.base_url(), "bob", "bobpass").await?;
    assert_eq!(bob.user_id(), "@bob:localhost");
    bob.set_display_name("Bob the Builder").await?;

    let room = alice.create_room(Some("harness"), &["@bob:localhost"], false).await?;
    // An invitee cannot read the timeline yet: the refusal is a typed MatrixError.
    let refused = bob.messages(&room, 10).await.expect_err("an invited user cannot read /messages");
    let refused = refused.downcast_ref::<MatrixError>().expect("a MatrixError");
    assert_eq!((refused.status, refused.errcode.as_str()), (403, "M_FORBIDDEN"), "{refused}");
    assert_eq!(bob.join(&room).await?, room);
    let members = alice.joined_members(&room).await?;
    assert_eq!(members.keys().map(String::as_str).collect::<Vec<_>>(), ["@alice:localhost", "@bob:localhost"]);
    assert_eq!(members["@bob:localhost"].as_deref(), Some("Bob the Builder"));
    assert_eq!(alice.state(&room, "m.room.name", "").await?["name"], "harness");

    // Text, then an edit of it.
    let hello = alice.send_text(&room, "hello bob").await?;
    let edit = alice
        .send_event(
            &room,
            "m.room.message",
            json!({
                "msgtype": "m.text",
                "body": "* hello Bob",
                "m.new_content": {"msgtype": "m.text", "body": "hello Bob"},
                "m.relates_to": {"rel_type": "m.replace", "event_id": hello},
            }),
        )
        .await?;
    // A reaction from bob, and a message alice then redacts.
    let reaction = bob
        .send_event(
            &room,
            "m.reaction",
            json!({"m.relates_to": {"rel_type": "m.annotation", "event_id": hello, "key": "👍"}}),
        )
        .await?;
    let oops = alice.send_text(&room, "oops, wrong room").await?;
    let redaction = alice.redact(&room, &oops, Some("misdirected")).await?;

    // Bob reads it all back, in order.
    let got = bob.wait_for(&room, WAIT, |e| e["type"] == "m.room.redaction").await?;
    assert_eq!(got["event_id"], redaction.as_str());
    assert_eq!(got["sender"], "@alice:localhost");
    assert_eq!(got["content"]["reason"], "misdirected");
    // Room version 11 and later carry `redacts` in the content; Synapse copies it to the top level too.
    assert!(got["content"]["redacts"] == oops.as_str() || got["redacts"] == oops.as_str(), "{got}");

    let msgs = bob.messages(&room, 50).await?;
    let timeline: Vec<&Value> = msgs.iter().filter(|e| e.get("state_key").is_none()).collect();
    let ids: Vec<&str> = timeline.iter().map(|e| e["event_id"].as_str().unwrap_or("?")).collect();
    assert_eq!(ids, [hello.as_str(), edit.as_str(), reaction.as_str(), oops.as_str(), redaction.as_str()]);

    let original = timeline[0];
    assert_eq!(
        (original["sender"].as_str(), original["content"]["body"].as_str()),
        (Some("@alice:localhost"), Some("hello bob"))
    );
    assert_eq!(original["content"]["msgtype"], "m.text");

    let replacement = timeline[1];
    assert_eq!(replacement["content"]["m.relates_to"]["rel_type"], "m.replace");
    assert_eq!(replacement["content"]["m.relates_to"]["event_id"], hello.as_str());
    assert_eq!(replacement["content"]["m.new_content"]["body"], "hello Bob");
    assert_eq!(replacement["content"]["body"], "* hello Bob");

    let thumbs = timeline[2];
    assert_eq!(thumbs["type"], "m.reaction");
    assert_eq!(thumbs["sender"], "@bob:localhost");
    assert_eq!(thumbs["content"]["m.relates_to"]["key"], "👍");
    assert_eq!(thumbs["content"]["m.relates_to"]["event_id"], hello.as_str());

    // The redacted message keeps its id and sender, loses its content.
    let redacted = timeline[3];
    assert_eq!(redacted["type"], "m.room.message");
    assert_eq!(redacted["content"], json!({}));
    assert_eq!(redacted["unsigned"]["redacted_because"]["event_id"], redaction.as_str());
    assert!(!msgs.iter().any(|e| body_is(e, "oops, wrong room")), "redacted text still visible");

    // The same through /event and /relations.
    let fetched = bob.event(&room, &hello).await?;
    assert_eq!(fetched["content"]["body"], "hello bob");
    let edits = bob.relations(&room, &hello, Some("m.replace")).await?;
    assert_eq!(edits.len(), 1);
    assert_eq!(edits[0]["event_id"], edit.as_str());
    let reactions = bob.relations(&room, &hello, Some("m.annotation")).await?;
    assert_eq!(reactions.len(), 1);
    assert_eq!(reactions[0]["content"]["m.relates_to"]["key"], "👍");
    assert_eq!(bob.relations(&room, &hello, None).await?.len(), 2);

    // wait_for sees an event sent after it started polling.
    let late = {
        let alice = alice.clone();
        let room = room.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            alice.send_text(&room, "late news").await
        })
    };
    let got = bob.wait_for(&room, WAIT, |e| body_is(e, "late news")).await?;
    assert_eq!(got["event_id"], late.await??.as_str());

    // A timeout names what was seen.
    let err = bob.wait_for(&room, Duration::from_millis(300), |e| body_is(e, "never sent")).await.unwrap_err();
    let err = format!("{err:#}");
    assert!(err.contains("no matching event") && err.contains("\"late news\""), "{err}");
    Ok(())
}

#[tokio::test]
async fn media_round_trip_and_alias_case() -> Result<()> {
    let mut hs = Synapse::start(SynapseOptions::default()).await?;
    let alice = hs.client(&hs.register("alice", "alicepass", true).await?)?;
    let bob = hs.client(&hs.register("bob", "bobpass", false).await?)?;

    // Every byte value, so nothing is re-encoded on the way.
    let data: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    let mxc = alice.upload(&data, "application/octet-stream", "blob with spaces.bin").await?;
    assert!(mxc.starts_with("mxc://localhost/"), "{mxc}");
    assert_eq!(bob.download(&mxc).await?, data);

    // An alias with capitals resolves as written, and only so.
    let room = alice
        .create_room_with(
            json!({"preset": "public_chat", "room_alias_name": "IsthmusTest_MixedCase", "name": "aliased"}),
        )
        .await?;
    let alias = "#IsthmusTest_MixedCase:localhost";
    assert_eq!(alice.state(&room, "m.room.canonical_alias", "").await?["alias"], alias);
    assert_eq!(bob.resolve_alias(alias).await?, room);
    assert_eq!(bob.join(alias).await?, room);
    let err = bob.resolve_alias("#isthmustest_mixedcase:localhost").await.unwrap_err();
    assert_eq!(err.downcast_ref::<MatrixError>().map(|e| e.errcode.as_str()), Some("M_NOT_FOUND"), "{err:#}");

    // A file message pointing at the upload reads back with its URI.
    let file =
        bob.send_event(&room, "m.room.message", json!({"msgtype": "m.file", "body": "blob.bin", "url": mxc})).await?;
    let got = alice.wait_for(&room, WAIT, |e| e["content"]["msgtype"] == "m.file").await?;
    assert_eq!((got["event_id"].as_str(), got["content"]["url"].as_str()), (Some(file.as_str()), Some(mxc.as_str())));

    // A restart keeps users, rooms and media.
    hs.restart().await?;
    let alice = MatrixClient::login(&hs.base_url(), "@alice:localhost", "alicepass").await?;
    assert_eq!(alice.resolve_alias(alias).await?, room);
    assert_eq!(alice.download(&mxc).await?, data);
    let members = alice.joined_members(&room).await?;
    assert!(members.contains_key("@bob:localhost"), "{members:?}");
    Ok(())
}

#[tokio::test]
async fn app_service_registration_is_loaded() -> Result<()> {
    let hs = Synapse::start(SynapseOptions {
        app_service: Some(AppServiceRegistration {
            id: "isthmus".into(),
            as_token: "as-token-test".into(),
            hs_token: "hs-token-test".into(),
            // Nothing listens there: this test only uses the client-server side.
            url: format!("http://127.0.0.1:{}", isthmus_tests::process::free_port()),
            sender_localpart: "isthmus".into(),
            user_regex: "@_xmpp_.*:localhost".into(),
            alias_regex: Some("#_xmpp_.*:localhost".into()),
        }),
    })
    .await?;
    let bot = MatrixClient::from_token(&hs.base_url(), "@isthmus:localhost", "as-token-test")?;
    // The as_token authenticates as the sender, and may register a puppet in its namespace…
    let whoami = bot.call(reqwest::Method::GET, "/_matrix/client/v3/account/whoami", None).await?;
    assert_eq!(whoami["user_id"], "@isthmus:localhost");
    let r = bot
        .call(
            reqwest::Method::POST,
            "/_matrix/client/v3/register",
            Some(&json!({"type": "m.login.application_service", "username": "_xmpp_carol"})),
        )
        .await?;
    assert_eq!(r["user_id"], "@_xmpp_carol:localhost");
    // …but ordinary users may not take it.
    let alice = hs.client(&hs.register("alice", "alicepass", false).await?)?;
    let err = alice
        .create_room_with(json!({"room_alias_name": "_xmpp_room"}))
        .await
        .expect_err("the alias namespace is the service's");
    assert_eq!(err.downcast_ref::<MatrixError>().map(|e| e.errcode.as_str()), Some("M_EXCLUSIVE"), "{err:#}");
    Ok(())
}
