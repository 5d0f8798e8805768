//! `sallyport enroll URL` and `sallyport logout`: one step from "IT gave me a token" to a
//! configured agent.
//!
//! Enrollment reads the token from `--token-file`, from stdin when it is not a terminal, or from a
//! prompt that does not echo — never from the command line. It then **checks the token against
//! the gateway once** (a real session: the way out is probed exactly as `sallyport run` does) and
//! only then writes anything:
//!
//! - the token into the OS keychain when one is reachable (Linux Secret Service via
//!   `secret-tool`, Windows Credential Manager), else into `agent.token` (mode 0600) in the
//!   per-user config folder, saying so (macOS: the file, for now);
//! - the gateway's key pin (`gateway_key = "sha256/…"`), shown so it can be compared with what
//!   the admin sees (`sallyport-gateway cert` prints it); the agent then refuses any other key;
//! - a copy of `--ca` as `ca.crt`, and `agent.toml` marked as written by enroll.
//!
//! A wrong token or an unreachable gateway changes nothing on disk. Re-enrolling replaces the
//! files; `logout` removes exactly them (and the keychain entry).

use crate::config::{self, AgentArgs, ConfigError, Secret};
use crate::pool::{connect_with, ConnectError};
use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tunnel::ErrorCode;

/// First line of an `agent.toml` written by enroll; `logout` removes only such a file.
pub const MARKER: &str = "# Written by `sallyport enroll`; `sallyport logout` removes it.";
/// The keychain service name for agent tokens (the account is the gateway URL).
pub const KEYCHAIN_SERVICE: &str = "sallyport-token";

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("the gateway refused this token ({0}); check that it was copied whole and has not expired or been revoked. Nothing was written.")]
    Refused(String),
    #[error("cannot reach the gateway: {0}. Nothing was written (`sallyport doctor --gateway URL` shows every way out).")]
    Unreachable(String),
    #[error("cannot read the token: {0}")]
    Token(String),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no per-user config folder on this system")]
    NoConfigDir,
}

/// The per-user config folder (`~/.config/sallyport` on Linux).
pub fn config_dir() -> Result<PathBuf, EnrollError> {
    config::default_config_path()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .ok_or(EnrollError::NoConfigDir)
}

fn read_token(args: &AgentArgs) -> Result<Secret, EnrollError> {
    if let Some(f) = &args.uplink.token_file {
        return Ok(config::read_token(Some(f))?);
    }
    let text = if std::io::stdin().is_terminal() {
        rpassword::prompt_password("Token (input hidden): ")
            .map_err(|e| EnrollError::Token(e.to_string()))?
    } else {
        let mut s = String::new();
        std::io::stdin()
            .take(4096)
            .read_to_string(&mut s)
            .map_err(|e| EnrollError::Token(e.to_string()))?;
        s
    };
    Ok(config::check_token(&text, "the input")?)
}

