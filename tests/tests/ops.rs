//! Operating it: the admin listeners of a real DMZ and connector (`/metrics` checked by
//! Prometheus's own `promtool`, the alert rules and the dashboard in `deploy/`, the admin page
//! and each protection around it, with a test named after the attack it stops, and the page in
//! headless Chromium), and the agent and connector over the OS TLS stack (`--tls native`) with
//! a client certificate through nginx that demands one. Also SOCKS5 UDP (`UDP ASSOCIATE`) with a
//! real client (PySocks from PyPI) to a UDP echo and a DNS server in the trusted site, and its
//! protections, each test named after the attack, checked against the `sallyport_udp_*` metrics.
//!
//! Missing tools are installed (`promtool` from Debian's `prometheus` package) or the test
//! fails: nothing is skipped.

use sallyport_e2e::*;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// `promtool`, installed from Debian's `prometheus` package when missing.
fn promtool() -> &'static str {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let have = Command::new("promtool").arg("--version").output().is_ok();
        if !have {
            let _ = Command::new("apt-get").args(["update", "-qq"]).status();
            let st = Command::new("apt-get")
                .args(["install", "-y", "-qq", "prometheus"])
                .env("DEBIAN_FRONTEND", "noninteractive")
                .status();
            assert!(
                st.is_ok_and(|s| s.success()),
                "promtool is missing and `apt-get install prometheus` failed"
            );
        }
    });
    require_tool("promtool");
    "promtool"
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A DMZ and a connector, each with an admin listener on loopback, and an admin token.
struct Ops {
    pki: Pki,
    dmz: Proc,
    /// Kept running for the test's length.
    connector: Proc,
    gw_url: String,
    dmz_admin: SocketAddr,
    connector_admin: SocketAddr,
    /// A file holding `Authorization: Bearer <admin token>` (curl `-H @file`: no secret in argv).
    auth_header: PathBuf,
    /// The admin token, for the browser (sent through its pipe, not a command line).
    token: String,
}

impl Ops {
    fn start(tag: &str, dmz_extra: &[&str]) -> Ops {
        Ops::start_with(tag, dmz_extra, &[])
    }

    /// [`Ops::start`] with extra connector arguments.
    fn start_with(tag: &str, dmz_extra: &[&str], connector_extra: &[String]) -> Ops {
        let pki = Pki::new(tag).unwrap();
        pki.token(
            "agent",
            "alice-laptop",
            &["--name", "alice", "--groups", "dev"],
        )
        .unwrap();
        pki.token("connector", "site-a", &["--route", "*.internal:*"])
            .unwrap();
        let token = format!("admin-{}", sha256_hex(tag.as_bytes()));
        std::fs::write(pki.p("admin.token"), format!("{token}\n")).unwrap();
        let auth_header = pki.p("auth.header");
        std::fs::write(&auth_header, format!("Authorization: Bearer {token}\n")).unwrap();
        let dmz = Proc::spawn(
            "dmz",
            Command::new(bin("sallyport-gateway"))
                .args([
                    "dmz",
                    "--listen",
                    "127.0.0.1:0",
                    "--instance-id",
                    "dmz-test",
                    "--admin",
                    "127.0.0.1:0",
                    "--admin-token-file",
                ])
                .arg(pki.p("admin.token"))
                .arg("--tls-cert")
                .arg(pki.p("gateway.crt"))
                .arg("--tls-key")
                .arg(pki.p("gateway.key"))
                .arg("--agent-tokens")
                .arg(pki.p("agents.toml"))
                .arg("--connector-tokens")
                .arg(pki.p("connectors.toml"))
                .args(dmz_extra),
        )
        .unwrap();
        let gw = dmz.addr(&["dmz gateway listening"]).unwrap();
        let dmz_admin = dmz.addr(&["admin listening"]).unwrap();
        let gw_url = format!("wss://127.0.0.1:{}/", gw.port());
        let connector = Proc::spawn(
            "connector",
            Command::new(bin("sallyport-gateway"))
                .args(["connector", "--gateway", &gw_url, "--token-file"])
                .arg(pki.p("site-a.token"))
                .args([
                    "--proxy",
                    "direct",
                    "--advertise",
                    "*.internal:*",
                    "--allow",
                    "backend.internal:*",
                    "--allow",
                    "127.0.0.1/32:*",
                    "--host",
                    "backend.internal=127.0.0.1",
                    "--instance-id",
                    "connector-test",
                    "--admin",
                    "127.0.0.1:0",
                    "--admin-token-file",
                ])
                .arg(pki.p("admin.token"))
                .args(connector_extra),
        )
        .unwrap();
        let connector_admin = connector.addr(&["admin listening"]).unwrap();
        dmz.wait_for(&["connector routes"], Duration::from_secs(15))
            .unwrap();
        Ops {
            pki,
            dmz,
            connector,
            gw_url,
            dmz_admin,
            connector_admin,
            auth_header,
            token,
        }
    }

    /// An agent (SOCKS5 on a free port), connected.
    fn agent(&self) -> (Proc, SocketAddr) {
        self.agent_to(&self.gw_url)
    }

    /// [`Ops::agent`] that reaches the DMZ at `gw_url` (a relay in front of it).
    fn agent_to(&self, gw_url: &str) -> (Proc, SocketAddr) {
        let agent = Proc::spawn(
            "agent",
            Command::new(bin("sallyport"))
                .args(["run", "--gateway", gw_url, "--token-file"])
                .arg(self.pki.p("alice-laptop.token"))
                .args([
                    "--socks",
                    "127.0.0.1:0",
                    "--http",
                    "off",
                    "--proxy",
                    "direct",
                ])
                .env("HOME", self.pki.dir.path()),
        )
        .unwrap();
        let socks = agent.addr(&["listening", "socks5"]).unwrap();
        agent
            .wait_for(&["connected to the gateway"], Duration::from_secs(15))
            .unwrap();
        (agent, socks)
    }
}

