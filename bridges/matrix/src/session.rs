//! One XMPP user's Matrix login: the matrix-sdk client with its own device and
//! store, the sync loop that turns what happens on Matrix into events for the
//! router, and the calls that render the router's events on Matrix.
//!
//! - Echoes of what this device sent (they carry its `transaction_id`) are not
//!   bridged again: XMPP already reflected them.
//! - Reactions: Matrix has one event per emoji, the model a full set per sender;
//!   [`ReactionBook`] keeps which reaction event is whose, so an XMPP set becomes
//!   the right sends and redactions, and a Matrix redaction the right new set.
//! - Direct chats (rooms marked `m.direct` with one other member) are contacts on
//!   XMPP, addressed by the other person's user id.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use isthmus_core::jid::BareJid;
use isthmus_core::model::{
    Affiliation, ChatKind, ChatRef, ChatState, Event, EventKind, LeaveKind, Message, MessageRef, NetworkId, Occupant,
    Role, Sender,
};
use isthmus_core::network::{Avatar, AvatarData, DeliveryError, EventSink, Profile, Routed};
use isthmus_core::outbox::Receipt;
use isthmus_core::store::{AccountRecord, Store};
use matrix_sdk::config::SyncSettings;
use matrix_sdk::ruma::api::client::receipt::create_receipt::v3::ReceiptType;
use matrix_sdk::ruma::events::receipt::ReceiptThread;
use matrix_sdk::ruma::{OwnedRoomId, OwnedTransactionId, OwnedUserId, RoomId, RoomOrAliasId, UserId};
use matrix_sdk::{Client, Room, RoomMemberships, RoomState};
use rand::Rng;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::address::MatrixTarget;
use crate::incoming::{self, Incoming, UserLevels};
use crate::outgoing;

/// A sync batch's acknowledgements and the token to store once they are all safe.
type Checkpoint = (Vec<Routed>, String);

/// Reaction events a [`ReactionBook`] remembers; past it the oldest are forgotten
/// (an XMPP reaction to a message that old then adds to what is on Matrix
/// instead of replacing it).
pub const MAX_REACTIONS: usize = 50_000;

/// Reactions per (room, target, sender): emoji → the reaction event carrying it.
/// Bounded: at most [`MAX_REACTIONS`] events, the oldest forgotten first.
#[derive(Debug, Default)]
pub struct ReactionBook {
    by_event: HashMap<String, (String, String, String, String)>,
    sets: HashMap<(String, String, String), Vec<(String, String)>>,
    /// Event ids in the order they were recorded (some may be gone already).
    order: std::collections::VecDeque<String>,
}

impl ReactionBook {
    /// Record reaction `event_id` = `key` by `sender` on `target`; returns the sender's new set.
    pub fn add(&mut self, room: &str, target: &str, sender: &str, key: &str, event_id: &str) -> Vec<String> {
        let k = (room.to_owned(), target.to_owned(), sender.to_owned());
        let set = self.sets.entry(k.clone()).or_default();
        if !set.iter().any(|(_, e)| e == event_id) {
            set.push((key.to_owned(), event_id.to_owned()));
        }
        let keys = Self::keys(set);
        let fresh = self
            .by_event
            .insert(event_id.to_owned(), (room.to_owned(), target.to_owned(), sender.to_owned(), key.to_owned()))
            .is_none();
        if fresh {
            self.order.push_back(event_id.to_owned());
        }
        self.prune();
        keys
    }

    /// Forget the oldest events past [`MAX_REACTIONS`].
    fn prune(&mut self) {
        while self.by_event.len() > MAX_REACTIONS {
            let Some(oldest) = self.order.pop_front() else { break };
            self.remove(&oldest);
        }
        if self.order.len() > 2 * MAX_REACTIONS {
            let by_event = &self.by_event;
            self.order.retain(|e| by_event.contains_key(e));
        }
    }

    /// Forget reaction `event_id`; returns (target, sender, the sender's new set) when it was one.
    pub fn remove(&mut self, event_id: &str) -> Option<(String, String, Vec<String>)> {
        let (room, target, sender, _) = self.by_event.remove(event_id)?;
        let k = (room, target.clone(), sender.clone());
        let set = self.sets.entry(k.clone()).or_default();
        set.retain(|(_, e)| e != event_id);
        let keys = Self::keys(set);
        if set.is_empty() {
            self.sets.remove(&k);
        }
        Some((target, sender, keys))
    }

    /// The reaction events `sender` has on `target`: (emoji, event id).
    pub fn of(&self, room: &str, target: &str, sender: &str) -> Vec<(String, String)> {
        self.sets.get(&(room.to_owned(), target.to_owned(), sender.to_owned())).cloned().unwrap_or_default()
    }

    fn keys(set: &[(String, String)]) -> Vec<String> {
        let mut seen = BTreeSet::new();
        set.iter().filter(|(k, _)| seen.insert(k.clone())).map(|(k, _)| k.clone()).collect()
    }
}

/// One linked account.
pub struct Session {
    pub account: BareJid,
    network: NetworkId,
    pub client: Client,
    pub user_id: OwnedUserId,
    sink: EventSink,
    reactions: StdMutex<ReactionBook>,
    typing: StdMutex<HashMap<OwnedRoomId, HashSet<String>>>,
    /// Rooms the user joined by alias: room id → the alias (their chat id on XMPP).
    aliases: StdMutex<HashMap<OwnedRoomId, String>>,
    /// Rooms whose events go to XMPP as direct chats: room id → the other person.
    directs: StdMutex<HashMap<OwnedRoomId, Option<String>>>,
    task: StdMutex<Option<JoinHandle<()>>>,
    pub store_dir: PathBuf,
    /// Where the resume point is kept (the account's `settings`).
    store: Store,
    /// The sync token up to which everything is safely in the router's hands: a
    /// restart syncs again from here, so nothing the homeserver sent is lost.
    resume_from: StdMutex<Option<String>>,
    /// Acknowledgements of the current sync batch's events.
    batch: StdMutex<Vec<Routed>>,
    /// Resume points to store, in order, each once its batch is safe.
    checkpoints: StdMutex<Option<mpsc::UnboundedSender<Checkpoint>>>,
    /// Fetches the files the user sends.
    fetcher: Arc<crate::media::Fetcher>,
}

