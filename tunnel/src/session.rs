//! A session: many streams multiplexed over one transport, with flow control and liveness.
//!
//! ## Shape
//! A [`Session`] is a cheap handle (an `Arc`) to shared state guarded by one mutex. The state
//! and every rule of the protocol (credit, stream ids, resets, limits, liveness) are the
//! I/O-free state machine in `machine.rs`, which takes `now` and frames and queues what to send;
//! this file only drives it. Three tasks do:
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

use crate::association::Association;
use crate::frame::{Dest, ErrorCode, Frame, Hello, Meta, Role, PROTOCOL_VERSION};
use crate::machine::{Rules, State};
pub use crate::machine::{
    MAX_INDUCED_CONTROL, MAX_PEER_ROUTES, MAX_PEER_ROUTE_BYTES, MAX_PINGS_PER_SECOND,
};
use crate::stream::Stream;
use crate::transport::{Outgoing, Transport, TransportError, TransportRx, TransportTx};
use std::future::poll_fn;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

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
    /// Largest window a fast stream may grow to (`window.rs`); equal to `stream_window`, no
    /// stream grows.
    pub window_max: u32,
    /// Most window growth on this session, all streams together (the process has its own
    /// budget too, [`crate::window::set_budget`]).
    pub session_growth: u64,
    /// Most payload bytes we queue for the transport, all streams together (at most
    /// `session_window`); one stream may fill half of it. What is queued here is in front of
    /// every other stream's next frame.
    pub send_queue: u32,
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
    /// Announce datagrams (SOCKS5 UDP) in the hello; they flow when the peer announces them
    /// too. Off by default: only sides that handle associations turn it on.
    pub datagrams: bool,
    /// Announce resumable streams (`ACK`, `OPEN_OK` metadata); they are used when the peer
    /// announces them too. Off by default: only sides that keep resumable streams turn it on.
    pub resume: bool,
    /// A connector's resume id, sent in its hello with `resume` (empty for agents and the DMZ).
    pub resume_id: String,
}

impl Config {
    pub fn new(role: Role, initiator: bool) -> Config {
        Config {
            role,
            initiator,
            instance_id: String::new(),
            stream_window: 512 * 1024,
            // What may be in flight on the whole session bounds the queue that every other
            // stream's bytes wait behind (docs/protocol.md, "Flow control"): 16 MiB let one
            // bulk stream whose window had grown hold 30-40 ms of queue in front of keystrokes.
            session_window: 4 * 1024 * 1024,
            window_max: crate::window::DEFAULT_MAX,
            session_growth: 4 * crate::window::DEFAULT_MAX as u64,
            // Half a writer batch per stream: enough to keep the writer busy between two
            // wake-ups of a relay, little enough that a keystroke queued behind it leaves within
            // a millisecond at loopback speed (it was the session window, 4 MiB: 7 ms).
            send_queue: 512 * 1024,
            max_frame: crate::frame::DEFAULT_MAX_FRAME,
            accept_streams: true,
            max_incoming_streams: 16_384,
            accept_backlog: 8192,
            ping_interval: Duration::from_secs(20),
            ping_timeout: Duration::from_secs(20),
            hello_timeout: Duration::from_secs(10),
            datagrams: false,
            resume: false,
            resume_id: String::new(),
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
    /// We closed it with `GOAWAY(code, reason)` ([`Session::close`]).
    #[error("session closed ({code}): {reason}")]
    Closed { code: ErrorCode, reason: String },
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
    /// The peer did not announce datagrams in its hello (an older gateway or connector).
    #[error("the peer does not carry datagrams (UDP): it runs an older version")]
    NoDatagrams,
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
            StreamError::NoDatagrams => ErrorCode::NotAllowed,
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

pub(crate) struct Shared {
    pub(crate) state: Mutex<State>,
    pub(crate) writer_wake: Notify,
    /// A lazy `ACK` or `OPEN_OK` waits: the idle writer sends it after [`LAZY_DELAY`].
    pub(crate) lazy_wake: Notify,
    pub(crate) config: Config,
    pub(crate) peer: Hello,
    /// Largest DATA payload we send: the smaller of both sides' limits.
    pub(crate) max_send: usize,
    cancel: CancellationToken,
    /// Cancelled when the peer's `GOAWAY` arrives (the session may still carry its streams).
    peer_goaway: CancellationToken,
    routes_tx: watch::Sender<Vec<String>>,
    /// A `ROUTES` frame has arrived (an empty list too: the watch alone cannot tell one sent
    /// before anyone subscribed from none at all).
    routes_heard: std::sync::atomic::AtomicBool,
}

/// The session state under its lock; dropping it wakes the writer when the state queued
/// something to send.
pub(crate) struct Locked<'a> {
    guard: MutexGuard<'a, State>,
    writer_wake: &'a Notify,
    lazy_wake: &'a Notify,
}

impl std::ops::Deref for Locked<'_> {
    type Target = State;
    fn deref(&self) -> &State {
        &self.guard
    }
}

impl std::ops::DerefMut for Locked<'_> {
    fn deref_mut(&mut self) -> &mut State {
        &mut self.guard
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        if std::mem::take(&mut self.guard.wake_writer) {
            self.writer_wake.notify_one();
        }
        if std::mem::take(&mut self.guard.wake_lazy) {
            self.lazy_wake.notify_one();
        }
    }
}

