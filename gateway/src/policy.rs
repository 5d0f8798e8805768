//! Allow-lists: which destinations a connector will dial, and for whom.
//!
//! The connector is the last guard before the trusted network, so this module is deliberately strict
//! and entirely pure logic (the one exception is [`local_addresses`], which asks the OS for this
//! machine's interface addresses).
//!
//! The pieces, from the bottom up:
//!
//! * [`parse_host`] turns whatever an agent asked for into a [`Host`]: a normalised DNS name or an IP
//!   address. It rejects the numeric tricks that some resolvers (`inet_aton`) would quietly turn into
//!   addresses — `167772161`, `0x7f.1`, `0177.0.0.1`, `127.1` — so that a name-based rule can never be
//!   sidestepped by spelling an address as a "name".
//! * [`Route`] is a destination pattern: a [`HostPattern`] plus a [`PortRange`], written like
//!   `db.internal:5432`, `*.internal:22`, `10.20.0.0/16:443`, `[fd00::/8]:22` or `*:*`.
//! * [`Rule`] is a route plus optional `users=`/`groups=` constraints.
//! * [`Policy`] is the allow-list. [`Policy::check`] is asked before resolving a name and
//!   [`Policy::check_resolved`] for every address the name resolved to: loopback, link-local,
//!   cloud metadata ([`CLOUD_METADATA`]), unspecified, multicast, broadcast and the connector's
//!   own addresses are refused unless a rule
//!   lists them explicitly as a network (`127.0.0.1/32:8080`), so that `*.internal:*` does not
//!   accidentally open the connector's own admin ports to anyone who controls an internal DNS record.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// A pattern, host or rule that could not be parsed. Each message names the offending text and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// A destination host name or address.
    #[error("invalid host {input:?}: {why}")]
    Host { input: String, why: String },
    /// A route pattern such as `db.internal:5432`.
    #[error("invalid route {input:?}: {why}")]
    Route { input: String, why: String },
    /// A rule such as `db.internal:5432 users=alice groups=dba`.
    #[error("invalid rule {input:?}: {why}")]
    Rule { input: String, why: String },
}

