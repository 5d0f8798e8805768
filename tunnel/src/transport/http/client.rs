//! The agent's side of the HTTP transport.
//!
//! Two background tasks, each with its own HTTP/1.1 connection (dialed by the caller, through
//! whatever proxy the way out needs; redialed when it breaks):
//! - **up**: takes what the session's writer queued, up to `UP_BATCH` per `POST`, one
//!   `POST` at a time (so batches arrive in order); a failed `POST` is resent with the same
//!   `seq` until it succeeds or [`GIVE_UP`] passes, carrying half as many messages after each
//!   failure (a path that cuts connections after so many bytes still lets a batch through;
//!   batches grow back as `POST`s succeed). With nothing to send it still posts an empty
//!   batch now and then to acknowledge what came down, so the gateway can free it.
//! - **down**: one `GET` at a time, streamed or long-polled, resuming from what was received.
//!   A response cut after it brought messages is progress, not a failure (no backoff, and it
//!   does not count towards [`GIVE_UP`]). A streamed `GET` whose first keepalive does not
//!   arrive within [`super::BUFFERING_DETECT`] means a proxy buffers responses: switch to
//!   long-poll (logged once).
//!
//! Stickiness (every request of a session must reach the gateway instance that holds it):
//! cookies the gateway or a load balancer set are sent back on every request, and every
//! request, the first one too, carries a random per-session `sallyport-affinity` header a
//! load balancer can hash on.

use super::{put_record, take_record, DownMode, MAC_HEADER, SESSION_HEADER};
use crate::transport::{Transport, TransportError, TransportRx, TransportTx};
use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// A byte stream to the gateway (TLS through the way out, or plain in tests).
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}
pub type GatewayIo = Box<dyn Io>;
/// Opens a new connection to the gateway.
pub type Redial =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<GatewayIo, String>> + Send>> + Send + Sync>;

/// Upstream batch target: a `POST` body stays below ~600 KiB, under common proxy limits
/// (nginx's `client_max_body_size` default is 1 MiB).
const UP_BATCH: usize = 512 * 1024;
/// Requests keep failing for this long: the transport gives up (the session then reconnects).
pub const GIVE_UP: Duration = Duration::from_secs(30);
/// Acknowledge after this many downstream bytes even with nothing to send.
const ACK_BYTES: usize = 256 * 1024;
/// …or after this long.
const ACK_EVERY: Duration = Duration::from_millis(500);
/// Failed `POST`s shrink the batches down to this (or one message).
const MIN_BATCH: usize = 16 * 1024;

/// What the transport needs to know.
#[derive(Clone)]
pub struct Options {
    /// `Host` header: the gateway's authority.
    pub host: String,
    /// Path of the create request, e.g. `/sallyport/agent/http`.
    pub base: String,
    /// Bearer token (a session without the inner channel).
    pub bearer: Option<String>,
    /// Request key (a session inside the inner channel).
    pub mac_key: Option<[u8; 32]>,
    /// Forced downstream mode; `None`: streamed, switching to long-poll on a buffering proxy.
    pub mode: Option<DownMode>,
    /// Connect + answer deadline of one request.
    pub timeout: Duration,
}

impl std::fmt::Debug for Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Options")
            .field("host", &self.host)
            .field("base", &self.base)
            .field("bearer", &self.bearer.as_ref().map(|_| "****"))
            .field("mac_key", &self.mac_key.as_ref().map(|_| "****"))
            .field("mode", &self.mode)
            .finish()
    }
}

/// Why the transport could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("gateway answered HTTP {status}: {body}")]
    Refused { status: u16, body: String },
    #[error("{0}")]
    Io(String),
}

impl HttpError {
    pub fn status(&self) -> Option<u16> {
        match self {
            HttpError::Refused { status, .. } => Some(*status),
            HttpError::Io(_) => None,
        }
    }
}

/// A session created over HTTP.
pub struct Created {
    pub transport: HttpTransport,
    /// The gateway's answer to the first message (the inner-channel reply).
    pub reply: Bytes,
    pub sid: String,
}

