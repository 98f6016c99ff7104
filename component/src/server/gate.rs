//! Admission of client connections before they log in, and the price of a
//! failed login.
//!
//! - Connections not logged in yet are capped per IP address and in all; one
//!   more than a cap makes the oldest such connection (of that address, or of
//!   all) go, so connections that never finish TLS or SASL cannot keep a real
//!   client out: it arrives last, finishes in milliseconds and is the youngest.
//! - Each failed login is answered after a delay that doubles with every
//!   failure from the same address or for the same account (from 0.25 s up to
//!   the configured cap), forgotten after a quiet quarter of an hour. The
//!   record of failures is bounded.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use isthmus_config::C2sLimits;
use tokio_util::sync::CancellationToken;

/// Failures are forgotten after this long without another.
const FORGET_AFTER: Duration = Duration::from_secs(15 * 60);
/// The first failure's delay.
const FIRST_DELAY: Duration = Duration::from_millis(250);
/// Most addresses and accounts whose failures are remembered.
const MAX_REMEMBERED: usize = 10_000;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Who {
    Address(IpAddr),
    Account(String),
}

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    last: Instant,
}

#[derive(Default)]
struct State {
    next_id: u64,
    /// Connections not logged in yet, oldest first.
    pending: BTreeMap<u64, (IpAddr, CancellationToken)>,
    per_ip: HashMap<IpAddr, VecDeque<u64>>,
    failures: HashMap<Who, Failures>,
}

impl State {
    fn remove(&mut self, id: u64) -> Option<CancellationToken> {
        let (ip, token) = self.pending.remove(&id)?;
        if let Some(ids) = self.per_ip.get_mut(&ip) {
            ids.retain(|i| *i != id);
            if ids.is_empty() {
                self.per_ip.remove(&ip);
            }
        }
        Some(token)
    }
}

/// The embedded server's admission control.
pub struct Gate {
    limits: C2sLimits,
    state: Mutex<State>,
}

/// One admitted connection; it leaves the count of connections not logged in
/// when it logs in or ends. `evicted` fires when it must make room.
pub struct Ticket {
    gate: Arc<Gate>,
    id: u64,
    pub evicted: CancellationToken,
}

impl Ticket {
    /// The connection logged in: it no longer counts against the caps.
    pub fn logged_in(&self) {
        self.gate.lock().remove(self.id);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.gate.lock().remove(self.id);
    }
}

impl Gate {
    pub fn new(limits: C2sLimits) -> Arc<Gate> {
        Arc::new(Gate { limits, state: Mutex::new(State::default()) })
    }

    pub fn limits(&self) -> &C2sLimits {
        &self.limits
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Admit a new connection from `ip`, making the oldest ones go past a cap.
    /// Returns the ticket and how many connections were made to go.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> (Ticket, usize) {
        let mut state = self.lock();
        let mut evicted = 0;
        let per_ip = self.limits.unauthenticated_per_ip.max(1);
        while state.per_ip.get(&ip).is_some_and(|ids| ids.len() >= per_ip) {
            let Some(oldest) = state.per_ip.get(&ip).and_then(|ids| ids.front().copied()) else { break };
            if let Some(token) = state.remove(oldest) {
                token.cancel();
                evicted += 1;
            }
        }
        while state.pending.len() >= self.limits.unauthenticated_total.max(1) {
            let Some(oldest) = state.pending.keys().next().copied() else { break };
            if let Some(token) = state.remove(oldest) {
                token.cancel();
                evicted += 1;
            }
        }
        let id = state.next_id;
        state.next_id += 1;
        let token = CancellationToken::new();
        state.pending.insert(id, (ip, token.clone()));
        state.per_ip.entry(ip).or_default().push_back(id);
        (Ticket { gate: self.clone(), id, evicted: token }, evicted)
    }

