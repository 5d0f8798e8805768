//! The agent's session(s) to the DMZ gateway, kept up in the background.
//!
//! One long-lived session carries every app connection as a stream, so a new app connection
//! costs no TCP or TLS handshake. When the session drops, the pool reconnects with exponential
//! backoff and jitter; app connections that arrive meanwhile wait (bounded) for the next
//! session instead of failing at once. When the gateway says `GOAWAY` (an instance draining),
//! the pool reconnects at once and the old session carries its open streams to their end.
//! When the network changes or the machine wakes (`crate::netwatch`), [`Pool::moved`] ends
//! the session and a new one is set up at once, without the backoff wait.
//!
//! How a session is set up and kept is shared with the connector (`uplink`: `Uplink::connect`,
//! `uplink::keep`); this file adds what only the agent does: lending the session to app
//! connections, and moving back to WebSocket when the way lets it through again.
//!
//! How a session is carried (see `docs/protocol.md`, "Through TLS-inspecting proxies"):
//! - **transport**: WebSocket first; when something on the way strips the upgrade (426, 400, a
//!   200 without upgrade, a reset right after the request), the HTTP transport
//!   (`tunnel::http`: POSTs up, a streamed or long-polled GET down) on the same way out. Said
//!   once in the log; WebSocket is tried again in the background every `RETRY_WEBSOCKET`
//!   (`[tunnel] websocket_retry`).
//!   `--transport websocket|http` forces one.
//! - **inner channel**: when the agent knows the gateway's inner key and the outer TLS is not
//!   proven to be the gateway's own (its key pin), the session runs inside `tunnel::inner`, and
//!   the token is sent only there: a TLS-inspecting proxy reads neither token nor payload.

use crate::config::AgentConfig;
use crate::netwatch::{react::Whereabouts, Event};
use egress::probe::Candidate;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::info;
use tunnel::{ErrorCode, Session};
pub use uplink::keep::RETRY_WEBSOCKET;
pub use uplink::{ConnectError, Connected, TransportChoice};

/// Dials the gateway (the way out found by probing, see `egress::probe`) and starts a tunnel
/// session as an agent, on the configured transport.
pub async fn connect(config: &AgentConfig) -> Result<Session, ConnectError> {
    Ok(connect_with(config, config.transport).await?.0.session)
}

/// [`connect`] with the transport given, saying how the session is carried and which way out
/// it took.
pub async fn connect_with(
    config: &AgentConfig,
    choice: TransportChoice,
) -> Result<(Connected, Candidate), ConnectError> {
    config.uplink().connect(choice).await
}

pub struct Pool {
    current: watch::Sender<Option<Session>>,
    last_error: Mutex<Option<String>>,
    /// How the current session is carried (for status).
    carried: Mutex<String>,
    /// Where the machine was on the network when the current session came up.
    whereabouts: Mutex<Option<Whereabouts>>,
    /// Changed by [`Pool::moved`]: end the session (or the wait) and connect again now.
    nudge: watch::Sender<()>,
    /// Why the session was last moved (the log and the close reason say it).
    moved_why: Mutex<String>,
    /// The last network change and the last wake, for status.
    events: Mutex<Events>,
}

