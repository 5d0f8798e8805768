//! # sallyport: the desktop agent
//!
//! Apps point at the agent's local SOCKS5 or HTTP proxy port, or at a static forward; the agent
//! carries every app connection as a stream inside a long-lived session to the DMZ gateway.
//!
//! | file | what |
//! |---|---|
//! | [`config`] | flags + TOML → validated [`config::AgentConfig`] |
//! | [`pool`] | the session to the gateway: transport (WebSocket, HTTP fallback), inner channel or not, whether the token may be sent, reconnecting in the background |
//! | [`dialer`] | opens tunnel streams for the front ends; maps tunnel errors to SOCKS5/HTTP |
//! | [`netwatch`] | network changes (Linux netlink, Windows notifications) and wakes from sleep: re-probe the way out and move to a new session at once |
//! | [`listen`] | local listeners (SOCKS5, HTTP, forwards) with the same-user check on every connection |
//! | [`peer`] | who owns a local TCP connection (Linux netlink / `/proc/net/tcp`; Windows, macOS) |
//! | [`udp`] | SOCKS5 `UDP ASSOCIATE`: relay sockets, the same-user check per datagram, the tunnel association |
//! | [`connect`] | `sallyport connect HOST PORT` for ssh's `ProxyCommand` |
//! | [`doctor`] | `sallyport doctor`: every way out, tried and explained |
//! | [`enroll`] | `sallyport enroll` / `logout`: token, CA and key pins saved for later runs |
//! | [`pages`] | the HTTP port's local pages: the PAC file for browsers, the status page |
//! | [`status`] | `sallyport status` and its per-user control socket (Windows: a named pipe) |
//! | `demo` | `sallyport demo`: the whole system on loopback |

pub mod config;
pub mod connect;
#[cfg(feature = "demo")]
pub mod demo;
pub mod dialer;
pub mod doctor;
pub mod enroll;
pub mod known;
pub mod listen;
pub mod netwatch;
pub mod pages;
pub mod peer;
pub mod pool;
pub mod renew;
pub mod status;
pub mod udp;

use config::AgentConfig;
use dialer::TunnelDialer;
use listen::{Front, ListenError, Listener};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

/// An agent whose ports are bound, not yet serving.
pub struct Agent {
    config: Arc<AgentConfig>,
    listeners: Vec<Listener>,
}

impl Agent {
    /// Binds every configured port (and fails before serving anything if one cannot be bound).
    pub async fn bind(config: AgentConfig) -> Result<Agent, ListenError> {
        let mut listeners = Vec::new();
        if let Some(a) = config.socks {
            listeners.push(Listener {
                listener: listen::bind(a).await?,
                front: Front::Socks5,
            });
        }
        if let Some(a) = config.http {
            listeners.push(Listener {
                listener: listen::bind(a).await?,
                front: Front::Http,
            });
        }
        for f in &config.forwards {
            listeners.push(Listener {
                listener: listen::bind(f.listen).await?,
                front: Front::Forward(f.dest.clone()),
            });
        }
        Ok(Agent {
            config: Arc::new(config),
            listeners,
        })
    }

    /// The bound addresses, by front end (`socks5`, `http`, `forward`).
    pub fn addrs(&self) -> Vec<(&'static str, SocketAddr)> {
        self.listeners
            .iter()
            .filter_map(|l| l.listener.local_addr().ok().map(|a| (l.front.name(), a)))
            .collect()
    }

    /// Serves until `shutdown`.
    pub async fn serve(self, shutdown: CancellationToken) {
        for line in self.config.way.egress().auth.policy.describe() {
            info!("{line}");
        }
        let pool = pool::Pool::start(self.config.clone(), shutdown.clone());
        let tracker = TaskTracker::new();
        tracker.spawn(renew::run(
            pool.clone(),
            self.config.clone(),
            shutdown.clone(),
        ));
        tracker.spawn(netwatch::react::run(pool.clone(), shutdown.clone()));
        tracker.spawn(uplink::cli::give_back_when_quiet(
            uplink::cli::AGENT_TRANSFER,
            shutdown.clone(),
        ));
        let pages: Arc<dyn socks::LocalPages> = Arc::new(pages::Pages {
            config: self.config.clone(),
            pool: pool.clone(),
            listening: self.addrs(),
        });
        #[cfg(any(unix, windows))]
        if let Some(path) = self.config.control.clone() {
            tracker.spawn(status::serve(
                path,
                self.config.clone(),
                pool.clone(),
                self.addrs(),
                shutdown.clone(),
            ));
        }
        // One set of destinations known to open, for every front end.
        let known = Arc::new(crate::known::KnownTargets::default());
        for l in self.listeners {
            let addr = l
                .listener
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_default();
            let front = l.front.clone();
            match &front {
                Front::Forward(dest) => {
                    info!(front = front.name(), addr = %addr, dest = %dest, "listening")
                }
                _ => info!(front = front.name(), addr = %addr, "listening"),
            }
            let dialer = Arc::new(TunnelDialer {
                pool: pool.clone(),
                front: front.name(),
                session_wait: self.config.session_wait,
                open_timeout: self.config.open_timeout,
                resume_grace: self.config.resume_grace,
                known: known.clone(),
            });
            tracker.spawn(listen::serve(
                l,
                dialer,
                self.config.local_auth.clone(),
                self.config.allow_remote_clients,
                Some(pages.clone()),
                shutdown.clone(),
                tracker.clone(),
            ));
        }
        tracker.close();
        shutdown.cancelled().await;
        let _ = tokio::time::timeout(std::time::Duration::from_secs(3), tracker.wait()).await;
    }
}

/// Binds and serves until `shutdown`.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> Result<(), ListenError> {
    Agent::bind(config).await?.serve(shutdown).await;
    Ok(())
}
