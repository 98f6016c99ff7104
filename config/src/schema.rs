//! The configuration schema. Every key is documented in `config/examples/prosody.yaml`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_saphyr::Spanned;

use crate::secret::Secret;

/// The whole configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub xmpp: XmppConfig,
    pub store: StoreConfig,
    pub log: LogConfig,
    pub access: AccessConfig,
    pub archive: ArchiveConfig,
    /// One entry per IRC network (one component domain each).
    pub irc: Vec<IrcNetworkConfig>,
    /// One entry per Matrix network (one component domain each).
    pub matrix: Vec<MatrixNetworkConfig>,
    /// One entry per Telegram bot (one component domain each).
    pub telegram: Vec<TelegramNetworkConfig>,
    /// One entry per Discord bot (one component domain each).
    pub discord: Vec<DiscordNetworkConfig>,
    /// Portals linking one XMPP room to chats on several networks.
    pub portals: Vec<PortalConfig>,
    /// The configuration file's directory: relative paths are relative to it.
    pub base_dir: PathBuf,
    /// Where each IRC network entry starts in the file (for validation messages).
    pub(crate) irc_locations: Vec<serde_saphyr::Location>,
    /// Where each Matrix network entry starts in the file.
    pub(crate) matrix_locations: Vec<serde_saphyr::Location>,
    /// Where each Telegram network entry starts in the file.
    pub(crate) telegram_locations: Vec<serde_saphyr::Location>,
    /// Where each Discord network entry starts in the file.
    pub(crate) discord_locations: Vec<serde_saphyr::Location>,
    /// Where each portal entry starts in the file.
    pub(crate) portal_locations: Vec<serde_saphyr::Location>,
}

/// The file as parsed, before secrets are resolved.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    xmpp: XmppConfig,
    #[serde(default)]
    store: StoreConfig,
    #[serde(default)]
    log: LogConfig,
    #[serde(default)]
    access: AccessConfig,
    #[serde(default)]
    archive: ArchiveConfig,
    #[serde(default)]
    irc: Vec<Spanned<IrcNetworkConfig>>,
    #[serde(default)]
    matrix: Vec<Spanned<MatrixNetworkConfig>>,
    #[serde(default)]
    telegram: Vec<Spanned<TelegramNetworkConfig>>,
    #[serde(default)]
    discord: Vec<Spanned<DiscordNetworkConfig>>,
    #[serde(default)]
    portals: Vec<Spanned<PortalConfig>>,
}

impl RawConfig {
    pub(crate) fn into_config(self, base_dir: PathBuf) -> Config {
        let irc_locations = self.irc.iter().map(|s| s.referenced).collect();
        let matrix_locations = self.matrix.iter().map(|s| s.referenced).collect();
        let telegram_locations = self.telegram.iter().map(|s| s.referenced).collect();
        let discord_locations = self.discord.iter().map(|s| s.referenced).collect();
        let portal_locations = self.portals.iter().map(|s| s.referenced).collect();
        Config {
            xmpp: self.xmpp,
            store: self.store,
            log: self.log,
            access: self.access,
            archive: self.archive,
            irc: self.irc.into_iter().map(|s| s.value).collect(),
            matrix: self.matrix.into_iter().map(|s| s.value).collect(),
            telegram: self.telegram.into_iter().map(|s| s.value).collect(),
            discord: self.discord.into_iter().map(|s| s.value).collect(),
            portals: self.portals.into_iter().map(|s| s.value).collect(),
            base_dir,
            irc_locations,
            matrix_locations,
            telegram_locations,
            discord_locations,
            portal_locations,
        }
    }
}

impl Config {
    /// The XEP-0114 secret for a network's domain: its own, else the global one.
    pub fn component_secret_for<'a>(&'a self, net: &'a IrcNetworkConfig) -> Option<&'a Secret> {
        self.component_secret(net.secret.as_ref())
    }

    /// The XEP-0114 secret for a domain whose own secret is `own`: it, else the global one.
    pub fn component_secret<'a>(&'a self, own: Option<&'a Secret>) -> Option<&'a Secret> {
        own.or(self.xmpp.component.as_ref().and_then(|c| c.secret.as_ref()))
    }
}

