//! Version 2 tokens: one self-contained string that carries a secret the agent never sends, and
//! claims an issuer signed (who it is, what it may do, which gateway keys it trusts).
//!
//! ```text
//! sp2_<base64url, no padding, of:>
//!     version:u8 = 2 | secret:[32] | claims_len:u16 (≤ 2048) | claims | issuer_sig:[64]
//! ```
//!
//! - `secret` never leaves the desktop. The agent's static X25519 key is derived from it with
//!   HKDF-SHA256 ([`agent_private_key`]); only the public half is in the claims (type 9) and in
//!   the gateway's token file.
//! - `claims` are canonical TLV (`type:u8 | len:u16 | value`), types strictly increasing, fixed
//!   lengths exact, text UTF-8, no trailing bytes. An unknown type is refused unless its high
//!   bit (0x80) says it is optional; optional types may only inform, never restrict.
//! - `issuer_sig` is Ed25519 over [`SIG_CONTEXT`] `|| claims`.
//!
//! The gateway receives the claims and signature inside the Noise handshake (see
//! [`crate::handshake`]), never the secret. Pure code: no clock (`now` is passed in), no I/O.
//! `Debug` and `Display` of a [`Token`] or an [`Issuer`] never show a secret.

use base64::Engine;
use ring::signature::{self, KeyPair as _};
use std::fmt;

/// How every version 2 token begins.
pub const PREFIX: &str = "sp2_";
/// The version byte of the token string.
const VERSION: u8 = 2;
/// What the issuer signs: this, then the claims.
pub const SIG_CONTEXT: &[u8] = b"sallyport token v2\0";
/// Largest claims block.
pub const MAX_CLAIMS: usize = 2048;
/// HKDF label of the agent's static key.
const AGENT_KEY_INFO: &[u8] = b"sallyport v2 agent x25519";
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;
const B64STD: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Claim types (see `docs/protocol.md`, "The token").
mod ty {
    pub const KIND: u8 = 1;
    pub const ID: u8 = 2;
    pub const NAME: u8 = 3;
    pub const GROUPS: u8 = 4;
    pub const ROUTES: u8 = 5;
    pub const ISSUED_AT: u8 = 6;
    pub const NOT_BEFORE: u8 = 7;
    pub const EXPIRES: u8 = 8;
    pub const AGENT_KEY: u8 = 9;
    pub const GATEWAY_KEYS: u8 = 10;
    pub const DEPLOYMENT: u8 = 11;
    pub const ISSUER: u8 = 12;
    pub const OPTIONAL: u8 = 0x80;
}

/// Why a token or a claims block was refused. The text names what is wrong, never a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("not a version 2 token: {0}")]
    Malformed(&'static str),
    #[error("token claims: {0}")]
    BadClaims(String),
    #[error("token {id:?}: its key does not match its secret (the token string is damaged)")]
    KeyMismatch { id: String },
    #[error("token {id:?}: the issuer's signature does not verify with any accepted issuer key")]
    BadSignature { id: String },
    #[error("token {id:?} expired at {at} (Unix seconds)")]
    Expired { id: String, at: u64 },
    #[error("token {id:?} is not valid before {at} (Unix seconds)")]
    NotYet { id: String, at: u64 },
    #[error("token {id:?} is a {kind} token, not a {want} token")]
    WrongKind { id: String, kind: Kind, want: Kind },
    #[error("token {id:?} is for deployment {theirs:?}, this gateway is {ours:?}")]
    WrongDeployment {
        id: String,
        theirs: String,
        ours: String,
    },
    #[error("token {id:?} does not list this gateway's key")]
    NotForThisGateway { id: String },
    #[error("key file: {0}")]
    KeyFile(String),
}

/// Whose token it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Agent,
    Connector,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Agent => "agent",
            Kind::Connector => "connector",
        })
    }
}

/// What the issuer vouches for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub kind: Kind,
    /// 1–64 of `[a-z0-9-]`: the key of revocation, of limits and of logs.
    pub id: String,
    pub name: Option<String>,
    pub groups: Vec<String>,
    /// Connectors: the only routes they may advertise (as `--route` writes them).
    pub routes: Vec<String>,
    pub issued_at: u64,
    pub not_before: Option<u64>,
    pub expires: Option<u64>,
    /// The holder's static X25519 public key.
    pub agent_key: [u8; 32],
    /// The gateway static keys this token trusts: current, then next.
    pub gateway_keys: Vec<[u8; 32]>,
    pub deployment: Option<String>,
    /// The issuer's Ed25519 public key (pinned by the agent for renewal).
    pub issuer: [u8; 32],
}

