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
        CredFree, CredReadW, CREDENTIALW, CRED_TYPE_GENERIC,
    };

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