/// How Isthmus meets XMPP.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XmppMode {
    /// An external component (XEP-0114) of Prosody, ejabberd or another server.
    #[default]
    Component,
    /// Isthmus's own XMPP server core: clients log in to Isthmus directly.
    Embedded,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct XmppConfig {
    #[serde(default)]
    pub mode: XmppMode,
    pub component: Option<ComponentConfig>,
    pub embedded: Option<EmbeddedConfig>,
}

/// The embedded XMPP server core (`xmpp.mode: embedded`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddedConfig {
    /// The users' domain: accounts are `name@domain`.
    #[serde(default = "default_embedded_domain")]
    pub domain: String,
    /// Where clients connect (STARTTLS); `0.0.0.0:5222` to listen publicly.
    #[serde(default = "default_c2s_listen")]
    pub listen: String,
    /// Optional direct-TLS listener (XEP-0368), e.g. `127.0.0.1:5223`.
    pub direct_tls_listen: Option<String>,
    /// PEM certificate chain and key; generated on first start when not given.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Largest stanza a client may send; larger ones end its stream with an error.
    #[serde(default = "default_max_stanza_bytes")]
    pub max_stanza_bytes: usize,
    /// Accounts listed here (in addition to those made with `isthmus user add`).
    #[serde(default)]
    pub users: Vec<EmbeddedUser>,
    /// PBKDF2 rounds for new passwords (and for the salts shown for unknown
    /// accounts, so they look like real ones); at least 4096.
    #[serde(default = "default_scram_iterations")]
    pub scram_iterations: u32,
    /// Offer and accept SASL on a stream without TLS, from loopback addresses
    /// only (for local test clients); off: TLS first, always.
    #[serde(default)]
    pub plaintext_auth_on_loopback: bool,
    /// Limits on connections that have not logged in yet, and on failed logins.
    #[serde(default)]
    pub limits: C2sLimits,
}

/// Limits on the embedded server's connections before they log in.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct C2sLimits {
    /// Seconds a connection has to finish its TLS handshake.
    pub tls_handshake_secs: u64,
    /// Seconds from connecting to being logged in (TLS and SASL included).
    pub login_secs: u64,
    /// Connections not logged in yet, per IP address; one more makes the
    /// oldest of that address's go.
    pub unauthenticated_per_ip: usize,
    /// Connections not logged in yet, in all; one more makes the oldest go.
    pub unauthenticated_total: usize,
    /// Longest delay before answering a failed login; the delay doubles with
    /// each failure from the same address or for the same account (from 0.25 s).
    pub failed_login_delay_max_secs: u64,
}

impl Default for C2sLimits {
    fn default() -> Self {
        C2sLimits {
            tls_handshake_secs: 10,
            login_secs: 30,
            unauthenticated_per_ip: 64,
            unauthenticated_total: 512,
            failed_login_delay_max_secs: 8,
        }
    }
}

/// An account given in the file: the hash comes from `isthmus user hash`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddedUser {
    pub jid: String,
    pub password_hash: String,
}

impl Default for EmbeddedConfig {
    fn default() -> Self {
        EmbeddedConfig {
            domain: default_embedded_domain(),
            listen: default_c2s_listen(),
            direct_tls_listen: None,
            tls_cert: None,
            tls_key: None,
            max_stanza_bytes: default_max_stanza_bytes(),
            users: Vec::new(),
            scram_iterations: default_scram_iterations(),
            plaintext_auth_on_loopback: false,
            limits: C2sLimits::default(),
        }
    }
}

fn default_embedded_domain() -> String {
    "localhost".into()
}
fn default_c2s_listen() -> String {
    "127.0.0.1:5222".into()
}
fn default_max_stanza_bytes() -> usize {
    256 * 1024
}
fn default_scram_iterations() -> u32 {
    10_000
}