struct Shared {
    opts: Options,
    dial: Redial,
    sid: Mutex<String>,
    cookies: Mutex<Vec<(String, String)>>,
    /// Downstream messages received (the next expected index).
    received: AtomicU64,
    /// Downstream bytes since the last acknowledgement.
    unacked: AtomicUsize,
    ack_wanted: Notify,
    polling: AtomicBool,
    stop: CancellationToken,
    /// Random per session, sent as `sallyport-affinity` on every request (the create request
    /// too): a load balancer that hashes on it keeps a session on one gateway instance.
    affinity: String,
    /// The MAC covers the body (v1's inner channel); protocol v2 MACs the head and the body's
    /// length only: its records are sealed, and their AEAD is what protects their content.
    mac_body: bool,
}

/// One HTTP/1.1 connection.
struct Conn(SendRequest<Full<Bytes>>);

impl Shared {
    fn sid(&self) -> String {
        self.sid.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    async fn open(&self) -> Result<Conn, String> {
        let io = tokio::time::timeout(self.opts.timeout, (self.dial)())
            .await
            .map_err(|_| format!("no connection within {:?}", self.opts.timeout))??;
        self.handshake(io).await
    }

    async fn handshake(&self, io: GatewayIo) -> Result<Conn, String> {
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| e.to_string())?;
        let stop = self.stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = conn => {}
                _ = stop.cancelled() => {}
            }
        });
        Ok(Conn(sender))
    }

    fn request(
        &self,
        method: &str,
        path: String,
        body: Bytes,
        seq: u64,
        ack: u64,
    ) -> Request<Full<Bytes>> {
        let mut b = Request::builder()
            .method(method)
            .uri(path)
            .header("host", &self.opts.host)
            .header(
                "sallyport-protocol",
                concat!("1; ", env!("CARGO_PKG_VERSION")),
            )
            .header("cache-control", "no-store")
            .header(super::AFFINITY_HEADER, &self.affinity);
        if let Some(t) = &self.opts.bearer {
            let mut v = hyper::header::HeaderValue::from_str(&format!("Bearer {t}"))
                .unwrap_or_else(|_| hyper::header::HeaderValue::from_static(""));
            v.set_sensitive(true);
            b = b.header("authorization", v);
        }
        if let Some(k) = &self.opts.mac_key {
            let sid = self.sid();
            if !sid.is_empty() {
                let mac = if self.mac_body {
                    super::request_mac(k, method, &sid, seq, ack, &body)
                } else {
                    super::request_mac_head(k, method, &sid, seq, ack, body.len())
                };
                b = b.header(MAC_HEADER, mac);
            }
        }
        let cookies = self.cookies.lock().unwrap_or_else(|e| e.into_inner());
        if !cookies.is_empty() {
            let c = cookies
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join("; ");
            b = b.header("cookie", c);
        }
        drop(cookies);
        b.body(Full::new(body))
            .unwrap_or_else(|_| Request::new(Full::new(Bytes::new())))
    }

    fn keep_cookies<B>(&self, resp: &Response<B>) {
        let mut jar = self.cookies.lock().unwrap_or_else(|e| e.into_inner());
        for v in resp.headers().get_all("set-cookie") {
            let Ok(v) = v.to_str() else { continue };
            let pair = v.split(';').next().unwrap_or("");
            if let Some((k, val)) = pair.split_once('=') {
                let (k, val) = (k.trim().to_string(), val.trim().to_string());
                if k.is_empty() || jar.len() >= 8 && !jar.iter().any(|(n, _)| *n == k) {
                    continue;
                }
                jar.retain(|(n, _)| *n != k);
                jar.push((k, val));
            }
        }
    }

    /// Sends `req` on `slot` (opening a connection when there is none); the answer's head.
    async fn send(
        &self,
        slot: &mut Option<Conn>,
        req: Request<Full<Bytes>>,
        head_within: Duration,
    ) -> Result<Response<hyper::body::Incoming>, String> {
        if slot.as_ref().is_some_and(|c| c.0.is_closed()) {
            *slot = None;
        }
        if slot.is_none() {
            *slot = Some(self.open().await?);
        }
        let conn = slot.as_mut().ok_or("no connection")?;
        let sent = async {
            conn.0.ready().await.map_err(|e| e.to_string())?;
            conn.0.send_request(req).await.map_err(|e| e.to_string())
        };
        match tokio::time::timeout(head_within, sent).await {
            Ok(Ok(r)) => {
                self.keep_cookies(&r);
                Ok(r)
            }
            Ok(Err(e)) => {
                *slot = None;
                Err(e)
            }
            Err(_) => {
                *slot = None;
                Err(format!("no answer within {head_within:?}"))
            }
        }
    }
}

