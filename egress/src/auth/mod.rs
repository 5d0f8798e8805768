//! Proxy authentication for HTTP `CONNECT`: which scheme to answer a `407` with, and the
//! header value for it.
//!
//! A proxy's `407 Proxy Authentication Required` lists the schemes it accepts in
//! `Proxy-Authenticate` headers. We pick the strongest one we can do, the way browsers do:
//!
//! | scheme | needs | rounds | module |
//! |---|---|---|---|
//! | Negotiate (Kerberos) | a ticket (`kinit`, or the Windows logon via SSPI) | 1 | [`negotiate`] |
//! | NTLM (v2 only) | user + password (or SSPI on Windows) | 2, on one TCP connection | [`ntlm`] |
//! | Digest | user + password | 1 (after the challenge) | [`digest`] |
//! | Basic | user + password | 1 | here |
//!
//! The state of one handshake lives in [`crate::http`]; this module is the pure part: parsing
//! challenges, choosing, and computing answers. Passwords stay in [`Password`], whose `Debug`
//! shows `****`, and never reach an error message.

pub mod digest;
pub mod negotiate;
pub mod ntlm;

use crate::proxy::Password;
use base64::Engine;
use std::fmt;

/// A proxy user and password. `user` may carry a Windows domain, `CORP\alice`; NTLM splits it
/// ([`ntlm::split_domain_user`]), the other schemes send it as written.
#[derive(Clone)]
pub struct Credentials {
    pub user: String,
    pub password: Password,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("password", &self.password)
            .finish()
    }
}

impl Credentials {
    pub fn new(user: impl Into<String>, password: Password) -> Credentials {
        Credentials {
            user: user.into(),
            password,
        }
    }

    /// `Basic base64(user:password)`.
    pub fn basic(&self) -> String {
        let token = base64::engine::general_purpose::STANDARD.encode(format!(
            "{}:{}",
            self.user,
            self.password.expose()
        ));
        format!("Basic {token}")
    }
}

/// An authentication scheme we can answer with, strongest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scheme {
    Negotiate,
    Ntlm,
    Digest,
    Basic,
}

impl Scheme {
    pub fn name(self) -> &'static str {
        match self {
            Scheme::Negotiate => "Negotiate",
            Scheme::Ntlm => "NTLM",
            Scheme::Digest => "Digest",
            Scheme::Basic => "Basic",
        }
    }

    fn from_name(s: &str) -> Option<Scheme> {
        [
            Scheme::Negotiate,
            Scheme::Ntlm,
            Scheme::Digest,
            Scheme::Basic,
        ]
        .into_iter()
        .find(|k| k.name().eq_ignore_ascii_case(s))
    }
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One `Proxy-Authenticate` value: `NTLM`, `NTLM TlRMTVNT…`, `Basic realm="corp"`,
/// `Digest realm="corp", nonce="…", qop="auth"`.
///
/// Squid sends one challenge per header line; [`Challenge::parse_all`] also splits a line that
/// packs several (`Negotiate, NTLM, Basic realm="corp"`, as RFC 7235 allows).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Challenge {
    /// The scheme as the proxy spelled it.
    pub scheme: String,
    /// Everything after the scheme, trimmed: a token68 (NTLM/Negotiate) or auth-params.
    pub rest: String,
}

impl Challenge {
    /// Every challenge in one header value: commas outside quotes separate list elements; an
    /// element that starts with a bare token (no `=` before a space) starts a new challenge,
    /// the others (`realm="x"`) are parameters of the current one.
    pub fn parse_all(value: &str) -> Vec<Challenge> {
        let mut pieces = Vec::new();
        let (mut cur, mut quoted, mut escaped) = (String::new(), false, false);
        for c in value.chars() {
            match c {
                _ if escaped => escaped = false,
                '\\' if quoted => escaped = true,
                '"' => quoted = !quoted,
                ',' if !quoted => {
                    pieces.push(std::mem::take(&mut cur));
                    continue;
                }
                _ => {}
            }
            cur.push(c);
        }
        pieces.push(cur);
        let mut out: Vec<Challenge> = Vec::new();
        for piece in pieces.iter().map(|p| p.trim()).filter(|p| !p.is_empty()) {
            let first = piece.split([' ', '\t']).next().unwrap_or("");
            let starts_challenge = !first.contains('=') || out.is_empty();
            match out.last_mut() {
                Some(last) if !starts_challenge => {
                    if !last.rest.is_empty() {
                        last.rest.push_str(", ");
                    }
                    last.rest.push_str(piece);
                }
                _ => out.push(Challenge::parse(piece)),
            }
        }
        out
    }

    pub fn parse(value: &str) -> Challenge {
        let value = value.trim();
        let (scheme, rest) = value
            .split_once([' ', '\t'])
            .map(|(s, r)| (s, r.trim()))
            .unwrap_or((value, ""));
        Challenge {
            scheme: scheme.to_string(),
            rest: rest.to_string(),
        }
    }

