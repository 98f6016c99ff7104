//! A raw IRC client on a TCP socket: the far end of the tests, independent of the
//! IRC library the bridge uses.

use std::collections::VecDeque;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

pub struct IrcClient {
    pub nick: String,
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    buffer: VecDeque<String>,
    seen: Vec<String>,
    /// Bytes of a line not yet complete: kept across timeouts, so no read loses data.
    partial: Vec<u8>,
    /// The server ended the connection (seen by [`IrcClient::drain`]).
    closed: bool,
}

impl IrcClient {
    /// Connect to 127.0.0.1:`port` and register as `nick`.
    pub async fn connect(port: u16, nick: &str) -> Result<IrcClient> {
        Self::connect_with_caps(port, nick, &[]).await
    }

    /// Connect and register as `nick`, asking for IRCv3 capabilities `caps` first
    /// (registration completes whether the server grants them or not).
    pub async fn connect_with_caps(port: u16, nick: &str, caps: &[&str]) -> Result<IrcClient> {
        Self::register(port, nick, caps, None).await
    }

    /// Connect and register as `nick` on a server asking for `password` (PASS).
    pub async fn connect_with_password(port: u16, nick: &str, password: &str) -> Result<IrcClient> {
        Self::register(port, nick, &[], Some(password)).await
    }

    async fn register(port: u16, nick: &str, caps: &[&str], password: Option<&str>) -> Result<IrcClient> {
        let stream = TcpStream::connect(("127.0.0.1", port)).await.context("connect to the IRC server")?;
        stream.set_nodelay(true)?;
        let (r, w) = stream.into_split();
        let mut c = IrcClient {
            nick: nick.to_owned(),
            reader: BufReader::new(r),
            writer: w,
            buffer: VecDeque::new(),
            seen: vec![],
            partial: Vec::new(),
            closed: false,
        };
        if !caps.is_empty() {
            c.send_line(&format!("CAP REQ :{}", caps.join(" "))).await?;
        }
        if let Some(password) = password {
            c.send_line(&format!("PASS {password}")).await?;
        }
        c.send_line(&format!("NICK {nick}")).await?;
        c.send_line(&format!("USER {nick} 0 * :test client {nick}")).await?;
        if !caps.is_empty() {
            c.expect_line(Duration::from_secs(10), |l| {
                l.contains(" CAP ") && (l.contains(" ACK") || l.contains(" NAK"))
            })
            .await?;
            c.send_line("CAP END").await?;
        }
        c.expect_line(Duration::from_secs(10), |l| l.split(' ').nth(1) == Some("001")).await?;
        Ok(c)
    }

    /// Every line received so far (PINGs aside), matched or not.
    pub fn seen(&self) -> &[String] {
        &self.seen
    }

    /// Forget lines received but not yet matched.
    pub fn clear_buffer(&mut self) {
        self.buffer.clear();
    }

    pub async fn send_line(&mut self, line: &str) -> Result<()> {
        self.writer.write_all(format!("{line}\r\n").as_bytes()).await?;
        Ok(())
    }

    /// Send raw bytes (for encoding tests).
    pub async fn send_bytes(&mut self, bytes: &[u8]) -> Result<()> {
        self.writer.write_all(bytes).await?;
        Ok(())
    }

    pub async fn privmsg(&mut self, target: &str, text: &str) -> Result<()> {
        self.send_line(&format!("PRIVMSG {target} :{text}")).await
    }

    /// Join and wait for the end of NAMES.
    pub async fn join(&mut self, channel: &str) -> Result<()> {
        self.send_line(&format!("JOIN {channel}")).await?;
        self.expect_line(Duration::from_secs(10), |l| l.split(' ').nth(1) == Some("366")).await?;
        Ok(())
    }

    /// The first line (buffered or new) matching `pred`; PINGs are answered.
    pub async fn expect_line(&mut self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Result<String> {
        if let Some(i) = self.buffer.iter().position(|l| pred(l)) {
            return Ok(self.buffer.remove(i).expect("index from position"));
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let Some(line) = self.next_line(deadline).await? else {
                let last: Vec<&String> = self.seen.iter().rev().take(10).collect();
                bail!("{}: no matching IRC line within {timeout:?}; last lines:\n{:#?}", self.nick, last);
            };
            if pred(&line) {
                return Ok(line);
            }
            self.buffer.push_back(line);
        }
    }

    /// Every line buffered or arriving until none has come for `quiet`; PINGs are
    /// answered. Stops quietly when the server ends the connection.
    pub async fn drain(&mut self, quiet: Duration) -> Result<Vec<String>> {
        let mut out: Vec<String> = self.buffer.drain(..).collect();
        if self.closed {
            return Ok(out);
        }
        loop {
            match self.next_line(tokio::time::Instant::now() + quiet).await {
                Ok(Some(line)) => out.push(line),
                Ok(None) => return Ok(out),
                // The server went away (a restart under test): what came before counts.
                Err(_) => {
                    self.closed = true;
                    return Ok(out);
                }
            }
        }
    }

    /// The next line (PINGs answered and skipped), or `None` at the deadline.
    async fn next_line(&mut self, deadline: tokio::time::Instant) -> Result<Option<String>> {
        loop {
            // `partial` lives in the client: a timeout mid-line keeps what was read.
            let n = match tokio::time::timeout_at(deadline, self.reader.read_until(b'\n', &mut self.partial)).await {
                Ok(r) => r?,
                Err(_) => return Ok(None),
            };
            if n == 0 {
                bail!("{}: the IRC server closed the connection", self.nick);
            }
            if !self.partial.ends_with(b"\n") {
                continue;
            }
            let raw = std::mem::take(&mut self.partial);
            let line = String::from_utf8_lossy(&raw).trim_end_matches(['\r', '\n']).to_owned();
            if let Some(rest) = line.strip_prefix("PING") {
                self.send_line(&format!("PONG{rest}")).await?;
                continue;
            }
            self.seen.push(line.clone());
            return Ok(Some(line));
        }
    }
}
