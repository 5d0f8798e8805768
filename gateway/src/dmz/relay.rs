//! Relaying one stream between two sessions (agent ↔ connector) in the DMZ.
//!
//! The DMZ is a switch, not a terminator: it moves each received `DATA` payload to the other
//! session as it came, without an intermediate socket buffer. Credit is hop by hop: a payload
//! leaves the source stream's buffer (returning credit to its sender) when the pump takes it, and
//! the pump takes the next one only once the destination accepted the last, so per direction the
//! DMZ holds at most one stream window in the source buffer plus one frame in the pump plus what
//! the destination's own queue limit allows. A slow agent slows only its own stream, never the
//! connector session it shares with others.

use bytes::Bytes;
use std::future::poll_fn;
use std::task::Poll;
use tunnel::{ErrorCode, Stream, StreamError};

/// How a pump ended.
pub enum PumpEnd {
    /// Source finished (FIN forwarded).
    Done,
    /// The source failed: the destination was reset with the same code.
    SourceFailed(StreamError),
    /// The destination failed: the source was reset.
    DestFailed(StreamError),
}

/// Copies `src` → `dst` chunk by chunk until `src` ends; propagates FIN and resets.
/// `resumable`: the path of a resumable stream, where a side that lost its session makes the
/// other side suspend (`RST(suspended)`) instead of ending.
pub async fn pump(src: &Stream, dst: &Stream, resumable: bool) -> PumpEnd {
    loop {
        let chunk: Bytes = match src.recv_chunk().await {
            Ok(Some(c)) => c,
            Ok(None) => {
                dst.finish();
                return PumpEnd::Done;
            }
            Err(e) => {
                dst.reset(relay_code(&e, resumable), &e.to_string());
                return PumpEnd::SourceFailed(e);
            }
        };
        let mut chunk = chunk;
        while !chunk.is_empty() {
            // Wait for room on the destination, but notice a source that dies meanwhile (an app
            // that gave up while the service stopped reading): otherwise both streams, the
            // relay task and its permit would stay until the service moved.
            let sent = poll_fn(|cx| {
                if let Poll::Ready(e) = src.poll_failed(cx) {
                    return Poll::Ready(Err((true, e)));
                }
                // The payload goes on as the bytes it arrived in (no copy).
                dst.poll_send_bytes(cx, &mut chunk).map_err(|e| (false, e))
            })
            .await;
            match sent {
                Ok(_) => {}
                Err((true, e)) => {
                    dst.reset(relay_code(&e, resumable), &e.to_string());
                    return PumpEnd::SourceFailed(e);
                }
                Err((false, e)) => return dest_failed(src, e, resumable),
            }
        }
    }
}

fn dest_failed(src: &Stream, e: StreamError, resumable: bool) -> PumpEnd {
    // A refused open (OPEN_ERR) is answered to the source by the caller as OPEN_ERR, which
    // carries the reason to the app better than a reset would.
    if !matches!(e, StreamError::Refused { .. }) {
        src.reset(relay_code(&e, resumable), &e.to_string());
    }
    PumpEnd::DestFailed(e)
}

/// The code a reset carries on to the other side: the same one, so "refused by the service"
/// or "cancelled by the app" reaches the far end as such. On a resumable path, a side whose
/// session was lost makes the other suspend; `suspended` itself is the DMZ's word only: a
/// peer that sends it is passed on as `cancelled` (it cannot park streams at the far end).
pub(crate) fn relay_code(e: &StreamError, resumable: bool) -> ErrorCode {
    match e {
        StreamError::Reset {
            code: ErrorCode::Suspended,
            ..
        } => ErrorCode::Cancel,
        // The agent or connector said it is stopping: the streams it held end with it (a
        // stopping connector's apps learn at once, not after the grace).
        StreamError::SessionLost(tunnel::SessionError::GoAway {
            code: ErrorCode::Shutdown,
            ..
        }) => ErrorCode::Shutdown,
        StreamError::SessionLost(_) if resumable && tunnel::resumable::suspends(e) => {
            ErrorCode::Suspended
        }
        _ => e.code(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A peer's `suspended` would park the far end's streams at will: it is passed on as
    /// `cancelled`; other codes go on as they are.
    #[test]
    fn a_peers_suspended_is_passed_on_as_cancelled() {
        let reset = |code| StreamError::Reset {
            code,
            reason: "test".into(),
        };
        for resumable in [false, true] {
            assert_eq!(
                relay_code(&reset(ErrorCode::Suspended), resumable),
                ErrorCode::Cancel
            );
            assert_eq!(
                relay_code(&reset(ErrorCode::Refused), resumable),
                ErrorCode::Refused
            );
        }
    }
}
