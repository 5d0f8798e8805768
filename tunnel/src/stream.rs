//! A stream: one app connection inside a session, with its own buffers and credit.
//!
//! [`Stream`] is the handle applications use: `AsyncRead`/`AsyncWrite` for copying to and from a
//! socket, plus a chunk API ([`Stream::poll_recv_chunk`], [`Stream::poll_send`],
//! [`Stream::poll_failed`]) that lets the DMZ relay move received payloads to another session
//! without an intermediate buffer. `StreamState` is the per-stream part of the session state;
//! its methods are the pure bookkeeping (credit, half-close, reset) the reader task applies.

use crate::frame::{Dest, ErrorCode, Meta};
use crate::machine::Sent;
use crate::session::{Shared, StreamError};
use bytes::{Buf, Bytes};
use std::collections::VecDeque;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What the peer asked for when it opened a stream towards us.
#[derive(Clone, Debug)]
pub struct OpenRequest {
    pub dest: Dest,
    pub meta: Meta,
}

/// Queued output of a stream, in order.
pub(crate) enum Out {
    /// An encoded `DATA` frame.
    Data(Bytes),
    Fin,
}

#[derive(Debug)]
pub(crate) enum OpenState {
    /// We sent `OPEN` and wait for the answer.
    Opening,
    Open,
    /// The peer opened it; `answered` once we sent `OPEN_OK` or `OPEN_ERR`.
    Incoming {
        answered: bool,
    },
}

pub(crate) struct StreamState {
    pub(crate) incoming: bool,
    pub(crate) open: OpenState,
    // Receive side.
    recv_buf: VecDeque<Bytes>,
    pub(crate) recv_window: u32,
    /// Credit granted to the peer and not yet used.
    pub(crate) recv_avail: u32,
    /// Bytes the application consumed that we have not yet handed back as credit.
    pub(crate) recv_unacked: u32,
    pub(crate) recv_fin: bool,
    /// Measures how fast the reader drains the window (`window.rs`).
    pub(crate) tuner: crate::window::Tuner,
    // Send side.
    pub(crate) send_credit: u64,
    pub(crate) send_queue: VecDeque<Out>,
    pub(crate) in_ready: bool,
    pub(crate) fin_queued: bool,
    pub(crate) fin_sent: bool,
    /// Payload bytes queued and not yet handed to the transport.
    pub(crate) queued_payload: u64,
    /// Session credit to give back: payload that was queued (and paid for) but dropped by a
    /// reset, so it never reached the peer and will never be returned by it.
    pub(crate) refund: u64,
    // Lifecycle.
    error: Option<StreamError>,
    pub(crate) handle_alive: bool,
    read_waker: Option<Waker>,
    pub(crate) write_waker: Option<Waker>,
    open_waker: Option<Waker>,
    fail_waker: Option<Waker>,
    pub(crate) bytes_in: u64,
    pub(crate) bytes_out: u64,
    // Resumable streams (docs/protocol.md, "Streams that survive their session").
    /// The peer's latest `ACK` offset, and the one the handle last reported.
    ack_in: u64,
    ack_seen: u64,
    ack_waker: Option<Waker>,
    /// Our `ACK` waiting for the writer (the latest value only: acks coalesce).
    pub(crate) ack_out: Option<u64>,
    pub(crate) ack_queued: bool,
    /// Metadata of the peer's `OPEN_OK` (a resume ticket or offset), when it sent any.
    open_meta: Option<Box<Meta>>,
}

impl StreamState {
    pub(crate) fn new(recv_window: u32, send_credit: u32, open: OpenState, incoming: bool) -> Self {
        StreamState {
            incoming,
            open,
            recv_buf: VecDeque::new(),
            recv_window,
            recv_avail: recv_window,
            recv_unacked: 0,
            recv_fin: false,
            tuner: crate::window::Tuner::default(),
            send_credit: send_credit as u64,
            send_queue: VecDeque::new(),
            in_ready: false,
            fin_queued: false,
            fin_sent: false,
            queued_payload: 0,
            refund: 0,
            error: None,
            handle_alive: true,
            read_waker: None,
            write_waker: None,
            open_waker: None,
            fail_waker: None,
            bytes_in: 0,
            bytes_out: 0,
            ack_in: 0,
            ack_seen: 0,
            ack_waker: None,
            ack_out: None,
            ack_queued: false,
            open_meta: None,
        }
    }