/// The XEP-0114 link to the XMPP server.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComponentConfig {
    #[serde(default = "default_host")]
    pub host: String,
    #[serde(default = "default_component_port")]
    pub port: u16,
    /// Default component secret for every network domain.
    pub secret: Option<Secret>,
    /// Ping through the server after this much silence.
    #[serde(default = "default_keepalive")]
    pub keepalive_secs: u64,
    #[serde(default = "default_reconnect_initial")]
    pub reconnect_initial_ms: u64,
    #[serde(default = "default_reconnect_max")]
    pub reconnect_max_ms: u64,
}

fn default_host() -> String {
    "127.0.0.1".into()
}
fn default_component_port() -> u16 {
    5347
}
fn default_keepalive() -> u64 {
    60
}
fn default_reconnect_initial() -> u64 {
    500
}
fn default_reconnect_max() -> u64 {
    30_000
}

/// Where state lives.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// `sqlite://PATH` (relative to the config file), a bare path, `sqlite::memory:`, or `postgres://…`.
    #[serde(default = "default_store_url")]
    pub url: String,
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
    /// The key credentials are sealed with in the store (64 hex digits, or 32 bytes
    /// in base64); without it, the key file `isthmus.key` next to this file, made on
    /// first start.
    #[serde(default)]
    pub secret_key: Option<Secret>,
}

fn default_store_url() -> String {
    "sqlite://isthmus.db".into()
}
fn default_max_connections() -> u32 {
    8
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig { url: default_store_url(), max_connections: default_max_connections(), secret_key: None }
    }
}

impl StoreConfig {
    /// The URL to open: relative SQLite paths are made absolute against `base_dir`.
    pub fn resolved_url(&self, base_dir: &Path) -> String {
        let url = self.url.trim();
        if url.starts_with("sqlite::memory:") || url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return url.to_owned();
        }
        let path = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:")).unwrap_or(url);
        let (path, query) = match path.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path, None),
        };
        let path = Path::new(path);
        let abs = if path.is_absolute() { path.to_path_buf() } else { base_dir.join(path) };
        match query {
            Some(q) => format!("sqlite://{}?{q}", abs.display()),
            None => format!("sqlite://{}", abs.display()),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// A tracing filter, e.g. `info` or `info,isthmus_irc=debug`; `RUST_LOG` overrides it.
    #[serde(default = "default_filter")]
    pub filter: String,
}

fn default_filter() -> String {
    "info".into()
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { filter: default_filter() }
    }
}

/// Who may use the gateway.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessConfig {
    /// Bare JIDs (`user@server`) with admin rights: the admin commands on every
    /// network's domain (`users`, `disconnect`, `link-status`, `announce`). Matched
    /// exactly, without regard to case; a domain, a full JID or a wildcard makes
    /// nobody an admin. An admin must also be allowed to use the network (`allow`).
    #[serde(default)]
    pub admins: Vec<String>,
    /// JIDs or domains allowed to use every network (a network's own `allow` overrides);
    /// `"*"` is everyone. In component mode someone must be allowed (validation refuses
    /// an empty list); in embedded mode empty means the server's own accounts.
    #[serde(default)]
    pub allow: Vec<String>,
}

/// The room archive (history on join, XEP-0313).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArchiveConfig {
    /// Days messages are kept; 0 keeps them forever.
    #[serde(default = "default_retention")]
    pub retention_days: u32,
    /// Messages replayed on join when the client does not say how many.
    #[serde(default = "default_history")]
    pub history_on_join: u32,
}

fn default_retention() -> u32 {
    7
}
fn default_history() -> u32 {
    20
}

impl Default for ArchiveConfig {
    fn default() -> Self {
        ArchiveConfig { retention_days: default_retention(), history_on_join: default_history() }
    }
}

