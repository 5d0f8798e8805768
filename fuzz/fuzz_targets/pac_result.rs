//! `egress::pac::parse_result`: the string a PAC script's `FindProxyForURL` returns (untrusted:
//! WPAD can be answered by anyone on the LAN), e.g. `PROXY a:3128; SOCKS5 [::1]:1080; DIRECT`.
//!
//! The input is taken as UTF-8 (lossily). Properties checked:
//! * no panic, whatever the input;
//! * input longer than `MAX_RESULT_LEN` is an error;
//! * a parsed list is non-empty and has at most `MAX_RESULT_ENTRIES` entries;
//! * every proxy has a non-empty host without whitespace, `;` or brackets, a non-zero port and
//!   no user; SOCKS entries let the proxy resolve names (`remote_dns`);
//! * the list printed back with `format_result` parses to the same list (when the printed text
//!   is within `MAX_RESULT_LEN`: `SOCKS h` prints as the longer `SOCKS5 h:1080`);
//! * an error message is bounded (it quotes the result shortened) and names the PAC result.
#![no_main]

use egress::pac::{format_result, parse_result, MAX_RESULT_ENTRIES, MAX_RESULT_LEN};
use egress::Proxy;
use libfuzzer_sys::fuzz_target;

fn check_host(s: &str, host: &str, port: u16) {
    assert!(!host.is_empty(), "{s:?} → empty host");
    assert!(
        !host.contains(|c: char| c.is_whitespace() || c == ';' || c == '[' || c == ']'),
        "{s:?} → host {host:?}"
    );
    assert_ne!(port, 0, "{s:?} → port 0");
}

fuzz_target!(|data: &[u8]| {
    let s = String::from_utf8_lossy(data);
    let s = s.as_ref();

    match parse_result(s) {
        Ok(list) => {
            assert!(s.len() <= MAX_RESULT_LEN, "{} bytes accepted", s.len());
            assert!(!list.is_empty(), "{s:?} → empty list");
            assert!(
                list.len() <= MAX_RESULT_ENTRIES,
                "{s:?} → {} entries",
                list.len()
            );
            for p in &list {
                match p {
                    Proxy::Direct => {}
                    Proxy::Http { host, port, user } => {
                        check_host(s, host, *port);
                        assert!(user.is_none(), "{s:?} → {p:?}");
                    }
                    Proxy::Socks5 {
                        host,
                        port,
                        user,
                        remote_dns,
                    } => {
                        check_host(s, host, *port);
                        assert!(user.is_none() && *remote_dns, "{s:?} → {p:?}");
                    }
                }
                let _ = p.to_string();
            }
            let text = format_result(&list);
            if text.len() > MAX_RESULT_LEN {
                return;
            }
            match parse_result(&text) {
                Ok(again) => assert_eq!(again, list, "{s:?} → {text:?} parses back differently"),
                Err(e) => panic!("{s:?} → {list:?} prints as {text:?}, which fails: {e}"),
            }
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.starts_with("PAC result `"), "{msg}");
            assert!(msg.len() < 1024, "{} bytes of message", msg.len());
        }
    }
});
