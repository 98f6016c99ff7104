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

// --- names ---------------------------------------------------------------------------

/// The localpart (after the prefix) of the puppet of `jid`: lower-case letters,
/// digits, `.` and `-` stay; `_` becomes `__`, a capital `_` and its lower-case
/// letter, any other byte `=` and two lower-case hex digits (`@` is `=40`).
pub fn puppet_localpart(jid: &str) -> String {
    let mut out = String::with_capacity(jid.len() + 8);
    for b in jid.bytes() {
        match b {
            b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' => out.push(b as char),
            b'_' => out.push_str("__"),
            b'A'..=b'Z' => {
                out.push('_');
                out.push(b.to_ascii_lowercase() as char);
            }
            _ => out.push_str(&format!("={b:02x}")),
        }
    }
    out
}

/// The JID a [`puppet_localpart`] stands for; `None` when it is not one.
pub fn jid_of_localpart(local: &str) -> Option<String> {
    let mut bytes = Vec::with_capacity(local.len());
    let mut it = local.bytes();
    while let Some(b) = it.next() {
        match b {
            b'_' => match it.next()? {
                b'_' => bytes.push(b'_'),
                c @ b'a'..=b'z' => bytes.push(c.to_ascii_uppercase()),
                _ => return None,
            },
            b'=' => {
                let hex = [it.next()?, it.next()?];
                let s = std::str::from_utf8(&hex).ok()?;
                bytes.push(u8::from_str_radix(s, 16).ok()?);
            }
            b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' => bytes.push(b),
            _ => return None,
        }
    }
    String::from_utf8(bytes).ok()
}

/// `s` with the characters regular expressions give a meaning escaped.
fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 4);
    for c in s.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The exclusive user namespace of the application service: `^@PREFIX.*:SERVER$`.
pub fn user_namespace_regex(config: &MatrixAppserviceConfig) -> String {
    format!("^@{}.*:{}$", regex_escape(&config.user_prefix), regex_escape(&config.server_name))
}

/// The registration file (YAML) the homeserver loads for the application service
/// `id` (Synapse: listed in `app_service_config_files`).
pub fn registration_yaml(id: &str, config: &MatrixAppserviceConfig) -> String {
    // A JSON string is a YAML double-quoted scalar with the same value.
    let q = |s: &str| Value::from(s).to_string();
    let url = config.url.clone().unwrap_or_else(|| format!("http://{}", config.listen));
    format!(
        "# Isthmus application service for portal rooms ({name}).\n\
         # List this file in the homeserver's `app_service_config_files` and restart it.\n\
         id: {id}\n\
         url: {url}\n\
         as_token: {as_token}\n\
         hs_token: {hs_token}\n\
         sender_localpart: {sender}\n\
         rate_limited: false\n\
         receive_ephemeral: true\n\
         namespaces:\n\
         \x20 users:\n\
         \x20   - exclusive: true\n\
         \x20     regex: {users}\n\
         \x20 aliases: []\n\
         \x20 rooms: []\n",
        name = id.replace(|c: char| c.is_control(), " "),
        id = q(id),
        url = q(&url),
        as_token = q(config.as_token.expose()),
        hs_token = q(config.hs_token.expose()),
        sender = q(&config.sender_localpart),
        users = q(&user_namespace_regex(config)),
    )
}

// --- the transaction API (homeserver → gateway) ---------------------------------------

/// What a request to the application service's HTTP server asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `PUT /_matrix/app/v1/transactions/{txnId}`
    Transaction(String),
    /// `GET /_matrix/app/v1/users/{userId}`
    User(String),
    /// `GET /_matrix/app/v1/rooms/{roomAlias}`
    Room(String),
    /// `POST /_matrix/app/v1/ping`
    Ping,
    Unknown,
}

/// Percent-decode one path segment or query value.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Percent-encode everything but unreserved characters (for paths and query values).
fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => out.push(b as char),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Which endpoint `method path` is (the legacy paths without `/_matrix/app/v1` too).
pub fn route(method: &Method, path: &str) -> Route {
    let rest = path.strip_prefix("/_matrix/app/v1").unwrap_or(path);
    let segments: Vec<&str> = rest.trim_start_matches('/').split('/').collect();
    let one = |s: &str| percent_decode(s).filter(|s| !s.is_empty());
    match (method, segments.as_slice()) {
        (&Method::PUT, ["transactions", txn]) => one(txn).map_or(Route::Unknown, Route::Transaction),
        (&Method::GET, ["users", user]) => one(user).map_or(Route::Unknown, Route::User),
        (&Method::GET, ["rooms", alias]) => one(alias).map_or(Route::Unknown, Route::Room),
        (&Method::POST, ["ping"]) => Route::Ping,
        _ => Route::Unknown,
    }
}

/// Whether the request carries the homeserver's token (`Authorization: Bearer`, or
/// the older `?access_token=`): `Err(401)` without a token, `Err(403)` with another one.
pub fn authorize(headers: &HeaderMap, query: Option<&str>, hs_token: &str) -> Result<(), StatusCode> {
    let from_header = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").map(|t| t.trim().to_owned()));
    let from_query = || {
        query?.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            (k == "access_token").then(|| percent_decode(v)).flatten()
        })
    };
    let Some(token) = from_header.or_else(from_query) else { return Err(StatusCode::UNAUTHORIZED) };
    if constant_time_eq(token.as_bytes(), hs_token.as_bytes()) { Ok(()) } else { Err(StatusCode::FORBIDDEN) }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The content of one transaction.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Transaction {
    /// Timeline events (room events and state), in order.
    pub events: Vec<Value>,
    /// Typing notifications and receipts (`receive_ephemeral`).
    pub ephemeral: Vec<Value>,
}

/// Read a transaction body.
pub fn parse_transaction(body: &[u8]) -> Result<Transaction, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    let Value::Object(o) = v else { return Err("not a JSON object".into()) };
    let list = |key: &str| -> Result<Vec<Value>, String> {
        match o.get(key) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(a)) => Ok(a.iter().filter(|e| e.is_object()).cloned().collect()),
            Some(_) => Err(format!("`{key}` is not an array")),
        }
    };
    let events = list("events")?;
    let mut ephemeral = list("ephemeral")?;
    if ephemeral.is_empty() {
        ephemeral = list("de.sorunome.msc2409.ephemeral")?;
    }
    Ok(Transaction { events, ephemeral })
}

/// The ids of the last transactions processed, to process a retried one once.
#[derive(Debug, Default)]
pub struct SeenTransactions {
    order: VecDeque<String>,
    set: HashSet<String>,
}

impl SeenTransactions {
    pub fn contains(&self, id: &str) -> bool {
        self.set.contains(id)
    }
    pub fn insert(&mut self, id: &str) {
        if self.set.insert(id.to_owned()) {
            self.order.push_back(id.to_owned());
            while self.order.len() > REMEMBERED_TRANSACTIONS {
                if let Some(old) = self.order.pop_front() {
                    self.set.remove(&old);
                }
            }
        }
    }
}

// --- room state --------------------------------------------------------------------

/// Who may do what in a room, from its `m.room.create` and `m.room.power_levels`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Powers {
    users: HashMap<String, i64>,
    default: i64,
    /// Room version 12 and later: the creators outrank everyone.
    creators: HashSet<String>,
}

impl Powers {
    /// From a room's state events (as `GET /rooms/{roomId}/state` gives them).
    pub fn from_state(state: &[Value]) -> Powers {
        let find = |t: &str| state.iter().find(|e| e["type"] == t && e["state_key"] == "");
        let mut p = Powers::default();
        let create = find("m.room.create");
        let creator =
            create.and_then(|c| c["content"]["creator"].as_str().or_else(|| c["sender"].as_str()).map(str::to_owned));
        if let Some(c) = create {
            let version = c["content"]["room_version"].as_str().unwrap_or("1");
            let privileged =
                version.parse::<u32>().map(|v| v >= 12).unwrap_or(false) || version.starts_with("org.matrix.hydra");
            if privileged {
                p.creators.extend(c["sender"].as_str().map(str::to_owned));
                if let Some(more) = c["content"]["additional_creators"].as_array() {
                    p.creators.extend(more.iter().filter_map(Value::as_str).map(str::to_owned));
                }
            }
        }
        match find("m.room.power_levels") {
            Some(pl) => {
                let levels = UserLevels::from_content(&pl["content"]);
                p.default = levels.users_default;
                p.users = levels.users.into_iter().collect();
            }
            // Without power levels the creator may do everything.
            None => p.users.extend(creator.map(|c| (c, 100))),
        }
        p
    }