/// One IRC network, served on its own component domain.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IrcNetworkConfig {
    /// The component domain, e.g. `irc.example.org`.
    pub domain: String,
    /// Component secret for this domain (else `xmpp.component.secret`).
    pub secret: Option<Secret>,
    /// JIDs or domains allowed to use this network (empty: `access.allow`).
    #[serde(default)]
    pub allow: Vec<String>,
    /// When set, `#chan@domain` and `nick@domain` mean this server.
    pub pinned_server: Option<String>,
    #[serde(default = "default_realname")]
    pub realname: String,
    #[serde(default)]
    pub flood: FloodConfig,
    /// Servers users may reach, by the name used in JIDs (`#chan%NAME@domain`).
    #[serde(default)]
    pub servers: BTreeMap<String, IrcServerConfig>,
    /// Let users reach servers not listed in `servers` (with default settings).
    #[serde(default)]
    pub allow_unlisted_servers: bool,
    /// Stay in IRC channels while the user has no device in the room, so nothing is
    /// missed: what is said meanwhile comes as history on the next join.
    #[serde(default)]
    pub persistent_channels: bool,
    /// When a user's last device in a channel vanishes without leaving (its XMPP
    /// server bounced what the gateway sent: the server restarted, the client lost
    /// its connection), stay in the channel this many seconds, archiving, so the
    /// device that comes back gets what it missed as history. 0: leave at once.
    #[serde(default = "default_reconnect_grace")]
    pub reconnect_grace_secs: u64,
    /// How corrections, retractions and reactions, which IRC has no form for, are shown there.
    #[serde(default)]
    pub fallbacks: IrcFallbacks,
    /// At most this many connection attempts at once across the network (after a
    /// server restart, every user reconnects).
    #[serde(default = "default_max_concurrent_connects")]
    pub max_concurrent_connects: usize,
    /// At most this many IRC servers one XMPP account is connected to at once
    /// through this network (one connection each), so that one user cannot make
    /// the gateway open connections without end.
    #[serde(default = "default_max_servers_per_account")]
    pub max_servers_per_account: usize,
}

fn default_max_servers_per_account() -> usize {
    10
}

fn default_reconnect_grace() -> u64 {
    120
}

fn default_max_concurrent_connects() -> usize {
    8
}

/// IRC renderings of what IRC cannot carry natively.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IrcFallbacks {
    #[serde(default)]
    pub corrections: CorrectionFallback,
    #[serde(default)]
    pub retractions: RetractionFallback,
    #[serde(default)]
    pub reactions: ReactionFallback,
    #[serde(default)]
    pub replies: ReplyFallback,
}

/// A correction on IRC.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CorrectionFallback {
    /// Send the corrected text as a new line starting with `[edit] `.
    #[default]
    Mark,
    /// Send nothing.
    Ignore,
}

/// A retraction on IRC (also a moderator's removal of someone else's message).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RetractionFallback {
    /// Send nothing: the line cannot be taken back on IRC.
    #[default]
    Ignore,
    /// Say that a message was deleted (`/me deleted a message: "…"`; a moderator's
    /// removal: `/me removed a message by bob: "…" (reason: …)`).
    Notice,
}

/// A reply (XEP-0461) on IRC: the line starts by saying whom, and what, it answers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplyFallback {
    /// `bob: > the start of bob's message… ↵ the reply`.
    #[default]
    Quote,
    /// `bob: the reply`.
    Nick,
    /// The reply alone.
    Ignore,
}

/// A reaction on IRC.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReactionFallback {
    /// `/me reacted 👍 to bob: "…"`.
    #[default]
    Action,
    /// Send nothing.
    Ignore,
}

fn default_realname() -> String {
    "Isthmus gateway user".into()
}

/// Pacing of lines sent to IRC.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FloodConfig {
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default = "default_burst")]
    pub burst: u32,
    #[serde(default = "default_rate")]
    pub lines_per_second: f64,
}

fn yes() -> bool {
    true
}
fn default_burst() -> u32 {
    10
}
fn default_rate() -> f64 {
    1.0
}

impl Default for FloodConfig {
    fn default() -> Self {
        FloodConfig { enabled: true, burst: default_burst(), lines_per_second: default_rate() }
    }
}

