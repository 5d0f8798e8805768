//! The HTTP fallback transport: the same session over ordinary HTTPS requests.
//!
//! When a proxy strips WebSocket upgrades (squid's default with `ssl_bump`), the session's
//! messages travel in plain HTTP/1.1 requests instead, on the gateway's port and under its path
//! prefix (`…/agent/http`):
//!
//! | request | what it carries |
//! |---|---|
//! | `POST …/agent/http` | creates a session: body = an opaque first message (the inner-channel hello), answer = `sallyport-session: <id>` and an opaque reply |
//! | `POST …/agent/http/<id>?seq=N&ack=A` | messages `N, N+1, …` up, batched; `A` = downstream messages received so far |
//! | `GET …/agent/http/<id>?ack=A&mode=stream` | messages from `A` down, in a chunked response that stays open (up to a bound) |
//! | `GET …/agent/http/<id>?ack=A&mode=poll` | long-poll: ends as soon as it holds messages, or after a bounded wait |
//! | `DELETE …/agent/http/<id>` | ends the session |
//!
//! Bodies are records `u32 length | message`; a zero-length record down is a keepalive.
//! **Ordered, acknowledged, nothing lost or duplicated**: every upstream message has an index;
//! the agent resends a failed batch with the same `seq` and the gateway skips what it already
//! has. The gateway keeps each downstream message until acknowledged (in the next `GET`, or in a
//! `POST`, which the agent sends on its own when it has received much since the last ack) and a
//! new `GET` resends from its `ack`. The session id is not a secret: every request is
//! authenticated, with the bearer token, or, inside the inner channel (where the token must not
//! show), with `sallyport-mac: HMAC-SHA256(request key, "<method> <id> <seq> <ack> <body length>\n" || body)` under the
//! random request key the agent sent inside the inner hello.
//!
//! A proxy that buffers whole responses holds back a streamed `GET` forever: the gateway sends
//! a keepalive record at once, and when none arrives within [`BUFFERING_DETECT`] the agent
//! switches to long-poll.
//!
//! [`client`] is the agent's side (hyper client connections over streams the caller dials);
//! [`server`] holds the gateway's per-session state and request handlers, which the gateway's
//! HTTP server calls after routing and authentication.

pub mod client;
pub mod server;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use hmac::{Hmac, Mac};
use std::time::Duration;

/// Header with the session id in the answer to a create request.
pub const SESSION_HEADER: &str = "sallyport-session";
/// Header with a random per-session value, on every request: what a load balancer in front of
/// several gateway instances hashes on (nginx `hash $http_sallyport_affinity consistent`).
pub const AFFINITY_HEADER: &str = "sallyport-affinity";
/// Header with the request MAC (inner-channel sessions).
pub const MAC_HEADER: &str = "sallyport-mac";
/// Largest upstream batch (one `POST` body) and largest long-poll answer.
pub const MAX_BATCH: usize = 1024 * 1024;
/// Largest single message (a frame of 64 KiB plus header plus inner-channel overhead).
pub const MAX_MESSAGE: usize = 1024 * 1024;
/// When a streamed response shows no byte within this, a proxy is buffering it.
pub const BUFFERING_DETECT: Duration = Duration::from_secs(3);
/// How long a streamed response stays open before the agent asks again.
pub const STREAM_FOR: Duration = Duration::from_secs(50);
/// Keepalive record interval in a streamed response (below common proxy idle timeouts).
pub const KEEPALIVE_EVERY: Duration = Duration::from_secs(15);
/// How long a long-poll waits for something to send.
pub const POLL_WAIT: Duration = Duration::from_secs(20);
/// A session with no request for this long is gone.
pub const IDLE_EXPIRY: Duration = Duration::from_secs(75);

/// How the downstream direction is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DownMode {
    /// One long chunked response.
    Stream,
    /// Long-poll: one response per batch.
    Poll,
}

impl DownMode {
    pub fn as_str(self) -> &'static str {
        match self {
            DownMode::Stream => "stream",
            DownMode::Poll => "poll",
        }
    }
}

/// Appends one record.
pub fn put_record(out: &mut BytesMut, msg: &[u8]) {
    out.put_u32(msg.len() as u32);
    out.put_slice(msg);
}

/// Why a body could not be read as records.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("record of {0} bytes exceeds the limit")]
    TooLarge(usize),
    #[error("body ends inside a record")]
    Truncated,
}

