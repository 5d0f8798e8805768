//! Session behaviour over in-memory transports: multiplexing, flow control, half-close, resets,
//! liveness and hostile peers. No sockets, no TLS.

use bytes::Bytes;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tunnel::frame::{encode_data, Hello};
use tunnel::{
    memory_pair, Config, Dest, ErrorCode, Frame, Incoming, MemoryTransport, Meta, Role, Session,
    SessionError, StreamError, PROTOCOL_VERSION,
};

async fn pair_with(client: Config, server: Config) -> ((Session, Incoming), (Session, Incoming)) {
    let (a, b) = memory_pair(64);
    let (c, s) = tokio::join!(Session::start(a, client), Session::start(b, server));
    (c.unwrap(), s.unwrap())
}

async fn pair() -> ((Session, Incoming), (Session, Incoming)) {
    pair_with(
        Config::new(Role::Agent, true),
        Config::new(Role::Dmz, false),
    )
    .await
}

/// Accepts every stream and echoes it back until EOF, then half-closes.
fn spawn_echo(mut incoming: Incoming) {
    tokio::spawn(async move {
        while let Some(mut s) = incoming.accept().await {
            tokio::spawn(async move {
                s.accept();
                let mut buf = vec![0u8; 32 * 1024];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) => break,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                        Err(_) => return,
                    }
                }
                let _ = s.shutdown().await;
            });
        }
    });
}

#[tokio::test]
async fn a_stream_carries_bytes_both_ways_and_reports_open_ok() {
    let ((client, _), (_server, incoming)) = pair().await;
    spawn_echo(incoming);
    let mut s = client
        .open(Dest::new("db.internal", 5432), Meta::default())
        .unwrap();
    s.opened().await.unwrap();
    s.write_all(b"ping").await.unwrap();
    s.shutdown().await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    assert_eq!(out, b"ping");
}

#[tokio::test]
async fn the_acceptor_sees_destination_and_metadata() {
    let ((client, _), (_server, mut incoming)) = pair().await;
    let mut meta = Meta::default();
    meta.set("sp-front", "socks5");
    let _s = client.open(Dest::new("git.internal", 22), meta).unwrap();
    let got = incoming.accept().await.unwrap();
    let req = got.request().unwrap();
    assert_eq!(req.dest, Dest::new("git.internal", 22));
    assert_eq!(req.meta.get("sp-front"), Some("socks5"));
}

#[tokio::test]
async fn open_err_reason_reaches_the_opener() {
    let ((client, _), (_server, mut incoming)) = pair().await;
    tokio::spawn(async move {
        while let Some(s) = incoming.accept().await {
            s.reject(
                ErrorCode::NotAllowed,
                "db.internal:5433 is not in the allow-list",
            );
        }
    });
    let s = client
        .open(Dest::new("db.internal", 5433), Meta::default())
        .unwrap();
    let err = s.opened().await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::NotAllowed);
    assert!(err.to_string().contains("allow-list"), "{err}");
}

#[tokio::test]
async fn early_data_travels_before_open_ok() {
    let ((client, _), (_server, mut incoming)) = pair().await;
    let mut s = client
        .open(Dest::new("web.internal", 80), Meta::default())
        .unwrap();
    // Written before the peer even accepted: no round trip for static forwards and plain HTTP.
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    let mut got = incoming.accept().await.unwrap();
    let mut buf = [0u8; 18];
    got.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"GET / HTTP/1.0\r\n\r\n");
}

#[tokio::test]
async fn thousand_concurrent_streams_each_carry_their_own_bytes() {
    let ((client, _), (_server, incoming)) = pair().await;
    spawn_echo(incoming);
    let mut tasks = Vec::new();
    for i in 0..1000u32 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut s = client.open(Dest::new("echo", 7), Meta::default()).unwrap();
            let payload: Vec<u8> = (0..2000u32)
                .map(|j| (i.wrapping_mul(31) ^ j) as u8)
                .collect();
            s.write_all(&payload).await.unwrap();
            s.shutdown().await.unwrap();
            let mut out = Vec::new();
            s.read_to_end(&mut out).await.unwrap();
            assert_eq!(out, payload, "stream {i}");
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Every stream finished both ways and was dropped: nothing lingers.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(client.stream_count(), 0);
}

