//! # sallyport-egress: the way out to the gateway
//!
//! Used by the agent and by the connector to reach the DMZ gateway through whatever the network
//! allows: direct, a corporate HTTP proxy (Basic, Digest, NTLM, Negotiate), a SOCKS5 proxy,
//! PAC/WPAD, or the OS settings (see `docs/egress.md`). Callers get a byte stream to the gateway
//! (TLS for `wss://`) and speak WebSocket or HTTP on it.
//!
//! | item | what |
//! |---|---|
//! | [`GatewayUrl`] | a parsed `wss://host:port/prefix` |
//! | [`TlsOptions`], [`client_config`] | trust: the OS store plus `--ca`, or only a pinned CA, and the enrolled key pin |
//! | [`CaAnchor`] | is this connection's certificate issued by `--ca` itself (not by the OS store)? |
//! | [`dial_via`], [`GatewayStream`] | TCP, the proxy's handshake, TLS, all within one timeout; errors that say which hop failed |
//! | [`probe`], [`network`] | the candidates, tried staggered; what worked, remembered per network |
//! | [`proxy`], [`http`], [`auth`] | corporate proxies: `--proxy`, environment, SOCKS5; `CONNECT` and its auth rounds |
//! | [`pac`], [`system`] | PAC (sandboxed), WPAD; OS proxy settings |
//! | [`cert`], [`keychain`] | certificate names and key pins; the OS keychain |
//! | [`logging`] | the binaries' tracing setup (tungstenite capped: it would print the upgrade request) |

pub mod auth;
pub mod cert;
pub mod http;
pub mod keychain;
pub mod logging;
pub mod pac;
pub mod proxy;
pub mod system;

pub mod network;
pub mod probe;

