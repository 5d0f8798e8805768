//! TLS material for the DMZ listener.
//!
//! Two jobs:
//!
//! * **Trial PKI** ([`trial_pki`], [`write_trial_pki`]): a throwaway CA plus a server certificate it
//!   signed, so a trial can run over real, verified TLS without anyone buying a certificate. Agents and
//!   connectors pin `ca.crt`. Production deployments bring their own certificate instead.
//! * **Server config** ([`load_server_config`], [`server_config_from_pem`]): a rustls
//!   [`ServerConfig`](rustls::ServerConfig) from a PEM certificate chain and private key, using
//!   `egress::crypto_provider` explicitly (the process-wide default provider is never consulted),
//!   its suites narrowed to AES-256-GCM when [`Ciphers::Aes256Gcm`] is asked for, with ALPN
//!   `http/1.1` because the WebSocket upgrade is an HTTP/1.1 request.
//!
//! Every error names the file to fix. Private keys never appear in `Debug` output.

use std::fmt;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// What went wrong making or loading TLS material; each message names the file or name to fix.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("generating the trial certificates failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("trial certificate needs at least one host name or IP address for the gateway (e.g. --name gw.example.com)")]
    NoNames,
    #[error("invalid certificate name {name:?}: {why}")]
    BadName { name: String, why: String },
    #[error("{path} already exists; refusing to overwrite it (move it away or choose another directory)")]
    Exists { path: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} file {path} not found")]
    Missing { what: &'static str, path: PathBuf },
    #[error("{origin} contains no certificate (expected a PEM block starting with -----BEGIN CERTIFICATE-----)")]
    NoCertificate { origin: String },
    #[error(
        "{origin} contains no private key (expected a PEM block like -----BEGIN PRIVATE KEY-----)"
    )]
    NoKey { origin: String },
    #[error("{origin} is not valid PEM: {why}")]
    BadPem { origin: String, why: String },
    #[error("the private key in {key} does not match the certificate in {cert}")]
    KeyMismatch { cert: String, key: String },
    #[error("TLS setup with {cert} and {key} failed: {source}")]
    Tls {
        cert: String,
        key: String,
        source: rustls::Error,
    },
}

/// The DMZ's TLS cipher suites (`tls_ciphers` in its configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Ciphers {
    /// Every suite of `egress::crypto_provider`, AES-128-GCM first (`"default"`). The DMZ
    /// follows the client's order, and our agents and connectors put AES-128-GCM first.
    #[default]
    Default,
    /// Only the AES-256-GCM suites (`"aes-256-gcm"`), for a policy that asks for a 256-bit bulk
    /// cipher: every client whose TLS the DMZ terminates negotiates AES-256-GCM, or gets no
    /// session. The key exchange is unchanged (X25519 first).
    Aes256Gcm,
}

impl std::str::FromStr for Ciphers {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "default" => Ok(Ciphers::Default),
            "aes-256-gcm" => Ok(Ciphers::Aes256Gcm),
            other => Err(format!(
                "tls_ciphers = {other:?}: must be \"default\" (AES-128-GCM first, AES-256-GCM and ChaCha20 offered too) or \"aes-256-gcm\" (AES-256-GCM only)"
            )),
        }
    }
}

impl Ciphers {
    /// The crypto provider for the listener: `egress::crypto_provider`, or a copy of it that
    /// keeps only the AES-256-GCM suites.
    fn provider(self) -> Arc<rustls::crypto::CryptoProvider> {
        let all = egress::crypto_provider();
        match self {
            Ciphers::Default => all,
            Ciphers::Aes256Gcm => {
                use rustls::CipherSuite as C;
                let mut p = (*all).clone();
                p.cipher_suites.retain(|s| {
                    matches!(
                        s.suite(),
                        C::TLS13_AES_256_GCM_SHA384
                            | C::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
                            | C::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384
                    )
                });
                Arc::new(p)
            }
        }
    }
}

