//! Admin policy on the way out: `wpad = off`, `ntlm = off`, `basic = off`, from a machine-wide
//! file (`/etc/sallyport/policy.toml`; `%ProgramData%\Sallyport\policy.toml` on Windows), the
//! registry on Windows (`HKLM\SOFTWARE\Policies\Sallyport`), and Windows' own switch that turns
//! WPAD off (`DisableWpad`). A policy only ever turns things off: every source is read and any
//! one that says `off` wins, naming itself, so that each refusal says in one line which policy
//! (and which file or registry key) refused what.
//!
//! Everything here is a plain function over text or values; the registry is read by the thin
//! Windows code in [`crate::system`].

use std::fmt;
use std::path::{Path, PathBuf};

/// The registry key of Sallyport's own policy (values `wpad`, `ntlm`, `basic`: `off` or 0).
pub const REGISTRY_KEY: &str = r"HKLM\SOFTWARE\Policies\Sallyport";
/// Windows' switch that turns WPAD off for WinHTTP (DWORD 1), in the place Microsoft documents
/// and under `Policies` where group policy writes it.
pub const WINHTTP_KEYS: [&str; 2] = [
    r"HKLM\SOFTWARE\Microsoft\Windows\CurrentVersion\Internet Settings\WinHttp",
    r"HKLM\SOFTWARE\Policies\Microsoft\Windows\CurrentVersion\Internet Settings\WinHttp",
];
/// The WinHTTP auto-proxy service; `Start` = 4 means disabled (hardening guides do this to
/// turn WPAD off).
pub const AUTOPROXY_SERVICE_KEY: &str =
    r"HKLM\SYSTEM\CurrentControlSet\Services\WinHttpAutoProxySvc";
/// An extra policy file (for tests and for packagers); like every source it can only turn
/// things off, never back on.
pub const EXTRA_FILE_ENV: &str = "SALLYPORT_POLICY";

/// What the admin turned off; each `Some` says by which policy, e.g. ``admin policy `ntlm = off`
/// in /etc/sallyport/policy.toml``.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    /// No WPAD (neither by DNS nor the OS's auto-detect).
    pub wpad: Option<String>,
    /// No NTLM, and Negotiate only as Kerberos (SPNEGO could fall back to NTLM).
    pub ntlm: Option<String>,
    /// No Basic (the password in clear).
    pub basic: Option<String>,
}

/// A registry value as read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegValue {
    Sz(String),
    Dword(u32),
}

/// The three switches, by name.
const KEYS: [&str; 3] = ["wpad", "ntlm", "basic"];

impl Policy {
    fn slot(&mut self, key: &str) -> Option<&mut Option<String>> {
        match key {
            "wpad" => Some(&mut self.wpad),
            "ntlm" => Some(&mut self.ntlm),
            "basic" => Some(&mut self.basic),
            _ => None,
        }
    }

    /// Whether anything is turned off.
    pub fn any(&self) -> bool {
        self.wpad.is_some() || self.ntlm.is_some() || self.basic.is_some()
    }

    /// Adds what `other` turns off (the first source to turn a switch off is the one named).
    pub fn merge(mut self, other: Policy) -> Policy {
        for (mine, theirs) in [
            (&mut self.wpad, other.wpad),
            (&mut self.ntlm, other.ntlm),
            (&mut self.basic, other.basic),
        ] {
            if mine.is_none() {
                *mine = theirs;
            }
        }
        self
    }

