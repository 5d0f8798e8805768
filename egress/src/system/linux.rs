//! Linux desktops: GNOME's `org.gnome.system.proxy` (through `gsettings`, which also covers
//! Cinnamon, MATE, Budgie and others using GNOME's settings) and KDE Plasma's
//! `~/.config/kioslaverc`.
//!
//! The parsers take text — `gsettings list-recursively` output with its GVariant values
//! (`'manual'`, `@as []`, `['localhost', '127.0.0.0/8']`, `uint32 3128`), the kioslaverc file —
//! and are compiled and tested on every platform. GNOME follows glib's resolver: the HTTPS
//! proxy for TLS, else the HTTP proxy; `auto` without a URL means WPAD; `manual` without any host
//! means direct.

use super::{bypass_list, host_port, http_proxy, socks_proxy, SystemMode, SystemProxy};
use crate::proxy::Proxy;
use std::collections::HashMap;

/// The `source` of GNOME candidates.
pub const GNOME_SOURCE: &str = "GNOME settings (org.gnome.system.proxy)";
const GNOME_SCHEMA: &str = "org.gnome.system.proxy";

/// A GVariant text string (`'manual'`, `"it's"`, with `\` escapes); `None` when `v` is not one.
pub fn gvariant_string(v: &str) -> Option<String> {
    let (s, rest) = string_at(v.trim())?;
    rest.trim().is_empty().then_some(s)
}

/// A GVariant string array (`['a', 'b']`, `@as []`).
pub fn gvariant_strings(v: &str) -> Option<Vec<String>> {
    let v = v.trim();
    let v = v.strip_prefix("@as").unwrap_or(v).trim_start();
    let mut rest = v.strip_prefix('[')?;
    let mut out = Vec::new();
    loop {
        rest = rest.trim_start();
        if let Some(r) = rest.strip_prefix(']') {
            return r.trim().is_empty().then_some(out);
        }
        let (s, r) = string_at(rest)?;
        out.push(s);
        rest = r.trim_start();
        if let Some(r) = rest.strip_prefix(',') {
            rest = r;
        } else if !rest.starts_with(']') {
            return None;
        }
    }
}

/// A GVariant integer, with or without its type (`3128`, `uint32 3128`, `int32 3128`).
pub fn gvariant_int(v: &str) -> Option<i64> {
    v.split_whitespace().last()?.parse().ok()
}

/// A quoted string at the start of `s` and what follows it.
fn string_at(s: &str) -> Option<(String, &str)> {
    let quote = s.chars().next().filter(|c| *c == '\'' || *c == '"')?;
    let mut out = String::new();
    let mut chars = s[1..].char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '\\' => match chars.next()?.1 {
                'n' => out.push('\n'),
                't' => out.push('\t'),
                'r' => out.push('\r'),
                other => out.push(other),
            },
            c if c == quote => return Some((out, &s[1 + i + 1..])),
            c => out.push(c),
        }
    }
    None
}

