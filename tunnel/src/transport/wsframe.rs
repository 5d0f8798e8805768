//! WebSocket framing (RFC 6455, section 5) for the session after the upgrade: pure functions,
//! no I/O, so the rules are unit-tested and fuzzed on their own (`fuzz_targets/ws_frame.rs`).
//!
//! Why our own and not tungstenite's after the handshake: tungstenite copies every message
//! into its own write buffer and every read into its own read buffer (zeroed as it grows, and
//! never shrunk: a session kept the peak of its largest burst), and it takes whole messages
//! only. Here a received payload is a view of the bytes read (unmasked in place), and a sent
//! one goes to the socket as it is, beside its header, in one vectored write: two copies per
//! byte less in the DMZ, and an idle session holds no buffer (see `ws.rs`).
//!
//! What the parser enforces (a peer is an attacker until authenticated, and even after):
//! no reserved bits (no extension is ever negotiated), no reserved opcodes, control frames
//! whole and at most 125 bytes, frames from a client masked and from a server not, a length
//! within the limit *before* any payload is buffered, and the 64-bit length's top bit clear.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Opcodes (RFC 6455, 5.2).
pub mod op {
    pub const CONTINUATION: u8 = 0x0;
    pub const TEXT: u8 = 0x1;
    pub const BINARY: u8 = 0x2;
    pub const CLOSE: u8 = 0x8;
    pub const PING: u8 = 0x9;
    pub const PONG: u8 = 0xa;
}

/// The longest frame header: 2 bytes, an 8-byte length, a 4-byte mask.
pub const MAX_HEADER: usize = 14;

/// One frame, unmasked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WsFrame {
    pub fin: bool,
    pub opcode: u8,
    pub payload: Bytes,
}

/// A frame the peer may not send.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("WebSocket frame of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: u64, max: usize },
    #[error("WebSocket protocol violation: {0}")]
    Protocol(&'static str),
}

/// Which side wrote the bytes being parsed: frames from a client are masked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum From {
    Client,
    Server,
}

/// Takes the first whole frame off `buf`, or `None` when more bytes are needed (then
/// [`needed`] says how many the frame takes in all, once its header is in). `max`: the largest
/// payload allowed.
pub fn parse(buf: &mut BytesMut, from: From, max: usize) -> Result<Option<WsFrame>, FrameError> {
    let Some(h) = header(buf, from, max)? else {
        return Ok(None);
    };
    if buf.len() < h.header_len + h.len {
        return Ok(None);
    }
    buf.advance(h.header_len);
    let mut payload = buf.split_to(h.len);
    match h.mask {
        // The zero key changes nothing: no pass over the payload.
        Some(key) if key != [0; 4] => apply_mask(&mut payload, key),
        _ => {}
    }
    Ok(Some(WsFrame {
        fin: h.fin,
        opcode: h.opcode,
        payload: payload.freeze(),
    }))
}

/// Bytes the frame at the start of `buf` takes in all (header and payload), once its header
/// is complete; `None` before. Lets a reader reserve room for a large frame in one step.
pub fn needed(buf: &[u8], from: From, max: usize) -> Result<Option<usize>, FrameError> {
    Ok(header(buf, from, max)?.map(|h| h.header_len + h.len))
}

struct Header {
    fin: bool,
    opcode: u8,
    mask: Option<[u8; 4]>,
    header_len: usize,
    len: usize,
}

fn header(buf: &[u8], from: From, max: usize) -> Result<Option<Header>, FrameError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    let fin = b0 & 0x80 != 0;
    if b0 & 0x70 != 0 {
        return Err(FrameError::Protocol(
            "reserved bits set (no extension was agreed)",
        ));
    }
    let opcode = b0 & 0x0f;
    let control = opcode & 0x8 != 0;
    match opcode {
        op::CONTINUATION | op::TEXT | op::BINARY | op::CLOSE | op::PING | op::PONG => {}
        _ => return Err(FrameError::Protocol("reserved opcode")),
    }
    let masked = b1 & 0x80 != 0;
    match (from, masked) {
        (From::Client, false) => return Err(FrameError::Protocol("unmasked frame from a client")),
        (From::Server, true) => return Err(FrameError::Protocol("masked frame from a server")),
        _ => {}
    }
    let (len, mut at) = match b1 & 0x7f {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (u16::from_be_bytes([buf[2], buf[3]]) as u64, 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut l = [0u8; 8];
            l.copy_from_slice(&buf[2..10]);
            let l = u64::from_be_bytes(l);
            if l >> 63 != 0 {
                return Err(FrameError::Protocol("64-bit length with its top bit set"));
            }
            (l, 10)
        }
        n => (n as u64, 2),
    };
    if control && (!fin || len > 125) {
        return Err(FrameError::Protocol(
            "control frame fragmented or over 125 bytes",
        ));
    }
    if len > max as u64 {
        return Err(FrameError::TooLarge { len, max });
    }
    let mask = if masked {
        if buf.len() < at + 4 {
            return Ok(None);
        }
        let k = [buf[at], buf[at + 1], buf[at + 2], buf[at + 3]];
        at += 4;
        Some(k)
    } else {
        None
    };
    Ok(Some(Header {
        fin,
        opcode,
        mask,
        header_len: at,
        len: len as usize,
    }))
}

