//! The inner channel's parsing of what the other side sends: `tunnel::inner::respond` (the
//! gateway reading an agent's hello: the body of `POST …/agent/http?inner=1` or the first
//! WebSocket message of `?inner=1`, sent before any authentication) and `Opener::open` (every
//! sealed carrier message after the handshake, `u16 length | ciphertext` chunks).
//!
//! The gateway's key pair is fixed (from a constant private key). One session (a real
//! handshake) serves input after input, as a live session serves message after message (so the
//! target runs thousands of inputs a second, not a handshake's worth). Per input:
//! * `respond(&key, input)` returns `Ok` or `Err`, never panics;
//! * the gateway's `Opener` fed the input returns `Ok` or `Err`, never panics; garbage fails (a
//!   forged AEAD tag is out of reach);
//! * the input sealed by the agent's `Sealer` then opens to the input (a refused `open` leaves
//!   the opener usable for the genuine message), and the next sealed message, cut short at a
//!   point chosen by the input's first byte, is refused unless the cut is on a chunk boundary.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::{Mutex, OnceLock};
use tunnel::inner::{respond, Initiator, KeyPair, Opener, Sealer};

fn key() -> &'static KeyPair {
    static KEY: OnceLock<KeyPair> = OnceLock::new();
    KEY.get_or_init(|| KeyPair::from_private([0x5a; 32]))
}

/// A fresh session: the agent's sealer and the gateway's opener.
fn session() -> (Sealer, Opener) {
    let key = key();
    let (init, hello) = Initiator::start(&key.public(), b"fuzz").expect("start");
    let accepted = respond(key, &hello).expect("a genuine hello is accepted");
    let agent = init
        .finish(&accepted.reply)
        .expect("a genuine reply is accepted");
    let (sealer, _) = agent.split();
    let (_, opener) = accepted.cipher.split();
    (sealer, opener)
}

fn live() -> &'static Mutex<Option<(Sealer, Opener)>> {
    static LIVE: OnceLock<Mutex<Option<(Sealer, Opener)>>> = OnceLock::new();
    LIVE.get_or_init(|| Mutex::new(None))
}

fuzz_target!(|data: &[u8]| {
    let _ = respond(key(), data);

    let mut guard = live().lock().unwrap_or_else(|e| e.into_inner());
    let (sealer, opener) = guard.get_or_insert_with(session);

    if opener.open(data).is_ok() {
        // Only possible for a message sealed under this session's keys: never from garbage.
        panic!("garbage opened as a sealed message");
    }
    let sealed = sealer.seal(data).expect("seal");
    let plain = opener
        .open(&sealed)
        .expect("a genuine message opens after a refused one");
    assert_eq!(&plain[..], data);

    // The next message, cut short at a point chosen by byte 0. On a chunk boundary it opens to
    // a prefix (the next message's nonce would then fail: start a new session); anywhere else
    // it is refused and the session goes on.
    let Some(&b) = data.first() else {
        return;
    };
    let sealed = sealer.seal(data).expect("seal");
    let cut = (b as usize * sealed.len()) / 256;
    let mut at = 0;
    let mut boundary = false;
    while at + 2 <= sealed.len() && at < cut {
        at += 2 + u16::from_be_bytes([sealed[at], sealed[at + 1]]) as usize;
        boundary |= at == cut;
    }
    let r = if cut == 0 {
        Err(())
    } else {
        opener.open(&sealed[..cut]).map(|_| ()).map_err(|_| ())
    };
    if !boundary {
        assert!(r.is_err(), "a message cut inside a chunk opened");
    }
    // Back in step for the next input: a refused message did not advance the opener, so the
    // whole message opens now; after a prefix on a chunk boundary, the rest opens.
    let rest: &[u8] = if r.is_ok() { &sealed[cut..] } else { &sealed };
    if !rest.is_empty() && opener.open(rest).is_err() {
        // Out of step in a way the rules above allow: a new session for the next input.
        *guard = None;
    }
});
