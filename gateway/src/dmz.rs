//! The DMZ gateway: the only listener of the whole system.
//!
//! One port serves agents and connectors on distinct WebSocket paths under a prefix
//! (`{prefix}/agent`, `{prefix}/connector`) plus `{prefix}/healthz`. The accept loop only
//! accepts: a permit from a [`Semaphore`] is taken *before* `accept`, and everything slow (TLS,
//! the HTTP head, auth, the tunnel hello) runs in the connection's own task under one deadline,
//! so a silent client stalls nobody.
//!
//! Agent sessions open streams; for each, the DMZ picks a connector session whose advertised
//! routes cover the destination ([`crate::router`]), stamps the authenticated identity into the
//! `OPEN` (whatever the agent claimed is dropped), and relays ([`crate::relay`]).

use crate::auth::{Identity, ReloadingStore, TokenStore};
use crate::http::{self, RequestHead};
use crate::limits::{Buckets, CountGuard, Counts, Limits};
use crate::policy::{self, Route};
use crate::relay::{pump, PumpEnd};
use crate::router::Router;
use ipnet::IpNet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, info_span, warn, Instrument};
use tunnel::{meta, ErrorCode, Role, Session, Stream};

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
    /// Addresses of load balancers whose `X-Forwarded-For` / `Forwarded` we believe.
    pub trusted_proxies: Vec<IpNet>,
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

#[derive(Debug, thiserror::Error)]
pub enum DmzError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// State shared by every connection task.
pub(crate) struct Shared {
    pub(crate) config: DmzConfig,
    router: Router,
    tls: Option<TlsAcceptor>,
    handshakes: Buckets<IpAddr>,
    opens: Buckets<String>,
    agent_sessions: Arc<Counts<String>>,
    connector_sessions: Arc<Counts<String>>,
    streams: Arc<Semaphore>,
    /// Sessions over the HTTP fallback transport, by session id.
    pub(crate) http_sessions: Arc<tunnel::http::server::Registry>,
    pub(crate) tracker: TaskTracker,
    pub(crate) shutdown: CancellationToken,
}

/// A bound DMZ gateway, not yet serving.
pub struct Dmz {
    listener: TcpListener,
    config: DmzConfig,
}

impl Dmz {
    pub async fn bind(config: DmzConfig) -> Result<Dmz, DmzError> {
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|source| DmzError::Bind {
                addr: config.listen,
                source,
            })?;
        Ok(Dmz { listener, config })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap_or(self.config.listen)
    }

    /// Serves until `shutdown`, then closes every session with `GOAWAY(shutdown)` and waits
    /// (briefly) for connection tasks to end.
    pub async fn serve(self, shutdown: CancellationToken) {
        let config = self.config;
        let limits = config.limits.clone();
        let shared = Arc::new(Shared {
            tls: config.tls.clone().map(TlsAcceptor::from),
            router: Router::default(),
            handshakes: Buckets::new(limits.handshakes_per_ip, 65_536),
            opens: Buckets::new(limits.opens_per_token, 65_536),
            agent_sessions: Arc::new(Counts::new(limits.sessions_per_agent_token)),
            connector_sessions: Arc::new(Counts::new(limits.sessions_per_connector_token)),
            streams: Arc::new(Semaphore::new(limits.max_streams)),
            http_sessions: tunnel::http::server::Registry::new(
                limits.max_connections,
                HTTP_DOWN_BUFFER,
            ),
            tracker: TaskTracker::new(),
            shutdown: shutdown.clone(),
            config,
        });
        for store in [&shared.config.agent_tokens, &shared.config.connector_tokens] {
            shared.tracker.spawn(
                store
                    .clone()
                    .watch(shared.config.reload_every, shutdown.clone()),
            );
        }
        let permits = Arc::new(Semaphore::new(limits.max_connections));
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
                _ = shutdown.cancelled() => break,
                p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            };
            let (tcp, peer) = tokio::select! {
                _ = shutdown.cancelled() => break,
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
                    handle_connection(shared2, tcp, peer).await;
                    drop(permit);
                }
                .instrument(info_span!("conn", %peer)),
            );
        }
        shared.tracker.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), shared.tracker.wait()).await;
    }
}