/// Enrolls; returns the lines to print.
pub async fn enroll(url: &str, mut args: AgentArgs) -> Result<Vec<String>, EnrollError> {
    let token = read_token(&args)?;
    args.uplink.gateway = vec![url.to_string()];
    args.config = None;
    // Probe the way out like `run`, but with nothing from an earlier enrollment.
    let mut cfg = config::agent_config_with(args.clone(), Some(token.clone()), false)?;
    if let Some(v2) = cfg.v2.as_ref().map(|c| c.get()) {
        return enroll_v2(&cfg, &args, &token, &v2).await;
    }
    // First the gateway's keys, before the token goes anywhere: with the inner key, the token
    // travels only inside the inner channel, even through a TLS-inspecting proxy.
    let keys = cfg
        .way
        .connect(&cfg.gateway, cfg.tls.as_ref(), cfg.connect_timeout, |io| {
            fetch_keys(&cfg, io)
        })
        .await
        .map_err(ConnectError::from)
        .map_err(|e| EnrollError::Unreachable(e.to_string()))?
        .0;
    if let (Some(want), Some(got)) = (&cfg.inner_key, &keys.inner) {
        if want != got {
            return Err(EnrollError::Unreachable(format!(
                "the gateway's inner key is {got} but --gateway-inner-key says {want}: something on the way impersonates the gateway, or the key given is not this gateway's"
            )));
        }
    }
    if keys.inner.is_some() {
        cfg.inner_key = keys.inner;
    }
    let result = connect_with(&cfg, cfg.transport).await;
    let (connected, way) = match result {
        Ok(ok) => ok,
        Err(e) if e.token_status() == Some(401) => return Err(EnrollError::Refused(e.to_string())),
        Err(e) => return Err(EnrollError::Unreachable(e.to_string())),
    };
    let session = connected.session;
    let dmz = session.peer().instance_id.clone();
    session.close(ErrorCode::Shutdown, "enrollment check done");
    // The TLS key to pin: the one the gateway says it has (through an inspecting proxy, the
    // key seen is the proxy's: pinning that would later pass for "the gateway's own TLS").
    // With --gateway-inner-key given but no inner key in the answer, something on the way
    // answered `/key` in the gateway's place: the key seen is not the gateway's, pin nothing
    // (sessions then run inside the inner channel bound to the key given).
    let given_but_not_told = cfg.inner_key.is_some() && keys.inner.is_none();
    let pin = match (&keys.inner, &keys.tls) {
        (Some(_), told) => told.clone(),
        (None, _) if given_but_not_told => None,
        (None, _) => keys.seen.clone(),
    };

    // Only now write.
    let dir = config_dir()?;
    create_private_dir(&dir)?;
    let mut out = vec![format!(
        "token accepted by the gateway {} (instance {dmz}), reached via {way}",
        cfg.gateway
    )];
    let mut toml = format!(
        "{MARKER}\ngateway = {}\n",
        toml_str(&cfg.gateway.to_string())
    );
    // A previous enrollment's token goes, wherever it was.
    let _ = keychain_delete(&cfg.gateway.to_string());
    let token_path = dir.join("agent.token");
    if keychain_store(&cfg.gateway.to_string(), token.expose()) {
        let _ = std::fs::remove_file(&token_path);
        toml.push_str("token_keychain = true\n");
        out.push(format!(
            "token stored in the OS keychain (service {KEYCHAIN_SERVICE}, account {})",
            cfg.gateway
        ));
    } else {
        write_private(&token_path, &format!("{}\n", token.expose()))?;
        toml.push_str("token_file = \"agent.token\"\n");
        out.push(format!(
            "token stored in {} (mode 0600): no OS keychain is reachable here",
            token_path.display()
        ));
    }
    if let Some(ca) = &args.uplink.ca {
        let copy = dir.join("ca.crt");
        let pem = std::fs::read(ca).map_err(|source| EnrollError::Write {
            path: ca.clone(),
            source,
        })?;
        write_private(&copy, &String::from_utf8_lossy(&pem))?;
        toml.push_str("ca = \"ca.crt\"\n");
        out.push(format!("gateway CA copied to {}", copy.display()));
    }
    match &pin {
        Some(p) => {
            toml.push_str(&format!("gateway_key = {}\n", toml_str(p)));
            out.push(format!(
                "gateway key pinned: {p} (compare it with the one your admin sees)"
            ));
        }
        None if given_but_not_told => {
            out.push("the gateway's /key answer did not come through (something on the way answered in its place): no TLS key pinned; every session runs inside the inner channel bound to --gateway-inner-key".into())
        }
        None if keys.inner.is_some() => {
            out.push("no TLS key pinned (the gateway is behind a TLS-terminating load balancer): every session runs inside the inner channel".into())
        }
        None => out.push("plain ws:// gateway: no key to pin".into()),
    }
    if let (Some(seen), Some(told)) = (&keys.seen, &keys.tls) {
        if seen != told {
            out.push(format!(
                "TLS on this way out is re-signed by someone else ({}): sessions here run inside the inner channel, which that proxy cannot read",
                keys.cert
            ));
        }
    }
    if let Some(k) = keys.inner.as_ref().or(cfg.inner_key.as_ref()) {
        toml.push_str(&format!(
            "gateway_inner_key = {}\n",
            toml_str(&k.to_string())
        ));
        out.push(format!(
            "gateway inner key pinned: {k} (compare it with `sallyport-gateway inner-key`)"
        ));
    }
    out.push(format!("session carried by {}", connected.carried));
    if let Some(p) = &args.uplink.proxy {
        toml.push_str(&format!("proxy = {}\n", toml_str(p)));
    }
    if let Some(p) = &args.uplink.pac {
        toml.push_str(&format!("pac = {}\n", toml_str(p)));
    }
    let conf = dir.join("agent.toml");
    write_private(&conf, &seal(toml))?;
    out.push(format!("config written to {}", conf.display()));
    out.push(
        "next: `sallyport service install` to run it at every login, or `sallyport run`".into(),
    );
    Ok(out)
}

