//! Protocol version 2's handshake: Noise XK bound to the token, as pure functions (no socket, no
//! clock: the gateway's time is passed in).
//!
//! ```text
//! agent                                                              gateway
//!   msg1: 0x03 | key_id[4] | Noise(e, es)                          ->
//!                       <- msg2: 0x03 | Noise(e, ee; offer)   or 0x02 | text (a hint only)
//!   msg3: 0x03 | Noise(s, se; hello, padded to MSG3_PAYLOAD)       ->
//!                       <- sealed verdict (VERDICT_LEN either way): OK + mode | ERR status text
//!   then the tunnel session: sealed (mode `Sealed`) or plain over the outer TLS (`Outer`)
//! ```
//!
//! - `Noise_XK_25519_AESGCM_SHA256`, prologue `"sallyport v2 " || role || key_id`. The agent
//!   knows the gateway's static key from its token; its own static key (derived from the token's
//!   secret, see [`crate::token`]) travels only in msg3, encrypted under both ephemerals: a
//!   middlebox learns neither secret nor identity, and a later theft of the gateway's key does
//!   not reveal who connected.
//! - `key_id` (first 4 bytes of SHA-256 of the gateway key used) is in clear so the gateway picks
//!   its key without trial decryption; it is in the prologue, so changing it fails the handshake.
//! - The offer (msg2) says which outer TLS keys the agent may legitimately see and whether the
//!   gateway can bind to the TLS session (it terminates TLS itself). It is authenticated by `es`.
//! - msg1 may carry the HTTP fallback's request key (readable only with the gateway key; the
//!   fallback is always sealed, so a thief of that key who recorded msg1 could at most disturb
//!   that session's requests, never read or inject data). msg3 carries the signed claims and
//!   the TLS binding the agent saw. Its payload is always [`MSG3_PAYLOAD`] bytes and the verdict always
//!   [`VERDICT_LEN`], so sizes link no session to a user and tell nobody whether a token was
//!   refused.
//!
//! Everything before msg2 authenticates (a `0x02` refusal, an HTTP status) may be forged by
//! whoever is on the path: callers use it for backoff and messages only.

use crate::inner::{Cipher, InnerError, KeyPair, Opener, Sealer};
use crate::token::{SignedClaims, Token, MAX_CLAIMS};
use bytes::Bytes;
use sha2::{Digest, Sha256};

/// The Noise protocol of version 2.
pub const NOISE: &str = "Noise_XK_25519_AESGCM_SHA256";
/// Tag of a version 2 handshake message (version 1's inner channel uses 0x01).
pub const TAG: u8 = 0x03;
/// Tag of a plain-text refusal (unauthenticated).
pub const TAG_REFUSED: u8 = 0x02;
/// The plain text of msg3, always this long.
pub const MSG3_PAYLOAD: usize = 2304;
/// The plain text of the verdict, always this long.
pub const VERDICT_LEN: usize = 256;
/// Label of the TLS exporter (RFC 8446 §7.5) both ends compute to bind the session to the TLS
/// connection it rides (unregistered labels begin `EXPERIMENTAL-`, RFC 5705 §4). Both ends
/// compute it only on TLS 1.3 and with no context.
pub const EXPORTER_LABEL: &[u8] = b"EXPERIMENTAL-sallyport-v2";
/// Largest msg1 and msg2 (a fallback create body is capped well above these).
pub const MAX_MSG1: usize = 5 + 32 + 32 + 16;
const FIXED3: usize = 32 + 32 + 64 + 2;

fn params() -> snow::params::NoiseParams {
    NOISE.parse().expect("valid Noise protocol name")
}

/// Who runs the handshake (in the prologue: an agent cannot pass for a connector).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Agent,
    Connector,
}

fn prologue(role: Role, key_id: &[u8; 4]) -> Vec<u8> {
    let mut p = b"sallyport v2 ".to_vec();
    p.extend_from_slice(match role {
        Role::Agent => b"agent",
        Role::Connector => b"connector",
    });
    p.extend_from_slice(key_id);
    p
}

