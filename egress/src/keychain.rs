//! The proxy password from the OS keychain, for users who should not keep it in a file.
//!
//! One lookup, keyed by service `sallyport-proxy` and the proxy user:
//!
//! | OS | store it with | read with |
//! |---|---|---|
//! | Linux (Secret Service: GNOME Keyring, KWallet) | `secret-tool store --label='sallyport proxy' service sallyport-proxy user 'CORP\alice'` | `secret-tool lookup service sallyport-proxy user …` |
//! | macOS (login keychain) | `security add-generic-password -s sallyport-proxy -a 'CORP\alice' -w` | `security find-generic-password -s sallyport-proxy -a … -w` |
//! | Windows (Credential Manager) | `cmdkey /generic:sallyport-proxy:CORP\alice /user:CORP\alice /pass` | `CredReadW` (generic credential `sallyport-proxy:<user>`) |
//!
//! The tools run with a 3 s limit (a locked keyring may prompt; we do not wait for it), and a
//! miss is silent (debug log): the keychain is the last source, after
//! `SALLYPORT_PROXY_PASSWORD` and the credentials file.

use crate::proxy::Password;

/// The keychain service name.
pub const SERVICE: &str = "sallyport-proxy";

/// The password stored for `user`, if the OS keychain has one.
pub fn lookup(user: &str) -> Option<Password> {
    #[cfg(target_os = "macos")]
    {
        return lookup_with(
            std::path::Path::new("/usr/bin/security"),
            &["find-generic-password", "-s", SERVICE, "-a", user, "-w"],
        );
    }
    #[cfg(all(unix, not(target_os = "macos")))]
    {
        let tool = crate::system::find_on_path("secret-tool")?;
        return lookup_with(&tool, &["lookup", "service", SERVICE, "user", user]);
    }
    #[cfg(windows)]
    {
        return windows::lookup(&format!("{SERVICE}:{user}"));
    }
    #[allow(unreachable_code)]
    None
}

/// A secret of another kind (e.g. the agent's token, service `sallyport-token`, account the
/// gateway URL) from the OS keychain: the Secret Service on Linux (`secret-tool`), the
/// Credential Manager on Windows (generic credential `<service>:<account>`). macOS: none yet.
pub fn get(service: &str, account: &str) -> Option<String> {
    #[cfg(windows)]
    {
        return windows::lookup(&format!("{service}:{account}")).map(|p| p.expose().to_string());
    }
    #[cfg(all(unix, not(target_os = "macos")))]
    {
        let tool = crate::system::find_on_path("secret-tool")?;
        return lookup_with(&tool, &["lookup", "service", service, "account", account])
            .map(|p| p.expose().to_string());
    }
    #[allow(unreachable_code)]
    {
        let _ = (service, account);
        None
    }
}

/// Stores a secret (see [`get`]); `false` when no keychain is reachable. The secret never goes
/// on a command line (`secret-tool store` reads it from stdin).
pub fn store(service: &str, account: &str, secret: &str) -> bool {
    #[cfg(windows)]
    {
        return windows::store(&format!("{service}:{account}"), account, secret)
            && get(service, account).as_deref() == Some(secret);
    }
    #[cfg(all(unix, not(target_os = "macos")))]
    {
        use std::io::Write;
        use std::process::{Command, Stdio};
        let Some(tool) = crate::system::find_on_path("secret-tool") else {
            return false;
        };
        let Ok(mut child) = Command::new(tool)
            .args(["store", "--label", &format!("{service} {account}")])
            .args(["service", service, "account", account])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
        else {
            return false;
        };
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(secret.as_bytes());
        }
        return child.wait().is_ok_and(|s| s.success())
            && get(service, account).as_deref() == Some(secret);
    }
    #[allow(unreachable_code)]
    {
        let _ = (service, account, secret);
        false
    }
}

/// Removes a secret; `true` when one was removed.
pub fn delete(service: &str, account: &str) -> bool {
    #[cfg(windows)]
    {
        return windows::delete(&format!("{service}:{account}"));
    }
    #[cfg(all(unix, not(target_os = "macos")))]
    {
        let Some(tool) = crate::system::find_on_path("secret-tool") else {
            return false;
        };
        return std::process::Command::new(tool)
            .args(["clear", "service", service, "account", account])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    }
    #[allow(unreachable_code)]
    {
        let _ = (service, account);
        false
    }
}

