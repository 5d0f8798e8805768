//! The session's protocol rules as a state machine: no sockets, no tasks, no clock.
//!
//! [`State`] takes what happens (a decoded frame and the time it arrived, an application that
//! opens, writes, reads or finishes a stream, a ping tick) and records what must be sent in its
//! control queue and per-stream send queues; [`State::next_batch`] hands the writer the next
//! frames in order. Every rule of flow control (stream and session credit, our own queue limits),
//! of stream ids (parity, monotonic, exhaustion), of resets, of incoming-stream limits and of
//! liveness (ping floods, an unresponsive peer) lives here, and the unit tests at the bottom
//! check them without a runtime. `now` is always passed in.
//!
//! `session.rs` wraps a `State` in a mutex and drives it with three tasks (reader, writer,
//! pinger); `stream.rs` holds the per-stream part ([`StreamState`]) and the application handle.
//! Wakers are stored here (calling one is not I/O), and [`State::wake_writer`] tells the caller
//! that the writer has something to send.

use crate::datagram::{Datagrams, Dropped, OpenAnswer};
use crate::frame::{Dest, ErrorCode, Frame, Meta, Role};
use crate::session::{SessionError, StreamError};
use crate::stream::{OpenRequest, OpenState, Out, StreamState};
use crate::transport::Outgoing;
use bytes::Bytes;
use std::collections::{HashMap, VecDeque};
use std::task::Waker;
use std::time::Duration;
use tokio::time::Instant;
use tracing::{debug, warn};

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

/// A session-level protocol violation by the peer: the session ends with `GOAWAY(code, reason)`.
pub(crate) type Violation = (ErrorCode, String);

/// The numbers both hellos settled that the rules need.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Rules {
    pub role: Role,
    /// We dialled: our stream ids are odd, the peer's even.
    pub initiator: bool,
    pub accept_streams: bool,
    pub max_incoming_streams: usize,
    pub accept_backlog: usize,
    /// What we buffer per stream and per session (the credit we grant).
    pub stream_window: u32,
    pub session_window: u32,
    /// Most payload bytes queued here, all streams together, not yet handed to the transport
    /// (`Config::send_queue`); one stream may fill at most half of it.
    pub send_queue: u32,
    /// The peer's per-stream grant (our initial send credit per stream).
    pub peer_stream_window: u32,
    /// The peer's session grant (our initial session send credit).
    pub peer_session_window: u32,
    /// Largest `DATA` payload we accept.
    pub max_frame: u32,
    /// Largest `DATA` payload we send (the smaller of both sides' limits).
    pub max_send: usize,
    /// Both hellos announced datagrams: `DGRAM*` frames may flow.
    pub datagrams: bool,
    /// Both hellos announced resumable streams: `ACK` frames and `OPEN_OK` metadata may flow.
    pub resume: bool,
    /// Largest receive window a stream may grow to (`window.rs`); `stream_window` disables
    /// growth.
    pub window_max: u32,
    /// Most growth beyond the base windows on this session, all streams together.
    pub session_growth: u64,
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

/// What [`State::send`] did with an application's bytes.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Sent {
    /// This many bytes were queued as one `DATA` frame.
    Queued(usize),
    /// No credit (or no room in our own queue): wait. `session` when the session's credit is
    /// what is missing (the caller registers as a session waiter too).
    Blocked {
        session: bool,
    },
    Failed(StreamError),
}

pub(crate) struct State {
    pub(crate) rules: Rules,
    pub(crate) streams: HashMap<u32, StreamState>,
    next_id: u32,
    last_peer_id: u32,
    /// Encoded control frames; sent before any data.
    control: VecDeque<Pending>,
    /// Bytes of [`Pending::Induced`] frames in `control`.
    induced_bytes: usize,
    /// The answer to the peer's latest `PING`, not yet sent (one at most: a `PING` flood costs
    /// nothing to hold).
    pong: Option<u64>,
    /// `PING`s received in the second that started at `pings_since`.
    pings: u32,
    pings_since: Instant,
    /// Our pings so far (their payload), and the one awaiting its `PONG`.
    ping_counter: u64,
    ping_sent: Option<(u64, Instant)>,
    pub(crate) rtt: Option<Duration>,
    /// Our graceful `GOAWAY` ([`State::go_away`]): the `PING` sent right after it, and whether
    /// a `PONG` for it (or a later one) came back.
    drain_ping: Option<u64>,
    pub(crate) drain_heard: bool,
    /// Routes of `ROUTES_PART` frames, waiting for the `ROUTES` that ends the list.
    routes_partial: Vec<String>,
    /// Bytes of route text in `routes_partial`.
    routes_bytes: usize,
    /// Routes beyond [`MAX_PEER_ROUTES`] were dropped (logged once per session).
    routes_truncated: bool,
    /// Streams with queued data, served round robin.
    ready: VecDeque<u32>,
    /// Streams with an `ACK` waiting (each once; the value is in the stream's state).
    acks: VecDeque<u32>,
    /// Credit the peer granted us for the whole session.
    send_session_credit: u64,
    /// Streams waiting for session credit (or for room in our own send queue).
    session_waiters: Vec<Waker>,
    /// Payload bytes queued on all streams and not yet handed to the transport.
    queued_total: u64,
    /// Session credit we granted and the peer has not used.
    recv_session_avail: u64,
    /// Session credit to return in the next `WINDOW(0)`.
    recv_session_unacked: u64,
    incoming_live: usize,
    /// Streams the peer opened, waiting for `Incoming::accept` (at most `accept_backlog`).
    accept_queue: VecDeque<(u32, Box<OpenRequest>)>,
    accept_waker: Option<Waker>,
    /// Somebody may still accept streams (the `Incoming` handle lives).
    pub(crate) accepting: bool,
    pub(crate) closed: Option<SessionError>,
    pub(crate) goaway: Option<(ErrorCode, String)>,
    last_recv: Instant,
    pub(crate) bytes_in: u64,
    pub(crate) bytes_out: u64,
    /// Something was queued for the writer since the caller last looked.
    pub(crate) wake_writer: bool,
    /// A lazy `ACK` or `OPEN_OK` was queued while the writer's lazy timer was stopped: the
    /// writer starts it (the frame goes with the next batch, or alone when the timer ends).
    pub(crate) wake_lazy: bool,
    /// A lazy `OPEN_OK` waits in `control` (an answer to an `OPEN` that came with data).
    lazy_control: bool,
    /// The writer's lazy timer runs (set by the writer under the lock of its `next_batch`): a
    /// lazy frame needs no wake-up, the timer's end sends it.
    pub(crate) lazy_armed: bool,
    /// Datagram associations (`datagram.rs`).
    pub(crate) dgrams: Datagrams,
    /// Window growth granted on this session's streams (taken from the process budget too).
    grown: u64,
}

impl Drop for State {
    /// The session's window growth goes back to the process budget.
    fn drop(&mut self) {
        crate::window::give_global(self.grown);
    }
}

impl State {
    pub(crate) fn new(rules: Rules, now: Instant) -> State {
        State {
            rules,
            streams: HashMap::new(),
            next_id: if rules.initiator { 1 } else { 2 },
            last_peer_id: 0,
            control: VecDeque::new(),
            induced_bytes: 0,
            pong: None,
            pings: 0,
            pings_since: now,
            ping_counter: 0,
            ping_sent: None,
            drain_ping: None,
            drain_heard: false,
            rtt: None,
            routes_partial: Vec::new(),
            routes_bytes: 0,
            routes_truncated: false,
            ready: VecDeque::new(),
            acks: VecDeque::new(),
            send_session_credit: rules.peer_session_window as u64,
            session_waiters: Vec::new(),
            queued_total: 0,
            recv_session_avail: rules.session_window as u64,
            recv_session_unacked: 0,
            incoming_live: 0,
            accept_queue: VecDeque::new(),
            accept_waker: None,
            accepting: true,
            closed: None,
            goaway: None,
            last_recv: now,
            bytes_in: 0,
            bytes_out: 0,
            wake_writer: false,
            wake_lazy: false,
            lazy_control: false,
            lazy_armed: false,
            dgrams: Datagrams::default(),
            grown: 0,
        }
    }

