//! The connector: inside the trusted network, it dials *out* to the DMZ and listens on nothing.
//!
//! It keeps `sessions` sessions up (reconnecting with exponential backoff and jitter, reset
//! after a stable period), advertises its routes in-band, and for each stream the DMZ opens:
//! checks the allow-list against the identity the DMZ stamped, resolves the name itself, checks
//! every resolved address (loopback, link-local and its own addresses denied unless listed),
//! connects with a timeout, answers `OPEN_OK`/`OPEN_ERR`, and copies bytes both ways.

use crate::policy::{self, Host, Policy, Route, Who};
use egress::{GatewayUrl, TlsOptions};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, info_span, Instrument};
use tunnel::{meta, ErrorCode, Role, Session, Stream};

/// Everything the connector needs, validated before anything is dialled.
#[derive(Clone)]
pub struct ConnectorConfig {
    pub gateway: GatewayUrl,
    pub token: crate::auth::TokenSecret,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub policy: Arc<Policy>,
    /// Routes advertised to the DMZ (by default, the allow-list's routes).
    pub routes: Vec<Route>,
    /// How to reach the DMZ (a trusted network may force its own proxy too): candidates,
    /// probing and what worked (see `egress::probe`).
    pub way: Arc<egress::Way>,
    /// Static name → address entries consulted before DNS (like curl's `--resolve`).
    pub hosts: HashMap<String, Vec<IpAddr>>,
    /// Sessions kept up to the gateway.
    pub sessions: usize,
    pub connect_timeout: Duration,
    /// `[tunnel] transport`, `http_mode`, `inner` (as the agent's).
    pub transport: uplink::TransportChoice,
    pub http_mode: Option<tunnel::http::DownMode>,
    pub always_inner: bool,
    pub instance_id: String,
    pub session: tunnel::Config,
    /// A protocol v2 token (`sp2_…`, kind `connector`): the token-bound handshake, any outer
    /// certificate (the handshake authenticates the gateway), nothing secret sent.
    pub v2: Option<Arc<tunnel::token::Token>>,
    /// The admin listener (`/metrics`, the admin page), and what it shows.
    pub admin: Option<crate::admin::AdminConfig>,
    pub ops: Arc<crate::admin::connector::ConnectorOps>,
}

impl ConnectorConfig {
    /// How this connector reaches the gateway and sets up its session (shared with the agent).
    pub fn uplink(&self) -> uplink::Uplink {
        let mut session = self.session.clone();
        session.role = Role::Connector;
        session.instance_id = self.instance_id.clone();
        uplink::Uplink {
            gateway: self.gateway.clone(),
            way: self.way.clone(),
            tls: self.tls.clone(),
            connect_timeout: self.connect_timeout,
            session,
            credential: match &self.v2 {
                Some(t) => uplink::Credential::V2(t.clone()),
                // v1: `tls_config` admits only the DMZ's CA when `--ca` is given.
                None => uplink::Credential::V1(uplink::v1::V1 {
                    token: self.token.clone(),
                    trust: uplink::v1::Trust::Config,
                }),
            },
            transport: self.transport,
            http_mode: self.http_mode,
            always_inner: self.always_inner,
        }
    }
}

impl std::fmt::Debug for ConnectorConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectorConfig")
            .field("gateway", &self.gateway.to_string())
            .field("token", &self.token)
            .field(
                "routes",
                &self
                    .routes
                    .iter()
                    .map(|r| r.to_string())
                    .collect::<Vec<_>>(),
            )
            .field("sessions", &self.sessions)
            .finish()
    }
}

/// Builds the TLS client configuration: with a CA file the connector pins it (trusts only it).
pub fn tls_config(
    ca: Option<&std::path::Path>,
) -> Result<Arc<rustls::ClientConfig>, egress::EgressError> {
    egress::client_config(&TlsOptions {
        ca: ca.map(|p| p.to_path_buf()),
        pin: true,
        key_pin: None,
        inner_channel: false,
        any_certificate: false,
    })
}

