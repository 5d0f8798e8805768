//! The admin listener of a gateway process (the DMZ or a connector): Prometheus `/metrics` and
//! an HTML admin page (sessions, users, connectors, routes, recent refusals), on its own port,
//! loopback by default, never on the tunnel's port.
//!
//! Who may ask, checked in this order, cheapest first:
//! 1. the peer address is in the admin networks (default: loopback), else the connection is
//!    closed before a byte is read;
//! 2. the `Host` header is one this listener expects (its own address, `localhost`, the
//!    configured names): a page on another site that rebinds its DNS name to 127.0.0.1 sends
//!    its own name and gets 403 (DNS rebinding);
//! 3. for the page only: the admin token, as `Authorization: Bearer` or the cookie the login form
//!    sets (HttpOnly, SameSite=Strict, an HMAC under the token with its expiry). `/metrics`
//!    holds only counts with fixed labels and needs no token, like most exporters.
//! 4. a `POST` (login, logout) whose `Origin` is another site's is refused (login guessing
//!    from an admin's browser).
//!
//! Bounded whatever the clients do: at most [`MAX_CONNECTIONS`] connections (no accept without
//! a permit), one request per connection, the head within [`HEAD_TIMEOUT`], the whole exchange
//! within [`CONNECTION_DEADLINE`] (a slow reader cannot hold a permit longer), heads of at most
//! 8 KiB and bodies of at most [`BODY_LIMIT`].

pub mod connector;
pub mod page;

pub use page::{Table, View};

use crate::policy::canonical_ip;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use ipnet::IpNet;
use sha2::{Digest, Sha256};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Connections served at once; more wait in the kernel's backlog.
pub const MAX_CONNECTIONS: usize = 16;
/// Time to send the request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Time for the whole exchange, answer included.
pub const CONNECTION_DEADLINE: Duration = Duration::from_secs(10);
/// Largest request body (the login form).
pub const BODY_LIMIT: usize = 1024;
/// How long a login lasts.
pub const LOGIN_LIFETIME: Duration = Duration::from_secs(8 * 3600);

const COOKIE: &str = "sallyport_admin";

/// The admin token: kept as its SHA-256 (compared in constant time) and as the key of the
/// login cookie's HMAC. `Debug` shows nothing of it.
#[derive(Clone)]
pub struct AdminToken {
    sha256: [u8; 32],
    key: Vec<u8>,
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(****)")
    }
}

impl AdminToken {
    /// Reads the token from `path` (first line, trimmed; at least 16 characters).
    pub fn read(path: &Path) -> Result<AdminToken, AdminError> {
        let text = std::fs::read_to_string(path).map_err(|source| AdminError::TokenFile {
            path: path.to_path_buf(),
            why: source.to_string(),
        })?;
        let t = text.lines().next().unwrap_or("").trim();
        if t.len() < 16 {
            return Err(AdminError::TokenFile {
                path: path.to_path_buf(),
                why: "the admin token must be at least 16 characters (e.g. `openssl rand -hex 32`)"
                    .into(),
            });
        }
        Ok(AdminToken::new(t))
    }

    pub fn new(token: &str) -> AdminToken {
        AdminToken {
            sha256: Sha256::digest(token.as_bytes()).into(),
            key: token.as_bytes().to_vec(),
        }
    }

    fn matches(&self, presented: &str) -> bool {
        let h: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        bool::from(h.ct_eq(&self.sha256))
    }

    fn mac(&self, expiry: u64) -> hmac::Hmac<Sha256> {
        use hmac::Mac;
        let mut m = <hmac::Hmac<Sha256> as Mac>::new_from_slice(&self.key)
            .expect("HMAC takes any key length");
        m.update(b"sallyport admin login\0");
        m.update(&expiry.to_be_bytes());
        m
    }

    /// A login cookie value valid until `expiry` (seconds since the epoch).
    fn cookie(&self, expiry: u64) -> String {
        use hmac::Mac;
        format!(
            "{expiry}.{}",
            hex::encode(self.mac(expiry).finalize().into_bytes())
        )
    }

