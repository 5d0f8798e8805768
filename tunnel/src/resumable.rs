//! A resumable stream end as an `AsyncRead`/`AsyncWrite` handle: the agent's app connection and
//! the connector's service connection are spliced to a [`Resumable`], which outlives the
//! sessions (attachments) that carry it.
//!
//! The rules (offsets, retained bytes, attachment numbers) are [`crate::resume::End`]; this file
//! drives them over tunnel [`Stream`]s: it sends what is unsent, reads and acknowledges, and
//! when its attachment is lost to a dropped session (or the DMZ says `RST(suspended)`), it
//! **suspends** instead of failing. The opener (agent) then asks for a new attachment through a
//! [`Reopen`]; the holder (connector) waits for one to be delivered ([`ResumeRequest`]). Past the
//! grace period the stream fails as a plain one would. docs/protocol.md, "Streams that survive
//! their session", has the protocol.

use crate::frame::{ErrorCode, Meta};
use crate::resume::End;
use crate::session::{SessionError, StreamError};
use crate::splice::Chunks;
use crate::stream::Stream;
use bytes::Bytes;
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll, Waker};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// Metadata keys of resumable streams (`OPEN` and `OPEN_OK`).
pub mod keys {
    /// In the agent's `OPEN`: `new`, or the ticket of the stream to resume. From the DMZ to the
    /// connector: `new`, or the stream key.
    pub const RESUME: &str = "sp-resume";
    /// The attachment number of a resume.
    pub const ATTACH: &str = "sp-resume-attach";
    /// The sender's received offset (in a resume `OPEN` and its `OPEN_OK`).
    pub const RECV: &str = "sp-resume-recv";
    /// In the connector's `OPEN_OK` of a new resumable stream: the stream key.
    pub const KEY: &str = "sp-resume-key";
    /// Every key above starts with this; the DMZ removes them all from an agent's `OPEN`.
    pub const PREFIX: &str = "sp-resume";
}

/// A resume ticket: `<stream key>.<resume id>@<connector token id>` (32 hex digits each, then
/// the connector's credential). The DMZ writes it into a new stream's `OPEN_OK` and routes a
/// resume by it; the agent keeps it as opaque text.
#[derive(Clone, PartialEq, Eq)]
pub struct Ticket {
    pub key: String,
    pub resume_id: String,
    pub connector: String,
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key names a live stream: not for logs.
        f.debug_struct("Ticket")
            .field("connector", &self.connector)
            .finish_non_exhaustive()
    }
}

impl Ticket {
    /// Strict: exact lengths, hex only, a token id of 1–256 bytes without `@`.
    pub fn parse(text: &str) -> Option<Ticket> {
        let (ids, connector) = text.split_once('@')?;
        let (key, resume_id) = ids.split_once('.')?;
        if !is_hex32(key)
            || !is_hex32(resume_id)
            || connector.is_empty()
            || connector.len() > 256
            || connector.contains('@')
        {
            return None;
        }
        Some(Ticket {
            key: key.to_string(),
            resume_id: resume_id.to_string(),
            connector: connector.to_string(),
        })
    }

    pub fn text(&self) -> String {
        format!("{}.{}@{}", self.key, self.resume_id, self.connector)
    }
}

