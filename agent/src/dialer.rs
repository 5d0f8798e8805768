//! The bridge between the local front ends (`socks/`) and the tunnel: a [`socks::Dialer`] that
//! opens a stream on the gateway session and maps tunnel errors onto the front ends' error
//! kinds (and so onto SOCKS5 reply codes and HTTP statuses).

use crate::known::KnownTargets;
use crate::pool::Pool;
use bytes::Bytes;
use socks::{BoxIo, DialError, DialErrorKind, DialFuture, Dialer, OpenMode, Target};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tracing::debug;
use tunnel::resumable::{keys, Reattached, Reopen, ReopenError, ReopenFuture, Resumable, Settings};
use tunnel::{meta, Dest, ErrorCode, Meta, Stream, StreamError};

pub struct TunnelDialer {
    pub pool: Arc<Pool>,
    /// Which front end this dialer serves (`socks5`, `http`, `forward`), for the audit log.
    pub front: &'static str,
    /// How long an app connection waits for a gateway session.
    pub session_wait: Duration,
    /// How long a confirmed open waits for `OPEN_OK`.
    pub open_timeout: Duration,
    /// How long a stream whose session was lost keeps trying to resume.
    pub resume_grace: Duration,
    /// The destinations that opened lately (one set for all the agent's front ends): a SOCKS5
    /// or `CONNECT` client to one of them is answered at once ([`Dialer::known`]).
    pub known: Arc<KnownTargets>,
}

/// How a resumable stream of the agent asks for a new attachment: on whatever session the pool
/// has now, `OPEN` to the same target with the ticket, the attachment number and our offset.
struct AgentReopen {
    pool: Arc<Pool>,
    target: Target,
    front: &'static str,
    /// Attempts that got no answer within [`ATTEMPT`], kept open: the connector may have taken
    /// one after all (slow under a reconnect storm), and a reset of its current attachment
    /// would end the stream there. The next attempt supersedes it (the connector accepts only
    /// a higher attachment). They are let go once an attempt is answered (the connector then
    /// holds that one, and refuses a lower one that arrives late), or when the stream ends.
    unanswered: Arc<std::sync::Mutex<Vec<Stream>>>,
}

impl AgentReopen {
    fn new(pool: Arc<Pool>, target: Target, front: &'static str) -> AgentReopen {
        AgentReopen {
            pool,
            target,
            front,
            unanswered: Default::default(),
        }
    }
}

/// Unanswered attempts kept per stream ([`AgentReopen::unanswered`]). Each holds a stream at
/// the DMZ (its per-token and global stream limits) until it is answered or its path fails; a
/// storm of resumes must not multiply that by the attempts of a whole grace (about 15). Past
/// it the oldest is reset: it could still be the connector's attachment only if the connector
/// took it and none of the newer ones it was sent before, seconds apart.
const MAX_UNANSWERED: usize = 2;

/// Keeps `stream`, an attempt that got no answer in time, among `kept`, and lets go of those
/// that have ended since (refused, superseded, or their session lost), and of the oldest past
/// [`MAX_UNANSWERED`].
fn keep_unanswered(kept: &std::sync::Mutex<Vec<Stream>>, stream: Stream) {
    let mut kept = kept.lock().unwrap_or_else(|e| e.into_inner());
    kept.retain(|s| !s.has_failed());
    kept.push(stream);
    let over = kept.len().saturating_sub(MAX_UNANSWERED);
    kept.drain(..over);
}

/// One resume attempt gets this long once it has a session (a path that died without a word
/// must not eat the grace); the next attempt has a higher attachment number.
const ATTEMPT: Duration = Duration::from_secs(3);

/// How long an attempt waits for the pool's next session: longer than the spread of the first
/// reconnect after a lost session (`uplink::Backoff::SPREAD`).
const SESSION_WAIT: Duration = Duration::from_secs(8);

