//! The SOCKS5 server (RFC 1928, with RFC 1929 username/password).
//!
//! The wire protocol is parsed by `fast-socks5`'s typestate API
//! (`Socks5ServerProtocol`): greeting → authentication → command → reply.
//! This file adds what is Sallyport-specific:
//!
//! - `CONNECT` is offered; `UDP ASSOCIATE` when the caller gives an
//!   [`Associator`] (`udp.rs`), else it gets reply 0x07 as `BIND` always does;
//! - domain names are **not** resolved here: they reach the [`Dialer`]
//!   verbatim, because names are resolved inside the trusted network;
//! - the username/password check is our own small [`AuthMethod`] so the
//!   comparison is constant time and the password is never logged (the
//!   library's stock method logs the credential bytes at debug level);
//! - the dial uses [`OpenMode::Confirmed`], so a refusal on the far side
//!   becomes the matching SOCKS5 reply code instead of a dead stream;
//!   except for a destination the dialer [knows](crate::Dialer::known) to
//!   open: it is dialed with [`OpenMode::Early`] and the success reply goes
//!   at once, saving the app a round trip to the far end before its first
//!   bytes. Should that open fail after all, the app's connection is reset
//!   (not closed: an app must not take it for an empty answer).
//!
//! After a success reply the two streams are joined by `tunnel::splice`,
//! which forwards EOF as a write shutdown in each direction independently
//! (half-close works end to end) and holds a buffer only while data waits.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use fast_socks5::server::{
    states, AuthMethod, AuthMethodSuccessState, Socks5ServerProtocol, SocksServerError,
};
use fast_socks5::util::target_addr::TargetAddr;
use fast_socks5::{ReplyError, Socks5Command};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::debug;

use crate::udp::{Associator, UdpRequest};
use crate::{Dialer, FrontError, LocalAuth, OpenMode, RelayStats, Target};

/// How long a client may take from connecting to having sent its command.
/// Bounds the resources an idle or dribbling client can pin.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// The bound address we report on success. Clients ignore it for CONNECT,
/// and the real one lives on the far side of the tunnel anyway.
const UNSPECIFIED: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));

/// Serve one SOCKS5 client connection until its relay ends.
///
/// Returns the target and byte counts on a completed relay. Errors mean the
/// connection ended before or during the relay; in every case where the
/// protocol allows it the client has already been told why (reply code or
/// auth failure status).
pub async fn serve_socks5<S>(
    io: S,
    dialer: Arc<dyn Dialer>,
    auth: Option<Arc<LocalAuth>>,
) -> Result<RelayStats, FrontError>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    serve_socks5_with(io, dialer, auth, None).await
}

/// How `UDP ASSOCIATE` is served on one control connection: the caller's [`Associator`], and
/// the connection's peer and local addresses.
pub struct UdpFront {
    pub associator: Arc<dyn Associator>,
    pub client: SocketAddr,
    pub local: SocketAddr,
}

/// [`serve_socks5`], serving `UDP ASSOCIATE` too when `udp` is given (else reply 0x07).
pub async fn serve_socks5_with<S>(
    io: S,
    dialer: Arc<dyn Dialer>,
    auth: Option<Arc<LocalAuth>>,
    udp: Option<UdpFront>,
) -> Result<RelayStats, FrontError>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (proto, target) = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        handshake(io, auth.as_deref(), udp.is_some()),
    )
    .await
    .map_err(|_| FrontError::HandshakeTimeout)??;
    let target = match (target, udp) {
        (Command::Connect(t), _) => t,
        (Command::Associate(declared), Some(udp)) => return associate(proto, udp, declared).await,
        // `handshake` answers 0x07 itself when there is no associator.
        (Command::Associate(_), None) => {
            return Err(FrontError::Socks5("UDP ASSOCIATE is not served".into()))
        }
    };

    let mode = crate::answer_mode(&*dialer, &target);
    let early = mode == OpenMode::Early;
    let mut upstream = match dialer.dial(target.clone(), mode).await {
        Ok(stream) => stream,
        Err(source) => {
            debug!(%target, kind = %source.kind, reason = %source, "socks5 dial failed");
            proto
                .reply_error(&reply_for_code(source.kind.socks5_reply()))
                .await
                .map_err(protocol_error)?;
            return Err(FrontError::Dial { target, source });
        }
    };

    let mut client = proto
        .reply_success(UNSPECIFIED)
        .await
        .map_err(protocol_error)?;
    let (up, down) = match tunnel::splice(&mut client, &mut upstream).await {
        Ok(counts) => counts,
        Err(e) => {
            debug!(%target, error = %e, "socks5 relay ended with an error");
            if crate::failed_early(early, &e) {
                crate::reset_on_close(&mut client);
            }
            return Err(e.into());
        }
    };
    debug!(%target, up, down, "socks5 relay finished");
    Ok(RelayStats {
        target: Some(target),
        up,
        down,
    })
}