async fn read_all(resp: Response<hyper::body::Incoming>, limit: usize) -> Result<Bytes, String> {
    let mut body = resp.into_body();
    let mut out = BytesMut::new();
    while let Some(f) = body.frame().await {
        let f = f.map_err(|e| e.to_string())?;
        if let Ok(d) = f.into_data() {
            if out.len() + d.len() > limit {
                return Err("answer too large".into());
            }
            out.extend_from_slice(&d);
        }
    }
    Ok(out.freeze())
}

/// Creates a session: `first` goes in the create request (the inner-channel hello, or empty).
/// `io`, when given, is used for the first connection (the stream the probe opened).
pub async fn connect(
    dial: Redial,
    io: Option<GatewayIo>,
    opts: Options,
    first: Bytes,
) -> Result<Created, HttpError> {
    let query = opts.mac_key.map(|_| "inner=1");
    connect_query(dial, io, opts, first, query.unwrap_or(""), true).await
}

/// A protocol v2 session (`?v=2`, `first` is msg1): requests carry a MAC of their head and
/// body length under `opts.mac_key`; the sealed records protect the body.
pub async fn connect_v2(
    dial: Redial,
    io: Option<GatewayIo>,
    opts: Options,
    first: Bytes,
) -> Result<Created, HttpError> {
    connect_query(dial, io, opts, first, "v=2", false).await
}

/// [`connect`] with the create request's query given (empty for none), and whether the MAC
/// covers request bodies.
async fn connect_query(
    dial: Redial,
    io: Option<GatewayIo>,
    opts: Options,
    first: Bytes,
    query: &str,
    mac_body: bool,
) -> Result<Created, HttpError> {
    let shared = Arc::new(Shared {
        polling: AtomicBool::new(opts.mode == Some(DownMode::Poll)),
        opts,
        dial,
        sid: Mutex::new(String::new()),
        cookies: Mutex::new(Vec::new()),
        received: AtomicU64::new(0),
        unacked: AtomicUsize::new(0),
        ack_wanted: Notify::new(),
        stop: CancellationToken::new(),
        affinity: {
            let mut raw = [0u8; 8];
            rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut raw);
            hex::encode(raw)
        },
        mac_body,
    });
    let mut conn = match io {
        Some(io) => Some(shared.handshake(io).await.map_err(HttpError::Io)?),
        None => None,
    };
    // A session inside the inner channel says so: its token comes later, sealed.
    let create = match query {
        "" => shared.opts.base.clone(),
        q => format!("{}?{q}", shared.opts.base),
    };
    let req = shared.request("POST", create, first, 0, 0);
    let resp = shared
        .send(&mut conn, req, shared.opts.timeout)
        .await
        .map_err(HttpError::Io)?;
    let status = resp.status();
    let sid = resp
        .headers()
        .get(SESSION_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = read_all(resp, 64 * 1024).await.map_err(HttpError::Io)?;
    if !status.is_success() {
        return Err(HttpError::Refused {
            status: status.as_u16(),
            // Shown to the user, and unauthenticated: no control characters (terminal escapes).
            body: String::from_utf8_lossy(&body[..body.len().min(300)])
                .trim()
                .chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .collect(),
        });
    }
    let sid = sid
        .filter(|s| !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric()))
        .ok_or_else(|| HttpError::Refused {
            status: status.as_u16(),
            body: "the answer has no session id: not a sallyport gateway, or a proxy altered it"
                .into(),
        })?;
    *shared.sid.lock().unwrap_or_else(|e| e.into_inner()) = sid.clone();
    let (up_tx, up_rx) = mpsc::channel::<Bytes>(64);
    let (down_tx, down_rx) = mpsc::channel::<Result<Bytes, TransportError>>(64);
    tokio::spawn(up(shared.clone(), conn, up_rx, down_tx.clone()));
    tokio::spawn(down(shared.clone(), down_tx));
    Ok(Created {
        transport: HttpTransport {
            tx: HttpTx { tx: Some(up_tx) },
            rx: HttpRx { rx: down_rx },
        },
        reply: body,
        sid,
    })
}