    /// Queues one of our own control frames.
    pub(crate) fn push_control(&mut self, frame: Frame) {
        self.control.push_back(Pending::Control(frame.encode()));
        self.wake_writer = true;
    }

    /// Queues an answer to the peer's frame (counted against [`MAX_INDUCED_CONTROL`]).
    fn push_induced(&mut self, frame: Frame) {
        let b = frame.encode();
        self.induced_bytes += b.len();
        self.control.push_back(Pending::Induced(b));
        self.wake_writer = true;
    }

    fn wake_session_waiters(&mut self) {
        for w in self.session_waiters.drain(..) {
            w.wake();
        }
    }

    /// Registers a task that waits for session credit (or room in our own queue).
    pub(crate) fn wait_for_session(&mut self, waker: &Waker) {
        if !self.session_waiters.iter().any(|w| w.will_wake(waker)) {
            self.session_waiters.push(waker.clone());
        }
    }

    /// Removes a stream's state once nobody can use it any more.
    pub(crate) fn maybe_remove(&mut self, id: u32) {
        let (done, refund) = match self.streams.get_mut(&id) {
            Some(s) => (s.removable(), std::mem::take(&mut s.refund)),
            None => return,
        };
        if refund > 0 {
            // Queued payload dropped by a reset never reaches the peer, so the peer will never
            // return its credit: return it ourselves, or the session slowly starves.
            self.send_session_credit += refund;
            self.queued_total = self.queued_total.saturating_sub(refund);
            self.wake_session_waiters();
        }
        if done {
            if let Some(s) = self.streams.remove(&id) {
                if s.incoming {
                    self.incoming_live -= 1;
                }
                let grown = s.recv_window.saturating_sub(self.rules.stream_window) as u64;
                self.grown -= grown;
                crate::window::give_global(grown);
            }
        }
    }

    /// Ends the session: every stream fails with `err`, nothing more is accepted, and only
    /// `goaway` (if any) is left to send. False when it had ended already.
    pub(crate) fn close(&mut self, err: SessionError, goaway: Option<(ErrorCode, String)>) -> bool {
        if self.closed.is_some() {
            return false;
        }
        match &err {
            SessionError::PeerClosed
            | SessionError::Local(_)
            | SessionError::Closed { .. }
            | SessionError::GoAway { .. } => {
                debug!(error = %err, "session closed")
            }
            _ => warn!(error = %err, "session closed"),
        }
        self.closed = Some(err.clone());
        for s in self.streams.values_mut() {
            s.fail(StreamError::SessionLost(err.clone()));
            // `acks` is emptied below: nothing queued may keep a state.
            s.ack_queued = false;
            s.ack_out = None;
        }
        // States whose handle is gone go now; the others stay (failed, with their byte counts)
        // until their handle drops.
        self.streams.retain(|_, s| !s.removable());
        self.dgrams
            .end_all(ErrorCode::SessionLost, &err.to_string());
        self.ready.clear();
        self.acks.clear();
        self.control.clear();
        self.lazy_control = false;
        self.induced_bytes = 0;
        self.pong = None;
        self.wake_session_waiters();
        if let Some(w) = self.accept_waker.take() {
            w.wake();
        }
        if let Some((code, reason)) = goaway {
            self.control
                .push_back(Pending::Control(Frame::GoAway { code, reason }.encode()));
        }
        self.wake_writer = true;
        true
    }

    /// The peer's `GOAWAY` as the session's end, when it sent one before the transport ended.
    pub(crate) fn end_reason(&self, otherwise: SessionError) -> SessionError {
        match self.goaway.clone() {
            Some((code, reason)) => SessionError::GoAway { code, reason },
            None => otherwise,
        }
    }

    // --- the peer's frames -------------------------------------------------------------------

    /// Applies one frame that arrived at `now` (`wire_len` bytes on the wire). `Ok(Some(routes))`
    /// when the peer completed a route list; `Err` is a session-level protocol violation.
    pub(crate) fn on_frame(
        &mut self,
        now: Instant,
        frame: Frame,
        wire_len: usize,
    ) -> Result<Option<Vec<String>>, Violation> {
        // Checked before each frame (some branches return early): what earlier frames asked
        // for and the peer has not read.
        if self.induced_bytes > MAX_INDUCED_CONTROL {
            return Err((
                ErrorCode::Limit,
                format!(
                    "{} bytes of answers to the peer's frames wait unsent: the peer sends but does not read",
                    self.induced_bytes
                ),
            ));
        }
        self.last_recv = now;
        self.bytes_in += wire_len as u64;
        match frame {
            Frame::Data { stream, payload } => self.on_data(stream, payload)?,
            Frame::Window { stream: 0, credit } => {
                self.send_session_credit += credit as u64;
                if self.send_session_credit > (1u64 << 40) {
                    return Err((ErrorCode::FlowControl, "session window overflow".into()));
                }
                self.wake_session_waiters();
            }
            Frame::Window { stream, credit } => {
                if let Some(s) = self.streams.get_mut(&stream) {
                    if let Err(reason) = s.on_window(credit) {
                        self.push_induced(Frame::Rst {
                            stream,
                            code: ErrorCode::FlowControl,
                            reason,
                        });
                        self.maybe_remove(stream);
                    }
                }
            }
            Frame::Open { stream, dest, meta } => self.on_open(stream, dest, meta)?,
            Frame::OpenOk { stream, meta } => {
                if let Some(s) = self.streams.get_mut(&stream) {
                    // Metadata only from a peer that announced resume; otherwise ignored.
                    let meta = if self.rules.resume {
                        meta
                    } else {
                        Meta::default()
                    };
                    s.on_open_ok(meta);
                }
            }
            Frame::Ack { .. } if !self.rules.resume => {
                return Err((
                    ErrorCode::Protocol,
                    "ACK frame, but resume was not announced in both hellos".into(),
                ))
            }
            Frame::Ack { stream, offset } => {
                if let Some(s) = self.streams.get_mut(&stream) {
                    s.on_ack(offset);
                }
            }
            Frame::OpenErr {
                stream,
                code,
                reason,
            } => {
                if let Some(s) = self.streams.get_mut(&stream) {
                    s.on_open_err(code, reason);
                    self.maybe_remove(stream);
                }
            }
            Frame::Fin { stream } => {
                if let Some(s) = self.streams.get_mut(&stream) {
                    s.on_fin();
                    self.maybe_remove(stream);
                }
            }
            Frame::Rst {
                stream,
                code,
                reason,
            } => {
                if let Some(s) = self.streams.get_mut(&stream) {
                    s.fail(StreamError::Reset { code, reason });
                    self.maybe_remove(stream);
                }
            }
            Frame::Ping(v) => {
                if now.saturating_duration_since(self.pings_since) >= Duration::from_secs(1) {
                    self.pings_since = now;
                    self.pings = 0;
                }
                self.pings += 1;
                if self.pings > MAX_PINGS_PER_SECOND {
                    return Err((
                        ErrorCode::Protocol,
                        format!("more than {MAX_PINGS_PER_SECOND} PINGs in a second"),
                    ));
                }
                // Only the latest PING is answered: a flood queues one PONG, not one per PING.
                self.pong = Some(v);
                self.wake_writer = true;
            }
            Frame::Pong(v) => {
                // The peer answers the latest PING it read: any answer from ours on means it
                // read our GOAWAY too.
                if self.drain_ping.is_some_and(|d| v >= d) {
                    self.drain_heard = true;
                }
                if let Some((sent_v, at)) = self.ping_sent {
                    if sent_v == v {
                        self.rtt = Some(now.saturating_duration_since(at));
                        self.ping_sent = None;
                    }
                }
            }
            Frame::GoAway { code, reason } => {
                debug!(%code, %reason, "peer sent GOAWAY");
                self.goaway = Some((code, reason));
            }
            Frame::RoutesPart(routes) => self.add_routes(routes),
            Frame::Routes(routes) => {
                self.add_routes(routes);
                let all = std::mem::take(&mut self.routes_partial);
                self.routes_bytes = 0;
                self.routes_truncated = false;
                return Ok(Some(all));
            }
            Frame::Hello(_) => return Err((ErrorCode::Protocol, "second hello".into())),
            Frame::DgramOpen { .. } | Frame::Dgram { .. } | Frame::DgramClose { .. }
                if !self.rules.datagrams =>
            {
                return Err((
                    ErrorCode::Protocol,
                    "datagram frame, but datagrams were not announced in both hellos".into(),
                ))
            }
            Frame::DgramOpen { assoc, meta } => {
                self.check_peer_id(assoc, "DGRAM_OPEN")?;
                if self.closed.is_some() {
                    return Ok(None);
                }
                let accept = self.rules.accept_streams && self.accepting;
                if let OpenAnswer::Refuse(code, reason) = self.dgrams.on_open(assoc, meta, accept) {
                    debug!(assoc, %reason, "refusing datagram association");
                    self.push_induced(Frame::DgramClose {
                        assoc,
                        code,
                        reason,
                    });
                }
            }
            Frame::Dgram {
                assoc,
                addr,
                payload,
            } => self.dgrams.on_dgram(assoc, addr, payload),
            Frame::DgramClose {
                assoc,
                code,
                reason,
            } => self.dgrams.on_close(assoc, code, reason),
        }
        Ok(None)
    }

