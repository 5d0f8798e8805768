//! Getting the PAC file: `http://host[:port]/path` (plain HTTP/1.1 GET, always direct: the PAC
//! is what tells us about proxies), `file:///path`, or a filesystem path.
//!
//! Deliberately small: status 200 only (redirects are reported, not followed), a body of at most
//! [`MAX_PAC_SIZE`] delimited by `Content-Length`, chunked encoding or the end of the
//! connection, and one overall timeout. `https://` is not supported yet (WPAD and most PAC
//! servers are plain HTTP on the intranet).

use super::{size_text, PacError};
use std::io;
use std::time::Duration;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Largest PAC file accepted (1 MiB); also the default script limit of the sandbox.
pub const MAX_PAC_SIZE: usize = 1 << 20;
/// Largest response head (status line and headers).
const MAX_HEAD: usize = 16 << 10;

/// Why a PAC file could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum FetchProblem {
    #[error("timeout after {0:?}")]
    Timeout(Duration),
    #[error("{0} (use http://host[:port]/path, file:///path or a path)")]
    BadLocation(String),
    #[error("cannot connect: {0}")]
    Connect(io::Error),
    #[error("HTTP {status}{}", redirect_hint(.location))]
    Status {
        status: u16,
        location: Option<String>,
    },
    #[error("bad HTTP response: {0}")]
    BadResponse(String),
    #[error("larger than {}", size_text(MAX_PAC_SIZE))]
    TooLarge,
    #[error("cannot read: {0}")]
    Io(io::Error),
}

fn redirect_hint(location: &Option<String>) -> String {
    match location {
        Some(l) => format!(
            " redirecting to {} (redirects are not followed: configure the final URL)",
            super::shorten(l, 200)
        ),
        None => String::new(),
    }
}

/// Fetches a PAC file from `location` within `timeout`, directly (never through a proxy).
pub async fn fetch(location: &str, timeout: Duration) -> Result<String, PacError> {
    let fail = |problem| PacError::Fetch {
        pac: crate::proxy::redact(location),
        problem,
    };
    let bytes = match tokio::time::timeout(timeout, fetch_bytes(location.trim())).await {
        Err(_) => return Err(fail(FetchProblem::Timeout(timeout))),
        Ok(r) => r.map_err(fail)?,
    };
    let text = String::from_utf8_lossy(&bytes);
    Ok(text.strip_prefix('\u{feff}').unwrap_or(&text).to_string())
}

async fn fetch_bytes(location: &str) -> Result<Vec<u8>, FetchProblem> {
    let lower = location.to_ascii_lowercase();
    if lower.starts_with("http://") {
        let (host, port, path) = parse_http_url(&location[7..])?;
        http_get(&host, port, &path).await
    } else if lower.starts_with("file://") {
        read_file(&file_url_path(&location[7..])?).await
    } else if let Some((scheme, _)) = location.split_once("://") {
        Err(FetchProblem::BadLocation(format!(
            "{scheme}:// is not supported"
        )))
    } else if location.is_empty() {
        Err(FetchProblem::BadLocation("empty location".into()))
    } else {
        read_file(location).await
    }
}

/// `host[:port][/path]` after `http://` → host (no brackets), port, path with query.
fn parse_http_url(rest: &str) -> Result<(String, u16, String), FetchProblem> {
    let bad = |why: &str| FetchProblem::BadLocation(why.to_string());
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    if authority.contains('@') {
        return Err(bad("credentials in the PAC URL are not supported"));
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6
            .split_once(']')
            .ok_or_else(|| bad("unclosed [ in the host"))?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or_else(|| bad("junk after ]"))?),
        };
        (h, port)
    } else {
        match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err(bad("no host in the URL"));
    }
    let port = match port {
        None => 80,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| bad("bad port in the URL"))?,
    };
    let path = path.split('#').next().unwrap_or("");
    let path = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("/{path}")
    };
    if path.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(bad("spaces or control characters in the URL path"));
    }
    Ok((host.to_string(), port, path))
}