/// A trial CA and a gateway certificate it signed, all PEM. Debug omits the private keys.
#[derive(Clone)]
pub struct TrialPki {
    pub ca_cert_pem: String,
    pub ca_key_pem: String,
    /// The gateway's certificate (leaf), signed by the CA.
    pub cert_pem: String,
    pub key_pem: String,
}

impl fmt::Debug for TrialPki {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrialPki")
            .field("ca_cert_pem", &self.ca_cert_pem)
            .field("ca_key_pem", &"<redacted>")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// rcgen wants calendar dates; derive (year, month, day) in UTC from a `SystemTime` via RFC 3339.
fn ymd(t: SystemTime) -> (i32, u8, u8) {
    let s = humantime::format_rfc3339_seconds(t).to_string(); // "YYYY-MM-DDTHH:MM:SSZ"
    (
        s[0..4].parse().unwrap_or(2000),
        s[5..7].parse().unwrap_or(1),
        s[8..10].parse().unwrap_or(1),
    )
}

/// Valid from yesterday (tolerates clock skew) until about a year from now.
fn set_validity(params: &mut CertificateParams, now: SystemTime) {
    let (y, m, d) = ymd(now - Duration::from_secs(86_400));
    params.not_before = rcgen::date_time_ymd(y, m, d);
    let (y, m, d) = ymd(now + Duration::from_secs(366 * 86_400));
    params.not_after = rcgen::date_time_ymd(y, m, d);
}

/// Makes a trial CA ("Sallyport trial CA `<date> <random>`", unique per run) and a server certificate for `names` (DNS names, or IP
/// addresses which become IP SANs), valid from yesterday for about a year.
pub fn trial_pki(names: &[String]) -> Result<TrialPki, CertError> {
    if names.is_empty() {
        return Err(CertError::NoNames);
    }
    let now = SystemTime::now();

    // The CA: may sign certificates (and CRLs), nothing else.
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    // A name of its own (date and a random suffix): a CA from another `cert` run then reads
    // as another issuer, not as a bad signature by "the" trial CA.
    let (y, m, d) = ymd(now);
    let suffix: u32 = rand::random();
    dn.push(
        DnType::CommonName,
        format!("Sallyport trial CA {y:04}-{m:02}-{d:02} {suffix:08x}"),
    );
    ca.distinguished_name = dn;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut ca, now);
    let ca_cert = ca.self_signed(&ca_key)?;

    // The gateway's server certificate.
    let mut sans = Vec::with_capacity(names.len());
    for name in names {
        let name = name.trim();
        let unbracketed = name
            .strip_prefix('[')
            .and_then(|n| n.strip_suffix(']'))
            .unwrap_or(name);
        if let Ok(ip) = unbracketed.parse::<IpAddr>() {
            sans.push(SanType::IpAddress(ip));
            continue;
        }
        let lower = name.trim_end_matches('.').to_ascii_lowercase();
        let valid = !lower.is_empty()
            && lower.len() <= 253
            && lower.split('.').enumerate().all(|(i, l)| {
                (l == "*" && i == 0)
                    || (!l.is_empty()
                        && l.len() <= 63
                        && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
            });
        if !valid {
            return Err(CertError::BadName {
                name: name.to_string(),
                why: "expected a DNS name (letters, digits, '-', dots) or an IP address".into(),
            });
        }
        let ia5 = lower
            .clone()
            .try_into()
            .map_err(|e: rcgen::Error| CertError::BadName {
                name: name.to_string(),
                why: e.to_string(),
            })?;
        sans.push(SanType::DnsName(ia5));
    }
    let leaf_key = KeyPair::generate()?;
    let mut leaf = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, names[0].trim());
    leaf.distinguished_name = dn;
    leaf.subject_alt_names = sans;
    leaf.is_ca = IsCa::ExplicitNoCa;
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    set_validity(&mut leaf, now);
    let leaf_cert = leaf.signed_by(&leaf_key, &ca_cert, &ca_key)?;

