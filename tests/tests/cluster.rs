//! Several DMZ instances on loopback: a connector keeps sessions to every instance, an agent
//! fails over from one to the next when its instance dies, and an instance that is told to stop
//! drains (`/readyz` 503, still serving, then `GOAWAY`) before its sessions move, while the
//! streams open on it finish there.

use sallyport_e2e::*;
use std::process::Command;
use std::time::{Duration, Instant};

fn curl() -> Command {
    require_tool("curl");
    let mut c = Command::new("curl");
    c.args(["-sS", "--max-time", "10"]);
    c
}

/// Two DMZ instances sharing their token files and keys (as a cluster's instances share a
/// Secret), one connector holding sessions to both, and a backend it may reach.
struct Cluster {
    pki: Pki,
    dmz: Vec<Proc>,
    urls: Vec<String>,
    _connector: Proc,
    port: u16,
}

/// `sallyport-gateway token revoke` on the PKI's signed revocation list `revoked.txt`, as the
/// admin host runs it (no `args`: re-sign the list as it is).
fn revoke(pki: &Pki, args: &[&str]) {
    let (code, _, err) = run(Command::new(bin("sallyport-gateway"))
        .args(["token", "revoke", "--list"])
        .arg(pki.p("revoked.txt"))
        .arg("--issuer")
        .arg(pki.p("issuer.key"))
        .args(args))
    .unwrap();
    assert_eq!(code, 0, "{err}");
}

fn cluster(tag: &str, drain_delay: &str) -> Cluster {
    cluster_with(tag, drain_delay, None, &[])
}

/// [`cluster`] with a DMZ config file (`dmz.toml` in the PKI folder) holding `config`, and
/// `token_args` for every token minted.
fn cluster_with(
    tag: &str,
    drain_delay: &str,
    config: Option<&str>,
    token_args: &[&str],
) -> Cluster {
    let port = http_service().unwrap().port();
    let pki = Pki::new(tag).unwrap();
    let with = |a: &[&'static str]| -> Vec<&str> {
        a.iter()
            .copied()
            .chain(token_args.iter().copied())
            .collect()
    };
    pki.token(
        "agent",
        "alice-laptop",
        &with(&["--name", "alice", "--groups", "dev"]),
    )
    .unwrap();
    pki.token("connector", "site-a", &with(&["--route", "*.internal:*"]))
        .unwrap();
    let mut dmz = Vec::new();
    let mut urls = Vec::new();
    if let Some(text) = config {
        std::fs::write(pki.p("dmz.toml"), text).unwrap();
        // An empty signed revocation list to start from.
        revoke(&pki, &[]);
    }
    for i in 0..2 {
        let mut cmd = Command::new(bin("sallyport-gateway"));
        cmd.arg("dmz");
        if config.is_some() {
            cmd.arg("--config").arg(pki.p("dmz.toml"));
        }
        let p = Proc::spawn(
            &format!("dmz-{i}"),
            cmd.args([
                "--listen",
                "127.0.0.1:0",
                "--instance-id",
                &format!("dmz-{i}"),
                "--drain-delay",
                drain_delay,
                "--tls-cert",
            ])
            .arg(pki.p("gateway.crt"))
            .arg("--tls-key")
            .arg(pki.p("gateway.key"))
            .arg("--agent-tokens")
            .arg(pki.p("agents.toml"))
            .arg("--connector-tokens")
            .arg(pki.p("connectors.toml")),
        )
        .unwrap();
        let addr = p.addr(&["dmz gateway listening"]).unwrap();
        urls.push(format!("wss://127.0.0.1:{}/", addr.port()));
        dmz.push(p);
    }
    let mut args: Vec<String> = vec!["connector".into()];
    for u in &urls {
        args.extend(["--gateway".into(), u.clone()]);
    }
    args.extend([
        "--token-file".into(),
        pki.p("site-a.token").display().to_string(),
    ]);
    for a in allow_backend(port) {
        args.extend(["--allow".into(), a]);
    }
    args.extend([
        "--host".into(),
        "backend.internal=127.0.0.1".into(),
        "--advertise".into(),
        "*.internal:*".into(),
    ]);
    let connector = Proc::spawn(
        "connector",
        Command::new(bin("sallyport-gateway")).args(&args),
    )
    .unwrap();
    // Every instance hears from the connector: whichever one an agent lands on reaches the site.
    for d in &dmz {
        d.wait_for(&["connector routes"], Duration::from_secs(20))
            .unwrap();
    }
    Cluster {
        pki,
        dmz,
        urls,
        _connector: connector,
        port,
    }
}

