//! The HTTP fallback transport and the inner channel, end to end on loopback with the real
//! binaries and curl: forced `--transport http` (streamed and long-polled), the inner channel
//! over WebSocket and over HTTP, a wrong pinned inner key, and a proxy that buffers whole
//! responses (our `sp-bufproxy`), which must push the agent to long-poll.
//! (Through a real TLS-inspecting squid: `topology.rs`.)

use sallyport_e2e::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn curl() -> Command {
    require_tool("curl");
    let mut c = Command::new("curl");
    c.args(["-sS", "--max-time", "120"]);
    c
}

/// The DMZ's inner key, as the admin reads it.
fn inner_key(sys: &System) -> String {
    let (code, out, err) = run(Command::new(bin("sallyport-gateway"))
        .args(["inner-key", "--agent-tokens"])
        .arg(sys.pki.p("agents.toml")))
    .unwrap();
    assert_eq!(code, 0, "{err}");
    let key = out.trim().to_string();
    assert!(key.starts_with("x25519/"), "{key}");
    key
}

fn system(tag: &str, agent_args: &[&str]) -> (u16, u16, System) {
    let svc = http_service().unwrap();
    let echo = echo_service().unwrap();
    let mut allow = allow_backend(svc.port());
    allow.extend(allow_backend(echo.port()));
    let args: Vec<String> = agent_args.iter().map(|a| a.to_string()).collect();
    let sys = System::start_with(
        tag,
        &allow,
        &["backend.internal=127.0.0.1"],
        &[],
        &args,
        &[],
    )
    .unwrap();
    (svc.port(), echo.port(), sys)
}

/// 20 MiB down (SOCKS5) and 20 MiB up (HTTP CONNECT), checked by hash.
fn twenty_mib_both_ways(sys: &System, port: u16) {
    const N: u64 = 20 * 1024 * 1024;
    let tmp = TempDir::new("fallback-bulk");
    let down = tmp.path().join("down.bin");
    let started = Instant::now();
    let (code, _, err) = run(curl()
        .arg("--socks5-hostname")
        .arg(sys.socks.to_string())
        .arg("-o")
        .arg(&down)
        .arg(format!("http://backend.internal:{port}/bytes/{N}")))
    .unwrap();
    assert_eq!(code, 0, "{err}\n{}", sys.agent.log());
    assert_eq!(sha256_file(&down).unwrap(), pattern_sha256(N));
    let up = tmp.path().join("up.bin");
    write_pattern_file(&up, N).unwrap();
    let (code, out, err) = run(curl()
        .arg("-p")
        .arg("-x")
        .arg(format!("http://{}", sys.http))
        .arg("--data-binary")
        .arg(format!("@{}", up.display()))
        .arg("-H")
        .arg("Expect:")
        .arg(format!("http://backend.internal:{port}/sha256")))
    .unwrap();
    assert_eq!(code, 0, "{err}\n{}", sys.agent.log());
    assert_eq!(out, pattern_sha256(N));
    eprintln!("20 MiB each way in {:?}", started.elapsed());
}

/// An interactive exchange (an ssh-like conversation through SOCKS5): 20 round trips, each
/// answered promptly. Returns the slowest round trip.
fn interactive(socks: std::net::SocketAddr, echo_port: u16) -> Duration {
    let mut s = socks5_connect(socks, "backend.internal", echo_port).unwrap();
    let mut worst = Duration::ZERO;
    for i in 0..20 {
        let msg = format!("keystroke {i}\n");
        let t = Instant::now();
        s.write_all(msg.as_bytes()).unwrap();
        let mut buf = vec![0u8; msg.len()];
        s.read_exact(&mut buf).unwrap();
        assert_eq!(buf, msg.as_bytes());
        worst = worst.max(t.elapsed());
        std::thread::sleep(Duration::from_millis(50));
    }
    worst
}

