//! Destinations: a host as an agent asked for it, normalised ([`Host`], [`parse_host`], which
//! refuses numeric tricks), and the patterns a connector serves ([`HostPattern`], [`PortRange`],
//! [`Route`]).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use ipnet::IpNet;
use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize, Serializer};

use super::{host_err, route_err, PolicyError};

// ---------------------------------------------------------------------------------------------
// Hosts
// ---------------------------------------------------------------------------------------------

/// A normalised destination host: a lowercase DNS name (no trailing dot) or an IP address.
///
/// IPv4-mapped IPv6 addresses (`::ffff:10.0.0.1`) are always stored as their IPv4 address, so that a
/// rule for `10.0.0.0/8` cannot be dodged by writing the address in its IPv6 form.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    Name(String),
    Ip(IpAddr),
}

impl fmt::Display for Host {
    /// Names and IPv4 print as-is; IPv6 prints without brackets (see [`fmt_dest`] for `host:port`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Name(n) => f.write_str(n),
            Host::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

/// Formats a destination as `host:port`, bracketing IPv6 (`[::1]:22`), for messages and logs.
pub fn fmt_dest(host: &Host, port: u16) -> String {
    match host {
        Host::Ip(IpAddr::V6(v6)) => format!("[{v6}]:{port}"),
        other => format!("{other}:{port}"),
    }
}

/// Folds an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) into its IPv4 form; other addresses unchanged.
/// An IPv4-mapped IPv6 network (`::ffff:10.0.0.0/104`) as the IPv4 network it means
/// (`10.0.0.0/8`): hosts are folded to IPv4 before matching, so the mapped form would match
/// nothing, and its text would not survive the trip to the DMZ in `ROUTES`.
pub fn canonical_net(net: IpNet) -> IpNet {
    if let IpNet::V6(v6) = net {
        if v6.prefix_len() >= 96 {
            if let Some(v4) = v6.addr().to_ipv4_mapped() {
                if let Ok(n) = ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96) {
                    return IpNet::V4(n.trunc());
                }
            }
        }
    }
    net
}

pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

/// Parses and normalises a destination host as an agent sent it.
///
/// Accepts a DNS name, a canonical dotted-decimal IPv4 address, or an IPv6 address (with or without
/// `[]`). Everything that a permissive resolver might reinterpret as an address is rejected.
pub fn parse_host(s: &str) -> Result<Host, PolicyError> {
    if s.is_empty() {
        return Err(host_err(s, "empty host"));
    }
    if !s.is_ascii() {
        return Err(host_err(
            s,
            "non-ASCII name; send the punycode (xn--) form instead",
        ));
    }
    let lower = s.to_ascii_lowercase();

    // Bracketed IPv6: `[::1]`.
    if let Some(inner) = lower.strip_prefix('[') {
        let inner = inner.strip_suffix(']').ok_or_else(|| {
            host_err(s, "unbalanced '[': expected an IPv6 address like [fd00::1]")
        })?;
        let v6: Ipv6Addr = inner
            .parse()
            .map_err(|_| host_err(s, "not a valid IPv6 address inside []"))?;
        return Ok(Host::Ip(canonical_ip(IpAddr::V6(v6))));
    }
    // Bare IPv6: any colon means it must be one (names never contain ':').
    if lower.contains(':') {
        let v6: Ipv6Addr = lower
            .parse()
            .map_err(|_| host_err(s, "not a valid IPv6 address"))?;
        return Ok(Host::Ip(canonical_ip(IpAddr::V6(v6))));
    }

    let name = lower.strip_suffix('.').unwrap_or(&lower);
    if name.is_empty() {
        return Err(host_err(s, "empty host"));
    }
    let labels: Vec<&str> = name.split('.').collect();

    // Something that looks numeric is either a canonical IPv4 address or refused outright.
    if labels
        .iter()
        .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit()))
    {
        return parse_canonical_ipv4(name)
            .map(|v4| Host::Ip(IpAddr::V4(v4)))
            .ok_or_else(|| {
                host_err(
                    s,
                    "numeric host that is not a canonical IPv4 address (write it as four decimal parts 0-255, no leading zeros)",
                )
            });
    }

    for label in &labels {
        if label.is_empty() {
            return Err(host_err(
                s,
                "empty label (two dots in a row, or a leading dot)",
            ));
        }
        if label.len() > 63 {
            return Err(host_err(s, "a label is longer than 63 characters"));
        }
        if let Some(bad) = label
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-' || *c == '_'))
        {
            return Err(host_err(
                s,
                format!("character {bad:?} is not allowed in a host name"),
            ));
        }
    }
    if name.len() > 253 {
        return Err(host_err(s, "name is longer than 253 characters"));
    }
    // No real top-level domain is numeric, but `inet_aton` happily reads `10.1.2`, `0x7f.1` or
    // `1.0x2.3.4` as addresses. Refuse a numeric-looking last label, or a name made only of
    // numeric-looking labels (decimal, octal `0…` or hex `0x…`).
    let last = labels[labels.len() - 1];
    if looks_numeric(last) || labels.iter().all(|l| looks_numeric(l)) {
        return Err(host_err(
            s,
            "looks like a numeric address in a non-standard form (hex, octal or shortened); use dotted decimal a.b.c.d",
        ));
    }
    Ok(Host::Name(name.to_string()))
}

