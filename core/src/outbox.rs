//! The durable outbox: what the gateway accepted survives a crash.
//!
//! When the router accepts a message-like event, it stores each destination's
//! copy here before anyone is told the event was accepted (the MUC reflection,
//! a receipt). Each copy carries a [`Receipt`]. A destination that gets no
//! acknowledgement calls [`Receipt::confirm`] right before the event leaves the
//! process, which removes the row durably first. A destination whose remote side
//! acknowledges later (an IRC server answers a PING sent after the lines, or
//! echoes them) calls [`Receipt::sending`] instead, which durably marks the row
//! written, and the router removes it with [`Receipt::delivered`] once the
//! acknowledgement came; only then is the sender told. A copy that is finished
//! without being written (refused, its room left) removes its row when its last
//! receipt handle is dropped.
//!
//! Rows left after a crash are replayed on the next start, in order, except
//! those marked written: such a copy may or may not have arrived (the kernel can
//! drop what was written when the process dies), and sending it again could
//! deliver it twice, so its sender is told instead.
//!
//! Writes are group-committed by one writer task: every change queued while a
//! transaction runs goes into the next one. A copy confirmed before the writer
//! took its row never reaches the disk, and its confirmation waits for nothing
//! (the common case: the destination was idle). Waiting for durability never
//! blocks the writer; a failed transaction is retried with backoff (the
//! database may be restarting), never dropped, so delivery pauses and then resumes.
//!
//! An event from an origin that sends it again after a restart (a Matrix sync
//! resumes from its last safe point) carries its origin ids into the outbox
//! ([`Outbox::insert_with_ids`]): they are written in the same transaction as
//! its first copy's row, even when the row itself is cancelled, and none of its
//! copies leaves the process before they are durable. So the origin's ids are
//! in the id map exactly when the event is safe here (stored or written out):
//! the origin skips what it finds there and sends again what it does not, and
//! the event is neither written twice nor lost.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::{Notify, mpsc, watch};
use tracing::warn;

use crate::store::{IdMapEntry, OutboxRow, Store, next_archive_id, now_us};

/// Largest number of changes in one transaction.
const BATCH: usize = 1024;

/// How long new rows wait before the writer takes them.
const COALESCE: Duration = Duration::from_millis(2);

enum Change {
    /// A row, and message ids that become durable with it (even if it is cancelled).
    Insert(OutboxRow, Vec<IdMapEntry>),
    /// The copy is being written; its acknowledgement comes later.
    Written(i64),
    Remove(i64),
}

struct Shared {
    /// Ticket numbers are handed out under this lock, in channel order.
    tx: Mutex<(u64, mpsc::UnboundedSender<(u64, Change)>)>,
    /// Rows queued for insertion that the writer has not taken yet. Removing a
    /// row from here cancels its insertion: nothing to write, nothing to wait for.
    queued: Mutex<std::collections::HashSet<i64>>,
    /// The highest ticket whose change is durable.
    committed: watch::Receiver<u64>,
    /// Someone waits for a change to be durable (a copy being written): the writer
    /// stops waiting for more changes to coalesce.
    hurry: Notify,
}

/// Handle to the outbox. Cheap to clone.
#[derive(Clone)]
pub struct Outbox {
    shared: Arc<Shared>,
}

impl fmt::Debug for Outbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Outbox")
    }
}

impl Outbox {
    /// Start the writer task on the current runtime.
    pub fn spawn(store: Store) -> Outbox {
        let (tx, rx) = mpsc::unbounded_channel();
        let (done_tx, done_rx) = watch::channel(0u64);
        let shared = Arc::new(Shared {
            tx: Mutex::new((0, tx)),
            queued: Mutex::new(std::collections::HashSet::new()),
            committed: done_rx,
            hurry: Notify::new(),
        });
        tokio::spawn(writer(store, rx, done_tx, shared.clone()));
        Outbox { shared }
    }

    fn submit(&self, change: Change) -> u64 {
        let mut guard = self.shared.tx.lock().unwrap_or_else(|p| p.into_inner());
        guard.0 += 1;
        let ticket = guard.0;
        if guard.1.send((ticket, change)).is_err() {
            warn!("outbox writer gone; change not stored");
        }
        ticket
    }

