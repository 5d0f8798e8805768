//! MIT GSSAPI, loaded at run time: the C types declared here (RFC 2744 with MIT's unpacked layout
//! on Linux), the few functions Negotiate needs resolved once per process, and a context that
//! releases what the library allocated.

use super::{NegotiateError, Package, Step};
use libloading::Library;
use std::ffi::c_void;
use std::ptr;
use std::sync::OnceLock;

/// Library names tried in order: MIT's runtime, then the unversioned development link.
const LIBRARIES: &[&str] = &["libgssapi_krb5.so.2", "libgssapi_krb5.so"];
/// Names another GSSAPI library to load instead (e.g. Heimdal's `libgssapi.so.3`).
const LIBRARY_ENV: &str = "SALLYPORT_GSSAPI_LIBRARY";
/// What to install when none loads (Debian/Ubuntu name; RHEL calls it krb5-libs).
const PACKAGE: &str = "libgssapi-krb5-2 (Debian/Ubuntu) or krb5-libs (RHEL/Fedora)";

/// `OM_uint32`.
type Status = u32;
/// `gss_name_t`, `gss_ctx_id_t`, `gss_cred_id_t`: opaque pointers.
type Handle = *mut c_void;

/// `gss_buffer_desc`.
#[repr(C)]
struct Buffer {
    length: usize,
    value: *mut c_void,
}

impl Buffer {
    fn empty() -> Buffer {
        Buffer {
            length: 0,
            value: ptr::null_mut(),
        }
    }
}

/// `gss_OID_desc`.
#[repr(C)]
struct Oid {
    length: u32,
    elements: *mut c_void,
}

/// An OID descriptor pointing at static DER content bytes (the library only reads them).
fn oid(der: &'static [u8]) -> Oid {
    Oid {
        length: der.len() as u32,
        elements: der.as_ptr() as *mut c_void,
    }
}

/// GSS_C_NT_HOSTBASED_SERVICE, 1.2.840.113554.1.2.1.4.
const NT_HOSTBASED_SERVICE: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x12, 0x01, 0x02, 0x01, 0x04];
/// The Kerberos 5 mechanism, 1.2.840.113554.1.2.2.
const MECH_KRB5: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x12, 0x01, 0x02, 0x02];
/// SPNEGO, 1.3.6.1.5.5.2.
const MECH_SPNEGO: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x02];

const GSS_S_CONTINUE_NEEDED: Status = 1;
/// Calling and routine errors live in the upper 16 bits (RFC 2744 `GSS_ERROR`).
const ERROR_MASK: Status = 0xffff_0000;
const ROUTINE_SHIFT: u32 = 16;
const GSS_S_NO_CRED: Status = 7;
const GSS_S_CREDENTIALS_EXPIRED: Status = 11;
const GSS_S_FAILURE: Status = 13;
const GSS_C_GSS_CODE: i32 = 1;
const GSS_C_MECH_CODE: i32 = 2;
const GSS_C_MUTUAL_FLAG: Status = 2;
const GSS_C_INITIATE: i32 = 1;

type ImportName = unsafe extern "C" fn(*mut Status, *mut Buffer, *mut Oid, *mut Handle) -> Status;
type InitSecContext = unsafe extern "C" fn(
    *mut Status,   // minor_status
    Handle,        // claimant_cred_handle
    *mut Handle,   // context_handle
    Handle,        // target_name
    *mut Oid,      // mech_type
    Status,        // req_flags
    Status,        // time_req
    *mut c_void,   // input_chan_bindings
    *mut Buffer,   // input_token
    *mut *mut Oid, // actual_mech_type
    *mut Buffer,   // output_token
    *mut Status,   // ret_flags
    *mut Status,   // time_rec
) -> Status;
type ReleaseBuffer = unsafe extern "C" fn(*mut Status, *mut Buffer) -> Status;
type DeleteSecContext = unsafe extern "C" fn(*mut Status, *mut Handle, *mut Buffer) -> Status;
type ReleaseName = unsafe extern "C" fn(*mut Status, *mut Handle) -> Status;
type DisplayStatus =
    unsafe extern "C" fn(*mut Status, Status, i32, *mut Oid, *mut Status, *mut Buffer) -> Status;