/// The last network change and wake from sleep: when, what, what was done.
#[derive(Clone, Debug, Default)]
pub struct Events {
    pub change: Option<(SystemTime, String, &'static str)>,
    pub wake: Option<(SystemTime, String, &'static str)>,
}

impl Pool {
    /// Starts keeping a session up until `shutdown`.
    pub fn start(config: Arc<AgentConfig>, shutdown: CancellationToken) -> Arc<Pool> {
        let pool = Arc::new(Pool {
            current: watch::Sender::new(None),
            last_error: Mutex::new(None),
            carried: Mutex::new(String::new()),
            whereabouts: Mutex::new(None),
            nudge: watch::Sender::new(()),
            moved_why: Mutex::new(String::new()),
            events: Mutex::new(Events::default()),
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

    /// Where the machine was on the network when the current session came up.
    pub fn whereabouts(&self) -> Option<Whereabouts> {
        lock(&self.whereabouts).clone()
    }

    /// The network changed or the machine woke (`why`): end the current session and set up a
    /// new one at once (the way out probed again, the one remembered for this network first),
    /// or, between sessions, end the wait and try now.
    pub fn moved(&self, why: &str) {
        *lock(&self.moved_why) = why.to_string();
        self.nudge.send_replace(());
    }

    /// Notes an event and what was done about it, for status.
    pub fn record_event(&self, event: &Event, outcome: &'static str) {
        let mut e = lock(&self.events);
        let entry = Some((SystemTime::now(), event.to_string(), outcome));
        match event {
            Event::Changed(_) => e.change = entry,
            Event::Woke(_) => e.wake = entry,
        }
    }

    /// The last network change and wake (for status).
    pub fn events(&self) -> Events {
        lock(&self.events).clone()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

async fn keep(pool: Arc<Pool>, config: Arc<AgentConfig>, shutdown: CancellationToken) {
    let up = config.uplink();
    let set_error = |e: Option<String>| {
        *pool.last_error.lock().unwrap_or_else(|e| e.into_inner()) = e;
    };
    let serve = |c: Connected, _way: Candidate, up: uplink::Uplink| {
        let (pool, config, shutdown) = (&pool, &config, &shutdown);
        async move {
            let mut session = c.session;
            let mut on_http =
                uplink::keep::retries_websocket(config.transport, c.carried.http.is_some());
            *pool.last_error.lock().unwrap_or_else(|e| e.into_inner()) = None;
            *pool.carried.lock().unwrap_or_else(|e| e.into_inner()) = c.carried.to_string();
            *lock(&pool.whereabouts) = Some(Whereabouts::current());
            let mut moved = pool.nudge.subscribe();
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
                        return uplink::Ended::Shutdown;
                    }
                    why = session.closed() => break why,
                    Ok(()) = moved.changed() => {
                        // The network changed or the machine woke: this session's path may be
                        // gone. A new one now (with stream resume, the streams follow it).
                        let why = lock(&pool.moved_why).clone();
                        session.close(ErrorCode::SessionLost, &why);
                        pool.current.send_replace(None);
                        return uplink::Ended::Replaced;
                    }
                    _ = session.peer_going_away() => {
                        if session.is_closed() {
                            break session.closed().await;
                        }
                        // A draining instance: new app connections wait for the next session,
                        // which starts now; the streams open here finish on this one.
                        let (code, reason) = session
                            .peer_goaway()
                            .unwrap_or((ErrorCode::Shutdown, String::new()));
                        tokio::spawn(drain(session.clone(), "moved to another gateway session"));
                        break tunnel::SessionError::GoAway { code, reason };
                    }
                    _ = retry => {
                        // Back to WebSocket when the way lets it through now; the HTTP session
                        // ends once its streams have.
                        if let Ok((ws, _)) = up.connect(TransportChoice::WebSocket).await {
                            info!(carried = %ws.carried, "WebSocket gets through again; leaving the HTTP transport");
                            let old = std::mem::replace(&mut session, ws.session);
                            *pool.carried.lock().unwrap_or_else(|e| e.into_inner()) = ws.carried.to_string();
                            pool.current.send_replace(Some(session.clone()));
                            on_http = false;
                            tokio::spawn(drain(old, "moved to another transport"));
                        }
                    }
                }
            };
            pool.current.send_replace(None);
            *pool.last_error.lock().unwrap_or_else(|e| e.into_inner()) =
                Some(format!("gateway session lost: {why}"));
            uplink::Ended::Lost(why)
        }
    };
    let nudge = pool.nudge.subscribe();
    uplink::keep_nudged(
        &up,
        "the agent",
        &shutdown,
        serve,
        |e| {
            set_error(Some(
                if egress::probe::GatewayReached::refused_credential(e) {
                    up.refused_text(e)
                } else {
                    format!("gateway unreachable: {e}")
                },
            ))
        },
        nudge,
    )
    .await;
    pool.current.send_replace(None);
}

/// Closes a replaced session once its last stream has ended (at most an hour later; a
/// draining gateway closes it sooner).
async fn drain(old: Session, why: &'static str) {
    let until = Instant::now() + Duration::from_secs(3600);
    while old.stream_count() > 0 && Instant::now() < until && !old.is_closed() {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    old.close(ErrorCode::Shutdown, why);
}
