//! End to end: the real `sallyport` and `sallyport-gateway` binaries on loopback, driven by real
//! curl (and ssh), with bytes checked end to end.

use sallyport_e2e::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn curl() -> Command {
    require_tool("curl");
    let mut c = Command::new("curl");
    c.args(["-sS", "--max-time", "60"]);
    c
}

fn backend() -> (u16, System) {
    let svc = http_service().unwrap();
    let sys = System::start(
        "basic",
        &allow_backend(svc.port()),
        &["backend.internal=127.0.0.1"],
        &[],
    )
    .unwrap();
    (svc.port(), sys)
}

#[test]
fn curl_reaches_an_internal_name_through_socks5_http_and_connect() {
    let (port, sys) = backend();
    let url = format!("http://backend.internal:{port}/");
    let (code, out, err) = run(curl()
        .arg("--socks5-hostname")
        .arg(sys.socks.to_string())
        .arg(&url))
    .unwrap();
    assert_eq!(code, 0, "socks5: {err}\n{}", sys.agent.log());
    assert_eq!(out, "hello from backend.internal\n");
    let (code, out, err) = run(curl()
        .arg("-x")
        .arg(format!("http://{}", sys.http))
        .arg(&url))
    .unwrap();
    assert_eq!(
        (code, out.as_str()),
        (0, "hello from backend.internal\n"),
        "http: {err}"
    );
    let (code, out, err) = run(curl()
        .arg("-p")
        .arg("-x")
        .arg(format!("http://{}", sys.http))
        .arg(&url))
    .unwrap();
    assert_eq!(
        (code, out.as_str()),
        (0, "hello from backend.internal\n"),
        "connect: {err}"
    );
    // Both the DMZ and the connector audit the stream, with the identity the DMZ stamped.
    sys.dmz
        .wait_for(
            &["stream closed", "alice-laptop", "backend.internal"],
            Duration::from_secs(5),
        )
        .unwrap();
    sys.connector
        .wait_for(
            &["stream closed", "alice", "bytes_down"],
            Duration::from_secs(5),
        )
        .unwrap();
}

#[test]
fn keep_alive_requests_to_different_hosts_share_one_proxy_connection() {
    let svc = http_service().unwrap();
    let svc2 = http_service().unwrap();
    let mut allow = allow_backend(svc.port());
    allow.push(format!("api.internal:{}", svc2.port()));
    allow.push(format!("127.0.0.1/32:{}", svc2.port()));
    let sys = System::start(
        "keepalive",
        &allow,
        &["backend.internal=127.0.0.1", "api.internal=127.0.0.1"],
        &[],
    )
    .unwrap();
    let (code, out, err) = run(curl()
        .arg("-x")
        .arg(format!("http://{}", sys.http))
        .arg(format!("http://backend.internal:{}/", svc.port()))
        .arg(format!("http://api.internal:{}/", svc2.port())))
    .unwrap();
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out,
        "hello from backend.internal\nhello from backend.internal\n"
    );
}

#[test]
fn a_hundred_mib_each_way_arrive_intact() {
    let (port, sys) = backend();
    let tmp = TempDir::new("bulk");
    const N: u64 = 100 * 1024 * 1024;
    // Down: 100 MiB through SOCKS5.
    let down = tmp.path().join("down.bin");
    let (code, _, err) = run(curl()
        .arg("--socks5-hostname")
        .arg(sys.socks.to_string())
        .arg("-o")
        .arg(&down)
        .arg(format!("http://backend.internal:{port}/bytes/{N}")))
    .unwrap();
    assert_eq!(code, 0, "{err}");
    assert_eq!(sha256_file(&down).unwrap(), pattern_sha256(N));
    // Up: 100 MiB through the HTTP port's CONNECT tunnel.
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
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, pattern_sha256(N));
}

