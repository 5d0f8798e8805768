//! Frames: the unit of the wire protocol, and their encoding.
//!
//! One transport message carries exactly one frame. The transport (a WebSocket binary message, or
//! one record of the HTTP fallback) already delimits messages, so a frame has no length prefix:
//!
//! ```text
//! type:u8 | stream:u32 (big endian) | payload
//! ```
//!
//! Stream 0 is the session itself (`HELLO`, session `WINDOW`, `PING`/`PONG`, `GOAWAY`, `ROUTES`).
//! Everything here is pure: bytes in, [`Frame`] out, and back. Decoding never panics and never
//! allocates more than the message it was given; every malformed input is a [`FrameError`].

use bytes::{BufMut, Bytes, BytesMut};
use std::fmt;

/// Version of the wire protocol spoken by this build. A peer with another version is refused in
/// the hello with a reason that names both versions.
pub const PROTOCOL_VERSION: u16 = 1;

/// Size of the frame header (`type` + `stream`).
pub const HEADER_LEN: usize = 5;

/// The largest `DATA` payload this implementation sends by default (64 KiB); a peer announces
/// its own limit in its hello and never receives bigger frames than that.
pub const DEFAULT_MAX_FRAME: u32 = 64 * 1024;

/// Longest host name in an `OPEN` (DNS names are at most 253 bytes).
pub const MAX_HOST_LEN: usize = 255;

/// Largest non-`DATA` frame payload we accept: control frames are small, so a huge one is an
/// attack or a bug, not something to buffer.
pub const MAX_CONTROL_PAYLOAD: usize = 64 * 1024;

mod kind {
    pub const HELLO: u8 = 0x00;
    pub const OPEN: u8 = 0x01;
    pub const OPEN_OK: u8 = 0x02;
    pub const OPEN_ERR: u8 = 0x03;
    pub const DATA: u8 = 0x04;
    pub const WINDOW: u8 = 0x05;
    pub const FIN: u8 = 0x06;
    pub const RST: u8 = 0x07;
    pub const PING: u8 = 0x08;
    pub const PONG: u8 = 0x09;
    pub const GOAWAY: u8 = 0x0a;
    pub const ROUTES: u8 = 0x0b;
    pub const ROUTES_PART: u8 = 0x0c;
    pub const ACK: u8 = 0x0d;
    pub const DGRAM_OPEN: u8 = 0x10;
    pub const DGRAM: u8 = 0x11;
    pub const DGRAM_CLOSE: u8 = 0x12;
}

/// Bits of the hello's `features` field. A hello without the field (older peers) means none.
pub mod features {
    /// Datagram frames (`DGRAM_OPEN`, `DGRAM`, `DGRAM_CLOSE`): SOCKS5 UDP.
    pub const DATAGRAMS: u32 = 1;
    /// Resumable streams: `ACK` frames, `OPEN_OK` with metadata, `sp-resume*` keys
    /// (docs/protocol.md, "Streams that survive their session").
    pub const RESUME: u32 = 2;
}

/// Largest datagram a `DGRAM` frame carries: with the longest address, the frame's payload still
/// fits [`MAX_CONTROL_PAYLOAD`] (and so every transport's message limit).
pub const MAX_DATAGRAM: usize = 65_000;

/// Which program is at the other end of a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// `sallyport`, the desktop agent.
    Agent,
    /// `sallyport-gateway dmz`, the switch in the DMZ.
    Dmz,
    /// `sallyport-gateway connector`, inside the trusted network.
    Connector,
}

impl Role {
    fn to_u8(self) -> u8 {
        match self {
            Role::Agent => 1,
            Role::Dmz => 2,
            Role::Connector => 3,
        }
    }
    fn from_u8(v: u8) -> Option<Role> {
        match v {
            1 => Some(Role::Agent),
            2 => Some(Role::Dmz),
            3 => Some(Role::Connector),
            _ => None,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Agent => "agent",
            Role::Dmz => "dmz gateway",
            Role::Connector => "connector",
        })
    }
}

