//! The product's claim on a real (namespaced) network: four sites with their own firewalls
//! ([`sallyport_e2e::netns`]): the desktop may only talk to the corporate proxy, the proxy only
//! to TCP 443, the DMZ accepts only 443, and the trusted site accepts **nothing** and may only
//! dial the DMZ on 443. Through that: curl and an interactive session from the desktop reach
//! internal services by internal names; the direct ways are shown to fail; the connector listens
//! on nothing; and restarting the proxy, the gateway or the connector heals without touching the
//! agent.
//!
//! And a cluster ([`Layout::TwoSites`]): two DMZ instances behind HAProxy on the DMZ's 443, two
//! trusted sites with a connector each that may reach only that 443, agents on a desktop that
//! may reach only that 443; an instance killed, then both restarted one after the other.
//!
//! Runs as root (namespaces, nftables, port 443 in the DMZ namespace).

use sallyport_e2e::lb::{LbConfig, LbKind, LoadBalancer};
use sallyport_e2e::netns::{Layout, Site, Topology};
use sallyport_e2e::*;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const GW_NAME: &str = "gw.sallyport.test";

/// Everything of one topology run, dropped in reverse order (processes before namespaces).
struct Sites {
    pki: Pki,
    dmz: Proc,
    dmz_args: Vec<String>,
    connector: Proc,
    connector_args: Vec<String>,
    squid: Squid,
    squid_opts: SquidOpts,
    /// Holds the hosts file squid reads (kept until the end).
    _hosts_dir: TempDir,
    agent: Proc,
    socks: std::net::SocketAddr,
    web_port: u16,
    echo_port: u16,
    _web: Proc,
    _echo: Proc,
    _web_outside: Proc,
    web_outside_port: u16,
    /// The load balancer in the DMZ, when the gateway runs behind one.
    lb: Option<Box<dyn LoadBalancer>>,
    topo: Topology,
}

fn gateway_bin() -> String {
    bin("sallyport-gateway").display().to_string()
}

fn spawn_in(topo: &Topology, site: Site, name: &str, program: &str, args: &[String]) -> Proc {
    Proc::spawn(name, topo.cmd(site, program).args(args)).unwrap()
}

/// `sp-testsvc KIND ADDR` in a site, and the port it listens on.
fn service_in(topo: &Topology, site: Site, name: &str, kind: &str, addr: &str) -> (Proc, u16) {
    let svc = bin("sp-testsvc").display().to_string();
    let p = spawn_in(topo, site, name, &svc, &[kind.into(), addr.into()]);
    let port = p.addr(&["listening"]).unwrap().port();
    (p, port)
}

fn squid_in(topo: &Topology, hosts: &std::path::Path) -> (Squid, SquidOpts) {
    let opts = SquidOpts {
        netns: Some(topo.ns(Site::Proxy)),
        ip: Some(Site::Proxy.ip().into()),
        port: Some(3128),
        // The proxy resolves the gateway's public name (there is no DNS server here).
        extra: format!(
            "hosts_file {}\nvisible_hostname proxy.corp.test\n",
            hosts.display()
        ),
    };
    let squid = Squid::start_opts(
        "topo-squid",
        SquidAuth::Basic {
            user: "alice",
            password: "Corp-pw-1",
        },
        &opts,
    )
    .unwrap();
    (squid, opts)
}

fn start(tag: &str) -> Sites {
    start_with(tag, None)
}

