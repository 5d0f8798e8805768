//! The HTTP fallback transport's endpoint: `{prefix}/agent/http…` (see `tunnel::http` for the
//! protocol).
//!
//! A connection whose first request is for this path is handed, with the head already read, to
//! a full HTTP/1.1 server (hyper), because these are ordinary requests with bodies on
//! keep-alive connections, not one upgrade. Every request is authenticated: with the bearer
//! token (the session's token id must match), or, for a session inside the inner channel, with
//! the per-request MAC under the key the agent sent in its hello. Every request of a session
//! must reach the instance that holds it: agents send a random per-session
//! `sallyport-affinity` header a load balancer hashes on, and answers carry a
//! `sallyport_instance` cookie (agents return cookies) for load balancers that stick by cookie.
//!
//! Against a hostile client:
//! - until one of its requests authenticates, a connection lives under the handshake deadline
//!   and its address's unauthenticated slot ([`crate::dmz::preauth`]): a stalled body, a slow second
//!   head or a stream of unauthenticated requests is closed at that deadline;
//! - no body is read before the credential is checked, except an inner-channel hello, which is
//!   capped at [`PREAUTH_BODY`] bytes; a session created by such a hello is *pending*
//!   (bounded per address and in all) until its token arrives inside the channel;
//! - after authentication, a request head must arrive within `limits.head_timeout` of the last
//!   answer (hyper's header read timeout, which also ends idle keep-alive connections), a body
//!   within [`BODY_TIMEOUT`], and a connection that moves no byte either way for
//!   [`IO_IDLE`] is closed.

use super::agent::agent_session;
use super::preauth::Slot;
use super::upgrade::{bearer, count_session, verify_token};
use super::Shared;
use crate::http::RequestHead;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tracing::{debug, info, Instrument};
use tunnel::http::server::{text, Body, Handle, RequestAuth};
use tunnel::http::{parse_query, verify_mac, MAC_HEADER, MAX_BATCH, SESSION_HEADER};

/// Largest request body read before the credential is checked: an inner-channel hello (a
/// Noise message and a 32-byte request key) is far smaller.
pub const PREAUTH_BODY: usize = 4 * 1024;

/// An authenticated request's body must arrive within this.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// A connection that moves no byte either way for this long is closed (above the 50 s a
/// long-polled answer may wait).
pub const IO_IDLE: Duration = Duration::from_secs(75);

/// Whether a connection has authenticated: one of its requests carried a valid bearer token,
/// or a valid MAC of a session whose token was checked.
#[derive(Default)]
struct ConnAuth {
    done: AtomicBool,
    /// A session whose MAC a request carried before its token was checked: once that session
    /// is confirmed, so is this connection (its streamed answer may have started earlier).
    pending: Mutex<Option<Weak<Handle>>>,
}

impl ConnAuth {
    fn is_done(&self) -> bool {
        self.done.load(Ordering::Acquire)
            || self
                .pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
                .and_then(Weak::upgrade)
                .is_some_and(|h| h.is_confirmed())
    }
}

