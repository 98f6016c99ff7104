//! Discord → the model: gateway events of portal channels (messages, edits,
//! deletes, reactions) as core events, the people as ghosts, and the read-back of
//! what was said while the bridge was away (paged `?after=` from each channel's
//! checkpoint).

use super::*;

impl DiscordNetwork {
    pub(super) async fn event(&self, event: twilight_gateway::Event) {
        use twilight_gateway::Event as E;
        self.cache.update(&event);
        match event {
            E::Ready(r) => {
                // A new session: what was said meanwhile is read back, once its guilds
                // (and their members' nicknames) are here, or after a while.
                let (session, waiting) = {
                    let mut s = self.state();
                    s.bot_id = Some(r.user.id);
                    s.bot_name = Some(r.user.name.clone());
                    s.connected = true;
                    s.sessions += 1;
                    let guilds: HashSet<u64> = r.guilds.iter().map(|g| g.id.get()).collect();
                    let waiting = !guilds.is_empty();
                    s.awaited_guilds = Some(guilds);
                    (s.sessions, waiting)
                };
                if waiting {
                    let tx = self.updates.lock().unwrap_or_else(|p| p.into_inner()).clone();
                    if let Some(tx) = tx {
                        tokio::spawn(async move {
                            tokio::time::sleep(GUILDS_WAIT).await;
                            let _ = tx.send(Update::Backfill(session));
                        });
                    }
                } else {
                    self.state().awaited_guilds = None;
                    self.backfill_all().await;
                }
            }
            E::GuildCreate(g) => {
                let all_here = {
                    let mut s = self.state();
                    match s.awaited_guilds.as_mut() {
                        Some(w) => {
                            w.remove(&g.id().get());
                            w.is_empty()
                        }
                        None => false,
                    }
                };
                if all_here {
                    self.state().awaited_guilds = None;
                    self.backfill_all().await;
                }
            }
            E::Resumed => {
                self.state().connected = true;
                debug!(network = %self.id, "gateway session resumed");
            }
            E::GatewayClose(_) => self.state().connected = false,
            E::MessageCreate(m) => self.message(m.message, false).await,
            E::MessageUpdate(m) => self.edited((*m).0).await,
            E::MessageDelete(d) => self.deleted(d.channel_id, d.id).await,
            E::MessageDeleteBulk(d) => {
                for id in d.ids {
                    self.deleted(d.channel_id, id).await;
                }
            }
            E::ReactionAdd(r) => self.reaction(&r.0, true).await,
            E::ReactionRemove(r) => self.reaction(&r.0, false).await,
            _ => {}
        }
    }

    /// Read each portal channel from its checkpoint on.
    pub(super) async fn backfill_all(&self) {
        for chat in self.portals.chats_on(&self.id) {
            let Some(channel) = parse_channel(chat.id.as_str()) else { continue };
            // The webhooks first: what they posted is known as ours.
            if let Err(e) = self.hook(channel).await {
                warn!(network = %self.id, channel = %channel, error = %e, "no webhook in this channel: messages from XMPP cannot be posted there");
            }
            self.backfill(channel).await;
        }
    }

    pub(super) async fn backfill(&self, channel: Id<ChannelMarker>) {
        let name = self.checkpoint_name(channel.get());
        let after = match self.store.checkpoint(&name).await {
            // `0`: the channel was empty; everything in it is new.
            Ok(v) => v.and_then(|v| v.parse::<u64>().ok()).map(|v| Id::<MessageMarker>::new(v.max(1))),
            Err(e) => {
                warn!(network = %self.id, error = %e, "the channel's checkpoint cannot be read; not reading back");
                return;
            }
        };
        let Some(mut after) = after else {
            // A channel seen for the first time: bridged from now on, its past is not.
            let last = match self.http.channel_messages(channel).limit(1).await {
                Ok(r) => match r.models().await {
                    Ok(m) => m.first().map_or(0, |m| m.id.get()),
                    Err(e) => {
                        warn!(network = %self.id, channel = %channel, error = %e, "the channel's last message cannot be read");
                        return;
                    }
                },
                Err(e) => {
                    warn!(network = %self.id, channel = %channel, error = %e, "the channel's last message is not known (the bot needs Read Message History)");
                    return;
                }
            };
            if let Err(e) = self.store.set_checkpoint(&name, &last.to_string()).await {
                warn!(network = %self.id, error = %e, "the channel's checkpoint cannot be stored");
            }
            return;
        };
        let mut read = 0usize;
        loop {
            let page = match self.http.channel_messages(channel).after(after).limit(PAGE).await {
                Ok(r) => match r.models().await {
                    Ok(p) => p,
                    Err(e) => {
                        warn!(network = %self.id, channel = %channel, error = %e, "a page of messages cannot be read");
                        return;
                    }
                },
                Err(e) => {
                    warn!(network = %self.id, channel = %channel, error = %e, "what was said while the bridge was away cannot be read (the bot needs Read Message History)");
                    return;
                }
            };
            let full = page.len() >= usize::from(PAGE);
            let mut page = page;
            page.sort_by_key(|m| m.id);
            let Some(newest) = page.last().map(|m| m.id) else { break };
            for m in page {
                read += 1;
                self.message(m, true).await;
            }
            after = newest;
            if !full {
                break;
            }
        }
        if read > 0 {
            info!(network = %self.id, channel = %channel, messages = read, "read back what was said while the bridge was away");
        }
    }

