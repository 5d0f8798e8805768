//! The operating system's proxy settings, read as candidates for the way out: what the user (or
//! the company's device management) configured for browsers, so the agent finds the corporate
//! proxy without being told.
//!
//! | platform | source | how |
//! |---|---|---|
//! | Linux, GNOME (and desktops using its settings) | `org.gnome.system.proxy` | `gsettings list-recursively` |
//! | Linux, KDE Plasma | `~/.config/kioslaverc`, `[Proxy Settings]` | the file |
//! | macOS | System Settings → Network → Proxies | `scutil --proxy` |
//! | Windows | Internet Options (WinINET, per user) | the registry under HKCU |
//! | Windows | WinHTTP (machine, `netsh winhttp set proxy`) | `WinHttpGetDefaultProxyConfiguration` |
//!
//! [`read`] never fails: a missing tool, file or key only means no candidate from that source
//! (a `tracing` debug line says which). Every parser is a plain function over text or bytes,
//! compiled and tested on every platform; only the reading (running a tool, opening the
//! registry) is platform-specific. External tools run with a short timeout.
//!
//! Candidates come in the order the platform's own HTTP stacks try them: automatic detection
//! (WPAD), then the configuration script (PAC), then manual proxies; a source with none of
//! these yields [`SystemMode::Direct`]. On Linux the current desktop's settings come first
//! (`XDG_CURRENT_DESKTOP`). Exceptions (`no_proxy`) are normalised towards curl's `NO_PROXY`
//! form where the meaning is the same: `*.corp` → `.corp`, `169.254/16` → `169.254.0.0/16`;
//! `<local>` stands for "names without a dot" (Windows `<local>`, macOS "Exclude simple
//! hostnames"); other wildcards (`10.*`) are kept as written.
//!
//! SOCKS proxies from system settings become `socks5h` (the proxy resolves names, as browsers
//! do with system SOCKS settings). Windows' `socks=` entry is SOCKS4 for WinINET; SOCKS servers
//! there usually speak both.
//!
//! Passwords stored in system settings (GNOME's `authentication-password`) are never read into
//! candidates nor logged.

pub mod linux;
pub mod macos;
pub mod windows;

pub use macos::parse_scutil;

use crate::proxy::Proxy;
use std::fmt;

/// One source's proxy configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SystemProxy {
    /// Where it comes from, for logs and `sallyport doctor`, e.g.
    /// `GNOME settings (org.gnome.system.proxy)`.
    pub source: String,
    pub mode: SystemMode,
}

/// What a source says about the way out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SystemMode {
    /// No proxy.
    Direct,
    /// Fixed proxies: `https` for TLS connections (HTTP `CONNECT`), `socks` as the
    /// alternative; hosts matching `no_proxy` go direct.
    Manual {
        https: Option<Proxy>,
        socks: Option<Proxy>,
        no_proxy: Vec<String>,
    },
    /// A proxy auto-configuration script at this URL.
    Pac(String),
    /// Automatic detection (WPAD: DHCP option 252, then `http://wpad/wpad.dat`).
    Wpad,
}

impl fmt::Display for SystemMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SystemMode::Direct => f.write_str("direct"),
            SystemMode::Pac(url) => write!(f, "PAC {url}"),
            SystemMode::Wpad => f.write_str("WPAD (automatic detection)"),
            SystemMode::Manual {
                https,
                socks,
                no_proxy,
            } => {
                f.write_str("manual")?;
                if let Some(p) = https {
                    write!(f, " https={p}")?;
                }
                if let Some(p) = socks {
                    write!(f, " socks={p}")?;
                }
                if !no_proxy.is_empty() {
                    write!(f, " no_proxy={}", no_proxy.join(","))?;
                }
                Ok(())
            }
        }
    }
}

impl fmt::Display for SystemProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.source, self.mode)
    }
}

/// The OS's proxy settings, most relevant first; empty when there are none to read.
pub fn read() -> Vec<SystemProxy> {
    let found = read_platform();
    for c in &found {
        tracing::debug!(candidate = %c, "system proxy setting");
    }
    found
}

#[cfg(windows)]
fn read_platform() -> Vec<SystemProxy> {
    windows::read()
}

