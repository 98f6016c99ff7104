//! Real servers started on loopback for one test: Prosody, ngIRCd, PostgreSQL.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tempfile::TempDir;
use tokio::process::Child;

use crate::process::{command, find_program, free_port, tail, terminate, wait_port};

/// What a test's Prosody serves.
#[derive(Debug, Clone, Default)]
pub struct ProsodyOptions {
    /// Accounts on `localhost` (user, password).
    pub users: Vec<(String, String)>,
    /// External components (domain, secret).
    pub components: Vec<(String, String)>,
    /// Accounts written straight into Prosody's storage (fast, for benchmarks with
    /// many users); ejabberd ignores this.
    pub bulk_users: Vec<(String, String)>,
    /// More VirtualHosts besides `localhost`, each with its accounts (user,
    /// password); they reach the same components. ejabberd ignores this.
    pub extra_hosts: Vec<(String, Vec<(String, String)>)>,
}

/// A Prosody on its own ports; `localhost` is its host, `muc.localhost` its MUC.
pub struct Prosody {
    dir: TempDir,
    c2s: u16,
    component: u16,
    child: Option<Child>,
}

impl Prosody {
    pub async fn start(opts: ProsodyOptions) -> Result<Prosody> {
        let dir = tempfile::Builder::new().prefix("isthmus-prosody-").tempdir()?;
        let (c2s, component) = (free_port(), free_port());
        let d = dir.path();
        std::fs::create_dir_all(d.join("data"))?;
        std::fs::create_dir_all(d.join("certs"))?;
        let mut cfg = format!(
            r#"run_as_root = true
pidfile = "{d}/prosody.pid"
data_path = "{d}/data"
certificates = "{d}/certs"
network_settings = {{ nagle = false }}
log = {{ {{ levels = {{ min = "info" }}, to = "console" }} }}
interfaces = {{ "127.0.0.1" }}
c2s_ports = {{ {c2s} }}
component_interfaces = {{ "127.0.0.1" }}
component_ports = {{ {component} }}
modules_enabled = {{ "roster"; "saslauth"; "disco"; "ping"; "posix"; "carbons"; "version"; }}
modules_disabled = {{ "s2s"; "offline"; }}
c2s_require_encryption = false
allow_unencrypted_plain_auth = true
authentication = "internal_plain"
storage = "internal"
VirtualHost "localhost"
Component "muc.localhost" "muc"
  restrict_room_creation = false
  muc_room_locking = false
"#,
            d = d.display()
        );
        for (domain, secret) in &opts.components {
            cfg += &format!("Component \"{domain}\"\n  component_secret = \"{secret}\"\n");
        }
        for (host, _) in &opts.extra_hosts {
            cfg += &format!("VirtualHost \"{host}\"\n");
        }
        std::fs::write(d.join("prosody.cfg.lua"), cfg)?;
        if !opts.bulk_users.is_empty() {
            let accounts = d.join("data/localhost/accounts");
            std::fs::create_dir_all(&accounts)?;
            for (user, password) in &opts.bulk_users {
                std::fs::write(
                    accounts.join(format!("{user}.dat")),
                    format!("return {{\n\t[\"password\"] = \"{password}\";\n}};\n"),
                )?;
            }
        }
        let prosodyctl = find_program("prosodyctl", &[])?;
        let accounts = opts.users.iter().map(|(u, p)| (u, "localhost", p));
        let accounts = accounts.chain(
            opts.extra_hosts.iter().flat_map(|(host, users)| users.iter().map(move |(u, p)| (u, host.as_str(), p))),
        );
        for (user, host, password) in accounts {
            let out = std::process::Command::new(&prosodyctl)
                .arg("--config")
                .arg(d.join("prosody.cfg.lua"))
                .args(["register", user, host, password])
                .output()
                .context("run prosodyctl")?;
            if !out.status.success() {
                bail!("prosodyctl register {user} failed: {}", String::from_utf8_lossy(&out.stderr));
            }
        }
        let mut p = Prosody { dir, c2s, component, child: None };
        p.launch().await?;
        Ok(p)
    }