/// Serves the connection (keep-alive) until the client closes it, it idles, or the gateway
/// shuts down. Until a request authenticates, the connection lives by `deadline` and `slot`.
pub(crate) async fn serve<S>(
    shared: Arc<Shared>,
    io: S,
    head: RequestHead,
    peer: SocketAddr,
    deadline: tokio::time::Instant,
    slot: Slot,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut replay = head.raw;
    replay.extend_from_slice(&head.leftover);
    let started = Instant::now();
    let activity = Arc::new(AtomicU64::new(0));
    let io = Rewind {
        pre: Bytes::from(replay),
        io,
        started,
        activity: activity.clone(),
    };
    let auth = Arc::new(ConnAuth::default());
    let service = {
        let (shared, auth) = (shared.clone(), auth.clone());
        hyper::service::service_fn(move |req| {
            let (shared, auth) = (shared.clone(), auth.clone());
            async move { Ok::<_, std::convert::Infallible>(handle(shared, req, peer, &auth).await) }
        })
    };
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(shared.config.limits.head_timeout)
        .serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let mut slot = Some(slot);
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    debug!(error = %e, "HTTP transport connection ended");
                }
                return;
            }
            _ = shared.shutdown.cancelled() => {
                conn.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(Duration::from_secs(2), conn).await;
                return;
            }
            _ = tokio::time::sleep_until(deadline), if slot.is_some() => {
                if !auth.is_done() {
                    debug!("HTTP transport connection not authenticated within the handshake deadline");
                    return;
                }
                slot = None;
            }
            _ = async { slot.as_ref().expect("guarded").evicted().await }, if slot.is_some() => {
                if !auth.is_done() {
                    debug!("unauthenticated HTTP transport connection evicted by a newer one from the same address");
                    return;
                }
                slot = None;
            }
            _ = tick.tick() => {
                if slot.is_some() && auth.is_done() {
                    // Authenticated: the address's unauthenticated slot is free again.
                    slot = None;
                }
                let last = Duration::from_millis(activity.load(Ordering::Relaxed));
                if started.elapsed().saturating_sub(last) > IO_IDLE {
                    debug!("HTTP transport connection idle: closed");
                    return;
                }
            }
        }
    }
}

/// The stickiness cookie: this instance's id, reduced to cookie-safe characters.
fn cookie(shared: &Shared) -> String {
    let id: String = shared
        .config
        .instance_id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .collect();
    format!("sallyport_instance={id}; Path=/; HttpOnly")
}

async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
    peer: SocketAddr,
    auth: &ConnAuth,
) -> Response<Body> {
    let client = request_client(&shared, peer, &req);
    let mut resp = route(&shared, req, client, auth).await;
    if let Ok(v) = hyper::header::HeaderValue::from_str(&cookie(&shared)) {
        resp.headers_mut().append("set-cookie", v);
    }
    resp.headers_mut().insert(
        "cache-control",
        hyper::header::HeaderValue::from_static("no-store"),
    );
    resp
}

/// The client of one request: a load balancer reuses its connections to us for requests of
/// different clients, so behind a trusted one each request's forwarded header names its client
/// (limits and audit lines are charged to it, not to whoever opened the connection).
fn request_client(shared: &Shared, peer: SocketAddr, req: &Request<Incoming>) -> SocketAddr {
    if !super::endpoints::is_trusted(&shared.config.trusted_proxies, peer.ip()) {
        return peer;
    }
    let head = RequestHead {
        method: req.method().to_string(),
        path: String::new(),
        headers: req
            .headers()
            .iter()
            .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
            .collect(),
        leftover: Vec::new(),
        raw: Vec::new(),
    };
    super::upgrade::client_addr(
        &shared.config.trusted_proxies,
        shared.config.forwarded_header,
        peer,
        &head,
    )
}

/// A refusal: status and one line.
type Refusal = (StatusCode, String);

/// The request's body: at most `limit` bytes, within [`BODY_TIMEOUT`].
async fn body_of(req: Request<Incoming>, limit: usize) -> Result<Bytes, Refusal> {
    let collect = Limited::new(req.into_body(), limit).collect();
    match tokio::time::timeout(BODY_TIMEOUT, collect).await {
        Ok(Ok(b)) => Ok(b.to_bytes()),
        Ok(Err(e)) => Err((
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body refused: {e}"),
        )),
        Err(_) => Err((
            StatusCode::REQUEST_TIMEOUT,
            format!("request body not complete within {BODY_TIMEOUT:?}"),
        )),
    }
}

