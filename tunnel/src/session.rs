//! A session: many streams multiplexed over one transport, with flow control and liveness.
//!
//! ## Shape
//! A [`Session`] is a cheap handle (an `Arc`) to shared state guarded by one mutex. Three tasks
//! drive it:
//! - the **reader** decodes each incoming message and applies it to the state (queues data into
//!   a stream's buffer, adds credit, wakes whoever waits);
//! - the **writer** drains what the state has to send — control frames first, then one `DATA`
//!   frame per ready stream in turn (round robin) — in batches, and flushes the transport;
//! - the **pinger** sends `PING` every `ping_interval` and closes the session when nothing at all
//!   arrived for `ping_interval + ping_timeout`.
//!
//! Application code never touches the transport: it reads and writes [`Stream`]s, whose
//! `poll_*` methods lock the state briefly, move bytes, and register wakers.
//!
//! ## Flow control (hop by hop)
//! Each side announces in its hello how much it will buffer per stream (`stream_window`) and per
//! session (`session_window`). A sender spends credit for every `DATA` byte and stops at zero;
//! `WINDOW` frames give credit back. Stream credit comes back when the application *consumes*
//! the bytes, so a stalled reader holds at most one stream window. Session credit comes back as
//! soon as the bytes are moved into the stream's buffer: it bounds what is in flight on the
//! transport, and a stalled stream never holds credit that other streams need. A peer that sends
//! beyond the stream credit gets `RST(flow-control)` and nothing beyond the grant is kept; beyond
//! the session credit, `GOAWAY(flow-control)`.
//!
//! Memory per session is therefore bounded by `max_incoming_streams × stream_window` on the
//! receive side and by the peer's windows on the send side.

use crate::frame::{Dest, ErrorCode, Frame, Hello, Meta, Role, PROTOCOL_VERSION};
use crate::stream::{OpenState, Out, Stream, StreamState};
use crate::transport::{Transport, TransportError, TransportRx, TransportTx};
use bytes::Bytes;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Waker;
use std::time::Duration;
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// Settings of one side of a session. [`Config::new`] gives safe defaults.
#[derive(Clone, Debug)]
pub struct Config {
    /// Our role, announced in the hello.
    pub role: Role,
    /// True on the side that dialled the transport: it numbers its streams odd, the other side
    /// even, so both may open streams without colliding.
    pub initiator: bool,
    /// Identifies this process in the peer's logs.
    pub instance_id: String,
    /// How much we buffer per stream (initial credit granted to the peer).
    pub stream_window: u32,
    /// How much may be in flight towards us on the whole session.
    pub session_window: u32,
    /// Largest `DATA` payload we accept (the transport's message limit must allow it).
    pub max_frame: u32,
    /// Whether the peer may open streams towards us.
    pub accept_streams: bool,
    /// Most streams the peer may have open towards us at once.
    pub max_incoming_streams: usize,
    /// Opened streams waiting for [`Incoming::accept`]; beyond that they are refused.
    pub accept_backlog: usize,
    /// How often we ping. Well under the 60 s idle timeout of common load balancers.
    pub ping_interval: Duration,
    /// How long past a ping interval we wait for *any* frame before declaring the peer dead.
    pub ping_timeout: Duration,
    /// How long we wait for the peer's hello.
    pub hello_timeout: Duration,
}

impl Config {
    pub fn new(role: Role, initiator: bool) -> Config {
        Config {
            role,
            initiator,
            instance_id: String::new(),
            stream_window: 512 * 1024,
            session_window: 16 * 1024 * 1024,
            max_frame: crate::frame::DEFAULT_MAX_FRAME,
            accept_streams: true,
            max_incoming_streams: 16_384,
            accept_backlog: 8192,
            ping_interval: Duration::from_secs(20),
            ping_timeout: Duration::from_secs(20),
            hello_timeout: Duration::from_secs(10),
        }
    }
}

/// Why a session ended (or could not start).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    #[error("transport failed: {0}")]
    Transport(String),
    #[error("peer closed the session")]
    PeerClosed,
    #[error("peer went away ({code}): {reason}")]
    GoAway { code: ErrorCode, reason: String },
    #[error("protocol violation by peer: {0}")]
    Protocol(String),
    #[error("peer speaks sallyport protocol v{theirs}, this build speaks v{ours}: upgrade the older side")]
    Version { ours: u16, theirs: u16 },
    #[error("no hello from peer within {0:?}")]
    HelloTimeout(Duration),
    #[error("peer unresponsive: nothing received for {0:?}")]
    Unresponsive(Duration),
    #[error("session closed: {0}")]
    Local(String),
}