    /// Record a failed login from `ip` for `account`; returns how long to wait
    /// before answering it.
    pub fn failed(&self, ip: IpAddr, account: &str) -> Duration {
        let now = Instant::now();
        let mut state = self.lock();
        if state.failures.len() >= MAX_REMEMBERED {
            state.failures.retain(|_, f| now.duration_since(f.last) < FORGET_AFTER);
            if state.failures.len() >= MAX_REMEMBERED {
                // Still full of recent failures: forget the older half.
                let mut lasts: Vec<Instant> = state.failures.values().map(|f| f.last).collect();
                lasts.sort_unstable();
                let median = lasts[lasts.len() / 2];
                state.failures.retain(|_, f| f.last > median);
            }
        }
        let mut worst = 0;
        for who in [Who::Address(ip), Who::Account(account.to_lowercase())] {
            let f = state.failures.entry(who).or_insert(Failures { count: 0, last: now });
            if now.duration_since(f.last) >= FORGET_AFTER {
                f.count = 0;
            }
            f.count = f.count.saturating_add(1);
            f.last = now;
            worst = worst.max(f.count);
        }
        let max = Duration::from_secs(self.limits.failed_login_delay_max_secs);
        FIRST_DELAY.saturating_mul(1u32 << (worst - 1).min(16)).min(max)
    }

    /// A successful login clears the account's failures (not the address's).
    pub fn succeeded(&self, account: &str) {
        self.lock().failures.remove(&Who::Account(account.to_lowercase()));
    }

    /// Connections not logged in yet (for tests and the admin's view).
    pub fn pending(&self) -> usize {
        self.lock().pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(per_ip: usize, total: usize) -> C2sLimits {
        C2sLimits { unauthenticated_per_ip: per_ip, unauthenticated_total: total, ..C2sLimits::default() }
    }

    #[test]
    fn the_oldest_connection_of_an_address_makes_room() {
        let gate = Gate::new(limits(2, 100));
        let a: IpAddr = "192.0.2.1".parse().expect("ip");
        let b: IpAddr = "192.0.2.2".parse().expect("ip");
        let (first, _) = gate.admit(a);
        let (second, _) = gate.admit(a);
        let (other, _) = gate.admit(b);
        let (third, evicted) = gate.admit(a);
        assert_eq!(evicted, 1);
        assert!(first.evicted.is_cancelled());
        assert!(!second.evicted.is_cancelled() && !third.evicted.is_cancelled() && !other.evicted.is_cancelled());
        drop(first);
        assert_eq!(gate.pending(), 3);
        // a logged-in connection no longer counts
        second.logged_in();
        third.logged_in();
        let (_, evicted) = gate.admit(a);
        assert_eq!(evicted, 0);
        assert!(!second.evicted.is_cancelled());
    }

    #[test]
    fn the_total_cap_makes_the_oldest_of_all_go() {
        let gate = Gate::new(limits(100, 3));
        let tickets: Vec<Ticket> = (1..=3u8).map(|i| gate.admit(IpAddr::from([192, 0, 2, i])).0).collect();
        let (newest, evicted) = gate.admit("192.0.2.9".parse().expect("ip"));
        assert_eq!(evicted, 1);
        assert!(tickets[0].evicted.is_cancelled());
        assert!(!tickets[1].evicted.is_cancelled() && !newest.evicted.is_cancelled());
        assert_eq!(gate.pending(), 3);
    }

    #[test]
    fn failed_logins_cost_more_each_time_up_to_the_cap() {
        let gate = Gate::new(C2sLimits { failed_login_delay_max_secs: 2, ..C2sLimits::default() });
        let ip: IpAddr = "198.51.100.7".parse().expect("ip");
        let delays: Vec<Duration> = (0..6).map(|_| gate.failed(ip, "alice")).collect();
        let ms: Vec<u128> = delays.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [250, 500, 1000, 2000, 2000, 2000]);
        // another address guessing the same account pays the account's price
        assert_eq!(gate.failed("198.51.100.8".parse().expect("ip"), "Alice"), Duration::from_secs(2));
        // the account's record is cleared by a success; the address's is not
        gate.succeeded("alice");
        assert_eq!(gate.failed("198.51.100.9".parse().expect("ip"), "alice").as_millis(), 250);
        assert_eq!(gate.failed(ip, "bob"), Duration::from_secs(2));
    }

    #[test]
    fn the_failure_record_is_bounded() {
        let gate = Gate::new(C2sLimits::default());
        for i in 0..(MAX_REMEMBERED as u32 + 10) {
            gate.failed(IpAddr::from(i.to_be_bytes()), "x");
        }
        assert!(gate.lock().failures.len() <= MAX_REMEMBERED + 2);
    }
}
