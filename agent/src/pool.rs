//! The agent's session(s) to the DMZ gateway, kept up in the background.
//!
//! One long-lived session carries every app connection as a stream, so a new app connection
//! costs no TCP or TLS handshake. When the session drops, the pool reconnects with exponential
//! backoff and jitter; app connections that arrive meanwhile wait (bounded) for the next
//! session instead of failing at once.
//!
//! How a session is carried (see `docs/protocol.md`, "Through TLS-inspecting proxies"):
//! - **transport**: WebSocket first; when something on the way strips the upgrade (426, 400, a
//!   200 without upgrade, a reset right after the request), the HTTP transport
//!   (`tunnel::http`: POSTs up, a streamed or long-polled GET down) on the same way out. Said
//!   once in the log; WebSocket is tried again in the background every [`RETRY_WEBSOCKET`]
//!   (`[tunnel] websocket_retry`).
//!   `--transport websocket|http` forces one.
//! - **inner channel**: when the agent knows the gateway's inner key and the outer TLS is not
//!   proven to be the gateway's own (its key pin), the session runs inside `tunnel::inner`, and
//!   the token is sent only there: a TLS-inspecting proxy reads neither token nor payload.

use crate::config::{AgentConfig, TransportChoice};
use bytes::Bytes;
use egress::probe::{Candidate, ProbeError};
use egress::GatewayStream;
use rand::Rng;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use tunnel::http::client::{GatewayIo, HttpError, Options, Redial};
use tunnel::inner::{InnerError, PublicKey};
use tunnel::{ErrorCode, Role, Session};
pub use uplink::error::UNTRUSTED_SEEN;
use uplink::Backoff;
pub use uplink::ConnectError;

/// While on the HTTP fallback (chosen automatically), WebSocket is tried again this often
/// (default of `[tunnel] websocket_retry`).
pub const RETRY_WEBSOCKET: Duration = Duration::from_secs(10 * 60);

/// A session and how it is carried.
pub struct Connected {
    pub session: Session,
    /// The way out it took.
    pub way: Candidate,
    /// e.g. `websocket`, `websocket, inner channel`, `http, inner channel`.
    pub carried: String,
    /// The outer certificate seen (for `doctor`).
    pub cert: String,
    pub http: bool,
}

/// Dials the gateway (the way out found by probing, see `egress::probe`) and starts a tunnel
/// session as an agent, on the configured transport.
pub async fn connect(config: &AgentConfig) -> Result<Session, ConnectError> {
    Ok(connect_with(config, config.transport).await?.session)
}

/// [`connect`] with the transport given, saying how the session is carried.
pub async fn connect_with(
    config: &AgentConfig,
    choice: TransportChoice,
) -> Result<Connected, ConnectError> {
    let gw = &config.gateway;
    match choice {
        TransportChoice::WebSocket | TransportChoice::Auto => {
            let r = config
                .way
                .connect(gw, config.tls.as_ref(), config.connect_timeout, |io| {
                    start_ws(config, io)
                })
                .await;
            match r {
                Ok(((session, carried, cert), way)) => Ok(Connected {
                    session,
                    way,
                    carried,
                    cert,
                    http: false,
                }),
                Err(ProbeError::Gateway(e))
                    if choice == TransportChoice::Auto && e.upgrade_stripped() =>
                {
                    let Some(way) = config.way.remembered() else {
                        return Err(e);
                    };
                    warn_once(&way, &e, config.websocket_retry);
                    start_http(config, &way, None).await
                }
                Err(e) => Err(e.into()),
            }
        }
        TransportChoice::Http => {
            let (io, way) = config
                .way
                .connect(
                    gw,
                    config.tls.as_ref(),
                    config.connect_timeout,
                    |io| async { Ok::<_, ConnectError>(io) },
                )
                .await?;
            start_http(config, &way, Some(io)).await
        }
    }
}

static SAID: AtomicBool = AtomicBool::new(false);

