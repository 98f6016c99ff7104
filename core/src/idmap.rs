//! The message id map as the router uses it: writes batched off the relay path.
//!
//! Every relayed message records its ids on each side. Writing them one
//! transaction per message would hold the relay on the database; instead a
//! writer task stores whatever has queued up in one transaction. Lookups (a
//! correction, reply, retraction or reaction resolving its target) first wait
//! until everything queued before them is stored, so they always see the ids of
//! every message relayed earlier. A failed write is retried with backoff, never
//! dropped.
//!
//! The origin ids of events that travel with the outbox (see
//! [`crate::outbox`]) are written by the outbox's writer instead; lookups wait
//! for it too.

use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tracing::warn;

use crate::outbox::Outbox;
use crate::store::{IdMapEntry, Result, Store};

enum Command {
    Record(IdMapEntry),
    Flush(oneshot::Sender<()>),
}

/// Largest batch written in one transaction.
const BATCH: usize = 512;

/// Handle to the id map. Cheap to clone.
#[derive(Clone)]
pub struct IdMap {
    tx: mpsc::UnboundedSender<Command>,
    store: Store,
    /// Writes some ids too (with its rows): lookups wait for it as well.
    outbox: Option<Outbox>,
}

impl IdMap {
    /// Start the writer task on the current runtime.
    pub fn spawn(store: Store) -> IdMap {
        Self::spawn_with(store, None)
    }

    /// Start the writer task; lookups also wait for what `outbox` has queued.
    pub fn spawn_with(store: Store, outbox: Option<Outbox>) -> IdMap {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(writer(store.clone(), rx));
        IdMap { tx, store, outbox }
    }

    /// Queue the ids of one message on one network.
    pub fn record(&self, key: &str, network: &str, scope: &str, remote_ids: &[String]) {
        if remote_ids.is_empty() {
            return;
        }
        self.record_entry(entry(key, network, scope, remote_ids));
    }

    /// Queue one entry (see [`entry`]).
    pub fn record_entry(&self, entry: IdMapEntry) {
        if self.tx.send(Command::Record(entry)).is_err() {
            warn!("id map writer gone; ids not recorded");
        }
    }

    /// Wait until everything recorded so far is stored.
    pub async fn flush(&self) {
        if let Some(outbox) = &self.outbox {
            outbox.settled().await;
        }
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Command::Flush(tx)).is_ok() {
            let _ = rx.await;
        }
    }

    /// The message key of an id seen on `network` in `scope`, after a flush.
    pub async fn key_for_remote(&self, network: &str, scope: &str, remote_id: &str) -> Result<Option<String>> {
        self.flush().await;
        self.store.key_for_remote(network, scope, remote_id).await
    }

    /// The ids message `key` has on `network`, in part order (no flush: call after
    /// [`IdMap::key_for_remote`], which flushed).
    pub async fn remote_ids_for(&self, key: &str, network: &str) -> Result<Vec<String>> {
        self.store.remote_ids_for(key, network).await
    }
}

/// The ids of one message on one network, in one scope.
pub fn entry(key: &str, network: &str, scope: &str, remote_ids: &[String]) -> IdMapEntry {
    IdMapEntry {
        key: key.to_owned(),
        network: network.to_owned(),
        scope: scope.to_owned(),
        remote_ids: remote_ids.to_vec(),
    }
}

async fn writer(store: Store, mut rx: mpsc::UnboundedReceiver<Command>) {
    let mut batch = Vec::new();
    let mut waiters = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(cmd) = next {
            match cmd {
                Command::Record(e) => batch.push(e),
                Command::Flush(w) => waiters.push(w),
            }
            next = if batch.len() < BATCH { rx.try_recv().ok() } else { None };
        }
        let mut delay = Duration::from_millis(50);
        loop {
            match store.map_messages(&batch).await {
                Ok(()) => break,
                Err(e) => {
                    warn!(error = %e, pending = batch.len(), "could not store message ids; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
        batch.clear();
        for w in waiters.drain(..) {
            let _ = w.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lookups_see_every_id_recorded_before_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::connect(&format!("sqlite://{}/m.db", dir.path().display()), 2).await.expect("store");
        store.migrate().await.expect("migrate");
        let map = IdMap::spawn(store);
        for i in 0..2000 {
            map.record(&format!("k{i}"), "irc", "s", &[format!("r{i}")]);
        }
        assert_eq!(map.key_for_remote("irc", "s", "r1999").await.expect("lookup"), Some("k1999".into()));
        assert_eq!(map.key_for_remote("irc", "s", "r0").await.expect("lookup"), Some("k0".into()));
        assert_eq!(map.remote_ids_for("k7", "irc").await.expect("ids"), vec!["r7".to_owned()]);
        assert_eq!(map.key_for_remote("irc", "other", "r7").await.expect("lookup"), None);
    }
}