impl SessionError {
    fn from_transport(e: TransportError) -> SessionError {
        SessionError::Transport(e.to_string())
    }
}

/// Why a stream failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// The far end refused the stream (`OPEN_ERR`): the reason is for the user.
    #[error("{reason}")]
    Refused { code: ErrorCode, reason: String },
    #[error("stream reset by peer ({code}): {reason}")]
    Reset { code: ErrorCode, reason: String },
    #[error("stream reset locally ({code}): {reason}")]
    LocalReset { code: ErrorCode, reason: String },
    #[error("tunnel session lost: {0}")]
    SessionLost(SessionError),
    #[error("tunnel session is going away; retry on a new session")]
    GoingAway,
    #[error("stream ids exhausted on this session; retry on a new session")]
    IdsExhausted,
    /// The `OPEN` (destination and metadata) would not fit one control frame.
    #[error("stream request too large: its OPEN frame would be {bytes} bytes, at most {max} are allowed")]
    OpenTooLarge { bytes: usize, max: usize },
}

impl StreamError {
    /// The wire code that best describes this failure (used to answer SOCKS5 / HTTP clients).
    pub fn code(&self) -> ErrorCode {
        match self {
            StreamError::Refused { code, .. }
            | StreamError::Reset { code, .. }
            | StreamError::LocalReset { code, .. } => *code,
            StreamError::SessionLost(_) | StreamError::GoingAway | StreamError::IdsExhausted => {
                ErrorCode::SessionLost
            }
            StreamError::OpenTooLarge { .. } => ErrorCode::Limit,
        }
    }

    pub(crate) fn to_io(&self) -> std::io::Error {
        use std::io::ErrorKind;
        let kind = match self {
            StreamError::Refused { .. } => ErrorKind::ConnectionRefused,
            StreamError::Reset { .. } | StreamError::LocalReset { .. } => {
                ErrorKind::ConnectionReset
            }
            _ => ErrorKind::ConnectionAborted,
        };
        std::io::Error::new(kind, self.clone())
    }
}

/// Counters of one session, for status pages and logs.
#[derive(Clone, Debug, Default)]
pub struct SessionStats {
    pub streams: usize,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub rtt: Option<Duration>,
}

/// What one state change asks the writer to send, in order.
pub(crate) enum Pending {
    /// Ours: opens, pings, credit returned as our apps read.
    Control(Bytes),
    /// An answer that the peer's frames asked for (`RST`, `OPEN_ERR`, session credit). A peer
    /// that sends and never reads would grow these without end: they are capped at
    /// [`MAX_INDUCED_CONTROL`] bytes, and the session ends beyond it.
    Induced(Bytes),
}

/// Most bytes of answers to the peer's frames (`RST`, `OPEN_ERR`, session credit) that may wait
/// unsent.
pub const MAX_INDUCED_CONTROL: usize = 1024 * 1024;

/// Most routes kept from a peer's route list (`ROUTES_PART`… `ROUTES`); the rest are dropped
/// and logged once. The DMZ applies its own, smaller, limit per connector credential.
pub const MAX_PEER_ROUTES: usize = 65_536;

/// Most `PING`s a peer may send in one second. A peer pings every `ping_interval` (20 s); one
/// that floods `PING` (16 sessions of one token doing so starved a whole gateway of its two
/// cores' scheduling) is cut off.
pub const MAX_PINGS_PER_SECOND: u32 = 50;

/// Most bytes of route text kept from a peer's route list.
pub const MAX_PEER_ROUTE_BYTES: usize = 4 * 1024 * 1024;