/// The first 4 bytes of SHA-256 of a gateway static key.
pub fn key_id(key: &[u8; 32]) -> [u8; 4] {
    let h = Sha256::digest(key);
    [h[0], h[1], h[2], h[3]]
}

/// SHA-256 of a certificate's SubjectPublicKeyInfo: how outer TLS keys are named.
pub type TlsKey = [u8; 32];

/// What the gateway offers in msg2.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Offer {
    /// The gateway terminates TLS itself: a TLS exporter value can bind the session.
    pub exporter: bool,
    /// The admin trusts the front load balancer (`trust_lb`): its keys (in `tls_keys`) qualify
    /// for mode `Outer` without an exporter binding.
    pub trust_lb: bool,
    /// The gateway's clock (Unix seconds), for the agent's messages about expiry.
    pub time: u64,
    /// Outer TLS keys an agent may legitimately see (the gateway's, its load balancer's).
    pub tls_keys: Vec<TlsKey>,
}

impl Offer {
    fn encode(&self) -> Vec<u8> {
        let mut b = vec![2u8, self.exporter as u8 | (self.trust_lb as u8) << 1];
        b.extend_from_slice(&self.time.to_be_bytes());
        let n = self.tls_keys.len().min(16);
        b.push(n as u8);
        for k in &self.tls_keys[..n] {
            b.extend_from_slice(k);
        }
        b
    }

    fn decode(b: &[u8]) -> Result<Offer, InnerError> {
        let bad = || InnerError::Protocol("malformed offer in the gateway's answer".into());
        if b.len() < 11 || b[0] != 2 {
            return Err(bad());
        }
        let n = b[10] as usize;
        if b.len() != 11 + 32 * n {
            return Err(bad());
        }
        Ok(Offer {
            exporter: b[1] & 1 != 0,
            trust_lb: b[1] & 2 != 0,
            time: u64::from_be_bytes(b[2..10].try_into().expect("8 bytes")),
            tls_keys: b[11..]
                .chunks(32)
                .map(|k| k.try_into().expect("32"))
                .collect(),
        })
    }
}

/// What the agent saw of the outer TLS, sent in msg3.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Binding {
    /// The TLS exporter value ([`EXPORTER_LABEL`], 32 bytes) of the agent's TLS connection.
    pub exporter: Option<[u8; 32]>,
    /// The key of the certificate it saw.
    pub seen: Option<TlsKey>,
}

/// How the session's frames travel after the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Inside Noise, whatever the outer TLS is.
    Sealed,
    /// Plain over the outer TLS, which is proven to end at the gateway (or at a trusted LB).
    Outer,
}

/// The mode the rule allows (both ends apply it): `Outer` only when the agent's TLS exporter
/// equals the gateway's own (same TLS connection end to end), or, on a connection the gateway
/// does not terminate itself, when the admin trusts the load balancer and the key the agent saw
/// is one of its listed keys. (Where the gateway terminates TLS there is no balancer to trust:
/// a holder of a copy of a listed key, such as an appliance loaded with the server key, must
/// not qualify.)
pub fn choose_mode(offer: &Offer, gateway_exporter: Option<&[u8; 32]>, agent: &Binding) -> Mode {
    let bound = matches!((gateway_exporter, &agent.exporter), (Some(g), Some(a)) if g == a);
    let trusted_lb = gateway_exporter.is_none()
        && !offer.exporter
        && offer.trust_lb
        && agent.seen.is_some_and(|k| offer.tls_keys.contains(&k));
    if bound || trusted_lb {
        Mode::Outer
    } else {
        Mode::Sealed
    }
}

/// The agent's half of [`choose_mode`]: it cannot see the gateway's exporter value, so it
/// accepts `Outer` (from an authenticated verdict) only when it has an exporter value of its own
/// TLS connection and the gateway can bind to its TLS, or when the gateway trusts its load
/// balancer and the key seen is one of the listed ones.
pub fn agent_allows_outer(offer: &Offer, agent: &Binding) -> bool {
    if offer.exporter {
        agent.exporter.is_some()
    } else {
        offer.trust_lb && agent.seen.is_some_and(|k| offer.tls_keys.contains(&k))
    }
}

fn hs_err(e: snow::Error) -> InnerError {
    InnerError::Handshake(e.to_string())
}

