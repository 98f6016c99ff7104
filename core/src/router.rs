//! The router: takes each event from the network it happened on to every network
//! that must see it, and keeps the message id map.
//!
//! Destinations: a chat that belongs to a portal reaches every other member of
//! the portal; any other chat is personal and links exactly two sides, the XMPP
//! user and the remote network. An event is never sent back to its origin, so
//! loops cannot happen.
//!
//! For every message-like event the router records the origin's ids and each
//! destination's ids under one [`MessageKey`], and rewrites references (reply,
//! correction, retraction, reaction, marker targets) from the origin's id space
//! into each destination's before delivery.
//!
//! A destination that cannot be reached for a while (a homeserver restarting) does
//! not lose what was accepted for it: a message-like copy it refuses as
//! temporarily unavailable waits in a per-chat backlog, and one task per backlog
//! delivers it and everything queued behind it, in order, retrying with backoff.
//! The copies keep their outbox rows meanwhile, so a restart replays them.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::{Instrument, debug, info, warn};

use crate::idmap::{self, IdMap};
use crate::model::{ChatRef, Event, EventKind, MessageKey, MessageRef, NetworkId};
use crate::network::{Confirmation, Confirmer, Delivered, DeliveryError, EventStream, Network};
use crate::outbox::{Outbox, Receipt};
use crate::portal::Portals;
use crate::store::Store;

/// The outcome of routing one event: one entry per destination.
#[derive(Debug, Default)]
pub struct RouteReport {
    pub deliveries: Vec<(NetworkId, Result<Delivered, DeliveryError>)>,
    /// For events kept in the durable outbox: opens once every copy is stored.
    /// Whatever tells the sender the event was accepted waits for it.
    pub persisted: Option<Receipt>,
}

impl RouteReport {
    /// The first failure, if any.
    pub fn first_error(&self) -> Option<&DeliveryError> {
        self.deliveries.iter().find_map(|(_, r)| r.as_ref().err())
    }
    /// Ids produced on `network`, if it was a destination and succeeded.
    pub fn ids_on(&self, network: &NetworkId) -> Option<&[String]> {
        self.deliveries
            .iter()
            .find(|(n, _)| n == network)
            .and_then(|(_, r)| r.as_ref().ok())
            .map(|d| d.remote_ids.as_slice())
    }
}

/// Routes events between networks. Cheap to clone.
#[derive(Clone)]
pub struct Router {
    inner: Arc<Inner>,
}

struct Inner {
    networks: HashMap<NetworkId, Arc<dyn Network>>,
    /// The portals: a member chat's event reaches every other chat of its portal.
    portals: Portals,
    store: Store,
    ids: IdMap,
    outbox: Outbox,
    /// Copies waiting for a destination chat that was unreachable, in order.
    backlogs: Mutex<HashMap<(NetworkId, ChatRef), VecDeque<Waiting>>>,
    /// Most copies one chat's backlog holds.
    max_backlog: usize,
}

/// A copy in a backlog, and how its sender hears how it went.
struct Waiting {
    copy: Event,
    confirmer: Confirmer,
}

/// The first retry of a backlog comes after this long; later ones back off to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);
/// Copies one chat's backlog holds by default; past it a new message for that
/// chat is refused to its sender (the network has been unreachable for long).
pub const MAX_BACKLOG: usize = 10_000;

/// Builds a [`Router`].
pub struct RouterBuilder {
    networks: HashMap<NetworkId, Arc<dyn Network>>,
    portals: Portals,
    store: Store,
    max_backlog: usize,
}

impl RouterBuilder {
    /// Most copies one chat's backlog holds (default [`MAX_BACKLOG`]).
    pub fn max_backlog(mut self, copies: usize) -> Self {
        self.max_backlog = copies.max(1);
        self
    }

    /// Register a network (bridges and the XMPP side alike).
    pub fn network(mut self, network: Arc<dyn Network>) -> Self {
        self.networks.insert(network.id().clone(), network);
        self
    }

    /// The portal directory the router reads each event's destinations from (it
    /// may change while the router runs).
    pub fn portals(mut self, portals: Portals) -> Self {
        self.portals = portals;
        self
    }