    /// Why the stream failed, once it has.
    pub(crate) fn error(&self) -> Option<&StreamError> {
        self.error.as_ref()
    }

    fn wake_all(&mut self) {
        for w in [
            self.read_waker.take(),
            self.write_waker.take(),
            self.open_waker.take(),
            self.fail_waker.take(),
            self.ack_waker.take(),
        ]
        .into_iter()
        .flatten()
        {
            w.wake();
        }
    }

    /// The stream failed: drop buffers, wake everyone. The first error wins.
    pub(crate) fn fail(&mut self, err: StreamError) {
        if self.error.is_none() {
            self.error = Some(err);
        }
        self.recv_buf.clear();
        self.send_queue.clear();
        self.refund += std::mem::take(&mut self.queued_payload);
        self.wake_all();
    }

    /// Incoming `DATA`: `Err` asks the session to reset the stream with that code and reason.
    pub(crate) fn on_data(&mut self, payload: Bytes) -> Result<(), (ErrorCode, String)> {
        if self.error.is_some() {
            return Ok(()); // we reset it already; in-flight data is dropped
        }
        let n = payload.len();
        if self.recv_fin {
            let reason = "DATA after FIN".to_string();
            self.fail(StreamError::LocalReset {
                code: ErrorCode::Protocol,
                reason: reason.clone(),
            });
            return Err((ErrorCode::Protocol, reason));
        }
        if n > self.recv_avail as usize {
            let reason = format!(
                "peer sent {n} bytes with only {} bytes of stream credit",
                self.recv_avail
            );
            self.fail(StreamError::LocalReset {
                code: ErrorCode::FlowControl,
                reason: reason.clone(),
            });
            return Err((ErrorCode::FlowControl, reason));
        }
        self.recv_avail -= n as u32;
        self.bytes_in += n as u64;
        self.recv_buf.push_back(payload);
        if let Some(w) = self.read_waker.take() {
            w.wake();
        }
        Ok(())
    }

    pub(crate) fn on_window(&mut self, credit: u32) -> Result<(), String> {
        self.send_credit += credit as u64;
        if self.send_credit > u32::MAX as u64 {
            let reason = "stream window overflow".to_string();
            self.fail(StreamError::LocalReset {
                code: ErrorCode::FlowControl,
                reason: reason.clone(),
            });
            return Err(reason);
        }
        if let Some(w) = self.write_waker.take() {
            w.wake();
        }
        Ok(())
    }

    /// The writer handed `n` payload bytes of this stream to the transport: they no longer
    /// count against our own queue limit.
    pub(crate) fn on_sent(&mut self, n: u64) {
        self.queued_payload = self.queued_payload.saturating_sub(n);
        if let Some(w) = self.write_waker.take() {
            w.wake();
        }
    }

    pub(crate) fn on_fin(&mut self) {
        self.recv_fin = true;
        if let Some(w) = self.read_waker.take() {
            w.wake();
        }
    }

    pub(crate) fn on_open_ok(&mut self, meta: Meta) {
        if matches!(self.open, OpenState::Opening) {
            self.open = OpenState::Open;
            if !meta.0.is_empty() {
                self.open_meta = Some(Box::new(meta));
            }
        }
        if let Some(w) = self.open_waker.take() {
            w.wake();
        }
    }

    /// The peer's `ACK`: offsets only grow (an older value, from a superseded path, is
    /// ignored).
    pub(crate) fn on_ack(&mut self, offset: u64) {
        if offset > self.ack_in {
            self.ack_in = offset;
            if let Some(w) = self.ack_waker.take() {
                w.wake();
            }
        }
    }

    pub(crate) fn on_open_err(&mut self, code: ErrorCode, reason: String) {
        self.fail(StreamError::Refused { code, reason });
    }

