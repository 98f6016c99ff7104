//! The admins' commands (`access.admins`) end to end, on Prosody and on the
//! embedded server, with ngIRCd: an admin sees and runs `users`, `announce`,
//! `disconnect` and `link-status` on the IRC domain; another user sees none of
//! them and is refused (`forbidden`, with a text); the disconnected user's nick
//! quits on IRC (seen by a raw IRC client) and its device leaves the room; the
//! announcement reaches an occupant; the link status counts the outbox.

use std::time::Duration;

use anyhow::{Result, ensure};
use isthmus_tests::scenario::{IRC_DOMAIN, IrcSetup, T, room};
use isthmus_tests::{IrcClient, Stanza, XmppClient, XmppServerKind};

const NS_COMMANDS: &str = "http://jabber.org/protocol/commands";
const ADMIN_NODES: [&str; 4] = ["users", "disconnect", "link-status", "announce"];

/// The command list of the IRC domain as `c` sees it.
async fn command_list(c: &mut XmppClient, id: &str) -> Result<Stanza> {
    c.send_raw(&format!(
        "<iq type='get' id='{id}' to='{IRC_DOMAIN}'><query xmlns='http://jabber.org/protocol/disco#items' node='{NS_COMMANDS}'/></iq>"
    ))
    .await?;
    c.expect(T, |st| st.kind == "iq" && st.id == id).await
}

/// Run `node` on the IRC domain: the first step, or the submission of `fields` (var, value).
async fn command(
    c: &mut XmppClient,
    id: &str,
    node: &str,
    session: Option<&str>,
    fields: &[(&str, &str)],
) -> Result<Stanza> {
    let inner = match session {
        None => format!("<command xmlns='{NS_COMMANDS}' node='{node}' action='execute'/>"),
        Some(session) => {
            let fields: String = fields
                .iter()
                .map(|(var, value)| format!("<field var='{var}'><value>{value}</value></field>"))
                .collect();
            format!(
                "<command xmlns='{NS_COMMANDS}' node='{node}' sessionid='{session}'><x xmlns='jabber:x:data' type='submit'>{fields}</x></command>"
            )
        }
    };
    c.send_raw(&format!("<iq type='set' id='{id}' to='{IRC_DOMAIN}'>{inner}</iq>")).await?;
    c.expect(T, |st| st.kind == "iq" && st.id == id).await
}

/// Run a command that takes a form: ask for the form, then submit `fields`.
async fn submit(c: &mut XmppClient, id: &str, node: &str, fields: &[(&str, &str)]) -> Result<Stanza> {
    let form = command(c, &format!("{id}-form"), node, None, &[]).await?;
    ensure!(form.xml.contains("status=\"executing\""), "{node}: no form: {}", form.xml);
    let session =
        form.xml.split("sessionid=\"").nth(1).and_then(|t| t.split('"').next()).unwrap_or_default().to_owned();
    command(c, id, node, Some(&session), fields).await
}

/// The text of the note in a completed command's answer.
fn note(answer: &Stanza) -> String {
    let Some(start) = answer.xml.find("<note") else { return String::new() };
    let rest = &answer.xml[start..];
    let text = rest.find('>').map(|i| &rest[i + 1..]).unwrap_or_default();
    text.split("</note>").next().unwrap_or_default().replace("&apos;", "'")
}

