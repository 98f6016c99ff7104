//! Media owned by core, for every bridge: the address policy ([`guard`]), the
//! fetcher of files named by URL ([`fetch`]) and the signed-link media proxy
//! that makes a network's files fetchable by XMPP clients without handing out the
//! network's credentials ([`proxy`]).

pub mod fetch;
pub mod guard;
pub mod proxy;

pub use fetch::{Fetcher, attachment_name, error_chain};
pub use guard::is_public;
