//! The HTTP proxy front end: `CONNECT` tunnels and absolute-form requests.
//!
//! One call to [`serve_http`] serves one client connection with hyper's
//! HTTP/1 server. Each request is one of:
//!
//! - `CONNECT host:port` — dial with [`OpenMode::Confirmed`]; on success
//!   answer `200`, let hyper hand over the raw connection ("upgrade"), and
//!   splice it with the dialed stream. This is how HTTPS and most other
//!   protocols travel through an HTTP proxy. A destination the dialer
//!   [knows](crate::Dialer::known) to open is dialed with [`OpenMode::Early`]
//!   and answered `200` at once; if it fails after all, the connection is
//!   reset.
//! - `GET http://host:port/path` (any method, absolute-form) — dial with
//!   [`OpenMode::Early`], speak HTTP/1.1 to the origin over the dialed
//!   stream, send the request in origin-form without hop-by-hop headers, and
//!   stream the response back. Bodies are never buffered whole: hyper passes
//!   them through frame by frame in both directions.
//! - anything else gets a `400` with a reason.
//!
//! A client may send several requests on one connection, to different hosts
//! one after another. The upstream connection of the last request is kept
//! and reused when the next request goes to the same `host:port` and the
//! connection is ready again; otherwise we dial afresh.
//!
//! Errors reach the application as a status code chosen by
//! [`crate::DialErrorKind::http_status`], a `text/plain` body
//! `sallyport: <reason>` and an `X-Sallyport-Error: <kind>` header.

use std::convert::Infallible;
use std::error::Error as StdError;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::service::service_fn;
use hyper::upgrade::OnUpgrade;
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

use crate::{BoxIo, DialError, DialErrorKind, Dialer, FrontError, LocalAuth, OpenMode, Target};

/// How long a client may take to send a complete request head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Upper bound on one request head (request line plus headers).
const MAX_HEADER_BYTES: usize = 64 * 1024;

/// How long we wait for a kept upstream connection to become ready again
/// before giving up on it and dialing a new one. The previous response has
/// been fully delivered by then, so this is normally immediate.
const REUSE_WAIT: Duration = Duration::from_secs(1);

/// Response bodies: either an upstream body streamed through, or our own
/// short text.
type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// Serve one HTTP proxy client connection until it closes.
///
/// A connection that ends in a `CONNECT` tunnel returns when the tunnel's
/// relay ends. Malformed requests are answered by hyper (`400`, `431`) and
/// then reported here as [`FrontError::Http`].
pub async fn serve_http<S>(
    io: S,
    dialer: Arc<dyn Dialer>,
    auth: Option<Arc<LocalAuth>>,
) -> Result<(), FrontError>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    serve_http_with(io, dialer, auth, None).await
}

/// Pages the proxy port serves itself (origin-form `GET /path` with a `Host` of `127.0.0.1`,
/// `localhost` or `[::1]`): e.g. a PAC file for browsers and a status page.
pub trait LocalPages: Send + Sync + 'static {
    /// `(content type, body)` for `path`, or `None` for a 404.
    fn page(&self, path: &str) -> Option<(&'static str, String)>;
}