pub use auth::{AuthOptions, Credentials, Scheme};
pub use probe::{Attempt, Candidate, Origin, Way};
pub use proxy::{Password, Proxy, ProxyError};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::RootCertStore;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, BufReader, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// Why the gateway could not be reached. Each variant names the hop that failed.
#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    #[error("invalid gateway URL `{url}`: {reason} (expected wss://host[:port][/prefix])")]
    BadUrl { url: String, reason: String },
    /// `role` says which hop: `gateway` or `proxy`.
    #[error("cannot resolve {role} host {host}: {source}")]
    Resolve {
        role: &'static str,
        host: String,
        source: io::Error,
    },
    #[error("cannot connect to {role} {addr}: {source}")]
    Connect {
        role: &'static str,
        addr: String,
        source: io::Error,
    },
    #[error("connecting to {role} {addr} timed out after {after:?}")]
    ConnectTimeout {
        role: &'static str,
        addr: String,
        after: Duration,
    },
    #[error("TLS handshake with gateway {host} failed: {reason}")]
    Tls { host: String, reason: String },
    #[error("cannot read CA file {path}: {reason}")]
    CaFile { path: PathBuf, reason: String },
    #[error(transparent)]
    Proxy(#[from] ProxyError),
    #[error("{0}")]
    BadProxy(String),
}

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

    /// Validates the settings. The password comes from `SALLYPORT_PROXY_PASSWORD` or the
    /// credentials file, never from a flag (every local user can read command lines).
    pub fn from_settings(s: &EgressSettings<'_>) -> Result<Egress, String> {
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
        // A user and its password come from ONE source, never mixed (a password tried with
        // another user's name is a failed logon for that user): the environment, or the
        // credentials file, or the OS keychain.
        let named_user = url_user.or(s.proxy_user.map(String::from));
        let env_password = std::env::var("SALLYPORT_PROXY_PASSWORD")
            .ok()
            .filter(|p| !p.is_empty())
            .map(Password::new);
        let credentials = match (env_password, s.credentials_file) {
            (Some(_), Some(path)) => {
                return Err(format!(
                    "both SALLYPORT_PROXY_PASSWORD and the credentials file {} give a proxy password; keep one",
                    path.display()
                ))
            }
            (Some(p), None) => match named_user {
                Some(u) => Some(Credentials::new(u, p)),
                None => return Err("SALLYPORT_PROXY_PASSWORD is set but no proxy user: give --proxy-user USER or http://USER@proxy".into()),
            },
            (None, Some(path)) => {
                let (file_user, password) = read_credentials_file(path)?;
                match (named_user, file_user) {
                    (Some(n), Some(f)) if n != f => {
                        // (`f` may be the start of a password that contains `:`: not shown.)
                        return Err(format!(
                            "the first line of the credentials file {} does not start with `{n}:` although the proxy user is `{n}`; write `{n}:PASSWORD` in it",
                            path.display()
                        ))
                    }
                    (Some(u), _) | (None, Some(u)) => Some(Credentials::new(u, password)),
                    (None, None) => {
                        return Err(format!(
                            "the credentials file {} holds a password but no user: write user:password in it, or give --proxy-user USER",
                            path.display()
                        ))
                    }
                }
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

/// A gateway address: `wss://gw.example.com/` or `ws://127.0.0.1:8080/sallyport` (plain only
/// for tests and for a gateway behind a TLS-terminating load balancer on a trusted hop).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// Path prefix without a trailing slash ("" for the root).
    pub prefix: String,
}

impl GatewayUrl {
    pub fn parse(url: &str) -> Result<GatewayUrl, EgressError> {
        let bad = |reason: &str| EgressError::BadUrl {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        let (tls, rest) = if let Some(r) = url.strip_prefix("wss://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("ws://") {
            (false, r)
        } else if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else {
            return Err(bad("the scheme must be wss:// (or ws:// for plain)"));
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if authority.is_empty() {
            return Err(bad("no host"));
        }
        if authority.contains('@') {
            return Err(bad(
                "credentials do not belong in the URL; use --token-file",
            ));
        }
        let default_port = if tls { 443 } else { 80 };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let end = v6
                .find(']')
                .ok_or_else(|| bad("unclosed [ in IPv6 address"))?;
            let host = &v6[..end];
            let port = match &v6[end + 1..] {
                "" => default_port,
                p => p
                    .strip_prefix(':')
                    .and_then(|p| p.parse().ok())
                    .ok_or_else(|| bad("bad port"))?,
            };
            (host.to_string(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), p.parse().map_err(|_| bad("bad port"))?),
                None => (authority.to_string(), default_port),
            }
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let prefix = path
            .split(['?', '#'])
            .next()
            .unwrap_or("")
            .trim_end_matches('/');
        Ok(GatewayUrl {
            tls,
            host,
            port,
            prefix: prefix.to_string(),
        })
    }

    /// The WebSocket URL of one endpoint under the prefix, e.g. `agent` or `connector`.
    pub fn endpoint(&self, name: &str) -> String {
        let scheme = if self.tls { "wss" } else { "ws" };
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        format!("{scheme}://{host}:{}{}/{name}", self.port, self.prefix)
    }

    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl std::fmt::Display for GatewayUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls { "wss" } else { "ws" };
        write!(f, "{scheme}://{}{}/", self.authority(), self.prefix)
    }
}

/// Which certificates the client trusts for the gateway.
#[derive(Clone, Debug, Default)]
pub struct TlsOptions {
    /// An extra trust anchor (PEM), e.g. the CA of a trial deployment.
    pub ca: Option<PathBuf>,
    /// Trust only `ca` (pinning), not the OS store. Connectors pin the DMZ's CA by default.
    pub pin: bool,
    /// The gateway's key pin from enrollment (`sha256/<base64>`, see [`cert::key_pin`]): on top
    /// of the certificate check, the gateway must present this key.
    pub key_pin: Option<String>,
    /// The agent also knows the gateway's inner-channel key: a certificate with another key
    /// (an inspecting proxy that re-signs, trusted by this machine) is let through, and the
    /// session then runs inside the inner channel, where that proxy reads nothing.
    pub inner_channel: bool,
}

/// Reads every certificate in a PEM file.
pub fn read_pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, EgressError> {
    use rustls::pki_types::pem::PemObject;
    let err = |reason: String| EgressError::CaFile {
        path: path.to_path_buf(),
        reason,
    };
    let data = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&data)
        .collect::<Result<_, _>>()
        .map_err(|e| err(format!("not PEM: {e}")))?;
    if certs.is_empty() {
        return Err(err("no CERTIFICATE block in it".into()));
    }
    Ok(certs)
}

/// The rustls client configuration for the gateway connection.
pub fn client_config(opts: &TlsOptions) -> Result<Arc<rustls::ClientConfig>, EgressError> {
    let mut roots = RootCertStore::empty();
    if !(opts.pin && opts.ca.is_some()) {
        let native = rustls_native_certs::load_native_certs();
        for e in &native.errors {
            tracing::debug!(error = %e, "skipping part of the OS trust store");
        }
        let (_added, _ignored) = roots.add_parsable_certificates(native.certs);
    }
    if let Some(path) = &opts.ca {
        for cert in read_pem_certs(path)? {
            roots.add(cert).map_err(|e| EgressError::CaFile {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| EgressError::Tls {
            host: String::new(),
            reason: e.to_string(),
        })?;
    let mut cfg = match &opts.key_pin {
        None => builder.with_root_certificates(roots).with_no_client_auth(),
        Some(pin) => {
            let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| EgressError::Tls {
                host: String::new(),
                reason: e.to_string(),
            })?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(PinnedKey {
                    inner,
                    pin: pin.clone(),
                    mismatch_ok: opts.inner_channel,
                }))
                .with_no_client_auth()
        }
    };
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// The usual certificate check, then the enrolled key pin.
#[derive(Debug)]
struct PinnedKey {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    pin: String,
    /// Another key is allowed (the inner channel protects the session then).
    mismatch_ok: bool,
}

impl rustls::client::danger::ServerCertVerifier for PinnedKey {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let verified =
            self.inner
                .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)?;
        match cert::key_pin(end_entity) {
            Some(seen) if seen == self.pin => Ok(verified),
            _ if self.mismatch_ok => Ok(verified),
            seen => Err(rustls::Error::General(format!(
                "the gateway presented key {} but this agent is pinned to {} (from enrollment): something re-signs TLS on the way (an inspecting proxy) or this is another gateway; re-enroll only if the gateway's key really changed",
                seen.as_deref().unwrap_or("(unreadable)"),
                self.pin
            ))),
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The gateway's own CA (`--ca`) on its own, without the OS store: does a connection's
/// certificate chain to it? Only then is the outer TLS the gateway's, and only then may a bearer
/// token ride it (an inspecting proxy's CA in the OS store passes the TLS check, not this one).
#[derive(Clone, Debug)]
pub struct CaAnchor {
    verifier: Arc<rustls::client::WebPkiServerVerifier>,
}

impl CaAnchor {
    /// The anchor from a PEM file of one or more CA certificates.
    pub fn from_file(path: &Path) -> Result<CaAnchor, EgressError> {
        let err = |reason: String| EgressError::CaFile {
            path: path.to_path_buf(),
            reason,
        };
        let mut roots = RootCertStore::empty();
        for cert in read_pem_certs(path)? {
            roots.add(cert).map_err(|e| err(e.to_string()))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| err(e.to_string()))?;
        Ok(CaAnchor { verifier })
    }

    /// Whether `io`'s certificate chain, as sent, is issued by this CA for `host`.
    pub fn issued(&self, io: &GatewayStream, host: &str) -> bool {
        use rustls::client::danger::ServerCertVerifier;
        let GatewayStream::Tls(s) = io else {
            return false;
        };
        let Some((leaf, rest)) = s
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.split_first())
        else {
            return false;
        };
        let Ok(name) = ServerName::try_from(host.to_string()) else {
            return false;
        };
        self.verifier
            .verify_server_cert(leaf, rest, &name, &[], rustls::pki_types::UnixTime::now())
            .is_ok()
    }
}

/// A byte stream to the gateway: TLS, or plain for `ws://`.
pub enum GatewayStream {
    Plain(TcpStream),
    Tls(Box<TlsStream<BufReader<TcpStream>>>),
}

impl GatewayStream {
    /// The key pin of the gateway's certificate (`sha256/…`), for enrollment; `None` on plain.
    pub fn key_pin(&self) -> Option<String> {
        match self {
            GatewayStream::Plain(_) => None,
            GatewayStream::Tls(s) => s
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|der| cert::key_pin(der)),
        }
    }

    /// Whose certificate the gateway connection presented, for `doctor`:
    /// `TLS, certificate CN=gw.example.com issued by CN=Corp Inspection CA`, followed by
    /// `; <subject> issued by <issuer>` for each further certificate of the chain sent.
    pub fn peer_summary(&self) -> String {
        match self {
            GatewayStream::Plain(_) => "plain (no TLS on this hop)".into(),
            GatewayStream::Tls(s) => {
                let chain = s.get_ref().1.peer_certificates().unwrap_or(&[]);
                let names: Vec<String> = chain
                    .iter()
                    .filter_map(|der| cert::names(der))
                    .map(|(subject, issuer)| format!("{subject} issued by {issuer}"))
                    .collect();
                if names.is_empty() {
                    "TLS (certificate names unreadable)".into()
                } else {
                    format!("TLS, certificate {}", names.join("; "))
                }
            }
        }
    }
}

impl AsyncRead for GatewayStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            GatewayStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            GatewayStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for GatewayStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            GatewayStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            GatewayStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            GatewayStream::Plain(s) => Pin::new(s).poll_flush(cx),
            GatewayStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            GatewayStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            GatewayStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            GatewayStream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            GatewayStream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            GatewayStream::Plain(s) => s.is_write_vectored(),
            GatewayStream::Tls(s) => s.is_write_vectored(),
        }
    }
}