    /// Build the router; starts the id map writer, so call it inside the runtime.
    pub fn build(self) -> Router {
        let outbox = Outbox::spawn(self.store.clone());
        let ids = IdMap::spawn_with(self.store.clone(), Some(outbox.clone()));
        Router {
            inner: Arc::new(Inner {
                networks: self.networks,
                portals: self.portals,
                store: self.store,
                ids,
                outbox,
                backlogs: Mutex::new(HashMap::new()),
                max_backlog: self.max_backlog,
            }),
        }
    }
}

impl Router {
    pub fn builder(store: Store) -> RouterBuilder {
        RouterBuilder { networks: HashMap::new(), portals: Portals::in_memory(), store, max_backlog: MAX_BACKLOG }
    }

    /// A registered network.
    pub fn network(&self, id: &NetworkId) -> Option<Arc<dyn Network>> {
        self.inner.networks.get(id).cloned()
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// The portal directory.
    pub fn portals(&self) -> &Portals {
        &self.inner.portals
    }

    /// The message id map (writes batched; lookups see every earlier write).
    pub fn ids(&self) -> &IdMap {
        &self.inner.ids
    }

    /// The networks an event must reach, each with the chat spelled as that network knows it.
    ///
    /// A personal chat keeps the remote network's spelling on the XMPP side too: the
    /// XMPP side derives the room or contact JID from it.
    pub fn destinations(&self, event: &Event) -> Vec<(NetworkId, ChatRef)> {
        if let Some(portal) = self.inner.portals.of(&event.chat) {
            // Every other chat of the portal, those on the origin's network included
            // (two IRC channels in one portal): never the chat it came from.
            return portal
                .chats()
                .into_iter()
                .filter(|c| c.network != event.chat.network || c.id != event.chat.id)
                .map(|c| (c.network.clone(), c))
                .collect();
        }
        if event.origin.is_xmpp() {
            vec![(event.chat.network.clone(), event.chat.clone())]
        } else {
            vec![(NetworkId::xmpp(), event.chat.clone())]
        }
    }

    /// Route one event to every destination and wait for each delivery.
    pub async fn route(&self, event: Event) -> RouteReport {
        let replayable = event.routed.is_some();
        self.route_traced(event, replayable).await
    }

    /// `replayable`: the origin sends the event again after a restart unless its ids
    /// are in the id map (it asked to hear when the event is safe), so its ids must
    /// be durable exactly when the event is.
    async fn route_traced(&self, event: Event, replayable: bool) -> RouteReport {
        let span = tracing::info_span!(
            "route",
            key = %event.key,
            origin = %event.origin,
            origin_ids = ?event.origin_ids,
            chat = %event.chat.id,
            kind = event.kind.name(),
        );
        self.route_inner(event, replayable).instrument(span).await
    }

    async fn route_inner(&self, mut event: Event, replayable: bool) -> RouteReport {
        event.clean_text();
        let origin_scope = scope(&event, &event.chat);
        // A correction belongs to the message it corrects: its ids join the original's
        // key, so a correction of a correction still reaches the original.
        if let EventKind::Correction { target, .. } = &event.kind {
            match self.inner.ids.key_for_remote(event.origin.as_str(), &origin_scope, &target.0).await {
                Ok(Some(key)) => event.key = MessageKey(key),
                Ok(None) => debug!(target = %target.0, "correction of a message unknown to the id map"),
                Err(e) => warn!(error = %e, "id map lookup failed"),
            }
        }
        let origin_ids = (event.kind.is_message_like() && !event.origin_ids.is_empty())
            .then(|| idmap::entry(&event.key.0, event.origin.as_str(), &origin_scope, &event.origin_ids));
        // A replaying origin's ids travel with the first stored copy (see `outbox`).
        let mut untied_ids = match origin_ids {
            Some(entry) if replayable => Some(entry),
            Some(entry) => {
                self.inner.ids.record_entry(entry);
                None
            }
            None => None,
        };
        let mut first_copy: Option<Receipt> = None;
        let mut report = RouteReport::default();
        let mut stored = Vec::new();
        for (dest, chat) in self.destinations(&event) {
            let Some(network) = self.inner.networks.get(&dest).cloned() else {
                report.deliveries.push((dest.clone(), Err(DeliveryError::UnknownNetwork(dest.to_string()))));
                continue;
            };
            let mut copy = event.clone();
            copy.chat = chat;
            self.translate_refs(&mut copy, &event.origin, &origin_scope, &dest).await;
            if copy.kind.is_message_like() {
                match serde_json::to_string(&copy) {
                    Ok(json) => {
                        let outbox = &self.inner.outbox;
                        let receipt = match (&first_copy, untied_ids.take()) {
                            (Some(first), _) => outbox.insert_after(dest.as_str(), json, first),
                            (None, Some(ids)) => outbox.insert_with_ids(dest.as_str(), json, vec![ids]),
                            (None, None) => outbox.insert(dest.as_str(), json),
                        };
                        if replayable && first_copy.is_none() {
                            first_copy = Some(receipt.clone());
                        }
                        stored.push(receipt.clone());
                        copy.receipt = Some(receipt);
                    }
                    Err(e) => warn!(error = %e, "event cannot be stored in the outbox; delivered without it"),
                }
            }
            let result = self.deliver_or_keep(network, copy).await;
            report.deliveries.push((dest, result));
        }
        if let Some(entry) = untied_ids {
            // Nothing was stored to carry them.
            self.inner.ids.record_entry(entry);
        }
        report.persisted = Receipt::gate_for(&stored);
        report
    }

    fn backlogs(&self) -> std::sync::MutexGuard<'_, HashMap<(NetworkId, ChatRef), VecDeque<Waiting>>> {
        self.inner.backlogs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Deliver one copy; a message-like copy kept in the outbox that the destination
    /// cannot take now (or that would overtake copies still waiting for the same
    /// chat) goes into the chat's backlog, and is confirmed once delivered from there.
    async fn deliver_or_keep(&self, network: Arc<dyn Network>, copy: Event) -> Result<Delivered, DeliveryError> {
        let keepable = copy.kind.is_message_like() && copy.receipt.is_some();
        if !keepable {
            return self.deliver_copy(network.as_ref(), copy).await;
        }
        let key = (network.id().clone(), copy.chat.clone());
        if let Some(queue) = self.backlogs().get_mut(&key) {
            if queue.len() >= self.inner.max_backlog {
                return Err(DeliveryError::Rejected(format!(
                    "{} messages are already waiting for this chat, whose network is unreachable: try again later",
                    queue.len()
                )));
            }
            let (confirmer, confirmation) = Confirmation::channel();
            queue.push_back(Waiting { copy, confirmer });
            debug!(network = %key.0, waiting = queue.len(), "queued behind copies waiting for the same chat");
            return Ok(Delivered::later(confirmation));
        }
        let kept = copy.clone();
        match self.deliver_copy(network.as_ref(), copy).await {
            Err(e) if e.is_temporary() => {
                let (confirmer, confirmation) = Confirmation::channel();
                let mut backlogs = self.backlogs();
                let fresh = !backlogs.contains_key(&key);
                backlogs.entry(key.clone()).or_default().push_back(Waiting { copy: kept, confirmer });
                drop(backlogs);
                if fresh {
                    info!(network = %key.0, error = %e, "destination unreachable; the message is kept and retried");
                    let router = self.clone();
                    tokio::spawn(async move { router.drain_backlog(network, key).await }.in_current_span());
                }
                Ok(Delivered::later(confirmation))
            }
            other => other,
        }
    }

    /// Deliver a chat's backlog in order, backing off while the destination is
    /// unreachable; done when the backlog is empty.
    async fn drain_backlog(&self, network: Arc<dyn Network>, key: (NetworkId, ChatRef)) {
        let mut wait = RETRY_FIRST;
        loop {
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
            let front = {
                let mut backlogs = self.backlogs();
                match backlogs.get(&key).and_then(|q| q.front()) {
                    Some(w) => w.copy.clone(),
                    None => {
                        backlogs.remove(&key);
                        return;
                    }
                }
            };
            let result = self.deliver_copy(network.as_ref(), front).await;
            if matches!(&result, Err(e) if e.is_temporary()) {
                wait = if wait.is_zero() { RETRY_FIRST } else { (wait * 2).min(RETRY_MAX) };
                debug!(network = %key.0, retry_in = ?wait, "destination still unreachable");
                continue;
            }
            let Some(done) = self.backlogs().get_mut(&key).and_then(VecDeque::pop_front) else { return };
            wait = Duration::ZERO;
            match result {
                Ok(mut delivered) => match delivered.confirmation.take() {
                    Some(later) => {
                        tokio::spawn(async move {
                            match later.wait().await {
                                Ok(ids) => done.confirmer.confirm(ids),
                                Err(e) => done.confirmer.refuse(e),
                            }
                        });
                    }
                    None => done.confirmer.confirm(delivered.remote_ids),
                },
                Err(e) => done.confirmer.refuse(e),
            }
            info!(network = %key.0, "a kept message left the backlog");
        }
    }

    /// Hand one copy to its destination and record the ids it got there. A copy the
    /// destination acknowledges later leaves the outbox once it did, before the
    /// acknowledgement goes on (to whatever tells the sender).
    async fn deliver_copy(&self, network: &dyn Network, copy: Event) -> Result<Delivered, DeliveryError> {
        let dest = network.id().clone();
        let dest_scope = scope(&copy, &copy.chat);
        let (key, message_like) = (copy.key.0.clone(), copy.kind.is_message_like());
        let receipt = copy.receipt.clone();
        let mut result = network.deliver(copy).await;
        // Confirmed later: the ids go into the map when the confirmation comes, and
        // the caller's confirmation resolves after that.
        if let Some(later) = result.as_mut().ok().and_then(|d| d.confirmation.take()) {
            let (confirmer, confirmation) = Confirmation::channel();
            let ids = self.inner.ids.clone();
            tokio::spawn(async move {
                match later.wait().await {
                    Ok(remote_ids) => {
                        if let Some(r) = receipt {
                            r.delivered().await;
                        }
                        if message_like && !remote_ids.is_empty() {
                            ids.record(&key, dest.as_str(), &dest_scope, &remote_ids);
                            debug!(network = %dest, remote_ids = ?remote_ids, "confirmed");
                        }
                        confirmer.confirm(remote_ids);
                    }
                    Err(e) => {
                        warn!(network = %dest, error = %e, "delivery refused after all");
                        confirmer.refuse(e);
                    }
                }
            });
            if let Ok(d) = result.as_mut() {
                d.confirmation = Some(confirmation);
            }
            return result;
        }
        match &result {
            Ok(d) if message_like && !d.remote_ids.is_empty() => {
                self.inner.ids.record(&key, dest.as_str(), &dest_scope, &d.remote_ids);
                debug!(network = %dest, remote_ids = ?d.remote_ids, "delivered");
            }
            Ok(_) => debug!(network = %dest, "delivered"),
            Err(e) => warn!(network = %dest, error = %e, "delivery failed"),
        }
        result
    }

    /// Deliver what an earlier run accepted and had not yet written out (it crashed or
    /// was killed), in the order it was accepted. Call once at start, after the
    /// networks have restored their sessions and before [`Router::run`] and the
    /// XMPP links start, so nothing new overtakes it.
    /// Returns how many events were delivered again.
    pub async fn replay(&self) -> usize {
        let rows = match self.inner.store.outbox_pending().await {
            Ok(rows) => rows,
            Err(e) => {
                warn!(error = %e, "cannot read the outbox; events accepted before the restart are not replayed now");
                return 0;
            }
        };
        if !rows.is_empty() {
            info!(events = rows.len(), "replaying events accepted before the restart");
        }
        let mut delivered = 0;
        for row in rows {
            let receipt = self.inner.outbox.existing(row.seq);
            let mut event: Event = match serde_json::from_str(&row.event) {
                Ok(e) => e,
                Err(e) => {
                    warn!(seq = row.seq, error = %e, "unreadable outbox entry dropped");
                    continue;
                }
            };
            let dest = NetworkId::new(row.destination);
            let origin = self.inner.networks.get(&event.origin).cloned();
            let span = tracing::info_span!("replay", key = %event.key, network = %dest, kind = event.kind.name());
            let again_is_safe = self.inner.networks.get(&dest).is_some_and(|n| n.redelivery_shows_once());
            if row.written_us > 0 && !again_is_safe {
                // Being written when the gateway stopped: it may have arrived, so it is
                // not sent again; its sender hears that it may not have.
                warn!(parent: &span, "an event was being written when the gateway stopped; its sender is told");
                if let Some(origin) = origin {
                    let why = DeliveryError::Unavailable(format!(
                        "the gateway restarted before {dest} confirmed this message: it may not have arrived"
                    ));
                    origin.replayed(&event, &dest, Err(why)).instrument(span).await;
                }
                continue;
            }
            event.receipt = Some(receipt);
            let Some(network) = self.inner.networks.get(&dest).cloned() else {
                warn!(seq = row.seq, network = %dest, "outbox entry for a network no longer configured dropped");
                continue;
            };
            let told = event.clone();
            // Handing over is enough: a destination keeps what it holds across its own
            // reconnects. What it refuses now (the account left the room) it would refuse later too.
            let outcome = match self.deliver_or_keep(network, event).instrument(span.clone()).await {
                Ok(mut d) => {
                    delivered += 1;
                    d.confirmation.take()
                }
                Err(e) => {
                    warn!(parent: &span, error = %e, "an event accepted before the restart could not be delivered");
                    if let Some(origin) = &origin {
                        origin.replayed(&told, &dest, Err(e)).instrument(span.clone()).await;
                    }
                    continue;
                }
            };
            // The origin tells the sender once it arrived.
            if let Some(origin) = origin {
                tokio::spawn(
                    async move {
                        let result = match outcome {
                            Some(later) => later.wait().await.map(|_| ()),
                            None => Ok(()),
                        };
                        origin.replayed(&told, &dest, result).await;
                    }
                    .instrument(span),
                );
            }
        }
        delivered
    }

    /// Rewrite message references from the origin's ids to the destination's.
    async fn translate_refs(&self, event: &mut Event, origin: &NetworkId, origin_scope: &str, dest: &NetworkId) {
        let mut refs: Vec<&mut MessageRef> = Vec::new();
        match &mut event.kind {
            EventKind::Message(m) => {
                if let Some(r) = m.reply_to.as_mut() {
                    refs.push(&mut r.target);
                }
                if let Some(t) = m.thread.as_mut() {
                    refs.push(t);
                }
            }
            EventKind::Correction { target, message } => {
                refs.push(target);
                if let Some(r) = message.reply_to.as_mut() {
                    refs.push(&mut r.target);
                }
            }
            EventKind::Retraction { target, .. }
            | EventKind::Reactions { target, .. }
            | EventKind::Displayed { target } => refs.push(target),
            _ => {}
        }
        for r in refs {
            match self.inner.ids.key_for_remote(origin.as_str(), origin_scope, &r.0).await {
                Ok(Some(key)) => match self.inner.ids.remote_ids_for(&key, dest.as_str()).await {
                    Ok(ids) if !ids.is_empty() => r.0 = ids[0].clone(),
                    Ok(_) => debug!(target = %r.0, "reference has no id on the destination"),
                    Err(e) => warn!(error = %e, "id map lookup failed"),
                },
                Ok(None) => debug!(target = %r.0, "reference unknown to the id map"),
                Err(e) => warn!(error = %e, "id map lookup failed"),
            }
        }
    }

    /// Drain a bridge's event stream, routing each event in order.
    pub async fn run(self, mut events: EventStream) {
        while let Some(mut event) = events.recv().await {
            let routed = event.routed.take();
            let report = self.route_traced(event, routed.is_some()).await;
            if let Some(signal) = routed {
                // Safe once every copy is stored (or delivered) and the ids are written;
                // waited for aside, so routing goes on meanwhile.
                let ids = self.inner.ids.clone();
                tokio::spawn(async move {
                    if let Some(gate) = report.persisted {
                        gate.confirm().await;
                    }
                    ids.flush().await;
                    signal.fire();
                });
            }
        }
    }
}

/// The id-map scope of a chat as seen by one account: personal chats of different
/// users on the same network are different conversations.
pub fn id_scope(account: Option<&jid::BareJid>, chat: &ChatRef) -> String {
    match account {
        Some(account) => format!("{account}/{}", chat.scope()),
        None => chat.scope(),
    }
}

fn scope(event: &Event, chat: &ChatRef) -> String {
    id_scope(event.account.as_ref(), chat)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::model::{ChatKind, Message, Sender};
    use crate::network::{Capabilities, EventSink};
    use crate::store::OutboxRow;

    /// A destination unreachable for its first `down` deliveries; writes at once
    /// (confirming the copy's receipt), and records what it got and, with a
    /// `store`, whether the origin's ids were durable at the moment of the write.
    struct Fake {
        id: NetworkId,
        down: AtomicUsize,
        got: Mutex<Vec<String>>,
        store: Option<Store>,
        origin_known_at_write: Mutex<Vec<bool>>,
        /// What this network was told of its events after a restart: (body, delivered).
        told: Mutex<Vec<(String, bool)>>,
    }

    impl Fake {
        fn new(id: &str, down: usize, store: Option<Store>) -> Arc<Fake> {
            Arc::new(Fake {
                id: NetworkId::new(id),
                down: AtomicUsize::new(down),
                got: Mutex::default(),
                store,
                origin_known_at_write: Mutex::default(),
                told: Mutex::default(),
            })
        }
    }

    #[async_trait::async_trait]
    impl Network for Fake {
        fn id(&self) -> &NetworkId {
            &self.id
        }
        fn capabilities(&self) -> Capabilities {
            Capabilities::all()
        }
        fn chat_kind(&self, _id: &str) -> Option<ChatKind> {
            Some(ChatKind::Room)
        }
        async fn deliver(&self, event: Event) -> Result<Delivered, DeliveryError> {
            if self.down.load(Ordering::SeqCst) > 0 {
                self.down.fetch_sub(1, Ordering::SeqCst);
                return Err(DeliveryError::Unavailable("down for now".into()));
            }
            if let Some(r) = &event.receipt {
                r.confirm().await;
            }
            if let (Some(store), Some(origin_id)) = (&self.store, event.origin_ids.first()) {
                let known = store.key_for_remote("xmpp", &scope(&event, &event.chat), origin_id).await.expect("lookup");
                self.origin_known_at_write.lock().unwrap_or_else(|p| p.into_inner()).push(known.is_some());
            }
            if let EventKind::Message(m) = &event.kind {
                self.got.lock().unwrap_or_else(|p| p.into_inner()).push(m.body.clone());
            }
            Ok(Delivered::ids(vec![format!("remote-{}", event.key)]))
        }
        async fn replayed(&self, event: &Event, _destination: &NetworkId, outcome: Result<(), DeliveryError>) {
            if let EventKind::Message(m) = &event.kind {
                self.told.lock().unwrap_or_else(|p| p.into_inner()).push((m.body.clone(), outcome.is_ok()));
            }
        }
    }

    async fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::connect(&format!("sqlite://{}/r.db", dir.path().display()), 2).await.expect("store");
        store.migrate().await.expect("migrate");
        (dir, store)
    }