/// 32 hex digits (a stream key or a resume id).
pub fn is_hex32(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Retained bytes per stream at least (see [`buffer_for`]).
pub const DEFAULT_BUFFER: usize = 2 * 1024 * 1024;

/// How long a suspended stream waits to be resumed by default.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(60);

/// We acknowledge at once once this much arrived unacknowledged; below it (and for the peer's
/// `FIN`) lazily: with whatever the session sends next (an interactive stream's reply, our own
/// `FIN`), or alone when the writer's lazy timer ends, at most
/// [`crate::session::LAZY_DELAY`] later.
const ACK_EVERY: u64 = 256 * 1024;

/// The most a stream retains, for a session whose windows grow up to `window_max`
/// (`window.rs`): room for both hops' windows in flight between the ends plus a frame, so
/// throughput never waits for an `ACK`. A cap, not an allocation: only bytes sent and not yet
/// acknowledged are held, and the connector's budget bounds them all.
pub fn buffer_for(window_max: u32, max_frame: u32) -> usize {
    DEFAULT_BUFFER.max(2 * window_max as usize + 256 * 1024 + max_frame as usize)
}

// --- counters (for `sallyport status`, the status page and the connector's metrics) ---------

static LIVE: AtomicI64 = AtomicI64::new(0);
static SUSPENDED: AtomicI64 = AtomicI64::new(0);
static RESUMED: AtomicU64 = AtomicU64::new(0);
static EXPIRED: AtomicU64 = AtomicU64::new(0);
static RETAINED: AtomicI64 = AtomicI64::new(0);

/// Resumable streams of this process.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Resumable streams alive now (attached or suspended).
    pub live: u64,
    /// Suspended now, waiting to be resumed.
    pub suspended: u64,
    /// Resumes completed since start.
    pub resumed: u64,
    /// Streams reset because the grace passed (or the far end no longer had them).
    pub expired: u64,
    /// Bytes retained for the peers now.
    pub retained: u64,
}

pub fn stats() -> Stats {
    let g = |a: &AtomicI64| a.load(Ordering::Relaxed).max(0) as u64;
    // The counts first: a resume leaves `SUSPENDED` before it counts in `RESUMED`, so one
    // reading never shows it in both.
    let resumed = RESUMED.load(Ordering::Relaxed);
    let expired = EXPIRED.load(Ordering::Relaxed);
    Stats {
        live: g(&LIVE),
        suspended: g(&SUSPENDED),
        resumed,
        expired,
        retained: g(&RETAINED),
    }
}

// --- the memory budget ------------------------------------------------------------------------

/// Bytes that resumable streams may retain, in all and per key (the connector keys by agent
/// token). When it is full, writers wait: a stream is slowed, never reset.
pub struct Budget {
    total: usize,
    per_key: usize,
    state: Mutex<BudgetState>,
}

#[derive(Default)]
struct BudgetState {
    used: usize,
    by_key: HashMap<String, usize>,
    waiters: Vec<Waker>,
}