    Ok(TrialPki {
        ca_cert_pem: ca_cert.pem(),
        ca_key_pem: ca_key.serialize_pem(),
        cert_pem: leaf_cert.pem(),
        key_pem: leaf_key.serialize_pem(),
    })
}

/// Writes `ca.crt`, `ca.key`, `gateway.crt` and `gateway.key` into `dir` (created if missing; keys
/// mode 0600 on unix). Refuses, before writing anything, if any of them already exists.
pub fn write_trial_pki(pki: &TrialPki, dir: &Path) -> Result<Vec<PathBuf>, CertError> {
    let files: [(&str, &str, bool); 4] = [
        ("ca.crt", &pki.ca_cert_pem, false),
        ("ca.key", &pki.ca_key_pem, true),
        ("gateway.crt", &pki.cert_pem, false),
        ("gateway.key", &pki.key_pem, true),
    ];
    for (name, _, _) in &files {
        let path = dir.join(name);
        if path.exists() {
            return Err(CertError::Exists { path });
        }
    }
    std::fs::create_dir_all(dir).map_err(|source| CertError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut written = Vec::with_capacity(files.len());
    for (name, pem, secret) in files {
        let path = dir.join(name);
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(if secret { 0o600 } else { 0o644 });
        }
        #[cfg(not(unix))]
        let _ = secret;
        let io = |source: std::io::Error| match source.kind() {
            std::io::ErrorKind::AlreadyExists => CertError::Exists { path: path.clone() },
            _ => CertError::Io {
                path: path.clone(),
                source,
            },
        };
        let mut f = opts.open(&path).map_err(io)?;
        f.write_all(pem.as_bytes()).map_err(io)?;
        written.push(path);
    }
    Ok(written)
}

/// Builds a server config from PEM text (a certificate chain, leaf first, and its private key).
pub fn server_config_from_pem(
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<Arc<rustls::ServerConfig>, CertError> {
    build(
        cert_pem,
        key_pem,
        "the certificate PEM",
        "the private key PEM",
        Ciphers::Default,
    )
}

/// Builds a server config from a PEM certificate file and a PEM private-key file, with the
/// suites `ciphers` allows.
pub fn load_server_config(
    cert: &Path,
    key: &Path,
    ciphers: Ciphers,
) -> Result<Arc<rustls::ServerConfig>, CertError> {
    let read = |path: &Path, what: &'static str| {
        std::fs::read(path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => CertError::Missing {
                what,
                path: path.to_path_buf(),
            },
            _ => CertError::Io {
                path: path.to_path_buf(),
                source,
            },
        })
    };
    let cert_pem = read(cert, "certificate")?;
    let key_pem = read(key, "private key")?;
    build(
        &cert_pem,
        &key_pem,
        &cert.display().to_string(),
        &key.display().to_string(),
        ciphers,
    )
}

