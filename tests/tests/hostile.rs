//! The hostile-client suite: every attack on the DMZ gateway that the hardening answers, played
//! with real binaries on loopback, each test named after the attack. A test asserts that the
//! gateway closes or refuses, "within the handshake deadline plus a margin", never a tight
//! timing. Attackers bind 127.0.0.2 (another address of the loopback network), the legitimate
//! agent stays on 127.0.0.1.
//!
//! The agent's side (another local user, a LAN source address, secrets in trace logs) is in
//! `hostile/agent.rs`.
//!
//! Unit-level twins (no sockets): `tunnel/tests/session.rs` (PING floods, refused-OPEN floods,
//! long route lists, oversize OPENs), `gateway/src/dmz/preauth.rs` (eviction, IPv6 /64 keys),
//! `gateway/src/logsafe.rs` (escaping), `gateway/src/dmz/upgrade.rs` (forged `Forwarded`).

#[path = "hostile/agent.rs"]
mod agent;
#[path = "hostile/v2.rs"]
mod v2;

use sallyport_e2e::*;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

/// The attacker's address.
const ATTACKER: [u8; 4] = [127, 0, 0, 2];

/// A DMZ gateway (plain, as behind a TLS-terminating load balancer, unless `tls`) with the
/// `[limits]` lines given, and the PKI it uses.
struct Gw {
    pki: Pki,
    dmz: Proc,
    addr: SocketAddr,
    tls: bool,
}

fn gateway(tag: &str, limits: &str, tls: bool) -> Gw {
    let pki = Pki::new(tag).unwrap();
    // Protocol v1 bearer tokens: these attacks target v1's paths (bearer, inner channel),
    // which a gateway serves until its cut-off; v2's are in `hostile/v2.rs`.
    pki.token(
        "agent",
        "alice-laptop",
        &["--v1", "--name", "alice", "--groups", "dev"],
    )
    .unwrap();
    pki.token("connector", "site-a", &["--route", "*.internal:*"])
        .unwrap();
    pki.token("agent", "bob-laptop", &["--name", "bob"])
        .unwrap();
    std::fs::write(pki.p("dmz.toml"), format!("[limits]\n{limits}\n")).unwrap();
    let mut cmd = Command::new(bin("sallyport-gateway"));
    cmd.args([
        "dmz",
        "--listen",
        "127.0.0.1:0",
        "--instance-id",
        "dmz-hostile",
    ])
    .arg("-c")
    .arg(pki.p("dmz.toml"))
    .arg("--agent-tokens")
    .arg(pki.p("agents.toml"))
    .arg("--connector-tokens")
    .arg(pki.p("connectors.toml"));
    if tls {
        cmd.arg("--tls-cert")
            .arg(pki.p("gateway.crt"))
            .arg("--tls-key")
            .arg(pki.p("gateway.key"));
    } else {
        cmd.arg("--plain");
    }
    let dmz = Proc::spawn("dmz", &mut cmd).unwrap();
    let addr = dmz.addr(&["dmz gateway listening"]).unwrap();
    Gw {
        pki,
        dmz,
        addr,
        tls,
    }
}

impl Gw {
    fn url(&self) -> String {
        let scheme = if self.tls { "wss" } else { "ws" };
        format!("{scheme}://127.0.0.1:{}/", self.addr.port())
    }

    fn token(&self) -> String {
        std::fs::read_to_string(self.pki.p("alice-laptop.token"))
            .unwrap()
            .trim()
            .to_string()
    }