/// The fallback is news once per process, not on every reconnect.
fn warn_once(way: &Candidate, e: &ConnectError, retry: Duration) {
    if !SAID.swap(true, Ordering::Relaxed) {
        warn!(way = %way, error = %e, retry_websocket_every = %humantime::format_duration(retry), "the WebSocket upgrade does not get through this way out (a proxy strips it); using the HTTP transport (POST up, streamed GET down) and trying WebSocket again in the background");
    } else {
        info!(way = %way, "WebSocket upgrade still stripped; HTTP transport");
    }
}

/// Is the outer TLS the gateway's own? Its certificate carries the enrolled key pin, or (with no
/// pin) it is issued by `--ca` itself (not merely by something in the OS store, where a TLS-inspecting
/// proxy's CA sits). Plain `ws://` counts only to a loopback address.
fn proven_own(config: &AgentConfig, io: &GatewayStream) -> bool {
    if let GatewayStream::Plain(_) = io {
        return is_loopback_host(&config.gateway.host);
    }
    // An enrolled pin is the stronger statement: when there is one, it alone decides.
    match &config.gateway_key {
        Some(pin) => io.key_pin().is_some_and(|seen| *pin == seen),
        None => config
            .gateway_anchor
            .as_ref()
            .is_some_and(|a| a.issued(io, &config.gateway.host)),
    }
}

fn is_loopback_host(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// How the token is carried on one connection.
#[derive(Debug)]
enum Carry {
    /// `Authorization: Bearer`: only over TLS proven to be the gateway's own.
    Bearer,
    /// Inside the inner channel bound to this key: the outer TLS may be anyone's.
    Inner(PublicKey),
}

/// Decides how the token may travel on `io`. The bearer token never rides TLS that is not
/// proven the gateway's own: without an inner key, such a connection is refused, naming who
/// issued the certificate that was seen.
fn carry(config: &AgentConfig, io: &GatewayStream) -> Result<Carry, ConnectError> {
    if let Some(key) = config.inner_key {
        // With the inner key, only the enrolled pin lets the inner channel be skipped.
        let pinned = matches!(
            (&config.gateway_key, io.key_pin()),
            (Some(pin), Some(seen)) if *pin == seen
        );
        return Ok(if pinned && !config.always_inner {
            Carry::Bearer
        } else {
            Carry::Inner(key)
        });
    }
    if proven_own(config, io) {
        Ok(Carry::Bearer)
    } else {
        Err(ConnectError::Untrusted {
            seen: io.peer_summary(),
        })
    }
}

/// An inner-channel failure, with both keys when they differ.
fn inner_error(config: &AgentConfig, key: &PublicKey, e: InnerError) -> ConnectError {
    match e {
        InnerError::Auth { status, text } => ConnectError::Refused { status, text },
        InnerError::KeyMismatch(text) => ConnectError::Inner(format!(
            "the gateway's inner key does not match the pinned one: {text}; this agent is pinned to {key} (gateway {})",
            config.gateway
        )),
        e => ConnectError::Inner(e.to_string()),
    }
}

async fn start(
    config: &AgentConfig,
    transport: impl tunnel::Transport,
) -> Result<Session, ConnectError> {
    let mut cfg = config.session.clone();
    cfg.role = Role::Agent;
    cfg.initiator = true;
    cfg.accept_streams = false;
    cfg.instance_id = config.instance_id.clone();
    let (session, _incoming) = Session::start(transport, cfg).await?;
    Ok(session)
}

/// The WebSocket upgrade (inside the inner channel when needed) and the tunnel hello on a
/// fresh connection to the gateway.
pub async fn start_ws(
    config: &AgentConfig,
    io: GatewayStream,
) -> Result<(Session, String, String), ConnectError> {
    let cert = io.peer_summary();
    if let Some(token) = &config.v2 {
        // Protocol v2: whatever the certificate, the handshake inside authenticates the gateway
        // by the key in the token; nothing secret is sent.
        let url = config.gateway.endpoint("agent");
        let (t, done) = uplink::v2::over_websocket(
            io,
            &url,
            token,
            config.session.max_frame,
            config.connect_timeout,
            config.always_inner,
        )
        .await?;
        note_tls(&done, &cert);
        let carried = format!("websocket, {}", done.describe());
        return Ok((start(config, t).await?, carried, cert));
    }
    let key = match carry(config, &io)? {
        Carry::Inner(key) => Some(key),
        Carry::Bearer => None,
    };
    let mut url = config.gateway.endpoint("agent");
    if key.is_some() {
        url.push_str("?inner=1");
    }
    let bearer = key.is_none().then(|| config.token.expose());
    let ws = tunnel::ws::client(
        io,
        &url,
        bearer,
        config.session.max_frame,
        config.connect_timeout,
    )
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
            let t = tunnel::inner::connect(ws, &key, config.token.expose(), config.connect_timeout)
                .await
                .map_err(|e| inner_error(config, &key, e))?;
            Ok((
                start(config, t).await?,
                "websocket, inner channel".into(),
                cert,
            ))
        }
        None => Ok((start(config, ws).await?, "websocket".into(), cert)),
    }
}

