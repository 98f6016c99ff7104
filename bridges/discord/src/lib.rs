//! The Discord bridge: a bot (twilight: REST with its rate limiter, one gateway
//! shard, an in-memory cache of guilds, roles, channels and members) whose
//! channels are portals.
//!
//! - **Discord → XMPP**: gateway events are handled in order by one task. A
//!   message in a portal channel becomes a `Message` (markdown as XEP-0393,
//!   mentions as names, a reply as a reply), an edit a `Correction` (link-preview
//!   updates are not edits), a delete a `Retraction`, reactions the person's full
//!   set. The author becomes an occupant when first seen. What our own webhooks
//!   and the bot post is never bridged back: webhook ids are known before anything
//!   is posted through them. A message is recognised by its id in the id map, so
//!   none is bridged twice. The id of the last message of each channel whose event
//!   is safe in the outbox is kept with `set_checkpoint`; at each READY (start, or
//!   a new session after INVALID_SESSION) each portal channel is read from there
//!   on with `GET /channels/{id}/messages?after=…`, page by page, so what was said
//!   while the bridge was away arrives once, in order.
//! - **XMPP → Discord**: people from elsewhere post through one webhook per
//!   channel (the bot's, named [`WEBHOOK_NAME`], found again after a restart and
//!   made again if deleted) under their nick; styling becomes markdown; edits and
//!   deletes go through the same webhook; a reply is a short quote with a jump
//!   link; reactions are the bot's; mentions never ping. Discord's 429s are waited
//!   out by twilight's limiter, and the router hands messages over one at a time,
//!   so a channel's order is kept.

mod from_discord;
mod to_discord;

pub mod gateway;
pub mod incoming;
pub mod outgoing;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use isthmus_config::DiscordNetworkConfig;
use isthmus_core::ghosts::Ghosts;
use isthmus_core::model::{ChatKind, ChatRef, ChatState, Event, EventKind, MessageRef, NetworkId, Sender};
use isthmus_core::network::{Capabilities, Delivered, DeliveryError, EventSink, Network, Routed};
use isthmus_core::portal::Portals;
use isthmus_core::router::id_scope;
use isthmus_core::store::Store;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};
use twilight_cache_inmemory::{DefaultInMemoryCache, ResourceType};
use twilight_gateway::Intents;
use twilight_http::Client;
use twilight_http::api_error::ApiError;
use twilight_http::error::ErrorType;
use twilight_http::request::channel::reaction::RequestReactionType;
use twilight_model::channel::Message as DiscordMessage;
use twilight_model::channel::message::{AllowedMentions, EmojiReactionType};
use twilight_model::id::Id;
use twilight_model::id::marker::{ChannelMarker, GuildMarker, MessageMarker, UserMarker, WebhookMarker};

use crate::gateway::Update;

/// The name of the webhook the bridge posts through in each channel.
pub const WEBHOOK_NAME: &str = "Isthmus";
/// Messages per page of `GET /channels/{id}/messages`.
const PAGE: u16 = 100;
/// Message ids remembered as bridged in this run (besides the id map).
const RECENT: usize = 10_000;
/// Reaction sets remembered per direction.
const MAX_REACTION_SETS: usize = 10_000;
/// How long reading back waits for READY's guilds to arrive.
const GUILDS_WAIT: Duration = Duration::from_secs(10);
/// How often the "MESSAGE_CONTENT is off" warning is repeated.
const EMPTY_WARNING_EVERY: Duration = Duration::from_secs(600);

/// Where a channel's webhook posts.
#[derive(Debug, Clone)]
struct Hook {
    id: Id<WebhookMarker>,
    token: String,
    /// Set for a thread: the webhook is its parent channel's.
    thread: Option<Id<ChannelMarker>>,
}

/// What the bridge knows of a portal channel.
#[derive(Debug, Clone, Copy)]
struct ChannelInfo {
    guild: Option<Id<GuildMarker>>,
}