/// Writes the header of a final frame of `len` bytes with `opcode` into `out` (with `mask`, a
/// client's frame).
pub fn put_header(out: &mut BytesMut, opcode: u8, len: usize, mask: Option<[u8; 4]>) {
    out.put_u8(0x80 | opcode);
    let m = if mask.is_some() { 0x80 } else { 0 };
    if len < 126 {
        out.put_u8(m | len as u8);
    } else if len <= u16::MAX as usize {
        out.put_u8(m | 126);
        out.put_u16(len as u16);
    } else {
        out.put_u8(m | 127);
        out.put_u64(len as u64);
    }
    if let Some(k) = mask {
        out.put_slice(&k);
    }
}

/// XORs `data` with the 4-byte `key` (masking and unmasking are the same), eight bytes at a
/// time.
pub fn apply_mask(data: &mut [u8], key: [u8; 4]) {
    let k8 = u64::from_ne_bytes([
        key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3],
    ]);
    let mut chunks = data.chunks_exact_mut(8);
    for c in &mut chunks {
        let v = u64::from_ne_bytes(c.try_into().expect("8 bytes")) ^ k8;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    let rest = chunks.into_remainder();
    for (i, b) in rest.iter_mut().enumerate() {
        *b ^= key[i & 3];
    }
}

/// Appends a client's final frame (header and masked payload) to `out`: one copy.
pub fn put_masked(out: &mut BytesMut, opcode: u8, payload: &[u8], key: [u8; 4]) {
    put_header(out, opcode, payload.len(), Some(key));
    let start = out.len();
    out.put_slice(payload);
    apply_mask(&mut out[start..], key);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(from: From, opcode: u8, payload: &[u8]) -> BytesMut {
        let mut b = BytesMut::new();
        match from {
            From::Client => put_masked(&mut b, opcode, payload, [1, 2, 3, 0xfe]),
            From::Server => {
                put_header(&mut b, opcode, payload.len(), None);
                b.put_slice(payload);
            }
        }
        b
    }

    #[test]
    fn every_length_encoding_round_trips_both_ways() {
        for from in [From::Client, From::Server] {
            for n in [0, 1, 125, 126, 127, 65535, 65536, 70_000] {
                let payload: Vec<u8> = (0..n).map(|i| (i * 7) as u8).collect();
                let mut b = frame(from, op::BINARY, &payload);
                b.put_slice(b"next");
                let f = parse(&mut b, from, 1 << 20).unwrap().unwrap();
                assert_eq!((f.fin, f.opcode), (true, op::BINARY));
                assert_eq!(&f.payload[..], &payload[..], "{n} bytes from {from:?}");
                assert_eq!(&b[..], b"next");
            }
        }
    }

    /// A frame arriving a byte at a time is taken only once whole, and `needed` knows its size
    /// as soon as the header is in.
    #[test]
    fn a_frame_cut_anywhere_waits_for_the_rest() {
        let whole = frame(From::Client, op::BINARY, &[9u8; 300]);
        for cut in 0..whole.len() {
            let mut b = BytesMut::from(&whole[..cut]);
            assert_eq!(
                parse(&mut b, From::Client, 1024).unwrap(),
                None,
                "cut {cut}"
            );
            assert_eq!(b.len(), cut, "nothing consumed");
            if cut >= 8 {
                assert_eq!(needed(&b, From::Client, 1024).unwrap(), Some(whole.len()));
            }
        }
    }

    /// A peer announcing a huge frame is refused at its header, before any payload is kept.
    #[test]
    fn an_oversize_length_is_refused_before_its_payload_arrives() {
        let mut b = BytesMut::new();
        put_header(&mut b, op::BINARY, 10_000_000, None);
        assert_eq!(
            parse(&mut b, From::Server, 65_536).unwrap_err(),
            FrameError::TooLarge {
                len: 10_000_000,
                max: 65_536
            }
        );
        let mut b = BytesMut::from(&[0x82u8, 127, 0x80, 0, 0, 0, 0, 0, 0, 1][..]);
        assert!(matches!(
            parse(&mut b, From::Server, 65_536),
            Err(FrameError::Protocol(_))
        ));
    }

    #[test]
    fn masking_rules_reserved_bits_and_control_frames_are_enforced() {
        let masked = frame(From::Client, op::BINARY, b"x");
        let plain = frame(From::Server, op::BINARY, b"x");
        assert!(parse(&mut masked.clone(), From::Server, 100).is_err());
        assert!(parse(&mut plain.clone(), From::Client, 100).is_err());
        let mut rsv = plain.clone();
        rsv[0] |= 0x40;
        assert!(parse(&mut rsv, From::Server, 100).is_err());
        let mut reserved = plain.clone();
        reserved[0] = 0x83;
        assert!(parse(&mut reserved, From::Server, 100).is_err());
        let mut long_ping = frame(From::Server, op::PING, &[0u8; 126]);
        assert!(parse(&mut long_ping, From::Server, 1000).is_err());
        let mut split_ping = frame(From::Server, op::PING, b"p");
        split_ping[0] &= 0x7f;
        assert!(parse(&mut split_ping, From::Server, 1000).is_err());
    }

    #[test]
    fn the_mask_is_its_own_inverse_at_every_length_and_offset() {
        for n in 0..40 {
            let orig: Vec<u8> = (0..n).map(|i| i as u8 ^ 0x5a).collect();
            let mut d = orig.clone();
            apply_mask(&mut d, [0xde, 0xad, 0xbe, 0xef]);
            for (i, (a, b)) in d.iter().zip(&orig).enumerate() {
                assert_eq!(*a, b ^ [0xde, 0xad, 0xbe, 0xef][i % 4]);
            }
            apply_mask(&mut d, [0xde, 0xad, 0xbe, 0xef]);
            assert_eq!(d, orig);
        }
    }
}