    /// Keep each channel's checkpoint at the newest message whose event is safe, in order.
    pub(super) async fn keep_progress(&self, mut rx: mpsc::UnboundedReceiver<Progress>) {
        let mut dirty: HashMap<u64, u64> = HashMap::new();
        let mut last: HashMap<u64, u64> = HashMap::new();
        let mut flushed = Instant::now();
        while let Some(p) = rx.recv().await {
            if let Some(r) = p.routed
                && !r.wait().await
            {
                return;
            }
            if last.get(&p.channel).is_none_or(|l| *l < p.message) {
                last.insert(p.channel, p.message);
                dirty.insert(p.channel, p.message);
            }
            // Written when nothing more is waiting, and at least every second under load.
            if rx.is_empty() || flushed.elapsed() >= Duration::from_secs(1) {
                flushed = Instant::now();
                for (channel, message) in dirty.drain() {
                    if let Err(e) =
                        self.store.set_checkpoint(&self.checkpoint_name(channel), &message.to_string()).await
                    {
                        warn!(network = %self.id, error = %e, "the channel's checkpoint cannot be stored; messages may be read again (they are not bridged twice)");
                    }
                }
            }
        }
    }

    /// Whether this message is the bridge's own (the bot's, or one of its webhooks').
    pub(super) fn is_own(&self, author: Id<UserMarker>, webhook: Option<Id<WebhookMarker>>) -> bool {
        let s = self.state();
        s.bot_id == Some(author) || webhook.is_some_and(|w| s.own_hooks.contains(&w.get()))
    }

    /// Whether the event `origin_id` of `chat` was taken in already.
    pub(super) async fn seen(&self, chat: &ChatRef, origin_id: &str) -> bool {
        let scope = id_scope(None, chat);
        matches!(self.store.key_for_remote(self.id.as_str(), &scope, origin_id).await, Ok(Some(_)))
    }

    /// The occupant for a Discord user; a person not seen in the chat before enters the room first.
    pub(super) async fn person(&self, chat: &ChatRef, user: Id<UserMarker>, nick: String) -> Sender {
        let id = user.to_string();
        let before = self.ghosts.nick_in(chat.id.as_str(), &id);
        if let Some(kind) = self.ghosts.seen(chat.id.as_str(), &id, &nick) {
            let from = Sender::new(id.clone(), before.unwrap_or_else(|| nick.clone()));
            let _ = self.sink.emit(Event::new(self.id.clone(), chat.clone(), from, kind)).await;
        }
        Sender::new(id, nick)
    }

    pub(super) async fn emit(&self, channel: u64, message: Option<u64>, event: Event) {
        match self.sink.emit_routed(event).await {
            Ok(routed) => {
                if let Some(message) = message {
                    let _ = self.progress.send(Progress { channel, message, routed: Some(routed) });
                }
            }
            Err(e) => debug!(error = %e, "the gateway is stopping"),
        }
    }

    pub(super) fn names<'a>(&'a self, msg: &'a DiscordMessage) -> CacheNames<'a> {
        CacheNames {
            cache: &self.cache,
            guild: msg.guild_id.or_else(|| self.guild_of(msg.channel_id)),
            mentions: &msg.mentions,
        }
    }

    pub(super) fn guild_of(&self, channel: Id<ChannelMarker>) -> Option<Id<GuildMarker>> {
        self.state()
            .channels
            .get(&channel.get())
            .and_then(|c| c.guild)
            .or_else(|| self.cache.channel(channel).and_then(|c| c.guild_id))
    }

    /// The name to show for a message's author: as the message says, else (a
    /// message read back over REST carries no member) the cached server nickname.
    pub(super) fn author(&self, msg: &DiscordMessage) -> String {
        if msg.member.is_none()
            && msg.webhook_id.is_none()
            && let Some(guild) = self.guild_of(msg.channel_id)
            && let Some(member) = self.cache.member(guild, msg.author.id)
            && let Some(nick) = member.nick()
        {
            return incoming::one_line(nick);
        }
        incoming::author_name(msg)
    }