/// An HTTP exchange with curl: (status, headers, body). `args` go before the URL.
fn http(url: &str, args: &[&str]) -> (u16, String, String) {
    let (code, out, err) = run(Command::new("curl")
        .args(["-sS", "-i", "--noproxy", "*", "--max-time", "20"])
        .args(args)
        .arg(url))
    .unwrap();
    assert_eq!(code, 0, "curl {url}: {err}");
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, head.to_string(), body.to_string())
}

fn metrics(addr: SocketAddr) -> String {
    let (status, head, body) = http(&format!("http://{addr}/metrics"), &[]);
    assert_eq!(status, 200, "{head}\n{body}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    body
}

/// The value of the series `name` (with its labels, exactly as written) in `text`.
fn value(text: &str, series: &str) -> f64 {
    value_of(text, series).unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

/// [`value`], `None` when the series is missing.
fn value_of(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// `promtool check metrics` on `text`: no error, no lint warning.
fn promtool_check(what: &str, text: &str) {
    let mut child = Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics on the {what}'s /metrics: {said}\n{text}"
    );
}

#[test]
fn promtool_accepts_the_metrics_scraped_from_a_running_dmz_and_connector() {
    let ops = Ops::start("ops-metrics", &[]);
    let svc = http_service().unwrap();
    let (agent, socks) = ops.agent();
    // One stream that works, one the allow-list refuses (no connector serves 10.9.9.9).
    let ok = run(Command::new("curl")
        .args(["-sS", "--max-time", "10", "--socks5-hostname"])
        .arg(socks.to_string())
        .arg(format!("http://backend.internal:{}/", svc.port())))
    .unwrap();
    assert!(ok.1.contains("hello from backend.internal"), "{ok:?}");
    let refused = run(Command::new("curl")
        .args(["-sS", "--max-time", "10", "--socks5-hostname"])
        .arg(socks.to_string())
        .arg("http://elsewhere.example:80/"))
    .unwrap();
    assert_ne!(refused.0, 0);
    ops.dmz
        .wait_for(&["stream closed"], Duration::from_secs(10))
        .unwrap();
    // The system is up once the DMZ has one of the connector's two sessions: the scrapes wait
    // until the second is counted on both sides (the values asserted below).
    let dmz = metrics_when(
        ops.dmz_admin,
        &[
            ("sallyport_sessions{role=\"connector\"}", 2.0),
            ("sallyport_handshake_seconds_count", 3.0),
        ],
    );
    promtool_check("DMZ", &dmz);
    assert_eq!(value(&dmz, "sallyport_sessions{role=\"agent\"}"), 1.0);
    assert_eq!(value(&dmz, "sallyport_sessions{role=\"connector\"}"), 2.0);
    assert!(value(&dmz, "sallyport_streams_total") >= 1.0);
    assert!(value(&dmz, "sallyport_stream_bytes_total{direction=\"down\"}") > 0.0);
    assert_eq!(
        value(&dmz, "sallyport_open_refusals_total{code=\"no-route\"}"),
        1.0
    );
    assert!(value(&dmz, "sallyport_handshake_seconds_count") >= 3.0);
    let conn = metrics_when(
        ops.connector_admin,
        &[
            ("sallyport_sessions{role=\"connector\"}", 2.0),
            ("sallyport_egress_path{path=\"direct\"}", 2.0),
        ],
    );
    promtool_check("connector", &conn);
    assert_eq!(value(&conn, "sallyport_sessions{role=\"connector\"}"), 2.0);
    assert_eq!(value(&conn, "sallyport_egress_path{path=\"direct\"}"), 2.0);
    assert!(value(&conn, "sallyport_streams_total") >= 1.0);
    // When the agent leaves, its session gauge goes back down.
    drop(agent);
    let deadline = Instant::now() + Duration::from_secs(10);
    while value(
        &metrics(ops.dmz_admin),
        "sallyport_sessions{role=\"agent\"}",
    ) != 0.0
    {
        assert!(
            Instant::now() < deadline,
            "the agent session stayed counted"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Every metric the dashboard and the alerts use exists, in one role or the other.
    let scraped = format!("{dmz}\n{conn}");
    for f in ["deploy/grafana-dashboard.json", "deploy/alerts.yml"] {
        let text = std::fs::read_to_string(repo().join(f)).unwrap();
        for name in text
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("sallyport_"))
        {
            assert!(
                scraped.contains(&format!("\n{name}{{")) || scraped.contains(&format!("\n{name} ")),
                "{f} uses {name}, which neither role exports"
            );
        }
    }
}

/// A TCP relay whose connections the test cuts at once, as a load balancer's idle cut or a
/// proxy's restart does; while it is held, new ones are closed as they come.
struct Cutter {
    addr: SocketAddr,
    live: std::sync::Arc<std::sync::Mutex<Vec<TcpStream>>>,
    held: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Cutter {
    fn to(target: SocketAddr) -> Cutter {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let live = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let held = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (kept, holding) = (live.clone(), held.clone());
        std::thread::spawn(move || {
            for c in l.incoming() {
                if holding.load(std::sync::atomic::Ordering::SeqCst) {
                    continue;
                }
                let (Ok(c), Ok(up)) = (c, TcpStream::connect(target)) else {
                    continue;
                };
                for (mut from, mut to) in [
                    (c.try_clone().unwrap(), up.try_clone().unwrap()),
                    (up.try_clone().unwrap(), c.try_clone().unwrap()),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
                kept.lock().unwrap().extend([c, up]);
            }
        });
        Cutter { addr, live, held }
    }

    /// Closes new connections as they come (`true`), or relays them again.
    fn hold(&self, on: bool) {
        self.held.store(on, std::sync::atomic::Ordering::SeqCst);
    }

    /// Cuts every connection relayed so far.
    fn cut(&self) {
        for s in self.live.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// Resumable streams shipped while `sallyport_stream_resumes_total` stayed the placeholder it
/// was (always 0): a stream that survived a cut session showed on no dashboard. Now the
/// connector shows the stream suspended while the agent cannot come back, and the DMZ and the
/// connector count the resume once it does.
#[test]
fn a_stream_that_survives_a_cut_session_is_counted_as_resumed_by_the_dmz_and_the_connector() {
    let ops = Ops::start("ops-resume", &[]);
    let echo = echo_service().unwrap();
    let gw: SocketAddr = ops
        .gw_url
        .trim_start_matches("wss://")
        .trim_end_matches('/')
        .parse()
        .unwrap();
    let relay = Cutter::to(gw);
    let (agent, socks) = ops.agent_to(&format!("wss://{}/", relay.addr));
    let mut s = socks5_connect(socks, "backend.internal", echo.port()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let echoed = |s: &mut TcpStream, msg: &[u8]| {
        s.write_all(msg).unwrap();
        let mut got = vec![0u8; msg.len()];
        s.read_exact(&mut got).unwrap();
        assert_eq!(got, msg, "{}", agent.log());
    };
    echoed(&mut s, b"before the cut\n");
    let conn = metrics(ops.connector_admin);
    assert_eq!(value(&conn, "sallyport_stream_resumes_total"), 0.0);
    assert_eq!(value(&conn, "sallyport_streams_suspended"), 0.0);
    relay.hold(true);
    relay.cut();
    metrics_when(ops.connector_admin, &[("sallyport_streams_suspended", 1.0)]);
    relay.hold(false);
    echoed(&mut s, b"after the cut\n");
    let dmz = wait_metric(ops.dmz_admin, "sallyport_stream_resumes_total", 1.0);
    assert_eq!(dmz, 1.0);
    let conn = metrics_when(
        ops.connector_admin,
        &[("sallyport_stream_resumes_total", 1.0)],
    );
    assert_eq!(value(&conn, "sallyport_stream_resumes_total"), 1.0);
    assert_eq!(value(&conn, "sallyport_streams_suspended"), 0.0);
    assert_eq!(value(&conn, "sallyport_stream_resumes_expired_total"), 0.0);
}

#[test]
fn promtool_accepts_the_alert_rules_and_their_unit_test() {
    let dir = repo().join("deploy");
    let (code, out, err) = run(Command::new(promtool())
        .args(["check", "rules"])
        .arg(dir.join("alerts.yml")))
    .unwrap();
    assert_eq!(code, 0, "{out}{err}");
    // The "no connector session for 1 minute" alert fires after a minute, not before.
    let (code, out, err) =
        run(Command::new(promtool())
            .current_dir(&dir)
            .args(["test", "rules", "alerts.test.yml"]))
        .unwrap();
    assert_eq!(code, 0, "{out}{err}");
    let (code, _, err) = run(Command::new("python3")
        .args(["-m", "json.tool"])
        .arg(dir.join("grafana-dashboard.json")))
    .unwrap();
    assert_eq!(code, 0, "the dashboard is not JSON: {err}");
}

/// Labels are a fixed set: a client that presents made-up tokens (whose ids it chose) adds to
/// a counter, never a series, so it can neither grow the scrape nor plant text in it.
#[test]
fn a_failed_logins_token_id_never_becomes_a_metric_label() {
    let ops = Ops::start("ops-labels", &[]);
    let before = metrics(ops.dmz_admin).lines().count();
    let ws = ops.gw_url.replace("wss://", "https://");
    for i in 0..5 {
        let hdr = ops.pki.p(&format!("evil{i}.header"));
        std::fs::write(
            &hdr,
            format!(
                "Authorization: Bearer sp_evil-label-{i}_{}\n",
                "0".repeat(64)
            ),
        )
        .unwrap();
        let (status, _, _) = http(
            &format!("{ws}agent"),
            &[
                "-k",
                "-H",
                &format!("@{}", hdr.display()),
                "-H",
                "Connection: Upgrade",
                "-H",
                "Upgrade: websocket",
                "-H",
                "Sec-WebSocket-Version: 13",
                "-H",
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            ],
        );
        assert_eq!(status, 401);
    }
    let text = metrics(ops.dmz_admin);
    assert!(!text.contains("evil"), "{text}");
    assert_eq!(text.lines().count(), before);
    assert_eq!(
        value(
            &text,
            "sallyport_auth_failures_total{role=\"agent\",reason=\"unknown_token\"}"
        ),
        5.0
    );
}

/// Guessing the admin token: every wrong answer is the same 401 with the login form, and
/// nothing of the sessions, users or routes; the right token (header or login form and its
/// cookie) opens the page.
#[test]
fn wrong_admin_credentials_get_401_and_leak_nothing() {
    let ops = Ops::start("ops-401", &[]);
    let (_agent, _) = ops.agent();
    let page = format!("http://{}/", ops.dmz_admin);
    let wrong = ops.pki.p("wrong.header");
    std::fs::write(&wrong, "Authorization: Bearer admin-not-the-token-at-all\n").unwrap();
    let wrong_form = ops.pki.p("wrong.form");
    std::fs::write(&wrong_form, "admin-not-the-token-at-all").unwrap();
    let forged_cookie = format!("sallyport_admin=99999999999.{}", "ab".repeat(32));
    let attempts: Vec<(u16, String, String)> = vec![
        http(&page, &[]),
        http(&page, &["-H", &format!("@{}", wrong.display())]),
        http(&page, &["-H", "Authorization: Basic YWRtaW46YWRtaW4="]),
        http(&page, &["--cookie", &forged_cookie]),
        http(
            &format!("http://{}/login", ops.dmz_admin),
            &[
                "--data-urlencode",
                &format!("token@{}", wrong_form.display()),
            ],
        ),
    ];
    for (status, head, body) in &attempts {
        assert_eq!(*status, 401, "{head}\n{body}");
        for secret in ["alice", "site-a", "internal", "connector-test", "Sessions"] {
            assert!(!body.contains(secret), "a 401 shows `{secret}`:\n{body}");
        }
        assert!(!head.to_ascii_lowercase().contains("set-cookie"), "{head}");
        assert!(body.contains("name=\"token\""), "{body}");
    }
    // The right token, as a header.
    let (status, head, body) = http(&page, &["-H", &format!("@{}", ops.auth_header.display())]);
    assert_eq!(status, 200, "{head}\n{body}");
    assert!(
        body.contains("alice-laptop") && body.contains("site-a"),
        "{body}"
    );
    assert!(body.contains("*.internal:*"), "{body}");
    assert!(!body.contains("<script"), "{body}");
    assert!(
        head.contains("content-security-policy: default-src 'none'"),
        "{head}"
    );
    // The right token in the login form: a cookie that the browser keeps to itself.
    let form = ops.pki.p("right.form");
    std::fs::write(&form, &ops.token).unwrap();
    let (status, head, _) = http(
        &format!("http://{}/login", ops.dmz_admin),
        &["--data-urlencode", &format!("token@{}", form.display())],
    );
    assert_eq!(status, 303, "{head}");
    let cookie = head
        .lines()
        .find_map(|l| l.strip_prefix("set-cookie: "))
        .unwrap_or_else(|| panic!("no cookie: {head}"));
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    assert!(
        !cookie.contains(&ops.token),
        "the cookie carries the token: {cookie}"
    );
    let value = cookie.split(';').next().unwrap();
    let (status, _, body) = http(&page, &["--cookie", value]);
    assert_eq!(status, 200);
    assert!(body.contains("alice-laptop"));
    // The token never reaches a log.
    assert!(!ops.dmz.log().contains(&ops.token));
    // The connector's page: its sessions to the DMZ, the way out, its allow-list.
    let conn_page = format!("http://{}/", ops.connector_admin);
    assert_eq!(http(&conn_page, &[]).0, 401);
    let (status, _, body) = http(
        &conn_page,
        &["-H", &format!("@{}", ops.auth_header.display())],
    );
    assert_eq!(status, 200);
    for want in [
        "connector connector-test",
        "dmz-test",
        "direct",
        "backend.internal:*",
        "v2",
    ] {
        assert!(
            body.contains(want),
            "the connector's page lacks {want}: {body}"
        );
    }
}

/// DNS rebinding: a web page at evil.example whose name now resolves to 127.0.0.1 makes the
/// admin's browser send `Host: evil.example`: refused, even with valid credentials.
#[test]
fn dns_rebinding_with_a_foreign_host_header_is_refused() {
    let ops = Ops::start("ops-rebind", &[]);
    for path in ["/", "/metrics"] {
        let url = format!("http://{}{path}", ops.dmz_admin);
        let (status, _, body) = http(
            &url,
            &[
                "-H",
                &format!("@{}", ops.auth_header.display()),
                "-H",
                &format!("Host: evil.example:{}", ops.dmz_admin.port()),
            ],
        );
        assert_eq!(status, 403, "{path}: {body}");
        assert!(
            !body.contains("sallyport_") && !body.contains("site-a"),
            "{body}"
        );
        // The names it expects still work.
        let (status, _, _) = http(
            &url,
            &[
                "-H",
                &format!("@{}", ops.auth_header.display()),
                "-H",
                &format!("Host: localhost:{}", ops.dmz_admin.port()),
            ],
        );
        assert_eq!(status, 200, "{path}");
    }
}

/// Cross-site login guessing: a page on another site posts the login form to the admin
/// listener from an admin's browser (the Host is right: it is a plain cross-origin form). The
/// browser names that page's origin: refused before the token is even compared.
#[test]
fn a_login_form_posted_from_another_site_is_refused() {
    let ops = Ops::start("ops-csrf", &[]);
    let form = ops.pki.p("right.form");
    std::fs::write(&form, &ops.token).unwrap();
    let login = format!("http://{}/login", ops.dmz_admin);
    let data = format!("token@{}", form.display());
    let (status, head, _) = http(
        &login,
        &[
            "-H",
            "Origin: https://evil.example",
            "--data-urlencode",
            &data,
        ],
    );
    assert_eq!(status, 403, "{head}");
    assert!(!head.to_ascii_lowercase().contains("set-cookie"), "{head}");
    // From the page itself, it works.
    let own = format!("Origin: http://127.0.0.1:{}", ops.dmz_admin.port());
    let (status, head, _) = http(&login, &["-H", &own, "--data-urlencode", &data]);
    assert_eq!(status, 303, "{head}");
}

/// Someone on another network (here: another loopback address than the one admin network)
/// gets no answer at all: the connection is closed before a byte is read.
#[test]
fn a_peer_outside_the_admin_networks_is_cut_before_a_byte_is_read() {
    let ops = Ops::start("ops-networks", &["--admin-network", "127.0.0.2/32"]);
    let url = format!("http://{}/metrics", ops.dmz_admin);
    let (code, out, _) = run(Command::new("curl")
        .args([
            "-sS",
            "--noproxy",
            "*",
            "--max-time",
            "5",
            "--interface",
            "127.0.0.1",
        ])
        .arg(&url))
    .unwrap();
    assert_ne!(code, 0, "answered from outside the admin networks: {out}");
    assert!(!out.contains("sallyport_"));
    let (code, out, err) = run(Command::new("curl")
        .args([
            "-sS",
            "--noproxy",
            "*",
            "--max-time",
            "5",
            "--interface",
            "127.0.0.2",
        ])
        .arg(&url))
    .unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("sallyport_sessions"), "{out}");
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// A scrape storm (many scrapers at once) and slow scrapers (heads that never end, answers
/// never read) cost bounded memory: connections beyond the limit wait in the kernel, each one
/// ends by its deadline, and the listener answers again afterwards.
#[test]
fn a_scrape_storm_and_slow_scrapers_cost_bounded_memory() {
    let ops = Ops::start("ops-storm", &[]);
    let addr = ops.dmz_admin;
    let pid = ops.dmz.pid();
    let before = rss_kib(pid);
    // 100 slow scrapers: half a head each, then silence.
    let mut slow = Vec::new();
    for _ in 0..100 {
        if let Ok(mut s) = TcpStream::connect(addr) {
            let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ");
            slow.push(s);
        }
    }
    // 16 clients at once, 10 requests each, that send a body far over the limit and never
    // read the answer beyond its first bytes.
    let started = Instant::now();
    let storm: Vec<_> = (0..16)
        .map(|_| {
            std::thread::spawn(move || {
                for _ in 0..10 {
                    if let Ok(mut s) = TcpStream::connect(addr) {
                        let _ = s.set_read_timeout(Some(Duration::from_secs(15)));
                        let _ = s.write_all(
                            b"POST /login HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 10000000\r\n\r\n",
                        );
                        let _ = s.write_all(&[b'a'; 64 * 1024]);
                        let mut buf = [0u8; 16];
                        let _ = s.read(&mut buf);
                    }
                }
            })
        })
        .collect();
    for t in storm {
        t.join().unwrap();
    }
    let peak = rss_kib(pid);
    drop(slow);
    // Once the slow ones are gone (or timed out), scrapes work again at once.
    let m = metrics(addr);
    assert!(m.contains("sallyport_sessions"));
    let grown = peak.saturating_sub(before);
    eprintln!(
        "RSS before {before} KiB, during the storm {peak} KiB (+{grown} KiB); storm took {:?}",
        started.elapsed()
    );
    assert!(grown < 16 * 1024, "the storm grew the DMZ by {grown} KiB");
}

/// Headless Chromium, driven over its DevTools pipe (`--remote-debugging-pipe`: JSON messages
/// ending in NUL on fds 3 and 4, here two FIFOs).
struct Browser {
    _proc: Proc,
    to: std::fs::File,
    from: std::io::BufReader<std::fs::File>,
    next: u64,
    _dir: TempDir,
}

impl Browser {
    fn start() -> Browser {
        require_tool("chromium");
        require_tool("mkfifo");
        let dir = TempDir::new("cdp");
        let (to, from) = (dir.path().join("to"), dir.path().join("from"));
        for f in [&to, &from] {
            assert!(Command::new("mkfifo").arg(f).status().unwrap().success());
        }
        let script = format!(
            "exec timeout 90 chromium --headless=new --no-sandbox --disable-gpu --no-first-run \
             --disable-extensions --disable-dev-shm-usage --user-data-dir={p}/profile \
             --window-size=1100,760 --remote-debugging-pipe 3<{to} 4>{from}",
            p = dir.path().display(),
            to = to.display(),
            from = from.display()
        );
        let proc = Proc::spawn("chromium", Command::new("bash").args(["-c", &script])).unwrap();
        let to = std::fs::OpenOptions::new().write(true).open(&to).unwrap();
        let from = std::io::BufReader::new(std::fs::File::open(&from).unwrap());
        Browser {
            _proc: proc,
            to,
            from,
            next: 1,
            _dir: dir,
        }
    }

    /// Sends one command and returns its answer (events in between are skipped).
    fn call(&mut self, session: Option<&str>, method: &str, params: &str) -> String {
        use std::io::BufRead;
        let id = self.next;
        self.next += 1;
        let session = session
            .map(|s| format!(",\"sessionId\":\"{s}\""))
            .unwrap_or_default();
        let msg = format!("{{\"id\":{id}{session},\"method\":\"{method}\",\"params\":{params}}}\0");
        self.to.write_all(msg.as_bytes()).unwrap();
        let want = format!("{{\"id\":{id},");
        loop {
            let mut buf = Vec::new();
            let n = self.from.read_until(0, &mut buf).unwrap();
            assert!(n > 0, "chromium closed its pipe");
            let text = String::from_utf8_lossy(&buf)
                .trim_end_matches('\0')
                .to_string();
            if text.starts_with(&want) {
                assert!(!text.contains("\"error\":{"), "{method}: {text}");
                return text;
            }
        }
    }

    /// A JavaScript expression's string value in the page.
    fn eval(&mut self, session: &str, expr: &str) -> String {
        let params = format!(
            "{{\"expression\":{},\"returnByValue\":true}}",
            json_string(expr)
        );
        let r = self.call(Some(session), "Runtime.evaluate", &params);
        str_field(&r, "value").unwrap_or_default()
    }
}

fn json_string(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

/// The first string value of `"key":"…"` in a JSON text (escapes kept as written).
fn str_field(json: &str, key: &str) -> Option<String> {
    let start = json.find(&format!("\"{key}\":\""))? + key.len() + 4;
    let rest = &json[start..];
    let mut end = 0;
    let b = rest.as_bytes();
    while end < b.len() && b[end] != b'"' {
        end += if b[end] == b'\\' { 2 } else { 1 };
    }
    Some(rest[..end.min(rest.len())].to_string())
}

/// What an admin sees: Chromium opens the admin page, gets the login form, signs in with the
/// token and sees sessions, users, connectors, routes and refusals; the page runs no script.
/// The screenshot is `docs/admin.png` (with SALLYPORT_SCREENSHOT_DIR set).
#[test]
fn chromium_signs_in_to_the_admin_page_and_sees_the_sessions() {
    let ops = Ops::start("ops-browser", &[]);
    let svc = http_service().unwrap();
    let (_agent, socks) = ops.agent();
    for url in [
        format!("http://backend.internal:{}/", svc.port()),
        "http://wiki.example:80/".to_string(),
    ] {
        let _ = run(Command::new("curl")
            .args(["-sS", "--max-time", "10", "--socks5-hostname"])
            .arg(socks.to_string())
            .arg(url));
    }
    let mut b = Browser::start();
    let target = b.call(None, "Target.createTarget", "{\"url\":\"about:blank\"}");
    let target = str_field(&target, "targetId").unwrap();
    let attached = b.call(
        None,
        "Target.attachToTarget",
        &format!("{{\"targetId\":\"{target}\",\"flatten\":true}}"),
    );
    let s = str_field(&attached, "sessionId").unwrap();
    b.call(
        Some(&s),
        "Page.navigate",
        &format!("{{\"url\":\"http://127.0.0.1:{}/\"}}", ops.dmz_admin.port()),
    );
    let wait_for = |b: &mut Browser, expr: &str, want: &str| -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let got = b.eval(&s, expr);
            if got.contains(want) {
                return got;
            }
            assert!(Instant::now() < deadline, "never saw {want:?}; last: {got}");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    wait_for(
        &mut b,
        "document.readyState + ' ' + document.querySelectorAll('input[name=token]').length",
        "complete 1",
    );
    // Typing the token is the test's doing, not the page's: the page itself has no script.
    b.eval(
        &s,
        &format!(
            "document.querySelector('input[name=token]').value = {}; document.forms[0].submit(); 'sent'",
            json_string(&ops.token)
        ),
    );
    let text = wait_for(
        &mut b,
        "document.body ? document.body.innerText : ''",
        "Recent refusals",
    );
    for want in [
        "alice-laptop",
        "site-a",
        "*.internal:*",
        "wiki.example",
        "no-route",
    ] {
        assert!(text.contains(want), "the page lacks {want}: {text}");
    }
    assert_eq!(b.eval(&s, "String(document.scripts.length)"), "0");
    let shot = b.call(Some(&s), "Page.captureScreenshot", "{\"format\":\"png\"}");
    use base64::Engine;
    let png = base64::engine::general_purpose::STANDARD
        .decode(str_field(&shot, "data").unwrap())
        .unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 5_000,
        "{} bytes",
        png.len()
    );
    if let Ok(dir) = std::env::var("SALLYPORT_SCREENSHOT_DIR") {
        std::fs::write(Path::new(&dir).join("admin.png"), &png).unwrap();
    }
}

// --- Datagrams (SOCKS5 UDP ASSOCIATE) -------------------------------------------------------

/// PySocks from PyPI (pip, into `target/pysocks` once), the real SOCKS5 UDP client the tests use.
fn pysocks() -> PathBuf {
    let dir = repo().join("target").join("pysocks");
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if !dir.join("socks.py").exists() {
            let st = Command::new("python3")
                .args(["-m", "pip", "install", "--quiet", "--target"])
                .arg(&dir)
                .arg("PySocks==1.7.1")
                .current_dir(std::env::temp_dir())
                .status();
            assert!(
                st.is_ok_and(|s| s.success()),
                "PySocks is missing and `python3 -m pip install PySocks` failed"
            );
        }
    });
    assert!(dir.join("socks.py").exists(), "PySocks is not installed");
    dir
}

/// A PySocks client: `echo HOST PORT` sends `ping` and prints `echo DATA SRCHOST SRCPORT`;
/// `dns HOST PORT NAME` asks an A record and prints `dns IP` (the DNS message built and read
/// with the standard library).
const UDP_CLIENT: &str = r#"
import socket, struct, sys
import socks
proxy, mode, host, port = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
s = socks.socksocket(socket.AF_INET, socket.SOCK_DGRAM)
s.set_proxy(socks.SOCKS5, "127.0.0.1", proxy)
s.settimeout(1)
if mode == "echo":
    msg = b"ping"
else:
    name = sys.argv[5]
    q = b"".join(bytes([len(l)]) + l.encode() for l in name.split(".")) + b"\0"
    msg = struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0) + q + struct.pack(">HH", 1, 1)
for attempt in range(10):
    s.sendto(msg, (host, port))
    try:
        data, src = s.recvfrom(65535)
    except socket.timeout:
        continue
    if mode == "echo":
        h = src[0].decode() if isinstance(src[0], bytes) else src[0]
        print("echo", data.decode(), h, src[1])
    else:
        ident, flags, qd, an = struct.unpack(">HHHH", data[:8])
        assert ident == 0x1234 and an == 1, data
        print("dns", socket.inet_ntoa(data[-4:]))
    break
else:
    print("timeout")
"#;

/// A UDP echo on loopback: every datagram goes back; their payloads are kept for the test.
fn udp_echo() -> (u16, std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>) {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = s.local_addr().unwrap().port();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, from)) = s.recv_from(&mut buf) {
            let mut v = seen2.lock().unwrap();
            if v.len() < 1000 {
                v.push(buf[..n].to_vec());
            }
            drop(v);
            let _ = s.send_to(&buf[..n], from);
        }
    });
    (port, seen)
}

/// A tiny DNS server on loopback (the trusted site's): `wiki.internal` A is 10.1.2.3, every
/// other name NXDOMAIN.
fn dns_server() -> u16 {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = s.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 512];
        while let Ok((n, from)) = s.recv_from(&mut buf) {
            let q = &buf[..n];
            if n < 17 {
                continue;
            }
            // The question: labels from byte 12 to the zero byte, then type and class.
            let mut i = 12;
            let mut labels = Vec::new();
            while i < n && q[i] != 0 {
                let l = q[i] as usize;
                labels.push(String::from_utf8_lossy(&q[i + 1..(i + 1 + l).min(n)]).to_string());
                i += 1 + l;
            }
            let end = (i + 5).min(n);
            let known = labels.join(".") == "wiki.internal";
            let mut r = q[..2].to_vec();
            r.extend_from_slice(&[
                0x81,
                if known { 0x80 } else { 0x83 },
                0,
                1,
                0,
                u8::from(known),
                0,
                0,
                0,
                0,
            ]);
            r.extend_from_slice(&q[12..end]);
            if known {
                r.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 10, 1, 2, 3]);
            }
            let _ = s.send_to(&r, from);
        }
    });
    port
}

