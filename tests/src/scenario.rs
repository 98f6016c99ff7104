//! Ready-made setups shared by the end-to-end tests.

use std::time::Duration;

use anyhow::Result;

use crate::relay::Relay;
use crate::{IrcServer, IrcServerKind, Isthmus, ProsodyOptions, XmppClient, XmppServer, XmppServerKind};

/// The component secret used by the test setups.
pub const SECRET: &str = "test-component-secret";
/// The IRC component domain of the test setups.
pub const IRC_DOMAIN: &str = "irc.localhost";
/// A generous timeout for one expected stanza or line.
pub const T: Duration = Duration::from_secs(15);

/// Prosody (users alice, bob, carol; component irc.localhost) + an IRC server + Isthmus.
pub struct IrcSetup {
    /// The XMPP server (Prosody unless a test asks for ejabberd).
    pub prosody: XmppServer,
    pub irc: IrcServer,
    pub gateway: Isthmus,
}

/// YAML added to the gateway's configuration: to the IRC network entry, and to the
/// settings of the server `127.0.0.1`.
#[derive(Clone, Copy)]
struct Extra<'a> {
    irc: &'a str,
    server: &'a str,
    /// Added to the settings of the server `localhost` (the TLS port).
    tls_server: &'a str,
    /// Added to the `access` section (indented 2), e.g. `admins: [alice@localhost]`.
    access: &'a str,
}

/// The room JID of `channel` on the test ngIRCd.
pub fn room(channel: &str) -> String {
    format!("{channel}%127.0.0.1@{IRC_DOMAIN}")
}

/// The XEP-0425 moderation request to `room` for the message with stanza-id `target`.
pub fn moderate_iq(room: &str, id: &str, target: &str, reason: &str) -> String {
    format!(
        "<iq type='set' to='{room}' id='{id}'><moderate xmlns='urn:xmpp:message-moderate:1' id='{target}'>\
         <retract xmlns='urn:xmpp:message-retract:1'/><reason>{reason}</reason></moderate></iq>"
    )
}

impl IrcSetup {
    /// Start everything on ngIRCd; `irc_extra` is YAML appended to the IRC network entry (indented 4).
    pub async fn start(irc_extra: &str) -> Result<IrcSetup> {
        Self::start_on(IrcServerKind::Ngircd, irc_extra).await
    }

    /// Start everything on the given IRC server.
    pub async fn start_on(kind: IrcServerKind, irc_extra: &str) -> Result<IrcSetup> {
        Self::start_with(XmppServerKind::Prosody, kind, irc_extra).await
    }

    /// Start everything on the given XMPP server (and ngIRCd).
    pub async fn start_xmpp(xmpp: XmppServerKind, irc_extra: &str) -> Result<IrcSetup> {
        Self::start_with(xmpp, IrcServerKind::Ngircd, irc_extra).await
    }

    /// Start everything on the given XMPP and IRC servers.
    pub async fn start_with(xmpp: XmppServerKind, kind: IrcServerKind, irc_extra: &str) -> Result<IrcSetup> {
        Self::start_with_store(xmpp, kind, irc_extra, "sqlite://{dir}/isthmus.db").await
    }

    /// Start everything with the gateway's store at `store_url` (`{dir}` is the gateway's directory).
    pub async fn start_with_store(
        xmpp: XmppServerKind,
        kind: IrcServerKind,
        irc_extra: &str,
        store_url: &str,
    ) -> Result<IrcSetup> {
        Self::start_full(
            xmpp,
            IrcServer::start_kind(kind).await?,
            Extra { irc: irc_extra, server: "", tls_server: "", access: "" },
            store_url,
        )
        .await
    }

    /// Start everything on the given IRC server; `server_extra` is YAML appended to
    /// the settings of the server `127.0.0.1` (indented 8), `irc_extra` to the network entry.
    pub async fn start_on_server(kind: IrcServerKind, server_extra: &str, irc_extra: &str) -> Result<IrcSetup> {
        Self::start_on_running(IrcServer::start_kind(kind).await?, server_extra, irc_extra).await
    }