pub(crate) struct State {
    pub(crate) streams: HashMap<u32, StreamState>,
    next_id: u32,
    last_peer_id: u32,
    /// Encoded control frames; sent before any data.
    pub(crate) control: VecDeque<Pending>,
    /// Bytes of [`Pending::Induced`] frames in `control`.
    induced_bytes: usize,
    /// The answer to the peer's latest `PING`, not yet sent (one at most: a `PING` flood costs
    /// nothing to hold).
    pong: Option<u64>,
    /// `PING`s received in the second that started at `pings_since`.
    pings: u32,
    pings_since: Instant,
    /// Routes of `ROUTES_PART` frames, waiting for the `ROUTES` that ends the list.
    routes_partial: Vec<String>,
    /// Bytes of route text in `routes_partial`.
    routes_bytes: usize,
    /// Routes beyond [`MAX_PEER_ROUTES`] were dropped (logged once per session).
    routes_truncated: bool,
    /// Streams with queued data, served round robin.
    pub(crate) ready: VecDeque<u32>,
    /// Credit the peer granted us for the whole session.
    pub(crate) send_session_credit: u64,
    /// Streams waiting for session credit (or for room in our own send queue).
    pub(crate) session_waiters: Vec<Waker>,
    /// Payload bytes queued on all streams and not yet handed to the transport.
    pub(crate) queued_total: u64,
    /// Session credit we granted and the peer has not used.
    recv_session_avail: u64,
    /// Session credit to return in the next `WINDOW(0)`.
    recv_session_unacked: u64,
    incoming_live: usize,
    incoming_tx: Option<mpsc::Sender<Stream>>,
    pub(crate) closed: Option<SessionError>,
    goaway: Option<(ErrorCode, String)>,
    last_recv: Instant,
    ping_sent: Option<(u64, Instant)>,
    rtt: Option<Duration>,
    pub(crate) bytes_in: u64,
    pub(crate) bytes_out: u64,
}

pub(crate) struct Shared {
    pub(crate) state: Mutex<State>,
    pub(crate) writer_wake: Notify,
    pub(crate) config: Config,
    pub(crate) peer: Hello,
    /// Largest DATA payload we send: the smaller of both sides' limits.
    pub(crate) max_send: usize,
    cancel: CancellationToken,
    routes_tx: watch::Sender<Vec<String>>,
}

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere must not wedge every stream of the session.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn push_control(&self, st: &mut State, frame: Frame) {
        st.control.push_back(Pending::Control(frame.encode()));
        self.writer_wake.notify_one();
    }

    /// Queues an answer to the peer's frame (counted against [`MAX_INDUCED_CONTROL`]).
    fn push_induced(&self, st: &mut State, frame: Frame) {
        let b = frame.encode();
        st.induced_bytes += b.len();
        st.control.push_back(Pending::Induced(b));
        self.writer_wake.notify_one();
    }

    /// Removes a stream's state once nobody can use it any more.
    pub(crate) fn maybe_remove(&self, st: &mut State, id: u32) {
        let (done, refund) = match st.streams.get_mut(&id) {
            Some(s) => (s.removable(), std::mem::take(&mut s.refund)),
            None => return,
        };
        if refund > 0 {
            // Queued payload dropped by a reset never reaches the peer, so the peer will never
            // return its credit: return it ourselves, or the session slowly starves.
            st.send_session_credit += refund;
            st.queued_total = st.queued_total.saturating_sub(refund);
            for w in st.session_waiters.drain(..) {
                w.wake();
            }
        }
        if done {
            if let Some(s) = st.streams.remove(&id) {
                if s.incoming {
                    st.incoming_live -= 1;
                }
            }
        }
    }

    /// Ends the session: every stream fails with `err`, `accept` returns `None`, the writer
    /// sends `goaway` (if any) and closes the transport.
    pub(crate) fn close(&self, err: SessionError, goaway: Option<(ErrorCode, String)>) {
        let mut st = self.lock();
        if st.closed.is_some() {
            return;
        }
        match &err {
            SessionError::PeerClosed | SessionError::Local(_) | SessionError::GoAway { .. } => {
                debug!(error = %err, "session closed")
            }
            _ => warn!(error = %err, "session closed"),
        }
        st.closed = Some(err.clone());
        st.incoming_tx = None;
        for s in st.streams.values_mut() {
            s.fail(StreamError::SessionLost(err.clone()));
        }
        // States whose handle is gone go now; the others stay (failed, with their byte counts)
        // until their handle drops.
        st.streams.retain(|_, s| !s.removable());
        st.ready.clear();
        st.control.clear();
        st.induced_bytes = 0;
        st.pong = None;
        for w in st.session_waiters.drain(..) {
            w.wake();
        }
        if let Some((code, reason)) = goaway {
            st.control
                .push_back(Pending::Control(Frame::GoAway { code, reason }.encode()));
        }
        drop(st);
        self.cancel.cancel();
        self.writer_wake.notify_one();
    }
}

/// A handle to a live session. Clone it freely; the session lives until it is closed or its
/// transport fails, not until the handles are dropped.
#[derive(Clone)]
pub struct Session {
    pub(crate) shared: Arc<Shared>,
}

