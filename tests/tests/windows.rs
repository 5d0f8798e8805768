//! The Windows agent, for real, under Wine: `sallyport.exe` (built for x86_64-pc-windows-gnu)
//! against the real Linux DMZ gateway and connector on loopback, with Windows programs as its
//! clients (`sallyport.exe connect` and `sp-wnc.exe`, a small Windows TCP client built from
//! `tests/windows/sp-wnc.c`). The harness (`tests/src/wine.rs`) installs Wine, the mingw-w64
//! compiler and the rustup target when missing, builds the .exe once and boots one fresh prefix.
//! What Wine can and cannot show is in docs/install.md ("Windows: what is tested where").

use sallyport_e2e::wine::{self, http_complete, split_response, Wine};
use sallyport_e2e::*;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const MIB20: u64 = 20 << 20;

/// The shared Wine, for this test alone, with no proxy settings and no enrollment left by
/// another test.
fn windows() -> (std::sync::MutexGuard<'static, ()>, &'static Wine) {
    let l = Wine::lock();
    let wine = Wine::get();
    wine.clear_internet_settings();
    let _ = std::fs::remove_dir_all(appdata_sallyport(wine));
    (l, wine)
}

/// The Linux DMZ and connector serving `backend.internal` (an [`http_service`] on loopback).
fn gateway(tag: &str) -> (u16, Gateway) {
    let svc = http_service().unwrap();
    let gw = Gateway::start(
        tag,
        &allow_backend(svc.port()),
        &["backend.internal=127.0.0.1"],
        &Where::default(),
    )
    .unwrap();
    (svc.port(), gw)
}

/// `sallyport.exe run` against `gw`, SOCKS5 and HTTP on free ports, plus `extra` arguments.
fn windows_agent(wine: &Wine, gw: &Gateway, extra: &[String]) -> Proc {
    let mut args: Vec<String> = vec![
        "run".into(),
        "--gateway".into(),
        gw.gw_url.clone(),
        "--token-file".into(),
        Wine::path(&gw.pki.p("alice-laptop.token")),
        "--ca".into(),
        Wine::path(&gw.pki.p("ca.crt")),
        "--socks".into(),
        "127.0.0.1:0".into(),
        "--http".into(),
        "127.0.0.1:0".into(),
    ];
    args.extend(extra.iter().cloned());
    wine.spawn_agent("windows agent", &args).unwrap()
}

/// The `addr=` of the agent's `listening` line for `kind` (`socks5`, `http`, `forward`).
fn listening(agent: &Proc, kind: &str) -> SocketAddr {
    agent.addr(&["listening", kind]).unwrap()
}

/// A gateway (tagged `tag`) and a Windows agent connected to it: (the service's port, the
/// gateway, the agent, its SOCKS5 and HTTP addresses).
fn connected_agent(wine: &Wine, tag: &str) -> (u16, Gateway, Proc, SocketAddr, SocketAddr) {
    let (port, gw) = gateway(tag);
    let agent = windows_agent(wine, &gw, &[]);
    let socks = listening(&agent, "socks5");
    let http = listening(&agent, "http");
    agent
        .wait_for(&["connected to the gateway"], Duration::from_secs(30))
        .unwrap();
    (port, gw, agent, socks, http)
}

/// A Windows client's `GET /` through the agent's HTTP proxy reaches the service.
fn hello_through_http(wine: &Wine, agent: &Proc, http: SocketAddr, port: u16) {
    let out = proxy_get(wine, http, port, "/");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("hello from backend.internal"),
        "{:?} {:?} {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        agent.log()
    );
}

