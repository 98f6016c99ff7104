//! The gateway connection: one shard (twilight-gateway), its intents, and what
//! the operator is told when Discord refuses it.
//!
//! The shard asks for GUILDS, GUILD_MESSAGES, MESSAGE_CONTENT,
//! GUILD_MESSAGE_REACTIONS and GUILD_MEMBERS. The last is optional: when Discord
//! closes with 4014 (a privileged intent not enabled for the application), the
//! shard identifies again without it, then without MESSAGE_CONTENT, saying each
//! time which switch to turn on in the Developer Portal. A bad token (4004) is said
//! plainly and retried rarely. twilight resumes at READY's `resume_gateway_url`;
//! when a reconnection attempt fails it forgets that URL and would resume at the
//! first one (where Discord refuses a RESUME), so the shard is made again with its
//! session and the resume URL it had. IDENTIFYs are spaced by an [`IdentifyQueue`]
//! (Discord allows one per 5 seconds per bucket).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};
use twilight_gateway::error::ReceiveMessageErrorType;
use twilight_gateway::queue::Queue;
use twilight_gateway::{CloseFrame, ConfigBuilder, Event, EventTypeFlags, Intents, Shard, ShardId, StreamExt as _};

/// The intents the bridge asks for, by what it can do without each.
pub fn wanted(attempt: usize) -> Option<(Intents, &'static str)> {
    let base = Intents::GUILDS | Intents::GUILD_MESSAGES | Intents::GUILD_MESSAGE_REACTIONS;
    [
        (base | Intents::MESSAGE_CONTENT | Intents::GUILD_MEMBERS, ""),
        (base | Intents::MESSAGE_CONTENT, "GUILD_MEMBERS"),
        (base, "GUILD_MEMBERS and MESSAGE_CONTENT"),
    ]
    .get(attempt)
    .copied()
}

/// Spaces IDENTIFYs by `interval` (Discord: 5 s for a bot of one shard).
#[derive(Debug, Clone)]
pub struct IdentifyQueue {
    interval: Duration,
    next: Arc<Mutex<Instant>>,
}

impl IdentifyQueue {
    pub fn new(interval: Duration) -> Self {
        IdentifyQueue { interval, next: Arc::new(Mutex::new(Instant::now())) }
    }
}

impl Queue for IdentifyQueue {
    fn enqueue(&self, _shard: u32) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        let at = {
            let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
            let at = (*next).max(Instant::now());
            *next = at + self.interval;
            at
        };
        tokio::spawn(async move {
            tokio::time::sleep_until(at.into()).await;
            let _ = tx.send(());
        });
        rx
    }
}

/// What the connection tells the bridge.
#[derive(Debug)]
pub enum Update {
    /// A dispatch from the gateway.
    Event(Box<Event>),
    /// Identified with these intents (MESSAGE_CONTENT among them or not).
    Intents(Intents),
    /// Time is up for the guilds of session `n` to arrive: read back now.
    Backfill(u64),
}

/// How the shard is reached.
pub struct Settings {
    pub network: String,
    pub token: String,
    pub url: String,
    pub queue: IdentifyQueue,
}

fn shard(
    settings: &Settings,
    intents: Intents,
    resume: Option<(twilight_gateway::Session, String)>,
) -> Shard<IdentifyQueue> {
    let mut config = ConfigBuilder::new(settings.token.clone(), intents)
        .proxy_url(settings.url.trim_end_matches('/').to_owned())
        .queue(settings.queue.clone());
    if let Some((session, url)) = resume {
        config = config.session(session).resume_url(url);
    }
    Shard::with_config(ShardId::ONE, config.build())
}

