//! The embedded XMPP server core (`xmpp.mode: embedded`): accepts clients on
//! c2s, authenticates them against the store, keeps their sessions, rosters and
//! presence, and routes stanzas between local users and the network domains,
//! which are served in-process by the same [`Gateway`] as in component mode.

pub mod accounts;
mod c2s;
mod gate;
mod roster;
mod scram;
pub mod tls;
pub mod xml;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use isthmus_config::EmbeddedConfig;
use isthmus_core::store::Store;
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_xmpp::minidom::Element;
use tokio_xmpp::parsers::jid::Jid;
use tracing::{debug, info, warn};

use crate::gateway::Gateway;
use accounts::Credentials;
use xml::{CARBONS, CLIENT, COMPONENT, FORWARD, HINTS, ROSTER, elem, error_reply, set_attr, with_child};

#[derive(Debug, Error)]
pub enum ServerError {
    #[error("cannot listen on {0}: {1}")]
    Listen(String, std::io::Error),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("account `{0}` in the configuration: {1}")]
    Account(String, accounts::AccountError),
}

/// Resources (connected clients) one account may have at once.
pub(crate) const MAX_RESOURCES: usize = 32;

/// Stanzas waiting for one client to read them. Past it the client is not
/// reading: its stream is closed, and what could not be queued is refused to
/// its senders as to a client that is offline.
pub(crate) const SESSION_QUEUE: usize = 4096;

/// One bound client resource.
struct Session {
    to_client: mpsc::Sender<Element>,
    /// Cancelled when the client's queue is full (see [`SESSION_QUEUE`]).
    congested: tokio_util::sync::CancellationToken,
    /// The last broadcast presence; `None` until the client sends one.
    presence: Option<Element>,
    carbons: bool,
    /// Where the client sent directed presence (MUC rooms among them): they get
    /// its unavailable presence when it goes.
    directed: HashSet<String>,
}

/// The embedded server.
pub struct Server {
    pub(crate) domain: String,
    pub(crate) store: Store,
    pub(crate) listed_users: Vec<(String, Credentials)>,
    pub(crate) max_stanza_bytes: usize,
    pub(crate) tls: tls::Tls,
    /// PBKDF2 rounds for new passwords and unknown accounts' salts.
    pub(crate) scram_iterations: u32,
    /// Salts shown for unknown accounts are derived from this (new each start).
    pub(crate) auth_fake_key: [u8; 32],
    pub(crate) plaintext_auth_on_loopback: bool,
    pub(crate) gate: Arc<gate::Gate>,
    /// Network domains and their human name (for disco#items).
    networks: Vec<(String, String)>,
    gateway: Arc<Gateway>,
    /// bare JID → resource → session.
    sessions: Mutex<HashMap<String, HashMap<String, Session>>>,
}

impl Server {
    pub fn new(
        config: &EmbeddedConfig,
        base_dir: &std::path::Path,
        store: Store,
        gateway: Arc<Gateway>,
        networks: Vec<(String, String)>,
    ) -> Result<Arc<Server>, ServerError> {
        let domain = config.domain.to_lowercase();
        let resolve = |p: &std::path::Path| if p.is_absolute() { p.to_path_buf() } else { base_dir.join(p) };
        let tls = tls::load_or_generate(
            config.tls_cert.as_deref().map(resolve).as_deref(),
            config.tls_key.as_deref().map(resolve).as_deref(),
            &base_dir.join("tls"),
            &domain,
            &[],
        )?;
        let mut listed_users = Vec::new();
        for u in &config.users {
            let jid = accounts::account_jid(&u.jid).map_err(|e| ServerError::Account(u.jid.clone(), e))?;
            let c =
                Credentials::from_hash_string(&u.password_hash).map_err(|e| ServerError::Account(u.jid.clone(), e))?;
            listed_users.push((jid, c));
        }
        Ok(Arc::new(Server {
            domain,
            store,
            listed_users,
            max_stanza_bytes: config.max_stanza_bytes,
            tls,
            scram_iterations: config.scram_iterations,
            auth_fake_key: rand::random(),
            plaintext_auth_on_loopback: config.plaintext_auth_on_loopback,
            gate: gate::Gate::new(config.limits.clone()),
            networks,
            gateway,
            sessions: Mutex::new(HashMap::new()),
        }))
    }

