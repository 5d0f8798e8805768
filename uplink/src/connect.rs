//! Reaching the gateway, for the agent and the connector alike: probe the ways out, dial, the
//! WebSocket upgrade (or the HTTP transport when something on the way strips it), the
//! handshake of the credential's protocol (v2, or v1's bearer token or inner channel), and the
//! tunnel hello. One [`Uplink`] describes it all; [`Uplink::connect`] runs it once and
//! `crate::keep` keeps a session up with it.

use crate::v1::{self, Carry, V1};
use crate::ConnectError;
use bytes::Bytes;
use egress::probe::{Candidate, ProbeError};
use egress::{GatewayStream, GatewayUrl};
use rand::Rng;
use std::sync::Arc;
use std::time::Duration;
use tunnel::http::client::{GatewayIo, HttpError, Options, Redial};
use tunnel::http::DownMode;
use tunnel::inner::InnerError;
use tunnel::token::Token;
use tunnel::{Incoming, Role, Session};

/// Which transport carries the session to the gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum TransportChoice {
    /// WebSocket, falling back to HTTP when a proxy strips the upgrade.
    #[default]
    Auto,
    WebSocket,
    Http,
}

impl std::str::FromStr for TransportChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(TransportChoice::Auto),
            "websocket" | "ws" => Ok(TransportChoice::WebSocket),
            "http" => Ok(TransportChoice::Http),
            other => Err(format!("transport `{other}`: use auto, websocket or http")),
        }
    }
}

/// A v2 token that a renewal replaces while sessions come and go: each new session takes the
/// token in force when it starts.
#[derive(Debug)]
pub struct TokenCell(std::sync::RwLock<Arc<Token>>);

impl TokenCell {
    pub fn new(token: Arc<Token>) -> Arc<TokenCell> {
        Arc::new(TokenCell(std::sync::RwLock::new(token)))
    }

    pub fn get(&self) -> Arc<Token> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn set(&self, token: Token) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(token);
    }
}

/// The credential a session is set up with.
#[derive(Clone)]
pub enum Credential {
    /// Protocol v2: the token's key proves the gateway; nothing secret is sent.
    V2(Arc<TokenCell>),
    /// Protocol v1: a bearer token, sent only where [`v1::Trust`] allows.
    V1(V1),
}

/// Everything needed to reach the gateway and start a session on it.
#[derive(Clone)]
pub struct Uplink {
    /// The gateway (the DMZ instance) to dial.
    pub gateway: GatewayUrl,
    /// Other DMZ instances to fail over to, in order (`uplink::keep`); empty for one gateway.
    pub failover: Vec<GatewayUrl>,
    pub way: Arc<egress::Way>,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// For each step: the TCP and TLS connection, the upgrade, the handshake.
    pub connect_timeout: Duration,
    /// The tunnel settings; [`Uplink::connect`] sets `initiator` (we dial).
    pub session: tunnel::Config,
    pub credential: Credential,
    /// Where the token came from (a file, `SALLYPORT_TOKEN`, the keychain), for messages.
    pub token_source: String,
    pub transport: TransportChoice,
    /// The HTTP transport's downstream (`None`: stream, long-poll when a proxy buffers).
    pub http_mode: Option<DownMode>,
    /// `[tunnel] inner = "always"`: sealed (v2) or inside the inner channel (v1) even over the
    /// gateway's own TLS.
    pub always_inner: bool,
    /// `[tunnel] websocket_masks = "random"`: a random mask key on every frame, even where the
    /// zero key would do.
    pub random_masks: bool,
}

/// What protects a session's frames on the way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protection {
    /// The TLS to the gateway, proven its own.
    Tls,
    /// Protocol v1's inner channel, bound to the pinned inner key.
    V1Inner,
    /// Protocol v2: sealed, or over the gateway's own TLS or a trusted load balancer's.
    V2(crate::v2::Done),
}

/// How a session is carried: the transport and what protects it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Carried {
    /// `None`: WebSocket; else the HTTP transport's downstream mode.
    pub http: Option<Option<DownMode>>,
    pub protection: Protection,
}

impl Carried {
    /// A v2 handshake found that the TLS certificate seen is not one the gateway listed: a
    /// proxy on the way re-signs it (authenticated, so not forgeable by that proxy).
    pub fn resigned(&self) -> bool {
        matches!(
            self.protection,
            Protection::V2(crate::v2::Done {
                tls_listed: Some(false),
                ..
            })
        )
    }
}

impl std::fmt::Display for Carried {
    /// e.g. `websocket`, `websocket, inner channel`, `http long-poll, v2 sealed`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.http {
            None => f.write_str("websocket")?,
            Some(Some(DownMode::Poll)) => f.write_str("http long-poll")?,
            Some(_) => f.write_str("http")?,
        }
        match self.protection {
            Protection::Tls => Ok(()),
            Protection::V1Inner => f.write_str(", inner channel"),
            Protection::V2(done) => write!(f, ", {}", done.describe()),
        }
    }
}