    /// Queue one copy of an event for `destination`; returns its receipt. The row
    /// is durable once [`Receipt::persisted`] returns.
    pub fn insert(&self, destination: &str, event_json: String) -> Receipt {
        self.insert_tied(destination, event_json, Vec::new(), None)
    }

    /// Like [`Outbox::insert`], and the event's origin ids are written in the same
    /// transaction as the row, or without it when the row is cancelled; the copy
    /// does not leave the process before they are durable.
    pub fn insert_with_ids(&self, destination: &str, event_json: String, ids: Vec<IdMapEntry>) -> Receipt {
        self.insert_tied(destination, event_json, ids, None)
    }

    /// Another copy of the event whose first copy is `first`: it does not leave
    /// the process before `first`'s ids are durable either.
    pub fn insert_after(&self, destination: &str, event_json: String, first: &Receipt) -> Receipt {
        self.insert_tied(destination, event_json, Vec::new(), Some(first))
    }

    fn insert_tied(
        &self,
        destination: &str,
        event_json: String,
        ids: Vec<IdMapEntry>,
        first: Option<&Receipt>,
    ) -> Receipt {
        let seq = next_archive_id();
        self.queued().insert(seq);
        let carries_ids = !ids.is_empty();
        let row = OutboxRow {
            seq,
            destination: destination.to_owned(),
            event: event_json,
            created_us: now_us(),
            written_us: 0,
        };
        let ticket = self.submit(Change::Insert(row, ids));
        let requires = match first {
            Some(first) => first.inner.requires,
            None if carries_ids => ticket,
            None => 0,
        };
        Receipt::with_copies(self.clone(), Some(seq), ticket, requires, Vec::new())
    }

