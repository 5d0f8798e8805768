//! The agent's session(s) to the DMZ gateway, kept up in the background.
//!
//! One long-lived WebSocket session carries every app connection as a stream, so a new app
//! connection costs no TCP or TLS handshake. When the session drops, the pool reconnects with
//! exponential backoff and jitter; app connections that arrive meanwhile wait (bounded) for the
//! next session instead of failing at once.

use crate::config::AgentConfig;
use egress::probe::{GatewayReached, ProbeError};
use rand::Rng;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use tunnel::{ErrorCode, Role, Session};

/// Why a session to the gateway could not be set up; says which hop failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// No way out worked (each candidate's reason is in the text).
    #[error("{summary}")]
    NoWay {
        summary: String,
        /// Every candidate failed on rejected proxy credentials.
        rejected_only: bool,
    },
    #[error("{0}")]
    Handshake(#[from] tunnel::ws::HandshakeError),
    #[error("tunnel hello with the gateway failed: {0}")]
    Session(#[from] tunnel::SessionError),
}

impl GatewayReached for ConnectError {
    /// A refusal with the gateway's own statuses (bad token, too many sessions) or a hello
    /// means the way out works.
    fn reached_gateway(&self) -> bool {
        match self {
            ConnectError::Handshake(h) => matches!(h.status(), Some(401 | 429)),
            ConnectError::Session(tunnel::SessionError::Version { .. }) => true,
            _ => false,
        }
    }
}

impl From<ProbeError<ConnectError>> for ConnectError {
    fn from(e: ProbeError<ConnectError>) -> ConnectError {
        match e {
            ProbeError::Gateway(e) => e,
            e => ConnectError::NoWay {
                rejected_only: e.only_rejected_credentials(),
                summary: e.to_string(),
            },
        }
    }
}

/// Dials the gateway (the way out found by probing, see `egress::probe`) and starts a tunnel
/// session as an agent.
pub async fn connect(config: &AgentConfig) -> Result<Session, ConnectError> {
    let url = config.gateway.endpoint("agent");
    let (session, _way) = config
        .way
        .connect(
            &config.gateway,
            config.tls.as_ref(),
            config.connect_timeout,
            |io| start_session(config, &url, io),
        )
        .await?;
    Ok(session)
}

/// The WebSocket upgrade and the tunnel hello on a fresh connection to the gateway.
pub async fn start_session(
    config: &AgentConfig,
    url: &str,
    io: egress::GatewayStream,
) -> Result<Session, ConnectError> {
    let transport = tunnel::ws::client(
        io,
        url,
        Some(config.token.expose()),
        config.session.max_frame,
        config.connect_timeout,
    )
    .await?;
    let mut cfg = config.session.clone();
    cfg.role = Role::Agent;
    cfg.initiator = true;
    cfg.accept_streams = false;
    cfg.instance_id = config.instance_id.clone();
    let (session, _incoming) = Session::start(transport, cfg).await?;
    Ok(session)
}

pub struct Pool {
    current: watch::Sender<Option<Session>>,
    last_error: Mutex<Option<String>>,
}

impl Pool {
    /// Starts keeping a session up until `shutdown`.
    pub fn start(config: Arc<AgentConfig>, shutdown: CancellationToken) -> Arc<Pool> {
        let pool = Arc::new(Pool {
            current: watch::Sender::new(None),
            last_error: Mutex::new(None),
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

    /// The current session, if one is up (for status).
    pub fn current(&self) -> Option<Session> {
        self.current.borrow().clone()
    }
}

async fn keep(pool: Arc<Pool>, config: Arc<AgentConfig>, shutdown: CancellationToken) {
    let mut delay = Duration::from_millis(250);
    while !shutdown.is_cancelled() {
        let started = Instant::now();
        let attempt = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = connect(&config) => r,
        };
        match attempt {
            Ok(session) => {
                info!(gateway = %config.gateway, dmz = %session.peer().instance_id, "connected to the gateway");
                *pool.last_error.lock().unwrap_or_else(|e| e.into_inner()) = None;
                pool.current.send_replace(Some(session.clone()));
                let why = tokio::select! {
                    _ = shutdown.cancelled() => {
                        session.close(ErrorCode::Shutdown, "agent shutting down");
                        break;
                    }
                    why = session.closed() => why,
                };
                pool.current.send_replace(None);
                warn!(reason = %why, "gateway session lost; reconnecting");
                *pool.last_error.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some(format!("gateway session lost: {why}"));
            }
            Err(e) => {
                warn!(error = %e, "cannot reach the gateway");
                *pool.last_error.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some(format!("gateway unreachable: {e}"));
                if credentials_rejected(&e) {
                    // Never retry a credential that got 407: domain accounts lock.
                    tracing::error!("not retrying with rejected proxy credentials; fix the password and restart the agent");
                    shutdown.cancelled().await;
                    break;
                }
            }
        }
        if started.elapsed() > Duration::from_secs(60) {
            delay = Duration::from_millis(250);
        }
        let wait = delay.mul_f64(rand::thread_rng().gen_range(0.5..=1.0));
        delay = (delay * 2).min(Duration::from_secs(15));
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
        }
    }
    pool.current.send_replace(None);
}

/// True when every way out failed on rejected proxy credentials (retrying would risk locking
/// the account).
pub fn credentials_rejected(e: &ConnectError) -> bool {
    matches!(
        e,
        ConnectError::NoWay {
            rejected_only: true,
            ..
        }
    )
}
