//! The datagram (SOCKS5 UDP) counters of [`super::Metrics`]: associations, datagrams and bytes
//! each way, and datagrams dropped by a fixed set of reasons (never a destination or a user).

use super::{family, Gauge};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

/// Why a datagram was dropped: the `reason` label of `sallyport_udp_dropped_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UdpDrop {
    /// Over a datagrams-per-second limit (per token, per association, or global).
    Rate = 0,
    /// A bounded queue was full (the session's datagram queue, an association's inbox).
    Queue = 1,
    /// Outside the token's routes or the connector's UDP rules.
    NotAllowed = 2,
    /// No connector that carries datagrams serves the destination.
    NoRoute = 3,
    /// Larger than the protocol's datagram limit.
    TooLarge = 4,
    /// An association over the per-token, per-user or global association limit.
    Associations = 5,
    /// Over the destinations (legs) an association may use.
    Destinations = 6,
    /// At the connector, from a peer the association never sent to.
    ForeignReply = 7,
}

impl UdpDrop {
    const ALL: [UdpDrop; 8] = [
        UdpDrop::Rate,
        UdpDrop::Queue,
        UdpDrop::NotAllowed,
        UdpDrop::NoRoute,
        UdpDrop::TooLarge,
        UdpDrop::Associations,
        UdpDrop::Destinations,
        UdpDrop::ForeignReply,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            UdpDrop::Rate => "rate",
            UdpDrop::Queue => "queue",
            UdpDrop::NotAllowed => "not_allowed",
            UdpDrop::NoRoute => "no_route",
            UdpDrop::TooLarge => "too_large",
            UdpDrop::Associations => "associations",
            UdpDrop::Destinations => "destinations",
            UdpDrop::ForeignReply => "foreign_reply",
        }
    }

    /// The reason for a datagram the tunnel would not queue.
    pub fn of(d: tunnel::Dropped) -> UdpDrop {
        match d {
            tunnel::Dropped::TooLarge => UdpDrop::TooLarge,
            tunnel::Dropped::Queue | tunnel::Dropped::Closed => UdpDrop::Queue,
        }
    }
}

/// The datagram counters.
#[derive(Default)]
pub struct UdpMetrics {
    associations: AtomicI64,
    /// Up (towards the service), down (back).
    datagrams: [AtomicU64; 2],
    bytes: [AtomicU64; 2],
    dropped: [AtomicU64; 8],
}

impl UdpMetrics {
    /// An association is open until the guard drops.
    pub fn association(&self) -> Gauge<'_> {
        Gauge::new(&self.associations)
    }

    /// A datagram carried `up` (towards the service) or down.
    pub fn carried(&self, up: bool, bytes: usize) {
        let i = usize::from(!up);
        self.datagrams[i].fetch_add(1, Relaxed);
        self.bytes[i].fetch_add(bytes as u64, Relaxed);
    }

    pub fn dropped(&self, why: UdpDrop) {
        self.dropped[why as usize].fetch_add(1, Relaxed);
    }

    pub fn dropped_n(&self, why: UdpDrop, n: u64) {
        self.dropped[why as usize].fetch_add(n, Relaxed);
    }

    /// Dropped datagrams so far for `why` (for tests and the admin page).
    pub fn dropped_count(&self, why: UdpDrop) -> u64 {
        self.dropped[why as usize].load(Relaxed)
    }

    pub(super) fn render(&self, o: &mut String) {
        family(
            o,
            "sallyport_udp_associations",
            "gauge",
            "Datagram (SOCKS5 UDP) associations open now.",
        );
        let _ = writeln!(
            o,
            "sallyport_udp_associations {}",
            self.associations.load(Relaxed)
        );
        for (name, help, values) in [
            (
                "sallyport_udp_datagrams_total",
                "Datagrams carried, up (towards the service) and down.",
                &self.datagrams,
            ),
            (
                "sallyport_udp_bytes_total",
                "Datagram payload bytes carried, up and down.",
                &self.bytes,
            ),
        ] {
            family(o, name, "counter", help);
            for (i, dir) in ["up", "down"].iter().enumerate() {
                let _ = writeln!(
                    o,
                    "{name}{{direction=\"{dir}\"}} {}",
                    values[i].load(Relaxed)
                );
            }
        }
        family(
            o,
            "sallyport_udp_dropped_total",
            "counter",
            "Datagrams dropped, by reason (limits, rules, full queues).",
        );
        for r in UdpDrop::ALL {
            let _ = writeln!(
                o,
                "sallyport_udp_dropped_total{{reason=\"{}\"}} {}",
                r.as_str(),
                self.dropped[r as usize].load(Relaxed)
            );
        }
    }
}
