//! Protocol policy on a stream the connector accepted: when the rules that allowed it name a
//! protocol, hold back the client's first bytes (at most [`PEEK_CAP`], within
//! `protocol_timeout`), judge them, and either hand them to the service or reset the stream
//! and write the audit line saying who, where, which rule and what was seen.
//!
//! The service is already connected (`OPEN_OK` is queued: SOCKS clients wait for it before
//! they speak; to an `OPEN` that came with data it goes lazily, with the next frames), but
//! nothing it sends is read, so nothing reaches the client, until the client's
//! bytes passed: a server that speaks first (an SSH banner, a database greeting) waits in the
//! socket buffer.

use super::ConnectorConfig;
use crate::policy::{self, Requirement, Verdict, Who, PEEK_CAP};
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::info;
use tunnel::resumable::Resumable;
use tunnel::{ErrorCode, Stream};

/// The connector's end of a stream, plain or resumable: read, and reset for good.
pub(super) trait End: tokio::io::AsyncRead + Unpin {
    fn reset_with(&mut self, code: ErrorCode, reason: &str);
}

impl End for Stream {
    fn reset_with(&mut self, code: ErrorCode, reason: &str) {
        self.reset(code, reason);
    }
}

impl End for Resumable {
    fn reset_with(&mut self, code: ErrorCode, reason: &str) {
        self.reset(code, reason);
    }
}

/// The stream's identity and destination, as the audit lines name them.
pub(super) struct Audit<'a> {
    pub token: &'a str,
    pub user: &'a str,
    pub client: &'a str,
    pub dest: &'a tunnel::Dest,
    pub addr: SocketAddr,
}

/// Checks the client's first bytes against the protocols the rules allowing this stream name,
/// and forwards them to `tcp`. `false`: the stream was reset (a violation, a client that never
/// spoke, or a failure), and the audit line is written.
pub(super) async fn admit(
    config: &ConnectorConfig,
    stream: &mut impl End,
    tcp: &mut TcpStream,
    who: &Who<'_>,
    audit: &Audit<'_>,
) -> bool {
    let Ok(host) = policy::parse_host(&audit.dest.host) else {
        return true; // dial_checked refused such a host already
    };
    let Some(need) = config
        .policy
        .protocols(&host, audit.dest.port, who, audit.addr.ip())
    else {
        return true; // a rule allowing it says `any`
    };
    let deadline = tokio::time::Instant::now() + config.protocol_timeout;
    let (buf, verdict, timed_out) = peek(stream, &need, deadline).await;
    match verdict {
        Ok(Verdict::Pass { seen, rule }) => {
            info!(target: "audit", event = "protocol", token = %audit.token, name = %audit.user, client = %audit.client,
                dest = %audit.dest, %rule, %seen, "protocol allowed");
            if let Err(e) = tcp.write_all(&buf).await {
                stream.reset_with(
                    ErrorCode::Cancel,
                    &format!("connection to the service failed ({e})"),
                );
                return false;
            }
            true
        }
        Ok(Verdict::Fail {
            seen,
            rules,
            wanted,
        }) => {
            let seen = if timed_out {
                format!("{seen} within {:?}", config.protocol_timeout)
            } else {
                seen
            };
            let reason = format!("{} allows only {wanted}: saw {seen}", audit.dest);
            info!(target: "audit", event = "violation", token = %audit.token, name = %audit.user, client = %audit.client,
                dest = %audit.dest, addr = %audit.addr, rule = %rules, %seen, "stream reset: protocol not allowed");
            let who = crate::logsafe::Clean(audit.user).to_string();
            config.ops.metrics.refused(
                ErrorCode::NotAllowed,
                &who,
                &audit.dest.to_string(),
                &reason,
            );
            stream.reset_with(ErrorCode::NotAllowed, &reason);
            false
        }
        Ok(Verdict::More) | Err(_) => {
            // The agent's side went away while we waited: nothing to say to it.
            info!(target: "audit", event = "close", token = %audit.token, name = %audit.user, client = %audit.client,
                dest = %audit.dest, bytes_up = buf.len(), "stream closed before its first bytes were checked");
            false
        }
    }
}

/// Reads the client's bytes may arrive in before the check decides: each read judges everything
/// held so far again, so a client trickling a byte at a time cannot make it quadratic beyond
/// this.
const MAX_READS: usize = 64;

/// Reads the client's first bytes until the requirement decides, the client ends, `PEEK_CAP`
/// bytes are held, `MAX_READS` reads were made or `deadline` passes (each of the last four
/// decides as "no more").
/// `Err`: the stream failed. The flag: the deadline passed.
async fn peek(
    stream: &mut impl End,
    need: &Requirement,
    deadline: tokio::time::Instant,
) -> (Vec<u8>, std::io::Result<Verdict>, bool) {
    let mut buf = Vec::with_capacity(1024);
    // On the heap, not in the future: every stream's task is as large as its largest await
    // state, and idle streams must stay light (tests: idle_streams_held_two_copy_buffers_each).
    let mut chunk = vec![0u8; 4096];
    let mut reads = 0;
    loop {
        let verdict = need.judge(&buf, buf.len() >= PEEK_CAP || reads >= MAX_READS);
        if verdict != Verdict::More {
            return (buf, Ok(verdict), false);
        }
        let room = (PEEK_CAP - buf.len()).min(chunk.len());
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk[..room])).await {
            Ok(Ok(0)) => {
                let verdict = need.judge(&buf, true);
                return (buf, Ok(verdict), false);
            }
            Err(_) => {
                let verdict = need.judge(&buf, true);
                return (buf, Ok(verdict), true);
            }
            Ok(Ok(n)) => {
                buf.extend_from_slice(&chunk[..n]);
                reads += 1;
            }
            Ok(Err(e)) => return (buf, Err(e), false),
        }
    }
}