/// The DMZ, a connector with UDP rules for the echo and DNS services (by name, and their
/// loopback addresses), and an agent.
struct UdpSite {
    ops: Ops,
    agent: Proc,
    socks: SocketAddr,
    echo: u16,
    seen: std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
    dns: u16,
}

fn udp_site(tag: &str) -> UdpSite {
    udp_site_with(tag, &[])
}

/// [`udp_site`] with more arguments for the DMZ.
fn udp_site_with(tag: &str, dmz_extra: &[&str]) -> UdpSite {
    let (echo, seen) = udp_echo();
    let dns = dns_server();
    let mut extra = Vec::new();
    for rule in [
        format!("echo.internal:{echo}"),
        format!("127.0.0.1/32:{echo}"),
        format!("dns.internal:{dns}"),
        format!("127.0.0.1/32:{dns}"),
    ] {
        extra.push("--allow-udp".to_string());
        extra.push(rule);
    }
    for h in ["echo.internal=127.0.0.1", "dns.internal=127.0.0.1"] {
        extra.push("--host".to_string());
        extra.push(h.to_string());
    }
    let ops = Ops::start_with(tag, dmz_extra, &extra);
    let (agent, socks) = ops.agent();
    UdpSite {
        ops,
        agent,
        socks,
        echo,
        seen,
        dns,
    }
}