#[derive(Default)]
struct State {
    bot_id: Option<Id<UserMarker>>,
    bot_name: Option<String>,
    connected: bool,
    /// Identified with MESSAGE_CONTENT.
    message_content: bool,
    warned_empty: Option<Instant>,
    hooks: HashMap<u64, Hook>,
    /// Every webhook the bot made (its messages are never bridged back).
    own_hooks: HashSet<u64>,
    channels: HashMap<u64, ChannelInfo>,
    /// Sessions begun (READYs seen).
    sessions: u64,
    /// The guilds READY named that have not come yet; reading back waits for them
    /// (their members' nicknames), `None` once done for this session.
    awaited_guilds: Option<HashSet<u64>>,
    /// Messages the bridge deleted itself (their MESSAGE_DELETE is not bridged back).
    self_deleted: HashSet<u64>,
    /// Message ids bridged in this run, oldest first.
    recent: VecDeque<u64>,
    /// Who wrote each of them (Discord people: a deletion is theirs).
    recent_set: HashMap<u64, Option<Sender>>,
    /// Discord → XMPP: each person's reactions on a message.
    reactions_in: HashMap<(u64, u64), Vec<String>>,
    /// XMPP → Discord: each sender's reactions on a message (the bot shows their union).
    reactions_out: HashMap<u64, HashMap<String, Vec<String>>>,
}

impl State {
    fn remember(&mut self, id: u64, author: Option<Sender>) {
        if self.recent_set.insert(id, author).is_none() {
            self.recent.push_back(id);
            if self.recent.len() > RECENT
                && let Some(old) = self.recent.pop_front()
            {
                self.recent_set.remove(&old);
            }
        }
    }
}

/// One message whose checkpoint may move once its event is safe.
struct Progress {
    channel: u64,
    message: u64,
    routed: Option<Routed>,
}

/// One configured Discord bot.
pub struct DiscordNetwork {
    id: NetworkId,
    config: DiscordNetworkConfig,
    http: Arc<Client>,
    store: Store,
    sink: EventSink,
    portals: Portals,
    ghosts: Ghosts,
    cache: DefaultInMemoryCache,
    state: Mutex<State>,
    /// One webhook lookup at a time (two would make two webhooks).
    hook_lock: tokio::sync::Mutex<()>,
    progress: mpsc::UnboundedSender<Progress>,
    progress_rx: Mutex<Option<mpsc::UnboundedReceiver<Progress>>>,
    /// The bridge's own way into its gateway queue (timers).
    updates: Mutex<Option<mpsc::UnboundedSender<Update>>>,
}

/// A channel id of this bridge (a snowflake).
pub fn parse_channel(id: &str) -> Option<Id<ChannelMarker>> {
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    id.parse::<u64>().ok().and_then(Id::new_checked)
}

/// Why a REST call failed, as the router understands it.
fn delivery_error(what: &str, e: &twilight_http::Error) -> DeliveryError {
    match e.kind() {
        ErrorType::Response { status, error, .. } => {
            let message = match error {
                ApiError::General(g) => format!("{} ({})", g.message, g.code),
                other => other.to_string(),
            };
            match status.get() {
                401 => DeliveryError::Unavailable("Discord refuses the bot token".into()),
                403 => DeliveryError::Rejected(format!(
                    "Discord refused to {what}: {message}; the bot needs Manage Webhooks, Read Message History and \
                     Add Reactions in this channel"
                )),
                s if s >= 500 => DeliveryError::Unavailable(format!("Discord could not {what} now: {message}")),
                _ => DeliveryError::Rejected(format!("Discord refused to {what}: {message}")),
            }
        }
        ErrorType::Unauthorized => DeliveryError::Unavailable("Discord refuses the bot token".into()),
        _ => DeliveryError::Unavailable(format!("Discord cannot be reached to {what}: {e}")),
    }
}

/// The Discord error code of a failed call.
fn error_code(e: &twilight_http::Error) -> Option<u64> {
    match e.kind() {
        ErrorType::Response { error: ApiError::General(g), .. } => Some(g.code),
        _ => None,
    }
}

const UNKNOWN_WEBHOOK: u64 = 10015;
const UNKNOWN_MESSAGE: u64 = 10008;