/// Read buffer under TLS (see [`dial_via`]).
pub const TLS_READ_BUFFER: usize = 64 * 1024;

/// Dials the gateway through one way out: TCP to the proxy (or the gateway), the proxy's
/// handshake (HTTP `CONNECT` with its authentication rounds, or SOCKS5), then TLS when the URL
/// says `wss://`, all within `timeout`. Returns the stream and, for HTTP proxies, the
/// authentication scheme that worked (remembered to send Basic at once next time).
///
/// When the gateway's certificate has an unknown issuer, the error names who signed the
/// certificate seen on this path (one more handshake, without verification, only to read the
/// names): behind a TLS-inspecting proxy that is the corporate CA.
pub async fn dial_via(
    url: &GatewayUrl,
    tls: Option<&Arc<rustls::ClientConfig>>,
    timeout: Duration,
    proxy: &Proxy,
    auth: &AuthOptions,
    remembered: Option<Scheme>,
) -> Result<(GatewayStream, Option<Scheme>), EgressError> {
    let started = tokio::time::Instant::now();
    match dial_raw(url, tls, timeout, proxy, auth, remembered).await {
        Err(EgressError::Tls { host, reason }) if reason.contains("UnknownIssuer") => {
            // Only what is left of the budget, and never the password again.
            let left = timeout
                .saturating_sub(started.elapsed())
                .max(Duration::from_secs(1));
            let no_password = AuthOptions {
                credentials: None,
                ..auth.clone()
            };
            let seen = match peek_certificate(url, left, proxy, &no_password).await {
                Ok(cert) => format!(" — the certificate seen on this path: {cert}; a TLS-inspecting proxy re-signs with its own CA: trust it (OS store or --ca) or ask for an inspection exemption for the gateway"),
                Err(_) => String::new(),
            };
            Err(EgressError::Tls {
                host,
                reason: format!("{reason}{seen}"),
            })
        }
        other => other,
    }
}

