//! # sallyport-tunnel: the wire protocol
//!
//! Many streams (one per app connection) multiplexed over one session, over any transport that
//! carries whole messages in order (WebSocket, the HTTP fallback, the inner channel over either,
//! an in-memory pair in tests). This crate knows nothing of sockets, proxies, TLS or
//! configuration:
//!
//! | file | layer |
//! |---|---|
//! | [`frame`] | frame types and their encoding; pure |
//! | `machine` | the session's rules as an I/O-free state machine (`now` and frames in, frames out): credit, stream ids, resets, limits, liveness; unit-tested without a runtime |
//! | [`session`] | the session: hello, then the reader, writer and pinger tasks that drive the machine |
//! | [`stream`] | one stream: `AsyncRead`/`AsyncWrite` and the chunk API relays use |
//! | [`mod@splice`] | the one copy loop joining a stream (or any byte stream) to a socket; holds a buffer only while data waits |
//! | [`datagram`] | datagram associations (SOCKS5 UDP) as I/O-free rules: bounded queues, drops |
//! | [`association`] | one association: send and receive datagrams |
//! | [`transport`] | the transport traits and an in-memory pair for tests; one file per transport beneath: |
//! | [`transport::ws`] | the WebSocket transport over any byte stream |
//! | [`transport::http`] | the HTTP fallback transport (POSTs up, a streamed or long-polled GET down) |
//! | [`inner`] | the inner channel: Noise bound to the gateway's key, inside either transport |
//! | [`token`] | version 2 tokens: the secret, the signed claims, the issuer; pure |
//! | [`handshake`] | version 2's Noise XK handshake bound to the token; pure |
//! | [`meta`] | well-known `OPEN` metadata keys (identity the DMZ stamps) |
//!
//! See `docs/protocol.md` for the wire format and the flow-control rules.

#![forbid(unsafe_code)]

pub mod association;
pub mod datagram;
pub mod frame;
pub mod handshake;
pub mod inner;
mod machine;
pub mod renew;
pub mod resumable;
pub mod resume;
pub mod session;
pub mod splice;
pub mod stream;
pub mod token;
pub mod transport;
pub mod window;

pub use association::{Association, Datagram};
pub use datagram::Dropped;
pub use frame::{Dest, ErrorCode, Frame, Hello, Meta, Role, PROTOCOL_VERSION};
pub use session::{Config, Incoming, Session, SessionError, SessionStats, StreamError};
pub use splice::{splice, splice_chunks, splice_fresh, Chunks};
pub use stream::{OpenRequest, Stream};
/// The transports, also at the crate root: `tunnel::ws`, `tunnel::http`.
pub use transport::{http, ws};
pub use transport::{
    memory_pair, MemoryTransport, Transport, TransportError, TransportRx, TransportTx,
};

/// Well-known keys of `OPEN` metadata.
pub mod meta {
    /// Prefix of every identity key; the DMZ removes all of them from an agent's `OPEN` and
    /// writes its own, so whatever an agent claims about itself is ignored.
    pub const IDENTITY_PREFIX: &str = "sp-id-";
    /// Token id of the authenticated agent.
    pub const TOKEN_ID: &str = "sp-id-token";
    /// Name of the authenticated agent's token (a user or machine name).
    pub const NAME: &str = "sp-id-name";
    /// Comma-separated groups of the authenticated agent.
    pub const GROUPS: &str = "sp-id-groups";
    /// Address the agent's session came from, as the DMZ saw it.
    pub const CLIENT_ADDR: &str = "sp-id-client";
    /// DMZ instance that switched the stream.
    pub const DMZ_INSTANCE: &str = "sp-id-dmz";
    /// Set by the agent: which local front end the stream came from (socks5, http, forward).
    pub const FRONT: &str = "sp-front";
}
