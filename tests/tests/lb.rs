//! The gateway behind real load balancers: nginx and HAProxy terminate TLS on loopback and pass
//! the WebSocket upgrade to `sallyport-gateway dmz --plain --prefix /sallyport`, configured as
//! docs/deploy.md shows (the harness renders both; see `sallyport_e2e::lb`).
//!
//! Every scenario runs against both load balancers:
//!
//! 1. the whole path: agent and connector reach the plain gateway only through the load
//!    balancer, and curl through the agent reaches an internal service by its internal name;
//! 2. idle connections: with the tunnel ping shorter than the load balancer's idle timeout an
//!    interactive connection survives twice that timeout of silence; with the ping longer, the
//!    load balancer cuts the session, the agent reconnects, and the idle connection is resumed
//!    on the new session (the same socket keeps echoing);
//! 3. the client's address: the gateway logs the address the load balancer saw, believes
//!    `X-Forwarded-For`/`Forwarded` only from `--trusted-proxy` peers, and takes the right-most
//!    untrusted address, so a forged header cannot pick the logged address;
//! 4. several DMZ instances keep each HTTP-transport session on one;
//! 5. which sessions a balancer may read (nginx): only one the admin trusts (`[v2] trust_lb`,
//!    its key listed) that hands the gateway plain HTTP; a gateway that terminates TLS itself,
//!    even TLS 1.2 (no exporter value), keeps every session sealed.

use sallyport_e2e::lb::*;
use sallyport_e2e::*;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn curl() -> Command {
    require_tool("curl");
    let mut c = Command::new("curl");
    c.args(["-sS", "--max-time", "20"]);
    c
}

