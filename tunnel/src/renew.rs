//! Token renewal (docs/protocol.md, "Renewal"): the three messages an agent and the issuer
//! exchange over an ordinary stream to [`HOST`]:[`PORT`], and what each side checks. Pure code
//! (no clock: `now` is passed in) but for [`read_message`]; the agent (`agent/src/renew.rs`) and
//! the issuer (`gateway/src/connector/issuer.rs`) carry the bytes.
//!
//! ```text
//! every message: len:u16 | body (len ≤ MAX_MSG)
//! 1 issuer → agent   "SPR1" | E:[32] | sig:[64]          sig by the renewal key over CHALLENGE_CONTEXT || E
//! 2 agent  → issuer  "SPQ1" | new_pub:[32] | claims_len:u16 | claims | issuer_sig:[64] | mac:[32]
//! 3 issuer → agent   "SPA1" | 0 | claims_len:u16 | claims | sig:[64]     renewed
//!                    "SPA1" | 1 | len:u8 | reason (UTF-8)               refused
//! ```
//!
//! `mac = HMAC-SHA256(HKDF-SHA256(X25519(agent key, E), info = MAC_INFO), MAC_CONTEXT || E ||
//! new_pub || claims)`: only the holder of the current secret can ask, a recorded request is
//! worthless against a fresh `E`, and nobody on the way (a DMZ) can swap `new_pub`.

use crate::inner::KeyPair;
use crate::token::{low_order, signed_by, Claims, Issuer, IssuerKey, Kind, SignedClaims, Token};
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The reserved destination of renewals: `.invalid` is never a real name (RFC 2606), and only a
/// route naming it exactly reaches it.
pub const HOST: &str = "issuer.sallyport.invalid";
pub const PORT: u16 = 1;
/// Largest message body either side reads.
pub const MAX_MSG: usize = 4096;
const CHALLENGE_CONTEXT: &[u8] = b"sallyport renew challenge v2\0";
const MAC_CONTEXT: &[u8] = b"sallyport renew v2\0";
const MAC_INFO: &[u8] = b"sallyport v2 renew";

