//! Linux: the kernel's route notifications on a `NETLINK_ROUTE` socket (read with tokio's
//! `AsyncFd`; parsed by [`super::rtnetlink`]), and the two clocks that tell sleep.

use super::rtnetlink::{self, Change};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// A route socket joined to the link, address and route groups.
pub struct RouteSocket(AsyncFd<Socket>);

impl RouteSocket {
    pub fn open() -> std::io::Result<RouteSocket> {
        let mut s = Socket::new(NETLINK_ROUTE)?;
        s.bind(&SocketAddr::new(0, rtnetlink::GROUPS))?;
        s.set_non_blocking(true)?;
        // SAFETY: the socket owns its descriptor (closed on drop) and `as_raw_fd` returns that
        // same descriptor for as long as the `AsyncFd` holds it.
        let fd = unsafe { AsyncFd::register_with_interest(s, Interest::READABLE) };
        Ok(RouteSocket(fd.map_err(|e| e.into_parts().1)?))
    }

    /// Sends a description of every change that [`Change::matters`] until `shutdown` (or a
    /// socket error, which is logged). Messages lost to a full socket buffer (`ENOBUFS`: a
    /// burst too big to keep) count as one change.
    pub async fn run(self, tx: mpsc::Sender<String>, shutdown: CancellationToken) {
        let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
        loop {
            let ready = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = self.0.readable() => r,
            };
            let mut guard = match ready {
                Ok(g) => g,
                Err(e) => {
                    tracing::warn!(error = %e, "the netlink route socket failed; network changes are no longer watched");
                    return;
                }
            };
            buf.clear();
            let read = guard.try_io(|s| s.get_ref().recv(&mut buf, 0));
            let changes: Vec<String> = match read {
                Err(_would_block) => continue,
                Ok(Ok(_)) => rtnetlink::parse(&buf)
                    .iter()
                    .filter(|c| c.matters())
                    .map(Change::to_string)
                    .collect(),
                Ok(Err(e)) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    vec!["more changes than the socket could hold".into()]
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "reading the netlink route socket failed; network changes are no longer watched");
                    return;
                }
            };
            for c in changes {
                // Full: the watcher has plenty pending already and will fire anyway.
                let _ = tx.try_send(c);
            }
        }
    }
}

pub enum Which {
    Monotonic,
    Boottime,
}

/// `CLOCK_MONOTONIC` (stops during sleep) or `CLOCK_BOOTTIME` (counts it).
pub fn clock(which: Which) -> Option<Duration> {
    let id = match which {
        Which::Monotonic => libc::CLOCK_MONOTONIC,
        Which::Boottime => libc::CLOCK_BOOTTIME,
    };
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    let r = unsafe { libc::clock_gettime(id, &mut ts) };
    if r != 0 {
        return None;
    }
    Some(Duration::new(
        u64::try_from(ts.tv_sec).ok()?,
        u32::try_from(ts.tv_nsec).ok()?,
    ))
}