/// The HTTP transport along `way` (`io`: a connection already open on it).
pub async fn start_http(
    config: &AgentConfig,
    way: &Candidate,
    io: Option<GatewayStream>,
) -> Result<Connected, ConnectError> {
    // Every new connection of the HTTP transport is checked again: a bearer token goes only on
    // TLS proven to be the gateway's own, connection by connection.
    let dial = |bearer: bool| -> Redial {
        let (cfg, c) = (Arc::new(config.clone()), way.clone());
        Arc::new(move || {
            let (cfg, c) = (cfg.clone(), c.clone());
            Box::pin(async move {
                let s = cfg
                    .way
                    .dial(&cfg.gateway, cfg.tls.as_ref(), cfg.connect_timeout, &c)
                    .await?;
                if bearer && !proven_own(&cfg, &s) {
                    return Err(ConnectError::Untrusted {
                        seen: s.peer_summary(),
                    }
                    .to_string());
                }
                Ok(Box::new(s) as GatewayIo)
            })
        })
    };
    // The inner key decision needs the outer certificate: open the first connection now.
    let io = match io {
        Some(io) => io,
        None => config
            .way
            .dial(
                &config.gateway,
                config.tls.as_ref(),
                config.connect_timeout,
                way,
            )
            .await
            .map_err(|summary| ConnectError::NoWay {
                summary,
                rejected_only: false,
            })?,
    };
    let cert = io.peer_summary();
    if let Some(token) = &config.v2 {
        return start_http_v2(config, token, way, io).await;
    }
    let key = match carry(config, &io)? {
        Carry::Inner(key) => Some(key),
        Carry::Bearer => None,
    };
    let mut opts = Options {
        host: config.gateway.authority(),
        base: format!("{}/agent/http", config.gateway.prefix),
        bearer: None,
        mac_key: None,
        mode: config.http_mode,
        timeout: config.connect_timeout,
    };
    let mode = |o: &Options| match o.mode {
        Some(tunnel::http::DownMode::Poll) => "http long-poll",
        _ => "http",
    };
    match key {
        Some(key) => {
            let mut mac = [0u8; 32];
            rand::thread_rng().fill(&mut mac);
            opts.mac_key = Some(mac);
            let carried = format!("{}, inner channel", mode(&opts));
            let (init, hello) = tunnel::inner::Initiator::start(&key, &mac)
                .map_err(|e| inner_error(config, &key, e))?;
            let created =
                tunnel::http::client::connect(dial(false), Some(Box::new(io)), opts, hello)
                    .await
                    .map_err(|e| match e {
                        HttpError::Refused { status: 403, body } => {
                            match tunnel::inner::read_refusal(
                                body.trim_start_matches("sallyport: ").to_string(),
                            ) {
                                e @ InnerError::KeyMismatch(_) => inner_error(config, &key, e),
                                _ => ConnectError::Http(HttpError::Refused { status: 403, body }),
                            }
                        }
                        e => ConnectError::Http(e),
                    })?;
            let cipher = init
                .finish(&created.reply)
                .map_err(|e| inner_error(config, &key, e))?;
            let t = tunnel::inner::InnerTransport::new(created.transport, cipher);
            let t = tokio::time::timeout(
                config.connect_timeout,
                tunnel::inner::authenticate(t, config.token.expose()),
            )
            .await
            .map_err(|_| inner_error(config, &key, InnerError::Timeout(config.connect_timeout)))?
            .map_err(|e| inner_error(config, &key, e))?;
            Ok(Connected {
                session: start(config, t).await?,
                way: way.clone(),
                carried,
                cert,
                http: true,
            })
        }
        None => {
            opts.bearer = Some(config.token.expose().to_string());
            let carried = mode(&opts).to_string();
            let created =
                tunnel::http::client::connect(dial(true), Some(Box::new(io)), opts, Bytes::new())
                    .await?;
            Ok(Connected {
                session: start(config, created.transport).await?,
                way: way.clone(),
                carried,
                cert,
                http: true,
            })
        }
    }
}

