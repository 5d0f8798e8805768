//! An agent's session: its streams, each routed on its own task, and the routes it is told.

use super::limits::CountGuard;
use super::session::{guard_session, start_session};
use super::streams::route_stream;
use super::Shared;
use crate::auth::Identity;
use crate::logsafe::Clean;
use std::net::SocketAddr;
use std::sync::Arc;
use tracing::{info, Instrument};

/// An agent's session, over any transport (WebSocket or HTTP, inside the inner channel or not).
pub(crate) async fn agent_session<T: tunnel::Transport>(
    shared: Arc<Shared>,
    transport: T,
    id: Identity,
    client: SocketAddr,
    _slot: CountGuard<String>,
    deadline: tokio::time::Instant,
) {
    let Some((session, mut incoming)) = start_session(&shared, transport, true, deadline).await
    else {
        return;
    };
    info!(token = %id.token_id, name = %id.name, agent = %Clean(&session.peer().instance_id), "agent session up");
    let _up = shared.ops.up(
        crate::metrics::Role::Agent,
        &id,
        client,
        &session.peer().instance_id,
        deadline,
        shared.config.limits.handshake_timeout,
    );
    let id = Arc::new(id);
    let streams = async {
        while let Some(stream) = incoming.accept().await {
            let shared2 = shared.clone();
            let id2 = id.clone();
            let agent = session.peer().instance_id.clone();
            shared.tracker.spawn(
                async move {
                    route_stream(shared2, stream, id2, client, agent).await;
                }
                .in_current_span(),
            );
        }
    };
    let associations = async {
        while let Some(assoc) = session.accept_association().await {
            let agent = session.peer().instance_id.clone();
            shared.tracker.spawn(
                super::udp::route_association(shared.clone(), assoc, id.clone(), client, agent)
                    .in_current_span(),
            );
        }
        std::future::pending::<()>().await
    };
    // Tell the agent what it can reach (for its browser PAC file): the connectors' routes,
    // narrowed to the agent credential's routes when it has any. The connectors' allow-lists
    // may still refuse some destinations by user or group. Recomputed when the router changes.
    let advertise = async {
        let mut last: Option<Vec<String>> = None;
        let mut changes = shared.router.changes();
        loop {
            let mut visible: Vec<String> = Vec::new();
            for r in shared.router.routes() {
                if id.routes.is_empty() || id.routes.iter().any(|c| c.covers(&r)) {
                    visible.push(r.to_string());
                } else {
                    visible.extend(
                        id.routes
                            .iter()
                            .filter(|c| r.covers(c))
                            .map(|c| c.to_string()),
                    );
                }
            }
            visible.sort();
            visible.dedup();
            if last.as_ref() != Some(&visible) {
                session.advertise_routes(visible.clone());
                last = Some(visible);
            }
            if changes.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = streams => {}
        _ = associations => {}
        _ = advertise => {}
        _ = guard_session(&shared, &session, &shared.config.agent_tokens, &id) => {}
    }
    let why = session.closed().await;
    info!(token = %id.token_id, reason = %why, "agent session ended");
}