/// Runs a keychain tool; its first output line is the password.
#[cfg(unix)]
pub fn lookup_with(tool: &std::path::Path, args: &[&str]) -> Option<Password> {
    let out = crate::system::run_bounded(tool, args, &[], std::time::Duration::from_secs(3))?;
    let line = out.lines().next().unwrap_or("");
    (!line.is_empty()).then(|| Password::new(line))
}

#[cfg(windows)]
mod windows {
    use crate::proxy::Password;
    use windows_sys::Win32::Security::Credentials::{
        CredDeleteW, CredFree, CredReadW, CredWriteW, CREDENTIALW, CRED_PERSIST_LOCAL_MACHINE,
        CRED_TYPE_GENERIC,
    };

    fn wide(s: &str) -> Vec<u16> {
        s.encode_utf16().chain(std::iter::once(0)).collect()
    }

    pub fn store(target: &str, user: &str, secret: &str) -> bool {
        let mut target = wide(target);
        let mut user = wide(user);
        // UTF-16LE, as cmdkey writes passwords.
        let mut blob: Vec<u8> = secret
            .encode_utf16()
            .flat_map(|u| u.to_le_bytes())
            .collect();
        // SAFETY: every pointer refers to a buffer alive for the call; the struct is fully
        // initialised (zeroed, then the fields CredWriteW reads); CredWriteW copies them.
        unsafe {
            let mut cred: CREDENTIALW = std::mem::zeroed();
            cred.Type = CRED_TYPE_GENERIC;
            cred.TargetName = target.as_mut_ptr();
            cred.UserName = user.as_mut_ptr();
            cred.CredentialBlobSize = blob.len() as u32;
            cred.CredentialBlob = blob.as_mut_ptr();
            cred.Persist = CRED_PERSIST_LOCAL_MACHINE;
            CredWriteW(&cred, 0) != 0
        }
    }

    pub fn delete(target: &str) -> bool {
        let target = wide(target);
        // SAFETY: `target` is NUL-terminated and alive for the call.
        unsafe { CredDeleteW(target.as_ptr(), CRED_TYPE_GENERIC, 0) != 0 }
    }

    pub fn lookup(target: &str) -> Option<Password> {
        let wide: Vec<u16> = target.encode_utf16().chain(std::iter::once(0)).collect();
        let mut cred: *mut CREDENTIALW = std::ptr::null_mut();
        // SAFETY: `wide` is NUL-terminated and outlives the call; on success `cred` points to a
        // CREDENTIALW owned by the system until CredFree, which we call once below.
        let ok = unsafe { CredReadW(wide.as_ptr(), CRED_TYPE_GENERIC, 0, &mut cred) };
        if ok == 0 || cred.is_null() {
            return None;
        }
        // SAFETY: `cred` is valid (checked above); the blob is `CredentialBlobSize` bytes.
        let password = unsafe {
            let c = &*cred;
            let blob = if c.CredentialBlob.is_null() {
                &[][..]
            } else {
                std::slice::from_raw_parts(c.CredentialBlob, c.CredentialBlobSize as usize)
            };
            // cmdkey stores the password as UTF-16LE.
            let units: Vec<u16> = blob
                .chunks_exact(2)
                .map(|p| u16::from_le_bytes([p[0], p[1]]))
                .collect();
            String::from_utf16(&units).ok()
        };
        // SAFETY: allocated by CredReadW, freed once.
        unsafe { CredFree(cred as *const core::ffi::c_void) };
        password.filter(|p| !p.is_empty()).map(Password::new)
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    #[test]
    fn a_keychain_tool_answer_is_the_password_and_a_miss_is_none() {
        let dir = std::env::temp_dir().join(format!("sp-keychain-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let tool = dir.join("secret-tool");
        // Answers only for the right service and user, like secret-tool.
        std::fs::write(
            &tool,
            "#!/bin/sh\n[ \"$3\" = sallyport-proxy ] && [ \"$5\" = 'CORP\\alice' ] && { echo 'kc-Pw 1'; exit 0; }\nexit 1\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
        let got = lookup_with(
            &tool,
            &["lookup", "service", SERVICE, "user", "CORP\\alice"],
        );
        assert_eq!(
            got.map(|p| p.expose().to_string()).as_deref(),
            Some("kc-Pw 1")
        );
        assert!(lookup_with(&tool, &["lookup", "service", SERVICE, "user", "bob"]).is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
