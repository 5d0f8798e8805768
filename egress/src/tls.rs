//! Which certificates the agent and the connector trust for the gateway: the OS store plus
//! `--ca`, or only a pinned CA, and the enrolled key pin; [`CaAnchor`] (is a connection issued
//! by `--ca` itself?); and the one custom verifier (`GatewayVerifier`): the enrolled pin on
//! top of the usual check, or any certificate (to read the names of one that failed, for
//! `doctor`, and for protocol v2, whose handshake authenticates the gateway inside the TLS),
//! with the handshake signatures checked once for both.

use crate::*;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::RootCertStore;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Which certificates the client trusts for the gateway.
#[derive(Clone, Debug, Default)]
pub struct TlsOptions {
    /// An extra trust anchor (PEM), e.g. the CA of a trial deployment.
    pub ca: Option<PathBuf>,
    /// Trust only `ca` (pinning), not the OS store. Connectors pin the DMZ's CA by default.
    pub pin: bool,
    /// The gateway's key pin from enrollment (`sha256/<base64>`, see [`cert::key_pin`]): on top
    /// of the certificate check, the gateway must present this key.
    pub key_pin: Option<String>,
    /// The agent also knows the gateway's inner-channel key: a certificate with another key
    /// (an inspecting proxy that re-signs, trusted by this machine) is let through, and the
    /// session then runs inside the inner channel, where that proxy reads nothing.
    pub inner_channel: bool,
    /// Protocol v2: the handshake inside authenticates the gateway by the key in the token, so
    /// any certificate is accepted (an inspection CA this desktop does not trust included);
    /// the TLS is transport only.
    pub any_certificate: bool,
}

/// The crypto under every rustls connection the agent, the DMZ and the connector make or
/// accept. aws-lc-rs where it builds: on CPUs with AVX-512 its AES-GCM seals 1.5x as fast as
/// ring's (docs/benchmarks.md, "The TLS crypto"), and every byte is sealed or opened four times
/// along the chain. ring on Windows, where the agent is cross-built with MinGW. Both offer the
/// same key exchange groups (X25519, P-256, P-384: no post-quantum hybrid, whose larger
/// ClientHello is a new thing for the corporate middleboxes between desktop and DMZ) and the
/// same TLS 1.3 and 1.2 AES-GCM and ChaCha20 suites. aws-lc is built without its CPU-jitter
/// entropy source (`.cargo/config.toml`): it seeds from the OS's generator and RDRAND, like
/// ring, instead of spending ~50 ms of CPU on the first random bytes of every process.
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    static PROVIDER: std::sync::OnceLock<Arc<rustls::crypto::CryptoProvider>> =
        std::sync::OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            #[cfg(not(windows))]
            let mut provider = {
                use rustls::crypto::aws_lc_rs::{default_provider, kx_group};
                rustls::crypto::CryptoProvider {
                    kx_groups: vec![kx_group::X25519, kx_group::SECP256R1, kx_group::SECP384R1],
                    ..default_provider()
                }
            };
            #[cfg(windows)]
            let mut provider = rustls::crypto::ring::default_provider();
            aes128_first(&mut provider.cipher_suites);
            Arc::new(provider)
        })
        .clone()
}

/// Puts the AES-128-GCM suites first, each protocol version's before its AES-256-GCM and
/// ChaCha20 ones (the providers list AES-256 first), keeping every suite: our agent and
/// connector offer it first, and the DMZ, which follows the client's order, picks it. Today
/// X25519 and AES-128 are both about 128-bit; against a quantum attacker the classical key
/// exchange falls first, so AES-256 adds nothing while it stays classical (docs/protocol.md,
/// "Transport"). AES-128 runs 10 rounds where AES-256 runs 14, and every byte is sealed or
/// opened four times along the chain (docs/benchmarks.md, "AES-128-GCM first").
fn aes128_first(suites: &mut [rustls::SupportedCipherSuite]) {
    use rustls::CipherSuite as C;
    suites.sort_by_key(|s| {
        let aes128 = matches!(
            s.suite(),
            C::TLS13_AES_128_GCM_SHA256
                | C::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
                | C::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
        );
        (s.tls13().is_none(), !aes128)
    });
}

