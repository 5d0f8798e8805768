//! A reverse HTTP/1.1 proxy that buffers whole responses, for tests.
//!
//! Some corporate TLS-inspecting proxies read an entire response body, scan it, and only then
//! pass it on (with a `Content-Length`). They also drop `Upgrade`, so WebSocket never gets
//! through. Behind such a proxy a streamed download never streams: the client sees nothing until
//! the upstream has finished the response. That is the issue this tool reproduces: *a proxy that
//! buffers whole responses forces the HTTP transport to long-poll* — a streamed GET that stays
//! open only delivers its bytes when it ends, so the transport must notice and fall back to
//! short, bounded long-polls.
//!
//! `sp-bufproxy --listen 127.0.0.1:0 --upstream HOST:PORT [--cert cert.pem --key key.pem] [--tamper]`
//! serves HTTP/1.1 (TLS with `--cert`/`--key`) and forwards every request to the upstream over
//! plain HTTP/1.1 on TCP (one upstream connection per client connection, reused while it stays
//! open). Request bodies stream up; hop-by-hop headers (`Connection`, `Upgrade`, `Keep-Alive`,
//! `Proxy-Connection`, `TE`, `Trailer`, `Transfer-Encoding` and whatever `Connection` names) are
//! dropped and `X-Forwarded-For` is added. Response bodies are collected whole (at most 64 MiB)
//! before the first byte goes to the client. An upstream failure answers `502` with a one-line
//! text body. Once bound it prints `sp-bufproxy listening on ADDR` on stdout.

use std::convert::Infallible;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;

/// Largest response body we are willing to hold in memory; anything bigger is a 502.
const MAX_BODY: usize = 64 * 1024 * 1024;
/// How long to wait for the upstream TCP connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take for its TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take to send a request head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Headers that describe one hop, never forwarded (RFC 9110 §7.6.1, plus the usual extras).
const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "upgrade",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
];

#[derive(Parser, Debug)]
#[command(
    name = "sp-bufproxy",
    about = "Reverse HTTP/1.1 proxy that buffers whole responses (test tool)"
)]
struct Args {
    /// Address to listen on (port 0 picks one; the bound address is printed).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Upstream HOST:PORT, spoken to in plain HTTP/1.1.
    #[arg(long)]
    upstream: String,
    /// PEM certificate chain: serve TLS to clients (needs --key).
    #[arg(long, requires = "key")]
    cert: Option<PathBuf>,
    /// PEM private key for --cert.
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// Also tamper: flip the last byte of every non-empty `200` answer to a `GET` (a proxy that
    /// alters what it inspects; the inner channel must fail clearly, never downgrade).
    #[arg(long)]
    tamper: bool,
}

/// `--tamper`, for every connection.
static TAMPER: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let tls = match (&args.cert, &args.key) {
        (Some(cert), Some(key)) => match tls_config(cert, key) {
            Ok(cfg) => Some(tokio_rustls::TlsAcceptor::from(cfg)),
            Err(e) => {
                eprintln!("sp-bufproxy: {e}");
                std::process::exit(1);
            }
        },
        _ => None,
    };
    let listener = match TcpListener::bind(args.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("sp-bufproxy: cannot bind {}: {e}", args.listen);
            std::process::exit(1);
        }
    };
    let bound = match listener.local_addr() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("sp-bufproxy: local address: {e}");
            std::process::exit(1);
        }
    };
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "sp-bufproxy listening on {bound}");
        let _ = out.flush();
    }

    TAMPER.store(args.tamper, std::sync::atomic::Ordering::Relaxed);
    let upstream: Arc<str> = Arc::from(args.upstream.as_str());
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and friends: back off rather than spin.
                eprintln!("sp-bufproxy: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let upstream = upstream.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                None => serve_client(stream, peer, upstream).await,
                Some(acceptor) => {
                    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await
                    {
                        Ok(Ok(tls_stream)) => serve_client(tls_stream, peer, upstream).await,
                        Ok(Err(e)) => eprintln!("sp-bufproxy: {peer}: TLS handshake: {e}"),
                        Err(_) => eprintln!("sp-bufproxy: {peer}: TLS handshake timed out"),
                    }
                }
            }
        });
    }
}

fn tls_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, String> {
    let cert_pem =
        std::fs::read(cert).map_err(|e| format!("cannot read {}: {e}", cert.display()))?;
    let key_pem = std::fs::read(key).map_err(|e| format!("cannot read {}: {e}", key.display()))?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("{}: no certificate found", cert.display()));
    }
    let key_der =
        PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| format!("{}: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(|e| format!("TLS setup: {e}"))?;
    Ok(Arc::new(cfg))
}

/// What one client connection shares between its requests.
struct Client {
    peer: SocketAddr,
    upstream: Arc<str>,
    /// The upstream connection, kept while it stays usable. hyper's server handles one request
    /// at a time per connection, so this lock is never contended.
    conn: Mutex<Option<SendRequest<Incoming>>>,
}