    /// The scheme, when it is one we implement.
    pub fn known(&self) -> Option<Scheme> {
        Scheme::from_name(&self.scheme)
    }

    /// The token68 of a connection-based scheme's continuation (`NTLM <base64>`), decoded.
    pub fn token(&self) -> Option<Vec<u8>> {
        if self.rest.is_empty() || self.rest.contains('=') && self.rest.contains('"') {
            return None;
        }
        base64::engine::general_purpose::STANDARD
            .decode(self.rest.as_bytes())
            .ok()
    }
}

/// What the agent can authenticate with.
#[derive(Clone, Debug, Default)]
pub struct AuthOptions {
    /// User and password, when configured.
    pub credentials: Option<Credentials>,
    /// Try Negotiate (Kerberos ticket / Windows logon) when the proxy offers it.
    pub negotiate: bool,
    /// Never send the password in clear (Basic, SOCKS5 user/password): set for proxies found
    /// by WPAD or an OS-provided PAC, which anyone on the LAN can spoof.
    pub no_cleartext: bool,
    /// The proxy was found by WPAD, which anyone on the LAN can answer, and the admin policy
    /// does not allow answering it: no NTLM (whose responses can be cracked or relayed), no
    /// Digest, and Negotiate only as Kerberos, never falling back to NTLM.
    pub wpad_guard: bool,
    /// Why the credentials are held back (an earlier rejection), for the error message.
    pub withheld: Option<String>,
    /// Admin policy: NTLM or Basic turned off (and by which file or registry key).
    pub policy: crate::policy::Policy,
}

/// The scheme to answer with, from what the proxy offers and what we have; `skip` lists schemes
/// already tried and failed without risking the account (e.g. Negotiate without a ticket).
pub fn choose(offered: &[Challenge], opts: &AuthOptions, skip: &[Scheme]) -> Option<Scheme> {
    let mut known: Vec<Scheme> = offered.iter().filter_map(Challenge::known).collect();
    known.sort();
    known.dedup();
    known.into_iter().find(|s| {
        !skip.contains(s)
            && match s {
                Scheme::Negotiate => opts.negotiate,
                Scheme::Ntlm => {
                    !opts.wpad_guard
                        && opts.policy.ntlm.is_none()
                        && (opts.credentials.is_some() || cfg!(windows) && opts.negotiate)
                }
                Scheme::Digest => opts.credentials.is_some() && !opts.wpad_guard,
                Scheme::Basic => {
                    opts.credentials.is_some() && !opts.no_cleartext && opts.policy.basic.is_none()
                }
            }
    })
}

/// Negotiate may use SPNEGO (which can fall back to NTLM) unless NTLM is not allowed here: for
/// a proxy found by WPAD, or when the admin policy turned NTLM off. Then Kerberos alone.
pub fn kerberos_only(opts: &AuthOptions) -> bool {
    opts.wpad_guard || opts.policy.ntlm.is_some()
}

/// The one-line refusal when the proxy asks for schemes the admin policy turned off, naming
/// the policy and its file or registry key (`None` when it asks for none of them).
pub fn policy_refusal(offered: &[Challenge], opts: &AuthOptions) -> Option<String> {
    let refused: Vec<String> = offered
        .iter()
        .filter_map(Challenge::known)
        .filter_map(|s| {
            let why = match s {
                Scheme::Ntlm => opts.policy.ntlm.as_ref(),
                Scheme::Basic => opts.policy.basic.as_ref(),
                _ => None,
            }?;
            Some(format!("{s} not answered: turned off by {why}"))
        })
        .collect();
    (!refused.is_empty()).then(|| refused.join("; "))
}

/// The one-line refusal when a proxy found by WPAD asks for a scheme [`AuthOptions::wpad_guard`]
/// withholds (`None` when it asks for none of them).
pub fn wpad_refusal(offered: &[Challenge], opts: &AuthOptions) -> Option<String> {
    if !opts.wpad_guard {
        return None;
    }
    let withheld: Vec<&str> = offered
        .iter()
        .filter_map(Challenge::known)
        .filter(|s| matches!(s, Scheme::Ntlm | Scheme::Digest))
        .map(Scheme::name)
        .collect();
    if withheld.is_empty() {
        return None;
    }
    Some(format!(
        "{} not answered: this proxy was found by WPAD, which anyone on the LAN can answer; set [proxy_auth] wpad_credentials = \"allow\" in the agent config to allow it, or name the proxy with --proxy",
        withheld.join(" and ")
    ))
}