/// Runs the PySocks client; its one line of output.
fn pysocks_client(socks: SocketAddr, args: &[&str]) -> String {
    let dir = pysocks();
    let script = dir.join("udp_client.py");
    std::fs::write(&script, UDP_CLIENT).unwrap();
    let (code, out, err) = run(Command::new("python3")
        .arg(&script)
        .arg(socks.port().to_string())
        .args(args)
        .env("PYTHONPATH", &dir)
        .current_dir(std::env::temp_dir()))
    .unwrap();
    assert_eq!(code, 0, "{err}");
    out.trim().to_string()
}

/// A raw SOCKS5 `UDP ASSOCIATE` naming no source (0.0.0.0:0, as RFC 1928 allows): the control
/// connection (kept open by the caller) and the relay's address.
fn associate(socks: SocketAddr) -> (TcpStream, SocketAddr) {
    let mut c = TcpStream::connect(socks).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(&[5, 1, 0]).unwrap();
    let mut b = [0u8; 2];
    c.read_exact(&mut b).unwrap();
    assert_eq!(b, [5, 0]);
    c.write_all(&[5, 3, 0, 1, 0, 0, 0, 0, 0, 0]).unwrap();
    let mut r = [0u8; 10];
    c.read_exact(&mut r).unwrap();
    assert_eq!(r[..4], [5, 0, 0, 1], "UDP ASSOCIATE refused: {r:?}");
    let relay = SocketAddr::from(([r[4], r[5], r[6], r[7]], u16::from_be_bytes([r[8], r[9]])));
    (c, relay)
}

