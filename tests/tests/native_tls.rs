//! `--tls native`: the agent and the connector with the outer TLS through the OS stack
//! (OpenSSL here), v2 tokens inside, end to end: straight to the DMZ, where the session runs
//! sealed because native-tls has no TLS exporter to prove the TLS is the gateway's own (rustls
//! rides that TLS), and through nginx that demands a client certificate, which both present
//! from a PKCS#12 file whose password comes from a file or the environment.

use sallyport_e2e::lb::{LbConfig, LoadBalancer, Nginx, PREFIX};
use sallyport_e2e::*;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

fn openssl(dir: &Path, args: &[&str]) {
    require_tool("openssl");
    let (code, out, err) = run(Command::new("openssl").current_dir(dir).args(args)).unwrap();
    assert_eq!(code, 0, "openssl {args:?}: {out}{err}");
}

/// A client CA (`client-ca.crt`) and a client certificate for alice signed by it, in
/// `client.p12` under the password in `p12.pass` (passed to openssl as a file, never argv).
fn client_pki(dir: &Path) {
    std::fs::write(dir.join("p12.pass"), "correct horse battery\n").unwrap();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut a = vec!["req", "-x509"];
    a.extend(ec);
    a.extend([
        "-keyout",
        "client-ca.key",
        "-out",
        "client-ca.crt",
        "-subj",
        "/CN=Sallyport test client CA",
        "-days",
        "2",
    ]);
    openssl(dir, &a);
    let mut a = vec!["req"];
    a.extend(ec);
    a.extend([
        "-keyout",
        "client.key",
        "-out",
        "client.csr",
        "-subj",
        "/CN=alice-laptop",
    ]);
    openssl(dir, &a);
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "client.csr",
            "-CA",
            "client-ca.crt",
            "-CAkey",
            "client-ca.key",
            "-CAcreateserial",
            "-out",
            "client.crt",
            "-days",
            "1",
        ],
    );
    openssl(
        dir,
        &[
            "pkcs12",
            "-export",
            "-in",
            "client.crt",
            "-inkey",
            "client.key",
            "-out",
            "client.p12",
            "-passout",
            "file:p12.pass",
        ],
    );
}

/// Straight to the DMZ's own TLS: rustls proves it is the gateway's (TLS exporter) and rides
/// it; the OS stack cannot, so the same agent with `--tls native` runs sealed, and works.
#[test]
fn native_tls_to_the_dmz_runs_sealed_where_rustls_rides_the_gateways_own_tls() {
    let svc = http_service().unwrap();
    let native = System::start_with(
        "native-direct",
        &allow_backend(svc.port()),
        &["backend.internal=127.0.0.1"],
        &[],
        &["--tls".to_string(), "native".to_string()],
        &[],
    )
    .unwrap();
    let line = native
        .agent
        .wait_for(&["connected to the gateway"], Duration::from_secs(5))
        .unwrap();
    assert!(line.contains("v2 sealed"), "{line}");
    let (code, out, err) = run(Command::new("curl")
        .args(["-sS", "--max-time", "10", "--socks5-hostname"])
        .arg(native.socks.to_string())
        .arg(format!("http://backend.internal:{}/", svc.port())))
    .unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("hello from backend.internal"), "{out}");
    // The same agent on rustls, to the same DMZ: the gateway's own TLS, not sealed.
    let rustls = native.spawn_agent("agent-rustls", &[], &[]).unwrap();
    let line = rustls
        .wait_for(&["connected to the gateway"], Duration::from_secs(15))
        .unwrap();
    assert!(line.contains("v2 over the gateway's own TLS"), "{line}");
}

