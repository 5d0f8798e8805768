//! A proxy's `Proxy-Authenticate: Negotiate …` value. The agent reads it with
//! `egress::auth::Challenge` (`parse`, then `token`: the base64 token handed to GSSAPI/SSPI,
//! whose own parsing of the token is C code outside this repository), and answers with
//! `egress::auth::negotiate::header_value`; `negotiate::parse_challenge` is the module's own
//! reader of the same value (used by its tests and callers outside the proxy handshake).
//!
//! The input is the header value (UTF-8, lossy). Properties checked:
//! * no panic;
//! * a token read by either parser survives `header_value` → parse → token unchanged, and the
//!   header value is one line;
//! * for values whose only whitespace is space and tab (what `httparse` lets through), the two
//!   parsers agree: `parse_challenge` is `Some(Some(t))` exactly when `Challenge` reads a
//!   `Negotiate` challenge with token `t`, `Some(None)` for a bare `Negotiate`.
#![no_main]

use egress::auth::negotiate::{header_value, parse_challenge};
use egress::auth::{Challenge, Scheme};
use libfuzzer_sys::fuzz_target;

fn round_trip(token: &[u8]) {
    let h = header_value(token);
    assert!(!h.contains(['\r', '\n']));
    assert_eq!(parse_challenge(&h), Some(Some(token.to_vec())));
    let ch = Challenge::parse(&h);
    assert_eq!(ch.known(), Some(Scheme::Negotiate));
    let again = if token.is_empty() {
        Some(Vec::new())
    } else {
        ch.token()
    };
    assert_eq!(again.as_deref(), Some(token));
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let parsed = parse_challenge(&text);
    let ch = Challenge::parse(&text);
    let token = ch.token();
    if let Some(Some(t)) = &parsed {
        round_trip(t);
    }
    if let Some(t) = &token {
        round_trip(t);
    }
    let simple_ws = text
        .chars()
        .all(|c| !c.is_whitespace() || c == ' ' || c == '\t');
    if simple_ws {
        let negotiate = ch.known() == Some(Scheme::Negotiate);
        match &parsed {
            None => assert!(
                !negotiate || (!ch.rest.is_empty() && token.is_none()),
                "{text:?}"
            ),
            Some(None) => assert!(negotiate && ch.rest.is_empty(), "{text:?}"),
            Some(Some(t)) => {
                assert!(negotiate, "{text:?}");
                // An empty token is `Negotiate ` + nothing decodable but "": both read nothing.
                assert!(
                    t.is_empty() || token.as_ref() == Some(t),
                    "{text:?}: {token:?}"
                );
            }
        }
    }
});
