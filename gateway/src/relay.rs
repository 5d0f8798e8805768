//! Relaying one stream between two sessions (agent ↔ connector) in the DMZ.
//!
//! The DMZ is a switch, not a terminator: it moves each received `DATA` payload to the other
//! session as it came, without an intermediate socket buffer. Credit is hop by hop: a payload
//! leaves the source stream's buffer (returning credit to its sender) only once the destination
//! stream has credit for it, so the DMZ holds at most one stream window per direction, and a
//! slow agent slows only its own stream, never the connector session it shares with others.

use bytes::{Buf, Bytes};
use std::future::poll_fn;
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
pub async fn pump(src: &Stream, dst: &Stream) -> PumpEnd {
    loop {
        let chunk: Bytes = match src.recv_chunk().await {
            Ok(Some(c)) => c,
            Ok(None) => {
                dst.finish();
                return PumpEnd::Done;
            }
            Err(e) => {
                dst.reset(relay_code(&e), &e.to_string());
                return PumpEnd::SourceFailed(e);
            }
        };
        let mut chunk = chunk;
        while !chunk.is_empty() {
            let cap = match poll_fn(|cx| dst.poll_send_capacity(cx)).await {
                Ok(c) => c,
                Err(e) => return dest_failed(src, e),
            };
            let n = cap.min(chunk.len());
            if let Err(e) = dst.send_chunk(&chunk[..n]) {
                return dest_failed(src, e);
            }
            chunk.advance(n);
        }
    }
}

fn dest_failed(src: &Stream, e: StreamError) -> PumpEnd {
    // A refused open (OPEN_ERR) is answered to the source by the caller as OPEN_ERR, which
    // carries the reason to the app better than a reset would.
    if !matches!(e, StreamError::Refused { .. }) {
        src.reset(relay_code(&e), &e.to_string());
    }
    PumpEnd::DestFailed(e)
}

/// The code a reset carries on to the other side: the same one, so "refused by the service"
/// or "cancelled by the app" reaches the far end as such.
fn relay_code(e: &StreamError) -> ErrorCode {
    e.code()
}
