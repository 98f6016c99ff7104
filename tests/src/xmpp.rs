//! A real XMPP client for tests: slixmpp, driven through `tests/clients/xmpp_driver.py`.

use std::collections::VecDeque;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;

use crate::peers::C2s;

/// A stanza the client received.
#[derive(Debug, Clone)]
pub struct Stanza {
    /// `message`, `presence` or `iq`.
    pub kind: String,
    pub from: String,
    pub to: String,
    pub type_: String,
    pub id: String,
    pub body: Option<String>,
    /// The whole stanza as XML.
    pub xml: String,
}

impl Stanza {
    /// The `id` of its XEP-0359 `<stanza-id/>`, if it has one.
    pub fn stanza_id(&self) -> Option<String> {
        let start = self.xml.find("<stanza-id")?;
        let element = &self.xml[start..start + self.xml[start..].find('>')?];
        let value = &element[element.find(" id=\"")? + 5..];
        Some(value.split('"').next()?.to_owned())
    }

    /// Whether the stanza carries MUC status code `code`.
    pub fn has_status(&self, code: u16) -> bool {
        self.xml.contains(&format!("<status code=\"{code}\"")) || self.xml.contains(&format!("<status code='{code}'"))
    }
}

/// One logged-in XMPP client.
pub struct XmppClient {
    pub jid: String,
    child: Child,
    stdin: ChildStdin,
    events: mpsc::UnboundedReceiver<Value>,
    buffer: VecDeque<Stanza>,
    seen: Vec<String>,
    /// The SASL mechanism the login used, as slixmpp reports it.
    pub mechanism: Option<String>,
    /// Whether the stream was encrypted.
    pub tls: bool,
}

pub fn python() -> Result<std::path::PathBuf> {
    let p = crate::cache_dir().join("venv/bin/python");
    if !p.is_file() {
        bail!("{} not found: run ./tests/install-deps.sh (it creates the slixmpp venv)", p.display());
    }
    Ok(p)
}

