//! The one copy loop between an app's socket and a stream, used by every place that joins two
//! byte streams (the agent's forwards, SOCKS5 and HTTP `CONNECT`; the connector's service
//! connection): an idle pair holds no buffer.
//!
//! `tokio::io::copy_bidirectional` keeps one buffer per direction for the whole life of the
//! pair, so 10,000 idle streams held 20,000 buffers (their touched pages: ~25 KiB per stream in
//! the agent and in the connector). [`splice`] instead waits for a side to become readable
//! *without* a buffer, takes a 64 KiB buffer from a small shared pool only then, reads and
//! writes until a read would block with nothing left to write, and hands the buffer back. A
//! buffer is held only while data waits (read and not yet written, e.g. while the peer's credit
//! or the socket's send buffer is full).
//!
//! Waiting without a buffer: for a `tokio::net::TcpStream` this is `poll_read_ready` (no system
//! call); for any other reader it is a read into an empty buffer, which every reader we join
//! (tunnel streams, hyper's upgraded connections, boxed dialer streams, and `TcpStream` below
//! them) answers only once a real read would not block. A reader that answered it at once would
//! cost one buffer hand-out per wake-up, never a busy loop: the real read that follows registers
//! the wake-up before the buffer goes back.
//!
//! [`splice_fresh`] is the same copy for a socket just accepted from an app that writes first (a
//! forward): its first read is tried at once, before tokio's event loop has seen the socket, so
//! those bytes leave with the stream's `OPEN` in one TLS record.
//!
//! [`splice_chunks`] is the same copy between a TCP socket and a tunnel stream (a forward, the
//! connector's service connection), without our buffer in between: the bytes read from the
//! socket become the stream's chunk, and a received chunk is written to the socket as it
//! arrived ([`Chunks`]). It holds no buffer while idle either.
//!
//! Semantics are those of `copy_bidirectional`: end of input on one side is passed on as a write
//! shutdown of the other, each direction on its own (half-close works end to end), and the first
//! error of either direction ends both.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use std::any::Any;
use std::collections::VecDeque;
use std::future::poll_fn;
use std::io;
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Size of one copy buffer: a whole `DATA` frame, as before.
pub const BUF_SIZE: usize = 64 * 1024;

/// Buffers kept for reuse (4 MiB at most); the rest are freed when handed back.
const POOL_MAX: usize = 64;

static POOL: Mutex<Vec<Box<[u8]>>> = Mutex::new(Vec::new());

/// Buffers handed out and not yet given back: those of pairs with data waiting.
static IN_USE: AtomicUsize = AtomicUsize::new(0);

fn take() -> Box<[u8]> {
    IN_USE.fetch_add(1, Ordering::Relaxed);
    take_buffer()
}

fn give(buf: Box<[u8]>) {
    IN_USE.fetch_sub(1, Ordering::Relaxed);
    give_buffer(buf);
}

/// A [`BUF_SIZE`] buffer from the shared pool, for a reader that holds one only while data
/// waits (this copy loop, and the read buffer under TLS, `egress::ReadBuffer`).
pub fn take_buffer() -> Box<[u8]> {
    let reused = POOL.lock().ok().and_then(|mut p| p.pop());
    reused.unwrap_or_else(|| vec![0u8; BUF_SIZE].into_boxed_slice())
}

/// Hands a buffer from [`take_buffer`] back to the pool (freed when the pool is full).
pub fn give_buffer(buf: Box<[u8]>) {
    if let Ok(mut p) = POOL.lock() {
        if p.len() < POOL_MAX {
            p.push(buf);
        }
    }
}

/// Read buffers that nothing points into any more, for the next reader with bytes to read: the
/// WebSocket reader's and [`splice_chunks`]'s, which let go of theirs whenever a read would
/// wait (an idle session or pair holds none). Only buffers of [`SPARE_SIZE`] are kept. Without them, a reader woken for one small
/// message (a new connection's `OPEN`, a keystroke) allocated and freed a whole frame's room
/// each time: 1.6 % of the chain's CPU per new connection, most of it the allocator merging a
/// block that size.
static SPARE: Mutex<Vec<BytesMut>> = Mutex::new(Vec::new());