/// The body of a `POST` carrying `msgs`.
fn encode_batch(msgs: &[Bytes], capacity: usize) -> Bytes {
    let mut body = BytesMut::with_capacity(capacity);
    for m in msgs {
        put_record(&mut body, m);
    }
    body.freeze()
}

/// Backoff between retries of a failing request.
fn backoff(n: u32) -> Duration {
    Duration::from_millis((100u64 << n.min(5)).min(2000))
}

async fn up(
    s: Arc<Shared>,
    mut conn: Option<Conn>,
    mut rx: mpsc::Receiver<Bytes>,
    fail: mpsc::Sender<Result<Bytes, TransportError>>,
) {
    let mut next: u64 = 0;
    let mut batch: Vec<Bytes> = Vec::new();
    let mut ack_tick = tokio::time::interval(ACK_EVERY);
    ack_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut acked: u64 = 0;
    // Bytes per POST: shrinks when POSTs fail, grows back as they succeed.
    let mut limit = UP_BATCH;
    loop {
        if batch.is_empty() {
            tokio::select! {
                m = rx.recv() => match m {
                    Some(m) => batch.push(m),
                    None => break,
                },
                _ = s.ack_wanted.notified() => {}
                _ = ack_tick.tick() => {
                    if s.received.load(Ordering::Relaxed) == acked {
                        continue;
                    }
                }
                _ = s.stop.cancelled() => return,
            }
        }
        let mut size: usize = batch.iter().map(|m| m.len() + 4).sum();
        while size < limit {
            match rx.try_recv() {
                Ok(m) => {
                    size += m.len() + 4;
                    batch.push(m);
                }
                Err(_) => break,
            }
        }
        // How many messages of `batch` this POST carries: what fits in `limit` (at least one),
        // halved after every failure: a path that cuts connections after some bytes or seconds
        // must still let a smaller batch through. The rest follows with the next seq.
        let mut count = 0;
        let mut bytes = 0;
        while count < batch.len() && (count == 0 || bytes + batch[count].len() + 4 <= limit) {
            bytes += batch[count].len() + 4;
            count += 1;
        }
        let mut body = encode_batch(&batch[..count], bytes);
        let mut failures = 0u32;
        let started = tokio::time::Instant::now();
        loop {
            let ack = s.received.load(Ordering::Relaxed);
            s.unacked.store(0, Ordering::Relaxed);
            let path = format!("{}/{}?seq={next}&ack={ack}", s.opts.base, s.sid());
            let req = s.request("POST", path, body.clone(), next, ack);
            let why = match s.send(&mut conn, req, s.opts.timeout).await {
                Ok(resp) => {
                    let status = resp.status();
                    let text = read_all(resp, 4096).await;
                    if status.is_success() && text.is_ok() {
                        next += count as u64;
                        acked = ack;
                        batch.drain(..count);
                        limit = (limit * 2).min(UP_BATCH);
                        break;
                    }
                    let text = text.map(|b| String::from_utf8_lossy(&b).trim().to_string());
                    let text = text.unwrap_or_else(|e| e);
                    if matches!(
                        status,
                        StatusCode::NOT_FOUND
                            | StatusCode::UNAUTHORIZED
                            | StatusCode::FORBIDDEN
                            | StatusCode::CONFLICT
                            | StatusCode::BAD_REQUEST
                    ) {
                        let _ = fail
                            .send(Err(TransportError::Io(format!(
                                "gateway answered HTTP {}: {text}",
                                status.as_u16()
                            ))))
                            .await;
                        s.stop.cancel();
                        return;
                    }
                    format!("HTTP {}: {text}", status.as_u16())
                }
                Err(e) => e,
            };
            if started.elapsed() > GIVE_UP {
                let _ = fail
                    .send(Err(TransportError::Io(format!(
                        "sending to the gateway failed for {GIVE_UP:?}: {why}"
                    ))))
                    .await;
                s.stop.cancel();
                return;
            }
            debug!(error = %why, "HTTP transport: POST failed; resending");
            if count > 1 {
                count = count.div_ceil(2);
                body = encode_batch(&batch[..count], body.len());
                limit = body.len().max(MIN_BATCH);
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff(failures)) => {}
                _ = s.stop.cancelled() => return,
            }
            failures += 1;
        }
    }
    // The session is done: tell the gateway, briefly.
    let ack = s.received.load(Ordering::Relaxed);
    let path = format!("{}/{}?seq={next}&ack={ack}", s.opts.base, s.sid());
    let req = s.request("DELETE", path, Bytes::new(), next, ack);
    let _ = tokio::time::timeout(
        Duration::from_secs(2),
        s.send(&mut conn, req, s.opts.timeout),
    )
    .await;
    s.stop.cancel();
}