    /// A new id of the peer's (its parity, above every id it used for a stream or an
    /// association), else a protocol violation.
    fn check_peer_id(&mut self, id: u32, what: &str) -> Result<(), Violation> {
        let peer_parity = if self.rules.initiator { 0 } else { 1 };
        if id % 2 != peer_parity || id <= self.last_peer_id {
            return Err((
                ErrorCode::Protocol,
                format!("{what} for id {id}, which is not a new id of the peer's"),
            ));
        }
        self.last_peer_id = id;
        Ok(())
    }

    fn on_data(&mut self, stream: u32, payload: Bytes) -> Result<(), Violation> {
        let n = payload.len() as u64;
        if n > self.recv_session_avail {
            return Err((
                ErrorCode::FlowControl,
                format!(
                    "sent {n} bytes with only {} bytes of session credit left",
                    self.recv_session_avail
                ),
            ));
        }
        self.recv_session_avail -= n;
        self.recv_session_unacked += n;
        // Session credit goes back as soon as the bytes sit in a stream buffer (which the
        // stream window bounds): a stalled stream never holds the session's credit.
        if self.recv_session_unacked >= (self.rules.session_window as u64 / 4).max(1) {
            let credit = self.recv_session_unacked as u32;
            self.recv_session_avail += self.recv_session_unacked;
            self.recv_session_unacked = 0;
            self.push_induced(Frame::Window { stream: 0, credit });
        }
        if n == 0 {
            return Ok(());
        }
        // A small payload is a view into a large read buffer (128 KiB for WebSocket): kept in a
        // stalled stream, it would pin that whole buffer while its credit counts a few bytes.
        // Small payloads are copied out; large ones pin at most a few times their size.
        let payload = if payload.len() < self.rules.max_frame as usize / 2 {
            Bytes::copy_from_slice(&payload)
        } else {
            payload
        };
        let Some(s) = self.streams.get_mut(&stream) else {
            // A stream we already closed: data in flight is dropped (its credit was returned to
            // the session above).
            return Ok(());
        };
        if let Err((code, reason)) = s.on_data(payload) {
            debug!(stream, %reason, "resetting stream");
            self.push_induced(Frame::Rst {
                stream,
                code,
                reason,
            });
            self.maybe_remove(stream);
        }
        Ok(())
    }

    fn on_open(&mut self, stream: u32, dest: Dest, meta: Meta) -> Result<(), Violation> {
        self.check_peer_id(stream, "OPEN")?;
        let refusal = if !self.rules.accept_streams {
            Some((
                ErrorCode::NotAllowed,
                format!("a {} does not accept streams", self.rules.role),
            ))
        } else if self.incoming_live >= self.rules.max_incoming_streams {
            Some((
                ErrorCode::Limit,
                format!(
                    "too many open streams on this session (limit {})",
                    self.rules.max_incoming_streams
                ),
            ))
        } else if self.closed.is_some() {
            return Ok(());
        } else if !self.accepting || self.accept_queue.len() >= self.rules.accept_backlog.max(1) {
            // Refused before any state exists: a full backlog never buffers without bound.
            Some((ErrorCode::Limit, "accept backlog is full".to_string()))
        } else {
            None
        };
        if let Some((code, reason)) = refusal {
            debug!(stream, %dest, %reason, "refusing stream");
            self.push_induced(Frame::OpenErr {
                stream,
                code,
                reason,
            });
            return Ok(());
        }
        self.streams.insert(
            stream,
            StreamState::new(
                self.rules.stream_window,
                self.rules.peer_stream_window,
                OpenState::Incoming { answered: false },
                true,
            ),
        );
        self.incoming_live += 1;
        self.accept_queue
            .push_back((stream, Box::new(OpenRequest { dest, meta })));
        if let Some(w) = self.accept_waker.take() {
            w.wake();
        }
        Ok(())
    }

    /// Adds a part of the peer's route list, keeping at most [`MAX_PEER_ROUTES`] routes and
    /// [`MAX_PEER_ROUTE_BYTES`] bytes; routes longer than [`crate::frame::MAX_ROUTE_LEN`] are
    /// not routes and are dropped.
    fn add_routes(&mut self, routes: Vec<String>) {
        for r in routes {
            if r.len() > crate::frame::MAX_ROUTE_LEN {
                continue;
            }
            if self.routes_partial.len() >= MAX_PEER_ROUTES
                || self.routes_bytes + r.len() > MAX_PEER_ROUTE_BYTES
            {
                if !self.routes_truncated {
                    self.routes_truncated = true;
                    warn!(
                        limit = MAX_PEER_ROUTES,
                        bytes = MAX_PEER_ROUTE_BYTES,
                        "the peer advertises more routes than a session keeps: the rest are ignored"
                    );
                }
                return;
            }
            self.routes_bytes += r.len();
            self.routes_partial.push(r);
        }
    }

    // --- the application ---------------------------------------------------------------------

    /// The next stream the peer opened, if one waits; else `waker` is woken when one arrives
    /// (or the session ends).
    pub(crate) fn next_incoming(&mut self, waker: &Waker) -> Option<(u32, Box<OpenRequest>)> {
        let next = self.accept_queue.pop_front();
        if next.is_none() {
            self.accept_waker = Some(waker.clone());
        }
        next
    }

    /// Nobody accepts any more: the streams waiting are returned, for the caller to refuse.
    pub(crate) fn stop_accepting(&mut self) -> Vec<u32> {
        self.accepting = false;
        self.accept_waker = None;
        self.accept_queue.drain(..).map(|(id, _)| id).collect()
    }

    /// Opens a stream: the next id of ours, and its `OPEN` queued.
    pub(crate) fn open(&mut self, dest: Dest, meta: Meta) -> Result<u32, StreamError> {
        if let Some(e) = &self.closed {
            return Err(StreamError::SessionLost(e.clone()));
        }
        if self.goaway.is_some() {
            return Err(StreamError::GoingAway);
        }
        let id = self.queue_open(|stream| Frame::Open { stream, dest, meta })?;
        self.streams.insert(
            id,
            StreamState::new(
                self.rules.stream_window,
                self.rules.peer_stream_window,
                OpenState::Opening,
                false,
            ),
        );
        Ok(id)
    }

    /// Takes the next id of ours for `frame(id)` (an `OPEN` or a `DGRAM_OPEN`) and queues the
    /// frame. A request that cannot be one control frame is refused here, not sent to cut the
    /// session; nothing is taken then.
    fn queue_open(&mut self, frame: impl FnOnce(u32) -> Frame) -> Result<u32, StreamError> {
        let id = self.next_id;
        if id > u32::MAX - 2 {
            return Err(StreamError::IdsExhausted);
        }
        let open = frame(id).encode();
        let max = crate::frame::MAX_CONTROL_PAYLOAD + crate::frame::HEADER_LEN;
        if open.len() > max {
            return Err(StreamError::OpenTooLarge {
                bytes: open.len(),
                max,
            });
        }
        self.next_id += 2;
        self.control.push_back(Pending::Control(open));
        self.wake_writer = true;
        Ok(id)
    }