    pub fn level(&self, user: &str) -> i64 {
        if self.creators.contains(user) {
            return i64::MAX;
        }
        self.users.get(user).copied().unwrap_or(self.default)
    }

    /// A member's MUC role and affiliation: 50 and above moderate, 100 own.
    pub fn occupant(&self, user: &str, nick: String) -> Occupant {
        crate::session::occupant_at_level(user, nick, self.level(user))
    }
}

/// Joined members (user id → display name) in a room's state events.
pub fn joined_members(state: &[Value]) -> HashMap<String, Option<String>> {
    state
        .iter()
        .filter(|e| e["type"] == "m.room.member" && e["content"]["membership"] == "join")
        .filter_map(|e| {
            let user = e["state_key"].as_str()?;
            Some((user.to_owned(), e["content"]["displayname"].as_str().map(str::to_owned)))
        })
        .collect()
}

/// A room's topic in its state events.
pub fn topic_of(state: &[Value]) -> Option<String> {
    state
        .iter()
        .find(|e| e["type"] == "m.room.topic" && e["state_key"] == "")
        .and_then(|e| e["content"]["topic"].as_str())
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
}

/// The MUC nick of `user` among `members`: the display name (the localpart without
/// one), with the user id added when another member has the same display name.
pub fn nick_in(members: &HashMap<String, Option<String>>, user: &str) -> String {
    let Some(known) = members.get(user) else { return user.to_owned() };
    match known.as_deref().map(str::trim).filter(|d| !d.is_empty()) {
        Some(name) => {
            let ambiguous = members.iter().any(|(u, d)| u != user && d.as_deref().map(str::trim) == Some(name));
            if ambiguous { format!("{name} ({user})") } else { name.to_owned() }
        }
        None => user.strip_prefix('@').and_then(|u| u.split(':').next()).unwrap_or(user).to_owned(),
    }
}

// --- the homeserver's client-server API, as the application service -------------------

#[derive(Debug)]
enum HsError {
    /// The homeserver answered with an error.
    Refused { status: u16, errcode: String, error: String },
    /// No answer.
    Unreachable(String),
}

impl HsError {
    fn errcode(&self) -> Option<&str> {
        match self {
            HsError::Refused { errcode, .. } => Some(errcode),
            HsError::Unreachable(_) => None,
        }
    }

    fn delivery(self, what: &str) -> DeliveryError {
        match self {
            HsError::Unreachable(e) => {
                DeliveryError::Unavailable(format!("{what}: the Matrix homeserver cannot be reached: {e}"))
            }
            HsError::Refused { status, errcode, error } => {
                let text = format!("{what}: the Matrix homeserver refused it ({errcode}: {error})");
                match status {
                    429 | 500.. => DeliveryError::Unavailable(text),
                    403 => DeliveryError::Forbidden(text),
                    _ => DeliveryError::Rejected(text),
                }
            }
        }
    }
}

impl std::fmt::Display for HsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HsError::Refused { status, errcode, error } => write!(f, "HTTP {status} {errcode}: {error}"),
            HsError::Unreachable(e) => write!(f, "no answer: {e}"),
        }
    }
}

struct Homeserver {
    base: String,
    /// The application service's token, or the bot's access token once logged in.
    token: StdMutex<String>,
    http: Result<reqwest::Client, String>,
}

