//! Delivery that loses nothing: fault tests that print their counts.
//!
//! 1,000 messages flow each way between an XMPP client (through Prosody) and an
//! IRC client (on ngIRCd) while something fails in the middle: the gateway is
//! killed with `kill -9` and restarted, the IRC server restarts, or PostgreSQL
//! (the gateway's store) stops and starts again. For `kill -9`:
//!
//! - XMPP → IRC: a message is accepted when the sender got its MUC reflection,
//!   which comes once the IRC server confirmed it. Every accepted message
//!   reaches IRC exactly once, in order. A message stored and not yet written at
//!   the kill is sent after the restart and then reflected. A message being
//!   written at the kill (the IRC server may have handled it) is never sent
//!   twice, and its sender gets an error saying it may not have arrived. A
//!   message the sender was told failed (the XMPP server bounces it while the
//!   gateway is down) never arrives; one in limbo at the kill (sent, neither
//!   reflected nor bounced nor stored) arrives at most once.
//! - IRC → XMPP: a message is accepted when the gateway stored it in its
//!   outbox. Every message stored when the gateway died, and every message sent
//!   after it rejoined the channel, reaches the XMPP client exactly once, in
//!   order. IRC has no acknowledgements: lines on the wire at the kill and lines
//!   sent while the gateway was away are counted, and the lines lost at the kill
//!   must be one unbroken run right before it (nothing already stored is lost).
//!   A message stays stored until Prosody acknowledged it; one written and not
//!   yet acknowledged at the kill is written again after the restart, with the
//!   same stanza-id, so the XMPP client shows it once (the test counts it once
//!   and prints how many came again).
//!
//! A PostgreSQL restart loses, duplicates and reorders nothing: delivery waits
//! for the database. An IRC server restart keeps everything the gateway
//! accepted: what was queued is sent after the reconnect, and what was written
//! and not yet confirmed when the connection dropped is reported to its sender
//! as possibly not arrived, never sent twice.
//! A Prosody restart cuts the XMPP client off too, and Prosody forgets what it
//! was about to deliver: the client logs in again and rejoins asking for
//! history, and every IRC message is then either received live or in that
//! history; every XMPP message the gateway accepted reaches IRC once.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use anyhow::{Result, bail, ensure};
use isthmus_core::store::Store;
use isthmus_tests::scenario::{IrcSetup, T, room};
use isthmus_tests::xmpp::Stanza;
use isthmus_tests::{IrcClient, IrcServerKind, Postgres, XmppClient, XmppServer, XmppServerKind};

const N: usize = 1000;
/// Messages are sent in bursts, so the gateway has a backlog when it is killed.
const BURST: usize = 10;
/// The fault comes right after the burst ending with this message.
const FAULT_AT: usize = 309;
/// Recovery (restart) comes right after the burst ending with this message.
const RECOVER_AT: usize = 409;

fn number(text: &str, prefix: &str) -> Option<usize> {
    text.strip_prefix(prefix)?.trim().parse().ok()
}

#[derive(Default)]
struct Tally {
    /// XMPP → IRC: reflected to the sender.
    accepted: BTreeSet<usize>,
    /// XMPP → IRC: bounced with an error.
    refused: BTreeSet<usize>,
    /// XMPP → IRC: reported with an error because it was being written when the
    /// gateway or the IRC connection went down (it may have arrived).
    in_doubt: BTreeSet<usize>,
    /// XMPP → IRC: what the IRC client received, in arrival order.
    x2i: Vec<usize>,
    /// IRC → XMPP: what the XMPP client received live, in arrival order (a message
    /// received again with the same stanza-id counts once, as XMPP clients show it).
    i2x: Vec<usize>,
    /// IRC → XMPP: the stanza-ids received live.
    i2x_ids: std::collections::HashSet<String>,
    /// IRC → XMPP: messages received again with a stanza-id already seen.
    i2x_again: usize,
    /// IRC → XMPP: what the XMPP client got as room history (delayed) on a rejoin.
    i2x_history: BTreeSet<usize>,
    /// The step at which the IRC client saw the gateway's user join again.
    rejoined_at: Option<usize>,
    /// The step at which the IRC client saw the gateway's user leave the channel.
    parted_at: Option<usize>,
}

impl Tally {
    fn absorb_xmpp(&mut self, stanzas: Vec<Stanza>, room: &str) {
        for s in stanzas.into_iter().filter(|s| s.kind == "message") {
            if s.type_ == "error" {
                if let Some(n) = s.id.strip_prefix("x2i-").and_then(|n| n.parse().ok()) {
                    if s.xml.contains("it may not have arrived") {
                        self.in_doubt.insert(n);
                    } else {
                        self.refused.insert(n);
                    }
                }
                continue;
            }
            let (true, Some(body)) = (s.type_ == "groupchat", s.body.as_deref()) else { continue };
            if s.from.starts_with(&format!("{room}/alice")) {
                if let Some(n) = number(body, "x2i ").filter(|n| s.id == format!("x2i-{n}")) {
                    self.accepted.insert(n);
                }
            } else if s.from == format!("{room}/peer")
                && let Some(n) = number(body, "i2x ")
            {
                if s.xml.contains("urn:xmpp:delay") {
                    self.i2x_history.insert(n);
                } else if s.stanza_id().is_some_and(|id| !self.i2x_ids.insert(id)) {
                    self.i2x_again += 1;
                } else {
                    self.i2x.push(n);
                }
            }
        }
    }