/// With `lb`, the DMZ runs the gateway plain on its loopback behind that load balancer on 443
/// (idle timeout 3 s), and agent and connector ping every second.
fn start_with(tag: &str, lb: Option<LbKind>) -> Sites {
    let topo = Topology::new(tag).unwrap();
    let dmz_ip = Site::Dmz.ip().to_string();
    let pki = Pki::with_names("topo", &[GW_NAME, &dmz_ip]).unwrap();
    pki.token(
        "agent",
        "alice-laptop",
        &["--name", "alice", "--groups", "dev"],
    )
    .unwrap();
    pki.token("connector", "site-a", &["--route", "*.internal:*"])
        .unwrap();

    // Trusted site: two internal services on loopback, and one on the site's own address (to
    // show that the DMZ cannot reach in).
    let (web, web_port) = service_in(&topo, Site::Trusted, "web", "http", "127.0.0.1:0");
    let (echo, echo_port) = service_in(&topo, Site::Trusted, "echo", "echo", "127.0.0.1:0");
    let (web_outside, web_outside_port) = service_in(
        &topo,
        Site::Trusted,
        "web-outside",
        "http",
        &format!("{}:0", Site::Trusted.ip()),
    );

    // DMZ: the gateway on 443.
    let p = |f: &str| pki.p(f).display().to_string();
    let mut dmz_args: Vec<String> = vec![
        "dmz".into(),
        "--instance-id".into(),
        "dmz-topo".into(),
        "--agent-tokens".into(),
        p("agents.toml"),
        "--connector-tokens".into(),
        p("connectors.toml"),
    ];
    let prefix = if lb.is_some() { "/sallyport" } else { "" };
    match lb {
        None => dmz_args.extend([
            "--listen".into(),
            format!("{dmz_ip}:443"),
            "--tls-cert".into(),
            p("gateway.crt"),
            "--tls-key".into(),
            p("gateway.key"),
        ]),
        Some(_) => dmz_args.extend([
            "--plain".into(),
            "--listen".into(),
            "127.0.0.1:8080".into(),
            "--prefix".into(),
            prefix.into(),
            "--trusted-proxy".into(),
            "127.0.0.1/32".into(),
        ]),
    }
    let dmz = spawn_in(&topo, Site::Dmz, "dmz", &gateway_bin(), &dmz_args);
    dmz.wait_for(&["dmz gateway listening"], Duration::from_secs(15))
        .unwrap();
    let (cert, key) = (pki.p("gateway.crt"), pki.p("gateway.key"));
    let dmz_ns = topo.ns(Site::Dmz);
    let lb = lb.map(|kind| {
        let mut cfg = LbConfig::new("127.0.0.1:8080".parse().unwrap(), &cert, &key);
        cfg.listen = format!("{dmz_ip}:443").parse().unwrap();
        cfg.prefix = prefix;
        cfg.idle_timeout = Duration::from_secs(3);
        cfg.netns = Some(&dmz_ns);
        kind.start(&cfg).unwrap()
    });
    // Behind a load balancer that cuts idle connections after 3 s, both ends ping every second.
    let ping_conf = pki.p("ping.toml");
    std::fs::write(&ping_conf, "[tunnel]\nping_interval = \"1s\"\n").unwrap();
    let ping_args: Vec<String> = if lb.is_some() {
        vec!["-c".into(), ping_conf.display().to_string()]
    } else {
        Vec::new()
    };

    // Trusted site: the connector dials out to the DMZ.
    let connector_args: Vec<String> = [
        "connector".into(),
        "--gateway".into(),
        format!("wss://{dmz_ip}{prefix}/"),
        "--token-file".into(),
        p("site-a.token"),
        "--ca".into(),
        p("ca.crt"),
        "--proxy".into(),
        "direct".into(),
        "--advertise".into(),
        "*.internal:*".into(),
        "--allow".into(),
        format!("backend.internal:{web_port}"),
        "--allow".into(),
        format!("shell.internal:{echo_port}"),
        // The services listen on the trusted site's loopback, which must be listed explicitly.
        "--allow".into(),
        format!("127.0.0.1/32:{web_port}"),
        "--allow".into(),
        format!("127.0.0.1/32:{echo_port}"),
        "--host".into(),
        "backend.internal=127.0.0.1".into(),
        "--host".into(),
        "shell.internal=127.0.0.1".into(),
        "--instance-id".into(),
        "connector-topo".into(),
    ]
    .into_iter()
    .chain(ping_args.iter().cloned())
    .collect();
    let connector = spawn_in(
        &topo,
        Site::Trusted,
        "connector",
        &gateway_bin(),
        &connector_args,
    );
    dmz.wait_for(&["connector routes"], Duration::from_secs(15))
        .unwrap();

    // Corporate proxy: squid with Basic authentication, outbound 443 only.
    let hosts_dir = TempDir::new("topo-hosts");
    let hosts = hosts_dir.path().join("hosts");
    std::fs::write(&hosts, format!("{dmz_ip} {GW_NAME}\n")).unwrap();
    std::fs::set_permissions(
        hosts_dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    std::fs::set_permissions(&hosts, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let (squid, squid_opts) = squid_in(&topo, &hosts);

    // Desktop: the agent, out through the proxy only.
    let agent = Proc::spawn(
        "agent",
        topo.cmd(Site::Desktop, bin("sallyport"))
            .args([
                "run",
                "--gateway",
                &format!("wss://{GW_NAME}{prefix}/"),
                "--proxy",
                &format!("http://alice@{}:3128", Site::Proxy.ip()),
                "--socks",
                "127.0.0.1:0",
                "--http",
                "off",
                "--token-file",
                &p("alice-laptop.token"),
                "--ca",
                &p("ca.crt"),
            ])
            .args(&ping_args)
            .env("SALLYPORT_PROXY_PASSWORD", "Corp-pw-1")
            .env("HOME", pki.dir.path()),
    )
    .unwrap();
    let socks = agent.addr(&["listening", "socks5"]).unwrap();
    agent
        .wait_for(&["connected to the gateway"], Duration::from_secs(20))
        .unwrap();
    Sites {
        pki,
        dmz,
        dmz_args,
        connector,
        connector_args,
        squid,
        squid_opts,
        _hosts_dir: hosts_dir,
        agent,
        socks,
        web_port,
        echo_port,
        _web: web,
        _echo: echo,
        _web_outside: web_outside,
        web_outside_port,
        lb,
        topo,
    }
}

impl Sites {
    /// Another agent on the desktop, through the corporate proxy like the first, with extra
    /// arguments; returns it once connected, with its SOCKS5 address.
    fn another_agent(&self, name: &str, extra: &[&str]) -> (Proc, std::net::SocketAddr) {
        let prefix = if self.lb.is_some() { "/sallyport" } else { "" };
        let p = |f: &str| self.pki.p(f).display().to_string();
        let mut cmd = self.topo.cmd(Site::Desktop, bin("sallyport"));
        cmd.args([
            "run",
            "--gateway",
            &format!("wss://{GW_NAME}{prefix}/"),
            "--proxy",
            &format!("http://alice@{}:3128", Site::Proxy.ip()),
            "--socks",
            "127.0.0.1:0",
            "--http",
            "off",
            "--token-file",
            &p("alice-laptop.token"),
            "--ca",
            &p("ca.crt"),
        ])
        .args(extra)
        .env("SALLYPORT_PROXY_PASSWORD", "Corp-pw-1")
        .env("HOME", self.pki.dir.path());
        if self.lb.is_some() {
            cmd.args(["-c", &p("ping.toml")]);
        }
        let agent = Proc::spawn(name, &mut cmd).unwrap();
        let socks = agent.addr(&["listening", "socks5"]).unwrap();
        agent
            .wait_for(&["connected to the gateway"], Duration::from_secs(20))
            .unwrap();
        (agent, socks)
    }

    /// curl on the desktop through the SOCKS5 port `socks` to the internal web service's
    /// `path`, with more curl arguments before the URL.
    fn curl_via(
        &self,
        socks: std::net::SocketAddr,
        path: &str,
        args: &[&str],
    ) -> (i32, String, String) {
        let socks = socks.to_string();
        let url = format!("http://backend.internal:{}{path}", self.web_port);
        let mut all = vec!["-sS", "--max-time", "120", "--socks5-hostname", &socks];
        all.extend_from_slice(args);
        all.push(&url);
        self.topo.run(Site::Desktop, "curl", &all).unwrap()
    }

    /// curl on the desktop, through the agent, to the internal web service by name.
    fn curl_internal(&self) -> (i32, String, String) {
        self.topo
            .run(
                Site::Desktop,
                "curl",
                &[
                    "-sS",
                    "--max-time",
                    "10",
                    "--socks5-hostname",
                    &self.socks.to_string(),
                    &format!("http://backend.internal:{}/", self.web_port),
                ],
            )
            .unwrap()
    }

    /// Retries the internal request until it works; how long that took.
    fn works_again_within(&self, limit: Duration, what: &str) -> Duration {
        let started = Instant::now();
        loop {
            let (code, out, err) = self.curl_internal();
            if code == 0 && out == "hello from backend.internal\n" {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < limit,
                "after {what}, still failing after {limit:?}: {err}\nagent:\n{}",
                self.agent.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// `sallyport connect shell.internal PORT` on the desktop (ssh's `ProxyCommand`), its stdin and
/// stdout piped.
fn connect_to_shell(s: &Sites, stderr: Stdio) -> std::process::Child {
    s.topo
        .cmd(Site::Desktop, bin("sallyport"))
        .args([
            "connect",
            "shell.internal",
            &s.echo_port.to_string(),
            "--socks",
            &s.socks.to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .unwrap()
}

/// An interactive session (like ssh): `sallyport connect` on the desktop, lines typed with
/// pauses, each echoed back by the internal service.
fn interactive_session(s: &Sites) {
    interactive_session_with_pause(s, Duration::from_millis(300));
}

/// [`interactive_session`] with `pause` between keystrokes (longer than a load balancer's idle
/// timeout, to show the tunnel's pings keep the connection).
fn interactive_session_with_pause(s: &Sites, pause: Duration) {
    let mut child = connect_to_shell(s, Stdio::piped());
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let rounds = if pause > Duration::from_secs(1) { 2 } else { 5 };
    for i in 0..rounds {
        let line = format!("keystroke {i}\n");
        stdin.write_all(line.as_bytes()).unwrap();
        stdin.flush().unwrap();
        let mut back = String::new();
        stdout.read_line(&mut back).unwrap();
        assert_eq!(back, line, "the session died while idle");
        if i + 1 < rounds {
            std::thread::sleep(pause);
        }
    }
    drop(stdin);
    let _ = child.wait();
}

/// An interactive session held open across failures (issue 17): `sallyport connect`, ssh's
/// `ProxyCommand`, on the desktop; each keystroke must come back, on the same connection.
struct Keystrokes {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    lines: std::sync::mpsc::Receiver<String>,
    n: usize,
}

impl Keystrokes {
    fn start(s: &Sites) -> Keystrokes {
        let mut child = connect_to_shell(s, Stdio::null());
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || loop {
            let mut l = String::new();
            match stdout.read_line(&mut l) {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    if tx.send(l).is_err() {
                        return;
                    }
                }
            }
        });
        Keystrokes {
            child,
            stdin,
            lines,
            n: 0,
        }
    }

    fn echo(&mut self, s: &Sites, after: &str) {
        self.n += 1;
        let line = format!("keystroke {} {after}\n", self.n);
        let t = Instant::now();
        self.stdin.write_all(line.as_bytes()).unwrap();
        self.stdin.flush().unwrap();
        match self.lines.recv_timeout(Duration::from_secs(45)) {
            Ok(back) => assert_eq!(back, line),
            Err(e) => panic!("no echo {after} ({e})\n{}", s.agent.log()),
        }
        eprintln!("keystroke echoed {after} in {:?}", t.elapsed());
    }
}

impl Drop for Keystrokes {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn four_sites_only_443_leaves_and_nothing_listens_inside() {
    let mut s = start("four");

    // 1. curl and an interactive session reach internal services by internal names.
    let (code, out, err) = s.curl_internal();
    assert_eq!(
        (code, out.as_str()),
        (0, "hello from backend.internal\n"),
        "{err}\n{}",
        s.agent.log()
    );
    interactive_session(&s);

    // 2. The direct ways fail: desktop → DMZ, and DMZ → trusted site.
    let dmz_url = format!("https://{}/healthz", Site::Dmz.ip());
    let (code, _, err) = s
        .topo
        .run(
            Site::Desktop,
            "curl",
            &["-sSk", "--max-time", "3", &dmz_url],
        )
        .unwrap();
    assert_ne!(code, 0, "the desktop reached the DMZ directly");
    eprintln!("desktop → DMZ directly: curl exit {code}: {}", err.trim());
    // (the DMZ itself is up: from the proxy, which may use 443, the same URL answers)
    let (code, out, _) = s
        .topo
        .run(Site::Proxy, "curl", &["-sSk", "--max-time", "5", &dmz_url])
        .unwrap();
    assert!(
        code == 0 && out.starts_with("ok"),
        "the DMZ health check: {out}"
    );
    let inside = format!("http://{}:{}/", Site::Trusted.ip(), s.web_outside_port);
    let (code, _, err) = s
        .topo
        .run(Site::Dmz, "curl", &["-sS", "--max-time", "3", &inside])
        .unwrap();
    assert_ne!(code, 0, "the DMZ reached into the trusted site");
    eprintln!("DMZ → trusted site: curl exit {code}: {}", err.trim());
    let (code, out, _) = s
        .topo
        .run(Site::Trusted, "curl", &["-sS", "--max-time", "3", &inside])
        .unwrap();
    assert_eq!(
        (code, out.as_str()),
        (0, "hello from backend.internal\n"),
        "the service is there, on the trusted site"
    );

    // 3. Nothing of ours listens on the trusted site (the test services do).
    let (_, listening, _) = s.topo.run(Site::Trusted, "ss", &["-ltnpH"]).unwrap();
    assert!(
        !listening.contains("sallyport"),
        "the connector listens:\n{listening}"
    );
    assert!(listening.contains("sp-testsvc"), "{listening}");

    // 4. Failure and recovery, without touching the agent. An interactive session stays open
    // through the proxy's restart, the gateway's, and the desktop's link down for 10 s.
    let mut keys = Keystrokes::start(&s);
    keys.echo(&s, "before any failure");
    // The corporate proxy restarts. (Its log, written as tunnels end, proves the way the
    // session took: CONNECT to the gateway's name, as alice.)
    s.squid.kill();
    s.squid
        .wait_for_log(
            &["TCP_TUNNEL/200", &format!("CONNECT {GW_NAME}:443"), "alice"],
            Duration::from_secs(10),
        )
        .unwrap();
    s.squid = Squid::start_opts(
        "topo-squid2",
        SquidAuth::Basic {
            user: "alice",
            password: "Corp-pw-1",
        },
        &s.squid_opts,
    )
    .unwrap();
    let took = s.works_again_within(Duration::from_secs(20), "a proxy restart");
    eprintln!("proxy restart: new connections work again after {took:?}");
    s.agent
        .wait_for(&["gateway session lost"], Duration::from_secs(10))
        .unwrap();
    keys.echo(&s, "after a proxy restart");

    // The gateway restarts.
    s.dmz.kill();
    std::thread::sleep(Duration::from_secs(2));
    s.dmz = spawn_in(&s.topo, Site::Dmz, "dmz2", &gateway_bin(), &s.dmz_args);
    s.dmz
        .wait_for(&["dmz gateway listening"], Duration::from_secs(15))
        .unwrap();
    let took = s.works_again_within(Duration::from_secs(30), "a gateway restart");
    eprintln!("gateway restart: new connections work again after {took:?}");
    keys.echo(&s, "after a gateway restart");

    // The desktop's link goes down for 10 s and comes back.
    let ns = s.topo.ns(Site::Desktop);
    let link = |state: &str| {
        let ok = Command::new("ip")
            .args(["-n", &ns, "link", "set", "eth0", state])
            .status()
            .unwrap()
            .success();
        assert!(ok, "ip link set eth0 {state}");
    };
    // Setting a link down drops its routes; DHCP would give the default route back.
    let (_, default_route, _) = s
        .topo
        .run(Site::Desktop, "ip", &["route", "show", "default"])
        .unwrap();
    link("down");
    std::thread::sleep(Duration::from_secs(10));
    link("up");
    let mut args = vec!["-n", &ns, "route", "replace"];
    args.extend(default_route.split_whitespace());
    assert!(
        Command::new("ip").args(&args).status().unwrap().success(),
        "{args:?}"
    );
    keys.echo(&s, "after the link was down for 10 s");
    drop(keys);

    // The connector restarts.
    s.connector.kill();
    s.connector = spawn_in(
        &s.topo,
        Site::Trusted,
        "connector2",
        &gateway_bin(),
        &s.connector_args,
    );
    let took = s.works_again_within(Duration::from_secs(30), "a connector restart");
    eprintln!("connector restart: new connections work again after {took:?}");

    // Nothing was retried in a hot loop: a handful of reconnect attempts, not hundreds.
    let log = s.agent.log();
    let attempts = log.matches("cannot reach the gateway").count();
    assert!(attempts < 30, "{attempts} reconnect failures:\n{log}");
}

/// A TLS-inspecting corporate proxy (squid `ssl_bump`, re-signing with a corporate CA), an
/// agent with a **v1** bearer token deployed as the README showed before v2 (`--ca` with the
/// gateway's CA, no inner key):
/// - with the corporate CA in the desktop's trust store and upgrades allowed, the agent knows the
///   certificate is not issued by `--ca` and **does not send its token** (the measured leak:
///   it used to, and squid's header log showed it); it says why, naming the issuer, and
///   `doctor` reports the interception with a request for the proxy's admins;
/// - without that CA, the agent fails with a message naming the issuer it saw;
/// - with squid's default (upgrades stripped), no HTTP fallback either: the token stays home.
///
/// squid logs every request header here (`log_mime_hdrs on`); the token is never in it.
#[test]
fn through_a_tls_inspecting_proxy_the_token_is_never_sent() {
    let mut s = start("bump");
    // A v1 bearer token: the leak this pins down is v1's (a v2 token is never sent at all).
    s.pki.use_v1_token("agent", "alice-laptop").unwrap();
    // The DMZ reads its token files every 2 s; a refused agent would wait 5 s or more.
    s.dmz.wait_for_reload(&s.pki.p("agents.toml"), 2).unwrap();
    let (_ca, cert, key) = corp_ca_for_squid();
    let mut opts = s.squid_opts.clone();
    opts.extra.push_str("log_mime_hdrs on\n");
    let bump = |websocket: bool| bump_squid(&opts, "topo-bump", &cert, &key, websocket);
    s.squid.kill();
    s.squid = bump(true);
    let p = |f: &str| s.pki.p(f).display().to_string();
    let token = std::fs::read_to_string(s.pki.p("alice-laptop.token"))
        .unwrap()
        .trim()
        .to_string();
    let proxy = format!("http://{}:3128", Site::Proxy.ip());
    let gateway = format!("wss://{GW_NAME}/");
    let agent_cmd = |sub: &str, trust_corp_ca: bool| {
        let mut c = s.topo.cmd(Site::Desktop, bin("sallyport"));
        c.args([sub, "--gateway", &gateway, "--proxy", &proxy])
            .args([
                "--token-file",
                &p("alice-laptop.token"),
                "--ca",
                &p("ca.crt"),
            ])
            .env("HOME", s.pki.dir.path());
        if sub == "run" {
            c.args(["--socks", "127.0.0.1:0", "--http", "off"]);
        }
        if trust_corp_ca {
            // The desktop's trust store, as IT would have installed the corporate CA.
            c.env("SSL_CERT_FILE", &cert);
        }
        c
    };

    // Upgrades allowed, CA trusted: the TLS check passes, but the certificate is not the
    // gateway's: no token, and the reason names the issuer.
    let inspected = Proc::spawn("agent-inspected", &mut agent_cmd("run", true)).unwrap();
    inspected
        .wait_for(
            &["not sending the token", "issued by CN=Corp Inspection CA"],
            Duration::from_secs(20),
        )
        .unwrap();
    let (code, out, err) = run(&mut agent_cmd("doctor", true)).unwrap();
    assert_ne!(code, 0, "{out}{err}");
    assert!(out.contains("TLS on this path is intercepted"), "{out}");
    assert!(
        out.contains("re-signed by CN=Corp Inspection CA, O=Corp"),
        "{out}"
    );
    assert!(
        out.contains(&format!("please exempt {GW_NAME} from TLS inspection")),
        "{out}"
    );
    assert!(!inspected.log().contains("connected to the gateway"));

    // Without the corporate CA: the agent's error names the issuer it saw.
    let untrusting = Proc::spawn("agent-untrusting", &mut agent_cmd("run", false)).unwrap();
    untrusting
        .wait_for(
            &["UnknownIssuer", "issued by CN=Corp Inspection CA"],
            Duration::from_secs(20),
        )
        .unwrap();
    drop(untrusting);
    drop(inspected);

    // squid's default: upgrades stripped. No fallback sends the token either.
    s.squid.kill();
    s.squid = bump(false);
    let (code, out, err) = run(&mut agent_cmd("doctor", true)).unwrap();
    assert_ne!(code, 0, "{out}{err}");
    assert!(out.contains("not sending the token"), "{out}");
    assert!(out.contains("TLS on this path is intercepted"), "{out}");
    let fresh = Proc::spawn("agent-stripped", &mut agent_cmd("run", true)).unwrap();
    fresh
        .wait_for(&["not sending the token"], Duration::from_secs(20))
        .unwrap();
    drop(fresh);
    // squid logs a CONNECT when its tunnel ends: polled.
    let log = s
        .squid
        .wait_for_log(&["CONNECT"], Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("squid saw the agent's requests: {e}"));
    assert!(!log.contains(&token), "the token is in squid's log:\n{log}");
    let secret = token.rsplit('_').next().unwrap();
    assert!(
        !log.contains(secret),
        "the token's secret is in squid's log"
    );
}

/// The corporate CA of the TLS-inspection tests, in a folder squid's own user can read.
fn corp_ca_for_squid() -> (TempDir, std::path::PathBuf, std::path::PathBuf) {
    let ca = TempDir::new("corp-ca");
    std::fs::set_permissions(
        ca.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let (cert, key) = corp_ca(ca.path()).unwrap();
    (ca, cert, key)
}

/// A TLS-inspecting squid in the proxy site (`ssl_bump`, re-signing with the corporate CA);
/// squid's default strips WebSocket upgrades, `websocket` lets them through.
fn bump_squid(
    opts: &SquidOpts,
    tag: &str,
    cert: &std::path::Path,
    key: &std::path::Path,
    websocket: bool,
) -> Squid {
    let mut opts = opts.clone();
    if websocket {
        opts.extra
            .push_str("http_upgrade_request_protocols websocket allow all\n");
    }
    Squid::start_opts(
        tag,
        SquidAuth::Bump {
            ca_cert: cert,
            ca_key: key,
        },
        &opts,
    )
    .unwrap()
}

/// The same flows with TLS terminated by real nginx and HAProxy in the DMZ (the gateway plain
/// behind them, on the DMZ's loopback), with an idle timeout of 3 s: an interactive session
/// left idle for 7 s still works (the tunnel pings every second), and the gateway logs the real
/// client addresses — the corporate proxy's for the agent, the trusted site's for the
/// connector — from the load balancer's `X-Forwarded-For`, which it trusts from 127.0.0.1 only.
/// An agent on the HTTP fallback transport works through both as well.
#[test]
fn behind_nginx_and_haproxy_in_the_dmz() {
    for kind in [LbKind::Nginx, LbKind::Haproxy] {
        let s = start_with(&format!("{kind:?}").to_lowercase(), Some(kind));
        let lb = s.lb.as_ref().unwrap();
        let (code, out, err) = s.curl_internal();
        assert_eq!(
            (code, out.as_str()),
            (0, "hello from backend.internal\n"),
            "{}: {err}\n{}",
            lb.name(),
            s.agent.log()
        );
        interactive_session_with_pause(&s, Duration::from_secs(7));
        let log = s.dmz.log();
        let proxy_ip = Site::Proxy.ip().to_string();
        let trusted_ip = Site::Trusted.ip().to_string();
        assert!(
            log.lines()
                .any(|l| l.contains("agent session up") && l.contains(&proxy_ip)),
            "{}: the agent's real address is not logged:\n{log}",
            lb.name()
        );
        assert!(
            log.lines()
                .any(|l| l.contains("connector session up") && l.contains(&trusted_ip)),
            "{}: the connector's real address is not logged:\n{log}",
            lb.name()
        );
        assert!(
            !s.agent.log().contains("gateway session lost"),
            "{}: the idle session was cut:\n{}",
            lb.name(),
            s.agent.log()
        );
        // The HTTP fallback transport through the same load balancer (its idle timeout of
        // 3 s is shorter than the streamed GET's keepalive: the tunnel's pings keep it busy,
        // and a cut GET is resumed without loss).
        let (agent, socks) = s.another_agent("agent-http", &["--transport", "http"]);
        let (code, out, err) = s.curl_via(socks, "/", &[]);
        assert_eq!(
            (code, out.as_str()),
            (0, "hello from backend.internal\n"),
            "{}: HTTP transport: {err}\n{}",
            lb.name(),
            agent.log()
        );
        std::thread::sleep(Duration::from_secs(5));
        let (code, out, err) = s.curl_via(socks, "/", &[]);
        assert_eq!(
            (code, out.as_str()),
            (0, "hello from backend.internal\n"),
            "{}: HTTP transport after 5 s: {err}\n{}",
            lb.name(),
            agent.log()
        );
        assert!(
            !agent.log().contains("gateway session lost"),
            "{}: {}",
            lb.name(),
            agent.log()
        );
        eprintln!("{}: ok", lb.name());
    }
}

/// Protocol v2 through a TLS-inspecting squid (`ssl_bump`, re-signing with a corporate CA), in
/// the four ways a desktop meets one: upgrades stripped (squid's default) or allowed, each with
/// the desktop trusting the corporate CA or not. The agent runs as the README deploys it: the
/// token and nothing else (no `--ca`, no key, no pin). The gateway runs plain behind nginx in
/// the DMZ, where a capture of nginx → gateway shows exactly what squid forwarded, decrypted.
/// In every case:
/// - the session comes up sealed (HTTP fallback when upgrades are stripped, WebSocket when
///   not), and 20 MiB go each way, hash-checked; an interactive session echoes at once;
/// - the capture holds no token, no key derived from it, no user id and no payload bytes (while
///   it does show the forwarded requests in clear: the check would see them), and squid's log
///   holds no token.
#[test]
fn through_a_tls_inspecting_proxy_v2_is_sealed_in_all_four_cases_and_leaks_nothing() {
    require_tool("tcpdump");
    let mut s = start_with("bump-v2", Some(LbKind::Nginx));
    let (_ca, cert, key) = corp_ca_for_squid();
    let bump = |websocket: bool| bump_squid(&s.squid_opts, "topo-bump-v2", &cert, &key, websocket);
    s.agent.kill();
    s.squid.kill();
    let token_text = std::fs::read_to_string(s.pki.p("alice-laptop.token"))
        .unwrap()
        .trim()
        .to_string();
    let token: tunnel::token::Token = token_text.parse().unwrap();

    // Everything nginx forwards to the gateway, in clear.
    let cap_dir = TempDir::new("bump-v2-capture");
    let pcap = cap_dir.path().join("dmz.pcap");
    let mut tcpdump = Proc::spawn(
        "tcpdump",
        s.topo
            .cmd(Site::Dmz, "tcpdump")
            .args(["-i", "lo", "-U", "-s", "0", "-Z", "root", "-w"])
            .arg(&pcap)
            .args(["tcp", "port", "8080"]),
    )
    .unwrap();
    tcpdump
        .wait_for(&["listening on"], Duration::from_secs(10))
        .unwrap();

    let p = |f: &str| s.pki.p(f).display().to_string();
    // Pings every second (nginx cuts idle connections after 3 s).
    std::fs::write(s.pki.p("bumped.toml"), "[tunnel]\nping_interval = \"1s\"\n").unwrap();
    const N: u64 = 20 * 1024 * 1024;
    for (websocket, trusted) in [(false, true), (false, false), (true, true), (true, false)] {
        s.squid.kill();
        s.squid = bump(websocket);
        let name = format!(
            "agent-{}-{}",
            if websocket { "ws" } else { "stripped" },
            if trusted { "trusting" } else { "untrusting" }
        );
        let mut c = s.topo.cmd(Site::Desktop, bin("sallyport"));
        c.args([
            "run",
            "--gateway",
            &format!("wss://{GW_NAME}/sallyport/"),
            "--proxy",
            &format!("http://{}:3128", Site::Proxy.ip()),
            "--socks",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--token-file",
            &p("alice-laptop.token"),
            "-c",
            &p("bumped.toml"),
        ])
        .env("HOME", s.pki.dir.path());
        if trusted {
            // The desktop's trust store, as IT would have installed the corporate CA.
            c.env("SSL_CERT_FILE", &cert);
        }
        let agent = Proc::spawn(&name, &mut c).unwrap();
        let socks = agent.addr(&["listening", "socks5"]).unwrap();
        let http = agent.addr(&["listening", "http"]).unwrap();
        let line = agent
            .wait_for(&["connected to the gateway"], Duration::from_secs(30))
            .unwrap();
        let want = if websocket {
            "websocket, v2 sealed"
        } else {
            "http, v2 sealed"
        };
        assert!(line.contains(want), "{name}: {line}");

        let started = Instant::now();
        let down = cap_dir.path().join("down.bin");
        let (code, _, err) = s.curl_via(
            socks,
            &format!("/bytes/{N}"),
            &["-o", &down.display().to_string()],
        );
        assert_eq!(code, 0, "{name}: {err}\n{}", agent.log());
        assert_eq!(sha256_file(&down).unwrap(), pattern_sha256(N), "{name}");
        let up = cap_dir.path().join("up.bin");
        write_pattern_file(&up, N).unwrap();
        let (code, out, err) = s
            .topo
            .run(
                Site::Desktop,
                "curl",
                &[
                    "-sS",
                    "--max-time",
                    "120",
                    "-p",
                    "-x",
                    &format!("http://{http}"),
                    "--data-binary",
                    &format!("@{}", up.display()),
                    "-H",
                    "Expect:",
                    &format!("http://backend.internal:{}/sha256", s.web_port),
                ],
            )
            .unwrap();
        assert_eq!(code, 0, "{name}: {err}\n{}", agent.log());
        assert_eq!(out, pattern_sha256(N), "{name}");
        eprintln!(
            "{name}: 20 MiB each way through ssl_bump squid, {want}, in {:?}",
            started.elapsed()
        );
        if !websocket && trusted {
            // Interactive: keystrokes echo at once.
            let mut child = s
                .topo
                .cmd(Site::Desktop, bin("sallyport"))
                .args([
                    "connect",
                    "shell.internal",
                    &s.echo_port.to_string(),
                    "--socks",
                    &socks.to_string(),
                ])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let mut stdin = child.stdin.take().unwrap();
            let mut stdout = BufReader::new(child.stdout.take().unwrap());
            let mut worst = Duration::ZERO;
            for i in 0..10 {
                let line = format!("keystroke {i}\n");
                let t = Instant::now();
                stdin.write_all(line.as_bytes()).unwrap();
                stdin.flush().unwrap();
                let mut back = String::new();
                stdout.read_line(&mut back).unwrap();
                assert_eq!(back, line);
                worst = worst.max(t.elapsed());
                std::thread::sleep(Duration::from_millis(200));
            }
            drop(stdin);
            let _ = child.wait();
            eprintln!("slowest keystroke round trip: {worst:?}");
            assert!(worst < Duration::from_secs(2), "{worst:?}");
        }
        assert!(
            !agent.log().contains(&token_text),
            "the agent logged its token"
        );
        drop(agent);
    }
    std::thread::sleep(Duration::from_millis(500));
    tcpdump.terminate(Duration::from_secs(5));

    // What squid saw and forwarded. Only the agents' connections count (each with requests for
    // /sallyport/agent…); the connector's session also passes nginx → gateway and carries the
    // payload, as it must.
    let flows = tcp_flows(&std::fs::read(&pcap).unwrap(), 8080);
    let contains = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
    let capture: Vec<u8> = flows
        .values()
        .filter(|f| contains(f, b"/sallyport/agent"))
        .flatten()
        .copied()
        .collect();
    assert!(
        contains(&capture, b"POST /sallyport/agent/http?v=2"),
        "the capture does not show the forwarded fallback requests: it would prove nothing ({} bytes)",
        capture.len()
    );
    assert!(
        contains(&capture, b"GET /sallyport/agent"),
        "the capture does not show the forwarded upgrades"
    );
    let secrets: [(&str, Vec<u8>); 5] = [
        ("token", token_text.as_bytes().to_vec()),
        ("part of the token", token_text.as_bytes()[4..40].to_vec()),
        ("the agent's private key", token.private_key().to_vec()),
        ("the agent's public key", token.claims().agent_key.to_vec()),
        ("the token id", b"alice-laptop".to_vec()),
    ];
    for (what, needle) in &secrets {
        assert!(!contains(&capture, needle), "{what} in the capture");
    }
    let mut window = [0u8; 32];
    for i in 0..16u64 {
        let off = i * (N / 16) + 12_345;
        pattern(off, &mut window);
        assert!(
            !contains(&capture, &window),
            "payload bytes (offset {off}) in the capture"
        );
    }
    let access = s
        .squid
        .wait_for_log(&["CONNECT"], Duration::from_secs(10))
        .unwrap();
    assert!(!access.contains(&token_text[4..40]), "token in squid's log");
}

/// The TCP payload of each connection to or from `port` in a pcap file (Ethernet, IPv4), keyed
/// by the other port, in capture order (on loopback nothing is reordered).
fn tcp_flows(pcap: &[u8], port: u16) -> std::collections::HashMap<u16, Vec<u8>> {
    let mut flows: std::collections::HashMap<u16, Vec<u8>> = Default::default();
    let mut at = 24;
    while at + 16 <= pcap.len() {
        let incl = u32::from_le_bytes(pcap[at + 8..at + 12].try_into().unwrap()) as usize;
        let pkt = &pcap[at + 16..(at + 16 + incl).min(pcap.len())];
        at += 16 + incl;
        // Ethernet, IPv4 only.
        if pkt.len() < 14 + 20 || pkt[12..14] != [0x08, 0x00] {
            continue;
        }
        let ip = &pkt[14..];
        let ihl = ((ip[0] & 0x0f) as usize) * 4;
        let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
        if ip[9] != 6 || ip.len() < ihl + 20 {
            continue;
        }
        let tcp = &ip[ihl..total.min(ip.len())];
        let (src, dst) = (
            u16::from_be_bytes([tcp[0], tcp[1]]),
            u16::from_be_bytes([tcp[2], tcp[3]]),
        );
        let off = ((tcp[12] >> 4) as usize) * 4;
        let other = if src == port { dst } else { src };
        if let Some(data) = tcp.get(off..) {
            flows.entry(other).or_default().extend_from_slice(data);
        }
    }
    flows
}

// ---------------------------------------------------------------------------------------------
// Several DMZ instances behind HAProxy, two trusted sites

/// The instances' stable names (a StatefulSet's, say): each has its own path through HAProxy,
/// `/i/NAME/`, for connectors.
const INSTANCES: [&str; 2] = ["dmz-1", "dmz-2"];
/// The trusted sites: site, connector token id, the name its service answers to.
const SITES: [(Site, &str, &str); 2] = [
    (Site::Trusted, "site-a", "a.internal"),
    (Site::TrustedB, "site-b", "b.internal"),
];
/// HAProxy's health check interval here (a draining instance is out after two failed checks,
/// well within its drain delay of 2 s).
const CHECK_INTERVAL: Duration = Duration::from_millis(500);

/// Two DMZ instances behind HAProxy in the DMZ, a connector in each of two trusted sites, and
/// agents on the desktop. Fields drop in order: agents, connectors, HAProxy, the instances,
/// the services, then the namespaces.
struct Cluster {
    agents: Vec<ClusterAgent>,
    connectors: Vec<Proc>,
    lb: Box<dyn LoadBalancer>,
    dmz: Vec<Proc>,
    dmz_args: Vec<Vec<String>>,
    _services: Vec<Proc>,
    /// The port of each site's service (`a.internal`, `b.internal`), in [`SITES`] order.
    ports: Vec<u16>,
    pki: Pki,
    topo: Topology,
}

struct ClusterAgent {
    proc: Proc,
    socks: std::net::SocketAddr,
}

impl ClusterAgent {
    /// The DMZ instance its latest session is on (`dmz=` of its "connected to the gateway").
    fn instance(&self) -> usize {
        let log = self.proc.log();
        let line = log
            .lines()
            .rev()
            .find(|l| l.contains("connected to the gateway"))
            .expect("a session");
        let dmz = field(line, "dmz").unwrap_or_default();
        INSTANCES
            .iter()
            .position(|n| *n == dmz)
            .unwrap_or_else(|| panic!("no known instance in `{line}`"))
    }

    fn sessions(&self) -> usize {
        self.proc.log().matches("connected to the gateway").count()
    }
}

fn start_cluster() -> Cluster {
    require_tool("curl");
    let topo = Topology::with_layout("sites", Layout::TwoSites).unwrap();
    let dmz_ip = Site::Dmz.ip().to_string();
    let pki = Pki::with_names("sites", &[GW_NAME, &dmz_ip]).unwrap();
    pki.token("agent", "alice-laptop", &["--name", "alice"])
        .unwrap();
    for (_, id, host) in SITES {
        pki.token("connector", id, &["--route", &format!("{host}:*")])
            .unwrap();
    }
    let p = |f: &str| pki.p(f).display().to_string();
    let mut services = Vec::new();
    let mut ports = Vec::new();
    for (site, _, host) in SITES {
        let (s, port) = service_in(&topo, site, host, "http", "127.0.0.1:0");
        ports.push(port);
        services.push(s);
    }
    // The instances, plain on the DMZ host's loopback; one after the other (the first creates
    // the inner key they share).
    let upstreams: Vec<std::net::SocketAddr> = (0..INSTANCES.len())
        .map(|i| format!("127.0.0.1:{}", 8081 + i).parse().unwrap())
        .collect();
    let dmz_args: Vec<Vec<String>> = INSTANCES
        .iter()
        .zip(&upstreams)
        .map(|(name, addr)| {
            let (agents, connectors) = (p("agents.toml"), p("connectors.toml"));
            let addr = addr.to_string();
            [
                "dmz",
                "--plain",
                "--listen",
                addr.as_str(),
                "--prefix",
                "/sallyport",
                "--trusted-proxy",
                "127.0.0.1/32",
                "--instance-id",
                name,
                "--drain-delay",
                "2s",
                "--agent-tokens",
                agents.as_str(),
                "--connector-tokens",
                connectors.as_str(),
            ]
            .iter()
            .map(|a| a.to_string())
            .collect()
        })
        .collect();
    let dmz: Vec<Proc> = INSTANCES
        .iter()
        .zip(&dmz_args)
        .map(|(name, args)| {
            let d = spawn_in(&topo, Site::Dmz, name, &gateway_bin(), args);
            d.wait_for(&["dmz gateway listening"], Duration::from_secs(15))
                .unwrap();
            d
        })
        .collect();
    // HAProxy on the DMZ's 443, configured as docs/deploy.md shows for several instances.
    let (cert, key) = (pki.p("gateway.crt"), pki.p("gateway.key"));
    let dmz_ns = topo.ns(Site::Dmz);
    let lb = LbKind::Haproxy
        .start(&LbConfig {
            listen: format!("{dmz_ip}:443").parse().unwrap(),
            netns: Some(&dmz_ns),
            more_upstreams: upstreams[1..].to_vec(),
            instances: INSTANCES.to_vec(),
            check_interval: CHECK_INTERVAL,
            ..LbConfig::new(upstreams[0], &cert, &key)
        })
        .unwrap();
    // A connector in each trusted site, to every instance by its own path through HAProxy (the
    // only thing the site may reach).
    let connectors: Vec<Proc> = SITES
        .iter()
        .zip(&ports)
        .map(|((site, id, host), port)| {
            let mut args: Vec<String> = vec!["connector".into()];
            for name in INSTANCES {
                args.extend(["--gateway".into(), format!("wss://{dmz_ip}/i/{name}/")]);
            }
            args.extend([
                "--token-file".into(),
                p(&format!("{id}.token")),
                "--ca".into(),
                p("ca.crt"),
                "--proxy".into(),
                "direct".into(),
                "--advertise".into(),
                format!("{host}:*"),
                "--allow".into(),
                format!("{host}:{port}"),
                "--allow".into(),
                format!("127.0.0.1/32:{port}"),
                "--host".into(),
                format!("{host}=127.0.0.1"),
                "--instance-id".into(),
                format!("connector-{id}"),
            ]);
            spawn_in(
                &topo,
                *site,
                &format!("connector-{id}"),
                &gateway_bin(),
                &args,
            )
        })
        .collect();
    let (token, ca) = (p("alice-laptop.token"), p("ca.crt"));
    let mut c = Cluster {
        agents: Vec::new(),
        connectors,
        lb,
        dmz,
        dmz_args,
        _services: services,
        ports,
        pki,
        topo,
    };
    for i in 0..INSTANCES.len() {
        c.wait_connectors(i);
    }
    // Agents on the desktop: two with the balancer's one URL (round robin puts them on
    // different instances), and one with both instances' own URLs (it fails over down its
    // list), the one no agent is on yet first.
    let balanced = vec![
        "--gateway".to_string(),
        format!("wss://{dmz_ip}/sallyport/"),
    ];
    for i in 0..3 {
        let gateways = if i < 2 {
            balanced.clone()
        } else {
            let on: Vec<usize> = c.agents.iter().map(ClusterAgent::instance).collect();
            let mut order: Vec<usize> = (0..INSTANCES.len()).collect();
            order.sort_by_key(|k| on.contains(k));
            order
                .iter()
                .flat_map(|k| {
                    [
                        "--gateway".to_string(),
                        format!("wss://{dmz_ip}/i/{}/", INSTANCES[*k]),
                    ]
                })
                .collect()
        };
        let mut cmd = c.topo.cmd(Site::Desktop, bin("sallyport"));
        cmd.arg("run")
            .args(&gateways)
            .args([
                "--socks",
                "127.0.0.1:0",
                "--http",
                "off",
                "--proxy",
                "direct",
            ])
            .args(["--token-file", &token, "--ca", &ca])
            .env("HOME", c.pki.dir.path());
        let proc = Proc::spawn(&format!("agent-{}", i + 1), &mut cmd).unwrap();
        let socks = proc.addr(&["listening", "socks5"]).unwrap();
        proc.wait_for(&["connected to the gateway"], Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
        c.agents.push(ClusterAgent { proc, socks });
    }
    c
}

impl Cluster {
    /// Waits until instance `i` (its current process) has a session from every site's connector.
    fn wait_connectors(&self, i: usize) {
        for (_, id, _) in SITES {
            self.dmz[i]
                .wait_for(
                    &["connector routes", &format!("connector={id}")],
                    Duration::from_secs(20),
                )
                .unwrap_or_else(|e| panic!("{e}\n{}", self.logs()));
        }
    }

    /// `GET /` of site `site`'s service through an agent's SOCKS5 port, on the desktop.
    fn fetch(&self, agent: &ClusterAgent, site: usize) -> Result<(), String> {
        fetch_via(&self.topo, agent.socks, &self.ports, site)
            .map_err(|e| format!("{e} (via {})", agent.proc.name))
    }

    /// Whether HAProxy has instance `i` in its pool: every "is DOWN" it logged for it was
    /// followed by an "is UP".
    fn in_pool(&self, i: usize) -> bool {
        let log = self.lb.log();
        let says = |state: &str| {
            log.matches(&format!("be_sallyport/{} is {state}", INSTANCES[i]))
                .count()
        };
        says("DOWN") == says("UP")
    }

    /// Waits until HAProxy has (`true`) or has not instance `i` in its pool.
    fn wait_pool(&self, i: usize, want: bool) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while self.in_pool(i) != want {
            assert!(
                Instant::now() < deadline,
                "HAProxy never took {} {}\n{}",
                INSTANCES[i],
                if want { "back" } else { "out" },
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts instance `i` again (same arguments), once HAProxy has taken the old one out, and
    /// waits until it is ready to take agents: listening, both sites' connectors attached, and
    /// back in HAProxy's pool.
    fn restart(&mut self, i: usize) {
        self.wait_pool(i, false);
        self.dmz[i] = spawn_in(
            &self.topo,
            Site::Dmz,
            &format!("{}-again", INSTANCES[i]),
            &gateway_bin(),
            &self.dmz_args[i],
        );
        self.wait_connectors(i);
        self.wait_pool(i, true);
    }

    fn logs(&self) -> String {
        let mut out = format!("--- haproxy\n{}\n{}", self.lb.config_text(), self.lb.log());
        for p in self
            .dmz
            .iter()
            .chain(&self.connectors)
            .chain(self.agents.iter().map(|a| &a.proc))
        {
            out.push_str(&format!("\n--- {}\n{}", p.name, p.log()));
        }
        out
    }
}

/// `GET /` of site `site`'s service (`ports` in [`SITES`] order) through the SOCKS5 port
/// `socks`, on the desktop.
fn fetch_via(
    topo: &Topology,
    socks: std::net::SocketAddr,
    ports: &[u16],
    site: usize,
) -> Result<(), String> {
    let url = format!("http://{}:{}/", SITES[site].2, ports[site]);
    let socks = socks.to_string();
    let (code, out, err) = topo
        .run(
            Site::Desktop,
            "curl",
            &["-sS", "--max-time", "5", "--socks5-hostname", &socks, &url],
        )
        .unwrap();
    if code == 0 && out == "hello from backend.internal\n" {
        Ok(())
    } else {
        Err(format!("{url}: curl exit {code}: {err}"))
    }
}

/// A client on the desktop opening new connections through `agent` the whole time, to both
/// sites in turn, until `stop` exists: one line per connection on stderr.
fn client_loop(c: &Cluster, agent: &ClusterAgent, stop: &std::path::Path) -> Proc {
    let script = r#"
while [ ! -e "$1" ]; do
  for t in "a.internal:$3" "b.internal:$4"; do
    out=$(curl -sS --max-time 10 --socks5-hostname "$2" "http://$t/" 2>&1)
    if [ "$out" = "hello from backend.internal" ]; then
      echo "fetch ok $t" >&2
    else
      echo "fetch FAILED $t: $out" >&2
    fi
  done
done
echo "loop done" >&2
"#;
    Proc::spawn(
        &format!("loop-{}", agent.proc.name),
        c.topo.cmd(Site::Desktop, "bash").args([
            "-c",
            script,
            "client-loop",
            &stop.display().to_string(),
            &agent.socks.to_string(),
            &c.ports[0].to_string(),
            &c.ports[1].to_string(),
        ]),
    )
    .unwrap()
}

/// Several DMZ instances behind a real HAProxy on the DMZ's 443 (TLS there, the instances
/// `--plain`, configured as docs/deploy.md shows), two trusted sites that may each reach only
/// that 443, each with a connector that reaches every instance by the instance's own path
/// (`/i/dmz-1/`, `/i/dmz-2/`), and agents on a desktop that may reach only that 443:
/// - agents reach `a.internal` (site A) and `b.internal` (site B) through either instance;
/// - `kill -9` of one instance during transfers: new connections from every agent work again
///   within the reconnect budget, and the transfers on the other instance complete intact;
/// - a rolling SIGTERM restart of both instances (each back, with its connectors, before the
///   next stops; HAProxy checks `/readyz`) loses no new connection of a client that opens them
///   the whole time.
#[test]
fn two_sites_reach_through_either_instance_behind_haproxy_and_survive_a_kill_and_a_rolling_restart()
{
    let started = Instant::now();
    let mut c = start_cluster();
    eprintln!("set up in {:?}", started.elapsed());

    // 1. Both sites through either instance.
    let on: Vec<usize> = c.agents.iter().map(ClusterAgent::instance).collect();
    for (i, name) in INSTANCES.iter().enumerate() {
        assert!(on.contains(&i), "no agent on {name} ({on:?})\n{}", c.logs());
    }
    for a in &c.agents {
        for site in 0..SITES.len() {
            c.fetch(a, site)
                .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
        }
    }
    for d in &c.dmz {
        for (_, id, host) in SITES {
            d.wait_for(
                &[
                    "stream open",
                    &format!("dest={host}:"),
                    &format!("connector={id}"),
                ],
                Duration::from_secs(10),
            )
            .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
        }
    }
    // Each site's connector served its own name only.
    for (k, (_, _, host)) in SITES.iter().enumerate() {
        c.connectors[k]
            .wait_for(&[&format!("dest={host}:")], Duration::from_secs(10))
            .unwrap();
        // Read once, now that the log is read past this connector's own streams.
        let log = c.connectors[k].log();
        let other = SITES[1 - k].2;
        assert!(!log.contains(&format!("dest={other}:")), "{log}");
    }
    eprintln!(
        "agents on {:?}; both sites reached through both instances",
        on.iter().map(|i| INSTANCES[*i]).collect::<Vec<_>>()
    );

    // 2. kill -9 of the first agent's instance, with two transfers running through every agent.
    const N: u64 = 3 * 1024 * 1024;
    let dir = TempDir::new("sites-transfers");
    let transfers: Vec<(usize, usize, std::process::Child, std::path::PathBuf)> = c
        .agents
        .iter()
        .enumerate()
        .flat_map(|(k, a)| (0..SITES.len()).map(move |site| (k, a, site)))
        .map(|(k, a, site)| {
            let file = dir.path().join(format!("agent{k}-site{site}.bin"));
            let child = c
                .topo
                .cmd(Site::Desktop, "curl")
                .args(["-sS", "--max-time", "60", "--limit-rate", "1M", "-o"])
                .arg(&file)
                .args(["--socks5-hostname", &a.socks.to_string()])
                .arg(format!(
                    "http://{}:{}/bytes/{N}",
                    SITES[site].2, c.ports[site]
                ))
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            (k, site, child, file)
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while transfers
        .iter()
        .any(|(_, _, _, f)| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0) < 128 * 1024)
    {
        assert!(
            Instant::now() < deadline,
            "transfers did not start\n{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let victim = on[0];
    c.dmz[victim].kill();
    let killed = Instant::now();
    let budget = uplink::keep::RECONNECT_BUDGET;
    let recovered: Vec<Result<Duration, String>> = std::thread::scope(|scope| {
        let (topo, ports) = (&c.topo, &c.ports);
        let handles: Vec<_> = c
            .agents
            .iter()
            .map(|a| {
                let socks = a.socks;
                scope.spawn(move || loop {
                    let r =
                        (0..SITES.len()).try_for_each(|site| fetch_via(topo, socks, ports, site));
                    match r {
                        Ok(()) => return Ok(killed.elapsed()),
                        Err(e) if killed.elapsed() > budget => return Err(e),
                        Err(_) => std::thread::sleep(Duration::from_millis(50)),
                    }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (k, (a, r)) in c.agents.iter().zip(&recovered).enumerate() {
        match r {
            Ok(t) => eprintln!(
                "kill -9 of {}: {} (was on {}) reaches both sites again after {t:?} (budget {budget:?})",
                INSTANCES[victim],
                a.proc.name,
                INSTANCES[on[k]]
            ),
            Err(e) => panic!(
                "{}: no new connection within {budget:?} of the kill: {e}\n{}",
                a.proc.name,
                c.logs()
            ),
        }
    }
    // Back, while the transfers on the other instance run on.
    c.restart(victim);
    eprintln!(
        "{} back (connectors attached, in HAProxy's pool) {:?} after the kill",
        INSTANCES[victim],
        killed.elapsed()
    );
    for (k, site, child, file) in transfers {
        let out = child.wait_with_output().unwrap();
        let name = &c.agents[k].proc.name;
        if on[k] == victim {
            eprintln!(
                "{name} → {}: cut with its instance (curl exit {:?})",
                SITES[site].2,
                out.status.code()
            );
            continue;
        }
        assert!(
            out.status.success(),
            "{name} → {} on the other instance: {}\n{}",
            SITES[site].2,
            String::from_utf8_lossy(&out.stderr),
            c.logs()
        );
        assert_eq!(
            sha256_file(&file).unwrap(),
            pattern_sha256(N),
            "{name} → {}",
            SITES[site].2
        );
    }
    for (k, a) in c.agents.iter().enumerate() {
        if on[k] != victim {
            assert!(
                !a.proc.log().contains("gateway session lost"),
                "{}\n{}",
                a.proc.name,
                a.proc.log()
            );
        }
    }

    // 3. A rolling SIGTERM restart of both, while a client opens new connections through
    // every agent the whole time.
    let stop = dir.path().join("stop");
    let loops: Vec<Proc> = c.agents.iter().map(|a| client_loop(&c, a, &stop)).collect();
    let before: Vec<usize> = c.agents.iter().map(ClusterAgent::sessions).collect();
    // Every client is under way before the first instance stops, and still gets answers
    // after the last one is back.
    let answers_after = |done: &[usize]| {
        for (l, n) in loops.iter().zip(done) {
            let deadline = Instant::now() + Duration::from_secs(10);
            while l.log().matches("fetch ok").count() <= *n {
                assert!(Instant::now() < deadline, "{}: {}", l.name, l.log());
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    answers_after(&vec![0; loops.len()]);
    let rolling = Instant::now();
    for (i, name) in INSTANCES.iter().enumerate() {
        c.dmz[i].terminate(Duration::from_secs(30));
        c.restart(i);
        eprintln!("{name} restarted, at {:?}", rolling.elapsed());
    }
    let done: Vec<usize> = loops
        .iter()
        .map(|l| l.log().matches("fetch ok").count())
        .collect();
    answers_after(&done);
    std::fs::write(&stop, "").unwrap();
    let mut total = 0;
    for l in &loops {
        l.wait_for(&["loop done"], Duration::from_secs(20)).unwrap();
        let log = l.log();
        let failed: Vec<&str> = log.lines().filter(|x| x.contains("fetch FAILED")).collect();
        let ok = log.matches("fetch ok").count();
        assert!(
            failed.is_empty(),
            "{}: {} of {} new connections failed during the rolling restart:\n{}\n{}",
            l.name,
            failed.len(),
            failed.len() + ok,
            failed.join("\n"),
            c.logs()
        );
        assert!(ok > 10, "{}: only {ok} connections", l.name);
        total += ok;
    }
    for (a, b) in c.agents.iter().zip(&before) {
        eventually(Duration::from_secs(10), || a.sessions(), |n| n > b);
        assert!(
            a.sessions() > *b,
            "{} never moved\n{}",
            a.proc.name,
            a.proc.log()
        );
    }
    eprintln!(
        "rolling restart of both instances in {:?}: {total} new connections, none failed; whole test {:?}",
        rolling.elapsed(),
        started.elapsed()
    );
}

/// Agents in [`a_reconnect_storm_of_200_agents_behind_one_nat_comes_back_within_the_grace`]:
/// the issue's 5,000 desktops behind one corporate NAT, scaled down.
const STORM_AGENTS: u16 = 200;
/// Their forwards listen on consecutive ports from this one (in the desktop's namespace).
const STORM_FIRST_PORT: u16 = 21_000;
/// The DMZ's per-address handshake budget, scaled down with the agents (× 200 / 5,000): the
/// defaults (20/s after a burst of 64) against 5,000 desktops are these against 200. Without
/// refunds, 200 handshakes at 0.8/s would take 246 s, as 5,000 would at 20/s.
const STORM_RATE: f64 = 0.8;
/// The burst of the same budget: 64 × 200 / 5,000, rounded up.
const STORM_BURST: f64 = 3.0;
/// The grace within which suspended streams may resume (issue 17): what the storm must fit in.
const RESUME_GRACE: Duration = Duration::from_secs(60);

/// `sallyport_sessions{role="agent"}` of the DMZ, from its admin listener (`None`: not
/// answering yet).
fn dmz_agent_sessions(topo: &Topology) -> Option<u64> {
    let (code, out, _) = topo
        .run(
            Site::Dmz,
            "curl",
            &["-sS", "--max-time", "2", "http://127.0.0.1:9090/metrics"],
        )
        .ok()?;
    if code != 0 {
        return None;
    }
    out.lines()
        .find_map(|l| l.strip_prefix("sallyport_sessions{role=\"agent\"} "))
        .and_then(|n| n.trim().parse().ok())
}

/// Polls the DMZ until `n` agents have a session; how long that took from `since`. Fails after
/// `within`, naming how many came back.
fn all_agents_up(
    topo: &Topology,
    n: u64,
    since: Instant,
    within: Duration,
    dmz: &Proc,
) -> Duration {
    let mut seen = None;
    loop {
        seen = dmz_agent_sessions(topo).or(seen);
        if seen == Some(n) {
            return since.elapsed();
        }
        assert!(
            since.elapsed() < within,
            "only {seen:?} of {n} agents had a session after {within:?}; DMZ log tail:\n{}",
            tail(&dmz.log(), 30)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn tail(log: &str, lines: usize) -> String {
    let all: Vec<&str> = log.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// One command to `sp-testsvc hold` and its one-line answer.
fn hold_says(hold: &mut std::process::Child, out: &mut impl BufRead, cmd: Option<&str>) -> String {
    if let Some(cmd) = cmd {
        let stdin = hold.stdin.as_mut().expect("hold's stdin");
        writeln!(stdin, "{cmd}").unwrap();
        stdin.flush().unwrap();
    }
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    line.trim().to_string()
}

/// Issue 17, "Mass reconnects": 200 real agents (`sallyport run`, each its own token and a
/// static forward) on a corporate site whose traffic to the DMZ is masqueraded to one address
/// (nftables NAT in the router), each holding an open connection through its forward to an echo
/// service on the trusted site. The DMZ, with its per-address handshake budget scaled down with
/// the agents, is killed (`kill -9`) and restarted; every agent must have a session again
/// within the 60 s resume grace, and every held connection keeps echoing (resumed). Without the refund of authenticated handshakes this takes
/// about 250 s (the budget's rate); without the agents' reconnect spread, the handshakes beyond
/// the burst are refused and retried. Prints the measured time (scaled to 5,000 in
/// `docs/deploy.md`, "Reconnect storms"); never asserts it beyond the grace.
#[test]
fn a_reconnect_storm_of_200_agents_behind_one_nat_comes_back_within_the_grace() {
    require_tool("curl");
    require_tool("ss");
    let topo = Topology::with_layout("storm", Layout::TwoSites).unwrap();
    topo.masquerade(Site::Desktop, Site::Dmz).unwrap();
    let dmz_ip = Site::Dmz.ip().to_string();
    let pki = Pki::with_names("storm", &[&dmz_ip]).unwrap();
    pki.token("connector", "site-a", &["--route", "*.internal:*"])
        .unwrap();
    for i in 0..STORM_AGENTS {
        pki.token(
            "agent",
            &format!("desk-{i}"),
            &["--name", &format!("user{i}")],
        )
        .unwrap();
    }
    let p = |f: &str| pki.p(f).display().to_string();
    let svc = bin("sp-testsvc").display().to_string();
    let (_echo, echo_port) = service_in(&topo, Site::Trusted, "echo", "echo", "127.0.0.1:0");

    std::fs::write(
        pki.p("storm.toml"),
        format!(
            "[limits]\nhandshakes_per_ip = {STORM_RATE:?}\nhandshake_burst = {STORM_BURST:?}\n"
        ),
    )
    .unwrap();
    let dmz_args: Vec<String> = [
        "dmz",
        "-c",
        &p("storm.toml"),
        "--listen",
        &format!("{dmz_ip}:443"),
        "--tls-cert",
        &p("gateway.crt"),
        "--tls-key",
        &p("gateway.key"),
        "--agent-tokens",
        &p("agents.toml"),
        "--connector-tokens",
        &p("connectors.toml"),
        "--instance-id",
        "dmz-storm",
        "--admin",
        "127.0.0.1:9090",
    ]
    .map(String::from)
    .to_vec();
    let mut dmz = spawn_in(&topo, Site::Dmz, "dmz", &gateway_bin(), &dmz_args);
    dmz.wait_for(&["dmz gateway listening"], Duration::from_secs(15))
        .unwrap();
    let _connector = spawn_in(
        &topo,
        Site::Trusted,
        "connector",
        &gateway_bin(),
        &[
            "connector",
            "--gateway",
            &format!("wss://{dmz_ip}/"),
            "--token-file",
            &p("site-a.token"),
            "--ca",
            &p("ca.crt"),
            "--proxy",
            "direct",
            "--advertise",
            "*.internal:*",
            "--allow",
            &format!("shell.internal:{echo_port}"),
            "--allow",
            &format!("127.0.0.1/32:{echo_port}"),
            "--host",
            "shell.internal=127.0.0.1",
        ]
        .map(String::from),
    );
    dmz.wait_for(&["connector routes"], Duration::from_secs(15))
        .unwrap();

    // The corporate site: 200 agents, each with its own token, home and forward.
    let spawned = Instant::now();
    let agents: Vec<Proc> = (0..STORM_AGENTS)
        .map(|i| {
            let home = pki.p(&format!("home-{i}"));
            std::fs::create_dir_all(&home).unwrap();
            Proc::spawn(
                &format!("agent-{i}"),
                topo.cmd(Site::Desktop, bin("sallyport"))
                    .args([
                        "run",
                        "--gateway",
                        &format!("wss://{dmz_ip}/"),
                        "--proxy",
                        "direct",
                        "--socks",
                        "off",
                        "--http",
                        "off",
                        "--forward",
                        &format!(
                            "127.0.0.1:{}=shell.internal:{echo_port}",
                            STORM_FIRST_PORT + i
                        ),
                        "--token-file",
                        &p(&format!("desk-{i}.token")),
                        "--ca",
                        &p("ca.crt"),
                    ])
                    .env("HOME", &home),
            )
            .unwrap()
        })
        .collect();
    let n = u64::from(STORM_AGENTS);
    let first_up = all_agents_up(&topo, n, spawned, RESUME_GRACE, &dmz);
    println!("storm: {n} agents started and connected in {first_up:.1?}");

    // Every agent holds an open connection through its forward to the echo service.
    let mut hold = topo
        .cmd(Site::Desktop, &svc)
        .args([
            "hold",
            &format!("127.0.0.1:{STORM_FIRST_PORT}"),
            &STORM_AGENTS.to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut hold_out = BufReader::new(hold.stdout.take().unwrap());
    let held = hold_says(&mut hold, &mut hold_out, None);
    assert_eq!(held, format!("held ok={n} failed=0"));

    // The NAT is real: the DMZ sees every agent's connection from one address.
    let (_, sockets, _) = topo
        .run(
            Site::Dmz,
            "ss",
            &["-Htn", "state", "established", "( sport = :443 )"],
        )
        .unwrap();
    let nat = Topology::nat_address(Site::Dmz).to_string();
    let from_nat = sockets
        .lines()
        .filter(|l| l.contains(&format!(" {nat}:")))
        .count();
    assert!(
        from_nat >= usize::from(STORM_AGENTS),
        "{from_nat} sessions from the NAT address {nat}:\n{sockets}"
    );
    assert!(
        !sockets.contains(&Site::Desktop.ip().to_string()),
        "the DMZ sees the desktop's own address:\n{sockets}"
    );

    // kill -9, restart, and the storm.
    dmz.kill();
    let killed = Instant::now();
    let dmz = spawn_in(&topo, Site::Dmz, "dmz-again", &gateway_bin(), &dmz_args);
    dmz.wait_for(&["dmz gateway listening"], Duration::from_secs(15))
        .unwrap();
    let restarted = killed.elapsed();
    let back = all_agents_up(&topo, n, killed, RESUME_GRACE, &dmz);
    println!(
        "storm: {n} agents behind one NAT address had a session again {back:.1?} after kill -9 \
         (the DMZ listened again after {restarted:.1?}; per-address budget {STORM_RATE}/s after \
         a burst of {STORM_BURST})"
    );

    // Every agent's forward works: a new connection through each echoes.
    let fresh = hold_says(&mut hold, &mut hold_out, Some("fresh"));
    assert_eq!(fresh, format!("fresh ok={n} failed=0"));
    // And the connections held open across the restart were resumed: the same sockets keep
    // echoing (issue 17's goal: a resume storm completes within the grace).
    let echoed = hold_says(&mut hold, &mut hold_out, Some("echo"));
    assert_eq!(
        echoed,
        format!("echo ok={n} failed=0"),
        "held connections after the restart; DMZ log tail:\n{}",
        tail(&dmz.log(), 30)
    );
    println!("storm: all {n} held connections kept echoing through the restart");
    let _ = hold.kill();
    let _ = hold.wait();
    drop(agents);
}