    /// Like [`IrcSetup::start_on_server`] on an IRC server already started (e.g. with services).
    pub async fn start_on_running(irc: IrcServer, server_extra: &str, irc_extra: &str) -> Result<IrcSetup> {
        let extra = Extra { irc: irc_extra, server: server_extra, tls_server: "", access: "" };
        Self::start_full(XmppServerKind::Prosody, irc, extra, "sqlite://{dir}/isthmus.db").await
    }

    /// Like [`IrcSetup::start_on_running`], with `tls_server_extra` appended to the
    /// settings of the server `localhost` (the IRC server's TLS port, verified), indented 8.
    pub async fn start_on_running_tls(irc: IrcServer, tls_server_extra: &str) -> Result<IrcSetup> {
        let extra = Extra { irc: "", server: "", tls_server: tls_server_extra, access: "" };
        Self::start_full(XmppServerKind::Prosody, irc, extra, "sqlite://{dir}/isthmus.db").await
    }

    async fn start_full(xmpp: XmppServerKind, irc: IrcServer, extra: Extra<'_>, store_url: &str) -> Result<IrcSetup> {
        if xmpp == XmppServerKind::Embedded {
            return Self::start_embedded(irc, extra, store_url).await;
        }
        Ok(Self::start_attached(xmpp, irc, extra, store_url, false).await?.0)
    }

    /// Start everything on the given XMPP server and ngIRCd, with `admins` in `access.admins`.
    pub async fn start_with_admins(xmpp: XmppServerKind, admins: &[&str]) -> Result<IrcSetup> {
        let access = format!("  admins: [{}]\n", admins.join(", "));
        let extra = Extra { irc: "", server: "", tls_server: "", access: &access };
        Self::start_full(xmpp, IrcServer::start_kind(IrcServerKind::Ngircd).await?, extra, "sqlite://{dir}/isthmus.db")
            .await
    }

    /// Start everything on Prosody and ngIRCd with the gateway's component link
    /// going through a [`Relay`] the test can cut.
    pub async fn start_behind_relay(irc_extra: &str) -> Result<(IrcSetup, Relay)> {
        let irc = IrcServer::start_kind(IrcServerKind::Ngircd).await?;
        let extra = Extra { irc: irc_extra, server: "", tls_server: "", access: "" };
        let (setup, relay) =
            Self::start_attached(XmppServerKind::Prosody, irc, extra, "sqlite://{dir}/isthmus.db", true).await?;
        Ok((setup, relay.ok_or_else(|| anyhow::anyhow!("no relay started"))?))
    }

    async fn start_attached(
        xmpp: XmppServerKind,
        irc: IrcServer,
        extra: Extra<'_>,
        store_url: &str,
        relayed: bool,
    ) -> Result<(IrcSetup, Option<Relay>)> {
        let users = ["alice", "bob", "carol"].iter().map(|u| (u.to_string(), format!("{u}pass"))).collect();
        let prosody = XmppServer::start(
            xmpp,
            ProsodyOptions { users, components: vec![(IRC_DOMAIN.into(), SECRET.into())], ..Default::default() },
        )
        .await?;
        let relay = if relayed { Some(Relay::start(prosody.component_port()).await?) } else { None };
        let xmpp_yaml = format!(
            r#"xmpp:
  mode: component
  component:
    host: 127.0.0.1
    port: {component}
    secret: ${{ISTHMUS_COMPONENT_SECRET}}
    reconnect_initial_ms: 200
    reconnect_max_ms: 2000
access:
  allow: [localhost]
{access}"#,
            component = relay.as_ref().map_or(prosody.component_port(), Relay::port),
            access = extra.access
        );
        let gateway =
            Isthmus::start(&Self::config(&xmpp_yaml, &irc, extra, store_url), &[("ISTHMUS_COMPONENT_SECRET", SECRET)])
                .await?;
        gateway.wait_log("component link established", 1, T).await?;
        Ok((IrcSetup { prosody, irc, gateway }, relay))
    }

