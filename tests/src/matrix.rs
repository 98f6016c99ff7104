//! A raw Matrix client-server API client over HTTP: the far end of the tests,
//! independent of the Matrix library the bridge uses.
//!
//! [`MatrixClient`] speaks plain JSON to a homeserver (in the tests, a
//! [`Synapse`](crate::Synapse) on loopback) and hands events back as
//! [`serde_json::Value`], so tests assert on exactly what the server holds.
//! Failed requests are [`MatrixError`]s (status, `errcode`, `error`) inside the
//! `anyhow::Error`, for tests that expect a refusal.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use reqwest::Method;
use serde_json::{Value, json};

/// A request the homeserver refused.
#[derive(Debug, Clone)]
pub struct MatrixError {
    /// `METHOD path`.
    pub request: String,
    pub status: u16,
    /// The Matrix error code (`M_FORBIDDEN`…), empty when the answer had none.
    pub errcode: String,
    pub error: String,
}

impl std::fmt::Display for MatrixError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: HTTP {} {}: {}", self.request, self.status, self.errcode, self.error)
    }
}

impl std::error::Error for MatrixError {}

/// One user's session on a homeserver.
#[derive(Clone)]
pub struct MatrixClient {
    http: reqwest::Client,
    base: String,
    user_id: String,
    token: String,
}

/// Percent-encode one path segment or query value (everything but RFC 3986 unreserved characters).
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A transaction id never used before by this process.
fn txn_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
    format!("isthmus-{}-{t}-{n}", std::process::id())
}

fn http_client() -> Result<reqwest::Client> {
    // Loopback only: never through a proxy from the environment.
    reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(30)).build().context("build the HTTP client")
}

/// A short line per event, for error messages.
pub fn describe(e: &Value) -> String {
    let ty = e["type"].as_str().unwrap_or("?");
    let sender = e["sender"].as_str().unwrap_or("?");
    let id = e["event_id"].as_str().unwrap_or("?");
    let mut content = e["content"].to_string();
    if content.len() > 200 {
        let mut cut = 200;
        while !content.is_char_boundary(cut) {
            cut -= 1;
        }
        content.truncate(cut);
        content.push('…');
    }
    match e["state_key"].as_str() {
        Some(k) => format!("{id} {ty}[{k}] from {sender}: {content}"),
        None => format!("{id} {ty} from {sender}: {content}"),
    }
}

impl MatrixClient {
    /// Log in with a password (`user` is a localpart or a full user id).
    pub async fn login(base_url: &str, user: &str, password: &str) -> Result<MatrixClient> {
        let mut c = MatrixClient {
            http: http_client()?,
            base: base_url.trim_end_matches('/').to_owned(),
            user_id: String::new(),
            token: String::new(),
        };
        let body = json!({
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": user},
            "password": password,
            "initial_device_display_name": "isthmus test client",
        });
        let r = c.call(Method::POST, "/_matrix/client/v3/login", Some(&body)).await?;
        c.user_id = r["user_id"].as_str().with_context(|| format!("no user_id in the login answer: {r}"))?.to_owned();
        c.token =
            r["access_token"].as_str().with_context(|| format!("no access_token in the login answer: {r}"))?.to_owned();
        Ok(c)
    }

    /// A session from an existing access token.
    pub fn from_token(base_url: &str, user_id: &str, token: &str) -> Result<MatrixClient> {
        Ok(MatrixClient {
            http: http_client()?,
            base: base_url.trim_end_matches('/').to_owned(),
            user_id: user_id.to_owned(),
            token: token.to_owned(),
        })
    }

    pub fn user_id(&self) -> &str {
        &self.user_id
    }
    pub fn access_token(&self) -> &str {
        &self.token
    }

