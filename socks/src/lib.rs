//! Sallyport's local front ends: a SOCKS5 server and an HTTP proxy.
//!
//! Applications on the desktop point at one of these ports. A front end speaks
//! just enough of the application's protocol to learn *where* the connection
//! should go, asks a caller-supplied [`Dialer`] for a byte stream to that
//! destination, and then relays bytes. It knows nothing about tunnels: the
//! agent's dialer is what carries the stream to the gateway.
//!
//! Layers, one per file:
//! - this file: the shared vocabulary ([`Target`], [`OpenMode`], [`Dialer`],
//!   [`DialError`], [`LocalAuth`], [`FrontError`], [`RelayStats`]);
//! - `socks5.rs`: the SOCKS5 server ([`serve_socks5`]);
//! - `http.rs`: the HTTP proxy front end ([`serve_http`]);
//! - `udp.rs`: SOCKS5 UDP: the datagram header ([`udp::parse_header`]) and the
//!   [`udp::Associator`] hook through which `UDP ASSOCIATE` reaches the caller.
//!
//! Both entry points serve exactly one accepted client connection; the caller
//! owns the listener, spawns one task per connection and decides what to log.

#![forbid(unsafe_code)]

use std::fmt;
use std::future::Future;
use std::net::{IpAddr, Ipv6Addr};
use std::pin::Pin;

use subtle::ConstantTimeEq;

mod http;
mod socks5;
pub mod udp;

pub use crate::http::{serve_http, serve_http_with, LocalPages};
pub use crate::socks5::{serve_socks5, serve_socks5_with, UdpFront};

/// Where an application wants to go.
///
/// `host` is a domain name exactly as the application gave it (names are
/// resolved inside the trusted network, never on the desktop) or the textual
/// form of an IP address. IPv6 literals are stored *without* brackets.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Target {
    pub host: String,
    pub port: u16,
}

impl Target {
    /// Build a target from a host and a port. Brackets around an IPv6
    /// literal (`[::1]`) are removed so every target has one spelling.
    pub fn new(host: impl Into<String>, port: u16) -> Self {
        let host = host.into();
        let host = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            Some(inner) if inner.parse::<Ipv6Addr>().is_ok() => inner.to_string(),
            _ => host,
        };
        Target { host, port }
    }

    /// Whether `host` is an IP literal rather than a name.
    pub fn is_ip(&self) -> bool {
        self.host.parse::<IpAddr>().is_ok()
    }

    /// A cheap sanity check before a name travels anywhere: an IP literal, or
    /// a non-empty DNS-style name of letters, digits, `-`, `_` and `.`
    /// (internationalised names arrive as punycode). This keeps spaces,
    /// control bytes and URL syntax out of logs and out of the tunnel.
    pub fn has_valid_host(&self) -> bool {
        self.is_ip()
            || (!self.host.is_empty()
                && self.host.len() <= 253
                && self
                    .host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)))
    }
}

impl fmt::Display for Target {
    /// `host:port`, or `[v6]:port` so the result parses back unambiguously.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.parse::<Ipv6Addr>().is_ok() {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// How eagerly the dialer may hand back a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenMode {
    /// Return only after the far end accepted the connection. SOCKS5 CONNECT
    /// and HTTP CONNECT use this, so a refusal reaches the application as a
    /// proper reply code instead of a stream that dies after "success".
    Confirmed,
    /// Return at once; data may flow before the far end confirmed. Used for
    /// plain HTTP requests, where the request can travel with the open.
    ///
    /// A dialer that learns of a failure only later should fail the stream's
    /// reads/writes with `io::Error::other(dial_error)`: the HTTP front end
    /// finds the [`DialError`] inside and still answers with its status code.
    Early,
}

/// Any bidirectional byte stream the dialer can hand back.
pub trait AsyncIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {
    /// The stream as what it is, for a caller that knows a faster way to move its bytes (the
    /// agent joins a tunnel stream to a socket without copying through a buffer).
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any;
}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static> AsyncIo for T {
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

/// A boxed stream from a [`Dialer`].
pub type BoxIo = Box<dyn AsyncIo>;

/// The future a [`Dialer`] returns.
pub type DialFuture = Pin<Box<dyn Future<Output = Result<BoxIo, DialError>> + Send>>;

/// The [`DialError`] an [`OpenMode::Early`] stream reported through an I/O error, if any.
pub fn dial_error_of(e: &std::io::Error) -> Option<&DialError> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<DialError>())
}

