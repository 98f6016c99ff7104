//! The end-to-end test harness: real peers on loopback, driven from Rust.
//!
//! Each test starts its own servers on free ports in its own temporary
//! directory, so tests are isolated and may restart a peer. Everything started
//! is killed when its handle is dropped, and with the test process if it dies.
//!
//! - [`process`]: spawning and waiting helpers;
//! - [`peers`]: Prosody and ejabberd, ngIRCd and InspIRCd, PostgreSQL;
//! - [`xmpp`]: a real XMPP client (slixmpp, through `tests/clients/xmpp_driver.py`);
//! - [`irc`]: a raw IRC client, independent of the bridge's IRC library;
//! - [`discord`], [`telegram`]: the Discord and Telegram API emulators, started for one test;
//! - [`synapse`]: a Synapse Matrix homeserver, with users registered by shared secret;
//! - [`matrix`]: a raw Matrix client-server API client, independent of the bridge's Matrix library;
//! - [`gateway`]: the `isthmus` binary under test;
//! - [`relay`]: a TCP relay a test can cut, to take a link down;
//! - [`scenario`], [`matrix_scenario`]: ready-made setups the tests share.
//!
//! The peers are installed by `tests/install-deps.sh`.

pub mod discord;
pub mod emulator;
pub mod gateway;
pub mod irc;
pub mod matrix;
pub mod matrix_scenario;
pub mod peers;
pub mod process;
pub mod raw_c2s;
pub mod relay;
pub mod scenario;
pub mod synapse;
pub mod telegram;
pub mod xmpp;

pub use gateway::Isthmus;
pub use irc::IrcClient;
pub use matrix::{MatrixClient, MatrixError};
pub use peers::{
    C2s, Ejabberd, EmbeddedC2s, IrcServer, IrcServerKind, Ngircd, Postgres, Prosody, ProsodyOptions, XmppServer,
    XmppServerKind,
};
pub use synapse::{AppServiceRegistration, MatrixUser, Synapse, SynapseOptions};
pub use xmpp::{Stanza, XmppClient};

/// Where the test tooling (the Python venv) lives.
pub fn cache_dir() -> std::path::PathBuf {
    if let Some(d) = std::env::var_os("ISTHMUS_TEST_CACHE") {
        return d.into();
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    std::path::PathBuf::from(home).join(".cache/isthmus")
}

/// The repository root.
pub fn repo_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Generate, for each scenario `fn name(kind: XmppServerKind)`, a test module
/// running it attached to Prosody and to ejabberd.
#[macro_export]
macro_rules! on_both_xmpp_servers {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn prosody() -> anyhow::Result<()> {
                super::$name($crate::XmppServerKind::Prosody).await
            }
            #[tokio::test]
            async fn ejabberd() -> anyhow::Result<()> {
                super::$name($crate::XmppServerKind::Ejabberd).await
            }
            #[tokio::test]
            async fn embedded() -> anyhow::Result<()> {
                super::$name($crate::XmppServerKind::Embedded).await
            }
        }
    )*};
}

/// Generate, for each scenario `fn name(kind: IrcServerKind)`, a test module
/// running it against ngIRCd (plain RFC IRC) and InspIRCd (IRCv3).
#[macro_export]
macro_rules! on_both_irc_servers {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn ngircd() -> anyhow::Result<()> {
                super::$name($crate::IrcServerKind::Ngircd).await
            }
            #[tokio::test]
            async fn inspircd() -> anyhow::Result<()> {
                super::$name($crate::IrcServerKind::Inspircd).await
            }
        }
    )*};
}
