//! One stream the DMZ opened on a connector session: check the allow-list against the identity
//! the DMZ stamped, resolve the name here, check every address it resolved to, connect with a
//! timeout, answer `OPEN_OK`/`OPEN_ERR`, check the first bytes where a rule names a protocol
//! (`firstbytes`), copy bytes both ways and write the audit line.

use super::{firstbytes, ConnectorConfig};
use crate::policy::{self, Host, Who};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, Instrument};
use tunnel::resumable::{keys, Resumable, ResumeRequest};
use tunnel::{meta, ErrorCode, Meta, Session, Stream};

pub(super) async fn serve(
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
    let reserved = dest.host == tunnel::renew::HOST && dest.port == tunnel::renew::PORT;
    match (&config.issuer, reserved) {
        (Some(issuer), true) => {
            return Box::pin(super::issuer::serve(issuer, stream, &token)).await
        }
        (Some(_), false) => {
            return stream.reject(
                ErrorCode::NotAllowed,
                "this connector is the issuer: it answers token renewals only",
            )
        }
        _ => {}
    }
    let started = Instant::now();
    let who = Who {
        user: &user,
        groups: &groups,
    };
    // A resume of a stream this connector holds (only on a session that negotiated resume: an
    // older DMZ passes an agent's keys through, and they mean nothing then).
    let resume = if stream.resume_negotiated() {
        req.meta.get(keys::RESUME).map(str::to_string)
    } else {
        None
    };
    if let Some(key) = resume.as_deref().filter(|k| *k != "new") {
        let attach = req
            .meta
            .get(keys::ATTACH)
            .and_then(|v| v.parse::<u32>().ok());
        let peer_recv = req
            .meta
            .get(keys::RECV)
            .and_then(tunnel::resume::parse_offset);
        let (Some(attach), Some(peer_recv)) = (attach, peer_recv) else {
            return stream.reject(
                ErrorCode::Protocol,
                "resume without a valid attachment or offset",
            );
        };
        let request = ResumeRequest {
            stream,
            attach,
            peer_recv,
        };
        match config
            .resume
            .deliver(&config.policy, key, &token, &who, &dest, request)
        {
            Ok(()) => {
                info!(target: "audit", event = "resume", %token, name = %user, %client, %dest, attach, "stream resumed")
            }
            Err((refusal, request)) => {
                info!(target: "audit", event = "refused", %token, name = %user, %client, %dest, code = %refusal.0, reason = %refusal.1, "resume refused");
                super::resume::reject(request.stream, refusal);
            }
        }
        return;
    }
    let (tcp, addr) = match dial_checked(&config, &dest, &who).await {
        Ok((tcp, addr)) => {
            info!(target: "audit", event = "open", %token, name = %user, %client, %dest, %addr, "stream open");
            (tcp, addr)
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
    let _open = config.ops.metrics.stream_open();
    let mut tcp = tcp;
    let buffer = tunnel::resumable::buffer_for(config.session.window_max, config.session.max_frame);
    let held = match resume {
        Some(_) => config.resume.register(&token, &dest, addr, buffer),
        None => None,
    };
    let audit = firstbytes::Audit {
        token: &token,
        user: &user,
        client: &client,
        dest: &dest,
        addr,
    };
    if let Some((key, requests, _registration, settings)) = held {
        let mut m = Meta::default();
        m.set(keys::KEY, key);
        stream.accept_with(m);
        let mut end = Resumable::holder(stream, requests, settings);
        if !Box::pin(firstbytes::admit(&config, &mut end, &mut tcp, &who, &audit)).await {
            return;
        }
        let result = tunnel::splice_chunks(&mut tcp, &mut end, false).await;
        let (up, down) = end.byte_counts();
        finish(&config, &audit, started, up, down, &result);
        if result.is_err() {
            end.reset(ErrorCode::Cancel, "connection to the service failed");
        }
        return;
    }
    stream.accept();
    let mut stream = stream;
    // Boxed: its state is not part of every stream's task (idle streams stay light).
    if !Box::pin(firstbytes::admit(
        &config,
        &mut stream,
        &mut tcp,
        &who,
        &audit,
    ))
    .await
    {
        return;
    }
    // A reset from the agent side must end the copy even while the service is not reading
    // (the copy would not poll the tunnel again until the service made room).
    let failure = stream.failure();
    let result = tokio::select! {
        r = tunnel::splice_chunks(&mut tcp, &mut stream, false) => r,
        e = failure => Err(std::io::Error::new(std::io::ErrorKind::ConnectionReset, e)),
    };
    let (up, down) = stream.byte_counts();
    finish(&config, &audit, started, up, down, &result);
    if result.is_err() {
        stream.reset(ErrorCode::Cancel, "connection to the service failed");
    }
}

/// The close of a stream: byte counters and the audit line.
fn finish(
    config: &ConnectorConfig,
    audit: &firstbytes::Audit<'_>,
    started: Instant,
    up: u64,
    down: u64,
    result: &std::io::Result<(u64, u64)>,
) {
    config.ops.metrics.bytes(up, down);
    let outcome = match result {
        Ok(_) => "closed".to_string(),
        Err(e) => format!("reset: {e}"),
    };
    info!(
        target: "audit", event = "close", token = %audit.token, name = %audit.user, client = %audit.client, dest = %audit.dest,
        bytes_up = up, bytes_down = down, duration_ms = started.elapsed().as_millis() as u64, %outcome, "stream closed"
    );
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