/// Whether `id` is a valid token id (the same rule as version 1).
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

fn put(out: &mut Vec<u8>, t: u8, v: &[u8]) {
    out.push(t);
    out.extend_from_slice(&(v.len() as u16).to_be_bytes());
    out.extend_from_slice(v);
}

fn text(t: u8, v: &[u8]) -> Result<String, TokenError> {
    String::from_utf8(v.to_vec())
        .map_err(|_| TokenError::BadClaims(format!("claim {t} is not UTF-8")))
}

fn fixed<const N: usize>(t: u8, v: &[u8]) -> Result<[u8; N], TokenError> {
    v.try_into()
        .map_err(|_| TokenError::BadClaims(format!("claim {t} must be {N} bytes, not {}", v.len())))
}

impl Claims {
    /// The canonical encoding (what the issuer signs).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        put(
            &mut out,
            ty::KIND,
            match self.kind {
                Kind::Agent => b"agent",
                Kind::Connector => b"connector",
            },
        );
        put(&mut out, ty::ID, self.id.as_bytes());
        if let Some(n) = &self.name {
            put(&mut out, ty::NAME, n.as_bytes());
        }
        if !self.groups.is_empty() {
            put(&mut out, ty::GROUPS, self.groups.join(",").as_bytes());
        }
        if !self.routes.is_empty() {
            put(&mut out, ty::ROUTES, self.routes.join(" ").as_bytes());
        }
        put(&mut out, ty::ISSUED_AT, &self.issued_at.to_be_bytes());
        if let Some(t) = self.not_before {
            put(&mut out, ty::NOT_BEFORE, &t.to_be_bytes());
        }
        if let Some(t) = self.expires {
            put(&mut out, ty::EXPIRES, &t.to_be_bytes());
        }
        put(&mut out, ty::AGENT_KEY, &self.agent_key);
        put(&mut out, ty::GATEWAY_KEYS, &self.gateway_keys.concat());
        if let Some(d) = &self.deployment {
            put(&mut out, ty::DEPLOYMENT, d.as_bytes());
        }
        put(&mut out, ty::ISSUER, &self.issuer);
        out
    }

    /// Reads a claims block; refuses anything that is not exactly canonical.
    pub fn decode(mut b: &[u8]) -> Result<Claims, TokenError> {
        if b.len() > MAX_CLAIMS {
            return Err(TokenError::BadClaims(format!(
                "{} bytes, at most {MAX_CLAIMS}",
                b.len()
            )));
        }
        let bad = |s: &str| TokenError::BadClaims(s.to_string());
        let (mut kind, mut id, mut issued_at, mut agent_key, mut gateway_keys, mut issuer) =
            (None, None, None, None, None, None);
        let mut c = Claims {
            kind: Kind::Agent,
            id: String::new(),
            name: None,
            groups: Vec::new(),
            routes: Vec::new(),
            issued_at: 0,
            not_before: None,
            expires: None,
            agent_key: [0; 32],
            gateway_keys: Vec::new(),
            deployment: None,
            issuer: [0; 32],
        };
        let mut last: Option<u8> = None;
        while !b.is_empty() {
            if b.len() < 3 {
                return Err(bad("truncated claim header"));
            }
            let t = b[0];
            let n = u16::from_be_bytes([b[1], b[2]]) as usize;
            if b.len() < 3 + n {
                return Err(bad("truncated claim value"));
            }
            let v = &b[3..3 + n];
            b = &b[3 + n..];
            if last.is_some_and(|l| t <= l) {
                return Err(bad("claim types must be strictly increasing"));
            }
            last = Some(t);
            match t {
                ty::KIND => {
                    kind = Some(match v {
                        b"agent" => Kind::Agent,
                        b"connector" => Kind::Connector,
                        _ => return Err(bad("kind must be agent or connector")),
                    })
                }
                ty::ID => {
                    let s = text(t, v)?;
                    if !valid_id(&s) {
                        return Err(bad("id must be 1-64 of a-z, 0-9 and '-'"));
                    }
                    id = Some(s);
                }
                ty::NAME => c.name = Some(text(t, v)?),
                ty::GROUPS => {
                    c.groups = text(t, v)?.split(',').map(str::to_string).collect();
                    if c.groups.iter().any(|g| g.is_empty()) {
                        return Err(bad("empty group"));
                    }
                }
                ty::ROUTES => {
                    c.routes = text(t, v)?.split(' ').map(str::to_string).collect();
                    if c.routes.iter().any(|r| r.is_empty()) {
                        return Err(bad("empty route"));
                    }
                }
                ty::ISSUED_AT => issued_at = Some(u64::from_be_bytes(fixed(t, v)?)),
                ty::NOT_BEFORE => c.not_before = Some(u64::from_be_bytes(fixed(t, v)?)),
                ty::EXPIRES => c.expires = Some(u64::from_be_bytes(fixed(t, v)?)),
                ty::AGENT_KEY => {
                    let k: [u8; 32] = fixed(t, v)?;
                    if low_order(&k) {
                        return Err(bad("the agent key is a low-order point"));
                    }
                    agent_key = Some(k);
                }
                ty::GATEWAY_KEYS => {
                    if v.len() != 32 && v.len() != 64 {
                        return Err(bad("gateway keys: 32 or 64 bytes"));
                    }
                    gateway_keys = Some(
                        v.chunks(32)
                            .map(|k| k.try_into().expect("32-byte chunks"))
                            .collect::<Vec<[u8; 32]>>(),
                    );
                }
                ty::DEPLOYMENT => c.deployment = Some(text(t, v)?),
                ty::ISSUER => issuer = Some(fixed(t, v)?),
                t if t & ty::OPTIONAL != 0 => {} // informs only: safe to ignore
                t => return Err(TokenError::BadClaims(format!("unknown claim type {t}"))),
            }
        }
        c.kind = kind.ok_or_else(|| bad("no kind"))?;
        c.id = id.ok_or_else(|| bad("no id"))?;
        c.issued_at = issued_at.ok_or_else(|| bad("no issued-at"))?;
        c.agent_key = agent_key.ok_or_else(|| bad("no agent key"))?;
        c.gateway_keys = gateway_keys.ok_or_else(|| bad("no gateway key"))?;
        c.issuer = issuer.ok_or_else(|| bad("no issuer"))?;
        Ok(c)
    }

    /// The checks a gateway makes once the handshake authenticated `agent_key`: kind, dates,
    /// deployment and that the key it decrypted with is one this token trusts. (The signature
    /// is checked by [`SignedClaims::verify`], revocation by the caller.)
    pub fn check(
        &self,
        want: Kind,
        now: u64,
        deployment: Option<&str>,
        gateway_key: &[u8; 32],
    ) -> Result<(), TokenError> {
        let id = || self.id.clone();
        if self.kind != want {
            return Err(TokenError::WrongKind {
                id: id(),
                kind: self.kind,
                want,
            });
        }
        if let Some(at) = self.expires.filter(|&at| now >= at) {
            return Err(TokenError::Expired { id: id(), at });
        }
        if let Some(at) = self.not_before.filter(|&at| now < at) {
            return Err(TokenError::NotYet { id: id(), at });
        }
        if let Some(ours) = deployment {
            if self.deployment.as_deref() != Some(ours) {
                return Err(TokenError::WrongDeployment {
                    id: id(),
                    theirs: self.deployment.clone().unwrap_or_default(),
                    ours: ours.to_string(),
                });
            }
        }
        if !self.gateway_keys.contains(gateway_key) {
            return Err(TokenError::NotForThisGateway { id: id() });
        }
        Ok(())
    }
}