/// Why a stream was refused (`OPEN_ERR`) or reset (`RST`), or why a session went away
/// (`GOAWAY`). The same codes travel end to end, so the agent can turn "not allowed by policy"
/// into SOCKS5 reply 0x02 or HTTP 403 however many hops it crossed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    /// The other side gave up on the stream (its app closed, or it was cancelled).
    Cancel,
    /// No connector advertises a route that covers the destination.
    NoRoute,
    /// The connector's allow-list (or the DMZ) does not allow this destination for this identity.
    NotAllowed,
    /// The destination refused the connection.
    Refused,
    /// The destination's network or host is unreachable.
    Unreachable,
    /// The destination name does not resolve inside the trusted network.
    HostNotFound,
    /// Connecting to the destination timed out.
    TimedOut,
    /// A limit was hit (streams per session, opens per second, memory budget).
    Limit,
    /// The peer sent beyond the credit it was granted.
    FlowControl,
    /// The peer broke the protocol.
    Protocol,
    /// The session that carried the stream is gone.
    SessionLost,
    /// Anything else, including codes from a newer peer that this build does not know.
    Internal,
    /// Authentication or authorisation of the peer failed (used in `GOAWAY`).
    Unauthorized,
    /// The peer speaks another protocol version (used in `GOAWAY`).
    Version,
    /// Orderly shutdown (used in `GOAWAY`).
    Shutdown,
    /// The path to the other end of a resumable stream broke (its session was lost): the stream
    /// waits to be resumed instead of ending. Only on streams opened as resumable.
    Suspended,
}

impl ErrorCode {
    pub fn to_u8(self) -> u8 {
        match self {
            ErrorCode::Cancel => 0,
            ErrorCode::NoRoute => 1,
            ErrorCode::NotAllowed => 2,
            ErrorCode::Refused => 3,
            ErrorCode::Unreachable => 4,
            ErrorCode::HostNotFound => 5,
            ErrorCode::TimedOut => 6,
            ErrorCode::Limit => 7,
            ErrorCode::FlowControl => 8,
            ErrorCode::Protocol => 9,
            ErrorCode::SessionLost => 10,
            ErrorCode::Internal => 11,
            ErrorCode::Unauthorized => 12,
            ErrorCode::Version => 13,
            ErrorCode::Shutdown => 14,
            ErrorCode::Suspended => 15,
        }
    }

    /// Unknown codes (from a newer peer) read as [`ErrorCode::Internal`] rather than failing.
    pub fn from_u8(v: u8) -> ErrorCode {
        match v {
            0 => ErrorCode::Cancel,
            1 => ErrorCode::NoRoute,
            2 => ErrorCode::NotAllowed,
            3 => ErrorCode::Refused,
            4 => ErrorCode::Unreachable,
            5 => ErrorCode::HostNotFound,
            6 => ErrorCode::TimedOut,
            7 => ErrorCode::Limit,
            8 => ErrorCode::FlowControl,
            9 => ErrorCode::Protocol,
            10 => ErrorCode::SessionLost,
            12 => ErrorCode::Unauthorized,
            13 => ErrorCode::Version,
            14 => ErrorCode::Shutdown,
            15 => ErrorCode::Suspended,
            _ => ErrorCode::Internal,
        }
    }

    /// A short, stable name for logs and the `X-Sallyport-Error` header.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Cancel => "cancelled",
            ErrorCode::NoRoute => "no-route",
            ErrorCode::NotAllowed => "not-allowed",
            ErrorCode::Refused => "refused",
            ErrorCode::Unreachable => "unreachable",
            ErrorCode::HostNotFound => "host-not-found",
            ErrorCode::TimedOut => "timed-out",
            ErrorCode::Limit => "limit",
            ErrorCode::FlowControl => "flow-control",
            ErrorCode::Protocol => "protocol",
            ErrorCode::SessionLost => "session-lost",
            ErrorCode::Internal => "internal",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Version => "version",
            ErrorCode::Shutdown => "shutdown",
            ErrorCode::Suspended => "suspended",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The first frame each way: who is speaking and with which limits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    pub version: u16,
    pub role: Role,
    /// Initial credit the sender grants the receiver for every stream.
    pub stream_window: u32,
    /// Initial credit the sender grants the receiver for the whole session.
    pub session_window: u32,
    /// Largest `DATA` payload the sender accepts.
    pub max_frame: u32,
    /// Identifies one gateway instance (or one agent/connector process) in logs and, for
    /// connectors, tells them which DMZ instance they reached.
    pub instance_id: String,
    /// What the sender speaks beyond version 1 ([`features`] bits); 0 when absent.
    pub features: u32,
    /// A connector's resume id (32 hex digits, random per process) when it announces
    /// [`features::RESUME`]; empty otherwise. Resume tickets name it.
    pub resume_id: String,
}

/// Where a stream should go: a host name or address literal, and a port.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Dest {
    pub host: String,
    pub port: u16,
}

impl Dest {
    pub fn new(host: impl Into<String>, port: u16) -> Dest {
        Dest {
            host: host.into(),
            port,
        }
    }
}

