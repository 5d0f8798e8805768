//! Connections that have not authenticated yet: who they are counted as, and how many one
//! address may hold.
//!
//! Everything a client does before its credential is verified (TLS, the request head, a
//! fallback request's body, the inner channel's hello and token, the tunnel hello) runs under
//! **one** deadline ([`crate::dmz::limits::Limits::handshake_timeout`]) and holds a [`Slot`] of its
//! address. An address holds at most [`crate::dmz::limits::Limits::unauth_per_addr`] slots at once;
//! a new connection beyond that evicts the address's **oldest** one, so an attacker that opens
//! and stalls connections from one address holds a bounded share of the gateway, while a
//! reconnect storm of thousands of desktops behind one corporate NAT still gets through (each
//! of their handshakes is quick, so eviction only ever takes the slowest).
//!
//! What one address may spend on handshakes (CPU) is a token bucket, [`HandshakeBudget`]: every
//! new connection (and every v2 msg1 on the HTTP fallback) takes a token, and a handshake that
//! authenticates gives its token back. Failed and unfinished handshakes keep theirs, so an
//! attacker at one address gets `handshake_burst` at once and `handshakes_per_ip` a second,
//! whatever its neighbours behind the same NAT do; the desktops themselves are held only to
//! `handshake_burst` handshakes *running* at once. A token's own refunds are limited too
//! ([`HandshakeBudget::REFUNDS_PER_SECOND`]), so a stolen credential reconnecting in a loop is
//! back under the address's rate after its burst. The arithmetic: `docs/deploy.md`, "Reconnect
//! storms".
//!
//! Addresses are keyed by [`addr_key`]: an IPv6 client counts as its /64 (one host rotates
//! freely within it), and behind a trusted load balancer the client is the forwarded address,
//! never the balancer's own.

use super::limits::{Buckets, Limits};
use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use tokio_util::sync::CancellationToken;

