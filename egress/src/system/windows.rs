//! Windows: the per-user Internet Options (WinINET, what Edge, Chrome and most applications
//! follow), read from the registry under
//! `HKCU\Software\Microsoft\Windows\CurrentVersion\Internet Settings`, and the machine-wide
//! WinHTTP proxy (`netsh winhttp set proxy`, used by services).
//!
//! | value | meaning |
//! |---|---|
//! | `ProxyEnable` (DWORD) | the manual proxy is on |
//! | `ProxyServer` (string) | `host:port` for every protocol, or `http=h:p;https=h:p;socks=h:p` |
//! | `ProxyOverride` (string) | exceptions, `;`-separated; `<local>` = names without a dot |
//! | `AutoConfigURL` (string) | the PAC URL (present only while the option is on) |
//! | `Connections\DefaultConnectionSettings` (binary) | byte 8 holds the LAN flags; 0x08 = "Automatically detect settings" |
//!
//! The parsers are plain functions, compiled and tested everywhere; the registry and WinHTTP
//! calls exist only on Windows. WinINET's order is kept: auto-detect, script, manual proxy.

use super::{bypass_list, host_port, http_proxy, socks_proxy, SystemMode, SystemProxy};
use crate::proxy::Proxy;

/// The `source` of the per-user candidates.
pub const WININET_SOURCE: &str =
    r"Windows Internet Options (HKCU\Software\Microsoft\Windows\CurrentVersion\Internet Settings)";
/// The `source` of the machine-wide WinHTTP candidate.
pub const WINHTTP_SOURCE: &str = "WinHTTP machine settings (netsh winhttp show proxy)";
/// How warnings name WinHTTP's proxy string: `netsh winhttp set proxy` stores it in the binary
/// value `WinHttpSettings` under
/// `HKLM\SOFTWARE\Microsoft\Windows\CurrentVersion\Internet Settings\Connections`, which
/// `WinHttpGetDefaultProxyConfiguration` decodes for us.
pub const WINHTTP_VALUE: &str = "WinHTTP proxy (WinHttpSettings)";

/// The WinINET values as read from the registry (absent values are `None`/`false`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InternetSettings {
    pub proxy_enable: bool,
    pub proxy_server: Option<String>,
    pub proxy_override: Option<String>,
    pub auto_config_url: Option<String>,
    /// From `Connections\DefaultConnectionSettings`, when it could be read and parsed.
    pub connection_flags: Option<ConnectionFlags>,
}

/// The LAN settings flags (`PROXY_TYPE_*`) of a `DefaultConnectionSettings` blob.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnectionFlags {
    pub direct: bool,
    pub proxy: bool,
    pub auto_config_url: bool,
    pub auto_detect: bool,
}

/// The flags in byte 8 of `DefaultConnectionSettings` (after a 4-byte version and a 4-byte
/// change counter); `None` when the blob is too short to hold them.
pub fn parse_connection_flags(blob: &[u8]) -> Option<ConnectionFlags> {
    let flags = *blob.get(8)?;
    Some(ConnectionFlags {
        direct: flags & 0x01 != 0,
        proxy: flags & 0x02 != 0,
        auto_config_url: flags & 0x04 != 0,
        auto_detect: flags & 0x08 != 0,
    })
}

/// A parsed `ProxyServer` value: the proxy for HTTPS and the SOCKS proxy, and what was wrong
/// with the entries that were not used (each naming the value, for a warning).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProxyServer {
    pub https: Option<Proxy>,
    pub socks: Option<Proxy>,
    pub problems: Vec<String>,
}

/// The schemes WinINET knows in a `scheme=host:port` list; entries for the others are errors.
const KNOWN_SCHEMES: [&str; 5] = ["http", "https", "ftp", "socks", "gopher"];