/// Claims as the issuer signed them: the exact bytes, the signature, and what they say.
#[derive(Clone, PartialEq, Eq)]
pub struct SignedClaims {
    bytes: Vec<u8>,
    sig: [u8; 64],
    claims: Claims,
}

impl fmt::Debug for SignedClaims {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignedClaims")
            .field("id", &self.claims.id)
            .field("kind", &self.claims.kind)
            .finish_non_exhaustive()
    }
}

impl SignedClaims {
    /// Reads claims and their signature (not yet verified).
    pub fn parse(bytes: &[u8], sig: &[u8]) -> Result<SignedClaims, TokenError> {
        let sig: [u8; 64] = sig
            .try_into()
            .map_err(|_| TokenError::Malformed("the signature must be 64 bytes"))?;
        Ok(SignedClaims {
            claims: Claims::decode(bytes)?,
            bytes: bytes.to_vec(),
            sig,
        })
    }

    pub fn claims(&self) -> &Claims {
        &self.claims
    }

    /// The signed bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub fn signature(&self) -> &[u8; 64] {
        &self.sig
    }

    /// Whether one of `issuers` signed these claims. Every accepted key is tried: the issuer
    /// named inside the (unverified) claims picks nothing.
    pub fn verify(&self, issuers: &[IssuerKey]) -> Result<(), TokenError> {
        if signed_by(issuers, SIG_CONTEXT, &self.bytes, &self.sig) {
            Ok(())
        } else {
            Err(TokenError::BadSignature {
                id: self.claims.id.clone(),
            })
        }
    }
}

