//! The gateway's side of the HTTP transport: per-session state and the request handlers.
//!
//! The gateway's HTTP server routes and authenticates (it knows tokens, this module does not)
//! and then calls [`Handle::post`] / [`Handle::get`]. Each session's [`ServerTransport`] is what
//! its tunnel session runs on:
//! - **up**: `POST` bodies are split into messages and pushed, in index order and each exactly
//!   once, into a bounded channel the session's reader drains (a full channel delays the `POST`
//!   answer: that is the agent's backpressure);
//! - **down**: the session's writer appends to a retransmit queue bounded by `down_capacity`
//!   bytes (a full queue makes the writer wait); a `GET` sends from its `ack` on, and
//!   acknowledged messages are dropped.
//!
//! A session with no request for [`super::IDLE_EXPIRY`] expires: its reader sees an error and
//! the tunnel session ends like a dropped WebSocket.

use super::{parse_records, put_record, DownMode, Query};
use crate::transport::{Transport, TransportError, TransportRx, TransportTx};
use bytes::{Bytes, BytesMut};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::{Response, StatusCode};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Notify};

/// The body type of every answer.
pub type Body = BoxBody<Bytes, std::io::Error>;

/// How a session's requests are authenticated after the first one.
#[derive(Clone)]
pub enum RequestAuth {
    /// Every request carries the bearer token of this token id.
    Token(String),
    /// Every request carries a MAC under this key (inner channel).
    Mac([u8; 32]),
    /// Protocol v2: a MAC of each request's head and body length under this key (the body is
    /// sealed records).
    MacHead([u8; 32]),
}

impl std::fmt::Debug for RequestAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RequestAuth::Token(id) => write!(f, "Token({id})"),
            RequestAuth::Mac(_) => f.write_str("Mac(****)"),
            RequestAuth::MacHead(_) => f.write_str("MacHead(****)"),
        }
    }
}

/// Every HTTP session of one gateway.
pub struct Registry {
    sessions: Mutex<HashMap<String, Arc<Handle>>>,
    max: usize,
    /// Sessions not yet confirmed (their token has not been checked), at most `max_pending`.
    pending: AtomicUsize,
    max_pending: usize,
    down_capacity: usize,
}

impl Registry {
    /// At most `max` sessions; each buffers up to `down_capacity` unacknowledged bytes down.
    pub fn new(max: usize, down_capacity: usize) -> Arc<Registry> {
        Registry::with_pending(max, max, down_capacity)
    }

    /// [`Registry::new`], with at most `max_pending` sessions waiting for their token (see
    /// [`Registry::create_pending`]).
    pub fn with_pending(max: usize, max_pending: usize, down_capacity: usize) -> Arc<Registry> {
        Arc::new(Registry {
            sessions: Mutex::new(HashMap::new()),
            max,
            pending: AtomicUsize::new(0),
            max_pending,
            down_capacity,
        })
    }

    /// Sessions waiting for their token now.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Handle>>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A new session whose credential was checked; `None` when the registry is full.
    pub fn create(self: &Arc<Self>, auth: RequestAuth) -> Option<(Arc<Handle>, ServerTransport)> {
        self.create_with(auth, None)
    }