fn host_err(input: &str, why: impl Into<String>) -> PolicyError {
    PolicyError::Host {
        input: input.to_string(),
        why: why.into(),
    }
}
fn route_err(input: &str, why: impl Into<String>) -> PolicyError {
    PolicyError::Route {
        input: input.to_string(),
        why: why.into(),
    }
}
fn rule_err(input: &str, why: impl Into<String>) -> PolicyError {
    PolicyError::Rule {
        input: input.to_string(),
        why: why.into(),
    }
}

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
    /// Does this pattern match the (already normalised) host?
    pub fn matches(&self, host: &Host) -> bool {
        match (self, host) {
            (HostPattern::Any, _) => true,
            (HostPattern::Name(n), Host::Name(h)) => n == h,
            (HostPattern::Suffix(s), Host::Name(h)) => is_strict_subdomain(h, s),
            (HostPattern::Net(net), Host::Ip(ip)) => net_contains(net, *ip),
            _ => false,
        }
    }

    /// Is every host matched by `other` also matched by `self`?
    pub fn covers(&self, other: &HostPattern) -> bool {
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

fn inner_why(e: &PolicyError) -> String {
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

// ---------------------------------------------------------------------------------------------
// Rules
// ---------------------------------------------------------------------------------------------

/// One allow-list entry: a route, optionally restricted to some users and/or groups.
/// Empty `users` and `groups` means everyone; otherwise a caller must be listed in either.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub route: Route,
    pub users: Vec<String>,
    pub groups: Vec<String>,
}

impl Rule {
    /// A rule for everyone.
    pub fn everyone(route: Route) -> Rule {
        Rule {
            route,
            users: Vec::new(),
            groups: Vec::new(),
        }
    }

    /// Does this rule apply to the caller (ignoring the destination)?
    pub fn applies_to(&self, who: &Who) -> bool {
        (self.users.is_empty() && self.groups.is_empty())
            || self.users.iter().any(|u| u == who.user)
            || self.groups.iter().any(|g| who.groups.contains(g))
    }
}

impl FromStr for Rule {
    type Err = PolicyError;

    /// `db.internal:5432` or `db.internal:5432 users=alice,bob groups=dba`.
    fn from_str(s: &str) -> Result<Self, PolicyError> {
        let mut words = s.split_whitespace();
        let route = words.next().ok_or_else(|| rule_err(s, "empty rule"))?;
        let route: Route = route.parse().map_err(|e| rule_err(s, inner_why(&e)))?;
        let (mut users, mut groups) = (None, None);
        for word in words {
            let (key, value) = word.split_once('=').ok_or_else(|| {
                rule_err(s, format!("{word:?} should be users=a,b or groups=c,d"))
            })?;
            let slot = match key {
                "users" => &mut users,
                "groups" => &mut groups,
                _ => {
                    return Err(rule_err(
                        s,
                        format!("unknown key {key:?} (expected users= or groups=)"),
                    ))
                }
            };
            if slot.is_some() {
                return Err(rule_err(
                    s,
                    format!("{key}= given twice; list all names in one comma-separated value"),
                ));
            }
            *slot = Some(split_names(value).map_err(|why| rule_err(s, format!("{key}=: {why}")))?);
        }
        Ok(Rule {
            route,
            users: users.unwrap_or_default(),
            groups: groups.unwrap_or_default(),
        })
    }
}

fn split_names(value: &str) -> Result<Vec<String>, String> {
    value
        .split(',')
        .map(|n| {
            if n.is_empty() {
                Err("empty name in list".to_string())
            } else {
                Ok(n.to_string())
            }
        })
        .collect()
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.route)?;
        if !self.users.is_empty() {
            write!(f, " users={}", self.users.join(","))?;
        }
        if !self.groups.is_empty() {
            write!(f, " groups={}", self.groups.join(","))?;
        }
        Ok(())
    }
}

/// The table form of a rule in TOML: `{ route = "...", users = [...], groups = [...] }`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleTable {
    route: Route,
    #[serde(default)]
    users: Vec<String>,
    #[serde(default)]
    groups: Vec<String>,
}

impl<'de> Deserialize<'de> for Rule {
    /// Accepts the flag string or the table form. (A hand-written visitor rather than
    /// `#[serde(untagged)]`, so that errors say what was wrong instead of "did not match any variant".)
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct RuleVisitor;
        impl<'de> Visitor<'de> for RuleVisitor {
            type Value = Rule;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(r#"a rule like "db.internal:5432 users=alice" or { route = "...", users = [...], groups = [...] }"#)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Rule, E> {
                v.parse().map_err(E::custom)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Rule, A::Error> {
                let t = RuleTable::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(Rule {
                    route: t.route,
                    users: t.users,
                    groups: t.groups,
                })
            }
        }
        d.deserialize_any(RuleVisitor)
    }
}

// ---------------------------------------------------------------------------------------------
// Policy
// ---------------------------------------------------------------------------------------------

/// The identity the DMZ stamped into the stream (never what the agent claimed).
#[derive(Debug, Clone, Copy)]
pub struct Who<'a> {
    pub user: &'a str,
    pub groups: &'a [String],
}

/// A refused destination, with a one-line reason fit for the log and for the agent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct Denied {
    pub reason: String,
}

/// Cloud instance-metadata and platform endpoints, which hand out the machine's cloud
/// credentials to whoever asks: 169.254.169.254 (AWS, GCP, Azure, OpenStack, Oracle),
/// fd00:ec2::254 (AWS over IPv6), 168.63.129.16 (Azure's wireserver) and 100.100.100.200
/// (Alibaba Cloud). Refused unless a rule names the address itself (`168.63.129.16/32:80`): a
/// wider network that happens to contain one (`[fd00::/8]:*`) does not open it.
pub const CLOUD_METADATA: [IpAddr; 4] = [
    IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254)),
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)),
    IpAddr::V4(Ipv4Addr::new(168, 63, 129, 16)),
    IpAddr::V4(Ipv4Addr::new(100, 100, 100, 200)),
];