/// A version 2 token: the secret and the signed claims. `Debug`/`Display` show `sp2_****` and
/// the id; [`Token::expose`] is the only way to the string.
#[derive(Clone)]
pub struct Token {
    secret: [u8; 32],
    signed: SignedClaims,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}****(id {})", self.signed.claims.id)
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

impl std::str::FromStr for Token {
    type Err = TokenError;
    fn from_str(s: &str) -> Result<Token, TokenError> {
        let b64 = s
            .trim()
            .strip_prefix(PREFIX)
            .ok_or(TokenError::Malformed("it does not begin with sp2_"))?;
        let raw = B64.decode(b64).map_err(|_| {
            TokenError::Malformed("not base64url after sp2_ (was it cut or wrapped?)")
        })?;
        if raw.len() < 1 + 32 + 2 + 64 {
            return Err(TokenError::Malformed("too short (was it cut?)"));
        }
        if raw[0] != VERSION {
            return Err(TokenError::Malformed("unknown version byte"));
        }
        let secret: [u8; 32] = raw[1..33].try_into().expect("32 bytes");
        let n = u16::from_be_bytes([raw[33], raw[34]]) as usize;
        if raw.len() != 35 + n + 64 {
            return Err(TokenError::Malformed(
                "its length does not add up (was it cut?)",
            ));
        }
        let signed = SignedClaims::parse(&raw[35..35 + n], &raw[35 + n..])?;
        if agent_public_key(&secret) != signed.claims.agent_key {
            return Err(TokenError::KeyMismatch {
                id: signed.claims.id.clone(),
            });
        }
        Ok(Token { secret, signed })
    }
}

impl Token {
    /// Mints a token: a fresh secret, its public key in the claims (`claims.agent_key` is
    /// overwritten), signed by `issuer`. `claims.issuer` (claim 12, the key the agent accepts
    /// renewals from) is kept when set, else it is `issuer`'s own.
    pub fn mint(issuer: &Issuer, mut claims: Claims) -> Result<Token, TokenError> {
        let mut secret = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut secret);
        claims.agent_key = agent_public_key(&secret);
        if claims.issuer == [0; 32] {
            claims.issuer = issuer.public().0;
        }
        let bytes = claims.encode();
        if bytes.len() > MAX_CLAIMS {
            return Err(TokenError::BadClaims(format!(
                "{} bytes of claims, at most {MAX_CLAIMS} (fewer routes or groups)",
                bytes.len()
            )));
        }
        let sig = issuer.sign(&bytes);
        let signed = SignedClaims::parse(&bytes, &sig)?;
        Ok(Token { secret, signed })
    }

    /// A token from a secret and claims signed for its key (a renewal's answer).
    pub fn from_parts(secret: [u8; 32], signed: SignedClaims) -> Result<Token, TokenError> {
        if agent_public_key(&secret) != signed.claims.agent_key {
            return Err(TokenError::KeyMismatch {
                id: signed.claims.id.clone(),
            });
        }
        Ok(Token { secret, signed })
    }

    /// The secret (for a renewal's proof; never sent).
    pub(crate) fn secret(&self) -> &[u8; 32] {
        &self.secret
    }

    /// The token string (a secret: for the token file or keychain only).
    pub fn expose(&self) -> String {
        let c = &self.signed.bytes;
        let mut raw = Vec::with_capacity(1 + 32 + 2 + c.len() + 64);
        raw.push(VERSION);
        raw.extend_from_slice(&self.secret);
        raw.extend_from_slice(&(c.len() as u16).to_be_bytes());
        raw.extend_from_slice(c);
        raw.extend_from_slice(&self.signed.sig);
        format!("{PREFIX}{}", B64.encode(raw))
    }

    pub fn claims(&self) -> &Claims {
        &self.signed.claims
    }

    pub fn signed(&self) -> &SignedClaims {
        &self.signed
    }

    /// The holder's static X25519 private key (for the handshake).
    pub fn private_key(&self) -> [u8; 32] {
        agent_private_key(&self.secret)
    }
}

