//! The read buffer under TLS that exists only while bytes wait in it.
//!
//! rustls reads at most 4 KiB per call, so a buffer under it turns sixteen syscalls per 64 KiB
//! frame into one (measured when it came: ~20 % less CPU per byte on the chain; in the round of
//! 2125684, without it the chain was within ±4 %, the copy it adds weighing about what the syscalls
//! it saves did: docs/benchmarks.md, "A send queue in front of the stream"). A plain `BufReader`
//! keeps its buffer for the connection's life, though: 64 KiB for every idle session, which is most
//! of what an idle desktop costs a DMZ. [`ReadBuffer`] takes its buffer when a read finds it empty
//! and gives it back as soon as the socket has nothing more (the read is pending, or failed): an
//! idle connection holds no buffer, a busy one keeps one until it drains. The buffers are those of
//! `tunnel::splice`'s small shared pool.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tunnel::splice::{give_buffer, take_buffer};

/// How much [`ReadBuffer`] reads at once (one buffer of the shared pool).
pub const TLS_READ_BUFFER: usize = tunnel::splice::BUF_SIZE;

/// A buffered reader (writes pass straight through) whose buffer lives only while bytes wait.
/// Buffers come from, and go back to, the pool that `tunnel::splice` keeps for its copy loop:
/// a busy connection whose socket drains between bursts does not go to the allocator each time.
#[derive(Debug)]
pub struct ReadBuffer<R> {
    inner: R,
    /// `buf[pos..filled]` wait to be read; `None` while nothing waits.
    buf: Option<Box<[u8]>>,
    pos: usize,
    filled: usize,
}

impl<R> ReadBuffer<R> {
    pub fn new(inner: R) -> ReadBuffer<R> {
        ReadBuffer {
            inner,
            buf: None,
            pos: 0,
            filled: 0,
        }
    }

    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    /// Bytes read from the socket that wait to be read from here (tests).
    pub fn buffered(&self) -> usize {
        self.filled - self.pos
    }

    /// Memory held by the buffer now (tests): 0 between bursts.
    pub fn held(&self) -> usize {
        self.buf.as_ref().map_or(0, |b| b.len())
    }

    /// Gives the buffer back to the pool.
    fn release(&mut self) {
        (self.pos, self.filled) = (0, 0);
        if let Some(b) = self.buf.take() {
            give_buffer(b);
        }
    }
}

impl<R> Drop for ReadBuffer<R> {
    fn drop(&mut self) {
        self.release();
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for ReadBuffer<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if me.pos == me.filled {
            if out.remaining() >= TLS_READ_BUFFER {
                // The caller's buffer is as large: no copy, and nothing to keep.
                me.release();
                return Pin::new(&mut me.inner).poll_read(cx, out);
            }
            // Kept while the socket keeps delivering; taken from the pool after an idle spell.
            let buf = me.buf.get_or_insert_with(take_buffer);
            let mut rb = ReadBuf::new(buf);
            match Pin::new(&mut me.inner).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) if !rb.filled().is_empty() => {
                    (me.pos, me.filled) = (0, rb.filled().len());
                }
                other => {
                    // Pending (idle), end of file or an error: give the buffer back.
                    me.release();
                    return other;
                }
            }
        }
        let buf = me.buf.as_deref().unwrap_or_default();
        let n = out.remaining().min(me.filled - me.pos);
        out.put_slice(&buf[me.pos..me.pos + n]);
        me.pos += n;
        Poll::Ready(Ok(()))
    }
}

impl<R: AsyncWrite + Unpin> AsyncWrite for ReadBuffer<R> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An idle session kept a 64 KiB read buffer for its whole life (169 KiB per idle desktop
    /// at the DMZ): the buffer must be gone once the socket has nothing more to give.
    #[tokio::test]
    async fn an_idle_connection_holds_no_read_buffer() {
        let (a, mut b) = tokio::io::duplex(256 * 1024);
        let mut r = ReadBuffer::new(a);
        assert_eq!(r.held(), 0);
        let data: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        b.write_all(&data).await.unwrap();
        let mut got = vec![0u8; data.len()];
        let mut small = [0u8; 4096];
        let mut at = 0;
        while at < data.len() {
            let n = r.read(&mut small).await.unwrap();
            got[at..at + n].copy_from_slice(&small[..n]);
            at += n;
        }
        assert_eq!(got, data);
        // Bytes read ahead are kept until read.
        b.write_all(&[7u8; 10]).await.unwrap();
        assert_eq!(r.read(&mut small[..3]).await.unwrap(), 3);
        assert_eq!(r.buffered(), 7);
        assert!(r.held() >= 7);
        assert_eq!(r.read(&mut small).await.unwrap(), 7);
        // Now idle: the next read is pending, and the buffer is given back.
        let pending =
            tokio::time::timeout(std::time::Duration::from_millis(20), r.read(&mut small));
        assert!(pending.await.is_err());
        assert_eq!(r.held(), 0);
        drop(b);
        assert_eq!(r.read(&mut small).await.unwrap(), 0);
    }
}
