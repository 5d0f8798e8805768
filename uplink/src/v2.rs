//! Protocol version 2 from the dialing side (agent or connector): the token-bound Noise XK
//! handshake (`tunnel::handshake`) over a WebSocket (msg1 in the upgrade request, msg2 in the
//! `101`: no extra round trip) or over the HTTP fallback (msg1 as the create body), and the
//! session transport in the mode the gateway's authenticated verdict chose.
//!
//! What this side never does, whatever fails: send a bearer token, speak version 1, accept a
//! gateway key that is not in the token, or leave mode `Sealed` unless its own view of the TLS
//! allows it. Refusals before msg2 (HTTP statuses, a plain-text `0x02`) are hints for the
//! message and the backoff only.

use crate::ConnectError;
use base64::Engine;
use egress::GatewayStream;
use std::sync::Mutex;
use std::time::Duration;
use tunnel::handshake::{Binding, Initiator, Initiator2, Offer, Role, EXPORTER_LABEL};
use tunnel::inner::{InnerError, InnerRx, InnerTx, Joined};
use tunnel::token::Token;
use tunnel::{Transport, TransportRx, TransportTx};

/// A version 2 session transport over a carrier.
pub type V2Transport<Tx, Rx> = Joined<InnerTx<Tx>, InnerRx<Rx>>;

/// Which of a token's gateway keys to try, per token (keyed by its claim 10): `confirmed` is
/// the last key a handshake completed with (an authenticated verdict), `trying` the one the
/// next attempt uses. Any failure before msg2 authenticates (a refusal, a reset, an answer made
/// with another key: all forgeable) moves `trying` to the next key, wrapping around but never
/// below `confirmed`; only a completed handshake moves `confirmed`. So a forged refusal can make
/// the agent cycle among the token's own keys, never go back to one it moved past, and a
/// gateway that retired a key is found on the next attempt.
#[derive(Clone, Copy, Default)]
struct KeyState {
    confirmed: usize,
    trying: usize,
}

static KEYS: Mutex<Vec<([u8; 32], KeyState)>> = Mutex::new(Vec::new());

fn token_tag(token: &Token) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(token.claims().gateway_keys.concat()).into()
}

fn with_state<R>(token: &Token, f: impl FnOnce(&mut KeyState, usize) -> R) -> R {
    let tag = token_tag(token);
    let n = token.claims().gateway_keys.len();
    let mut all = KEYS.lock().unwrap_or_else(|e| e.into_inner());
    let i = match all.iter().position(|(t, _)| *t == tag) {
        Some(i) => i,
        None => {
            all.push((tag, KeyState::default()));
            all.len() - 1
        }
    };
    f(&mut all[i].1, n)
}

fn gateway_key(token: &Token) -> (usize, [u8; 32]) {
    let i = with_state(token, |st, n| st.trying.min(n - 1));
    (i, token.claims().gateway_keys[i])
}

/// A failure before msg2 authenticated, with key `i`: the next attempt tries the next key.
fn key_failed(token: &Token, i: usize) {
    with_state(token, |st, n| {
        if st.trying == i {
            st.trying = if i + 1 < n { i + 1 } else { st.confirmed };
        }
    })
}

/// A completed handshake with key `i`: never go below it again.
fn key_worked(token: &Token, i: usize) {
    with_state(token, |st, _| {
        st.confirmed = st.confirmed.max(i);
        st.trying = st.confirmed;
    })
}

/// How a v2 session came up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Done {
    /// Every frame is sealed (mode `Sealed`); `false`: mode `Outer`.
    pub sealed: bool,
    /// Whether the certificate key this side saw is one the gateway listed as legitimate (its
    /// own, its load balancer's), from the authenticated offer: `Some(false)` means someone on
    /// the way re-signed the TLS; `None` when the gateway listed none or there was no TLS.
    pub tls_listed: Option<bool>,
    /// Mode `Outer` over a load balancer's TLS that the gateway trusts (`[v2] trust_lb`), not
    /// its own: that balancer reads the session.
    pub balancer: bool,
}

impl Done {
    /// Words for logs and `status`: `v2 sealed`, and what the TLS check found.
    pub fn describe(&self) -> String {
        let mode = if self.sealed {
            "v2 sealed"
        } else if self.balancer {
            "v2 over the TLS of a load balancer the gateway trusts (it reads the session)"
        } else {
            "v2 over the gateway's own TLS"
        };
        match self.tls_listed {
            Some(false) => format!(
                "{mode}; the TLS certificate seen is not the gateway's (re-signed on the way)"
            ),
            _ => mode.to_string(),
        }
    }
}

