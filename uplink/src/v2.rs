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
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tunnel::handshake::{Binding, Initiator, Initiator2, Offer, Role, EXPORTER_LABEL};
use tunnel::inner::{InnerError, InnerRx, InnerTx, Joined};
use tunnel::token::Token;
use tunnel::{Transport, TransportRx, TransportTx};

/// A version 2 session transport over a carrier.
pub type V2Transport<Tx, Rx> = Joined<InnerTx<Tx>, InnerRx<Rx>>;

/// Which of the token's gateway keys to use: the last one that completed a handshake; moves to
/// the next only after a handshake failed with this one, never back.
static KEY_INDEX: AtomicUsize = AtomicUsize::new(0);

fn gateway_key(token: &Token) -> (usize, [u8; 32]) {
    let keys = &token.claims().gateway_keys;
    let i = KEY_INDEX.load(Ordering::Relaxed).min(keys.len() - 1);
    (i, keys[i])
}

fn key_failed(token: &Token, i: usize) {
    if i + 1 < token.claims().gateway_keys.len() {
        let _ = KEY_INDEX.compare_exchange(i, i + 1, Ordering::Relaxed, Ordering::Relaxed);
    }
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
        if matches!(e, InnerError::Handshake(_)) {
            key_failed(token, key_index);
        }
        error(e)
    })
}

/// The session transport over a fresh WebSocket upgrade on `io` to `url`.
pub async fn over_websocket(
    io: GatewayStream,
    url: &str,
    token: &Token,
    max_frame: u32,
    timeout: Duration,
) -> Result<
    (
        V2Transport<
            <tunnel::ws::WsTransport<GatewayStream> as Transport>::Tx,
            <tunnel::ws::WsTransport<GatewayStream> as Transport>::Rx,
        >,
        bool,
    ),
    ConnectError,
> {
    let b = binding(&io);
    let (i, key) = gateway_key(token);
    let (init, msg1) = Initiator::start(token, role_of(token), &key, &[]).map_err(error)?;
    let hello = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&msg1);
    let (ws, reply) = tunnel::ws::client_v2(io, url, &hello, max_frame, timeout).await?;
    let Some(reply) = reply else {
        return Err(ConnectError::Inner(
            "the gateway speaks protocol v1 only (no v2 answer in its 101); upgrade the gateway (this side speaks v2)".into(),
        ));
    };
    let msg2 = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(reply.trim())
        .map_err(|_| ConnectError::Inner("the gateway's v2 answer is not base64url".into()))?;
    let (init2, offer) = read2(token, init, i, &msg2)?;
    let (tx, rx) = ws.split();
    finish(tx, rx, init2, &offer, token, &b, timeout).await
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

/// The HTTP fallback's session after the create answer (`msg2`): always sealed.
pub async fn over_http<T: Transport>(
    transport: T,
    init: Initiator,
    key_index: usize,
    msg2: &[u8],
    token: &Token,
    timeout: Duration,
) -> Result<(V2Transport<T::Tx, T::Rx>, bool), ConnectError> {
    let (init2, offer) = read2(token, init, key_index, msg2)?;
    let (tx, rx) = transport.split();
    // No binding: each request may ride another TLS connection, so outer mode is never asked.
    finish(tx, rx, init2, &offer, token, &Binding::default(), timeout).await
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
