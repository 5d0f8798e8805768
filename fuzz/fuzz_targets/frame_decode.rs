//! `tunnel::Frame::decode` on arbitrary transport messages (what a peer, or anyone who reaches the
//! gateway's WebSocket endpoints, can send).
//!
//! Properties checked:
//! * decoding returns `Ok` or `Err`, never panics (and never allocates beyond the message);
//! * a decoded frame re-encodes to something that decodes again to the same frame, except that
//!   `encode` clips `reason` texts to 512 bytes on purpose (`clip_reason`), which is modelled here;
//! * encoding is canonical: `encode(decode(encode(f))) == encode(f)`;
//! * the re-encoding is the original message byte for byte wherever the encoding is lossless:
//!   a `HELLO` re-encodes to a prefix of the message (a hello tolerates trailing bytes, later
//!   versions may append fields), every other frame to the same length (and the same bytes unless
//!   it carries an error code this build does not know, which reads as `internal`; so may a
//!   `DGRAM_CLOSE`).
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use tunnel::frame::{Frame, HEADER_LEN};

/// What the sessions announce by default (`DEFAULT_MAX_FRAME`).
const MAX_DATA: usize = 65536;

/// Mirrors `frame::clip_reason` (private): reasons are cut to 512 bytes on a char boundary.
fn clip(s: &str) -> String {
    const MAX: usize = 512;
    if s.len() <= MAX {
        return s.to_string();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// The frame as it is expected to come back after encode → decode.
fn expected_after_roundtrip(f: &Frame) -> (Frame, bool) {
    match f {
        Frame::OpenErr {
            stream,
            code,
            reason,
        } => (
            Frame::OpenErr {
                stream: *stream,
                code: *code,
                reason: clip(reason),
            },
            reason.len() > 512,
        ),
        Frame::Rst {
            stream,
            code,
            reason,
        } => (
            Frame::Rst {
                stream: *stream,
                code: *code,
                reason: clip(reason),
            },
            reason.len() > 512,
        ),
        Frame::GoAway { code, reason } => (
            Frame::GoAway {
                code: *code,
                reason: clip(reason),
            },
            reason.len() > 512,
        ),
        Frame::DgramClose {
            assoc,
            code,
            reason,
        } => (
            Frame::DgramClose {
                assoc: *assoc,
                code: *code,
                reason: clip(reason),
            },
            reason.len() > 512,
        ),
        other => (other.clone(), false),
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(frame) = Frame::decode(Bytes::copy_from_slice(data), MAX_DATA) else {
        return;
    };
    let enc = frame.encode();
    let again = match Frame::decode(enc.clone(), MAX_DATA) {
        Ok(f) => f,
        Err(e) => panic!("re-encoded {frame:?} does not decode: {e}"),
    };
    let (expected, clipped) = expected_after_roundtrip(&frame);
    assert_eq!(again, expected, "decode(encode(f)) != f");
    assert_eq!(again.encode(), enc, "encoding is not canonical");

    match &frame {
        Frame::Hello(_) => {
            assert!(enc.len() <= data.len(), "hello re-encoded longer than read");
            assert_eq!(&enc[..], &data[..enc.len()], "hello re-encoding differs");
        }
        Frame::OpenErr { .. }
        | Frame::Rst { .. }
        | Frame::GoAway { .. }
        | Frame::DgramClose { .. } => {
            if !clipped {
                assert_eq!(enc.len(), data.len(), "re-encoding changed the length");
                // Byte 5 is the error code; unknown codes read (and re-encode) as `internal`.
                let code_at = HEADER_LEN;
                assert_eq!(&enc[..code_at], &data[..code_at]);
                assert_eq!(&enc[code_at + 1..], &data[code_at + 1..]);
            }
        }
        _ => assert_eq!(&enc[..], data, "re-encoding differs from the message"),
    }
});
