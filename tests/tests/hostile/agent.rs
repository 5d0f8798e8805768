//! The agent and the logs against a hostile user on the desktop, on the LAN, or reading the
//! logs. Network tests use loopback, or network namespaces each test creates and removes; run
//! as root (setpriv, ip).

use sallyport_e2e::netns::Namespace;
use sallyport_e2e::*;
use std::process::Command;
use std::time::Duration;

/// The agent's host's "LAN address" (inside the test's own namespace) and another host's.
const LAN: &str = "10.77.0.1";
const OTHER_HOST: &str = "10.77.0.2";

/// Gateway, connector, agent and two backends, all inside a fresh namespace that has a LAN
/// address (and another host, in a second namespace, at [`OTHER_HOST`]).
struct Lan {
    sys: System,
    url: String,
    backend: Proc,
    /// A second service (`backend.internal` on another port).
    url2: String,
    backend2: Proc,
    other_host: Namespace,
    host: Namespace,
}

fn lan(tag: &str) -> Lan {
    require_tool("curl");
    require_tool("setpriv");
    let host = Namespace::new(tag).unwrap();
    let other_host = Namespace::new(&format!("{tag}-o")).unwrap();
    host.link(
        &other_host,
        &format!("{LAN}/24"),
        &format!("{OTHER_HOST}/24"),
    )
    .unwrap();
    let service = |name: &str| {
        let p = Proc::spawn(
            name,
            host.cmd(bin("sp-testsvc")).args(["http", "127.0.0.1:0"]),
        )
        .unwrap();
        let port = p.addr(&["listening"]).unwrap().port();
        (p, port)
    };
    let (backend, port) = service("backend");
    let (backend2, port2) = service("backend2");
    let mut allow = allow_backend(port);
    allow.extend(allow_backend(port2));
    let sys = System::start_opts(
        tag,
        &allow,
        &["backend.internal=127.0.0.1"],
        &[],
        &[],
        &[],
        &Where {
            netns: Some(host.name.clone()),
            env: Vec::new(),
        },
    )
    .unwrap();
    Lan {
        sys,
        url: format!("http://backend.internal:{port}/"),
        backend,
        url2: format!("http://backend.internal:{port2}/"),
        backend2,
        other_host,
        host,
    }
}

/// curl through the SOCKS5 proxy `proxy` (`socks5h://[user:pass@]addr`), run in `ns`, as `uid`
/// when given, from source address `source` when given.
fn curl_in(
    ns: &Namespace,
    uid: Option<&str>,
    source: Option<&str>,
    proxy: &str,
    url: &str,
) -> (i32, String, String) {
    let mut c = match uid {
        Some(u) => {
            let mut c = ns.cmd("setpriv");
            c.args(["--reuid", u, "--regid", u, "--clear-groups", "curl"]);
            c
        }
        None => ns.cmd("curl"),
    };
    c.args(["-sS", "--max-time", "20", "-x", proxy]);
    if let Some(s) = source {
        c.args(["--interface", s]);
    }
    run(c.arg(url)).unwrap()
}

const HELLO: &str = "hello from backend.internal\n";

#[test]
fn another_local_user_via_a_lan_source_address_is_refused() {
    let l = lan("lanuser");
    let socks = format!("socks5h://{}", l.sys.socks);
    // The attack: another user binds the host's LAN address so that the source is not loopback.
    let (code, out, err) = curl_in(&l.host, Some("65534"), Some(LAN), &socks, &l.url);
    assert_ne!(code, 0, "another user got through from {LAN}: {out}{err}");
    l.sys
        .agent
        .wait_for(
            &["refused a client connection", "uid 65534", LAN],
            Duration::from_secs(10),
        )
        .unwrap();
    // Without --allow-remote-clients a non-loopback source is refused even for the owner...
    let (code, out, err) = curl_in(&l.host, None, Some(LAN), &socks, &l.url);
    assert_ne!(code, 0, "a LAN source got through: {out}{err}");
    l.sys
        .agent
        .wait_for(&["not a loopback address"], Duration::from_secs(10))
        .unwrap();
    // ...who still gets through from loopback.
    let (code, out, err) = curl_in(&l.host, None, None, &socks, &l.url);
    assert_eq!((code, out.as_str()), (0, HELLO), "{err}");
}

/// An agent open to other hosts (`--allow-remote-clients`, local authentication as `lan-user`
/// with the password `lan-pass`), connected: its SOCKS5 port.
fn open_agent(l: &Lan) -> (Proc, u16) {
    let mut cmd = l.sys.agent_command(
        "run",
        &[
            "--socks",
            "0.0.0.0:0",
            "--http",
            "off",
            "--allow-remote-clients",
            "--local-user",
            "lan-user",
        ],
        &[("SALLYPORT_LOCAL_PASSWORD", "lan-pass")],
    );
    let open = Proc::spawn("agent-open", &mut cmd).unwrap();
    let port = open.addr(&["listening", "socks5"]).unwrap().port();
    open.wait_for(&["connected to the gateway"], Duration::from_secs(15))
        .unwrap();
    (open, port)
}