impl Reopen for AgentReopen {
    fn reopen(&self, ticket: &str, attach: u32, recv: u64) -> ReopenFuture {
        let pool = self.pool.clone();
        let dest = Dest::new(self.target.host.clone(), self.target.port);
        let front = self.front;
        let ticket = ticket.to_string();
        let unanswered = self.unanswered.clone();
        Box::pin(async move {
            // Waiting for a session is not the attempt's time: after a lost session the pool
            // spreads its first reconnect over up to `Backoff::SPREAD`, and a resume that gave up
            // just before it came back would wait for its next retry.
            let session = pool
                .session(SESSION_WAIT)
                .await
                .map_err(ReopenError::Retry)?;
            if !session.resume_negotiated() {
                return Err(ReopenError::Retry(
                    "this gateway does not resume streams (an older version)".into(),
                ));
            }
            let mut m = Meta::default();
            m.set(meta::FRONT, front);
            m.set(keys::RESUME, ticket);
            m.set(keys::ATTACH, attach.to_string());
            m.set(keys::RECV, recv.to_string());
            let stream = session
                .open(dest, m)
                .map_err(|e| ReopenError::Retry(e.to_string()))?;
            match tokio::time::timeout(ATTEMPT, stream.opened()).await {
                Ok(Ok(())) => {}
                Ok(Err(StreamError::Refused { code, reason })) => {
                    return Err(match code {
                        ErrorCode::NoRoute | ErrorCode::Limit | ErrorCode::TimedOut => {
                            ReopenError::Retry(reason)
                        }
                        _ => ReopenError::Gone(reason),
                    })
                }
                Ok(Err(e)) => return Err(ReopenError::Retry(e.to_string())),
                Err(_) => {
                    // Not reset: see `AgentReopen::unanswered`.
                    keep_unanswered(&unanswered, stream);
                    return Err(ReopenError::Retry(format!("no answer within {ATTEMPT:?}")));
                }
            }
            let peer_recv = stream
                .open_meta()
                .get(keys::RECV)
                .and_then(tunnel::resume::parse_offset)
                .ok_or_else(|| {
                    ReopenError::Gone("the gateway's answer carries no offset".into())
                })?;
            unanswered.lock().unwrap_or_else(|e| e.into_inner()).clear();
            Ok(Reattached { stream, peer_recv })
        })
    }
}

pub fn kind_for(code: ErrorCode) -> DialErrorKind {
    match code {
        ErrorCode::NotAllowed | ErrorCode::Unauthorized => DialErrorKind::NotAllowed,
        ErrorCode::NoRoute => DialErrorKind::NoRoute,
        ErrorCode::Refused => DialErrorKind::Refused,
        ErrorCode::Unreachable => DialErrorKind::Unreachable,
        ErrorCode::HostNotFound => DialErrorKind::HostNotFound,
        ErrorCode::TimedOut => DialErrorKind::TimedOut,
        ErrorCode::Limit | ErrorCode::SessionLost | ErrorCode::Shutdown => {
            DialErrorKind::Unavailable
        }
        _ => DialErrorKind::Other,
    }
}

fn dial_error(e: &StreamError) -> DialError {
    let message = match e {
        StreamError::Refused { reason, .. } => reason.clone(),
        other => other.to_string(),
    };
    DialError::new(kind_for(e.code()), message)
}

impl TunnelDialer {
    /// Opens a tunnel stream to `target`; with `confirm`, waits for the far end's answer.
    pub async fn open(&self, target: &Target, confirm: bool) -> Result<Stream, DialError> {
        self.open_as(target, confirm, false).await
    }