impl Shared {
    pub(crate) fn lock(&self) -> Locked<'_> {
        Locked {
            // A panic elsewhere must not wedge every stream of the session.
            guard: self.state.lock().unwrap_or_else(|e| e.into_inner()),
            writer_wake: &self.writer_wake,
            lazy_wake: &self.lazy_wake,
        }
    }

    /// Ends the session: every stream fails with `err`, `accept` returns `None`, the writer
    /// sends `goaway` (if any) and closes the transport.
    pub(crate) fn close(&self, err: SessionError, goaway: Option<(ErrorCode, String)>) {
        let first = self.lock().close(err, goaway);
        if first {
            self.cancel.cancel();
            self.writer_wake.notify_one();
        }
    }
}

/// A handle to a live session. Clone it freely; the session lives until it is closed or its
/// transport fails, not until the handles are dropped.
#[derive(Clone)]
pub struct Session {
    pub(crate) shared: Arc<Shared>,
}

/// Streams the peer opened towards us.
pub struct Incoming {
    shared: Arc<Shared>,
}

impl Incoming {
    /// The next stream the peer opened, or `None` once the session is closed.
    pub async fn accept(&mut self) -> Option<Stream> {
        poll_fn(|cx| {
            let mut st = self.shared.lock();
            match st.next_incoming(cx.waker()) {
                Some((id, request)) => {
                    drop(st);
                    Poll::Ready(Some(Stream::new(id, self.shared.clone(), Some(request))))
                }
                None if st.closed.is_some() => Poll::Ready(None),
                None => Poll::Pending,
            }
        })
        .await
    }
}

impl Drop for Incoming {
    /// Nobody accepts any more: the streams that wait are refused (as their handles drop), and
    /// new ones are refused at once.
    fn drop(&mut self) {
        let waiting = self.shared.lock().stop_accepting();
        for id in waiting {
            drop(Stream::new(id, self.shared.clone(), None));
        }
    }
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming").finish_non_exhaustive()
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
            features: if config.datagrams {
                crate::frame::features::DATAGRAMS
            } else {
                0
            } | if config.resume {
                crate::frame::features::RESUME
            } else {
                0
            },
            resume_id: if config.resume {
                config.resume_id.clone()
            } else {
                String::new()
            },
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

