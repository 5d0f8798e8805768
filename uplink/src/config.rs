//! Config-file plumbing shared by the agent and both gateway roles: the one error type a
//! binary exits 64 on, TOML read with the file and line of a mistake, durations, and paths
//! relative to the config file. What each role's file holds stays in that role's crate.

use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A configuration problem; the binaries exit with code 64 on it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} line {line}: {message}")]
    Parse {
        path: PathBuf,
        line: usize,
        message: String,
    },
    /// A token file that group or other users may read (Unix), refused as ssh refuses such a
    /// private key.
    #[error("token file {path} is readable by other users (mode {mode:04o}), so it is not used: run `chmod 600 {path}`", path = path.display())]
    Exposed { path: PathBuf, mode: u32 },
    /// An agent given a connector's credential (v2 tokens say their kind).
    #[error("the token in {origin} is a connector credential (id {id}), not an agent's: it belongs in `sallyport-gateway connector --token-file`; ask your admin for an agent token (`sallyport-gateway token new --kind agent`) or run `sallyport enroll`")]
    WrongKind { origin: String, id: String },
    #[error("{0}")]
    Invalid(String),
}

/// Reads a token file. On Unix, a file that group or other users may read is refused
/// ([`ConfigError::Exposed`]), as ssh refuses such a private key; Windows has no mode bits.
pub fn read_secret_file(path: &Path) -> Result<String, ConfigError> {
    use std::io::Read;
    let cannot =
        |e: std::io::Error| invalid(format!("cannot read token file {}: {e}", path.display()));
    let mut f = std::fs::File::open(path).map_err(cannot)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        // The mode of the file opened, not of whatever the name points to a moment later.
        let mode = f.metadata().map_err(cannot)?.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(ConfigError::Exposed {
                path: path.to_path_buf(),
                mode,
            });
        }
    }
    let mut text = String::new();
    f.read_to_string(&mut text).map_err(cannot)?;
    Ok(text)
}

/// A [`ConfigError::Invalid`] with this text.
pub fn invalid(s: impl Into<String>) -> ConfigError {
    ConfigError::Invalid(s.into())
}

/// Reads and deserializes a TOML file; a mistake is reported with file and line.
pub fn read_toml<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_toml(&text, path)
}

/// [`read_toml`] on text already read (`path` names it in errors).
pub fn parse_toml<T: for<'de> Deserialize<'de>>(text: &str, path: &Path) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let line = e
            .span()
            .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1)
            .unwrap_or(0);
        ConfigError::Parse {
            path: path.to_path_buf(),
            line,
            message: e.message().to_string(),
        }
    })
}

/// A path from a config file, relative to that file's folder.
pub fn relative_to(base: Option<&Path>, p: PathBuf) -> PathBuf {
    match base.and_then(Path::parent) {
        Some(dir) if p.is_relative() => dir.join(p),
        _ => p,
    }
}

