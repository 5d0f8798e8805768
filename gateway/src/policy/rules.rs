//! Who may go where: a [`Rule`] is a route plus optional users and groups; the [`Policy`] is the
//! allow-list, asked before a name is resolved and again for every address it resolved to, with
//! loopback, link-local, cloud metadata and the connector's own addresses refused unless a rule
//! names them.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;

use super::protocol::Protocol;
use super::routes::*;
use super::{rule_err, PolicyError};

// ---------------------------------------------------------------------------------------------
// Rules
// ---------------------------------------------------------------------------------------------

/// One allow-list entry: a route, optionally restricted to some users and/or groups.
/// Empty `users` and `groups` means everyone; otherwise a caller must be listed in either.
/// `protocol` is what the client must speak there (`any` by default; see `protocol.rs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub route: Route,
    pub users: Vec<String>,
    pub groups: Vec<String>,
    pub protocol: Protocol,
}

impl Rule {
    /// A rule for everyone.
    pub fn everyone(route: Route) -> Rule {
        Rule {
            route,
            users: Vec::new(),
            groups: Vec::new(),
            protocol: Protocol::Any,
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

    /// `db.internal:5432` or `db.internal:5432 users=alice,bob groups=dba`, optionally with
    /// `protocol=tls|ssh|postgres|http|any` and, for tls, `sni=NAME,*.SUFFIX`.
    fn from_str(s: &str) -> Result<Self, PolicyError> {
        let mut words = s.split_whitespace();
        let route = words.next().ok_or_else(|| rule_err(s, "empty rule"))?;
        let route: Route = route.parse().map_err(|e| rule_err(s, inner_why(&e)))?;
        let (mut users, mut groups, mut protocol, mut sni) = (None, None, None, None);
        for word in words {
            let (key, value) = word.split_once('=').ok_or_else(|| {
                rule_err(
                    s,
                    format!("{word:?} should be users=a,b, groups=c,d, protocol=P or sni=a,b"),
                )
            })?;
            let slot = match key {
                "users" => &mut users,
                "groups" => &mut groups,
                "protocol" => &mut protocol,
                "sni" => &mut sni,
                _ => {
                    return Err(rule_err(
                        s,
                        format!(
                            "unknown key {key:?} (expected users=, groups=, protocol= or sni=)"
                        ),
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
        let protocol = match protocol.as_deref() {
            Some([one]) => Some(one.as_str()),
            Some(_) => {
                return Err(rule_err(
                    s,
                    "protocol= takes one of tls, ssh, postgres, http, any",
                ))
            }
            None => None,
        };
        let protocol =
            Protocol::from_parts(protocol, sni.as_deref()).map_err(|why| rule_err(s, why))?;
        Ok(Rule {
            route,
            users: users.unwrap_or_default(),
            groups: groups.unwrap_or_default(),
            protocol,
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
        if self.protocol != Protocol::Any {
            write!(f, " {}", self.protocol)?;
        }
        Ok(())
    }
}

/// The table form of a rule in TOML: `{ route = "...", users = [...], groups = [...],
/// protocol = "tls", sni = [...] }`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleTable {
    route: Route,
    #[serde(default)]
    users: Vec<String>,
    #[serde(default)]
    groups: Vec<String>,
    protocol: Option<String>,
    sni: Option<Vec<String>>,
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
                let protocol = Protocol::from_parts(t.protocol.as_deref(), t.sni.as_deref())
                    .map_err(de::Error::custom)?;
                Ok(Rule {
                    route: t.route,
                    users: t.users,
                    groups: t.groups,
                    protocol,
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
        if self
            .listing_special(ip, port, who)
            .is_some_and(|mut r| r.next().is_some())
        {
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

    /// The rules that match `host:port` (IP literals folded to IPv4) and apply to `who`.
    pub(super) fn allowing<'a>(
        &'a self,
        host: &'a Host,
        port: u16,
        who: &'a Who,
    ) -> impl Iterator<Item = &'a Rule> + 'a {
        let host = match host {
            Host::Ip(ip) => Host::Ip(canonical_ip(*ip)),
            name => name.clone(),
        };
        self.rules
            .iter()
            .filter(move |r| r.route.matches(&host, port) && r.applies_to(who))
    }

    /// For a special address (loopback, …): the rules applying to `who` and `port` that list
    /// a network containing it (a cloud metadata address only by itself). `None` if `ip` is
    /// not special.
    pub(super) fn listing_special<'a>(
        &'a self,
        ip: IpAddr,
        port: u16,
        who: &'a Who,
    ) -> Option<impl Iterator<Item = &'a Rule> + 'a> {
        let ip = canonical_ip(ip);
        self.special_kind(ip)?;
        let only_itself = CLOUD_METADATA.contains(&ip);
        Some(self.rules.iter().filter(move |r| {
            matches!(&r.route.host, HostPattern::Net(net)
                if net.contains(&ip) && (!only_itself || net.prefix_len() == net.max_prefix_len()))
                && r.route.ports.contains(port)
                && r.applies_to(who)
        }))
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