fn time_of(ts: twilight_model::util::Timestamp) -> SystemTime {
    let micros = ts.as_micros();
    SystemTime::UNIX_EPOCH + Duration::from_micros(u64::try_from(micros).unwrap_or(0))
}

/// The emoji of a reaction, as text.
fn emoji_text(e: &EmojiReactionType) -> Option<String> {
    match e {
        EmojiReactionType::Unicode { name } => Some(name.clone()),
        EmojiReactionType::Custom { name: Some(name), .. } => Some(format!(":{name}:")),
        EmojiReactionType::Custom { .. } => None,
    }
}

/// Names for mentions: the message's own mention list, then the cache.
struct CacheNames<'a> {
    cache: &'a DefaultInMemoryCache,
    guild: Option<Id<GuildMarker>>,
    mentions: &'a [twilight_model::channel::message::Mention],
}

impl incoming::Names for CacheNames<'_> {
    fn user(&self, id: u64) -> Option<String> {
        let uid = Id::<UserMarker>::new_checked(id)?;
        let mention = self.mentions.iter().find(|m| m.id == uid);
        if let Some(nick) = mention.and_then(|m| m.member.as_ref()).and_then(|p| p.nick.clone()) {
            return Some(nick);
        }
        if let Some(guild) = self.guild
            && let Some(member) = self.cache.member(guild, uid)
            && let Some(nick) = member.nick()
        {
            return Some(nick.to_owned());
        }
        self.cache
            .user(uid)
            .map(|u| u.global_name.clone().unwrap_or_else(|| u.name.clone()))
            .or_else(|| mention.map(|m| m.name.clone()))
    }

    fn role(&self, id: u64) -> Option<String> {
        self.cache.role(Id::new_checked(id)?).map(|r| r.name.clone())
    }

    fn channel(&self, id: u64) -> Option<String> {
        self.cache.channel(Id::new_checked(id)?).and_then(|c| c.name.clone())
    }
}

impl DiscordNetwork {
    /// The bridge for `config`, on the REST origin its `api_url` names.
    pub fn new(
        id: NetworkId,
        config: DiscordNetworkConfig,
        store: Store,
        sink: EventSink,
        portals: Portals,
    ) -> Result<Arc<Self>, String> {
        let origin = config.api_url.trim_end_matches('/');
        let (host, plain) = match (origin.strip_prefix("https://"), origin.strip_prefix("http://")) {
            (Some(h), _) => (h, false),
            (None, Some(h)) => (h, true),
            _ => return Err(format!("`api_url: {}` is not an http(s) origin", config.api_url)),
        };
        let mut builder = Client::builder()
            .token(config.token.expose().to_owned())
            .default_allowed_mentions(AllowedMentions::default())
            .timeout(Duration::from_secs(30));
        if host != "discord.com" || plain {
            // Another origin (a proxy, a test's emulator): twilight keeps its limiter.
            builder = builder.proxy(host.to_owned(), plain);
        }
        let http = Arc::new(builder.build());
        let cache = DefaultInMemoryCache::builder()
            .resource_types(
                ResourceType::GUILD
                    | ResourceType::CHANNEL
                    | ResourceType::ROLE
                    | ResourceType::MEMBER
                    | ResourceType::USER
                    | ResourceType::USER_CURRENT,
            )
            .build();
        let (progress, progress_rx) = mpsc::unbounded_channel();
        Ok(Arc::new(DiscordNetwork {
            id,
            config,
            http,
            store,
            sink,
            portals,
            ghosts: Ghosts::new(),
            cache,
            state: Mutex::new(State::default()),
            hook_lock: tokio::sync::Mutex::new(()),
            progress,
            progress_rx: Mutex::new(Some(progress_rx)),
            updates: Mutex::new(None),
        }))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The channels of this network in portals, as the configuration wrote them.
    pub fn configured_portals(&self) -> Vec<(String, ChatRef)> {
        self.config
            .portals
            .iter()
            .map(|p| (format!("{}@{}", p.name, self.config.domain), ChatRef::room(self.id.clone(), p.channel.clone())))
            .collect()
    }

    fn checkpoint_name(&self, channel: u64) -> String {
        format!("discord:{}:{channel}:last", self.id)
    }

    fn portal_chat(&self, channel: Id<ChannelMarker>) -> Option<ChatRef> {
        let chat = ChatRef::room(self.id.clone(), channel.to_string());
        self.portals.of(&chat).is_some().then_some(chat)
    }

    /// Connect the gateway and bridge for as long as the gateway runs.
    pub fn start(self: &Arc<Self>) {
        let me = self.clone();
        tokio::spawn(async move { me.run().await });
        if let Some(rx) = self.progress_rx.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let me = self.clone();
            tokio::spawn(async move { me.keep_progress(rx).await });
        }
    }