impl Budget {
    pub fn new(total: usize, per_key: usize) -> Arc<Budget> {
        Arc::new(Budget {
            total: total.max(1),
            per_key: per_key.max(1),
            state: Mutex::new(BudgetState::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BudgetState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Grants up to `want` bytes to `key` (at least one), or waits.
    fn poll_grant(&self, cx: &mut Context<'_>, key: &str, want: usize) -> Poll<usize> {
        let mut st = self.lock();
        let mine = st.by_key.get(key).copied().unwrap_or(0);
        let room = self
            .total
            .saturating_sub(st.used)
            .min(self.per_key.saturating_sub(mine));
        if room == 0 {
            if !st.waiters.iter().any(|w| w.will_wake(cx.waker())) {
                st.waiters.push(cx.waker().clone());
            }
            return Poll::Pending;
        }
        let n = room.min(want);
        st.used += n;
        *st.by_key.entry(key.to_string()).or_insert(0) += n;
        Poll::Ready(n)
    }

    fn release(&self, key: &str, n: usize) {
        if n == 0 {
            return;
        }
        let waiters = {
            let mut st = self.lock();
            st.used = st.used.saturating_sub(n);
            if let Some(v) = st.by_key.get_mut(key) {
                *v = v.saturating_sub(n);
                if *v == 0 {
                    st.by_key.remove(key);
                }
            }
            std::mem::take(&mut st.waiters)
        };
        for w in waiters {
            w.wake();
        }
    }

    /// Bytes granted now, in all.
    pub fn used(&self) -> usize {
        self.lock().used
    }

    /// Whether at least a quarter of the budget is free (new streams are opened resumable
    /// only then).
    pub fn has_room(&self) -> bool {
        self.used() < self.total / 4 * 3
    }
}

/// A budget and the key this stream counts under.
pub struct Charge {
    pub budget: Arc<Budget>,
    pub key: String,
}

// --- reattaching ------------------------------------------------------------------------------

/// A new attachment the opener obtained: the stream (answered `OPEN_OK`) and the offset the
/// holder said it has.
pub struct Reattached {
    pub stream: Stream,
    pub peer_recv: u64,
}

/// Why an attempt to resume failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ReopenError {
    /// Worth another attempt (no session yet, the connector not reconnected yet, a limit).
    #[error("{0}")]
    Retry(String),
    /// The stream cannot be resumed (the far end no longer has it, or refuses).
    #[error("{0}")]
    Gone(String),
}

/// The future of one resume attempt.
pub type ReopenFuture = Pin<Box<dyn Future<Output = Result<Reattached, ReopenError>> + Send>>;

/// How the opener asks for a new attachment: `OPEN` with the ticket, attachment number and
/// our received offset, on whatever session is up now.
pub trait Reopen: Send + Sync + 'static {
    fn reopen(&self, ticket: &str, attach: u32, recv: u64) -> ReopenFuture;
}

/// A resume the connector's accept loop delivers to the stream it names.
pub struct ResumeRequest {
    /// The incoming stream, not yet answered.
    pub stream: Stream,
    pub attach: u32,
    pub peer_recv: u64,
}

/// Where a holder's resumes arrive: one slot, a waker. (A tokio `mpsc` channel allocated its
/// first block of 32 slots for every resumable stream, about 1.3 KiB each in a connector that
/// holds thousands of idle streams.)
pub fn requests() -> (RequestTx, RequestRx) {
    let slot = Arc::new(Mutex::new(Slot::default()));
    (RequestTx(slot.clone()), RequestRx(slot))
}

#[derive(Default)]
struct Slot {
    request: Option<ResumeRequest>,
    waker: Option<Waker>,
    closed: bool,
}

/// Why [`RequestTx::try_send`] did not deliver; the request comes back.
pub enum SendError {
    /// A resume of this stream waits already.
    Full(ResumeRequest),
    /// The stream is gone.
    Closed(ResumeRequest),
}

/// The table's side of [`requests`].
#[derive(Clone)]
pub struct RequestTx(Arc<Mutex<Slot>>);

/// The held stream's side of [`requests`].
pub struct RequestRx(Arc<Mutex<Slot>>);

fn slot(m: &Mutex<Slot>) -> std::sync::MutexGuard<'_, Slot> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl RequestTx {
    pub fn try_send(&self, req: ResumeRequest) -> Result<(), SendError> {
        let mut s = slot(&self.0);
        if s.closed {
            return Err(SendError::Closed(req));
        }
        if s.request.is_some() {
            return Err(SendError::Full(req));
        }
        s.request = Some(req);
        if let Some(w) = s.waker.take() {
            w.wake();
        }
        Ok(())
    }
}

impl RequestRx {
    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<ResumeRequest>> {
        let mut s = slot(&self.0);
        match s.request.take() {
            Some(r) => Poll::Ready(Some(r)),
            None => {
                if !s.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    s.waker = Some(cx.waker().clone());
                }
                Poll::Pending
            }
        }
    }
}

impl Drop for RequestRx {
    fn drop(&mut self) {
        let mut s = slot(&self.0);
        s.closed = true;
        s.request = None;
    }
}

/// Settings of one resumable end.
pub struct Settings {
    /// Most bytes retained ([`buffer_for`]).
    pub buffer: usize,
    /// How long a suspended stream waits ([`DEFAULT_GRACE`]).
    pub grace: Duration,
    pub charge: Option<Charge>,
}