async fn http_get(host: &str, port: u16, path: &str) -> Result<Vec<u8>, FetchProblem> {
    let tcp = TcpStream::connect((host, port))
        .await
        .map_err(FetchProblem::Connect)?;
    let authority = match (host.contains(':'), port) {
        (true, 80) => format!("[{host}]"),
        (true, p) => format!("[{host}]:{p}"),
        (false, 80) => host.to_string(),
        (false, p) => format!("{host}:{p}"),
    };
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: sallyport/{}\r\nAccept: */*\r\nConnection: close\r\n\r\n",
        env!("CARGO_PKG_VERSION")
    );
    let mut rd = BufReader::new(tcp);
    rd.get_mut()
        .write_all(request.as_bytes())
        .await
        .map_err(FetchProblem::Io)?;

    // The head, line by line, until the empty line.
    let mut head = Vec::new();
    loop {
        let before = head.len();
        let n = read_line(&mut rd, &mut head, MAX_HEAD.saturating_sub(before)).await?;
        if n == 0 {
            return Err(FetchProblem::BadResponse(
                "the connection closed before the response headers ended".into(),
            ));
        }
        let line = &head[before..];
        if line == b"\r\n" || line == b"\n" {
            break;
        }
        if !line.ends_with(b"\n") {
            return Err(FetchProblem::BadResponse(format!(
                "response headers longer than {}",
                size_text(MAX_HEAD)
            )));
        }
    }
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut headers);
    match response.parse(&head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => {
            return Err(FetchProblem::BadResponse("incomplete headers".into()))
        }
        Err(e) => return Err(FetchProblem::BadResponse(e.to_string())),
    }
    let status = response.code.unwrap_or(0);
    let header = |name: &str| {
        response
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).trim().to_string())
    };
    if status != 200 {
        return Err(FetchProblem::Status {
            status,
            location: header("location").filter(|_| (300..400).contains(&status)),
        });
    }
    let chunked =
        header("transfer-encoding").is_some_and(|te| te.to_ascii_lowercase().contains("chunked"));
    if chunked {
        read_chunked(&mut rd).await
    } else if let Some(len) = header("content-length") {
        let len: usize = len
            .parse()
            .map_err(|_| FetchProblem::BadResponse(format!("bad Content-Length `{len}`")))?;
        if len > MAX_PAC_SIZE {
            return Err(FetchProblem::TooLarge);
        }
        let mut body = vec![0; len];
        rd.read_exact(&mut body).await.map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => FetchProblem::BadResponse(format!(
                "the body ended before its {len} bytes (Content-Length)"
            )),
            _ => FetchProblem::Io(e),
        })?;
        Ok(body)
    } else {
        read_to_end_bounded(rd).await
    }
}

/// Appends one line (up to and including `\n`) to `buf`, reading at most `max` bytes; returns
/// the bytes read (0 at EOF). A line longer than `max` comes back without its `\n`.
async fn read_line<R: AsyncBufRead + Unpin>(
    rd: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
) -> Result<usize, FetchProblem> {
    let mut n = 0;
    while n < max {
        let available = rd.fill_buf().await.map_err(FetchProblem::Io)?;
        if available.is_empty() {
            break;
        }
        let room = &available[..available.len().min(max - n)];
        let (take, done) = match room.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (room.len(), false),
        };
        buf.extend_from_slice(&room[..take]);
        rd.consume(take);
        n += take;
        if done {
            break;
        }
    }
    Ok(n)
}

async fn read_chunked<R: AsyncBufRead + Unpin>(rd: &mut R) -> Result<Vec<u8>, FetchProblem> {
    let bad = |why: &str| FetchProblem::BadResponse(format!("chunked body: {why}"));
    let mut body = Vec::new();
    loop {
        let mut line = Vec::new();
        read_line(rd, &mut line, 1024).await?;
        if !line.ends_with(b"\n") {
            return Err(bad("bad chunk header"));
        }
        let text = String::from_utf8_lossy(&line);
        let size = text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size, 16).map_err(|_| bad("bad chunk size"))?;
        if size == 0 {
            // Trailers, if any, are not needed.
            return Ok(body);
        }
        if size > MAX_PAC_SIZE - body.len() {
            return Err(FetchProblem::TooLarge);
        }
        let start = body.len();
        body.resize(start + size, 0);
        rd.read_exact(&mut body[start..])
            .await
            .map_err(|_| bad("ended inside a chunk"))?;
        let mut crlf = Vec::new();
        read_line(rd, &mut crlf, 2).await?;
        if crlf != b"\r\n" && crlf != b"\n" {
            return Err(bad("missing CRLF after a chunk"));
        }
    }
}

async fn read_to_end_bounded<R: AsyncRead + Unpin>(rd: R) -> Result<Vec<u8>, FetchProblem> {
    let mut body = Vec::new();
    rd.take(MAX_PAC_SIZE as u64 + 1)
        .read_to_end(&mut body)
        .await
        .map_err(FetchProblem::Io)?;
    if body.len() > MAX_PAC_SIZE {
        return Err(FetchProblem::TooLarge);
    }
    Ok(body)
}

/// The path of a `file://` URL (after the scheme): `/etc/wpad.dat`, `localhost/etc/wpad.dat`,
/// `%20` decoded; on Windows `/C:/x` becomes `C:/x`.
fn file_url_path(rest: &str) -> Result<String, FetchProblem> {
    let path = rest
        .strip_prefix("localhost")
        .filter(|p| p.starts_with('/'))
        .unwrap_or(rest);
    if !path.starts_with('/') {
        return Err(FetchProblem::BadLocation(
            "a file URL needs an absolute path, file:///path".into(),
        ));
    }
    let path = crate::url::percent_decode(path)
        .ok_or_else(|| FetchProblem::BadLocation("bad %-escape in the file URL".into()))?;
    #[cfg(windows)]
    let path = match path.as_bytes() {
        [b'/', d, b':', ..] if d.is_ascii_alphabetic() => path[1..].to_string(),
        _ => path,
    };
    Ok(path)
}

async fn read_file(path: &str) -> Result<Vec<u8>, FetchProblem> {
    let file = tokio::fs::File::open(path)
        .await
        .map_err(FetchProblem::Io)?;
    if let Ok(meta) = file.metadata().await {
        if meta.is_dir() {
            return Err(FetchProblem::Io(io::Error::other("it is a directory")));
        }
        if meta.len() > MAX_PAC_SIZE as u64 {
            return Err(FetchProblem::TooLarge);
        }
    }
    read_to_end_bounded(file).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use tokio::net::TcpListener;

    /// Serves `response` (raw bytes, written after reading the request head) to every
    /// connection; `None` accepts and never answers.
    async fn server(response: Option<Vec<u8>>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let response = response.clone();
                tokio::spawn(async move {
                    let mut rd = BufReader::new(tcp);
                    let mut head = Vec::new();
                    loop {
                        let mut line = Vec::new();
                        if read_line(&mut rd, &mut line, 4096).await.unwrap_or(0) == 0 {
                            return;
                        }
                        head.extend_from_slice(&line);
                        if line == b"\r\n" {
                            break;
                        }
                    }
                    let head = String::from_utf8_lossy(&head).to_string();
                    assert!(
                        head.starts_with("GET /proxy.pac?x=1 HTTP/1.1\r\n"),
                        "{head}"
                    );
                    assert!(head.contains("\r\nConnection: close\r\n"), "{head}");
                    assert!(head.contains("\r\nHost: 127.0.0.1:"), "{head}");
                    match response {
                        Some(r) => {
                            let _ = rd.get_mut().write_all(&r).await;
                            let _ = rd.get_mut().shutdown().await;
                        }
                        None => {
                            tokio::time::sleep(Duration::from_secs(30)).await;
                        }
                    }
                });
            }
        });
        addr
    }

    const PAC: &str = "function FindProxyForURL(url, host) { return \"DIRECT\"; }\n";
    const T: Duration = Duration::from_secs(5);

    async fn get(response: Option<Vec<u8>>, timeout: Duration) -> Result<String, PacError> {
        let addr = server(response).await;
        fetch(&format!("http://{addr}/proxy.pac?x=1#frag"), timeout).await
    }

    #[tokio::test]
    async fn pac_fetch_http_content_length_chunked_and_eof() {
        let r = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/x-ns-proxy-autoconfig\r\nContent-Length: {}\r\n\r\n{PAC}",
            PAC.len()
        );
        assert_eq!(get(Some(r.into_bytes()), T).await.unwrap(), PAC);

        let (a, b) = PAC.split_at(10);
        let r = format!(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{:x};ext=1\r\n{a}\r\n{:X}\r\n{b}\r\n0\r\nX-Trailer: y\r\n\r\n",
            a.len(),
            b.len()
        );
        assert_eq!(get(Some(r.into_bytes()), T).await.unwrap(), PAC);

        let r = format!("HTTP/1.0 200 OK\r\n\r\n\u{feff}{PAC}");
        assert_eq!(get(Some(r.into_bytes()), T).await.unwrap(), PAC);
    }

    #[tokio::test]
    async fn pac_fetch_http_errors_say_what_happened() {
        let e = get(
            Some(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_vec()),
            T,
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("PAC at http://127.0.0.1:"), "{e}");
        assert!(e.ends_with("/proxy.pac?x=1#frag: HTTP 404"), "{e}");

        let e = get(
            Some(b"HTTP/1.1 302 Found\r\nLocation: http://elsewhere/p.pac\r\n\r\n".to_vec()),
            T,
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(
            e.contains(
                "HTTP 302 redirecting to http://elsewhere/p.pac (redirects are not followed"
            ),
            "{e}"
        );

        let e = get(Some(b"garbage\r\n\r\n".to_vec()), T)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("bad HTTP response"), "{e}");

        let e = get(
            Some(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort".to_vec()),
            T,
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(e.contains("ended before its 100 bytes"), "{e}");

        // Nobody listening.
        let free = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = free.local_addr().unwrap();
        drop(free);
        let e = fetch(&format!("http://{addr}/"), T)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot connect"), "{e}");
    }

    #[tokio::test]
    async fn pac_fetch_http_oversize_is_refused() {
        let big = MAX_PAC_SIZE + 1;
        let r = format!("HTTP/1.1 200 OK\r\nContent-Length: {big}\r\n\r\n");
        let e = get(Some(r.into_bytes()), T).await.unwrap_err().to_string();
        assert!(e.ends_with(": larger than 1 MiB"), "{e}");

        let mut r = b"HTTP/1.1 200 OK\r\n\r\n".to_vec();
        r.resize(r.len() + big, b'/');
        let e = get(Some(r), T).await.unwrap_err().to_string();
        assert!(e.ends_with(": larger than 1 MiB"), "{e}");

        let mut r = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        for _ in 0..20 {
            r.extend_from_slice(b"10000\r\n");
            r.resize(r.len() + 0x10000, b'/');
            r.extend_from_slice(b"\r\n");
        }
        r.extend_from_slice(b"0\r\n\r\n");
        let e = get(Some(r), T).await.unwrap_err().to_string();
        assert!(e.ends_with(": larger than 1 MiB"), "{e}");

        let mut r = b"HTTP/1.1 200 OK\r\nX-Long: ".to_vec();
        r.resize(r.len() + 20_000, b'a');
        let e = get(Some(r), T).await.unwrap_err().to_string();
        assert!(e.contains("response headers longer than 16 KiB"), "{e}");
    }

    #[tokio::test]
    async fn pac_fetch_slow_server_times_out() {
        let t0 = std::time::Instant::now();
        let e = get(None, Duration::from_millis(300))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.ends_with(": timeout after 300ms"), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    }

    #[tokio::test]
    async fn pac_fetch_files_and_bad_locations() {
        let dir = std::env::temp_dir().join(format!("sallyport-pac-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("wpad test.dat");
        std::fs::write(&file, PAC).unwrap();
        let path = file.to_str().unwrap();
        assert_eq!(fetch(path, T).await.unwrap(), PAC);
        #[cfg(unix)]
        {
            let url = format!("file://{}", path.replace(' ', "%20"));
            assert_eq!(fetch(&url, T).await.unwrap(), PAC);
            let url = format!("file://localhost{}", path.replace(' ', "%20"));
            assert_eq!(fetch(&url, T).await.unwrap(), PAC);
        }
        let big = dir.join("big.pac");
        std::fs::write(&big, vec![b' '; MAX_PAC_SIZE + 1]).unwrap();
        let e = fetch(big.to_str().unwrap(), T)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.ends_with(": larger than 1 MiB"), "{e}");
        let e = fetch(dir.join("missing.pac").to_str().unwrap(), T)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.pac: cannot read:"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();

        for (loc, want) in [
            ("https://wpad.corp/wpad.dat", "https:// is not supported"),
            ("ftp://x/y", "ftp:// is not supported"),
            ("http:///wpad.dat", "no host"),
            ("http://wpad:0/", "bad port"),
            ("http://wpad:http/", "bad port"),
            ("http://user:secret@wpad/", "credentials"),
            ("http://[::1/", "unclosed ["),
            ("file://relative/x", "absolute path"),
            ("file:///a%zz", "bad %-escape"),
            ("", "empty location"),
        ] {
            let e = fetch(loc, T).await.unwrap_err().to_string();
            assert!(e.contains(want), "{loc}: {e}");
            assert!(!e.contains("secret"), "{e}");
        }
    }

    #[test]
    fn pac_fetch_url_parsing() {
        let p = |s: &str| parse_http_url(s).unwrap();
        assert_eq!(
            p("wpad.corp/wpad.dat"),
            ("wpad.corp".into(), 80, "/wpad.dat".into())
        );
        assert_eq!(p("wpad.corp"), ("wpad.corp".into(), 80, "/".into()));
        assert_eq!(p("wpad.corp?x"), ("wpad.corp".into(), 80, "/?x".into()));
        assert_eq!(p("[::1]:8080/p"), ("::1".into(), 8080, "/p".into()));
        assert_eq!(p("[::1]"), ("::1".into(), 80, "/".into()));
        assert!(parse_http_url("h/a b").is_err());
    }
}
