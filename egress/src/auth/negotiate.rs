//! HTTP Negotiate (RFC 4559): the tokens for `Proxy-Authorization: Negotiate <base64>`, made by
//! the operating system's own Kerberos so the user's logon ticket authenticates the agent to a
//! corporate proxy without a password anywhere in Sallyport.
//!
//! * Linux and other Unix: MIT GSSAPI (`libgssapi_krb5.so.2`), loaded at run time with
//!   `libloading`, so the agent starts — and the other schemes work — on machines without it.
//!   The mechanism is SPNEGO, as browsers send; when SPNEGO cannot produce a first token the
//!   raw Kerberos mechanism is tried (squid, Apache and IIS accept both), and its error is the
//!   one reported because it says what is wrong ("No Kerberos credentials available …").
//!   `SALLYPORT_GSSAPI_LIBRARY` names another library to load (e.g. Heimdal's
//!   `libgssapi.so.3`, which has the same interface).
//! * Windows: SSPI (`secur32.dll`) with the logged-on user's credentials. The package is a
//!   parameter ([`NegotiateContext::new_with_package`]): `Negotiate` (Kerberos, falling back to
//!   NTLM inside SPNEGO) or `NTLM` for NTLM single sign-on without a password.
//! * macOS: not yet. `GSS.framework` exports the same API, but Apple's headers pack
//!   `gss_OID_desc` (`#pragma pack(push, 2)`), and a layout we cannot test here would corrupt
//!   memory rather than fail; [`available`] says so.
//!
//! One [`NegotiateContext`] serves one handshake: [`NegotiateContext::step`] with `None` gives
//! the first token; each token the proxy sends back (`Proxy-Authenticate: Negotiate <token>`)
//! goes into the next `step`. Tokens are credentials (replayable for minutes): they never appear
//! in logs, errors or `Debug` output. Dropping the context releases everything it holds.
//! Delegation (forwarding the user's ticket to the proxy) is never requested.

use base64::Engine;
use std::fmt;

#[cfg(all(unix, not(target_os = "macos")))]
#[path = "negotiate/gss.rs"]
mod imp;

#[cfg(windows)]
#[path = "negotiate/sspi.rs"]
mod imp;

#[cfg(not(any(windows, all(unix, not(target_os = "macos")))))]
mod imp {
    //! Platforms without an implementation: every call says so.
    use super::{NegotiateError, Package, Step};

    pub(super) struct Context;

    fn unsupported() -> NegotiateError {
        NegotiateError::Unsupported(
            "Kerberos Negotiate is not supported on this platform yet (macOS: GSS.framework is untested); use Basic, Digest or NTLM".into(),
        )
    }

    impl Context {
        pub(super) fn new(_service: &str, _package: Package) -> Result<Context, NegotiateError> {
            Err(unsupported())
        }
        pub(super) fn step(&mut self, _input: Option<&[u8]>) -> Result<Step, NegotiateError> {
            Err(unsupported())
        }
    }

    pub(super) fn available() -> Result<(), NegotiateError> {
        Err(unsupported())
    }
}

/// What one call into the security layer produced.
struct Step {
    /// The token to send (empty: nothing to send).
    token: Vec<u8>,
    /// The security layer needs no more server tokens.
    complete: bool,
}

/// Why no Negotiate token could be made. Each message is one line that says what to fix.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NegotiateError {
    /// The GSSAPI library is not installed (Unix).
    #[error("GSSAPI library {library} not found; install {package} (or use another proxy authentication scheme)")]
    LibraryMissing {
        library: String,
        package: &'static str,
    },
    /// The library loaded but lacks a function we need (a broken or foreign library).
    #[error("GSSAPI library {library} has no `{symbol}`; install MIT Kerberos ({package})")]
    SymbolMissing {
        library: String,
        symbol: &'static str,
        package: &'static str,
    },
    /// The user has no (valid) Kerberos ticket or logon credentials.
    #[error("no Kerberos ticket: run kinit (or log on to the domain) — {detail}")]
    NoTicket { detail: String },
    /// The service name cannot be used.
    #[error("invalid Kerberos service name `{name}`: {reason} (expected HTTP@proxy.example.com)")]
    BadServiceName { name: String, reason: String },
    /// The package or mechanism is not available here.
    #[error("{0}")]
    Unsupported(String),
    /// A GSSAPI call failed; `message` is the library's own explanation.
    #[error("Kerberos ({call}) for {service}: {message}")]
    Gss {
        call: &'static str,
        service: String,
        message: String,
    },
    /// An SSPI call failed (Windows).
    #[error("SSPI {package} ({call}) for {service}: {message} (0x{code:08x})")]
    Sspi {
        call: &'static str,
        package: String,
        service: String,
        code: u32,
        message: String,
    },
    /// The caller broke the order of the handshake.
    #[error("Negotiate handshake with {service}: {reason}")]
    Protocol { service: String, reason: String },
}

