//! The inner channel: the tunnel session inside a Noise channel bound to the gateway's key.
//!
//! A TLS-inspecting corporate proxy terminates the agent's TLS and re-issues its requests: it
//! would read the bearer token and every tunnelled byte. The agent therefore knows the DMZ
//! gateway's *inner key* (an X25519 public key, written `x25519/<base64>`, pinned at enrollment or
//! configured) and, when the outer TLS is not proven to be the gateway's own, runs the session
//! inside this channel:
//!
//! ```text
//! agent                                            DMZ gateway (holds the inner key)
//!   HELLO  0x01 | Noise NK msg 1 (e, es; payload: request key) ->
//!                           <- 0x01 | Noise NK msg 2 (e, ee)        or 0x02 | "why" (plain text)
//!   AUTH   sealed("AUTH " token)                   ->
//!                           <- sealed("OK")  or  sealed("ERR <status> <text>")
//!   every tunnel frame, sealed, one carrier message each (both ways)
//! ```
//!
//! `Noise_NK_25519_AESGCM_SHA256`: only the holder of the inner key can complete the handshake,
//! so a proxy that re-signs TLS sees a public key exchange, then ciphertext; the token travels
//! after the handshake, forward-secret and bound to this exchange (a copy replayed elsewhere is
//! useless). A proxy that alters a byte breaks the AEAD tag: the session ends with
//! [`InnerError::Tampered`], never falls back to plaintext. The payload of message 1 carries a
//! random *request key* the HTTP transport uses to authenticate every request of the session
//! (see [`crate::http`]); message 1 is readable only by the gateway.
//!
//! Noise messages are at most 65,535 bytes, frames up to 64 KiB plus header: a carrier message
//! holds one or more sealed chunks, each `u16 length | ciphertext`. Nonces are implicit (both
//! carriers deliver in order, without loss), which is why this works with the stateless
//! transport state of `snow`, split between the session's reader and writer tasks.
//!
//! No sockets here: the handshake functions are pure, and [`InnerTransport`] wraps any
//! [`Transport`].

use crate::transport::{Transport, TransportError, TransportRx, TransportTx};
use base64::Engine;
use bytes::{BufMut, Bytes, BytesMut};
use snow::params::NoiseParams;
use snow::resolvers::{CryptoResolver, DefaultResolver};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// The Noise protocol name of the inner channel.
pub const NOISE: &str = "Noise_NK_25519_AESGCM_SHA256";
const PROLOGUE: &[u8] = b"sallyport inner channel v1";
/// Tag of a handshake message.
const TAG_NOISE: u8 = 0x01;
/// How a gateway's refusal of a hello for another key begins; the rest names its key, so the
/// agent can show both.
pub const KEY_MISMATCH: &str = "this gateway's inner key is";
/// Tag of a plain-text refusal (the gateway could not complete the handshake).
const TAG_REFUSED: u8 = 0x02;
/// Largest Noise message, and the AEAD tag inside it.
const NOISE_MAX: usize = 65_535;
const TAG_LEN: usize = 16;
const CHUNK_PLAIN: usize = NOISE_MAX - TAG_LEN;
/// Bytes a sealed message adds to `n` bytes of plain text (per chunk: length + tag).
pub fn overhead(n: usize) -> usize {
    n.div_ceil(CHUNK_PLAIN).max(1) * (2 + TAG_LEN)
}

fn params() -> NoiseParams {
    // A constant that parses: a failure here is a build-time bug, caught by every test.
    NOISE.parse().expect("valid Noise protocol name")
}

/// The gateway's inner public key, written `x25519/<base64>`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey(pub [u8; 32]);

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "x25519/{}",
            base64::engine::general_purpose::STANDARD.encode(self.0)
        )
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::str::FromStr for PublicKey {
    type Err = String;
    fn from_str(s: &str) -> Result<PublicKey, String> {
        let b64 = s.trim().strip_prefix("x25519/").ok_or_else(|| {
            format!("inner key {s:?} must look like x25519/<base64> (what `sallyport-gateway inner-key` prints)")
        })?;
        let raw = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|_| format!("inner key {s:?}: not valid base64"))?;
        let key: [u8; 32] = raw
            .try_into()
            .map_err(|_| format!("inner key {s:?}: must be 32 bytes"))?;
        Ok(PublicKey(key))
    }
}

