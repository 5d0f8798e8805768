//! One agent stream: checks (token routes, metadata, limits), routing to a connector,
//! identity stamping, the relay, and the audit lines.

use super::relay::{pump, PumpEnd};
use super::Shared;
use crate::auth::Identity;
use crate::logsafe::Clean;
use crate::policy::{self};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;
use tracing::info;
use tunnel::{meta, ErrorCode, Stream};

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
    let Some(chosen) = shared.router.pick(&host, dest.port) else {
        return refuse(
            stream,
            ErrorCode::NoRoute,
            format!("no connector serves {dest_text} (no connector that is up advertises it: it is in no allow-list, or its connector is down)"),
        );
    };
    m.set(meta::TOKEN_ID, id.token_id.clone());
    m.set(meta::NAME, id.name.clone());
    m.set(meta::GROUPS, id.groups.join(","));
    m.set(meta::CLIENT_ADDR, client_ip.to_string());
    m.set(meta::DMZ_INSTANCE, shared.config.instance_id.clone());
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
    let up = pump(&stream, &upstream);
    let rest = async {
        match upstream.opened().await {
            Ok(()) => {
                stream.accept();
                Ok(pump(&upstream, &stream).await)
            }
            Err(e) => {
                let reason = Clean(&e.to_string()).to_string();
                shared
                    .ops
                    .metrics
                    .refused(e.code(), &id.token_id, &dest_text, &reason);
                stream.refuse(e.code(), &e.to_string());
                Err(e)
            }
        }
    };
    let (up_end, rest) = tokio::join!(up, rest);
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
