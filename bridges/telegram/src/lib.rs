//! The Telegram bridge: a bot (Bot API, through teloxide-core) whose groups are
//! portals.
//!
//! - **Telegram → XMPP**: one long poll at a time (`getUpdates`); each update's
//!   events are handed to the router and the poll offset is committed in SQL only
//!   once every one of them is in the durable outbox, so a crash loses nothing; an
//!   update seen again after a crash is recognised by its message id in the id
//!   map and not bridged twice. A person who speaks for the first time enters the
//!   room (the Bot API cannot list a group's members); the chat's administrators
//!   are there from the start, as moderators.
//! - **XMPP → Telegram**: the bot speaks for people from elsewhere by the relay
//!   template, their nick in bold; styling travels as entities, never with a
//!   parse mode. Flood control (429) is waited out, in order; a group that became
//!   a supergroup is followed (the portal is linked to the new id).
//!
//! The Bot API sends bots no deletions: a message deleted on Telegram stays on
//! XMPP (see docs/telegram.md).

pub mod api;
pub mod incoming;
pub mod outgoing;

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use isthmus_config::TelegramNetworkConfig;
use isthmus_core::ghosts::Ghosts;
use isthmus_core::media::Fetcher;
use isthmus_core::media::proxy::{MediaError, MediaLinks, MediaProxy, MediaSource};
use isthmus_core::model::{
    Affiliation, ChatKind, ChatRef, ChatState, Event, EventKind, LeaveKind, NetworkId, Occupant, Role, Sender,
};
use isthmus_core::network::{Capabilities, Delivered, DeliveryError, EventSink, Network};
use isthmus_core::portal::Portals;
use isthmus_core::relay::RelayTemplate;
use isthmus_core::router::id_scope;
use isthmus_core::store::Store;
use teloxide_core::types::{MaybeAnonymousUser, UpdateKind};
use tracing::{debug, info, warn};

use crate::api::{ApiError, BotApi, OutgoingText, Target};

/// How long the bridge waits out flood control for one message before the router
/// keeps it for later.
const MAX_FLOOD_WAIT: Duration = Duration::from_secs(120);

/// What the bridge knows of its chats.
#[derive(Default)]
struct State {
    bot_id: Option<u64>,
    bot_name: Option<String>,
    /// Chats whose administrators were asked for.
    admins_known: HashSet<i64>,
    polling: bool,
}

/// One configured Telegram bot.
pub struct TelegramNetwork {
    id: NetworkId,
    config: TelegramNetworkConfig,
    api: Arc<dyn BotApi>,
    store: Store,
    sink: EventSink,
    portals: Portals,
    template: RelayTemplate,
    /// Who has been seen in which chat.
    ghosts: Ghosts,
    /// Links of the media proxy that hands out Telegram files, when configured.
    media: Option<Arc<MediaLinks>>,
    /// The running proxy (dropping it stops it).
    _proxy: Option<MediaProxy>,
    /// Fetches the files XMPP users send.
    fetcher: Fetcher,
    state: Mutex<State>,
}

/// Telegram files for the media proxy: fetched with the bot's token, which never
/// leaves the gateway.
struct TelegramFiles {
    api: Arc<dyn BotApi>,
}

#[async_trait]
impl MediaSource for TelegramFiles {
    async fn fetch(&self, id: &str, limit: usize) -> Result<Vec<u8>, MediaError> {
        let (size, path) = self.api.file_path(id).await.map_err(|e| match e {
            ApiError::Refused(t) if t.contains("too big") => MediaError::TooBig,
            ApiError::Refused(_) => MediaError::NotFound,
            _ => MediaError::Unavailable,
        })?;
        if size > limit as u64 {
            return Err(MediaError::TooBig);
        }
        self.api.download(&path, limit).await.map_err(|e| match e {
            ApiError::Refused(_) => MediaError::TooBig,
            _ => MediaError::Unavailable,
        })
    }
}

/// A chat id of this bridge: `CHAT` or `CHAT/TOPIC`.
pub fn parse_chat(id: &str) -> Option<Target> {
    let (chat, topic) = match id.split_once('/') {
        Some((c, t)) => (c, Some(t.parse::<i32>().ok().filter(|t| *t > 0)?)),
        None => (id, None),
    };
    let chat = chat.parse::<i64>().ok().filter(|c| *c < 0)?;
    Some(Target { chat, topic })
}