/// True for labels `inet_aton` would read as a number: decimal digits, or `0x` followed by hex.
fn looks_numeric(label: &str) -> bool {
    if let Some(hex) = label.strip_prefix("0x") {
        return hex.bytes().all(|b| b.is_ascii_hexdigit());
    }
    !label.is_empty() && label.bytes().all(|b| b.is_ascii_digit())
}

/// Exactly four decimal parts, each 0-255, without leading zeros (`0` itself is fine).
fn parse_canonical_ipv4(s: &str) -> Option<Ipv4Addr> {
    let mut octets = [0u8; 4];
    let mut n = 0;
    for part in s.split('.') {
        if n == 4 || part.is_empty() || part.len() > 3 || (part.len() > 1 && part.starts_with('0'))
        {
            return None;
        }
        if !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        octets[n] = part.parse::<u8>().ok()?;
        n += 1;
    }
    (n == 4).then(|| Ipv4Addr::from(octets))
}

// ---------------------------------------------------------------------------------------------
// Patterns and routes
// ---------------------------------------------------------------------------------------------

/// The host half of a [`Route`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HostPattern {
    /// `*`: any name and any address.
    Any,
    /// An exact DNS name.
    Name(String),
    /// `*.internal`: strict subdomains of `internal` (stored without the `*.`), not `internal` itself.
    Suffix(String),
    /// An IP network (`10.20.0.0/16`), or a single address stored as /32 or /128.
    Net(IpNet),
}

impl HostPattern {
    /// Does this pattern match the (already normalised) host? The renewal destination
    /// (`tunnel::renew::HOST`) is matched only by a pattern naming it exactly: no wildcard
    /// reaches the issuer.
    pub fn matches(&self, host: &Host) -> bool {
        if let Host::Name(h) = host {
            if h == tunnel::renew::HOST {
                return matches!(self, HostPattern::Name(n) if n == h);
            }
        }
        match (self, host) {
            (HostPattern::Any, _) => true,
            (HostPattern::Name(n), Host::Name(h)) => n == h,
            (HostPattern::Suffix(s), Host::Name(h)) => is_strict_subdomain(h, s),
            (HostPattern::Net(net), Host::Ip(ip)) => net_contains(net, *ip),
            _ => false,
        }
    }

    /// Is every host matched by `other` also matched by `self`? Only the exact name covers the
    /// renewal destination (a `*:*` connector token cannot advertise it).
    pub fn covers(&self, other: &HostPattern) -> bool {
        if let HostPattern::Name(n) = other {
            if n == tunnel::renew::HOST {
                return self == other;
            }
        }
        match (self, other) {
            (HostPattern::Any, _) => true,
            (_, HostPattern::Any) => false,
            (HostPattern::Name(a), HostPattern::Name(b)) => a == b,
            (HostPattern::Suffix(s), HostPattern::Name(n)) => is_strict_subdomain(n, s),
            // `*.a.internal` is inside `*.internal`, and so is `*.internal` itself.
            (HostPattern::Suffix(s), HostPattern::Suffix(t)) => t == s || is_strict_subdomain(t, s),
            (HostPattern::Net(a), HostPattern::Net(b)) => a.contains(b),
            _ => false,
        }
    }
}

fn is_strict_subdomain(name: &str, suffix: &str) -> bool {
    name.len() > suffix.len() + 1
        && name.ends_with(suffix)
        && name.as_bytes()[name.len() - suffix.len() - 1] == b'.'
}

fn net_contains(net: &IpNet, ip: IpAddr) -> bool {
    net.contains(&canonical_ip(ip))
}

impl FromStr for HostPattern {
    type Err = PolicyError;

    fn from_str(s: &str) -> Result<Self, PolicyError> {
        if s == "*" {
            return Ok(HostPattern::Any);
        }
        if let Some(suffix) = s.strip_prefix("*.") {
            return match parse_host(suffix) {
                Ok(Host::Name(n)) => Ok(HostPattern::Suffix(n)),
                Ok(Host::Ip(_)) => Err(route_err(
                    s,
                    "'*.' must be followed by a domain name, not an address",
                )),
                Err(e) => Err(route_err(s, inner_why(&e))),
            };
        }
        if s.contains('*') {
            return Err(route_err(
                s,
                "'*' is only allowed alone or as a leading '*.' (like *.internal)",
            ));
        }
        let unbracketed = s
            .strip_prefix('[')
            .and_then(|x| x.strip_suffix(']'))
            .unwrap_or(s);
        if unbracketed.contains('/') {
            let net: IpNet = unbracketed.parse().map_err(|_| {
                route_err(
                    s,
                    "not a valid network (expected like 10.20.0.0/16 or [fd00::/8])",
                )
            })?;
            return Ok(HostPattern::Net(canonical_net(net.trunc())));
        }
        match parse_host(s).map_err(|e| route_err(s, inner_why(&e)))? {
            Host::Name(n) => Ok(HostPattern::Name(n)),
            Host::Ip(ip) => Ok(HostPattern::Net(IpNet::from(ip))),
        }
    }
}

