//! The agent's user-facing parsers: `agent::config::parse_dest` (`HOST:PORT`, `[v6]:PORT`),
//! `Forward::from_str` (`--forward LOCAL=HOST:PORT`, `forwards = [...]` in agent.toml) and
//! `egress::GatewayUrl::parse` (`--gateway`, and the connector's gateway URL).
//!
//! The input is taken as UTF-8 (lossily) and given to all three. Properties checked:
//! * no parser panics, and neither do `GatewayUrl`'s `endpoint`, `authority` and `Display`;
//! * a parsed destination has a non-empty host and a non-zero port, and prints as text that parses
//!   back to it (for hosts without `[`/`]`: these parsers do not validate host characters, the
//!   gateway's `parse_host` does, so a host such as `[a` cannot be expected to round-trip);
//! * a parsed forward's destination is `parse_dest` of the text after the first `=`, and
//!   `LISTEN=DEST` printed back parses to the same forward;
//! * a parsed gateway URL prints as a URL that parses back to it (same caveat on `[`/`]`), and its
//!   prefix is empty or starts with `/` and never ends with `/`.
#![no_main]

use agent::config::{parse_dest, Forward};
use egress::GatewayUrl;
use libfuzzer_sys::fuzz_target;

fn plain_host(h: &str) -> bool {
    !h.contains(['[', ']'])
}

fuzz_target!(|data: &[u8]| {
    let s = String::from_utf8_lossy(data);
    let s = s.as_ref();

    if let Ok(d) = parse_dest(s) {
        assert!(!d.host.is_empty() && d.port != 0, "{s:?} → {d:?}");
        if plain_host(&d.host) {
            let text = d.to_string();
            match parse_dest(&text) {
                Ok(again) => assert_eq!(again, d, "{s:?} → {text:?} parses back differently"),
                Err(e) => panic!("{s:?} → {d:?} prints as {text:?}, which fails: {e}"),
            }
        }
    }

    if let Ok(f) = s.parse::<Forward>() {
        let (_, dest_text) = s.split_once('=').expect("a forward has '='");
        assert_eq!(parse_dest(dest_text).as_ref(), Ok(&f.dest));
        if plain_host(&f.dest.host) {
            let text = format!("{}={}", f.listen, f.dest);
            match text.parse::<Forward>() {
                Ok(again) => assert_eq!(again, f, "{s:?} → {text:?} parses back differently"),
                Err(e) => panic!("{s:?} → {f:?} prints as {text:?}, which fails: {e}"),
            }
        }
    }

    if let Ok(u) = GatewayUrl::parse(s) {
        assert!(!u.host.is_empty(), "{s:?} → {u:?}");
        assert!(
            u.prefix.is_empty() || u.prefix.starts_with('/'),
            "{s:?} → {u:?}"
        );
        assert!(!u.prefix.ends_with('/'), "{s:?} → {u:?}");
        let _ = u.endpoint("agent");
        let _ = u.endpoint("connector");
        let _ = u.authority();
        let text = u.to_string();
        if plain_host(&u.host) {
            match GatewayUrl::parse(&text) {
                Ok(again) => assert_eq!(again, u, "{s:?} → {text:?} parses back differently"),
                Err(e) => panic!("{s:?} → {u:?} prints as {text:?}, which fails: {e}"),
            }
        }
    }
});
