//! The text of resumable streams' metadata as the DMZ and the connector read it from an `OPEN`
//! or an `OPEN_OK` (`tunnel::resumable::Ticket::parse`, `tunnel::resume::parse_offset`), and the
//! offsets a peer sends as they reach one end's rules (`End::resume`, `End::on_ack`).
//!
//! Per input: never a panic; a ticket that parses prints back to the same text; an offset that
//! parses is the decimal number it reads; an end given any offsets keeps `retained` within its
//! cap and never acknowledges beyond what was written.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tunnel::resumable::Ticket;
use tunnel::resume::{parse_offset, End};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(t) = Ticket::parse(text) {
        assert_eq!(t.text(), text);
        assert_eq!(Ticket::parse(&t.text()), Some(t));
    }
    if let Some(v) = parse_offset(text) {
        assert!(text.bytes().all(|b| b.is_ascii_digit()));
        assert_eq!(text.parse::<u64>().ok(), Some(v));
    }
    // Offsets from a peer, whatever they are, against an end that wrote a little.
    let mut end = End::new(64);
    end.write(&data[..data.len().min(100)]);
    while let Some(s) = end.unsent() {
        let n = s.len().min(7);
        end.on_sent(n);
    }
    for chunk in data.chunks(8) {
        let mut b = [0u8; 8];
        b[..chunk.len()].copy_from_slice(chunk);
        let v = u64::from_le_bytes(b) % 200;
        if chunk[0] & 1 == 0 {
            let _ = end.on_ack(v);
        } else {
            let _ = end.resume(v);
        }
        assert!(end.retained() <= 64);
    }
});
