//! The transport trait: what carries a session's frames, and an in-memory transport for tests.
//!
//! A transport moves whole messages in order, both ways, like a WebSocket does. The session
//! splits it into a sending half (owned by the writer task) and a receiving half (owned by the
//! reader task), so reading never waits for writing. One file (or folder) per transport:
//! [`ws`] (WebSocket over any byte stream), [`http`] (the HTTP fallback: POSTs up, a streamed
//! or long-polled GET down), and the in-memory pair below for tests. A new transport goes here,
//! behind the same two traits, without the protocol knowing.

pub mod http;
pub mod ws;
pub mod wsframe;

use bytes::Bytes;
use std::future::Future;
use tokio::sync::mpsc;

/// Why a transport stopped.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TransportError {
    #[error("transport closed")]
    Closed,
    #[error("message of {0} bytes exceeds the limit")]
    TooLarge(usize),
    #[error("{0}")]
    Io(String),
    #[error("peer sent a non-binary message")]
    NotBinary,
}

/// One message for a session's writer: an encoded frame, or a `DATA` frame as its stream and
/// payload apart, which a transport may write without joining them into one buffer
/// ([`TransportTx::send_data`]): a payload the DMZ received on one session leaves on the other
/// as the very bytes it arrived in.
#[derive(Debug, Clone)]
pub enum Outgoing {
    Frame(Bytes),
    Data { stream: u32, payload: Bytes },
}

impl Outgoing {
    /// The encoded frame in one buffer (a copy for `Data`).
    pub fn into_bytes(self) -> Bytes {
        match self {
            Outgoing::Frame(b) => b,
            Outgoing::Data { stream, payload } => crate::frame::encode_data(stream, &payload),
        }
    }
}

/// The sending half of a transport.
pub trait TransportTx: Send + 'static {
    /// Queues one message; it may sit in a buffer until [`TransportTx::flush`].
    fn send(&mut self, msg: Bytes) -> impl Future<Output = Result<(), TransportError>> + Send;
    /// Queues a `DATA` frame of `stream` carrying `payload`; by default encoded into one
    /// message (a copy), which a transport that writes header and payload apart avoids.
    fn send_data(
        &mut self,
        stream: u32,
        payload: Bytes,
    ) -> impl Future<Output = Result<(), TransportError>> + Send {
        self.send(crate::frame::encode_data(stream, &payload))
    }
    /// Pushes every queued message towards the peer.
    fn flush(&mut self) -> impl Future<Output = Result<(), TransportError>> + Send;
    /// Closes the sending direction (a WebSocket close frame).
    fn close(&mut self) -> impl Future<Output = ()> + Send;
}

/// The receiving half of a transport.
pub trait TransportRx: Send + 'static {
    /// The next message, or `None` when the peer closed in order.
    fn recv(&mut self) -> impl Future<Output = Result<Option<Bytes>, TransportError>> + Send;
}

/// A bidirectional message transport that can be split into its two halves.
pub trait Transport: Send + 'static {
    type Tx: TransportTx;
    type Rx: TransportRx;
    fn split(self) -> (Self::Tx, Self::Rx);
}

/// One end of an in-memory transport (see [`memory_pair`]).
pub struct MemoryTransport {
    pub tx: MemoryTx,
    pub rx: MemoryRx,
}

pub struct MemoryTx(Option<mpsc::Sender<Bytes>>);
pub struct MemoryRx(mpsc::Receiver<Bytes>);

/// Two connected in-memory transports; each direction buffers at most `capacity` messages, so
/// a stalled peer pushes back like a full socket would.
pub fn memory_pair(capacity: usize) -> (MemoryTransport, MemoryTransport) {
    let (a_tx, b_rx) = mpsc::channel(capacity);
    let (b_tx, a_rx) = mpsc::channel(capacity);
    (
        MemoryTransport {
            tx: MemoryTx(Some(a_tx)),
            rx: MemoryRx(a_rx),
        },
        MemoryTransport {
            tx: MemoryTx(Some(b_tx)),
            rx: MemoryRx(b_rx),
        },
    )
}

impl MemoryTransport {
    /// Sends one raw message (tests use this to play a misbehaving peer).
    pub async fn send_raw(&mut self, msg: Bytes) -> Result<(), TransportError> {
        self.tx.send(msg).await
    }
    /// Receives one raw message.
    pub async fn recv_raw(&mut self) -> Result<Option<Bytes>, TransportError> {
        self.rx.recv().await
    }
}

impl TransportTx for MemoryTx {
    async fn send(&mut self, msg: Bytes) -> Result<(), TransportError> {
        match &self.0 {
            Some(tx) => tx.send(msg).await.map_err(|_| TransportError::Closed),
            None => Err(TransportError::Closed),
        }
    }
    async fn flush(&mut self) -> Result<(), TransportError> {
        Ok(())
    }
    async fn close(&mut self) {
        self.0 = None;
    }
}

impl TransportRx for MemoryRx {
    async fn recv(&mut self) -> Result<Option<Bytes>, TransportError> {
        Ok(self.0.recv().await)
    }
}

impl Transport for MemoryTransport {
    type Tx = MemoryTx;
    type Rx = MemoryRx;
    fn split(self) -> (MemoryTx, MemoryRx) {
        (self.tx, self.rx)
    }
}