/// Most buffers [`SPARE`] keeps: enough for the readers busy at one moment, nothing an idle
/// process notices (about 0.5 MiB).
const SPARE_MAX: usize = 8;

/// The room of a spare buffer: a whole `DATA` frame with its WebSocket and inner-channel
/// headers (the WebSocket reader's room at a frame boundary).
pub const SPARE_SIZE: usize = BUF_SIZE + 1024;

/// Bytes that arrived since start (see [`activity`]).
static ARRIVED: AtomicU64 = AtomicU64::new(0);

/// A count of the bytes that arrived: read by a copy loop or a WebSocket reader, received by
/// the HTTP fallback transport, or datagrams handed to an association (`note_arrival`). It
/// moves with the data, not with the number of sessions: a thousand idle sessions' pings move
/// it by a few dozen bytes each, a transfer by all its bytes, so a caller that sees it nearly
/// stand still knows the process went quiet (every role then gives freed memory back:
/// `uplink::cli::give_back_when_quiet`). A byte may count twice in one process (an agent's
/// SOCKS5 download is read by the WebSocket reader, then by the copy loop to the app): it errs
/// towards busy only.
pub fn activity() -> u64 {
    ARRIVED.load(Ordering::Relaxed)
}

/// Moves [`activity`] by `n` bytes that arrived: read by a copy loop or a WebSocket reader,
/// received by the HTTP fallback transport (hyper reads those into its own buffers), or a
/// datagram handed to an association.
pub(crate) fn note_arrival(n: usize) {
    ARRIVED.fetch_add(n as u64, Ordering::Relaxed);
}

/// Frees the read buffers kept for reuse (those [`take_buffer`] and the readers hand out): for
/// a process that went quiet, before it hands freed memory back (up to 4.5 MiB that no reader
/// holds). Returns how many it freed.
pub fn release_spares() -> usize {
    // Taken out under the lock, freed after it.
    let pool = POOL.lock().map(|mut p| std::mem::take(&mut *p));
    let spare = SPARE.lock().map(|mut s| std::mem::take(&mut *s));
    pool.map_or(0, |p| p.len()) + spare.map_or(0, |s| s.len())
}

/// Serializes the unit tests that move [`activity`] or use the pools (this file's and the
/// WebSocket transport's): both are process-wide.
#[cfg(test)]
pub(crate) static TEST_SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// An empty buffer with room for at least `room` bytes: a spare one if there is one.
pub(crate) fn spare_bytes(room: usize) -> BytesMut {
    let spare = SPARE.lock().ok().and_then(|mut s| s.pop());
    match spare {
        Some(b) if b.capacity() >= room => b,
        _ => BytesMut::with_capacity(room.max(SPARE_SIZE)),
    }
}

/// Keeps `buf` (emptied) as a spare if nothing else points into its memory any more (no chunk
/// or message read into it is still alive) and it has a spare's room; frees it otherwise.
pub(crate) fn keep_spare(mut buf: BytesMut) {
    buf.clear();
    // `try_reclaim` also answers yes for a shared buffer that has the room already: only one of
    // exactly a spare's size, whole again, is ours alone (no larger one is kept either).
    if buf.capacity() == 0 || !buf.try_reclaim(SPARE_SIZE) || buf.capacity() != SPARE_SIZE {
        return;
    }
    if let Ok(mut s) = SPARE.lock() {
        if s.len() < SPARE_MAX {
            s.push(buf);
        }
    }
}

/// Copy buffers held by spliced pairs right now (only those with data waiting hold one).
pub fn buffers_in_use() -> usize {
    IN_USE.load(Ordering::Relaxed)
}

/// Copies both ways between `a` and `b` until both directions have ended; returns the bytes
/// copied from `a` to `b` and from `b` to `a`.
pub async fn splice<A, B>(a: &mut A, b: &mut B) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + 'static,
    B: AsyncRead + AsyncWrite + Unpin + 'static,
{
    copy_both(a, b, false).await
}

/// [`splice`] for a pair whose `a` is a TCP socket just accepted from an app that writes first
/// (a forward): its first bytes are read at once, without waiting for the event loop to report
/// them (see `try_first_read`), so they go out with the stream's `OPEN`. Elsewhere (SOCKS5
/// and `CONNECT`, whose app writes only after our reply; the connector's service socket) the
/// first read would find nothing and cost a system call.
pub async fn splice_fresh<A, B>(a: &mut A, b: &mut B) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + 'static,
    B: AsyncRead + AsyncWrite + Unpin + 'static,
{
    copy_both(a, b, true).await
}

