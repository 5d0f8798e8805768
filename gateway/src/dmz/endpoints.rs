//! What one accepted connection gets: the deadline and the address's unauthenticated slot
//! ([`super::preauth`]), TLS, the request head, and dispatch by path (`/key`, `/healthz`, `/readyz`, the
//! WebSocket endpoints, the HTTP fallback), until the session it becomes.

use super::agent::agent_session;
use super::connector::connector_session;
use super::preauth::Slot;
use super::upgrade::{client_addr, upgrade, Upgraded};
use super::Shared;
use crate::http::{self};
use crate::policy::{self};
use ipnet::IpNet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tracing::{debug, info_span, Instrument};

pub(crate) async fn handle_connection(shared: Arc<Shared>, tcp: TcpStream, peer: SocketAddr) {
    let _ = tcp.set_nodelay(true);
    // One deadline for everything until the credential is verified and the tunnel hello done.
    let deadline = tokio::time::Instant::now() + shared.config.limits.handshake_timeout;
    // A trusted load balancer's connections are counted under the client address its header
    // names, once the head is read; anyone else's under the peer address, now.
    let slot = if is_trusted(&shared.config.trusted_proxies, peer.ip()) {
        Slot::uncounted()
    } else {
        match admit(&shared, peer.ip()) {
            Some(slot) => slot,
            None => return,
        }
    };
    match &shared.tls {
        Some(acceptor) => {
            let acceptor = acceptor.clone();
            // rustls reads at most 4 KiB per call: buffer under it (one syscall per 64 KiB), a
            // buffer that an idle connection gives back.
            let tcp = egress::ReadBuffer::new(tcp);
            let tls = tokio::select! {
                // Boxed, like every step before the session: the connection's task keeps only
                // what the session needs (14.5 KiB per idle session when inline).
                r = tokio::time::timeout_at(deadline, Box::pin(acceptor.accept(tcp))) => match r {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        debug!(error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        debug!("TLS handshake timed out");
                        return;
                    }
                },
                _ = slot.evicted() => {
                    debug!("unauthenticated connection evicted by a newer one from the same address");
                    return;
                }
            };
            // The TLS exporter value of this connection: an agent whose own value matches
            // talks to us over one TLS connection, with nobody in between (protocol v2).
            let exporter = {
                let conn = &tls.get_ref().1;
                let mut out = [0u8; 32];
                let ok = conn.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3)
                    && conn
                        .export_keying_material(&mut out, tunnel::handshake::EXPORTER_LABEL, None)
                        .is_ok();
                ok.then_some(out)
            };
            serve_http(shared, tls, peer, deadline, slot, Some(exporter)).await
        }
        None => serve_http(shared, tcp, peer, deadline, slot, None).await,
    }
}

/// The handshake rate and an unauthenticated slot for a client address; `None`: refused (the
/// reason is logged at debug level: nothing to tell a flood).
pub(crate) fn admit(shared: &Shared, ip: IpAddr) -> Option<Slot> {
    if !shared.handshakes.charge(ip) {
        debug!(client = %ip, "handshake rate limit for this address");
        return None;
    }
    let slot = shared.preauth.enter(ip);
    if slot.is_none() {
        debug!(client = %ip, "too many addresses with unauthenticated connections");
    }
    slot
}

pub(crate) fn is_trusted(trusted: &[IpNet], ip: IpAddr) -> bool {
    trusted
        .iter()
        .any(|n| n.contains(&policy::canonical_ip(ip)))
}

/// Writes a short answer, within the handshake deadline (a client that does not read cannot
/// hold the connection with it).
pub(crate) async fn answer<S: AsyncWrite + Unpin>(
    io: &mut S,
    deadline: tokio::time::Instant,
    status: u16,
    headers: &[(&str, &str)],
    body: &str,
) {
    let _ = tokio::time::timeout_at(deadline, http::respond(io, status, headers, body)).await;
}