async fn down(s: Arc<Shared>, out: mpsc::Sender<Result<Bytes, TransportError>>) {
    let mut conn: Option<Conn> = None;
    let mut failures = 0u32;
    let mut failing_since: Option<tokio::time::Instant> = None;
    let auto = s.opts.mode.is_none();
    loop {
        if s.stop.is_cancelled() {
            return;
        }
        let poll = s.polling.load(Ordering::Relaxed);
        let ack = s.received.load(Ordering::Relaxed);
        let mode = if poll {
            DownMode::Poll
        } else {
            DownMode::Stream
        };
        let path = format!(
            "{}/{}?ack={ack}&mode={}",
            s.opts.base,
            s.sid(),
            mode.as_str()
        );
        let req = s.request("GET", path, Bytes::new(), 0, ack);
        // A streamed answer must show its first keepalive soon; a long-poll may take its wait.
        let head_within = match (poll, auto) {
            (true, _) => super::POLL_WAIT + s.opts.timeout,
            (false, true) => super::BUFFERING_DETECT,
            (false, false) => s.opts.timeout,
        };
        let mut progressed = false;
        let result = tokio::select! {
            r = read_down(&s, &mut conn, req, head_within, poll, auto, &out, &mut progressed) => r,
            _ = s.stop.cancelled() => return,
        };
        if progressed || s.received.load(Ordering::Relaxed) > ack {
            // A response that was answered (or brought messages) is no failure, whatever
            // ended it: a load balancer's idle timeout shorter than our keepalive interval, or
            // a path that cuts long responses, would otherwise add up to GIVE_UP.
            failures = 0;
            failing_since = None;
        }
        let why = match result {
            Ok(()) => {
                failures = 0;
                failing_since = None;
                continue;
            }
            Err(Down::Fatal(e)) => {
                let _ = out.send(Err(TransportError::Io(e))).await;
                s.stop.cancel();
                return;
            }
            Err(Down::Closed) => return,
            Err(Down::Buffered) => {
                warn!("responses from the gateway are buffered on the way (a proxy holds them until they end); switching the HTTP transport to long-poll");
                s.polling.store(true, Ordering::Relaxed);
                conn = None;
                continue;
            }
            Err(Down::Retry(e)) => e,
        };
        let since = *failing_since.get_or_insert_with(tokio::time::Instant::now);
        if since.elapsed() > GIVE_UP {
            let _ = out
                .send(Err(TransportError::Io(format!(
                    "receiving from the gateway failed for {GIVE_UP:?}: {why}"
                ))))
                .await;
            s.stop.cancel();
            return;
        }
        debug!(error = %why, "HTTP transport: GET failed; asking again");
        tokio::select! {
            _ = tokio::time::sleep(backoff(failures)) => {}
            _ = s.stop.cancelled() => return,
        }
        failures += 1;
    }
}

enum Down {
    Retry(String),
    Fatal(String),
    Buffered,
    Closed,
}