/// A tunnel stream's end whose bytes move as owned chunks: what arrived is handed out as the
/// `Bytes` it arrived in, and what it is given is kept as given (a resumable stream retains
/// it until acknowledged). [`splice_chunks`] copies between one and a TCP socket with no copy
/// of ours in between.
pub trait Chunks: AsyncWrite + Unpin {
    /// The next chunk received; `None` at the end of input.
    fn poll_read_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>>;
    /// Takes what may be sent now (at least one byte) off the front of `data` and returns how
    /// much; pending until something may be sent.
    fn poll_write_chunk(
        &mut self,
        cx: &mut Context<'_>,
        data: &mut Bytes,
    ) -> Poll<io::Result<usize>>;
}

/// [`splice`] between a TCP socket and a tunnel stream, without the copy through a buffer of
/// ours: a read from the socket becomes the stream's chunk as it is (or, if small, a copy of
/// just its bytes), and a received chunk is written to the socket as it is. `fresh`: the
/// first read is tried at once, as in [`splice_fresh`]. Returns the bytes from `tcp` to `s`
/// and from `s` to `tcp`.
///
/// The plain copy loop moved every byte through a pool buffer: once from the socket, once into
/// the stream's retained bytes (sender), or once out of the received chunk (receiver): 5 % of
/// the chain's CPU per byte of a bulk transfer.
pub async fn splice_chunks<S: Chunks>(
    tcp: &mut TcpStream,
    s: &mut S,
    fresh: bool,
) -> io::Result<(u64, u64)> {
    let mut up = ToChunks {
        try_first: fresh,
        ..ToChunks::default()
    };
    let mut down = FromChunks::default();
    poll_fn(|cx| {
        let u = up.poll(cx, tcp, s)?;
        let d = down.poll(cx, s, tcp)?;
        both(u, d)
    })
    .await
}

/// A read of at least this many bytes leaves as a view of the read buffer; a smaller one is
/// copied out (and the buffer serves the next read). A view keeps its whole buffer alive while
/// the stream retains it (a resumable stream until the far end acknowledges it, through a
/// suspension), and no other view of at least this size fits beside it: the memory retained is
/// at most twice the bytes the stream counts (and charges to its budget). Bulk transfers read
/// whole frames, so they are never copied; a service writing 16 KiB TLS records is, as before.
const VIEW_FROM: usize = SPARE_SIZE / 2;

/// Less room than this left in the read buffer (the tail beside a view): a fresh one.
const MIN_ROOM: usize = BUF_SIZE / 4;

/// TCP socket → stream.
#[derive(Default)]
struct ToChunks {
    /// Where reads land; its filled part is always empty between polls (split off into `out`).
    buf: BytesMut,
    /// Read and not yet taken by the stream.
    out: Bytes,
    try_first: bool,
    read_done: bool,
    need_flush: bool,
    done: bool,
    bytes: u64,
}

impl ToChunks {
    fn poll<S: Chunks>(
        &mut self,
        cx: &mut Context<'_>,
        tcp: &mut TcpStream,
        s: &mut S,
    ) -> Poll<io::Result<u64>> {
        loop {
            if self.done {
                return Poll::Ready(Ok(self.bytes));
            }
            while !self.out.is_empty() {
                let n = ready!(s.poll_write_chunk(cx, &mut self.out))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.bytes += n as u64;
                self.need_flush = true;
            }
            if self.read_done {
                keep_spare(std::mem::take(&mut self.buf));
                ready!(Pin::new(&mut *s).poll_shutdown(cx))?;
                self.done = true;
                continue;
            }
            if std::mem::take(&mut self.try_first) {
                match try_first_read(tcp) {
                    Some(Ok((buf, n))) => {
                        note_arrival(n);
                        self.out = Bytes::copy_from_slice(&buf[..n]);
                        give(buf);
                        self.read_done = n == 0;
                        continue;
                    }
                    Some(Err(e)) => return Poll::Ready(Err(e)),
                    None => {}
                }
            }
            if self.buf.capacity() < MIN_ROOM {
                // No buffer (or only the tail beside a view): wait for the app without one,
                // and take one only once it has written.
                keep_spare(std::mem::take(&mut self.buf));
                match tcp.poll_read_ready(cx) {
                    Poll::Ready(Ok(())) => self.buf = spare_bytes(BUF_SIZE),
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => return self.idle(cx, s),
                }
            }
            // At most a frame's worth: the stream sends one `DATA` frame per chunk.
            let mut room = (&mut self.buf).limit(BUF_SIZE);
            match tokio_util::io::poll_read_buf(Pin::new(&mut *tcp), cx, &mut room) {
                Poll::Ready(Ok(0)) => self.read_done = true,
                Poll::Ready(Ok(n)) => {
                    note_arrival(n);
                    self.out = take_read(&mut self.buf);
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    // Nothing waits: no buffer is held while the app is quiet.
                    keep_spare(std::mem::take(&mut self.buf));
                    return self.idle(cx, s);
                }
            }
        }
    }