fn unavailable(e: impl std::fmt::Display) -> DeliveryError {
    DeliveryError::Unavailable(format!("the Matrix homeserver did not accept it: {e}"))
}

/// A homeserver's answer as a delivery error: its refusals (403: not allowed;
/// other 4xx but rate limits: bad request) are final, the rest may pass later.
fn refusal(e: matrix_sdk::HttpError) -> DeliveryError {
    match e.as_client_api_error().map(|c| c.status_code.as_u16()) {
        Some(403) => DeliveryError::Forbidden(format!("the Matrix homeserver refused it: {e}")),
        Some(s) if (400..500).contains(&s) && s != 429 => {
            DeliveryError::Rejected(format!("the Matrix homeserver refused it: {e}"))
        }
        _ => unavailable(e),
    }
}

impl Session {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        account: BareJid,
        network: NetworkId,
        client: Client,
        user_id: OwnedUserId,
        sink: EventSink,
        store_dir: PathBuf,
        store: Store,
        resume_from: Option<String>,
        fetcher: Arc<crate::media::Fetcher>,
    ) -> Arc<Session> {
        Arc::new(Session {
            account,
            network,
            client,
            user_id,
            sink,
            reactions: StdMutex::default(),
            typing: StdMutex::default(),
            aliases: StdMutex::default(),
            directs: StdMutex::default(),
            task: StdMutex::new(None),
            store_dir,
            store,
            resume_from: StdMutex::new(resume_from),
            batch: StdMutex::default(),
            checkpoints: StdMutex::new(None),
            fetcher,
        })
    }

    /// Start syncing. `fresh`: a new login, whose first sync is the past (not bridged).
    pub fn start(self: &Arc<Self>, fresh: bool) {
        let me = self.clone();
        let span = info_span!("matrix_sync", account = %self.account, user = %self.user_id);
        let handle = tokio::spawn(async move { me.sync_loop(fresh).await }.instrument(span));
        if let Some(old) = self.task.lock().unwrap_or_else(|e| e.into_inner()).replace(handle) {
            old.abort();
        }
    }

    /// Stop syncing.
    pub fn stop(&self) {
        if let Some(t) = self.task.lock().unwrap_or_else(|e| e.into_inner()).take() {
            t.abort();
        }
    }

    async fn sync_loop(self: Arc<Self>, fresh: bool) {
        let settings = SyncSettings::default().timeout(Duration::from_secs(30));
        let (tx, rx) = mpsc::unbounded_channel();
        *self.checkpoints.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
        tokio::spawn(checkpoint_writer(
            self.store.clone(),
            self.account.to_string(),
            self.network.as_str().to_owned(),
            rx,
        ));
        // After a restart: from the last point known safe, not from where the
        // client's own store got to (it may have run ahead of the router).
        let resume = self.resume_from.lock().unwrap_or_else(|e| e.into_inner()).take();
        let mut replaying = resume.is_some();
        let mut next = match resume {
            Some(token) => settings.clone().token(token),
            None => settings.clone(),
        };
        if fresh {
            // What was said before the login is history, not news; pending invitations are news.
            match self.client.sync_once(settings.clone()).await {
                Ok(response) => {
                    for room_id in response.rooms.invited.keys() {
                        self.invited(room_id).await;
                    }
                }
                Err(e) => warn!(error = %e, "first sync failed"),
            }
        }
        let mut failures: u32 = 0;
        // When the rooms were told the homeserver cannot be reached (the outage lasts).
        let mut announced: Option<std::time::SystemTime> = None;
        loop {
            match self.client.sync_once(next.clone()).await {
                Ok(response) => {
                    if failures > 0 {
                        info!("Matrix sync is back");
                    }
                    if let Some(since) = announced.take() {
                        let secs = std::time::SystemTime::now().duration_since(since).unwrap_or_default().as_secs();
                        self.tell_rooms(&format!(
                            "The Matrix homeserver can be reached again (after {secs} s): what was said meanwhile follows, and what you sent is on its way."
                        ))
                        .await;
                    }
                    failures = 0;
                    next = settings.clone();
                    let token = response.next_batch.clone();
                    self.handle_sync(response, replaying).await;
                    replaying = false;
                    let acks = std::mem::take(&mut *self.batch.lock().unwrap_or_else(|e| e.into_inner()));
                    if let Some(tx) = self.checkpoints.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                        let _ = tx.send((acks, token));
                    }
                }
                Err(e) => {
                    if matches!(
                        e.client_api_error_kind(),
                        Some(matrix_sdk::ruma::api::error::ErrorKind::UnknownToken { .. })
                    ) {
                        warn!("the homeserver ended this Matrix session");
                        self.notify("Your Matrix session was ended by the homeserver: log in again (command `login`).")
                            .await;
                        return;
                    }
                    failures += 1;
                    let base = Duration::from_millis(500) * 2u32.saturating_pow(failures.min(7));
                    let wait = base.min(Duration::from_secs(60));
                    let jitter = rand::rng().random_range(0..=wait.as_millis() as u64 / 4);
                    warn!(error = %e, failures, "Matrix sync failed; retrying");
                    if failures == OUTAGE_AFTER_FAILURES && announced.is_none() {
                        // Not a passing hiccup: the rooms hear of it once, and of its end.
                        announced = Some(std::time::SystemTime::now());
                        let server = self.client.homeserver();
                        let server = server.host_str().map(|h| match server.port() {
                            Some(p) => format!("{h}:{p}"),
                            None => h.to_owned(),
                        });
                        self.tell_rooms(&format!(
                            "Lost the connection to the Matrix homeserver {}. Retrying; what you send meanwhile is kept and sent when it is back.",
                            server.unwrap_or_default()
                        ))
                        .await;
                    }
                    tokio::time::sleep(wait + Duration::from_millis(jitter)).await;
                }
            }
        }
    }

    /// A notice in every room the account is in (not direct chats), from the room.
    async fn tell_rooms(&self, text: &str) {
        let mut told = 0;
        for room in self.client.joined_rooms() {
            let chat = self.chat_of(&room).await;
            if chat.kind != ChatKind::Room {
                continue;
            }
            let event = self.emit_base(&chat, Sender::new("", ""), EventKind::Status { text: text.to_owned() });
            let _ = self.sink.emit(event).await;
            told += 1;
        }
        info!(rooms = told, "connection notice sent to the rooms");
    }

    /// A notice to the user from the network's own address.
    async fn notify(&self, text: &str) {
        let event = Event::new(
            self.network.clone(),
            ChatRef::service(self.network.clone(), ""),
            Sender::new("", "Matrix"),
            EventKind::Status { text: text.to_owned() },
        )
        .with_account(self.account.clone());
        let _ = self.sink.emit(event).await;
    }

    /// Bridge one sync response. `replaying`: it starts from the last safe point of an
    /// earlier run, so events the router already has (in the id map) are skipped.
    async fn handle_sync(&self, response: matrix_sdk::sync::SyncResponse, replaying: bool) {
        for (room_id, _) in response.rooms.invited.iter() {
            self.invited(room_id).await;
        }
        for (room_id, update) in response.rooms.joined {
            let Some(room) = self.client.get_room(&room_id) else { continue };
            let chat = self.chat_of(&room).await;
            if update.timeline.limited {
                // A gap: more happened since the last sync than one response holds (the
                // gateway was down, or a burst). Fetch the rest back to what was bridged.
                if let Some(prev) = update.timeline.prev_batch.as_deref() {
                    for json in self.backfill(&room, &chat, prev).await {
                        self.timeline_event(&room, &chat, &json).await;
                    }
                }
            }
            for item in &update.timeline.events {
                if let matrix_sdk::deserialized_responses::TimelineEventKind::UnableToDecrypt { utd_info, .. } =
                    &item.kind
                {
                    // Not bridged: without the room key there is nothing to show.
                    warn!(room = %room_id, event_id = ?item.event_id(), session_id = ?utd_info.session_id,
                        reason = ?utd_info.reason, "an encrypted Matrix event could not be decrypted; not bridged");
                    continue;
                }
                let json: Value = match serde_json::from_str(item.raw().json().get()) {
                    Ok(v) => v,
                    Err(e) => {
                        warn!(room = %room_id, error = %e, "unreadable timeline event skipped");
                        continue;
                    }
                };
                if replaying && self.already_bridged(&chat, &json).await {
                    continue;
                }
                self.timeline_event(&room, &chat, &json).await;
            }
            for raw in &update.ephemeral {
                if let Ok(v) = serde_json::from_str::<Value>(raw.json().get()) {
                    self.ephemeral(&room, &chat, &v).await;
                }
            }
        }
    }

    /// An invitation: direct chats are accepted (they are contacts), rooms are announced.
    async fn invited(&self, room_id: &RoomId) {
        let Some(room) = self.client.get_room(room_id) else { return };
        let inviter = room.invite_details().await.ok().and_then(|d| d.inviter).map(|m| m.user_id().to_string());
        let direct = room.is_direct().await.unwrap_or(false);
        if direct {
            info!(room = %room_id, "accepting a direct chat invitation");
            if let Err(e) = room.join().await {
                warn!(room = %room_id, error = %e, "cannot accept the invitation");
            }
            return;
        }
        let name = room.name().unwrap_or_else(|| room_id.to_string());
        self.notify(&format!(
            "{} invited you to the Matrix room {name} ({room_id}). Join it as a group chat at its address on this gateway.",
            inviter.as_deref().unwrap_or("Someone")
        ))
        .await;
    }

    /// How XMPP sees a room: a direct chat with its other member, or a room.
    pub async fn chat_of(&self, room: &Room) -> ChatRef {
        let room_id = room.room_id().to_owned();
        if let Some(alias) = self.aliases.lock().unwrap_or_else(|e| e.into_inner()).get(&room_id) {
            return ChatRef::room(self.network.clone(), alias.clone());
        }
        let cached = self.directs.lock().unwrap_or_else(|e| e.into_inner()).get(&room_id).cloned();
        let other = match cached {
            Some(other) => other,
            None => {
                let other = if room.is_direct().await.unwrap_or(false) {
                    let members =
                        room.members(RoomMemberships::JOIN | RoomMemberships::INVITE).await.unwrap_or_default();
                    let others: Vec<String> = members
                        .iter()
                        .filter(|m| m.user_id() != self.user_id)
                        .map(|m| m.user_id().to_string())
                        .collect();
                    if others.len() == 1 { others.into_iter().next() } else { None }
                } else {
                    None
                };
                self.directs.lock().unwrap_or_else(|e| e.into_inner()).insert(room_id.clone(), other.clone());
                other
            }
        };
        match other {
            Some(user) => ChatRef::direct(self.network.clone(), user),
            None => ChatRef::room(self.network.clone(), room_id.to_string()),
        }
    }

    /// The MUC nick of `user` in `room`: the display name, made unique with the user id when ambiguous.
    pub async fn nick_of(&self, room: &Room, user: &str) -> String {
        let Ok(uid) = UserId::parse(user) else { return user.to_owned() };
        match room.get_member_no_sync(&uid).await {
            Ok(Some(m)) => {
                let name = m.name();
                if m.name_ambiguous() || name.is_empty() { format!("{name} ({user})") } else { name.to_owned() }
            }
            _ => user.to_owned(),
        }
    }

    fn emit_base(&self, chat: &ChatRef, sender: Sender, kind: EventKind) -> Event {
        Event::new(self.network.clone(), chat.clone(), sender, kind).with_account(self.account.clone())
    }

    async fn timeline_event(&self, room: &Room, chat: &ChatRef, json: &Value) {
        let (env, mut incoming) = match incoming::parse_unstyled(json) {
            Ok(x) => x,
            Err(e) => {
                warn!(room = %room.room_id(), error = %e, "Matrix event not bridged");
                return;
            }
        };
        incoming::style(&mut incoming, &env.event_id).await;
        incoming::fit_for_xmpp(&mut incoming, room.room_id().as_str(), &env.event_id);
        let own = env.sender == self.user_id.as_str();
        let room_id = room.room_id().as_str();
        // Reactions are tracked even when they are our own echo: removing them later needs their ids.
        if let Incoming::Reaction { target, key } = &incoming {
            let set = self.book().add(room_id, &target.0, &env.sender, key, &env.event_id);
            if env.transaction_id.is_some() {
                return;
            }
            let nick = self.nick_of(room, &env.sender).await;
            let sender =
                if own { Sender::own(env.sender.clone(), nick) } else { Sender::new(env.sender.clone(), nick) };
            let event = self
                .emit_base(chat, sender, EventKind::Reactions { target: target.clone(), emojis: set })
                .with_origin_id(env.event_id.clone())
                .at(env.time);
            self.emit_timeline(event).await;
            return;
        }
        if env.transaction_id.is_some() && own {
            debug!(event_id = %env.event_id, "echo of our own event");
            if let Incoming::Redaction { redacts, .. } = &incoming {
                self.book().remove(redacts);
            }
            return;
        }
        if own && chat.kind == ChatKind::Direct && !matches!(incoming, Incoming::Member { .. }) {
            // Sent from another Matrix client of the same person: XMPP has no way to show
            // it as theirs in a one-to-one chat yet.
            debug!(event_id = %env.event_id, "own message from another device in a direct chat");
            return;
        }
        let nick = self.nick_of(room, &env.sender).await;
        let sender = if own {
            Sender::own(env.sender.clone(), nick.clone())
        } else {
            Sender::new(env.sender.clone(), nick.clone())
        };
        let kind = match incoming {
            Incoming::Message { message } => EventKind::Message(message),
            Incoming::Edit { target, message } => EventKind::Correction { target, message },
            Incoming::Reaction { .. } => return,
            Incoming::Redaction { redacts, reason } => {
                let removed = self.book().remove(&redacts);
                match removed {
                    Some((target, reactor, emojis)) => {
                        let nick = self.nick_of(room, &reactor).await;
                        let sender = if reactor == self.user_id.as_str() {
                            Sender::own(reactor, nick)
                        } else {
                            Sender::new(reactor, nick)
                        };
                        let event = self
                            .emit_base(chat, sender, EventKind::Reactions { target: MessageRef(target), emojis })
                            .with_origin_id(env.event_id.clone())
                            .at(env.time);
                        self.emit_timeline(event).await;
                        return;
                    }
                    None => {
                        let moderator = self.moderator_of(room, &redacts, &env.sender, &nick).await;
                        EventKind::Retraction { target: MessageRef(redacts), moderator, reason }
                    }
                }
            }
            Incoming::Member { user, membership, previous, displayname, previous_displayname, reason } => {
                if chat.kind != ChatKind::Room {
                    return;
                }
                let was_in = previous.as_deref() == Some("join");
                let subject_nick = match &displayname {
                    Some(d) if !d.is_empty() => d.clone(),
                    _ => self.nick_of(room, &user).await,
                };
                let subject = if user == self.user_id.as_str() {
                    Sender::own(user.clone(), subject_nick.clone())
                } else {
                    Sender::new(user.clone(), subject_nick.clone())
                };
                match membership.as_str() {
                    "join" if !was_in => {
                        // Someone may enter with a level already (set before, or by default).
                        let levels = room.power_levels().await.ok();
                        let level = UserId::parse(&user).map_or(0, |u| level_for(levels.as_ref(), &u));
                        EventKind::Joined { occupant: occupant_at_level(&user, subject_nick, level) }
                    }
                    "join" if displayname != previous_displayname => {
                        let old = previous_displayname.unwrap_or_else(|| user.clone());
                        let event = self
                            .emit_base(
                                chat,
                                Sender::new(user.clone(), old),
                                EventKind::NickChanged { new_nick: subject_nick },
                            )
                            .with_origin_id(env.event_id.clone());
                        self.emit_timeline(event).await;
                        return;
                    }
                    "leave" | "ban" if was_in => {
                        let by = (env.sender != user).then(|| nick.clone());
                        let kind = match (membership.as_str(), by) {
                            ("ban", by) => LeaveKind::Ban { by },
                            (_, Some(by)) => LeaveKind::Kick { by: Some(by) },
                            _ => LeaveKind::Part,
                        };
                        if subject.is_self {
                            // The XMPP side shows it as the user removed from the room.
                        }
                        let event = self
                            .emit_base(chat, subject, EventKind::Left { kind, reason })
                            .with_origin_id(env.event_id.clone());
                        self.emit_timeline(event).await;
                        return;
                    }
                    _ => return,
                }
            }
            Incoming::Topic { text } => EventKind::Topic { text },
            Incoming::PowerLevels { now, before } => {
                if chat.kind == ChatKind::Room {
                    self.levels_changed(room, chat, &env, &now, before.as_ref()).await;
                }
                return;
            }
            Incoming::Other => return,
        };
        let kind = crate::media::proxied(&self.network, kind);
        let event = self.emit_base(chat, sender, kind).with_origin_id(env.event_id.clone()).at(env.time);
        self.emit_timeline(event).await;
    }

    /// The room's power levels changed: every member whose MUC role or affiliation
    /// follows a new level gets a role change, the user's own included (their own
    /// role decides whether the XMPP side lets them moderate).
    async fn levels_changed(
        &self,
        room: &Room,
        chat: &ChatRef,
        env: &incoming::Envelope,
        now: &UserLevels,
        before: Option<&UserLevels>,
    ) {
        let members = match room.members(RoomMemberships::JOIN).await {
            Ok(m) => m,
            Err(e) => {
                warn!(room = %room.room_id(), error = %e, "cannot read the room's members; role changes not bridged");
                return;
            }
        };
        let users: Vec<String> = members.iter().map(|m| m.user_id().to_string()).collect();
        for (user, role, affiliation) in role_changes(now, before, users.iter().map(String::as_str)) {
            let nick = self.nick_of(room, &user).await;
            let sender = if user == self.user_id.as_str() { Sender::own(user, nick) } else { Sender::new(user, nick) };
            let event = self
                .emit_base(chat, sender, EventKind::RoleChanged { role, affiliation })
                .with_origin_id(env.event_id.clone())
                .at(env.time);
            self.emit_timeline(event).await;
        }
    }

    /// The events before a gappy sync's timeline, oldest first, back to the newest
    /// event already bridged (at most [`BACKFILL_MAX`]).
    async fn backfill(&self, room: &Room, chat: &ChatRef, prev_batch: &str) -> Vec<Value> {
        let mut newest_first = Vec::new();
        let mut from = Some(prev_batch.to_owned());
        'pages: while newest_first.len() < BACKFILL_MAX {
            let mut options = matrix_sdk::room::MessagesOptions::backward();
            options.from = from.clone();
            options.limit = 100u32.into();
            let page = match room.messages(options).await {
                Ok(page) => page,
                Err(e) => {
                    warn!(room = %room.room_id(), error = %e, "cannot fetch the events of a sync gap; some are not bridged");
                    break;
                }
            };
            if page.chunk.is_empty() {
                break;
            }
            for item in &page.chunk {
                let Ok(json) = serde_json::from_str::<Value>(item.raw().json().get()) else { continue };
                if self.already_bridged(chat, &json).await {
                    break 'pages;
                }
                newest_first.push(json);
            }
            from = page.end;
            if from.is_none() {
                break;
            }
        }
        info!(room = %room.room_id(), events = newest_first.len(), "fetched the events of a sync gap");
        newest_first.reverse();
        newest_first
    }

    /// Hand a timeline event to the router; its acknowledgement joins the batch's.
    async fn emit_timeline(&self, event: Event) {
        match self.sink.emit_routed(event).await {
            Ok(routed) => self.batch.lock().unwrap_or_else(|e| e.into_inner()).push(routed),
            Err(e) => debug!(error = %e, "router gone; Matrix event not bridged"),
        }
    }

    /// Whether the router already has this event (its id is in the id map): on the
    /// first sync after a restart, what the last run bridged comes again.
    async fn already_bridged(&self, chat: &ChatRef, json: &Value) -> bool {
        let Some(event_id) = json.get("event_id").and_then(Value::as_str) else { return false };
        let scope = isthmus_core::router::id_scope(Some(&self.account), chat);
        match self.store.key_for_remote(self.network.as_str(), &scope, event_id).await {
            Ok(Some(_)) => {
                debug!(event_id, "bridged before the restart; not again");
                true
            }
            Ok(None) => false,
            Err(e) => {
                warn!(error = %e, "id map lookup failed; the event is bridged");
                false
            }
        }
    }

    fn book(&self) -> std::sync::MutexGuard<'_, ReactionBook> {
        self.reactions.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn ephemeral(&self, room: &Room, chat: &ChatRef, ev: &Value) {
        match ev.get("type").and_then(Value::as_str) {
            Some("m.typing") => {
                let now: HashSet<String> = ev["content"]["user_ids"]
                    .as_array()
                    .map(|a| a.iter().filter_map(Value::as_str).map(str::to_owned).collect())
                    .unwrap_or_default();
                let before = {
                    let mut map = self.typing.lock().unwrap_or_else(|e| e.into_inner());
                    map.insert(room.room_id().to_owned(), now.clone()).unwrap_or_default()
                };
                let changes = now
                    .difference(&before)
                    .map(|u| (u.clone(), ChatState::Composing))
                    .chain(before.difference(&now).map(|u| (u.clone(), ChatState::Paused)))
                    .filter(|(u, _)| u != self.user_id.as_str())
                    .collect::<Vec<_>>();
                for (user, state) in changes {
                    let nick = self.nick_of(room, &user).await;
                    let _ =
                        self.sink.emit(self.emit_base(chat, Sender::new(user, nick), EventKind::Typing(state))).await;
                }
            }
            Some("m.receipt") => {
                let Some(content) = ev.get("content").and_then(Value::as_object) else { return };
                for (event_id, receipts) in content {
                    let Some(readers) = receipts.get("m.read").and_then(Value::as_object) else { continue };
                    for user in readers.keys().filter(|u| u.as_str() != self.user_id.as_str()) {
                        let nick = self.nick_of(room, user).await;
                        let event = self.emit_base(
                            chat,
                            Sender::new(user.clone(), nick),
                            EventKind::Displayed { target: MessageRef(event_id.clone()) },
                        );
                        let _ = self.sink.emit(event).await;
                    }
                }
            }
            _ => {}
        }
    }

    /// The Matrix room behind an XMPP chat id, joining or creating it when needed.
    pub async fn room_for(&self, chat: &ChatRef, create: bool) -> Result<Room, DeliveryError> {
        let target = MatrixTarget::parse(chat.id.as_str())
            .ok_or_else(|| DeliveryError::Rejected(format!("`{}` is not a Matrix room or user id", chat.id)))?;
        match target {
            MatrixTarget::Room(id) => {
                let room_id = RoomId::parse(&id).map_err(|e| DeliveryError::Rejected(format!("`{id}`: {e}")))?;
                let known = self.client.get_room(&room_id);
                if let Some(r) = known
                    && (r.state() == RoomState::Joined || (!create && joined_soon(&r).await))
                {
                    return Ok(r);
                }
                if !create {
                    return Err(DeliveryError::Rejected(format!("you are not in the Matrix room {id}: join it first")));
                }
                self.client
                    .join_room_by_id(&room_id)
                    .await
                    .map_err(|e| DeliveryError::Rejected(format!("cannot join the Matrix room {id}: {e}")))
            }
            MatrixTarget::Alias(alias) => {
                let known = {
                    let aliases = self.aliases.lock().unwrap_or_else(|e| e.into_inner());
                    aliases.iter().find(|(_, a)| **a == alias).map(|(id, _)| id.clone())
                };
                if let Some(room) = known.and_then(|id| self.client.get_room(&id))
                    && (room.state() == RoomState::Joined || (!create && joined_soon(&room).await))
                {
                    return Ok(room);
                }
                if !create {
                    return Err(DeliveryError::Rejected(format!(
                        "you are not in the Matrix room {alias}: join it first"
                    )));
                }
                let id =
                    RoomOrAliasId::parse(&alias).map_err(|e| DeliveryError::Rejected(format!("`{alias}`: {e}")))?;
                let room = self
                    .client
                    .join_room_by_id_or_alias(&id, &[])
                    .await
                    .map_err(|e| DeliveryError::Rejected(format!("cannot join the Matrix room {alias}: {e}")))?;
                self.aliases.lock().unwrap_or_else(|e| e.into_inner()).insert(room.room_id().to_owned(), alias);
                Ok(room)
            }
            MatrixTarget::User(user) => {
                let uid = UserId::parse(&user).map_err(|e| DeliveryError::Rejected(format!("`{user}`: {e}")))?;
                if let Some(room) = self.client.get_dm_room(&uid)
                    && room.state() == RoomState::Joined
                {
                    self.directs
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(room.room_id().to_owned(), Some(user));
                    return Ok(room);
                }
                let room = self
                    .client
                    .create_dm(&uid)
                    .await
                    .map_err(|e| DeliveryError::Rejected(format!("cannot start a direct chat with {user}: {e}")))?;
                self.directs.lock().unwrap_or_else(|e| e.into_inner()).insert(room.room_id().to_owned(), Some(user));
                Ok(room)
            }
        }
    }

    /// The user asked to enter a room: join on Matrix if needed, then tell XMPP who is there.
    pub async fn enter(&self, chat: &ChatRef, nick: &str) -> Result<(), DeliveryError> {
        let room = self.room_for(chat, true).await?;
        let members = room.members(RoomMemberships::JOIN).await.map_err(unavailable)?;
        let levels = room.power_levels().await.ok();
        let mut occupants = Vec::new();
        let level_of = |user: &UserId| level_for(levels.as_ref(), user);
        for m in members.iter().filter(|m| m.user_id() != self.user_id) {
            let nick = self.nick_of(&room, m.user_id().as_str()).await;
            occupants.push(occupant_at_level(m.user_id().as_str(), nick, level_of(m.user_id())));
        }
        let own = Sender::own(self.user_id.to_string(), nick.to_owned());
        let event = self.emit_base(
            chat,
            own.clone(),
            EventKind::SelfJoined { nick: nick.to_owned(), occupants, topic: room.topic() },
        );
        self.sink.emit(event).await.map_err(|e| DeliveryError::Unavailable(e.to_string()))?;
        // The user's own standing, when above a participant's (a Matrix moderator is a
        // MUC moderator, who may remove others' messages by XEP-0425).
        let level = self.own_level(&room).await.unwrap_or(0).max(level_of(&self.user_id));
        let me = occupant_at_level(self.user_id.as_str(), nick.to_owned(), level);
        if me.role != Role::Participant {
            let kind = EventKind::RoleChanged { role: me.role, affiliation: me.affiliation };
            let event = self.emit_base(chat, own, kind);
            self.sink.emit(event).await.map_err(|e| DeliveryError::Unavailable(e.to_string()))?;
        }
        Ok(())
    }

    /// The user's own power level in `room` as the homeserver has it now: right
    /// after joining, the local store may not hold the room's state yet.
    async fn own_level(&self, room: &Room) -> Option<i64> {
        use matrix_sdk::ruma::api::client::state::get_state_event_for_key::v3::Request;
        use matrix_sdk::ruma::events::StateEventType;
        let request = Request::new(room.room_id().to_owned(), StateEventType::RoomPowerLevels, String::new());
        let response = match self.client.send(request).await {
            Ok(r) => r,
            Err(e) => {
                debug!(room = %room.room_id(), error = %e, "cannot read the room's power levels");
                return None;
            }
        };
        let event: Value = serde_json::from_str(response.event_or_content.get()).ok()?;
        let content = event.get("content").unwrap_or(&event);
        content["users"][self.user_id.as_str()].as_i64().or_else(|| content["users_default"].as_i64())
    }

    /// Send one event. `txn` is the idempotency key: the homeserver answers a second
    /// send with the same key (a replay after a crash) with the first event, not a new one.
    async fn send_json(&self, room: &Room, kind: &str, content: Value, txn: &str) -> Result<String, DeliveryError> {
        let txn = OwnedTransactionId::from(txn);
        let response = room.send_raw(kind, content).with_transaction_id(&txn).await.map_err(unavailable)?;
        Ok(response.response.event_id.to_string())
    }

    /// A message; its attachments are fetched, uploaded and sent as file events
    /// (`{txn}-file{i}`) after its text, if it has any besides their URLs.
    /// `stored`: the copy's outbox row (a long conversion waits until it is durable).
    pub async fn send_message(
        &self,
        chat: &ChatRef,
        m: &Message,
        txn: &str,
        stored: Option<&Receipt>,
    ) -> Result<Vec<String>, DeliveryError> {
        let ctx = outgoing::Sending { id: txn, stored };
        let room = self.room_for(chat, chat.kind == ChatKind::Direct).await?;
        if m.attachments.is_empty() {
            let content = outgoing::message_content_bounded(m, ctx).await?;
            return Ok(vec![self.send_json(&room, "m.room.message", content, txn).await?]);
        }
        // All files first: one that cannot be had sends nothing. An encrypted room's are encrypted.
        let encrypt = room.latest_encryption_state().await.map_err(unavailable)?.is_encrypted();
        let mut files = Vec::with_capacity(m.attachments.len());
        for a in &m.attachments {
            files.push(crate::media::upload_attachment(&self.client, &self.fetcher, a, encrypt).await?);
        }
        let mut ids = Vec::with_capacity(files.len() + 1);
        if let Some(text) = outgoing::text_beside_files(m) {
            let content = outgoing::message_content_bounded(&text, ctx).await?;
            ids.push(self.send_json(&room, "m.room.message", content, txn).await?);
        }
        for (i, file) in files.iter().enumerate() {
            let content = outgoing::file_content(m, file);
            ids.push(self.send_json(&room, "m.room.message", content, &format!("{txn}-file{i}")).await?);
        }
        Ok(ids)
    }

    pub async fn send_edit(
        &self,
        chat: &ChatRef,
        target: &str,
        m: &Message,
        txn: &str,
        stored: Option<&Receipt>,
    ) -> Result<Vec<String>, DeliveryError> {
        let room = self.room_for(chat, false).await?;
        let content = outgoing::edit_content_bounded(target, m, outgoing::Sending { id: txn, stored }).await?;
        Ok(vec![self.send_json(&room, "m.room.message", content, txn).await?])
    }

    pub async fn redact(
        &self,
        chat: &ChatRef,
        target: &str,
        reason: Option<&str>,
        txn: &str,
    ) -> Result<Vec<String>, DeliveryError> {
        let room = self.room_for(chat, false).await?;
        let id = matrix_sdk::ruma::EventId::parse(target)
            .map_err(|_| DeliveryError::Rejected(format!("`{target}` is no Matrix event: nothing to retract")))?;
        let r = room.redact(&id, reason, Some(OwnedTransactionId::from(txn))).await.map_err(refusal)?;
        Ok(vec![r.event_id.to_string()])
    }

    /// `nick` when `redactor` removed someone else's event (a moderation, XEP-0425 on
    /// XMPP); `None` for a self-redaction or when the event's author cannot be found.
    async fn moderator_of(&self, room: &Room, redacts: &str, redactor: &str, nick: &str) -> Option<String> {
        let id = matrix_sdk::ruma::EventId::parse(redacts).ok()?;
        let author = match room.load_or_fetch_event(&id, None).await {
            Ok(event) => event.raw().get_field::<String>("sender").ok().flatten(),
            Err(e) => {
                debug!(event_id = redacts, error = %e, "the redacted event's author is unknown");
                None
            }
        }?;
        (author != redactor).then(|| nick.to_owned())
    }

    /// Make our reactions on `target` exactly `emojis`.
    pub async fn set_reactions(
        &self,
        chat: &ChatRef,
        target: &str,
        emojis: &[String],
        txn: &str,
    ) -> Result<Vec<String>, DeliveryError> {
        if !target.starts_with('$') {
            return Err(DeliveryError::Rejected("the message reacted to is not known on Matrix".into()));
        }
        let room = self.room_for(chat, false).await?;
        let room_id = room.room_id().as_str().to_owned();
        let have = self.book().of(&room_id, target, self.user_id.as_str());
        let mut ids = Vec::new();
        for (key, event_id) in &have {
            if !emojis.contains(key) {
                let id =
                    matrix_sdk::ruma::EventId::parse(event_id).map_err(|e| DeliveryError::Rejected(e.to_string()))?;
                let txn = OwnedTransactionId::from(format!("{txn}-{event_id}"));
                room.redact(&id, None, Some(txn)).await.map_err(unavailable)?;
                self.book().remove(event_id);
            }
        }
        for key in emojis {
            if !have.iter().any(|(k, _)| k == key) {
                let txn = format!("{txn}-{key}");
                let event_id =
                    self.send_json(&room, "m.reaction", outgoing::reaction_content(target, key), &txn).await?;
                self.book().add(&room_id, target, self.user_id.as_str(), key, &event_id);
                ids.push(event_id);
            }
        }
        Ok(ids)
    }

    pub async fn typing(&self, chat: &ChatRef, state: ChatState) -> Result<(), DeliveryError> {
        let room = self.room_for(chat, false).await?;
        room.typing_notice(state == ChatState::Composing).await.map_err(unavailable)
    }

    pub async fn displayed(&self, chat: &ChatRef, target: &str) -> Result<(), DeliveryError> {
        let Ok(id) = matrix_sdk::ruma::EventId::parse(target) else { return Ok(()) };
        let room = self.room_for(chat, false).await?;
        room.send_single_receipt(ReceiptType::Read, ReceiptThread::Unthreaded, id).await.map_err(unavailable)
    }

    pub async fn set_topic(&self, chat: &ChatRef, text: &str) -> Result<(), DeliveryError> {
        let room = self.room_for(chat, false).await?;
        room.set_room_topic(text).await.map(|_| ()).map_err(unavailable)
    }

    /// The profile of the Matrix user `user` (display name and picture), fetched
    /// through this account's client: the picture's mxc is downloaded with the
    /// account's own access (authenticated media).
    pub async fn profile(&self, user: &str) -> Result<Profile, DeliveryError> {
        use matrix_sdk::media::{MediaFormat, MediaRequestParameters};
        use matrix_sdk::ruma::api::client::profile::{AvatarUrl, DisplayName};
        use matrix_sdk::ruma::events::room::MediaSource;

        let user_id = UserId::parse(user)
            .map_err(|e| DeliveryError::Rejected(format!("`{user}` is not a Matrix user id: {e}")))?;
        let response = self
            .client
            .account()
            .fetch_user_profile_of(&user_id)
            .await
            .map_err(|e| DeliveryError::Unavailable(format!("cannot read the profile of {user}: {e}")))?;
        let display_name = response.get_static::<DisplayName>().ok().flatten();
        let avatar = match response.get_static::<AvatarUrl>().ok().flatten() {
            Some(mxc) => {
                let request = MediaRequestParameters { source: MediaSource::Plain(mxc), format: MediaFormat::File };
                match self.client.media().get_media_content(&request, true).await {
                    Ok(bytes) => Some(Avatar { data: AvatarData::Bytes(bytes), mime: None }),
                    Err(e) => {
                        warn!(user, error = %e, "cannot download the profile picture");
                        None
                    }
                }
            }
            None => None,
        };
        Ok(Profile { display_name, avatar })
    }

    /// The rooms this account is in (not direct chats), for the room directory.
    pub async fn joined_rooms(&self) -> Vec<(String, Option<String>)> {
        let mut out = Vec::new();
        for room in self.client.joined_rooms() {
            let chat = self.chat_of(&room).await;
            if chat.kind == ChatKind::Room {
                out.push((chat.id.0, room.name()));
            }
        }
        out.sort();
        out
    }
}

