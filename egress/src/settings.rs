//! The way-out settings as the user gave them (`--proxy`, `--pac`, the proxy user and its
//! credentials file), validated into an [`Egress`].

use crate::*;
use std::path::{Path, PathBuf};

/// How to leave the network, as configured: an explicit proxy (`--proxy`), a PAC file (`--pac`),
/// or automatic (the environment, the OS settings, WPAD, then direct), and what to authenticate
/// to proxies with. [`Way`] turns it into candidates and probes them.
#[derive(Clone, Debug)]
pub struct Egress {
    /// `--proxy`: `None` is `auto`.
    pub proxy: Option<Proxy>,
    /// `--pac URL|FILE`.
    pub pac: Option<String>,
    pub auth: AuthOptions,
    /// In `auto`: read the OS's proxy settings (GNOME/KDE, macOS, Windows).
    pub system: bool,
    /// In `auto`: look for `http://wpad.<dns suffix>/wpad.dat`.
    pub wpad: bool,
    /// Admin policy (`[proxy_auth] wpad_credentials = "allow"`): answer NTLM, Digest and
    /// NTLM-capable Negotiate from proxies found by WPAD. Off by default: anyone on the LAN can
    /// answer WPAD.
    pub wpad_credentials: bool,
    /// `--tls native`: the outer TLS through the OS stack ([`crate::native`]); `None`: rustls.
    pub native_tls: Option<std::sync::Arc<crate::native::NativeTls>>,
    /// Where [`AuthOptions::credentials`] came from when it was the credentials file: re-read
    /// by [`crate::Way`] when it changes (a corrected password works without a restart).
    pub credentials_file: Option<CredentialsFile>,
}

/// The proxy credentials file and the user named elsewhere (`--proxy-user`, the proxy URL),
/// which a user in the file must agree with.
#[derive(Clone, Debug)]
pub struct CredentialsFile {
    pub path: PathBuf,
    pub named_user: Option<String>,
}

impl CredentialsFile {
    /// Reads and checks the file now: the credentials, or a one-line error naming the fix
    /// (never the password).
    pub fn read(&self) -> Result<Credentials, String> {
        let (file_user, password) = read_credentials_file(&self.path)?;
        let shown = self.path.display();
        match (&self.named_user, file_user) {
            (Some(n), Some(f)) if *n != f => {
                // (`f` may be the start of a password that contains `:`: not shown.)
                Err(format!(
                    "the first line of the credentials file {shown} does not start with `{n}:` although the proxy user is `{n}`; write `{n}:PASSWORD` in it"
                ))
            }
            (Some(u), _) => Ok(Credentials::new(u.clone(), password)),
            (None, Some(u)) => Ok(Credentials::new(u, password)),
            (None, None) => Err(format!(
                "the credentials file {shown} holds a password but no user: write user:password in it, or give --proxy-user USER"
            )),
        }
    }

    /// What tells a change of the file: its modification time, size and (on Unix) inode.
    /// `None` when it cannot be read.
    pub fn stamp(&self) -> Option<FileStamp> {
        FileStamp::of(&self.path)
    }
}

/// What tells that a file changed: its modification time, size and (on Unix) inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileStamp {
    modified: Option<std::time::SystemTime>,
    len: u64,
    ino: u64,
}

impl FileStamp {
    /// `None` when the file cannot be read.
    pub fn of(path: &Path) -> Option<FileStamp> {
        let m = std::fs::metadata(path).ok()?;
        #[cfg(unix)]
        let ino = std::os::unix::fs::MetadataExt::ino(&m);
        #[cfg(not(unix))]
        let ino = 0;
        Some(FileStamp {
            modified: m.modified().ok(),
            len: m.len(),
            ino,
        })
    }
}

impl Default for Egress {
    fn default() -> Egress {
        Egress {
            proxy: None,
            pac: None,
            auth: AuthOptions {
                negotiate: true,
                ..Default::default()
            },
            system: true,
            wpad: true,
            wpad_credentials: false,
            native_tls: None,
            credentials_file: None,
        }
    }
}

/// The egress settings as written in flags or a config file, before validation.
#[derive(Clone, Debug, Default)]
pub struct EgressSettings<'a> {
    /// `--proxy`: `auto` (default), `direct`, `http://[USER@]HOST:PORT`, `socks5[h]://…`.
    pub proxy: Option<&'a str>,
    /// `--pac URL|FILE`.
    pub pac: Option<&'a str>,
    /// `--proxy-user`: the user for proxies found automatically (PAC, environment, system).
    pub proxy_user: Option<&'a str>,
    /// `--proxy-credentials FILE`: `user:password` or a password alone, readable only by the
    /// user.
    pub credentials_file: Option<&'a Path>,
    /// `[proxy_auth] wpad_credentials = "allow"` (see [`Egress::wpad_credentials`]).
    pub wpad_credentials: bool,
}

impl Egress {
    /// Only direct connections (tests, the demo).
    pub fn direct() -> Egress {
        Egress {
            proxy: Some(Proxy::Direct),
            ..Egress::default()
        }
    }

    /// Validates the settings. The password comes from `SALLYPORT_PROXY_PASSWORD`, the
    /// environment's proxy URL (`https_proxy=http://user:password@proxy:3128`, as curl reads
    /// it), the credentials file or the OS keychain, never from a flag (every local user can
    /// read command lines).
    pub fn from_settings(s: &EgressSettings<'_>) -> Result<Egress, String> {
        Egress::from_settings_in(s, |k| std::env::var(k).ok())
    }

