//! The HTTP fallback transport end to end on loopback: the agent's `client::connect` against a
//! minimal hyper server that routes to `server::Registry` / `Handle` (the way the gateway's
//! `fallback.rs` does, without its authentication), with a tunnel `Session` on each side.
//! A flaky relay between them cuts connections to exercise resends and resumes.

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rand::{Rng, RngCore, SeedableRng};
use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tunnel::http::client::{self, GatewayIo, Options, Redial};
use tunnel::http::server::{Body, Registry, RequestAuth};
use tunnel::http::{parse_query, put_record, DownMode, Query, SESSION_HEADER};
use tunnel::{Config, Dest, Incoming, Meta, Role, Session, Transport, TransportRx, TransportTx};

const BASE: &str = "/sp/agent/http";
const EIGHT_MIB: usize = 8 * 1024 * 1024;

fn text(status: StatusCode, msg: &str) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(msg.to_string()))
            .map_err(|n| match n {})
            .boxed(),
    );
    *r.status_mut() = status;
    r
}

/// A gateway in miniature: routes `POST {BASE}` (create) and `POST/GET/DELETE {BASE}/{sid}`.
/// Every session it creates gets a tunnel `Session` (DMZ side), handed out on `sessions`.
struct TestServer {
    addr: SocketAddr,
    registry: Arc<Registry>,
    sessions: mpsc::UnboundedReceiver<(Session, Incoming)>,
}

async fn route(
    registry: Arc<Registry>,
    sessions: mpsc::UnboundedSender<(Session, Incoming)>,
    req: Request<hyper::body::Incoming>,
) -> Response<Body> {
    let path = req.uri().path().to_string();
    let Some(rest) = path.strip_prefix(BASE) else {
        return text(StatusCode::NOT_FOUND, "not found");
    };
    if rest.is_empty() {
        if req.method() != Method::POST {
            return text(StatusCode::METHOD_NOT_ALLOWED, "create with POST");
        }
        let Some((h, transport)) = registry.create(RequestAuth::Token("t".into())) else {
            return text(StatusCode::SERVICE_UNAVAILABLE, "full");
        };
        tokio::spawn(async move {
            if let Ok(pair) = Session::start(transport, Config::new(Role::Dmz, false)).await {
                let _ = sessions.send(pair);
            }
        });
        let mut r = Response::new(Full::new(Bytes::new()).map_err(|n| match n {}).boxed());
        r.headers_mut()
            .insert(SESSION_HEADER, h.sid().parse().unwrap());
        return r;
    }
    let sid = rest.trim_start_matches('/');
    let q = match parse_query(req.uri().query().unwrap_or("")) {
        Ok(q) => q,
        Err(e) => return text(StatusCode::BAD_REQUEST, &e),
    };
    let Some(h) = registry.get(sid) else {
        return text(StatusCode::NOT_FOUND, "no such session");
    };
    match req.method().clone() {
        Method::POST => match req.into_body().collect().await {
            Ok(b) => h.post(q, b.to_bytes()).await,
            Err(e) => text(StatusCode::BAD_REQUEST, &e.to_string()),
        },
        Method::GET => h.get(q).await,
        Method::DELETE => h.delete().await,
        _ => text(StatusCode::METHOD_NOT_ALLOWED, "use POST, GET or DELETE"),
    }
}

async fn test_server() -> TestServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let registry = Registry::new(16, 4 * 1024 * 1024);
    let (tx, rx) = mpsc::unbounded_channel();
    let reg = registry.clone();
    tokio::spawn(async move {
        loop {
            let Ok((io, _)) = listener.accept().await else {
                return;
            };
            let (reg, tx) = (reg.clone(), tx.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let (reg, tx) = (reg.clone(), tx.clone());
                    async move { Ok::<_, std::convert::Infallible>(route(reg, tx, req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(io), service)
                    .await;
            });
        }
    });
    TestServer {
        addr,
        registry,
        sessions: rx,
    }
}

fn dialer(to: SocketAddr, dials: Arc<AtomicUsize>) -> Redial {
    Arc::new(move || {
        let dials = dials.clone();
        Box::pin(async move {
            dials.fetch_add(1, Ordering::Relaxed);
            let s = TcpStream::connect(to).await.map_err(|e| e.to_string())?;
            s.set_nodelay(true).map_err(|e| e.to_string())?;
            Ok(Box::new(s) as GatewayIo)
        })
    })
}

fn options(server: SocketAddr, mode: Option<DownMode>) -> Options {
    Options {
        host: server.to_string(),
        base: BASE.to_string(),
        bearer: Some("t".into()),
        mac_key: None,
        mode,
        timeout: Duration::from_secs(5),
    }
}