async fn dial_raw(
    url: &GatewayUrl,
    tls: Option<&Arc<rustls::ClientConfig>>,
    timeout: Duration,
    proxy: &Proxy,
    auth: &AuthOptions,
    remembered: Option<Scheme>,
) -> Result<(GatewayStream, Option<Scheme>), EgressError> {
    let authority = url.authority();
    let deadline = tokio::time::Instant::now() + timeout;
    let name = proxy.to_string();
    let timed_out = || ProxyError::Timeout {
        proxy: name.clone(),
        after: timeout,
    };
    let mut scheme = None;
    let tcp = match proxy {
        Proxy::Direct => connect_tcp("gateway", &url.host, url.port, deadline, timeout).await?,
        Proxy::Http { host, port, .. } => {
            let password_sent = std::sync::atomic::AtomicBool::new(false);
            let c = http::Connect {
                proxy: &name,
                proxy_host: host,
                target: &authority,
                auth,
                remembered,
                password_sent: &password_sent,
            };
            let result = tokio::time::timeout_at(
                deadline,
                http::connect(&c, || connect_tcp("proxy", host, *port, deadline, timeout)),
            )
            .await
            .unwrap_or_else(|_| Err(timed_out().into()));
            // A failure after our password went out with no answer to it (a reset, a timeout,
            // garbage) may still have cost a logon attempt: say so, so that nothing sends it
            // again at once. Any HTTP status but 407 (a 503 when the gateway is down, a 403 by
            // policy) means the proxy accepted the credentials.
            let (tcp, used) = result.map_err(|e| match e {
                EgressError::Proxy(ProxyError::AuthRejected { .. })
                | EgressError::Proxy(ProxyError::Refused { .. }) => e,
                e if password_sent.load(std::sync::atomic::Ordering::SeqCst) => {
                    EgressError::Proxy(ProxyError::AuthUnconfirmed {
                        proxy: name.clone(),
                        user: auth
                            .credentials
                            .as_ref()
                            .map(|c| c.user.clone())
                            .unwrap_or_default(),
                        why: e.to_string(),
                    })
                }
                e => e,
            })?;
            tracing::debug!(proxy = %name, scheme = ?used, "tunnel through HTTP proxy established");
            scheme = used;
            tcp
        }
        Proxy::Socks5 {
            host,
            port,
            remote_dns,
            ..
        } => {
            let mut tcp = connect_tcp("proxy", host, *port, deadline, timeout).await?;
            // RFC 1929 sends the password in clear: not to a proxy anyone could have planted.
            let creds = auth
                .credentials
                .as_ref()
                .filter(|_| !auth.no_cleartext)
                .map(|c| (c.user.as_str(), &c.password));
            // socks5:// resolves the gateway here; socks5h:// lets the proxy resolve it.
            let target = if *remote_dns {
                url.host.clone()
            } else {
                tokio::time::timeout_at(
                    deadline,
                    tokio::net::lookup_host((url.host.as_str(), url.port)),
                )
                .await
                .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "DNS timed out")))
                .map_err(|source| EgressError::Resolve {
                    role: "gateway",
                    host: url.host.clone(),
                    source,
                })?
                .next()
                .map(|a| a.ip().to_string())
                .ok_or_else(|| EgressError::Resolve {
                    role: "gateway",
                    host: url.host.clone(),
                    source: io::Error::new(io::ErrorKind::NotFound, "no addresses"),
                })?
            };
            tokio::time::timeout_at(
                deadline,
                proxy::socks5_connect(&mut tcp, &name, &target, url.port, creds),
            )
            .await
            .map_err(|_| timed_out())??;
            tcp
        }
    };
    let stream = finish_dial(url, tls, timeout, deadline, tcp, &authority).await?;
    Ok((stream, scheme))
}