    /// First start with no account at all: create `admin@DOMAIN` with a random
    /// password and say it once in the log, so a fresh install can be used at once.
    pub async fn ensure_first_account(&self) -> Result<(), ServerError> {
        if !self.listed_users.is_empty() {
            return Ok(());
        }
        let count = self.store.count_local_users().await.map_err(|e| ServerError::Account("admin".into(), e.into()))?;
        if count > 0 {
            return Ok(());
        }
        let jid = format!("admin@{}", self.domain);
        let password: String = {
            use rand::Rng;
            const CHARS: &[u8] = b"abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
            let mut rng = rand::rng();
            (0..16).map(|_| CHARS[rng.random_range(0..CHARS.len())] as char).collect()
        };
        accounts::set_password(&self.store, &jid, &password, self.scram_iterations)
            .await
            .map_err(|e| ServerError::Account(jid.clone(), e))?;
        warn!(
            account = %jid,
            password = %password,
            "first start: created an account (shown only this once; change it with `isthmus user passwd {jid}`)"
        );
        Ok(())
    }

    /// Listen for clients (and, if configured, direct-TLS clients); returns once listening.
    pub async fn listen(self: &Arc<Self>, config: &EmbeddedConfig) -> Result<(), ServerError> {
        let mut listeners = vec![(config.listen.clone(), false)];
        if let Some(d) = &config.direct_tls_listen {
            listeners.push((d.clone(), true));
        }
        for (addr, direct_tls) in listeners {
            let listener = TcpListener::bind(&addr).await.map_err(|e| ServerError::Listen(addr.clone(), e))?;
            info!(
                address = %addr,
                domain = %self.domain,
                tls = if direct_tls { "direct TLS" } else { "STARTTLS" },
                certificate = %self.tls.cert_path.display(),
                sha256 = %self.tls.fingerprint,
                "accepting XMPP clients: log in as NAME@{} (accounts: `isthmus user add NAME@{}`)",
                self.domain,
                self.domain
            );
            let server = self.clone();
            tokio::spawn(async move {
                loop {
                    match listener.accept().await {
                        Ok((tcp, _)) => {
                            tokio::spawn(c2s::serve(server.clone(), tcp, direct_tls));
                        }
                        Err(e) => {
                            warn!(error = %e, "accept failed");
                            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        }
                    }
                }
            });
        }
        Ok(())
    }

    // --- sessions ----------------------------------------------------------------------