type AcquireCred = unsafe extern "C" fn(
    *mut Status,      // minor_status
    Handle,           // desired_name
    Status,           // time_req
    *mut c_void,      // desired_mechs (gss_OID_set)
    i32,              // cred_usage
    *mut Handle,      // output_cred_handle
    *mut *mut c_void, // actual_mechs
    *mut Status,      // time_rec
) -> Status;
type ReleaseCred = unsafe extern "C" fn(*mut Status, *mut Handle) -> Status;

/// The loaded library and the functions we call. Lives for the whole process (never unloaded:
/// Kerberos libraries keep global state and unloading them is not safe).
struct Api {
    library: String,
    import_name: ImportName,
    init_sec_context: InitSecContext,
    release_buffer: ReleaseBuffer,
    delete_sec_context: DeleteSecContext,
    release_name: ReleaseName,
    display_status: DisplayStatus,
    acquire_cred: AcquireCred,
    release_cred: ReleaseCred,
    _lib: Library,
}

static API: OnceLock<Result<Api, NegotiateError>> = OnceLock::new();

fn api() -> Result<&'static Api, NegotiateError> {
    API.get_or_init(|| match std::env::var(LIBRARY_ENV) {
        Ok(name) if !name.is_empty() => load(&[name]),
        _ => load(LIBRARIES),
    })
    .as_ref()
    .map_err(Clone::clone)
}

/// Loads the first of `names` that loads and resolves the functions.
fn load<S: AsRef<str>>(names: &[S]) -> Result<Api, NegotiateError> {
    let mut found = None;
    for name in names.iter().map(AsRef::as_ref) {
        // SAFETY: loading MIT's GSSAPI runs its ELF initialisers, which only set up the
        // library's own state; we load it by its well-known soname, not from a user path.
        match unsafe { Library::new(name) } {
            Ok(lib) => {
                found = Some((name.to_string(), lib));
                break;
            }
            Err(e) => tracing::debug!(library = name, error = %e, "GSSAPI library not loaded"),
        }
    }
    let Some((library, lib)) = found else {
        return Err(NegotiateError::LibraryMissing {
            library: names
                .first()
                .map_or("libgssapi_krb5.so.2", AsRef::as_ref)
                .to_string(),
            package: PACKAGE,
        });
    };
    macro_rules! sym {
        ($name:literal) => {
            // SAFETY: the symbol is a function from RFC 2744 and the type we ask for is its C
            // prototype (declared above from the RFC); the pointer is copied out and stays valid
            // because the library is kept in `Api` and never unloaded.
            match unsafe { lib.get(concat!($name, "\0").as_bytes()) } {
                Ok(f) => *f,
                Err(_) => {
                    return Err(NegotiateError::SymbolMissing {
                        library: library.clone(),
                        symbol: $name,
                        package: PACKAGE,
                    })
                }
            }
        };
    }
    let api = Api {
        import_name: sym!("gss_import_name"),
        init_sec_context: sym!("gss_init_sec_context"),
        release_buffer: sym!("gss_release_buffer"),
        delete_sec_context: sym!("gss_delete_sec_context"),
        release_name: sym!("gss_release_name"),
        display_status: sym!("gss_display_status"),
        acquire_cred: sym!("gss_acquire_cred"),
        release_cred: sym!("gss_release_cred"),
        _lib: lib,
        // Last: the symbol lookups above still name it in their errors.
        library,
    };
    tracing::debug!(library = %api.library, "GSSAPI loaded");
    Ok(api)
}

fn is_error(major: Status) -> bool {
    major & ERROR_MASK != 0
}

fn routine_error(major: Status) -> Status {
    (major >> ROUTINE_SHIFT) & 0xff
}

impl Api {
    /// Copies a library-owned buffer into a `Vec` and gives the buffer back to the library.
    fn take_buffer(&self, buf: &mut Buffer) -> Vec<u8> {
        let bytes = if buf.value.is_null() || buf.length == 0 {
            Vec::new()
        } else {
            // SAFETY: the library filled `buf` with `length` readable bytes at `value`, and
            // they stay valid until gss_release_buffer below.
            unsafe { std::slice::from_raw_parts(buf.value as *const u8, buf.length) }.to_vec()
        };
        if !buf.value.is_null() {
            let mut minor = 0;
            // SAFETY: `buf` was allocated by this library; release_buffer frees it and resets
            // it to empty, so it cannot be freed twice.
            unsafe { (self.release_buffer)(&mut minor, buf) };
        }
        bytes
    }

