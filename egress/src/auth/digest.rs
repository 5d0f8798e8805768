//! HTTP Digest authentication, client side ([RFC 7616], compatible with [RFC 2617] and the
//! [RFC 2069] form without `qop`).
//!
//! # How Digest works
//!
//! The proxy answers `407` with `Proxy-Authenticate: Digest realm="…", nonce="…", qop="auth",
//! algorithm=…, opaque="…"`. The client proves it knows the password without sending it: it
//! hashes the password together with the server's one-time `nonce`, its own `cnonce` and the
//! request, and sends the result as `response` in `Proxy-Authorization: Digest …`
//! ([RFC 7616] 3.4.1):
//!
//! ```text
//! A1       = user ":" realm ":" password
//!            (for the "-sess" algorithms: H(user ":" realm ":" password) ":" nonce ":" cnonce)
//! A2       = method ":" digest-uri
//! response = H( H(A1) ":" nonce ":" nc ":" cnonce ":" qop ":" H(A2) )     with qop
//! response = H( H(A1) ":" nonce ":" H(A2) )                               RFC 2069, no qop
//! ```
//!
//! `H` is MD5 or SHA-256 (lowercase hex), chosen by the challenge's `algorithm` (default MD5).
//! `nc` counts the requests made with one nonce (8 hex digits), so a captured answer cannot be
//! replayed with the same count. `opaque` is echoed untouched.
//!
//! For `CONNECT`, the digest-uri is the request target, the authority `host:port` — what squid
//! expects and curl sends.
//!
//! Only `qop=auth` is implemented: `auth-int` also hashes the request body, and a `CONNECT` has
//! none, but a server offering *only* `auth-int` is rare enough that it gets a clear error
//! rather than code. The `-sess` algorithms need the `cnonce`, which RFC 2617 forbids without a
//! `qop`; that combination is an error too.
//!
//! # Parsing challenge parameters
//!
//! [`parse_params`] reads any `auth-param` list (RFC 9110 11.2: `name = token / quoted-string`,
//! comma-separated, spaces allowed around `=` and `,`, empty list elements ignored); names come
//! back lowercase, quoted values unescaped. It is bounded ([`MAX_PARAMS_LEN`] bytes,
//! [`MAX_PARAMS`] parameters) and never panics on any input.
//!
//! # What is echoed
//!
//! `realm`, `nonce` and `opaque` come from the server and go back in the header; they, like the
//! user name and URI, are written as quoted-strings with `"` and `\` escaped, and a control
//! character (CR, LF, …) in any of them is an error, so nothing can inject a header line.
//! The password only ever enters a hash.
//!
//! [RFC 7616]: https://www.rfc-editor.org/rfc/rfc7616
//! [RFC 2617]: https://www.rfc-editor.org/rfc/rfc2617
//! [RFC 2069]: https://www.rfc-editor.org/rfc/rfc2069

use md5::Md5;
use sha2::{Digest, Sha256};
use std::fmt::Write;

/// Longest parameter list [`parse_params`] reads, in bytes.
pub const MAX_PARAMS_LEN: usize = 8 * 1024;
/// Most parameters [`parse_params`] returns.
pub const MAX_PARAMS: usize = 64;