/// Which security package makes the tokens. On Unix only Kerberos exists (`Negotiate` is SPNEGO
/// around Kerberos); on Windows SSPI offers all three.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Package {
    /// SPNEGO (RFC 4178): Kerberos, and on Windows NTLM when Kerberos is not possible.
    Negotiate,
    /// Raw Kerberos tokens (RFC 4121) without the SPNEGO wrapping.
    Kerberos,
    /// NTLM with the logged-on user's credentials (Windows SSPI only).
    Ntlm,
}

impl Package {
    /// `Negotiate`, `Kerberos` or `NTLM` (case-insensitive), as SSPI names them.
    pub fn parse(name: &str) -> Result<Package, NegotiateError> {
        match name.to_ascii_lowercase().as_str() {
            "negotiate" | "spnego" => Ok(Package::Negotiate),
            "kerberos" | "krb5" => Ok(Package::Kerberos),
            "ntlm" => Ok(Package::Ntlm),
            _ => Err(NegotiateError::Unsupported(format!(
                "unknown security package `{name}` (use Negotiate, Kerberos or NTLM)"
            ))),
        }
    }

    /// The SSPI package name.
    pub fn sspi_name(self) -> &'static str {
        match self {
            Package::Negotiate => "Negotiate",
            Package::Kerberos => "Kerberos",
            Package::Ntlm => "NTLM",
        }
    }
}

/// One Negotiate handshake with one proxy.
pub struct NegotiateContext {
    inner: imp::Context,
    service: String,
    package: Package,
    started: bool,
    complete: bool,
}

impl fmt::Debug for NegotiateContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NegotiateContext")
            .field("service", &self.service)
            .field("package", &self.package)
            .field("started", &self.started)
            .field("complete", &self.complete)
            .finish_non_exhaustive()
    }
}

impl NegotiateContext {
    /// A handshake with the host-based service `service`, e.g. `HTTP@proxy.corp` (the proxy's
    /// name as the user configured it; Kerberos needs a name, not an IP address). `HTTP/proxy.corp`
    /// is accepted too. Nothing goes on the wire and no ticket is needed yet: that is [`step`].
    ///
    /// [`step`]: NegotiateContext::step
    pub fn new(service: &str) -> Result<NegotiateContext, NegotiateError> {
        NegotiateContext::new_with_package(service, Package::Negotiate)
    }

    /// Like [`NegotiateContext::new`] with a chosen security package ([`Package::parse`] reads
    /// `"Negotiate"`, `"Kerberos"` or `"NTLM"`).
    pub fn new_with_package(
        service: &str,
        package: Package,
    ) -> Result<NegotiateContext, NegotiateError> {
        let (svc, host) = split_service(service)?;
        let canonical = format!("{svc}@{host}");
        let inner = imp::Context::new(&canonical, package)?;
        Ok(NegotiateContext {
            inner,
            service: canonical,
            package,
            started: false,
            complete: false,
        })
    }

    /// The service name in `HTTP@host` form.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// True once the security layer considers the handshake finished (after the last server
    /// token when mutual authentication was completed; some proxies never send that token, and
    /// then the tunnel simply works without it).
    pub fn is_complete(&self) -> bool {
        self.complete
    }