    /// Any client-server request: `path` starts with `/_matrix/` and carries its query,
    /// already encoded. The answer's JSON, or a [`MatrixError`] on a non-2xx status.
    pub async fn call(&self, method: Method, path: &str, body: Option<&Value>) -> Result<Value> {
        let request = format!("{method} {path}");
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if !self.token.is_empty() {
            req = req.bearer_auth(&self.token);
        }
        if let Some(body) = body {
            req = req.json(body);
        }
        let resp = req.send().await.with_context(|| format!("{request}: no answer from {}", self.base))?;
        let status = resp.status();
        let bytes = resp.bytes().await.with_context(|| format!("{request}: read the answer"))?;
        if !status.is_success() {
            return Err(error(request, status, &bytes).into());
        }
        if bytes.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&bytes)
            .with_context(|| format!("{request}: answer is not JSON: {}", String::from_utf8_lossy(&bytes)))
    }

    fn room_path(room: &str, rest: &str) -> String {
        format!("/_matrix/client/v3/rooms/{}/{rest}", encode(room))
    }

    /// Create a private room (a direct chat when `is_direct`), inviting `invite`; its id.
    pub async fn create_room(&self, name: Option<&str>, invite: &[&str], is_direct: bool) -> Result<String> {
        let mut body = json!({
            "preset": if is_direct { "trusted_private_chat" } else { "private_chat" },
            "invite": invite,
            "is_direct": is_direct,
        });
        if let Some(name) = name {
            body["name"] = name.into();
        }
        self.create_room_with(body).await
    }

    /// Create a room from a raw `createRoom` body; its id.
    pub async fn create_room_with(&self, body: Value) -> Result<String> {
        let r = self.call(Method::POST, "/_matrix/client/v3/createRoom", Some(&body)).await?;
        Ok(r["room_id"].as_str().with_context(|| format!("no room_id in the createRoom answer: {r}"))?.to_owned())
    }

    /// Join a room by id or alias; the room id.
    pub async fn join(&self, room_id_or_alias: &str) -> Result<String> {
        let path = format!("/_matrix/client/v3/join/{}", encode(room_id_or_alias));
        let r = self.call(Method::POST, &path, Some(&json!({}))).await?;
        Ok(r["room_id"].as_str().with_context(|| format!("no room_id in the join answer: {r}"))?.to_owned())
    }

    pub async fn leave(&self, room: &str) -> Result<()> {
        self.call(Method::POST, &Self::room_path(room, "leave"), Some(&json!({}))).await?;
        Ok(())
    }

    pub async fn invite(&self, room: &str, user: &str) -> Result<()> {
        self.call(Method::POST, &Self::room_path(room, "invite"), Some(&json!({"user_id": user}))).await?;
        Ok(())
    }

    /// The room id an alias points to.
    pub async fn resolve_alias(&self, alias: &str) -> Result<String> {
        let r = self.call(Method::GET, &format!("/_matrix/client/v3/directory/room/{}", encode(alias)), None).await?;
        Ok(r["room_id"].as_str().with_context(|| format!("no room_id in the directory answer: {r}"))?.to_owned())
    }

    /// An `m.text` message; its event id.
    pub async fn send_text(&self, room: &str, body: &str) -> Result<String> {
        self.send_event(room, "m.room.message", json!({"msgtype": "m.text", "body": body})).await
    }

    /// Any message event (PUT with a fresh transaction id); its event id.
    pub async fn send_event(&self, room: &str, event_type: &str, content: Value) -> Result<String> {
        let path = Self::room_path(room, &format!("send/{}/{}", encode(event_type), encode(&txn_id())));
        let r = self.call(Method::PUT, &path, Some(&content)).await?;
        Ok(r["event_id"].as_str().with_context(|| format!("no event_id in the send answer: {r}"))?.to_owned())
    }

    /// Set a state event; its event id.
    pub async fn send_state(&self, room: &str, event_type: &str, state_key: &str, content: Value) -> Result<String> {
        let path = Self::room_path(room, &format!("state/{}/{}", encode(event_type), encode(state_key)));
        let r = self.call(Method::PUT, &path, Some(&content)).await?;
        Ok(r["event_id"].as_str().with_context(|| format!("no event_id in the state answer: {r}"))?.to_owned())
    }

    /// The content of a state event.
    pub async fn state(&self, room: &str, event_type: &str, state_key: &str) -> Result<Value> {
        let path = Self::room_path(room, &format!("state/{}/{}", encode(event_type), encode(state_key)));
        self.call(Method::GET, &path, None).await
    }

    /// Redact an event; the redaction's event id.
    pub async fn redact(&self, room: &str, event_id: &str, reason: Option<&str>) -> Result<String> {
        let path = Self::room_path(room, &format!("redact/{}/{}", encode(event_id), encode(&txn_id())));
        let body = match reason {
            Some(r) => json!({"reason": r}),
            None => json!({}),
        };
        let r = self.call(Method::PUT, &path, Some(&body)).await?;
        Ok(r["event_id"].as_str().with_context(|| format!("no event_id in the redact answer: {r}"))?.to_owned())
    }

    pub async fn set_display_name(&self, name: &str) -> Result<()> {
        let path = format!("/_matrix/client/v3/profile/{}/displayname", encode(&self.user_id));
        self.call(Method::PUT, &path, Some(&json!({"displayname": name}))).await?;
        Ok(())
    }

    /// The latest `limit` events of the room's timeline (state events included), oldest first.
    pub async fn messages(&self, room: &str, limit: u32) -> Result<Vec<Value>> {
        let (mut chunk, _) = self.messages_page(room, None, limit).await?;
        chunk.reverse();
        Ok(chunk)
    }

    /// One page of `/messages` backwards from `from` (the newest when `None`): the events,
    /// newest first, and the token of the next older page (`None` at the room's start).
    async fn messages_page(&self, room: &str, from: Option<&str>, limit: u32) -> Result<(Vec<Value>, Option<String>)> {
        let mut path = Self::room_path(room, &format!("messages?dir=b&limit={limit}"));
        if let Some(from) = from {
            path += &format!("&from={}", encode(from));
        }
        let r = self.call(Method::GET, &path, None).await?;
        let chunk = match r.get("chunk") {
            Some(Value::Array(a)) => a.clone(),
            _ => bail!("no chunk in the /messages answer: {r}"),
        };
        Ok((chunk, r["end"].as_str().map(str::to_owned)))
    }

    /// The room's whole timeline as this user may see it, oldest first.
    pub async fn history(&self, room: &str) -> Result<Vec<Value>> {
        let mut all = Vec::new();
        let mut from: Option<String> = None;
        loop {
            let (chunk, end) = self.messages_page(room, from.as_deref(), 100).await?;
            let done = chunk.is_empty() || end.is_none() || end == from;
            all.extend(chunk);
            if done {
                break;
            }
            from = end;
        }
        all.reverse();
        Ok(all)
    }

    /// One event by id.
    pub async fn event(&self, room: &str, event_id: &str) -> Result<Value> {
        self.call(Method::GET, &Self::room_path(room, &format!("event/{}", encode(event_id))), None).await
    }

    /// The oldest event of the room's timeline matching `pred`, polling until `timeout`.
    ///
    /// Each poll reads the whole timeline again (see [`MatrixClient::history`]), so no event
    /// is missed and a later change (a redaction) is seen; waiting twice with the same
    /// predicate returns the same event. On timeout the error lists the events seen.
    pub async fn wait_for(&self, room: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Result<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let events = self.history(room).await?;
            if let Some(e) = events.iter().find(|e| pred(e)) {
                return Ok(e.clone());
            }
            if tokio::time::Instant::now() >= deadline {
                let shown = events.len().min(30);
                let lines: Vec<String> = events[events.len() - shown..].iter().map(describe).collect();
                bail!(
                    "{}: no matching event in {room} within {timeout:?}; the {} events seen (last {shown}):\n  {}",
                    self.user_id,
                    events.len(),
                    lines.join("\n  ")
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Upload media; its `mxc://` URI.
    pub async fn upload(&self, bytes: &[u8], content_type: &str, filename: &str) -> Result<String> {
        let path = format!("/_matrix/media/v3/upload?filename={}", encode(filename));
        let request = format!("POST {path}");
        let resp = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .body(bytes.to_vec())
            .send()
            .await
            .with_context(|| format!("{request}: no answer from {}", self.base))?;
        let status = resp.status();
        let body = resp.bytes().await.with_context(|| format!("{request}: read the answer"))?;
        if !status.is_success() {
            return Err(error(request, status, &body).into());
        }
        let r: Value = serde_json::from_slice(&body)
            .with_context(|| format!("{request}: answer is not JSON: {}", String::from_utf8_lossy(&body)))?;
        Ok(r["content_uri"].as_str().with_context(|| format!("no content_uri in the upload answer: {r}"))?.to_owned())
    }

    /// Download media by its `mxc://server/id` URI (authenticated media).
    pub async fn download(&self, mxc: &str) -> Result<Vec<u8>> {
        let rest = mxc.strip_prefix("mxc://").with_context(|| format!("not an mxc URI: {mxc}"))?;
        let (server, id) = rest.split_once('/').with_context(|| format!("not an mxc URI: {mxc}"))?;
        let path = format!("/_matrix/client/v1/media/download/{}/{}", encode(server), encode(id));
        let request = format!("GET {path}");
        let resp = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .with_context(|| format!("{request}: no answer from {}", self.base))?;
        let status = resp.status();
        let body = resp.bytes().await.with_context(|| format!("{request}: read the answer"))?;
        if !status.is_success() {
            return Err(error(request, status, &body).into());
        }
        Ok(body.to_vec())
    }

    /// The room's joined members: user id → display name.
    pub async fn joined_members(&self, room: &str) -> Result<BTreeMap<String, Option<String>>> {
        let r = self.call(Method::GET, &Self::room_path(room, "joined_members"), None).await?;
        let joined = r["joined"].as_object().with_context(|| format!("no joined in the answer: {r}"))?;
        Ok(joined.iter().map(|(id, m)| (id.clone(), m["display_name"].as_str().map(str::to_owned))).collect())
    }

    /// The events relating to `event_id` (of `rel_type` when given: `m.replace`,
    /// `m.annotation`, `m.thread`…), every page, as the server orders them (newest first).
    pub async fn relations(&self, room: &str, event_id: &str, rel_type: Option<&str>) -> Result<Vec<Value>> {
        let mut base = format!("/_matrix/client/v1/rooms/{}/relations/{}", encode(room), encode(event_id));
        if let Some(t) = rel_type {
            base += &format!("/{}", encode(t));
        }
        let mut all = Vec::new();
        let mut from: Option<String> = None;
        loop {
            let mut path = format!("{base}?limit=100");
            if let Some(f) = &from {
                path += &format!("&from={}", encode(f));
            }
            let r = self.call(Method::GET, &path, None).await?;
            match r.get("chunk") {
                Some(Value::Array(a)) => all.extend(a.iter().cloned()),
                _ => bail!("no chunk in the relations answer: {r}"),
            }
            match r["next_batch"].as_str() {
                Some(next) if Some(next) != from.as_deref() => from = Some(next.to_owned()),
                _ => return Ok(all),
            }
        }
    }
}

fn error(request: String, status: reqwest::StatusCode, body: &[u8]) -> MatrixError {
    let parsed: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    MatrixError {
        request,
        status: status.as_u16(),
        errcode: parsed["errcode"].as_str().unwrap_or_default().to_owned(),
        error: parsed["error"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned()),
    }
}
