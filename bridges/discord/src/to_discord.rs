//! The model → Discord: the channel's webhook (found again, made when missing),
//! posts as each sender's nick, replies as a quote with a jump link, edits,
//! deletes and reactions through the bot.

use super::*;

impl DiscordNetwork {
    /// What the bridge knows of a channel (asked once).
    pub(super) async fn channel_info(
        &self,
        channel: Id<ChannelMarker>,
    ) -> Result<(ChannelInfo, Option<Id<ChannelMarker>>), DeliveryError> {
        let ch = self
            .http
            .channel(channel)
            .await
            .map_err(|e| delivery_error("read the channel", &e))?
            .model()
            .await
            .map_err(|e| {
                DeliveryError::Unavailable(format!("Discord's answer about the channel cannot be read: {e}"))
            })?;
        let info = ChannelInfo { guild: ch.guild_id };
        self.state().channels.insert(channel.get(), info);
        let parent = ch.kind.is_thread().then_some(ch.parent_id).flatten();
        Ok((info, parent))
    }

    /// The webhook that posts in `channel` (a thread: its parent's), found or made.
    pub(super) async fn hook(&self, channel: Id<ChannelMarker>) -> Result<Hook, DeliveryError> {
        if let Some(h) = self.state().hooks.get(&channel.get()) {
            return Ok(h.clone());
        }
        let _one = self.hook_lock.lock().await;
        if let Some(h) = self.state().hooks.get(&channel.get()) {
            return Ok(h.clone());
        }
        let (_, parent) = self.channel_info(channel).await?;
        let bot = self.bot_user().await;
        let home = parent.unwrap_or(channel);
        let list = self
            .http
            .channel_webhooks(home)
            .await
            .map_err(|e| delivery_error("list the channel's webhooks", &e))?
            .models()
            .await
            .map_err(|e| DeliveryError::Unavailable(format!("Discord's webhook list cannot be read: {e}")))?;
        let mut found = None;
        {
            let mut s = self.state();
            for w in &list {
                if w.user.as_ref().is_some_and(|u| u.id == bot) {
                    s.own_hooks.insert(w.id.get());
                    if found.is_none()
                        && w.name.as_deref() == Some(WEBHOOK_NAME)
                        && let Some(token) = &w.token
                    {
                        found = Some((w.id, token.clone()));
                    }
                }
            }
        }
        let (id, token) = match found {
            Some(f) => f,
            None => {
                let w = self
                    .http
                    .create_webhook(home, WEBHOOK_NAME)
                    .await
                    .map_err(|e| delivery_error("make a webhook", &e))?
                    .model()
                    .await
                    .map_err(|e| DeliveryError::Unavailable(format!("Discord's new webhook cannot be read: {e}")))?;
                let token =
                    w.token.ok_or_else(|| DeliveryError::Rejected("Discord gave the webhook no token".into()))?;
                info!(network = %self.id, channel = %home, webhook = %w.id, "made the channel's webhook");
                (w.id, token)
            }
        };
        let hook = Hook { id, token, thread: parent.map(|_| channel) };
        let mut s = self.state();
        s.own_hooks.insert(id.get());
        s.hooks.insert(channel.get(), hook.clone());
        Ok(hook)
    }

    /// Forget a webhook Discord no longer knows (someone deleted it).
    pub(super) fn forget_hook(&self, channel: Id<ChannelMarker>) {
        let mut s = self.state();
        if let Some(h) = s.hooks.remove(&channel.get()) {
            warn!(network = %self.id, channel = %channel, webhook = %h.id, "the channel's webhook is gone; making a new one");
        }
    }

