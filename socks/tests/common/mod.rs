//! Test fixtures shared by the front-end tests: a scripted [`Dialer`], a
//! "shout" TCP server (echoes upper-cased after EOF, so half-close is
//! observable) and a tiny HTTP origin server built on hyper.
#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use socks::{BoxIo, DialError, DialErrorKind, DialFuture, Dialer, OpenMode, Target};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the fake dialer does for a host.
#[derive(Clone, Copy)]
pub enum Behaviour {
    /// Connect to this local address (whatever port the target named).
    Connect(SocketAddr),
    /// Fail with this kind.
    Fail(DialErrorKind),
    /// "Succeed" at once, like an early open, but fail the stream's first
    /// read or write with this kind wrapped in an `io::Error`.
    FailLater(DialErrorKind),
}

/// A stream whose every operation fails with a wrapped [`DialError`].
struct FailingIo(DialErrorKind);

impl FailingIo {
    fn error(&self) -> std::io::Error {
        std::io::Error::other(DialError::new(self.0, format!("far end said {}", self.0)))
    }
}

impl tokio::io::AsyncRead for FailingIo {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        _: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Err(self.error()))
    }
}

impl tokio::io::AsyncWrite for FailingIo {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        _: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::task::Poll::Ready(Err(self.error()))
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Err(self.error()))
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// A dialer that follows a script keyed by host and records every call.
/// Unknown hosts fail with `HostNotFound`. It never resolves names.
#[derive(Default)]
pub struct FakeDialer {
    routes: Mutex<HashMap<String, Behaviour>>,
    calls: Mutex<Vec<(Target, OpenMode)>>,
    /// Hosts [`Dialer::known`] vouches for.
    known: Mutex<Vec<String>>,
}

impl FakeDialer {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn route(self: &Arc<Self>, host: &str, behaviour: Behaviour) -> Arc<Self> {
        self.routes
            .lock()
            .unwrap()
            .insert(host.to_string(), behaviour);
        self.clone()
    }

    /// Makes [`Dialer::known`] say that `host` opens.
    pub fn know(self: &Arc<Self>, host: &str) -> Arc<Self> {
        self.known.lock().unwrap().push(host.to_string());
        self.clone()
    }

    pub fn calls(&self) -> Vec<(Target, OpenMode)> {
        self.calls.lock().unwrap().clone()
    }
}

impl Dialer for FakeDialer {
    fn known(&self, target: &Target) -> bool {
        self.known.lock().unwrap().contains(&target.host)
    }

    fn dial(&self, target: Target, mode: OpenMode) -> DialFuture {
        self.calls.lock().unwrap().push((target.clone(), mode));
        let behaviour = self.routes.lock().unwrap().get(&target.host).copied();
        Box::pin(async move {
            match behaviour {
                Some(Behaviour::Connect(addr)) => {
                    let stream = TcpStream::connect(addr)
                        .await
                        .map_err(|e| DialError::new(DialErrorKind::Refused, e.to_string()))?;
                    Ok(Box::new(stream) as BoxIo)
                }
                Some(Behaviour::FailLater(kind)) => Ok(Box::new(FailingIo(kind)) as BoxIo),
                Some(Behaviour::Fail(kind)) => Err(DialError::new(
                    kind,
                    format!("scripted {kind} for {target}"),
                )),
                None => Err(DialError::new(
                    DialErrorKind::HostNotFound,
                    format!("no such host {}", target.host),
                )),
            }
        })
    }
}

/// A dialer that vouches for `gone.internal` ([`Dialer::known`]) and whose open to it is
/// refused after the app was answered (an early open the far end refused).
pub fn refused_after_answer() -> Arc<FakeDialer> {
    FakeDialer::new()
        .route(
            "gone.internal",
            Behaviour::FailLater(DialErrorKind::Refused),
        )
        .know("gone.internal")
}

/// A real TCP client of `serve`, which gets the accepted socket: the client and the server's
/// task.
pub async fn serve_one_tcp<F, Fut, T>(serve: F) -> (TcpStream, tokio::task::JoinHandle<T>)
where
    F: FnOnce(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T> + Send,
    T: Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        serve(tcp).await
    });
    (TcpStream::connect(addr).await.unwrap(), task)
}

/// The rest of `client` must fail with a reset: a clean close would read as an empty answer.
pub async fn expect_reset(client: &mut TcpStream) {
    let mut rest = Vec::new();
    let err = client
        .read_to_end(&mut rest)
        .await
        .expect_err("the connection must be reset, not closed");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
}

/// Reads until EOF, then writes everything back upper-cased and closes.
pub async fn shout_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut data = Vec::new();
                if stream.read_to_end(&mut data).await.is_ok() {
                    let _ = stream.write_all(&data.to_ascii_uppercase()).await;
                    let _ = stream.shutdown().await;
                }
            });
        }
    });
    addr
}

/// Echoes bytes back as they arrive (for interactive relays).
pub async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = stream.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// What the origin server observed, for assertions.
#[derive(Default)]
pub struct OriginLog {
    pub connections: AtomicUsize,
    pub requests: AtomicUsize,
    /// Set if any request carried a header that must never leave the proxy.
    pub saw_forbidden_header: AtomicBool,
}

/// An HTTP/1.1 origin server answering every request with
/// `<name> <METHOD> <origin-form uri> host=<Host> body=<body>`.
pub async fn origin_server(name: &'static str) -> (SocketAddr, Arc<OriginLog>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let log = Arc::new(OriginLog::default());
    let log2 = log.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            log2.connections.fetch_add(1, Ordering::SeqCst);
            let log = log2.clone();
            let service = service_fn(move |req: Request<Incoming>| {
                let log = log.clone();
                async move {
                    log.requests.fetch_add(1, Ordering::SeqCst);
                    let headers = req.headers();
                    if ["proxy-authorization", "proxy-connection", "keep-alive"]
                        .iter()
                        .any(|h| headers.contains_key(*h))
                    {
                        log.saw_forbidden_header.store(true, Ordering::SeqCst);
                    }
                    let host = headers
                        .get("host")
                        .and_then(|h| h.to_str().ok())
                        .unwrap_or("-")
                        .to_string();
                    let line = format!("{name} {} {} host={host}", req.method(), req.uri());
                    let body = req
                        .into_body()
                        .collect()
                        .await
                        .map(|b| b.to_bytes())
                        .unwrap_or_default();
                    let text = format!("{line} body={}", String::from_utf8_lossy(&body));
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(text))))
                }
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, log)
}