/// `GET http://backend.internal:PORT{path}` through the agent's HTTP proxy `http`, from
/// `sp-wnc.exe` (which lets the proxy close after `Connection: close`).
fn proxy_get(wine: &Wine, http: SocketAddr, port: u16, path: &str) -> std::process::Output {
    wine.run_with_input(
        wine.exe("sp-wnc.exe")
            .args([&http.ip().to_string(), &http.port().to_string(), "-k"]),
        format!(
            "GET http://backend.internal:{port}{path} HTTP/1.1\r\nHost: backend.internal:{port}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .unwrap()
}

/// The body of a 200 answer, checked: `len` pattern bytes.
fn check_pattern_body(what: &str, raw: &[u8], len: u64) {
    let (head, body) = split_response(raw).unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{what}: {head}");
    assert_eq!(body.len() as u64, len, "{what}: body length");
    assert_eq!(sha256_hex(body), pattern_sha256(len), "{what}: body hash");
}

#[test]
fn the_windows_agent_carries_20_mib_each_way_over_socks5_http_and_a_forward_for_windows_clients() {
    let (_l, wine) = windows();
    let (port, gw) = gateway("win-data");
    let agent = windows_agent(
        wine,
        &gw,
        &[
            "--forward".into(),
            format!("127.0.0.1:0=backend.internal:{port}"),
        ],
    );
    let socks = listening(&agent, "socks5");
    let http = listening(&agent, "http");
    let forward = listening(&agent, "forward");
    agent
        .wait_for(&["connected to the gateway"], Duration::from_secs(30))
        .unwrap();
    let get = |path: &str| {
        format!("GET {path} HTTP/1.1\r\nHost: backend.internal:{port}\r\nConnection: close\r\n\r\n")
    };
    let t = Instant::now();

    // SOCKS5: `sallyport.exe connect` (the ssh ProxyCommand) as the app.
    let connect = |request: Vec<u8>| {
        wine.exchange(
            wine.exe("sallyport.exe").args([
                "connect",
                "backend.internal",
                &port.to_string(),
                "--socks",
                &socks.to_string(),
            ]),
            request,
            http_complete,
        )
        .unwrap()
    };
    let out = connect(get(&format!("/bytes/{MIB20}")).into_bytes());
    assert!(
        out.status.success(),
        "connect: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        agent.log()
    );
    check_pattern_body("socks5 download", &out.stdout, MIB20);

    // Upload, same way: the service answers the body's sha256.
    let mut body = vec![0u8; MIB20 as usize];
    pattern(0, &mut body);
    let mut req = format!(
        "POST /sha256 HTTP/1.1\r\nHost: backend.internal:{port}\r\nContent-Length: {MIB20}\r\nConnection: close\r\n\r\n"
    )
    .into_bytes();
    req.extend_from_slice(&body);
    let out = connect(req);
    let (head, answer) = split_response(&out.stdout).unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "upload: {head}");
    assert_eq!(
        String::from_utf8_lossy(answer).trim(),
        pattern_sha256(MIB20),
        "socks5 upload hash"
    );

    // HTTP proxy: an absolute-form request from a Windows TCP client.
    let out = proxy_get(wine, http, port, &format!("/bytes/{MIB20}"));
    assert!(
        out.status.success(),
        "sp-wnc via http: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    check_pattern_body("http proxy download", &out.stdout, MIB20);

    // The static forward.
    let out = wine
        .run_with_input(
            wine.exe("sp-wnc.exe")
                .args([&forward.ip().to_string(), &forward.port().to_string()]),
            get(&format!("/bytes/{MIB20}")).as_bytes(),
        )
        .unwrap();
    assert!(
        out.status.success(),
        "sp-wnc via forward: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    check_pattern_body("forward download", &out.stdout, MIB20);
    eprintln!(
        "windows data path: 80 MiB in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    // The DMZ stamped the Windows agent's token identity on the streams.
    gw.dmz
        .wait_for(
            &["stream closed", "alice-laptop", "backend.internal"],
            Duration::from_secs(15),
        )
        .unwrap();
}

/// Switches on the manual proxy of Internet Options: `ProxyEnable` = 1, `ProxyServer` = `value`.
fn manual_proxy(wine: &Wine, value: &str) {
    wine.set_internet_setting("ProxyEnable", "REG_DWORD", "1")
        .unwrap();
    wine.set_internet_setting("ProxyServer", "REG_SZ", value)
        .unwrap();
}

/// The gateway's port, as squid logs it (`CONNECT 127.0.0.1:PORT`).
fn gw_port(gw: &Gateway) -> String {
    gw.gw_url
        .trim_end_matches('/')
        .rsplit(':')
        .next()
        .unwrap()
        .to_string()
}

/// `sallyport.exe doctor` against `gw` (its token and CA) with `extra` arguments and
/// environment: (exit code, stdout, stderr).
fn windows_doctor(
    wine: &Wine,
    gw: &Gateway,
    url: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> (i32, String, String) {
    run(wine
        .exe("sallyport.exe")
        .args(["doctor", "--gateway", url, "--token-file"])
        .arg(Wine::path(&gw.pki.p("alice-laptop.token")))
        .arg("--ca")
        .arg(Wine::path(&gw.pki.p("ca.crt")))
        .args(extra)
        .envs(env.iter().copied()))
    .unwrap()
}

/// Whether `sallyport doctor`'s output shows the candidate `127.0.0.1:PORT` from `source`
/// reaching the gateway (its line, then `ok in …`).
fn candidate_ok(out: &str, port: u16, source: &str) -> bool {
    out.lines()
        .skip_while(|l| !(l.contains(&format!("127.0.0.1:{port}")) && l.contains(source)))
        .nth(1)
        .is_some_and(|l| l.trim_start().starts_with("ok in"))
}

/// `sallyport.exe doctor` as user `alice` with `password` (in its environment only): the
/// candidate `squid` from `source` reaches the gateway, the password shows in no output, and
/// squid logs alice's tunnel.
fn doctor_through_squid(wine: &Wine, gw: &Gateway, squid: &Squid, source: &str, password: &str) {
    let (code, out, err) = windows_doctor(
        wine,
        gw,
        &gw.gw_url,
        &["--proxy-user", "alice"],
        &[("SALLYPORT_PROXY_PASSWORD", password)],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(candidate_ok(&out, squid.port, source), "{out}{err}");
    assert!(!format!("{out}{err}").contains(password), "password shown");
    let log = squid
        .wait_for_log(
            &[&format!("CONNECT 127.0.0.1:{}", gw_port(gw)), "alice"],
            Duration::from_secs(10),
        )
        .unwrap();
    assert!(log.contains("TCP_TUNNEL/200"), "{log}");
}

/// Clears the proxy values from the registry when dropped (the prefix is shared).
struct ClearSettings<'a>(&'a Wine);

impl Drop for ClearSettings<'_> {
    fn drop(&mut self) {
        self.0.clear_internet_settings();
    }
}

/// WinINET's per-user settings, written with `wine reg add` as Internet Options writes them,
/// are the way out: `ProxyServer` as `host:port` and as `http=…;https=…`, through squid with
/// Basic (user and password given to the agent, the password only in the environment);
/// `ProxyOverride` with `<local>` sends a dotless gateway name direct; `AutoConfigURL` (a PAC
/// served over HTTP) and the auto-detect flag of `DefaultConnectionSettings` become candidates;
/// a bad `ProxyServer` is rejected with a message naming the value.
#[test]
fn registry_proxy_settings_lead_the_windows_agent_through_squid_with_basic() {
    let (_l, wine) = windows();
    let _clear = ClearSettings(wine);
    wine.clear_internet_settings();
    let (_port, gw) = gateway("win-reg");
    let gw_port = gw_port(&gw);
    let squid = Squid::start_with(
        "win-sq-basic",
        SquidAuth::Basic {
            user: "alice",
            password: "w1n-s3cret",
        },
    )
    .unwrap();
    let auth: &[&str] = &["--proxy-user", "alice"];
    let pw = [("SALLYPORT_PROXY_PASSWORD", "w1n-s3cret")];
    let connects = || {
        squid
            .access_log()
            .lines()
            .filter(|l| l.contains(&format!("127.0.0.1:{gw_port}")) && l.contains("alice"))
            .count()
    };
    // squid logs a tunnel when it ends.
    let more_connects_than = |before: usize| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while connects() <= before && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        connects() > before
    };

    // host:port, switched on: the agent's candidate from the registry goes through squid,
    // authenticated (the gateway is on loopback, so direct works too and is listed after it).
    manual_proxy(wine, &format!("127.0.0.1:{}", squid.port));
    let ok_via_squid = |out: &str| candidate_ok(out, squid.port, "Windows Internet Options");
    doctor_through_squid(wine, &gw, &squid, "Windows Internet Options", "w1n-s3cret");

    // http=…;https=…: the https= entry is the proxy for the tunnel.
    wine.set_internet_setting(
        "ProxyServer",
        "REG_SZ",
        &format!("http=127.0.0.1:1;https=127.0.0.1:{}", squid.port),
    )
    .unwrap();
    let before = connects();
    let (code, out, err) = windows_doctor(wine, &gw, &gw.gw_url, auth, &pw);
    assert_eq!(code, 0, "{out}{err}");
    assert!(ok_via_squid(&out), "{out}{err}");
    assert!(more_connects_than(before), "{out}\n{}", squid.access_log());

    // ProxyOverride with <local>: a gateway named without a dot goes direct.
    wine.set_internet_setting("ProxyOverride", "REG_SZ", "<local>")
        .unwrap();
    let local_url = format!("wss://localhost:{gw_port}/");
    let (code, out, err) = windows_doctor(wine, &gw, &local_url, auth, &pw);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("would use: direct"), "{out}");
    assert!(out.contains("its exceptions exempt localhost"), "{out}");

    // AutoConfigURL: the PAC script, fetched and run, sends the gateway to squid; Basic is not
    // sent to a proxy a PAC named (it could be spoofed), and doctor says so.
    wine.set_internet_setting("ProxyEnable", "REG_DWORD", "0")
        .unwrap();
    let pac = file_server(
        format!(
            "function FindProxyForURL(url, host) {{ return \"PROXY 127.0.0.1:{}\"; }}\n",
            squid.port
        ),
        "application/x-ns-proxy-autoconfig",
    )
    .unwrap();
    let pac_url = format!("http://127.0.0.1:{pac}/proxy.pac");
    wine.set_internet_setting("AutoConfigURL", "REG_SZ", &pac_url)
        .unwrap();
    let (code, out, err) = windows_doctor(wine, &gw, &gw.gw_url, auth, &pw);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&format!("PAC {pac_url}")), "{out}");
    assert!(
        out.contains(&format!(
            "proxy http://127.0.0.1:{} answered 407",
            squid.port
        )) && out.contains("Basic would send the password in clear to a proxy found by WPAD/PAC"),
        "{out}"
    );

    // The auto-detect flag: WPAD is a candidate, tried first.
    wine.reg(&[
        "add",
        &format!(r"{}\Connections", wine::INTERNET_SETTINGS),
        "/v",
        "DefaultConnectionSettings",
        "/t",
        "REG_BINARY",
        "/d",
        "460000000200000009000000",
        "/f",
    ])
    .unwrap();
    let (_, out, err) = windows_doctor(wine, &gw, &gw.gw_url, &["--connect-timeout", "3s"], &[]);
    assert!(out.contains("WPAD"), "{out}{err}");

    // A bad value: rejected, named, and the rest still works.
    wine.clear_internet_settings();
    wine.set_internet_setting("ProxyEnable", "REG_DWORD", "1")
        .unwrap();
    wine.set_internet_setting("ProxyServer", "REG_SZ", "127.0.0.1:99999")
        .unwrap();
    let (code, out, err) = windows_doctor(wine, &gw, &gw.gw_url, &[], &[]);
    assert!(
        err.contains(
            r#"ProxyServer "127.0.0.1:99999": port `99999` is not a number from 1 to 65535"#
        ),
        "{err}"
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("would use: direct"), "{out}");
}