/// How a SOCKS5 or `CONNECT` front end opens `target`: [`OpenMode::Early`], answering its
/// client at once, when the dialer [knows](Dialer::known) the destination opens; else
/// [`OpenMode::Confirmed`], answering with the far end's verdict.
pub(crate) fn answer_mode(dialer: &dyn Dialer, target: &Target) -> OpenMode {
    if dialer.known(target) {
        OpenMode::Early
    } else {
        OpenMode::Confirmed
    }
}

/// Whether a relay that ended with `e` was answered early (`early`) and its stream failed before
/// the far end sent a byte (typically the open was refused after all): the app's connection is
/// then reset ([`reset_on_close`]), since a plain close would read as an empty answer.
pub(crate) fn failed_early(early: bool, e: &std::io::Error) -> bool {
    early && dial_error_of(e).is_some()
}

/// Makes closing `client` send a reset (`SO_LINGER` 0), when it is a TCP socket.
pub(crate) fn reset_on_close<S: 'static>(client: &mut S) {
    if let Some(tcp) = (client as &mut dyn std::any::Any).downcast_mut::<tokio::net::TcpStream>() {
        let _ = socket2::SockRef::from(&*tcp).set_linger(Some(std::time::Duration::ZERO));
    }
}

/// Opens streams to targets. The agent implements this over its tunnel
/// sessions; tests implement it over loopback TCP.
pub trait Dialer: Send + Sync + 'static {
    fn dial(&self, target: Target, mode: OpenMode) -> DialFuture;

    /// Whether an open to `target` is known to succeed (the far end confirmed one lately and
    /// refused none since). A SOCKS5 or `CONNECT` front end then dials with
    /// [`OpenMode::Early`] and answers its client at once, saving the round trip to the far end
    /// before the client's first bytes; should the open fail after all, the client's
    /// connection is reset instead of answered with the reason. The default knows nothing.
    fn known(&self, _target: &Target) -> bool {
        false
    }
}

/// Why a dial failed, with a one-line human reason (shown to the user in
/// HTTP error bodies, logged at debug for SOCKS5).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct DialError {
    pub kind: DialErrorKind,
    pub message: String,
}

impl DialError {
    pub fn new(kind: DialErrorKind, message: impl Into<String>) -> Self {
        DialError {
            kind,
            message: message.into(),
        }
    }
}

/// The category of a dial failure; each maps to a SOCKS5 reply code and an
/// HTTP status so applications see a meaningful error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DialErrorKind {
    /// Policy forbids this destination.
    NotAllowed,
    /// No connector can reach this destination.
    NoRoute,
    /// The destination actively refused the connection.
    Refused,
    /// The destination's network is unreachable.
    Unreachable,
    /// The name did not resolve (inside the trusted network).
    HostNotFound,
    /// Nobody answered in time.
    TimedOut,
    /// The tunnel itself is down (no gateway session).
    Unavailable,
    /// Anything else.
    Other,
    /// The command is not offered on this path (UDP through an older gateway): SOCKS5 0x07.
    NotSupported,
}

impl DialErrorKind {
    /// The RFC 1928 reply code (REP field) for this failure.
    pub fn socks5_reply(self) -> u8 {
        match self {
            DialErrorKind::NotAllowed => 0x02,
            DialErrorKind::NoRoute => 0x04,
            DialErrorKind::Refused => 0x05,
            DialErrorKind::Unreachable => 0x03,
            DialErrorKind::HostNotFound => 0x04,
            DialErrorKind::TimedOut => 0x06,
            DialErrorKind::Unavailable => 0x01,
            DialErrorKind::Other => 0x01,
            DialErrorKind::NotSupported => 0x07,
        }
    }

    /// The HTTP status a proxy answers with for this failure.
    pub fn http_status(self) -> u16 {
        match self {
            DialErrorKind::NotAllowed => 403,
            DialErrorKind::TimedOut => 504,
            DialErrorKind::Unavailable => 503,
            DialErrorKind::NoRoute
            | DialErrorKind::Refused
            | DialErrorKind::Unreachable
            | DialErrorKind::HostNotFound
            | DialErrorKind::Other
            | DialErrorKind::NotSupported => 502,
        }
    }

