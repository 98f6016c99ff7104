//! The ready-made Matrix setup shared by the Matrix end-to-end tests: a real
//! Synapse (users alice and bob, bob's display name "Bob Matrix"), Prosody
//! (XMPP users alice and carol) with Isthmus attached as the `matrix.localhost`
//! component, the media proxy on a free port; and the XMPP steps every test
//! repeats (linking the account, joining a room).

use std::time::Duration;

use anyhow::{Context, Result, bail};
use isthmus_core::address::Escaping;

use crate::scenario::{SECRET, T};
use crate::synapse::MatrixUser;
use crate::{Isthmus, MatrixClient, Prosody, ProsodyOptions, Stanza, Synapse, SynapseOptions, XmppClient};

/// The Matrix component domain of the test setups.
pub const MATRIX_DOMAIN: &str = "matrix.localhost";

pub struct MatrixSetup {
    pub synapse: Synapse,
    pub prosody: Prosody,
    pub gateway: Isthmus,
    /// The Matrix account alice links through the gateway.
    pub alice_mx: MatrixUser,
    /// Bob, on Matrix only, through the raw client-server API.
    pub bob: MatrixClient,
    pub bob_user: MatrixUser,
    /// The media proxy's public URL (it listens on 127.0.0.1).
    pub media_url: String,
}

impl MatrixSetup {
    pub async fn start() -> Result<MatrixSetup> {
        Self::start_with(SynapseOptions::default(), "").await
    }

    /// Start with Synapse options and YAML appended to the Matrix network entry (indented 4).
    /// Files may be fetched from loopback addresses (everything runs there).
    pub async fn start_with(options: SynapseOptions, extra_yaml: &str) -> Result<MatrixSetup> {
        Self::start_with_fetch_policy(options, extra_yaml, true).await
    }

    /// [`MatrixSetup::start_with`], with `fetch_private_addresses` as given.
    pub async fn start_with_fetch_policy(
        options: SynapseOptions,
        extra_yaml: &str,
        fetch_private_addresses: bool,
    ) -> Result<MatrixSetup> {
        Self::start_full(options, extra_yaml, fetch_private_addresses, &[]).await
    }

    /// [`MatrixSetup::start`], with more environment for the gateway.
    pub async fn start_with_env(env: &[(&str, &str)]) -> Result<MatrixSetup> {
        Self::start_full(SynapseOptions::default(), "", true, env).await
    }

    /// [`MatrixSetup::start`], with more homeservers users may log in to (listed
    /// in `allowed_homeservers` beside Synapse).
    pub async fn start_with_homeservers(homeservers: &[&str]) -> Result<MatrixSetup> {
        Self::start_configured(SynapseOptions::default(), "", true, &[], homeservers).await
    }

    async fn start_full(
        options: SynapseOptions,
        extra_yaml: &str,
        fetch_private_addresses: bool,
        env: &[(&str, &str)],
    ) -> Result<MatrixSetup> {
        Self::start_configured(options, extra_yaml, fetch_private_addresses, env, &[]).await
    }

    async fn start_configured(
        options: SynapseOptions,
        extra_yaml: &str,
        fetch_private_addresses: bool,
        env: &[(&str, &str)],
        more_homeservers: &[&str],
    ) -> Result<MatrixSetup> {
        let synapse = Synapse::start(options).await?;
        let alice_mx = synapse.register("alice", "alice-mx-pass", false).await?;
        let bob_user = synapse.register("bob", "bob-mx-pass", false).await?;
        let bob = synapse.client(&bob_user)?;
        bob.set_display_name("Bob Matrix").await?;
        let users = ["alice", "carol"].iter().map(|u| (u.to_string(), format!("{u}pass"))).collect();
        let prosody = Prosody::start(ProsodyOptions {
            users,
            components: vec![(MATRIX_DOMAIN.into(), SECRET.into())],
            ..Default::default()
        })
        .await?;
        let media_port = crate::process::free_port();
        let media_url = format!("http://127.0.0.1:{media_port}/media");
        let config = format!(
            r#"xmpp:
  mode: component
  component:
    host: 127.0.0.1
    port: {component}
    secret: ${{ISTHMUS_COMPONENT_SECRET}}
access:
  allow: [localhost]
store:
  url: sqlite://{{dir}}/isthmus.db
matrix:
  - domain: {MATRIX_DOMAIN}
    default_homeserver: {hs}
    # Synapse runs on 127.0.0.1: a loopback homeserver must be listed.
    allowed_homeservers: [{hs}{more}]
    data_dir: "{{dir}}/matrix"
    fetch_private_addresses: {fetch_private_addresses}
    media:
      listen: "127.0.0.1:{media_port}"
      public_url: "{media_url}"
{extra_yaml}
"#,
            component = prosody.component_port(),
            hs = synapse.base_url(),
            more = more_homeservers.iter().map(|h| format!(", \"{h}\"")).collect::<String>(),
        );
        let mut gateway_env = vec![("ISTHMUS_COMPONENT_SECRET", SECRET)];
        gateway_env.extend_from_slice(env);
        let gateway = Isthmus::start(&config, &gateway_env).await?;
        gateway.wait_log("component link established", 1, T).await?;
        Ok(MatrixSetup { synapse, prosody, gateway, alice_mx, bob, bob_user, media_url })
    }

