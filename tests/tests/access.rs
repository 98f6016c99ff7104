//! Who may use the gateway: closed unless the configuration says.
//!
//! Prosody serves two hosts, `localhost` and `elsewhere.localhost`; the gateway
//! (IRC on ngIRCd, and a Matrix network with a portal room) allows
//! `localhost` and one account of the other host. mallory, on
//! `elsewhere.localhost` but not listed, gets a clear XMPP error for everything
//! (joining an IRC channel, writing to an IRC user, a command, joining the
//! portal room, reading an archive), and the IRC server never sees a connection
//! for her; alice and the one listed account are served. A Matrix login to a
//! homeserver on loopback that `allowed_homeservers` does not list is refused
//! without a connection. A configuration that allows nobody does not start.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use isthmus_tests::matrix_scenario::login_adhoc;
use isthmus_tests::scenario::{IRC_DOMAIN, SECRET, T, room};
use isthmus_tests::{IrcClient, IrcServer, Isthmus, Prosody, ProsodyOptions, Stanza, XmppClient};

const MATRIX_DOMAIN: &str = "matrix.localhost";
const OTHER_HOST: &str = "elsewhere.localhost";
const NOT_ALLOWED: &str = "you are not allowed to use this gateway";

fn forbidden(st: &Stanza, what: &str) {
    assert_eq!(st.type_, "error", "{what}: {}", st.xml);
    assert!(st.xml.contains("<forbidden"), "{what} is forbidden: {}", st.xml);
    assert!(st.xml.contains(NOT_ALLOWED), "{what}, with a text saying why: {}", st.xml);
}

/// How many users the IRC server counts (LUSERS, 251), as `observer` asks it.
async fn irc_users(observer: &mut IrcClient) -> Result<u32> {
    // Registration sent a 251 too, and earlier answers may wait unread: only this answer counts.
    observer.clear_buffer();
    observer.send_line("LUSERS").await?;
    let line = observer.expect_line(T, |l| l.split(' ').nth(1) == Some("251")).await?;
    let count = line.split("There are ").nth(1).and_then(|rest| rest.split(' ').next());
    count.and_then(|n| n.parse().ok()).with_context(|| format!("no user count in `{line}`"))
}

/// Whether `nick` is on the IRC server (WHOIS: 311, or 401 no such nick).
async fn irc_has_nick(observer: &mut IrcClient, nick: &str) -> Result<bool> {
    observer.send_line(&format!("WHOIS {nick}")).await?;
    let line = observer
        .expect_line(T, |l| matches!(l.split(' ').nth(1), Some("311" | "401")) && l.contains(&format!(" {nick} ")))
        .await?;
    Ok(line.split(' ').nth(1) == Some("311"))
}

async fn mam(client: &mut XmppClient, to: &str, id: &str) -> Result<Stanza> {
    client
        .send_raw(&format!("<iq type='set' to='{to}' id='{id}'><query xmlns='urn:xmpp:mam:2' queryid='{id}'/></iq>"))
        .await?;
    client.expect(T, |st| st.kind == "iq" && st.id == id).await
}

