//! Runs the translation of incoming IRC traffic into core events with no server
//! and no task behind the connection: one parsed line in, the events it produced
//! out. Used by the fuzz targets in `tests/fuzz/` and by the unit tests of
//! [`crate::connection`]; not part of the bridge's API.

use std::sync::Arc;

use irc::proto::Message as IrcMessage;
use isthmus_core::jid::BareJid;
use isthmus_core::model::{Event, NetworkId};
use isthmus_core::network::{EventSink, EventStream};
use tokio::sync::mpsc;

use crate::connection::{Connection, ConnectionKey, Reader};

/// One user's connection to one server, fed by hand.
pub struct Harness {
    conn: Arc<Connection>,
    reader: Reader,
    events: EventStream,
    /// What the connection would send; kept open so that sending never fails.
    outgoing: mpsc::UnboundedReceiver<Box<crate::connection::Queued>>,
}

impl Harness {
    /// `account`'s connection to `server` on `network`, asking for `nick`.
    pub fn new(network: NetworkId, account: BareJid, server: &str, nick: &str) -> Harness {
        let key = ConnectionKey { account, server: server.to_owned() };
        let (conn, outgoing) = Connection::unconnected(network, key, nick);
        // Small on purpose: events are drained while a line is handled, never buffered up.
        let (sink, events) = EventSink::channel(4);
        let reader = Reader::detached(conn.clone(), sink);
        Harness { conn, reader, events, outgoing }
    }

    /// The connection, to act as the XMPP user would (join, part, change nick).
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// Handle one line from the server; returns the events it produced, in order.
    pub fn handle(&mut self, message: IrcMessage) -> Vec<Event> {
        let Harness { reader, events, outgoing, .. } = self;
        // Nothing is read from the network here: the commands the connection queued are not needed.
        while outgoing.try_recv().is_ok() {}
        futures::executor::block_on(async {
            let mut out = Vec::new();
            let handling = reader.handle(message);
            futures::pin_mut!(handling);
            loop {
                tokio::select! {
                    biased;
                    Some(event) = events.recv() => out.push(event),
                    () = &mut handling => break,
                }
            }
            while let Ok(event) = events.try_recv() {
                out.push(event);
            }
            out
        })
    }
}