/// Run the shard for as long as `updates` is read.
pub async fn run(settings: Settings, updates: mpsc::UnboundedSender<Update>) {
    let net = settings.network.clone();
    let mut attempt = 0;
    let Some((mut intents, _)) = wanted(attempt) else { return };
    let mut shard = shard(&settings, intents, None);
    let mut resume_url: Option<String> = None;
    let mut failures: u32 = 0;
    loop {
        let item = shard.next_event(EventTypeFlags::all()).await;
        match item {
            Some(Ok(Event::GatewayClose(frame))) => {
                let code = frame.as_ref().map(|f| f.code);
                match code {
                    Some(4004) => {
                        warn!(
                            network = %net,
                            "Discord refuses the bot token (gateway close 4004): put the token from the Developer Portal \
                             (your application → Bot → Reset Token) in `token`; trying again in 5 minutes"
                        );
                        tokio::time::sleep(Duration::from_secs(300)).await;
                        shard = self::shard(&settings, intents, None);
                    }
                    Some(4014) => {
                        attempt += 1;
                        match wanted(attempt) {
                            Some((fewer, missing)) => {
                                let what = if missing == "GUILD_MEMBERS" {
                                    "SERVER MEMBERS INTENT is off for the application (optional: people appear when they \
                                     first speak instead of from the member list)"
                                } else {
                                    "MESSAGE CONTENT INTENT is off for the application: messages from Discord arrive \
                                     empty until it is on"
                                };
                                warn!(
                                    network = %net,
                                    "Discord refused the intents (gateway close 4014): {what}. Turn it on in the \
                                     Developer Portal: your application → Bot → Privileged Gateway Intents; \
                                     connecting without {missing} meanwhile"
                                );
                                intents = fewer;
                            }
                            None => {
                                warn!(network = %net, "Discord refuses even the basic intents (4014); trying again in 5 minutes");
                                tokio::time::sleep(Duration::from_secs(300)).await;
                                attempt = 0;
                                intents = wanted(0).map(|w| w.0).unwrap_or(intents);
                            }
                        }
                        shard = self::shard(&settings, intents, None);
                    }
                    Some(c @ (4010..=4013)) => {
                        warn!(network = %net, code = c, reason = ?frame.as_ref().map(|f| f.reason.to_string()), "Discord closed the gateway for good; trying again in 5 minutes");
                        tokio::time::sleep(Duration::from_secs(300)).await;
                        shard = self::shard(&settings, intents, None);
                    }
                    _ => debug!(network = %net, ?code, "the gateway connection closed; reconnecting"),
                }
            }
            Some(Ok(event)) => {
                failures = 0;
                if let Event::Ready(r) = &event {
                    resume_url = Some(r.resume_gateway_url.clone());
                    info!(network = %net, bot = %r.user.name, "Discord bot ready");
                    if updates.send(Update::Intents(intents)).is_err() {
                        return;
                    }
                }
                if updates.send(Update::Event(Box::new(event))).is_err() {
                    shard.close(CloseFrame::RESUME);
                    return;
                }
            }
            Some(Err(e)) if matches!(e.kind(), ReceiveMessageErrorType::Reconnect) => {
                failures = failures.saturating_add(1);
                let wait = Duration::from_secs(1 << failures.min(6));
                warn!(network = %net, error = %e, retry_in = ?wait, "the Discord gateway cannot be reached");
                tokio::time::sleep(wait).await;
                // Keep resuming where READY said, not at the first URL.
                let session = shard.session().cloned();
                if let (Some(session), Some(url)) = (session, resume_url.clone()) {
                    shard = self::shard(&settings, intents, Some((session, url)));
                }
            }
            Some(Err(e)) => debug!(network = %net, error = %e, "a gateway message that cannot be read"),
            None => {
                // Closed for good (4004, 4014 handled above make a new shard).
                tokio::time::sleep(Duration::from_secs(5)).await;
                shard = self::shard(&settings, intents, None);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn optional_intents_go_first() {
        let (all, _) = wanted(0).expect("first");
        assert!(all.contains(Intents::MESSAGE_CONTENT | Intents::GUILD_MEMBERS | Intents::GUILD_MESSAGE_REACTIONS));
        let (second, missing) = wanted(1).expect("second");
        assert!(second.contains(Intents::MESSAGE_CONTENT) && !second.contains(Intents::GUILD_MEMBERS), "{missing}");
        assert!(!wanted(2).expect("third").0.contains(Intents::MESSAGE_CONTENT));
        assert!(wanted(3).is_none());
    }

    #[tokio::test]
    async fn identifies_are_spaced() {
        let q = IdentifyQueue::new(Duration::from_millis(200));
        let start = Instant::now();
        let (a, b) = (q.enqueue(0), q.enqueue(0));
        a.await.expect("first");
        assert!(start.elapsed() < Duration::from_millis(150));
        b.await.expect("second");
        assert!(start.elapsed() >= Duration::from_millis(200));
    }
}