    fn absorb_irc(&mut self, lines: Vec<String>, step: usize, after_kill: bool) {
        for l in lines {
            if let Some((_, text)) = l.split_once(" PRIVMSG #faults :") {
                if let Some(n) = number(text, "x2i ") {
                    self.x2i.push(n);
                }
            } else if after_kill && self.rejoined_at.is_none() && l.starts_with(":alice") && l.contains(" JOIN ") {
                self.rejoined_at = Some(step);
            } else if self.parted_at.is_none() && l.starts_with(":alice") && l.contains(" PART ") {
                self.parted_at = Some(step);
            }
        }
    }
}

/// Message numbers that arrived more than once, and whether arrival order is increasing.
fn duplicates_and_order(arrived: &[usize]) -> (usize, bool) {
    let unique: BTreeSet<usize> = arrived.iter().copied().collect();
    let in_order = arrived.windows(2).all(|w| w[0] < w[1]);
    (arrived.len() - unique.len(), in_order)
}

/// What the killed gateway's outbox held.
#[derive(Default)]
struct Stored {
    /// XMPP → IRC, not yet written.
    x2i: BTreeSet<usize>,
    /// XMPP → IRC, written and not yet acknowledged by the IRC server.
    x2i_written: BTreeSet<usize>,
    /// IRC → XMPP, not yet written or not yet acknowledged by Prosody.
    i2x: BTreeSet<usize>,
}

async fn stored_at(dir: &Path) -> Result<Stored> {
    let store = Store::connect(&format!("sqlite://{}/isthmus.db", dir.display()), 1).await?;
    let mut stored = Stored::default();
    for r in store.outbox_pending().await? {
        let event: serde_json::Value = serde_json::from_str(&r.event)?;
        let body = event["kind"]["Message"]["body"].as_str().unwrap_or_default();
        if let Some(n) = number(body, "x2i ") {
            if r.written_us > 0 {
                stored.x2i_written.insert(n);
            } else {
                stored.x2i.insert(n);
            }
        } else if let Some(n) = number(body, "i2x ") {
            stored.i2x.insert(n);
        }
    }
    Ok(stored)
}

/// Whether the numbers are one unbroken run.
fn is_run(numbers: &[usize]) -> bool {
    numbers.windows(2).all(|w| w[1] == w[0] + 1)
}

/// The IRC client `peer` in `#faults`.
async fn peer_in_channel(s: &IrcSetup) -> Result<IrcClient> {
    let mut peer = IrcClient::connect(s.irc.port(), "peer").await?;
    peer.join("#faults").await?;
    Ok(peer)
}

/// `peer` in `#faults`, and alice (device `phone`) in its room, seen from IRC:
/// (the room JID, peer, alice).
async fn in_the_room(s: &IrcSetup) -> Result<(String, IrcClient, XmppClient)> {
    let room = room("#faults");
    let mut peer = peer_in_channel(s).await?;
    let alice = s.join("alice", "phone", &room, "alice").await?;
    peer.expect_line(T, |l| l.starts_with(":alice") && l.contains(" JOIN ")).await?;
    Ok((room, peer, alice))
}

/// What goes wrong in the middle of the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// `kill -9` of the gateway, restarted 100 messages later.
    KillGateway,
    /// The IRC server restarted (every IRC client is cut off, the test's own too).
    RestartIrcServer,
    /// PostgreSQL, the gateway's store, stopped and started 100 messages later.
    RestartPostgres,
    /// Prosody restarted: the gateway's link and the XMPP client are cut off; the
    /// client logs in again and rejoins asking for history, as clients do.
    RestartProsody,
}

/// Everything one run saw.
struct Run {
    tally: Tally,
    stored: Stored,
    log: String,
}

/// Stream 1,000 messages each way in bursts and inject `fault` in the middle.
async fn stream_through(fault: Fault) -> Result<Run> {
    let mut postgres = None;
    let mut s = if fault == Fault::RestartPostgres {
        let pg = Postgres::start().await?;
        let setup = IrcSetup::start_with_store(XmppServerKind::Prosody, IrcServerKind::Ngircd, "", &pg.url()).await?;
        postgres = Some(pg);
        setup
    } else {
        IrcSetup::start("").await?
    };
    let (room, mut peer, mut alice) = in_the_room(&s).await?;

    let mut tally = Tally::default();
    let mut stored = Stored::default();
    let quick = Duration::from_millis(2);
    for first in (0..N).step_by(BURST) {
        let last = first + BURST - 1;
        for i in first..=last {
            alice.send_groupchat_with_id(&room, &format!("x2i {i}"), &format!("x2i-{i}")).await?;
            peer.privmsg("#faults", &format!("i2x {i}")).await?;
        }
        if last == FAULT_AT {
            // Mid-stream: the burst just sent is still on its way through.
            match fault {
                Fault::KillGateway => {
                    s.gateway.kill().await;
                    stored = stored_at(s.gateway.dir()).await?;
                }
                Fault::RestartIrcServer => {
                    s.irc.restart().await?;
                    // The test's IRC client was cut off too: what it read before counts.
                    let lines = peer.drain(quick).await?;
                    tally.absorb_irc(lines, last, true);
                    peer = peer_in_channel(&s).await?;
                }
                Fault::RestartPostgres => {
                    if let Some(pg) = postgres.as_mut() {
                        pg.stop_fast().await;
                    }
                }
                Fault::RestartProsody => {
                    s.prosody.restart().await?;
                    // The XMPP client was cut off too: what it read before counts.
                    tally.absorb_xmpp(alice.drain(quick).await?, &room);
                    s.gateway.wait_log("component link established", 2, T).await?;
                    let mut again = XmppClient::connect(&s.prosody, "alice@localhost/phone", "alicepass").await?;
                    again.join_with_history(&room, "alice", N as u32).await?;
                    again.expect(T, |st| st.kind == "presence" && st.has_status(110)).await?;
                    alice = again;
                }
            }
        }
        tally.absorb_xmpp(alice.drain(quick).await?, &room);
        let lines = peer.drain(quick).await?;
        tally.absorb_irc(lines, last, last >= FAULT_AT);
        if last == RECOVER_AT {
            match fault {
                Fault::KillGateway => s.gateway.restart().await?,
                Fault::RestartProsody => {}
                Fault::RestartIrcServer => {
                    // Go on only once the gateway is back in the channel, so what is
                    // sent afterwards proves the rejoin works.
                    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
                    while tally.rejoined_at.is_none() && tokio::time::Instant::now() < deadline {
                        tally.absorb_xmpp(alice.drain(quick).await?, &room);
                        let lines = peer.drain(Duration::from_millis(100)).await?;
                        tally.absorb_irc(lines, last, true);
                    }
                }
                Fault::RestartPostgres => {
                    if let Some(pg) = postgres.as_mut() {
                        pg.restart().await?;
                    }
                }
            }
        }
    }
    // Let everything in flight arrive: until all accepted messages are in and it is
    // quiet, or nothing at all has come for 10 s.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    let mut quiet_rounds = 0;
    loop {
        let stanzas = alice.drain(Duration::from_millis(500)).await?;
        let lines = peer.drain(Duration::from_millis(500)).await?;
        let quiet = stanzas.is_empty() && lines.is_empty();
        quiet_rounds = if quiet { quiet_rounds + 1 } else { 0 };
        tally.absorb_xmpp(stanzas, &room);
        tally.absorb_irc(lines, N, true);
        // Accepted, or stored at the kill (replayed, then acknowledged to the sender).
        let all_in = tally.accepted.iter().chain(&stored.x2i).all(|n| tally.x2i.contains(n))
            && stored.x2i.iter().all(|n| tally.accepted.contains(n));
        if (quiet && all_in) || quiet_rounds >= 10 || tokio::time::Instant::now() >= deadline {
            break;
        }
    }
    Ok(Run { tally, stored, log: s.gateway.log() })
}

