//! Names and the transaction API of the application service: puppets' user ids
//! and back, the registration file, the homeserver's requests and their tokens,
//! transactions and the ones already seen.

use super::*;

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
pub(super) fn regex_escape(s: &str) -> String {
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
pub(super) fn percent_decode(s: &str) -> Option<String> {
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
pub(super) fn enc(s: &str) -> String {
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

pub(super) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
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
    pub(super) order: VecDeque<String>,
    pub(super) set: HashSet<String>,
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