fn agent(c: &Cluster) -> (Proc, std::net::SocketAddr) {
    agent_with(c, &c.pki.p("alice-laptop.token"))
}

fn agent_with(c: &Cluster, token: &std::path::Path) -> (Proc, std::net::SocketAddr) {
    let a = agent_spawn(c, token);
    let socks = a.addr(&["listening", "socks5"]).unwrap();
    a.wait_for(&["connected to the gateway"], Duration::from_secs(20))
        .unwrap();
    (a, socks)
}

/// An agent with `token` and every instance's URL, not waited for.
fn agent_spawn(c: &Cluster, token: &std::path::Path) -> Proc {
    let mut cmd = Command::new(bin("sallyport"));
    cmd.arg("run");
    for u in &c.urls {
        cmd.args(["--gateway", u]);
    }
    cmd.args(["--socks", "127.0.0.1:0", "--http", "off", "--token-file"])
        .arg(token)
        .env("HOME", c.pki.dir.path())
        .env("XDG_CONFIG_HOME", c.pki.dir.path().join(".config"));
    for k in ["HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"] {
        cmd.env_remove(k);
    }
    Proc::spawn("agent", &mut cmd).unwrap()
}

fn fetch(socks: std::net::SocketAddr, port: u16) -> bool {
    let (code, out, _) = run(curl()
        .arg("--socks5-hostname")
        .arg(socks.to_string())
        .arg(format!("http://backend.internal:{port}/")))
    .unwrap();
    code == 0 && out.contains("hello from backend.internal")
}

/// Which instance (index in `urls`) the agent's latest session is on.
fn agent_instance(agent: &Proc, urls: &[String]) -> usize {
    let log = agent.log();
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("connected to the gateway"))
        .expect("a session");
    urls.iter()
        .position(|u| line.contains(&format!("gateway={u}")))
        .unwrap_or_else(|| panic!("no known gateway in {line}"))
}

/// [`agent_instance`] once it is `want`, polled: a session's "connected" line is written
/// before the session serves, but the test reads the agent's log through a thread that may
/// not have got that far when a fetch through the new session has already worked.
fn agent_instance_becomes(agent: &Proc, urls: &[String], want: usize) -> usize {
    eventually(
        Duration::from_secs(10),
        || agent_instance(agent, urls),
        |on| *on == want,
    )
}

/// The reconnect budget: failing over must not wait for a backoff that grew while the instance
/// was down (the next instance is tried at once).
use uplink::keep::RECONNECT_BUDGET;