/// The admin policy in the Windows registry ([`crate::policy`]): Sallyport's key and Windows'
/// own switch that turns WPAD off. Nothing elsewhere.
pub fn registry_policy() -> Result<crate::policy::Policy, String> {
    #[cfg(windows)]
    return windows::policy();
    #[cfg(not(windows))]
    Ok(crate::policy::Policy::default())
}

#[cfg(target_os = "macos")]
fn read_platform() -> Vec<SystemProxy> {
    macos::read()
}

#[cfg(all(unix, not(target_os = "macos")))]
fn read_platform() -> Vec<SystemProxy> {
    linux::read()
}

#[cfg(not(any(unix, windows)))]
fn read_platform() -> Vec<SystemProxy> {
    Vec::new()
}

/// An HTTP proxy (tunnelling with CONNECT).
fn http_proxy(host: String, port: u16) -> Proxy {
    Proxy::Http {
        host,
        port,
        user: None,
    }
}

/// A SOCKS proxy; the proxy resolves names (see the module docs).
fn socks_proxy(host: String, port: u16) -> Proxy {
    Proxy::Socks5 {
        host,
        port,
        user: None,
        remote_dns: true,
    }
}

/// Splits `host`, `host:port`, `[v6]`, `[v6]:port` (after an optional `scheme://` and before an
/// optional `/…`); a missing or zero port becomes `default_port`. `None` for an empty host or a
/// bad port.
fn host_port(s: &str, default_port: u16) -> Option<(String, u16)> {
    let s = s.trim();
    let s = s.split_once("://").map_or(s, |(_, rest)| rest);
    let s = s.split('/').next().unwrap_or("");
    let s = s.rsplit_once('@').map_or(s, |(_, hp)| hp);
    let (host, port) = if let Some(v6) = s.strip_prefix('[') {
        let (h, rest) = v6.split_once(']')?;
        match rest.strip_prefix(':') {
            Some(p) => (h, Some(p)),
            None if rest.is_empty() => (h, None),
            None => return None,
        }
    } else if s.matches(':').count() > 1 {
        // A bare IPv6 address has no port.
        (s, None)
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    if host.is_empty() || host.contains(char::is_whitespace) {
        return None;
    }
    let port = match port {
        None | Some("") => default_port,
        Some(p) => match p.parse::<u16>().ok()? {
            0 => default_port,
            n => n,
        },
    };
    Some((host.to_string(), port))
}

/// One exception entry in (mostly) curl's `NO_PROXY` form; `None` for an empty entry.
fn normalize_bypass(entry: &str) -> Option<String> {
    let e = entry.trim();
    if e.is_empty() {
        return None;
    }
    if e.eq_ignore_ascii_case("<local>") {
        return Some("<local>".into());
    }
    if let Some(rest) = e.strip_prefix("*.") {
        if !rest.is_empty() && !rest.contains('*') {
            return Some(format!(".{rest}"));
        }
    }
    // macOS shortens networks: `169.254/16`, `10/8`.
    if let Some((net, bits)) = e.split_once('/') {
        let parts: Vec<&str> = net.split('.').collect();
        if parts.len() < 4
            && parts.iter().all(|p| p.parse::<u8>().is_ok())
            && bits.parse::<u8>().is_ok_and(|b| b <= 32)
        {
            let mut full = parts.clone();
            full.resize(4, "0");
            return Some(format!("{}/{bits}", full.join(".")));
        }
    }
    Some(e.to_string())
}

/// Exceptions split on any of `seps`, normalised, empty entries dropped.
fn bypass_list(value: &str, seps: &[char]) -> Vec<String> {
    value.split(seps).filter_map(normalize_bypass).collect()
}

/// Runs a settings tool to completion within `timeout` and returns its stdout (at most 1 MiB),
/// or `None` (logged at debug) when it cannot run, fails or takes too long.
#[cfg(unix)]
pub(crate) fn run_bounded(
    program: &std::path::Path,
    args: &[&str],
    envs: &[(&str, &str)],
    timeout: std::time::Duration,
) -> Option<String> {
    use std::io::Read;
    use std::process::{Command, Stdio};
    use std::time::Instant;
    let deadline = Instant::now() + timeout;
    let mut child = match Command::new(program)
        .args(args)
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(program = %program.display(), error = %e, "cannot run settings tool");
            return None;
        }
    };
    let stdout = child.stdout.take()?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stdout.take(1 << 20).read_to_end(&mut buf);
        let _ = tx.send(buf);
    });
    let out = rx.recv_timeout(timeout);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() < deadline && out.is_ok() => {
                std::thread::sleep(std::time::Duration::from_millis(5))
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    match (status, out) {
        (Some(s), Ok(out)) if s.success() => Some(String::from_utf8_lossy(&out).into_owned()),
        (Some(s), _) => {
            tracing::debug!(program = %program.display(), status = %s, "settings tool failed");
            None
        }
        (None, _) => {
            tracing::debug!(program = %program.display(), ?timeout, "settings tool timed out");
            None
        }
    }
}