    /// The quote above a reply to `target`.
    pub(super) async fn replied(&self, channel: Id<ChannelMarker>, target: &MessageRef) -> Option<outgoing::Replied> {
        let mid = target.0.parse::<u64>().ok().and_then(Id::<MessageMarker>::new_checked)?;
        let guild = match self.guild_of(channel) {
            Some(g) => g.to_string(),
            None => {
                self.channel_info(channel).await.ok().and_then(|(i, _)| i.guild).map_or("@me".into(), |g| g.to_string())
            }
        };
        let link = format!("{}/channels/{guild}/{channel}/{mid}", self.config.api_url.trim_end_matches('/'));
        let found = match self.http.message(channel, mid).await {
            Ok(r) => r.model().await.ok(),
            Err(e) => {
                debug!(network = %self.id, error = %e, "the replied-to message cannot be read");
                None
            }
        };
        Some(outgoing::Replied {
            author: found.as_ref().map(|m| self.author(m)),
            text: found.as_ref().map(|m| incoming::parse(&m.content, &self.names(m)).0),
            link,
        })
    }

    /// Post `content` as `nick` through the channel's webhook; the message's id.
    pub(super) async fn post(
        &self,
        channel: Id<ChannelMarker>,
        nick: &str,
        content: &str,
        event: &Event,
    ) -> Result<u64, DeliveryError> {
        let username = outgoing::username(nick);
        let mentions = AllowedMentions::default();
        for again in [false, true] {
            let hook = self.hook(channel).await?;
            if let Some(r) = &event.receipt {
                // The copy leaves the process now: it is not sent twice after a crash.
                r.confirm().await;
            }
            let mut req = self
                .http
                .execute_webhook(hook.id, &hook.token)
                .content(content)
                .username(&username)
                .allowed_mentions(Some(&mentions));
            if let Some(t) = hook.thread {
                req = req.thread_id(t);
            }
            match req.wait().await {
                Ok(r) => {
                    let m = r
                        .model()
                        .await
                        .map_err(|e| DeliveryError::Unavailable(format!("Discord's answer cannot be read: {e}")))?;
                    self.state().remember(m.id.get(), None);
                    return Ok(m.id.get());
                }
                Err(e) if error_code(&e) == Some(UNKNOWN_WEBHOOK) && !again => self.forget_hook(channel),
                Err(e) => return Err(delivery_error("post the message", &e)),
            }
        }
        Err(DeliveryError::Unavailable("the channel's webhook keeps disappearing".into()))
    }

    pub(super) fn message_id(target: &MessageRef) -> Result<Id<MessageMarker>, DeliveryError> {
        target
            .0
            .split(':')
            .next()
            .and_then(|t| t.parse::<u64>().ok())
            .and_then(Id::new_checked)
            .ok_or_else(|| DeliveryError::Rejected("that message is not known on Discord".into()))
    }

    pub(super) async fn react(
        &self,
        channel: Id<ChannelMarker>,
        event: &Event,
        target: &MessageRef,
        emojis: &[String],
    ) -> Result<(), DeliveryError> {
        let mid = Self::message_id(target)?;
        let (add, remove) = {
            let mut s = self.state();
            if s.reactions_out.len() >= MAX_REACTION_SETS && !s.reactions_out.contains_key(&mid.get()) {
                s.reactions_out.clear();
            }
            let per = s.reactions_out.entry(mid.get()).or_default();
            let union =
                |p: &HashMap<String, Vec<String>>| -> HashSet<String> { p.values().flatten().cloned().collect() };
            let before = union(per);
            per.insert(event.sender.id.to_string(), emojis.to_vec());
            per.retain(|_, v| !v.is_empty());
            let after = union(per);
            let add: Vec<String> = emojis.iter().filter(|e| !before.contains(*e)).cloned().collect();
            let remove: Vec<String> = before.difference(&after).cloned().collect();
            (add, remove)
        };
        if let Some(r) = &event.receipt {
            r.confirm().await;
        }
        for e in add {
            let emoji = RequestReactionType::Unicode { name: &e };
            self.http.create_reaction(channel, mid, &emoji).await.map_err(|er| delivery_error("react", &er))?;
        }
        for e in remove {
            let emoji = RequestReactionType::Unicode { name: &e };
            self.http
                .delete_current_user_reaction(channel, mid, &emoji)
                .await
                .map_err(|er| delivery_error("take the reaction back", &er))?;
        }
        Ok(())
    }
}