/// The SOCKS5 UDP header for `echo.internal:port` (a name: resolved by the connector), then
/// `data`.
fn to_echo(port: u16, data: &[u8]) -> Vec<u8> {
    let name = b"echo.internal";
    let mut v = vec![0, 0, 0, 3, name.len() as u8];
    v.extend_from_slice(name);
    v.extend_from_slice(&port.to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// Polls `/metrics` at `addr` until `series` is at least `min`; its value.
fn wait_metric(addr: SocketAddr, series: &str, min: f64) -> f64 {
    value(&metrics_when(addr, &[(series, min)]), series)
}

/// `/metrics` at `addr` once every series in `want` is at least its value, polled for up to
/// 10 s (the process counts on its own time); the last scrape, whatever it says.
fn metrics_when(addr: SocketAddr, want: &[(&str, f64)]) -> String {
    eventually(
        Duration::from_secs(10),
        || metrics(addr),
        |m| {
            want.iter()
                .all(|(series, min)| value_of(m, series).is_some_and(|v| v >= *min))
        },
    )
}

#[test]
fn pysocks_reaches_a_udp_echo_and_resolves_a_name_with_a_dns_server_in_the_trusted_site() {
    let site = udp_site("udp-pysocks");
    let echo = site.echo.to_string();
    let out = pysocks_client(site.socks, &["echo", "echo.internal", &echo]);
    // The reply names its source as the app wrote the destination.
    assert_eq!(
        out,
        format!("echo ping echo.internal {echo}"),
        "{}",
        site.agent.log()
    );
    let dns = site.dns.to_string();
    let out = pysocks_client(site.socks, &["dns", "dns.internal", &dns, "wiki.internal"]);
    assert_eq!(out, "dns 10.1.2.3");
    let conn = &site.ops.connector;
    conn.wait_for(&["udp-open", "name=alice"], Duration::from_secs(10))
        .unwrap();
    conn.wait_for(&["udp-dest", "dns.internal"], Duration::from_secs(10))
        .unwrap();
    // The connector counts a datagram on its own time: polled.
    let down = wait_metric(
        site.ops.connector_admin,
        "sallyport_udp_datagrams_total{direction=\"down\"}",
        2.0,
    );
    assert!(down >= 2.0, "{down}");
}

#[test]
fn a_datagram_from_another_local_users_socket_is_dropped_by_the_agent() {
    require_tool("setpriv");
    require_tool("perl");
    let site = udp_site("udp-other-user");
    // Alice's app opens an association naming no source address, so any port of 127.0.0.1
    // could be the client until its first datagram.
    let (_control, relay) = associate(site.socks);
    // Another user's process sends first, to the same relay port, from 127.0.0.1.
    let attack = to_echo(site.echo, b"attack");
    let hex: String = attack.iter().map(|b| format!("{b:02x}")).collect();
    // Its socket stays open (the agent looks its owner up), until the test ends it.
    let mut attacker = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "perl", "-MIO::Socket::INET", "-e"])
        .arg(format!(
            r#"$s=IO::Socket::INET->new(Proto=>"udp",PeerAddr=>"127.0.0.1:{}") or die "socket: $!"; $s->send(pack("H*","{hex}")) or die "send: $!"; sleep 20;"#,
            relay.port()
        ))
        .spawn()
        .unwrap();
    let seen_log = site.agent.wait_for(
        &["dropping datagrams from another user's socket", "uid 65534"],
        Duration::from_secs(10),
    );
    let _ = attacker.kill();
    let _ = attacker.wait();
    seen_log.unwrap();
    // Alice's own datagrams still go through, and the attacker's never reached the service.
    let mine = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    mine.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut buf = [0u8; 256];
    let mut got = None;
    for _ in 0..10 {
        mine.send_to(&to_echo(site.echo, b"mine"), relay).unwrap();
        if let Ok((n, _)) = mine.recv_from(&mut buf) {
            got = Some(buf[..n].to_vec());
            break;
        }
    }
    assert_eq!(got.as_deref(), Some(&to_echo(site.echo, b"mine")[..]));
    let seen = site.seen.lock().unwrap();
    assert!(
        !seen.iter().any(|d| d == b"attack"),
        "the other user's datagram was relayed"
    );
}

