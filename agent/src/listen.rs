//! The agent's local listeners: SOCKS5, HTTP proxy and static forwards.
//!
//! Each accept loop takes a permit before `accept` (bounded concurrency), checks that the
//! connecting process belongs to the user running the agent (and that the source is loopback
//! unless remote clients are allowed), and hands the connection to its
//! own task; nothing slow happens in the loop itself.

use crate::dialer::TunnelDialer;
use crate::peer;
use socks::{Dialer, LocalAuth, OpenMode, Target};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, info_span, warn, Instrument};
use tunnel::Dest;

/// App connections served at once per listener (each is one tunnel stream; the gateway session
/// allows 16,384).
pub const MAX_LOCAL_CONNECTIONS: usize = 16_384;

/// What a listener serves.
#[derive(Clone)]
pub enum Front {
    Socks5,
    Http,
    Forward(Dest),
}

impl Front {
    pub fn name(&self) -> &'static str {
        match self {
            Front::Socks5 => "socks5",
            Front::Http => "http",
            Front::Forward(_) => "forward",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("{addr} is already in use by uid {uid}, another user's program; pick another port")]
    HeldByOtherUser { addr: SocketAddr, uid: u32 },
    #[error("{addr} is already in use by {name} (pid {pid}){hint}")]
    HeldByProcess {
        addr: SocketAddr,
        pid: u32,
        name: String,
        hint: &'static str,
    },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Binds `addr`, explaining "address in use" when another user holds the port.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, ListenError> {
    match TcpListener::bind(addr).await {
        Ok(l) => Ok(l),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            match (peer::listener_owner(addr), my_uid()) {
                (Some(uid), Some(me)) if uid != me => {
                    Err(ListenError::HeldByOtherUser { addr, uid })
                }
                _ => match peer::listener_process(addr) {
                    Some((pid, name)) => Err(ListenError::HeldByProcess {
                        addr,
                        pid,
                        hint: if name.starts_with("sallyport") {
                            ": an agent is already running for you (`sallyport service stop`, or stop that process), or pick another port"
                        } else {
                            "; pick another port"
                        },
                        name,
                    }),
                    None => Err(ListenError::Bind { addr, source: e }),
                },
            }
        }
        Err(source) => Err(ListenError::Bind { addr, source }),
    }
}

#[cfg(target_os = "linux")]
fn my_uid() -> Option<u32> {
    peer::my_uid()
}
#[cfg(not(target_os = "linux"))]
fn my_uid() -> Option<u32> {
    None
}

pub struct Listener {
    pub listener: TcpListener,
    pub front: Front,
}

/// Serves one listener until `shutdown`.
pub async fn serve(
    l: Listener,
    dialer: Arc<TunnelDialer>,
    auth: Option<Arc<LocalAuth>>,
    allow_remote: bool,
    pages: Option<Arc<dyn socks::LocalPages>>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let permits = Arc::new(Semaphore::new(MAX_LOCAL_CONNECTIONS));
    let udp: Arc<dyn socks::udp::Associator> = Arc::new(crate::udp::UdpAssociator::new(
        dialer.pool.clone(),
        dialer.session_wait,
        allow_remote,
    ));
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => return,
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
        };
        let (tcp, peer_addr) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = l.listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let front = l.front.clone();
        let dialer = dialer.clone();
        let auth = auth.clone();
        let pages = pages.clone();
        let udp = udp.clone();
        tracker.spawn(
            async move {
                // Only the user running the agent may use it, whatever the source address (a
                // local process can bind a LAN address); other hosts only with
                // --allow-remote-clients, and then they pass local authentication. Checked here,
                // not in the accept loop. The client's socket is found by both ends: ours is the
                // address this connection reached, not the listener's (which may be 0.0.0.0).
                let local = tcp.local_addr();
                let check = match &local {
                    Ok(local) => peer::check(peer_addr, *local, allow_remote).await,
                    Err(e) => Err(format!("cannot read the connection's own address: {e}")),
                };
                let (Ok(local), Ok(())) = (local, check.as_ref()) else {
                    let why = check.err().unwrap_or_default();
                    warn!(peer = %peer_addr, front = front.name(), reason = %why, "refused a client connection");
                    return;
                };
                let udp = socks::UdpFront {
                    associator: udp,
                    client: peer_addr,
                    local,
                };
                handle(tcp, front, dialer, auth, pages, udp).await;
                drop(permit);
            }
            .instrument(info_span!("app", peer = %peer_addr)),
        );
    }
}

