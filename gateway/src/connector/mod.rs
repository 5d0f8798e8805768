//! The connector: inside the trusted network, it dials *out* to the DMZ and listens on nothing.
//!
//! This file: the validated configuration, and `sessions` sessions kept up to the DMZ
//! (`uplink::keep`, shared with the agent: backoff with jitter, reset after a stable period),
//! each advertising its routes in-band. `streams`: each stream the DMZ opens (allow-list,
//! resolution, address checks, connect, copy, audit). `firstbytes`: a rule's protocol, checked
//! on the client's first bytes. `issuer`: token renewals, when this connector is the issuer.
//! `udp`: each datagram association (SOCKS5 UDP): the UDP allow-list, one socket, replies only
//! from peers it sent to.

mod firstbytes;
mod issuer;
pub mod resume;
mod streams;
mod udp;

pub use issuer::IssuerConfig;

use crate::policy::{Policy, Route};
use egress::{GatewayUrl, TlsOptions};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, info_span, Instrument};
use tunnel::Role;

/// The default `protocol_timeout`: a client that connects through a rule naming a protocol
/// and says nothing for this long is given up.
pub const PROTOCOL_TIMEOUT: Duration = Duration::from_secs(5);

/// Everything the connector needs, validated before anything is dialled.
#[derive(Clone)]
pub struct ConnectorConfig {
    /// The DMZ instances (`--gateway` repeated): the connector keeps `sessions` sessions to
    /// each, so that whichever instance an agent reaches can reach this site.
    pub gateways: Vec<GatewayUrl>,
    pub token: crate::auth::TokenSecret,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub policy: Arc<Policy>,
    /// The UDP allow-list (`--allow-udp`, `udp = [...]`): empty, no UDP at all.
    pub udp: Arc<Policy>,
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
    /// How long a client on a rule that names a protocol has to send the first bytes that
    /// are checked (`protocol_timeout`, default [`PROTOCOL_TIMEOUT`]).
    pub protocol_timeout: Duration,
    /// Where the token came from (its file, or `SALLYPORT_TOKEN`), for messages.
    pub token_source: String,
    /// `[tunnel] transport`, `http_mode`, `inner`, `websocket_masks` (as the agent's).
    pub transport: uplink::TransportChoice,
    pub http_mode: Option<tunnel::http::DownMode>,
    pub always_inner: bool,
    pub random_masks: bool,
    pub instance_id: String,
    pub session: tunnel::Config,
    /// A protocol v2 token (`sp2_…`, kind `connector`): the token-bound handshake, any outer
    /// certificate (the handshake authenticates the gateway), nothing secret sent.
    pub v2: Option<Arc<tunnel::token::Token>>,
    /// The admin listener (`/metrics`, the admin page), and what it shows.
    pub admin: Option<crate::admin::AdminConfig>,
    pub ops: Arc<crate::admin::connector::ConnectorOps>,
    /// `--renewal-key`: this connector is the issuer, answering token renewals only.
    pub issuer: Option<Arc<IssuerConfig>>,
    /// Resumable streams held here (`resume.rs`); its id is in every hello.
    pub resume: Arc<resume::Resumes>,
}

impl ConnectorConfig {
    /// How this connector reaches DMZ instance `gateway` and sets up its session (shared with
    /// the agent).
    pub fn uplink(&self, gateway: &GatewayUrl) -> uplink::Uplink {
        let mut session = self.session.clone();
        session.role = Role::Connector;
        session.instance_id = self.instance_id.clone();
        uplink::Uplink {
            gateway: gateway.clone(),
            failover: Vec::new(),
            way: self.way.clone(),
            tls: self.tls.clone(),
            connect_timeout: self.connect_timeout,
            session,
            credential: match &self.v2 {
                Some(t) => uplink::Credential::V2(uplink::TokenCell::new(t.clone())),
                // v1: `tls_config` admits only the DMZ's CA when `--ca` is given.
                None => uplink::Credential::V1(uplink::v1::V1 {
                    token: self.token.clone(),
                    trust: uplink::v1::Trust::Config,
                }),
            },
            token_source: self.token_source.clone(),
            transport: self.transport,
            http_mode: self.http_mode,
            always_inner: self.always_inner,
            random_masks: self.random_masks,
        }
    }
}

impl std::fmt::Debug for ConnectorConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectorConfig")
            .field(
                "gateways",
                &self
                    .gateways
                    .iter()
                    .map(|g| g.to_string())
                    .collect::<Vec<_>>(),
            )
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
    let udp = Arc::new(udp::UdpState::default());
    let gateways = config
        .gateways
        .iter()
        .map(|g| g.to_string())
        .collect::<Vec<_>>();
    info!(gateway = %gateways.join(" "), sessions = config.sessions, routes = %config.routes.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(" "), "connector starting");
    for (i, gateway) in config.gateways.iter().enumerate() {
        for n in 0..config.sessions.max(1) {
            let up = config.uplink(gateway);
            let config = config.clone();
            let udp = udp.clone();
            let shutdown = shutdown.clone();
            let tracker2 = tracker.clone();
            // With several instances, the span names which one (`dmz`: its place in the list).
            let span = if config.gateways.len() > 1 {
                info_span!("session", dmz = i, n)
            } else {
                info_span!("session", n)
            };
            tracker.spawn(
                async move { keep_session(config, udp, up, shutdown, tracker2).await }
                    .instrument(span),
            );
        }
    }
    tracker.close();
    tracker.wait().await;
}

async fn keep_session(
    config: Arc<ConnectorConfig>,
    udp: Arc<udp::UdpState>,
    up: uplink::Uplink,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let serve_one = |c: uplink::Connected, way: egress::probe::Candidate, _up| {
        let (config, shutdown, tracker, udp) = (&config, &shutdown, &tracker, &udp);
        async move {
            let _up = config.ops.up(&c, &way, c.took);
            c.session
                .advertise_routes(config.routes.iter().map(|r| r.to_string()).collect());
            let datagrams = udp::serve(config, udp, &c.session, shutdown, tracker);
            tokio::join!(
                streams::serve(config, &c.session, c.incoming, shutdown, tracker),
                datagrams
            );
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