/// [`serve_http`] that also answers local pages.
pub async fn serve_http_with<S>(
    io: S,
    dialer: Arc<dyn Dialer>,
    auth: Option<Arc<LocalAuth>>,
    pages: Option<Arc<dyn LocalPages>>,
) -> Result<(), FrontError>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let proxy = Arc::new(Proxy {
        dialer,
        pages,
        auth,
        upstream: Mutex::new(None),
        tunnel: Mutex::new(None),
    });
    let service = {
        let proxy = proxy.clone();
        service_fn(move |req| {
            let proxy = proxy.clone();
            async move { Ok::<_, Infallible>(proxy.handle(req).await) }
        })
    };

    let result = hyper::server::conn::http1::Builder::new()
        // A client may close its sending side right after its request (`curl -T`, `nc -N`,
        // Windows clients under test): the answer must still come.
        .half_close(true)
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_header_size(MAX_HEADER_BYTES)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades()
        .await;

    // The client is done with plain requests; let the kept upstream go.
    lock(&proxy.upstream).take();
    if let Err(e) = result {
        debug!(error = %e, "http proxy connection ended with an error");
        return Err(FrontError::Http(e));
    }

    // With upgrades enabled, the connection future completes right after a
    // successful CONNECT response, handing the raw stream to `OnUpgrade`.
    let tunnel = lock(&proxy.tunnel).take();
    if let Some(Tunnel {
        target,
        on_upgrade,
        mut stream,
        early,
    }) = tunnel
    {
        let mut client = TokioIo::new(on_upgrade.await?);
        match tunnel::splice(&mut client, &mut stream).await {
            Ok((up, down)) => debug!(%target, up, down, "CONNECT relay finished"),
            Err(e) => {
                debug!(%target, error = %e, "CONNECT relay ended with an error");
                if crate::failed_early(early, &e) {
                    if let Ok(parts) = client.into_inner().downcast::<TokioIo<S>>() {
                        let mut io = parts.io.into_inner();
                        crate::reset_on_close(&mut io);
                    }
                }
                return Err(e.into());
            }
        }
    }
    Ok(())
}

/// Per-client-connection state shared by the requests on it. hyper serves
/// HTTP/1 requests strictly one after another, so the mutexes are never
/// contended; they exist because the service must be `Send + Sync`.
struct Proxy {
    dialer: Arc<dyn Dialer>,
    pages: Option<Arc<dyn LocalPages>>,
    auth: Option<Arc<LocalAuth>>,
    /// The upstream connection of the previous absolute-form request.
    upstream: Mutex<Option<Upstream>>,
    /// A successful CONNECT waiting for hyper to release the client stream.
    tunnel: Mutex<Option<Tunnel>>,
}

struct Upstream {
    target: Target,
    sender: SendRequest<Incoming>,
}

struct Tunnel {
    target: Target,
    on_upgrade: OnUpgrade,
    stream: BoxIo,
    /// Answered before the far end confirmed ([`Dialer::known`]).
    early: bool,
}

impl Proxy {
    async fn handle(&self, req: Request<Incoming>) -> Response<ProxyBody> {
        if let Some(auth) = &self.auth {
            if !proxy_authorized(req.headers(), auth) {
                debug!(method = %req.method(), "http proxy request without valid local credentials");
                return auth_required();
            }
        }
        if req.method() == Method::CONNECT {
            return self.connect(req).await;
        }
        match req.uri().scheme_str() {
            Some("http") => self.forward(req).await,
            Some("https") => text(
                StatusCode::BAD_REQUEST,
                "https:// URLs must be requested with CONNECT; configure this port as the HTTPS proxy too",
            ),
            None if self.pages.is_some() && req.method() == Method::GET => self.local_page(&req),
            None => text(
                StatusCode::BAD_REQUEST,
                "this is a proxy port; point your client at it as an HTTP proxy",
            ),
            Some(other) => text(StatusCode::BAD_REQUEST, &format!("unsupported URL scheme {other:?}")),
        }
    }

    /// A page of our own. Only for a `Host` naming this machine by address or `localhost`: a
    /// web page cannot make the browser send that to another site's name (no DNS rebinding).
    fn local_page(&self, req: &Request<Incoming>) -> Response<ProxyBody> {
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("");
        let name = if let Some(v6) = host.strip_prefix('[') {
            v6.split(']').next().unwrap_or("")
        } else {
            host.rsplit_once(':').map_or(host, |(h, _)| h)
        };
        if !matches!(
            name.to_ascii_lowercase().as_str(),
            "127.0.0.1" | "localhost" | "::1"
        ) {
            return text(
                StatusCode::BAD_REQUEST,
                "local pages answer only to Host 127.0.0.1 or localhost",
            );
        }
        match self.pages.as_ref().and_then(|p| p.page(req.uri().path())) {
            Some((content_type, body)) => {
                let mut response = Response::new(
                    Full::new(Bytes::from(body))
                        .map_err(|never| match never {})
                        .boxed(),
                );
                response
                    .headers_mut()
                    .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
                response
                    .headers_mut()
                    .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
                response
            }
            None => text(StatusCode::NOT_FOUND, "no such page"),
        }
    }

