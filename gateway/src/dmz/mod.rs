//! The DMZ gateway: the only listener of the whole system.
//!
//! One port serves agents and connectors on distinct WebSocket paths under a prefix
//! (`{prefix}/agent`, `{prefix}/connector`) plus `{prefix}/healthz` (alive) and `{prefix}/readyz`
//! (503 while draining: on SIGTERM the instance drains for `drain_delay` before it sends its
//! sessions away). The accept loop only
//! accepts: a permit from a [`Semaphore`] is taken *before* `accept`, and everything slow (TLS,
//! the HTTP head, auth, the tunnel hello) runs in the connection's own task under one deadline,
//! so a silent client stalls nobody.
//!
//! Agent sessions open streams; for each, the DMZ picks a connector session whose advertised
//! routes cover the destination ([`crate::dmz::router`]), stamps the authenticated identity into the
//! `OPEN` (whatever the agent claimed is dropped), and relays ([`crate::dmz::relay`]).
//!
//! | file | job |
//! |---|---|
//! | `mod.rs` | the validated config, the listener and its accept loop, shutdown |
//! | `endpoints` | one connection: deadline, unauthenticated slot, TLS, head, dispatch by path |
//! | `upgrade` | the client's address, the WebSocket upgrade, the bearer token, sessions per token |
//! | [`fallback`], [`inner`] | the HTTP fallback endpoint; the inner channel's key and handshake |
//! | `session` | the tunnel hello within the deadline; cutting revoked sessions |
//! | `agent`, `connector` | an agent's session; a connector's session and its routes |
//! | `streams` | one agent stream: checks, routing, identity stamping, relay, audit |
//! | [`relay`], [`router`] | the hop-by-hop pump; which connector serves a destination |
//! | [`limits`], [`preauth`] | rates and counts; unauthenticated connections per address |
//! | `ops` | counters and live sessions for the admin listener ([`crate::admin`]), the admin page's view |
//!
//! Dependencies run one way: `endpoints` → `upgrade`/`fallback`/`inner` → `agent`/`connector`
//! → `session`/`streams` → `relay`/`router`, all reading `Shared`.

mod agent;
mod connector;
mod endpoints;
pub mod fallback;
pub mod inner;
pub mod limits;
pub(crate) mod ops;
pub mod preauth;
pub mod relay;
pub mod router;
mod session;
mod streams;
mod udp;
mod upgrade;
pub mod v2;

pub use upgrade::client_addr;

use self::limits::{Buckets, Counts, Limits};
use self::preauth::{HandshakeBudget, PreAuth};
use self::router::Router;
use crate::auth::ReloadingStore;
use ipnet::IpNet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, info_span, warn, Instrument};

/// Everything the DMZ needs, validated before any port is bound.
#[derive(Clone)]
pub struct DmzConfig {
    pub listen: SocketAddr,
    /// TLS on the listener; `None` when a load balancer in front terminates TLS.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Path prefix without trailing slash, e.g. "" or "/sallyport".
    pub prefix: String,
    pub agent_tokens: Arc<ReloadingStore>,
    pub connector_tokens: Arc<ReloadingStore>,
    /// Addresses of load balancers whose forwarded-address header we believe.
    pub trusted_proxies: Vec<IpNet>,
    /// Which header those load balancers set (the only one believed).
    pub forwarded_header: ForwardedHeader,
    pub instance_id: String,
    pub limits: Limits,
    /// Tunnel settings (windows, ping interval) for every session.
    pub session: tunnel::Config,
    /// How often token files are checked for changes.
    pub reload_every: Duration,
    /// The inner-channel key (see `tunnel::inner`): agents behind TLS-inspecting proxies run
    /// their session inside a Noise channel bound to it. `None`: inner sessions are refused.
    pub inner_key: Option<Arc<tunnel::inner::KeyPair>>,
    /// The key pin (`sha256/…`) of the listener's certificate, told to enrolling agents with
    /// the inner key, so they pin the gateway's own TLS key even when enrolling through an
    /// inspecting proxy. `None` behind a TLS-terminating load balancer.
    pub tls_key_pin: Option<String>,
    /// Protocol version 2 (see [`v2`]).
    pub v2: v2::V2Config,
    /// The admin listener (`/metrics`, the admin page); `None`: none.
    pub admin: Option<crate::admin::AdminConfig>,
    /// After `shutdown`, how long `/readyz` answers 503 while everything is still served,
    /// before the sessions are sent away (`GOAWAY`): the load balancer's health check takes the
    /// instance out meanwhile, so no new connection lands on an instance that is leaving.
    pub drain_delay: Duration,
}

impl std::fmt::Debug for DmzConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmzConfig")
            .field("listen", &self.listen)
            .field("tls", &self.tls.is_some())
            .field("prefix", &self.prefix)
            .field("agent_tokens", &self.agent_tokens.path())
            .field("connector_tokens", &self.connector_tokens.path())
            .field("instance_id", &self.instance_id)
            .field(
                "inner_key",
                &self.inner_key.as_ref().map(|k| k.public().to_string()),
            )
            .finish()
    }
}

