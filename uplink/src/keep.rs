//! Keeping a session up: connect, hand the session to the role (the connector serves streams,
//! the agent lends it to app connections), and when it ends or cannot be set up, wait
//! ([`Backoff`]) and try again. A way out whose proxy rejected our credentials is never retried
//! (a domain account locks after a few failures). A nudge ([`keep_nudged`]: the network changed,
//! the machine woke) ends the wait, or an attempt in progress, and tries again at once. Also the
//! warnings that are news once per process, not on every reconnect.

use crate::connect::{Connected, TransportChoice, Uplink};
use crate::{Backoff, ConnectError};
use egress::probe::Candidate;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// What the role says happened to a session it was handed.
pub enum Ended {
    /// The session ended (the reason is logged): reconnect.
    Lost(tunnel::SessionError),
    /// The role ended the session on purpose because a new one will do better (the network
    /// changed, the machine woke from sleep; the role logged why): reconnect at once, without
    /// a wait, and start the backoff over.
    Replaced,
    /// Shutdown: stop.
    Shutdown,
}

/// Keeps a session to `up.gateway` until `shutdown`: `serve` gets each session that comes up
/// and returns when it ends; `failed` hears every attempt that failed; `who` names the process
/// for the log (`the agent`, `the connector`). An authenticated refusal of the credential waits
/// longer ([`Backoff::refused`]) than an unreachable gateway.
///
/// An agent (`up.session.role`) that lost a session that was up waits [`Backoff::spread`]
/// before its first attempt: the desktops behind one NAT that lost the same gateway come back
/// over [`Backoff::SPREAD`], not in one instant. A connector does not: connectors are few, and
/// the streams that resume need them back at once.
///
/// With `up.failover` (several DMZ instances), an attempt that fails moves on to the next
/// instance at once; only when every instance failed in a row does it wait. A session that ends
/// is followed by a new attempt on the same instance first (a drain sends its sessions away
/// with `GOAWAY`; a dead instance fails fast and the next one is tried).
pub async fn keep<S, F>(
    up: &Uplink,
    who: &str,
    shutdown: &CancellationToken,
    serve: S,
    failed: impl FnMut(&ConnectError),
) where
    S: FnMut(Connected, Candidate, Uplink) -> F,
    F: Future<Output = Ended>,
{
    let (_never, nudge) = watch::channel(());
    keep_nudged(up, who, shutdown, serve, failed, nudge).await
}

/// [`keep`], and every change sent on `nudge` (the network changed, the machine woke) ends a
/// wait or an attempt in progress and tries again at once, with the backoff started over: what
/// failed on the old network says nothing about the new one. The sender debounces (a flapping
/// network sends one nudge per quiet spell, not one per event).
pub async fn keep_nudged<S, F>(
    up: &Uplink,
    who: &str,
    shutdown: &CancellationToken,
    mut serve: S,
    mut failed: impl FnMut(&ConnectError),
    mut nudge: watch::Receiver<()>,
) where
    S: FnMut(Connected, Candidate, Uplink) -> F,
    F: Future<Output = Ended>,
{
    let mut backoff = Backoff::default();
    let instances: Vec<egress::GatewayUrl> = std::iter::once(up.gateway.clone())
        .chain(up.failover.iter().cloned())
        .collect();
    let mut at = 0;
    let mut failed_in_a_row = 0;
    while !shutdown.is_cancelled() {
        let started = Instant::now();
        let mut refused = None;
        let mut spread = false;
        let mut this = up.clone();
        this.gateway = instances[at].clone();
        nudge.borrow_and_update();
        let attempt = tokio::select! {
            _ = shutdown.cancelled() => break,
            Ok(()) = nudge.changed() => {
                debug!("the network changed during an attempt: starting it over");
                backoff.reset();
                continue;
            }
            r = this.connect(up.transport) => r,
        };
        match attempt {
            Ok((mut c, way)) => {
                c.took = started.elapsed();
                failed_in_a_row = 0;
                info!(gateway = %this.gateway, dmz = %c.session.peer().instance_id, carried = %c.carried, way = %way, "connected to the gateway");
                let lost_after = Instant::now();
                match serve(c, way, this).await {
                    Ended::Shutdown => break,
                    Ended::Replaced => {
                        backoff.reset();
                        continue;
                    }
                    Ended::Lost(why) => {
                        if shutdown.is_cancelled() {
                            break;
                        }
                        warn!(reason = %why, "gateway session lost; reconnecting");
                        let drained = matches!(
                            why,
                            tunnel::SessionError::GoAway {
                                code: tunnel::ErrorCode::Shutdown,
                                ..
                            }
                        );
                        if drained || lost_after.elapsed() >= Backoff::UP_AT_LEAST {
                            // A session that was up and then lost (an instance killed, drained
                            // for a rolling restart, a load balancer's timeout) failed at
                            // nothing: come back from the first wait, not from one that grew
                            // over earlier losses. Losses seconds apart (one instance killed
                            // after the other) once made the wait grow to 15 s.
                            backoff.reset();
                            spread = up.session.role == tunnel::Role::Agent;
                        }
                        // A session that went away at once (a draining instance refusing to
                        // keep it) counts as a failure of this instance.
                        if instances.len() > 1 && lost_after.elapsed() < Backoff::STABLE {
                            failed_in_a_row += 1;
                            at = (at + 1) % instances.len();
                        }
                    }
                }
            }
            Err(e) => {
                if egress::probe::GatewayReached::refused_credential(&e) {
                    refused = Some(up.refused_text(&e));
                } else {
                    warn!(error = %e, "cannot reach the gateway");
                }
                failed(&e);
                match crate::park_after_rejected_credentials(&e, who, &up.way, shutdown).await {
                    crate::Parked::Shutdown => break,
                    crate::Parked::CredentialsChanged => {
                        backoff = Backoff::default();
                        continue;
                    }
                    crate::Parked::No => {}
                }
                if refused.is_none() && instances.len() > 1 {
                    failed_in_a_row += 1;
                    at = (at + 1) % instances.len();
                    if failed_in_a_row < instances.len() {
                        // Another instance may be up: try it now.
                        continue;
                    }
                    failed_in_a_row = 0;
                }
            }
        }
        backoff.after(started.elapsed());
        // (A session lost after `UP_AT_LEAST` reset the backoff above; `after` covers the
        // attempts that failed.)
        // The gateway itself (authenticated, never a status a middlebox could write) refused
        // the credential: slow down, still retry.
        let wait = match &refused {
            Some(why) => {
                let wait = backoff.refused();
                let secs = std::time::Duration::from_secs(wait.as_secs());
                warn!(retry_in = %humantime::format_duration(secs), "{why}");
                wait
            }
            None if spread => backoff.spread(),
            None => backoff.delay(),
        };
        debug!(?wait, "waiting before reconnecting");
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
            Ok(()) = nudge.changed() => {
                debug!("the network changed: trying again now");
                backoff.reset();
            }
        }
    }
}