fn listed(offer: &Offer, seen: Option<[u8; 32]>) -> Option<bool> {
    let seen = seen?;
    (!offer.tls_keys.is_empty()).then(|| offer.tls_keys.contains(&seen))
}

/// What this side saw of the outer TLS: its exporter value and the certificate's key.
pub fn binding(io: &GatewayStream) -> Binding {
    Binding {
        exporter: io.exporter(EXPORTER_LABEL),
        seen: io.tls_key(),
    }
}

/// A v2 failure as the caller's error: the gateway's authenticated refusal keeps its status.
pub fn error(e: InnerError) -> ConnectError {
    match e {
        InnerError::Auth { status, text } => ConnectError::Refused { status, text },
        e => ConnectError::Inner(e.to_string()),
    }
}

fn role_of(token: &Token) -> Role {
    match token.claims().kind {
        tunnel::token::Kind::Agent => Role::Agent,
        tunnel::token::Kind::Connector => Role::Connector,
    }
}

/// msg2 (from the `101` header or the create answer) read with the token's key; a failure
/// moves the next attempt to the token's next gateway key, if it has one.
fn read2(
    token: &Token,
    init: Initiator,
    key_index: usize,
    msg2: &[u8],
) -> Result<(Initiator2, Offer), ConnectError> {
    init.read2(msg2).map_err(|e| {
        key_failed(token, key_index);
        error(e)
    })
}

/// The session transport over a fresh WebSocket upgrade on `io` to `url`. `always_sealed`
/// (`[tunnel] inner = "always"`) offers no TLS binding, so the session stays sealed even over
/// the gateway's own TLS.
pub async fn over_websocket(
    io: GatewayStream,
    url: &str,
    token: &Token,
    max_frame: u32,
    timeout: Duration,
    always_sealed: bool,
    random_masks: bool,
) -> Result<
    (
        V2Transport<
            <tunnel::ws::WsTransport<GatewayStream> as Transport>::Tx,
            <tunnel::ws::WsTransport<GatewayStream> as Transport>::Rx,
        >,
        Done,
    ),
    ConnectError,
> {
    let mut b = binding(&io);
    if always_sealed {
        b.exporter = None;
    }
    let (i, key) = gateway_key(token);
    let (init, msg1) = Initiator::start(token, role_of(token), &key, &[]).map_err(error)?;
    let hello = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&msg1);
    let (ws, reply) = tunnel::ws::client_v2(io, url, &hello, max_frame, timeout)
        .await
        .inspect_err(|e| {
            // A refusal of msg1 (403: "not this gateway's key") may mean the gateway retired
            // this key; it may also be forged. Either way the next attempt tries the next one.
            if e.status() == Some(403) {
                key_failed(token, i);
            }
        })?;
    let Some(reply) = reply else {
        key_failed(token, i);
        return Err(ConnectError::Inner(
            "the gateway speaks protocol v1 only (no v2 answer in its 101); upgrade the gateway (this side speaks v2)".into(),
        ));
    };
    let msg2 = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(reply.trim())
        .map_err(|_| ConnectError::Inner("the gateway's v2 answer is not base64url".into()))?;
    let (init2, offer) = read2(token, init, i, &msg2)?;
    let (tx, rx) = ws.split();
    let (mut t, sealed) = finish(tx, rx, init2, &offer, token, &b, timeout).await?;
    if !random_masks && masks_protect_nothing(sealed, &offer) {
        t.0.mask_with_zero_key();
    }
    key_worked(token, i);
    Ok((
        t,
        Done {
            sealed,
            tls_listed: listed(&offer, b.seen),
            // The gateway chose `Outer` without terminating the TLS: the trusted balancer rule.
            balancer: !sealed && !offer.exporter,
        },
    ))
}