#[tokio::test]
async fn half_close_from_the_opener_keeps_the_other_direction_open() {
    let ((client, _), (_server, mut incoming)) = pair().await;
    let mut s = client.open(Dest::new("x", 1), Meta::default()).unwrap();
    s.write_all(b"request").await.unwrap();
    s.shutdown().await.unwrap();
    let mut peer = incoming.accept().await.unwrap();
    peer.accept();
    let mut req = Vec::new();
    peer.read_to_end(&mut req).await.unwrap(); // sees EOF
    assert_eq!(req, b"request");
    // The peer can still answer after our FIN.
    peer.write_all(b"response after fin").await.unwrap();
    peer.shutdown().await.unwrap();
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).await.unwrap();
    assert_eq!(resp, b"response after fin");
}

#[tokio::test]
async fn half_close_from_the_acceptor_keeps_the_other_direction_open() {
    let ((client, _), (_server, mut incoming)) = pair().await;
    let mut s = client.open(Dest::new("x", 1), Meta::default()).unwrap();
    let mut peer = incoming.accept().await.unwrap();
    peer.accept();
    peer.write_all(b"banner").await.unwrap();
    peer.shutdown().await.unwrap();
    let mut banner = Vec::new();
    s.read_to_end(&mut banner).await.unwrap();
    assert_eq!(banner, b"banner");
    s.write_all(b"still talking").await.unwrap();
    s.shutdown().await.unwrap();
    let mut got = Vec::new();
    peer.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"still talking");
}