    /// Opens a datagram association: the next id of ours, and its `DGRAM_OPEN` queued.
    pub(crate) fn open_association(&mut self, meta: Meta) -> Result<u32, StreamError> {
        if let Some(e) = &self.closed {
            return Err(StreamError::SessionLost(e.clone()));
        }
        if !self.rules.datagrams {
            return Err(StreamError::NoDatagrams);
        }
        if self.goaway.is_some() {
            return Err(StreamError::GoingAway);
        }
        let id = self.queue_open(|assoc| Frame::DgramOpen { assoc, meta })?;
        self.dgrams.opened(id);
        Ok(id)
    }

    /// Queues one datagram of association `id` for the writer, or says why it was dropped.
    pub(crate) fn send_datagram(
        &mut self,
        id: u32,
        addr: &Dest,
        payload: &[u8],
    ) -> Result<(), Dropped> {
        if self.closed.is_some() {
            return Err(Dropped::Closed);
        }
        self.dgrams.send(id, addr, payload)?;
        self.bytes_out += payload.len() as u64;
        self.wake_writer = true;
        Ok(())
    }

    /// The application closed association `id`; the peer is told unless it ended already.
    /// Closing one the peer opened answers the peer's `DGRAM_OPEN`: it counts against
    /// [`MAX_INDUCED_CONTROL`], so a peer that opens and refuses to read cannot grow our queue.
    pub(crate) fn close_association(&mut self, id: u32, code: ErrorCode, reason: &str) {
        let Some(incoming) = self.dgrams.close(id) else {
            return;
        };
        if self.closed.is_some() {
            return;
        }
        let frame = Frame::DgramClose {
            assoc: id,
            code,
            reason: reason.to_string(),
        };
        if incoming {
            self.push_induced(frame);
        } else {
            self.push_control(frame);
        }
    }

    /// Queues as much of `data` on stream `id` as may be sent now: at most one frame, within
    /// the peer's stream and session credit *and* our own windows for bytes queued but not yet
    /// written (a peer that announces huge windows and stops reading cannot make us buffer more
    /// than we would grant it).
    pub(crate) fn send(&mut self, id: u32, data: &[u8]) -> Sent {
        self.send_with(id, data.len(), |n| Bytes::copy_from_slice(&data[..n]))
    }

    /// [`State::send`] of a payload already in a `Bytes` (what the DMZ relays): the part that
    /// may be sent now is split off `data` and queued as it is, without a copy.
    pub(crate) fn send_bytes(&mut self, id: u32, data: &mut Bytes) -> Sent {
        let len = data.len();
        self.send_with(id, len, |n| data.split_to(n))
    }

    fn send_with(&mut self, id: u32, len: usize, take: impl FnOnce(usize) -> Bytes) -> Sent {
        let queue = self.rules.send_queue as u64;
        let session_room = self
            .send_session_credit
            .min(queue.saturating_sub(self.queued_total));
        let Some(s) = self.streams.get_mut(&id) else {
            return Sent::Failed(missing(self.closed.clone()));
        };
        if let Some(e) = s.error() {
            return Sent::Failed(e.clone());
        }
        if s.fin_queued {
            return Sent::Failed(StreamError::LocalReset {
                code: ErrorCode::Protocol,
                reason: "write after shutdown".into(),
            });
        }
        // One stream's share of our queue: a bulk stream cannot fill it all, so a keystroke's
        // frame on another stream always finds room and goes out in the next batch, not behind
        // a whole queue of bulk data (docs/protocol.md, "Flow control").
        let share = (queue / 2).max(self.rules.max_send as u64);
        let own = (self.rules.stream_window as u64).min(share);
        let stream_room = s.send_credit.min(own.saturating_sub(s.queued_payload));
        let cap = stream_room
            .min(session_room)
            .min(self.rules.max_send as u64) as usize;
        if cap == 0 {
            return Sent::Blocked {
                session: session_room == 0,
            };
        }
        let n = cap.min(len);
        s.send_queue.push_back(Out::Data(take(n)));
        let n64 = n as u64;
        s.send_credit -= n64;
        s.queued_payload += n64;
        s.bytes_out += n64;
        let newly_ready = !s.in_ready;
        s.in_ready = true;
        self.send_session_credit -= n64;
        self.queued_total += n64;
        self.bytes_out += n64;
        if newly_ready {
            self.ready.push_back(id);
            self.wake_writer = true;
        }
        Sent::Queued(n)
    }

    /// The application consumed `n` bytes of stream `id`: credit goes back once a quarter
    /// window has accumulated (fewer, larger `WINDOW` frames), never after the peer's `FIN`.
    ///
    /// A reader that drains whole windows faster than the path returns credit gets a larger
    /// window (`window.rs`): the growth rides the same `WINDOW` as extra credit.
    pub(crate) fn consumed(&mut self, id: u32, n: u32, now: Instant) {
        let interval = crate::window::interval(self.rtt);
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        s.recv_unacked += n;
        if s.recv_fin {
            return;
        }
        let want = s.tuner.consumed(now, n, s.recv_window, interval);
        if want > 0 {
            let room = (self.rules.window_max.saturating_sub(s.recv_window) as u64)
                .min(want as u64)
                .min(self.rules.session_growth.saturating_sub(self.grown));
            let got = crate::window::take_global(room) as u32;
            s.recv_window += got;
            s.recv_unacked += got;
            self.grown += got as u64;
        }
        if s.recv_unacked < (s.recv_window / 4).max(1) {
            return;
        }
        let credit = s.recv_unacked;
        s.recv_avail += credit;
        s.recv_unacked = 0;
        self.push_control(Frame::Window { stream: id, credit });
    }

