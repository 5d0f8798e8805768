//! `sallyport status` on Windows: the control endpoint is a named pipe,
//! `\\.\pipe\sallyport-<user SID>-status`, that only the agent's own user can open.
//!
//! * The pipe is created with the security descriptor `D:P(A;;GA;;;<SID>)`: a protected DACL
//!   (nothing inherited) with one entry, full access for the agent's user SID; no entry for
//!   Everyone, Administrators or SYSTEM. Remote (SMB) clients are refused
//!   (`PIPE_REJECT_REMOTE_CLIENTS`), and the agent creates it as the first instance of its name
//!   (`FILE_FLAG_FIRST_PIPE_INSTANCE`): when another process already holds the name (another
//!   agent of this user, or someone squatting it) the agent says so, naming that process's
//!   user when it is not ours, and serves no status. (It asks the name as a client first:
//!   Wine does not enforce the first-instance flag.)
//! * The DACL is not trusted alone. The agent asks the pipe for its client's pid
//!   (`GetNamedPipeClientProcessId`) and compares that process token's user with its own;
//!   `sallyport status` asks for the server's pid (`GetNamedPipeServerProcessId`) and does the
//!   same before it reads a byte, so a pipe squatted by another user is refused. The client opens
//!   the pipe at the `SecurityIdentification` level (tokio's default), so a squatting server
//!   cannot impersonate the user.
//!
//! The pipe name, the SDDL string and the user comparison are plain functions, tested on every
//! OS; only the pipe calls are Windows-only. What only a real Windows machine can confirm
//! (Wine has one user and does not enforce pipe DACLs) is listed in `docs/install.md`.

use crate::peer::windows::Owner;

/// Why the status pipe cannot be named, or refuses the process at its other end.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PipeError {
    /// The user SID read from our token is not of the form `S-1-…` (it goes into the pipe name
    /// and the SDDL string, so nothing else is accepted).
    #[error("not a user SID: \"{0}\" (expected S-1-<authority>-<sub-authorities>)")]
    NotASid(String),
    /// Our own user cannot be read: nobody can be told apart from us, so nobody is served.
    #[error(
        "cannot read this process's own user; the status pipe cannot check who is at its other end"
    )]
    OwnUserUnknown,
    /// The other end runs as another user.
    #[error("the status pipe's {end} runs as user {them}, not as this user ({me})")]
    OtherUser { end: End, them: String, me: String },
    /// The other end's user cannot be read (another user's process, or gone).
    #[error("the status pipe's {end} is process {pid}, whose user cannot be read ({why})")]
    Unreadable { end: End, pid: u32, why: String },
}

/// Which end of the pipe is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// `sallyport status`, checked by the agent.
    Client,
    /// The agent, checked by `sallyport status`.
    Server,
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            End::Client => "client",
            End::Server => "server",
        })
    }
}

/// `sid` when it is a SID string as [`crate::peer::windows::sid_string`] writes it: `S-1-`, an
/// authority (decimal, or `0x` and 12 hex digits), then 1 to 15 decimal sub-authorities that
/// fit 32 bits.
pub fn valid_sid(sid: &str) -> Result<&str, PipeError> {
    let bad = || PipeError::NotASid(sid.escape_debug().to_string());
    let rest = sid.strip_prefix("S-1-").ok_or_else(bad)?;
    let mut parts = rest.split('-');
    let authority = parts.next().ok_or_else(bad)?;
    let authority_ok = match authority.strip_prefix("0x") {
        Some(hex) => hex.len() == 12 && hex.bytes().all(|b| b.is_ascii_hexdigit()),
        None => {
            !authority.is_empty()
                && authority.bytes().all(|b| b.is_ascii_digit())
                && authority.parse::<u32>().is_ok()
        }
    };
    let subs: Vec<&str> = parts.collect();
    let subs_ok = (1..=15).contains(&subs.len())
        && subs.iter().all(|s| {
            !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && s.parse::<u32>().is_ok()
        });
    if authority_ok && subs_ok {
        Ok(sid)
    } else {
        Err(bad())
    }
}

/// The status pipe of the user `sid`: `\\.\pipe\sallyport-<SID>-status`.
pub fn pipe_name(sid: &str) -> Result<String, PipeError> {
    Ok(format!(r"\\.\pipe\sallyport-{}-status", valid_sid(sid)?))
}

