//! Portal rooms: Matrix rooms shared by every XMPP user of the gateway, where
//! each XMPP user appears as a Matrix user of their own (a *puppet*) owned by
//! the gateway's application service.
//!
//! - The puppet of `alice@example.org` is `@{user_prefix}alice=40example.org:{server_name}`
//!   ([`puppet_localpart`]: `a`–`z`, `0`–`9`, `.` and `-` stay, `_` is `__`, a
//!   capital is `_` and its lower-case letter, any other byte `=` and two hex digits).
//!   It is registered when the user first enters a portal, joins with their MUC
//!   nick as its display name in that room, and sends their messages with the
//!   application service's identity assertion (`?user_id=`).
//! - The bot `@{sender_localpart}:{server_name}` joins the portal rooms at start
//!   (accepting an invitation), and invites puppets into rooms they cannot join by themselves.
//! - What happens in the rooms reaches the gateway as transactions the homeserver
//!   pushes to its HTTP server (`appservice.listen`), [`Portals::transaction`]:
//!   acknowledged once the router has taken in what it carried, processed once
//!   per transaction id. Events of the bot and of puppets are never bridged back (no loops).
//! - [`registration_yaml`] is the registration file the homeserver loads.
//!
//! Without an application service, a *bot* account given in the configuration
//! acts for everyone: the gateway logs in with its password (keeping the access
//! token in the data directory, [`BOT_TOKEN_FILE`]), an XMPP user's message is the
//! bot's, prefixed with their nick (`<nick> text`), and the rooms reach XMPP
//! through the bot's own sync (its resume point in [`BOT_SYNC_FILE`], stored once
//! the router has taken in a batch). Reactions, typing and read markers of XMPP
//! users have no Matrix form there (the bot cannot hold one set per person).
//!
//! Events about portals carry no account (`Event::account == None`); the chat id
//! is the room as configured (`!id:server` or `#alias:server`).

mod homeserver;
mod registration;
mod room_state;
mod server;
use homeserver::*;
pub use registration::*;
pub use room_state::*;
use server::*;
mod from_matrix;
mod to_matrix;

use std::collections::{HashMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex as StdMutex, MutexGuard, Weak};
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use isthmus_config::{MatrixAppserviceConfig, MatrixPortalBotConfig, MatrixPortalConfig};
use isthmus_core::jid::BareJid;
use isthmus_core::model::{
    Affiliation, Attachment, ChatRef, ChatState, Event, EventKind, LeaveKind, Message, MessageRef, NetworkId, Occupant,
    RemoteId, Role, Sender,
};
use isthmus_core::network::{Delivered, DeliveryError, EventSink, Routed};
use isthmus_core::outbox::Receipt;
use matrix_sdk::reqwest;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::incoming::{self, Incoming, UserLevels};
use crate::outgoing::{self, UploadedFile};
use crate::session::ReactionBook;

/// The largest transaction body the server reads.
const MAX_TRANSACTION_BYTES: usize = 32 * 1024 * 1024;
/// How many transaction ids are remembered to recognise a retry.
const REMEMBERED_TRANSACTIONS: usize = 4096;
/// The bot's access token (JSON: user id, device id, token), in the network's data directory.
pub const BOT_TOKEN_FILE: &str = "portal_bot_login.json";
/// The bot's sync resume point, in the network's data directory.
pub const BOT_SYNC_FILE: &str = "portal_bot_sync";

// --- the portals ---------------------------------------------------------------------

#[derive(Default)]
struct State {
    /// Room id → the room as configured (the chat id).
    chat_of: HashMap<String, String>,
    /// The room as configured → room id, for rooms the bot is in.
    ready: HashMap<String, String>,
    /// Joined members per room id: user id → display name.
    members: HashMap<String, HashMap<String, Option<String>>>,
    /// Puppets known to exist.
    registered: HashSet<String>,
    reactions: ReactionBook,
    /// Who types in each room (from ephemeral events).
    typing: HashMap<String, HashSet<String>>,
}

