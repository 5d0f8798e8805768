//! The string `FindProxyForURL` returns, e.g. `PROXY a.corp:3128; SOCKS5 b.corp:1080; DIRECT`,
//! into an ordered failover list of [`Proxy`] values.
//!
//! Entries are separated by `;`; each is a keyword (any case) and, except for `DIRECT`, one
//! `host[:port]` (`[v6]:port` for IPv6 literals):
//!
//! | entry | becomes | default port |
//! |---|---|---|
//! | `DIRECT` | [`Proxy::Direct`] | |
//! | `PROXY h:p`, `HTTP h:p` | [`Proxy::Http`] | 80 (as browsers) |
//! | `SOCKS5 h:p`, `SOCKS h:p` | [`Proxy::Socks5`], the proxy resolving names | 1080 |
//! | `HTTPS h:p`, `SOCKS4 h:p`, anything else | skipped, with a warning | |
//!
//! `SOCKS` means SOCKS4 in the Netscape specification; we have no SOCKS4 client and treat it as
//! SOCKS5 (as curl does with libproxy's `socks://`): nearly every SOCKS server speaks 5, and one
//! that does not fails the handshake so the next entry is tried. Malformed entries (no host, a
//! bad port, stray words) are skipped like unsupported ones: a PAC with one typo in a long list
//! still works. A result with nothing usable is an error, as is one longer than
//! [`MAX_RESULT_LEN`]; at most [`MAX_RESULT_ENTRIES`] entries are kept.

use super::{shorten, PacError, ResultProblem};
use crate::proxy::Proxy;
use std::net::Ipv6Addr;

/// Longest result accepted (8 KiB): real ones are a few dozen bytes.
pub const MAX_RESULT_LEN: usize = 8 << 10;
/// Most entries kept from one result; later ones are ignored.
pub const MAX_RESULT_ENTRIES: usize = 32;

/// Parses a PAC result into an ordered failover list (never empty on success).
pub fn parse_result(s: &str) -> Result<Vec<Proxy>, PacError> {
    let err = |problem| PacError::Result {
        result: shorten(s.trim(), 120),
        problem,
    };
    if s.len() > MAX_RESULT_LEN {
        return Err(err(ResultProblem::TooLong(s.len())));
    }
    let mut out = Vec::new();
    for entry in s.split(';').map(str::trim).filter(|e| !e.is_empty()) {
        if out.len() == MAX_RESULT_ENTRIES {
            tracing::warn!(
                result = %shorten(s, 200),
                "PAC result has more than {MAX_RESULT_ENTRIES} entries; ignoring the rest"
            );
            break;
        }
        match parse_entry(entry) {
            Ok(p) => out.push(p),
            Err(why) => {
                tracing::warn!(entry = %shorten(entry, 100), "skipping PAC result entry: {why}")
            }
        }
    }
    if out.is_empty() {
        return Err(err(ResultProblem::NoUsableEntry));
    }
    Ok(out)
}

