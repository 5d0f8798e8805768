//! Reading the Linux kernel's route notifications (`NETLINK_ROUTE` multicast: links, addresses,
//! routes) as [`Change`]s, from bytes: a pure function, so it is tested and fuzzed on any system
//! (`fuzz/fuzz_targets/netlink_route.rs`).
//!
//! Each datagram holds one or more messages: a 16-byte header (`nlmsghdr`: length, type, flags,
//! sequence, port, in the host's byte order), then the family header of the type (`ifinfomsg`,
//! `ifaddrmsg`, `rtmsg`), then attributes (`rtattr`: length, type, value, each padded to 4
//! bytes). A length that does not fit ends the reading there; nothing is trusted beyond the
//! bytes given, and at most [`MAX_CHANGES`] changes are read from one datagram.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Most changes read from one datagram (the kernel packs a few; more is a burst that the
/// debounce folds into one event anyway).
pub const MAX_CHANGES: usize = 64;

/// The multicast groups to join: links, IPv4 and IPv6 addresses and routes.
pub const GROUPS: u32 =
    RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_IFADDR | RTMGRP_IPV6_ROUTE;
const RTMGRP_LINK: u32 = 0x1;
const RTMGRP_IPV4_IFADDR: u32 = 0x10;
const RTMGRP_IPV4_ROUTE: u32 = 0x40;
const RTMGRP_IPV6_IFADDR: u32 = 0x100;
const RTMGRP_IPV6_ROUTE: u32 = 0x400;

const NLMSG_HDRLEN: usize = 16;
const NLMSG_DONE: u16 = 3;
const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_NEWADDR: u16 = 20;
const RTM_DELADDR: u16 = 21;
const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const IFLA_IFNAME: u16 = 3;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_F_TENTATIVE: u8 = 0x40;
const RTA_DST: u16 = 1;
const RTA_GATEWAY: u16 = 5;
const RTA_TABLE: u16 = 15;
const RT_TABLE_LOCAL: u32 = 255;
const RTN_UNICAST: u8 = 1;
const IFF_UP: u32 = 0x1;
const IFF_RUNNING: u32 = 0x40;
const IFF_LOWER_UP: u32 = 0x1_0000;
/// Longest interface name kept (the kernel's `IFNAMSIZ` is 16 with the NUL).
const MAX_NAME: usize = 15;

/// One change the kernel announced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Link {
        index: u32,
        name: Option<String>,
        /// Up and running (carrier) after the change.
        up: bool,
        /// The up/running/carrier flags changed (or the link is new or gone).
        flags_changed: bool,
        removed: bool,
    },
    Addr {
        index: u32,
        addr: IpAddr,
        prefix: u8,
        /// IPv6 duplicate address detection is still running: not usable yet.
        tentative: bool,
        removed: bool,
    },
    Route {
        /// `None`: the default route.
        dst: Option<(IpAddr, u8)>,
        via: Option<IpAddr>,
        table: u32,
        /// `RTN_*`: 1 unicast, 2 local, 3 broadcast, ...
        kind: u8,
        removed: bool,
    },
}

impl Change {
    /// Whether it can change the way out: links going up or down, usable addresses that are
    /// neither loopback nor link-local, unicast routes outside the local table. (Which one
    /// really did is decided later by comparing where we are; this only keeps the noise of
    /// container veths and IPv6 address detection out of the debounce.)
    pub fn matters(&self) -> bool {
        match self {
            Change::Link {
                flags_changed,
                removed,
                ..
            } => *flags_changed || *removed,
            Change::Addr {
                addr, tentative, ..
            } => !tentative && !addr.is_loopback() && !link_local(addr),
            Change::Route {
                dst, table, kind, ..
            } => {
                *table != RT_TABLE_LOCAL
                    && *kind == RTN_UNICAST
                    && !dst.is_some_and(|(a, _)| link_local(&a) || a.is_loopback())
            }
        }
    }
}

