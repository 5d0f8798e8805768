//! `sallyport status`: what the running agent is doing, from a control socket only the same user
//! can reach.
//!
//! The agent listens on a Unix socket in its per-user config folder (`agent.sock`, the folder
//! mode 0700 and the socket 0600), and checks the connecting process's uid (`SO_PEERCRED`) as
//! well: nobody else can read which gateway, proxy and destinations this user has. A connection
//! gets the status as `key: value` lines and is closed. On Windows the same text is served on a
//! named pipe only the user's SID may open, and both ends check each other's user
//! ([`windows`]).

use crate::config::AgentConfig;
use crate::pool::Pool;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

pub mod windows;

/// The control socket of the agent of this user (on Windows, the name of its status pipe).
pub fn control_path() -> Option<PathBuf> {
    #[cfg(windows)]
    {
        windows::pipe_of_this_user()
    }
    #[cfg(not(windows))]
    {
        crate::config::default_config_path().and_then(|p| p.parent().map(|d| d.join("agent.sock")))
    }
}

/// The status text.
pub fn render(
    config: &AgentConfig,
    pool: &Pool,
    listening: &[(&'static str, SocketAddr)],
) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "gateway: {}", config.gateway);
    match pool.current() {
        Some(s) if !s.is_closed() => {
            let st = s.stats();
            let _ = writeln!(
                out,
                "connected: yes (gateway instance {})",
                s.peer().instance_id
            );
            if let Some(rtt) = st.rtt {
                let _ = writeln!(out, "latency: {:.1} ms", rtt.as_secs_f64() * 1000.0);
            }
            let _ = writeln!(out, "open streams: {}", st.streams);
            let _ = writeln!(out, "bytes: {} in, {} out", st.bytes_in, st.bytes_out);
        }
        _ => {
            let _ = writeln!(
                out,
                "connected: no ({})",
                pool.last_error().unwrap_or_else(|| "connecting".into())
            );
        }
    }
    // Streams that outlive their session (docs/protocol.md, "Streams that survive").
    let r = tunnel::resumable::stats();
    let _ = writeln!(
        out,
        "resumable streams: {} ({} suspended now), resumed {} times, {} lost past the grace",
        r.live, r.suspended, r.resumed, r.expired
    );
    match config.way.remembered() {
        Some(c) => {
            let _ = writeln!(out, "way out: {c}");
        }
        None => {
            let _ = writeln!(out, "way out: (none found yet on this network)");
        }
    }
    let events = pool.events();
    for (name, e) in [
        ("last network change", events.change),
        ("last wake", events.wake),
    ] {
        if let Some((at, what, outcome)) = e {
            let at = humantime::format_rfc3339_seconds(at);
            let _ = writeln!(out, "{name}: {at} ({what}; {outcome})");
        }
    }
    for (front, addr) in listening {
        let _ = writeln!(out, "listening: {front} {addr}");
    }
    out
}

/// Serves the control socket until `shutdown`. A socket in use by another running agent is left
/// alone (status then shows that one); a stale one is replaced.
#[cfg(unix)]
pub async fn serve(
    path: PathBuf,
    config: std::sync::Arc<AgentConfig>,
    pool: std::sync::Arc<Pool>,
    listening: Vec<(&'static str, SocketAddr)>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    use std::os::unix::fs::PermissionsExt;
    use tokio::io::AsyncWriteExt;
    if let Some(dir) = path.parent() {
        if std::fs::create_dir_all(dir).is_err() {
            return;
        }
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
    }
    if path.exists() {
        if tokio::net::UnixStream::connect(&path).await.is_ok() {
            tracing::warn!(path = %path.display(), "another agent answers on the control socket; `sallyport status` shows that one");
            return;
        }
        let _ = std::fs::remove_file(&path);
    }
    let listener = match tokio::net::UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "no control socket: `sallyport status` will not work");
            return;
        }
    };
    let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
    let me = crate::peer::my_uid();
    loop {
        let (mut s, _) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
        };
        let uid = s.peer_cred().ok().map(|c| c.uid());
        if me.is_some() && uid != me {
            tracing::warn!(?uid, "status request from another user refused");
            continue;
        }
        let text = render(&config, &pool, &listening);
        tokio::spawn(async move {
            let _ = s.write_all(text.as_bytes()).await;
            let _ = s.shutdown().await;
        });
    }
    let _ = std::fs::remove_file(&path);
}

#[cfg(windows)]
pub use windows::serve;

/// The agent's answer on the control socket or pipe: at most 64 KiB, within 5 s.
#[cfg(any(unix, windows))]
async fn read_answer(r: impl tokio::io::AsyncRead + Unpin) -> Result<String, String> {
    use tokio::io::AsyncReadExt;
    let mut text = String::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(5),
        r.take(64 * 1024).read_to_string(&mut text),
    )
    .await
    .map_err(|_| "the agent did not answer within 5 s".to_string())?
    .map_err(|e| e.to_string())?;
    Ok(text)
}

/// `sallyport status`: asks the running agent; `Err` says why there is no answer.
pub async fn query(path: &Path) -> Result<String, String> {
    #[cfg(unix)]
    {
        let s = tokio::net::UnixStream::connect(path).await.map_err(|e| {
            format!(
                "no agent is running for this user ({}: {e}); start it with `sallyport run` or `sallyport service start`",
                path.display()
            )
        })?;
        read_answer(s).await
    }
    #[cfg(windows)]
    {
        windows::query(path).await
    }
    #[cfg(not(any(unix, windows)))]
    {
        let _ = path;
        Err("`sallyport status` is not available on this system yet".into())
    }
}