/// One `host[:port]` entry of `ProxyServer`, or why it cannot be used.
fn proxy_address(entry: &str, default_port: u16) -> Result<(String, u16), String> {
    let e = entry.trim();
    let addr = e.split_once("://").map_or(e, |(_, rest)| rest);
    let addr = addr.trim_end_matches('/');
    if addr.contains(['/', '@']) {
        return Err("not host:port".into());
    }
    // The port, when one is written after the host (`[v6]:p`, `host:p`; a bare IPv6 has none).
    let port = if let Some(v6) = addr.strip_prefix('[') {
        v6.split_once(']').and_then(|(_, r)| r.strip_prefix(':'))
    } else if addr.matches(':').count() == 1 {
        addr.rsplit_once(':').map(|(_, p)| p)
    } else {
        None
    };
    if let Some(p) = port {
        if !p.is_empty() && !p.parse::<u16>().is_ok_and(|n| n > 0) {
            return Err(format!("port `{p}` is not a number from 1 to 65535"));
        }
    }
    host_port(addr, default_port).ok_or_else(|| "no host name".to_string())
}

/// `ProxyServer`: a value without `=` is one HTTP proxy for every protocol; otherwise only the
/// `https=` and `socks=` entries matter for a TLS tunnel (WinINET does not use the `http=` entry
/// for HTTPS). Missing ports are 80 (HTTP) and 1080 (SOCKS), as in WinINET. An entry that cannot
/// be used (a bad port, no host, an unknown scheme, a bare address in a `scheme=` list) is left
/// out and described in `problems`, naming the whole value.
pub fn parse_proxy_server(value: &str) -> ProxyServer {
    parse_proxy_string(value, "ProxyServer")
}

/// [`parse_proxy_server`] for a proxy string stored under another `name` (WinHTTP's).
fn parse_proxy_string(value: &str, name: &str) -> ProxyServer {
    let mut out = ProxyServer::default();
    let mut why_not = Vec::new();
    let trimmed = value.trim();
    let mut entries = trimmed.split([';', ' ', '\t']).filter(|e| !e.is_empty());
    if !trimmed.contains('=') {
        if let Some(first) = entries.next() {
            match proxy_address(first, 80) {
                Ok((h, p)) => out.https = Some(http_proxy(h, p)),
                Err(why) => why_not.push(why),
            }
        }
    } else {
        for entry in entries {
            let Some((scheme, addr)) = entry.split_once('=') else {
                why_not.push(format!(
                    "entry `{entry}` has no `scheme=` (write `https={entry}`, or one host:port alone)"
                ));
                continue;
            };
            match scheme.trim().to_ascii_lowercase().as_str() {
                "https" => match proxy_address(addr, 80) {
                    Ok((h, p)) => out.https = Some(http_proxy(h, p)),
                    Err(why) => why_not.push(format!("entry `{entry}`: {why}")),
                },
                "socks" => match proxy_address(addr, 1080) {
                    Ok((h, p)) => out.socks = Some(socks_proxy(h, p)),
                    Err(why) => why_not.push(format!("entry `{entry}`: {why}")),
                },
                s if KNOWN_SCHEMES.contains(&s) => {}
                s => why_not.push(format!(
                    "unknown scheme `{s}=` (WinINET knows {})",
                    KNOWN_SCHEMES.map(|k| format!("{k}=")).join(", ")
                )),
            }
        }
    }
    out.problems = why_not
        .into_iter()
        .map(|why| format!("{name} \"{}\": {why}", value.escape_debug()))
        .collect();
    out
}