/// The security descriptor of the status pipe, in SDDL: a protected DACL (`P`, nothing
/// inherited) allowing (`A`) all access (`GA`) to `sid` alone.
pub fn pipe_sddl(sid: &str) -> Result<String, PipeError> {
    Ok(format!("D:P(A;;GA;;;{})", valid_sid(sid)?))
}

/// Whether the process at the other `end` of the pipe (`them`) runs as our user (`me`).
/// A user that cannot be read, ours or theirs, is a refusal.
pub fn check_other_end(end: End, me: Option<&str>, them: &Owner) -> Result<(), PipeError> {
    let me = me.ok_or(PipeError::OwnUserUnknown)?;
    match them {
        Owner::User(sid) if sid == me => Ok(()),
        Owner::User(sid) => Err(PipeError::OtherUser {
            end,
            them: sid.clone(),
            me: me.to_string(),
        }),
        Owner::Unreadable { pid, why } => Err(PipeError::Unreadable {
            end,
            pid: *pid,
            why: why.clone(),
        }),
    }
}

#[cfg(windows)]
pub use sys::{pipe_of_this_user, query, serve};

#[cfg(windows)]
mod sys {
    use super::*;
    use crate::config::AgentConfig;
    use crate::peer::windows::my_user;
    use crate::pool::Pool;
    use std::net::SocketAddr;
    use std::os::windows::io::AsRawHandle;
    use std::path::{Path, PathBuf};
    use std::ptr;
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    use tokio::io::AsyncWriteExt;
    use tokio::net::windows::named_pipe::{ClientOptions, NamedPipeServer, ServerOptions};
    use tokio_util::sync::CancellationToken;
    use windows_sys::Win32::Foundation::{LocalFree, ERROR_ACCESS_DENIED, ERROR_PIPE_BUSY, HANDLE};
    use windows_sys::Win32::Security::Authorization::{
        ConvertStringSecurityDescriptorToSecurityDescriptorW, SDDL_REVISION_1,
    };
    use windows_sys::Win32::Security::{PSECURITY_DESCRIPTOR, SECURITY_ATTRIBUTES};
    use windows_sys::Win32::System::Pipes::{
        GetNamedPipeClientProcessId, GetNamedPipeServerProcessId,
    };

    /// The status pipe of the user running this process.
    pub fn pipe_of_this_user() -> Option<PathBuf> {
        let sid = my_user()?;
        pipe_name(&sid)
            .map_err(|e| tracing::warn!("no status pipe: {e}"))
            .ok()
            .map(PathBuf::from)
    }

    /// One instance of the pipe, created with the owner-only DACL of [`pipe_sddl`].
    fn create(name: &str, sid: &str, first: bool) -> std::io::Result<NamedPipeServer> {
        let sddl = pipe_sddl(sid).map_err(std::io::Error::other)?;
        let sddl: Vec<u16> = sddl.encode_utf16().chain(std::iter::once(0)).collect();
        let mut sd: PSECURITY_DESCRIPTOR = ptr::null_mut();
        // SAFETY: `sddl` is NUL-terminated UTF-16 alive for the call; `sd` receives a
        // LocalAlloc'ed descriptor, freed below.
        let ok = unsafe {
            ConvertStringSecurityDescriptorToSecurityDescriptorW(
                sddl.as_ptr(),
                SDDL_REVISION_1,
                &mut sd,
                ptr::null_mut(),
            )
        };
        if ok == 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut sa = SECURITY_ATTRIBUTES {
            nLength: std::mem::size_of::<SECURITY_ATTRIBUTES>() as u32,
            lpSecurityDescriptor: sd,
            bInheritHandle: 0,
        };
        // SAFETY: `sa` is a valid SECURITY_ATTRIBUTES whose descriptor lives until after the
        // call (CreateNamedPipeW copies it into the pipe object).
        let r = unsafe {
            ServerOptions::new()
                .first_pipe_instance(first)
                .reject_remote_clients(true)
                .create_with_security_attributes_raw(
                    name,
                    (&mut sa as *mut SECURITY_ATTRIBUTES).cast(),
                )
        };
        // SAFETY: allocated by ConvertStringSecurityDescriptorToSecurityDescriptorW, freed once.
        unsafe { LocalFree(sd) };
        r
    }