pub(crate) async fn serve_http<S>(
    shared: Arc<Shared>,
    mut io: S,
    peer: SocketAddr,
    deadline: tokio::time::Instant,
    mut slot: Slot,
    own_tls: Option<Option<[u8; 32]>>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // `own_tls`: we terminated this connection's TLS (with its exporter value, TLS 1.3 only).
    // Whether we did is what the offer says, not whether an exporter exists: a TLS 1.2
    // connection we terminate has none, and must not pass for one a trusted load balancer
    // terminated (a copy of a listed key would then qualify for mode `outer`).
    let tls_here = own_tls.is_some();
    let exporter = own_tls.flatten();
    let head = tokio::select! {
        r = tokio::time::timeout_at(deadline, http::read_head(&mut io)) => r,
        _ = slot.evicted() => return,
    };
    let head = match head {
        Ok(Ok(h)) => h,
        Ok(Err(http::HeadError::TooLarge)) => {
            answer(
                &mut io,
                deadline,
                431,
                &[],
                "sallyport: request head too large\n",
            )
            .await;
            return;
        }
        Ok(Err(e)) => {
            debug!(error = %e, "bad request head");
            answer(&mut io, deadline, 400, &[], "sallyport: bad request\n").await;
            return;
        }
        Err(_) => {
            debug!("no request head within the handshake deadline");
            return;
        }
    };
    let client = client_addr(
        &shared.config.trusted_proxies,
        shared.config.forwarded_header,
        peer,
        &head,
    );
    if is_trusted(&shared.config.trusted_proxies, peer.ip()) {
        // Behind the load balancer: the client it names is who the limits count.
        match admit(&shared, client.ip()) {
            Some(s) => slot = s,
            None => {
                answer(
                    &mut io,
                    deadline,
                    429,
                    &[],
                    "sallyport: too many handshakes from this address; retry later\n",
                )
                .await;
                return;
            }
        }
    }
    let prefix = &shared.config.prefix;
    let path = head.path_only().to_string();
    let Some(endpoint) = path.strip_prefix(prefix.as_str()) else {
        answer(&mut io, deadline, 404, &[], "sallyport: not found\n").await;
        return;
    };
    if endpoint == "/agent/http"
        || endpoint.starts_with("/agent/http/")
        || endpoint == "/connector/http"
        || endpoint.starts_with("/connector/http/")
    {
        // The fallback transport: ordinary requests, served by a full HTTP server.
        crate::dmz::fallback::serve(shared, io, head, peer, deadline, slot).await;
        return;
    }
    match endpoint {
        "/key" => match &shared.config.inner_key {
            Some(k) => {
                let mut body = format!("inner {}\n", k.public());
                if let Some(pin) = &shared.config.tls_key_pin {
                    body.push_str(&format!("tls {pin}\n"));
                }
                answer(&mut io, deadline, 200, &[], &body).await;
            }
            None => {
                answer(
                    &mut io,
                    deadline,
                    404,
                    &[],
                    "sallyport: this gateway has no inner key configured\n",
                )
                .await;
            }
        },
        "/readyz" => {
            // "Can serve": never waits for connectors (a new instance must become ready for
            // connectors to reach it); 503 once draining, so the load balancer stops sending.
            if shared.draining.load(std::sync::atomic::Ordering::Relaxed) {
                answer(&mut io, deadline, 503, &[], "draining\n").await;
            } else {
                answer(&mut io, deadline, 200, &[], "ready\n").await;
            }
        }
        "/healthz" => {
            let body = format!(
                "ok\ninstance {}\nconnector sessions {}\n",
                shared.config.instance_id,
                shared.router.sessions()
            );
            answer(&mut io, deadline, 200, &[], &body).await;
        }
        "/agent" | "/connector" => {
            let is_agent = endpoint == "/agent";
            let inner = is_agent && head.query_has("inner", "1");
            let up = tokio::select! {
                u = tokio::time::timeout_at(deadline, Box::pin(upgrade(&shared, io, head, client, is_agent, inner, tls_here))) => u,
                _ = slot.evicted() => return,
            };
            let Ok(Some(up)) = up else {
                return;
            };
            let span = info_span!("session", client = %client);
            match up {
                Upgraded::Agent(io, head, id, client, count) => {
                    drop(slot);
                    let t = ws_transport(&shared, io, head).await;
                    agent_session(shared, t, id, client, count, deadline)
                        .instrument(span)
                        .await
                }
                Upgraded::InnerAgent(io, head, client) => {
                    let t = ws_transport(&shared, io, head).await;
                    async {
                        // Hello and token within the same deadline, and the slot held until then.
                        let auth = Box::pin(async {
                            let t = crate::dmz::inner::handshake(&shared, t, deadline).await?;
                            crate::dmz::inner::authenticate(&shared, t, client, deadline).await
                        });
                        let authed = tokio::select! {
                            a = auth => a,
                            _ = slot.evicted() => None,
                        };
                        drop(slot);
                        if let Some((t, id, count)) = authed {
                            agent_session(shared.clone(), t, id, client, count, deadline).await
                        }
                    }
                    .instrument(span)
                    .await
                }
                Upgraded::V2 {
                    io,
                    head,
                    client,
                    responder,
                    offer,
                    is_agent,
                } => {
                    let t = ws_transport(&shared, io, head).await;
                    let (tx, rx) = tunnel::Transport::split(t);
                    async {
                        // msg3 within the same deadline, and the slot held until then.
                        let accept = Box::pin(crate::dmz::v2::accept(
                            &shared, tx, rx, *responder, &offer, exporter, true, client, deadline,
                            is_agent,
                        ));
                        let authed = tokio::select! {
                            a = accept => a,
                            _ = slot.evicted() => None,
                        };
                        drop(slot);
                        let Some((t, id, count)) = authed else {
                            return;
                        };
                        if is_agent {
                            agent_session(shared.clone(), t, id, client, count, deadline).await
                        } else {
                            connector_session(shared.clone(), t, id, client, count, deadline).await
                        }
                    }
                    .instrument(span)
                    .await
                }
                Upgraded::Connector(io, head, id, client, count) => {
                    drop(slot);
                    let t = ws_transport(&shared, io, head).await;
                    connector_session(shared, t, id, client, count, deadline)
                        .instrument(span)
                        .await
                }
            }
        }
        _ => {
            answer(&mut io, deadline, 404, &[], "sallyport: not found\n").await;
        }
    }
}

/// The WebSocket transport on an upgraded connection; the request head is dropped here, not
/// kept for the session's life (only the bytes read past it are needed).
async fn ws_transport<S>(
    shared: &Shared,
    io: S,
    head: http::RequestHead,
) -> tunnel::ws::WsTransport<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    tunnel::ws::WsTransport::server(io, head.leftover, shared.config.session.max_frame).await
}