fn build(
    cert_pem: &[u8],
    key_pem: &[u8],
    cert_origin: &str,
    key_origin: &str,
    ciphers: Ciphers,
) -> Result<Arc<rustls::ServerConfig>, CertError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| CertError::BadPem {
            origin: cert_origin.to_string(),
            why: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(CertError::NoCertificate {
            origin: cert_origin.to_string(),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => CertError::NoKey {
            origin: key_origin.to_string(),
        },
        // The pem error never includes key material, only positions and kinds.
        other => CertError::BadPem {
            origin: key_origin.to_string(),
            why: other.to_string(),
        },
    })?;

    let tls = |source: rustls::Error| match source {
        rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
            CertError::KeyMismatch {
                cert: cert_origin.to_string(),
                key: key_origin.to_string(),
            }
        }
        source => CertError::Tls {
            cert: cert_origin.to_string(),
            key: key_origin.to_string(),
            source,
        },
    };
    let mut config = rustls::ServerConfig::builder_with_provider(ciphers.provider())
        .with_safe_default_protocol_versions()
        .map_err(tls)?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(tls)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    async fn handshake(pki: &TrialPki, server_name: &str) -> Result<(), String> {
        let suite = handshake_with(
            pki,
            server_name,
            Ciphers::Default,
            client_provider(&[]),
            false,
        )
        .await?;
        // Our client and the DMZ agree on AES-128-GCM (egress::crypto_provider's order).
        assert_eq!(suite, Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256));
        Ok(())
    }

    /// Our client's provider, less the suites in `without`.
    fn client_provider(without: &[rustls::CipherSuite]) -> Arc<rustls::crypto::CryptoProvider> {
        let mut p = (*egress::crypto_provider()).clone();
        p.cipher_suites.retain(|s| !without.contains(&s.suite()));
        Arc::new(p)
    }

    /// A handshake between a client config on `provider` (TLS 1.2 only when `tls12`) and the
    /// DMZ's, and one echo; the suite they agreed.
    async fn handshake_with(
        pki: &TrialPki,
        server_name: &str,
        ciphers: Ciphers,
        provider: Arc<rustls::crypto::CryptoProvider>,
        tls12: bool,
    ) -> Result<Option<rustls::CipherSuite>, String> {
        let server = build(
            pki.cert_pem.as_bytes(),
            pki.key_pem.as_bytes(),
            "cert",
            "key",
            ciphers,
        )
        .map_err(|e| e.to_string())?;
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(pki.ca_cert_pem.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        let builder = rustls::ClientConfig::builder_with_provider(provider);
        let builder = if tls12 {
            builder.with_protocol_versions(&[&rustls::version::TLS12])
        } else {
            builder.with_safe_default_protocol_versions()
        };
        let mut client = builder
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.alpn_protocols = vec![b"http/1.1".to_vec()];

        let (c_io, s_io) = tokio::io::duplex(64 * 1024);
        let acceptor = tokio_rustls::TlsAcceptor::from(server);
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let sn = rustls_pki_types::ServerName::try_from(server_name.to_string()).unwrap();
        let server_side = async move {
            let mut s = acceptor.accept(s_io).await.map_err(|e| e.to_string())?;
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
            s.write_all(&buf).await.map_err(|e| e.to_string())?;
            s.flush().await.map_err(|e| e.to_string())?;
            let conn = s.get_ref().1;
            let suite = conn.negotiated_cipher_suite().map(|c| c.suite());
            Ok::<_, String>((conn.alpn_protocol().map(|p| p.to_vec()), suite))
        };
        let client_side = async move {
            let mut c = connector
                .connect(sn, c_io)
                .await
                .map_err(|e| e.to_string())?;
            c.write_all(b"ping").await.map_err(|e| e.to_string())?;
            c.flush().await.map_err(|e| e.to_string())?;
            let mut buf = [0u8; 4];
            c.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
            Ok::<_, String>(buf)
        };
        let (s, c) = tokio::join!(server_side, client_side);
        let ((alpn, suite), echoed) = (s?, c?);
        assert_eq!(&echoed, b"ping");
        assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));
        Ok(suite)
    }

    #[tokio::test]
    async fn a_dmz_set_to_aes_256_gcm_gets_it_from_our_clients_that_prefer_aes_128() {
        use rustls::CipherSuite as C;
        let pki = trial_pki(&names(&["gw.example"])).unwrap();
        // TLS 1.3, then a client that speaks only TLS 1.2.
        for (tls12, want) in [
            (false, C::TLS13_AES_256_GCM_SHA384),
            (true, C::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384),
        ] {
            let provider = client_provider(&[]);
            let suite = handshake_with(&pki, "gw.example", Ciphers::Aes256Gcm, provider, tls12);
            assert_eq!(suite.await.unwrap(), Some(want), "tls12: {tls12}");
        }
    }

    #[tokio::test]
    async fn a_dmz_set_to_aes_256_gcm_refuses_a_client_without_it() {
        use rustls::CipherSuite as C;
        let pki = trial_pki(&names(&["gw.example"])).unwrap();
        let without_aes256 = [
            C::TLS13_AES_256_GCM_SHA384,
            C::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            C::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        ];
        let r = handshake_with(
            &pki,
            "gw.example",
            Ciphers::Aes256Gcm,
            client_provider(&without_aes256),
            false,
        )
        .await;
        assert!(r.is_err(), "{r:?}");
        // The same client gets a session from a DMZ on the default.
        let r = handshake_with(
            &pki,
            "gw.example",
            Ciphers::Default,
            client_provider(&without_aes256),
            false,
        )
        .await;
        assert_eq!(r.unwrap(), Some(C::TLS13_AES_128_GCM_SHA256));
    }

    #[tokio::test]
    async fn trial_pki_serves_a_verified_handshake_for_its_names() {
        let pki = trial_pki(&names(&["gw.example", "10.0.0.7"])).unwrap();
        handshake(&pki, "gw.example").await.unwrap();
        handshake(&pki, "10.0.0.7").await.unwrap();
        // A name not in the certificate fails verification.
        assert!(handshake(&pki, "other.example").await.is_err());
    }

    #[test]
    fn trial_pki_debug_hides_private_keys() {
        let pki = trial_pki(&names(&["gw.example"])).unwrap();
        let shown = format!("{pki:?}");
        assert!(
            !shown.contains("PRIVATE KEY") && shown.contains("<redacted>"),
            "{shown}"
        );
    }

    #[test]
    fn trial_pki_rejects_bad_or_missing_names() {
        assert!(matches!(trial_pki(&[]), Err(CertError::NoNames)));
        let e = trial_pki(&names(&["bad name"])).unwrap_err().to_string();
        assert!(e.contains("bad name"), "{e}");
    }

    #[test]
    fn write_trial_pki_writes_four_files_and_refuses_to_overwrite() {
        let dir = std::env::temp_dir().join(format!(
            "sallyport-certs-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let pki = trial_pki(&names(&["gw.example"])).unwrap();
        let written = write_trial_pki(&pki, &dir).unwrap();
        assert_eq!(written.len(), 4);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode =
                |n: &str| std::fs::metadata(dir.join(n)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode("ca.key"), 0o600);
            assert_eq!(mode("gateway.key"), 0o600);
        }
        load_server_config(
            &dir.join("gateway.crt"),
            &dir.join("gateway.key"),
            Ciphers::Default,
        )
        .unwrap();
        let e = write_trial_pki(&pki, &dir).unwrap_err().to_string();
        assert!(e.contains("ca.crt") && e.contains("already exists"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn load_errors_name_the_file_and_problem() {
        let dir = std::env::temp_dir().join(format!(
            "sallyport-certs-err-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let a = trial_pki(&names(&["a.example"])).unwrap();
        let b = trial_pki(&names(&["b.example"])).unwrap();
        let write = |n: &str, s: &str| {
            let p = dir.join(n);
            std::fs::write(&p, s).unwrap();
            p
        };
        let cert = write("a.crt", &a.cert_pem);
        let key = write("a.key", &a.key_pem);
        let other_key = write("b.key", &b.key_pem);
        let empty = write("empty.pem", "nothing here\n");

        let e = load_server_config(&dir.join("missing.crt"), &key, Ciphers::Default)
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.crt") && e.contains("not found"), "{e}");
        let e = load_server_config(&empty, &key, Ciphers::Default)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("empty.pem") && e.contains("no certificate"),
            "{e}"
        );
        let e = load_server_config(&cert, &empty, Ciphers::Default)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("empty.pem") && e.contains("no private key"),
            "{e}"
        );
        let e = load_server_config(&cert, &other_key, Ciphers::Default).unwrap_err();
        assert!(matches!(e, CertError::KeyMismatch { .. }), "{e}");
        assert!(e.to_string().contains("b.key") && e.to_string().contains("a.crt"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