fn link_local(a: &IpAddr) -> bool {
    match a {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
    }
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = |removed: bool| if removed { "removed" } else { "added" };
        match self {
            Change::Link {
                index,
                name,
                up,
                removed,
                ..
            } => {
                match name {
                    Some(n) => write!(f, "link {n}")?,
                    None => write!(f, "link {index}")?,
                }
                if *removed {
                    f.write_str(" removed")
                } else if *up {
                    f.write_str(" up")
                } else {
                    f.write_str(" down")
                }
            }
            Change::Addr {
                index,
                addr,
                prefix,
                removed,
                ..
            } => write!(
                f,
                "address {addr}/{prefix} {} on link {index}",
                what(*removed)
            ),
            Change::Route {
                dst, via, removed, ..
            } => {
                match dst {
                    None => f.write_str("route default")?,
                    Some((a, len)) => write!(f, "route {a}/{len}")?,
                }
                if let Some(v) = via {
                    write!(f, " via {v}")?;
                }
                write!(f, " {}", what(*removed))
            }
        }
    }
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn align4(n: usize) -> usize {
    n.saturating_add(3) & !3
}

/// The attributes in `b`, as (type, value); stops at the first that does not fit.
fn attrs(b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut at = 0;
    std::iter::from_fn(move || {
        let len = u16_at(b, at)? as usize;
        let kind = u16_at(b, at + 2)? & 0x3fff; // without NLA_F_NESTED / NLA_F_NET_BYTEORDER
        if len < 4 || at + len > b.len() {
            return None;
        }
        let value = &b[at + 4..at + len];
        at += align4(len);
        Some((kind, value))
    })
}

fn ip(family: u8, v: &[u8]) -> Option<IpAddr> {
    match (family, v.len()) {
        (AF_INET, 4) => Some(IpAddr::V4(Ipv4Addr::new(v[0], v[1], v[2], v[3]))),
        (AF_INET6, 16) => {
            let a: [u8; 16] = v.try_into().ok()?;
            Some(IpAddr::V6(Ipv6Addr::from(a)))
        }
        _ => None,
    }
}

/// An interface name as the kernel gave it, cut at the NUL, printable ASCII only.
fn name(v: &[u8]) -> String {
    v.iter()
        .take_while(|&&c| c != 0)
        .take(MAX_NAME)
        .map(|&c| if c.is_ascii_graphic() { c as char } else { '?' })
        .collect()
}

/// Reads every change in one datagram from the route socket (at most [`MAX_CHANGES`]).
/// Messages of other types (errors, `NLMSG_DONE`, neighbour tables) are skipped; a message whose
/// length does not fit ends the reading.
pub fn parse(buf: &[u8]) -> Vec<Change> {
    let mut out = Vec::new();
    let mut at = 0;
    while out.len() < MAX_CHANGES {
        let Some(len) = u32_at(buf, at).map(|l| l as usize) else {
            break;
        };
        let Some(kind) = u16_at(buf, at + 4) else {
            break;
        };
        if len < NLMSG_HDRLEN || len > buf.len() - at || kind == NLMSG_DONE {
            break;
        }
        let body = &buf[at + NLMSG_HDRLEN..at + len];
        if let Some(c) = message(kind, body) {
            out.push(c);
        }
        at += align4(len);
    }
    out
}