async fn route(
    shared: &Arc<Shared>,
    req: Request<Incoming>,
    client: SocketAddr,
    auth: &ConnAuth,
) -> Response<Body> {
    let prefix = shared.config.prefix.as_str();
    let path = req.uri().path().to_string();
    let under = path.strip_prefix(prefix).unwrap_or("");
    let (rest, is_agent) = if let Some(rest) = under.strip_prefix("/agent/http") {
        (rest, true)
    } else if let Some(rest) = under.strip_prefix("/connector/http") {
        (rest, false)
    } else {
        return text(StatusCode::NOT_FOUND, "not found");
    };
    if rest.is_empty() {
        if req.method() != Method::POST {
            return text(StatusCode::METHOD_NOT_ALLOWED, "create a session with POST");
        }
        if !is_agent {
            // Connectors reach the fallback with protocol v2 only.
            let v2 = req
                .uri()
                .query()
                .is_some_and(|q| q.split('&').any(|kv| kv == "v=2"));
            if !v2 {
                return text(
                    StatusCode::UPGRADE_REQUIRED,
                    "the connector's HTTP transport needs protocol v2 (an sp2_ connector token)",
                );
            }
            return create_v2(shared, req, client, false).await;
        }
        return create(shared, req, client, auth).await;
    }
    let sid = rest.trim_start_matches('/').to_string();
    let q = match parse_query(req.uri().query().unwrap_or("")) {
        Ok(q) => q,
        Err(e) => return text(StatusCode::BAD_REQUEST, &e),
    };
    let Some(h) = shared.http_sessions.get(&sid) else {
        return text(
            StatusCode::NOT_FOUND,
            "no such HTTP session on this gateway instance (it ended or expired, or a load balancer sent the request to another instance: balance on the sallyport-affinity header, see docs/deploy.md)",
        );
    };
    let method = req.method().clone();
    if !matches!(method, Method::POST | Method::GET | Method::DELETE) {
        return text(StatusCode::METHOD_NOT_ALLOWED, "use POST, GET or DELETE");
    }
    let presented_mac = req
        .headers()
        .get(MAC_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    // A bearer session is checked before its body is read; a MAC covers the body, so it is
    // checked after reading it (bounded, and only for a session that exists).
    if let RequestAuth::Token(token_id) = h.auth() {
        if let Err((status, msg)) = check_bearer(shared, token_id, &req, client) {
            return text(status, &msg);
        }
    }
    let body = if method == Method::POST {
        match body_of(req, MAX_BATCH + 64 * 1024).await {
            Ok(body) => body,
            Err((status, msg)) => return text(status, &msg),
        }
    } else {
        Bytes::new()
    };
    let mac_ok = match h.auth() {
        RequestAuth::Token(_) => true,
        RequestAuth::Mac(key) => verify_mac(
            key,
            method.as_str(),
            h.sid(),
            q.seq,
            q.ack,
            &body,
            &presented_mac,
        ),
        RequestAuth::MacHead(key) => tunnel::http::verify_mac_head(
            key,
            method.as_str(),
            h.sid(),
            q.seq,
            q.ack,
            body.len(),
            &presented_mac,
        ),
    };
    if !mac_ok {
        return text(StatusCode::UNAUTHORIZED, "request MAC missing or wrong");
    }
    if h.is_confirmed() {
        auth.done.store(true, Ordering::Release);
    } else {
        *auth.pending.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::downgrade(&h));
    }
    match method {
        Method::POST => h.post(q, body).await,
        Method::GET => h.get(q).await,
        _ => h.delete().await,
    }
}

/// Authenticates one request of an existing bearer session: the same token id as at creation.
fn check_bearer(
    shared: &Shared,
    token_id: &str,
    req: &Request<Incoming>,
    client: SocketAddr,
) -> Result<(), Refusal> {
    let header = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok());
    match verify_token(shared, bearer(header), client, true) {
        Ok(id) if id.token_id == token_id => Ok(()),
        Ok(_) => Err((
            StatusCode::FORBIDDEN,
            "this session belongs to another token".into(),
        )),
        Err(msg) => Err((StatusCode::UNAUTHORIZED, msg.into())),
    }
}