    /// True when no handle and no queued frame needs this state any more.
    pub(crate) fn removable(&self) -> bool {
        !self.handle_alive
            && self.send_queue.is_empty()
            && !self.ack_queued
            && (self.error.is_some() || (self.fin_sent && self.recv_fin))
    }
}

/// One multiplexed stream. Reading yields what the peer sent; writing sends `DATA` within the
/// credit the peer granted; `shutdown` sends `FIN`. Dropping a stream that is not finished both
/// ways resets it (`RST(cancelled)`), so the peer never waits for a stream nobody holds.
pub struct Stream {
    id: u32,
    shared: Arc<Shared>,
    request: Option<Box<OpenRequest>>,
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream")
            .field("id", &self.id)
            .field("request", &self.request)
            .finish()
    }
}

impl Stream {
    pub(crate) fn new(id: u32, shared: Arc<Shared>, request: Option<Box<OpenRequest>>) -> Stream {
        Stream {
            id,
            shared,
            request,
        }
    }

    pub fn id(&self) -> u32 {
        self.id
    }

    /// For a stream the peer opened: where it wants to go and the metadata it sent.
    pub fn request(&self) -> Option<&OpenRequest> {
        self.request.as_deref()
    }

    /// The credit this session grants per stream (its `stream_window`).
    pub fn stream_window(&self) -> u32 {
        self.shared.config.stream_window
    }

    /// The largest window a stream of this session may grow to (`window.rs`).
    pub fn window_max(&self) -> u32 {
        self.shared
            .config
            .window_max
            .max(self.shared.config.stream_window)
    }

    /// The most bytes one `DATA` frame carries on this session.
    pub fn max_frame(&self) -> usize {
        self.shared.max_send
    }

    /// Bytes received and sent on this stream so far (payload only).
    pub fn byte_counts(&self) -> (u64, u64) {
        let st = self.shared.lock();
        st.streams
            .get(&self.id)
            .map(|s| (s.bytes_in, s.bytes_out))
            .unwrap_or((0, 0))
    }

    /// Waits for the answer to our `OPEN`: `Ok` on `OPEN_OK`, the peer's reason on `OPEN_ERR`,
    /// or the session's failure.
    pub async fn opened(&self) -> Result<(), StreamError> {
        poll_fn(|cx| self.poll_opened(cx)).await
    }

    /// [`Stream::opened`] as a poll function.
    pub fn poll_opened(&self, cx: &mut Context<'_>) -> Poll<Result<(), StreamError>> {
        {
            let mut st = self.shared.lock();
            let closed = st.closed.clone();
            let Some(s) = st.streams.get_mut(&self.id) else {
                return Poll::Ready(Err(closed
                    .map(StreamError::SessionLost)
                    .unwrap_or(StreamError::GoingAway)));
            };
            if let Some(e) = &s.error {
                return Poll::Ready(Err(e.clone()));
            }
            match s.open {
                OpenState::Opening => {
                    s.open_waker = Some(cx.waker().clone());
                    Poll::Pending
                }
                _ => Poll::Ready(Ok(())),
            }
        }
    }

    /// Accepts a stream the peer opened (`OPEN_OK`).
    pub fn accept(&self) {
        self.shared.lock().answer(self.id, None, Meta::default());
    }

    /// Accepts with metadata in the `OPEN_OK` (sent only to a peer that announced resume).
    pub fn accept_with(&self, meta: Meta) {
        self.shared.lock().answer(self.id, None, meta);
    }

    /// The metadata of the peer's `OPEN_OK` (empty when it sent none, or before it came).
    pub fn open_meta(&self) -> Meta {
        let st = self.shared.lock();
        st.streams
            .get(&self.id)
            .and_then(|s| s.open_meta.as_deref().cloned())
            .unwrap_or_default()
    }

    /// Whether both hellos announced resumable streams (`ACK` may flow).
    pub fn resume_negotiated(&self) -> bool {
        self.shared.lock().rules.resume
    }

    /// Queues an end-to-end `ACK(offset)` (coalesced with one not yet sent). Nothing happens on
    /// a session where resume was not negotiated.
    pub fn send_ack(&self, offset: u64) {
        self.shared.lock().send_ack(self.id, offset);
    }