/// The agent's side, before msg2.
pub struct Initiator {
    hs: snow::HandshakeState,
}

impl Initiator {
    /// Starts a handshake with the gateway key `gateway` (one of the token's); returns msg1.
    /// `payload` (at most 32 bytes: the HTTP fallback's request key, or nothing) is readable
    /// only by the holder of the gateway key.
    pub fn start(
        token: &Token,
        role: Role,
        gateway: &[u8; 32],
        payload: &[u8],
    ) -> Result<(Initiator, Bytes), InnerError> {
        if payload.len() > 32 {
            return Err(InnerError::Protocol("msg1 payload over 32 bytes".into()));
        }
        let id = key_id(gateway);
        let private = token.private_key();
        let prologue = prologue(role, &id);
        let hs = snow::Builder::new(params())
            .prologue(&prologue)
            .and_then(|b| b.local_private_key(&private))
            .and_then(|b| b.remote_public_key(gateway))
            .and_then(|b| b.build_initiator())
            .map_err(hs_err)?;
        let mut hs = hs;
        let mut buf = vec![0u8; MAX_MSG1];
        buf[0] = TAG;
        buf[1..5].copy_from_slice(&id);
        let n = hs.write_message(payload, &mut buf[5..]).map_err(hs_err)?;
        buf.truncate(5 + n);
        Ok((Initiator { hs }, Bytes::from(buf)))
    }

    /// Reads msg2: the gateway proved it holds the key; returns its offer.
    pub fn read2(mut self, msg2: &[u8]) -> Result<(Initiator2, Offer), InnerError> {
        match msg2.split_first() {
            Some((&TAG, msg)) => {
                let mut payload = vec![0u8; msg.len()];
                let n = self.hs.read_message(msg, &mut payload).map_err(|_| {
                    InnerError::Handshake(
                        "the answer was not made with the gateway key in the token (a middlebox answered, or the gateway's key changed)".into(),
                    )
                })?;
                let offer = Offer::decode(&payload[..n])?;
                Ok((Initiator2 { hs: self.hs }, offer))
            }
            Some((&TAG_REFUSED, text)) => Err(crate::inner::read_refusal(
                String::from_utf8_lossy(&text[..text.len().min(300)]).into_owned(),
            )),
            _ => Err(InnerError::Handshake(
                "the answer is not a version 2 handshake message (a proxy, or a gateway that speaks protocol v1 only?)".into(),
            )),
        }
    }
}

/// The agent's side after msg2.
pub struct Initiator2 {
    hs: snow::HandshakeState,
}

impl Initiator2 {
    /// msg3: the agent's identity and claims, and its view of the TLS. After
    /// sending it, the agent reads the verdict with [`open_verdict`] on the returned cipher.
    pub fn finish(
        mut self,
        token: &Token,
        binding: &Binding,
    ) -> Result<(Cipher, Bytes), InnerError> {
        let signed = token.signed();
        let payload = encode_hello(signed, binding)?;
        let mut buf = vec![0u8; 1 + MSG3_PAYLOAD + 128];
        buf[0] = TAG;
        let n = self
            .hs
            .write_message(&payload, &mut buf[1..])
            .map_err(hs_err)?;
        buf.truncate(1 + n);
        Ok((Cipher::from_handshake(self.hs)?, Bytes::from(buf)))
    }
}

fn encode_hello(signed: &SignedClaims, binding: &Binding) -> Result<Vec<u8>, InnerError> {
    let claims = signed.bytes();
    if claims.len() > MAX_CLAIMS {
        return Err(InnerError::Protocol("claims too large".into()));
    }
    let mut p = Vec::with_capacity(MSG3_PAYLOAD);
    p.extend_from_slice(&binding.exporter.unwrap_or([0; 32]));
    p.extend_from_slice(&binding.seen.unwrap_or([0; 32]));
    p.extend_from_slice(signed.signature());
    p.extend_from_slice(&(claims.len() as u16).to_be_bytes());
    p.extend_from_slice(claims);
    p.resize(MSG3_PAYLOAD, 0);
    Ok(p)
}

