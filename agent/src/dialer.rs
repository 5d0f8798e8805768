//! The bridge between the local front ends (`socks/`) and the tunnel: a [`socks::Dialer`] that
//! opens a stream on the gateway session and maps tunnel errors onto the front ends' error
//! kinds (and so onto SOCKS5 reply codes and HTTP statuses).

use crate::pool::Pool;
use socks::{BoxIo, DialError, DialErrorKind, DialFuture, Dialer, OpenMode, Target};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tracing::debug;
use tunnel::{meta, Dest, ErrorCode, Meta, Stream, StreamError};

pub struct TunnelDialer {
    pub pool: Arc<Pool>,
    /// Which front end this dialer serves (`socks5`, `http`, `forward`), for the audit log.
    pub front: &'static str,
    /// How long an app connection waits for a gateway session.
    pub session_wait: Duration,
    /// How long a confirmed open waits for `OPEN_OK`.
    pub open_timeout: Duration,
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
        let stream = loop {
            let session = self
                .pool
                .session(self.session_wait)
                .await
                .map_err(|e| DialError::new(DialErrorKind::Unavailable, e))?;
            let mut m = Meta::default();
            m.set(meta::FRONT, self.front);
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
        };
        Box::pin(async move {
            let confirm = mode == OpenMode::Confirmed;
            let stream = this.open(&target, confirm).await?;
            Ok(if confirm {
                Box::new(stream) as BoxIo
            } else {
                Box::new(EarlyStream(stream)) as BoxIo
            })
        })
    }
}

/// A stream opened without waiting: a later refusal surfaces as an I/O error that carries the
/// [`DialError`], so the HTTP front end still answers 403/502/504 with the reason.
pub struct EarlyStream(pub Stream);

fn map_io(e: io::Error) -> io::Error {
    let dial = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<StreamError>())
        .map(dial_error);
    match dial {
        Some(d) => io::Error::other(d),
        None => e,
    }
}

impl AsyncRead for EarlyStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0)
            .poll_read(cx, buf)
            .map_err(map_io)
    }
}

impl AsyncWrite for EarlyStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0)
            .poll_write(cx, buf)
            .map_err(map_io)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}