    /// A policy file: `wpad = "off"`, `ntlm = "off"`, `basic = "off"` (`"on"`, or `true`/`false`,
    /// also read). `source` names the file in messages. Unknown keys and values are errors
    /// naming the file and the key: a typo must not silently leave a switch on.
    pub fn parse_toml(text: &str, source: &str) -> Result<Policy, String> {
        let table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| format!("policy file {source}: {}", e.message()))?;
        let mut p = Policy::default();
        for (key, value) in &table {
            let off = match value {
                toml::Value::String(s) => on_off(s),
                toml::Value::Boolean(b) => Some(!b),
                _ => None,
            }
            .ok_or_else(|| {
                format!("policy file {source}: `{key}` must be \"off\" or \"on\", not {value}")
            })?;
            let slot = p.slot(key).ok_or_else(|| {
                format!(
                    "policy file {source}: unknown key `{key}` (known: {})",
                    KEYS.join(", ")
                )
            })?;
            if off {
                *slot = Some(format!("admin policy `{key} = off` in {source}"));
            }
        }
        Ok(p)
    }

    /// Sallyport's registry policy ([`REGISTRY_KEY`]): each of `wpad`, `ntlm`, `basic` as a
    /// string (`off`/`on`) or a DWORD (0 = off, 1 = on). Other values are ignored (the key may
    /// hold other products' future settings); a bad value of ours is an error.
    pub fn from_registry(values: &[(String, RegValue)]) -> Result<Policy, String> {
        let mut p = Policy::default();
        for (name, value) in values {
            let key = name.to_ascii_lowercase();
            let Some(slot) = p.slot(&key) else { continue };
            let off = match value {
                RegValue::Sz(s) => on_off(s),
                RegValue::Dword(0) => Some(true),
                RegValue::Dword(1) => Some(false),
                RegValue::Dword(_) => None,
            }
            .ok_or_else(|| {
                format!("registry {REGISTRY_KEY}\\{name}: must be \"off\", \"on\", 0 or 1, not {value:?}")
            })?;
            if off {
                *slot = Some(format!("admin policy {REGISTRY_KEY}\\{name} = off"));
            }
        }
        Ok(p)
    }

    /// One line per switch turned off, for the log at start-up.
    pub fn describe(&self) -> Vec<String> {
        [
            ("WPAD", &self.wpad),
            ("NTLM", &self.ntlm),
            ("Basic", &self.basic),
        ]
        .into_iter()
        .filter_map(|(what, why)| why.as_ref().map(|w| format!("{what} is off: {w}")))
        .collect()
    }
}

impl fmt::Display for RegValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RegValue::Sz(s) => write!(f, "\"{s}\""),
            RegValue::Dword(d) => write!(f, "{d}"),
        }
    }
}

fn on_off(s: &str) -> Option<bool> {
    match s.trim().to_ascii_lowercase().as_str() {
        "off" => Some(true),
        "on" => Some(false),
        _ => None,
    }
}

/// Whether Windows' own settings turn WPAD off, and which: `DisableWpad` = 1 under one of
/// [`WINHTTP_KEYS`] (given in that order), or the WinHTTP auto-proxy service disabled
/// (`Start` = 4 under [`AUTOPROXY_SERVICE_KEY`]).
pub fn windows_wpad_off(
    disable_wpad: [Option<u32>; 2],
    autoproxy_start: Option<u32>,
) -> Option<String> {
    for (key, v) in WINHTTP_KEYS.iter().zip(disable_wpad) {
        if v.is_some_and(|v| v != 0) {
            return Some(format!("Windows policy {key}\\DisableWpad = 1"));
        }
    }
    if autoproxy_start == Some(4) {
        return Some(format!(
            "Windows' WinHTTP auto-proxy service is disabled ({AUTOPROXY_SERVICE_KEY}\\Start = 4)"
        ));
    }
    None
}

/// The machine-wide policy file: `/etc/sallyport/policy.toml`, or on Windows
/// `%ProgramData%\Sallyport\policy.toml`.
pub fn system_file() -> PathBuf {
    if cfg!(windows) {
        let base = std::env::var_os("ProgramData").unwrap_or_else(|| r"C:\ProgramData".into());
        PathBuf::from(base).join("Sallyport").join("policy.toml")
    } else {
        PathBuf::from("/etc/sallyport/policy.toml")
    }
}

/// Reads one policy file; a file that does not exist is no policy.
pub fn read_file(path: &Path) -> Result<Policy, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => Policy::parse_toml(&text, &path.display().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Policy::default()),
        Err(e) => Err(format!("policy file {}: {e}", path.display())),
    }
}