#[tokio::test]
async fn kill_9_mid_stream_loses_and_duplicates_nothing_accepted() -> Result<()> {
    let Run { tally, stored, log } = stream_through(Fault::KillGateway).await?;
    let (stored_x2i, stored_i2x) = (&stored.x2i, &stored.i2x);
    // XMPP → IRC.
    let x2i: BTreeSet<usize> = tally.x2i.iter().copied().collect();
    let (x2i_dups, x2i_ordered) = duplicates_and_order(&tally.x2i);
    let lost: Vec<usize> = tally.accepted.difference(&x2i).copied().collect();
    let refused_arrived: Vec<usize> = tally.refused.intersection(&x2i).copied().collect();
    let limbo: BTreeSet<usize> = (0..N)
        .filter(|n| !tally.accepted.contains(n) && !tally.refused.contains(n) && !tally.in_doubt.contains(n))
        .collect();
    let limbo_arrived = limbo.intersection(&x2i).count();
    let stored_x2i_lost = stored_x2i.difference(&x2i).count();
    let stored_unacknowledged: Vec<usize> = stored_x2i.difference(&tally.accepted).copied().collect();
    let written_untold: Vec<usize> = stored.x2i_written.difference(&tally.in_doubt).copied().collect();
    println!(
        "kill -9, XMPP→IRC: sent {N}, accepted {}, refused with an error while the gateway was down {}, \
         stored at the kill and not yet written {} (arrived {}, acknowledged after the restart {}), \
         written at the kill and not yet acknowledged by the IRC server {} (reported to the sender as possibly \
         not arrived {}, of them arrived {}), in limbo at the kill {} ({} of them arrived); \
         arrived {}, accepted and lost {}, duplicated {}, in order: {}",
        tally.accepted.len(),
        tally.refused.len(),
        stored_x2i.len(),
        stored_x2i.len() - stored_x2i_lost,
        stored_x2i.len() - stored_unacknowledged.len(),
        stored.x2i_written.len(),
        tally.in_doubt.len(),
        tally.in_doubt.intersection(&x2i).count(),
        limbo.len(),
        limbo_arrived,
        x2i.len(),
        lost.len(),
        x2i_dups,
        x2i_ordered
    );

    // IRC → XMPP.
    let i2x: BTreeSet<usize> = tally.i2x.iter().copied().collect();
    let (i2x_dups, i2x_ordered) = duplicates_and_order(&tally.i2x);
    let rejoined_at = tally.rejoined_at;
    let missing: Vec<usize> = (0..N).filter(|n| !i2x.contains(n)).collect();
    let at_kill: Vec<usize> = missing.iter().copied().filter(|&n| n <= FAULT_AT).collect();
    // Before what was stored: left the outbox, so Prosody had acknowledged it; none
    // may be missing. After it: not yet stored (unread on the wire, or read and not
    // yet committed). (With nothing stored, the two cannot be told apart: all count
    // as not yet stored.)
    let first_stored = stored_i2x.first().copied().unwrap_or(0);
    let (reset, unread): (Vec<usize>, Vec<usize>) = at_kill.iter().partition(|&&n| n < first_stored);
    let while_away = missing.iter().filter(|&&n| n > FAULT_AT && Some(n) <= rejoined_at).count();
    let after_rejoin: Vec<usize> = missing.iter().copied().filter(|&n| rejoined_at.is_none_or(|r| n > r)).collect();
    let stored_lost: Vec<usize> = stored_i2x.difference(&i2x).copied().collect();
    println!(
        "kill -9, IRC→XMPP: sent {N}, arrived {}, stored by the gateway at the kill {} (lost {}), \
         acknowledged by Prosody before the kill and lost {}, \
         not yet stored at the kill {}, sent while the gateway was away {} (rejoined at message {}), \
         lost after the rejoin {}, received again with the same stanza-id (shown once) {}, \
         duplicated {}, in order: {}",
        i2x.len(),
        stored_i2x.len(),
        stored_lost.len(),
        reset.len(),
        unread.len(),
        while_away,
        rejoined_at.map_or("never".to_owned(), |r| r.to_string()),
        after_rejoin.len(),
        tally.i2x_again,
        i2x_dups,
        i2x_ordered
    );
    ensure!(log.contains("rejoining room after restart"), "the restarted gateway did not rejoin the room");

    ensure!(tally.accepted.len() > FAULT_AT / 2, "too few messages were accepted before the kill to prove anything");
    ensure!(lost.is_empty(), "accepted XMPP messages never reached IRC: {lost:?}");
    ensure!(stored_x2i_lost == 0, "XMPP messages stored by the gateway never reached IRC");
    ensure!(
        stored_unacknowledged.is_empty(),
        "XMPP messages stored at the kill and delivered after the restart were never acknowledged to the sender: \
         {stored_unacknowledged:?}"
    );
    ensure!(
        written_untold.is_empty(),
        "XMPP messages being written at the kill were not reported to the sender: {written_untold:?}"
    );
    ensure!(refused_arrived.is_empty(), "messages bounced to the sender still reached IRC: {refused_arrived:?}");
    ensure!(x2i_dups == 0 && x2i_ordered, "XMPP→IRC: duplicated or out of order: {:?}", tally.x2i);
    ensure!(rejoined_at.is_some(), "the gateway never rejoined the IRC channel after the restart");
    ensure!(stored_lost.is_empty(), "IRC messages stored by the gateway were lost: {stored_lost:?}");
    ensure!(after_rejoin.is_empty(), "IRC messages sent after the rejoin were lost: {after_rejoin:?}");
    ensure!(i2x_dups == 0 && i2x_ordered, "IRC→XMPP: duplicated or out of order: {:?}", tally.i2x);
    ensure!(reset.is_empty(), "IRC messages Prosody had acknowledged before the kill were lost: {reset:?}");
    ensure!(
        is_run(&unread) && unread.last().is_none_or(|&l| l == FAULT_AT),
        "IRC messages lost after the stored ones are not the run right before the kill: {unread:?}"
    );
    ensure!(i2x.len() > N / 2, "most IRC messages never arrived");
    Ok(())
}

