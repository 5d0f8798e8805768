//! `--tls native`: the outer TLS to the gateway through the OS's TLS stack (`native-tls`:
//! OpenSSL on Linux, SChannel on Windows, Security.framework on macOS) instead of rustls, for
//! desktops whose policy demands the OS stack, and an optional client certificate from a
//! PKCS#12 file for gateways behind a TLS terminator that asks for one.
//!
//! What runs inside is unchanged: with a v2 token the Noise handshake authenticates the
//! gateway whatever the certificate, so the certificate is not checked here either (as with
//! rustls). `native-tls` exposes no TLS exporter, so a v2 session over it can never prove that
//! the TLS is the gateway's own and always runs sealed ([`crate::GatewayStream::exporter`] is
//! `None`).
//!
//! A PKCS#12 file whose password is wrong, or whose certificate has expired (or is not valid
//! yet), is refused at start-up with one line naming the file. The password comes from a file
//! or the environment, never from a flag.
//!
//! On Windows the certificate may come from the user's store instead (`store:<SHA-1
//! thumbprint>`, as `certutil -user -store My` shows it): it is looked up in
//! `CurrentUser\My`, checked for its dates, and handed to SChannel through an in-memory
//! PKCS#12 export, so its private key must be marked exportable (`native-tls` takes an identity
//! only as PKCS#12 or PKCS#8). Compile-checked only: no test runs real Windows.

use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The environment variable that may hold the PKCS#12 password.
pub const CLIENT_CERT_PASSWORD_ENV: &str = "SALLYPORT_CLIENT_CERT_PASSWORD";

/// Why the native TLS stack could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum NativeTlsError {
    #[error("client certificate {path}: {why}")]
    ClientCert { path: PathBuf, why: String },
    #[error("CA file {path}: {why}")]
    Ca { path: PathBuf, why: String },
    #[error("the OS TLS stack: {0}")]
    Stack(String),
}

/// The PKCS#12 password. `Debug` shows nothing of it.
#[derive(Clone, Default)]
pub struct CertPassword(String);

impl CertPassword {
    pub fn new(s: impl Into<String>) -> CertPassword {
        CertPassword(s.into())
    }
}

impl std::fmt::Debug for CertPassword {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CertPassword(****)")
    }
}

/// What `--tls native` is set up with.
#[derive(Clone, Debug, Default)]
pub struct NativeOptions {
    /// Accept any certificate: a v2 token's handshake authenticates the gateway.
    pub any_certificate: bool,
    /// A CA (PEM) to trust *instead of* the OS store (v1 tokens' `--ca`): a TLS-inspecting
    /// proxy whose CA sits in the OS store must not pass for the gateway, since a v1 connector
    /// sends its bearer token on whatever this TLS accepts.
    pub ca: Option<PathBuf>,
    /// A client certificate and key in a PKCS#12 file, and its password.
    pub client_cert: Option<(PathBuf, CertPassword)>,
}

/// The OS TLS stack, set up once; cheap to clone.
#[derive(Clone)]
pub struct NativeTls {
    pub(crate) connector: tokio_native_tls::TlsConnector,
    /// The client certificate file, for messages.
    pub client_cert: Option<PathBuf>,
}

impl std::fmt::Debug for NativeTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NativeTls")
            .field("client_cert", &self.client_cert)
            .finish()
    }
}

impl NativeTls {
    pub fn new(opts: &NativeOptions) -> Result<Arc<NativeTls>, NativeTlsError> {
        let mut b = native_tls::TlsConnector::builder();
        b.min_protocol_version(Some(native_tls::Protocol::Tlsv12));
        if opts.any_certificate {
            b.danger_accept_invalid_certs(true);
            b.danger_accept_invalid_hostnames(true);
        }
        if let Some(ca) = &opts.ca {
            let err = |why: String| NativeTlsError::Ca {
                path: ca.clone(),
                why,
            };
            let pem = std::fs::read(ca).map_err(|e| err(e.to_string()))?;
            let cert = native_tls::Certificate::from_pem(&pem).map_err(|e| err(e.to_string()))?;
            b.add_root_certificate(cert);
            b.disable_built_in_roots(true);
        }
        if let Some((path, password)) = &opts.client_cert {
            #[cfg(windows)]
            if let Some(thumbprint) = path.to_str().and_then(|p| p.strip_prefix("store:")) {
                b.identity(store_identity(thumbprint)?);
            } else {
                b.identity(identity(path, password)?);
            }
            #[cfg(not(windows))]
            b.identity(identity(path, password)?);
        }
        let c = b
            .build()
            .map_err(|e| NativeTlsError::Stack(e.to_string()))?;
        Ok(Arc::new(NativeTls {
            connector: tokio_native_tls::TlsConnector::from(c),
            client_cert: opts.client_cert.as_ref().map(|(p, _)| p.clone()),
        }))
    }
}

