//! A network emulator under `tests/emulators/` (Python, aiohttp) started on
//! loopback for one test: its process, its log, and a client of its control API
//! (`/_control/...`, JSON). The Telegram and Discord harnesses build on it.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Child;

use crate::process::terminate;

/// A running emulator.
pub struct Emulator {
    _dir: TempDir,
    log: PathBuf,
    port: u16,
    child: Child,
    http: reqwest::Client,
}

impl Emulator {
    /// Start `tests/emulators/{script}` with `args` (after `--port 0`) and wait for
    /// its `listening on 127.0.0.1:PORT` line; `what` names it in errors.
    pub async fn start(script: &str, args: &[&str], what: &str) -> Result<Emulator> {
        let dir = tempfile::Builder::new().prefix("isthmus-emulator-").tempdir()?;
        let log = dir.path().join("emulator.log");
        let mut child = tokio::process::Command::new(crate::xmpp::python()?)
            .arg(crate::repo_root().join("tests/emulators").join(script))
            .args(["--port", "0"])
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::fs::File::create(&log)?)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("start the {what}"))?;
        let stdout = child.stdout.take().context("emulator stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .map_err(|_| anyhow!("the {what} did not start within 20 s"))??
            .ok_or_else(|| anyhow!("the {what} exited: {}", crate::process::tail(&log, 20)))?;
        let port = line
            .strip_prefix("listening on 127.0.0.1:")
            .and_then(|p| p.trim().parse().ok())
            .ok_or_else(|| anyhow!("unexpected first line from the {what}: {line}"))?;
        let http = reqwest::Client::builder().no_proxy().build()?;
        Ok(Emulator { _dir: dir, log, port, child, http })
    }

    /// Its origin, `http://127.0.0.1:PORT`.
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

    pub async fn stop(&mut self) {
        terminate(&mut self.child, Duration::from_secs(2)).await;
    }
}