/// The list as a PAC result string (`PROXY h:p; SOCKS5 h:p; DIRECT`), e.g. for logs. Users are
/// not part of PAC results and are left out.
pub fn format_result(list: &[Proxy]) -> String {
    let hp = |h: &str, p: u16| {
        if h.contains(':') {
            format!("[{h}]:{p}")
        } else {
            format!("{h}:{p}")
        }
    };
    list.iter()
        .map(|p| match p {
            Proxy::Direct => "DIRECT".to_string(),
            Proxy::Http { host, port, .. } => format!("PROXY {}", hp(host, *port)),
            Proxy::Socks5 { host, port, .. } => format!("SOCKS5 {}", hp(host, *port)),
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn parse_entry(entry: &str) -> Result<Proxy, &'static str> {
    let mut words = entry.split_whitespace();
    let keyword = words.next().unwrap_or("").to_ascii_uppercase();
    let target = words.next();
    if words.next().is_some() {
        return Err("expected `KEYWORD host:port`");
    }
    let (default_port, socks) = match keyword.as_str() {
        "DIRECT" => {
            return match target {
                None => Ok(Proxy::Direct),
                Some(_) => Err("DIRECT takes no address"),
            }
        }
        "PROXY" | "HTTP" => (80, false),
        "SOCKS" | "SOCKS5" => (1080, true),
        "HTTPS" => return Err("HTTPS (TLS to the proxy) is not supported"),
        "SOCKS4" | "SOCKS4A" => return Err("SOCKS4 is not supported"),
        _ => return Err("unknown keyword"),
    };
    let (host, port) = split_host_port(target.ok_or("no proxy address")?, default_port)?;
    Ok(if socks {
        Proxy::Socks5 {
            host,
            port,
            user: None,
            remote_dns: true,
        }
    } else {
        Proxy::Http {
            host,
            port,
            user: None,
        }
    })
}

/// `host`, `host:port`, `[v6]`, `[v6]:port`; the host is a DNS name or an IP literal.
fn split_host_port(s: &str, default_port: u16) -> Result<(String, u16), &'static str> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest.split_once(']').ok_or("unclosed [ in the address")?;
        h.parse::<Ipv6Addr>()
            .map_err(|_| "not an IPv6 address in [ ]")?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or("junk after ]")?),
        };
        (h, port)
    } else {
        match s.split_once(':') {
            Some((_, p)) if p.contains(':') => {
                return Err("IPv6 addresses must be written in brackets, [::1]:3128")
            }
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    if !s.starts_with('[') && !valid_name(host) {
        return Err("not a host name or address");
    }
    let port = match port {
        None => default_port,
        Some(p) if !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()) => {
            match p.parse::<u16>() {
                Ok(0) | Err(_) => return Err("bad port"),
                Ok(p) => p,
            }
        }
        Some(_) => return Err("bad port"),
    };
    Ok((host.to_string(), port))
}