/// `UDP ASSOCIATE`: the associator's relay, the success reply with its address, then relay
/// until the app closes the control connection (RFC 1928: that ends the association) or the
/// relay ends (then the control connection is closed, which tells the app).
async fn associate<S>(
    proto: Socks5ServerProtocol<S, states::CommandRead>,
    udp: UdpFront,
    declared: SocketAddr,
) -> Result<RelayStats, FrontError>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let request = UdpRequest {
        client: udp.client,
        local: udp.local,
        declared_ip: Some(declared.ip()).filter(|ip| !ip.is_unspecified()),
        declared_port: Some(declared.port()).filter(|p| *p != 0),
    };
    let relay = match udp.associator.associate(request).await {
        Ok(r) => r,
        Err(source) => {
            debug!(kind = %source.kind, reason = %source, "socks5 udp associate refused");
            proto
                .reply_error(&reply_for_code(source.kind.socks5_reply()))
                .await
                .map_err(protocol_error)?;
            return Err(FrontError::Socks5(format!(
                "UDP ASSOCIATE refused: {source}"
            )));
        }
    };
    let mut client = proto
        .reply_success(relay.bound)
        .await
        .map_err(protocol_error)?;
    let mut sink = [0u8; 512];
    let control = async {
        // Anything the app sends on the control connection is ignored; EOF or an error ends it.
        while let Ok(n) = client.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    };
    tokio::select! {
        _ = control => debug!("socks5 udp association ended by the app"),
        _ = relay.run => debug!("socks5 udp association ended by the relay"),
    }
    Ok(RelayStats {
        target: None,
        up: 0,
        down: 0,
    })
}

/// What the app asked for.
enum Command {
    Connect(Target),
    /// `UDP ASSOCIATE` with the source the app named (`0.0.0.0:0` when it named none).
    Associate(SocketAddr),
}

/// Greeting, authentication and command: everything up to the point where
/// we know the target and still owe the client its reply.
async fn handshake<S>(
    io: S,
    auth: Option<&LocalAuth>,
    udp: bool,
) -> Result<(Socks5ServerProtocol<S, states::CommandRead>, Command), FrontError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let proto = match auth {
        None => Socks5ServerProtocol::accept_no_auth(io)
            .await
            .map_err(protocol_error)?,
        Some(auth) => Socks5ServerProtocol::start(io)
            .negotiate_auth(&[LocalPassword])
            .await
            .map_err(protocol_error)?
            .verify(auth)
            .await?
            .finish_auth(),
    };

    // `read_command` already answers 0x07 for command bytes it does not know
    // and 0x08 for unknown address types before returning its error.
    let (proto, command, addr) = proto.read_command().await.map_err(protocol_error)?;
    let name = match command {
        Socks5Command::TCPConnect => None,
        Socks5Command::UDPAssociate if udp => {
            // A name names no address (PySocks sends "0"); only an address or port counts.
            let declared = match addr {
                TargetAddr::Ip(sa) => sa,
                TargetAddr::Domain(_, port) => SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port),
            };
            return Ok((proto, Command::Associate(declared)));
        }
        Socks5Command::TCPBind => Some("BIND"),
        Socks5Command::UDPAssociate => Some("UDP ASSOCIATE"),
    };
    if let Some(name) = name {
        proto
            .reply_error(&ReplyError::CommandNotSupported)
            .await
            .map_err(protocol_error)?;
        return Err(FrontError::Socks5(format!(
            "command {name} is not supported"
        )));
    }

    let target = match addr {
        TargetAddr::Ip(sa) => Target::new(sa.ip().to_string(), sa.port()),
        // Passed on unresolved; only normalised if it is really an IP literal.
        TargetAddr::Domain(name, port) => Target::new(name, port),
    };
    if !target.has_valid_host() {
        proto
            .reply_error(&ReplyError::HostUnreachable)
            .await
            .map_err(protocol_error)?;
        return Err(FrontError::Socks5(format!(
            "invalid destination name {:?}",
            target.host
        )));
    }
    Ok((proto, Command::Connect(target)))
}