    /// One step of the handshake. The first call takes `None` and returns the initial token;
    /// later calls take the token from the proxy's `Proxy-Authenticate: Negotiate <token>` and
    /// return the answer, or `Ok(None)` when there is nothing more to send.
    pub fn step(&mut self, server_token: Option<&[u8]>) -> Result<Option<Vec<u8>>, NegotiateError> {
        if !self.started {
            if server_token.is_some() {
                return Err(NegotiateError::Protocol {
                    service: self.service.clone(),
                    reason: "the first step makes the client's token and takes no server token"
                        .into(),
                });
            }
            self.started = true;
        } else if self.complete {
            // A final token after completion (e.g. mutual authentication we did not ask to
            // verify): nothing left to do.
            return Ok(None);
        } else if server_token.is_none() {
            return Ok(None);
        }
        let step = self.inner.step(server_token)?;
        self.complete = step.complete;
        Ok((!step.token.is_empty()).then_some(step.token))
    }
}

/// Whether Negotiate can work for this user here, and if not, why (the library is missing, or
/// there is no Kerberos ticket). Cheap enough to call before choosing a scheme.
pub fn available() -> Result<(), NegotiateError> {
    imp::available()
}

/// `Negotiate <base64>`, the value for a `Proxy-Authorization` header.
pub fn header_value(token: &[u8]) -> String {
    format!(
        "Negotiate {}",
        base64::engine::general_purpose::STANDARD.encode(token)
    )
}

/// The file (or folder) of the user's Kerberos ticket cache, to notice a ticket obtained later
/// (`kinit`): `KRB5CCNAME` as `FILE:path`, `DIR:path` or a bare path, else MIT's default
/// `/tmp/krb5cc_<uid>`. `None` for caches that are not files (`KEYRING:`, `KCM:`, `API:`,
/// `MEMORY:`), and off Linux: those are looked up on each attempt only.
pub fn ccache_file() -> Option<std::path::PathBuf> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::fs::MetadataExt;
        let uid = std::fs::metadata("/proc/self").ok()?.uid();
        ccache_path(std::env::var("KRB5CCNAME").ok().as_deref(), uid)
    }
    #[cfg(not(target_os = "linux"))]
    None
}

/// [`ccache_file`] for a `KRB5CCNAME` value and a uid.
pub fn ccache_path(krb5ccname: Option<&str>, uid: u32) -> Option<std::path::PathBuf> {
    let name = krb5ccname
        .filter(|n| !n.is_empty())
        .map(String::from)
        .unwrap_or_else(|| format!("FILE:/tmp/krb5cc_{uid}"));
    let path = match name.split_once(':') {
        Some(("FILE" | "DIR", p)) => p,
        Some(_) => return None,
        None => name.as_str(),
    };
    // `DIR::/path/tkt` names one cache inside the collection: watch the collection.
    let path = path.strip_prefix(':').map_or(path, |p| {
        std::path::Path::new(p)
            .parent()
            .and_then(|d| d.to_str())
            .unwrap_or(p)
    });
    path.starts_with('/').then(|| path.into())
}

/// The token in a `Proxy-Authenticate` value: `Some(None)` for a bare `Negotiate` (the proxy
/// offers the scheme), `Some(Some(bytes))` for `Negotiate <base64>`, `None` when the value is
/// another scheme or the base64 is broken.
pub fn parse_challenge(value: &str) -> Option<Option<Vec<u8>>> {
    let value = value.trim();
    let (scheme, rest) = match value.split_once(char::is_whitespace) {
        Some((s, r)) => (s, r.trim()),
        None => (value, ""),
    };
    if !scheme.eq_ignore_ascii_case("negotiate") {
        return None;
    }
    if rest.is_empty() {
        return Some(None);
    }
    base64::engine::general_purpose::STANDARD
        .decode(rest)
        .ok()
        .map(Some)
}