/// The gateway's inner key pair. `Debug` never shows the private half.
#[derive(Clone)]
pub struct KeyPair {
    private: [u8; 32],
    public: PublicKey,
}

impl fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyPair")
            .field("public", &self.public)
            .field("private", &"****")
            .finish()
    }
}

impl KeyPair {
    /// A fresh random key pair.
    pub fn generate() -> KeyPair {
        let mut private = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut private);
        KeyPair::from_private(private)
    }

    /// The key pair of a private key.
    pub fn from_private(private: [u8; 32]) -> KeyPair {
        let mut dh = DefaultResolver
            .resolve_dh(&snow::params::DHChoice::Curve25519)
            .expect("the default resolver has X25519");
        dh.set(&private);
        let mut public = [0u8; 32];
        public.copy_from_slice(dh.pubkey());
        KeyPair {
            private,
            public: PublicKey(public),
        }
    }

    pub fn public(&self) -> PublicKey {
        self.public
    }

    /// X25519 of our private key and `their` public key.
    pub fn agree(&self, their: &[u8; 32]) -> [u8; 32] {
        let mut dh = DefaultResolver
            .resolve_dh(&snow::params::DHChoice::Curve25519)
            .expect("the default resolver has X25519");
        dh.set(&self.private);
        let mut out = [0u8; 32];
        // snow's X25519 never fails for 32-byte keys (low-order keys are refused by callers).
        let _ = dh.dh(their, &mut out);
        out
    }

    pub(crate) fn private(&self) -> &[u8; 32] {
        &self.private
    }

    /// The key file's text: the private key and, as a comment, the public one.
    pub fn to_file_text(&self) -> String {
        format!(
            "# sallyport gateway inner key: secret, keep it 0600; copy it to every DMZ instance.\n# public: {}\nprivate x25519/{}\n",
            self.public,
            base64::engine::general_purpose::STANDARD.encode(self.private)
        )
    }

    /// Reads a key file written by [`KeyPair::to_file_text`].
    pub fn from_file_text(text: &str) -> Result<KeyPair, String> {
        let line = text
            .lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix("private "))
            .ok_or("no `private x25519/…` line")?;
        let key: PublicKey = line.parse()?;
        Ok(KeyPair::from_private(key.0))
    }
}

/// Why the inner channel failed; says which side.
#[derive(Debug, Clone, thiserror::Error)]
pub enum InnerError {
    #[error("inner channel handshake failed: {0}")]
    Handshake(String),
    #[error("the gateway refused the inner handshake: {0}")]
    Refused(String),
    /// The gateway answered that its inner key is another one (its refusal names it).
    #[error("the gateway refused the inner handshake: {0}")]
    KeyMismatch(String),
    #[error(
        "inner channel: a message failed authentication — something on the way altered the data"
    )]
    Tampered,
    #[error("gateway refused the session with {status}: {text}")]
    Auth { status: u16, text: String },
    #[error("inner channel: {0}")]
    Protocol(String),
    #[error("inner channel: no answer within {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Transport(#[from] TransportError),
}

/// A gateway's refusal of the inner handshake, by kind: [`KEY_MISMATCH`] opens the refusal the
/// gateway sends when the agent's hello is for another key (the wire format of that refusal,
/// read here once, so callers match on the variant). Unauthenticated: a hint for the message
/// shown, never a reason to trust anything else.
pub fn read_refusal(text: String) -> InnerError {
    if text.starts_with(KEY_MISMATCH) {
        InnerError::KeyMismatch(text)
    } else {
        InnerError::Refused(text)
    }
}

/// The agent's half of a handshake in progress.
pub struct Initiator {
    hs: snow::HandshakeState,
}