/// The per-user config folder of the Windows agent inside the prefix (`%APPDATA%\sallyport`),
/// found from Linux.
fn appdata_sallyport(wine: &Wine) -> std::path::PathBuf {
    let users = wine.prefix.join("drive_c").join("users");
    let user = std::env::var("USER").unwrap_or_else(|_| "root".into());
    let dir = users.join(&user);
    let dir = if dir.exists() {
        dir
    } else {
        std::fs::read_dir(&users)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| !p.ends_with("Public"))
            .expect("a user folder in the prefix")
    };
    dir.join("AppData")
        .join("Roaming")
        .join("sallyport")
        .join("config")
}

/// `sallyport.exe enroll` checks the token against the real gateway and keeps it in Wine's
/// Credential Manager (`CredWriteW`, read back with `CredReadW`), not in a file; `run` with no
/// flags then connects with it; `logout` deletes the credential and the files.
#[test]
fn enroll_keeps_the_token_in_credential_manager_and_logout_removes_it() {
    let (_l, wine) = windows();
    let (_port, gw) = gateway("win-enroll");
    let token = std::fs::read_to_string(gw.pki.p("alice-laptop.token")).unwrap();
    let conf = appdata_sallyport(wine);
    let out = wine
        .run_with_input(
            // A v2 token: no --ca, nothing to pin; the token names the gateway's key.
            wine.exe("sallyport.exe")
                .args(["enroll", &gw.gw_url, "--proxy", "direct"]),
            token.as_bytes(),
        )
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("nothing to pin"), "{stdout}{stderr}");
    assert!(!stdout.contains(token.trim()) && !stderr.contains(token.trim()));
    assert_eq!(file_names(&conf), ["agent.toml"], "{stdout}{stderr}");
    let toml = std::fs::read_to_string(conf.join("agent.toml")).unwrap();
    assert!(!toml.contains(token.trim()), "token in agent.toml");
    // `reg query` may run before wineserver has the key (seen once in CI with ten Wine tests
    // at once): asked again for up to 10 s, the credential must be there.
    let deadline = Instant::now() + Duration::from_secs(10);
    let creds = loop {
        let creds = wine
            .reg(&["query", r"HKCU\Software\Wine\Credential Manager", "/s"])
            .unwrap_or_default();
        if creds.contains("sallyport-token:") || Instant::now() > deadline {
            break creds;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        creds.contains("sallyport-token:"),
        "no credential in Wine's Credential Manager:\n{creds}"
    );
    assert!(
        !creds.contains(token.trim()),
        "the token is stored in clear"
    );

    // `run` with no flags: agent.toml, and the token from Credential Manager.
    let agent = wine
        .spawn_agent(
            "enrolled windows agent",
            &[
                "run".into(),
                "--socks".into(),
                "127.0.0.1:0".into(),
                "--http".into(),
                "off".into(),
            ],
        )
        .unwrap();
    agent
        .wait_for(&["connected to the gateway"], Duration::from_secs(30))
        .unwrap();
    drop(agent);

    let (code, stdout, stderr) = run(wine.exe("sallyport.exe").arg("logout")).unwrap();
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("token removed"), "{stdout}");
    assert!(file_names(&conf).is_empty(), "{:?}", file_names(&conf));
    let creds = wine
        .reg(&["query", r"HKCU\Software\Wine\Credential Manager", "/s"])
        .unwrap_or_default();
    assert!(!creds.contains("sallyport-token:"), "{creds}");
}

