//! One agent stream: checks (token routes, metadata, limits), routing to a connector,
//! identity stamping, the relay, and the audit lines.

use super::relay::{pump, relay_code, PumpEnd};
use super::Shared;
use crate::auth::Identity;
use crate::logsafe::Clean;
use crate::policy::{self};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;
use tracing::info;
use tunnel::resumable::{is_hex32, keys, Ticket};
use tunnel::{meta, ErrorCode, Meta, Stream};

/// How long a finished resumable stream's relay still passes acknowledgements on.
const ACK_LINGER: std::time::Duration = std::time::Duration::from_secs(2);

/// What an agent's `OPEN` asked for.
enum Resume {
    No,
    New,
    Of {
        key: String,
        resume_id: String,
        connector: String,
        attach: u32,
        recv: u64,
    },
}

impl Resume {
    /// A [`Ticket`], with the attachment and offset beside it.
    fn parse(ticket: &str, m: &Meta) -> Option<Resume> {
        let Ticket {
            key,
            resume_id,
            connector,
        } = Ticket::parse(ticket)?;
        Some(Resume::Of {
            key,
            resume_id,
            connector,
            attach: m.get(keys::ATTACH)?.parse().ok()?,
            recv: tunnel::resume::parse_offset(m.get(keys::RECV)?)?,
        })
    }
}

/// The highest `ACK` passed each way on one resumable path.
#[derive(Default)]
struct Passed {
    /// From the connector: what it acknowledged of the agent's bytes (and `FIN`).
    to_agent: u64,
    /// From the agent: what it acknowledged of the connector's bytes (and `FIN`).
    to_connector: u64,
}

/// How a stream's wait for its connector ended (see [`route_at_start`]).
enum Waited<T> {
    Routed(T),
    /// Not waited (not a young instance, no connector credential to come), or waited in vain.
    NoRoute,
    /// Too many streams wait already (per token or in all).
    Crowded,
    /// The agent reset the stream, or lost its session, while it waited: nothing to forward.
    Abandoned,
    ShuttingDown,
}

/// A young instance's wait for a connector (see `Limits::route_wait_at_start`): while a
/// connector credential that may serve `host:port` (and can still authenticate) has no
/// session with routes here yet, and for at most the window after the first authenticated
/// session, re-`pick`s each time the routes or the connector token file change. Where tokens
/// are accepted unlisted (`[v2] require_listed = false`), a connector credential this instance
/// has never seen may serve any destination, so every stream no connector serves yet waits,
/// for the window at most. Bounded per token and in all; ends at once when the agent gives the
/// stream up or the gateway shuts down.
async fn route_at_start<T>(
    shared: &Shared,
    stream: &Stream,
    token: &str,
    host: &policy::Host,
    port: u16,
    pick: impl Fn() -> Option<T>,
) -> Waited<T> {
    let Some(first) = shared.first_session.get().copied() else {
        return Waited::NoRoute;
    };
    let limits = &shared.config.limits;
    let until = first + limits.route_wait_at_start;
    // A cap of 0 waiting streams is "never wait", not a crowd.
    if tokio::time::Instant::now() >= until
        || limits.route_waiting_per_token == 0
        || limits.route_waiting == 0
    {
        return Waited::NoRoute;
    }
    // Worked out once per version of the token file, outside the router's lock.
    let covering = |store: &crate::auth::TokenStore| -> Vec<String> {
        let now = std::time::SystemTime::now();
        store
            .identities()
            .filter(|c| c.routes.iter().any(|r| r.matches(host, port)))
            .filter(|c| shared.config.v2.may_authenticate(c, now))
            .map(|c| c.token_id.clone())
            .collect()
    };
    let mut tokens = shared.config.connector_tokens.subscribe();
    let mut credentials = covering(&tokens.borrow_and_update().clone());
    // An unlisted connector credential (accepted by its signature alone) is known only once
    // its connector is here: one may still come for any destination.
    let unlisted = !shared.config.v2.require_listed;
    let awaited = |credentials: &[String]| unlisted || shared.router.awaits(credentials);
    if !awaited(&credentials) {
        return Waited::NoRoute;
    }
    let Some(_one) = shared.waiting.acquire(&token.to_string()) else {
        return Waited::Crowded;
    };
    let Ok(_all) = shared.waiting_all.clone().try_acquire_owned() else {
        return Waited::Crowded;
    };
    let _counted = shared.ops.metrics.waiting_for_connector();
    let since = tokio::time::Instant::now();
    // Subscribed before the next pick: a connector that attaches in between still wakes us.
    let mut changes = shared.router.changes();
    let failed = stream.failure();
    tokio::pin!(failed);
    loop {
        if let Some(c) = pick() {
            info!(token = %token, waited_ms = since.elapsed().as_millis() as u64, "stream waited for its connector to attach");
            return Waited::Routed(c);
        }
        if !awaited(&credentials) {
            return Waited::NoRoute;
        }
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return Waited::NoRoute },
            changed = tokens.changed() => match changed {
                Ok(()) => credentials = covering(&tokens.borrow_and_update().clone()),
                Err(_) => return Waited::NoRoute,
            },
            _ = tokio::time::sleep_until(until) => return Waited::NoRoute,
            _ = &mut failed => return Waited::Abandoned,
            _ = shared.shutdown.cancelled() => return Waited::ShuttingDown,
        }
    }
}