impl Initiator {
    /// Starts a handshake with the gateway whose inner key is `gateway`; returns the first
    /// carrier message. `payload` (the HTTP request key) is readable only by the gateway.
    pub fn start(gateway: &PublicKey, payload: &[u8]) -> Result<(Initiator, Bytes), InnerError> {
        let hs_err = |e: snow::Error| InnerError::Handshake(e.to_string());
        let mut hs = snow::Builder::new(params())
            .prologue(PROLOGUE)
            .and_then(|b| b.remote_public_key(&gateway.0))
            .and_then(|b| b.build_initiator())
            .map_err(hs_err)?;
        let mut buf = vec![0u8; 1 + 256 + payload.len()];
        buf[0] = TAG_NOISE;
        let n = hs.write_message(payload, &mut buf[1..]).map_err(hs_err)?;
        buf.truncate(1 + n);
        Ok((Initiator { hs }, Bytes::from(buf)))
    }

    /// Completes the handshake with the gateway's answer.
    pub fn finish(mut self, reply: &[u8]) -> Result<Cipher, InnerError> {
        match reply.split_first() {
            Some((&TAG_NOISE, msg)) => {
                let mut payload = vec![0u8; msg.len()];
                self.hs.read_message(msg, &mut payload).map_err(|_| {
                    InnerError::Handshake(
                        "the gateway's answer does not match its pinned inner key".into(),
                    )
                })?;
                Cipher::from_handshake(self.hs)
            }
            Some((&TAG_REFUSED, text)) => Err(read_refusal(
                String::from_utf8_lossy(&text[..text.len().min(300)]).into_owned(),
            )),
            _ => Err(InnerError::Handshake(
                "the answer is not an inner-channel message (a proxy or an older gateway?)".into(),
            )),
        }
    }
}

/// The gateway's answer to a first message: the cipher, the agent's payload and the message to
/// send back.
pub struct Accepted {
    pub cipher: Cipher,
    pub payload: Vec<u8>,
    pub reply: Bytes,
}

/// Answers an agent's first message with `key`. On `Err`, send [`refusal`] back.
pub fn respond(key: &KeyPair, first: &[u8]) -> Result<Accepted, InnerError> {
    let hs_err = |e: snow::Error| InnerError::Handshake(e.to_string());
    let msg = match first.split_first() {
        Some((&TAG_NOISE, msg)) => msg,
        _ => {
            return Err(InnerError::Handshake(
                "the first message is not an inner-channel hello".into(),
            ))
        }
    };
    let mut hs = snow::Builder::new(params())
        .prologue(PROLOGUE)
        .and_then(|b| b.local_private_key(&key.private))
        .and_then(|b| b.build_responder())
        .map_err(hs_err)?;
    let mut payload = vec![0u8; msg.len()];
    let n = hs.read_message(msg, &mut payload).map_err(|_| {
        InnerError::Handshake(
            "the agent's hello is not for this gateway's inner key (pinned another key?)".into(),
        )
    })?;
    payload.truncate(n);
    let mut buf = vec![0u8; 1 + 256];
    buf[0] = TAG_NOISE;
    let n = hs.write_message(&[], &mut buf[1..]).map_err(hs_err)?;
    buf.truncate(1 + n);
    Ok(Accepted {
        cipher: Cipher::from_handshake(hs)?,
        payload,
        reply: Bytes::from(buf),
    })
}

/// A refusal message (plain text: nothing secret is in it).
pub fn refusal(text: &str) -> Bytes {
    let mut b = Vec::with_capacity(1 + text.len());
    b.push(TAG_REFUSED);
    b.extend_from_slice(text.as_bytes());
    Bytes::from(b)
}

/// The transport keys of a completed handshake.
pub struct Cipher {
    state: Arc<snow::StatelessTransportState>,
}

impl Cipher {
    pub(crate) fn from_handshake(hs: snow::HandshakeState) -> Result<Cipher, InnerError> {
        let state = hs
            .into_stateless_transport_mode()
            .map_err(|e| InnerError::Handshake(e.to_string()))?;
        Ok(Cipher {
            state: Arc::new(state),
        })
    }