    async fn launch(&mut self) -> Result<()> {
        let log = self.log_path();
        let mut cmd = command(find_program("prosody", &[])?, &log)?;
        cmd.arg("--config").arg(self.dir.path().join("prosody.cfg.lua")).arg("-F");
        self.child = Some(cmd.spawn().context("start prosody")?);
        wait_port(self.component, Duration::from_secs(20), "Prosody", &log).await?;
        wait_port(self.c2s, Duration::from_secs(5), "Prosody c2s", &log).await
    }

    pub fn c2s_port(&self) -> u16 {
        self.c2s
    }
    pub fn component_port(&self) -> u16 {
        self.component
    }
    /// The running server's process id (for CPU and memory figures).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("prosody.log")
    }

    pub async fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            terminate(&mut c, Duration::from_secs(5)).await;
        }
    }

    /// Stop and start again on the same ports with the same data.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop().await;
        self.launch().await
    }

    /// `kill -9` and start again: no unavailable presences, no stream close; the
    /// component link and every client connection just drop.
    pub async fn crash_and_restart(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
        }
        self.launch().await
    }
}

/// An ejabberd on its own ports, with the same accounts and components as [`Prosody`].
pub struct Ejabberd {
    dir: TempDir,
    c2s: u16,
    component: u16,
    node: String,
    child: Option<Child>,
    uid: (u32, u32),
}

impl Ejabberd {
    pub async fn start(opts: ProsodyOptions) -> Result<Ejabberd> {
        let dir = tempfile::Builder::new().prefix("isthmus-ejabberd-").tempdir()?;
        let (c2s, component, dist) = (free_port(), free_port(), free_port());
        let d = dir.path();
        std::fs::create_dir_all(d.join("spool"))?;
        std::fs::create_dir_all(d.join("logs"))?;
        let mut services = String::new();
        for (domain, secret) in &opts.components {
            services += &format!("      {domain}:\n        password: \"{secret}\"\n");
        }
        let cfg = format!(
            r#"hosts:
  - localhost
loglevel: info
log_rotate_count: 0
certfiles: []
listen:
  - port: {c2s}
    ip: "127.0.0.1"
    module: ejabberd_c2s
    starttls: false
    shaper: none
    access: all
  - port: {component}
    ip: "127.0.0.1"
    module: ejabberd_service
    shaper: none
    hosts:
{services}
auth_method: internal
auth_password_format: plain
acl:
  local:
    user_regexp: ""
access_rules:
  local:
    allow: local
api_permissions:
  "console commands":
    from: [ejabberd_ctl]
    who: all
    what: "*"
modules:
  mod_disco: {{}}
  mod_ping: {{}}
  mod_roster: {{}}
  mod_version: {{}}
  mod_carboncopy: {{}}
"#
        );
        std::fs::write(d.join("ejabberd.yml"), cfg)?;
        let node = format!("isthmus{dist}@localhost");
        std::fs::write(
            d.join("ejabberdctl.cfg"),
            format!(
                "ERLANG_NODE={node}\nINET_DIST_INTERFACE=127.0.0.1\nERL_DIST_PORT={dist}\nERL_EPMD_ADDRESS=127.0.0.1\n"
            ),
        )?;
        std::fs::write(d.join("inetrc"), "")?;
        let uid = system_user("ejabberd").context("no `ejabberd` system user: run ./tests/install-deps.sh")?;
        for entry in walk(d)? {
            std::os::unix::fs::chown(&entry, Some(uid.0), Some(uid.1))?;
        }
        let mut e = Ejabberd { dir, c2s, component, node, child: None, uid };
        e.launch().await?;
        for (user, password) in &opts.users {
            let out = e.ctl(&["register", user, "localhost", password]).await?;
            if !out.status.success() {
                bail!("ejabberdctl register {user} failed: {}", String::from_utf8_lossy(&out.stdout));
            }
        }
        Ok(e)
    }

