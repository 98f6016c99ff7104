//! The Matrix bridge end to end: a real Synapse, Prosody with Isthmus attached as
//! the `matrix.localhost` component, slixmpp on the XMPP side and a raw
//! client-server API client on the Matrix side.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use isthmus_core::address::Escaping;
use isthmus_tests::scenario::{SECRET, T};
use isthmus_tests::synapse::MatrixUser;
use isthmus_tests::{Isthmus, MatrixClient, Prosody, ProsodyOptions, Stanza, Synapse, SynapseOptions, XmppClient};
use serde_json::{Value, json};

const DOMAIN: &str = "matrix.localhost";

struct MatrixSetup {
    synapse: Synapse,
    prosody: Prosody,
    gateway: Isthmus,
    /// The Matrix account alice links through the gateway.
    alice_mx: MatrixUser,
    /// Bob, on Matrix only.
    bob: MatrixClient,
}

impl MatrixSetup {
    async fn start() -> Result<MatrixSetup> {
        let synapse = Synapse::start(SynapseOptions::default()).await?;
        let alice_mx = synapse.register("alice", "alice-mx-pass", false).await?;
        let bob_user = synapse.register("bob", "bob-mx-pass", false).await?;
        let bob = synapse.client(&bob_user)?;
        bob.set_display_name("Bob Matrix").await?;
        let users = ["alice", "carol"].iter().map(|u| (u.to_string(), format!("{u}pass"))).collect();
        let prosody = Prosody::start(ProsodyOptions {
            users,
            components: vec![(DOMAIN.into(), SECRET.into())],
            ..Default::default()
        })
        .await?;
        let config = format!(
            r#"xmpp:
  mode: component
  component:
    host: 127.0.0.1
    port: {component}
    secret: ${{ISTHMUS_COMPONENT_SECRET}}
store:
  url: sqlite://{{dir}}/isthmus.db
matrix:
  - domain: {DOMAIN}
    default_homeserver: {hs}
    data_dir: "{{dir}}/matrix"
"#,
            component = prosody.component_port(),
            hs = synapse.base_url(),
        );
        let gateway = Isthmus::start(&config, &[("ISTHMUS_COMPONENT_SECRET", SECRET)]).await?;
        gateway.wait_log("component link established", 1, T).await?;
        Ok(MatrixSetup { synapse, prosody, gateway, alice_mx, bob })
    }

    /// Alice on XMPP.
    async fn alice(&self, resource: &str) -> Result<XmppClient> {
        XmppClient::connect(&self.prosody, &format!("alice@localhost/{resource}"), "alicepass").await
    }
}

/// The JID of a Matrix id on the gateway.
fn jid(matrix_id: &str) -> Result<String> {
    Ok(format!("{}@{DOMAIN}", Escaping::CaseSensitive.to_localpart(matrix_id)?))
}

/// Escape text for an XML attribute or text node.
fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;").replace('\'', "&apos;")
}

/// Link alice's Matrix account with the two-step ad-hoc command; returns the final note.
async fn login_adhoc(xmpp: &mut XmppClient, user: &str, password: &str) -> Result<String> {
    xmpp.send_raw(&format!(
        "<iq type='set' to='{DOMAIN}' id='login1'><command xmlns='http://jabber.org/protocol/commands' node='login' action='execute'/></iq>"
    ))
    .await?;
    let form = xmpp.expect(T, |s| s.kind == "iq" && s.id == "login1").await?;
    if form.type_ != "result" || !form.xml.contains("var=\"password\"") || !form.xml.contains("type=\"text-private\"") {
        bail!("the login command did not answer with its form: {}", form.xml);
    }
    let session = form
        .xml
        .split("sessionid=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .context("no sessionid in the form")?
        .to_owned();
    xmpp.send_raw(&format!(
        "<iq type='set' to='{DOMAIN}' id='login2'><command xmlns='http://jabber.org/protocol/commands' node='login' sessionid='{session}'>\
         <x xmlns='jabber:x:data' type='submit'>\
         <field var='user'><value>{}</value></field>\
         <field var='password'><value>{}</value></field></x></command></iq>",
        xml_escape(user),
        xml_escape(password)
    ))
    .await?;
    let done = xmpp.expect(Duration::from_secs(30), |s| s.kind == "iq" && s.id == "login2").await?;
    Ok(done.xml)
}

fn is_groupchat_from(s: &Stanza, from_prefix: &str, body: &str) -> bool {
    s.kind == "message" && s.type_ == "groupchat" && s.from.starts_with(from_prefix) && s.body.as_deref() == Some(body)
}

async fn join_room(xmpp: &mut XmppClient, room_jid: &str, nick: &str) -> Result<Stanza> {
    xmpp.join(room_jid, nick).await?;
    xmpp.expect(Duration::from_secs(30), |s| {
        s.kind == "presence" && s.from == format!("{room_jid}/{nick}") && (s.has_status(110) || s.type_ == "error")
    })
    .await
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
