//! `sallyport connect HOST PORT`: one tunnelled connection on stdin/stdout, for ssh's
//! `ProxyCommand` (`ssh -o ProxyCommand='sallyport connect %h %p' git.internal`).
//!
//! It goes through the running agent's SOCKS5 port, so it reuses the agent's warm session
//! (no TLS handshake per ssh). When no agent is running, it opens its own session with the
//! agent configuration.

use crate::config::AgentConfig;
use std::net::SocketAddr;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Debug, thiserror::Error)]
pub enum ProxyCommandError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The agent answered the SOCKS5 request with a refusal (policy, no connector, refused…).
    #[error("{0}")]
    Refused(#[from] egress::ProxyError),
    #[error("no agent is listening at {agent} and {why}")]
    NoAgent { agent: SocketAddr, why: String },
    /// The agent refused because it has no session to the gateway; `why` is its own reason
    /// (from its control socket, as `sallyport status` shows it).
    #[error("the agent at {agent} has no session to the gateway: {why}")]
    AgentOffline { agent: SocketAddr, why: String },
}

/// SOCKS5 CONNECT by name through the local agent (the same client the egress uses for
/// upstream SOCKS5 proxies).
pub async fn via_agent(
    agent: SocketAddr,
    host: &str,
    port: u16,
) -> Result<TcpStream, ProxyCommandError> {
    let mut s = TcpStream::connect(agent).await?;
    let _ = s.set_nodelay(true);
    if let Err(e) =
        egress::proxy::socks5_connect(&mut s, &format!("agent {agent}"), host, port, None).await
    {
        // A SOCKS5 reply code says little ("general failure"): when the agent is offline, its
        // own reason says what is wrong.
        return Err(match offline_reason().await {
            Some(why) => ProxyCommandError::AgentOffline { agent, why },
            None => e.into(),
        });
    }
    Ok(s)
}

/// Why this user's running agent has no gateway session, from its control socket (`None`
/// when it has one, or cannot be asked).
async fn offline_reason() -> Option<String> {
    let path = crate::status::control_path()?;
    let text = crate::status::query(&path).await.ok()?;
    text.lines().find_map(|l| {
        l.strip_prefix("connected: no (")?
            .strip_suffix(')')
            .map(str::to_string)
    })
}

/// Copies stdin → `io` and `io` → stdout until the far end closes.
pub async fn pipe_stdio<S: AsyncRead + AsyncWrite + Unpin>(io: S) -> std::io::Result<()> {
    let (mut r, mut w) = tokio::io::split(io);
    let up = async {
        let mut stdin = tokio::io::stdin();
        let _ = tokio::io::copy(&mut stdin, &mut w).await;
        let _ = w.shutdown().await;
    };
    let down = async {
        let mut stdout = tokio::io::stdout();
        let r = tokio::io::copy(&mut r, &mut stdout).await;
        let _ = stdout.flush().await;
        r.map(|_| ())
    };
    tokio::select! {
        r = down => r,
        _ = async { up.await; std::future::pending::<()>().await } => Ok(()),
    }
}

/// Opens its own session when no agent is running (`config` must name gateway and token).
pub async fn direct(config: &AgentConfig, host: &str, port: u16) -> Result<tunnel::Stream, String> {
    let session = crate::pool::connect(config)
        .await
        .map_err(|e| e.to_string())?;
    let stream = session
        .open(tunnel::Dest::new(host, port), tunnel::Meta::default())
        .map_err(|e| e.to_string())?;
    tokio::time::timeout(config.open_timeout, stream.opened())
        .await
        .map_err(|_| format!("no answer for {host}:{port}"))?
        .map_err(|e| e.to_string())?;
    Ok(stream)
}
