//! `agent::netwatch::rtnetlink::parse`: one datagram from the kernel's `NETLINK_ROUTE`
//! notifications (links, addresses, routes), which the agent reads to notice a network change.
//! The kernel is trusted, but the parser must not be the weak point if it ever reads bytes it
//! did not expect (another kernel version, a truncated read).
//!
//! Properties checked:
//! * no panic, whatever the input;
//! * at most `MAX_CHANGES` changes, and never more than one per 16-byte header the input holds;
//! * every change prints as one bounded line with no control characters (it goes to the log);
//! * `matters` answers for every change.
#![no_main]

use agent::netwatch::rtnetlink::{parse, MAX_CHANGES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let changes = parse(data);
    assert!(changes.len() <= MAX_CHANGES);
    assert!(changes.len() <= data.len() / 16);
    for c in &changes {
        let line = c.to_string();
        assert!(line.len() <= 200, "{line:?}");
        assert!(!line.chars().any(char::is_control), "{line:?}");
        let _ = c.matters();
    }
});
