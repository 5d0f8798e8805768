//! `sallyport service install|status|uninstall` as a user would run it, in a throwaway home:
//! the generated systemd user unit passes systemd's own checker (`systemd-analyze verify`),
//! installing twice changes nothing, and uninstalling leaves the home as it was.
//!
//! (No user systemd runs here, so the unit is enabled by its `default.target.wants` link and
//! "starts at the next login"; the files are what is checked.)

use sallyport_e2e::*;
use std::process::Command;

fn sallyport(home: &TempDir, args: &[&str]) -> (i32, String, String) {
    run(Command::new(bin("sallyport"))
        .args(args)
        .env("HOME", home.path())
        .env("XDG_CONFIG_HOME", home.path().join(".config"))
        .env("XDG_RUNTIME_DIR", home.path().join("run")))
    .unwrap()
}

/// Every file under `dir`, relative, sorted.
fn tree(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() && !p.is_symlink() {
                stack.push(p.clone());
            }
            out.push(p.strip_prefix(dir).unwrap().display().to_string());
        }
    }
    out.sort();
    out
}

#[test]
fn the_user_unit_verifies_installs_idempotently_and_uninstalls_cleanly() {
    require_tool("systemd-analyze");
    let home = TempDir::new("service-home");
    std::fs::create_dir_all(home.path().join("run")).unwrap();
    std::fs::set_permissions(
        home.path().join("run"),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    std::fs::create_dir_all(home.path().join(".config/sallyport")).unwrap();
    std::fs::write(
        home.path().join(".config/sallyport/agent.toml"),
        "gateway = \"wss://gw.example.com/\"\n",
    )
    .unwrap();
    let before = tree(home.path());

    let config = home.path().join(".config/sallyport/agent.toml");
    let config = config.display().to_string();
    let (code, out, err) = sallyport(&home, &["service", "install", "-c", &config]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("wrote") && out.contains("enabled at login"),
        "{out}"
    );
    let unit = home.path().join(".config/systemd/user/sallyport.service");
    let text = std::fs::read_to_string(&unit).unwrap();
    assert!(
        text.contains(&format!("{} run -c {config}", bin("sallyport").display())),
        "{text}"
    );

    // systemd's own checker: no complaint about any line, and the binary exists.
    let (code, vout, verr) = run(Command::new("systemd-analyze")
        .args(["verify", "--user"])
        .arg(&unit)
        .env("XDG_RUNTIME_DIR", home.path().join("run"))
        .env("HOME", home.path()))
    .unwrap();
    assert_eq!(code, 0, "{vout}{verr}");
    assert!(
        !verr.contains("sallyport.service"),
        "systemd-analyze complains:\n{verr}"
    );

    let (code, out, _) = sallyport(&home, &["service", "install", "-c", &config]);
    assert_eq!(code, 0);
    assert!(out.contains("is up to date"), "{out}");
    let (code, out, _) = sallyport(&home, &["service", "status"]);
    assert_eq!(code, 0);
    assert!(out.contains("installed:"), "{out}");

    let (code, out, err) = sallyport(&home, &["service", "uninstall"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("removed"), "{out}");
    let after: Vec<String> = tree(home.path())
        .into_iter()
        // Folders install created stay (empty); only files matter.
        .filter(|p| home.path().join(p).is_file() || home.path().join(p).is_symlink())
        .collect();
    let before: Vec<String> = before
        .into_iter()
        .filter(|p| home.path().join(p).is_file())
        .collect();
    assert_eq!(after, before, "uninstall left something behind");
}

/// The macOS LaunchAgent, written by the installer's own `install` (no macOS here, so into a
/// scratch `LaunchAgents` folder), is read back with Python's `plistlib`, the parser of Apple's
/// format: an unescaped `&` or `<` in a path (a folder like "Sally & Co") would make launchd
/// refuse the file. It has the label, runs `<agent> run -c <config>` at load, and carries no
/// secret: no token on the command line and no environment block.
#[test]
fn the_launch_agent_plist_parses_with_plistlib_and_carries_no_secret() {
    // Installed when missing, else the test fails naming it.
    sallyport_e2e::wine::ensure_apt("python3", &["python3"]).unwrap();
    let dir = TempDir::new("launchd-plist");
    let exe = dir.path().join("Sally & Co <agent>").join("sallyport");
    let config = dir.path().join("config & <more>").join("agent.toml");
    let service = installer::Service {
        spec: installer::ServiceSpec {
            exe: exe.clone(),
            config: Some(config.clone()),
        },
        manager: installer::service::Manager::Launchd,
        dir: dir.path().join("LaunchAgents"),
        log: dir.path().join("Logs").join("sallyport.log"),
        manage: false,
    };
    service.install().unwrap();
    let plist = service.file().unwrap();
    assert_eq!(
        plist.file_name().unwrap().to_string_lossy(),
        "com.sallyport.agent.plist"
    );
    let script = r#"
import json, plistlib, sys
with open(sys.argv[1], "rb") as f:
    p = plistlib.load(f)
print(json.dumps(p))
"#;
    let (code, out, err) = run(Command::new("python3").arg("-c").arg(script).arg(&plist)).unwrap();
    assert_eq!(
        code,
        0,
        "plistlib refused the LaunchAgent: {err}\n{}",
        std::fs::read_to_string(&plist).unwrap()
    );
    let keys = |k: &str| format!("\"{k}\": ");
    assert!(
        out.contains(&format!("{}\"com.sallyport.agent\"", keys("Label"))),
        "{out}"
    );
    assert!(out.contains(&format!("{}true", keys("RunAtLoad"))), "{out}");
    let json_str = |s: &str| format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""));
    let args = format!(
        "{}[{}, \"run\", \"-c\", {}]",
        keys("ProgramArguments"),
        json_str(&exe.display().to_string()),
        json_str(&config.display().to_string())
    );
    assert!(out.contains(&args), "want {args}\nin {out}");
    // No secret anywhere launchd would show (`launchctl print`, `ps`): no token option, no
    // token-shaped word, no environment variables.
    for secret in [
        "--token",
        "sp_",
        "SALLYPORT_TOKEN",
        "PASSWORD",
        "EnvironmentVariables",
    ] {
        assert!(!out.contains(secret), "{secret} in the LaunchAgent: {out}");
    }
}
