//! `sp-bufproxy`, the stand-in for a corporate proxy that buffers whole responses, behaves like
//! one: a slowly streamed response reaches the client only when complete (with a
//! `Content-Length`), a WebSocket upgrade never reaches the upstream as one, and a dead upstream
//! is a `502`. Each test runs the real binary against a raw-tokio upstream on loopback.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;

/// The proxy process, killed when the test ends (also on panic).
struct Proxy {
    child: Child,
    addr: SocketAddr,
}

impl Proxy {
    fn start(upstream: SocketAddr) -> Proxy {
        let mut child = Command::new(env!("CARGO_BIN_EXE_sp-bufproxy"))
            .args(["--listen", "127.0.0.1:0", "--upstream"])
            .arg(upstream.to_string())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn sp-bufproxy");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut line = String::new();
        let read = BufReader::new(stdout).read_line(&mut line);
        let addr = read.ok().and_then(|_| {
            line.trim()
                .strip_prefix("sp-bufproxy listening on ")
                .and_then(|a| a.parse().ok())
        });
        let Some(addr) = addr else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("unexpected first line from sp-bufproxy: {line:?}");
        };
        Proxy { child, addr }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads from `s` until the end of an HTTP head; returns the head and any bytes after it.
async fn read_head(s: &mut TcpStream) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end + 4]).into_owned();
            return (head, buf[end + 4..].to_vec());
        }
        let n = s.read(&mut chunk).await.expect("read head");
        assert!(
            n > 0,
            "connection closed before the head ended: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The value of header `name` in `head`, case-insensitively.
fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// A response as the client saw it: the head and a body of exactly `Content-Length` bytes.
async fn read_response(s: &mut TcpStream) -> (String, Vec<u8>) {
    let (head, mut body) = read_head(s).await;
    let len: usize = header(&head, "content-length")
        .expect("response has a Content-Length")
        .parse()
        .expect("numeric Content-Length");
    let mut chunk = [0u8; 4096];
    while body.len() < len {
        let n = s.read(&mut chunk).await.expect("read body");
        assert!(n > 0, "connection closed mid-body");
        body.extend_from_slice(&chunk[..n]);
    }
    assert_eq!(body.len(), len, "more bytes than Content-Length");
    (head, body)
}

#[tokio::test]
async fn a_slowly_chunked_response_reaches_the_client_only_whole_with_a_content_length() {
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up_addr = upstream.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = upstream.accept().await.unwrap();
        let _ = read_head(&mut s).await;
        s.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
            .await
            .unwrap();
        s.flush().await.unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        s.write_all(b"6\r\n world\r\n0\r\n\r\n").await.unwrap();
        s.flush().await.unwrap();
        // Keep the connection open until the proxy goes away.
        let mut sink = [0u8; 64];
        let _ = s.read(&mut sink).await;
    });
    let proxy = Proxy::start(up_addr);

    let mut c = TcpStream::connect(proxy.addr).await.unwrap();
    let start = Instant::now();
    c.write_all(b"GET /stream HTTP/1.1\r\nHost: backend.test\r\n\r\n")
        .await
        .unwrap();
    let mut first = [0u8; 1];
    let n = timeout(Duration::from_secs(10), c.read(&mut first))
        .await
        .expect("a response within 10 s")
        .unwrap();
    let waited = start.elapsed();
    assert_eq!(n, 1);
    assert!(
        waited >= Duration::from_millis(900),
        "first byte after {waited:?}: the proxy passed the first chunk through"
    );

    let (rest_head, body) = timeout(Duration::from_secs(10), read_response(&mut c))
        .await
        .expect("the rest of the response");
    let head = format!("{}{}", first[0] as char, rest_head);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(header(&head, "content-length"), Some("11"), "{head}");
    assert_eq!(header(&head, "transfer-encoding"), None, "{head}");
    assert_eq!(body, b"hello world");
}

#[tokio::test]
async fn a_websocket_upgrade_reaches_the_upstream_without_upgrade_or_connection() {
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up_addr = upstream.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut s, _) = upstream.accept().await.unwrap();
        let (head, _) = read_head(&mut s).await;
        let _ = tx.send(head);
        s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nno upgrade")
            .await
            .unwrap();
        let mut sink = [0u8; 64];
        let _ = s.read(&mut sink).await;
    });
    let proxy = Proxy::start(up_addr);

    let mut c = TcpStream::connect(proxy.addr).await.unwrap();
    c.write_all(
        b"GET /ws HTTP/1.1\r\nHost: backend.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await
    .unwrap();
    let (head, body) = timeout(Duration::from_secs(10), read_response(&mut c))
        .await
        .expect("a response");
    assert!(head.starts_with("HTTP/1.1 200"), "client got {head}");
    assert_eq!(body, b"no upgrade");

    let seen = timeout(Duration::from_secs(10), rx)
        .await
        .expect("upstream saw the request")
        .unwrap();
    assert!(seen.starts_with("GET /ws HTTP/1.1\r\n"), "{seen}");
    assert_eq!(header(&seen, "upgrade"), None, "upstream saw {seen}");
    assert_eq!(header(&seen, "connection"), None, "upstream saw {seen}");
    assert_eq!(header(&seen, "host"), Some("backend.test"), "{seen}");
    assert_eq!(
        header(&seen, "x-forwarded-for"),
        Some("127.0.0.1"),
        "{seen}"
    );
}

#[tokio::test]
async fn an_unreachable_upstream_is_a_502_with_a_one_line_reason() {
    // A loopback port that was just free: nothing listens there.
    let dead = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let proxy = Proxy::start(dead);

    let mut c = TcpStream::connect(proxy.addr).await.unwrap();
    c.write_all(b"GET / HTTP/1.1\r\nHost: backend.test\r\n\r\n")
        .await
        .unwrap();
    let (head, body) = timeout(Duration::from_secs(15), read_response(&mut c))
        .await
        .expect("a response");
    assert!(head.starts_with("HTTP/1.1 502"), "{head}");
    let body = String::from_utf8(body).unwrap();
    assert!(
        body.ends_with('\n') && body.trim_end().lines().count() == 1,
        "{body:?}"
    );
    assert!(body.contains(&dead.to_string()), "{body:?}");
}
