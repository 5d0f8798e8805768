//! The README's "Deploy for real", run as written: the `sh` blocks between
//! `<!-- walkthrough:begin -->` and `<!-- walkthrough:end -->` in `README.md` are taken from the
//! README itself (so the docs cannot drift from what works), run one command at a time with
//! `sh -c` (the built binaries first on `PATH`) on loopback, in a temporary folder and HOME, and
//! the walk ends with a curl through the agent's forward.
//!
//! The substitutions, also listed in the README's comment at the begin marker:
//! - `gw.example.com` → `127.0.0.1`; the gateway's URL and `0.0.0.0:443` get a free test port;
//! - `/etc/sallyport` → a folder in the temporary one;
//! - service port `5432` → a test HTTP service on 127.0.0.1; the connector also gets
//!   `--host db.internal=127.0.0.1` (the name is internal) and the loopback rule that step 2
//!   of the README describes (`--allow '127.0.0.1/32:PORT'`);
//! - the forward's local port `15432` → a free port; `sallyport run` gets `--socks 127.0.0.1:0
//!   --http 127.0.0.1:0` so that it does not take the default ports of the machine.

use sallyport_e2e::*;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const BEGIN: &str = "<!-- walkthrough:begin -->";
const END: &str = "<!-- walkthrough:end -->";

/// The shell commands of the `sh` blocks between the markers: continuation lines joined,
/// comments (a `#` after blanks, outside quotes) removed.
fn readme_commands(readme: &str) -> Vec<String> {
    let start = readme
        .find(BEGIN)
        .expect("README has no walkthrough:begin marker");
    let end = readme
        .find(END)
        .expect("README has no walkthrough:end marker");
    let part = &readme[start..end];
    let mut out = Vec::new();
    let mut in_sh = false;
    let mut current = String::new();
    for line in part.lines() {
        let t = line.trim();
        if t.starts_with("```") {
            in_sh = t == "```sh";
            continue;
        }
        if !in_sh || t.is_empty() {
            continue;
        }
        let code = strip_comment(line);
        match code.trim_end().strip_suffix('\\') {
            Some(head) => {
                current.push_str(head.trim());
                current.push(' ');
            }
            None => {
                current.push_str(code.trim());
                out.push(std::mem::take(&mut current).trim().to_string());
            }
        }
    }
    out
}

fn strip_comment(line: &str) -> &str {
    let (mut single, mut double) = (false, false);
    let mut prev_blank = true;
    for (i, c) in line.char_indices() {
        match c {
            '\'' if !double => single = !single,
            '"' if !single => double = !double,
            '#' if !single && !double && prev_blank => return &line[..i],
            _ => {}
        }
        prev_blank = c.is_whitespace();
    }
    line
}

fn free_port() -> u16 {
    dead_port().unwrap()
}

#[test]
fn the_readme_deploy_path_works_as_written() {
    require_tool("curl");
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .unwrap();
    let commands = readme_commands(&readme);
    assert!(
        commands.len() >= 7,
        "too few commands between the markers: {commands:#?}"
    );
    // The README says once what `wss://NAME/` means.
    assert!(
        readme.contains("`wss://gw.example.com/` means port 443"),
        "the README does not say the default port"
    );

    let tmp = TempDir::new("walkthrough");
    let home = tmp.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let svc = http_service().unwrap().port();
    let (gw, fwd) = (free_port(), free_port());
    let etc = tmp.path().join("etc/sallyport").display().to_string();
    let path = format!(
        "{}:{}",
        bin_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let substitute = |c: &str| -> String {
        let mut c = c
            .replace("wss://gw.example.com/", &format!("wss://127.0.0.1:{gw}/"))
            .replace("gw.example.com", "127.0.0.1")
            .replace("0.0.0.0:443", &format!("127.0.0.1:{gw}"))
            .replace("/etc/sallyport", &etc)
            .replace("127.0.0.1:15432=", &format!("127.0.0.1:{fwd}="))
            .replace(":5432", &format!(":{svc}"));
        if c.starts_with("sallyport-gateway connector") {
            c.push_str(&format!(
                " --host db.internal=127.0.0.1 --allow '127.0.0.1/32:{svc}'"
            ));
        }
        if c.starts_with("sallyport run") {
            c.push_str(" --socks 127.0.0.1:0 --http 127.0.0.1:0");
        }
        c
    };
    let sh = |c: &str| {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(c)
            .current_dir(tmp.path())
            .env("PATH", &path)
            .env("HOME", &home)
            .env("XDG_CONFIG_HOME", home.join(".config"));
        // No proxy or keychain of this machine: the walk is on loopback.
        for k in [
            "HTTPS_PROXY",
            "https_proxy",
            "ALL_PROXY",
            "all_proxy",
            "NO_PROXY",
            "no_proxy",
            "DBUS_SESSION_BUS_ADDRESS",
            "SALLYPORT_TOKEN",
        ] {
            cmd.env_remove(k);
        }
        cmd
    };

    let mut running: Vec<Proc> = Vec::new();
    let mut dmz_at = None;
    let mut agent_at = None;
    for (i, original) in commands.iter().enumerate() {
        let c = substitute(original);
        eprintln!("walkthrough step {}: {c}", i + 1);
        let long_running = [
            "sallyport-gateway dmz",
            "sallyport-gateway connector",
            "sallyport run",
        ]
        .iter()
        .any(|p| c.starts_with(p));
        if !long_running {
            let (code, out, err) = run(&mut sh(&c)).unwrap();
            assert_eq!(code, 0, "step {} `{original}` failed:\n{out}{err}", i + 1);
            continue;
        }
        let p = Proc::spawn(&format!("step-{}", i + 1), &mut sh(&format!("exec {c}"))).unwrap();
        if c.starts_with("sallyport-gateway dmz") {
            p.wait_for(&["dmz gateway listening"], Duration::from_secs(15))
                .unwrap();
            dmz_at = Some(running.len());
        } else if c.starts_with("sallyport-gateway connector") {
            let dmz = &running[dmz_at.expect("the connector step comes after the DMZ step")];
            dmz.wait_for(
                &["connector routes", "db.internal"],
                Duration::from_secs(15),
            )
            .unwrap();
        } else {
            p.wait_for(
                &["listening", "forward", &format!("127.0.0.1:{fwd}")],
                Duration::from_secs(15),
            )
            .unwrap();
            p.wait_for(&["connected to the gateway"], Duration::from_secs(20))
                .unwrap();
            agent_at = Some(running.len());
        }
        running.push(p);
    }
    assert!(
        agent_at.is_some(),
        "the walkthrough never ran `sallyport run`"
    );

    // The agent's token was saved by the path itself (enroll), never shown on stdout.
    let (code, body, err) = run(Command::new("curl")
        .args(["-sS", "--max-time", "20"])
        .arg(format!("http://127.0.0.1:{fwd}/")))
    .unwrap();
    assert_eq!(
        (code, body.as_str()),
        (0, "hello from backend.internal\n"),
        "{err}\n{}",
        running
            .iter()
            .map(|p| p.log())
            .collect::<Vec<_>>()
            .join("\n---\n")
    );
    // Token files the product wrote are the owner's only.
    for f in ["site-a.token", "alice-laptop.token"] {
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(tmp.path().join(f)).unwrap().permissions(),
        );
        assert_eq!(mode & 0o077, 0, "{f} mode {mode:o}");
    }
}