/// What the gateway learns from msg3, authenticated: the agent's static key (proven by `se`)
/// and what it sent. The claims' signature and contents are not checked yet.
#[derive(Debug)]
pub struct Hello {
    /// The static key the agent proved it holds.
    pub remote_static: [u8; 32],
    pub signed: SignedClaims,
    pub binding: Binding,
}

fn decode_hello(remote_static: [u8; 32], p: &[u8]) -> Result<Hello, InnerError> {
    let bad = |s: &str| InnerError::Protocol(format!("malformed hello: {s}"));
    if p.len() != MSG3_PAYLOAD {
        return Err(bad("wrong length"));
    }
    let arr = |r: std::ops::Range<usize>| -> [u8; 32] { p[r].try_into().expect("32") };
    let opt = |a: [u8; 32]| (a != [0; 32]).then_some(a);
    let binding = Binding {
        exporter: opt(arr(0..32)),
        seen: opt(arr(32..64)),
    };
    let sig = &p[64..128];
    let n = u16::from_be_bytes([p[128], p[129]]) as usize;
    if n > MAX_CLAIMS || FIXED3 + n > p.len() {
        return Err(bad("claims length"));
    }
    let signed = SignedClaims::parse(&p[FIXED3..FIXED3 + n], sig)
        .map_err(|e| InnerError::Protocol(e.to_string()))?;
    Ok(Hello {
        remote_static,
        signed,
        binding,
    })
}

/// The gateway's side, after msg1.
pub struct Responder {
    hs: snow::HandshakeState,
    key: [u8; 32],
    payload: Vec<u8>,
}

impl Responder {
    /// Reads msg1 with whichever of `keys` its key id names, and answers msg2 with `offer`.
    /// Costs one key generation and two X25519 operations: callers count it against the
    /// client's handshake budget first.
    pub fn read1(
        keys: &[&KeyPair],
        role: Role,
        msg1: &[u8],
        offer: &Offer,
    ) -> Result<(Responder, Bytes), InnerError> {
        if msg1.len() < 5 || msg1.len() > MAX_MSG1 || msg1[0] != TAG {
            return Err(InnerError::Handshake(
                "the first message is not a version 2 hello".into(),
            ));
        }
        let id: [u8; 4] = msg1[1..5].try_into().expect("4 bytes");
        let key = keys
            .iter()
            .find(|k| key_id(&k.public().0) == id)
            .ok_or_else(|| {
                InnerError::Handshake(
                    "the hello is for a gateway key this gateway does not hold (a token for another gateway or deployment?)".into(),
                )
            })?;
        let prologue = prologue(role, &id);
        let mut hs = snow::Builder::new(params())
            .prologue(&prologue)
            .and_then(|b| b.local_private_key(key.private()))
            .and_then(|b| b.build_responder())
            .map_err(hs_err)?;
        let mut scratch = [0u8; MAX_MSG1];
        let got = hs.read_message(&msg1[5..], &mut scratch).map_err(|_| {
            InnerError::Handshake("the hello does not decrypt with this gateway's key".into())
        })?;
        let mut buf = vec![0u8; 1 + 96 + 32 * 17 + 64];
        buf[0] = TAG;
        let n = hs
            .write_message(&offer.encode(), &mut buf[1..])
            .map_err(hs_err)?;
        buf.truncate(1 + n);
        Ok((
            Responder {
                hs,
                key: key.public().0,
                payload: scratch[..got].to_vec(),
            },
            Bytes::from(buf),
        ))
    }

    /// The gateway key this handshake uses (the token must list it).
    pub fn key(&self) -> &[u8; 32] {
        &self.key
    }

    /// What msg1 carried (the HTTP fallback's request key, or nothing).
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }

    /// Reads msg3: the agent proved its static key. The caller checks the claims, then
    /// answers with [`seal_verdict`].
    pub fn read3(mut self, msg3: &[u8]) -> Result<(Cipher, Hello), InnerError> {
        let msg = match msg3.split_first() {
            Some((&TAG, msg)) => msg,
            _ => {
                return Err(InnerError::Handshake(
                    "the third message is not a version 2 handshake message".into(),
                ))
            }
        };
        let mut payload = vec![0u8; msg.len()];
        let n = self
            .hs
            .read_message(msg, &mut payload)
            .map_err(|_| InnerError::Tampered)?;
        let remote: [u8; 32] = self
            .hs
            .get_remote_static()
            .and_then(|k| k.try_into().ok())
            .ok_or_else(|| InnerError::Handshake("no static key in msg3".into()))?;
        let hello = decode_hello(remote, &payload[..n])?;
        Ok((Cipher::from_handshake(self.hs)?, hello))
    }
}