/// Reads every certificate in a PEM file.
pub fn read_pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, EgressError> {
    use rustls::pki_types::pem::PemObject;
    let err = |reason: String| EgressError::CaFile {
        path: path.to_path_buf(),
        reason,
    };
    let data = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&data)
        .collect::<Result<_, _>>()
        .map_err(|e| err(format!("not PEM: {e}")))?;
    if certs.is_empty() {
        return Err(err("no CERTIFICATE block in it".into()));
    }
    Ok(certs)
}

/// The rustls client configuration for the gateway connection.
pub fn client_config(opts: &TlsOptions) -> Result<Arc<rustls::ClientConfig>, EgressError> {
    let mut roots = RootCertStore::empty();
    if !(opts.pin && opts.ca.is_some()) {
        let native = rustls_native_certs::load_native_certs();
        for e in &native.errors {
            tracing::debug!(error = %e, "skipping part of the OS trust store");
        }
        let (_added, _ignored) = roots.add_parsable_certificates(native.certs);
    }
    if let Some(path) = &opts.ca {
        for cert in read_pem_certs(path)? {
            roots.add(cert).map_err(|e| EgressError::CaFile {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        }
    }
    let provider = crypto_provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| EgressError::Tls {
            host: String::new(),
            reason: e.to_string(),
        })?;
    let mut cfg = match &opts.key_pin {
        _ if opts.any_certificate => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(GatewayVerifier::accept_any(provider)))
            .with_no_client_auth(),
        // With --ca: the usual check, and a failure that names the CA file and the issuer.
        None if opts.ca.is_some() => {
            let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots),
                provider.clone(),
            )
            .build()
            .map_err(|e| EgressError::Tls {
                host: String::new(),
                reason: e.to_string(),
            })?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(GatewayVerifier {
                    provider,
                    check: Check::Ca {
                        inner,
                        file: opts.ca.clone().unwrap_or_default(),
                        only: opts.pin,
                    },
                }))
                .with_no_client_auth()
        }
        None => builder.with_root_certificates(roots).with_no_client_auth(),
        Some(pin) => {
            let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots),
                provider.clone(),
            )
            .build()
            .map_err(|e| EgressError::Tls {
                host: String::new(),
                reason: e.to_string(),
            })?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(GatewayVerifier {
                    provider,
                    check: Check::Pinned {
                        inner,
                        pin: pin.clone(),
                        mismatch_ok: opts.inner_channel,
                    },
                }))
                .with_no_client_auth()
        }
    };
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// The one verifier of the gateway connection: which certificates pass ([`Check`]), then the
/// handshake signatures, checked once for every kind with the provider's algorithms.
#[derive(Debug)]
pub(crate) struct GatewayVerifier {
    provider: Arc<rustls::crypto::CryptoProvider>,
    check: Check,
}

/// What a certificate must be.
#[derive(Debug)]
enum Check {
    /// Anything: for [`peek_certificate`] (reading the names of a certificate that failed) and
    /// protocol v2, whose handshake authenticates the gateway inside the TLS.
    Any,
    /// The usual certificate check against `--ca` (`only`: it alone, else with the OS store);
    /// a certificate it did not sign is refused naming the file and the issuer seen.
    Ca {
        inner: Arc<rustls::client::WebPkiServerVerifier>,
        file: PathBuf,
        only: bool,
    },
    /// The usual certificate check, then the enrolled key pin (`mismatch_ok`: another key is
    /// allowed, the v1 inner channel protects the session then).
    Pinned {
        inner: Arc<rustls::client::WebPkiServerVerifier>,
        pin: String,
        mismatch_ok: bool,
    },
}

impl GatewayVerifier {
    /// Accepts every certificate (the signatures of the handshake are still checked).
    pub(crate) fn accept_any(provider: Arc<rustls::crypto::CryptoProvider>) -> GatewayVerifier {
        GatewayVerifier {
            provider,
            check: Check::Any,
        }
    }
}