    fn cookie_ok(&self, value: &str, now: u64) -> bool {
        use hmac::Mac;
        let Some((exp, tag)) = value.split_once('.') else {
            return false;
        };
        let (Ok(exp), Ok(tag)) = (exp.parse::<u64>(), hex::decode(tag)) else {
            return false;
        };
        exp > now && self.mac(exp).verify_slice(&tag).is_ok()
    }
}

/// The admin listener's settings, validated.
#[derive(Clone, Debug)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// `None`: the page answers that no token is configured; `/metrics` still works.
    pub token: Option<AdminToken>,
    /// Peers allowed at all [default: loopback].
    pub networks: Vec<IpNet>,
    /// Host names (with or without a port) the `Host` header may carry besides the listen
    /// address, `localhost`, `127.0.0.1` and `[::1]`.
    pub hosts: Vec<String>,
}

impl AdminConfig {
    /// Loopback networks, the default of `networks`.
    pub fn loopback() -> Vec<IpNet> {
        vec![
            "127.0.0.0/8".parse().expect("literal"),
            "::1/128".parse().expect("literal"),
        ]
    }
}

/// `[admin]` in the DMZ's and the connector's TOML file.
#[derive(serde::Deserialize, Debug, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct AdminFile {
    /// e.g. `127.0.0.1:9090`; without it there is no admin listener.
    pub listen: Option<SocketAddr>,
    /// File holding the admin token (the page needs it).
    pub token_file: Option<PathBuf>,
    /// Networks allowed to connect [default: loopback].
    #[serde(default)]
    pub networks: Vec<String>,
    /// Names the `Host` header may carry (e.g. `gw-admin.corp.example:9090`).
    #[serde(default)]
    pub hosts: Vec<String>,
}

/// The admin flags of both roles.
#[derive(clap::Args, Debug, Default, Clone)]
pub struct AdminArgs {
    /// Serve /metrics and the admin page on this address, e.g. 127.0.0.1:9090.
    #[arg(long = "admin")]
    pub admin: Option<SocketAddr>,
    /// File holding the admin page's token.
    #[arg(long)]
    pub admin_token_file: Option<PathBuf>,
    /// A network allowed to reach the admin listener [default: loopback]. Repeatable.
    #[arg(long = "admin-network", value_parser = crate::config::parse_net)]
    pub admin_networks: Vec<IpNet>,
}

/// The admin settings from flags and the file's `[admin]` (paths relative to the file at
/// `base`); `None` when no listen address is given.
pub fn config(
    args: &AdminArgs,
    file: &AdminFile,
    base: Option<&Path>,
) -> Result<Option<AdminConfig>, crate::config::ConfigError> {
    use crate::config::{invalid, relative_to};
    let Some(listen) = args.admin.or(file.listen) else {
        if args.admin_token_file.is_some() || !args.admin_networks.is_empty() {
            return Err(invalid(
                "--admin-token-file/--admin-network need --admin ADDR (e.g. --admin 127.0.0.1:9090)",
            ));
        }
        return Ok(None);
    };
    let token = match args
        .admin_token_file
        .clone()
        .or(file.token_file.clone().map(|p| relative_to(base, p)))
    {
        Some(p) => Some(AdminToken::read(&p).map_err(|e| invalid(e.to_string()))?),
        None => None,
    };
    let mut networks = args.admin_networks.clone();
    for n in &file.networks {
        networks.push(
            crate::config::parse_net(n).map_err(|e| invalid(format!("admin.networks: {e}")))?,
        );
    }
    if networks.is_empty() {
        networks = AdminConfig::loopback();
    }
    Ok(Some(AdminConfig {
        listen,
        token,
        networks,
        hosts: file.hosts.iter().map(|h| h.to_ascii_lowercase()).collect(),
    }))
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("admin listener: cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("admin token file {path}: {why}")]
    TokenFile { path: PathBuf, why: String },
}

/// Binds the admin listener (before anything else starts, so a taken port stops the program).
pub async fn bind(cfg: &AdminConfig) -> Result<TcpListener, AdminError> {
    TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| AdminError::Bind {
            addr: cfg.listen,
            source,
        })
}

struct State {
    cfg: AdminConfig,
    view: Arc<dyn View>,
    hosts: Vec<String>,
}