    /// Half-closes our sending direction of stream `id` (`FIN` after everything queued).
    pub(crate) fn finish(&mut self, id: u32) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        if s.fin_queued || s.error().is_some() {
            return;
        }
        s.fin_queued = true;
        s.send_queue.push_back(Out::Fin);
        if !s.in_ready {
            s.in_ready = true;
            self.ready.push_back(id);
            self.wake_writer = true;
        }
    }

    /// Resets stream `id` locally (`RST(code, reason)`); both directions end at once.
    pub(crate) fn reset(&mut self, id: u32, code: ErrorCode, reason: &str) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        if s.error().is_some() {
            return;
        }
        s.fail(StreamError::LocalReset {
            code,
            reason: reason.to_string(),
        });
        self.push_control(Frame::Rst {
            stream: id,
            code,
            reason: reason.to_string(),
        });
    }

    /// Queues our end-to-end `ACK(offset)` for stream `id`; a value not yet sent is replaced.
    pub(crate) fn send_ack(&mut self, id: u32, offset: u64) {
        // Also when a lazy one was queued already: this one must not wait for it.
        if self.queue_ack(id, offset).is_some() {
            self.wake_writer = true;
        }
    }

    /// Queues `ACK(offset)` without waking the writer: it goes with the next batch written
    /// for any reason (typically the `FIN` that answers the peer's), or alone when the writer's
    /// lazy timer ends ([`State::lazy_queued`]). Nothing waits on it but the peer's
    /// bookkeeping, so saving a message per close is worth the delay.
    pub(crate) fn send_ack_lazy(&mut self, id: u32, offset: u64) {
        if self.queue_ack(id, offset) == Some(true) {
            self.lazy_queued();
        }
    }

    /// A lazy frame was queued: the writer must learn of it only when its timer is not running
    /// already (so a busy session's lazy frames cost no task wake-up on the data's path).
    fn lazy_queued(&mut self) {
        if !self.lazy_armed {
            self.wake_lazy = true;
        }
    }

    /// A lazy frame (an `ACK` or an `OPEN_OK`) waits for the writer's next batch.
    pub(crate) fn lazy_waiting(&self) -> bool {
        !self.acks.is_empty() || self.lazy_control
    }

    /// Records the offset to acknowledge: `None` when no `ACK` can go (resume is off, the
    /// session closed, the stream gone), else whether the stream is newly queued for it.
    fn queue_ack(&mut self, id: u32, offset: u64) -> Option<bool> {
        if !self.rules.resume || self.closed.is_some() {
            return None;
        }
        let s = self.streams.get_mut(&id)?;
        s.ack_out = Some(offset);
        if s.ack_queued {
            return Some(false);
        }
        s.ack_queued = true;
        self.acks.push_back(id);
        Some(true)
    }

    /// Answers a stream the peer opened: `OPEN_OK` (with `meta`, towards a peer that announced
    /// resume), or `OPEN_ERR(code, reason)`.
    pub(crate) fn answer(&mut self, id: u32, refuse: Option<(ErrorCode, &str)>, meta: Meta) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        if !matches!(s.open, OpenState::Incoming { answered: false }) {
            return;
        }
        match refuse {
            None if s.error().is_none() => {
                s.open = OpenState::Incoming { answered: true };
                let meta = if self.rules.resume {
                    meta
                } else {
                    Meta::default()
                };
                // The peer sent data before our answer: it opened without waiting for one (a
                // forward, a plain HTTP request), so the answer is lazy. It rides with the
                // first bytes of the reply, one message through the DMZ instead of two on the
                // new connection's path, or goes alone when the writer's lazy timer ends.
                let early = s.bytes_in > 0;
                let frame = Frame::OpenOk { stream: id, meta };
                if early {
                    self.control.push_back(Pending::Control(frame.encode()));
                    self.lazy_control = true;
                    self.lazy_queued();
                } else {
                    self.push_control(frame);
                }
            }
            None => {}
            Some((code, reason)) => {
                s.open = OpenState::Incoming { answered: true };
                s.fail(StreamError::LocalReset {
                    code,
                    reason: reason.to_string(),
                });
                self.push_control(Frame::OpenErr {
                    stream: id,
                    code,
                    reason: reason.to_string(),
                });
            }
        }
    }

    /// The application dropped its handle to stream `id`: a stream not finished both ways is
    /// reset (refused, when it was never answered), and its state goes once nothing needs it.
    pub(crate) fn drop_handle(&mut self, id: u32) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        s.handle_alive = false;
        let finished = s.fin_queued && s.recv_fin;
        if s.error().is_none() && !finished {
            let unanswered = matches!(s.open, OpenState::Incoming { answered: false });
            s.fail(StreamError::LocalReset {
                code: ErrorCode::Cancel,
                reason: "stream dropped".into(),
            });
            let frame = if unanswered {
                Frame::OpenErr {
                    stream: id,
                    code: ErrorCode::Internal,
                    reason: "stream was dropped before it was answered".into(),
                }
            } else {
                Frame::Rst {
                    stream: id,
                    code: ErrorCode::Cancel,
                    reason: "stream dropped".into(),
                }
            };
            self.push_control(frame);
        }
        self.maybe_remove(id);
    }

    // --- the writer and the clock ------------------------------------------------------------

    /// Moves the next frames to send into `batch`, at most about `max_bytes`: the pong, control
    /// frames, then one `DATA` (or `FIN`) per ready stream in turn. What does not fit stays
    /// queued, where it is counted.
    pub(crate) fn next_batch(&mut self, max_bytes: usize, batch: &mut Vec<Outgoing>) {
        self.wake_writer = false;
        let mut bytes = 0;
        let mut sent_payload = 0u64;
        // Control frames first: credit, opens and resets must not wait behind bulk data.
        if let Some(v) = self.pong.take() {
            let b = Frame::Pong(v).encode();
            bytes += b.len();
            batch.push(Outgoing::Frame(b));
        }
        while bytes < max_bytes {
            let Some(p) = self.control.pop_front() else {
                break;
            };
            let b = match p {
                Pending::Control(b) => b,
                Pending::Induced(b) => {
                    self.induced_bytes -= b.len();
                    b
                }
            };
            bytes += b.len();
            batch.push(Outgoing::Frame(b));
        }
        if self.control.is_empty() {
            self.lazy_control = false;
        }
        // End-to-end acknowledgements: small, one per stream at most, ahead of data.
        while let Some(id) = self.acks.pop_front() {
            if let Some(s) = self.streams.get_mut(&id) {
                s.ack_queued = false;
                if let Some(offset) = s.ack_out.take() {
                    let b = Frame::Ack { stream: id, offset }.encode();
                    bytes += b.len();
                    batch.push(Outgoing::Frame(b));
                }
            }
            // A state whose handle dropped while its ACK waited goes now.
            self.maybe_remove(id);
        }
        // Datagrams get up to a quarter of the batch before stream data (so busy streams cannot
        // starve them) and at most that while streams have data (so datagrams cannot starve
        // streams); they may fill what streams leave over.
        let dgram_share = (bytes + max_bytes / 4).min(max_bytes);
        self.dgrams.take(dgram_share, &mut bytes, batch);
        while bytes < max_bytes {
            let Some(id) = self.ready.pop_front() else {
                break;
            };
            let Some(s) = self.streams.get_mut(&id) else {
                continue;
            };
            match s.send_queue.pop_front() {
                Some(Out::Data(payload)) => {
                    let n = payload.len() as u64;
                    s.on_sent(n);
                    sent_payload += n;
                    bytes += crate::frame::HEADER_LEN + payload.len();
                    batch.push(Outgoing::Data {
                        stream: id,
                        payload,
                    });
                }
                Some(Out::Fin) => {
                    s.fin_sent = true;
                    batch.push(Outgoing::Frame(Frame::Fin { stream: id }.encode()));
                }
                None => {}
            }
            if s.send_queue.is_empty() {
                s.in_ready = false;
                self.maybe_remove(id);
            } else {
                self.ready.push_back(id);
            }
        }
        self.dgrams.take(max_bytes, &mut bytes, batch);
        if sent_payload > 0 {
            self.queued_total = self.queued_total.saturating_sub(sent_payload);
            // Streams held back by our own session queue limit may go on.
            self.wake_session_waiters();
        }
    }

    /// Queues a graceful `GOAWAY` (once) and a `PING` right behind it: the session stays up,
    /// and once that `PING`'s answer is back ([`State::drain_heard`]), every stream the peer
    /// opened before it read the `GOAWAY` has arrived (the transport keeps order).
    pub(crate) fn go_away(&mut self, now: Instant, code: ErrorCode, reason: String) {
        if self.drain_ping.is_some() || self.closed.is_some() {
            return;
        }
        self.push_control(Frame::GoAway { code, reason });
        self.ping_counter += 1;
        self.ping_sent = Some((self.ping_counter, now));
        self.drain_ping = Some(self.ping_counter);
        self.push_control(Frame::Ping(self.ping_counter));
    }

    /// The ping interval elapsed at `now`: `Err` when nothing at all arrived for `dead_after`
    /// (the peer is gone); else a `PING` is queued.
    pub(crate) fn tick(&mut self, now: Instant, dead_after: Duration) -> Result<(), SessionError> {
        if now.saturating_duration_since(self.last_recv) > dead_after {
            return Err(SessionError::Unresponsive(dead_after));
        }
        self.ping_counter += 1;
        self.ping_sent = Some((self.ping_counter, now));
        self.push_control(Frame::Ping(self.ping_counter));
        Ok(())
    }
}

/// Why a stream whose state is gone cannot be used.
pub(crate) fn missing(closed: Option<SessionError>) -> StreamError {
    closed
        .map(StreamError::SessionLost)
        .unwrap_or(StreamError::LocalReset {
            code: ErrorCode::Internal,
            reason: "stream state gone".into(),
        })
}

#[cfg(test)]
mod tests {
    //! The rules, without a runtime: every test drives a `State` with frames and a clock it
    //! sets itself, and reads what it queued for the writer.
    use super::*;
    use crate::frame::{Dest, Frame, Meta};