/// What went wrong in an exchange (the text is for logs; callers decide on the variant).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RenewError {
    #[error("malformed renewal message: {0}")]
    Malformed(&'static str),
    #[error("the challenge is not signed by the renewal key this token names (claim 12)")]
    Challenge,
    #[error("the request's proof does not verify (not made with this token's secret)")]
    Proof,
    #[error("the answer is not a renewal of this token: {0}")]
    Answer(&'static str),
    #[error("the issuer refused: {0}")]
    Refused(String),
}

/// `body` framed: its length (u16) first.
pub fn frame(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + body.len());
    out.extend_from_slice(&(body.len() as u16).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// The first whole message body in `buf` and how many bytes it took, `None` while more is
/// needed; a length above [`MAX_MSG`] is an error before anything is buffered.
pub fn unframe(buf: &[u8]) -> Result<Option<(&[u8], usize)>, RenewError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let n = u16::from_be_bytes([buf[0], buf[1]]) as usize;
    if n > MAX_MSG {
        return Err(RenewError::Malformed("a message longer than 4096 bytes"));
    }
    Ok(buf.get(2..2 + n).map(|b| (b, 2 + n)))
}

/// Reads one framed message (at most [`MAX_MSG`] bytes: a longer length is refused before it
/// is buffered).
pub async fn read_message<R: tokio::io::AsyncRead + Unpin>(r: &mut R) -> Result<Vec<u8>, String> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        if let Some((body, _)) = unframe(&buf).map_err(|e| e.to_string())? {
            return Ok(body.to_vec());
        }
        let n = r
            .read(&mut chunk)
            .await
            .map_err(|e| format!("stream: {e}"))?;
        if n == 0 {
            return Err("the stream ended mid-message".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Message 1: the issuer's fresh ephemeral key, signed by the renewal key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    pub e: [u8; 32],
    pub sig: [u8; 64],
}

impl Challenge {
    pub fn new(renewer: &Issuer, e: &KeyPair) -> Challenge {
        let e = e.public().0;
        Challenge {
            e,
            sig: renewer.sign_in(CHALLENGE_CONTEXT, &e),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        [&b"SPR1"[..], &self.e, &self.sig].concat()
    }

    pub fn decode(b: &[u8]) -> Result<Challenge, RenewError> {
        let rest = b
            .strip_prefix(b"SPR1")
            .ok_or(RenewError::Malformed("not a challenge"))?;
        if rest.len() != 96 {
            return Err(RenewError::Malformed("a challenge is 100 bytes"));
        }
        Ok(Challenge {
            e: rest[..32].try_into().expect("32"),
            sig: rest[32..].try_into().expect("64"),
        })
    }

    /// Signed by the key the token pins, and not a low-order point.
    pub fn verify(&self, pinned: &IssuerKey) -> Result<(), RenewError> {
        if low_order(&self.e)
            || !signed_by(
                std::slice::from_ref(pinned),
                CHALLENGE_CONTEXT,
                &self.e,
                &self.sig,
            )
        {
            return Err(RenewError::Challenge);
        }
        Ok(())
    }
}

fn mac(shared: &[u8; 32], e: &[u8; 32], new_pub: &[u8; 32], claims: &[u8]) -> Hmac<Sha256> {
    struct Len32;
    impl ring::hkdf::KeyType for Len32 {
        fn len(&self) -> usize {
            32
        }
    }
    let mut key = [0u8; 32];
    ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, &[])
        .extract(shared)
        .expand(&[MAC_INFO], Len32)
        .expect("32 bytes is a valid HKDF-SHA256 length")
        .fill(&mut key)
        .expect("32 bytes");
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&key).expect("any key length");
    m.update(MAC_CONTEXT);
    m.update(e);
    m.update(new_pub);
    m.update(claims);
    m
}

/// Message 2: the agent's new public key, its current signed claims, and the proof.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub new_pub: [u8; 32],
    pub signed: SignedClaims,
    pub mac: [u8; 32],
}

impl Request {
    /// The request of `token`'s holder for the key of `new_secret`, answering `challenge`.
    pub fn new(token: &Token, new_secret: &[u8; 32], challenge: &Challenge) -> Request {
        let new_pub = crate::token::agent_public_key(new_secret);
        let me = KeyPair::from_private(crate::token::agent_private_key(token.secret()));
        let shared = me.agree(&challenge.e);
        Request {
            new_pub,
            mac: mac(&shared, &challenge.e, &new_pub, token.signed().bytes())
                .finalize()
                .into_bytes()
                .into(),
            signed: token.signed().clone(),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let c = self.signed.bytes();
        [
            &b"SPQ1"[..],
            &self.new_pub,
            &(c.len() as u16).to_be_bytes(),
            c,
            self.signed.signature(),
            &self.mac,
        ]
        .concat()
    }

    pub fn decode(b: &[u8]) -> Result<Request, RenewError> {
        let rest = b
            .strip_prefix(b"SPQ1")
            .ok_or(RenewError::Malformed("not a request"))?;
        if rest.len() < 34 {
            return Err(RenewError::Malformed("a request cut short"));
        }
        let new_pub: [u8; 32] = rest[..32].try_into().expect("32");
        let n = u16::from_be_bytes([rest[32], rest[33]]) as usize;
        if rest.len() != 34 + n + 64 + 32 {
            return Err(RenewError::Malformed(
                "a request whose lengths do not add up",
            ));
        }
        let signed = SignedClaims::parse(&rest[34..34 + n], &rest[34 + n..34 + n + 64])
            .map_err(|_| RenewError::Malformed("claims that do not parse"))?;
        Ok(Request {
            new_pub,
            signed,
            mac: rest[34 + n + 64..].try_into().expect("32"),
        })
    }

    /// The issuer's check of the proof, with its ephemeral key `e` of message 1: the requester
    /// holds the secret of claim 9, and asked for `new_pub` (not low-order, not the old key).
    pub fn verify_proof(&self, e: &KeyPair) -> Result<(), RenewError> {
        let old = self.signed.claims().agent_key;
        if low_order(&self.new_pub) || low_order(&old) || self.new_pub == old {
            return Err(RenewError::Proof);
        }
        // Constant time (hmac's own comparison).
        mac(
            &e.agree(&old),
            &e.public().0,
            &self.new_pub,
            self.signed.bytes(),
        )
        .verify_slice(&self.mac)
        .map_err(|_| RenewError::Proof)
    }
}

/// Message 3.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Renewed(Box<SignedClaims>),
    Refused(String),
}