    /// A new session whose credential comes later, inside it (the inner channel's token): it
    /// counts against the pending limit, and unless [`Handle::confirm`] is called within
    /// `confirm_within` it expires, whatever requests keep it busy. Anyone can build an inner
    /// hello from the gateway's public key, so such a session is worth nothing until confirmed.
    pub fn create_pending(
        self: &Arc<Self>,
        auth: RequestAuth,
        confirm_within: Duration,
    ) -> Option<(Arc<Handle>, ServerTransport)> {
        let n = self.pending.fetch_add(1, Ordering::AcqRel);
        if n >= self.max_pending {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        let created = self.create_with(auth, Some(confirm_within));
        if created.is_none() {
            self.pending.fetch_sub(1, Ordering::AcqRel);
        }
        created
    }

    fn create_with(
        self: &Arc<Self>,
        auth: RequestAuth,
        confirm_within: Option<Duration>,
    ) -> Option<(Arc<Handle>, ServerTransport)> {
        let mut raw = [0u8; 16];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut raw);
        let sid = hex::encode(raw);
        let (up_tx, up_rx) = mpsc::channel(64);
        let handle = Arc::new(Handle {
            sid: sid.clone(),
            auth,
            up: tokio::sync::Mutex::new(Up {
                next: 0,
                tx: Some(up_tx),
            }),
            down: Mutex::new(Down {
                base: 0,
                queue: VecDeque::new(),
                bytes: 0,
                generation: 0,
                closed: false,
            }),
            data: Notify::new(),
            space: Notify::new(),
            capacity: self.down_capacity,
            inflight: AtomicUsize::new(0),
            last: AtomicU64::new(0),
            born: Instant::now(),
            expired: Notify::new(),
            confirmed: AtomicBool::new(confirm_within.is_none()),
            registry: Arc::downgrade(self),
        });
        {
            let mut map = self.lock();
            if map.len() >= self.max {
                return None;
            }
            map.insert(sid.clone(), handle.clone());
        }
        // Expiry: no request for IDLE_EXPIRY (and none in progress) ends the session.
        let weak = Arc::downgrade(self);
        let h = handle.clone();
        let confirm_by = confirm_within.map(|d| tokio::time::Instant::now() + d);
        tokio::spawn(async move {
            loop {
                let tick = tokio::time::Instant::now() + Duration::from_secs(5);
                let wake = match confirm_by {
                    Some(by) if !h.is_confirmed() => tick.min(by),
                    _ => tick,
                };
                tokio::time::sleep_until(wake).await;
                let closed = h.lock_down().closed;
                let idle =
                    h.inflight.load(Ordering::Relaxed) == 0 && h.idle_for() > super::IDLE_EXPIRY;
                let unconfirmed = confirm_by
                    .is_some_and(|by| !h.is_confirmed() && tokio::time::Instant::now() >= by);
                if closed || idle || unconfirmed {
                    if !h.confirmed.swap(true, Ordering::AcqRel) {
                        // Never confirmed: it leaves the pending count now.
                        if let Some(r) = weak.upgrade() {
                            r.pending.fetch_sub(1, Ordering::AcqRel);
                        }
                    }
                    if closed {
                        // Leave the last messages (a GOAWAY) a moment to be fetched.
                        tokio::time::sleep(Duration::from_secs(5)).await;
                    }
                    h.up.lock().await.tx = None;
                    h.expired.notify_waiters();
                    h.data.notify_waiters();
                    if let Some(r) = weak.upgrade() {
                        r.lock().remove(&h.sid);
                    }
                    return;
                }
            }
        });
        let transport = ServerTransport {
            handle: handle.clone(),
            rx: up_rx,
        };
        Some((handle, transport))
    }

    pub fn get(&self, sid: &str) -> Option<Arc<Handle>> {
        self.lock().get(sid).cloned()
    }
}

struct Up {
    /// Index of the next upstream message expected.
    next: u64,
    tx: Option<mpsc::Sender<Bytes>>,
}

struct Down {
    /// Index of `queue[0]`.
    base: u64,
    queue: VecDeque<Bytes>,
    bytes: usize,
    /// Bumped by every `GET`: an older response ends (one reader at a time).
    generation: u64,
    closed: bool,
}

/// One HTTP session, shared by its requests and its transport.
pub struct Handle {
    sid: String,
    auth: RequestAuth,
    up: tokio::sync::Mutex<Up>,
    down: Mutex<Down>,
    data: Notify,
    space: Notify,
    capacity: usize,
    inflight: AtomicUsize,
    /// Milliseconds since `born` of the last request's start or end.
    last: AtomicU64,
    born: Instant,
    expired: Notify,
    /// The session's credential was checked (always, for sessions made by
    /// [`Registry::create`]).
    confirmed: AtomicBool,
    registry: std::sync::Weak<Registry>,
}

/// Counts a request in progress (a session is not idle while one runs).
struct Inflight(Arc<Handle>);

impl Inflight {
    fn new(h: &Arc<Handle>) -> Inflight {
        h.inflight.fetch_add(1, Ordering::Relaxed);
        h.touch();
        Inflight(h.clone())
    }
}

impl Drop for Inflight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A short `text/plain` answer, `sallyport: <msg>` (refusals, here and in the gateway).
pub fn text(status: StatusCode, msg: &str) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(format!("sallyport: {msg}\n")))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        "content-type",
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

impl Handle {
    pub fn sid(&self) -> &str {
        &self.sid
    }