    /// A new message (live, or read back).
    pub(super) async fn message(&self, msg: DiscordMessage, backfill: bool) {
        let channel = msg.channel_id.get();
        let Some(chat) = self.portal_chat(msg.channel_id) else { return };
        let mid = msg.id.get();
        let skip = |me: &Self| {
            let _ = me.progress.send(Progress { channel, message: mid, routed: None });
        };
        if self.is_own(msg.author.id, msg.webhook_id) {
            skip(self);
            return;
        }
        let origin_id = mid.to_string();
        if self.state().recent_set.contains_key(&mid) || self.seen(&chat, &origin_id).await {
            debug!(network = %self.id, message = mid, "already bridged");
            skip(self);
            return;
        }
        if msg.content.is_empty() && msg.attachments.is_empty() && msg.embeds.is_empty() && msg.sticker_items.is_empty()
        {
            let mut s = self.state();
            if !s.message_content && s.warned_empty.is_none_or(|t| t.elapsed() > EMPTY_WARNING_EVERY) {
                s.warned_empty = Some(Instant::now());
                warn!(
                    network = %self.id,
                    channel,
                    "a message from Discord arrived empty: the bot runs without the MESSAGE_CONTENT intent. Turn on \
                     MESSAGE CONTENT INTENT in the Developer Portal (your application → Bot → Privileged Gateway \
                     Intents); the bridge uses it at its next connection"
                );
            }
        }
        let content = incoming::message_of(&msg, &self.names(&msg));
        let Some(content) = content else {
            skip(self);
            return;
        };
        let sender = self.person(&chat, msg.author.id, self.author(&msg)).await;
        self.state().remember(mid, Some(sender.clone()));
        let time = time_of(msg.timestamp);
        let event = Event::new(self.id.clone(), chat, sender, EventKind::Message(content)).with_origin_id(origin_id);
        let event = if backfill { event.with_time(time) } else { event.at(time) };
        self.emit(channel, Some(mid), event).await;
    }

    pub(super) async fn edited(&self, msg: DiscordMessage) {
        // A link preview (only embeds changed) is no edit.
        let Some(edited) = msg.edited_timestamp else { return };
        let Some(chat) = self.portal_chat(msg.channel_id) else { return };
        if self.is_own(msg.author.id, msg.webhook_id) {
            return;
        }
        let edit_id = format!("{}:{}", msg.id, edited.as_micros());
        if self.seen(&chat, &edit_id).await {
            return;
        }
        let Some(content) = incoming::message_of(&msg, &self.names(&msg)) else { return };
        let sender = self.person(&chat, msg.author.id, self.author(&msg)).await;
        let kind = EventKind::Correction { target: MessageRef(msg.id.to_string()), message: content };
        let event = Event::new(self.id.clone(), chat, sender, kind).with_origin_id(edit_id);
        self.emit(msg.channel_id.get(), None, event).await;
    }

    pub(super) async fn deleted(&self, channel: Id<ChannelMarker>, id: Id<MessageMarker>) {
        let Some(chat) = self.portal_chat(channel) else { return };
        if self.state().self_deleted.remove(&id.get()) {
            return;
        }
        // Discord does not say who deleted it: its author, when the bridge knows
        // them, else a moderator (the bot, for the room).
        let (sender, moderator) = {
            let s = self.state();
            match s.recent_set.get(&id.get()).cloned().flatten() {
                Some(author) => (author, None),
                None => {
                    let bot = s.bot_name.clone().unwrap_or_else(|| "Discord".into());
                    (Sender::new(s.bot_id.map(|b| b.to_string()).unwrap_or_default(), bot.clone()), Some(bot))
                }
            }
        };
        let kind = EventKind::Retraction { target: MessageRef(id.to_string()), moderator, reason: None };
        let event = Event::new(self.id.clone(), chat, sender, kind).with_origin_id(format!("{id}:deleted"));
        self.emit(channel.get(), None, event).await;
    }

    pub(super) async fn reaction(&self, r: &twilight_model::gateway::GatewayReaction, added: bool) {
        if self.state().bot_id == Some(r.user_id) {
            return;
        }
        let Some(chat) = self.portal_chat(r.channel_id) else { return };
        let Some(emoji) = emoji_text(&r.emoji) else { return };
        let emojis = {
            let mut s = self.state();
            if s.reactions_in.len() >= MAX_REACTION_SETS {
                s.reactions_in.clear();
            }
            let set = s.reactions_in.entry((r.message_id.get(), r.user_id.get())).or_default();
            if added {
                if !set.contains(&emoji) {
                    set.push(emoji);
                }
            } else {
                set.retain(|e| *e != emoji);
            }
            set.clone()
        };
        let nick = r
            .member
            .as_ref()
            .and_then(|m| m.nick.clone().or_else(|| m.user.global_name.clone()).or_else(|| Some(m.user.name.clone())))
            .or_else(|| self.cache.user(r.user_id).map(|u| u.global_name.clone().unwrap_or_else(|| u.name.clone())))
            .or_else(|| self.ghosts.nick_in(chat.id.as_str(), &r.user_id.to_string()))
            .unwrap_or_else(|| r.user_id.to_string());
        let sender = self.person(&chat, r.user_id, incoming::one_line(&nick)).await;
        let kind = EventKind::Reactions { target: MessageRef(r.message_id.to_string()), emojis };
        self.emit(r.channel_id.get(), None, Event::new(self.id.clone(), chat, sender, kind)).await;
    }
}