/// The schemes offered, for messages: `NTLM, Basic`.
pub fn offered_names(offered: &[Challenge]) -> String {
    if offered.is_empty() {
        return "no scheme named".into();
    }
    let mut names: Vec<&str> = offered.iter().map(|c| c.scheme.as_str()).collect();
    names.dedup();
    names.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wpad_proxy_is_offered_no_ntlm_no_digest_and_kerberos_only() {
        let offered: Vec<Challenge> = [
            "NTLM",
            "Digest realm=\"corp\", nonce=\"n\"",
            "Basic realm=\"x\"",
        ]
        .into_iter()
        .map(Challenge::parse)
        .collect();
        let guarded = AuthOptions {
            credentials: Some(Credentials::new("alice", Password::new("pw"))),
            negotiate: true,
            no_cleartext: true,
            wpad_guard: true,
            withheld: None,
            policy: Default::default(),
        };
        assert_eq!(choose(&offered, &guarded, &[]), None);
        let why = wpad_refusal(&offered, &guarded).unwrap();
        assert!(why.starts_with("NTLM and Digest not answered: this proxy was found by WPAD, which anyone on the LAN can answer; set [proxy_auth] wpad_credentials = \"allow\""), "{why}");
        assert!(!why.contains("pw"));
        // Negotiate is still chosen (the Kerberos package is used for it, see http.rs).
        let negotiate = [Challenge::parse("Negotiate")];
        assert_eq!(choose(&negotiate, &guarded, &[]), Some(Scheme::Negotiate));
        assert_eq!(wpad_refusal(&negotiate, &guarded), None);
        // Without the guard (policy allows, or not a WPAD proxy): NTLM as before.
        let open = AuthOptions {
            wpad_guard: false,
            ..guarded
        };
        assert_eq!(choose(&offered, &open, &[]), Some(Scheme::Ntlm));
        assert_eq!(wpad_refusal(&offered, &open), None);
    }

    #[test]
    fn challenges_parse_and_the_strongest_usable_scheme_wins() {
        let offered: Vec<Challenge> = [
            "Basic realm=\"corp\"",
            "NTLM",
            "Digest realm=\"corp\", nonce=\"abc\", qop=\"auth\"",
            "Negotiate",
            "Bearer x",
        ]
        .into_iter()
        .map(Challenge::parse)
        .collect();
        assert_eq!(offered[2].scheme, "Digest");
        assert!(offered[2].rest.starts_with("realm="));
        let creds = AuthOptions {
            credentials: Some(Credentials::new("alice", Password::new("pw"))),
            ..Default::default()
        };
        assert_eq!(choose(&offered, &creds, &[]), Some(Scheme::Ntlm));
        assert_eq!(
            choose(&offered, &creds, &[Scheme::Ntlm]),
            Some(Scheme::Digest)
        );
        let kerberos = AuthOptions {
            credentials: None,
            negotiate: true,
            ..Default::default()
        };
        assert_eq!(choose(&offered, &kerberos, &[]), Some(Scheme::Negotiate));
        assert_eq!(
            choose(&offered[..1], &AuthOptions::default(), &[]),
            None,
            "nothing to answer Basic with"
        );
        assert_eq!(
            offered_names(&offered),
            "Basic, NTLM, Digest, Negotiate, Bearer"
        );
    }

    #[test]
    fn several_challenges_on_one_line_are_split() {
        let all = Challenge::parse_all(
            r#"Negotiate, NTLM, Digest realm="a,b", nonce="x\"y", qop="auth", Basic realm="corp""#,
        );
        let names: Vec<&str> = all.iter().map(|c| c.scheme.as_str()).collect();
        assert_eq!(names, ["Negotiate", "NTLM", "Digest", "Basic"]);
        assert_eq!(all[2].rest, r#"realm="a,b", nonce="x\"y", qop="auth""#);
        assert_eq!(all[3].rest, r#"realm="corp""#);
        let one = Challenge::parse_all("NTLM TlRMTVNTUAACAAAA==");
        assert_eq!((one.len(), one[0].rest.as_str()), (1, "TlRMTVNTUAACAAAA=="));
        assert!(Challenge::parse_all("").is_empty());
    }

    #[test]
    fn ntlm_continuations_carry_a_token() {
        let c = Challenge::parse("NTLM TlRMTVNTUAACAAAA");
        assert_eq!(c.known(), Some(Scheme::Ntlm));
        assert_eq!(c.token().unwrap()[..7], *b"NTLMSSP");
        assert_eq!(Challenge::parse("NTLM").token(), None);
        assert_eq!(Challenge::parse("Negotiate !!notbase64").token(), None);
    }

    #[test]
    fn debug_hides_the_password() {
        let c = Credentials::new("CORP\\alice", Password::new("s3cret"));
        assert!(!format!("{c:?}").contains("s3cret"));
        assert_eq!(
            Credentials::new("Aladdin", Password::new("open sesame")).basic(),
            "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ=="
        );
    }
}