fn message(kind: u16, b: &[u8]) -> Option<Change> {
    match kind {
        RTM_NEWLINK | RTM_DELLINK => {
            // ifinfomsg: family, pad, type (u16), index (i32), flags, change
            let index = u32_at(b, 4)?;
            let flags = u32_at(b, 8)?;
            let change = u32_at(b, 12)?;
            let mask = IFF_UP | IFF_RUNNING | IFF_LOWER_UP;
            let name = attrs(b.get(16..)?)
                .find(|(t, _)| *t == IFLA_IFNAME)
                .map(|(_, v)| name(v));
            Some(Change::Link {
                index,
                name,
                up: flags & (IFF_UP | IFF_RUNNING) == IFF_UP | IFF_RUNNING,
                flags_changed: change & mask != 0,
                removed: kind == RTM_DELLINK,
            })
        }
        RTM_NEWADDR | RTM_DELADDR => {
            // ifaddrmsg: family, prefixlen, flags, scope, index (u32)
            let family = *b.first()?;
            let prefix = *b.get(1)?;
            let flags = *b.get(2)?;
            let index = u32_at(b, 4)?;
            let mut found = None;
            for (t, v) in attrs(b.get(8..)?) {
                // IFA_LOCAL is our address on point-to-point links (IFA_ADDRESS the peer's).
                match t {
                    IFA_LOCAL => found = ip(family, v).or(found),
                    IFA_ADDRESS if found.is_none() => found = ip(family, v),
                    _ => {}
                }
            }
            Some(Change::Addr {
                index,
                addr: found?,
                prefix,
                tentative: flags & IFA_F_TENTATIVE != 0,
                removed: kind == RTM_DELADDR,
            })
        }
        RTM_NEWROUTE | RTM_DELROUTE => {
            // rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags (u32)
            let family = *b.first()?;
            let dst_len = *b.get(1)?;
            let mut table = u32::from(*b.get(4)?);
            let route_kind = *b.get(7)?;
            let (mut dst, mut via) = (None, None);
            for (t, v) in attrs(b.get(12..)?) {
                match t {
                    RTA_DST => dst = ip(family, v).map(|a| (a, dst_len)),
                    RTA_GATEWAY => via = ip(family, v),
                    RTA_TABLE if v.len() == 4 => table = u32_at(v, 0).unwrap_or(table),
                    _ => {}
                }
            }
            if family != AF_INET && family != AF_INET6 {
                return None;
            }
            Some(Change::Route {
                dst: if dst_len == 0 { None } else { dst },
                via,
                table,
                kind: route_kind,
                removed: kind == RTM_DELROUTE,
            })
        }
        _ => None,
    }
}