/// The policy in force: the system file, the extra file named by [`EXTRA_FILE_ENV`], and on
/// Windows the registry (Sallyport's key and Windows' WPAD switch).
pub fn load() -> Result<Policy, String> {
    let mut p = read_file(&system_file())?;
    if let Some(extra) = std::env::var_os(EXTRA_FILE_ENV).filter(|v| !v.is_empty()) {
        p = p.merge(read_file(Path::new(&extra))?);
    }
    Ok(p.merge(crate::system::registry_policy()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_policy_file_turns_switches_off_and_names_itself() {
        let p = Policy::parse_toml(
            "wpad = \"off\"\nntlm = \"OFF\"\nbasic = \"on\"\n",
            "/etc/sallyport/policy.toml",
        )
        .unwrap();
        assert_eq!(
            p.ntlm.as_deref(),
            Some("admin policy `ntlm = off` in /etc/sallyport/policy.toml")
        );
        assert!(p.wpad.is_some() && p.basic.is_none());
        assert_eq!(
            Policy::parse_toml("basic = false", "f")
                .unwrap()
                .basic
                .as_deref(),
            Some("admin policy `basic = off` in f")
        );
        assert_eq!(Policy::parse_toml("", "f").unwrap(), Policy::default());
        assert_eq!(
            p.describe(),
            [
                "WPAD is off: admin policy `wpad = off` in /etc/sallyport/policy.toml",
                "NTLM is off: admin policy `ntlm = off` in /etc/sallyport/policy.toml"
            ]
        );
    }

    /// A typo must not leave a switch silently on.
    #[test]
    fn a_policy_typo_is_an_error_naming_file_and_key() {
        let e = Policy::parse_toml("ntlm = \"of\"", "/etc/sallyport/policy.toml").unwrap_err();
        assert_eq!(
            e,
            "policy file /etc/sallyport/policy.toml: `ntlm` must be \"off\" or \"on\", not \"of\""
        );
        let e = Policy::parse_toml("ntml = \"off\"", "p").unwrap_err();
        assert!(
            e.contains("unknown key `ntml`") && e.contains("wpad, ntlm, basic"),
            "{e}"
        );
        let e = Policy::parse_toml("ntlm = ", "p").unwrap_err();
        assert!(e.starts_with("policy file p: "), "{e}");
    }

    #[test]
    fn the_registry_policy_reads_strings_and_dwords() {
        let v = |n: &str, r: RegValue| (n.to_string(), r);
        let p = Policy::from_registry(&[
            v("NTLM", RegValue::Sz("off".into())),
            v("basic", RegValue::Dword(0)),
            v("wpad", RegValue::Dword(1)),
            v("SomethingElse", RegValue::Dword(7)),
        ])
        .unwrap();
        assert_eq!(
            p.ntlm.as_deref(),
            Some(r"admin policy HKLM\SOFTWARE\Policies\Sallyport\NTLM = off")
        );
        assert!(p.basic.is_some() && p.wpad.is_none());
        let e = Policy::from_registry(&[v("ntlm", RegValue::Dword(2))]).unwrap_err();
        assert!(
            e.contains(r"Sallyport\ntlm") && e.contains("Dword(2)"),
            "{e}"
        );
    }

    /// Windows' own "Disable WPAD" (DisableWpad = 1, or the auto-proxy service disabled) was
    /// not respected.
    #[test]
    fn windows_disable_wpad_turns_wpad_off() {
        assert_eq!(windows_wpad_off([None, None], None), None);
        assert_eq!(windows_wpad_off([Some(0), None], Some(3)), None);
        assert_eq!(
            windows_wpad_off([Some(1), None], None).unwrap(),
            r"Windows policy HKLM\SOFTWARE\Microsoft\Windows\CurrentVersion\Internet Settings\WinHttp\DisableWpad = 1"
        );
        assert!(windows_wpad_off([None, Some(1)], None)
            .unwrap()
            .contains(r"Policies\Microsoft"));
        assert!(windows_wpad_off([None, None], Some(4))
            .unwrap()
            .contains("WinHttpAutoProxySvc"));
    }

    #[test]
    fn sources_only_turn_things_off_and_the_first_is_named() {
        let a = Policy::parse_toml("ntlm = \"off\"", "a").unwrap();
        let b = Policy::parse_toml("ntlm = \"off\"\nbasic = \"off\"\nwpad = \"on\"", "b").unwrap();
        let m = a.merge(b);
        assert_eq!(m.ntlm.as_deref(), Some("admin policy `ntlm = off` in a"));
        assert_eq!(m.basic.as_deref(), Some("admin policy `basic = off` in b"));
        assert!(m.wpad.is_none());
        let dir = std::env::temp_dir().join(format!("sp-policy-{}", std::process::id()));
        assert_eq!(
            read_file(&dir.join("none.toml")).unwrap(),
            Policy::default()
        );
    }
}