    /// The library's text for one status code (GSS or mechanism), on one line.
    fn status_text(&self, code: Status, kind: i32) -> String {
        let mut parts = Vec::new();
        let mut message_context: Status = 0;
        // A status has at most a few messages; bound the loop against a misbehaving library.
        for _ in 0..8 {
            let mut minor = 0;
            let mut buf = Buffer::empty();
            // SAFETY: all pointers are to live locals; GSS_C_NO_OID (null) lets the library
            // find the mechanism that produced a minor code.
            let major = unsafe {
                (self.display_status)(
                    &mut minor,
                    code,
                    kind,
                    ptr::null_mut(),
                    &mut message_context,
                    &mut buf,
                )
            };
            let text = self.take_buffer(&mut buf);
            if is_error(major) {
                break;
            }
            let text = String::from_utf8_lossy(&text).trim().to_string();
            if !text.is_empty() {
                parts.push(text);
            }
            if message_context == 0 {
                break;
            }
        }
        parts.join("; ").replace(['\n', '\r'], " ")
    }

    /// The error for a failed call: the mechanism's message when it has one (it is the useful
    /// part: "No Kerberos credentials available (default cache: …)"), else the GSS message.
    fn error(
        &self,
        call: &'static str,
        service: &str,
        major: Status,
        minor: Status,
    ) -> NegotiateError {
        let major_text = self.status_text(major & ERROR_MASK, GSS_C_GSS_CODE);
        let minor_text = if minor != 0 {
            self.status_text(minor, GSS_C_MECH_CODE)
        } else {
            String::new()
        };
        // The generic GSS texts ("Unspecified GSS failure", "No credentials were supplied …")
        // add nothing to the mechanism's own.
        let generic = matches!(
            routine_error(major),
            GSS_S_FAILURE | GSS_S_NO_CRED | GSS_S_CREDENTIALS_EXPIRED
        );
        let message = match (minor_text.is_empty(), generic) {
            (true, _) => major_text,
            (false, true) => minor_text,
            (false, false) => format!("{major_text}: {minor_text}"),
        };
        if is_missing_ticket(major, &message) {
            return NegotiateError::NoTicket { detail: message };
        }
        NegotiateError::Gss {
            call,
            service: service.to_string(),
            message: format!("{message}{}", hint(&message)),
        }
    }
}

/// What to do about the Kerberos failures users meet most.
fn hint(message: &str) -> &'static str {
    let m = message.to_ascii_lowercase();
    if m.contains("not found in kerberos database") {
        " (use the proxy's DNS name as registered in the domain, not an alias or IP address)"
    } else if m.contains("clock skew") {
        " (this machine's clock is off; fix the time)"
    } else if m.contains("cannot contact any kdc") || m.contains("cannot find kdc") {
        " (no domain controller reachable; check the network or krb5.conf)"
    } else {
        ""
    }
}

/// Whether a failure means "get a ticket first": GSS says so by code, MIT's krb5 mechanism
/// through its (stable, documented) messages under GSS_S_FAILURE.
fn is_missing_ticket(major: Status, message: &str) -> bool {
    let routine = routine_error(major);
    if routine == GSS_S_NO_CRED || routine == GSS_S_CREDENTIALS_EXPIRED {
        return true;
    }
    let m = message.to_ascii_lowercase();
    [
        "no kerberos credentials available",
        "no credentials cache found",
        "credentials cache file",
        "ticket expired",
        "matching credential not found",
    ]
    .iter()
    .any(|p| m.contains(p))
}

/// One GSSAPI security context and the imported target name.
pub(super) struct Context {
    api: &'static Api,
    service: String,
    package: Package,
    name: Handle,
    ctx: Handle,
    /// The mechanism in use once the first step succeeded.
    mech: &'static [u8],
}

// SAFETY: the handles are owned exclusively by this value and used only through `&mut self`;
// MIT GSSAPI is thread-safe and its contexts and names are not tied to the thread that made them.
unsafe impl Send for Context {}

