//! # sallyport-egress: the way out to the gateway
//!
//! Used by the agent and by the connector to reach the DMZ gateway through whatever the network
//! allows: direct, a corporate HTTP proxy (Basic, Digest, NTLM, Negotiate), a SOCKS5 proxy,
//! PAC/WPAD, or the OS settings (see `docs/egress.md`). Callers get a byte stream to the gateway
//! (TLS for `wss://`) and speak WebSocket or HTTP on it.
//!
//! | item | file | what |
//! |---|---|---|
//! | [`Egress`], [`EgressSettings`] | `settings.rs` | the way-out settings as given, validated |
//! | [`GatewayUrl`] | `url.rs` | a parsed `wss://host:port/prefix` |
//! | [`TlsOptions`], [`client_config`], [`CaAnchor`] | `tls.rs` | trust: the OS store plus `--ca`, or only a pinned CA, and the enrolled key pin; is a connection issued by `--ca` itself? |
//! | [`dial_via`], [`GatewayStream`] | `dial.rs` | TCP, the proxy's handshake, TLS, all within one timeout; errors that say which hop failed |
//!
//! | module | what |
//! |---|---|
//! | [`probe`], [`network`] | the candidates, tried staggered; what worked, remembered per network |
//! | [`proxy`], [`http`], [`auth`] | corporate proxies: `--proxy`, environment, SOCKS5; `CONNECT` and its auth rounds |
//! | [`pac`], [`system`] | PAC (sandboxed), WPAD; OS proxy settings |
//! | [`cert`], [`keychain`] | certificate names and key pins; the OS keychain |
//! | [`policy`] | admin policy: `wpad`, `ntlm`, `basic` off (file, Windows registry) |
//! | [`native`] | `--tls native`: the outer TLS through the OS stack, a PKCS#12 client certificate |
//! | [`logging`] | the binaries' tracing setup (tungstenite capped: it would print the upgrade request) |

pub mod auth;
pub mod cert;
pub mod http;
pub mod keychain;
pub mod logging;
pub mod native;
pub mod pac;
pub mod policy;
pub mod proxy;
pub mod system;

pub mod network;
pub mod probe;

mod dial;
mod readbuf;
mod settings;
mod tls;
mod url;

pub use dial::*;
pub use readbuf::{ReadBuffer, TLS_READ_BUFFER};
pub use settings::*;
pub use tls::*;
pub use url::*;

