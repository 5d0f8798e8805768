//! `sp-ntlm-helper`: a squid NTLM authentication helper that checks NTLMv2 answers against one
//! password, for the proxy-authentication tests. Test-only: not a hardened server.
//!
//! # The protocol (squid's `squid-2.5-ntlmssp`, as `ntlm_auth` and `ntlm_fake_auth` speak it)
//!
//! squid starts the helper (`auth_param ntlm program …`, `auth_param ntlm children N`) and talks
//! to it over stdin/stdout, one line each way, one conversation at a time per process:
//!
//! | squid writes | meaning | the helper answers |
//! |---|---|---|
//! | `YR [<base64 type 1>]` | a client started NTLM: make a challenge | `TT <base64 type 2>` |
//! | `KK <base64 type 3>` | the client's answer to the last challenge | `AF <user>` (accepted) or `NA <reason>` (squid answers 407) |
//! | anything else | — | `BH <reason>` ("broken helper": squid fails the request) |
//!
//! Every `YR` makes a fresh random server challenge; it is the helper's only state, and a `KK`
//! consumes it (a challenge answers one attempt). A malformed message gets `BH`; a well-formed
//! answer with the wrong password, or an NTLMv1 answer, gets `NA`.
//!
//! # Configuration
//!
//! The expected password is read from the file named by the first argument (one line; a
//! trailing newline is dropped), else from `SP_NTLM_PASSWORD`. Any user and domain are accepted
//! when their proof matches that password. The challenge names the domain `SALLYPORT`
//! (`SP_NTLM_DOMAIN` overrides it).

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use egress::auth::ntlm::{self, NtlmError};
use std::io::{BufRead, Write};
use std::process::ExitCode;

/// One conversation's state: the password and the last challenge sent.
struct Helper {
    password: String,
    domain: String,
    challenge: Option<[u8; 8]>,
}

impl Helper {
    /// The answer line (without newline) to one request line.
    fn answer(&mut self, line: &str) -> String {
        let line = line.trim_end_matches(['\r', '\n']);
        let (cmd, arg) = line.split_once(' ').unwrap_or((line, ""));
        let arg = arg.trim();
        match cmd {
            "YR" => {
                if !arg.is_empty() {
                    match B64.decode(arg) {
                        Ok(m) if m.starts_with(b"NTLMSSP\0\x01\0\0\0") => {}
                        _ => return "BH YR: not a base64 NTLM negotiate message".into(),
                    }
                }
                let challenge: [u8; 8] = rand::random();
                self.challenge = Some(challenge);
                let msg = ntlm::challenge_message(challenge, &self.domain);
                format!("TT {}", B64.encode(msg))
            }
            "KK" => {
                let Some(challenge) = self.challenge.take() else {
                    return "BH KK without a challenge: send YR first".into();
                };
                let Ok(msg) = B64.decode(arg) else {
                    return "BH KK: not base64".into();
                };
                match ntlm::verify_ntlmv2(&msg, challenge, &self.password) {
                    Ok(user) => match squid_word(&user) {
                        Some(word) => format!("AF {word}"),
                        None => "NA invalid user name".into(),
                    },
                    Err(NtlmError::BadProof) => "NA invalid credentials".into(),
                    Err(e @ NtlmError::NotNtlmV2(_)) => format!("NA {e}"),
                    Err(e) => format!("BH {e}"),
                }
            }
            _ => "BH unknown request (expected YR or KK)".into(),
        }
    }
}

/// A user name as one word of squid's helper-reply syntax (`strwordtok`): as it is when it has
/// no blank, quote or backslash, else quoted with `\` escapes. Control characters (which could
/// end the line early) are refused.
fn squid_word(user: &str) -> Option<String> {
    if user.is_empty() || user.chars().any(char::is_control) {
        return None;
    }
    if !user.contains(|c: char| c.is_whitespace() || c == '"' || c == '\\') {
        return Some(user.to_string());
    }
    let mut w = String::from("\"");
    for c in user.chars() {
        if c == '"' || c == '\\' {
            w.push('\\');
        }
        w.push(c);
    }
    w.push('"');
    Some(w)
}

fn password() -> Result<String, String> {
    if let Some(path) = std::env::args_os().nth(1) {
        let text = std::fs::read_to_string(&path).map_err(|e| {
            format!(
                "cannot read the password file {}: {e}",
                path.to_string_lossy()
            )
        })?;
        let line = text.lines().next().unwrap_or_default();
        return Ok(line.to_string());
    }
    std::env::var("SP_NTLM_PASSWORD").map_err(|_| {
        "no password: give a password file as the first argument or set SP_NTLM_PASSWORD".into()
    })
}

fn main() -> ExitCode {
    let password = match password() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("sp-ntlm-helper: {e}");
            return ExitCode::from(2);
        }
    };
    let mut helper = Helper {
        password,
        domain: std::env::var("SP_NTLM_DOMAIN").unwrap_or_else(|_| "SALLYPORT".into()),
        challenge: None,
    };
    let mut input = std::io::stdin().lock();
    let mut output = std::io::stdout().lock();
    let mut line = Vec::new();
    loop {
        line.clear();
        match input.read_until(b'\n', &mut line) {
            Ok(0) => return ExitCode::SUCCESS, // squid closed our stdin: shut down
            Ok(_) => {}
            Err(e) => {
                eprintln!("sp-ntlm-helper: reading stdin: {e}");
                return ExitCode::FAILURE;
            }
        }
        let reply = helper.answer(&String::from_utf8_lossy(&line));
        // squid reads replies line by line: flush each one.
        if writeln!(output, "{reply}")
            .and_then(|()| output.flush())
            .is_err()
        {
            return ExitCode::SUCCESS; // squid went away
        }
    }
}