/// The first `name` on `PATH`.
#[cfg(unix)]
pub(crate) fn find_on_path(name: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_forms() {
        let hp = |s| host_port(s, 80);
        assert_eq!(hp("proxy.corp:3128"), Some(("proxy.corp".into(), 3128)));
        assert_eq!(hp("proxy.corp"), Some(("proxy.corp".into(), 80)));
        assert_eq!(
            hp("http://proxy.corp:8080/"),
            Some(("proxy.corp".into(), 8080))
        );
        assert_eq!(hp("[::1]:3128"), Some(("::1".into(), 3128)));
        assert_eq!(hp("fe80::1"), Some(("fe80::1".into(), 80)));
        assert_eq!(hp("proxy.corp:0"), Some(("proxy.corp".into(), 80)));
        assert_eq!(hp(""), None);
        assert_eq!(hp("proxy.corp:http"), None);
        assert_eq!(hp("a b:1"), None);
    }

    #[test]
    fn bypass_entries_are_normalised_towards_no_proxy() {
        assert_eq!(
            bypass_list("*.corp; 10.*;<local>;;169.254/16; localhost", &[';']),
            vec![".corp", "10.*", "<local>", "169.254.0.0/16", "localhost"]
        );
        assert_eq!(normalize_bypass("10/8").as_deref(), Some("10.0.0.0/8"));
        assert_eq!(
            normalize_bypass("127.0.0.0/8").as_deref(),
            Some("127.0.0.0/8")
        );
        assert_eq!(normalize_bypass("::1").as_deref(), Some("::1"));
        assert_eq!(normalize_bypass("*").as_deref(), Some("*"));
    }

    #[test]
    fn modes_display_for_logs() {
        let m = SystemMode::Manual {
            https: Some(http_proxy("p".into(), 3128)),
            socks: Some(socks_proxy("s".into(), 1080)),
            no_proxy: vec![".corp".into()],
        };
        assert_eq!(
            m.to_string(),
            "manual https=http://p:3128 socks=socks5h://s:1080 no_proxy=.corp"
        );
        assert_eq!(SystemMode::Wpad.to_string(), "WPAD (automatic detection)");
    }

    #[cfg(unix)]
    #[test]
    fn bounded_runs_return_output_and_give_up_on_slow_tools() {
        use std::path::Path;
        use std::time::{Duration, Instant};
        let out = run_bounded(
            Path::new("/bin/sh"),
            &["-c", "echo hi"],
            &[],
            Duration::from_secs(5),
        );
        assert_eq!(out.as_deref(), Some("hi\n"));
        assert_eq!(
            run_bounded(
                Path::new("/bin/sh"),
                &["-c", "exit 3"],
                &[],
                Duration::from_secs(5)
            ),
            None
        );
        let t = Instant::now();
        assert_eq!(
            run_bounded(
                Path::new("/bin/sh"),
                &["-c", "exec sleep 10"],
                &[],
                Duration::from_millis(200)
            ),
            None
        );
        assert!(t.elapsed() < Duration::from_secs(5));
        assert_eq!(
            run_bounded(
                Path::new("/nonexistent/tool"),
                &[],
                &[],
                Duration::from_secs(1)
            ),
            None
        );
    }
}