/// Whether `s` looks like a version 2 token (the agent then never speaks version 1).
pub fn is_v2(s: &str) -> bool {
    s.trim_start().starts_with(PREFIX)
}

/// The agent's static X25519 private key: HKDF-SHA256 of the token's secret (not a slow hash:
/// the secret is already 256 random bits, and the gateway derives nothing).
pub fn agent_private_key(secret: &[u8; 32]) -> [u8; 32] {
    struct Len32;
    impl ring::hkdf::KeyType for Len32 {
        fn len(&self) -> usize {
            32
        }
    }
    let prk = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, &[]).extract(secret);
    let okm = prk
        .expand(&[AGENT_KEY_INFO], Len32)
        .expect("32 bytes is a valid HKDF-SHA256 length");
    let mut out = [0u8; 32];
    okm.fill(&mut out).expect("32 bytes");
    out
}

/// The public half of [`agent_private_key`].
pub fn agent_public_key(secret: &[u8; 32]) -> [u8; 32] {
    crate::inner::KeyPair::from_private(agent_private_key(secret))
        .public()
        .0
}

/// Whether `k` is one of the X25519 points of small order (and their non-canonical twins):
/// with such a key anyone "proves" the matching private key, so it is never accepted.
pub fn low_order(k: &[u8; 32]) -> bool {
    // The list libsodium refuses (crypto_scalarmult_curve25519 blacklist).
    const BAD: [[u8; 32]; 7] = [
        [0; 32],
        {
            let mut b = [0u8; 32];
            b[0] = 1;
            b
        },
        [
            0xe0, 0xeb, 0x7a, 0x7c, 0x3b, 0x41, 0xb8, 0xae, 0x16, 0x56, 0xe3, 0xfa, 0xf1, 0x9f,
            0xc4, 0x6a, 0xda, 0x09, 0x8d, 0xeb, 0x9c, 0x32, 0xb1, 0xfd, 0x86, 0x62, 0x05, 0x16,
            0x5f, 0x49, 0xb8, 0x00,
        ],
        [
            0x5f, 0x9c, 0x95, 0xbc, 0xa3, 0x50, 0x8c, 0x24, 0xb1, 0xd0, 0xb1, 0x55, 0x9c, 0x83,
            0xef, 0x5b, 0x04, 0x44, 0x5c, 0xc4, 0x58, 0x1c, 0x8e, 0x86, 0xd8, 0x22, 0x4e, 0xdd,
            0xd0, 0x9f, 0x11, 0x57,
        ],
        [
            0xec, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0xff, 0xff, 0xff, 0x7f,
        ],
        [
            0xed, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0xff, 0xff, 0xff, 0x7f,
        ],
        [
            0xee, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0xff, 0xff, 0xff, 0x7f,
        ],
    ];
    // The top bit is ignored by X25519: compare with it cleared.
    let mut m = *k;
    m[31] &= 0x7f;
    BAD.iter().any(|b| {
        let mut bb = *b;
        bb[31] &= 0x7f;
        bb == m
    })
}

/// Whether one of `issuers` signed `context || bytes` (see [`Issuer::sign_in`]).
pub fn signed_by(issuers: &[IssuerKey], context: &[u8], bytes: &[u8], sig: &[u8; 64]) -> bool {
    let mut msg = Vec::with_capacity(context.len() + bytes.len());
    msg.extend_from_slice(context);
    msg.extend_from_slice(bytes);
    issuers.iter().any(|k| {
        signature::UnparsedPublicKey::new(&signature::ED25519, &k.0)
            .verify(&msg, sig)
            .is_ok()
    })
}

/// An issuer's Ed25519 public key, written `ed25519/<base64>`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct IssuerKey(pub [u8; 32]);

impl fmt::Display for IssuerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ed25519/{}", B64STD.encode(self.0))
    }
}