    /// [`TunnelDialer::open`], asking for a resumable stream when `resumable` and the session
    /// negotiated resume.
    async fn open_as(
        &self,
        target: &Target,
        confirm: bool,
        resumable: bool,
    ) -> Result<Stream, DialError> {
        let stream = loop {
            let session = self
                .pool
                .session(self.session_wait)
                .await
                .map_err(|e| DialError::new(DialErrorKind::Unavailable, e))?;
            let mut m = Meta::default();
            m.set(meta::FRONT, self.front);
            if resumable && session.resume_negotiated() {
                m.set(keys::RESUME, "new");
            }
            match session.open(Dest::new(target.host.clone(), target.port), m) {
                // The gateway said GOAWAY after the pool lent this session: the pool lends
                // only sessions that are not going away, so this waits for the next one.
                Err(StreamError::GoingAway) => continue,
                r => break r.map_err(|e| dial_error(&e))?,
            }
        };
        if confirm {
            match tokio::time::timeout(self.open_timeout, stream.opened()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    debug!(%target, error = %e, "stream refused");
                    return Err(dial_error(&e));
                }
                Err(_) => {
                    return Err(DialError::new(
                        DialErrorKind::TimedOut,
                        format!("no answer for {target} within {:?}", self.open_timeout),
                    ))
                }
            }
        }
        Ok(stream)
    }
}

impl Dialer for TunnelDialer {
    fn dial(&self, target: Target, mode: OpenMode) -> DialFuture {
        let this = TunnelDialer {
            pool: self.pool.clone(),
            front: self.front,
            session_wait: self.session_wait,
            open_timeout: self.open_timeout,
            resume_grace: self.resume_grace,
            known: self.known.clone(),
        };
        Box::pin(async move {
            let confirm = mode == OpenMode::Confirmed;
            // `resume_grace = 0s` turns resumable streams off (plain streams, as before).
            let resumable = !this.resume_grace.is_zero();
            let stream = match this.open_as(&target, confirm, resumable).await {
                Ok(stream) => stream,
                Err(e) => {
                    this.known.failed(&target);
                    return Err(e);
                }
            };
            if confirm {
                this.known.opened(&target, std::time::Instant::now());
            }
            // A refusal that comes after the app was answered (an early open) is seen by the
            // stream: the destination is forgotten there.
            let forget = Some((this.known.clone(), target.clone()));
            let asked = resumable && stream.resume_negotiated();
            Ok(match (asked, confirm) {
                (true, _) => {
                    let buffer = tunnel::resumable::buffer_for(
                        stream.window_max(),
                        stream.max_frame() as u32,
                    );
                    let reopen = AgentReopen::new(this.pool.clone(), target.clone(), this.front);
                    let end = Resumable::opener(
                        stream,
                        Box::new(reopen),
                        Settings {
                            buffer,
                            grace: this.resume_grace,
                            charge: None,
                        },
                    );
                    if confirm {
                        Box::new(end) as BoxIo
                    } else {
                        Box::new(EarlyStream::new(end, forget)) as BoxIo
                    }
                }
                (false, true) => Box::new(stream) as BoxIo,
                (false, false) => Box::new(EarlyStream::new(stream, forget)) as BoxIo,
            })
        })
    }

    fn known(&self, target: &Target) -> bool {
        self.known.is_known(target, std::time::Instant::now())
    }
}

/// A stream opened without waiting. A failure before the far end sent a byte (a refused
/// open, typically) surfaces as an I/O error that carries the [`DialError`] itself
/// ([`socks::dial_error_of`]): the HTTP front end answers 403/502/504 with the reason, and a
/// SOCKS5 or `CONNECT` client answered early has its connection reset. A failure after the far
/// end answered carries it one level down ([`AfterAnswer`]), as a stream that failed, not an
/// open. A refused open (`OPEN_ERR`) also forgets its destination ([`KnownTargets`]).
pub struct EarlyStream<S = Stream> {
    inner: S,
    forget: Option<(Arc<KnownTargets>, Target)>,
    /// The far end sent bytes: the open went through.
    answered: bool,
}