/// How long the connector's own addresses are trusted before they are read again: an address
/// added later (a new interface, a VPN, a DHCP change) is refused within this.
pub const OWN_ADDRESSES_TTL: Duration = Duration::from_secs(5);

/// The connector's allow-list.
#[derive(Debug, Clone)]
pub struct Policy {
    rules: Vec<Rule>,
    own_addrs: OwnAddrs,
}

/// This connector's own addresses: a fixed list, or read from the machine again when older
/// than a time to live, on the first check that needs them.
#[derive(Clone)]
struct OwnAddrs {
    read: Arc<dyn Fn() -> Vec<IpAddr> + Send + Sync>,
    ttl: Duration,
    cache: Arc<Mutex<Option<Snapshot>>>,
}

/// The own addresses as read at an instant.
type Snapshot = (Instant, Arc<Vec<IpAddr>>);

impl OwnAddrs {
    fn get(&self) -> Arc<Vec<IpAddr>> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, list)) = cache.as_ref() {
            if at.elapsed() < self.ttl {
                return list.clone();
            }
        }
        let list: Arc<Vec<IpAddr>> =
            Arc::new((self.read)().into_iter().map(canonical_ip).collect());
        *cache = Some((Instant::now(), list.clone()));
        list
    }
}

impl fmt::Debug for OwnAddrs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OwnAddrs").field("ttl", &self.ttl).finish()
    }
}

impl Policy {
    /// `own_addrs` are this connector's own addresses, fixed; they are refused as destinations
    /// unless a rule lists them as a network. A connector uses [`Policy::with_local_addresses`].
    pub fn new(rules: Vec<Rule>, own_addrs: Vec<IpAddr>) -> Policy {
        Policy::with_own_addresses(rules, move || own_addrs.clone(), Duration::MAX)
    }

    /// A policy refusing this machine's interface addresses ([`local_addresses`]), read again
    /// when older than [`OWN_ADDRESSES_TTL`].
    pub fn with_local_addresses(rules: Vec<Rule>) -> Policy {
        Policy::with_own_addresses(rules, local_addresses, OWN_ADDRESSES_TTL)
    }