/// Enrollment with a protocol v2 token: the token itself names the gateway's key, so there is
/// nothing to fetch and nothing to pin (no trust on first use); the check is one real session,
/// then the token is stored.
async fn enroll_v2(
    cfg: &config::AgentConfig,
    args: &AgentArgs,
    token: &Secret,
    v2: &tunnel::token::Token,
) -> Result<Vec<String>, EnrollError> {
    let (connected, way) = match connect_with(cfg, cfg.transport).await {
        Ok(ok) => ok,
        Err(e) if e.token_status() == Some(401) => return Err(EnrollError::Refused(e.to_string())),
        Err(e) => return Err(EnrollError::Unreachable(e.to_string())),
    };
    let dmz = connected.session.peer().instance_id.clone();
    connected
        .session
        .close(ErrorCode::Shutdown, "enrollment check done");
    let dir = config_dir()?;
    create_private_dir(&dir)?;
    let mut out = vec![format!(
        "token {} accepted by the gateway {} (instance {dmz}), reached via {}",
        v2.claims().id,
        cfg.gateway,
        way
    )];
    let mut toml = format!(
        "{MARKER}\ngateway = {}\n",
        toml_str(&cfg.gateway.to_string())
    );
    let _ = keychain_delete(&cfg.gateway.to_string());
    let token_path = dir.join("agent.token");
    if keychain_store(&cfg.gateway.to_string(), token.expose()) {
        let _ = std::fs::remove_file(&token_path);
        toml.push_str("token_keychain = true\n");
        out.push(format!(
            "token stored in the OS keychain (service {KEYCHAIN_SERVICE}, account {})",
            cfg.gateway
        ));
    } else {
        write_private(&token_path, &format!("{}\n", token.expose()))?;
        toml.push_str("token_file = \"agent.token\"\n");
        out.push(format!(
            "token stored in {} (mode 0600): no OS keychain is reachable here",
            token_path.display()
        ));
    }
    out.push(format!(
        "the gateway is authenticated by the key in the token ({}): nothing to pin, any TLS certificate on the way is only transport",
        tunnel::inner::PublicKey(v2.claims().gateway_keys[0])
    ));
    out.push(format!("session carried by {}", connected.carried));
    if let Some(p) = &args.uplink.proxy {
        toml.push_str(&format!("proxy = {}\n", toml_str(p)));
    }
    if let Some(p) = &args.uplink.pac {
        toml.push_str(&format!("pac = {}\n", toml_str(p)));
    }
    let conf = dir.join("agent.toml");
    write_private(&conf, &seal(toml))?;
    out.push(format!("config written to {}", conf.display()));
    out.push(
        "next: `sallyport service install` to run it at every login, or `sallyport run`".into(),
    );
    Ok(out)
}

/// What the gateway says about its keys (`GET {prefix}/key`), and the TLS key seen.
struct Keys {
    inner: Option<tunnel::inner::PublicKey>,
    tls: Option<String>,
    seen: Option<String>,
    cert: String,
}