fn chat_string(t: Target) -> String {
    match t.topic {
        Some(topic) => format!("{}/{topic}", t.chat),
        None => t.chat.to_string(),
    }
}

impl TelegramNetwork {
    /// The bridge for `config`, on the Bot API server its `api_url` names; its media
    /// proxy's key is kept in `base_dir`. Call inside the runtime (the proxy starts).
    pub fn new(
        id: NetworkId,
        config: TelegramNetworkConfig,
        base_dir: &std::path::Path,
        store: Store,
        sink: EventSink,
        portals: Portals,
    ) -> Result<Arc<Self>, String> {
        let timeout = Duration::from_secs(config.poll_timeout_secs);
        let api = api::TeloxideBot::new(config.token.expose(), &config.api_url, timeout).map_err(|e| e.to_string())?;
        Self::with_api(id, config, base_dir, Arc::new(api), store, sink, portals)
    }

    /// The bridge on any [`BotApi`].
    pub fn with_api(
        id: NetworkId,
        config: TelegramNetworkConfig,
        base_dir: &std::path::Path,
        api: Arc<dyn BotApi>,
        store: Store,
        sink: EventSink,
        portals: Portals,
    ) -> Result<Arc<Self>, String> {
        let template = RelayTemplate::parse(&config.relay_template).map_err(|e| e.to_string())?;
        let proxy = match &config.media {
            Some(m) => {
                let key = base_dir.join(format!("{}.media.key", config.domain));
                let source: Arc<dyn MediaSource> = Arc::new(TelegramFiles { api: api.clone() });
                let sources = std::collections::HashMap::from([(id.to_string(), source)]);
                Some(isthmus_core::media::proxy::start(&m.listen, &m.public_url, &key, sources)?)
            }
            None => None,
        };
        let fetcher = Fetcher::new(config.fetch_private_addresses);
        Ok(Arc::new(TelegramNetwork {
            id,
            config,
            api,
            store,
            sink,
            portals,
            template,
            ghosts: Ghosts::new(),
            media: proxy.as_ref().map(|p| p.links.clone()),
            _proxy: proxy,
            fetcher,
            state: Mutex::new(State::default()),
        }))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn checkpoint_name(&self) -> String {
        format!("telegram:{}:offset", self.id)
    }

    /// Ask who the bot is, then read updates for as long as the gateway runs.
    pub fn start(self: &Arc<Self>) {
        let me = self.clone();
        tokio::spawn(async move { me.run().await });
    }

    async fn run(self: Arc<Self>) {
        let mut wait = Duration::from_secs(1);
        loop {
            match self.api.get_me().await {
                Ok(bot) => {
                    if !bot.can_read_all_group_messages {
                        warn!(
                            network = %self.id,
                            bot = %bot.username,
                            "the bot's privacy mode is on: it sees only commands, mentions and replies in groups. \
                             In BotFather: /setprivacy, choose the bot, Disable; then remove the bot from each group and add it again"
                        );
                    }
                    info!(network = %self.id, bot = %bot.username, "Telegram bot ready");
                    let mut s = self.state();
                    s.bot_id = Some(bot.id);
                    s.bot_name = Some(bot.username);
                    break;
                }
                Err(ApiError::Unauthorized) => {
                    warn!(network = %self.id, "Telegram refuses the bot token: check `token` (BotFather's /token); not retrying for 5 minutes");
                    tokio::time::sleep(Duration::from_secs(300)).await;
                }
                Err(e) => {
                    warn!(network = %self.id, error = %e, retry_in = ?wait, "Telegram is not reachable");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(60));
                }
            }
        }
        self.state().polling = true;
        self.poll().await;
    }

    async fn offset(&self) -> i32 {
        match self.store.checkpoint(&self.checkpoint_name()).await {
            Ok(v) => v.and_then(|v| v.parse().ok()).unwrap_or(0),
            Err(e) => {
                warn!(network = %self.id, error = %e, "the poll offset cannot be read; starting from what Telegram holds");
                0
            }
        }
    }