    /// Isthmus as the XMPP server itself (embedded mode, STARTTLS, SCRAM), users
    /// alice, bob and carol listed in the configuration.
    async fn start_embedded(irc: IrcServer, extra: Extra<'_>, store_url: &str) -> Result<IrcSetup> {
        let port = crate::process::free_port();
        let mut xmpp_yaml = format!(
            "xmpp:\n  mode: embedded\n  embedded:\n    domain: localhost\n    listen: 127.0.0.1:{port}\n    users:\n"
        );
        for (user, hash) in embedded_password_hashes()? {
            xmpp_yaml += &format!("      - {{ jid: {user}@localhost, password_hash: \"{hash}\" }}\n");
        }
        if !extra.access.is_empty() {
            xmpp_yaml += &format!("access:\n{}", extra.access);
        }
        let gateway = Isthmus::start(&Self::config(&xmpp_yaml, &irc, extra, store_url), &[]).await?;
        gateway.wait_log("accepting XMPP clients", 1, T).await?;
        let ca_file = gateway.dir().join("tls/localhost.crt");
        Ok(IrcSetup { prosody: XmppServer::Embedded(crate::peers::EmbeddedC2s { port, ca_file }), irc, gateway })
    }

    fn config(xmpp_yaml: &str, irc: &IrcServer, extra: Extra<'_>, store_url: &str) -> String {
        format!(
            r#"{xmpp_yaml}
store:
  url: {store_url}
irc:
  - domain: {IRC_DOMAIN}
    flood: {{ enabled: false }}
    servers:
      "127.0.0.1":
        port: {irc_port}
        tls: false
{server_extra}
      localhost:
        port: {tls_port}
        tls: true
        tls_ca_file: {ca}
{tls_server_extra}
      unverified.localhost:
        host: localhost
        port: {tls_port}
        tls: true
{irc_extra}
"#,
            irc_port = irc.port(),
            irc_extra = extra.irc,
            server_extra = extra.server,
            tls_server_extra = extra.tls_server,
            tls_port = irc.tls_port(),
            ca = irc.ca_file().display()
        )
    }

    /// Log `user` in (resource `res`) and join `room` as `nick`; returns once the self-presence (110) arrived.
    pub async fn join(&self, user: &str, res: &str, room: &str, nick: &str) -> Result<XmppClient> {
        let mut c =
            XmppClient::connect(&self.prosody, &format!("{user}@localhost/{res}"), &format!("{user}pass")).await?;
        c.join(room, nick).await?;
        c.expect(T, |s| s.kind == "presence" && s.from.starts_with(&format!("{room}/")) && s.has_status(110)).await?;
        Ok(c)
    }
}

/// `isthmus user hash` of the test users' passwords (`NAMEpass`), computed once per test binary.
pub fn embedded_password_hashes() -> Result<Vec<(String, String)>> {
    static HASHES: std::sync::OnceLock<Vec<(String, String)>> = std::sync::OnceLock::new();
    if let Some(h) = HASHES.get() {
        return Ok(h.clone());
    }
    let mut out = Vec::new();
    for user in ["alice", "bob", "carol"] {
        use std::io::Write;
        let mut child = std::process::Command::new(crate::gateway::binary())
            .args(["user", "hash"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        child.stdin.take().map(|mut i| writeln!(i, "{user}pass")).transpose()?;
        let output = child.wait_with_output()?;
        anyhow::ensure!(output.status.success(), "isthmus user hash failed");
        out.push((user.to_owned(), String::from_utf8(output.stdout)?.trim().to_owned()));
    }
    Ok(HASHES.get_or_init(|| out).clone())
}