#[test]
fn policy_denial_and_missing_routes_reach_curl_as_the_right_errors() {
    let (port, sys) = backend();
    let _ = port;
    // Advertised (*.internal:*) but not in the connector's allow-list: 403 / SOCKS5 0x02.
    let (code, out, _) = run(curl()
        .args(["-o", "/dev/null", "-w", "%{http_code}"])
        .arg("-x")
        .arg(format!("http://{}", sys.http))
        .arg("http://backend.internal:1/"))
    .unwrap();
    assert_eq!((code, out.as_str()), (0, "403"));
    let (_, body, _) = run(curl()
        .arg("-x")
        .arg(format!("http://{}", sys.http))
        .arg("http://backend.internal:1/"))
    .unwrap();
    assert!(
        body.contains("allow-list"),
        "reason missing from the 403 body: {body}"
    );
    let (code, _, err) = run(curl()
        .arg("--socks5-hostname")
        .arg(sys.socks.to_string())
        .arg("http://backend.internal:1/"))
    .unwrap();
    assert_ne!(code, 0);
    assert!(
        err.contains("(2)") || err.to_lowercase().contains("not allowed"),
        "curl said: {err}"
    );
    // No connector serves this name at all: 502 with the reason.
    let (_, out, _) = run(curl()
        .args(["-w", "\n%{http_code}"])
        .arg("-x")
        .arg(format!("http://{}", sys.http))
        .arg("http://www.example.com/"))
    .unwrap();
    assert!(
        out.ends_with("502") && out.contains("no connector serves www.example.com:80"),
        "{out}"
    );
    // The same through CONNECT: the proxy answers the CONNECT itself with 403.
    let (_, out, _) = run(curl()
        .args(["-o", "/dev/null", "-w", "%{http_connect}", "-p"])
        .arg("-x")
        .arg(format!("http://{}", sys.http))
        .arg("http://backend.internal:1/"))
    .unwrap();
    assert_eq!(out, "403");
}

#[test]
fn a_bad_agent_token_is_refused_with_401() {
    let (_, sys) = backend();
    let bad = sys.pki.p("bad.token");
    std::fs::write(&bad, format!("sp_alice-laptop_{}\n", "0".repeat(64))).unwrap();
    let agent = Proc::spawn(
        "bad-agent",
        Command::new(bin("sallyport"))
            .args([
                "run",
                "--gateway",
                &sys.gw_url,
                "--socks",
                "127.0.0.1:0",
                "--http",
                "off",
                "--token-file",
            ])
            .arg(&bad)
            .arg("--ca")
            .arg(sys.pki.p("ca.crt")),
    )
    .unwrap();
    agent
        .wait_for(&["HTTP 401", "invalid token"], Duration::from_secs(15))
        .unwrap();
    sys.dmz
        .wait_for(&["refused token"], Duration::from_secs(5))
        .unwrap();
    assert!(
        !agent.log().contains(&"0".repeat(64)),
        "the token leaked into the log"
    );
    assert!(
        !sys.dmz.log().contains(&"0".repeat(64)),
        "the token leaked into the gateway log"
    );
}

#[test]
fn new_connections_work_again_after_a_connector_restart() {
    let (port, mut sys) = backend();
    let url = format!("http://backend.internal:{port}/");
    let ok = |sys: &System| {
        run(curl()
            .arg("--socks5-hostname")
            .arg(sys.socks.to_string())
            .arg(&url))
        .map(|r| r.0 == 0)
        .unwrap_or(false)
    };
    assert!(ok(&sys));
    sys.restart_connector().unwrap();
    let started = Instant::now();
    while !ok(&sys) {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "no recovery: {}",
            sys.dmz.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "recovered {:?} after the connector restart",
        started.elapsed()
    );
}

#[test]
fn the_connector_listens_on_nothing_and_only_dials_out() {
    let (_, sys) = backend();
    let sockets = tcp_sockets_of(sys.connector.pid());
    assert!(
        sockets.iter().all(|(state, _)| state != "0A"),
        "the connector listens: {sockets:?}"
    );
    let established = sockets.iter().filter(|(state, _)| state == "01").count();
    assert!(
        established >= 2,
        "expected its two sessions to the gateway: {sockets:?}"
    );
    // The DMZ is the only listener of the system.
    assert!(tcp_sockets_of(sys.dmz.pid())
        .iter()
        .any(|(state, _)| state == "0A"));
}

#[test]
fn a_static_forward_carries_a_tcp_conversation() {
    let echo = echo_service().unwrap();
    let sys = System::start(
        "forward",
        &allow_backend(echo.port()),
        &["backend.internal=127.0.0.1"],
        &[format!("127.0.0.1:0=backend.internal:{}", echo.port())],
    )
    .unwrap();
    let mut s = TcpStream::connect(sys.forwards[0]).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    for i in 0..20 {
        let msg = format!("line {i}\n");
        s.write_all(msg.as_bytes()).unwrap();
        let mut buf = vec![0u8; msg.len()];
        s.read_exact(&mut buf).unwrap();
        assert_eq!(buf, msg.as_bytes());
    }
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
}

