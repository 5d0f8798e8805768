//! Dialling the gateway through one way out: TCP (or the proxy's handshake), then TLS, within
//! one timeout, with errors that say which hop failed; and [`GatewayStream`], what callers get.

use crate::readbuf::ReadBuffer;
use crate::tls::GatewayVerifier;
use crate::*;
use rustls::pki_types::ServerName;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// A byte stream to the gateway: TLS, or plain for `ws://`.
pub enum GatewayStream {
    Plain(TcpStream),
    Tls(Box<TlsStream<ReadBuffer<TcpStream>>>),
    /// `--tls native`: the OS TLS stack ([`crate::native`]).
    Native(Box<tokio_native_tls::TlsStream<TcpStream>>),
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
            GatewayStream::Native(s) => cert::key_pin(&native_peer(s)?),
        }
    }

    /// SHA-256 of the gateway certificate's public key (what a `sha256/…` pin encodes).
    pub fn tls_key(&self) -> Option<[u8; 32]> {
        match self {
            GatewayStream::Plain(_) => None,
            GatewayStream::Tls(s) => {
                use sha2::Digest;
                let der = s.get_ref().1.peer_certificates()?.first()?;
                Some(sha2::Sha256::digest(cert::spki(der)?).into())
            }
            GatewayStream::Native(s) => {
                use sha2::Digest;
                let der = native_peer(s)?;
                Some(sha2::Sha256::digest(cert::spki(&der)?).into())
            }
        }
    }

    /// The TLS exporter value (RFC 8446 §7.5) of this connection under `label`, on TLS 1.3:
    /// equal at both ends only when they share one TLS connection, with nobody re-encrypting in
    /// between.
    pub fn exporter(&self, label: &[u8]) -> Option<[u8; 32]> {
        match self {
            // native-tls exposes no exporter: a v2 session over it stays sealed.
            GatewayStream::Plain(_) | GatewayStream::Native(_) => None,
            GatewayStream::Tls(s) => {
                let conn = &s.get_ref().1;
                // TLS 1.3 only: its exporter is bound to the whole handshake.
                if conn.protocol_version() != Some(rustls::ProtocolVersion::TLSv1_3) {
                    return None;
                }
                let mut out = [0u8; 32];
                conn.export_keying_material(&mut out, label, None).ok()?;
                Some(out)
            }
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
            GatewayStream::Native(s) => match native_peer(s).and_then(|d| cert::names(&d)) {
                Some((subject, issuer)) => {
                    format!("TLS (OS stack), certificate {subject} issued by {issuer}")
                }
                None => "TLS (OS stack; certificate names unreadable)".into(),
            },
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
            GatewayStream::Native(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
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
            GatewayStream::Native(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            GatewayStream::Plain(s) => Pin::new(s).poll_flush(cx),
            GatewayStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            GatewayStream::Native(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            GatewayStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            GatewayStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            GatewayStream::Native(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
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
            GatewayStream::Native(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            GatewayStream::Plain(s) => s.is_write_vectored(),
            GatewayStream::Tls(s) => s.is_write_vectored(),
            GatewayStream::Native(s) => s.is_write_vectored(),
        }
    }
}

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
    let (tcp, scheme) = dial_tcp(url, timeout, deadline, proxy, auth, remembered).await?;
    let stream = finish_dial(url, tls, timeout, deadline, tcp, &authority).await?;
    Ok((stream, scheme))
}

/// Like [`dial_via`], with the outer TLS through the OS stack (`--tls native`).
pub async fn dial_via_native(
    url: &GatewayUrl,
    native: &crate::native::NativeTls,
    timeout: Duration,
    proxy: &Proxy,
    auth: &AuthOptions,
    remembered: Option<Scheme>,
) -> Result<(GatewayStream, Option<Scheme>), EgressError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let (tcp, scheme) = dial_tcp(url, timeout, deadline, proxy, auth, remembered).await?;
    if !url.tls {
        return Ok((GatewayStream::Plain(tcp), scheme));
    }
    let tls = tokio::time::timeout_at(deadline, native.connector.connect(&url.host, tcp)).await;
    match tls {
        Err(_) => Err(EgressError::ConnectTimeout {
            role: "gateway",
            addr: url.authority(),
            after: timeout,
        }),
        Ok(Err(e)) => Err(EgressError::Tls {
            host: url.host.clone(),
            reason: match &native.client_cert {
                Some(p) => format!(
                    "{e} (OS TLS stack, client certificate {}: a terminator that refuses it ends the handshake)",
                    p.display()
                ),
                None => format!("{e} (OS TLS stack)"),
            },
        }),
        Ok(Ok(s)) => Ok((GatewayStream::Native(Box::new(s)), scheme)),
    }
}

/// The peer's leaf certificate (DER) on a native-tls connection.
fn native_peer(s: &tokio_native_tls::TlsStream<TcpStream>) -> Option<Vec<u8>> {
    s.get_ref().peer_certificate().ok()??.to_der().ok()
}

/// TCP to the gateway, or through the proxy's handshake, by `deadline`.
async fn dial_tcp(
    url: &GatewayUrl,
    timeout: Duration,
    deadline: tokio::time::Instant,
    proxy: &Proxy,
    auth: &AuthOptions,
    remembered: Option<Scheme>,
) -> Result<(TcpStream, Option<Scheme>), EgressError> {
    let authority = url.authority();
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
    Ok((tcp, scheme))
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
    let provider = crate::crypto_provider();
    let cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| EgressError::Tls {
            host: url.host.clone(),
            reason: e.to_string(),
        })?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(GatewayVerifier::accept_any(provider)))
        .with_no_client_auth();
    let (stream, _) = dial_raw(url, Some(&Arc::new(cfg)), timeout, proxy, auth, None).await?;
    Ok(stream.peer_summary())
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
    // rustls reads at most 4 KiB per call: buffer under it (crate::readbuf).
    let tcp = ReadBuffer::new(tcp);
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
    let ours = matches!(
        e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()),
        Some(rustls::Error::General(_))
    );
    if ours {
        // Our verifier's own explanation (it names the --ca file and the issuer).
        text
    } else if text.contains("UnknownIssuer") {
        format!("{text}: the gateway's certificate is not signed by a CA this machine trusts (pass --ca FILE with the gateway's CA)")
    } else if text.contains("NotValidForName") {
        format!("{text}: the certificate does not name this host; use the name the certificate was issued for")
    } else {
        text
    }
}