#[test]
fn forced_http_transport_carries_bulk_and_interactive_traffic() {
    let (port, echo, sys) = system("http-forced", &["--transport", "http"]);
    let line = sys
        .agent
        .wait_for(&["connected to the gateway"], Duration::from_secs(5))
        .unwrap();
    assert!(line.contains("carried=http"), "{line}");
    twenty_mib_both_ways(&sys, port);
    let worst = interactive(sys.socks, echo);
    // Generous: a keystroke must not wait for a poll cycle or a batch timer.
    assert!(
        worst < Duration::from_secs(2),
        "slowest round trip {worst:?}"
    );
}

#[test]
fn the_inner_channel_carries_websocket_and_http_sessions() {
    // Same gateway, the key learnt from the admin's command.
    let (port, echo, sys) = system("inner", &[]);
    // The v1 inner channel, for v1 tokens (v2 sessions are sealed by their own handshake).
    sys.pki.use_v1_token("agent", "alice-laptop").unwrap();
    // The DMZ reads its token files every 2 s: until then the new token is refused, and a
    // refused agent waits 5 s or more before it tries again.
    sys.dmz
        .wait_for_reload(&sys.pki.p("agents.toml"), 2)
        .unwrap();
    let key = inner_key(&sys);
    for transport in ["websocket", "http"] {
        let agent = sys
            .spawn_agent(
                &format!("agent-inner-{transport}"),
                &["--gateway-inner-key", &key, "--transport", transport],
                &[],
            )
            .unwrap();
        let socks = agent.addr(&["listening", "socks5"]).unwrap();
        let line = agent
            .wait_for(&["connected to the gateway"], Duration::from_secs(15))
            .unwrap();
        assert!(
            line.contains(&format!("carried=\"{transport}, inner channel\""))
                || line.contains(&format!("carried={transport}, inner channel")),
            "{line}"
        );
        let worst = interactive(socks, echo);
        assert!(worst < Duration::from_secs(2), "{transport}: {worst:?}");
        let (code, out, err) = run(curl()
            .arg("--socks5-hostname")
            .arg(socks.to_string())
            .arg(format!("http://backend.internal:{port}/")))
        .unwrap();
        assert_eq!(
            (code, out.as_str()),
            (0, "hello from backend.internal\n"),
            "{err}"
        );
        // Full-size frames, sealed: a sealed 64 KiB frame once exceeded the WebSocket message
        // limit and cut the session.
        const N: u64 = 4 * 1024 * 1024;
        let tmp = TempDir::new("inner-down");
        let down = tmp.path().join("down.bin");
        let (code, _, err) = run(curl()
            .arg("--socks5-hostname")
            .arg(socks.to_string())
            .arg("-o")
            .arg(&down)
            .arg(format!("http://backend.internal:{port}/bytes/{N}")))
        .unwrap();
        assert_eq!(code, 0, "{transport}: {err}\n{}", agent.log());
        assert_eq!(sha256_file(&down).unwrap(), pattern_sha256(N));
        assert!(!agent.log().contains("session lost"), "{}", agent.log());
    }
}

#[test]
fn a_wrong_pinned_inner_key_fails_showing_both_keys() {
    let (_, _, sys) = system("inner-wrong", &[]);
    sys.pki.use_v1_token("agent", "alice-laptop").unwrap();
    let right = inner_key(&sys);
    // Any other valid key.
    let wrong = "x25519/AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    for transport in ["websocket", "http"] {
        let agent = sys
            .spawn_agent(
                &format!("agent-wrong-{transport}"),
                &["--gateway-inner-key", wrong, "--transport", transport],
                &[],
            )
            .unwrap();
        let line = agent
            .wait_for(&["does not match the pinned one"], Duration::from_secs(15))
            .unwrap();
        assert!(line.contains(&right) && line.contains(wrong), "{line}");
    }
}