/// Streams the peer opened towards us.
#[derive(Debug)]
pub struct Incoming {
    rx: mpsc::Receiver<Stream>,
}

impl Incoming {
    /// The next stream the peer opened, or `None` once the session is closed.
    pub async fn accept(&mut self) -> Option<Stream> {
        self.rx.recv().await
    }
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("peer_role", &self.shared.peer.role)
            .field("peer_instance", &self.shared.peer.instance_id)
            .finish()
    }
}

impl Session {
    /// Exchanges hellos over `transport` and starts the session's tasks.
    pub async fn start<T: Transport>(
        transport: T,
        config: Config,
    ) -> Result<(Session, Incoming), SessionError> {
        let (mut tx, mut rx) = transport.split();
        let hello = Hello {
            version: PROTOCOL_VERSION,
            role: config.role,
            stream_window: config.stream_window,
            session_window: config.session_window,
            max_frame: config.max_frame,
            instance_id: config.instance_id.clone(),
        };
        tx.send(Frame::Hello(hello).encode())
            .await
            .map_err(SessionError::from_transport)?;
        tx.flush().await.map_err(SessionError::from_transport)?;

        let first = match tokio::time::timeout(config.hello_timeout, rx.recv()).await {
            Err(_) => return Err(SessionError::HelloTimeout(config.hello_timeout)),
            Ok(Err(e)) => return Err(SessionError::from_transport(e)),
            Ok(Ok(None)) => return Err(SessionError::PeerClosed),
            Ok(Ok(Some(m))) => m,
        };
        let peer = match Frame::decode(first, config.max_frame as usize) {
            Ok(Frame::Hello(h)) => h,
            Ok(Frame::GoAway { code, reason }) => {
                return Err(SessionError::GoAway { code, reason })
            }
            Ok(other) => {
                return Err(SessionError::Protocol(format!(
                    "expected a hello, got {}",
                    frame_name(&other)
                )))
            }
            Err(e) => return Err(SessionError::Protocol(format!("bad hello: {e}"))),
        };
        if peer.version != PROTOCOL_VERSION {
            let err = SessionError::Version {
                ours: PROTOCOL_VERSION,
                theirs: peer.version,
            };
            let _ = tx
                .send(
                    Frame::GoAway {
                        code: ErrorCode::Version,
                        reason: err.to_string(),
                    }
                    .encode(),
                )
                .await;
            let _ = tx.flush().await;
            tx.close().await;
            return Err(err);
        }
        if peer.max_frame < 1024 || peer.stream_window == 0 || peer.session_window == 0 {
            return Err(SessionError::Protocol(format!(
                "hello announces unusable limits (max_frame {}, stream_window {}, session_window {})",
                peer.max_frame, peer.stream_window, peer.session_window
            )));
        }

        let (incoming_tx, incoming_rx) = mpsc::channel(config.accept_backlog.max(1));
        let now = Instant::now();
        let state = State {
            streams: HashMap::new(),
            next_id: if config.initiator { 1 } else { 2 },
            last_peer_id: 0,
            control: VecDeque::new(),
            induced_bytes: 0,
            pong: None,
            pings: 0,
            pings_since: now,
            routes_partial: Vec::new(),
            routes_bytes: 0,
            routes_truncated: false,
            ready: VecDeque::new(),
            send_session_credit: peer.session_window as u64,
            session_waiters: Vec::new(),
            queued_total: 0,
            recv_session_avail: config.session_window as u64,
            recv_session_unacked: 0,
            incoming_live: 0,
            incoming_tx: Some(incoming_tx),
            closed: None,
            goaway: None,
            last_recv: now,
            ping_sent: None,
            rtt: None,
            bytes_in: 0,
            bytes_out: 0,
        };
        let max_send = (peer.max_frame.min(config.max_frame)) as usize;
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            writer_wake: Notify::new(),
            config,
            peer,
            max_send,
            cancel: CancellationToken::new(),
            routes_tx: watch::Sender::new(Vec::new()),
        });
        tokio::spawn(run_writer(shared.clone(), tx));
        tokio::spawn(run_reader(shared.clone(), rx));
        tokio::spawn(run_pinger(shared.clone()));
        Ok((Session { shared }, Incoming { rx: incoming_rx }))
    }

    /// What the peer announced in its hello.
    pub fn peer(&self) -> &Hello {
        &self.shared.peer
    }

    /// Opens a stream to `dest`. Returns at once: data written now travels right after the
    /// `OPEN` (no round trip). Call [`Stream::opened`] to wait for `OPEN_OK`/`OPEN_ERR`.
    pub fn open(&self, dest: Dest, meta: Meta) -> Result<Stream, StreamError> {
        let shared = &self.shared;
        let mut st = shared.lock();
        if let Some(e) = &st.closed {
            return Err(StreamError::SessionLost(e.clone()));
        }
        if st.goaway.is_some() {
            return Err(StreamError::GoingAway);
        }
        let id = st.next_id;
        if id > u32::MAX - 2 {
            return Err(StreamError::IdsExhausted);
        }
        // A request that cannot be one frame is refused here, not sent to cut the session.
        let open = Frame::Open {
            stream: id,
            dest,
            meta,
        }
        .encode();
        let max = crate::frame::MAX_CONTROL_PAYLOAD + crate::frame::HEADER_LEN;
        if open.len() > max {
            return Err(StreamError::OpenTooLarge {
                bytes: open.len(),
                max,
            });
        }
        st.next_id += 2;
        st.streams.insert(
            id,
            StreamState::new(
                shared.config.stream_window,
                shared.peer.stream_window,
                OpenState::Opening,
                false,
            ),
        );
        st.control.push_back(Pending::Control(open));
        shared.writer_wake.notify_one();
        drop(st);
        Ok(Stream::new(id, shared.clone(), None))
    }

    /// Tells the peer which routes we serve (connectors do this after every session start).
    /// A long list goes as several frames (`ROUTES_PART`… `ROUTES`), each within the control
    /// frame limit.
    pub fn advertise_routes(&self, routes: Vec<String>) {
        let mut st = self.shared.lock();
        if st.closed.is_none() {
            for f in crate::frame::split_routes(routes) {
                self.shared.push_control(&mut st, f);
            }
        }
    }

    /// The routes the peer advertised; changes whenever it sends `ROUTES` again.
    pub fn peer_routes(&self) -> watch::Receiver<Vec<String>> {
        self.shared.routes_tx.subscribe()
    }

    /// Closes the session: sends `GOAWAY(code, reason)` and fails every stream.
    pub fn close(&self, code: ErrorCode, reason: &str) {
        self.shared.close(
            SessionError::Local(reason.to_string()),
            Some((code, reason.to_string())),
        );
    }

    /// Waits until the session has ended and says why.
    pub async fn closed(&self) -> SessionError {
        self.shared.cancel.cancelled().await;
        self.shared
            .lock()
            .closed
            .clone()
            .unwrap_or(SessionError::Local("closed".into()))
    }

    pub fn is_closed(&self) -> bool {
        self.shared.cancel.is_cancelled()
    }

    /// True once the peer said `GOAWAY`: no new streams should go here.
    pub fn is_going_away(&self) -> bool {
        let st = self.shared.lock();
        st.goaway.is_some() || st.closed.is_some()
    }

    pub fn stats(&self) -> SessionStats {
        let st = self.shared.lock();
        SessionStats {
            streams: st.streams.len(),
            bytes_in: st.bytes_in,
            bytes_out: st.bytes_out,
            rtt: st.rtt,
        }
    }

    /// Number of streams currently tracked by this session.
    pub fn stream_count(&self) -> usize {
        self.shared.lock().streams.len()
    }
}