/// Whether a room the account was invited to shows as joined within a few seconds.
/// Right after a join, a sync response computed before it can still list the room
/// as an invitation until the next one arrives; a message sent in that moment
/// waits for it instead of being refused.
async fn joined_soon(room: &Room) -> bool {
    if room.state() != RoomState::Invited {
        return false;
    }
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if room.state() == RoomState::Joined {
            debug!(room = %room.room_id(), "the join showed after a stale sync");
            return true;
        }
    }
    false
}

/// Store each sync batch's token once all of its events are safe, in order.
async fn checkpoint_writer(
    store: Store,
    account: String,
    network: String,
    mut rx: mpsc::UnboundedReceiver<(Vec<Routed>, String)>,
) {
    while let Some((acks, token)) = rx.recv().await {
        for ack in acks {
            if !ack.wait().await {
                return; // shutting down: keep the last stored point
            }
        }
        let record = match store.account(&account, &network).await {
            Ok(Some(r)) => r,
            Ok(None) => return, // logged out
            Err(e) => {
                warn!(error = %e, "cannot read the Matrix login to store the sync point");
                continue;
            }
        };
        let mut settings: serde_json::Map<String, Value> = serde_json::from_str(&record.settings).unwrap_or_default();
        settings.insert(SYNC_TOKEN.into(), Value::String(token));
        let updated = AccountRecord { settings: Value::Object(settings).to_string(), ..record };
        if let Err(e) = store.upsert_account(&updated).await {
            warn!(error = %e, "cannot store the Matrix sync point");
        }
    }
}