enum Side {
    Opener {
        reopen: Box<dyn Reopen>,
        /// Known once the far end agreed (`OPEN_OK` with a ticket).
        ticket: Option<String>,
        attempt: Option<ReopenFuture>,
        retry_at: Option<Pin<Box<Sleep>>>,
    },
    Holder {
        requests: RequestRx,
    },
}

enum Link {
    Up(Stream),
    Suspended,
    Failed(StreamError),
}

/// One end of a resumable stream (see the module docs).
pub struct Resumable {
    end: End,
    link: Link,
    side: Side,
    grace: Duration,
    /// While suspended: when the grace ends.
    deadline: Option<Pin<Box<Sleep>>>,
    charge: Option<Charge>,
    /// Bytes charged to the budget (what `end` retains).
    charged: usize,
}

impl std::fmt::Debug for Resumable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // No ticket here: it names the stream to whoever holds the token.
        f.debug_struct("Resumable")
            .field("attach", &self.end.attach())
            .field("retained", &self.end.retained())
            .finish()
    }
}

/// Whether losing an attachment this way leaves the stream resumable: the path broke (the
/// session dropped, timed out, was drained, or the DMZ says the far side's did). A reset by the
/// far end, a refusal, or a session ended for a revoked token or a broken peer is final.
pub fn suspends(e: &StreamError) -> bool {
    match e {
        StreamError::Reset {
            code: ErrorCode::Suspended,
            ..
        } => true,
        StreamError::SessionLost(s) => match s {
            // The peer's GOAWAY, or ours: a drain or a dead path suspends; a revoked token, a
            // broken peer or another version ends the stream.
            SessionError::GoAway { code, .. } | SessionError::Closed { code, .. } => {
                matches!(
                    code,
                    ErrorCode::Shutdown
                        | ErrorCode::TimedOut
                        | ErrorCode::Suspended
                        | ErrorCode::SessionLost
                )
            }
            SessionError::Transport(_)
            | SessionError::PeerClosed
            | SessionError::Unresponsive(_)
            | SessionError::Local(_) => true,
            _ => false,
        },
        _ => false,
    }
}

impl Resumable {
    /// The agent's end of a stream it just opened with `sp-resume: new` (the far end's
    /// `OPEN_OK` says whether it agreed; until then everything written is retained).
    pub fn opener(stream: Stream, reopen: Box<dyn Reopen>, settings: Settings) -> Resumable {
        Resumable::new(
            stream,
            Side::Opener {
                reopen,
                ticket: None,
                attempt: None,
                retry_at: None,
            },
            settings,
        )
    }

    /// The connector's end of a stream it accepted as resumable; resumes arrive on `requests`.
    pub fn holder(stream: Stream, requests: RequestRx, settings: Settings) -> Resumable {
        Resumable::new(stream, Side::Holder { requests }, settings)
    }

    fn new(stream: Stream, side: Side, settings: Settings) -> Resumable {
        LIVE.fetch_add(1, Ordering::Relaxed);
        Resumable {
            end: End::new(settings.buffer),
            link: Link::Up(stream),
            side,
            grace: settings.grace,
            deadline: None,
            charge: settings.charge,
            charged: 0,
        }
    }

    /// Data bytes received from the far end and written by our app (the `FIN` is not a byte).
    pub fn byte_counts(&self) -> (u64, u64) {
        (self.end.received(), self.end.written())
    }

    /// The current attachment's stream (for a reset by the caller), if attached.
    pub fn stream(&self) -> Option<&Stream> {
        match &self.link {
            Link::Up(s) => Some(s),
            _ => None,
        }
    }

    /// Resets the stream for good (the service or app connection failed).
    pub fn reset(&mut self, code: ErrorCode, reason: &str) {
        if let Link::Up(s) = &self.link {
            s.reset(code, reason);
        }
        self.fail(StreamError::LocalReset {
            code,
            reason: reason.to_string(),
        });
    }

