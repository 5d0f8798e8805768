//! Corporate proxies: which one to use (`--proxy`, or the environment with curl's semantics), and
//! a SOCKS5 tunnel through one (with optional username/password). HTTP `CONNECT` with its
//! authentication rounds lives in [`crate::http`].
//!
//! Parsing and `NO_PROXY` matching are plain functions, tested without sockets. Passwords never
//! come from the command line (every local user can read it): they come from
//! `SALLYPORT_PROXY_PASSWORD`, and never appear in `Debug` output or errors.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// A proxy password; `Debug` never shows it.
#[derive(Clone)]
pub struct Password(String);

impl Password {
    pub fn new(p: impl Into<String>) -> Password {
        Password(p.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("****")
    }
}

/// How to leave the network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Proxy {
    Direct,
    /// HTTP proxy, tunnelling with `CONNECT`.
    Http {
        host: String,
        port: u16,
        user: Option<String>,
    },
    /// SOCKS5 proxy; `remote_dns` (`socks5h://`) lets the proxy resolve the gateway's name.
    Socks5 {
        host: String,
        port: u16,
        user: Option<String>,
        remote_dns: bool,
    },
}

impl fmt::Display for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let user = |u: &Option<String>| u.as_ref().map(|u| format!("{u}@")).unwrap_or_default();
        match self {
            Proxy::Direct => f.write_str("direct"),
            Proxy::Http {
                host,
                port,
                user: u,
            } => write!(f, "http://{}{}:{port}", user(u), bracket(host)),
            Proxy::Socks5 {
                host,
                port,
                user: u,
                remote_dns,
            } => {
                let scheme = if *remote_dns { "socks5h" } else { "socks5" };
                write!(f, "{scheme}://{}{}:{port}", user(u), bracket(host))
            }
        }
    }
}

fn bracket(h: &str) -> String {
    if h.contains(':') {
        format!("[{h}]")
    } else {
        h.to_string()
    }
}

impl FromStr for Proxy {
    type Err = String;
    /// `direct`, `http://[user@]host[:port]`, `socks5://…`, `socks5h://…`; a bare `host:port`
    /// means HTTP, as in curl. The default port is 1080, as in curl. The user is
    /// percent-decoded (`CORP%5Calice` is `CORP\alice`). A password is refused: this is the
    /// form for `--proxy` and the config file, and every local user can read a command line
    /// (the environment's URL may carry one: [`Proxy::parse_with_password`]).
    fn from_str(s: &str) -> Result<Proxy, String> {
        match Proxy::parse_with_password(s)? {
            (_, Some(_)) => Err(format!(
                "proxy `{}`: a password does not belong in the URL (it would be visible to every local user); set SALLYPORT_PROXY_PASSWORD",
                redact(s)
            )),
            (p, None) => Ok(p),
        }
    }
}

impl Proxy {
    /// Like [`Proxy::from_str`], and a password in the URL (`http://user:pa%40ss@proxy:3128`)
    /// is accepted and returned percent-decoded, as curl reads `https_proxy`: the environment is
    /// private to the user. Errors never show what is between `://` and `@`.
    pub fn parse_with_password(s: &str) -> Result<(Proxy, Option<Password>), String> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("direct") || s.is_empty() {
            return Ok((Proxy::Direct, None));
        }
        let (scheme, rest) = match s.split_once("://") {
            Some((sc, r)) => (sc.to_ascii_lowercase(), r),
            None => ("http".to_string(), s),
        };
        let rest = rest.trim_end_matches('/');
        let bad_escape = || {
            format!(
                "proxy `{}`: a bad %-escape in the user or password",
                redact(s)
            )
        };
        let (user, password, hostport) = match rest.rsplit_once('@') {
            Some((userinfo, hp)) => {
                let (u, p) = match userinfo.split_once(':') {
                    Some((u, p)) => (u, Some(p)),
                    None => (userinfo, None),
                };
                let user = crate::url::percent_decode(u).ok_or_else(bad_escape)?;
                let password = match p {
                    Some(p) => Some(Password::new(
                        crate::url::percent_decode(p).ok_or_else(bad_escape)?,
                    )),
                    None => None,
                };
                ((!user.is_empty()).then_some(user), password, hp)
            }
            None => (None, None, rest),
        };
        let (host, port) = split_host_port(hostport)
            .ok_or_else(|| format!("proxy `{}`: expected SCHEME://HOST[:PORT]", redact(s)))?;
        let port = port.unwrap_or(1080);
        let proxy = match scheme.as_str() {
            "http" => Proxy::Http { host, port, user },
            "socks5" => Proxy::Socks5 { host, port, user, remote_dns: false },
            "socks5h" => Proxy::Socks5 { host, port, user, remote_dns: true },
            other => return Err(format!("proxy `{}`: scheme `{other}` is not supported (use http://, socks5://, socks5h:// or direct)", redact(s))),
        };
        Ok((proxy, password))
    }

    /// The user named in the URL, if any.
    pub fn user(&self) -> Option<&str> {
        match self {
            Proxy::Http { user, .. } | Proxy::Socks5 { user, .. } => user.as_deref(),
            Proxy::Direct => None,
        }
    }
}