        let max_send = (peer.max_frame.min(config.max_frame)) as usize;
        let rules = Rules {
            role: config.role,
            initiator: config.initiator,
            accept_streams: config.accept_streams,
            max_incoming_streams: config.max_incoming_streams,
            accept_backlog: config.accept_backlog,
            stream_window: config.stream_window,
            session_window: config.session_window,
            send_queue: config.send_queue.min(config.session_window),
            peer_stream_window: peer.stream_window,
            peer_session_window: peer.session_window,
            max_frame: config.max_frame,
            max_send,
            datagrams: config.datagrams && peer.features & crate::frame::features::DATAGRAMS != 0,
            resume: config.resume && peer.features & crate::frame::features::RESUME != 0,
            window_max: config.window_max.max(config.stream_window),
            session_growth: config.session_growth,
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(State::new(rules, Instant::now())),
            writer_wake: Notify::new(),
            lazy_wake: Notify::new(),
            config,
            peer,
            max_send,
            cancel: CancellationToken::new(),
            peer_goaway: CancellationToken::new(),
            routes_tx: watch::Sender::new(Vec::new()),
            routes_heard: Default::default(),
        });
        tokio::spawn(run_writer(shared.clone(), tx));
        tokio::spawn(run_reader(shared.clone(), rx));
        tokio::spawn(run_pinger(shared.clone()));
        Ok((
            Session {
                shared: shared.clone(),
            },
            Incoming { shared },
        ))
    }

    /// Both hellos announced resumable streams.
    pub fn resume_negotiated(&self) -> bool {
        self.shared.lock().rules.resume
    }

    /// What the peer announced in its hello.
    pub fn peer(&self) -> &Hello {
        &self.shared.peer
    }

    /// Opens a stream to `dest`. Returns at once: data written now travels right after the
    /// `OPEN` (no round trip). Call [`Stream::opened`] to wait for `OPEN_OK`/`OPEN_ERR`.
    pub fn open(&self, dest: Dest, meta: Meta) -> Result<Stream, StreamError> {
        let id = self.shared.lock().open(dest, meta)?;
        Ok(Stream::new(id, self.shared.clone(), None))
    }

    /// Tells the peer which routes we serve (connectors do this after every session start).
    /// A long list goes as several frames (`ROUTES_PART`… `ROUTES`), each within the control
    /// frame limit.
    pub fn advertise_routes(&self, routes: Vec<String>) {
        let mut st = self.shared.lock();
        if st.closed.is_none() {
            for f in crate::frame::split_routes(routes) {
                st.push_control(f);
            }
        }
    }

    /// The routes the peer advertised; changes whenever it sends `ROUTES` again.
    pub fn peer_routes(&self) -> watch::Receiver<Vec<String>> {
        self.shared.routes_tx.subscribe()
    }

    /// Whether the peer has advertised its routes (sent `ROUTES`, even an empty list).
    pub fn peer_routes_heard(&self) -> bool {
        self.shared
            .routes_heard
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Closes the session: sends `GOAWAY(code, reason)` and fails every stream.
    pub fn close(&self, code: ErrorCode, reason: &str) {
        self.shared.close(
            SessionError::Closed {
                code,
                reason: reason.to_string(),
            },
            Some((code, reason.to_string())),
        );
    }

    /// Tells the peer to open no new streams here (`GOAWAY(code, reason)`, then a `PING`) while
    /// the session keeps carrying the streams it has, and those the peer opened before it read
    /// the `GOAWAY`: a graceful drain. Close it later ([`Session::close`]), once
    /// [`Session::go_away_heard`] and [`Session::stream_count`] is 0, or a grace period is over.
    /// Sent once; nothing after the session is closed.
    pub fn go_away(&self, code: ErrorCode, reason: &str) {
        self.shared
            .lock()
            .go_away(Instant::now(), code, reason.to_string());
    }

    /// True once the peer answered the `PING` sent right after our [`Session::go_away`]: it has
    /// read the `GOAWAY`, and every stream it opened before that has arrived.
    pub fn go_away_heard(&self) -> bool {
        self.shared.lock().drain_heard
    }

    /// Waits until the peer said `GOAWAY` (its session may still carry streams for a while):
    /// from then on, new streams belong on another session. Pending for ever on a session that
    /// ends without one (wait for [`Session::closed`] too).
    pub async fn peer_going_away(&self) {
        self.shared.peer_goaway.cancelled().await
    }

    /// The peer's `GOAWAY` (code and reason), once it sent one.
    pub fn peer_goaway(&self) -> Option<(ErrorCode, String)> {
        self.shared.lock().goaway.clone()
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

    /// Whether `other` is a handle to this same session.
    pub fn same_session(&self, other: &Session) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }

    /// Whether datagrams (SOCKS5 UDP) flow on this session: both hellos announced them.
    pub fn datagrams(&self) -> bool {
        self.shared.lock().rules.datagrams
    }

    /// Opens a datagram association; datagrams may be sent on it at once.
    pub fn open_association(&self, meta: Meta) -> Result<Association, StreamError> {
        let id = self.shared.lock().open_association(meta)?;
        Ok(Association::new(id, self.shared.clone(), Meta::default()))
    }

    /// The next association the peer opened, or `None` once the session is closed.
    pub async fn accept_association(&self) -> Option<Association> {
        poll_fn(|cx| {
            let mut st = self.shared.lock();
            match st.dgrams.next_incoming(cx.waker()) {
                Some((id, meta)) => {
                    drop(st);
                    Poll::Ready(Some(Association::new(id, self.shared.clone(), meta)))
                }
                None if st.closed.is_some() => Poll::Ready(None),
                None => Poll::Pending,
            }
        })
        .await
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
        Frame::Ack { .. } => "ACK",
        Frame::Rst { .. } => "RST",
        Frame::Ping(_) => "PING",
        Frame::Pong(_) => "PONG",
        Frame::GoAway { .. } => "GOAWAY",
        Frame::Routes(_) => "ROUTES",
        Frame::RoutesPart(_) => "ROUTES_PART",
        Frame::DgramOpen { .. } => "DGRAM_OPEN",
        Frame::Dgram { .. } => "DGRAM",
        Frame::DgramClose { .. } => "DGRAM_CLOSE",
    }
}