/// `user`'s power level at `levels` (a creator outranking everyone counts as 100;
/// unknown levels as 0).
fn level_for(levels: Option<&matrix_sdk::ruma::events::room::power_levels::RoomPowerLevels>, user: &UserId) -> i64 {
    match levels.map(|p| p.for_user(user)) {
        Some(matrix_sdk::ruma::events::room::power_levels::UserPowerLevel::Int(i)) => i.into(),
        Some(_) => 100,
        None => 0,
    }
}

/// A room member as a MUC occupant: power level 50 and above moderate, 100 own.
pub fn occupant_at_level(user: &str, nick: String, level: i64) -> Occupant {
    Occupant {
        id: isthmus_core::model::RemoteId::new(user),
        nick,
        role: if level >= 50 { Role::Moderator } else { Role::Participant },
        affiliation: if level >= 100 {
            Affiliation::Owner
        } else if level >= 50 {
            Affiliation::Admin
        } else {
            Affiliation::Member
        },
    }
}

/// Consecutive failed syncs (about 1.5 s of trying) before the rooms are told the
/// homeserver cannot be reached.
const OUTAGE_AFTER_FAILURES: u32 = 2;

/// The members (of `members`) whose MUC role or affiliation differs at the levels
/// `now` from `before` (unknown before: everyone's is told), with their new standing.
pub fn role_changes<'a>(
    now: &UserLevels,
    before: Option<&UserLevels>,
    members: impl IntoIterator<Item = &'a str>,
) -> Vec<(String, Role, Affiliation)> {
    members
        .into_iter()
        .filter_map(|user| {
            let new = occupant_at_level(user, String::new(), now.level(user));
            let old = before.map(|b| occupant_at_level(user, String::new(), b.level(user)));
            let changed = old.is_none_or(|o| (o.role, o.affiliation) != (new.role, new.affiliation));
            changed.then(|| (user.to_owned(), new.role, new.affiliation))
        })
        .collect()
}