/// Hides anything between `://` and `@` (credentials) in a proxy string.
pub fn redact(s: &str) -> String {
    match (s.find("://"), s.rfind('@')) {
        (Some(a), Some(b)) if b > a => format!("{}****{}", &s[..a + 3], &s[b..]),
        (None, Some(b)) => format!("****{}", &s[b..]),
        _ => s.to_string(),
    }
}

fn split_host_port(hp: &str) -> Option<(String, Option<u16>)> {
    if let Some(v6) = hp.strip_prefix('[') {
        let (h, rest) = v6.split_once(']')?;
        let port = match rest.strip_prefix(':') {
            Some(p) => Some(p.parse().ok()?),
            None if rest.is_empty() => None,
            None => return None,
        };
        return (!h.is_empty()).then(|| (h.to_string(), port));
    }
    match hp.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() => Some((h.to_string(), Some(p.parse().ok()?))),
        Some(_) => None,
        None if hp.is_empty() => None,
        None => Some((hp.to_string(), None)),
    }
}

/// curl's `NO_PROXY` semantics: a comma-separated list; `*` matches everything; an entry matches
/// the host itself and its subdomains (a leading dot is optional); IP literals match exactly or
/// by CIDR prefix (`10.0.0.0/8`). Ports in entries are ignored.
pub fn no_proxy_matches(no_proxy: &str, host: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let host_ip: Option<std::net::IpAddr> = host.trim_matches(['[', ']']).parse().ok();
    for entry in no_proxy.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        if entry == "*" {
            return true;
        }
        let entry = entry.to_ascii_lowercase();
        // From OS settings: Windows' `<local>` (names without a dot) and globs (`10.*`).
        if entry == "<local>" {
            if host_ip.is_none() && !host.contains('.') {
                return true;
            }
            continue;
        }
        if entry.contains('*') {
            if glob(entry.trim_start_matches("*."), &host) || glob(&entry, &host) {
                return true;
            }
            continue;
        }
        if let (Some(ip), Ok(net)) = (host_ip, entry.parse::<IpNetLite>()) {
            if net.contains(ip) {
                return true;
            }
            continue;
        }
        let name = entry.trim_start_matches('.').trim_end_matches('.');
        let name = name
            .rsplit_once(':')
            .filter(|(_, p)| p.parse::<u16>().is_ok())
            .map(|(n, _)| n)
            .unwrap_or(name);
        if !name.is_empty() && (host == name || host.ends_with(&format!(".{name}"))) {
            return true;
        }
    }
    false
}

/// `*` matches any run of characters; everything else literally.
fn glob(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if parts.len() == 1 {
        return pattern == text;
    }
    if !text.starts_with(first) || text.len() < first.len() + last.len() || !text.ends_with(last) {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

/// An IP address or CIDR network, for `NO_PROXY` only.
struct IpNetLite {
    addr: std::net::IpAddr,
    prefix: u8,
}

impl FromStr for IpNetLite {
    type Err = ();
    fn from_str(s: &str) -> Result<IpNetLite, ()> {
        let s = s.trim_matches(['[', ']']);
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p.parse::<u8>().map_err(|_| ())?)),
            None => (s, None),
        };
        let addr: std::net::IpAddr = a.parse().map_err(|_| ())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = p.unwrap_or(max);
        if prefix > max {
            return Err(());
        }
        Ok(IpNetLite { addr, prefix })
    }
}

impl IpNetLite {
    fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr::*;
        match (self.addr, ip) {
            (V4(n), V4(i)) => {
                let mask = if self.prefix == 0 {
                    0
                } else {
                    u32::MAX << (32 - self.prefix)
                };
                u32::from(n) & mask == u32::from(i) & mask
            }
            (V6(n), V6(i)) => {
                let mask = if self.prefix == 0 {
                    0
                } else {
                    u128::MAX << (128 - self.prefix)
                };
                u128::from(n) & mask == u128::from(i) & mask
            }
            _ => false,
        }
    }
}

