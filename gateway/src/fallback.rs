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

use crate::dmz::{agent_session, bearer, count_session, verify_token, Shared};
use crate::http::RequestHead;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tracing::{debug, info, Instrument};
use tunnel::http::server::{text, Body, Handle, RequestAuth};
use tunnel::http::{parse_query, verify_mac, MAC_HEADER, MAX_BATCH, SESSION_HEADER};

/// Serves the connection (keep-alive) until the client closes it or the gateway shuts down.
pub(crate) async fn serve<S>(shared: Arc<Shared>, io: S, head: RequestHead, client: SocketAddr)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut replay = head.raw;
    replay.extend_from_slice(&head.leftover);
    let io = Rewind {
        pre: Bytes::from(replay),
        io,
    };
    let service = {
        let shared = shared.clone();
        hyper::service::service_fn(move |req| {
            let shared = shared.clone();
            async move { Ok::<_, std::convert::Infallible>(handle(shared, req, client).await) }
        })
    };
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => if let Err(e) = r { debug!(error = %e, "HTTP transport connection ended") },
        _ = shared.shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), conn).await;
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

async fn handle(shared: Arc<Shared>, req: Request<Incoming>, client: SocketAddr) -> Response<Body> {
    let mut resp = route(&shared, req, client).await;
    if let Ok(v) = hyper::header::HeaderValue::from_str(&cookie(&shared)) {
        resp.headers_mut().append("set-cookie", v);
    }
    resp.headers_mut().insert(
        "cache-control",
        hyper::header::HeaderValue::from_static("no-store"),
    );
    resp
}

/// A refusal: status and one line.
type Refusal = (StatusCode, String);

async fn body_of(req: Request<Incoming>) -> Result<Bytes, Refusal> {
    match Limited::new(req.into_body(), MAX_BATCH + 64 * 1024)
        .collect()
        .await
    {
        Ok(b) => Ok(b.to_bytes()),
        Err(e) => Err((
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body refused: {e}"),
        )),
    }
}

async fn route(shared: &Arc<Shared>, req: Request<Incoming>, client: SocketAddr) -> Response<Body> {
    let prefix = shared.config.prefix.as_str();
    let path = req.uri().path().to_string();
    let Some(rest) = path
        .strip_prefix(prefix)
        .and_then(|p| p.strip_prefix("/agent/http"))
    else {
        return text(StatusCode::NOT_FOUND, "not found");
    };
    if rest.is_empty() {
        if req.method() != Method::POST {
            return text(StatusCode::METHOD_NOT_ALLOWED, "create a session with POST");
        }
        return create(shared, req, client).await;
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
    if let Err((status, msg)) = check(shared, &h, &req, q.seq, q.ack, client) {
        return text(status, &msg);
    }
    let method = req.method().clone();
    match method {
        Method::POST => match body_of(req).await {
            Ok(body) => h.post(q, body).await,
            Err((status, msg)) => text(status, &msg),
        },
        Method::GET => h.get(q).await,
        Method::DELETE => h.delete().await,
        _ => text(StatusCode::METHOD_NOT_ALLOWED, "use POST, GET or DELETE"),
    }
}

/// Authenticates one request of an existing session.
fn check(
    shared: &Shared,
    h: &Handle,
    req: &Request<Incoming>,
    seq: u64,
    ack: u64,
    client: SocketAddr,
) -> Result<(), Refusal> {
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
    match h.auth() {
        RequestAuth::Token(token_id) => {
            match verify_token(shared, bearer(header("authorization")), client, true) {
                Ok(id) if id.token_id == *token_id => Ok(()),
                Ok(_) => Err((
                    StatusCode::FORBIDDEN,
                    "this session belongs to another token".into(),
                )),
                Err(msg) => Err((StatusCode::UNAUTHORIZED, msg.into())),
            }
        }
        RequestAuth::Mac(key) => {
            let presented = header(MAC_HEADER).unwrap_or("");
            if verify_mac(key, req.method().as_str(), h.sid(), seq, ack, presented) {
                Ok(())
            } else {
                Err((
                    StatusCode::UNAUTHORIZED,
                    "request MAC missing or wrong".into(),
                ))
            }
        }
    }
}

/// `POST {prefix}/agent/http[?inner=1]`: a new session.
async fn create(
    shared: &Arc<Shared>,
    req: Request<Incoming>,
    client: SocketAddr,
) -> Response<Body> {
    let inner = req
        .uri()
        .query()
        .is_some_and(|q| q.split('&').any(|kv| kv == "inner=1"));
    let presented = bearer(
        req.headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok()),
    )
    .to_string();
    let body = match body_of(req).await {
        Ok(b) => b,
        Err((status, msg)) => return text(status, &msg),
    };
    let span = tracing::info_span!("session", client = %client, transport = "http");
    if !inner {
        let id = match verify_token(shared, &presented, client, true) {
            Ok(id) => id,
            Err(msg) => return text(StatusCode::UNAUTHORIZED, msg),
        };
        let Some(slot) = count_session(shared, &id, true) else {
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
            .spawn(agent_session(sh, transport, id, client, slot).instrument(span));
        return created(h.sid(), Bytes::new());
    }
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
            return text(StatusCode::FORBIDDEN, &crate::inner::mismatch_text(key));
        }
    };
    let Ok(mac_key) = <[u8; 32]>::try_from(accepted.payload.as_slice()) else {
        return text(
            StatusCode::BAD_REQUEST,
            "the inner hello must carry a 32-byte request key",
        );
    };
    let Some((h, transport)) = shared.http_sessions.create(RequestAuth::Mac(mac_key)) else {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "gateway is at its session limit",
        );
    };
    let sh = shared.clone();
    let t = tunnel::inner::InnerTransport::new(transport, accepted.cipher);
    let deadline = tokio::time::Instant::now() + shared.config.limits.handshake_timeout;
    shared.tracker.spawn(
        async move {
            if let Some((t, id, slot)) = crate::inner::authenticate(&sh, t, client, deadline).await
            {
                agent_session(sh.clone(), t, id, client, slot).await;
            }
        }
        .instrument(span),
    );
    created(h.sid(), accepted.reply)
}

fn created(sid: &str, body: Bytes) -> Response<Body> {
    let mut r = Response::new(Full::new(body).map_err(|n| match n {}).boxed());
    if let Ok(v) = hyper::header::HeaderValue::from_str(sid) {
        r.headers_mut().insert(SESSION_HEADER, v);
    }
    r
}

/// A stream that first yields bytes already read from it (the request head).
struct Rewind<S> {
    pre: Bytes,
    io: S,
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
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
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
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}
