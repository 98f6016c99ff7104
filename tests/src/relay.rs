//! A TCP relay on loopback that a test can cut and restore: it takes a link
//! down (both ends see the connection close) without stopping either server.

use anyhow::Result;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Relays every connection made to [`Relay::port`] to a target port on 127.0.0.1.
pub struct Relay {
    port: u16,
    up: watch::Sender<bool>,
    accept: JoinHandle<()>,
}

impl Relay {
    /// Listen on a free loopback port and relay to `target_port`.
    pub async fn start(target_port: u16) -> Result<Relay> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let (up, _) = watch::channel(true);
        let state = up.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let mut up = state.subscribe();
                if !*up.borrow_and_update() {
                    // Cut: the connection is closed at once, like a refused one.
                    continue;
                }
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(("127.0.0.1", target_port)).await else { return };
                    let (mut client, mut server) = (client, server);
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = up.wait_for(|up| !*up) => {}
                    }
                });
            }
        });
        Ok(Relay { port, up, accept })
    }

    /// The port to connect to instead of the target's.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Close every relayed connection; new ones are closed as soon as they are made.
    pub fn cut(&self) {
        self.up.send_replace(false);
    }

    /// Relay new connections again.
    pub fn restore(&self) {
        self.up.send_replace(true);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accept.abort();
    }
}