/// The portal rooms of one Matrix network and its application service.
pub struct Portals {
    network: NetworkId,
    acting: Acting,
    portals: Vec<MatrixPortalConfig>,
    sink: EventSink,
    hs: Homeserver,
    /// `@{sender_localpart}:{server_name}`, or the bot account's user id.
    bot: String,
    state: StdMutex<State>,
    /// One room set up at a time (resolution, the bot's join).
    setup: tokio::sync::Mutex<()>,
    /// Transactions are processed one at a time, in order, once.
    transactions: tokio::sync::Mutex<SeenTransactions>,
    /// What the transaction being processed handed the router, to wait for before acknowledging it.
    routed: StdMutex<Vec<Routed>>,
    server: StdMutex<Option<JoinHandle<()>>>,
    /// Fetches the files XMPP users send.
    fetcher: Arc<crate::media::Fetcher>,
}

impl Drop for Portals {
    fn drop(&mut self) {
        if let Some(task) = self.server.lock().unwrap_or_else(|e| e.into_inner()).take() {
            task.abort();
        }
    }
}

/// A transaction id unique to `event` (and stable across replays of it), as personal mode spells it.
pub fn transaction_id(event: &Event) -> String {
    match (&event.kind, event.origin_ids.first()) {
        (EventKind::Message(_), _) | (_, None) => format!("{}-{}", event.key.0, event.kind.name()),
        (_, Some(own)) => format!("{}-{}-{own}", event.key.0, event.kind.name()),
    }
}

/// Who acts for the XMPP users in the portal rooms.
#[derive(Debug, Clone)]
pub enum Acting {
    /// The application service: each XMPP user is a puppet of their own.
    Appservice(MatrixAppserviceConfig),
    /// One account for everyone; its login and sync point are kept in `data_dir`.
    Bot { config: MatrixPortalBotConfig, data_dir: PathBuf },
}