impl Context {
    pub(super) fn new(service: &str, package: Package) -> Result<Context, NegotiateError> {
        let mech = match package {
            Package::Negotiate => MECH_SPNEGO,
            Package::Kerberos => MECH_KRB5,
            Package::Ntlm => {
                return Err(NegotiateError::Unsupported(
                    "NTLM through the system's security layer exists only on Windows; use the built-in NTLM scheme with a password".into(),
                ))
            }
        };
        let api = api()?;
        let mut minor = 0;
        let mut input = Buffer {
            length: service.len(),
            value: service.as_ptr() as *mut c_void,
        };
        let mut name_type = oid(NT_HOSTBASED_SERVICE);
        let mut name: Handle = ptr::null_mut();
        // SAFETY: `input` points at `service`'s bytes (read only, alive for the call), the OID at
        // static bytes; on success `name` receives a handle we release in Drop.
        let major = unsafe { (api.import_name)(&mut minor, &mut input, &mut name_type, &mut name) };
        if is_error(major) {
            return Err(NegotiateError::BadServiceName {
                name: service.to_string(),
                reason: api
                    .error("gss_import_name", service, major, minor)
                    .to_string(),
            });
        }
        Ok(Context {
            api,
            service: service.to_string(),
            package,
            name,
            ctx: ptr::null_mut(),
            mech,
        })
    }