/// Whether this session's WebSocket masks protect nothing, so that they may use the zero key
/// (`WsTx::mask_with_zero_key`; `[tunnel] websocket_masks = "random"` keeps them random
/// anyway). Masks keep bytes an attacker chose (an app's data: a web page can send any through
/// the agent's proxy) from reaching, as they were sent, an intermediary that reads the
/// connection and could take them for HTTP (RFC 6455 §10.3). By the verdict:
/// - mode `Sealed`: every payload is sealed under the session's Noise keys; what an attacker
///   can still influence is only lengths (the frame's, each sealed chunk's 2-byte length),
///   between blocks of ciphertext;
/// - mode `Outer` with `offer.exporter` (the gateway terminates TLS itself): the gateway chose
///   `Outer` only because our TLS exporter value, sent inside msg3, equals its own (the balancer
///   rule needs `!offer.exporter`), so the TLS connection ends at the gateway and no
///   intermediary reads the frames at all. (We infer this from the gateway's verdict; the
///   verdict and the offer are authenticated by the handshake.)
/// - mode `Outer` through a trusted load balancer (`trust_lb`): the balancer reads the frames
///   and the app's bytes in them: the masks stay random.
fn masks_protect_nothing(sealed: bool, offer: &Offer) -> bool {
    sealed || offer.exporter
}

/// msg1 for the HTTP fallback (the create body), carrying the request key.
pub fn http_hello(
    token: &Token,
    request_key: &[u8; 32],
) -> Result<(Initiator, usize, bytes::Bytes), ConnectError> {
    let (i, key) = gateway_key(token);
    let (init, msg1) = Initiator::start(token, role_of(token), &key, request_key).map_err(error)?;
    Ok((init, i, msg1))
}

/// The HTTP fallback's session after the create answer (`msg2`): always sealed. `seen`: the
/// certificate key of the first connection (for [`Done::tls_listed`] only).
pub async fn over_http<T: Transport>(
    transport: T,
    init: Initiator,
    key_index: usize,
    msg2: &[u8],
    token: &Token,
    seen: Option<[u8; 32]>,
    timeout: Duration,
) -> Result<(V2Transport<T::Tx, T::Rx>, Done), ConnectError> {
    let (init2, offer) = read2(token, init, key_index, msg2)?;
    let (tx, rx) = transport.split();
    // No binding: each request may ride another TLS connection, so outer mode is never asked.
    let (t, sealed) = finish(tx, rx, init2, &offer, token, &Binding::default(), timeout).await?;
    key_worked(token, key_index);
    Ok((
        t,
        Done {
            sealed,
            tls_listed: listed(&offer, seen),
            balancer: false,
        },
    ))
}

/// Where and how a v2 session over the HTTP fallback dials its connections (each new TLS
/// connection of the fallback goes the same way out).
#[derive(Clone)]
pub struct HttpDial {
    pub way: std::sync::Arc<egress::Way>,
    pub gateway: egress::GatewayUrl,
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    pub timeout: Duration,
    pub candidate: egress::probe::Candidate,
}

/// A v2 session over the HTTP fallback (`POST {prefix}/{endpoint}/http?v=2`, `endpoint`
/// `agent` or `connector`), on `io` when a connection is already open; returns the sealed
/// transport, how it came up, and the certificate seen on the first connection.
pub async fn http_session(
    d: HttpDial,
    io: Option<GatewayStream>,
    token: &Token,
    endpoint: &str,
    mode: Option<tunnel::http::DownMode>,
) -> Result<
    (
        V2Transport<
            <tunnel::http::client::HttpTransport as Transport>::Tx,
            <tunnel::http::client::HttpTransport as Transport>::Rx,
        >,
        Done,
        String,
    ),
    ConnectError,
> {
    let redial: tunnel::http::client::Redial = {
        let d = d.clone();
        std::sync::Arc::new(move || {
            let d = d.clone();
            Box::pin(async move {
                let s = d
                    .way
                    .dial(&d.gateway, d.tls.as_ref(), d.timeout, &d.candidate)
                    .await?;
                Ok(Box::new(s) as tunnel::http::client::GatewayIo)
            })
        })
    };
    let io = match io {
        Some(io) => io,
        None => d
            .way
            .dial(&d.gateway, d.tls.as_ref(), d.timeout, &d.candidate)
            .await
            .map_err(|summary| ConnectError::NoWay {
                summary,
                rejected_only: false,
            })?,
    };
    let cert = io.peer_summary();
    let seen = io.tls_key();
    let mut mac = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut mac);
    let opts = tunnel::http::client::Options {
        host: d.gateway.authority(),
        base: format!("{}/{endpoint}/http", d.gateway.prefix),
        bearer: None,
        mac_key: Some(mac),
        mode,
        timeout: d.timeout,
    };
    let (init, key_index, msg1) = http_hello(token, &mac)?;
    let created = tunnel::http::client::connect_v2(redial, Some(Box::new(io)), opts, msg1)
        .await
        .inspect_err(|e| {
            if e.status() == Some(403) {
                key_failed(token, key_index);
            }
        })?;
    let (t, done) = over_http(
        created.transport,
        init,
        key_index,
        &created.reply,
        token,
        seen,
        d.timeout,
    )
    .await?;
    Ok((t, done, cert))
}