/// The TLS client configuration with a v2 token: any certificate (the handshake inside
/// authenticates the gateway by the key in the token), so a TLS-inspecting egress at the
/// trusted site does not stop the connector, and reads nothing.
pub fn tls_config_v2() -> Result<Arc<rustls::ClientConfig>, egress::EgressError> {
    egress::client_config(&TlsOptions {
        any_certificate: true,
        ..Default::default()
    })
}

/// Runs until `shutdown`.
pub async fn run(config: ConnectorConfig, shutdown: CancellationToken) {
    let tracker = TaskTracker::new();
    let config = Arc::new(config);
    info!(gateway = %config.gateway, sessions = config.sessions, routes = %config.routes.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(" "), "connector starting");
    for n in 0..config.sessions.max(1) {
        let config = config.clone();
        let shutdown = shutdown.clone();
        let tracker2 = tracker.clone();
        tracker.spawn(
            async move { keep_session(config, shutdown, tracker2).await }
                .instrument(info_span!("session", n)),
        );
    }
    tracker.close();
    tracker.wait().await;
}

async fn keep_session(
    config: Arc<ConnectorConfig>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let up = config.uplink();
    let serve_one = |c: uplink::Connected, way: egress::Candidate| {
        let (config, shutdown, tracker) = (&config, &shutdown, &tracker);
        async move {
            let _up = config.ops.up(&c, &way, c.took);
            c.session
                .advertise_routes(config.routes.iter().map(|r| r.to_string()).collect());
            serve(config, &c.session, c.incoming, shutdown, tracker).await;
            let why = c.session.closed().await;
            if shutdown.is_cancelled() {
                uplink::Ended::Shutdown
            } else {
                uplink::Ended::Lost(why)
            }
        }
    };
    uplink::keep(&up, "the connector", &shutdown, serve_one, |_| {}).await;
}

async fn serve(
    config: &Arc<ConnectorConfig>,
    session: &Session,
    mut incoming: tunnel::Incoming,
    shutdown: &CancellationToken,
    tracker: &TaskTracker,
) {
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => {
                session.close(ErrorCode::Shutdown, "connector shutting down");
                return;
            }
            s = incoming.accept() => match s { Some(s) => s, None => return },
        };
        let config = config.clone();
        tracker.spawn(async move { handle_stream(config, stream).await }.in_current_span());
    }
}

/// A refusal: code for the wire, reason for the user.
struct Refusal(ErrorCode, String);

async fn handle_stream(config: Arc<ConnectorConfig>, stream: Stream) {
    let Some(req) = stream.request().cloned() else {
        return;
    };
    let dest = req.dest.clone();
    let user = req.meta.get(meta::NAME).unwrap_or("").to_string();
    let token = req.meta.get(meta::TOKEN_ID).unwrap_or("").to_string();
    let client = req.meta.get(meta::CLIENT_ADDR).unwrap_or("").to_string();
    let groups: Vec<String> = req
        .meta
        .get(meta::GROUPS)
        .unwrap_or("")
        .split(',')
        .filter(|g| !g.is_empty())
        .map(str::to_string)
        .collect();
    let started = Instant::now();
    let who = Who {
        user: &user,
        groups: &groups,
    };
    let tcp = match dial_checked(&config, &dest, &who).await {
        Ok((tcp, addr)) => {
            info!(target: "audit", event = "open", %token, name = %user, %client, %dest, %addr, "stream open");
            tcp
        }
        Err(Refusal(code, reason)) => {
            info!(target: "audit", event = "refused", %token, name = %user, %client, %dest, %code, %reason, "stream refused");
            let who = crate::logsafe::Clean(&user).to_string();
            config
                .ops
                .metrics
                .refused(code, &who, &dest.to_string(), &reason);
            stream.reject(code, &reason);
            return;
        }
    };
    stream.accept();
    let _open = config.ops.metrics.stream_open();
    let mut tcp = tcp;
    let mut stream = stream;
    // A reset from the agent side must end the copy even while the service is not reading
    // (the copy would not poll the tunnel again until the service made room).
    let failure = stream.failure();
    let result = tokio::select! {
        r = tokio::io::copy_bidirectional_with_sizes(&mut stream, &mut tcp, 64 * 1024, 64 * 1024) => r,
        e = failure => Err(std::io::Error::new(std::io::ErrorKind::ConnectionReset, e)),
    };
    let (up, down) = stream.byte_counts();
    config.ops.metrics.bytes(up, down);
    let outcome = match &result {
        Ok(_) => "closed".to_string(),
        Err(e) => format!("reset: {e}"),
    };
    info!(
        target: "audit", event = "close", %token, name = %user, %client, %dest, bytes_up = up, bytes_down = down,
        duration_ms = started.elapsed().as_millis() as u64, %outcome, "stream closed"
    );
    if result.is_err() {
        stream.reset(ErrorCode::Cancel, "connection to the service failed");
    }
}