impl Portals {
    pub fn new(
        network: NetworkId,
        acting: Acting,
        portals: Vec<MatrixPortalConfig>,
        sink: EventSink,
        fetcher: Arc<crate::media::Fetcher>,
    ) -> Arc<Portals> {
        let http = reqwest::Client::builder()
            .user_agent(concat!("Isthmus/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(15))
            .build()
            .map_err(|e| e.to_string());
        let (base, token, bot) = match &acting {
            Acting::Appservice(config) => (
                config.homeserver.clone(),
                config.as_token.expose().to_owned(),
                format!("@{}:{}", config.sender_localpart, config.server_name),
            ),
            Acting::Bot { config, .. } => (config.homeserver.clone(), String::new(), config.user_id.clone()),
        };
        let hs = Homeserver { base, token: StdMutex::new(token), http };
        let mut state = State::default();
        for p in &portals {
            if p.room.starts_with('!') {
                state.chat_of.insert(p.room.clone(), p.room.clone());
            }
        }
        Arc::new(Portals {
            network,
            acting,
            portals,
            sink,
            hs,
            bot,
            state: StdMutex::new(state),
            setup: tokio::sync::Mutex::new(()),
            transactions: tokio::sync::Mutex::new(SeenTransactions::default()),
            routed: StdMutex::new(Vec::new()),
            server: StdMutex::new(None),
            fetcher,
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The bot's user id.
    pub fn bot(&self) -> &str {
        &self.bot
    }

    /// Whether `user` is one of this gateway's puppets.
    pub fn is_puppet(&self, user: &str) -> bool {
        self.puppet_jid(user).is_some()
    }

    fn appservice(&self) -> Option<&MatrixAppserviceConfig> {
        match &self.acting {
            Acting::Appservice(config) => Some(config),
            Acting::Bot { .. } => None,
        }
    }

    /// The JID a puppet stands for.
    pub fn puppet_jid(&self, user: &str) -> Option<String> {
        let config = self.appservice()?;
        let local = user.strip_prefix('@')?.strip_prefix(config.user_prefix.as_str())?;
        let local = local.strip_suffix(config.server_name.as_str())?.strip_suffix(':')?;
        jid_of_localpart(local)
    }

    /// `nick` when `redactor` removed someone else's event (a moderation, XEP-0425 on
    /// XMPP); `None` for a self-redaction or when the event's author cannot be found.
    async fn moderator_of(&self, room_id: &str, redacts: &str, redactor: &str, nick: &str) -> Option<String> {
        let path = format!("/_matrix/client/v3/rooms/{}/event/{}", enc(room_id), enc(redacts));
        let author = match self.hs.call(reqwest::Method::GET, &path, None, None).await {
            Ok(event) => event["sender"].as_str().map(str::to_owned),
            Err(e) => {
                debug!(event_id = redacts, error = %e, "the redacted event's author is unknown");
                None
            }
        }?;
        (author != redactor).then(|| nick.to_owned())
    }

    fn is_ours(&self, user: &str) -> bool {
        user == self.bot || self.is_puppet(user)
    }

    /// The puppet of `jid`; `None` when the bot acts for everyone.
    pub fn puppet_of(&self, jid: &str) -> Result<Option<String>, DeliveryError> {
        let Some(config) = self.appservice() else { return Ok(None) };
        let id = format!("@{}{}:{}", config.user_prefix, puppet_localpart(jid), config.server_name);
        if id.len() > 255 {
            return Err(DeliveryError::Rejected(format!("{jid} is too long to be a Matrix user")));
        }
        Ok(Some(id))
    }

    /// Whether `chat_id` is a configured portal room.
    pub fn is_portal(&self, chat_id: &str) -> bool {
        self.portals.iter().any(|p| p.room == chat_id)
    }

    /// A file of the homeserver's media repository, downloaded as the bot (for the media
    /// proxy, when no linked account can); the status to answer with when it cannot be had.
    pub async fn download_media(&self, server: &str, media_id: &str) -> Result<Vec<u8>, StatusCode> {
        let http = self.hs.http.as_ref().map_err(|_| StatusCode::SERVICE_UNAVAILABLE)?;
        let token = self.hs.token.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if token.is_empty() {
            return Err(StatusCode::SERVICE_UNAVAILABLE);
        }
        let base = self.hs.base.trim_end_matches('/');
        // Authenticated media first, then the older endpoint of homeservers without it.
        let mut status = StatusCode::BAD_GATEWAY;
        for path in ["/_matrix/client/v1/media/download", "/_matrix/media/v3/download"] {
            let url = format!("{base}{path}/{}/{}", enc(server), enc(media_id));
            let response = match http.get(&url).bearer_auth(&token).timeout(Duration::from_secs(600)).send().await {
                Ok(r) => r,
                Err(e) => {
                    debug!(server, media_id, error = %e, "portal media download failed");
                    continue;
                }
            };
            match response.status().as_u16() {
                200 => {
                    return response.bytes().await.map(|b| b.to_vec()).map_err(|_| StatusCode::BAD_GATEWAY);
                }
                404 => status = StatusCode::NOT_FOUND,
                code => debug!(server, media_id, code, "the homeserver refused a portal media download"),
            }
        }
        Err(status)
    }

    /// Start the transaction server (or, for a bot account, its login and sync) and
    /// bring the bot into every portal room.
    pub async fn start(self: &Arc<Self>) {
        let data_dir = match &self.acting {
            Acting::Appservice(_) => None,
            Acting::Bot { data_dir, .. } => Some(data_dir.clone()),
        };
        if let Some(data_dir) = data_dir {
            let span = info_span!("matrix_portal_bot", network = %self.network, bot = %self.bot);
            let task = tokio::spawn(bot_loop(Arc::downgrade(self), data_dir).instrument(span));
            *self.server.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
            return;
        }
        self.listen();
        self.ready_all().await;
    }

    async fn ready_all(&self) {
        for p in &self.portals {
            match self.ready_room(&p.room).await {
                Ok(room_id) => info!(portal = %p.name, room = %p.room, %room_id, "Matrix portal room ready"),
                Err(e) => warn!(portal = %p.name, room = %p.room, error = %e, "Matrix portal room not ready yet"),
            }
        }
    }

    fn listen(self: &Arc<Self>) {
        let mut server = self.server.lock().unwrap_or_else(|e| e.into_inner());
        if server.is_some() {
            return;
        }
        let Some(config) = self.appservice() else { return };
        let listen = &config.listen;
        let bound = (|| -> Result<TcpListener, String> {
            let addr: SocketAddr = listen.parse().map_err(|_| format!("`{listen}` is not IP:PORT"))?;
            let l = std::net::TcpListener::bind(addr).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
            l.set_nonblocking(true).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
            TcpListener::from_std(l).map_err(|e| format!("cannot listen on {addr}: {e}"))
        })();
        match bound {
            Ok(listener) => {
                info!(network = %self.network, listen = %listen, bot = %self.bot, "Matrix application service listening");
                let span = info_span!("matrix_appservice", network = %self.network);
                *server = Some(tokio::spawn(serve(listener, Arc::downgrade(self)).instrument(span)));
            }
            Err(e) => tracing::error!(
                network = %self.network,
                error = %e,
                "the Matrix application service is not running: nothing from the portal rooms reaches XMPP"
            ),
        }
    }
}

/// `m` as the bot says it for `nick`: `<nick> text` (`/me` actions: `nick text`).
fn spoken_by(nick: &str, m: &Message) -> Message {
    let prefix = if m.action { format!("{nick} ") } else { format!("<{nick}> ") };
    let mut out = m.clone();
    out.body = format!("{prefix}{}", m.body);
    if let Some(f) = &mut out.formatted
        && f.format == isthmus_core::model::TextFormat::Html
    {
        let mut html = String::new();
        html_escape::encode_text_to_string(&prefix, &mut html);
        f.text = format!("{html}{}", f.text);
    }
    out
}

/// Write `bytes` to `path`, readable by the owner only.
fn write_private(path: &std::path::Path, bytes: &[u8]) -> Result<(), String> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    std::io::Write::write_all(&mut file, bytes).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// The portal bot's life: log in (retrying), bring the bot into the portal rooms,
/// then sync for as long as the portals exist, storing each resume point once its
/// events are taken in.
async fn bot_loop(portals: Weak<Portals>, data_dir: PathBuf) {
    let sync_file = data_dir.join(BOT_SYNC_FILE);
    let mut since = std::fs::read_to_string(&sync_file).ok().map(|s| s.trim().to_owned()).filter(|s| !s.is_empty());
    let mut backoff = Duration::from_secs(1);
    let mut logged_in = false;
    loop {
        let Some(p) = portals.upgrade() else { return };
        let Acting::Bot { config, .. } = &p.acting else { return };
        if !logged_in {
            match p.bot_login(config, &data_dir).await {
                Ok(()) => {
                    logged_in = true;
                    backoff = Duration::from_secs(1);
                    p.ready_all().await;
                }
                Err(e) => {
                    warn!(error = %e, "the portal bot cannot log in: retrying");
                    drop(p);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(60));
                    continue;
                }
            }
        }
        match p.bot_sync(since.as_deref()).await {
            Ok(Some(next)) => {
                if let Err(e) = write_private(&sync_file, next.as_bytes()) {
                    warn!(error = %e, "cannot store the portal bot's sync point");
                }
                since = Some(next);
                backoff = Duration::from_secs(1);
            }
            Ok(None) => return, // shutting down
            Err(e) => {
                if matches!(e, HsError::Refused { status: 401, .. }) {
                    logged_in = false;
                }
                warn!(error = %e, "the portal bot's sync failed: retrying");
                drop(p);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(60));
            }
        }
    }
}

#[cfg(test)]
mod tests;