/// GNOME's proxy settings from `gsettings list-recursively org.gnome.system.proxy` output;
/// `None` when the schema is not in it or the mode is unknown.
pub fn parse_gnome(listing: &str) -> Option<SystemProxy> {
    let mut values: HashMap<(&str, &str), &str> = HashMap::new();
    for line in listing.lines() {
        let mut parts = line.splitn(3, ' ');
        let (Some(schema), Some(key), Some(value)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        // Only what we use: the listing also holds the HTTP proxy password.
        if matches!(
            key,
            "mode" | "autoconfig-url" | "ignore-hosts" | "host" | "port"
        ) {
            values.insert((schema, key), value);
        }
    }
    let get = |sub: &str, key: &str| {
        let schema = format!("{GNOME_SCHEMA}{sub}");
        values.get(&(schema.as_str(), key)).copied()
    };
    let mode = gvariant_string(get("", "mode")?)?;
    let mode = match mode.as_str() {
        "none" => SystemMode::Direct,
        "auto" => {
            let url = get("", "autoconfig-url")
                .and_then(gvariant_string)
                .unwrap_or_default();
            if url.trim().is_empty() {
                SystemMode::Wpad
            } else {
                SystemMode::Pac(url.trim().to_string())
            }
        }
        "manual" => {
            let server = |sub: &str, default_port: u16| {
                let host = gvariant_string(get(sub, "host")?)?;
                let (host, port) = host_port(&host, default_port)?;
                let port = get(sub, "port")
                    .and_then(gvariant_int)
                    .and_then(|p| u16::try_from(p).ok())
                    .filter(|p| *p != 0)
                    .unwrap_or(port);
                Some((host, port))
            };
            let https = server(".https", 80)
                .or_else(|| server(".http", 80))
                .map(|(h, p)| http_proxy(h, p));
            let socks = server(".socks", 1080).map(|(h, p)| socks_proxy(h, p));
            let no_proxy = get("", "ignore-hosts")
                .and_then(gvariant_strings)
                .map(|hosts| bypass_list(&hosts.join(","), &[',']))
                .unwrap_or_default();
            if https.is_none() && socks.is_none() {
                SystemMode::Direct
            } else {
                SystemMode::Manual {
                    https,
                    socks,
                    no_proxy,
                }
            }
        }
        other => {
            tracing::debug!(mode = other, "unknown GNOME proxy mode");
            return None;
        }
    };
    Some(SystemProxy {
        source: GNOME_SOURCE.to_string(),
        mode,
    })
}

/// The `source` of KDE candidates read from `path`.
pub fn kde_source(path: &str) -> String {
    format!("KDE settings ({path} [Proxy Settings])")
}

/// KDE's proxy settings from a kioslaverc file; `None` when it has no `[Proxy Settings]`.
/// `env` resolves the variable names KDE stores for "use system proxy configuration"
/// (`ProxyType=4`).
pub fn parse_kioslaverc(text: &str, env: impl Fn(&str) -> Option<String>) -> Option<SystemMode> {
    let mut in_section = false;
    let mut seen = false;
    let mut values: HashMap<String, String> = HashMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        if line.starts_with('[') && !line.contains('=') {
            in_section = line == "[Proxy Settings]";
            seen |= in_section;
            continue;
        }
        if !in_section {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            // `httpsProxy[$e]=…`: drop KConfig's flags/locale suffix.
            let key = k.split('[').next().unwrap_or(k).trim();
            values.insert(key.to_string(), v.trim().to_string());
        }
    }
    if !seen {
        return None;
    }
    let get = |k: &str| values.get(k).map(String::as_str).unwrap_or("");
    let proxy_type = get("ProxyType").parse::<u8>().unwrap_or(0);
    let manual = |resolve: &dyn Fn(&str) -> String| {
        let https = kde_proxy(&resolve(get("httpsProxy")), false);
        let socks = kde_proxy(&resolve(get("socksProxy")), true);
        let mut no_proxy = bypass_list(&resolve(get("NoProxyFor")), &[',', ' ']);
        if get("ReversedException") == "true" {
            // "Use the proxy only for these hosts" cannot be said with exceptions.
            tracing::debug!("KDE ReversedException is not supported; ignoring the list");
            no_proxy.clear();
        }
        if https.is_none() && socks.is_none() {
            SystemMode::Direct
        } else {
            SystemMode::Manual {
                https,
                socks,
                no_proxy,
            }
        }
    };
    Some(match proxy_type {
        1 => manual(&|v: &str| v.to_string()),
        2 => match get("Proxy Config Script") {
            "" => SystemMode::Direct,
            url => SystemMode::Pac(url.to_string()),
        },
        3 => SystemMode::Wpad,
        4 => manual(&|names: &str| {
            names
                .split(',')
                .map(|n| n.trim().trim_start_matches('$'))
                .filter(|n| !n.is_empty())
                .find_map(|n| env(n).filter(|v| !v.trim().is_empty()))
                .unwrap_or_default()
        }),
        _ => SystemMode::Direct,
    })
}

/// A KDE proxy value: `http://proxy.corp 3128` (KDE's own form), `http://proxy.corp:3128`,
/// `proxy.corp:3128`; `socks://…` in the SOCKS field.
fn kde_proxy(value: &str, socks: bool) -> Option<Proxy> {
    let value = value.trim();
    if value.is_empty() {
        return None;
    }
    let joined;
    let value = match value.rsplit_once(' ') {
        Some((url, port)) if port.chars().all(|c| c.is_ascii_digit()) => {
            joined = format!("{}:{port}", url.trim().trim_end_matches('/'));
            joined.as_str()
        }
        _ => value,
    };
    let scheme = value
        .split_once("://")
        .map(|(s, _)| s.to_ascii_lowercase())
        .unwrap_or_default();
    if socks || scheme.starts_with("socks") {
        let (h, p) = host_port(value, 1080)?;
        return Some(socks_proxy(h, p));
    }
    if scheme == "https" {
        tracing::debug!("KDE proxy with https:// (TLS to the proxy) is not supported");
        return None;
    }
    let (h, p) = host_port(value, 80)?;
    Some(http_proxy(h, p))
}

