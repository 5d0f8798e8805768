//! Just enough HTTP/1.1 for the gateway's one port: read a request head (bounded, with a
//! deadline enforced by the caller), answer with a short response, or switch to WebSocket.
//!
//! The gateway does not need a general HTTP server: it serves `/healthz` and two WebSocket
//! upgrade paths. Owning the head parsing keeps every limit explicit and lets the upgrade
//! answer 401/426/429 with a reason a human can read in `curl -v`.

use std::io;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest request head we read (proxies and load balancers add headers; 16 KiB is ample).
pub const MAX_HEAD: usize = 16 * 1024;
const MAX_HEADERS: usize = 64;

/// A parsed request head.
#[derive(Debug)]
pub struct RequestHead {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    /// Bytes read past the head (none for a well-behaved WebSocket client).
    pub leftover: Vec<u8>,
    /// The head as read, for handing the connection to a full HTTP server (the fallback
    /// transport) that must parse it again.
    pub raw: Vec<u8>,
}

impl RequestHead {
    /// The path without the query.
    pub fn path_only(&self) -> &str {
        self.path.split('?').next().unwrap_or("")
    }

    /// True when the query has `key=value`.
    pub fn query_has(&self, key: &str, value: &str) -> bool {
        self.path
            .split_once('?')
            .map(|(_, q)| {
                q.split('&')
                    .any(|kv| kv.split_once('=') == Some((key, value)))
            })
            .unwrap_or(false)
    }
}

impl RequestHead {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// True if a comma-separated header contains `token` (case-insensitive).
    pub fn header_has(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    #[error("connection closed before a complete request head")]
    Eof,
    #[error("request head larger than {MAX_HEAD} bytes")]
    TooLarge,
    #[error("malformed request head: {0}")]
    Malformed(String),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Reads one request head. The caller wraps this in a timeout.
pub async fn read_head<S: AsyncRead + Unpin>(io: &mut S) -> Result<RequestHead, HeadError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        let n = io.read(&mut chunk).await?;
        if n == 0 {
            return Err(HeadError::Eof);
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                let head = RequestHead {
                    method: req.method.unwrap_or("").to_string(),
                    path: req.path.unwrap_or("").to_string(),
                    headers: req
                        .headers
                        .iter()
                        .map(|h| {
                            (
                                h.name.to_string(),
                                String::from_utf8_lossy(h.value).into_owned(),
                            )
                        })
                        .collect(),
                    leftover: buf[len..].to_vec(),
                    raw: buf[..len].to_vec(),
                };
                return Ok(head);
            }
            Ok(httparse::Status::Partial) => {
                if buf.len() > MAX_HEAD {
                    return Err(HeadError::TooLarge);
                }
            }
            Err(e) => return Err(HeadError::Malformed(e.to_string())),
        }
    }
}

/// Writes a complete short response and closes our side.
pub async fn respond<S: AsyncWrite + Unpin>(
    io: &mut S,
    status: u16,
    extra_headers: &[(&str, &str)],
    body: &str,
) -> io::Result<()> {
    let mut out = format!(
        "HTTP/1.1 {status} {}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\ncache-control: no-store\r\n",
        reason_phrase(status),
        body.len()
    );
    for (k, v) in extra_headers {
        out.push_str(k);
        out.push_str(": ");
        out.push_str(v);
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    out.push_str(body);
    io.write_all(out.as_bytes()).await?;
    io.flush().await?;
    let _ = io.shutdown().await;
    Ok(())
}

/// Writes the `101 Switching Protocols` answer to a WebSocket upgrade.
pub async fn switch_to_websocket<S: AsyncWrite + Unpin>(
    io: &mut S,
    accept: &str,
) -> io::Result<()> {
    switch_to_websocket_with(io, accept, &[]).await
}

/// [`switch_to_websocket`] with more headers (values must be header-safe: the caller makes
/// them, e.g. base64url).
pub async fn switch_to_websocket_with<S: AsyncWrite + Unpin>(
    io: &mut S,
    accept: &str,
    extra: &[(&str, &str)],
) -> io::Result<()> {
    let mut more = String::new();
    for (k, v) in extra {
        more.push_str(&format!("{k}: {v}\r\n"));
    }
    let out = format!(
        "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: {accept}\r\n{more}\r\n"
    );
    io.write_all(out.as_bytes()).await?;
    io.flush().await
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_head_split_over_reads_parses_and_keeps_leftover_bytes() {
        let (mut a, mut b) = tokio::io::duplex(64);
        tokio::spawn(async move {
            for part in [
                "GET /agent HTTP/1.1\r\nHost: x\r\nUpg",
                "rade: websocket\r\n\r\nEXTRA",
            ] {
                a.write_all(part.as_bytes()).await.unwrap();
            }
        });
        let head = read_head(&mut b).await.unwrap();
        assert_eq!(head.path, "/agent");
        assert_eq!(head.header("upgrade"), Some("websocket"));
        assert_eq!(head.leftover, b"EXTRA");
    }

    #[tokio::test]
    async fn an_endless_head_is_refused_not_buffered() {
        let (mut a, mut b) = tokio::io::duplex(4096);
        tokio::spawn(async move {
            let _ = a.write_all(b"GET / HTTP/1.1\r\n").await;
            loop {
                if a.write_all(b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n")
                    .await
                    .is_err()
                {
                    break;
                }
            }
        });
        assert!(matches!(
            read_head(&mut b).await,
            Err(HeadError::TooLarge) | Err(HeadError::Malformed(_))
        ));
    }

    #[tokio::test]
    async fn garbage_is_a_malformed_head() {
        let (mut a, mut b) = tokio::io::duplex(4096);
        a.write_all(b"\x16\x03\x01\x02\x00garbage\r\n\r\n")
            .await
            .unwrap();
        assert!(matches!(
            read_head(&mut b).await,
            Err(HeadError::Malformed(_))
        ));
    }
}