    fn resumable(&self) -> bool {
        match &self.side {
            Side::Opener { ticket, .. } => ticket.is_some(),
            Side::Holder { .. } => true,
        }
    }

    fn sync_charge(&mut self) {
        let now = self.end.retained();
        if now < self.charged {
            let freed = self.charged - now;
            if let Some(c) = &self.charge {
                c.budget.release(&c.key, freed);
            }
            RETAINED.fetch_sub(freed as i64, Ordering::Relaxed);
            self.charged = now;
        }
    }

    fn fail(&mut self, e: StreamError) {
        if matches!(self.link, Link::Suspended) {
            SUSPENDED.fetch_sub(1, Ordering::Relaxed);
        }
        self.link = Link::Failed(e);
        self.deadline = None;
    }

    fn suspend(&mut self, why: &StreamError) {
        tracing::debug!(error = %why, attach = self.end.attach(), "stream suspended");
        if !matches!(self.link, Link::Suspended) {
            SUSPENDED.fetch_add(1, Ordering::Relaxed);
        }
        self.link = Link::Suspended;
        self.deadline = Some(Box::pin(tokio::time::sleep(self.grace)));
        if let Side::Opener {
            attempt, retry_at, ..
        } = &mut self.side
        {
            *attempt = None;
            *retry_at = None;
        }
    }

    fn attached(&mut self, stream: Stream) {
        if matches!(self.link, Link::Suspended) {
            SUSPENDED.fetch_sub(1, Ordering::Relaxed);
        }
        RESUMED.fetch_add(1, Ordering::Relaxed);
        if let Link::Up(old) = std::mem::replace(&mut self.link, Link::Up(stream)) {
            old.reset(ErrorCode::Cancel, "superseded by a newer attachment");
        }
        self.deadline = None;
        self.sync_charge();
    }

    /// A resume the connector's accept loop delivered (holder side).
    fn take_request(&mut self, req: ResumeRequest) {
        // An attempt its agent reset before it got here (the app gave up) is nothing to attach:
        // taken, it would supersede the current attachment and move the offsets for nobody.
        if req.stream.has_failed() {
            return;
        }
        if matches!(self.link, Link::Failed(_)) {
            req.stream.reject(ErrorCode::SessionLost, "stream is gone");
            return;
        }
        if let Err(b) = self.end.accept_attach(req.attach) {
            req.stream.reject(ErrorCode::NotAllowed, &b.0);
            return;
        }
        if let Err(b) = self.end.resume(req.peer_recv) {
            req.stream.reject(ErrorCode::Protocol, &b.0);
            self.fail(StreamError::LocalReset {
                code: ErrorCode::Protocol,
                reason: b.0,
            });
            return;
        }
        let mut m = Meta::default();
        m.set(keys::RECV, self.end.acked_now().to_string());
        req.stream.accept_with(m);
        tracing::debug!(attach = req.attach, "stream resumed");
        self.attached(req.stream);
    }