    /// The sending and receiving halves.
    pub fn split(self) -> (Sealer, Opener) {
        (
            Sealer {
                state: self.state.clone(),
                nonce: 0,
            },
            Opener {
                state: self.state,
                nonce: 0,
            },
        )
    }
}

/// Seals outgoing messages.
pub struct Sealer {
    state: Arc<snow::StatelessTransportState>,
    nonce: u64,
}

impl Sealer {
    /// One carrier message holding `plain`, sealed in chunks.
    pub fn seal(&mut self, plain: &[u8]) -> Result<Bytes, InnerError> {
        let mut out = BytesMut::with_capacity(plain.len() + overhead(plain.len()));
        let empty: [&[u8]; 1] = [&[]];
        let chunks: Box<dyn Iterator<Item = &[u8]>> = if plain.is_empty() {
            Box::new(empty.into_iter())
        } else {
            Box::new(plain.chunks(CHUNK_PLAIN))
        };
        for chunk in chunks {
            // Sealed straight into the message: no scratch buffer, no second copy.
            let at = out.len();
            let n = chunk.len() + TAG_LEN;
            out.put_u16(n as u16);
            out.resize(at + 2 + n, 0);
            let written = self
                .state
                .write_message(self.nonce, chunk, &mut out[at + 2..])
                .map_err(|e| InnerError::Protocol(e.to_string()))?;
            debug_assert_eq!(written, n);
            self.nonce += 1;
        }
        Ok(out.freeze())
    }
}

/// Opens incoming messages.
pub struct Opener {
    state: Arc<snow::StatelessTransportState>,
    nonce: u64,
}

impl Opener {
    /// The plain text of one carrier message.
    pub fn open(&mut self, mut msg: &[u8]) -> Result<Bytes, InnerError> {
        if msg.is_empty() {
            return Err(InnerError::Protocol("empty message".into()));
        }
        let mut out = BytesMut::with_capacity(msg.len());
        while !msg.is_empty() {
            if msg.len() < 2 {
                return Err(InnerError::Tampered);
            }
            let n = u16::from_be_bytes([msg[0], msg[1]]) as usize;
            if n < TAG_LEN || msg.len() < 2 + n {
                return Err(InnerError::Tampered);
            }
            // Opened straight into the result: no scratch buffer, no second copy.
            let at = out.len();
            out.resize(at + n - TAG_LEN, 0);
            let m = self
                .state
                .read_message(self.nonce, &msg[2..2 + n], &mut out[at..])
                .map_err(|_| InnerError::Tampered)?;
            out.truncate(at + m);
            self.nonce += 1;
            msg = &msg[2 + n..];
        }
        Ok(out.freeze())
    }
}

/// A transport whose messages travel sealed inside `T`'s.
pub struct InnerTransport<T> {
    carrier: T,
    cipher: Cipher,
}

impl<T: Transport> InnerTransport<T> {
    pub fn new(carrier: T, cipher: Cipher) -> Self {
        InnerTransport { carrier, cipher }
    }
}

/// The sending half: seals every message, or (version 2's mode `Outer`, `None`) passes it on
/// as is, once the handshake proved the outer TLS ends at the gateway.
pub struct InnerTx<Tx> {
    tx: Tx,
    sealer: Option<Sealer>,
}

/// The receiving half: opens every message, or passes it on as is (mode `Outer`).
pub struct InnerRx<Rx> {
    rx: Rx,
    opener: Option<Opener>,
}

/// A session transport from a finished handshake's halves: sealed with `cipher`'s keys when
/// they are given, plain (mode `Outer`) when not.
pub fn joined<Tx, Rx>(
    tx: Tx,
    rx: Rx,
    keys: Option<(Sealer, Opener)>,
) -> Joined<InnerTx<Tx>, InnerRx<Rx>> {
    let (sealer, opener) = match keys {
        Some((s, o)) => (Some(s), Some(o)),
        None => (None, None),
    };
    Joined(InnerTx { tx, sealer }, InnerRx { rx, opener })
}