    /// A policy whose own addresses come from `read`, called again when its answer is older
    /// than `ttl`.
    pub fn with_own_addresses(
        rules: Vec<Rule>,
        read: impl Fn() -> Vec<IpAddr> + Send + Sync + 'static,
        ttl: Duration,
    ) -> Policy {
        Policy {
            rules,
            own_addrs: OwnAddrs {
                read: Arc::new(read),
                ttl,
                cache: Arc::new(Mutex::new(None)),
            },
        }
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Is `host:port` allowed for `who`, before any name resolution? An IP literal must be inside a
    /// rule's network (or `*`), and special addresses (loopback, …) need a network rule naming them.
    pub fn check(&self, host: &Host, port: u16, who: &Who) -> Result<(), Denied> {
        let host = match host {
            Host::Ip(ip) => Host::Ip(canonical_ip(*ip)),
            name => name.clone(),
        };
        let dest = fmt_dest(&host, port);
        let mut dest_listed = false;
        let mut allowed = false;
        for rule in self.rules.iter().filter(|r| r.route.matches(&host, port)) {
            dest_listed = true;
            if rule.applies_to(who) {
                allowed = true;
                break;
            }
        }
        if !allowed {
            let reason = if dest_listed {
                format!("{dest} is not allowed for user {}", who.user)
            } else {
                format!("{dest} is not in the allow-list")
            };
            return Err(Denied { reason });
        }
        if let Host::Ip(ip) = host {
            self.check_special(&dest, None, ip, port, who)?;
        }
        Ok(())
    }

    /// Like [`check`](Self::check), and also checks one address that `host` resolved to (call it for
    /// every address before dialing). Special addresses are refused unless explicitly listed.
    pub fn check_resolved(
        &self,
        host: &Host,
        port: u16,
        who: &Who,
        addr: IpAddr,
    ) -> Result<(), Denied> {
        self.check(host, port, who)?;
        let dest = fmt_dest(host, port);
        self.check_special(&dest, Some(host), canonical_ip(addr), port, who)
    }

    /// Refuses loopback, link-local, cloud metadata, unspecified, multicast, broadcast and own
    /// addresses unless a rule
    /// applying to `who` and `port` lists a network containing `ip`.
    fn check_special(
        &self,
        dest: &str,
        name: Option<&Host>,
        ip: IpAddr,
        port: u16,
        who: &Who,
    ) -> Result<(), Denied> {
        let Some(kind) = self.special_kind(ip) else {
            return Ok(());
        };
        let only_itself = CLOUD_METADATA.contains(&ip);
        let explicitly_listed = self.rules.iter().any(|r| {
            matches!(&r.route.host, HostPattern::Net(net)
                if net.contains(&ip) && (!only_itself || net.prefix_len() == net.max_prefix_len()))
                && r.route.ports.contains(port)
                && r.applies_to(who)
        });
        if explicitly_listed {
            return Ok(());
        }
        // The rule that would list it, for the admin (`--allow 127.0.0.1/32:23080`).
        let rule = match ip {
            IpAddr::V4(v4) => format!("{v4}/32:{port}"),
            IpAddr::V6(v6) => format!("[{v6}/128]:{port}"),
        };
        let reason = match name {
            Some(h @ Host::Name(_)) => format!(
                "{h} resolved to {ip}, {kind}, which no rule lists (to allow it, add the connector rule --allow '{rule}')"
            ),
            _ => format!(
                "{dest} is {kind}, which no rule lists (to allow it, add the connector rule --allow '{rule}')"
            ),
        };
        Err(Denied { reason })
    }

    fn special_kind(&self, ip: IpAddr) -> Option<&'static str> {
        let kind = match ip {
            _ if CLOUD_METADATA.contains(&ip) => "a cloud metadata address",
            IpAddr::V4(v4) if v4.is_loopback() => "a loopback address",
            IpAddr::V4(v4) if v4.is_link_local() => "a link-local address",
            // Linux dials 0.0.0.0 (and 0/8) as "this host".
            IpAddr::V4(v4) if v4.octets()[0] == 0 => "an unspecified address",
            IpAddr::V4(v4) if v4.is_multicast() => "a multicast address",
            IpAddr::V4(v4) if v4.is_broadcast() => "the broadcast address",
            IpAddr::V6(v6) if v6.is_loopback() => "a loopback address",
            IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80 => "a link-local address",
            IpAddr::V6(v6) if v6.is_unspecified() => "an unspecified address",
            IpAddr::V6(v6) if v6.is_multicast() => "a multicast address",
            _ if self.own_addrs.get().contains(&ip) => "one of this connector's own addresses",
            _ => return None,
        };
        Some(kind)
    }
}

/// All interface addresses of this machine (IPv4-mapped addresses folded to IPv4). On error, logs one
/// warning and returns an empty list (loopback and the other special ranges are refused regardless).
pub fn local_addresses() -> Vec<IpAddr> {
    match if_addrs::get_if_addrs() {
        Ok(ifaces) => {
            let mut addrs: Vec<IpAddr> = ifaces.iter().map(|i| canonical_ip(i.ip())).collect();
            addrs.sort();
            addrs.dedup();
            addrs
        }
        Err(e) => {
            // Read again every few seconds: say it once, not each time.
            static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
            if !SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
                tracing::warn!("could not list this machine's interface addresses ({e}); only special ranges are refused");
            }
            Vec::new()
        }
    }
}

#[cfg(test)]
mod mapped_tests {
    use super::*;