    /// Who the bot is, asked over REST until Discord answers.
    async fn bot_user(&self) -> Id<UserMarker> {
        let mut wait = Duration::from_secs(1);
        loop {
            if let Some(id) = self.state().bot_id {
                return id;
            }
            match self.http.current_user().await {
                Ok(r) => match r.model().await {
                    Ok(user) => {
                        let mut s = self.state();
                        s.bot_id = Some(user.id);
                        s.bot_name = Some(user.name.clone());
                        return user.id;
                    }
                    Err(e) => warn!(network = %self.id, error = %e, "Discord's answer about the bot cannot be read"),
                },
                Err(e)
                    if matches!(e.kind(), ErrorType::Unauthorized)
                        || matches!(e.kind(), ErrorType::Response { status, .. } if status.get() == 401) =>
                {
                    warn!(network = %self.id, "Discord refuses the bot token (401): put the token from the Developer Portal (your application → Bot → Reset Token) in `token`; trying again in 5 minutes");
                    tokio::time::sleep(Duration::from_secs(300)).await;
                    continue;
                }
                Err(e) => warn!(network = %self.id, error = %e, retry_in = ?wait, "Discord is not reachable"),
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(60));
        }
    }

    async fn gateway_url(&self) -> String {
        if let Some(url) = &self.config.gateway_url {
            return url.clone();
        }
        let mut wait = Duration::from_secs(1);
        loop {
            match self.http.gateway().authed().await {
                Ok(r) => match r.model().await {
                    Ok(g) => return g.url,
                    Err(e) => warn!(network = %self.id, error = %e, "Discord's gateway answer cannot be read"),
                },
                Err(e) => {
                    warn!(network = %self.id, error = %e, retry_in = ?wait, "Discord does not say where its gateway is")
                }
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(60));
        }
    }

    async fn run(self: Arc<Self>) {
        self.bot_user().await;
        let url = self.gateway_url().await;
        let interval = std::env::var("ISTHMUS_TEST_DISCORD_IDENTIFY_INTERVAL_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map_or(Duration::from_secs(5), Duration::from_millis);
        let settings = gateway::Settings {
            network: self.id.to_string(),
            token: self.config.token.expose().to_owned(),
            url,
            queue: gateway::IdentifyQueue::new(interval),
        };
        let (tx, mut rx) = mpsc::unbounded_channel();
        *self.updates.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx.clone());
        tokio::spawn(gateway::run(settings, tx));
        while let Some(update) = rx.recv().await {
            match update {
                Update::Intents(i) => self.state().message_content = i.contains(Intents::MESSAGE_CONTENT),
                Update::Event(event) => self.event(*event).await,
                Update::Backfill(session) => {
                    let due = {
                        let mut s = self.state();
                        (s.sessions == session && s.awaited_guilds.take().is_some()).then_some(())
                    };
                    if due.is_some() {
                        debug!(network = %self.id, "not every guild arrived in time; reading back now");
                        self.backfill_all().await;
                    }
                }
            }
        }
    }
}

#[async_trait]
impl Network for DiscordNetwork {
    fn id(&self) -> &NetworkId {
        &self.id
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::bot()
    }

    fn chat_kind(&self, id: &str) -> Option<ChatKind> {
        parse_channel(id).map(|_| ChatKind::Room)
    }

    fn links_portals_at_run_time(&self, id: &str) -> bool {
        parse_channel(id).is_some()
    }

    fn display_name(&self, id: &str) -> String {
        self.ghosts.any_nick(id).unwrap_or_else(|| id.to_owned())
    }

