//! The gateway's answer to `GET {prefix}/key`, as `sallyport enroll` reads it
//! (`agent::enroll::parse_keys`) before it has authenticated anything (through a TLS-inspecting
//! proxy, the TLS key seen is the proxy's), and what enroll then writes into `agent.toml`
//! (`gateway_key = …`, `gateway_inner_key = …` via `agent::enroll::toml_str`).
//!
//! The input is the response as read (enroll reads at most 16 KiB). Properties checked:
//! * no panic;
//! * an answer whose status is not `200` yields no keys;
//! * the TLS pin has no line breaks or surrounding whitespace;
//! * the inner key prints as text that parses back to it;
//! * an `agent.toml` written from the answer, as enroll writes it, parses
//!   (`agent::config::parse_file`) to exactly the values the gateway sent: a hostile answer
//!   cannot add or change other settings (`proxy = …`, `ca = …`).
#![no_main]

use std::path::Path;

use agent::enroll::{parse_keys, toml_str, MARKER};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let data = &data[..data.len().min(16 * 1024)];
    let Ok((inner, tls)) = parse_keys(data) else {
        return;
    };
    let text = String::from_utf8_lossy(data);
    let head = text.split_once("\r\n\r\n").map_or(&*text, |(h, _)| h);
    if head.split_whitespace().nth(1) != Some("200") {
        assert!(inner.is_none() && tls.is_none());
    }
    if let Some(k) = &inner {
        let again: tunnel::inner::PublicKey = k.to_string().parse().expect("inner key reparses");
        assert_eq!(&again, k);
    }
    if let Some(t) = &tls {
        assert!(!t.contains('\n'), "{t:?}");
        assert_eq!(t.trim(), t);
    }
    if inner.is_none() && tls.is_none() {
        return;
    }
    let mut toml = format!(
        "{MARKER}\ngateway = {}\ntoken_file = \"agent.token\"\n",
        toml_str("wss://gw.example.com")
    );
    if let Some(t) = &tls {
        toml.push_str(&format!("gateway_key = {}\n", toml_str(t)));
    }
    if let Some(k) = &inner {
        toml.push_str(&format!(
            "gateway_inner_key = {}\n",
            toml_str(&k.to_string())
        ));
    }
    let file = agent::config::parse_file(&toml, Path::new("agent.toml"))
        .unwrap_or_else(|e| panic!("enroll would write an agent.toml it cannot read: {e}\n{toml}"));
    assert_eq!(
        file.gateway.map(|g| g.into_vec()),
        Some(vec!["wss://gw.example.com".to_string()])
    );
    assert_eq!(file.gateway_key, tls);
    assert_eq!(file.gateway_inner_key, inner.map(|k| k.to_string()));
    assert!(
        file.proxy.is_none() && file.ca.is_none() && file.pac.is_none() && !file.token_keychain
    );
});