    fn ctl_command(&self, log: Option<&Path>) -> Result<tokio::process::Command> {
        let d = self.dir.path();
        let mut cmd = match log {
            Some(log) => command(find_program("ejabberdctl", &["/usr/sbin"])?, log)?,
            None => tokio::process::Command::new(find_program("ejabberdctl", &["/usr/sbin"])?),
        };
        cmd.arg("--config-dir").arg(d).arg("--config").arg(d.join("ejabberd.yml"));
        cmd.arg("--ctl-config").arg(d.join("ejabberdctl.cfg")).arg("--spool").arg(d.join("spool"));
        cmd.arg("--logs").arg(d.join("logs"));
        cmd.env("ERLANG_NODE", &self.node);
        let _ = self.uid;
        Ok(cmd)
    }

    async fn ctl(&self, args: &[&str]) -> Result<std::process::Output> {
        let mut cmd = self.ctl_command(None)?;
        cmd.args(args);
        Ok(tokio::time::timeout(Duration::from_secs(60), cmd.output()).await.context("ejabberdctl timed out")??)
    }

    async fn launch(&mut self) -> Result<()> {
        let log = self.log_path();
        let mut cmd = self.ctl_command(Some(&log))?;
        cmd.arg("foreground");
        self.child = Some(cmd.spawn().context("start ejabberd")?);
        wait_port(self.component, Duration::from_secs(60), "ejabberd", &log).await?;
        wait_port(self.c2s, Duration::from_secs(10), "ejabberd c2s", &log).await
    }

    pub fn c2s_port(&self) -> u16 {
        self.c2s
    }
    pub fn component_port(&self) -> u16 {
        self.component
    }
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("ejabberd.out")
    }

    pub async fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = self.ctl(&["stop"]).await;
            if tokio::time::timeout(Duration::from_secs(20), c.wait()).await.is_err() {
                let _ = c.kill().await;
            }
            kill_matching(&self.node);
        }
    }

    pub async fn restart(&mut self) -> Result<()> {
        self.stop().await;
        self.launch().await
    }
}

impl Drop for Ejabberd {
    fn drop(&mut self) {
        // The Erlang VM outlives the ejabberdctl wrapper: kill it by its node name.
        kill_matching(&self.node);
    }
}

/// SIGKILL every process whose command line contains `needle`.
fn kill_matching(needle: &str) {
    let Ok(procs) = std::fs::read_dir("/proc") else { return };
    for p in procs.flatten() {
        let Ok(pid) = p.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(cmdline) = std::fs::read(p.path().join("cmdline")) else { continue };
        if String::from_utf8_lossy(&cmdline).contains(needle) {
            // SAFETY: signalling a process of our own test run.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

fn walk(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = vec![dir.to_path_buf()];
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            out.extend(walk(&p)?);
        } else {
            out.push(p);
        }
    }
    Ok(out)
}

/// The XMPP server a test runs against.
pub enum XmppServer {
    Prosody(Prosody),
    Ejabberd(Ejabberd),
    /// Isthmus's own embedded server: clients log in to the gateway itself.
    Embedded(EmbeddedC2s),
}

/// Where clients reach an Isthmus running in embedded mode (STARTTLS required).
pub struct EmbeddedC2s {
    pub port: u16,
    /// The certificate the gateway generated, which clients must trust.
    pub ca_file: std::path::PathBuf,
}

/// Which XMPP server implementation a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XmppServerKind {
    Prosody,
    Ejabberd,
    /// No XMPP server: Isthmus in `xmpp.mode: embedded`.
    Embedded,
}