/// A second DMZ, plain, behind `sp-bufproxy` (which terminates TLS with the gateway's
/// certificate and buffers whole responses), with its own connector; returns what to keep
/// alive and the gateway URL through the proxy.
struct Buffered {
    dmz: Proc,
    _connector: Proc,
    proxy: std::process::Child,
    url: String,
}

impl Drop for Buffered {
    fn drop(&mut self) {
        let _ = self.proxy.kill();
        let _ = self.proxy.wait();
        self.dmz.kill();
    }
}

fn behind_bufproxy(sys: &System, extra: &[&str]) -> Buffered {
    let dmz = Proc::spawn(
        "dmz-plain",
        Command::new(bin("sallyport-gateway"))
            .args(["dmz", "--plain", "--listen", "127.0.0.1:0"])
            .args(["--instance-id", "dmz-plain", "--agent-tokens"])
            .arg(sys.pki.p("agents.toml"))
            .arg("--connector-tokens")
            .arg(sys.pki.p("connectors.toml")),
    )
    .unwrap();
    let plain = dmz.addr(&["dmz gateway listening"]).unwrap();
    let mut cargs = sys.connector_args.clone();
    let i = cargs.iter().position(|a| a == "--gateway").unwrap();
    cargs[i + 1] = format!("ws://{plain}/");
    let connector = Proc::spawn(
        "connector-plain",
        Command::new(bin("sallyport-gateway")).args(&cargs),
    )
    .unwrap();
    dmz.wait_for(&["connector routes"], Duration::from_secs(15))
        .unwrap();
    let mut proxy = Command::new(env!("CARGO_BIN_EXE_sp-bufproxy"))
        .args(["--listen", "127.0.0.1:0", "--upstream", &plain.to_string()])
        .arg("--cert")
        .arg(sys.pki.p("gateway.crt"))
        .arg("--key")
        .arg(sys.pki.p("gateway.key"))
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(proxy.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    let front = first.trim().rsplit(' ').next().unwrap().to_string();
    Buffered {
        dmz,
        _connector: connector,
        proxy,
        url: format!("wss://{front}/"),
    }
}

fn agent_via(sys: &System, name: &str, url: &str, args: &[&str]) -> Proc {
    let mut cmd = Command::new(bin("sallyport"));
    cmd.args(["run", "--gateway", url])
        .args([
            "--socks",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--token-file",
        ])
        .arg(sys.pki.p("alice-laptop.token"))
        .arg("--ca")
        .arg(sys.pki.p("ca.crt"))
        .args(args)
        .env("HOME", sys.pki.dir.path())
        .env_remove("HTTPS_PROXY")
        .env_remove("https_proxy")
        .env_remove("ALL_PROXY")
        .env_remove("all_proxy");
    Proc::spawn(name, &mut cmd).unwrap()
}

/// A proxy that buffers whole responses (some inspecting proxies scan bodies first): the
/// streamed download never shows its first keepalive, the agent switches to long-poll (says
/// so once) and everything still works.
#[test]
fn a_buffering_proxy_forces_long_poll_which_still_works() {
    let (port, echo, sys) = system("bufproxy", &[]);
    let b = behind_bufproxy(&sys, &[]);
    let agent = agent_via(&sys, "agent-buffered", &b.url, &[]);
    let socks = agent.addr(&["listening", "socks5"]).unwrap();
    let line = agent
        .wait_for(&["connected to the gateway"], Duration::from_secs(20))
        .unwrap();
    assert!(line.contains("http"), "{line}");
    let (code, out, err) = run(curl()
        .arg("--socks5-hostname")
        .arg(socks.to_string())
        .arg(format!("http://backend.internal:{port}/")))
    .unwrap();
    assert_eq!(
        (code, out.as_str()),
        (0, "hello from backend.internal\n"),
        "{err}\n{}",
        agent.log()
    );
    agent
        .wait_for(
            &["switching the HTTP transport to long-poll"],
            Duration::from_secs(10),
        )
        .unwrap();
    // 2 MiB down, and a conversation, over long-poll.
    const N: u64 = 2 * 1024 * 1024;
    let tmp = TempDir::new("bufproxy-down");
    let down = tmp.path().join("down.bin");
    let (code, _, err) = run(curl()
        .arg("--socks5-hostname")
        .arg(socks.to_string())
        .arg("-o")
        .arg(&down)
        .arg(format!("http://backend.internal:{port}/bytes/{N}")))
    .unwrap();
    assert_eq!(code, 0, "{err}\n{}", agent.log());
    assert_eq!(sha256_file(&down).unwrap(), pattern_sha256(N));
    let worst = interactive(socks, echo);
    assert!(
        worst < Duration::from_secs(3),
        "long-poll round trip {worst:?}"
    );
    assert_eq!(
        agent
            .log()
            .matches("switching the HTTP transport to long-poll")
            .count(),
        1,
        "{}",
        agent.log()
    );
    drop(b);
}

/// A proxy that alters what passes (here: the last byte of every answer to a GET) gets a
/// clear failure from the inner channel, and never a session without it.
#[test]
fn a_tampering_proxy_gets_a_clear_failure_not_a_downgrade() {
    let (_, _, sys) = system("tamper", &[]);
    let key = inner_key(&sys);
    let b = behind_bufproxy(&sys, &["--tamper"]);
    let agent = agent_via(
        &sys,
        "agent-tampered",
        &b.url,
        &["--gateway-inner-key", &key],
    );
    agent
        .wait_for(
            &["something on the way altered the data"],
            Duration::from_secs(30),
        )
        .unwrap();
    assert!(
        !agent.log().contains("connected to the gateway"),
        "{}",
        agent.log()
    );
    drop(b);
}

/// A trusted site whose own egress is a TLS-inspecting proxy in its default configuration
/// (squid `ssl_bump` re-signing with a CA the connector does not trust, WebSocket upgrades
/// stripped): the connector, with its v2 token, falls back to the HTTP transport sealed by
/// protocol v2, and agents reach the site's services through it.
#[test]
fn a_connector_behind_a_stripping_inspecting_proxy_runs_the_sealed_http_transport() {
    require_tool("openssl");
    let (port, _echo, mut sys) = system("conn-http", &[]);
    let ca = TempDir::new("corp-ca-conn");
    let (cert, key) = corp_ca(ca.path()).unwrap();
    let squid = Squid::start_with(
        "sq-bump-conn",
        SquidAuth::Bump {
            ca_cert: &cert,
            ca_key: &key,
        },
    )
    .unwrap();
    sys.connector.kill();
    let mut args = sys.connector_args.clone();
    args.extend(["--proxy".into(), format!("http://127.0.0.1:{}", squid.port)]);
    let connector = Proc::spawn(
        "connector-bumped",
        std::process::Command::new(bin("sallyport-gateway")).args(&args),
    )
    .unwrap();
    connector
        .wait_for(
            &["using the HTTP transport, sealed by protocol v2"],
            Duration::from_secs(20),
        )
        .unwrap();
    let line = connector
        .wait_for(&["connected to the gateway"], Duration::from_secs(20))
        .unwrap();
    assert!(!line.is_empty());
    connector
        .wait_for(&["http, v2 sealed"], Duration::from_secs(10))
        .unwrap();
    // The agent reaches the internal service through the connector's HTTP session.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, out, err) = run(curl()
            .arg("--socks5-hostname")
            .arg(sys.socks.to_string())
            .arg(format!("http://backend.internal:{port}/")))
        .unwrap();
        if code == 0 && out == "hello from backend.internal\n" {
            break;
        }
        assert!(Instant::now() < deadline, "{err}\n{}", connector.log());
        std::thread::sleep(Duration::from_millis(300));
    }
    // squid logs a request once it is done, which may be after the connector has the answer.
    squid
        .wait_for_log(&["connector/http"], Duration::from_secs(10))
        .unwrap();
}