/// Policy check, resolution, per-address check, connect.
async fn dial_checked(
    config: &ConnectorConfig,
    dest: &tunnel::Dest,
    who: &Who<'_>,
) -> Result<(TcpStream, SocketAddr), Refusal> {
    let host = policy::parse_host(&dest.host)
        .map_err(|e| Refusal(ErrorCode::NotAllowed, e.to_string()))?;
    config
        .policy
        .check(&host, dest.port, who)
        .map_err(|d| Refusal(ErrorCode::NotAllowed, d.reason))?;
    let addrs: Vec<IpAddr> = match &host {
        Host::Ip(ip) => vec![*ip],
        Host::Name(name) => match config.hosts.get(name) {
            Some(a) => a.clone(),
            None => {
                let lookup = tokio::net::lookup_host((name.as_str(), dest.port));
                match tokio::time::timeout(config.connect_timeout, lookup).await {
                    Ok(Ok(it)) => it.map(|sa| sa.ip()).collect(),
                    Ok(Err(e)) => {
                        return Err(Refusal(
                            ErrorCode::HostNotFound,
                            format!("cannot resolve {name} inside the trusted network: {e}"),
                        ))
                    }
                    Err(_) => {
                        return Err(Refusal(
                            ErrorCode::TimedOut,
                            format!("resolving {name} timed out"),
                        ))
                    }
                }
            }
        },
    };
    let mut allowed = Vec::new();
    let mut denial = None;
    for a in addrs {
        match config.policy.check_resolved(&host, dest.port, who, a) {
            Ok(()) => allowed.push(a),
            Err(d) => denial = denial.or(Some(d.reason)),
        }
    }
    if allowed.is_empty() {
        return Err(Refusal(
            ErrorCode::NotAllowed,
            denial.unwrap_or_else(|| format!("{} resolved to no address", dest.host)),
        ));
    }
    // Each address gets its own share of the timeout (at least a second), so a silently dropped
    // IPv6 path does not eat the time of the IPv4 address behind it.
    let per_address =
        (config.connect_timeout / allowed.len() as u32).max(std::time::Duration::from_secs(1));
    let mut last = None;
    for ip in allowed {
        let addr = SocketAddr::new(ip, dest.port);
        match tokio::time::timeout(per_address, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                return Ok((s, addr));
            }
            Ok(Err(e)) => last = Some(e),
            Err(_) => {
                last = Some(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no answer within {per_address:?}"),
                ))
            }
        }
    }
    let e = last.unwrap_or_else(|| std::io::Error::other("no address"));
    let code = match e.kind() {
        std::io::ErrorKind::ConnectionRefused => ErrorCode::Refused,
        std::io::ErrorKind::TimedOut => ErrorCode::TimedOut,
        _ => ErrorCode::Unreachable,
    };
    let what = match code {
        ErrorCode::Refused => "connection refused by",
        ErrorCode::TimedOut => "connection timed out to",
        _ => "cannot reach",
    };
    Err(Refusal(code, format!("{what} {dest} ({e})")))
}
