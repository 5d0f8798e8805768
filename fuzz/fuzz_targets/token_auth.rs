//! Bearer-token handling in `gateway::auth`: `parse_token` and `TokenStore::verify` see the
//! `Authorization` header of every agent and connector that knocks on the gateway; `TokenSecret`
//! wraps the tokens agents and connectors read from their token file.
//!
//! The input is taken as UTF-8 (lossily). Properties checked:
//! * nothing panics;
//! * `parse_token` accepts exactly `sp_<id>_<64 lowercase hex>` (whitespace around ignored) and
//!   returns slices of its input;
//! * `verify` against a store holding one known token succeeds iff the trimmed input *is* that
//!   token, and succeeds with that token's identity;
//! * secrets never reach output: neither `TokenSecret`'s `Display`/`Debug` nor any `verify`
//!   error message contains the secret part of the presented token.
#![no_main]

use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use gateway::auth::{parse_token, TokenSecret, TokenStore};
use libfuzzer_sys::fuzz_target;

/// A fixed, known token, and a store that holds its hash (plus an expired token with the same
/// secret under another id).
const TOKEN: &str =
    "sp_alice-laptop_0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
// SHA-256 of the 64 ASCII hex characters of TOKEN's secret part.
// (`printf %s 0123…cdef | sha256sum`)
const TOKEN_SHA256: &str = "a8ae6e6ee929abea3afcfc5258c8ccd6f85273e0d4626d26c7279f3250f77c8e";

fn store() -> &'static TokenStore {
    static STORE: OnceLock<TokenStore> = OnceLock::new();
    STORE.get_or_init(|| {
        let text = format!(
            "[[token]]\nid = \"alice-laptop\"\nname = \"alice\"\ngroups = [\"dev\"]\nsha256 = \"{}\"\n\
             [[token]]\nid = \"old\"\nsha256 = \"{}\"\nexpires = \"2001-01-01T00:00:00Z\"\n",
            TOKEN_SHA256, TOKEN_SHA256,
        );
        let store = TokenStore::parse(&text, "fuzz tokens").expect("fixed token file parses");
        assert!(
            store.verify(TOKEN, SystemTime::UNIX_EPOCH).is_ok(),
            "fixture: TOKEN_SHA256 does not match TOKEN"
        );
        store
    })
}

fn is_lower_hex64(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

fuzz_target!(|data: &[u8]| {
    let s = String::from_utf8_lossy(data);
    let s = s.as_ref();
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let store = store();

    let parsed = parse_token(s);
    // Reference: what the format says.
    let t = s.trim();
    let reference = t
        .strip_prefix("sp_")
        .and_then(|r| r.rsplit_once('_'))
        .filter(|(id, secret)| valid_id(id) && is_lower_hex64(secret));
    match (&parsed, reference) {
        (Ok((id, secret)), Some((rid, rsecret))) => {
            assert_eq!((*id, *secret), (rid, rsecret));
        }
        (Err(_), None) => {}
        (p, r) => panic!("parse_token({s:?}) = {p:?}, format says {r:?}"),
    }

    // Secrets never reach Display/Debug of the wrapper.
    let wrapped = TokenSecret::new(s);
    let shown = format!("{wrapped} {wrapped:?}");
    if let Ok((id, secret)) = parsed {
        assert_eq!(wrapped.id(), Some(id));
        assert!(
            !shown.contains(secret),
            "TokenSecret shows its secret: {shown}"
        );
    } else if s.trim().starts_with("sp2_") {
        // A version 2 token's text (the same wrapper holds both versions).
        assert_eq!(shown, "sp2_**** sp2_****");
    } else {
        assert_eq!(shown, "sp_**** sp_****");
    }

    match store.verify(s, now) {
        Ok(identity) => {
            assert_eq!(t, TOKEN, "verify accepted {s:?}");
            assert_eq!(identity.token_id, "alice-laptop");
            assert_eq!(identity.name, "alice");
            assert!(store.is_valid(&identity, now));
        }
        Err(e) => {
            assert_ne!(t, TOKEN, "verify refused the real token: {e}");
            let msg = format!("{e} {e:?} {}", e.client_message());
            if let Ok((_, secret)) = parsed {
                assert!(!msg.contains(secret), "error echoes the secret: {msg}");
            }
        }
    }
});
