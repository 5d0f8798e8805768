//! WebSocket transport: one binary message per frame, over any byte stream.
//!
//! This module knows nothing of sockets or TLS: it takes an `AsyncRead + AsyncWrite` (a TLS
//! stream to the gateway, or an upgraded HTTP connection on the gateway side) and speaks
//! WebSocket on it. The client's upgrade request is built by tungstenite (`generate_request`);
//! the answer is parsed here ([`parse_answer`]) so that the bytes read past it stay ours. After
//! the upgrade the framing is our own (`wsframe.rs`): a received message is a view of the bytes
//! read, a sent payload goes out beside its header in a vectored write, and neither side keeps a
//! buffer while the connection is idle. The message size limit matches the frame limit, so a
//! peer cannot make us buffer more than one frame per message; a `PING` from the peer (none of
//! ours sends one: liveness is the session's `PING` frame) is answered with our next write.

use crate::frame::HEADER_LEN;
use crate::transport::wsframe::{self, op, FrameError, From};
use crate::transport::{Transport, TransportError, TransportRx, TransportTx};
use bytes::{BufMut, Bytes, BytesMut};
use std::collections::VecDeque;
use std::future::poll_fn;
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{self};

/// How much the reader asks of the connection at once (a whole `DATA` frame). The buffer exists
/// only while bytes wait: a session whose connection has nothing to read holds none.
pub const READ_CHUNK: usize = 64 * 1024;

/// Bytes queued by [`TransportTx::send`] before they are written without waiting for a flush.
const WRITE_HIGH: usize = 256 * 1024;

/// Payloads up to this size are copied beside their header instead of written as a slice of
/// their own (a vectored write of many tiny slices costs more than the copy).
const COPY_SMALL: usize = 1024;

/// The largest WebSocket message of a session whose largest `DATA` payload is `max_frame`.
pub fn message_limit(max_frame: u32) -> usize {
    // The largest control frame (an OPEN with metadata, ROUTES) is bounded well below this.
    let frame =
        (max_frame as usize + HEADER_LEN).max(crate::frame::MAX_CONTROL_PAYLOAD + HEADER_LEN);
    // Inside the inner channel a message is a sealed frame: a few bytes more per chunk.
    frame + crate::inner::overhead(frame)
}

