//! Isthmus core: what every network has in common.
//!
//! - [`model`]: the common message model (events, messages, references) that every
//!   network translates to and from;
//! - [`address`]: reversible mapping of remote identifiers into JID localparts;
//! - [`ghosts`]: people of bot-bridged networks as occupants of portal rooms;
//! - [`media`]: the fetcher of files named by URL, its address policy, and the signed-link media proxy;
//! - [`markup`]: HTML ↔ XEP-0393 message styling, for networks whose messages carry HTML;
//! - [`network`]: the [`network::Network`] trait a bridge implements, and its capabilities;
//! - [`portal`]: portals, one XMPP room linked to chats on any networks, kept in the store;
//! - [`relay`]: how a bot shows a person from another network (`{nick}: {text}`);
//! - [`spans`]: styled text as plain text plus spans (Telegram entities), and back;
//! - [`router`]: hands each event to the networks it must reach and records the id map;
//! - [`store`]: the SQL store (SQLite or PostgreSQL);
//! - [`secrets`]: sealing credentials before they reach the store.
//!
//! This crate knows no network protocol and no XMPP beyond JIDs. Bridges
//! (`bridges/*`) and the XMPP component depend on it; it depends on none of them.

pub mod address;
pub mod ghosts;
pub mod idmap;
pub mod markup;
pub mod media;
pub mod model;
pub mod network;
pub mod outbox;
pub mod portal;
pub mod relay;
pub mod router;
pub mod secrets;
pub mod spans;
pub mod store;

pub use jid;