fn frame_name(f: &Frame) -> &'static str {
    match f {
        Frame::Hello(_) => "HELLO",
        Frame::Open { .. } => "OPEN",
        Frame::OpenOk { .. } => "OPEN_OK",
        Frame::OpenErr { .. } => "OPEN_ERR",
        Frame::Data { .. } => "DATA",
        Frame::Window { .. } => "WINDOW",
        Frame::Fin { .. } => "FIN",
        Frame::Rst { .. } => "RST",
        Frame::Ping(_) => "PING",
        Frame::Pong(_) => "PONG",
        Frame::GoAway { .. } => "GOAWAY",
        Frame::Routes(_) => "ROUTES",
        Frame::RoutesPart(_) => "ROUTES_PART",
    }
}

/// Most bytes the writer moves between two flushes.
const WRITE_BATCH_BYTES: usize = 256 * 1024;

/// After the session is closed, how long the writer may still spend sending (a GOAWAY) and
/// closing before it drops the transport: a peer that stopped reading must not pin it forever.
const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

async fn run_writer<Tx: TransportTx>(shared: Arc<Shared>, mut tx: Tx) {
    let mut batch: Vec<Bytes> = Vec::with_capacity(64);
    loop {
        let closing;
        {
            let mut guard = shared.lock();
            let st: &mut State = &mut guard;
            let mut bytes = 0;
            let mut sent_payload = 0u64;
            // Control frames first: credit, opens and resets must not wait behind bulk data.
            if let Some(v) = st.pong.take() {
                let b = Frame::Pong(v).encode();
                bytes += b.len();
                batch.push(b);
            }
            // At most a batch at a time: what waits stays in the queue, where it is counted
            // (a peer that does not read cannot make this batch grow without end).
            while bytes < WRITE_BATCH_BYTES {
                let Some(p) = st.control.pop_front() else {
                    break;
                };
                let b = match p {
                    Pending::Control(b) => b,
                    Pending::Induced(b) => {
                        st.induced_bytes -= b.len();
                        b
                    }
                };
                bytes += b.len();
                batch.push(b);
            }
            // Then one frame per ready stream in turn.
            while bytes < WRITE_BATCH_BYTES {
                let Some(id) = st.ready.pop_front() else {
                    break;
                };
                let Some(s) = st.streams.get_mut(&id) else {
                    continue;
                };
                match s.send_queue.pop_front() {
                    Some(Out::Data(b)) => {
                        let payload = (b.len() - crate::frame::HEADER_LEN) as u64;
                        s.on_sent(payload);
                        sent_payload += payload;
                        bytes += b.len();
                        batch.push(b);
                    }
                    Some(Out::Fin) => {
                        s.fin_sent = true;
                        batch.push(Frame::Fin { stream: id }.encode());
                    }
                    None => {}
                }
                if s.send_queue.is_empty() {
                    s.in_ready = false;
                    shared.maybe_remove(st, id);
                } else {
                    st.ready.push_back(id);
                }
            }
            if sent_payload > 0 {
                st.queued_total = st.queued_total.saturating_sub(sent_payload);
                // Streams held back by our own session queue limit may go on.
                for w in st.session_waiters.drain(..) {
                    w.wake();
                }
            }
            closing = st.closed.is_some();
        }
        if !batch.is_empty() {
            let send = async {
                for b in batch.drain(..) {
                    tx.send(b).await?;
                }
                tx.flush().await
            };
            let grace = async {
                shared.cancel.cancelled().await;
                tokio::time::sleep(CLOSE_GRACE).await;
            };
            let result = tokio::select! {
                r = send => r,
                _ = grace => Err(TransportError::Closed),
            };
            batch.clear();
            if let Err(e) = result {
                shared.close(SessionError::from_transport(e), None);
                break;
            }
            continue;
        }
        if closing {
            break;
        }
        shared.writer_wake.notified().await;
    }
    let _ = tokio::time::timeout(CLOSE_GRACE, tx.close()).await;
}

