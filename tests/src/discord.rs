//! The Discord API emulator (`tests/emulators/discord_api.py`) started on
//! loopback for one test, with one bot application and one guild, and a client
//! of its control API.

use std::time::Duration;

use anyhow::{Result, bail};
use serde_json::{Value, json};

use crate::emulator::Emulator;

/// The test bot's token (the Developer Portal's shape: three parts joined by `.`).
pub const BOT_TOKEN: &str = "MTAwMDAw.GxTest.discord-bot-token";
pub const BOT_ID: &str = "100000000000000001";
pub const GUILD: &str = "200000000000000001";
/// Two text channels of the guild.
pub const GENERAL: &str = "300000000000000001";
pub const RANDOM: &str = "300000000000000002";
pub const MODS: &str = "400000000000000001";

/// A Discord user object.
pub fn user(id: &str, username: &str, global_name: &str) -> Value {
    json!({"id": id, "username": username, "global_name": global_name})
}

/// Tom (server nick "Tommy") and Ann, members of the guild.
pub fn tom() -> Value {
    user("500000000000000001", "tom", "Tom T.")
}
pub fn ann() -> Value {
    user("500000000000000002", "ann", "Ann")
}

/// A running emulator.
pub struct DiscordEmulator {
    emu: Emulator,
}

impl DiscordEmulator {
    /// Start the emulator with the test bot (`privileged` intents enabled for it)
    /// and the guild: #general, #random, the role `mods`, Tom and Ann.
    pub async fn start_with(privileged: &[&str]) -> Result<DiscordEmulator> {
        let emu = DiscordEmulator {
            emu: Emulator::start("discord_api.py", &["--resume-window", "120"], "Discord emulator").await?,
        };
        emu.control(
            "app",
            json!({"token": BOT_TOKEN, "bot_user": {"id": BOT_ID, "username": "isthmus"}, "privileged_intents": privileged}),
        )
        .await?;
        let mut tom_member = json!({"user": tom(), "nick": "Tommy", "roles": [MODS]});
        tom_member["user"]["id"] = tom()["id"].clone();
        emu.control(
            "guild",
            json!({
                "id": GUILD, "name": "Test Guild",
                "channels": [{"id": GENERAL, "name": "general", "type": 0}, {"id": RANDOM, "name": "random", "type": 0}],
                "roles": [{"id": MODS, "name": "mods", "mentionable": true}],
                "members": [tom_member, {"user": ann()}],
            }),
        )
        .await?;
        Ok(emu)
    }

    /// The emulator with MESSAGE_CONTENT and GUILD_MEMBERS enabled for the bot.
    pub async fn start() -> Result<DiscordEmulator> {
        Self::start_with(&["MESSAGE_CONTENT", "GUILD_MEMBERS"]).await
    }

    /// The origin the bridge's `api_url` and `cdn_url` point at.
    pub fn url(&self) -> String {
        self.emu.url()
    }

    pub fn log(&self) -> String {
        self.emu.log()
    }

    /// `POST /_control/{path}` with `body`; the answer's JSON.
    pub async fn control(&self, path: &str, body: Value) -> Result<Value> {
        self.emu.control(path, body).await
    }

    /// `GET /_control/{path_and_query}`.
    pub async fn get(&self, path_and_query: &str) -> Result<Value> {
        self.emu.get(path_and_query).await
    }

    /// `author` writes `content` in `channel` (with `extra` fields); the message.
    pub async fn say(&self, channel: &str, author: &Value, content: &str, extra: Value) -> Result<Value> {
        let mut body = json!({"channel_id": channel, "author": author, "content": content});
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                b.insert(k.clone(), v.clone());
            }
        }
        self.control("message", body).await
    }

    /// Every message of `channel`, in order (deleted ones too, marked).
    pub async fn messages(&self, channel: &str) -> Result<Vec<Value>> {
        Ok(self.get(&format!("messages?channel_id={channel}")).await?.as_array().cloned().unwrap_or_default())
    }

    /// The messages webhooks posted in `channel`, in order.
    pub async fn posted(&self, channel: &str) -> Result<Vec<Value>> {
        Ok(self.messages(channel).await?.into_iter().filter(|m| m["webhook_id"].is_string()).collect())
    }

    /// Wait until `channel` has a message matching `pred`.
    pub async fn wait_message(&self, channel: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Result<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let all = self.messages(channel).await?;
            if let Some(m) = all.iter().find(|m| pred(m)) {
                return Ok(m.clone());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("nothing matching in {channel} within {timeout:?}; it holds: {all:#?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The webhooks of `channel`.
    pub async fn webhooks(&self, channel: &str) -> Result<Vec<Value>> {
        Ok(self.get(&format!("webhooks?channel_id={channel}")).await?.as_array().cloned().unwrap_or_default())
    }

    /// The gateway's sessions and counters.
    pub async fn sessions(&self) -> Result<Value> {
        self.get("sessions").await
    }

    pub async fn fault(&self, fault: Value) -> Result<Value> {
        self.control("fault", fault).await
    }

    /// REST calls the bridge made (`method`, path prefix under /api/v10).
    pub async fn calls(&self, method: &str, path_prefix: &str) -> Result<Vec<Value>> {
        Ok(self
            .get(&format!("calls?method={method}&path_prefix={path_prefix}"))
            .await?
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    pub async fn stop(&mut self) {
        self.emu.stop().await;
    }
}