pub use auth::{AuthOptions, Credentials, Scheme};
pub use probe::{Attempt, Candidate, Origin, Way};
pub use proxy::{Password, Proxy, ProxyError};
use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// Why the gateway could not be reached. Each variant names the hop that failed.
#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    #[error("invalid gateway URL `{url}`: {reason} (expected wss://host[:port][/prefix])")]
    BadUrl { url: String, reason: String },
    /// `role` says which hop: `gateway` or `proxy`.
    #[error("cannot resolve {role} host {host}: {source}")]
    Resolve {
        role: &'static str,
        host: String,
        source: io::Error,
    },
    #[error("cannot connect to {role} {addr}: {source}")]
    Connect {
        role: &'static str,
        addr: String,
        source: io::Error,
    },
    #[error("connecting to {role} {addr} timed out after {after:?}")]
    ConnectTimeout {
        role: &'static str,
        addr: String,
        after: Duration,
    },
    #[error("TLS handshake with gateway {host} failed: {reason}")]
    Tls { host: String, reason: String },
    #[error("cannot read CA file {path}: {reason}")]
    CaFile { path: PathBuf, reason: String },
    #[error(transparent)]
    Proxy(#[from] ProxyError),
    #[error("{0}")]
    BadProxy(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_with_defaults_and_prefixes() {
        let u = GatewayUrl::parse("wss://gw.example.com/").unwrap();
        assert_eq!(
            (u.tls, u.host.as_str(), u.port, u.prefix.as_str()),
            (true, "gw.example.com", 443, "")
        );
        assert_eq!(u.endpoint("agent"), "wss://gw.example.com:443/agent");
        let u = GatewayUrl::parse("ws://127.0.0.1:8080/sp/v1/").unwrap();
        assert_eq!((u.tls, u.port, u.prefix.as_str()), (false, 8080, "/sp/v1"));
        assert_eq!(
            u.endpoint("connector"),
            "ws://127.0.0.1:8080/sp/v1/connector"
        );
        let u = GatewayUrl::parse("wss://[::1]:8443").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 8443));
        assert_eq!(u.endpoint("agent"), "wss://[::1]:8443/agent");
    }

    #[test]
    fn proxy_settings_validate_users_passwords_and_credential_files() {
        // (SALLYPORT_PROXY_PASSWORD is not set in unit tests.)
        let e = Egress::from_settings(&EgressSettings {
            proxy: Some("http://alice@proxy:3128"),
            ..Default::default()
        })
        .unwrap_err();
        assert!(
            e.contains("has no password") && e.contains("--proxy-credentials"),
            "{e}"
        );
        let e = Egress::from_settings(&EgressSettings {
            proxy: Some("http://p:1"),
            pac: Some("http://wpad/wpad.dat"),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.contains("give one"), "{e}");
        let dir = std::env::temp_dir().join(format!("sp-egress-creds-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("creds");
        std::fs::write(&file, "CORP\\alice:s3cret\n").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
            let e = Egress::from_settings(&EgressSettings {
                credentials_file: Some(&file),
                ..Default::default()
            })
            .unwrap_err();
            assert!(e.contains("chmod 600") && !e.contains("s3cret"), "{e}");
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        let eg = Egress::from_settings(&EgressSettings {
            credentials_file: Some(&file),
            ..Default::default()
        })
        .unwrap();
        let c = eg.auth.credentials.unwrap();
        assert_eq!(
            (c.user.as_str(), c.password.expose()),
            ("CORP\\alice", "s3cret")
        );
        assert!(!format!("{c:?}").contains("s3cret"));
        // A user on the command line wins over the file's, the password still comes from it.
        std::fs::write(&file, "only-a-password\n").unwrap();
        let eg = Egress::from_settings(&EgressSettings {
            proxy_user: Some("bob"),
            credentials_file: Some(&file),
            ..Default::default()
        })
        .unwrap();
        let c = eg.auth.credentials.unwrap();
        assert_eq!(
            (c.user.as_str(), c.password.expose()),
            ("bob", "only-a-password")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The environment's proxy URL: its user counts (percent-decoded) with
    /// SALLYPORT_PROXY_PASSWORD, and a password in it is used with its own user; mixing
    /// sources is refused without showing a password.
    #[test]
    fn credentials_in_the_environments_proxy_url_were_refused() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let auto = EgressSettings::default();
        let eg = Egress::from_settings_in(
            &auto,
            env(&[
                ("https_proxy", "http://CORP%5Calice@proxy:3128"),
                ("SALLYPORT_PROXY_PASSWORD", "pw1"),
            ]),
        )
        .unwrap();
        let c = eg.auth.credentials.unwrap();
        assert_eq!(
            (c.user.as_str(), c.password.expose()),
            ("CORP\\alice", "pw1")
        );
        let eg = Egress::from_settings_in(
            &auto,
            env(&[("HTTPS_PROXY", "http://bob:s3%3Acret@proxy:3128")]),
        )
        .unwrap();
        let c = eg.auth.credentials.clone().unwrap();
        assert_eq!((c.user.as_str(), c.password.expose()), ("bob", "s3:cret"));
        assert!(!format!("{eg:?}").contains("s3"));
        let e = Egress::from_settings_in(
            &auto,
            env(&[
                ("https_proxy", "http://bob:s3cret@proxy:3128"),
                ("SALLYPORT_PROXY_PASSWORD", "other"),
            ]),
        )
        .unwrap_err();
        assert!(
            e.contains("keep one") && !e.contains("s3cret") && !e.contains("other"),
            "{e}"
        );
        let e = Egress::from_settings_in(
            &EgressSettings {
                proxy_user: Some("carol"),
                ..Default::default()
            },
            env(&[("https_proxy", "http://bob:s3cret@proxy:3128")]),
        )
        .unwrap_err();
        assert!(
            e.contains("`carol`") && e.contains("`bob`") && !e.contains("s3cret"),
            "{e}"
        );
        // --proxy wins over the environment (as curl's -x): its URL's credentials are not read.
        let eg = Egress::from_settings_in(
            &EgressSettings {
                proxy: Some("direct"),
                ..Default::default()
            },
            env(&[("https_proxy", "http://bob:s3cret@proxy:3128")]),
        )
        .unwrap();
        assert!(eg.auth.credentials.is_none());
    }

    #[test]
    fn bad_urls_say_what_to_fix() {
        for bad in [
            "http://x/",
            "wss://",
            "wss://host:notaport/",
            "wss://user:pw@host/",
            "wss://[::1/",
        ] {
            let e = GatewayUrl::parse(bad).unwrap_err().to_string();
            assert!(e.contains("invalid gateway URL"), "{bad}: {e}");
        }
    }
}