#[allow(clippy::too_many_arguments)]
async fn read_down(
    s: &Shared,
    conn: &mut Option<Conn>,
    req: Request<Full<Bytes>>,
    head_within: Duration,
    poll: bool,
    auto: bool,
    out: &mpsc::Sender<Result<Bytes, TransportError>>,
    progressed: &mut bool,
) -> Result<(), Down> {
    let sent_at = tokio::time::Instant::now();
    let resp = match s.send(conn, req, head_within).await {
        Ok(r) => r,
        Err(e) if !poll && auto && sent_at.elapsed() >= head_within => {
            debug!(error = %e, "streamed GET: no answer in time");
            return Err(Down::Buffered);
        }
        Err(e) => return Err(Down::Retry(e)),
    };
    let status = resp.status();
    if !status.is_success() {
        let text = read_all(resp, 4096)
            .await
            .map(|b| String::from_utf8_lossy(&b).trim().to_string())
            .unwrap_or_default();
        let msg = format!("gateway answered HTTP {}: {text}", status.as_u16());
        return Err(match status {
            StatusCode::NOT_FOUND
            | StatusCode::UNAUTHORIZED
            | StatusCode::FORBIDDEN
            | StatusCode::CONFLICT
            | StatusCode::BAD_REQUEST => Down::Fatal(msg),
            _ => Down::Retry(msg),
        });
    }
    *progressed = true;
    let mut body = resp.into_body();
    let mut buf = BytesMut::new();
    let mut first = true;
    // Between keepalives of a stream, nothing for this long means the connection is dead.
    let idle_limit = if poll {
        s.opts.timeout + super::POLL_WAIT
    } else {
        super::KEEPALIVE_EVERY * 2 + s.opts.timeout
    };
    loop {
        let wait = if first && !poll && auto {
            super::BUFFERING_DETECT
                .saturating_sub(sent_at.elapsed())
                .max(Duration::from_millis(500))
        } else {
            idle_limit
        };
        let frame = match tokio::time::timeout(wait, body.frame()).await {
            Err(_) if first && !poll && auto => {
                *conn = None;
                return Err(Down::Buffered);
            }
            Err(_) => {
                *conn = None;
                return Err(Down::Retry(format!(
                    "nothing from the gateway for {wait:?}"
                )));
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                *conn = None;
                return Err(Down::Retry(e.to_string()));
            }
            Ok(Some(Ok(f))) => f,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if data.is_empty() {
            continue;
        }
        first = false;
        buf.extend_from_slice(&data);
        loop {
            match take_record(&mut buf) {
                Ok(Some(m)) if m.is_empty() => {}
                Ok(Some(m)) => {
                    let n = m.len();
                    if out.send(Ok(m)).await.is_err() {
                        return Err(Down::Closed);
                    }
                    s.received.fetch_add(1, Ordering::Relaxed);
                    crate::splice::note_arrival(n);
                    if s.unacked.fetch_add(n, Ordering::Relaxed) + n >= ACK_BYTES {
                        s.unacked.store(0, Ordering::Relaxed);
                        s.ack_wanted.notify_one();
                    }
                }
                Ok(None) => break,
                Err(e) => return Err(Down::Fatal(format!("gateway sent a bad record: {e}"))),
            }
        }
    }
    if !buf.is_empty() {
        // A record cut by the end of the response: resend from what was received.
        *conn = None;
        return Err(Down::Retry("response ended inside a record".into()));
    }
    Ok(())
}

/// The session's transport over HTTP requests.
pub struct HttpTransport {
    tx: HttpTx,
    rx: HttpRx,
}

pub struct HttpTx {
    tx: Option<mpsc::Sender<Bytes>>,
}

pub struct HttpRx {
    rx: mpsc::Receiver<Result<Bytes, TransportError>>,
}

impl TransportTx for HttpTx {
    async fn send(&mut self, msg: Bytes) -> Result<(), TransportError> {
        match &self.tx {
            Some(tx) => tx.send(msg).await.map_err(|_| TransportError::Closed),
            None => Err(TransportError::Closed),
        }
    }
    async fn flush(&mut self) -> Result<(), TransportError> {
        Ok(())
    }
    async fn close(&mut self) {
        // The up task sends what is queued, then DELETE.
        self.tx = None;
    }
}

impl TransportRx for HttpRx {
    async fn recv(&mut self) -> Result<Option<Bytes>, TransportError> {
        match self.rx.recv().await {
            Some(Ok(m)) => Ok(Some(m)),
            Some(Err(e)) => Err(e),
            None => Err(TransportError::Closed),
        }
    }
}

impl Transport for HttpTransport {
    type Tx = HttpTx;
    type Rx = HttpRx;
    fn split(self) -> (HttpTx, HttpRx) {
        (self.tx, self.rx)
    }
}