    /// `user` (alice or carol) on XMPP.
    pub async fn xmpp(&self, user: &str, resource: &str) -> Result<XmppClient> {
        XmppClient::connect(&self.prosody, &format!("{user}@localhost/{resource}"), &format!("{user}pass")).await
    }

    /// Alice on XMPP.
    pub async fn alice(&self, resource: &str) -> Result<XmppClient> {
        self.xmpp("alice", resource).await
    }

    /// Alice on XMPP with her Matrix account linked (by the ad-hoc command: a
    /// password is not taken in a chat message).
    pub async fn alice_linked(&self, resource: &str) -> Result<XmppClient> {
        let mut alice = self.alice(resource).await?;
        let done = login_adhoc(&mut alice, "alice", &self.alice_mx.password).await?;
        if !(done.contains("status=\"completed\"")
            && done.contains("Logged in")
            && done.contains(&self.alice_mx.user_id))
        {
            bail!("login by the ad-hoc command failed: {done}");
        }
        Ok(alice)
    }

    /// The gateway's log lines about warnings, routing and delivery, for failure messages.
    pub fn log_tail(&self) -> String {
        let log = self.gateway.log();
        let lines: Vec<&str> =
            log.lines().filter(|l| l.contains("WARN") || l.contains("route") || l.contains("delivery")).collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

/// The JID of a Matrix id on the gateway.
pub fn matrix_jid(matrix_id: &str) -> Result<String> {
    Ok(format!("{}@{MATRIX_DOMAIN}", Escaping::CaseSensitive.to_localpart(matrix_id)?))
}

/// Escape text for an XML attribute or text node.
pub fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;").replace('\'', "&apos;")
}

/// Link a Matrix account with the two-step ad-hoc command; returns the final answer's XML.
pub async fn login_adhoc(xmpp: &mut XmppClient, user: &str, password: &str) -> Result<String> {
    xmpp.send_raw(&format!(
        "<iq type='set' to='{MATRIX_DOMAIN}' id='login1'><command xmlns='http://jabber.org/protocol/commands' node='login' action='execute'/></iq>"
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
        "<iq type='set' to='{MATRIX_DOMAIN}' id='login2'><command xmlns='http://jabber.org/protocol/commands' node='login' sessionid='{session}'>\
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

/// Whether `s` is a groupchat message from an occupant JID starting with `from_prefix` with `body`.
pub fn is_groupchat_from(s: &Stanza, from_prefix: &str, body: &str) -> bool {
    s.kind == "message" && s.type_ == "groupchat" && s.from.starts_with(from_prefix) && s.body.as_deref() == Some(body)
}

/// Send a MUC join and return the answer: the self-presence (110) or an error presence.
pub async fn join_room(xmpp: &mut XmppClient, room_jid: &str, nick: &str) -> Result<Stanza> {
    xmpp.join(room_jid, nick).await?;
    xmpp.expect(Duration::from_secs(30), |s| {
        s.kind == "presence" && s.from == format!("{room_jid}/{nick}") && (s.has_status(110) || s.type_ == "error")
    })
    .await
}

/// Serve `body` as `content_type` on 127.0.0.1 to at most `requests` GETs, whatever the
/// path; returns the port and the request lines received.
pub async fn serve_file(
    body: Vec<u8>,
    content_type: &'static str,
    requests: usize,
) -> Result<(u16, tokio::task::JoinHandle<Vec<String>>)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let task = tokio::spawn(async move {
        let mut seen = Vec::new();
        for _ in 0..requests {
            let Ok((mut stream, _)) = listener.accept().await else { break };
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16_384 {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            seen.push(String::from_utf8_lossy(&head).lines().next().unwrap_or_default().to_owned());
            let answer = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(answer.as_bytes()).await;
            let _ = stream.write_all(&body).await;
            let _ = stream.shutdown().await;
        }
        seen
    });
    Ok((port, task))
}

/// The text of the first `<url>` of an XEP-0066 payload in `xml`.
pub fn oob_url(xml: &str) -> Option<String> {
    let start = xml.find("jabber:x:oob")?;
    let rest = &xml[start..];
    let url = rest.split("<url>").nth(1)?.split("</url>").next()?;
    Some(url.replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">"))
}
