//! `gateway::policy::sniff::http_request_line`: the connector reading a client's first bytes
//! on a `protocol=http` rule. Input: those bytes (byte 0 picks where a prefix is cut).
//! Properties: see `common/sniff.rs`; a recognised method is a token of at most 32 bytes and
//! the target is shorter than the input.
#![no_main]

#[path = "common/sniff.rs"]
mod common;

use gateway::policy::sniff::{http_request_line, Sniff};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Sniff::Is(line) = common::check(data, http_request_line) {
        assert!(!line.method.is_empty() && line.method.len() <= 32);
        assert!(line.method.bytes().all(|b| b.is_ascii_graphic()));
        assert!(line.target_len > 0 && line.target_len < data.len());
        assert!(["1.0", "1.1", "2.0"].contains(&line.version.as_str()));
    }
});