    async fn connections_status(&self) -> Vec<String> {
        let s = self.state();
        let bot = s.bot_name.clone().unwrap_or_else(|| "the bot (not reached yet)".into());
        let portals = self.portals.chats_on(&self.id).len();
        vec![format!("{bot}: {}, {portals} portal channels", if s.connected { "connected" } else { "connecting" })]
    }

    async fn deliver(&self, event: Event) -> Result<Delivered, DeliveryError> {
        self.portals.require_portal_event(&event, "Discord channels")?;
        let channel = parse_channel(event.chat.id.as_str())
            .ok_or_else(|| DeliveryError::Rejected(format!("`{}` is not a Discord channel", event.chat.id)))?;
        let nick = event.sender.nick.clone();
        let ids = match &event.kind {
            EventKind::JoinRequest { nick, .. } => {
                let occupants = self.ghosts.occupants(event.chat.id.as_str());
                let answer = Event::new(
                    self.id.clone(),
                    event.chat.clone(),
                    Sender::own(event.sender.id.as_str(), nick.clone()),
                    EventKind::SelfJoined { nick: nick.clone(), occupants, topic: None },
                );
                self.sink.emit(answer).await.map_err(|e| DeliveryError::Unavailable(e.to_string()))?;
                Vec::new()
            }
            EventKind::Message(m) => {
                let replied = match &m.reply_to {
                    Some(r) => self.replied(channel, &r.target).await,
                    None => None,
                };
                let content = outgoing::content(m, replied.as_ref());
                vec![self.post(channel, &nick, &content, &event).await?.to_string()]
            }
            EventKind::Correction { target, message } => {
                let mid = Self::message_id(target)?;
                let content = outgoing::content(message, None);
                let hook = self.hook(channel).await?;
                if let Some(r) = &event.receipt {
                    r.confirm().await;
                }
                let mentions = AllowedMentions::default();
                let mut req = self
                    .http
                    .update_webhook_message(hook.id, &hook.token, mid)
                    .content(Some(&content))
                    .allowed_mentions(Some(&mentions));
                if let Some(t) = hook.thread {
                    req = req.thread_id(t);
                }
                req.await.map_err(|e| delivery_error("edit the message", &e))?;
                Vec::new()
            }
            EventKind::Retraction { target, .. } => {
                let mid = Self::message_id(target)?;
                let hook = self.hook(channel).await?;
                if let Some(r) = &event.receipt {
                    r.confirm().await;
                }
                self.state().self_deleted.insert(mid.get());
                let mut req = self.http.delete_webhook_message(hook.id, &hook.token, mid);
                if let Some(t) = hook.thread {
                    req = req.thread_id(t);
                }
                match req.await {
                    Ok(_) => {}
                    // Not the webhook's: someone's own message, deleted by the bot (Manage Messages).
                    Err(e) if error_code(&e) == Some(UNKNOWN_MESSAGE) => {
                        self.http.delete_message(channel, mid).await.map_err(|e| {
                            self.state().self_deleted.remove(&mid.get());
                            delivery_error(
                                "delete the message (the bot needs Manage Messages for others' messages)",
                                &e,
                            )
                        })?;
                    }
                    Err(e) => {
                        self.state().self_deleted.remove(&mid.get());
                        return Err(delivery_error("delete the message", &e));
                    }
                }
                Vec::new()
            }
            EventKind::Reactions { target, emojis } => {
                self.react(channel, &event, target, emojis).await?;
                Vec::new()
            }
            EventKind::Typing(ChatState::Composing) => {
                if let Err(e) = self.http.create_typing_trigger(channel).await {
                    debug!(network = %self.id, error = %e, "typing not shown");
                }
                Vec::new()
            }
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
    fn channel_ids() {
        assert_eq!(parse_channel("300000000000000001").map(Id::get), Some(300000000000000001));
        assert_eq!(parse_channel("0"), None);
        assert_eq!(parse_channel("-5"), None);
        assert_eq!(parse_channel("#general"), None);
        assert_eq!(parse_channel(""), None);
    }
}
