//! Version 2 tokens as an agent, a connector or `sallyport-gateway` reads them (`sp2_…` from a
//! file, the environment or the keychain: `Token::from_str`), and the claims block a gateway
//! reads from msg3 before anything in it is trusted (`Claims::decode`, `SignedClaims::parse`).
//!
//! Per input: every parser returns `Ok` or `Err`, never panics; claims that decode re-encode to
//! the same claims (decode ∘ encode is the identity), and re-encode byte for byte unless the
//! input held optional (ignored) claim types; a token string that parses prints back to a
//! string that parses to the same claims.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tunnel::token::{Claims, SignedClaims, Token};

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(t) = text.parse::<Token>() {
            let again: Token = t.expose().parse().expect("a printed token parses");
            assert_eq!(again.claims(), t.claims());
        }
        let _ = format!("sp2_{text}").parse::<Token>();
    }
    if let Ok(c) = Claims::decode(data) {
        let enc = c.encode();
        assert_eq!(Claims::decode(&enc).expect("re-encoded claims decode"), c);
        if enc != data {
            // Only ignored optional types may make the difference.
            assert!(enc.len() < data.len(), "re-encoding grew the claims");
        }
    }
    if data.len() >= 64 {
        let (sig, claims) = data.split_at(64);
        if let Ok(sc) = SignedClaims::parse(claims, sig) {
            assert!(sc.verify(&[]).is_err(), "verified with no issuer key");
        }
    }
});
