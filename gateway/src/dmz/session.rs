//! What every session of the DMZ shares: the tunnel hello within the handshake deadline, and
//! the guard that cuts a session when its token is revoked or expires.

use super::Shared;
use crate::auth::{Identity, ReloadingStore};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tracing::{info, warn};
use tunnel::{ErrorCode, Role, Session};

pub(crate) async fn start_session<T: tunnel::Transport>(
    shared: &Shared,
    transport: T,
    accept_streams: bool,
    deadline: tokio::time::Instant,
) -> Option<(Session, tunnel::Incoming)> {
    let mut cfg = shared.config.session.clone();
    cfg.role = Role::Dmz;
    cfg.initiator = false;
    cfg.instance_id = shared.config.instance_id.clone();
    cfg.accept_streams = accept_streams;
    cfg.max_incoming_streams = shared.config.limits.streams_per_session;
    match tokio::time::timeout_at(deadline, Session::start(transport, cfg)).await {
        Ok(Ok(s)) => {
            shared.first_session.get_or_init(tokio::time::Instant::now);
            Some(s)
        }
        Ok(Err(e)) => {
            info!(error = %e, "tunnel hello failed");
            None
        }
        Err(_) => {
            info!("tunnel hello timed out");
            None
        }
    }
}

/// The gateway is going away: `GOAWAY(shutdown)` tells the peer to open new streams elsewhere
/// (an agent reconnects at once), while the streams already open, and those an agent opened
/// before it read it, finish here. An agent's session closes once the peer has read it (the
/// `PING` behind it is answered) and no stream is left; a connector's
/// once, in addition, no agent session is left (a stream an agent opens in the last moment
/// still needs a connector to go to). At most [`super::DRAIN_GRACE`] after the `GOAWAY`.
async fn drain(shared: &Shared, session: &Session) {
    session.go_away(ErrorCode::Shutdown, "gateway shutting down");
    let until = tokio::time::Instant::now() + super::DRAIN_GRACE;
    let serves_agents = session.peer().role == Role::Connector;
    let busy = || {
        !session.go_away_heard()
            || session.stream_count() > 0
            || (serves_agents && shared.ops.metrics.sessions(crate::metrics::Role::Agent) > 0)
    };
    while busy() && !session.is_closed() && tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    session.close(ErrorCode::Shutdown, "gateway shutting down");
}

/// Closes `session` when its token is revoked or expires, or when the gateway shuts down
/// (gracefully: [`drain`]).
pub(crate) async fn guard_session(
    shared: &Shared,
    session: &Session,
    store: &Arc<ReloadingStore>,
    id: &Identity,
) {
    let mut changes = store.subscribe();
    let mut revocations = shared.config.v2.revoked.as_ref().map(|r| r.subscribe());
    let mut tick = tokio::time::interval(Duration::from_secs(30));
    loop {
        let revocation = async {
            match revocations.as_mut() {
                Some(r) => r.changed().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = session.closed() => return,
            _ = shared.shutdown.cancelled() => {
                drain(shared, session).await;
                return;
            }
            r = changes.changed() => if r.is_err() { return },
            r = revocation => if r.is_err() { return },
            _ = tick.tick() => {}
        }
        let now = SystemTime::now();
        let valid = if id.listed {
            store.current().is_valid(id, now)
        } else {
            // Accepted by its signed claims: only its expiry and the revocation list end it.
            !id.expired(now)
        };
        if !valid || shared.config.v2.on_list(id) {
            warn!(token = %id.token_id, "token revoked or expired: cutting its session");
            session.close(ErrorCode::Unauthorized, "token revoked or expired");
            return;
        }
    }
}