/// nginx in front of the DMZ demands a client certificate: the connector and the agent present
/// theirs from PKCS#12 files over the OS TLS stack, the session runs sealed inside, and data
/// flows end to end.
#[test]
fn agent_and_connector_present_a_pkcs12_client_certificate_to_nginx_over_native_tls() {
    let svc = http_service().unwrap();
    let pki = Pki::new("native-nginx").unwrap();
    client_pki(pki.dir.path());
    pki.token(
        "agent",
        "alice-laptop",
        &["--name", "alice", "--groups", "dev"],
    )
    .unwrap();
    pki.token("connector", "site-a", &["--route", "*.internal:*"])
        .unwrap();
    let dmz = Proc::spawn(
        "dmz",
        Command::new(bin("sallyport-gateway"))
            .args([
                "dmz",
                "--plain",
                "--listen",
                "127.0.0.1:0",
                "--prefix",
                PREFIX,
                "--trusted-proxy",
                "127.0.0.1/32",
                "--agent-tokens",
            ])
            .arg(pki.p("agents.toml"))
            .arg("--connector-tokens")
            .arg(pki.p("connectors.toml")),
    )
    .unwrap();
    let dmz_addr = dmz.addr(&["dmz gateway listening"]).unwrap();
    let (cert, key, client_ca) = (
        pki.p("gateway.crt"),
        pki.p("gateway.key"),
        pki.p("client-ca.crt"),
    );
    let nginx = Nginx::start(&LbConfig {
        client_ca: Some(&client_ca),
        ..LbConfig::new(dmz_addr, &cert, &key)
    })
    .unwrap();
    let gw_url = format!("wss://127.0.0.1:{}{PREFIX}/", nginx.addr().port());
    let p12 = pki.p("client.p12");
    let pass = pki.p("p12.pass");
    let _connector = Proc::spawn(
        "connector",
        Command::new(bin("sallyport-gateway"))
            .args(["connector", "--gateway", &gw_url, "--token-file"])
            .arg(pki.p("site-a.token"))
            .args(["--proxy", "direct", "--tls", "native", "--client-cert"])
            .arg(&p12)
            .arg("--client-cert-password-file")
            .arg(&pass)
            .args([
                "--advertise",
                "*.internal:*",
                "--allow",
                &format!("backend.internal:{}", svc.port()),
                "--allow",
                &format!("127.0.0.1/32:{}", svc.port()),
                "--host",
                "backend.internal=127.0.0.1",
            ]),
    )
    .unwrap();
    dmz.wait_for(&["connector routes"], Duration::from_secs(15))
        .unwrap_or_else(|e| panic!("{e}\nnginx: {}", nginx.log()));
    // The agent's password from the environment this time.
    let agent = Proc::spawn(
        "agent",
        Command::new(bin("sallyport"))
            .args(["run", "--gateway", &gw_url, "--token-file"])
            .arg(pki.p("alice-laptop.token"))
            .args([
                "--socks",
                "127.0.0.1:0",
                "--http",
                "off",
                "--proxy",
                "direct",
                "--tls",
                "native",
                "--client-cert",
            ])
            .arg(&p12)
            .env("SALLYPORT_CLIENT_CERT_PASSWORD", "correct horse battery")
            .env("HOME", pki.dir.path()),
    )
    .unwrap();
    let socks = agent.addr(&["listening", "socks5"]).unwrap();
    let line = agent
        .wait_for(&["connected to the gateway"], Duration::from_secs(15))
        .unwrap();
    assert!(line.contains("v2 sealed"), "{line}");
    let (code, out, err) = run(Command::new("curl")
        .args(["-sS", "--max-time", "10", "--socks5-hostname"])
        .arg(socks.to_string())
        .arg(format!("http://backend.internal:{}/", svc.port())))
    .unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("hello from backend.internal"), "{out}");
    // The password never reaches a log.
    assert!(!agent.log().contains("correct horse") && !dmz.log().contains("correct horse"));

    // Without a client certificate (rustls, the default) nginx turns the agent away.
    let bare = Proc::spawn(
        "agent-bare",
        Command::new(bin("sallyport"))
            .args(["run", "--gateway", &gw_url, "--token-file"])
            .arg(pki.p("alice-laptop.token"))
            .args([
                "--socks",
                "127.0.0.1:0",
                "--http",
                "off",
                "--proxy",
                "direct",
            ])
            .env("HOME", pki.dir.path()),
    )
    .unwrap();
    bare.wait_for(&["cannot reach the gateway"], Duration::from_secs(15))
        .unwrap();
    assert!(!bare.log().contains("connected to the gateway"));

    // A wrong password stops the agent at start-up with one line naming the file (exit 64).
    let (code, _, err) = run(Command::new(bin("sallyport"))
        .args(["run", "--gateway", &gw_url, "--token-file"])
        .arg(pki.p("alice-laptop.token"))
        .args(["--socks", "127.0.0.1:0", "--tls", "native", "--client-cert"])
        .arg(&p12)
        .env("SALLYPORT_CLIENT_CERT_PASSWORD", "wrong password guess")
        .env("HOME", pki.dir.path()))
    .unwrap();
    assert_eq!(code, 64, "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].contains("client.p12") && lines[0].contains("wrong password"),
        "{err}"
    );
    assert!(!err.contains("wrong password guess"), "{err}");
}