    /// Bob's protocol v2 token.
    fn v2_token(&self) -> tunnel::token::Token {
        std::fs::read_to_string(self.pki.p("bob-laptop.token"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    /// A connector serving `backend.internal` on loopback with these `--allow` rules.
    fn connector(&self, allow: &[String], extra: &[&str]) -> Proc {
        let mut cmd = Command::new(bin("sallyport-gateway"));
        cmd.args(["connector", "--gateway", &self.url(), "--token-file"])
            .arg(self.pki.p("site-a.token"))
            .arg("--ca")
            .arg(self.pki.p("ca.crt"))
            .args(["--host", "backend.internal=127.0.0.1"])
            .args(["--instance-id", "connector-hostile"]);
        for a in allow {
            cmd.arg("--allow").arg(a);
        }
        cmd.args(extra);
        let c = Proc::spawn("connector", &mut cmd).unwrap();
        self.dmz
            .wait_for(&["connector routes"], Duration::from_secs(15))
            .unwrap();
        c
    }

    /// The real agent with the token in `file` (e.g. Bob's v2 token), no `--ca`.
    fn agent_with_token(&self, name: &str, file: &str) -> (Proc, SocketAddr) {
        let mut cmd = Command::new(bin("sallyport"));
        cmd.args(["run", "--gateway", &self.url(), "--socks", "127.0.0.1:0"])
            .args(["--http", "off", "--token-file"])
            .arg(self.pki.p(file))
            .env("HOME", self.pki.dir.path())
            .env("XDG_CONFIG_HOME", self.pki.dir.path().join(".config"));
        for k in ["HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"] {
            cmd.env_remove(k);
        }
        let a = Proc::spawn(name, &mut cmd).unwrap();
        let socks = a.addr(&["listening", "socks5"]).unwrap();
        (a, socks)
    }

    /// The real agent, on 127.0.0.1.
    fn agent(&self, name: &str, extra: &[&str]) -> (Proc, SocketAddr) {
        let mut cmd = Command::new(bin("sallyport"));
        cmd.args(["run", "--gateway", &self.url(), "--socks", "127.0.0.1:0"])
            .args(["--http", "off", "--token-file"])
            .arg(self.pki.p("alice-laptop.token"))
            .arg("--ca")
            .arg(self.pki.p("ca.crt"))
            .env("HOME", self.pki.dir.path())
            .env("XDG_CONFIG_HOME", self.pki.dir.path().join(".config"))
            .args(extra);
        for k in ["HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"] {
            cmd.env_remove(k);
        }
        let a = Proc::spawn(name, &mut cmd).unwrap();
        let socks = a.addr(&["listening", "socks5"]).unwrap();
        (a, socks)
    }
}

/// A TCP connection from the attacker's address (std has no bind-before-connect: a tiny tokio
/// runtime does it).
fn attacker_connect(to: SocketAddr) -> TcpStream {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let s = rt
        .block_on(async move {
            let s = tokio::net::TcpSocket::new_v4()?;
            s.bind(SocketAddr::from((ATTACKER, 0)))?;
            s.connect(to).await?.into_std()
        })
        .unwrap();
    s.set_nonblocking(false).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// Reads until the gateway closes the connection (or `within` passes); how long that took.
fn closed_within(s: &mut TcpStream, within: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    while started.elapsed() < within {
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        match s.read(&mut buf) {
            Ok(0) => return Some(started.elapsed()),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return Some(started.elapsed()),
        }
    }
    None
}

/// Whether the gateway still holds the connection open (nothing to read, not closed).
fn still_open(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let mut buf = [0u8; 1024];
    match s.read(&mut buf) {
        Ok(0) => false,
        Ok(_) => true,
        Err(e) => matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

fn curl_socks(socks: SocketAddr, url: &str) -> (i32, String, String) {
    require_tool("curl");
    run(Command::new("curl")
        .args(["-sS", "--max-time", "20", "--socks5-hostname"])
        .arg(socks.to_string())
        .arg(url))
    .unwrap()
}

/// A real agent that connects and fetches the backend's page through its SOCKS port: what every
/// attack must leave working. Returns the agent (its log, for the caller's checks).
fn agent_reaches_backend(gw: &Gw, name: &str, extra: &[&str], port: u16) -> Proc {
    let (agent, socks) = gw.agent(name, extra);
    agent
        .wait_for(&["connected to the gateway"], Duration::from_secs(20))
        .unwrap();
    let (code, out, err) = curl_socks(socks, &format!("http://backend.internal:{port}/"));
    assert_eq!(
        (code, out.as_str()),
        (0, "hello from backend.internal\n"),
        "{err}\n{}",
        agent.log()
    );
    agent
}

/// TLS, the request head and the tunnel hello each had their own deadline, so a client that
/// used each one to the last moment held its slot three times as long. Now one deadline covers
/// all of it: a head sent just before the deadline, then silence instead of a hello, ends at
/// that same deadline.
#[test]
fn a_silent_client_is_cut_at_one_handshake_deadline() {
    let tls = gateway("hostile-silent-tls", "handshake_timeout = \"4s\"", true);
    let mut s = attacker_connect(tls.addr);
    let took = closed_within(&mut s, Duration::from_secs(12)).expect("closed");
    assert!(
        took < Duration::from_secs(6),
        "silent TLS client held {took:?}"
    );

    let gw = gateway("hostile-silent", "handshake_timeout = \"4s\"", false);
    let started = Instant::now();
    let mut s = attacker_connect(gw.addr);
    std::thread::sleep(Duration::from_millis(3000));
    let upgrade = format!(
        "GET /agent HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nAuthorization: Bearer {}\r\n\r\n",
        gw.token()
    );
    s.write_all(upgrade.as_bytes()).unwrap();
    let mut buf = [0u8; 1024];
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let n = s.read(&mut buf).unwrap();
    assert!(
        String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    // No tunnel hello: the connection ends at the first deadline, not 4 s after the head.
    closed_within(&mut s, Duration::from_secs(12)).expect("closed");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(6), "held {took:?}");
}

/// `POST /agent/http` with `Content-Length: 1100000`, 1 KB sent, then nothing: the gateway read
/// up to ~1 MiB before looking at the token, and the connection stayed up after 50 s.
#[test]
fn a_stalled_fallback_body_is_cut_at_the_handshake_deadline() {
    let gw = gateway("hostile-body", "handshake_timeout = \"2s\"", false);
    let mut s = attacker_connect(gw.addr);
    s.write_all(b"POST /agent/http HTTP/1.1\r\nHost: gw\r\nContent-Length: 1100000\r\n\r\n")
        .unwrap();
    s.write_all(&[b'x'; 1024]).unwrap();
    let took = closed_within(&mut s, Duration::from_secs(10)).expect("closed");
    assert!(took < Duration::from_secs(5), "{took:?}");
}

/// A keep-alive connection whose second request head arrives one byte every half second:
/// unauthenticated, it ends at the handshake deadline; authenticated, at the head timeout.
#[test]
fn a_slow_second_request_head_is_cut() {
    let gw = gateway(
        "hostile-slowloris",
        "handshake_timeout = \"2s\"\nhead_timeout = \"2s\"",
        false,
    );
    let slowloris = |s: &mut TcpStream| {
        let started = Instant::now();
        let head = b"GET /agent/http/00 HTTP/1.1\r\nHost: gw\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
        for b in head.iter() {
            if s.write_all(&[*b]).is_err() || !still_open(s) {
                return started.elapsed();
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        panic!(
            "the whole slow head went through in {:?}",
            started.elapsed()
        );
    };
    // Unauthenticated: a first request that proves nothing (404), then the slow head.
    let mut s = attacker_connect(gw.addr);
    s.write_all(b"GET /agent/http/nope HTTP/1.1\r\nHost: gw\r\n\r\n")
        .unwrap();
    let took = slowloris(&mut s);
    assert!(took < Duration::from_secs(6), "{took:?}");
    // Authenticated: a session created with the bearer token, then the slow head.
    let mut s = attacker_connect(gw.addr);
    let token = gw.token();
    s.write_all(
        format!("POST /agent/http HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {token}\r\nContent-Length: 0\r\n\r\n")
            .as_bytes(),
    )
    .unwrap();
    let mut buf = [0u8; 2048];
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let n = s.read(&mut buf).unwrap();
    assert!(
        String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    let took = slowloris(&mut s);
    assert!(took < Duration::from_secs(8), "{took:?}");
}

/// One address opening and stalling connections used to take every one of the gateway's
/// connection permits (all 8,192 in about 7 minutes at the allowed rate): no agent or connector
/// could connect. Now it holds at most `unauth_per_addr` of them, its oldest evicted.
#[test]
fn one_address_cannot_hold_every_connection_slot() {
    let gw = gateway(
        "hostile-slots",
        "handshake_timeout = \"30s\"\nmax_connections = 16\nunauth_per_addr = 4\nhandshakes_per_ip = 1000.0",
        false,
    );
    let svc = http_service().unwrap();
    let _connector = gw.connector(&allow_backend(svc.port()), &[]);
    let mut held: Vec<TcpStream> = (0..40).map(|_| attacker_connect(gw.addr)).collect();
    std::thread::sleep(Duration::from_millis(500));
    let _agent = agent_reaches_backend(&gw, "agent", &[], svc.port());
    // The DMZ's tasks close the evicted connections on their own time: polled, well within
    // the 30 s for which a connection it did not evict would stay open.
    let open = eventually(
        Duration::from_secs(10),
        || held.iter_mut().map(still_open).filter(|o| *o).count(),
        |open| *open <= 4,
    );
    assert!(open <= 4, "the attacker still holds {open} connections");
}

/// Anyone can build the inner channel's first message from the public `/key`: every
/// `POST …/agent/http?inner=1` created a session and two tasks before any token was seen, and
/// a few dozen filled the registry (503 for every fallback agent). Now such sessions are
/// pending, bounded per address and in all, and end at the handshake deadline.
#[test]
fn inner_hello_floods_cannot_fill_the_session_registry() {
    let gw = gateway(
        "hostile-inner",
        "handshake_timeout = \"30s\"\nmax_connections = 16\nunauth_per_addr = 4\npending_inner_sessions = 8\nhandshakes_per_ip = 1000.0",
        false,
    );
    let svc = http_service().unwrap();
    let _connector = gw.connector(&allow_backend(svc.port()), &[]);
    // The attacker reads the key like anyone can.
    let mut s = attacker_connect(gw.addr);
    s.write_all(b"GET /key HTTP/1.1\r\nHost: gw\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    let key_text = answer
        .lines()
        .find_map(|l| l.strip_prefix("inner "))
        .expect("inner key")
        .to_string();
    let key: tunnel::inner::PublicKey = key_text.parse().unwrap();
    let mut created = 0;
    let mut conns = Vec::new();
    for _ in 0..40 {
        let (_init, hello) = tunnel::inner::Initiator::start(&key, &[7u8; 32]).unwrap();
        let mut s = attacker_connect(gw.addr);
        let head = format!(
            "POST /agent/http?inner=1 HTTP/1.1\r\nHost: gw\r\nContent-Length: {}\r\n\r\n",
            hello.len()
        );
        s.write_all(head.as_bytes()).unwrap();
        s.write_all(&hello).unwrap();
        let mut buf = [0u8; 1024];
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        if let Ok(n) = s.read(&mut buf) {
            if String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200") {
                created += 1;
            }
        }
        conns.push(s);
    }
    assert!(
        created > 0,
        "the flood created nothing at all: the test is broken"
    );
    // A real agent on the HTTP fallback, inside the inner channel, still gets a session.
    let agent = agent_reaches_backend(
        &gw,
        "agent-http",
        &["--transport", "http", "--gateway-inner-key", &key_text],
        svc.port(),
    );
    let line = agent
        .wait_for(&["connected to the gateway"], Duration::from_secs(10))
        .unwrap();
    assert!(line.contains("http, inner channel"), "{line}");
}

/// A rogue agent made with the protocol crate itself: an authenticated session on the plain
/// gateway, with a chosen instance id.
fn rogue_agent(rt: &tokio::runtime::Runtime, gw: &Gw, instance_id: &str) -> tunnel::Session {
    let token = gw.token();
    let url = format!("ws://127.0.0.1:{}/agent", gw.addr.port());
    let addr = gw.addr;
    let id = instance_id.to_string();
    rt.block_on(async move {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let ws = tunnel::ws::client(tcp, &url, Some(&token), 65536, Duration::from_secs(5))
            .await
            .unwrap();
        let mut cfg = tunnel::Config::new(tunnel::Role::Agent, true);
        cfg.accept_streams = false;
        cfg.instance_id = id;
        tunnel::Session::start(ws, cfg).await.unwrap().0
    })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// An `OPEN` with ~60 KiB of metadata grew past the frame limit once the DMZ stamped the
/// identity; the connector refused the frame and its whole session died, with every user's
/// streams on it. Now the DMZ refuses it, and the connector never sees it.
#[test]
fn an_oversize_open_is_refused_at_the_dmz_and_the_connector_session_lives() {
    let gw = gateway("hostile-meta", "", false);
    let svc = http_service().unwrap();
    let _connector = gw.connector(&allow_backend(svc.port()), &[]);
    let rt = runtime();
    let session = rogue_agent(&rt, &gw, "rogue");
    let mut meta = tunnel::Meta::default();
    meta.set("sp-note", "x".repeat(60 * 1024));
    let err = rt.block_on(async {
        let s = session
            .open(tunnel::Dest::new("backend.internal", svc.port()), meta)
            .unwrap();
        s.opened().await.unwrap_err()
    });
    assert_eq!(err.code(), tunnel::ErrorCode::Limit, "{err}");
    assert!(err.to_string().contains("metadata"), "{err}");
    // The connector's session is untouched: a real agent still gets through.
    let _agent = agent_reaches_backend(&gw, "agent", &[], svc.port());
    // The DMZ's log as far as the agent's stream, which came after the oversize OPEN: a
    // session it ended would show by then.
    gw.dmz
        .wait_for(
            &["stream open", "backend.internal"],
            Duration::from_secs(10),
        )
        .unwrap();
    assert!(
        !gw.dmz.log().contains("connector session ended"),
        "{}",
        gw.dmz.log()
    );
}

/// Untrusted text went raw into the logs: a 64 KiB instance id on every audit line, and a
/// destination with newlines forged whole log lines.
#[test]
fn forged_log_lines_and_huge_fields_stay_out_of_the_logs() {
    let gw = gateway("hostile-logs", "", false);
    let svc = http_service().unwrap();
    let _connector = gw.connector(&allow_backend(svc.port()), &[]);
    let rt = runtime();
    let session = rogue_agent(&rt, &gw, &"A".repeat(60 * 1024));
    let forged =
        "x.internal\n2026-12-05T00:00:00Z  INFO audit: event=\"open\" token=\"admin\" FORGED";
    rt.block_on(async {
        let s = session
            .open(tunnel::Dest::new(forged, 80), tunnel::Meta::default())
            .unwrap();
        let _ = s.opened().await;
    });
    gw.dmz
        .wait_for(&["stream refused"], Duration::from_secs(10))
        .unwrap();
    let log = gw.dmz.log();
    for line in log.lines() {
        assert!(line.len() < 4096, "a log line of {} bytes", line.len());
        assert!(
            !line.trim_start().starts_with("2026-12-05T00:00:00Z"),
            "forged line: {line}"
        );
    }
    assert!(
        log.contains("FORGED"),
        "the refusal is still logged, escaped:\n{log}"
    );
}

/// A token issued with `--route` had those routes only narrow its PAC file: the DMZ let it
/// open anything any connector served.
#[test]
fn a_token_issued_with_routes_reaches_only_those() {
    let gw = gateway("hostile-routes", "", false);
    let svc = http_service().unwrap();
    let other = http_service().unwrap();
    let mut allow = allow_backend(svc.port());
    allow.extend(allow_backend(other.port()));
    let _connector = gw.connector(&allow, &[]);
    gw.pki
        .token(
            "agent",
            "narrow",
            &["--route", &format!("backend.internal:{}", svc.port())],
        )
        .unwrap();
    let (agent, socks) = {
        let mut cmd = Command::new(bin("sallyport"));
        cmd.args(["run", "--gateway", &gw.url(), "--socks", "127.0.0.1:0"])
            .args(["--http", "off", "--token-file"])
            .arg(gw.pki.p("narrow.token"))
            .env("HOME", gw.pki.dir.path());
        let a = Proc::spawn("narrow-agent", &mut cmd).unwrap();
        let socks = a.addr(&["listening", "socks5"]).unwrap();
        (a, socks)
    };
    agent
        .wait_for(&["connected to the gateway"], Duration::from_secs(15))
        .unwrap();
    let (code, out, _) = curl_socks(socks, &format!("http://backend.internal:{}/", svc.port()));
    assert_eq!((code, out.as_str()), (0, "hello from backend.internal\n"));
    let (code, _, _) = curl_socks(socks, &format!("http://backend.internal:{}/", other.port()));
    assert_ne!(
        code, 0,
        "a destination outside the token's routes was reached"
    );
    gw.dmz
        .wait_for(&["not among this token's routes"], Duration::from_secs(10))
        .unwrap();
}

/// One token could take all 65,536 stream permits (and ~32k sockets at the connector).
#[test]
fn one_token_cannot_hold_every_stream() {
    let gw = gateway("hostile-streams", "streams_per_token = 3", false);
    let echo = echo_service().unwrap();
    let _connector = gw.connector(&allow_backend(echo.port()), &[]);
    let rt = runtime();
    let session = rogue_agent(&rt, &gw, "greedy");
    let results: Vec<Result<(), tunnel::StreamError>> = rt.block_on(async {
        let mut held = Vec::new();
        let mut out = Vec::new();
        for _ in 0..5 {
            let s = session
                .open(
                    tunnel::Dest::new("backend.internal", echo.port()),
                    tunnel::Meta::default(),
                )
                .unwrap();
            out.push(s.opened().await);
            held.push(s);
        }
        out
    });
    let ok = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(ok, 3, "{results:?}");
    let refused = results.iter().find_map(|r| r.as_ref().err()).unwrap();
    assert_eq!(refused.code(), tunnel::ErrorCode::Limit, "{refused}");
}

/// A connector with 3,000 allow rules (about 195 KB of routes) never held a session: the DMZ
/// ended each one with "message too large" and it reconnected in a loop.
#[test]
fn a_connector_with_3000_allow_rules_holds_its_session() {
    let gw = gateway("hostile-allowlist", "", false);
    let svc = http_service().unwrap();
    let mut rules: Vec<String> = (0..2998)
        .map(|i| format!("\"service-{i:04}.dept-{}.internal:1-65535\"", i % 97))
        .collect();
    rules.extend(allow_backend(svc.port()).iter().map(|r| format!("\"{r}\"")));
    let conf = gw.pki.p("connector.toml");
    std::fs::write(&conf, format!("allow = [{}]\n", rules.join(", "))).unwrap();
    let conf_arg = conf.display().to_string();
    let connector = gw.connector(&[], &["-c", &conf_arg]);
    let line = gw
        .dmz
        .wait_for(&["connector routes", "count=2999"], Duration::from_secs(15))
        .unwrap();
    assert!(line.len() < 4096, "{} bytes", line.len());
    let _agent = agent_reaches_backend(&gw, "agent", &[], svc.port());
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        !gw.dmz.log().contains("connector session ended"),
        "{}\n{}",
        gw.dmz.log(),
        connector.log()
    );
}