    /// The credential checked inside the session: it leaves the pending count and no longer
    /// expires for want of it.
    pub fn confirm(&self) {
        if !self.confirmed.swap(true, Ordering::AcqRel) {
            if let Some(r) = self.registry.upgrade() {
                r.pending.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }

    pub fn is_confirmed(&self) -> bool {
        self.confirmed.load(Ordering::Acquire)
    }

    pub fn auth(&self) -> &RequestAuth {
        &self.auth
    }

    fn lock_down(&self) -> std::sync::MutexGuard<'_, Down> {
        self.down.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn touch(&self) {
        self.last
            .store(self.born.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        self.born
            .elapsed()
            .saturating_sub(Duration::from_millis(self.last.load(Ordering::Relaxed)))
    }

    /// Drops downstream messages below `ack`; `false` if `ack` is beyond what was sent.
    fn ack(&self, ack: u64) -> bool {
        let mut d = self.lock_down();
        let end = d.base + d.queue.len() as u64;
        if ack > end {
            return false;
        }
        let mut freed = false;
        while d.base < ack {
            if let Some(m) = d.queue.pop_front() {
                d.bytes -= m.len();
                freed = true;
            }
            d.base += 1;
        }
        drop(d);
        if freed {
            self.space.notify_waiters();
        }
        true
    }

    /// An upstream batch. Messages below the session's next index were delivered before (a
    /// retried request) and are skipped; a batch that starts beyond it is refused (409).
    pub async fn post(self: &Arc<Self>, q: Query, body: Bytes) -> Response<Body> {
        let _busy = Inflight::new(self);
        if !self.ack(q.ack) {
            return text(StatusCode::CONFLICT, "ack beyond what was sent");
        }
        crate::splice::note_arrival(body.len());
        let msgs = match parse_records(body) {
            Ok(m) => m,
            Err(e) => return text(StatusCode::BAD_REQUEST, &e.to_string()),
        };
        let mut up = self.up.lock().await;
        if q.seq > up.next {
            return text(
                StatusCode::CONFLICT,
                &format!("batch starts at {} but {} is next", q.seq, up.next),
            );
        }
        let skip = (up.next - q.seq) as usize;
        for m in msgs.into_iter().skip(skip) {
            let Some(tx) = up.tx.clone() else {
                return text(StatusCode::NOT_FOUND, "session ended");
            };
            if !m.is_empty() && tx.send(m).await.is_err() {
                return text(StatusCode::NOT_FOUND, "session ended");
            }
            up.next += 1;
        }
        let mut r = Response::new(Full::new(Bytes::new()).map_err(|n| match n {}).boxed());
        r.headers_mut().insert(
            "cache-control",
            hyper::header::HeaderValue::from_static("no-store"),
        );
        r
    }

    /// Messages from `q.ack` on: streamed, or long-polled.
    pub async fn get(self: &Arc<Self>, q: Query) -> Response<Body> {
        let busy = Inflight::new(self);
        if !self.ack(q.ack) {
            return text(StatusCode::CONFLICT, "ack beyond what was sent");
        }
        let generation = {
            let mut d = self.lock_down();
            d.generation += 1;
            d.generation
        };
        // Wake an older reader so it ends.
        self.data.notify_waiters();
        let mode = if q.poll {
            DownMode::Poll
        } else {
            DownMode::Stream
        };
        let headers = |r: &mut Response<Body>| {
            use hyper::header::HeaderValue;
            let h = r.headers_mut();
            h.insert(
                "content-type",
                HeaderValue::from_static("application/octet-stream"),
            );
            h.insert("cache-control", HeaderValue::from_static("no-store"));
            // nginx: do not buffer this response.
            h.insert("x-accel-buffering", HeaderValue::from_static("no"));
        };
        match mode {
            DownMode::Poll => {
                let deadline = tokio::time::Instant::now() + super::POLL_WAIT;
                let mut pos = q.ack;
                let mut out = BytesMut::new();
                loop {
                    let notified = self.data.notified();
                    tokio::pin!(notified);
                    notified.as_mut().enable();
                    match self.next_batch(generation, &mut pos, super::MAX_BATCH, &mut out) {
                        Next::Data if !out.is_empty() => break,
                        Next::Data | Next::Wait => {}
                        Next::End => break,
                    }
                    if !wait_until(notified, deadline).await {
                        break;
                    }
                }
                drop(busy);
                let mut r = Response::new(Full::new(out.freeze()).map_err(|n| match n {}).boxed());
                headers(&mut r);
                r
            }
            DownMode::Stream => {
                let h = self.clone();
                let started = tokio::time::Instant::now();
                let state = (h, q.ack, true, busy);
                let stream = futures_util::stream::unfold(
                    state,
                    move |(h, mut pos, first, busy)| async move {
                        let mut out = BytesMut::new();
                        if first {
                            // At once: a proxy that passes it shows it does not buffer.
                            put_record(&mut out, &[]);
                            return Some((Ok(Frame::data(out.freeze())), (h, pos, false, busy)));
                        }
                        let end = started + super::STREAM_FOR;
                        let hh = h.clone();
                        loop {
                            let notified = hh.data.notified();
                            tokio::pin!(notified);
                            notified.as_mut().enable();
                            match h.next_batch(generation, &mut pos, 256 * 1024, &mut out) {
                                Next::Data if !out.is_empty() => {
                                    return Some((
                                        Ok(Frame::data(out.freeze())),
                                        (h, pos, false, busy),
                                    ))
                                }
                                Next::End => return None,
                                Next::Data | Next::Wait => {}
                            }
                            let now = tokio::time::Instant::now();
                            if now >= end {
                                return None;
                            }
                            let keepalive = now + super::KEEPALIVE_EVERY;
                            if !wait_until(notified, keepalive.min(end)).await {
                                if tokio::time::Instant::now() >= end {
                                    return None;
                                }
                                put_record(&mut out, &[]);
                                return Some((
                                    Ok(Frame::data(out.freeze())),
                                    (h, pos, false, busy),
                                ));
                            }
                        }
                    },
                );
                let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
                headers(&mut r);
                r
            }
        }
    }

    /// Moves messages from `*pos` into `out` (up to `limit` bytes).
    fn next_batch(&self, generation: u64, pos: &mut u64, limit: usize, out: &mut BytesMut) -> Next {
        let d = self.lock_down();
        if d.generation != generation || *pos < d.base {
            return Next::End;
        }
        let end = d.base + d.queue.len() as u64;
        if *pos >= end {
            return if d.closed { Next::End } else { Next::Wait };
        }
        while *pos < end && out.len() < limit {
            let m = &d.queue[(*pos - d.base) as usize];
            put_record(out, m);
            *pos += 1;
        }
        Next::Data
    }

    /// Ends the session from the agent's side (`DELETE`).
    pub async fn delete(&self) -> Response<Body> {
        self.up.lock().await.tx = None;
        self.lock_down().closed = true;
        self.data.notify_waiters();
        text(StatusCode::OK, "session ended")
    }
}

/// Waits for `notified` (registered before the caller looked at the queue, so nothing pushed
/// in between is missed) until `deadline`; `false` on timeout.
async fn wait_until(
    notified: std::pin::Pin<&mut tokio::sync::futures::Notified<'_>>,
    deadline: tokio::time::Instant,
) -> bool {
    tokio::select! {
        _ = notified => true,
        _ = tokio::time::sleep_until(deadline) => false,
    }
}

enum Next {
    Data,
    Wait,
    End,
}

/// The tunnel session's transport on the gateway side.
pub struct ServerTransport {
    handle: Arc<Handle>,
    rx: mpsc::Receiver<Bytes>,
}

pub struct ServerTx(Arc<Handle>);
pub struct ServerRx {
    rx: mpsc::Receiver<Bytes>,
    handle: Arc<Handle>,
}

impl TransportTx for ServerTx {
    async fn send(&mut self, msg: Bytes) -> Result<(), TransportError> {
        let h = &self.0;
        loop {
            let space = h.space.notified();
            tokio::pin!(space);
            space.as_mut().enable();
            let expired = h.expired.notified();
            tokio::pin!(expired);
            expired.as_mut().enable();
            {
                let mut d = h.lock_down();
                if d.closed {
                    return Err(TransportError::Closed);
                }
                if d.bytes == 0 || d.bytes + msg.len() <= h.capacity {
                    d.bytes += msg.len();
                    d.queue.push_back(msg);
                    drop(d);
                    h.data.notify_waiters();
                    return Ok(());
                }
            }
            tokio::select! {
                _ = space => {}
                _ = expired => return Err(TransportError::Io("the agent's HTTP requests stopped".into())),
            }
        }
    }
    async fn flush(&mut self) -> Result<(), TransportError> {
        Ok(())
    }
    async fn close(&mut self) {
        self.0.lock_down().closed = true;
        self.0.data.notify_waiters();
    }
}

impl Drop for ServerTx {
    fn drop(&mut self) {
        self.0.lock_down().closed = true;
        self.0.data.notify_waiters();
    }
}

impl TransportRx for ServerRx {
    async fn recv(&mut self) -> Result<Option<Bytes>, TransportError> {
        match self.rx.recv().await {
            Some(m) => Ok(Some(m)),
            None if self.handle.lock_down().closed => Ok(None),
            None => Err(TransportError::Io(format!(
                "no request from the agent for {:?}: HTTP session expired",
                super::IDLE_EXPIRY
            ))),
        }
    }
}

impl Transport for ServerTransport {
    type Tx = ServerTx;
    type Rx = ServerRx;
    fn split(self) -> (ServerTx, ServerRx) {
        (
            ServerTx(self.handle.clone()),
            ServerRx {
                rx: self.rx,
                handle: self.handle,
            },
        )
    }
}
