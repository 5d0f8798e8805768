//! Datagram associations (SOCKS5 UDP) the DMZ opened on a connector session: one UDP socket
//! each, the UDP allow-list asked for every destination (before and after resolution, with the
//! same special-address rules as TCP), names resolved here, replies accepted only from the peers
//! the association sent to, every limit a counted drop, and the audit lines.
//! See `docs/protocol.md`, "Datagrams".

use super::ConnectorConfig;
use crate::dmz::limits::{Buckets, Counts};
use crate::logsafe::Clean;
use crate::metrics::UdpDrop;
use crate::policy::{self, Host, Who};
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, Instrument};
use tunnel::{meta, Association, Datagram, Dest, ErrorCode, Session};

/// Associations open at once per user (the `sp-id-name` the DMZ stamped).
pub const ASSOCIATIONS_PER_USER: usize = 64;
/// Associations open at once on this connector.
pub const ASSOCIATIONS: usize = 4096;
/// Datagrams per second per association, both directions (burst: twice that).
pub const DATAGRAMS_PER_ASSOCIATION: f64 = 1_000.0;
/// An association with no datagram either way for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// Peers (address and port) one association may send to and hear from.
pub const PEERS_PER_ASSOCIATION: usize = 256;
/// Names remembered per association, and for how long.
const NAMES: usize = 64;
const NAME_TTL: Duration = Duration::from_secs(30);

/// The association limits shared by every session of this connector.
pub struct UdpState {
    per_user: Arc<Counts<String>>,
    all: Arc<Counts<()>>,
}

impl Default for UdpState {
    fn default() -> UdpState {
        UdpState {
            per_user: Arc::new(Counts::new(ASSOCIATIONS_PER_USER)),
            all: Arc::new(Counts::new(ASSOCIATIONS)),
        }
    }
}

/// Serves the associations the DMZ opens on `session` until it ends or `shutdown`.
pub(super) async fn serve(
    config: &Arc<ConnectorConfig>,
    state: &Arc<UdpState>,
    session: &Session,
    shutdown: &CancellationToken,
    tracker: &TaskTracker,
) {
    loop {
        let assoc = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = session.accept_association() => match a { Some(a) => a, None => return },
        };
        let (config, state) = (config.clone(), state.clone());
        tracker.spawn(async move { handle(config, state, assoc).await }.in_current_span());
    }
}

/// Who the association belongs to, as the DMZ stamped it.
struct Owner {
    user: String,
    groups: Vec<String>,
    token: String,
    client: String,
}

async fn handle(config: Arc<ConnectorConfig>, state: Arc<UdpState>, assoc: Association) {
    let m = assoc.meta();
    let owner = Owner {
        user: m.get(meta::NAME).unwrap_or("").to_string(),
        groups: m
            .get(meta::GROUPS)
            .unwrap_or("")
            .split(',')
            .filter(|g| !g.is_empty())
            .map(str::to_string)
            .collect(),
        token: m.get(meta::TOKEN_ID).unwrap_or("").to_string(),
        client: m.get(meta::CLIENT_ADDR).unwrap_or("").to_string(),
    };
    let (user, token, client) = (&owner.user, &owner.token, &owner.client);
    let who = Who {
        user,
        groups: &owner.groups,
    };
    let metrics = &config.ops.metrics;
    let refuse = |assoc: Association, code: ErrorCode, reason: String| {
        info!(target: "audit", event = "udp-refused", %token, name = %user, %client, %code, %reason, "datagram association refused");
        metrics.udp.dropped(UdpDrop::Associations);
        assoc.close(code, &reason);
    };
    if !config.udp.rules().iter().any(|r| r.applies_to(&who)) {
        let reason = format!("no UDP rule for {}", Clean(user));
        return refuse(assoc, ErrorCode::NotAllowed, reason);
    }
    let (Some(_user_slot), Some(_slot)) = (state.per_user.acquire(user), state.all.acquire(&()))
    else {
        let reason = "too many UDP associations (per user or on this connector)".to_string();
        return refuse(assoc, ErrorCode::Limit, reason);
    };
    let socket = match bind().await {
        Ok(s) => s,
        Err(e) => return refuse(assoc, ErrorCode::Internal, format!("UDP socket: {e}")),
    };
    info!(target: "audit", event = "udp-open", %token, name = %user, %client, "datagram association open");
    let _open = metrics.udp.association();
    let started = Instant::now();
    let mut relay = Relay {
        config: &config,
        who,
        owner: &owner,
        socket,
        rate: Buckets::new(DATAGRAMS_PER_ASSOCIATION, 1),
        peers: HashMap::new(),
        names: HashMap::new(),
        refused: HashSet::new(),
        counts: [0; 4],
    };
    let why = relay.run(&assoc).await;
    let [up, down, bytes_up, bytes_down] = relay.counts;
    let (dropped_in, _, _) = assoc.counts();
    metrics.udp.dropped_n(UdpDrop::Queue, dropped_in);
    info!(
        target: "audit", event = "udp-close", %token, name = %user, %client, datagrams_up = up, datagrams_down = down,
        bytes_up, bytes_down, peers = relay.peers.len(), duration_ms = started.elapsed().as_millis() as u64,
        outcome = %why, "datagram association closed"
    );
    if why.starts_with("idle") {
        assoc.close(ErrorCode::TimedOut, &why);
    }
}