impl rustls::client::danger::ServerCertVerifier for GatewayVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let (inner, pin, mismatch_ok) = match &self.check {
            Check::Any => return Ok(rustls::client::danger::ServerCertVerified::assertion()),
            Check::Ca { inner, file, only } => {
                return inner
                    .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
                    .map_err(|e| match e {
                        rustls::Error::InvalidCertificate(
                            rustls::CertificateError::UnknownIssuer
                            | rustls::CertificateError::BadSignature,
                        ) => {
                            let issuer = cert::names(end_entity)
                                .map(|(_, issuer)| issuer)
                                .unwrap_or_else(|| "unreadable".into());
                            // The issuer seen is who signed it on this path: behind a
                            // TLS-inspecting proxy, the proxy's CA. ("UnknownIssuer" stays,
                            // so that `dial_via` names the certificate seen.)
                            rustls::Error::General(format!(
                                "UnknownIssuer: the CA in {} did not sign the gateway's certificate (issuer: {issuer}){}",
                                file.display(),
                                if *only { "" } else { " and neither did a CA in the OS store" }
                            ))
                        }
                        e => e,
                    });
            }
            Check::Pinned {
                inner,
                pin,
                mismatch_ok,
            } => (inner, pin, *mismatch_ok),
        };
        let verified =
            inner.verify_server_cert(end_entity, intermediates, server_name, ocsp, now)?;
        match cert::key_pin(end_entity) {
            Some(seen) if seen == *pin => Ok(verified),
            _ if mismatch_ok => Ok(verified),
            seen => Err(rustls::Error::General(format!(
                "the gateway presented key {} but this agent is pinned to {} (from enrollment): something re-signs TLS on the way (an inspecting proxy) or this is another gateway; re-enroll only if the gateway's key really changed",
                seen.as_deref().unwrap_or("(unreadable)"),
                pin
            ))),
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The gateway's own CA (`--ca`) on its own, without the OS store: does a connection's
/// certificate chain to it? Only then is the outer TLS the gateway's, and only then may a bearer
/// token ride it (an inspecting proxy's CA in the OS store passes the TLS check, not this one).
#[derive(Clone, Debug)]
pub struct CaAnchor {
    verifier: Arc<rustls::client::WebPkiServerVerifier>,
}

impl CaAnchor {
    /// The anchor from a PEM file of one or more CA certificates.
    pub fn from_file(path: &Path) -> Result<CaAnchor, EgressError> {
        let err = |reason: String| EgressError::CaFile {
            path: path.to_path_buf(),
            reason,
        };
        let mut roots = RootCertStore::empty();
        for cert in read_pem_certs(path)? {
            roots.add(cert).map_err(|e| err(e.to_string()))?;
        }
        let provider = crypto_provider();
        let verifier =
            rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| err(e.to_string()))?;
        Ok(CaAnchor { verifier })
    }

    /// Whether `io`'s certificate chain, as sent, is issued by this CA for `host`.
    pub fn issued(&self, io: &GatewayStream, host: &str) -> bool {
        use rustls::client::danger::ServerCertVerifier;
        let GatewayStream::Tls(s) = io else {
            return false;
        };
        let Some((leaf, rest)) = s
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.split_first())
        else {
            return false;
        };
        let Ok(name) = ServerName::try_from(host.to_string()) else {
            return false;
        };
        self.verifier
            .verify_server_cert(leaf, rest, &name, &[], rustls::pki_types::UnixTime::now())
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aes128_gcm_is_offered_first_and_no_suite_is_dropped() {
        #[cfg(not(windows))]
        let stock = rustls::crypto::aws_lc_rs::default_provider().cipher_suites;
        #[cfg(windows)]
        let stock = rustls::crypto::ring::default_provider().cipher_suites;
        let ours = crypto_provider().cipher_suites.clone();
        let names = |v: &[rustls::SupportedCipherSuite]| {
            let mut n: Vec<_> = v.iter().map(|s| format!("{:?}", s.suite())).collect();
            n.sort();
            n
        };
        assert_eq!(names(&ours), names(&stock), "the same suites, reordered");
        assert_eq!(
            ours[0].suite(),
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
        );
        let first12 = ours.iter().find(|s| s.tls13().is_none()).map(|s| s.suite());
        if let Some(first12) = first12 {
            assert!(
                format!("{first12:?}").contains("AES_128_GCM"),
                "{first12:?}"
            );
        }
        // Every TLS 1.3 suite comes before every TLS 1.2 one.
        let split = ours
            .iter()
            .position(|s| s.tls13().is_none())
            .unwrap_or(ours.len());
        assert!(ours[split..].iter().all(|s| s.tls13().is_none()));
    }
}