async fn run_reader<Rx: TransportRx>(shared: Arc<Shared>, mut rx: Rx) {
    let max_frame = shared.config.max_frame as usize;
    loop {
        let msg = tokio::select! {
            _ = shared.cancel.cancelled() => return,
            m = rx.recv() => m,
        };
        let msg = match msg {
            Ok(Some(m)) => m,
            Ok(None) => {
                let err = match shared.lock().goaway.clone() {
                    Some((code, reason)) => SessionError::GoAway { code, reason },
                    None => SessionError::PeerClosed,
                };
                shared.close(err, None);
                return;
            }
            Err(e) => {
                let err = match shared.lock().goaway.clone() {
                    Some((code, reason)) => SessionError::GoAway { code, reason },
                    None => SessionError::from_transport(e),
                };
                shared.close(err, None);
                return;
            }
        };
        // A peer whose frames are always ready (a buffer full of small frames) must not keep
        // this worker from every other connection's tasks.
        tokio::task::coop::consume_budget().await;
        let len = msg.len();
        match Frame::decode(msg, max_frame) {
            Ok(frame) => {
                if let Err((code, reason)) = handle_frame(&shared, frame, len) {
                    shared.close(SessionError::Protocol(reason.clone()), Some((code, reason)));
                    return;
                }
            }
            Err(e) => {
                let reason = e.to_string();
                shared.close(
                    SessionError::Protocol(reason.clone()),
                    Some((ErrorCode::Protocol, reason)),
                );
                return;
            }
        }
    }
}