    /// [`Egress::from_settings`] with the environment read through `env`.
    pub fn from_settings_in(
        s: &EgressSettings<'_>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Egress, String> {
        let proxy = match s.proxy.map(str::trim) {
            None | Some("") => None,
            Some(a) if a.eq_ignore_ascii_case("auto") => None,
            Some(p) => Some(p.parse::<Proxy>().map_err(|e| format!("--proxy: {e}"))?),
        };
        let pac = s
            .pac
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(String::from);
        if pac.is_some() && proxy.is_some() {
            return Err(
                "--proxy and --pac both name the way out; give one (or --proxy auto with --pac)"
                    .into(),
            );
        }
        let url_user = match &proxy {
            Some(Proxy::Http { user, .. }) | Some(Proxy::Socks5 { user, .. }) => user.clone(),
            _ => None,
        };
        // In auto, the environment's proxy URL names a user (`http://CORP%5Calice@proxy`), and
        // may carry its password, as curl reads it. (A bad URL is reported by the discovery.)
        let (env_url_user, env_url_password) = match (&proxy, proxy::env_proxy(&env)) {
            (None, Some(Ok((p, password)))) => (p.user().map(String::from), password),
            _ => (None, None),
        };
        // A user and its password come from ONE source, never mixed (a password tried with
        // another user's name is a failed logon for that user): the environment, or the
        // credentials file, or the OS keychain.
        let env_password = env("SALLYPORT_PROXY_PASSWORD")
            .filter(|p| !p.is_empty())
            .map(Password::new);
        if let Some(url_password) = env_url_password {
            let user = env_url_user.unwrap_or_default();
            let other = match (&env_password, s.credentials_file) {
                (Some(_), _) => Some("SALLYPORT_PROXY_PASSWORD".to_string()),
                (None, Some(path)) => Some(format!("the credentials file {}", path.display())),
                (None, None) => None,
            };
            if let Some(other) = other {
                return Err(format!(
                    "both the environment's proxy URL (user `{user}`) and {other} give a proxy password; keep one"
                ));
            }
            if let Some(named) = s.proxy_user.filter(|n| *n != user) {
                return Err(format!(
                    "--proxy-user `{named}` differs from the user `{user}` in the environment's proxy URL, whose password is for `{user}`; keep one"
                ));
            }
            return Ok(Egress {
                proxy,
                pac,
                auth: AuthOptions {
                    credentials: Some(Credentials::new(user, url_password)),
                    negotiate: true,
                    ..Default::default()
                },
                wpad_credentials: s.wpad_credentials,
                ..Egress::default()
            });
        }
        let named_user = url_user.or(s.proxy_user.map(String::from)).or(env_url_user);
        let mut credentials_file = None;
        let credentials = match (env_password, s.credentials_file) {
            (Some(_), Some(path)) => {
                return Err(format!(
                    "both SALLYPORT_PROXY_PASSWORD and the credentials file {} give a proxy password; keep one",
                    path.display()
                ))
            }
            (Some(p), None) => match named_user {
                Some(u) => Some(Credentials::new(u, p)),
                None => return Err("SALLYPORT_PROXY_PASSWORD is set but no proxy user: give --proxy-user USER, http://USER@proxy, or https_proxy=http://USER@proxy".into()),
            },
            (None, Some(path)) => {
                let file = CredentialsFile {
                    path: path.to_path_buf(),
                    named_user,
                };
                let c = file.read()?;
                credentials_file = Some(file);
                Some(c)
            }
            (None, None) => match named_user {
                // Last source: the OS keychain (Secret Service, macOS Keychain, Credential
                // Manager), looked up for this user.
                Some(u) => match keychain::lookup(&u) {
                    Some(p) => Some(Credentials::new(u, p)),
                    None => return Err(format!(
                        "proxy user `{u}` has no password: set SALLYPORT_PROXY_PASSWORD, --proxy-credentials FILE, or store it in the OS keychain (service sallyport-proxy, see docs/egress.md)"
                    )),
                },
                None => None,
            },
        };
        Ok(Egress {
            proxy,
            pac,
            auth: AuthOptions {
                credentials,
                negotiate: true,
                ..Default::default()
            },
            wpad_credentials: s.wpad_credentials,
            credentials_file,
            ..Egress::default()
        })
    }
}

/// Reads the first line of a credentials file that only its owner may read: `user:password`, or
/// a password alone (without `:`). The caller checks that a user in the file agrees with one
/// named elsewhere.
fn read_credentials_file(path: &Path) -> Result<(Option<String>, Password), String> {
    let shown = path.display();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let meta =
            std::fs::metadata(path).map_err(|e| format!("proxy credentials file {shown}: {e}"))?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(format!(
                "proxy credentials file {shown} is readable by other users; run chmod 600 {shown}"
            ));
        }
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("proxy credentials file {shown}: {e}"))?;
    let line = text.lines().next().unwrap_or("").trim_end_matches('\r');
    if line.is_empty() {
        return Err(format!(
            "proxy credentials file {shown} is empty; write user:password in it"
        ));
    }
    Ok(match line.split_once(':') {
        Some((u, p)) if !u.is_empty() && !u.contains(char::is_whitespace) => {
            (Some(u.to_string()), Password::new(p))
        }
        _ => (None, Password::new(line)),
    })
}
