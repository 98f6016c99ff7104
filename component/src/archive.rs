//! The room archive as the XMPP side uses it: batched writes off the relay path,
//! retention, history on join and XEP-0313 queries.
//!
//! Messages are handed to a writer task that stores them in batches (one
//! transaction per batch), so relaying never waits on the database; removals
//! (retracted and moderated messages) go the same way, in order. Queries
//! first ask the writer to flush, so a query sees every message relayed before it.
//!
//! Retention: with `retention_days` > 0, a task removes expired messages at start
//! and then every [`PRUNE_EVERY`]; in between, queries (MAM, history on join)
//! already leave out what has expired.

use std::time::Duration;

use isthmus_core::store::{ArchiveEntry, ArchivePage, ArchiveQuery, Store, StoreError, now_us};
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

enum Command {
    Record(ArchiveEntry),
    /// Remove a message (room, account or `None` for the shared entries only, stanza-id).
    Forget(String, Option<String>, String),
    Flush(oneshot::Sender<()>),
}

/// Handle to the archive. Cheap to clone.
#[derive(Clone)]
pub struct Archive {
    tx: mpsc::UnboundedSender<Command>,
    store: Store,
    /// How long messages are kept, in microseconds; `None`: forever.
    keep_us: Option<i64>,
}

/// Whether `entry` is part of `room`'s archive as `account` sees it: the account's
/// own entries and the room's shared ones.
pub(crate) fn visible(entry: &ArchiveEntry, room: &str, account: &str) -> bool {
    entry.room == room && entry.owner.as_deref().is_none_or(|o| o == account)
}

/// How often expired messages are removed.
pub const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// Largest batch written in one transaction.
const BATCH: usize = 512;

impl Archive {
    /// Start the writer (and, when `retention_days` > 0, hourly expiry).
    pub fn spawn(store: Store, retention_days: u32) -> Archive {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(writer(store.clone(), rx));
        let keep_us =
            (retention_days > 0).then(|| Duration::from_secs(u64::from(retention_days) * 86_400).as_micros() as i64);
        if let Some(keep) = keep_us {
            let store = store.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(PRUNE_EVERY);
                loop {
                    tick.tick().await;
                    match store.archive_expire(now_us() - keep).await {
                        Ok(n) => info!(removed = n, retention_days, "archive retention applied"),
                        Err(e) => warn!(error = %e, "archive retention failed; will retry"),
                    }
                }
            });
        }
        Archive { tx, store, keep_us }
    }

    /// Queue one message for the archive.
    pub fn record(&self, entry: ArchiveEntry) {
        if self.tx.send(Command::Record(entry)).is_err() {
            warn!("archive writer gone; message not archived");
        }
    }

    /// Wait until everything recorded so far is stored.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Command::Flush(tx)).is_ok() {
            let _ = rx.await;
        }
    }

    /// One archived message by its stanza-id, after a flush.
    pub async fn get(&self, stanza_id: &str) -> Result<Option<ArchiveEntry>, StoreError> {
        self.flush().await;
        self.store.archive_get(stanza_id).await
    }

    /// Queue the removal of a message (retracted, moderated) from `room`'s archive as
    /// `account` sees it (its own entries and the shared ones; `None`: the shared
    /// ones only). Applied after everything recorded before it; queries see it.
    pub fn forget(&self, room: &str, account: Option<&str>, stanza_id: &str) {
        let cmd = Command::Forget(room.to_owned(), account.map(str::to_owned), stanza_id.to_owned());
        if self.tx.send(cmd).is_err() {
            warn!("archive writer gone; message not removed from the archive");
        }
    }

    /// Query, after a flush; expired messages are left out even before they are removed.
    pub async fn query(&self, q: &ArchiveQuery) -> Result<ArchivePage, StoreError> {
        self.flush().await;
        match self.keep_us {
            Some(keep) => {
                let oldest = now_us() - keep;
                let mut q = q.clone();
                q.start_us = Some(q.start_us.map_or(oldest, |s| s.max(oldest)));
                self.store.archive_query(&q).await
            }
            None => self.store.archive_query(q).await,
        }
    }
}

async fn writer(store: Store, mut rx: mpsc::UnboundedReceiver<Command>) {
    let mut batch = Vec::with_capacity(BATCH);
    let mut forget = Vec::new();
    let mut waiting = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(cmd) = next.take() {
            match cmd {
                Command::Record(e) => batch.push(e),
                Command::Forget(room, account, id) => forget.push((room, account, id)),
                Command::Flush(done) => waiting.push(done),
            }
            // A removal is applied after the batch holding what came before it.
            if batch.len() < BATCH && forget.is_empty() {
                next = rx.try_recv().ok();
            }
        }
        if !batch.is_empty() {
            // The database may be restarting: wait for it, never drop what was said.
            let mut delay = Duration::from_millis(50);
            while let Err(e) = store.archive_append(&batch).await {
                warn!(error = %e, pending = batch.len(), retry_in = ?delay, "archive write failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            batch.clear();
        }
        for (room, account, id) in forget.drain(..) {
            let mut delay = Duration::from_millis(50);
            while let Err(e) = store.archive_remove(&room, account.as_deref(), &id).await {
                warn!(error = %e, room, stanza_id = id, retry_in = ?delay, "archive removal failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
        for done in waiting.drain(..) {
            let _ = done.send(());
        }
    }
}
