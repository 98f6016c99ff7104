//! The Telegram Bot API emulator (`tests/emulators/telegram_bot_api.py`) started
//! on loopback for one test, and a client of its control API.

use std::time::Duration;

use anyhow::{Result, bail};
use serde_json::{Value, json};

use crate::emulator::Emulator;

/// The token of the test bot (BotFather's shape: `ID:SECRET`).
pub const BOT_TOKEN: &str = "123456:test-bot-token";
pub const BOT_ID: u64 = 123456;

/// A running emulator.
pub struct TelegramEmulator {
    emu: Emulator,
}

impl TelegramEmulator {
    /// Start the emulator with the test bot registered.
    pub async fn start() -> Result<TelegramEmulator> {
        let emu = TelegramEmulator { emu: Emulator::start("telegram_bot_api.py", &[], "Telegram emulator").await? };
        emu.control("bot", json!({"token": BOT_TOKEN, "id": BOT_ID, "username": "isthmus_bot", "first_name": "Isthmus", "can_read_all_group_messages": true})).await?;
        Ok(emu)
    }

    /// The URL the bridge's `api_url` points at.
    pub fn api_url(&self) -> String {
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

    /// A group chat the bot is in (an administrator).
    pub async fn group(&self, id: i64, kind: &str, title: &str, is_forum: bool) -> Result<()> {
        self.control(
            "chat",
            json!({"id": id, "type": kind, "title": title, "is_forum": is_forum, "bot_is_admin": true, "admins": []}),
        )
        .await
        .map(|_| ())
    }

    /// `user` writes `text` (with `entities`) in `chat`; the message as Telegram made it.
    pub async fn say(&self, chat: i64, user: &Value, text: &str, extra: Value) -> Result<Value> {
        let mut body = json!({"chat_id": chat, "from": user, "text": text});
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                b.insert(k.clone(), v.clone());
            }
        }
        self.control("message", body).await
    }

    /// What the bot sent in `chat`, in order.
    pub async fn sent(&self, chat: i64) -> Result<Vec<Value>> {
        let v = self.get(&format!("sent?chat_id={chat}")).await?;
        Ok(v.as_array().cloned().or_else(|| v["messages"].as_array().cloned()).unwrap_or_default())
    }

    /// Wait until the bot has sent something in `chat` matching `pred`.
    pub async fn wait_sent(&self, chat: i64, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Result<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let sent = self.sent(chat).await?;
            if let Some(m) = sent.iter().find(|m| pred(m)) {
                return Ok(m.clone());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("the bot sent nothing matching in {chat} within {timeout:?}; it sent: {sent:#?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn stop(&mut self) {
        self.emu.stop().await;
    }
}

/// A Telegram user object.
pub fn user(id: u64, first_name: &str, username: &str) -> Value {
    json!({"id": id, "is_bot": false, "first_name": first_name, "username": username})
}