    fn rules(initiator: bool) -> Rules {
        Rules {
            role: Role::Agent,
            initiator,
            accept_streams: true,
            max_incoming_streams: 4,
            accept_backlog: 2,
            stream_window: 1000,
            session_window: 4000,
            send_queue: 4000,
            peer_stream_window: 1000,
            peer_session_window: 2500,
            max_frame: 16 * 1024,
            max_send: 600,
            datagrams: false,
            resume: false,
            window_max: 0,
            session_growth: 0,
        }
    }

    fn dest() -> Dest {
        Dest::new("db.internal", 5432)
    }

    /// Everything queued for the writer, decoded.
    fn sent(st: &mut State) -> Vec<Frame> {
        let mut batch = Vec::new();
        st.next_batch(usize::MAX, &mut batch);
        batch
            .into_iter()
            .map(|b| Frame::decode(b.into_bytes(), 1 << 20).expect("our own frame decodes"))
            .collect()
    }

    /// After a lazy frame was queued: it woke no writer, the writer learnt that one waits (to
    /// send it after a delay); our `FIN` of `id` then wakes it, and the batch is returned.
    fn lazy_then_fin(st: &mut State, id: u32) -> Vec<Frame> {
        assert!(!st.wake_writer, "a lazy frame alone woke the writer");
        assert!(
            st.wake_lazy,
            "the writer must learn that a lazy frame waits"
        );
        st.finish(id);
        assert!(st.wake_writer);
        sent(st)
    }

    /// The peer's `OPEN` of stream `id`.
    fn open(id: u32) -> Frame {
        Frame::Open {
            stream: id,
            dest: dest(),
            meta: Meta::default(),
        }
    }

    fn data(stream: u32, n: usize) -> Frame {
        Frame::Data {
            stream,
            payload: Bytes::from(vec![7u8; n]),
        }
    }

    #[test]
    fn our_stream_ids_are_odd_when_we_dialled_and_even_otherwise() {
        let t = Instant::now();
        let mut a = State::new(rules(true), t);
        let ids: Vec<u32> = (0..3)
            .map(|_| a.open(dest(), Meta::default()).unwrap())
            .collect();
        assert_eq!(ids, [1, 3, 5]);
        let mut b = State::new(rules(false), t);
        assert_eq!(b.open(dest(), Meta::default()).unwrap(), 2);
        assert_eq!(b.open(dest(), Meta::default()).unwrap(), 4);
    }

    #[test]
    fn stream_ids_run_out_instead_of_wrapping() {
        let mut st = State::new(rules(true), Instant::now());
        st.next_id = u32::MAX - 2;
        assert_eq!(st.open(dest(), Meta::default()).unwrap(), u32::MAX - 2);
        assert_eq!(
            st.open(dest(), Meta::default()),
            Err(StreamError::IdsExhausted)
        );
    }

    #[test]
    fn an_open_with_our_parity_or_a_used_id_ends_the_session() {
        let t = Instant::now();
        let mut st = State::new(rules(true), t); // the peer's ids are even
        let (code, _) = st.on_frame(t, open(3), 10).unwrap_err();
        assert_eq!(code, ErrorCode::Protocol);
        let mut st = State::new(rules(true), t);
        st.on_frame(t, open(4), 10).unwrap();
        assert!(st.on_frame(t, open(4), 10).is_err(), "a reused id");
        assert!(st.on_frame(t, open(2), 10).is_err(), "an id going back");
        st.on_frame(t, open(6), 10).unwrap();
    }

    #[test]
    fn incoming_streams_beyond_the_backlog_and_the_limit_are_refused_not_buffered() {
        let t = Instant::now();
        let mut st = State::new(rules(true), t);
        for id in [2, 4, 6] {
            st.on_frame(t, open(id), 10).unwrap();
        }
        // accept_backlog is 2: the third waits nowhere, it is refused.
        assert_eq!(st.accept_queue.len(), 2);
        assert!(matches!(
            &sent(&mut st)[..],
            [Frame::OpenErr {
                stream: 6,
                code: ErrorCode::Limit,
                ..
            }]
        ));
        // Accepting makes room in the backlog; max_incoming_streams (4) still holds.
        let waker = std::task::Waker::noop();
        st.next_incoming(waker).unwrap();
        st.next_incoming(waker).unwrap();
        for id in [8, 10, 12] {
            st.on_frame(t, open(id), 10).unwrap();
        }
        let out = sent(&mut st);
        assert!(
            matches!(&out[..], [Frame::OpenErr { stream: 12, code: ErrorCode::Limit, reason }] if reason.contains("too many open streams")),
            "{out:?}"
        );
    }

    #[test]
    fn data_beyond_the_session_credit_ends_the_session() {
        let t = Instant::now();
        let mut st = State::new(rules(true), t);
        let id = st.open(dest(), Meta::default()).unwrap();
        // The session window (4000) is larger than the stream's (1000): three streams' worth is
        // fine on the session, the stream resets on its own.
        let (code, reason) = st.on_frame(t, data(id, 4001), 4010).unwrap_err();
        assert_eq!(code, ErrorCode::FlowControl);
        assert!(reason.contains("session credit"), "{reason}");
    }

    #[test]
    fn data_beyond_a_streams_credit_resets_that_stream_only() {
        let t = Instant::now();
        let mut st = State::new(rules(true), t);
        let a = st.open(dest(), Meta::default()).unwrap();
        let b = st.open(dest(), Meta::default()).unwrap();
        sent(&mut st);
        st.on_frame(t, data(a, 1001), 1010).unwrap();
        let out = sent(&mut st);
        assert!(
            out.iter().any(|f| matches!(f, Frame::Rst { stream, code: ErrorCode::FlowControl, .. } if *stream == a)),
            "{out:?}"
        );
        // The other stream carries on.
        st.on_frame(t, data(b, 1000), 1010).unwrap();
        assert!(st.streams[&b].error().is_none());
    }

    /// Window autotuning (`window.rs`): a reader that drains whole windows fast gets a larger
    /// window as extra credit in the same `WINDOW`, never beyond `window_max` nor the session's
    /// growth budget, however fast it reads.
    #[test]
    fn a_fast_reader_grows_its_window_within_the_stream_and_session_caps() {
        let t = Instant::now();
        let ms = |n| t + Duration::from_millis(n);
        let mut r = rules(true);
        (r.window_max, r.session_growth) = (4000, 5000);
        let mut st = State::new(r, t);
        let a = st.open(dest(), Meta::default()).unwrap();
        let b = st.open(dest(), Meta::default()).unwrap();
        sent(&mut st);
        let drain = |st: &mut State, id: u32, n: u32, at| {
            st.on_frame(at, data(id, n as usize), n as usize + 10)
                .unwrap();
            st.consumed(id, n, at);
            sent(st)
                .into_iter()
                .find_map(|f| match f {
                    Frame::Window { stream, credit } if stream == id => Some(credit),
                    _ => None,
                })
                .unwrap_or(0)
        };
        assert_eq!(
            drain(&mut st, a, 1000, ms(0)),
            2000,
            "1000 read + 1000 more"
        );
        assert_eq!(drain(&mut st, a, 2000, ms(1)), 4000, "doubled again");
        assert_eq!(
            drain(&mut st, a, 4000, ms(2)),
            4000,
            "at window_max: no more"
        );
        assert_eq!(st.streams[&a].recv_window, 4000);
        assert_eq!(drain(&mut st, b, 1000, ms(3)), 2000);
        assert_eq!(
            drain(&mut st, b, 2000, ms(4)),
            3000,
            "only 1000 left in the session"
        );
        assert_eq!(st.grown, 5000);
        // A slow reader never grows.
        let mut st = State::new(r, t);
        let c = st.open(dest(), Meta::default()).unwrap();
        sent(&mut st);
        for i in 0..8 {
            drain(&mut st, c, 250, ms(100 + 20 * i));
        }
        assert_eq!(st.streams[&c].recv_window, 1000);
        assert_eq!(st.grown, 0);
    }

    #[test]
    fn session_credit_returns_once_a_quarter_window_arrived() {
        let t = Instant::now();
        let mut st = State::new(rules(true), t);
        let id = st.open(dest(), Meta::default()).unwrap();
        sent(&mut st);
        st.on_frame(t, data(id, 999), 1000).unwrap();
        assert!(sent(&mut st).is_empty(), "below a quarter of 4000");
        st.on_frame(t, data(id, 1), 10).unwrap();
        assert!(matches!(
            &sent(&mut st)[..],
            [Frame::Window {
                stream: 0,
                credit: 1000
            }]
        ));
    }