/// What arrived of one direction: (set, duplicates, in order).
fn arrivals(arrived: &[usize]) -> (BTreeSet<usize>, usize, bool) {
    let (dups, ordered) = duplicates_and_order(arrived);
    (arrived.iter().copied().collect(), dups, ordered)
}

#[tokio::test]
async fn postgres_restart_mid_stream_delays_and_loses_nothing() -> Result<()> {
    let Run { tally, log, .. } = stream_through(Fault::RestartPostgres).await?;
    let (x2i, x2i_dups, x2i_ordered) = arrivals(&tally.x2i);
    let (i2x, i2x_dups, i2x_ordered) = arrivals(&tally.i2x);
    let lost: Vec<usize> = tally.accepted.difference(&x2i).copied().collect();
    let i2x_missing: Vec<usize> = (0..N).filter(|n| !i2x.contains(n)).collect();
    println!(
        "PostgreSQL restarted mid-stream: XMPP→IRC sent {N}, accepted {}, refused {}, arrived {}, lost {}, \
         duplicated {x2i_dups}, in order: {x2i_ordered}; IRC→XMPP sent {N}, arrived {}, lost {}, \
         duplicated {i2x_dups}, in order: {i2x_ordered}; database errors retried: {} (how many depends on whether \
         a write was under way when it stopped: others wait for a connection until it is back)",
        tally.accepted.len(),
        tally.refused.len(),
        x2i.len(),
        lost.len(),
        i2x.len(),
        i2x_missing.len(),
        log.matches("retrying").count()
    );
    ensure!(tally.accepted.len() == N, "not every XMPP message was accepted: refused {:?}", tally.refused);
    ensure!(lost.is_empty(), "accepted XMPP messages never reached IRC: {lost:?}");
    ensure!(x2i_dups == 0 && x2i_ordered, "XMPP→IRC: duplicated or out of order: {:?}", tally.x2i);
    ensure!(i2x_missing.is_empty(), "IRC messages never reached XMPP: {i2x_missing:?}");
    ensure!(i2x_dups == 0 && i2x_ordered, "IRC→XMPP: duplicated or out of order: {:?}", tally.i2x);
    Ok(())
}