    fn queued(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<i64>> {
        self.shared.queued.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Take the row out: cancelled if the writer has not taken it yet (`None`),
    /// else the ticket of its removal.
    fn remove(&self, seq: i64) -> Option<u64> {
        if self.queued().remove(&seq) {
            return None;
        }
        Some(self.submit(Change::Remove(seq)))
    }

    /// A receipt for a row stored by an earlier run (replay).
    pub fn existing(&self, seq: i64) -> Receipt {
        Receipt::with_copies(self.clone(), Some(seq), 0, 0, Vec::new())
    }

    /// Wait until every change submitted so far is durable.
    pub async fn settled(&self) {
        let ticket = self.shared.tx.lock().unwrap_or_else(|p| p.into_inner()).0;
        self.durable(ticket).await;
    }

    /// Wait until every change up to `ticket` is durable.
    async fn durable(&self, ticket: u64) {
        let mut rx = self.shared.committed.clone();
        // Err only when the writer is gone (shutdown): nothing left to wait for.
        let _ = rx.wait_for(|&c| c >= ticket).await;
    }
}

/// One event copy's place in the outbox, shared by every handle to that copy.
///
/// Also used as a gate ([`Receipt::gate_for`]): a reflection waits until the
/// copies it announces are stored or have left the process.
#[derive(Clone)]
pub struct Receipt {
    inner: Arc<ReceiptInner>,
}

struct ReceiptInner {
    outbox: Outbox,
    seq: Option<i64>,
    /// The ticket of the insert (0: stored by an earlier run).
    ticket: u64,
    /// A ticket that must be durable before the copy leaves (0: none): the one
    /// that writes the event's origin ids.
    requires: u64,
    removed: AtomicBool,
    /// Marked written, waiting for the destination's acknowledgement.
    written: AtomicBool,
    /// Confirmed: the copy is leaving the process (or, for a gate, the gate opened).
    left: AtomicBool,
    left_signal: Notify,
    /// For a gate: the copies it waits for.
    copies: Vec<Weak<ReceiptInner>>,
}

impl Receipt {
    fn with_copies(
        outbox: Outbox,
        seq: Option<i64>,
        ticket: u64,
        requires: u64,
        copies: Vec<Weak<ReceiptInner>>,
    ) -> Receipt {
        Receipt {
            inner: Arc::new(ReceiptInner {
                outbox,
                seq,
                ticket,
                requires,
                removed: AtomicBool::new(false),
                written: AtomicBool::new(false),
                left: AtomicBool::new(false),
                left_signal: Notify::new(),
                copies,
            }),
        }
    }

    /// A gate that opens once this receipt's row is stored; it removes nothing.
    pub fn gate(&self) -> Receipt {
        Self::gate_for(std::slice::from_ref(self)).unwrap_or_else(|| self.clone())
    }

    /// A gate that opens once every one of `copies` is stored or has left the
    /// process (whichever comes first for each); it removes nothing. `None` for no copies.
    pub fn gate_for(copies: &[Receipt]) -> Option<Receipt> {
        let first = copies.first()?;
        let ticket = copies.iter().map(|c| c.inner.ticket).max().unwrap_or(0);
        let weak = copies.iter().map(|c| Arc::downgrade(&c.inner)).collect();
        Some(Self::with_copies(first.inner.outbox.clone(), None, ticket, 0, weak))
    }

    /// Wait until the row is stored.
    pub async fn persisted(&self) {
        self.inner.outbox.durable(self.inner.ticket).await;
    }

    /// The event is about to leave the process: remove its row durably first, so a
    /// crash after this point never sends it twice. For a gate: wait until it opens.
    /// Idempotent.
    pub async fn confirm(&self) {
        if self.inner.seq.is_none() && !self.inner.copies.is_empty() {
            return self.open_gate().await;
        }
        let ticket = match self.inner.seq {
            // `None`: never written, so nothing to undo and nothing to wait for.
            Some(seq) if !self.inner.removed.swap(true, Ordering::AcqRel) => self.inner.outbox.remove(seq),
            // Confirmed before, or a plain gate: wait for the insert.
            Some(_) | None => Some(self.inner.ticket),
        };
        // The origin's ids go out before the copy does (tickets commit in order).
        let ticket = ticket.unwrap_or(0).max(self.inner.requires);
        if ticket > 0 {
            self.inner.outbox.durable(ticket).await;
        }
        self.left();
    }

    /// The event is about to leave the process and its destination acknowledges it
    /// later: mark the row written durably first, so after a crash the copy is
    /// known to be in doubt and is not sent twice. [`Receipt::delivered`] removes
    /// it once acknowledged. Idempotent.
    pub async fn sending(&self) {
        let Some(seq) = self.inner.seq else { return self.confirm().await };
        let ticket = if self.inner.removed.load(Ordering::Acquire) || self.inner.written.swap(true, Ordering::AcqRel) {
            self.inner.ticket
        } else {
            let ticket = self.inner.outbox.submit(Change::Written(seq));
            self.inner.outbox.shared.hurry.notify_one();
            ticket
        };
        self.inner.outbox.durable(ticket.max(self.inner.requires)).await;
        self.left();
    }

    /// The destination acknowledged the copy: remove its row, durably. Idempotent.
    pub async fn delivered(&self) {
        let Some(seq) = self.inner.seq else { return };
        if self.inner.removed.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Some(ticket) = self.inner.outbox.remove(seq) {
            self.inner.outbox.durable(ticket).await;
        }
        self.left();
    }

    /// The copy has left the process (or its row is gone): gates waiting on it open.
    fn left(&self) {
        self.inner.left.store(true, Ordering::Release);
        self.inner.left_signal.notify_waiters();
    }

    /// A gate opens when its copies are stored, or each has left the process.
    async fn open_gate(&self) {
        let stored = self.inner.outbox.durable(self.inner.ticket);
        tokio::pin!(stored);
        for copy in &self.inner.copies {
            // A copy already finished and dropped cannot hold the gate.
            let Some(copy) = copy.upgrade() else { continue };
            let left = copy.left_signal.notified();
            tokio::pin!(left);
            left.as_mut().enable();
            if copy.left.load(Ordering::Acquire) {
                continue;
            }
            tokio::select! {
                _ = &mut stored => return,
                _ = left => {}
            }
        }
    }
}

impl Drop for ReceiptInner {
    fn drop(&mut self) {
        // Finished without being written (refused, or its room was left): the row goes.
        if let Some(seq) = self.seq
            && !self.removed.swap(true, Ordering::AcqRel)
        {
            self.outbox.remove(seq);
        }
    }
}

impl fmt::Debug for Receipt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Receipt").field("seq", &self.inner.seq).field("ticket", &self.inner.ticket).finish()
    }
}

