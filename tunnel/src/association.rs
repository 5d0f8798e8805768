//! One datagram association (SOCKS5 UDP): the application's handle.
//!
//! [`Association::send`] never waits: a datagram is queued for the writer or dropped at once (and
//! the caller counts why); [`Association::recv`] waits for the next received datagram. The rules
//! (bounded queues, what is dropped) are in `datagram.rs`, driven under the session's lock.
//! Dropping the handle closes the association (`DGRAM_CLOSE` to the peer).

use crate::datagram::Dropped;
use crate::frame::{Dest, ErrorCode, Meta};
use crate::session::Shared;
use bytes::Bytes;
use std::future::poll_fn;
use std::sync::Arc;
use std::task::Poll;

/// One received datagram: where it came from (a reply) or where it goes (from the opener).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Datagram {
    pub addr: Dest,
    pub payload: Bytes,
}

/// A datagram association on a session.
pub struct Association {
    id: u32,
    shared: Arc<Shared>,
    meta: Meta,
}

impl std::fmt::Debug for Association {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Association")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Association {
    pub(crate) fn new(id: u32, shared: Arc<Shared>, meta: Meta) -> Association {
        Association { id, shared, meta }
    }

    pub fn id(&self) -> u32 {
        self.id
    }

    /// The metadata of the peer's `DGRAM_OPEN` (empty for associations we opened).
    pub fn meta(&self) -> &Meta {
        &self.meta
    }

    /// Queues one datagram to (or, answering, from) `addr`; never waits. `Err` says why it was
    /// dropped.
    pub fn send(&self, addr: &Dest, payload: &[u8]) -> Result<(), Dropped> {
        // Read from an app's or a service's UDP socket: arrived bytes, like a copy loop's.
        crate::splice::note_arrival(payload.len());
        self.shared.lock().send_datagram(self.id, addr, payload)
    }

    /// The next datagram; `Err(code, reason)` once the association has ended (closed by the
    /// peer, or its session lost) and nothing is left to read.
    pub async fn recv(&self) -> Result<Datagram, (ErrorCode, String)> {
        poll_fn(|cx| {
            let mut st = self.shared.lock();
            match st.dgrams.recv(self.id, cx.waker()) {
                Ok(Some((addr, payload))) => Poll::Ready(Ok(Datagram { addr, payload })),
                Ok(None) => Poll::Pending,
                Err(e) => Poll::Ready(Err(e)),
            }
        })
        .await
    }

    /// Received datagrams dropped because this association's inbox was full, and datagrams
    /// received and sent so far.
    pub fn counts(&self) -> (u64, u64, u64) {
        let st = self.shared.lock();
        st.dgrams
            .assocs
            .get(&self.id)
            .map(|a| (a.dropped_in, a.datagrams_in, a.datagrams_out))
            .unwrap_or_default()
    }

    /// Why it ended, if it has.
    pub fn ended(&self) -> Option<(ErrorCode, String)> {
        let st = self.shared.lock();
        st.dgrams
            .assocs
            .get(&self.id)
            .and_then(|a| a.closed.clone())
    }

    /// Closes the association with `code` and `reason` for the peer.
    pub fn close(self, code: ErrorCode, reason: &str) {
        self.shared.lock().close_association(self.id, code, reason);
        // Drop finds the state gone and sends nothing more.
    }
}

impl Drop for Association {
    fn drop(&mut self) {
        self.shared
            .lock()
            .close_association(self.id, ErrorCode::Cancel, "association closed");
    }
}