/// The most events fetched to fill one sync gap.
const BACKFILL_MAX: usize = 5000;

/// The key of the resume point in an account's settings.
pub const SYNC_TOKEN: &str = "sync_token";

#[cfg(test)]
mod tests {
    use super::ReactionBook;

    #[test]
    fn reaction_sets_follow_adds_and_redactions() {
        let mut b = ReactionBook::default();
        assert_eq!(b.add("!r", "$t", "@a", "👍", "$1"), vec!["👍"]);
        assert_eq!(b.add("!r", "$t", "@a", "🎉", "$2"), vec!["👍", "🎉"]);
        assert_eq!(b.add("!r", "$t", "@b", "👍", "$3"), vec!["👍"]);
        // The same event seen twice (sync replay) changes nothing.
        assert_eq!(b.add("!r", "$t", "@a", "🎉", "$2"), vec!["👍", "🎉"]);
        assert_eq!(b.remove("$1"), Some(("$t".into(), "@a".into(), vec!["🎉".into()])));
        assert_eq!(b.remove("$1"), None);
        assert_eq!(b.of("!r", "$t", "@a"), vec![("🎉".to_owned(), "$2".to_owned())]);
        assert_eq!(b.remove("$9"), None);
    }

    #[test]
    fn the_reaction_book_forgets_the_oldest_past_its_bound() {
        let mut b = ReactionBook::default();
        let n = super::MAX_REACTIONS + 100;
        for i in 0..n {
            b.add("!r", &format!("$t{i}"), "@a", "👍", &format!("$e{i}"));
        }
        assert_eq!(b.by_event.len(), super::MAX_REACTIONS);
        assert_eq!(b.sets.len(), super::MAX_REACTIONS, "no empty sets left behind");
        assert!(b.of("!r", "$t0", "@a").is_empty(), "the oldest is forgotten");
        assert_eq!(b.of("!r", &format!("$t{}", n - 1), "@a").len(), 1, "the newest is kept");
        // Removals and re-adds never let the order queue grow past twice the bound.
        for i in 0..(3 * super::MAX_REACTIONS) {
            let e = format!("$x{i}");
            b.add("!r", "$same", "@a", "🎉", &e);
            b.remove(&e);
        }
        assert!(b.order.len() <= 2 * super::MAX_REACTIONS + 1, "{}", b.order.len());
    }