    /// Queues `ACK(offset)` lazily: with the session's next batch, or after a short delay when
    /// nothing else is sent (the answer to the peer's `FIN`, which our own `FIN` usually
    /// follows at once).
    pub fn send_ack_lazy(&self, offset: u64) {
        self.shared.lock().send_ack_lazy(self.id, offset);
    }

    /// Ready with the peer's latest `ACK` offset when it grew since the last call; `None` once
    /// no more can come (the stream failed or is gone); pending otherwise.
    pub fn poll_ack(&self, cx: &mut Context<'_>) -> Poll<Option<u64>> {
        let mut st = self.shared.lock();
        let Some(s) = st.streams.get_mut(&self.id) else {
            return Poll::Ready(None);
        };
        if s.ack_in > s.ack_seen {
            s.ack_seen = s.ack_in;
            return Poll::Ready(Some(s.ack_in));
        }
        if s.error.is_some() {
            return Poll::Ready(None);
        }
        s.ack_waker = Some(cx.waker().clone());
        Poll::Pending
    }

    /// Refuses a stream the peer opened (`OPEN_ERR`) with a reason the user will read.
    pub fn reject(self, code: ErrorCode, reason: &str) {
        self.refuse(code, reason);
        // Drop runs next and finds the stream failed: no RST follows the OPEN_ERR.
    }

    /// Like [`Stream::reject`], for a caller that keeps the handle (a relay).
    pub fn refuse(&self, code: ErrorCode, reason: &str) {
        self.shared
            .lock()
            .answer(self.id, Some((code, reason)), Meta::default());
    }

    /// Resets the stream with a code and reason; both directions end at once.
    pub fn reset(&self, code: ErrorCode, reason: &str) {
        self.shared.lock().reset(self.id, code, reason);
    }

    fn missing(&self, closed: Option<crate::session::SessionError>) -> StreamError {
        crate::machine::missing(closed)
    }