    /// Keeps the link up: takes resumes (holder), learns the far end's answer (opener), takes
    /// acknowledgements, notices a lost attachment, drives resume attempts, and hands unsent
    /// bytes to the attachment. Ready when attached; pending while suspended.
    fn poll_link(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), StreamError>> {
        loop {
            while let Side::Holder { requests } = &mut self.side {
                let Poll::Ready(Some(req)) = requests.poll_recv(cx) else {
                    break;
                };
                self.take_request(req);
            }
            match &mut self.link {
                Link::Failed(e) => return Poll::Ready(Err(e.clone())),
                Link::Up(stream) => {
                    let learning = matches!(&self.side, Side::Opener { ticket: None, .. })
                        && !self.end.is_plain();
                    {
                        if learning {
                            match stream.poll_opened(cx) {
                                Poll::Ready(Ok(())) => {
                                    let m = stream.open_meta();
                                    match m.get(keys::RESUME) {
                                        Some(t) if !t.is_empty() && t != "new" => {
                                            let t = t.to_string();
                                            if let Side::Opener { ticket, .. } = &mut self.side {
                                                *ticket = Some(t);
                                            }
                                        }
                                        _ => self.end.set_plain(),
                                    }
                                    self.sync_charge();
                                }
                                Poll::Ready(Err(e)) => {
                                    self.fail(e);
                                    continue;
                                }
                                Poll::Pending => {}
                            }
                        }
                    }
                    let Link::Up(stream) = &mut self.link else {
                        continue;
                    };
                    let mut broken = None;
                    while let Poll::Ready(Some(v)) = stream.poll_ack(cx) {
                        if let Err(b) = self.end.on_ack(v) {
                            broken = Some(b);
                            break;
                        }
                    }
                    if let Some(b) = broken {
                        stream.reset(ErrorCode::Protocol, &b.0);
                        self.fail(StreamError::LocalReset {
                            code: ErrorCode::Protocol,
                            reason: b.0,
                        });
                        continue;
                    }
                    self.sync_charge();
                    let Link::Up(stream) = &mut self.link else {
                        continue;
                    };
                    if let Poll::Ready(e) = stream.poll_failed(cx) {
                        self.lost(e);
                        continue;
                    }
                    // Hand over what is unsent (at the peer's credit; the rest waits here).
                    let mut lost = None;
                    while let Some(mut chunk) = self.end.unsent() {
                        match stream.poll_send_bytes(cx, &mut chunk) {
                            Poll::Ready(Ok(n)) => self.end.on_sent(n),
                            Poll::Ready(Err(e)) => {
                                lost = Some(e);
                                break;
                            }
                            Poll::Pending => break,
                        }
                    }
                    if let Some(e) = lost {
                        self.lost(e);
                        continue;
                    }
                    if self.end.fin_due() {
                        stream.finish();
                        self.end.on_fin_sent();
                    }
                    self.sync_charge();
                    return Poll::Ready(Ok(()));
                }
                Link::Suspended => {
                    if let Some(d) = &mut self.deadline {
                        if d.as_mut().poll(cx).is_ready() {
                            EXPIRED.fetch_add(1, Ordering::Relaxed);
                            let grace = self.grace;
                            self.fail(StreamError::LocalReset {
                                code: ErrorCode::SessionLost,
                                reason: format!("the stream could not be resumed within {grace:?}"),
                            });
                            continue;
                        }
                    }
                    let Side::Opener {
                        reopen,
                        ticket: Some(ticket),
                        attempt,
                        retry_at,
                    } = &mut self.side
                    else {
                        return Poll::Pending; // the holder waits for a request
                    };
                    if let Some(t) = retry_at {
                        ready!(t.as_mut().poll(cx));
                        *retry_at = None;
                    }
                    if attempt.is_none() {
                        let n = self.end.next_attach();
                        *attempt = Some(reopen.reopen(ticket, n, self.end.ack_value()));
                    }
                    let fut = attempt.as_mut().expect("set above");
                    let result = ready!(fut.as_mut().poll(cx));
                    *attempt = None;
                    match result {
                        Ok(r) => {
                            if let Err(b) = self.end.resume(r.peer_recv) {
                                r.stream.reset(ErrorCode::Protocol, &b.0);
                                self.fail(StreamError::LocalReset {
                                    code: ErrorCode::Protocol,
                                    reason: b.0,
                                });
                                continue;
                            }
                            self.end.acked_now();
                            self.attached(r.stream);
                        }
                        Err(ReopenError::Retry(why)) => {
                            tracing::debug!(reason = %why, "resume attempt failed; retrying");
                            let jitter = rand::random::<u64>() % 500;
                            *retry_at = Some(Box::pin(tokio::time::sleep(Duration::from_millis(
                                750 + jitter,
                            ))));
                        }
                        Err(ReopenError::Gone(why)) => {
                            EXPIRED.fetch_add(1, Ordering::Relaxed);
                            self.fail(StreamError::Reset {
                                code: ErrorCode::SessionLost,
                                reason: format!("the stream could not be resumed: {why}"),
                            });
                        }
                    }
                }
            }
        }
    }