#[tokio::test]
async fn a_stalled_reader_holds_one_window_while_other_streams_keep_flowing() {
    let mut cc = Config::new(Role::Agent, true);
    cc.stream_window = 64 * 1024;
    let mut sc = Config::new(Role::Dmz, false);
    sc.stream_window = 64 * 1024;
    sc.session_window = 256 * 1024;
    let ((client, _), (server, mut incoming)) = pair_with(cc, sc).await;

    // Stream 1: the reader on the server side never reads.
    let mut stalled = client.open(Dest::new("slow", 1), Meta::default()).unwrap();
    let stalled_peer = incoming.accept().await.unwrap();
    let writer = tokio::spawn(async move {
        let chunk = vec![7u8; 16 * 1024];
        loop {
            if stalled.write_all(&chunk).await.is_err() {
                break;
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The writer is blocked after one window; the server buffers no more than that.
    let (in_before, _) = stalled_peer.byte_counts();
    assert!(
        in_before <= 64 * 1024,
        "buffered {in_before} beyond the window"
    );

    // Meanwhile 64 MiB (256 session windows) flow on another stream of the same session.
    let mut fast = client.open(Dest::new("fast", 2), Meta::default()).unwrap();
    let mut fast_peer = incoming.accept().await.unwrap();
    let total = 64 * 1024 * 1024usize;
    let sender = tokio::spawn(async move {
        let chunk = vec![1u8; 64 * 1024];
        let mut sent = 0;
        while sent < total {
            fast.write_all(&chunk).await.unwrap();
            sent += chunk.len();
        }
        fast.shutdown().await.unwrap();
        fast
    });
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0;
    loop {
        let n = fast_peer.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        got += n;
    }
    assert_eq!(got, total);
    let _fast = sender.await.unwrap();
    let (in_after, _) = stalled_peer.byte_counts();
    assert_eq!(in_before, in_after, "the stalled stream grew while blocked");
    assert!(!server.is_closed());
    writer.abort();
}

/// Plays a peer by hand over a raw in-memory transport.
async fn raw_peer(config: Config) -> ((Session, Incoming), MemoryTransport) {
    let (a, mut raw) = memory_pair(1024);
    let hello = Frame::Hello(Hello {
        version: PROTOCOL_VERSION,
        role: Role::Agent,
        stream_window: 64 * 1024,
        session_window: 1 << 20,
        max_frame: 16 * 1024,
        instance_id: "raw".into(),
        features: 0,
        resume_id: String::new(),
    });
    raw.send_raw(hello.encode()).await.unwrap();
    let s = Session::start(a, config).await.unwrap();
    let _their_hello = raw.recv_raw().await.unwrap().unwrap();
    (s, raw)
}

async fn next_frame(raw: &mut MemoryTransport) -> Frame {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(5), raw.recv_raw())
            .await
            .expect("frame in time")
            .unwrap()
            .expect("transport open");
        let f = Frame::decode(m, 1 << 20).unwrap();
        if !matches!(f, Frame::Window { stream: 0, .. } | Frame::Ping(_)) {
            return f;
        }
    }
}

#[tokio::test]
async fn a_peer_that_ignores_credit_is_reset_and_nothing_beyond_the_grant_is_kept() {
    let mut cfg = Config::new(Role::Dmz, false);
    cfg.stream_window = 32 * 1024;
    let ((session, mut incoming), mut raw) = raw_peer(cfg).await;
    raw.send_raw(
        Frame::Open {
            stream: 1,
            dest: Dest::new("x", 1),
            meta: Meta::default(),
        }
        .encode(),
    )
    .await
    .unwrap();
    let mut s = incoming.accept().await.unwrap();
    // 32 KiB is the grant: send 48 KiB without waiting for WINDOW.
    for _ in 0..3 {
        raw.send_raw(encode_data(1, &[9u8; 16 * 1024]))
            .await
            .unwrap();
    }
    match next_frame(&mut raw).await {
        Frame::Rst {
            stream: 1, code, ..
        } => assert_eq!(code, ErrorCode::FlowControl),
        other => panic!("expected RST, got {other:?}"),
    }
    // The stream reports the reset; what it had buffered was dropped, never more than the grant.
    let mut buf = vec![0u8; 64 * 1024];
    let err = s.read(&mut buf).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
    let (received, _) = s.byte_counts();
    assert!(received <= 32 * 1024);
    // The session itself is fine: a new stream works.
    raw.send_raw(
        Frame::Open {
            stream: 3,
            dest: Dest::new("y", 2),
            meta: Meta::default(),
        }
        .encode(),
    )
    .await
    .unwrap();
    let s3 = incoming.accept().await.unwrap();
    s3.accept();
    assert!(matches!(
        next_frame(&mut raw).await,
        Frame::OpenOk { stream: 3, .. }
    ));
    assert!(!session.is_closed());
}

#[tokio::test]
async fn a_malformed_frame_closes_the_session_with_a_reason() {
    let ((session, _incoming), mut raw) = raw_peer(Config::new(Role::Dmz, false)).await;
    raw.send_raw(Bytes::from_static(&[0x42, 0, 0, 0, 1, 1, 2, 3]))
        .await
        .unwrap();
    match next_frame(&mut raw).await {
        Frame::GoAway { code, reason } => {
            assert_eq!(code, ErrorCode::Protocol);
            assert!(reason.contains("unknown frame type"), "{reason}");
        }
        other => panic!("expected GOAWAY, got {other:?}"),
    }
    assert!(matches!(session.closed().await, SessionError::Protocol(_)));
}

#[tokio::test]
async fn more_streams_than_allowed_are_refused_and_the_rest_keep_working() {
    let mut cfg = Config::new(Role::Dmz, false);
    cfg.max_incoming_streams = 2;
    let ((_session, mut incoming), mut raw) = raw_peer(cfg).await;
    for id in [1u32, 3, 5] {
        raw.send_raw(
            Frame::Open {
                stream: id,
                dest: Dest::new("x", 1),
                meta: Meta::default(),
            }
            .encode(),
        )
        .await
        .unwrap();
    }
    match next_frame(&mut raw).await {
        Frame::OpenErr {
            stream: 5,
            code,
            reason,
        } => {
            assert_eq!(code, ErrorCode::Limit);
            assert!(reason.contains("limit 2"), "{reason}");
        }
        other => panic!("expected OPEN_ERR for stream 5, got {other:?}"),
    }
    let a = incoming.accept().await.unwrap();
    let b = incoming.accept().await.unwrap();
    a.accept();
    b.accept();
    assert!(matches!(
        next_frame(&mut raw).await,
        Frame::OpenOk { stream: 1, .. }
    ));
    assert!(matches!(
        next_frame(&mut raw).await,
        Frame::OpenOk { stream: 3, .. }
    ));
}

#[tokio::test]
async fn a_reused_stream_id_is_a_protocol_error() {
    let ((session, mut incoming), mut raw) = raw_peer(Config::new(Role::Dmz, false)).await;
    let open = Frame::Open {
        stream: 1,
        dest: Dest::new("x", 1),
        meta: Meta::default(),
    };
    raw.send_raw(open.encode()).await.unwrap();
    let _s = incoming.accept().await.unwrap();
    raw.send_raw(open.encode()).await.unwrap();
    assert!(matches!(
        next_frame(&mut raw).await,
        Frame::GoAway {
            code: ErrorCode::Protocol,
            ..
        }
    ));
    assert!(matches!(session.closed().await, SessionError::Protocol(_)));
}

#[tokio::test]
async fn a_peer_of_another_version_gets_a_clear_reason() {
    let (a, mut raw) = memory_pair(16);
    let hello = Frame::Hello(Hello {
        version: 99,
        role: Role::Agent,
        stream_window: 1 << 16,
        session_window: 1 << 20,
        max_frame: 1 << 14,
        instance_id: "future".into(),
        features: 0,
        resume_id: String::new(),
    });
    raw.send_raw(hello.encode()).await.unwrap();
    let err = Session::start(a, Config::new(Role::Dmz, false))
        .await
        .unwrap_err();
    assert_eq!(
        err,
        SessionError::Version {
            ours: 1,
            theirs: 99
        }
    );
    let _ours = raw.recv_raw().await.unwrap().unwrap();
    match Frame::decode(raw.recv_raw().await.unwrap().unwrap(), 1 << 20).unwrap() {
        Frame::GoAway { code, reason } => {
            assert_eq!(code, ErrorCode::Version);
            assert!(reason.contains("v99"), "{reason}");
        }
        other => panic!("expected GOAWAY, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_peer_that_never_says_hello_times_out() {
    let (a, _raw) = memory_pair(16);
    let err = Session::start(a, Config::new(Role::Dmz, false))
        .await
        .unwrap_err();
    assert!(matches!(err, SessionError::HelloTimeout(_)));
}

#[tokio::test(start_paused = true)]
async fn a_silent_peer_is_declared_dead_after_ping_interval_plus_timeout() {
    let mut cfg = Config::new(Role::Agent, true);
    cfg.ping_interval = Duration::from_secs(10);
    cfg.ping_timeout = Duration::from_secs(5);
    let ((session, _inc), _raw) = raw_peer(cfg).await;
    let started = tokio::time::Instant::now();
    let err = session.closed().await;
    assert!(matches!(err, SessionError::Unresponsive(_)), "{err}");
    assert!(started.elapsed() <= Duration::from_secs(31));
}

#[tokio::test(start_paused = true)]
async fn an_idle_session_stays_up_because_pings_are_answered() {
    let mut cc = Config::new(Role::Agent, true);
    cc.ping_interval = Duration::from_secs(10);
    cc.ping_timeout = Duration::from_secs(5);
    let mut sc = Config::new(Role::Dmz, false);
    sc.ping_interval = Duration::from_secs(10);
    sc.ping_timeout = Duration::from_secs(5);
    let ((client, _), (server, _)) = pair_with(cc, sc).await;
    tokio::time::sleep(Duration::from_secs(300)).await;
    assert!(!client.is_closed() && !server.is_closed());
    assert!(client.stats().rtt.is_some());
}

#[tokio::test]
async fn abrupt_session_loss_fails_every_stream_promptly_with_a_clear_error() {
    let (a, b) = memory_pair(64);
    let (c, s) = tokio::join!(
        Session::start(a, Config::new(Role::Agent, true)),
        Session::start(b, Config::new(Role::Dmz, false))
    );
    let (client, _) = c.unwrap();
    let (server, mut incoming) = s.unwrap();
    let mut streams = Vec::new();
    for _ in 0..50 {
        streams.push(client.open(Dest::new("x", 1), Meta::default()).unwrap());
    }
    let mut held = Vec::new();
    for _ in 0..50 {
        held.push(incoming.accept().await.unwrap());
    }
    // The far end vanishes without a GOAWAY (its tasks just stop: as if the TCP link died).
    server.close(ErrorCode::Internal, "simulated crash");
    drop(held);
    let started = std::time::Instant::now();
    for mut s in streams {
        let mut buf = [0u8; 16];
        let err = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf))
            .await
            .expect("prompt failure")
            .unwrap_err();
        assert!(err.to_string().contains("session"), "unclear error: {err}");
    }
    assert!(started.elapsed() < Duration::from_secs(2));
    let open_after = client.open(Dest::new("x", 1), Meta::default());
    assert!(matches!(
        open_after,
        Err(StreamError::SessionLost(_)) | Err(StreamError::GoingAway)
    ));
}

#[tokio::test]
async fn routes_advertised_by_a_connector_reach_the_dmz() {
    let ((dmz, _), (connector, _)) = pair_with(
        Config::new(Role::Dmz, false),
        Config::new(Role::Connector, true),
    )
    .await;
    let mut routes = dmz.peer_routes();
    connector.advertise_routes(vec!["db.internal:5432".into(), "*.internal:22".into()]);
    routes.changed().await.unwrap();
    assert_eq!(
        *routes.borrow(),
        vec!["db.internal:5432".to_string(), "*.internal:22".to_string()]
    );
}

#[tokio::test]
async fn dropping_an_unfinished_stream_resets_it_at_the_peer() {
    let ((client, _), (_server, mut incoming)) = pair().await;
    let s = client.open(Dest::new("x", 1), Meta::default()).unwrap();
    let mut peer = incoming.accept().await.unwrap();
    peer.accept();
    drop(s);
    let mut buf = [0u8; 4];
    let err = peer.read(&mut buf).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
}

/// Pinned by review: payload queued on a stream that is then reset never reaches the peer, so
/// the peer never returns its session credit. Before the fix the session starved once such
/// losses added up to one session window; now the sender refunds the credit itself.
#[tokio::test]
async fn session_credit_of_data_dropped_by_a_reset_is_not_lost() {
    // The peer is played by hand: it grants a 256 KiB session window and reads nothing at first,
    // so our writer blocks on the (tiny) transport and data piles up in the stream's queue.
    let (a, mut raw) = memory_pair(2);
    let hello = Frame::Hello(Hello {
        version: PROTOCOL_VERSION,
        role: Role::Dmz,
        stream_window: 256 * 1024,
        session_window: 256 * 1024,
        max_frame: 16 * 1024,
        instance_id: "raw".into(),
        features: 0,
        resume_id: String::new(),
    });
    raw.send_raw(hello.encode()).await.unwrap();
    let (session, _) = Session::start(a, Config::new(Role::Agent, true))
        .await
        .unwrap();
    let _their_hello = raw.recv_raw().await.unwrap().unwrap();
    let mut s = session.open(Dest::new("x", 1), Meta::default()).unwrap();
    // Queue one full session window; the transport holds two messages, the rest stays queued.
    let chunk = vec![1u8; 16 * 1024];
    for _ in 0..16 {
        s.write_all(&chunk).await.unwrap();
    }
    drop(s); // RST: the queued data is dropped
             // Now the peer reads, answering every DATA with credit, as a real peer would.
    let peer = tokio::spawn(async move {
        let mut got_b = 0usize;
        while let Ok(Some(m)) = raw.recv_raw().await {
            if let Ok(Frame::Data { stream, payload }) = Frame::decode(m, 1 << 20) {
                let n = payload.len() as u32;
                let _ = raw
                    .send_raw(
                        Frame::Window {
                            stream: 0,
                            credit: n,
                        }
                        .encode(),
                    )
                    .await;
                let _ = raw
                    .send_raw(Frame::Window { stream, credit: n }.encode())
                    .await;
                if stream == 3 {
                    got_b += n as usize;
                    if got_b == 1024 * 1024 {
                        return got_b;
                    }
                }
            }
        }
        got_b
    });
    let mut b = session.open(Dest::new("y", 2), Meta::default()).unwrap();
    let big = vec![2u8; 1024 * 1024];
    tokio::time::timeout(Duration::from_secs(10), b.write_all(&big))
        .await
        .expect("the session starved: credit of the dropped data was lost")
        .unwrap();
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(10), peer)
            .await
            .unwrap()
            .unwrap(),
        1024 * 1024
    );
}