/// The environment variables naming a proxy, in curl's order of precedence.
pub const ENV_VARS: [&str; 4] = ["https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"];

/// The environment's proxy URL (the first of [`ENV_VARS`] that is set), parsed with its user
/// and password, as curl reads it. `None` when none is set.
pub fn env_proxy(
    get: impl Fn(&str) -> Option<String>,
) -> Option<Result<(Proxy, Option<Password>), String>> {
    let value = ENV_VARS
        .iter()
        .find_map(|k| get(k).filter(|v| !v.trim().is_empty()))?;
    Some(Proxy::parse_with_password(&value))
}

/// The proxy the environment asks for to reach `host` over TLS, with curl's precedence:
/// `https_proxy`, `HTTPS_PROXY`, `all_proxy`, `ALL_PROXY`; `no_proxy`/`NO_PROXY` exempt hosts.
/// `None` when the environment names none (or exempts `host`). A password in the URL is not
/// returned here: [`crate::Egress::from_settings`] takes it, with the user, as the credentials.
pub fn from_env(get: impl Fn(&str) -> Option<String>, host: &str) -> Option<Result<Proxy, String>> {
    let parsed = env_proxy(&get)?;
    let no = get("no_proxy")
        .or_else(|| get("NO_PROXY"))
        .unwrap_or_default();
    if no_proxy_matches(&no, host) {
        return None;
    }
    Some(parsed.map(|(p, _)| p))
}

/// Why a proxy did not give us a tunnel. The messages name the proxy and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("proxy {proxy} answered 407, asked for {schemes}, {why}")]
    AuthRequired {
        proxy: String,
        schemes: String,
        why: String,
    },
    #[error("proxy {proxy} rejected the {scheme} credentials of user `{user}` (407); not retrying, so the account does not lock: check the password")]
    AuthRejected {
        proxy: String,
        user: String,
        scheme: String,
    },
    #[error("proxy {proxy}: our credentials for user `{user}` got no clear answer ({why}); not sending them again for 10 minutes, so the account does not lock")]
    AuthUnconfirmed {
        proxy: String,
        user: String,
        why: String,
    },
    #[error("proxy {proxy}: {scheme} authentication failed: {why}")]
    AuthFailed {
        proxy: String,
        scheme: String,
        why: String,
    },
    #[error("proxy {proxy} refused CONNECT to {target}: HTTP {status} {reason}")]
    Refused {
        proxy: String,
        target: String,
        status: u16,
        reason: String,
    },
    #[error("proxy {proxy} sent a malformed answer: {why}")]
    Malformed { proxy: String, why: String },
    #[error("proxy {proxy} did not answer within {after:?}")]
    Timeout { proxy: String, after: Duration },
    #[error("SOCKS5 proxy {proxy} refused {target}: {why}")]
    Socks {
        proxy: String,
        target: String,
        why: String,
    },
    #[error("proxy {proxy}: {source}")]
    Io {
        proxy: String,
        source: std::io::Error,
    },
}

impl ProxyError {
    /// True when the proxy refused our credentials: retrying would risk locking the account, so
    /// nothing retries this path until the configuration changes.
    pub fn credentials_rejected(&self) -> bool {
        match self {
            ProxyError::AuthRejected { .. } => true,
            ProxyError::Socks { why, .. } => why.contains("rejected the credentials"),
            _ => false,
        }
    }

    /// True when our password went out and got no clear answer (see
    /// [`ProxyError::AuthUnconfirmed`]): not sent again for a while.
    pub fn credentials_unconfirmed(&self) -> bool {
        matches!(self, ProxyError::AuthUnconfirmed { .. })
    }
}

