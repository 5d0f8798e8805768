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
    let (code, out, err) = curl_backend(sys.socks, svc.port());
    assert_eq!(
        (code, out.as_str()),
        (0, BACKEND_HELLO),
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
    // One 407 for the request without credentials, one for the wrong password, no more. squid
    // logs a request once it is done, which may be after the agent read the answer: polled
    // until both are there (a retry would have come right after the second).
    eventually(Duration::from_secs(10), denied, |n| *n >= denied_before + 2);
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
    // squid logs a tunnel when it ends: the agent stops, and whether it went through squid is
    // read once squid has logged a later tunnel (its gateway runs on: the ports differ).
    let mut exempted = sys;
    exempted.agent.kill();
    let exempt = format!("CONNECT 127.0.0.1:{}", exempted.gw_port());
    let sys = system_via("via-env", &[], &[("https_proxy", &proxy)]);
    assert!(
        sys.agent.log().contains("environment https_proxy"),
        "{}",
        sys.agent.log()
    );
    let log = tunnel_logged(sys, &squid, "");
    assert!(!log.contains(&exempt), "{log}");
    drop(exempted);
}

/// dante without authentication, then with RFC 1929 username/password against a system user.
#[test]
fn dante_with_and_without_a_password() {
    let open = Dante::start("dante-open", None).unwrap();
    let proxy = format!("socks5h://127.0.0.1:{}", open.port);
    let sys = system_via("via-dante", &["--proxy", &proxy], &[]);
    let gw = format!("127.0.0.1.{}", sys.gw_port());
    // dante writes its log on its own time: polled.
    let log = eventually(Duration::from_secs(10), || open.log(), |l| l.contains(&gw));
    assert!(log.contains(&gw), "{log}");
    drop(sys);

    let authed = Dante::start("dante-auth", Some(("spsocks", "S0cks-pw"))).unwrap();
    let proxy = format!("socks5://spsocks@127.0.0.1:{}", authed.port);
    let sys = system_via(
        "via-dante-auth",
        &["--proxy", &proxy],
        &[("SALLYPORT_PROXY_PASSWORD", "S0cks-pw")],
    );
    let gw = format!("127.0.0.1.{}", sys.gw_port());
    let logged = |l: &String| l.contains("spsocks") && l.contains(&gw);
    let log = eventually(Duration::from_secs(10), || authed.log(), logged);
    assert!(logged(&log), "{log}");
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

/// `https_proxy=http://user:password@proxy:3128` was refused at start-up; curl, pip, git and
/// apt accept it. The password (percent-decoded) is used, and shown in no log line, error or
/// `doctor` output; a wrong one is still reported once, without it.
#[test]
fn a_password_in_https_proxy_was_refused() {
    let squid = Squid::start_with(
        "sq-env-pw",
        SquidAuth::Basic {
            user: "alice",
            password: "s3cr@t-env",
        },
    )
    .unwrap();
    let url = format!("http://alice:s3cr%40t-env@127.0.0.1:{}", squid.port);
    let sys = system_via("via-env-pw", &[], &[("https_proxy", &url)]);
    let (code, out, err) = sys.doctor(&[], &[("https_proxy", &url)]).unwrap();
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("http://alice@127.0.0.1"), "{out}");
    for shown in [out.as_str(), err.as_str(), &sys.agent.log()] {
        assert!(
            !shown.contains("s3cr") && !shown.contains("%40t"),
            "password shown:\n{shown}"
        );
    }
    let bad_url = format!("http://alice:wr0ng-env@127.0.0.1:{}", squid.port);
    let bad = sys
        .spawn_agent("agent-env-pw-bad", &[], &[("https_proxy", &bad_url)])
        .unwrap();
    bad.wait_for(
        &["rejected the Basic credentials of user `alice`"],
        Duration::from_secs(10),
    )
    .unwrap();
    assert!(!bad.log().contains("wr0ng"), "password in the log");
    tunnel_logged(sys, &squid, "alice");
}