#[test]
fn sallyport_connect_pipes_stdio_for_proxycommand() {
    let echo = echo_service().unwrap();
    let sys = System::start(
        "connect",
        &allow_backend(echo.port()),
        &["backend.internal=127.0.0.1"],
        &[],
    )
    .unwrap();
    let mut child = Command::new(bin("sallyport"))
        .args([
            "connect",
            "backend.internal",
            &echo.port().to_string(),
            "--socks",
            &sys.socks.to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"SSH-2.0-sallyport-test\r\nbye\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, b"SSH-2.0-sallyport-test\r\nbye\n");
}

/// A real OpenSSH session through `ProxyCommand='sallyport connect %h %p'` to an sshd inside.
#[test]
fn ssh_through_proxycommand_reaches_an_internal_sshd() {
    require_tool("ssh");
    require_tool("ssh-keygen");
    let sshd = "/usr/sbin/sshd";
    assert!(
        std::path::Path::new(sshd).exists(),
        "sshd is required: run scripts/test.sh (installs openssh-server)"
    );
    let tmp = TempDir::new("ssh");
    let d = tmp.path();
    for (name, kind) in [("host_key", "ed25519"), ("client_key", "ed25519")] {
        let (code, _, err) = run(Command::new("ssh-keygen")
            .args(["-q", "-t", kind, "-N", "", "-f"])
            .arg(d.join(name)))
        .unwrap();
        assert_eq!(code, 0, "{err}");
    }
    std::fs::copy(d.join("client_key.pub"), d.join("authorized_keys")).unwrap();
    // A free port for sshd (sshd needs a number; we bind 0, read it, release it).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    std::fs::create_dir_all("/run/sshd").ok();
    let user = std::env::var("USER").unwrap_or_else(|_| "root".into());
    let cfg = format!(
        "Port {port}\nListenAddress 127.0.0.1\nHostKey {hk}\nAuthorizedKeysFile {ak}\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nPidFile {pid}\nStrictModes no\nPermitRootLogin yes\n",
        hk = d.join("host_key").display(),
        ak = d.join("authorized_keys").display(),
        pid = d.join("sshd.pid").display()
    );
    std::fs::write(d.join("sshd_config"), cfg).unwrap();
    let _sshd = Proc::spawn(
        "sshd",
        Command::new(sshd)
            .args(["-D", "-e", "-f"])
            .arg(d.join("sshd_config")),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let sys = System::start(
        "sshd",
        &allow_backend(port),
        &["backend.internal=127.0.0.1"],
        &[],
    )
    .unwrap();
    let proxy = format!(
        "ProxyCommand={} connect %h %p --socks {}",
        bin("sallyport").display(),
        sys.socks
    );
    let (code, out, err) = run(Command::new("ssh")
        .args([
            "-F",
            "/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
        ])
        .arg(format!(
            "UserKnownHostsFile={}",
            d.join("known_hosts").display()
        ))
        .arg("-o")
        .arg(&proxy)
        .arg("-i")
        .arg(d.join("client_key"))
        .args(["-p", &port.to_string()])
        .arg(format!("{user}@backend.internal"))
        .arg("echo through-the-tunnel"))
    .unwrap();
    assert_eq!(code, 0, "ssh failed: {err}\n{}", sys.agent.log());
    assert_eq!(out.trim(), "through-the-tunnel");
}

#[test]
fn another_users_process_is_refused_by_the_agent() {
    require_tool("setpriv");
    let (port, sys) = backend();
    let url = format!("http://backend.internal:{port}/");
    let (code, _, err) = run(Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "curl",
            "-sS",
            "--max-time",
            "10",
            "--socks5-hostname",
        ])
        .arg(sys.socks.to_string())
        .arg(&url))
    .unwrap();
    assert_ne!(code, 0, "another user got through: {err}");
    sys.agent
        .wait_for(
            &["refused a client connection", "uid 65534"],
            Duration::from_secs(5),
        )
        .unwrap();
    // The owner still gets through.
    let (code, _, err) = run(curl()
        .arg("--socks5-hostname")
        .arg(sys.socks.to_string())
        .arg(&url))
    .unwrap();
    assert_eq!(code, 0, "{err}");
}

#[test]
fn the_agent_refuses_to_start_when_another_user_holds_its_port() {
    require_tool("setpriv");
    require_tool("perl");
    // perl from Debian's perl-base: readable by any user (unlike a per-user Python install).
    let mut holder = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "perl", "-MIO::Socket::INET", "-e"])
        .arg(r#"$|=1; $s=IO::Socket::INET->new(Listen=>5,LocalAddr=>"127.0.0.1",LocalPort=>0) or die "bind: $!"; print $s->sockport,"\n"; sleep 30"#)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(holder.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    let port: u16 = line.trim().parse().unwrap();
    let (code, _, err) = run(Command::new(bin("sallyport"))
        .args([
            "run",
            "--gateway",
            "wss://127.0.0.1:9/",
            "--http",
            "off",
            "--socks",
            &format!("127.0.0.1:{port}"),
        ])
        .env("SALLYPORT_TOKEN", format!("sp_x_{}", "a".repeat(64)))
        .env("HOME", "/nonexistent"))
    .unwrap();
    let _ = holder.kill();
    let _ = holder.wait();
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("in use by uid 65534"), "{err}");
}

