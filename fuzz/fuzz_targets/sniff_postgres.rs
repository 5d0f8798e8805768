//! `gateway::policy::sniff::postgres_first`: the connector reading a client's first bytes on
//! a `protocol=postgres` rule. Input: those bytes (byte 0 picks where a prefix is cut).
//! Properties: see `common/sniff.rs`; a recognised packet's declared length is within the
//! input and the server's 10 000-byte limit.
#![no_main]

#[path = "common/sniff.rs"]
mod common;

use gateway::policy::sniff::{postgres_first, Sniff, PG_MAX_STARTUP};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Sniff::Is(_) = common::check(data, postgres_first) {
        let input = &data[1..];
        let len = u32::from_be_bytes([input[0], input[1], input[2], input[3]]) as usize;
        assert!((8..=PG_MAX_STARTUP).contains(&len));
        assert!(len <= input.len(), "recognised before the packet was complete");
    }
});