/// Why a Digest challenge could not be read or answered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    #[error("auth parameters are {len} bytes long, more than the {max} accepted")]
    TooLong { len: usize, max: usize },
    #[error("more than {max} auth parameters")]
    TooManyParams { max: usize },
    #[error("auth parameter list: expected a parameter name at byte {at}")]
    ExpectedName { at: usize },
    #[error("auth parameter `{name}` has no `=` and value")]
    ExpectedValue { name: String },
    #[error("Digest challenge has no `{0}` parameter")]
    MissingParam(&'static str),
    #[error("Digest algorithm `{0}` is not supported (MD5, MD5-sess, SHA-256, SHA-256-sess are)")]
    UnsupportedAlgorithm(String),
    #[error("Digest algorithm `{0}` needs qop=auth, which the server did not offer")]
    SessWithoutQop(&'static str),
    #[error("Digest {0} contains a control character")]
    ControlCharacter(&'static str),
}

/// Parses an `auth-param` list such as `realm="x", nonce="y", qop="auth,auth-int"`: names
/// lowercased, `quoted-string` values unescaped (`\x` is `x`), token values as they are. An
/// empty (or all-blank) input is an empty list. Order is kept; duplicates are kept too (the
/// lookups in this module use the first).
///
/// As lenient as curl where it costs nothing: parameters separated by blanks without a comma,
/// a bare name (an empty value), an empty value (`opaque=`), and a quote left open (the value
/// runs to the end) are all read. A token68 (`abc==`) and a name that is not a token are
/// errors.
pub fn parse_params(s: &str) -> Result<Vec<(String, String)>, DigestError> {
    if s.len() > MAX_PARAMS_LEN {
        return Err(DigestError::TooLong {
            len: s.len(),
            max: MAX_PARAMS_LEN,
        });
    }
    let b = s.as_bytes();
    let mut i = 0;
    let mut out = Vec::new();
    loop {
        // Skip blanks and empty list elements.
        while matches!(b.get(i), Some(b' ' | b'\t' | b',')) {
            i += 1;
        }
        if i >= b.len() {
            return Ok(out);
        }
        if out.len() >= MAX_PARAMS {
            return Err(DigestError::TooManyParams { max: MAX_PARAMS });
        }
        let start = i;
        while b.get(i).is_some_and(|&c| is_tchar(c)) {
            i += 1;
        }
        if i == start {
            return Err(DigestError::ExpectedName { at: i });
        }
        let name = s.get(start..i).unwrap_or_default().to_ascii_lowercase();
        skip_blanks(b, &mut i);
        if b.get(i) != Some(&b'=') {
            // A bare name (`stale`, or a flag some server invents): an empty value, as curl
            // reads it; the lookups ignore names they do not know.
            out.push((name, String::new()));
            continue;
        }
        i += 1;
        skip_blanks(b, &mut i);
        let value = if b.get(i) == Some(&b'"') {
            i += 1;
            let mut v = Vec::new();
            loop {
                match b.get(i) {
                    // An unterminated quote runs to the end, as curl reads it.
                    None => break,
                    Some(b'"') => {
                        i += 1;
                        break;
                    }
                    Some(b'\\') => match b.get(i + 1) {
                        Some(&c) => {
                            v.push(c);
                            i += 2;
                        }
                        None => {
                            i += 1;
                            break;
                        }
                    },
                    Some(&c) => {
                        v.push(c);
                        i += 1;
                    }
                }
            }
            // Escapes only drop ASCII backslashes, so the bytes are still UTF-8; lossy to be
            // sure.
            String::from_utf8_lossy(&v).into_owned()
        } else {
            // A token; tolerant: anything up to a comma or blank except a quote. A value that
            // starts with `=` means this is a token68 (`abc==`), not an auth-param.
            if b.get(i) == Some(&b'=') {
                return Err(DigestError::ExpectedValue { name });
            }
            // An empty value (`opaque=,`) is an empty string, as curl reads it.
            let vstart = i;
            while b
                .get(i)
                .is_some_and(|&c| !matches!(c, b',' | b' ' | b'\t' | b'"'))
            {
                i += 1;
            }
            s.get(vstart..i).unwrap_or_default().to_string()
        };
        // The next parameter may follow after blanks without a comma (`realm="a" nonce="b"`),
        // as curl accepts; a quote right after a value is not a name, and is an error.
        skip_blanks(b, &mut i);
        out.push((name, value));
    }
}

fn skip_blanks(b: &[u8], i: &mut usize) {
    while matches!(b.get(*i), Some(b' ' | b'\t')) {
        *i += 1;
    }
}

/// RFC 9110 5.6.2 `tchar`.
fn is_tchar(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c)
}

/// The value of the first parameter called `name` (lowercase).
pub fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// Whether the challenge says `stale=true`: the nonce expired but the credentials were right,
/// so retrying with the new nonce is expected (and is not a failed login).
pub fn is_stale(params: &[(String, String)]) -> bool {
    param(params, "stale").is_some_and(|v| v.eq_ignore_ascii_case("true"))
}

/// A fresh client nonce: 16 random bytes as 32 hex digits.
pub fn new_cnonce() -> String {
    hex(&rand::random::<[u8; 16]>())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hash {
    Md5,
    Sha256,
}

impl Hash {
    fn hex(self, data: &str) -> String {
        match self {
            Hash::Md5 => hex(&Md5::digest(data.as_bytes())),
            Hash::Sha256 => hex(&Sha256::digest(data.as_bytes())),
        }
    }
}

/// `(hash, session variant, canonical name)` for an `algorithm` value (case-insensitive).
fn algorithm(name: &str) -> Result<(Hash, bool, &'static str), DigestError> {
    const KNOWN: [(&str, Hash, bool); 4] = [
        ("MD5", Hash::Md5, false),
        ("MD5-sess", Hash::Md5, true),
        ("SHA-256", Hash::Sha256, false),
        ("SHA-256-sess", Hash::Sha256, true),
    ];
    KNOWN
        .iter()
        .find(|(n, _, _)| n.eq_ignore_ascii_case(name))
        .map(|&(n, h, sess)| (h, sess, n))
        .ok_or_else(|| DigestError::UnsupportedAlgorithm(name.chars().take(64).collect()))
}

/// The `Proxy-Authorization` (or `Authorization`) header value answering a Digest challenge.
///
/// `params` are the challenge's parameters as [`parse_params`] returns them. `method` and `uri`
/// are the request's (`CONNECT` and `host:port` for a tunnel). `nc` is how many requests this
/// client has made with this nonce, starting at 1; `cnonce` should come from [`new_cnonce`].
///
/// The result starts with `Digest username="…", realm="…", nonce="…", uri="…", algorithm=…,
/// response="…"`, then `qop=auth, nc=…, cnonce="…"` when the server offered a qop, then
/// `opaque="…"` and `userhash=true` when the server sent those.
pub fn authorization(
    params: &[(String, String)],
    user: &str,
    password: &str,
    method: &str,
    uri: &str,
    nc: u32,
    cnonce: &str,
) -> Result<String, DigestError> {
    // No realm: an empty one, as curl does (it only enters the hash).
    let realm = param(params, "realm").unwrap_or("");
    let nonce = param(params, "nonce").ok_or(DigestError::MissingParam("nonce"))?;
    let (hash, sess, alg_name) = algorithm(param(params, "algorithm").unwrap_or("MD5"))?;
    // `auth` when offered, else `auth-int` (a CONNECT has no body: the hash of nothing), else
    // none of the qops we know: the RFC 2069 form, as curl falls back.
    let qop = param(params, "qop").and_then(|offered| {
        let offers = |want: &str| {
            offered
                .split(',')
                .any(|q| q.trim().eq_ignore_ascii_case(want))
        };
        ["auth", "auth-int"].into_iter().find(|q| offers(q))
    });
    if sess && qop.is_none() {
        return Err(DigestError::SessWithoutQop(alg_name));
    }
    let userhash = param(params, "userhash").is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let utf8 = param(params, "charset").is_some_and(|v| v.eq_ignore_ascii_case("UTF-8"));

    // RFC 7616 3.4.1 / 3.4.2.
    let mut ha1 = hash.hex(&format!("{user}:{realm}:{password}"));
    if sess {
        ha1 = hash.hex(&format!("{ha1}:{nonce}:{cnonce}"));
    }
    let ha2 = match qop {
        Some("auth-int") => hash.hex(&format!("{method}:{uri}:{}", hash.hex(""))),
        _ => hash.hex(&format!("{method}:{uri}")),
    };
    let nc = format!("{nc:08x}");
    let response = match qop {
        Some(q) => hash.hex(&format!("{ha1}:{nonce}:{nc}:{cnonce}:{q}:{ha2}")),
        None => hash.hex(&format!("{ha1}:{nonce}:{ha2}")),
    };

    // RFC 7616 3.4.4: with userhash the user name is H(user ":" realm). RFC 7616 3.4: a name
    // that is not plain ASCII goes as `username*` (RFC 5987 encoding) when the server declared
    // UTF-8 (charset=UTF-8); otherwise as it is, in UTF-8, as curl sends it.
    let username = if userhash {
        format!(
            "username={}",
            quoted(&hash.hex(&format!("{user}:{realm}")), "user")?
        )
    } else if utf8 && !user.is_ascii() {
        reject_controls(user, "user")?;
        format!("username*=UTF-8''{}", ext_value(user))
    } else {
        format!("username={}", quoted(user, "user")?)
    };
    let mut h = format!(
        "Digest {username}, realm={}, nonce={}, uri={}, algorithm={alg_name}, response=\"{response}\"",
        quoted(realm, "realm")?,
        quoted(nonce, "nonce")?,
        quoted(uri, "uri")?,
    );
    if let Some(q) = qop {
        let _ = write!(
            h,
            ", qop={q}, nc={nc}, cnonce={}",
            quoted(cnonce, "cnonce")?
        );
    }
    if let Some(opaque) = param(params, "opaque") {
        let _ = write!(h, ", opaque={}", quoted(opaque, "opaque")?);
    }
    if userhash {
        h.push_str(", userhash=true");
    }
    Ok(h)
}

fn reject_controls(s: &str, what: &'static str) -> Result<(), DigestError> {
    if s.chars().any(char::is_control) {
        Err(DigestError::ControlCharacter(what))
    } else {
        Ok(())
    }
}

/// `s` as a quoted-string: `"` and `\` escaped; control characters refused.
fn quoted(s: &str, what: &'static str) -> Result<String, DigestError> {
    reject_controls(s, what)?;
    let mut q = String::with_capacity(s.len() + 2);
    q.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            q.push('\\');
        }
        q.push(c);
    }
    q.push('"');
    Ok(q)
}