/// A peer that floods `PING` and never reads used to grow the other side's control queue by
/// one `PONG` per `PING`, and 16 sessions doing so starved a whole gateway: now only the latest
/// `PING` is answered, and more than a few dozen a second end the session.
#[tokio::test]
async fn a_ping_flood_is_cut_off_and_never_queues_more_than_one_pong() {
    let ((session, _incoming), mut raw) = raw_peer(Config::new(Role::Dmz, false)).await;
    // Within the rate: each PING is answered, the latest one last.
    for i in 0..20u64 {
        raw.send_raw(Frame::Ping(i).encode()).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut pongs = 0;
    let mut last = None;
    while let Ok(Ok(Some(m))) =
        tokio::time::timeout(Duration::from_millis(200), raw.recv_raw()).await
    {
        if let Ok(Frame::Pong(v)) = Frame::decode(m, 1 << 20) {
            pongs += 1;
            last = Some(v);
        }
    }
    assert!((1..=20).contains(&pongs), "{pongs} PONGs for 20 PINGs");
    assert_eq!(last, Some(19), "the latest PING is answered");
    assert!(!session.is_closed());
    // A flood: the session ends with a reason.
    for i in 0..20_000u64 {
        if raw.send_raw(Frame::Ping(i).encode()).await.is_err() {
            break;
        }
    }
    let why = tokio::time::timeout(Duration::from_secs(5), session.closed())
        .await
        .expect("the flood ends the session");
    match why {
        SessionError::Protocol(reason) => assert!(reason.contains("PINGs in a second"), "{reason}"),
        other => panic!("expected a protocol error, got {other:?}"),
    }
}

/// Every `OPEN` refused gets an `OPEN_ERR`: a peer that sends opens and never reads would grow
/// those answers without end. Beyond a bound the session ends instead.
#[tokio::test]
async fn a_peer_that_floods_refused_opens_and_never_reads_is_cut_off() {
    let mut cfg = Config::new(Role::Dmz, false);
    cfg.accept_streams = false;
    let ((session, _incoming), mut raw) = raw_peer(cfg).await;
    let flood = async {
        for i in 0..200_000u32 {
            let open = Frame::Open {
                stream: 2 * i + 1,
                dest: Dest::new("x", 1),
                meta: Meta::default(),
            };
            if raw.send_raw(open.encode()).await.is_err() {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(20), flood).await;
    let why = tokio::time::timeout(Duration::from_secs(10), session.closed())
        .await
        .expect("the session ends");
    match why {
        SessionError::Protocol(reason) => assert!(reason.contains("does not read"), "{reason}"),
        other => panic!("expected a protocol error, got {other:?}"),
    }
}

/// 3,000 allow rules made one `ROUTES` frame of 195 KB, over the message limit: the session
/// was cut in a loop. Now a long list crosses in parts and arrives whole.
#[tokio::test]
async fn a_route_list_of_thousands_arrives_whole() {
    let ((client, _), (server, _incoming)) = pair_with(
        Config::new(Role::Connector, true),
        Config::new(Role::Dmz, false),
    )
    .await;
    let routes: Vec<String> = (0..3000)
        .map(|i| format!("service-{i:05}.dept-{i}.internal.example.com:1-65535"))
        .collect();
    let mut seen = server.peer_routes();
    client.advertise_routes(routes.clone());
    let got = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if seen.borrow_and_update().len() == routes.len() {
                return seen.borrow().clone();
            }
            seen.changed().await.unwrap();
        }
    })
    .await
    .expect("the whole list arrives");
    assert_eq!(got, routes);
    assert!(!client.is_closed() && !server.is_closed());
}