/// How long after losing its DMZ instance (`kill -9`, a host that went away and closed its
/// connections) an agent or a connector may take to have a working session again while another
/// instance is up: the longest backoff wait ([`Backoff::MAX`], when the loss follows a short
/// session; longer than an agent's [`Backoff::SPREAD`]) and one more attempt. A dead instance fails its attempt at once and the next
/// instance (or, behind a load balancer, the next server) is tried without waiting. What the
/// failover tests assert; measured times are far below it.
pub const RECONNECT_BUDGET: std::time::Duration =
    std::time::Duration::from_secs(Backoff::MAX.as_secs() + 5);
const _: () = assert!(Backoff::SPREAD.as_secs() <= Backoff::MAX.as_secs());

/// While on the HTTP transport (chosen automatically), how often WebSocket is tried again
/// (default of `[tunnel] websocket_retry`).
pub const RETRY_WEBSOCKET: std::time::Duration = std::time::Duration::from_secs(10 * 60);

/// Says that the WebSocket upgrade does not get through `way`, once per process: the HTTP
/// transport (`sealed`: by protocol v2) carries on; the agent (`retries`) tries WebSocket again
/// in the background, a connector on its next reconnect.
pub(crate) fn said_fallback(way: &Candidate, e: &ConnectError, sealed: bool, retries: bool) {
    static SAID: AtomicBool = AtomicBool::new(false);
    if !SAID.swap(true, Ordering::Relaxed) {
        let how = if sealed {
            "the HTTP transport, sealed by protocol v2"
        } else {
            "the HTTP transport"
        };
        let again = if retries {
            "trying WebSocket again in the background"
        } else {
            "trying WebSocket first again on every reconnect"
        };
        warn!(way = %way, error = %e, "the WebSocket upgrade does not get through this way out (a proxy strips it); using {how} (POST up, streamed GET down) and {again}");
    } else {
        info!(way = %way, "WebSocket upgrade still stripped; HTTP transport");
    }
}

/// Says once per process that the TLS on the way is re-signed (v2 carries on sealed), naming
/// the certificate seen.
pub(crate) fn said_resigned(cert: &str) {
    static SAID: AtomicBool = AtomicBool::new(false);
    if !SAID.swap(true, Ordering::Relaxed) {
        warn!(seen = %cert, "the TLS certificate on the way to the gateway is not the gateway's own (a TLS-inspecting proxy re-signs it); the session stays sealed, so the proxy reads nothing (`sallyport doctor` names who re-signed it)");
    }
}

/// Whether `choice` may move back to WebSocket from an automatic HTTP fallback.
pub fn retries_websocket(choice: TransportChoice, on_http: bool) -> bool {
    on_http && choice == TransportChoice::Auto
}
