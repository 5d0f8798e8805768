//! A real browser (headless Chromium) with the agent's PAC file: an internal page loads through
//! the agent, an external one goes direct (the PAC's "as before"), and the status page renders.

use sallyport_e2e::*;
use std::process::Command;
use std::time::{Duration, Instant};

/// Headless Chromium with `args`, bounded to 60 s; (exit code, stdout, stderr).
fn chromium(args: &[&str]) -> (i32, String, String) {
    require_tool("chromium");
    run(Command::new("timeout")
        .args([
            "60",
            "chromium",
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
        ])
        .args([
            "--no-first-run",
            "--disable-extensions",
            "--disable-dev-shm-usage",
        ])
        .args(args))
    .unwrap()
}

#[test]
fn chromium_with_the_agents_pac_tunnels_only_internal_pages() {
    let svc = http_service().unwrap();
    let external = http_service().unwrap();
    let sys = System::start(
        "browser",
        &allow_backend(svc.port()),
        &["backend.internal=127.0.0.1"],
        &[],
    )
    .unwrap();
    let pac_url = format!("http://127.0.0.1:{}/proxy.pac", sys.http.port());
    // Wait until the DMZ has told the agent its routes.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, pac, _) = run(Command::new("curl")
            .args(["-sS", "--noproxy", "*"])
            .arg(&pac_url))
        .unwrap();
        if pac.contains("*.internal") {
            break;
        }
        assert!(Instant::now() < deadline, "no routes in the PAC: {pac}");
        std::thread::sleep(Duration::from_millis(300));
    }
    let profile = TempDir::new("chromium-profile");
    let user_data = format!("--user-data-dir={}", profile.path().display());
    let pac_arg = format!("--proxy-pac-url={pac_url}");

    // The internal page: only reachable through the agent.
    let internal = format!("http://backend.internal:{}/", svc.port());
    let (code, dom, err) = chromium(&[&user_data, &pac_arg, "--dump-dom", &internal]);
    assert_eq!(code, 0, "{err}");
    assert!(dom.contains("hello from backend.internal"), "{dom}\n{err}");
    sys.dmz
        .wait_for(
            &["stream open", &format!("backend.internal:{}", svc.port())],
            Duration::from_secs(15),
        )
        .unwrap();

    // An external site (its name mapped to a local server by Chromium itself): the PAC says
    // DIRECT, so it loads without the tunnel.
    let site = format!("http://www.external.test:{}/", external.port());
    let (code, dom, err) = chromium(&[
        &user_data,
        &pac_arg,
        "--host-resolver-rules=MAP www.external.test 127.0.0.1",
        "--dump-dom",
        &site,
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(dom.contains("hello from backend.internal"), "{dom}\n{err}");
    assert!(
        !sys.dmz.log().contains("www.external.test"),
        "the external site went through the tunnel:\n{}",
        sys.dmz.log()
    );

    // The status page renders (this is the screenshot in docs/install.md).
    let shot = profile.path().join("status.png");
    let (code, _, err) = chromium(&[
        &user_data,
        "--window-size=900,560",
        &format!("--screenshot={}", shot.display()),
        &format!("http://127.0.0.1:{}/", sys.http.port()),
    ]);
    assert_eq!(code, 0, "{err}");
    let png = std::fs::read(&shot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 5_000,
        "{} bytes",
        png.len()
    );
    if let Ok(dir) = std::env::var("SALLYPORT_SCREENSHOT_DIR") {
        let _ = std::fs::copy(&shot, std::path::Path::new(&dir).join("status-page.png"));
    }
}