/// An `OPEN` too large for one frame is refused where it is made, not sent to cut the session
/// (and every other stream on it).
#[tokio::test]
async fn an_open_too_large_for_one_frame_is_refused_and_the_session_lives() {
    let ((client, _), (_server, incoming)) = pair().await;
    spawn_echo(incoming);
    let mut meta = Meta::default();
    meta.set("sp-big", "x".repeat(70 * 1024));
    match client.open(Dest::new("db.internal", 5432), meta) {
        Err(e @ StreamError::OpenTooLarge { .. }) => assert_eq!(e.code(), ErrorCode::Limit),
        Err(e) => panic!("expected OpenTooLarge, got {e}"),
        Ok(_) => panic!("a 70 KiB OPEN was sent"),
    }
    let mut s = client
        .open(Dest::new("db.internal", 5432), Meta::default())
        .unwrap();
    s.write_all(b"still here").await.unwrap();
    s.shutdown().await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    assert_eq!(out, b"still here");
}

/// A hostile peer (a gateway, for the agent) sending `ROUTES_PART` after `ROUTES_PART` of long
/// route texts would grow the list without end: it is capped in count and bytes, and routes
/// longer than any real one are dropped.
#[tokio::test]
async fn an_endless_route_list_is_capped() {
    let ((session, _incoming), mut raw) = raw_peer(Config::new(Role::Dmz, false)).await;
    let mut seen = session.peer_routes();
    let long = "r".repeat(1000);
    for _ in 0..200 {
        let part: Vec<String> = (0..30).map(|i| format!("{long}{i}:1")).collect();
        raw.send_raw(Frame::RoutesPart(part).encode())
            .await
            .unwrap();
    }
    raw.send_raw(Frame::Routes(vec!["x".repeat(5000), "last.internal:1".into()]).encode())
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), async {
        seen.changed().await.unwrap();
        seen.borrow().clone()
    })
    .await
    .unwrap();
    let bytes: usize = got.iter().map(String::len).sum();
    assert!(bytes <= tunnel::session::MAX_PEER_ROUTE_BYTES, "{bytes}");
    assert!(got.iter().all(|r| r.len() <= tunnel::frame::MAX_ROUTE_LEN));
    assert!(!session.is_closed());
}