#[test]
fn a_udp_port_outside_the_users_udp_rules_is_dropped_and_counted() {
    let site = udp_site("udp-not-allowed");
    let (other, seen_other) = udp_echo();
    let (_control, relay) = associate(site.socks);
    let app = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for _ in 0..3 {
        app.send_to(&to_echo(other, b"sneak"), relay).unwrap();
    }
    let dropped = wait_metric(
        site.ops.connector_admin,
        "sallyport_udp_dropped_total{reason=\"not_allowed\"}",
        3.0,
    );
    assert!(
        dropped >= 3.0,
        "dropped {dropped}\n{}",
        site.ops.connector.log()
    );
    site.ops
        .connector
        .wait_for(&["udp-refused", "not in"], Duration::from_secs(10))
        .unwrap();
    assert!(
        seen_other.lock().unwrap().is_empty(),
        "a datagram reached a port without a rule"
    );
}

#[test]
fn a_udp_flood_past_the_limits_is_dropped_and_counted_and_memory_stays_bounded() {
    let site = udp_site("udp-flood");
    let (_control, relay) = associate(site.socks);
    let app = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    // One datagram through first (the connector leg exists, the addresses are fixed).
    app.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut buf = vec![0u8; 2048];
    for _ in 0..10 {
        app.send_to(&to_echo(site.echo, b"warm"), relay).unwrap();
        if app.recv_from(&mut buf).is_ok() {
            break;
        }
    }
    let pids = [
        ("agent", site.agent.pid()),
        ("dmz", site.ops.dmz.pid()),
        ("connector", site.ops.connector.pid()),
    ];
    let before: Vec<u64> = pids.iter().map(|(_, p)| rss_kib(*p)).collect();
    let datagram = to_echo(site.echo, &[7u8; 1000]);
    let started = Instant::now();
    let mut sent = 0u64;
    while started.elapsed() < Duration::from_secs(2) {
        if app.send_to(&datagram, relay).is_ok() {
            sent += 1;
        }
    }
    let rate = wait_metric(
        site.ops.dmz_admin,
        "sallyport_udp_dropped_total{reason=\"rate\"}",
        1000.0,
    );
    let after: Vec<u64> = pids.iter().map(|(_, p)| rss_kib(*p)).collect();
    let m = metrics(site.ops.dmz_admin);
    let up = value(&m, "sallyport_udp_datagrams_total{direction=\"up\"}");
    eprintln!(
        "flood: {sent} datagrams sent in 2 s; the DMZ carried {up} up and dropped {rate} over the rate; RSS KiB before {before:?}, after {after:?} (agent, dmz, connector)"
    );
    assert!(rate >= 1000.0, "no datagram dropped over the rate limit");
    // The DMZ forwards at most its per-token rate (2,000/s, burst 4,000) over 2 s and a bit.
    assert!(up <= 12_000.0, "{up} datagrams carried up");
    for (i, (name, _)) in pids.iter().enumerate() {
        assert!(
            after[i] < before[i] + 24 * 1024,
            "{name} grew from {} to {} KiB",
            before[i],
            after[i]
        );
    }
}