    /// The user of the process at the other end of `pipe`, found with `pid_of`.
    fn other_end(
        pipe: HANDLE,
        pid_of: unsafe extern "system" fn(HANDLE, *mut u32) -> i32,
    ) -> Owner {
        let mut pid = 0u32;
        // SAFETY: `pipe` is an open pipe handle; `pid` is a valid out-pointer.
        if unsafe { pid_of(pipe, &mut pid) } == 0 {
            return Owner::Unreadable {
                pid,
                why: format!("its pid: {}", std::io::Error::last_os_error()),
            };
        }
        crate::peer::windows::owner(pid)
    }

    /// Serves the status pipe until `shutdown` (see the module docs).
    pub async fn serve(
        name: PathBuf,
        config: Arc<AgentConfig>,
        pool: Arc<Pool>,
        listening: Vec<(&'static str, SocketAddr)>,
        shutdown: CancellationToken,
    ) {
        let name = name.to_string_lossy().into_owned();
        let me = my_user();
        let Some(sid) = me.clone() else {
            tracing::warn!("no status pipe: {}", PipeError::OwnUserUnknown);
            return;
        };
        // Someone answering already: say who, and leave the pipe to them. (Asked as a client
        // first because Wine does not enforce `FILE_FLAG_FIRST_PIPE_INSTANCE`; Windows does,
        // which closes the race between this check and the creation below.)
        match ClientOptions::new().write(false).open(&name) {
            Ok(pipe) => {
                let them = other_end(pipe.as_raw_handle(), GetNamedPipeServerProcessId);
                match check_other_end(End::Server, me.as_deref(), &them) {
                    Ok(()) => {
                        tracing::warn!(pipe = %name, "another agent of yours answers on the status pipe; `sallyport status` shows that one")
                    }
                    Err(e) => {
                        tracing::warn!(pipe = %name, "{e}: this agent serves no status, and `sallyport status` refuses that pipe")
                    }
                }
                return;
            }
            Err(e) if e.raw_os_error() == Some(ERROR_PIPE_BUSY as i32) => {
                tracing::warn!(pipe = %name, "another process answers on the status pipe; `sallyport status` will not reach this agent");
                return;
            }
            Err(_) => {}
        }
        let mut server = match create(&name, &sid, true) {
            Ok(s) => s,
            Err(e) if e.raw_os_error() == Some(ERROR_ACCESS_DENIED as i32) => {
                tracing::warn!(pipe = %name, "another process holds the status pipe (another agent of yours, or someone else squatting its name); `sallyport status` will not reach this agent");
                return;
            }
            Err(e) => {
                tracing::warn!(pipe = %name, error = %e, "no status pipe: `sallyport status` will not work");
                return;
            }
        };
        tracing::debug!(pipe = %name, "status pipe ready");
        loop {
            let r = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = server.connect() => r,
            };
            // The next instance is waiting before this one is answered.
            let next = match create(&name, &sid, false) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(pipe = %name, error = %e, "status pipe: cannot make a new instance; `sallyport status` stops working");
                    break;
                }
            };
            let conn = std::mem::replace(&mut server, next);
            if let Err(e) = r {
                tracing::debug!(error = %e, "status pipe: a client went away while connecting");
                continue;
            }
            let them = other_end(conn.as_raw_handle(), GetNamedPipeClientProcessId);
            if let Err(e) = check_other_end(End::Client, me.as_deref(), &them) {
                tracing::warn!("status request refused: {e}");
                continue;
            }
            let text = super::super::render(&config, &pool, &listening);
            tokio::spawn(async move {
                let mut conn = conn;
                let _ = conn.write_all(text.as_bytes()).await;
                // Dropping closes our end; the client reads what was written, then the end.
            });
        }
    }

    /// `sallyport status`: asks the agent on `name`; `Err` says why there is no answer.
    pub async fn query(name: &Path) -> Result<String, String> {
        let name = name.to_string_lossy().into_owned();
        let deadline = Instant::now() + Duration::from_secs(5);
        let pipe = loop {
            match ClientOptions::new().write(false).open(&name) {
                Ok(p) => break p,
                // Every instance is busy answering someone: wait for the next one.
                Err(e)
                    if e.raw_os_error() == Some(ERROR_PIPE_BUSY as i32)
                        && Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => {
                    return Err(format!(
                        "no agent is running for this user ({name}: {e}); start it with `sallyport run` or `sallyport service start`"
                    ))
                }
            }
        };
        let them = other_end(pipe.as_raw_handle(), GetNamedPipeServerProcessId);
        check_other_end(End::Server, my_user().as_deref(), &them).map_err(|e| e.to_string())?;
        super::super::read_answer(pipe).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: &str = "S-1-5-21-1004336348-1177238915-682003330-1001";

    #[test]
    fn the_pipe_is_named_after_the_users_sid() {
        assert_eq!(
            pipe_name(ME).unwrap(),
            r"\\.\pipe\sallyport-S-1-5-21-1004336348-1177238915-682003330-1001-status"
        );
    }

    #[test]
    fn the_pipe_dacl_admits_only_the_owner_sid() {
        // Protected (no inherited entries), one allow entry, for this SID alone: no Everyone
        // (WD), Administrators (BA), SYSTEM (SY) or Authenticated Users (AU).
        assert_eq!(pipe_sddl(ME).unwrap(), format!("D:P(A;;GA;;;{ME})"));
        let sddl = pipe_sddl("S-1-5-21-0-0-0-1000").unwrap();
        assert_eq!(sddl.matches("(A;").count(), 1, "{sddl}");
        for other in ["WD", "BA", "SY", "AU", "(D;"] {
            assert!(!sddl.contains(other), "{sddl}");
        }
    }

    #[test]
    fn an_sddl_injection_through_a_malformed_sid_is_refused() {
        // Whatever reaches the SDDL string could add entries: only a SID's own characters pass.
        for bad in [
            "S-1-5-21-1)(A;;GA;;;WD",
            "S-1-5-21-1-1001)(A;;GA;;;WD)",
            "WD",
            "S-1-5",
            "S-1-5-",
            "S-1--5-18",
            "S-2-5-18",
            "s-1-5-18",
            "S-1-5-18 ",
            "S-1-5-99999999999",
            "S-1-0x12-1",
            "S-1-5-1-2-3-4-5-6-7-8-9-10-11-12-13-14-15-16",
            "",
        ] {
            let e = pipe_sddl(bad).unwrap_err();
            assert!(matches!(e, PipeError::NotASid(_)), "{bad}: {e}");
            assert!(pipe_name(bad).is_err(), "{bad}");
            assert!(e.to_string().contains("not a user SID"), "{e}");
        }
        for good in [
            "S-1-5-18",
            "S-1-5-21-0-0-0-1000",
            "S-1-0x123456789ABC-1",
            "S-1-5-1-2-3-4-5-6-7-8-9-10-11-12-13-14-15",
        ] {
            assert_eq!(valid_sid(good), Ok(good));
        }
    }

    #[test]
    fn another_user_at_either_end_of_the_status_pipe_is_refused() {
        let mine = Owner::User(ME.into());
        assert_eq!(check_other_end(End::Client, Some(ME), &mine), Ok(()));
        assert_eq!(check_other_end(End::Server, Some(ME), &mine), Ok(()));
        // Another user's `sallyport status` (had the DACL let it in).
        let other = Owner::User("S-1-5-21-1004336348-1177238915-682003330-1002".into());
        let e = check_other_end(End::Client, Some(ME), &other).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("the status pipe's client runs as user S-1-5-21-1004336348-1177238915-682003330-1002"),
            "{e}"
        );
        // A pipe squatted by another user, seen by `sallyport status`.
        let e = check_other_end(End::Server, Some(ME), &other).unwrap_err();
        assert!(e.to_string().contains("server runs as user"), "{e}");
        // A process whose user cannot be read, or our own user unknown: refused.
        let hidden = Owner::Unreadable {
            pid: 4242,
            why: "OpenProcess: Access is denied.".into(),
        };
        let e = check_other_end(End::Client, Some(ME), &hidden).unwrap_err();
        assert!(e.to_string().contains("process 4242"), "{e}");
        assert_eq!(
            check_other_end(End::Client, None, &mine),
            Err(PipeError::OwnUserUnknown)
        );
    }
}