#[cfg(all(unix, not(target_os = "macos")))]
pub(super) use reading::read;

#[cfg(all(unix, not(target_os = "macos")))]
mod reading {
    use super::*;
    use std::time::Duration;

    const GSETTINGS_TIMEOUT: Duration = Duration::from_secs(2);

    /// The desktop's own settings first.
    pub(in crate::system) fn read() -> Vec<SystemProxy> {
        let env = |k: &str| std::env::var(k).ok();
        let kde_first = env("XDG_CURRENT_DESKTOP").is_some_and(|d| {
            d.split(':')
                .any(|x| x.eq_ignore_ascii_case("KDE") || x.eq_ignore_ascii_case("plasma"))
        });
        let gnome = read_gnome(&[]);
        let kde = read_kde(env);
        let mut out: Vec<SystemProxy> = if kde_first {
            kde.into_iter().chain(gnome).collect()
        } else {
            gnome.into_iter().chain(kde).collect()
        };
        out.dedup();
        out
    }

    /// GNOME through `gsettings` (when on PATH), with `envs` added for the child.
    pub(super) fn read_gnome(envs: &[(&str, &str)]) -> Option<SystemProxy> {
        let Some(gsettings) = crate::system::find_on_path("gsettings") else {
            tracing::debug!("gsettings not on PATH; no GNOME proxy settings");
            return None;
        };
        let listing = crate::system::run_bounded(
            &gsettings,
            &["list-recursively", GNOME_SCHEMA],
            envs,
            GSETTINGS_TIMEOUT,
        )?;
        parse_gnome(&listing)
    }