/// Asks the gateway for its keys on a fresh connection. An older gateway (404) has none.
async fn fetch_keys(
    cfg: &config::AgentConfig,
    mut io: egress::GatewayStream,
) -> Result<Keys, ConnectError> {
    let seen = io.key_pin();
    let cert = io.peer_summary();
    let req = format!(
        "GET {}/key HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        cfg.gateway.prefix,
        cfg.gateway.authority()
    );
    let io_err =
        |e: std::io::Error| ConnectError::Inner(format!("asking the gateway for its keys: {e}"));
    let read = async {
        io.write_all(req.as_bytes()).await.map_err(io_err)?;
        io.flush().await.map_err(io_err)?;
        let mut buf = Vec::new();
        (&mut io)
            .take(16 * 1024)
            .read_to_end(&mut buf)
            .await
            .map_err(io_err)?;
        Ok::<_, ConnectError>(buf)
    };
    let buf = tokio::time::timeout(cfg.connect_timeout, read)
        .await
        .map_err(|_| ConnectError::Inner("the gateway did not tell its keys in time".into()))??;
    let (inner, tls) = parse_keys(&buf)?;
    Ok(Keys {
        inner,
        tls,
        seen,
        cert,
    })
}

/// Reads the gateway's answer to `GET {prefix}/key` (the whole response, as read): the inner
/// key and the TLS key it says it has; neither for an answer other than 200. Public only for the
/// fuzz target `enroll_keys` (docs/fuzzing.md).
#[doc(hidden)]
#[allow(clippy::type_complexity)]
pub fn parse_keys(
    buf: &[u8],
) -> Result<(Option<tunnel::inner::PublicKey>, Option<String>), ConnectError> {
    let text = String::from_utf8_lossy(buf);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).unwrap_or("");
    let (mut inner, mut tls) = (None, None);
    if status != "200" {
        return Ok((inner, tls));
    }
    for line in body.lines() {
        match line.split_once(' ') {
            Some(("inner", k)) => {
                inner = Some(k.trim().parse().map_err(|e| {
                    ConnectError::Inner(format!("the gateway's inner key is unreadable: {e}"))
                })?)
            }
            // A key pin is `sha256/` and base64; anything else (terminal escapes from whoever
            // answered in the gateway's place) is not a pin and is not printed.
            Some(("tls", k)) => {
                let k = k.trim();
                let pin_like = k.strip_prefix("sha256/").is_some_and(|b| {
                    !b.is_empty()
                        && b.len() <= 64
                        && b.bytes()
                            .all(|c| c.is_ascii_alphanumeric() || b"+/=".contains(&c))
                });
                tls = pin_like.then(|| k.to_string());
            }
            _ => {}
        }
    }
    Ok((inner, tls))
}

/// Removes what enroll wrote (only if `agent.toml` carries its marker).
pub fn logout() -> Result<Vec<String>, EnrollError> {
    let dir = config_dir()?;
    let conf = dir.join("agent.toml");
    let mut out = Vec::new();
    let text = match std::fs::read_to_string(&conf) {
        Ok(t) => t,
        Err(_) => return Ok(vec![format!("not enrolled ({} is absent)", conf.display())]),
    };
    if !text.starts_with(MARKER) {
        return Err(EnrollError::Config(ConfigError::Invalid(format!(
            "{} was not written by `sallyport enroll`; remove it yourself",
            conf.display()
        ))));
    }
    let file = config::parse_file(&text, &conf)?;
    for gw in file
        .gateway
        .clone()
        .map(|g| g.into_vec())
        .unwrap_or_default()
    {
        if file.token_keychain && keychain_delete(&gw) {
            out.push(format!("token removed from the OS keychain ({gw})"));
        }
    }
    // A control socket left by an agent that was killed (a running agent keeps its own).
    #[cfg(unix)]
    {
        let sock = dir.join("agent.sock");
        if sock.exists() && std::os::unix::net::UnixStream::connect(&sock).is_err() {
            let _ = std::fs::remove_file(&sock);
        }
    }
    // A config the user edited after enrolling keeps their edits (and the CA it may name);
    // the token goes either way.
    let edited = !unedited(&text);
    let files: &[&str] = if edited {
        &["agent.token"]
    } else {
        &["agent.token", "ca.crt", "agent.toml"]
    };
    for f in files {
        let p = dir.join(f);
        if std::fs::remove_file(&p).is_ok() {
            out.push(format!("removed {}", p.display()));
        }
    }
    if edited {
        out.push(format!(
            "kept {}: it was edited after `sallyport enroll` wrote it, so your changes stay; its token is gone (enroll again, or remove the file yourself)",
            conf.display()
        ));
    }
    Ok(out)
}