/// `sallyport.exe service install` writes the HKCU Run value (read back with `wine reg
/// query`) with the quoted command line, and `uninstall` removes it.
#[test]
fn service_install_writes_the_hkcu_run_value_and_uninstall_removes_it() {
    let (_l, wine) = windows();
    let dir = TempDir::new("win-service");
    let conf = dir.path().join("agent.toml");
    std::fs::write(&conf, "gateway = \"wss://127.0.0.1:1/\"\n").unwrap();
    let run_key = r"HKCU\Software\Microsoft\Windows\CurrentVersion\Run";
    let (code, out, err) =
        run(wine
            .exe("sallyport.exe")
            .args(["service", "install", "-c", &Wine::path(&conf)]))
        .unwrap();
    assert_eq!(code, 0, "{out}{err}");
    let q = wine.reg(&["query", run_key, "/v", "Sallyport"]).unwrap();
    assert!(
        q.contains("sallyport.exe") && q.contains(" run -c ") && q.contains(&Wine::path(&conf)),
        "{q}"
    );
    let (code, out, err) = run(wine.exe("sallyport.exe").args(["service", "uninstall"])).unwrap();
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("removed"), "{out}");
    assert!(
        wine.reg(&["query", run_key, "/v", "Sallyport"]).is_err(),
        "the Run value is still there"
    );
}