#[tokio::test]
async fn only_listed_accounts_and_domains_are_served() -> Result<()> {
    let password = |u: &str| (u.to_string(), format!("{u}pass"));
    let prosody = Prosody::start(ProsodyOptions {
        users: vec![password("alice")],
        components: vec![(IRC_DOMAIN.into(), SECRET.into()), (MATRIX_DOMAIN.into(), SECRET.into())],
        extra_hosts: vec![(OTHER_HOST.into(), vec![password("mallory"), password("trusted")])],
        ..Default::default()
    })
    .await?;
    let irc = IrcServer::start().await?;
    // The portal's bot points at a port nobody listens on: joins are refused before any Matrix traffic.
    let dead_port = isthmus_tests::process::free_port();
    // The homeserver offered at login: on loopback and not listed in `allowed_homeservers`, so
    // the gateway must not even connect to it (this listener would see it).
    let homeserver = std::net::TcpListener::bind("127.0.0.1:0")?;
    homeserver.set_nonblocking(true)?;
    let homeserver_url = format!("http://127.0.0.1:{}", homeserver.local_addr()?.port());
    let config = format!(
        r##"xmpp:
  component:
    port: {component}
    secret: {SECRET}
access:
  allow: [localhost, trusted@{OTHER_HOST}]
store:
  url: sqlite://{{dir}}/isthmus.db
irc:
  - domain: {IRC_DOMAIN}
    flood: {{ enabled: false }}
    servers:
      "127.0.0.1": {{ port: {irc_port}, tls: false }}
matrix:
  - domain: {MATRIX_DOMAIN}
    data_dir: "{{dir}}/matrix"
    default_homeserver: "{homeserver_url}"
    bot:
      homeserver: "http://127.0.0.1:{dead_port}"
      user_id: "@isthmus:localhost"
      password: unused
    portals:
      - {{ name: lobby, room: "#lobby:localhost" }}
"##,
        component = prosody.component_port(),
        irc_port = irc.port(),
    );
    let gateway = Isthmus::start(&config, &[]).await?;
    gateway.wait_log("component link established", 2, T).await?;

    let mut observer = IrcClient::connect(irc.port(), "observer").await?;
    observer.join("#test").await?;
    assert_eq!(irc_users(&mut observer).await?, 1, "only the observer is on IRC");

    let room = room("#test");
    let lobby = format!("lobby@{MATRIX_DOMAIN}");
    let mut mallory = XmppClient::connect(&prosody, &format!("mallory@{OTHER_HOST}/r"), "mallorypass").await?;
    // An IRC channel.
    mallory.join(&room, "mallory").await?;
    let err = mallory.expect(T, |st| st.kind == "presence" && st.from.starts_with(&room)).await?;
    forbidden(&err, "joining an IRC channel");
    // An IRC user, and the gateway's commands.
    let bob = format!("observer%127.0.0.1@{IRC_DOMAIN}");
    mallory.send_raw(&format!("<message to='{bob}' type='chat' id='pm1'><body>hello</body></message>")).await?;
    forbidden(&mallory.expect(T, |st| st.kind == "message" && st.id == "pm1").await?, "a private message");
    mallory.send_raw(&format!("<message to='{IRC_DOMAIN}' type='chat' id='cmd1'><body>help</body></message>")).await?;
    forbidden(&mallory.expect(T, |st| st.kind == "message" && st.id == "cmd1").await?, "a command");
    // The portal room, open to everyone allowed on the Matrix domain.
    mallory.join(&lobby, "mallory").await?;
    let err = mallory.expect(T, |st| st.kind == "presence" && st.from.starts_with(&lobby)).await?;
    forbidden(&err, "joining the portal room");
    // The archives.
    forbidden(&mam(&mut mallory, &room, "mam1").await?, "the IRC channel's archive");
    forbidden(&mam(&mut mallory, &lobby, "mam2").await?, "the portal room's archive");
    // A group message to the channel she is not in.
    mallory.send_raw(&format!("<message to='{room}' type='groupchat' id='gc1'><body>sneak</body></message>")).await?;
    forbidden(&mallory.expect(T, |st| st.kind == "message" && st.id == "gc1").await?, "a group message");

    // Nothing reached IRC for her: no connection, no nick, nothing in the channel.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(irc_users(&mut observer).await?, 1, "the gateway opened no IRC connection for mallory");
    assert!(!irc_has_nick(&mut observer, "mallory").await?, "mallory has no nick on IRC");
    if let Some(line) = observer.seen().iter().find(|l| l.contains("sneak") || l.contains("hello")) {
        bail!("a refused message reached IRC: {line}");
    }

    // alice (a listed domain) and trusted (a listed account of the other host) are served.
    let mut alice = XmppClient::connect(&prosody, "alice@localhost/r", "alicepass").await?;
    alice.join(&room, "alice").await?;
    let me = alice.expect(T, |st| st.kind == "presence" && st.from == format!("{room}/alice")).await?;
    assert!(me.has_status(110) && me.type_ != "error", "alice joined: {}", me.xml);
    observer.expect_line(T, |l| l.starts_with(":alice!") && l.contains("JOIN")).await?;
    let archive = mam(&mut alice, &room, "mam3").await?;
    assert_eq!(archive.type_, "result", "alice reads her archive: {}", archive.xml);

    let mut trusted = XmppClient::connect(&prosody, &format!("trusted@{OTHER_HOST}/r"), "trustedpass").await?;
    trusted.join(&room, "trusted").await?;
    let me = trusted.expect(T, |st| st.kind == "presence" && st.from == format!("{room}/trusted")).await?;
    assert!(me.has_status(110) && me.type_ != "error", "trusted joined: {}", me.xml);
    observer.expect_line(T, |l| l.starts_with(":trusted!") && l.contains("JOIN")).await?;
    // A Matrix login: refused for mallory as everything else, and for alice because the
    // homeserver is on loopback without being listed; the gateway never connected to it.
    mallory
        .send_raw(&format!(
            "<iq type='set' to='{MATRIX_DOMAIN}' id='login1'><command xmlns='http://jabber.org/protocol/commands' node='login' action='execute'/></iq>"
        ))
        .await?;
    forbidden(&mallory.expect(T, |st| st.kind == "iq" && st.id == "login1").await?, "the Matrix login command");
    let refused = login_adhoc(&mut alice, "alice", "pw").await?;
    assert!(
        refused.contains("127.0.0.1 is a loopback address (127.0.0.1)") && refused.contains("allowed_homeservers"),
        "a homeserver on loopback is refused unless listed: {refused}"
    );
    match homeserver.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => bail!("the gateway connected to the unlisted loopback homeserver: {other:?}"),
    }
    trusted.send_groupchat(&room, "served from the other host").await?;
    observer
        .expect_line(T, |l| l.starts_with(":trusted!") && l.ends_with("PRIVMSG #test :served from the other host"))
        .await?;
    assert_eq!(irc_users(&mut observer).await?, 3, "the observer, alice and trusted");
    assert!(!irc_has_nick(&mut observer, "mallory").await?, "still no mallory on IRC");
    Ok(())
}

#[tokio::test]
async fn a_component_nobody_may_use_does_not_start() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("isthmus.yaml");
    std::fs::write(
        &file,
        format!(
            "xmpp:\n  component:\n    port: 1\n    secret: s\nstore:\n  url: sqlite://{}/isthmus.db\nirc:\n  - domain: {IRC_DOMAIN}\n",
            dir.path().display()
        ),
    )?;
    let run = tokio::process::Command::new(isthmus_tests::gateway::binary())
        .arg("run")
        .arg("-c")
        .arg(&file)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(30), run).await.context("isthmus run did not exit")??;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "isthmus run must fail: {stderr}");
    let expected = format!("{}:8:5: IRC network `{IRC_DOMAIN}`: nobody may use it", file.display());
    assert!(stderr.contains(&expected), "expected `{expected}` in: {stderr}");
    assert!(stderr.contains(r#"access: { allow: ["*"] }"#), "says how to open it: {stderr}");
    assert!(!dir.path().join("isthmus.db").exists(), "refused before the store was opened");
    Ok(())
}
