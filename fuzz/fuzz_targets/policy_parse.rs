//! The connector's allow-list parsers in `gateway::policy`: `parse_host` (every destination an
//! agent asks for goes through it), `Route::from_str` (allow-list config, token-file `routes`, and
//! the `ROUTES` frame a connector sends to the DMZ) and `Rule::from_str` (`--allow` flags, config).
//!
//! The input is taken as UTF-8 (lossily). Properties checked:
//! * no parser panics;
//! * `parse_host` is idempotent: a parsed host prints as its own normal form (lowercase, no trailing
//!   dot, IPv4-mapped IPv6 folded to IPv4) and parses back to itself;
//! * when `parse_host` succeeds on a route's host text, the route matches that host on its ports,
//!   and the route survives Display → parse unchanged (the form the DMZ receives in `ROUTES`);
//! * every parsed route and rule survives Display → parse (IPv4-mapped networks included: see
//!   `regressions/policy_parse/`);
//! * a route covers itself.
#![no_main]

use gateway::policy::{parse_host, Host, Route, Rule};
use libfuzzer_sys::fuzz_target;

/// The host part of a route's text, split the way `Route::from_str` splits it.
fn route_host_text(s: &str) -> Option<&str> {
    if s.starts_with('[') {
        let close = s.find(']')?;
        Some(&s[..=close])
    } else {
        s.rsplit_once(':').map(|(h, _)| h)
    }
}

fn check_route_round_trip(route: &Route, src: &str) {
    let text = route.to_string();
    let again: Route = match text.parse() {
        Ok(r) => r,
        Err(e) => panic!("{src:?} parsed as a route that prints as {text:?}, which fails: {e}"),
    };
    assert_eq!(&again, route, "{src:?} → {text:?} parses back differently");
    assert_eq!(again.to_string(), text, "Display is not stable for {src:?}");
}

fuzz_target!(|data: &[u8]| {
    let s = String::from_utf8_lossy(data);
    let s = s.as_ref();

    // Hosts.
    if let Ok(host) = parse_host(s) {
        let text = host.to_string();
        match parse_host(&text) {
            Ok(again) => assert_eq!(again, host, "{s:?} → {text:?} is not a fixed point"),
            Err(e) => panic!("{s:?} parsed as {host:?}, whose text {text:?} fails: {e}"),
        }
        if let Host::Name(n) = &host {
            assert!(!n.is_empty() && n.len() <= 253 && !n.ends_with('.'));
            assert!(n.bytes().all(|b| b.is_ascii_lowercase()
                || b.is_ascii_digit()
                || b == b'-'
                || b == b'_'
                || b == b'.'));
        }
    }

    // Routes.
    if let Ok(route) = s.parse::<Route>() {
        assert!(route.covers(&route), "{s:?} does not cover itself");
        let host_ok = route_host_text(s).and_then(|h| parse_host(h).ok());
        if let Some(h) = &host_ok {
            assert!(
                route.matches(h, route.ports.lo()) && route.matches(h, route.ports.hi()),
                "{s:?} does not match its own host {h:?}"
            );
            check_route_round_trip(&route, s);
        } else {
            check_route_round_trip(&route, s);
        }
    }

    // Rules.
    if let Ok(rule) = s.parse::<Rule>() {
        let text = rule.to_string();
        match text.parse::<Rule>() {
            Ok(again) => assert_eq!(again, rule, "{s:?} → {text:?} parses back differently"),
            Err(e) => panic!("{s:?} parsed as a rule that prints as {text:?}, which fails: {e}"),
        }
    }
});