/// Dials like [`dial_via`] but accepts any certificate, only to show who signed the one
/// presented when verification failed (a TLS-inspecting proxy's CA, typically): used by
/// `dial_via` for its error message and by `doctor`. The connection is dropped right after the
/// handshake; nothing is ever sent on it.
pub async fn peek_certificate(
    url: &GatewayUrl,
    timeout: Duration,
    proxy: &Proxy,
    auth: &AuthOptions,
) -> Result<String, EgressError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| EgressError::Tls {
            host: url.host.clone(),
            reason: e.to_string(),
        })?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny(provider)))
        .with_no_client_auth();
    let (stream, _) = dial_raw(url, Some(&Arc::new(cfg)), timeout, proxy, auth, None).await?;
    Ok(stream.peer_summary())
}

/// Accepts every certificate: only for [`peek_certificate`].
#[derive(Debug)]
struct AcceptAny(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Resolves `host` and connects to its addresses in turn, all within the deadline; each
/// address gets an equal share of what is left, so a black-holed first address (an AAAA record
/// on a network without IPv6) does not eat the whole budget.
async fn connect_tcp(
    role: &'static str,
    host: &str,
    port: u16,
    deadline: tokio::time::Instant,
    timeout: Duration,
) -> Result<TcpStream, EgressError> {
    let authority = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let addrs: Vec<_> = tokio::time::timeout_at(deadline, tokio::net::lookup_host((host, port)))
        .await
        .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "DNS timed out")))
        .map_err(|source| EgressError::Resolve {
            role,
            host: host.to_string(),
            source,
        })?
        .collect();
    let mut last = None;
    let n = addrs.len();
    for (i, addr) in addrs.into_iter().enumerate() {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let share = left / (n - i) as u32;
        match tokio::time::timeout(share, TcpStream::connect(addr)).await {
            Err(_) => {
                last = Some((
                    addr,
                    io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("timed out after {share:?}"),
                    ),
                ))
            }
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Ok(Err(e)) => last = Some((addr, e)),
        }
    }
    match last {
        Some((_, e)) if e.kind() == io::ErrorKind::TimedOut && n == 1 => {
            Err(EgressError::ConnectTimeout {
                role,
                addr: authority,
                after: timeout,
            })
        }
        Some((addr, source)) => Err(EgressError::Connect {
            role,
            addr: format!("{authority} ({addr})"),
            source,
        }),
        None => Err(EgressError::Connect {
            role,
            addr: authority,
            source: io::Error::new(io::ErrorKind::NotFound, "no addresses"),
        }),
    }
}