#[test]
fn revoking_an_agent_token_cuts_its_live_session() {
    let (_, sys) = backend();
    let tokens = sys.pki.p("agents.toml");
    let text = std::fs::read_to_string(&tokens).unwrap();
    // Remove the only [[token]] entry: the file stays valid and now lists nobody.
    let kept: String = text
        .lines()
        .take_while(|l| !l.starts_with("[[token]]"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&tokens, kept).unwrap();
    sys.dmz
        .wait_for(&["token revoked or expired"], Duration::from_secs(10))
        .unwrap();
    sys.agent
        .wait_for(&["gateway session lost"], Duration::from_secs(10))
        .unwrap();
}

#[test]
fn the_demo_pushes_real_traffic_and_exits_with_once() {
    let (code, out, err) = run(Command::new(bin("sallyport")).args([
        "demo",
        "--once",
        "--socks",
        "127.0.0.1:0",
        "--http",
        "127.0.0.1:0",
    ]))
    .unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("through SOCKS5 -> hello from backend.internal"),
        "{out}"
    );
    assert!(
        out.contains("through HTTP   -> hello from backend.internal"),
        "{out}"
    );
    assert!(out.contains("curl --socks5-hostname"), "{out}");
}

#[test]
fn bad_configuration_exits_64_with_one_line_naming_the_fix() {
    let (code, _, err) = run(Command::new(bin("sallyport"))
        .args(["run", "--socks", "127.0.0.1:0"])
        .env("HOME", "/nonexistent"))
    .unwrap();
    assert_eq!(code, 64, "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("--gateway"), "{err}");
    let (code, _, err) = run(Command::new(bin("sallyport-gateway")).args([
        "dmz",
        "--listen",
        "127.0.0.1:0",
        "--plain",
    ]))
    .unwrap();
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("--agent-tokens"), "{err}");
    let (code, _, err) = run(Command::new(bin("sallyport"))
        .args([
            "run",
            "--gateway",
            "wss://gw.example.com/",
            "--socks",
            "0.0.0.0:1080",
        ])
        .env("SALLYPORT_TOKEN", format!("sp_x_{}", "a".repeat(64))))
    .unwrap();
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("open proxy"), "{err}");
}

/// A second agent for the same user on the same port names the running one and its pid, rather
/// than a raw "address in use".
#[test]
fn a_second_agent_on_the_same_port_names_the_running_one() {
    let (_port, sys) = backend();
    let (code, _, err) = run(Command::new(bin("sallyport"))
        .args([
            "run",
            "--gateway",
            &sys.gw_url,
            "--http",
            "off",
            "--socks",
            &sys.socks.to_string(),
        ])
        .env("SALLYPORT_TOKEN", format!("sp_x_{}", "a".repeat(64)))
        .env("HOME", "/nonexistent"))
    .unwrap();
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!(
            "{} is already in use by sallyport (pid {})",
            sys.socks,
            sys.agent.pid()
        )) && err.contains("an agent is already running for you"),
        "{err}"
    );
}