/// Applies one frame to the session state. An `Err` is a session-level protocol violation.
fn handle_frame(
    shared: &Arc<Shared>,
    frame: Frame,
    wire_len: usize,
) -> Result<(), (ErrorCode, String)> {
    let mut st = shared.lock();
    // Checked before each frame (some branches return early): what earlier frames asked for
    // and the peer has not read.
    if st.induced_bytes > MAX_INDUCED_CONTROL {
        return Err((
            ErrorCode::Limit,
            format!(
                "{} bytes of answers to the peer's frames wait unsent: the peer sends but does not read",
                st.induced_bytes
            ),
        ));
    }
    st.last_recv = Instant::now();
    st.bytes_in += wire_len as u64;
    match frame {
        Frame::Data { stream, payload } => {
            let n = payload.len() as u64;
            if n > st.recv_session_avail {
                return Err((
                    ErrorCode::FlowControl,
                    format!(
                        "sent {n} bytes with only {} bytes of session credit left",
                        st.recv_session_avail
                    ),
                ));
            }
            st.recv_session_avail -= n;
            st.recv_session_unacked += n;
            // Session credit goes back as soon as the bytes sit in a stream buffer (which the
            // stream window bounds): a stalled stream never holds the session's credit.
            if st.recv_session_unacked >= (shared.config.session_window as u64 / 4).max(1) {
                let credit = st.recv_session_unacked as u32;
                st.recv_session_avail += st.recv_session_unacked;
                st.recv_session_unacked = 0;
                shared.push_induced(&mut st, Frame::Window { stream: 0, credit });
            }
            if n == 0 {
                return Ok(());
            }
            // A small payload is a view into a large read buffer (128 KiB for WebSocket): kept
            // in a stalled stream, it would pin that whole buffer while its credit counts a few
            // bytes. Small payloads are copied out; large ones pin at most a few times their size.
            let payload = if payload.len() < shared.config.max_frame as usize / 2 {
                Bytes::copy_from_slice(&payload)
            } else {
                payload
            };
            let Some(s) = st.streams.get_mut(&stream) else {
                // A stream we already closed: data in flight is dropped (its credit was
                // returned to the session above).
                return Ok(());
            };
            match s.on_data(payload) {
                Ok(()) => {}
                Err((code, reason)) => {
                    debug!(stream, %reason, "resetting stream");
                    shared.push_induced(
                        &mut st,
                        Frame::Rst {
                            stream,
                            code,
                            reason,
                        },
                    );
                    shared.maybe_remove(&mut st, stream);
                }
            }
        }
        Frame::Window { stream: 0, credit } => {
            st.send_session_credit += credit as u64;
            if st.send_session_credit > (1u64 << 40) {
                return Err((ErrorCode::FlowControl, "session window overflow".into()));
            }
            for w in st.session_waiters.drain(..) {
                w.wake();
            }
        }
        Frame::Window { stream, credit } => {
            if let Some(s) = st.streams.get_mut(&stream) {
                if let Err(reason) = s.on_window(credit) {
                    shared.push_induced(
                        &mut st,
                        Frame::Rst {
                            stream,
                            code: ErrorCode::FlowControl,
                            reason,
                        },
                    );
                    shared.maybe_remove(&mut st, stream);
                }
            }
        }
        Frame::Open { stream, dest, meta } => {
            let peer_parity = if shared.config.initiator { 0 } else { 1 };
            if stream % 2 != peer_parity || stream <= st.last_peer_id {
                return Err((
                    ErrorCode::Protocol,
                    format!("OPEN for stream {stream}, which is not a new id of the peer's"),
                ));
            }
            st.last_peer_id = stream;
            let refuse = |st: &mut State, code: ErrorCode, reason: String| {
                debug!(stream, %dest, %reason, "refusing stream");
                shared.push_induced(
                    st,
                    Frame::OpenErr {
                        stream,
                        code,
                        reason,
                    },
                );
            };
            if !shared.config.accept_streams {
                refuse(
                    &mut st,
                    ErrorCode::NotAllowed,
                    format!("a {} does not accept streams", shared.config.role),
                );
                return Ok(());
            }
            if st.incoming_live >= shared.config.max_incoming_streams {
                let reason = format!(
                    "too many open streams on this session (limit {})",
                    shared.config.max_incoming_streams
                );
                refuse(&mut st, ErrorCode::Limit, reason);
                return Ok(());
            }
            let Some(tx) = st.incoming_tx.clone() else {
                return Ok(());
            };
            // Reserve the backlog slot before creating state, so a full backlog refuses the
            // stream instead of buffering without bound.
            let permit = match tx.try_reserve() {
                Ok(p) => p,
                Err(_) => {
                    refuse(&mut st, ErrorCode::Limit, "accept backlog is full".into());
                    return Ok(());
                }
            };
            st.streams.insert(
                stream,
                StreamState::new(
                    shared.config.stream_window,
                    shared.peer.stream_window,
                    OpenState::Incoming { answered: false },
                    true,
                ),
            );
            st.incoming_live += 1;
            drop(st);
            permit.send(Stream::new(
                stream,
                shared.clone(),
                Some(Box::new(crate::stream::OpenRequest { dest, meta })),
            ));
            return Ok(());
        }
        Frame::OpenOk { stream } => {
            if let Some(s) = st.streams.get_mut(&stream) {
                s.on_open_ok();
            }
        }
        Frame::OpenErr {
            stream,
            code,
            reason,
        } => {
            if let Some(s) = st.streams.get_mut(&stream) {
                s.on_open_err(code, reason);
                shared.maybe_remove(&mut st, stream);
            }
        }
        Frame::Fin { stream } => {
            if let Some(s) = st.streams.get_mut(&stream) {
                s.on_fin();
                shared.maybe_remove(&mut st, stream);
            }
        }
        Frame::Rst {
            stream,
            code,
            reason,
        } => {
            if let Some(s) = st.streams.get_mut(&stream) {
                s.fail(StreamError::Reset { code, reason });
                shared.maybe_remove(&mut st, stream);
            }
        }
        Frame::Ping(v) => {
            let now = st.last_recv;
            if now.duration_since(st.pings_since) >= Duration::from_secs(1) {
                st.pings_since = now;
                st.pings = 0;
            }
            st.pings += 1;
            if st.pings > MAX_PINGS_PER_SECOND {
                return Err((
                    ErrorCode::Protocol,
                    format!("more than {MAX_PINGS_PER_SECOND} PINGs in a second"),
                ));
            }
            // Only the latest PING is answered: a flood queues one PONG, not one per PING.
            st.pong = Some(v);
            shared.writer_wake.notify_one();
        }
        Frame::Pong(v) => {
            if let Some((sent_v, at)) = st.ping_sent {
                if sent_v == v {
                    st.rtt = Some(at.elapsed());
                    st.ping_sent = None;
                }
            }
        }
        Frame::GoAway { code, reason } => {
            debug!(%code, %reason, "peer sent GOAWAY");
            st.goaway = Some((code, reason));
        }
        Frame::RoutesPart(routes) => add_routes(&mut st, routes),
        Frame::Routes(routes) => {
            add_routes(&mut st, routes);
            let all = std::mem::take(&mut st.routes_partial);
            st.routes_bytes = 0;
            st.routes_truncated = false;
            drop(st);
            shared.routes_tx.send_replace(all);
            return Ok(());
        }
        Frame::Hello(_) => return Err((ErrorCode::Protocol, "second hello".into())),
    }
    Ok(())
}