/// Two handles are equal when they stand for the same row (or the same gate).
impl PartialEq for Receipt {
    fn eq(&self, other: &Self) -> bool {
        self.inner.seq == other.inner.seq && self.inner.ticket == other.inner.ticket
    }
}

async fn writer(
    store: Store,
    mut rx: mpsc::UnboundedReceiver<(u64, Change)>,
    committed: watch::Sender<u64>,
    shared: Arc<Shared>,
) {
    let mut inserts: Vec<OutboxRow> = Vec::new();
    let mut removals: Vec<i64> = Vec::new();
    let mut written: Vec<i64> = Vec::new();
    let mut ids: Vec<IdMapEntry> = Vec::new();
    while let Some(first) = rx.recv().await {
        if matches!(first.1, Change::Insert(..)) {
            // Give the copy a moment to be delivered: confirmed before the writer takes
            // it, it never reaches the disk (the usual case when the destination is idle).
            // A copy marked written is waited for: no need to wait any longer then.
            tokio::select! {
                _ = tokio::time::sleep(COALESCE) => {}
                _ = shared.hurry.notified() => {}
            }
        }
        let mut last = 0;
        let mut next = Some(first);
        let mut n = 0;
        while let Some((ticket, change)) = next {
            last = ticket;
            n += 1;
            match change {
                Change::Insert(row, origin_ids) => {
                    // Taken now: from here on a confirmation waits for the removal.
                    let still_wanted = shared.queued.lock().unwrap_or_else(|p| p.into_inner()).remove(&row.seq);
                    if still_wanted {
                        inserts.push(row);
                    }
                    ids.extend(origin_ids);
                }
                Change::Written(seq) => match inserts.iter_mut().find(|r| r.seq == seq) {
                    // Inserted in the same batch: it goes in already marked.
                    Some(row) => row.written_us = now_us(),
                    None => written.push(seq),
                },
                Change::Remove(seq) => {
                    // Inserted and removed in the same batch: the row never needs to exist.
                    if let Some(i) = inserts.iter().position(|r| r.seq == seq) {
                        inserts.swap_remove(i);
                    } else {
                        removals.push(seq);
                    }
                }
            }
            next = if n < BATCH { rx.try_recv().ok() } else { None };
        }
        // Insert order does not matter inside one transaction; replay orders by seq.
        let mut delay = Duration::from_millis(50);
        loop {
            match store.outbox_apply(&inserts, &written, now_us(), &removals, &ids).await {
                Ok(()) => break,
                Err(e) => {
                    warn!(error = %e, pending = inserts.len() + written.len() + removals.len() + ids.len(), retry_in = ?delay,
                        "could not store the outbox; delivery waits until the database is back");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
        inserts.clear();
        written.clear();
        removals.clear();
        ids.clear();
        committed.send_replace(last);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::connect(&format!("sqlite://{}/o.db", dir.path().display()), 2).await.expect("store");
        store.migrate().await.expect("migrate");
        (dir, store)
    }

    #[tokio::test]
    async fn confirmed_rows_are_gone_and_unconfirmed_rows_stay_in_order() {
        let (_dir, store) = store().await;
        let outbox = Outbox::spawn(store.clone());
        let kept: Vec<Receipt> = (0..100).map(|i| outbox.insert("irc", format!("{{\"n\":{i}}}"))).collect();
        let confirmed: Vec<Receipt> = (0..50).map(|i| outbox.insert("xmpp", format!("{{\"c\":{i}}}"))).collect();
        kept[99].persisted().await;
        for r in &confirmed {
            r.confirm().await;
        }
        let rows = store.outbox_pending().await.expect("pending");
        assert_eq!(rows.len(), 100);
        assert!(rows.iter().all(|r| r.destination == "irc"));
        let order: Vec<String> = rows.iter().map(|r| r.event.clone()).collect();
        let expected: Vec<String> = (0..100).map(|i| format!("{{\"n\":{i}}}")).collect();
        assert_eq!(order, expected, "replay order is acceptance order");
        // Dropping the last handle of an unconfirmed copy removes its row too.
        let gate = kept[0].gate();
        drop(kept);
        gate.confirm().await; // a gate opens without removing anything
        outbox.settled().await;
        assert_eq!(store.outbox_pending().await.expect("pending").len(), 0);
        // A copy confirmed before the writer took it is never written at all.
        let quick = outbox.insert("irc", "{\"quick\":1}".into());
        quick.confirm().await;
        outbox.settled().await;
        assert_eq!(store.outbox_pending().await.expect("pending").len(), 0);
    }

    #[tokio::test]
    async fn origin_ids_are_durable_before_any_copy_leaves() {
        let (_dir, store) = store().await;
        let outbox = Outbox::spawn(store.clone());
        let lookup = |id: &'static str| {
            let store = store.clone();
            async move { store.key_for_remote("matrix", "room", id).await.expect("lookup") }
        };
        // Confirmed at once (usually before the writer took it: the row is never
        // written), its ids are durable when the confirmation returns. (Whether the
        // writer took the row first depends on timing, so it is not asserted.)
        let quick = outbox.insert_with_ids(
            "xmpp",
            "{}".into(),
            vec![crate::idmap::entry("k1", "matrix", "room", &["$a".into()])],
        );
        quick.confirm().await;
        assert_eq!(lookup("$a").await, Some("k1".into()));
        // A second copy of the same event waits for the first copy's ids too.
        let first = outbox.insert_with_ids(
            "xmpp",
            "{}".into(),
            vec![crate::idmap::entry("k2", "matrix", "room", &["$b".into()])],
        );
        let second = outbox.insert_after("irc", "{}".into(), &first);
        second.confirm().await;
        assert_eq!(lookup("$b").await, Some("k2".into()));
        // The first copy is still unconfirmed: its row is stored, in the same transaction as the ids.
        first.persisted().await;
        assert_eq!(store.outbox_pending().await.expect("pending").len(), 1);
        first.confirm().await;
        outbox.settled().await;
        assert!(store.outbox_pending().await.expect("pending").is_empty());
    }

    #[tokio::test]
    async fn a_copy_written_stays_marked_until_delivered() {
        let (_dir, store) = store().await;
        let outbox = Outbox::spawn(store.clone());
        let written_at = |store: Store| async move {
            store.outbox_pending().await.expect("pending").into_iter().map(|r| r.written_us).collect::<Vec<_>>()
        };
        // Marked before the writer took the insert: the row goes in already marked.
        let quick = outbox.insert("irc", "{\"q\":1}".into());
        quick.sending().await;
        assert!(written_at(store.clone()).await.iter().all(|&w| w > 0), "stored as written");
        // Marked after it was stored: the row is updated.
        let slow = outbox.insert("irc", "{\"s\":1}".into());
        slow.persisted().await;
        assert_eq!(written_at(store.clone()).await.iter().filter(|&&w| w == 0).count(), 1);
        slow.sending().await;
        slow.sending().await; // idempotent
        let marks = written_at(store.clone()).await;
        assert_eq!(marks.len(), 2);
        assert!(marks.iter().all(|&w| w > 0), "both in doubt if the process died now: {marks:?}");
        // Acknowledged: gone, durably, before `delivered` returns.
        quick.delivered().await;
        assert_eq!(written_at(store.clone()).await.len(), 1);
        // Never acknowledged (the connection was lost): the last handle removes it.
        drop(slow);
        outbox.settled().await;
        assert!(written_at(store.clone()).await.is_empty());
        // A gate over a copy being written opens once it is marked.
        let copy = outbox.insert("irc", "{\"g\":1}".into());
        let gate = Receipt::gate_for(std::slice::from_ref(&copy)).expect("a gate");
        copy.sending().await;
        gate.confirm().await;
        copy.delivered().await;
        assert!(written_at(store).await.is_empty());
    }

    #[tokio::test]
    async fn rows_survive_a_new_outbox_on_the_same_store() {
        let (_dir, store) = store().await;
        let first = Outbox::spawn(store.clone());
        let r = first.insert("irc", "{\"x\":1}".into());
        r.persisted().await;
        // The process dies: the receipt is never dropped or confirmed.
        std::mem::forget(r);
        let second = Outbox::spawn(store.clone());
        let rows = store.outbox_pending().await.expect("pending");
        assert_eq!(rows.len(), 1);
        let replayed = second.existing(rows[0].seq);
        replayed.confirm().await;
        assert!(store.outbox_pending().await.expect("pending").is_empty());
    }
}