    /// `CONNECT host:port`: dial, answer 200, and leave the relay to
    /// [`serve_http`] once hyper releases the connection.
    async fn connect(&self, mut req: Request<Incoming>) -> Response<ProxyBody> {
        let Some(target) = target_of(req.uri(), None) else {
            return text(StatusCode::BAD_REQUEST, "CONNECT needs a host:port target");
        };
        let mode = crate::answer_mode(&*self.dialer, &target);
        let early = mode == OpenMode::Early;
        match self.dialer.dial(target.clone(), mode).await {
            Ok(stream) => {
                let on_upgrade = hyper::upgrade::on(&mut req);
                *lock(&self.tunnel) = Some(Tunnel {
                    target,
                    on_upgrade,
                    stream,
                    early,
                });
                Response::new(Empty::new().map_err(|never| match never {}).boxed())
            }
            Err(e) => dial_failed(&target, &e),
        }
    }

    /// An absolute-form request: forward it in origin-form, stream the answer.
    async fn forward(&self, req: Request<Incoming>) -> Response<ProxyBody> {
        let Some(target) = target_of(req.uri(), Some(80)) else {
            return text(StatusCode::BAD_REQUEST, "the request URL has no valid host");
        };
        let Some(req) = to_origin_form(req, &target) else {
            return text(
                StatusCode::BAD_REQUEST,
                "the request URL has an invalid path",
            );
        };
        let mut sender = match self.reusable(&target).await {
            Some(sender) => sender,
            None => match self.open(&target).await {
                Ok(sender) => sender,
                Err(response) => return response,
            },
        };
        match sender.send_request(req).await {
            Ok(response) => {
                // Keep the connection for the next request; it becomes ready
                // again once this response's body has been passed through.
                *lock(&self.upstream) = Some(Upstream { target, sender });
                let (mut parts, body) = response.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                Response::from_parts(parts, body.boxed())
            }
            Err(e) => {
                let (kind, reason) = classify(&e);
                debug!(%target, %kind, %reason, "upstream request failed");
                error_text(kind, &format!("{target}: {reason}"))
            }
        }
    }

    /// The kept upstream connection, if it goes to `target` and is usable.
    async fn reusable(&self, target: &Target) -> Option<SendRequest<Incoming>> {
        let kept = lock(&self.upstream).take()?;
        if kept.target != *target || kept.sender.is_closed() {
            return None;
        }
        let mut sender = kept.sender;
        match tokio::time::timeout(REUSE_WAIT, sender.ready()).await {
            Ok(Ok(())) => Some(sender),
            _ => None,
        }
    }

    /// Dial `target` and start an HTTP/1.1 client connection over the stream.
    async fn open(&self, target: &Target) -> Result<SendRequest<Incoming>, Response<ProxyBody>> {
        let stream = self
            .dialer
            .dial(target.clone(), OpenMode::Early)
            .await
            .map_err(|e| dial_failed(target, &e))?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| {
                let (kind, reason) = classify(&e);
                error_text(kind, &format!("{target}: {reason}"))
            })?;
        let target = target.clone();
        // The connection task drives the upstream socket; it ends when the
        // sender is dropped and the last response is done, or on error.
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                debug!(%target, error = %e, "upstream http connection ended with an error");
            }
        });
        Ok(sender)
    }
}

/// The target named by a request URI's authority (`host[:port]`).
fn target_of(uri: &Uri, default_port: Option<u16>) -> Option<Target> {
    let authority = uri.authority()?;
    let port = authority.port_u16().or(default_port)?;
    let target = Target::new(authority.host(), port);
    target.has_valid_host().then_some(target)
}