pub(super) fn inner_why(e: &PolicyError) -> String {
    match e {
        PolicyError::Host { why, .. }
        | PolicyError::Route { why, .. }
        | PolicyError::Rule { why, .. } => why.clone(),
    }
}

impl fmt::Display for HostPattern {
    /// IPv6 networks print *without* brackets here; [`Route`]'s Display adds them.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Any => f.write_str("*"),
            HostPattern::Name(n) => f.write_str(n),
            HostPattern::Suffix(s) => write!(f, "*.{s}"),
            HostPattern::Net(net) if net.prefix_len() == net.max_prefix_len() => {
                write!(f, "{}", net.addr())
            }
            HostPattern::Net(net) => write!(f, "{net}"),
        }
    }
}

/// An inclusive port range. `*` means 1-65535 (port 0 is never a destination).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortRange {
    lo: u16,
    hi: u16,
}

impl PortRange {
    /// Every port.
    pub const ANY: PortRange = PortRange {
        lo: 1,
        hi: u16::MAX,
    };

    /// A range `lo..=hi`; `None` if it is empty or includes port 0.
    pub fn new(lo: u16, hi: u16) -> Option<PortRange> {
        (lo >= 1 && lo <= hi).then_some(PortRange { lo, hi })
    }
    pub fn lo(&self) -> u16 {
        self.lo
    }
    pub fn hi(&self) -> u16 {
        self.hi
    }
    pub fn contains(&self, port: u16) -> bool {
        self.lo <= port && port <= self.hi
    }
    pub fn covers(&self, other: &PortRange) -> bool {
        self.lo <= other.lo && other.hi <= self.hi
    }
}

impl FromStr for PortRange {
    type Err = PolicyError;

    fn from_str(s: &str) -> Result<Self, PolicyError> {
        if s == "*" {
            return Ok(PortRange::ANY);
        }
        let port = |p: &str| -> Result<u16, PolicyError> {
            match p.parse::<u16>() {
                Ok(0) => Err(route_err(s, "port 0 is not a destination")),
                Ok(n) if p.bytes().all(|b| b.is_ascii_digit()) => Ok(n),
                _ => Err(route_err(
                    s,
                    format!("{p:?} is not a port number 1-65535 (or use * for any port)"),
                )),
            }
        };
        let (lo, hi) = match s.split_once('-') {
            Some((a, b)) => (port(a)?, port(b)?),
            None => {
                let p = port(s)?;
                (p, p)
            }
        };
        PortRange::new(lo, hi)
            .ok_or_else(|| route_err(s, "port range is backwards (write low-high)"))
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if *self == PortRange::ANY {
            f.write_str("*")
        } else if self.lo == self.hi {
            write!(f, "{}", self.lo)
        } else {
            write!(f, "{}-{}", self.lo, self.hi)
        }
    }
}

/// A destination pattern: `host-pattern:ports`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Route {
    pub host: HostPattern,
    pub ports: PortRange,
}

impl Route {
    /// Does this route match the destination `host:port`?
    pub fn matches(&self, host: &Host, port: u16) -> bool {
        self.ports.contains(port) && self.host.matches(host)
    }

    /// Is every destination that `other` matches also matched by `self`?
    pub fn covers(&self, other: &Route) -> bool {
        self.ports.covers(&other.ports) && self.host.covers(&other.host)
    }
}

impl FromStr for Route {
    type Err = PolicyError;

    fn from_str(s: &str) -> Result<Self, PolicyError> {
        let (host, ports) = if s.starts_with('[') {
            let close = s
                .find(']')
                .ok_or_else(|| route_err(s, "unbalanced '[' (expected like [fd00::/8]:22)"))?;
            let rest = &s[close + 1..];
            let ports = rest
                .strip_prefix(':')
                .ok_or_else(|| route_err(s, "missing :port after ']' (use :* for any port)"))?;
            (&s[..=close], ports)
        } else {
            let (host, ports) = s
                .rsplit_once(':')
                .ok_or_else(|| route_err(s, "missing :port (use :* for any port)"))?;
            if host.contains(':') {
                return Err(route_err(
                    s,
                    "IPv6 addresses need brackets, like [fd00::/8]:22",
                ));
            }
            (host, ports)
        };
        if host.is_empty() {
            return Err(route_err(s, "missing host (use * for any host)"));
        }
        let host: HostPattern = host.parse().map_err(|e| route_err(s, inner_why(&e)))?;
        let ports: PortRange = ports.parse().map_err(|e| route_err(s, inner_why(&e)))?;
        Ok(Route { host, ports })
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            HostPattern::Net(IpNet::V6(_)) => write!(f, "[{}]:{}", self.host, self.ports),
            other => write!(f, "{}:{}", other, self.ports),
        }
    }
}

impl Serialize for Route {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Route {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(de::Error::custom)
    }
}