/// Adds a part of the peer's route list, keeping at most [`MAX_PEER_ROUTES`] routes and
/// [`MAX_PEER_ROUTE_BYTES`] bytes; routes longer than [`crate::frame::MAX_ROUTE_LEN`] are not
/// routes and are dropped.
fn add_routes(st: &mut State, routes: Vec<String>) {
    for r in routes {
        if r.len() > crate::frame::MAX_ROUTE_LEN {
            continue;
        }
        if st.routes_partial.len() >= MAX_PEER_ROUTES
            || st.routes_bytes + r.len() > MAX_PEER_ROUTE_BYTES
        {
            if !st.routes_truncated {
                st.routes_truncated = true;
                warn!(
                    limit = MAX_PEER_ROUTES,
                    bytes = MAX_PEER_ROUTE_BYTES,
                    "the peer advertises more routes than a session keeps: the rest are ignored"
                );
            }
            return;
        }
        st.routes_bytes += r.len();
        st.routes_partial.push(r);
    }
}

async fn run_pinger(shared: Arc<Shared>) {
    let interval = shared.config.ping_interval;
    let dead_after = interval + shared.config.ping_timeout;
    let mut counter: u64 = 0;
    loop {
        tokio::select! {
            _ = shared.cancel.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        let mut st = shared.lock();
        if st.last_recv.elapsed() > dead_after {
            drop(st);
            shared.close(
                SessionError::Unresponsive(dead_after),
                Some((ErrorCode::TimedOut, "no frames received".into())),
            );
            return;
        }
        counter += 1;
        st.ping_sent = Some((counter, Instant::now()));
        shared.push_control(&mut st, Frame::Ping(counter));
    }
}
