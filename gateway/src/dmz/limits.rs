//! Rate and count limits of the DMZ: unauthenticated connections and handshakes per client
//! address (see [`crate::dmz::preauth`]), sessions, concurrent streams and stream opens per second
//! per token, routes per connector credential. Every per-credential limit sits under a global
//! one. Bounded maps, so a flood of distinct keys cannot grow memory without limit.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The DMZ's limits. Defaults are safe for a public-facing gateway.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Connections being served at once (TLS, HTTP head, or a live session).
    pub max_connections: usize,
    /// One deadline for everything before and around authentication: TLS, the request head, a
    /// fallback request's body, the inner hello and token, the tunnel hello.
    pub handshake_timeout: Duration,
    /// After authentication, on the HTTP fallback: the next request head must be complete
    /// within this of the last answer (idle keep-alive connections end then too).
    pub head_timeout: Duration,
    /// Unauthenticated connections one client address (an IPv6 /64) holds at once; a new one
    /// beyond this evicts the address's oldest.
    pub unauth_per_addr: usize,
    /// Handshakes per second from one client address, after a burst of
    /// [`Limits::handshake_burst`]: a bound on the CPU one address can spend on TLS and v2
    /// handshakes. A handshake that authenticates gives its charge back (within its token's
    /// [`crate::dmz::preauth::HandshakeBudget`] refunds), so the budget is spent only by
    /// handshakes that fail or are still running: thousands of desktops behind one corporate NAT
    /// reconnecting at once are held to this many *at once*, not per second. Behind a trusted load
    /// balancer it counts the forwarded client address, not the balancer's.
    pub handshakes_per_ip: f64,
    /// The per-address bucket's size: handshakes one address may start at once before
    /// [`Limits::handshakes_per_ip`] applies. With refunds it is also the most handshakes of one
    /// address that can be running at once, so keep it at most [`Limits::unauth_per_addr`]
    /// (beyond that, a storm's own handshakes would evict each other).
    pub handshake_burst: f64,
    /// Live sessions per agent token.
    pub sessions_per_agent_token: usize,
    /// Live sessions per connector token.
    pub sessions_per_connector_token: usize,
    /// Stream opens per second per agent token (burst: twice this).
    pub opens_per_token: f64,
    /// Streams one agent session may have open at once.
    pub streams_per_session: usize,
    /// Streams one agent token may have open at once, over all its sessions.
    pub streams_per_token: usize,
    /// Routes kept from one connector credential's sessions (the rest are ignored, logged once).
    pub routes_per_connector: usize,
    /// Bytes of metadata an agent may attach to one stream request (the DMZ adds the identity).
    pub open_meta_bytes: usize,
    /// HTTP-fallback sessions inside the inner channel whose token has not arrived yet.
    pub pending_inner_sessions: usize,
    /// Streams relayed at once by the whole gateway; with the per-stream windows this is the
    /// memory budget: per stream and direction at most the source buffer (one stream window), one
    /// frame in the relay and the destination's send queue (one stream window), so
    /// `max_streams × 2 × (2 × stream_window + 64 KiB)` at worst.
    pub max_streams: usize,
    /// Datagram (SOCKS5 UDP) associations open at once per agent token.
    pub udp_associations_per_token: usize,
    /// Datagram associations open at once in the whole gateway (many tokens cannot add up to
    /// more).
    pub udp_associations: usize,
    /// Datagrams per second per agent token, both directions (burst 2×); over it, dropped.
    pub udp_datagrams_per_token: f64,
    /// Datagrams per second through the whole gateway (burst 2×); over it, dropped.
    pub udp_datagrams: f64,
    /// For at most this long after the instance's first authenticated session, a stream that
    /// no connector serves *yet* waits for one, instead of being refused `no-route` at once:
    /// only when a connector credential of the token file that may serve its destination has
    /// no session with routes here yet. A restarted instance is ready for agents the moment it
    /// listens, before the connectors' backoff brings them back; an agent that lands on it in
    /// between would otherwise see its new connections refused. A destination no credential
    /// may serve, or whose connectors are all here, is refused at once. Waiting streams hold
    /// their stream slots and are bounded ([`Limits::route_waiting_per_token`],
    /// [`Limits::route_waiting`]); a resume never waits (the agent asks again by itself). At
    /// most [`ROUTE_WAIT_MAX`]; `Duration::ZERO`: never wait.
    pub route_wait_at_start: Duration,
    /// Streams of one agent token that may wait for a connector at once (see
    /// [`Limits::route_wait_at_start`]); beyond it, refused `no-route` at once. 0: never wait.
    pub route_waiting_per_token: usize,
    /// Streams of all tokens that may wait for a connector at once: every change of the routes
    /// wakes each of them to look again, so their number bounds that work, whatever the number
    /// of tokens. 0: never wait.
    pub route_waiting: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 8192,
            handshake_timeout: Duration::from_secs(10),
            head_timeout: Duration::from_secs(30),
            unauth_per_addr: 64,
            handshakes_per_ip: 20.0,
            handshake_burst: 64.0,
            sessions_per_agent_token: 16,
            sessions_per_connector_token: 32,
            opens_per_token: 500.0,
            streams_per_session: 16_384,
            streams_per_token: 8_192,
            routes_per_connector: 10_000,
            open_meta_bytes: 4 * 1024,
            pending_inner_sessions: 1_024,
            max_streams: 65_536,
            udp_associations_per_token: 32,
            udp_associations: 4_096,
            udp_datagrams_per_token: 2_000.0,
            udp_datagrams: 50_000.0,
            route_wait_at_start: Duration::from_secs(15),
            route_waiting_per_token: 256,
            route_waiting: 4_096,
        }
    }
}