impl<Tx> InnerTx<Tx> {
    /// Whether messages are sealed (not version 2's mode `Outer`).
    pub fn is_sealed(&self) -> bool {
        self.sealer.is_some()
    }
}

impl<S> InnerTx<crate::ws::WsTx<S>> {
    /// [`crate::ws::WsTx::mask_with_zero_key`] on the WebSocket underneath.
    pub fn mask_with_zero_key(&mut self) {
        self.tx.mask_with_zero_key()
    }
}

impl<Tx: TransportTx> TransportTx for InnerTx<Tx> {
    async fn send(&mut self, msg: Bytes) -> Result<(), TransportError> {
        let Some(sealer) = &mut self.sealer else {
            return self.tx.send(msg).await;
        };
        let sealed = sealer
            .seal(&msg)
            .map_err(|e| TransportError::Io(e.to_string()))?;
        self.tx.send(sealed).await
    }
    async fn send_data(&mut self, stream: u32, payload: Bytes) -> Result<(), TransportError> {
        match self.sealer {
            // Mode `Outer`: the carrier may write it without a copy.
            None => self.tx.send_data(stream, payload).await,
            Some(_) => self.send(crate::frame::encode_data(stream, &payload)).await,
        }
    }
    async fn flush(&mut self) -> Result<(), TransportError> {
        self.tx.flush().await
    }
    async fn close(&mut self) {
        self.tx.close().await
    }
}

impl<Rx: TransportRx> InnerRx<Rx> {
    /// The next message, opened; a message that fails authentication is
    /// [`InnerError::Tampered`] (the authentication exchange tells it apart).
    pub async fn recv_open(&mut self) -> Result<Option<Bytes>, InnerError> {
        match (self.rx.recv().await?, &mut self.opener) {
            (None, _) => Ok(None),
            (Some(m), Some(opener)) => opener.open(&m).map(Some),
            (Some(m), None) => Ok(Some(m)),
        }
    }
}

impl<Rx: TransportRx> TransportRx for InnerRx<Rx> {
    async fn recv(&mut self) -> Result<Option<Bytes>, TransportError> {
        self.recv_open().await.map_err(|e| match e {
            InnerError::Transport(t) => t,
            e => TransportError::Io(e.to_string()),
        })
    }
}

impl<T: Transport> Transport for InnerTransport<T> {
    type Tx = InnerTx<T::Tx>;
    type Rx = InnerRx<T::Rx>;
    fn split(self) -> (Self::Tx, Self::Rx) {
        let (tx, rx) = self.carrier.split();
        let (sealer, opener) = self.cipher.split();
        (
            InnerTx {
                tx,
                sealer: Some(sealer),
            },
            InnerRx {
                rx,
                opener: Some(opener),
            },
        )
    }
}

/// A transport already split in two (what is left after the authentication exchange).
pub struct Joined<Tx, Rx>(pub Tx, pub Rx);

impl<Tx: TransportTx, Rx: TransportRx> Transport for Joined<Tx, Rx> {
    type Tx = Tx;
    type Rx = Rx;
    fn split(self) -> (Tx, Rx) {
        (self.0, self.1)
    }
}

/// The agent's side of the handshake and authentication over `carrier`: returns the sealed
/// transport for the tunnel session. The token is sent only inside the channel.
pub async fn connect<T: Transport>(
    carrier: T,
    gateway: &PublicKey,
    token: &str,
    timeout: Duration,
) -> Result<Joined<InnerTx<T::Tx>, InnerRx<T::Rx>>, InnerError> {
    let (mut tx, mut rx) = carrier.split();
    let exchange = async {
        let (init, hello) = Initiator::start(gateway, &[])?;
        tx.send(hello).await?;
        tx.flush().await?;
        let reply = rx.recv().await?.ok_or(TransportError::Closed)?;
        let cipher = init.finish(&reply)?;
        let t = InnerTransport {
            carrier: Joined(tx, rx),
            cipher,
        };
        authenticate(t, token).await
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| InnerError::Timeout(timeout))?
}

