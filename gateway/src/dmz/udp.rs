//! Datagram associations (SOCKS5 UDP) in the DMZ: an agent's association is switched,
//! datagram by datagram, to connector sessions that serve each destination.
//!
//! The DMZ holds no socket. An agent association keeps, per destination, a **leg**: an
//! association on one connector session (one per session, reused by every destination routed
//! there), opened with the agent's identity stamped as for `OPEN`. A destination stays on its leg
//! while the leg lives, so a conversation keeps one source address at the service. Every limit
//! (associations per token, datagrams per second per token and in all, legs and destinations per
//! association, the tunnel's queues) drops the datagram and counts it in
//! `sallyport_udp_dropped_total`; nothing waits. See `docs/protocol.md`, "Datagrams".

use super::limits::{Buckets, CountGuard, Counts, Limits};
use super::Shared;
use crate::auth::Identity;
use crate::logsafe::Clean;
use crate::metrics::UdpDrop;
use crate::policy;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;
use tokio::task::JoinSet;
use tracing::info;
use tunnel::{meta, Association, Datagram, Dest, ErrorCode, Meta, Session};

/// Destinations one agent association may use.
pub const DESTINATIONS_PER_ASSOCIATION: usize = 256;
/// Connector legs (sessions) one agent association may use.
pub const LEGS_PER_ASSOCIATION: usize = 8;

/// An open association's places: one of its token's, one of the gateway's.
type Slots = (CountGuard<String>, CountGuard<()>);

/// The DMZ's datagram limits, shared by every agent session.
/// (`[limits]` `udp_associations_per_token`, `udp_associations`, `udp_datagrams_per_token`,
/// `udp_datagrams`.)
pub(crate) struct UdpShared {
    associations: Arc<Counts<String>>,
    per_token_max: usize,
    /// Associations open in the whole gateway: every limit per credential has a global one.
    all: Arc<Counts<()>>,
    all_max: usize,
    per_token: Buckets<String>,
    global: Buckets<()>,
}

impl UdpShared {
    pub(crate) fn new(limits: &Limits) -> UdpShared {
        UdpShared {
            associations: Arc::new(Counts::new(limits.udp_associations_per_token)),
            per_token_max: limits.udp_associations_per_token,
            all: Arc::new(Counts::new(limits.udp_associations)),
            all_max: limits.udp_associations,
            per_token: Buckets::new(limits.udp_datagrams_per_token, 65_536),
            global: Buckets::new(limits.udp_datagrams, 1),
        }
    }

    /// An association's places: one of `token`'s and one of the gateway's, held while it is
    /// open; or why not (for the log, for the agent).
    fn slots(&self, token: &String) -> Result<Slots, (&'static str, String)> {
        let mine = self.associations.acquire(token).ok_or_else(|| {
            let told = format!(
                "this token has {} UDP associations open, its limit",
                self.per_token_max
            );
            ("too many for this token", told)
        })?;
        let all = self.all.acquire(&()).ok_or_else(|| {
            let told = format!(
                "the gateway has {} UDP associations open, its limit",
                self.all_max
            );
            ("the gateway's limit is reached", told)
        })?;
        Ok((mine, all))
    }

    /// One datagram of `token`'s, either way: within its rate and the gateway's?
    fn allow(&self, token: &String) -> bool {
        self.per_token.allow(token) && self.global.allow(&())
    }
}

/// A connector leg of an agent association.
struct Leg {
    connector: String,
    session: Session,
    assoc: Arc<Association>,
    /// The destinations mapped to this leg: the only sources its replies may name (a
    /// connector cannot answer "from" a destination routed to another connector).
    dests: Arc<std::sync::Mutex<std::collections::HashSet<Dest>>>,
}

/// Serves one association an agent opened, until it ends (closed by the agent, or its session
/// lost). Legs close with it.
pub(crate) async fn route_association(
    shared: Arc<Shared>,
    assoc: Association,
    id: Arc<Identity>,
    client: SocketAddr,
    agent: String,
) {
    let metrics = &shared.ops.metrics;
    let agent = Clean(&agent).to_string();
    let client_ip = client.ip();
    // An association costs what a stream open costs (legs, sockets, audit lines): the same
    // per-token rate, checked before anything is logged.
    if !shared.opens.allow(&id.token_id) {
        metrics.udp.dropped(UdpDrop::Associations);
        assoc.close(
            ErrorCode::Limit,
            "too many new associations per second for this token",
        );
        return;
    }
    let _slots = match shared.udp.slots(&id.token_id) {
        Ok(slots) => slots,
        Err((why, told)) => {
            metrics.udp.dropped(UdpDrop::Associations);
            info!(target: "audit", event = "udp-refused", token = %id.token_id, name = %id.name, client = %client_ip, %agent, "datagram association refused: {why}");
            assoc.close(ErrorCode::Limit, &told);
            return;
        }
    };
    let mut m = assoc.meta().clone();
    m.remove_prefix(meta::IDENTITY_PREFIX);
    if m.wire_len() > shared.config.limits.open_meta_bytes {
        assoc.close(ErrorCode::Limit, "association metadata is over the limit");
        return;
    }
    m.set(meta::TOKEN_ID, id.token_id.clone());
    m.set(meta::NAME, id.name.clone());
    m.set(meta::GROUPS, id.groups.join(","));
    m.set(meta::CLIENT_ADDR, client_ip.to_string());
    m.set(meta::DMZ_INSTANCE, shared.config.instance_id.clone());
    info!(target: "audit", event = "udp-open", token = %id.token_id, name = %id.name, client = %client_ip, %agent, "datagram association open");
    let _open = metrics.udp.association();
    let started = Instant::now();
    let assoc = Arc::new(assoc);
    let mut sw = Switch {
        shared: &shared,
        id: &id,
        meta: m,
        agent: assoc.clone(),
        legs: HashMap::new(),
        next_leg: 0,
        dests: HashMap::new(),
        downs: JoinSet::new(),
        up: 0,
    };
    let why = loop {
        match assoc.recv().await {
            Ok(d) => sw.up(d),
            Err((code, reason)) => break format!("{code}: {reason}"),
        }
    };
    let (dropped_in, _, down) = assoc.counts();
    metrics.udp.dropped_n(UdpDrop::Queue, dropped_in);
    let connectors: Vec<String> = sw.legs.values().map(|l| l.connector.clone()).collect();
    info!(
        target: "audit", event = "udp-close", token = %id.token_id, name = %id.name, client = %client_ip, %agent,
        connectors = %connectors.join(","), datagrams_up = sw.up, datagrams_down = down,
        duration_ms = started.elapsed().as_millis() as u64, outcome = %Clean(&why), "datagram association closed"
    );
}

