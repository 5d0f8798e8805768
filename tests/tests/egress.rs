//! The way out, against real proxies: squid with no authentication, Basic (`basic_ncsa_auth`),
//! Digest (`digest_file_auth`), NTLM (our `sp-ntlm-helper`, which checks the NTLMv2 answer
//! against a known password) and Negotiate (`negotiate_kerberos_auth` with a real MIT KDC and a
//! `kinit` ticket); squid doing TLS inspection; dante with and without username/password; a
//! PAC file over HTTP whose first proxy is dead; the environment with `NO_PROXY`; and
//! `sallyport doctor`.
//!
//! Each test proves the tunnel really went through the proxy (its log names the CONNECT to the
//! gateway, and the user) and that wrong credentials give the clear error, once.

use sallyport_e2e::kdc::{Kdc, ALICE, ALICE_PASSWORD, REALM};
use sallyport_e2e::*;
use std::process::Command;
use std::time::Duration;

fn curl() -> Command {
    require_tool("curl");
    let mut c = Command::new("curl");
    c.args(["-sS", "--max-time", "60"]);
    c
}

/// Starts gateway, connector and an agent with `args`/`env`, and checks that a request through
/// the agent reaches the internal service.
fn system_via(tag: &str, args: &[&str], env: &[(&str, &str)]) -> System {
    let svc = http_service().unwrap();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let sys = System::start_with(
        tag,
        &allow_backend(svc.port()),
        &["backend.internal=127.0.0.1"],
        &[],
        &args,
        env,
    )
    .unwrap();
    let (code, out, err) = run(curl()
        .arg("--socks5-hostname")
        .arg(sys.socks.to_string())
        .arg(format!("http://backend.internal:{}/", svc.port())))
    .unwrap();
    assert_eq!(
        (code, out.as_str()),
        (0, "hello from backend.internal\n"),
        "{err}\n{}",
        sys.agent.log()
    );
    sys
}

/// Stops the agent (squid logs a tunnel when it ends) and waits for the proof in squid's log.
fn tunnel_logged(mut sys: System, squid: &Squid, user: &str) -> String {
    let connect = format!("CONNECT 127.0.0.1:{}", sys.gw_port());
    sys.agent.kill();
    squid
        .wait_for_log(&["TCP_TUNNEL/200", &connect, user], Duration::from_secs(10))
        .unwrap()
}

#[test]
fn squid_without_authentication() {
    let squid = Squid::start_with("sq-open", SquidAuth::None).unwrap();
    let proxy = format!("http://127.0.0.1:{}", squid.port);
    let sys = system_via("via-sq-open", &["--proxy", &proxy], &[]);
    tunnel_logged(sys, &squid, "");
}

/// Basic: right password through, the password in no log; a wrong one is reported once and
/// never retried (the account would lock).
#[test]
fn squid_with_basic_auth() {
    let squid = Squid::start_with(
        "sq-basic",
        SquidAuth::Basic {
            user: "alice",
            password: "s3cret",
        },
    )
    .unwrap();
    let proxy = format!("http://alice@127.0.0.1:{}", squid.port);
    let sys = system_via(
        "via-sq-basic",
        &["--proxy", &proxy],
        &[("SALLYPORT_PROXY_PASSWORD", "s3cret")],
    );
    assert!(!sys.agent.log().contains("s3cret"), "password in the log");
    let denied = || {
        squid
            .access_log()
            .lines()
            .filter(|l| l.contains("TCP_DENIED/407"))
            .count()
    };
    let denied_before = denied();
    let bad = sys
        .spawn_agent(
            "agent-bad-pw",
            &["--proxy", &proxy],
            &[("SALLYPORT_PROXY_PASSWORD", "wrong-pw")],
        )
        .unwrap();
    bad.wait_for(
        &["rejected the Basic credentials of user `alice`"],
        Duration::from_secs(10),
    )
    .unwrap();
    bad.wait_for(&["not retrying"], Duration::from_secs(10))
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(!bad.log().contains("wrong-pw"), "password in the log");
    // One 407 for the request without credentials, one for the wrong password, no more.
    assert_eq!(
        denied() - denied_before,
        2,
        "a rejected password was retried:\n{}",
        squid.access_log()
    );
    tunnel_logged(sys, &squid, "alice");
}

#[test]
fn squid_with_digest_auth() {
    let squid = Squid::start_with(
        "sq-digest",
        SquidAuth::Digest {
            user: "alice",
            password: "d1gest-pw",
        },
    )
    .unwrap();
    let proxy = format!("http://127.0.0.1:{}", squid.port);
    let sys = system_via(
        "via-sq-digest",
        &["--proxy", &proxy, "--proxy-user", "alice"],
        &[("SALLYPORT_PROXY_PASSWORD", "d1gest-pw")],
    );
    let bad = sys
        .spawn_agent(
            "agent-digest-bad",
            &["--proxy", &proxy, "--proxy-user", "alice"],
            &[("SALLYPORT_PROXY_PASSWORD", "nope")],
        )
        .unwrap();
    bad.wait_for(
        &["rejected the Digest credentials of user `alice`"],
        Duration::from_secs(10),
    )
    .unwrap();
    tunnel_logged(sys, &squid, "alice");
}