#[tokio::test]
async fn irc_server_restart_mid_stream_keeps_what_was_accepted() -> Result<()> {
    let Run { tally, .. } = stream_through(Fault::RestartIrcServer).await?;
    let (x2i, x2i_dups, x2i_ordered) = arrivals(&tally.x2i);
    let (i2x, i2x_dups, i2x_ordered) = arrivals(&tally.i2x);
    let lost: Vec<usize> = tally.accepted.difference(&x2i).copied().collect();
    let rejoined_at = tally.rejoined_at;
    let missing: Vec<usize> = (0..N).filter(|n| !i2x.contains(n)).collect();
    let at_restart: Vec<usize> = missing.iter().copied().filter(|&n| n <= FAULT_AT).collect();
    let while_away = missing.iter().filter(|&&n| n > FAULT_AT && Some(n) <= rejoined_at).count();
    let after_rejoin: Vec<usize> = missing.iter().copied().filter(|&n| rejoined_at.is_none_or(|r| n > r)).collect();
    println!(
        "IRC server restarted mid-stream: XMPP→IRC sent {N}, accepted {}, arrived {}, accepted and lost {}, \
         written before the restart and not acknowledged by the server (reported to the sender as possibly not \
         arrived) {} (of them arrived {}), duplicated {x2i_dups}, in order: {x2i_ordered}; \
         IRC→XMPP sent {N}, arrived {}, on the wire at the restart {}, sent before the gateway was back in the \
         channel {} (back at message {}), lost after that {}, duplicated {i2x_dups}, in order: {i2x_ordered}",
        tally.accepted.len(),
        x2i.len(),
        lost.len(),
        tally.in_doubt.len(),
        tally.in_doubt.intersection(&x2i).count(),
        i2x.len(),
        at_restart.len(),
        while_away,
        rejoined_at.map_or("never".to_owned(), |r| r.to_string()),
        after_rejoin.len()
    );
    ensure!(tally.refused.is_empty(), "XMPP messages were refused while the IRC server was away: {:?}", tally.refused);
    ensure!(
        tally.accepted.len() + tally.in_doubt.len() == N,
        "XMPP messages neither acknowledged nor reported: {:?}",
        (0..N).filter(|n| !tally.accepted.contains(n) && !tally.in_doubt.contains(n)).collect::<Vec<_>>()
    );
    ensure!(lost.is_empty(), "accepted XMPP messages never reached IRC: {lost:?}");
    ensure!(
        tally.in_doubt.iter().all(|&n| n <= FAULT_AT),
        "messages reported as possibly not arrived were written after the restart: {:?}",
        tally.in_doubt
    );
    ensure!(x2i_dups == 0 && x2i_ordered, "XMPP→IRC: duplicated or out of order: {:?}", tally.x2i);
    ensure!(rejoined_at.is_some(), "the gateway never rejoined the IRC channel");
    ensure!(after_rejoin.is_empty(), "IRC messages sent after the rejoin were lost: {after_rejoin:?}");
    ensure!(
        is_run(&at_restart) && at_restart.last().is_none_or(|&l| l == FAULT_AT),
        "IRC messages lost at the restart are not the run right before it: {at_restart:?}"
    );
    ensure!(i2x_dups == 0 && i2x_ordered, "IRC→XMPP: duplicated or out of order: {:?}", tally.i2x);
    Ok(())
}

#[tokio::test]
async fn prosody_restart_mid_stream_keeps_what_was_accepted() -> Result<()> {
    let Run { tally, .. } = stream_through(Fault::RestartProsody).await?;
    let (x2i, x2i_dups, x2i_ordered) = arrivals(&tally.x2i);
    let (i2x, i2x_dups, i2x_ordered) = arrivals(&tally.i2x);
    let lost: Vec<usize> = tally.accepted.difference(&x2i).copied().collect();
    let limbo = N - tally.accepted.len() - tally.refused.len();
    let missing: Vec<usize> = (0..N).filter(|n| !i2x.contains(n) && !tally.i2x_history.contains(n)).collect();
    let from_history = tally.i2x_history.difference(&i2x).count();
    println!(
        "Prosody restarted mid-stream: XMPP→IRC sent {N}, accepted {}, refused {}, in limbo at the restart {limbo}, \
         arrived {}, lost {}, duplicated {x2i_dups}, in order: {x2i_ordered}; IRC→XMPP sent {N}, arrived live {}, \
         only in the history on rejoin {from_history}, in neither {} (the gateway's user {}), \
         duplicated live {i2x_dups}, in order: {i2x_ordered}",
        tally.accepted.len(),
        tally.refused.len(),
        x2i.len(),
        lost.len(),
        i2x.len(),
        missing.len(),
        match (tally.parted_at, tally.rejoined_at) {
            (Some(p), Some(j)) => format!("left the channel at message {p} and joined again at {j}"),
            (Some(p), None) => format!("left the channel at message {p} and never joined again"),
            (None, _) => "stayed in the channel".to_owned(),
        }
    );
    ensure!(tally.accepted.len() > N / 2, "most XMPP messages were not accepted");
    ensure!(lost.is_empty(), "accepted XMPP messages never reached IRC: {lost:?}");
    ensure!(x2i_dups == 0 && x2i_ordered, "XMPP→IRC: duplicated or out of order: {:?}", tally.x2i);
    // Prosody's shutdown may send the user's unavailable presence before the link
    // drops: the user left the room, so the gateway left the channel, and what was
    // said until the user joined again is not theirs (a user's IRC history holds
    // only what was said while they were in the room). Otherwise (the link dropped
    // first, or the gateway's messages to the gone device bounced) the gateway
    // stays in the channel and everything is delivered or in the history.
    match (tally.parted_at, tally.rejoined_at) {
        (None, _) => ensure!(missing.is_empty(), "IRC messages neither delivered nor in the room history: {missing:?}"),
        (Some(_), Some(joined)) => ensure!(
            is_run(&missing) && missing.last().is_none_or(|&m| m <= joined),
            "IRC messages neither delivered nor in the room history beyond the time the user was out of the room: {missing:?}"
        ),
        (Some(_), None) => bail!("the user left the channel at the restart and never joined again"),
    }
    ensure!(i2x_dups == 0 && i2x_ordered, "IRC→XMPP: duplicated or out of order: {:?}", tally.i2x);
    Ok(())
}