/// Unacknowledged bytes an HTTP-transport session may hold for the agent (beyond it, the
/// session's writer waits: backpressure, not memory).
const HTTP_DOWN_BUFFER: usize = 4 * 1024 * 1024;

/// Binds and serves until `shutdown`.
pub async fn run(config: DmzConfig, shutdown: CancellationToken) -> Result<(), DmzError> {
    Dmz::bind(config).await?.serve(shutdown).await;
    Ok(())
}

/// What an upgraded connection turned out to be.
enum Upgraded<S> {
    Agent(S, RequestHead, Identity, SocketAddr, CountGuard<String>),
    /// An agent that authenticates inside the inner channel (after the upgrade).
    InnerAgent(S, RequestHead, SocketAddr),
    Connector(S, RequestHead, Identity, SocketAddr, CountGuard<String>),
}

async fn handle_connection(shared: Arc<Shared>, tcp: TcpStream, peer: SocketAddr) {
    let _ = tcp.set_nodelay(true);
    if !shared.handshakes.allow(&peer.ip()) {
        debug!("handshake rate limit for this address");
        // Nothing read, nothing written: just close. Cheap for us, clear in the client's log.
        return;
    }
    let deadline = shared.config.limits.handshake_timeout;
    match &shared.tls {
        Some(acceptor) => {
            let acceptor = acceptor.clone();
            // rustls reads at most 4 KiB per call: buffer under it (one syscall per 64 KiB).
            let tcp = tokio::io::BufReader::with_capacity(egress::TLS_READ_BUFFER, tcp);
            let tls = match tokio::time::timeout(deadline, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    debug!(error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    debug!("TLS handshake timed out");
                    return;
                }
            };
            serve_http(shared, tls, peer).await
        }
        None => serve_http(shared, tcp, peer).await,
    }
}

async fn serve_http<S>(shared: Arc<Shared>, mut io: S, peer: SocketAddr)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let deadline = shared.config.limits.handshake_timeout;
    let head = match tokio::time::timeout(deadline, http::read_head(&mut io)).await {
        Ok(Ok(h)) => h,
        Ok(Err(http::HeadError::TooLarge)) => {
            let _ = http::respond(&mut io, 431, &[], "sallyport: request head too large\n").await;
            return;
        }
        Ok(Err(e)) => {
            debug!(error = %e, "bad request head");
            let _ = http::respond(&mut io, 400, &[], "sallyport: bad request\n").await;
            return;
        }
        Err(_) => {
            debug!("no request head within the handshake deadline");
            return;
        }
    };
    let client = client_addr(&shared.config.trusted_proxies, peer, &head);
    let prefix = &shared.config.prefix;
    let path = head.path_only().to_string();
    let Some(endpoint) = path.strip_prefix(prefix.as_str()) else {
        let _ = http::respond(&mut io, 404, &[], "sallyport: not found\n").await;
        return;
    };
    if endpoint == "/agent/http" || endpoint.starts_with("/agent/http/") {
        // The fallback transport: ordinary requests, served by a full HTTP server.
        crate::fallback::serve(shared, io, head, client).await;
        return;
    }
    match endpoint {
        "/key" => match &shared.config.inner_key {
            Some(k) => {
                let mut body = format!("inner {}\n", k.public());
                if let Some(pin) = &shared.config.tls_key_pin {
                    body.push_str(&format!("tls {pin}\n"));
                }
                let _ = http::respond(&mut io, 200, &[], &body).await;
            }
            None => {
                let _ = http::respond(
                    &mut io,
                    404,
                    &[],
                    "sallyport: this gateway has no inner key configured\n",
                )
                .await;
            }
        },
        "/healthz" => {
            let body = format!(
                "ok\ninstance {}\nconnector sessions {}\n",
                shared.config.instance_id,
                shared.router.sessions()
            );
            let _ = http::respond(&mut io, 200, &[], &body).await;
        }
        "/agent" | "/connector" => {
            let is_agent = endpoint == "/agent";
            let inner = is_agent && head.query_has("inner", "1");
            let up = match upgrade(&shared, io, head, client, is_agent, inner).await {
                Some(u) => u,
                None => return,
            };
            let span = info_span!("session", client = %client);
            match up {
                Upgraded::Agent(io, head, id, client, slot) => {
                    let max_frame = shared.config.session.max_frame;
                    let t = tunnel::ws::WsTransport::server(io, head.leftover, max_frame).await;
                    agent_session(shared, t, id, client, slot)
                        .instrument(span)
                        .await
                }
                Upgraded::InnerAgent(io, head, client) => {
                    let max_frame = shared.config.session.max_frame;
                    let t = tunnel::ws::WsTransport::server(io, head.leftover, max_frame).await;
                    async {
                        // Hello and token within one handshake deadline.
                        let deadline =
                            tokio::time::Instant::now() + shared.config.limits.handshake_timeout;
                        let Some(t) = crate::inner::handshake(&shared, t, deadline).await else {
                            return;
                        };
                        if let Some((t, id, slot)) =
                            crate::inner::authenticate(&shared, t, client, deadline).await
                        {
                            agent_session(shared.clone(), t, id, client, slot).await
                        }
                    }
                    .instrument(span)
                    .await
                }
                Upgraded::Connector(io, head, id, client, slot) => {
                    connector_session(shared, io, head.leftover, id, client, slot)
                        .instrument(span)
                        .await
                }
            }
        }
        _ => {
            let _ = http::respond(&mut io, 404, &[], "sallyport: not found\n").await;
        }
    }
}