    fn message(to: &NetworkId, body: &str) -> Event {
        let account = jid::BareJid::new("alice@example.org").expect("a valid JID");
        let chat = ChatRef::room(to.clone(), "#room");
        Event::new(NetworkId::xmpp(), chat, Sender::new("alice", "alice"), EventKind::Message(Message::text(body)))
            .with_account(account)
    }

    #[tokio::test]
    async fn a_temporarily_unreachable_destination_gets_everything_once_in_order() {
        let (_dir, store) = store().await;
        let flaky = Fake::new("flaky", 2, None);
        let router = Router::builder(store).network(flaky.clone()).build();
        let mut confirmations = Vec::new();
        for i in 0..3 {
            let mut report = router.route(message(&flaky.id, &format!("m{i}"))).await;
            let (_, result) = report.deliveries.pop().expect("one destination");
            let delivered = result.expect("kept, not refused");
            confirmations.push(delivered.confirmation.expect("confirmed once delivered from the backlog"));
        }
        for c in confirmations {
            let ids = c.wait().await.expect("delivered in the end");
            assert_eq!(ids.len(), 1);
        }
        assert_eq!(*flaky.got.lock().unwrap_or_else(|p| p.into_inner()), ["m0", "m1", "m2"]);
        // The backlog is gone: the next message is delivered at once.
        let mut report = router.route(message(&flaky.id, "m3")).await;
        let (_, result) = report.deliveries.pop().expect("one destination");
        assert!(result.expect("delivered").confirmation.is_none());
        assert_eq!(flaky.got.lock().unwrap_or_else(|p| p.into_inner()).len(), 4);
    }

