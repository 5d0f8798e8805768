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
