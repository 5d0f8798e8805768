//! A connector's session: registered in the router with the routes its credential covers.

use super::limits::CountGuard;
use super::session::{guard_session, start_session};
use super::Shared;
use crate::auth::Identity;
use crate::logsafe::Clean;
use crate::policy::Route;
use std::net::SocketAddr;
use std::sync::Arc;
use tracing::{info, warn};

pub(crate) async fn connector_session<T: tunnel::Transport>(
    shared: Arc<Shared>,
    transport: T,
    id: Identity,
    client: SocketAddr,
    _slot: CountGuard<String>,
    deadline: tokio::time::Instant,
) {
    // Connectors never open streams towards the DMZ.
    let Some((session, _incoming)) = start_session(&shared, transport, false, deadline).await
    else {
        return;
    };
    let key = shared.router.add(&id.token_id, session.clone());
    info!(connector = %id.token_id, instance = %Clean(&session.peer().instance_id), %client, "connector session up");
    let _up = shared.ops.up(
        crate::metrics::Role::Connector,
        &id,
        client,
        &session.peer().instance_id,
        deadline,
        shared.config.limits.handshake_timeout,
    );
    let mut routes = session.peer_routes();
    let watch_routes = async {
        loop {
            let advertised = routes.borrow_and_update().clone();
            let limit = shared.config.limits.routes_per_connector;
            let mut accepted: Vec<Route> = Vec::new();
            let (mut uncovered, mut unparsable) = (0usize, 0usize);
            for text in &advertised {
                match text.parse::<Route>() {
                    Ok(r) if id.routes.iter().any(|allowed| allowed.covers(&r)) => accepted.push(r),
                    Ok(r) => {
                        // Once per credential and route, not on every session (a connector
                        // keeps several and reconnects).
                        let first = {
                            let mut said = shared
                                .routes_uncovered
                                .lock()
                                .unwrap_or_else(|e| e.into_inner());
                            // Bounded: past this, nothing more is said.
                            said.len() < 10_000 && said.insert((id.token_id.clone(), r.to_string()))
                        };
                        if first {
                            uncovered += 1;
                            if uncovered <= 3 {
                                warn!(connector = %id.token_id, route = %Clean(&r.to_string()), "route not covered by this connector's credential: ignored (said once per route)")
                            }
                        }
                    }
                    Err(e) => {
                        unparsable += 1;
                        if unparsable <= 3 {
                            warn!(connector = %id.token_id, error = %Clean(&e.to_string()), "unparsable route ignored")
                        }
                    }
                }
            }
            if uncovered > 3 || unparsable > 3 {
                warn!(connector = %id.token_id, uncovered, unparsable, "routes ignored in all");
            }
            accepted.sort_by_cached_key(|r| r.to_string());
            accepted.dedup();
            if accepted.len() > limit {
                let first = shared
                    .routes_capped
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(id.token_id.clone());
                if first {
                    warn!(connector = %id.token_id, advertised = accepted.len(), limit, "connector advertises more routes than limits.routes_per_connector: the rest are ignored");
                }
                accepted.truncate(limit);
            }
            if !advertised.is_empty() {
                let shown: Vec<String> = accepted.iter().take(20).map(|r| r.to_string()).collect();
                let more = accepted.len().saturating_sub(shown.len());
                let mut text = shown.join(" ");
                if more > 0 {
                    text.push_str(&format!(" (and {more} more)"));
                }
                info!(connector = %id.token_id, count = accepted.len(), routes = %text, "connector routes");
            }
            // `heard` from the session, not from the list: an empty `ROUTES` is an answer too.
            shared
                .router
                .set_routes(key, accepted, session.peer_routes_heard());
            if routes.changed().await.is_err() {
                // The session (and its sender) is gone.
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = watch_routes => {}
        _ = guard_session(&shared, &session, &shared.config.connector_tokens, &id) => {}
        _ = session.closed() => {}
    }
    shared.router.remove(key);
    let why = session.closed().await;
    info!(connector = %id.token_id, reason = %why, "connector session ended");
}
