//! The DMZ gateway in-process, on loopback, with agents and connectors played at the tunnel
//! level: bad input at every layer, identity stamping, route limits, and the hop-by-hop credit
//! that keeps a slow agent from stalling a connector session shared with others.

use gateway::auth::{self, ReloadingStore, TokenEntry};
use gateway::dmz::{Dmz, DmzConfig};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tunnel::{meta, Dest, ErrorCode, Frame, Incoming, Meta, Role, Session};

struct Gw {
    addr: SocketAddr,
    /// The admin listener (`/metrics`).
    admin: SocketAddr,
    agent_token: String,
    connector_token: String,
    _dir: TempDir,
    shutdown: CancellationToken,
}

impl Drop for Gw {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn token(path: &Path, id: &str, name: &str, routes: &[&str]) -> String {
    let (secret, sha256) = auth::generate(id).unwrap();
    auth::append_token(
        path,
        &TokenEntry {
            id: id.into(),
            name: name.into(),
            groups: vec!["dev".into()],
            sha256: Some(sha256),
            public_key: None,
            expires: None,
            routes: routes.iter().map(|r| r.to_string()).collect(),
        },
    )
    .unwrap();
    secret.expose().to_string()
}

async fn gateway(connector_routes: &[&str], tweak: impl FnOnce(&mut DmzConfig)) -> Gw {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("sallyport-dmz-test-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let agent_token = token(&dir.join("agents.toml"), "alice-laptop", "alice", &[]);
    let connector_token = token(
        &dir.join("connectors.toml"),
        "site-a",
        "site-a",
        connector_routes,
    );
    let inner_key = Arc::new(tunnel::inner::KeyPair::generate());
    let mut cfg = DmzConfig {
        drain_delay: std::time::Duration::ZERO,
        listen: "127.0.0.1:0".parse().unwrap(),
        tls: None,
        prefix: "/sp".into(),
        agent_tokens: Arc::new(ReloadingStore::open(&dir.join("agents.toml")).unwrap()),
        connector_tokens: Arc::new(ReloadingStore::open(&dir.join("connectors.toml")).unwrap()),
        trusted_proxies: vec![],
        forwarded_header: Default::default(),
        instance_id: "dmz-test".into(),
        limits: Default::default(),
        session: tunnel::Config::new(Role::Dmz, false),
        reload_every: Duration::from_millis(200),
        inner_key: Some(inner_key.clone()),
        tls_key_pin: None,
        v2: gateway::dmz::v2::V2Config::new(inner_key),
        admin: Some(gateway::admin::AdminConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            token: None,
            networks: gateway::admin::AdminConfig::loopback(),
            hosts: vec![],
        }),
    };
    cfg.limits.handshake_timeout = Duration::from_millis(500);
    tweak(&mut cfg);
    let dmz = Dmz::bind(cfg).await.unwrap();
    let addr = dmz.local_addr();
    let admin = dmz.admin_addr().unwrap();
    let shutdown = CancellationToken::new();
    tokio::spawn(dmz.serve(shutdown.clone()));
    Gw {
        addr,
        admin,
        agent_token,
        connector_token,
        _dir: TempDir(dir),
        shutdown,
    }
}

async fn session(
    gw: &Gw,
    path: &str,
    token: &str,
    role: Role,
) -> Result<(Session, Incoming), String> {
    session_with(gw, path, token, role, |_| {}).await
}

/// [`session`] with its tunnel configuration changed by `tweak` (e.g. resume negotiated).
async fn session_with(
    gw: &Gw,
    path: &str,
    token: &str,
    role: Role,
    tweak: impl FnOnce(&mut tunnel::Config),
) -> Result<(Session, Incoming), String> {
    let tcp = TcpStream::connect(gw.addr)
        .await
        .map_err(|e| e.to_string())?;
    let url = format!("ws://{}/sp/{path}", gw.addr);
    let t = tunnel::ws::client(tcp, &url, Some(token), 65536, Duration::from_secs(10))
        .await
        .map_err(|e| e.to_string())?;
    let mut cfg = tunnel::Config::new(role, true);
    cfg.accept_streams = role == Role::Connector;
    tweak(&mut cfg);
    Session::start(t, cfg).await.map_err(|e| e.to_string())
}

async fn connector(gw: &Gw, routes: &[&str]) -> (Session, Incoming) {
    connector_as(gw, &gw.connector_token, routes).await
}

/// [`connector`] with another connector credential's token.
async fn connector_as(gw: &Gw, token: &str, routes: &[&str]) -> (Session, Incoming) {
    let (s, inc) = session(gw, "connector", token, Role::Connector)
        .await
        .unwrap();
    s.advertise_routes(routes.iter().map(|r| r.to_string()).collect());
    // Give the DMZ a moment to register the routes.
    tokio::time::sleep(Duration::from_millis(100)).await;
    (s, inc)
}

/// An agent session's open to `host:port`.
async fn open_as_agent(gw: &Gw, host: &str, port: u16) -> (Session, tunnel::Stream) {
    let (agent, _) = session(gw, "agent", &gw.agent_token, Role::Agent)
        .await
        .unwrap();
    let s = agent.open(Dest::new(host, port), Meta::default()).unwrap();
    (agent, s)
}

/// A second connector credential, for site B (`b.internal:*`), listed and loaded: its token.
async fn site_b(gw: &Gw) -> String {
    let t = token(
        &gw._dir.0.join("connectors.toml"),
        "site-b",
        "site-b",
        &["b.internal:*"],
    );
    // The token file is reloaded every 200 ms.
    tokio::time::sleep(Duration::from_millis(500)).await;
    t
}

/// The connector behind `incoming` is handed the stream `s` within 5 s (`what` says why it
/// should be), accepts it, and the agent's open completes.
async fn served(incoming: &mut Incoming, s: &tunnel::Stream, what: &str) {
    let got = tokio::time::timeout(Duration::from_secs(5), incoming.accept())
        .await
        .expect(what)
        .unwrap();
    got.accept();
    s.opened().await.unwrap();
}

/// `s` has no answer yet (it waits at the DMZ); `what` says what went wrong if it has one.
async fn still_waiting(s: &tunnel::Stream, what: &str) {
    let answer = tokio::time::timeout(Duration::from_millis(1), s.opened()).await;
    assert!(answer.is_err(), "{what}: {answer:?}");
}

/// `s` is refused `no-route` within a second of `asked`: not held for a connector.
async fn refused_at_once(s: &tunnel::Stream, asked: std::time::Instant) {
    assert_eq!(s.opened().await.unwrap_err().code(), ErrorCode::NoRoute);
    assert!(
        asked.elapsed() < Duration::from_secs(1),
        "refused after {:?}",
        asked.elapsed()
    );
}

/// The value of `series` on the DMZ's `/metrics`.
async fn metric(gw: &Gw, series: &str) -> f64 {
    let page = raw_request(
        gw.admin,
        b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
    )
    .await;
    page.lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no {series} in\n{page}"))
}

/// Polls `series` on the DMZ's `/metrics` until it reads `want` (10 s at most).
async fn metric_reaches(gw: &Gw, series: &str, want: f64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let v = metric(gw, series).await;
        if v == want {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{series} stayed {v}, not {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn raw_request(addr: SocketAddr, req: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(req).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn healthz_answers_under_the_prefix_and_unknown_paths_get_404() {
    let gw = gateway(&["*:*"], |_| {}).await;
    let r = raw_request(gw.addr, b"GET /sp/healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(
        r.starts_with("HTTP/1.1 200") && r.contains("instance dmz-test"),
        "{r}"
    );
    let r = raw_request(gw.addr, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(r.starts_with("HTTP/1.1 404"), "{r}");
}

#[tokio::test]
async fn silent_clients_do_not_stall_the_accept_loop_and_are_dropped_at_the_deadline() {
    let gw = gateway(&["*:*"], |c| c.limits.handshakes_per_ip = 1000.0).await;
    let mut silent = Vec::new();
    for _ in 0..50 {
        silent.push(TcpStream::connect(gw.addr).await.unwrap());
    }
    // Served while fifty silent clients hold connections.
    let r = raw_request(gw.addr, b"GET /sp/healthz HTTP/1.1\r\n\r\n").await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    // Each silent client is closed once the handshake deadline passes.
    for mut s in silent {
        let mut b = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b))
            .await
            .expect("closed at the deadline");
        assert!(matches!(n, Ok(0) | Err(_)));
    }
}

#[tokio::test]
async fn a_request_without_upgrade_gets_426_naming_the_likely_cause() {
    let gw = gateway(&["*:*"], |_| {}).await;
    let r = raw_request(
        gw.addr,
        b"GET /sp/agent HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n",
    )
    .await;
    assert!(
        r.starts_with("HTTP/1.1 426") && r.contains("stripped"),
        "{r}"
    );
}

#[tokio::test]
async fn an_oversized_head_gets_431_and_garbage_gets_400() {
    let gw = gateway(&["*:*"], |_| {}).await;
    let mut req = b"GET /sp/agent HTTP/1.1\r\n".to_vec();
    for i in 0..1000 {
        req.extend_from_slice(format!("X-Filler-{i}: aaaaaaaaaaaaaaaaaaaaaaaa\r\n").as_bytes());
    }
    let r = raw_request(gw.addr, &req).await;
    assert!(
        r.starts_with("HTTP/1.1 431") || r.starts_with("HTTP/1.1 400"),
        "{r}"
    );
    let r = raw_request(gw.addr, b"\x16\x03\x01\x00\x05hello\r\n\r\n").await;
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
}

#[tokio::test]
async fn a_bad_token_gets_401_and_never_reaches_a_connector() {
    let gw = gateway(&["*:*"], |_| {}).await;
    let (_c, mut incoming) = connector(&gw, &["*:*"]).await;
    let bad = format!("sp_alice-laptop_{}", "0".repeat(64));
    let err = session(&gw, "agent", &bad, Role::Agent).await.unwrap_err();
    assert!(
        err.contains("401") && err.contains("invalid token"),
        "{err}"
    );
    // A connector token is not an agent token either.
    let err = session(&gw, "agent", &gw.connector_token, Role::Agent)
        .await
        .unwrap_err();
    assert!(err.contains("401"), "{err}");
    assert!(
        tokio::time::timeout(Duration::from_millis(200), incoming.accept())
            .await
            .is_err()
    );
}

#[tokio::test]
async fn the_dmz_stamps_the_authenticated_identity_whatever_the_agent_claims() {
    let gw = gateway(&["*.internal:*"], |_| {}).await;
    let (_c, mut incoming) = connector(&gw, &["db.internal:5432"]).await;
    let (agent, _) = session(&gw, "agent", &gw.agent_token, Role::Agent)
        .await
        .unwrap();
    let mut claimed = Meta::default();
    claimed.set(meta::NAME, "mallory");
    claimed.set(meta::GROUPS, "admins");
    claimed.set(meta::TOKEN_ID, "root");
    let s = agent.open(Dest::new("db.internal", 5432), claimed).unwrap();
    let got = incoming.accept().await.unwrap();
    let m = &got.request().unwrap().meta;
    assert_eq!(m.get(meta::NAME), Some("alice"));
    assert_eq!(m.get(meta::GROUPS), Some("dev"));
    assert_eq!(m.get(meta::TOKEN_ID), Some("alice-laptop"));
    assert_eq!(m.get(meta::DMZ_INSTANCE), Some("dmz-test"));
    got.accept();
    s.opened().await.unwrap();
}

#[tokio::test]
async fn a_connector_cannot_attract_routes_its_credential_was_not_issued_for() {
    let gw = gateway(&["db.internal:5432"], |_| {}).await;
    let (_c, mut incoming) = connector(&gw, &["*:*", "db.internal:5432"]).await;
    let (agent, s) = open_as_agent(&gw, "mail.example.com", 443).await;
    let err = s.opened().await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::NoRoute);
    assert!(
        err.to_string()
            .contains("no connector serves mail.example.com:443"),
        "{err}"
    );
    let s = agent
        .open(Dest::new("db.internal", 5432), Meta::default())
        .unwrap();
    let got = incoming.accept().await.unwrap();
    got.accept();
    s.opened().await.unwrap();
}

/// A rolling restart, as a CI run once caught it: an agent reconnected to a restarted instance
/// 15 ms after it listened, ~100 ms before its connectors came back, and its new connections
/// were refused `no-route` meanwhile. A young instance holds a stream while a connector
/// credential that may serve it has no session yet; once it is there, a destination nobody
/// serves is refused promptly again.
#[tokio::test]
async fn an_agent_on_a_restarted_instance_is_not_refused_before_its_connectors_are_back() {
    let gw = gateway(&["db.internal:5432"], |_| {}).await;
    let (agent, s) = open_as_agent(&gw, "db.internal", 5432).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_c, mut incoming) = connector(&gw, &["db.internal:5432"]).await;
    served(
        &mut incoming,
        &s,
        "the stream reached the connector that attached after it was opened",
    )
    .await;
    let asked = std::time::Instant::now();
    let s = agent
        .open(Dest::new("db.internal", 5433), Meta::default())
        .unwrap();
    refused_at_once(&s, asked).await;
}

/// A connector whose allow-list leaves none of its credential's routes advertises an empty
/// list: that is its answer, and a destination under its credential is refused at once, not
/// held for the whole window as if the connector were still to come.
#[tokio::test]
async fn a_connector_that_advertises_no_routes_is_heard_and_nothing_waits_for_it() {
    let gw = gateway(&["*.internal:*"], |_| {}).await;
    let (_c, _incoming) = connector(&gw, &[]).await;
    let asked = std::time::Instant::now();
    let (_agent, s) = open_as_agent(&gw, "web.internal", 80).await;
    refused_at_once(&s, asked).await;
}

/// Two sites: site A's connector is back, site B's not yet. A stream to site B waits for B,
/// not only for the first connector to come back.
#[tokio::test]
async fn a_stream_to_a_second_site_waits_for_that_sites_connector() {
    let gw = gateway(&["a.internal:*"], |_| {}).await;
    let site_b = site_b(&gw).await;
    let (_a, _) = connector(&gw, &["a.internal:22"]).await;
    let (_agent, s) = open_as_agent(&gw, "b.internal", 22).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_b, mut incoming) = connector_as(&gw, &site_b, &["b.internal:22"]).await;
    served(
        &mut incoming,
        &s,
        "the stream waited for site B's connector",
    )
    .await;
}

/// A cluster that accepts tokens by their signature alone (`[v2] require_listed = false`) need
/// not list its connectors' credentials: a restarted instance could not know which connector
/// was still to come, and refused `no-route` every stream that reached it before its
/// connectors did. It holds them for the window now, as for listed credentials.
#[tokio::test]
async fn a_restarted_instance_of_a_cluster_without_listed_tokens_waits_for_connectors_it_cannot_know(
) {
    let gw = gateway(&["a.internal:*"], |c| c.v2.require_listed = false).await;
    let (_agent, s) = open_as_agent(&gw, "b.internal", 22).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    still_waiting(&s, "answered before a connector could come").await;
    // Site B's connector arrives, with a credential the instance knew nothing of before.
    let site_b = site_b(&gw).await;
    let (_b, mut incoming) = connector_as(&gw, &site_b, &["b.internal:22"]).await;
    served(
        &mut incoming,
        &s,
        "the stream waited for a connector no list named",
    )
    .await;
}

/// No connector credential may serve the destination: nothing is to come, so even a young
/// instance refuses at once.
#[tokio::test]
async fn a_destination_no_connector_credential_may_serve_is_refused_at_once_on_a_young_instance() {
    let gw = gateway(&["db.internal:5432"], |_| {}).await;
    let asked = std::time::Instant::now();
    let (_agent, s) = open_as_agent(&gw, "mail.example.com", 443).await;
    refused_at_once(&s, asked).await;
}

/// The wait ends with the window: a connector that never comes is `no-route`, not a hang.
#[tokio::test]
async fn a_stream_waits_for_its_connector_no_longer_than_the_window() {
    let gw = gateway(&["db.internal:5432"], |c| {
        c.limits.route_wait_at_start = Duration::from_millis(400)
    })
    .await;
    let (_agent, s) = open_as_agent(&gw, "db.internal", 5432).await;
    let err = tokio::time::timeout(Duration::from_secs(5), s.opened())
        .await
        .expect("refused when the window closed")
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::NoRoute);
}

