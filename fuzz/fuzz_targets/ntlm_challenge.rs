//! NTLM messages from the network: `egress::auth::ntlm::ChallengeMessage::parse` (the type 2 a
//! proxy sends the agent, inside `Proxy-Authenticate: NTLM …`) and `AuthenticateMessage::parse`
//! / `verify_ntlmv2` (the type 3 the test helper reads).
//!
//! The input is given to both parsers as it is. Properties checked:
//! * nothing panics (offsets and lengths are attacker-chosen: every slice must be checked);
//! * a parsed challenge's target info is no longer than the input, and its `timestamp()` and
//!   `av_pair()` lookups do not panic;
//! * answering a parsed challenge either works or fails with `TooLong` (a target info near
//!   64 KiB), and the answer verifies against the same server challenge and password, names the
//!   same user, and fails with another password;
//! * `verify_ntlmv2` on the raw input never succeeds for a password it was not built with (a
//!   random input is not a valid proof; a success here would mean the check is broken).
#![no_main]

use egress::auth::ntlm::{
    authenticate_message, verify_ntlmv2, AuthenticateMessage, ChallengeMessage, NtlmError,
    MSV_AV_NB_COMPUTER_NAME,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(ch) = ChallengeMessage::parse(data) {
        assert!(ch.target_info.len() <= data.len());
        let _ = ch.timestamp();
        let _ = ch.av_pair(MSV_AV_NB_COMPUTER_NAME);
        let _ = format!("{ch:?}");
        match authenticate_message(&ch, "fuzz", "DOMAIN", "pw", "WS", [0x5a; 8], 1) {
            Ok(msg) => {
                assert_eq!(
                    verify_ntlmv2(&msg, ch.server_challenge, "pw"),
                    Ok("fuzz".to_string())
                );
                assert_eq!(
                    verify_ntlmv2(&msg, ch.server_challenge, "other"),
                    Err(NtlmError::BadProof)
                );
            }
            Err(e) => assert!(matches!(e, NtlmError::TooLong(_)), "{e}"),
        }
    }

    if let Ok(m) = AuthenticateMessage::parse(data) {
        assert!(m.nt_response.len() <= data.len());
        let _ = format!("{m:?}");
    }
    // 0123456789abcdef as a server challenge, "fuzz-password" as the password: a random input
    // carrying a valid proof for them would be a 2^-128 event.
    let r = verify_ntlmv2(
        data,
        [0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef],
        "fuzz-password",
    );
    assert!(r.is_err(), "an arbitrary input verified: {r:?}");
});
