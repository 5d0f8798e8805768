//! `socks::udp::parse_header`: the SOCKS5 UDP header of every datagram an app sends to the agent's
//! relay port (RFC 1928 §7), and `write_header`, which writes the header of each reply.
//!
//! Properties checked besides "no panic":
//! * an accepted header has `FRAG = 0`, a destination that passes `Target::has_valid_host`, and
//!   its data is the tail of the input;
//! * the destination and data written back with `write_header` parse to the same destination
//!   (an address literal given as a name comes back as the same address) and the same data.
#![no_main]

use libfuzzer_sys::fuzz_target;
use socks::udp::{parse_header, write_header};
use std::net::IpAddr;

fuzz_target!(|data: &[u8]| {
    let Ok((target, rest)) = parse_header(data) else {
        return;
    };
    assert_eq!(data[2], 0, "a fragment was accepted");
    assert!(target.has_valid_host(), "{target:?}");
    assert!(data.ends_with(rest));
    let mut out = Vec::new();
    write_header(&target, rest, &mut out);
    let (again, rest2) = parse_header(&out).expect("our own header parses");
    assert_eq!(rest2, rest);
    assert_eq!(again.port, target.port);
    match (target.host.parse::<IpAddr>(), again.host.parse::<IpAddr>()) {
        (Ok(a), Ok(b)) => assert_eq!(a, b),
        _ => assert_eq!(again.host, target.host),
    }
});