/// The gateway's verdict, as sealed plain text of [`VERDICT_LEN`] bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Ok(Mode),
    Refused { status: u16, text: String },
}

/// Seals the verdict (the first message under the session keys).
pub fn seal_verdict(sealer: &mut Sealer, v: &Verdict) -> Result<Bytes, InnerError> {
    let mut p = Vec::with_capacity(VERDICT_LEN);
    match v {
        Verdict::Ok(mode) => {
            p.push(0);
            p.push(match mode {
                Mode::Sealed => 0,
                Mode::Outer => 1,
            });
        }
        Verdict::Refused { status, text } => {
            p.push(1);
            p.extend_from_slice(&status.to_be_bytes());
            let mut t = text.trim();
            while t.len() > VERDICT_LEN - 4 {
                let mut cut = VERDICT_LEN - 4;
                while !t.is_char_boundary(cut) {
                    cut -= 1;
                }
                t = &t[..cut];
            }
            p.push(t.len() as u8);
            p.extend_from_slice(t.as_bytes());
        }
    }
    p.resize(VERDICT_LEN, 0);
    sealer.seal(&p)
}

/// Opens the gateway's verdict: the mode, or its (authenticated) refusal.
pub fn open_verdict(opener: &mut Opener, msg: &[u8]) -> Result<Verdict, InnerError> {
    let p = opener.open(msg)?;
    if p.len() != VERDICT_LEN {
        return Err(InnerError::Protocol("verdict of the wrong size".into()));
    }
    match p[0] {
        0 => match p[1] {
            0 => Ok(Verdict::Ok(Mode::Sealed)),
            1 => Ok(Verdict::Ok(Mode::Outer)),
            _ => Err(InnerError::Protocol("unknown mode in the verdict".into())),
        },
        1 => {
            let status = u16::from_be_bytes([p[1], p[2]]);
            let n = (p[3] as usize).min(VERDICT_LEN - 4);
            Ok(Verdict::Refused {
                status,
                text: String::from_utf8_lossy(&p[4..4 + n]).into_owned(),
            })
        }
        _ => Err(InnerError::Protocol("unknown verdict".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::{Claims, Issuer, Kind};

    fn token(issuer: &Issuer, gw: &KeyPair) -> Token {
        Token::mint(
            issuer,
            Claims {
                kind: Kind::Agent,
                id: "alice".into(),
                name: None,
                groups: vec![],
                routes: vec![],
                issued_at: 1,
                not_before: None,
                expires: Some(u64::MAX),
                agent_key: [0; 32],
                gateway_keys: vec![gw.public().0],
                deployment: None,
                issuer: [0; 32],
            },
        )
        .unwrap()
    }

    fn offer() -> Offer {
        Offer {
            exporter: true,
            trust_lb: false,
            time: 42,
            tls_keys: vec![[9; 32]],
        }
    }

    /// Runs a whole handshake; returns both ciphers and what the gateway learnt.
    fn run(t: &Token, gw: &KeyPair) -> ((Cipher, Cipher), Hello, Offer) {
        let (init, m1) = Initiator::start(t, Role::Agent, &gw.public().0, &[7; 32]).unwrap();
        let (resp, m2) = Responder::read1(&[gw], Role::Agent, &m1, &offer()).unwrap();
        let (init2, got) = init.read2(&m2).unwrap();
        let b = Binding {
            exporter: Some([5; 32]),
            seen: Some([9; 32]),
        };
        assert_eq!(resp.payload(), &[7; 32], "msg1 carries the request key");
        let (ca, m3) = init2.finish(t, &b).unwrap();
        let (cg, hello) = resp.read3(&m3).unwrap();
        ((ca, cg), hello, got)
    }

    #[test]
    fn a_handshake_proves_both_keys_and_carries_request_key_claims_and_binding() {
        let (issuer, gw) = (Issuer::generate(), KeyPair::generate());
        let t = token(&issuer, &gw);
        let ((ca, cg), hello, got) = run(&t, &gw);
        assert_eq!(got, offer());
        assert_eq!(hello.remote_static, t.claims().agent_key);
        assert_eq!(hello.signed.claims(), t.claims());
        hello.signed.verify(&[issuer.public()]).unwrap();
        assert_eq!(hello.binding.exporter, Some([5; 32]));
        let (mut gseal, _) = cg.split();
        let (_, mut aopen) = ca.split();
        let v = seal_verdict(&mut gseal, &Verdict::Ok(Mode::Outer)).unwrap();
        assert_eq!(
            open_verdict(&mut aopen, &v).unwrap(),
            Verdict::Ok(Mode::Outer)
        );
    }

    #[test]
    fn msg3_and_the_verdict_have_one_size_whoever_connects_and_whatever_the_answer() {
        let (issuer, gw) = (Issuer::generate(), KeyPair::generate());
        let small = token(&issuer, &gw);
        let mut c = small.claims().clone();
        c.groups = (0..40).map(|i| format!("group-{i}")).collect();
        let big = Token::mint(&issuer, c).unwrap();
        let size3 = |t: &Token| {
            let (init, m1) = Initiator::start(t, Role::Agent, &gw.public().0, &[7; 32]).unwrap();
            let (_, m2) = Responder::read1(&[&gw], Role::Agent, &m1, &offer()).unwrap();
            let (i2, _) = init.read2(&m2).unwrap();
            i2.finish(t, &Binding::default()).unwrap().1.len()
        };
        assert_eq!(size3(&small), size3(&big));
        let ((_, cg), _, _) = run(&small, &gw);
        let (mut s, _) = cg.split();
        let ok = seal_verdict(&mut s, &Verdict::Ok(Mode::Sealed)).unwrap();
        let no = seal_verdict(
            &mut s,
            &Verdict::Refused {
                status: 401,
                text: "token revoked".into(),
            },
        )
        .unwrap();
        assert_eq!(ok.len(), no.len());
    }

    /// A proxy records a whole handshake and plays the agent's messages to the gateway again:
    /// msg3 is bound to the gateway's fresh ephemeral, so the replay gets nothing.
    #[test]
    fn a_replayed_handshake_is_refused() {
        let (issuer, gw) = (Issuer::generate(), KeyPair::generate());
        let t = token(&issuer, &gw);
        let (init, m1) = Initiator::start(&t, Role::Agent, &gw.public().0, &[]).unwrap();
        let (resp, m2) = Responder::read1(&[&gw], Role::Agent, &m1, &offer()).unwrap();
        let (i2, _) = init.read2(&m2).unwrap();
        let (_, m3) = i2.finish(&t, &Binding::default()).unwrap();
        resp.read3(&m3).unwrap();
        // The replay: the same msg1 (answered: it is anonymous), then the same msg3.
        let (resp2, _) = Responder::read1(&[&gw], Role::Agent, &m1, &offer()).unwrap();
        assert!(resp2.read3(&m3).is_err());
    }

    #[test]
    fn an_answer_from_anyone_but_the_tokens_gateway_key_is_refused() {
        let (issuer, gw, mitm) = (Issuer::generate(), KeyPair::generate(), KeyPair::generate());
        let t = token(&issuer, &gw);
        let (init, m1) = Initiator::start(&t, Role::Agent, &gw.public().0, &[]).unwrap();
        // The middlebox does not hold gw's key: it cannot even read msg1...
        assert!(Responder::read1(&[&mitm], Role::Agent, &m1, &offer()).is_err());
        // ...and an answer made with its own key does not pass for the gateway's.
        let mut forged = m1.to_vec();
        forged[1..5].copy_from_slice(&key_id(&mitm.public().0));
        let (init_m, m1m) = Initiator::start(&t, Role::Agent, &mitm.public().0, &[]).unwrap();
        drop(init_m);
        let (_, m2m) = Responder::read1(&[&mitm], Role::Agent, &m1m, &offer()).unwrap();
        assert!(init.read2(&m2m).is_err());
    }

    #[test]
    fn a_changed_byte_in_any_message_fails_the_handshake() {
        let (issuer, gw) = (Issuer::generate(), KeyPair::generate());
        let t = token(&issuer, &gw);
        for (which, at) in [(1, 1), (1, 20), (2, 10), (3, 40), (3, 2000)] {
            let (init, mut m1) = Initiator::start(&t, Role::Agent, &gw.public().0, &[]).unwrap();
            if which == 1 {
                let mut v = m1.to_vec();
                v[at] ^= 1;
                m1 = v.into();
                assert!(Responder::read1(&[&gw], Role::Agent, &m1, &offer()).is_err());
                continue;
            }
            let (resp, mut m2) = Responder::read1(&[&gw], Role::Agent, &m1, &offer()).unwrap();
            if which == 2 {
                let mut v = m2.to_vec();
                v[at] ^= 1;
                m2 = v.into();
                assert!(init.read2(&m2).is_err());
                continue;
            }
            let (i2, _) = init.read2(&m2).unwrap();
            let (_, m3) = i2.finish(&t, &Binding::default()).unwrap();
            let mut v = m3.to_vec();
            v[at] ^= 1;
            assert!(resp.read3(&v).is_err());
        }
    }

    #[test]
    fn an_agent_hello_does_not_pass_as_a_connector() {
        let (issuer, gw) = (Issuer::generate(), KeyPair::generate());
        let t = token(&issuer, &gw);
        let (_, m1) = Initiator::start(&t, Role::Agent, &gw.public().0, &[]).unwrap();
        // The prologues differ: a connector endpoint cannot even read an agent's msg1.
        assert!(Responder::read1(&[&gw], Role::Connector, &m1, &offer()).is_err());
    }

    #[test]
    fn outer_mode_needs_the_same_tls_connection_or_a_trusted_balancer_key() {
        let o = offer();
        let mine = Binding {
            exporter: Some([1; 32]),
            seen: Some([9; 32]),
        };
        assert_eq!(choose_mode(&o, Some(&[1; 32]), &mine), Mode::Outer);
        // A TLS-inspecting proxy: two TLS connections, two exporter values.
        assert_eq!(choose_mode(&o, Some(&[2; 32]), &mine), Mode::Sealed);
        // Behind a load balancer (no exporter at the gateway): only with trust_lb.
        assert_eq!(choose_mode(&o, None, &mine), Mode::Sealed);
        let lb = Offer {
            trust_lb: true,
            exporter: false,
            ..o.clone()
        };
        assert_eq!(choose_mode(&lb, None, &mine), Mode::Outer);
        let other = Binding {
            exporter: None,
            seen: Some([8; 32]),
        };
        assert_eq!(choose_mode(&lb, None, &other), Mode::Sealed);
    }

    /// An inspection appliance loaded with a copy of the gateway's own certificate key: with
    /// `trust_lb` set and that key listed, it used to qualify for outer mode on a connection the
    /// gateway terminates itself (its exporter value differs).
    #[test]
    fn a_copy_of_a_listed_tls_key_does_not_unseal_a_connection_the_gateway_terminates() {
        let o = Offer {
            exporter: true,
            trust_lb: true,
            time: 0,
            tls_keys: vec![[9; 32]],
        };
        let appliance = Binding {
            exporter: Some([3; 32]),
            seen: Some([9; 32]),
        };
        assert_eq!(choose_mode(&o, Some(&[4; 32]), &appliance), Mode::Sealed);
        assert!(
            agent_allows_outer(&o, &appliance),
            "the agent trusts the gateway's check"
        );
        let no_exporter = Binding {
            exporter: None,
            seen: Some([9; 32]),
        };
        assert!(!agent_allows_outer(&o, &no_exporter));
        // The same appliance over TLS 1.2 (no exporter on either side): the gateway still
        // terminates it (the offer says so), so it is not a trusted balancer's connection.
        assert_eq!(choose_mode(&o, None, &no_exporter), Mode::Sealed);
    }
}
