//! Kerberos Negotiate against the real thing, without any proxy code: a real MIT KDC on loopback
//! ([`sallyport_e2e::kdc::Kdc`]), a ticket from the real `kinit`, the token from
//! `egress::auth::negotiate`, and squid's own `negotiate_kerberos_auth` helper as the judge —
//! the program a corporate squid runs to decide whether to let the agent through.
//!
//! GSSAPI reads `KRB5_CONFIG`/`KRB5CCNAME` from the process environment, so each test sets them
//! for its own realm while holding [`ENV`]: the tests of this file never overlap.

use egress::auth::negotiate::{self, NegotiateContext, NegotiateError, Package};
use sallyport_e2e::kdc::{Kdc, ALICE, ALICE_PASSWORD, REALM};
use std::sync::Mutex;

static ENV: Mutex<()> = Mutex::new(());

/// Runs `f` with `vars` set in this process's environment (and removed afterwards).
fn with_env<R>(vars: &[(String, String)], f: impl FnOnce() -> R) -> R {
    let _guard = ENV.lock().unwrap_or_else(|e| e.into_inner());
    for (k, v) in vars {
        std::env::set_var(k, v);
    }
    let r = f();
    for (k, _) in vars {
        std::env::remove_var(k);
    }
    r
}

/// The base64 of a token, as it goes into the header (and into squid's helper).
fn b64(token: &[u8]) -> String {
    negotiate::header_value(token)
        .strip_prefix("Negotiate ")
        .expect("header prefix")
        .to_string()
}

#[test]
fn a_kinit_ticket_makes_a_token_squids_kerberos_helper_accepts() {
    let kdc = Kdc::start("krb-ok").unwrap();
    kdc.kinit(ALICE, ALICE_PASSWORD).unwrap();
    with_env(&kdc.env(), || {
        negotiate::available().expect("a ticket is in the cache");
        let mut ctx = NegotiateContext::new("HTTP@localhost").unwrap();
        let token = ctx
            .step(None)
            .unwrap()
            .expect("the first step gives a token");
        // A GSS-API InitialContextToken ([APPLICATION 0]) carrying the SPNEGO OID, as browsers
        // send.
        assert_eq!(token[0], 0x60, "not a GSS-API token");
        assert!(
            token
                .windows(8)
                .any(|w| w == [0x06, 0x06, 0x2b, 0x06, 0x01, 0x05, 0x05, 0x02]),
            "not SPNEGO"
        );
        assert!(!format!("{ctx:?}").contains(&b64(&token)));

        let answer = kdc
            .negotiate_helper(&format!("YR {}", b64(&token)))
            .unwrap();
        let user = format!("{ALICE}@{REALM}");
        assert!(
            answer.starts_with("OK ") && answer.contains(&format!("user={user}"))
                || answer.starts_with("AF ") && answer.ends_with(&user),
            "squid's helper refused the token: {answer}\nKDC log:\n{}",
            kdc.log()
        );

        // The helper's answer token (mutual authentication) completes the handshake.
        let server_token = answer
            .split_whitespace()
            .find_map(|f| f.strip_prefix("token="))
            .or_else(|| {
                answer
                    .split_whitespace()
                    .nth(1)
                    .filter(|_| answer.starts_with("AF "))
            })
            .expect("the helper returns a token");
        let server_token = negotiate::parse_challenge(&format!("Negotiate {server_token}"))
            .flatten()
            .expect("base64 token");
        assert_eq!(ctx.step(Some(&server_token)).unwrap(), None);
        assert!(ctx.is_complete());

        // Raw Kerberos (the fallback when SPNEGO cannot start) is accepted by squid too.
        let mut ctx =
            NegotiateContext::new_with_package("HTTP@localhost", Package::Kerberos).unwrap();
        let token = ctx.step(None).unwrap().expect("a Kerberos token");
        let answer = kdc
            .negotiate_helper(&format!("YR {}", b64(&token)))
            .unwrap();
        assert!(answer.contains(&user), "raw Kerberos refused: {answer}");

        // A service the KDC does not know fails with the KDC's reason, on one line.
        let mut ctx = NegotiateContext::new("HTTP@unknown.sallyport.test").unwrap();
        let e = ctx.step(None).unwrap_err().to_string();
        assert!(e.contains("not found in Kerberos database"), "{e}");
        assert!(!e.contains('\n'), "{e}");
    });
}

#[test]
fn without_a_ticket_step_says_run_kinit() {
    let kdc = Kdc::start("krb-none").unwrap();
    // The realm exists but this user never ran kinit: the cache file does not exist.
    with_env(&kdc.env(), || {
        let e = negotiate::available().unwrap_err();
        assert!(matches!(e, NegotiateError::NoTicket { .. }), "{e:?}");
        let mut ctx = NegotiateContext::new("HTTP@localhost").unwrap();
        let e = ctx.step(None).unwrap_err();
        assert!(matches!(e, NegotiateError::NoTicket { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(msg.starts_with("no Kerberos ticket: run kinit"), "{msg}");
        assert!(msg.contains(&kdc.ccache().display().to_string()), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
    });
}

/// The everyday case: the laptop was asleep overnight and the ticket ran out.
#[test]
fn an_expired_ticket_says_run_kinit() {
    let kdc = Kdc::start("krb-expired").unwrap();
    kdc.kinit_with(ALICE, ALICE_PASSWORD, &["-l", "2s"])
        .unwrap();
    std::thread::sleep(std::time::Duration::from_secs(3));
    with_env(&kdc.env(), || {
        let e = negotiate::available().unwrap_err();
        assert!(matches!(e, NegotiateError::NoTicket { .. }), "{e:?}");
        let mut ctx = NegotiateContext::new("HTTP@localhost").unwrap();
        let e = ctx.step(None).unwrap_err();
        assert!(matches!(e, NegotiateError::NoTicket { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(msg.to_lowercase().contains("expired"), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
    });
}