async fn finish_dial(
    url: &GatewayUrl,
    tls: Option<&Arc<rustls::ClientConfig>>,
    timeout: Duration,
    deadline: tokio::time::Instant,
    tcp: TcpStream,
    authority: &str,
) -> Result<GatewayStream, EgressError> {
    let authority = authority.to_string();
    let _ = tcp.set_nodelay(true);
    if !url.tls {
        return Ok(GatewayStream::Plain(tcp));
    }
    let Some(cfg) = tls else {
        return Err(EgressError::Tls {
            host: url.host.clone(),
            reason: "no TLS configuration".into(),
        });
    };
    let name = ServerName::try_from(url.host.clone()).map_err(|_| EgressError::BadUrl {
        url: url.to_string(),
        reason: "host is not a valid TLS server name".into(),
    })?;
    let connector = TlsConnector::from(cfg.clone());
    // rustls reads at most 4 KiB per call; a buffer under it turns sixteen syscalls per 64 KiB
    // frame into one (measured: ~20 % less CPU per byte on the chain).
    let tcp = BufReader::with_capacity(TLS_READ_BUFFER, tcp);
    match tokio::time::timeout_at(deadline, connector.connect(name, tcp)).await {
        Err(_) => Err(EgressError::ConnectTimeout {
            role: "gateway",
            addr: authority,
            after: timeout,
        }),
        Ok(Err(e)) => Err(EgressError::Tls {
            host: url.host.clone(),
            reason: explain_tls(&e),
        }),
        Ok(Ok(s)) => Ok(GatewayStream::Tls(Box::new(s))),
    }
}

