//! macOS: the proxy settings of the primary network service, as `scutil --proxy` prints them
//! (SystemConfiguration's dictionary in its text form). Parsing is a plain function, compiled
//! and tested everywhere; only running `/usr/sbin/scutil` is macOS-only.
//!
//! ```text
//! <dictionary> {
//!   ExceptionsList : <array> {
//!     0 : *.local
//!     1 : 169.254/16
//!   }
//!   HTTPSEnable : 1
//!   HTTPSPort : 3128
//!   HTTPSProxy : proxy.corp
//!   ProxyAutoConfigEnable : 1
//!   ProxyAutoConfigURLString : http://wpad.corp/proxy.pac
//! }
//! ```
//!
//! CFNetwork's order: auto-discovery (WPAD), then the PAC URL, then the manual proxies.

use super::{bypass_list, host_port, http_proxy, socks_proxy, SystemMode, SystemProxy};
use std::collections::HashMap;

/// The `source` of macOS candidates.
pub const SOURCE: &str = "macOS network settings (scutil --proxy)";

/// The candidates in `scutil --proxy` output: WPAD, PAC and manual in that order when enabled,
/// else one direct candidate; empty when the text is not such a dictionary.
pub fn parse_scutil(text: &str) -> Vec<SystemProxy> {
    let mut depth = 0usize;
    let mut top: HashMap<&str, &str> = HashMap::new();
    let mut exceptions: Vec<&str> = Vec::new();
    let mut in_exceptions = false;
    let mut seen_root = false;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if line == "}" {
            depth = depth.saturating_sub(1);
            if depth < 2 {
                in_exceptions = false;
            }
            continue;
        }
        let (key, value) = match line.split_once(" : ") {
            Some((k, v)) => (k.trim(), v.trim()),
            None => ("", line),
        };
        if value.ends_with('{') {
            // `<dictionary> {` or `<array> {`: a nested container.
            if depth == 0 {
                seen_root = true;
            }
            if depth == 1 && key == "ExceptionsList" {
                in_exceptions = true;
            }
            depth += 1;
            continue;
        }
        match depth {
            1 => {
                top.insert(key, value);
            }
            2 if in_exceptions => exceptions.push(value),
            _ => {}
        }
    }
    if !seen_root {
        return Vec::new();
    }
    let on = |k: &str| top.get(k).is_some_and(|v| *v == "1");
    let mut modes = Vec::new();
    if on("ProxyAutoDiscoveryEnable") {
        modes.push(SystemMode::Wpad);
    }
    if on("ProxyAutoConfigEnable") {
        if let Some(url) = top
            .get("ProxyAutoConfigURLString")
            .filter(|u| !u.is_empty())
        {
            modes.push(SystemMode::Pac(url.to_string()));
        }
    }
    let server = |enable: &str, host: &str, port: &str, default_port: u16| {
        if !on(enable) {
            return None;
        }
        let (h, p) = host_port(top.get(host)?, default_port)?;
        let p = top
            .get(port)
            .and_then(|v| v.parse::<u16>().ok())
            .filter(|p| *p != 0)
            .unwrap_or(p);
        Some((h, p))
    };
    let https = server("HTTPSEnable", "HTTPSProxy", "HTTPSPort", 80).map(|(h, p)| http_proxy(h, p));
    let socks =
        server("SOCKSEnable", "SOCKSProxy", "SOCKSPort", 1080).map(|(h, p)| socks_proxy(h, p));
    if https.is_some() || socks.is_some() {
        let mut no_proxy = bypass_list(&exceptions.join(","), &[',']);
        if on("ExcludeSimpleHostnames") {
            no_proxy.push("<local>".into());
        }
        modes.push(SystemMode::Manual {
            https,
            socks,
            no_proxy,
        });
    }
    if modes.is_empty() {
        modes.push(SystemMode::Direct);
    }
    modes
        .into_iter()
        .map(|mode| SystemProxy {
            source: SOURCE.to_string(),
            mode,
        })
        .collect()
}

/// Runs `scutil --proxy` (bounded) and parses it.
#[cfg(target_os = "macos")]
pub(super) fn read() -> Vec<SystemProxy> {
    let out = super::run_bounded(
        std::path::Path::new("/usr/sbin/scutil"),
        &["--proxy"],
        &[],
        std::time::Duration::from_secs(2),
    );
    out.map(|t| parse_scutil(&t)).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = "<dictionary> {
  ExceptionsList : <array> {
    0 : *.local
    1 : 169.254/16
    2 : *.corp.example
  }
  ExcludeSimpleHostnames : 1
  FTPPassive : 1
  HTTPEnable : 1
  HTTPPort : 8080
  HTTPProxy : web.corp
  HTTPSEnable : 1
  HTTPSPort : 3128
  HTTPSProxy : proxy.corp
  ProxyAutoConfigEnable : 1
  ProxyAutoConfigURLString : http://wpad.corp/proxy.pac
  ProxyAutoDiscoveryEnable : 1
  SOCKSEnable : 1
  SOCKSPort : 1080
  SOCKSProxy : socks.corp
  __SCOPED__ : <dictionary> {
    en0 : <dictionary> {
      HTTPSEnable : 0
      ExceptionsList : <array> {
        0 : nested.example
      }
    }
  }
}
";

    #[test]
    fn everything_enabled_gives_wpad_pac_then_manual() {
        let c = parse_scutil(FULL);
        let modes: Vec<_> = c.iter().map(|c| c.mode.clone()).collect();
        assert_eq!(
            modes,
            vec![
                SystemMode::Wpad,
                SystemMode::Pac("http://wpad.corp/proxy.pac".into()),
                SystemMode::Manual {
                    https: Some(http_proxy("proxy.corp".into(), 3128)),
                    socks: Some(socks_proxy("socks.corp".into(), 1080)),
                    no_proxy: vec![
                        ".local".into(),
                        "169.254.0.0/16".into(),
                        ".corp.example".into(),
                        "<local>".into()
                    ],
                },
            ]
        );
        assert!(c.iter().all(|c| c.source == SOURCE));
    }

    #[test]
    fn defaults_are_direct_and_garbage_is_nothing() {
        let defaults = "<dictionary> {\n  ExceptionsList : <array> {\n    0 : *.local\n    1 : 169.254/16\n  }\n  FTPPassive : 1\n}\n";
        assert_eq!(
            parse_scutil(defaults)
                .into_iter()
                .map(|c| c.mode)
                .collect::<Vec<_>>(),
            vec![SystemMode::Direct]
        );
        assert!(parse_scutil("").is_empty());
        assert!(parse_scutil("scutil: command not found").is_empty());
    }

    #[test]
    fn disabled_entries_and_pac_without_url_are_ignored() {
        let text = "<dictionary> {\n  HTTPSEnable : 0\n  HTTPSProxy : proxy.corp\n  HTTPSPort : 3128\n  ProxyAutoConfigEnable : 1\n  SOCKSEnable : 1\n  SOCKSProxy : socks.corp\n}\n";
        assert_eq!(
            parse_scutil(text)
                .into_iter()
                .map(|c| c.mode)
                .collect::<Vec<_>>(),
            vec![SystemMode::Manual {
                https: None,
                socks: Some(socks_proxy("socks.corp".into(), 1080)),
                no_proxy: vec![],
            }]
        );
    }
}