async fn admin_commands(xmpp: XmppServerKind) -> Result<()> {
    let mut s = IrcSetup::start_with_admins(xmpp, &["Alice@localhost"]).await?;
    let mut watcher = IrcClient::connect(s.irc.port(), "watcher").await?;
    watcher.join("#ops").await?;
    let room = room("#ops");
    let mut alice = s.join("alice", "r", &room, "alice").await?;
    let mut bob = s.join("bob", "r", &room, "bob").await?;
    watcher.expect_line(T, |l| l.starts_with(":bob!") && l.contains(" JOIN ")).await?;

    // Only the admin sees the admin commands.
    let list = command_list(&mut alice, "l1").await?;
    for node in ADMIN_NODES.iter().chain(&["status"]) {
        ensure!(list.xml.contains(&format!("node=\"{node}\"")), "the admin sees {node}: {}", list.xml);
    }
    let list = command_list(&mut bob, "l2").await?;
    ensure!(list.xml.contains("node=\"status\""), "{}", list.xml);
    for node in ADMIN_NODES {
        ensure!(!list.xml.contains(&format!("node=\"{node}\"")), "bob must not see {node}: {}", list.xml);
    }
    // And only the admin may run them.
    for (i, node) in ADMIN_NODES.iter().enumerate() {
        let answer = command(&mut bob, &format!("b{i}"), node, None, &[]).await?;
        ensure!(answer.type_ == "error" && answer.xml.contains("<forbidden"), "{node} for bob: {}", answer.xml);
        ensure!(
            answer.xml.contains("for the gateway's admins") || answer.xml.contains("gateway&apos;s admins"),
            "{}",
            answer.xml
        );
    }

    // users: bob's IRC connection, nick and room.
    let users = command(&mut alice, "u1", "users", None, &[]).await?;
    ensure!(users.xml.contains("status=\"completed\""), "{}", users.xml);
    let text = note(&users);
    ensure!(text.contains("bob@localhost"), "{text}");
    ensure!(text.contains("IRC 127.0.0.1: connected as bob, in #ops"), "{text}");
    ensure!(text.contains(&format!("room {room} as bob, 1 device")), "{text}");
    ensure!(text.contains("alice@localhost"), "{text}");

    // announce: every occupant hears it, from the room.
    let done = submit(&mut alice, "a1", "announce", &[("text", "Maintenance at noon")]).await?;
    ensure!(note(&done).contains("Announced in 1 room (2 devices)"), "{}", done.xml);
    let heard = bob.expect(T, |st| st.body.as_deref() == Some("Maintenance at noon")).await?;
    ensure!(heard.from == room && heard.type_ == "groupchat", "{}", heard.xml);
    ensure!(
        watcher.expect_line(Duration::from_millis(300), |l| l.contains("Maintenance")).await.is_err(),
        "an announcement is not said on IRC"
    );

    // disconnect: bob's nick quits on IRC with the reason, bob's device leaves the room.
    let done =
        submit(&mut alice, "d1", "disconnect", &[("account", "bob@localhost"), ("reason", "server move")]).await?;
    let text = note(&done);
    ensure!(text.contains("127.0.0.1: quit as bob") && text.contains("removed it from 1 room"), "{text}");
    let quit = watcher.expect_line(T, |l| l.starts_with(":bob!") && l.contains(" QUIT ")).await?;
    ensure!(quit.contains("server move"), "{quit}");
    let gone = bob
        .expect(T, |st| st.kind == "presence" && st.from == format!("{room}/bob") && st.type_ == "unavailable")
        .await?;
    ensure!(gone.has_status(110) && gone.has_status(333) && gone.xml.contains("server move"), "{}", gone.xml);
    let users = command(&mut alice, "u2", "users", None, &[]).await?;
    ensure!(!note(&users).contains("bob@localhost"), "bob is gone: {}", note(&users));

    // link-status: the link is up, and messages waiting for the IRC server are counted.
    let status = command(&mut alice, "s1", "link-status", None, &[]).await?;
    let text = note(&status);
    let link = if xmpp == XmppServerKind::Embedded { "in process (embedded server), up" } else { "component link up" };
    ensure!(text.contains(link), "{text}");
    ensure!(text.contains("127.0.0.1: 1 connection, 1 online"), "{text}");
    ensure!(text.contains(&format!("{IRC_DOMAIN}: 0 waiting")), "{text}");
    s.irc.stop().await;
    alice.expect(T, |st| st.body.as_deref().is_some_and(|b| b.starts_with("Lost the connection"))).await?;
    for i in 0..3 {
        alice.send_groupchat(&room, &format!("queued {i}")).await?;
    }
    let deadline = tokio::time::Instant::now() + T;
    let mut i = 0;
    loop {
        i += 1;
        let status = command(&mut alice, &format!("s2-{i}"), "link-status", None, &[]).await?;
        let text = note(&status);
        if text.contains(&format!("{IRC_DOMAIN}: 3 waiting, the oldest for")) {
            ensure!(text.contains("reconnecting"), "{text}");
            println!("link status with the IRC server away:\n{text}");
            break;
        }
        ensure!(tokio::time::Instant::now() < deadline, "the outbox depth never showed 3 waiting:\n{text}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

#[tokio::test]
async fn admin_commands_on_prosody() -> Result<()> {
    admin_commands(XmppServerKind::Prosody).await
}

#[tokio::test]
async fn admin_commands_on_the_embedded_server() -> Result<()> {
    admin_commands(XmppServerKind::Embedded).await
}
