//! The Discord API emulator (`tests/emulators/discord_api.py`) started on
//! loopback for one test, with one bot application and one guild, and a client
//! of its control API.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Child;

use crate::process::terminate;

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
    _dir: TempDir,
    log: PathBuf,
    port: u16,
    child: Child,
    http: reqwest::Client,
}

impl DiscordEmulator {
    /// Start the emulator with the test bot (`privileged` intents enabled for it)
    /// and the guild: #general, #random, the role `mods`, Tom and Ann.
    pub async fn start_with(privileged: &[&str]) -> Result<DiscordEmulator> {
        let dir = tempfile::Builder::new().prefix("isthmus-discord-").tempdir()?;
        let log = dir.path().join("emulator.log");
        let script = crate::repo_root().join("tests/emulators/discord_api.py");
        let mut child = tokio::process::Command::new(crate::xmpp::python()?)
            .arg(script)
            .args(["--port", "0", "--resume-window", "120"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::fs::File::create(&log)?)
            .kill_on_drop(true)
            .spawn()
            .context("start the Discord emulator")?;
        let stdout = child.stdout.take().context("emulator stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .map_err(|_| anyhow!("the Discord emulator did not start within 20 s"))??
            .ok_or_else(|| anyhow!("the Discord emulator exited: {}", crate::process::tail(&log, 20)))?;
        let port = line
            .strip_prefix("listening on 127.0.0.1:")
            .and_then(|p| p.trim().parse().ok())
            .ok_or_else(|| anyhow!("unexpected first line from the emulator: {line}"))?;
        let http = reqwest::Client::builder().no_proxy().build()?;
        let emu = DiscordEmulator { _dir: dir, log, port, child, http };
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
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> String {
        crate::process::tail(&self.log, 40)
    }

    /// `POST /_control/{path}` with `body`; the answer's JSON.
    pub async fn control(&self, path: &str, body: Value) -> Result<Value> {
        let url = format!("{}/_control/{path}", self.url());
        let resp = self.http.post(&url).json(&body).send().await.with_context(|| format!("POST {url}"))?;
        let status = resp.status();
        let text = resp.text().await?;
        if !status.is_success() {
            bail!("POST /_control/{path} answered {status}: {text}");
        }
        Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// `GET /_control/{path_and_query}`.
    pub async fn get(&self, path_and_query: &str) -> Result<Value> {
        let url = format!("{}/_control/{path_and_query}", self.url());
        let resp = self.http.get(&url).send().await.with_context(|| format!("GET {url}"))?;
        let status = resp.status();
        let text = resp.text().await?;
        if !status.is_success() {
            bail!("GET /_control/{path_and_query} answered {status}: {text}");
        }
        Ok(serde_json::from_str(&text)?)
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
        terminate(&mut self.child, Duration::from_secs(2)).await;
    }
}