impl fmt::Debug for IssuerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::str::FromStr for IssuerKey {
    type Err = TokenError;
    fn from_str(s: &str) -> Result<IssuerKey, TokenError> {
        let b64 = s.trim().strip_prefix("ed25519/").ok_or_else(|| {
            TokenError::KeyFile(format!(
                "issuer key {s:?} must look like ed25519/<base64> (what `sallyport-gateway token issuer` prints)"
            ))
        })?;
        let raw = B64STD
            .decode(b64)
            .map_err(|_| TokenError::KeyFile(format!("issuer key {s:?}: not valid base64")))?;
        Ok(IssuerKey(raw.try_into().map_err(|_| {
            TokenError::KeyFile(format!("issuer key {s:?}: must be 32 bytes"))
        })?))
    }
}

/// The issuer's signing key. `Debug` never shows the private half.
pub struct Issuer {
    seed: [u8; 32],
    pair: signature::Ed25519KeyPair,
}

impl fmt::Debug for Issuer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Issuer")
            .field("public", &self.public())
            .field("private", &"****")
            .finish()
    }
}

impl Issuer {
    pub fn generate() -> Issuer {
        let mut seed = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut seed);
        Issuer::from_seed(seed)
    }

    pub fn from_seed(seed: [u8; 32]) -> Issuer {
        let pair = signature::Ed25519KeyPair::from_seed_unchecked(&seed)
            .expect("any 32 bytes are an Ed25519 seed");
        Issuer { seed, pair }
    }

    pub fn public(&self) -> IssuerKey {
        IssuerKey(
            self.pair
                .public_key()
                .as_ref()
                .try_into()
                .expect("Ed25519 public keys are 32 bytes"),
        )
    }

    /// Ed25519 over [`SIG_CONTEXT`] `|| claims`.
    pub fn sign(&self, claims: &[u8]) -> [u8; 64] {
        self.sign_in(SIG_CONTEXT, claims)
    }

    /// Ed25519 over `context || bytes`: every signed thing has its own context, so that a
    /// signature on one kind of thing never passes for another.
    pub fn sign_in(&self, context: &[u8], bytes: &[u8]) -> [u8; 64] {
        let mut msg = Vec::with_capacity(context.len() + bytes.len());
        msg.extend_from_slice(context);
        msg.extend_from_slice(bytes);
        self.pair
            .sign(&msg)
            .as_ref()
            .try_into()
            .expect("Ed25519 signatures are 64 bytes")
    }

    /// The key file's text: the private seed and, as a comment, the public key.
    pub fn to_file_text(&self) -> String {
        format!(
            "# sallyport token issuer: secret, keep it 0600 and off the DMZ if you can; gateways need only the public key.\n# public: {}\nprivate ed25519/{}\n",
            self.public(),
            B64STD.encode(self.seed)
        )
    }

    /// Reads a key file written by [`Issuer::to_file_text`].
    pub fn from_file_text(text: &str) -> Result<Issuer, TokenError> {
        let line = text
            .lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix("private "))
            .ok_or_else(|| TokenError::KeyFile("no `private ed25519/…` line".into()))?;
        let key: IssuerKey = line.parse()?;
        Ok(Issuer::from_seed(key.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims() -> Claims {
        Claims {
            kind: Kind::Agent,
            id: "alice-laptop".into(),
            name: Some("alice".into()),
            groups: vec!["dev".into(), "dba".into()],
            routes: vec![],
            issued_at: 1_000,
            not_before: None,
            expires: Some(2_000),
            agent_key: agent_public_key(&[3; 32]),
            gateway_keys: vec![[7; 32]],
            deployment: Some("corp-prod".into()),
            issuer: [0; 32],
        }
    }

    #[test]
    fn a_minted_token_round_trips_and_verifies_with_its_issuer_only() {
        let issuer = Issuer::generate();
        let t = Token::mint(&issuer, claims()).unwrap();
        let s = t.expose();
        assert!(s.starts_with("sp2_") && is_v2(&s));
        let back: Token = s.parse().unwrap();
        assert_eq!(back.claims(), t.claims());
        assert_eq!(back.private_key(), t.private_key());
        back.signed().verify(&[issuer.public()]).unwrap();
        let other = Issuer::generate();
        assert!(matches!(
            back.signed().verify(&[other.public()]),
            Err(TokenError::BadSignature { .. })
        ));
        back.signed()
            .verify(&[other.public(), issuer.public()])
            .unwrap();
    }

    #[test]
    fn debug_and_display_never_show_the_secret() {
        let issuer = Issuer::generate();
        let t = Token::mint(&issuer, claims()).unwrap();
        let s = t.expose();
        for shown in [format!("{t:?}"), format!("{t}"), format!("{issuer:?}")] {
            assert!(!shown.contains(&s[4..20]), "{shown}");
            assert!(!shown.contains(&B64STD.encode(issuer.seed)), "{shown}");
        }
        assert!(format!("{t:?}").contains("alice-laptop"));
    }

    #[test]
    fn a_changed_byte_anywhere_in_the_claims_fails_the_signature() {
        let issuer = Issuer::generate();
        let t = Token::mint(&issuer, claims()).unwrap();
        let bytes = t.signed().bytes().to_vec();
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x01;
            if let Ok(sc) = SignedClaims::parse(&b, t.signed().signature()) {
                assert!(sc.verify(&[issuer.public()]).is_err(), "byte {i}");
            }
        }
    }

    #[test]
    fn a_damaged_token_string_is_refused_with_a_reason() {
        let issuer = Issuer::generate();
        let s = Token::mint(&issuer, claims()).unwrap().expose();
        assert!(matches!(
            "sp_x_y".parse::<Token>(),
            Err(TokenError::Malformed(_))
        ));
        assert!(matches!(
            s[..s.len() - 10].parse::<Token>(),
            Err(TokenError::Malformed(_))
        ));
        // A different secret under the same claims: its key does not match claim 9.
        let mut raw = B64.decode(&s[4..]).unwrap();
        raw[5] ^= 1;
        let forged = format!("sp2_{}", B64.encode(raw));
        assert!(matches!(
            forged.parse::<Token>(),
            Err(TokenError::KeyMismatch { .. })
        ));
    }

    #[test]
    fn claims_that_are_not_canonical_are_refused() {
        let c = claims().encode();
        // duplicated first claim
        let mut dup = c[..3 + 5].to_vec();
        dup.extend_from_slice(&c);
        assert!(Claims::decode(&dup).is_err());
        // trailing byte
        let mut t = c.clone();
        t.push(0);
        assert!(Claims::decode(&t).is_err());
        // unknown mandatory type at the end; an optional one is ignored
        let mut u = c.clone();
        put(&mut u, 0x40, b"x");
        assert!(Claims::decode(&u).is_err());
        let mut o = c.clone();
        put(&mut o, 0x81, b"x");
        assert_eq!(Claims::decode(&o).unwrap(), claims());
        // a low-order agent key
        let mut lo = claims();
        lo.agent_key = [0; 32];
        lo.agent_key[0] = 1;
        assert!(Claims::decode(&lo.encode()).is_err());
    }

    #[test]
    fn the_gateway_checks_kind_dates_deployment_and_its_own_key() {
        let c = claims();
        let gw = [7u8; 32];
        c.check(Kind::Agent, 1_500, Some("corp-prod"), &gw).unwrap();
        assert!(matches!(
            c.check(Kind::Connector, 1_500, None, &gw),
            Err(TokenError::WrongKind { .. })
        ));
        assert!(matches!(
            c.check(Kind::Agent, 2_000, None, &gw),
            Err(TokenError::Expired { .. })
        ));
        assert!(matches!(
            c.check(Kind::Agent, 1_500, Some("corp-staging"), &gw),
            Err(TokenError::WrongDeployment { .. })
        ));
        assert!(matches!(
            c.check(Kind::Agent, 1_500, None, &[8; 32]),
            Err(TokenError::NotForThisGateway { .. })
        ));
    }

    #[test]
    fn issuer_key_files_round_trip() {
        let i = Issuer::generate();
        let back = Issuer::from_file_text(&i.to_file_text()).unwrap();
        assert_eq!(back.public(), i.public());
        let k: IssuerKey = i.public().to_string().parse().unwrap();
        assert_eq!(k, i.public());
        assert!("x25519/AAAA".parse::<IssuerKey>().is_err());
    }

    #[test]
    fn the_agent_key_is_hkdf_of_the_secret_and_not_low_order() {
        let a = agent_private_key(&[1; 32]);
        assert_ne!(a, agent_private_key(&[2; 32]));
        assert_eq!(a, agent_private_key(&[1; 32]));
        assert!(!low_order(&agent_public_key(&[1; 32])));
    }
}
