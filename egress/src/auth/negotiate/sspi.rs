//! Windows SSPI: the logged-on user's credentials (`AcquireCredentialsHandleW` with no
//! principal and no auth data) and `InitializeSecurityContextW` for the target `HTTP/host`.
//! The security package is a parameter, so `Negotiate` (Kerberos/SPNEGO) and `NTLM` single
//! sign-on both work without a password. Compile-checked on Linux; runs on Windows, and under
//! Wine in `tests/tests/windows.rs` (Negotiate with a Kerberos ticket).
//!
//! The output token goes into a buffer of our own, as large as the package's `cbMaxToken`
//! (`QuerySecurityPackageInfoW`), rather than one SSPI allocates (`ISC_REQ_ALLOCATE_MEMORY`):
//! Wine's Kerberos package does not support that flag and fails with "incomplete message".

use super::{NegotiateError, Package, Step};
use std::ptr;
use windows_sys::core::HRESULT;
use windows_sys::Win32::Foundation::{
    SEC_E_INVALID_TOKEN, SEC_E_LOGON_DENIED, SEC_E_NO_AUTHENTICATING_AUTHORITY,
    SEC_E_NO_CREDENTIALS, SEC_E_OK, SEC_E_SECPKG_NOT_FOUND, SEC_E_TARGET_UNKNOWN, SEC_E_TIME_SKEW,
    SEC_E_WRONG_PRINCIPAL, SEC_I_COMPLETE_AND_CONTINUE, SEC_I_COMPLETE_NEEDED,
    SEC_I_CONTINUE_NEEDED,
};
use windows_sys::Win32::Security::Authentication::Identity::{
    AcquireCredentialsHandleW, CompleteAuthToken, DeleteSecurityContext, FreeContextBuffer,
    FreeCredentialsHandle, InitializeSecurityContextW, QuerySecurityPackageInfoW, SecBuffer,
    SecBufferDesc, SecPkgInfoW, SECBUFFER_TOKEN, SECBUFFER_VERSION, SECPKG_CRED_OUTBOUND,
    SECURITY_NATIVE_DREP,
};
use windows_sys::Win32::Security::Credentials::SecHandle;

fn wide(s: &str) -> Vec<u16> {
    s.encode_utf16().chain(std::iter::once(0)).collect()
}

/// A short explanation of the SSPI codes a user can act on.
fn explain(code: HRESULT) -> &'static str {
    match code {
        SEC_E_NO_CREDENTIALS => "no credentials for this user (log on to the domain)",
        SEC_E_TARGET_UNKNOWN => "the domain does not know this proxy's service name (HTTP/host); use the proxy's DNS name",
        SEC_E_WRONG_PRINCIPAL => "the proxy's service name does not match its key (HTTP/host is registered for another account)",
        SEC_E_LOGON_DENIED => "the logon was denied",
        SEC_E_NO_AUTHENTICATING_AUTHORITY => "no domain controller could be reached",
        SEC_E_TIME_SKEW => "this machine's clock differs too much from the domain controller's",
        SEC_E_INVALID_TOKEN => "the proxy sent an invalid token",
        SEC_E_SECPKG_NOT_FOUND => "the security package is not installed",
        _ => "the security layer refused",
    }
}

fn is_missing_ticket(code: HRESULT) -> bool {
    matches!(
        code,
        SEC_E_NO_CREDENTIALS | SEC_E_NO_AUTHENTICATING_AUTHORITY | SEC_E_LOGON_DENIED
    )
}

/// Credentials and (after the first step) a security context.
pub(super) struct Context {
    service: String,
    package: Package,
    target: Vec<u16>,
    cred: SecHandle,
    ctx: Option<SecHandle>,
    /// The largest token the package makes (`cbMaxToken`): the output buffer's size.
    max_token: usize,
}

/// The largest token `package` makes, from `QuerySecurityPackageInfoW`.
fn max_token(package: Package, service: &str) -> Result<usize, NegotiateError> {
    let name = wide(package.sspi_name());
    let mut info: *mut SecPkgInfoW = ptr::null_mut();
    // SAFETY: `name` is NUL-terminated UTF-16 alive for the call; on success `info` points to a
    // SecPkgInfoW that SSPI allocated, read once and freed with FreeContextBuffer.
    let status = unsafe { QuerySecurityPackageInfoW(name.as_ptr(), &mut info) };
    if status != SEC_E_OK || info.is_null() {
        return Err(sspi_error(
            "QuerySecurityPackageInfoW",
            package,
            service,
            status,
        ));
    }
    // SAFETY: see above.
    let n = unsafe { (*info).cbMaxToken };
    // SAFETY: allocated by SSPI for us, freed once.
    unsafe { FreeContextBuffer(info.cast()) };
    // Windows' Kerberos says 48000 (MaxTokenSize; up to 65535); never below a page.
    Ok((n as usize).clamp(4096, 1 << 20))
}

impl Context {
    pub(super) fn new(service: &str, package: Package) -> Result<Context, NegotiateError> {
        let max_token = max_token(package, service)?;
        let cred = acquire(package, service)?;
        // SSPI names services `HTTP/host`; `service` arrives as `HTTP@host`.
        let target = wide(&service.replacen('@', "/", 1));
        Ok(Context {
            service: service.to_string(),
            package,
            target,
            cred,
            ctx: None,
            max_token,
        })
    }

    fn err(&self, call: &'static str, code: HRESULT) -> NegotiateError {
        sspi_error(call, self.package, &self.service, code)
    }