/// The attack: a client on another host, let in with the local password, times the agent's
/// SOCKS5 answers to learn which destinations the desktop's user opened lately (the agent
/// answers those at once, before the connector confirms). A client on another host is always
/// confirmed: for a destination that opened lately and then stopped answering, it gets the
/// SOCKS5 reply code, where a client on the agent's own loopback is answered at once and then
/// reset.
#[test]
fn a_client_on_another_host_cannot_tell_which_destinations_the_user_opened_lately() {
    let mut l = lan("lanearly");
    let (open, port) = open_agent(&l);
    let local = format!("socks5h://lan-user:lan-pass@127.0.0.1:{port}");
    let remote = format!("socks5h://lan-user:lan-pass@{LAN}:{port}");
    // Two services, both opened by the desktop's user: both are known now.
    for url in [&l.url, &l.url2] {
        let (code, out, err) = curl_in(&l.host, None, None, &local, url);
        assert_eq!((code, out.as_str()), (0, HELLO), "{url}: {err}");
    }
    l.backend.kill();
    l.backend2.kill();
    // The control: the desktop's own client is answered at once, then reset.
    let (code, _, err) = curl_in(&l.host, None, None, &local, &l.url2);
    assert_ne!(code, 0);
    assert!(
        err.contains("reset"),
        "a known destination was not answered early on loopback: {err}\n{}",
        open.log()
    );
    // The client on another host is confirmed, and told why.
    let (code, _, err) = curl_in(&l.other_host, None, None, &remote, &l.url);
    assert_ne!(code, 0);
    assert!(
        err.contains("SOCKS5") && !err.contains("reset"),
        "a client on another host was answered before the connector confirmed: {err}\n{}",
        open.log()
    );
}

#[test]
fn another_local_user_with_the_local_password_via_a_lan_address_is_refused() {
    let l = lan("lanpass");
    let (open, port) = open_agent(&l);
    let with_password = format!("socks5h://lan-user:lan-pass@{LAN}:{port}");
    // The attack: another user on the agent's own machine, who learnt the shared password.
    let (code, out, err) = curl_in(&l.host, Some("65534"), None, &with_password, &l.url);
    assert_ne!(code, 0, "another local user got through: {out}{err}");
    open.wait_for(
        &["refused a client connection", "uid 65534"],
        Duration::from_secs(10),
    )
    .unwrap();
    // Other hosts with the password still get through; without it they do not.
    let (code, out, err) = curl_in(&l.other_host, None, None, &with_password, &l.url);
    assert_eq!(
        (code, out.as_str()),
        (0, HELLO),
        "a remote client with the password: {err}\n{}",
        open.log()
    );
    let (code, out, _) = curl_in(
        &l.other_host,
        None,
        None,
        &format!("socks5h://{LAN}:{port}"),
        &l.url,
    );
    assert_ne!(code, 0, "a remote client without the password: {out}");
}

/// The attack: read the logs of a user asked to "run with trace logging, please" (or a support
/// bundle). tungstenite's trace prints the whole WebSocket upgrade request, bearer token
/// included; the binaries cap it whatever the log filter says.
#[test]
fn bearer_token_never_in_trace_logs() {
    require_tool("curl");
    let svc = http_service().unwrap();
    let trace = Where {
        netns: None,
        env: [("SALLYPORT_LOG", "trace"), ("RUST_LOG", "trace")]
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .to_vec(),
    };
    let sys = System::start_opts(
        "tracelog",
        &allow_backend(svc.port()),
        &["backend.internal=127.0.0.1"],
        &[],
        &[],
        &[],
        &trace,
    )
    .unwrap();
    let (code, out, err) = run(Command::new("curl")
        .args(["-sS", "--max-time", "20", "--socks5-hostname"])
        .arg(sys.socks.to_string())
        .arg(format!("http://backend.internal:{}/", svc.port())))
    .unwrap();
    assert_eq!((code, out.as_str()), (0, HELLO), "{err}");
    // Trace logging is really on (else the test proves nothing).
    sys.agent
        .wait_for(&["TRACE"], Duration::from_secs(10))
        .unwrap();
    sys.dmz
        .wait_for(&["TRACE"], Duration::from_secs(10))
        .unwrap();
    for token_file in ["alice-laptop.token", "site-a.token"] {
        let token = std::fs::read_to_string(sys.pki.p(token_file)).unwrap();
        let token = token.trim();
        assert!(token.len() > 20, "{token_file} holds no token");
        // Nor the secret part alone (`sp_<id>_<secret>`).
        let id = token_file.trim_end_matches(".token");
        let secret = token.strip_prefix(&format!("sp_{id}_")).unwrap_or(token);
        for p in [&sys.agent, &sys.dmz, &sys.connector] {
            let log = p.log();
            assert!(
                !log.contains(secret),
                "{}'s trace log shows the {token_file} secret",
                p.name
            );
        }
    }
}