/// One dual-stack socket (IPv4 peers as mapped addresses), else an IPv4 one.
async fn bind() -> std::io::Result<UdpSocket> {
    match UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0)).await {
        Ok(s) => Ok(s),
        Err(_) => UdpSocket::bind(("0.0.0.0", 0)).await,
    }
}

struct Relay<'a> {
    config: &'a ConnectorConfig,
    who: Who<'a>,
    owner: &'a Owner,
    socket: UdpSocket,
    rate: Buckets<()>,
    /// Peers this association sent to, with the destination as the agent wrote it.
    peers: HashMap<SocketAddr, Dest>,
    names: HashMap<String, (Instant, Vec<IpAddr>)>,
    /// Destinations refused and audited (each once).
    refused: HashSet<Dest>,
    /// Datagrams up, down; bytes up, down.
    counts: [u64; 4],
}

impl Relay<'_> {
    async fn run(&mut self, assoc: &Association) -> String {
        let mut deadline = tokio::time::Instant::now() + IDLE_TIMEOUT;
        loop {
            tokio::select! {
                d = assoc.recv() => match d {
                    Ok(d) => {
                        self.up(d).await;
                        deadline = tokio::time::Instant::now() + IDLE_TIMEOUT;
                    }
                    Err((code, reason)) => return format!("{code}: {}", Clean(&reason)),
                },
                r = self.socket.readable() => {
                    if r.is_ok() && self.down(assoc) {
                        deadline = tokio::time::Instant::now() + IDLE_TIMEOUT;
                    }
                }
                _ = tokio::time::sleep_until(deadline) => return format!("idle for {IDLE_TIMEOUT:?}"),
            }
        }
    }

    /// A datagram from the agent: rate, UDP rules, resolution, per-address rules, sent.
    async fn up(&mut self, d: Datagram) {
        let metrics = &self.config.ops.metrics.udp;
        if !self.rate.allow(&()) {
            return metrics.dropped(UdpDrop::Rate);
        }
        let addr = match self.allowed_address(&d.addr).await {
            Ok(a) => a,
            Err((drop, reason)) => {
                if self.refused.len() < PEERS_PER_ASSOCIATION && self.refused.insert(d.addr.clone())
                {
                    let o = self.owner;
                    info!(target: "audit", event = "udp-refused", token = %o.token, name = %o.user, client = %o.client, dest = %Clean(&d.addr.to_string()), reason = %Clean(&reason), "datagram refused");
                }
                return metrics.dropped(drop);
            }
        };
        if !self.peers.contains_key(&addr) {
            if self.peers.len() >= PEERS_PER_ASSOCIATION {
                return metrics.dropped(UdpDrop::Destinations);
            }
            let o = self.owner;
            info!(target: "audit", event = "udp-dest", token = %o.token, name = %o.user, client = %o.client, dest = %Clean(&d.addr.to_string()), %addr, "datagram destination");
            self.peers.insert(addr, d.addr.clone());
        }
        let to = match (self.socket.local_addr(), addr) {
            (Ok(SocketAddr::V6(_)), SocketAddr::V4(v4)) => {
                SocketAddr::new(IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port())
            }
            _ => addr,
        };
        match self.socket.send_to(&d.payload, to).await {
            Ok(_) => {
                self.counts[0] += 1;
                self.counts[2] += d.payload.len() as u64;
                metrics.carried(true, d.payload.len());
            }
            Err(e) => debug!(%addr, error = %e, "udp send failed"),
        }
    }

    /// The address to send to for `dest`, or why not (and which drop reason counts it).
    async fn allowed_address(&mut self, dest: &Dest) -> Result<SocketAddr, (UdpDrop, String)> {
        let not_allowed = |reason: String| (UdpDrop::NotAllowed, reason);
        let host = policy::parse_host(&dest.host).map_err(|e| not_allowed(e.to_string()))?;
        let udp = &self.config.udp;
        udp.check(&host, dest.port, &self.who)
            .map_err(|d| not_allowed(format!("UDP: {}", d.reason)))?;
        let addrs = match &host {
            Host::Ip(ip) => vec![*ip],
            Host::Name(name) => self.resolve(name, dest.port).await.map_err(not_allowed)?,
        };
        let mut denial = None;
        for a in addrs {
            match udp.check_resolved(&host, dest.port, &self.who, a) {
                Ok(()) => return Ok(SocketAddr::new(a, dest.port)),
                Err(d) => denial = denial.or(Some(d.reason)),
            }
        }
        Err(not_allowed(denial.unwrap_or_else(|| {
            format!("{} resolved to no address", dest.host)
        })))
    }

    /// Resolves `name` in the trusted site: `--host` entries, then DNS; remembered a while.
    async fn resolve(&mut self, name: &str, port: u16) -> Result<Vec<IpAddr>, String> {
        if let Some(a) = self.config.hosts.get(name) {
            return Ok(a.clone());
        }
        if let Some((at, a)) = self.names.get(name) {
            if at.elapsed() < NAME_TTL {
                return Ok(a.clone());
            }
        }
        let lookup = tokio::net::lookup_host((name, port));
        let addrs: Vec<IpAddr> =
            match tokio::time::timeout(self.config.connect_timeout, lookup).await {
                Ok(Ok(it)) => it.map(|sa| sa.ip()).collect(),
                Ok(Err(e)) => {
                    return Err(format!(
                        "cannot resolve {name} inside the trusted network: {e}"
                    ))
                }
                Err(_) => return Err(format!("resolving {name} timed out")),
            };
        if self.names.len() >= NAMES {
            self.names.clear();
        }
        self.names
            .insert(name.to_string(), (Instant::now(), addrs.clone()));
        Ok(addrs)
    }

    /// Datagrams waiting on the socket: each from a peer this association sent to goes back
    /// to the agent with the destination as the agent wrote it; others are dropped. True when
    /// one went back. The buffer exists only while reading: an idle association holds none.
    fn down(&mut self, assoc: &Association) -> bool {
        let metrics = &self.config.ops.metrics.udp;
        let mut buf = vec![0u8; 65_536];
        let mut any = false;
        // At most a few at a time: a flood on the socket must not keep this task from the
        // association's other work (the select comes back here at once).
        for _ in 0..64 {
            let (n, from) = match self.socket.try_recv_from(&mut buf) {
                Ok(x) => x,
                Err(_) => return any,
            };
            let from = SocketAddr::new(canonical(from.ip()), from.port());
            let Some(dest) = self.peers.get(&from) else {
                metrics.dropped(UdpDrop::ForeignReply);
                continue;
            };
            if !self.rate.allow(&()) {
                metrics.dropped(UdpDrop::Rate);
                continue;
            }
            match assoc.send(dest, &buf[..n]) {
                Ok(()) => {
                    any = true;
                    self.counts[1] += 1;
                    self.counts[3] += n as u64;
                    metrics.carried(false, n);
                }
                Err(e) => metrics.dropped(UdpDrop::of(e)),
            }
        }
        any
    }
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}