/// What is wrong with the settings that are switched on (each naming the value); the
/// candidates leave those parts out. Logged as warnings when the registry is read (so
/// `sallyport doctor` shows them).
pub fn problems(s: &InternetSettings) -> Vec<String> {
    let mut out = Vec::new();
    if s.proxy_enable {
        match s.proxy_server.as_deref().map(str::trim) {
            None | Some("") => out.push(
                "ProxyEnable is 1 but ProxyServer is empty: no manual proxy is used".to_string(),
            ),
            Some(v) => out.extend(parse_proxy_server(v).problems),
        }
    }
    if let Some(url) = s.auto_config_url.as_deref().map(str::trim) {
        if !url.is_empty() {
            let scheme = url.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
            if !matches!(scheme.as_deref(), Some("http" | "https" | "file")) {
                out.push(format!(
                    "AutoConfigURL \"{}\": not an http://, https:// or file:// URL; the PAC script is not used",
                    url.escape_debug()
                ));
            }
        }
    }
    out
}

/// `ProxyOverride` (and WinHTTP's bypass list): `;`- or space-separated exceptions.
pub fn parse_proxy_override(value: &str) -> Vec<String> {
    bypass_list(value, &[';', ' ', '\t', '\r', '\n'])
}

/// The per-user candidates in WinINET's order: auto-detect, the PAC URL, the manual proxy;
/// direct when none is on.
pub fn candidates(s: &InternetSettings) -> Vec<SystemProxy> {
    let mut modes = Vec::new();
    if s.connection_flags.is_some_and(|f| f.auto_detect) {
        modes.push(SystemMode::Wpad);
    }
    if let Some(url) = s.auto_config_url.as_deref().map(str::trim) {
        let scheme = url.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
        if matches!(scheme.as_deref(), Some("http" | "https" | "file")) {
            modes.push(SystemMode::Pac(url.to_string()));
        }
    }
    if s.proxy_enable {
        let ProxyServer { https, socks, .. } =
            parse_proxy_server(s.proxy_server.as_deref().unwrap_or(""));
        if https.is_some() || socks.is_some() {
            modes.push(SystemMode::Manual {
                https,
                socks,
                no_proxy: parse_proxy_override(s.proxy_override.as_deref().unwrap_or("")),
            });
        }
    }
    if modes.is_empty() {
        modes.push(SystemMode::Direct);
    }
    modes
        .into_iter()
        .map(|mode| SystemProxy {
            source: WININET_SOURCE.to_string(),
            mode,
        })
        .collect()
}

/// The WinHTTP candidate for a named proxy (`WINHTTP_ACCESS_TYPE_NAMED_PROXY`); `None` when the
/// proxy string names nothing usable.
pub fn winhttp_candidate(proxy: &str, bypass: &str) -> Option<SystemProxy> {
    let ProxyServer {
        https,
        socks,
        problems,
    } = parse_proxy_string(proxy, WINHTTP_VALUE);
    for p in problems {
        tracing::warn!("WinHTTP setting ignored: {p}");
    }
    if https.is_none() && socks.is_none() {
        return None;
    }
    Some(SystemProxy {
        source: WINHTTP_SOURCE.to_string(),
        mode: SystemMode::Manual {
            https,
            socks,
            no_proxy: parse_proxy_override(bypass),
        },
    })
}

#[cfg(windows)]
pub(super) use reading::{policy, read};

#[cfg(windows)]
mod reading {
    use super::*;
    use crate::policy::{self, Policy, RegValue};
    use std::ptr;
    use windows_sys::Win32::Foundation::{GlobalFree, ERROR_MORE_DATA, ERROR_SUCCESS};
    use windows_sys::Win32::Networking::WinHttp::{
        WinHttpGetDefaultProxyConfiguration, WINHTTP_ACCESS_TYPE_NAMED_PROXY, WINHTTP_PROXY_INFO,
    };
    use windows_sys::Win32::System::Registry::{
        RegCloseKey, RegEnumValueW, RegGetValueW, RegOpenKeyExW, HKEY, HKEY_CURRENT_USER,
        HKEY_LOCAL_MACHINE, KEY_READ, REG_DWORD, REG_SZ, RRF_RT_REG_BINARY, RRF_RT_REG_DWORD,
        RRF_RT_REG_SZ,
    };