impl XmppServer {
    pub async fn start(kind: XmppServerKind, opts: ProsodyOptions) -> Result<XmppServer> {
        Ok(match kind {
            XmppServerKind::Prosody => XmppServer::Prosody(Prosody::start(opts).await?),
            XmppServerKind::Ejabberd => XmppServer::Ejabberd(Ejabberd::start(opts).await?),
            XmppServerKind::Embedded => anyhow::bail!("the embedded server is the gateway: start Isthmus instead"),
        })
    }
    pub fn c2s_port(&self) -> u16 {
        match self {
            XmppServer::Prosody(p) => p.c2s_port(),
            XmppServer::Ejabberd(e) => e.c2s_port(),
            XmppServer::Embedded(e) => e.port,
        }
    }
    /// The component port (0 for the embedded server, which has none).
    pub fn component_port(&self) -> u16 {
        match self {
            XmppServer::Prosody(p) => p.component_port(),
            XmppServer::Ejabberd(e) => e.component_port(),
            XmppServer::Embedded(_) => 0,
        }
    }
    pub async fn restart(&mut self) -> Result<()> {
        match self {
            XmppServer::Prosody(p) => p.restart().await,
            XmppServer::Ejabberd(e) => e.restart().await,
            XmppServer::Embedded(_) => anyhow::bail!("restart the gateway itself"),
        }
    }
}

/// Anything XMPP clients log in to.
pub trait C2s {
    fn c2s_port(&self) -> u16;
    /// When set, clients must use STARTTLS and trust this certificate.
    fn ca_file(&self) -> Option<std::path::PathBuf> {
        None
    }
}
impl C2s for EmbeddedC2s {
    fn c2s_port(&self) -> u16 {
        self.port
    }
    fn ca_file(&self) -> Option<std::path::PathBuf> {
        Some(self.ca_file.clone())
    }
}
impl C2s for Prosody {
    fn c2s_port(&self) -> u16 {
        Prosody::c2s_port(self)
    }
}
impl C2s for Ejabberd {
    fn c2s_port(&self) -> u16 {
        Ejabberd::c2s_port(self)
    }
}
impl C2s for XmppServer {
    fn c2s_port(&self) -> u16 {
        XmppServer::c2s_port(self)
    }
    fn ca_file(&self) -> Option<std::path::PathBuf> {
        match self {
            XmppServer::Embedded(e) => Some(e.ca_file.clone()),
            _ => None,
        }
    }
}

/// Which IRC server implementation a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IrcServerKind {
    /// ngIRCd: plain RFC IRC, no IRCv3 beyond multi-prefix.
    Ngircd,
    /// InspIRCd 3: rich IRCv3 (message-tags, server-time, echo-message, msgid, labeled-response).
    Inspircd,
}

/// An IRC server on its own ports (plain, and TLS with a self-signed certificate
/// for `localhost`/127.0.0.1), flood limits off, no per-IP connection limit.
pub struct IrcServer {
    pub kind: IrcServerKind,
    dir: TempDir,
    port: u16,
    tls_port: u16,
    child: Option<Child>,
    /// Atheme services linked to it (InspIRCd only; NickServ, SaslServ).
    services: Option<Child>,
}

/// The password both ends of the InspIRCd ↔ Atheme server link use.
const SERVICES_LINK_PASSWORD: &str = "isthmus-link";

/// Atheme's configuration: Debian's example with the protocol module for
/// InspIRCd, the link to it, and SASL EXTERNAL loaded next to PLAIN (with
/// NickServ CERT, which adds certificate fingerprints to accounts).
fn atheme_config(link_port: u16) -> Result<String> {
    let example = "/usr/share/doc/atheme-services/examples/atheme.conf.example";
    let mut conf = std::fs::read_to_string(example)
        .with_context(|| format!("read {example}: run ./tests/install-deps.sh (atheme-services)"))?;
    for (from, to) in [
        ("#loadmodule \"modules/protocol/charybdis\";", "loadmodule \"modules/protocol/inspircd\";".to_owned()),
        (
            "loadmodule \"modules/saslserv/plain\";",
            "loadmodule \"modules/saslserv/plain\";\nloadmodule \"modules/saslserv/external\";".to_owned(),
        ),
        ("#loadmodule \"modules/nickserv/cert\";", "loadmodule \"modules/nickserv/cert\";".to_owned()),
        ("name = \"services.int\";", "name = \"services.localhost\";".to_owned()),
        ("netname = \"misconfigured network\";", "netname = \"LocalNet\";".to_owned()),
        ("adminname = \"misconfigured admin\";", "adminname = \"test\";".to_owned()),
        ("adminemail = \"misconfigured@admin.tld\";", "adminemail = \"test@localhost\";".to_owned()),
        ("uplink \"irc.example.net\" {", "uplink \"irc.localhost\" {".to_owned()),
        ("send_password = \"mypassword\";", format!("send_password = \"{SERVICES_LINK_PASSWORD}\";")),
        ("receive_password = \"theirpassword\";", format!("receive_password = \"{SERVICES_LINK_PASSWORD}\";")),
        ("\tport = 6667;", format!("\tport = {link_port};")),
    ] {
        if !conf.contains(from) {
            bail!("{example} has no `{from}`: another Atheme version?");
        }
        conf = conf.replacen(from, &to, 1);
    }
    Ok(conf)
}