/// How to reach one IRC server.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IrcServerConfig {
    /// Host to connect to (default: the server's name).
    pub host: Option<String>,
    /// Default 6697 with TLS, 6667 without.
    pub port: Option<u16>,
    #[serde(default = "yes")]
    pub tls: bool,
    /// Verify the server's certificate. Turning this off must be explicit.
    #[serde(default = "yes")]
    pub tls_verify: bool,
    /// Extra CA certificate (PEM) to trust for this server.
    pub tls_ca_file: Option<PathBuf>,
    /// Server password (PASS).
    pub password: Option<Secret>,
    pub sasl: Option<SaslConfig>,
    /// Raw IRC lines sent after registration (e.g. `PRIVMSG NickServ :IDENTIFY …`).
    #[serde(default)]
    pub on_connect: Vec<String>,
    /// How lines that are not UTF-8 are decoded (an encoding name such as
    /// `latin-1`, `windows-1251` or `iso-8859-15`).
    #[serde(default = "default_fallback")]
    pub encoding_fallback: String,
}

fn default_fallback() -> String {
    "latin-1".into()
}

impl Default for IrcServerConfig {
    fn default() -> Self {
        IrcServerConfig {
            host: None,
            port: None,
            tls: true,
            tls_verify: true,
            tls_ca_file: None,
            password: None,
            sasl: None,
            on_connect: Vec::new(),
            encoding_fallback: default_fallback(),
        }
    }
}

impl IrcServerConfig {
    pub fn port(&self) -> u16 {
        self.port.unwrap_or(if self.tls { 6697 } else { 6667 })
    }

    /// The encoding `encoding_fallback` names (a WHATWG label; `latin-1` reads as
    /// Windows-1252, like browsers do), if it names one.
    pub fn fallback_encoding(&self) -> Option<&'static encoding_rs::Encoding> {
        let label = self.encoding_fallback.trim();
        let label = if label.eq_ignore_ascii_case("latin-1") { "latin1" } else { label };
        encoding_rs::Encoding::for_label(label.as_bytes())
    }

    /// The host to connect to; `key` is the server's name in the `servers` map.
    pub fn host_or<'a>(&'a self, key: &'a str) -> &'a str {
        self.host.as_deref().unwrap_or(key)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SaslMechanism {
    Plain,
    External,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SaslConfig {
    pub mechanism: SaslMechanism,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

/// One Matrix network, served on its own component domain. Personal mode: each
/// XMPP user links their own Matrix account (`login` on the domain) and the
/// gateway acts for them with its own device.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatrixNetworkConfig {
    /// The component domain, e.g. `matrix.example.org`.
    pub domain: String,
    /// Component secret for this domain (else `xmpp.component.secret`).
    pub secret: Option<Secret>,
    /// JIDs or domains allowed to use this network (empty: `access.allow`).
    #[serde(default)]
    pub allow: Vec<String>,
    /// The homeserver offered when a user links an account (a URL such as
    /// `https://matrix.org`).
    pub default_homeserver: Option<String>,
    /// Homeserver URLs users may log in to; empty allows any whose address is public.
    /// A homeserver at a loopback, private or link-local address must be listed here.
    #[serde(default)]
    pub allowed_homeservers: Vec<String>,
    /// Where each linked account's Matrix device (keys, room state) is kept;
    /// relative to the configuration file.
    #[serde(default = "default_matrix_data_dir")]
    pub data_dir: PathBuf,
    /// The media proxy that makes Matrix files fetchable by XMPP clients; without
    /// it, files reach XMPP with their `mxc://` address.
    pub media: Option<MatrixMediaConfig>,
    /// Whether files XMPP users send may be fetched from loopback, private and
    /// link-local addresses (off: such links are refused, so a user cannot make the
    /// gateway read internal services).
    #[serde(default)]
    pub fetch_private_addresses: bool,
    /// The application service that shows XMPP users as Matrix users of their own
    /// in portal rooms (`isthmus matrix-registration` prints the file for the homeserver).
    pub appservice: Option<MatrixAppserviceConfig>,
    /// Instead of `appservice`: one Matrix account that speaks for every XMPP user
    /// in the portal rooms (`<nick> text`), for homeservers the admin cannot register
    /// an application service with.
    pub bot: Option<MatrixPortalBotConfig>,
    /// Rooms shared by everyone: each links a group chat on this domain
    /// (`NAME@domain`) to one Matrix room.
    #[serde(default)]
    pub portals: Vec<MatrixPortalConfig>,
}

/// The Matrix account portal rooms use when there is no application service.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatrixPortalBotConfig {
    /// The homeserver's client-server API URL, e.g. `https://matrix.example.org`.
    pub homeserver: String,
    /// The account's full user id, e.g. `@isthmus:example.org`.
    pub user_id: String,
    /// Its password (the gateway logs in once and keeps the access token in `data_dir`).
    pub password: Secret,
}

/// The application service registered with the homeserver for portal rooms.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatrixAppserviceConfig {
    /// The homeserver's client-server API URL, e.g. `http://127.0.0.1:8008`.
    pub homeserver: String,
    /// The homeserver's name (the part after `:` in user ids), e.g. `example.org`.
    pub server_name: String,
    /// Where Isthmus listens for the homeserver's transactions (IP:PORT).
    pub listen: String,
    /// The URL the homeserver reaches `listen` at (default: `http://` + `listen`).
    pub url: Option<String>,
    /// Isthmus's token towards the homeserver.
    pub as_token: Secret,
    /// The homeserver's token towards Isthmus.
    pub hs_token: Secret,
    /// The bot user's localpart.
    #[serde(default = "default_as_sender")]
    pub sender_localpart: String,
    /// XMPP users appear as `@PREFIX<escaped JID>:server_name`.
    #[serde(default = "default_as_prefix")]
    pub user_prefix: String,
}