/// The failure of an early stream after the far end answered: the [`DialError`] is its source
/// (the HTTP front end still finds it), but [`socks::dial_error_of`] does not take it for a
/// failed open.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct AfterAnswer(#[source] DialError);

impl<S> EarlyStream<S> {
    fn new(inner: S, forget: Option<(Arc<KnownTargets>, Target)>) -> EarlyStream<S> {
        EarlyStream {
            inner,
            forget,
            answered: false,
        }
    }

    /// The stream's I/O error, with a tunnel error turned into the [`DialError`] the front ends
    /// read; a refused open (`OPEN_ERR`) forgets its destination.
    fn map_io(&mut self, e: io::Error) -> io::Error {
        let stream_error = e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<StreamError>());
        if matches!(stream_error, Some(StreamError::Refused { .. })) {
            if let Some((known, target)) = self.forget.take() {
                known.failed(&target);
            }
        }
        match stream_error.map(dial_error) {
            Some(d) if self.answered => io::Error::other(AfterAnswer(d)),
            Some(d) => io::Error::other(d),
            None => e,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for EarlyStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        this.answered |= buf.filled().len() > before;
        r.map_err(|e| this.map_io(e))
    }
}

impl<S: tunnel::Chunks> tunnel::Chunks for EarlyStream<S> {
    fn poll_read_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        let r = self.inner.poll_read_chunk(cx);
        self.answered |= matches!(&r, Poll::Ready(Ok(Some(b))) if !b.is_empty());
        r.map_err(|e| self.map_io(e))
    }
    fn poll_write_chunk(
        &mut self,
        cx: &mut Context<'_>,
        data: &mut Bytes,
    ) -> Poll<io::Result<usize>> {
        let r = self.inner.poll_write_chunk(cx, data);
        r.map_err(|e| self.map_io(e))
    }
}