/// Version 2, the agent's end after msg2: sends msg3 and reads the verdict (by `timeout`);
/// returns the session transport in the mode the gateway chose. `Outer` is accepted only when
/// this agent's own view allows it ([`crate::handshake::agent_allows_outer`]).
pub async fn finish_v2<Tx: TransportTx, Rx: TransportRx>(
    mut tx: Tx,
    mut rx: Rx,
    init: crate::handshake::Initiator2,
    offer: &crate::handshake::Offer,
    token: &crate::token::Token,
    binding: &crate::handshake::Binding,
    timeout: Duration,
) -> Result<Joined<InnerTx<Tx>, InnerRx<Rx>>, InnerError> {
    use crate::handshake::{open_verdict, Mode, Verdict};
    let (cipher, msg3) = init.finish(token, binding)?;
    let (sealer, mut opener) = cipher.split();
    let exchange = async {
        tx.send(msg3).await?;
        tx.flush().await?;
        rx.recv().await?.ok_or(TransportError::Closed)
    };
    let verdict = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| InnerError::Timeout(timeout))??;
    match open_verdict(&mut opener, &verdict)? {
        Verdict::Ok(Mode::Sealed) => Ok(joined(tx, rx, Some((sealer, opener)))),
        Verdict::Ok(Mode::Outer) if crate::handshake::agent_allows_outer(offer, binding) => {
            Ok(joined(tx, rx, None))
        }
        Verdict::Ok(Mode::Outer) => Err(InnerError::Protocol(
            "the gateway chose outer mode, which this agent cannot confirm on this TLS connection"
                .into(),
        )),
        Verdict::Refused { status, text } => Err(InnerError::Auth { status, text }),
    }
}

/// Sends the token over an established inner channel and waits for the gateway's verdict.
pub async fn authenticate<T: Transport>(
    t: InnerTransport<T>,
    token: &str,
) -> Result<Joined<InnerTx<T::Tx>, InnerRx<T::Rx>>, InnerError> {
    let (mut tx, mut rx) = t.split();
    let mut auth = Vec::with_capacity(5 + token.len());
    auth.extend_from_slice(b"AUTH ");
    auth.extend_from_slice(token.as_bytes());
    tx.send(Bytes::from(auth)).await?;
    tx.flush().await?;
    let verdict = match rx.recv_open().await {
        Ok(Some(v)) => v,
        Ok(None) => return Err(TransportError::Closed.into()),
        Err(e) => return Err(e),
    };
    if &verdict[..] == b"OK" {
        return Ok(Joined(tx, rx));
    }
    let text = String::from_utf8_lossy(&verdict);
    match text
        .strip_prefix("ERR ")
        .and_then(|r| r.split_once(' '))
        .and_then(|(s, t)| Some((s.parse::<u16>().ok()?, t)))
    {
        Some((status, t)) => Err(InnerError::Auth {
            status,
            text: t.chars().take(300).collect(),
        }),
        None => Err(InnerError::Protocol("unexpected answer to AUTH".into())),
    }
}

/// The gateway's side, after [`respond`] and sending its reply: reads the agent's token.
/// The caller verifies it and answers with [`accept_auth`] or [`refuse_auth`].
pub async fn read_auth<Rx: TransportRx>(rx: &mut InnerRx<Rx>) -> Result<String, InnerError> {
    let msg = match rx.recv_open().await {
        Ok(Some(m)) => m,
        Ok(None) => return Err(TransportError::Closed.into()),
        Err(e) => return Err(e),
    };
    let token = msg
        .strip_prefix(b"AUTH ")
        .ok_or_else(|| InnerError::Protocol("expected AUTH".into()))?;
    String::from_utf8(token.to_vec()).map_err(|_| InnerError::Protocol("token is not UTF-8".into()))
}

pub async fn accept_auth<Tx: TransportTx>(tx: &mut InnerTx<Tx>) -> Result<(), TransportError> {
    tx.send(Bytes::from_static(b"OK")).await?;
    tx.flush().await
}