/// Splits `HTTP@host` (or `HTTP/host`) into service and host, rejecting what no KDC would know.
fn split_service(name: &str) -> Result<(&str, &str), NegotiateError> {
    let bad = |reason: &str| NegotiateError::BadServiceName {
        name: name.to_string(),
        reason: reason.to_string(),
    };
    let (svc, host) = name
        .split_once('@')
        .or_else(|| name.split_once('/'))
        .ok_or_else(|| bad("no `@` between service and host"))?;
    if svc.is_empty() || host.is_empty() {
        return Err(bad("service and host must not be empty"));
    }
    let ok = |s: &str| {
        s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
    };
    if !ok(svc) || !ok(host) {
        return Err(bad(
            "only letters, digits, `.`, `-` and `_` are allowed (no realm, port or spaces)",
        ));
    }
    Ok((svc, host))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ticket_cache_file_is_found_to_notice_a_later_kinit() {
        let p = |v: Option<&str>| ccache_path(v, 1000).map(|p| p.display().to_string());
        assert_eq!(p(None).as_deref(), Some("/tmp/krb5cc_1000"));
        assert_eq!(p(Some("FILE:/run/k/cc")).as_deref(), Some("/run/k/cc"));
        assert_eq!(p(Some("/run/k/cc")).as_deref(), Some("/run/k/cc"));
        assert_eq!(
            p(Some("DIR:/run/user/1000/krb5cc")).as_deref(),
            Some("/run/user/1000/krb5cc")
        );
        assert_eq!(
            p(Some("DIR::/run/user/1000/krb5cc/tkt1")).as_deref(),
            Some("/run/user/1000/krb5cc")
        );
        for not_a_file in [
            "KEYRING:persistent:1000",
            "KCM:",
            "MEMORY:x",
            "FILE:relative",
        ] {
            assert_eq!(p(Some(not_a_file)), None, "{not_a_file}");
        }
    }

    #[test]
    fn service_names_are_checked_and_normalised() {
        assert_eq!(
            split_service("HTTP@proxy.corp").unwrap(),
            ("HTTP", "proxy.corp")
        );
        assert_eq!(
            split_service("HTTP/proxy.corp").unwrap(),
            ("HTTP", "proxy.corp")
        );
        for bad in [
            "proxy.corp",
            "@proxy",
            "HTTP@",
            "HTTP@proxy corp",
            "HTTP@proxy:3128",
        ] {
            let e = split_service(bad).unwrap_err().to_string();
            assert!(e.contains("invalid Kerberos service name"), "{bad}: {e}");
            assert!(!e.contains('\n'));
        }
    }

    #[test]
    fn challenges_and_headers() {
        assert_eq!(parse_challenge("Negotiate"), Some(None));
        assert_eq!(
            parse_challenge("negotiate  YWJj "),
            Some(Some(b"abc".to_vec()))
        );
        assert_eq!(parse_challenge("NTLM abc"), None);
        assert_eq!(parse_challenge("Negotiate !!!"), None);
        assert_eq!(header_value(b"abc"), "Negotiate YWJj");
    }

    #[test]
    fn packages_parse_by_their_sspi_names() {
        assert_eq!(Package::parse("NTLM").unwrap(), Package::Ntlm);
        assert_eq!(Package::parse("negotiate").unwrap(), Package::Negotiate);
        assert_eq!(Package::parse("Kerberos").unwrap(), Package::Kerberos);
        assert!(Package::parse("Digest").is_err());
        assert_eq!(Package::Ntlm.sspi_name(), "NTLM");
    }

    #[cfg(all(unix, not(target_os = "macos")))]
    #[test]
    fn ntlm_single_sign_on_is_windows_only() {
        let e = NegotiateContext::new_with_package("HTTP@proxy.corp", Package::Ntlm).unwrap_err();
        assert!(matches!(e, NegotiateError::Unsupported(_)), "{e:?}");
        assert!(e.to_string().contains("only on Windows"), "{e}");
    }

    #[test]
    fn errors_are_one_line_and_name_the_fix() {
        let e = NegotiateError::LibraryMissing {
            library: "libgssapi_krb5.so.2".into(),
            package: "libgssapi-krb5-2",
        };
        assert_eq!(
            e.to_string(),
            "GSSAPI library libgssapi_krb5.so.2 not found; install libgssapi-krb5-2 (or use another proxy authentication scheme)"
        );
        let e = NegotiateError::NoTicket {
            detail: "No Kerberos credentials available".into(),
        };
        assert!(e.to_string().starts_with("no Kerberos ticket: run kinit"));
    }
}