/// The client's real address: the TCP peer, or, when the peer is a trusted load balancer, the
/// right-most address in `X-Forwarded-For` / `Forwarded` that is not itself trusted.
pub fn client_addr(trusted: &[IpNet], peer: SocketAddr, head: &RequestHead) -> SocketAddr {
    let is_trusted = |ip: &IpAddr| {
        trusted
            .iter()
            .any(|n| n.contains(&policy::canonical_ip(*ip)))
    };
    if !is_trusted(&peer.ip()) {
        return peer;
    }
    let mut chain: Vec<IpAddr> = Vec::new();
    for (k, v) in &head.headers {
        if k.eq_ignore_ascii_case("x-forwarded-for") {
            chain.extend(v.split(',').filter_map(|s| s.trim().parse::<IpAddr>().ok()));
        } else if k.eq_ignore_ascii_case("forwarded") {
            for part in v.split([',', ';']) {
                if let Some(f) = part
                    .trim()
                    .strip_prefix("for=")
                    .or_else(|| part.trim().strip_prefix("For="))
                {
                    let f = f.trim_matches('"');
                    let f = f
                        .strip_prefix('[')
                        .map(|x| x.split(']').next().unwrap_or(x))
                        .unwrap_or(f);
                    if let Ok(ip) = f.parse::<IpAddr>() {
                        chain.push(ip);
                    } else if let Ok(sa) = f.parse::<SocketAddr>() {
                        chain.push(sa.ip());
                    }
                }
            }
        }
    }
    match chain.iter().rev().find(|ip| !is_trusted(ip)) {
        Some(ip) => SocketAddr::new(*ip, 0),
        None => peer,
    }
}