/// `sallyport status` reads the running agent's state from its per-user control socket; another
/// user gets nothing.
#[test]
fn status_shows_the_running_agent_to_its_user_only() {
    let (port, mut sys) = backend();
    let (code, _, err) = run(curl()
        .arg("--socks5-hostname")
        .arg(sys.socks.to_string())
        .arg(format!("http://backend.internal:{port}/")))
    .unwrap();
    assert_eq!(code, 0, "{err}");
    let status = |uid: Option<&str>| {
        let mut c = match uid {
            Some(u) => {
                let mut c = Command::new("setpriv");
                c.args(["--reuid", u, "--regid", u, "--clear-groups"])
                    .arg(bin("sallyport"));
                c
            }
            None => Command::new(bin("sallyport")),
        };
        c.arg("status")
            .env("HOME", sys.pki.dir.path())
            .env("XDG_CONFIG_HOME", sys.pki.dir.path().join(".config"));
        run(&mut c).unwrap()
    };
    let (code, out, err) = status(None);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("connected: yes (gateway instance dmz-test)"),
        "{out}"
    );
    assert!(out.contains("way out: direct"), "{out}");
    assert!(
        out.contains(&format!("listening: socks5 {}", sys.socks)),
        "{out}"
    );
    let bytes_in: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("bytes: "))
        .and_then(|b| b.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(bytes_in > 0, "{out}");
    // Another user: no answer.
    let (code, out, _) = status(Some("65534"));
    assert_ne!(code, 0);
    assert!(!out.contains("connected:"), "{out}");
    // No agent: says so.
    sys.agent.kill();
    let (code, _, err) = status(None);
    assert_eq!(code, 1);
    assert!(err.contains("no agent is running for this user"), "{err}");
}

/// The agent's HTTP port serves a PAC file for browsers with the routes the gateway reports
/// for this user (evaluated here with the PAC engine: the internal service through the agent,
/// anything else as before), and a status page; both only for a `Host` of 127.0.0.1/localhost.
#[test]
fn the_agent_serves_a_pac_for_browsers_and_a_status_page() {
    let (port, sys) = backend();
    let get = |path: &str, host: Option<&str>| {
        let mut c = curl();
        c.args(["--noproxy", "*", "-i"]);
        if let Some(h) = host {
            c.args(["-H", &format!("Host: {h}")]);
        }
        run(c.arg(format!("http://{}{path}", sys.http))).unwrap()
    };
    // The DMZ tells the agent its routes within a couple of seconds of the session.
    let deadline = Instant::now() + Duration::from_secs(10);
    let pac = loop {
        let (code, out, err) = get("/proxy.pac", None);
        assert_eq!(code, 0, "{err}");
        if out.contains("*.internal") {
            break out;
        }
        assert!(Instant::now() < deadline, "no routes in the PAC:\n{out}");
        std::thread::sleep(Duration::from_millis(300));
    };
    assert!(pac.starts_with("HTTP/1.1 200"), "{pac}");
    assert!(pac.contains("application/x-ns-proxy-autoconfig"), "{pac}");
    let script = pac.split("\r\n\r\n").nth(1).unwrap();
    assert!(!script.contains("dnsResolve") && !script.contains("isInNet"));
    let eval = |url: &str, host: &str| {
        egress::pac::Pac::new("agent", script, egress::pac::PacLimits::default())
            .unwrap()
            .find_proxy(url, host)
            .unwrap()
    };
    assert_eq!(
        eval(
            &format!("http://backend.internal:{port}/"),
            "backend.internal"
        ),
        [egress::Proxy::Http {
            host: "127.0.0.1".into(),
            port: sys.http.port(),
            user: None
        }]
    );
    assert_eq!(
        eval("https://www.example.com/", "www.example.com"),
        [egress::Proxy::Direct]
    );

    let (code, page, _) = get("/", None);
    assert_eq!(code, 0);
    assert!(
        page.contains("text/html") && page.contains("connected"),
        "{page}"
    );
    assert!(page.contains("*.internal"), "{page}");
    // Another Host (DNS rebinding): refused.
    let (_, rebound, _) = get("/", Some("evil.example:8118"));
    assert!(rebound.starts_with("HTTP/1.1 400"), "{rebound}");
    let (_, missing, _) = get("/nope", None);
    assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
}
