//! The agent's `.deb` (`scripts/package-deb.sh`): what it installs, and that what it installs
//! runs.

use sallyport_e2e::*;
use std::path::Path;
use std::process::Command;

#[test]
fn the_deb_installs_the_agent_and_a_user_unit() {
    require_tool("dpkg-deb");
    let out = TempDir::new("deb");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let (code, stdout, err) = run(Command::new(root.join("scripts/package-deb.sh"))
        .arg("--bin")
        .arg(bin("sallyport"))
        .arg("--out")
        .arg(out.path()))
    .unwrap();
    assert_eq!(code, 0, "{err}");
    let deb = stdout.trim().to_string();
    let (code, contents, err) = run(Command::new("dpkg-deb").args(["--contents", &deb])).unwrap();
    assert_eq!(code, 0, "{err}");
    for path in [
        "./usr/bin/sallyport",
        "./usr/lib/systemd/user/sallyport.service",
        "./usr/share/doc/sallyport/install.md",
    ] {
        assert!(contents.contains(path), "{path} missing:\n{contents}");
    }
    assert!(
        contents.contains("root/root"),
        "files must belong to root:\n{contents}"
    );
    let (_, info, _) =
        run(Command::new("dpkg-deb").args(["--field", &deb, "Package", "Depends"])).unwrap();
    assert!(
        info.contains("Package: sallyport") && info.contains("libc6"),
        "{info}"
    );

    let x = TempDir::new("deb-x");
    let (code, _, err) = run(Command::new("dpkg-deb").args(["-x", &deb]).arg(x.path())).unwrap();
    assert_eq!(code, 0, "{err}");
    let (code, version, err) =
        run(Command::new(x.path().join("usr/bin/sallyport")).arg("--version")).unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(version.starts_with("sallyport "), "{version}");
    let unit =
        std::fs::read_to_string(x.path().join("usr/lib/systemd/user/sallyport.service")).unwrap();
    assert!(
        unit.contains("ExecStart=/usr/bin/sallyport run\n"),
        "{unit}"
    );
    assert!(unit.contains("WantedBy=default.target"), "{unit}");
}