    #[test]
    fn role_changes_follow_the_levels_that_change_a_standing() {
        use super::role_changes;
        use crate::incoming::UserLevels;
        use isthmus_core::model::{Affiliation, Role};
        let levels = |pairs: &[(&str, i64)], default| UserLevels {
            users: pairs.iter().map(|(u, l)| (u.to_string(), *l)).collect(),
            users_default: default,
        };
        let before = levels(&[("@bob:l", 100), ("@dan:l", 50)], 0);
        let now = levels(&[("@bob:l", 100), ("@carol:l", 50), ("@dan:l", 75), ("@me:l", 100)], 0);
        let members = ["@bob:l", "@carol:l", "@dan:l", "@me:l", "@eve:l"];
        assert_eq!(
            role_changes(&now, Some(&before), members),
            vec![
                ("@carol:l".to_owned(), Role::Moderator, Affiliation::Admin),
                ("@me:l".to_owned(), Role::Moderator, Affiliation::Owner),
            ]
        );
        // Demoted back; a new default reaches everyone not listed.
        let demoted = levels(&[("@bob:l", 100)], 0);
        assert_eq!(
            role_changes(&demoted, Some(&now), ["@carol:l"]),
            vec![("@carol:l".to_owned(), Role::Participant, Affiliation::Member)]
        );
        let raised = levels(&[("@bob:l", 100)], 50);
        assert_eq!(role_changes(&raised, Some(&demoted), ["@bob:l", "@eve:l"]).len(), 1);
        assert_eq!(role_changes(&now, None, ["@eve:l"]).len(), 1);
    }
}