/// Serves the admin listener until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    cfg: AdminConfig,
    view: Arc<dyn View>,
    shutdown: CancellationToken,
) {
    let local = listener.local_addr().unwrap_or(cfg.listen);
    let mut hosts = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "[::1]".to_string(),
    ];
    if !local.ip().is_unspecified() {
        hosts.push(match local.ip() {
            IpAddr::V4(a) => a.to_string(),
            IpAddr::V6(a) => format!("[{a}]"),
        });
    }
    let mut allowed = Vec::new();
    for h in hosts.iter().chain(&cfg.hosts) {
        allowed.push(h.clone());
        if !h.contains(':') || h.ends_with(']') {
            allowed.push(format!("{h}:{}", local.port()));
        }
    }
    info!(addr = %local, page = cfg.token.is_some(), networks = %cfg.networks.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(","), "admin listening");
    let state = Arc::new(State {
        cfg,
        view,
        hosts: allowed,
    });
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => return,
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
        };
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let ip = canonical_ip(peer.ip());
        if !state.cfg.networks.iter().any(|n| n.contains(&ip)) {
            debug!(%peer, "admin connection from outside the admin networks: closed");
            continue;
        }
        let state = state.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(&state, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .keep_alive(false)
                .max_buf_size(8192)
                .serve_connection(TokioIo::new(tcp), service);
            if tokio::time::timeout(CONNECTION_DEADLINE, conn)
                .await
                .is_err()
            {
                debug!(%peer, "admin connection over its deadline: closed");
            }
            drop(permit);
        });
    }
}

type Body = Full<Bytes>;

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn plain(status: StatusCode, text: &str) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(text.to_string())));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        "content-type",
        "text/plain; charset=utf-8".parse().expect("ok"),
    );
    h.insert("cache-control", "no-store".parse().expect("ok"));
    h.insert("x-content-type-options", "nosniff".parse().expect("ok"));
    r
}

fn html(status: StatusCode, body: String) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        "content-type",
        "text/html; charset=utf-8".parse().expect("ok"),
    );
    h.insert("cache-control", "no-store".parse().expect("ok"));
    h.insert("x-content-type-options", "nosniff".parse().expect("ok"));
    h.insert("x-frame-options", "DENY".parse().expect("ok"));
    // `same-origin`: a form posted from the page names its origin (with `no-referrer`, Chromium
    // sends `Origin: null`, which the POST check refuses); other sites learn nothing.
    h.insert("referrer-policy", "same-origin".parse().expect("ok"));
    // No script at all; styles inline; forms only to this origin; never framed.
    h.insert(
        "content-security-policy",
        "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
            .parse()
            .expect("ok"),
    );
    r
}

fn see_other(cookie: Option<String>) -> Response<Body> {
    let mut r = plain(StatusCode::SEE_OTHER, "");
    r.headers_mut().insert("location", "/".parse().expect("ok"));
    if let Some(c) = cookie.and_then(|c| c.parse().ok()) {
        r.headers_mut().insert("set-cookie", c);
    }
    r
}