/// DNS names (letters, digits, `-`, `_`, dots between non-empty labels) and IPv4 literals.
fn valid_name(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.trim_end_matches('.').split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http(h: &str, p: u16) -> Proxy {
        Proxy::Http {
            host: h.into(),
            port: p,
            user: None,
        }
    }
    fn socks(h: &str, p: u16) -> Proxy {
        Proxy::Socks5 {
            host: h.into(),
            port: p,
            user: None,
            remote_dns: true,
        }
    }

    #[test]
    fn pac_results_become_failover_lists() {
        assert_eq!(
            parse_result("PROXY a:3128; SOCKS5 b:1080; DIRECT").unwrap(),
            vec![http("a", 3128), socks("b", 1080), Proxy::Direct]
        );
        assert_eq!(parse_result("DIRECT").unwrap(), vec![Proxy::Direct]);
        assert_eq!(parse_result("  direct ;").unwrap(), vec![Proxy::Direct]);
        assert_eq!(
            parse_result("proxy Proxy.Corp:8080;;http\tb.corp:81 ;Socks c:1081").unwrap(),
            vec![
                http("Proxy.Corp", 8080),
                http("b.corp", 81),
                socks("c", 1081)
            ]
        );
    }

    #[test]
    fn pac_result_default_ports_and_ipv6() {
        assert_eq!(
            parse_result("PROXY p.corp; SOCKS s.corp; SOCKS5 10.0.0.1").unwrap(),
            vec![
                http("p.corp", 80),
                socks("s.corp", 1080),
                socks("10.0.0.1", 1080)
            ]
        );
        assert_eq!(
            parse_result("PROXY [::1]:3128; SOCKS5 [fe80::1]; PROXY [2001:db8::2]:8080").unwrap(),
            vec![
                http("::1", 3128),
                socks("fe80::1", 1080),
                http("2001:db8::2", 8080)
            ]
        );
    }

    #[test]
    fn pac_result_unsupported_and_malformed_entries_are_skipped() {
        assert_eq!(
            parse_result("HTTPS secure:443; SOCKS4 old:1080; QUIC q:443; PROXY ok:1").unwrap(),
            vec![http("ok", 1)]
        );
        for bad in [
            "PROXY",
            "PROXY :3128",
            "PROXY a:",
            "PROXY a:0",
            "PROXY a:65536",
            "PROXY a:99999999999999999999",
            "PROXY a:+80",
            "PROXY a:80 b:81",
            "PROXY a b",
            "PROXY ::1:3128",
            "PROXY [::1",
            "PROXY [nope]:80",
            "PROXY [::1]x",
            "PROXY user@host:80",
            "PROXY http://host:80",
            "PROXY a..b:80",
            "PROXY a/b",
            "DIRECT now",
            "SOCKS5 ünïcode:1080",
        ] {
            let r = parse_result(&format!("{bad}; DIRECT")).unwrap();
            assert_eq!(r, vec![Proxy::Direct], "{bad}");
            assert!(parse_result(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn pac_result_without_usable_entry_is_an_error() {
        for bad in ["", "   ", ";;;", "HTTPS a:443", "nonsense", "PROXY"] {
            let e = parse_result(bad).unwrap_err().to_string();
            assert!(e.contains("no usable entry"), "{bad:?}: {e}");
            assert!(e.starts_with("PAC result `"), "{e}");
        }
    }

    #[test]
    fn pac_result_is_bounded() {
        let long = format!("DIRECT;{}", " ".repeat(MAX_RESULT_LEN));
        let e = parse_result(&long).unwrap_err().to_string();
        assert!(e.contains("longer than the 8 KiB"), "{e}");
        assert!(e.len() < 300, "{e}");

        let many = vec!["PROXY p:1"; 100].join(";");
        assert_eq!(parse_result(&many).unwrap().len(), MAX_RESULT_ENTRIES);
    }

    #[test]
    fn pac_result_formats_back() {
        let list = parse_result("PROXY a:3128; SOCKS [::1]:1080; DIRECT").unwrap();
        let text = format_result(&list);
        assert_eq!(text, "PROXY a:3128; SOCKS5 [::1]:1080; DIRECT");
        assert_eq!(parse_result(&text).unwrap(), list);
    }

    /// The properties of the `pac_result` fuzz target, on pseudo-random soups of PAC tokens.
    #[test]
    fn pac_result_properties_hold_on_token_soup() {
        const TOKENS: &[&str] = &[
            "PROXY",
            "proxy",
            "HTTP",
            "HTTPS",
            "SOCKS",
            "socks5",
            "SOCKS4",
            "DIRECT",
            "QUIC",
            " ",
            "  ",
            "\t",
            ";",
            ";",
            ":",
            "::",
            "[",
            "]",
            "[::1]",
            "::ffff:1.2.3.4",
            "a",
            "b.corp",
            "10.0.0.1",
            "3128",
            "0",
            "65535",
            "65536",
            "80",
            "-",
            "_",
            ".",
            "é",
            "\0",
            "@",
            "/",
        ];
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for round in 0..20_000 {
            let n = (next() % 24) as usize;
            let mut s = String::new();
            for _ in 0..n {
                s.push_str(TOKENS[(next() % TOKENS.len() as u64) as usize]);
            }
            if round % 1000 == 0 {
                // Long hosts and many entries, near the limits.
                let host = "h".repeat(240);
                s = vec![format!("SOCKS {host}"); 33].join(";");
            }
            match parse_result(&s) {
                Ok(list) => {
                    assert!(s.len() <= MAX_RESULT_LEN);
                    assert!(
                        !list.is_empty() && list.len() <= MAX_RESULT_ENTRIES,
                        "{s:?}"
                    );
                    for p in &list {
                        if let Proxy::Http { host, port, user }
                        | Proxy::Socks5 {
                            host, port, user, ..
                        } = p
                        {
                            assert!(!host.is_empty() && *port != 0 && user.is_none(), "{s:?}");
                            assert!(
                                !host.contains(
                                    |c: char| c.is_whitespace() || matches!(c, ';' | '[' | ']')
                                ),
                                "{s:?} → {host:?}"
                            );
                        }
                    }
                    let text = format_result(&list);
                    if text.len() <= MAX_RESULT_LEN {
                        assert_eq!(parse_result(&text).unwrap(), list, "{s:?} → {text:?}");
                    }
                }
                Err(e) => {
                    let msg = e.to_string();
                    assert!(msg.starts_with("PAC result `") && msg.len() < 1024, "{msg}");
                }
            }
        }
    }
}