    /// Found by the `policy_parse` fuzz target: `[::ffff:10.0.0.1/128]:22` printed as
    /// `[::ffff:10.0.0.1]:22`, which parses back as 10.0.0.1/32.
    #[test]
    fn ipv4_mapped_networks_read_as_ipv4_and_round_trip() {
        let r: Route = "[::ffff:10.0.0.1/128]:22".parse().unwrap();
        assert_eq!(r.to_string(), "10.0.0.1:22");
        assert_eq!(r.to_string().parse::<Route>().unwrap(), r);
        let r: Route = "[::ffff:10.0.0.0/104]:22".parse().unwrap();
        assert_eq!(r.to_string(), "10.0.0.0/8:22");
        assert!(r.matches(&parse_host("10.1.2.3").unwrap(), 22));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> Host {
        Host::Name(s.to_string())
    }
    fn ip(s: &str) -> Host {
        Host::Ip(s.parse().unwrap())
    }
    fn route(s: &str) -> Route {
        s.parse().unwrap()
    }
    fn rules(list: &[&str]) -> Vec<Rule> {
        list.iter().map(|r| r.parse().unwrap()).collect()
    }
    const NO_GROUPS: &[String] = &[];
    fn alice() -> Who<'static> {
        Who {
            user: "alice",
            groups: NO_GROUPS,
        }
    }

    #[test]
    fn parse_host_normalises_case_trailing_dot_and_brackets() {
        assert_eq!(parse_host("DB.Internal.").unwrap(), name("db.internal"));
        assert_eq!(parse_host("[FD00::1]").unwrap(), ip("fd00::1"));
        assert_eq!(parse_host("fd00::1").unwrap(), ip("fd00::1"));
        assert_eq!(parse_host("10.1.2.3").unwrap(), ip("10.1.2.3"));
        assert_eq!(
            parse_host("my_host-1.corp").unwrap(),
            name("my_host-1.corp")
        );
    }

    #[test]
    fn parse_host_folds_ipv4_mapped_ipv6_to_ipv4() {
        assert_eq!(parse_host("::ffff:127.0.0.1").unwrap(), ip("127.0.0.1"));
        assert_eq!(parse_host("[::ffff:7f00:1]").unwrap(), ip("127.0.0.1"));
    }

    #[test]
    fn parse_host_rejects_numeric_tricks() {
        for trick in [
            "167772161",
            "0x7f.1",
            "0177.0.0.1",
            "127.1",
            "10.1.2",
            "0x7f000001",
            "1.2.3.4.5",
            "256.1.1.1",
            "127.0.0.01",
            "0x7f.0x0.0x0.0x1",
            "foo.123",
            "a.0x10",
            "1.2.3.4.",
        ] {
            let r = parse_host(trick);
            // "1.2.3.4." is the one legitimate spelling here (trailing dot stripped).
            if trick == "1.2.3.4." {
                assert_eq!(r.unwrap(), ip("1.2.3.4"));
            } else {
                assert!(r.is_err(), "{trick} should be rejected, got {r:?}");
            }
        }
    }

    #[test]
    fn parse_host_rejects_bad_names_with_a_reason() {
        for bad in [
            "",
            ".",
            "a..b",
            ".a",
            "a b",
            "a/b",
            "[::1",
            "fe80::1%eth0",
            "x:y",
            "bücher.de",
        ] {
            assert!(parse_host(bad).is_err(), "{bad:?} should be rejected");
        }
        assert!(parse_host(&"a".repeat(64)).is_err());
        assert!(parse_host(&"a".repeat(63)).is_ok());
        let long = vec!["abcdefghi"; 26].join("."); // 259 chars
        assert!(parse_host(&long).is_err());
        let err = parse_host("bücher.de").unwrap_err().to_string();
        assert!(err.contains("punycode"), "{err}");
    }

    #[test]
    fn routes_round_trip_through_display() {
        for r in [
            "db.internal:5432",
            "*.internal:22",
            "10.20.0.0/16:443",
            "10.1.2.3:80",
            "[fd00::/8]:22",
            "[::1]:22",
            "*.corp.example:*",
            "host:1-1024",
            "*:*",
        ] {
            assert_eq!(route(r).to_string(), r);
        }
        assert_eq!(route("10.20.1.2/16:443").to_string(), "10.20.0.0/16:443");
        assert_eq!(route("DB.Internal.:5432").to_string(), "db.internal:5432");
    }