/// The HTTP transport with protocol v2 (`uplink::v2::http_session`): msg1 is the create body,
/// and the session is always sealed (each request may ride another TLS connection).
async fn start_http_v2(
    config: &AgentConfig,
    token: &tunnel::token::Token,
    way: &Candidate,
    io: GatewayStream,
) -> Result<Connected, ConnectError> {
    let mode = match config.http_mode {
        Some(tunnel::http::DownMode::Poll) => "http long-poll",
        _ => "http",
    };
    let dial = uplink::v2::HttpDial {
        way: config.way.clone(),
        gateway: config.gateway.clone(),
        tls: config.tls.clone(),
        timeout: config.connect_timeout,
        candidate: way.clone(),
    };
    let (t, done, cert) =
        uplink::v2::http_session(dial, Some(io), token, "agent", config.http_mode).await?;
    note_tls(&done, &cert);
    Ok(Connected {
        session: start(config, t).await?,
        way: way.clone(),
        carried: format!("{mode}, {}", done.describe()),
        cert,
        http: true,
    })
}

/// Says once per process that the TLS on the way is re-signed (v2 carries on sealed), naming
/// the certificate seen.
fn note_tls(done: &uplink::v2::Done, cert: &str) {
    static SAID: AtomicBool = AtomicBool::new(false);
    if done.tls_listed == Some(false) && !SAID.swap(true, Ordering::Relaxed) {
        warn!(seen = %cert, "the TLS certificate on the way to the gateway is not the gateway's own (a TLS-inspecting proxy re-signs it); the session stays sealed, so the proxy reads nothing (`sallyport doctor` names who re-signed it)");
    }
}

pub struct Pool {
    current: watch::Sender<Option<Session>>,
    last_error: Mutex<Option<String>>,
    /// How the current session is carried (for status).
    carried: Mutex<String>,
}

impl Pool {
    /// Starts keeping a session up until `shutdown`.
    pub fn start(config: Arc<AgentConfig>, shutdown: CancellationToken) -> Arc<Pool> {
        let pool = Arc::new(Pool {
            current: watch::Sender::new(None),
            last_error: Mutex::new(None),
            carried: Mutex::new(String::new()),
        });
        tokio::spawn(keep(pool.clone(), config, shutdown));
        pool
    }

    /// A live session, waiting up to `wait` for one; `Err` says why none is there.
    pub async fn session(&self, wait: Duration) -> Result<Session, String> {
        let mut rx = self.current.subscribe();
        let found = tokio::time::timeout(wait, async {
            loop {
                if let Some(s) = rx.borrow_and_update().as_ref() {
                    if !s.is_going_away() {
                        return Some(s.clone());
                    }
                }
                if rx.changed().await.is_err() {
                    return None;
                }
            }
        })
        .await;
        match found {
            Ok(Some(s)) => Ok(s),
            _ => Err(self
                .last_error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
                .unwrap_or_else(|| "no session to the gateway yet".into())),
        }
    }