/// A session transport over a WebSocket connection whose upgrade is done.
pub struct WsTransport<S> {
    io: S,
    leftover: BytesMut,
    client: bool,
    max: usize,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> WsTransport<S> {
    /// Wraps the server side of an upgraded connection; `leftover` holds bytes read past the
    /// HTTP request head.
    pub async fn server(io: S, leftover: Vec<u8>, max_frame: u32) -> Self {
        WsTransport {
            io,
            leftover: BytesMut::from(&leftover[..]),
            client: false,
            max: message_limit(max_frame),
        }
    }

    /// Wraps the client side of a connection whose upgrade is done; `leftover` holds bytes
    /// read past the `101` answer.
    pub fn client_upgraded(io: S, leftover: &[u8], max_frame: u32) -> Self {
        WsTransport {
            io,
            leftover: BytesMut::from(leftover),
            client: true,
            max: message_limit(max_frame),
        }
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
    mut io: S,
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
    let (head, key) = tungstenite::handshake::client::generate_request(req)
        .map_err(|e| HandshakeError::Other(e.to_string()))?;
    io.write_all(&head).await.map_err(cut)?;
    io.flush().await.map_err(cut)?;
    // The answer's head; what follows it is the first WebSocket bytes (or a refusal's body).
    let mut buf = BytesMut::with_capacity(4096);
    let answer = loop {
        if io.read_buf(&mut buf).await.map_err(cut)? == 0 {
            return Err(HandshakeError::Cut(
                "connection closed before the answer".into(),
            ));
        }
        match parse_answer(&buf)? {
            Some(a) => break a,
            None if buf.len() > MAX_ANSWER_HEAD => {
                return Err(HandshakeError::Other(format!(
                    "the answer's head is over {MAX_ANSWER_HEAD} bytes"
                )))
            }
            None => {}
        }
    };
    let tail = buf.split_off(answer.head_len);
    if answer.status != 101 {
        let mut body = tail;
        // A refusal's body may follow its head in a second write: wait for it briefly.
        if body.len() < answer.content_length.unwrap_or(0).min(MAX_REFUSAL_BODY) {
            let more = tokio::time::timeout(std::time::Duration::from_millis(500), async {
                while body.len() < answer.content_length.unwrap_or(0).min(MAX_REFUSAL_BODY) {
                    if io.read_buf(&mut body).await.unwrap_or(0) == 0 {
                        break;
                    }
                }
            });
            let _ = more.await;
        }
        let text = String::from_utf8_lossy(&body[..body.len().min(300)])
            .trim()
            .to_string();
        return Err(HandshakeError::Refused {
            status: answer.status,
            body: text,
        });
    }
    if !answer.upgrade_websocket {
        return Err(HandshakeError::Other(
            "the 101 answer does not upgrade to websocket".into(),
        ));
    }
    if answer.accept.as_deref() != Some(accept_key(key.as_bytes()).as_str()) {
        return Err(HandshakeError::Other(
            "the 101 answer's Sec-WebSocket-Accept does not match our key".into(),
        ));
    }
    Ok((
        WsTransport::client_upgraded(io, &tail, max_frame),
        answer.hello,
    ))
}

/// The most bytes of an answer's head we read before giving up on it.
const MAX_ANSWER_HEAD: usize = 16 * 1024;
/// The most bytes of a refusal's body we wait for (its first 300 are shown).
const MAX_REFUSAL_BODY: usize = 4096;

/// What the client needs of the gateway's answer to the upgrade.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub head_len: usize,
    pub upgrade_websocket: bool,
    pub accept: Option<String>,
    pub hello: Option<String>,
    pub content_length: Option<usize>,
}

/// Parses the answer's head from the start of `buf`; `None` while it is incomplete. Lenient
/// where curl is (header case, `Connection: keep-alive, Upgrade`), strict where RFC 6455 is.
pub fn parse_answer(buf: &[u8]) -> Result<Option<Answer>, HandshakeError> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => {
            return Err(HandshakeError::Other(format!(
                "the gateway's answer is not HTTP: {e}"
            )))
        }
    };
    let mut a = Answer {
        status: resp.code.unwrap_or(0),
        head_len,
        ..Answer::default()
    };
    let mut upgrade = false;
    let mut connection = false;
    for h in resp.headers.iter() {
        let value = String::from_utf8_lossy(h.value);
        let value = value.trim();
        if h.name.eq_ignore_ascii_case("upgrade") {
            upgrade = value.eq_ignore_ascii_case("websocket");
        } else if h.name.eq_ignore_ascii_case("connection") {
            connection = value
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
        } else if h.name.eq_ignore_ascii_case("sec-websocket-accept") {
            a.accept = Some(value.to_string());
        } else if h.name.eq_ignore_ascii_case(HELLO_HEADER) {
            a.hello = Some(value.to_string());
        } else if h.name.eq_ignore_ascii_case("content-length") {
            a.content_length = value.parse().ok();
        }
    }
    a.upgrade_websocket = upgrade && connection;
    Ok(Some(a))
}

/// A failed write or read during the upgrade: the connection was cut (what a proxy that strips
/// upgrades often does), told apart from other failures by the error's kind, never its text.
fn cut(e: std::io::Error) -> HandshakeError {
    use std::io::ErrorKind;
    match e.kind() {
        ErrorKind::ConnectionReset
        | ErrorKind::ConnectionAborted
        | ErrorKind::UnexpectedEof
        | ErrorKind::BrokenPipe => HandshakeError::Cut(e.to_string()),
        _ => HandshakeError::Other(e.to_string()),
    }
}

/// How a side masks what it sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Masking {
    /// A server: frames go unmasked.
    None,
    /// A client: each frame with a fresh random key (RFC 6455 §5.3), applied as the payload is
    /// copied beside its header.
    Random,
    /// A client whose frames no intermediary can read, or whose payloads no attacker can choose
    /// ([`WsTx::mask_with_zero_key`]): the mask bit is set, the key is zero, and the payload
    /// goes out as it is (no copy, no pass over it on either side).
    ZeroKey,
}