    /// The attachment failed with `e`: suspend when the path broke and the stream is
    /// resumable, else fail.
    fn lost(&mut self, e: StreamError) {
        if self.resumable() && !self.end.done() && suspends(&e) {
            self.suspend(&e);
        } else {
            self.fail(e);
        }
    }

    fn send_ack(&mut self) {
        if let Link::Up(s) = &self.link {
            if self.resumable() {
                s.send_ack(self.end.acked_now());
            }
        }
    }

    /// Acknowledges everything received so far, lazily: the `ACK` rides with the next frames
    /// the session sends (the reply to a keystroke, our own `FIN` after the peer's), saving a
    /// message each way, and goes alone after a short delay otherwise. What counts towards
    /// [`ACK_EVERY`] is not reset by it.
    fn send_ack_lazy(&mut self) {
        if let Link::Up(s) = &self.link {
            if self.resumable() {
                s.send_ack_lazy(self.end.ack_value());
            }
        }
    }
}

impl Resumable {
    /// After a read of `n` bytes (0: the end of input): counted, and acknowledged now or soon.
    fn on_read(&mut self, n: usize) {
        if n > 0 {
            self.end.on_recv(n);
            if self.end.unacked() >= ACK_EVERY {
                self.send_ack();
            } else {
                self.send_ack_lazy();
            }
        } else {
            self.end.on_recv_fin();
            self.send_ack_lazy();
        }
    }

    /// Attached, with bytes the app wrote that the stream took none of: right after
    /// [`Resumable::poll_link`], which handed over what the stream's credit and queue allowed and
    /// left our waker with the stream for the rest.
    fn waits_for_stream(&self) -> bool {
        matches!(self.link, Link::Up(_)) && self.end.has_unsent()
    }

    /// A write of up to `len` bytes: `take(end, n)` keeps the first `n` (what the retained
    /// bytes and the budget allow) and returns how many it kept.
    fn poll_take(
        &mut self,
        cx: &mut Context<'_>,
        len: usize,
        take: impl FnOnce(&mut End, usize) -> usize,
    ) -> Poll<io::Result<usize>> {
        if let Poll::Ready(Err(e)) = self.poll_link(cx) {
            return Poll::Ready(Err(e.to_io()));
        }
        // While attached, the app waits like a plain stream's when the stream takes no more
        // (its credit or queue is full; `poll_link` left its waker with the stream): the room
        // for retained bytes is for what is sent and not yet acknowledged, not a second send
        // queue. Filled ahead of the stream, it made a sender read about 1 MiB from its app
        // before the session wrote any of it, every byte cold by then: 18 % more CPU per byte
        // at the sending end (docs/benchmarks.md, "A send queue in front of the stream").
        if len > 0 && self.waits_for_stream() {
            return Poll::Pending;
        }
        let mut n = self.end.writable().min(len);
        if n == 0 {
            // Woken by the acknowledgement that makes room (registered in poll_link).
            return if len == 0 {
                Poll::Ready(Ok(0))
            } else {
                Poll::Pending
            };
        }
        if let Some(c) = &self.charge {
            n = ready!(c.budget.poll_grant(cx, &c.key, n));
        }
        let taken = take(&mut self.end, n);
        self.charged += n;
        RETAINED.fetch_add(n as i64, Ordering::Relaxed);
        debug_assert_eq!(taken, n);
        // Hand it over now where credit allows; the rest goes on later polls.
        if let Poll::Ready(Err(e)) = self.poll_link(cx) {
            return Poll::Ready(Err(e.to_io()));
        }
        Poll::Ready(Ok(n))
    }
}