/// Splits records off the front of `buf` as they complete (a streamed body arrives in pieces).
/// `None` when more bytes are needed; zero-length records come out as empty messages.
pub fn take_record(buf: &mut BytesMut) -> Result<Option<Bytes>, RecordError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let n = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if n > MAX_MESSAGE {
        return Err(RecordError::TooLarge(n));
    }
    if buf.len() < 4 + n {
        return Ok(None);
    }
    buf.advance(4);
    Ok(Some(buf.split_to(n).freeze()))
}

/// Every record of a complete body.
pub fn parse_records(body: Bytes) -> Result<Vec<Bytes>, RecordError> {
    let mut buf = BytesMut::from(&body[..]);
    let mut out = Vec::new();
    while let Some(m) = take_record(&mut buf)? {
        out.push(m);
    }
    if !buf.is_empty() {
        return Err(RecordError::Truncated);
    }
    Ok(out)
}

/// The MAC of one request (see the module docs): method, session, positions and body.
pub fn request_mac(
    key: &[u8; 32],
    method: &str,
    sid: &str,
    seq: u64,
    ack: u64,
    body: &[u8],
) -> String {
    hex::encode(
        mac_of(key, method, sid, seq, ack, body)
            .finalize()
            .into_bytes(),
    )
}

/// The MAC of a protocol v2 request: method, session, positions and the body's length; the
/// body itself is sealed records, whose AEAD protects them (a changed body ends the session as
/// surely as a cut connection would, and no one without the session keys can make one that
/// opens).
pub fn request_mac_head(
    key: &[u8; 32],
    method: &str,
    sid: &str,
    seq: u64,
    ack: u64,
    body_len: usize,
) -> String {
    hex::encode(
        head_mac(key, method, sid, seq, ack, body_len)
            .finalize()
            .into_bytes(),
    )
}

/// Checks a presented [`request_mac_head`] in constant time.
pub fn verify_mac_head(
    key: &[u8; 32],
    method: &str,
    sid: &str,
    seq: u64,
    ack: u64,
    body_len: usize,
    presented: &str,
) -> bool {
    let Ok(raw) = hex::decode(presented.trim()) else {
        return false;
    };
    head_mac(key, method, sid, seq, ack, body_len)
        .verify_slice(&raw)
        .is_ok()
}

fn head_mac(
    key: &[u8; 32],
    method: &str,
    sid: &str,
    seq: u64,
    ack: u64,
    body_len: usize,
) -> Hmac<sha2::Sha256> {
    let mut m = <Hmac<sha2::Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key");
    // A distinct label: a v2 head MAC never verifies as a v1 MAC or the other way round.
    m.update(format!("v2 {method} {sid} {seq} {ack} {body_len}\n").as_bytes());
    m
}

fn mac_of(
    key: &[u8; 32],
    method: &str,
    sid: &str,
    seq: u64,
    ack: u64,
    body: &[u8],
) -> Hmac<sha2::Sha256> {
    let mut m = <Hmac<sha2::Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key");
    m.update(format!("{method} {sid} {seq} {ack} {}\n", body.len()).as_bytes());
    m.update(body);
    m
}

/// Checks a presented MAC in constant time.
pub fn verify_mac(
    key: &[u8; 32],
    method: &str,
    sid: &str,
    seq: u64,
    ack: u64,
    body: &[u8],
    presented: &str,
) -> bool {
    let Ok(raw) = hex::decode(presented.trim()) else {
        return false;
    };
    mac_of(key, method, sid, seq, ack, body)
        .verify_slice(&raw)
        .is_ok()
}

/// Query parameters of a session request.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Query {
    pub seq: u64,
    pub ack: u64,
    pub poll: bool,
}