pub async fn refuse_auth<Tx: TransportTx>(tx: &mut InnerTx<Tx>, status: u16, text: &str) {
    let _ = tx
        .send(Bytes::from(format!("ERR {status} {}", text.trim())))
        .await;
    let _ = tx.flush().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::memory_pair;

    #[test]
    fn key_text_round_trips_and_debug_hides_the_private_key() {
        let k = KeyPair::generate();
        let back = KeyPair::from_file_text(&k.to_file_text()).unwrap();
        assert_eq!(back.public(), k.public());
        let shown: PublicKey = k.public().to_string().parse().unwrap();
        assert_eq!(shown, k.public());
        let dbg = format!("{k:?}");
        assert!(dbg.contains("****"));
        assert!(!dbg.contains(&k.to_file_text().lines().last().unwrap()[8..]));
        assert!("sha256/abc".parse::<PublicKey>().is_err());
        assert!("x25519/AAAA".parse::<PublicKey>().is_err());
    }

    #[test]
    fn sealed_messages_round_trip_in_chunks_and_reject_tampering() {
        let k = KeyPair::generate();
        let (init, hello) = Initiator::start(&k.public(), b"request key").unwrap();
        let acc = respond(&k, &hello).unwrap();
        assert_eq!(acc.payload, b"request key");
        let client = init.finish(&acc.reply).unwrap();
        let (mut seal, _) = client.split();
        let (_, mut open) = acc.cipher.split();
        for n in [1usize, 100, CHUNK_PLAIN, CHUNK_PLAIN + 1, 200_000] {
            let plain: Vec<u8> = (0..n).map(|i| i as u8).collect();
            let sealed = seal.seal(&plain).unwrap();
            assert_eq!(sealed.len(), n + overhead(n));
            assert_eq!(&open.open(&sealed).unwrap()[..], &plain[..]);
        }
        let mut sealed = seal.seal(b"secret").unwrap().to_vec();
        sealed[5] ^= 1;
        assert!(matches!(open.open(&sealed), Err(InnerError::Tampered)));
        assert!(matches!(open.open(&[0, 1]), Err(InnerError::Tampered)));
    }

    #[test]
    fn a_wrong_pinned_key_fails_on_both_sides() {
        let real = KeyPair::generate();
        let pinned = KeyPair::generate().public();
        let (_init, hello) = Initiator::start(&pinned, &[]).unwrap();
        let err = respond(&real, &hello).err().unwrap();
        assert!(err.to_string().contains("not for this gateway"), "{err}");
        // A man in the middle answering with its own key cannot complete it either.
        let mitm = KeyPair::generate();
        let (init, hello) = Initiator::start(&real.public(), &[]).unwrap();
        assert!(respond(&mitm, &hello).is_err());
        let forged = respond(&mitm, &Initiator::start(&mitm.public(), &[]).unwrap().1).unwrap();
        assert!(init.finish(&forged.reply).is_err());
    }

    #[test]
    fn a_truncated_or_garbage_hello_is_refused_without_panicking() {
        let k = KeyPair::from_private([3u8; 32]);
        let (_init, hello) = Initiator::start(&k.public(), &[7u8; 32]).unwrap();
        assert!(respond(&k, &hello).is_ok());
        for n in 0..hello.len() {
            assert!(respond(&k, &hello[..n]).is_err(), "hello cut to {n} bytes");
        }
        let mut flipped = hello.to_vec();
        let last = flipped.len() - 1;
        flipped[last] ^= 0x80;
        assert!(respond(&k, &flipped).is_err());
        let mut garbage = vec![TAG_NOISE];
        garbage.extend((0..200u32).map(|i| (i * 37) as u8));
        assert!(respond(&k, &garbage).is_err());
        assert!(respond(&k, &refusal("no")).is_err());
        assert!(respond(&k, &[0xff; 100]).is_err());
        // And on the agent's side, garbage instead of the reply.
        let (init, _) = Initiator::start(&k.public(), &[]).unwrap();
        assert!(init.finish(&[TAG_NOISE, 1, 2, 3]).is_err());
        let (init, _) = Initiator::start(&k.public(), &[]).unwrap();
        assert!(init.finish(&[]).is_err());
    }

    #[test]
    fn a_truncated_or_padded_sealed_message_is_refused() {
        let k = KeyPair::generate();
        let (init, hello) = Initiator::start(&k.public(), &[]).unwrap();
        let acc = respond(&k, &hello).unwrap();
        let (mut seal, _) = init.finish(&acc.reply).unwrap().split();
        let (_, mut open) = acc.cipher.split();
        let sealed = seal.seal(b"frame").unwrap();
        assert!(matches!(open.open(&[]), Err(InnerError::Protocol(_))));
        // Cut inside the chunk header, inside the ciphertext, or one byte short.
        for n in [1, 2, 3, 2 + TAG_LEN - 1, sealed.len() - 1] {
            assert!(
                matches!(open.open(&sealed[..n]), Err(InnerError::Tampered)),
                "cut to {n} bytes"
            );
        }
        // A length below the tag's, and a trailing half header.
        assert!(matches!(
            open.open(&[0, TAG_LEN as u8 - 1]),
            Err(InnerError::Tampered)
        ));
        // None of that advanced the opener: the genuine message still opens.
        assert_eq!(&open.open(&sealed).unwrap()[..], b"frame");
        // A whole chunk followed by a stray byte.
        let mut padded = seal.seal(b"next").unwrap().to_vec();
        padded.push(0);
        assert!(matches!(open.open(&padded), Err(InnerError::Tampered)));
    }

    #[test]
    fn a_refusal_reaches_the_agent_as_text() {
        let (init, _) = Initiator::start(&KeyPair::generate().public(), &[]).unwrap();
        let err = init
            .finish(&refusal("this gateway's inner key is x25519/B"))
            .err()
            .unwrap();
        assert!(err.to_string().contains("x25519/B"), "{err}");
    }

    #[tokio::test]
    async fn token_travels_inside_and_the_verdict_comes_back() {
        let key = KeyPair::generate();
        let public = key.public();
        let (a, mut b) = memory_pair(16);
        let server = tokio::spawn(async move {
            let hello = b.recv_raw().await.unwrap().unwrap();
            let acc = respond(&key, &hello).unwrap();
            b.send_raw(acc.reply.clone()).await.unwrap();
            let (tx, rx) = InnerTransport::new(b, acc.cipher).split();
            let (mut tx, mut rx) = (tx, rx);
            let token = read_auth(&mut rx).await.unwrap();
            if token == "good" {
                accept_auth(&mut tx).await.unwrap();
                let m = rx.recv().await.unwrap().unwrap();
                tx.send(m).await.unwrap();
            } else {
                refuse_auth(&mut tx, 401, "token not accepted").await;
            }
            token
        });
        let t = connect(a, &public, "good", Duration::from_secs(5))
            .await
            .unwrap();
        let (mut tx, mut rx) = t.split();
        tx.send(Bytes::from_static(b"frame")).await.unwrap();
        assert_eq!(&rx.recv().await.unwrap().unwrap()[..], b"frame");
        assert_eq!(server.await.unwrap(), "good");

        let key = KeyPair::generate();
        let public = key.public();
        let (a, mut b) = memory_pair(16);
        tokio::spawn(async move {
            let hello = b.recv_raw().await.unwrap().unwrap();
            let acc = respond(&key, &hello).unwrap();
            b.send_raw(acc.reply.clone()).await.unwrap();
            let (mut tx, mut rx) = InnerTransport::new(b, acc.cipher).split();
            let _ = read_auth(&mut rx).await;
            refuse_auth(&mut tx, 401, "token not accepted").await;
        });
        let err = connect(a, &public, "bad", Duration::from_secs(5))
            .await
            .err()
            .unwrap();
        assert!(matches!(err, InnerError::Auth { status: 401, .. }), "{err}");
    }
}