/// The last line of an `agent.toml` that enroll wrote: the SHA-256 of everything before it,
/// so that `logout` can tell a file the user edited since.
const SEAL: &str = "# enroll-sha256: ";

fn sha256_hex(text: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `toml` with its [`SEAL`] line.
fn seal(toml: String) -> String {
    let hash = sha256_hex(&toml);
    format!("{toml}{SEAL}{hash}\n")
}

/// Is `text` exactly what enroll wrote? A file without the seal line (written by an older
/// enroll) counts as unedited, as before.
fn unedited(text: &str) -> bool {
    let Some(at) = text.rfind(SEAL) else {
        return true;
    };
    let (body, line) = text.split_at(at);
    line.trim_end() == format!("{SEAL}{}", sha256_hex(body)) && line.ends_with('\n')
}

/// The token for `gateway` from the OS keychain (written by enroll).
pub fn keychain_token(gateway: &str) -> Option<Secret> {
    egress::keychain::get(KEYCHAIN_SERVICE, gateway).map(Secret::new)
}

/// Stores the token in the OS keychain (Secret Service or Credential Manager); `false` when
/// none is reachable.
fn keychain_store(gateway: &str, token: &str) -> bool {
    egress::keychain::store(KEYCHAIN_SERVICE, gateway, token)
}

/// Replaces the token for `gateway` in the OS keychain (a renewed token); `false` when none is
/// reachable.
pub fn keychain_replace(gateway: &str, token: &str) -> bool {
    keychain_store(gateway, token)
}

fn keychain_delete(gateway: &str) -> bool {
    egress::keychain::delete(KEYCHAIN_SERVICE, gateway)
}

/// A TOML basic string. Public only for the fuzz target `enroll_keys`.
#[doc(hidden)]
pub fn toml_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn create_private_dir(dir: &Path) -> Result<(), EnrollError> {
    std::fs::create_dir_all(dir).map_err(|source| EnrollError::Write {
        path: dir.to_path_buf(),
        source,
    })
}

/// Writes a file only the user can read (mode 0600 on Unix), replacing it.
fn write_private(path: &Path, content: &str) -> Result<(), EnrollError> {
    replace_private(path, content).map_err(|source| EnrollError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// Replaces `path` atomically with a file only the user can read (0600 on Unix) holding
/// `text`: written beside it, synced, renamed over it (enrollment, and a renewed token).
pub(crate) fn replace_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp-{}", std::process::id()));
    let tmp = std::path::PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_edited_agent_toml_is_told_apart_from_what_enroll_wrote() {
        let written = seal(format!("{MARKER}\ngateway = \"wss://gw/\"\n"));
        assert!(unedited(&written));
        assert!(!unedited(&written.replace("gw/", "gw2/")));
        assert!(!unedited(&format!("{written}socks = \"127.0.0.1:1081\"\n")));
        assert!(unedited(&format!("{MARKER}\ngateway = \"wss://gw/\"\n")));
    }

    #[test]
    fn toml_strings_are_escaped() {
        assert_eq!(toml_str(r#"a"b\c"#), r#""a\"b\\c""#);
        assert_eq!(toml_str("x\ny"), "\"x\\u000ay\"");
    }
}