impl fmt::Display for Dest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Key/value metadata carried in `OPEN`. The DMZ overwrites the identity keys (see
/// [`crate::meta`]) with what it authenticated, whatever the agent put there.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Meta(pub Vec<(String, String)>);

impl Meta {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Sets `key`, replacing any value already there.
    pub fn set(&mut self, key: &str, value: impl Into<String>) {
        self.0.retain(|(k, _)| k != key);
        self.0.push((key.to_string(), value.into()));
    }

    /// Bytes these entries take in an `OPEN` frame.
    pub fn wire_len(&self) -> usize {
        self.0.iter().map(|(k, v)| 4 + k.len() + v.len()).sum()
    }

    /// Removes every key that starts with `prefix` (the DMZ drops whatever identity an agent
    /// claimed before stamping its own).
    pub fn remove_prefix(&mut self, prefix: &str) {
        self.0.retain(|(k, _)| !k.starts_with(prefix));
    }
}

/// One decoded frame. `stream` is 0 for session-level frames.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    Hello(Hello),
    Open {
        stream: u32,
        dest: Dest,
        meta: Meta,
    },
    /// The stream is open. `meta` is empty except towards a peer that announced
    /// [`features::RESUME`] (a ticket, or the offset a resume starts from).
    OpenOk {
        stream: u32,
        meta: Meta,
    },
    OpenErr {
        stream: u32,
        code: ErrorCode,
        reason: String,
    },
    Data {
        stream: u32,
        payload: Bytes,
    },
    /// Credit increment; stream 0 means the session window.
    Window {
        stream: u32,
        credit: u32,
    },
    /// End-to-end acknowledgement on a resumable stream: `offset` bytes of `DATA` arrived in
    /// order since the stream began. The DMZ passes it on unchanged.
    Ack {
        stream: u32,
        offset: u64,
    },
    /// Half-close: the sender will send no more `DATA` on this stream.
    Fin {
        stream: u32,
    },
    Rst {
        stream: u32,
        code: ErrorCode,
        reason: String,
    },
    Ping(u64),
    Pong(u64),
    GoAway {
        code: ErrorCode,
        reason: String,
    },
    /// The routes a connector serves (patterns such as `db.internal:5432`, `*.internal:22`).
    /// Ends a route list: the list is every [`Frame::RoutesPart`] since the last `ROUTES`,
    /// then these.
    Routes(Vec<String>),
    /// A part of a long route list, more to follow (a list of thousands of routes does not fit
    /// one control frame; see [`split_routes`]).
    RoutesPart(Vec<String>),
    /// Opens a datagram association (SOCKS5 UDP); no answer unless refused (`DGRAM_CLOSE`).
    DgramOpen {
        assoc: u32,
        meta: Meta,
    },
    /// One datagram: to `addr` from the association's opener, from `addr` back.
    Dgram {
        assoc: u32,
        addr: Dest,
        payload: Bytes,
    },
    /// Ends an association (either side; a refusal of `DGRAM_OPEN` too).
    DgramClose {
        assoc: u32,
        code: ErrorCode,
        reason: String,
    },
}

/// Longest route text sent in a `ROUTES` frame; longer ones are not valid routes anyway.
pub const MAX_ROUTE_LEN: usize = 1024;

/// Payload bytes of route text per `ROUTES`/`ROUTES_PART` frame (well under
/// [`MAX_CONTROL_PAYLOAD`]).
pub const ROUTES_CHUNK: usize = 32 * 1024;

/// Splits a route list into frames that each fit [`ROUTES_CHUNK`]: zero or more
/// `ROUTES_PART`, then one `ROUTES`. Routes longer than [`MAX_ROUTE_LEN`] are left out.
pub fn split_routes(routes: Vec<String>) -> Vec<Frame> {
    let mut frames = Vec::new();
    let mut part: Vec<String> = Vec::new();
    let mut bytes = 0;
    for r in routes.into_iter().filter(|r| r.len() <= MAX_ROUTE_LEN) {
        if bytes + r.len() + 2 > ROUTES_CHUNK || part.len() == u16::MAX as usize {
            frames.push(Frame::RoutesPart(std::mem::take(&mut part)));
            bytes = 0;
        }
        bytes += r.len() + 2;
        part.push(r);
    }
    frames.push(Frame::Routes(part));
    frames
}