fn explain_tls(e: &io::Error) -> String {
    let text = e.to_string();
    if text.contains("UnknownIssuer") {
        format!("{text}: the gateway's certificate is not signed by a CA this machine trusts (pass --ca FILE with the gateway's CA)")
    } else if text.contains("NotValidForName") {
        format!("{text}: the certificate does not name this host; use the name the certificate was issued for")
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_with_defaults_and_prefixes() {
        let u = GatewayUrl::parse("wss://gw.example.com/").unwrap();
        assert_eq!(
            (u.tls, u.host.as_str(), u.port, u.prefix.as_str()),
            (true, "gw.example.com", 443, "")
        );
        assert_eq!(u.endpoint("agent"), "wss://gw.example.com:443/agent");
        let u = GatewayUrl::parse("ws://127.0.0.1:8080/sp/v1/").unwrap();
        assert_eq!((u.tls, u.port, u.prefix.as_str()), (false, 8080, "/sp/v1"));
        assert_eq!(
            u.endpoint("connector"),
            "ws://127.0.0.1:8080/sp/v1/connector"
        );
        let u = GatewayUrl::parse("wss://[::1]:8443").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 8443));
        assert_eq!(u.endpoint("agent"), "wss://[::1]:8443/agent");
    }

    #[test]
    fn proxy_settings_validate_users_passwords_and_credential_files() {
        // (SALLYPORT_PROXY_PASSWORD is not set in unit tests.)
        let e = Egress::from_settings(&EgressSettings {
            proxy: Some("http://alice@proxy:3128"),
            ..Default::default()
        })
        .unwrap_err();
        assert!(
            e.contains("has no password") && e.contains("--proxy-credentials"),
            "{e}"
        );
        let e = Egress::from_settings(&EgressSettings {
            proxy: Some("http://p:1"),
            pac: Some("http://wpad/wpad.dat"),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.contains("give one"), "{e}");
        let dir = std::env::temp_dir().join(format!("sp-egress-creds-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("creds");
        std::fs::write(&file, "CORP\\alice:s3cret\n").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
            let e = Egress::from_settings(&EgressSettings {
                credentials_file: Some(&file),
                ..Default::default()
            })
            .unwrap_err();
            assert!(e.contains("chmod 600") && !e.contains("s3cret"), "{e}");
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        let eg = Egress::from_settings(&EgressSettings {
            credentials_file: Some(&file),
            ..Default::default()
        })
        .unwrap();
        let c = eg.auth.credentials.unwrap();
        assert_eq!(
            (c.user.as_str(), c.password.expose()),
            ("CORP\\alice", "s3cret")
        );
        assert!(!format!("{c:?}").contains("s3cret"));
        // A user on the command line wins over the file's, the password still comes from it.
        std::fs::write(&file, "only-a-password\n").unwrap();
        let eg = Egress::from_settings(&EgressSettings {
            proxy_user: Some("bob"),
            credentials_file: Some(&file),
            ..Default::default()
        })
        .unwrap();
        let c = eg.auth.credentials.unwrap();
        assert_eq!(
            (c.user.as_str(), c.password.expose()),
            ("bob", "only-a-password")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_urls_say_what_to_fix() {
        for bad in [
            "http://x/",
            "wss://",
            "wss://host:notaport/",
            "wss://user:pw@host/",
            "wss://[::1/",
        ] {
            let e = GatewayUrl::parse(bad).unwrap_err().to_string();
            assert!(e.contains("invalid gateway URL"), "{bad}: {e}");
        }
    }
}