/// SOCKS5 CONNECT through a proxy already connected on `io` (RFC 1928, RFC 1929 for
/// username/password). `host` is sent as a name (remote resolution) unless it is an address.
pub async fn socks5_connect<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    proxy: &str,
    host: &str,
    port: u16,
    credentials: Option<(&str, &Password)>,
) -> Result<(), ProxyError> {
    let ioerr = |source| ProxyError::Io {
        proxy: proxy.to_string(),
        source,
    };
    let target = format!("{}:{port}", bracket(host));
    let socks = |why: &str| ProxyError::Socks {
        proxy: proxy.into(),
        target: target.clone(),
        why: why.into(),
    };
    let methods: &[u8] = if credentials.is_some() {
        &[5, 2, 0, 2]
    } else {
        &[5, 1, 0]
    };
    io.write_all(methods).await.map_err(ioerr)?;
    let mut sel = [0u8; 2];
    io.read_exact(&mut sel).await.map_err(ioerr)?;
    match (sel[0], sel[1], credentials) {
        (5, 0, _) => {}
        (5, 2, Some((user, pw))) => {
            let (u, p) = (user.as_bytes(), pw.expose().as_bytes());
            if u.len() > 255 || p.len() > 255 {
                return Err(socks("user name or password longer than 255 bytes"));
            }
            let mut m = vec![1, u.len() as u8];
            m.extend_from_slice(u);
            m.push(p.len() as u8);
            m.extend_from_slice(p);
            io.write_all(&m).await.map_err(ioerr)?;
            let mut r = [0u8; 2];
            io.read_exact(&mut r).await.map_err(ioerr)?;
            if r[1] != 0 {
                return Err(socks(&format!("rejected the credentials of user `{user}`; not retrying")));
            }
        }
        (5, 2, None) => return Err(socks("asks for a user name and password; configure socks5://USER@host and SALLYPORT_PROXY_PASSWORD")),
        (5, 0xff, _) => return Err(socks("accepts none of our authentication methods")),
        _ => return Err(socks("does not speak SOCKS5")),
    }
    let mut req = vec![5, 1, 0];
    match host.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(a)) => {
            req.push(1);
            req.extend_from_slice(&a.octets());
        }
        Ok(std::net::IpAddr::V6(a)) => {
            req.push(4);
            req.extend_from_slice(&a.octets());
        }
        Err(_) => {
            let h = host.as_bytes();
            if h.is_empty() || h.len() > 255 {
                return Err(socks("bad host name"));
            }
            req.push(3);
            req.push(h.len() as u8);
            req.extend_from_slice(h);
        }
    }
    req.extend_from_slice(&port.to_be_bytes());
    io.write_all(&req).await.map_err(ioerr)?;
    let mut head = [0u8; 4];
    io.read_exact(&mut head).await.map_err(ioerr)?;
    if head[0] != 5 {
        return Err(socks("malformed reply"));
    }
    if head[1] != 0 {
        let why = match head[1] {
            2 => "not allowed by its ruleset",
            3 => "network unreachable",
            4 => "host unreachable (from a sallyport agent: unknown, or no connector serves it)",
            5 => "connection refused",
            6 => "TTL expired",
            7 => "command not supported",
            8 => "address type not supported",
            _ => "general failure",
        };
        return Err(socks(why));
    }
    let skip = match head[3] {
        1 => 6,
        4 => 18,
        3 => {
            let mut l = [0u8; 1];
            io.read_exact(&mut l).await.map_err(ioerr)?;
            l[0] as usize + 2
        }
        _ => return Err(socks("malformed reply")),
    };
    let mut rest = vec![0u8; skip];
    io.read_exact(&mut rest).await.map_err(ioerr)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_strings_parse_like_curl() {
        assert_eq!("direct".parse::<Proxy>().unwrap(), Proxy::Direct);
        assert_eq!(
            "http://proxy.corp:3128".parse::<Proxy>().unwrap(),
            Proxy::Http {
                host: "proxy.corp".into(),
                port: 3128,
                user: None
            }
        );
        assert_eq!(
            "proxy.corp".parse::<Proxy>().unwrap(),
            Proxy::Http {
                host: "proxy.corp".into(),
                port: 1080,
                user: None
            }
        );
        assert_eq!(
            "socks5h://alice@[fd00::1]:1080/".parse::<Proxy>().unwrap(),
            Proxy::Socks5 {
                host: "fd00::1".into(),
                port: 1080,
                user: Some("alice".into()),
                remote_dns: true
            }
        );
        assert_eq!(
            "http://alice@proxy.corp:3128"
                .parse::<Proxy>()
                .unwrap()
                .to_string(),
            "http://alice@proxy.corp:3128"
        );
    }

    #[test]
    fn a_password_in_the_proxy_url_is_refused_and_not_echoed() {
        let e = "http://alice:s3cret@proxy.corp:3128"
            .parse::<Proxy>()
            .unwrap_err();
        assert!(
            e.contains("SALLYPORT_PROXY_PASSWORD") && !e.contains("s3cret"),
            "{e}"
        );
        assert!("ftp://x:1"
            .parse::<Proxy>()
            .unwrap_err()
            .contains("not supported"));
        assert!("http://:1".parse::<Proxy>().is_err());
        assert_eq!(format!("{:?}", Password::new("s3cret")), "****");
    }

    /// `https_proxy=http://CORP%5Calice@proxy:3128` and `http://user:password@proxy:3128` were
    /// refused; curl, pip, git and apt accept them.
    #[test]
    fn the_environments_proxy_url_may_carry_an_escaped_user_and_a_password() {
        let env = |v: &'static str| move |k: &str| (k == "HTTPS_PROXY").then(|| v.to_string());
        let (p, pw) = env_proxy(env("http://CORP%5Calice@proxy.corp:3128"))
            .unwrap()
            .unwrap();
        assert_eq!((p.user(), pw.is_none()), (Some("CORP\\alice"), true));
        let (p, pw) = env_proxy(env("http://user:pa%40ss%3Aw0rd@proxy.corp:3128/"))
            .unwrap()
            .unwrap();
        assert_eq!(p.to_string(), "http://user@proxy.corp:3128");
        assert_eq!(pw.unwrap().expose(), "pa@ss:w0rd");
        // The password is not part of the candidate, and no error shows it.
        let p = from_env(env("http://user:s3cret@proxy.corp:3128"), "gw")
            .unwrap()
            .unwrap();
        assert!(!format!("{p} {p:?}").contains("s3cret"));
        for bad in [
            "http://user:s3cret@proxy.corp:notaport",
            "http://user:s3cret%zz@p:1",
            "ftp://user:s3cret@p:1",
        ] {
            let e = from_env(env(bad), "gw").unwrap().unwrap_err();
            assert!(!e.contains("s3cret") && e.contains("****"), "{e}");
        }
        // --proxy (a command line) still refuses a password, and the user is decoded there too.
        assert!("http://CORP%5Calice@p:1".parse::<Proxy>().unwrap().user() == Some("CORP\\alice"));
        assert!("http://u:pw@p:1".parse::<Proxy>().is_err());
    }

    #[test]
    fn no_proxy_follows_curl() {
        assert!(no_proxy_matches("*", "gw.example.com"));
        assert!(no_proxy_matches("example.com", "gw.example.com"));
        assert!(no_proxy_matches(".example.com", "gw.example.com"));
        assert!(no_proxy_matches("gw.example.com", "GW.Example.com."));
        assert!(!no_proxy_matches("example.com", "badexample.com"));
        assert!(!no_proxy_matches("other.com, internal", "gw.example.com"));
        assert!(no_proxy_matches("10.0.0.0/8", "10.1.2.3"));
        assert!(!no_proxy_matches("10.0.0.0/8", "11.1.2.3"));
        assert!(no_proxy_matches("::1", "[::1]"));
        assert!(no_proxy_matches("example.com:443", "gw.example.com"));
        assert!(!no_proxy_matches("", "gw.example.com"));
        // Entries from OS settings.
        assert!(no_proxy_matches("<local>", "intranet"));
        assert!(!no_proxy_matches("<local>", "gw.example.com"));
        assert!(no_proxy_matches("10.*", "10.1.2.3"));
        assert!(!no_proxy_matches("10.*", "110.1.2.3"));
        assert!(no_proxy_matches("*.example.com", "gw.example.com"));
        assert!(no_proxy_matches("*.example.com", "example.com"));
        assert!(!no_proxy_matches("*.example.com", "example.org"));
    }

    #[test]
    fn the_environment_is_read_in_curls_order_with_no_proxy() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let e = env(&[
            ("HTTPS_PROXY", "http://upper:1"),
            ("https_proxy", "http://lower:2"),
            ("ALL_PROXY", "socks5://all:3"),
        ]);
        assert_eq!(
            from_env(e, "gw.example.com").unwrap().unwrap(),
            Proxy::Http {
                host: "lower".into(),
                port: 2,
                user: None
            }
        );
        let e = env(&[("ALL_PROXY", "socks5://all:3"), ("NO_PROXY", "example.com")]);
        assert!(from_env(e, "gw.example.com").is_none());
        let e = env(&[("ALL_PROXY", "socks5://all:3")]);
        assert!(matches!(
            from_env(e, "gw.example.com"),
            Some(Ok(Proxy::Socks5 { .. }))
        ));
        assert!(from_env(|_| None, "gw").is_none());
    }
}