    const KEY: &str = r"Software\Microsoft\Windows\CurrentVersion\Internet Settings";
    const CONNECTIONS: &str =
        r"Software\Microsoft\Windows\CurrentVersion\Internet Settings\Connections";

    fn wide(s: &str) -> Vec<u16> {
        s.encode_utf16().chain(std::iter::once(0)).collect()
    }

    /// The raw data of `HKCU\subkey\name` of the types in `flags`; `None` when absent.
    fn value(subkey: &str, name: &str, flags: u32) -> Option<Vec<u8>> {
        hive_value(HKEY_CURRENT_USER, subkey, name, flags)
    }

    /// The raw data of `hive\subkey\name` of the types in `flags`; `None` when absent.
    fn hive_value(hive: HKEY, subkey: &str, name: &str, flags: u32) -> Option<Vec<u8>> {
        let subkey_w = wide(subkey);
        let name_w = wide(name);
        let mut size = 0u32;
        // SAFETY: both names are NUL-terminated UTF-16 alive for the call; a null data pointer
        // asks only for the size, written to `size`.
        let rc = unsafe {
            RegGetValueW(
                hive,
                subkey_w.as_ptr(),
                name_w.as_ptr(),
                flags,
                ptr::null_mut(),
                ptr::null_mut(),
                &mut size,
            )
        };
        if rc != ERROR_SUCCESS {
            tracing::debug!(
                key = subkey,
                value = name,
                code = rc,
                "registry value not read"
            );
            return None;
        }
        // The value may grow between the two calls; try a few times.
        for _ in 0..3 {
            let mut buf = vec![0u8; size as usize];
            // SAFETY: `buf` has `size` writable bytes and `size` says so; the names as above.
            let rc = unsafe {
                RegGetValueW(
                    hive,
                    subkey_w.as_ptr(),
                    name_w.as_ptr(),
                    flags,
                    ptr::null_mut(),
                    buf.as_mut_ptr().cast(),
                    &mut size,
                )
            };
            match rc {
                ERROR_SUCCESS => {
                    buf.truncate(size as usize);
                    return Some(buf);
                }
                ERROR_MORE_DATA => continue,
                _ => {
                    tracing::debug!(
                        key = subkey,
                        value = name,
                        code = rc,
                        "registry value not read"
                    );
                    return None;
                }
            }
        }
        None
    }

    fn dword(subkey: &str, name: &str) -> Option<u32> {
        let b = value(subkey, name, RRF_RT_REG_DWORD)?;
        Some(u32::from_le_bytes(b.get(..4)?.try_into().ok()?))
    }

    fn string(subkey: &str, name: &str) -> Option<String> {
        Some(utf16_bytes(&value(subkey, name, RRF_RT_REG_SZ)?))
    }