/// NTLMv2, two rounds on one connection, checked by a helper that knows the password; the
/// credentials come from a 0600 file.
#[test]
fn squid_with_ntlm_auth() {
    let squid = Squid::start_with(
        "sq-ntlm",
        SquidAuth::Ntlm {
            password: "Ntlm-Pw-1",
        },
    )
    .unwrap();
    let proxy = format!("http://127.0.0.1:{}", squid.port);
    let creds = TempDir::new("ntlm-creds");
    let file = creds.path().join("proxy-credentials");
    std::fs::write(&file, "CORP\\alice:Ntlm-Pw-1\n").unwrap();
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let file_arg = file.display().to_string();
    let sys = system_via(
        "via-sq-ntlm",
        &["--proxy", &proxy, "--proxy-credentials", &file_arg],
        &[],
    );
    // Wrong password: the helper says NA, squid answers 407, we stop.
    let bad = sys
        .spawn_agent(
            "agent-ntlm-bad",
            &["--proxy", &proxy, "--proxy-user", "CORP\\alice"],
            &[("SALLYPORT_PROXY_PASSWORD", "Ntlm-Pw-2")],
        )
        .unwrap();
    bad.wait_for(
        &["rejected the NTLM credentials of user `CORP", "alice`"],
        Duration::from_secs(10),
    )
    .unwrap();
    // A credentials file others can read is refused, naming the fix.
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let (code, _, err) = sys
        .doctor(&["--proxy", &proxy, "--proxy-credentials", &file_arg], &[])
        .unwrap();
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("chmod 600"), "{err}");
    tunnel_logged(sys, &squid, "alice");
}

/// Negotiate with the user's Kerberos ticket: no password configured at all.
#[test]
fn squid_with_negotiate_kerberos() {
    let kdc = Kdc::start("krb-squid").unwrap();
    // squid and its helper run as squid's user: they read the keytab and write a replay cache.
    std::fs::set_permissions(
        kdc.dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    kdc.kinit(ALICE, ALICE_PASSWORD).unwrap();
    let squid = Squid::start_with("sq-krb", SquidAuth::Negotiate { kdc: &kdc }).unwrap();
    // The service name comes from the proxy's host name: HTTP@localhost.
    let proxy = format!("http://localhost:{}", squid.port);
    let env = kdc.client_env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let sys = system_via("via-sq-krb", &["--proxy", &proxy], &env);
    let user = format!("{ALICE}@{REALM}");
    tunnel_logged(sys, &squid, &user);
}

/// A PAC file served over HTTP answers a failover list whose first proxy is dead: the agent goes
/// on to the second, and squid's log proves it.
#[test]
fn a_pac_failover_list_skips_a_dead_proxy() {
    let squid = Squid::start_with("sq-pac", SquidAuth::None).unwrap();
    let dead = dead_port().unwrap();
    let pac = format!(
        "function FindProxyForURL(url, host) {{\n  if (isPlainHostName(host) || shExpMatch(host, \"*.corp.example\")) return \"DIRECT\";\n  return \"PROXY 127.0.0.1:{dead}; PROXY 127.0.0.1:{}; DIRECT\";\n}}\n",
        squid.port
    );
    let port = file_server(pac, "application/x-ns-proxy-autoconfig").unwrap();
    let url = format!("http://127.0.0.1:{port}/proxy.pac");
    let sys = system_via("via-pac", &["--pac", &url], &[]);
    let log = sys.agent.log();
    assert!(
        log.contains("way out to the gateway found")
            && log.contains(&format!("127.0.0.1:{}", squid.port)),
        "{log}"
    );
    // doctor shows all three, the dead one with its reason.
    let (code, out, err) = sys.doctor(&["--pac", &url], &[]).unwrap();
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!("127.0.0.1:{dead}")) && out.contains("refused"),
        "{out}"
    );
    assert!(
        out.contains(&format!("would use: http://127.0.0.1:{}", squid.port)),
        "{out}"
    );
    tunnel_logged(sys, &squid, "");
}

/// HTTPS_PROXY is used as curl uses it, and NO_PROXY exempts the gateway.
#[test]
fn the_environment_with_no_proxy() {
    let squid = Squid::start_with("sq-env", SquidAuth::None).unwrap();
    let proxy = format!("http://127.0.0.1:{}", squid.port);
    let sys = system_via(
        "via-env-noproxy",
        &[],
        &[("HTTPS_PROXY", &proxy), ("NO_PROXY", "127.0.0.1")],
    );
    let log = sys.agent.log();
    assert!(
        log.contains("way out to the gateway found") && log.contains("direct"),
        "{log}"
    );
    assert!(
        !squid.access_log().contains("CONNECT"),
        "{}",
        squid.access_log()
    );
    drop(sys);
    let sys = system_via("via-env", &[], &[("https_proxy", &proxy)]);
    assert!(
        sys.agent.log().contains("environment https_proxy"),
        "{}",
        sys.agent.log()
    );
    tunnel_logged(sys, &squid, "");
}