impl Answer {
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Answer::Renewed(s) => {
                let c = s.bytes();
                [
                    &b"SPA1\0"[..],
                    &(c.len() as u16).to_be_bytes(),
                    c,
                    s.signature(),
                ]
                .concat()
            }
            Answer::Refused(why) => {
                let mut t = why.as_bytes();
                while t.len() > 255 || std::str::from_utf8(t).is_err() {
                    t = &t[..t.len() - 1];
                }
                [&b"SPA1\x01"[..], &[t.len() as u8], t].concat()
            }
        }
    }

    pub fn decode(b: &[u8]) -> Result<Answer, RenewError> {
        let rest = b
            .strip_prefix(b"SPA1")
            .ok_or(RenewError::Malformed("not an answer"))?;
        match rest.split_first() {
            Some((0, r)) if r.len() >= 2 => {
                let n = u16::from_be_bytes([r[0], r[1]]) as usize;
                if r.len() != 2 + n + 64 {
                    return Err(RenewError::Malformed(
                        "an answer whose lengths do not add up",
                    ));
                }
                SignedClaims::parse(&r[2..2 + n], &r[2 + n..])
                    .map(|s| Answer::Renewed(Box::new(s)))
                    .map_err(|_| RenewError::Malformed("claims that do not parse"))
            }
            Some((1, r)) if !r.is_empty() && r.len() == 1 + r[0] as usize => {
                // Shown to the user: printable text only, whoever sent it.
                let text: String = String::from_utf8_lossy(&r[1..])
                    .chars()
                    .map(|c| if c.is_control() { '?' } else { c })
                    .collect();
                Ok(Answer::Refused(text))
            }
            _ => Err(RenewError::Malformed("an answer cut short")),
        }
    }
}

/// The agent's check of a renewed token: signed by the renewal key `old` pins (claim 12), the
/// same id, kind, deployment and renewal key, for the key of `new_secret`, expiring later.
pub fn accept(
    old: &Token,
    new_secret: [u8; 32],
    answer: SignedClaims,
) -> Result<Token, RenewError> {
    let (o, n) = (old.claims(), answer.claims());
    let pinned = IssuerKey(o.issuer);
    if !signed_by(
        std::slice::from_ref(&pinned),
        crate::token::SIG_CONTEXT,
        answer.bytes(),
        answer.signature(),
    ) {
        return Err(RenewError::Answer("not signed by the renewal key it names"));
    }
    if n.id != o.id || n.kind != o.kind || n.deployment != o.deployment || n.issuer != o.issuer {
        return Err(RenewError::Answer(
            "another id, kind, deployment or renewal key",
        ));
    }
    if n.expires.unwrap_or(0) <= o.expires.unwrap_or(0) {
        return Err(RenewError::Answer("it expires no later than the old one"));
    }
    Token::from_parts(new_secret, answer).map_err(|_| RenewError::Answer("for another key"))
}