    /// Takes the next received chunk as it arrived (`None` at end of stream). Used by relays.
    pub fn poll_recv_chunk(
        &self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<Bytes>, StreamError>> {
        let shared = &self.shared;
        let mut st = shared.lock();
        let closed = st.closed.clone();
        let Some(s) = st.streams.get_mut(&self.id) else {
            return Poll::Ready(Err(self.missing(closed)));
        };
        if let Some(chunk) = s.recv_buf.pop_front() {
            let n = chunk.len() as u32;
            st.consumed(self.id, n, tokio::time::Instant::now());
            return Poll::Ready(Ok(Some(chunk)));
        }
        if let Some(e) = &s.error {
            return Poll::Ready(Err(e.clone()));
        }
        if s.recv_fin {
            return Poll::Ready(Ok(None));
        }
        s.read_waker = Some(cx.waker().clone());
        Poll::Pending
    }

    pub async fn recv_chunk(&self) -> Result<Option<Bytes>, StreamError> {
        poll_fn(|cx| self.poll_recv_chunk(cx)).await
    }

    /// Queues as much of `data` as may be sent now (at least one byte, at most one frame) and
    /// returns how much; pending until something may be sent. The check and the queueing happen
    /// under one lock, so concurrent writers on other streams cannot take the credit between
    /// them.
    ///
    /// What may be sent is bounded by the peer's credit (stream and session) *and* by our own
    /// windows for bytes queued but not yet written: a peer that announces huge windows and then
    /// stops reading cannot make us buffer more than we would grant it.
    pub fn poll_send(&self, cx: &mut Context<'_>, data: &[u8]) -> Poll<Result<usize, StreamError>> {
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let mut st = self.shared.lock();
        let sent = st.send(self.id, data);
        self.blocked(&mut st, cx, sent)
    }

    /// [`Stream::poll_send`] of bytes already in a `Bytes` (a payload received on another
    /// session): what may be sent now is split off `data` and queued without a copy.
    pub fn poll_send_bytes(
        &self,
        cx: &mut Context<'_>,
        data: &mut Bytes,
    ) -> Poll<Result<usize, StreamError>> {
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let mut st = self.shared.lock();
        let sent = st.send_bytes(self.id, data);
        self.blocked(&mut st, cx, sent)
    }

    fn blocked(
        &self,
        st: &mut crate::session::Locked<'_>,
        cx: &mut Context<'_>,
        sent: Sent,
    ) -> Poll<Result<usize, StreamError>> {
        match sent {
            Sent::Queued(n) => Poll::Ready(Ok(n)),
            Sent::Failed(e) => Poll::Ready(Err(e)),
            Sent::Blocked { session } => {
                if let Some(s) = st.streams.get_mut(&self.id) {
                    s.write_waker = Some(cx.waker().clone());
                }
                if session {
                    st.wait_for_session(cx.waker());
                }
                Poll::Pending
            }
        }
    }

    /// Ready with the error once the stream has failed (reset by either side, refused, or its
    /// session lost); pending otherwise. Lets a relay notice a dead source while it waits for
    /// credit on the destination.
    pub fn poll_failed(&self, cx: &mut Context<'_>) -> Poll<StreamError> {
        let mut st = self.shared.lock();
        let closed = st.closed.clone();
        let Some(s) = st.streams.get_mut(&self.id) else {
            return Poll::Ready(self.missing(closed));
        };
        match &s.error {
            Some(e) => Poll::Ready(e.clone()),
            None => {
                s.fail_waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }

    /// Whether the stream has failed already (as [`Stream::poll_failed`] would say), without
    /// taking the place of the waker a relay may have left there.
    pub fn has_failed(&self) -> bool {
        let st = self.shared.lock();
        st.streams.get(&self.id).is_none_or(|s| s.error.is_some())
    }

    /// A future that resolves when the stream fails, usable while the stream itself is
    /// borrowed by a copy loop.
    pub fn failure(&self) -> Failure {
        Failure {
            shared: self.shared.clone(),
            id: self.id,
        }
    }

    /// Half-closes our sending direction (`FIN` after everything queued).
    pub fn finish(&self) {
        self.shared.lock().finish(self.id);
    }
}

/// Resolves with the error once its stream has failed (see [`Stream::failure`]).
pub struct Failure {
    shared: Arc<Shared>,
    id: u32,
}

impl std::future::Future for Failure {
    type Output = StreamError;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<StreamError> {
        let mut st = self.shared.lock();
        let closed = st.closed.clone();
        let Some(s) = st.streams.get_mut(&self.id) else {
            return Poll::Ready(
                closed
                    .map(StreamError::SessionLost)
                    .unwrap_or(StreamError::GoingAway),
            );
        };
        match &s.error {
            Some(e) => Poll::Ready(e.clone()),
            None => {
                s.fail_waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let shared = &this.shared;
        let mut st = shared.lock();
        let closed = st.closed.clone();
        let Some(s) = st.streams.get_mut(&this.id) else {
            return Poll::Ready(Err(this.missing(closed).to_io()));
        };
        if let Some(front) = s.recv_buf.front_mut() {
            if buf.remaining() == 0 {
                return Poll::Ready(Ok(())); // a readiness check (`splice`): data waits
            }
            let n = front.len().min(buf.remaining());
            buf.put_slice(&front[..n]);
            front.advance(n);
            if front.is_empty() {
                s.recv_buf.pop_front();
            }
            st.consumed(this.id, n as u32, tokio::time::Instant::now());
            return Poll::Ready(Ok(()));
        }
        if let Some(e) = &s.error {
            return Poll::Ready(Err(e.to_io()));
        }
        if s.recv_fin {
            return Poll::Ready(Ok(()));
        }
        s.read_waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_send(cx, buf).map_err(|e| e.to_io())
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().finish();
        Poll::Ready(Ok(()))
    }
}

impl crate::splice::Chunks for Stream {
    fn poll_read_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        self.poll_recv_chunk(cx).map_err(|e| e.to_io())
    }

    fn poll_write_chunk(
        &mut self,
        cx: &mut Context<'_>,
        data: &mut Bytes,
    ) -> Poll<io::Result<usize>> {
        self.poll_send_bytes(cx, data).map_err(|e| e.to_io())
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.shared.lock().drop_handle(self.id);
    }
}