fn default_as_sender() -> String {
    "isthmus".into()
}
fn default_as_prefix() -> String {
    "_xmpp_".into()
}

/// One portal: the group chat `name@domain` on XMPP is the Matrix room `room`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatrixPortalConfig {
    /// The group chat's name on XMPP (its JID's localpart), e.g. `lobby`.
    pub name: String,
    /// The Matrix room: `!id:server` or `#alias:server`.
    pub room: String,
}

/// The Matrix bridge's media proxy: an HTTP server handing out the files of the
/// rooms under links the gateway signed.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatrixMediaConfig {
    /// Where its HTTP server listens (IP:PORT), e.g. `127.0.0.1:8091`.
    pub listen: String,
    /// The URL XMPP clients reach it at (usually a reverse proxy with TLS in
    /// front of `listen`), e.g. `https://example.org/matrix-media`.
    pub public_url: String,
}

fn default_matrix_data_dir() -> PathBuf {
    PathBuf::from("matrix")
}

impl MatrixNetworkConfig {
    /// `data_dir` made absolute against the configuration's directory.
    pub fn resolved_data_dir(&self, base_dir: &Path) -> PathBuf {
        if self.data_dir.is_absolute() { self.data_dir.clone() } else { base_dir.join(&self.data_dir) }
    }

    /// Whether users may log in to `homeserver` (by URL; its address is checked at login).
    pub fn allows_homeserver(&self, homeserver: &str) -> bool {
        self.allowed_homeservers.is_empty() || self.lists_homeserver(homeserver)
    }

    /// Whether `homeserver` is written in `allowed_homeservers` (then it may be at a
    /// private or loopback address).
    pub fn lists_homeserver(&self, homeserver: &str) -> bool {
        let norm = |u: &str| u.trim_end_matches('/').to_ascii_lowercase();
        self.allowed_homeservers.iter().any(|h| norm(h) == norm(homeserver))
    }
}

/// A Telegram bot (Bot API). Its groups are portals: the bot sits in the group,
/// Telegram users appear as occupants of the XMPP room, and XMPP users (and people
/// from other networks in the portal) appear as the bot's messages with their nick.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelegramNetworkConfig {
    /// The component domain, e.g. `telegram.example.org`.
    pub domain: String,
    /// Component secret for this domain (else `xmpp.component.secret`).
    pub secret: Option<Secret>,
    /// JIDs or domains allowed to use this network (empty: `access.allow`).
    #[serde(default)]
    pub allow: Vec<String>,
    /// The bot's token from BotFather (`env:` or `file:` keep it out of the file).
    pub token: Secret,
    /// The Bot API server: Telegram's, or a self-hosted `telegram-bot-api`.
    #[serde(default = "default_telegram_api_url")]
    pub api_url: String,
    /// How the bot shows someone from elsewhere; `{nick}` is written in bold.
    #[serde(default = "default_relay_template")]
    pub relay_template: String,
    /// How long one long poll waits for updates (seconds, 1–50).
    #[serde(default = "default_poll_timeout")]
    pub poll_timeout_secs: u64,
    /// The media proxy that makes Telegram files fetchable by XMPP clients (the
    /// bot token stays in the gateway); without it, files reach XMPP as a notice.
    pub media: Option<MatrixMediaConfig>,
    /// Whether files XMPP users send may be fetched from loopback, private and
    /// link-local addresses.
    #[serde(default)]
    pub fetch_private_addresses: bool,
    /// Groups shared by everyone: each links `NAME@domain` on XMPP to one Telegram
    /// group (or one topic of a forum supergroup).
    #[serde(default)]
    pub portals: Vec<TelegramPortalConfig>,
}

