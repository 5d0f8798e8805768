//! The WebSocket framing after the upgrade (`tunnel::transport::wsframe::parse`) and the client's
//! parser of the gateway's answer to the upgrade (`tunnel::ws::parse_answer`): bytes from the
//! network on both sides (the DMZ parses every agent's and connector's frames).
//!
//! The first input byte picks the side (even: frames from a client, masked; odd: from a server)
//! and the limit; the rest is a byte stream parsed frame after frame.
//!
//! Properties checked:
//! * parsing returns a frame, "need more", or an error: never panics;
//! * a frame never exceeds the limit, and "need more" consumes nothing;
//! * `needed` agrees with `parse`: a frame is taken exactly when `needed` bytes are there;
//! * a parsed frame re-encoded (`put_header`/`put_masked`) parses back to the same frame;
//! * the answer parser returns, never panics, and its head length is within the input.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tunnel::transport::wsframe::{needed, parse, put_header, put_masked, From};

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let from = if sel & 1 == 0 { From::Client } else { From::Server };
    let max = [0usize, 125, 126, 65_535, 65_536, 70_000][(sel as usize >> 1) % 6];
    let mut buf = BytesMut::from(rest);
    loop {
        let before = buf.len();
        let want = needed(&buf, from, max);
        match parse(&mut buf, from, max) {
            Ok(Some(f)) => {
                assert!(f.payload.len() <= max, "a frame over the limit");
                let took = before - buf.len();
                assert_eq!(want, Ok(Some(took)), "needed disagrees with parse");
                let mut again = BytesMut::new();
                match from {
                    From::Client => put_masked(&mut again, f.opcode, &f.payload, [9, 8, 7, 6]),
                    From::Server => {
                        put_header(&mut again, f.opcode, f.payload.len(), None);
                        again.extend_from_slice(&f.payload);
                    }
                }
                if !f.fin {
                    again[0] &= 0x7f;
                }
                let back = parse(&mut again, from, max)
                    .expect("a re-encoded frame parses")
                    .expect("whole");
                assert_eq!(back, f, "re-encoding changed the frame");
            }
            Ok(None) => {
                assert_eq!(buf.len(), before, "need-more consumed bytes");
                if let Ok(Some(n)) = want {
                    assert!(n > before, "needed says it is whole but parse waits");
                }
                break;
            }
            Err(_) => break,
        }
    }
    if let Ok(Some(a)) = tunnel::ws::parse_answer(rest) {
        assert!(a.head_len <= rest.len());
    }
});
