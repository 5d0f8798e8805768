//! The allow-list's rules, one test per trick: numeric spellings of addresses, special ranges,
//! the connector's own addresses, users and groups.

use super::*;
use serde::Deserialize;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

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
    assert!(route("*:*").matches(&ip("10.0.0.1"), 1) && route("*:*").matches(&name("x.y"), 65535));
    assert!(route("host:1-1024").matches(&name("host"), 1024));
}

/// A connector token for `*:*` (or `*.invalid:*`) must not attract the renewal requests that
/// only the issuer may answer, and no wildcard allow rule reaches them.
#[test]
fn no_wildcard_matches_or_covers_the_renewal_destination() {
    let issuer = format!("{}:{}", tunnel::renew::HOST, tunnel::renew::PORT);
    let host = parse_host(tunnel::renew::HOST).unwrap();
    for wild in ["*:*", "*.invalid:*", "*.sallyport.invalid:1"] {
        assert!(!route(wild).covers(&route(&issuer)), "{wild}");
        assert!(!route(wild).matches(&host, tunnel::renew::PORT), "{wild}");
    }
    assert!(route(&issuer).covers(&route(&issuer)));
    assert!(route(&issuer).matches(&host, tunnel::renew::PORT));
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

mod mapped {
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
