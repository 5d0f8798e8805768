//! `sp-ntlm-helper`, the squid NTLM helper the proxy tests use, driven the way squid drives it
//! (`YR` → `TT`, `KK` → `AF`/`NA`) with egress's NTLM client on the other side.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use egress::auth::ntlm;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::Duration;

/// The helper as a child process; killed on drop.
struct HelperProcess {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
}

impl HelperProcess {
    fn start(configure: impl FnOnce(&mut Command)) -> HelperProcess {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sp-ntlm-helper"));
        cmd.env_remove("SP_NTLM_PASSWORD")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        configure(&mut cmd);
        let mut child = cmd.spawn().expect("start sp-ntlm-helper");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        // Lines arrive through a channel so that a silent helper fails the test instead of
        // hanging it.
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        HelperProcess {
            child,
            stdin,
            lines,
        }
    }

    fn ask(&mut self, line: &str) -> String {
        writeln!(self.stdin, "{line}").unwrap();
        self.stdin.flush().unwrap();
        self.lines
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("no answer from the helper to {line:?}: {e}"))
    }

    /// One full NTLM conversation as a proxy client; returns the answer to `KK`.
    fn authenticate(&mut self, user: &str, domain: &str, password: &str) -> String {
        let tt = self.ask(&format!("YR {}", B64.encode(ntlm::negotiate_message())));
        let b64 = tt
            .strip_prefix("TT ")
            .unwrap_or_else(|| panic!("YR answered {tt:?}"));
        let challenge = ntlm::ChallengeMessage::parse(&B64.decode(b64).unwrap()).unwrap();
        assert!(challenge.unicode());
        let type3 =
            ntlm::authenticate_message_now(&challenge, user, domain, password, "LAPTOP-7").unwrap();
        self.ask(&format!("KK {}", B64.encode(type3)))
    }
}

impl Drop for HelperProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn right_password_is_af_wrong_password_is_na() {
    let mut h = HelperProcess::start(|c| {
        c.env("SP_NTLM_PASSWORD", "Tr0ub4dor&3");
    });
    assert_eq!(h.authenticate("alice", "CORP", "Tr0ub4dor&3"), "AF alice");
    assert_eq!(
        h.authenticate("alice", "CORP", "tr0ub4dor&3"),
        "NA invalid credentials"
    );
    // The same process serves the next conversation; an empty domain is fine.
    assert_eq!(h.authenticate("bob", "", "Tr0ub4dor&3"), "AF bob");
    // A user name squid would split is quoted.
    assert_eq!(
        h.authenticate("Jane Doe", "CORP", "Tr0ub4dor&3"),
        "AF \"Jane Doe\""
    );
}

#[test]
fn password_file_and_plain_yr() {
    let dir = std::env::temp_dir().join(format!("sp-ntlm-helper-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("password");
    std::fs::write(&file, "from a file\n").unwrap();
    let mut h = HelperProcess::start(|c| {
        c.arg(&file);
    });
    // `YR` without a negotiate message (old squids) also gets a challenge.
    let tt = h.ask("YR");
    assert!(tt.starts_with("TT "), "{tt}");
    assert_eq!(h.authenticate("carol", "D", "from a file"), "AF carol");
    drop(h);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn protocol_errors_are_bh_and_a_challenge_is_used_once() {
    let mut h = HelperProcess::start(|c| {
        c.env("SP_NTLM_PASSWORD", "pw");
    });
    assert!(h.ask("XX hello").starts_with("BH "));
    assert!(h
        .ask("KK TlRMTVNTUAADAAAA")
        .starts_with("BH KK without a challenge"));
    assert!(h.ask("YR !!!notbase64").starts_with("BH "));

    // A type 3 answered once, replayed: the challenge is gone.
    let tt = h.ask("YR");
    let challenge =
        ntlm::ChallengeMessage::parse(&B64.decode(tt.strip_prefix("TT ").unwrap()).unwrap())
            .unwrap();
    let type3 = ntlm::authenticate_message_now(&challenge, "dave", "", "pw", "WS").unwrap();
    let kk = format!("KK {}", B64.encode(&type3));
    assert_eq!(h.ask(&kk), "AF dave");
    assert!(h.ask(&kk).starts_with("BH KK without a challenge"));
    // Replayed against a new challenge: refused.
    assert!(h.ask("YR").starts_with("TT "));
    assert_eq!(h.ask(&kk), "NA invalid credentials");

    // Garbage after a challenge: BH, with the reason.
    assert!(h.ask("YR").starts_with("TT "));
    let bad = h.ask(&format!("KK {}", B64.encode(b"NTLMSSP\0\x02\0\0\0")));
    assert!(bad.starts_with("BH NTLM message has type 2"), "{bad}");
}

#[test]
fn no_password_is_a_startup_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_sp-ntlm-helper"))
        .env_remove("SP_NTLM_PASSWORD")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("SP_NTLM_PASSWORD"));
}