/// Validates the upgrade request and the token; answers 101 or a reasoned refusal.
async fn upgrade<S>(
    shared: &Shared,
    mut io: S,
    head: RequestHead,
    client: SocketAddr,
    is_agent: bool,
    inner: bool,
) -> Option<Upgraded<S>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let is_ws = head.method == "GET"
        && head.header_has("upgrade", "websocket")
        && head.header_has("connection", "upgrade");
    let key = head.header("sec-websocket-key").map(str::to_string);
    if !is_ws || key.is_none() {
        debug!(method = %head.method, "request without a WebSocket upgrade");
        let _ = http::respond(
            &mut io,
            426,
            &[("upgrade", "websocket")],
            "sallyport: expected a WebSocket upgrade; a proxy on the way may have stripped it\n",
        )
        .await;
        return None;
    }
    if head.header("sec-websocket-version") != Some("13") {
        let _ = http::respond(
            &mut io,
            426,
            &[("sec-websocket-version", "13")],
            "sallyport: WebSocket version 13 required\n",
        )
        .await;
        return None;
    }
    let accept = tunnel::ws::accept_key(key.unwrap_or_default().as_bytes());
    if inner {
        // The token comes later, inside the channel: nothing readable on the way.
        if let Err(e) = http::switch_to_websocket(&mut io, &accept).await {
            debug!(error = %e, "client left during the upgrade");
            return None;
        }
        return Some(Upgraded::InnerAgent(io, head, client));
    }
    let presented = bearer(head.header("authorization"));
    let identity = match verify_token(shared, presented, client, is_agent) {
        Ok(id) => id,
        Err(msg) => {
            let _ = http::respond(
                &mut io,
                401,
                &[("www-authenticate", "Bearer realm=\"sallyport\"")],
                &format!("sallyport: {msg}\n"),
            )
            .await;
            return None;
        }
    };
    // Sessions per token are counted before the upgrade, so a refusal is a plain HTTP 429.
    let Some(slot) = count_session(shared, &identity, is_agent) else {
        let _ = http::respond(
            &mut io,
            429,
            &[],
            "sallyport: too many sessions for this token\n",
        )
        .await;
        return None;
    };
    if let Err(e) = http::switch_to_websocket(&mut io, &accept).await {
        debug!(error = %e, "client left during the upgrade");
        return None;
    }
    Some(if is_agent {
        Upgraded::Agent(io, head, identity, client, slot)
    } else {
        Upgraded::Connector(io, head, identity, client, slot)
    })
}

/// The token of an `Authorization: Bearer …` header value ("" when there is none).
pub(crate) fn bearer(header: Option<&str>) -> &str {
    header
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .unwrap_or("")
}

/// Checks a presented token; `Err` is the one line the client is told (the detailed reason
/// goes to our log only).
pub(crate) fn verify_token(
    shared: &Shared,
    presented: &str,
    client: SocketAddr,
    is_agent: bool,
) -> Result<Identity, &'static str> {
    let store: Arc<TokenStore> = if is_agent {
        shared.config.agent_tokens.current()
    } else {
        shared.config.connector_tokens.current()
    };
    store.verify(presented, SystemTime::now()).map_err(|e| {
        warn!(%client, role = if is_agent { "agent" } else { "connector" }, reason = %e, "refused token");
        e.client_message()
    })
}

/// Counts a session against its token's limit; `None` when the limit is reached.
pub(crate) fn count_session(
    shared: &Shared,
    id: &Identity,
    is_agent: bool,
) -> Option<CountGuard<String>> {
    let counts = if is_agent {
        &shared.agent_sessions
    } else {
        &shared.connector_sessions
    };
    let slot = counts.acquire(&id.token_id);
    if slot.is_none() {
        warn!(token = %id.token_id, role = if is_agent { "agent" } else { "connector" }, "session limit per token reached");
    }
    slot
}