/// A TLS client certificate made for a test: its PEM files and its SHA-256
/// fingerprint as IRC servers and services show it (lower-case hex, no colons).
pub struct ClientCertificate {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub fingerprint: String,
}

/// A self-signed client certificate `name.crt` / `name.key` in `dir`.
pub fn client_certificate(dir: &Path, name: &str) -> Result<ClientCertificate> {
    let (cert, key) = (dir.join(format!("{name}.crt")), dir.join(format!("{name}.key")));
    let out = std::process::Command::new(find_program("openssl", &[])?)
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3650", "-subj"])
        .arg(format!("/CN={name}"))
        .args(["-addext", "basicConstraints=critical,CA:FALSE", "-addext", "extendedKeyUsage=clientAuth"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .context("run openssl")?;
    if !out.status.success() {
        bail!("openssl failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let out = std::process::Command::new(find_program("openssl", &[])?)
        .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
        .arg(&cert)
        .output()
        .context("run openssl x509")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let fingerprint = text.trim().rsplit('=').next().unwrap_or_default().replace(':', "").to_lowercase();
    if !out.status.success() || fingerprint.len() != 64 {
        bail!("openssl x509 -fingerprint failed: {text} {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(ClientCertificate { cert, key, fingerprint })
}

/// Ngircd is the IRC server most tests use.
pub type Ngircd = IrcServer;

fn self_signed_cert(dir: &Path) -> Result<()> {
    let out = std::process::Command::new(find_program("openssl", &[])?)
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3650", "-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
        // rustls refuses a CA certificate as a server's own certificate
        .args(["-addext", "basicConstraints=critical,CA:FALSE", "-addext", "extendedKeyUsage=serverAuth"])
        .arg("-keyout")
        .arg(dir.join("localhost.key"))
        .arg("-out")
        .arg(dir.join("localhost.crt"))
        .output()
        .context("run openssl")?;
    if !out.status.success() {
        bail!("openssl failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    for f in ["localhost.key", "localhost.crt"] {
        // the servers read them after dropping root
        std::fs::set_permissions(dir.join(f), std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
    }
    Ok(())
}

impl IrcServer {
    /// An ngIRCd.
    pub async fn start() -> Result<IrcServer> {
        Self::start_kind(IrcServerKind::Ngircd).await
    }

    pub async fn start_kind(kind: IrcServerKind) -> Result<IrcServer> {
        Self::start_on_port(kind, free_port()).await
    }

    /// An InspIRCd with Atheme services linked (NickServ, SaslServ: SASL PLAIN and
    /// EXTERNAL); returns once the services have finished their burst.
    pub async fn start_with_services() -> Result<IrcServer> {
        let link_port = free_port();
        let services = format!(
            r#"<bind address="127.0.0.1" port="{link_port}" type="servers">
<module name="spanningtree">
<module name="sasl">
<module name="services_account">
<module name="sslinfo">
<module name="hidechans">
<module name="chghost">
<module name="chgident">
<module name="chgname">
<link name="services.localhost" ipaddr="127.0.0.1" port="{link_port}" allowmask="127.0.0.0/8" timeout="300"
      sendpass="{SERVICES_LINK_PASSWORD}" recvpass="{SERVICES_LINK_PASSWORD}">
<uline server="services.localhost" silent="yes">
<sasl target="services.localhost">
"#
        );
        // Client certificates are asked for, and their fingerprints passed on (sslinfo), for SASL EXTERNAL.
        let mut irc = Self::start_configured(IrcServerKind::Inspircd, free_port(), &services).await?;
        let data = irc.dir.path().join("atheme");
        std::fs::create_dir_all(&data)?;
        std::fs::write(irc.dir.path().join("atheme.conf"), atheme_config(link_port)?)?;
        let log = irc.dir.path().join("atheme.log");
        let mut cmd = command(find_program("atheme-services", &["/usr/bin", "/usr/sbin"])?, &log)?;
        cmd.arg("-n").arg("-c").arg(irc.dir.path().join("atheme.conf")).arg("-D").arg(&data);
        cmd.arg("-l").arg(irc.dir.path().join("atheme-file.log")).arg("-p").arg(irc.dir.path().join("atheme.pid"));
        irc.services = Some(cmd.spawn().context("start atheme-services")?);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !std::fs::read_to_string(&log).unwrap_or_default().contains("finished synching with uplink") {
            if tokio::time::Instant::now() >= deadline {
                bail!("Atheme did not link to InspIRCd: {}", std::fs::read_to_string(&log).unwrap_or_default());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(irc)
    }

    /// Start on a given plain-text port (benchmarks run gateways that expect 6667).
    pub async fn start_on_port(kind: IrcServerKind, port: u16) -> Result<IrcServer> {
        Self::start_configured(kind, port, "").await
    }

    /// An ngIRCd that asks every client for `password` (PASS).
    pub async fn start_ngircd_with_password(password: &str) -> Result<IrcServer> {
        Self::start_configured(IrcServerKind::Ngircd, free_port(), &format!("\tPassword = {password}\n")).await
    }

    /// Start with `extra` appended to the configuration (ngIRCd: to its `[Global]` section).
    /// An InspIRCd with extra configuration (services) asks TLS clients for a certificate.
    async fn start_configured(kind: IrcServerKind, port: u16, extra: &str) -> Result<IrcServer> {
        let dir = tempfile::Builder::new().prefix("isthmus-ircd-").tempdir()?;
        let tls_port = free_port();
        // ngIRCd drops root to `nobody` before writing its pid file.
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o1777))?;
        self_signed_cert(dir.path())?;
        let d = dir.path().display();
        let cfg = match kind {
            IrcServerKind::Ngircd => format!(
                "[Global]\n\tName = irc.localhost\n\tInfo = Isthmus test server\n\tListen = 127.0.0.1\n\tPorts = {port}\n\
                 \tMotdPhrase = \"test\"\n\tPidFile = {d}/ngircd.pid\n\tAdminInfo1 = test\n\tAdminInfo2 = test\n\tAdminEMail = test@localhost\n{extra}\
                 [Limits]\n\tMaxConnections = 0\n\tMaxConnectionsIP = 0\n\tMaxJoins = 0\n\tMaxPenaltyTime = 0\n\tMaxNickLength = 31\n\
                 \tPingTimeout = 120\n\tPongTimeout = 20\n\
                 [Options]\n\tDNS = no\n\tIdent = no\n\tPAM = no\n\tMorePrivacy = no\n\tRequireAuthPing = no\n\tOperCanUseMode = yes\n\
                 [SSL]\n\tCertFile = {d}/localhost.crt\n\tKeyFile = {d}/localhost.key\n\tPorts = {tls_port}\n\
                 [Operator]\n\tName = oper\n\tPassword = operpass\n\
                 [Channel]\n\tName = #test\n\tTopic = test channel\n\tModes = +tn\n"
            ),
            IrcServerKind::Inspircd => format!(
                r#"<server name="irc.localhost" description="Isthmus test server" network="LocalNet">
<admin name="test" nick="test" email="test@localhost">
<bind address="127.0.0.1" port="{port}" type="clients">
<bind address="127.0.0.1" port="{tls_port}" type="clients" sslprofile="main">
<module name="ssl_gnutls">
<sslprofile name="main" provider="gnutls" certfile="{d}/localhost.crt" keyfile="{d}/localhost.key" dhfile="" hash="sha256" requestclientcert="no">
<connect name="main" allow="*" timeout="60" pingfreq="120" localmax="10000" globalmax="10000" maxconnwarn="off"
         threshold="100000" commandrate="100000000" fakelag="off" hardsendq="10485760" softsendq="1048576"
         recvq="1048576" maxchans="1000" limit="10000" useident="no" resolvehostnames="no">
<dns server="127.0.0.1" timeout="3">
<pid file="{d}/inspircd.pid">
<log method="file" type="* -USERINPUT -USEROUTPUT" level="default" target="{d}/inspircd-internal.log">
<options prefixquit="Quit: " syntaxhints="no" announcets="yes" hostintopic="yes" pingwarning="15" splitwhois="no">
<security hideserver="" userstats="Pu" customversion="" flatlinks="no" hidesplits="no" hideulines="no" maxtargets="20">
<performance softlimit="4096" somaxconn="128" netbuffersize="10240">
<channels users="1000" opers="1000">
<limits maxnick="31" maxchan="64" maxmodes="20" maxident="12" maxquit="255" maxtopic="307" maxkick="255" maxreal="128" maxaway="200">
<module name="cap">
<module name="ircv3">
<module name="ircv3_accounttag">
<module name="ircv3_batch">
<module name="ircv3_capnotify">
<module name="ircv3_ctctags">
<module name="ircv3_echomessage">
<module name="ircv3_labeledresponse">
<module name="ircv3_msgid">
<module name="ircv3_servertime">
<module name="namesx">
<module name="sha256">
{extra}"#
            ),
        };
        let file = match kind {
            IrcServerKind::Ngircd => "ngircd.conf",
            IrcServerKind::Inspircd => "inspircd.conf",
        };
        let cfg = match kind {
            IrcServerKind::Inspircd if !extra.is_empty() => {
                cfg.replace(r#"requestclientcert="no""#, r#"requestclientcert="yes""#)
            }
            _ => cfg,
        };
        std::fs::write(dir.path().join(file), cfg)?;
        let mut n = IrcServer { kind, dir, port, tls_port, child: None, services: None };
        n.launch().await?;
        Ok(n)
    }

    async fn launch(&mut self) -> Result<()> {
        let log = self.log_path();
        let mut cmd = match self.kind {
            IrcServerKind::Ngircd => {
                let mut c = command(find_program("ngircd", &["/usr/sbin"])?, &log)?;
                c.arg("-n").arg("-f").arg(self.dir.path().join("ngircd.conf"));
                c
            }
            IrcServerKind::Inspircd => {
                let mut c = command(find_program("inspircd", &["/usr/sbin"])?, &log)?;
                c.arg("--config").arg(self.dir.path().join("inspircd.conf")).args(["--nofork", "--runasroot"]);
                c
            }
        };
        self.child = Some(cmd.spawn().context("start the IRC server")?);
        wait_port(self.port, Duration::from_secs(20), "the IRC server", &log).await?;
        wait_port(self.tls_port, Duration::from_secs(10), "the IRC server (TLS)", &log).await
    }

    pub fn port(&self) -> u16 {
        self.port
    }
    /// The running server's process id (for CPU figures).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }
    pub fn tls_port(&self) -> u16 {
        self.tls_port
    }
    /// The CA (self-signed certificate) that verifies the TLS port.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("localhost.crt")
    }
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("ircd.log")
    }
    pub async fn stop(&mut self) {
        if let Some(mut c) = self.services.take() {
            terminate(&mut c, Duration::from_secs(5)).await;
        }
        if let Some(mut c) = self.child.take() {
            terminate(&mut c, Duration::from_secs(5)).await;
        }
    }
    pub async fn restart(&mut self) -> Result<()> {
        self.stop().await;
        self.launch().await
    }
}

/// A PostgreSQL cluster in a temporary directory, trust auth on 127.0.0.1 only.
pub struct Postgres {
    dir: TempDir,
    port: u16,
    bin: PathBuf,
    uid: Option<(u32, u32)>,
    child: Option<Child>,
}

/// uid and gid of a system user, from /etc/passwd.
fn system_user(name: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.first() == Some(&name) && f.len() > 3).then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))?
    })
}

fn postgres_bin() -> Result<PathBuf> {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path().join("bin"))).filter(|p| p.join("postgres").is_file()).collect()
        })
        .unwrap_or_default();
    versions.sort();
    versions
        .pop()
        .context("PostgreSQL server binaries not found under /usr/lib/postgresql: run ./tests/install-deps.sh")
}

