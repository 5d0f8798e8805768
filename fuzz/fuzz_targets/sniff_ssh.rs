//! `gateway::policy::sniff::ssh_ident`: the connector reading a client's first bytes on a
//! `protocol=ssh` rule. Input: those bytes (byte 0 picks where a prefix is cut). Properties:
//! see `common/sniff.rs`; a recognised line starts `SSH-2.0-`, is printable ASCII and fits the
//! RFC's 255 bytes.
#![no_main]

#[path = "common/sniff.rs"]
mod common;

use gateway::policy::sniff::{ssh_ident, Sniff, SSH_MAX_IDENT};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Sniff::Is(line) = common::check(data, ssh_ident) {
        assert!(line.starts_with("SSH-2.0-") && line.len() > 8);
        assert!(line.len() + 1 <= SSH_MAX_IDENT);
        assert!(line.bytes().all(|b| (b' '..=b'~').contains(&b)));
    }
});