/// An app that gives up while its stream waits (the agent resets it) must not leave the stream
/// holding its slot, nor have it forwarded to the connector when one attaches (the connector
/// would dial the service for nobody; a stale resume attempt could end a live one).
#[tokio::test]
async fn a_stream_given_up_while_it_waits_frees_its_slot_and_is_never_forwarded() {
    let gw = gateway(&["db.internal:5432"], |c| c.limits.streams_per_token = 1).await;
    let (agent, gone) = open_as_agent(&gw, "db.internal", 5432).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(gone);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let s = agent
        .open(Dest::new("db.internal", 5432), Meta::default())
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (_c, mut incoming) = connector(&gw, &["db.internal:5432"]).await;
    served(
        &mut incoming,
        &s,
        "the live stream had the token's one slot and reached the connector",
    )
    .await;
    assert!(
        tokio::time::timeout(Duration::from_millis(500), incoming.accept())
            .await
            .is_err(),
        "the stream given up was forwarded too"
    );
}

/// One token cannot park thousands of streams on a young instance (each is woken by every
/// change of the routes): past its share, streams are refused at once.
#[tokio::test]
async fn a_flood_of_streams_waiting_for_a_connector_is_bounded_per_token() {
    let share = 16;
    let gw = gateway(&["db.internal:5432"], |c| {
        c.limits.route_waiting_per_token = share
    })
    .await;
    let (agent, _) = session(&gw, "agent", &gw.agent_token, Role::Agent)
        .await
        .unwrap();
    let mut waiting = Vec::new();
    for _ in 0..share {
        waiting.push(
            agent
                .open(Dest::new("db.internal", 5432), Meta::default())
                .unwrap(),
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let asked = std::time::Instant::now();
    let over = agent
        .open(Dest::new("db.internal", 5432), Meta::default())
        .unwrap();
    refused_at_once(&over, asked).await;
    for s in &waiting {
        still_waiting(s, "a stream within the share was answered").await;
    }
}

/// A cap of 0 waiting streams means "never wait": refused at once, and not as a crowd.
#[tokio::test]
async fn a_cap_of_no_waiting_streams_is_never_waiting_not_a_crowd() {
    for cap in ["per token", "in all"] {
        let gw = gateway(&["db.internal:5432"], |c| match cap {
            "per token" => c.limits.route_waiting_per_token = 0,
            _ => c.limits.route_waiting = 0,
        })
        .await;
        let asked = std::time::Instant::now();
        let (_agent, s) = open_as_agent(&gw, "db.internal", 5432).await;
        let err = s.opened().await.unwrap_err();
        assert_eq!(err.code(), ErrorCode::NoRoute, "{cap}");
        assert!(asked.elapsed() < Duration::from_secs(1), "{cap}");
        assert!(!err.to_string().contains("too many"), "{cap}: {err}");
    }
}

/// Many tokens, each within its share, cannot add up to more waiting streams than the
/// instance's cap: the stream over it is refused at once, whichever token asks, and the
/// waiting ones show on `/metrics` until they end.
#[tokio::test]
async fn a_flood_of_waiting_streams_spread_over_many_tokens_is_bounded_in_all() {
    let gw = gateway(&["db.internal:5432"], |c| c.limits.route_waiting = 3).await;
    let bob = token(&gw._dir.0.join("agents.toml"), "bob-laptop", "bob", &[]);
    let (alice, _) = session(&gw, "agent", &gw.agent_token, Role::Agent)
        .await
        .unwrap();
    // Bob's token is known once the token file is reloaded (every 200 ms).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let (bob, _) = loop {
        match session(&gw, "agent", &bob, Role::Agent).await {
            Ok(s) => break s,
            Err(e) if std::time::Instant::now() > deadline => panic!("bob's session: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    let open = |s: &Session| {
        s.open(Dest::new("db.internal", 5432), Meta::default())
            .unwrap()
    };
    let waiting = [open(&alice), open(&alice), open(&bob)];
    metric_reaches(&gw, "sallyport_streams_waiting_for_connector", 3.0).await;
    for who in [&bob, &alice] {
        let asked = std::time::Instant::now();
        refused_at_once(&open(who), asked).await;
    }
    for s in &waiting {
        still_waiting(s, "a waiting stream was answered").await;
    }
    let (_c, mut incoming) = connector(&gw, &["db.internal:5432"]).await;
    let mut served = Vec::new();
    for _ in &waiting {
        let got = tokio::time::timeout(Duration::from_secs(5), incoming.accept())
            .await
            .expect("every waiting stream reached the connector")
            .unwrap();
        got.accept();
        served.push(got);
    }
    for s in &waiting {
        tokio::time::timeout(Duration::from_secs(5), s.opened())
            .await
            .expect("the connector's answer reached the agent")
            .unwrap();
    }
    metric_reaches(&gw, "sallyport_streams_waiting_for_connector", 0.0).await;
}

/// A resume whose connector session broke while it was on its way was answered
/// `session-lost`, which the agent reads as "stream is gone": the stream ended although the
/// connector still held it and was coming back. Now `no-route`, which the agent asks again.
#[tokio::test]
async fn a_resume_whose_connector_session_breaks_on_the_way_is_asked_again_not_ended() {
    use tunnel::resumable::keys;
    let gw = gateway(&["db.internal:5432"], |c| c.session.resume = true).await;
    let (conn, mut incoming) = session_with(
        &gw,
        "connector",
        &gw.connector_token,
        Role::Connector,
        |c| {
            c.resume = true;
            c.resume_id = "0123456789abcdef0123456789abcdef".into();
        },
    )
    .await
    .unwrap();
    conn.advertise_routes(vec!["db.internal:5432".into()]);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (agent, _) = session_with(&gw, "agent", &gw.agent_token, Role::Agent, |c| {
        c.resume = true
    })
    .await
    .unwrap();
    let mut m = Meta::default();
    m.set(keys::RESUME, "new");
    let first = agent.open(Dest::new("db.internal", 5432), m).unwrap();
    let held = incoming.accept().await.unwrap();
    let mut answer = Meta::default();
    answer.set(keys::KEY, "fedcba9876543210fedcba9876543210");
    held.accept_with(answer);
    first.opened().await.unwrap();
    let ticket = first.open_meta().get(keys::RESUME).unwrap().to_string();
    // The resume reaches the connector, whose session then breaks before it answers.
    let mut m = Meta::default();
    m.set(keys::RESUME, ticket);
    m.set(keys::ATTACH, "1");
    m.set(keys::RECV, "0");
    let resume = agent.open(Dest::new("db.internal", 5432), m).unwrap();
    let _arrived = incoming.accept().await.unwrap();
    conn.close(ErrorCode::SessionLost, "the connector's network changed");
    let err = tokio::time::timeout(Duration::from_secs(5), resume.opened())
        .await
        .expect("the resume was answered")
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::NoRoute, "{err}");
}

#[tokio::test]
async fn numeric_tricks_in_a_destination_are_refused_at_the_dmz() {
    let gw = gateway(&["*:*"], |_| {}).await;
    let (_c, _incoming) = connector(&gw, &["*:*"]).await;
    let (agent, _) = session(&gw, "agent", &gw.agent_token, Role::Agent)
        .await
        .unwrap();
    for host in ["167772161", "0x7f.1", "127.1"] {
        let s = agent.open(Dest::new(host, 80), Meta::default()).unwrap();
        let err = s.opened().await.unwrap_err();
        assert_eq!(err.code(), ErrorCode::NotAllowed, "{host}: {err}");
    }
}

#[tokio::test]
async fn too_many_sessions_for_one_token_are_refused_with_429() {
    let gw = gateway(&["*:*"], |c| c.limits.sessions_per_agent_token = 1).await;
    let (first, _) = session(&gw, "agent", &gw.agent_token, Role::Agent)
        .await
        .unwrap();
    let err = session(&gw, "agent", &gw.agent_token, Role::Agent)
        .await
        .unwrap_err();
    assert!(
        err.contains("429") && err.contains("too many sessions"),
        "{err}"
    );
    assert!(!first.is_closed());
    // The slot is freed when the first session ends.
    first.close(ErrorCode::Shutdown, "bye");
    tokio::time::sleep(Duration::from_millis(200)).await;
    session(&gw, "agent", &gw.agent_token, Role::Agent)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_wrong_protocol_version_is_closed_with_a_reason() {
    let gw = gateway(&["*:*"], |_| {}).await;
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let url = format!("ws://{}/sp/agent", gw.addr);
    let t = tunnel::ws::client(
        tcp,
        &url,
        Some(&gw.agent_token),
        65536,
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    use tunnel::transport::{Transport, TransportRx, TransportTx};
    let (mut tx, mut rx) = t.split();
    let hello = Frame::Hello(tunnel::Hello {
        version: 42,
        role: Role::Agent,
        stream_window: 65536,
        session_window: 1 << 20,
        max_frame: 65536,
        instance_id: "old".into(),
        features: 0,
        resume_id: String::new(),
    });
    tx.send(hello.encode()).await.unwrap();
    tx.flush().await.unwrap();
    let _their_hello = rx.recv().await.unwrap().unwrap();
    let goaway = Frame::decode(rx.recv().await.unwrap().unwrap(), 1 << 20).unwrap();
    match goaway {
        Frame::GoAway { code, reason } => {
            assert_eq!(code, ErrorCode::Version);
            assert!(reason.contains("v42"), "{reason}");
        }
        other => panic!("expected GOAWAY, got {other:?}"),
    }
}

/// The claim of hop-by-hop credit: agent A opens a stream whose service floods it and never
/// reads; agent B's stream through the *same* connector session still moves 32 MiB.
#[tokio::test]
async fn a_slow_agent_never_stalls_a_connector_session_shared_with_others() {
    let gw = gateway(&["*.internal:*"], |_| {}).await;
    let (conn, mut incoming) = session(&gw, "connector", &gw.connector_token, Role::Connector)
        .await
        .unwrap();
    conn.advertise_routes(vec!["*.internal:*".into()]);
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The connector side: "flood" writes forever, "fast" writes 32 MiB and finishes.
    tokio::spawn(async move {
        while let Some(mut s) = incoming.accept().await {
            s.accept();
            let host = s.request().unwrap().dest.host.clone();
            tokio::spawn(async move {
                let chunk = vec![5u8; 64 * 1024];
                if host == "flood.internal" {
                    while s.write_all(&chunk).await.is_ok() {}
                } else {
                    for _ in 0..512 {
                        s.write_all(&chunk).await.unwrap();
                    }
                    s.shutdown().await.unwrap();
                    let mut sink = Vec::new();
                    let _ = s.read_to_end(&mut sink).await;
                }
            });
        }
    });
    let (slow_agent, _) = session(&gw, "agent", &gw.agent_token, Role::Agent)
        .await
        .unwrap();
    let mut stalled = Vec::new();
    for _ in 0..8 {
        let s = slow_agent
            .open(Dest::new("flood.internal", 1), Meta::default())
            .unwrap();
        s.opened().await.unwrap();
        stalled.push(s); // never read
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (fast_agent, _) = session(&gw, "agent", &gw.agent_token, Role::Agent)
        .await
        .unwrap();
    let mut s = fast_agent
        .open(Dest::new("fast.internal", 2), Meta::default())
        .unwrap();
    s.opened().await.unwrap();
    s.shutdown().await.unwrap();
    let mut got = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(20), s.read(&mut buf))
            .await
            .expect("fast stream stalled")
            .unwrap();
        if n == 0 {
            break;
        }
        got += n;
    }
    assert_eq!(got, 32 * 1024 * 1024);
    // Each stalled stream holds at most its window at the slow agent: nothing ran away.
    for st in &stalled {
        assert!(st.byte_counts().0 <= 512 * 1024, "{}", st.byte_counts().0);
    }
}

#[tokio::test]
async fn handshakes_beyond_the_per_address_rate_are_closed_unanswered() {
    let gw = gateway(&["*:*"], |c| {
        c.limits.handshakes_per_ip = 5.0;
        c.limits.handshake_burst = 10.0;
    })
    .await;
    let mut answered = 0;
    for _ in 0..30 {
        if raw_request(gw.addr, b"GET /sp/healthz HTTP/1.1\r\n\r\n")
            .await
            .starts_with("HTTP/1.1 200")
        {
            answered += 1;
        }
    }
    // A burst of twice the rate, plus what refills while the loop runs.
    assert!((10..30).contains(&answered), "{answered} of 30 answered");
}

/// Pinned by review: an agent that gives up on an upload while the service is not reading must
/// not leave the relay (and the connector's stream to the service) waiting forever.
#[tokio::test]
async fn an_agent_reset_reaches_a_connector_stream_whose_service_is_not_reading() {
    let gw = gateway(&["*.internal:*"], |_| {}).await;
    let (conn, mut incoming) = session(&gw, "connector", &gw.connector_token, Role::Connector)
        .await
        .unwrap();
    conn.advertise_routes(vec!["*.internal:*".into()]);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (agent, _) = session(&gw, "agent", &gw.agent_token, Role::Agent)
        .await
        .unwrap();
    let s = agent
        .open(Dest::new("sink.internal", 9), Meta::default())
        .unwrap();
    let upstream = incoming.accept().await.unwrap();
    upstream.accept(); // ...and never reads
    s.opened().await.unwrap();
    let writer = tokio::spawn(async move {
        let chunk = vec![7u8; 64 * 1024];
        let mut s = s;
        for _ in 0..64 {
            if tokio::time::timeout(Duration::from_millis(500), s.write_all(&chunk))
                .await
                .is_err()
            {
                break; // blocked: every window on the way is full
            }
        }
        s // dropped by the caller: RST
    });
    let s = writer.await.unwrap();
    drop(s);
    let err = tokio::time::timeout(Duration::from_secs(5), upstream.failure())
        .await
        .expect("the reset never reached the connector side");
    assert_eq!(err.code(), ErrorCode::Cancel, "{err}");
}

/// Whether the gateway answered a session attempt at all (a session, or an HTTP refusal such
/// as 401 or 429); `false`: closed unanswered at accept, over the address's handshake budget.
fn answered(r: &Result<(Session, Incoming), String>) -> bool {
    match r {
        Ok(_) => true,
        Err(e) => e.contains("401") || e.contains("429"),
    }
}

/// Authenticated handshakes give their charge back, so desktops behind one NAT do not use up
/// the address's budget; an attacker behind the same NAT whose handshakes fail still does, and
/// then the desktops wait too (the budget is per address, whoever spends it).
#[tokio::test]
async fn failed_handshakes_still_exhaust_the_per_address_budget_when_authenticated_ones_are_refunded(
) {
    let gw = gateway(&["*:*"], |c| {
        c.limits.handshakes_per_ip = 0.01;
        c.limits.handshake_burst = 4.0;
    })
    .await;
    // Twelve sessions one after the other: three times the burst, each refunded.
    for i in 0..12 {
        let (s, _) = session(&gw, "agent", &gw.agent_token, Role::Agent)
            .await
            .unwrap_or_else(|e| panic!("session {i}: {e}"));
        s.close(ErrorCode::Shutdown, "bye");
    }
    // The attacker's bad tokens: answered (401) until the burst is spent, then closed unanswered.
    let bad = format!("sp_alice-laptop_{}", "0".repeat(64));
    let mut attempts = Vec::new();
    for _ in 0..10 {
        attempts.push(session(&gw, "agent", &bad, Role::Agent).await);
    }
    assert_eq!(attempts.iter().filter(|r| answered(r)).count(), 4);
    let good = session(&gw, "agent", &gw.agent_token, Role::Agent).await;
    assert!(!answered(&good), "the address's budget is spent");
}

/// A stolen token reconnecting in a loop is refunded only its own burst of refunds (its
/// session limit), then pays from the address's budget like anyone, then gets nothing.
#[tokio::test]
async fn a_stolen_token_reconnecting_in_a_loop_is_refunded_only_its_burst() {
    let gw = gateway(&["*:*"], |c| {
        c.limits.handshakes_per_ip = 0.01;
        c.limits.handshake_burst = 4.0;
        c.limits.sessions_per_agent_token = 24;
        c.limits.sessions_per_connector_token = 2;
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..60 {
        held.push(session(&gw, "agent", &gw.agent_token, Role::Agent).await);
    }
    // 24 refunded sessions, then four charged attempts (refused 429: the session limit), then
    // closed unanswered. (The refunds refill at 1/s: one more if the loop took over a second.)
    let answered = held.iter().filter(|r| answered(r)).count();
    assert!((28..=29).contains(&answered), "{answered} answered");
    assert_eq!(held.iter().filter(|r| r.is_ok()).count(), 24);
}