/// The sending half: frames are queued (headers in one buffer, large payloads as they are) and
/// written with vectored writes; a client masks each payload as it copies it beside its header.
pub struct WsTx<S> {
    io: WriteHalf<S>,
    mask: Masking,
    /// Frames to write, in order; `scratch` holds what follows the last of them.
    queue: VecDeque<Bytes>,
    scratch: BytesMut,
    queued: usize,
    /// The payload of a `PING` the reader received, answered with the next write.
    pong: Arc<Mutex<Option<Bytes>>>,
}

/// The receiving half: reads into a buffer that exists only while bytes wait, and hands out each
/// message as a view of it (unmasked in place).
pub struct WsRx<S> {
    io: ReadHalf<S>,
    from: From,
    max: usize,
    buf: BytesMut,
    /// A message sent in fragments, until its last one.
    partial: Option<BytesMut>,
    pong: Arc<Mutex<Option<Bytes>>>,
}

fn frame_err(e: FrameError) -> TransportError {
    match e {
        FrameError::TooLarge { .. } => TransportError::Io(format!("message too large: {e}")),
        FrameError::Protocol(_) => TransportError::Io(e.to_string()),
    }
}

fn io_err(e: std::io::Error) -> TransportError {
    TransportError::Io(e.to_string())
}

impl<S> WsTx<S> {
    /// From now on, a client masks with the zero key: every frame still has its mask bit and
    /// key (any server or intermediary that checks for them finds them), but the payload goes
    /// out as it is. Masking exists so that an intermediary reading the connection cannot be
    /// fed bytes an attacker chose (RFC 6455 §10.3). Call it only when that cannot happen: no
    /// intermediary can read the frames (the TLS connection is proven to end at the gateway)
    /// or every payload is sealed under keys no attacker holds. The copy and the pass it saves
    /// were 6 % of the chain's CPU per byte. A server's frames stay unmasked.
    pub fn mask_with_zero_key(&mut self) {
        if self.mask == Masking::Random {
            self.mask = Masking::ZeroKey;
        }
    }
}

impl<S: AsyncWrite> WsTx<S> {
    /// Queues a final frame whose payload is `head` then `payload` (a `DATA` frame's header and
    /// its bytes; `head` is empty for a whole message). A client masks both as it copies them
    /// beside the WebSocket header; a server copies only a small payload and queues a large
    /// one as it is, for a vectored write.
    fn push(&mut self, opcode: u8, head: &[u8], payload: Bytes) {
        let len = head.len() + payload.len();
        let key = match self.mask {
            Masking::None => None,
            Masking::Random => Some(rand::random::<[u8; 4]>()),
            Masking::ZeroKey => Some([0; 4]),
        };
        wsframe::put_header(&mut self.scratch, opcode, len, key);
        let start = self.scratch.len();
        self.scratch.put_slice(head);
        match key {
            Some(k) if k != [0; 4] => {
                self.scratch.put_slice(&payload);
                wsframe::apply_mask(&mut self.scratch[start..], k);
            }
            // Unmasked, or masked with the zero key (which leaves every byte as it is).
            _ if payload.len() <= COPY_SMALL => self.scratch.put_slice(&payload),
            _ => {
                self.queue.push_back(self.scratch.split().freeze());
                self.queue.push_back(payload);
            }
        }
        self.queued += len + wsframe::MAX_HEADER;
    }

    /// Queues a binary frame (after any pong owed), and writes once enough is queued.
    async fn send_frame(&mut self, head: &[u8], payload: Bytes) -> Result<(), TransportError>
    where
        S: Unpin,
    {
        self.take_pong();
        self.push(op::BINARY, head, payload);
        if self.queued >= WRITE_HIGH {
            self.write_queued().await?;
        }
        Ok(())
    }

    fn take_pong(&mut self) {
        let pong = self.pong.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(p) = pong {
            self.push(op::PONG, &[], p);
        }
    }