    #[test]
    fn bad_routes_name_the_pattern_and_the_reason() {
        for (bad, why) in [
            ("db.internal", "missing :port"),
            ("::1:22", "brackets"),
            ("db.internal:0", "port 0"),
            ("db.internal:70000", "not a port"),
            ("db.internal:100-10", "backwards"),
            ("db*.internal:22", "'*'"),
            ("*.10.0.0.1:22", "address"),
            ("10.0.0.0/33:22", "network"),
            (":22", "missing host"),
            ("[fd00::/8]22", "missing :port"),
        ] {
            let err = bad.parse::<Route>().unwrap_err().to_string();
            assert!(err.contains(bad) && err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn route_matching_respects_kind_and_ports() {
        assert!(route("db.internal:5432").matches(&name("db.internal"), 5432));
        assert!(!route("db.internal:5432").matches(&name("db.internal"), 5433));
        assert!(route("*.internal:22").matches(&name("a.b.internal"), 22));
        assert!(!route("*.internal:22").matches(&name("internal"), 22));
        assert!(!route("*.internal:22").matches(&name("evilinternal"), 22));
        assert!(route("10.20.0.0/16:443").matches(&ip("10.20.9.9"), 443));
        assert!(route("10.20.0.0/16:443").matches(&ip("::ffff:10.20.9.9"), 443));
        assert!(!route("10.20.0.0/16:443").matches(&name("10-20-9-9.internal"), 443));
        assert!(!route("*.internal:*").matches(&ip("10.0.0.1"), 22));
        assert!(
            route("*:*").matches(&ip("10.0.0.1"), 1) && route("*:*").matches(&name("x.y"), 65535)
        );
        assert!(route("host:1-1024").matches(&name("host"), 1024));
    }

    #[test]
    fn covers_only_when_every_destination_is_included() {
        assert!(route("*:*").covers(&route("db.internal:5432")));
        assert!(route("*.internal:*").covers(&route("db.internal:5432")));
        assert!(route("*.internal:*").covers(&route("*.a.internal:22")));
        assert!(route("*.internal:22").covers(&route("*.internal:22")));
        assert!(!route("*.internal:22").covers(&route("internal:22")));
        assert!(!route("*.a.internal:22").covers(&route("*.internal:22")));
        assert!(!route("db.internal:5432").covers(&route("db.internal:5432-5433")));
        assert!(route("10.0.0.0/8:443").covers(&route("10.20.0.0/16:443")));
        assert!(!route("10.20.0.0/16:443").covers(&route("10.0.0.0/8:443")));
        assert!(!route("*.internal:*").covers(&route("*:22")));
        assert!(!route("*.internal:*").covers(&route("10.0.0.1:22")));
        assert!(!route("[fd00::/8]:*").covers(&route("10.0.0.1:22")));
    }

    #[test]
    fn rules_parse_from_flag_syntax_with_optional_identities() {
        let r: Rule = "db.internal:5432 users=alice,bob groups=dba"
            .parse()
            .unwrap();
        assert_eq!(r.users, ["alice", "bob"]);
        assert_eq!(r.groups, ["dba"]);
        assert_eq!(r.to_string(), "db.internal:5432 users=alice,bob groups=dba");
        let r: Rule = "db.internal:5432".parse().unwrap();
        assert!(r.users.is_empty() && r.groups.is_empty());
        for bad in [
            "",
            "db.internal:5432 user=alice",
            "db.internal:5432 users=",
            "db.internal:5432 users=a users=b",
            "x:1 alice",
        ] {
            assert!(bad.parse::<Rule>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn rules_deserialize_from_toml_string_or_table() {
        #[derive(Deserialize)]
        struct Cfg {
            allow: Vec<Rule>,
        }
        let cfg: Cfg = toml::from_str(
            r#"allow = ["db.internal:5432 groups=dba", { route = "*.internal:22", users = ["alice"] }]"#,
        )
        .unwrap();
        assert_eq!(cfg.allow[0].groups, ["dba"]);
        assert_eq!(cfg.allow[1].route, route("*.internal:22"));
        assert_eq!(cfg.allow[1].users, ["alice"]);
        let err = toml::from_str::<Cfg>(r#"allow = [{ route = "x:1", user = ["a"] }]"#)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("user"), "{err}");
        let err = toml::from_str::<Cfg>(r#"allow = ["x"]"#)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("missing :port"), "{err}");
    }

    #[test]
    fn check_allows_listed_destinations_and_explains_refusals() {
        let p = Policy::new(
            rules(&[
                "db.internal:5432 groups=dba",
                "*.internal:22",
                "10.20.0.0/16:443",
            ]),
            vec![],
        );
        let dba = vec!["dba".to_string()];
        let bob = Who {
            user: "bob",
            groups: &dba,
        };
        assert!(p.check(&name("db.internal"), 5432, &bob).is_ok());
        assert_eq!(
            p.check(&name("db.internal"), 5432, &alice())
                .unwrap_err()
                .reason,
            "db.internal:5432 is not allowed for user alice"
        );
        assert_eq!(
            p.check(&name("db.internal"), 5433, &bob)
                .unwrap_err()
                .reason,
            "db.internal:5433 is not in the allow-list"
        );
        assert!(p.check(&name("git.internal"), 22, &alice()).is_ok());
        assert!(p.check(&ip("10.20.1.1"), 443, &alice()).is_ok());
        // An IP literal needs a network rule; a name pattern never matches it.
        assert!(p.check(&ip("10.30.1.1"), 22, &alice()).is_err());
    }

    #[test]
    fn resolved_special_addresses_are_denied_unless_a_network_rule_lists_them() {
        let own: IpAddr = "10.9.9.9".parse().unwrap();
        let p = Policy::new(rules(&["*.internal:*", "*:*"]), vec![own]);
        let h = name("app.internal");
        for (addr, kind) in [
            ("127.0.0.1", "loopback"),
            ("::1", "loopback"),
            ("::ffff:127.0.0.1", "loopback"),
            ("169.254.169.1", "link-local"),
            ("fe80::1", "link-local"),
            ("0.0.0.0", "unspecified"),
            ("::", "unspecified"),
            ("224.0.0.1", "multicast"),
            ("ff02::1", "multicast"),
            ("255.255.255.255", "broadcast"),
            ("10.9.9.9", "own"),
        ] {
            let err = p
                .check_resolved(&h, 80, &alice(), addr.parse().unwrap())
                .unwrap_err()
                .reason;
            assert!(
                err.contains(kind) && err.starts_with("app.internal resolved to"),
                "{addr}: {err}"
            );
        }
        assert_eq!(
            p.check_resolved(&h, 80, &alice(), "127.0.0.1".parse().unwrap())
                .unwrap_err()
                .reason,
            "app.internal resolved to 127.0.0.1, a loopback address, which no rule lists (to allow it, add the connector rule --allow '127.0.0.1/32:80')"
        );
        assert!(p
            .check_resolved(&h, 80, &alice(), "10.1.1.1".parse().unwrap())
            .is_ok());
        // `*:*` matches an IP literal but does not name loopback explicitly.
        assert!(p.check(&ip("127.0.0.1"), 80, &alice()).is_err());
    }

    #[test]
    fn cloud_metadata_addresses_are_refused_unless_a_rule_lists_them() {
        let p = Policy::new(
            rules(&["*.internal:*", "*:*", "10.0.0.0/8:*", "[fd00::/16]:*"]),
            vec![],
        );
        let h = name("app.internal");
        for addr in [
            "169.254.169.254",
            "::ffff:169.254.169.254",
            "fd00:ec2::254",
            "168.63.129.16",
            "::ffff:168.63.129.16",
            "100.100.100.200",
            "::ffff:100.100.100.200",
        ] {
            let a: IpAddr = addr.parse().unwrap();
            let err = p.check_resolved(&h, 80, &alice(), a).unwrap_err().reason;
            assert!(
                err.contains(", a cloud metadata address, which no rule lists"),
                "{addr}: {err}"
            );
            // As an IP literal too, even though `*:*` (and the wider fd00::/16) match it.
            let err = p.check(&ip(addr), 80, &alice()).unwrap_err().reason;
            assert!(err.contains("cloud metadata"), "{addr}: {err}");
        }
        // A neighbour of one is an ordinary address.
        assert!(p
            .check_resolved(&h, 80, &alice(), "168.63.129.17".parse().unwrap())
            .is_ok());
        // A rule naming it as a network lets it through, for that port.
        let p = Policy::new(rules(&["*.internal:*", "168.63.129.16/32:80"]), vec![]);
        let wire: IpAddr = "168.63.129.16".parse().unwrap();
        assert!(p.check_resolved(&h, 80, &alice(), wire).is_ok());
        assert!(p.check_resolved(&h, 443, &alice(), wire).is_err());
    }

    #[test]
    fn explicit_network_rules_allow_local_services_for_that_port_and_identity() {
        let p = Policy::new(
            rules(&["*.internal:*", "127.0.0.1/32:8080 users=alice"]),
            vec![],
        );
        let h = name("app.internal");
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        assert!(p.check_resolved(&h, 8080, &alice(), lo).is_ok());
        assert!(p
            .check_resolved(&h, 8080, &alice(), "::ffff:127.0.0.1".parse().unwrap())
            .is_ok());
        assert!(p.check_resolved(&h, 8081, &alice(), lo).is_err());
        assert!(p
            .check_resolved(
                &h,
                8080,
                &Who {
                    user: "bob",
                    groups: NO_GROUPS
                },
                lo
            )
            .is_err());
        assert!(p.check(&ip("127.0.0.1"), 8080, &alice()).is_ok());
        let p = Policy::new(rules(&["127.0.0.0/8:*"]), vec![]);
        assert!(p
            .check_resolved(&ip("127.0.0.1"), 5432, &alice(), lo)
            .is_ok());
    }

    #[test]
    fn an_address_the_connector_gains_after_start_is_refused() {
        let live = Arc::new(Mutex::new(Vec::<IpAddr>::new()));
        let reads = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (l, r) = (live.clone(), reads.clone());
        let read = move || {
            r.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            l.lock().unwrap().clone()
        };
        let ttl = Duration::from_millis(200);
        let p = Policy::with_own_addresses(rules(&["*.internal:*"]), read, ttl);
        let h = name("app.internal");
        let new_addr: IpAddr = "10.9.9.9".parse().unwrap();
        assert!(p.check_resolved(&h, 80, &alice(), new_addr).is_ok());
        // The connector gains 10.9.9.9 (a new interface, a VPN): refused once the list is old.
        live.lock()
            .unwrap()
            .push("::ffff:10.9.9.9".parse().unwrap());
        std::thread::sleep(ttl + Duration::from_millis(50));
        let err = p
            .check_resolved(&h, 80, &alice(), new_addr)
            .unwrap_err()
            .reason;
        assert!(
            err.contains("one of this connector's own addresses"),
            "{err}"
        );
        // Checks within the time to live reuse the list (clones share it).
        let before = reads.load(std::sync::atomic::Ordering::SeqCst);
        let clone = p.clone();
        for _ in 0..100 {
            let _ = clone.check_resolved(&h, 80, &alice(), "10.1.1.1".parse().unwrap());
        }
        assert!(reads.load(std::sync::atomic::Ordering::SeqCst) <= before + 1);
    }

    #[test]
    fn local_addresses_lists_this_machines_loopback_sorted_and_folded() {
        let addrs = local_addresses();
        // Every Linux machine (and namespace with lo up) has 127.0.0.1.
        assert!(
            addrs.contains(&"127.0.0.1".parse::<IpAddr>().unwrap()),
            "{addrs:?}"
        );
        let mut sorted = addrs.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(addrs, sorted);
        assert!(addrs.iter().all(|a| canonical_ip(*a) == *a));
    }
}