/// Whether `claims` are due for renewal at `now` (Unix seconds): less than a third of their
/// lifetime left. The issuer refuses earlier than half (so a loop cannot churn it).
pub fn due(claims: &Claims, now: u64) -> bool {
    match claims.expires {
        Some(exp) if claims.kind == Kind::Agent => {
            let life = exp.saturating_sub(claims.issued_at);
            exp.saturating_sub(now) < life / 3
        }
        _ => false,
    }
}

/// When `claims` become due (see [`due`]), in Unix seconds; `None`: never (no expiry).
pub fn due_at(claims: &Claims) -> Option<u64> {
    let exp = claims.expires?;
    let life = exp.saturating_sub(claims.issued_at);
    Some(exp - life / 3)
}

/// The issuer's new claims for a verified request at `now`: the old ones with the new key,
/// issued now, for the old lifetime (at most `max_lifetime` seconds); `not before` dropped.
pub fn renewed_claims(old: &Claims, new_pub: [u8; 32], now: u64, max_lifetime: u64) -> Claims {
    let life = old
        .expires
        .unwrap_or(now)
        .saturating_sub(old.issued_at)
        .clamp(60, max_lifetime.max(60));
    Claims {
        agent_key: new_pub,
        issued_at: now,
        not_before: None,
        expires: Some(now + life),
        ..old.clone()
    }
}