    /// Nothing to read or to hand over: flush what the stream may hold, then wait.
    fn idle<S: Chunks>(&mut self, cx: &mut Context<'_>, s: &mut S) -> Poll<io::Result<u64>> {
        if self.need_flush {
            ready!(Pin::new(&mut *s).poll_flush(cx))?;
            self.need_flush = false;
        }
        Poll::Pending
    }
}

/// The bytes just read into `buf`, as a chunk: a view of the buffer if there are at least
/// [`VIEW_FROM`] of them, else a copy (and `buf` is empty again, for the next read).
fn take_read(buf: &mut BytesMut) -> Bytes {
    if buf.len() >= VIEW_FROM {
        buf.split().freeze()
    } else {
        let chunk = Bytes::copy_from_slice(buf);
        buf.clear();
        chunk
    }
}

/// Stream → TCP socket.
#[derive(Default)]
struct FromChunks {
    /// Received chunks not yet written, at most about [`BUF_SIZE`] bytes of them.
    out: VecDeque<Bytes>,
    queued: usize,
    read_done: bool,
    done: bool,
    bytes: u64,
}

/// Most chunks in one vectored write.
const MAX_SLICES: usize = 16;

impl FromChunks {
    fn poll<S: Chunks>(
        &mut self,
        cx: &mut Context<'_>,
        s: &mut S,
        tcp: &mut TcpStream,
    ) -> Poll<io::Result<u64>> {
        loop {
            if self.done {
                return Poll::Ready(Ok(self.bytes));
            }
            // Take what waits (as the copy loop's buffer did: up to about its size), so that
            // a burst of small chunks goes out in one write.
            while !self.read_done && self.queued < BUF_SIZE && self.out.len() < MAX_SLICES {
                match s.poll_read_chunk(cx) {
                    Poll::Ready(Ok(Some(c))) => {
                        self.queued += c.len();
                        self.out.push_back(c);
                    }
                    Poll::Ready(Ok(None)) => self.read_done = true,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => break,
                }
            }
            if self.out.is_empty() {
                if !self.read_done {
                    // An idle pair keeps no allocation (the queue grew during a burst).
                    self.out = VecDeque::new();
                    return Poll::Pending;
                }
                ready!(Pin::new(&mut *tcp).poll_shutdown(cx))?;
                self.done = true;
                continue;
            }
            let mut slices = [IoSlice::new(&[]); MAX_SLICES];
            let k = io_slices(&self.out, &mut slices);
            let n = ready!(Pin::new(&mut *tcp).poll_write_vectored(cx, &slices[..k]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.bytes += n as u64;
            self.queued -= n;
            consume(&mut self.out, n);
        }
    }
}

/// Points `slots` at the front chunks of `queue`, for a vectored write; returns how many.
pub(crate) fn io_slices<'a>(queue: &'a VecDeque<Bytes>, slots: &mut [IoSlice<'a>]) -> usize {
    let mut k = 0;
    for (slot, c) in slots.iter_mut().zip(queue) {
        *slot = IoSlice::new(c);
        k += 1;
    }
    k
}

/// Drops the first `n` bytes of `queue` (written): whole chunks, then the front of one.
pub(crate) fn consume(queue: &mut VecDeque<Bytes>, mut n: usize) {
    while n > 0 {
        let front = queue.front_mut().expect("written bytes were queued");
        if front.len() <= n {
            n -= front.len();
            queue.pop_front();
        } else {
            front.advance(n);
            n = 0;
        }
    }
}

/// Both directions of a pair: their byte counts once both are done.
fn both(a: Poll<u64>, b: Poll<u64>) -> Poll<io::Result<(u64, u64)>> {
    match (a, b) {
        (Poll::Ready(a), Poll::Ready(b)) => Poll::Ready(Ok((a, b))),
        _ => Poll::Pending,
    }
}

async fn copy_both<A, B>(a: &mut A, b: &mut B, eager_a: bool) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + 'static,
    B: AsyncRead + AsyncWrite + Unpin + 'static,
{
    let mut a_to_b = Half::default();
    a_to_b.try_first = eager_a;
    let mut b_to_a = Half::default();
    poll_fn(|cx| {
        let ab = a_to_b.poll(cx, a, b)?;
        let ba = b_to_a.poll(cx, b, a)?;
        both(ab, ba)
    })
    .await
}

/// One direction: `buf[pos..end]` is read and not yet written.
#[derive(Default)]
struct Half {
    buf: Option<Box<[u8]>>,
    pos: usize,
    end: usize,
    /// The first read is still to be tried without waiting for readiness ([`splice_fresh`]).
    try_first: bool,
    read_done: bool,
    need_flush: bool,
    done: bool,
    bytes: u64,
}

impl Drop for Half {
    fn drop(&mut self) {
        if let Some(b) = self.buf.take() {
            give(b);
        }
    }
}

impl Half {
    fn release(&mut self) {
        if let Some(b) = self.buf.take() {
            give(b);
        }
        self.pos = 0;
        self.end = 0;
    }

    fn poll<R, W>(&mut self, cx: &mut Context<'_>, r: &mut R, w: &mut W) -> Poll<io::Result<u64>>
    where
        R: AsyncRead + Unpin + 'static,
        W: AsyncWrite + Unpin,
    {
        loop {
            if self.done {
                return Poll::Ready(Ok(self.bytes));
            }
            // Read while there is room: a fuller buffer makes larger writes.
            if !self.read_done && self.end < BUF_SIZE {
                if self.buf.is_none() && self.try_first {
                    self.try_first = false;
                    match try_first_read(r) {
                        // As after any read: end of input (0), or read on while there is room
                        // (a full buffer has none); the write below hands the buffer back.
                        Some(Ok((buf, n))) => {
                            note_arrival(n);
                            self.buf = Some(buf);
                            self.end = n;
                            self.read_done = n == 0;
                            continue;
                        }
                        Some(Err(e)) => return Poll::Ready(Err(e)),
                        None => {}
                    }
                }
                if self.buf.is_none() {
                    match poll_readable(r, cx) {
                        Poll::Ready(Ok(())) => self.buf = Some(take()),
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Pending => return self.idle(cx, w),
                    }
                }
                let buf = self.buf.as_mut().expect("taken above");
                let mut rb = ReadBuf::new(&mut buf[self.end..]);
                match Pin::new(&mut *r).poll_read(cx, &mut rb) {
                    Poll::Ready(Ok(())) => {
                        let n = rb.filled().len();
                        note_arrival(n);
                        if n == 0 {
                            self.read_done = true;
                        } else {
                            self.end += n;
                        }
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        if self.pos == self.end {
                            // Nothing waits: the buffer goes back until the reader wakes us.
                            self.release();
                            return self.idle(cx, w);
                        }
                    }
                }
            }
            while self.pos < self.end {
                let buf = self.buf.as_ref().expect("data is in the buffer");
                let n = ready!(Pin::new(&mut *w).poll_write(cx, &buf[self.pos..self.end]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.pos += n;
                self.bytes += n as u64;
                self.need_flush = true;
            }
            self.pos = 0;
            self.end = 0;
            if self.read_done {
                self.release();
                ready!(Pin::new(&mut *w).poll_shutdown(cx))?;
                self.done = true;
            }
        }
    }

    /// Nothing to write and nothing to read: flush what the writer may hold, then wait.
    fn idle<W: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        w: &mut W,
    ) -> Poll<io::Result<u64>> {
        if self.need_flush {
            ready!(Pin::new(&mut *w).poll_flush(cx))?;
            self.need_flush = false;
        }
        Poll::Pending
    }
}

/// The first read of a fresh TCP socket, tried at once, into a pool buffer: `None` when `r` is
/// not a `tokio::net::TcpStream` or nothing is there yet.
///
/// tokio knows nothing of a socket's readiness until its event loop has polled it once, so
/// waiting for readiness first costs a turn of the loop even when the data is already there. An
/// app that connects to a forward writes its first bytes at once, and they are usually in the
/// socket by the time the agent has accepted it and sent the `OPEN`: read now, they ride in the
/// same TLS record as the `OPEN` (one record instead of two at every hop, and the connector sees
/// data with the `OPEN`, so its answer rides with the reply). One system call per spliced pair;
/// a socket with nothing to read answers `WouldBlock` and the copy waits as before.
fn try_first_read<R: AsyncRead + Unpin + 'static>(
    r: &mut R,
) -> Option<io::Result<(Box<[u8]>, usize)>> {
    let tcp = (r as &mut dyn Any).downcast_mut::<TcpStream>()?;
    // The socket is non-blocking (tokio made it so): this never waits.
    let sock = socket2::SockRef::from(&*tcp);
    let mut buf = take();
    match std::io::Read::read(&mut &*sock, &mut buf) {
        Ok(n) => Some(Ok((buf, n))),
        Err(e) => {
            give(buf);
            match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => None,
                _ => Some(Err(e)),
            }
        }
    }
}

/// Ready once a read from `r` would not block (data, end of input or an error), without a buffer.
fn poll_readable<R: AsyncRead + Unpin + 'static>(
    r: &mut R,
    cx: &mut Context<'_>,
) -> Poll<io::Result<()>> {
    if let Some(tcp) = (r as &mut dyn Any).downcast_mut::<TcpStream>() {
        return tcp.poll_read_ready(cx);
    }
    let mut empty = ReadBuf::new(&mut []);
    Pin::new(r).poll_read(cx, &mut empty)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (c, s) = tokio::join!(TcpStream::connect(addr), l.accept());
        (c.unwrap(), s.unwrap().0)
    }