    async fn poll(&self) {
        let timeout = Duration::from_secs(self.config.poll_timeout_secs);
        let mut offset = self.offset().await;
        let mut wait = Duration::from_secs(1);
        loop {
            let updates = match self.api.get_updates(offset, timeout).await {
                Ok(u) => {
                    wait = Duration::from_secs(1);
                    u
                }
                Err(ApiError::RetryAfter(d)) => {
                    tokio::time::sleep(d).await;
                    continue;
                }
                Err(e) => {
                    let level_conflict = matches!(e, ApiError::Conflict);
                    warn!(network = %self.id, error = %e, retry_in = ?wait, conflict = level_conflict, "reading Telegram updates failed");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(60));
                    continue;
                }
            };
            let Some(last) = updates.iter().map(|u| u.id.0).max() else { continue };
            let mut routed = Vec::new();
            for update in updates {
                self.update(update, &mut routed).await;
            }
            for r in routed {
                if !r.wait().await {
                    // Shutting down: the offset stays, Telegram sends them again.
                    return;
                }
            }
            let next = i32::try_from(last).unwrap_or(i32::MAX).saturating_add(1);
            if let Err(e) = self.store.set_checkpoint(&self.checkpoint_name(), &next.to_string()).await {
                warn!(network = %self.id, error = %e, "the poll offset cannot be stored; these updates may come again (they are not bridged twice)");
            }
            offset = next;
        }
    }

    /// Whether the message `message_id` of `chat` was taken in already (an update
    /// seen again after a crash).
    async fn seen(&self, chat: &ChatRef, message_id: &str) -> bool {
        let scope = id_scope(None, chat);
        matches!(self.store.key_for_remote(self.id.as_str(), &scope, message_id).await, Ok(Some(_)))
    }

    fn portal_chat(&self, id: &str) -> Option<ChatRef> {
        let chat = ChatRef::room(self.id.clone(), id);
        if self.portals.of(&chat).is_some() {
            return Some(chat);
        }
        // A topic of a forum whose whole chat is linked.
        let whole = ChatRef::room(self.id.clone(), id.split('/').next().unwrap_or(id));
        self.portals.of(&whole).is_some().then_some(whole)
    }

    /// The occupant `user` of `chat`; a person not seen there before enters the room
    /// first, a new name is a nick change.
    async fn person(&self, chat: &ChatRef, user: &teloxide_core::types::User) -> Sender {
        let id = user.id.0.to_string();
        let nick = incoming::display_name(user);
        let before = self.ghosts.nick_in(chat.id.as_str(), &id);
        if let Some(kind) = self.ghosts.seen(chat.id.as_str(), &id, &nick) {
            let from = Sender::new(id.clone(), before.unwrap_or_else(|| nick.clone()));
            let _ = self.sink.emit(Event::new(self.id.clone(), chat.clone(), from, kind)).await;
        }
        Sender::new(id, nick)
    }

    fn is_own(&self, user: Option<&teloxide_core::types::User>) -> bool {
        let bot = self.state().bot_id;
        user.is_some_and(|u| Some(u.id.0) == bot)
    }

    async fn update(&self, update: teloxide_core::types::Update, routed: &mut Vec<isthmus_core::network::Routed>) {
        let mut emit = async |event: Event| match self.sink.emit_routed(event).await {
            Ok(r) => routed.push(r),
            Err(e) => debug!(error = %e, "the gateway is stopping"),
        };
        match update.kind {
            UpdateKind::Message(msg) => {
                if let Some(new) = msg.migrate_to_chat_id() {
                    self.migrated(msg.chat.id.0, new.0).await;
                    return;
                }
                if self.is_own(msg.from.as_ref()) {
                    return;
                }
                let Some(chat) = self.portal_chat(&incoming::chat_id(&msg)) else {
                    debug!(network = %self.id, chat = msg.chat.id.0, "a message in a chat that is no portal");
                    return;
                };
                let Some(user) = msg.from.as_ref() else { return };
                let Some(mut content) = incoming::message_of(&msg) else { return };
                self.add_file(&msg, &mut content);
                let message_id = msg.id.0.to_string();
                if self.seen(&chat, &message_id).await {
                    debug!(network = %self.id, message_id, "already bridged");
                    return;
                }
                let sender = self.person(&chat, user).await;
                let event = Event::new(self.id.clone(), chat, sender, EventKind::Message(content))
                    .with_origin_id(message_id)
                    .at(std::time::SystemTime::UNIX_EPOCH
                        + Duration::from_secs(u64::try_from(msg.date.timestamp()).unwrap_or(0)));
                emit(event).await;
            }
            UpdateKind::EditedMessage(msg) => {
                if self.is_own(msg.from.as_ref()) {
                    return;
                }
                let Some(chat) = self.portal_chat(&incoming::chat_id(&msg)) else { return };
                let (Some(user), Some(content)) = (msg.from.as_ref(), incoming::message_of(&msg)) else { return };
                let sender = self.person(&chat, user).await;
                let edit_id = format!("{}:{}", msg.id.0, msg.edit_date().map(|d| d.timestamp()).unwrap_or_default());
                if self.seen(&chat, &edit_id).await {
                    return;
                }
                let kind = EventKind::Correction {
                    target: isthmus_core::model::MessageRef(msg.id.0.to_string()),
                    message: content,
                };
                emit(Event::new(self.id.clone(), chat, sender, kind).with_origin_id(edit_id)).await;
            }
            UpdateKind::MessageReaction(r) => {
                let MaybeAnonymousUser::User(user) = &r.actor else { return };
                if self.is_own(Some(user)) {
                    return;
                }
                let Some(chat) = self.portal_chat(&r.chat.id.0.to_string()) else { return };
                let sender = self.person(&chat, user).await;
                let kind = EventKind::Reactions {
                    target: isthmus_core::model::MessageRef(r.message_id.0.to_string()),
                    emojis: incoming::emojis(&r.new_reaction),
                };
                emit(Event::new(self.id.clone(), chat, sender, kind)).await;
            }
            UpdateKind::Error(value) => {
                debug!(network = %self.id, update = update.id.0, kind = %value.as_object().and_then(|o| o.keys().find(|k| *k != "update_id")).map(String::as_str).unwrap_or("?"), "an update the bridge does not read");
            }
            _ => {}
        }
    }

    fn moved_name(&self, old: i64) -> String {
        format!("telegram:{}:moved:{old}", self.id)
    }

    /// The chats the configuration names, each as it is now (a group written there
    /// that became a supergroup is the supergroup).
    pub async fn configured_portals(&self) -> Vec<(String, ChatRef)> {
        let mut out = Vec::new();
        for p in &self.config.portals {
            let mut chat = p.chat;
            // A group may have moved more than once; a loop in the records ends it.
            for _ in 0..8 {
                match self.store.checkpoint(&self.moved_name(chat)).await {
                    Ok(Some(new)) => match new.parse::<i64>() {
                        Ok(new) if new != chat => chat = new,
                        _ => break,
                    },
                    _ => break,
                }
            }
            let target = Target { chat, topic: p.topic.and_then(|t| i32::try_from(t).ok()) };
            out.push((
                format!("{}@{}", p.name, self.config.domain),
                ChatRef::room(self.id.clone(), chat_string(target)),
            ));
        }
        out
    }

    /// The file of `msg` as an attachment with a link of the media proxy, or, when
    /// XMPP clients cannot be given it, a notice in the body saying what it was.
    fn add_file(&self, msg: &teloxide_core::types::Message, content: &mut isthmus_core::model::Message) {
        let notice = |content: &mut isthmus_core::model::Message, text: String| {
            if !content.body.is_empty() {
                content.body.push('\n');
            }
            content.body.push_str(&text);
        };
        match incoming::file_of(msg) {
            None => {}
            Some(Err(text)) => notice(content, text),
            Some(Ok(f)) if f.size > api::MAX_DOWNLOAD_BYTES => notice(
                content,
                format!(
                    "[{} {}: {} MB, more than the {} MB the Telegram Bot API lets the gateway fetch]",
                    f.what,
                    f.name,
                    f.size.div_ceil(1024 * 1024),
                    api::MAX_DOWNLOAD_BYTES / (1024 * 1024)
                ),
            ),
            Some(Ok(f)) => match &self.media {
                Some(links) => {
                    let name = isthmus_core::media::proxy::link_file_name(Some(&f.name), "file", f.mime.as_deref());
                    content.attachments.push(isthmus_core::model::Attachment {
                        url: links.link(self.id.as_str(), &f.file_id, &name),
                        name: Some(f.name),
                        mime: f.mime,
                        size: Some(f.size),
                    });
                }
                None => {
                    notice(content, format!("[{} {}: the gateway has no media proxy to hand it out]", f.what, f.name))
                }
            },
        }
    }

    /// The group `old` became the supergroup `new`: the portal follows it, and the
    /// move is kept so that the configuration's old id means the new chat.
    async fn migrated(&self, old: i64, new: i64) {
        if let Err(e) = self.store.set_checkpoint(&self.moved_name(old), &new.to_string()).await {
            warn!(network = %self.id, old, new, error = %e, "the group's move to a supergroup cannot be stored; write the new id in the configuration");
        }
        let old_chat = ChatRef::room(self.id.clone(), old.to_string());
        let new_chat = ChatRef::room(self.id.clone(), new.to_string());
        if self.portals.of(&new_chat).is_some() {
            return;
        }
        match self.portals.relink(&old_chat, new_chat).await {
            Ok(portal) => {
                info!(network = %self.id, portal, old, new, "the group became a supergroup; the portal follows it")
            }
            Err(e) => debug!(network = %self.id, old, new, error = %e, "a group that is no portal became a supergroup"),
        }
        self.ghosts.moved(&old.to_string(), &new.to_string());
    }

    /// Call `f` on the chat, waiting out flood control and following a migration.
    async fn call<T, F, Fut>(&self, chat: &ChatRef, mut f: F) -> Result<T, DeliveryError>
    where
        F: FnMut(Target) -> Fut,
        Fut: std::future::Future<Output = Result<T, ApiError>>,
    {
        let mut target = parse_chat(chat.id.as_str())
            .ok_or_else(|| DeliveryError::Rejected(format!("`{}` is not a Telegram group", chat.id)))?;
        let mut waited = Duration::ZERO;
        let mut followed = false;
        loop {
            match f(target).await {
                Ok(v) => return Ok(v),
                Err(ApiError::RetryAfter(d)) if waited + d <= MAX_FLOOD_WAIT => {
                    debug!(network = %self.id, chat = target.chat, wait = ?d, "Telegram flood control");
                    tokio::time::sleep(d).await;
                    waited += d;
                }
                Err(ApiError::RetryAfter(_)) => {
                    return Err(DeliveryError::Unavailable(
                        "Telegram's flood control holds this chat; it is retried later".into(),
                    ));
                }
                Err(ApiError::Migrated(new)) if !followed => {
                    self.migrated(target.chat, new).await;
                    target.chat = new;
                    followed = true;
                }
                Err(ApiError::Unavailable(e)) => return Err(DeliveryError::Unavailable(e)),
                Err(ApiError::Conflict | ApiError::Unauthorized) => {
                    return Err(DeliveryError::Unavailable("Telegram does not accept the bot token".into()));
                }
                Err(e) => return Err(DeliveryError::Rejected(format!("Telegram refused it: {e}"))),
            }
        }
    }

    /// The occupants an XMPP user finds on entering: the chat's administrators and
    /// everyone seen speaking.
    async fn occupants(&self, chat: &ChatRef) -> Vec<Occupant> {
        if let Some(target) = parse_chat(chat.id.as_str())
            && !self.state().admins_known.contains(&target.chat)
        {
            match self.api.admins(target.chat).await {
                Ok(admins) => {
                    self.state().admins_known.insert(target.chat);
                    for a in admins {
                        let affiliation = if a.creator { Affiliation::Owner } else { Affiliation::Admin };
                        let id = a.user_id.to_string();
                        self.ghosts.set_standing(chat.id.as_str(), &id, &a.name, Role::Moderator, affiliation);
                    }
                }
                Err(e) => {
                    debug!(network = %self.id, chat = target.chat, error = %e, "the chat's administrators are not known")
                }
            }
        }
        self.ghosts.occupants(chat.id.as_str())
    }

    /// A message with files: each file fetched and uploaded (a picture as a photo),
    /// the first one with the text as its caption. A file larger than a bot may
    /// upload goes as its link, with a notice saying so.
    async fn send_files(
        &self,
        event: &Event,
        nick: &str,
        m: &isthmus_core::model::Message,
    ) -> Result<Vec<String>, DeliveryError> {
        let mut caption_message = m.clone();
        caption_message.attachments.clear();
        caption_message.body =
            m.body.lines().filter(|l| !m.attachments.iter().any(|a| a.url == l.trim())).collect::<Vec<_>>().join("\n");
        let mut caption = outgoing::relayed_text(&self.template, nick, &caption_message);
        caption.text.truncate(caption.text.trim_end().len());
        caption.reply_to = m.reply_to.as_ref().and_then(|r| message_id(&r.target).ok());
        let mut ids = Vec::new();
        for (i, a) in m.attachments.iter().enumerate() {
            let caption = if i == 0 { caption.clone() } else { OutgoingText::default() };
            let text = match self.fetcher.fetch(&a.url, api::MAX_UPLOAD_BYTES).await {
                Ok((bytes, served)) => {
                    let name = isthmus_core::media::attachment_name(a);
                    let mime = a.mime.clone().or(served).unwrap_or_default();
                    let photo = matches!(
                        mime.split(';').next().unwrap_or_default().trim(),
                        "image/jpeg" | "image/png" | "image/gif" | "image/webp"
                    ) && bytes.len() as u64 <= api::MAX_PHOTO_BYTES;
                    let file = api::OutgoingFile { bytes, name, photo };
                    let receipt = event.receipt.clone();
                    let id = self
                        .call(&event.chat, |to| {
                            let (file, caption, receipt) = (file.clone(), caption.clone(), receipt.clone());
                            async move {
                                if let Some(r) = &receipt {
                                    r.confirm().await;
                                }
                                self.api.send_file(to, file, &caption).await
                            }
                        })
                        .await?;
                    ids.push(id.to_string());
                    continue;
                }
                Err(why) if why.contains("larger than") => format!(
                    "{} (more than the {} MB a Telegram bot may upload)",
                    a.url,
                    api::MAX_UPLOAD_BYTES / (1024 * 1024)
                ),
                Err(why) => {
                    return Err(DeliveryError::Rejected(format!(
                        "the file {} cannot be sent to Telegram: {why}",
                        a.url
                    )));
                }
            };
            let mut words = caption_message.clone();
            words.body = if i == 0 && !words.body.is_empty() { format!("{}\n{text}", words.body) } else { text };
            let mut out = outgoing::relayed_text(&self.template, nick, &words);
            out.reply_to = caption.reply_to;
            ids.extend(self.send(event, out).await?);
        }
        Ok(ids)
    }

    async fn send(&self, event: &Event, text: OutgoingText) -> Result<Vec<String>, DeliveryError> {
        let receipt = event.receipt.clone();
        let id = self
            .call(&event.chat, |to| {
                let text = text.clone();
                let receipt = receipt.clone();
                async move {
                    // The copy leaves the process now: it is not sent twice after a crash.
                    if let Some(r) = &receipt {
                        r.confirm().await;
                    }
                    self.api.send_text(to, &text).await
                }
            })
            .await?;
        Ok(vec![id.to_string()])
    }
}