/// Signs renewed claims with the renewal key.
pub fn sign(renewer: &Issuer, claims: &Claims) -> Result<SignedClaims, RenewError> {
    let bytes = claims.encode();
    if bytes.len() > crate::token::MAX_CLAIMS {
        return Err(RenewError::Malformed("claims too long"));
    }
    SignedClaims::parse(&bytes, &renewer.sign(&bytes))
        .map_err(|_| RenewError::Malformed("claims that do not parse"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(renewer: &Issuer) -> Token {
        let issuer = Issuer::generate();
        Token::mint(
            &issuer,
            Claims {
                kind: Kind::Agent,
                id: "alice-laptop".into(),
                name: Some("alice".into()),
                groups: vec!["dev".into()],
                routes: vec![],
                issued_at: 1_000,
                not_before: None,
                expires: Some(1_000 + 90 * 86_400),
                agent_key: [0; 32],
                gateway_keys: vec![[7; 32]],
                deployment: Some("corp".into()),
                issuer: renewer.public().0,
            },
        )
        .unwrap()
    }

    fn secret() -> [u8; 32] {
        let mut s = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut s);
        s
    }

    /// The whole exchange through the encoders, as the two ends run it.
    fn exchange(renewer: &Issuer, old: &Token, new_secret: [u8; 32]) -> Result<Token, RenewError> {
        let e = KeyPair::generate();
        let ch = Challenge::decode(&Challenge::new(renewer, &e).encode())?;
        ch.verify(&IssuerKey(old.claims().issuer))?;
        let req = Request::decode(&Request::new(old, &new_secret, &ch).encode())?;
        req.verify_proof(&e)?;
        let claims = renewed_claims(req.signed.claims(), req.new_pub, 60 * 86_400, 90 * 86_400);
        let answer = Answer::decode(&Answer::Renewed(Box::new(sign(renewer, &claims)?)).encode())?;
        match answer {
            Answer::Renewed(s) => accept(old, new_secret, *s),
            Answer::Refused(why) => Err(RenewError::Refused(why)),
        }
    }

    #[test]
    fn a_renewal_gives_a_token_for_the_desktop_made_key_with_the_same_identity() {
        let renewer = Issuer::generate();
        let old = token(&renewer);
        let s = secret();
        let new = exchange(&renewer, &old, s).unwrap();
        assert_eq!(new.claims().id, "alice-laptop");
        assert_eq!(new.claims().agent_key, crate::token::agent_public_key(&s));
        assert_eq!(new.claims().expires, Some(60 * 86_400 + 90 * 86_400));
        assert_eq!(new.claims().groups, old.claims().groups);
    }

    #[test]
    fn a_challenge_from_anyone_but_the_pinned_renewal_key_is_refused() {
        let renewer = Issuer::generate();
        let old = token(&renewer);
        let rogue = Issuer::generate();
        assert_eq!(
            exchange(&rogue, &old, secret()).unwrap_err(),
            RenewError::Challenge
        );
    }

    #[test]
    fn a_relay_that_swaps_the_new_key_fails_the_proof() {
        let renewer = Issuer::generate();
        let old = token(&renewer);
        let e = KeyPair::generate();
        let ch = Challenge::new(&renewer, &e);
        let mut req = Request::new(&old, &secret(), &ch);
        req.new_pub = crate::token::agent_public_key(&secret());
        assert_eq!(req.verify_proof(&e), Err(RenewError::Proof));
    }

    #[test]
    fn a_replayed_request_fails_against_a_fresh_challenge() {
        let renewer = Issuer::generate();
        let old = token(&renewer);
        let first = KeyPair::generate();
        let req = Request::new(&old, &secret(), &Challenge::new(&renewer, &first));
        assert!(req.verify_proof(&first).is_ok());
        assert_eq!(
            req.verify_proof(&KeyPair::generate()),
            Err(RenewError::Proof)
        );
    }

    #[test]
    fn a_request_without_the_secret_fails_the_proof() {
        let renewer = Issuer::generate();
        let old = token(&renewer);
        let thief = token(&renewer); // another secret, claims copied from the victim's
        let e = KeyPair::generate();
        let mut req = Request::new(&thief, &secret(), &Challenge::new(&renewer, &e));
        req.signed = old.signed().clone();
        assert_eq!(req.verify_proof(&e), Err(RenewError::Proof));
    }

    #[test]
    fn an_answer_for_another_id_or_an_earlier_expiry_is_refused() {
        let renewer = Issuer::generate();
        let old = token(&renewer);
        let s = secret();
        let pubk = crate::token::agent_public_key(&s);
        let mut c = renewed_claims(old.claims(), pubk, 60 * 86_400, 90 * 86_400);
        c.id = "mallory".into();
        assert!(accept(&old, s, sign(&renewer, &c).unwrap()).is_err());
        let short = renewed_claims(old.claims(), pubk, 1_000, 90 * 86_400);
        let mut short = short;
        short.expires = old.claims().expires;
        assert!(accept(&old, s, sign(&renewer, &short).unwrap()).is_err());
        let ok = renewed_claims(old.claims(), pubk, 60 * 86_400, 90 * 86_400);
        assert!(accept(&old, s, sign(&Issuer::generate(), &ok).unwrap()).is_err());
    }

    #[test]
    fn due_after_two_thirds_of_the_lifetime() {
        let renewer = Issuer::generate();
        let c = token(&renewer).claims().clone();
        assert!(!due(&c, 1_000 + 59 * 86_400));
        assert!(due(&c, 1_000 + 61 * 86_400));
        assert_eq!(due_at(&c), Some(1_000 + 60 * 86_400));
    }

    #[test]
    fn garbage_never_panics_and_long_frames_are_refused_before_buffering() {
        assert!(unframe(&[0xff, 0xff]).is_err());
        assert_eq!(unframe(&[0, 3, 1]).unwrap(), None);
        let renewer = Issuer::generate();
        let old = token(&renewer);
        let e = KeyPair::generate();
        let ch = Challenge::new(&renewer, &e);
        let req = Request::new(&old, &secret(), &ch).encode();
        let ans = Answer::Refused("nope\n\u{1b}[31m".into()).encode();
        for m in [ch.encode(), req, ans] {
            for cut in 0..m.len() {
                let _ = Challenge::decode(&m[..cut]);
                let _ = Request::decode(&m[..cut]);
                let _ = Answer::decode(&m[..cut]);
            }
        }
        assert_eq!(
            Answer::decode(&Answer::Refused("no\u{1b}[31m".into()).encode()).unwrap(),
            Answer::Refused("no?[31m".into())
        );
    }
}
