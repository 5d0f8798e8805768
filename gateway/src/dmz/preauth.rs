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
//! Addresses are keyed by [`addr_key`]: an IPv6 client counts as its /64 (one host rotates
//! freely within it), and behind a trusted load balancer the client is the forwarded address,
//! never the balancer's own.

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