    /// A short stable token, e.g. for the `X-Sallyport-Error` header.
    pub fn as_str(self) -> &'static str {
        match self {
            DialErrorKind::NotAllowed => "not-allowed",
            DialErrorKind::NoRoute => "no-route",
            DialErrorKind::Refused => "refused",
            DialErrorKind::Unreachable => "unreachable",
            DialErrorKind::HostNotFound => "host-not-found",
            DialErrorKind::TimedOut => "timed-out",
            DialErrorKind::Unavailable => "unavailable",
            DialErrorKind::Other => "other",
            DialErrorKind::NotSupported => "not-supported",
        }
    }
}

impl fmt::Display for DialErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Credentials the local ports demand (SOCKS5 username/password, HTTP
/// `Proxy-Authorization: Basic`). Useful on shared machines where other
/// users could otherwise ride this user's tunnel.
///
/// The password is private and never printed: `Debug` shows `***`.
#[derive(Clone)]
pub struct LocalAuth {
    pub user: String,
    password: String,
}

impl LocalAuth {
    pub fn new(user: impl Into<String>, password: impl Into<String>) -> Self {
        LocalAuth {
            user: user.into(),
            password: password.into(),
        }
    }

    /// Compare offered credentials with the configured ones in constant time
    /// (per length: a length mismatch fails fast, the content never does).
    /// Both halves are always compared so timing does not tell which was wrong.
    pub fn check(&self, user: &[u8], pass: &[u8]) -> bool {
        let user_ok = self.user.as_bytes().ct_eq(user);
        let pass_ok = self.password.as_bytes().ct_eq(pass);
        bool::from(user_ok & pass_ok)
    }
}

impl fmt::Debug for LocalAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalAuth")
            .field("user", &self.user)
            .field("password", &"***")
            .finish()
    }
}

/// What a finished SOCKS5 connection did: where it went and how many bytes
/// flowed each way (`up`: application → target, `down`: target → application).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RelayStats {
    pub target: Option<Target>,
    pub up: u64,
    pub down: u64,
}

/// Why serving one client connection ended early.
#[derive(Debug, thiserror::Error)]
pub enum FrontError {
    /// The client connection failed (reset, broken pipe, ...).
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// The client broke the SOCKS5 protocol or asked for something we do not
    /// offer; the string is a one-line reason.
    #[error("socks5: {0}")]
    Socks5(String),
    /// The client did not finish its handshake in time.
    #[error("client handshake timed out")]
    HandshakeTimeout,
    /// The client offered no authentication method we accept.
    #[error("no acceptable authentication method offered")]
    NoAcceptableAuth,
    /// The client's credentials were wrong.
    #[error("local authentication failed")]
    AuthFailed,
    /// The dialer could not reach the target (the client already got the
    /// matching reply code).
    #[error("dial {target}: {source}")]
    Dial {
        target: Target,
        #[source]
        source: DialError,
    },
    /// The HTTP connection failed (malformed request, header timeout, ...).
    #[error("http: {0}")]
    Http(#[from] hyper::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_display_brackets_ipv6_only() {
        assert_eq!(
            Target::new("db.internal", 5432).to_string(),
            "db.internal:5432"
        );
        assert_eq!(Target::new("10.0.0.1", 80).to_string(), "10.0.0.1:80");
        assert_eq!(Target::new("::1", 443).to_string(), "[::1]:443");
        assert_eq!(Target::new("[::1]", 443).host, "::1");
    }

    #[test]
    fn local_auth_debug_hides_password() {
        let auth = LocalAuth::new("alice", "s3cret");
        let shown = format!("{auth:?}");
        assert!(shown.contains("alice") && shown.contains("***") && !shown.contains("s3cret"));
    }

    #[test]
    fn local_auth_check_needs_both_halves() {
        let auth = LocalAuth::new("alice", "s3cret");
        assert!(auth.check(b"alice", b"s3cret"));
        assert!(!auth.check(b"alice", b"wrong"));
        assert!(!auth.check(b"bob", b"s3cret"));
        assert!(!auth.check(b"", b""));
    }

    #[test]
    fn dial_error_kinds_map_to_codes() {
        use DialErrorKind::*;
        let table = [
            (NotAllowed, 0x02, 403),
            (NoRoute, 0x04, 502),
            (Refused, 0x05, 502),
            (Unreachable, 0x03, 502),
            (HostNotFound, 0x04, 502),
            (TimedOut, 0x06, 504),
            (Unavailable, 0x01, 503),
            (Other, 0x01, 502),
        ];
        for (kind, rep, status) in table {
            assert_eq!(kind.socks5_reply(), rep, "{kind}");
            assert_eq!(kind.http_status(), status, "{kind}");
        }
    }
}