    /// Why the last attempt to reach the gateway failed, if it did.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// How the current session is carried, e.g. `http, inner channel` (for status).
    pub fn carried(&self) -> String {
        self.carried
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The current session, if one is up (for status).
    pub fn current(&self) -> Option<Session> {
        self.current.borrow().clone()
    }
}

async fn keep(pool: Arc<Pool>, config: Arc<AgentConfig>, shutdown: CancellationToken) {
    let mut backoff = Backoff::default();
    while !shutdown.is_cancelled() {
        let started = Instant::now();
        let attempt = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = connect_with(&config, config.transport) => r,
        };
        match attempt {
            Ok(c) => {
                let mut session = c.session;
                let mut on_http = c.http && config.transport == TransportChoice::Auto;
                info!(gateway = %config.gateway, dmz = %session.peer().instance_id, carried = %c.carried, "connected to the gateway");
                *pool.last_error.lock().unwrap_or_else(|e| e.into_inner()) = None;
                *pool.carried.lock().unwrap_or_else(|e| e.into_inner()) = c.carried;
                pool.current.send_replace(Some(session.clone()));
                let why = loop {
                    let retry = async {
                        if on_http {
                            tokio::time::sleep(config.websocket_retry).await
                        } else {
                            std::future::pending::<()>().await
                        }
                    };
                    tokio::select! {
                        _ = shutdown.cancelled() => {
                            session.close(ErrorCode::Shutdown, "agent shutting down");
                            pool.current.send_replace(None);
                            return;
                        }
                        why = session.closed() => break why,
                        _ = retry => {
                            // Back to WebSocket when the way lets it through now; the HTTP
                            // session ends once its streams have.
                            if let Ok(ws) = connect_with(&config, TransportChoice::WebSocket).await {
                                info!(carried = %ws.carried, "WebSocket gets through again; leaving the HTTP transport");
                                let old = std::mem::replace(&mut session, ws.session);
                                *pool.carried.lock().unwrap_or_else(|e| e.into_inner()) = ws.carried;
                                pool.current.send_replace(Some(session.clone()));
                                on_http = false;
                                tokio::spawn(drain(old));
                            }
                        }
                    }
                };
                pool.current.send_replace(None);
                warn!(reason = %why, "gateway session lost; reconnecting");
                *pool.last_error.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some(format!("gateway session lost: {why}"));
            }
            Err(e) if egress::probe::GatewayReached::refused_credential(&e) => {
                // Authenticated (never a middlebox's status): slow down, still retry.
                backoff.after(started.elapsed());
                let wait = backoff.refused();
                let why = refused_text(&config, &e);
                warn!(retry_in = %humantime::format_duration(Duration::from_secs(wait.as_secs())), "{why}");
                *pool.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(wait) => continue,
                }
            }
            Err(e) => {
                warn!(error = %e, "cannot reach the gateway");
                *pool.last_error.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some(format!("gateway unreachable: {e}"));
                if uplink::park_after_rejected_credentials(&e, "the agent", &shutdown).await {
                    break;
                }
            }
        }
        backoff.after(started.elapsed());
        let wait = backoff.delay();
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
        }
    }
    pool.current.send_replace(None);
}

/// What the user is told when the gateway refused the credential: which token, and what to do.
pub fn refused_text(config: &AgentConfig, e: &ConnectError) -> String {
    format!(
        "the token in {} was refused by the gateway (expired, revoked or mistyped); ask your admin or run `sallyport enroll` ({e})",
        config.token_source
    )
}

/// Closes a replaced session once its last stream has ended (at most an hour later).
async fn drain(old: Session) {
    let until = Instant::now() + Duration::from_secs(3600);
    while old.stream_count() > 0 && Instant::now() < until && !old.is_closed() {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    old.close(ErrorCode::Shutdown, "moved to another transport");
}