impl XmppClient {
    /// Log `jid` in to `server` (plain c2s on loopback, or STARTTLS when the server has a CA file).
    pub async fn connect(server: &impl C2s, jid: &str, password: &str) -> Result<XmppClient> {
        let script = crate::repo_root().join("tests/clients/xmpp_driver.py");
        let mut child = Command::new(python()?)
            .arg(script)
            .args([jid, password, "127.0.0.1", &server.c2s_port().to_string()])
            .args(server.ca_file())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("start the slixmpp driver")?;
        let stdin = child.stdin.take().context("driver stdin")?;
        let stdout = child.stdout.take().context("driver stdout")?;
        let (tx, events) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(v) = serde_json::from_str::<Value>(&line)
                    && tx.send(v).is_err()
                {
                    break;
                }
            }
        });
        let mut c = XmppClient {
            jid: jid.to_owned(),
            child,
            stdin,
            events,
            buffer: VecDeque::new(),
            seen: Vec::new(),
            mechanism: None,
            tls: false,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let ev = tokio::time::timeout_at(deadline, c.events.recv())
                .await
                .map_err(|_| anyhow!("{jid} did not log in within 20 s"))?
                .ok_or_else(|| anyhow!("the XMPP driver for {jid} exited before logging in"))?;
            match ev["event"].as_str() {
                Some("ready") => {
                    c.mechanism = ev["mechanism"].as_str().map(str::to_owned);
                    c.tls = ev["tls"].as_bool().unwrap_or(false);
                    return Ok(c);
                }
                Some("failed") => bail!("{jid} could not log in: {} {}", ev["reason"], ev["xml"]),
                Some("stanza") => c.buffer.push_back(to_stanza(&ev)),
                _ => {}
            }
        }
    }

    async fn command(&mut self, cmd: Value) -> Result<()> {
        let mut line = cmd.to_string();
        line.push('\n');
        self.stdin.write_all(line.as_bytes()).await.context("write to the XMPP driver")?;
        self.stdin.flush().await?;
        Ok(())
    }

    /// Every stanza received so far, as XML, matched or not.
    pub fn seen(&self) -> &[String] {
        &self.seen
    }

    /// Forget stanzas received but not yet matched.
    pub fn clear_buffer(&mut self) {
        self.buffer.clear();
    }

    /// Send a stanza written as XML.
    pub async fn send_raw(&mut self, xml: &str) -> Result<()> {
        self.command(json!({"op": "send_raw", "xml": xml})).await
    }

    /// Send a MUC join presence (does not wait for the answer).
    pub async fn join(&mut self, room: &str, nick: &str) -> Result<()> {
        self.command(json!({"op": "join", "room": room, "nick": nick})).await
    }

    /// Send a MUC join presence asking for at most `maxstanzas` messages of history.
    pub async fn join_with_history(&mut self, room: &str, nick: &str, maxstanzas: u32) -> Result<()> {
        self.command(json!({"op": "join", "room": room, "nick": nick, "maxstanzas": maxstanzas})).await
    }

    /// Send a groupchat message; returns its id.
    pub async fn send_groupchat(&mut self, to: &str, body: &str) -> Result<String> {
        let id = format!("m-{}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos());
        self.send_groupchat_with_id(to, body, &id).await?;
        Ok(id)
    }

    /// The first stanza (buffered or new) matching `pred`; others stay buffered.
    pub async fn expect(&mut self, timeout: Duration, pred: impl Fn(&Stanza) -> bool) -> Result<Stanza> {
        if let Some(i) = self.buffer.iter().position(&pred) {
            return Ok(self.buffer.remove(i).expect("index from position"));
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(ev)) if ev["event"] == "stanza" => {
                    let s = to_stanza(&ev);
                    self.seen.push(s.xml.clone());
                    if pred(&s) {
                        return Ok(s);
                    }
                    self.buffer.push_back(s);
                }
                Ok(Some(_)) => {}
                Ok(None) => bail!("the XMPP driver for {} exited", self.jid),
                Err(_) => {
                    let last: Vec<&String> = self.seen.iter().rev().take(8).collect();
                    bail!("{}: no matching stanza within {timeout:?}; last received:\n{:#?}", self.jid, last)
                }
            }
        }
    }

    /// Every stanza buffered or arriving until none has come for `quiet`.
    pub async fn drain(&mut self, quiet: Duration) -> Result<Vec<Stanza>> {
        let mut out: Vec<Stanza> = self.buffer.drain(..).collect();
        loop {
            match tokio::time::timeout(quiet, self.events.recv()).await {
                Ok(Some(ev)) if ev["event"] == "stanza" => {
                    let s = to_stanza(&ev);
                    self.seen.push(s.xml.clone());
                    out.push(s);
                }
                Ok(Some(_)) => {}
                Ok(None) => bail!("the XMPP driver for {} exited", self.jid),
                Err(_) => return Ok(out),
            }
        }
    }

    /// Send a groupchat message with the given id (does not wait for anything).
    pub async fn send_groupchat_with_id(&mut self, to: &str, body: &str, id: &str) -> Result<()> {
        self.command(json!({"op": "send", "to": to, "type": "groupchat", "body": body, "id": id})).await
    }

    /// Ask `jid` for disco#info at `node` (XEP-0115 `node#ver`) and compute, with
    /// slixmpp's own XEP-0115 code, the verification string of the answer: (ver, answer XML).
    pub async fn verstring(&mut self, jid: &str, node: &str, hash: &str) -> Result<(String, String)> {
        self.command(json!({"op": "verstring", "jid": jid, "node": node, "hash": hash})).await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(ev)) if ev["event"] == "stanza" => {
                    let s = to_stanza(&ev);
                    self.seen.push(s.xml.clone());
                    self.buffer.push_back(s);
                }
                Ok(Some(ev)) if ev["event"] == "verstring" && ev["jid"] == jid => {
                    let xml = ev["xml"].as_str().unwrap_or_default().to_owned();
                    return match ev["ver"].as_str() {
                        Some(ver) => Ok((ver.to_owned(), xml)),
                        None => bail!("disco#info to {jid} at {node} failed: {}", ev["error"]),
                    };
                }
                Ok(Some(_)) => {}
                Ok(None) => bail!("the XMPP driver for {} exited", self.jid),
                Err(_) => bail!("{}: no disco#info answer from {jid} within 30 s", self.jid),
            }
        }
    }

    /// Wait until the server ends the connection.
    pub async fn expect_disconnected(&mut self, timeout: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(ev)) if ev["event"] == "disconnected" => return Ok(()),
                Ok(Some(_)) => {}
                Ok(None) => return Ok(()),
                Err(_) => bail!("{}: still connected after {timeout:?}", self.jid),
            }
        }
    }

    /// Disconnect cleanly.
    pub async fn disconnect(mut self) {
        let _ = self.command(json!({"op": "disconnect"})).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
    }
}

fn to_stanza(v: &Value) -> Stanza {
    let s = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
    Stanza {
        kind: s("kind"),
        from: s("from"),
        to: s("to"),
        type_: s("type"),
        id: s("id"),
        body: v["body"].as_str().map(str::to_owned),
        xml: s("xml"),
    }
}