/// Rewrite an absolute-form request for the origin server: origin-form URI,
/// `Host` from the URL (RFC 9112 §3.2.2), no hop-by-hop or proxy headers.
fn to_origin_form(req: Request<Incoming>, target: &Target) -> Option<Request<Incoming>> {
    let (mut parts, body) = req.into_parts();
    let path = match parts.uri.path() {
        "" => "/",
        p => p,
    };
    let origin_form = match parts.uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    };
    parts.uri = origin_form.parse().ok()?;
    parts.version = Version::HTTP_11;
    strip_hop_by_hop(&mut parts.headers);
    // We answered any `Expect: 100-continue` ourselves (hyper does so when
    // the body is first read), so the origin must not wait for it again.
    parts.headers.remove(header::EXPECT);
    let host = match (target.port, target.host.contains(':')) {
        (80, false) => target.host.clone(),
        (80, true) => format!("[{}]", target.host),
        _ => target.to_string(),
    };
    parts
        .headers
        .insert(header::HOST, HeaderValue::from_str(&host).ok()?);
    Some(Request::from_parts(parts, body))
}

/// Remove headers that describe one hop rather than the message: the fixed
/// list, anything named in `Connection`, and our own proxy credentials.
/// hyper re-creates the framing (`Transfer-Encoding`) for each side.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        HeaderName::from_static("proxy-connection"),
        HeaderName::from_static("keep-alive"),
        header::PROXY_AUTHORIZATION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
}

/// Whether `Proxy-Authorization: Basic base64(user:pass)` matches.
fn proxy_authorized(headers: &HeaderMap, auth: &LocalAuth) -> bool {
    let Some(value) = headers
        .get(header::PROXY_AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let Some((scheme, encoded)) = value.trim().split_once(' ') else {
        return false;
    };
    if !scheme.eq_ignore_ascii_case("basic") {
        return false;
    }
    let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded.trim()) else {
        return false;
    };
    let Some(colon) = decoded.iter().position(|&b| b == b':') else {
        return false;
    };
    auth.check(&decoded[..colon], &decoded[colon + 1..])
}

/// Find the [`DialError`] behind a failed upstream exchange, if the dialer
/// reported one through the stream (see [`OpenMode::Early`]); otherwise
/// the failure is a generic bad gateway.
fn classify(err: &hyper::Error) -> (DialErrorKind, String) {
    let mut current: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = current {
        if let Some(dial) = e.downcast_ref::<DialError>() {
            return (dial.kind, dial.message.clone());
        }
        // `io::Error::source` skips the wrapped error itself; look inside.
        if let Some(dial) = e
            .downcast_ref::<std::io::Error>()
            .and_then(crate::dial_error_of)
        {
            return (dial.kind, dial.message.clone());
        }
        current = e.source();
    }
    let reason = match err.source() {
        Some(source) => format!("upstream failed: {err}: {source}"),
        None => format!("upstream failed: {err}"),
    };
    (DialErrorKind::Other, reason)
}

fn dial_failed(target: &Target, err: &DialError) -> Response<ProxyBody> {
    debug!(%target, kind = %err.kind, reason = %err, "http proxy dial failed");
    error_text(err.kind, &format!("{target}: {}", err.message))
}

/// A dial-style failure: mapped status, reason body, `X-Sallyport-Error`.
fn error_text(kind: DialErrorKind, reason: &str) -> Response<ProxyBody> {
    let status = StatusCode::from_u16(kind.http_status()).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut response = text(status, reason);
    response
        .headers_mut()
        .insert("x-sallyport-error", HeaderValue::from_static(kind.as_str()));
    response
}

fn auth_required() -> Response<ProxyBody> {
    let mut response = text(
        StatusCode::PROXY_AUTHENTICATION_REQUIRED,
        "proxy authentication required",
    );
    response.headers_mut().insert(
        header::PROXY_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"sallyport\""),
    );
    response
}

/// A short `text/plain` answer of our own: `sallyport: <message>\n`.
fn text(status: StatusCode, message: &str) -> Response<ProxyBody> {
    let body = Full::new(Bytes::from(format!("sallyport: {message}\n")));
    let mut response = Response::new(body.map_err(|never| match never {}).boxed());
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Lock without panicking: a poisoned lock only means another request's
/// task panicked; the `Option` inside is still meaningful.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