/// The longest `route_wait_at_start`: below the agents' default `open_timeout` (30 s), so an
/// agent hears the DMZ's answer rather than its own timeout.
pub const ROUTE_WAIT_MAX: Duration = Duration::from_secs(25);

/// Token buckets keyed by `K`, at most `cap` keys (full buckets are forgotten first).
pub struct Buckets<K> {
    rate: f64,
    burst: f64,
    cap: usize,
    map: Mutex<HashMap<K, (f64, Instant)>>,
}

impl<K: Hash + Eq + Clone> Buckets<K> {
    /// `rate` per second, burst twice that.
    pub fn new(rate: f64, cap: usize) -> Self {
        Buckets::with_burst(rate, rate * 2.0, cap)
    }

    /// `rate` per second after a burst of `burst` (at least one).
    pub fn with_burst(rate: f64, burst: f64, cap: usize) -> Self {
        Buckets {
            rate,
            burst: burst.max(1.0),
            cap,
            map: Mutex::new(HashMap::new()),
        }
    }

    /// Gives one token back to `key` (never beyond the burst). A key no longer tracked was
    /// forgotten because its bucket was full: nothing to give back.
    pub fn refund(&self, key: &K) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = map.get_mut(key) {
            entry.0 = (entry.0 + 1.0).min(self.burst);
        }
    }

    /// Takes one token for `key`; false when the key is over its rate.
    pub fn allow(&self, key: &K) -> bool {
        let now = Instant::now();
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= self.cap && !map.contains_key(key) {
            let (rate, burst) = (self.rate, self.burst);
            map.retain(|_, (tokens, at)| *tokens + at.elapsed().as_secs_f64() * rate < burst);
            if map.len() >= self.cap {
                return false;
            }
        }
        let entry = map.entry(key.clone()).or_insert((self.burst, now));
        let refill = now.duration_since(entry.1).as_secs_f64() * self.rate;
        entry.0 = (entry.0 + refill).min(self.burst);
        entry.1 = now;
        if entry.0 >= 1.0 {
            entry.0 -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Live counts keyed by `K` with a maximum each; [`Counts::acquire`] returns a guard.
pub struct Counts<K: Hash + Eq + Clone> {
    max: usize,
    map: Mutex<HashMap<K, usize>>,
}

pub struct CountGuard<K: Hash + Eq + Clone> {
    counts: std::sync::Arc<Counts<K>>,
    key: K,
}

impl<K: Hash + Eq + Clone> Counts<K> {
    pub fn new(max: usize) -> Self {
        Counts {
            max,
            map: Mutex::new(HashMap::new()),
        }
    }

    pub fn acquire(self: &std::sync::Arc<Self>, key: &K) -> Option<CountGuard<K>> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(key.clone()).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(CountGuard {
            counts: self.clone(),
            key: key.clone(),
        })
    }
}

impl<K: Hash + Eq + Clone> Drop for CountGuard<K> {
    fn drop(&mut self) {
        let mut map = self.counts.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_refuses() {
        let b = Buckets::new(5.0, 10);
        let allowed = (0..20).filter(|_| b.allow(&"k")).count();
        assert_eq!(allowed, 10);
        assert!(b.allow(&"other"));
    }

    #[test]
    fn a_refund_gives_one_token_back_never_beyond_the_burst() {
        let b = Buckets::with_burst(0.001, 3.0, 10);
        assert_eq!((0..5).filter(|_| b.allow(&"k")).count(), 3);
        b.refund(&"k");
        assert!(b.allow(&"k"));
        assert!(!b.allow(&"k"));
        for _ in 0..10 {
            b.refund(&"k");
        }
        assert_eq!((0..10).filter(|_| b.allow(&"k")).count(), 3);
        b.refund(&"unknown");
        assert_eq!(b.map.lock().unwrap().len(), 1, "a refund creates no key");
    }

    #[test]
    fn a_flood_of_keys_does_not_grow_the_map_beyond_its_cap() {
        let b = Buckets::new(1.0, 100);
        for i in 0..10_000 {
            b.allow(&i);
        }
        assert!(b.map.lock().unwrap().len() <= 100);
    }

    #[test]
    fn counts_release_on_drop() {
        let c = std::sync::Arc::new(Counts::new(2));
        let a = c.acquire(&"t").unwrap();
        let _b = c.acquire(&"t").unwrap();
        assert!(c.acquire(&"t").is_none());
        drop(a);
        assert!(c.acquire(&"t").is_some());
    }
}