/// RFC 5987 `value-chars`: attr-char as is, everything else percent-encoded UTF-8.
fn ext_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || b"!#$&+-.^_`|~".contains(&b) {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(s: &str) -> Vec<(String, String)> {
        parse_params(s).unwrap()
    }

    fn field<'a>(header: &'a str, name: &str) -> Option<&'a str> {
        let rest = header.strip_prefix("Digest ")?;
        rest.split(", ").find_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            (k == name).then(|| v.trim_matches('"'))
        })
    }

    /// RFC 2617 section 3.5: the challenge, and the answer with response
    /// 6629fae49393a05397450978507c4ef1 (password "Circle Of Life", capital O).
    #[test]
    fn rfc2617_example() {
        let p = params(
            r#"realm="testrealm@host.com", qop="auth,auth-int", nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093", opaque="5ccc069c403ebaf9f0171e9517f40e41""#,
        );
        let h = authorization(
            &p,
            "Mufasa",
            "Circle Of Life",
            "GET",
            "/dir/index.html",
            1,
            "0a4f113b",
        )
        .unwrap();
        assert_eq!(
            h,
            concat!(
                r#"Digest username="Mufasa", realm="testrealm@host.com", "#,
                r#"nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093", uri="/dir/index.html", "#,
                r#"algorithm=MD5, response="6629fae49393a05397450978507c4ef1", qop=auth, "#,
                r#"nc=00000001, cnonce="0a4f113b", opaque="5ccc069c403ebaf9f0171e9517f40e41""#
            )
        );
    }

    /// RFC 7616 section 3.9.1: the same request answered with SHA-256 and with MD5 (password
    /// "Circle of Life", lowercase o — erratum 4495).
    #[test]
    fn rfc7616_examples() {
        for (alg, expected) in [
            (
                "SHA-256",
                "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1",
            ),
            ("MD5", "8ca523f5e9506fed4657c9700eebdbec"),
        ] {
            let p = params(&format!(
                r#"realm="http-auth@example.org", qop="auth, auth-int", algorithm={alg}, nonce="7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v", opaque="FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS""#
            ));
            let h = authorization(
                &p,
                "Mufasa",
                "Circle of Life",
                "GET",
                "/dir/index.html",
                1,
                "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ",
            )
            .unwrap();
            assert_eq!(field(&h, "response"), Some(expected), "{alg}: {h}");
            assert_eq!(field(&h, "algorithm"), Some(alg));
            assert_eq!(field(&h, "qop"), Some("auth"));
            assert_eq!(field(&h, "nc"), Some("00000001"));
            assert_eq!(
                field(&h, "opaque"),
                Some("FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS")
            );
        }
    }

    /// RFC 2069 (no qop): response = H(HA1:nonce:HA2), and no qop/nc/cnonce in the answer.
    /// Computed from the formula with the RFC 2617 challenge values, the MD5s written out.
    #[test]
    fn rfc2069_without_qop() {
        let p = params(r#"realm="testrealm@host.com", nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093""#);
        let h = authorization(
            &p,
            "Mufasa",
            "Circle Of Life",
            "GET",
            "/dir/index.html",
            1,
            "x",
        )
        .unwrap();
        let ha1 = Hash::Md5.hex("Mufasa:testrealm@host.com:Circle Of Life");
        let ha2 = Hash::Md5.hex("GET:/dir/index.html");
        // HA1 and HA2 of the RFC 2617 example (as `printf %s … | md5sum` gives them).
        assert_eq!(ha1, "939e7578ed9e3c518a452acee763bce9");
        assert_eq!(ha2, "39aff3a2bab6126f332b942af96d3366");
        let expected = Hash::Md5.hex(&format!("{ha1}:dcd98b7102dd2f0e8b11d0f600bfb0c093:{ha2}"));
        assert_eq!(field(&h, "response"), Some(expected.as_str()));
        assert_eq!(field(&h, "qop"), None);
        assert_eq!(field(&h, "cnonce"), None);
        assert_eq!(field(&h, "nc"), None);
    }

    #[test]
    fn sess_algorithms_fold_the_nonces_into_ha1() {
        for (alg, hash) in [("MD5-sess", Hash::Md5), ("sha-256-SESS", Hash::Sha256)] {
            let p = params(&format!(
                r#"realm="r", nonce="N", qop="auth", algorithm={alg}"#
            ));
            let h = authorization(&p, "u", "p", "CONNECT", "gw.example:443", 2, "C").unwrap();
            let ha1 = hash.hex(&format!("{}:N:C", hash.hex("u:r:p")));
            let ha2 = hash.hex("CONNECT:gw.example:443");
            let expected = hash.hex(&format!("{ha1}:N:00000002:C:auth:{ha2}"));
            assert_eq!(field(&h, "response"), Some(expected.as_str()), "{alg}");
            assert_eq!(field(&h, "uri"), Some("gw.example:443"));
            assert_eq!(field(&h, "nc"), Some("00000002"));
        }
        let p = params(r#"realm="r", nonce="N", algorithm=MD5-sess"#);
        assert_eq!(
            authorization(&p, "u", "p", "GET", "/", 1, "c"),
            Err(DigestError::SessWithoutQop("MD5-sess"))
        );
    }

    #[test]
    fn clear_errors_for_what_is_not_supported_or_missing() {
        let p = params(r#"realm="r", nonce="n", algorithm=SHA-512-256, qop="auth""#);
        let e = authorization(&p, "u", "p", "GET", "/", 1, "c").unwrap_err();
        assert_eq!(e, DigestError::UnsupportedAlgorithm("SHA-512-256".into()));
        assert!(e.to_string().contains("SHA-512-256"));
        let p = params(r#"realm="r""#);
        assert_eq!(
            authorization(&p, "u", "p", "GET", "/", 1, "c"),
            Err(DigestError::MissingParam("nonce"))
        );
    }

    /// Challenges curl answers and we refused: no realm, only `auth-int`, an unknown qop,
    /// unquoted values, algorithm in lower case, unknown parameters.
    #[test]
    fn digest_challenges_curl_answers_are_answered() {
        // No realm: an empty one enters the hash (curl's answer, computed by hand:
        // MD5("u::p"), MD5("CONNECT:h:1"), then the RFC 2069 form).
        let p = params(r#"nonce="n""#);
        let h = authorization(&p, "u", "p", "CONNECT", "h:1", 1, "c").unwrap();
        let ha1 = hex(&Md5::digest(b"u::p"));
        let ha2 = hex(&Md5::digest(b"CONNECT:h:1"));
        let want = hex(&Md5::digest(format!("{ha1}:n:{ha2}").as_bytes()));
        assert_eq!(field(&h, "response"), Some(want.as_str()), "{h}");
        assert_eq!(field(&h, "realm"), Some(""));
        // Only auth-int: the body of a CONNECT is empty, so A2 = method:uri:H("").
        let p = params(r#"realm="r", nonce="n", qop="auth-int""#);
        let h = authorization(&p, "u", "p", "CONNECT", "h:1", 1, "c").unwrap();
        let ha1 = hex(&Md5::digest(b"u:r:p"));
        let ha2 = hex(&Md5::digest(
            format!("CONNECT:h:1:{}", hex(&Md5::digest(b""))).as_bytes(),
        ));
        let want = hex(&Md5::digest(
            format!("{ha1}:n:00000001:c:auth-int:{ha2}").as_bytes(),
        ));
        assert_eq!(field(&h, "response"), Some(want.as_str()), "{h}");
        assert_eq!(field(&h, "qop"), Some("auth-int"));
        // A qop we do not know: the RFC 2069 form (no qop, nc or cnonce), as curl.
        let p = params(r#"realm="r", nonce="n", qop="auth-conf""#);
        let h = authorization(&p, "u", "p", "CONNECT", "h:1", 1, "c").unwrap();
        assert_eq!((field(&h, "qop"), field(&h, "nc")), (None, None), "{h}");
        // Unquoted values, lower-case algorithm, unknown parameters, no commas, a bare flag.
        let loose = params(
            r#"realm=r nonce=n algorithm=md5-sess qop=auth charset=x domain="/a /b" whatever"#,
        );
        let strict = params(r#"realm="r", nonce="n", algorithm="MD5-sess", qop="auth""#);
        assert_eq!(
            authorization(&loose, "u", "p", "CONNECT", "h:1", 1, "c"),
            authorization(&strict, "u", "p", "CONNECT", "h:1", 1, "c")
        );
    }

    #[test]
    fn echoed_values_are_escaped_and_cannot_inject_lines() {
        let p = vec![
            ("realm".to_string(), r#"a "b" \c"#.to_string()),
            ("nonce".to_string(), "n".to_string()),
        ];
        let h = authorization(&p, "u", "p", "GET", "/", 1, "c").unwrap();
        assert!(h.contains(r#"realm="a \"b\" \\c""#), "{h}");
        // The escaped realm parses back to the original.
        let again = parse_params(h.strip_prefix("Digest ").unwrap()).unwrap();
        assert_eq!(param(&again, "realm"), Some(r#"a "b" \c"#));

        let p = vec![
            ("realm".to_string(), "r".to_string()),
            ("nonce".to_string(), "n\r\nX-Evil: 1".to_string()),
        ];
        assert_eq!(
            authorization(&p, "u", "p", "GET", "/", 1, "c"),
            Err(DigestError::ControlCharacter("nonce"))
        );
        let p = params(r#"realm="r", nonce="n""#);
        assert_eq!(
            authorization(&p, "u\n", "p", "GET", "/", 1, "c"),
            Err(DigestError::ControlCharacter("user"))
        );
    }

    #[test]
    fn the_password_never_appears() {
        let p = params(r#"realm="r", nonce="n", qop="auth", opaque="o""#);
        let h = authorization(&p, "alice", "hunter2-secret", "CONNECT", "h:1", 1, "c").unwrap();
        assert!(!h.contains("hunter2"));
    }

    #[test]
    fn userhash_and_utf8_user_names() {
        let p = params(r#"realm="r", nonce="n", qop="auth", userhash=true"#);
        let h = authorization(&p, "Jäsøn", "p", "GET", "/", 1, "c").unwrap();
        let expected = Hash::Md5.hex("Jäsøn:r");
        assert_eq!(field(&h, "username"), Some(expected.as_str()));
        assert!(h.ends_with(", userhash=true"));

        let p = params(r#"realm="r", nonce="n", qop="auth", charset=UTF-8"#);
        let h = authorization(&p, "Jäsøn Doe", "p", "GET", "/", 1, "c").unwrap();
        // RFC 7616 3.9.2 spells "J\u{e4}s\u{f8}n Doe" as J%C3%A4s%C3%B8n%20Doe.
        assert!(
            h.starts_with("Digest username*=UTF-8''J%C3%A4s%C3%B8n%20Doe, "),
            "{h}"
        );
        // Without charset=UTF-8 the name goes as it is.
        let p = params(r#"realm="r", nonce="n""#);
        let h = authorization(&p, "Jäsøn", "p", "GET", "/", 1, "c").unwrap();
        assert!(h.starts_with("Digest username=\"Jäsøn\", "));
    }

    #[test]
    fn stale_and_cnonce() {
        assert!(is_stale(&params(r#"nonce="x", stale=TRUE"#)));
        assert!(!is_stale(&params(r#"nonce="x", stale=false"#)));
        assert!(!is_stale(&params(r#"nonce="x""#)));
        let (a, b) = (new_cnonce(), new_cnonce());
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
    }

    // ---- the parameter parser ----

    fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn parser_reads_tokens_quoted_strings_and_blanks() {
        assert_eq!(
            params(r#"Realm="x", NONCE = "y" ,qop="auth,auth-int",algorithm=MD5-sess,stale=false"#),
            pairs(&[
                ("realm", "x"),
                ("nonce", "y"),
                ("qop", "auth,auth-int"),
                ("algorithm", "MD5-sess"),
                ("stale", "false"),
            ])
        );
        // Escaped quotes and backslashes; commas and '=' inside quotes.
        assert_eq!(
            params(r#"realm="say \"hi\", a\\b = c", x="""#),
            pairs(&[("realm", r#"say "hi", a\b = c"#), ("x", "")])
        );
        // Empty list elements and trailing commas are ignored; UTF-8 survives.
        assert_eq!(
            params(" ,, a=1 ,, b=\"é\" , "),
            pairs(&[("a", "1"), ("b", "é")])
        );
    }

    #[test]
    fn parser_empty_input_is_an_empty_list() {
        assert_eq!(params(""), vec![]);
        assert_eq!(params("  , "), vec![]);
    }

    #[test]
    fn parser_errors() {
        let cases: &[(&str, DigestError)] = &[
            (r#"="x""#, DigestError::ExpectedName { at: 0 }),
            ("a=1, (b)=2", DigestError::ExpectedName { at: 5 }),
            (r#"realm="a" "b""#, DigestError::ExpectedName { at: 10 }),
            // A token68 (NTLM/Negotiate) is not an auth-param list.
            (
                "TlRMTVNTUAACAAAA==",
                DigestError::ExpectedValue {
                    name: "tlrmtvntuaacaaaa".into(),
                },
            ),
        ];
        for (input, want) in cases {
            assert_eq!(parse_params(input).as_ref(), Err(want), "{input:?}");
        }
    }

    /// What curl reads and we refused: a quote left open, a bare name, an empty value,
    /// parameters without commas.
    #[test]
    fn parser_is_as_lenient_as_curl() {
        assert_eq!(params(r#"realm="open"#), pairs(&[("realm", "open")]));
        assert_eq!(
            params(r#"realm="ends in escape\"#),
            pairs(&[("realm", "ends in escape")])
        );
        assert_eq!(params("realm"), pairs(&[("realm", "")]));
        assert_eq!(params("realm="), pairs(&[("realm", "")]));
        assert_eq!(
            params("realm=, nonce=x"),
            pairs(&[("realm", ""), ("nonce", "x")])
        );
        assert_eq!(
            params(r#"realm=a b nonce="n""#),
            pairs(&[("realm", "a"), ("b", ""), ("nonce", "n")])
        );
    }

    #[test]
    fn parser_is_bounded() {
        let long = format!("a=\"{}\"", "x".repeat(MAX_PARAMS_LEN));
        assert!(matches!(
            parse_params(&long),
            Err(DigestError::TooLong { .. })
        ));
        let many = (0..=MAX_PARAMS)
            .map(|i| format!("p{i}=1"))
            .collect::<Vec<_>>()
            .join(",");
        assert_eq!(
            parse_params(&many),
            Err(DigestError::TooManyParams { max: MAX_PARAMS })
        );
        let just_enough = (0..MAX_PARAMS)
            .map(|i| format!("p{i}=1"))
            .collect::<Vec<_>>()
            .join(",");
        assert_eq!(parse_params(&just_enough).unwrap().len(), MAX_PARAMS);
    }

    #[test]
    fn parser_never_panics_on_odd_bytes() {
        // Every prefix of a tricky input, including cuts inside multi-byte characters' text.
        let tricky = "a=\"é\\\"ü\", b=ñ, \"c\"=\\, d=\"\\é";
        // Whatever parses has non-empty names without separators in them.
        let sane = |r: Result<Vec<(String, String)>, DigestError>| {
            if let Ok(params) = r {
                for (k, _) in params {
                    assert!(!k.is_empty());
                    assert!(!k.contains(['=', ',', '"', ' ']), "{k:?}");
                }
            }
        };
        for (i, _) in tricky.char_indices() {
            sane(parse_params(&tricky[..i]));
        }
        for s in ["\"", "\\", "=", ",=,", "a=\"\\", "é=1", "a=\u{0}"] {
            sane(parse_params(s));
        }
    }
}