/// The same-user check on Windows: the Windows client (`sp-wnc.exe`) is found in the TCP table
/// (`GetExtendedTcpTable`) with its pid and its token's user is ours, so it is served; a Linux
/// process (curl) on the same loopback has no Windows owner, so it is refused and the agent says
/// why. Wine has one user, so "another user's process" is shown by the unit tests only.
#[test]
fn a_process_without_a_windows_owner_is_refused_and_a_windows_one_served() {
    let (_l, wine) = windows();
    let (port, _gw, agent, socks, http) = connected_agent(wine, "win-peer");
    hello_through_http(wine, &agent, http, port);
    require_tool("curl");
    let (code, body, err) = run(std::process::Command::new("curl")
        .args(["-sS", "--max-time", "20", "--socks5-hostname"])
        .arg(socks.to_string())
        .arg(format!("http://backend.internal:{port}/")))
    .unwrap();
    assert_ne!(code, 0, "a Linux process was served: {body}");
    assert!(!body.contains("hello from backend.internal"), "{err}");
    let line = agent
        .wait_for(&["refused a client connection"], Duration::from_secs(10))
        .unwrap();
    assert!(
        line.contains("cannot find the connecting socket's owner")
            || line.contains("whose user cannot be read"),
        "{line}"
    );
}