/// A relay that cuts every connection after a random number of bytes (both directions
/// together, between `bytes / 2` and `bytes * 3 / 2`) or after a random time up to `life`,
/// whichever comes first. Returns its address and the number of connections it cut.
async fn flaky_relay(
    to: SocketAddr,
    bytes: usize,
    life: Duration,
    seed: u64,
) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let cuts = Arc::new(AtomicUsize::new(0));
    let cut_count = cuts.clone();
    tokio::spawn(async move {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        loop {
            let Ok((a, _)) = listener.accept().await else {
                return;
            };
            let budget = rng.gen_range(bytes / 2..=bytes * 3 / 2);
            let life = life.mul_f64(rng.gen_range(0.2..=1.0));
            let cuts = cut_count.clone();
            tokio::spawn(async move {
                let Ok(b) = TcpStream::connect(to).await else {
                    return;
                };
                let _ = a.set_nodelay(true);
                let _ = b.set_nodelay(true);
                let used = Arc::new(AtomicUsize::new(0));
                let (ar, aw) = a.into_split();
                let (br, bw) = b.into_split();
                let pump = |mut r: tokio::net::tcp::OwnedReadHalf,
                            mut w: tokio::net::tcp::OwnedWriteHalf,
                            used: Arc<AtomicUsize>| async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        let left = budget.saturating_sub(used.load(Ordering::Relaxed));
                        if left == 0 {
                            return true;
                        }
                        let want = left.min(buf.len());
                        let n = match r.read(&mut buf[..want]).await {
                            Ok(0) | Err(_) => {
                                let _ = w.shutdown().await;
                                return false;
                            }
                            Ok(n) => n,
                        };
                        used.fetch_add(n, Ordering::Relaxed);
                        if w.write_all(&buf[..n]).await.is_err() {
                            return false;
                        }
                    }
                };
                let up = pump(ar, bw, used.clone());
                let down = pump(br, aw, used);
                tokio::pin!(up, down);
                // Both sockets are dropped (closed) when this returns.
                let cut = tokio::select! {
                    _ = tokio::time::sleep(life) => true,
                    c = &mut up => c,
                    c = &mut down => c,
                };
                if cut {
                    cuts.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
    (addr, cuts)
}

fn payload(seed: u64, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

/// The DMZ side's peer: for every stream, sends `down` while hashing what arrives; reports the
/// hash and length of what arrived when the agent has finished sending.
fn spawn_peer(mut incoming: Incoming, down: Arc<Vec<u8>>, got: oneshot::Sender<(usize, Vec<u8>)>) {
    tokio::spawn(async move {
        let Some(s) = incoming.accept().await else {
            return;
        };
        s.accept();
        let (mut r, mut w) = tokio::io::split(s);
        let writer = tokio::spawn(async move {
            for chunk in down.chunks(100_000) {
                w.write_all(chunk).await.unwrap();
            }
            w.shutdown().await.unwrap();
            w
        });
        let mut h = Sha256::new();
        let mut n = 0;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let k = r.read(&mut buf).await.unwrap();
            if k == 0 {
                break;
            }
            h.update(&buf[..k]);
            n += k;
        }
        let _ = got.send((n, h.finalize().to_vec()));
        // Keep the stream (and the write half) until the agent has read everything.
        let _w = writer.await.unwrap();
        let _keep = incoming;
        tokio::time::sleep(Duration::from_secs(30)).await;
    });
}

/// The bulk transfers of this binary, one at a time: `tunnel::splice::activity` is
/// process-wide, and the test that checks what one transfer moves it by must see its own.
static BULK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Opens a session over HTTP through `via`, moves 8 MiB each way on one stream and checks
/// both arrive intact (length and SHA-256).
async fn eight_mib_each_way(
    server: &mut TestServer,
    via: SocketAddr,
    mode: Option<DownMode>,
) -> usize {
    let _one = BULK.lock().await;
    eight_mib_each_way_alone(server, via, mode).await
}

/// [`eight_mib_each_way`], for a caller that holds [`BULK`].
async fn eight_mib_each_way_alone(
    server: &mut TestServer,
    via: SocketAddr,
    mode: Option<DownMode>,
) -> usize {
    let dials = Arc::new(AtomicUsize::new(0));
    let created = client::connect(
        dialer(via, dials.clone()),
        None,
        options(server.addr, mode),
        Bytes::new(),
    )
    .await
    .unwrap();
    assert!(created.reply.is_empty());
    let (agent, _agent_incoming) =
        Session::start(created.transport, Config::new(Role::Agent, true))
            .await
            .unwrap();
    let (_dmz, dmz_incoming) = server.sessions.recv().await.unwrap();

    let up = Arc::new(payload(1, EIGHT_MIB));
    let down = Arc::new(payload(2, EIGHT_MIB));
    let (got_tx, got_rx) = oneshot::channel();
    spawn_peer(dmz_incoming, down.clone(), got_tx);

    let s = agent.open(Dest::new("echo", 7), Meta::default()).unwrap();
    let (mut r, mut w) = tokio::io::split(s);
    let up2 = up.clone();
    let writer = tokio::spawn(async move {
        for chunk in up2.chunks(70_000) {
            w.write_all(chunk).await.unwrap();
        }
        w.shutdown().await.unwrap();
        w
    });
    let mut back = Vec::with_capacity(EIGHT_MIB);
    r.read_to_end(&mut back).await.unwrap();
    let _w = writer.await.unwrap();
    assert_eq!(back.len(), down.len(), "downstream length");
    assert!(back == *down, "downstream bytes differ");
    let (n, hash) = got_rx.await.unwrap();
    assert_eq!(n, up.len(), "upstream length");
    assert_eq!(
        hash,
        Sha256::digest(&up[..]).to_vec(),
        "upstream bytes differ"
    );
    dials.load(Ordering::Relaxed)
}

async fn timed<F: std::future::Future<Output = T>, T>(what: &str, f: F) -> T {
    let t = Instant::now();
    let out = tokio::time::timeout(Duration::from_secs(60), f)
        .await
        .unwrap_or_else(|_| panic!("{what}: no result within 60 s"));
    eprintln!("{what}: {:?}", t.elapsed());
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_mib_each_way_arrive_intact_over_a_streamed_get() {
    let mut server = test_server().await;
    let via = server.addr;
    timed(
        "stream",
        eight_mib_each_way(&mut server, via, Some(DownMode::Stream)),
    )
    .await;
}

/// Every role gives freed memory back once `tunnel::splice::activity` stands still after a
/// transfer; that count once moved only when a pool read buffer was taken, which the HTTP
/// fallback's downloads never do (hyper reads them), so a download over it looked like a quiet
/// process. It counts bytes now: the 8 MiB down (the client's count) and the 8 MiB up (the
/// server's) must both be in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_over_the_http_fallback_counts_as_activity() {
    let mut server = test_server().await;
    let via = server.addr;
    let _one = BULK.lock().await;
    let before = tunnel::splice::activity();
    timed(
        "activity",
        eight_mib_each_way_alone(&mut server, via, Some(DownMode::Stream)),
    )
    .await;
    let moved = tunnel::splice::activity() - before;
    assert!(
        moved >= 2 * EIGHT_MIB as u64,
        "activity moved by {moved} bytes over 8 MiB each way"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_mib_each_way_arrive_intact_over_long_poll() {
    let mut server = test_server().await;
    let via = server.addr;
    timed(
        "poll",
        eight_mib_each_way(&mut server, via, Some(DownMode::Poll)),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_cut_mid_request_lose_and_duplicate_nothing_streamed() {
    let mut server = test_server().await;
    let (via, cuts) = flaky_relay(server.addr, 300_000, Duration::from_millis(800), 7).await;
    let dials = timed("flaky stream", eight_mib_each_way(&mut server, via, None)).await;
    let cuts = cuts.load(Ordering::Relaxed);
    eprintln!("flaky stream: {dials} connections dialled, {cuts} cut");
    assert!(cuts >= 10, "the relay cut only {cuts} connections");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_cut_mid_request_lose_and_duplicate_nothing_long_polled() {
    let mut server = test_server().await;
    let (via, cuts) = flaky_relay(server.addr, 300_000, Duration::from_millis(800), 11).await;
    let dials = timed(
        "flaky poll",
        eight_mib_each_way(&mut server, via, Some(DownMode::Poll)),
    )
    .await;
    let cuts = cuts.load(Ordering::Relaxed);
    eprintln!("flaky poll: {dials} connections dialled, {cuts} cut");
    assert!(cuts >= 10, "the relay cut only {cuts} connections");
}

fn records(msgs: &[&[u8]]) -> Bytes {
    let mut b = BytesMut::new();
    for m in msgs {
        put_record(&mut b, m);
    }
    b.freeze()
}

async fn status_and_body(r: Response<Body>) -> (StatusCode, String) {
    let status = r.status();
    let body = r.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn a_resent_batch_is_delivered_once_and_a_batch_beyond_the_next_seq_is_refused() {
    let registry = Registry::new(4, 1024 * 1024);
    let (h, transport) = registry.create(RequestAuth::Token("t".into())).unwrap();
    let (_tx, mut rx) = transport.split();
    let q = |seq| Query {
        seq,
        ack: 0,
        poll: false,
    };
    let batch = records(&[b"one", b"two"]);
    let (s, _) = status_and_body(h.post(q(0), batch.clone()).await).await;
    assert_eq!(s, StatusCode::OK);
    // The same batch again (its answer was lost): skipped.
    let (s, _) = status_and_body(h.post(q(0), batch).await).await;
    assert_eq!(s, StatusCode::OK);
    // Overlapping: starts at 1, only its second message is new.
    let (s, _) = status_and_body(h.post(q(1), records(&[b"two", b"three"])).await).await;
    assert_eq!(s, StatusCode::OK);
    // A gap: 3 is next, 5 would lose message 3 and 4.
    let (s, body) = status_and_body(h.post(q(5), records(&[b"six"])).await).await;
    assert_eq!(s, StatusCode::CONFLICT, "{body}");
    assert!(body.contains("3 is next"), "{body}");
    // A body that ends inside a record.
    let cut = records(&[b"four"]);
    let (s, _) = status_and_body(h.post(q(3), cut.slice(..cut.len() - 1)).await).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    // An ack of downstream messages never sent.
    let (s, _) = status_and_body(
        h.post(
            Query {
                seq: 3,
                ack: 1,
                poll: false,
            },
            Bytes::new(),
        )
        .await,
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT);

    for want in [&b"one"[..], b"two", b"three"] {
        let got = rx.recv().await.unwrap().unwrap();
        assert_eq!(&got[..], want);
    }
    let more = tokio::time::timeout(Duration::from_millis(200), rx.recv()).await;
    assert!(more.is_err(), "a message came out twice: {more:?}");
    // The next batch carries on at 3.
    let (s, _) = status_and_body(h.post(q(3), records(&[b"four"])).await).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(&rx.recv().await.unwrap().unwrap()[..], b"four");
}

#[tokio::test]
async fn a_get_resumes_from_its_ack_and_acknowledged_messages_are_not_resent() {
    let registry = Registry::new(4, 1024 * 1024);
    let (h, transport) = registry.create(RequestAuth::Token("t".into())).unwrap();
    let (mut tx, _rx) = transport.split();
    for m in [&b"a"[..], b"b", b"c"] {
        tx.send(Bytes::copy_from_slice(m)).await.unwrap();
    }
    let poll = |ack| Query {
        seq: 0,
        ack,
        poll: true,
    };
    let body = |r: Response<Body>| async move {
        tunnel::http::parse_records(r.into_body().collect().await.unwrap().to_bytes()).unwrap()
    };
    assert_eq!(body(h.get(poll(0)).await).await, vec!["a", "b", "c"]);
    // Nothing acknowledged yet: the same again.
    assert_eq!(body(h.get(poll(0)).await).await, vec!["a", "b", "c"]);
    assert_eq!(body(h.get(poll(2)).await).await, vec!["c"]);
    // Below what was acknowledged: gone.
    let r = tokio::time::timeout(Duration::from_secs(2), h.get(poll(0)))
        .await
        .unwrap();
    assert!(body(r).await.is_empty());
    let (s, _) = status_and_body(h.get(poll(4)).await).await;
    assert_eq!(s, StatusCode::CONFLICT);
}

/// An idle session (nothing but keepalive records, pings and empty acks) is still up after
/// several `KEEPALIVE_EVERY` and the renewal of its streamed response (`STREAM_FOR`).
/// Paused clock: the waits are skipped (loopback I/O is ready before the runtime parks). The
/// registry's `IDLE_EXPIRY` is measured on `std::time::Instant`, which the paused clock does not
/// move, so expiry itself is not exercised here.
#[tokio::test(start_paused = true)]
async fn an_idle_session_survives_keepalives_and_the_renewal_of_its_streamed_get() {
    let mut server = test_server().await;
    let dials = Arc::new(AtomicUsize::new(0));
    let created = client::connect(
        dialer(server.addr, dials.clone()),
        None,
        options(server.addr, Some(DownMode::Stream)),
        Bytes::new(),
    )
    .await
    .unwrap();
    let (agent, _agent_incoming) =
        Session::start(created.transport, Config::new(Role::Agent, true))
            .await
            .unwrap();
    let (dmz, mut dmz_incoming) = server.sessions.recv().await.unwrap();
    let idle = tunnel::http::STREAM_FOR * 2 + tunnel::http::KEEPALIVE_EVERY;
    assert!(idle > tunnel::http::KEEPALIVE_EVERY * 2);
    tokio::time::sleep(idle).await;
    assert!(!agent.is_closed() && !dmz.is_closed());
    let mut s = agent.open(Dest::new("echo", 7), Meta::default()).unwrap();
    s.write_all(b"still there?").await.unwrap();
    let mut peer = dmz_incoming.accept().await.unwrap();
    peer.accept();
    let mut buf = [0u8; 12];
    peer.read_exact(&mut buf).await.unwrap();
    peer.write_all(b"yes").await.unwrap();
    let mut buf = [0u8; 3];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"yes");
    assert_eq!(server.registry.len(), 1);
}
