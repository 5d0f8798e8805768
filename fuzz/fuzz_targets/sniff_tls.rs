//! `gateway::policy::sniff::tls_client_hello`: the connector reading a client's first bytes
//! on a `protocol=tls` (or `postgres`) rule, before anything is forwarded. Input: those bytes
//! (byte 0 picks where a prefix is cut). Properties: see `common/sniff.rs`; a recognised SNI
//! and ALPN names are no longer than the input.
#![no_main]

#[path = "common/sniff.rs"]
mod common;

use gateway::policy::sniff::{tls_client_hello, Sniff};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Sniff::Is(hello) = common::check(data, tls_client_hello) {
        let sni = hello.sni.map(|s| s.len()).unwrap_or(0);
        assert!(sni <= 3 * data.len(), "SNI longer than the input");
        assert!(hello.alpn.len() <= data.len(), "more ALPN names than bytes");
    }
});