/// `scripts/package-msi.sh` makes a signed per-user MSI (wixl, osslsigncode with a test
/// certificate made by the script; the signature verifies against it); `wine msiexec /i … /qn`
/// installs it without admin rights into `%LOCALAPPDATA%\Programs\Sallyport` with a Start-menu
/// entry and the HKCU Run value; the installed agent runs (its demo end to end); `msiexec /x`
/// removes all of it.
#[test]
fn the_signed_per_user_msi_installs_runs_and_uninstalls_with_msiexec() {
    let (_l, wine) = windows();
    wine::ensure_apt("wixl", &["wixl"]).unwrap();
    wine::ensure_apt("osslsigncode", &["osslsigncode"]).unwrap();
    let out_dir = TempDir::new("win-msi");
    let (code, stdout, err) = run(std::process::Command::new(
        wine::workspace().join("scripts/package-msi.sh"),
    )
    .arg("--exe")
    .arg(wine.exe_dir.join("sallyport.exe"))
    .arg("--out")
    .arg(out_dir.path()))
    .unwrap();
    assert_eq!(code, 0, "{stdout}{err}");
    let msi = std::path::PathBuf::from(stdout.trim());
    assert!(
        msi.file_name()
            .unwrap()
            .to_string_lossy()
            .ends_with("-x86_64.msi"),
        "{stdout}"
    );
    let (code, v, verr) = run(std::process::Command::new("osslsigncode")
        .args(["verify", "-CAfile"])
        .arg(out_dir.path().join("test-signing/cert.pem"))
        .arg(&msi))
    .unwrap();
    assert!(
        code == 0 && v.contains("Signature verification: ok"),
        "{v}{verr}"
    );

    let run_key = r"HKCU\Software\Microsoft\Windows\CurrentVersion\Run";
    let (code, o, e) = run(wine
        .command("wine")
        .args(["msiexec", "/i", &Wine::path(&msi), "/qn"]))
    .unwrap();
    assert_eq!(code, 0, "msiexec /i: {o}{e}");
    let user_dir = appdata_sallyport(wine)
        .ancestors()
        .nth(3)
        .unwrap()
        .to_path_buf();
    let installed = user_dir.join("Local/Programs/Sallyport");
    let menu = user_dir.join("Roaming/Microsoft/Windows/Start Menu/Programs/Sallyport");
    assert!(installed.join("sallyport.exe").is_file(), "not installed");
    assert!(
        menu.join("Sallyport doctor.lnk").is_file(),
        "no Start-menu entry"
    );
    let q = wine.reg(&["query", run_key, "/v", "Sallyport"]).unwrap();
    assert!(
        q.contains(r#"AppData\Local\Programs\Sallyport\sallyport.exe" run"#),
        "{q}"
    );
    // The installed agent runs (under Wine 8 it needs the ProcessPrng shim beside it).
    std::fs::copy(
        wine.exe_dir.join("bcryptprimitives.dll"),
        installed.join("bcryptprimitives.dll"),
    )
    .unwrap();
    let (code, o, e) = run(wine
        .command("wine")
        .arg(installed.join("sallyport.exe"))
        .args([
            "demo",
            "--once",
            "--socks",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
        ]))
    .unwrap();
    assert_eq!(code, 0, "installed agent: {o}{e}");
    assert!(o.contains("through SOCKS5 -> hello"), "{o}");
    std::fs::remove_file(installed.join("bcryptprimitives.dll")).unwrap();

    let (code, o, e) = run(wine
        .command("wine")
        .args(["msiexec", "/x", &Wine::path(&msi), "/qn"]))
    .unwrap();
    assert_eq!(code, 0, "msiexec /x: {o}{e}");
    assert!(!installed.exists(), "the program folder is left");
    assert!(!menu.exists(), "the Start-menu entry is left");
    assert!(
        wine.reg(&["query", run_key, "/v", "Sallyport"]).is_err(),
        "the Run value is left"
    );
}

/// The registry's proxy with the other schemes squid asks for: Digest (squid's
/// `digest_file_auth`) and NTLMv2 (our `sp-ntlm-helper`, which checks the response against the
/// password), the user given to the agent and the password only in its environment.
#[test]
fn registry_proxy_through_squid_with_digest_and_ntlm() {
    let (_l, wine) = windows();
    let _clear = ClearSettings(wine);
    let (_port, gw) = gateway("win-reg-auth");
    let gw_port = gw_port(&gw);
    for (tag, how, user, password) in [
        (
            "win-sq-digest",
            SquidAuth::Digest {
                user: "alice",
                password: "d1gest-w1n",
            },
            "alice",
            "d1gest-w1n",
        ),
        (
            "win-sq-ntlm",
            SquidAuth::Ntlm {
                password: "Ntlm-W1n-1",
            },
            r"CORP\alice",
            "Ntlm-W1n-1",
        ),
    ] {
        let squid = Squid::start_with(tag, how).unwrap();
        manual_proxy(wine, &format!("127.0.0.1:{}", squid.port));
        let (code, out, err) = windows_doctor(
            wine,
            &gw,
            &gw.gw_url,
            &["--proxy-user", user],
            &[("SALLYPORT_PROXY_PASSWORD", password)],
        );
        assert_eq!(code, 0, "{tag}: {out}{err}");
        assert!(
            !format!("{out}{err}").contains(password),
            "{tag}: password shown"
        );
        let log = squid
            .wait_for_log(
                &[&format!("CONNECT 127.0.0.1:{gw_port}"), "alice"],
                Duration::from_secs(10),
            )
            .unwrap_or_else(|e| panic!("{tag}: {e}\n{out}{err}"));
        assert!(log.contains("TCP_TUNNEL/200"), "{tag}: {log}");
    }
}

/// `sallyport.exe status` asks the running Windows agent over its named pipe
/// (`\\.\pipe\sallyport-<SID>-status`, owner-only DACL, each end checking the other's user) and
/// prints what it is doing; a second agent of the same user does not take the pipe over (the
/// first instance of the name wins, and the second says so); with no agent running, status says
/// none is. Wine has one user and does not enforce pipe DACLs: refusing another user is shown by
/// the unit tests in `agent/src/status/windows.rs` only.
#[test]
fn status_over_the_named_pipe_answers_for_the_running_windows_agent_only() {
    let (_l, wine) = windows();
    let (port, gw, agent, socks, http) = connected_agent(wine, "win-status");
    // Some traffic, so the byte counters move.
    hello_through_http(wine, &agent, http, port);
    let status = || run(wine.exe("sallyport.exe").arg("status")).unwrap();
    // Several times: each answer is served by a fresh pipe instance.
    for _ in 0..3 {
        let (code, out, err) = status();
        assert_eq!(code, 0, "{out}{err}\n{}", agent.log());
        assert!(out.contains(&format!("gateway: {}", gw.gw_url)), "{out}");
        assert!(out.contains("connected: yes (gateway instance "), "{out}");
        assert!(out.contains(&format!("listening: socks5 {socks}")), "{out}");
        assert!(out.contains(&format!("listening: http {http}")), "{out}");
        let bytes_in: u64 = out
            .lines()
            .find_map(|l| l.strip_prefix("bytes: "))
            .and_then(|b| b.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no bytes line: {out}"));
        assert!(bytes_in > 0, "{out}");
    }
    assert!(
        !agent.log().contains("status request refused"),
        "{}",
        agent.log()
    );

    // A second agent of this user: the pipe stays the first one's, and the second says why.
    // (It also shows that the network change notifications and the sleep clocks work here.)
    let second = windows_agent(
        wine,
        &gw,
        &["--log".into(), "info,agent::netwatch=debug".into()],
    );
    second
        .wait_for(
            &["another agent of yours answers on the status pipe"],
            Duration::from_secs(30),
        )
        .unwrap();
    second
        .wait_for(
            &["watching for network changes and wakes from sleep"],
            Duration::from_secs(10),
        )
        .unwrap();
    let (code, out, err) = status();
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&format!("listening: socks5 {socks}")), "{out}");
    drop(second);

    // No agent: says so, exit code 1.
    drop(agent);
    let deadline = Instant::now() + Duration::from_secs(10);
    let (code, out, err) = loop {
        let r = status();
        if r.0 != 0 || Instant::now() > deadline {
            break r;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("no agent is running for this user"), "{err}");
    assert!(err.contains(r"\\.\pipe\sallyport-S-1-"), "{err}");
}

/// WinHTTP's machine-wide proxy (`netsh winhttp set proxy`, the binary `WinHttpSettings` under
/// `HKLM\…\Internet Settings\Connections`, written here with `wine reg add`) is a candidate after
/// the user's Internet Options: read by the agent through `WinHttpGetDefaultProxyConfiguration`,
/// it leads through squid with Basic; its bypass list is honoured; a bad proxy in it is left out
/// with a warning naming WinHTTP's value.
#[test]
fn winhttp_machine_proxy_from_netsh_leads_the_windows_agent_through_squid() {
    let (_l, wine) = windows();
    let _clear = ClearSettings(wine);
    let (_port, gw) = gateway("win-winhttp");
    let gw_port = gw_port(&gw);
    let squid = Squid::start_with(
        "win-sq-winhttp",
        SquidAuth::Basic {
            user: "alice",
            password: "w1nhttp-s3cret",
        },
    )
    .unwrap();
    let auth: &[&str] = &["--proxy-user", "alice"];
    let pw = [("SALLYPORT_PROXY_PASSWORD", "w1nhttp-s3cret")];
    wine.set_winhttp_proxy(&format!("127.0.0.1:{}", squid.port), "")
        .unwrap();
    doctor_through_squid(
        wine,
        &gw,
        &squid,
        egress::system::windows::WINHTTP_SOURCE,
        "w1nhttp-s3cret",
    );

    // The bypass list: `<local>` exempts a gateway named without a dot.
    wine.set_winhttp_proxy(&format!("127.0.0.1:{}", squid.port), "<local>")
        .unwrap();
    let local_url = format!("wss://localhost:{gw_port}/");
    let (code, out, err) = windows_doctor(wine, &gw, &local_url, auth, &pw);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!(
            "{}: its exceptions exempt localhost",
            egress::system::windows::WINHTTP_SOURCE
        )),
        "{out}"
    );

    // A bad value: left out, named as WinHTTP's.
    wine.set_winhttp_proxy("127.0.0.1:99999", "").unwrap();
    let (code, out, err) = windows_doctor(wine, &gw, &gw.gw_url, &[], &[]);
    assert!(
        err.contains(
            r#"WinHTTP proxy (WinHttpSettings) "127.0.0.1:99999": port `99999` is not a number from 1 to 65535"#
        ),
        "{err}"
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        !out.contains(egress::system::windows::WINHTTP_SOURCE),
        "{out}"
    );
}