impl Homeserver {
    /// Call `path` (with its query, if any) as the bot, or as `as_user` (identity assertion).
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        as_user: Option<&str>,
        body: Option<&Value>,
    ) -> Result<Value, HsError> {
        let body = body.map(|b| (b.to_string().into_bytes(), "application/json".to_owned()));
        self.call_raw(method, path, as_user, body, Duration::from_secs(60)).await
    }

    async fn call_raw(
        &self,
        method: reqwest::Method,
        path: &str,
        as_user: Option<&str>,
        body: Option<(Vec<u8>, String)>,
        timeout: Duration,
    ) -> Result<Value, HsError> {
        let http = self.http.as_ref().map_err(|e| HsError::Unreachable(format!("no HTTP client: {e}")))?;
        let mut url = format!("{}{path}", self.base.trim_end_matches('/'));
        if let Some(user) = as_user {
            url.push(if path.contains('?') { '&' } else { '?' });
            url.push_str(&format!("user_id={}", enc(user)));
        }
        let token = self.token.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut request = http.request(method.clone(), &url).timeout(timeout);
        if !token.is_empty() {
            request = request.bearer_auth(token);
        }
        if let Some((bytes, content_type)) = body {
            request = request.header(reqwest::header::CONTENT_TYPE, content_type).body(bytes);
        }
        let response = request.send().await.map_err(|e| HsError::Unreachable(e.to_string()))?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(|e| HsError::Unreachable(e.to_string()))?;
        let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if !status.is_success() {
            let field = |k: &str| value.get(k).and_then(Value::as_str).unwrap_or_default().to_owned();
            let errcode = Some(field("errcode")).filter(|c| !c.is_empty()).unwrap_or_else(|| "M_UNKNOWN".into());
            let error = field("error");
            debug!(%method, path, status = status.as_u16(), %errcode, %error, "homeserver refused a request");
            return Err(HsError::Refused { status: status.as_u16(), errcode, error });
        }
        Ok(value)
    }
}

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

    /// The room id of a portal room, once the bot is in it (resolving, joining and
    /// loading its members first if needed).
    async fn ready_room(&self, chat_id: &str) -> Result<String, DeliveryError> {
        if let Some(id) = self.state().ready.get(chat_id) {
            return Ok(id.clone());
        }
        let _one = self.setup.lock().await;
        if let Some(id) = self.state().ready.get(chat_id) {
            return Ok(id.clone());
        }
        let room_id = if chat_id.starts_with('#') {
            let r = self
                .hs
                .call(reqwest::Method::GET, &format!("/_matrix/client/v3/directory/room/{}", enc(chat_id)), None, None)
                .await
                .map_err(|e| e.delivery(&format!("the portal room {chat_id} cannot be found")))?;
            r["room_id"]
                .as_str()
                .ok_or_else(|| DeliveryError::Unavailable(format!("the homeserver gave no room id for {chat_id}")))?
                .to_owned()
        } else {
            chat_id.to_owned()
        };
        self.state().chat_of.insert(room_id.clone(), chat_id.to_owned());
        // Joining again when already in is harmless; it also accepts an invitation.
        let path = format!("/_matrix/client/v3/join/{}", enc(chat_id));
        self.hs.call(reqwest::Method::POST, &path, None, Some(&json!({}))).await.map_err(|e| {
            e.delivery(&format!(
                "the gateway's Matrix user {} cannot join the portal room {chat_id} (invite it, or make the room public)",
                self.bot
            ))
        })?;
        let state = self.room_state(&room_id).await?;
        let mut st = self.state();
        st.members.insert(room_id.clone(), joined_members(&state));
        st.ready.insert(chat_id.to_owned(), room_id.clone());
        Ok(room_id)
    }

    async fn room_state(&self, room_id: &str) -> Result<Vec<Value>, DeliveryError> {
        let path = format!("/_matrix/client/v3/rooms/{}/state", enc(room_id));
        let v = self
            .hs
            .call(reqwest::Method::GET, &path, None, None)
            .await
            .map_err(|e| e.delivery(&format!("cannot read the state of the Matrix room {room_id}")))?;
        Ok(v.as_array().cloned().unwrap_or_default())
    }

    /// Make sure the puppet exists; a new one gets `nick` as its global display name.
    async fn ensure_registered(&self, puppet: &str, nick: &str) -> Result<(), DeliveryError> {
        if self.state().registered.contains(puppet) {
            return Ok(());
        }
        let local = puppet.strip_prefix('@').and_then(|p| p.split(':').next()).unwrap_or_default();
        let body = json!({"type": "m.login.application_service", "username": local, "inhibit_login": true});
        let fresh = match self.hs.call(reqwest::Method::POST, "/_matrix/client/v3/register", None, Some(&body)).await {
            Ok(_) => true,
            Err(e) if e.errcode() == Some("M_USER_IN_USE") => false,
            Err(e) => return Err(e.delivery(&format!("cannot create the Matrix user {puppet}"))),
        };
        if fresh {
            info!(puppet, "Matrix puppet registered");
            let path = format!("/_matrix/client/v3/profile/{}/displayname", enc(puppet));
            let body = json!({"displayname": nick});
            if let Err(e) = self.hs.call(reqwest::Method::PUT, &path, Some(puppet), Some(&body)).await {
                warn!(puppet, error = %e, "cannot set the puppet's display name");
            }
        }
        self.state().registered.insert(puppet.to_owned());
        Ok(())
    }

    /// Bring the puppet into the room with `nick` as its display name there.
    async fn join_puppet(&self, room_id: &str, puppet: &str, nick: &str) -> Result<(), DeliveryError> {
        let known = self.state().members.get(room_id).and_then(|m| m.get(puppet).cloned());
        let member_path = format!("/_matrix/client/v3/rooms/{}/state/m.room.member/{}", enc(room_id), enc(puppet));
        let rename = json!({"membership": "join", "displayname": nick});
        match known {
            Some(Some(name)) if name == nick => return Ok(()),
            Some(_) => {
                self.hs
                    .call(reqwest::Method::PUT, &member_path, Some(puppet), Some(&rename))
                    .await
                    .map_err(|e| e.delivery(&format!("cannot set {puppet}'s name in {room_id}")))?;
            }
            None => {
                let join = format!("/_matrix/client/v3/rooms/{}/join", enc(room_id));
                // Synapse takes the display name from the join; others get it set just after.
                let body = json!({"displayname": nick});
                let what = format!("{puppet} cannot join the Matrix room {room_id}");
                match self.hs.call(reqwest::Method::POST, &join, Some(puppet), Some(&body)).await {
                    Ok(_) => {}
                    Err(HsError::Refused { status: 403, .. }) => {
                        // Not a public room: the bot invites the puppet.
                        let invite = format!("/_matrix/client/v3/rooms/{}/invite", enc(room_id));
                        self.hs
                            .call(reqwest::Method::POST, &invite, None, Some(&json!({"user_id": puppet})))
                            .await
                            .map_err(|e| e.delivery(&format!("{} cannot invite {puppet}", self.bot)))?;
                        self.hs
                            .call(reqwest::Method::POST, &join, Some(puppet), Some(&body))
                            .await
                            .map_err(|e| e.delivery(&what))?;
                    }
                    Err(e) => return Err(e.delivery(&what)),
                }
                let member = self.hs.call(reqwest::Method::GET, &member_path, None, None).await;
                let name = member.ok().and_then(|m| m["displayname"].as_str().map(str::to_owned));
                if name.as_deref() != Some(nick) {
                    self.hs
                        .call(reqwest::Method::PUT, &member_path, Some(puppet), Some(&rename))
                        .await
                        .map_err(|e| e.delivery(&format!("cannot set {puppet}'s name in {room_id}")))?;
                }
                info!(puppet, room = room_id, nick, "Matrix puppet joined a portal room");
            }
        }
        self.state().members.entry(room_id.to_owned()).or_default().insert(puppet.to_owned(), Some(nick.to_owned()));
        Ok(())
    }

    /// An XMPP user enters the portal: their puppet joins, and XMPP learns who is there.
    async fn enter(&self, chat: &ChatRef, room_id: &str, jid: &str, nick: &str) -> Result<(), DeliveryError> {
        if let Some(puppet) = self.puppet_of(jid)? {
            self.ensure_registered(&puppet, nick).await?;
            self.join_puppet(room_id, &puppet, nick).await?;
        }
        let state = self.room_state(room_id).await?;
        let powers = Powers::from_state(&state);
        let members = joined_members(&state);
        let mut occupants: Vec<Occupant> =
            members.keys().filter(|u| !self.is_ours(u)).map(|u| powers.occupant(u, nick_in(&members, u))).collect();
        occupants.sort_by(|a, b| a.nick.cmp(&b.nick));
        self.state().members.insert(room_id.to_owned(), members);
        let event = Event::new(
            self.network.clone(),
            chat.clone(),
            Sender::own(jid, nick),
            EventKind::SelfJoined { nick: nick.to_owned(), occupants, topic: topic_of(&state) },
        );
        self.sink.emit(event).await.map_err(|e| DeliveryError::Unavailable(e.to_string()))
    }

    /// Whether `user` is in the room, as far as the gateway knows.
    fn joined(&self, room_id: &str, user: &str) -> bool {
        self.state().members.get(room_id).is_some_and(|m| m.contains_key(user))
    }

    /// The puppet is in the room (joining it with `nick` when it is not).
    async fn ensure_in(&self, room_id: &str, puppet: &str, nick: &str) -> Result<(), DeliveryError> {
        if self.joined(room_id, puppet) {
            return Ok(());
        }
        self.ensure_registered(puppet, nick).await?;
        self.join_puppet(room_id, puppet, nick).await
    }

    async fn send(
        &self,
        room_id: &str,
        puppet: Option<&str>,
        kind: &str,
        content: &Value,
        txn: &str,
    ) -> Result<String, DeliveryError> {
        let path = format!("/_matrix/client/v3/rooms/{}/send/{}/{}", enc(room_id), enc(kind), enc(txn));
        let r = self
            .hs
            .call(reqwest::Method::PUT, &path, puppet, Some(content))
            .await
            .map_err(|e| e.delivery("the Matrix room did not take the message"))?;
        r["event_id"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| DeliveryError::Unavailable("the homeserver gave no event id".into()))
    }

    async fn redact(
        &self,
        room_id: &str,
        puppet: Option<&str>,
        target: &str,
        reason: Option<&str>,
        txn: &str,
    ) -> Result<String, DeliveryError> {
        if !target.starts_with('$') {
            return Err(DeliveryError::Rejected(format!("`{target}` is no Matrix event: nothing to retract")));
        }
        let path = format!("/_matrix/client/v3/rooms/{}/redact/{}/{}", enc(room_id), enc(target), enc(txn));
        let body = match reason {
            Some(r) => json!({"reason": r}),
            None => json!({}),
        };
        let r = self
            .hs
            .call(reqwest::Method::PUT, &path, puppet, Some(&body))
            .await
            .map_err(|e| e.delivery("the Matrix room did not take the retraction"))?;
        Ok(r["event_id"].as_str().unwrap_or_default().to_owned())
    }

    /// Fetch an attachment and upload it to the homeserver as the puppet (or the bot).
    async fn upload(&self, puppet: Option<&str>, a: &Attachment) -> Result<UploadedFile, DeliveryError> {
        let refused =
            |why: String| DeliveryError::Rejected(format!("the file {} cannot be sent to Matrix: {why}", a.url));
        let (bytes, served) = self.fetcher.fetch(&a.url, crate::media::MAX_FILE_BYTES).await.map_err(refused)?;
        let name = crate::media::attachment_name(a);
        let mime = crate::media::choose_mime(a.mime.as_deref(), served.as_deref(), &name);
        let size = bytes.len() as u64;
        let path = format!("/_matrix/media/v3/upload?filename={}", enc(&name));
        let body = Some((bytes, mime.essence_str().to_owned()));
        let r = self
            .hs
            .call_raw(reqwest::Method::POST, &path, puppet, body, Duration::from_secs(600))
            .await
            .map_err(|e| e.delivery(&format!("cannot upload {}", a.url)))?;
        let url = r["content_uri"]
            .as_str()
            .ok_or_else(|| DeliveryError::Unavailable("the homeserver gave no content_uri for the upload".into()))?;
        Ok(UploadedFile { url: url.to_owned(), name, mime: mime.essence_str().to_owned(), size, encrypted: None })
    }

    /// Send `m`; `speaker` is the nick that prefixes what the bot says for someone.
    async fn send_message(
        &self,
        room_id: &str,
        puppet: Option<&str>,
        m: &Message,
        speaker: Option<&str>,
        txn: &str,
        stored: Option<&Receipt>,
    ) -> Result<Vec<String>, DeliveryError> {
        let ctx = outgoing::Sending { id: txn, stored };
        let spoken;
        let m = match speaker {
            Some(nick) => {
                spoken = spoken_by(nick, m);
                &spoken
            }
            None => m,
        };
        if m.attachments.is_empty() {
            let content = outgoing::message_content_bounded(m, ctx).await?;
            return Ok(vec![self.send(room_id, puppet, "m.room.message", &content, txn).await?]);
        }
        let mut files = Vec::with_capacity(m.attachments.len());
        for a in &m.attachments {
            files.push(self.upload(puppet, a).await?);
        }
        let mut ids = Vec::with_capacity(files.len() + 1);
        if let Some(text) = outgoing::text_beside_files(m) {
            let content = outgoing::message_content_bounded(&text, ctx).await?;
            ids.push(self.send(room_id, puppet, "m.room.message", &content, txn).await?);
        }
        for (i, file) in files.iter().enumerate() {
            let mut content = outgoing::file_content(m, file);
            if let Some(nick) = speaker {
                // The file's caption says whose it is.
                content["body"] = json!(format!("<{nick}> {}", file.name));
            }
            ids.push(self.send(room_id, puppet, "m.room.message", &content, &format!("{txn}-file{i}")).await?);
        }
        Ok(ids)
    }

    /// The puppet's reactions on `target`, read from the homeserver when none are known
    /// (after a restart).
    async fn reactions_of(&self, room_id: &str, target: &str, puppet: &str) -> Vec<(String, String)> {
        let have = self.state().reactions.of(room_id, target, puppet);
        if !have.is_empty() {
            return have;
        }
        let path = format!(
            "/_matrix/client/v1/rooms/{}/relations/{}/m.annotation/m.reaction?limit=100",
            enc(room_id),
            enc(target)
        );
        if let Ok(r) = self.hs.call(reqwest::Method::GET, &path, Some(puppet), None).await {
            let mut st = self.state();
            for e in r["chunk"].as_array().into_iter().flatten().filter(|e| e["sender"] == puppet) {
                let key = e["content"]["m.relates_to"]["key"].as_str();
                if let (Some(key), Some(id)) = (key, e["event_id"].as_str()) {
                    st.reactions.add(room_id, target, puppet, key, id);
                }
            }
        }
        self.state().reactions.of(room_id, target, puppet)
    }

    /// Make the puppet's reactions on `target` exactly `emojis`.
    async fn set_reactions(
        &self,
        room_id: &str,
        puppet: &str,
        target: &str,
        emojis: &[String],
        txn: &str,
    ) -> Result<Vec<String>, DeliveryError> {
        if !target.starts_with('$') {
            return Err(DeliveryError::Rejected("the message reacted to is not known on Matrix".into()));
        }
        let have = self.reactions_of(room_id, target, puppet).await;
        let mut ids = Vec::new();
        for (key, event_id) in &have {
            if !emojis.contains(key) {
                self.redact(room_id, Some(puppet), event_id, None, &format!("{txn}-{event_id}")).await?;
                self.state().reactions.remove(event_id);
            }
        }
        for key in emojis {
            if !have.iter().any(|(k, _)| k == key) {
                let content = outgoing::reaction_content(target, key);
                let event_id =
                    self.send(room_id, Some(puppet), "m.reaction", &content, &format!("{txn}-{key}")).await?;
                self.state().reactions.add(room_id, target, puppet, key, &event_id);
                ids.push(event_id);
            }
        }
        Ok(ids)
    }

    /// Render an XMPP user's event in a portal room, as their puppet.
    pub async fn deliver(&self, event: Event) -> Result<Delivered, DeliveryError> {
        let chat_id = event.chat.id.as_str();
        if !self.is_portal(chat_id) {
            let known: Vec<&str> = self.portals.iter().map(|p| p.room.as_str()).collect();
            return Err(DeliveryError::Rejected(format!(
                "`{chat_id}` is not a portal room of this gateway (portal rooms: {})",
                if known.is_empty() { "none".to_owned() } else { known.join(", ") }
            )));
        }
        if !event.origin.is_xmpp() {
            // Someone from another network in the portal (a Telegram person): no
            // Matrix user of their own, the bot says it for them.
            let room_id = self.ready_room(chat_id).await?;
            let txn = transaction_id(&event);
            debug!(portal = chat_id, origin = %event.origin, kind = event.kind.name(), "Matrix portal delivery by the bot for another network");
            let ids = self.deliver_as_bot(&event, &room_id, event.sender.id.as_str(), &txn).await?;
            if let Some(receipt) = &event.receipt {
                receipt.confirm().await;
            }
            return Ok(Delivered::ids(ids));
        }
        let jid = BareJid::new(event.sender.id.as_str())
            .map_err(|e| DeliveryError::Rejected(format!("`{}` is not an XMPP address: {e}", event.sender.id)))?;
        let jid = jid.as_str();
        let puppet = self.puppet_of(jid)?;
        let room_id = self.ready_room(chat_id).await?;
        let nick = event.sender.nick.as_str();
        let txn = transaction_id(&event);
        let txn = txn.as_str();
        let room = room_id.as_str();
        let Some(puppet) = puppet else {
            debug!(portal = chat_id, bot = %self.bot, kind = event.kind.name(), "Matrix portal delivery by the bot");
            let ids = self.deliver_as_bot(&event, room, jid, txn).await?;
            if let Some(receipt) = &event.receipt {
                receipt.confirm().await;
            }
            return Ok(Delivered::ids(ids));
        };
        debug!(portal = chat_id, %puppet, kind = event.kind.name(), "Matrix portal delivery");
        let ids = match &event.kind {
            EventKind::JoinRequest { nick, .. } => {
                self.enter(&event.chat, room, jid, nick).await?;
                Vec::new()
            }
            EventKind::Message(m) => {
                self.ensure_in(room, &puppet, nick).await?;
                self.send_message(room, Some(&puppet), m, None, txn, event.receipt.as_ref()).await?
            }
            EventKind::Correction { target, message } => {
                self.ensure_in(room, &puppet, nick).await?;
                let ctx = outgoing::Sending { id: txn, stored: event.receipt.as_ref() };
                let content = outgoing::edit_content_bounded(&target.0, message, ctx).await?;
                vec![self.send(room, Some(&puppet), "m.room.message", &content, txn).await?]
            }
            EventKind::Retraction { target, reason, .. } => {
                vec![self.redact(room, Some(&puppet), &target.0, reason.as_deref(), txn).await?]
            }
            EventKind::Reactions { target, emojis } => {
                self.ensure_in(room, &puppet, nick).await?;
                self.set_reactions(room, &puppet, &target.0, emojis, txn).await?
            }
            EventKind::Typing(state) => {
                if self.joined(room, &puppet) {
                    let path = format!("/_matrix/client/v3/rooms/{}/typing/{}", enc(room), enc(&puppet));
                    let typing = *state == ChatState::Composing;
                    let body =
                        if typing { json!({"typing": true, "timeout": 30000}) } else { json!({"typing": false}) };
                    self.hs
                        .call(reqwest::Method::PUT, &path, Some(&puppet), Some(&body))
                        .await
                        .map_err(|e| e.delivery("typing notification"))?;
                }
                Vec::new()
            }
            EventKind::Displayed { target } if target.0.starts_with('$') && self.joined(room, &puppet) => {
                let path = format!("/_matrix/client/v3/rooms/{}/receipt/m.read/{}", enc(room), enc(&target.0));
                self.hs
                    .call(reqwest::Method::POST, &path, Some(&puppet), Some(&json!({})))
                    .await
                    .map_err(|e| e.delivery("read receipt"))?;
                Vec::new()
            }
            EventKind::Topic { text } => {
                let path = format!("/_matrix/client/v3/rooms/{}/state/m.room.topic/", enc(room));
                self.hs
                    .call(reqwest::Method::PUT, &path, Some(&puppet), Some(&json!({"topic": text})))
                    .await
                    .map_err(|e| e.delivery("the topic"))?;
                Vec::new()
            }
            EventKind::NickChanged { new_nick } => {
                if self.joined(room, &puppet) {
                    self.join_puppet(room, &puppet, new_nick).await?;
                }
                Vec::new()
            }
            EventKind::Left { .. } if event.sender.is_self => {
                let path = format!("/_matrix/client/v3/rooms/{}/leave", enc(room));
                match self.hs.call(reqwest::Method::POST, &path, Some(&puppet), Some(&json!({}))).await {
                    Ok(_) => info!(%puppet, room, "Matrix puppet left a portal room"),
                    // Not in the room (any more): what was asked is done.
                    Err(HsError::Refused { status: 403 | 404, .. }) => {}
                    Err(e) => return Err(e.delivery(&format!("{puppet} cannot leave {room}"))),
                }
                if let Some(m) = self.state().members.get_mut(room) {
                    m.remove(&puppet);
                }
                Vec::new()
            }
            _ => Vec::new(),
        };
        if let Some(receipt) = &event.receipt {
            receipt.confirm().await;
        }
        Ok(Delivered::ids(ids))
    }

    /// An XMPP user's event in a portal room where the bot speaks for everyone: messages
    /// and their corrections and retractions (the bot's own events), the topic; the rest
    /// has no Matrix form that would say whose it is.
    async fn deliver_as_bot(
        &self,
        event: &Event,
        room: &str,
        jid: &str,
        txn: &str,
    ) -> Result<Vec<String>, DeliveryError> {
        let nick = event.sender.nick.as_str();
        Ok(match &event.kind {
            EventKind::JoinRequest { nick, .. } => {
                self.enter(&event.chat, room, jid, nick).await?;
                Vec::new()
            }
            EventKind::Message(m) => self.send_message(room, None, m, Some(nick), txn, event.receipt.as_ref()).await?,
            EventKind::Correction { target, message } => {
                let ctx = outgoing::Sending { id: txn, stored: event.receipt.as_ref() };
                let content = outgoing::edit_content_bounded(&target.0, &spoken_by(nick, message), ctx).await?;
                vec![self.send(room, None, "m.room.message", &content, txn).await?]
            }
            EventKind::Retraction { target, reason, .. } => {
                vec![self.redact(room, None, &target.0, reason.as_deref(), txn).await?]
            }
            EventKind::Topic { text } => {
                let path = format!("/_matrix/client/v3/rooms/{}/state/m.room.topic/", enc(room));
                self.hs
                    .call(reqwest::Method::PUT, &path, None, Some(&json!({"topic": text})))
                    .await
                    .map_err(|e| e.delivery("the topic"))?;
                Vec::new()
            }
            _ => Vec::new(),
        })
    }

    // --- homeserver → XMPP ----------------------------------------------------------

    /// Process one transaction (once per id). `true` once what it carried is taken in
    /// for good by the router (the homeserver may then forget it); `false` when the
    /// gateway is shutting down (the homeserver is to send it again).
    pub async fn transaction(&self, id: &str, txn: Transaction) -> bool {
        let mut seen = self.transactions.lock().await;
        if seen.contains(id) {
            debug!(txn = id, "transaction already processed");
            return true;
        }
        debug!(txn = id, events = txn.events.len(), ephemeral = txn.ephemeral.len(), "transaction");
        if !self.process_batch(&txn.events, &txn.ephemeral).await {
            return false;
        }
        seen.insert(id);
        true
    }

    /// Hand the timeline events (each with its `room_id`) and then the ephemeral ones to
    /// the router; `true` once the timeline events are taken in for good.
    async fn process_batch(&self, events: &[Value], ephemeral: &[Value]) -> bool {
        for ev in events {
            self.timeline(ev).await;
        }
        let routed = std::mem::take(&mut *self.routed.lock().unwrap_or_else(|e| e.into_inner()));
        for r in routed {
            if !r.wait().await {
                return false;
            }
        }
        for ev in ephemeral {
            self.ephemeral(ev).await;
        }
        true
    }

    /// The bot's account: the stored access token when the homeserver still takes it,
    /// else a password login (whose token is stored).
    async fn bot_login(&self, config: &MatrixPortalBotConfig, data_dir: &std::path::Path) -> Result<(), String> {
        let token_file = data_dir.join(BOT_TOKEN_FILE);
        if let Ok(text) = std::fs::read_to_string(&token_file)
            && let Ok(stored) = serde_json::from_str::<Value>(&text)
            && stored["user_id"] == config.user_id.as_str()
            && let Some(token) = stored["access_token"].as_str()
        {
            *self.hs.token.lock().unwrap_or_else(|e| e.into_inner()) = token.to_owned();
            match self.hs.call(reqwest::Method::GET, "/_matrix/client/v3/account/whoami", None, None).await {
                Ok(_) => return Ok(()),
                Err(HsError::Refused { status: 401, .. }) => {
                    info!("the stored bot login is no longer valid: logging in")
                }
                Err(e) => return Err(format!("the homeserver does not answer: {e}")),
            }
        }
        self.hs.token.lock().unwrap_or_else(|e| e.into_inner()).clear();
        let body = json!({
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": config.user_id},
            "password": config.password.expose(),
            "initial_device_display_name": "Isthmus portal rooms",
        });
        let r = self
            .hs
            .call(reqwest::Method::POST, "/_matrix/client/v3/login", None, Some(&body))
            .await
            .map_err(|e| format!("the homeserver refused the bot's login as {}: {e}", config.user_id))?;
        let token = r["access_token"].as_str().ok_or("the homeserver's login answer has no access_token")?;
        *self.hs.token.lock().unwrap_or_else(|e| e.into_inner()) = token.to_owned();
        let stored = json!({"user_id": config.user_id, "device_id": r["device_id"], "access_token": token});
        write_private(&token_file, stored.to_string().as_bytes())?;
        info!(device = %r["device_id"], "the portal bot logged in");
        Ok(())
    }

    /// One sync of the bot from `since` (`None`: the first, whose history is not bridged);
    /// its `next_batch` once what it carried is taken in.
    async fn bot_sync(&self, since: Option<&str>) -> Result<Option<String>, HsError> {
        let path = match since {
            Some(since) => format!("/_matrix/client/v3/sync?timeout=30000&since={}", enc(since)),
            None => format!("/_matrix/client/v3/sync?filter={}", enc(r#"{"room":{"timeline":{"limit":1}}}"#)),
        };
        let r = self.hs.call_raw(reqwest::Method::GET, &path, None, None, Duration::from_secs(90)).await?;
        // Invitations to portal rooms are accepted.
        for room_id in
            r["rooms"]["invite"].as_object().map(|o| o.keys().cloned().collect::<Vec<_>>()).unwrap_or_default()
        {
            let chat_id = self.state().chat_of.get(&room_id).cloned();
            match chat_id {
                Some(chat_id) => {
                    info!(room = %room_id, "the portal bot was invited to a portal room");
                    self.state().ready.remove(&chat_id);
                    if let Err(e) = self.ready_room(&chat_id).await {
                        warn!(room = %room_id, error = %e, "cannot join the portal room");
                    }
                }
                None => debug!(room = %room_id, "invitation to a room that is no portal: ignored"),
            }
        }
        let with_room = |room_id: &str, events: &Value| -> Vec<Value> {
            events
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| {
                    let mut e = e.clone();
                    e["room_id"] = json!(room_id);
                    e
                })
                .collect()
        };
        let mut events = Vec::new();
        let mut ephemeral = Vec::new();
        if since.is_some() {
            for (room_id, room) in r["rooms"]["join"].as_object().into_iter().flatten() {
                if room["timeline"]["limited"] == true {
                    warn!(room = %room_id, "the sync skipped events of a portal room (too many at once)");
                }
                events.extend(with_room(room_id, &room["timeline"]["events"]));
                ephemeral.extend(with_room(room_id, &room["ephemeral"]["events"]));
            }
        }
        if !self.process_batch(&events, &ephemeral).await {
            return Ok(None);
        }
        Ok(r["next_batch"].as_str().map(str::to_owned))
    }

    fn chat(&self, chat_id: &str) -> ChatRef {
        ChatRef::room(self.network.clone(), chat_id)
    }

    /// Hand a timeline event to the router; the transaction carrying it is acknowledged
    /// once every such event is taken in for good.
    async fn emit(&self, event: Event) {
        if let Ok(routed) = self.sink.emit_routed(event).await {
            self.routed.lock().unwrap_or_else(|e| e.into_inner()).push(routed);
        }
    }

    async fn timeline(&self, ev: &Value) {
        let Some(room_id) = ev["room_id"].as_str() else { return };
        let chat_id = self.state().chat_of.get(room_id).cloned();
        // The bot invited to a portal room accepts.
        if ev["type"] == "m.room.member" && ev["state_key"] == self.bot.as_str() {
            if ev["content"]["membership"] == "invite" {
                match chat_id {
                    Some(chat_id) => {
                        info!(room = room_id, "the gateway's Matrix user was invited to a portal room");
                        self.state().ready.remove(&chat_id);
                        if let Err(e) = self.ready_room(&chat_id).await {
                            warn!(room = room_id, error = %e, "cannot join the portal room");
                        }
                    }
                    None => info!(room = room_id, "invitation to a room that is no portal: ignored"),
                }
            } else if ev["content"]["membership"] != "join"
                && let Some(chat_id) = &chat_id
            {
                warn!(room = room_id, "the gateway's Matrix user is no longer in a portal room");
                self.state().ready.remove(chat_id);
            }
            return;
        }
        let Some(chat_id) = chat_id else {
            debug!(room = room_id, "event of a room that is no portal");
            return;
        };
        let (env, mut incoming) = match incoming::parse_unstyled(ev) {
            Ok(x) => x,
            Err(e) => {
                warn!(room = room_id, error = %e, "Matrix event not bridged");
                return;
            }
        };
        incoming::style(&mut incoming, &env.event_id).await;
        incoming::fit_for_xmpp(&mut incoming, room_id, &env.event_id);
        let chat = self.chat(&chat_id);
        if let Incoming::Member { user, membership, previous, displayname, reason, .. } = incoming {
            self.member(&chat, room_id, &env, user, membership, previous, displayname, reason).await;
            return;
        }
        if let Incoming::PowerLevels { now, before } = &incoming {
            self.levels_changed(&chat, room_id, &env, now, before.as_ref()).await;
            return;
        }
        if self.is_ours(&env.sender) {
            // Our own puppets' reactions are kept to remove them later.
            match &incoming {
                Incoming::Reaction { target, key } => {
                    self.state().reactions.add(room_id, &target.0, &env.sender, key, &env.event_id);
                }
                Incoming::Redaction { redacts, .. } => {
                    self.state().reactions.remove(redacts);
                }
                _ => {}
            }
            return;
        }
        let nick = self.state().members.get(room_id).map(|m| nick_in(m, &env.sender)).unwrap_or(env.sender.clone());
        let sender = Sender::new(env.sender.clone(), nick);
        let kind = match incoming {
            Incoming::Message { message } => EventKind::Message(message),
            Incoming::Edit { target, message } => EventKind::Correction { target, message },
            Incoming::Reaction { target, key } => {
                let emojis = self.state().reactions.add(room_id, &target.0, &env.sender, &key, &env.event_id);
                EventKind::Reactions { target, emojis }
            }
            Incoming::Redaction { redacts, reason } => {
                let removed = self.state().reactions.remove(&redacts);
                match removed {
                    Some((target, reactor, emojis)) => {
                        if self.is_ours(&reactor) {
                            return;
                        }
                        let nick =
                            self.state().members.get(room_id).map(|m| nick_in(m, &reactor)).unwrap_or(reactor.clone());
                        let event = Event::new(
                            self.network.clone(),
                            chat,
                            Sender::new(reactor, nick),
                            EventKind::Reactions { target: MessageRef(target), emojis },
                        )
                        .with_origin_id(env.event_id.clone())
                        .at(env.time);
                        self.emit(event).await;
                        return;
                    }
                    None => {
                        let moderator = self.moderator_of(room_id, &redacts, &env.sender, &sender.nick).await;
                        EventKind::Retraction { target: MessageRef(redacts), moderator, reason }
                    }
                }
            }
            Incoming::Topic { text } => EventKind::Topic { text },
            Incoming::Member { .. } | Incoming::PowerLevels { .. } | Incoming::Other => return,
        };
        let kind = crate::media::proxied(&self.network, kind);
        let event = Event::new(self.network.clone(), chat, sender, kind).with_origin_id(env.event_id).at(env.time);
        self.emit(event).await;
    }

    /// The portal room's power levels changed: its Matrix members whose MUC role or
    /// affiliation follows a new level get a role change on XMPP.
    async fn levels_changed(
        &self,
        chat: &ChatRef,
        room_id: &str,
        env: &incoming::Envelope,
        now: &UserLevels,
        before: Option<&UserLevels>,
    ) {
        let members = self.state().members.get(room_id).cloned().unwrap_or_default();
        let others = members.keys().map(String::as_str).filter(|u| !self.is_ours(u));
        for (user, role, affiliation) in crate::session::role_changes(now, before, others) {
            let nick = nick_in(&members, &user);
            let event = Event::new(
                self.network.clone(),
                chat.clone(),
                Sender::new(user, nick),
                EventKind::RoleChanged { role, affiliation },
            )
            .with_origin_id(env.event_id.clone())
            .at(env.time);
            self.emit(event).await;
        }
    }

    /// A membership change: someone (not ours) entered, left or changed name; a puppet removed by someone.
    #[allow(clippy::too_many_arguments)]
    async fn member(
        &self,
        chat: &ChatRef,
        room_id: &str,
        env: &incoming::Envelope,
        user: String,
        membership: String,
        previous: Option<String>,
        displayname: Option<String>,
        reason: Option<String>,
    ) {
        let (was_in, old_nick, new_nick, actor_nick) = {
            let mut st = self.state();
            let members = st.members.entry(room_id.to_owned()).or_default();
            let was_in = previous.as_deref().map_or(members.contains_key(&user), |p| p == "join");
            let old_nick = nick_in(members, &user);
            let actor_nick = nick_in(members, &env.sender);
            if membership == "join" {
                members.insert(user.clone(), displayname);
            } else {
                members.remove(&user);
            }
            let new_nick = nick_in(members, &user);
            (was_in, old_nick, new_nick, actor_nick)
        };
        let removal = |by: Option<String>| match (membership.as_str(), by) {
            ("ban", by) => LeaveKind::Ban { by },
            (_, Some(by)) => LeaveKind::Kick { by: Some(by) },
            _ => LeaveKind::Part,
        };
        if self.is_ours(&user) {
            // A puppet removed by someone else: its XMPP user is out of the portal.
            if let Some(jid) = self.puppet_jid(&user)
                && env.sender != user
                && was_in
                && matches!(membership.as_str(), "leave" | "ban")
            {
                let kind = EventKind::Left { kind: removal(Some(actor_nick)), reason };
                let event = Event::new(self.network.clone(), chat.clone(), Sender::own(jid, old_nick), kind)
                    .with_origin_id(env.event_id.clone())
                    .at(env.time);
                self.emit(event).await;
            }
            return;
        }
        let (sender, kind) = match membership.as_str() {
            "join" if !was_in => {
                let occupant = Occupant {
                    id: RemoteId::new(user.clone()),
                    nick: new_nick.clone(),
                    role: Role::Participant,
                    affiliation: Affiliation::Member,
                };
                (Sender::new(user, new_nick), EventKind::Joined { occupant })
            }
            "join" if old_nick != new_nick => (Sender::new(user, old_nick), EventKind::NickChanged { new_nick }),
            "leave" | "ban" if was_in => {
                let by = (env.sender != user).then_some(actor_nick);
                (Sender::new(user, old_nick), EventKind::Left { kind: removal(by), reason })
            }
            _ => return,
        };
        let event = Event::new(self.network.clone(), chat.clone(), sender, kind)
            .with_origin_id(env.event_id.clone())
            .at(env.time);
        self.emit(event).await;
    }

    async fn ephemeral(&self, ev: &Value) {
        let Some(room_id) = ev["room_id"].as_str() else { return };
        let Some(chat_id) = self.state().chat_of.get(room_id).cloned() else { return };
        let chat = self.chat(&chat_id);
        let nick = |user: &str| self.state().members.get(room_id).map(|m| nick_in(m, user)).unwrap_or(user.to_owned());
        match ev["type"].as_str() {
            Some("m.typing") => {
                let now: HashSet<String> = ev["content"]["user_ids"]
                    .as_array()
                    .map(|a| {
                        a.iter().filter_map(Value::as_str).filter(|u| !self.is_ours(u)).map(str::to_owned).collect()
                    })
                    .unwrap_or_default();
                let before = self.state().typing.insert(room_id.to_owned(), now.clone()).unwrap_or_default();
                let changes: Vec<(String, ChatState)> = now
                    .difference(&before)
                    .map(|u| (u.clone(), ChatState::Composing))
                    .chain(before.difference(&now).map(|u| (u.clone(), ChatState::Paused)))
                    .collect();
                for (user, state) in changes {
                    let sender = Sender::new(user.clone(), nick(&user));
                    let event = Event::new(self.network.clone(), chat.clone(), sender, EventKind::Typing(state));
                    let _ = self.sink.emit(event).await;
                }
            }
            Some("m.receipt") => {
                let Some(content) = ev["content"].as_object() else { return };
                for (event_id, receipts) in content {
                    let Some(readers) = receipts.get("m.read").and_then(Value::as_object) else { continue };
                    for user in readers.keys().filter(|u| !self.is_ours(u)) {
                        let sender = Sender::new(user.clone(), nick(user));
                        let kind = EventKind::Displayed { target: MessageRef(event_id.clone()) };
                        let _ = self.sink.emit(Event::new(self.network.clone(), chat.clone(), sender, kind)).await;
                    }
                }
            }
            _ => {}
        }
    }

    /// Whether the homeserver may consider `user` ours (`GET /users/{userId}`): only
    /// puppets this gateway created; others are not made up on demand.
    fn knows_user(&self, user: &str) -> bool {
        self.is_puppet(user) && self.state().registered.contains(user)
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

// --- the HTTP server -------------------------------------------------------------------

async fn serve(listener: TcpListener, portals: Weak<Portals>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                warn!(error = %e, "application service: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let portals = portals.clone();
        tokio::spawn(
            async move {
                let service = hyper::service::service_fn(move |req| {
                    let portals = portals.clone();
                    async move {
                        let response = match portals.upgrade() {
                            Some(p) => handle(&p, req).await,
                            None => json_response(StatusCode::SERVICE_UNAVAILABLE, &json!({"errcode": "M_UNKNOWN"})),
                        };
                        Ok::<_, Infallible>(response)
                    }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .serve_connection(TokioIo::new(stream), service);
                if let Err(e) = conn.await {
                    debug!(peer = %peer, error = %e, "application service connection ended");
                }
            }
            .in_current_span(),
        );
    }
}

fn json_response(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn matrix_error(status: StatusCode, errcode: &str, error: &str) -> Response<Full<Bytes>> {
    json_response(status, &json!({"errcode": errcode, "error": error}))
}

async fn handle(portals: &Portals, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let Some(config) = portals.appservice() else { return matrix_error(StatusCode::NOT_FOUND, "M_UNRECOGNIZED", "") };
    match authorize(req.headers(), req.uri().query(), config.hs_token.expose()) {
        Ok(()) => {}
        Err(StatusCode::UNAUTHORIZED) => {
            return matrix_error(StatusCode::UNAUTHORIZED, "M_UNAUTHORIZED", "no hs_token in the request");
        }
        Err(status) => {
            warn!(path = req.uri().path(), "application service request with a wrong token refused");
            return matrix_error(status, "M_FORBIDDEN", "wrong hs_token");
        }
    }
    match route(req.method(), req.uri().path()) {
        Route::Transaction(id) => {
            let body = match Limited::new(req.into_body(), MAX_TRANSACTION_BYTES).collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => return matrix_error(StatusCode::BAD_REQUEST, "M_BAD_JSON", &format!("unreadable body: {e}")),
            };
            match parse_transaction(&body) {
                Ok(txn) => {
                    if portals.transaction(&id, txn).await {
                        json_response(StatusCode::OK, &json!({}))
                    } else {
                        matrix_error(StatusCode::SERVICE_UNAVAILABLE, "M_UNKNOWN", "the gateway is shutting down")
                    }
                }
                Err(e) => matrix_error(StatusCode::BAD_REQUEST, "M_BAD_JSON", &e),
            }
        }
        Route::User(user) if portals.knows_user(&user) => json_response(StatusCode::OK, &json!({})),
        Route::User(_) => matrix_error(StatusCode::NOT_FOUND, "M_NOT_FOUND", "no such user on this gateway"),
        Route::Room(_) => matrix_error(StatusCode::NOT_FOUND, "M_NOT_FOUND", "this gateway provides no room aliases"),
        Route::Ping => json_response(StatusCode::OK, &json!({})),
        Route::Unknown => matrix_error(StatusCode::NOT_FOUND, "M_UNRECOGNIZED", "unknown endpoint"),
    }
}

#[cfg(test)]
mod tests {
    use isthmus_config::Secret;

    use super::*;

    fn config() -> MatrixAppserviceConfig {
        MatrixAppserviceConfig {
            homeserver: "http://127.0.0.1:1".into(),
            server_name: "example.org".into(),
            listen: "127.0.0.1:8095".into(),
            url: None,
            as_token: Secret::new("as-secret"),
            hs_token: Secret::new("hs-\"secret\""),
            sender_localpart: "isthmus".into(),
            user_prefix: "_xmpp_".into(),
        }
    }

    #[test]
    fn puppet_names_escape_and_come_back() {
        assert_eq!(puppet_localpart("alice@localhost"), "alice=40localhost");
        assert_eq!(puppet_localpart("Al_ice@ex.org"), "_al__ice=40ex.org");
        assert_eq!(puppet_localpart("é@x"), "=c3=a9=40x");
        for jid in ["alice@localhost", "Al_ice@ex.org", "é@x", "a/b=c+d@x-y.z", "_@_"] {
            let local = puppet_localpart(jid);
            assert!(
                local.bytes().all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'_' | b'=')),
                "{local}"
            );
            assert_eq!(jid_of_localpart(&local).as_deref(), Some(jid));
        }
        for bad in ["_A", "=4", "=zz", "a:b", "_1", "A"] {
            assert_eq!(jid_of_localpart(bad), None, "{bad}");
        }
    }

    #[test]
    fn puppets_and_the_bot_are_recognised() {
        let (sink, _stream) = EventSink::channel(4);
        let fetcher = Arc::new(crate::media::Fetcher::new(false));
        let p = Portals::new(NetworkId::new("matrix"), Acting::Appservice(config()), Vec::new(), sink, fetcher);
        assert_eq!(p.bot(), "@isthmus:example.org");
        assert_eq!(p.puppet_of("alice@localhost").unwrap().as_deref(), Some("@_xmpp_alice=40localhost:example.org"));
        assert_eq!(p.puppet_jid("@_xmpp_alice=40localhost:example.org").as_deref(), Some("alice@localhost"));
        assert!(!p.is_puppet("@_xmpp_alice=40localhost:other.org"));
        assert!(!p.is_puppet("@alice:example.org"));
        assert!(p.is_ours("@isthmus:example.org"));
        assert!(p.puppet_of(&format!("{}@x", "a".repeat(300))).is_err());
    }

    #[test]
    fn registration_is_yaml_with_an_escaped_exclusive_namespace() {
        let yaml = registration_yaml("matrix.example.org", &config());
        assert_eq!(
            yaml,
            "# Isthmus application service for portal rooms (matrix.example.org).\n\
             # List this file in the homeserver's `app_service_config_files` and restart it.\n\
             id: \"matrix.example.org\"\n\
             url: \"http://127.0.0.1:8095\"\n\
             as_token: \"as-secret\"\n\
             hs_token: \"hs-\\\"secret\\\"\"\n\
             sender_localpart: \"isthmus\"\n\
             rate_limited: false\n\
             receive_ephemeral: true\n\
             namespaces:\n  users:\n    - exclusive: true\n      regex: \"^@_xmpp_.*:example\\\\.org$\"\n  aliases: []\n  rooms: []\n"
        );
        let mut c = config();
        c.url = Some("https://gw.example.org/as".into());
        c.user_prefix = "x+".into();
        c.server_name = "[::1]:8448".into();
        let yaml = registration_yaml("m", &c);
        assert!(yaml.contains("url: \"https://gw.example.org/as\"\n"), "{yaml}");
        assert!(yaml.contains(r#"regex: "^@x\\+.*:\\[::1\\]:8448$""#), "{yaml}");
    }

    #[test]
    fn routes() {
        assert_eq!(route(&Method::PUT, "/_matrix/app/v1/transactions/123"), Route::Transaction("123".into()));
        assert_eq!(route(&Method::PUT, "/transactions/a%2Fb"), Route::Transaction("a/b".into()));
        assert_eq!(
            route(&Method::GET, "/_matrix/app/v1/users/%40_xmpp_a%3Alocalhost"),
            Route::User("@_xmpp_a:localhost".into())
        );
        assert_eq!(route(&Method::GET, "/_matrix/app/v1/rooms/%23r%3Ax"), Route::Room("#r:x".into()));
        assert_eq!(route(&Method::POST, "/_matrix/app/v1/ping"), Route::Ping);
        for (m, p) in [
            (Method::GET, "/_matrix/app/v1/transactions/1"),
            (Method::PUT, "/_matrix/app/v1/transactions/"),
            (Method::PUT, "/_matrix/app/v1/transactions/1/2"),
            (Method::GET, "/"),
            (Method::GET, "/_matrix/app/v1/users/%zz"),
        ] {
            assert_eq!(route(&m, p), Route::Unknown, "{m} {p}");
        }
    }

    #[test]
    fn only_the_homeservers_token_is_accepted() {
        let mut h = HeaderMap::new();
        assert_eq!(authorize(&h, None, "tok"), Err(StatusCode::UNAUTHORIZED));
        assert_eq!(authorize(&h, Some("x=1"), "tok"), Err(StatusCode::UNAUTHORIZED));
        assert_eq!(authorize(&h, Some("access_token=tok"), "tok"), Ok(()));
        assert_eq!(authorize(&h, Some("a=b&access_token=t%6Fk"), "tok"), Ok(()));
        assert_eq!(authorize(&h, Some("access_token=other"), "tok"), Err(StatusCode::FORBIDDEN));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer tok"));
        assert_eq!(authorize(&h, None, "tok"), Ok(()));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer tok2"));
        assert_eq!(authorize(&h, Some("access_token=tok"), "tok"), Err(StatusCode::FORBIDDEN));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic dG9r"));
        assert_eq!(authorize(&h, None, "tok"), Err(StatusCode::UNAUTHORIZED));
    }

    #[test]
    fn transactions_are_read_and_remembered() {
        let t =
            parse_transaction(br#"{"events": [{"type": "m.room.message"}, 5], "ephemeral": [{"type": "m.typing"}]}"#)
                .unwrap();
        assert_eq!(t.events, vec![json!({"type": "m.room.message"})]);
        assert_eq!(t.ephemeral, vec![json!({"type": "m.typing"})]);
        let t =
            parse_transaction(br#"{"events": [], "de.sorunome.msc2409.ephemeral": [{"type": "m.receipt"}]}"#).unwrap();
        assert_eq!(t.ephemeral.len(), 1);
        assert_eq!(parse_transaction(b"{}").unwrap(), Transaction::default());
        assert!(parse_transaction(b"[]").is_err());
        assert!(parse_transaction(b"{\"events\": {}}").is_err());
        assert!(parse_transaction(b"nope").is_err());
        let mut seen = SeenTransactions::default();
        seen.insert("1");
        seen.insert("1");
        assert!(seen.contains("1") && !seen.contains("2"));
        for i in 0..REMEMBERED_TRANSACTIONS {
            seen.insert(&format!("n{i}"));
        }
        assert!(!seen.contains("1"), "the oldest ids are forgotten");
        assert!(seen.contains(&format!("n{}", REMEMBERED_TRANSACTIONS - 1)));
    }

    fn state_event(kind: &str, key: &str, sender: &str, content: Value) -> Value {
        json!({"type": kind, "state_key": key, "sender": sender, "content": content})
    }

    #[test]
    fn members_nicks_and_powers_come_from_the_state() {
        let state = vec![
            state_event("m.room.create", "", "@bob:l", json!({"room_version": "10"})),
            state_event(
                "m.room.power_levels",
                "",
                "@bob:l",
                json!({"users": {"@bob:l": 100, "@mod:l": "50"}, "users_default": 0}),
            ),
            state_event("m.room.topic", "", "@bob:l", json!({"topic": "Welcome"})),
            state_event("m.room.member", "@bob:l", "@bob:l", json!({"membership": "join", "displayname": "Bob"})),
            state_event("m.room.member", "@mod:l", "@mod:l", json!({"membership": "join", "displayname": "Bob"})),
            state_event("m.room.member", "@plain:l", "@plain:l", json!({"membership": "join"})),
            state_event("m.room.member", "@gone:l", "@gone:l", json!({"membership": "leave", "displayname": "G"})),
        ];
        let members = joined_members(&state);
        assert_eq!(members.len(), 3);
        assert_eq!(nick_in(&members, "@bob:l"), "Bob (@bob:l)");
        assert_eq!(nick_in(&members, "@mod:l"), "Bob (@mod:l)");
        assert_eq!(nick_in(&members, "@plain:l"), "plain");
        assert_eq!(nick_in(&members, "@stranger:l"), "@stranger:l");
        assert_eq!(topic_of(&state).as_deref(), Some("Welcome"));
        let p = Powers::from_state(&state);
        let o = p.occupant("@bob:l", "Bob".into());
        assert_eq!((o.role, o.affiliation), (Role::Moderator, Affiliation::Owner));
        let o = p.occupant("@mod:l", "M".into());
        assert_eq!((o.role, o.affiliation), (Role::Moderator, Affiliation::Admin));
        let o = p.occupant("@plain:l", "p".into());
        assert_eq!((o.role, o.affiliation), (Role::Participant, Affiliation::Member));
        // Room version 12: the creators outrank everyone without being listed.
        let v12 = vec![
            state_event("m.room.create", "", "@c:l", json!({"room_version": "12", "additional_creators": ["@d:l"]})),
            state_event("m.room.power_levels", "", "@c:l", json!({"users": {}})),
        ];
        let p = Powers::from_state(&v12);
        assert_eq!(p.occupant("@d:l", "d".into()).affiliation, Affiliation::Owner);
        assert_eq!(p.occupant("@e:l", "e".into()).affiliation, Affiliation::Member);
        // No power levels at all: the creator may do everything.
        let p = Powers::from_state(&[state_event("m.room.create", "", "@c:l", json!({"room_version": "10"}))]);
        assert_eq!((p.level("@c:l"), p.level("@e:l")), (100, 0));
    }

    #[test]
    fn the_bot_speaks_for_a_nick() {
        let m = spoken_by("Al<ice>", &Message::text("*hi*"));
        assert_eq!(m.body, "<Al<ice>> *hi*");
        // The HTML body is the styling's, made from that prefixed body (escaped).
        assert_eq!(outgoing::message_content(&m)["formatted_body"], json!("&lt;Al&lt;ice&gt;&gt; <strong>hi</strong>"));
        let html = Message {
            formatted: Some(isthmus_core::model::FormattedBody {
                format: isthmus_core::model::TextFormat::Html,
                text: "<b>hi</b>".into(),
            }),
            ..Message::text("hi")
        };
        assert_eq!(spoken_by("a&b", &html).formatted.map(|f| f.text).as_deref(), Some("&lt;a&amp;b&gt; <b>hi</b>"));
        let action = spoken_by("Alice", &Message { action: true, ..Message::text("waves") });
        assert_eq!(action.body, "Alice waves");
    }

    #[test]
    fn transaction_ids_follow_personal_mode() {
        let mut e = Event::new(
            NetworkId::xmpp(),
            ChatRef::room(NetworkId::new("matrix"), "!r:l"),
            Sender::new("a@l", "A"),
            EventKind::Message(Message::text("x")),
        );
        e.key = isthmus_core::model::MessageKey("k".into());
        assert_eq!(transaction_id(&e), "k-message");
        e.kind = EventKind::Retraction { target: MessageRef("$t".into()), moderator: None, reason: None };
        assert_eq!(transaction_id(&e), "k-retraction");
        let e = e.with_origin_id("o1");
        assert_eq!(transaction_id(&e), "k-retraction-o1");
    }
}