/// Parses `seq=N&ack=A&mode=stream|poll` (unknown keys ignored, bad numbers refused).
pub fn parse_query(q: &str) -> Result<Query, String> {
    let mut out = Query::default();
    for part in q.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').unwrap_or((part, ""));
        match k {
            "seq" => out.seq = v.parse().map_err(|_| format!("bad seq {v:?}"))?,
            "ack" => out.ack = v.parse().map_err(|_| format!("bad ack {v:?}"))?,
            "mode" => out.poll = v == "poll",
            _ => {}
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_split_across_pieces_and_refuse_garbage() {
        let mut body = BytesMut::new();
        put_record(&mut body, b"one");
        put_record(&mut body, b"");
        put_record(&mut body, &[7u8; 1000]);
        let whole = body.freeze();
        // Fed one byte at a time, the same records come out.
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for b in whole.iter() {
            buf.put_u8(*b);
            while let Some(m) = take_record(&mut buf).unwrap() {
                got.push(m);
            }
        }
        assert_eq!(got, parse_records(whole.clone()).unwrap());
        assert_eq!(got.len(), 3);
        assert_eq!(&got[0][..], b"one");
        assert!(got[1].is_empty());
        assert_eq!(
            parse_records(whole.slice(..whole.len() - 1)),
            Err(RecordError::Truncated)
        );
        let mut huge = BytesMut::new();
        huge.put_u32(u32::MAX);
        assert!(matches!(
            take_record(&mut huge),
            Err(RecordError::TooLarge(_))
        ));
    }

    #[test]
    fn record_headers_cut_short_wait_and_the_size_limit_is_inclusive() {
        // A header cut short: more bytes needed, nothing consumed; a whole body: truncated.
        for n in 0..4 {
            let mut buf = BytesMut::from(&[0u8, 0, 0, 5][..n]);
            assert_eq!(take_record(&mut buf), Ok(None));
            assert_eq!(buf.len(), n);
        }
        assert_eq!(
            parse_records(Bytes::from_static(&[0, 0, 1])),
            Err(RecordError::Truncated)
        );
        assert_eq!(
            parse_records(Bytes::from_static(&[0, 0, 0, 2, 9])),
            Err(RecordError::Truncated)
        );
        // Exactly MAX_MESSAGE is allowed (waits for its bytes); one more is refused at once.
        let mut at_limit = BytesMut::new();
        at_limit.put_u32(MAX_MESSAGE as u32);
        assert_eq!(take_record(&mut at_limit), Ok(None));
        let mut over = BytesMut::new();
        over.put_u32(MAX_MESSAGE as u32 + 1);
        assert_eq!(
            take_record(&mut over),
            Err(RecordError::TooLarge(MAX_MESSAGE + 1))
        );
        assert_eq!(parse_records(Bytes::new()), Ok(vec![]));
    }

    #[test]
    fn macs_bind_method_session_and_positions() {
        let k = [9u8; 32];
        let mac = request_mac(&k, "POST", "abc", 3, 4, b"body");
        assert!(verify_mac(&k, "POST", "abc", 3, 4, b"body", &mac));
        assert!(!verify_mac(&k, "GET", "abc", 3, 4, b"body", &mac));
        assert!(!verify_mac(&k, "POST", "abd", 3, 4, b"body", &mac));
        assert!(!verify_mac(&k, "POST", "abc", 4, 4, b"body", &mac));
        assert!(!verify_mac(&[1u8; 32], "POST", "abc", 3, 4, b"body", &mac));
        assert!(!verify_mac(&k, "POST", "abc", 3, 4, b"body", "zz"));
        // The body is covered: a swapped or cut body fails.
        assert!(!verify_mac(&k, "POST", "abc", 3, 4, b"bodx", &mac));
        assert!(!verify_mac(&k, "POST", "abc", 3, 4, b"bod", &mac));
        // v2: the head and the body's length.
        let head = request_mac_head(&k, "POST", "abc", 3, 4, 4);
        assert!(verify_mac_head(&k, "POST", "abc", 3, 4, 4, &head));
        assert!(!verify_mac_head(&k, "POST", "abc", 3, 4, 5, &head));
        assert!(!verify_mac_head(&k, "POST", "abc", 4, 4, 4, &head));
        assert!(!verify_mac(&k, "POST", "abc", 3, 4, b"body", &head));
    }

    #[test]
    fn queries_parse_and_refuse_bad_numbers() {
        assert_eq!(
            parse_query("seq=5&ack=7&mode=poll").unwrap(),
            Query {
                seq: 5,
                ack: 7,
                poll: true
            }
        );
        assert_eq!(parse_query("").unwrap(), Query::default());
        assert!(parse_query("seq=-1").is_err());
        assert!(parse_query("seq").is_err());
        assert!(parse_query("ack=&seq=1").is_err());
        assert!(parse_query("seq=1+1").is_err());
        // Unknown keys and modes are ignored: anything but `poll` streams.
        assert_eq!(
            parse_query("x=1&&mode=POLL&=&seq=2").unwrap(),
            Query {
                seq: 2,
                ack: 0,
                poll: false
            }
        );
        assert!(parse_query("ack=99999999999999999999999").is_err());
    }
}