/// Reads the PKCS#12 password: from `file` (first line) or else [`CLIENT_CERT_PASSWORD_ENV`]
/// (empty when neither is given: some files have none).
pub fn read_password(file: Option<&Path>) -> Result<CertPassword, NativeTlsError> {
    match file {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| NativeTlsError::ClientCert {
                path: p.to_path_buf(),
                why: format!("cannot read the password file: {e}"),
            })?;
            Ok(CertPassword(
                text.lines().next().unwrap_or("").trim_end().to_string(),
            ))
        }
        None => Ok(CertPassword(
            std::env::var(CLIENT_CERT_PASSWORD_ENV).unwrap_or_default(),
        )),
    }
}

/// The client identity in the PKCS#12 file at `path`; a wrong password or a certificate
/// outside its validity is an error naming the file.
fn identity(path: &Path, password: &CertPassword) -> Result<native_tls::Identity, NativeTlsError> {
    let err = |why: String| NativeTlsError::ClientCert {
        path: path.to_path_buf(),
        why,
    };
    let der = std::fs::read(path).map_err(|e| err(format!("cannot read it: {e}")))?;
    check_validity(&der, password).map_err(err)?;
    native_tls::Identity::from_pkcs12(&der, &password.0).map_err(|e| {
        err(format!(
            "cannot open it ({e}): wrong password (set {CLIENT_CERT_PASSWORD_ENV} or --client-cert-password-file) or not a PKCS#12 file"
        ))
    })
}

/// The certificate with this SHA-1 thumbprint in the user's store (`CurrentUser\My`), as an
/// identity for SChannel.
#[cfg(windows)]
fn store_identity(thumbprint: &str) -> Result<native_tls::Identity, NativeTlsError> {
    use schannel::cert_store::{CertAdd, CertStore, Memory};
    let want: String = thumbprint
        .chars()
        .filter(|c| c.is_ascii_hexdigit())
        .collect::<String>()
        .to_ascii_lowercase();
    let err = |why: String| NativeTlsError::ClientCert {
        path: PathBuf::from(format!("store:{want}")),
        why,
    };
    let store = CertStore::open_current_user("My")
        .map_err(|e| err(format!("cannot open the user's certificate store: {e}")))?;
    let cert = store
        .certs()
        .find(|c| {
            c.fingerprint(schannel::cert_context::HashAlgorithm::sha1())
                .map(|h| h.iter().map(|b| format!("{b:02x}")).collect::<String>() == want)
                .unwrap_or(false)
        })
        .ok_or_else(|| {
            err("no certificate with this SHA-1 thumbprint in CurrentUser\\My".into())
        })?;
    if !cert.is_time_valid().unwrap_or(false) {
        return Err(err(
            "the certificate has expired or is not valid yet; get a new one".into(),
        ));
    }
    let mut one = Memory::new().map_err(|e| err(e.to_string()))?.into_store();
    one.add_cert(&cert, CertAdd::Always)
        .map_err(|e| err(e.to_string()))?;
    // A throwaway password for the in-memory export only.
    let password: String = {
        use rand::Rng;
        let mut r = rand::thread_rng();
        (0..24)
            .map(|_| r.sample(rand::distributions::Alphanumeric) as char)
            .collect()
    };
    let der = one.export_pkcs12(&password).map_err(|e| {
        err(format!(
            "cannot use its private key ({e}): mark it exportable, or give a PKCS#12 file"
        ))
    })?;
    native_tls::Identity::from_pkcs12(&der, &password).map_err(|e| err(e.to_string()))
}

/// With OpenSSL (Linux and the other Unixes but macOS): opens the file with the password and
/// checks the certificate's dates, so that an expired certificate is named at start-up rather
/// than as a handshake failure at the terminator.
#[cfg(not(any(windows, target_vendor = "apple")))]
fn check_validity(der: &[u8], password: &CertPassword) -> Result<(), String> {
    use openssl::asn1::Asn1Time;
    let p12 =
        openssl::pkcs12::Pkcs12::from_der(der).map_err(|_| "not a PKCS#12 file".to_string())?;
    let parsed = p12.parse2(&password.0).map_err(|_| {
        format!("wrong password (set {CLIENT_CERT_PASSWORD_ENV} or --client-cert-password-file)")
    })?;
    let cert = parsed
        .cert
        .ok_or_else(|| "holds no certificate".to_string())?;
    if parsed.pkey.is_none() {
        return Err("holds no private key".into());
    }
    let now = Asn1Time::days_from_now(0).map_err(|e| e.to_string())?;
    if cert.not_after() < now {
        return Err(format!(
            "the certificate expired on {}; get a new one",
            cert.not_after()
        ));
    }
    if cert.not_before() > now {
        return Err(format!(
            "the certificate is not valid before {}",
            cert.not_before()
        ));
    }
    Ok(())
}

/// SChannel and Security.framework open the file in [`identity`]; the stack itself refuses an
/// expired certificate there.
#[cfg(any(windows, target_vendor = "apple"))]
fn check_validity(_der: &[u8], _password: &CertPassword) -> Result<(), String> {
    Ok(())
}