impl Postgres {
    pub async fn start() -> Result<Postgres> {
        let dir = tempfile::Builder::new().prefix("isthmus-pg-").tempdir()?;
        let bin = postgres_bin()?;
        // As root, the server must run as an unprivileged user.
        let uid = if unsafe { libc::geteuid() } == 0 {
            Some(system_user("postgres").context("no `postgres` system user: run ./tests/install-deps.sh")?)
        } else {
            None
        };
        let data = dir.path().join("data");
        if let Some((u, g)) = uid {
            std::os::unix::fs::chown(dir.path(), Some(u), Some(g))?;
        }
        let log = dir.path().join("postgres.log");
        let mut init = command(bin.join("initdb"), &log)?;
        init.arg("-D").arg(&data).args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"]);
        if let Some((u, g)) = uid {
            init.uid(u).gid(g);
        }
        let status = init.status().await.context("run initdb")?;
        if !status.success() {
            bail!("initdb failed:\n{}", tail(&log, 20));
        }
        let mut pg = Postgres { port: free_port(), dir, bin, uid, child: None };
        pg.launch().await?;
        let mut createdb = command(pg.bin.join("createdb"), &log)?;
        createdb.args(["-h", "127.0.0.1", "-p", &pg.port.to_string(), "-U", "postgres", "isthmus_test"]);
        if !createdb.status().await.context("run createdb")?.success() {
            bail!("createdb failed:\n{}", tail(&log, 20));
        }
        Ok(pg)
    }