/// Every limit per credential has a global one: many tokens (here one, under its own limit of
/// 32) cannot hold more associations than the gateway allows (`[limits] udp_associations`).
#[test]
fn associations_past_the_gateways_global_limit_are_refused_and_counted() {
    let dir = std::env::temp_dir().join(format!("sp-udp-global-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("dmz.toml");
    std::fs::write(&config, "[limits]\nudp_associations = 1\n").unwrap();
    let site = udp_site_with("udp-global", &["--config", config.to_str().unwrap()]);
    let echoes = |relay: SocketAddr| -> bool {
        let app = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        app.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut buf = [0u8; 64];
        (0..10).any(|_| {
            app.send_to(&to_echo(site.echo, b"ping"), relay).unwrap();
            app.recv_from(&mut buf).is_ok()
        })
    };
    let (_first, relay1) = associate(site.socks);
    assert!(echoes(relay1), "the first association does not echo");
    let (_second, relay2) = associate(site.socks);
    assert!(
        !echoes(relay2),
        "a second association got past the global limit of 1"
    );
    wait_metric(
        site.ops.dmz_admin,
        "sallyport_udp_dropped_total{reason=\"associations\"}",
        1.0,
    );
    site.ops
        .dmz
        .wait_for(&["the gateway's limit is reached"], Duration::from_secs(10))
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_lost_gateway_session_ends_the_association_and_closes_its_control_connection() {
    let mut site = udp_site("udp-session-lost");
    let (mut control, relay) = associate(site.socks);
    let app = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    app.send_to(&to_echo(site.echo, b"hello"), relay).unwrap();
    site.ops.dmz.kill();
    // The app learns at once that its association is gone (RFC 1928: the control connection
    // ends with it), instead of sending into a relay that leads nowhere.
    let mut b = [0u8; 1];
    let n = control.read(&mut b).unwrap_or(0);
    assert_eq!(n, 0, "the control connection stayed open");
    site.agent
        .wait_for(
            &["udp association ended", "ended by the gateway"],
            Duration::from_secs(10),
        )
        .unwrap();
}
