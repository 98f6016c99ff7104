//! Stanzas on their way from the gateway to the XMPP server, per domain: the
//! queue the gateway writes to without ever waiting (bounded by count) and the
//! batches the component link or the embedded server take from it.

use std::sync::Arc;

use isthmus_core::outbox::Receipt;
use tokio::sync::mpsc;
use tokio_xmpp::Stanza;
use tracing::warn;

/// A stanza on its way to the XMPP server.
#[derive(Debug)]
pub struct Outgoing {
    pub stanza: Stanza,
    /// Confirmed right before the stanza is written: it takes the event out of the
    /// durable outbox, or (a gate) holds a reflection until what it announces is stored.
    pub receipt: Option<Receipt>,
    /// Its place in the domain's queue, given back when the stanza is written or dropped.
    _slot: Option<QueueSlot>,
}

/// A place in an [`OutgoingQueue`]; dropping it frees the place.
#[derive(Debug)]
struct QueueSlot(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for QueueSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A domain's stanzas on their way to the XMPP server. The gateway never waits on
/// it (the link may be down for long), so it is bounded by count instead: past
/// [`OutgoingQueue::MAX_QUEUED`] stanzas waiting, those that carry nothing durable
/// (presences, chat states, answers the client will ask again for) are dropped,
/// with a warning; stanzas of events kept in the durable outbox are always queued
/// (they are bounded by the outbox and the router's backlogs, and a restart
/// replays them).
#[derive(Debug, Clone)]
pub struct OutgoingQueue {
    tx: mpsc::UnboundedSender<Outgoing>,
    queued: Arc<std::sync::atomic::AtomicUsize>,
    max: usize,
}

impl OutgoingQueue {
    pub const MAX_QUEUED: usize = 100_000;

    pub fn new(tx: mpsc::UnboundedSender<Outgoing>) -> Self {
        Self::with_limit(tx, Self::MAX_QUEUED)
    }

    pub fn with_limit(tx: mpsc::UnboundedSender<Outgoing>, max: usize) -> Self {
        OutgoingQueue { tx, queued: Arc::new(std::sync::atomic::AtomicUsize::new(0)), max }
    }

    /// Stanzas waiting now.
    pub fn len(&self) -> usize {
        self.queued.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Queue `stanza` (written once `receipt` is confirmed); `false` when it was dropped.
    pub fn push(&self, domain: &str, stanza: Stanza, receipt: Option<Receipt>) -> bool {
        let before = self.queued.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let slot = QueueSlot(self.queued.clone());
        if before >= self.max && receipt.is_none() {
            drop(slot);
            if before % 1000 == 0 {
                warn!(
                    domain,
                    queued = before,
                    "the XMPP server has not taken the gateway's stanzas for long: presences and notifications are dropped until it does"
                );
            }
            return false;
        }
        if self.tx.send(Outgoing { stanza, receipt, _slot: Some(slot) }).is_err() {
            warn!(domain, "component link gone; stanza dropped during shutdown");
            return false;
        }
        true
    }
}

impl Outgoing {
    /// Most stanzas written in one batch (one durable commit for their receipts).
    const MAX_BATCH: usize = 64;

    /// Confirm the receipt, if any; call right before writing the stanza.
    pub async fn confirm(&self) {
        if let Some(r) = &self.receipt {
            r.confirm().await;
        }
    }

    /// `first` and whatever else is queued behind it, up to a batch.
    fn batch(first: Outgoing, queue: &mut mpsc::UnboundedReceiver<Outgoing>) -> Vec<Outgoing> {
        let mut batch = vec![first];
        while batch.len() < Self::MAX_BATCH {
            match queue.try_recv() {
                Ok(item) => batch.push(item),
                Err(_) => break,
            }
        }
        batch
    }

    /// `first` and whatever else is queued behind it (up to a batch), with every
    /// receipt confirmed (one durable commit covers the batch): the stanzas to write now.
    pub async fn confirmed_batch(first: Outgoing, queue: &mut mpsc::UnboundedReceiver<Outgoing>) -> Vec<Stanza> {
        let batch = Self::batch(first, queue);
        futures::future::join_all(batch.iter().map(Outgoing::confirm)).await;
        batch.into_iter().map(|item| item.stanza).collect()
    }

    /// `first` and whatever else is queued behind it (up to a batch), with every
    /// receipt marked written (one durable commit covers the batch): the stanzas to
    /// write now, and the receipts to let go of once the server acknowledged them.
    pub async fn written_batch(
        first: Outgoing,
        queue: &mut mpsc::UnboundedReceiver<Outgoing>,
    ) -> (Vec<Stanza>, Vec<Receipt>) {
        let batch = Self::batch(first, queue);
        futures::future::join_all(batch.iter().filter_map(|item| item.receipt.as_ref()).map(Receipt::sending)).await;
        let mut receipts = Vec::new();
        let stanzas = batch
            .into_iter()
            .map(|item| {
                receipts.extend(item.receipt);
                item.stanza
            })
            .collect();
        (stanzas, receipts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_xmpp::parsers::presence::Presence;

    fn stanza() -> Stanza {
        Presence::available().into()
    }

    #[tokio::test]
    async fn past_the_limit_only_durable_stanzas_are_queued() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let q = OutgoingQueue::with_limit(tx, 3);
        for _ in 0..3 {
            assert!(q.push("d", stanza(), None));
        }
        assert!(!q.push("d", stanza(), None), "a fourth presence is dropped");
        assert_eq!(q.len(), 3);
        let store = isthmus_core::store::Store::connect("sqlite::memory:", 1).await.expect("store");
        store.migrate().await.expect("migrate");
        let durable = isthmus_core::outbox::Outbox::spawn(store).insert("xmpp", "{}".into());
        assert!(q.push("d", stanza(), Some(durable)), "a durable stanza is always queued");
        assert_eq!(q.len(), 4);
        // Taking stanzas out frees their places.
        let first = rx.recv().await.expect("queued");
        drop(first);
        let batch = Outgoing::confirmed_batch(rx.recv().await.expect("queued"), &mut rx).await;
        assert_eq!(batch.len(), 3);
        assert!(q.is_empty(), "{} left", q.len());
        assert!(q.push("d", stanza(), None));
    }
}
