//! `sallyport connect HOST PORT`: one tunnelled connection on stdin/stdout, for ssh's
//! `ProxyCommand` (`ssh -o ProxyCommand='sallyport connect %h %p' git.internal`).
//!
//! It goes through the running agent's SOCKS5 port, so it reuses the agent's warm session
//! (no TLS handshake per ssh). When no agent is running, it opens its own session with the
//! agent configuration.

use crate::config::AgentConfig;
use std::net::SocketAddr;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("the agent at {agent} refused {target}: {reason}")]
    Refused {
        agent: SocketAddr,
        target: String,
        reason: &'static str,
    },
    #[error("the agent at {0} does not speak SOCKS5 without authentication")]
    Socks(SocketAddr),
    #[error("no agent is listening at {agent} and {why}")]
    NoAgent { agent: SocketAddr, why: String },
}

fn socks_reason(code: u8) -> &'static str {
    match code {
        0x02 => "not allowed by policy",
        0x03 => "network unreachable",
        0x04 => "host unreachable, unknown, or no connector serves it",
        0x05 => "connection refused",
        0x06 => "timed out",
        0x07 => "command not supported",
        0x08 => "address type not supported",
        _ => "tunnel unavailable or general failure",
    }
}

/// SOCKS5 CONNECT by name through the local agent.
pub async fn via_agent(
    agent: SocketAddr,
    host: &str,
    port: u16,
) -> Result<TcpStream, ConnectError> {
    let mut s = TcpStream::connect(agent).await?;
    s.write_all(&[5, 1, 0]).await?;
    let mut sel = [0u8; 2];
    s.read_exact(&mut sel).await?;
    if sel != [5, 0] {
        return Err(ConnectError::Socks(agent));
    }
    let mut req = vec![5, 1, 0];
    match host.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(v4)) => {
            req.push(1);
            req.extend_from_slice(&v4.octets());
        }
        Ok(std::net::IpAddr::V6(v6)) => {
            req.push(4);
            req.extend_from_slice(&v6.octets());
        }
        Err(_) => {
            let h = host.as_bytes();
            if h.is_empty() || h.len() > 255 {
                return Err(ConnectError::Refused {
                    agent,
                    target: format!("{host}:{port}"),
                    reason: "bad host name",
                });
            }
            req.push(3);
            req.push(h.len() as u8);
            req.extend_from_slice(h);
        }
    }
    req.extend_from_slice(&port.to_be_bytes());
    s.write_all(&req).await?;
    let mut head = [0u8; 4];
    s.read_exact(&mut head).await?;
    if head[1] != 0 {
        return Err(ConnectError::Refused {
            agent,
            target: format!("{host}:{port}"),
            reason: socks_reason(head[1]),
        });
    }
    let skip = match head[3] {
        1 => 4 + 2,
        4 => 16 + 2,
        3 => {
            let mut l = [0u8; 1];
            s.read_exact(&mut l).await?;
            l[0] as usize + 2
        }
        _ => return Err(ConnectError::Socks(agent)),
    };
    let mut rest = vec![0u8; skip];
    s.read_exact(&mut rest).await?;
    Ok(s)
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