/// A session that came up.
pub struct Connected {
    pub session: Session,
    /// Streams the gateway opens towards us (the connector serves them; the agent accepts none).
    pub incoming: Incoming,
    pub carried: Carried,
    /// The outer certificate seen (for `doctor`).
    pub cert: String,
    /// From the first dial to the session being up (set by `crate::keep`; zero elsewhere).
    pub took: Duration,
}

impl Uplink {
    /// What the user is told when the gateway refused the credential: which token, and what
    /// to do.
    pub fn refused_text(&self, e: &ConnectError) -> String {
        let what = match self.session.role {
            Role::Connector => "ask your admin for a new connector token",
            _ => "ask your admin or run `sallyport enroll`",
        };
        format!(
            "the token in {} was refused by the gateway (expired, revoked or mistyped); {what} ({e})",
            self.token_source
        )
    }

    /// The gateway's endpoint name for our role: `agent` or `connector`.
    fn endpoint(&self) -> &'static str {
        match self.session.role {
            Role::Connector => "connector",
            _ => "agent",
        }
    }

    fn tunnel_config(&self) -> tunnel::Config {
        let mut cfg = self.session.clone();
        cfg.initiator = true;
        cfg
    }

    async fn hello(
        &self,
        transport: impl tunnel::Transport,
        carried: Carried,
        cert: String,
    ) -> Result<Connected, ConnectError> {
        let (session, incoming) = Session::start(transport, self.tunnel_config()).await?;
        if carried.resigned() {
            crate::keep::said_resigned(&cert);
        }
        Ok(Connected {
            session,
            incoming,
            carried,
            cert,
            took: Duration::ZERO,
        })
    }

    /// Probes the ways out (see `egress::probe`), dials the gateway and starts a session on
    /// `choice`; says which way out it took.
    pub async fn connect(
        &self,
        choice: TransportChoice,
    ) -> Result<(Connected, Candidate), ConnectError> {
        let gw = &self.gateway;
        match choice {
            TransportChoice::WebSocket | TransportChoice::Auto => {
                let r = self
                    .way
                    .connect(gw, self.tls.as_ref(), self.connect_timeout, |io| {
                        self.over_websocket(io)
                    })
                    .await;
                match r {
                    Ok(c) => Ok(c),
                    Err(ProbeError::Gateway(e))
                        if choice == TransportChoice::Auto
                            && e.upgrade_stripped()
                            && self.http_allowed() =>
                    {
                        let Some(way) = self.way.remembered() else {
                            return Err(e);
                        };
                        crate::keep::said_fallback(
                            &way,
                            &e,
                            matches!(self.credential, Credential::V2(_)),
                            self.session.role != Role::Connector,
                        );
                        Ok((self.over_http(&way, None).await?, way))
                    }
                    Err(e) => Err(e.into()),
                }
            }
            TransportChoice::Http => {
                let (io, way) = self
                    .way
                    .connect(gw, self.tls.as_ref(), self.connect_timeout, |io| async {
                        Ok::<_, ConnectError>(io)
                    })
                    .await?;
                Ok((self.over_http(&way, Some(io)).await?, way))
            }
        }
    }

    /// The HTTP transport exists for connectors only in protocol v2 (sealed).
    fn http_allowed(&self) -> bool {
        matches!(self.credential, Credential::V2(_)) || self.session.role != Role::Connector
    }

    /// The WebSocket upgrade (with the credential's handshake) and the tunnel hello on a fresh
    /// connection to the gateway.
    pub async fn over_websocket(&self, io: GatewayStream) -> Result<Connected, ConnectError> {
        let cert = io.peer_summary();
        let url = self.gateway.endpoint(self.endpoint());
        let max_frame = self.session.max_frame;
        let v1 = match &self.credential {
            Credential::V2(cell) => {
                let token = &cell.get();
                // Whatever the certificate, the handshake inside authenticates the gateway by
                // the key in the token; nothing secret is sent.
                let (t, done) = crate::v2::over_websocket(
                    io,
                    &url,
                    token,
                    max_frame,
                    self.connect_timeout,
                    self.always_inner,
                    self.random_masks,
                )
                .await?;
                let carried = Carried {
                    http: None,
                    protection: Protection::V2(done),
                };
                return self.hello(t, carried, cert).await;
            }
            Credential::V1(v1) => v1,
        };
        let key = match v1::carry(self, &v1.trust, &io)? {
            Carry::Inner(key) => Some(key),
            Carry::Bearer => None,
        };
        let mut url = url;
        if key.is_some() {
            url.push_str("?inner=1");
        }
        let bearer = key.is_none().then(|| v1.token.expose());
        let ws = tunnel::ws::client(io, &url, bearer, max_frame, self.connect_timeout)
            .await
            .map_err(|e| match e {
                // The bearer token went only over TLS proven the gateway's own: its 401 is the
                // gateway's own word, not a middlebox's.
                tunnel::ws::HandshakeError::Refused { status: 401, body } if bearer.is_some() => {
                    ConnectError::Refused {
                        status: 401,
                        text: body,
                    }
                }
                e => e.into(),
            })?;
        match key {
            Some(key) => {
                let t = tunnel::inner::connect(ws, &key, v1.token.expose(), self.connect_timeout)
                    .await
                    .map_err(|e| v1::inner_error(self, &key, e))?;
                let carried = Carried {
                    http: None,
                    protection: Protection::V1Inner,
                };
                self.hello(t, carried, cert).await
            }
            None => {
                let carried = Carried {
                    http: None,
                    protection: Protection::Tls,
                };
                self.hello(ws, carried, cert).await
            }
        }
    }

    /// The HTTP transport along `way` (`io`: a connection already open on it).
    pub async fn over_http(
        &self,
        way: &Candidate,
        io: Option<GatewayStream>,
    ) -> Result<Connected, ConnectError> {
        // The first connection now: the v1 carry decision needs its certificate.
        let io = match io {
            Some(io) => io,
            None => self
                .way
                .dial(&self.gateway, self.tls.as_ref(), self.connect_timeout, way)
                .await
                .map_err(|summary| ConnectError::NoWay {
                    summary,
                    rejected_only: false,
                })?,
        };
        let v1 = match &self.credential {
            Credential::V2(cell) => {
                let token = &cell.get();
                // msg1 is the create body, and the session is always sealed (each request may
                // ride another TLS connection).
                let dial = crate::v2::HttpDial {
                    way: self.way.clone(),
                    gateway: self.gateway.clone(),
                    tls: self.tls.clone(),
                    timeout: self.connect_timeout,
                    candidate: way.clone(),
                };
                let (t, done, cert) =
                    crate::v2::http_session(dial, Some(io), token, self.endpoint(), self.http_mode)
                        .await?;
                let carried = Carried {
                    http: Some(self.http_mode),
                    protection: Protection::V2(done),
                };
                return self.hello(t, carried, cert).await;
            }
            Credential::V1(v1) => v1,
        };
        let cert = io.peer_summary();
        // Every new connection of the HTTP transport is checked again: a bearer token goes
        // only on TLS proven to be the gateway's own, connection by connection.
        let redial = |bearer: bool| -> Redial {
            let (up, c) = (Arc::new(self.clone()), way.clone());
            Arc::new(move || {
                let (up, c) = (up.clone(), c.clone());
                Box::pin(async move {
                    let s = up
                        .way
                        .dial(&up.gateway, up.tls.as_ref(), up.connect_timeout, &c)
                        .await?;
                    if let (true, Credential::V1(v1)) = (bearer, &up.credential) {
                        if !v1::proven_own(&up, &v1.trust, &s) {
                            return Err(ConnectError::Untrusted {
                                seen: s.peer_summary(),
                            }
                            .to_string());
                        }
                    }
                    Ok(Box::new(s) as GatewayIo)
                })
            })
        };
        let key = match v1::carry(self, &v1.trust, &io)? {
            Carry::Inner(key) => Some(key),
            Carry::Bearer => None,
        };
        let mut opts = Options {
            host: self.gateway.authority(),
            base: format!("{}/{}/http", self.gateway.prefix, self.endpoint()),
            bearer: None,
            mac_key: None,
            mode: self.http_mode,
            timeout: self.connect_timeout,
        };
        let Some(key) = key else {
            opts.bearer = Some(v1.token.expose().to_string());
            let created =
                tunnel::http::client::connect(redial(true), Some(Box::new(io)), opts, Bytes::new())
                    .await?;
            let carried = Carried {
                http: Some(self.http_mode),
                protection: Protection::Tls,
            };
            return self.hello(created.transport, carried, cert).await;
        };
        let mut mac = [0u8; 32];
        rand::thread_rng().fill(&mut mac);
        opts.mac_key = Some(mac);
        let (init, hello) = tunnel::inner::Initiator::start(&key, &mac)
            .map_err(|e| v1::inner_error(self, &key, e))?;
        let created = tunnel::http::client::connect(redial(false), Some(Box::new(io)), opts, hello)
            .await
            .map_err(|e| match e {
                HttpError::Refused { status: 403, body } => {
                    match tunnel::inner::read_refusal(
                        body.trim_start_matches("sallyport: ").to_string(),
                    ) {
                        e @ InnerError::KeyMismatch(_) => v1::inner_error(self, &key, e),
                        _ => ConnectError::Http(HttpError::Refused { status: 403, body }),
                    }
                }
                e => ConnectError::Http(e),
            })?;
        let cipher = init
            .finish(&created.reply)
            .map_err(|e| v1::inner_error(self, &key, e))?;
        let t = tunnel::inner::InnerTransport::new(created.transport, cipher);
        let t = tokio::time::timeout(
            self.connect_timeout,
            tunnel::inner::authenticate(t, v1.token.expose()),
        )
        .await
        .map_err(|_| v1::inner_error(self, &key, InnerError::Timeout(self.connect_timeout)))?
        .map_err(|e| v1::inner_error(self, &key, e))?;
        let carried = Carried {
            http: Some(self.http_mode),
            protection: Protection::V1Inner,
        };
        self.hello(t, carried, cert).await
    }
}