#[test]
fn a_killed_dmz_instance_loses_no_new_connection_for_long_the_agent_fails_over() {
    let mut c = cluster("cluster-kill", "0s");
    let (agent, socks) = agent(&c);
    assert!(fetch(socks, c.port));
    let on = agent_instance(&agent, &c.urls);
    c.dmz[on].kill();
    let killed = Instant::now();
    let mut ok = false;
    while killed.elapsed() < RECONNECT_BUDGET {
        if fetch(socks, c.port) {
            ok = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        ok,
        "no connection within {RECONNECT_BUDGET:?}: {}",
        agent.log()
    );
    assert_eq!(
        agent_instance_becomes(&agent, &c.urls, 1 - on),
        1 - on,
        "{}",
        agent.log()
    );
    eprintln!("failover took {:?}", killed.elapsed());
}

#[test]
fn a_draining_instance_answers_readyz_503_keeps_serving_then_moves_its_sessions() {
    let mut c = cluster("cluster-drain", "3s");
    let (agent, socks) = agent(&c);
    let on = agent_instance(&agent, &c.urls);
    let readyz = |i: usize| -> String {
        let (_, out, _) = run(curl()
            .args(["-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
            .arg(c.pki.p("ca.crt"))
            .arg(format!("{}readyz", c.urls[i].replace("wss://", "https://"))))
        .unwrap();
        out
    };
    assert_eq!(readyz(on), "200");
    let _ = Command::new("kill")
        .args(["-TERM", &c.dmz[on].pid().to_string()])
        .output();
    c.dmz[on]
        .wait_for(&["draining"], Duration::from_secs(10))
        .unwrap();
    assert_eq!(readyz(on), "503", "a draining instance is not ready");
    assert_eq!(readyz(1 - on), "200");
    // Still served while the load balancer takes it out.
    assert!(fetch(socks, c.port), "served during the drain");
    assert_eq!(agent_instance(&agent, &c.urls), on);
    // Then its sessions are sent away, and the agent moves to the other instance.
    agent
        .wait_for(&["gateway session lost"], Duration::from_secs(10))
        .unwrap();
    let moved = Instant::now();
    let mut ok = false;
    while moved.elapsed() < RECONNECT_BUDGET {
        if fetch(socks, c.port) && agent_instance(&agent, &c.urls) == 1 - on {
            ok = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(ok, "the agent did not move: {}", agent.log());
    c.dmz[on].terminate(Duration::from_secs(10));
}

/// A draining instance used to close every session right after its `GOAWAY`: a download
/// running through it broke off (`session-lost`). Now it finishes there, within the drain's
/// grace, while the agent's new connections already go to the other instance.
#[test]
fn a_download_running_when_its_instance_drains_finishes_there() {
    // Far more than the buffers on the way hold (stream windows, socket buffers): the stream
    // through the DMZ is busy until close to the end.
    const N: u64 = 12 * 1024 * 1024;
    let c = cluster("cluster-grace", "0s");
    let (agent, socks) = agent(&c);
    let on = agent_instance(&agent, &c.urls);
    let dir = TempDir::new("cluster-grace");
    let file = dir.path().join("download.bin");
    let download = curl()
        .args(["--limit-rate", "4M", "-o"])
        .arg(&file)
        .arg("--socks5-hostname")
        .arg(socks.to_string())
        .arg(format!("http://backend.internal:{}/bytes/{N}", c.port))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0) < 128 * 1024 {
        assert!(Instant::now() < deadline, "the download did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = Command::new("kill")
        .args(["-TERM", &c.dmz[on].pid().to_string()])
        .output();
    let stopped = Instant::now();
    agent
        .wait_for(&["gateway session lost"], Duration::from_secs(10))
        .unwrap();
    // New connections go to the other instance at once...
    assert!(fetch(socks, c.port), "{}", agent.log());
    assert_eq!(
        agent_instance_becomes(&agent, &c.urls, 1 - on),
        1 - on,
        "{}",
        agent.log()
    );
    // ...and the download on the draining one completes intact.
    let out = download.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the download broke off: {}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        agent.log(),
        c.dmz[on].log()
    );
    assert_eq!(sha256_file(&file).unwrap(), pattern_sha256(N));
    // The draining instance carried it to the end (it logs the stream's end after curl may
    // have seen it: polled).
    let carried = |log: &String| {
        log.lines().any(|l| {
            l.contains("stream closed")
                && field(l, "outcome").as_deref() == Some("closed")
                && field(l, "bytes_down")
                    .and_then(|b| b.parse::<u64>().ok())
                    .is_some_and(|b| b >= N)
        })
    };
    let log = eventually(Duration::from_secs(10), || c.dmz[on].log(), carried);
    assert!(carried(&log), "{log}");
    eprintln!(
        "the download ended {:?} after SIGTERM, intact",
        stopped.elapsed()
    );
}

#[test]
fn a_gateway_listed_twice_is_a_configuration_error() {
    let (code, _, err) = run(Command::new(bin("sallyport-gateway"))
        .args([
            "connector",
            "--gateway",
            "wss://a.example/",
            "--gateway",
            "wss://a.example/",
            "--allow",
            "db.internal:5432",
        ])
        .env("SALLYPORT_TOKEN", format!("sp_x_{}", "0".repeat(64))))
    .unwrap();
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("is given twice"), "{err}");
}

/// Mints `id` on the admin host: signed by the cluster's issuer, in no instance's token file.
fn unlisted(c: &Cluster, id: &str) -> std::path::PathBuf {
    let out = c.pki.p(&format!("{id}.token"));
    let (code, _, err) = run(Command::new(bin("sallyport-gateway"))
        .args(["token", "new", "--kind", "agent", "--id", id])
        .args(["--deployment", "test", "--tokens"])
        .arg(c.pki.p("admin-host-only.toml"))
        .arg("--out")
        .arg(&out))
    .unwrap();
    assert_eq!(code, 0, "{err}");
    out
}

/// Without a shared token file: every instance accepts a token its issuer signed, by the signed
/// claims alone (`[v2] require_listed = false`), and the revocation list that every instance
/// reloads takes it back, cutting its live session.
#[test]
fn a_signed_token_no_instance_lists_works_everywhere_until_the_revocation_list_cuts_it() {
    let c = cluster_with(
        "cluster-stateless",
        "0s",
        Some("[v2]\nrequire_listed = false\nrevoked = \"revoked.txt\"\ndeployment = \"test\"\n"),
        &["--deployment", "test"],
    );
    // Minted on the admin host with the same issuer, into a token file no instance reads.
    let bob = unlisted(&c, "bob-laptop");
    let listed = std::fs::read_to_string(c.pki.p("agents.toml")).unwrap();
    assert!(!listed.contains("bob-laptop"), "{listed}");
    let (agent, socks) = agent_with(&c, &bob);
    assert!(fetch(socks, c.port), "{}", agent.log());
    let on = agent_instance(&agent, &c.urls);
    revoke(&c.pki, &["--id", "bob-laptop"]);
    c.dmz[on]
        .wait_for(
            &["token revoked or expired: cutting its session"],
            Duration::from_secs(10),
        )
        .unwrap();
    // Refused on every instance from now on.
    agent
        .wait_for(&["was refused by the gateway"], Duration::from_secs(20))
        .unwrap();
    assert!(
        !fetch(socks, c.port),
        "a revoked token still reaches the site"
    );
    // Each instance logs its refusal or cut before the agent hears of it: polled, as the
    // test reads their logs through threads of its own.
    let said = |log: &String| {
        log.contains("on the revocation list") || log.contains("cutting its session")
    };
    for d in &c.dmz {
        let log = eventually(Duration::from_secs(10), || d.log(), said);
        assert!(said(&log), "{log}");
    }
}

/// Whoever can write the list file puts an older signed list back (a rollback that would
/// un-revoke a token): every instance keeps the newer list. And a list nobody re-signed within
/// `revoked_max_age` fails closed: tokens accepted by claims alone are refused.
#[test]
fn a_rolled_back_revocation_list_is_refused_and_a_stale_one_fails_closed() {
    let c = cluster_with(
        "cluster-list-age",
        "0s",
        Some("[v2]\nrequire_listed = false\nrevoked = \"revoked.txt\"\ndeployment = \"test\"\nrevoked_max_age = \"6s\"\n"),
        &["--deployment", "test"],
    );
    let carol = unlisted(&c, "carol-laptop");
    let old = std::fs::read_to_string(c.pki.p("revoked.txt")).unwrap();
    revoke(&c.pki, &["--id", "mallory-laptop"]);
    for d in &c.dmz {
        d.wait_for(&["revocation list", "entries=1"], Duration::from_secs(10))
            .unwrap();
    }
    std::fs::write(c.pki.p("revoked.txt"), &old).unwrap();
    for d in &c.dmz {
        d.wait_for(&["lower than serial 2 in force"], Duration::from_secs(10))
            .unwrap();
    }
    // Fresh (just re-signed): carol gets in by her claims alone.
    revoke(&c.pki, &[]);
    let (agent, socks) = agent_with(&c, &carol);
    assert!(fetch(socks, c.port), "{}", agent.log());
    drop(agent);
    // Nobody re-signs: past max_age a new session of carol's is refused, naming the cause.
    std::thread::sleep(Duration::from_secs(7));
    agent_spawn(&c, &carol)
        .wait_for(&["was refused by the gateway"], Duration::from_secs(20))
        .unwrap();
    // The instance logs why before its refusal reaches the agent: polled (see above).
    let stale = || {
        c.dmz
            .iter()
            .any(|d| d.log().contains("more than v2.revoked_max_age"))
    };
    assert!(
        eventually(Duration::from_secs(10), stale, |said| *said),
        "{}",
        c.dmz[0].log()
    );
}

#[test]
fn an_unlisted_token_is_refused_where_listing_is_required() {
    let c = cluster("cluster-listed", "0s");
    let bob = unlisted(&c, "bob-laptop");
    agent_spawn(&c, &bob)
        .wait_for(&["was refused by the gateway"], Duration::from_secs(20))
        .unwrap();
}

/// Accepting tokens by their signature alone is refused at start without a revocation list or
/// a deployment name: a token of another deployment (same issuer) would get in, and none could
/// be taken back.
#[test]
fn unlisted_tokens_need_a_revocation_list_and_a_deployment() {
    let pki = Pki::new("cluster-unsafe").unwrap();
    pki.token("agent", "alice-laptop", &[]).unwrap();
    pki.token("connector", "site-a", &["--route", "*.internal:*"])
        .unwrap();
    for (config, want) in [
        (
            "[v2]\nrequire_listed = false\ndeployment = \"x\"\n",
            "needs v2.revoked",
        ),
        (
            "[v2]\nrequire_listed = false\nrevoked = \"revoked.txt\"\n",
            "needs v2.deployment",
        ),
    ] {
        std::fs::write(pki.p("dmz.toml"), config).unwrap();
        revoke(&pki, &[]);
        let (code, _, err) = run(Command::new(bin("sallyport-gateway"))
            .args(["dmz", "--config"])
            .arg(pki.p("dmz.toml"))
            .args(["--listen", "127.0.0.1:0", "--plain", "--agent-tokens"])
            .arg(pki.p("agents.toml"))
            .arg("--connector-tokens")
            .arg(pki.p("connectors.toml")))
        .unwrap();
        assert_eq!(code, 64, "{err}");
        assert!(err.contains(want), "{err}");
    }
}

/// Agent tokens expire; a fleet must not break when they do. The agent renews its own token
/// over its session, with a secret made on the desktop, from the issuer connector (the only one
/// holding the renewal key), and writes it back to its token file. A copy of the old token that
/// tries to renew afterwards is refused and raises the alarm.
#[test]
fn an_agent_renews_its_token_before_expiry_and_a_copy_cannot() {
    let c = cluster_with(
        "cluster-renew",
        "0s",
        Some("[v2]\nrequire_listed = false\nrevoked = \"revoked.txt\"\ndeployment = \"test\"\n"),
        &["--deployment", "test"],
    );
    let route = format!("{}:{}", tunnel::renew::HOST, tunnel::renew::PORT);
    let issuer_token = c
        .pki
        .token(
            "connector",
            "issuer",
            &["--route", &route, "--deployment", "test"],
        )
        .unwrap();
    let mut cmd = Command::new(bin("sallyport-gateway"));
    cmd.arg("connector");
    for u in &c.urls {
        cmd.args(["--gateway", u]);
    }
    cmd.arg("--token-file")
        .arg(&issuer_token)
        .arg("--renewal-key")
        .arg(c.pki.p("renew.key"))
        .args(["--instance-id", "issuer"]);
    let issuer = Proc::spawn("issuer", &mut cmd).unwrap();
    for d in &c.dmz {
        d.wait_for(
            &["connector routes", "issuer.sallyport.invalid"],
            Duration::from_secs(15),
        )
        .unwrap();
    }
    // A short life: due for renewal after two thirds of it.
    let dana = c.pki.p("dana-laptop.token");
    let (code, _, err) = run(Command::new(bin("sallyport-gateway"))
        .args(["token", "new", "--kind", "agent", "--id", "dana-laptop"])
        .args(["--deployment", "test", "--expires", "15s", "--tokens"])
        .arg(c.pki.p("admin-host-only.toml"))
        .arg("--out")
        .arg(&dana))
    .unwrap();
    assert_eq!(code, 0, "{err}");
    let original = std::fs::read_to_string(&dana).unwrap();
    let (agent, socks) = agent_with(&c, &dana);
    assert!(fetch(socks, c.port), "{}", agent.log());
    agent
        .wait_for(&["token renewed"], Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}\nthe issuer's log:\n{}", issuer.log()));
    let renewed = std::fs::read_to_string(&dana).unwrap();
    assert_ne!(renewed.trim(), original.trim());
    let new: tunnel::token::Token = renewed.trim().parse().unwrap();
    let old: tunnel::token::Token = original.trim().parse().unwrap();
    assert_eq!(new.claims().id, "dana-laptop");
    assert!(new.claims().expires > old.claims().expires);
    assert_ne!(new.claims().agent_key, old.claims().agent_key);
    // The renewed token opens sessions on every instance (signed by the renewal key).
    let (second, socks2) = agent_with(&c, &dana);
    assert!(fetch(socks2, c.port), "{}", second.log());
    drop(second);
    // The old token, copied before the renewal: its own renewal is refused as a copy.
    let copy = c.pki.p("dana-copy.token");
    std::fs::write(&copy, &original).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let thief = agent_spawn(&c, &copy);
    issuer
        .wait_for(&["copied token", "dana-laptop"], Duration::from_secs(20))
        .unwrap();
    thief
        .wait_for(&["already renewed elsewhere"], Duration::from_secs(10))
        .unwrap();
    assert!(!agent.log().contains(renewed.trim()), "a token in the log");
}

/// Where tokens must be listed, the token file pins each token's key: a renewed token would be
/// refused at its next session, locking the agent out. Such a gateway does not offer renewal,
/// even with an issuer connected.
#[test]
fn renewal_is_not_offered_where_tokens_are_listed() {
    let c = cluster("cluster-listed-renew", "0s");
    let (agent, socks) = agent(&c);
    let (code, _, _) = run(curl()
        .arg("--socks5-hostname")
        .arg(socks.to_string())
        .arg(format!(
            "http://{}:{}/",
            tunnel::renew::HOST,
            tunnel::renew::PORT
        )))
    .unwrap();
    assert_ne!(code, 0, "{}", agent.log());
    let on = agent_instance(&agent, &c.urls);
    c.dmz[on]
        .wait_for(&["token renewal is not offered"], Duration::from_secs(10))
        .unwrap();
}