/// Encodes messages the way the kernel does (for tests and fuzz seeds): a header of `kind`,
/// then `fixed` (the family header) and the attributes.
pub fn encode(kind: u16, fixed: &[u8], attrs: &[(u16, &[u8])]) -> Vec<u8> {
    let mut body = fixed.to_vec();
    for (t, v) in attrs {
        let len = 4 + v.len();
        body.extend_from_slice(&(len as u16).to_ne_bytes());
        body.extend_from_slice(&t.to_ne_bytes());
        body.extend_from_slice(v);
        body.resize(align4(body.len()), 0);
    }
    let mut out = Vec::with_capacity(NLMSG_HDRLEN + body.len());
    out.extend_from_slice(&((NLMSG_HDRLEN + body.len()) as u32).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(&[0; 10]); // flags, sequence, port
    out.extend_from_slice(&body);
    out
}

/// Message types, for [`encode`].
pub mod kinds {
    pub const NEWLINK: u16 = super::RTM_NEWLINK;
    pub const DELLINK: u16 = super::RTM_DELLINK;
    pub const NEWADDR: u16 = super::RTM_NEWADDR;
    pub const DELADDR: u16 = super::RTM_DELADDR;
    pub const NEWROUTE: u16 = super::RTM_NEWROUTE;
    pub const DELROUTE: u16 = super::RTM_DELROUTE;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An `ifinfomsg` (family 0, type 1).
    fn ifinfo(index: u32, flags: u32, change: u32) -> Vec<u8> {
        let mut m = vec![0, 0, 1, 0];
        m.extend(index.to_ne_bytes());
        m.extend(flags.to_ne_bytes());
        m.extend(change.to_ne_bytes());
        m
    }

    fn new_default_route(via: [u8; 4]) -> Vec<u8> {
        // AF_INET, dst_len 0, src_len 0, tos 0, table main (254), proto boot, scope universe, unicast
        let rtmsg = [AF_INET, 0, 0, 0, 254, 3, 0, RTN_UNICAST, 0, 0, 0, 0];
        encode(
            RTM_NEWROUTE,
            &rtmsg,
            &[(RTA_GATEWAY, &via), (RTA_TABLE, &254u32.to_ne_bytes())],
        )
    }

    #[test]
    fn a_new_default_route_and_address_read_as_the_kernel_sends_them() {
        let mut buf = new_default_route([10, 77, 0, 1]);
        let ifaddr = [AF_INET, 24, 0, 0, 7, 0, 0, 0];
        buf.extend(encode(
            RTM_NEWADDR,
            &ifaddr,
            &[(IFA_ADDRESS, &[10, 77, 0, 2]), (IFA_LOCAL, &[10, 77, 0, 2])],
        ));
        let changes = parse(&buf);
        assert_eq!(changes.len(), 2, "{changes:?}");
        assert_eq!(changes[0].to_string(), "route default via 10.77.0.1 added");
        assert_eq!(
            changes[1].to_string(),
            "address 10.77.0.2/24 added on link 7"
        );
        assert!(changes.iter().all(Change::matters));
    }

    #[test]
    fn container_and_ipv6_detection_noise_does_not_count_as_a_network_change() {
        let v6_addr = |flags: u8, addr: [u8; 16]| {
            let mut ifaddr6 = vec![AF_INET6, 64, flags, 0];
            ifaddr6.extend(9u32.to_ne_bytes());
            encode(RTM_NEWADDR, &ifaddr6, &[(IFA_ADDRESS, &addr)])
        };
        let tentative = v6_addr(
            IFA_F_TENTATIVE,
            [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
        );
        let link_local = v6_addr(0, [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        let local_table = encode(
            RTM_NEWROUTE,
            &[AF_INET, 32, 0, 0, 255, 2, 254, 2, 0, 0, 0, 0],
            &[(RTA_DST, &[10, 0, 0, 1])],
        );
        // a link whose statistics or MTU changed, not its up/running flags
        let mtu = encode(
            RTM_NEWLINK,
            &ifinfo(4, IFF_UP | IFF_RUNNING, 0),
            &[(IFLA_IFNAME, b"veth1\0")],
        );
        for msg in [tentative, link_local, local_table, mtu] {
            let c = parse(&msg);
            assert_eq!(c.len(), 1);
            assert!(!c[0].matters(), "{}", c[0]);
        }
    }

    #[test]
    fn a_truncated_or_lying_length_ends_the_reading_without_a_panic() {
        let good = new_default_route([192, 168, 1, 1]);
        for cut in 0..good.len() {
            let _ = parse(&good[..cut]);
        }
        let mut lying = good.clone();
        lying[0..4].copy_from_slice(&1000u32.to_ne_bytes());
        assert!(parse(&lying).is_empty());
        let mut tiny = good.clone();
        tiny[0..4].copy_from_slice(&4u32.to_ne_bytes());
        assert!(parse(&tiny).is_empty());
        // an attribute claiming more than the message holds is not read
        let mut bad_attr = good;
        bad_attr[16 + 12..16 + 14].copy_from_slice(&200u16.to_ne_bytes());
        assert_eq!(parse(&bad_attr)[0].to_string(), "route default added");
    }

    #[test]
    fn a_hostile_interface_name_cannot_write_to_the_log() {
        let ifinfo = ifinfo(3, 0, IFF_UP);
        let msg = encode(
            RTM_NEWLINK,
            &ifinfo,
            &[(IFLA_IFNAME, b"a\nb\x1b[31mlong-long-long-name\0")],
        );
        let c = parse(&msg);
        assert_eq!(c[0].to_string(), "link a?b?[31mlong-lo down");
        assert!(c[0].matters());
    }
}
