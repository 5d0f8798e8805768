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
//! Semantics are those of `copy_bidirectional`: end of input on one side is passed on as a write
//! shutdown of the other, each direction on its own (half-close works end to end), and the first
//! error of either direction ends both.

use std::any::Any;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
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
        match (ab, ba) {
            (Poll::Ready(up), Poll::Ready(down)) => Poll::Ready(Ok((up, down))),
            _ => Poll::Pending,
        }
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

    /// The tests below count the process-wide buffers in use: one at a time.
    static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    /// An app's first bytes, already in the socket when the copy starts, go on in the copy's
    /// first poll, before tokio's event loop has learnt the socket is readable: in the agent
    /// they then ride in the same batch as the stream's `OPEN` (one TLS record, not two). The
    /// copy used to wait for readiness first, which only the next turn of the loop brings.
    #[tokio::test]
    async fn first_bytes_already_in_the_socket_go_in_the_first_poll() {
        let _one = ONE_AT_A_TIME.lock().await;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut app = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (a, _) = l.accept().unwrap();
        std::io::Write::write_all(&mut app, b"hello").unwrap();
        // Wait (blocking, outside tokio) until the bytes are in the socket.
        let mut peek = [0u8; 5];
        while a.peek(&mut peek).unwrap() < 5 {}
        a.set_nonblocking(true).unwrap();
        // Registered now: tokio has not seen it readable yet.
        let mut a = TcpStream::from_std(a).unwrap();
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