/// Passes each side's latest `ACK` to the other, until neither side can send more, or (with
/// `until`) once both have acknowledged at least that much.
async fn relay_acks(
    agent: &Stream,
    connector: &Stream,
    passed: &mut Passed,
    until: Option<(u64, u64)>,
) {
    let mut agent_done = false;
    let mut connector_done = false;
    std::future::poll_fn(|cx| {
        pass_acks(
            cx,
            agent,
            connector,
            &mut agent_done,
            &mut passed.to_connector,
        );
        pass_acks(
            cx,
            connector,
            agent,
            &mut connector_done,
            &mut passed.to_agent,
        );
        let enough = until.is_some_and(|(a, c)| passed.to_agent >= a && passed.to_connector >= c);
        if (agent_done && connector_done) || enough {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await
}

/// Passes every `ACK` of `from` that is ready to `to` (`highest` keeps the largest); `done`
/// once `from` can send no more.
fn pass_acks(
    cx: &mut std::task::Context<'_>,
    from: &Stream,
    to: &Stream,
    done: &mut bool,
    highest: &mut u64,
) {
    while !*done {
        match from.poll_ack(cx) {
            std::task::Poll::Ready(Some(v)) => {
                to.send_ack(v);
                *highest = (*highest).max(v);
            }
            std::task::Poll::Ready(None) => *done = true,
            std::task::Poll::Pending => break,
        }
    }
}

/// Routes one agent stream to a connector, stamps identity, relays, and audits.
pub(crate) async fn route_stream(
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
    // Untrusted text (the agent's instance id, the destination it asked for) is escaped and
    // cut short in every log line: no forged lines, no disk filled by one field.
    let agent = Clean(&agent).to_string();
    let dest_text = Clean(&dest.to_string()).to_string();
    // Every refusal is audited with the same fields as an open, then answered with OPEN_ERR.
    let refuse = |stream: Stream, code: ErrorCode, reason: String| {
        info!(target: "audit", event = "refused", token = %id.token_id, name = %id.name, client = %client_ip, %agent, dest = %dest_text, %code, reason = %Clean(&reason), "stream refused");
        shared
            .ops
            .metrics
            .refused(code, &id.token_id, &dest_text, &Clean(&reason).to_string());
        stream.reject(code, &reason);
    };
    let host = match policy::parse_host(&dest.host) {
        Ok(h) => h,
        Err(e) => return refuse(stream, ErrorCode::NotAllowed, e.to_string()),
    };
    // A token issued with routes reaches only those, whatever the connectors serve (and the
    // issuer, to renew itself).
    let renewal = matches!(&host, policy::Host::Name(h) if h == tunnel::renew::HOST)
        && dest.port == tunnel::renew::PORT;
    // Renewal gives the token a new key; where tokens must be listed, the file pins the old one
    // and the renewed token would be refused at the next session: not offered here.
    if renewal && shared.config.v2.require_listed {
        return refuse(
            stream,
            ErrorCode::NotAllowed,
            "token renewal is not offered by this gateway (its tokens are listed in a token file; re-issue instead)".to_string(),
        );
    }
    if !renewal && !id.routes.is_empty() && !id.routes.iter().any(|r| r.matches(&host, dest.port)) {
        return refuse(
            stream,
            ErrorCode::NotAllowed,
            format!("{dest_text} is not among this token's routes"),
        );
    }
    // The agent's own metadata is small; the DMZ adds the identity. An oversize request is
    // refused here, never forwarded to cut a connector session shared by everyone.
    let mut m = req.meta.clone();
    m.remove_prefix(meta::IDENTITY_PREFIX);
    // Resumable streams: what the agent asked for counts only on a session that negotiated
    // resume; its keys go, and the DMZ writes its own (docs/protocol.md, "Resuming").
    let asked = if stream.resume_negotiated() {
        req.meta.get(keys::RESUME).map(str::to_string)
    } else {
        None
    };
    m.remove_prefix(keys::PREFIX);
    let resume = match asked.as_deref() {
        None => Resume::No,
        Some("new") => Resume::New,
        Some(ticket) => match Resume::parse(ticket, &req.meta) {
            Some(r) => r,
            None => {
                return refuse(
                    stream,
                    ErrorCode::Protocol,
                    "malformed resume: ticket, attachment or offset".into(),
                )
            }
        },
    };
    let meta_bytes = m.wire_len();
    if meta_bytes > shared.config.limits.open_meta_bytes {
        return refuse(
            stream,
            ErrorCode::Limit,
            format!(
                "stream request metadata of {meta_bytes} bytes is over the limit of {}",
                shared.config.limits.open_meta_bytes
            ),
        );
    }
    // A resume spends the opens-per-second budget like an open (a refusal for it is `limit`,
    // which the agent retries within the grace): a flood of resumes costs the connector too.
    if !shared.opens.allow(&id.token_id) {
        return refuse(
            stream,
            ErrorCode::Limit,
            "too many new streams per second for this token".into(),
        );
    }
    let Some(_token_stream) = shared.agent_streams.acquire(&id.token_id) else {
        return refuse(
            stream,
            ErrorCode::Limit,
            format!(
                "this token has {} streams open, its limit",
                shared.config.limits.streams_per_token
            ),
        );
    };
    let Ok(_permit) = shared.streams.clone().try_acquire_owned() else {
        return refuse(
            stream,
            ErrorCode::Limit,
            "gateway is at its stream limit".into(),
        );
    };
    let pick = || match &resume {
        Resume::Of {
            connector,
            resume_id,
            ..
        } => shared.router.holder(connector, resume_id),
        Resume::New => shared.router.pick_resumable(&host, dest.port),
        Resume::No => shared.router.pick(&host, dest.port),
    };
    let mut chosen = pick();
    // A resume does not wait: the agent asks again every second on `no-route`, each attempt
    // given 3 s, and attempts held here would reach the holder beside the live one (a stale
    // one, reset by the agent, can end the stream being resumed).
    if chosen.is_none() && !matches!(resume, Resume::Of { .. }) {
        chosen = match route_at_start(&shared, &stream, &id.token_id, &host, dest.port, pick).await
        {
            Waited::Routed(c) => Some(c),
            Waited::NoRoute => None,
            Waited::Crowded => {
                let reason = format!(
                    "no connector serves {dest_text} yet, and too many streams wait for one on this just-started gateway"
                );
                return refuse(stream, ErrorCode::NoRoute, reason);
            }
            Waited::Abandoned => {
                info!(target: "audit", event = "abandoned", token = %id.token_id, name = %id.name, client = %client_ip, %agent, dest = %dest_text, "stream given up by the agent while it waited for a connector");
                return;
            }
            Waited::ShuttingDown => {
                return refuse(
                    stream,
                    ErrorCode::Shutdown,
                    "the gateway is shutting down".into(),
                )
            }
        };
    }
    let Some(chosen) = chosen else {
        if let Resume::Of { .. } = resume {
            return refuse(
                stream,
                ErrorCode::NoRoute,
                "the connector holding this stream is not connected here (yet)".into(),
            );
        }
        return refuse(
            stream,
            ErrorCode::NoRoute,
            format!("no connector serves {dest_text} (no connector that is up advertises it: it is in no allow-list, or its connector is down)"),
        );
    };
    let resumable = !matches!(resume, Resume::No) && chosen.session.resume_negotiated();
    if resumable {
        match &resume {
            Resume::New => m.set(keys::RESUME, "new"),
            Resume::Of {
                key, attach, recv, ..
            } => {
                m.set(keys::RESUME, key.clone());
                m.set(keys::ATTACH, attach.to_string());
                m.set(keys::RECV, recv.to_string());
            }
            Resume::No => {}
        }
    }
    m.set(meta::TOKEN_ID, id.token_id.clone());
    m.set(meta::NAME, id.name.clone());
    m.set(meta::GROUPS, id.groups.join(","));
    m.set(meta::CLIENT_ADDR, client_ip.to_string());
    m.set(meta::DMZ_INSTANCE, shared.config.instance_id.clone());
    // An agent that reset its stream while it was being routed (an app that gave up, under a
    // reconnect storm) gets nothing opened for it at the connector.
    if stream.has_failed() {
        info!(target: "audit", event = "abandoned", token = %id.token_id, name = %id.name, client = %client_ip, %agent, dest = %dest_text, "stream given up by the agent before it was forwarded");
        return;
    }
    let upstream = match chosen.session.open(dest.clone(), m) {
        Ok(s) => s,
        Err(e @ tunnel::StreamError::OpenTooLarge { .. }) => {
            return refuse(stream, ErrorCode::Limit, e.to_string())
        }
        Err(e) => {
            return refuse(
                stream,
                ErrorCode::NoRoute,
                format!("connector session unavailable: {e}"),
            )
        }
    };
    info!(target: "audit", event = "open", token = %id.token_id, name = %id.name, client = %client_ip, %agent, dest = %dest_text, connector = %chosen.connector, "stream open");
    // Early data from the agent flows at once (`up` starts now); data back flows only after
    // the connector's answer, which is relayed to the agent first.
    let _open = shared.ops.metrics.stream_open();
    let up = pump(&stream, &upstream, resumable);
    let rest = async {
        match upstream.opened().await {
            Ok(()) => {
                let mut answer = Meta::default();
                let theirs = upstream.open_meta();
                match &resume {
                    // The ticket names the stream key, this connector's resume id and credential.
                    Resume::New if resumable => {
                        if let Some(key) = theirs.get(keys::KEY).filter(|k| is_hex32(k)) {
                            let ticket = Ticket {
                                key: key.to_string(),
                                resume_id: chosen.session.peer().resume_id.clone(),
                                connector: chosen.connector.clone(),
                            };
                            answer.set(keys::RESUME, ticket.text());
                        }
                    }
                    Resume::Of { .. } => {
                        shared.ops.metrics.resumed();
                        if let Some(r) = theirs.get(keys::RECV) {
                            answer.set(keys::RECV, r);
                        }
                    }
                    _ => {}
                }
                stream.accept_with(answer);
                Ok(pump(&upstream, &stream, resumable).await)
            }
            Err(e) => {
                // A resume whose connector session broke on the way (a loss that suspends the
                // connector's streams, not its `GOAWAY(shutdown)`) is asked again: the
                // connector still holds the stream and comes back, and `session-lost` would
                // read as "stream is gone" and end it at the agent.
                let code = match &resume {
                    Resume::Of { .. } if relay_code(&e, true) == ErrorCode::Suspended => {
                        ErrorCode::NoRoute
                    }
                    _ => e.code(),
                };
                // The agent's own reset, passed on by the pump (a local reset of this side),
                // is not a refusal.
                if !matches!(e, tunnel::StreamError::LocalReset { .. }) {
                    let reason = Clean(&e.to_string()).to_string();
                    shared
                        .ops
                        .metrics
                        .refused(code, &id.token_id, &dest_text, &reason);
                }
                stream.refuse(code, &e.to_string());
                Err(e)
            }
        }
    };
    let (up_end, rest) = if resumable {
        // End-to-end acknowledgements cross the DMZ beside the pumps, and after them until
        // each end has acknowledged the other's last byte and FIN (lazy ACKs come up to 20 ms
        // after, and one that left earlier may still be on its way): an end whose FIN is never
        // acknowledged would hold its stream (and the service's socket) until its session ends.
        let mut passed = Passed::default();
        let both = async { tokio::join!(up, rest) };
        tokio::pin!(both);
        let r = tokio::select! {
            r = &mut both => r,
            _ = relay_acks(&stream, &upstream, &mut passed, None) => both.await,
        };
        if matches!(&r, (PumpEnd::Done, Ok(PumpEnd::Done))) {
            // Offsets count the stream's bytes since its start: this path carried them from
            // where each end's peer said it had received (0 for a new stream).
            let (agent_base, connector_base) = match &resume {
                Resume::Of { recv, .. } => (
                    upstream
                        .open_meta()
                        .get(keys::RECV)
                        .and_then(tunnel::resume::parse_offset)
                        .unwrap_or(0),
                    *recv,
                ),
                _ => (0, 0),
            };
            // The bases come from the ends (the connector checks an agent's before it resumes):
            // saturating, so that no value makes this overflow.
            let need = (
                agent_base
                    .saturating_add(stream.byte_counts().0)
                    .saturating_add(1),
                connector_base
                    .saturating_add(upstream.byte_counts().0)
                    .saturating_add(1),
            );
            let _ = tokio::time::timeout(
                ACK_LINGER,
                relay_acks(&stream, &upstream, &mut passed, Some(need)),
            )
            .await;
        }
        r
    } else {
        tokio::join!(up, rest)
    };
    let bytes_up = stream.byte_counts().0;
    let bytes_down = upstream.byte_counts().0;
    shared.ops.metrics.bytes(bytes_up, bytes_down);
    let why = |p: &PumpEnd| match p {
        PumpEnd::SourceFailed(e) | PumpEnd::DestFailed(e) => Some(e.to_string()),
        PumpEnd::Done => None,
    };
    let outcome = match &rest {
        Err(e) => format!("refused: {}", Clean(&e.to_string())),
        Ok(down_end) => match why(&up_end).or_else(|| why(down_end)) {
            None => "closed".to_string(),
            Some(e) => format!("reset: {e}"),
        },
    };
    info!(
        target: "audit", event = "close", token = %id.token_id, name = %id.name, client = %client_ip, %agent, dest = %dest_text,
        connector = %chosen.connector, bytes_up, bytes_down, duration_ms = started.elapsed().as_millis() as u64,
        %outcome, "stream closed"
    );
}
