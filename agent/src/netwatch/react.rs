//! What the agent does about an [`Event`]: compare where it is now ([`Whereabouts`]) with where
//! it was when its session came up, and either keep the session or end it and re-probe the way
//! out at once ([`decide`]; the pool and `uplink::keep_nudged` do the reconnecting, with the
//! way remembered for the new network tried first, see `egress::probe`).

use super::Event;
use crate::pool::Pool;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

/// Where the machine is on the network, as far as the way out is concerned: the network's key
/// (`egress::network::key`: default gateway, DNS) and the source address the routing table
/// picks for the internet, per address family. Equal before and after an event: nothing the
/// session depends on moved.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Whereabouts {
    pub key: String,
    pub v4: Option<IpAddr>,
    pub v6: Option<IpAddr>,
}

/// Documentation addresses (RFC 5737, RFC 3849): a route lookup towards them picks the default
/// route; a UDP `connect` sends nothing.
const PROBE_V4: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), 443);
const PROBE_V6: SocketAddr = SocketAddr::new(
    IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)),
    443,
);

fn source_towards(to: SocketAddr) -> Option<IpAddr> {
    let any: SocketAddr = match to {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let s = UdpSocket::bind(any).ok()?;
    s.connect(to).ok()?;
    Some(s.local_addr().ok()?.ip())
}

impl Whereabouts {
    /// Where we are now (cheap: two small files and two route lookups, nothing sent).
    pub fn current() -> Whereabouts {
        Whereabouts {
            key: egress::network::key(),
            v4: source_towards(PROBE_V4),
            v6: source_towards(PROBE_V6),
        }
    }

    /// Whether a default route exists at all.
    pub fn online(&self) -> bool {
        self.v4.is_some() || self.v6.is_some()
    }
}

/// What to do about an event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// End the session and connect again now (a session was up).
    Replace,
    /// No session is up: end the wait before the next attempt and try now.
    TryNow,
    /// Keep the session, for this reason.
    Keep(&'static str),
    /// No session and no network: nothing to try yet.
    Wait,
}

/// The decision. `session`: where we were when the live session came up (`None`: no session).
///
/// - A wake from sleep replaces the session: its pings ran on a clock that stopped, NAT and
///   proxy connections are usually gone after a sleep, and a new session costs one handshake.
/// - A network change with the same key and source addresses keeps the session (a flap that
///   came back, a container's veth, a Wi-Fi roam between access points of one network): it
///   did not lose its path, and its own pings still watch it.
/// - A change to no network at all keeps it too: there is nothing better to move to, and a
///   link back within the ping timeout keeps it alive.
/// - Anything else (a new default route, a new source address, other DNS) replaces it.
pub fn decide(event: &Event, session: Option<&Whereabouts>, now: &Whereabouts) -> Verdict {
    match (session, event) {
        (None, _) if !now.online() => Verdict::Wait,
        (None, _) => Verdict::TryNow,
        (Some(_), Event::Woke(_)) => Verdict::Replace,
        (Some(_), Event::Changed(_)) if !now.online() => {
            Verdict::Keep("no way out on the network now")
        }
        (Some(was), Event::Changed(_)) if was == now => {
            Verdict::Keep("the default route and local addresses are unchanged")
        }
        (Some(_), Event::Changed(_)) => Verdict::Replace,
    }
}

/// Watches until `shutdown` and acts on every event.
pub async fn run(pool: Arc<Pool>, shutdown: CancellationToken) {
    let mut events = super::start(shutdown.clone());
    while let Some(event) = events.recv().await {
        let now = Whereabouts::current();
        let session = pool
            .current()
            .filter(|s| !s.is_closed())
            .map(|_| pool.whereabouts().unwrap_or_default());
        let verdict = decide(&event, session.as_ref(), &now);
        let outcome = match verdict {
            Verdict::Replace | Verdict::TryNow => {
                info!("{event}, re-probing the way out");
                pool.moved(&event.to_string());
                "re-probed the way out"
            }
            Verdict::Keep(why) => {
                debug!("{event}; {why}: keeping the session");
                "kept the session"
            }
            Verdict::Wait => {
                debug!("{event}; no way out on the network yet");
                "no way out yet"
            }
        };
        pool.record_event(&event, outcome);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(key: &str, v4: Option<[u8; 4]>) -> Whereabouts {
        Whereabouts {
            key: key.into(),
            v4: v4.map(IpAddr::from),
            v6: None,
        }
    }

    fn changed() -> Event {
        Event::Changed("route default via 10.0.0.1 added".into())
    }

    #[test]
    fn a_new_route_after_wifi_roam_reprobes_at_once() {
        let office = at("gw=wlan0/10.1.0.1", Some([10, 1, 0, 7]));
        let cafe = at("gw=wlan0/192.168.1.1", Some([192, 168, 1, 20]));
        assert_eq!(decide(&changed(), Some(&office), &cafe), Verdict::Replace);
        // Same network, another address (DHCP gave a new lease): the old one is gone.
        let new_lease = at("gw=wlan0/10.1.0.1", Some([10, 1, 0, 8]));
        assert_eq!(
            decide(&changed(), Some(&office), &new_lease),
            Verdict::Replace
        );
    }

    #[test]
    fn a_flap_that_comes_back_unchanged_does_not_reconnect() {
        let office = at("gw=eth0/10.1.0.1", Some([10, 1, 0, 7]));
        assert!(matches!(
            decide(&changed(), Some(&office), &office.clone()),
            Verdict::Keep(_)
        ));
        // The link down (no route): nothing better to move to, the session is kept.
        let offline = at("", None);
        assert!(matches!(
            decide(&changed(), Some(&office), &offline),
            Verdict::Keep(_)
        ));
    }

    #[test]
    fn a_wake_replaces_the_session_even_on_the_same_network() {
        let home = at("gw=wlan0/192.168.1.1", Some([192, 168, 1, 20]));
        let woke = Event::Woke(Duration::from_secs(3600));
        assert_eq!(decide(&woke, Some(&home), &home.clone()), Verdict::Replace);
    }

    #[test]
    fn a_network_that_appears_during_the_backoff_wait_is_tried_at_once() {
        let home = at("gw=wlan0/192.168.1.1", Some([192, 168, 1, 20]));
        assert_eq!(decide(&changed(), None, &home), Verdict::TryNow);
        assert_eq!(decide(&changed(), None, &at("", None)), Verdict::Wait);
    }
}