/// Most bytes the writer moves between two flushes.
const WRITE_BATCH_BYTES: usize = 256 * 1024;

/// The longest a lazy frame waits for other frames to go with once the writer is idle: an
/// `ACK` below 256 KiB of data or of the peer's `FIN` (`resumable.rs`), or the `OPEN_OK` of an
/// `OPEN` that came with data (`State::answer`).
pub(crate) const LAZY_DELAY: std::time::Duration = std::time::Duration::from_millis(20);

/// Batches closer together than this make a session busy: its writer keeps the lazy timer
/// running (see `run_writer`).
const BUSY: std::time::Duration = std::time::Duration::from_millis(5);

/// Where a stopped lazy timer is parked (far enough never to fire).
const PARKED: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// After the session is closed, how long the writer may still spend sending (a GOAWAY) and
/// closing before it drops the transport: a peer that stopped reading must not pin it forever.
const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

async fn run_writer<Tx: TransportTx>(shared: Arc<Shared>, mut tx: Tx) {
    // Grows with the batches and is given back whenever the writer waits: an idle session
    // keeps no batch.
    let mut batch: Vec<Outgoing> = Vec::new();
    // The lazy timer sends what lazy frames wait when it ends; while it runs, queueing a lazy
    // frame wakes no task. On a busy session (batches less than `BUSY` apart) it runs all the
    // time: its lazy frames cost nothing on the path of the data. On a quiet one (a keystroke
    // now and then) a lazy frame starts it and the batch that takes the frame stops it: a
    // timer that ran on would wake an idle process for nothing.
    let lazy = tokio::time::sleep(LAZY_DELAY);
    tokio::pin!(lazy);
    let mut armed = false;
    let mut last_write: Option<tokio::time::Instant> = None;
    loop {
        let closing = {
            let mut st = shared.lock();
            st.lazy_armed = armed;
            st.next_batch(WRITE_BATCH_BYTES, &mut batch);
            st.closed.is_some()
        };
        if !batch.is_empty() {
            let send = async {
                for b in batch.drain(..) {
                    match b {
                        Outgoing::Frame(b) => tx.send(b).await?,
                        Outgoing::Data { stream, payload } => tx.send_data(stream, payload).await?,
                    }
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
            // After the write, off the path of what was just sent. A lazy frame queued during
            // it is taken by the next round's `next_batch`, whatever the timer does.
            let now = tokio::time::Instant::now();
            let busy = last_write.is_some_and(|t| now.duration_since(t) < BUSY);
            last_write = Some(now);
            if busy && !armed {
                lazy.as_mut().reset(now + LAZY_DELAY);
                armed = true;
            } else if !busy && armed {
                lazy.as_mut().reset(now + PARKED);
                armed = false;
            }
            continue;
        }
        if closing {
            break;
        }
        batch = Vec::new();
        // Idle. A lazy frame queued while the timer runs goes when it ends (or with whatever
        // wakes the writer first); one queued while it was stopped starts it, and waits.
        loop {
            tokio::select! {
                _ = shared.writer_wake.notified() => break,
                _ = shared.lazy_wake.notified(), if !armed => {
                    // A wake-up left from a frame that a batch took since starts nothing (the
                    // timer would only fire for nothing).
                    let mut st = shared.lock();
                    if st.lazy_waiting() {
                        lazy.as_mut().reset(tokio::time::Instant::now() + LAZY_DELAY);
                        armed = true;
                        st.lazy_armed = true;
                    }
                }
                _ = &mut lazy, if armed => {
                    // The next `next_batch` takes what waits; the state learns the timer
                    // stopped under the same lock, so a frame queued after that wakes us.
                    armed = false;
                    break;
                }
            }
        }
    }
    let _ = tokio::time::timeout(CLOSE_GRACE, tx.close()).await;
}

/// Bytes the reader hands on before it lets the tasks that carry them on run (a relay, the
/// other session's writer): what they copy is then still in the core's cache.
const READ_TURN_BYTES: usize = 256 * 1024;

async fn run_reader<Rx: TransportRx>(shared: Arc<Shared>, mut rx: Rx) {
    let max_frame = shared.config.max_frame as usize;
    let mut turn = 0usize;
    loop {
        if turn >= READ_TURN_BYTES {
            turn = 0;
            tokio::task::yield_now().await;
        }
        let msg = tokio::select! {
            _ = shared.cancel.cancelled() => return,
            m = rx.recv() => m,
        };
        let msg = match msg {
            Ok(Some(m)) => m,
            Ok(None) => {
                let err = shared.lock().end_reason(SessionError::PeerClosed);
                shared.close(err, None);
                return;
            }
            Err(e) => {
                let err = shared.lock().end_reason(SessionError::from_transport(e));
                shared.close(err, None);
                return;
            }
        };
        // A peer whose frames are always ready (a buffer full of small frames) must not keep
        // this worker from every other connection's tasks.
        tokio::task::coop::consume_budget().await;
        let len = msg.len();
        turn += len;
        match Frame::decode(msg, max_frame) {
            Ok(frame) => {
                let goaway = matches!(frame, Frame::GoAway { .. });
                let applied = shared.lock().on_frame(Instant::now(), frame, len);
                if goaway {
                    shared.peer_goaway.cancel();
                }
                match applied {
                    Ok(None) => {}
                    Ok(Some(routes)) => {
                        // Before the watch wakes anyone: a woken reader sees it heard.
                        shared
                            .routes_heard
                            .store(true, std::sync::atomic::Ordering::Release);
                        shared.routes_tx.send_replace(routes);
                    }
                    Err((code, reason)) => {
                        shared.close(SessionError::Protocol(reason.clone()), Some((code, reason)));
                        return;
                    }
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

async fn run_pinger(shared: Arc<Shared>) {
    let interval = shared.config.ping_interval;
    let dead_after = interval + shared.config.ping_timeout;
    loop {
        tokio::select! {
            _ = shared.cancel.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        let ticked = shared.lock().tick(Instant::now(), dead_after);
        if let Err(e) = ticked {
            shared.close(e, Some((ErrorCode::TimedOut, "no frames received".into())));
            return;
        }
    }
}