    /// Writes everything queued.
    async fn write_queued(&mut self) -> Result<(), TransportError>
    where
        S: Unpin,
    {
        if !self.scratch.is_empty() {
            self.queue.push_back(self.scratch.split().freeze());
        }
        while !self.queue.is_empty() {
            let n = {
                let mut slices = [IoSlice::new(&[]); 64];
                let k = crate::splice::io_slices(&self.queue, &mut slices);
                self.io.write_vectored(&slices[..k]).await.map_err(io_err)?
            };
            if n == 0 {
                return Err(TransportError::Closed);
            }
            crate::splice::consume(&mut self.queue, n);
        }
        self.queued = 0;
        // Between bursts the session keeps no write buffer.
        if self.scratch.capacity() > 4096 {
            self.scratch = BytesMut::new();
        }
        self.queue.shrink_to(8);
        Ok(())
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> TransportTx for WsTx<S> {
    async fn send(&mut self, msg: Bytes) -> Result<(), TransportError> {
        self.send_frame(&[], msg).await
    }
    async fn send_data(&mut self, stream: u32, payload: Bytes) -> Result<(), TransportError> {
        self.send_frame(&crate::frame::data_header(stream), payload)
            .await
    }
    async fn flush(&mut self) -> Result<(), TransportError> {
        self.take_pong();
        self.write_queued().await?;
        self.io.flush().await.map_err(io_err)
    }
    async fn close(&mut self) {
        // Close code 1000 (normal closure).
        self.push(op::CLOSE, &[], Bytes::from_static(&[0x03, 0xe8]));
        if self.write_queued().await.is_ok() {
            let _ = self.io.flush().await;
            let _ = self.io.shutdown().await;
        }
    }
}

/// What the read buffer holds room for at a frame boundary, `max` being the session's message
/// limit: its largest message whose `DATA` payload is at most [`READ_CHUNK`] (the usual size),
/// with its WebSocket header.
fn boundary_room(max: usize) -> usize {
    message_limit(READ_CHUNK as u32).min(max) + wsframe::MAX_HEADER
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> TransportRx for WsRx<S> {
    async fn recv(&mut self) -> Result<Option<Bytes>, TransportError> {
        loop {
            while let Some(f) =
                wsframe::parse(&mut self.buf, self.from, self.max).map_err(frame_err)?
            {
                match f.opcode {
                    op::BINARY if self.partial.is_some() => {
                        return Err(TransportError::Io(
                            "WebSocket protocol violation: a new message inside a fragmented one"
                                .into(),
                        ))
                    }
                    op::BINARY if f.fin => return Ok(Some(f.payload)),
                    op::BINARY => self.partial = Some(BytesMut::from(&f.payload[..])),
                    op::CONTINUATION => {
                        let Some(p) = self.partial.as_mut() else {
                            return Err(TransportError::Io(
                                "WebSocket protocol violation: a continuation without a message"
                                    .into(),
                            ));
                        };
                        if p.len() + f.payload.len() > self.max {
                            return Err(TransportError::Io(format!(
                                "message too large: over the limit of {}",
                                self.max
                            )));
                        }
                        p.extend_from_slice(&f.payload);
                        if f.fin {
                            let whole = self.partial.take().expect("checked above");
                            return Ok(Some(whole.freeze()));
                        }
                    }
                    op::TEXT => return Err(TransportError::NotBinary),
                    op::CLOSE => return Ok(None),
                    // Answered with our next write (the session writes at least every ping
                    // interval); liveness is ours (`PING` frames), not the WebSocket's.
                    op::PING => {
                        *self.pong.lock().unwrap_or_else(|e| e.into_inner()) = Some(f.payload)
                    }
                    _ => {} // PONG
                }
            }
            // Once a frame's header is in, read exactly the rest of it, into room made for
            // all of it: the frame is split off whole and never copied. At a frame boundary,
            // read at most a whole largest frame. (Reading past a frame's end would leave the
            // next one's start in a buffer too small for it: a copy of it to grow it.)
            let (want, room) =
                match wsframe::needed(&self.buf, self.from, self.max).map_err(frame_err)? {
                    Some(whole) => (whole - self.buf.len(), whole - self.buf.len()),
                    // Room for a whole `DATA` message of the usual size at once: a frame
                    // found larger than the first read then never grows the buffer (a
                    // reallocation copies all of it; a 64 KiB payload's message is 15 bytes
                    // over `READ_CHUNK + MAX_HEADER`).
                    None => (READ_CHUNK + wsframe::MAX_HEADER, boundary_room(self.max)),
                };
            let n = poll_fn(|cx| {
                // (Again at each poll: a pending read gave the buffer back.)
                if self.buf.capacity() - self.buf.len() < room {
                    if self.buf.is_empty() {
                        self.buf = crate::splice::spare_bytes(room);
                    } else {
                        self.buf.reserve(room);
                    }
                }
                let mut limited = (&mut self.buf).limit(want);
                let r = tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut limited);
                if r.is_pending() && self.buf.is_empty() {
                    // Nothing waits: an idle session holds no read buffer. (A session that
                    // gets one small message per wake-up, a new connection's `OPEN` or a
                    // keystroke, reuses a spare one instead of allocating a frame's room.)
                    crate::splice::keep_spare(std::mem::take(&mut self.buf));
                }
                r
            })
            .await
            .map_err(io_err)?;
            crate::splice::note_arrival(n);
            if n == 0 {
                return Err(TransportError::Io(
                    "connection closed without a WebSocket close".into(),
                ));
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Transport for WsTransport<S> {
    type Tx = WsTx<S>;
    type Rx = WsRx<S>;
    fn split(self) -> (WsTx<S>, WsRx<S>) {
        let (r, w) = tokio::io::split(self.io);
        let pong = Arc::new(Mutex::new(None));
        (
            WsTx {
                io: w,
                mask: if self.client {
                    Masking::Random
                } else {
                    Masking::None
                },
                queue: VecDeque::new(),
                scratch: BytesMut::new(),
                queued: 0,
                pong: pong.clone(),
            },
            WsRx {
                io: r,
                from: if self.client {
                    From::Server
                } else {
                    From::Client
                },
                max: self.max,
                buf: self.leftover,
                partial: None,
                pong,
            },
        )
    }
}

/// The `Sec-WebSocket-Accept` value for a client's `Sec-WebSocket-Key`.
pub fn accept_key(key: &[u8]) -> String {
    tungstenite::handshake::derive_accept_key(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::task::Poll;

    /// The read buffer was sized 15 bytes short of a 64 KiB `DATA` message, so every such
    /// message grew it once it was partly read: a reallocation that copied the whole buffer
    /// (7 % of the DMZ's samples during a bulk upload).
    #[test]
    fn a_full_data_message_fits_the_room_made_at_a_frame_boundary() {
        let payload = crate::frame::DEFAULT_MAX_FRAME;
        let len = HEADER_LEN + payload as usize;
        for mask in [None, Some([1, 2, 3, 4])] {
            let mut head = BytesMut::new();
            wsframe::put_header(&mut head, op::BINARY, len, mask);
            assert!(head.len() + len <= boundary_room(message_limit(payload)));
        }
        // ...and a spare read buffer has that room: it is reused, not reallocated.
        assert!(boundary_room(message_limit(payload)) <= crate::splice::SPARE_SIZE);
    }

    fn pair() -> (WsTx<tokio::io::DuplexStream>, WsRx<tokio::io::DuplexStream>) {
        let (a, b) = tokio::io::duplex(1 << 20);
        let max = crate::frame::DEFAULT_MAX_FRAME;
        let (tx, _) = WsTransport::client_upgraded(a, &[], max).split();
        let (_, rx) = WsTransport {
            io: b,
            leftover: BytesMut::new(),
            client: false,
            max: message_limit(max),
        }
        .split();
        (tx, rx)
    }

    /// The raw bytes a client writes for one message (a payload under 126 bytes: a 2-byte
    /// header, then the key).
    async fn raw_frame(zero_key: bool, payload: &[u8]) -> Vec<u8> {
        let (a, mut b) = tokio::io::duplex(1 << 16);
        let (mut tx, _rx) = WsTransport::client_upgraded(a, &[], 65536).split();
        if zero_key {
            tx.mask_with_zero_key();
        }
        tx.send(Bytes::copy_from_slice(payload)).await.unwrap();
        tx.flush().await.unwrap();
        let mut raw = vec![0u8; 2 + 4 + payload.len()];
        b.read_exact(&mut raw).await.unwrap();
        raw
    }

    /// The WebSocket reader is how a DMZ's bytes arrive: if it did not count them, a DMZ
    /// under a transfer would look quiet, and one after it would never give memory back.
    #[tokio::test]
    async fn bytes_the_websocket_reader_reads_count_as_activity() {
        let _serial = crate::splice::TEST_SERIAL.lock().await;
        let (mut tx, mut rx) = pair();
        let before = crate::splice::activity();
        let msg = Bytes::from(vec![5u8; 60_000]);
        let (sent, got) = tokio::join!(
            async {
                for _ in 0..5 {
                    tx.send(msg.clone()).await.unwrap();
                    tx.flush().await.unwrap();
                }
            },
            async {
                let mut got = Vec::new();
                for _ in 0..5 {
                    got.push(rx.recv().await.unwrap().unwrap());
                }
                got
            }
        );
        let () = sent;
        assert!(got.iter().all(|m| *m == msg));
        let moved = crate::splice::activity() - before;
        assert!(moved >= 300_000, "moved by {moved}");
    }

    /// A client's frames carry a fresh random key unless told that masks protect nothing there;
    /// then the mask bit and a zero key, and the payload as it is. Either way a strict server
    /// (ours, or an intermediary that checks) reads the same message.
    #[tokio::test]
    async fn a_client_masks_with_a_random_key_unless_told_the_zero_key_is_safe() {
        let payload = b"GET / HTTP/1.1\r\nHost: victim\r\n\r\n";
        let keys: Vec<Vec<u8>> =
            futures_util::future::join_all((0..4).map(|_| raw_frame(false, payload)))
                .await
                .into_iter()
                .map(|raw| {
                    assert_eq!(raw[1] & 0x80, 0x80, "the mask bit");
                    assert_ne!(
                        &raw[6..],
                        payload,
                        "the app's bytes never go out as they are"
                    );
                    raw[2..6].to_vec()
                })
                .collect();
        assert!(
            keys.windows(2).any(|k| k[0] != k[1]),
            "a fresh key per frame"
        );
        let raw = raw_frame(true, payload).await;
        assert_eq!(raw[1] & 0x80, 0x80, "the mask bit, still");
        assert_eq!(&raw[2..6], &[0; 4]);
        assert_eq!(&raw[6..], payload);
        for zero in [false, true] {
            let mut buf = BytesMut::from(&raw_frame(zero, payload).await[..]);
            let f = wsframe::parse(&mut buf, From::Client, 1 << 16)
                .unwrap()
                .unwrap();
            assert_eq!(&f.payload[..], payload);
        }
    }

    /// An idle session holds no read buffer (the memory of 50,000 idle desktops on one DMZ),
    /// now that it hands its buffer to the spare pool rather than dropping it too; and messages
    /// kept while more are read, into reused buffers, stay as they were.
    #[tokio::test]
    async fn an_idle_reader_holds_no_buffer_and_kept_messages_stay_intact() {
        let _serial = crate::splice::TEST_SERIAL.lock().await;
        let (mut tx, mut rx) = pair();
        let mut kept = Vec::new();
        for i in 0..40u8 {
            let msg = Bytes::from(vec![i; 100 + i as usize * 500]);
            tx.send(msg).await.unwrap();
            tx.flush().await.unwrap();
            // Each message is read on its own wake-up: the reader goes idle between them, and
            // gives its buffer back (or keeps it spare) each time.
            kept.push(rx.recv().await.unwrap().unwrap());
            let idle = poll_fn(|cx| Poll::Ready(std::pin::pin!(rx.recv()).poll(cx).is_pending()));
            assert!(idle.await);
            assert_eq!(rx.buf.capacity(), 0, "an idle reader holds no buffer");
        }
        for (i, m) in kept.iter().enumerate() {
            assert_eq!(m.len(), 100 + i * 500);
            assert!(
                m.iter().all(|b| *b == i as u8),
                "message {i} was overwritten"
            );
        }
    }
}