impl Chunks for Resumable {
    fn poll_read_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        loop {
            ready!(self.poll_link(cx)).map_err(|e| e.to_io())?;
            if self.end.recv_fin() {
                return Poll::Ready(Ok(None));
            }
            let Link::Up(stream) = &mut self.link else {
                continue;
            };
            match stream.poll_recv_chunk(cx) {
                Poll::Ready(Ok(chunk)) => {
                    self.on_read(chunk.as_ref().map_or(0, Bytes::len));
                    return Poll::Ready(Ok(chunk));
                }
                Poll::Ready(Err(se)) => self.lost(se),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn poll_write_chunk(
        &mut self,
        cx: &mut Context<'_>,
        data: &mut Bytes,
    ) -> Poll<io::Result<usize>> {
        self.poll_take(cx, data.len(), |end, n| end.write_bytes(data.split_to(n)))
    }
}

impl AsyncRead for Resumable {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            ready!(this.poll_link(cx)).map_err(|e| e.to_io())?;
            if this.end.recv_fin() {
                return Poll::Ready(Ok(()));
            }
            let Link::Up(stream) = &mut this.link else {
                continue;
            };
            let check = buf.remaining() == 0;
            let before = buf.filled().len();
            match Pin::new(stream).poll_read(cx, buf) {
                Poll::Ready(Ok(())) => {
                    if check {
                        return Poll::Ready(Ok(())); // a readiness check: data or an end waits
                    }
                    this.on_read(buf.filled().len() - before);
                    return Poll::Ready(Ok(()));
                }
                Poll::Ready(Err(e)) => {
                    let inner = e
                        .get_ref()
                        .and_then(|i| i.downcast_ref::<StreamError>())
                        .cloned();
                    match inner {
                        Some(se) => {
                            this.lost(se);
                            continue;
                        }
                        None => return Poll::Ready(Err(e)),
                    }
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl AsyncWrite for Resumable {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .poll_take(cx, buf.len(), |end, n| end.write(&buf[..n]))
    }

    /// Ready once what the app wrote is handed to the stream (while attached; suspended, it
    /// waits in the retained bytes as before). It was ready at once: a sender whose app went
    /// quiet with a tail still waiting for credit, and whose other direction had ended, left
    /// that tail until the app wrote again (the credit's wake-up found nothing polling).
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match this.poll_link(cx) {
            Poll::Ready(Err(e)) => Poll::Ready(Err(e.to_io())),
            // `poll_link` left our waker with the stream, which takes no more for now.
            Poll::Ready(Ok(())) if this.waits_for_stream() => Poll::Pending,
            _ => Poll::Ready(Ok(())),
        }
    }

    /// Ends our direction; ready once the far end has acknowledged everything and the `FIN`
    /// (nothing is left that a lost session could take with it).
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.end.write_fin();
        ready!(this.poll_link(cx)).map_err(|e| e.to_io())?;
        if this.end.fin_acked() || (this.end.is_plain() && !this.end.fin_due()) {
            return Poll::Ready(Ok(()));
        }
        if let Side::Opener { ticket: None, .. } = &this.side {
            // Not known to be resumable yet: like a plain stream, done once the FIN is queued.
            if !this.end.fin_due() {
                return Poll::Ready(Ok(()));
            }
        }
        Poll::Pending
    }
}

impl Drop for Resumable {
    fn drop(&mut self) {
        LIVE.fetch_sub(1, Ordering::Relaxed);
        if matches!(self.link, Link::Suspended) {
            SUSPENDED.fetch_sub(1, Ordering::Relaxed);
        }
        if let Some(c) = &self.charge {
            c.budget.release(&c.key, self.charged);
        }
        RETAINED.fetch_sub(self.charged as i64, Ordering::Relaxed);
    }
}