fn message_id(target: &isthmus_core::model::MessageRef) -> Result<i32, DeliveryError> {
    target
        .0
        .split(':')
        .next()
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| DeliveryError::Rejected("that message is not known on Telegram".into()))
}

#[async_trait]
impl Network for TelegramNetwork {
    fn id(&self) -> &NetworkId {
        &self.id
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities { attachments: true, ..Capabilities::bot() }
    }

    fn chat_kind(&self, id: &str) -> Option<ChatKind> {
        parse_chat(id).map(|_| ChatKind::Room)
    }

    fn links_portals_at_run_time(&self, id: &str) -> bool {
        parse_chat(id).is_some()
    }

    fn display_name(&self, id: &str) -> String {
        self.ghosts.any_nick(id).unwrap_or_else(|| id.to_owned())
    }

    async fn connections_status(&self) -> Vec<String> {
        let s = self.state();
        let bot = s.bot_name.clone().map(|n| format!("@{n}")).unwrap_or_else(|| "the bot (not reached yet)".into());
        let portals = self.portals.chats_on(&self.id).len();
        vec![format!("{bot}: {}, {portals} portal chats", if s.polling { "reading updates" } else { "starting" })]
    }

    async fn deliver(&self, event: Event) -> Result<Delivered, DeliveryError> {
        self.portals.require_portal_event(&event, "Telegram groups")?;
        let nick = event.sender.nick.clone();
        let ids = match &event.kind {
            EventKind::JoinRequest { nick, .. } => {
                let occupants = self.occupants(&event.chat).await;
                let answer = Event::new(
                    self.id.clone(),
                    event.chat.clone(),
                    Sender::own(event.sender.id.as_str(), nick.clone()),
                    EventKind::SelfJoined { nick: nick.clone(), occupants, topic: None },
                );
                self.sink.emit(answer).await.map_err(|e| DeliveryError::Unavailable(e.to_string()))?;
                Vec::new()
            }
            EventKind::Message(m) if !m.attachments.is_empty() => self.send_files(&event, &nick, m).await?,
            EventKind::Message(m) => {
                let mut text = outgoing::relayed_text(&self.template, &nick, m);
                if let Some(r) = &m.reply_to {
                    text.reply_to = message_id(&r.target).ok();
                }
                self.send(&event, text).await?
            }
            EventKind::Correction { target, message } => {
                let target = message_id(target)?;
                let text = outgoing::relayed_text(&self.template, &nick, message);
                if let Some(r) = &event.receipt {
                    r.confirm().await;
                }
                match self.call(&event.chat, |to| self.api.edit_text(to.chat, target, &text)).await {
                    Ok(()) => {}
                    Err(DeliveryError::Rejected(e)) if e.contains("exactly the same") => {}
                    Err(e) => return Err(e),
                }
                Vec::new()
            }
            EventKind::Retraction { target, .. } => {
                let target = message_id(target)?;
                if let Some(r) = &event.receipt {
                    r.confirm().await;
                }
                self.call(&event.chat, |to| self.api.delete(to.chat, target)).await.map_err(|e| match e {
                    DeliveryError::Rejected(text) => DeliveryError::Rejected(format!(
                        "{text} (a bot may delete its own messages for 48 hours, and others' only as an administrator)"
                    )),
                    e => e,
                })?;
                Vec::new()
            }
            EventKind::Reactions { target, emojis } => {
                let target = message_id(target)?;
                if let Some(r) = &event.receipt {
                    r.confirm().await;
                }
                // A bot has one reaction per message: one emoji is set natively,
                // anything else is said in words.
                let native = match emojis.as_slice() {
                    [] => self.call(&event.chat, |to| self.api.react(to.chat, target, None)).await.is_ok(),
                    [one] => self.call(&event.chat, |to| self.api.react(to.chat, target, Some(one))).await.is_ok(),
                    _ => false,
                };
                if !native && !emojis.is_empty() {
                    let mut text = outgoing::notice(&nick, &format!("reacted with {}", emojis.join(" ")));
                    text.reply_to = Some(target);
                    let id = self.call(&event.chat, |to| self.api.send_text(to, &text)).await?;
                    vec![id.to_string()]
                } else {
                    Vec::new()
                }
            }
            EventKind::Typing(ChatState::Composing) => {
                let _ = self.call(&event.chat, |to| self.api.typing(to)).await;
                Vec::new()
            }
            EventKind::Left { kind: LeaveKind::Part, .. } => Vec::new(),
            _ => Vec::new(),
        };
        if let Some(r) = &event.receipt {
            r.confirm().await;
        }
        Ok(Delivered::ids(ids))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_ids() {
        assert_eq!(parse_chat("-1001"), Some(Target { chat: -1001, topic: None }));
        assert_eq!(parse_chat("-1001/7"), Some(Target { chat: -1001, topic: Some(7) }));
        assert_eq!(parse_chat("12"), None, "a person, not a group");
        assert_eq!(parse_chat("-1/x"), None);
        assert_eq!(parse_chat("-1/0"), None);
        assert_eq!(chat_string(Target { chat: -5, topic: Some(3) }), "-5/3");
    }
}