/// A message that is not a valid frame. The session answers it with `GOAWAY(protocol)`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame shorter than its {HEADER_LEN}-byte header ({0} bytes)")]
    Short(usize),
    #[error("unknown frame type 0x{0:02x}")]
    UnknownType(u8),
    #[error("truncated {0} frame")]
    Truncated(&'static str),
    #[error("{0} frame carries stream id {1}, which is not allowed for it")]
    BadStream(&'static str, u32),
    #[error("{0} frame has {1} trailing bytes")]
    Trailing(&'static str, usize),
    #[error("{0} frame payload of {1} bytes is larger than allowed")]
    TooLarge(&'static str, usize),
    #[error("{0} frame carries text that is not UTF-8")]
    NotUtf8(&'static str),
    #[error("hello names unknown role {0}")]
    UnknownRole(u8),
    #[error("OPEN or DGRAM frame has an empty or overlong host ({0} bytes)")]
    BadHost(usize),
}

/// A cursor over a payload that reports truncation instead of panicking.
struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn u8(&mut self) -> Result<u8, FrameError> {
        let (&v, rest) = self
            .buf
            .split_first()
            .ok_or(FrameError::Truncated(self.what))?;
        self.buf = rest;
        Ok(v)
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        if self.buf.len() < n {
            return Err(FrameError::Truncated(self.what));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    fn u16(&mut self) -> Result<u16, FrameError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, FrameError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, FrameError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }
    fn str16(&mut self) -> Result<String, FrameError> {
        let n = self.u16()? as usize;
        let b = self.take(n)?;
        std::str::from_utf8(b)
            .map(str::to_owned)
            .map_err(|_| FrameError::NotUtf8(self.what))
    }
    fn rest_str(&mut self) -> Result<String, FrameError> {
        let b = std::mem::take(&mut self.buf);
        std::str::from_utf8(b)
            .map(str::to_owned)
            .map_err(|_| FrameError::NotUtf8(self.what))
    }
    /// `host_len:u8 | host | port:u16`, as in `OPEN` and `DGRAM`.
    fn dest(&mut self) -> Result<Dest, FrameError> {
        let n = self.u8()? as usize;
        let host = self.take(n)?;
        if host.is_empty() {
            return Err(FrameError::BadHost(0));
        }
        let host = std::str::from_utf8(host)
            .map_err(|_| FrameError::NotUtf8(self.what))?
            .to_owned();
        let port = self.u16()?;
        Ok(Dest { host, port })
    }
    /// `count:u16`, then `count` × (`key:str16`, `value:str16`).
    fn meta(&mut self) -> Result<Meta, FrameError> {
        let count = self.u16()? as usize;
        let mut meta = Vec::with_capacity(count.min(32));
        for _ in 0..count {
            let k = self.str16()?;
            let v = self.str16()?;
            meta.push((k, v));
        }
        Ok(Meta(meta))
    }
    fn end(&self) -> Result<(), FrameError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(FrameError::Trailing(self.what, self.buf.len()))
        }
    }
}

fn header(buf: &mut BytesMut, kind: u8, stream: u32) {
    buf.put_u8(kind);
    buf.put_u32(stream);
}

fn put_str16(buf: &mut BytesMut, s: &str) {
    // Strings we write are bounded by their producers; truncate defensively at u16::MAX on a
    // char boundary rather than emitting a frame the peer cannot parse.
    let mut end = s.len().min(u16::MAX as usize);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    buf.put_u16(end as u16);
    buf.put_slice(&s.as_bytes()[..end]);
}

/// Reasons travel as the tail of a frame; keep them short and on a char boundary.
fn clip_reason(s: &str) -> &str {
    const MAX: usize = 512;
    if s.len() <= MAX {
        return s;
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

impl Frame {
    /// Encodes the frame into one transport message.
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(HEADER_LEN + 32);
        match self {
            Frame::Hello(h) => {
                header(&mut b, kind::HELLO, 0);
                b.put_u16(h.version);
                b.put_u8(h.role.to_u8());
                b.put_u32(h.stream_window);
                b.put_u32(h.session_window);
                b.put_u32(h.max_frame);
                put_str16(&mut b, &h.instance_id);
                if h.features != 0 || !h.resume_id.is_empty() {
                    b.put_u32(h.features);
                }
                if !h.resume_id.is_empty() {
                    put_str16(&mut b, &h.resume_id);
                }
            }
            Frame::Open { stream, dest, meta } => {
                header(&mut b, kind::OPEN, *stream);
                put_dest(&mut b, dest);
                put_meta(&mut b, meta);
            }
            Frame::DgramOpen { assoc, meta } => {
                header(&mut b, kind::DGRAM_OPEN, *assoc);
                put_meta(&mut b, meta);
            }
            Frame::Dgram {
                assoc,
                addr,
                payload,
            } => return encode_dgram(*assoc, addr, payload),
            Frame::DgramClose {
                assoc,
                code,
                reason,
            } => {
                header(&mut b, kind::DGRAM_CLOSE, *assoc);
                b.put_u8(code.to_u8());
                b.put_slice(clip_reason(reason).as_bytes());
            }
            Frame::OpenOk { stream, meta } => {
                header(&mut b, kind::OPEN_OK, *stream);
                if !meta.0.is_empty() {
                    put_meta(&mut b, meta);
                }
            }
            Frame::OpenErr {
                stream,
                code,
                reason,
            } => {
                header(&mut b, kind::OPEN_ERR, *stream);
                b.put_u8(code.to_u8());
                b.put_slice(clip_reason(reason).as_bytes());
            }
            Frame::Data { stream, payload } => return encode_data(*stream, payload),
            Frame::Window { stream, credit } => {
                header(&mut b, kind::WINDOW, *stream);
                b.put_u32(*credit);
            }
            Frame::Fin { stream } => header(&mut b, kind::FIN, *stream),
            Frame::Ack { stream, offset } => {
                header(&mut b, kind::ACK, *stream);
                b.put_u64(*offset);
            }
            Frame::Rst {
                stream,
                code,
                reason,
            } => {
                header(&mut b, kind::RST, *stream);
                b.put_u8(code.to_u8());
                b.put_slice(clip_reason(reason).as_bytes());
            }
            Frame::Ping(v) => {
                header(&mut b, kind::PING, 0);
                b.put_u64(*v);
            }
            Frame::Pong(v) => {
                header(&mut b, kind::PONG, 0);
                b.put_u64(*v);
            }
            Frame::GoAway { code, reason } => {
                header(&mut b, kind::GOAWAY, 0);
                b.put_u8(code.to_u8());
                b.put_slice(clip_reason(reason).as_bytes());
            }
            Frame::Routes(routes) | Frame::RoutesPart(routes) => {
                let k = match self {
                    Frame::Routes(_) => kind::ROUTES,
                    _ => kind::ROUTES_PART,
                };
                header(&mut b, k, 0);
                let n = routes.len().min(u16::MAX as usize);
                b.put_u16(n as u16);
                for r in routes.iter().take(n) {
                    put_str16(&mut b, r);
                }
            }
        }
        b.freeze()
    }

    /// Decodes one transport message. `max_data` is the largest `DATA` payload we announced.
    pub fn decode(msg: Bytes, max_data: usize) -> Result<Frame, FrameError> {
        if msg.len() < HEADER_LEN {
            return Err(FrameError::Short(msg.len()));
        }
        let t = msg[0];
        let stream = u32::from_be_bytes([msg[1], msg[2], msg[3], msg[4]]);
        let payload_len = msg.len() - HEADER_LEN;
        if t == kind::DATA {
            if stream == 0 {
                return Err(FrameError::BadStream("DATA", 0));
            }
            if payload_len > max_data {
                return Err(FrameError::TooLarge("DATA", payload_len));
            }
            // Zero copy: the payload is a view into the received message.
            return Ok(Frame::Data {
                stream,
                payload: msg.slice(HEADER_LEN..),
            });
        }
        let name = kind_name(t).ok_or(FrameError::UnknownType(t))?;
        if payload_len > MAX_CONTROL_PAYLOAD {
            return Err(FrameError::TooLarge(name, payload_len));
        }
        let session_level = matches!(
            t,
            kind::HELLO | kind::PING | kind::PONG | kind::GOAWAY | kind::ROUTES | kind::ROUTES_PART
        );
        if session_level && stream != 0 {
            return Err(FrameError::BadStream(name, stream));
        }
        if !session_level && t != kind::WINDOW && stream == 0 {
            return Err(FrameError::BadStream(name, 0));
        }
        let mut r = Reader {
            buf: &msg[HEADER_LEN..],
            what: name,
        };
        let frame = match t {
            kind::HELLO => {
                let version = r.u16()?;
                let role_byte = r.u8()?;
                let role = Role::from_u8(role_byte).ok_or(FrameError::UnknownRole(role_byte))?;
                let stream_window = r.u32()?;
                let session_window = r.u32()?;
                let max_frame = r.u32()?;
                let instance_id = r.str16()?;
                // Older peers end here (no features); later versions may append fields after
                // `features`: a hello tolerates trailing bytes.
                let features = if r.buf.len() >= 4 { r.u32()? } else { 0 };
                // A resume id follows when the sender announces resume (and is a connector).
                let resume_id = if features & features::RESUME != 0 && r.buf.len() >= 2 {
                    r.str16()?
                } else {
                    String::new()
                };
                return Ok(Frame::Hello(Hello {
                    version,
                    role,
                    stream_window,
                    session_window,
                    max_frame,
                    instance_id,
                    features,
                    resume_id,
                }));
            }
            kind::OPEN => {
                let dest = r.dest()?;
                Frame::Open {
                    stream,
                    dest,
                    meta: r.meta()?,
                }
            }
            kind::DGRAM_OPEN => Frame::DgramOpen {
                assoc: stream,
                meta: r.meta()?,
            },
            kind::DGRAM => {
                let addr = r.dest()?;
                let start = msg.len() - r.buf.len();
                if r.buf.len() > MAX_DATAGRAM {
                    return Err(FrameError::TooLarge(name, r.buf.len()));
                }
                // Zero copy, as for DATA.
                return Ok(Frame::Dgram {
                    assoc: stream,
                    addr,
                    payload: msg.slice(start..),
                });
            }
            kind::DGRAM_CLOSE => {
                let code = ErrorCode::from_u8(r.u8()?);
                let reason = r.rest_str()?;
                Frame::DgramClose {
                    assoc: stream,
                    code,
                    reason,
                }
            }
            kind::OPEN_OK => {
                let meta = if r.buf.is_empty() {
                    Meta::default()
                } else {
                    let len = r.buf.len();
                    let m = r.meta()?;
                    // No metadata is written as no payload: one encoding per frame.
                    if m.0.is_empty() {
                        return Err(FrameError::Trailing("OPEN_OK", len));
                    }
                    m
                };
                Frame::OpenOk { stream, meta }
            }
            kind::OPEN_ERR => {
                let code = ErrorCode::from_u8(r.u8()?);
                let reason = r.rest_str()?;
                Frame::OpenErr {
                    stream,
                    code,
                    reason,
                }
            }
            kind::WINDOW => Frame::Window {
                stream,
                credit: r.u32()?,
            },
            kind::FIN => Frame::Fin { stream },
            kind::ACK => Frame::Ack {
                stream,
                offset: r.u64()?,
            },
            kind::RST => {
                let code = ErrorCode::from_u8(r.u8()?);
                let reason = r.rest_str()?;
                Frame::Rst {
                    stream,
                    code,
                    reason,
                }
            }
            kind::PING => Frame::Ping(r.u64()?),
            kind::PONG => Frame::Pong(r.u64()?),
            kind::GOAWAY => {
                let code = ErrorCode::from_u8(r.u8()?);
                let reason = r.rest_str()?;
                Frame::GoAway { code, reason }
            }
            kind::ROUTES | kind::ROUTES_PART => {
                let count = r.u16()? as usize;
                let mut routes = Vec::with_capacity(count.min(64));
                for _ in 0..count {
                    routes.push(r.str16()?);
                }
                if t == kind::ROUTES {
                    Frame::Routes(routes)
                } else {
                    Frame::RoutesPart(routes)
                }
            }
            _ => return Err(FrameError::UnknownType(t)),
        };
        r.end()?;
        Ok(frame)
    }
}

fn put_dest(b: &mut BytesMut, dest: &Dest) {
    let host = &dest.host.as_bytes()[..dest.host.len().min(MAX_HOST_LEN)];
    b.put_u8(host.len() as u8);
    b.put_slice(host);
    b.put_u16(dest.port);
}

fn put_meta(b: &mut BytesMut, meta: &Meta) {
    let n = meta.0.len().min(u16::MAX as usize);
    b.put_u16(n as u16);
    for (k, v) in meta.0.iter().take(n) {
        put_str16(b, k);
        put_str16(b, v);
    }
}

/// Encodes a `DGRAM` frame (header, address, one copy of the payload). The caller keeps the
/// payload within [`MAX_DATAGRAM`].
pub fn encode_dgram(assoc: u32, addr: &Dest, payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(HEADER_LEN + 3 + addr.host.len() + payload.len());
    header(&mut b, kind::DGRAM, assoc);
    put_dest(&mut b, addr);
    b.put_slice(payload);
    b.freeze()
}

/// The header of a `DATA` frame of `stream` (its payload follows).
pub fn data_header(stream: u32) -> [u8; HEADER_LEN] {
    let s = stream.to_be_bytes();
    [kind::DATA, s[0], s[1], s[2], s[3]]
}

/// Encodes a `DATA` frame (header plus one copy of the payload).
pub fn encode_data(stream: u32, payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(HEADER_LEN + payload.len());
    header(&mut b, kind::DATA, stream);
    b.put_slice(payload);
    b.freeze()
}

fn kind_name(t: u8) -> Option<&'static str> {
    Some(match t {
        kind::HELLO => "HELLO",
        kind::OPEN => "OPEN",
        kind::OPEN_OK => "OPEN_OK",
        kind::OPEN_ERR => "OPEN_ERR",
        kind::DATA => "DATA",
        kind::WINDOW => "WINDOW",
        kind::FIN => "FIN",
        kind::RST => "RST",
        kind::PING => "PING",
        kind::PONG => "PONG",
        kind::GOAWAY => "GOAWAY",
        kind::ROUTES => "ROUTES",
        kind::ROUTES_PART => "ROUTES_PART",
        kind::ACK => "ACK",
        kind::DGRAM_OPEN => "DGRAM_OPEN",
        kind::DGRAM => "DGRAM",
        kind::DGRAM_CLOSE => "DGRAM_CLOSE",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(f: Frame) {
        let enc = f.encode();
        assert_eq!(Frame::decode(enc, 1 << 20).unwrap(), f);
    }

    /// 3,000 allow rules made a 195 KB `ROUTES` frame, over the message limit: the connector's
    /// session was cut in a loop and nothing was served.
    #[test]
    fn a_long_route_list_is_split_into_frames_that_each_fit() {
        let routes: Vec<String> = (0..3000)
            .map(|i| format!("service-{i:05}.dept-{i}.internal.example.com:1-65535"))
            .collect();
        let frames = split_routes(routes.clone());
        assert!(frames.len() > 3, "{}", frames.len());
        let mut back = Vec::new();
        for (i, f) in frames.iter().enumerate() {
            let enc = f.encode();
            assert!(
                enc.len() <= MAX_CONTROL_PAYLOAD + HEADER_LEN,
                "{}",
                enc.len()
            );
            match Frame::decode(enc, 65536).unwrap() {
                Frame::RoutesPart(r) if i + 1 < frames.len() => back.extend(r),
                Frame::Routes(r) if i + 1 == frames.len() => back.extend(r),
                other => panic!("frame {i}: {other:?}"),
            }
        }
        assert_eq!(back, routes);
        // Empty list: one empty ROUTES; an overlong route is left out.
        assert_eq!(split_routes(vec![]), vec![Frame::Routes(vec![])]);
        assert_eq!(
            split_routes(vec!["x".repeat(MAX_ROUTE_LEN + 1), "a:1".into()]),
            vec![Frame::Routes(vec!["a:1".into()])]
        );
    }

    #[test]
    fn every_frame_kind_roundtrips() {
        roundtrip(Frame::Hello(Hello {
            version: 1,
            role: Role::Connector,
            stream_window: 1 << 19,
            session_window: 1 << 24,
            max_frame: 65536,
            instance_id: "gw-1".into(),
            features: 0,
            resume_id: String::new(),
        }));
        let mut meta = Meta::default();
        meta.set("sp-user", "alice");
        roundtrip(Frame::Open {
            stream: 7,
            dest: Dest::new("db.internal", 5432),
            meta,
        });
        roundtrip(Frame::OpenOk {
            stream: 7,
            meta: Meta::default(),
        });
        let mut m = Meta::default();
        m.set("sp-resume-recv", "12345");
        roundtrip(Frame::OpenOk { stream: 7, meta: m });
        // An empty metadata list has one encoding, the empty payload (found by frame_decode).
        let empty_list = Bytes::from_static(&[2, 3, 0, 8, 7, 0, 0]);
        assert!(Frame::decode(empty_list, 1 << 16).is_err());
        roundtrip(Frame::Ack {
            stream: 9,
            offset: u64::MAX,
        });
        roundtrip(Frame::OpenErr {
            stream: 7,
            code: ErrorCode::NotAllowed,
            reason: "db.internal:5433 is not in the allow-list".into(),
        });
        roundtrip(Frame::Data {
            stream: 9,
            payload: Bytes::from_static(b"hello"),
        });
        roundtrip(Frame::Window {
            stream: 0,
            credit: 1234,
        });
        roundtrip(Frame::Fin { stream: 3 });
        roundtrip(Frame::Rst {
            stream: 3,
            code: ErrorCode::FlowControl,
            reason: "beyond credit".into(),
        });
        roundtrip(Frame::Ping(42));
        roundtrip(Frame::Pong(42));
        roundtrip(Frame::GoAway {
            code: ErrorCode::Shutdown,
            reason: "bye".into(),
        });
        roundtrip(Frame::Routes(vec![
            "db.internal:5432".into(),
            "*.internal:22".into(),
        ]));
    }

    #[test]
    fn datagram_frames_roundtrip_and_an_old_hello_reads_as_no_features() {
        let mut meta = Meta::default();
        meta.set("sp-front", "socks5");
        roundtrip(Frame::DgramOpen { assoc: 3, meta });
        roundtrip(Frame::Dgram {
            assoc: 3,
            addr: Dest::new("dns.internal", 53),
            payload: Bytes::from_static(b"\x12\x34query"),
        });
        roundtrip(Frame::DgramClose {
            assoc: 3,
            code: ErrorCode::NotAllowed,
            reason: "no UDP rule".into(),
        });
        let hello = Hello {
            version: 1,
            role: Role::Agent,
            stream_window: 1,
            session_window: 1,
            max_frame: 1024,
            instance_id: "a".into(),
            features: features::DATAGRAMS,
            resume_id: String::new(),
        };
        roundtrip(Frame::Hello(hello.clone()));
        // An older peer's hello ends after instance_id: no features.
        let mut old = Frame::Hello(hello.clone()).encode();
        old.truncate(old.len() - 4);
        match Frame::decode(old, 1024).unwrap() {
            Frame::Hello(h) => assert_eq!(h.features, 0),
            f => panic!("{f:?}"),
        }
    }

    #[test]
    fn an_oversize_or_addressless_datagram_frame_is_malformed() {
        let big = encode_dgram(1, &Dest::new("a", 1), &vec![0u8; MAX_DATAGRAM + 1]);
        assert!(matches!(
            Frame::decode(big, 1024),
            Err(FrameError::TooLarge("DGRAM", _))
        ));
        // The largest datagram with the longest host fits the control payload limit.
        let max = encode_dgram(1, &Dest::new("h".repeat(255), 1), &vec![0u8; MAX_DATAGRAM]);
        assert!(Frame::decode(max, 1024).is_ok());
        let empty_host = encode_dgram(1, &Dest::new("", 1), b"x");
        assert!(Frame::decode(empty_host, 1024).is_err());
        let on_zero = encode_dgram(0, &Dest::new("a", 1), b"x");
        assert!(Frame::decode(on_zero, 1024).is_err());
    }

    #[test]
    fn data_on_stream_zero_is_rejected() {
        let enc = encode_data(0, b"x");
        assert_eq!(
            Frame::decode(enc, 100),
            Err(FrameError::BadStream("DATA", 0))
        );
    }

    #[test]
    fn oversize_data_is_rejected() {
        let enc = encode_data(1, &[0u8; 101]);
        assert!(matches!(
            Frame::decode(enc, 100),
            Err(FrameError::TooLarge("DATA", 101))
        ));
    }

    #[test]
    fn ping_on_a_stream_is_rejected() {
        let mut b = Frame::Ping(1).encode().to_vec();
        b[4] = 1;
        assert!(matches!(
            Frame::decode(b.into(), 100),
            Err(FrameError::BadStream("PING", 1))
        ));
    }

    #[test]
    fn unknown_error_codes_read_as_internal() {
        assert_eq!(ErrorCode::from_u8(200), ErrorCode::Internal);
        for c in 0..=15u8 {
            if c != 11 {
                assert_eq!(ErrorCode::from_u8(c).to_u8(), c);
            }
        }
    }

    /// Every prefix of every valid frame, and a cheap deterministic stream of random messages,
    /// decode to an error or a frame — never a panic. (`fuzz/` has the coverage-guided target.)
    #[test]
    fn truncated_and_random_messages_never_panic() {
        let samples = [
            Frame::Open {
                stream: 1,
                dest: Dest::new("a.b", 1),
                meta: Meta(vec![("k".into(), "v".into())]),
            }
            .encode(),
            Frame::Hello(Hello {
                version: 1,
                role: Role::Agent,
                stream_window: 1,
                session_window: 1,
                max_frame: 1,
                instance_id: "x".into(),
                features: 0,
                resume_id: String::new(),
            })
            .encode(),
            Frame::Routes(vec!["a:1".into()]).encode(),
            Frame::OpenErr {
                stream: 1,
                code: ErrorCode::Refused,
                reason: "r".into(),
            }
            .encode(),
        ];
        // Every strict prefix is refused (an OPEN_ERR's reason runs to the end of the message,
        // so only cuts before it are).
        for (i, s) in samples.iter().enumerate() {
            let fixed = if i == 3 { HEADER_LEN + 1 } else { s.len() };
            for n in 0..fixed {
                assert!(
                    Frame::decode(s.slice(..n), 1024).is_err(),
                    "sample {i} cut at {n} decoded"
                );
            }
        }
        let mut x: u64 = 0x9e3779b97f4a7c15;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 64) as usize;
            let mut v = Vec::with_capacity(len);
            let mut y = x;
            for _ in 0..len {
                y = y.wrapping_mul(6364136223846793005).wrapping_add(1);
                v.push((y >> 56) as u8);
            }
            if !v.is_empty() {
                v[0] %= 13;
            }
            // Whatever decodes re-encodes to a message that decodes to the same frame.
            if let Ok(f) = Frame::decode(v.into(), 1024) {
                assert_eq!(Frame::decode(f.encode(), 1024).as_ref(), Ok(&f));
            }
        }
    }
}