/// `POST {prefix}/agent/http[?inner=1]`: a new session.
async fn create(
    shared: &Arc<Shared>,
    req: Request<Incoming>,
    client: SocketAddr,
    auth: &ConnAuth,
) -> Response<Body> {
    let query_has = |want: &str| {
        req.uri()
            .query()
            .is_some_and(|q| q.split('&').any(|kv| kv == want))
    };
    let inner = query_has("inner=1");
    if query_has("v=2") {
        return create_v2(shared, req, client, true).await;
    }
    if !shared.config.v2.v1_open(std::time::SystemTime::now()) {
        return text(StatusCode::UPGRADE_REQUIRED, super::v2::V1_CLOSED);
    }
    let presented = bearer(
        req.headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok()),
    )
    .to_string();
    let span = tracing::info_span!("session", client = %client, transport = "http");
    // Each session's tunnel hello gets the handshake deadline from now.
    let deadline = tokio::time::Instant::now() + shared.config.limits.handshake_timeout;
    if !inner {
        // The token before the body: an unauthenticated client never makes us read one.
        let id = match verify_token(shared, &presented, client, true) {
            Ok(id) => id,
            Err(msg) => return text(StatusCode::UNAUTHORIZED, msg),
        };
        auth.done.store(true, Ordering::Release);
        let Some(slot) = count_session(shared, &id, true, client) else {
            return text(
                StatusCode::TOO_MANY_REQUESTS,
                "too many sessions for this token",
            );
        };
        let Some((h, transport)) = shared
            .http_sessions
            .create(RequestAuth::Token(id.token_id.clone()))
        else {
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                "gateway is at its session limit",
            );
        };
        let sh = shared.clone();
        shared
            .tracker
            .spawn(agent_session(sh, transport, id, client, slot, deadline).instrument(span));
        return created(h.sid(), Bytes::new());
    }
    let body = match body_of(req, PREAUTH_BODY).await {
        Ok(b) => b,
        Err((status, msg)) => return text(status, &msg),
    };
    let Some(key) = &shared.config.inner_key else {
        return text(
            StatusCode::FORBIDDEN,
            "this gateway has no inner key configured (inner_key in its config)",
        );
    };
    let accepted = match tunnel::inner::respond(key, &body) {
        Ok(a) => a,
        Err(e) => {
            info!(error = %e, %client, "inner handshake refused");
            return text(
                StatusCode::FORBIDDEN,
                &crate::dmz::inner::mismatch_text(key),
            );
        }
    };
    let Ok(mac_key) = <[u8; 32]>::try_from(accepted.payload.as_slice()) else {
        return text(
            StatusCode::BAD_REQUEST,
            "the inner hello must carry a 32-byte request key",
        );
    };
    // Anyone can make an inner hello from the gateway's public key: until the token arrives
    // inside, the session holds one of its address's unauthenticated slots and counts as
    // pending, and it ends at the deadline.
    let Some(pending_slot) = shared.preauth.enter(client.ip()) else {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many unauthenticated sessions; retry later",
        );
    };
    let Some((h, transport)) = shared.http_sessions.create_pending(
        RequestAuth::Mac(mac_key),
        shared.config.limits.handshake_timeout,
    ) else {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "gateway is at its limit of sessions waiting for their token; retry later",
        );
    };
    let sh = shared.clone();
    let t = tunnel::inner::InnerTransport::new(transport, accepted.cipher);
    let handle = h.clone();
    shared.tracker.spawn(
        async move {
            let authed = tokio::select! {
                a = crate::dmz::inner::authenticate(&sh, t, client, deadline) => a,
                _ = pending_slot.evicted() => {
                    debug!("pending HTTP session evicted by a newer unauthenticated one from the same address");
                    None
                }
            };
            drop(pending_slot);
            if let Some((t, id, slot)) = authed {
                handle.confirm();
                agent_session(sh.clone(), t, id, client, slot, deadline).await;
            }
        }
        .instrument(span),
    );
    created(h.sid(), accepted.reply)
}