    #[tokio::test]
    async fn a_full_backlog_refuses_the_next_message_with_the_reason() {
        let (_dir, store) = store().await;
        let down = Fake::new("down", 1000, None);
        let router = Router::builder(store).max_backlog(3).network(down.clone()).build();
        let mut results = Vec::new();
        for i in 0..5 {
            let mut report = router.route(message(&down.id, &format!("m{i}"))).await;
            results.push(report.deliveries.pop().expect("one destination").1);
        }
        assert!(results[..3].iter().all(|r| r.as_ref().is_ok_and(|d| d.confirmation.is_some())), "three kept");
        for r in &results[3..] {
            match r {
                Err(DeliveryError::Rejected(text)) => {
                    assert!(text.contains("3 messages are already waiting"), "{text}")
                }
                other => panic!("refused with the reason, not {other:?}"),
            }
        }
    }

    /// After a crash, a copy still waiting is delivered and its origin told so; a
    /// copy that was being written (it may have arrived) is not sent again, and its
    /// origin is told it may not have arrived.
    #[tokio::test]
    async fn a_restart_sends_what_waited_and_reports_what_was_being_written() {
        let (_dir, store) = store().await;
        let writer = Fake::new("w", 0, None);
        let origin = Fake::new("xmpp", 0, None);
        let row = |seq: i64, body: &str, written_us: i64| OutboxRow {
            seq,
            destination: "w".into(),
            event: serde_json::to_string(&message(&writer.id, body)).expect("json"),
            created_us: 1,
            written_us,
        };
        let rows = [row(1, "waiting", 0), row(2, "being written", 7), row(3, "also waiting", 0)];
        store.outbox_apply(&rows, &[], 0, &[], &[]).await.expect("stored by the earlier run");
        let router = Router::builder(store.clone()).network(writer.clone()).network(origin.clone()).build();
        assert_eq!(router.replay().await, 2);
        assert_eq!(*writer.got.lock().unwrap_or_else(|p| p.into_inner()), ["waiting", "also waiting"]);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while origin.told.lock().unwrap_or_else(|p| p.into_inner()).len() < 3 && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut told = origin.told.lock().unwrap_or_else(|p| p.into_inner()).clone();
        told.sort();
        let expected = [("also waiting", true), ("being written", false), ("waiting", true)];
        assert_eq!(told, expected.map(|(b, ok)| (b.to_owned(), ok)));
        router.inner.outbox.settled().await;
        assert!(store.outbox_pending().await.expect("pending").is_empty(), "every row is settled");
    }

    /// An origin that sends again after a restart what the id map does not have
    /// (it asked for the routed signal): nothing of its reaches a destination
    /// before its ids are durable, so a crash right after the write cannot make it
    /// come twice.
    #[tokio::test]
    async fn a_replaying_origins_ids_are_durable_before_the_write() {
        let (_dir, store) = store().await;
        let writer = Fake::new("w", 0, Some(store.clone()));
        let router = Router::builder(store).network(writer.clone()).build();
        let (sink, stream) = EventSink::channel(64);
        let running = tokio::spawn(router.clone().run(stream));
        let mut signals = Vec::new();
        for i in 0..50 {
            let event = message(&writer.id, &format!("m{i}")).with_origin_id(format!("origin-{i}"));
            signals.push(sink.emit_routed(event).await.expect("router running"));
        }
        for s in signals {
            assert!(s.wait().await, "routed");
        }
        let seen = writer.origin_known_at_write.lock().unwrap_or_else(|p| p.into_inner()).clone();
        assert_eq!(seen.len(), 50);
        assert!(seen.iter().all(|&k| k), "written before its origin ids were stored: {seen:?}");
        running.abort();
    }
}