/// A duration such as `10s` or `2m` for `key`, or an error naming the key.
pub fn duration(s: &str, key: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(s).map_err(|e| {
        invalid(format!(
            "{key}: `{s}` is not a duration ({e}); write e.g. 10s or 2m"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct F {
        a: u32,
    }

    #[cfg(unix)]
    #[test]
    fn a_token_file_others_may_read_is_refused_with_the_chmod_that_fixes_it() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("uplink-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("a.token");
        std::fs::write(&f, "sp2_x\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = read_secret_file(&f).unwrap_err();
        assert!(matches!(e, ConfigError::Exposed { mode: 0o644, .. }), "{e}");
        assert!(
            e.to_string()
                .contains(&format!("run `chmod 600 {}`", f.display())),
            "{e}"
        );
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_secret_file(&f).unwrap(), "sp2_x\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_toml_mistake_names_file_and_line() {
        let e = parse_toml::<F>("\n\nb = 1\n", Path::new("x.toml")).unwrap_err();
        let text = e.to_string();
        assert!(text.starts_with("x.toml line 3"), "{text}");
        assert!(duration("soon", "k")
            .unwrap_err()
            .to_string()
            .contains("k: `soon`"));
        assert_eq!(
            relative_to(Some(Path::new("/etc/s/dmz.toml")), "t.toml".into()),
            PathBuf::from("/etc/s/t.toml")
        );
    }
}

/// Reads a token from `file`, or from `SALLYPORT_TOKEN` without one; never from a flag (argv
/// is visible to every local user).
pub fn read_token(file: Option<&Path>) -> Result<crate::Secret, ConfigError> {
    let text = match file {
        Some(p) => read_secret_file(p)?,
        None => std::env::var("SALLYPORT_TOKEN")
            .map_err(|_| invalid("no token: pass --token-file FILE or set SALLYPORT_TOKEN"))?,
    };
    check_token(&text, &token_source(file))
}

/// Where a token read by [`read_token`] comes from, for messages: the file, or
/// `SALLYPORT_TOKEN`.
pub fn token_source(file: Option<&Path>) -> String {
    file.map(|p| p.display().to_string())
        .unwrap_or_else(|| "SALLYPORT_TOKEN".into())
}

/// A token as read from `source` (trimmed), if it is one: a version 2 token `sp2_…` that
/// parses, or a version 1 token `sp_<id>_<64 lowercase hex>`. The error never shows the text.
pub fn check_token(text: &str, source: &str) -> Result<crate::Secret, ConfigError> {
    let t = text.trim();
    if tunnel::token::is_v2(t) {
        t.parse::<tunnel::token::Token>()
            .map_err(|e| invalid(format!("the token in {source}: {e}")))?;
        return Ok(crate::Secret::new(t));
    }
    let secret = crate::Secret::new(t);
    if secret.id().is_none() {
        return Err(invalid(format!(
            "the token in {source} does not look like a sallyport token (sp2_… or sp_<id>_<64 hex>)"
        )));
    }
    Ok(secret)
}

/// `gateway` in a config file: one URL, or a list of them (several DMZ instances).
#[derive(serde::Deserialize, Debug, Clone)]
#[serde(untagged)]
pub enum Gateways {
    One(String),
    Many(Vec<String>),
}

impl Gateways {
    /// The URLs, in order.
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Gateways::One(g) => vec![g],
            Gateways::Many(v) => v,
        }
    }
}

/// The flags both the agent and the connector take to reach the gateway (flattened into each
/// role's arguments); each also has a key of the same name in the role's config file.
#[derive(clap::Args, Debug, Default, Clone)]
pub struct UplinkArgs {
    /// The DMZ gateway, e.g. wss://gw.example.com/ (port 443 unless given). Repeatable, for
    /// several DMZ instances: an agent fails over from one to the next, a connector keeps
    /// sessions to every one.
    #[arg(long = "gateway")]
    pub gateway: Vec<String>,
    /// File holding the token (or set SALLYPORT_TOKEN).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// The gateway's CA certificate (PEM), for v1 tokens (v2 tokens carry the gateway's key).
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// The way out: `http://[USER@]HOST:PORT`, `socks5://…`, `socks5h://…`, `direct`, or `auto`
    /// (default: the environment as curl reads it, the OS settings, WPAD, then direct).
    #[arg(long)]
    pub proxy: Option<String>,
    /// Proxy auto-config: a PAC URL (http://…/proxy.pac) or file; its answer is tried in order.
    #[arg(long)]
    pub pac: Option<String>,
    /// User for the proxy on the way out (DOMAIN\user for NTLM). The password comes from
    /// SALLYPORT_PROXY_PASSWORD or --proxy-credentials, never from a flag.
    #[arg(long)]
    pub proxy_user: Option<String>,
    /// File with `user:password` (or the password alone) for the proxy, mode 0600.
    #[arg(long)]
    pub proxy_credentials: Option<PathBuf>,
    /// The TLS stack of the outer TLS: `rustls` (default) or `native` (the OS's: OpenSSL,
    /// SChannel, Security.framework). The v2 protection inside is the same.
    #[arg(long)]
    pub tls: Option<String>,
    /// With `--tls native`: a client certificate and key (PKCS#12 file) for a TLS terminator
    /// that asks for one. Its password comes from SALLYPORT_CLIENT_CERT_PASSWORD or
    /// --client-cert-password-file, never from a flag. On Windows also `store:<SHA-1
    /// thumbprint>`, from the user's certificate store (its key marked exportable).
    #[arg(long)]
    pub client_cert: Option<PathBuf>,
    /// File whose first line is the PKCS#12 password.
    #[arg(long)]
    pub client_cert_password_file: Option<PathBuf>,
}

impl UplinkArgs {
    /// The flags, each falling back to the config file's value (`file`, whose paths are
    /// relative to the config file `base`).
    pub fn or_file(self, file: UplinkArgs, base: Option<&Path>) -> UplinkArgs {
        let rel = |p: Option<PathBuf>| p.map(|p| relative_to(base, p));
        UplinkArgs {
            gateway: if self.gateway.is_empty() {
                file.gateway
            } else {
                self.gateway
            },
            token_file: self.token_file.or(rel(file.token_file)),
            ca: self.ca.or(rel(file.ca)),
            proxy: self.proxy.or(file.proxy),
            pac: self.pac.or(file.pac),
            proxy_user: self.proxy_user.or(file.proxy_user),
            proxy_credentials: self.proxy_credentials.or(rel(file.proxy_credentials)),
            tls: self.tls.or(file.tls),
            client_cert: self.client_cert.or(rel(file.client_cert)),
            client_cert_password_file: self
                .client_cert_password_file
                .or(rel(file.client_cert_password_file)),
        }
    }

    /// `--tls native`: the OS TLS stack, set up now (a bad client certificate stops the program
    /// here); `None` for rustls. `any_certificate`: a v2 token authenticates the gateway itself.
    pub fn native_tls(
        &self,
        any_certificate: bool,
    ) -> Result<Option<std::sync::Arc<egress::native::NativeTls>>, ConfigError> {
        use egress::native::{NativeOptions, NativeTls, TlsStack};
        let stack = match &self.tls {
            Some(s) => s.parse::<TlsStack>().map_err(invalid)?,
            None => TlsStack::Rustls,
        };
        if stack == TlsStack::Rustls {
            if self.client_cert.is_some() {
                return Err(invalid(
                    "--client-cert needs --tls native (the OS TLS stack presents it)",
                ));
            }
            return Ok(None);
        }
        let client_cert = match &self.client_cert {
            Some(p) => Some((
                p.clone(),
                egress::native::read_password(self.client_cert_password_file.as_deref())
                    .map_err(|e| invalid(e.to_string()))?,
            )),
            None => None,
        };
        NativeTls::new(&NativeOptions {
            any_certificate,
            ca: if any_certificate {
                None
            } else {
                self.ca.clone()
            },
            client_cert,
        })
        .map(Some)
        .map_err(|e| invalid(e.to_string()))
    }

    /// The gateway URLs, at least one (`hint`: what else the user could do), without repeats.
    pub fn gateway_urls(&self, hint: &str) -> Result<Vec<egress::GatewayUrl>, ConfigError> {
        if self.gateway.is_empty() {
            return Err(invalid(format!(
                "--gateway URL is required, e.g. --gateway wss://gw.example.com/{hint}"
            )));
        }
        let mut urls: Vec<egress::GatewayUrl> = Vec::new();
        for g in &self.gateway {
            let u = egress::GatewayUrl::parse(g).map_err(|e| invalid(e.to_string()))?;
            if urls.iter().any(|v| v.to_string() == u.to_string()) {
                return Err(invalid(format!("--gateway {u} is given twice")));
            }
            urls.push(u);
        }
        Ok(urls)
    }

    /// The way out from these settings (`wpad_credentials`: whether proxy credentials may be
    /// sent to proxies found by WPAD, an admin's choice).
    pub fn egress(
        &self,
        credentials_file: Option<&Path>,
        wpad_credentials: bool,
    ) -> Result<egress::Egress, ConfigError> {
        egress::Egress::from_settings(&egress::EgressSettings {
            proxy: self.proxy.as_deref(),
            pac: self.pac.as_deref(),
            proxy_user: self.proxy_user.as_deref(),
            credentials_file,
            wpad_credentials,
        })
        .map_err(invalid)
    }
}

impl From<crate::tuning::TuningError> for ConfigError {
    fn from(e: crate::tuning::TuningError) -> ConfigError {
        ConfigError::Invalid(e.0)
    }
}