    fn utf16_bytes(b: &[u8]) -> String {
        let units: Vec<u16> = b
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|u| *u != 0)
            .collect();
        String::from_utf16_lossy(&units)
    }

    /// A DWORD under HKLM (`key` as written in [`crate::policy`], with its `HKLM\` prefix).
    fn machine_dword(key: &str, name: &str) -> Option<u32> {
        let subkey = key.strip_prefix(r"HKLM\").unwrap_or(key);
        let b = hive_value(HKEY_LOCAL_MACHINE, subkey, name, RRF_RT_REG_DWORD)?;
        Some(u32::from_le_bytes(b.get(..4)?.try_into().ok()?))
    }

    /// Every string and DWORD value of an HKLM key (at most 64); empty when it is absent.
    fn machine_values(key: &str) -> Vec<(String, RegValue)> {
        let subkey = wide(key.strip_prefix(r"HKLM\").unwrap_or(key));
        let mut hkey: HKEY = ptr::null_mut();
        // SAFETY: the name is NUL-terminated UTF-16; `hkey` receives an open key, closed below.
        if unsafe { RegOpenKeyExW(HKEY_LOCAL_MACHINE, subkey.as_ptr(), 0, KEY_READ, &mut hkey) }
            != ERROR_SUCCESS
        {
            return Vec::new();
        }
        let mut out = Vec::new();
        for index in 0..64u32 {
            let mut name = [0u16; 256];
            let mut name_len = name.len() as u32;
            let mut kind = 0u32;
            let mut data = [0u8; 512];
            let mut data_len = data.len() as u32;
            // SAFETY: every buffer is as long as the length passed with it.
            let rc = unsafe {
                RegEnumValueW(
                    hkey,
                    index,
                    name.as_mut_ptr(),
                    &mut name_len,
                    ptr::null(),
                    &mut kind,
                    data.as_mut_ptr(),
                    &mut data_len,
                )
            };
            if rc == ERROR_MORE_DATA {
                continue; // not one of ours: our values are short
            }
            if rc != ERROR_SUCCESS {
                break;
            }
            let name = String::from_utf16_lossy(&name[..name_len as usize]);
            let data = &data[..data_len as usize];
            let value = match kind {
                REG_SZ => RegValue::Sz(utf16_bytes(data)),
                REG_DWORD if data.len() >= 4 => {
                    RegValue::Dword(u32::from_le_bytes([data[0], data[1], data[2], data[3]]))
                }
                _ => continue,
            };
            out.push((name, value));
        }
        // SAFETY: `hkey` was opened above and is closed once.
        unsafe { RegCloseKey(hkey) };
        out
    }

    /// Sallyport's policy key, and Windows' own WPAD switch.
    pub(in crate::system) fn policy() -> Result<Policy, String> {
        let mut p = Policy::from_registry(&machine_values(policy::REGISTRY_KEY))?;
        if p.wpad.is_none() {
            p.wpad = policy::windows_wpad_off(
                policy::WINHTTP_KEYS.map(|k| machine_dword(k, "DisableWpad")),
                machine_dword(policy::AUTOPROXY_SERVICE_KEY, "Start"),
            );
        }
        Ok(p)
    }

    /// A WinHTTP-allocated wide string, copied and freed.
    fn take_global_wide(p: *mut u16) -> String {
        if p.is_null() {
            return String::new();
        }
        let mut len = 0usize;
        // SAFETY: WinHTTP returns a NUL-terminated string; the scan is bounded in case it is not.
        while len < 65_536 && unsafe { *p.add(len) } != 0 {
            len += 1;
        }
        // SAFETY: the `len` units before the NUL were just read above.
        let s = String::from_utf16_lossy(unsafe { std::slice::from_raw_parts(p, len) });
        // SAFETY: WinHttpGetDefaultProxyConfiguration allocates its strings with GlobalAlloc and
        // the caller frees them, once.
        unsafe { GlobalFree(p.cast()) };
        s
    }

    fn winhttp() -> Option<SystemProxy> {
        let mut info = WINHTTP_PROXY_INFO {
            dwAccessType: 0,
            lpszProxy: ptr::null_mut(),
            lpszProxyBypass: ptr::null_mut(),
        };
        // SAFETY: `info` is a valid out-structure; its strings are freed by take_global_wide.
        let ok = unsafe { WinHttpGetDefaultProxyConfiguration(&mut info) };
        let proxy = take_global_wide(info.lpszProxy);
        let bypass = take_global_wide(info.lpszProxyBypass);
        if ok == 0 {
            tracing::debug!("WinHttpGetDefaultProxyConfiguration failed");
            return None;
        }
        if info.dwAccessType != WINHTTP_ACCESS_TYPE_NAMED_PROXY {
            return None;
        }
        winhttp_candidate(&proxy, &bypass)
    }

    pub(in crate::system) fn read() -> Vec<SystemProxy> {
        let settings = InternetSettings {
            proxy_enable: dword(KEY, "ProxyEnable").is_some_and(|v| v != 0),
            proxy_server: string(KEY, "ProxyServer"),
            proxy_override: string(KEY, "ProxyOverride"),
            auto_config_url: string(KEY, "AutoConfigURL"),
            connection_flags: value(CONNECTIONS, "DefaultConnectionSettings", RRF_RT_REG_BINARY)
                .and_then(|b| parse_connection_flags(&b)),
        };
        for p in problems(&settings) {
            tracing::warn!("Windows proxy setting ignored: {p}");
        }
        let mut out = candidates(&settings);
        out.extend(winhttp());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http(h: &str, p: u16) -> Option<Proxy> {
        Some(http_proxy(h.into(), p))
    }

    fn pair(v: &str) -> (Option<Proxy>, Option<Proxy>) {
        let p = parse_proxy_server(v);
        assert!(p.problems.is_empty(), "{v}: {:?}", p.problems);
        (p.https, p.socks)
    }

    #[test]
    fn proxy_server_forms() {
        assert_eq!(pair("proxy.corp:8080"), (http("proxy.corp", 8080), None));
        assert_eq!(pair("proxy.corp"), (http("proxy.corp", 80), None));
        assert_eq!(
            pair("http=web.corp:80;https=tls.corp:3128;ftp=ftp.corp:21;socks=socks.corp:1081"),
            (
                http("tls.corp", 3128),
                Some(socks_proxy("socks.corp".into(), 1081))
            )
        );
        // Only an http= entry: WinINET sends HTTPS direct.
        assert_eq!(pair("http=web.corp:80"), (None, None));
        assert_eq!(
            pair("HTTPS=http://tls.corp:3128; socks=s.corp"),
            (
                http("tls.corp", 3128),
                Some(socks_proxy("s.corp".into(), 1080))
            )
        );
        assert_eq!(
            pair("socks=[fd00::1]:1081"),
            (None, Some(socks_proxy("fd00::1".into(), 1081)))
        );
        assert_eq!(pair(""), (None, None));
    }

    #[test]
    fn bad_proxy_server_values_are_rejected_naming_the_value() {
        let cases = [
            (
                "proxy.corp:99999",
                "port `99999` is not a number from 1 to 65535",
            ),
            ("proxy.corp:0", "port `0`"),
            ("https=bad:port", "port `port`"),
            (":8080", "no host name"),
            ("http=a:1;b:2", "entry `b:2` has no `scheme=`"),
            ("htps=tls.corp:3128", "unknown scheme `htps=`"),
            (
                "https=user@tls.corp:3128",
                "entry `https=user@tls.corp:3128`: not host:port",
            ),
        ];
        for (value, why) in cases {
            let p = parse_proxy_server(value);
            assert_eq!(p.https, None, "{value}");
            assert_eq!(p.problems.len(), 1, "{value}: {:?}", p.problems);
            let msg = &p.problems[0];
            assert!(
                msg.starts_with(&format!("ProxyServer \"{value}\": ")) && msg.contains(why),
                "{value}: {msg}"
            );
        }
        // The good entries of a list are kept.
        let p = parse_proxy_server("https=tls.corp:3128;socks=s.corp:70000");
        assert_eq!(p.https, http("tls.corp", 3128));
        assert_eq!(p.socks, None);
        assert!(
            p.problems[0].contains("entry `socks=s.corp:70000`: port `70000`"),
            "{:?}",
            p.problems
        );
    }

    #[test]
    fn settings_problems_name_the_value_and_leave_it_out() {
        let s = InternetSettings {
            proxy_enable: true,
            proxy_server: Some(" ".into()),
            auto_config_url: Some("ftp://wpad.corp/proxy.pac".into()),
            ..Default::default()
        };
        let p = problems(&s);
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].contains("ProxyServer is empty"));
        assert!(p[1].contains("AutoConfigURL \"ftp://wpad.corp/proxy.pac\""));
        assert_eq!(candidates(&s)[0].mode, SystemMode::Direct);
        // Switched off, a stale ProxyServer is no problem.
        let off = InternetSettings {
            proxy_server: Some("proxy.corp:99999".into()),
            ..Default::default()
        };
        assert!(problems(&off).is_empty());
    }

    #[test]
    fn overrides() {
        assert_eq!(
            parse_proxy_override("*.corp;10.*;<local>; ;intranet"),
            vec![".corp", "10.*", "<local>", "intranet"]
        );
        assert!(parse_proxy_override("").is_empty());
    }

    #[test]
    fn connection_flags_are_read_defensively() {
        let mut blob = vec![0x46, 0, 0, 0, 7, 0, 0, 0, 0x09, 0, 0, 0];
        assert_eq!(
            parse_connection_flags(&blob),
            Some(ConnectionFlags {
                direct: true,
                auto_detect: true,
                ..Default::default()
            })
        );
        blob[8] = 0x07;
        let f = parse_connection_flags(&blob).unwrap();
        assert!(f.direct && f.proxy && f.auto_config_url && !f.auto_detect);
        assert_eq!(parse_connection_flags(&blob[..8]), None);
        assert_eq!(parse_connection_flags(&[]), None);
    }

    #[test]
    fn candidates_follow_wininet_order() {
        let s = InternetSettings {
            proxy_enable: true,
            proxy_server: Some("proxy.corp:3128".into()),
            proxy_override: Some("<local>;*.corp".into()),
            auto_config_url: Some("http://wpad.corp/proxy.pac".into()),
            connection_flags: parse_connection_flags(&[0x46, 0, 0, 0, 1, 0, 0, 0, 0x0f]),
        };
        let modes: Vec<_> = candidates(&s).into_iter().map(|c| c.mode).collect();
        assert_eq!(
            modes,
            vec![
                SystemMode::Wpad,
                SystemMode::Pac("http://wpad.corp/proxy.pac".into()),
                SystemMode::Manual {
                    https: http("proxy.corp", 3128),
                    socks: None,
                    no_proxy: vec!["<local>".into(), ".corp".into()],
                }
            ]
        );
        // The proxy string stays in the registry when the checkbox is off.
        let off = InternetSettings {
            proxy_enable: false,
            proxy_server: Some("proxy.corp:3128".into()),
            ..Default::default()
        };
        let c = candidates(&off);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].mode, SystemMode::Direct);
        assert_eq!(c[0].source, WININET_SOURCE);
    }

    #[test]
    fn winhttp_named_proxy() {
        let c = winhttp_candidate("proxy.corp:8080", "<local>;*.corp").unwrap();
        assert_eq!(c.source, WINHTTP_SOURCE);
        assert_eq!(
            c.mode,
            SystemMode::Manual {
                https: http("proxy.corp", 8080),
                socks: None,
                no_proxy: vec!["<local>".into(), ".corp".into()],
            }
        );
        assert_eq!(winhttp_candidate("", ""), None);
    }

    #[test]
    fn a_bad_winhttp_proxy_is_named_as_winhttps_value_not_as_proxyserver() {
        // `netsh winhttp set proxy 127.0.0.1:99999` is accepted by netsh; the agent leaves it
        // out and the warning names WinHTTP's value, so nobody looks in Internet Options.
        assert_eq!(winhttp_candidate("127.0.0.1:99999", ""), None);
        let p = parse_proxy_string("127.0.0.1:99999", WINHTTP_VALUE);
        assert_eq!(
            p.problems,
            vec![
                r#"WinHTTP proxy (WinHttpSettings) "127.0.0.1:99999": port `99999` is not a number from 1 to 65535"#
            ]
        );
        // The good entries of a list are still used.
        let c = winhttp_candidate("https=tls.corp:3128;socks=s.corp:0", "").unwrap();
        assert!(
            matches!(c.mode, SystemMode::Manual { ref https, ref socks, .. } if *https == http("tls.corp", 3128) && socks.is_none())
        );
    }
}