    fn read_kde(env: impl Fn(&str) -> Option<String>) -> Option<SystemProxy> {
        let config = env("XDG_CONFIG_HOME")
            .filter(|d| !d.is_empty())
            .map(std::path::PathBuf::from)
            .or_else(|| env("HOME").map(|h| std::path::Path::new(&h).join(".config")))?;
        let path = config.join("kioslaverc");
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) => {
                tracing::debug!(path = %path.display(), error = %e, "no KDE proxy settings");
                return None;
            }
        };
        let mode = parse_kioslaverc(&text, env)?;
        Some(SystemProxy {
            source: kde_source(&path.display().to_string()),
            mode,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http(h: &str, p: u16) -> Option<Proxy> {
        Some(http_proxy(h.into(), p))
    }
    fn socks(h: &str, p: u16) -> Option<Proxy> {
        Some(socks_proxy(h.into(), p))
    }

    #[test]
    fn gvariant_values() {
        assert_eq!(gvariant_string("'manual'").as_deref(), Some("manual"));
        assert_eq!(gvariant_string("''").as_deref(), Some(""));
        assert_eq!(gvariant_string(r#""it's""#).as_deref(), Some("it's"));
        assert_eq!(gvariant_string(r"'a\'b\\c'").as_deref(), Some(r"a'b\c"));
        assert_eq!(gvariant_string("manual"), None);
        assert_eq!(gvariant_string("'open"), None);
        assert_eq!(gvariant_strings("@as []"), Some(vec![]));
        assert_eq!(gvariant_strings("[]"), Some(vec![]));
        assert_eq!(
            gvariant_strings("['localhost', '127.0.0.0/8', \"it's\",'::1']"),
            Some(vec![
                "localhost".to_string(),
                "127.0.0.0/8".into(),
                "it's".into(),
                "::1".into()
            ])
        );
        assert_eq!(gvariant_strings("['a' 'b']"), None);
        assert_eq!(gvariant_strings("['a',"), None);
        assert_eq!(gvariant_int("uint32 3128"), Some(3128));
        assert_eq!(gvariant_int("int32 8080"), Some(8080));
        assert_eq!(gvariant_int("3128"), Some(3128));
        assert_eq!(gvariant_int("'x'"), None);
    }

    const DEFAULTS: &str = "org.gnome.system.proxy autoconfig-url ''
org.gnome.system.proxy ignore-hosts ['localhost', '127.0.0.0/8', '::1']
org.gnome.system.proxy mode 'none'
org.gnome.system.proxy use-same-proxy true
org.gnome.system.proxy.ftp host ''
org.gnome.system.proxy.ftp port 0
org.gnome.system.proxy.http authentication-password ''
org.gnome.system.proxy.http authentication-user ''
org.gnome.system.proxy.http enabled false
org.gnome.system.proxy.http host ''
org.gnome.system.proxy.http port 8080
org.gnome.system.proxy.http use-authentication false
org.gnome.system.proxy.https host ''
org.gnome.system.proxy.https port 0
org.gnome.system.proxy.socks host ''
org.gnome.system.proxy.socks port 0
";

    fn gnome(changes: &[(&str, &str)]) -> SystemMode {
        let mut text = DEFAULTS.to_string();
        for (k, v) in changes {
            text.push_str(&format!("{k} {v}\n"));
        }
        parse_gnome(&text).expect("parsed").mode
    }

    #[test]
    fn gnome_modes() {
        assert_eq!(gnome(&[]), SystemMode::Direct);
        assert_eq!(
            gnome(&[("org.gnome.system.proxy", "mode 'auto'")]),
            SystemMode::Wpad
        );
        assert_eq!(
            gnome(&[
                ("org.gnome.system.proxy", "mode 'auto'"),
                (
                    "org.gnome.system.proxy",
                    "autoconfig-url 'http://wpad.corp/proxy.pac'"
                )
            ]),
            SystemMode::Pac("http://wpad.corp/proxy.pac".into())
        );
        assert_eq!(
            gnome(&[
                ("org.gnome.system.proxy", "mode 'manual'"),
                ("org.gnome.system.proxy.https", "host 'proxy.corp'"),
                ("org.gnome.system.proxy.https", "port 3128"),
                ("org.gnome.system.proxy.socks", "host 'socks.corp'"),
                ("org.gnome.system.proxy.socks", "port uint32 1081"),
                (
                    "org.gnome.system.proxy",
                    "ignore-hosts ['*.corp', '10.0.0.0/8']"
                ),
            ]),
            SystemMode::Manual {
                https: http("proxy.corp", 3128),
                socks: socks("socks.corp", 1081),
                no_proxy: vec![".corp".into(), "10.0.0.0/8".into()],
            }
        );
        // No HTTPS proxy: glib uses the HTTP one for https URLs.
        assert_eq!(
            gnome(&[
                ("org.gnome.system.proxy", "mode 'manual'"),
                ("org.gnome.system.proxy.http", "host 'web.corp'"),
            ]),
            SystemMode::Manual {
                https: http("web.corp", 8080),
                socks: None,
                no_proxy: vec!["localhost".into(), "127.0.0.0/8".into(), "::1".into()],
            }
        );
        // Manual without any host is direct.
        assert_eq!(
            gnome(&[("org.gnome.system.proxy", "mode 'manual'")]),
            SystemMode::Direct
        );
        assert_eq!(parse_gnome("No such schema"), None);
        assert_eq!(parse_gnome(""), None);
    }

    #[test]
    fn gnome_never_keeps_the_password() {
        let text = format!(
            "{DEFAULTS}org.gnome.system.proxy mode 'manual'\norg.gnome.system.proxy.http host 'p'\norg.gnome.system.proxy.http authentication-password 'hunter2'\n"
        );
        let c = parse_gnome(&text).unwrap();
        assert!(!format!("{c:?}{c}").contains("hunter2"));
    }

    fn kde(text: &str) -> Option<SystemMode> {
        parse_kioslaverc(text, |k| match k {
            "HTTPS_PROXY" => Some("http://envproxy.corp:3128".into()),
            "NO_PROXY" => Some("localhost,.corp".into()),
            _ => None,
        })
    }

    #[test]
    fn kde_modes() {
        assert_eq!(kde("[General]\nfoo=bar\n"), None);
        assert_eq!(
            kde("[Proxy Settings]\nProxyType=0\n"),
            Some(SystemMode::Direct)
        );
        assert_eq!(kde("[Proxy Settings]\n"), Some(SystemMode::Direct));
        assert_eq!(
            kde("[Proxy Settings]\nProxyType=2\nProxy Config Script=http://wpad.corp/p.pac\n"),
            Some(SystemMode::Pac("http://wpad.corp/p.pac".into()))
        );
        assert_eq!(
            kde("[Proxy Settings]\nProxyType=3\n"),
            Some(SystemMode::Wpad)
        );
        let text = "[General]\nhttpsProxy=http://wrong 1\n\n[Proxy Settings]\nNoProxyFor=localhost,*.corp\nProxyType=1\nReversedException=false\nhttpProxy=http://web.corp 8080\nhttpsProxy[$e]=http://proxy.corp 3128\nsocksProxy=socks://socks.corp 1080\n\n[Other]\nProxyType=3\n";
        assert_eq!(
            kde(text),
            Some(SystemMode::Manual {
                https: http("proxy.corp", 3128),
                socks: socks("socks.corp", 1080),
                no_proxy: vec!["localhost".into(), ".corp".into()],
            })
        );
        assert_eq!(
            kde("[Proxy Settings]\nProxyType=1\nhttpsProxy=proxy.corp:3129\n"),
            Some(SystemMode::Manual {
                https: http("proxy.corp", 3129),
                socks: None,
                no_proxy: vec![],
            })
        );
        // ProxyType=4: the values are names of environment variables.
        assert_eq!(
            kde("[Proxy Settings]\nProxyType=4\nhttpsProxy=HTTPS_PROXY\nsocksProxy=ALL_PROXY\nNoProxyFor=NO_PROXY\n"),
            Some(SystemMode::Manual {
                https: http("envproxy.corp", 3128),
                socks: None,
                no_proxy: vec!["localhost".into(), ".corp".into()],
            })
        );
        assert_eq!(
            kde("[Proxy Settings]\nProxyType=1\nhttpsProxy=\n"),
            Some(SystemMode::Direct)
        );
    }

    #[test]
    fn kde_proxy_forms() {
        assert_eq!(kde_proxy("http://p.corp 3128", false), http("p.corp", 3128));
        assert_eq!(
            kde_proxy("http://p.corp:3128/", false),
            http("p.corp", 3128)
        );
        assert_eq!(kde_proxy("p.corp", false), http("p.corp", 80));
        assert_eq!(kde_proxy("http://[::1] 3128", false), http("::1", 3128));
        assert_eq!(
            kde_proxy("socks://s.corp 1080", true),
            socks("s.corp", 1080)
        );
        assert_eq!(kde_proxy("s.corp", true), socks("s.corp", 1080));
        assert_eq!(kde_proxy("https://tls.corp 443", false), None);
        assert_eq!(kde_proxy("", false), None);
    }

    /// The real `gsettings`, with glib's keyfile backend in a scratch folder so the test
    /// neither needs D-Bus nor touches the user's settings.
    #[cfg(all(unix, not(target_os = "macos")))]
    #[test]
    fn gnome_settings_through_the_real_gsettings() {
        let Some(gsettings) = crate::system::find_on_path("gsettings") else {
            eprintln!("gsettings not installed (libglib2.0-bin); skipping");
            return;
        };
        let dir = std::env::temp_dir().join(format!("sallyport-gsettings-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let dir_s = dir.display().to_string();
        let envs = [
            ("GSETTINGS_BACKEND", "keyfile"),
            ("XDG_CONFIG_HOME", dir_s.as_str()),
        ];
        let has_schema = std::process::Command::new(&gsettings)
            .args(["list-keys", GNOME_SCHEMA])
            .envs(envs)
            .output()
            .is_ok_and(|o| o.status.success());
        if !has_schema {
            let _ = std::fs::remove_dir_all(&dir);
            eprintln!("{GNOME_SCHEMA} not installed (gsettings-desktop-schemas); skipping");
            return;
        }
        let set = |schema: &str, key: &str, value: &str| {
            let ok = std::process::Command::new(&gsettings)
                .args(["set", schema, key, value])
                .envs(envs)
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            assert!(ok, "gsettings set {schema} {key} {value}");
        };
        set("org.gnome.system.proxy", "mode", "manual");
        set("org.gnome.system.proxy.https", "host", "proxy.corp");
        set("org.gnome.system.proxy.https", "port", "3128");
        set(
            "org.gnome.system.proxy",
            "ignore-hosts",
            "['*.corp', 'localhost']",
        );
        set(
            "org.gnome.system.proxy.http",
            "authentication-password",
            "hunter2",
        );
        let got = reading::read_gnome(&envs);
        let _ = std::fs::remove_dir_all(&dir);
        let got = got.expect("a GNOME candidate");
        assert_eq!(got.source, GNOME_SOURCE);
        assert_eq!(
            got.mode,
            SystemMode::Manual {
                https: http("proxy.corp", 3128),
                socks: None,
                no_proxy: vec![".corp".into(), "localhost".into()],
            }
        );
    }
}