/// One agent association's legs and destinations.
struct Switch<'a> {
    shared: &'a Arc<Shared>,
    id: &'a Arc<Identity>,
    meta: Meta,
    agent: Arc<Association>,
    legs: HashMap<u64, Leg>,
    next_leg: u64,
    dests: HashMap<Dest, u64>,
    /// One task per leg carrying its datagrams back to the agent; aborted when this drops.
    downs: JoinSet<()>,
    up: u64,
}

impl Switch<'_> {
    /// A datagram from the agent: checked, rate limited, sent on its destination's leg.
    fn up(&mut self, d: Datagram) {
        let metrics = &self.shared.ops.metrics.udp;
        let Ok(host) = policy::parse_host(&d.addr.host) else {
            return metrics.dropped(UdpDrop::NotAllowed);
        };
        if !self.id.routes.is_empty()
            && !self.id.routes.iter().any(|r| r.matches(&host, d.addr.port))
        {
            return metrics.dropped(UdpDrop::NotAllowed);
        }
        if !self.shared.udp.allow(&self.id.token_id) {
            return metrics.dropped(UdpDrop::Rate);
        }
        let Some(leg) = self.leg_for(&d.addr, &host) else {
            return;
        };
        match leg.send(&d.addr, &d.payload) {
            Ok(()) => {
                self.up += 1;
                metrics.carried(true, d.payload.len());
            }
            Err(e) => metrics.dropped(UdpDrop::of(e)),
        }
    }

    /// The leg for `dest`: the one it used while that lives, else one on a connector session
    /// that serves it (reused when this association already has a leg there). `None`: dropped,
    /// counted.
    fn leg_for(&mut self, dest: &Dest, host: &policy::Host) -> Option<Arc<Association>> {
        let metrics = &self.shared.ops.metrics.udp;
        // Legs whose association ended (connector refused it, went idle, session lost) go,
        // with their destinations.
        let dead: Vec<u64> = self
            .legs
            .iter()
            .filter(|(_, l)| l.assoc.ended().is_some())
            .map(|(k, _)| *k)
            .collect();
        for k in dead {
            self.legs.remove(&k);
            self.dests.retain(|_, v| *v != k);
        }
        if let Some(k) = self.dests.get(dest) {
            return self.legs.get(k).map(|l| l.assoc.clone());
        }
        if self.dests.len() >= DESTINATIONS_PER_ASSOCIATION {
            metrics.dropped(UdpDrop::Destinations);
            return None;
        }
        let Some(chosen) = self.shared.router.pick_datagrams(host, dest.port) else {
            metrics.dropped(UdpDrop::NoRoute);
            return None;
        };
        let existing = self
            .legs
            .iter()
            .find(|(_, l)| l.session.same_session(&chosen.session))
            .map(|(k, _)| *k);
        let k = match existing {
            Some(k) => k,
            None => {
                if self.legs.len() >= LEGS_PER_ASSOCIATION {
                    metrics.dropped(UdpDrop::Destinations);
                    return None;
                }
                let Ok(leg) = chosen.session.open_association(self.meta.clone()) else {
                    metrics.dropped(UdpDrop::NoRoute);
                    return None;
                };
                let leg = Arc::new(leg);
                let dests = Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
                self.downs.spawn(down(
                    self.shared.clone(),
                    self.id.token_id.clone(),
                    leg.clone(),
                    self.agent.clone(),
                    dests.clone(),
                ));
                let k = self.next_leg;
                self.next_leg += 1;
                self.legs.insert(
                    k,
                    Leg {
                        connector: chosen.connector,
                        session: chosen.session,
                        assoc: leg,
                        dests,
                    },
                );
                k
            }
        };
        self.dests.insert(dest.clone(), k);
        let leg = self.legs.get(&k)?;
        leg.dests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(dest.clone());
        Some(leg.assoc.clone())
    }
}

/// Carries a leg's datagrams back to the agent association until the leg ends.
async fn down(
    shared: Arc<Shared>,
    token: String,
    leg: Arc<Association>,
    agent: Arc<Association>,
    dests: Arc<std::sync::Mutex<std::collections::HashSet<Dest>>>,
) {
    let metrics = &shared.ops.metrics.udp;
    while let Ok(d) = leg.recv().await {
        let mapped = dests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&d.addr);
        if !mapped {
            metrics.dropped(UdpDrop::ForeignReply);
            continue;
        }
        if !shared.udp.allow(&token) {
            metrics.dropped(UdpDrop::Rate);
            continue;
        }
        match agent.send(&d.addr, &d.payload) {
            Ok(()) => metrics.carried(false, d.payload.len()),
            Err(e) => metrics.dropped(UdpDrop::of(e)),
        }
    }
    let (dropped_in, _, _) = leg.counts();
    metrics.dropped_n(UdpDrop::Queue, dropped_in);
}