/// `https_proxy=http://CORP%5Calice@proxy:3128` with SALLYPORT_PROXY_PASSWORD was refused at
/// start-up ("no proxy user"): the user in the environment's URL counts, percent-decoded, and
/// our strict NTLM helper checks the NTLMv2 proof for `CORP\alice`.
#[test]
fn the_user_in_https_proxy_was_not_counted() {
    let squid = Squid::start_with(
        "sq-env-user",
        SquidAuth::Ntlm {
            password: "Ntlm-Env-1",
        },
    )
    .unwrap();
    let url = format!("http://CORP%5Calice@127.0.0.1:{}", squid.port);
    let sys = system_via(
        "via-env-user",
        &[],
        &[
            ("https_proxy", &url),
            ("SALLYPORT_PROXY_PASSWORD", "Ntlm-Env-1"),
        ],
    );
    assert!(
        !sys.agent.log().contains("Ntlm-Env-1"),
        "password in the log"
    );
    tunnel_logged(sys, &squid, "alice");
}

/// squid's stock `ntlm_fake_auth` sends a challenge whose TargetName lies outside the message
/// (offset 2863311534): curl --proxy-ntlm gets through, the agent refused it.
#[test]
fn squid_ntlm_fake_auth_target_name_outside_the_message() {
    let squid = Squid::start_with("sq-ntlm-fake", SquidAuth::NtlmFake).unwrap();
    let proxy = format!("http://127.0.0.1:{}", squid.port);
    let sys = system_via(
        "via-sq-ntlm-fake",
        &["--proxy", &proxy, "--proxy-user", "CORP\\alice"],
        &[("SALLYPORT_PROXY_PASSWORD", "anything")],
    );
    // curl, as the reference: the CONNECT gets 200 through the same squid.
    let (_, connect, err) = run(curl()
        .args(["-k", "-o", "/dev/null", "-w", "%{http_connect}"])
        .args(["-x", &proxy, "--proxy-ntlm", "-U", "CORP\\alice:anything"])
        .arg(format!("https://127.0.0.1:{}/", sys.gw_port())))
    .unwrap();
    assert_eq!(connect, "200", "curl: {err}");
    tunnel_logged(sys, &squid, "alice");
}

/// A corrected password in the credentials file was not picked up until a restart: the agent
/// parks after the 407 (so the account does not lock), and a change of the file ends that.
#[test]
fn a_corrected_credentials_file_needed_a_restart() {
    let squid = Squid::start_with(
        "sq-creds-reload",
        SquidAuth::Basic {
            user: "alice",
            password: "Right-pw-1",
        },
    )
    .unwrap();
    let proxy = format!("http://127.0.0.1:{}", squid.port);
    let sys = system_via("creds-reload", &["--proxy", "direct"], &[]);
    let creds = TempDir::new("creds-reload");
    let file = creds.path().join("proxy-credentials");
    std::fs::write(&file, "alice:Wrong-pw-1\n").unwrap();
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let file_arg = file.display().to_string();
    let agent = sys
        .spawn_agent(
            "agent-creds-reload",
            &["--proxy", &proxy, "--proxy-credentials", &file_arg],
            &[],
        )
        .unwrap();
    agent
        .wait_for(
            &["rejected the Basic credentials of user `alice`"],
            Duration::from_secs(10),
        )
        .unwrap();
    agent
        .wait_for(
            &["not retrying", "it is read again when it changes"],
            Duration::from_secs(10),
        )
        .unwrap();
    std::fs::write(&file, "alice:Right-pw-1\n").unwrap();
    agent
        .wait_for(
            &["the proxy credentials file changed"],
            Duration::from_secs(10),
        )
        .unwrap();
    agent
        .wait_for(&["connected to the gateway"], Duration::from_secs(10))
        .unwrap();
    let log = agent.log();
    assert!(
        !log.contains("Wrong-pw") && !log.contains("Right-pw"),
        "{log}"
    );
    let connect = format!("CONNECT 127.0.0.1:{}", sys.gw_port());
    drop(agent);
    squid
        .wait_for_log(
            &["TCP_TUNNEL/200", &connect, "alice"],
            Duration::from_secs(10),
        )
        .unwrap();
}

