//! The first end-to-end path: a slixmpp client in an IRC channel through Isthmus
//! attached to Prosody as component `irc.localhost`, with a raw IRC client in the
//! channel on ngIRCd; and the same path again after Prosody restarts.

use std::time::Duration;

use anyhow::Result;
use isthmus_tests::{IrcClient, Isthmus, Ngircd, Prosody, ProsodyOptions, XmppClient};

const SECRET: &str = "test-component-secret";
const ROOM: &str = "#test%127.0.0.1@irc.localhost";
const T: Duration = Duration::from_secs(15);

struct Setup {
    prosody: Prosody,
    ngircd: Ngircd,
    gateway: Isthmus,
}

async fn setup() -> Result<Setup> {
    let prosody = Prosody::start(ProsodyOptions {
        users: vec![("alice".into(), "alicepass".into())],
        components: vec![("irc.localhost".into(), SECRET.into())],
    })
    .await?;
    let ngircd = Ngircd::start().await?;
    let config = format!(
        r#"xmpp:
  mode: component
  component:
    host: 127.0.0.1
    port: {component}
    secret: ${{ISTHMUS_COMPONENT_SECRET}}
    reconnect_initial_ms: 200
    reconnect_max_ms: 2000
store:
  url: sqlite://{{dir}}/isthmus.db
irc:
  - domain: irc.localhost
    flood: {{ enabled: false }}
    servers:
      "127.0.0.1":
        port: {irc}
        tls: false
"#,
        component = prosody.component_port(),
        irc = ngircd.port()
    );
    let gateway = Isthmus::start(&config, &[("ISTHMUS_COMPONENT_SECRET", SECRET)]).await?;
    gateway.wait_log("component link established", 1, T).await?;
    Ok(Setup { prosody, ngircd, gateway })
}

/// alice joins through the gateway; bob (raw IRC) is in the channel; both directions asserted.
async fn both_ways(s: &Setup, bob: &mut IrcClient, tag: &str) -> Result<XmppClient> {
    let mut alice = XmppClient::connect(&s.prosody, "alice@localhost/e2e", "alicepass").await?;
    alice.join(ROOM, "alice").await?;
    let own = format!("{ROOM}/alice");
    let me = alice.expect(T, |st| st.kind == "presence" && st.from == own && st.has_status(110)).await?;
    assert!(me.type_.is_empty() || me.type_ == "available", "self-presence is available: {}", me.xml);
    // bob is listed as an occupant
    alice.expect(T, |st| st.kind == "presence" && st.from == format!("{ROOM}/{}", bob.nick)).await?;

    let text = format!("hello from xmpp {tag}");
    alice.send_groupchat(ROOM, &text).await?;
    let line = bob.expect_line(T, |l| l.contains("PRIVMSG #test :") && l.contains(&text)).await?;
    assert!(line.starts_with(":alice!"), "sent by alice on IRC: {line}");
    assert!(line.ends_with(&format!("PRIVMSG #test :{text}")), "exact text: {line}");

    let reply = format!("reply from irc {tag}");
    bob.privmsg("#test", &reply).await?;
    let from = format!("{ROOM}/{}", bob.nick);
    let m = alice.expect(T, |st| st.kind == "message" && st.body.as_deref() == Some(reply.as_str())).await?;
    assert_eq!(m.from, from, "sender is bob's occupant JID");
    assert_eq!(m.type_, "groupchat");
    Ok(alice)
}

#[tokio::test]
async fn xmpp_and_irc_talk_through_the_gateway() -> Result<()> {
    let s = setup().await?;
    let mut bob = IrcClient::connect(s.ngircd.port(), "bob").await?;
    bob.join("#test").await?;
    let alice = both_ways(&s, &mut bob, "first").await?;
    alice.disconnect().await;
    Ok(())
}

#[tokio::test]
async fn gateway_reconnects_after_prosody_restart() -> Result<()> {
    let mut s = setup().await?;
    let mut bob = IrcClient::connect(s.ngircd.port(), "bob").await?;
    bob.join("#test").await?;
    let alice = both_ways(&s, &mut bob, "before").await?;
    drop(alice);

    s.prosody.restart().await?;
    s.gateway.wait_log("component link established", 2, Duration::from_secs(30)).await?;
    let alice = both_ways(&s, &mut bob, "after").await?;
    alice.disconnect().await;
    Ok(())
}