    pub(super) fn step(&mut self, input: Option<&[u8]>) -> Result<Step, NegotiateError> {
        let first = self.ctx.is_null();
        match self.init(self.mech, input) {
            Ok(step) => Ok(step),
            Err(spnego_err) if first && self.package == Package::Negotiate => {
                // SPNEGO hides the Kerberos reason ("cannot find mechanisms to negotiate");
                // raw Kerberos either works (proxies accept it) or says what is wrong.
                self.delete_context();
                match self.init(MECH_KRB5, None) {
                    Ok(step) => {
                        tracing::debug!(service = %self.service, error = %spnego_err, "SPNEGO failed, using the Kerberos mechanism directly");
                        self.mech = MECH_KRB5;
                        Ok(step)
                    }
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(e),
        }
    }

    fn init(&mut self, mech: &'static [u8], input: Option<&[u8]>) -> Result<Step, NegotiateError> {
        let api = self.api;
        let mut minor = 0;
        let mut mech_oid = oid(mech);
        let mut in_buf = input.map(|t| Buffer {
            length: t.len(),
            value: t.as_ptr() as *mut c_void,
        });
        let in_ptr = in_buf
            .as_mut()
            .map_or(ptr::null_mut(), |b| b as *mut Buffer);
        let mut out = Buffer::empty();
        // SAFETY: every pointer is to a live local or to `self`'s handles; null stands for
        // GSS_C_NO_CREDENTIAL (the default ticket cache), GSS_C_NO_CHANNEL_BINDINGS, and the
        // optional outputs we do not need. The input token is only read. The library updates
        // `self.ctx` in place (creating it on the first call) and fills `out`, released below.
        let major = unsafe {
            (api.init_sec_context)(
                &mut minor,
                ptr::null_mut(),
                &mut self.ctx,
                self.name,
                &mut mech_oid,
                GSS_C_MUTUAL_FLAG,
                0,
                ptr::null_mut(),
                in_ptr,
                ptr::null_mut(),
                &mut out,
                ptr::null_mut(),
                ptr::null_mut(),
            )
        };
        let token = api.take_buffer(&mut out);
        if is_error(major) {
            return Err(api.error("gss_init_sec_context", &self.service, major, minor));
        }
        Ok(Step {
            token,
            complete: major & GSS_S_CONTINUE_NEEDED == 0,
        })
    }

    fn delete_context(&mut self) {
        if !self.ctx.is_null() {
            let mut minor = 0;
            // SAFETY: `self.ctx` is a context this library made; delete_sec_context frees it and
            // sets the handle to GSS_C_NO_CONTEXT. No output token is wanted (null).
            unsafe { (self.api.delete_sec_context)(&mut minor, &mut self.ctx, ptr::null_mut()) };
            self.ctx = ptr::null_mut();
        }
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        self.delete_context();
        if !self.name.is_null() {
            let mut minor = 0;
            // SAFETY: `self.name` came from gss_import_name and is released exactly once here.
            unsafe { (self.api.release_name)(&mut minor, &mut self.name) };
        }
    }
}

/// The library loads and the default credentials hold a ticket that has not expired.
pub(super) fn available() -> Result<(), NegotiateError> {
    let api = api()?;
    let mut minor = 0;
    let mut cred: Handle = ptr::null_mut();
    let mut lifetime: Status = 0;
    // SAFETY: null name (GSS_C_NO_NAME: the default principal), null mechanism set (the
    // defaults) and null actual_mechs; `cred` receives a handle released below.
    let major = unsafe {
        (api.acquire_cred)(
            &mut minor,
            ptr::null_mut(),
            0,
            ptr::null_mut(),
            GSS_C_INITIATE,
            &mut cred,
            ptr::null_mut(),
            &mut lifetime,
        )
    };
    if !cred.is_null() {
        let mut m = 0;
        // SAFETY: `cred` came from gss_acquire_cred and is released once.
        unsafe { (api.release_cred)(&mut m, &mut cred) };
    }
    if is_error(major) {
        return Err(match api.error("gss_acquire_cred", "", major, minor) {
            e @ NegotiateError::NoTicket { .. } => e,
            NegotiateError::Gss { message, .. } => NegotiateError::NoTicket { detail: message },
            e => e,
        });
    }
    if lifetime == 0 {
        return Err(NegotiateError::NoTicket {
            detail: "the ticket has expired".into(),
        });
    }
    tracing::debug!(
        library = api.library,
        lifetime_s = lifetime,
        "Kerberos credentials available"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// DER content bytes of a dotted OID, to check the constants above.
    fn der(dotted: &str) -> Vec<u8> {
        let arcs: Vec<u64> = dotted.split('.').map(|a| a.parse().unwrap()).collect();
        let mut out = vec![(arcs[0] * 40 + arcs[1]) as u8];
        for &arc in &arcs[2..] {
            let mut groups = vec![(arc & 0x7f) as u8];
            let mut rest = arc >> 7;
            while rest > 0 {
                groups.push((rest & 0x7f) as u8 | 0x80);
                rest >>= 7;
            }
            out.extend(groups.iter().rev());
        }
        out
    }

    #[test]
    fn oid_constants_match_their_dotted_form() {
        assert_eq!(NT_HOSTBASED_SERVICE, der("1.2.840.113554.1.2.1.4"));
        assert_eq!(MECH_KRB5, der("1.2.840.113554.1.2.2"));
        assert_eq!(MECH_SPNEGO, der("1.3.6.1.5.5.2"));
    }

    #[test]
    fn a_missing_library_is_an_error_naming_the_package() {
        let Err(e) = load(&["/nonexistent/libgssapi_krb5.so.2"]) else {
            panic!("loaded a library that does not exist");
        };
        assert_eq!(
            e,
            NegotiateError::LibraryMissing {
                library: "/nonexistent/libgssapi_krb5.so.2".into(),
                package: PACKAGE,
            }
        );
        assert!(e.to_string().contains("install libgssapi-krb5-2"), "{e}");
    }

    #[cfg(target_env = "gnu")]
    #[test]
    fn a_library_without_gssapi_is_refused() {
        // libc loads everywhere and has no gss_import_name.
        let Err(e) = load(&["libc.so.6"]) else {
            panic!("libc passed for GSSAPI");
        };
        assert!(
            matches!(
                e,
                NegotiateError::SymbolMissing {
                    symbol: "gss_import_name",
                    ..
                }
            ),
            "{e:?}"
        );
    }

    #[test]
    fn missing_tickets_are_recognised() {
        assert!(is_missing_ticket(GSS_S_NO_CRED << ROUTINE_SHIFT, ""));
        assert!(is_missing_ticket(
            GSS_S_FAILURE << ROUTINE_SHIFT,
            "No Kerberos credentials available (default cache: FILE:/tmp/krb5cc_1000)"
        ));
        assert!(!is_missing_ticket(
            GSS_S_FAILURE << ROUTINE_SHIFT,
            "Server not found in Kerberos database"
        ));
    }
}