/// dante without authentication, then with RFC 1929 username/password against a system user.
#[test]
fn dante_with_and_without_a_password() {
    let open = Dante::start("dante-open", None).unwrap();
    let proxy = format!("socks5h://127.0.0.1:{}", open.port);
    let sys = system_via("via-dante", &["--proxy", &proxy], &[]);
    let gw = format!("127.0.0.1.{}", sys.gw_port());
    assert!(open.log().contains(&gw), "{}", open.log());
    drop(sys);

    let authed = Dante::start("dante-auth", Some(("spsocks", "S0cks-pw"))).unwrap();
    let proxy = format!("socks5://spsocks@127.0.0.1:{}", authed.port);
    let sys = system_via(
        "via-dante-auth",
        &["--proxy", &proxy],
        &[("SALLYPORT_PROXY_PASSWORD", "S0cks-pw")],
    );
    let gw = format!("127.0.0.1.{}", sys.gw_port());
    let log = authed.log();
    assert!(log.contains("spsocks") && log.contains(&gw), "{log}");
    let bad = sys
        .spawn_agent(
            "agent-dante-bad",
            &["--proxy", &proxy],
            &[("SALLYPORT_PROXY_PASSWORD", "wrong")],
        )
        .unwrap();
    bad.wait_for(
        &["rejected the credentials of user `spsocks`"],
        Duration::from_secs(10),
    )
    .unwrap();
}

/// `doctor` names each candidate's source, time and exact reason, then the path it would use.
#[test]
fn doctor_explains_every_candidate() {
    let squid = Squid::start_with("sq-doctor", SquidAuth::Ntlm { password: "x" }).unwrap();
    let proxy = format!("http://127.0.0.1:{}", squid.port);
    let sys = system_via("doctor", &["--proxy", "direct"], &[]);
    let (code, out, err) = sys.doctor(&[], &[("HTTPS_PROXY", &proxy)]).unwrap();
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("[environment HTTPS_PROXY]"), "{out}");
    assert!(
        out.contains("answered 407, asked for NTLM, no credentials configured"),
        "{out}"
    );
    assert!(out.contains("would use: direct"), "{out}");
    assert!(out.contains("ms"), "{out}");
    // Only the proxy, which needs credentials: exit code 1.
    let (code, out, _) = sys.doctor(&["--proxy", &proxy], &[]).unwrap();
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("no way out to the gateway works"), "{out}");
}

/// Through a TLS-inspecting squid (ssl_bump re-signing with a corporate CA the agent does not
/// trust), a v2 session still comes up, sealed (any certificate is transport only), and
/// `doctor` names who re-signed the certificate (the gateway's handshake lists its own key,
/// which the agent did not see), with the request for the proxy's admins.
#[test]
fn doctor_names_a_tls_inspecting_proxy() {
    require_tool("openssl");
    let ca = TempDir::new("corp-ca");
    let (cert, key) = corp_ca(ca.path()).unwrap();
    let squid = Squid::start_with(
        "sq-bump",
        SquidAuth::Bump {
            ca_cert: &cert,
            ca_key: &key,
        },
    )
    .unwrap();
    let proxy = format!("http://127.0.0.1:{}", squid.port);
    let sys = system_via("doctor-bump", &["--proxy", "direct"], &[]);
    let (code, out, err) = sys.doctor(&["--proxy", &proxy], &[]).unwrap();
    assert_eq!(code, 0, "{out}{err}\n{}", squid.cache_log());
    assert!(
        out.contains("re-signed by CN=Corp Inspection CA, O=Corp"),
        "{out}"
    );
    assert!(out.contains("TLS-inspecting proxy"), "{out}");
    assert!(out.contains("sealed by protocol v2"), "{out}");
    assert!(out.contains("please exempt"), "{out}");
}

/// A PAC that never returns is cut off at its time limit, reported, and the automatic chain
/// (here: direct) takes over.
#[test]
fn a_looping_pac_is_cut_off_and_the_next_candidate_used() {
    let port = file_server(
        "function FindProxyForURL(url, host) { while (true) {} }".into(),
        "application/x-ns-proxy-autoconfig",
    )
    .unwrap();
    let url = format!("http://127.0.0.1:{port}/loop.pac");
    let sys = system_via("via-pac-loop", &["--pac", &url], &[]);
    let (code, out, err) = sys.doctor(&["--pac", &url], &[]).unwrap();
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&url) && out.contains("using the automatic chain instead"),
        "{out}"
    );
    assert!(out.contains("would use: direct"), "{out}");
}