    async fn launch(&mut self) -> Result<()> {
        let log = self.dir.path().join("postgres.log");
        let mut cmd = command(self.bin.join("postgres"), &log)?;
        cmd.arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-p", &self.port.to_string(), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
            .arg("-k")
            .arg(self.dir.path());
        if let Some((u, g)) = self.uid {
            cmd.uid(u).gid(g);
        }
        self.child = Some(cmd.spawn().context("start postgres")?);
        wait_port(self.port, Duration::from_secs(30), "PostgreSQL", &log).await?;
        // The port opens slightly before connections are accepted.
        tokio::time::sleep(Duration::from_millis(200)).await;
        Ok(())
    }

    /// Stop the way an admin restarting the database does (fast shutdown: SIGINT):
    /// every client connection is cut at once.
    pub async fn stop_fast(&mut self) {
        if let Some(mut c) = self.child.take() {
            if let Some(pid) = c.id() {
                // SAFETY: signalling a child process this handle owns.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGINT) };
            }
            if tokio::time::timeout(Duration::from_secs(20), c.wait()).await.is_err() {
                let _ = c.kill().await;
            }
        }
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/isthmus_test", self.port)
    }
    pub fn port(&self) -> u16 {
        self.port
    }
    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }
    pub async fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            terminate(&mut c, Duration::from_secs(10)).await;
        }
    }
    pub async fn restart(&mut self) -> Result<()> {
        self.stop().await;
        self.launch().await
    }
}