/// The key one client's limits are counted under: IPv4 as is (an IPv4-mapped IPv6 address
/// as its IPv4 address), IPv6 as its /64.
pub fn addr_key(ip: IpAddr) -> IpAddr {
    match crate::policy::canonical_ip(ip) {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

/// The handshake budget of every client address, and the refunds of every token.
pub struct HandshakeBudget {
    per_addr: Buckets<IpAddr>,
    /// Keyed by (agent?, token id): agent and connector ids are separate namespaces.
    refunds: Buckets<(bool, String)>,
}

impl HandshakeBudget {
    /// Refunds one token gets per second, after a burst of its session limit
    /// (`sessions_per_agent_token`, `sessions_per_connector_token`: a connector with `--sessions
    /// 4`, or an agent and its fallback, come back at once). An agent that lost its session
    /// reconnects once; one that reconnects faster than this is charged like anyone else.
    pub const REFUNDS_PER_SECOND: f64 = 1.0;

    pub fn new(limits: &Limits, max_addrs: usize) -> HandshakeBudget {
        let burst = limits
            .sessions_per_agent_token
            .max(limits.sessions_per_connector_token) as f64;
        HandshakeBudget {
            per_addr: Buckets::with_burst(
                limits.handshakes_per_ip,
                limits.handshake_burst,
                max_addrs,
            ),
            refunds: Buckets::with_burst(Self::REFUNDS_PER_SECOND, burst, max_addrs),
        }
    }

    /// Takes one handshake from `ip`'s budget (keyed by [`addr_key`]); false: over it.
    pub fn charge(&self, ip: IpAddr) -> bool {
        self.per_addr.allow(&addr_key(ip))
    }

    /// A handshake from `ip` authenticated `token_id`: gives its charge back, unless the token
    /// has used up its own refunds.
    pub fn authenticated(&self, ip: IpAddr, is_agent: bool, token_id: &str) {
        if self.refunds.allow(&(is_agent, token_id.to_string())) {
            self.per_addr.refund(&addr_key(ip));
        }
    }
}

/// The live unauthenticated connections of every address.
pub struct PreAuth {
    per_addr: usize,
    max_addrs: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    next_id: u64,
    by_addr: HashMap<IpAddr, VecDeque<(u64, CancellationToken)>>,
}

/// One unauthenticated connection's place. Dropping it (the connection authenticated or
/// ended) frees the place; [`Slot::evicted`] completes when a newer connection of the same
/// address took it.
pub struct Slot {
    owner: Option<(Arc<PreAuth>, IpAddr, u64)>,
    evicted: CancellationToken,
}

impl PreAuth {
    /// At most `per_addr` connections per address, and at most `max_addrs` addresses tracked
    /// (beyond that, new addresses are refused until some leave).
    pub fn new(per_addr: usize, max_addrs: usize) -> Arc<PreAuth> {
        Arc::new(PreAuth {
            per_addr: per_addr.max(1),
            max_addrs,
            inner: Mutex::new(Inner::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A place for a new connection from `ip` (keyed by [`addr_key`]), evicting the address's
    /// oldest when it is full. `None` only when the table of addresses is full.
    pub fn enter(self: &Arc<Self>, ip: IpAddr) -> Option<Slot> {
        let key = addr_key(ip);
        let mut inner = self.lock();
        if !inner.by_addr.contains_key(&key) && inner.by_addr.len() >= self.max_addrs {
            return None;
        }
        inner.next_id += 1;
        let id = inner.next_id;
        let token = CancellationToken::new();
        let queue = inner.by_addr.entry(key).or_default();
        while queue.len() >= self.per_addr {
            if let Some((_, oldest)) = queue.pop_front() {
                oldest.cancel();
            }
        }
        queue.push_back((id, token.clone()));
        Some(Slot {
            owner: Some((self.clone(), key, id)),
            evicted: token,
        })
    }

    /// Unauthenticated connections of `ip`'s key now.
    pub fn count(&self, ip: IpAddr) -> usize {
        self.lock()
            .by_addr
            .get(&addr_key(ip))
            .map_or(0, VecDeque::len)
    }

    fn leave(&self, key: IpAddr, id: u64) {
        let mut inner = self.lock();
        if let Some(q) = inner.by_addr.get_mut(&key) {
            q.retain(|(i, _)| *i != id);
            if q.is_empty() {
                inner.by_addr.remove(&key);
            }
        }
    }
}

impl Slot {
    /// A slot that counts nowhere (a trusted load balancer's own connection, before the head
    /// names the client behind it).
    pub fn uncounted() -> Slot {
        Slot {
            owner: None,
            evicted: CancellationToken::new(),
        }
    }

    /// Completes when a newer connection of the same address took this place.
    pub async fn evicted(&self) {
        self.evicted.cancelled().await
    }

    pub fn is_evicted(&self) -> bool {
        self.evicted.is_cancelled()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some((table, key, id)) = self.owner.take() {
            table.leave(key, id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_clients_count_as_their_64_and_mapped_ipv4_as_ipv4() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(addr_key(a), addr_key(b));
        assert_ne!(addr_key(a), addr_key(c));
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(addr_key(mapped), "192.0.2.7".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn one_address_holding_every_slot_evicts_its_own_oldest() {
        let t = PreAuth::new(3, 100);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let slots: Vec<Slot> = (0..5).map(|_| t.enter(ip).unwrap()).collect();
        assert_eq!(t.count(ip), 3);
        let evicted: Vec<bool> = slots.iter().map(Slot::is_evicted).collect();
        assert_eq!(evicted, [true, true, false, false, false]);
        // Another address is not touched.
        let other = t.enter("192.0.2.2".parse().unwrap()).unwrap();
        assert!(!other.is_evicted());
        drop(slots);
        assert_eq!(t.count(ip), 0);
    }

    #[test]
    fn rotating_within_a_64_does_not_escape_the_limit() {
        let t = PreAuth::new(2, 100);
        let slots: Vec<Slot> = (1..=4)
            .map(|i| {
                t.enter(format!("2001:db8::{i:x}").parse().unwrap())
                    .unwrap()
            })
            .collect();
        assert_eq!(slots.iter().filter(|s| !s.is_evicted()).count(), 2);
    }

    fn budget(rate: f64, burst: f64) -> HandshakeBudget {
        let limits = Limits {
            handshakes_per_ip: rate,
            handshake_burst: burst,
            sessions_per_agent_token: 4,
            sessions_per_connector_token: 2,
            ..Limits::default()
        };
        HandshakeBudget::new(&limits, 2_000)
    }

    #[test]
    fn a_reconnect_storm_behind_one_address_is_held_to_handshakes_at_once_not_per_second() {
        let b = budget(0.001, 8.0);
        let nat: IpAddr = "198.51.100.7".parse().unwrap();
        // 1,000 desktops, each with its own token, eight handshakes running at a time.
        for wave in 0..125 {
            for i in 0..8 {
                assert!(b.charge(nat), "wave {wave}: refused");
                b.authenticated(nat, true, &format!("desk-{wave}-{i}"));
            }
        }
        // Nine at once is one too many.
        let running = (0..9).filter(|_| b.charge(nat)).count();
        assert_eq!(running, 8);
    }

    #[test]
    fn failed_handshakes_still_exhaust_the_per_address_budget_when_successful_ones_are_refunded() {
        let b = budget(0.001, 8.0);
        let nat: IpAddr = "198.51.100.7".parse().unwrap();
        // Desktops behind the NAT authenticate and are refunded...
        for i in 0..20 {
            assert!(b.charge(nat));
            b.authenticated(nat, true, &format!("desk-{i}"));
        }
        // ...an attacker behind the same NAT never authenticates: its budget is spent.
        let attacker = (0..100).filter(|_| b.charge(nat)).count();
        assert_eq!(attacker, 8);
        // Another address is not touched.
        assert!(b.charge("198.51.100.8".parse().unwrap()));
    }

    #[test]
    fn a_stolen_token_reconnecting_in_a_loop_is_refunded_only_its_burst() {
        let b = budget(0.001, 8.0);
        let ip: IpAddr = "203.0.113.9".parse().unwrap();
        let mut allowed = 0;
        for _ in 0..100 {
            if b.charge(ip) {
                allowed += 1;
                b.authenticated(ip, true, "stolen");
            }
        }
        // Its own burst of refunds (4, the agent session limit here), then the address's 8.
        assert_eq!(allowed, 4 + 8);
        // A connector token of the same id is another key.
        assert!(b.refunds.allow(&(false, "stolen".to_string())));
    }

    #[test]
    fn a_flood_of_addresses_is_bounded() {
        let t = PreAuth::new(2, 10);
        let held: Vec<Slot> = (0..10)
            .map(|i| t.enter(IpAddr::from([10, 0, 0, i])).unwrap())
            .collect();
        assert!(t.enter(IpAddr::from([10, 0, 1, 1])).is_none());
        // A known address still gets in.
        assert!(t.enter(IpAddr::from([10, 0, 0, 1])).is_some());
        drop(held);
        assert!(t.enter(IpAddr::from([10, 0, 1, 1])).is_some());
    }
}