/// `--tls`: which TLS stack carries the outer TLS.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TlsStack {
    #[default]
    Rustls,
    Native,
}

impl std::str::FromStr for TlsStack {
    type Err = String;
    fn from_str(s: &str) -> Result<TlsStack, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "rustls" => Ok(TlsStack::Rustls),
            "native" => Ok(TlsStack::Native),
            other => Err(format!(
                "--tls `{other}`: use rustls (the default) or native (the OS TLS stack)"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_password_never_shows_in_debug() {
        let o = NativeOptions {
            client_cert: Some(("c.p12".into(), CertPassword::new("hunter2-secret"))),
            ..Default::default()
        };
        let text = format!("{o:?}");
        assert!(!text.contains("hunter2"), "{text}");
        assert!("NATIVE".parse::<TlsStack>().is_ok());
        assert!("schannel".parse::<TlsStack>().is_err());
    }

    /// A PKCS#12 file (key and self-signed certificate valid from `from` to `to` days from
    /// now) under `password`.
    #[cfg(not(any(windows, target_vendor = "apple")))]
    fn p12(from: i64, to: i64, password: &str) -> Vec<u8> {
        use openssl::asn1::Asn1Time;
        use openssl::ec::{EcGroup, EcKey};
        use openssl::hash::MessageDigest;
        use openssl::nid::Nid;
        use openssl::pkey::PKey;
        use openssl::x509::{X509Builder, X509NameBuilder};
        let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
        let key = PKey::from_ec_key(EcKey::generate(&group).unwrap()).unwrap();
        let mut name = X509NameBuilder::new().unwrap();
        name.append_entry_by_text("CN", "alice-laptop").unwrap();
        let name = name.build();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let mut b = X509Builder::new().unwrap();
        b.set_version(2).unwrap();
        b.set_subject_name(&name).unwrap();
        b.set_issuer_name(&name).unwrap();
        b.set_pubkey(&key).unwrap();
        b.set_not_before(&Asn1Time::from_unix(now + from * 86_400).unwrap())
            .unwrap();
        b.set_not_after(&Asn1Time::from_unix(now + to * 86_400).unwrap())
            .unwrap();
        b.sign(&key, MessageDigest::sha256()).unwrap();
        let cert = b.build();
        openssl::pkcs12::Pkcs12::builder()
            .name("alice-laptop")
            .pkey(&key)
            .cert(&cert)
            .build2(password)
            .unwrap()
            .to_der()
            .unwrap()
    }

    /// What `NativeTls::new` says of the PKCS#12 `der` opened with `password`.
    #[cfg(not(any(windows, target_vendor = "apple")))]
    fn open(name: &str, der: &[u8], password: &str) -> Result<(), String> {
        let dir = std::env::temp_dir().join(format!("sp-p12-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join(format!("{name}.p12"));
        std::fs::write(&f, der).unwrap();
        let r = NativeTls::new(&NativeOptions {
            client_cert: Some((f, CertPassword::new(password))),
            ..Default::default()
        });
        let _ = std::fs::remove_dir_all(&dir);
        r.map(|_| ()).map_err(|e| e.to_string())
    }

    #[cfg(not(any(windows, target_vendor = "apple")))]
    #[test]
    fn a_valid_pkcs12_client_certificate_opens() {
        open("good", &p12(-1, 30, "pw-good"), "pw-good").unwrap();
    }

    /// A stolen PKCS#12 file is useless without its password, and the one who typed it wrong
    /// is told so in one line naming the file (not a handshake failure later).
    #[cfg(not(any(windows, target_vendor = "apple")))]
    #[test]
    fn a_wrong_pkcs12_password_is_refused_in_one_line_naming_the_file() {
        let e = open("wrongpw", &p12(-1, 30, "right"), "wrong").unwrap_err();
        assert!(
            e.starts_with("client certificate ") && e.contains("wrongpw.p12"),
            "{e}"
        );
        assert!(e.contains("wrong password"), "{e}");
        assert!(!e.contains('\n') && !e.contains("right"), "{e}");
    }

    #[cfg(not(any(windows, target_vendor = "apple")))]
    #[test]
    fn an_expired_client_certificate_is_refused_in_one_line_naming_the_file() {
        let e = open("expired", &p12(-30, -1, "pw"), "pw").unwrap_err();
        assert!(e.contains("expired.p12") && e.contains("expired on"), "{e}");
        assert!(!e.contains('\n'), "{e}");
        let e = open("future", &p12(2, 30, "pw"), "pw").unwrap_err();
        assert!(e.contains("not valid before"), "{e}");
    }

    #[test]
    fn a_missing_or_garbage_pkcs12_file_is_named() {
        let dir = std::env::temp_dir().join(format!("sp-native-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("junk.p12");
        std::fs::write(&f, b"not a pkcs12").unwrap();
        let e = NativeTls::new(&NativeOptions {
            client_cert: Some((f.clone(), CertPassword::new("x"))),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("junk.p12"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