async fn serve_client<S>(io: S, peer: SocketAddr, upstream: Arc<str>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let client = Arc::new(Client {
        peer,
        upstream,
        conn: Mutex::new(None),
    });
    let service = service_fn(move |req| {
        let client = client.clone();
        async move { Ok::<_, Infallible>(client.forward(req).await) }
    });
    let result = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(io), service)
        .await;
    if let Err(e) = result {
        eprintln!("sp-bufproxy: {peer}: {e}");
    }
}

impl Client {
    async fn forward(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let head_only = req.method() == Method::HEAD;
        let is_get = req.method() == Method::GET;
        let up_req = match self.upstream_request(req) {
            Ok(r) => r,
            Err(why) => return text(StatusCode::BAD_REQUEST, &why),
        };
        let mut guard = self.conn.lock().await;
        // A kept connection that closed in between (or cannot take another request) is
        // replaced by a fresh one.
        let mut kept = guard.take();
        if let Some(s) = kept.as_mut() {
            if s.ready().await.is_err() {
                kept = None;
            }
        }
        let mut sender = match kept {
            Some(s) => s,
            None => match self.connect().await {
                Ok(s) => s,
                Err(why) => return bad_gateway(&why),
            },
        };
        let resp = match sender.send_request(up_req).await {
            Ok(r) => r,
            Err(e) => return bad_gateway(&format!("upstream {}: {e}", self.upstream)),
        };
        let (parts, body) = resp.into_parts();

        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        let bodiless = head_only
            || parts.status.is_informational()
            || parts.status == StatusCode::NO_CONTENT
            || parts.status == StatusCode::NOT_MODIFIED;
        if !bodiless && declared.is_some_and(|n| n > MAX_BODY as u64) {
            // The connection is mid-body: do not keep it.
            return bad_gateway(&format!(
                "upstream {}: response body too large",
                self.upstream
            ));
        }

        // The whole point: nothing reaches the client until the body is complete.
        let bytes = match Limited::new(body, MAX_BODY).collect().await {
            Ok(c) => c.to_bytes(),
            Err(e) if e.is::<LengthLimitError>() => {
                return bad_gateway(&format!(
                    "upstream {}: response body over {MAX_BODY} bytes",
                    self.upstream
                ))
            }
            Err(e) => return bad_gateway(&format!("upstream {}: {e}", self.upstream)),
        };
        // Fully read: the connection may serve the next request.
        *guard = Some(sender);
        drop(guard);
        let bytes = if TAMPER.load(std::sync::atomic::Ordering::Relaxed)
            && is_get
            && parts.status == StatusCode::OK
            && !bytes.is_empty()
        {
            let mut v = bytes.to_vec();
            if let Some(last) = v.last_mut() {
                *last ^= 0x01;
            }
            Bytes::from(v)
        } else {
            bytes
        };

        let mut headers = parts.headers;
        strip_hop_by_hop(&mut headers);
        if !bodiless {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
        }
        let mut out = Response::new(Full::new(if bodiless { Bytes::new() } else { bytes }));
        *out.status_mut() = parts.status;
        *out.headers_mut() = headers;
        out
    }

    /// The request as the upstream sees it: origin-form, HTTP/1.1, no hop-by-hop headers, with
    /// `X-Forwarded-For`. The body streams through untouched.
    fn upstream_request(&self, req: Request<Incoming>) -> Result<Request<Incoming>, String> {
        let (mut parts, body) = req.into_parts();
        let path = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        parts.uri = path
            .parse::<Uri>()
            .map_err(|e| format!("bad request target: {e}"))?;
        parts.version = Version::HTTP_11;
        strip_hop_by_hop(&mut parts.headers);
        if !parts.headers.contains_key(header::HOST) {
            if let Ok(v) = HeaderValue::from_str(&self.upstream) {
                parts.headers.insert(header::HOST, v);
            }
        }
        let xff = HeaderName::from_static("x-forwarded-for");
        let ip = self.peer.ip().to_string();
        let joined = match parts.headers.get(&xff).and_then(|v| v.to_str().ok()) {
            Some(prev) if !prev.trim().is_empty() => format!("{prev}, {ip}"),
            _ => ip,
        };
        if let Ok(v) = HeaderValue::from_str(&joined) {
            parts.headers.insert(xff, v);
        }
        Ok(Request::from_parts(parts, body))
    }

    async fn connect(&self) -> Result<SendRequest<Incoming>, String> {
        let up = &*self.upstream;
        let stream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(up)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(format!("cannot connect to upstream {up}: {e}")),
            Err(_) => return Err(format!("cannot connect to upstream {up}: timed out")),
        };
        let _ = stream.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("upstream {up}: {e}"))?;
        let up = up.to_string();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                eprintln!("sp-bufproxy: upstream {up}: {e}");
            }
        });
        Ok(sender)
    }
}

/// Removes the hop-by-hop headers and any header the `Connection` header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

fn bad_gateway(why: &str) -> Response<Full<Bytes>> {
    eprintln!("sp-bufproxy: 502: {why}");
    text(StatusCode::BAD_GATEWAY, why)
}

/// A `text/plain` response with `why` on one line.
fn text(status: StatusCode, why: &str) -> Response<Full<Bytes>> {
    let line: String = why
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let body = Bytes::from(format!("sp-bufproxy: {line}\n"));
    let mut resp = Response::new(Full::new(body.clone()));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    resp
}
