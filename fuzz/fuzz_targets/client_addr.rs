//! `gateway::dmz::client_addr`: the address the DMZ logs, audits and rate-limits an agent by,
//! read from `X-Forwarded-For` / `Forwarded` when the TCP peer is a trusted load balancer. The
//! header values come from anyone on the internet (a load balancer appends to what the client
//! sent).
//!
//! Input layout: byte 0 picks the TCP peer (trusted IPv4, untrusted IPv4, trusted IPv4-mapped
//! IPv6, trusted IPv6) and, with its bit 2, the header the balancer sets (`X-Forwarded-For` or
//! `Forwarded`); the rest (UTF-8, lossy) is one header per line, the line's first
//! character choosing the name (`x`: `X-Forwarded-For`, `f`: `forwarded`, `F`: `Forwarded`,
//! anything else: an unrelated header) and the remainder being the value.
//! Trusted networks: `10.0.0.0/8`, `fd00::/8`.
//!
//! Properties checked:
//! * no panic;
//! * an untrusted peer is the client, whatever the headers say;
//! * otherwise the client is the peer or an address (port 0) that is not trusted and that
//!   appears in the header text;
//! * a trusted load balancer that appends the real client (`X-Forwarded-For: 198.51.100.7`, as
//!   the last header) makes that address the client, whatever came before; in `Forwarded`
//!   mode that appended `X-Forwarded-For` changes nothing (only the balancer's header is read).
#![no_main]

use std::net::{IpAddr, SocketAddr};

use gateway::dmz::{client_addr, ForwardedHeader};
use gateway::http::RequestHead;
use ipnet::IpNet;
use libfuzzer_sys::fuzz_target;

fn head(headers: Vec<(String, String)>) -> RequestHead {
    RequestHead {
        method: "GET".into(),
        path: "/agent".into(),
        headers,
        leftover: Vec::new(),
        raw: Vec::new(),
    }
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()];
    let peer: SocketAddr = match pick % 4 {
        0 => "10.1.2.3:40000",
        1 => "203.0.113.9:40000",
        2 => "[::ffff:10.1.2.3]:40000",
        _ => "[fd00::1]:40000",
    }
    .parse()
    .unwrap();
    let peer_trusted = pick % 4 != 1;
    let mode = if pick & 4 == 0 {
        ForwardedHeader::XForwardedFor
    } else {
        ForwardedHeader::Forwarded
    };
    let text = String::from_utf8_lossy(rest);
    let mut headers = Vec::new();
    for line in text.split('\n') {
        let mut chars = line.chars();
        let name = match chars.next() {
            Some('x') => "X-Forwarded-For",
            Some('f') => "forwarded",
            Some('F') => "Forwarded",
            _ => "Via",
        };
        headers.push((name.to_string(), chars.as_str().to_string()));
    }
    let is_trusted = |ip: IpAddr| trusted.iter().any(|n| n.contains(&canonical(ip)));

    let got = client_addr(&trusted, mode, peer, &head(headers.clone()));
    if !peer_trusted {
        assert_eq!(got, peer);
    } else if got != peer {
        assert_eq!(got.port(), 0);
        assert!(!is_trusted(got.ip()), "{got} is trusted");
        // The address was read from the headers: some spelling of it is in the text.
        let v = got.ip().to_string();
        let lower = text.to_ascii_lowercase();
        let found = lower.contains(&v)
            || match got.ip() {
                IpAddr::V6(_) => lower.contains(':'),
                IpAddr::V4(_) => false,
            };
        assert!(found, "{got} is not in {text:?}");
    }

    let before = got;
    headers.push(("X-Forwarded-For".into(), "198.51.100.7".into()));
    let got = client_addr(&trusted, mode, peer, &head(headers));
    if !peer_trusted {
        assert_eq!(got, peer);
    } else if mode == ForwardedHeader::XForwardedFor {
        assert_eq!(got, "198.51.100.7:0".parse().unwrap());
    } else {
        assert_eq!(got, before);
    }
});
