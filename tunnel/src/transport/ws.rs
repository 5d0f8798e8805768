//! WebSocket transport: one binary message per frame, over any byte stream.
//!
//! This module knows nothing of sockets or TLS: it takes an `AsyncRead + AsyncWrite` (a TLS
//! stream to the gateway, or an upgraded HTTP connection on the gateway side) and speaks
//! WebSocket on it. The message size limit matches the frame limit, so a peer cannot make us
//! buffer tungstenite's default of 64 MiB per message.

use crate::frame::HEADER_LEN;
use crate::transport::{Transport, TransportError, TransportRx, TransportTx};
use bytes::Bytes;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::{Role as WsRole, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

/// tungstenite's read buffer: allocated (and zeroed) for every connection and never shrunk, so
/// its default of 128 KiB was most of what an idle session cost the DMZ. A frame larger than
/// this still arrives whole (the buffer grows to the frame); only the read chunk is smaller.
pub const READ_BUFFER: usize = 8 * 1024;

/// The WebSocket configuration for a session whose largest `DATA` payload is `max_frame`.
pub fn config(max_frame: u32) -> WebSocketConfig {
    // The largest control frame (an OPEN with metadata, ROUTES) is bounded well below this.
    let frame =
        (max_frame as usize + HEADER_LEN).max(crate::frame::MAX_CONTROL_PAYLOAD + HEADER_LEN);
    // Inside the inner channel a message is a sealed frame: a few bytes more per chunk.
    let limit = frame + crate::inner::overhead(frame);
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .max_message_size(Some(limit))
        .max_frame_size(Some(limit))
        .write_buffer_size(128 * 1024)
        .max_write_buffer_size(4 * 1024 * 1024)
}

/// A session transport over a WebSocket.
pub struct WsTransport<S> {
    inner: WebSocketStream<S>,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> WsTransport<S> {
    /// Wraps the server side of an upgraded connection; `leftover` holds bytes read past the
    /// HTTP request head.
    pub async fn server(io: S, leftover: Vec<u8>, max_frame: u32) -> Self {
        let inner = WebSocketStream::from_partially_read(
            io,
            leftover,
            WsRole::Server,
            Some(config(max_frame)),
        )
        .await;
        WsTransport { inner }
    }
}

impl<S> WsTransport<S> {
    /// Wraps an already established WebSocket.
    pub fn from_stream(inner: WebSocketStream<S>) -> Self {
        WsTransport { inner }
    }
}

/// The HTTP answer of a gateway that refused the upgrade.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("gateway refused the upgrade with HTTP {status}: {body}")]
    Refused { status: u16, body: String },
    #[error("invalid gateway URL {url}: {reason}")]
    BadUrl { url: String, reason: String },
    /// The connection was cut (reset, closed, end of file) before the upgrade's answer: what a
    /// proxy that strips upgrades often does.
    #[error("WebSocket handshake failed: the connection was cut before the answer ({0})")]
    Cut(String),
    #[error("no answer to the WebSocket upgrade within {0:?}")]
    Timeout(std::time::Duration),
    #[error("WebSocket handshake failed: {0}")]
    Other(String),
}

impl HandshakeError {
    /// HTTP status of a refusal (401 for a bad token, 426 when a proxy stripped the upgrade).
    pub fn status(&self) -> Option<u16> {
        match self {
            HandshakeError::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// Performs the client side of the upgrade over `io` to `url` (a `ws://` or `wss://` URL; the
/// scheme only shapes the request, TLS is already in `io` or not). `bearer` goes into
/// `Authorization`.
pub async fn client<S>(
    io: S,
    url: &str,
    bearer: Option<&str>,
    max_frame: u32,
    timeout: std::time::Duration,
) -> Result<WsTransport<S>, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // A load balancer that accepts TLS and then stalls the upgrade must not hang the caller.
    tokio::time::timeout(timeout, client_inner(io, url, bearer, None, max_frame))
        .await
        .map_err(|_| HandshakeError::Timeout(timeout))?
        .map(|(t, _)| t)
}

/// The header that carries version 2's first handshake message in the upgrade request, and
/// the gateway's answer in the `101` (base64url): the handshake costs no extra round trip.
pub const HELLO_HEADER: &str = "sallyport-hello";

/// The upgrade for protocol version 2: `hello` (msg1, base64url) rides the request; returns
/// the transport and the `101`'s [`HELLO_HEADER`] value, if it had one.
pub async fn client_v2<S>(
    io: S,
    url: &str,
    hello: &str,
    max_frame: u32,
    timeout: std::time::Duration,
) -> Result<(WsTransport<S>, Option<String>), HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    tokio::time::timeout(timeout, client_inner(io, url, None, Some(hello), max_frame))
        .await
        .map_err(|_| HandshakeError::Timeout(timeout))?
}

async fn client_inner<S>(
    io: S,
    url: &str,
    bearer: Option<&str>,
    hello: Option<&str>,
    max_frame: u32,
) -> Result<(WsTransport<S>, Option<String>), HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut req = url
        .into_client_request()
        .map_err(|e| HandshakeError::BadUrl {
            url: url.to_string(),
            reason: e.to_string(),
        })?;
    if let Some(token) = bearer {
        let mut v = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
            HandshakeError::Other("token contains characters not allowed in a header".into())
        })?;
        v.set_sensitive(true);
        req.headers_mut().insert("authorization", v);
    }
    let version = match hello {
        Some(h) => {
            let v = HeaderValue::from_str(h)
                .map_err(|_| HandshakeError::Other("hello is not a header value".into()))?;
            req.headers_mut().insert(HELLO_HEADER, v);
            HeaderValue::from_static(concat!("2; ", env!("CARGO_PKG_VERSION")))
        }
        None => HeaderValue::from_static(concat!("1; ", env!("CARGO_PKG_VERSION"))),
    };
    req.headers_mut().insert("sallyport-protocol", version);
    match tokio_tungstenite::client_async_with_config(req, io, Some(config(max_frame))).await {
        Ok((inner, resp)) => {
            let reply = resp
                .headers()
                .get(HELLO_HEADER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            Ok((WsTransport { inner }, reply))
        }
        Err(tungstenite::Error::Http(resp)) => {
            let status = resp.status().as_u16();
            let body = resp
                .body()
                .as_ref()
                .map(|b| {
                    String::from_utf8_lossy(&b[..b.len().min(300)])
                        .trim()
                        .to_string()
                })
                .unwrap_or_default();
            Err(HandshakeError::Refused { status, body })
        }
        Err(e) => Err(classify(e)),
    }
}