/// The HTTP fallback's create request was refused before msg2 (e.g. `403`, not this gateway's
/// key): the next attempt tries the token's next key.
pub fn http_refused(token: &Token, key_index: usize) {
    key_failed(token, key_index);
}

/// msg3 and the verdict; `true` with the transport when it is sealed.
async fn finish<Tx: TransportTx, Rx: TransportRx>(
    tx: Tx,
    rx: Rx,
    init2: Initiator2,
    offer: &Offer,
    token: &Token,
    b: &Binding,
    timeout: Duration,
) -> Result<(V2Transport<Tx, Rx>, bool), ConnectError> {
    let sealed_possible = !tunnel::handshake::agent_allows_outer(offer, b);
    let t = tunnel::inner::finish_v2(tx, rx, init2, offer, token, b, timeout)
        .await
        .map_err(error)?;
    let sealed = t.0.is_sealed();
    debug_assert!(sealed || !sealed_possible);
    Ok((t, sealed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tunnel::token::{Claims, Issuer, Kind};

    fn token(keys: usize) -> Token {
        Token::mint(
            &Issuer::generate(),
            Claims {
                kind: Kind::Agent,
                id: "a".into(),
                name: None,
                groups: vec![],
                routes: vec![],
                issued_at: 1,
                not_before: None,
                expires: Some(u64::MAX),
                agent_key: [0; 32],
                gateway_keys: (0..keys)
                    .map(|_| tunnel::inner::KeyPair::generate().public().0)
                    .collect(),
                deployment: None,
                issuer: [0; 32],
            },
        )
        .unwrap()
    }

    /// Masks keep an app's bytes (a web page can send any through the agent's proxy) from an
    /// intermediary that reads the connection. A load balancer trusted with mode `Outer` reads
    /// the frames and the app's bytes in them, so its sessions keep random masks; the zero key
    /// only where no intermediary reads the frames (the exporter binding) or none of the bytes
    /// are chosen by an attacker (sealed).
    #[test]
    fn a_session_a_load_balancer_reads_keeps_random_masks() {
        let offer = |exporter, trust_lb| Offer {
            exporter,
            trust_lb,
            time: 0,
            tls_keys: vec![],
        };
        // mode Outer through a trusted balancer: random masks.
        assert!(!masks_protect_nothing(false, &offer(false, true)));
        // mode Outer bound to the gateway's own TLS, and any sealed session: the zero key.
        assert!(masks_protect_nothing(false, &offer(true, false)));
        assert!(masks_protect_nothing(false, &offer(true, true)));
        assert!(masks_protect_nothing(true, &offer(false, true)));
        assert!(masks_protect_nothing(true, &offer(false, false)));
    }

    /// A forged refusal moves the agent to the token's next key; it cycles among the token's
    /// keys at or after the last one that worked, never back below it.
    #[test]
    fn a_forged_refusal_cannot_push_the_agent_back_to_a_key_it_moved_past() {
        let t = token(2);
        assert_eq!(gateway_key(&t).0, 0);
        key_failed(&t, 0);
        assert_eq!(gateway_key(&t).0, 1);
        key_failed(&t, 1);
        assert_eq!(gateway_key(&t).0, 0, "nothing confirmed yet: round again");
        key_failed(&t, 0);
        key_worked(&t, 1);
        key_failed(&t, 1);
        assert_eq!(
            gateway_key(&t).0,
            1,
            "wraps to the confirmed key, never back to 0"
        );
        // Another token has its own state.
        let other = token(2);
        assert_eq!(gateway_key(&other).0, 0);
    }

    #[test]
    fn a_retired_key_is_left_on_the_next_attempt_with_one_key_nothing_moves() {
        let t = token(1);
        key_failed(&t, 0);
        assert_eq!(gateway_key(&t).0, 0);
    }
}
