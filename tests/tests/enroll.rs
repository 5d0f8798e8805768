//! `sallyport enroll` / `logout` as a user runs them: the token on stdin, checked against the
//! real gateway once; the key pinned (and then enforced); nothing written on a wrong token or an
//! unreachable gateway; logout removes what enroll wrote.

use sallyport_e2e::*;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

fn sallyport(home: &TempDir, args: &[&str], stdin: &str) -> (i32, String, String) {
    let mut child = Command::new(bin("sallyport"))
        .args(args)
        .env("HOME", home.path())
        .env("XDG_CONFIG_HOME", home.path().join(".config"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn enroll_checks_the_token_pins_the_key_and_logout_removes_it() {
    let svc = http_service().unwrap();
    let sys = System::start(
        "enroll",
        &allow_backend(svc.port()),
        &["backend.internal=127.0.0.1"],
        &[],
    )
    .unwrap();
    // A v1 token: fetching `/key` and pinning are v1's enrollment (v2's is below).
    sys.pki.use_v1_token("agent", "alice-laptop").unwrap();
    // The DMZ reads its token files every 2 s (a fixed sleep for it was too short under load).
    sys.dmz
        .wait_for_reload(&sys.pki.p("agents.toml"), 2)
        .unwrap();
    let home = TempDir::new("enroll-home");
    let conf_dir = home.path().join(".config/sallyport");
    let token = std::fs::read_to_string(sys.pki.p("alice-laptop.token")).unwrap();
    let ca = sys.pki.p("ca.crt").display().to_string();
    let gw = sys.gw_url.clone();

    // A wrong token: refused, nothing written.
    let wrong = format!("sp_alice-laptop_{}", "0".repeat(64));
    let (code, out, err) = sallyport(
        &home,
        &["enroll", &gw, "--ca", &ca, "--proxy", "direct"],
        &wrong,
    );
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("refused this token") && err.contains("Nothing was written"),
        "{err}"
    );
    assert!(!err.contains(&wrong[20..]), "the token leaked: {err}");
    assert!(
        file_names(&conf_dir).is_empty(),
        "{:?}",
        file_names(&conf_dir)
    );
    // An unreachable gateway: nothing written either.
    let dead = format!("wss://127.0.0.1:{}/", dead_port().unwrap());
    let (code, _, err) = sallyport(
        &home,
        &["enroll", &dead, "--ca", &ca, "--proxy", "direct"],
        &token,
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("cannot reach the gateway"), "{err}");
    assert!(file_names(&conf_dir).is_empty());

    // The real token.
    let (code, out, err) = sallyport(
        &home,
        &["enroll", &gw, "--ca", &ca, "--proxy", "direct"],
        &token,
    );
    assert_eq!(code, 0, "{out}{err}");
    let der = {
        use rustls_pki_types::pem::PemObject;
        rustls_pki_types::CertificateDer::from_pem_file(sys.pki.p("gateway.crt")).unwrap()
    };
    let pin = egress::cert::key_pin(&der).unwrap();
    assert!(out.contains(&format!("gateway key pinned: {pin}")), "{out}");
    assert!(out.contains("(mode 0600)"), "{out}");
    assert_eq!(
        file_names(&conf_dir),
        ["agent.token", "agent.toml", "ca.crt"]
    );
    for f in ["agent.toml", "agent.token"] {
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(conf_dir.join(f)).unwrap().permissions(),
        );
        assert_eq!(mode & 0o077, 0, "{f} is readable by others");
    }
    assert!(!out.contains(token.trim()), "the token was printed");

    // `run` with no flags but ports uses what enroll wrote.
    let agent = Proc::spawn(
        "enrolled-agent",
        Command::new(bin("sallyport"))
            .args(["run", "--socks", "127.0.0.1:0", "--http", "off"])
            .env("HOME", home.path())
            .env("XDG_CONFIG_HOME", home.path().join(".config")),
    )
    .unwrap();
    let socks = agent.addr(&["listening", "socks5"]).unwrap();
    agent
        .wait_for(&["connected to the gateway"], Duration::from_secs(15))
        .unwrap();
    let (code, body, err) = run(Command::new("curl")
        .args(["-sS", "--max-time", "20", "--socks5-hostname"])
        .arg(socks.to_string())
        .arg(format!("http://backend.internal:{}/", svc.port())))
    .unwrap();
    assert_eq!(
        (code, body.as_str()),
        (0, "hello from backend.internal\n"),
        "{err}"
    );
    drop(agent);

    // Another TLS key than the pinned one (what a TLS-inspecting proxy presents): with the
    // gateway's inner key pinned too, the session runs inside the inner channel.
    let conf = conf_dir.join("agent.toml");
    let enrolled = std::fs::read_to_string(&conf).unwrap();
    assert!(
        enrolled.contains("gateway_inner_key = \"x25519/"),
        "{enrolled}"
    );
    assert!(out.contains("gateway inner key pinned: x25519/"), "{out}");
    let other = "sha256/AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    std::fs::write(&conf, enrolled.replace(&pin, other)).unwrap();
    let inner = Proc::spawn(
        "inner-agent",
        Command::new(bin("sallyport"))
            .args(["run", "--socks", "127.0.0.1:0", "--http", "off"])
            .env("HOME", home.path())
            .env("XDG_CONFIG_HOME", home.path().join(".config")),
    )
    .unwrap();
    let line = inner
        .wait_for(&["connected to the gateway"], Duration::from_secs(15))
        .unwrap();
    assert!(line.contains("inner channel"), "{line}");
    drop(inner);
    // Without the inner key: refused, both fingerprints shown.
    let text: String = enrolled
        .replace(&pin, other)
        .lines()
        .filter(|l| !l.starts_with("gateway_inner_key"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&conf, text).unwrap();
    let pinned = Proc::spawn(
        "pinned-agent",
        Command::new(bin("sallyport"))
            .args(["run", "--socks", "127.0.0.1:0", "--http", "off"])
            .env("HOME", home.path())
            .env("XDG_CONFIG_HOME", home.path().join(".config")),
    )
    .unwrap();
    pinned
        .wait_for(
            &[
                &format!("presented key {pin}"),
                &format!("pinned to {other}"),
            ],
            Duration::from_secs(15),
        )
        .unwrap();
    drop(pinned);

    // Re-enrolling replaces cleanly; logout removes everything enroll wrote.
    let (code, out, err) = sallyport(
        &home,
        &["enroll", &gw, "--ca", &ca, "--proxy", "direct"],
        &token,
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(std::fs::read_to_string(&conf).unwrap().contains(&pin));
    let (code, out, err) = sallyport(&home, &["logout"], "");
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        file_names(&conf_dir).is_empty(),
        "{:?}",
        file_names(&conf_dir)
    );
}

/// Enrollment with a v2 token needs no `--ca` and pins nothing: the token names the gateway's
/// key, so nothing is fetched or trusted on first use. A token for another gateway changes
/// nothing on disk.
#[test]
fn enroll_with_a_v2_token_needs_no_ca_and_pins_nothing() {
    let svc = http_service().unwrap();
    let sys = System::start(
        "enroll-v2",
        &allow_backend(svc.port()),
        &["backend.internal=127.0.0.1"],
        &[],
    )
    .unwrap();
    let home = TempDir::new("enroll-v2-home");
    let conf_dir = home.path().join(".config/sallyport");
    let token = std::fs::read_to_string(sys.pki.p("alice-laptop.token")).unwrap();
    assert!(token.starts_with("sp2_"), "{token}");
    let gw = sys.gw_url.clone();

    // A token minted for another gateway (another issuer, another gateway key).
    let other = TempDir::new("enroll-v2-other");
    let (code, _, err) = run(Command::new(bin("sallyport-gateway"))
        .args([
            "token",
            "new",
            "--kind",
            "agent",
            "--id",
            "alice-laptop",
            "--tokens",
        ])
        .arg(other.path().join("agents.toml"))
        .arg("--out")
        .arg(other.path().join("t")))
    .unwrap();
    assert_eq!(code, 0, "{err}");
    let foreign = std::fs::read_to_string(other.path().join("t")).unwrap();
    let (code, out, err) = sallyport(&home, &["enroll", &gw, "--proxy", "direct"], &foreign);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("Nothing was written"), "{err}");
    assert!(err.contains("is the token for this gateway?"), "{err}");
    assert!(file_names(&conf_dir).is_empty());

    let (code, out, err) = sallyport(&home, &["enroll", &gw, "--proxy", "direct"], &token);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("nothing to pin"), "{out}");
    assert!(out.contains("v2 over the gateway's own TLS"), "{out}");
    let conf = std::fs::read_to_string(conf_dir.join("agent.toml")).unwrap();
    assert!(!conf.contains("gateway_key"), "{conf}");
    assert!(!conf.contains("gateway_inner_key"), "{conf}");
    assert!(!out.contains(token.trim()), "the token was printed");
    let agent = Proc::spawn(
        "enrolled-v2-agent",
        Command::new(bin("sallyport"))
            .args(["run", "--socks", "127.0.0.1:0", "--http", "off"])
            .env("HOME", home.path())
            .env("XDG_CONFIG_HOME", home.path().join(".config")),
    )
    .unwrap();
    let socks = agent.addr(&["listening", "socks5"]).unwrap();
    agent
        .wait_for(&["connected to the gateway"], Duration::from_secs(15))
        .unwrap();
    let (code, body, err) = run(Command::new("curl")
        .args(["-sS", "--max-time", "20", "--socks5-hostname"])
        .arg(socks.to_string())
        .arg(format!("http://backend.internal:{}/", svc.port())))
    .unwrap();
    assert_eq!(
        (code, body.as_str()),
        (0, "hello from backend.internal\n"),
        "{err}"
    );
    drop(agent);

    // The user edits agent.toml after enrolling: logout removes the token but keeps the edits.
    let conf_path = conf_dir.join("agent.toml");
    let edited = format!("{conf}socks = \"127.0.0.1:1081\"\n");
    std::fs::write(&conf_path, &edited).unwrap();
    let (code, out, err) = sallyport(&home, &["logout"], "");
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!(
            "kept {}: it was edited after `sallyport enroll` wrote it, so your changes stay",
            conf_path.display()
        )),
        "{out}"
    );
    assert_eq!(std::fs::read_to_string(&conf_path).unwrap(), edited);
    assert!(!conf_dir.join("agent.token").exists(), "{out}");
    // Unedited, logout removes everything enroll wrote.
    let (code, out, err) = sallyport(&home, &["enroll", &gw, "--proxy", "direct"], &token);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = sallyport(&home, &["logout"], "");
    assert_eq!(code, 0, "{out}{err}");
    assert!(!out.contains("kept"), "{out}");
    assert!(
        file_names(&conf_dir).is_empty(),
        "{:?}",
        file_names(&conf_dir)
    );
}