/// Messages sent while the IRC server is away wait in the outbox (stored, not yet
/// confirmed to the sender); the gateway is killed with them still there, and
/// after its restart (and the IRC server's return) each reaches IRC once, in
/// order, and only then is reflected to the sender: the replay path end to end.
#[tokio::test]
async fn messages_stored_at_a_kill_are_replayed_once_in_order() -> Result<()> {
    const QUEUED: usize = 50;
    let mut s = IrcSetup::start("").await?;
    let (room, _peer, mut alice) = in_the_room(&s).await?;

    s.irc.stop().await;
    alice.expect(T, |st| st.body.as_deref().is_some_and(|b| b.starts_with("Lost the connection"))).await?;
    for i in 0..QUEUED {
        alice.send_groupchat_with_id(&room, &format!("queued {i}"), &format!("queued-{i}")).await?;
    }
    // Stored: the outbox holds every one of them (the sender hears nothing yet).
    let outbox = Store::connect(&format!("sqlite://{}/isthmus.db", s.gateway.dir().display()), 1).await?;
    let deadline = tokio::time::Instant::now() + T;
    while outbox.outbox_pending().await?.iter().filter(|r| r.destination != "xmpp").count() < QUEUED {
        ensure!(tokio::time::Instant::now() < deadline, "the messages were not all stored");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(outbox);
    let early: Vec<String> = alice
        .drain(Duration::from_millis(200))
        .await?
        .into_iter()
        .filter(|st| st.id.starts_with("queued-"))
        .map(|st| st.xml)
        .collect();
    ensure!(early.is_empty(), "reflected or refused before the IRC server took them: {early:?}");
    s.gateway.kill().await;
    let store = Store::connect(&format!("sqlite://{}/isthmus.db", s.gateway.dir().display()), 1).await?;
    let stored = store.outbox_pending().await?.into_iter().filter(|r| r.destination != "xmpp").count();
    drop(store);

    s.irc.restart().await?;
    let mut peer = peer_in_channel(&s).await?;
    s.gateway.restart().await?;
    s.gateway.wait_log("replaying events accepted before the restart", 1, T).await?;
    for i in 0..QUEUED {
        peer.expect_line(T, |l| l.ends_with(&format!(" PRIVMSG #faults :queued {i}"))).await?;
    }
    // Nothing twice: a marker sent afterwards is the next line to arrive from alice.
    alice.send_groupchat(&room, "after the replay").await?;
    peer.expect_line(T, |l| l.ends_with(" PRIVMSG #faults :after the replay")).await?;
    let order: Vec<usize> = peer
        .seen()
        .iter()
        .filter_map(|l| l.split_once(" PRIVMSG #faults :queued ").and_then(|(_, n)| n.parse().ok()))
        .collect();
    let copies = order.len();
    ensure!(order == (0..QUEUED).collect::<Vec<_>>(), "replayed out of order or twice: {order:?}");
    println!(
        "replay after kill -9: accepted while the IRC server was away {QUEUED}, stored at the kill {stored}, \
         arrived after the restart {copies} (in order)"
    );
    ensure!(stored == QUEUED, "only {stored} of {QUEUED} accepted messages were in the outbox at the kill");
    ensure!(copies == QUEUED, "{copies} copies arrived for {QUEUED} messages");
    // The sender's device kept its place in the room: each message is reflected now.
    for i in 0..QUEUED {
        let id = format!("queued-{i}");
        let reflection = alice.expect(T, |st| st.id == id).await?;
        ensure!(reflection.type_ == "groupchat", "message {i} was not accepted: {}", reflection.xml);
        ensure!(reflection.body.as_deref() == Some(&format!("queued {i}")), "{}", reflection.xml);
    }
    Ok(())
}

/// A device that went offline while the gateway was down is still in the restored
/// room session; the XMPP server bounces what the gateway sends it, and the
/// gateway takes it out of the room. It was the account's last device: the
/// account stays in the channel for the reconnect grace, then leaves it.
#[tokio::test]
async fn a_device_gone_while_the_gateway_was_down_leaves_after_the_grace() -> Result<()> {
    const GRACE: Duration = Duration::from_secs(3);
    let mut s = IrcSetup::start("    reconnect_grace_secs: 3").await?;
    let (_, mut peer, alice) = in_the_room(&s).await?;
    s.gateway.kill().await;
    alice.disconnect().await;
    peer.expect_line(T, |l| l.starts_with(":alice") && l.contains(" QUIT ")).await?;
    s.gateway.restart().await?;
    s.gateway.wait_log("rejoining room after restart", 1, T).await?;
    peer.expect_line(T, |l| l.starts_with(":alice") && l.contains(" JOIN ")).await?;
    peer.privmsg("#faults", "anyone there?").await?;
    s.gateway.wait_log("the account's last device vanished", 1, T).await?;
    let bounced = tokio::time::Instant::now();
    let gone =
        peer.expect_line(T, |l| l.starts_with(":alice") && (l.contains(" PART ") || l.contains(" QUIT "))).await?;
    let waited = bounced.elapsed();
    ensure!(gone.contains(" PART #faults"), "the gateway should part the channel, not drop the connection: {gone}");
    println!("the restored session's offline device was dropped; the account left {waited:?} after the bounce: {gone}");
    ensure!(waited >= GRACE - Duration::from_millis(500), "left before the grace was over: {waited:?}");
    let log = s.gateway.log();
    ensure!(log.contains("the device is gone"), "left for another reason:\n{log}");
    ensure!(log.contains("no device came back in time"), "left for another reason:\n{log}");
    Ok(())
}

/// The XMPP server crashes and comes back: the user's device was cut off without
/// a word to the gateway, whose messages to it now bounce. The account stays in the
/// channel, and when the device comes back and joins asking for history, it gets
/// what was said meanwhile.
#[tokio::test]
async fn a_device_that_comes_back_within_the_grace_gets_what_it_missed() -> Result<()> {
    let mut s = IrcSetup::start("").await?;
    let (room, mut peer, alice) = in_the_room(&s).await?;
    let XmppServer::Prosody(prosody) = &mut s.prosody else { bail!("this test runs on Prosody") };
    prosody.crash_and_restart().await?;
    drop(alice);
    s.gateway.wait_log("component link established", 2, T).await?;
    // The gateway does not know the device is gone until the server bounces to it.
    peer.privmsg("#faults", "while you were away 1").await?;
    s.gateway.wait_log("the account's last device vanished", 1, T).await?;
    peer.privmsg("#faults", "while you were away 2").await?;
    let mut alice = XmppClient::connect(&s.prosody, "alice@localhost/phone", "alicepass").await?;
    alice.join_with_history(&room, "alice", 20).await?;
    alice.expect(T, |st| st.kind == "presence" && st.has_status(110)).await?;
    let mut bodies = Vec::new();
    while bodies.len() < 2 {
        let st = alice
            .expect(T, |st| {
                st.kind == "message" && st.body.as_deref().is_some_and(|b| b.starts_with("while you were away"))
            })
            .await?;
        ensure!(st.xml.contains("urn:xmpp:delay"), "history carries its time: {}", st.xml);
        bodies.push(st.body.unwrap_or_default());
    }
    println!("history on the device's return: {bodies:?}");
    ensure!(
        bodies == ["while you were away 1", "while you were away 2"],
        "what was said while the device was away, in order: {bodies:?}"
    );
    let log = s.gateway.log();
    ensure!(!log.contains("no device came back in time"), "the account left the channel meanwhile:\n{log}");
    // And it is live again.
    peer.privmsg("#faults", "welcome back").await?;
    alice.expect(T, |st| st.body.as_deref() == Some("welcome back")).await?;
    ensure!(
        !peer.seen().iter().any(|l| l.starts_with(":alice") && (l.contains(" PART ") || l.contains(" QUIT "))),
        "the account left the channel on IRC"
    );
    Ok(())
}

/// The component link to Prosody goes down while the XMPP client stays online:
/// each room hears of the loss first, then what the channel said meanwhile, in
/// order, then that the link is back.
#[tokio::test]
async fn a_component_link_outage_is_announced_in_the_room() -> Result<()> {
    let (s, relay) = IrcSetup::start_behind_relay("").await?;
    let (room, mut peer, mut alice) = in_the_room(&s).await?;
    relay.cut();
    s.gateway.wait_log("outage notice queued", 1, T).await?;
    const MEANWHILE: usize = 5;
    for n in 1..=MEANWHILE {
        peer.privmsg("#faults", &format!("meanwhile {n}")).await?;
    }
    relay.restore();
    let mut seen = Vec::new();
    loop {
        let st = alice
            .expect(T, |st| {
                st.kind == "message" && st.type_ == "groupchat" && st.from.starts_with(&room) && st.body.is_some()
            })
            .await?;
        let body = st.body.clone().unwrap_or_default();
        if st.from == room {
            ensure!(st.xml.contains("urn:xmpp:delay"), "a notice carries its time: {}", st.xml);
        }
        seen.push((st.from.clone(), body.clone()));
        if st.from == room && body.contains("connected to the XMPP server again") {
            break;
        }
    }
    println!("after the component link outage the room showed: {seen:#?}");
    let (first_from, first) = &seen[0];
    ensure!(
        first_from == &room && first.contains("lost its connection to the XMPP server"),
        "the loss comes first: {seen:?}"
    );
    let relayed: Vec<&str> = seen[1..seen.len() - 1].iter().map(|(_, b)| b.as_str()).collect();
    let expected: Vec<String> = (1..=MEANWHILE).map(|n| format!("meanwhile {n}")).collect();
    ensure!(relayed == expected, "what the channel said meanwhile, once each and in order: {relayed:?}");
    // The link works both ways again.
    alice.send_groupchat(&room, "back again").await?;
    peer.expect_line(T, |l| l.contains("PRIVMSG #faults :back again")).await?;
    Ok(())
}

/// Prosody is stopped with SIGTERM (a restart) while a channel is busy: on its way
/// down it sends an unavailable presence for each of its users' sessions, status
/// "Disconnected: Received SIGTERM", then the component link drops. The device
/// vanished with its server; its user did not leave. The account stays in the
/// channel (the IRC side sees no PART or QUIT), and when the device comes back and
/// joins again it gets every line said while Prosody was down, as history.
#[tokio::test]
async fn a_prosody_sigterm_restart_keeps_the_channel_and_what_was_said_meanwhile() -> Result<()> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use tokio::time::Instant;

    let mut s = IrcSetup::start("").await?;
    let (room, mut peer, mut alice) = in_the_room(&s).await?;
    // Someone in the channel says a line every 25 ms until told to stop; `peer`
    // watches the channel meanwhile, noting when the IRC server passed on each line.
    let mut talker = IrcClient::connect(s.irc.port(), "talker").await?;
    talker.join("#faults").await?;
    peer.expect_line(T, |l| l.starts_with(":talker") && l.contains(" JOIN ")).await?;
    let heard: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let talking = {
        let (heard, stop) = (heard.clone(), stop.clone());
        tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                talker.privmsg("#faults", &format!("steady {n}")).await?;
                n += 1;
                let lines = peer.drain(Duration::from_millis(5)).await?;
                let now = Instant::now();
                heard.lock().unwrap_or_else(|p| p.into_inner()).extend(lines.into_iter().map(|l| (now, l)));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            anyhow::Ok((talker, peer))
        })
    };
    let steady = |st: &Stanza| {
        (st.kind == "message" && st.type_ == "groupchat" && st.from == format!("{room}/talker"))
            .then(|| st.body.as_deref().and_then(|b| number(b, "steady ")))
            .flatten()
    };
    // Live for a while first.
    let mut before = Vec::new();
    gather(&mut alice, &mut before, |st| steady(st).is_some_and(|n| n >= 40)).await?;

    let XmppServer::Prosody(prosody) = &mut s.prosody else { bail!("this test runs on Prosody") };
    let down_from = Instant::now();
    prosody.stop().await;
    let exited = Instant::now();
    // Stay down a moment, as a real restart does, while the channel goes on.
    tokio::time::sleep(Duration::from_secs(1)).await;
    prosody.restart().await?;
    let down_until = Instant::now();
    let log = std::fs::read_to_string(prosody.log_path()).unwrap_or_default();
    ensure!(log.contains("Received SIGTERM"), "Prosody was not stopped with SIGTERM:\n{log}");
    before.extend(alice.drain(Duration::from_millis(200)).await?);
    let live: BTreeSet<usize> = before.iter().filter_map(steady).collect();
    drop(alice);

    s.gateway.wait_log("component link established", 2, T).await?;
    let mut alice = XmppClient::connect(&s.prosody, "alice@localhost/phone", "alicepass").await?;
    alice.join_with_history(&room, "alice", 10_000).await?;
    let rejoined = Instant::now();
    let mut after = Vec::new();
    gather(&mut alice, &mut after, |st| st.kind == "presence" && st.has_status(110)).await?;
    // A few live lines again, then stop talking and let everything arrive.
    let mut live_lines = 0;
    gather(&mut alice, &mut after, |st| {
        if steady(st).is_some() && !st.xml.contains("urn:xmpp:delay") {
            live_lines += 1;
        }
        live_lines >= 20
    })
    .await?;
    stop.store(true, Ordering::SeqCst);
    let (mut talker, mut peer) = talking.await??;
    talker.privmsg("#faults", "the end").await?;
    gather(&mut alice, &mut after, |st| st.body.as_deref() == Some("the end")).await?;
    peer.expect_line(T, |l| l.ends_with(" PRIVMSG #faults :the end")).await?;
    let heard = std::mem::take(&mut *heard.lock().unwrap_or_else(|p| p.into_inner()));

    // What the IRC server passed on, and when.
    let said_at: Vec<(Instant, usize)> = heard
        .iter()
        .filter_map(|(at, l)| l.split_once(" PRIVMSG #faults :steady ").and_then(|(_, n)| Some((*at, n.parse().ok()?))))
        .collect();
    let while_down: Vec<usize> =
        said_at.iter().filter(|(at, _)| *at >= down_from && *at <= down_until).map(|(_, n)| *n).collect();
    let before_exit = said_at.iter().filter(|(at, _)| *at >= down_from && *at <= exited).count();
    let before_rejoin: Vec<usize> = said_at.iter().filter(|(at, _)| *at < rejoined).map(|(_, n)| *n).collect();
    let mut history = BTreeSet::new();
    let mut live_again = BTreeSet::new();
    let mut undelayed: Vec<usize> = Vec::new();
    for st in &after {
        let Some(n) = steady(st) else { continue };
        if st.xml.contains("urn:xmpp:delay") {
            history.insert(n);
        } else {
            live_again.insert(n);
            if while_down.contains(&n) {
                undelayed.push(n);
            }
        }
    }
    let missing_while_down: Vec<usize> = while_down.iter().copied().filter(|n| !history.contains(n)).collect();
    let missing: Vec<usize> = said_at
        .iter()
        .map(|(_, n)| *n)
        .filter(|n| !live.contains(n) && !history.contains(n) && !live_again.contains(n))
        .collect();
    // Every line `peer` read, the watching task's included.
    let left: Vec<String> = peer
        .seen()
        .iter()
        .filter(|l| l.starts_with(":alice") && (l.contains(" PART ") || l.contains(" QUIT ")))
        .cloned()
        .collect();
    println!(
        "Prosody stopped with SIGTERM and restarted while the channel was busy: {} lines said, {} while Prosody \
         was down ({before_exit} of them before it had exited), {} before alice rejoined; received live before \
         the restart {}, in the history on rejoin {}, live after the rejoin {}; said while down and not in the \
         history: {}; never received: {}; alice left on IRC: {left:?}",
        said_at.len(),
        while_down.len(),
        before_rejoin.len(),
        live.len(),
        history.len(),
        live_again.len(),
        missing_while_down.len(),
        missing.len(),
    );
    ensure!(!while_down.is_empty(), "nothing was said while Prosody was down");
    ensure!(left.is_empty(), "the IRC side saw alice leave: {left:?}");
    ensure!(
        missing_while_down.is_empty(),
        "said while Prosody was down and not in the history: {missing_while_down:?}"
    );
    ensure!(missing.is_empty(), "lines that never reached alice: {missing:?}");
    ensure!(undelayed.is_empty(), "said while Prosody was down and delivered without a delay stamp: {undelayed:?}");
    Ok(())
}

/// Every stanza the client receives into `got`, until one matches `pred` (each
/// within `T`); every stanza goes through `pred`, which may count.
async fn gather(client: &mut XmppClient, got: &mut Vec<Stanza>, mut pred: impl FnMut(&Stanza) -> bool) -> Result<()> {
    loop {
        let st = client.expect(T, |_| true).await?;
        let done = pred(&st);
        got.push(st);
        if done {
            return Ok(());
        }
    }
}