/// Joins an app's TCP connection and the stream dialed for it. A tunnel stream moves its bytes
/// as chunks, with no copy of ours ([`tunnel::splice_chunks`]); any other stream (a test
/// dialer's socket) goes through the copy loop. `fresh`: the app writes first (a forward), so
/// its first bytes are read at once, to leave with the `OPEN`.
pub async fn splice_app(
    tcp: &mut TcpStream,
    stream: &mut BoxIo,
    fresh: bool,
) -> io::Result<(u64, u64)> {
    let any = stream.as_mut().as_any_mut();
    if let Some(s) = any.downcast_mut::<EarlyStream<Resumable>>() {
        return tunnel::splice_chunks(tcp, s, fresh).await;
    }
    if let Some(s) = any.downcast_mut::<EarlyStream<Stream>>() {
        return tunnel::splice_chunks(tcp, s, fresh).await;
    }
    if let Some(s) = any.downcast_mut::<Resumable>() {
        return tunnel::splice_chunks(tcp, s, fresh).await;
    }
    if let Some(s) = any.downcast_mut::<Stream>() {
        return tunnel::splice_chunks(tcp, s, fresh).await;
    }
    if fresh {
        tunnel::splice_fresh(tcp, stream).await
    } else {
        tunnel::splice(tcp, stream).await
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for EarlyStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        Pin::new(&mut this.inner)
            .poll_write(cx, buf)
            .map_err(|e| this.map_io(e))
    }
    // A refusal may show first here (a resumable stream waiting for credit): mapped the same.
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        Pin::new(&mut this.inner)
            .poll_flush(cx)
            .map_err(|e| this.map_io(e))
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        Pin::new(&mut this.inner)
            .poll_shutdown(cx)
            .map_err(|e| this.map_io(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// A storm of slow resumes: each attempt given up on holds a stream at the DMZ until it is
    /// answered; a stream's attempts over a whole grace (about 15) must not all be kept.
    #[tokio::test]
    async fn attempts_given_up_on_are_kept_two_at_most_the_newest() {
        let (a, b) = tunnel::memory_pair(64);
        let (agent, connector) = tokio::join!(
            tunnel::Session::start(a, tunnel::Config::new(tunnel::Role::Agent, true)),
            tunnel::Session::start(b, {
                let mut c = tunnel::Config::new(tunnel::Role::Connector, false);
                c.accept_streams = true;
                c
            })
        );
        let (agent, _) = agent.unwrap();
        let (_connector, mut incoming) = connector.unwrap();
        let kept = std::sync::Mutex::new(Vec::new());
        let mut ids = Vec::new();
        for _ in 0..5 {
            let s = agent
                .open(Dest::new("db.internal", 5432), Meta::default())
                .unwrap();
            ids.push(s.id());
            keep_unanswered(&kept, s);
        }
        let kept: Vec<u32> = kept.lock().unwrap().iter().map(|s| s.id()).collect();
        assert_eq!(kept, ids[3..]);
        // The three let go were reset (the far end sees them fail); the two kept were not.
        let mut failed = 0;
        for _ in 0..5 {
            let s = incoming.accept().await.unwrap();
            tokio::task::yield_now().await;
            let t = tokio::time::timeout(std::time::Duration::from_millis(200), s.failure()).await;
            failed += usize::from(t.is_ok());
        }
        assert_eq!(failed, 3);
    }

    /// A stream whose reads and writes hold `data`/succeed, and whose flush and shutdown fail
    /// with `error` (as a resumable stream waiting for credit reports a refusal).
    struct Scripted {
        data: &'static [u8],
        error: fn() -> StreamError,
    }

    impl AsyncRead for Scripted {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            if self.data.is_empty() {
                return Poll::Ready(Err(io::Error::other((self.error)())));
            }
            buf.put_slice(self.data);
            self.data = &[];
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for Scripted {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            b: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Ok(b.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Err(io::Error::other((self.error)())))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Err(io::Error::other((self.error)())))
        }
    }

    fn refused() -> StreamError {
        StreamError::Refused {
            code: ErrorCode::Refused,
            reason: "connection refused by db.internal:5432".into(),
        }
    }

    fn reset() -> StreamError {
        StreamError::Reset {
            code: ErrorCode::Refused,
            reason: "reset by the service".into(),
        }
    }

    fn known_db() -> (Arc<KnownTargets>, Target) {
        let known = Arc::new(KnownTargets::default());
        let t = Target::new("db.internal", 5432);
        known.opened(&t, std::time::Instant::now());
        (known, t)
    }

    #[tokio::test]
    async fn a_refusal_that_shows_first_in_a_flush_still_forgets_the_destination_and_names_the_open(
    ) {
        let (known, t) = known_db();
        let mut s = EarlyStream::new(
            Scripted {
                data: b"",
                error: refused,
            },
            Some((known.clone(), t.clone())),
        );
        s.write_all(b"hello").await.unwrap();
        let e = s.flush().await.unwrap_err();
        assert!(socks::dial_error_of(&e).is_some(), "{e}");
        assert!(!known.is_known(&t, std::time::Instant::now()));
    }

    #[tokio::test]
    async fn a_stream_that_fails_after_the_far_end_answered_is_not_taken_for_a_failed_open() {
        use tokio::io::AsyncReadExt;
        let (known, t) = known_db();
        let mut s = EarlyStream::new(
            Scripted {
                data: b"220 ready",
                error: reset,
            },
            Some((known.clone(), t.clone())),
        );
        let mut got = Vec::new();
        let e = s.read_to_end(&mut got).await.unwrap_err();
        assert_eq!(got, b"220 ready");
        assert!(socks::dial_error_of(&e).is_none(), "{e}");
        // The HTTP front end still finds the reason one level down.
        let source = std::error::Error::source(e.get_ref().unwrap()).unwrap();
        assert!(source.downcast_ref::<DialError>().is_some());
        assert!(
            known.is_known(&t, std::time::Instant::now()),
            "a reset is no refusal"
        );
    }
}