    /// Reserve a resource for `user`: the requested one if free, else a fresh one.
    /// Reserve a resource for `user`; `None` past [`MAX_RESOURCES`].
    fn bind_resource(&self, user: &str, wanted: Option<String>) -> Option<String> {
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let resources = sessions.entry(user.to_owned()).or_default();
        if resources.len() >= MAX_RESOURCES {
            return None;
        }
        let mut resource = wanted.unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string()[..12].to_owned());
        if resources.contains_key(&resource) || format!("{user}/{resource}").parse::<Jid>().is_err() {
            resource = format!("{resource}.{}", &uuid::Uuid::new_v4().simple().to_string()[..6]);
            if format!("{user}/{resource}").parse::<Jid>().is_err() {
                resource = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
            }
        }
        // Reserved with a closed channel until `attach`.
        let (tx, _) = mpsc::channel(1);
        resources.insert(
            resource.clone(),
            Session {
                to_client: tx,
                congested: tokio_util::sync::CancellationToken::new(),
                presence: None,
                carbons: false,
                directed: HashSet::new(),
            },
        );
        Some(format!("{user}/{resource}"))
    }

    fn unbind(&self, full: &str) {
        let (user, resource) = full.split_once('/').unwrap_or((full, ""));
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = sessions.get_mut(user) {
            r.remove(resource);
            if r.is_empty() {
                sessions.remove(user);
            }
        }
    }

    fn attach(&self, full: &str, tx: mpsc::Sender<Element>, congested: tokio_util::sync::CancellationToken) {
        let (user, resource) = full.split_once('/').unwrap_or((full, ""));
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = sessions.get_mut(user).and_then(|r| r.get_mut(resource)) {
            s.to_client = tx;
            s.congested = congested;
        }
    }

    /// The client is gone: tell whoever saw it online, then forget the session.
    async fn detach(&self, full: &str) {
        let (user, resource) = full.split_once('/').unwrap_or((full, ""));
        let (was_available, directed) = {
            let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
            let removed = sessions.get_mut(user).and_then(|r| r.remove(resource));
            if sessions.get(user).is_some_and(|r| r.is_empty()) {
                sessions.remove(user);
            }
            match removed {
                Some(s) => (s.presence.is_some(), s.directed),
                None => (false, HashSet::new()),
            }
        };
        let mut gone = elem("presence", CLIENT, &[("type", "unavailable"), ("from", full)]);
        if was_available {
            self.broadcast_presence(full, &gone).await;
        }
        for target in directed {
            set_attr(&mut gone, "to", Some(&target));
            self.route(gone.clone()).await;
        }
    }

    /// Send to one resource; false if it is not connected, or not reading
    /// (its queue is full: its stream is then closed).
    fn send_to_full(&self, full: &str, el: Element) -> bool {
        let (user, resource) = full.split_once('/').unwrap_or((full, ""));
        let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        match sessions.get(user).and_then(|r| r.get(resource)) {
            Some(s) => match s.to_client.try_send(el) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    s.congested.cancel();
                    false
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            },
            None => false,
        }
    }

    /// Full JIDs of a user's resources, optionally only those that sent presence.
    fn resources(&self, user: &str, available_only: bool) -> Vec<String> {
        let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        sessions
            .get(user)
            .map(|r| {
                r.iter()
                    .filter(|(_, s)| !available_only || s.presence.is_some())
                    .map(|(res, _)| format!("{user}/{res}"))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn presences_of(&self, user: &str) -> Vec<Element> {
        let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        sessions.get(user).map(|r| r.values().filter_map(|s| s.presence.clone()).collect()).unwrap_or_default()
    }

    fn is_local(&self, jid: &str) -> bool {
        xml::domain(jid) == self.domain && xml::bare(jid).contains('@')
    }

    fn network_of(&self, jid: &str) -> Option<&str> {
        let d = xml::domain(jid);
        self.networks.iter().find(|(n, _)| n == d).map(|(n, _)| n.as_str())
    }

    // --- routing -----------------------------------------------------------------------

    /// A stanza from a bound client: stamp its sender, then handle or route it.
    async fn handle_from_client(&self, full: &str, mut el: Element) {
        if !matches!(el.name(), "message" | "presence" | "iq") || el.ns() != CLIENT {
            debug!(jid = %full, name = el.name(), "ignoring a non-stanza element");
            return;
        }
        set_attr(&mut el, "from", Some(full));
        if let Some(to) = el.attr("to") {
            match to.parse::<Jid>() {
                Ok(j) => {
                    let normalised = j.to_string();
                    if normalised != to {
                        set_attr(&mut el, "to", Some(&normalised));
                    }
                }
                Err(_) => {
                    let reply = error_reply(&el, "modify", "jid-malformed", Some("the `to` address is not a JID"));
                    if el.attr("type") != Some("error") {
                        self.send_to_full(full, reply);
                    }
                    return;
                }
            }
        }
        let user = xml::bare(full).to_owned();
        match el.name() {
            "presence" => self.presence_from_client(full, &user, el).await,
            "iq" if el.attr("to").is_none_or(|t| t == user || t == self.domain) => {
                self.server_iq(full, &user, el).await
            }
            "message" => {
                if el.attr("to").is_none() {
                    set_attr(&mut el, "to", Some(&user));
                }
                self.carbon_copy_sent(full, &el);
                self.route(el).await;
            }
            _ => self.route(el).await,
        }
    }

    /// Deliver a stanza to its addressee: a local user, a network domain, or back
    /// to the sender with an error.
    pub(crate) async fn route(&self, el: Element) {
        let to = el.attr("to").unwrap_or_default().to_owned();
        if let Some(network) = self.network_of(&to) {
            let network = network.to_owned();
            let component = xml::rename_ns(&el, CLIENT, COMPONENT);
            match tokio_xmpp::Stanza::try_from(component) {
                Ok(stanza) => self.gateway.handle(&network, stanza).await,
                Err(e) => {
                    debug!(error = ?e, "stanza the gateway cannot parse");
                    self.bounce(&el, "modify", "bad-request", "the stanza could not be understood").await;
                }
            }
            return;
        }
        if self.is_local(&to) {
            self.deliver_local(el).await;
            return;
        }
        if to == self.domain {
            // Only iqs are answered by the server itself; the rest has nobody to read it.
            return;
        }
        self.bounce(&el, "cancel", "remote-server-not-found", "this server talks to no other XMPP server").await;
    }

    /// Send an error back to a stanza's sender (never for errors themselves).
    async fn bounce(&self, el: &Element, kind: &str, condition: &str, text: &str) {
        if el.attr("type") == Some("error") || (el.name() == "presence" && el.attr("type").is_some()) {
            return;
        }
        let reply = error_reply(el, kind, condition, Some(text));
        let from = el.attr("from").unwrap_or_default();
        if from.contains('/') && self.is_local(from) {
            self.send_to_full(from, reply);
        } else if self.network_of(from).is_some() {
            Box::pin(self.route(reply)).await;
        }
    }

    /// A stanza for a local account (from a client or from a network domain).
    async fn deliver_local(&self, el: Element) {
        let to = el.attr("to").unwrap_or_default().to_owned();
        let user = xml::bare(&to).to_owned();
        let kind = el.attr("type").unwrap_or("normal").to_owned();
        if to.contains('/') {
            if self.send_to_full(&to, el.clone()) {
                if el.name() == "message" && kind == "chat" {
                    self.carbon_copy_received(&to, &el);
                }
                return;
            }
            match (el.name(), kind.as_str()) {
                ("message", "chat" | "normal") => {} // falls through to the bare JID
                ("iq", "get" | "set") => {
                    return self.bounce(&el, "cancel", "service-unavailable", "that resource is offline").await;
                }
                _ => return,
            }
        }
        match el.name() {
            "message" => {
                if kind == "groupchat" || kind == "error" {
                    return;
                }
                let online = self.resources(&user, true);
                if online.is_empty() {
                    self.bounce(
                        &el,
                        "cancel",
                        "service-unavailable",
                        "the user is offline and messages are not stored",
                    )
                    .await;
                    return;
                }
                let mut delivered = false;
                for full in online {
                    let mut copy = el.clone();
                    set_attr(&mut copy, "to", Some(&full));
                    delivered |= self.send_to_full(&full, copy);
                }
                if !delivered {
                    // Every client of the user was gone or not reading (its queue full).
                    self.bounce(&el, "wait", "resource-constraint", "the user's clients are not taking messages now")
                        .await;
                }
            }
            "presence" => match kind.as_str() {
                "subscribe" | "subscribed" | "unsubscribe" | "unsubscribed" => {
                    self.inbound_subscription(&user, el).await;
                }
                "probe" => {
                    let from = el.attr("from").unwrap_or_default().to_owned();
                    if self.may_see_presence(&user, &from).await {
                        for mut p in self.presences_of(&user) {
                            set_attr(&mut p, "to", Some(&from));
                            Box::pin(self.route(p)).await;
                        }
                    }
                }
                _ => {
                    for full in self.resources(&user, true) {
                        let mut copy = el.clone();
                        set_attr(&mut copy, "to", Some(&full));
                        self.send_to_full(&full, copy);
                    }
                }
            },
            _ => {
                if matches!(kind.as_str(), "get" | "set") {
                    self.bounce(&el, "cancel", "service-unavailable", "no such service on this account").await;
                }
            }
        }
    }

    // --- carbons (XEP-0280) ---------------------------------------------------------------

    fn carbon_targets(&self, full: &str, el: &Element) -> Vec<String> {
        if el.attr("type") != Some("chat")
            || el.get_child("private", CARBONS).is_some()
            || el.get_child("no-copy", HINTS).is_some()
        {
            return Vec::new();
        }
        let (user, resource) = full.split_once('/').unwrap_or((full, ""));
        let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        sessions
            .get(user)
            .map(|r| {
                r.iter()
                    .filter(|(res, s)| *res != resource && s.carbons)
                    .map(|(res, _)| format!("{user}/{res}"))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn carbon_copy(&self, full: &str, el: &Element, direction: &str) {
        let user = xml::bare(full).to_owned();
        for target in self.carbon_targets(full, el) {
            let wrapper = elem("message", CLIENT, &[("from", &user), ("to", &target), ("type", "chat")]);
            let forwarded = with_child(Element::bare("forwarded", FORWARD), el.clone());
            let copy = with_child(wrapper, with_child(Element::bare(direction, CARBONS), forwarded));
            self.send_to_full(&target, copy);
        }
    }

    fn carbon_copy_sent(&self, full: &str, el: &Element) {
        self.carbon_copy(full, el, "sent");
    }

    fn carbon_copy_received(&self, full: &str, el: &Element) {
        self.carbon_copy(full, el, "received");
    }

    fn set_carbons(&self, full: &str, on: bool) {
        let (user, resource) = full.split_once('/').unwrap_or((full, ""));
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = sessions.get_mut(user).and_then(|r| r.get_mut(resource)) {
            s.carbons = on;
        }
    }

    // --- iqs the server answers ------------------------------------------------------------

    async fn server_iq(&self, full: &str, user: &str, el: Element) {
        let kind = el.attr("type").unwrap_or_default().to_owned();
        if kind == "result" || kind == "error" {
            return;
        }
        let mut reply_to = el.clone();
        if reply_to.attr("to").is_none() {
            set_attr(&mut reply_to, "to", Some(user));
        }
        let Some(payload) = el.children().next() else {
            self.send_to_full(full, error_reply(&reply_to, "modify", "bad-request", Some("an iq needs one payload")));
            return;
        };
        let reply = match (payload.name(), payload.ns().as_str(), kind.as_str()) {
            ("query", ROSTER, _) => return self.roster_iq(full, user, &reply_to, payload, &kind).await,
            ("ping", xml::PING, "get") => xml::iq_result(&reply_to, None),
            ("enable", CARBONS, "set") => {
                self.set_carbons(full, true);
                xml::iq_result(&reply_to, None)
            }
            ("disable", CARBONS, "set") => {
                self.set_carbons(full, false);
                xml::iq_result(&reply_to, None)
            }
            ("query", xml::DISCO_INFO, "get") => xml::iq_result(&reply_to, Some(self.disco_info(&reply_to))),
            ("query", xml::DISCO_ITEMS, "get") => xml::iq_result(&reply_to, Some(self.disco_items(&reply_to))),
            ("query", xml::VERSION, "get") if reply_to.attr("to") == Some(self.domain.as_str()) => {
                let mut q = Element::bare("query", xml::VERSION);
                q.append_child(xml::with_text(Element::bare("name", xml::VERSION), "Isthmus"));
                q.append_child(xml::with_text(Element::bare("version", xml::VERSION), env!("CARGO_PKG_VERSION")));
                xml::iq_result(&reply_to, Some(q))
            }
            _ => error_reply(&reply_to, "cancel", "service-unavailable", None),
        };
        self.send_to_full(full, reply);
    }

    fn disco_info(&self, iq: &Element) -> Element {
        let mut q = Element::bare("query", xml::DISCO_INFO);
        if iq.attr("to") == Some(self.domain.as_str()) {
            q.append_child(elem(
                "identity",
                xml::DISCO_INFO,
                &[("category", "server"), ("type", "im"), ("name", "Isthmus")],
            ));
            for f in [xml::DISCO_INFO, xml::DISCO_ITEMS, xml::PING, CARBONS, ROSTER, xml::VERSION] {
                q.append_child(elem("feature", xml::DISCO_INFO, &[("var", f)]));
            }
        } else {
            q.append_child(elem("identity", xml::DISCO_INFO, &[("category", "account"), ("type", "registered")]));
            q.append_child(elem("feature", xml::DISCO_INFO, &[("var", xml::DISCO_INFO)]));
        }
        q
    }

    fn disco_items(&self, iq: &Element) -> Element {
        let mut q = Element::bare("query", xml::DISCO_ITEMS);
        if iq.attr("to") == Some(self.domain.as_str()) {
            for (domain, name) in &self.networks {
                q.append_child(elem("item", xml::DISCO_ITEMS, &[("jid", domain), ("name", name)]));
            }
        }
        q
    }

    // --- presence --------------------------------------------------------------------------

    async fn presence_from_client(&self, full: &str, user: &str, mut el: Element) {
        let kind = el.attr("type").map(str::to_owned);
        match (el.attr("to").map(str::to_owned), kind.as_deref()) {
            (None, None) | (None, Some("unavailable")) => {
                let available = kind.is_none();
                let first = {
                    let (u, resource) = full.split_once('/').unwrap_or((full, ""));
                    let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
                    match sessions.get_mut(u).and_then(|r| r.get_mut(resource)) {
                        Some(s) => {
                            let first = s.presence.is_none() && available;
                            s.presence = if available { Some(el.clone()) } else { None };
                            first
                        }
                        None => false,
                    }
                };
                if first {
                    self.initial_presence(full, user).await;
                }
                self.broadcast_presence(full, &el).await;
                if !available {
                    let directed = {
                        let (u, resource) = full.split_once('/').unwrap_or((full, ""));
                        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
                        sessions
                            .get_mut(u)
                            .and_then(|r| r.get_mut(resource))
                            .map(|s| std::mem::take(&mut s.directed))
                            .unwrap_or_default()
                    };
                    for target in directed {
                        set_attr(&mut el, "to", Some(&target));
                        self.route(el.clone()).await;
                    }
                }
            }
            (Some(to), None) | (Some(to), Some("unavailable")) => {
                // Directed presence (joining or leaving a MUC room among others).
                {
                    let (u, resource) = full.split_once('/').unwrap_or((full, ""));
                    let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(s) = sessions.get_mut(u).and_then(|r| r.get_mut(resource)) {
                        if kind.is_none() {
                            s.directed.insert(to.clone());
                        } else {
                            s.directed.remove(&to);
                        }
                    }
                }
                self.route(el).await;
            }
            (Some(to), Some("subscribe" | "subscribed" | "unsubscribe" | "unsubscribed")) => {
                self.outbound_subscription(user, &to, el).await;
            }
            (Some(_), Some("probe")) => {
                set_attr(&mut el, "from", Some(user));
                self.route(el).await;
            }
            (_, Some("error")) => self.route(el).await,
            _ => debug!(jid = %full, "ignoring a presence of unknown type"),
        }
    }

    /// A resource came online: show it its contacts' and its other resources' presence.
    async fn initial_presence(&self, full: &str, user: &str) {
        for p in self.presences_of(user) {
            if p.attr("from") != Some(full) {
                let mut copy = p.clone();
                set_attr(&mut copy, "to", Some(full));
                self.send_to_full(full, copy);
            }
        }
        let roster = self.store.roster(user).await.unwrap_or_else(|e| {
            warn!(error = %e, "cannot read the roster");
            Vec::new()
        });
        for item in roster.iter().filter(|i| i.subscription == "to" || i.subscription == "both") {
            if self.is_local(&item.contact) {
                for mut p in self.presences_of(&item.contact) {
                    set_attr(&mut p, "to", Some(full));
                    self.send_to_full(full, p);
                }
            } else if self.network_of(&item.contact).is_some() {
                let probe = elem("presence", CLIENT, &[("type", "probe"), ("from", user), ("to", &item.contact)]);
                self.route(probe).await;
            }
        }
    }

    /// Send a resource's presence to its other resources and to contacts subscribed to it.
    async fn broadcast_presence(&self, full: &str, el: &Element) {
        let user = xml::bare(full);
        for other in self.resources(user, true) {
            if other != full {
                let mut copy = el.clone();
                set_attr(&mut copy, "to", Some(&other));
                self.send_to_full(&other, copy);
            }
        }
        let roster = self.store.roster(user).await.unwrap_or_default();
        for item in roster.iter().filter(|i| i.subscription == "from" || i.subscription == "both") {
            let mut copy = el.clone();
            set_attr(&mut copy, "from", Some(full));
            set_attr(&mut copy, "to", Some(&item.contact));
            self.route(copy).await;
        }
    }

    async fn may_see_presence(&self, user: &str, asker: &str) -> bool {
        let asker = xml::bare(asker);
        if asker == user {
            return true;
        }
        matches!(self.store.roster_item(user, asker).await, Ok(Some(i)) if i.subscription == "from" || i.subscription == "both")
    }

    /// Roster pushes go to every resource of the user.
    fn push_roster(&self, user: &str, item: Element) {
        for full in self.resources(user, false) {
            let id = format!("push-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
            let iq = elem("iq", CLIENT, &[("type", "set"), ("id", &id), ("to", &full)]);
            let query = with_child(Element::bare("query", ROSTER), item.clone());
            self.send_to_full(&full, with_child(iq, query));
        }
    }
}