/// A Kerberos ticket obtained after the agent started was not used until a restart: without a
/// ticket the attempt fails saying `kinit`, and after kinit the next attempt gets through. An
/// agent whose password the same proxy rejected (Basic, offered too) was parked for good, and
/// the proxy was never asked again: the new ticket ends the parking, and the rejected password
/// stays held back.
#[test]
fn a_kerberos_ticket_obtained_after_start_was_not_used() {
    let kdc = Kdc::start("krb-later").unwrap();
    std::fs::set_permissions(
        kdc.dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    // Negotiate, and Basic with an empty user list: every password is rejected.
    let opts = SquidOpts {
        extra: "auth_param basic program /usr/lib/squid/basic_ncsa_auth /dev/null\nauth_param basic realm corp\n".into(),
        ..Default::default()
    };
    let squid =
        Squid::start_opts("sq-krb-later", SquidAuth::Negotiate { kdc: &kdc }, &opts).unwrap();
    let proxy = format!("http://localhost:{}", squid.port);
    let sys = system_via("krb-later", &["--proxy", "direct"], &[]);
    let env = kdc.client_env();
    let mut env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let agent = sys
        .spawn_agent("agent-krb-later", &["--proxy", &proxy], &env)
        .unwrap();
    agent
        .wait_for(&["no Kerberos ticket: run kinit"], Duration::from_secs(10))
        .unwrap();
    env.push(("SALLYPORT_PROXY_PASSWORD", "Not-the-pw-1"));
    let parked = sys
        .spawn_agent(
            "agent-krb-parked",
            &["--proxy", &proxy, "--proxy-user", "alice"],
            &env,
        )
        .unwrap();
    parked
        .wait_for(
            &["rejected the Basic credentials of user `alice`"],
            Duration::from_secs(10),
        )
        .unwrap();
    parked
        .wait_for(&["not retrying"], Duration::from_secs(10))
        .unwrap();
    kdc.kinit(ALICE, ALICE_PASSWORD).unwrap();
    for a in [&agent, &parked] {
        a.wait_for(&["connected to the gateway"], Duration::from_secs(20))
            .unwrap();
    }
    let basic_tries = squid
        .access_log()
        .lines()
        .filter(|l| l.contains("TCP_DENIED/407") && l.contains("alice"))
        .count();
    assert!(
        basic_tries <= 1,
        "the rejected password went out again:\n{}",
        squid.access_log()
    );
    drop((agent, parked));
    let user = format!("{ALICE}@{REALM}");
    squid
        .wait_for_log(&["TCP_TUNNEL/200", &user], Duration::from_secs(10))
        .unwrap();
}

/// Admins could not turn off WPAD, NTLM or Basic: with `ntlm = off` / `basic = off` /
/// `wpad = off` in a policy file, each refusal names the policy and its file in one line.
#[test]
fn admins_could_not_turn_off_wpad_ntlm_or_basic() {
    let squid = Squid::start_with(
        "sq-policy",
        SquidAuth::Basic {
            user: "alice",
            password: "Pol-pw-1",
        },
    )
    .unwrap();
    let ntlm = Squid::start_with("sq-policy-ntlm", SquidAuth::NtlmFake).unwrap();
    let sys = system_via("policy", &["--proxy", "direct"], &[]);
    let dir = TempDir::new("policy");
    let file = dir.path().join("policy.toml");
    std::fs::write(&file, "wpad = \"off\"\nntlm = \"off\"\nbasic = \"off\"\n").unwrap();
    let shown = file.display().to_string();
    let env = [
        ("SALLYPORT_POLICY", shown.as_str()),
        ("SALLYPORT_PROXY_PASSWORD", "Pol-pw-1"),
    ];
    for (port, scheme) in [(squid.port, "basic"), (ntlm.port, "ntlm")] {
        let proxy = format!("http://alice@127.0.0.1:{port}");
        let (code, out, err) = sys.doctor(&["--proxy", &proxy], &env).unwrap();
        assert_eq!(code, 1, "{out}{err}");
        let line = format!(
            "{} not answered: turned off by admin policy `{scheme} = off` in {shown}",
            if scheme == "ntlm" { "NTLM" } else { "Basic" }
        );
        assert!(out.contains(&line), "{out}");
    }
    // WPAD: not looked up at all (nor the OS's auto-detect); direct still works.
    let env = [("SALLYPORT_POLICY", shown.as_str())];
    let (code, out, err) = sys.doctor(&[], &env).unwrap();
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!(
            "WPAD: not looked up: turned off by admin policy `wpad = off` in {shown}"
        )),
        "{out}"
    );
    // A typo in the policy stops the agent with the file and the key.
    std::fs::write(&file, "ntlm = \"of\"\n").unwrap();
    let (code, _, err) = sys.doctor(&[], &env).unwrap();
    assert_eq!(code, 64, "{err}");
    assert!(
        err.contains(&format!("policy file {shown}: `ntlm` must be")),
        "{err}"
    );
}