/// One Telegram portal: the group chat `name@domain` on XMPP is the Telegram chat `chat`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelegramPortalConfig {
    /// The group chat's name on XMPP (its JID's localpart), e.g. `lobby`.
    pub name: String,
    /// The Telegram chat id (a group: `-123…`, a supergroup: `-100…`).
    pub chat: i64,
    /// One topic of a forum supergroup (its `message_thread_id`); each topic is a room of its own.
    pub topic: Option<i64>,
}

fn default_telegram_api_url() -> String {
    "https://api.telegram.org".into()
}
fn default_relay_template() -> String {
    "{nick}: {text}".into()
}
fn default_poll_timeout() -> u64 {
    30
}

/// A portal: one XMPP room linked to chats on any networks (two on one network included).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortalConfig {
    /// The portal's name, for the admin's `portals`, `link` and `unlink` commands.
    pub name: String,
    /// The XMPP room, on the domain of one of the networks, e.g. `lobby@telegram.example.org`.
    pub room: String,
    /// The chats it links.
    pub members: Vec<PortalMemberConfig>,
}

/// One chat of a portal.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortalMemberConfig {
    /// The network's domain, e.g. `irc.example.org`.
    pub network: String,
    /// The chat as that network names it: `#chan%irc.server`, `!room:server`, a
    /// Telegram chat id (`-100…`, with `/TOPIC` for one forum topic).
    pub chat: String,
}

/// A Discord bot (REST API and gateway). Its channels are portals: the bot reads
/// the channel, Discord users appear as occupants of the XMPP room, and XMPP users
/// (and people from other networks in the portal) post through a webhook of the
/// channel under their own nick.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiscordNetworkConfig {
    /// The component domain, e.g. `discord.example.org`.
    pub domain: String,
    /// Component secret for this domain (else `xmpp.component.secret`).
    pub secret: Option<Secret>,
    /// JIDs or domains allowed to use this network (empty: `access.allow`).
    #[serde(default)]
    pub allow: Vec<String>,
    /// The bot's token (Developer Portal → the application → Bot → Reset Token).
    pub token: Secret,
    /// Where the REST API is: `https://discord.com`, or a proxy's `http(s)://HOST[:PORT]`.
    #[serde(default = "default_discord_api_url")]
    pub api_url: String,
    /// The gateway's websocket URL (`wss://…`); by default the one `GET /gateway/bot` names.
    pub gateway_url: Option<String>,
    /// Where pictures are (avatars): `https://cdn.discordapp.com`, or a proxy's.
    #[serde(default = "default_discord_cdn_url")]
    pub cdn_url: String,
    /// Channels shared by everyone: each links `NAME@domain` on XMPP to one Discord
    /// channel (or thread).
    #[serde(default)]
    pub portals: Vec<DiscordPortalConfig>,
}

/// One Discord portal: the group chat `name@domain` on XMPP is the Discord channel `channel`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiscordPortalConfig {
    /// The group chat's name on XMPP (its JID's localpart), e.g. `general`.
    pub name: String,
    /// The channel's (or thread's) id, a snowflake written as a string: `"1234567890123456789"`.
    pub channel: String,
}

fn default_discord_api_url() -> String {
    "https://discord.com".into()
}
fn default_discord_cdn_url() -> String {
    "https://cdn.discordapp.com".into()
}