    pub(super) fn step(&mut self, input: Option<&[u8]>) -> Result<Step, NegotiateError> {
        let mut in_buf = SecBuffer {
            cbBuffer: input.map_or(0, |t| t.len() as u32),
            BufferType: SECBUFFER_TOKEN,
            pvBuffer: input.map_or(ptr::null_mut(), |t| t.as_ptr() as *mut _),
        };
        let in_desc = SecBufferDesc {
            ulVersion: SECBUFFER_VERSION,
            cBuffers: 1,
            pBuffers: &mut in_buf,
        };
        let mut out = vec![0u8; self.max_token];
        let mut out_buf = SecBuffer {
            cbBuffer: out.len() as u32,
            BufferType: SECBUFFER_TOKEN,
            pvBuffer: out.as_mut_ptr().cast(),
        };
        let mut out_desc = SecBufferDesc {
            ulVersion: SECBUFFER_VERSION,
            cBuffers: 1,
            pBuffers: &mut out_buf,
        };
        let mut new_ctx = self.ctx.unwrap_or(SecHandle {
            dwLower: 0,
            dwUpper: 0,
        });
        let mut attrs = 0u32;
        let mut expiry = 0i64;
        // SAFETY: `self.cred` is a live credentials handle; the context handle is null on the
        // first call and our live context afterwards; `self.target` is NUL-terminated UTF-16;
        // the input token is only read; the output buffer is `out`, `cbBuffer` bytes long, and
        // SSPI writes the token's length back into `cbBuffer`. All pointers are to live locals.
        let status = unsafe {
            InitializeSecurityContextW(
                &self.cred,
                self.ctx
                    .as_ref()
                    .map_or(ptr::null(), |c| c as *const SecHandle),
                self.target.as_ptr(),
                0,
                0,
                SECURITY_NATIVE_DREP,
                if input.is_some() {
                    &in_desc
                } else {
                    ptr::null()
                },
                0,
                &mut new_ctx,
                &mut out_desc,
                &mut attrs,
                &mut expiry,
            )
        };
        let ok = matches!(
            status,
            SEC_E_OK | SEC_I_CONTINUE_NEEDED | SEC_I_COMPLETE_NEEDED | SEC_I_COMPLETE_AND_CONTINUE
        );
        if ok {
            self.ctx = Some(new_ctx);
        }
        let mut complete_status = SEC_E_OK;
        if matches!(status, SEC_I_COMPLETE_NEEDED | SEC_I_COMPLETE_AND_CONTINUE) {
            // SAFETY: the context was just created/updated and `out_desc` is the token SSPI
            // produced for it.
            complete_status = unsafe { CompleteAuthToken(&new_ctx, &out_desc) };
        }
        out.truncate((out_buf.cbBuffer as usize).min(out.len()));
        let token = out;
        if !ok {
            return Err(self.err("InitializeSecurityContextW", status));
        }
        if complete_status != SEC_E_OK {
            return Err(self.err("CompleteAuthToken", complete_status));
        }
        Ok(Step {
            token,
            complete: matches!(status, SEC_E_OK | SEC_I_COMPLETE_NEEDED),
        })
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        if let Some(ctx) = self.ctx.take() {
            // SAFETY: `ctx` is a context SSPI created for us, deleted once.
            unsafe { DeleteSecurityContext(&ctx) };
        }
        // SAFETY: `self.cred` came from AcquireCredentialsHandleW and is freed once.
        unsafe { FreeCredentialsHandle(&self.cred) };
    }
}

fn sspi_error(
    call: &'static str,
    package: Package,
    service: &str,
    code: HRESULT,
) -> NegotiateError {
    if is_missing_ticket(code) {
        return NegotiateError::NoTicket {
            detail: format!(
                "SSPI {}: {} (0x{:08x})",
                package.sspi_name(),
                explain(code),
                code as u32
            ),
        };
    }
    if code == SEC_E_SECPKG_NOT_FOUND {
        return NegotiateError::Unsupported(format!(
            "the Windows security package {} is not installed",
            package.sspi_name()
        ));
    }
    NegotiateError::Sspi {
        call,
        package: package.sspi_name().to_string(),
        service: service.to_string(),
        code: code as u32,
        message: explain(code).to_string(),
    }
}

/// The current user's outbound credentials for `package`.
fn acquire(package: Package, service: &str) -> Result<SecHandle, NegotiateError> {
    let name = wide(package.sspi_name());
    let mut cred = SecHandle {
        dwLower: 0,
        dwUpper: 0,
    };
    let mut expiry = 0i64;
    // SAFETY: null principal and auth data select the logged-on user's credentials; `name` is
    // NUL-terminated UTF-16 alive for the call; `cred` receives a handle freed by the caller.
    let status = unsafe {
        AcquireCredentialsHandleW(
            ptr::null(),
            name.as_ptr(),
            SECPKG_CRED_OUTBOUND,
            ptr::null(),
            ptr::null(),
            None,
            ptr::null(),
            &mut cred,
            &mut expiry,
        )
    };
    if status != SEC_E_OK {
        return Err(sspi_error(
            "AcquireCredentialsHandleW",
            package,
            service,
            status,
        ));
    }
    Ok(cred)
}

/// SSPI is part of Windows; what can be missing is the user's credentials.
pub(super) fn available() -> Result<(), NegotiateError> {
    let cred = acquire(Package::Negotiate, "")?;
    // SAFETY: `cred` came from AcquireCredentialsHandleW and is freed once.
    unsafe { FreeCredentialsHandle(&cred) };
    Ok(())
}