    #[test]
    fn stream_credit_returns_as_the_application_reads_not_as_data_arrives() {
        let t = Instant::now();
        let mut st = State::new(rules(true), t);
        let id = st.open(dest(), Meta::default()).unwrap();
        sent(&mut st);
        st.on_frame(t, data(id, 300), 310).unwrap();
        assert!(sent(&mut st).is_empty());
        st.consumed(id, 249, Instant::now());
        assert!(sent(&mut st).is_empty(), "below a quarter of 1000");
        st.consumed(id, 1, Instant::now());
        assert!(matches!(
            &sent(&mut st)[..],
            [Frame::Window { stream, credit: 250 }] if *stream == id
        ));
        // After the peer's FIN there is nothing left to grant.
        st.on_frame(t, Frame::Fin { stream: id }, 5).unwrap();
        st.consumed(id, 50, Instant::now());
        assert!(sent(&mut st).is_empty());
    }

    #[test]
    fn sending_stops_at_the_peers_credit_and_resumes_with_window() {
        let t = Instant::now();
        let mut st = State::new(rules(true), t);
        let id = st.open(dest(), Meta::default()).unwrap();
        let big = vec![1u8; 5000];
        // One frame at most (max_send 600), then the stream's credit (1000) runs out.
        assert_eq!(st.send(id, &big), Sent::Queued(600));
        assert_eq!(st.send(id, &big), Sent::Queued(400));
        sent(&mut st); // written: our own queue limit is not what blocks
        assert_eq!(st.send(id, &big), Sent::Blocked { session: false });
        st.on_frame(
            t,
            Frame::Window {
                stream: id,
                credit: 100,
            },
            10,
        )
        .unwrap();
        assert_eq!(st.send(id, &big), Sent::Queued(100));
    }

    #[test]
    fn sending_stops_at_the_session_credit_across_streams() {
        let t = Instant::now();
        let mut st = State::new(rules(true), t);
        let big = vec![1u8; 1000];
        let ids: Vec<u32> = (0..3)
            .map(|_| st.open(dest(), Meta::default()).unwrap())
            .collect();
        let mut total = 0;
        for &id in &ids {
            while let Sent::Queued(n) = st.send(id, &big) {
                total += n;
            }
            sent(&mut st);
        }
        assert_eq!(total, 2500, "the peer's session grant");
        assert_eq!(st.send(ids[2], &big), Sent::Blocked { session: true });
        st.on_frame(
            t,
            Frame::Window {
                stream: 0,
                credit: 500,
            },
            10,
        )
        .unwrap();
        assert_eq!(st.send(ids[2], &big), Sent::Queued(500));
    }

    #[test]
    fn a_peer_that_stops_reading_cannot_make_us_queue_beyond_our_window() {
        let t = Instant::now();
        let mut st = State::new(rules(true), t);
        let id = st.open(dest(), Meta::default()).unwrap();
        // The peer grants a huge window but nothing is written out (the transport is stuck).
        st.on_frame(
            t,
            Frame::Window {
                stream: id,
                credit: 1 << 20,
            },
            10,
        )
        .unwrap();
        let big = vec![1u8; 1 << 20];
        let mut queued = 0;
        while let Sent::Queued(n) = st.send(id, &big) {
            queued += n;
        }
        assert_eq!(
            queued, 1000,
            "our own stream window bounds what waits unsent"
        );
    }

    /// A download filled our whole send queue (it was as large as the session window, 4 MiB)
    /// and a keystroke's echo on another stream waited for room behind it: 14-18 ms median
    /// through the chain. One stream now fills at most half of the queue, so the other finds
    /// room at once and its frame leaves in the next batch.
    #[test]
    fn a_bulk_stream_cannot_fill_the_send_queue_in_front_of_a_keystroke() {
        let t = Instant::now();
        let mut r = rules(true);
        (r.stream_window, r.session_window) = (100_000, 100_000);
        (r.peer_stream_window, r.peer_session_window) = (100_000, 100_000);
        r.send_queue = 4000;
        let mut st = State::new(r, t);
        let bulk = st.open(dest(), Meta::default()).unwrap();
        let keys = st.open(dest(), Meta::default()).unwrap();
        sent(&mut st);
        let big = vec![1u8; 100_000];
        let mut queued = 0;
        while let Sent::Queued(n) = st.send(bulk, &big) {
            queued += n;
        }
        assert_eq!(queued, 2000, "half of the send queue");
        assert_eq!(st.send(bulk, &big), Sent::Blocked { session: false });
        assert_eq!(st.send(keys, b"x"), Sent::Queued(1));
        // The next batch (the writer takes about one frame per ready stream in turn) carries
        // the keystroke after at most one bulk frame.
        let mut batch = Vec::new();
        st.next_batch(1200, &mut batch);
        let frames: Vec<Frame> = batch
            .into_iter()
            .map(|b| Frame::decode(b.into_bytes(), 1 << 20).unwrap())
            .collect();
        assert!(
            frames
                .iter()
                .any(|f| matches!(f, Frame::Data { stream, .. } if *stream == keys)),
            "{frames:?}"
        );
    }

    #[test]
    fn window_overflow_resets_the_stream_and_session_overflow_ends_the_session() {
        let t = Instant::now();
        let mut st = State::new(rules(true), t);
        let id = st.open(dest(), Meta::default()).unwrap();
        sent(&mut st);
        st.on_frame(
            t,
            Frame::Window {
                stream: id,
                credit: u32::MAX,
            },
            10,
        )
        .unwrap();
        assert!(sent(&mut st).iter().any(|f| matches!(
            f,
            Frame::Rst {
                code: ErrorCode::FlowControl,
                ..
            }
        )));
        let mut overflow = Ok(None);
        for _ in 0..300 {
            overflow = st.on_frame(
                t,
                Frame::Window {
                    stream: 0,
                    credit: u32::MAX,
                },
                10,
            );
            if overflow.is_err() {
                break;
            }
        }
        assert_eq!(overflow.unwrap_err().0, ErrorCode::FlowControl);
    }

    #[test]
    fn a_reset_returns_the_session_credit_of_what_it_dropped() {
        let t = Instant::now();
        let mut st = State::new(rules(true), t);
        let id = st.open(dest(), Meta::default()).unwrap();
        assert_eq!(st.send(id, &[1u8; 600]), Sent::Queued(600));
        assert_eq!(st.send_session_credit, 1900);
        st.reset(id, ErrorCode::Cancel, "gone");
        st.maybe_remove(id);
        assert_eq!(
            st.send_session_credit, 2500,
            "never sent, so never returned by the peer"
        );
    }

    #[test]
    fn data_after_fin_resets_the_stream() {
        let t = Instant::now();
        let mut st = State::new(rules(true), t);
        let id = st.open(dest(), Meta::default()).unwrap();
        sent(&mut st);
        st.on_frame(t, Frame::Fin { stream: id }, 5).unwrap();
        st.on_frame(t, data(id, 10), 15).unwrap();
        assert!(sent(&mut st).iter().any(|f| matches!(
            f,
            Frame::Rst {
                code: ErrorCode::Protocol,
                ..
            }
        )));
    }