async fn handle(state: &State, req: Request<Incoming>) -> Response<Body> {
    // DNS rebinding: a page served under another name that now resolves here sends that name.
    let host = req
        .headers()
        .get("host")
        .and_then(|h| h.to_str().ok())
        .map(|h| h.trim().to_ascii_lowercase());
    if !host.is_some_and(|h| state.hosts.contains(&h)) {
        return plain(
            StatusCode::FORBIDDEN,
            "sallyport admin: unexpected Host header (add the name to [admin] hosts)\n",
        );
    }
    // A form posted from another site (login guessing from an admin's browser, logout):
    // browsers name the page's origin, which must be this listener.
    if req.method() == hyper::Method::POST {
        let origin = req.headers().get("origin").and_then(|o| o.to_str().ok());
        let same = |o: &str| {
            let host = o
                .strip_prefix("http://")
                .or_else(|| o.strip_prefix("https://"))
                .unwrap_or("");
            state.hosts.iter().any(|h| h.eq_ignore_ascii_case(host))
        };
        if origin.is_some_and(|o| !same(o)) {
            return plain(
                StatusCode::FORBIDDEN,
                "sallyport admin: form from another site\n",
            );
        }
    }
    let path = req.uri().path().to_string();
    match (req.method().as_str(), path.as_str()) {
        ("GET", "/metrics") => {
            let mut r = plain(StatusCode::OK, &state.view.metrics().render());
            r.headers_mut().insert(
                "content-type",
                "text/plain; version=0.0.4; charset=utf-8"
                    .parse()
                    .expect("ok"),
            );
            r
        }
        ("GET", "/") => {
            let Some(token) = &state.cfg.token else {
                return plain(
                    StatusCode::NOT_FOUND,
                    "sallyport admin: no admin token configured (--admin-token-file); /metrics is served\n",
                );
            };
            if authenticated(token, &req) {
                html(StatusCode::OK, page::render(state.view.as_ref()))
            } else {
                html(
                    StatusCode::UNAUTHORIZED,
                    page::login(&state.view.title(), false),
                )
            }
        }
        ("POST", "/login") => {
            let Some(token) = &state.cfg.token else {
                return plain(
                    StatusCode::NOT_FOUND,
                    "sallyport admin: no admin token configured\n",
                );
            };
            let title = state.view.title();
            let body = match Limited::new(req.into_body(), BODY_LIMIT).collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => {
                    return plain(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "sallyport admin: body too large\n",
                    )
                }
            };
            let presented = form_value(&body, "token").unwrap_or_default();
            if token.matches(&presented) {
                let expiry = now_secs() + LOGIN_LIFETIME.as_secs();
                see_other(Some(format!(
                    "{COOKIE}={}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}",
                    token.cookie(expiry),
                    LOGIN_LIFETIME.as_secs()
                )))
            } else {
                static LOG: crate::logsafe::Throttle = crate::logsafe::Throttle::new(20);
                if let Some(left_out) = LOG.allow() {
                    warn!(left_out, "admin login with a wrong token");
                }
                html(StatusCode::UNAUTHORIZED, page::login(&title, true))
            }
        }
        ("POST", "/logout") => see_other(Some(format!(
            "{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"
        ))),
        _ => plain(StatusCode::NOT_FOUND, "sallyport admin: not found\n"),
    }
}

/// The bearer token or the login cookie, checked against `token`.
fn authenticated(token: &AdminToken, req: &Request<Incoming>) -> bool {
    let h = req.headers();
    if let Some(v) = h.get("authorization").and_then(|v| v.to_str().ok()) {
        let presented = v
            .strip_prefix("Bearer ")
            .or_else(|| v.strip_prefix("bearer "))
            .unwrap_or("");
        return token.matches(presented.trim());
    }
    let now = now_secs();
    h.get_all("cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .any(|(k, v)| k == COOKIE && token.cookie_ok(v, now))
}

/// A value of an `application/x-www-form-urlencoded` body.
fn form_value(body: &[u8], key: &str) -> Option<String> {
    let text = std::str::from_utf8(body).ok()?;
    text.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == key).then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz");
                match u8::from_str_radix(hex, 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forged_or_expired_login_cookie_is_refused() {
        let t = AdminToken::new("0123456789abcdef0123");
        let now = 1_000_000;
        let good = t.cookie(now + 60);
        assert!(t.cookie_ok(&good, now));
        assert!(!t.cookie_ok(&good, now + 61));
        // Extending the expiry breaks the HMAC.
        let (_, tag) = good.split_once('.').unwrap();
        assert!(!t.cookie_ok(&format!("{}.{tag}", now + 999_999), now));
        // Another token's cookie is worthless here.
        let other = AdminToken::new("another-token-0123456789");
        assert!(!t.cookie_ok(&other.cookie(now + 60), now));
        assert!(!t.cookie_ok("garbage", now));
        assert!(format!("{t:?}").contains("****") && !format!("{t:?}").contains("0123"));
    }

    #[test]
    fn form_values_are_decoded() {
        assert_eq!(
            form_value(b"a=1&token=ab%2Bc+d%", "token").as_deref(),
            Some("ab+c d%")
        );
        assert_eq!(form_value(b"token=%zz", "token").as_deref(), Some("%zz"));
        assert_eq!(form_value(b"x=1", "token"), None);
    }
}