    /// An app's socket (`.0`) that wrote `bytes` to ours (`.1`): they wait in ours, and tokio
    /// has not seen it readable yet (registered after they arrived).
    fn app_that_wrote(bytes: &[u8]) -> (std::net::TcpStream, TcpStream) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut app = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (a, _) = l.accept().unwrap();
        std::io::Write::write_all(&mut app, bytes).unwrap();
        // Wait (blocking, outside tokio) until the bytes are in the socket.
        let mut peek = vec![0u8; bytes.len()];
        while a.peek(&mut peek).unwrap() < bytes.len() {}
        a.set_nonblocking(true).unwrap();
        (app, TcpStream::from_std(a).unwrap())
    }

    /// The tests below count the process-wide buffers in use: one at a time.
    use super::TEST_SERIAL as ONE_AT_A_TIME;

    /// After a transfer the pools kept up to 4.5 MiB of read buffers for good, even once the
    /// process had gone quiet and handed its other free memory back.
    #[tokio::test]
    async fn a_quiet_process_frees_the_read_buffers_kept_for_reuse() {
        let _one = ONE_AT_A_TIME.lock().await;
        give_buffer(take_buffer());
        keep_spare(spare_bytes(BUF_SIZE));
        assert!(release_spares() >= 2);
        assert_eq!(POOL.lock().unwrap().capacity(), 0);
        assert_eq!(SPARE.lock().unwrap().capacity(), 0);
    }

    /// The agent gives freed memory back when `activity` stands still; reads by the copy loop
    /// must move it by what they read (a transfer through a forward is all copy loop).
    #[tokio::test]
    async fn bytes_read_by_the_copy_loop_count_as_activity() {
        let _one = ONE_AT_A_TIME.lock().await;
        let (mut app, mut ours) = pair().await;
        let (mut peer, mut theirs) = pair().await;
        let before = activity();
        let copy = tokio::spawn(async move { splice(&mut ours, &mut theirs).await });
        app.write_all(&[7u8; 300_000]).await.unwrap();
        app.shutdown().await.unwrap();
        let mut got = Vec::new();
        peer.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), 300_000);
        assert!(
            activity() - before >= 300_000,
            "moved by {}",
            activity() - before
        );
        copy.abort();
    }

    /// An app's first bytes, already in the socket when the copy starts, go on in the copy's
    /// first poll, before tokio's event loop has learnt the socket is readable: in the agent
    /// they then ride in the same batch as the stream's `OPEN` (one TLS record, not two). The
    /// copy used to wait for readiness first, which only the next turn of the loop brings.
    #[tokio::test]
    async fn first_bytes_already_in_the_socket_go_in_the_first_poll() {
        let _one = ONE_AT_A_TIME.lock().await;
        let (_app, mut a) = app_that_wrote(b"hello");
        // The stream side: what the copy writes into it comes out at `far`.
        let (mut near, mut far) = tokio::io::duplex(1024);
        {
            let copy = splice_fresh(&mut a, &mut near);
            tokio::pin!(copy);
            assert!(futures_util::poll!(copy.as_mut()).is_pending());
        }
        // Closed, so that `far` reads only what the first poll wrote.
        drop(near);
        let mut got = Vec::new();
        far.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello");
        assert_eq!(buffers_in_use(), 0, "no data waits: the buffer went back");
    }

    /// A stream end in memory: hands out `rx` then the end of input (never, if `quiet`), keeps
    /// what it is given.
    #[derive(Default)]
    struct Mem {
        rx: VecDeque<Bytes>,
        quiet: bool,
        got: Vec<Bytes>,
        shut: bool,
    }

    impl AsyncWrite for Mem {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &[u8],
        ) -> Poll<io::Result<usize>> {
            unreachable!("splice_chunks hands chunks over whole")
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.get_mut().shut = true;
            Poll::Ready(Ok(()))
        }
    }

    impl Chunks for Mem {
        fn poll_read_chunk(&mut self, _: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
            match self.rx.pop_front() {
                None if self.quiet => Poll::Pending,
                c => Poll::Ready(Ok(c)),
            }
        }
        fn poll_write_chunk(
            &mut self,
            _: &mut Context<'_>,
            data: &mut Bytes,
        ) -> Poll<io::Result<usize>> {
            let n = data.len();
            self.got.push(data.split_to(n));
            Poll::Ready(Ok(n))
        }
    }

    /// The copy without our buffer: a large transfer and a burst of small chunks both ways,
    /// each end of input passed on as a shutdown, and the byte counts.
    #[tokio::test]
    async fn chunks_cross_both_ways_and_each_end_is_passed_on() {
        let (mut app, mut a) = pair().await;
        let mut mem = Mem::default();
        let small: Vec<Bytes> = (0..40u8).map(|i| Bytes::from(vec![i; 10])).collect();
        mem.rx.extend(small.iter().cloned());
        mem.rx.push_back(Bytes::from(vec![9u8; 3 * BUF_SIZE + 1]));
        let big = vec![7u8; 3 * BUF_SIZE + 5];
        let task = tokio::spawn(async move {
            let r = splice_chunks(&mut a, &mut mem, false).await;
            (r, mem)
        });
        app.write_all(&big).await.unwrap();
        app.write_all(b"tail").await.unwrap();
        app.shutdown().await.unwrap();
        let mut back = Vec::new();
        app.read_to_end(&mut back).await.unwrap();
        let (r, mem) = task.await.unwrap();
        let mut want: Vec<u8> = small.iter().flat_map(|c| c.to_vec()).collect();
        want.extend(vec![9u8; 3 * BUF_SIZE + 1]);
        assert_eq!(back, want, "chunks reach the socket in order, whole");
        let sent: Vec<u8> = mem.got.iter().flat_map(|c| c.to_vec()).collect();
        assert_eq!(sent.len(), big.len() + 4);
        assert!(sent.ends_with(b"tail") && sent[..big.len()] == big[..]);
        assert!(mem.shut, "the app's end of input reaches the stream");
        assert_eq!(r.unwrap(), (big.len() as u64 + 4, want.len() as u64));
    }

    /// A resumable stream retains what it sends until acknowledged, and counts (and charges to
    /// its budget) the chunk's bytes: a small read kept as a view would hold its whole 65 KiB
    /// buffer for the sake of a few bytes (a service writing 16 KiB TLS records made every
    /// chunk hold four times its size). Only a read of at least half a buffer is a view; the
    /// buffer of a copied read is whole and unshared again.
    #[test]
    fn a_retained_chunk_holds_at_most_twice_its_size() {
        for n in [1, 100, MIN_ROOM, VIEW_FROM - 1, VIEW_FROM, BUF_SIZE] {
            let mut buf = BytesMut::with_capacity(SPARE_SIZE);
            buf.extend_from_slice(&vec![5u8; n]);
            let chunk = take_read(&mut buf);
            assert_eq!(chunk.len(), n);
            if n < VIEW_FROM {
                assert!(
                    buf.is_empty() && buf.try_reclaim(SPARE_SIZE),
                    "{n}: the buffer is free"
                );
            } else {
                assert!(
                    2 * chunk.len() >= SPARE_SIZE,
                    "{n}: a view is half its buffer or more"
                );
                assert!(
                    !buf.try_reclaim(SPARE_SIZE),
                    "{n}: the view still holds the buffer"
                );
            }
        }
    }

    /// The chunk copy (a forward's or a SOCKS5 app's bytes into its stream) counts what it
    /// reads, past the first read too.
    #[tokio::test]
    async fn bytes_read_by_the_chunk_copy_count_as_activity() {
        let _one = ONE_AT_A_TIME.lock().await;
        let (mut app, mut a) = pair().await;
        let before = activity();
        let mut stream = Mem::default();
        let big = vec![3u8; 200_000];
        let (copied, _) = tokio::join!(splice_chunks(&mut a, &mut stream, false), async {
            app.write_all(&big).await.unwrap();
            app.shutdown().await.unwrap();
        });
        copied.unwrap();
        assert_eq!(stream.got.iter().map(|c| c.len()).sum::<usize>(), big.len());
        assert_eq!(activity() - before, big.len() as u64);
    }

    /// A forward's first bytes go with its `OPEN` in the chunk copy too.
    #[tokio::test]
    async fn chunks_take_the_first_bytes_already_in_the_socket_in_the_first_poll() {
        let _one = ONE_AT_A_TIME.lock().await;
        let before = activity();
        let (_app, mut a) = app_that_wrote(b"hello");
        // Nothing to hand out and no end of input yet: a stream that never answers.
        let mut quiet = Mem {
            quiet: true,
            ..Mem::default()
        };
        {
            let copy = splice_chunks(&mut a, &mut quiet, true);
            tokio::pin!(copy);
            assert!(futures_util::poll!(copy.as_mut()).is_pending());
        }
        assert_eq!(quiet.got, vec![Bytes::from_static(b"hello")]);
        assert_eq!(buffers_in_use(), 0, "the first read's buffer went back");
        assert_eq!(
            activity() - before,
            5,
            "the first read counts as arrived bytes"
        );
    }

    /// Bytes both ways, half-close passed on, and no buffer held while the pair is idle.
    #[tokio::test]
    async fn idle_splice_holds_no_buffer() {
        let _one = ONE_AT_A_TIME.lock().await;
        let (mut app, a) = pair().await;
        let (b, mut svc) = pair().await;
        let task = tokio::spawn(async move {
            let (mut a, mut b) = (a, b);
            splice(&mut a, &mut b).await
        });
        let big = vec![7u8; 3 * BUF_SIZE + 5];
        app.write_all(&big).await.unwrap();
        let mut got = vec![0u8; big.len()];
        svc.read_exact(&mut got).await.unwrap();
        assert_eq!(got, big);
        svc.write_all(b"pong").await.unwrap();
        let mut four = [0u8; 4];
        app.read_exact(&mut four).await.unwrap();
        assert_eq!(&four, b"pong");
        // Idle now: both directions handed their buffers back.
        for _ in 0..100_000 {
            if buffers_in_use() == 0 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(buffers_in_use(), 0);
        app.shutdown().await.unwrap();
        let mut rest = Vec::new();
        svc.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        svc.shutdown().await.unwrap();
        let (up, down) = task.await.unwrap().unwrap();
        assert_eq!((up, down), (big.len() as u64, 4));
        assert_eq!(buffers_in_use(), 0);
    }
}