/// The header a trusted load balancer writes the client's address into. Only that one is read:
/// a client can send the other (nginx passes a client's `Forwarded` through untouched), and
/// believing it would let the client pick its own address.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ForwardedHeader {
    /// `X-Forwarded-For` (nginx `$proxy_add_x_forwarded_for`, HAProxy `option forwardfor`, F5,
    /// Cloudflare).
    #[default]
    XForwardedFor,
    /// RFC 7239 `Forwarded: for=…` (HAProxy `option forwarded`, Envoy, some Kubernetes ingresses).
    Forwarded,
}

impl std::str::FromStr for ForwardedHeader {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "x-forwarded-for" => Ok(ForwardedHeader::XForwardedFor),
            "forwarded" => Ok(ForwardedHeader::Forwarded),
            _ => Err(format!(
                "forwarded header `{s}`: use x-forwarded-for or forwarded"
            )),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DmzError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Admin(#[from] crate::admin::AdminError),
}

/// State shared by every connection task.
pub(crate) struct Shared {
    pub(crate) config: DmzConfig,
    router: Router,
    tls: Option<TlsAcceptor>,
    /// Handshakes per client address, refunded when they authenticate.
    pub(crate) handshakes: HandshakeBudget,
    /// Unauthenticated connections per client address.
    pub(crate) preauth: Arc<PreAuth>,
    opens: Buckets<String>,
    /// Streams open at once per agent token.
    agent_streams: Arc<Counts<String>>,
    /// Datagram (SOCKS5 UDP) limits.
    udp: udp::UdpShared,
    /// Connector credentials whose route list was cut to the limit (logged once each).
    routes_capped: std::sync::Mutex<std::collections::HashSet<String>>,
    /// (connector token id, route) already warned about as not covered by the credential:
    /// each is said once, not on every session of that connector.
    routes_uncovered: std::sync::Mutex<std::collections::HashSet<(String, String)>>,
    agent_sessions: Arc<Counts<String>>,
    connector_sessions: Arc<Counts<String>>,
    streams: Arc<Semaphore>,
    /// Sessions over the HTTP fallback transport, by session id.
    pub(crate) http_sessions: Arc<tunnel::http::server::Registry>,
    pub(crate) tracker: TaskTracker,
    /// Cancelled when the sessions are to be sent away (after the drain delay).
    pub(crate) shutdown: CancellationToken,
    /// Counters and live sessions, for the admin listener.
    pub(crate) ops: ops::Ops,
    /// Set on shutdown: `/readyz` answers 503.
    pub(crate) draining: std::sync::atomic::AtomicBool,
    /// When the first session authenticated: from then on, for `limits.route_wait_at_start`,
    /// a stream that no connector serves *yet* may wait for one (see `streams`).
    pub(crate) first_session: std::sync::OnceLock<tokio::time::Instant>,
    /// Streams waiting so, per agent token and in all.
    pub(crate) waiting: Arc<Counts<String>>,
    pub(crate) waiting_all: Arc<Semaphore>,
}

/// A bound DMZ gateway, not yet serving.
pub struct Dmz {
    listener: TcpListener,
    config: DmzConfig,
    admin: Option<TcpListener>,
}

impl Dmz {
    pub async fn bind(config: DmzConfig) -> Result<Dmz, DmzError> {
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|source| DmzError::Bind {
                addr: config.listen,
                source,
            })?;
        let admin = match &config.admin {
            Some(a) => Some(crate::admin::bind(a).await?),
            None => None,
        };
        Ok(Dmz {
            listener,
            config,
            admin,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap_or(self.config.listen)
    }

    /// Where the admin listener (`/metrics`, the admin page) listens, if there is one.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Serves until `shutdown`; then drains: `/readyz` answers 503 for the drain delay while
    /// everything is still served, then the listener closes and every session gets
    /// `GOAWAY(shutdown)` (agents and connectors move to other instances) and is closed once its
    /// streams have ended, or after [`DRAIN_GRACE`].
    pub async fn serve(self, shutdown: CancellationToken) {
        let config = self.config;
        let drain_delay = config.drain_delay;
        // What ends the sessions and the accept loop: `shutdown`, delayed by the drain.
        let stop = CancellationToken::new();
        let limits = config.limits.clone();
        let shared = Arc::new(Shared {
            tls: config.tls.clone().map(TlsAcceptor::from),
            router: Router::default(),
            handshakes: HandshakeBudget::new(&limits, 65_536),
            preauth: PreAuth::new(limits.unauth_per_addr, 65_536),
            opens: Buckets::new(limits.opens_per_token, 65_536),
            agent_streams: Arc::new(Counts::new(limits.streams_per_token)),
            udp: udp::UdpShared::new(&limits),
            routes_capped: Default::default(),
            routes_uncovered: Default::default(),
            agent_sessions: Arc::new(Counts::new(limits.sessions_per_agent_token)),
            connector_sessions: Arc::new(Counts::new(limits.sessions_per_connector_token)),
            streams: Arc::new(Semaphore::new(
                limits.max_streams.min(Semaphore::MAX_PERMITS),
            )),
            http_sessions: tunnel::http::server::Registry::with_pending(
                limits.max_connections,
                limits.pending_inner_sessions,
                HTTP_DOWN_BUFFER,
            ),
            tracker: TaskTracker::new(),
            shutdown: stop.clone(),
            draining: Default::default(),
            first_session: Default::default(),
            waiting: Arc::new(Counts::new(limits.route_waiting_per_token)),
            waiting_all: Arc::new(Semaphore::new(
                limits.route_waiting.min(Semaphore::MAX_PERMITS),
            )),
            ops: ops::Ops::new(),
            config,
        });
        if let (Some(listener), Some(cfg)) = (self.admin, shared.config.admin.clone()) {
            let view = ops::DmzView {
                shared: Arc::downgrade(&shared),
                metrics: shared.ops.metrics.clone(),
                instance: shared.config.instance_id.clone(),
            };
            shared.tracker.spawn(crate::admin::serve(
                listener,
                cfg,
                Arc::new(view),
                // Metrics and the admin page stay up while the instance drains.
                shared.shutdown.clone(),
            ));
        }
        {
            let shared = shared.clone();
            tokio::spawn(async move {
                shutdown.cancelled().await;
                shared
                    .draining
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                if !drain_delay.is_zero() {
                    info!(delay = %humantime::format_duration(drain_delay), "draining: /readyz answers 503; sessions are sent to other instances after the delay");
                    tokio::time::sleep(drain_delay).await;
                }
                stop.cancel();
            });
        }
        for store in [&shared.config.agent_tokens, &shared.config.connector_tokens] {
            shared.tracker.spawn(
                store
                    .clone()
                    .watch(shared.config.reload_every, shared.shutdown.clone()),
            );
        }
        if let Some(revoked) = &shared.config.v2.revoked {
            shared.tracker.spawn(
                revoked
                    .clone()
                    .watch(shared.config.reload_every, shared.shutdown.clone()),
            );
            shared.tracker.spawn(watch_revocation_list(shared.clone()));
        }
        let permits = Arc::new(Semaphore::new(
            limits.max_connections.min(Semaphore::MAX_PERMITS),
        ));
        info!(
            addr = %self.listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            tls = shared.tls.is_some(),
            inner_key = %shared.config.inner_key.as_ref().map(|k| k.public().to_string()).unwrap_or_else(|| "none".into()),
            prefix = %shared.config.prefix,
            instance = %shared.config.instance_id,
            "dmz gateway listening"
        );
        loop {
            // Backpressure: no accept without a permit, so the number of connections (and the
            // memory they hold) is bounded.
            let permit = tokio::select! {
                _ = shared.shutdown.cancelled() => break,
                p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            };
            let (tcp, peer) = tokio::select! {
                _ = shared.shutdown.cancelled() => break,
                r = self.listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // EMFILE and friends: wait instead of spinning.
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let shared2 = shared.clone();
            shared.tracker.spawn(
                async move {
                    endpoints::handle_connection(shared2, tcp, peer).await;
                    drop(permit);
                }
                .instrument(info_span!("conn", %peer)),
            );
        }
        // New connections are refused from now on, not left waiting in the backlog of a
        // listener nobody accepts on (a balancer or a connector would wait for its timeout).
        drop(self.listener);
        shared.tracker.close();
        let _ =
            tokio::time::timeout(DRAIN_GRACE + Duration::from_secs(1), shared.tracker.wait()).await;
    }
}

/// After `GOAWAY(shutdown)`, how long a draining instance keeps carrying the streams that are
/// open (a download, an interactive session) before it closes their sessions.
pub const DRAIN_GRACE: Duration = Duration::from_secs(5);

/// Unacknowledged bytes an HTTP-transport session may hold for the agent (beyond it, the
/// session's writer waits: backpressure, not memory).
const HTTP_DOWN_BUFFER: usize = 4 * 1024 * 1024;

/// Binds and serves until `shutdown`.
pub async fn run(config: DmzConfig, shutdown: CancellationToken) -> Result<(), DmzError> {
    Dmz::bind(config).await?.serve(shutdown).await;
    Ok(())
}

/// Follows the signed revocation list: its signing time into the metrics, and, while it is
/// older than `v2.revoked_max_age` (tokens accepted by claims alone are refused), a warning
/// every minute.
async fn watch_revocation_list(shared: Arc<Shared>) {
    let Some(list) = shared.config.v2.revoked.clone() else {
        return;
    };
    let mut changes = list.subscribe();
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        shared
            .ops
            .metrics
            .revocation_list(changes.borrow_and_update().signed_at);
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            r = changes.changed() => if r.is_err() { return },
            _ = tick.tick() => {
                if let Some(why) = shared.config.v2.stale_list(std::time::SystemTime::now()) {
                    warn!("{why}");
                }
            }
        }
    }
}
