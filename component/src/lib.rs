//! Isthmus's XMPP side and the `isthmus` binary's building blocks.
//!
//! - [`link`]: the XEP-0114 component link, with its own reconnect and keepalive;
//! - [`gateway`]: stanzas ↔ core events, the MUC service, the XMPP side as a network;
//! - [`stanza`]: small helpers over xmpp-parsers;
//! - [`xep`]: XEPs xmpp-parsers lacks (0424 retraction, 0428 fallback), with `xso`;
//! - [`moderation`]: XEP-0425 moderation requests from room moderators;
//! - [`commands`]: XEP-0050 ad-hoc commands and their chat equivalents;
//! - [`admin`]: the commands of `access.admins` (users, disconnect, link status, announce);
//! - [`room_commands`]: the same on each room's address (`status`, `leave`);
//! - [`archive`]: batched archive writes, history on join, XEP-0313;
//! - [`server`]: the embedded XMPP server core (c2s, SASL, rosters, presence, carbons);
//! - [`app`]: wiring configuration, store, bridges, router and links together.
//!
//! Depends on `isthmus-core`, `isthmus-config` and the bridge crates; nothing depends on it.

pub mod admin;
pub mod app;
pub mod archive;
pub mod commands;
pub mod disco;
pub mod gateway;
pub mod link;
pub mod moderation;
pub mod nesting;
pub mod outgoing;
pub mod portal_admin;
pub mod puppet;
pub mod room_commands;
pub mod server;
pub mod settings;
pub mod stanza;
pub mod xep;
