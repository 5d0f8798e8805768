//! Token renewal messages (`tunnel::renew`) as the agent and the issuer read them from a stream
//! that crossed the DMZ: `unframe`, `Challenge::decode`, `Request::decode`, `Answer::decode`.
//!
//! Per input: every parser returns `Ok` or `Err`, never panics; a frame length above the cap is
//! refused; a challenge or request that decodes encodes back to bytes that decode the same; a
//! renewed answer does too; a challenge never verifies with a key that did not sign it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tunnel::renew::{self, Answer, Challenge, Request};
use tunnel::token::IssuerKey;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((body, used))) = renew::unframe(data) {
        assert!(body.len() <= renew::MAX_MSG && used == body.len() + 2);
    }
    if let Ok(c) = Challenge::decode(data) {
        assert_eq!(Challenge::decode(&c.encode()).expect("re-encoded challenge"), c);
        assert!(c.verify(&IssuerKey([9; 32])).is_err(), "verified with a key that never signed");
    }
    if let Ok(r) = Request::decode(data) {
        assert_eq!(Request::decode(&r.encode()).expect("re-encoded request"), r);
    }
    if let Ok(a) = Answer::decode(data) {
        let again = Answer::decode(&a.encode()).expect("re-encoded answer");
        if let Answer::Renewed(_) = a {
            assert_eq!(again, a);
        }
    }
});