fn backend_system(
    tag: &str,
    kind: LbKind,
    setup: impl FnOnce(&mut LbSetup<'_>),
) -> (u16, LbSystem) {
    let svc = http_service().unwrap();
    let allow = allow_backend(svc.port());
    let mut s = LbSetup {
        kind,
        idle_timeout: Duration::from_secs(60),
        lb_source: None,
        allow: &allow,
        hosts: &["backend.internal=127.0.0.1"],
        connector_ping: None,
        trust_lb: false,
        dmz_tls: None,
    };
    setup(&mut s);
    (svc.port(), LbSystem::start(tag, &s).unwrap())
}

/// Everything a failing assertion should show.
fn logs(sys: &LbSystem, agents: &[&LbAgent]) -> String {
    let mut out = format!(
        "--- {} config\n{}\n--- {} log\n{}\n--- {} access log\n{}\n--- dmz\n{}\n--- connector\n{}",
        sys.lb.name(),
        sys.lb.config_text(),
        sys.lb.name(),
        sys.lb.log(),
        sys.lb.name(),
        sys.lb.access_log(),
        sys.dmz.log(),
        sys.connector.log()
    );
    for a in agents {
        out.push_str(&format!("\n--- {}\n{}", a.proc.name, a.proc.log()));
    }
    out
}

// ---------------------------------------------------------------------------------------------
// 1. The whole path

fn whole_path(kind: LbKind) {
    let (port, sys) = backend_system("lb-path", kind, |_| {});
    let agent = sys.agent("agent", None, &[]).unwrap();
    let lb = sys.lb.addr();
    // The gateway speaks no TLS (`--plain`): the `wss://` sessions of the agent and the
    // connector can only have come through the load balancer.
    assert!(sys.gw_url.contains(&format!(":{}/sallyport/", lb.port())));
    let (code, out, err) = curl_backend(agent.socks, port);
    assert_eq!(
        (code, out.as_str()),
        (0, BACKEND_HELLO),
        "{err}\n{}",
        logs(&sys, &[&agent])
    );
    sys.dmz
        .wait_for(
            &["stream open", "alice-laptop", "backend.internal"],
            Duration::from_secs(10),
        )
        .unwrap();
    // The health check endpoint through the load balancer, as monitoring would use it...
    let ca = sys.pki.p("ca.crt");
    let (code, out, err) = run(curl()
        .arg("--cacert")
        .arg(&ca)
        .arg(format!("https://127.0.0.1:{}/sallyport/healthz", lb.port())))
    .unwrap();
    assert_eq!(code, 0, "{err}\n{}", logs(&sys, &[&agent]));
    assert!(out.starts_with("ok\ninstance dmz-test\n"), "{out}");
    // ...and anything outside the prefix is answered by the load balancer itself.
    let (code, out, err) = run(curl()
        .args(["-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
        .arg(&ca)
        .arg(format!("https://127.0.0.1:{}/elsewhere", lb.port())))
    .unwrap();
    assert_eq!((code, out.as_str()), (0, "404"), "{err}");
    // The load balancer logged that request.
    wait_until(&sys, &[&agent], || {
        sys.lb.access_log().contains("GET /sallyport/healthz")
    });
    // HAProxy's own health check (`http-check` on /sallyport/readyz, 503 while the instance drains) passes against the
    // gateway. (nginx's open-source edition has no active health checks.)
    if kind == LbKind::Haproxy {
        wait_until(&sys, &[&agent], || {
            sys.lb.log().contains("be_sallyport/dmz1 succeeded")
                && sys.lb.log().contains("Layer7 check passed, code: 200")
        });
    }
}

/// Polls `done` for up to 10 s; fails with every log.
fn wait_until(sys: &LbSystem, agents: &[&LbAgent], done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "{}", logs(sys, agents));
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn nginx_carries_the_whole_path() {
    whole_path(LbKind::Nginx);
}

#[test]
fn haproxy_carries_the_whole_path() {
    whole_path(LbKind::Haproxy);
}

// ---------------------------------------------------------------------------------------------
// 2. Idle connections and the tunnel ping

const LB_IDLE: Duration = Duration::from_secs(3);

/// Sends one line and expects it back (from the echo service behind the tunnel).
fn echo(s: &mut TcpStream, line: &str) -> std::io::Result<()> {
    s.write_all(line.as_bytes())?;
    let mut buf = vec![0u8; line.len()];
    s.read_exact(&mut buf)?;
    if buf != line.as_bytes() {
        return Err(std::io::Error::other(format!(
            "echo mismatch: {:?}",
            String::from_utf8_lossy(&buf)
        )));
    }
    Ok(())
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

fn count(p: &Proc, needle: &str) -> usize {
    p.log().lines().filter(|l| l.contains(needle)).count()
}

fn idle_sessions(kind: LbKind) {
    let echo_svc = echo_service().unwrap();
    let port = echo_svc.port();
    let allow = allow_backend(port);
    // The connector pings fast in both halves: only the agents differ.
    let sys = LbSystem::start(
        "lb-idle",
        &LbSetup {
            kind,
            idle_timeout: LB_IDLE,
            lb_source: None,
            allow: &allow,
            hosts: &["backend.internal=127.0.0.1"],
            connector_ping: Some(Duration::from_secs(1)),
            trust_lb: false,
            dmz_tls: None,
        },
    )
    .unwrap();
    let forward = [format!("127.0.0.1:0=backend.internal:{port}")];
    // `pinging`: [tunnel] ping_interval = "1s", under the load balancer's 3 s.
    // `silent`: the default ping (20 s), longer than the load balancer's idle timeout.
    let pinging = sys
        .agent("agent-pinging", Some(Duration::from_secs(1)), &forward)
        .unwrap();
    let silent = sys.agent("agent-silent", None, &forward).unwrap();
    let all = [&pinging, &silent];
    let mut kept = connect(pinging.forwards[0]);
    let mut cut = connect(silent.forwards[0]);
    echo(&mut kept, "before the pause\n").unwrap_or_else(|e| panic!("{e}\n{}", logs(&sys, &all)));
    echo(&mut cut, "before the pause\n").unwrap_or_else(|e| panic!("{e}\n{}", logs(&sys, &all)));
    let quiet_since = Instant::now();

    // The silent agent's session: nothing crosses the load balancer (the gateway's own ping is
    // 20 s too), so after its idle timeout the load balancer closes it. The agent notices and
    // reconnects.
    silent
        .proc
        .wait_for(&["gateway session lost; reconnecting"], LB_IDLE * 3)
        .unwrap_or_else(|e| panic!("{e}\n{}", logs(&sys, &all)));
    let cut_after = quiet_since.elapsed();
    assert!(
        cut_after >= LB_IDLE - Duration::from_millis(500),
        "the session ended after {cut_after:?}, before the load balancer's idle timeout"
    );
    // It was the load balancer that cut it, for idleness.
    wait_until(&sys, &all, || {
        let log = sys.lb.log();
        match kind {
            // nginx: the upstream read timer (proxy_read_timeout) of the upgraded connection.
            LbKind::Nginx => log.lines().any(|l| {
                l.contains("upstream timed out") && l.contains("while proxying upgraded connection")
            }),
            // HAProxy: the session log's termination state `cD` (client-side timeout in the
            // data phase, which is `timeout tunnel` once upgraded) on a 101.
            LbKind::Haproxy => log.lines().any(|l| {
                l.contains("\"GET /sallyport/agent HTTP/1.1\"")
                    && l.contains(" 101 ")
                    && (l.contains(" cD--") || l.contains(" sD--"))
            }),
        }
    });
    // The connection that was open on it outlives it: the agent resumes it on its next session
    // (it used to die with the session: docs/protocol.md, "Streams that survive").
    echo(&mut cut, "after the cut\n").unwrap_or_else(|e| {
        panic!(
            "the idle connection did not survive the cut: {e}\n{}",
            logs(&sys, &all)
        )
    });
    // After the reconnect, new connections work again.
    let deadline = Instant::now() + Duration::from_secs(10);
    while count(&silent.proc, "connected to the gateway") < 2 {
        assert!(Instant::now() < deadline, "{}", logs(&sys, &all));
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut fresh = connect(silent.forwards[0]);
    echo(&mut fresh, "a new connection\n").unwrap_or_else(|e| panic!("{e}\n{}", logs(&sys, &all)));

    // The pinging agent: twice the idle timeout of silence on the same connection, and it
    // still carries the conversation, on the session it started with.
    let pause = LB_IDLE * 2;
    if let Some(left) = pause.checked_sub(quiet_since.elapsed()) {
        std::thread::sleep(left);
    }
    echo(&mut kept, "after the pause\n").unwrap_or_else(|e| {
        panic!(
            "{e} after {:?} of silence\n{}",
            quiet_since.elapsed(),
            logs(&sys, &all)
        )
    });
    assert_eq!(
        count(&pinging.proc, "gateway session lost"),
        0,
        "{}",
        logs(&sys, &all)
    );
    assert_eq!(count(&pinging.proc, "connected to the gateway"), 1);
}

#[test]
fn nginx_keeps_an_idle_session_that_pings_and_the_cut_one_resumes_its_connection() {
    idle_sessions(LbKind::Nginx);
}

#[test]
fn haproxy_keeps_an_idle_session_that_pings_and_the_cut_one_resumes_its_connection() {
    idle_sessions(LbKind::Haproxy);
}

// ---------------------------------------------------------------------------------------------
// 3. The client's address

/// The load balancer's address towards the gateway: apart from the clients on 127.0.0.1 and
/// 127.0.0.2, so the gateway's log shows which one it believed.
const LB_SOURCE: &str = "127.0.0.3";
const UNTRUSTED_CLIENT: &str = "127.0.0.2";
const FORGED: &str = "203.0.113.7";

/// The `key=` address in a log line; the value ends at a space, `}` (a span) or `,`.
fn logged_addr(line: &str, key: &str) -> SocketAddr {
    let pat = format!("{key}=");
    let start = line
        .find(&pat)
        .unwrap_or_else(|| panic!("no {pat} in `{line}`"))
        + pat.len();
    let v: String = line[start..]
        .chars()
        .take_while(|c| !matches!(c, ' ' | '}' | ','))
        .collect();
    v.trim_matches('"')
        .parse()
        .unwrap_or_else(|e| panic!("{key}={v} in `{line}`: {e}"))
}

/// A WebSocket upgrade from `from` (curl `--interface`) carrying `header`, with a well-formed
/// token whose id the gateway does not know: it answers 401 and logs `refused token client=…`
/// with that id, so each probe finds its own log line. Returns the HTTP status.
fn probe(url: &str, from: &str, id: &str, header: &str, ca: &Path) -> String {
    let mut c = curl();
    c.args(["--http1.1", "-o", "/dev/null", "-w", "%{http_code}"])
        .args(["--interface", from, "--cacert"])
        .arg(ca)
        .args(["-H", "Upgrade: websocket", "-H", "Connection: Upgrade"])
        .args(["-H", "Sec-WebSocket-Version: 13"])
        .args(["-H", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=="])
        .arg("-H")
        .arg(format!("Authorization: Bearer sp_{id}_{}", "0".repeat(64)));
    c.arg("-H").arg(header);
    let (code, out, err) = run(c.arg(url)).unwrap();
    assert_eq!(code, 0, "curl {url}: {err}");
    out
}

fn refused_client(sys: &LbSystem, id: &str) -> SocketAddr {
    let line = sys
        .dmz
        .wait_for(&["refused token", id], Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}\n{}", logs(sys, &[])));
    logged_addr(&line, "client")
}

fn client_address(kind: LbKind) {
    let lb_source: IpAddr = LB_SOURCE.parse().unwrap();
    let (port, sys) = backend_system("lb-client", kind, |s| s.lb_source = Some(lb_source));
    let agent = sys.agent("agent", None, &[]).unwrap();
    let ca = sys.pki.p("ca.crt");

    // The agent's session: the TCP peer is the load balancer (127.0.0.3, trusted), the client
    // is the address the load balancer saw (127.0.0.1, from X-Forwarded-For; port 0 marks an
    // address that came from a header).
    let up = sys
        .dmz
        .wait_for(
            &["agent session up", "alice-laptop"],
            Duration::from_secs(10),
        )
        .unwrap();
    assert_eq!(logged_addr(&up, "peer").ip(), lb_source, "{up}");
    assert_eq!(
        logged_addr(&up, "client"),
        "127.0.0.1:0".parse().unwrap(),
        "{up}"
    );
    // The audit lines carry it too, in the DMZ and (stamped by the DMZ) in the connector.
    let (code, _, err) = run(curl()
        .arg("--socks5-hostname")
        .arg(agent.socks.to_string())
        .arg(format!("http://backend.internal:{port}/")))
    .unwrap();
    assert_eq!(code, 0, "{err}\n{}", logs(&sys, &[&agent]));
    for p in [&sys.dmz, &sys.connector] {
        let open = p
            .wait_for(
                &["stream open", "backend.internal"],
                Duration::from_secs(10),
            )
            .unwrap();
        assert_eq!(
            field(&open, "client").as_deref(),
            Some("127.0.0.1"),
            "{open}"
        );
    }

    // Through the load balancer, a client on 127.0.0.2 forges X-Forwarded-For. The load
    // balancer appends the address it saw, and the gateway takes the right-most address that
    // is not a trusted proxy: the real one.
    let via_lb = format!("https://127.0.0.1:{}/sallyport/agent", sys.lb.addr().port());
    let xff = format!("X-Forwarded-For: {FORGED}");
    assert_eq!(
        probe(&via_lb, UNTRUSTED_CLIENT, "probe-via-lb", &xff, &ca),
        "401"
    );
    let seen = refused_client(&sys, "probe-via-lb");
    assert_eq!(
        seen.ip().to_string(),
        UNTRUSTED_CLIENT,
        "{}",
        logs(&sys, &[])
    );

    // Straight to the plain port from an untrusted address, the header is a claim, not a
    // fact: the gateway logs the TCP peer (with its real port).
    let direct = format!("http://{}/sallyport/agent", sys.dmz_addr);
    for (id, header) in [
        ("probe-direct-xff", xff.clone()),
        ("probe-direct-fwd", format!("Forwarded: for={FORGED}")),
    ] {
        assert_eq!(probe(&direct, UNTRUSTED_CLIENT, id, &header, &ca), "401");
        let seen = refused_client(&sys, id);
        assert_eq!(seen.ip().to_string(), UNTRUSTED_CLIENT, "{id}");
        assert_ne!(seen.port(), 0, "{id}: a header was believed");
    }

    // The header the load balancer sets (X-Forwarded-For, the default `forwarded_header`) is
    // believed from the trusted address: that is the rule, not a gateway that ignores headers.
    assert_eq!(
        probe(&direct, LB_SOURCE, "probe-trusted-xff", &xff, &ca),
        "401"
    );
    assert_eq!(
        refused_client(&sys, "probe-trusted-xff"),
        format!("{FORGED}:0").parse().unwrap()
    );
    // The other header is not, even from the trusted address: nginx passes a client's own
    // `Forwarded` on untouched, and believing it let the client choose its logged address.
    let fwd = "Forwarded: for=\"[2001:db8::7]:4711\";proto=https";
    assert_eq!(
        probe(&direct, LB_SOURCE, "probe-trusted-fwd", fwd, &ca),
        "401"
    );
    let seen = refused_client(&sys, "probe-trusted-fwd");
    assert_eq!(
        seen.ip().to_string(),
        LB_SOURCE,
        "a Forwarded header was believed"
    );
    assert_ne!(seen.port(), 0);
}

#[test]
fn nginx_passes_the_client_address_and_forged_headers_lose() {
    client_address(LbKind::Nginx);
}

#[test]
fn haproxy_passes_the_client_address_and_forged_headers_lose() {
    client_address(LbKind::Haproxy);
}

// ---------------------------------------------------------------------------------------------
// The documentation shows the tested configurations

/// docs/deploy.md shows the site part of both configurations exactly as the harness renders
/// it with example addresses, and HAProxy's for several instances with their own paths; when
/// they differ, this fails and prints what the harness renders.
#[test]
fn the_documented_configs_are_the_ones_tested() {
    let docs =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/deploy.md"))
            .unwrap();
    let crt = Path::new("/etc/nginx/tls/gw.example.com.crt");
    let key = Path::new("/etc/nginx/tls/gw.example.com.key");
    let cfg = LbConfig {
        listen: "0.0.0.0:443".parse().unwrap(),
        idle_timeout: Duration::from_secs(300),
        ..LbConfig::new("10.0.1.10:8080".parse().unwrap(), crt, key)
    };
    let nginx = Nginx::site_config(&cfg);
    let pem = Path::new("/etc/haproxy/gw.example.com.pem");
    let haproxy = Haproxy::site_config(&cfg, pem);
    // Several instances, each with its own path for connectors (tests/tests/topology.rs,
    // `two_sites_reach_through_either_instance_behind_haproxy_…`).
    let several = Haproxy::site_config(
        &LbConfig {
            more_upstreams: vec!["10.0.1.11:8080".parse().unwrap()],
            instances: vec!["dmz-1", "dmz-2"],
            ..cfg.clone()
        },
        pem,
    );
    let missing: Vec<String> = [("nginx", nginx), ("haproxy", haproxy), ("haproxy", several)]
        .into_iter()
        .filter(|(name, text)| !docs.contains(&format!("```{name}\n{text}```")))
        .map(|(name, text)| format!("```{name}\n{text}```"))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/deploy.md no longer shows the tested configurations; they are:\n\n{}",
        missing.join("\n\n")
    );
}

// ---------------------------------------------------------------------------------------------
// 4. Several DMZ instances: HTTP-transport sessions stay on one

/// Two gateway instances behind one load balancer, configured as docs/deploy.md shows for
/// several instances (a hash on the `sallyport-affinity` header every HTTP-transport request
/// carries). Agents on the HTTP transport land on either instance, and every request of a
/// session reaches the instance that holds it: a stray request would be answered 404 and
/// end the session.
fn several_instances(kind: LbKind) {
    let svc = http_service().unwrap();
    let pki = Pki::new("lb-multi").unwrap();
    pki.token("agent", "alice-laptop", &["--name", "alice"])
        .unwrap();
    pki.token("connector", "site-a", &["--route", "*.internal:*"])
        .unwrap();
    // One after the other: the first creates the shared inner key beside the token file.
    let dmz = |id: &str| {
        let p = Proc::spawn(
            id,
            Command::new(bin("sallyport-gateway"))
                .args([
                    "dmz",
                    "--plain",
                    "--listen",
                    "127.0.0.1:0",
                    "--prefix",
                    PREFIX,
                ])
                .args(["--trusted-proxy", "127.0.0.1/32", "--instance-id", id])
                .arg("--agent-tokens")
                .arg(pki.p("agents.toml"))
                .arg("--connector-tokens")
                .arg(pki.p("connectors.toml")),
        )
        .unwrap();
        let addr = p.addr(&["dmz gateway listening"]).unwrap();
        (p, addr)
    };
    let (dmz_a, a) = dmz("dmz-a");
    let (dmz_b, b) = dmz("dmz-b");
    // One connector per instance, each dialling its instance directly.
    let connectors: Vec<Proc> = [a, b]
        .iter()
        .enumerate()
        .map(|(i, addr)| {
            let mut cmd = Command::new(bin("sallyport-gateway"));
            cmd.args(["connector", "--gateway", &format!("ws://{addr}{PREFIX}/")])
                .arg("--token-file")
                .arg(pki.p("site-a.token"))
                .args(["--advertise", "*.internal:*", "--proxy", "direct"])
                .args(["--host", "backend.internal=127.0.0.1"])
                .args(["--instance-id", &format!("connector-{i}")]);
            for r in allow_backend(svc.port()) {
                cmd.args(["--allow", &r]);
            }
            Proc::spawn(&format!("connector-{i}"), &mut cmd).unwrap()
        })
        .collect();
    for d in [&dmz_a, &dmz_b] {
        d.wait_for(&["connector routes"], Duration::from_secs(15))
            .unwrap();
    }
    let (cert, key) = (pki.p("gateway.crt"), pki.p("gateway.key"));
    let lb = kind
        .start(&LbConfig {
            more_upstreams: vec![b],
            ..LbConfig::new(a, &cert, &key)
        })
        .unwrap();
    let url = format!("wss://127.0.0.1:{}{PREFIX}/", lb.addr().port());
    let (code, inner, err) = run(Command::new(bin("sallyport-gateway"))
        .args(["inner-key", "--agent-tokens"])
        .arg(pki.p("agents.toml")))
    .unwrap();
    assert_eq!(code, 0, "{err}");
    let agents: Vec<(Proc, SocketAddr)> = (0..6)
        .map(|i| {
            let mut cmd = Command::new(bin("sallyport"));
            cmd.args(["run", "--gateway", &url, "--transport", "http"])
                .args(["--socks", "127.0.0.1:0", "--http", "off", "--token-file"])
                .arg(pki.p("alice-laptop.token"))
                .arg("--ca")
                .arg(pki.p("ca.crt"))
                .env("HOME", pki.dir.path());
            if i % 2 == 1 {
                cmd.args(["--gateway-inner-key", inner.trim()]);
            }
            let p = Proc::spawn(&format!("agent-{i}"), &mut cmd).unwrap();
            let socks = p.addr(&["listening", "socks5"]).unwrap();
            p.wait_for(&["connected to the gateway"], Duration::from_secs(15))
                .unwrap();
            (p, socks)
        })
        .collect();
    for round in 0..2 {
        for (p, socks) in &agents {
            let (code, out, err) = curl_backend(*socks, svc.port());
            assert_eq!(
                (code, out.as_str()),
                (0, BACKEND_HELLO),
                "{} round {round}: {err}\n{}\n--- {}\n{}\n--- dmz-a\n{}\n--- dmz-b\n{}",
                p.name,
                p.log(),
                lb.name(),
                lb.config_text(),
                dmz_a.log(),
                dmz_b.log()
            );
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    for (p, _) in &agents {
        assert!(!p.log().contains("session lost"), "{}", p.log());
    }
    let count = |d: &Proc| d.log().matches("agent session up").count();
    // Each instance logs a session before it serves it, but the test reads the logs through
    // threads of its own: polled.
    eventually(
        Duration::from_secs(10),
        || count(&dmz_a) + count(&dmz_b),
        |n| *n == agents.len(),
    );
    eprintln!(
        "{}: HTTP-transport sessions on dmz-a {}, dmz-b {}",
        lb.name(),
        count(&dmz_a),
        count(&dmz_b)
    );
    assert_eq!(count(&dmz_a) + count(&dmz_b), agents.len());
    drop(agents);
    drop(connectors);
}

#[test]
fn nginx_keeps_each_http_session_on_one_of_several_instances() {
    several_instances(LbKind::Nginx);
}

#[test]
fn haproxy_keeps_each_http_session_on_one_of_several_instances() {
    several_instances(LbKind::Haproxy);
}

// ---------------------------------------------------------------------------------------------
// 5. Which sessions a balancer may read (`[v2] trust_lb`)

/// The system with the gateway trusting nginx (`[v2] trust_lb`, the key nginx presents
/// listed), the gateway plain (`tls`: None) or terminating TLS from nginx itself (`TLSv1.2`,
/// `TLSv1.3`); returns the agent's "connected" line once curl reached the backend through the
/// agent.
fn trusted_balancer(tag: &str, tls: Option<&'static str>) -> String {
    let (port, sys) = backend_system(tag, LbKind::Nginx, |s| {
        s.trust_lb = true;
        s.dmz_tls = tls;
    });
    let agent = sys.agent("agent", None, &[]).unwrap();
    let (code, out, err) = curl_backend(agent.socks, port);
    assert_eq!(
        (code, out.as_str()),
        (0, BACKEND_HELLO),
        "{err}\n{}",
        logs(&sys, &[&agent])
    );
    agent
        .proc
        .log()
        .lines()
        .find(|l| l.contains("connected to the gateway"))
        .unwrap_or_else(|| panic!("{}", logs(&sys, &[&agent])))
        .to_string()
}

/// The admin trusts nginx (`[v2] trust_lb`, its key listed) and nginx hands the gateway plain
/// HTTP: sessions ride nginx's TLS alone (mode `outer`), and the agent says who reads them.
#[test]
fn a_trusted_balancer_carries_sessions_over_its_own_tls() {
    let line = trusted_balancer("lb-trusted", None);
    assert!(
        line.contains("v2 over the TLS of a load balancer the gateway trusts"),
        "{line}"
    );
}

/// An appliance holding a copy of a listed key, re-encrypting to a gateway that terminates TLS
/// 1.2 itself (no exporter value to compare): the gateway terminated that TLS, so the
/// connection is not one a trusted balancer handed over, and the session stays sealed. (It got
/// mode `outer` while the gateway took "no exporter value" for "a balancer terminated it".)
#[test]
fn a_copy_of_a_listed_key_in_front_of_a_gateway_on_tls_1_2_gets_a_sealed_session() {
    let line = trusted_balancer("lb-tls12", Some("TLSv1.2"));
    assert!(line.contains("v2 sealed"), "{line}");
}

/// The same appliance re-encrypting with TLS 1.3, where both TLS connections have an exporter
/// value: the agent's (with nginx) and the gateway's (with nginx) differ, and the gateway
/// terminated the second itself, so the session stays sealed. The key nginx presents is listed
/// and trusted; it still reads nothing.
#[test]
fn a_copy_of_a_listed_key_re_encrypting_with_tls_1_3_gets_a_sealed_session() {
    let line = trusted_balancer("lb-tls13", Some("TLSv1.3"));
    assert!(line.contains("v2 sealed"), "{line}");
}