async fn start_session<T: tunnel::Transport>(
    shared: &Shared,
    transport: T,
    accept_streams: bool,
) -> Option<(Session, tunnel::Incoming)> {
    let mut cfg = shared.config.session.clone();
    cfg.role = Role::Dmz;
    cfg.initiator = false;
    cfg.instance_id = shared.config.instance_id.clone();
    cfg.accept_streams = accept_streams;
    cfg.max_incoming_streams = shared.config.limits.streams_per_session;
    match tokio::time::timeout(
        shared.config.limits.handshake_timeout,
        Session::start(transport, cfg),
    )
    .await
    {
        Ok(Ok(s)) => Some(s),
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

/// Closes `session` when its token is revoked or expires, or when the gateway shuts down.
async fn guard_session(
    shared: &Shared,
    session: &Session,
    store: &Arc<ReloadingStore>,
    id: &Identity,
) {
    let mut changes = store.subscribe();
    let mut tick = tokio::time::interval(Duration::from_secs(30));
    loop {
        tokio::select! {
            _ = session.closed() => return,
            _ = shared.shutdown.cancelled() => {
                session.close(ErrorCode::Shutdown, "gateway shutting down");
                return;
            }
            r = changes.changed() => if r.is_err() { return },
            _ = tick.tick() => {}
        }
        if !store.current().is_valid(id, SystemTime::now()) {
            warn!(token = %id.token_id, "token revoked or expired: cutting its session");
            session.close(ErrorCode::Unauthorized, "token revoked or expired");
            return;
        }
    }
}

/// An agent's session, over any transport (WebSocket or HTTP, inside the inner channel or not).
pub(crate) async fn agent_session<T: tunnel::Transport>(
    shared: Arc<Shared>,
    transport: T,
    id: Identity,
    client: SocketAddr,
    _slot: CountGuard<String>,
) {
    let Some((session, mut incoming)) = start_session(&shared, transport, true).await else {
        return;
    };
    info!(token = %id.token_id, name = %id.name, agent = %session.peer().instance_id, "agent session up");
    let id = Arc::new(id);
    let streams = async {
        while let Some(stream) = incoming.accept().await {
            let shared2 = shared.clone();
            let id2 = id.clone();
            let agent = session.peer().instance_id.clone();
            shared.tracker.spawn(async move {
                route_stream(shared2, stream, id2, client, agent).await;
            });
        }
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
        _ = advertise => {}
        _ = guard_session(&shared, &session, &shared.config.agent_tokens, &id) => {}
    }
    let why = session.closed().await;
    info!(token = %id.token_id, reason = %why, "agent session ended");
}

async fn connector_session<S>(
    shared: Arc<Shared>,
    io: S,
    leftover: Vec<u8>,
    id: Identity,
    client: SocketAddr,
    _slot: CountGuard<String>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // Connectors never open streams towards the DMZ.
    let transport =
        tunnel::ws::WsTransport::server(io, leftover, shared.config.session.max_frame).await;
    let Some((session, _incoming)) = start_session(&shared, transport, false).await else {
        return;
    };
    let key = shared.router.add(&id.token_id, session.clone());
    info!(connector = %id.token_id, instance = %session.peer().instance_id, %client, "connector session up");
    let mut routes = session.peer_routes();
    let watch_routes = async {
        loop {
            let advertised = routes.borrow_and_update().clone();
            let mut accepted: Vec<Route> = Vec::new();
            for text in &advertised {
                match text.parse::<Route>() {
                    Ok(r) if id.routes.iter().any(|allowed| allowed.covers(&r)) => accepted.push(r),
                    Ok(r) => {
                        warn!(connector = %id.token_id, route = %r, "route not covered by this connector's credential: ignored")
                    }
                    Err(e) => {
                        warn!(connector = %id.token_id, error = %e, "unparsable route ignored")
                    }
                }
            }
            if !advertised.is_empty() {
                info!(connector = %id.token_id, routes = %accepted.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(" "), "connector routes");
            }
            shared.router.set_routes(key, accepted);
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

/// Routes one agent stream to a connector, stamps identity, relays, and audits.
async fn route_stream(
    shared: Arc<Shared>,
    stream: Stream,
    id: Arc<Identity>,
    client: SocketAddr,
    agent: String,
) {
    let Some(req) = stream.request().cloned() else {
        return;
    };
    let dest = req.dest.clone();
    let started = Instant::now();
    let client_ip = client.ip();
    // Every refusal is audited with the same fields as an open, then answered with OPEN_ERR.
    let refuse = |stream: Stream, code: ErrorCode, reason: String| {
        info!(target: "audit", event = "refused", token = %id.token_id, name = %id.name, client = %client_ip, %agent, %dest, %code, %reason, "stream refused");
        stream.reject(code, &reason);
    };
    let host = match policy::parse_host(&dest.host) {
        Ok(h) => h,
        Err(e) => return refuse(stream, ErrorCode::NotAllowed, e.to_string()),
    };
    if !shared.opens.allow(&id.token_id) {
        return refuse(
            stream,
            ErrorCode::Limit,
            "too many new streams per second for this token".into(),
        );
    }
    let Ok(_permit) = shared.streams.clone().try_acquire_owned() else {
        return refuse(
            stream,
            ErrorCode::Limit,
            "gateway is at its stream limit".into(),
        );
    };
    let Some(chosen) = shared.router.pick(&host, dest.port) else {
        return refuse(
            stream,
            ErrorCode::NoRoute,
            format!("no connector serves {dest}"),
        );
    };
    let mut m = req.meta.clone();
    m.remove_prefix(meta::IDENTITY_PREFIX);
    m.set(meta::TOKEN_ID, id.token_id.clone());
    m.set(meta::NAME, id.name.clone());
    m.set(meta::GROUPS, id.groups.join(","));
    m.set(meta::CLIENT_ADDR, client_ip.to_string());
    m.set(meta::DMZ_INSTANCE, shared.config.instance_id.clone());
    let upstream = match chosen.session.open(dest.clone(), m) {
        Ok(s) => s,
        Err(e) => {
            return refuse(
                stream,
                ErrorCode::NoRoute,
                format!("connector session unavailable: {e}"),
            )
        }
    };
    info!(target: "audit", event = "open", token = %id.token_id, name = %id.name, client = %client_ip, %agent, %dest, connector = %chosen.connector, "stream open");
    // Early data from the agent flows at once (`up` starts now); data back flows only after
    // the connector's answer, which is relayed to the agent first.
    let up = pump(&stream, &upstream);
    let rest = async {
        match upstream.opened().await {
            Ok(()) => {
                stream.accept();
                Ok(pump(&upstream, &stream).await)
            }
            Err(e) => {
                stream.refuse(e.code(), &e.to_string());
                Err(e)
            }
        }
    };
    let (up_end, rest) = tokio::join!(up, rest);
    let bytes_up = stream.byte_counts().0;
    let bytes_down = upstream.byte_counts().0;
    let why = |p: &PumpEnd| match p {
        PumpEnd::SourceFailed(e) | PumpEnd::DestFailed(e) => Some(e.to_string()),
        PumpEnd::Done => None,
    };
    let outcome = match &rest {
        Err(e) => format!("refused: {e}"),
        Ok(down_end) => match why(&up_end).or_else(|| why(down_end)) {
            None => "closed".to_string(),
            Some(e) => format!("reset: {e}"),
        },
    };
    info!(
        target: "audit", event = "close", token = %id.token_id, name = %id.name, client = %client_ip, %agent, %dest,
        connector = %chosen.connector, bytes_up, bytes_down, duration_ms = started.elapsed().as_millis() as u64,
        %outcome, "stream closed"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(headers: &[(&str, &str)]) -> RequestHead {
        RequestHead {
            method: "GET".into(),
            path: "/agent".into(),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            leftover: vec![],
            raw: vec![],
        }
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_load_balancers() {
        let lb: SocketAddr = "10.0.0.5:4000".parse().unwrap();
        let trusted: Vec<IpNet> = vec!["10.0.0.0/24".parse().unwrap()];
        let h = head(&[("X-Forwarded-For", "203.0.113.9, 10.0.0.7")]);
        assert_eq!(
            client_addr(&trusted, lb, &h).ip().to_string(),
            "203.0.113.9"
        );
        // From an untrusted peer the header is a claim, not a fact.
        let other: SocketAddr = "198.51.100.1:4000".parse().unwrap();
        assert_eq!(client_addr(&trusted, other, &h), other);
        let h = head(&[("Forwarded", "for=\"[2001:db8::1]:4711\";proto=https")]);
        assert_eq!(
            client_addr(&trusted, lb, &h).ip().to_string(),
            "2001:db8::1"
        );
    }
}