/// Turn a reply code from [`crate::DialErrorKind::socks5_reply`] into the
/// library's enum (whose own `from_u8` panics on unknown codes).
fn reply_for_code(code: u8) -> ReplyError {
    match code {
        0x02 => ReplyError::ConnectionNotAllowed,
        0x03 => ReplyError::NetworkUnreachable,
        0x04 => ReplyError::HostUnreachable,
        0x05 => ReplyError::ConnectionRefused,
        0x06 => ReplyError::TtlExpired,
        0x07 => ReplyError::CommandNotSupported,
        0x08 => ReplyError::AddressTypeNotSupported,
        _ => ReplyError::GeneralFailure,
    }
}

/// Map the library's error to ours, keeping the reason on one line.
fn protocol_error(err: SocksServerError) -> FrontError {
    match err {
        SocksServerError::AuthMethodUnacceptable(_) => FrontError::NoAcceptableAuth,
        SocksServerError::Io { source, context }
            if source.kind() == std::io::ErrorKind::UnexpectedEof =>
        {
            FrontError::Socks5(format!("client closed the connection while {context}"))
        }
        SocksServerError::Io { source, .. } => FrontError::Io(source),
        other => FrontError::Socks5(other.to_string()),
    }
}

/// RFC 1929 username/password, as a `fast-socks5` auth method (method id 2).
#[derive(Clone, Copy, Debug)]
struct LocalPassword;

/// The stream after the client picked [`LocalPassword`], before the check.
struct PasswordPending<T>(T);

/// The stream after a successful check; hands it back to the main flow.
struct PasswordAccepted<T>(T);

impl<T> AuthMethod<T> for LocalPassword {
    type StartingState = PasswordPending<T>;

    fn method_id(self) -> u8 {
        fast_socks5::consts::SOCKS5_AUTH_METHOD_PASSWORD
    }

    fn new(self, inner: T) -> PasswordPending<T> {
        PasswordPending(inner)
    }
}

impl<T> AuthMethodSuccessState<T> for PasswordAccepted<T> {
    fn into_inner(self) -> T {
        self.0
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> PasswordPending<T> {
    /// Read `VER ULEN UNAME PLEN PASSWD`, check it, answer `VER STATUS`.
    /// Every length is one byte, so at most 2 × 255 bytes are buffered.
    async fn verify(mut self, auth: &LocalAuth) -> Result<PasswordAccepted<T>, FrontError> {
        const SUBNEG_VERSION: u8 = 0x01;
        let io = &mut self.0;
        let mut head = [0u8; 2];
        io.read_exact(&mut head).await.map_err(truncated)?;
        if head[0] != SUBNEG_VERSION {
            return Err(FrontError::Socks5(format!(
                "unsupported username/password version {:#04x}",
                head[0]
            )));
        }
        let mut user = vec![0u8; usize::from(head[1])];
        io.read_exact(&mut user).await.map_err(truncated)?;
        let mut plen = [0u8; 1];
        io.read_exact(&mut plen).await.map_err(truncated)?;
        let mut pass = vec![0u8; usize::from(plen[0])];
        io.read_exact(&mut pass).await.map_err(truncated)?;

        let ok = auth.check(&user, &pass);
        io.write_all(&[SUBNEG_VERSION, if ok { 0x00 } else { 0x01 }])
            .await?;
        io.flush().await?;
        if ok {
            Ok(PasswordAccepted(self.0))
        } else {
            debug!(user = %String::from_utf8_lossy(&user), "socks5 local authentication failed");
            Err(FrontError::AuthFailed)
        }
    }
}

fn truncated(err: std::io::Error) -> FrontError {
    if err.kind() == std::io::ErrorKind::UnexpectedEof {
        FrontError::Socks5("client closed the connection during authentication".into())
    } else {
        FrontError::Io(err)
    }
}