/// A TLS-inspecting proxy whose CA sits in the OS store (here `SSL_CERT_FILE`, which OpenSSL
/// reads) re-signs the gateway's certificate. A v1 connector sends its bearer token on whatever
/// its TLS accepts, so with `--ca` the OS stack must trust that CA alone, as rustls does: the
/// connector refuses the interceptor and its token never leaves. Without `--ca` the OS store
/// is what it trusts (the control: the interceptor is then accepted).
#[test]
fn a_v1_connector_over_native_tls_does_not_take_an_inspecting_proxy_for_the_gateway() {
    let real = Pki::new("native-v1-real").unwrap();
    let mitm = Pki::new("native-v1-mitm").unwrap();
    let token = mitm.use_v1_token("connector", "site-a").unwrap();
    // The "interceptor": a DMZ serving a certificate of the proxy's CA.
    let dmz = Proc::spawn(
        "dmz",
        Command::new(bin("sallyport-gateway"))
            .args(["dmz", "--listen", "127.0.0.1:0", "--tls-cert"])
            .arg(mitm.p("gateway.crt"))
            .arg("--tls-key")
            .arg(mitm.p("gateway.key"))
            .arg("--agent-tokens")
            .arg(mitm.p("agents.toml"))
            .arg("--connector-tokens")
            .arg(mitm.p("connectors.toml")),
    )
    .unwrap();
    std::fs::write(mitm.p("agents.toml"), "").unwrap();
    let gw = dmz.addr(&["dmz gateway listening"]).unwrap();
    let gw_url = format!("wss://127.0.0.1:{}/", gw.port());
    let connector = |name: &str, ca: Option<&Path>| {
        let mut cmd = Command::new(bin("sallyport-gateway"));
        cmd.args(["connector", "--gateway", &gw_url, "--token-file"])
            .arg(&token)
            .args(["--proxy", "direct", "--tls", "native"])
            .args(["--allow", "backend.internal:80"])
            .env("SSL_CERT_FILE", mitm.p("ca.crt"));
        if let Some(ca) = ca {
            cmd.arg("--ca").arg(ca);
        }
        Proc::spawn(name, &mut cmd).unwrap()
    };
    let pinned = connector("connector-pinned", Some(&real.p("ca.crt")));
    pinned
        .wait_for(&["cannot reach the gateway"], Duration::from_secs(15))
        .unwrap();
    assert!(!dmz.log().contains("connector session up"), "{}", dmz.log());
    assert!(!dmz.log().contains("refused token"), "{}", dmz.log());
    drop(pinned);
    // The control: trusting the OS store, the same connector takes the interceptor.
    let _open = connector("connector-os-store", None);
    dmz.wait_for(&["connector session up"], Duration::from_secs(15))
        .unwrap();
}
