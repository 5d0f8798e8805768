//! The `sallyport` binary itself, before it binds a port: bad input on its command line gets one
//! line that names what to fix, and a non-zero exit; nothing starts.
//!
//! Also the reason `cargo test` builds the real `sallyport` executable (an integration test of
//! this package needs it), so the end-to-end tests of `tests/` run a binary built in the same
//! `cargo test` as they are: `scripts/test.sh` needs no separate `cargo build --bins`.

use std::process::Command;

fn agent(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sallyport"))
        .args(args)
        .env("HOME", std::env::temp_dir())
        .output()
        .expect("run sallyport");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.code().unwrap_or(-1), stderr)
}

#[test]
fn a_gateway_url_that_is_not_wss_is_one_line_naming_the_scheme() {
    let (code, err) = agent(&["run", "--gateway", "ftp://gw.example", "--socks", "off"]);
    assert_ne!(code, 0, "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(
        err.contains("ftp://gw.example") && err.contains("wss://"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn a_missing_token_file_is_one_line_naming_the_file() {
    let (code, err) = agent(&[
        "run",
        "--gateway",
        "wss://127.0.0.1:1/",
        "--token-file",
        "/nonexistent/sallyport-test/agent.token",
        "--socks",
        "off",
    ]);
    assert_ne!(code, 0, "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(
        err.contains("/nonexistent/sallyport-test/agent.token"),
        "{err}"
    );
}