/// `POST {prefix}/agent/http?v=2` (or `/connector/http?v=2`): a new session with protocol v2.
/// The body is msg1 (with the request key); the answer is msg2; msg3 comes as the first record,
/// the verdict as the first record down. The session stays sealed: each request may ride
/// another TLS connection.
async fn create_v2(
    shared: &Arc<Shared>,
    req: Request<Incoming>,
    client: SocketAddr,
    is_agent: bool,
) -> Response<Body> {
    let span = tracing::info_span!("session", client = %client, transport = "http");
    let deadline = tokio::time::Instant::now() + shared.config.limits.handshake_timeout;
    // Every msg1 costs key generation and two X25519 operations: each one counts, not only
    // each TCP connection.
    if !shared.handshakes.charge(client.ip()) {
        return text(
            StatusCode::TOO_MANY_REQUESTS,
            "too many handshakes from this address; retry later",
        );
    }
    let body = match body_of(req, PREAUTH_BODY).await {
        Ok(b) => b,
        Err((status, msg)) => return text(status, &msg),
    };
    let (responder, offer, msg2) = match super::v2::answer1(shared, &body, is_agent, false) {
        Ok(x) => x,
        Err(t) => return text(StatusCode::FORBIDDEN, &t),
    };
    let Ok(mac_key) = <[u8; 32]>::try_from(responder.payload()) else {
        return text(
            StatusCode::BAD_REQUEST,
            "the v2 hello must carry a 32-byte request key",
        );
    };
    let Some(pending_slot) = shared.preauth.enter(client.ip()) else {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many unauthenticated sessions; retry later",
        );
    };
    let Some((h, transport)) = shared.http_sessions.create_pending(
        RequestAuth::MacHead(mac_key),
        shared.config.limits.handshake_timeout,
    ) else {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "gateway is at its limit of sessions waiting for their token; retry later",
        );
    };
    let sh = shared.clone();
    let handle = h.clone();
    shared.tracker.spawn(
        async move {
            let (tx, rx) = tunnel::Transport::split(transport);
            let accept = super::v2::accept(
                &sh, tx, rx, responder, &offer, None, false, client, deadline, is_agent,
            );
            let authed = tokio::select! {
                a = accept => a,
                _ = pending_slot.evicted() => {
                    debug!("pending HTTP session evicted by a newer unauthenticated one from the same address");
                    None
                }
            };
            drop(pending_slot);
            if let Some((t, id, slot)) = authed {
                handle.confirm();
                if is_agent {
                    agent_session(sh.clone(), t, id, client, slot, deadline).await;
                } else {
                    super::connector::connector_session(sh.clone(), t, id, client, slot, deadline)
                        .await;
                }
            }
        }
        .instrument(span),
    );
    created(h.sid(), msg2)
}

fn created(sid: &str, body: Bytes) -> Response<Body> {
    let mut r = Response::new(Full::new(body).map_err(|n| match n {}).boxed());
    if let Ok(v) = hyper::header::HeaderValue::from_str(sid) {
        r.headers_mut().insert(SESSION_HEADER, v);
    }
    r
}

/// A stream that first yields bytes already read from it (the request head), and notes when
/// bytes last moved either way (milliseconds after `started`).
struct Rewind<S> {
    pre: Bytes,
    io: S,
    started: Instant,
    activity: Arc<AtomicU64>,
}

impl<S> Rewind<S> {
    fn moved(&self) {
        self.activity
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.pre.is_empty() {
            let n = self.pre.len().min(buf.remaining());
            let chunk = self.pre.split_to(n);
            buf.put_slice(&chunk);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.moved();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.moved();
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.moved();
        }
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}