/// The dialer a SOCKS5 or HTTP client at `peer` gets: the agent's, except for a client on
/// another host (`--allow-remote-clients`), which is never answered before the far end confirms
/// ([`Unvouched`]).
fn dialer_for<D: Dialer>(peer: SocketAddr, dialer: Arc<D>) -> Arc<dyn Dialer> {
    if peer::is_loopback(peer) {
        dialer
    } else {
        Arc::new(Unvouched(dialer))
    }
}

/// A dialer that vouches for no destination ([`Dialer::known`] is false): a client on another
/// host cannot learn from how fast its reply comes which destinations the desktop's user opened
/// lately.
struct Unvouched<D>(Arc<D>);

impl<D: Dialer> Dialer for Unvouched<D> {
    fn dial(&self, target: Target, mode: OpenMode) -> socks::DialFuture {
        self.0.dial(target, mode)
    }
}

async fn handle(
    tcp: TcpStream,
    front: Front,
    dialer: Arc<TunnelDialer>,
    auth: Option<Arc<LocalAuth>>,
    pages: Option<Arc<dyn socks::LocalPages>>,
    udp: socks::UdpFront,
) {
    match front {
        Front::Socks5 => {
            match socks::serve_socks5_with(tcp, dialer_for(udp.client, dialer), auth, Some(udp))
                .await
            {
                Ok(stats) => {
                    debug!(target = ?stats.target.map(|t| t.to_string()), up = stats.up, down = stats.down, "socks5 connection done")
                }
                Err(socks::FrontError::Dial { target, source }) => {
                    info!(%target, kind = %source.kind, reason = %source, "socks5 connection refused")
                }
                Err(e) => debug!(error = %e, "socks5 connection ended"),
            }
        }
        Front::Http => {
            let dialer = dialer_for(udp.client, dialer);
            if let Err(e) = socks::serve_http_with(tcp, dialer, auth, pages).await {
                debug!(error = %e, "http proxy connection ended");
            }
        }
        Front::Forward(dest) => {
            let target = Target::new(dest.host.clone(), dest.port);
            // Forwards send data right after OPEN: no round trip before the app's first bytes.
            match dialer.dial(target.clone(), OpenMode::Early).await {
                Ok(mut stream) => {
                    let mut tcp = tcp;
                    // The app's first bytes are usually waiting already: they go with the OPEN.
                    match crate::dialer::splice_app(&mut tcp, &mut stream, true).await {
                        Ok((up, down)) => debug!(%target, up, down, "forward done"),
                        Err(e) => info!(%target, error = %e, "forward ended with an error"),
                    }
                }
                Err(e) => info!(%target, kind = %e.kind, reason = %e, "forward refused"),
            }
        }
    }
}

#[cfg(test)]
mod early_answer_tests {
    use super::*;

    /// Vouches for every destination; never dials.
    struct Knows;

    impl Dialer for Knows {
        fn dial(&self, _: Target, _: OpenMode) -> socks::DialFuture {
            Box::pin(async {
                Err(socks::DialError::new(
                    socks::DialErrorKind::Other,
                    "not in this test",
                ))
            })
        }
        fn known(&self, _: &Target) -> bool {
            true
        }
    }

    #[test]
    fn a_client_on_another_host_is_never_answered_before_the_far_end_confirms() {
        let t = Target::new("db.internal", 5432);
        let local = dialer_for("127.0.0.1:40000".parse().unwrap(), Arc::new(Knows));
        assert!(local.known(&t));
        let mapped = dialer_for("[::ffff:127.0.0.1]:40000".parse().unwrap(), Arc::new(Knows));
        assert!(mapped.known(&t));
        let remote = dialer_for("192.0.2.7:40000".parse().unwrap(), Arc::new(Knows));
        assert!(
            !remote.known(&t),
            "another host learns nothing from the reply's speed"
        );
    }
}