/// A failed handshake, by cause: a cut connection is told apart from everything else by the
/// error's kind, never by its text.
fn classify(e: tungstenite::Error) -> HandshakeError {
    use std::io::ErrorKind;
    use tungstenite::error::ProtocolError;
    let cut = match &e {
        tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => true,
        tungstenite::Error::Io(io) => matches!(
            io.kind(),
            ErrorKind::ConnectionReset
                | ErrorKind::ConnectionAborted
                | ErrorKind::UnexpectedEof
                | ErrorKind::BrokenPipe
        ),
        tungstenite::Error::Protocol(ProtocolError::HandshakeIncomplete) => true,
        _ => false,
    };
    if cut {
        HandshakeError::Cut(e.to_string())
    } else {
        HandshakeError::Other(e.to_string())
    }
}

pub struct WsTx<S>(SplitSink<WebSocketStream<S>, Message>);
pub struct WsRx<S>(SplitStream<WebSocketStream<S>>);

fn map_err(e: tungstenite::Error) -> TransportError {
    match e {
        tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => {
            TransportError::Closed
        }
        tungstenite::Error::Capacity(c) => TransportError::Io(format!("message too large: {c}")),
        other => TransportError::Io(other.to_string()),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> TransportTx for WsTx<S> {
    async fn send(&mut self, msg: Bytes) -> Result<(), TransportError> {
        self.0.feed(Message::Binary(msg)).await.map_err(map_err)
    }
    async fn flush(&mut self) -> Result<(), TransportError> {
        self.0.flush().await.map_err(map_err)
    }
    async fn close(&mut self) {
        let _ = self.0.close().await;
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> TransportRx for WsRx<S> {
    async fn recv(&mut self) -> Result<Option<Bytes>, TransportError> {
        loop {
            match self.0.next().await {
                None => return Ok(None),
                Some(Err(e)) => return Err(map_err(e)),
                Some(Ok(Message::Binary(b))) => return Ok(Some(b)),
                Some(Ok(Message::Close(_))) => return Ok(None),
                // Transport-level pings are answered by tungstenite; liveness is ours (PING).
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                Some(Ok(Message::Text(_))) => return Err(TransportError::NotBinary),
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Transport for WsTransport<S> {
    type Tx = WsTx<S>;
    type Rx = WsRx<S>;
    fn split(self) -> (WsTx<S>, WsRx<S>) {
        let (tx, rx) = self.inner.split();
        (WsTx(tx), WsRx(rx))
    }
}

/// The `Sec-WebSocket-Accept` value for a client's `Sec-WebSocket-Key`.
pub fn accept_key(key: &[u8]) -> String {
    tungstenite::handshake::derive_accept_key(key)
}