    #[test]
    fn the_writer_sends_control_first_then_streams_in_turn() {
        let t = Instant::now();
        let mut st = State::new(rules(true), t);
        let a = st.open(dest(), Meta::default()).unwrap();
        let b = st.open(dest(), Meta::default()).unwrap();
        sent(&mut st);
        st.send(a, &[1; 600]);
        st.send(a, &[1; 400]);
        st.send(b, &[2; 10]);
        st.finish(b);
        st.on_frame(t, Frame::Ping(9), 10).unwrap();
        let order: Vec<String> = sent(&mut st)
            .iter()
            .map(|f| match f {
                Frame::Pong(_) => "pong".to_string(),
                Frame::Data { stream, .. } => format!("data{stream}"),
                Frame::Fin { stream } => format!("fin{stream}"),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(order, ["pong", "data1", "data3", "data1", "fin3"]);
    }

    #[test]
    fn a_ping_flood_ends_the_session_but_pings_a_second_apart_do_not() {
        let t = Instant::now();
        let mut st = State::new(rules(true), t);
        for i in 0..200u64 {
            // One ping every 20 ms is 50 a second: allowed.
            st.on_frame(t + Duration::from_millis(20 * i), Frame::Ping(i), 9)
                .unwrap();
        }
        let t2 = t + Duration::from_secs(10);
        let mut result = Ok(None);
        for i in 0..=MAX_PINGS_PER_SECOND as u64 {
            result = st.on_frame(t2, Frame::Ping(i), 9);
        }
        assert_eq!(result.unwrap_err().0, ErrorCode::Protocol);
        // A flood queues one pong, not one per ping.
        assert_eq!(
            sent(&mut st)
                .iter()
                .filter(|f| matches!(f, Frame::Pong(_)))
                .count(),
            1
        );
    }

    #[test]
    fn a_silent_peer_is_declared_dead_after_the_timeout_and_rtt_is_measured() {
        let t = Instant::now();
        let dead_after = Duration::from_secs(40);
        let mut st = State::new(rules(true), t);
        st.tick(t + Duration::from_secs(20), dead_after).unwrap();
        let ping = match &sent(&mut st)[..] {
            [Frame::Ping(v)] => *v,
            other => panic!("{other:?}"),
        };
        st.on_frame(t + Duration::from_millis(20_030), Frame::Pong(ping), 9)
            .unwrap();
        assert_eq!(st.rtt, Some(Duration::from_millis(30)));
        st.tick(t + Duration::from_secs(60), dead_after).unwrap();
        assert_eq!(
            st.tick(t + Duration::from_secs(61), dead_after),
            Err(SessionError::Unresponsive(dead_after))
        );
    }

    #[test]
    fn answers_the_peer_never_reads_are_capped() {
        let t = Instant::now();
        let mut st = State::new(rules(true), t);
        let mut id = 2;
        let result = loop {
            // Every OPEN to a side that refuses streams is answered by an OPEN_ERR nobody reads.
            st.rules.accept_streams = false;
            let r = st.on_frame(t, open(id), 10);
            if r.is_err() {
                break r;
            }
            id += 2;
        };
        assert_eq!(result.unwrap_err().0, ErrorCode::Limit);
        assert!(st.induced_bytes > MAX_INDUCED_CONTROL);
    }

    #[test]
    fn route_lists_arrive_in_parts_and_are_capped() {
        let t = Instant::now();
        let mut st = State::new(rules(true), t);
        assert_eq!(
            st.on_frame(t, Frame::RoutesPart(vec!["a.internal:22".into()]), 9),
            Ok(None)
        );
        let routes = st
            .on_frame(t, Frame::Routes(vec!["b.internal:22".into()]), 9)
            .unwrap()
            .unwrap();
        assert_eq!(routes, ["a.internal:22", "b.internal:22"]);
        let too_long = "x".repeat(crate::frame::MAX_ROUTE_LEN + 1);
        let routes = st
            .on_frame(t, Frame::Routes(vec![too_long, "c:1".into()]), 9)
            .unwrap()
            .unwrap();
        assert_eq!(routes, ["c:1"]);
    }

    #[test]
    fn a_dropped_unanswered_stream_is_refused_and_an_answered_one_reset() {
        let t = Instant::now();
        let mut st = State::new(rules(true), t);
        for id in [2, 4] {
            st.on_frame(t, open(id), 10).unwrap();
        }
        let waker = std::task::Waker::noop();
        let (first, _) = st.next_incoming(waker).unwrap();
        let (second, _) = st.next_incoming(waker).unwrap();
        st.answer(second, None, Meta::default());
        st.drop_handle(first);
        st.drop_handle(second);
        let out = sent(&mut st);
        assert!(
            matches!(
                &out[..],
                [
                    Frame::OpenOk { stream: 4, .. },
                    Frame::OpenErr { stream: 2, .. },
                    Frame::Rst {
                        stream: 4,
                        code: ErrorCode::Cancel,
                        ..
                    }
                ]
            ),
            "{out:?}"
        );
        assert!(st.streams.is_empty());
        assert_eq!(st.incoming_live, 0);
    }

    #[test]
    fn the_ack_of_a_peers_fin_waits_to_ride_with_our_own_fin() {
        // Each close of a resumable stream cost an ACK each way on its own, eight TLS
        // records across the chain that competed with the next connection.
        let t = Instant::now();
        let mut st = State::new(
            Rules {
                resume: true,
                ..rules(true)
            },
            t,
        );
        st.on_frame(t, open(2), 10).unwrap();
        let (id, _) = st.next_incoming(std::task::Waker::noop()).unwrap();
        st.answer(id, None, Meta::default());
        sent(&mut st);
        st.wake_writer = false;
        st.on_frame(t, Frame::Fin { stream: id }, 10).unwrap();
        st.wake_writer = false;

        st.send_ack_lazy(id, 1);
        let out = lazy_then_fin(&mut st, id);
        assert!(
            matches!(
                &out[..],
                [
                    Frame::Ack {
                        stream: 2,
                        offset: 1
                    },
                    Frame::Fin { stream: 2 }
                ]
            ),
            "{out:?}"
        );

        // An ACK that is not lazy wakes the writer at once, as before, also when a lazy one
        // for the same stream waits already (256 KiB arrived after a few small reads).
        st.wake_writer = false;
        st.send_ack_lazy(id, 1);
        st.send_ack(id, 1);
        assert!(st.wake_writer, "the 256 KiB ACK waited for the lazy one");

        // A state whose handle dropped while its ACK waited is removed with that ACK's batch
        // (it stayed for the session's life, and held its slot among the incoming streams).
        st.drop_handle(id);
        assert!(!st.streams.is_empty());
        sent(&mut st);
        assert!(st.streams.is_empty(), "the stream's state leaked");
        assert_eq!(st.incoming_live, 0);
    }

    #[test]
    fn the_answer_to_an_open_that_came_with_data_rides_with_the_reply() {
        // A forward opens with the client's first bytes and does not wait for the answer. Its
        // OPEN_OK went out on its own, a TLS record through the DMZ and the agent just ahead
        // of the reply's, on every new connection's path.
        let t = Instant::now();
        let mut st = State::new(rules(true), t);
        st.on_frame(t, open(2), 10).unwrap();
        st.on_frame(t, data(2, 1), 10).unwrap();
        let (id, _) = st.next_incoming(std::task::Waker::noop()).unwrap();
        st.wake_writer = false;
        st.answer(id, None, Meta::default());
        assert!(st.lazy_waiting());
        let out = lazy_then_fin(&mut st, id);
        assert!(
            matches!(
                &out[..],
                [Frame::OpenOk { stream: 2, .. }, Frame::Fin { stream: 2 }]
            ),
            "{out:?}"
        );
        assert!(
            !st.lazy_waiting(),
            "the writer's timer would fire for nothing"
        );

        // An OPEN without data waits for its answer (SOCKS5, CONNECT): at once, as before.
        st.on_frame(t, open(4), 10).unwrap();
        let (id, _) = st.next_incoming(std::task::Waker::noop()).unwrap();
        st.wake_writer = false;
        st.answer(id, None, Meta::default());
        assert!(st.wake_writer, "a confirmed open's answer waited");
        assert!(matches!(
            &sent(&mut st)[..],
            [Frame::OpenOk { stream: 4, .. }]
        ));

        // While the writer's lazy timer runs, a lazy frame wakes nobody: the timer sends it.
        st.lazy_armed = true;
        st.wake_lazy = false;
        st.on_frame(t, open(6), 10).unwrap();
        st.on_frame(t, data(6, 1), 10).unwrap();
        let (id, _) = st.next_incoming(std::task::Waker::noop()).unwrap();
        st.wake_writer = false;
        st.answer(id, None, Meta::default());
        assert!(!st.wake_writer && !st.wake_lazy && st.lazy_waiting());
    }
}