/// A draining gateway used to close the session right after its `GOAWAY`, so a stream that was
/// open then (a download, a request in flight) ended with `session-lost`. `go_away` keeps the
/// session for the open streams; the peer hears it, opens no new stream there, and the open
/// one finishes.
#[tokio::test]
async fn a_stream_open_when_the_gateway_says_goaway_finishes() {
    let ((client, _), (server, incoming)) = pair().await;
    spawn_echo(incoming);
    let mut s = client
        .open(Dest::new("db.internal", 5432), Meta::default())
        .unwrap();
    s.opened().await.unwrap();
    server.go_away(ErrorCode::Shutdown, "gateway shutting down");
    tokio::time::timeout(Duration::from_secs(5), client.peer_going_away())
        .await
        .expect("the GOAWAY arrives");
    assert!(client.is_going_away());
    // The PING behind the GOAWAY comes back: the client has read it.
    for _ in 0..100 {
        if server.go_away_heard() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(server.go_away_heard());
    assert!(matches!(
        client.open(Dest::new("db.internal", 5432), Meta::default()),
        Err(StreamError::GoingAway)
    ));
    s.write_all(b"still here").await.unwrap();
    s.shutdown().await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    assert_eq!(out, b"still here");
    assert!(!client.is_closed() && !server.is_closed());
    server.close(ErrorCode::Shutdown, "gateway shutting down");
    let why = tokio::time::timeout(Duration::from_secs(5), client.closed())
        .await
        .unwrap();
    assert!(
        matches!(
            why,
            SessionError::GoAway {
                code: ErrorCode::Shutdown,
                ..
            }
        ),
        "{why}"
    );
}

#[tokio::test]
async fn an_early_open_whose_service_says_nothing_is_still_answered() {
    // The answer to an OPEN that came with data waits to ride with the reply's first bytes;
    // a service that never replies must not leave the opener without an answer.
    let ((client, _), (_server, mut incoming)) = pair().await;
    tokio::spawn(async move {
        let mut s = incoming.accept().await.unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        s.accept();
        tokio::time::sleep(Duration::from_secs(3600)).await;
        drop(s);
    });
    let mut s = client
        .open(Dest::new("db.internal", 5432), Meta::default())
        .unwrap();
    s.write_all(b"x").await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), s.opened())
        .await
        .expect("the early open was never answered")
        .unwrap();
}