/// SSPI Negotiate under Wine: squid asks for Negotiate (`negotiate_kerberos_auth`, a real MIT
/// KDC on loopback), the Windows agent answers through SSPI (`secur32`) with no password
/// configured at all; Wine's Kerberos package takes the ticket `kinit` put in the Linux
/// credential cache (`KRB5CCNAME`), as a domain logon would on Windows. squid logs the tunnel
/// for `alice@REALM`.
#[test]
fn sspi_negotiate_takes_the_users_kerberos_ticket_through_squid() {
    let (_l, wine) = windows();
    let (_port, gw) = gateway("win-sspi");
    let gw_port = gw_port(&gw);
    let kdc = sallyport_e2e::kdc::Kdc::start("win-krb").unwrap();
    std::fs::set_permissions(
        kdc.dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    kdc.kinit(
        sallyport_e2e::kdc::ALICE,
        sallyport_e2e::kdc::ALICE_PASSWORD,
    )
    .unwrap();
    let squid = Squid::start_with("win-sq-krb", SquidAuth::Negotiate { kdc: &kdc }).unwrap();
    let env = kdc.client_env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    // The service name comes from the proxy's host name: HTTP/localhost.
    let proxy = format!("http://localhost:{}", squid.port);
    let (code, out, err) = windows_doctor(wine, &gw, &gw.gw_url, &["--proxy", &proxy], &env);
    assert_eq!(code, 0, "{out}{err}");
    let user = format!(
        "{}@{}",
        sallyport_e2e::kdc::ALICE,
        sallyport_e2e::kdc::REALM
    );
    let log = squid
        .wait_for_log(
            &[&format!("CONNECT 127.0.0.1:{gw_port}"), &user],
            Duration::from_secs(10),
        )
        .unwrap_or_else(|e| panic!("{e}\n{out}{err}"));
    assert!(log.contains("TCP_TUNNEL/200"), "{log}");
}
